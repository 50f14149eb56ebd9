"""A frozen weight plus a low-rank update, W + s lhs @ rhs, kept as its factors (`FactoredWeight`): what LoRA on a
parameter (`peftkit.methods.param_lora`) hands the module in place of its weight, so that a mixture of experts' own
code applies each expert's update to the tokens routed to it, x W_e + s (x lhs_e) rhs_e, instead of computing with the
whole adapted stack W + s B A.

Why: built whole, the adapted stack takes a gradient, so backward makes the weight gradient of every expert's
product (2 in out FLOPs a routed token, half again the frozen base's 4 in out) and keeps the stack (E in out values)
until backward; through the factors the update costs 6 r (in + out) FLOPs a routed token and keeps each routed
token's input and its r values. Qwen3-30B-A3B (128 experts, hidden 2048, moe_intermediate 768, 8 a token, r 8): 75
MFLOP a token a layer for the weight gradients against 2.5 through the factors, and 0.6 G values (1.2 GB in bf16) a
layer of adapted stack not kept (58 GB over its 48 layers).

The products read through the factors are those transformers 5's experts make of their weight: an expert's slice
(`W[e]`) and its transpose (`.transpose(-2, -1)`), then `F.linear` (eager Mixtral), `x @ W_e` (an
`is_transposed` model's eager experts) or `F.grouped_mm` / `torch._grouped_mm` (the default `grouped_mm` experts).
Any other use of the tensor (transformers' `batched_mm`, a custom op) gets W + s lhs @ rhs made whole, in the weight's
dtype and rounded once, as peft makes it; so does a read of `.T`, `.data` and the like.

On CPU's fast path (`lowrank.frozen_fusable`: up to 2 threads, W frozen) each such product is one autograd node, as
LoRA on a Linear layer is: an expert's F.linear or `x @ W_e` through `lowrank.linear_lora`, a grouped product through
`lowrank.grouped_lora`; the update accumulates into the frozen product's output, where separate products made a
full-size product of the update and a sum (and in backward, its gradient scaled by s and a sum of the input's two).
"""

from __future__ import annotations

from typing import Any, Self

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from peftkit.methods.lowrank import frozen_fusable, grouped_lora, linear_lora

# Attribute reads that are the same for W as for W + s lhs @ rhs (the factored tensor's storage is W's).
_SAME_METADATA = {"dtype", "shape", "device", "ndim", "is_cuda", "is_cpu", "is_meta", "layout",
                  "is_sparse", "is_quantized", "is_nested", "names"}
_SAME_METHODS = {"dim", "size", "numel", "data_ptr", "is_floating_point", "is_complex", "stride", "is_contiguous",
                 "element_size", "get_device", "storage_offset"}
# `x @ W_e` reaches __torch_function__ as Tensor.matmul (Tensor.__matmul__ calls it), torch.matmul(x, W_e) as itself.
_MATMUL = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)
_GROUPED = tuple(f for f in (getattr(F, "grouped_mm", None), getattr(torch, "_grouped_mm", None)) if f is not None)


class FactoredWeight(torch.Tensor):
    """W + s lhs @ rhs (batched over a leading expert dimension for a 3-D W) as W's storage plus the factors."""

    lhs: torch.Tensor
    rhs: torch.Tensor
    scaling: float

    @staticmethod
    def __new__(cls, weight: torch.Tensor, lhs: torch.Tensor, rhs: torch.Tensor, scaling: float) -> Self:
        with torch._C.DisableTorchFunctionSubclass():
            out = weight.as_subclass(cls)  # (W's storage and autograd history: a W that trains gets its gradient)
        out.lhs, out.rhs, out.scaling = lhs, rhs, scaling
        return out

    def dense(self) -> torch.Tensor:
        """W + s lhs @ rhs, made whole: one (batched) product added to W, rounded once (as peft's forward)."""
        weight = self._plain()
        product = torch.addmm if weight.dim() == 2 else torch.baddbmm
        return product(weight, self.lhs, self.rhs, alpha=self.scaling)

    def _plain(self) -> torch.Tensor:
        """W itself (a plain tensor)."""
        with torch._C.DisableTorchFunctionSubclass():
            return self.as_subclass(torch.Tensor)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        routed = _routed(func, args, kwargs)
        if routed is not None:
            return routed
        if _metadata(func):
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        args, kwargs = tree_map(lambda a: a.dense() if isinstance(a, FactoredWeight) else a, (args, kwargs))
        return func(*args, **kwargs)


