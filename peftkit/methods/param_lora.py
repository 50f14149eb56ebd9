"""LoRA on parameters (peft's `target_parameters`): a low-rank update of a weight that no Linear layer holds, above all
the experts of a mixture-of-experts model, which transformers 5 keeps fused in 3-D parameters (Mixtral's
`experts.gate_up_proj`, (experts, 2 x intermediate, hidden), and `experts.down_proj`).

`adapter.target_parameters` names parameters as peft matches them: a parameter's path (`model.layers.0.mlp.experts.
down_proj`) equal to an entry or ending in `.` + the entry (`experts.down_proj`, `down_proj`). The module holding
the parameter is wrapped (`ParamLora`), each of its targeted parameters in the order the module registers them, one
wrapper around the other, as peft's `ParamWrapper`s nest, so the keys are peft's: the outer parameter's
`<module>.lora_A.weight`, the inner's `<module>.base_layer.lora_A.weight`.

For a 3-D parameter of E experts, each expert gets its own rank-r update: lora_A is (r E, in), lora_B (out, r E),
and expert e's update is s B_e A_e, with A_e rows e r .. e r + r - 1 of lora_A and B_e the columns e, E + e, ... of
lora_B (peft's layout). The weight's layout is (E, out, in), or (E, in, out) for a module marked `is_transposed`
(gpt-oss); a 2-D parameter is (out, in). In each forward the module's own code (a loop over experts, or transformers'
grouped kernels) runs unchanged, through `torch.func.functional_call`, given W + s B A as W and its factors
(`peftkit.methods.factored_weight.FactoredWeight`): each expert's product applies its update to the tokens routed to it,
and no adapted stack is made (peft's builds W + s B A whole, keeps it and computes its gradient). A use of the weight
the factors do not serve gets W + s B A whole, as peft's (one batched product added to W, in its dtype, rounded once).

As peft: no dropout (the update is not a function of the input), DoRA, lora_bias or aLoRA. A merge adds the update
to the parameter.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from pydantic import field_validator
from torch import nn
from torch.func import functional_call

from peftkit.errors import PeftkitError, PeftkitWarning, did_you_mean
from peftkit.methods.base import PeftConfigBase
from peftkit.methods.factored_weight import FactoredWeight
from peftkit.methods.layer import AdapterLayer, refuse_stacked
from peftkit.section import AdapterSection

ParameterNames = list[str] | None


def _check_names(value: ParameterNames) -> ParameterNames:
    if value is not None and (not value or any(not name.strip(".") for name in value)):
        raise ValueError("is empty; name the parameters to adapt (e.g. [experts.gate_up_proj, experts.down_proj]), or "
                         "leave the key out")
    return value


class TargetParameters(AdapterSection):
    """The `adapter` key that puts LoRA on parameters."""

    target_parameters: ParameterNames = None
    """Parameters to adapt with LoRA, matched as peft matches them (a path's end after a dot): the fused expert
    weights of a mixture of experts, `[experts.gate_up_proj, experts.down_proj]`; one rank-r update per expert."""

    _names = field_validator("target_parameters")(lambda value: _check_names(value))


class PeftTargetParameters(PeftConfigBase):
    """adapter_config.json's target_parameters. An empty list is none: peft 0.21 writes `[]` for every LoRA without
    target_parameters on the model types whose experts it converts (Mixtral, Qwen3-MoE), and loads it as none."""

    target_parameters: ParameterNames = None
    _names = field_validator("target_parameters")(lambda value: _check_names(value or None))

    def parameter_settings(self) -> dict[str, Any]:
        return {"target_parameters": self.target_parameters} if self.target_parameters else {}


def _innermost(module: nn.Module) -> nn.Module:
    while isinstance(module, ParamLora):
        module = module.base_layer
    return module


class ParamLora(AdapterLayer):
    """LoRA on one parameter (`parameter_name`) of the module it wraps (peft's `ParamWrapper`)."""

    def __init__(self, base_layer: nn.Module, parameter_name: str, r: int, alpha: float, use_rslora: bool = False) -> None:
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        self.depth = 0  # wrappers between this one and the module: the parameter's path from base_layer
        inner = base_layer
        while isinstance(inner, ParamLora):
            inner, self.depth = inner.base_layer, self.depth + 1
        weight = getattr(inner, parameter_name)
        if weight.dim() == 3:
            self.experts = weight.shape[0]
            self.transposed = bool(getattr(inner, "is_transposed", False))  # (E, in, out), else (E, out, in)
            in_features, out_features = (weight.shape[1], weight.shape[2]) if self.transposed else \
                (weight.shape[2], weight.shape[1])
        elif weight.dim() == 2:
            self.experts, self.transposed = 1, False
            out_features, in_features = weight.shape
        else:
            raise PeftkitError(f"adapter.target_parameters: '{parameter_name}' is a {weight.dim()}-D parameter; LoRA "
                               "adapts 2-D weights and 3-D expert stacks (as peft).")
        self.r, self.in_features, self.out_features = r, in_features, out_features
        config = getattr(inner, "config", None)  # (the experts a token is routed to: all, for a 2-D weight)
        self.routed = getattr(config, "num_experts_per_tok", None) or self.experts if self.experts > 1 else 1
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        # Drawn on the CPU in fp32 (one seed, one adapter on any device), then moved beside the weight.
        self.lora_A = nn.Linear(in_features, r * self.experts, bias=False, device="cpu", dtype=torch.float32)
        self.lora_B = nn.Linear(r * self.experts, out_features, bias=False, device="cpu", dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_A.to(weight.device)
        self.lora_B.to(weight.device)

    @property
    def weight(self) -> torch.Tensor:
        return self.param()

    def param(self) -> torch.Tensor:
        return getattr(_innermost(self.base_layer), self.parameter_name)

    def delta_weight(self) -> torch.Tensor:
        """s B A in fp32, in the parameter's layout (for merges)."""
        a, b = self.lora_A.weight, self.lora_B.weight
        if self.param().dim() == 2:
            return (b @ a) * self.scaling
        a = a.reshape(self.experts, -1, a.shape[-1])  # (E, r, in)
        b = b.reshape(b.shape[0], -1, self.experts)  # (out, r, E)
        return torch.einsum("ore,eri->eio" if self.transposed else "ore,eri->eoi", b, a) * self.scaling

    def adapted_weight(self) -> FactoredWeight:
        """W + s B A in the parameter's layout and dtype, kept as W and its factors (`FactoredWeight`): the experts'
        products apply each expert's update to its routed tokens; any other use makes it whole as peft's forward does
        (one batched product added to W, rounded once)."""
        weight = self.param()
        a, b = self.lora_A.weight.to(weight.dtype), self.lora_B.weight.to(weight.dtype)
        if weight.dim() == 2:
            return FactoredWeight(weight, b, a, self.scaling)
        a = a.reshape(self.experts, -1, a.shape[-1])  # (E, r, in)
        b = b.reshape(b.shape[0], -1, self.experts).permute(2, 0, 1)  # (E, out, r)
        lhs, rhs = (a.transpose(-2, -1), b.transpose(-2, -1)) if self.transposed else (b, a)
        return FactoredWeight(weight, lhs, rhs, self.scaling)

    def forward(self, *args, **kwargs):
        if self.merged:
            return self.base_layer(*args, **kwargs)
        path = ".".join(["base_layer"] * self.depth + [self.parameter_name])
        return functional_call(self.base_layer, {path: self.adapted_weight()}, args, kwargs, tie_weights=False,
                               strict=False)

    def merge(self) -> None:
        if self.merged:
            return
        weight = self.param()
        refuse_stacked(weight, _innermost(self.base_layer))
        with torch.no_grad():
            weight.copy_((weight.float() + self.delta_weight()).to(weight.dtype))
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        weight = self.param()
        with torch.no_grad():
            weight.copy_((weight.float() - self.delta_weight()).to(weight.dtype))
        self.merged = False


def _matches(key: str, names: list[str]) -> bool:
    """peft's rule: a parameter's path equal to an entry, or ending in `.` + one."""
    return any(key == name or key.endswith("." + name) for name in names)


def _refuse_wrapped(model: nn.Module, unmatched: list[str]) -> None:
    """An entry that names a parameter of a layer target_modules wrapped already (`q_proj.weight` beside all-linear:
    its path is now `q_proj.base_layer.weight`) is said as such (peft refuses both), not as a typo with another
    parameter suggested (it was 'names no parameter ... Did you mean lm_head.weight?')."""
    for key, _ in model.named_parameters():
        plain = key.replace(".base_layer.", ".")
        if plain != key and (name := next((n for n in unmatched if _matches(plain, [n])), None)):
            module = plain.rpartition(".")[0]
            raise PeftkitError(f"adapter.target_parameters: '{name}' names '{plain}', a parameter of '{module}', which "
                               "adapter.target_modules adapts already (peft refuses both); leave it out of one of them.")


def wrap_parameters(model: nn.Module, cfg: Any, wrapped: set[str], every_entry: bool = True) -> list[str]:
    """Wrap the parameters `cfg.target_parameters` names (each module's in the order it registers them); the paths
    of the adapted parameters. With `every_entry` (a recipe's) every entry must name a parameter (a typo is refused,
    naming the model's); a saved adapter's list may name more (one written for several architectures: as peft, its
    weights say what loads). A module `target_modules` wrapped (`wrapped`) cannot have its parameters adapted too
    (peft refuses it)."""
    names = cfg.target_parameters or []
    found: list[tuple[str, str]] = []
    for module_name, module in list(model.named_modules()):
        for param_name, _ in module.named_parameters(recurse=False):
            key = f"{module_name}.{param_name}" if module_name else param_name
            if _matches(key, names):
                found.append((module_name, param_name))
    unmatched = [name for name in names if not any(_matches(f"{m}.{p}", [name]) for m, p in found)]
    if unmatched and every_entry:
        _refuse_wrapped(model, unmatched)
        candidates = [n for n, p in model.named_parameters() if p.dim() in (2, 3)]
        raise PeftkitError(f"adapter.target_parameters: '{unmatched[0]}' names no parameter of this model."
                           f"{did_you_mean(unmatched[0], candidates)} Entries match a parameter's path or its end after "
                           f"a dot (e.g. experts.down_proj); this model's 3-D ones: "
                           f"{', '.join(n for n, p in model.named_parameters() if p.dim() == 3)[:300] or 'none'}.")
    for module_name, param_name in found:
        if not module_name:
            raise PeftkitError(f"adapter.target_parameters: '{param_name}' sits on the model itself, which cannot be "
                               "wrapped (peft refuses it too); name a parameter of a submodule.")
        if module_name in wrapped:
            raise PeftkitError(f"adapter.target_parameters: '{module_name}.{param_name}' is a parameter of "
                               f"'{module_name}', which adapter.target_modules adapts already (peft refuses both); "
                               "leave it out of one of them.")
        parent_name, _, child = module_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        r, alpha = cfg.rank_and_alpha(f"{module_name}.{param_name}")  # (peft matches the patterns so)
        layer = ParamLora(getattr(parent, child), param_name, r, alpha, cfg.use_rslora)
        if cfg.init == "gaussian":
            with torch.no_grad():
                layer.lora_A.weight.normal_(std=1 / r)
        setattr(parent, child, layer)
    return [f"{m}.{p}" for m, p in found]


def without_holders(model: nn.Module, cfg: Any) -> Any:
    """`cfg` with the `target_modules` entries left out that name only modules holding a targeted parameter: a peft
    file with `target_modules: null` gets its modules from the weights' keys, where a parameter's wrapper looks like
    a module's LoRA."""
    modules = dict(model.named_modules())
    names = cfg.target_parameters

    def holds(entry: str) -> bool:
        paths = [path for path in modules if path == entry or path.endswith("." + entry)]
        return bool(paths) and all(any(_matches(f"{path}.{name}", names)
                                       for name, _ in modules[path].named_parameters(recurse=False)) for path in paths)

    kept = [entry for entry in cfg.target_modules if not holds(entry)]
    return cfg.model_copy(update={"target_modules": kept}) if len(kept) < len(cfg.target_modules) else cfg


def note_fused_experts(model: nn.Module) -> None:
    """Warn that all-linear leaves out a mixture of experts' fused 3-D weights, where a model has them: peft's
    all-linear adds them (and the router), as transformers 4's took them, being Linear layers there."""
    fused = sorted({name.split(".")[-2] + "." + name.split(".")[-1] for name, p in model.named_parameters()
                    if p.dim() == 3 and name.count(".") >= 1})
    if fused:
        warnings.warn(PeftkitWarning(
            f"adapter.target_modules: all-linear adapts Linear layers, and this model's experts are fused 3-D "
            f"parameters ({', '.join(fused[:4])}), which it leaves out: add adapter.target_parameters: "
            f"[{', '.join(fused[:4])}] to adapt them. (peft's all-linear adds them, and the router, as transformers "
            "4's all-linear did.)"), stacklevel=3)


def check_parameter_settings(cfg: Any) -> str | None:
    """Why LoRA settings cannot go with target_parameters (peft refuses each), or None."""
    if not cfg.target_parameters:
        return None
    for key, bad in (("dropout", cfg.dropout > 0), ("use_dora", cfg.use_dora), ("lora_bias", cfg.lora_bias),
                     ("alora_invocation_tokens", bool(cfg.alora_invocation_tokens)),
                     ("init", cfg.init not in ("default", "gaussian"))):
        if bad:
            why = "the update of a weight is no function of the input" if key == "dropout" else "it is plain LoRA there"
            return (f"adapter.target_parameters with {key} is not supported (peft refuses it: {why}); remove {key}, "
                    "or target_parameters")
    return None
