"""PSOFT, efficient orthogonal fine-tuning with principal subspace adaptation (Wu et al. 2026, ICLR, "PSOFT:
Efficient Orthogonal Fine-Tuning with Principal Subspace Adaptation", openreview.net/forum?id=FSHrinMArK): each
layer's update turns the frozen weight's top-r principal subspace by a trained r x r matrix,

    W' = W + s B (R - I) A,   A (r, in), B (out, r) from the SVD of W (frozen, never saved),

R = diag(vector_b) C diag(vector_a), C the Cayley transform (I + Q)(I - Q)^-1 of a skew-symmetric Q whose upper
triangle is the trained `weight` (psoft_orth; a Neumann series of `num_cayley_neumann_terms` with
use_cayley_neumann), or a free r x r `weight`. With psoft_init, A = Vh_r and B = U_r S_r / s: s B (R - I) A =
U_r S_r (R - I) Vh_r, the principal part of W turned by R (pissa_init splits sqrt(S_r / s) between them).

A and B are not in the file: peft computes them again from the base weight on loading (torch.linalg.svd of its fp32
copy, or torch.svd_lowrank under a fork of torch's generator seeded with random_seed), and so does peftkit, on the
weight's device; a merge of the file (`peftkit merge`) takes them from the base weight it merges into. The SVD's signs
are its LAPACK's: the same base on another device or library can give other signs, and the adapter another update
(peft's too). Names, shapes, defaults and init as HF peft 0.21's `PsoftLayer`: `<path>.psoft_R.weight` (r (r - 1) / 2,)
(or (r, r)), `<path>.psoft_R.vector_b`, `<path>.psoft_R.vector_a` (r,); R starts at the identity (the base model), or
with init_weights false at Q ~ N(0, 0.1^2) (I + N(0, 0.1^2) free), drawn as peft draws it: one seed, peft's numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.methods.base import Method, draw_device, refuse_unsupported, targets_from_peft
from peftkit.methods.layer import AdapterLayer, is_quantized, linear_shape, not_a_linear
from peftkit.methods.target_filters import (ExcludedTargets, LayerTargets, PeftExcludedTargets, PeftLayerTargets,
                                             filters_from_peft)
from peftkit.section import TargetRegex

AB_INITS = Literal["psoft_init", "pissa_init"]
SVDS = Literal["full", "lowrank"]


class PsoftConfig(LayerTargets, ExcludedTargets):
    """PSOFT: a trained r x r (orthogonal) turn of each target's top-r singular subspace."""

    method: Literal["psoft"]
    r: int = Field(32, ge=1)
    """Size of R, the principal subspace turned (at most a layer's smaller side): r (r - 1) / 2 + 2 r trained numbers
    a layer with the defaults."""
    psoft_alpha: int | float = Field(32, gt=0)
    """s = psoft_alpha / r scales the update, as LoRA's alpha (with psoft_init it cancels in s B: no effect)."""
    psoft_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the update's input (training only)."""
    ab_svd_init: AB_INITS = "psoft_init"
    """psoft_init: A = Vh_r (orthonormal rows), B = U_r S_r / s; pissa_init: sqrt(S_r / s) on both sides (PiSSA's)."""
    psoft_svd: SVDS = "full"
    """How A and B are computed from W: torch.linalg.svd, or torch.svd_lowrank (seeded with random_seed)."""
    psoft_svd_lowrank_niter: int = Field(10, ge=0)
    """torch.svd_lowrank's power iterations (psoft_svd lowrank only)."""
    random_seed: int = Field(0, ge=0, lt=2**63)
    """Seed of torch.svd_lowrank's random projection (psoft_svd lowrank only), so that loading computes the same A, B."""
    psoft_orth: bool = True
    """R's core is orthogonal (Cayley of a trained skew-symmetric Q); false: a free r x r matrix starting at I."""
    psoft_mag_b: bool = True
    """A trained scale per output of R (diag(vector_b) on its left), starting at 1."""
    psoft_mag_a: bool = True
    """A trained scale per input of R (diag(vector_a) on its right), starting at 1."""
    use_cayley_neumann: bool = False
    """Approximate (I - Q)^-1 by its Neumann series (num_cayley_neumann_terms terms) instead of a solve."""
    num_cayley_neumann_terms: int = Field(5, ge=1)
    """Terms of the series (use_cayley_neumann only)."""
    cayley_neumann_eps: float | None = Field(None, gt=0, lt=1)
    """Q scaled down to this Frobenius norm where it is larger (use_cayley_neumann only); null: never."""
    init_weights: bool = True
    """true: R = I, the base model; false (debugging, as peft): Q ~ N(0, 0.1^2) (free R: I + N(0, 0.1^2))."""
    target_modules: Literal["all-linear"] | list[str] | TargetRegex = "all-linear"
    """As LoRA's: nn.Linear layers (GPT-2's Conv1D, embeddings and 4-bit/8-bit layers are refused, as peft's)."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full and saved whole (e.g. `lm_head`)."""


