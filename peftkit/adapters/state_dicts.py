"""Adapter state dicts in the PEFT key layout (`base_model.model.<path>.lora_A.weight`, ...): saving an injected
model's adapter tensors, loading them back with every key and shape checked, and the pure merge of an adapter state
dict into a base model's state dict (`peftkit merge`, `peftkit combine`).

Target selection and injection, which build the layers these read and write, are in `peftkit.adapters`.
"""

from __future__ import annotations

import torch
from torch import nn

from peftkit.adapters import (
    PEFT_PREFIX,
    SHARED_PREFIX,
    adapter_layers,
    check_converted,
    is_linear,
    modules_to_save,
    shared_holders,
)
from peftkit.distributed import full, place_like
from peftkit.errors import PeftkitError
from peftkit.methods import method_of
from peftkit.methods.base import Method
from peftkit.methods.layer import check_bias_to_merge, check_in_range, refuse_unmergeable
from peftkit.methods.token_rows import token_wrappers, without_tied_copies
from peftkit.methods.virtual import virtual_tokens
from peftkit.recipe import AdapterConfig


def adapter_state_dict(model: nn.Module, saved_modules: list[str]) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT keys (`base_model.model.<path>.lora_A.weight`, ...; the prompt family's
    `prompt_embeddings`), whole and on CPU. Under FSDP every process must call this (the shards are gathered)."""
    if (virtual := virtual_tokens(model)) is not None:
        return virtual.peft_state()
    state: dict[str, torch.Tensor] = {}
    seen: dict[int, torch.Tensor] = {}  # a tensor two layers share (a head tied to trained token rows): saved twice,
    for name, layer in adapter_layers(model).items():  # as peft saves it, as copies (safetensors refuses one shared)
        for pname, p in layer.adapter_params().items():
            if id(p) in seen:
                state[f"{PEFT_PREFIX}{name}.{pname}"] = seen[id(p)].clone()
            else:
                state[f"{PEFT_PREFIX}{name}.{pname}"] = seen[id(p)] = full(p.detach()).cpu().contiguous()
    for name, module in modules_to_save(model, saved_modules).items():
        for pname, p in module.named_parameters():
            state[f"{PEFT_PREFIX}{name}.{pname}"] = full(p.detach()).cpu().contiguous()
    for name, wrapper in token_wrappers(model).items():
        for pname, p in wrapper.adapter_params().items():
            state[f"{PEFT_PREFIX}{name}.{pname}"] = full(p.detach()).cpu().contiguous()
    for holder in shared_holders(model):
        if holder.saved:
            state.update({f"{SHARED_PREFIX}{n}": full(t.detach()).cpu().contiguous() for n, t in holder.tensors().items()})
    return state


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor], encoder_restored: bool = False) -> None:
    """Copy PEFT-keyed tensors into an injected model; every key must land and every shape match.
    `encoder_restored`: a run's own checkpoint, whose P-tuning or prefix encoder is already back
    (`VirtualTokens.load_peft_state`)."""
    if (virtual := virtual_tokens(model)) is not None:
        virtual.load_peft_state(state, encoder_restored)
        return
    state = _as_layers_hold(model, state)
    targets: dict[str, torch.Tensor] = {}
    rank_dims: dict[str, int] = {}
    param_names: set[str] = set()  # the methods' tensor names (`lora_A.weight`)
    for name, layer in adapter_layers(model).items():
        rank_dims.update(layer.method.rank_dims)
        param_names.update(layer.method.param_names)
        for pname, p in layer.adapter_params().items():
            targets[f"{PEFT_PREFIX}{name}.{pname}"] = p
    for name, wrapper in token_wrappers(model).items():
        targets.update({f"{PEFT_PREFIX}{name}.{pname}": p for pname, p in wrapper.adapter_params().items()})
    optional: set[str] = set()  # shared tensors the adapter need not carry: regenerated at injection
    for holder in shared_holders(model):
        keys = {f"{SHARED_PREFIX}{n}": t for n, t in holder.tensors().items()}
        targets.update(keys)
        optional |= set() if holder.saved else set(keys)
    params = dict(model.named_parameters(remove_duplicate=False))  # a tied weight under each of its names
    for key in state:
        if key not in targets and key.startswith(PEFT_PREFIX) and key[len(PEFT_PREFIX):] in params:
            targets[key] = params[key[len(PEFT_PREFIX):]]
    missing = sorted(set(targets) - set(state) - optional)
    unexpected = sorted(set(state) - set(targets))
    # (Only once something is missing: every load and resume passes here, and the scan is layers x keys.)
    bare = [name for name in adapter_layers(model) if not any(k.startswith(f"{PEFT_PREFIX}{name}.") for k in state)] \
        if missing and not unexpected else []
    if bare:
        raise PeftkitError(
            f"The adapter's target_modules (adapter_config.json) match {len(bare)} modules its weights do not adapt "
            f"(e.g. '{bare[0]}'): the config says more than the weights. Narrow its target_modules to the modules "
            "the weights are for.")
    if unexpected and (untargeted := _untargeted_modules(model, unexpected, param_names)):
        raise PeftkitError(
            f"The adapter's weights adapt {len(untargeted)} modules of this model that its target_modules "
            f"(adapter_config.json) do not name (e.g. '{untargeted[0]}'): the config says less than the weights (peft "
            "would leave those weights out without a word). Add them to its target_modules, or put back the "
            "adapter_config.json saved with these weights.")
    if missing or unexpected:
        raise PeftkitError(
            "The adapter does not fit this model: "
            + (f"{len(missing)} adapter weights missing (e.g. {missing[0]}); " if missing else "")
            + (f"{len(unexpected)} weights for modules this model lacks (e.g. {unexpected[0]}); " if unexpected else "")
            + "was it trained on another base model?"
        )
    for key, tensor in state.items():
        target = targets[key]
        if target.shape != tensor.shape:
            raise PeftkitError(_shape_mismatch(key, tuple(target.shape), tuple(tensor.shape), rank_dims))
        if target.is_floating_point() and not tensor.is_floating_point():  # (copy_ would cast 0.7 to 0 without a word)
            raise PeftkitError(f"The adapter's {key} is {str(tensor.dtype).removeprefix('torch.')}, not floating-point "
                               "as the weight it loads into: cast, it would give other numbers than were saved. The "
                               "file is damaged, or not a PEFT adapter's; export the adapter again.")
        with torch.no_grad():
            target.copy_(place_like(tensor, target).to(target.dtype))


def _as_layers_hold(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A file's PEFT-keyed `state` as the injected model's layers hold it: without peft's copy of the embeddings'
    rows for a tied head, and keyed per layer where peft keys a tensor by the layers' order (`Method.layer_state`)."""
    state = without_tied_copies(model, state)
    if layers := adapter_layers(model):
        state = next(iter(layers.values())).method.layer_state(layers, state)
    return state


