"""The run directory and checkpoints: nothing of the user's is deleted, one writer at a time, a crash's
leftovers are tidied, a damaged checkpoint is passed over, and a resume on changed inputs is refused."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from peftkit import fileio
from peftkit.cli import app
from peftkit.errors import PeftkitError, PeftkitWarning
from peftkit.recipe import load_recipe
from peftkit.rundir import open_run_dir, run_lock, tidy_leftovers
from peftkit.train import train
from tests.conftest import cli_user_error, make_recipe

SECTIONS = dict(training={"max_steps": 6, "save_steps": 2, "save_total_limit": 3}, eval={"base_model": False})


def _console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=200), buffer


def _recipe(tmp_path: Path, tiny_llama, files, **sections):
    return load_recipe(make_recipe(tmp_path, tiny_llama, files, **{**SECTIONS, **sections}))


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------- never delete user files


def test_train_refuses_a_directory_of_user_files(tiny_llama, number_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "config.json").write_text("{}")
    with pytest.raises(PeftkitError) as e:
        train(_recipe(tmp_path, tiny_llama, number_data), console=_console()[0])
    assert str(e.value) == (
        f"export.output_dir {out} already holds files that peftkit did not write (config.json, notes.txt). Choose a "
        "new or empty directory, or pass --overwrite (a run writes only adapter, merged, checkpoints, metrics.jsonl, "
        "recipe.yaml, manifest.json, report, trackers; your files stay).")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "notes.txt"]  # no .peftkit.lock left behind
    train(_recipe(tmp_path, tiny_llama, number_data), overwrite=True, console=_console()[0])
    assert (out / "notes.txt").read_text() == "my notes" and (out / "config.json").read_text() == "{}"
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_a_recipe_kept_in_its_own_output_dir_is_not_overwritten(tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    """export.output_dir: . beside recipe.yaml: the run wrote its resolved recipe over the user's (with --overwrite
    it removed it first, as an old run's entry). A run's own recipe.yaml, as the run wrote it, still resumes."""
    recipe = make_recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 2, "save_steps": 1},
                         eval={"base_model": False}, export={"output_dir": "."})
    text = "# my notes\n" + recipe.read_text()
    recipe.write_text(text)
    for flags in ((), ("--overwrite",)):
        message = cli_user_error(monkeypatch, capsys, "train", str(recipe), *flags)
        assert f"{recipe}: this recipe is the recipe.yaml of its own export.output_dir ({tmp_path})" in message
        assert recipe.read_text() == text
    recipe.write_text(text.replace("output_dir: .", "output_dir: run"))
    train(load_recipe(recipe), console=_console()[0])
    result = CliRunner().invoke(app, ["train", str(tmp_path / "run" / "recipe.yaml"), "--resume"])
    assert result.exit_code == 0, result.output


def test_the_recipe_yaml_of_a_run_made_before_keys_were_added_still_resumes(tiny_llama, number_data, tmp_path):
    """`peftkit train RUN/recipe.yaml --resume` of a run whose recipe.yaml an earlier peftkit wrote, without the keys
    added since (data.group_by_length, training.decay_ratio, decay_type, num_cycles), was refused as a recipe kept in
    its own export.output_dir: its text is not today's dump. The same recipe, as a plain dump, resumes; one with a
    comment of the user's is still refused."""
    import yaml

    recipe = make_recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 2, "save_steps": 1},
                         eval={"base_model": False})
    train(load_recipe(recipe), console=_console()[0])
    own = tmp_path / "run" / "recipe.yaml"
    old = yaml.safe_load(own.read_text())
    del old["data"]["group_by_length"]
    for key in ("decay_ratio", "decay_type", "num_cycles"):
        del old["training"][key]
    own.write_text(yaml.safe_dump(old, sort_keys=False))
    result = CliRunner().invoke(app, ["train", str(own), "--resume"])
    assert result.exit_code == 0, result.output
    own.write_text("# my notes\n" + yaml.safe_dump(old, sort_keys=False))
    result = CliRunner().invoke(app, ["train", str(own), "--resume"])
    assert "this recipe is the recipe.yaml of its own export.output_dir" in str(result.exception), result.output


def test_the_recipe_of_a_copied_run_does_not_train_the_original(tiny_llama, number_data, tmp_path, monkeypatch,
                                                                 capsys):
    """A run copied elsewhere keeps a recipe.yaml whose export.output_dir names the original: `peftkit train
    COPY/recipe.yaml --resume` (or --overwrite) went on with, or replaced, the original run, silently."""
    recipe = make_recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 4, "save_steps": 2},
                         eval={"base_model": False})
    run = tmp_path / "run"
    train(load_recipe(recipe), console=_console()[0])
    shutil.copytree(run, tmp_path / "copy")
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    for flags in (("--resume",), ("--overwrite",)):
        message = cli_user_error(monkeypatch, capsys, "train", str(tmp_path / "copy" / "recipe.yaml"), *flags)
        assert (f"{tmp_path / 'copy' / 'recipe.yaml'} is the recipe of the run in {tmp_path / 'copy'}, copied or moved "
                f"there from {run}, which its export.output_dir still names: this would train there (--resume, "
                f"--overwrite), not in {tmp_path / 'copy'}. A run goes on where it was made: use {run / 'recipe.yaml'}"
                ) in message
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    # A project's own recipe.yaml beside the runs it made (checkpoints/lora-a/) is no copied run's.
    project = make_recipe(tmp_path / "project", tiny_llama, number_data, training={"max_steps": 1},
                          eval={"base_model": False}, export={"output_dir": "checkpoints/lora-a"})
    for output_dir in ("checkpoints/lora-a", "checkpoints/lora-b"):
        result = CliRunner().invoke(app, ["train", str(project), "--set", f"export.output_dir={output_dir}"])
        assert result.exit_code == 0, result.output


def test_hidden_files_named_like_temp_files_are_the_user_s(tiny_llama, number_data, tmp_path):
    """Only the temp names of a run's own entries (`.adapter.XXXX.tmp`, `.adapter.old`) are tidied: a user's
    `.draft.tmp` or `.bashrc.old` made the directory look empty, and was deleted (or renamed) without --overwrite."""
    out = tmp_path / "run"
    (out / ".cache.tmp").mkdir(parents=True)
    (out / ".draft.tmp").write_text("draft")
    (out / ".bashrc.old").write_text("old")
    with pytest.raises(PeftkitError, match=r"already holds files that peftkit did not write \(.bashrc.old, .cache.tmp, "
                                           r".draft.tmp\)"):
        train(_recipe(tmp_path, tiny_llama, number_data), console=_console()[0])
    train(_recipe(tmp_path, tiny_llama, number_data), overwrite=True, console=_console()[0])
    assert (out / ".draft.tmp").read_text() == "draft" and (out / ".bashrc.old").read_text() == "old"
    assert (out / ".cache.tmp").is_dir() and not (out / "bashrc").exists()


