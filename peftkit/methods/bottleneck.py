"""Bottleneck adapters: a small down-projection, a non-linearity and an up-projection beside a decoder block's
attention and/or MLP sub-layer.

- `placement: serial` (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", arXiv:1902.00751):
  after the sub-layer, on its output y (before the residual add): y + s * up(act(down(y))).
- `placement: parallel` (He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning",
  arXiv:2110.04366): on the sub-layer's input x, added to its output: y + s * up(act(down(x))).

down: hidden -> hidden / reduction_factor (nn.Linear's default init), up: back to hidden, **zero-initialised**
(weight and bias), so the adapter adds exactly 0 at step 0: the base model's outputs. Computed in fp32 and cast
back. `train_norms: true` also trains every normalisation layer's scale and shift (Houlsby's layer norms): the
norm is wrapped too and computes with a trained fp32 copy of its weights.

peft has no such method, so the adapter is saved in peftkit's own layout (the PEFT file names, a peft_type peft
does not know: peft refuses to load it, peftkit reads it), keys under `base_model.model.<sub-layer path>.`:
`adapter_down.weight` (m, hidden), `adapter_down.bias` (m), `adapter_up.weight` (hidden, m), `adapter_up.bias`
(hidden), and for a trained norm `<norm path>.norm_weight` / `.norm_bias`. Not mergeable: the non-linearity
cannot be folded into any weight.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn
from torch.func import functional_call

from peftkit.errors import PeftkitError
from peftkit.methods.base import REEXPORT, Method, PeftConfigBase, draw_device
from peftkit.methods.layer import AdapterLayer
from peftkit.methods.blocks import CallArguments, decoder_blocks, first_output, norm_layers, with_first_output
from peftkit.section import AdapterSection

ACTIVATIONS = {"relu": nn.functional.relu, "gelu": nn.functional.gelu, "silu": nn.functional.silu, "tanh": torch.tanh}
DEFAULT_SCALING = {"serial": 1.0, "parallel": 4.0}  # Houlsby adds the adapter as is; He et al. scale by s = 4


class BottleneckConfig(AdapterSection):
    """Bottleneck adapters (Houlsby serial, He et al. parallel) beside the attention and/or MLP blocks."""

    method: Literal["bottleneck"]
    placement: Literal["serial", "parallel"] = "serial"
    """serial: on the sub-layer's output (Houlsby); parallel: on its input, added to its output (He et al.)."""
    reduction_factor: float = Field(16, gt=0)
    """Bottleneck size = hidden size / reduction_factor (rounded down): 16 on a 4096 model is 256."""
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    after: Literal["attention", "ffn", "both"] = "ffn"
    """Which sub-layers of every decoder block get an adapter: attention, the MLP (ffn), or both (Houlsby's two)."""
    scaling: float | None = None
    """The adapter's output is multiplied by it; null: 1 for serial, 4 for parallel (He et al.'s choice)."""
    train_norms: bool = False
    """Also train every normalisation layer (LayerNorm/RMSNorm scale and shift), as Houlsby et al. do."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full and saved whole (e.g. `lm_head`)."""

    @model_validator(mode="before")
    @classmethod
    def _default_scaling(cls, data: Any) -> Any:
        """scaling: null takes the placement's default; a placement that is no name (a list, a mapping) gets 1.0
        here, so that its own error, which names the key and the choices, is the one reported (it was a TypeError)."""
        if isinstance(data, dict) and data.get("scaling") is None:
            placement = data.get("placement", "serial")
            default = DEFAULT_SCALING.get(placement, 1.0) if isinstance(placement, str) else 1.0
            return data | {"scaling": default}
        return data

    @field_validator("scaling")
    @classmethod
    def _scaling_not_zero(cls, value: float | None) -> float | None:
        """0 multiplies the adapter's output, and with it every gradient of its zero-initialised up-projection, by
        zero: the run would train nothing and say nothing of it."""
        if value == 0:
            raise ValueError("0 multiplies the adapter's output and its gradients by zero, so it would never train; "
                             "leave it out (null: 1 for serial, 4 for parallel)")
        return value


