"""Where an X-LoRA's experts are (`peftkit.methods.xlora`): adapter_config.json's `adapters` as peft 0.21.2 reads and
writes it (a local directory, absolute or relative to the working directory; a hub id, `user/name`), and the copies
peftkit's export keeps beside its classifier (peftkit.json's `experts`), which peftkit reads wherever the directory
moves."""

from __future__ import annotations

from pathlib import Path

from peftkit.errors import PeftkitError
from peftkit.methods.base import REEXPORT


def loadable(path: str) -> str:
    """An expert as adapter_config.json's `adapters` records it, what peft 0.21.2 loads there
    (LoraConfig.from_pretrained and load_peft_weights of the value, at no revision): a local expert's directory,
    absolute; a hub expert's id, `user/name` (`user/name/SUBFOLDER`, as peftkit names it, which peft cannot load:
    `warn_of_hub_subfolders`), not the snapshot in this machine's cache that the recipe resolved it to, a path on no
    other machine (peft took it for a hub id there, and failed). peft reads no revision in `adapters`: the commit the
    classifier was trained with is pinned in the run's recipe.yaml (`user/name@COMMIT`), and its files are the export's
    copy (`XLora.save_sources`)."""
    from peftkit.hub import pinned_reference

    if pinned := pinned_reference(path):
        return pinned.rpartition("@")[0]
    return str(Path(path).resolve())


def warn_of_hub_subfolders(adapters: dict[str, str]) -> None:
    """Warns of the experts in a subfolder of a hub repository, which adapter_config.json names `user/name/SUBFOLDER`
    (`loadable`) and peft 0.21.2 cannot load: it takes the whole for a repository id ("Can't find
    'adapter_config.json' at 'user/name/SUBFOLDER'"), and its one route by subfolder (XLoraConfig._subfolders, set
    for an X-LoRA on the hub) fails unpacking its own loop. peft's users load the export's copy instead."""
    import warnings

    from peftkit.errors import PeftkitWarning
    from peftkit.hub import pinned_commit, pinned_reference

    named = [(name, loadable(path)) for name, path in adapters.items()
             if (pinned := pinned_reference(path)) and pinned_commit(pinned)[2]]
    if named:
        warnings.warn(PeftkitWarning(
            f"X-LoRA: adapter_config.json's `adapters` names {', '.join(f'expert {n!r} {v}' for n, v in named)} "
            "(adapter.adapters: a hub adapter in a subfolder of its repository), which peft 0.21.2 cannot load: it "
            "takes 'user/name/SUBFOLDER' for a repository id (\"Can't find 'adapter_config.json'\"). peftkit loads the "
            "export as it is; peft's users must set config.adapters to the export's copies of the experts "
            "(ADAPTER_DIR/0, ADAPTER_DIR/1, ...) and pass config= to PeftModel.from_pretrained, as the model card "
            "shows"), stacklevel=2)


def peft_expert(name: str, value: str, config_file: Path) -> str:
    """The directory of the expert adapter_config.json (`config_file`, peft's: no copies) names `name`, its `value`
    read as peft 0.21.2 reads it (LoraConfig.from_pretrained and load_peft_weights of it): a local directory, absolute
    or relative to the working directory (not to the X-LoRA's own), else a hub id, `user/name` (the snapshot
    `peftkit.hub.hub_adapter` gives: fetched, offline from the Hugging Face cache, as peftkit reads any hub adapter)."""
    from peftkit.hub import hub_adapter, hub_shaped

    local = Path(value).absolute()
    if local.is_dir():
        return str(local)
    said = f"{config_file}: adapters['{name}'] is '{value}'"
    fix = ("Set it to the LoRA expert's directory (absolute, or relative to the working directory, as peft 0.21.2 "
           "reads it) or its hub id (user/name).")
    if (beside := Path(config_file).parent / value).is_dir():  # (where peftkit looked before; peft never does)
        fix += (f" One lies beside adapter_config.json ({beside}): peft 0.21.2 does not look there, so neither does "
                "peftkit; give its absolute path.")
    if not hub_shaped(value):
        raise PeftkitError(f"{said}: no such directory ({local}), and no hub id. {fix}")
    try:
        snapshot = hub_adapter(value, tried=str(local))
    except PeftkitError as e:
        raise PeftkitError(f"{said}: {e} {fix}") from None
    _warn_of_peft_unloadable(said, value)
    return snapshot