def test_overwrite_never_replaces_a_user_directory_named_like_a_run_output(tiny_llama, number_data, tmp_path):
    out = tmp_path / "run"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_config.json").write_text("{}")  # e.g. an adapter downloaded from the hub
    with pytest.raises(PeftkitError) as e:
        train(_recipe(tmp_path, tiny_llama, number_data), overwrite=True, console=_console()[0])
    assert str(e.value) == (
        f"export.output_dir {out} holds adapter, which peftkit did not write and a run would replace, even with "
        "--overwrite. Move it away or choose another export.output_dir.")
    assert (out / "adapter" / "adapter_config.json").read_text() == "{}"


def test_overwrite_keeps_the_old_run_when_the_new_one_fails_to_load(tiny_llama, number_data, tmp_path):
    recipe = _recipe(tmp_path, tiny_llama, number_data)
    train(recipe, console=_console()[0])
    before = _snapshot(tmp_path / "run")
    broken = _recipe(tmp_path, tiny_llama, number_data, data={"max_length": 8})  # nothing left to learn
    with pytest.raises(PeftkitError, match="nothing left to learn"):
        train(broken, overwrite=True, console=_console()[0])
    assert _snapshot(tmp_path / "run") == before


def test_resume_and_overwrite_together_is_an_error(tiny_llama, number_data, tmp_path):
    with pytest.raises(PeftkitError, match="^--resume and --overwrite contradict each other"):
        train(_recipe(tmp_path, tiny_llama, number_data), resume=True, overwrite=True, console=_console()[0])
    assert not (tmp_path / "run").exists()


def test_rerun_without_resume_does_not_discard_an_unfinished_run(tiny_llama, number_data, tmp_path, monkeypatch):
    recipe = _recipe(tmp_path, tiny_llama, number_data)
    train(recipe, console=_console()[0])
    (tmp_path / "run" / "manifest.json").unlink()  # as if killed before the end
    with pytest.raises(PeftkitError) as e:
        train(recipe, console=_console()[0])
    assert str(e.value).startswith(f"{tmp_path / 'run'} holds an unfinished run of this recipe, with checkpoints in ")
    assert "Continue it with --resume, or pass --overwrite" in str(e.value)
    assert len(list((tmp_path / "run" / "checkpoints").iterdir())) == 3


def test_unwritable_output_dir_is_refused_before_loading(tiny_llama, number_data, tmp_path):
    # /sys refuses new files even to root (the CI user): a read-only directory that chmod cannot fake.
    recipe = _recipe(tmp_path, tiny_llama, number_data, export={"output_dir": "/sys/peftkit-run"})
    with pytest.raises(PeftkitError, match=r"^export.output_dir /sys/peftkit-run is not writable \("):
        train(recipe, console=_console()[0])


# ------------------------------------------------------------------------------------------ one writer


