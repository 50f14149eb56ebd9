"""RandLoRA (Albert et al. 2025, "RandLoRA: Full-rank parameter-efficient fine-tuning of large models",
arXiv:2502.00987): a full-rank update built from n = ceil(min(out, in) / r) random rank-r bases, frozen and shared
by every adapted layer; each layer trains two small scalings of them, lambda (r, n) and gamma (n, min(out, in)):

    dW = (alpha / r) * B' A',  A'[k n + b, :] = lambda[k, b] * A[k, 0, :min] * gamma[b, :]   (r n x min)
                              B'[:, b r + k] = B[:max, b, k]                                   (max x n r)

for a layer with in <= out (A' acts on the input); otherwise on the output: dW = (alpha / r) * (B' A')^T with the
roles of in and out swapped. (B' flattens its (basis, rank) pairs basis-major, A' rank-major, so row i of A' meets
column i of B' of another (basis, rank) pair: peft 0.21's pairing, kept as it is, any pairing of random bases being
as good.) One pair serves layers of every shape: A (r, 1, min_dim) and B (max_dim, n_max, r), sized for the largest
(out, in) over the targets, each layer slicing what it needs. Both are drawn from a generator seeded with
`projection_prng_key` as peft draws them (kaiming-uniform in bfloat16, each divided by its std; or ternary with
`sparse`/`very_sparse`), so an adapter may leave them out (`save_projection: false`). Names as peft's:
`<path>.randlora_lambda`, `<path>.randlora_gamma`, and `base_model.randlora_A`, `base_model.randlora_B`, which peft's
file also repeats under every layer (`<path>.randlora_A`; `SharedTensors` copies, `shared_copies_per_layer`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn
from torch.nn import functional as F

from peftkit.errors import PeftkitError
from peftkit.methods.base import Method, draw_device, refuse_unsupported, targets_from_peft
from peftkit.methods.layer import AdapterLayer, is_conv1d, linear_shape, refuse_embedding
from peftkit.methods.target_filters import LayerTargets, PeftLayerTargets, filters_from_peft
from peftkit.methods.vera import SEED_RANGE
from peftkit.section import TargetRegex


class RandLoraConfig(LayerTargets):
    """RandLoRA: per-layer scalings of frozen random bases shared by all layers, a full-rank update."""

    method: Literal["randlora"]
    r: int = Field(32, gt=0)
    """Rank of each random basis. min(out, in) / r bases per layer: a smaller r means more bases and more trainable
    numbers (the opposite of LoRA's r); peft's default 32."""
    randlora_alpha: float = 640
    """Scale of the update, alpha / r (peft's default 640, 20 x r: large, so keep the learning rate moderate)."""

    @field_validator("randlora_alpha")
    @classmethod
    def _alpha_not_zero(cls, value: float) -> float:
        """0 scales the update and every gradient of lambda and gamma to nothing: the run would train nothing."""
        if value == 0:
            raise ValueError("0 scales the update and its gradients to nothing, so the adapter would never train; use "
                             "the default 640 (20 x r)")
        return value
    randlora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapter's input."""
    projection_prng_key: int = Field(0, **SEED_RANGE)
    """Seed of the generator that draws the shared bases A and B."""
    save_projection: bool = True
    """Save A and B in the adapter (peft also repeats them under every layer); false: drawn again from the key on
    loading."""
    sparse: bool = False
    """Ternary bases (-1, 0, 1 with probabilities 1/6, 2/3, 1/6), scaled to unit std."""
    very_sparse: bool = False
    """Ternary bases with -1 and 1 each of probability 1 / (2 sqrt(min_dim)); takes precedence over `sparse`."""
    init_weights: bool = True
    """true (peft's default): lambda starts at 0 (the base model), gamma at 1 / min(out, in); false: lambda ~ N(0, 1)
    from torch's generator and gamma at 1 / max(out, in) (a random start, the same numbers as peft's for a seed)."""
    target_modules: Literal["all-linear"] | list[str] | TargetRegex = "all-linear"
    """As LoRA's: Linear and Conv1D layers (and 4-bit/8-bit ones); embeddings are refused."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full and saved whole (e.g. `lm_head`)."""


def _bases_count(min_dim: int, r: int) -> int:
    """ceil(min_dim / r): enough rank-r bases for a full-rank update (peft's num_bases)."""
    return -(-min_dim // r)


def bases(cfg: RandLoraConfig, shapes: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """The shared A (r, 1, min_dim) and B (max_dim, n, r) for layers of (in, out) `shapes`, as peft draws them, fp32."""
    largest_in, largest_out = max(i for i, _ in shapes), max(o for _, o in shapes)
    max_dim, min_dim = max(largest_in, largest_out), min(largest_in, largest_out)
    count = _bases_count(min_dim, cfg.r)
    generator = torch.Generator(device="cpu").manual_seed(cfg.projection_prng_key)
    if cfg.very_sparse or cfg.sparse:
        a, b = _ternary(cfg.r, count, min_dim, max_dim, math.sqrt(min_dim) if cfg.very_sparse else 3, generator)
    else:
        # kaiming-uniform (a = sqrt(5)) drawn in bfloat16, A first, then B one basis at a time (peft's _kaiming_init)
        a = _kaiming((cfg.r, 1, min_dim), generator)
        b = torch.cat([_kaiming((max_dim, 1, cfg.r), generator) for _ in range(count)], dim=1)
        a, b = a / a.std(), b / b.std()
    return {"randlora_A": a.float(), "randlora_B": b.float()}


def _kaiming(shape: tuple[int, int, int], generator: torch.Generator) -> torch.Tensor:
    """peft's draw: bfloat16 (peft draws float16 on an accelerator without bfloat16, and peftkit never does)."""
    with torch.no_grad():
        return nn.init.kaiming_uniform_(torch.empty(shape, dtype=torch.bfloat16), a=math.sqrt(5), generator=generator)


def _ternary(r: int, count: int, min_dim: int, max_dim: int, sparsity: float,
             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's sparse bases: -1 below 1 / (2 sparsity), 1 above 1 - 1 / (2 sparsity), else 0, each over its std."""
    uniform_a = torch.rand((r, 1, min_dim), generator=generator)
    uniform_b = torch.rand((max_dim, count, r), generator=generator)
    out = []
    for uniform in (uniform_a, uniform_b):
        signs = torch.zeros(uniform.shape)
        signs[uniform < 1 / (2 * sparsity)] = -1
        signs[uniform > 1 - 1 / (2 * sparsity)] = 1
        out.append(signs)
    return out[0] / out[0].std(), out[1] / out[1].std()


@dataclass(frozen=True)
class RandLoraFacts:
    scaling: float
    """alpha / r."""
    fan_in_fan_out: bool = False
    """The base weight is stored (in, out) (transformers' Conv1D)."""


def factors(parts: dict[str, torch.Tensor], in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, second) in fp32 with dW = scaling * second @ first: first (n r, in), second (out, n r) (peft's
    get_scaled_bases, in the same order of operations). Refuses bases too small for the layer."""
    lam, gamma = parts["randlora_lambda"].float(), parts["randlora_gamma"].float()
    a, b = parts["randlora_A"].float(), parts["randlora_B"].float()
    min_dim, max_dim, count = min(in_features, out_features), max(in_features, out_features), lam.shape[1]
    if (gamma.shape != (count, min_dim) or a.shape[0] != lam.shape[0] or a.shape[2] < min_dim
            or b.shape[0] < max_dim or b.shape[1] < count or b.shape[2] != lam.shape[0]):
        raise PeftkitError(
            f"RandLoRA's tensors randlora_lambda {tuple(lam.shape)}, randlora_gamma {tuple(gamma.shape)} and the shared "
            f"bases randlora_A {tuple(a.shape)}, randlora_B {tuple(b.shape)} do not fit a layer of {in_features} inputs "
            f"and {out_features} outputs. Export the adapter again.")
    scaled = (lam[:, :, None] * a[:, :count, :min_dim] * gamma[None]).flatten(end_dim=1)  # (r n, min)
    plain = b[:max_dim, :count, :].flatten(start_dim=1)  # (max, n r)
    return (scaled, plain) if min_dim == in_features else (plain.T, scaled.T)


class _ScaledBases(torch.autograd.Function):
    """lambda[:, :, None] * A * gamma[None], keeping only its three inputs for backward (peft's UniqueBaseGrad):
    autograd would keep the (r, n, min) product of the first two, a dense matrix's worth per layer."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, lam: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, lam, gamma)
        return lam[:, :, None] * a * gamma[None]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, lam, gamma = ctx.saved_tensors
        return (None, torch.einsum("kbj,kvj,bj->kb", grad, a, gamma), torch.einsum("kbj,kvj,kb->bj", grad, a, lam))


class RandLoraLinear(AdapterLayer):
    """RandLoRA around nn.Linear, transformers' Conv1D or a bitsandbytes linear layer; `shared` holds A and B."""

    def __init__(self, base_layer: nn.Module, cfg: RandLoraConfig) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = linear_shape(base_layer)
        self.facts = RandLoraFacts(cfg.randlora_alpha / cfg.r, is_conv1d(base_layer))
        min_dim, max_dim = min(self.in_features, self.out_features), max(self.in_features, self.out_features)
        count = _bases_count(min_dim, cfg.r)
        device = base_layer.weight.device
        # Drawn on the CPU from torch's global generator, then moved beside the base; drawn with init_weights too
        # (then zeroed), as peft: the next layers' draws are peft's.
        lam = torch.randn(cfg.r, count, device=draw_device(device))
        gamma = torch.full((count, min_dim), 1 / max_dim, device=draw_device(device))
        if cfg.init_weights:
            lam.zero_()
            gamma.fill_(1 / max(count, min_dim))
        self.randlora_lambda = nn.Parameter(lam.to(device))
        self.randlora_gamma = nn.Parameter(gamma.to(device))
        self.randlora_dropout = nn.Dropout(cfg.randlora_dropout) if cfg.randlora_dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        lam, gamma, count = self.randlora_lambda, self.randlora_gamma, self.randlora_lambda.shape[1]
        min_dim, max_dim = min(self.in_features, self.out_features), max(self.in_features, self.out_features)
        scaled = _ScaledBases.apply(self.shared.randlora_A[:, :count, :min_dim], lam, gamma).flatten(end_dim=1)
        plain = self.shared.randlora_B[:max_dim, :count, :].flatten(start_dim=1)
        first, second = (scaled, plain) if min_dim == self.in_features else (plain.T, scaled.T)
        update = F.linear(F.linear(self.randlora_dropout(x.to(lam.dtype)), first), second) * self.facts.scaling
        return (result + update).to(result.dtype)


class PeftRandLoraConfig(PeftLayerTargets):
    """The fields of a RANDLORA adapter_config.json that peftkit reads (defaults: peft's RandLoraConfig)."""

    r: int = Field(32, gt=0)
    randlora_alpha: float = 640
    randlora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    projection_prng_key: int = Field(0, **SEED_RANGE)
    save_projection: bool = True
    sparse: bool = False
    very_sparse: bool = False
    init_weights: bool = True
    # Features peftkit does not implement: a value here is refused rather than silently ignored.
    bias: str = "none"


class RandLora(Method):
    name = "randlora"
    title = "RandLoRA"
    peft_type = "RANDLORA"
    config = RandLoraConfig
    peft_config = PeftRandLoraConfig
    param_names = ("randlora_lambda", "randlora_gamma")
    rank_dims = {"randlora_lambda": 0, "randlora_A": 0, "randlora_B": 2}
    shared_names = ("randlora_A", "randlora_B")
    shared_copies_per_layer = True

    @classmethod
    def wrap(cls, base: nn.Module, cfg: RandLoraConfig, path: str) -> RandLoraLinear:
        refuse_embedding(base, path, "RandLoRA")
        return RandLoraLinear(base, cfg)

    @classmethod
    def shared_tensors(cls, cfg: RandLoraConfig, shapes: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        return bases(cfg, shapes)

    @classmethod
    def saves_shared(cls, cfg: RandLoraConfig) -> bool:
        return cfg.save_projection

    @classmethod
    def layer_facts(cls, cfg: RandLoraConfig, path: str, fan_in_fan_out: bool) -> RandLoraFacts:
        return RandLoraFacts(cfg.randlora_alpha / cfg.r, fan_in_fan_out)

    @staticmethod
    def merge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: RandLoraFacts) -> torch.Tensor:
        return weight + _delta(weight, parts, facts)

    @staticmethod
    def unmerge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: RandLoraFacts) -> torch.Tensor:
        return weight - _delta(weight, parts, facts)

    @staticmethod
    def update_shape(parts: dict[str, torch.Tensor], facts: RandLoraFacts) -> tuple[int | None, ...]:
        return (None, None)  # gamma gives min(out, in) but not which; `factors` checks the layer's own shape

    @classmethod
    def to_peft(cls, cfg: RandLoraConfig, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        # The exact module paths (peft_common) also make peft size the shared bases from the same layers.
        alpha = int(cfg.randlora_alpha) if float(cfg.randlora_alpha).is_integer() else cfg.randlora_alpha
        return cls.peft_common(cfg, targets, base_name) | {
            "r": cfg.r, "randlora_alpha": alpha, "randlora_dropout": cfg.randlora_dropout,
            "projection_prng_key": cfg.projection_prng_key, "save_projection": cfg.save_projection,
            "sparse": cfg.sparse, "very_sparse": cfg.very_sparse, "fan_in_fan_out": fan_in_fan_out, "bias": "none",
            "init_weights": cfg.init_weights,
        }

    @classmethod
    def from_peft(cls, peft: PeftRandLoraConfig, config_file: Path) -> RandLoraConfig:
        refuse_unsupported(peft, config_file, ())  # (its bias)
        return RandLoraConfig(
            method="randlora", r=peft.r, randlora_alpha=peft.randlora_alpha, randlora_dropout=peft.randlora_dropout,
            projection_prng_key=peft.projection_prng_key, save_projection=peft.save_projection, sparse=peft.sparse,
            very_sparse=peft.very_sparse, init_weights=peft.init_weights,
            target_modules=targets_from_peft(peft.target_modules, config_file),
            modules_to_save=peft.modules_to_save or [], **filters_from_peft(peft, config_file))

    @classmethod
    def kept_for_backward(cls, cfg: RandLoraConfig, layer: AdapterLayer) -> tuple[int, int]:
        # Per token the (n r) intermediate and the output (its dropout's input too, at most in); per layer the two
        # flattened bases F.linear keeps: (n r) x (min + max) values (the sliced B is a copy).
        in_features, out_features = linear_shape(layer.base_layer)
        ranks = cfg.r * _bases_count(min(in_features, out_features), cfg.r)
        return ranks + out_features + in_features, ranks * (in_features + out_features)

    @classmethod
    def describe(cls, cfg: RandLoraConfig) -> str:
        return f"RandLoRA r={cfg.r}"

    @classmethod
    def randomize(cls, layer: AdapterLayer, generator: torch.Generator, std: float) -> None:
        # lambda starts at 0: a nonzero lambda makes the update nonzero; gamma moves by a relative `std`.
        with torch.no_grad():
            layer.randlora_lambda.copy_(torch.randn(layer.randlora_lambda.shape, generator=generator) * std)
            layer.randlora_gamma.mul_(1 + torch.randn(layer.randlora_gamma.shape, generator=generator) * std)


def _delta(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: RandLoraFacts) -> torch.Tensor:
    """RandLoRA's update in the base weight's layout ((in, out) for Conv1D), on its device."""
    out_features, in_features = weight.shape[::-1] if facts.fan_in_fan_out else weight.shape
    first, second = factors({k: t.to(weight.device) for k, t in parts.items()}, in_features, out_features)
    delta = (second @ first) * facts.scaling
    return delta.T if facts.fan_in_fan_out else delta


RandLoraLinear.method = RandLora
