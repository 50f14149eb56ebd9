"""`peftkit verify` SIGKILLed during a re-run in several processes (accelerate's launcher, torch DDP over gloo on the
CPU): its launched processes stop with it, and the next verify's sweep leaves their folders until they have."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from peftkit.scratch import remove_stale_directories
from tests.conftest import make_recipe
from tests.test_distributed import _running, _tree

ROOT = Path(__file__).resolve().parent.parent


def _until(condition, what: str, timeout: float = 300.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"{what} never came"
        time.sleep(0.05)


def test_a_verify_killed_in_its_multi_process_re_run_leaves_its_folders_until_its_processes_stop(
        tiny_llama, number_data, tmp_path):
    """SIGKILL to verify once its 2-process re-run has a checkpoint: the launcher (SIGTERM by PR_SET_PDEATHSIG) and
    its 2 processes (the same from the launcher) stop, each at a step's end with a checkpoint, in seconds; every
    sweep a next verify makes while one of them lives removes nothing (the launcher holds verify's scratch locks,
    `scratch.held_locks`: it outlives its processes), and the first one after removes both folders, the re-run's and
    its recipe's. The sweep deleted them at once, under the processes writing their checkpoint there."""
    recipe = make_recipe(tmp_path, tiny_llama, number_data, adapter={"dropout": 0.0}, eval={"base_model": False},
                         training={"max_steps": 60, "batch_size": 2, "grad_accum": 1, "save_steps": 5,
                                   "eval_steps": 60})
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    trained = subprocess.run([sys.executable, "-m", "peftkit", "train", str(recipe), "--num-processes", "2"],
                             capture_output=True, text=True, timeout=600, env=env)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    verify = subprocess.Popen([sys.executable, "-m", "peftkit", "verify", str(tmp_path / "run")],
                              env=env | {"TMPDIR": str(scratch)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    _until(lambda: list(scratch.glob("peftkit-verify-[0-9]*/run/checkpoints/step-*")), "the re-run's checkpoint")
    children = [pid for pid in _tree(verify.pid) if pid != verify.pid]
    assert len(children) == 3, children  # the launcher and its 2 processes
    folders = sorted(p.name for p in scratch.glob("peftkit-verify-*"))
    assert len(folders) == 2, folders  # the re-run's, and its recipe's
    os.kill(verify.pid, signal.SIGKILL)
    verify.wait()
    deadline, sweeps = time.time() + 120, 0
    while any(_running(pid) for pid in children):
        assert time.time() < deadline, "the re-run's processes outlived verify"
        removed = remove_stale_directories(str(scratch))
        sweeps += 1
        assert removed == [] or not any(_running(pid) for pid in children), (removed, sweeps)
        time.sleep(0.05)
    assert sweeps > 0, "stopped before any sweep: nothing tested"
    remove_stale_directories(str(scratch))
    assert not sorted(p.name for p in scratch.glob("peftkit-verify-*"))
