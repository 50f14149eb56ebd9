"""LoRA's layers: y = W x + (alpha / r) * B A x, with W frozen and A (r x in), B (out x r) trained; with `use_dora`,
DoRA on top: a trained magnitude per output row rescales W + (alpha / r) B A (math in `peftkit.methods.dora`). The
settings and the method are `peftkit.methods.lora`'s.

Each layer *wraps* its frozen base (`self.base_layer`) and owns only the adapter parameters, so the
base's state-dict keys become `<path>.base_layer.weight` and the adapter's `<path>.lora_A.weight` /
`<path>.lora_B.weight` — the names the Hugging Face PEFT format uses.

Dtype discipline (as in HF peft): adapter weights are kept in fp32 whatever the base dtype, the input
is cast to the adapter dtype and the adapter's output back to the base output's dtype. Deltas for
merging are computed in fp32 (`lora_delta`, the one LoRA merge math) and cast once, at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F

from peftkit.methods.alora import Activated
from peftkit.methods.base import draw_device
from peftkit.methods.layer import AdapterLayer, is_conv1d, is_quantized, linear_shape
from peftkit.methods.bdlora import BlockDiagonal, full_factor
from peftkit.methods.kasa import Diagonal
from peftkit.methods.dora import dora_unmerge, weight_norm
from peftkit.methods.lowrank import LowRankLinear, fusable, fused_lora
from peftkit.methods.velora import Compressed


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / (math.sqrt(r) if use_rslora else r)


@dataclass(frozen=True)
class LoraFacts:
    """Per-layer facts of a LoRA merge; the rank is read from the tensors' shapes."""

    alpha: float
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    """The base weight is stored (in, out) (transformers' Conv1D)."""
    use_dora: bool = False
    blocks_a: int = 1
    """BD-LoRA: A is block-diagonal in this many blocks (held stacked, (r, in / blocks_a)); likewise B."""
    blocks_b: int = 1


def lora_delta(parts: dict[str, torch.Tensor], facts: LoraFacts) -> torch.Tensor:
    """scaling * B @ A in fp32, in the base weight's layout: (out, in), (in, out) for Conv1D, and
    (num_embeddings, dim) for an embedding, whose A is (r, num_embeddings) and B (dim, r)."""
    if "lora_A.weight" in parts:
        a, b = parts["lora_A.weight"].float(), parts["lora_B.weight"].float()
        a, b = full_factor(a, facts.blocks_a), full_factor(b, facts.blocks_b)
        if "lora_diag" in parts:  # KaSA: s B diag(d) A
            b = b * parts["lora_diag"].float()
        delta = b @ a
        delta = delta.T if facts.fan_in_fan_out else delta
    else:
        a, b = parts["lora_embedding_A"].float(), parts["lora_embedding_B"].float()
        delta = (b @ a).T
    return delta * lora_scaling(facts.alpha, a.shape[0], facts.use_rslora)


def plus_update(base_layer: nn.Module, result: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """`base_layer`'s output `result` plus an adapter's `update` (in the adapter's dtype): on a 4-bit/8-bit base
    rounded, then added, as peft's bitsandbytes layers; else added in the adapter's dtype and rounded once, as peft's
    Linear."""
    return result + update.to(result.dtype) if is_quantized(base_layer) else (result + update).to(result.dtype)


class _LoraLayer(AdapterLayer):
    def __init__(self, base_layer: nn.Module, r: int, alpha: float, use_rslora: bool) -> None:
        super().__init__(base_layer)
        self.r = r
        # An embedding's weight is (num_embeddings, dim), laid out as a Conv1D's (in, out): DoRA's norm is per dim.
        self.facts = LoraFacts(alpha, use_rslora, is_conv1d(base_layer) or isinstance(self, DoraEmbedding),
                               isinstance(self, (DoraLinear, DoraEmbedding)))
        self.scaling = lora_scaling(alpha, r, use_rslora)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in fp32, in the base weight's layout ((in, out) for Conv1D)."""
        return lora_delta(self.parts(), self.facts)

    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        """The base's output plus `update(x)` (its own, where merged)."""
        result = self.base_layer(x)
        return result if self.merged else plus_update(self.base_layer, result, self.update(x))


class LoraLinear(_LoraLayer):
    """LoRA around nn.Linear, transformers' Conv1D or a bitsandbytes Linear4bit/Linear8bitLt."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 bias: bool = False, blocks: tuple[str, int] | None = None):
        super().__init__(base_layer, r, alpha, use_rslora)
        in_features, out_features = linear_shape(base_layer)
        # Drawn on the CPU, then moved beside the base (as peft): one seed gives one adapter on any device.
        where = draw_device(base_layer.weight.device)
        # nn.Linear subclasses whose CPU products run in MKL's fast orientation (see peftkit.methods.lowrank).
        self.lora_A = LowRankLinear(in_features, r, device=where, dtype=torch.float32)
        self.lora_B = LowRankLinear(r, out_features, device=where, dtype=torch.float32, bias=bias)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters()
        if blocks is not None:  # BD-LoRA (peftkit.methods.bdlora): one factor block-diagonal, drawn after, as peft's
            side, n = blocks
            if side == "A":
                self.lora_A = BlockDiagonal(in_features, r, n, zero=False, device=where)
            else:
                self.lora_B = BlockDiagonal(r, out_features, n, zero=True, device=where)
            self.facts = replace(self.facts, blocks_a=n if side == "A" else 1, blocks_b=n if side == "B" else 1)
        self.lora_A.to(base_layer.weight.device)
        self.lora_B.to(base_layer.weight.device)

    def reset_parameters(self) -> None:
        # As HF peft and the paper: A ~ kaiming-uniform, B = 0, so training starts from the base model.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if self.lora_B.bias is not None:
            nn.init.zeros_(self.lora_B.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.merged and fusable(self.base_layer, self.factors, x):  # one node (CPU; see lowrank)
            dropout = self.lora_dropout.p if self.training and isinstance(self.lora_dropout, nn.Dropout) else 0.0
            return fused_lora(x, self.base_layer, self.lora_A, self.lora_B, self.scaling, dropout)
        return self.adapted(x)

    @property
    def factors(self) -> tuple[nn.Linear, nn.Linear]:
        return self.lora_A, self.lora_B

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """scaling * B A dropout(x), in the adapter's dtype: what the layer adds to the base output (a mixed
        batch, `peftkit.adapters.named`, adds it to some rows of one base output).

        The scaling multiplies the r-wide A x, where peft scales the out-wide result: one pass over r columns
        instead of `out` in forward and in backward. The same value when the scaling is a power of two
        (alpha 16, r 8), else to float rounding. With lora_bias, s (B A x + b), as peft's."""
        h = self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))
        return self.lora_B(h) * self.scaling if self.lora_B.bias is not None else self.lora_B(h * self.scaling)


