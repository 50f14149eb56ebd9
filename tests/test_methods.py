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
7. a 4-bit NF4 base: training moves only the adapter, and the merge into the dequantized weights is exact.
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
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from peftkit.adapters import adapter_layers, adapter_state_dict, inject_adapters, merge_state_dict
from peftkit.merge import conv1d_modules, merge_adapter, merged_model
from peftkit.methods import METHODS, method_of
from peftkit.methods.ia3 import IA3Config
from peftkit.methods.lora import LoraConfig
from peftkit.methods.oft import OftConfig
from peftkit.modeling import load_adapted_model, load_model
from peftkit.peft_format import peft_config, save_adapter
from peftkit.recipe import ModelConfig, QuantizationConfig
from peftkit.tiny import build_tiny_model
from tests.conftest import random_adapters

IDS = torch.tensor([[1, 40, 41, 42, 7, 60, 61, 62], [1, 55, 12, 80, 81, 3, 47, 2]])
TOL = 1e-4  # max abs logit difference, fp32


@dataclass(frozen=True)
class Case:
    id: str
    cfg: object
    archs: tuple[str, ...]
    """Tiny architectures it runs on: llama, qwen2 (tied embeddings), gpt2 (Conv1D)."""
    layouts: tuple[str, ...]
    """Base layers of the dense check: linear, conv1d, embedding."""
    identity_at_init: bool = True


