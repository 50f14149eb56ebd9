"""BOFT, butterfly orthogonal finetuning (Liu et al. 2024, arXiv:2311.06243): the layer's input is rotated by a
product of m block-diagonal orthogonal matrices, each conjugated by a butterfly permutation, M = P_m B_m P_m^T ...
P_1 B_1 P_1^T, and the output (before the bias) is scaled by a trained vector s: y = s * (W M^T x) + b. Merged,
W' = s * (W M^T) row by row, the bias left alone. Each block of B_i is the exact Cayley transform of the
skew-symmetric part S of a trained square block, (I - S)(I + S)^-1 (peft's `cayley_batch`); they start at zero and s at
one: the base model. With one factor (m = 1, peft's default) P is the identity and BOFT is a block-diagonal OFT.

Names, shapes and numerics as HF peft 0.21's pure-PyTorch path: `<path>.boft_R` (m, blocks, b, b) and `<path>.boft_s`
(out, 1). The permutations follow from those shapes (peft's `block_butterfly_perm`), so a merge needs no per-layer fact.
peft builds M as an (in, in) matrix every forward; here each factor permutes, rotates block by block and permutes back
the input itself. (peft without its CUDA extension silently trains one factor whatever the setting; peftkit computes m.)
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from peftkit.errors import PeftkitError, PeftkitWarning
from peftkit.methods.base import Method, draw_device, refuse_unsupported, targets_from_peft
from peftkit.methods.layer import AdapterLayer, linear_shape, not_a_linear
from peftkit.methods.target_filters import (ExcludedTargets, LayerTargets, PeftExcludedTargets, PeftLayerTargets,
                                             filters_from_peft)
from peftkit.section import TargetRegex


class BoftConfig(LayerTargets, ExcludedTargets):
    """BOFT: a trained product of butterfly-permuted block-diagonal rotations of each target's input, and a scale."""

    method: Literal["boft"]
    boft_block_size: int = Field(4, ge=0)
    """Size b of each rotation block (b x b trained numbers per block); must divide every target's input size. Defaults
    to 0 when `boft_block_num` is set (exactly one of the two is nonzero)."""
    boft_block_num: int = Field(0, ge=0)
    """Instead of the block size: blocks per layer (block size = input size / blocks)."""
    boft_n_butterfly_factor: int = Field(1, ge=1)
    """Butterfly factors m: 1 is block-diagonal OFT; each more doubles how far a block's rotation reaches."""
    boft_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """In training, this fraction of the blocks of one random factor is the identity at each step (peft's)."""
    target_modules: Literal["all-linear"] | list[str] | TargetRegex = "all-linear"
    """As LoRA's: `all-linear`, module-name suffixes, or {regex: ...}. nn.Linear and 4-bit/8-bit layers only."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full and saved whole (e.g. `lm_head`)."""

    @model_validator(mode="before")
    @classmethod
    def _num_replaces_size(cls, data: Any) -> Any:
        # `boft_block_num: 8` alone means "8 blocks", not "8 blocks of 4" (which peft refuses).
        num = data.get("boft_block_num") if isinstance(data, dict) else None
        if num not in (None, 0, "0") and "boft_block_size" not in data:
            return {**data, "boft_block_size": 0}
        return data

    @model_validator(mode="after")
    def _one_size(self) -> BoftConfig:
        if (self.boft_block_size == 0) == (self.boft_block_num == 0):
            raise ValueError(f"boft_block_size is {self.boft_block_size} and boft_block_num is {self.boft_block_num}; "
                             "BOFT takes exactly one of them (blocks x size = in_features): set one, leave the other "
                             "out")
        return self