class VeloraLinear(Compressed, LoraLinear):
    """VeLoRA on a Linear or Conv1D layer (`peftkit.methods.velora.Compressed`): LoRA, whose A trains from compressed
    inputs."""


class KasaLinear(Diagonal, LoraLinear):
    """KaSA on a Linear layer (`peftkit.methods.kasa.Diagonal`): LoRA with trained singular values, on a base weight
    without its r smallest singular components."""


class ALoraLinear(Activated, LoraLinear):
    """Activated LoRA on a Linear, Conv1D or bitsandbytes layer (`peftkit.methods.alora.Activated`)."""


class _DoraMerge:
    """DoRA's in-place merge and unmerge, for DoraLinear and DoraEmbedding (before their LoRA class in the bases)."""

    def merge(self) -> None:
        # The unmerge needs the norm of the unmerged weight, which the merged weight no longer determines.
        if not self.merged:
            self._merged_norm = self.weight_norm()
        super().merge()

    def unmerge(self) -> None:
        if not self.merged:
            return
        weight = self.base_layer.weight
        restored = dora_unmerge(weight.data.float(), self.delta_weight(), self.lora_magnitude_vector.detach(),
                                self._merged_norm, self.facts.fan_in_fan_out)
        weight.data.copy_(restored.to(weight.dtype))
        self.merged, self._merged_norm = False, None


NORM_ELEMENTS = 2**24
"""Values of a block of output rows of DoraLinear's norm (64 MiB in fp32; 4096 rows of a 4096-wide layer)."""