def test_second_writer_is_refused_naming_the_process_and_a_killed_run_leaves_no_stuck_lock(tiny_llama, number_data,
                                                                                            tmp_path):
    recipe_path = make_recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 400}, eval={"base_model": False})
    proc = subprocess.Popen([sys.executable, "-m", "peftkit", "train", str(recipe_path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not metrics.exists():
        time.sleep(0.05)
    try:
        with pytest.raises(PeftkitError) as e:
            train(load_recipe(recipe_path), console=_console()[0])
        assert str(e.value) == (
            f"export.output_dir {tmp_path / 'run'} is in use by another peftkit run (process {proc.pid} on "
            f"{os.uname().nodename}). Wait for it to finish or stop it, or choose another export.output_dir.")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert not (tmp_path / "run" / "manifest.json").exists(), "the first run finished too early to test anything"
    with run_lock(tmp_path / "run"):  # the kernel dropped the dead process's lock
        pass



@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="makes a file of another user's")
def test_another_user_s_lock_file_is_locked_read_only(tmp_path):
    """A shared project: the run's `.peftkit.lock` was made by another user (mode 644), and open(O_RDWR) failed with
    a PermissionError traceback on every `train` and `--resume` there. flock needs no write access: the file is
    opened read-only; one it cannot even read is a clear error."""
    lock = tmp_path / ".peftkit.lock"
    lock.write_text("process 7 on elsewhere\n")
    os.chown(lock, 65534, 65534)
    caps = "-dac_override,-dac_read_search"  # root bound by file modes, as another user is
    script = ("import sys\nfrom pathlib import Path\nfrom peftkit.errors import PeftkitError\n"
              "from peftkit.rundir import run_lock\ntry:\n    with run_lock(Path(sys.argv[1])):\n        print('held')\n"
              "except PeftkitError as e:\n    print(e)\n")

    def lock_as_another_user() -> str:
        return subprocess.run(["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", "--", sys.executable, "-c",
                               script, str(tmp_path)], capture_output=True, text=True, timeout=120).stdout.strip()

    assert lock_as_another_user() == "held"
    assert lock.read_text() == "process 7 on elsewhere\n"
    lock.chmod(0o600)
    assert lock_as_another_user() == (f"{lock}, the lock file of another user's run, cannot be opened (permission "
                                      "denied). Once no run of theirs uses the directory, remove the file.")


@pytest.mark.parametrize("planted", ["link", "dangling", "fifo"])
def test_a_lock_file_that_is_a_link_or_a_fifo_is_never_written_through(tmp_path, planted):
    """A run from elsewhere with `.peftkit.lock` linked to a user's file: every `train` truncated that file and wrote
    its process line into it (created it, for a dangling link), even when the run was then refused."""
    victim = tmp_path / "victim" / "authorized_keys"
    victim.parent.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    if planted == "fifo":
        os.mkfifo(run / ".peftkit.lock")
    else:
        if planted == "link":
            victim.write_text("ssh-ed25519 AAAA user\n")
        (run / ".peftkit.lock").symlink_to(victim)
    with pytest.raises(PeftkitError, match=r"\.peftkit\.lock is not a plain file \(a symbolic link, a FIFO or a device\)"):
        with run_lock(run):
            pass
    assert (victim.read_text() == "ssh-ed25519 AAAA user\n") if planted == "link" else not victim.exists()


def test_a_leftover_temp_name_that_is_a_link_to_a_directory_is_removed_as_a_link(tmp_path):
    """`.adapter.x1y2.tmp` linked to a directory: rmtree refused it ("Cannot call rmtree on a symbolic link"), a
    traceback at every --resume; the link goes, what it points to stays."""
    outside = tmp_path / "outside"
    (outside / "keep").mkdir(parents=True)
    run = tmp_path / "run"
    run.mkdir()
    (run / ".adapter.x1y2.tmp").symlink_to(outside, target_is_directory=True)
    assert tidy_leftovers(run) == ["removed .adapter.x1y2.tmp, left by an interrupted write"]
    assert not (run / ".adapter.x1y2.tmp").is_symlink() and (outside / "keep").is_dir()


@pytest.mark.parametrize("name", ["metrics.jsonl", "manifest.json", "recipe.yaml"])
@pytest.mark.parametrize("planted", ["link", "fifo"])
def test_a_run_file_that_is_a_link_or_a_fifo_is_refused_not_written_through(tiny_llama, number_data, tmp_path, name,
                                                                           planted):
    """`train --resume` rewrote metrics.jsonl through a link planted in a run (a user's ~/.bashrc became metric lines),
    and hung reading a FIFO; a run's own files are never either."""
    cfg = _recipe(tmp_path, tiny_llama, number_data)
    victim = tmp_path / "bashrc"
    victim.write_text("export PATH=$HOME/bin:$PATH\n")
    run = Path(cfg.export.output_dir)
    run.mkdir()
    if planted == "link":
        (run / name).symlink_to(victim)
        said = rf"{name} is a symbolic link \(to {victim}\); a run's own files never are"
    else:
        os.mkfifo(run / name)
        said = rf"{name} is not a plain file \(a FIFO, a device or a directory\)"
    with pytest.raises(PeftkitError, match=said):
        train(cfg, resume=True, console=_console()[0])
    assert victim.read_text() == "export PATH=$HOME/bin:$PATH\n"


@pytest.mark.parametrize("failure", ["no locks", "full disk"])
def test_a_lock_on_a_file_system_without_locks_or_space_does_not_stop_the_run(tmp_path, monkeypatch, failure):
    """flock on a file system without locks (ENOLCK: some NFS mounts; EOPNOTSUPP) and the holder's line on a full
    disk were OSError tracebacks at the start of every train; the run now goes on (unlocked, said)."""
    import fcntl

    def fail(*args):
        raise OSError(errno.ENOLCK if failure == "no locks" else errno.ENOSPC, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl if failure == "no locks" else os, "flock" if failure == "no locks" else "write", fail)
    if failure == "no locks":
        with pytest.warns(PeftkitWarning, match="cannot lock files .*: this run goes on unlocked"):
            with pytest.raises(ValueError) as raised, run_lock(tmp_path):
                raise ValueError("the run's own error")
        assert raised.value.__context__ is None  # not "during handling of" the lock's OSError
    else:
        with run_lock(tmp_path):
            pass


def test_a_forked_child_that_outlives_a_killed_run_does_not_hold_its_lock(tmp_path):
    """A DataLoader worker (a fork) lives on for seconds after its run is killed; it must not keep the run's lock,
    or `--resume` at once is refused, naming the dead process."""
    holder = tmp_path / "holder.py"
    holder.write_text(
        "import multiprocessing, sys, time\n"
        "from pathlib import Path\n"
        "from peftkit.rundir import run_lock\n"
        "def worker(started):\n"
        "    started.set()\n"
        "    time.sleep(60)\n"
        "with run_lock(Path(sys.argv[1])):\n"
        "    context = multiprocessing.get_context('fork')\n"
        "    started = context.Event()\n"
        "    child = context.Process(target=worker, args=(started,))\n"
        "    child.start()\n"
        "    started.wait(60)  # the child runs: the fork's handlers (closing the lock) are done\n"
        "    print(child.pid, flush=True)\n"
        "    time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, str(holder), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    try:
        with pytest.raises(PeftkitError, match="in use by another peftkit run"):  # held while its run lives
            with run_lock(tmp_path):
                pass
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        os.kill(child, 0)  # the child lives on
        with run_lock(tmp_path):
            pass
    finally:
        proc.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)

# ------------------------------------------------------------------------------------ crash leftovers


def test_leftovers_of_a_killed_write_are_tidied_and_an_interrupted_replace_is_undone(tiny_llama, number_data,
                                                                                     tmp_path):
    recipe = _recipe(tmp_path, tiny_llama, number_data)
    train(recipe, console=_console()[0])
    run = tmp_path / "run"
    adapter = _snapshot(run / "adapter")
    # Killed between the two renames of atomic_directory: only `.adapter.old` holds the adapter.
    os.replace(run / "adapter", run / ".adapter.old")
    (run / ".merged.k2j3.tmp").mkdir()
    (run / ".manifest.json.x8a1.tmp").write_text("{")
    (run / "checkpoints" / ".step-00000008.q1.tmp").mkdir()
    (run / "checkpoints" / ".step-00000008.q1.tmp" / "training_state.pt").write_bytes(b"half")
    console, buffer = _console()
    with open_run_dir(run, recipe.to_yaml(), resume=True, overwrite=False, console=console):
        pass
    assert _snapshot(run / "adapter") == adapter
    assert sorted(p.name for p in run.iterdir()) == [".peftkit.lock", "adapter", "checkpoints", "manifest.json",
                                                     "metrics.jsonl", "recipe.yaml"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002", "step-00000004", "step-00000006"]
    notes = buffer.getvalue()
    assert f"note: restored {run / 'adapter'} from an interrupted replace" in notes
    assert "note: removed .merged.k2j3.tmp, left by an interrupted write" in notes


def test_a_run_whose_only_checkpoint_was_being_replaced_resumes(tiny_llama, number_data, tmp_path):
    """Killed between the two renames that replace its only checkpoint (save_total_limit 1, a SIGTERM at a save
    step), a run holds `.step-N.old` and the new copy's temporary directory: --resume was refused ("no checkpoint"),
    and a run without it started again from step 0 after restoring the checkpoint. It resumes, as uninterrupted."""
    recipe = _recipe(tmp_path / "whole", tiny_llama, number_data)
    train(recipe, console=_console()[0])
    killed = _recipe(tmp_path / "killed", tiny_llama, number_data)
    train(killed, console=_console()[0])
    run = tmp_path / "killed" / "run"
    for name in ("adapter", "manifest.json"):
        shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()
    for step in ("step-00000006", "step-00000004"):
        shutil.rmtree(run / "checkpoints" / step)
    os.replace(run / "checkpoints" / "step-00000002", run / "checkpoints" / ".step-00000002.old")
    (run / "checkpoints" / ".step-00000002.x1y2.tmp").mkdir()
    console, said = _console()
    train(killed, resume=True, console=console)
    assert "Resumed from step-00000002 (step 2 of 6)" in said.getvalue()
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "whole" / "run" / "adapter" / "adapter_model.safetensors").read_bytes()


def test_resume_without_a_checkpoint_says_why_and_verify_says_what_to_do(tiny_llama, number_data, tmp_path):
    """Stopped before its first checkpoint, a run with save_steps set was told to "set training.save_steps"; verify
    told it to --resume, which is refused."""
    from peftkit.verify import verify

    recipe = _recipe(tmp_path, tiny_llama, number_data)
    train(recipe, console=_console()[0])
    run = tmp_path / "run"
    for name in ("adapter", "manifest.json", "checkpoints"):
        shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()
    with pytest.raises(PeftkitError, match=r"--resume: no checkpoint in .*checkpoints to continue from \(the run "
                                           r"stopped before its first one, or training.save_steps is not set\). Run "
                                           r"without --resume to train it again from step 0."):
        train(recipe, resume=True, console=_console()[0])
    with pytest.raises(PeftkitError, match="it stopped before its first checkpoint: train it again with `peftkit "
                                           "train RECIPE`"):
        verify(run)


def test_a_finished_run_killed_while_resumed_no_longer_looks_finished(tiny_llama, number_data, tmp_path, monkeypatch):
    """--resume of a finished run cuts metrics.jsonl back to its checkpoint and makes the end again; killed in
    between, the run kept its manifest.json (eval took it for finished, verify failed on metrics.jsonl). The manifest
    goes first; another --resume finishes the run, which verifies."""
    import peftkit.train as train_module
    from peftkit.verify import verify

    recipe = _recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 8, "save_steps": 3})
    train(recipe, console=_console()[0])
    run = tmp_path / "run"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as a kill in the loop, right after the cut

    monkeypatch.setattr(train_module, "_loop", killed)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, resume=True, console=_console()[0])
    assert not (run / "manifest.json").exists() and len((run / "metrics.jsonl").read_text().splitlines()) == 6
    result = CliRunner().invoke(app, ["eval", str(run)])  # its adapter/ is the one exported last: evaluated, said
    said = " ".join(result.stderr.split())
    assert result.exit_code == 0 and f"{run} has no manifest.json: the run has not finished" in said, result.output
    assert f"`peftkit train {run / 'recipe.yaml'} --resume` finishes it." in said
    copy = shutil.copytree(run, tmp_path / "copy")  # its recipe.yaml would resume the original, and is refused
    said = " ".join(CliRunner().invoke(app, ["eval", str(copy)]).stderr.split())
    assert (f"`peftkit train RECIPE --resume` with its project's recipe ({copy / 'recipe.yaml'} names {run}) "
            "finishes it.") in said, said
    monkeypatch.undo()
    train(recipe, resume=True, console=_console()[0])
    assert verify(run, console=_console()[0]).ok


