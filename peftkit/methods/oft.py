"""OFT, orthogonal finetuning (Qiu et al. 2023, arXiv:2306.07280; OFTv2 with the Cayley-Neumann series, Qiu et
al. 2025, arXiv:2506.19847): the frozen weight is multiplied by a trained block-diagonal orthogonal matrix R,
which rotates the layer's input, y = W (R^T x) + b: merged, W' = W R^T, and the bias is left alone.

Each diagonal block of R comes from a trained skew-symmetric block Q by the Cayley transform. With
`use_cayley_neumann` (peft's default) R = (I + Q)(I - Q)^-1 with the inverse replaced by its Neumann series
I + Q + Q^2 + ..., which is cheaper but only approximately orthogonal; without it, R is peft's exact Cayley
transform, which peft 0.21 writes as (I - Q)(I + Q)^-1 (the transform of -Q: the transpose of the other form).
We follow peft so that an adapter means the same in both. Q starts at zero, so R = I: the base model.

Names and shapes as HF peft 0.21: `<path>.oft_R.weight`, (number of blocks, b (b - 1) / 2), each row the
upper triangle of one Q (row-major, diagonal excluded); with `block_share` one row for every block. The block
size b is read back from the row length and the number of blocks from the weight, so a merge needs no
per-layer fact but the series settings. `coft` (constrained OFT) keeps each Q within a Frobenius ball of radius
eps / sqrt(rows) by projecting the trained values before each forward, as peft does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from packaging.version import InvalidVersion, Version
from pydantic import Field, PrivateAttr, model_validator
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.methods.base import Method, refuse_unsupported, targets_from_peft
from peftkit.methods.layer import AdapterLayer, conv1d_kind, from_conv1d, linear_shape
from peftkit.methods.target_filters import (ExcludedTargets, LayerTargets, PeftExcludedTargets, PeftLayerTargets,
                                             filters_from_peft)
from peftkit.section import TargetRegex

# The first peft whose Cayley-Neumann series this file computes (peft 0.18 changed it). Written as the adapter's
# `peft_version`: peft warns when loading a Cayley-Neumann adapter without one, and peftkit refuses older ones.
NEUMANN_SINCE = "0.18.0"


class OftConfig(LayerTargets, ExcludedTargets):
    """OFT: a trained block-diagonal rotation of each target layer's input."""

    method: Literal["oft"]
    r: int = Field(0, ge=0)
    """Number of blocks per layer (the block size is then in_features / r); 0: `oft_block_size` sets it."""
    oft_block_size: int = Field(32, ge=0)
    """Size of each rotation block: bigger = more trainable parameters (b (b - 1) / 2 per block). Must divide the
    input size of every target. Defaults to 0 when `r` is set (exactly one of the two is nonzero)."""
    coft: bool = False
    """Constrained OFT: keep each block's Q within a ball of radius eps / sqrt(blocks) (little freedom)."""
    eps: float = Field(6e-5, gt=0)
    """COFT's radius (only with coft)."""
    block_share: bool = False
    """One rotation block shared by all blocks of a layer."""
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """In training, this fraction of a layer's blocks is set to the identity at each step."""
    use_cayley_neumann: bool = True
    """R from the Neumann series of the Cayley transform (fast, approximately orthogonal); false: the exact one."""
    num_cayley_neumann_terms: int = Field(5, ge=1)
    """Terms of that series: more = closer to orthogonal."""
    target_modules: Literal["all-linear"] | list[str] | TargetRegex = "all-linear"
    """As LoRA's: `all-linear`, module-name suffixes, or {regex: ...}. nn.Linear and 4-bit/8-bit layers only."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full and saved whole (e.g. `lm_head`)."""
    _saved: bool = PrivateAttr(False)
    """Read from a saved adapter (`Oft.from_peft`): peft adjusts a size that does not divide a layer's input to its
    nearest divisor, layer by layer, and so does the loading of its adapters; a recipe's is refused."""

    @model_validator(mode="before")
    @classmethod
    def _r_replaces_block_size(cls, data: Any) -> Any:
        # `r: 4` alone means "4 blocks", not "4 blocks of 32" (which peft refuses): the block size default steps aside.
        if isinstance(data, dict) and data.get("r") not in (None, 0, "0") and "oft_block_size" not in data:
            return {**data, "oft_block_size": 0}
        return data

    @model_validator(mode="after")
    def _one_size(self) -> OftConfig:
        if (self.r == 0) == (self.oft_block_size == 0):
            raise ValueError(
                f"r is {self.r} and oft_block_size is {self.oft_block_size}; OFT takes exactly one of them "
                "(r blocks of oft_block_size = in_features): set oft_block_size (e.g. 32) and leave r out, or set r "
                "and leave oft_block_size out"
            )
        return self