CASES: dict[str, list[Case]] = {
    "lora": [
        Case("lora", LoraConfig(r=4, alpha=8), ("llama", "qwen2", "gpt2"), ("linear", "conv1d")),
        Case("lora-rslora-embedding", LoraConfig(r=2, alpha=4, use_rslora=True, target_modules=["embed_tokens", "o_proj"]),
             ("llama",), ("linear", "embedding")),
        # DoRA: Linear and Conv1D (biased on qwen2 q/k/v and every gpt2 layer: the bias stays outside the rescaling).
        Case("dora", LoraConfig(r=4, alpha=8, use_dora=True), ("llama", "qwen2", "gpt2"), ("linear", "conv1d")),
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
}


def lora_dense(weight: torch.Tensor, bias, parts: dict[str, torch.Tensor], cfg: LoraConfig, layout: str):
    """(W + (alpha / r) B A, b), alpha / sqrt(r) with rsLoRA, in the layout the base stores W. With DoRA,
    (m * V / ||V||_c, b) for V = W + (alpha / r) B A (out, in), ||.||_c the L2 norm of each output row."""
    scaling = cfg.alpha / (math.sqrt(cfg.r) if cfg.use_rslora else cfg.r)
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


DENSE = {"lora": lora_dense, "ia3": ia3_dense, "oft": oft_dense}
# peft's switch for non-trivially initialised weights, by peft_type.
PEFT_NONTRIVIAL = {"LORA": {"init_lora_weights": False}, "IA3": {"init_ia3_weights": False},
                   "OFT": {"init_weights": False}}

ALL = [(name, case) for name, cases in CASES.items() for case in cases]
BY_ARCH = [pytest.param(case, arch, id=f"{case.id}-{arch}") for _, case in ALL for arch in case.archs]
BY_CASE = [pytest.param(case, id=case.id) for _, case in ALL if case.archs]
DENSE_CASES = [pytest.param(case, id=case.id) for _, case in ALL if case.layouts]


def test_every_registered_method_is_covered():
    assert set(CASES) == set(METHODS) == set(DENSE)
    assert {m.peft_type for m in METHODS.values()} <= set(PEFT_NONTRIVIAL)


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("method-models")
    paths = {}
    for arch in ("llama", "qwen2", "gpt2"):
        paths[arch] = root / arch
        build_tiny_model(paths[arch], arch=arch, hidden_size=32, num_layers=2, seed=0)
    return paths


def _load(path: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def _adapted(path: Path, cfg, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, list[str]]:
    """An injected model with its adapters moved far from identity, as after training."""
    model = _load(path, dtype)
    torch.manual_seed(0)
    targets = inject_adapters(model, cfg)
    random_adapters(model, seed=1, std=0.1)
    return model.eval(), targets


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


def _save(model: nn.Module, cfg, targets: list[str], base: Path, out: Path) -> Path:
    config = peft_config(cfg, targets, str(base), bool(conv1d_modules(model)), model.config.model_type)
    save_adapter(out, adapter_state_dict(model, cfg.modules_to_save), config)
    return out


# ------------------------------------------------------------------------------------- 1. dense math


def _base_layer(layout: str) -> nn.Module:
    torch.manual_seed(0)
    kind = layout.removesuffix("-ff")
    layer = {"linear": lambda: nn.Linear(12, 7), "conv1d": lambda: Conv1D(7, 12), "embedding": lambda: nn.Embedding(20, 7)}[kind]()
    nn.init.normal_(layer.weight)
    return layer


def _dense_forward(base: nn.Module, weight: torch.Tensor, x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "embedding":
        return weight[x]
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
        method.randomize(layer, torch.Generator().manual_seed(2), 0.3)
        parts = {n: p.detach().clone() for n, p in layer.adapter_params().items()}
        dense, dense_bias = DENSE[method.name](weight, bias, parts, case.cfg, layout)
        assert _diff(dense, weight) > 1e-2, layout  # not trivially the base
        x = torch.randint(0, 20, (3, 5)) if layout == "embedding" else torch.randn(3, 5, 12)
        expected = _dense_forward(base, dense, x, layout) + (0 if dense_bias is None else dense_bias)
        assert _diff(layer(x), expected) <= 1e-5, layout

        base_state = {f"{path}.weight": weight} | ({} if bias is None else {f"{path}.bias": bias})
        state = merge_state_dict(base_state, {f"base_model.model.{path}.{n}": t for n, t in parts.items()},
                                 case.cfg, fan_in_fan_out={path} if layout.startswith("conv1d") else set())
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
    model = _load(models[arch])
    base = _logits(model)
    torch.manual_seed(0)
    inject_adapters(model, case.cfg)
    assert _diff(_logits(model), base) <= 1e-6


@pytest.mark.parametrize(("case", "arch"), BY_ARCH)
def test_merged_equals_unmerged(case, arch, models):
    model, _ = _adapted(models[arch], case.cfg)
    adapted = _logits(model)
    assert _diff(adapted, _logits(_load(models[arch]))) > 1e-3  # the adapter really changes the output
    assert _diff(_logits(merged_model(model, case.cfg, torch.float32).eval()), adapted) <= TOL
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for layer in adapter_layers(model).values():
        layer.merge()
    assert _diff(_logits(model), adapted) <= TOL
    for layer in adapter_layers(model).values():
        layer.unmerge()
    assert max(_diff(p, before[n]) for n, p in model.named_parameters()) <= 1e-5


# --------------------------------------------------------------------------- 4. state-dict round trip


@pytest.mark.parametrize("case", BY_CASE)
def test_state_dict_round_trip(case, models, tmp_path):
    arch = case.archs[0]
    model, targets = _adapted(models[arch], case.cfg)
    saved = _save(model, case.cfg, targets, models[arch], tmp_path / "adapter")
    loaded, cfg, _, _, _ = load_adapted_model(None, str(saved))
    # The settings read back write the same adapter_config.json again.
    written = json.loads((saved / "adapter_config.json").read_text())
    assert peft_config(cfg, targets, str(models[arch]), written["fan_in_fan_out"], loaded.config.model_type) == written
    theirs, ours = adapter_state_dict(loaded, []), adapter_state_dict(model, [])
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    assert _diff(_logits(loaded), _logits(model)) <= 1e-6


# ------------------------------------------------------------------------------------ 5. PEFT interop


@pytest.mark.parametrize(("case", "arch"), BY_ARCH)
def test_peft_loads_our_adapter(case, arch, models, tmp_path):
    model, targets = _adapted(models[arch], case.cfg)
    saved = _save(model, case.cfg, targets, models[arch], tmp_path / "adapter")
    reference = PeftModel.from_pretrained(_load(models[arch]), saved).eval()
    theirs = _logits(reference)
    assert _diff(theirs, _logits(model)) <= TOL
    assert _diff(_logits(merged_model(model, case.cfg, torch.float32).eval()), theirs) <= TOL


@pytest.mark.parametrize(("case", "arch"), BY_ARCH)
def test_we_read_peft_adapter(case, arch, models, tmp_path):
    """An adapter peft made, with non-trivial weights: peftkit evaluates it and merges it with peft's numbers."""
    method = method_of(case.cfg)
    probe = _load(models[arch])
    targets = inject_adapters(probe, case.cfg)
    config = method.to_peft(case.cfg, targets, str(models[arch]), fan_in_fan_out=bool(conv1d_modules(probe)))
    config = {k: v for k, v in config.items() if k != "peft_type"} | PEFT_NONTRIVIAL[method.peft_type]
    torch.manual_seed(3)
    reference = get_peft_model(_load(models[arch]), PeftConfig.from_peft_type(peft_type=method.peft_type, **config))
    with torch.no_grad():  # peft starts DoRA's magnitude at ||W + s B A||_c (a gain of 1): move it off that
        for name, p in reference.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape))
    reference.save_pretrained(tmp_path / "peft")
    theirs = _logits(reference.eval())
    assert _diff(theirs, _logits(_load(models[arch]))) > 1e-3  # peft's weights really change the output

    ours, *_ = load_adapted_model(str(models[arch]), str(tmp_path / "peft"))
    assert _diff(_logits(ours), theirs) <= TOL
    merged = merge_adapter(str(tmp_path / "peft"), str(tmp_path / "merged"), base=str(models[arch]))
    assert _diff(_logits(_load(merged)), theirs) <= TOL


# -------------------------------------------------------------------------------------- 6. bf16 base


@pytest.mark.parametrize("case", BY_CASE)
def test_bf16_base_with_fp32_adapter(case, models):
    path = models[case.archs[0]]
    model, _ = _adapted(path, case.cfg, torch.bfloat16)
    reference, _ = _adapted(path, case.cfg, torch.float32)
    assert all(p.dtype == torch.float32 for layer in adapter_layers(model).values() for p in layer.adapter_params().values())
    model.train()
    logits = model(IDS).logits
    assert logits.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: logits of order 1 agree to a few hundredths.
    assert _diff(logits, _logits(reference)) <= 5e-2
    logits.float().square().mean().backward()
    grads = [p.grad for layer in adapter_layers(model).values() for p in layer.adapter_params().values()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for n, p in model.named_parameters() if ".base_layer." in n)
    # The merge adds in fp32 and casts once: exactly the dense weight of the bf16 base, rounded to bf16.
    merged = merged_model(model, case.cfg, torch.bfloat16).state_dict()
    for name, layer in adapter_layers(model).items():
        layout = _layout(layer)
        dense = DENSE[method_of(case.cfg).name](layer.base_layer.weight.float(), None, _parts(layer), case.cfg, layout)[0]
        assert _rounded_once(merged[f"{name}.weight"], dense), name


def _rounded_once(rounded: torch.Tensor, exact: torch.Tensor, noise: float = 1e-7) -> bool:
    """`rounded` (bf16) is `exact` (fp32) rounded once to bf16, give or take fp32 noise (absolute, for weights of
    order 0.1): a merge that sums in another order than the dense check (OFT's block-wise rotation) differs from it
    by ~5e-8, which tips an element lying that close to a midpoint of two bf16 values to the other one."""
    half_step = torch.ldexp(torch.ones_like(exact), torch.frexp(exact).exponent - 9)  # half a bf16 step at `exact`
    return bool(((rounded.float() - exact).abs() <= half_step + noise).all())


def _parts(layer) -> dict[str, torch.Tensor]:
    return {n: p.detach().float() for n, p in layer.adapter_params().items()}


def _layout(layer) -> str:
    base = layer.base_layer
    kind = "embedding" if isinstance(base, nn.Embedding) else "conv1d" if isinstance(base, Conv1D) else "linear"
    return kind + ("-ff" if getattr(layer, "is_feedforward", False) else "")


# -------------------------------------------------------------------------------------- 7. NF4 base


@pytest.mark.parametrize("case", BY_CASE)
def test_nf4_base_trains_and_merges_exactly(case, models):
    quant = QuantizationConfig(method="nf4", double_quant=True, compute_dtype="float32")
    model = load_model(ModelConfig(name_or_path=str(models["llama"]), dtype="float32"), quant, torch.device("cpu"))
    torch.manual_seed(0)
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

    # Exact merge: the delta lands on dequant(quant(W)), the weights the adapter was trained against.
    merged_net = merged_model(model, case.cfg, torch.float32)
    merged = merged_net.state_dict()
    for name, layer in adapter_layers(model).items():
        weight = layer.base_layer.weight
        base = bnbF.dequantize_4bit(weight.data, weight.quant_state).float() if hasattr(weight, "quant_state") else weight.float()
        dense = DENSE[method_of(case.cfg).name](base, None, _parts(layer), case.cfg, _layout(layer))[0]
        assert _diff(merged[f"{name}.weight"], dense) <= 1e-6, name
    with torch.no_grad():  # train mode: bitsandbytes' dequantize-then-fp32-matmul path (dropout is 0)
        qlogits = model(IDS).logits
    assert _diff(_logits(merged_net.eval()), qlogits) <= TOL


# ------------------------------------------------------------------------------ 8. trained from a recipe


@pytest.mark.parametrize("name", sorted(METHODS))
def test_trains_from_a_recipe_and_exports(name, models, number_data, tmp_path):
    """`peftkit train` with the method's first case: the loss falls, adapter/ loads in peft with the logits of
    merged/ (the export path: parameter count, memory estimate, PEFT config, merge)."""
    import yaml

    from peftkit.recipe import load_recipe
    from peftkit.train import train
    from tests.conftest import make_recipe

    case = CASES[name][0]
    adapter = case.cfg.model_dump(mode="json", exclude_none=True)
    recipe = make_recipe(tmp_path, models["llama"], number_data, adapter=adapter,
                         training={"max_steps": 4, "lr": 5e-2}, export={"merged": True})
    data = yaml.safe_load(recipe.read_text())
    recipe.write_text(yaml.safe_dump(data | {"adapter": adapter}, sort_keys=False))  # only the method's own keys
    summary = train(load_recipe(recipe), show_summary=False)
    assert summary["eval_loss"] < summary["base_eval_loss"]
    run = tmp_path / "run"
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["peft_type"] == METHODS[name].peft_type
    reference = PeftModel.from_pretrained(_load(models["llama"]), run / "adapter").eval()
    assert _diff(_logits(_load(run / "merged")), _logits(reference)) <= TOL


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


def test_dora_refuses_an_embedding(models):
    from peftkit.errors import PeftkitError

    cfg = LoraConfig(use_dora=True, target_modules=["embed_tokens", "o_proj"])
    with pytest.raises(PeftkitError, match="Embedding; peftkit's DoRA adapts Linear and Conv1D layers only"):
        inject_adapters(_load(models["llama"]), cfg)


# -------------------------------------------------------------------------------- method-specific: OFT


def test_oft_refuses_sizes_that_do_not_split_the_input(models, tmp_path):
    from peftkit.errors import PeftkitError
    from peftkit.recipe import load_recipe

    # 5 does not divide q_proj's 32 inputs; peft would silently use 4 for that layer.
    with pytest.raises(PeftkitError, match=r"adapter.oft_block_size: 5 does not divide the 32 input features of "
                                           r"'model.layers.0.self_attn.q_proj'.*Set oft_block_size: 4"):
        inject_adapters(_load(models["llama"]), OftConfig(method="oft", oft_block_size=5))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name_or_path: m}\ndata: {train: t.jsonl}\nexport: {output_dir: o}\n"
                      "adapter: {method: oft, r: 4, oft_block_size: 8}\n")
    with pytest.raises(PeftkitError, match=r"adapter.*r is 4 and oft_block_size is 8; OFT takes exactly one"):
        load_recipe(recipe)
    assert OftConfig(method="oft", r=4).oft_block_size == 0  # r alone: 4 blocks, the block size follows


def test_oft_refuses_gpt2_conv1d(models):
    from peftkit.errors import PeftkitError

    with pytest.raises(PeftkitError, match=r"'transformer.h.0.attn.c_attn' is GPT-2's Conv1D; OFT rotates the input "
                                           r"of nn.Linear"):
        inject_adapters(_load(models["gpt2"]), OftConfig(method="oft", oft_block_size=4))


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
                            ({"bias": "all"}, "supports bias='none' only"),
                            ({"exclude_modules": ["k_proj"]}, "'exclude_modules' is set")]:
        raw = {k: v for k, v in (ok | change).items() if v is not None}
        with pytest.raises(PeftkitError, match=message):
            Oft.from_peft(PeftOftConfig(**raw), file)