def test_resuming_a_finished_run_writes_no_metric_line_twice(tiny_llama, number_data, tmp_path):
    recipe = _recipe(tmp_path, tiny_llama, number_data, training={**SECTIONS["training"], "eval_steps": 2})
    train(recipe, console=_console()[0])
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    console, out = _console()
    train(recipe, resume=True, console=console)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics
    assert metrics.count('"eval_loss"') == 3  # steps 2, 4 and the final one at 6
    assert "The run had finished: its final evaluation and exports are made again." in out.getvalue()
    console, out = _console()
    train(recipe, console=console)  # the same recipe again, without --resume: said, not silent
    assert "holds a finished run; this run replaces it once its data and model have loaded" in out.getvalue()


def test_a_resumed_run_records_what_an_unbroken_one_does_and_verifies(tiny_llama, number_data, tmp_path):
    """A run stopped after a checkpoint and resumed has the unbroken run's manifest (the base model's evaluation
    too: it was left out, and verify then failed on the resumed run) and its metrics.jsonl."""
    from peftkit.verify import verify

    sections = dict(training={**SECTIONS["training"], "eval_steps": 2}, eval={"base_model": True})
    whole = _recipe(tmp_path / "whole", tiny_llama, number_data, **sections)
    train(whole, console=_console()[0])
    broken = _recipe(tmp_path / "broken", tiny_llama, number_data, **sections)
    train(broken, console=_console()[0])
    run = tmp_path / "broken" / "run"
    for name in ("adapter", "checkpoints/step-00000006", "checkpoints/step-00000004", "manifest.json"):
        shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()  # as if killed after step 2
    train(broken, resume=True, console=_console()[0])

    def results(path: Path) -> tuple[dict, list]:
        metrics = json.loads((path / "manifest.json").read_text())["metrics"]
        lines = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
        from peftkit.reproduced import VARYING as vary  # what verify leaves out too (resumed_at_step among them)

        return {k: v for k, v in metrics.items() if k not in vary}, [{k: v for k, v in x.items() if k not in vary}
                                                                      for x in lines]
    assert results(run) == results(tmp_path / "whole" / "run")
    assert results(run)[0]["base_eval_loss"] is not None
    assert verify(run, console=_console()[0]).ok


def test_resuming_an_early_stopped_run_writes_its_last_evaluation_once(tiny_llama, number_data, tmp_path):
    """Early stopping at a checkpoint step: the resumed run evaluates that step again for its export, and its line
    replaces the logged one (it was written twice)."""
    stopping = {"metric": "loss", "patience": 1}
    recipe = _recipe(tmp_path, tiny_llama, number_data, training={
        "max_steps": 30, "eval_steps": 2, "save_steps": 2, "lr": 0.5, "early_stopping": stopping})
    train(recipe, console=_console()[0])
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["metrics"]["steps"] < 30  # it stopped early
    train(recipe, resume=True, console=_console()[0])
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics


# --------------------------------------------------------------------------------- damaged checkpoints


def _rewrite_state(step_dir: Path) -> None:
    """Wrong types in trainer_state.json with checksums.json updated to match: only the type check can tell."""
    (step_dir / "trainer_state.json").write_text(json.dumps({"step": "6", "tokens": 1, "losses": [], "skipped_steps": 0}))
    sums = json.loads((step_dir / "checksums.json").read_text())
    sums["files"]["trainer_state.json"] = fileio.sha256_file(step_dir / "trainer_state.json")
    (step_dir / "checksums.json").write_text(json.dumps(sums))


