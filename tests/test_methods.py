"""The conformance suite: every registered adapter method passes the same battery, by being registered.

For each method, `CASES` gives a few recipe configs (and the tiny architectures they run on) and `DENSE` an
independent dense computation of its merged weight, written here from the papers' formulas, not with
peftkit's code. The checks:

1. dense math: a wrapped Linear / Conv1D / Embedding, its in-place merge and the pure state-dict merge all
   equal the dense weight computed here;
2. identity at init (where the method defines one): the injected model gives the base model's logits;
3. merged = unmerged: the state-dict merge (`merged_model`) and the in-place merge give the adapted
   model's logits, and unmerging restores the base weights;
4. state-dict round trip: export, `load_adapted_model` and the same logits and tensors;
5. PEFT interop both ways, fp32, max abs logit difference <= 1e-4: peft loads our adapter (and our merged
   export agrees); an adapter peft made with non-trivial weights is read, evaluated and merged by peftkit;
6. a bf16 base with an fp32 adapter;
7. a 4-bit NF4 base: training moves only the adapter, and the merge into the dequantized weights is exact;
8. training from a recipe exports an adapter;
9. a training micro-batch reads no GPU value on the host beyond what the frozen base's reads (no sync per step).

Module adapters (Llama-Adapter, bottleneck) add computation of their own and fold into no weight: they have no
dense weight and skip the merge checks (their refusal to merge is tested in their own files); bottleneck adapters
have no peft equivalent and skip the PEFT checks (their own reload is check 4).

The prompt family (prompt tuning, P-tuning, prefix tuning) adapts the model as a whole and changes no weight: it has
no dense math and no identity at init (peft starts the prompt at random), the merge checks become checks that the
merge is refused, and the rest hold as for every method. Their forward, eval loss and generation against peft's
forward are tested in tests/test_prompt_methods.py.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import bitsandbytes.functional as bnbF
import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.pytorch_utils import Conv1D

from peftkit.adapters import adapter_layers, inject_adapters, share_tensors, shared_holders
from peftkit.adapters.state_dicts import adapter_state_dict, merge_state_dict
from peftkit.data import IGNORE_INDEX
from peftkit.errors import PeftkitError
from peftkit.evaluate import token_loss_sum
from peftkit.loss import labelled_count, on_device
from peftkit.merge import merge_adapter
from peftkit.merge_weights import MergeWarning, conv1d_modules, merged_model
from peftkit.methods import METHODS, method_of
from peftkit.methods.adalora import AdaLoraConfig
from peftkit.methods.beft import BeftConfig
from peftkit.methods.boft import BoftConfig
from peftkit.methods.cartridge import CartridgeConfig
from peftkit.methods.cpt import CptConfig
from peftkit.methods.bottleneck import BottleneckConfig
from peftkit.methods.c3a import C3aConfig
from peftkit.methods.fourierft import FourierFtConfig
from peftkit.methods.gralora import GraloraConfig
from peftkit.methods.hira import HiraConfig
from peftkit.methods.hra import HraConfig
from peftkit.methods.ia3 import IA3Config
from peftkit.methods.loha import LohaConfig
from peftkit.methods.lokr import LokrConfig
from peftkit.methods.llama_adapter import LlamaAdapterConfig
from peftkit.methods.ln_tuning import LnTuningConfig
from peftkit.methods.lora import LoraConfig
from peftkit.methods.miss import MissConfig
from peftkit.methods.delora import DeloraConfig
from peftkit.methods.deft import DeftConfig
from peftkit.methods.unilora import UniLoraConfig
from peftkit.methods.lily import LilyConfig
from peftkit.methods.frod import FrodConfig
from peftkit.methods.waveft import WaveFtConfig
from peftkit.methods.poly import PolyConfig
from peftkit.methods.adamss import AdamssConfig
from peftkit.methods.shadow import ShadowConfig
from peftkit.methods.vera import VeraConfig
from peftkit.methods.randlora import RandLoraConfig
from peftkit.methods.vblora import VbLoraConfig
from peftkit.methods.oft import OftConfig
from peftkit.methods.p_tuning import PTuningConfig
from peftkit.methods.prefix_tuning import PrefixTuningConfig
from peftkit.methods.multitask_prompt_tuning import MultitaskPromptTuningConfig
from peftkit.methods.prompt_tuning import PromptTuningConfig
from peftkit.methods.road import RoadConfig
from peftkit.methods.peanut import PeanutConfig
from peftkit.methods.shira import ShiraConfig
from peftkit.methods.supertuning import SupertuningConfig
from peftkit.methods.pvera import PveraConfig
from peftkit.methods.tinylora import TinyLoraConfig
from peftkit.methods.psoft import PsoftConfig
from peftkit.methods.glora import GloraConfig
from peftkit.methods.osf import OsfConfig
from peftkit.methods.trainable_tokens import TrainableTokensConfig
from peftkit.methods.virtual import virtual_tokens
from peftkit.adapter_base import load_adapted_model
from peftkit.modeling import load_model
from peftkit.peft_format import peft_config, save_adapter
from peftkit.recipe import ModelConfig, QuantizationConfig
from peftkit.tiny import build_tiny_model
from tests.conftest import load_fp32, random_adapters, trimming_changes_nothing

IDS = torch.tensor([[1, 40, 41, 42, 7, 60, 61, 62], [1, 55, 12, 80, 81, 3, 47, 2]])
TOL = 1e-4  # max abs logit difference, fp32


@dataclass(frozen=True)
class Case:
    id: str
    cfg: object
    archs: tuple[str, ...]
    """Tiny architectures it runs on: llama, qwen2 (tied embeddings), gpt2 (Conv1D), gemma2 (scaled embeddings)."""
    layouts: tuple[str, ...]
    """Base layers of the dense check: linear, conv1d, embedding."""
    identity_at_init: bool = True
    identity_tol: float = 1e-6
    """Max abs logit difference from the base model at init."""
    quantized: bool = True
    """Whether it adapts a 4-bit base (refused, and the refusal checked: Super-Tuning composes the weight with its
    entries; PSOFT takes its factors from the unquantized weight's SVD, as peft computes them on loading)."""
    support_from_fp32: bool = True
    """Whether a bf16 base's adapter is built as the fp32 base's, for the bf16-vs-fp32 check (not where it is read from
    the weight in its own dtype, as peft's: Super-Tuning's support, the topk whose ties in bf16 pick other entries;
    FRoD's basis, from the bf16 weight; their bf16 logits are checked against peft's instead)."""
    samples_in_training: bool = False
    """The training forward draws noise (PVeRA): the bf16 and NF4 checks compare the evaluation forward's logits."""


CASES: dict[str, list[Case]] = {
    "lora": [
        Case("lora", LoraConfig(r=4, alpha=8), ("llama", "qwen2", "gpt2"), ("linear", "conv1d")),
        # gemma2: its embedding scales the lookup in forward, the update with it (it was left out: merged != unmerged)
        Case("lora-rslora-embedding", LoraConfig(r=2, alpha=4, use_rslora=True, target_modules=["embed_tokens", "o_proj"]),
             ("llama", "gemma2"), ("linear", "embedding")),
        # DoRA: Linear and Conv1D (biased on qwen2 q/k/v and every gpt2 layer: the bias stays outside the rescaling).
        Case("dora", LoraConfig(r=4, alpha=8, use_dora=True), ("llama", "qwen2", "gpt2"), ("linear", "conv1d")),
        # lora_bias: a bias in lora_B, on the biased layers (Qwen2's q/v, GPT-2's Conv1D c_attn); the merge moves the
        # base's bias by s b (tests/test_lora.py: a layer without one).
        Case("lora-bias", LoraConfig(r=4, alpha=8, lora_bias=True, target_modules={"regex": r".*\.(q_proj|v_proj|c_attn)"}),
             ("qwen2", "gpt2"), ("linear", "conv1d")),
        # LoRA-FA: A frozen at its init (the battery's checks hold as for LoRA; what trains is tested in test_train).
        Case("lora-fa", LoraConfig(r=4, alpha=8, lora_fa=True), ("llama",), ("linear",)),
    ],
    "ia3": [
        # peft's per-architecture defaults: k, v, down (input-scaled) on Llama; q, v, down on Qwen2 (biased q, v:
        # the merge scales the bias too); c_attn, mlp.c_proj on GPT-2.
        Case("ia3-defaults", IA3Config(method="ia3"), ("llama", "qwen2", "gpt2"), ()),
        Case("ia3-explicit", IA3Config(method="ia3", target_modules=["q_proj", "o_proj", "up_proj", "down_proj"],
                                       feedforward_modules=["down_proj", "up_proj"]), ("llama",), ()),
        # The dense check, on bare layers (no architecture): one output-scaled and one input-scaled layer each.
        Case("ia3-layers", IA3Config(method="ia3", target_modules=["layer"], feedforward_modules=["ff"]), (),
             ("linear", "conv1d", "linear-ff", "conv1d-ff")),
    ],
    # LoHa and LoKr adapt nn.Linear only, as peft's (GPT-2's Conv1D is refused: test_lycoris_refuses_conv1d).
    "loha": [Case("loha", LohaConfig(method="loha", r=4, alpha=8), ("llama", "qwen2"), ("linear",))],
    "lokr": [
        # Hidden 32 = 4 x 8, FFN 64 = 8 x 8: full w1, low-rank w2 everywhere (r 2 < 8 / 2).
        Case("lokr", LokrConfig(method="lokr", r=2, alpha=4), ("llama", "qwen2"), ("linear",)),
        # Splits (8, 4) / (8, 2) / (8, 8): w1 low-rank everywhere; w2 full on attention (4 x 4, 2 x 4), low-rank on
        # the MLP (8 x 4, 4 x 8): mixed layouts in one adapter, which every merge must read from the tensors.
        Case("lokr-mixed", LokrConfig(method="lokr", r=2, alpha=3, decompose_both=True, decompose_factor=8),
             ("llama",), ("linear",)),
    ],
    "vera": [
        # all-linear: q/k/v/o (32 x 32), gate/up (32 -> 64) and down (64 -> 32) on Llama, c_attn (32 -> 96) and
        # mlp.c_proj (128 -> 32) on GPT-2 slice one shared pair sized for the largest in and out.
        Case("vera", VeraConfig(method="vera", r=4), ("llama", "qwen2", "gpt2"), ("linear", "conv1d")),
        # Projections left out of the file: both sides draw them again from the key.
        Case("vera-unsaved-projections", VeraConfig(method="vera", r=8, target_modules=["k_proj", "up_proj", "down_proj"],
                                                    projection_prng_key=7, d_initial=0.5, save_projection=False),
             ("llama",), ()),
    ],
    "adalora": [
        # peft's default targets: q, v on Llama and Qwen2 (biased), c_attn (Conv1D) on GPT-2. Per-layer ranks
        # (rank_pattern) and the allocator have their own tests in tests/test_adalora.py.
        Case("adalora", AdaLoraConfig(method="adalora", init_r=4, target_r=2), ("llama", "qwen2", "gpt2"),
             ("linear", "conv1d")),
    ],
    # peft's OFT adapts nn.Linear (and bitsandbytes) layers, not GPT-2's Conv1D, which peftkit refuses too (below).
    # The dense layer has 12 inputs, the tiny models 32 and 64: blocks of 4, or r = 4 blocks of 3, 8 and 16.
    "oft": [
        Case("oft", OftConfig(method="oft", oft_block_size=4), ("llama", "qwen2"), ("linear",)),  # Cayley-Neumann, 5 terms
        # eps 1.5: radius 0.75 for 4 blocks, about the norm of a random Q block, so some are projected, some not.
        Case("oft-cayley-coft", OftConfig(method="oft", r=4, use_cayley_neumann=False, coft=True, eps=1.5), ("llama",),
             ("linear",)),
        Case("oft-shared", OftConfig(method="oft", oft_block_size=4, block_share=True, num_cayley_neumann_terms=7),
             ("llama",), ("linear",)),
    ],
    # peft's HRA adapts nn.Linear layers only (GPT-2's Conv1D is refused: tests/test_hra.py). An odd r with
    # Gram-Schmidt: no equal pairs to start from, so it starts away from the base model (as any Gram-Schmidt HRA).
    "hra": [
        # Its equal pairs of reflections cancel up to fp32 rounding (peft's: up to 1.2e-6 in these logits too).
        Case("hra", HraConfig(method="hra", r=4), ("llama", "qwen2"), ("linear",), identity_tol=1e-5),
        Case("hra-gram-schmidt", HraConfig(method="hra", r=3, apply_GS=True), ("llama",), ("linear",),
             identity_at_init=False),
    ],
    # peft's BOFT adapts nn.Linear layers only, as HRA's. Two butterfly factors of blocks of 2 (12 inputs: 6 blocks, in
    # pairs; the tiny models' 32 and 64: 16 and 32 blocks): peft computes them with its extension (peft_boft_factors).
    "boft": [
        Case("boft", BoftConfig(method="boft", boft_block_size=4), ("llama", "qwen2"), ("linear",)),
        Case("boft-butterfly", BoftConfig(method="boft", boft_block_size=2, boft_n_butterfly_factor=2),
             ("llama",), ("linear",)),
    ],
    # Rows 3, 7 and 12 of the embeddings (ids in IDS): on tied heads (qwen2, gemma2's scaled lookup, gpt2) the head's
    # logits of those tokens too. The dense check: an embedding of 20 rows.
    "trainable_tokens": [
        Case("trainable-tokens", TrainableTokensConfig(token_indices=[3, 7, 12]), ("llama", "qwen2", "gemma2", "gpt2"),
             ("embedding",)),
    ],
    # peft's defaults: every norm on Llama (RMSNorm) and GPT-2 (LayerNorm, with a shift), post_attention_layernorm on
    # Qwen2, Gemma 2's four per block (computing with 1 + w). The dense check: a LayerNorm of 12 features.
    "ln_tuning": [Case("ln-tuning", LnTuningConfig(method="ln_tuning"), ("llama", "qwen2", "gpt2", "gemma2"),
                       ("layernorm",))],
    # peft's default start, c ~ N(0, 1): not the base model. 16 coefficients fit the dense 12 x 7 layer and every
    # layer of the tiny models (k/v 32 x 16 under GQA); then per-module counts (n_frequency_pattern) from zeros.
    "fourierft": [
        Case("fourierft", FourierFtConfig(method="fourierft", n_frequency=16), ("llama", "qwen2", "gpt2"),
             ("linear", "conv1d"), identity_at_init=False),
        Case("fourierft-pattern", FourierFtConfig(method="fourierft", n_frequency=24, scaling=300.0, random_loc_seed=5,
                                                  init_weights=True, n_frequency_pattern={"down_proj": 40},
                                                  target_modules=["q_proj", "v_proj", "down_proj"]), ("llama",), ()),
    ],
    # all-linear: layers of in < out (gate/up), in > out (down, the dense 12 -> 7) and square, one pair of bases sized
    # for the largest; peft's alpha 640 over r 4 would swamp the tiny models, hence 8. (Sparse bases, bases left out
    # of the file, an r that does not divide the layers: tests/test_randlora.py.)
    "randlora": [
        Case("randlora", RandLoraConfig(method="randlora", r=4, randlora_alpha=8), ("llama", "qwen2", "gpt2"),
             ("linear", "conv1d")),
    ],
    # Vectors of 8 tile every layer of the tiny models (16 to 128 wide); not the dense 12 -> 7 (its dense check on
    # layers of 16 -> 8: tests/test_vblora.py). peft starts the logits and the bank at random: not the base model.
    "vblora": [Case("vblora", VbLoraConfig(method="vblora", r=4, num_vectors=16, vector_length=8, topk=2),
                    ("llama", "qwen2", "gpt2"), (), identity_at_init=False)],
    # peft's MiSS adapts nn.Linear layers only (GPT-2's Conv1D is refused: tests/test_miss.py). r 5 leaves 2 of 12 (32,
    # 64) inputs past the last whole shard (peft pads them); bat's 2 x 2 blocks (on Qwen2's biased q/k/v: bat computes
    # the layer itself) and mini's (r, 8) block on the tiny models only (no 12 x 7 tiling: tests/test_miss.py checks
    # them against peft's layer). Every variant starts at zeros: the base model.
    "miss": [
        Case("miss", MissConfig(method="miss", r=5), ("llama",), ("linear",)),
        Case("miss-bat", MissConfig(method="miss", r=2, init_weights="bat"), ("qwen2",), ()),
        Case("miss-mini", MissConfig(method="miss", r=4, init_weights="mini", mini_r=8), ("llama",), ()),
    ],
    # peft's DeLoRA adapts nn.Linear layers only (GPT-2's Conv1D is refused: tests/test_delora.py); B starts at zero,
    # the base model. Then per-module ranks and lambdas (rank_pattern, lambda_pattern) on Qwen2's biased layers.
    "delora": [
        Case("delora", DeloraConfig(method="delora", r=4, delora_lambda=2.0), ("llama",), ("linear",)),
        Case("delora-patterns", DeloraConfig(method="delora", r=2, rank_pattern={"down_proj": 4},
                                             lambda_pattern={"v_proj": 3.0},
                                             target_modules=["q_proj", "v_proj", "down_proj"]), ("qwen2",), ()),
    ],
    # peft's RoAd adapts nn.Linear layers only; its groups must divide each output size: the dense layer's 8 (linear-even),
    # the tiny models' 16 (k/v under GQA), 32 and 64. The merge rotates the bias too: the dense layer's (a Qwen2 with
    # biases, road_4, against peft's adapters: tests/test_road.py).
    "road": [
        Case("road", RoadConfig(method="road", group_size=8), ("llama",), ("linear-even",)),
        Case("road-4", RoadConfig(method="road", variant="road_4", group_size=4), (), ("linear-even",)),
    ],
    # peft's HiRA: Linear, GPT-2's Conv1D and embeddings (B starts at 0: the base model). Gemma's scaled embedding, where
    # peft's forward differs from its own merge, is tested in tests/test_hira.py; so are an embedding adapter's file and
    # logits against peft's, beside its layer bit for bit (here: its dense math, "gaussian" init).
    "hira": [
        Case("hira", HiraConfig(method="hira", r=4), ("llama", "gpt2"), ("linear", "conv1d")),
        Case("hira-embedding", HiraConfig(method="hira", r=2, init_weights="gaussian",
                                          target_modules=["embed_tokens", "o_proj"]), (), ("embedding",)),
    ],
    # peft's C3A adapts nn.Linear only. Its default start (xavier-uniform kernels) is not the base model. Blocks of 8
    # tile every layer of the tiny models (k/v 32 -> 16, MLP 64); the dense 12 -> 7 layer takes blocks of 1 only
    # (tests/test_c3a.py checks blocks of 4 against the same dense computation, block_size_pattern and the identity
    # start of init_weights: true). Llama only (added test time): the update leaves the bias alone, as the biased
    # layers of the dense checks show.
    "c3a": [
        Case("c3a", C3aConfig(method="c3a", block_size=8), ("llama",), (), identity_at_init=False),
        Case("c3a-dense", C3aConfig(method="c3a", block_size=1), (), ("linear",)),
    ],
    # peft's SHiRA adapts nn.Linear only; its values start at 0 (the base model) on peft's random mask, saved beside
    # them. r 2: 2 (out + in) entries per layer, 38 of the dense 12 -> 7 layer's 84, 96 of a 32 -> 16 one's 512.
    # Llama only (added test time): the update leaves the bias alone, as the dense check's biased layer shows.
    "shira": [Case("shira", ShiraConfig(method="shira", r=2), ("llama",), ("linear",), identity_tol=0.0)],
    # BEFT: a trained bias on nn.Linear layers; its merge needs the base's bias: Qwen2's q/k/v (the defaults: v_proj)
    # and the dense layer's. A layer without one (Llama's) is refused: tests/test_beft.py.
    "beft": [Case("beft", BeftConfig(method="beft", target_modules=["q_proj", "v_proj"]), ("qwen2",), ("linear",),
                  identity_tol=0.0)],
    # Super-Tuning: a support of the largest entries (Supra: with a LoRA beside it); nn.Linear of unquantized bases
    # only (tests/test_supertuning.py: the smallest entries, indices picked again on loading, the refusals).
    "supertuning": [
        Case("supertuning", SupertuningConfig(method="supertuning", sparsity=0.9, target_modules="all-linear"),
             ("llama",), ("linear",), identity_tol=0.0, quantized=False, support_from_fp32=False),
        Case("supertuning-supra", SupertuningConfig(method="supertuning", sparsity=0.95, r=2, lora_alpha=3.0),
             (), ("linear",)),
    ],
    # peft's GraLoRA: Linear and GPT-2's Conv1D (B starts at 0: the base model); k 2 on r 4, and the hybrid LoRA
    # beside k 4 blocks of rank 1 (the dense 12 -> 8 layer: parts of 3 inputs and 2 outputs). Llama only (added test
    # time): Conv1D's transposed update is checked here on the dense layer and against peft's layer in test_gralora.py.
    "gralora": [
        Case("gralora", GraloraConfig(method="gralora", r=4, alpha=6), ("llama",), ("linear-even", "conv1d-even")),
        Case("gralora-hybrid-k4", GraloraConfig(method="gralora", r=4, gralora_k=4, hybrid_r=2, alpha=6), (),
             ("linear-even",)),
    ],
    # peft's DeFT: Linear and GPT-2's Conv1D; R starts at relu(P)^T W (the base model, to fp32 rounding). qr with alpha
    # and r 8 capped at the dense layer's 7 outputs; PaRa (no R: never the base model).
    "deft": [
        Case("deft", DeftConfig(method="deft", r=4), ("llama", "gpt2"), ("linear", "conv1d"), identity_tol=1e-5),
        Case("deft-qr-alpha", DeftConfig(method="deft", r=8, decomposition_method="qr", alpha=16), (),
             ("linear", "conv1d")),
        Case("deft-para", DeftConfig(method="deft", r=4, para=True), (), ("linear",), identity_at_init=False),
    ],
    # PEANuT: nn.Linear (and 4-bit) layers; its update is a network of the weight itself, written out in float64
    # below (depth 0, then 2 encoder/decoder layers with residuals and GELU).
    "peanut": [
        Case("peanut", PeanutConfig(method="peanut", r=4, target_modules="all-linear"), ("llama",), ("linear",)),
        Case("peanut-deep", PeanutConfig(method="peanut", r=4, depth=2, act_fn="gelu", scaling=0.5), (), ("linear",)),
    ],
    # PVeRA: VeRA's shared pair (A of 2r rows: mean and log-variance), b starts at 0 (the base model); evaluation and
    # merges take the mean. Projections left out of the file and a seeded noise generator in the second.
    "pvera": [
        Case("pvera", PveraConfig(method="pvera", r=4), ("llama", "gpt2"), ("linear", "conv1d"),
             samples_in_training=True),
        Case("pvera-unsaved-projections", PveraConfig(method="pvera", r=8, target_modules=["k_proj", "up_proj", "down_proj"],
                                                      projection_prng_key=7, d_initial=0.5, save_projection=False,
                                                      generator_seed=3), ("llama",), (), samples_in_training=True),
    ],
    # TinyLoRA: each layer's SVD factors around v's R (v starts at 0: the base model); Linear, GPT-2's Conv1D and
    # embeddings, as peft's. Groups of tied v, an embedding, projections left out of the file in the second.
    "tinylora": [
        Case("tinylora", TinyLoraConfig(method="tinylora", r=2, u=4), ("llama", "gpt2"), ("linear", "conv1d", "embedding")),
        Case("tinylora-tied-embedding", TinyLoraConfig(method="tinylora", r=3, u=3, weight_tying=0.5, save_projection=False,
                                                       target_modules=["embed_tokens", "q_proj", "down_proj"]),
             ("llama",), ()),
    ],
    # peft's PSOFT adapts nn.Linear only (GPT-2's Conv1D and 4-bit/8-bit layers are refused: tests/test_psoft.py); R
    # starts at I, exactly the base model. A and B are the SVD of each weight, computed again on loading (not saved).
    # The dense layer: a free R with pissa_init, and the Neumann series with eps on Q, beside the defaults.
    "psoft": [
        Case("psoft", PsoftConfig(method="psoft", r=4), ("llama",), ("linear",), identity_tol=0.0, quantized=False),
        Case("psoft-free-pissa", PsoftConfig(method="psoft", r=3, psoft_orth=False, ab_svd_init="pissa_init",
                                             psoft_alpha=6), (), ("linear",)),
        Case("psoft-neumann", PsoftConfig(method="psoft", r=5, use_cayley_neumann=True, num_cayley_neumann_terms=7,
                                          cayley_neumann_eps=0.8, psoft_mag_a=False), (), ("linear",)),
    ],
    # peft's GLoRA adapts nn.Linear only (GPT-2's Conv1D is refused: tests/test_glora.py); its defaults (lora A, B, C,
    # constant D, E) start at the base model. Qwen2's biased q/k/v take C, D and E, its other layers and Llama's zeros;
    # the dense (biased) layer: the defaults, then vectors everywhere (C's (in, 1)) and constants with no C, D, E.
    "glora": [
        Case("glora", GloraConfig(method="glora", r=4), ("llama", "qwen2"), ("linear",), identity_tol=0.0),
        Case("glora-vectors", GloraConfig(method="glora", config_A_B="vector", config_C="vector",
                                          config_D_E="vector"), (), ("linear",)),
        Case("glora-constants", GloraConfig(method="glora", config_A_B="constant", config_C="none",
                                            config_D_E="none"), (), ("linear",)),
    ],
    # peft's Uni-LoRA: Linear and GPT-2's Conv1D, one theta_d for all the layers (U(+-0.02) at init: not the base
    # model); peft's defaults (q_proj, v_proj) on Llama, save_indices on the dense layers. Llama only (added test time):
    # GPT-2's Conv1D is checked here on the dense layer and against peft's model in tests/test_unilora.py.
    "unilora": [
        Case("unilora", UniLoraConfig(method="unilora", theta_d_length=64), ("llama",), (), identity_at_init=False),
        Case("unilora-dense", UniLoraConfig(method="unilora", r=3, theta_d_length=40, save_indices=True), (),
             ("linear", "conv1d"), identity_at_init=False),
    ],
    # peft's Lily: nn.Linear only; B starts at 0 (the base model). Not mergeable (the router averages over the batch):
    # no dense check. Both layers of the tiny Llama share A (stride 2) and all share 3 B experts per kind.
    "lily": [Case("lily", LilyConfig(method="lily", r=4, stride_A=2, num_B=3, scaling=2.0), ("llama",), ())],
    # peft's OSF: nn.Linear only (GPT-2's Conv1D and 4-bit layers refused: tests/test_osf.py); the trained factors
    # start at the SVD's low part, exactly the base model. The frozen split is computed again on loading (not saved).
    # Llama with peft's default targets (all seven projections); the dense layer with a fraction and a rank_pattern.
    "osf": [
        Case("osf", OsfConfig(method="osf", effective_rank=12), ("llama",), (), identity_tol=1e-5,
             quantized=False),
        Case("osf-fraction", OsfConfig(method="osf", effective_rank=0.5, rank_pattern={"layer": 2}), (), ("linear",)),
    ],
    # peft's FRoD: Linear and GPT-2's Conv1D, W replaced by U (S + diag(lambda_l)) V^T (the base at init, to the
    # rounding of W V^-T's fp64 split); unquantized bases only (the refusal checked).
    "frod": [Case("frod", FrodConfig(method="frod", sparse_rate=0.05), ("llama", "gpt2"), ("linear", "conv1d"),
                  identity_tol=1e-5, quantized=False, support_from_fp32=False)],
    # peft's WaveFT: Linear and GPT-2's Conv1D (and a 4-bit base, as FourierFT), the update scaling x one level of the
    # inverse 2-D DWT of 16 coefficients at random entries (0 at init: the base model). Haar (db1) on every tiny
    # model; db4 (8 taps, the coefficients padded by 6) with a per-module count; the sparse matrix itself without
    # the transform, the counts shared in proportion to the layers' sizes.
    "waveft": [
        Case("waveft", WaveFtConfig(method="waveft", n_frequency=16, scaling=2.0), ("llama", "qwen2", "gpt2"),
             ("linear", "conv1d")),
        Case("waveft-db4-pattern", WaveFtConfig(method="waveft", n_frequency=24, scaling=3.0, wavelet_family="db4",
                                                random_loc_seed=5, n_frequency_pattern={"down_proj": 40},
                                                target_modules=["q_proj", "v_proj", "down_proj"]), ("llama",),
             ("linear", "conv1d")),
        Case("waveft-sparse-proportional", WaveFtConfig(method="waveft", n_frequency=16, scaling=2.0, use_idwt=False,
                                                        proportional_parameters=True, target_modules="all-linear"),
             ("llama",), ("linear",)),
    ],
    # peft's Poly: nn.Linear only (Qwen2's biased q, v too); B starts at 0 (the base model). Two heads (MHR) of three
    # skills, two tasks: rows without task ids are task 0 (tests/test_poly.py checks per-row tasks against peft). Not
    # mergeable (the update depends on the row's task); its router samples its mix in training.
    "poly": [Case("poly", PolyConfig(method="poly", r=4, n_tasks=2, n_skills=3, n_splits=2), ("llama", "qwen2"), (),
                  samples_in_training=True)],
    # peft's AdaMSS: nn.Linear only (Qwen2's biased q/v: the bias is one more column of the decomposed weight, and the
    # update moves it); the rows' clustering is the bf16 weight's for a bf16 base (peft's bf16 logits checked instead);
    # unquantized bases only (the refusal checked).
    "adamss": [Case("adamss", AdamssConfig(method="adamss", r=8, num_subspaces=3, subspace_rank=2), ("llama", "qwen2"),
                    ("linear",), quantized=False, support_from_fp32=False)],
    # peft's ShadowPEFT: whole decoder blocks (the Llama family), a 1-layer mirror backbone on the base's embeddings; W_up
    # starts at 0, the base model. Not mergeable (no layouts). The backbone takes the base's dtype, as peft's (bf16 on a
    # bf16 base; the blocks' parts fp32): its bf16 logits are checked against peft's.
    "shadow": [Case("shadow", ShadowConfig(method="shadow", r=4), ("llama", "qwen2"), (), support_from_fp32=False)],
    # Module adapters: no dense weight (layouts empty). Llama-Adapter on the architectures peft's ADAPTION_PROMPT
    # supports (the tiny Llama has 2 key/value heads for 4 query heads: GQA); every layer, then the top one only.
    "llama_adapter": [
        Case("llama-adapter", LlamaAdapterConfig(method="llama_adapter", adapter_len=4), ("llama", "gpt2"), ()),
        Case("llama-adapter-top-layer", LlamaAdapterConfig(method="llama_adapter", adapter_len=3, adapter_layers=1),
             ("llama",), ()),
    ],
    "bottleneck": [
        # Houlsby: serial after attention and MLP, norms trained too; He et al.: parallel on the MLP, scaled by 4.
        Case("bottleneck-serial", BottleneckConfig(method="bottleneck", reduction_factor=8, after="both",
                                                   non_linearity="gelu", train_norms=True),
             ("llama", "qwen2", "gpt2"), ()),
        Case("bottleneck-parallel", BottleneckConfig(method="bottleneck", placement="parallel", reduction_factor=4),
             ("llama", "gpt2"), ()),
    ],
    # The prompt family: no layer is wrapped (no layouts); peft starts the prompt at random (no identity).
    "prompt_tuning": [
        Case("prompt-tuning", PromptTuningConfig(method="prompt_tuning", num_virtual_tokens=4, init="vocab"),
             ("llama", "qwen2", "gpt2", "gemma2"),
             (), identity_at_init=False),
        Case("prompt-tuning-text", PromptTuningConfig(method="prompt_tuning", num_virtual_tokens=5, init="text",
                                                      init_text="sum:"), ("llama",), (), identity_at_init=False),
    ],
    "p_tuning": [
        Case("p-tuning", PTuningConfig(method="p_tuning", num_virtual_tokens=4), ("llama", "qwen2", "gpt2", "gemma2"), (),
             identity_at_init=False),
        Case("p-tuning-lstm", PTuningConfig(method="p_tuning", num_virtual_tokens=3, encoder="lstm", encoder_hidden_size=8),
             ("llama",), (), identity_at_init=False),
    ],
    "prefix_tuning": [
        # Grouped-query attention on llama and qwen2 (2 key/value heads of 4 attention heads), none on gpt2.
        Case("prefix-tuning", PrefixTuningConfig(method="prefix_tuning", num_virtual_tokens=4),
             ("llama", "qwen2", "gpt2", "gemma2"),
             (), identity_at_init=False),
        Case("prefix-tuning-projection", PrefixTuningConfig(method="prefix_tuning", num_virtual_tokens=3, projection=True,
                                                            encoder_hidden_size=8), ("llama", "gpt2"), (),
             identity_at_init=False),
    ],
    # Cartridge: prefix tuning's table, its first row frozen; grouped-query attention on llama, none on gpt2.
    "cartridge": [
        Case("cartridge", CartridgeConfig(method="cartridge", num_virtual_tokens=4), ("llama", "gpt2"), (),
             identity_at_init=False),
    ],
    # CPT: a context of two examples (input template, inputs, output template, outputs); the projection and its loss
    # against peft's: tests/test_cpt.py. Its context changes the output from the start.
    "cpt": [
        Case("cpt", CptConfig(method="cpt", cpt_token_ids=[5, 6, 7, 8, 9, 10, 11, 12],
                              cpt_tokens_type_mask=[1, 2, 2, 3, 4, 0, 6, 8]), ("llama", "gpt2"), (),
             identity_at_init=False),
    ],
    # Rows without task ids are task 0 (tests/test_multitask_prompt_tuning.py checks per-row tasks against peft).
    "multitask_prompt_tuning": [
        Case("multitask-prompt-tuning", MultitaskPromptTuningConfig(method="multitask_prompt_tuning", num_virtual_tokens=4,
                                                                    num_tasks=2, num_ranks=2),
             ("llama", "qwen2", "gpt2", "gemma2"), (), identity_at_init=False),
    ],
}


def lora_dense(weight: torch.Tensor, bias, parts: dict[str, torch.Tensor], cfg: LoraConfig, layout: str):
    """(W + (alpha / r) B A, b), alpha / sqrt(r) with rsLoRA, in the layout the base stores W; with lora_bias, b +
    (alpha / r) b_B. With DoRA, (m * V / ||V||_c, b) for V = W + (alpha / r) B A (out, in), ||.||_c the L2 norm of
    each output row."""
    scaling = cfg.alpha / (math.sqrt(cfg.r) if cfg.use_rslora else cfg.r)
    if "lora_B.bias" in parts and bias is not None:
        bias = bias + scaling * parts["lora_B.bias"]
    if layout == "embedding":  # peft's names: A (r, vocab), B (dim, r); W is (vocab, dim)
        return weight + scaling * (parts["lora_embedding_B"] @ parts["lora_embedding_A"]).T, bias
    w = weight.T if layout == "conv1d" else weight  # (out, in)
    v = w + scaling * parts["lora_B.weight"] @ parts["lora_A.weight"]
    if cfg.use_dora:
        m = parts["lora_magnitude_vector"]
        v = torch.stack([m[i] * v[i] / math.sqrt(float((v[i] ** 2).sum())) for i in range(v.shape[0])])
    return (v.T if layout == "conv1d" else v), bias


def ia3_dense(weight: torch.Tensor, bias, parts: dict[str, torch.Tensor], cfg: IA3Config, layout: str):
    """(W diag(l), b) for an input-scaled (feed-forward) layer, (diag(l) W, l * b) for an output-scaled one;
    W is (out, in), or (in, out) for Conv1D."""
    l = parts["ia3_l"].flatten()
    w = weight.T if layout.startswith("conv1d") else weight  # (out, in)
    if layout.endswith("-ff"):
        return (w * l[None, :]).T if layout.startswith("conv1d") else w * l[None, :], bias
    scaled = l[:, None] * w
    return scaled.T if layout.startswith("conv1d") else scaled, None if bias is None else l * bias


def loha_dense(weight: torch.Tensor, bias, parts: dict[str, torch.Tensor], cfg: LohaConfig, layout: str):
    """(W + (alpha / r) (w1_a w1_b) o (w2_a w2_b), b), the Hadamard product written as FedPara's sum of r^2
    rank-one terms: (u v^T) o (p q^T) = (u o p)(v o q)^T."""
    (w1a, w1b), (w2a, w2b) = (parts["hada_w1_a"], parts["hada_w1_b"]), (parts["hada_w2_a"], parts["hada_w2_b"])
    delta = sum(torch.outer(w1a[:, s] * w2a[:, t], w1b[s] * w2b[t]) for s in range(cfg.r) for t in range(cfg.r))
    return weight + cfg.alpha / cfg.r * delta, bias


def lokr_dense(weight: torch.Tensor, bias, parts: dict[str, torch.Tensor], cfg: LokrConfig, layout: str):
    """(W + (alpha / r) kron(w1, w2), b): block (i, j) of the Kronecker product is w1[i, j] * w2; each factor
    is the saved full matrix or its low-rank pair's product, whichever the layer has."""
    w1, w2 = (parts[n] if n in parts else parts[n + "_a"] @ parts[n + "_b"] for n in ("lokr_w1", "lokr_w2"))
    kron = torch.cat([torch.cat([w1[i, j] * w2 for j in range(w1.shape[1])], dim=1) for i in range(w1.shape[0])])
    return weight + cfg.alpha / cfg.r * kron, bias


def vera_dense(weight: torch.Tensor, bias, parts: dict[str, torch.Tensor], cfg: VeraConfig, layout: str):
    """(W + diag(lambda_b) B[:out, :] diag(lambda_d) A[:, :in], b) (the paper's eq. 3 with the shared A (r, in_max) and
    B (out_max, r) cut to the layer's size); W is (out, in), or (in, out) for Conv1D."""
    w = weight.T if layout == "conv1d" else weight
    out, inp = w.shape
    delta = torch.diag(parts["vera_lambda_b"]) @ parts["vera_B"][:out, :] @ torch.diag(parts["vera_lambda_d"]) \
        @ parts["vera_A"][:, :inp]
    return (w + delta).T if layout == "conv1d" else w + delta, bias


def adalora_dense(weight: torch.Tensor, bias, parts: dict[str, torch.Tensor], cfg: AdaLoraConfig, layout: str):
    """(W + alpha / (init_r + 1e-5) * B diag(E) A, b), A (r, in), E (r, 1), B (out, r): the paper's eq. (1) with
    peft's scaling (its `ranknum` is init_r for every layer); W (out, in), or (in, out) for Conv1D."""
    w = weight.T if layout == "conv1d" else weight
    update = parts["lora_B"] @ torch.diag(parts["lora_E"].flatten()) @ parts["lora_A"]
    v = w + cfg.alpha / (cfg.init_r + 1e-5) * update
    return (v.T if layout == "conv1d" else v), bias


def oft_dense(weight: torch.Tensor, bias, parts: dict[str, torch.Tensor], cfg: OftConfig, layout: str):
    """(W R^T, b): the block-diagonal R = diag(R_1, ..., R_n) rotates the input, y = W (R^T x) + b. Block i comes
    from the skew-symmetric Q whose upper triangle, row by row, is row i of oft_R.weight (row 0 for every block
    with block_share). Cayley-Neumann with k + 1 terms: R_i = (I + Q)(I + Q + ... + Q^(k-1)), the Cayley transform
    (I + Q)(I - Q)^-1 with the inverse's series cut after k terms; exact: peft's (I - Q)(I + Q)^-1, the transform
    of -Q. COFT first scales each Q down to Frobenius norm eps / sqrt(rows) where it is larger."""
    assert layout == "linear"
    vec = parts["oft_R.weight"].float()
    rows, size = vec.shape
    b = next(b for b in range(2, 1000) if b * (b - 1) // 2 == size)
    eye = torch.eye(b)
    blocks = []
    for row in vec:
        q = torch.zeros(b, b)
        entries = iter(row)
        for i in range(b):
            for j in range(i + 1, b):
                q[i, j] = next(entries)
                q[j, i] = -q[i, j]
        if cfg.coft and float(q.norm()) > cfg.eps / math.sqrt(rows):
            q = q * (cfg.eps / math.sqrt(rows)) / q.norm()
        if cfg.use_cayley_neumann:
            series = sum(torch.linalg.matrix_power(q, p) for p in range(cfg.num_cayley_neumann_terms - 1))
            blocks.append((eye + q) @ series)
        else:
            blocks.append((eye - q) @ torch.linalg.inv(eye + q))
    n = weight.shape[1] // b
    rotation = torch.block_diag(*(blocks if rows == n else blocks * n))
    return weight @ rotation.T, bias


def hra_dense(weight: torch.Tensor, bias, parts: dict[str, torch.Tensor], cfg: HraConfig, layout: str):
    """(W H, b), H the product of the r Householder reflections I - 2 u u^T / (u^T u), one per column u of hra_u, in
    column order (the paper's eq. 3); with Gram-Schmidt, I - 2 Q Q^T for Q an orthonormal basis of the columns' span,
    here from a QR decomposition (the same projection Q Q^T whatever the signs of Q's columns)."""
    assert layout == "linear"
    u = parts["hra_u"].float()
    if cfg.apply_GS:
        q = torch.linalg.qr(u).Q
        return weight @ (torch.eye(u.shape[0]) - 2 * q @ q.T), bias
    product = torch.eye(u.shape[0])
    for column in u.T:
        product = product @ (torch.eye(u.shape[0]) - 2 * torch.outer(column, column) / (column @ column))
    return weight @ product, bias


def boft_dense(weight: torch.Tensor, bias, parts: dict[str, torch.Tensor], cfg: BoftConfig, layout: str):
    """(s * W M^T row by row, b): M = M_m ... M_1, M_i = P_i diag(Q_i1, ..., Q_in) P_i^T, each Q the Cayley transform
    (I - S)(I + S)^-1 of S = (R - R^T) / 2 for its block R of boft_R[i], P_i the permutation matrix of peft's butterfly
    order for factor i (written out here: in each group of n / (blocks / 2^i) features, the chunks of b / 2 in even
    places first, then the odd ones; the identity for one factor)."""
    assert layout == "linear"
    r, s = parts["boft_R"].float(), parts["boft_s"].float()
    m, blocks, b, _ = r.shape
    n = blocks * b
    matrix = torch.eye(n)
    for i in range(m):
        skew = (r[i] - r[i].transpose(1, 2)) / 2
        rotation = torch.block_diag(*[(torch.eye(b) - q) @ torch.linalg.inv(torch.eye(b) + q) for q in skew])
        order = list(range(n))
        if m > 1:
            group, half = n // (blocks // 2 ** i), b // 2
            chunks = [list(range(c, c + half)) for c in range(0, group, half)]
            within = [j for chunk in chunks[0::2] + chunks[1::2] for j in chunk]
            order = [start + j for start in range(0, n, group) for j in within]
        perm = torch.zeros(n, n)
        perm[torch.arange(n), torch.tensor(order)] = 1
        matrix = perm @ rotation @ perm.T @ matrix
    return (weight @ matrix.T) * s, bias


def trainable_tokens_dense(weight: torch.Tensor, bias, parts: dict[str, torch.Tensor], cfg, layout: str):
    """W with row i of each trained token id i replaced by its trained row."""
    dense = weight.clone()
    for row, token in enumerate(cfg.token_indices):
        dense[token] = parts["trainable_tokens_delta"][row]
    return dense, bias


def fourierft_dense(weight: torch.Tensor, bias, parts: dict[str, torch.Tensor], cfg: FourierFtConfig, layout: str):
    """(W + dW, b), dW[p, q] = scaling / (out in) sum_k c_k cos(2 pi (p j_k / out + q l_k / in)) (the real part of the
    inverse 2-D DFT of c at (j_k, l_k)), in float64; entry k is the k-th of randperm(out in) seeded with
    random_loc_seed, row j_k = e // in, column l_k = e % in. W is (out, in), or (in, out) for Conv1D."""
    w = weight.T if layout == "conv1d" else weight
    out, inp = w.shape
    c = parts["fourierft_spectrum"].double()
    entries = torch.randperm(out * inp, generator=torch.Generator().manual_seed(cfg.random_loc_seed))[:len(c)]
    j, l = (entries // inp).double(), (entries % inp).double()
    p, q = torch.arange(out, dtype=torch.float64)[:, None, None], torch.arange(inp, dtype=torch.float64)[None, :, None]
    delta = cfg.scaling / (out * inp) * (c * torch.cos(2 * math.pi * (p * j / out + q * l / inp))).sum(-1)
    dense = w + delta.to(w.dtype)
    return (dense.T if layout == "conv1d" else dense), bias


def randlora_dense(weight: torch.Tensor, bias, parts: dict[str, torch.Tensor], cfg: RandLoraConfig, layout: str):
    """(W + alpha / r sum_i B[:, i // r, i % r] (lambda[i // n, i % n] A[i // n, 0, :] * gamma[i % n, :]), b) in
    float64, the sum over the n r rank-one products of peft's pairing (i < n r, n = ceil(min(out, in) / r) bases):
    A' acts on the smaller side, so for out < in the same sum is the transpose's. W (out, in), or (in, out) for
    Conv1D."""
    w = weight.T if layout == "conv1d" else weight
    out, inp = w.shape
    small, large = min(out, inp), max(out, inp)
    lam, gamma = parts["randlora_lambda"].double(), parts["randlora_gamma"].double()
    a, b = parts["randlora_A"].double(), parts["randlora_B"].double()
    n = lam.shape[1]
    delta = torch.zeros(large, small, dtype=torch.float64)
    for i in range(n * cfg.r):
        delta += torch.outer(b[:large, i // cfg.r, i % cfg.r], lam[i // n, i % n] * a[i // n, 0, :small] * gamma[i % n])
    delta = cfg.randlora_alpha / cfg.r * (delta if inp == small else delta.T)
    dense = w + delta.to(w.dtype)
    return (dense.T if layout == "conv1d" else dense), bias


def vblora_dense(weight: torch.Tensor, bias, parts: dict[str, torch.Tensor], cfg: VbLoraConfig, layout: str):
    """(W + B A, b) in float64: each row's weights a softmax over its top-k logits and 0 elsewhere (a dense (..., N)
    mixture matrix), times the bank (N, L); A's rows laid out (r, in / L blocks of L), B's (out / L blocks of L, r).
    W (out, in), or (in, out) for Conv1D."""
    bank = parts["vblora_vector_bank"].double()

    def mixed(logits: torch.Tensor) -> torch.Tensor:
        logits = logits.double()
        kept = logits >= logits.topk(cfg.topk, dim=-1).values[..., -1:]
        weights = torch.where(kept, (logits - logits.max(-1, keepdim=True).values).exp(), 0.0)
        return (weights / weights.sum(-1, keepdim=True)) @ bank

    a = mixed(parts["vblora_logits_A"]).flatten(start_dim=1)  # (r, in / L, L) -> (r, in)
    b = mixed(parts["vblora_logits_B"]).permute(0, 2, 1).flatten(end_dim=1)  # (out / L, r, L) -> (out, r)
    w = weight.T if layout == "conv1d" else weight
    dense = w + (b @ a).to(w.dtype)
    return (dense.T if layout == "conv1d" else dense), bias


def miss_dense(weight: torch.Tensor, bias, parts: dict[str, torch.Tensor], cfg: MissConfig, layout: str):
    """(W', b): balance and mini add D[j mod r, o mod c] to W[o, j] (D the (r, c) block: every r-wide input shard of a
    row shares it); bat replaces each r x r block W_ij (row shard i, column shard j) by W_ij + W_ij D_i + D_i."""
    assert layout == "linear"
    d = parts["miss_block"].float()
    if cfg.init_weights == "bat":
        r, dense = d.shape[-1], weight.clone()
        for i in range(weight.shape[0] // r):
            for j in range(weight.shape[1] // r):
                block = weight[i * r:(i + 1) * r, j * r:(j + 1) * r]
                dense[i * r:(i + 1) * r, j * r:(j + 1) * r] = block + block @ d[i] + d[i]
        return dense, bias
    rows, columns = torch.arange(weight.shape[1]) % d.shape[0], torch.arange(weight.shape[0]) % d.shape[1]
    return weight + d[rows][:, columns].T, bias


def delora_dense(weight: torch.Tensor, bias, parts: dict[str, torch.Tensor], cfg: DeloraConfig, layout: str):
    """(W + sum_i (lambda / r) b_i a_i^T / (|a_i| |b_i|) diag(n), b): r rank-one terms (a_i A's row i, b_i B's column
    i, each norm at least 1e-4), each normalised, scaled by lambda / r, columns by the base's saved column norms n."""
    assert layout == "linear"
    a, b = parts["delora_A"].double(), parts["delora_B"].double()
    lam, norms = float(parts["delora_lambda"]), parts["delora_w_norm"].double()
    terms = [torch.outer(b[:, i], a[i]) / (max(float(a[i].norm()), 1e-4) * max(float(b[:, i].norm()), 1e-4))
             for i in range(a.shape[0])]
    return (weight.double() + lam / a.shape[0] * sum(terms) * norms).float(), bias


def c3a_dense(weight: torch.Tensor, bias, parts: dict[str, torch.Tensor], cfg, layout: str):
    """(W + C / in, b) in float64, block (i, j) of C the circulant of k_ij: sum_u k_ij[u] S^u, S the cyclic shift
    (S x)_s = x_(s + 1), so that (C_ij x)_s = sum_u k_ij[u] x_(s + u) (the paper's circular cross-correlation)."""
    k = parts["c3a_kernel"].double()
    b = k.shape[-1]
    shifts = torch.stack([torch.roll(torch.eye(b, dtype=torch.float64), u, dims=1) for u in range(b)])
    blocks = torch.einsum("mnu,ust->mnst", k, shifts)
    delta = torch.cat([torch.cat(list(row), dim=1) for row in blocks], dim=0) / weight.shape[1]
    return weight + delta.to(weight.dtype), bias


def beft_dense(weight: torch.Tensor, bias, parts: dict[str, torch.Tensor], cfg, layout: str):
    """(W, b + d): the weight as it is, the trained vector added to the bias (the checks of weights alone pass
    no bias)."""
    assert layout == "linear"
    return weight, None if bias is None else bias + parts["beft_bias"].reshape(-1)


def supertuning_dense(weight: torch.Tensor, bias, parts: dict[str, torch.Tensor], cfg, layout: str):
    """(W + S + (alpha / r) B A, b): S's entries written one by one at their flat positions (row e // in, column
    e % in), the LoRA's product where it has one."""
    assert layout == "linear"
    dense = weight.clone()
    columns = weight.shape[1]
    for e, v in zip(parts["supertuning_indices"].tolist(), parts["supertuning_values"].tolist(), strict=True):
        dense[e // columns, e % columns] += v
    if cfg.r:
        dense += cfg.scaling() * parts["supertuning_lora_B.weight"] @ parts["supertuning_lora_A.weight"]
    return dense, bias


def shira_dense(weight: torch.Tensor, bias, parts: dict[str, torch.Tensor], cfg, layout: str):
    """(W + S, b): entry k of shira_weight added at (shira_indices[0, k], shira_indices[1, k]), one at a time."""
    dense = weight.double().clone()
    for (row, col), value in zip(parts["shira_indices"].long().T.tolist(), parts["shira_weight"].double()):
        dense[row, col] += value
    return dense.to(weight.dtype), bias


def gralora_dense(weight: torch.Tensor, bias, parts: dict[str, torch.Tensor], cfg: GraloraConfig, layout: str):
    """(W + s D, b), s = alpha / (r + hybrid_r): D's block (m, n) (output part m, input part n of k each) is the product
    of output part m's B_m rows n r/k .. (n + 1) r/k and input part n's A_n columns m r/k .. (m + 1) r/k (the paper's
    eq. 5, one block at a time), plus the hybrid LoRA's B A; D transposed for Conv1D's (in, out) weight."""
    a, b = parts["gralora_A"].double(), parts["gralora_B"].double()  # (k, in / k, r), (k, r, out / k)
    k, part_in, r = a.shape
    part_out, t = b.shape[2], r // k
    d = torch.zeros(k * part_out, k * part_in, dtype=torch.float64)
    for m in range(k):
        for n in range(k):
            d[m * part_out:(m + 1) * part_out, n * part_in:(n + 1) * part_in] = (
                b[m, n * t:(n + 1) * t, :].T @ a[n, :, m * t:(m + 1) * t].T)
    if "gralora_A_general.weight" in parts:
        d += parts["gralora_B_general.weight"].double() @ parts["gralora_A_general.weight"].double()
    d = d * cfg.alpha / (cfg.r + cfg.hybrid_r)
    return (weight.double() + (d.T if layout.startswith("conv1d") else d)).float(), bias


def peanut_dense(weight: torch.Tensor, bias, parts: dict[str, torch.Tensor], cfg, layout: str):
    """(W + scaling U^T, b), U computed row by row of W^T in float64: u = act(A w); each encoder e: keep the input,
    u = act(E u); each decoder d (in order), u = act(D u) + the input kept by the encoder it mirrors; U's row B u."""
    from transformers.activations import ACT2FN

    assert layout == "linear"
    act = ACT2FN[cfg.act_fn]
    get = lambda name: parts[name].double()  # noqa: E731
    rows = []
    for w in weight.double().T:  # one row per input feature: the weights from it to every output
        u = act(get("peanut_A.weight") @ w)
        kept = []
        for i in range(cfg.depth):
            kept.append(u)
            u = act(get(f"peanut_encoders.{i}.weight") @ u)
        for i in range(cfg.depth):
            u = act(get(f"peanut_decoders.{i}.weight") @ u) + kept[cfg.depth - 1 - i]
        rows.append(get("peanut_B.weight") @ u)
    return (weight.double() + cfg.scaling * torch.stack(rows).T).float(), bias


def deft_dense(weight: torch.Tensor, bias, parts: dict[str, torch.Tensor], cfg: DeftConfig, layout: str):
    """((I - P_proj) W + s Q R, b) with the (out, out) projector built whole: P relu(P)^T (Q = P) or, for qr, Q Q^T with
    Q P's orthonormal basis; s = alpha / r (the layer's r: P's columns), 1 without alpha; PaRa: no Q R term. W as
    (out, in): Conv1D's transposed."""
    w = weight.double().T if layout.startswith("conv1d") else weight.double()
    p = parts["deft_P"].double()
    q = torch.linalg.qr(p)[0] if cfg.decomposition_method == "qr" else p
    projector = q @ q.T if cfg.decomposition_method == "qr" else p @ p.clamp(min=0).T
    adapted = (torch.eye(w.shape[0], dtype=torch.float64) - projector) @ w
    if "deft_R" in parts:
        adapted = adapted + (cfg.alpha / p.shape[1] if cfg.alpha else 1.0) * q @ parts["deft_R"].double()
    return (adapted.T if layout.startswith("conv1d") else adapted).float(), bias


def osf_dense(weight: torch.Tensor, bias, parts: dict[str, torch.Tensor], cfg: OsfConfig, layout: str):
    """(W + U diag(S) V - U0 diag(S0) V0, b) in float64, (U0, S0, V0) the singular triples of W past its top k (k the
    layer's effective_rank: the trained factors' rank t says it, k = min(out, in) - t), from torch.linalg.svd of the
    fp32 weight, each triple's outer product summed."""
    u, s, vh = (t.double() for t in torch.linalg.svd(weight.float(), full_matrices=False))
    k = min(weight.shape) - len(parts["osf_svd_params.S_low"])
    low = sum(s[i] * torch.outer(u[:, i], vh[i]) for i in range(k, len(s)))
    trained = parts["osf_svd_params.U_low"].double() @ torch.diag(parts["osf_svd_params.S_low"].double()) @ parts[
        "osf_svd_params.V_low"].double()
    return (weight.double() + trained - low).float(), bias


def unilora_dense(weight: torch.Tensor, bias, parts: dict[str, torch.Tensor], cfg: UniLoraConfig, layout: str):
    """(W + B A, b) in float64, entry by entry: A[k, j] = theta[idx_A[k, j]] s_A[k, j], B likewise (the scales, 1 /
    sqrt of how often an entry is taken over all the layers, against peft's in tests/test_unilora.py). W (out, in), or
    (in, out) for Conv1D."""
    theta = parts["unilora_theta_d"].double().tolist()

    def factor(indices: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return torch.tensor([[theta[i] * s for i, s in zip(row, srow)]
                             for row, srow in zip(indices.long().tolist(), scales.double().tolist())], dtype=torch.float64)

    a = factor(parts["unilora_indices_A"], parts["unilora_scales_A"])
    b = factor(parts["unilora_indices_B"], parts["unilora_scales_B"])
    w = weight.T if layout == "conv1d" else weight
    dense = w + (b @ a).to(w.dtype)
    return (dense.T if layout == "conv1d" else dense), bias


def frod_dense(weight: torch.Tensor, bias, parts: dict[str, torch.Tensor], cfg: FrodConfig, layout: str):
    """(U (S + diag(lambda_l)) V^T, b) in float64: U the unit columns of W V^-T (V's inverse by float64 inversion), S
    filled entry by entry from its indices. W (out, in), or (in, out) for Conv1D."""
    w = (weight.T if layout == "conv1d" else weight).double()
    v = parts["frod_V"].double()
    bi = w @ torch.linalg.inv(v).T
    u = bi / bi.norm(dim=0).clamp_min(1e-300)
    s = torch.diag(parts["frod_lambda_l"].double())
    for (i, j), value in zip(parts["frod_s_indices"].long().T.tolist(), parts["frod_lambda_s_values"].double().tolist()):
        s[i, j] += value
    dense = (u @ s @ v.T).float()
    return (dense.T if layout == "conv1d" else dense), bias


def waveft_dense(weight: torch.Tensor, bias, parts: dict[str, torch.Tensor], cfg: WaveFtConfig, layout: str):
    """(W + scaling dW, b) in float64: the coefficients placed at their entries (the k-th of randperm(out in) seeded
    with random_loc_seed: row e // in, column e % in) in the middle of a zero matrix L - 2 rows and columns larger (made
    even), PyWavelets' own inverse DWT of its four quadrants (pywt.idwt2, cA cH / cV cD), its middle (out x in);
    without use_idwt, the sparse matrix itself. W is (out, in), or (in, out) for Conv1D."""
    import numpy as np
    import pywt

    w = weight.T if layout == "conv1d" else weight
    out, inp = w.shape
    c = parts["waveft_spectrum"].double().numpy()
    entries = torch.randperm(out * inp, generator=torch.Generator().manual_seed(cfg.random_loc_seed))[:len(c)]
    grow = pywt.Wavelet(cfg.wavelet_family).rec_len - 2 if cfg.use_idwt else 0
    rows, cols = out + grow + (out + grow) % 2, inp + grow + (inp + grow) % 2
    if not cfg.use_idwt:
        rows, cols = out, inp
    spectrum = np.zeros((rows, cols))
    spectrum[(entries // inp).numpy() + (rows - out) // 2, (entries % inp).numpy() + (cols - inp) // 2] = c
    if cfg.use_idwt:
        h, v = rows // 2, cols // 2
        bands = (spectrum[:h, :v], (spectrum[:h, v:], spectrum[h:, :v], spectrum[h:, v:]))
        spectrum = pywt.idwt2(bands, cfg.wavelet_family, mode="zero")
    top, left = (spectrum.shape[0] - out) // 2, (spectrum.shape[1] - inp) // 2
    delta = torch.from_numpy(spectrum[top:top + out, left:left + inp]) * cfg.scaling
    dense = w + delta.to(w.dtype)
    return (dense.T if layout == "conv1d" else dense), bias


def adamss_dense(weight: torch.Tensor, bias, parts: dict[str, torch.Tensor], cfg: AdamssConfig, layout: str):
    """(W + D[:, :in], b + D[:, in]) with D = B_k A_k V^T in float64 on each subspace's rows: the rows of U of
    torch.svd_lowrank([W b], r) (its projection drawn after torch.manual_seed(random_seed)) clustered here by
    scikit-learn's KMeans with peft's settings (init random, one run of 10 iterations, random_state 123456789)."""
    from sklearn.cluster import KMeans

    full = weight.float() if bias is None else torch.cat([weight.float(), bias.float()[:, None]], dim=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.random_seed)
        u = torch.svd_lowrank(full, q=min(cfg.r, *full.shape), niter=2)[0]
    labels = KMeans(n_clusters=min(cfg.num_subspaces, len(u)), init="random", n_init=1, max_iter=10,
                    random_state=123456789).fit_predict(u.numpy())
    d = torch.zeros(full.shape, dtype=torch.float64)
    for k in range(labels.max() + 1):
        rows = torch.tensor((labels == k).nonzero()[0])
        d[rows] = parts[f"adamss_B.{k}"].double() @ parts[f"adamss_A.{k}"].double() @ parts["adamss_newB"].double()
    dense = (weight.double() + d[:, : weight.shape[1]]).float()
    return dense, None if bias is None else (bias.double() + d[:, -1]).float()


def ln_tuning_dense(weight: torch.Tensor, bias, parts: dict[str, torch.Tensor], cfg, layout: str):
    """The trained copy's (w', b') in place of the norm's (w, b)."""
    return parts["ln_tuning_layers.weight"], parts.get("ln_tuning_layers.bias", bias)


def road_dense(weight: torch.Tensor, bias, parts: dict[str, torch.Tensor], cfg: RoadConfig, layout: str):
    """(R W, R b), R written out entry by entry from the paper's eq. 4 in peft's layout: in each group of g outputs,
    p = i and q = i + g / 2 (i < g / 2) are a pair, R[p, p] = a_p cos t_p, R[p, q] = -a_p sin t_p, R[q, q] = a_q cos
    t_q, R[q, p] = a_q sin t_q; road_1 has one (t, a) per pair (numbered group by group), road_2 one per output,
    road_4 per group g numbers for the cosine terms and then g for the sine terms."""
    assert layout in ("linear", "linear-even")
    theta, alpha, g = parts["road_theta"].double(), parts["road_alpha"].double(), cfg.group_size
    out = weight.shape[0]
    r = torch.zeros(out, out, dtype=torch.float64)
    for p in range(out):
        group, k = divmod(p, g)
        i = k % (g // 2)
        partner = p + g // 2 if k < g // 2 else p - g // 2
        if cfg.variant == "road_1":
            a, t = alpha[group * g // 2 + i], theta[group * g // 2 + i]
            cos, sin = a * torch.cos(t), a * torch.sin(t)
        elif cfg.variant == "road_2":
            cos, sin = alpha[p] * torch.cos(theta[p]), alpha[p] * torch.sin(theta[p])
        else:
            cos = alpha[2 * g * group + k] * torch.cos(theta[2 * g * group + k])
            sin = alpha[2 * g * group + g + k] * torch.sin(theta[2 * g * group + g + k])
        r[p, p] = cos
        r[p, partner] = -sin if k < g // 2 else sin
    return (r @ weight.double()).float(), None if bias is None else (r @ bias.double()).float()


def pvera_dense(weight: torch.Tensor, bias, parts: dict[str, torch.Tensor], cfg: PveraConfig, layout: str):
    """(W + sum_k b_o B[o, k] d_k A[k, i], b) over the mean's r rows k of A (the first half of d and A), summed in
    float64 one rank at a time; W is (out, in), or (in, out) for Conv1D."""
    w = weight.T.double() if layout == "conv1d" else weight.double()
    out, inp = w.shape
    a, b = parts["pvera_A"].double()[:, :inp], parts["pvera_B"].double()[:out]
    lambda_b, lambda_d = parts["pvera_lambda_b"].double(), parts["pvera_lambda_d"].double()
    delta = sum(torch.outer(lambda_b * b[:, k], lambda_d[k] * a[k]) for k in range(b.shape[1]))
    merged = (w + delta).float()
    return merged.T if layout == "conv1d" else merged, bias


def tinylora_dense(weight: torch.Tensor, bias, parts: dict[str, torch.Tensor], cfg: TinyLoraConfig, layout: str):
    """(W + B R A, b), R = sum_i v_i P_i summed in float64 one i at a time (the paper's eq.), B R A laid out as W:
    (out, in), its transpose for Conv1D's (in, out), as it is for an embedding's (num, dim) table."""
    a, b, p, v = (parts[f"tinylora_{n}"].double() for n in "ABPv")
    r = sum(v[i] * p[i] for i in range(len(v)))
    delta = b @ r @ a
    return (weight.double() + (delta.T if layout == "conv1d" else delta)).float(), bias


def hira_dense(weight: torch.Tensor, bias, parts: dict[str, torch.Tensor], cfg: HiraConfig, layout: str):
    """(W + W * D, b), the Hadamard product of W with D[o, i] = sum_k B[o, k] A[k, i] (the paper's eq. 3), D laid out
    as W: (out, in), its transpose for Conv1D's (in, out) and an embedding's (num, dim) tables."""
    embedding = "embedding_" if layout == "embedding" else ""
    a, b = parts[f"hira_{embedding}A"].double(), parts[f"hira_{embedding}B"].double()
    d = torch.einsum("ok,ki->oi", b, a)
    d = d if layout == "linear" else d.T
    return (weight.double() + weight.double() * d).float(), bias


def psoft_dense(weight: torch.Tensor, bias, parts: dict[str, torch.Tensor], cfg: PsoftConfig, layout: str):
    """(W + U_r S_r (R - I) Vh_r, b) (pissa_init: U_r S_r^1/2 (R - I) S_r^1/2 Vh_r; s cancels either way), the SVD's
    factors those of torch.linalg.svd of the fp32 weight (the paper's, and their signs what the adapter was trained
    with); R = diag(b) (I + Q) (I - Q)^-1 diag(a) by an inverse in float64 (the Neumann series: its sum written out),
    Q skew-symmetric from the upper triangle, row-major."""
    u, s, vh = (t.double() for t in torch.linalg.svd(weight.float(), full_matrices=False))
    r = cfg.r
    u, s, vh = u[:, :r], s[:r], vh[:r]
    core = parts["psoft_R.weight"].double()
    if cfg.psoft_orth:
        q = torch.zeros(r, r, dtype=torch.float64)
        q[tuple(torch.triu_indices(r, r, 1))] = core
        q = q - q.T
        if cfg.use_cayley_neumann:
            if cfg.cayley_neumann_eps is not None and q.norm() > cfg.cayley_neumann_eps:
                q = q * cfg.cayley_neumann_eps / q.norm()
            powers = [torch.linalg.matrix_power(q, k) for k in range(cfg.num_cayley_neumann_terms)]
            core = powers[0] + 2 * sum(powers[1:-1]) + powers[-1]
        else:
            core = (torch.eye(r, dtype=torch.float64) + q) @ torch.linalg.inv(torch.eye(r, dtype=torch.float64) - q)
    rotation = parts.get("psoft_R.vector_b", torch.ones(r)).double()[:, None] * core * parts.get(
        "psoft_R.vector_a", torch.ones(r)).double()[None, :]
    left, right = (s, torch.ones(r)) if cfg.ab_svd_init == "psoft_init" else (s.sqrt(), s.sqrt())
    delta = u @ torch.diag(left) @ (rotation - torch.eye(r, dtype=torch.float64)) @ torch.diag(right.double()) @ vh
    return (weight.double() + delta).float(), bias


def glora_dense(weight: torch.Tensor, bias, parts: dict[str, torch.Tensor], cfg: GloraConfig, layout: str):
    """(W + W * A + B, b + b * D + E + W C) in float64 (the paper's eq. 1 and 2), each term summed out entry by entry
    from its path: a lora path's X[i, j] = sum_k Xd[i, k] Xu[k, j], a vector broadcast along its row, a constant."""
    def term(path: str) -> torch.Tensor | float:
        if f"{path}.Xd" in parts:
            return torch.einsum("ik,kj->ij", parts[f"{path}.Xd"].double(), parts[f"{path}.Xu"].double())
        return parts.get(f"{path}.X", parts.get(f"{path}.zeros", torch.zeros(1))).double()
    w = weight.double()
    merged = w + w * term("glora_A") + term("glora_B")
    if bias is None:
        return merged.float(), None
    c = term("glora_C")
    coupled = (w * c[:, 0][None, :]).sum(1) if torch.is_tensor(c) and c.dim() == 2 else torch.zeros(len(w))
    b = bias.double()
    return merged.float(), (b + b * term("glora_D") + term("glora_E") + coupled.double()).float()


DENSE = {"lora": lora_dense, "ia3": ia3_dense, "loha": loha_dense, "lokr": lokr_dense, "vera": vera_dense,
         "adalora": adalora_dense, "oft": oft_dense, "hra": hra_dense, "boft": boft_dense,
         "trainable_tokens": trainable_tokens_dense, "ln_tuning": ln_tuning_dense, "fourierft": fourierft_dense,
         "randlora": randlora_dense,
         "vblora": vblora_dense,
         "miss": miss_dense, "delora": delora_dense,
         "road": road_dense,
         "hira": hira_dense,
         "c3a": c3a_dense,
         "shira": shira_dense,
         "beft": beft_dense,
         "supertuning": supertuning_dense,
         "gralora": gralora_dense,
         "deft": deft_dense,
         "peanut": peanut_dense,
         "pvera": pvera_dense,
         "tinylora": tinylora_dense,
         "psoft": psoft_dense,
         "glora": glora_dense,
         "unilora": unilora_dense,
         "osf": osf_dense,
         "frod": frod_dense,
         "waveft": waveft_dense,
         "adamss": adamss_dense}
# peft's switch for non-trivially initialised weights, by peft_type (the prompt family starts at random already).
PEFT_NONTRIVIAL = {"LORA": {"init_lora_weights": False}, "IA3": {"init_ia3_weights": False},
                   "LOHA": {"init_weights": False}, "LOKR": {"init_weights": False}, "VERA": {"init_weights": False},
                   "ADALORA": {"init_lora_weights": False}, "OFT": {"init_weights": False},
                   "HRA": {"init_weights": False},  # every column drawn (peft's default pairs them: the identity)
                   "BOFT": {"init_weights": False},  # R ~ N(0, 0.1^2), s ~ N(1, 0.1^2)
                   "TRAINABLE_TOKENS": {"init_weights": False},  # random rows
                   "FOURIERFT": {"init_weights": False},  # N(0, 1), peft's default
                   "RANDLORA": {"init_weights": False},  # lambda ~ N(0, 1) (its default: 0, the base model)
                   "VBLORA": {"init_vector_bank_bound": 0.5, "init_logits_std": 1.0},  # random, but far from the base
                   "MISS": {},  # zeros in every variant (False is balance's random start): moved by hand below
                   "DELORA": {"init_weights": False},  # B drawn too (its default starts B at zero)
                   "ROAD": {"init_weights": False},  # angles N(0, 0.5^2), scales N(1, 0.5^2)
                   "HIRA": {"init_weights": False},  # A and B ~ N(0, 1)
                   "GRALORA": {"init_weights": False},  # B kaiming-uniform too
                   "DEFT": {"init_weights": False, "init_scale": 25.0},  # R ~ N(0, 0.5^2)
                   "PEANUT": {"init_weights": False},  # B Kaiming-uniform, as A
                   "UNILORA": {"init_weights": False},  # theta_d ~ N(0, 1)
                   "LILY": {"init_weights": False},  # B kaiming-uniform too
                   "OSF": {"init_weights": False},  # U_low, S_low, V_low ~ N(0, 1)
                   "FROD": {"init_weights": False},  # S's values N(0, 0.1^2), lambda_l moved by N(0, 0.1^2)
                   "WAVEFT": {"init_weights": False},  # N(0, 0.01^2)
                   "POLY": {"init_weights": False},  # B kaiming-uniform too
                   "ADAMSS": {"init_weights": None},  # B ~ N(0, 0.01^2)
                   "SHADOW": {"init_weights": False},  # W_up kaiming-uniform
                   "C3A": {"init_weights": "gaussian"},  # N(0, 1) (its default, xavier-uniform, is a draw too)
                   "SHIRA": {"init_weights": False},  # N(0, 1)
                   "BEFT": {"init_weights": False},  # N(0, 1)
                   "SUPERTUNING": {"init_weights": False},  # values N(0, 1) (and a LoRA's B drawn)
                   "PVERA": {"init_weights": False},  # b = 1, d ~ N(0, 1)
                   "TINYLORA": {"init_weights": "uniform", "init_v_bound": 1.0},  # v ~ U(-1, 1) (its default: 0)
                   "PSOFT": {"init_weights": False},  # Q ~ N(0, 0.1^2)
                   "GLORA": {"init_weights": False},  # Xd kaiming-uniform, constants N(0, 0.02^2)
                   "LN_TUNING": {},  # its copies start at the base's values: moved by hand below
                   "ADAPTION_PROMPT": {},  # its gate starts at 0 whatever the config: set by hand below
                   # The training form: P-tuning's and a projected prefix's encoder, whose output peft saves.
                   "PROMPT_TUNING": {"inference_mode": False}, "P_TUNING": {"inference_mode": False},
                   "PREFIX_TUNING": {"inference_mode": False}, "MULTITASK_PROMPT_TUNING": {"inference_mode": False},
                   "CARTRIDGE": {"inference_mode": False},
                   "XLORA": {},  # (its experts' directories: tests/test_xlora.py)
                   "CPT": {"inference_mode": False}}
NO_PEFT = {"bottleneck", "fusion"}  # methods peft has no equivalent of: saved in peftkit's own layout
# Methods built from other adapters' directories, which no fixed Case can name: each has its own test file.
BUILT_FROM_ADAPTERS = {"fusion": "tests/test_fusion.py", "xlora": "tests/test_xlora.py"}

ALL = [(name, case) for name, cases in CASES.items() for case in cases]
BY_ARCH = [pytest.param(case, arch, id=f"{case.id}-{arch}") for _, case in ALL for arch in case.archs]
BY_CASE = [pytest.param(case, id=case.id) for _, case in ALL if case.archs]
DENSE_CASES = [pytest.param(case, id=case.id) for _, case in ALL if case.layouts]


def test_every_registered_method_is_covered():
    assert set(CASES) | set(BUILT_FROM_ADAPTERS) == set(METHODS) and not set(CASES) & set(BUILT_FROM_ADAPTERS)
    assert set(DENSE) == {name for name, m in METHODS.items() if m.merge_refusal() is None}
    assert {m.peft_type for name, m in METHODS.items() if name not in NO_PEFT} <= set(PEFT_NONTRIVIAL)


def _skip_unless_mergeable(case) -> None:
    method = method_of(case.cfg)
    if method.merge_refusal() is not None and method.layer_targets:
        pytest.skip(f"{case.id}: a module adapter, not mergeable (tested to refuse in its own test file)")


def _skip_without_peft(case) -> None:
    if case.cfg.method in NO_PEFT:
        pytest.skip(f"{case.id}: peft has no {case.cfg.method} method")


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _peft_builds_boft_factors(peft_boft_factors) -> None:
    """peft's BOFT computes every butterfly factor (tests/conftest.py), whatever this machine can compile."""


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("method-models")
    paths = {}
    for arch in ("llama", "qwen2", "gpt2", "gemma2"):
        paths[arch] = root / arch
        build_tiny_model(paths[arch], arch=arch, hidden_size=32, num_layers=2, seed=0)
    return paths


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS, **_peft_tasks(model)).logits.float()


def _peft_tasks(model: nn.Module) -> dict[str, torch.Tensor]:
    """peft's multitask prompt tuning and Poly need task ids (peftkit's take task 0 without them): task 0 for every
    row."""
    config = getattr(model, "peft_config", None)
    reads = isinstance(model, PeftModel) and config["default"].peft_type in ("MULTITASK_PROMPT_TUNING", "POLY")
    return {"task_ids": torch.zeros(len(IDS), dtype=torch.long)} if reads else {}


def _adapted(path: Path, cfg, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, list[str]]:
    """An injected model with its adapters moved far from identity, as after training."""
    model = load_fp32(path, dtype)
    torch.manual_seed(0)
    targets = inject_adapters(model, cfg)
    random_adapters(model, seed=1, std=0.1)
    return model.eval(), targets


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


def _save(model: nn.Module, cfg, targets: list[str], base: Path, out: Path) -> Path:
    config = peft_config(cfg, targets, str(base), bool(conv1d_modules(model)), model.config.model_type,
                         model_config=model.config)
    save_adapter(out, adapter_state_dict(model, cfg.modules_to_save), config)
    return out


# ------------------------------------------------------------------------------------- 1. dense math


def _base_layer(layout: str) -> nn.Module:
    torch.manual_seed(0)
    kind = layout.removesuffix("-ff")
    layer = {"linear": lambda: nn.Linear(12, 7), "linear-even": lambda: nn.Linear(12, 8), "conv1d": lambda: Conv1D(7, 12),
             "conv1d-even": lambda: Conv1D(8, 12), "embedding": lambda: nn.Embedding(20, 7),
             "layernorm": lambda: nn.LayerNorm(12)}[kind]()
    nn.init.normal_(layer.weight)
    return layer


def _dense_forward(base: nn.Module, weight: torch.Tensor, x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "embedding":
        return weight[x]
    if layout == "layernorm":  # (x - mean) / sqrt(var + eps) * w; the test adds the shift
        return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5) * weight
    return x @ weight if layout.startswith("conv1d") else x @ weight.T


@pytest.mark.parametrize("case", DENSE_CASES)
def test_dense_math(case):
    method = method_of(case.cfg)
    for layout in case.layouts:
        base = _base_layer(layout)
        weight, bias = base.weight.detach().clone(), getattr(base, "bias", None)
        bias = None if bias is None else bias.detach().clone()
        path = "ff" if layout.endswith("-ff") else "layer"
        layer = method.wrap(base, case.cfg, path)
        layer.train(not case.samples_in_training)  # (PVeRA's mean: its merge)
        share_tensors(method, case.cfg, [layer])  # VeRA's projections, sized for this one layer
        method.randomize(layer, torch.Generator().manual_seed(2), 0.3)
        parts = {n: p.detach().clone() for n, p in layer.parts().items()}
        dense, dense_bias = DENSE[method.name](weight, bias, parts, case.cfg, layout)
        # not trivially the base (BEFT changes the bias alone)
        assert _diff(dense, weight) > 1e-2 or (bias is not None and _diff(dense_bias, bias) > 1e-2), layout
        x = torch.randint(0, 20, (3, 5)) if layout == "embedding" else torch.randn(3, 5, 12)
        expected = _dense_forward(base, dense, x, layout) + (0 if dense_bias is None else dense_bias)
        assert _diff(layer(x), expected) <= 1e-5, layout

        base_state = {f"{path}.weight": weight} | ({} if bias is None else {f"{path}.bias": bias})
        adapter = {f"base_model.{n}" if n in method.shared_names else f"base_model.model.{path}.{n}": t
                   for n, t in parts.items()}
        state = merge_state_dict(base_state, adapter, case.cfg, fan_in_fan_out={path} if layout.startswith("conv1d") else set())
        assert _diff(state[f"{path}.weight"], dense) <= 1e-6, layout
        if bias is not None:
            assert _diff(state[f"{path}.bias"], dense_bias) <= 1e-6, layout
        layer.merge()
        assert _diff(base.weight, dense) <= 1e-6 and (bias is None or _diff(base.bias, dense_bias) <= 1e-6), layout
        assert _diff(layer(x), expected) <= 1e-5, layout
        layer.unmerge()
        assert _diff(base.weight, weight) <= 1e-5 and (bias is None or _diff(base.bias, bias) <= 1e-5), layout


# -------------------------------------------------------------------- 2., 3. identity, merged = unmerged


@pytest.mark.parametrize(("case", "arch"), BY_ARCH)
def test_identity_at_init(case, arch, models):
    if not case.identity_at_init:
        pytest.skip(f"{case.id} does not start from the base model")
    model = load_fp32(models[arch])
    base = _logits(model)
    torch.manual_seed(0)
    inject_adapters(model, case.cfg)
    assert _diff(_logits(model), base) <= case.identity_tol


@pytest.mark.parametrize(("case", "arch"), BY_ARCH)
def test_merged_equals_unmerged(case, arch, models):
    _skip_unless_mergeable(case)
    model, _ = _adapted(models[arch], case.cfg)
    adapted = _logits(model)
    assert _diff(adapted, _logits(load_fp32(models[arch]))) > 1e-3  # the adapter really changes the output
    if refusal := method_of(case.cfg).merge_refusal():  # the prompt family: nothing to merge, and it says so
        with pytest.raises(PeftkitError, match="cannot be merged"):
            merged_model(model, case.cfg, torch.float32)
        assert "--adapter" in refusal
        return
    assert _diff(_logits(merged_model(model, case.cfg, torch.float32).eval()), adapted) <= TOL
    embedding = model.get_input_embeddings()
    if hasattr(embedding, "base_layer") and embedding.base_layer.weight is model.get_output_embeddings().weight \
            and not embedding.method.merges_tied:
        # Merged in place, the head tied to the embeddings would take their update too (merged_model unties): refused
        # (it was done, the logits off the unmerged model's).
        weight = embedding.base_layer.weight.detach().clone()
        with pytest.raises(PeftkitError, match=r"^Cannot merge in place into a layer whose weight 'lm_head' holds too "
                                               r"\(tied weights: tie_word_embeddings\).* Use `peftkit merge` or "):
            embedding.merge()
        assert torch.equal(embedding.base_layer.weight, weight) and not embedding.merged
        return
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for layer in adapter_layers(model).values():
        layer.merge()
    assert _diff(_logits(model), adapted) <= TOL
    for layer in adapter_layers(model).values():
        layer.unmerge()
    assert max(_diff(p, before[n]) for n, p in model.named_parameters()) <= 1e-5


def test_a_merge_of_a_tied_model_unties_what_the_adapter_set_apart(models, tmp_path):
    """Qwen2's head is tied to its embeddings, and LoRA on the embeddings adapts the lookup only (as peft's): merged,
    the two matrices differ, so the saved config must not tie them, or tie_weights() (which transformers'
    resize_token_embeddings calls; vLLM ties on loading) would serve another model."""
    cfg = LoraConfig(r=2, alpha=4, target_modules=["embed_tokens", "o_proj"])
    model, _ = _adapted(models["qwen2"], cfg)
    adapted = _logits(model)
    merged_model(model, cfg, torch.float32).save_pretrained(tmp_path / "merged")
    reloaded = load_fp32(tmp_path / "merged")
    assert not reloaded.config.tie_word_embeddings
    assert _diff(_logits(reloaded), adapted) <= TOL
    reloaded.tie_weights()
    assert _diff(_logits(reloaded), adapted) <= TOL
    # A merge that leaves both alike keeps them tied, one matrix on disk.
    plain = LoraConfig(r=2, alpha=4, target_modules=["o_proj"])
    merged_model(_adapted(models["qwen2"], plain)[0], plain, torch.float32).save_pretrained(tmp_path / "alike")
    assert load_fp32(tmp_path / "alike").config.tie_word_embeddings
    # Gemma's: loaders that take them to be tied (vLLM, llama.cpp's converter) are named.
    gemma, _ = _adapted(models["gemma2"], cfg)
    with pytest.warns(MergeWarning, match="vLLM refuses it; llama.cpp's GGUF converter drops its lm_head"):
        merged_model(gemma, cfg, torch.float32)


def test_peft_s_lora_on_a_tied_head_loads_with_its_base_copy(models, tmp_path):
    """peft saves `lm_head.base_layer.weight` beside a LoRA on a tied head (Qwen2, SmolLM2): that weight is the
    embeddings' one tensor, which a parameter listing without duplicates names only once, as the embeddings'; the
    adapter was refused as "trained on another base model" (and inspect said it loads). Loaded, peft's logits."""
    from peft import LoraConfig as PeftLoraConfig

    from peftkit.adapter_base import load_adapted_model

    torch.manual_seed(0)
    peft_model = get_peft_model(load_fp32(models["qwen2"]), PeftLoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                                                        target_modules=["q_proj", "lm_head"]))
    peft_model.save_pretrained(tmp_path / "a")
    from safetensors.torch import load_file

    assert "base_model.model.lm_head.base_layer.weight" in load_file(tmp_path / "a" / "adapter_model.safetensors")
    expected = _logits(PeftModel.from_pretrained(load_fp32(models["qwen2"]), tmp_path / "a").eval())
    assert _diff(expected, _logits(load_fp32(models["qwen2"]))) > 1e-3
    assert _diff(_logits(load_adapted_model(None, str(tmp_path / "a"))[0].eval()), expected) <= TOL



def test_a_tied_head_in_modules_to_save_trains_a_copy_as_peft_s(models, tmp_path):
    """peft trains a copy of a module in modules_to_save; on tied embeddings (Qwen2's, SmolLM2's) peftkit refused
    the recipe, and refused to load or merge peft's adapters that have one. The head's copy trains and the
    embeddings keep the base's values; peft loads ours with our logits, we load theirs with theirs, and the merge
    (untied) gives them."""
    from peft import LoraConfig as PeftLoraConfig
    from safetensors.torch import load_file

    base = models["qwen2"]
    cfg = LoraConfig(r=2, alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    model, targets = _adapted(base, cfg)
    assert model.lm_head.weight.requires_grad and not model.model.embed_tokens.weight.requires_grad
    with torch.no_grad():
        model.lm_head.weight.add_(0.1)  # as training moves it
    assert torch.equal(model.model.embed_tokens.weight, load_fp32(base).model.embed_tokens.weight)
    save_adapter(tmp_path / "ours", adapter_state_dict(model, cfg.modules_to_save),
                 peft_config(cfg, targets, str(base), False, "qwen2"))
    ours = _logits(model)
    assert _diff(ours, _logits(load_fp32(base))) > 1e-2
    assert _diff(_logits(PeftModel.from_pretrained(load_fp32(base), tmp_path / "ours").eval()), ours) <= TOL
    merge_adapter(str(tmp_path / "ours"), str(tmp_path / "merged"))
    merged = load_fp32(tmp_path / "merged")
    assert not merged.config.tie_word_embeddings and _diff(_logits(merged), ours) <= TOL

    torch.manual_seed(0)
    theirs = get_peft_model(load_fp32(base), PeftLoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                                        target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "modules_to_save" in name:
                param.add_(0.1)
    theirs.save_pretrained(tmp_path / "theirs")
    assert any(k.endswith("lm_head.weight") for k in load_file(tmp_path / "theirs" / "adapter_model.safetensors"))
    expected = _logits(PeftModel.from_pretrained(load_fp32(base), tmp_path / "theirs").eval())
    loaded = load_adapted_model(None, str(tmp_path / "theirs"))[0].eval()
    assert _diff(_logits(loaded), expected) <= TOL
    assert torch.equal(loaded.model.embed_tokens.weight, load_fp32(base).model.embed_tokens.weight)

    # FSDP2's fsdp_cpu_ram_efficient_loading calls tie_weights() in accelerate's prepare: the copy would train
    # nothing, so training stops there.
    from peftkit.adapters import check_copies

    check_copies(model, cfg)
    model.tie_weights()
    with pytest.raises(PeftkitError, match="'lm_head' shares its weight with another module again after accelerate"):
        check_copies(model, cfg)

# --------------------------------------------------------------------------- 4. state-dict round trip


@pytest.mark.parametrize("case", BY_CASE)
def test_state_dict_round_trip(case, models, tmp_path):
    arch = case.archs[0]
    model, targets = _adapted(models[arch], case.cfg)
    saved = _save(model, case.cfg, targets, models[arch], tmp_path / "adapter")
    loaded, cfg, _, _, _ = load_adapted_model(None, str(saved))
    # The settings read back write the same adapter_config.json again.
    written = json.loads((saved / "adapter_config.json").read_text())
    fan_in_fan_out = written.get("fan_in_fan_out", False)  # LOHA/LOKR have no such field (no Conv1D)
    assert peft_config(cfg, targets, str(models[arch]), fan_in_fan_out, loaded.config.model_type,
                       model_config=loaded.config) == written
    theirs, ours = adapter_state_dict(loaded, []), adapter_state_dict(model, [])
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    assert _diff(_logits(loaded), _logits(model)) <= 1e-6


# ------------------------------------------------------------------------------------ 5. PEFT interop


@pytest.mark.parametrize(("case", "arch"), BY_ARCH)
def test_peft_loads_our_adapter(case, arch, models, tmp_path):
    _skip_without_peft(case)
    model, targets = _adapted(models[arch], case.cfg)
    saved = _save(model, case.cfg, targets, models[arch], tmp_path / "adapter")
    reference = PeftModel.from_pretrained(load_fp32(models[arch]), saved).eval()
    theirs = _logits(reference)
    if virtual_tokens(model) is not None:  # peft's logits include the virtual tokens' own: the last ones are ours
        theirs = theirs[:, -IDS.shape[1]:]
    assert _diff(theirs, _logits(model)) <= TOL
    if method_of(case.cfg).merge_refusal() is None:
        assert _diff(_logits(merged_model(model, case.cfg, torch.float32).eval()), theirs) <= TOL


@pytest.mark.parametrize(("case", "arch"), BY_ARCH)
def test_we_read_peft_adapter(case, arch, models, tmp_path):
    """An adapter peft made, with non-trivial weights: peftkit evaluates it and merges it with peft's numbers."""
    _skip_without_peft(case)
    method = method_of(case.cfg)
    probe = load_fp32(models[arch])
    targets = inject_adapters(probe, case.cfg)
    config = method.to_peft(case.cfg, targets, str(models[arch]), fan_in_fan_out=bool(conv1d_modules(probe)))
    config = {k: v for k, v in config.items() if k != "peft_type"} | PEFT_NONTRIVIAL[method.peft_type]
    torch.manual_seed(3)
    reference = get_peft_model(load_fp32(models[arch]), PeftConfig.from_peft_type(peft_type=method.peft_type, **config))
    with torch.no_grad():  # peft starts DoRA's magnitude at ||W + s B A||_c (a gain of 1): move it off that
        for name, p in reference.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape))
            if "adaption_gate" in name:  # peft's Llama-Adapter gate starts at 0 (the base model)
                p.copy_(0.5 + torch.rand(p.shape))
            if "ln_tuning_layers" in name:  # peft's copies of the norms start as the base's
                p.add_(0.3 * torch.randn(p.shape))
            if "miss_block" in name:  # peft's MiSS starts at zeros (bat and mini too)
                p.add_(0.1 * torch.randn(p.shape))
    reference.save_pretrained(tmp_path / "peft")
    theirs = _logits(reference.eval())[:, -IDS.shape[1]:]  # the prompt family's: after the virtual tokens'
    assert _diff(theirs, _logits(load_fp32(models[arch]))) > 1e-3  # peft's weights really change the output

    ours, *_ = load_adapted_model(str(models[arch]), str(tmp_path / "peft"))
    assert _diff(_logits(ours), theirs) <= TOL
    if method.merge_refusal() is not None:
        with pytest.raises(PeftkitError, match="cannot be merged"):
            merge_adapter(str(tmp_path / "peft"), str(tmp_path / "merged"), base=str(models[arch]))
        assert not (tmp_path / "merged").exists()
        return
    merged = merge_adapter(str(tmp_path / "peft"), str(tmp_path / "merged"), base=str(models[arch]))
    assert _diff(_logits(load_fp32(merged)), theirs) <= TOL


# -------------------------------------------------------------------------------------- 6. bf16 base


@pytest.mark.parametrize("case", BY_CASE)
def test_bf16_base_with_fp32_adapter(case, models):
    if not case.support_from_fp32:
        pytest.skip(f"{case.id}: a bf16 base's adapter sits elsewhere than the fp32 one's (its own test: peft's bf16)")
    path = models[case.archs[0]]
    model, _ = _adapted(path, case.cfg, torch.bfloat16)
    reference, _ = _adapted(path, case.cfg, torch.float32)
    assert all(p.dtype == torch.float32 for p in _adapter_tensors(model))
    model.train()
    logits = model(IDS).logits
    assert logits.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: logits of order 1 agree to a few hundredths.
    assert _diff(_logits(model.eval()) if case.samples_in_training else logits, _logits(reference)) <= 5e-2
    logits.float().square().mean().backward()
    grads = [p.grad for p in _adapter_tensors(model) if p.requires_grad]  # LoRA-FA's A is frozen
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for n, p in model.named_parameters() if ".base_layer." in n)
    if method_of(case.cfg).merge_refusal() is not None:
        return
    # The merge adds in fp32 and casts once: exactly the dense weight of the bf16 base, rounded to bf16.
    merged = merged_model(model, case.cfg, torch.bfloat16).state_dict()
    for name, layer in adapter_layers(model).items():
        layout = _layout(layer)
        dense = DENSE[method_of(case.cfg).name](layer.base_layer.weight.float(), None, _parts(layer), case.cfg, layout)[0]
        assert _rounded_once(merged[f"{name}.weight"], dense), name


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for _, c in ALL
                                  if c.id in ("dora", "vera", "loha", "lokr", "adalora", "randlora", "vblora",
                                              "miss", "miss-bat", "delora", "road", "hira",
                                              "gralora", "deft",
                                              "pvera", "tinylora",
                                              "psoft", "unilora", "lily",
                                              "frod",
                                              "waveft", "waveft-db4-pattern", "poly", "adamss",
                                              "shadow")])
def test_bf16_base_gives_peft_s_bf16_logits(case, models, tmp_path):
    """peft adds these methods' fp32 update to a bf16 base output in fp32 and rounds the sum once; LoHa, LoKr and
    AdaLoRA rounded the update to bf16 first (and DoRA and VeRA did): logits up to 0.18 from peft's, a step's gradients
    up to 33 %. Now the same bf16 logits, for peft's own loading of our adapter (4-bit bases: tests/test_qlora.py).
    MiSS's bat computes the whole layer in fp32 from the bf16 weight, as peft's; DeLoRA's peft rounds its update to
    bf16 before the sum (its in-place add into a bf16 zeros_like), and so does peftkit's."""
    model, targets = _adapted(models["llama"], case.cfg, torch.bfloat16)
    saved = _save(model, case.cfg, targets, models["llama"], tmp_path / "adapter")
    reference = PeftModel.from_pretrained(load_fp32(models["llama"], torch.bfloat16), saved).eval()
    with torch.no_grad():
        ours, theirs = model(IDS).logits, reference(IDS, **_peft_tasks(reference)).logits
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, theirs)


def _adapter_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The adapter's own tensors: its layers', or the prompt family's table and encoder."""
    if (virtual := virtual_tokens(model)) is not None:
        return list(virtual.parameters())
    return [p for layer in adapter_layers(model).values() for p in layer.adapter_params().values()
            if p.is_floating_point()] + [  # (not SHiRA's saved indices)
        p for holder in shared_holders(model) for p in holder.parameters()]  # (Uni-LoRA's theta_d, VB-LoRA's bank)


def _rounded_once(merged: torch.Tensor, dense: torch.Tensor) -> bool:
    """`merged` (bf16) is the fp32 `dense` rounded to bf16, except that where `dense` lies next to a tie (within
    1e-5 relative, or 1e-6 of the largest entry: a dense computation summing in another order than the method's; a
    rotation such as HRA's mixes every input into each entry, so its fp32 rounding is of the matrix's scale, not the
    entry's) either neighbour is right. Rounding twice (through bf16) is off by far more: a bf16 step, 2^-8."""
    expected = dense.to(torch.bfloat16)
    off = merged != expected
    tie = (expected[off].float() + merged[off].float()) / 2
    return bool(((dense[off] - tie).abs() <= 1e-5 * dense[off].abs() + 1e-6 * dense.abs().max()).all())


def _parts(layer) -> dict[str, torch.Tensor]:
    return {n: p.detach().float() for n, p in layer.parts().items()}


def _layout(layer) -> str:
    base = layer.base_layer
    kind = "embedding" if isinstance(base, nn.Embedding) else "conv1d" if isinstance(base, Conv1D) else "linear"
    return kind + ("-ff" if getattr(layer, "is_feedforward", False) else "")


# -------------------------------------------------------------------------------------- 7. NF4 base


@pytest.mark.parametrize("case", BY_CASE)
def test_nf4_base_trains_and_merges_exactly(case, models):
    quant = QuantizationConfig(method="nf4", double_quant=True, compute_dtype="float32")
    arch = "llama" if "llama" in case.archs or not case.archs else case.archs[0]  # (lora-bias: a biased model)
    model = load_model(ModelConfig(name_or_path=str(models[arch]), dtype="float32"), quant, torch.device("cpu"))
    torch.manual_seed(0)
    if not case.quantized:
        with pytest.raises(PeftkitError, match="is a 4-bit/8-bit .bitsandbytes. layer"):
            inject_adapters(model, case.cfg)
        return
    inject_adapters(model, case.cfg)
    random_adapters(model, seed=1, std=0.1)
    packed = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(p, packed[n]) for n, p in model.named_parameters() if n in packed)  # the base is frozen
    assert any(not torch.equal(p, trained[n]) for n, p in model.named_parameters() if n in trained)
    if method_of(case.cfg).merge_refusal() is not None:
        return

    # Exact merge: the delta lands on dequant(quant(W)), the weights the adapter was trained against.
    merged_net = merged_model(model, case.cfg, torch.float32)
    merged = merged_net.state_dict()
    for name, layer in adapter_layers(model).items():
        weight = layer.base_layer.weight
        base = bnbF.dequantize_4bit(weight.data, weight.quant_state).float() if hasattr(weight, "quant_state") else weight.float()
        dense = DENSE[method_of(case.cfg).name](base, None, _parts(layer), case.cfg, _layout(layer))[0]
        assert _diff(merged[f"{name}.weight"], dense) <= 1e-6, name
    with torch.no_grad():  # train mode: bitsandbytes' dequantize-then-fp32-matmul path (dropout is 0)
        qlogits = model.eval()(IDS).logits if case.samples_in_training else model(IDS).logits
    assert _diff(_logits(merged_net.eval()), qlogits) <= TOL


# ------------------------------------------------------------------------------ 8. trained from a recipe


@pytest.mark.parametrize("name", sorted(CASES))
def test_trains_from_a_recipe_and_exports(name, models, number_data, tmp_path):
    """`peftkit train` with the method's first case: the loss falls, adapter/ loads in peft with the logits of
    merged/ (the export path: parameter count, memory estimate, PEFT config, merge); for a method that cannot be
    merged, with the logits of the adapter loaded by peftkit."""
    import yaml

    from peftkit.recipe import load_recipe
    from peftkit.train import train
    from tests.conftest import make_recipe

    case = CASES[name][0]
    arch = "llama" if "llama" in case.archs or not case.archs else case.archs[0]  # (BEFT: a biased model)
    adapter = case.cfg.model_dump(mode="json", exclude_none=True)
    mergeable = METHODS[name].merge_refusal() is None
    recipe = make_recipe(tmp_path, models[arch], number_data, adapter=adapter,
                         training={"max_steps": 4, "lr": 5e-2}, export={"merged": mergeable})
    data = yaml.safe_load(recipe.read_text())
    recipe.write_text(yaml.safe_dump(data | {"adapter": adapter}, sort_keys=False))  # only the method's own keys
    summary = train(load_recipe(recipe), show_summary=False)
    assert summary["eval_loss"] < summary["base_eval_loss"]
    run = tmp_path / "run"
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["peft_type"] == METHODS[name].peft_type
    ours = load_fp32(run / "merged") if mergeable else load_adapted_model(None, str(run / "adapter"))[0]
    if name in NO_PEFT:
        assert _diff(_logits(ours), _logits(load_fp32(models[arch]))) > 1e-4
        return
    reference = PeftModel.from_pretrained(load_fp32(models[arch]), run / "adapter").eval()
    assert _diff(_logits(ours), _logits(reference)[:, -IDS.shape[1]:]) <= TOL


# ------------------------------------------------------------------------------ 9. no host sync in a step

# Ops that read a tensor's values on the host (a value, or a size that depends on values): on a GPU each stops the
# host until the stream has run that far, so the next kernels are queued late.
HOST_READS = ("aten._local_scalar_dense", "aten.nonzero.", "aten.masked_select", "aten.is_nonzero", "aten.equal",
              "aten.unique", "aten._unique")


class _HostReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(HOST_READS):
            self.seen[str(func)] = self.seen.get(str(func), 0) + 1
        return func(*args, **(kwargs or {}))


def _step_host_reads(model: nn.Module, batch: dict, peftkit_loss: bool = True) -> dict[str, int]:
    """The host reads of one training micro-batch as `peftkit train` runs it: forward with dropout on, the loss
    given its labelled count from the CPU, backward; without `peftkit_loss`, the model's own reads alone (the
    logits' sum as the loss)."""
    model.train()
    labelled = labelled_count(batch["labels"])  # on the CPU, before the batch moves to the model's device
    batch = on_device(batch, next(model.parameters()).device)  # (with its first position for the head, counted so)
    with _HostReads() as reads:
        if peftkit_loss:
            loss, _ = token_loss_sum(model, batch, labelled)
        else:
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.sum()
        loss.backward()
    return reads.seen


@pytest.mark.parametrize("case", BY_CASE)
def test_a_training_step_reads_nothing_on_the_host_beyond_the_base_model(case, models):
    """An adapted model's micro-batch makes the host reads of the frozen base's (transformers' padding-mask check)
    and no more: no adapter layer, and not the loss, reads a GPU tensor's values in a step. The loss picked its
    labelled rows by a mask until it was given their count, and multitask prompt tuning range-checked its task ids
    on the device: each a sync per micro-batch."""
    path = models[case.archs[0]]
    ids = torch.tensor([[1, 5, 9, 4, 7, 3, 8, 2], [6, 2, 8, 1, 4, 0, 0, 0]])
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX
    labels[1, 5:] = IGNORE_INDEX
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])  # the second row padded
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    device = "cuda" if torch.cuda.is_available() else "cpu"  # scripts/gpu_check.sh runs it on a GPU
    base = _step_host_reads(load_fp32(path).to(device), batch, peftkit_loss=False)
    model = load_fp32(path)
    torch.manual_seed(0)
    inject_adapters(model, case.cfg)
    method = method_of(case.cfg)
    tasks = {"task_ids": torch.tensor([getattr(case.cfg, method.tasks_key) - 1, 0])} if method.reads_task_ids else {}
    reads = _step_host_reads(model.to(device), batch | tasks)
    assert all(reads.get(op, 0) <= n for op, n in base.items()) and set(reads) <= set(base), (reads, base)



@pytest.mark.parametrize("case", BY_CASE)
def test_the_trimmed_head_trains_as_the_full_one(case, models, monkeypatch):
    """A training micro-batch whose rows have prompts of 3, 6 and 5 tokens and two of them padding: the output head
    computes logits from position 2 on (`peftkit.loss.trimmed_head`), and the loss and every gradient are bit for bit
    those of the head over all 10 positions, the adapter far from its init (measured: all equal on the CPU). The
    prompt family's virtual tokens keep every position (their logits are cut after the forward)."""
    ids = torch.tensor([[1, 5, 9, 4, 7, 3, 8, 2, 6, 4], [6, 2, 8, 1, 4, 9, 5, 7, 0, 0], [3, 7, 2, 5, 8, 6, 4, 0, 0, 0]])
    mask = (torch.arange(10) < torch.tensor([[10], [8], [7]])).long()
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    for row, prompt in enumerate((3, 6, 5)):
        labels[row, :prompt] = IGNORE_INDEX
    method = method_of(case.cfg)
    tasks = ({"task_ids": torch.tensor([getattr(case.cfg, method.tasks_key) - 1, 0, 0])} if method.reads_task_ids
             else {})

    def build() -> nn.Module:
        model, _ = _adapted(models[case.archs[0]], case.cfg)
        return model

    trimmed, full = trimming_changes_nothing(build, {"input_ids": ids, "attention_mask": mask, "labels": labels}
                                             | tasks, monkeypatch)
    assert trimmed == (full if not method.layer_targets else [10 - 2]), (trimmed, full)


# ------------------------------------------------------------------------------- method-specific: DoRA


def test_dora_dropout_in_training_follows_peft():
    """With dropout, in train mode, DoRA's terms see x_d = dropout(x) and the base output keeps x (as peft):
    W x + b + (g - 1) W x_d + g s B A x_d, g = m / ||W + s B A||_c; in eval mode, the dense W' x + b."""
    cfg = LoraConfig(r=4, alpha=8, dropout=0.5, use_dora=True)
    base = _base_layer("linear")
    weight, bias = base.weight.detach().clone(), base.bias.detach().clone()
    layer = method_of(cfg).wrap(base, cfg, "layer")
    method_of(cfg).randomize(layer, torch.Generator().manual_seed(2), 0.3)
    parts = {n: p.detach().clone() for n, p in layer.adapter_params().items()}
    x = torch.randn(3, 5, 12)
    torch.manual_seed(7)
    out = layer.train()(x)
    torch.manual_seed(7)
    x_d = nn.functional.dropout(x, 0.5, training=True)
    delta = 2.0 * parts["lora_B.weight"] @ parts["lora_A.weight"]
    gain = parts["lora_magnitude_vector"] / (weight + delta).norm(dim=1)
    expected = x @ weight.T + bias + (gain - 1) * (x_d @ weight.T) + gain * (x_d @ delta.T)
    assert _diff(out, expected) <= 1e-5
    assert _diff(layer.eval()(x), x @ lora_dense(weight, bias, parts, cfg, "linear")[0].T + bias) <= 1e-5


@pytest.mark.parametrize("layout", ["linear", "conv1d", "nf4"])
def test_dora_norm_is_taken_a_block_of_rows_at_a_time(layout, monkeypatch):
    """DoraLinear's ||W + s B A||_c, over blocks of output rows (2 here, of 7; 64 MiB of fp32 in use), equals the
    dense norm of the fp32 (dequantized, for NF4) weight plus the update: what each step allocates for it is a
    block's, not three (out, in) fp32 matrices."""
    import bitsandbytes as bnb

    import peftkit.methods.lora_layers as lora_module
    from peftkit.merge_weights import dequantize_weight

    cfg = LoraConfig(r=4, alpha=8, use_dora=True)
    if layout == "nf4":
        torch.manual_seed(0)
        base = bnb.nn.Linear4bit(64, 7, compute_dtype=torch.float32, quant_type="nf4")
        base.load_state_dict(nn.Linear(64, 7).state_dict())
        base = base.to("cpu")
        weight = dequantize_weight(base)
    else:
        base = _base_layer(layout)
        weight = base.weight.detach().clone()
        weight = weight.T if layout == "conv1d" else weight  # (out, in)
    layer = method_of(cfg).wrap(base, cfg, "layer")
    method_of(cfg).randomize(layer, torch.Generator().manual_seed(2), 0.3)
    a, b = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    dense = (weight.float() + 2.0 * b @ a).norm(dim=1)
    assert torch.equal(layer.weight_norm(), dense)  # one block: the whole matrix, as before
    monkeypatch.setattr(lora_module, "NORM_ELEMENTS", 2 * weight.shape[1] + 1)
    with _LargestOutput() as largest:
        norm = layer.weight_norm()
    assert _diff(norm, dense) <= 1e-6 and _diff(dense, weight.float().norm(dim=1)) > 1e-2
    # no (out, in) tensor is made, but for NF4's dequantized weight (bitsandbytes dequantizes whole tensors)
    assert largest.numel == (weight.numel() if layout == "nf4" else 2 * weight.shape[1])


class _LargestOutput(TorchDispatchMode):
    """The element count of the largest tensor the ops under it allocate (views of their inputs are not)."""

    numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_dora_on_an_embedding_loads_merges_and_exports_as_peft_s(arch, models, tmp_path, monkeypatch):
    """peft 0.21's DoRA on an embedding (refused before): the norm of W + s (B A)^T is taken over the vocabulary for
    each embedding dimension. peft's adapter, far from identity, loads with peft's logits and merges to them, in
    place (and back) and by `peftkit merge`; peftkit's loads in peft with peftkit's logits. Gemma 2 ties its head to
    the embeddings, which keep the head's weights apart in a merge (as for LoRA; peft's own merge moves the head).
    The norm is summed over blocks of rows (7 here, of 102), as peft's over the whole vocabulary at once."""
    import peftkit.methods.lora_layers as lora_module

    monkeypatch.setattr(lora_module, "NORM_ROWS", 7)
    from peft import LoraConfig as PeftLoraConfig

    from peftkit.adapters.state_dicts import load_adapter_state_dict
    from peftkit.peft_format import load_adapter
    from tests.conftest import save_random_adapter

    torch.manual_seed(0)
    settings = {"use_dora": True, "target_modules": ["embed_tokens", "o_proj"]}
    made = get_peft_model(load_fp32(models[arch]), PeftLoraConfig(r=2, lora_alpha=4, init_lora_weights=False, **settings))
    with torch.no_grad():
        for name, p in made.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.randn(p.shape))
    made.save_pretrained(tmp_path / "peft")
    theirs = _logits(PeftModel.from_pretrained(load_fp32(models[arch]), tmp_path / "peft").eval())
    model = load_adapted_model(str(models[arch]), str(tmp_path / "peft"), torch.device("cpu"))[0]
    assert _diff(_logits(model), _logits(load_fp32(models[arch]))) > 1e-2
    assert _diff(_logits(model), theirs) <= TOL
    merge_adapter(str(tmp_path / "peft"), str(tmp_path / "merged"), base=str(models[arch]))
    assert _diff(_logits(load_fp32(tmp_path / "merged")), theirs) <= TOL
    if arch == "llama":  # (an in-place merge of a tied embedding would move the head too)
        for layer in adapter_layers(model).values():
            layer.merge()
        assert _diff(_logits(model), theirs) <= TOL
        for layer in adapter_layers(model).values():
            layer.unmerge()
        assert _diff(_logits(model), theirs) <= TOL

    # Training: the same gradients (the norm detached, as peft's).
    trained = PeftModel.from_pretrained(load_fp32(models[arch]), tmp_path / "peft", is_trainable=True)
    trained(IDS).logits.square().mean().backward()
    model = load_fp32(models[arch])
    inject_adapters(model, LoraConfig(r=2, alpha=4, **settings))
    load_adapter_state_dict(model, load_adapter(tmp_path / "peft")[1])
    model(IDS).logits.square().mean().backward()
    embedding = model.get_submodule("model.embed_tokens")
    for name in ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"):
        theirs_grad = trained.get_parameter(f"base_model.model.model.embed_tokens.{name}.default" + ".weight" * (
            name == "lora_magnitude_vector")).grad
        assert _diff(getattr(embedding, name).grad, theirs_grad) <= 1e-6

    cfg = LoraConfig(r=2, alpha=4, **settings)
    adapter = save_random_adapter(models[arch], cfg, tmp_path / "ours", seed=3)
    ours = _logits(load_adapted_model(str(models[arch]), str(adapter), torch.device("cpu"))[0])
    assert _diff(ours, _logits(load_fp32(models[arch]))) > 1e-2
    assert _diff(ours, _logits(PeftModel.from_pretrained(load_fp32(models[arch]), adapter).eval())) <= TOL


# -------------------------------------------------------------------------------- method-specific: IA3


def test_ia3_default_targets_of_mixtral_adapt_what_this_transformers_has_as_peft_s_do():
    """peft's Mixtral default names the experts' `w2`, which transformers 5 keeps as fused parameters, not layers:
    peftkit refused the recipe, blaming a target_modules entry the user never wrote. peft adapts k/v alone."""
    from peft import IA3Config as PeftIA3
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    model = MixtralForCausalLM(config)
    reference = {n.removeprefix("base_model.model.") for n, m in
                 get_peft_model(MixtralForCausalLM(config), PeftIA3(task_type="CAUSAL_LM")).named_modules()
                 if hasattr(m, "ia3_l")}
    assert inject_adapters(model, IA3Config(method="ia3")) == sorted(reference, key=[n for n, _ in
                                                                               model.named_modules()].index)
    assert {n.rsplit(".", 1)[-1] for n in reference} == {"k_proj", "v_proj"}
    with pytest.raises(PeftkitError, match="entry 'w2'"):  # written in the recipe, an entry must match
        inject_adapters(MixtralForCausalLM(config), IA3Config(method="ia3", target_modules=["k_proj", "w2"],
                                                              feedforward_modules=["w2"]))


@pytest.mark.parametrize("module", ["block_sparse_moe.experts.0.w1", "block_sparse_moe.gate"])
def test_a_mixtral_adapter_of_transformers_4_s_layout_is_refused_saying_so(module):
    """Mixtral LoRAs trained under transformers 4 adapt `block_sparse_moe.gate` and `block_sparse_moe.experts.N.w1`,
    which transformers 5 renamed and fused into 3-D parameters: loading converts them (tests/test_expert_lists.py);
    unconverted, they are refused naming that (it blamed a recipe entry, or "another base model")."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    state = {f"base_model.model.model.layers.0.{m}.lora_{p}.weight": torch.zeros(2, 2)
             for m in ("self_attn.q_proj", module) for p in "AB"}
    cfg = LoraConfig(r=2, target_modules=["q_proj", module.rsplit(".", 1)[-1]])
    with pytest.raises(PeftkitError, match=rf"adapts 1 module of transformers 4's mixture-of-experts layout \(e.g. "
                                           rf"'model.layers.0.{module}'\), which this model does not have"):
        inject_adapters(MixtralForCausalLM(config), cfg, every_entry=False, state=state)


def test_ia3_feedforward_entry_must_name_a_target(models):
    """A feedforward_modules entry that names no target would be dropped, and the module meant would have its output
    scaled, not its input: refused (peft: "should be a subset of target_modules"), also beside the default targets.
    The architecture's default feedforward_modules beside other targets is no error (peft fills it in too)."""
    from peftkit.section import TargetRegex

    for given in ({"feedforward_modules": ["up_proj"]},  # the default targets: k_proj, v_proj, down_proj
                  {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_prj"]},
                  {"target_modules": ["k_proj", "down_proj"], "feedforward_modules": TargetRegex(regex=r".*\.up_proj")}):
        with pytest.raises(PeftkitError, match="feedforward_modules entry .* names none of the modules IA3 adapts"):
            inject_adapters(load_fp32(models["llama"]), IA3Config(method="ia3", **given))
    model = load_fp32(models["llama"])
    inject_adapters(model, IA3Config(method="ia3", target_modules=["q_proj", "v_proj"]))  # default: down_proj
    assert not any(layer.is_feedforward for layer in adapter_layers(model).values())


@pytest.mark.parametrize("family", ["gemma3_text", "bloom"])
def test_default_targets_are_peft_s_for_more_families(family):
    """IA3 and AdaLoRA without target_modules adapt what peft's defaults adapt (these two were refused)."""
    from peft import AdaLoraConfig as PeftAdaLora
    from peft import IA3Config as PeftIA3
    from transformers import BloomConfig, BloomForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    from peftkit.methods.adalora import AdaLoraConfig

    def model():
        torch.manual_seed(0)
        if family == "bloom":
            return BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4))
        return Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8))

    for ours, theirs, marker in ((IA3Config(method="ia3"), PeftIA3(task_type="CAUSAL_LM"), "ia3_l"),
                                 (AdaLoraConfig(method="adalora", init_r=4, target_r=2),
                                  PeftAdaLora(task_type="CAUSAL_LM", init_r=4, target_r=2, total_step=10), "lora_E")):
        reference = [n.removeprefix("base_model.model.") for n, m in get_peft_model(model(), theirs).named_modules()
                     if hasattr(m, marker)]
        assert inject_adapters(model(), ours) == reference and reference


