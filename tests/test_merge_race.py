"""Two merges into one --output at once, as two real processes: the second one's checks and tidy, in the midst of
the first one's swap of its pair (or of a combined adapter) into place, wait for it (`fileio.names_locked`) instead of
taking its set-aside `.m.old` for a killed merge's leftover."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from peftkit.methods.lora import LoraConfig
from tests.test_combine import LLAMA_TARGETS, make_adapter
from tests.test_kills import ROOT, _model, _state

PAUSED_SWAP = """
import errno, os, sys, time
from pathlib import Path

root, signals = Path(sys.argv[1]), Path(sys.argv[2])
real = os.replace

def replace(src, dst):  # a new directory about to go in as NAME, the old set aside: pause, then fail (a disk error)
    if Path(dst).name == "{name}" and Path(src).name.endswith(".tmp"):
        (signals / "paused").write_text("")
        while not (signals / "go").exists():
            time.sleep(0.01)
        raise OSError(errno.EIO, "Input/output error (the test's)")
    return real(src, dst)

os.replace = replace
"""
"""A process's prelude: its swap of a new directory NAME into place pauses, then fails."""

WRITER = PAUSED_SWAP.format(name="m-nf4") + """
from peftkit.fileio import atomic_directories
with atomic_directories([root / "m", root / "m-nf4"]) as tmps:  # (the new m is in place when m-nf4's swap pauses)
    for d in tmps:
        (d / "w").write_text("new")
        (d / "config.json").write_text("{}")
"""

CHECKER = """
import sys
from pathlib import Path
from peftkit.merge import check_merge_output

root, signals = Path(sys.argv[1]), Path(sys.argv[2])
(signals / "checking").write_text("")
check_merge_output(root / sys.argv[3], {}, True)
"""

COMBINER = PAUSED_SWAP.format(name="c") + """
from peftkit.combine_inputs import Combination
from peftkit.combine_adapters import combine_adapters
combine_adapters(sys.argv[3:], Combination("cat", (0.5, 0.5)), str(root / "c"), overwrite=True)
"""

def _start(code: str, root: Path, signals: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, str(root), str(signals), *args], env=dict(
        os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path.name} never came"
        time.sleep(0.01)


def test_a_merge_s_checks_wait_for_another_merge_s_swap_and_its_roll_back(tmp_path):
    """A pair write (merge --requantize) paused with its new m in place and both old ones set aside, then failing (a
    disk error as the new m-nf4 goes in): a second merge's checks of m, run meanwhile, wait for the swap to end, and
    the failure leaves the earlier pair, whole. The checks used to run at once, delete the first one's `.m.old` as a
    leftover (m was there, new), and its roll-back then put back the old m-nf4 beside the new m: ('new', 'old')."""
    root, signals = tmp_path / "out", tmp_path / "signals"
    root.mkdir()
    signals.mkdir()
    _model(root / "m", "old")
    _model(root / "m-nf4", "old")
    writer = _start(WRITER, root, signals)
    _wait_for(signals / "paused", writer)
    assert sorted(p.name for p in root.iterdir() if not p.name.endswith(".tmp")) == [
        ".m-nf4.old", ".m.old", ".m.pair", "m"]
    checker = _start(CHECKER, root, signals, "m")
    _wait_for(signals / "checking", checker)
    try:
        checker.wait(timeout=3)  # (the checks take milliseconds where nothing holds them back)
    except subprocess.TimeoutExpired:
        pass
    checked_during_the_swap = checker.returncode is not None
    (signals / "go").write_text("")
    _, writer_err = writer.communicate(timeout=120)
    _, checker_err = checker.communicate(timeout=120)
    assert writer.returncode == 1 and "Input/output error (the test's)" in writer_err, writer_err
    assert checker.returncode == 0, checker_err
    assert _state(root) == ("old", "old")
    assert sorted(p.name for p in root.iterdir()) == ["m", "m-nf4"]
    assert not checked_during_the_swap


def test_a_merge_s_checks_wait_for_a_combined_adapter_s_swap(tmp_path, tiny_llama):
    """`peftkit merge --adapter A --adapter B --output c` (a combined adapter), paused with the old c set aside and
    failing as the new one goes in: a second merge's checks of c wait for the swap to end, which puts the old c back.
    The combined adapter's swap took no lock: the checks ran at once and put `.c.old` back as a killed write's
    leftover, under the swap's feet."""
    root, signals = tmp_path / "out", tmp_path / "signals"
    root.mkdir()
    signals.mkdir()
    cfg = LoraConfig(r=4, alpha=8, target_modules=LLAMA_TARGETS)
    adapters = [make_adapter(tiny_llama, cfg, seed, tmp_path / f"a{seed}") for seed in (1, 2)]
    (root / "c").mkdir()
    (root / "c" / "adapter_config.json").write_text("{}")
    (root / "c" / "w").write_text("old")
    writer = _start(COMBINER, root, signals, *adapters)
    _wait_for(signals / "paused", writer)
    checker = _start(CHECKER, root, signals, "c")
    _wait_for(signals / "checking", checker)
    try:
        checker.wait(timeout=3)
    except subprocess.TimeoutExpired:
        pass
    checked_during_the_swap = checker.returncode is not None
    (signals / "go").write_text("")
    _, writer_err = writer.communicate(timeout=120)
    _, checker_err = checker.communicate(timeout=120)
    assert writer.returncode == 1 and "Input/output error (the test's)" in writer_err, writer_err
    assert checker.returncode == 0, checker_err
    assert not checked_during_the_swap
    assert sorted(p.name for p in root.iterdir()) == ["c"] and (root / "c" / "w").read_text() == "old"