@dataclass(frozen=True)
class PsoftFacts:
    """What a merge needs beyond the trained tensors: how A and B follow from the weight, and how R from `weight`."""

    r: int = 32
    scaling: float = 1.0
    ab_svd_init: str = "psoft_init"
    psoft_svd: str = "full"
    niter: int = 10
    random_seed: int = 0
    orth: bool = True
    use_cayley_neumann: bool = False
    num_cayley_neumann_terms: int = 5
    cayley_neumann_eps: float | None = None
    factors: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, compare=False)
    """A layer's (A, B), computed from its unmerged weight (an unmerge cannot find them in the merged one); None: the
    merge of a file computes them from the weight it is given."""


def facts_of(cfg: PsoftConfig) -> PsoftFacts:
    return PsoftFacts(cfg.r, cfg.psoft_alpha / cfg.r, cfg.ab_svd_init, cfg.psoft_svd, cfg.psoft_svd_lowrank_niter,
                      cfg.random_seed, cfg.psoft_orth, cfg.use_cayley_neumann, cfg.num_cayley_neumann_terms,
                      cfg.cayley_neumann_eps)


def principal_factors(weight: torch.Tensor, facts: PsoftFacts) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)), fp32, from the (out, in) weight as peft's _build_psoft_ab_cache_buffers computes them."""
    w = weight.detach().to(torch.float32)
    r = facts.r
    if r > min(w.shape):
        raise PeftkitError(f"The adapter does not fit this model: its PSOFT r {r} is past the size of a weight of "
                           f"{tuple(w.shape)}, whose top-r singular subspace it turns. It was trained on a different "
                           "base model.")
    if facts.psoft_svd == "full":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
    else:  # torch.svd_lowrank draws a random projection: under a fork of the generator seeded with random_seed
        devices = {"devices": []} if w.device.type == "cpu" else {"devices": [w.device], "device_type": w.device.type}
        with torch.random.fork_rng(**devices):
            torch.manual_seed(facts.random_seed)
            u, s, v = torch.svd_lowrank(w, q=r, niter=facts.niter)
        vh = v.T
    u, s, vh = u[:, :r], s[:r] / facts.scaling, vh[:r, :]
    if facts.ab_svd_init == "psoft_init":
        a, b = vh, u @ torch.diag(s)
    else:
        root = torch.sqrt(s)
        a, b = torch.diag(root) @ vh, u @ torch.diag(root)
    return a.contiguous(), b.contiguous()


def skew(weight: torch.Tensor, r: int) -> torch.Tensor:
    """Q - Q^T, Q's strict upper triangle the r (r - 1) / 2 entries of `weight` row by row (peft's index_put)."""
    rows, cols = torch.triu_indices(r, r, 1, device=weight.device)
    q = torch.zeros(r, r, device=weight.device, dtype=weight.dtype).index_put((rows, cols), weight)
    return q - q.T


