"""OSF, orthogonal subspace fine-tuning (Nayak et al. 2025, "Sculpting Subspaces: Constrained Full Fine-Tuning in
LLMs for Continual Learning", arXiv:2504.07097): each target's weight is split by its SVD into the top
`effective_rank` singular directions, frozen, and the rest, U_low diag(S_low) V_low, trained:

    W' = W + U_low diag(S_low) V_low - U0 diag(S0) V0,   (U0, S0, V0) the low part of the SVD of W (frozen),

and the gradients of U_low and V_low are projected away from the frozen directions (U_high, V_high), so that training
never moves the preserved subspace. U0, S0, V0 (and U_high, V_high) are not in the file: peft computes them again
from the base weight on loading (torch.linalg.svd of its fp32 copy), and so does peftkit; a merge of the file
(`peftkit merge`) takes them from the weight it merges into. Their product does not depend on the SVD's signs.

Names, shapes, defaults and init as HF peft 0.21's `OSFLayer`: `<path>.osf_svd_params.U_low` (out, t),
`.S_low` (t,), `.V_low` (t, in), t = min(out, in) - effective_rank; they start at the SVD's low part (the base model
exactly), or with init_weights false at N(0, 1) draws (torch.randn_like, U then S then V: one seed, peft's numbers).
peft keeps the trained factors and the SVD in the weight's dtype; peftkit in fp32 (for an fp32 base the same).
peft cannot unmerge OSF (it warns, and its model raises); peftkit's in-place merge keeps the weight before it and
unmerge puts it back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from peftkit.errors import PeftkitError
from peftkit.methods.base import Method, PeftConfigBase, draw_device, refuse_unsupported, targets_from_peft
from peftkit.methods.layer import AdapterLayer, KeptWeightLayer, is_quantized, linear_shape, not_a_linear
from peftkit.section import AdapterSection, TargetRegex

Rank = int | float

# peft 0.21's TRANSFORMERS_MODELS_TO_OSF_TARGET_MODULES_MAPPING; other models: all-linear (peft's fallback).
_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
OSF_TARGETS: dict[str, list[str]] = {m: _PROJ for m in (
    "llama", "llama4", "mistral", "mixtral", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3")}


class OsfConfig(AdapterSection):
    """OSF: each target's lower singular subspace trained, its top `effective_rank` directions frozen."""

    method: Literal["osf"]
    effective_rank: Rank | None = Field(None, ge=0)
    """Singular directions kept frozen per target (the trained rank is min(out, in) minus it); a float in (0, 1] is
    a fraction of min(out, in); null: half of it (peft's default)."""
    rank_pattern: dict[str, Rank] = Field(default_factory=dict)
    """Per-module effective_rank: the first regex found (re.search) in a module's path wins, as peft's."""
    init_weights: bool = True
    """true: the trained factors start at the SVD's low part (the base model); false (debugging, as peft): N(0, 1)."""
    target_modules: Literal["all-linear"] | list[str] | TargetRegex | None = None
    """As LoRA's; null: peft's default for the architecture (all seven projections of a Llama), else all-linear.
    nn.Linear layers only (GPT-2's Conv1D and 4-bit/8-bit layers are refused)."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full and saved whole (e.g. `lm_head`)."""