def _pickle_an_object(step_dir: Path) -> None:
    """A training_state.pt holding an object (a payload that would run code), checksums.json updated to match."""
    import datetime

    torch.save({"when": datetime.datetime(2026, 1, 1)}, step_dir / "training_state.pt")
    sums = json.loads((step_dir / "checksums.json").read_text())
    sums["files"]["training_state.pt"] = fileio.sha256_file(step_dir / "training_state.pt")
    (step_dir / "checksums.json").write_text(json.dumps(sums))


DAMAGE = {
    "pickled object": _pickle_an_object,
    "deep checksums": lambda d: (d / "checksums.json").write_text("[" * 100_000 + "]" * 100_000),
    "truncated weights": lambda d: (d / "adapter_model.safetensors").write_bytes(
        (d / "adapter_model.safetensors").read_bytes()[:100]),
    "missing optimizer state": lambda d: (d / "training_state.pt").unlink(),
    "bad json": lambda d: (d / "trainer_state.json").write_text("{"),
    "no checksums": lambda d: (d / "checksums.json").unlink(),
    "wrong types": _rewrite_state,
}
REASONS = {
    "deep checksums": "its checksums.json is unreadable",
    "pickled object": "its training_state.pt holds objects other than tensors and numbers, which peftkit never "
                      "unpickles (it would run code a file names)",
    "truncated weights": "adapter_model.safetensors does not match its checksum (truncated or modified)",
    "missing optimizer state": "training_state.pt is missing",
    "bad json": "trainer_state.json does not match its checksum (truncated or modified)",
    "no checksums": "it has no checksums.json (incomplete)",
    "wrong types": "it does not load (ValueError: step, tokens and skipped_steps must be non-negative integers)",
}


