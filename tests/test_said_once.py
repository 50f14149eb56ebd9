"""What the processes of a launch say, said once (peftkit.said_once): under `accelerate launch` and `torchrun`, which
pass every process's stderr on as it is, as under `peftkit train --num-processes N` (tests/test_distributed.py)."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest

from tests.conftest import make_recipe

FAILING_RANK_1 = """import os
if os.environ.get("RANK") == "1":  # a launched worker: the second process alone stops on a user error in training
    import peftkit.loss as loss
    from peftkit.errors import PeftkitError
    steps, trimmed_head = [], loss.trimmed_head

    def failing(model, batch):
        steps.append(1)
        if len(steps) == 2:
            raise PeftkitError("process 1 alone met this error")
        return trimmed_head(model, batch)

    loss.trimmed_head = failing
"""
"""A sitecustomize.py for the workers of a launch: the process of rank 1, and it alone, raises a user error in
training, at its second step (the other one is then in the step's collective)."""


def _launch(command: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env,
                          cwd=Path(__file__).parents[1])


def test_accelerate_launch_says_a_warning_and_an_error_of_every_process_once(tiny_llama, number_data, tmp_path):
    """`accelerate launch` (configs/accelerate/ddp.yaml) of a recipe whose data note (a local file read at split
    'validation') and error (data.eval missing) every process meets: each said once, where each process said it
    (two copies of both on the old code), and the main process exits with the user error's status, 2."""
    recipe = make_recipe(tmp_path, tiny_llama, {**number_data, "eval": tmp_path / "missing.jsonl"},
                         data={"train_split": "validation"})
    config = Path(__file__).parents[1] / "configs" / "accelerate" / "ddp.yaml"
    done = _launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "-m", "peftkit",
                    "train", str(recipe)])
    assert done.returncode != 0, done.stderr
    said = [line for line in done.stderr.splitlines() if line.startswith(("warning:", "error:"))]
    assert len(said) == 2, done.stderr
    assert said[0].startswith(f"warning: Data file {number_data['train']}: split 'validation': a local file"), said
    assert said[1].startswith(f"error: Data file not found: {tmp_path / 'missing.jsonl'}"), said
    # The launcher's summary: the main process exits with the user error's status, 2; so does the other where it met
    # its error before the launcher stopped it (SIGTERM, once the main process ended: on a loaded machine it may not
    # have reached it yet, and says nothing either way).
    codes = re.findall(r"exitcode\s*: (-?\d+) \(pid", done.stderr)
    assert len(codes) == 2 and codes[-1] == "2" and set(codes) <= {"2", "-15"}, done.stderr


def test_torchrun_says_a_warning_once_and_an_error_of_one_process_alone(tiny_llama, number_data, tmp_path):
    """`torchrun --nproc_per_node 2 -m peftkit train` of a recipe whose warmup is the whole run (a warning every process
    says), its second process alone stopping on a user error in its second step (`FAILING_RANK_1`): the warning is
    said once (twice on the old code), the main process's lines once, and the error that process 1 alone met is
    shown, first; the main process, whose collective broke when process 1 left, says so in one line after it and
    exits with status 1, where it printed the broken collective's traceback (`[rank0]: ... Connection closed by
    peer`), and the launcher's summary names process 1 as the first failure."""
    recipe = make_recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 2, "warmup_steps": 2},
                         eval={"base_model": False})
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FAILING_RANK_1)
    env = os.environ | {"PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = _launch([*torchrun, "-m", "peftkit", "train", str(recipe)], env)
    assert done.returncode != 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: training.warmup_steps (2) is the whole run"), \
        done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and errors[0] == "error: process 1 alone met this error", done.stderr
    assert errors[1].startswith("error: process 0 stopped: process 1 failed, and its error is shown by it (process 0 "
                                "met RuntimeError: "), done.stderr
    assert "[rank0]:" not in done.stderr, done.stderr  # no traceback of the broken collective
    summary = done.stderr[done.stderr.index("Failures:"):]  # the launcher's: process 0's status, then the root cause
    assert re.search(r"rank +: 0 .*\n +exitcode +: 1 \(pid.*\n(.*\n)*Root Cause.*\n(.*\n)* +rank +: 1 ", summary), \
        summary
    assert done.stdout.count("64 training examples") == done.stdout.count("LoRA r=4 on 14 modules") == 1, done.stdout
    assert "step 1/2" in done.stdout, done.stdout  # (process 1 failed in the middle of training)


@pytest.fixture
def launch_store(monkeypatch):
    """The store of a launch of 2 processes (torch's launcher keeps one; here this process holds it), with the
    environment a process of the launch has, rank 1's, to be changed by the test."""
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=5), wait_for_workers=False)
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port), "WORLD_SIZE": "2", "RANK": "1",
                       "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": "0"}.items():
        monkeypatch.setenv(key, value)
    return store


