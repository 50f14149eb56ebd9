"""DoRA (Liu et al. 2024, arXiv:2402.09353), the math shared by LoRA's layers and its merge.

DoRA splits the adapted weight into a direction and a magnitude:

    W' = m * V / ||V||_c,    V = W + s * B A,

with W (out, in), `||V||_c` the L2 norm of each output row of V (shape (out,)), and the magnitude vector m
(out,) trained, initialised to ||W||_c so that training starts from the base model. As the paper suggests
(section 4.3) and HF peft does, ||V||_c is treated as a constant in the backward pass (detached).

The forward reuses the base layer's output y = W x + b instead of computing W x a second time (HF peft
recomputes it in some versions and whenever dropout is on). With g = m / ||V||_c:

    W' x + b = g * (W x + s B A x) + b
             = y + (g - 1) * (y - b) + g * s * B A x,

so the extra cost over LoRA is the norm, one (out, in) sum per step, and two elementwise products. With
dropout on the adapter's input (training only), x_d = dropout(x) replaces x in the DoRA terms, as in peft:
y + (g - 1) * W x_d + g * s * B A x_d, which needs W x_d and so one more matmul with the base weight.
"""

from __future__ import annotations

import torch


def weight_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """||W + delta||_c, the L2 norm of each output row, (out,); both (out, in), fp32, no gradient."""
    with torch.no_grad():
        return (weight + delta).norm(p=2, dim=1)


def dora_merge(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """m * (W + delta) / ||W + delta||_c in fp32, in the base's layout ((in, out) when `fan_in_fan_out`);
    `delta` is already in that layout and scaled."""
    w, d = (weight.T, delta.T) if fan_in_fan_out else (weight, delta)  # (out, in)
    merged = (magnitude.float() / weight_norm(w, d))[:, None] * (w + d)
    return merged.T if fan_in_fan_out else merged


def dora_unmerge(merged: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor,
                 fan_in_fan_out: bool) -> torch.Tensor:
    """The inverse of `dora_merge`, given the norm ||W + delta||_c it used: W' * norm / m - delta. The merged
    weight alone does not determine that norm (any row scale of V gives the same direction), so the layer
    keeps it from its merge."""
    w = merged.T if fan_in_fan_out else merged
    restored = w * (norm / magnitude.float())[:, None]
    return (restored.T if fan_in_fan_out else restored) - delta
