"""The host wrapper around a frozen base layer that every weight-update method's layer subclasses
(`AdapterLayer`: merge and unmerge written once, through the method's `merge_weight`), the model-level tensors
some methods share (`SharedTensors`), and the helpers that read a base layer: Linear, transformers' Conv1D,
bitsandbytes layers. The method protocol these layers serve is `peftkit.methods.base.Method`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from peftkit.errors import PeftkitError

if TYPE_CHECKING:
    from peftkit.methods.base import Method


def is_quantized(layer: nn.Module) -> bool:
    """A bitsandbytes 4-bit or 8-bit linear layer."""
    return type(layer).__module__.startswith("bitsandbytes")


def suffix_match(name: str, entry: str) -> bool:
    """`q_proj` names `model.layers.0.self_attn.q_proj`, as in PEFT: whole path components only."""
    return name == entry or name.endswith("." + entry)


def is_conv1d(layer: nn.Module) -> bool:
    """transformers' GPT-2 style Conv1D: a linear layer whose weight is stored (in, out)."""
    return type(layer).__name__ == "Conv1D" and type(layer).__module__.startswith("transformers")


def refuse_non_lookup(module: nn.Module, path: str, key: str) -> None:
    """Refuse an embedding whose forward takes more than the ids it looks up (OPT's learned positions: the attention
    mask, the cache's length, position ids): an adapter's embedding layer calls it with the ids alone, and the model's
    first forward failed with a TypeError. A subclass that only scales its lookup (Gemma's) takes ids alone."""
    import inspect

    forward = type(module).forward
    if not isinstance(module, nn.Embedding) or forward is nn.Embedding.forward:
        return
    inputs = list(inspect.signature(forward).parameters)[1:]
    if len(inputs) > 1:
        raise PeftkitError(f"{key}: '{path}' is a {type(module).__name__}, whose forward takes ({', '.join(inputs)}), "
                           "not token ids to look up (learned positions), so no adapter can wrap it; leave it out, "
                           "or train it whole in adapter.modules_to_save.")


def from_conv1d(layer: nn.Module) -> bool:
    """GPT-2's Conv1D, or a bitsandbytes layer transformers made from one (it quantizes the transposed weight, (out,
    in), and keeps the class it replaced in `source_cls`): the plain model a merge writes, and peft's model of the
    unquantized base, still hold a Conv1D there. The methods that refuse Conv1D refuse both, or a run over a 4-bit
    GPT-2 trained to the end and then could not merge its adapter."""
    if is_conv1d(layer):
        return True
    source = getattr(layer, "source_cls", None)
    return is_quantized(layer) and isinstance(source, type) and source.__name__ == "Conv1D"


def conv1d_kind(layer: nn.Module) -> str:
    """How a refusal names a `from_conv1d` layer."""
    return "GPT-2's Conv1D" if is_conv1d(layer) else "GPT-2's Conv1D, quantized (a merge writes it back as a Conv1D)"


def not_a_linear(layer: nn.Module) -> str | None:
    """How a method that adapts nn.Linear (and bitsandbytes') layers only names a layer it must refuse: GPT-2's Conv1D,
    quantized or not (`from_conv1d`: bitsandbytes' layers are nn.Linear too, and one made from a Conv1D passed six
    methods' own checks), or another class; None for a layer it takes."""
    if from_conv1d(layer):
        return conv1d_kind(layer)
    return None if isinstance(layer, nn.Linear) else f"an {type(layer).__name__}"


def dense_weight(base_layer: nn.Module, fan_in_fan_out: bool = False) -> torch.Tensor:
    """The base weight as (out, in), fp32 (a 4-bit/8-bit base's dequantized): for methods whose update is computed
    from the weight itself (DeFT, PEANuT)."""
    if is_quantized(base_layer):
        from peftkit.merge_weights import dequantize_weight  # (peftkit.merge_weights imports the methods)

        return dequantize_weight(base_layer).float()
    weight = base_layer.weight.detach().float()
    return weight.T if fan_in_fan_out else weight


def refuse_embedding(base: nn.Module, path: str, title: str) -> None:
    """Refuse an embedding target for a method whose peft layer adapts Linear and Conv1D layers only."""
    if isinstance(base, nn.Embedding):
        raise PeftkitError(f"adapter.target_modules: '{path}' is an embedding; {title} (as peft's) adapts Linear and "
                           "Conv1D layers only. Leave embeddings out of adapter.target_modules (all-linear does), or use "
                           "adapter.method: lora.")