def _untargeted_modules(model: nn.Module, keys: list[str], param_names: set[str]) -> list[str]:
    """The layers of `model` (Linear, Conv1D, Embedding; no adapter on them) that PEFT-keyed adapter tensors among `keys`
    (`<path>.<one of param_names>`: `lora_A.weight`, `lora_embedding_A`) belong to: tensors for modules the adapter does
    not target."""
    modules = dict(model.named_modules())
    found: dict[str, None] = {}
    for key in keys:
        path = key.removeprefix(PEFT_PREFIX) if key.startswith(PEFT_PREFIX) else ""
        head = next((path[: -len(p) - 1] for p in param_names if path.endswith(f".{p}")), None)
        module = modules.get(head) if head else None
        if module is not None and (is_linear(module) or isinstance(module, nn.Embedding)):
            found[head] = None
    return list(found)


def _shape_mismatch(key: str, expected: tuple[int, ...], saved: tuple[int, ...], rank_dims: dict[str, int]) -> str:
    """Why an adapter tensor has the wrong shape: a rank that disagrees with adapter_config.json's `r`
    (the files do not belong together), or a base of another size. `rank_dims`: the methods' rank
    dimension of each tensor kind (`lora_A`: 0)."""
    if key.startswith(PEFT_PREFIX):
        path = key[len(PEFT_PREFIX):]
        module, part = (path.rsplit(".", 2)[0], path.rsplit(".", 2)[-2]) if path.endswith(".weight") else path.rsplit(".", 1)
        mismatch = f"module '{module}' expects {part} of shape {expected} but the adapter has {saved}."
    else:  # a tensor every layer shares (VeRA's `base_model.vera_A`)
        part = key[len(SHARED_PREFIX):]
        mismatch = f"the adapted layers expect the shared {part} of shape {expected} but the adapter has {saved}."
    rank_dim = rank_dims.get(part)
    if rank_dim is not None and len(saved) == len(expected) and [d for i, d in enumerate(saved) if i != rank_dim] == \
            [d for i, d in enumerate(expected) if i != rank_dim]:
        return (f"The adapter's weights do not match its adapter_config.json: {mismatch} The weights have rank "
                f"{saved[rank_dim]}, the config gives it rank {expected[rank_dim]} (its r, or a rank_pattern entry). "
                "The two files come from different runs; export the adapter again, or put back the "
                "adapter_config.json saved with these weights.")
    if len(saved) != len(expected):  # another base changes sizes, never the number of dimensions
        return (f"The adapter's file does not hold what its adapter_config.json describes: {mismatch} The file is "
                "damaged, or not a PEFT adapter's; export the adapter again.")
    return (f"The adapter does not fit this model: {mismatch} It was trained on a different base model (another "
            "size or vocabulary); pass the base it was trained on.")


