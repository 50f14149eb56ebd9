"""Processes killed (SIGKILL) at chosen moments of their writes: what is left under the final names is whole and
consistent, and the next command puts it right. Found by killing real `peftkit` processes at random moments."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from peftkit.fileio import atomic_directories
from peftkit.recipe import load_recipe
from peftkit.train import train
from tests.conftest import make_recipe

ROOT = Path(__file__).resolve().parent.parent

KILL_AT_REPLACE = """
import os, signal, sys
from pathlib import Path

def kill_when(src, dst):
    return {condition}

real = os.replace
def replace(src, dst):
    if kill_when(Path(src), Path(dst)):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)

os.replace = replace
{body}
"""


def _killed(condition: str, body: str, cwd: Path) -> int:
    """Run `body` in a fresh Python whose os.replace SIGKILLs the process at the first call where `condition` (of `src`
    and `dst`, the Paths of the rename) holds; its exit status."""
    code = KILL_AT_REPLACE.format(condition=condition, body=body)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True).returncode


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------ merge --requantize: a pair


def _state(root: Path) -> tuple:
    return tuple((root / name / "w").read_text() if (root / name / "w").exists() else None for name in ("m", "m-nf4"))


@pytest.mark.parametrize("before", [("old", "old"), ("old", None), (None, "old"), (None, None)])
def test_a_pair_of_directories_killed_at_any_rename_is_never_a_new_one_beside_an_old_one(tmp_path, before):
    """`atomic_directories([m, m-nf4])` killed at each of its renames in turn: the names never show a new directory
    beside an old one, and rolling back the interrupted write (as the next merge does) leaves the earlier pair or the
    new one, whole."""
    renames = 0
    while True:
        renames += 1
        root = tmp_path / str(renames)
        root.mkdir()
        for name, text in zip(("m", "m-nf4"), before, strict=True):
            if text:
                _model(root / name, text)
        body = _pair_write(root)
        status = _killed(f"(calls.append(1) or len(calls)) == {renames}",
                         "calls = []\n" + body, root)
        assert set(_state(root)) - {None} in ({"old"}, {"new"}, set()), (renames, _state(root))
        _next_merge_checks(root)
        assert set(_state(root)) - {None} in ({"old"}, {"new"}, set()), (renames, _state(root))
        if before[0]:  # an earlier model (and its pair) is there again, or the new pair
            assert _state(root) in (before, ("new", "new")), (renames, _state(root))
        assert not [p.name for p in root.iterdir() if p.name.startswith(".")]
        if status == 0:  # every rename passed: the write completed
            assert _state(root) == ("new", "new")
            break
    assert renames > 2


def _pair_write(root: Path) -> str:
    """The body of a process that writes a new pair (m, m-nf4) into `root` with `atomic_directories`, for `_killed`."""
    return ("from peftkit.fileio import atomic_directories\n"
            f"with atomic_directories([Path({str(root / 'm')!r}), Path({str(root / 'm-nf4')!r})]) as (a, b):\n"
            "    for d in (a, b): (d / 'w').write_text('new'); (d / 'config.json').write_text('{}')\n")


def _the_user_removes_m_nf4_and_merges(root: Path) -> None:
    """After a pair write killed once its new pair was kept: the user removes the new m-nf4, and the next merge's
    checks must leave the new m alone, with no old m-nf4 put back beside it."""
    assert _state(root) == ("new", "new")
    shutil.rmtree(root / "m-nf4")
    _next_merge_checks(root)
    assert _state(root) == ("new", None) and sorted(p.name for p in root.iterdir()) == ["m"]


def _killed_between_the_two(root: Path) -> None:
    """An old pair (m, m-nf4), then a pair write killed once its new m was in place, before its new m-nf4."""
    _model(root / "m", "old")
    _model(root / "m-nf4", "old")
    assert _killed("dst.name == 'm-nf4' and src.name.endswith('.tmp')", _pair_write(root), root) == -9
    assert _state(root) == ("new", None)


def _model(path: Path, text: str) -> None:
    path.mkdir()
    (path / "w").write_text(text)
    (path / "config.json").write_text("{}")


def _next_merge_checks(root: Path) -> None:
    """What `merge --requantize nf4 --output m` checks of its outputs first (and tidies)."""
    from peftkit.merge import check_merge_output

    check_merge_output(root / "m", {}, True)
    check_merge_output(root / "m-nf4", {}, True)


def test_a_pair_killed_after_it_was_kept_stays_the_new_pair(tmp_path):
    """Killed while the set-aside old copies were being deleted, after the new pair was kept: the next merge's checks
    remove what is left of them and keep the new pair (the re-quantized one's check once put its old copy back)."""
    _model(tmp_path / "m", "new")
    _model(tmp_path / "m-nf4", "new")
    _model(tmp_path / ".m-nf4.old", "old")
    _model(tmp_path / ".m.0123abcd.tmp", "old")  # .m.old, renamed on its way out
    _next_merge_checks(tmp_path)
    assert _state(tmp_path) == ("new", "new") and sorted(p.name for p in tmp_path.iterdir()) == ["m", "m-nf4"]


def test_a_pair_written_without_a_kill_replaces_both(tmp_path):
    for name in ("m", "m-nf4"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "w").write_text("old")
    with atomic_directories([tmp_path / "m", tmp_path / "m-nf4"]) as (a, b):
        (a / "w").write_text("new")
        (b / "w").write_text("new")
    assert _state(tmp_path) == ("new", "new") and sorted(p.name for p in tmp_path.iterdir()) == ["m", "m-nf4"]


def test_a_pair_s_record_is_on_disk_whole_before_anything_moves(tmp_path, monkeypatch):
    """The record that makes a killed pair write roll back as one was written in place and not synced: a power cut
    (not a kill: the page cache survives those) could leave it empty while the directories had moved, and the next
    merge then tidied the mix the single-write way. It is now written whole (renamed into place) and synced, its
    content, before the first directory is set aside."""
    from peftkit import fileio

    for name in ("m", "m-nf4"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "w").write_text("old")
    synced, moved = [], []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    monkeypatch.setattr(fileio.os, "replace", lambda src, dst: moved.append((str(src), str(dst), list(synced)))
                        or real_replace(src, dst))
    with atomic_directories([tmp_path / "m", tmp_path / "m-nf4"]) as (a, b):
        (a / "w").write_text("new")
        (b / "w").write_text("new")
    record = str(tmp_path / ".m.pair")
    first_move = next(i for i, (src, _, _) in enumerate(moved) if src == str(tmp_path / "m-nf4"))
    into_record = [i for i, (_, dst, _) in enumerate(moved) if dst == record]
    assert into_record and into_record[0] < first_move  # renamed into place whole, before the directories move
    content_synced = moved[into_record[0]][2]
    assert any(path.startswith(str(tmp_path / ".m.")) and path.endswith(".tmp") for path in content_synced)  # its content synced first
    assert str(tmp_path) in moved[first_move][2]  # and the directory's entry for it
    assert _state(tmp_path) == ("new", "new")


def test_a_single_merge_s_leftover_is_not_rolled_back_as_a_pair(tmp_path):
    """A plain `merge --overwrite` into m killed between its two renames leaves m (new) and .m.old (old). The checks of
    a later `merge --requantize nf4 --output m` took that for an interrupted pair: they deleted the user's m-nf4 and
    put the older m back, before refusing for want of --overwrite. Only a pair write's own record is rolled back."""
    from peftkit.errors import PeftkitError
    from peftkit.merge import check_merge_output

    _model(tmp_path / "m", "new")
    _model(tmp_path / ".m.old", "old")
    _model(tmp_path / "m-nf4", "mine")
    with pytest.raises(PeftkitError, match="--overwrite"):
        check_merge_output(tmp_path / "m", {}, False)
    assert _state(tmp_path) == ("new", "mine")


def test_a_pair_killed_midway_is_rolled_back_by_a_plain_merge_s_checks_too(tmp_path):
    """Killed once the new m was in place, before the new m-nf4: a plain `merge --output m` (refused for want of
    --overwrite) tidied .m.old as a single write's leftover, keeping the new m; the next `merge --requantize`'s checks
    then put the old m-nf4 back beside it, a new m beside an old m-nf4 (left so where that merge stopped or failed).
    Every merge into m rolls back a pair its record names."""
    from peftkit.errors import PeftkitError
    from peftkit.merge import check_merge_output

    _killed_between_the_two(tmp_path)
    with pytest.raises(PeftkitError, match="pass --overwrite"):
        check_merge_output(tmp_path / "m", {}, False)  # a plain merge
    assert _state(tmp_path) == ("old", "old")
    _next_merge_checks(tmp_path)
    assert _state(tmp_path) == ("old", "old") and sorted(p.name for p in tmp_path.iterdir()) == ["m", "m-nf4"]


def test_a_pair_killed_midway_is_rolled_back_by_a_merge_into_its_second_directory(tmp_path):
    """Killed once the new m was in place, before the new m-nf4: a plain `merge --output m-nf4` (the second directory
    as its own output) passed over the record, which names m first, and its tidy put the old m-nf4 back beside the new
    m; written with --overwrite, its merge then went in beside them, and the next merge into m rolled the pair back,
    deleting it. A merge into either directory a record names rolls that pair back first."""
    from peftkit.errors import PeftkitError
    from peftkit.fileio import atomic_directory
    from peftkit.merge import check_merge_output

    _killed_between_the_two(tmp_path)
    with pytest.raises(PeftkitError, match="pass --overwrite"):
        check_merge_output(tmp_path / "m-nf4", {}, False)  # a plain merge --output m-nf4
    assert _state(tmp_path) == ("old", "old") and sorted(p.name for p in tmp_path.iterdir()) == ["m", "m-nf4"]
    check_merge_output(tmp_path / "m-nf4", {}, True)  # with --overwrite: its merge goes in
    with atomic_directory(tmp_path / "m-nf4") as written:
        (written / "w").write_text("plain")
        (written / "config.json").write_text("{}")
    _next_merge_checks(tmp_path)
    assert _state(tmp_path) == ("old", "plain") and sorted(p.name for p in tmp_path.iterdir()) == ["m", "m-nf4"]


def test_a_pair_write_killed_before_it_set_anything_aside_leaves_no_record_for_a_plain_merge_s_leftover(tmp_path):
    """A pair write killed after it wrote its record, before it set anything aside, left the record; a plain merge
    --overwrite into m then killed after its new m went in (.m.old the old one) left what looked like that pair's
    interrupted write, and a later merge --requantize's checks deleted the user's m-nf4 and put the older m back. The
    plain merge's own checks now finish with the record first."""
    from peftkit.errors import PeftkitError
    from peftkit.merge import check_merge_output

    _model(tmp_path / "m", "old")
    _model(tmp_path / "m-nf4", "mine")
    pair = _pair_write(tmp_path)
    assert _killed("src.name == 'm-nf4' and dst.name == '.m-nf4.old'", pair, tmp_path) == -9
    assert (tmp_path / ".m.pair").exists() and _state(tmp_path) == ("old", "mine")
    check_merge_output(tmp_path / "m", {}, True)  # a plain merge --overwrite's checks, then its write, killed
    plain = ("from peftkit.fileio import atomic_directory\n"
             f"with atomic_directory(Path({str(tmp_path / 'm')!r})) as a:\n"
             "    (a / 'w').write_text('plain'); (a / 'config.json').write_text('{}')\n")
    assert _killed("src.name == '.m.old'", plain, tmp_path) == -9
    with pytest.raises(PeftkitError, match="--overwrite"):  # merge --requantize nf4 without --overwrite
        check_merge_output(tmp_path / "m", {}, False)
    assert _state(tmp_path) == ("plain", "mine")


def test_a_pair_killed_deleting_an_old_copy_leaves_no_half_of_it_to_put_back(tmp_path):
    """Killed while the old m-nf4 was being deleted, after the new pair was kept: half of it was left as .m-nf4.old,
    which the next merge's tidy put back as m-nf4 once the user had removed the new one: a broken old model beside the
    new m. A set-aside copy is renamed away before it is deleted, so no half of one keeps that name."""
    for name in ("m", "m-nf4"):
        _model(tmp_path / name, "old")
        (tmp_path / name / "model.safetensors").write_text("weights")
    body = ("import shutil\n"
            "real_rmtree = shutil.rmtree\n"
            "def rmtree(path, *args, **kwargs):\n"
            "    path = Path(path)\n"
            "    if path.name.startswith('.m-nf4.') and (path / 'w').is_file() and (path / 'w').read_text() == 'old':\n"
            "        (path / 'model.safetensors').unlink()\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            "    return real_rmtree(path, *args, **kwargs)\n"
            "shutil.rmtree = rmtree\n") + _pair_write(tmp_path)
    assert _killed("False", body, tmp_path) == -9
    _the_user_removes_m_nf4_and_merges(tmp_path)


def test_a_pair_killed_before_it_deleted_an_old_copy_leaves_none_to_put_back(tmp_path):
    """Killed as the old m-nf4 was renamed away for deletion, after the new pair was kept (its record already gone):
    the whole .m-nf4.old, without a record, was a single write's leftover to the next merge's tidy, which put it back
    as m-nf4 once the user had removed the new one: the old m-nf4 beside the new m. The record now says the pair was
    kept until every old copy is gone, and the next merge's checks delete them."""
    for name in ("m", "m-nf4"):
        _model(tmp_path / name, "old")
    body = _pair_write(tmp_path)
    assert _killed("src.name == '.m-nf4.old'", body, tmp_path) == -9
    _the_user_removes_m_nf4_and_merges(tmp_path)


def test_a_roll_back_killed_midway_still_leaves_the_earlier_pair(tmp_path):
    """A pair write killed once both new directories were in place, then the next merge's roll-back killed as it
    removed the new m-nf4: it had put the old m back first, so the new m-nf4 stood beside it and, the record's `.m.old`
    gone, the checks after tidied .m-nf4.old away as a single write's leftover: the old m beside the new m-nf4. Every
    new directory now goes before any old one comes back."""
    from peftkit.fileio import recorded_pair

    for name in ("m", "m-nf4"):
        _model(tmp_path / name, "old")
    write = _pair_write(tmp_path)
    assert _killed("src.name.endswith('.tmp') and dst.name == '.m.pair' and len(calls.append(1) or calls) == 2",
                   "calls = []\n" + write, tmp_path) == -9  # at the rename of the record saying the pair was kept
    assert _state(tmp_path) == ("new", "new") and recorded_pair(tmp_path / "m")
    checks = ("from peftkit.merge import check_merge_output\n"
              f"check_merge_output(Path({str(tmp_path / 'm')!r}), {{}}, True)\n")
    assert _killed("src.name == 'm-nf4' and dst.name.endswith('.tmp')", checks, tmp_path) == -9
    assert set(_state(tmp_path)) - {None} in ({"old"}, {"new"}, set())
    _next_merge_checks(tmp_path)
    assert _state(tmp_path) == ("old", "old") and sorted(p.name for p in tmp_path.iterdir()) == ["m", "m-nf4"]


@pytest.fixture(scope="module")
def adapter_run(tiny_llama, number_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adapter-run")
    train(load_recipe(make_recipe(root, tiny_llama, number_data, training={"max_steps": 1}, eval={"base_model": False})))
    return root / "run"


def test_a_requantized_merge_killed_between_its_two_outputs_leaves_the_earlier_pair(adapter_run, tmp_path):
    """`peftkit merge --overwrite --requantize nf4` put OUTPUT-nf4 in place, then OUTPUT: killed between the two
    (SIGKILL, or Ctrl-C while OUTPUT's files were synced), the new OUTPUT-nf4 stood beside the old OUTPUT, both
    complete-looking and of different merges. Now both are set aside before either new one goes in, and the next merge
    puts the earlier pair back."""
    from peftkit.merge import check_merge_output, merge_adapter

    merge_adapter(str(adapter_run / "adapter"), str(tmp_path / "m"), dtype="float32", requantize="nf4")
    before = _files(tmp_path)
    body = ("from peftkit.merge import merge_adapter\n"
            f"merge_adapter({str(adapter_run / 'adapter')!r}, 'm', dtype='bfloat16', requantize='nf4', overwrite=True)\n")
    assert _killed("src.name == 'm' and dst.name == '.m.old'", body, tmp_path) == -9
    left = {name: data for name, data in _files(tmp_path).items() if not name.startswith(".")}
    # Under their names: the earlier pair's files, or none (set aside), never the new merge's.
    assert all(before.get(name) == data for name, data in left.items()), sorted(set(left) - set(before))
    check_merge_output(tmp_path / "m", {}, True)  # the next merge's check of its outputs
    check_merge_output(tmp_path / "m-nf4", {}, True)
    assert _files(tmp_path) == before


def test_a_requantized_merge_killed_midway_is_rolled_back_by_one_that_requantizes_otherwise(adapter_run, tmp_path):
    """Killed once the new OUTPUT was in place, before the new OUTPUT-nf4: a merge --requantize fp4 into OUTPUT took
    only OUTPUT-fp4 for its pair, so its checks passed over the record and tidied .OUTPUT.old as a single write's
    leftover, keeping the new OUTPUT (with .OUTPUT-nf4.old, later put back beside it). Every merge into OUTPUT rolls
    back the pair the record names."""
    from peftkit.errors import PeftkitError
    from peftkit.merge import merge_adapter

    merge_adapter(str(adapter_run / "adapter"), str(tmp_path / "m"), dtype="float32", requantize="nf4")
    before = _files(tmp_path)
    body = ("from peftkit.merge import merge_adapter\n"
            f"merge_adapter({str(adapter_run / 'adapter')!r}, 'm', dtype='bfloat16', requantize='nf4', overwrite=True)\n")
    assert _killed("dst.name == 'm-nf4' and src.name.endswith('.tmp')", body, tmp_path) == -9
    with pytest.raises(PeftkitError, match="pass --overwrite"):
        merge_adapter(str(adapter_run / "adapter"), str(tmp_path / "m"), dtype="float32", requantize="fp4")
    assert {name: data for name, data in _files(tmp_path).items() if not name.startswith(".")} == before


def test_a_requantized_merge_into_a_linked_output_elsewhere_is_refused(adapter_run, tmp_path):
    """--output a symbolic link to a directory elsewhere put the pair in two directories: the link's target and
    OUTPUT-nf4 beside the link. Its record, read beside the first, named the second there too, so a pair write killed
    once both new ones were in (before the record said kept) was rolled back by the next merge into the old target
    beside the new OUTPUT-nf4, deleting the target's own sibling m-nf4 (an earlier merge's). Refused now, before
    anything is written; the pair write itself takes siblings only."""
    from peftkit.errors import PeftkitError
    from peftkit.merge import merge_adapter

    real, out = tmp_path / "real", tmp_path / "out"
    real.mkdir(), out.mkdir()
    _model(real / "m", "old"), _model(real / "m-nf4", "old"), _model(out / "m-nf4", "old")
    (out / "m").symlink_to(real / "m")
    before = _files(tmp_path)
    with pytest.raises(PeftkitError) as refused:
        merge_adapter(str(adapter_run / "adapter"), str(out / "m"), dtype="float32", requantize="nf4", overwrite=True)
    assert str(refused.value) == (
        f"--requantize writes {out / 'm'} and {out / 'm-nf4'} as a pair, side by side in one directory (a kill is "
        f"rolled back as one there), and a symbolic link ({out / 'm'} -> {real / 'm'}) puts them in {real} and {out}. "
        f"Give --output {real / 'm'} (its re-quantized copy then goes to {real / 'm-nf4'}), or merge without "
        "--requantize.")
    assert _files(tmp_path) == before and sorted(p.name for p in real.iterdir()) == ["m", "m-nf4"]
    with pytest.raises(ValueError, match="side by side"), atomic_directories([real / "m", out / "m-nf4"]):
        pass
    assert sorted(p.name for p in out.iterdir()) == ["m", "m-nf4"]


# ------------------------------------------------------------------------------ verify: its re-run's directory


def test_a_killed_verify_s_re_run_directory_is_removed_by_the_next_verify(adapter_run, tmp_path, monkeypatch):
    """A SIGKILLed `peftkit verify` left its re-run's temporary directory (checkpoints, an adapter, a merged model)
    behind, one more each time. The next verify removes it, and says so; it keeps a live verify's (its process alive,
    or its lock held: a process of another PID namespace), and one without a PID in its name (an older peftkit's)."""
    import io
    import tempfile

    from rich.console import Console

    from peftkit.fileio import flocked, fcntl
    from peftkit.verify import verify

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    body = (f"import tempfile\ntempfile.tempdir = {str(scratch)!r}\n"
            "from peftkit.verify import verify\n"
            f"verify({str(adapter_run)!r})\n")
    assert _killed("'peftkit-verify-' in str(dst) and dst.name == 'adapter'", body, tmp_path) == -9
    left = list(scratch.iterdir())
    assert len(left) == 1 and (left[0] / "run" / "recipe.yaml").is_file()  # killed as it put its adapter in place
    assert [p.name for p in left[0].glob("run/.adapter.*.tmp/adapter_model.safetensors")] == ["adapter_model.safetensors"]
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    live = scratch / f"peftkit-verify-{os.getpid()}-live_123"  # this process's: alive
    locked = scratch / f"peftkit-verify-{ended.pid}-locked12"  # a PID gone here, its lock held
    older = scratch / "peftkit-verify-k2j4x8qz"  # an older peftkit's name
    own = scratch / f"peftkit-verify-{ended.pid}-notes"  # the user's own (not mkdtemp's 8 characters), PID gone
    for path in (live, locked, older, own):
        path.mkdir()
        (path / "w").write_text("x")
    fd = flocked(locked, fcntl.LOCK_EX)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    out = io.StringIO()
    try:
        assert verify(adapter_run, console=Console(file=out, width=1000)).ok
    finally:
        os.close(fd)
    assert sorted(p.name for p in scratch.iterdir()) == sorted(p.name for p in (live, locked, older, own))
    said = " ".join(out.getvalue().split())
    assert (f"note: removed 1 re-run directory of verify processes that ended without deleting it (killed), in "
            f"{scratch}: {left[0].name} (") in said


# ------------------------------------------------------------------------------ train: Ctrl-C at the loop's end


def test_ctrl_c_while_the_progress_bar_closes_stops_the_run(tiny_llama, number_data, tmp_path, monkeypatch):
    """Ctrl-C after the loop's last look at the stop request, while its progress bar closed (the handler still
    installed): the request was taken and never acted on, and the run went on to its final evaluation and export and
    exited 0, its Ctrl-C ignored. Now it checkpoints and stops, as one during the last step does."""
    import signal

    from peftkit import train as train_module
    from peftkit.errors import Stopped

    closing = train_module.TrainProgress.__exit__

    def close_then_ctrl_c(self, *exc):
        signal.raise_signal(signal.SIGINT)
        return closing(self, *exc)

    monkeypatch.setattr(train_module.TrainProgress, "__exit__", close_then_ctrl_c)
    recipe = make_recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 2}, eval={"base_model": False})
    with pytest.raises(Stopped, match=r"^Interrupted at step 2; checkpoint saved to .*step-00000002\. Continue"):
        train(load_recipe(recipe))
    assert not (tmp_path / "run" / "adapter").exists() and not (tmp_path / "run" / "manifest.json").exists()
    assert signal.getsignal(signal.SIGINT) == signal.default_int_handler