def linear_shape(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, Conv1D or bitsandbytes linear layer."""
    if is_conv1d(layer):
        return layer.weight.shape[0], layer.weight.shape[1]
    return layer.in_features, layer.out_features


class SharedTensors(nn.Module):
    """Model-level tensors every adapter layer of a model uses (VeRA's frozen projections, VB-LoRA's trained vector
    bank), by PEFT name.

    One module, registered under each layer as `shared`: `.to()` moves it once and the layers keep sharing it.
    Non-persistent buffers, except those named in `trained` (parameters, trained once for all the layers); in no
    layer's `adapter_params()`; the adapter file carries them under `base_model.<name>` when `saved` (else they are
    regenerated from settings).
    """

    def __init__(self, tensors: dict[str, torch.Tensor], saved: bool, trained: tuple[str, ...] = ()) -> None:
        super().__init__()
        for name, tensor in tensors.items():
            if name in trained:
                self.register_parameter(name, nn.Parameter(tensor))
            else:
                self.register_buffer(name, tensor, persistent=False)
        self.saved = saved

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every shared tensor by name, frozen and trained."""
        return dict(self.named_buffers()) | dict(self.named_parameters())


class AdapterLayer(nn.Module):
    """Host wrapper: holds the frozen base layer (`self.base_layer`) and the method's own parameters.

    Subclasses set `method`, `facts` (what `method.merge_weight` needs beyond the tensors) and define
    `forward`; merging, unmerging and the adapter-parameter protocol are written here once.
    """

    method: ClassVar[type[Method]]
    base_layer: nn.Module
    facts: Any

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.merged = False
        self.shared: SharedTensors | None = None
        self.tied_to: str | None = None  # (another module holding the base weight: `mark_tied`)

    @property
    def weight(self) -> torch.Tensor:
        # Code that inspects `module.weight` (transformers' dtype/device probes) sees the base weight.
        return self.base_layer.weight

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The trainable parameters, by their name relative to this module (= their PEFT key suffix); not the shared
        ones (`SharedTensors`), saved once as `base_model.<name>`."""
        return {n: p for n, p in self.named_parameters() if not n.startswith(("base_layer.", "shared."))}

    def parts(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors by PEFT key suffix, and the shared ones by name, as `merge_weight` takes them
        from a state dict too."""
        shared = {} if self.shared is None else self.shared.tensors()
        return {n: p.detach() for n, p in self.adapter_params().items()} | {n: t.detach() for n, t in shared.items()}

    def merge(self) -> None:
        """Fold the update into the base weight. Idempotent; refuses a quantized base or a non-finite result."""
        if self.merged:
            return
        refuse_unmergeable(self.method)
        if is_quantized(self.base_layer):
            raise PeftkitError(
                "Cannot merge in place into a quantized (bitsandbytes) layer: the sum would be re-quantized and "
                "drift from what was trained. Use `peftkit merge`, which dequantizes the base to fp32 first."
            )
        weight, bias, parts = self.base_layer.weight, getattr(self.base_layer, "bias", None), self.parts()
        if not isinstance(weight, nn.Parameter):  # (a head with trained token rows: its weight is computed)
            raise PeftkitError("Cannot merge in place into a layer whose weight is computed (trained token rows); "
                               "use `peftkit merge`.")
        refuse_stacked(weight, self.base_layer)
        refuse_tied(self)
        if bias is None:
            check_bias_to_merge(parts, "this layer", self.method)
        merged = self.method.merge_weight(weight.data.float(), parts, self.facts)
        merged_bias = None if bias is None else self.method.merge_bias_of(bias.data.float(), weight.data.float(), parts,
                                                                          self.facts)
        if not (torch.isfinite(merged).all() and (merged_bias is None or torch.isfinite(merged_bias).all())):
            raise PeftkitError("Merging produced NaN/inf weights; the adapter is broken and was not merged.")
        cast, cast_bias = merged.to(weight.dtype), None if merged_bias is None else merged_bias.to(bias.dtype)
        check_in_range(cast, merged, None)
        if cast_bias is not None:
            check_in_range(cast_bias, merged_bias, None)
        weight.data.copy_(cast)
        if cast_bias is not None:
            bias.data.copy_(cast_bias)
        self.merged = True

    def unmerge(self) -> None:
        """Take the update out again. Idempotent. Exact up to the rounding of the base dtype."""
        if not self.merged:
            return
        weight, bias, parts = self.base_layer.weight, getattr(self.base_layer, "bias", None), self.parts()
        weight.data.copy_(self.method.unmerge_weight(weight.data.float(), parts, self.facts).to(weight.dtype))
        if bias is not None and (restored := self.method.unmerge_bias(bias.data.float(), parts, self.facts)) is not None:
            bias.data.copy_(restored.to(bias.dtype))
        self.merged = False