def test_ia3_regex_modules_from_peft(models, tmp_path):
    """peft's IA3 takes regular expressions (matched in full) for target_modules and feedforward_modules too."""
    from peft import IA3Config as PeftIA3

    config = PeftIA3(task_type="CAUSAL_LM", target_modules=r".*\.(k_proj|v_proj|down_proj|up_proj)",
                     feedforward_modules=r".*\.(down_proj|up_proj)", init_ia3_weights=False)
    torch.manual_seed(3)
    reference = get_peft_model(load_fp32(models["llama"]), config).eval()
    reference.save_pretrained(tmp_path / "peft")
    ours, cfg, *_ = load_adapted_model(str(models["llama"]), str(tmp_path / "peft"))
    assert cfg.feedforward_modules.regex == r".*\.(down_proj|up_proj)"
    assert sum(layer.is_feedforward for layer in adapter_layers(ours).values()) == 4  # up, down x 2 layers
    assert _diff(_logits(ours), _logits(reference)) <= TOL


def test_ia3_unmerge_refuses_a_zero_scaling():
    from peftkit.errors import PeftkitError

    cfg = IA3Config(method="ia3", target_modules=["layer"], feedforward_modules=[])
    layer = method_of(cfg).wrap(_base_layer("linear"), cfg, "layer")
    with torch.no_grad():
        layer.ia3_l[3] = 0.0
    layer.merge()
    merged = layer.base_layer.weight.detach().clone()
    with pytest.raises(PeftkitError, match="Cannot unmerge an IA3 layer with a scaling of exactly 0"):
        layer.unmerge()
    assert torch.equal(layer.base_layer.weight, merged) and layer.merged  # nothing half-done


