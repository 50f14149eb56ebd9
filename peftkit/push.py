"""peftkit push: a run's adapter/ (or merged/), or an adapter or model directory, published to a Hugging Face Hub model
repository in one commit through huggingface_hub's own API (`create_repo`, `create_branch`, `upload_folder`), as
peft's `push_to_hub` does. Only that directory's own files go, listed before anything is sent: never a run's
checkpoints, data or logs, nor a file a link inside it points to elsewhere. What `--adapter user/name` and peft's
`PeftModel.from_pretrained("user/name")` read back is what was pushed."""

from __future__ import annotations

import fnmatch
import glob
import posixpath
import re
import warnings
from pathlib import Path

from peftkit import __version__
from peftkit.errors import PeftkitError, PeftkitWarning


LOADER_FILES = ("*.json", "*.safetensors", "*.bin", "*.jinja", "*.model", "*.tiktoken", "merges.txt", "vocab.txt")
"""What transformers, peft and peftkit read of a repository's top level (configs, weights and their index, tokenizer
files, chat templates): a push deletes those its directory lacks, which would be read with what it pushed (an
adapter_config.json left beside a merged model makes transformers load it as an adapter)."""


def push_folder(path: Path, merged: bool) -> tuple[Path, str]:
    """(the directory to upload, what it holds: 'adapter' or 'merged model') for PATH: a run directory (its adapter/,
    with `merged` its merged/), an adapter directory, or a model directory."""
    from peftkit.peft_format import CONFIG_NAME, check_adapter_dir
    from peftkit.rundir import is_run

    if not path.is_dir():
        raise PeftkitError(f"{path}: no such directory. Give a run directory (its adapter/ is pushed; with --merged "
                           "its merged/), an adapter directory or a merged model's directory.")
    if is_run(path):
        entry = "merged" if merged else "adapter"
        if not (path / entry).is_dir():
            if merged:
                why = (f"export.merged: true exports one; `peftkit merge --adapter {path / 'adapter'} --output DIR` "
                       "makes one")
            else:
                why = "export.adapter: false, or the run has not finished: `peftkit train RECIPE --resume` finishes it"
                why += "; its merged/ is pushed with --merged" if (path / "merged").is_dir() else ""
            raise PeftkitError(f"{path} is a run directory holding no {entry}/ to push ({why}).")
        if not (path / "manifest.json").is_file():  # as eval/generate of such a run say
            warnings.warn(PeftkitWarning(f"{path} has no manifest.json: the run has not finished (or was stopped "
                                         f"while it made its end again); this is the {entry}/ it exported last. "
                                         "`peftkit train RECIPE --resume` finishes it."), stacklevel=2)
        path = path / entry
    if (path / CONFIG_NAME).is_file():
        if merged:
            raise PeftkitError(f"{path} is an adapter directory, and --merged pushes a run's merged/: drop --merged, "
                               "or give the merged model's directory.")
        check_adapter_dir(path)  # its safetensors weights there (a legacy .bin is refused, as loading refuses it)
        return path, "adapter"
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return path, "merged model"
    hint = (" It is a training checkpoint (optimizer state, not for the Hub): push the run's adapter/, once the run "
            "has finished." if (path / "training_state.pt").is_file() else "")
    raise PeftkitError(f"{path} is no run, adapter or model directory: it holds no recipe.yaml, {CONFIG_NAME}, nor "
                       f"config.json with safetensors weights.{hint}")


def folder_files(folder: Path) -> list[str]:
    """The files pushed from `folder`, relative to it: all but hidden ones (an interrupted write's `.x.tmp`); a link
    to a file outside it is refused (its target would be uploaded), and a link to a directory (neither this listing
    nor huggingface_hub's follows it: its files would be left out unsaid)."""
    root, files = folder.resolve(), []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.is_symlink() and path.is_dir():
            raise PeftkitError(f"{path} links to the directory {path.resolve()}, whose files would not be pushed "
                               "(links to directories are not followed). Copy the directory with its links' files in "
                               "it (`cp -rL`), and push the copy.")
        if not path.is_file():
            continue
        if not path.resolve().is_relative_to(root):
            raise PeftkitError(f"{path} links to {path.resolve()}, outside {folder}: only the directory's own files "
                               "are pushed. Copy the directory with its links' files in it (`cp -rL`), and push the "
                               "copy.")
        files.append(relative.as_posix())
    return files


