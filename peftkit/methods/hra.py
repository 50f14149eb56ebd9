"""HRA, Householder reflection adaptation (Yuan et al. 2024, arXiv:2405.17484): the frozen weight is multiplied by
a chain of r trained Householder reflections, W' = W H with H = (I - 2 u_1 u_1^T) ... (I - 2 u_r u_r^T), each u_i a
column of `hra_u` (in, r) scaled to unit length. With `apply_GS` the columns are first made orthonormal by
Gram-Schmidt (q_i), and H = I - 2 Q Q^T. H is orthogonal: it rotates the layer's input, y = W (H x) + b; merged,
W' = W H, and the bias is left alone. Unmerged with H^T (its inverse; peft multiplies the reflections in reverse).

peft builds H as an (in, in) matrix and W H as an (out, in) one at every forward. Here the chain is held in compact
WY form, H = I - U T U^T (Schreiber and Van Loan 1989), T the inverse of the upper-triangular 1/2 I + triu(U^T U, 1)
(r x r; T = 2 I for the orthonormal Q), and the forward rotates the input, x H^T = x - ((x U) T^T) U^T: r numbers
per token on top of the input, no (in, in) matrix, and any base layer (4-bit and 8-bit too) runs unchanged.

Names, shapes and init as HF peft 0.21: `<path>.hra_u`, (in_features, r). peft starts with the columns in equal
pairs (r / 2 drawn, kaiming-uniform, each repeated): two equal reflections cancel, so H = I, the base model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.methods.base import Method, draw_device, refuse_unsupported, targets_from_peft
from peftkit.methods.layer import AdapterLayer, linear_shape, not_a_linear
from peftkit.methods.target_filters import (ExcludedTargets, LayerTargets, PeftExcludedTargets, PeftLayerTargets,
                                             filters_from_peft)
from peftkit.section import TargetRegex


class HraConfig(LayerTargets, ExcludedTargets):
    """HRA: a trained chain of Householder reflections of each target layer's input."""

    method: Literal["hra"]
    r: int = Field(8, ge=1)
    """Reflections per layer: r x in_features trained numbers. Even, so that the layer starts at the base model
    (reflections in equal pairs); with apply_GS any r."""
    apply_GS: bool = False  # (peft's name)
    """Gram-Schmidt the reflection vectors into an orthonormal set, H = I - 2 Q Q^T (never the identity: such an
    adapter starts away from the base model)."""
    target_modules: Literal["all-linear"] | list[str] | TargetRegex = "all-linear"
    """As LoRA's: `all-linear`, module-name suffixes, or {regex: ...}. nn.Linear and 4-bit/8-bit layers only."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full and saved whole (e.g. `lm_head`)."""


@dataclass(frozen=True)
class HraFacts:
    """What a merge needs beyond `hra_u`: whether the vectors are Gram-Schmidt'ed (r and in come from the tensor)."""

    apply_GS: bool = False


def gram_schmidt(u: torch.Tensor) -> torch.Tensor:
    """The columns of `u` made orthonormal, in order, by modified Gram-Schmidt, as peft does it (a column that lies in
    the span of the earlier ones has no direction left: NaN, as in peft)."""
    columns = [u[:, 0] / u[:, 0].norm()]
    for i in range(1, u.shape[1]):
        column = u[:, i]
        for q in columns:
            column = column - (q @ column) * q
        columns.append(column / column.norm())
    return torch.stack(columns, dim=1)


def householder_factors(u: torch.Tensor, facts: HraFacts) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, T) with H = I - U T U^T, the product of the layer's reflections, from `hra_u` (fp32, keeps gradients)."""
    r = u.shape[1]
    eye = torch.eye(r, device=u.device, dtype=u.dtype)
    if facts.apply_GS:
        return gram_schmidt(u), 2 * eye
    unit = u / u.norm(dim=0)
    # (I - 2 u_1 u_1^T) ... (I - 2 u_r u_r^T) = I - U T U^T with T^-1 = 1/2 I + the strict upper triangle of U^T U
    # (checked against the product in tests/test_hra.py; r x r, solved once per forward).
    inverse = 0.5 * eye + torch.triu(unit.T @ unit, diagonal=1)
    return unit, torch.linalg.solve_triangular(inverse, eye, upper=True)