# ------------------------------------------------------------------------------ method-specific: LyCORIS


@pytest.mark.parametrize("cfg", [LohaConfig(method="loha"), LokrConfig(method="lokr")], ids=["loha", "lokr"])
def test_lycoris_refuses_conv1d(cfg, models):
    """peft's LoHa and LoKr adapt nn.Linear only: GPT-2's Conv1D is refused by name, with the fix."""
    from peftkit.errors import PeftkitError

    with pytest.raises(PeftkitError, match=r"adapter.target_modules: 'transformer.h.0.attn.c_attn' is a GPT-2 style "
                                           r"Conv1D layer; Lo(Ha|Kr) adapts nn.Linear layers only.*use adapter.method: lora"):
        inject_adapters(load_fp32(models["gpt2"]), cfg)


def test_lokr_layouts_follow_peft(models):
    """Which of w1 / w2 peftkit factors into rank r, per layer, is peft's choice (names and shapes equal)."""
    cfg = CASES["lokr"][1].cfg
    ours = load_fp32(models["llama"])
    config = method_of(cfg).to_peft(cfg, inject_adapters(ours, cfg), str(models["llama"]), False)
    theirs = get_peft_model(load_fp32(models["llama"]), PeftConfig.from_peft_type(**config))
    shapes = {k: tuple(v.shape) for k, v in adapter_state_dict(ours, []).items()}
    from peft import get_peft_model_state_dict

    assert shapes == {k: tuple(v.shape) for k, v in get_peft_model_state_dict(theirs).items()}
    assert {k.rsplit(".", 1)[-1] for k in shapes} == {"lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"}