@dataclass(frozen=True)
class OftFacts:
    """The series settings a merge needs; block size, block count and sharing are read from the tensor."""

    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5
    coft: bool = False
    eps: float = 6e-5


def nearest_divisor(n: int, value: int) -> int:
    """The divisor of n closest to value, the lower one on a tie: what peft silently adjusts r or the block size
    to (`adjust_oft_parameters`)."""
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - value), d))


def block_size_for(cfg: OftConfig, in_features: int, path: str) -> int:
    """The block size of the layer at `path`; a PeftkitError naming the key when it does not divide the input."""
    key, value = ("r", cfg.r) if cfg.r else ("oft_block_size", cfg.oft_block_size)
    if in_features % value == 0:
        return in_features // cfg.r if cfg.r else value
    fix = nearest_divisor(in_features, value)
    # peft's adapter (read from its file, or a run's recipe starting from it: a re-run under `peftkit verify` reads
    # that from manifest.json), sized as peft sized this layer; the weights' shapes are checked on loading.
    if cfg._saved or cfg.init_from is not None:
        return in_features // fix if cfg.r else fix
    raise PeftkitError(
        f"adapter.{key}: {value} does not divide the {in_features} input features of '{path}' (OFT splits them "
        f"into r blocks of oft_block_size). Set {key}: {fix} (peft would silently use {fix} for this layer), or "
        "another value that divides the input size of every target."
    )


def block_size_of(vec: torch.Tensor) -> int:
    """b from a packed row of b (b - 1) / 2 upper-triangle entries."""
    n = vec.shape[-1]
    b = (1 + math.isqrt(1 + 8 * n)) // 2
    if b * (b - 1) // 2 != n:
        raise PeftkitError(f"An OFT weight row has {n} entries, which is no b (b - 1) / 2: not an OFT adapter of "
                           "peft >= 0.14. Export the adapter again.")
    return b


def skew(vec: torch.Tensor, b: int) -> torch.Tensor:
    """(rows, b, b) skew-symmetric blocks Q from the packed upper triangles."""
    rows, cols = torch.triu_indices(b, b, 1, device=vec.device)
    q = vec.new_zeros(vec.shape[0], b, b)
    q[:, rows, cols] = vec
    return q - q.transpose(-2, -1)


def coft_project(vec: torch.Tensor, eps: float) -> torch.Tensor:
    """Each row scaled back to Frobenius norm eps / sqrt(rows) of its Q where it is larger (||Q|| = sqrt(2) |row|)."""
    limit = eps / math.sqrt(vec.shape[0])
    return vec * (limit / (math.sqrt(2) * vec.norm(dim=1, keepdim=True))).clamp(max=1.0)


def neumann_coefficients(terms: int) -> list[int]:
    """Coefficients of I, Q, Q^2, ... in peft 0.21's series of `terms` terms: I + 2Q + ... + 2Q^(k-1) + Q^k =
    (I + Q)(I + Q + ... + Q^(k-1)), k = terms - 1, the Cayley transform with (I - Q)^-1 cut after k terms.
    Exceptions, as peft computes them: 3 terms give the 4-term series (k = 3), 2 terms I + 2Q, 1 term I."""
    if terms <= 2:
        return [1, 2][:terms]
    k = max(terms - 1, 3)
    return [1] + [2] * (k - 1) + [1]


def rotation_blocks(vec: torch.Tensor, facts: OftFacts) -> torch.Tensor:
    """(rows, b, b) rotation blocks from the packed (rows, b (b - 1) / 2) weight, already COFT-projected."""
    b = block_size_of(vec)
    q = skew(vec, b)
    eye = torch.eye(b, device=vec.device, dtype=vec.dtype).expand_as(q)
    if not facts.use_cayley_neumann:
        # (I - Q)(I + Q)^-1, as peft; solve_ex: I + Q of a skew-symmetric Q is never singular, and `solve`'s check
        # for it reads a result on the host: on a GPU, a sync in every training forward of every OFT layer.
        return torch.linalg.solve_ex(eye + q, eye - q, left=False)[0]
    rotation, power = eye.clone(), None
    for c in neumann_coefficients(facts.num_cayley_neumann_terms)[1:]:
        power = q if power is None else power @ q
        rotation.add_(power, alpha=c)  # c is 1 or 2: exact, with or without a fused multiply-add
    return rotation


