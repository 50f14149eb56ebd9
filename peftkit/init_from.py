"""A recipe's `adapter.init_from: DIR`: the adapter section it stands for, taken from the adapter in DIR.

The method and settings come from the adapter; a setting the recipe repeats must agree with it, and an adapter
peftkit cannot train on from (one that trained the base's biases, a residual init, a pruned AdaLoRA) is refused.
"""

from __future__ import annotations

from collections import Counter

from pydantic import BaseModel, ValidationError

from peftkit.errors import PeftkitError
from peftkit.peft_format import load_adapter, trained_base_biases
from peftkit.recipe import AdapterConfig


def init_from_config(cfg: AdapterConfig) -> AdapterConfig:
    """The `adapter` section of a recipe with `init_from: DIR`: the method and settings of the adapter in DIR
    (any method peftkit reads, peftkit's or peft's), keeping `init_from`. A method key the recipe sets too must
    say the same as the adapter: two sources for one setting would leave a reader guessing which one trained.
    """
    from peftkit.methods.lora_init import residual_refusal

    path = cfg.init_from
    loaded, state, peft, _ = load_adapter(path)
    # peft's `bias: all` / `lora_only` trains the base's own biases and saves their values: the run would load them
    # and train with them, and its export (bias: none, as every peftkit adapter) would leave them out.
    if getattr(peft, "bias", "none") not in (None, "none") and (biases := trained_base_biases(loaded, state)):
        raise PeftkitError(f"adapter.init_from: {path} also trained the base's biases (bias: {peft.bias} in its "
                           f"adapter_config.json; {len(biases)} saved, e.g. {biases[0]}), which peftkit does not "
                           "train or export: the run's adapter would leave them out of the model it trained. Merge it "
                           f"into its base (`peftkit merge --adapter {path} --output MERGED`) and train a new adapter "
                           "on MERGED, or train on in peft.")
    if getattr(loaded, "_residual_init", None):
        raise residual_refusal("adapter.init_from", path, "training on from it here would train that init's "
                               "directions too, as part of a plain LoRA on the original base")
    if trained_as := getattr(loaded, "_trained_as", None):
        raise PeftkitError(f"adapter.init_from: {path} is a {trained_as} adapter, which peftkit reads (it is plain LoRA "
                           "outside training) but does not train: training on from it would not be "
                           f"{trained_as}. Train on in peft, or merge it into its base (`peftkit merge --adapter "
                           f"{path} --output MERGED`) and train a new adapter on MERGED.")
    if loaded.method == "adalora" and loaded.rank_pattern:  # every AdaLoRA export: its run's allocation pruned it
        raise PeftkitError(
            f"adapter.init_from: {path} is an AdaLoRA adapter pruned by its run's rank allocation (rank_pattern in "
            "its adapter_config.json), and peftkit does not continue AdaLoRA's allocation from a pruned adapter. "
            "Resume that run from its checkpoints if it did not finish (`peftkit train RECIPE --resume`); else merge "
            "the adapter into its base (`peftkit merge`) and train a new adapter on the merged model."
        )
    if getattr(peft, "save_only_topk_weights", False):  # VB-LoRA's top-k file: peft refuses to train on from it too
        raise PeftkitError(
            f"adapter.init_from: {path} is a VB-LoRA adapter saved with save_only_topk_weights: its file keeps each "
            "row's top-k logits only (the others are gone), enough to evaluate and merge it, not to train on from it "
            "(peft refuses it too). Train on from an adapter exported with save_only_topk_weights: false, or resume "
            "its run from its checkpoints (`peftkit train RECIPE --resume`).")
    from peftkit.methods import method_of

    # peftkit's own keys that no adapter_config.json holds (Poly's merge_task): the recipe's, never compared
    kept = {key: getattr(cfg, key) for key in method_of(loaded).recipe_only
            if cfg.method == loaded.method and key in cfg.model_fields_set}
    given = cfg.model_fields_set - {"init_from"} - set(kept)
    if "method" in given and cfg.method != loaded.method:
        raise PeftkitError(
            f"adapter.init_from: {path} holds a {loaded.method} adapter, but adapter.method is {cfg.method!r}. "
            "init_from takes the method and its settings from the adapter: remove adapter.method (or set it to "
            f"{loaded.method!r})."
        )
    differing = [key for key in sorted(given - {"method"}) if key in type(loaded).model_fields
                 and _plain(getattr(cfg, key), key) != _plain(getattr(loaded, key), key)]
    if cfg.method == loaded.method and differing:
        conflicts = [f"{key}: {_shown(getattr(cfg, key))} in the recipe, {_shown(getattr(loaded, key))} in the adapter"
                     for key in differing]
        noted = "target_modules" in differing and _paths_for_names(cfg.target_modules, loaded.target_modules)
        paths = (" The adapter records the module paths its run adapted, never 'all-linear' or short names, so a "
                 "recipe copied from that run's says otherwise here.") if noted else ""
        raise PeftkitError(
            f"adapter.init_from: {path} sets the adapter's settings, and the recipe says otherwise ("
            f"{'; '.join(conflicts)}). Remove those keys from the recipe's adapter section (init_from takes them "
            f"from the adapter), or make them match.{paths}"
        )
    if cfg.method != loaded.method and given - {"method"}:
        raise PeftkitError(
            f"adapter.init_from: {path} holds a {loaded.method} adapter; the recipe's adapter section also sets "
            f"{', '.join(sorted(given))}, which are {cfg.method} settings. Leave only init_from."
        )
    if kept:  # their checks against the adapter's settings (Poly's merge_task within its n_tasks)
        _check_kept(loaded, kept, path)
    return loaded.model_copy(update=kept | {"init_from": path})


def _check_kept(loaded: AdapterConfig, kept: dict, path: str) -> None:
    """The adapter's config with the recipe's own keys `kept` validated again (a copy: the adapter's private
    settings stay on the one returned)."""
    try:
        type(loaded).model_validate(loaded.model_dump() | kept)
    except ValidationError as e:
        said = "; ".join(error["msg"].removeprefix("Value error, ") for error in e.errors())
        raise PeftkitError(f"adapter.init_from: {path}: {said}") from None


def _paths_for_names(given: object, recorded: object) -> bool:
    """Whether the adapter records module paths (`model.layers.0.self_attn.q_proj`) where the recipe gives
    'all-linear' or short names: the note that explains it. peft records what its user wrote (['q_proj', 'v_proj'])
    where that was short names, and the note then said 'never short names' beside the adapter's short names."""
    def dotted(value: object) -> bool:
        return isinstance(value, list) and bool(value) and all("." in str(entry) for entry in value)

    return dotted(recorded) and not dotted(given)


def _shown(value: object) -> str:
    """A setting as the error shows it: a long list (the module paths an adapter records, 210 on SmolLM2's
    `all-linear`) as its count and its names' last parts, which a reader can compare; the message held every
    path, 10 kB of text, before."""
    if not isinstance(value, list) or len(value) <= 8:
        return repr(value)
    kinds = Counter(str(entry).rsplit(".", 1)[-1] for entry in value)
    return f"{len(value)} modules ({', '.join(f'{kind} x{n}' for kind, n in sorted(kinds.items()))})"


def _plain(value: object, key: str) -> object:
    """A setting in comparable form: a TargetRegex as its dict, a list sorted (module order means nothing), but
    layer_replication's (its ranges stack in their order)."""
    if isinstance(value, BaseModel):
        return value.model_dump()
    return sorted(value) if isinstance(value, list) and key != "layer_replication" else value