def test_lokr_factorization_is_peft_s():
    from peft.tuners.lokr.layer import factorization as peft_factorization

    from peftkit.methods.lokr import factorization

    for factor in (-1, 1, 2, 3, 4, 8, 64):
        assert all(factorization(n, factor) == peft_factorization(n, factor) for n in range(1, 300)), factor
    assert factorization(4096) == (64, 64) and factorization(11008) == (86, 128)


def test_lycoris_dropouts_in_training():
    """module_dropout skips a layer's update; rank_dropout zeroes output rows of the update, the kept rows
    rescaled for LoHa (always) and LoKr (rank_dropout_scale). Both only in training."""
    base = _base_layer("linear")
    x = torch.randn(3, 5, 12)
    for cfg, rescale in ((LohaConfig(method="loha", r=2, rank_dropout=0.5), True),
                         (LokrConfig(method="lokr", r=2, rank_dropout=0.5), False),
                         (LokrConfig(method="lokr", r=2, rank_dropout=0.5, rank_dropout_scale=True), True)):
        layer = method_of(cfg).wrap(base, cfg, "layer")
        method_of(cfg).randomize(layer, torch.Generator().manual_seed(2), 0.3)
        parts = {n: p.detach().clone() for n, p in layer.adapter_params().items()}
        delta = DENSE[cfg.method](torch.zeros(7, 12), None, parts, cfg, "linear")[0]
        torch.manual_seed(5)
        out = layer.train()(x)
        torch.manual_seed(5)
        keep = (torch.rand(7) > 0.5).float()
        keep = keep / keep.mean() if rescale else keep
        assert 0 < keep.count_nonzero() < 7
        assert _diff(out, base(x) + x @ (delta * keep[:, None]).T) <= 1e-5
        assert _diff(layer.eval()(x), base(x) + x @ delta.T) <= 1e-5
    layer = method_of(cfg).wrap(base, cfg.model_copy(update={"module_dropout": 0.999, "rank_dropout": 0.0}), "layer")
    method_of(cfg).randomize(layer, torch.Generator().manual_seed(2), 0.3)
    assert _diff(layer.train()(x), base(x)) == 0 and _diff(layer.eval()(x), base(x)) > 1e-2