@pytest.fixture(scope="module")
def straight_run(tiny_llama, number_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("straight")
    train(_recipe(root, tiny_llama, number_data), console=_console()[0])
    return root / "run"


@pytest.mark.parametrize("damage", DAMAGE)
def test_resume_passes_over_a_damaged_checkpoint_and_finishes_bit_identically(tiny_llama, number_data, tmp_path,
                                                                              straight_run, damage):
    recipe = _recipe(tmp_path, tiny_llama, number_data)
    train(recipe, console=_console()[0])
    run = tmp_path / "run"
    (run / "adapter" / "adapter_model.safetensors").unlink()
    DAMAGE[damage](run / "checkpoints" / "step-00000006")
    console, buffer = _console()
    train(recipe, resume=True, console=console)
    out = buffer.getvalue()
    assert f"warning: checkpoint step-00000006 is damaged: {REASONS[damage]}; trying an older one." in out
    assert "Resumed from step-00000004 (step 4 of 6)." in out
    weights = "adapter/adapter_model.safetensors"
    assert (run / weights).read_bytes() == (straight_run / weights).read_bytes()


def test_resume_with_every_checkpoint_damaged_is_a_clear_error(tiny_llama, number_data, tmp_path):
    recipe = _recipe(tmp_path, tiny_llama, number_data, training={**SECTIONS["training"], "save_total_limit": 1})
    train(recipe, console=_console()[0])
    DAMAGE["bad json"](tmp_path / "run" / "checkpoints" / "step-00000006")
    with pytest.raises(PeftkitError, match=r"^--resume: no intact checkpoint in .*checkpoints \(each one is damaged, "
                                           r"see above\)\. Run without --resume and with --overwrite"):
        train(recipe, resume=True, console=_console()[0])


@pytest.mark.parametrize("changed", ["train.jsonl", "config.json", "tokenizer_config.json", "generation_config.json"])
def test_resume_after_the_inputs_changed_is_refused(tiny_llama, number_data, tmp_path, changed):
    """The tokenizer's files too: a chat template edited in tokenizer_config.json changes what the data tokenizes to.
    And generation_config.json (not hashed before): its end-of-turn token is where eval's answers stop."""
    data = {k: Path(shutil.copy(v, tmp_path / v.name)) for k, v in number_data.items()}
    model = Path(shutil.copytree(tiny_llama, tmp_path / "model"))
    recipe = _recipe(tmp_path, model, data)
    train(recipe, console=_console()[0])
    edited = data["train"] if changed == "train.jsonl" else model / changed
    edited.write_text(edited.read_text() + "\n")
    with pytest.raises(PeftkitError) as e:
        train(recipe, resume=True, console=_console()[0])
    what = f"data.train file {changed}" if changed == "train.jsonl" else f"model.name_or_path file {changed}"
    assert str(e.value) == (
        f"--resume: {what} changed since checkpoint step-00000006 was written. Resuming would continue training on "
        "other inputs than the run began with. Restore the original, or run without --resume and with --overwrite "
        "to start afresh.")


@pytest.mark.parametrize("kept", [("config.json", "tokenizer.json"),  # before the tokenizer's other files were hashed
                                  ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")])
def test_a_record_made_before_tokenizer_files_were_hashed_still_resumes_and_verifies(tiny_llama, number_data, tmp_path,
                                                                                      kept):
    """Older checkpoints and manifests hold the weights', config.json's and tokenizer.json's hashes only, or those
    and the tokenizer's other files but not generation_config.json: the files hashed since are not compared against
    them (they were not recorded, not added)."""
    from peftkit.verify import verify

    recipe = _recipe(tmp_path, tiny_llama, number_data)
    train(recipe, console=_console()[0])
    run = tmp_path / "run"
    assert {"tokenizer_config.json", "generation_config.json"} <= json.loads((run / "manifest.json").read_text())[
        "base_model_sha256"].keys()

    def as_recorded_before(record: Path) -> None:
        data = json.loads(record.read_text())
        hashes = data["base_model_sha256"] if record.name == "manifest.json" else data["inputs"]["model.name_or_path"]
        for name in [n for n in hashes if n not in kept and not n.endswith(".safetensors")]:
            del hashes[name]
        record.write_text(json.dumps(data))

    for record in (run / "checkpoints").glob("step-*/checksums.json"):
        as_recorded_before(record)
    train(recipe, resume=True, console=_console()[0])
    as_recorded_before(run / "manifest.json")  # the resumed run wrote a new one
    report = verify(run, console=_console()[0])
    assert report.ok, report.differences


# ---------------------------------------------------------------------------------------------- disk full


def _fail_fsync_under(fragment: str, monkeypatch) -> None:
    """ENOSPC from fsync of any file whose path contains `fragment` (the disk fills up during that write)."""
    real = os.fsync

    def fsync(fd):
        if fragment in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(fileio.os, "fsync", fsync)


@pytest.mark.parametrize("where, hint", [
    (".step-00000002.", "run/checkpoints/step-00000002. The previous version of it, if any, is intact; free some disk "
                        "space, or write somewhere else. No checkpoint was written yet, so the run starts again from "
                        "step 0."),  # training.save_steps is set: no hint to set it
    (".step-00000004.", "The newest whole checkpoint is step-00000002: continue with `peftkit train RECIPE --resume`."),
    # named as the adapter directory, not the temporary one it was written in (gone when the user reads this)
    (".adapter.", "run/adapter/adapter_config.json. The previous version of it, if any, is intact; free some disk "
                  "space, or write somewhere else. Training itself finished. The newest whole checkpoint is "
                  "step-00000006"),
    # the manifest: said without a way on before
    (".manifest.json.", "run/manifest.json. The previous version of it, if any, is intact; free some disk space, or "
                        "write somewhere else. Training itself finished. The newest whole checkpoint is step-00000006"),
])
def test_disk_full_while_checkpointing_or_exporting(tiny_llama, number_data, tmp_path, monkeypatch, where, hint):
    _fail_fsync_under(where, monkeypatch)
    with pytest.raises(PeftkitError) as e:
        train(_recipe(tmp_path, tiny_llama, number_data), console=_console()[0])
    message = str(e.value)
    assert message.startswith("No space left on the device while writing ")
    assert hint in message and e.value.exit_code == 2
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*")) if where != ".adapter." else []
    assert all(not name.startswith(".") for name in ckpts)  # no half-written checkpoint left


def test_disk_full_while_appending_a_metric_line_says_so_and_how_to_go_on(tiny_llama, number_data, tmp_path,
                                                                         monkeypatch):
    """The append was said as if the file had been replaced ("The previous version of it, if any, is intact"), though
    a cut line may end it, and without the checkpoint to resume from."""
    from peftkit import start

    real = start.append_line

    def append(path, line, sync=True):
        if '"step": 5' in line:
            raise fileio.DiskFullError(f"No space left on the device while writing {path}.")
        return real(path, line, sync)

    monkeypatch.setattr(start, "append_line", append)
    with pytest.raises(PeftkitError) as e:
        train(_recipe(tmp_path, tiny_llama, number_data), console=_console()[0])
    assert str(e.value) == (f"No space left on the device while appending to {tmp_path / 'run' / 'metrics.jsonl'}; its "
                            "last line may be cut short, which --resume drops. The newest whole checkpoint is "
                            "step-00000004: continue with `peftkit train RECIPE --resume`.")


# ---------------------------------------------------------------------------------------------- merge --output


@pytest.fixture(scope="module")
def adapter_run(tiny_llama, number_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adapter-run")
    train(load_recipe(make_recipe(root, tiny_llama, number_data, training={"max_steps": 1}, eval={"base_model": False})),
          console=_console()[0])
    return root / "run"


def _merge_error(adapter_run: Path, output: Path | str, **kwargs) -> str:
    from peftkit.merge import merge_adapter

    with pytest.raises(PeftkitError) as e:
        merge_adapter(str(adapter_run / "adapter"), str(output), **kwargs)
    return str(e.value)


def test_merge_refuses_existing_outputs_unless_overwrite(adapter_run, straight_run, tiny_llama, tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("x")
    assert _merge_error(adapter_run, tmp_path / "file") == (
        f"--output {tmp_path / 'file'} is a file. Choose a new directory, or pass --overwrite to replace it.")
    # A run or a folder of the user's own files is no merge output: --overwrite deleted it whole (the error even
    # advised it); now refused with or without it, before anything loads.
    for output, kind, held in [(straight_run, "a peftkit run directory", "adapter, checkpoints, manifest.json ..."),
                               (tmp_path / "full", "a directory that is not empty", "mine.txt")]:
        for overwrite in (False, True):
            assert " ".join(_merge_error(adapter_run, output, overwrite=overwrite).split()) == (
                f"--output {output} is {kind} ({held}), not a model or adapter a merge wrote; the merged output "
                "replaces its directory as a whole, so even --overwrite does not write there. Choose a new "
                f"directory, e.g. --output {output}-merged.")
    assert (tmp_path / "full" / "mine.txt").exists() and (straight_run / "manifest.json").exists()
    shutil.copytree(tiny_llama, tmp_path / "other-model")
    assert "is a model directory" in _merge_error(adapter_run, tmp_path / "other-model")

    from peftkit.merge import merge_adapter

    (tmp_path / "empty").mkdir()
    merge_adapter(str(adapter_run / "adapter"), str(tmp_path / "empty"))
    merge_adapter(str(adapter_run / "adapter"), str(tmp_path / "file"), overwrite=True)
    assert (tmp_path / "file" / "config.json").exists() and (tmp_path / "empty" / "config.json").exists()
    assert not list(tmp_path.glob(".*"))  # the replaced file is gone, no temp left


def test_merge_never_writes_over_the_base_the_adapter_or_the_current_directory(adapter_run, tiny_llama, tmp_path,
                                                                               monkeypatch):
    base = tiny_llama.resolve()
    assert _merge_error(adapter_run, tiny_llama, overwrite=True) == (
        f"--output {base} is the base model ({base}); writing the merged model there would delete it. Choose "
        "another --output.")
    adapter = (adapter_run / "adapter").resolve()
    assert _merge_error(adapter_run, adapter, overwrite=True).startswith(f"--output {adapter} is the adapter ({adapter});")
    assert _merge_error(adapter_run, adapter_run, overwrite=True).startswith(
        f"--output {adapter_run.resolve()} is the adapter ({adapter}) or holds it;")
    monkeypatch.chdir(tmp_path)
    for output in (".", "..", str(tmp_path)):
        assert _merge_error(adapter_run, output, overwrite=True).startswith("--output ")
        assert "is the current directory or one above it" in _merge_error(adapter_run, output, overwrite=True)
    assert (base / "config.json").exists() and (adapter / "adapter_config.json").exists()
    # inside the adapter, or anywhere in its run: accepted, and the run then failed verify ("added after the run")
    assert _merge_error(adapter_run, adapter / "m").startswith(
        f"--output {adapter / 'm'} is inside the adapter ({adapter}); a directory added there changes what it holds.")
    run = adapter_run.resolve()
    assert _merge_error(adapter_run, run / "checkpoints" / "m").startswith(
        f"--output {run / 'checkpoints' / 'm'} is inside the run directory {run}, whose files its manifest.json lists")


def test_merge_checks_the_requantized_output_too(adapter_run, tmp_path):
    (tmp_path / "m-nf4").mkdir()
    (tmp_path / "m-nf4" / "keep.txt").write_text("x")
    assert _merge_error(adapter_run, tmp_path / "m", requantize="nf4").startswith(f"--output {tmp_path / 'm-nf4'} is a ")
    assert not (tmp_path / "m").exists()  # refused before anything was written


def test_a_requantize_stopped_with_overwrite_leaves_both_outputs_as_they_were(adapter_run, tmp_path, monkeypatch):
    """`merge --overwrite --requantize nf4` replaced OUTPUT first and re-quantized after: Ctrl-C (or a failure) in the
    re-quantizing left the new merge beside the old OUTPUT-nf4, both complete-looking, of different merges."""
    from peftkit import merge, modeling

    merge.merge_adapter(str(adapter_run / "adapter"), str(tmp_path / "m"), dtype="float32", requantize="nf4")
    before = {p.relative_to(tmp_path): p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(modeling, "load_model", ctrl_c)  # the re-quantizing load, after the merge is written
    with pytest.raises(KeyboardInterrupt):
        merge.merge_adapter(str(adapter_run / "adapter"), str(tmp_path / "m"), dtype="bfloat16", requantize="nf4",
                            overwrite=True)
    after = {p.relative_to(tmp_path): p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    assert after == before  # the float32 merge and its nf4, no temporary left
    monkeypatch.undo()
    merge.merge_adapter(str(adapter_run / "adapter"), str(tmp_path / "m"), dtype="bfloat16", requantize="nf4",
                        overwrite=True)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"
    assert (tmp_path / "m-nf4" / "config.json").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["m", "m-nf4"]


def test_two_merges_into_one_output(adapter_run, tmp_path, monkeypatch):
    """Two `peftkit merge --output X` at once: the second's tidy-up of killed merges deleted the first's temporary
    directory while it was written, and X was left without config.json or weights, both merges saying they wrote
    it; or the later one replaced the earlier without --overwrite. Now a merge started while another writes X is
    refused, and one whose X appears while it merges keeps that X and says so."""
    from peftkit import merge
    from peftkit.fileio import atomic_directory

    output = tmp_path / "m"
    with atomic_directory(output) as other:  # another process's merge, writing now
        (other / "config.json").write_text("{}")
        tidy_leftovers(tmp_path, lambda name: name == "m")
        assert other.is_dir()  # not taken for a killed write's leftover
        assert _merge_error(adapter_run, output) == (
            f"--output {output} is being written by another process now ({other.name} beside it). Wait for it to "
            "finish, or choose another --output.")
    assert (output / "config.json").is_file()
    shutil.rmtree(output)

    real = merge.merged_model

    def another_merge_finishes_meanwhile(*args, **kwargs):
        output.mkdir()
        (output / "theirs.txt").write_text("x")
        return real(*args, **kwargs)

    monkeypatch.setattr(merge, "merged_model", another_merge_finishes_meanwhile)
    assert _merge_error(adapter_run, output) == (
        f"{output} was written by another process while this one worked; it is left as it is, and this result was "
        "not kept. Choose another output, or replace it with --overwrite.")
    assert [p.name for p in tmp_path.iterdir()] == ["m"] and [p.name for p in output.iterdir()] == ["theirs.txt"]
    shutil.rmtree(output)
    merge.merge_adapter(str(adapter_run / "adapter"), str(output), overwrite=True)  # --overwrite: replaced
    assert (output / "config.json").is_file() and not (output / "theirs.txt").exists()


def test_merge_into_a_link_to_an_empty_directory(adapter_run, tmp_path):
    """The link's target is what is checked and what is written (a merge that refused replaced outputs failed here at
    its end, saying another process had written the link)."""
    from peftkit.merge import merge_adapter

    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    merge_adapter(str(adapter_run / "adapter"), str(tmp_path / "link"))
    assert (tmp_path / "link").is_symlink() and (tmp_path / "target" / "config.json").is_file()


@pytest.mark.parametrize("system", ["windows", "no directory locks"])
def test_directories_are_written_where_they_cannot_be_locked(system, tmp_path, monkeypatch):
    """The lock of a directory being written only guards against other processes: where there is none (Windows:
    no fcntl; NFS refuses an exclusive flock on a read-only descriptor, some FUSE file systems any), it is written
    unlocked, as before locks, never refused."""
    import errno
    import types

    from peftkit import fileio

    def refuse(fd, flags):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fileio, "fcntl", None if system == "windows" else types.SimpleNamespace(
        flock=refuse, LOCK_EX=2, LOCK_NB=4))
    with fileio.atomic_directory(tmp_path / "d") as tmp:
        (tmp / "f").write_text("x")
        assert not fileio.being_written(tmp)
    with fileio.locked_directory(tmp_path):
        pass
    assert (tmp_path / "d" / "f").read_text() == "x" and [p.name for p in tmp_path.iterdir()] == ["d"]


# ---------------------------------------------------------------------------------------------- eval --json


def test_eval_json_output_checked_before_evaluating(adapter_run, tiny_llama, number_data, tmp_path):
    from typer.testing import CliRunner

    from peftkit.cli import app

    args = ["eval", "--model", str(tiny_llama), "--data", str(number_data["eval"]), "--format", "alpaca"]
    for target, expected in [(tmp_path, f"--json {tmp_path} is a directory; give a file name"),
                             ("/sys/eval.json", "--json's directory /sys is not writable")]:
        result = CliRunner().invoke(app, [*args, "--json", str(target)])
        assert isinstance(result.exception, PeftkitError) and str(result.exception).startswith(expected)
        assert "loss" not in result.output  # nothing was evaluated
    (tmp_path / "file").write_text("x")
    result = CliRunner().invoke(app, [*args, "--json", str(tmp_path / "file" / "sub" / "e.json")])
    assert str(result.exception) == (f"--json's directory {tmp_path / 'file' / 'sub'} cannot be made: "
                                      f"{tmp_path / 'file'} is a file, not a directory; choose another path.")
    # A refused evaluation leaves no directory behind for its --json: it is made when the file is written.
    result = CliRunner().invoke(app, [*args[:-1], "bogus", "--json", str(tmp_path / "new" / "e.json")])
    assert result.exit_code != 0 and not (tmp_path / "new").exists()
    result = CliRunner().invoke(app, [*args, "--json", str(tmp_path / "new" / "e.json")])
    assert result.exit_code == 0 and "loss" in json.loads((tmp_path / "new" / "e.json").read_text())


def test_disk_full_during_merge_leaves_no_partial_output(adapter_run, tmp_path, monkeypatch):
    from peftkit.merge import merge_adapter

    _fail_fsync_under(".merged-model.", monkeypatch)
    with pytest.raises(PeftkitError, match=r"^No space left on the device while writing .*merged-model\. The previous "
                                           r"version of it, if any, is intact; free some disk space"):
        merge_adapter(str(adapter_run / "adapter"), str(tmp_path / "merged-model"))
    assert list(tmp_path.iterdir()) == []


def test_a_run_written_before_a_recipe_key_was_added_is_the_same_recipe(tiny_llama, number_data, tmp_path):
    recipe = _recipe(tmp_path, tiny_llama, number_data)
    train(recipe, console=_console()[0])
    (tmp_path / "run" / "manifest.json").unlink()  # unfinished, as if killed
    old = (tmp_path / "run" / "recipe.yaml").read_text()
    (tmp_path / "run" / "recipe.yaml").write_text(old.replace("  truncation: keep\n", ""))  # an older peftkit's
    console, buffer = _console()
    train(recipe, resume=True, console=console)
    assert "Resumed from step-00000006" in buffer.getvalue()


def test_a_checkpoint_s_bytes_do_not_depend_on_the_run_directory_s_name(tmp_path):
    """torch.save named the archive inside training_state.pt after the file for an ASCII path and "archive" for any
    other: the same state got other bytes under a directory named in another script, and such a run never verified
    (its checkpoints 'differed' from the re-run's in /tmp)."""
    from peftkit.checkpoint import _save_state

    blob = {"optimizer": {"state": {0: {"exp_avg": torch.arange(4.0)}}}, "rng": torch.get_rng_state()}
    files = []
    for name in ("plain", "é 中文 😀"):
        (tmp_path / name).mkdir()
        _save_state(blob, tmp_path / name / "training_state.pt")
        files.append((tmp_path / name / "training_state.pt").read_bytes())
    assert files[0] == files[1]
    assert torch.load(tmp_path / "é 中文 😀" / "training_state.pt", weights_only=True)["rng"].equal(blob["rng"])


# ------------------------------------------------------------------------------- kills while deleting


def test_a_kill_while_an_earlier_run_is_deleted_leaves_no_finished_looking_run_and_the_next_run_finishes_it(
        tiny_llama, number_data, tmp_path, monkeypatch):
    """`clear_run` moves the earlier run's entries into `.peftkit-replaced-*`, then deletes that. Killed midway, the
    old manifest stayed beside a run whose adapter was gone; killed after the moves, the folder alone was left, and
    every later `peftkit train` there was refused ("files that peftkit did not write"), --overwrite leaving it for
    good. Now the manifest moves first, and opening the run directory finishes the deletion."""
    import peftkit.rundir

    recipe = _recipe(tmp_path, tiny_llama, number_data)
    train(recipe, console=_console()[0])
    run = tmp_path / "run"
    real, moves = os.replace, []

    def killed_at_the_second_move(src, dst):
        moves.append(Path(src).name)
        if len(moves) == 2:
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(peftkit.rundir.os, "replace", killed_at_the_second_move)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, overwrite=True, console=_console()[0])
    monkeypatch.undo()
    assert moves[0] == "manifest.json" and not (run / "manifest.json").exists()
    aside = next(run.glob(".peftkit-replaced-*"))
    for entry in sorted(run.iterdir()):  # what a kill after every move leaves: the folder alone
        if entry.name in peftkit.rundir.RUN_ENTRIES:
            os.replace(entry, aside / entry.name)
    console, out = _console()
    train(recipe, console=console)
    assert not list(run.glob(".peftkit-replaced-*")) and (run / "manifest.json").exists()
    assert f"note: removed {aside.name}: the files of an earlier run, whose deletion was interrupted" in out.getvalue()


def test_a_kill_while_a_checkpoint_is_pruned_leaves_no_half_deleted_checkpoint(tiny_llama, number_data, tmp_path,
                                                                                monkeypatch):
    """A checkpoint past save_total_limit was deleted in place: killed midway, a half-deleted `step-N` stayed (no later
    save pruned it again), and verify failed the finished run on it. Now it is renamed first, and the next start
    removes the temp entry. A file named like a checkpoint is passed over (it ended --resume with a traceback)."""
    import peftkit.checkpoint
    from peftkit.verify import verify

    recipe = _recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 6, "save_steps": 2,
                                                                  "save_total_limit": 1})
    run = tmp_path / "run"
    real = shutil.rmtree

    def killed_midway(path, *args, **kwargs):
        if Path(path).parent.name != "checkpoints":  # (shutil's own: the run's other deletions go on)
            return real(path, *args, **kwargs)
        next(p for p in Path(path).iterdir() if p.is_file()).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(peftkit.checkpoint.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, console=_console()[0])
    monkeypatch.setattr(peftkit.checkpoint.shutil, "rmtree", real)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [".step-00000002.pruned.tmp", "step-00000004"]
    (run / "checkpoints/step-00000099").write_text("not a checkpoint")
    console, out = _console()
    train(recipe, resume=True, console=console)
    assert "Resumed from step-00000004" in out.getvalue()
    assert "removed .step-00000002.pruned.tmp, left by an interrupted write" in out.getvalue()
    (run / "checkpoints/step-00000099").unlink()
    report = verify(run, console=_console()[0])
    assert report.ok, report.differences


@pytest.mark.parametrize(("before", "after", "key"), [({"eval": None}, {}, "data.eval"),  # a path key given, or removed
                                                       ({}, {"eval": None}, "data.eval")])
def test_a_path_key_given_or_removed_is_another_recipe_not_a_moved_file(tiny_llama, number_data, tmp_path, before,
                                                                        after, key):
    """A moved project changes the paths a recipe holds, and the run stays the same run; a path key that one recipe
    has and the other has not (data.eval added, an adapter appended to adapter.fuse) is another recipe."""
    from peftkit.rundir import check_output_dir

    out = tmp_path / "run"
    out.mkdir()
    first = _recipe(tmp_path / "a", tiny_llama, number_data, data=before)
    (out / "recipe.yaml").write_text(first.to_yaml())
    second = _recipe(tmp_path / "b", tiny_llama, number_data, data=after)
    with pytest.raises(PeftkitError, match=rf"holds a run of a different recipe \(its recipe.yaml differs in {key}\)"):
        check_output_dir(out, second.to_yaml(), resume=False, overwrite=False)
