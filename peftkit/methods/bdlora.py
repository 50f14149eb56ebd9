"""Block-diagonal LoRA (BD-LoRA, peft's `use_bdlora`): LoRA whose A or B factor is block-diagonal in `nblocks` blocks,
so that a tensor-parallel server sharding the layer `nblocks` ways needs no communication for the adapter (a
row-sharded layer, o_proj and down_proj, takes a block-diagonal A; a column-sharded one, q/k/v, gate and up, a
block-diagonal B).

`adapter.use_bdlora` is `{target_modules_bd_a: [...], target_modules_bd_b: [...], nblocks: N, match_strict: true}`;
a target whose path contains an entry of a list gets that factor block-diagonal (peft's substring rule), and with
match_strict every target must get one. A block-diagonal factor holds its blocks stacked, as peft saves them: A
(r, in / N), B (out, r / N); the full factor is `torch.block_diag` of its N row blocks.

As peft: Linear layers only, and not with DoRA, aLoRA or lora_bias.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.methods.base import PeftConfigBase
from peftkit.section import AdapterSection, Section


class BdLoraSettings(Section):
    """Which factor is block-diagonal where, and in how many blocks (peft's BdLoraConfig)."""

    target_modules_bd_a: list[str] | None = None
    """Targets (a substring of the module path) whose LoRA A is block-diagonal: row-sharded layers (o_proj,
    down_proj)."""
    target_modules_bd_b: list[str] | None = None
    """Targets whose LoRA B is block-diagonal: column-sharded layers (q/k/v_proj, gate_proj, up_proj)."""
    nblocks: int = Field(1, ge=1)
    """Blocks per block-diagonal factor: the tensor-parallel degree the adapter is served at."""
    match_strict: bool = True
    """Every target must match one of the two lists."""

    @model_validator(mode="after")
    def _disjoint(self) -> BdLoraSettings:
        if both := set(self.target_modules_bd_a or []) & set(self.target_modules_bd_b or []):
            raise ValueError(f"use_bdlora: {sorted(both)} are in both target_modules_bd_a and target_modules_bd_b; "
                             "a target has one block-diagonal factor")
        return self


class PeftBdLora(BaseModel):
    """adapter_config.json's use_bdlora, read as peft reads it: unknown keys dropped, a null match_strict false."""

    model_config = ConfigDict(extra="ignore")

    target_modules_bd_a: list[str] | None = None
    target_modules_bd_b: list[str] | None = None
    nblocks: int = Field(1, ge=1)
    match_strict: bool | None = True


class PeftBlockDiagonal(PeftConfigBase):
    """adapter_config.json's use_bdlora."""

    use_bdlora: PeftBdLora | None = None

    def bdlora_settings(self) -> dict[str, Any]:
        if self.use_bdlora is None:
            return {}
        return {"use_bdlora": BdLoraSettings(**self.use_bdlora.model_dump() | {
            "match_strict": bool(self.use_bdlora.match_strict)})}


class BlockDiagonalLora(AdapterSection):
    """The `adapter` key of BD-LoRA."""

    use_bdlora: BdLoraSettings | None = None
    """BD-LoRA: which targets get a block-diagonal A or B, and in how many blocks (for tensor-parallel serving)."""


def block_side(settings: BdLoraSettings, path: str) -> str | None:
    """"A" or "B", the factor of the target at `path` that is block-diagonal, or None (peft's substring rule)."""
    a = any(p in path for p in settings.target_modules_bd_a or [])
    b = any(p in path for p in settings.target_modules_bd_b or [])
    if a and b:
        raise PeftkitError(f"adapter.use_bdlora: '{path}' matches both target_modules_bd_a and target_modules_bd_b.")
    if settings.match_strict and not (a or b):
        raise PeftkitError(f"adapter.use_bdlora: target '{path}' matches neither target_modules_bd_a nor "
                           "target_modules_bd_b; add it to one, or set use_bdlora.match_strict: false.")
    return "A" if a else "B" if b else None


class BlockDiagonal(nn.Module):
    """A Linear without bias whose weight is block-diagonal in `nblocks` blocks, held as the blocks stacked,
    (out, in / nblocks): peft's BlockDiagonalLinear (its key `weight`)."""

    bias = None

    def __init__(self, in_features: int, out_features: int, nblocks: int, zero: bool, device=None) -> None:
        super().__init__()
        if in_features % nblocks or out_features % nblocks:
            raise PeftkitError(f"adapter.use_bdlora: nblocks {nblocks} does not divide a block-diagonal factor of "
                               f"{out_features} x {in_features} (the rank r and the layers' widths must be multiples "
                               "of it); choose an nblocks that divides r (and rank_pattern's ranks) and the widths.")
        self.nblocks = nblocks
        self.weight = nn.Parameter(torch.empty(out_features, in_features // nblocks, device=device,
                                               dtype=torch.float32))
        if zero:
            nn.init.zeros_(self.weight)
        else:
            nn.init.kaiming_uniform_(self.weight)  # (a = 0: peft's, where plain LoRA's A takes sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = self.weight.view(self.nblocks, -1, self.weight.shape[1])  # (nb, out / nb, in / nb)
        parts = x.reshape(*x.shape[:-1], self.nblocks, -1)  # (..., nb, in / nb)
        return torch.einsum("...im,inm->...in", parts, blocks).reshape(*x.shape[:-1], -1)


def full_factor(weight: torch.Tensor, nblocks: int) -> torch.Tensor:
    """The block-diagonal matrix of a factor held as its `nblocks` row blocks stacked."""
    return torch.block_diag(*weight.chunk(nblocks, dim=0)) if nblocks > 1 else weight


def bdlora_conflict(cfg: Any) -> str | None:
    """Why LoRA settings cannot go with use_bdlora, or None."""
    if cfg.use_bdlora is None:
        return None
    for key, bad, why in (
            ("use_dora", cfg.use_dora, "peft refuses it"),
            ("alora_invocation_tokens", bool(cfg.alora_invocation_tokens), "peft refuses it"),
            ("target_parameters", bool(cfg.target_parameters), "peft refuses it"),
            ("lora_bias", cfg.lora_bias, "peft drops the bias of a block-diagonal B without a word"),
            (f"init: {cfg.init}", cfg.init != "default",
             "peft draws the block-diagonal factor its own way whatever the init, and pissa/olora then start away "
             "from the base")):
        if bad:
            return (f"adapter.use_bdlora with {key} is not supported ({why}); remove {key.split(':')[0]}, or "
                    "use_bdlora")
    return None
