"""An adapted model folded, in memory, into a plain transformers model equal to base + adapter.

The merge always starts from the weights the adapter was trained against: for a 4-bit or 8-bit base that
is dequant(quant(W)), not the original W (merging into W is the classic QLoRA bug whose merged outputs
drift from the trained model). The delta is added in fp32 and the result cast once to the output dtype.
`peftkit.merge` saves the result (`peftkit merge`, export.merged).
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable

import torch
from torch import nn

from peftkit.adapters import PEFT_PREFIX, SHARED_PREFIX, adapter_layers, shared_holders
from peftkit.adapters.state_dicts import adapter_state_dict, merge_state_dict
from peftkit.errors import PeftkitError, PeftkitWarning
from peftkit.methods import method_of
from peftkit.methods.layer import from_conv1d, is_conv1d, is_quantized, refuse_unmergeable
from peftkit.methods.token_rows import TOKEN_ROWS, TokenAdapter, merge_rows, plain_name
from peftkit.recipe import AdapterConfig


class MergeWarning(PeftkitWarning):
    """Something the user should know about a merge that still went ahead."""


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The fp32 weight a bitsandbytes Linear4bit/Linear8bitLt computes with."""
    import bitsandbytes.functional as bnbF

    weight = module.weight
    if getattr(weight, "quant_state", None) is not None:  # 4-bit, with nested (double-quant) stats if any
        return bnbF.dequantize_4bit(*quantized_codes(module)).float()
    scb = getattr(weight, "SCB", None)
    if scb is None:  # (a Linear4bit not quantized yet, on the meta device, has neither: `peftkit.model_checks`)
        scb = getattr(getattr(module, "state", None), "SCB", None)
    if weight.dtype == torch.int8 and scb is not None:  # LLM.int8(): row-wise absmax scaling by SCB / 127
        return weight.data.float() * scb.float().unsqueeze(1) / 127.0
    return weight.data.float()


def quantized_codes(module: nn.Module):
    """(packed 4-bit codes, QuantState) of a Linear4bit in bitsandbytes' usual flat layout, which
    `bitsandbytes.functional.dequantize_4bit` reads (a weight repacked for the CPU kernel unpacked, on copies)."""
    data, state = module.weight.data, module.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        data, state = _unpack_cpu_inference_layout(data, state)
    return data, state


def _unpack_cpu_inference_layout(data: torch.Tensor, state):
    """Codes and a flat QuantState for a Linear4bit weight that bitsandbytes repacked for its CPU kernel.

    On a CPU with AVX512-BF16, bitsandbytes (0.49+) rewrites a Linear4bit's weight in place on its first
    eval-mode forward without grad: the codes are re-tiled in 32-row blocks, the double-quant absmax is
    expanded, transposed to (in/blocksize, out) and rounded to bf16, and `nested` is cleared. Read as usual,
    that layout dequantizes to garbage (errors as large as the weights). We undo the tiling on copies, the
    module is untouched. The absmax stays bf16-rounded: that is what the layer now computes with, and the
    original fp32 values are gone (a weight moves by at most 2^-8 of itself, bf16's unit roundoff).
    """
    import copy

    import bitsandbytes.functional as bnbF

    # bitsandbytes' own inverse (private), on a shallow copy: it reassigns attributes of the state it gets.
    codes, _ = bnbF._convert_weight_packed_for_cpu_inverse(data, copy.copy(state))
    flat = bnbF.QuantState(
        absmax=state.absmax.T.reshape(-1).float(),  # (in/blocksize, out) -> the usual row-major block order
        shape=state.shape, code=state.code, blocksize=state.blocksize, quant_type=state.quant_type,
        dtype=torch.float32,
    )
    return codes, flat


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's plain state dict (original key names, quantized weights dequantized to fp32),
    leaving out adapter parameters. Works on an injected model or a bare one."""
    return {key: read() for key, read in base_tensors(model).items()}


def base_tensors(model: nn.Module) -> dict[str, Callable[[], torch.Tensor]]:
    """`base_state_dict`'s entries, each made when called: one quantized layer dequantized at a time
    (`peftkit.requantized.update_kept` reads the base layer by layer, beside the merged model)."""
    adapters = adapter_layers(model)
    skip = _non_persistent(model)
    state: dict[str, Callable[[], torch.Tensor]] = {}
    for name, module in model.named_modules():
        if _adapter_own(name, adapters):
            continue  # the adapter's own modules (lora_A, lora_B, dropout, ...)
        key = plain_name(name)
        for pname, p in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if f"{name}.{pname}" in skip or isinstance(module, TokenAdapter):  # (its trained rows)
                continue
            state[f"{key}.{pname}" if key else pname] = functools.partial(_base_value, module, pname, p)
    return state


def _base_value(module: nn.Module, pname: str, p: torch.Tensor) -> torch.Tensor:
    """One tensor of `base_state_dict`: a quantized weight dequantized, in the plain model's layout, on the CPU."""
    value = dequantize_weight(module) if (is_quantized(module) and pname == "weight") else p.detach()
    if pname == "weight" and _quantized_conv1d(module):  # back to the plain Conv1D's (in, out)
        value = value.T.contiguous()
    return value.cpu()