def test_loha_update_is_one_node_that_keeps_only_its_factors():
    """LoHa's delta is one autograd node: its value and its factors' gradients equal the separate products' bit for bit,
    and autograd keeps only the four factors for it (the separate ops keep both (out, in) products as well)."""
    from peftkit.methods.loha import Loha
    from peftkit.methods.lycoris import LycorisFacts

    gen = torch.Generator().manual_seed(0)
    parts = {name: torch.randn(shape, generator=gen, requires_grad=True)
             for name, shape in (("hada_w1_a", (48, 4)), ("hada_w1_b", (4, 40)), ("hada_w2_a", (48, 4)),
                                 ("hada_w2_b", (4, 40)))}
    grad = torch.randn(48, 40, generator=gen)
    ref = (parts["hada_w1_a"] @ parts["hada_w1_b"]) * (parts["hada_w2_a"] @ parts["hada_w2_b"]) * 2.5
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        delta = Loha.delta(parts, LycorisFacts(r=4, alpha=10.0))
    assert torch.equal(delta, ref)
    expected = torch.autograd.grad(ref, list(parts.values()), grad)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(delta, list(parts.values()), grad), expected))
    assert sorted(saved) == [4 * 40] * 2 + [48 * 4] * 2


def test_lokr_recipe_with_a_lora_key_names_the_method(tmp_path):
    from peftkit.errors import PeftkitError
    from peftkit.recipe import load_recipe

    (tmp_path / "r.yaml").write_text("model: {name_or_path: m}\ndata: {train: t.jsonl}\nexport: {output_dir: o}\n"
                                     "adapter: {method: lokr, r: 4, dropout: 0.1}\n")
    with pytest.raises(PeftkitError) as e:
        load_recipe(tmp_path / "r.yaml")
    assert "'dropout'" in str(e.value) and "LoKr (method: lokr)" in str(e.value) and "rank_dropout" in str(e.value)