class BottleneckLayer(AdapterLayer):
    """A bottleneck adapter around an attention block or an MLP (`base_layer`)."""

    def __init__(self, base_layer: nn.Module, cfg: BottleneckConfig, hidden_size: int) -> None:
        super().__init__(base_layer)
        self.facts = None
        size = int(hidden_size // cfg.reduction_factor)
        device = next(base_layer.parameters()).device
        # Drawn on the CPU, then moved: one seed, one adapter on any device.
        self.adapter_down = nn.Linear(hidden_size, size, device=draw_device(device), dtype=torch.float32)
        self.adapter_up = nn.Linear(size, hidden_size, device=draw_device(device), dtype=torch.float32)
        with torch.no_grad():
            self.adapter_down.bias.zero_()
            self.adapter_up.weight.zero_()  # zero-init: the adapter adds exactly 0 at step 0
            self.adapter_up.bias.zero_()
        self.adapter_down.to(device)
        self.adapter_up.to(device)
        self.parallel = cfg.placement == "parallel"
        self.activation = ACTIVATIONS[cfg.non_linearity]
        self.scaling = cfg.scaling
        self.arguments = CallArguments(base_layer)

    def forward(self, *args, **kwargs):
        out = self.base_layer(*args, **kwargs)
        output = first_output(out)
        return with_first_output(out, output + self.delta(args, kwargs, output).to(output.dtype))

    def source(self, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        """What the adapter reads: the sub-layer's input (parallel) or its `output` (serial)."""
        return self.arguments.get(0, args, kwargs) if self.parallel else output

    def delta(self, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        """The fp32 addition to the sub-layer's `output` for the call (`args`, `kwargs`): s * up(act(down(source))).
        AdapterFusion (`peftkit.methods.fusion`) weighs these of several adapters."""
        source = self.source(args, kwargs, output)
        return self.adapter_up(self.activation(self.adapter_down(source.to(torch.float32)))) * self.scaling


class TrainedNorm(AdapterLayer):
    """A normalisation layer computing with a trained fp32 copy of its weight (and bias): its own forward, so
    any norm (LayerNorm, RMSNorm, Gemma's 1 + w) works unchanged."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.facts = None
        self.norm_weight = nn.Parameter(base_layer.weight.detach().float().clone())
        bias = getattr(base_layer, "bias", None)
        self.norm_bias = nn.Parameter(bias.detach().float().clone()) if isinstance(bias, nn.Parameter) else None

    def forward(self, *args, **kwargs):
        weights = {"weight": self.norm_weight.to(self.base_layer.weight.dtype)}
        if self.norm_bias is not None:
            weights["bias"] = self.norm_bias.to(self.base_layer.bias.dtype)
        return functional_call(self.base_layer, weights, args, kwargs)


class PeftBottleneckConfig(PeftConfigBase):
    """peftkit's adapter_config.json of a bottleneck adapter (no peft equivalent)."""

    placement: Literal["serial", "parallel"] | None = None
    reduction_factor: float | None = Field(None, gt=0)
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] | None = None
    after: Literal["attention", "ffn", "both"] | None = None
    scaling: float | None = None
    train_norms: bool = False


class Bottleneck(Method):
    name = "bottleneck"
    title = "Bottleneck"
    peft_type = "BOTTLENECK"
    config = BottleneckConfig
    peft_config = PeftBottleneckConfig
    param_names = ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias",
                   "norm_weight", "norm_bias")
    mergeable = False

    @classmethod
    def select_targets(cls, model: nn.Module, cfg: BottleneckConfig, every_entry: bool) -> list[str]:
        """Each decoder block's attention and/or MLP (by `after`), and with `train_norms` every norm layer."""
        blocks = decoder_blocks(model, cls.name)
        names = [b.attention for b in blocks if cfg.after != "ffn"] + [b.mlp for b in blocks if cfg.after != "attention"]
        order = {n: i for i, (n, _) in enumerate(model.named_modules())}
        # The norms first: one inside a wrapped block (Gemma 3's and Qwen3's q_norm and k_norm, in the attention) is
        # then wrapped while its path still reaches it (after, `inject_adapters` found no `q_norm` on the block's
        # wrapper), and saved under the block's `base_layer`. A norm draws no random number, so the blocks' initial
        # weights are those of the model order.
        norms = norm_layers(model) if cfg.train_norms else []
        return sorted(norms, key=order.__getitem__) + sorted(names, key=order.__getitem__)

    @classmethod
    def wrap(cls, base: nn.Module, cfg: BottleneckConfig, path: str) -> AdapterLayer:
        if "norm" in type(base).__name__.lower():
            return TrainedNorm(base)
        hidden = getattr(getattr(base, "config", None), "hidden_size", None) or _hidden_size(base, path)
        if int(hidden // cfg.reduction_factor) < 1:
            raise PeftkitError(f"adapter.reduction_factor: {cfg.reduction_factor} leaves no bottleneck for hidden size "
                               f"{hidden} ('{path}'); use at most {hidden}.")
        return BottleneckLayer(base, cfg, hidden)

    @classmethod
    def to_peft(cls, cfg: BottleneckConfig, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        return cls.peft_common(cfg, targets, base_name) | {
            "placement": cfg.placement, "reduction_factor": cfg.reduction_factor, "non_linearity": cfg.non_linearity,
            "after": cfg.after, "scaling": cfg.scaling, "train_norms": cfg.train_norms}

    @classmethod
    def from_peft(cls, peft: PeftBottleneckConfig, config_file: Path) -> BottleneckConfig:
        for key in ("placement", "reduction_factor", "non_linearity", "after", "scaling"):
            if getattr(peft, key) is None:
                raise PeftkitError(f'{config_file}: "{key}" is missing; a bottleneck adapter needs it. {REEXPORT}')
        return BottleneckConfig(method="bottleneck", placement=peft.placement, reduction_factor=peft.reduction_factor,
                                non_linearity=peft.non_linearity, after=peft.after, scaling=peft.scaling,
                                train_norms=peft.train_norms, modules_to_save=peft.modules_to_save or [])

    @classmethod
    def kept_for_backward(cls, cfg: BottleneckConfig, layer: AdapterLayer) -> tuple[int, int]:
        # Per token: the fp32 input of down (hidden), its output and the activation's (2 x m); a trained norm:
        # its normalised input (hidden), for the weight's gradient.
        if isinstance(layer, TrainedNorm):
            return layer.norm_weight.numel(), 0
        return layer.adapter_down.in_features + 2 * layer.adapter_down.out_features, 0

    @classmethod
    def describe(cls, cfg: BottleneckConfig) -> str:
        return f"{cls.title} {cfg.placement} after {cfg.after} reduction_factor={cfg.reduction_factor:g}"

    @classmethod
    def randomize(cls, layer: AdapterLayer, generator: torch.Generator, std: float) -> None:
        # The up-projection (and a norm's change) a tenth of `std`: the adapter's output adds to hidden states
        # of a size set by the base (GPT-2's 0.02 init gives small ones), which it must change, not swamp.
        with torch.no_grad():
            for name, p in layer.adapter_params().items():
                base = 1.0 if name == "norm_weight" else 0.0  # a norm's scale around 1
                p.copy_(base + torch.randn(p.shape, generator=generator) * std * (1.0 if "down" in name else 0.1))


def _hidden_size(base: nn.Module, path: str) -> int:
    """The hidden size a sub-layer without a `config` reads and writes: its first Linear/Conv1D's input size, else
    the model config's hidden_size that transformers' fused-expert MoE blocks (Mixtral's, Qwen3-MoE's) copy into
    their router and experts (`hidden_dim`), which hold no Linear layer."""
    from peftkit.methods.layer import is_conv1d, linear_shape

    for module in base.modules():
        if isinstance(module, nn.Linear) or is_conv1d(module):
            return linear_shape(module)[0]
    copied = {dim for module in base.modules() if isinstance(dim := getattr(module, "hidden_dim", None), int)}
    if len(copied) == 1:
        return copied.pop()
    raise PeftkitError(f"adapter.method bottleneck: cannot tell the hidden size of '{path}' ({type(base).__name__}): "
                       "it holds no Linear layer, nor a hidden_dim (transformers' copy of the model's hidden_size in "
                       "fused experts); leave that sub-layer out with adapter.after (attention or ffn).")


for _layer in (BottleneckLayer, TrainedNorm):
    _layer.method = Bottleneck