def resolve_rank(value: Rank | None, min_dim: int) -> int:
    """peft's _resolve_rank: None -> half; a float in (0, 1] -> that fraction (floored); else int; capped at min_dim."""
    if value is None:
        return max(min_dim // 2, 0)
    rank = int(min_dim * value) if isinstance(value, float) and 0 < value <= 1 else int(value)
    return max(min(min_dim, rank), 0)


def layer_rank(cfg: OsfConfig, path: str, min_dim: int) -> int:
    for pattern, rank in cfg.rank_pattern.items():
        if re.search(pattern, path):
            return resolve_rank(rank, min_dim)
    return resolve_rank(cfg.effective_rank, min_dim)


def split_svd(weight: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """The SVD of the (out, in) weight's fp32 copy split at k, as peft's decompose_weight_matrix."""
    u, s, vh = torch.linalg.svd(weight.detach().to(torch.float32), full_matrices=False)
    k = min(k, s.shape[0])
    return {"U_high": u[:, :k].contiguous(), "V_high": vh[:k].contiguous(),
            "U_low": u[:, k:].contiguous(), "S_low": s[k:].contiguous(), "V_low": vh[k:].contiguous()}


@dataclass(frozen=True)
class OsfFacts:
    init: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, compare=False)
    """A layer's (U0, S0, V0), from its unmerged weight (an unmerge cannot find them in the merged one); None: the
    merge of a file computes them from the weight it is given."""


def _low(parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return tuple(parts[f"osf_svd_params.{n}"].float() for n in ("U_low", "S_low", "V_low"))


def delta(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: OsfFacts) -> torch.Tensor:
    """U diag(S) V - U0 diag(S0) V0 (out, in), fp32, peft's get_delta_weight."""
    u, s, v = (t.to(weight.device) for t in _low(parts))
    if facts.init is None:
        if u.shape[0] != weight.shape[0] or v.shape[1] != weight.shape[1] or len(s) > min(weight.shape):
            raise PeftkitError(f"The adapter does not fit this model: its OSF factors are {tuple(u.shape)} and "
                               f"{tuple(v.shape)} for a weight of {tuple(weight.shape)}. It was trained on a "
                               "different base model.")
        svd = split_svd(weight, min(weight.shape) - len(s))
        u0, s0, v0 = svd["U_low"], svd["S_low"], svd["V_low"]
    else:
        u0, s0, v0 = (t.float().to(weight.device) for t in facts.init)
    # (in float64: the two products nearly cancel where little has trained; peft's fp32 difference is within 1e-6)
    u, s, v, u0, s0, v0 = (t.double() for t in (u, s, v, u0, s0, v0))
    return (torch.mm(u * s.unsqueeze(0), v) - torch.mm(u0 * s0.unsqueeze(0), v0)).float()


def unsupported(path: str, kind: str) -> PeftkitError:
    return PeftkitError(
        f"adapter.target_modules: '{path}' is {kind}; OSF adapts nn.Linear layers only, as peft 0.21's OSF (which "
        "splits the plain weight's SVD again on loading). Target Linear layers (all-linear does, but on GPT-2's "
        "Conv1D), or use adapter.method: lora for this model.")


def refuse_quantized(path: str) -> PeftkitError:
    return PeftkitError(
        f"adapter.target_modules: '{path}' is a 4-bit/8-bit (bitsandbytes) layer; OSF trains a part of the SVD of "
        "the base weight, which peft 0.21 computes from the plain weight (a quantized one has none it can split), so "
        "an adapter trained on it would not be the adapter peft or a merge applies. Load the model unquantized "
        "(remove the recipe's quantization section), or use adapter.method: lora for QLoRA.")


class OsfParams(nn.Module):
    """The trained factors under peft's names (`osf_svd_params.U_low`, `.S_low`, `.V_low` in the file)."""

    def __init__(self, svd: dict[str, torch.Tensor], random: bool, device: torch.device) -> None:
        super().__init__()
        for name in ("U_low", "S_low", "V_low"):
            start = torch.randn(svd[name].shape, device=draw_device(device)) if random else svd[name]
            setattr(self, name, nn.Parameter(start.to(device)))


class OsfLinear(KeptWeightLayer):
    """OSF around nn.Linear: base output + (x V^T) (U S)^T - (x V0^T) (U0 S0)^T, in fp32 as one rank-2t product (peft's
    forward), with the gradients of U and V projected off the frozen subspace (peft's hooks)."""

    def __init__(self, base_layer: nn.Module, cfg: OsfConfig, path: str) -> None:
        super().__init__(base_layer)
        in_features, out_features = linear_shape(base_layer)
        k = layer_rank(cfg, path, min(in_features, out_features))
        if k <= 0:
            raise PeftkitError(f"adapter.effective_rank: '{path}' ({out_features} x {in_features}) would keep {k} "
                               "singular directions frozen (peft refuses a rank of 0 too); give a positive "
                               "effective_rank, or leave this layer out of target_modules.")
        weight = base_layer.weight
        if weight.device.type == "meta":  # (the memory estimate: shapes only)
            t = min(in_features, out_features) - k
            svd = {"U_high": torch.empty(out_features, k, device="meta"), "V_high": torch.empty(k, in_features,
                   device="meta"), "U_low": torch.empty(out_features, t, device="meta"),
                   "S_low": torch.empty(t, device="meta"), "V_low": torch.empty(t, in_features, device="meta")}
        else:
            with torch.no_grad():
                svd = split_svd(weight, k)
        self.osf_svd_params = OsfParams(svd, not cfg.init_weights, weight.device)
        for name in ("U_low", "S_low", "V_low"):  # (not in the file: peft computes them again)
            self.register_buffer(f"osf_{name}_init", svd[name].clone(), persistent=False)
        # peft projects with U_high (V_high) only where the factor is not square; else with U0 U0^T (V0^T V0)
        self.register_buffer("osf_U_high", svd["U_high"] if out_features > in_features else None, persistent=False)
        self.register_buffer("osf_V_high", svd["V_high"] if out_features < in_features else None, persistent=False)

    @property
    def facts(self) -> OsfFacts:
        return OsfFacts((self.osf_U_low_init, self.osf_S_low_init, self.osf_V_low_init))

    def _project_u(self, grad: torch.Tensor) -> torch.Tensor:
        if self.osf_U_high is not None:
            return grad - self.osf_U_high @ (self.osf_U_high.T @ grad)
        return self.osf_U_low_init @ (self.osf_U_low_init.T @ grad)

    def _project_v(self, grad: torch.Tensor) -> torch.Tensor:
        if self.osf_V_high is not None:
            return grad - (grad @ self.osf_V_high.T) @ self.osf_V_high
        return (grad @ self.osf_V_low_init.T) @ self.osf_V_low_init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        p = self.osf_svd_params
        u, v = p.U_low, p.V_low
        if u.requires_grad and torch.is_grad_enabled():  # (a view: the hook follows the layer through deepcopy)
            u, v = u.view_as(u), v.view_as(v)
            u.register_hook(self._project_u)
            v.register_hook(self._project_v)
        a = torch.cat([u * p.S_low.unsqueeze(0), -(self.osf_U_low_init * self.osf_S_low_init.unsqueeze(0))], dim=1)
        b = torch.cat([v, self.osf_V_low_init], dim=0)
        update = F.linear(F.linear(x.to(a.dtype), b), a)
        return result + update.to(result.dtype)


class PeftOsfConfig(PeftConfigBase):
    """The fields of an OSF adapter_config.json that peftkit reads (defaults: peft 0.21's OSFConfig)."""

    effective_rank: Rank | None = Field(None, ge=0)
    rank_pattern: dict[str, Rank] | None = None
    init_weights: bool | None = True
    target_svd_config: dict[str, int] | None = None  # (peft ignores it)


class Osf(Method):
    name = "osf"
    title = "OSF"
    peft_type = "OSF"
    config = OsfConfig
    peft_config = PeftOsfConfig
    param_names = ("osf_svd_params.U_low", "osf_svd_params.S_low", "osf_svd_params.V_low")
    rank_dims = {"osf_svd_params.U_low": 1, "osf_svd_params.S_low": 0, "osf_svd_params.V_low": 0,
                 "U_low": 1, "S_low": 0, "V_low": 0}

    @classmethod
    def resolve(cls, cfg: OsfConfig, model_type: str | None) -> OsfConfig:
        if cfg.target_modules is not None:
            return cfg
        return cfg.model_copy(update={"target_modules": OSF_TARGETS.get(model_type or "", "all-linear")})

    @classmethod
    def wrap(cls, base: nn.Module, cfg: OsfConfig, path: str) -> OsfLinear:
        if kind := not_a_linear(base):
            raise unsupported(path, kind)
        if is_quantized(base):
            raise refuse_quantized(path)
        return OsfLinear(base, cfg, path)

    @classmethod
    def layer_facts(cls, cfg: OsfConfig, path: str, fan_in_fan_out: bool) -> OsfFacts:
        if fan_in_fan_out:
            raise unsupported(path, "GPT-2's Conv1D")
        return OsfFacts()

    @staticmethod
    def merge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: OsfFacts) -> torch.Tensor:
        return weight + delta(weight, parts, facts)

    @staticmethod
    def unmerge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: OsfFacts) -> torch.Tensor:
        return weight - delta(weight, parts, facts)  # (the layer's facts hold the unmerged weight's SVD)

    @staticmethod
    def update_shape(parts: dict[str, torch.Tensor], facts: OsfFacts) -> tuple[int | None, ...]:
        u, v = parts["osf_svd_params.U_low"], parts["osf_svd_params.V_low"]
        return u.shape[0], v.shape[1]

    @classmethod
    def to_peft(cls, cfg: OsfConfig, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        return cls.peft_common(cfg, targets, base_name) | {
            "effective_rank": cfg.effective_rank, "rank_pattern": dict(cfg.rank_pattern) or None,
            "init_weights": cfg.init_weights, "target_svd_config": None}

    @classmethod
    def from_peft(cls, peft: PeftOsfConfig, config_file: Path) -> OsfConfig:
        refuse_unsupported(peft, config_file, ())
        return OsfConfig(method="osf", effective_rank=peft.effective_rank, rank_pattern=peft.rank_pattern or {},
                         init_weights=peft.init_weights is not False,
                         target_modules=targets_from_peft(peft.target_modules, config_file),
                         modules_to_save=peft.modules_to_save or [])

    @classmethod
    def kept_for_backward(cls, cfg: OsfConfig, layer: AdapterLayer) -> tuple[int, int]:
        # The fp32 input and x B^T (2t) per token; the two concatenated factors per layer.
        in_features, out_features = linear_shape(layer.base_layer)
        t = len(layer.osf_svd_params.S_low)
        return in_features + 2 * t, 2 * t * (in_features + out_features)

    @classmethod
    def describe(cls, cfg: OsfConfig) -> str:
        return f"OSF effective_rank={cfg.effective_rank}"


OsfLinear.method = Osf