def neumann(q: torch.Tensor, facts: PsoftFacts) -> torch.Tensor:
    """(I + Q)(I - Q)^-1 ~ I + 2 Q + ... + 2 Q^(t-2) + Q^(t-1), t terms (peft's sum, Q first scaled to eps if set)."""
    if facts.cayley_neumann_eps is not None:
        norm = torch.linalg.norm(q, ord="fro")
        q = torch.where(torch.isfinite(norm) & (norm > facts.cayley_neumann_eps),
                        q * (facts.cayley_neumann_eps / (norm + 1e-12)), q)
    t = facts.num_cayley_neumann_terms
    result = torch.eye(len(q), device=q.device, dtype=q.dtype)
    if t > 1:
        result = result + 2.0 * q
    if t > 2:
        power = q @ q
        result = result + 2.0 * power
        for _ in range(3, t - 1):
            power = power @ q
            result = result + 2.0 * power
        result = result + power @ q
    return result


def turn(parts: dict[str, torch.Tensor], facts: PsoftFacts) -> torch.Tensor:
    """R (r, r): diag(vector_b) C diag(vector_a), C the Cayley transform of `weight` (or `weight` itself)."""
    weight = parts["psoft_R.weight"]
    if not facts.orth:
        matrix = weight
    else:
        q = skew(weight, facts.r)
        eye = torch.eye(facts.r, device=q.device, dtype=q.dtype)
        # (I + Q)(I - Q)^-1 by peft's solve; solve_ex: I - Q of a skew-symmetric Q is never singular, and `solve`'s
        # check of that reads a device value on the host at every forward
        matrix = neumann(q, facts) if facts.use_cayley_neumann else torch.linalg.solve_ex(eye - q, eye + q, left=False)[0]
    if (vector_b := parts.get("psoft_R.vector_b")) is not None:
        matrix = vector_b[:, None] * matrix
    if (vector_a := parts.get("psoft_R.vector_a")) is not None:
        matrix = matrix * vector_a[None, :]
    return matrix


def delta(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: PsoftFacts) -> torch.Tensor:
    """s B (R - I) A (out, in), fp32; A and B the layer's (`facts.factors`), else computed from `weight`."""
    a, b = principal_factors(weight, facts) if facts.factors is None else (t.float() for t in facts.factors)
    r = turn({n: t.float() for n, t in parts.items()}, facts).to(weight.device)
    eye = torch.eye(facts.r, device=weight.device)
    return (b.to(weight.device) @ (r - eye) @ a.to(weight.device)) * facts.scaling


def unsupported(path: str, kind: str) -> PeftkitError:
    return PeftkitError(
        f"adapter.target_modules: '{path}' is {kind}; PSOFT adapts nn.Linear layers only, as peft 0.21's PSOFT "
        "(which computes A and B again from the plain weight on loading). Target Linear layers (all-linear does, but "
        "on GPT-2's Conv1D), or use adapter.method: lora for this model.")


def refuse_quantized(path: str) -> PeftkitError:
    return PeftkitError(
        f"adapter.target_modules: '{path}' is a 4-bit/8-bit (bitsandbytes) layer; PSOFT takes A and B from the SVD of "
        "the base weight, which peft computes again from the unquantized weight on loading (peft 0.21 refuses a "
        "quantized one), so an adapter trained on the quantized weights would not be the adapter peft or a merge "
        "applies. Load the model unquantized (remove the recipe's quantization section), or use adapter.method: lora for QLoRA.")


