"""LoHa (FedPara, Hyeon-Woo et al. 2022, arXiv:2108.06098): the update is the Hadamard (elementwise) product
of two rank-r products,

    W' = W + (alpha / r) * (w1_a @ w1_b) * (w2_a @ w2_b),    w*_a (out, r), w*_b (r, in),

whose rank can reach r^2 for the parameters of a rank-2r LoRA: 2 r (in + out) per layer. Names and shapes as
HF peft (`<path>.hada_w1_a`, ...). As in peft, w1_a, w1_b and w2_a start kaiming-uniform and w2_b at zero, so
training starts from the base model. Dropouts, forward and PEFT config: `peftkit.methods.lycoris`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from peftkit.methods.layer import linear_shape
from peftkit.methods.lycoris import (
    LycorisConfig,
    LycorisFacts,
    LycorisLayer,
    LycorisMethod,
    PeftLycorisConfig,
)


class _HadamardProduct(torch.autograd.Function):
    """(w1_a @ w1_b) * (w2_a @ w2_b) * scaling as one autograd node that keeps only the four factors and recomputes
    the two (out, in) products in backward (as peft's HadaWeight): the graph of separate ops would keep both
    products for the elementwise product's gradient. Gradients are the separate ops' to the bit."""

    @staticmethod
    def forward(ctx, w1_a, w1_b, w2_a, w2_b, scaling: float):
        ctx.save_for_backward(w1_a, w1_b, w2_a, w2_b)
        ctx.scaling = scaling
        return (w1_a @ w1_b) * (w2_a @ w2_b) * scaling

    @staticmethod
    def backward(ctx, grad):
        w1_a, w1_b, w2_a, w2_b = ctx.saved_tensors
        grad = grad * ctx.scaling
        grad_w1, grad_w2 = grad * (w2_a @ w2_b), grad * (w1_a @ w1_b)
        need = ctx.needs_input_grad
        return (grad_w1 @ w1_b.t() if need[0] else None, w1_a.t() @ grad_w1 if need[1] else None,
                grad_w2 @ w2_b.t() if need[2] else None, w2_a.t() @ grad_w2 if need[3] else None, None)


class LohaConfig(LycorisConfig):
    """LoHa: a Hadamard product of two low-rank updates."""

    method: Literal["loha"]


class LohaLinear(LycorisLayer):
    def __init__(self, base_layer: nn.Module, cfg: LohaConfig) -> None:
        # peft always rescales the rows kept by rank_dropout for LoHa.
        super().__init__(base_layer, cfg, rescale_rank_dropout=True)
        in_features, out_features = linear_shape(base_layer)
        for pair in ("hada_w1", "hada_w2"):
            nn.init.kaiming_uniform_(self.factor(f"{pair}_a", out_features, cfg.r), a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.factor(f"{pair}_b", cfg.r, in_features), a=math.sqrt(5))
        nn.init.zeros_(self.hada_w2_b)  # one zero factor: the update starts at 0


class Loha(LycorisMethod):
    name = "loha"
    title = "LoHa"
    peft_type = "LOHA"
    config = LohaConfig
    peft_config = PeftLycorisConfig
    layer = LohaLinear
    param_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    rank_dims = {"hada_w1_a": 1, "hada_w1_b": 0, "hada_w2_a": 1, "hada_w2_b": 0}

    @staticmethod
    def delta(parts: dict[str, torch.Tensor], facts: LycorisFacts) -> torch.Tensor:
        factors = (parts[name].float() for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        return _HadamardProduct.apply(*factors, facts.scaling)

    @staticmethod
    def update_shape(parts: dict[str, torch.Tensor], facts: LycorisFacts) -> tuple[int, int]:
        return parts["hada_w1_a"].shape[0], parts["hada_w1_b"].shape[1]


LohaLinear.method = Loha