# ------------------------------------------------------------------------------- method-specific: VeRA


def test_vera_shares_peft_projections_and_trains_only_vectors(models):
    """One frozen pair for all layers, sized for the largest target (down_proj's 64 inputs, gate/up's 64 outputs),
    drawn as peft draws it; trainable: r + out per layer, the pair counted as frozen adapter memory."""
    from peft import VeraConfig as PeftVera

    from peftkit.adapters import count_parameters, shared_holders

    cfg = VeraConfig(method="vera", r=4, projection_prng_key=5)
    model = load_fp32(models["llama"])
    inject_adapters(model, cfg)
    (holder,) = shared_holders(model)
    reference = get_peft_model(load_fp32(models["llama"]), PeftVera(r=4, target_modules="all-linear", projection_prng_key=5))
    assert holder.vera_A.shape == (4, 64) and holder.vera_B.shape == (64, 4)
    assert torch.equal(holder.vera_A, reference.base_model.vera_A["default"])
    assert torch.equal(holder.vera_B, reference.base_model.vera_B["default"])
    expected = sum(4 + layer.base_layer.out_features for layer in adapter_layers(model).values())
    assert count_parameters(model)[0] == expected == reference.get_nb_trainable_parameters()[0]


def test_vera_merge_draws_unsaved_projections_again(models):
    """The state-dict merge of an adapter without vera_A/vera_B (save_projection: false) equals the merge with them."""
    cfg = VeraConfig(method="vera", r=4, projection_prng_key=3, save_projection=False)
    model, _ = _adapted(models["llama"], cfg)
    state = adapter_state_dict(model, [])
    assert not any(k.startswith("base_model.vera_") for k in state)
    base = {k: v for k, v in load_fp32(models["llama"]).state_dict().items()}
    shared = {f"base_model.{n}": t for n, t in next(iter(adapter_layers(model).values())).shared.named_buffers()}
    with_pair, without = merge_state_dict(base, state | shared, cfg), merge_state_dict(base, state, cfg)
    assert all(torch.equal(with_pair[k], without[k]) for k in base)
    assert _diff(with_pair["model.layers.0.mlp.down_proj.weight"], base["model.layers.0.mlp.down_proj.weight"]) > 1e-3


