"""The shared adapter core: target selection, injection and freezing, for every method of the registry
(`peftkit.methods`). State dicts in the PEFT key layout and the pure state-dict merge are in
`peftkit.adapters.state_dicts`.

Adapter parameters are found through the layers' `adapter_params()` protocol and the recipe's
`modules_to_save`, never by matching substrings of parameter names.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from peftkit.errors import PeftkitError, PeftkitWarning, did_you_mean
from peftkit.methods import AdapterLayer, method_of
from peftkit.methods.base import Method
from peftkit.methods.layer import (
    SharedTensors,
    is_conv1d,
    is_quantized,
    linear_shape,
    mark_tied,
    refuse_non_lookup,
    suffix_match,
)
from peftkit.methods.replication import replicate_layers
from peftkit.methods.target_filters import NoDefault, check_excluded, check_patterns
from peftkit.methods.token_rows import TOKEN_ROWS, inject_token_rows, refuse_saved_tied_head
from peftkit.recipe import AdapterConfig, TargetRegex

PEFT_PREFIX = "base_model.model."
SHARED_PREFIX = "base_model."
"""Model-level tensors shared by every layer (VeRA's `base_model.vera_A`) sit under this prefix, as in peft."""


def is_linear(module: nn.Module) -> bool:
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
        names = [n for n, m in modules.items() if is_linear(m) and n not in heads]
    elif isinstance(target_modules, TargetRegex):
        names = regex_targets(target_modules, modules)
    else:
        names = [n for n in modules if n and any(suffix_match(n, t) for t in target_modules)]
        if every_entry:
            _check_every_entry_matches(model, target_modules, names)
    names = [n for n in names if not isinstance(modules[n], AdapterLayer)]
    if not names:
        raise NoTargets(target_modules, model)
    bad = [n for n in names if not (is_linear(modules[n]) or isinstance(modules[n], nn.Embedding))]
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
        if name and (is_linear(m) or isinstance(m, nn.Embedding)):
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
    check_converted(cfg)
    method = method_of(cfg)
    if every_entry:  # (before the line below: whatever target_modules, a recipe's exclude_modules names modules)
        check_excluded([n for n, _ in model.named_modules()], cfg)
        refuse_without_parameters(model, getattr(cfg, "modules_to_save", None) or [])
        if getattr(cfg, "modules_to_save", None):  # (before _train_saved_modules unties the head)
            refuse_saved_tied_head(model, getattr(cfg, "trainable_token_indices", None),
                                   list(modules_to_save(model, cfg.modules_to_save)))
    # An architecture's default list (IA3, AdaLoRA) may name what this transformers version no longer has as a layer
    # (Mixtral's experts' w2, now fused parameters): as in peft, its entries need not all match; one must.
    every_entry = every_entry and getattr(cfg, "target_modules", "given") is not None
    cfg = _resolved(method, cfg, model)
    if getattr(cfg, "layer_replication", None):  # (before the targets: they are the stacked model's)
        replicate_layers(model, cfg.layer_replication)
    if not method.layer_targets:  # the prompt family: one module on the whole model, no layer wrapped
        for p in model.parameters():
            p.requires_grad_(False)
        method.install(model, cfg)
        return []
    names = _targets(model, method, cfg, every_entry, state, saved_only)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped: dict[str, AdapterLayer] = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapped[name] = method.wrap(getattr(parent, child), cfg, name)
        setattr(parent, child, wrapped[name])
    parameters = method.wrap_parameters(model, cfg, set(wrapped), every_entry)
    if every_entry:
        check_patterns(cfg, names + parameters)
    method.link_layers(model, cfg, wrapped)
    share_tensors(method, cfg, list(wrapped.values()))
    _train_saved_modules(model, cfg, state)
    saved = list(modules_to_save(model, cfg.modules_to_save)) if cfg.modules_to_save else []
    inject_token_rows(model, getattr(cfg, "trainable_token_indices", None), saved)
    mark_tied(model, wrapped)  # (last: modules_to_save and token rows untie or wrap what they take)
    return names


def _resolved(method: type[Method], cfg: AdapterConfig, model: nn.Module) -> AdapterConfig:
    """`cfg` with what it leaves to the architecture filled in (`Method.resolve`); where the method has no default
    for it, the error names this model's own layers (not a Llama's)."""
    try:
        return method.resolve(cfg, getattr(getattr(model, "config", None), "model_type", None))
    except NoDefault as e:
        if e.layers == "normalisation":
            from peftkit.methods.ln_tuning import is_norm

            names = [n for n, m in model.named_modules() if n and is_norm(m)]
        else:
            heads = _output_head_names(model)
            names = [n for n, m in model.named_modules() if n and is_linear(m) and n not in heads]
        raise e.for_model(list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))) from None


