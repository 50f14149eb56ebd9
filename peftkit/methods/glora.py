"""GLoRA, generalized LoRA (Chavan et al. 2023, "One-for-All: Generalized LoRA for Parameter-Efficient Fine-tuning",
arXiv:2306.07967): each layer's weight and bias are moved by five trained terms,

    W' = W + W * A + B,   b' = b + b * D + E + W C,

`*` entry by entry. Each term is one of peft's paths: `lora`, a rank-r product Xd Xu (A, B: (out, r) (r, in); C:
(in, r) (r, 1)); `vector`, a column X (A, B: (out, 1); C: (in, 1); D, E: (out,)); `constant`, one number X (1,); or
`none`, zeros peft saves as a buffer (`<path>.glora_A.zeros` (out, in), C's (in, 1), D's and E's (out,)) and computes
with, as peftkit does. C, D and E are paths only on a layer with a bias (zeros without one, whatever the config).

Names, shapes and init as HF peft 0.21's `GloraLayer`: `<path>.glora_A.Xd`, `.Xu`, `.X` or `.zeros`, and so on for B to
E. peft draws in its order (A, B, C, D, E), each lora path Xu kaiming-uniform and Xd 0 (init_weights true: the base
model) or kaiming-uniform; a vector 0 or kaiming-uniform; a constant 0 or N(0, 0.02^2): one seed, peft's numbers. The
forward adds x (W * A + B)^T + (b * D + E + W C) to the base output in fp32 (peft computes the whole layer again with
W' and b' and subtracts the base's: the same sum, other roundings), so a 4-bit/8-bit base runs on its dequantized W;
merged, W' and b'; the in-place unmerge puts back the weight and bias kept before the merge (peft divides by 1 + A,
which is not exact, nor defined where 1 + A is 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from peftkit.errors import PeftkitError
from peftkit.methods.base import PeftConfigBase, Method, draw_device, refuse_unsupported, targets_from_peft
from peftkit.methods.layer import AdapterLayer, is_quantized, linear_shape, not_a_linear
from peftkit.section import AdapterSection, TargetRegex

PATHS = ("glora_A", "glora_B", "glora_C", "glora_D", "glora_E")
KINDS = ("Xd", "Xu", "X", "zeros")


class GloraConfig(AdapterSection):
    """GLoRA: W + W * A + B and b + b * D + E + W C, each term a low-rank, vector, constant or no path."""

    method: Literal["glora"]
    r: int = Field(8, ge=1)
    """Rank of the `lora` paths: r (out + in) trained numbers for each of A and B, r (in + 1) for C (peft's default 8)."""
    config_A_B: Literal["lora", "vector", "constant", "none"] = "lora"
    """A and B (W * A + B): `lora` (rank r), `vector` (one number per output), `constant` (one number), `none`."""
    config_C: Literal["lora", "vector", "none"] = "lora"
    """C (W C added to the bias; a layer without a bias has none): `lora` (rank r), `vector` ((in, 1)), `none`."""
    config_D_E: Literal["vector", "constant", "none"] = "constant"
    """D and E (b * D + E; a layer without a bias has none): `vector` (one number per output), `constant`, `none`."""
    init_weights: bool = True
    """true: Xd, vectors and constants 0, the base model (each Xu kaiming-uniform); false (debugging, as peft): Xd and
    vectors kaiming-uniform, constants N(0, 0.02^2)."""
    target_modules: Literal["all-linear"] | list[str] | TargetRegex = "all-linear"
    """As LoRA's: nn.Linear layers (and 4-bit/8-bit ones); GPT-2's Conv1D and embeddings are refused (as peft's)."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full and saved whole (e.g. `lm_head`)."""


@dataclass(frozen=True)
class GloraFacts:
    """GLoRA's merge needs its tensors alone (each path's kind is in their names)."""


def _kaiming(t: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


class GloraPath(nn.Module):
    """One of peft's paths, its tensors under peft's names: lora `Xd`, `Xu`; vector or constant `X`; none `zeros` (a
    buffer, saved by `GloraLinear.adapter_params`, never trained)."""

    def __init__(self, kind: str, shape: tuple[int, ...], r: int, init: bool, device: torch.device) -> None:
        super().__init__()
        draw = draw_device(device)
        if kind == "lora":  # (rows, columns) = shape: Xd (rows, r), Xu (r, columns)
            xd, xu = torch.zeros(shape[0], r, device=draw), torch.zeros(r, shape[1], device=draw)
            _kaiming(xu)
            if not init:
                _kaiming(xd)
            self.Xd, self.Xu = nn.Parameter(xd.to(device)), nn.Parameter(xu.to(device))
        elif kind in ("vector", "constant"):
            x = torch.zeros(shape, device=draw)
            if not init and kind == "vector":
                _kaiming(x if x.dim() == 2 else x.unsqueeze(0))  # (a 1-D vector: as a row, peft's fan-in)
            elif not init:
                nn.init.normal_(x, mean=0.0, std=0.02)
            self.X = nn.Parameter(x.to(device))
        else:
            self.register_buffer("zeros", torch.zeros(shape, device=device), persistent=False)


def path_value(parts: dict[str, torch.Tensor], path: str) -> torch.Tensor:
    """A path's term in fp32: Xd Xu, X, or the zeros (broadcast against the weight or bias as peft's)."""
    if f"{path}.Xd" in parts:
        return parts[f"{path}.Xd"].float() @ parts[f"{path}.Xu"].float()
    return parts[f"{path}.X" if f"{path}.X" in parts else f"{path}.zeros"].float()


def weight_update(weight: torch.Tensor, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """W * A + B (out, in), fp32."""
    return weight * path_value(parts, "glora_A").to(weight.device) + path_value(parts, "glora_B").to(weight.device)


def bias_update(bias: torch.Tensor, weight: torch.Tensor, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """b * D + E + W C (out,), fp32."""
    d, e, c = (path_value(parts, p).to(weight.device) for p in ("glora_D", "glora_E", "glora_C"))
    return bias * d + e + torch.matmul(weight, c).squeeze(-1)


def unsupported(path: str, kind: str) -> PeftkitError:
    return PeftkitError(
        f"adapter.target_modules: '{path}' is {kind}; GLoRA adapts nn.Linear (and 4-bit/8-bit) layers only, as peft "
        "0.21's GLoRA, which could not load the adapter otherwise. Target Linear layers (all-linear does, but on "
        "GPT-2's Conv1D), or use adapter.method: lora for this model.")


class GloraLinear(AdapterLayer):
    """GLoRA around nn.Linear or a bitsandbytes linear layer (its dequantized weight for the update)."""

    def __init__(self, base_layer: nn.Module, cfg: GloraConfig) -> None:
        super().__init__(base_layer)
        in_features, out_features = linear_shape(base_layer)
        self.facts = GloraFacts()
        device, init, r = base_layer.weight.device, cfg.init_weights, cfg.r
        biased = getattr(base_layer, "bias", None) is not None
        weight_shape = {"lora": (out_features, in_features), "vector": (out_features, 1), "constant": (1,),
                        "none": (out_features, in_features)}[cfg.config_A_B]
        self.glora_A = GloraPath(cfg.config_A_B, weight_shape, r, init, device)  # (peft's order of draws)
        self.glora_B = GloraPath(cfg.config_A_B, weight_shape, r, init, device)
        self.glora_C = GloraPath(cfg.config_C if biased else "none", (in_features, 1), r, init, device)
        kind = cfg.config_D_E if biased else "none"
        for name in ("glora_D", "glora_E"):
            setattr(self, name, GloraPath(kind, (1,) if kind == "constant" else (out_features,), r, init, device))

    def adapter_params(self) -> dict[str, torch.Tensor]:
        """The trained tensors, and the zeros of `none` paths that peft's file holds beside them (buffers: no
        gradient, no optimizer state, not counted as parameters)."""
        return super().adapter_params() | {f"{p}.zeros": getattr(self, p).zeros for p in PATHS
                                           if hasattr(getattr(self, p), "zeros")}

    def merge(self) -> None:
        if self.merged:
            return
        bias = getattr(self.base_layer, "bias", None)
        kept = (self.base_layer.weight.detach().clone().cpu(), None if bias is None else bias.detach().clone().cpu())
        super().merge()
        self._before_merge = kept

    def unmerge(self) -> None:
        if not self.merged:
            return
        weight, bias = self._before_merge
        self.base_layer.weight.data.copy_(weight)
        if bias is not None:
            self.base_layer.bias.data.copy_(bias)
        self._before_merge = None
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        if is_quantized(self.base_layer):
            from peftkit.merge_weights import dequantize_weight  # (peftkit.merge_weights imports the methods)

            weight = dequantize_weight(self.base_layer)
        else:
            weight = self.base_layer.weight.float()
        parts = dict(self.adapter_params())
        bias = getattr(self.base_layer, "bias", None)
        added = None if bias is None else bias_update(bias.float(), weight, parts)
        return (result + F.linear(x.float(), weight_update(weight, parts), added)).to(result.dtype)


class PeftGloraConfig(PeftConfigBase):
    """The fields of a GLORA adapter_config.json that peftkit reads (defaults: peft 0.21's GloraConfig)."""

    r: int = Field(8, ge=1)
    config_A_B: Literal["lora", "vector", "constant", "none"] = "lora"
    config_C: Literal["lora", "vector", "none"] = "lora"
    config_D_E: Literal["vector", "constant", "none"] = "constant"
    init_weights: bool = True
    bias: str = "none"


class Glora(Method):
    name = "glora"
    title = "GLoRA"
    peft_type = "GLORA"
    config = GloraConfig
    peft_config = PeftGloraConfig
    param_names = tuple(f"{p}.{k}" for p in PATHS for k in KINDS)
    untrained_names = tuple(f"{p}.zeros" for p in PATHS)
    # (inspect reads a tensor's whole name, the shape-mismatch message its last part)
    rank_dims = {"glora_A.Xd": 1, "glora_B.Xd": 1, "glora_C.Xd": 1, "Xd": 1, "Xu": 0}

    @classmethod
    def check_run(cls, model: nn.Module, cfg: GloraConfig) -> None:
        """config_A_B none on layers without a bias (where C, D and E are zeros too) trains nothing: the optimizer
        failed on its empty parameter list after the model loaded (peft trains nothing without a word)."""
        from peftkit.adapters import adapter_layers  # (peftkit.adapters imports the methods)

        layers = [layer for layer in adapter_layers(model).values() if isinstance(layer, GloraLinear)]
        if layers and not any(AdapterLayer.adapter_params(layer) for layer in layers):
            biased = (cfg.config_C, cfg.config_D_E) != ("none", "none")
            why = (f"none of the {len(layers)} target modules has a bias, and C, D and E are zeros on a layer without "
                   "one" if biased else "config_C and config_D_E are none too")
            raise PeftkitError(f"adapter.config_A_B: none leaves nothing to train: {why}. Set config_A_B to lora, "
                               f"vector or constant{', or target layers with a bias' if biased else ''}.")

    @classmethod
    def wrap(cls, base: nn.Module, cfg: GloraConfig, path: str) -> GloraLinear:
        if kind := not_a_linear(base):
            raise unsupported(path, kind)
        return GloraLinear(base, cfg)

    @classmethod
    def layer_facts(cls, cfg: GloraConfig, path: str, fan_in_fan_out: bool) -> GloraFacts:
        if fan_in_fan_out:
            raise unsupported(path, "GPT-2's Conv1D")
        return GloraFacts()

    @staticmethod
    def merge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: GloraFacts) -> torch.Tensor:
        return weight + weight_update(weight, parts)

    @classmethod
    def merge_bias_of(cls, bias: torch.Tensor, weight: torch.Tensor, parts: dict[str, torch.Tensor],
                      facts: GloraFacts) -> torch.Tensor:
        return bias + bias_update(bias, weight, parts)

    @staticmethod
    def unmerge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: GloraFacts) -> torch.Tensor:
        # (W' - B) / (1 + A), peft's; the layers put back the weight kept before the merge instead
        return (weight - path_value(parts, "glora_B").to(weight.device)) / (1 + path_value(parts, "glora_A").to(
            weight.device))

    @staticmethod
    def update_shape(parts: dict[str, torch.Tensor], facts: GloraFacts) -> tuple[int | None, ...]:
        out_features = in_features = None
        for path in ("glora_A", "glora_B"):
            if (t := parts.get(f"{path}.Xd", parts.get(f"{path}.zeros"))) is not None:
                out_features = t.shape[0]
            if (t := parts.get(f"{path}.Xu", parts.get(f"{path}.zeros"))) is not None:
                in_features = t.shape[-1]
            if (t := parts.get(f"{path}.X")) is not None and t.dim() == 2:
                out_features = t.shape[0]
        c = parts.get("glora_C.Xd", parts.get("glora_C.X", parts.get("glora_C.zeros")))
        return out_features, in_features if c is None else c.shape[0]

    @classmethod
    def to_peft(cls, cfg: GloraConfig, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        return cls.peft_common(cfg, targets, base_name) | {
            "r": cfg.r, "bias": "none", "config_A_B": cfg.config_A_B, "config_C": cfg.config_C,
            "config_D_E": cfg.config_D_E, "init_weights": cfg.init_weights}

    @classmethod
    def from_peft(cls, peft: PeftGloraConfig, config_file: Path) -> GloraConfig:
        refuse_unsupported(peft, config_file, ())  # (its bias: 'all' and 'glora_only' train the base's biases)
        return GloraConfig(method="glora", r=peft.r, config_A_B=peft.config_A_B, config_C=peft.config_C,
                           config_D_E=peft.config_D_E, init_weights=peft.init_weights,
                           target_modules=targets_from_peft(peft.target_modules, config_file),
                           modules_to_save=peft.modules_to_save or [])

    @classmethod
    def randomize(cls, layer: AdapterLayer, generator: torch.Generator, std: float) -> None:
        with torch.no_grad():  # the trained tensors only: a `none` path stays zeros
            for p in AdapterLayer.adapter_params(layer).values():
                p.copy_(torch.randn(p.shape, generator=generator) * std)

    @classmethod
    def kept_for_backward(cls, cfg: GloraConfig, layer: AdapterLayer) -> tuple[int, int]:
        # The input in fp32 per token; per layer the (out x in) terms: W (an fp32 copy), A, W * A + B and W C's W.
        in_features, out_features = linear_shape(layer.base_layer)
        return in_features, 4 * in_features * out_features

    @classmethod
    def forward_scratch(cls, cfg: GloraConfig, layer: AdapterLayer) -> int:
        in_features, out_features = linear_shape(layer.base_layer)
        return 4 * in_features * out_features * (2 if is_quantized(layer.base_layer) else 1)

    @classmethod
    def describe(cls, cfg: GloraConfig) -> str:
        return f"GLoRA r={cfg.r}"


GloraLinear.method = Glora