def _adapter_own(name: str, adapters: dict[str, nn.Module]) -> bool:
    """The module at `name` belongs to an adapter layer (its lora_A, its shared projections), not to the base."""
    # (the innermost: LoRA on parameters nests a module's wrappers, `experts` around `experts.base_layer`)
    owner = max((a for a in adapters if name == a or name.startswith(a + ".")), key=len, default=None)
    return owner is not None and not name.startswith(owner + ".base_layer")


def _non_persistent(model: nn.Module) -> set[str]:
    """The base model's non-persistent buffers (not those of the adapter layers' own modules: VeRA's projections)."""
    adapters = adapter_layers(model)
    out = set()
    for name, module in model.named_modules():
        if _adapter_own(name, adapters):
            continue
        for b in getattr(module, "_non_persistent_buffers_set", ()):
            out.add(f"{name}.{b}" if name else b)
    return out


def non_persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers computed at construction (rotary inv_freq, ...) that no state dict carries."""
    buffers = dict(model.named_buffers())
    return {plain_name(k): buffers[k].detach().cpu() for k in _non_persistent(model) if k in buffers}


def conv1d_modules(model: nn.Module) -> set[str]:
    """Paths (without `.base_layer`) of layers whose weight is stored (in, out)."""
    return {plain_name(name) for name, m in model.named_modules() if is_conv1d(m)}


def _quantized_conv1d(module: nn.Module) -> bool:
    """A bitsandbytes layer that transformers made from a GPT-2 style Conv1D: it quantized the transposed weight,
    (out, in). The plain model it merges into has the Conv1D."""
    return is_quantized(module) and from_conv1d(module)


def plain_conv1d_modules(model: nn.Module) -> set[str]:
    """Paths of layers whose weight the plain model (and `base_state_dict`) stores (in, out): the Conv1D layers,
    quantized or not."""
    return conv1d_modules(model) | {plain_name(name) for name, m in model.named_modules() if _quantized_conv1d(m)}


def plain_model_from_state(
    config, state: dict[str, torch.Tensor], dtype: torch.dtype, buffers: dict[str, torch.Tensor],
    classifier: bool = False, generation_config=None,
) -> nn.Module:
    """A fresh, unquantized model of `config` holding exactly `state` (strict load).

    Built on the meta device (no random init, no second copy of the weights), then given the tensors of
    `state` and the construction-time `buffers` of the source model. `classifier`: a sequence classifier
    (AutoModelForSequenceClassification; its classes are in `config`), not a causal LM. `generation_config`: the
    source model's (its generation_config.json: a chat model's end-of-turn token, its sampling defaults), which
    one made from `config` alone would lose."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = copy.deepcopy(config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.use_cache = True
    with torch.device("meta"):
        model = (AutoModelForSequenceClassification if classifier else AutoModelForCausalLM).from_config(config, dtype=dtype)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise PeftkitError(f"Merged weights do not fit the model: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}.")
    if tied:
        model.tie_weights()
    else:
        _tie_as_the_weights_say(model)
    for name, value in buffers.items():
        parent, _, leaf = name.rpartition(".")
        (model.get_submodule(parent) if parent else model).register_buffer(leaf, value, persistent=False)
    if generation_config is not None and not classifier:
        model.generation_config = copy.deepcopy(generation_config)
    return model