def _targets(model: nn.Module, method: type[Method], cfg: AdapterConfig, every_entry: bool,
             state: dict[str, torch.Tensor] | None, saved_only: bool) -> list[str]:
    """The paths of the layers to wrap: the method's selection, outside `modules_to_save`, and with `saved_only`
    those `state` adapts alone (see `inject_adapters`)."""
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
            f"'{bare[0]}'): they are left as they are, as in peft (which gives them an update of zero)."),
            stacklevel=3)
        names = [n for n in names if n in adapted]
    for name in names:
        refuse_non_lookup(model.get_submodule(name), name, "adapter.target_modules")
    return names


def _train_saved_modules(model: nn.Module, cfg: AdapterConfig, state: dict[str, torch.Tensor] | None) -> None:
    """Unfreeze `modules_to_save` (each untied from a head or embedding it shares weights with); a quantized one
    cannot be trained in full, and one a saved adapter lists without weights keeps the base's, with a warning."""
    for name, module in modules_to_save(model, cfg.modules_to_save).items():
        if state is not None and not any(k.startswith(f"{PEFT_PREFIX}{name}.") for k in state):
            warnings.warn(PeftkitWarning(f"adapter_config.json lists '{name}' in modules_to_save, and the adapter's "
                                         "file holds no weights for it: it keeps the base's (peft fails to load it)."),
                          stacklevel=3)
        _untie(model, name, module)
        if frozen := [n for n, p in module.named_parameters() if not p.dtype.is_floating_point]:
            raise PeftkitError(
                f"adapter.modules_to_save: '{name}' holds quantized weights ({', '.join(frozen)}: "
                f"{module.get_parameter(frozen[0]).dtype}), which cannot be trained in full. Add it to "
                "quantization.skip_modules to keep it in full precision, or adapt it with LoRA instead."
            )
        for p in module.parameters():
            p.requires_grad_(True)


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


def check_converted(cfg: AdapterConfig) -> None:
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
    """The module paths a saved adapter's PEFT-keyed tensors adapt (keys `<path>.<one of the method's tensors>`), as
    the base model names them: a module inside one an adapter layer wraps (a bottleneck's trained q_norm, inside the
    attention, saved as `self_attn.base_layer.q_norm`) by its own path, `self_attn.q_norm`."""
    found = set()
    for key in state:
        if key.startswith(SHARED_PREFIX) and not key.startswith(PEFT_PREFIX):
            continue  # a model-level tensor (`base_model.vera_A`, TinyLoRA's `base_model.tinylora_v.0`): no module's
        name = key.removeprefix(PEFT_PREFIX)
        for param in method.param_names:
            head, sep, _ = name.partition(f".{param.split('.')[0]}")
            if sep:
                found.add(head.replace(".base_layer.", "."))
    return found


def share_tensors(method: type[Method], cfg: AdapterConfig, layers: list[AdapterLayer]) -> None:
    """Give `layers` the method's model-level tensors (if it has any), built from all their shapes at once
    (VeRA's projections are as large as the largest target), as one `SharedTensors` module on their device."""
    if not method.shared_names or not layers:
        return
    tensors = method.shared_tensors(cfg, [linear_shape(layer.base_layer) for layer in layers])
    tensors |= method.shared_from_layers(cfg, layers)
    holder = SharedTensors(tensors, method.saves_shared(cfg), method.shared_trained).to(layers[0].base_layer.weight.device)
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


def refuse_without_parameters(model: nn.Module, names: list[str]) -> None:
    """Refuse a recipe's modules_to_save entry whose modules hold no parameter (a rotary embedding's buffers, an
    activation, a dropout): training it whole would train nothing, without a word (peft wraps it all the same)."""
    for wanted in names:
        hits = modules_to_save(model, [wanted])
        if any(True for module in hits.values() for _ in module.parameters()):
            continue
        path, module = next(iter(hits.items()))
        buffers = [n for n, _ in module.named_buffers()]
        held = f" (only buffers, which are not trained: {', '.join(buffers)})" if buffers else ""
        with_parameters = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                                             if n and next(m.parameters(recurse=False), None) is not None))
        raise PeftkitError(
            f"adapter.modules_to_save: '{wanted}' ({path}, a {type(module).__name__}) has no parameters"
            f"{held}: training it whole would train nothing. Name a module with parameters (this model's: "
            f"{', '.join(with_parameters)}), or remove it.{did_you_mean(wanted, with_parameters)}")


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
