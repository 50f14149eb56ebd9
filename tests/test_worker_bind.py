"""A launched worker (`python -m peftkit` under torch elastic) stops with its launcher from its first lines, not only
once it makes its Accelerator, seconds of imports later."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import make_recipe

ROOT = Path(__file__).resolve().parent.parent

# A subreaper (as systemd or a container's init may be) adopts the worker once its parent dies: its parent is then
# not PID 1, which die_with_parent's check for a parent that died before the prctl looks for. The subreaper starts a
# parent that starts the worker (in a session of its own, as torch elastic does) and SIGKILLs it once the worker is in
# its imports (torch's library mapped into it: after `python -m peftkit`'s first lines, before the Accelerator; a fixed
# 1.5 s failed once on a loaded CI machine, whose worker had not reached its first line by then, so it never bound
# itself); the subreaper reaps the worker (adopted) and says how it ended.
SUBREAPER = textwrap.dedent("""
    import ctypes, json, os, signal, subprocess, sys, time
    ctypes.CDLL(None).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                               "subprocess.Popen(sys.argv[1:], start_new_session=True); time.sleep(600)", *sys.argv[1:]])
    def importing_torch():
        for entry in os.listdir("/proc"):
            try:
                ppid = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1] if entry.isdigit() else None
                if ppid == str(parent.pid):  # the worker
                    return "libtorch" in open(f"/proc/{entry}/maps").read()
            except (OSError, IndexError):
                pass
        return False
    deadline = time.monotonic() + 120
    while not importing_torch() and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    pid, status = os.wait()  # the worker
    print(json.dumps({"signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                      "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}))
""")


def test_a_worker_stops_when_its_launcher_is_killed_during_its_imports(tiny_llama, number_data, tmp_path):
    """The launcher killed in its worker's imports (of torch, seconds before the Accelerator): the worker stops then, by
    SIGTERM (in its imports) or at its first step's end (the SIGTERM handler, once training), and exports nothing. On
    the old code (bound in make_accelerator, which checked for a parent that died before by PID 1) it trained its 40
    steps to the end under the subreaper and exported its adapter."""
    recipe = make_recipe(tmp_path, tiny_llama, number_data, eval={"base_model": False},
                         training={"max_steps": 40, "batch_size": 2, "grad_accum": 1})
    env = dict(os.environ, PYTHONPATH=str(ROOT), TORCHELASTIC_RUN_ID="test")
    worker = [sys.executable, "-m", "peftkit", "train", str(recipe)]
    done = subprocess.run([sys.executable, "-c", SUBREAPER, *worker], capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 0, done.stderr
    ended = json.loads(done.stdout.splitlines()[-1])
    assert ended["signal"] == 15 or ended["code"] not in (0, None), ended
    assert not (tmp_path / "run" / "adapter").exists()