def nonfinite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of `state` holding any NaN or inf, in `state`'s order.

    An adapter saved after training diverged is all NaN; loading or exporting it only hides the
    failure until someone evaluates it.
    """
    return [name for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]


def merge_state_dict(
    base: dict[str, torch.Tensor],
    adapter: dict[str, torch.Tensor],
    cfg: AdapterConfig,
    fan_in_fan_out: set[str] = frozenset(),
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Fold a PEFT-keyed adapter state dict into a plain model state dict. Pure: inputs are not modified.

    Args:
        base: the base model's state dict (plain keys such as `model.layers.0.mlp.up_proj.weight`).
        adapter: PEFT keys (`base_model.model.<path>.lora_A.weight`, `...lora_embedding_A`, plain saved modules,
            and the tensors every layer shares, `base_model.vera_A`: regenerated by the method when left out).
        cfg: the adapter's settings; its method merges each layer from that layer's own facts (`layer_facts`,
            the rank read from the tensors), the same math as the in-place merge.
        fan_in_fan_out: module paths whose weight is stored (in, out) (transformers' Conv1D).
        dtype: dtype of the merged weights; default each base tensor's own.

    Each layer is merged in fp32 before one final cast.
    """
    check_converted(cfg)
    method = method_of(cfg)
    refuse_unmergeable(method, cfg)
    merged = dict(base)
    modules, shared = _split_adapter_keys(adapter, method, base, merged, dtype)
    if modules and set(method.shared_names) - set(shared):  # not saved: regenerated, as at injection
        shapes = [_in_out(base, module, module in fan_in_fan_out) for module in modules]
        shared = method.shared_tensors(cfg, shapes) | shared
    for module, parts in modules.items():
        key = f"{module}.weight"
        weight = base[key]
        facts = method.layer_facts(cfg, module, module in fan_in_fan_out)
        shape = method.update_shape(parts, facts)
        if len(shape) != weight.dim() or any(s is not None and s != w for s, w in zip(shape, weight.shape)):
            raise PeftkitError(
                f"The adapter does not fit this model: module '{module}' has weight {tuple(weight.shape)} but the "
                f"adapter's update is {tuple(shape)}. It was trained on a different base model."
            )
        parts = {name: t.to(weight.device) for name, t in (parts | shared).items()}
        bias = base.get(f"{module}.bias")
        facts = method.base_facts(facts, parts, weight.float(), None if bias is None else bias.float(), module)
        new = method.merge_weight(weight.float(), parts, facts)
        if bias is None:
            check_bias_to_merge(parts, f"'{module}'", method)
        new_bias = None if bias is None else method.merge_bias_of(bias.float(), weight.float(), parts, facts)
        if not (torch.isfinite(new).all() and (new_bias is None or torch.isfinite(new_bias).all())):
            raise PeftkitError(f"Merging '{module}' produced NaN/inf weights; the adapter is broken.")
        merged[key] = new.to(dtype or weight.dtype)
        if new_bias is not None:
            merged[f"{module}.bias"] = new_bias.to(dtype or bias.dtype)
        check_in_range(merged[key], new, module)
        if new_bias is not None:
            check_in_range(merged[f"{module}.bias"], new_bias, module)
    return merged


def _split_adapter_keys(adapter: dict[str, torch.Tensor], method: type[Method], base: dict[str, torch.Tensor],
                        merged: dict[str, torch.Tensor], dtype: torch.dtype | None):
    """({module path: {tensor suffix: tensor}}, {shared name: tensor}) of a PEFT-keyed adapter state dict;
    `modules_to_save` weights are written into `merged` on the way."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    shared: dict[str, torch.Tensor] = {}
    for key, tensor in adapter.items():
        if not key.startswith(PEFT_PREFIX):
            if key.startswith(SHARED_PREFIX) and key[len(SHARED_PREFIX):] in method.shared_names:
                shared[key[len(SHARED_PREFIX):]] = tensor
                continue
            raise PeftkitError(f"Adapter key '{key}' does not start with '{PEFT_PREFIX}'; not a PEFT checkpoint.")
        path = key[len(PEFT_PREFIX):]
        for suffix in method.param_names:
            if path.endswith("." + suffix):
                modules.setdefault(path[: -len(suffix) - 1], {})[suffix] = tensor
                break
        else:
            if path not in base:
                raise PeftkitError(f"Adapter weight '{path}' (modules_to_save) has no counterpart in the base model.")
            merged[path] = tensor.to(dtype or base[path].dtype)
    for module in modules:
        if f"{module}.weight" not in base:
            raise PeftkitError(f"The adapter targets '{module}', which the base model does not have.")
    return modules, shared


def _in_out(base: dict[str, torch.Tensor], module: str, fan_in_fan_out: bool) -> tuple[int, int]:
    """(in_features, out_features) of a linear layer from its weight in a state dict ((in, out) for Conv1D)."""
    rows, cols = base[f"{module}.weight"].shape
    return (rows, cols) if fan_in_fan_out else (cols, rows)