def push(path: Path, repo_id: str, revision: str | None = None, private: bool = False, merged: bool = False,
         message: str | None = None, overwrite: bool = False) -> tuple[str, list[str], list[str], str | None]:
    """Upload `path`'s adapter (or merged model) to Hub model repository `repo_id` in one commit; where the branch
    holds `LOADER_FILES` the directory lacks at its top level or in a subfolder it pushes (an earlier push's
    chat_template.jinja would be read with the new adapter; X-LoRA's experts' copies, `0/`, are adapters too), the
    commit deletes them with `overwrite`, and without it nothing is committed (other files, a licence, images, and the
    files of a subfolder it does not push, another adapter's, stay); (the commit's URL, the files pushed, the files
    deleted, the commit's id where the Hub gave it).

    Args:
        path: a run directory, an adapter directory or a model directory (`push_folder`).
        repo_id: `user/name`, created where absent.
        revision: the branch committed to, created from main where absent; None: main.
        private: create the repository private; an existing public one is refused, never published into.
        merged: a run's merged/ instead of its adapter/.
        message: the commit message.
        overwrite: delete the branch's loader files the directory lacks (they stay in the repository's history).
    """
    folder, kind = push_folder(path, merged)
    files = folder_files(folder)
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    _check_pushable(folder, repo_id, revision)
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private or None, exist_ok=True)  # None: the owner's default visibility
        if private and not api.repo_info(repo_id).private:
            raise PeftkitError(f"{repo_id} exists and is public, and --private was asked: nothing was pushed. Make it "
                               "private in its settings on the Hub, or push without --private.")
        if revision not in (None, constants.DEFAULT_REVISION):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        written = {posixpath.dirname(f) for f in files}  # the top level, and the subfolders pushed (X-LoRA's experts)
        stale = [f for f in api.list_repo_files(repo_id, revision=revision)
                 if posixpath.dirname(f) in written and f not in files
                 and any(fnmatch.fnmatch(posixpath.basename(f), p) for p in LOADER_FILES)]
        if stale and not overwrite:
            raise PeftkitError(f"{repo_id} ({revision or 'main'}) holds {', '.join(stale)}, which {folder} lacks and "
                               "which transformers, peft or peftkit would read with the pushed files (an earlier "
                               "push's): nothing was committed. Push with --overwrite to delete them in the same "
                               "commit (they stay in the repository's history), or push to another --revision.")
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                                   allow_patterns=[glob.escape(f) for f in files],
                                   delete_patterns=[glob.escape(f) for f in stale] or None,
                                   commit_message=message or f"Upload {kind} with peftkit {__version__}")
    except HfHubHTTPError as e:
        raise PeftkitError(f"Could not push {folder} to {repo_id}: {_refusal(e, repo_id)}") from None
    except ValueError as e:  # the Hub refused README.md's metadata (`upload_folder` validates it first)
        raise PeftkitError(f"Could not push {folder} to {repo_id}: {' '.join(str(e).split())}") from None
    except network_errors() as e:
        raise PeftkitError(f"Could not push {folder} to {repo_id}: the Hub at {api.endpoint} could not be reached "
                           f"({type(e).__name__}: {e}). Check the connection (HF_ENDPOINT names another server).") \
            from None
    return commit.commit_url, files, stale, commit.oid


