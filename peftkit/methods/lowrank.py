"""The Linear of a low-rank factor (LoRA's `lora_A`, r x in, and `lora_B`, out x r), whose backward products on
CPU run in the orientation MKL's GEMM is fast at.

On CPU (MKL 2024.2 in torch 2.13's wheel, AVX2), a product only a few columns wide is slow, and nn.Linear's backward
takes lora_B's two gradients in that orientation. With 816 rows (batch 8 x ~102 tokens) and r 8, the input
gradient `g @ B` ((816, 688) @ (688, 8)) takes 734 us on one thread, as `(B.T @ g.T).T` 213 us (2 threads: 375
against 178); the weight gradient `g.T @ h` ((688, 816) @ (816, 8)) 814 us against 174 (2 threads: 416 against
138). At 16 columns and more, or for the forward `x @ A.T` on 2 threads, the direct orientation is as fast or
faster, so only products at most 8 columns wide are turned, in backward only. In nn.Linear's orientations LoRA's
six small products per layer were 14 % of a QLoRA step at hidden 256 (scripts/bench_qlora.py). The values are
the same products summed in another order: equal to float rounding (about 1e-7 relative), not bit for bit.

The turned products run on fewer rows than the direct ones, so they gain less from more threads: measured on 1
and 2 threads only, they are used up to `MAX_THREADS`; with more threads, or off the CPU, the layer is a plain
nn.Linear (F.linear). The module stays an nn.Linear (same parameter and state-dict names), and its forward is
still a module call, so hooks on it (DeepSpeed ZeRO-3 gathering the weight) still run.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


NARROW = 8
"""Widest product (columns) taken transposed."""
MAX_THREADS = 2
"""Most torch threads the turned products were measured faster on."""


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for 2-D `a`, `b`, computed as (b.T @ a.T).T when the product is at most NARROW columns wide and
    narrower than tall."""
    if b.shape[1] <= NARROW and b.shape[1] < a.shape[0]:
        return (b.t() @ a.t()).t()
    return a @ b


class _LowRankMatmul(torch.autograd.Function):
    """x @ weight.T for 2-D x (as F.linear), with its input and weight gradients in the fast orientation."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)  # what F.linear's backward keeps too
        return x @ weight.t()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = _matmul(grad, weight) if ctx.needs_input_grad[0] else None
        grad_weight = _matmul(grad.t(), x) if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight


class LowRankLinear(nn.Linear):
    """nn.Linear without bias for one low-rank factor; on CPU with up to MAX_THREADS threads its products run through
    `_LowRankMatmul`."""

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype != self.weight.dtype or torch.get_num_threads() > MAX_THREADS:
            return F.linear(x, self.weight)  # the dtype check leaves F.linear's own error for a mismatch
        flat = _LowRankMatmul.apply(x.reshape(-1, x.shape[-1]), self.weight)
        return flat.reshape(*x.shape[:-1], self.out_features)