def block_dropout(rotation: torch.Tensor, p: float) -> torch.Tensor:
    """int(p * blocks) random blocks replaced by the identity (peft's MultiplicativeDropoutLayer, which peft
    0.21 builds but never calls); a shared block is left alone."""
    n, b, _ = rotation.shape
    if n == 1:
        return rotation
    mask = torch.zeros(n, 1, 1, device=rotation.device, dtype=rotation.dtype)
    mask[torch.randperm(n, device=rotation.device)[: int(p * n)]] = 1
    return (1 - mask) * rotation + mask * torch.eye(b, device=rotation.device, dtype=rotation.dtype)


def rotate_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: OftFacts,
                  inverse: bool = False) -> torch.Tensor:
    """W R^T for an (out, in) weight, block by block; with `inverse`, W R^-T, by a solve: the Neumann series
    makes R orthogonal only approximately, so its transpose would not undo it exactly."""
    vec = parts["oft_R.weight"].float().to(weight.device)
    rotation = rotation_blocks(coft_project(vec, facts.eps) if facts.coft else vec, facts)
    out, in_features = weight.shape
    b = rotation.shape[-1]
    if in_features % b or rotation.shape[0] not in (1, in_features // b):
        raise PeftkitError(f"The adapter does not fit this model: its OFT rotation is {rotation.shape[0]} blocks of "
                           f"{b} for a layer with {in_features} inputs. It was trained on a different base model.")
    n = in_features // b
    rotation = rotation.expand(n, b, b)
    blocks = weight.reshape(out, n, b)
    if inverse:
        restored = torch.linalg.solve(rotation.transpose(-2, -1), blocks.transpose(0, 1), left=False)
        return restored.transpose(0, 1).reshape(out, in_features)
    return torch.einsum("onk,nck->onc", blocks, rotation).reshape(out, in_features)


def unsupported(path: str, kind: str) -> PeftkitError:
    return PeftkitError(
        f"adapter.target_modules: '{path}' is {kind}; OFT rotates the input of nn.Linear (and 4-bit/8-bit) layers "
        "only, as peft 0.21's OFT, which could not load the adapter otherwise. Target Linear layers, or use LoRA for "
        "this model."
    )


class OftLinear(AdapterLayer):
    """OFT around nn.Linear or a bitsandbytes linear layer: the input is rotated, then the base layer runs."""

    def __init__(self, base_layer: nn.Module, cfg: OftConfig, path: str) -> None:
        super().__init__(base_layer)
        in_features, _ = linear_shape(base_layer)
        self.block_size = block_size_for(cfg, in_features, path)
        self.blocks = in_features // self.block_size
        self.module_dropout = cfg.module_dropout
        self.facts = OftFacts(cfg.use_cayley_neumann, cfg.num_cayley_neumann_terms, cfg.coft, cfg.eps)
        rows = 1 if cfg.block_share else self.blocks
        size = self.block_size * (self.block_size - 1) // 2
        # Zero: Q = 0, R = I, the base model (peft's init_weights=True). PEFT's key `oft_R.weight`.
        self.oft_R = nn.ParameterDict({"weight": nn.Parameter(
            torch.zeros(rows, size, device=base_layer.weight.device, dtype=torch.float32))})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        vec = self.oft_R["weight"]
        if self.facts.coft:  # projected gradient descent, as peft: the stored values move back into the ball
            with torch.no_grad():
                vec.copy_(coft_project(vec, self.facts.eps))
        rotation = rotation_blocks(vec, self.facts)
        if self.training and self.module_dropout > 0:
            rotation = block_dropout(rotation, self.module_dropout)
        b = self.block_size
        blocks = x.to(vec.dtype).unflatten(-1, (self.blocks, b))
        rotated = torch.einsum("...nk,nkc->...nc", blocks, rotation.expand(self.blocks, b, b)).flatten(-2)
        return self.base_layer(rotated.to(x.dtype))


class PeftOftConfig(PeftLayerTargets, PeftExcludedTargets):
    """The fields of an OFT adapter_config.json that peftkit reads (defaults: peft 0.21's OFTConfig)."""

    r: int = Field(0, ge=0)
    oft_block_size: int = Field(32, ge=0)
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    coft: bool = False
    eps: float = Field(6e-5, gt=0)
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = Field(5, ge=1)
    peft_version: str | None = None
    # Features peftkit does not implement: a value here is refused rather than silently ignored.
    bias: str = "none"


class Oft(Method):
    name = "oft"
    title = "OFT"
    peft_type = "OFT"
    config = OftConfig
    peft_config = PeftOftConfig
    param_names = ("oft_R.weight",)

    @classmethod
    def wrap(cls, base: nn.Module, cfg: OftConfig, path: str) -> OftLinear:
        if from_conv1d(base) or isinstance(base, nn.Embedding):
            raise unsupported(path, conv1d_kind(base) if from_conv1d(base) else "an Embedding")
        return OftLinear(base, cfg, path)

    @classmethod
    def layer_facts(cls, cfg: OftConfig, path: str, fan_in_fan_out: bool) -> OftFacts:
        if fan_in_fan_out:
            raise unsupported(path, "GPT-2's Conv1D")
        return OftFacts(cfg.use_cayley_neumann, cfg.num_cayley_neumann_terms, cfg.coft, cfg.eps)

    @staticmethod
    def merge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: OftFacts) -> torch.Tensor:
        return rotate_weight(weight, parts, facts)

    @staticmethod
    def unmerge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: OftFacts) -> torch.Tensor:
        return rotate_weight(weight, parts, facts, inverse=True)

    @staticmethod
    def update_shape(parts: dict[str, torch.Tensor], facts: OftFacts) -> tuple[int | None, ...]:
        vec = parts["oft_R.weight"]
        # A shared block fits any multiple of its size (rotate_weight checks that).
        return None, (None if vec.shape[0] == 1 else vec.shape[0] * block_size_of(vec))

    @classmethod
    def to_peft(cls, cfg: OftConfig, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        return cls.peft_common(cfg, targets, base_name) | {
            "r": cfg.r,
            "oft_block_size": cfg.oft_block_size,
            "module_dropout": cfg.module_dropout,
            "fan_in_fan_out": False,
            "bias": "none",
            "init_weights": True,
            "coft": cfg.coft,
            "eps": cfg.eps,
            "block_share": cfg.block_share,
            "use_cayley_neumann": cfg.use_cayley_neumann,
            "num_cayley_neumann_terms": cfg.num_cayley_neumann_terms,
            "peft_version": NEUMANN_SINCE,
        }

    @classmethod
    def from_peft(cls, peft: PeftOftConfig, config_file: Path) -> OftConfig:
        refuse_unsupported(peft, config_file, ())  # (its bias)
        if "oft_block_size" not in peft.model_fields_set:  # as peft: the layout before peft 0.14
            raise PeftkitError(f"{config_file}: no 'oft_block_size': an OFT adapter of peft < 0.14, whose weights "
                               "neither peft nor peftkit reads any more. Train it again.")
        if peft.use_cayley_neumann and _older(peft.peft_version, NEUMANN_SINCE):
            raise PeftkitError(f"{config_file}: a Cayley-Neumann adapter of peft {peft.peft_version}; peft "
                               f"{NEUMANN_SINCE} changed that series, and peftkit computes the new one. Train it again.")
        if (peft.r == 0) == (peft.oft_block_size == 0):
            raise PeftkitError(f'{config_file}: "r" is {peft.r} and "oft_block_size" is {peft.oft_block_size}; '
                               "exactly one of them must be nonzero. Fix the file, or export the adapter again.")
        cfg = OftConfig(method="oft", r=peft.r, oft_block_size=peft.oft_block_size, coft=peft.coft, eps=peft.eps,
                        block_share=peft.block_share, module_dropout=peft.module_dropout,
                        use_cayley_neumann=peft.use_cayley_neumann,
                        num_cayley_neumann_terms=peft.num_cayley_neumann_terms,
                        target_modules=targets_from_peft(peft.target_modules, config_file),
                        modules_to_save=peft.modules_to_save or [], **filters_from_peft(peft, config_file))
        cfg._saved = True
        return cfg

    @classmethod
    def kept_for_backward(cls, cfg: OftConfig, layer: AdapterLayer) -> tuple[int, int]:
        # The rotation's gradient needs the layer's input, per token (an upper bound: layers reading one input,
        # q/k/v, share it; measured 163 of 256 values per token and block of the tiny Llama).
        return linear_shape(layer.base_layer)[0], 0

    @classmethod
    def describe(cls, cfg: OftConfig) -> str:
        size = f"r={cfg.r} blocks" if cfg.r else f"block size {cfg.oft_block_size}"
        series = f"Cayley-Neumann {cfg.num_cayley_neumann_terms} terms" if cfg.use_cayley_neumann else "exact Cayley"
        return f"OFT {size}, {series}" + (", shared" if cfg.block_share else "") + (f", COFT eps={cfg.eps:g}" if cfg.coft else "")


def _older(version: str | None, than: str) -> bool:
    """`version` (peft's, maybe with `@commit`) is known and older than `than`."""
    try:
        return version is not None and Version(version.partition("@")[0]) < Version(than)
    except InvalidVersion:
        return False


OftLinear.method = Oft