def reflect_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: HraFacts,
                   inverse: bool = False) -> torch.Tensor:
    """W H for an (out, in) weight; with `inverse`, W H^T (H is orthogonal)."""
    u = parts["hra_u"].float().to(weight.device)
    if u.shape[0] != weight.shape[1]:
        raise PeftkitError(f"The adapter does not fit this model: its HRA vectors have {u.shape[0]} entries for a "
                           f"layer with {weight.shape[1]} inputs. It was trained on a different base model.")
    vectors, t = householder_factors(u, facts)
    return weight - (weight @ vectors) @ (t.T if inverse else t) @ vectors.T


def check_orthonormal_room(cfg: HraConfig, path: str, in_features: int) -> None:
    """apply_GS makes the r vectors orthonormal in the layer's input space: with r equal to its size they span all of
    it, so H = I - 2 Q Q^T is -I whatever they are (their gradients are zero: nothing trains); past it, the vectors
    Gram-Schmidt leaves nothing of are rounding noise scaled to unit length, and H is no reflection (peft computes both
    without a word). Refused for a recipe, naming the layer (`Hra.select_targets`), and for a run that trains on from
    such an adapter (`Hra.trainer`), whose settings are the adapter's."""
    if cfg.apply_GS and cfg.r >= in_features:
        what = ("they would span all of them, so H is -I whatever they are and nothing trains" if cfg.r == in_features
                else f"past {in_features}, Gram-Schmidt leaves rounding noise to scale to unit length, and H is no "
                     "longer orthogonal")
        if cfg.init_from:
            raise PeftkitError(
                f"adapter.init_from: {cfg.init_from} is an HRA adapter of r {cfg.r} with apply_GS, which makes "
                f"{cfg.r} orthonormal vectors of the {in_features} inputs of '{path}': {what}, so a run cannot train "
                "on from it (peftkit eval and merge take it as peft computes it). Start from an adapter with r below "
                f"{in_features} or apply_GS false, or train a fresh adapter.")
        raise PeftkitError(
            f"adapter.r: {cfg.r} with apply_GS makes {cfg.r} orthonormal vectors of the {in_features} inputs of "
            f"'{path}': {what}. Set r below {in_features} (or leave this layer out of target_modules), or set "
            "apply_GS: false (a chain of reflections takes any r).")


def unsupported(path: str, kind: str) -> PeftkitError:
    return PeftkitError(
        f"adapter.target_modules: '{path}' is {kind}; HRA reflects the input of nn.Linear (and 4-bit/8-bit) layers "
        "only, as peft 0.21's HRA, which could not load the adapter otherwise. Target Linear layers, or use LoRA for "
        "this model."
    )