def _check_pushable(folder: Path, repo_id: str, revision: str | None) -> None:
    """Refuse, before anything is sent, a repository id or branch the push cannot use, and a push that cannot reach
    the Hub (offline, no token)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if repo_id.count("/") != 1:  # a bare name goes to whichever account the token is, where `--adapter` cannot tell
        raise PeftkitError(f"{repo_id!r} is no Hub repository id: give user/name (or organization/name).")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise PeftkitError(f"{repo_id!r} is no Hub repository id ({e}).") from None
    if revision is not None and re.fullmatch(r"[0-9a-f]{40}", revision):  # create_branch would name a branch so
        raise PeftkitError(f"--revision {revision} is a commit id, and a push makes a commit on a branch: give the "
                           "branch's name (created from main where absent).")
    if (blocked := _cannot_push()) == "offline":
        raise PeftkitError(f"HF_HUB_OFFLINE is set, so nothing is sent to the Hub: unset it to push {folder} to "
                           f"{repo_id}.")
    if blocked == "no token":
        raise PeftkitError(f"Pushing to {repo_id} needs a Hugging Face token with write access, and none is set: log "
                           "in with `hf auth login`, or set HF_TOKEN.")


def check_recipe_push(export) -> None:
    """Before a run with export.push_to_hub trains (`export`: the recipe's ExportConfig): refuse it where nothing
    could be pushed at its end (offline, no token), rather than after the run."""
    repo_id = export.push_to_hub
    later = (f"or remove export.push_to_hub and push the finished run with `{_push_command(export)}` where the Hub "
             "can be reached")
    if (blocked := _cannot_push()) == "offline":
        raise PeftkitError(f"export.push_to_hub: HF_HUB_OFFLINE is set, so the run's adapter could not be pushed to "
                           f"{repo_id} at its end; nothing was trained. Unset it, {later}.")
    if blocked == "no token":
        raise PeftkitError(f"export.push_to_hub: pushing to {repo_id} needs a Hugging Face token with write access, "
                           "and none is set; nothing was trained. Log in with `hf auth login`, or set HF_TOKEN; "
                           f"{later}.")


def _cannot_push() -> str | None:
    """Why nothing could be pushed from here, before anything is sent: "offline" (HF_HUB_OFFLINE), "no token", or
    None."""
    from huggingface_hub import constants, get_token

    return "offline" if constants.HF_HUB_OFFLINE else "no token" if get_token() is None else None


def push_run(out: Path, export, console) -> None:
    """export.push_to_hub at a finished run's end (main process): `out`'s adapter/ pushed as `peftkit push` does,
    with export.push_revision and export.push_private (`export`: the recipe's ExportConfig), said, and then recorded
    in its manifest.json (`_record_push`). A push that fails keeps the run (its files are written): the error says so
    and how to push it again."""
    repo_id, revision = export.push_to_hub, export.push_revision
    try:
        commit_url, files, _, commit = push(out, repo_id, revision, export.push_private)
    except PeftkitError as e:
        raise PeftkitError(f"The run finished and its files are in {out}, but export.push_to_hub failed: {e} Push it "
                           f"again with `{_push_command(export, out)}`.") from None
    at = f" ({revision})" if revision else ""
    console.print(f"export.push_to_hub: pushed {len(files)} files of {out / 'adapter'} to {repo_id}{at}: {commit_url}",
                  highlight=False, soft_wrap=True)  # said before manifest.json is touched: said even if that fails
    _record_push(out, {"repo": repo_id, "revision": revision or "main", "commit": commit, "url": commit_url})


def _record_push(out: Path, record: dict) -> None:
    """`record` (the push: repository, branch, commit id and URL) as manifest.json's `pushed_to_hub`. Where
    manifest.json cannot be read or rewritten (a full disk, a read-only or removed file, an edited one), the push has
    happened all the same: the error says so first, then why the file could not take it, and holds the record in
    full, to be kept from there (the console said the commit already). manifest.json is left as it was (its write is
    atomic) and so is every other file of the run: pushing again is not needed. The record is not written to another
    file instead: the disk that refused manifest.json would most likely refuse it too, and a file that is no run
    entry would outlive the run (a new run in the directory clears only its own entries)."""
    import json

    from peftkit.fileio import atomic_write_json

    path = out / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        manifest["pushed_to_hub"] = record
        atomic_write_json(path, manifest)
    except (OSError, ValueError, PeftkitError) as e:  # ValueError: no JSON (or no UTF-8) where manifest.json was
        why = str(e) if isinstance(e, PeftkitError) else f"{type(e).__name__}: {e}"
        why += "" if why.endswith(".") else "."
        raise PeftkitError(
            f"export.push_to_hub pushed the run's adapter/ to {record['repo']} ({record['revision']}): commit "
            f"{record['commit']}, {record['url']}. But {path} could not record the push: {why} It is unchanged, and "
            f"nothing of the run in {out} is lost; the push need not be made again. The record manifest.json lacks "
            f"(keep it, or add it there as its key): \"pushed_to_hub\": {json.dumps(record)}") from None


def _push_command(export, out: Path | None = None) -> str:
    """The `peftkit push` command that pushes the run of ExportConfig `export` (in `out`: its output_dir) as
    export.push_to_hub would."""
    flags = f" --revision {export.push_revision}" if export.push_revision else ""
    flags += " --private" if export.push_private else ""
    return f"peftkit push {out or export.output_dir} {export.push_to_hub}{flags}"


def _refusal(e, repo_id: str) -> str:
    """What the Hub's HTTP error `e` means to a push, and what to do."""
    status = e.response.status_code if e.response is not None else None
    said = f" (the Hub said: {' '.join(e.server_message.split())})" if getattr(e, "server_message", None) else ""
    fix = "log in with `hf auth login`, or set HF_TOKEN to a token with write access"
    if status == 401:
        return f"the Hub refused the token (401: invalid or expired){said}; {fix}."
    if status == 403:
        return (f"the token may not write to {repo_id.split('/')[0]} (403){said}; {fix} there (a fine-grained token "
                "needs write access to that user or organization).")
    if status == 404:
        return (f"the Hub found no repository {repo_id} that this token may write to (404){said}; check the id, and "
                f"that the token (`hf auth login`, or HF_TOKEN) may write to {repo_id.split('/')[0]}.")
    return f"the Hub answered {status}{said}: {' '.join(str(e).split())}"


def network_errors() -> tuple[type[Exception], ...]:
    """What the hub client raises where the Hub cannot be reached (a refused connection, a timeout): the transport
    errors of the HTTP library it uses, imported by then (httpx2 in huggingface_hub 2.x, httpx in 1.x, requests
    before). Not any OSError: a file of the folder that cannot be read is the CLI's permission error."""
    import sys

    names = (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "RequestException"))
    return tuple(getattr(sys.modules[module], error) for module, error in names if module in sys.modules)