def _tie_as_the_weights_say(model: nn.Module) -> None:
    """Make a tied config's output head agree with the merged weights. LoRA on the embeddings of a tied model adapts
    the lookup only (as peft's does), and a saved lm_head copy (modules_to_save) the head only: the two matrices then
    differ, and the config must say so, or a loader that ties them (vLLM; transformers' tie_weights, which
    resize_token_embeddings calls) would serve another model. Equal matrices are tied again: one copy on disk."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    configs = [c for c in {id(c): c for c in (model.config, model.config.get_text_config())}.values()
               if getattr(c, "tie_word_embeddings", False)]
    if not configs or head is None or embedding is None or head.weight is embedding.weight:
        return
    if torch.equal(head.weight, embedding.weight):
        model.tie_weights()
        return
    for config in configs:
        config.tie_word_embeddings = False
    if model.config.model_type.startswith("gemma"):
        warnings.warn(f"the adapter changed {model.config.model_type}'s embeddings or output head alone, so the merged "
                      "model is saved with them untied (tie_word_embeddings: false): transformers loads it right, but "
                      "tools that take Gemma's to be tied do not (vLLM refuses it; llama.cpp's GGUF converter drops its "
                      "lm_head). For those, serve the adapter unmerged, or train it without embed_tokens and lm_head.",
                      MergeWarning, stacklevel=4)


def merge_parameters(model: nn.Module, base: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor]
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """LoRA on parameters (target_parameters) folded into the base's parameters in fp32; the adapter's other
    tensors, for `merge_state_dict`."""
    from peftkit.adapters import PEFT_PREFIX
    from peftkit.methods.param_lora import ParamLora

    for path, layer in adapter_layers(model).items():
        if isinstance(layer, ParamLora):
            key = f"{plain_name(path)}.{layer.parameter_name}"
            with torch.no_grad():
                base[key] = base[key].float() + layer.delta_weight().cpu()
            adapter = {k: v for k, v in adapter.items() if not k.startswith(f"{PEFT_PREFIX}{path}.lora_")}
    return base, adapter


def check_state_in_range(state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Refuse a state whose cast to the output dtype overflows, naming the layer (`check_in_range`): not only the
    weights an adapter changed, also a base weight no adapter touched (above 65504, written to float16 as inf); an
    infinity the base holds itself (a -inf mask in a buffer) is no overflow and is written as it is.
    Only a cast to a narrower range is made (fp32 or bf16 to float16, fp32 to bf16), one tensor at a time, so the
    check holds one copy at most and a merge into float32 copies nothing."""
    from peftkit.methods.layer import check_in_range

    for key, tensor in state.items():
        if tensor.is_floating_point() and torch.finfo(dtype).max < torch.finfo(tensor.dtype).max:
            check_in_range(tensor.to(dtype), tensor, key.rsplit(".", 1)[0])


def merged_model(model: nn.Module, adapter_cfg: AdapterConfig, dtype: torch.dtype) -> nn.Module:
    """A plain model equal to base + adapter, from an injected (possibly quantized) model in memory."""
    refuse_unmergeable(method_of(adapter_cfg), adapter_cfg)
    base = merge_rows(model, base_state_dict(model))
    adapter = {k: v for k, v in adapter_state_dict(model, adapter_cfg.modules_to_save).items() if not k.endswith(TOKEN_ROWS)}
    base, adapter = merge_parameters(model, base, adapter)
    # The shared tensors the layers compute with, saved or not (VeRA with save_projection: false).
    adapter |= {f"{SHARED_PREFIX}{n}": t.detach().cpu() for holder in shared_holders(model) for n, t in holder.tensors().items()}
    # And each layer's tensors its file leaves out (Uni-LoRA's indices and scales without save_indices): its merge
    # reads them, and without them the merge found no layer to merge.
    adapter |= {key: t.detach().cpu() for path, layer in adapter_layers(model).items() for n, t in layer.parts().items()
                if n in layer.method.untrained_names and (key := f"{PEFT_PREFIX}{path}.{n}") not in adapter}
    # Each layer is merged in fp32 and cast to `dtype` as it is done: held whole in fp32, the merged layers took
    # twice a bf16 model's size, and the cast to `dtype` a copy more (a merge peaked at 3x the model, now ~1x).
    state = merge_state_dict(base, adapter, adapter_cfg, plain_conv1d_modules(model), dtype=dtype)
    check_state_in_range(state, dtype)  # the merged layers are checked as merged; the rest are cast only on writing
    if getattr(adapter_cfg, "layer_replication", None):  # the stacked copies shared the base's weights: now their own
        seen: set[int] = set()
        state = {k: v.clone() if v.data_ptr() in seen else seen.add(v.data_ptr()) or v for k, v in state.items()}
    classifier = type(model).__name__.endswith("ForSequenceClassification")
    return plain_model_from_state(model.config, state, dtype, non_persistent_buffers(model), classifier,
                                  getattr(model, "generation_config", None))
