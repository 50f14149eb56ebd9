"""LoRA (Hu et al. 2021): y = W x + (alpha / r) * B A x, with W frozen and A (r x in), B (out x r) trained.

Each layer *wraps* its frozen base (`self.base_layer`) and owns only the adapter parameters, so the
base's state-dict keys become `<path>.base_layer.weight` and the adapter's `<path>.lora_A.weight` /
`<path>.lora_B.weight` — the names the Hugging Face PEFT format uses.

Dtype discipline (as in HF peft): adapter weights are kept in fp32 whatever the base dtype, the input
is cast to the adapter dtype and the adapter's output back to the base output's dtype. Deltas for
merging are computed in fp32 and cast once, at the end.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from peftkit.errors import PeftkitError


def is_quantized(layer: nn.Module) -> bool:
    """A bitsandbytes 4-bit or 8-bit linear layer."""
    return type(layer).__module__.startswith("bitsandbytes")


def is_conv1d(layer: nn.Module) -> bool:
    """transformers' GPT-2 style Conv1D: a linear layer whose weight is stored (in, out)."""
    return type(layer).__name__ == "Conv1D" and type(layer).__module__.startswith("transformers")


def linear_shape(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, Conv1D or bitsandbytes linear layer."""
    if is_conv1d(layer):
        return layer.weight.shape[0], layer.weight.shape[1]
    return layer.in_features, layer.out_features


class _LoraBase(nn.Module):
    base_layer: nn.Module

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, use_rslora: bool) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r = r
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        self.merged = False

    @property
    def weight(self) -> torch.Tensor:
        # Code that inspects `module.weight` (transformers' dtype/device probes) sees the base weight.
        return self.base_layer.weight

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def merge(self) -> None:
        """Fold the delta into the base weight. Idempotent; refuses a quantized base or a non-finite result."""
        if self.merged:
            return
        if is_quantized(self.base_layer):
            raise PeftkitError(
                "Cannot merge in place into a quantized (bitsandbytes) layer: the sum would be re-quantized and "
                "drift from what was trained. Use `peftkit merge`, which dequantizes the base to fp32 first."
            )
        weight = self.base_layer.weight
        merged = weight.data.float() + self.delta_weight().to(weight.device)
        if not torch.isfinite(merged).all():
            raise PeftkitError("Merging produced NaN/inf weights; the adapter is broken and was not merged.")
        weight.data.copy_(merged.to(weight.dtype))
        self.merged = True

    def unmerge(self) -> None:
        """Subtract the delta again. Idempotent. Exact up to the rounding of the base dtype."""
        if not self.merged:
            return
        weight = self.base_layer.weight
        weight.data.copy_((weight.data.float() - self.delta_weight().to(weight.device)).to(weight.dtype))
        self.merged = False

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The trainable parameters, by their name relative to this module."""
        return {n: p for n, p in self.named_parameters() if not n.startswith("base_layer.")}


class LoraLinear(_LoraBase):
    """LoRA around nn.Linear, transformers' Conv1D or a bitsandbytes Linear4bit/Linear8bitLt."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__(base_layer, r, alpha, use_rslora)
        in_features, out_features = linear_shape(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        device = base_layer.weight.device
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=torch.float32)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # As HF peft and the paper: A ~ kaiming-uniform, B = 0, so training starts from the base model.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        a = self.lora_A.weight
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(a.dtype)))) * self.scaling
        return result + update.to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in fp32, in the base weight's layout ((in, out) for Conv1D)."""
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        return delta.T if self.fan_in_fan_out else delta


class LoraEmbedding(_LoraBase):
    """LoRA on nn.Embedding: the row for token t gains scaling * (B @ A)[:, t]."""

    def __init__(self, base_layer: nn.Embedding, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__(base_layer, r, alpha, use_rslora)
        num, dim = base_layer.weight.shape
        device = base_layer.weight.device
        # Shapes and names as HF peft: lora_embedding_A (r, num_embeddings), lora_embedding_B (dim, r).
        self.lora_embedding_A = nn.Parameter(torch.empty(r, num, device=device, dtype=torch.float32))
        self.lora_embedding_B = nn.Parameter(torch.empty(dim, r, device=device, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # HF peft initialises A to zero and B normal for embeddings (the lookup of A is the "input").
        nn.init.zeros_(self.lora_embedding_A)
        nn.init.normal_(self.lora_embedding_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        base = self.base_layer
        after_a = F.embedding(x, self.lora_embedding_A.T, base.padding_idx, base.max_norm, base.norm_type,
                              base.scale_grad_by_freq, base.sparse)
        update = (after_a @ self.lora_embedding_B.T) * self.scaling
        return result + update.to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_embedding_B.float() @ self.lora_embedding_A.float()).T * self.scaling
