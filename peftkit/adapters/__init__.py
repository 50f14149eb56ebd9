"""The shared adapter core: target selection, injection and freezing, state dicts in the PEFT key layout,
and the pure state-dict merge, for every method of the registry (`peftkit.methods`).

Adapter parameters are found through the layers' `adapter_params()` protocol and the recipe's
`modules_to_save`, never by matching substrings of parameter names.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from peftkit.distributed import full, place_like
from peftkit.errors import PeftkitError, PeftkitWarning, did_you_mean
from peftkit.methods import AdapterLayer, method_of
from peftkit.methods.base import (Method, SharedTensors, check_bias_to_merge, check_in_range, is_conv1d, is_quantized,
                                  linear_shape, refuse_unmergeable, suffix_match)
from peftkit.methods.replication import replicate_layers
from peftkit.methods.target_filters import check_excluded
from peftkit.methods.token_rows import TOKEN_ROWS, inject_token_rows, token_wrappers
from peftkit.methods.virtual import virtual_tokens
from peftkit.recipe import AdapterConfig, TargetRegex

PEFT_PREFIX = "base_model.model."
SHARED_PREFIX = "base_model."
"""Model-level tensors shared by every layer (VeRA's `base_model.vera_A`) sit under this prefix, as in peft."""


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module) or (is_quantized(module) and hasattr(module, "in_features"))


