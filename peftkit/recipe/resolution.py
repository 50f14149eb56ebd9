"""What `load_recipe` does once a recipe validates: the paths it names resolved against the recipe's directory (an
adapter directory that is not here fetched from the hub), AdapterFusion's adapters checked distinct,
data.chat_template's file read in, adapter.init_from's settings and added tokens taken from that adapter, and what
the adapter takes from the rest of the recipe (`Method.with_recipe`). Each error names the key, with its file and
line."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from peftkit.errors import PeftkitError
from peftkit.methods import method_of
from peftkit.recipe.messages import _dotted, _where
from peftkit.recipe.schema import DATA_EXTENSIONS, DataSource, Recipe, is_saved_dataset


@dataclass
class _Written:
    """Where a validated recipe came from: its file, the line of each key, the keys --set gave (for the messages),
    the directory its relative paths are under, and the list that collects missing adapters (or None)."""

    path: Path
    lines: dict[tuple, int]
    overridden: set[tuple]
    base: Path
    missing_adapters: list[str] | None

    def where(self, loc: tuple) -> str:
        return _where(loc, self.path, self.lines, self.overridden)


def resolve_recipe(recipe: Recipe, path: Path, lines: dict[tuple, int], overridden: set[tuple],
                   missing_adapters: list[str] | None) -> Recipe:
    """`recipe` (validated from the file `path`) with its paths resolved and what it names read in; see
    `load_recipe` for `missing_adapters`."""
    written = _Written(path, lines, overridden, path.resolve().parent, missing_adapters)
    _resolve_paths(recipe, written)
    _check_saved_splits(recipe, written)
    _resolve_fuse(recipe, written)
    _resolve_experts(recipe, written)
    _resolve_shadow_model(recipe, written)
    if recipe.data.chat_template is not None:  # a file's or directory's template read in: the run keeps its text
        from peftkit.data.chat_templates import resolved_template

        try:
            recipe.data.chat_template = resolved_template(recipe.data.chat_template, written.base)
        except PeftkitError as e:
            raise PeftkitError(f"{written.where(('data', 'chat_template'))}: data.chat_template: {e}") from None
    if recipe.adapter.init_from:
        from pydantic import ValidationError

        from peftkit.init_from import init_from_config

        where = written.where(("adapter", "init_from"))
        try:
            adapter = init_from_config(recipe.adapter)
        except PeftkitError as e:  # the adapter is the recipe's: say where the recipe names it
            raise PeftkitError(f"{where}: {e}") from None
        try:  # (the assignment runs the recipe's checks again, now with the adapter's method)
            recipe.adapter = adapter
        except ValidationError as e:  # (export.merged of an unmergeable method, LoRA+ of another than LoRA)
            said = "; ".join(error["msg"].removeprefix("Value error, ") for error in e.errors())
            raise PeftkitError(f"{where}: adapter.init_from {adapter.init_from} holds a {adapter.method} adapter, "
                               f"which the recipe's other settings do not allow: {said}") from None
        _check_init_from_tokens(recipe, written.where(("model", "add_tokens")))
    method_of(recipe.adapter).with_recipe(recipe.adapter, recipe)  # (data.chat_template read in now)
    return recipe


def _usable(value: str, kind: str, loc: tuple, written: _Written) -> str:
    """`value`, the path or hub id at `loc`, resolved (`kind`: model, data, output or adapter); an adapter that is
    neither here nor on the hub is an error, or said in `written.missing_adapters` where that is given."""
    where = written.where(loc)
    key = _dotted(loc[:3])  # adapter.fuse[1], data.eval.general
    if not value.strip():  # Path("") is ".": the recipe's own directory, silently
        raise PeftkitError(f"{where}: '{key}' is empty. Give a path (relative to the recipe's directory) or a "
                           "hub id.")
    try:
        resolved = _resolve(value, written.base, kind)
    except (OSError, RuntimeError, ValueError) as e:  # `~nosuchuser/x`, a name over 255 bytes, a NUL byte
        reason = getattr(e, "strerror", None) or str(e).rstrip(".")
        shown = value if len(value) <= 80 else f"{value[:77]}..."
        fix = ("a directory path that can be created" if kind == "output" else
               "an existing path (relative to the recipe's directory) or a hub id")
        raise PeftkitError(f"{where}: '{key}' = {shown!r} is not a usable path ({reason}). Give {fix}.") from None
    if kind == "adapter" and not Path(resolved).exists():  # a hub adapter (`peftkit.hub`), or the missing path
        try:
            return _hub_adapter(value, resolved, f"{where}: {key}", written.base)
        except PeftkitError as e:
            if written.missing_adapters is None or loc[1] == "init_from":
                raise
            written.missing_adapters.append(str(e))
            return resolved
    if kind == "adapter":  # a training run's directory: its adapter/, as --adapter RUN_DIR reads it
        from peftkit.peft_format import run_adapter

        return run_adapter(resolved)
    return resolved


def _hub_adapter(value: str, resolved: str, named: str, base: Path) -> str:
    """The local snapshot of the hub adapter `value` names, where `resolved`, the local path looked for first, is not
    there; `resolved` itself where `value` is no hub adapter. Errors begin with `named` (the recipe's line and key).
    One pinned to a commit as a run records it (`_pin`) is fetched by `peftkit.hub.fetch_pinned`, as verify fetches
    the manifest's: offline, a cache without that commit is said in its words (only that commit continues the run),
    not as a revision to change."""
    from peftkit.hub import fetch_pinned, hub_adapter, hub_shaped
    from peftkit.local_or_hub import meant_locally, no_such_directory

    try:  # one that can only be a local path: not asked of the hub (`peftkit.local_or_hub`)
        if hub_shaped(value) and meant_locally(value, base, subfolders=True):
            raise no_such_directory(value, f"Adapter {value}", "an adapter's directory (relative to the recipe's "
                                    "directory), or a hub id user/name[@REV]", base)
        if (pinned := _pin(value, resolved)) is None:
            return hub_adapter(value, tried=resolved) or resolved
    except PeftkitError as e:
        raise PeftkitError(f"{named}: {e}") from None
    return fetch_pinned(pinned, named)


def _pin(value: str, path: str) -> str | None:
    """The hub reference pinned to a commit (`user/name[/SUBFOLDER]@COMMIT`) of an adapter a recipe gives as `value`
    (`path`: where it was looked for locally): `value` itself where it is one, as a run records it (`recorded`);
    where `path` is a hub adapter's snapshot that is not here (a run's record from before they were pinned, another
    machine's cache: `peftkit.hub.pinned_reference`), its pin; else None."""
    from peftkit.hub import pinned_commit, pinned_reference

    if "@" in value and pinned_commit(value):
        return value
    return None if Path(path).exists() else pinned_reference(path)


HUB_ADAPTER_KEYS = ("init_from", "source_adapter", "fuse", "adapters")
"""The adapter section's keys that name adapter directories, each of which a recipe may give as a hub adapter (`_usable`
of kind adapter): one (init_from, multitask prompt tuning's source_adapter), a list (AdapterFusion's fuse) or a mapping
(X-LoRA's experts, adapters)."""


def _each_adapter(adapter, change: Callable[[str, str], str]):
    """`adapter` (a recipe's section) with `change(key, value)` in place of each adapter directory its HUB_ADAPTER_KEYS
    name, `key` as errors name it (adapter.fuse[1], adapter.adapters['0']): a copy where one changed, else itself."""
    updates = {}
    for name in HUB_ADAPTER_KEYS:
        value = getattr(adapter, name, None)
        if isinstance(value, str):
            updates[name] = change(f"adapter.{name}", value)
        elif isinstance(value, list):
            updates[name] = [change(f"adapter.{name}[{i}]", v) for i, v in enumerate(value)]
        elif isinstance(value, dict):
            updates[name] = {k: change(f"adapter.{name}['{k}']", v) for k, v in value.items()}
    changed = {name: value for name, value in updates.items() if value != getattr(adapter, name)}
    return adapter.model_copy(update=changed) if changed else adapter


def recorded(recipe: Recipe) -> Recipe:
    """`recipe`, resolved, as a run records it (recipe.yaml, manifest.json): each hub adapter by its hub reference
    pinned to the commit read (`user/name@COMMIT`, `peftkit.hub.pinned_reference`), not by its snapshot in this
    machine's cache, so that `peftkit verify` and `train --resume` read that commit wherever they run (`load_recipe` of
    the record fetches it, as `fetch_recorded` does). A copy where one changed."""
    from peftkit.hub import pinned_reference

    adapter = _each_adapter(recipe.adapter, lambda key, value: pinned_reference(value) or value)
    return recipe if adapter is recipe.adapter else recipe.model_copy(update={"adapter": adapter})


def fetch_recorded(recipe: Recipe, where: str) -> Recipe:
    """A run's recorded `recipe` (manifest.json's, which is not resolved) with each hub adapter recorded pinned to a
    commit (`recorded`) fetched at that commit (offline: read from the local cache), as its snapshot's path. A record
    from before they were pinned names the snapshot itself, which stays where it is here, else is fetched as its pin
    (another machine's cache). `where`: the record, for the errors."""
    from peftkit.hub import fetch_pinned

    def fetched(key: str, value: str) -> str:
        return fetch_pinned(pinned, f"{where}: {key}") if (pinned := _pin(value, value)) else value

    adapter = _each_adapter(recipe.adapter, fetched)
    return recipe if adapter is recipe.adapter else recipe.model_copy(update={"adapter": adapter})


def _resolve_paths(recipe: Recipe, written: _Written) -> None:
    """The base model's, the datasets', the run directory's and the starting adapters' paths, resolved in place."""
    if isinstance(recipe.data.train, list):  # each dataset's path, where the recipe wrote it
        recipe.data.train = [
            _usable(entry, "data", ("data", "train", i), written) if isinstance(entry, str) else
            entry.model_copy(update={"path": _usable(entry.path, "data", ("data", "train", i, "path"), written)})
            for i, entry in enumerate(recipe.data.train)]
    if isinstance(recipe.data.eval, dict):  # each set's path, where the recipe wrote it
        recipe.data.eval = {
            name: _usable(entry, "data", ("data", "eval", name), written) if isinstance(entry, str) else
            entry.model_copy(update={"path": _usable(entry.path, "data", ("data", "eval", name, "path"), written)})
            for name, entry in recipe.data.eval.items()}
    for section, key, kind in (("model", "name_or_path", "model"), ("data", "train", "data"), ("data", "eval", "data"),
                               ("export", "output_dir", "output"), ("adapter", "init_from", "adapter"),
                               ("adapter", "source_adapter", "adapter"),  # multitask prompt tuning's
                               ("adapter", "context", "data")):  # CPT's file of examples
        value = getattr(getattr(recipe, section), key, None)
        if isinstance(value, str):  # (data.train's list: above)
            setattr(getattr(recipe, section), key, _usable(value, kind, (section, key), written))


def _check_saved_splits(recipe: Recipe, written: _Written) -> None:
    """Each dataset save_to_disk wrote (`peftkit.data.saved`) read at a split it has: a DatasetDict's split it lacks
    (the default `train` too), or another than `train` of a Dataset, is an error at the key that set the split (the
    dataset's own line where the split is the default), naming the splits there."""
    from peftkit.data.saved import split_problem

    data = recipe.data
    train = list(enumerate(data.train)) if isinstance(data.train, list) else [(None, data.train)]
    evals = list(data.eval.items()) if isinstance(data.eval, dict) else [(None, data.eval)] if data.eval else []
    for kind, entries, sources in (("train", train, data.train_sources()),
                                   ("eval", evals, data.eval_sources().values())):
        for (name, entry), source in zip(entries, sources, strict=True):
            if not is_saved_dataset(source.path) or not (problem := split_problem(source.path, source.split)):
                continue
            at = ("data", kind) if name is None else ("data", kind, name)
            if isinstance(entry, DataSource) and entry.split is not None:
                setting, loc = f"{_dotted(at)}.split", (*at, "split")
            else:
                setting = f"data.{kind}_split" + (f" (or {_dotted(at)}'s own `split`)" if name is not None else "")
                loc = ("data", f"{kind}_split") if f"{kind}_split" in data.model_fields_set else at
            raise PeftkitError(f"{written.where(loc)}: {_dotted(at)}: saved dataset {source.path}: {problem}. Set "
                               f"{setting} to a split it has.")
    _check_eval_not_trained(recipe, evals, written)


def _check_eval_not_trained(recipe: Recipe, evals: list, written: _Written) -> None:
    """An eval set read at the default data.eval_split (`train`) of a saved DatasetDict that a train entry reads at
    that split too is an error where the dict has other splits: `eval: DIR` beside `train: DIR` evaluated on the
    rows trained on, silently. A split the recipe sets (`eval_split: train` too) is its choice."""
    from peftkit.data.saved import split_names, splits_read

    data = recipe.data
    trained = {(os.path.realpath(s.path), split) for s in data.train_sources() if is_saved_dataset(s.path)
               for split in splits_read(s.split or "train")}
    for (name, entry), source in zip(evals, data.eval_sources().values(), strict=True):
        if "eval_split" in data.model_fields_set or (isinstance(entry, DataSource) and entry.split is not None):
            continue
        read = splits_read(source.split or "train")
        if any((os.path.realpath(source.path), split) in trained for split in read) and \
                (others := [n for n in split_names(source.path) or [] if n not in read]):
            at = ("data", "eval") if name is None else ("data", "eval", name)
            raise PeftkitError(
                f"{written.where(at)}: {_dotted(at)}: saved dataset {source.path} is read at split '{source.split}' "
                "(data.eval_split's default), which data.train trains on; it has "
                f"{', '.join(map(repr, others))} too. Set data.eval_split (or the set's own `split`) to the split to "
                f"evaluate on: data.eval_split: {others[0]} (data.eval_split: {source.split} to evaluate on the "
                "training rows).")


def _resolve_fuse(recipe: Recipe, written: _Written) -> None:
    """AdapterFusion's adapter directories resolved, each listed once."""
    if not isinstance(fuse := getattr(recipe.adapter, "fuse", None), list):
        return
    recipe.adapter.fuse = [_usable(value, "adapter", ("adapter", "fuse", i), written) for i, value in enumerate(fuse)]
    real = [os.path.realpath(value) for value in recipe.adapter.fuse]
    for j, value in enumerate(real):
        if (i := real.index(value)) < j:  # one adapter twice: its outputs weighed against themselves, silently
            raise PeftkitError(f"{written.where(('adapter', 'fuse', j))}: adapter.fuse[{j}] is "
                               f"adapter.fuse[{i}] again ({value}); AdapterFusion weighs different adapters "
                               "against each other. List each adapter directory once.")


def _resolve_experts(recipe: Recipe, written: _Written) -> None:
    """X-LoRA's expert directories resolved, each listed once."""
    if recipe.adapter.method != "xlora":
        return
    adapters = {n: _usable(v, "adapter", ("adapter", "adapters", n), written) for n, v in recipe.adapter.adapters.items()}
    real = [os.path.realpath(value) for value in adapters.values()]
    for j, value in enumerate(real):
        if (i := real.index(value)) < j:  # one expert twice: two classes of the classifier for one adapter
            raise PeftkitError(f"{written.where(('adapter', 'adapters', str(j)))}: adapter.adapters['{j}'] is "
                               f"adapter.adapters['{i}'] again ({value}); X-LoRA weighs different experts. List each "
                               "adapter directory once.")
    recipe.adapter.adapters = adapters


def _resolve_shadow_model(recipe: Recipe, written: _Written) -> None:
    """ShadowPEFT's backbone directory (a shadow_model other than 'mirror'), resolved as the base model's path is: a
    relative one is under the recipe's directory (it was read from the working directory)."""
    if recipe.adapter.method != "shadow" or (value := recipe.adapter.shadow_model) == "mirror":
        return
    resolved = _usable(value, "model", ("adapter", "shadow_model"), written)
    if not Path(resolved).is_dir():
        raise PeftkitError(f"{written.where(('adapter', 'shadow_model'))}: 'adapter.shadow_model' is {value!r}: give "
                           "'mirror' (a backbone built from the base's config) or a local directory holding a "
                           "transformers model (relative to the recipe's directory); peftkit downloads no shadow "
                           "model.")
    recipe.adapter.shadow_model = resolved


def _resolve(value: str, base: Path, kind: str) -> str:
    """Resolve a recipe path against the recipe's directory; leave hub ids alone (a model's: what can be one,
    `peftkit.local_or_hub.meant_locally`)."""
    from peftkit.local_or_hub import meant_locally

    expanded = Path(value).expanduser()
    candidate = expanded if expanded.is_absolute() else base / expanded
    looks_like_path = value.startswith(("/", "./", "../", "~")) or expanded.is_absolute()
    if kind == "model" and meant_locally(value, base):
        looks_like_path = True
    if kind == "data" and (Path(value).suffix.lower() in DATA_EXTENSIONS or meant_locally(value, base, kind="dataset")):
        looks_like_path = True  # (`data/numbers-saved`, data/ beside the recipe: not a hub dataset, nor asked for)
    if candidate.exists() or looks_like_path or kind in ("output", "adapter"):
        return str(candidate.resolve())
    return value  # a hub id


def _check_init_from_tokens(recipe: Recipe, where: str) -> None:
    """The tokens adapter.init_from's training added (peftkit.json added_tokens; a peft adapter's, its tokenizer's
    past the base's) must begin model.add_tokens, in their order: its trained rows are those ids' (other tokens would
    take them, silently, in another order). Tokens listed after them are new to this run: their rows start as a
    fresh run's (`new_tokens.start_state`). An adapter trained without new tokens holds no rows for them."""
    from peftkit.adapter_meta import read_meta
    from peftkit.modeling import load_config
    from peftkit.new_tokens import adapter_tokens, held_tokenizer

    path, tokens = recipe.adapter.init_from, recipe.model.add_tokens
    # peft's adapter (TRL's setup_chat_format) tells its added tokens by the tokenizer beside it: one past the base's
    # rows was trained on a resized base (a pad token added within a base's spare rows was not: it trains as before).
    theirs = held_tokenizer(path)  # (read once: a large tokenizer takes a fifth of a second)
    if not tokens and not read_meta(path).added_tokens and (
            theirs is None or len(theirs) <= load_config(recipe.model).get_text_config().vocab_size):
        return
    added = adapter_tokens(path, recipe.model, theirs)
    if tokens[:len(added)] == added and (added or not tokens):  # (none added, none asked: nothing to check)
        return
    if not added:
        raise PeftkitError(f"{where}: model.add_tokens {tokens}: adapter.init_from {path} was trained without new "
                           "tokens and holds no rows for them. Leave model.add_tokens out, or train a new adapter.")
    dropped = [token for token in added if token not in tokens]
    why = (f"which leaves out {', '.join(dropped)}, whose row{'s' * (len(dropped) > 1)} the adapter trained"
           if dropped else "which lists them in another order")
    raise PeftkitError(f"{where}: adapter.init_from {path} was trained with model.add_tokens: {added}, whose rows it "
                       f"holds by id, and this recipe's model.add_tokens is {tokens or 'empty'}, {why}. Set "
                       f"model.add_tokens: {added + [t for t in tokens if t not in added]} (the adapter's tokens "
                       "first, in its order; tokens after them are new, their rows trained from the start).")