class KeptWeightLayer(AdapterLayer):
    """An adapter layer whose in-place merge keeps the weight before it (on the CPU, as peft keeps it) and whose
    unmerge puts it back: for an update that cannot be taken out of the merged weight exactly (HiRA's W (1 + B A),
    which peft divides back, inexact and undefined where 1 + B A is 0; PEANuT's, a nonlinear function of W)."""

    def merge(self) -> None:
        if self.merged:
            return
        kept = self.base_layer.weight.detach().clone().cpu()
        super().merge()
        self._before_merge = kept

    def unmerge(self) -> None:
        if not self.merged:
            return
        self.base_layer.weight.data.copy_(self._before_merge)
        self._before_merge = None
        self.merged = False


def refuse_stacked(weight: torch.Tensor, owner: nn.Module) -> None:
    """Refuse an in-place merge into a weight several stacked layers share (layer_replication marks them and the
    module `owner` that holds them: `stacked_copies`; a deepcopy of the model keeps the module's mark and the sharing,
    not the Parameter's mark): each copy's update would be folded into it (peft's merge_and_unload adds them all up
    there). A Linear's weight and a 3-D experts' parameter (target_parameters) alike."""
    copies = max(getattr(weight, "stacked_copies", 0), getattr(owner, "stacked_copies", 0))
    if copies > 1:
        raise PeftkitError(f"Cannot merge in place into a layer whose weight {copies} stacked "
                           "layers share (layer_replication): each copy's update would change them all. Use "
                           "`peftkit merge` or merged_model, which write each layer's weight on its own.")


def mark_tied(model: nn.Module, layers: dict[str, AdapterLayer]) -> None:
    """Set each layer's `tied_to`: the path of another module of `model` whose weight is its base weight (an output
    head tied to the input embeddings, tie_word_embeddings), or None."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name.rpartition(".")[0].removesuffix(".base_layer"))
    for path, layer in layers.items():
        others = [o for o in owners.get(id(getattr(layer.base_layer, "weight", None)), []) if o != path]
        layer.tied_to = others[0] if others else None


def refuse_tied(layer: AdapterLayer) -> None:
    """Refuse an in-place merge into a weight another module holds too (`mark_tied`): the input embeddings' update
    folded into the weight the output head is tied to changes every logit too (LoRA's logits 143 off on a tiny Qwen2;
    peft's merge_and_unload does the same). Not for a method whose tied layers merge as one (`merges_tied`)."""
    if getattr(layer, "tied_to", None) and not layer.method.merges_tied:
        raise PeftkitError(f"Cannot merge in place into a layer whose weight '{layer.tied_to}' holds too (tied "
                           "weights: tie_word_embeddings): it would change with it, unlike the unmerged model. Use "
                           "`peftkit merge` or merged_model, which untie them.")


def check_in_range(cast: torch.Tensor, exact: torch.Tensor, module: str | None) -> None:
    """Refuse a merged tensor whose cast to the output dtype overflowed (a float16 output holds at most 65504): a
    finite value of `exact` that the cast would have written as inf without a word. A value `exact` holds as inf or
    NaN already (a base's -inf mask or +-inf clamp bound, in a buffer no adapter touches) is no overflow: the cast
    keeps it as it is, as a float32 output would. `module` None: an in-place merge of one layer, which leaves its
    weight as it was."""
    if torch.isfinite(cast).all():
        return
    overflowed = torch.isfinite(exact) & ~torch.isfinite(cast)
    if overflowed.any():
        where, fix = (f"'{module}'", "merge into bfloat16 or float32 (peftkit merge --dtype)") if module else (
            "this layer", "the layer was left unmerged; convert it to bfloat16 or float32 first")
        raise PeftkitError(f"Merging {where} gives weights beyond what {str(cast.dtype).removeprefix('torch.')} "
                           f"holds (largest magnitude {exact[overflowed].abs().max().item():.6g}): {fix}.")


def check_bias_to_merge(parts: dict[str, torch.Tensor], module: str, method: type[Method]) -> None:
    """Refuse to merge a layer whose adapter has a bias (LoRA's lora_bias; BEFT's, `Method.needs_bias`) into a base
    layer without one: the sum has nowhere to go (peft refuses it too)."""
    if method.needs_bias:
        raise PeftkitError(f"{module} has no bias, so its {method.title} adapter, a trained bias, cannot be merged into "
                           f"it (peft cannot either): use the adapter unmerged, or adapt layers that have a bias "
                           "(Qwen2's q/k/v_proj).")
    if biases := [name for name in parts if name.endswith(".bias")]:
        raise PeftkitError(f"The adapter has a bias ({biases[0]}, lora_bias) on {module}, whose base layer has none, "
                           "so it cannot be merged (peft cannot either): use the adapter unmerged, or train it with "
                           "lora_bias: false.")


def refuse_unmergeable(method: type[Method], cfg: Any = None) -> None:
    """A PeftkitError for a method whose adapter (of settings `cfg`, where given) cannot be folded into the base
    (`Method.merge_refusal`)."""
    if refusal := method.merge_refusal(cfg):
        raise PeftkitError(refusal)