def _warn_of_peft_unloadable(said: str, value: str) -> None:
    """Warns of a hub expert that peftkit loads (`hub_adapter`) and peft 0.21.2 cannot: one at a revision
    (`user/name@REV`; peft reads no revision in `adapters`) or in a subfolder of its repository (`user/name/SUBFOLDER`):
    peft takes either whole for a repository id ("Can't find 'adapter_config.json' at 'user/name@REV'")."""
    import warnings

    from peftkit.errors import PeftkitWarning

    name, _, revision = value.partition("@")
    user, repo, *subfolder = name.split("/")
    why = [f"at revision '{revision}'"] * bool(revision) + [f"in a subfolder of {user}/{repo}"] * bool(subfolder)
    if not why:
        return
    fix = "the expert's directory" + ("" if subfolder else f", or its hub id alone ({name}: its main branch, which "
                                                            f"may hold another expert than '{revision}')")
    warnings.warn(PeftkitWarning(
        f"{said}, a hub adapter {' and '.join(why)}: peftkit loads it, and peft 0.21.2 would not: it reads each value "
        f"whole as a directory or a repository id (\"Can't find 'adapter_config.json' at '{value}'\"). For peft's "
        f"users, set it to {fix}."), stacklevel=3)


def expert_shown(value: str) -> str:
    """An expert as `peftkit inspect` shows it: as adapter_config.json's `adapters` names it, and for a hub id that is
    no local directory (read as peft reads it: `peft_expert`), the snapshot in the local Hugging Face cache that
    peftkit reads (looked up there, not downloaded), or that there is none."""
    from huggingface_hub import try_to_load_from_cache

    from peftkit.hub import hub_shaped

    if not isinstance(value, str) or Path(value).absolute().is_dir() or not hub_shaped(value):
        return value
    name, _, revision = value.partition("@")
    user, repo, *subfolder = name.split("/")
    inside = "/".join([*subfolder, "adapter_config.json"])
    found = try_to_load_from_cache(f"{user}/{repo}", inside, revision=revision or None)
    if not isinstance(found, str):  # (None: not cached; a sentinel: cached as missing)
        return f"{value} (hub; not in the local Hugging Face cache)"
    return f"{value} (hub; its snapshot here: {Path(found).parent})"


def copied_experts(directory: Path, recorded: dict[str, str], config_file: Path) -> dict[str, str] | None:
    """The experts' copies in the X-LoRA directory `directory` (peftkit's export: its peftkit.json `experts`), by
    name, as paths; None for one without them (peft's, or peftkit's from before they were copied), whose experts are
    where adapter_config.json's `adapters` (`recorded`) says. The copies are the experts the classifier was trained
    with, wherever the directory is now; the directories `adapters` records may be gone, moved or retrained since."""
    from peftkit.adapter_meta import META_NAME, read_meta

    copies = read_meta(directory).experts
    if copies is None:
        return None
    meta = directory / META_NAME
    if list(copies) != list(recorded):
        raise PeftkitError(f"{meta}: experts names {', '.join(map(repr, copies))}, and {config_file}'s adapters "
                           f"{', '.join(map(repr, recorded))}: one list of experts. {REEXPORT}")
    for name, relative in copies.items():
        if Path(relative).is_absolute() or ".." in Path(relative).parts:
            raise PeftkitError(f"{meta}: experts['{name}'] is {relative}, not a directory inside {directory}, where "
                               f"the X-LoRA export holds its experts' copies. {REEXPORT}")
        if not (directory / relative / "adapter_config.json").is_file():
            raise PeftkitError(f"{directory}: the copy of the expert '{name}' ({directory / relative}, named by its "
                               f"{META_NAME}) is missing: an X-LoRA directory holds its experts. Copy or move the "
                               "adapter directory whole, with its subdirectories.")
    return {name: str(directory / relative) for name, relative in copies.items()}