def test_vera_refuses_an_embedding(models):
    from peftkit.errors import PeftkitError

    cfg = VeraConfig(method="vera", target_modules=["embed_tokens", "o_proj"])
    with pytest.raises(PeftkitError, match=r"adapter.target_modules: 'model.embed_tokens' is an embedding; VeRA \(as "
                                           r"peft's\) adapts Linear and Conv1D layers only. Leave embeddings out"):
        inject_adapters(load_fp32(models["llama"]), cfg)


@pytest.mark.parametrize("save_projection", [True, False])
def test_vera_reload_restores_the_projections(save_projection, models):
    """A reload (eval, merge, a checkpoint's resume) computes with the pair the adapter was trained with: the
    file's, into the one module every layer shares; or, left out, the same draw from the key whatever the global
    RNG state."""
    from peftkit.adapters import shared_holders
    from peftkit.adapters.state_dicts import load_adapter_state_dict

    cfg = VeraConfig(method="vera", r=4, save_projection=save_projection)
    model, _ = _adapted(models["llama"], cfg)
    state = adapter_state_dict(model, [])
    if save_projection:  # as if the file's pair were not what this machine draws from the key
        state["base_model.vera_A"] = state["base_model.vera_A"] + 0.5
    again = load_fp32(models["llama"])
    torch.manual_seed(123)
    inject_adapters(again, cfg)
    load_adapter_state_dict(again, state)
    (theirs,), (ours,) = shared_holders(model), shared_holders(again)
    expected = state["base_model.vera_A"] if save_projection else theirs.vera_A
    assert torch.equal(ours.vera_A, expected) and torch.equal(ours.vera_B, theirs.vera_B)
    assert all(layer.shared is ours for layer in adapter_layers(again).values())