class HraLinear(AdapterLayer):
    """HRA around nn.Linear or a bitsandbytes linear layer: the input is reflected, then the base layer runs."""

    def __init__(self, base_layer: nn.Module, cfg: HraConfig) -> None:
        super().__init__(base_layer)
        in_features, _ = linear_shape(base_layer)
        self.facts = HraFacts(cfg.apply_GS)
        u = torch.zeros(in_features, cfg.r, device=draw_device(base_layer.weight.device), dtype=torch.float32)
        if cfg.r % 2 or cfg.apply_GS:
            # peft's draw for an odd r (with a warning); with apply_GS, equal pairs would Gram-Schmidt to rounding
            # noise (peft's start there is wherever that noise points, or NaN), so the columns are drawn apart.
            nn.init.kaiming_uniform_(u, a=math.sqrt(5))
        else:
            half = torch.zeros(in_features, cfg.r // 2, device=u.device, dtype=torch.float32)
            nn.init.kaiming_uniform_(half, a=math.sqrt(5))  # peft's draw, from torch's global generator
            u = torch.repeat_interleave(half, 2, dim=1)
        self.hra_u = nn.Parameter(u.to(base_layer.weight.device))  # PEFT's key `hra_u`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        vectors, t = householder_factors(self.hra_u, self.facts)
        inputs = x.to(vectors.dtype)
        reflected = inputs - (inputs @ vectors) @ t.T @ vectors.T  # x H^T: the row form of H x
        return self.base_layer(reflected.to(x.dtype))


class PeftHraConfig(PeftLayerTargets, PeftExcludedTargets):
    """The fields of an HRA adapter_config.json that peftkit reads (defaults: peft 0.21's HRAConfig)."""

    r: int = Field(8, ge=1)
    apply_GS: bool = False
    # Features peftkit does not implement: a value here is refused rather than silently ignored.
    bias: str = "none"


class Hra(Method):
    name = "hra"
    title = "HRA"
    peft_type = "HRA"
    config = HraConfig
    peft_config = PeftHraConfig
    param_names = ("hra_u",)
    rank_dims = {"hra_u": 1}

    @classmethod
    def recipe_conflict(cls, recipe: Any) -> str | None:
        cfg = recipe.adapter
        if cfg.r % 2 and not cfg.apply_GS and not cfg.init_from:
            return (f"adapter.r: {cfg.r} is odd; HRA starts at the base model by pairing equal reflections, which "
                    f"needs an even r (peft warns and starts from {cfg.r} random reflections). Set r: {cfg.r + 1}")
        return None

    @classmethod
    def select_targets(cls, model: nn.Module, cfg: HraConfig, every_entry: bool) -> list[str]:
        """The default selection; a recipe's (`every_entry`) r is checked against each layer's inputs here, not in
        `wrap`: a saved adapter with r at or past them is what peft loads and computes, and is loaded as it is."""
        names = super().select_targets(model, cfg, every_entry)
        for path in names if every_entry else []:
            module = model.get_submodule(path)
            if not_a_linear(module) is None:  # (`wrap` refuses the others)
                check_orthonormal_room(cfg, path, linear_shape(module)[0])
        return names

    @classmethod
    def check_run(cls, model: nn.Module, cfg: HraConfig) -> None:
        """A run from adapter.init_from (whose targets `select_targets` leaves unchecked, as any saved adapter's) is
        refused where the adapter's r and apply_GS leave nothing to train: it trained on without a word."""
        from peftkit.adapters import adapter_layers  # (peftkit.adapters imports the methods)

        for path, layer in adapter_layers(model).items():
            if isinstance(layer, HraLinear):
                check_orthonormal_room(cfg, path, linear_shape(layer.base_layer)[0])

    @classmethod
    def wrap(cls, base: nn.Module, cfg: HraConfig, path: str) -> HraLinear:
        if kind := not_a_linear(base):
            raise unsupported(path, kind)
        return HraLinear(base, cfg)

    @classmethod
    def layer_facts(cls, cfg: HraConfig, path: str, fan_in_fan_out: bool) -> HraFacts:
        if fan_in_fan_out:
            raise unsupported(path, "GPT-2's Conv1D")
        return HraFacts(cfg.apply_GS)

    @staticmethod
    def merge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: HraFacts) -> torch.Tensor:
        return reflect_weight(weight, parts, facts)

    @staticmethod
    def unmerge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: HraFacts) -> torch.Tensor:
        return reflect_weight(weight, parts, facts, inverse=True)

    @staticmethod
    def update_shape(parts: dict[str, torch.Tensor], facts: HraFacts) -> tuple[int | None, ...]:
        return None, parts["hra_u"].shape[0]

    @classmethod
    def to_peft(cls, cfg: HraConfig, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        return cls.peft_common(cfg, targets, base_name) | {
            "r": cfg.r,
            "apply_GS": cfg.apply_GS,
            "bias": "none",
            # Whether the vectors started in equal pairs (peft's init_weights) or apart (an odd r, apply_GS).
            "init_weights": not (cfg.r % 2 or cfg.apply_GS),
        }

    @classmethod
    def from_peft(cls, peft: PeftHraConfig, config_file: Path) -> HraConfig:
        refuse_unsupported(peft, config_file, ())  # (its bias)
        return HraConfig(method="hra", r=peft.r, apply_GS=peft.apply_GS,
                         target_modules=targets_from_peft(peft.target_modules, config_file),
                         modules_to_save=peft.modules_to_save or [], **filters_from_peft(peft, config_file))

    @classmethod
    def kept_for_backward(cls, cfg: HraConfig, layer: AdapterLayer) -> tuple[int, int]:
        # The vectors' gradient needs the layer's input, x U and (x U) T^T, per token.
        return linear_shape(layer.base_layer)[0] + 2 * cfg.r, 0

    @classmethod
    def describe(cls, cfg: HraConfig) -> str:
        return f"HRA r={cfg.r}" + (", Gram-Schmidt" if cfg.apply_GS else "")


HraLinear.method = Hra