class DoraLinear(_DoraMerge, LoraLinear):
    """LoRA with DoRA around a Linear, Conv1D or bitsandbytes layer: W' = m * V / ||V||_c, V = W + s B A."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__(base_layer, r, alpha, dropout, use_rslora)
        # m starts at ||W + s B A||_c = ||W||_c (B is 0): the layer starts as its base. PEFT's name and shape.
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm())
        self._merged_norm: torch.Tensor | None = None

    def base_weight(self) -> torch.Tensor:
        """The fp32 base weight, (out, in): dequantized for a bitsandbytes layer, transposed for Conv1D."""
        if is_quantized(self.base_layer):
            from peftkit.merge import dequantize_weight  # peftkit.merge imports the method registry

            weight = dequantize_weight(self.base_layer)
        else:
            weight = self.base_layer.weight.float()
        return weight.T if self.facts.fan_in_fan_out else weight

    def weight_norm(self) -> torch.Tensor:
        """||W + s B A||_c, (out,), without gradient, a block of output rows at a time: what it allocates is a block's
        (NORM_ELEMENTS fp32 values, three times), not three fp32 (out, in) matrices (peft's, every step: 700 MiB for
        a Llama-8B MLP projection). A quantized weight is dequantized whole first (bitsandbytes dequantizes whole
        tensors)."""
        with torch.no_grad():
            a, b = self.lora_A.weight, self.lora_B.weight
            weight = self.base_layer.weight
            if is_quantized(self.base_layer):
                weight = self.base_weight()
            elif self.facts.fan_in_fan_out:
                weight = weight.T
            step = max(1, NORM_ELEMENTS // weight.shape[1])
            return torch.cat([weight_norm(weight[i:i + step].float(), (b[i:i + step] @ a) * self.scaling)
                              for i in range(0, weight.shape[0], step)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        a = self.lora_A.weight
        gain = self.lora_magnitude_vector / self.weight_norm()  # g = m / ||V||_c, the norm detached (paper 4.3)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            # Reuse the base output: W x = y - b, so W' x + b = y + (g - 1) (y - b) + g s B A x.
            lora = self.lora_B(self.lora_A(x.to(a.dtype))) * self.scaling
            bias = getattr(self.base_layer, "bias", None)
            base_out = result.to(a.dtype) if bias is None else result.to(a.dtype) - bias.to(a.dtype)
        else:
            # Dropout acts on the DoRA terms' input, as in peft, so W x_d needs its own matmul.
            dropped = self.lora_dropout(x.to(a.dtype))
            lora = self.lora_B(self.lora_A(dropped)) * self.scaling
            base_out = F.linear(dropped, self.base_weight())
        update = (gain - 1) * base_out + gain * lora
        return (result + update).to(result.dtype)



class LoraEmbedding(_LoraLayer):
    """LoRA on nn.Embedding: the row for token t gains scaling * (B @ A)[:, t]."""

    def __init__(self, base_layer: nn.Embedding, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__(base_layer, r, alpha, use_rslora)
        num, dim = base_layer.weight.shape
        # Shapes and names as HF peft: lora_embedding_A (r, num_embeddings), lora_embedding_B (dim, r); drawn on
        # the CPU and moved beside the base, as LoraLinear.
        where = draw_device(base_layer.weight.device)
        self.lora_embedding_A = nn.Parameter(torch.empty(r, num, device=where, dtype=torch.float32))
        self.lora_embedding_B = nn.Parameter(torch.empty(dim, r, device=where, dtype=torch.float32))
        self.reset_parameters()
        self.lora_embedding_A.data = self.lora_embedding_A.data.to(base_layer.weight.device)
        self.lora_embedding_B.data = self.lora_embedding_B.data.to(base_layer.weight.device)

    def reset_parameters(self) -> None:
        # HF peft initialises A to zero and B normal for embeddings (the lookup of A is the "input").
        nn.init.zeros_(self.lora_embedding_A)
        nn.init.normal_(self.lora_embedding_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapted(x)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """What the layer adds to the base lookup of token ids `x`, in the adapter's dtype."""
        base = self.base_layer
        after_a = F.embedding(x, self.lora_embedding_A.T, base.padding_idx, base.max_norm, base.norm_type,
                              base.scale_grad_by_freq, base.sparse)
        update = (after_a @ self.lora_embedding_B.T) * self.scaling
        # Gemma's embedding scales its lookup by sqrt(hidden) in forward (`embed_scale`); the update is part of the
        # row it scales, as in the merged weight (and in peft).
        scale = getattr(base, "embed_scale", None)
        if isinstance(scale, (int, float)) or (isinstance(scale, torch.Tensor) and scale.numel() == 1):
            update = update * torch.as_tensor(scale).to(update.dtype)
        return update


NORM_ROWS = 8192
"""Rows of an embedding per block of DoraEmbedding's norm (8192 x 4096 fp32: 128 MiB)."""


class DoraEmbedding(_DoraMerge, LoraEmbedding):
    """LoRA with DoRA on nn.Embedding, as peft's: V = W + s (B A)^T (num_embeddings, dim), its norm taken over the
    vocabulary for each of the `dim` columns, and m (dim,) trained: token t's row is g * V[t], g = m / ||V||
    (detached, as DoraLinear's)."""

    def __init__(self, base_layer: nn.Embedding, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__(base_layer, r, alpha, dropout, use_rslora)
        # m starts at ||W|| (A is 0): the layer starts as its base. PEFT's name and shape.
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm())
        self._merged_norm: torch.Tensor | None = None

    def weight_norm(self) -> torch.Tensor:
        """||W + s (B A)^T|| over the vocabulary, (dim,), without gradient: summed over blocks of rows, so that what
        it allocates is a block's, not three fp32 (vocab, dim) matrices (6 GiB for Qwen2-7B's embeddings, every
        step; peft's)."""
        with torch.no_grad():
            weight, squares = self.base_layer.weight, 0.0
            for start in range(0, weight.shape[0], NORM_ROWS):
                rows = slice(start, start + NORM_ROWS)
                block = weight[rows].float() + (self.lora_embedding_B @ self.lora_embedding_A[:, rows]).T * self.scaling
                squares = squares + block.square().sum(0)
            return squares.sqrt()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        gain = self.lora_magnitude_vector / self.weight_norm()
        return (gain * result.to(gain.dtype) + gain * self.update(x)).to(result.dtype)  # (peft's order of terms)