# -------------------------------------------------------------------------------- method-specific: OFT


def test_oft_refuses_sizes_that_do_not_split_the_input(models, tmp_path):
    from peftkit.errors import PeftkitError
    from peftkit.recipe import load_recipe

    # 5 does not divide q_proj's 32 inputs; peft would silently use 4 for that layer.
    with pytest.raises(PeftkitError, match=r"adapter.oft_block_size: 5 does not divide the 32 input features of "
                                           r"'model.layers.0.self_attn.q_proj'.*Set oft_block_size: 4"):
        inject_adapters(load_fp32(models["llama"]), OftConfig(method="oft", oft_block_size=5))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name_or_path: m}\ndata: {train: t.jsonl}\nexport: {output_dir: o}\n"
                      "adapter: {method: oft, r: 4, oft_block_size: 8}\n")
    with pytest.raises(PeftkitError, match=r"adapter.*r is 4 and oft_block_size is 8; OFT takes exactly one"):
        load_recipe(recipe)
    assert OftConfig(method="oft", r=4).oft_block_size == 0  # r alone: 4 blocks, the block size follows



@pytest.mark.parametrize("sizes", [{"oft_block_size": 12}, {"r": 3, "oft_block_size": 0}])
def test_oft_loads_peft_s_adapters_whose_sizes_peft_adjusted_per_layer(sizes, models, tmp_path):
    """peft makes an OFT adapter whose block size (or r) does not divide a layer's input, adjusting it to the
    nearest divisor for that layer (12 -> 8 for 32 and 64 inputs; r 3 -> 2 blocks of 32 inputs, 4 of 64), as
    SmolLM2's 576 and 1536 inputs get from peft's default 32. A recipe with such a size is refused (above); peft's
    adapter loads, with peft's logits, and merges."""
    from peft import OFTConfig

    torch.manual_seed(0)
    theirs = get_peft_model(load_fp32(models["llama"]), OFTConfig(**sizes, target_modules=["q_proj", "down_proj"],
                                                              init_weights=False))
    theirs.save_pretrained(tmp_path / "a")
    expected = _logits(PeftModel.from_pretrained(load_fp32(models["llama"]), tmp_path / "a").eval())
    assert _diff(expected, _logits(load_fp32(models["llama"]))) > 1e-3
    loaded = load_adapted_model(None, str(tmp_path / "a"))[0].eval()
    assert _diff(_logits(loaded), expected) <= TOL
    merge_adapter(str(tmp_path / "a"), str(tmp_path / "merged"))
    assert _diff(_logits(load_fp32(tmp_path / "merged")), expected) <= TOL


def test_a_run_from_peft_s_adjusted_oft_adapter_trains_and_verifies(models, number_data, tmp_path):
    """adapter.init_from such an adapter: `peftkit verify` re-runs the recipe its manifest records, which holds no
    file's flag (it refused the sizes there)."""
    from peft import OFTConfig
    from rich.console import Console

    from peftkit.recipe import load_recipe
    from peftkit.train import train
    from peftkit.verify import verify
    from tests.conftest import make_recipe

    get_peft_model(load_fp32(models["llama"]), OFTConfig(oft_block_size=12, target_modules=["q_proj"],
                                                     init_weights=False)).save_pretrained(tmp_path / "a")
    recipe = make_recipe(tmp_path, models["llama"], number_data, adapter={"init_from": str(tmp_path / "a")},
                         training={"max_steps": 2})
    text = recipe.read_text().replace("  r: 4\n  alpha: 8\n  target_modules: all-linear\n", "")
    assert "init_from" in text and "r: 4" not in text
    recipe.write_text(text)
    train(load_recipe(recipe), show_summary=False)
    report = verify(tmp_path / "run", console=Console(quiet=True))
    assert report.ok, report.differences


def test_oft_refuses_gpt2_conv1d(models):
    from peftkit.errors import PeftkitError

    with pytest.raises(PeftkitError, match=r"'transformer.h.0.attn.c_attn' is GPT-2's Conv1D; OFT rotates the input "
                                           r"of nn.Linear"):
        inject_adapters(load_fp32(models["gpt2"]), OftConfig(method="oft", oft_block_size=4))


def test_oft_inspect_says_what_it_is(models, tmp_path):
    from peftkit.inspect import inspect_adapter

    cfg = CASES["oft"][0].cfg
    model, targets = _adapted(models["llama"], cfg)
    info = inspect_adapter(_save(model, cfg, targets, models["llama"], tmp_path / "adapter"))
    assert (info["method"], info["peft_type"], info["ranks"]) == ("oft", "OFT", None)
    # 14 layers: 32 inputs = 8 blocks of 4 (6 entries each), down_proj 64 = 16 blocks
    assert info["targets"]["count"] == 14 and info["adapter_params"] == 2 * (6 * 8 * 6 + 16 * 6)
    assert not info["vllm"]["accepts"] and "vLLM serves LoRA adapters only; this is OFT" in info["vllm"]["reasons"]


def test_oft_module_dropout_sets_blocks_to_identity_in_training():
    """module_dropout 0.5 on 4 blocks: each training forward rotates with 2 of them replaced by the identity."""
    from itertools import combinations

    cfg = OftConfig(method="oft", r=4, module_dropout=0.5)
    base = _base_layer("linear")
    weight, bias = base.weight.detach().clone(), base.bias.detach().clone()
    layer = method_of(cfg).wrap(base, cfg, "layer")
    method_of(cfg).randomize(layer, torch.Generator().manual_seed(2), 0.3)
    parts = {n: p.detach().clone() for n, p in layer.adapter_params().items()}
    x = torch.randn(3, 12)
    assert _diff(layer.eval()(x), x @ oft_dense(weight, bias, parts, cfg, "linear")[0].T + bias) <= 1e-5
    dropped = {}
    for kept in combinations(range(4), 2):  # the two blocks that still rotate; the others are Q = 0, R = I
        vec = torch.zeros_like(parts["oft_R.weight"])
        vec[list(kept)] = parts["oft_R.weight"][list(kept)]
        dropped[kept] = x @ oft_dense(weight, bias, {"oft_R.weight": vec}, cfg, "linear")[0].T + bias
    torch.manual_seed(0)
    outs = [layer.train()(x) for _ in range(6)]
    assert all(min(_diff(out, d) for d in dropped.values()) <= 1e-5 for out in outs)
    assert len({min(dropped, key=lambda k: _diff(out, dropped[k])) for out in outs}) > 1  # not always the same blocks


def test_oft_refuses_peft_configs_it_cannot_apply(tmp_path):
    from peftkit.errors import PeftkitError
    from peftkit.methods.oft import Oft, PeftOftConfig

    file = tmp_path / "adapter_config.json"
    ok = {"peft_type": "OFT", "target_modules": ["q_proj"], "oft_block_size": 32, "peft_version": "0.21.2"}
    assert Oft.from_peft(PeftOftConfig(**ok), file).oft_block_size == 32
    for change, message in [({"peft_version": "0.17.1"}, "peft 0.18.0 changed that series"),
                            ({"oft_block_size": None}, "no 'oft_block_size': an OFT adapter of peft < 0.14"),
                            ({"r": 4}, '"r" is 4 and "oft_block_size" is 32; exactly one'),
                            ({"bias": "all"}, "supports bias='none' only")]:
        raw = {k: v for k, v in (ok | change).items() if v is not None}
        with pytest.raises(PeftkitError, match=message):
            Oft.from_peft(PeftOftConfig(**raw), file)