class PsoftR(nn.Module):
    """R's trained tensors under peft's names: `weight`, `vector_b`, `vector_a` (`psoft_R.` in the file)."""

    def __init__(self, cfg: PsoftConfig, device: torch.device) -> None:
        super().__init__()
        r, draw = cfg.r, draw_device(device)
        if cfg.psoft_orth:  # Q's upper triangle: 0 (R = I), or N(0, 0.1^2)
            weight = torch.zeros(r * (r - 1) // 2, device=draw)
            if not cfg.init_weights:
                nn.init.normal_(weight, mean=0.0, std=0.1)
        else:
            weight = torch.eye(r, device=draw)
            if not cfg.init_weights:
                weight = weight + torch.randn_like(weight) * 0.1
        self.weight = nn.Parameter(weight.to(device))
        self.vector_b = nn.Parameter(torch.ones(r, device=device)) if cfg.psoft_mag_b else None
        self.vector_a = nn.Parameter(torch.ones(r, device=device)) if cfg.psoft_mag_a else None


class PsoftLinear(AdapterLayer):
    """PSOFT around nn.Linear: base output + s ((x A^T) R^T - x A^T) B^T, in fp32, A and B frozen buffers."""

    def __init__(self, base_layer: nn.Module, cfg: PsoftConfig, path: str) -> None:
        super().__init__(base_layer)
        in_features, out_features = linear_shape(base_layer)
        if cfg.r > min(in_features, out_features):
            raise PeftkitError(f"adapter.r: {cfg.r} is past the size of '{path}' ({out_features} x {in_features}): "
                               f"PSOFT turns its top-r singular subspace, at most {min(in_features, out_features)} "
                               "wide (peft refuses it too); use a smaller r, or leave this layer out of target_modules.")
        self.own_facts = facts_of(cfg)
        weight = base_layer.weight
        self.psoft_R = PsoftR(cfg, weight.device)
        if weight.device.type == "meta":  # (the memory estimate: shapes only)
            a, b = torch.empty(cfg.r, in_features, device="meta"), torch.empty(out_features, cfg.r, device="meta")
        else:
            with torch.no_grad():
                a, b = principal_factors(weight, self.own_facts)
        self.register_buffer("psoft_A", a, persistent=False)  # (not in the file: peft computes them again)
        self.register_buffer("psoft_B", b, persistent=False)
        self.dropout = nn.Dropout(cfg.psoft_dropout) if cfg.psoft_dropout else nn.Identity()

    @property
    def facts(self) -> PsoftFacts:
        """The settings, with this layer's A and B (wherever the layer has moved)."""
        return replace(self.own_facts, factors=(self.psoft_A, self.psoft_B))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        r = turn(dict(self.psoft_R.named_parameters(prefix="psoft_R")), self.facts)
        xa = self.dropout(x.to(self.psoft_A.dtype)) @ self.psoft_A.T
        update = (xa @ r.to(xa.dtype).T - xa) @ self.psoft_B.T
        return (result + update * self.facts.scaling).to(result.dtype)


class PeftPsoftConfig(PeftLayerTargets, PeftExcludedTargets):
    """The fields of a PSOFT adapter_config.json that peftkit reads (defaults: peft 0.21's PsoftConfig)."""

    r: int = Field(32, ge=1)
    psoft_alpha: int | float = Field(32, gt=0)
    psoft_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    ab_svd_init: AB_INITS = "psoft_init"
    psoft_svd: SVDS = "full"
    psoft_svd_lowrank_niter: int = Field(10, ge=0)
    random_seed: int = Field(0, ge=0, lt=2**63)
    psoft_orth: bool = True
    psoft_mag_b: bool = True
    psoft_mag_a: bool = True
    use_cayley_neumann: bool = False
    num_cayley_neumann_terms: int = Field(5, ge=1)
    cayley_neumann_eps: float | None = Field(None, gt=0, lt=1)
    init_weights: bool = True
    fan_in_fan_out: bool = False


# The keys only one setting reads: set otherwise, a recipe's value would do nothing (peft warns).
UNUSED = (("psoft_svd_lowrank_niter", 10, "psoft_svd", "lowrank"),
          ("num_cayley_neumann_terms", 5, "use_cayley_neumann", True),
          ("cayley_neumann_eps", None, "use_cayley_neumann", True))


class Psoft(Method):
    name = "psoft"
    title = "PSOFT"
    peft_type = "PSOFT"
    config = PsoftConfig
    peft_config = PeftPsoftConfig
    param_names = ("psoft_R.weight", "psoft_R.vector_b", "psoft_R.vector_a")
    # (inspect reads a tensor's whole name, the shape-mismatch message its last part)
    rank_dims = {"psoft_R.vector_b": 0, "psoft_R.vector_a": 0, "vector_b": 0, "vector_a": 0}

    @classmethod
    def recipe_conflict(cls, recipe: Any) -> str | None:
        cfg = recipe.adapter
        for key, default, needs, value in UNUSED if not cfg.init_from else ():
            if getattr(cfg, key) != default and getattr(cfg, needs) != value:
                return (f"adapter.{key}: {getattr(cfg, key)} does nothing unless {needs} is {value!r} (peft only "
                        f"warns that it ignores it); set {needs}: {str(value).lower()}, or remove {key}")
        return None

    @classmethod
    def wrap(cls, base: nn.Module, cfg: PsoftConfig, path: str) -> PsoftLinear:
        if kind := not_a_linear(base):
            raise unsupported(path, kind)
        if is_quantized(base):
            raise refuse_quantized(path)
        return PsoftLinear(base, cfg, path)

    @classmethod
    def layer_facts(cls, cfg: PsoftConfig, path: str, fan_in_fan_out: bool) -> PsoftFacts:
        if fan_in_fan_out:
            raise unsupported(path, "GPT-2's Conv1D")
        return facts_of(cfg)

    @staticmethod
    def merge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: PsoftFacts) -> torch.Tensor:
        return weight + delta(weight, parts, facts)

    @staticmethod
    def unmerge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: PsoftFacts) -> torch.Tensor:
        return weight - delta(weight, parts, facts)  # (the layer's parts hold A and B of the unmerged weight)

    @staticmethod
    def update_shape(parts: dict[str, torch.Tensor], facts: PsoftFacts) -> tuple[int | None, ...]:
        return None, None  # any layer of at least r on each side (A and B come from its weight)

    @classmethod
    def to_peft(cls, cfg: PsoftConfig, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        return cls.peft_common(cfg, targets, base_name) | {
            key: getattr(cfg, key) for key in (
                "r", "psoft_alpha", "psoft_dropout", "ab_svd_init", "psoft_svd", "psoft_svd_lowrank_niter",
                "random_seed", "psoft_orth", "psoft_mag_b", "psoft_mag_a", "use_cayley_neumann",
                "num_cayley_neumann_terms", "cayley_neumann_eps", "init_weights")} | {"fan_in_fan_out": False}

    @classmethod
    def from_peft(cls, peft: PeftPsoftConfig, config_file: Path) -> PsoftConfig:
        refuse_unsupported(peft, config_file, ())
        keys = {k: getattr(peft, k) for k in PsoftConfig.model_fields if k in PeftPsoftConfig.model_fields
                and k not in ("target_modules", "modules_to_save", "layers_to_transform", "layers_pattern",
                              "exclude_modules")}
        return PsoftConfig(method="psoft", **keys, target_modules=targets_from_peft(peft.target_modules, config_file),
                           modules_to_save=peft.modules_to_save or [], **filters_from_peft(peft, config_file))

    @classmethod
    def randomize(cls, layer: AdapterLayer, generator: torch.Generator, std: float) -> None:
        with torch.no_grad():  # Q (or R) moved by std, the scales around 1
            for name, p in layer.psoft_R.named_parameters():
                p.copy_((name != "weight" or not layer.own_facts.orth) + torch.randn(p.shape, generator=generator) * std)

    @classmethod
    def kept_for_backward(cls, cfg: PsoftConfig, layer: AdapterLayer) -> tuple[int, int]:
        # x A^T (fp32) per token for R's gradient, and with dropout its fp32 input and mask; R's own graph per layer.
        in_features = linear_shape(layer.base_layer)[0]
        return cfg.r + (2 * in_features if cfg.psoft_dropout else 0), 8 * cfg.r * cfg.r

    @classmethod
    def describe(cls, cfg: PsoftConfig) -> str:
        return f"PSOFT r={cfg.r}"


PsoftLinear.method = Psoft
