"""LoRA's products on CPU: `fused_lora`, a whole LoRA layer over a frozen nn.Linear or bitsandbytes NF4/FP4 layer as
one autograd node (so are a mixture's experts' products of their frozen weight plus its update, through
`peftkit.methods.factored_weight`: one expert's by `linear_lora`, all experts' grouped product by `grouped_lora`), and
`LowRankLinear`, the Linear of one low-rank factor (`lora_A`, r x in, `lora_B`, out x r) for the layers that cannot
be fused (8-bit bases, Conv1D). Both run the narrow products in the orientation MKL is fast at.

On CPU (MKL 2024.2 in torch 2.13's wheel, AVX2), a product only a few columns wide is slow, and nn.Linear's backward
takes lora_B's two gradients in that orientation. With 816 rows (batch 8 x ~102 tokens) and r 8, the input
gradient `g @ B` ((816, 688) @ (688, 8)) takes 734 us on one thread, as `(B.T @ g.T).T` 213 us (2 threads: 375
against 178); the weight gradient `g.T @ h` ((688, 816) @ (816, 8)) 814 us against 174 (2 threads: 416 against
138). At 16 columns and more the direct orientation is as fast or faster, so only products at most 8 columns wide
are turned. The forward's `x @ A.T` gains on 1 thread only (816 x 256: 77 against 119 us; 2 threads: equal), so
LowRankLinear keeps it direct and the fused node turns it. In nn.Linear's orientations LoRA's six small products
per layer were 14 % of a QLoRA step at hidden 256 (scripts/bench_qlora.py). The values are the same products summed
in another order: equal to float rounding (about 1e-7 relative), not bit for bit.

The turned products run on fewer rows than the direct ones, so they gain less from more threads: measured on 1
and 2 threads only, they are used up to `MAX_THREADS`; with more threads, or off the CPU, LoRA runs as separate
modules of plain nn.Linear products (F.linear). LowRankLinear stays an nn.Linear (same parameter and state-dict
names), and its forward is still a module call, so hooks on it (DeepSpeed ZeRO-3 gathering the weight) still run;
a layer whose modules have hooks is not fused.
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
    """nn.Linear for one low-rank factor (without bias but for LoRA's `lora_bias`); on CPU with up to MAX_THREADS
    threads its products run through `_LowRankMatmul`."""

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None or not cpu_fast_path(x, self.weight):
            return F.linear(x, self.weight, self.bias)  # the dtype check leaves F.linear's own error for a mismatch
        flat = _LowRankMatmul.apply(x.reshape(-1, x.shape[-1]), self.weight)
        return flat.reshape(*x.shape[:-1], self.out_features)


def cpu_fast_path(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `x` times `weight` takes this module's products: on CPU, in one dtype, with at most MAX_THREADS threads,
    not traced by torch.compile."""
    # is_compiling first: torch.get_num_threads() would break torch.compile's graph (and compile fuses these itself).
    return (not torch.compiler.is_compiling() and x.device.type == "cpu" and x.dtype == weight.dtype
            and torch.get_num_threads() <= MAX_THREADS)


class _FusedLora(torch.autograd.Function):
    """x W^T + b + s (d(x) A^T) B^T for a frozen W (and b), one autograd node; W is a plain weight, or a bitsandbytes
    4-bit one with its `quant_state` (QLoRA), multiplied by bitsandbytes' own `matmul_4bit` and `dequantize_4bit`;
    d is LoRA's dropout with probability `dropout` (0: none), drawn as nn.Dropout draws it on the CPU.

    As separate modules, the layer's autograd graph adds the update to the base output, and the input's two
    gradients to each other, through new full-size tensors. Here the update accumulates into the base output and
    the input gradient with GEMM's beta = 1 (`addmm_`), and the narrow products run in the fast orientation.
    At hidden 256 on 1 thread that takes LoRA's cost over the frozen base's forward + backward from +27 % to +17 %
    (scripts/bench_train.py --floor).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, quant_state, dropout=0.0):
        # torch's CPU dropout (at::dropout, which nn.Dropout calls): noise = bernoulli(1 - p) / (1 - p), x * noise;
        # drawn here the same way, so one seed gives nn.Dropout's mask and its values bit for bit.
        noise = torch.empty_like(x).bernoulli_(1 - dropout).div_(1 - dropout) if dropout else None
        dropped = x if noise is None else x * noise
        h = _matmul(dropped, lora_a.t())
        if quant_state is None:
            out = F.linear(x, weight, bias)
        else:
            import bitsandbytes as bnb

            out = bnb.matmul_4bit(x, weight, quant_state=quant_state, bias=bias)  # what Linear4bit.forward calls
        out.addmm_(h, lora_b.t(), alpha=scaling)
        # Kept: x for A's gradient (not under LoRA-FA), h for B's, W and A for x's, and the noise (dropout's backward).
        # With dropout the dropped input is made again in backward, not kept: the layers reading one x (q/k/v,
        # gate/up) keep it once, where the modules kept a dropped copy per layer.
        need_a, need_b = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        ctx.save_for_backward(x if need_a else None, h if need_b else None, weight, lora_a, lora_b, noise)
        ctx.scaling, ctx.quant_state = scaling, quant_state
        return out

    @staticmethod
    def backward(ctx, grad):
        x, h, weight, lora_a, lora_b, noise = ctx.saved_tensors
        need_x, need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        grad_h = _matmul(grad, lora_b).mul_(ctx.scaling) if need_x or need_a else None
        grad_b = _matmul(grad.t(), h).mul_(ctx.scaling) if need_b else None
        grad_a = grad_h.t() @ (x if noise is None else x * noise) if need_a else None
        grad_x = None
        if need_x:
            if ctx.quant_state is not None:  # as bitsandbytes' MatMul4Bit.backward: the weight dequantized again
                from bitsandbytes.functional import dequantize_4bit

                weight = dequantize_4bit(weight, ctx.quant_state).to(grad.dtype)
            grad_x = grad @ weight
            # Through the dropout, the update's input gradient is (grad_h A) * noise, as the modules' graph has it.
            grad_x = grad_x.addmm_(grad_h, lora_a) if noise is None else grad_x.add_((grad_h @ lora_a).mul_(noise))
        return grad_x, None, None, grad_a, grad_b, None, None, None


def _quant_state(base: nn.Module, x: torch.Tensor):
    """A bitsandbytes Linear4bit's quant state when `_FusedLora` can multiply by its weight as its forward would:
    packed 4-bit storage (uint8: not FSDP's quant_storage), not repacked for a CPU's bf16 kernels (an eval-time
    layout), computing in x's dtype; else None."""
    if type(base).__name__ not in ("Linear4bit", "LinearNF4", "LinearFP4") or not type(base).__module__.startswith(
            "bitsandbytes"):
        return None
    state = getattr(base.weight, "quant_state", None)
    if (state is None or base.weight.dtype != torch.uint8 or getattr(state, "packing_format_for_cpu", False)
            or base.compute_dtype not in (None, x.dtype) or (base.bias is not None and base.bias.dtype != x.dtype)):
        return None
    return state


def fusable(base: nn.Module, factors: tuple[nn.Module, nn.Module], x: torch.Tensor) -> bool:
    """Whether `fused_lora` may stand in for base(x) + B(A(x)) s: a frozen plain nn.Linear or bitsandbytes Linear4bit
    and the factors without hooks (DeepSpeed ZeRO-3 gathers weights in hooks), on CPU's fast path, not traced by
    torch.compile (which fuses the modules itself) and not under autocast (which would cast the modules' products)."""
    if not cpu_fast_path(x, factors[0].weight) or factors[1].bias is not None:  # (lora_bias: the modules add it)
        return False
    if not all(isinstance(f, nn.Linear) for f in factors):  # (BD-LoRA's block-diagonal factor)
        return False
    modules = (base, *factors)
    plain = type(base) is nn.Linear and base.weight.dtype == x.dtype
    return ((plain or _quant_state(base, x) is not None) and not base.weight.requires_grad
            and (base.bias is None or not base.bias.requires_grad)
            and factors[1].weight.dtype == x.dtype
            and not any(m._forward_hooks or m._forward_pre_hooks for m in modules)
            and not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)
            and not torch.is_autocast_enabled("cpu"))


def fused_lora(x: torch.Tensor, base: nn.Module, lora_a: nn.Linear, lora_b: nn.Linear, scaling: float,
               dropout: float = 0.0) -> torch.Tensor:
    """base(x) + lora_b(lora_a(dropout(x))) * scaling through `_FusedLora` (check `fusable` first); `dropout`: its
    probability, 0 for none (eval)."""
    quant_state = None if type(base) is nn.Linear else _quant_state(base, x)
    flat = _FusedLora.apply(x.reshape(-1, x.shape[-1]), base.weight, base.bias, lora_a.weight, lora_b.weight, scaling,
                            quant_state, dropout)
    return flat.reshape(*x.shape[:-1], flat.shape[-1])


class _GroupedLora(torch.autograd.Function):
    """x @ (W_g + s lhs_g rhs_g) for each group g of x's rows, one autograd node: a mixture's experts' product
    (grouped_mm's: `offs` holds the groups' ends, W (groups, K, N) frozen, lhs (groups, K, r), rhs (groups, r, N)).
    The frozen product is `grouped`'s own (the kernel the model called); each group's update accumulates into its rows
    of that output and of the input gradient with GEMM's beta = 1 (`addmm_`), as `_FusedLora`'s does, and its narrow
    products run in the fast orientation. As separate grouped products (x lhs, then rhs, added to x W), autograd made
    a full-size (rows, N) product and a sum of it, then its gradient scaled by s and the input's two gradients summed:
    four passes over (rows, N) or (rows, K) tensors a product, for r columns of arithmetic."""

    @staticmethod
    def forward(ctx, x, weight, lhs, rhs, offs, scaling, grouped):
        out = grouped(x, weight, offs=offs)
        spans = _spans(offs)
        h = x.new_empty(x.shape[0], lhs.shape[-1])  # (rows past the last group's end, which grouped_mm skips: unread)
        for g, (a, b) in spans:
            h[a:b] = _matmul(x[a:b], lhs[g])
            out[a:b].addmm_(h[a:b], rhs[g], alpha=scaling)
        ctx.save_for_backward(x, h, weight, lhs, rhs, offs)  # (x for lhs's gradient, h for rhs's, as autograd kept)
        ctx.spans, ctx.scaling, ctx.grouped = spans, scaling, grouped
        return out

    @staticmethod
    def backward(ctx, grad):
        x, h, weight, lhs, rhs, offs = ctx.saved_tensors
        need_x, need_lhs, need_rhs = ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        grad_x = ctx.grouped(grad, weight.transpose(-2, -1), offs=offs) if need_x else None
        grad_lhs = torch.zeros_like(lhs) if need_lhs else None  # (a group without rows: no gradient)
        grad_rhs = torch.zeros_like(rhs) if need_rhs else None
        for g, (a, b) in ctx.spans:
            rows = grad[a:b]
            grad_h = _matmul(rows, rhs[g].t()).mul_(ctx.scaling)
            if need_rhs:
                grad_rhs[g] = (h[a:b].t() @ rows).mul_(ctx.scaling)
            if need_lhs:
                grad_lhs[g] = _matmul(x[a:b].t(), grad_h)
            if need_x:
                grad_x[a:b].addmm_(grad_h, lhs[g].t())
        return grad_x, None, grad_lhs, grad_rhs, None, None, None


def _spans(offs: torch.Tensor) -> list[tuple[int, tuple[int, int]]]:
    """(group, (first row, end)) of each group that has rows, from grouped_mm's `offs` (each group's end)."""
    ends = offs.tolist()
    return [(g, (a, b)) for g, (a, b) in enumerate(zip([0] + ends[:-1], ends)) if b > a]


def grouped_lora(x: torch.Tensor, weight: torch.Tensor, lhs: torch.Tensor, rhs: torch.Tensor, scaling: float,
                 offs: torch.Tensor, grouped) -> torch.Tensor:
    """grouped(x, weight + s lhs @ rhs, offs=offs) for 2-D x and 3-D weight, through `_GroupedLora` (check
    `frozen_fusable` first)."""
    return _GroupedLora.apply(x, weight, lhs, rhs, offs, scaling, grouped)


def linear_lora(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """F.linear(x, weight + s lora_b @ lora_a, bias) through `_FusedLora` (check `frozen_fusable` first): an expert's
    slice of a mixture's weight, as LoRA on a Linear layer runs."""
    flat = _FusedLora.apply(x.reshape(-1, x.shape[-1]), weight, bias, lora_a, lora_b, scaling, None, 0.0)
    return flat.reshape(*x.shape[:-1], flat.shape[-1])


def frozen_fusable(x: torch.Tensor, weight: torch.Tensor, factor: torch.Tensor,
                   bias: torch.Tensor | None = None) -> bool:
    """Whether x times `weight` plus its low-rank update (`factor` one of its factors) may run as one node
    (`linear_lora`, `grouped_lora`): on CPU's fast path, the weight (and bias) frozen, the factors in x's dtype, not
    under autocast."""
    return (cpu_fast_path(x, weight) and not weight.requires_grad and (bias is None or not bias.requires_grad)
            and factor.dtype == x.dtype and not torch.is_autocast_enabled("cpu"))