def _output_head_names(model: nn.Module) -> set[str]:
    """The output head and (a sequence classifier's head, trained in full as modules_to_save: never an adapter
    target, as peft's SEQ_CLS excludes it) every module inside it."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        from peftkit.classify import HEAD_NAMES

        heads = [name for name, _ in model.named_children() if name in HEAD_NAMES]
        return {n for n, _ in model.named_modules() if any(n == h or n.startswith(h + ".") for h in heads)}
    return {name for name, m in model.named_modules() if m is head}


class NoTargets(PeftkitError):
    """`target_modules` match no module of the model: a recipe's typo, or (a saved adapter's) another base model."""

    def __init__(self, target_modules: object, model: nn.Module):
        super().__init__(f"adapter.target_modules {_describe(target_modules)} {_matches_nothing(model)}")
        self.target_modules, self.layer_kinds = target_modules, _layer_kinds(model)


REGEX_TIMEOUT_S = 2.0
"""How long a target_modules regex may take to match one module name."""


def regex_targets(target: TargetRegex, names: Iterable[str], key: str = "target_modules") -> list[str]:
    """The module paths among `names` that `target.regex` fully matches, as peft's `re.fullmatch` does, through the
    `regex` package (a transformers dependency) for its timeout: an adapter_config.json's `(.|.)*Z` kept `re` busy for
    ever. `key`: the recipe key the regex is."""
    import regex

    try:
        return [n for n in names if n and regex.fullmatch(target.regex, n, timeout=REGEX_TIMEOUT_S)]
    except TimeoutError:
        raise PeftkitError(f"adapter.{key} {_describe(target)}: the regular expression took over "
                           f"{REGEX_TIMEOUT_S:g} s to match one module name (it backtracks without end); write it "
                           "without nested repetition, or as a list of names.") from None


def find_targets(model: nn.Module, target_modules: str | list[str] | TargetRegex, every_entry: bool = True) -> list[str]:
    """Full module paths the adapter applies to, in model order.

    `all-linear`: every Linear/Conv1D layer except the output head. A list: module names equal to an
    entry or ending in `.entry`. A regex: `re.fullmatch` against the full path. Raises a PeftkitError
    listing what the model does have when nothing (or, with `every_entry`, some list entry) matches, or
    a match is not an adaptable layer.
    """
    modules = dict(model.named_modules())
    if target_modules == "all-linear":
        heads = _output_head_names(model)
        names = [n for n, m in modules.items() if _is_linear(m) and n not in heads]
    elif isinstance(target_modules, TargetRegex):
        names = regex_targets(target_modules, modules)
    else:
        names = [n for n in modules if n and any(suffix_match(n, t) for t in target_modules)]
        if every_entry:
            _check_every_entry_matches(model, target_modules, names)
    names = [n for n in names if not isinstance(modules[n], AdapterLayer)]
    if not names:
        raise NoTargets(target_modules, model)
    bad = [n for n in names if not (_is_linear(modules[n]) or isinstance(modules[n], nn.Embedding))]
    if bad:
        raise PeftkitError(
            f"adapter.target_modules {_describe(target_modules)} matches {', '.join(bad[:5])}, which "
            f"{'is' if len(bad) == 1 else 'are'} {type(modules[bad[0]]).__name__}, not a Linear, Conv1D or "
            "Embedding layer. Target the linear layers inside instead, e.g. "
            f"{', '.join(_layer_kinds(model)[:6])}."
        )
    return names


def _check_every_entry_matches(model: nn.Module, target_modules: list[str], names: list[str]) -> None:
    """An entry that matches nothing is a typo (`v_prj`): refuse it even when the other entries match, or
    the run silently trains fewer layers than the recipe says."""
    for entry in target_modules:
        if not any(suffix_match(n, entry) for n in names):
            raise PeftkitError(f"adapter.target_modules entry {entry!r} (of {target_modules!r}) "
                               f"{_matches_nothing(model)}{did_you_mean(entry, _layer_kinds(model))}")


def _matches_nothing(model: nn.Module) -> str:
    return (f"matches no module of this model. Its linear/embedding layers are named: "
            f"{', '.join(_layer_kinds(model)) or '(none)'}. Use some of those names, or 'all-linear'.")


def _describe(target_modules: object) -> str:
    if isinstance(target_modules, TargetRegex):
        return f"{{regex: {target_modules.regex!r}}}"
    return repr(target_modules)


def _layer_kinds(model: nn.Module) -> list[str]:
    """Distinct last name components of the adaptable layers (q_proj, c_attn, embed_tokens, ...)."""
    seen: dict[str, None] = {}
    for name, m in model.named_modules():
        if name and (_is_linear(m) or isinstance(m, nn.Embedding)):
            seen[name.rsplit(".", 1)[-1]] = None
    return list(seen)


def inject_adapters(model: nn.Module, cfg: AdapterConfig, every_entry: bool = True,
                    state: dict[str, torch.Tensor] | None = None, saved_only: bool = False) -> list[str]:
    """Wrap the target layers in the method's layers, freeze everything else, unfreeze `modules_to_save`.

    Seeding is the caller's job: initial weights (LoRA's A) are drawn from torch's global RNG, so call
    `torch.manual_seed` first.

    Args:
        every_entry: refuse a `target_modules` list entry that matches nothing (a recipe's typo). Off for a
            saved adapter, whose weights say what it adapts.
        state: a saved adapter's PEFT-keyed tensors: a module inside `modules_to_save` that they adapt is wrapped
            (peftkit before December 2026 adapted a classifier head's `dense` and saved the head whole too).
        saved_only: wrap only the targets `state` adapts, with a warning naming the others (an adapter_config.json
            whose target_modules say more than its weights: peft gives those layers a zero update, and warns).

    Returns:
        the full paths of the wrapped modules.
    """
    _check_converted(cfg)
    method = method_of(cfg)
    if every_entry:  # (before the line below: whatever target_modules, a recipe's exclude_modules names modules)
        check_excluded([n for n, _ in model.named_modules()], cfg)
    # An architecture's default list (IA3, AdaLoRA) may name what this transformers version no longer has as a layer
    # (Mixtral's experts' w2, now fused parameters): as in peft, its entries need not all match; one must.
    every_entry = every_entry and getattr(cfg, "target_modules", "given") is not None
    cfg = method.resolve(cfg, getattr(getattr(model, "config", None), "model_type", None))
    if getattr(cfg, "layer_replication", None):  # (before the targets: they are the stacked model's)
        replicate_layers(model, cfg.layer_replication)
    if not method.layer_targets:  # the prompt family: one module on the whole model, no layer wrapped
        for p in model.parameters():
            p.requires_grad_(False)
        method.install(model, cfg)
        return []
    adapted = modules_adapted_by(state, method) if state is not None else set()
    _check_expert_layout(model, adapted)
    try:
        selected = method.select_targets(model, cfg, every_entry)
    except NoTargets as e:
        if not saved_only:
            raise
        # (not the recipe's fix, "use some of those names": the adapter's weights are for the modules it names)
        fit = sorted(adapted & {n for n, _ in model.named_modules()})
        why = (f"yet its weights adapt modules of this model (e.g. '{fit[0]}'): the file was edited or damaged. Fix "
               "its target_modules, or export the adapter again." if fit else "the adapter was trained on another base "
               "model. Load it on that one (adapter_config.json's base_model_name_or_path names it).")
        raise PeftkitError(
            f"adapter_config.json's target_modules {_describe(e.target_modules)} match no module of this base model "
            f"(its linear/embedding layers are named {', '.join(e.layer_kinds) or '(none)'}): {why}") from None
    names = _outside_saved(selected, cfg, every_entry, adapted)
    # (None of them adapted: the weights are for another model, which loading says)
    if saved_only and adapted & set(names) and (bare := [n for n in names if n not in adapted]):
        warnings.warn(PeftkitWarning(
            f"adapter_config.json's target_modules match {len(bare)} modules its weights do not adapt (e.g. "
            f"'{bare[0]}'): they are left as they are, as in peft (which gives them an update of zero)."), stacklevel=2)
        names = [n for n in names if n in adapted]
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped: dict[str, AdapterLayer] = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapped[name] = method.wrap(getattr(parent, child), cfg, name)
        setattr(parent, child, wrapped[name])
    method.wrap_parameters(model, cfg, set(wrapped), every_entry)
    method.link_layers(model, cfg, wrapped)
    share_tensors(method, cfg, list(wrapped.values()))
    for name, module in modules_to_save(model, cfg.modules_to_save).items():
        if state is not None and not any(k.startswith(f"{PEFT_PREFIX}{name}.") for k in state):
            warnings.warn(PeftkitWarning(f"adapter_config.json lists '{name}' in modules_to_save, and the adapter's "
                                         "file holds no weights for it: it keeps the base's (peft fails to load it)."),
                          stacklevel=2)
        _untie(model, name, module)
        if frozen := [n for n, p in module.named_parameters() if not p.dtype.is_floating_point]:
            raise PeftkitError(
                f"adapter.modules_to_save: '{name}' holds quantized weights ({', '.join(frozen)}: "
                f"{module.get_parameter(frozen[0]).dtype}), which cannot be trained in full. Add it to "
                "quantization.skip_modules to keep it in full precision, or adapt it with LoRA instead."
            )
        for p in module.parameters():
            p.requires_grad_(True)
    saved = list(modules_to_save(model, cfg.modules_to_save)) if cfg.modules_to_save else []
    inject_token_rows(model, getattr(cfg, "trainable_token_indices", None), saved)
    return names


MOE_V4 = re.compile(r"\.block_sparse_moe\.|\.experts\.\d+\.")
"""Module paths of transformers 4's mixture-of-experts layers: Mixtral's `block_sparse_moe.gate` and
`block_sparse_moe.experts.N.w1`, Qwen2-MoE's and OLMoE's `mlp.experts.N.gate_proj`."""


def _check_expert_layout(model: nn.Module, adapted: set[str]) -> None:
    """Refuse, saying why, a saved adapter on transformers 4's per-expert layers that this model does not have and
    `peftkit.methods.expert_lists.on_fused_experts` could not convert to its fused experts."""
    modules = dict(model.named_modules())
    if old := sorted(p for p in adapted if p not in modules and MOE_V4.search(f".{p}.")):
        raise PeftkitError(
            f"The adapter adapts {len(old)} module{'s' * (len(old) > 1)} of transformers 4's mixture-of-experts layout "
            f"(e.g. '{old[0]}'), which this model does not have (transformers 5 renamed them, and fuses the experts "
            "into 3-D parameters). Loading an adapter to evaluate, generate or merge converts Mixtral's and "
            "Qwen2-MoE-style layers to those parameters; these are of another layout, or reach training "
            "(adapter.init_from), which does not convert them: merge the adapter into its base (`peftkit merge`) and "
            "train a new adapter on the merged model, or train again with adapter.target_parameters "
            "([experts.gate_up_proj, experts.down_proj]).")


def _check_converted(cfg: AdapterConfig) -> None:
    """peft's unconverted PiSSA/OLoRA adapter fits a residual base: computing with it needs
    `peftkit.methods.lora_init.on_original_base` first (a path that skipped it is a bug, not silently wrong numbers)."""
    if getattr(cfg, "_residual_init", None):
        raise PeftkitError("peft's PiSSA/OLoRA adapter for a residual base reached a model unconverted; please report "
                           "this as a peftkit bug, with the command")


def _outside_saved(names: list[str], cfg: AdapterConfig, every_entry: bool, adapted: set[str]) -> list[str]:
    """`names` without the modules `cfg.modules_to_save` trains in full and those inside them, as peft decides (its
    copy of such a module holds no adapter), but those a saved adapter's weights adapt (`adapted`). A recipe's
    target_modules entry that only names such modules is an error (`every_entry`): it would adapt nothing."""
    from peftkit.classify import HEAD_NAMES

    saved = getattr(cfg, "modules_to_save", None) or []
    inside = {n for n in names if n not in adapted
              and any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", n) for m in saved)}
    if every_entry and inside and isinstance(getattr(cfg, "target_modules", None), list):
        for entry in cfg.target_modules:
            if all(n in inside for n in names if suffix_match(n, entry)):
                head = next((m for m in saved if m in HEAD_NAMES), None)
                why = (f"names the classification head '{head}' (or modules inside it), which a sequence classifier "
                       f"trains in full (as peft's SEQ_CLS); remove {entry!r} from adapter.target_modules" if head else
                       "names modules that adapter.modules_to_save trains in full, which then get no adapter (as in "
                       "peft); remove it from one of the two")
                raise PeftkitError(f"adapter.target_modules entry {entry!r} {why}.")
    return [n for n in names if n not in inside]


def modules_adapted_by(state: dict[str, torch.Tensor], method) -> set[str]:
    """The module paths a saved adapter's PEFT-keyed tensors adapt (keys `<path>.<one of the method's tensors>`)."""
    found = set()
    for key in state:
        name = key.removeprefix(PEFT_PREFIX)
        for param in method.param_names:
            head, sep, _ = name.partition(f".{param.split('.')[0]}")
            if sep:
                found.add(head)
    return found


def share_tensors(method: type[Method], cfg: AdapterConfig, layers: list[AdapterLayer]) -> None:
    """Give `layers` the method's model-level tensors (if it has any), built from all their shapes at once
    (VeRA's projections are as large as the largest target), as one `SharedTensors` module on their device."""
    if not method.shared_names or not layers:
        return
    tensors = method.shared_tensors(cfg, [linear_shape(layer.base_layer) for layer in layers])
    holder = SharedTensors(tensors, method.saves_shared(cfg)).to(layers[0].base_layer.weight.device)
    for layer in layers:
        layer.shared = holder


def shared_holders(model: nn.Module) -> list[SharedTensors]:
    """The distinct `SharedTensors` of an injected model's adapter layers (one per adapter)."""
    return list({id(layer.shared): layer.shared for layer in adapter_layers(model).values() if layer.shared is not None}.values())


def _untie(model: nn.Module, name: str, module: nn.Module) -> None:
    """A module trained in full (modules_to_save) that shares a weight with another (tied embeddings: lm_head and
    embed_tokens) gets a copy of its own, as peft trains a copy of the module: the other keeps the base's values.
    Trained in place, the shared weight changed both, and a peft adapter's saved lm_head was written into the
    embeddings too."""
    others = list(_other_params(model, name))
    for pname, p in list(module.named_parameters()):
        if any(_shared(p, q) for q in others):
            path, _, leaf = pname.rpartition(".")
            owner = module.get_submodule(path) if path else module
            setattr(owner, leaf, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))


def check_copies(model: nn.Module, cfg: AdapterConfig) -> None:
    """The copies `_untie` made still apart after accelerate's prepare: FSDP2 with fsdp_cpu_ram_efficient_loading
    ties the model's weights again (transformers' tie_weights), and the copy the optimizer holds would train
    nothing."""
    for name, module in modules_to_save(model, getattr(cfg, "modules_to_save", None) or []).items():
        if any(p is q for p in module.parameters() for q in _other_params(model, name)):
            raise PeftkitError(
                f"adapter.modules_to_save: '{name}' shares its weight with another module again after accelerate "
                "prepared the model (tied embeddings, tied again: FSDP2's fsdp_cpu_ram_efficient_loading does it). "
                "Set fsdp_cpu_ram_efficient_loading: false, as configs/accelerate/fsdp2.yaml has it, or leave "
                f"'{name}' out of adapter.modules_to_save.")


def _shared(p: torch.Tensor, q: torch.Tensor) -> bool:
    """Tied weights: one Parameter, or views of one storage (not decidable on the meta device, where the
    memory estimate injects: every meta tensor has data_ptr 0)."""
    return p is q or (p.device.type != "meta" and p.data_ptr() == q.data_ptr())


def _other_params(model: nn.Module, name: str) -> Iterator[torch.Tensor]:
    for n, p in model.named_parameters(remove_duplicate=False):
        if not (n == name or n.startswith(name + ".")):
            yield p


def modules_to_save(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """The modules named by suffix in `names`, by full path; a name that matches nothing is an error."""
    found: dict[str, nn.Module] = {}
    for wanted in names:
        hits = {n: m for n, m in model.named_modules() if suffix_match(n, wanted)}
        if not hits:
            suffixes = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n}
            raise PeftkitError(
                f"adapter.modules_to_save: '{wanted}' matches no module of this model "
                f"(top-level modules: {', '.join(n for n, _ in model.named_children())})."
                f"{did_you_mean(wanted, sorted(suffixes))}"
            )
        found.update(hits)
    return found


def saved_base_modules(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, nn.Module]:
    """The modules, by full path, whose own parameters a PEFT state dict holds: its modules_to_save copies. peft
    picks those by *string* suffix, so its `norm` also saves every `input_layernorm`: the keys say what is there."""
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    paths = {key[len(PEFT_PREFIX):].rsplit(".", 1)[0] for key in state
             if key.startswith(PEFT_PREFIX) and key[len(PEFT_PREFIX):] in params and not key.endswith(TOKEN_ROWS)}
    return {path: model.get_submodule(path) for path in sorted(paths)}


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """The adapter layers of an injected model, by full path."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a 4-bit weight counts its real element count, not packed bytes."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if hasattr(p, "quant_state") and p.quant_state is not None:
            n = p.quant_state.shape.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


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
            state.update({f"{SHARED_PREFIX}{n}": t.detach().cpu().contiguous() for n, t in holder.named_buffers()})
    return state


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor], encoder_restored: bool = False) -> None:
    """Copy PEFT-keyed tensors into an injected model; every key must land and every shape match.
    `encoder_restored`: a run's own checkpoint, whose P-tuning or prefix encoder is already back
    (`VirtualTokens.load_peft_state`)."""
    if (virtual := virtual_tokens(model)) is not None:
        virtual.load_peft_state(state, encoder_restored)
        return
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
        keys = {f"{SHARED_PREFIX}{n}": t for n, t in holder.named_buffers()}
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
        if module is not None and (_is_linear(module) or isinstance(module, nn.Embedding)):
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
    _check_converted(cfg)
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
        new = method.merge_weight(weight.float(), parts, facts)
        bias = base.get(f"{module}.bias")
        if bias is None:
            check_bias_to_merge(parts, f"'{module}'")
        new_bias = None if bias is None else method.merge_bias(bias.float(), parts, facts)
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