def layer_blocks(cfg: BoftConfig, in_features: int, path: str) -> tuple[int, int]:
    """(blocks, block size) of the layer at `path`, with peft's checks, as a PeftkitError naming the keys."""
    key = "boft_block_num" if cfg.boft_block_num else "boft_block_size"
    value = getattr(cfg, key)
    if in_features % value:
        raise PeftkitError(f"adapter.{key}: {value} does not divide the {in_features} input features of '{path}' (peft "
                           "refuses it too). Choose a value that divides the input size of every target.")
    blocks, size = (value, in_features // value) if cfg.boft_block_num else (in_features // value, value)
    extra = cfg.boft_n_butterfly_factor - 1
    if extra and (blocks % 2 ** extra or size % 2 or blocks % 2):
        raise PeftkitError(
            f"adapter.boft_n_butterfly_factor: {cfg.boft_n_butterfly_factor} factors need an even block size and a "
            f"block count divisible by {2 ** extra} (as peft), and '{path}' has {blocks} blocks of {size}. Use fewer "
            "factors, or other block sizes.")
    return blocks, size


def butterfly_perm(n: int, blocks: int, half: int, extra: int) -> list[int]:
    """peft's `block_butterfly_perm(n, blocks, half, extra)`: within each of `blocks` groups, the chunks of `half`
    features in even positions first, then the odd ones (the identity without extra factors). Plain integers: no
    tensor value is read on the host."""
    if extra == 0:
        return list(range(n))
    group = n // blocks
    chunks = [list(range(c, c + half)) for c in range(0, group, half)]
    within = [j for chunk in chunks[0::2] + chunks[1::2] for j in chunk]
    return [start + j for start in range(0, n, group) for j in within]


def permutations(m: int, blocks: int, b: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(perm, its inverse) of each of the m factors of a layer of `blocks` blocks of b."""
    perms = []
    for i in range(m):
        perm = butterfly_perm(blocks * b, blocks // 2 ** i, b // 2, m - 1)
        inverse = [0] * len(perm)
        for position, j in enumerate(perm):
            inverse[j] = position
        perms.append((torch.tensor(perm, device=device), torch.tensor(inverse, device=device)))
    return perms


def cayley(boft_r: torch.Tensor) -> torch.Tensor:
    """(m, blocks, b, b) rotations (I - S)(I + S)^-1 of S = (R - R^T) / 2, fp32 (peft's `cayley_batch`).

    `solve_ex`, not `solve`: I + S is never singular (a skew-symmetric S has imaginary eigenvalues), and `solve`'s
    check for a singular matrix reads its result on the host, which on a GPU stopped every training forward of
    every BOFT layer until all the work queued before it had run."""
    r = boft_r.float()
    skew = 0.5 * (r - r.transpose(-2, -1))
    eye = torch.eye(r.shape[-1], device=r.device, dtype=r.dtype).expand_as(r)
    return torch.linalg.solve_ex(eye + skew, eye - skew, left=False)[0]


def rotate(x: torch.Tensor, rotations: torch.Tensor, perms: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """x M for rows x (..., in), M = P_m B_m P_m^T ... P_1 B_1 P_1^T: the last factor acts first."""
    _, blocks, b, _ = rotations.shape
    for i in reversed(range(len(perms))):
        perm, inverse = perms[i]
        rows = x[..., inverse].unflatten(-1, (blocks, b))  # x P_i
        x = torch.einsum("...dk,dkc->...dc", rows, rotations[i]).flatten(-2)[..., perm]  # (x P_i B_i) P_i^T
    return x


def block_dropout(rotations: torch.Tensor, p: float) -> torch.Tensor:
    """int(p * blocks) random blocks of one random factor made the identity (peft's MultiplicativeDropoutLayer).
    Drawn where the rotations are (the draws a CPU run made before): indices drawn on the CPU (and `.item()`) made a
    GPU run copy them to the device in every training forward, a copy that waits for all the work queued before it."""
    m, blocks, b, _ = rotations.shape
    device = rotations.device
    mask = torch.zeros(m, blocks, 1, 1, device=device, dtype=rotations.dtype)
    mask[torch.randint(0, m, (1,), device=device), torch.randperm(blocks, device=device)[: int(p * blocks)]] = 1
    return (1 - mask) * rotations + mask * torch.eye(b, device=rotations.device, dtype=rotations.dtype)


def butterfly_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], inverse: bool = False) -> torch.Tensor:
    """s * (W M^T) for an (out, in) weight, row i scaled by s_i; with `inverse`, (W / s) M (M is orthogonal)."""
    rotations, s = cayley(parts["boft_R"].to(weight.device)), parts["boft_s"].float().to(weight.device)
    m, blocks, b, _ = rotations.shape
    if weight.shape != (s.shape[0], blocks * b):
        raise PeftkitError(f"The adapter does not fit this model: its BOFT blocks cover {blocks * b} inputs and its "
                           f"scale {s.shape[0]} outputs, for a layer of {tuple(weight.shape)}. It was trained on a "
                           "different base model.")
    matrix = rotate(torch.eye(blocks * b, device=weight.device), rotations,
                    permutations(m, blocks, b, weight.device))  # M (in, in)
    if inverse:
        if (s == 0).any():
            raise PeftkitError("Cannot unmerge a BOFT layer with a scale of exactly 0: the merge erased those weights. "
                               "Reload the base model instead.")
        return (weight / s) @ matrix
    return (weight @ matrix.T) * s


def saved_factors(factors: int, config_file: Path) -> int:
    """The butterfly factors the weights next to `config_file` hold: peft without its CUDA extension trains one whatever
    its config says (and saves that config), and loads such a file as one factor; so does peftkit, with a warning."""
    weights = config_file.parent / "adapter_model.safetensors"
    if factors == 1 or not weights.is_file():
        return factors
    from safetensors import safe_open

    with safe_open(weights, framework="pt") as f:
        key = next((k for k in f.keys() if k.endswith(".boft_R")), None)
        held = f.get_slice(key).get_shape()[0] if key else factors
    if held == 1:
        warnings.warn(f"{config_file}: boft_n_butterfly_factor is {factors}, but the weights hold 1 factor: peft "
                      "trained them without its CUDA extension, which silently uses one. Loaded as one factor, as peft "
                      "loads it there (a peft with the extension cannot load this file).", PeftkitWarning, stacklevel=2)
    return held


def unsupported(path: str, kind: str) -> PeftkitError:
    return PeftkitError(f"adapter.target_modules: '{path}' is {kind}; BOFT rotates the input of nn.Linear (and 4-bit/"
                        "8-bit) layers only, as peft 0.21's BOFT, which could not load the adapter otherwise. Target "
                        "Linear layers, or use LoRA for this model.")


class BoftLinear(AdapterLayer):
    """BOFT around nn.Linear or a bitsandbytes linear layer: the input rotated, the base layer, the output scaled."""

    def __init__(self, base_layer: nn.Module, cfg: BoftConfig, path: str) -> None:
        super().__init__(base_layer)
        in_features, out_features = linear_shape(base_layer)
        blocks, size = layer_blocks(cfg, in_features, path)
        self.dropout, self.facts = cfg.boft_dropout, None
        device = draw_device(base_layer.weight.device)
        # Zero blocks (R = I) and a unit scale: the base model (peft's init_weights=True). PEFT's keys.
        shape = (cfg.boft_n_butterfly_factor, blocks, size, size)
        self.boft_R = nn.Parameter(torch.zeros(shape, device=device).to(base_layer.weight.device))
        self.boft_s = nn.Parameter(torch.ones(out_features, 1, device=device).to(base_layer.weight.device))
        self._perms: dict[torch.device, list] = {}  # by device, made once (not buffers: nothing to save or move)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        rotations = cayley(self.boft_R)
        if self.training and self.dropout > 0:
            rotations = block_dropout(rotations, self.dropout)
        m, blocks, b, _ = rotations.shape
        if x.device not in self._perms:
            self._perms[x.device] = permutations(m, blocks, b, x.device)
        result = self.base_layer(rotate(x.to(rotations.dtype), rotations, self._perms[x.device]).to(x.dtype))
        bias = getattr(self.base_layer, "bias", None)
        scaled = (result.to(self.boft_s.dtype) - (0 if bias is None else bias)) * self.boft_s.squeeze(-1)
        return (scaled + (0 if bias is None else bias)).to(result.dtype)


class PeftBoftConfig(PeftLayerTargets, PeftExcludedTargets):
    """The fields of a BOFT adapter_config.json that peftkit reads (defaults: peft 0.21's BOFTConfig)."""

    boft_block_size: int = Field(4, ge=0)
    boft_block_num: int = Field(0, ge=0)
    boft_n_butterfly_factor: int = Field(1, ge=1)
    boft_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # Features peftkit does not implement: a value here is refused rather than silently ignored.
    bias: str = "none"


class Boft(Method):
    name = "boft"
    title = "BOFT"
    peft_type = "BOFT"
    config = BoftConfig
    peft_config = PeftBoftConfig
    param_names = ("boft_R", "boft_s")

    @classmethod
    def wrap(cls, base: nn.Module, cfg: BoftConfig, path: str) -> BoftLinear:
        if kind := not_a_linear(base):
            raise unsupported(path, kind)
        return BoftLinear(base, cfg, path)

    @classmethod
    def layer_facts(cls, cfg: BoftConfig, path: str, fan_in_fan_out: bool) -> None:
        if fan_in_fan_out:
            raise unsupported(path, "GPT-2's Conv1D")

    @staticmethod
    def merge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: None) -> torch.Tensor:
        return butterfly_weight(weight, parts)

    @staticmethod
    def unmerge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: None) -> torch.Tensor:
        return butterfly_weight(weight, parts, inverse=True)

    @staticmethod
    def update_shape(parts: dict[str, torch.Tensor], facts: None) -> tuple[int | None, ...]:
        _, blocks, b, _ = parts["boft_R"].shape
        return parts["boft_s"].shape[0], blocks * b

    @classmethod
    def to_peft(cls, cfg: BoftConfig, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        return cls.peft_common(cfg, targets, base_name) | {
            "boft_block_size": cfg.boft_block_size, "boft_block_num": cfg.boft_block_num,
            "boft_n_butterfly_factor": cfg.boft_n_butterfly_factor, "boft_dropout": cfg.boft_dropout,
            "fan_in_fan_out": False, "bias": "none", "init_weights": True,
        }

    @classmethod
    def from_peft(cls, peft: PeftBoftConfig, config_file: Path) -> BoftConfig:
        refuse_unsupported(peft, config_file, ())  # (its bias)
        if (peft.boft_block_size == 0) == (peft.boft_block_num == 0):
            raise PeftkitError(f'{config_file}: "boft_block_size" is {peft.boft_block_size} and "boft_block_num" is '
                               f"{peft.boft_block_num}; exactly one of them must be nonzero. Fix the file, or export "
                               "the adapter again.")
        return BoftConfig(method="boft", boft_block_size=peft.boft_block_size, boft_block_num=peft.boft_block_num,
                          boft_n_butterfly_factor=saved_factors(peft.boft_n_butterfly_factor, config_file),
                          boft_dropout=peft.boft_dropout,
                          target_modules=targets_from_peft(peft.target_modules, config_file),
                          modules_to_save=peft.modules_to_save or [], **filters_from_peft(peft, config_file))

    @classmethod
    def kept_for_backward(cls, cfg: BoftConfig, layer: AdapterLayer) -> tuple[int, int]:
        # Each factor's rotation keeps its permuted input per token, and the scale the base output.
        in_features, out_features = linear_shape(layer.base_layer)
        return 2 * cfg.boft_n_butterfly_factor * in_features + out_features, 0

    @classmethod
    def describe(cls, cfg: BoftConfig) -> str:
        size = f"{cfg.boft_block_num} blocks" if cfg.boft_block_num else f"block size {cfg.boft_block_size}"
        return f"BOFT {size}, {cfg.boft_n_butterfly_factor} butterfly factor(s)"

    @classmethod
    def randomize(cls, layer: AdapterLayer, generator: torch.Generator, std: float) -> None:
        # Blocks far from zero (rotations far from I) and a scale around 1, with both signs of change.
        with torch.no_grad():
            layer.boft_R.copy_(torch.randn(layer.boft_R.shape, generator=generator) * std * 3)
            layer.boft_s.copy_(1 + torch.randn(layer.boft_s.shape, generator=generator) * std)


BoftLinear.method = Boft
