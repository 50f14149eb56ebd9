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
from peftkit.methods.lora import LoraConfig
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
    ],
}


def lora_dense(weight: torch.Tensor, parts: dict[str, torch.Tensor], cfg: LoraConfig, layout: str) -> torch.Tensor:
    """W + (alpha / r) B A (alpha / sqrt(r) with rsLoRA), in the layout the base stores W."""
    scaling = cfg.alpha / (math.sqrt(cfg.r) if cfg.use_rslora else cfg.r)
    if layout == "embedding":  # peft's names: A (r, vocab), B (dim, r); W is (vocab, dim)
        return weight + scaling * (parts["lora_embedding_B"] @ parts["lora_embedding_A"]).T
    update = scaling * parts["lora_B.weight"] @ parts["lora_A.weight"]  # (out, in)
    return weight + (update.T if layout == "conv1d" else update)


DENSE = {"lora": lora_dense}
# peft's switch for non-trivially initialised weights, by peft_type.
PEFT_NONTRIVIAL = {"LORA": {"init_lora_weights": False}}

ALL = [(name, case) for name, cases in CASES.items() for case in cases]
BY_ARCH = [pytest.param(case, arch, id=f"{case.id}-{arch}") for _, case in ALL for arch in case.archs]
BY_CASE = [pytest.param(case, id=case.id) for _, case in ALL]


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
    config = peft_config(cfg, targets, str(base), fan_in_fan_out=bool(conv1d_modules(model)))
    save_adapter(out, adapter_state_dict(model, cfg.modules_to_save), config)
    return out


# ------------------------------------------------------------------------------------- 1. dense math


def _base_layer(layout: str) -> nn.Module:
    torch.manual_seed(0)
    layer = {"linear": lambda: nn.Linear(12, 7), "conv1d": lambda: Conv1D(7, 12), "embedding": lambda: nn.Embedding(20, 7)}[layout]()
    nn.init.normal_(layer.weight)
    return layer


def _dense_forward(base: nn.Module, weight: torch.Tensor, x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "embedding":
        return weight[x]
    return (x @ weight if layout == "conv1d" else x @ weight.T) + base.bias


@pytest.mark.parametrize("case", BY_CASE)
def test_dense_math(case):
    method = method_of(case.cfg)
    for layout in case.layouts:
        base = _base_layer(layout)
        original = base.weight.detach().clone()
        layer = method.wrap(base, case.cfg, "layer")
        method.randomize(layer, torch.Generator().manual_seed(2), 0.3)
        parts = {n: p.detach().clone() for n, p in layer.adapter_params().items()}
        dense = DENSE[method.name](original, parts, case.cfg, layout)
        assert _diff(dense, original) > 1e-2, layout  # not trivially the base
        x = torch.randint(0, 20, (3, 5)) if layout == "embedding" else torch.randn(3, 5, 12)

        assert _diff(layer(x), _dense_forward(base, dense, x, layout)) <= 1e-5, layout
        state = merge_state_dict({"layer.weight": original}, {f"base_model.model.layer.{n}": t for n, t in parts.items()},
                                 case.cfg, fan_in_fan_out={"layer"} if layout == "conv1d" else set())
        assert _diff(state["layer.weight"], dense) <= 1e-6, layout
        layer.merge()
        assert _diff(base.weight, dense) <= 1e-6, layout
        layer.unmerge()
        assert _diff(base.weight, original) <= 1e-5, layout


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
    assert cfg.model_dump() == case.cfg.model_dump() | {"target_modules": sorted(targets)}
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
        dense = DENSE[method_of(case.cfg).name](layer.base_layer.weight.float(), _parts(layer), case.cfg, layout)
        assert torch.equal(merged[f"{name}.weight"], dense.to(torch.bfloat16)), name


def _parts(layer) -> dict[str, torch.Tensor]:
    return {n: p.detach().float() for n, p in layer.adapter_params().items()}


def _layout(layer) -> str:
    base = layer.base_layer
    return "embedding" if isinstance(base, nn.Embedding) else "conv1d" if isinstance(base, Conv1D) else "linear"


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
        dense = DENSE[method_of(case.cfg).name](base, _parts(layer), case.cfg, _layout(layer))
        assert _diff(merged[f"{name}.weight"], dense) <= 1e-6, name
    with torch.no_grad():  # train mode: bitsandbytes' dequantize-then-fp32-matmul path (dropout is 0)
        qlogits = model(IDS).logits
    assert _diff(_logits(merged_net.eval()), qlogits) <= TOL