def _metadata(func: Any) -> bool:
    owner = getattr(func, "__self__", None)
    if getattr(func, "__name__", None) == "__get__" and owner is not None:
        return getattr(owner, "__name__", None) in _SAME_METADATA
    return getattr(func, "__name__", None) in _SAME_METHODS and getattr(func, "__objclass__", None) is torch._C.TensorBase


def _routed(func: Any, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The result of `func` computed through the factors, or None where it is not one of the uses read so."""
    if func is torch.Tensor.__getitem__ and isinstance(args[0], FactoredWeight) and args[0].dim() == 3:
        index = args[1]
        if isinstance(index, int) or (isinstance(index, torch.Tensor) and index.dtype in (torch.int64, torch.int32)
                                      and index.dim() <= 1):
            w = args[0]
            return FactoredWeight(w._plain()[index], w.lhs[index], w.rhs[index], w.scaling)
        return None
    if func is torch.Tensor.transpose and isinstance(args[0], FactoredWeight):
        w, dims = args[0], {d % args[0].dim() for d in args[1:3]}
        if dims == {w.dim() - 2, w.dim() - 1}:  # (W + s lhs rhs)^T = W^T + s rhs^T lhs^T
            return FactoredWeight(w._plain().transpose(-2, -1), w.rhs.transpose(-2, -1), w.lhs.transpose(-2, -1),
                                  w.scaling)
        return None
    if func is F.linear and len(args) >= 2 and isinstance(args[1], FactoredWeight) and args[1].dim() == 2 \
            and not isinstance(args[0], FactoredWeight):
        x, w, bias = args[0], args[1], args[2] if len(args) > 2 else kwargs.get("bias")
        if frozen_fusable(x, w._plain(), w.lhs, bias):  # (x W^T + b + s (x rhs^T) lhs^T: rhs is A, lhs B)
            return linear_lora(x, w._plain(), bias, w.rhs, w.lhs, w.scaling)
        return torch.add(F.linear(x, w._plain(), bias), F.linear(F.linear(x, w.rhs), w.lhs), alpha=w.scaling)
    if func in _MATMUL and isinstance(args[1], FactoredWeight) \
            and args[1].dim() == 2 and not isinstance(args[0], FactoredWeight):
        x, w = args[0], args[1]
        if frozen_fusable(x, w._plain(), w.lhs):  # (x W + s (x lhs) rhs, as F.linear of W^T, lhs^T and rhs^T)
            return linear_lora(x, w._plain().t(), None, w.lhs.t(), w.rhs.t(), w.scaling)
        return torch.add(torch.matmul(x, w._plain()), torch.matmul(torch.matmul(x, w.lhs), w.rhs), alpha=w.scaling)
    if func in _GROUPED and isinstance(args[1], FactoredWeight) and not isinstance(args[0], FactoredWeight):
        x, w = args[0], args[1]
        offs = kwargs.get("offs")  # (F.grouped_mm calls torch._grouped_mm with bias=None, out_dtype=None)
        if offs is not None and len(args) == 2 and not any(v is not None for k, v in kwargs.items() if k != "offs") \
                and x.dim() == 2 and w.dim() == 3 and frozen_fusable(x, w._plain(), w.lhs):
            return grouped_lora(x, w._plain(), w.lhs, w.rhs, w.scaling, offs, func)
        lhs, rhs = _aligned_rank(w.lhs, w.rhs)
        low = func(func(x, lhs, **kwargs), rhs, **kwargs)
        return torch.add(func(x, w._plain(), **kwargs), low, alpha=w.scaling)
    return None


def aligned_rank(r: int, element_size: int) -> int:
    """r rounded up to a row of 16 bytes, which grouped_mm's kernels require of each operand's strides (r 2 in fp32 is
    8 bytes: 'strides should be multiple of 16 bytes')."""
    step = max(1, 16 // element_size)
    return -(-r // step) * step


def _aligned_rank(lhs: torch.Tensor, rhs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors with the rank padded with zeros to `aligned_rank` (the zero columns and rows add exact zeros),
    contiguous, as grouped_mm takes them."""
    pad = aligned_rank(lhs.shape[-1], lhs.element_size()) - lhs.shape[-1]
    if pad:
        lhs, rhs = F.pad(lhs, (0, pad)), F.pad(rhs, (0, 0, 0, pad))
    return lhs.contiguous(), rhs.contiguous()