def test_a_process_leaves_unsaid_only_the_error_the_main_process_said(launch_store, monkeypatch):
    """Process 1 says its error unless the main process said the very same text: a different one, or none within
    SAME_ERROR_WAIT_S, is said. The main process says its own and leaves it for the others."""
    import peftkit.said_once as said_once

    monkeypatch.setattr(said_once, "SAME_ERROR_WAIT_S", 0.2)
    shown: list[str] = []
    said_once.say_error(lambda: shown.append("alone"), "the error of process 1 alone")  # the main one said none
    monkeypatch.setenv("RANK", "0")
    said_once.say_error(lambda: shown.append("main"), "every process's error")
    assert launch_store.get("peftkit/error/0") == b"every process's error"
    monkeypatch.setenv("RANK", "1")
    said_once.say_error(lambda: shown.append("same"), "every process's error")
    said_once.say_error(lambda: shown.append("other"), "another error")
    assert shown == ["alone", "main", "other"]
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # a restarted launch: the first one's error is not its own
    said_once.say_error(lambda: shown.append("restarted"), "every process's error")
    assert shown[-1] == "restarted"
    monkeypatch.setattr(said_once, "SAME_ERROR_WAIT_S", 30.0)
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()  # a Ctrl-C in the wait: ends it quietly
    started = time.monotonic()
    said_once.say_error(lambda: shown.append("interrupted"), "an error of its own")  # (it raised KeyboardInterrupt)
    assert shown[-1] == "interrupted" and time.monotonic() - started < 10
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # (Ctrl-C obeyed again after it)


def test_a_process_that_another_s_failure_stopped_says_one_line_once(launch_store, monkeypatch):
    """The first process to fail leaves its rank; a RuntimeError (a broken collective's) met after it is said as one
    line that names that process and keeps the error's first words; an error of another kind, or a broken collective
    with no failure before it (a network fault), is said as it is. The line is said by the main process alone, once
    the launcher stops it (SIGTERM) or after PEER_ERROR_WAIT_S, and it is left where the failed process, waiting for
    the main process's error, finds another."""
    import peftkit.said_once as said_once
    from peftkit.errors import PeerFailed

    broken = RuntimeError("[/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:6532. This is "
                          "typically caused by a remote worker crashing. Check the logs of the remote worker.")
    assert said_once.stopped_by_another(RuntimeError("a fault of its own")) is None  # process 1: the first failure
    assert launch_store.get("peftkit/failed/0") == b"1"
    monkeypatch.setenv("RANK", "0")
    assert said_once.stopped_by_another(ValueError("an error of its own")) is None
    stopped = said_once.stopped_by_another(broken)
    assert isinstance(stopped, PeerFailed) and stopped.exit_code == 1
    assert str(stopped) == ("process 0 stopped: process 1 failed, and its error is shown by it (process 0 met "
                            "RuntimeError: Connection closed by peer [127.0.0.1]:6532).")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # a restarted launch: no process failed in it yet
    assert said_once.stopped_by_another(broken) is None

    shown: list[str] = []
    monkeypatch.setattr(said_once, "PEER_ERROR_WAIT_S", 30.0)
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # (where say_stopped took none, SIGTERM kills no test)
    try:
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
        started = time.monotonic()
        said_once.say_stopped(lambda: shown.append("main"), str(stopped))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert shown == ["main"] and time.monotonic() - started < 10  # said when stopped, not after 30 s
    assert launch_store.get("peftkit/error/1") == str(stopped).encode()
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()  # a Ctrl-C in the wait: ends it quietly
    started = time.monotonic()
    said_once.say_stopped(lambda: shown.append("main"), str(stopped))  # (it raised KeyboardInterrupt)
    assert shown == ["main", "main"] and time.monotonic() - started < 10
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # (Ctrl-C obeyed again after it)
    monkeypatch.setattr(said_once, "PEER_ERROR_WAIT_S", 0.2)
    monkeypatch.setenv("RANK", "1")
    said_once.say_stopped(lambda: shown.append("other"), str(stopped))
    assert shown == ["main", "main"]
