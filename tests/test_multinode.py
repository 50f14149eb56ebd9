"""Several machines, simulated on this one: two accelerate launchers (`--num_machines 2`, one process each) meet
over gloo on localhost as two hosts would over their network, sharing the run directory's filesystem."""

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peftkit.distributed import check_sees_checkpoints
from peftkit.errors import PeftkitError
from peftkit.recipe import load_recipe
from peftkit.train import train
from tests.conftest import free_port, make_recipe
from tests.test_distributed import _adapter, _kill_tree, _lines, _sections

STEPS = 10
PORT_TAKEN = re.compile(r"utilizing it|EADDRINUSE|address already in use", re.IGNORECASE)
"""What accelerate's launcher (or torch's store) says when the rendezvous port was taken after it was picked."""


def _machine(rank: int, port: int, argv: list[str]) -> list[str]:
    """accelerate's launcher as machine `rank` of 2 runs it, one process each (--num_processes is the total)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
            "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
            "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "peftkit", *argv]


def _wait(procs: list[subprocess.Popen], timeout: float) -> list[int | None]:
    """Wait for both launchers; the first to fail, or the timeout, ends both (a machine left alone would wait for
    its peer until torch's own timeout)."""
    deadline = time.time() + timeout
    while time.time() < deadline and any(p.poll() is None for p in procs):
        if any(p.poll() for p in procs):
            break
        time.sleep(0.1)
    for p in procs:
        if p.poll() is None:
            _kill_tree(p.pid)
            p.wait()
    return [p.returncode for p in procs]


def _on_two_machines(argv: list[str], logs: Path) -> None:
    """Run `peftkit <argv>` on 2 simulated machines and assert that both finished; a rendezvous port taken
    between being picked and bound gets one more try with another port."""
    for attempt in range(2):
        port, files = free_port(), [logs / f"machine-{rank}.log" for rank in range(2)]
        procs = []
        for rank, file in enumerate(files):
            with file.open("w") as out:
                procs.append(subprocess.Popen(_machine(rank, port, argv), stdout=out, stderr=subprocess.STDOUT))
        codes = _wait(procs, timeout=300)
        output = "".join(f"--- machine {rank} (exit {code}):\n{file.read_text()}"
                         for rank, (code, file) in enumerate(zip(codes, files, strict=True)))
        if codes == [0, 0]:
            return
        if attempt == 1 or not PORT_TAKEN.search(output):
            pytest.fail(output[-6000:])


def test_two_machines_of_one_process_train_the_adapter_of_one_process_with_twice_the_batch(
        tiny_llama, number_data, tmp_path):
    """Machine 0 and machine 1, one process each with batch 2 (x grad_accum 2), train the adapter of 1 process with
    batch 4 up to float rounding, with the same losses; the global main process alone writes (each step logged
    once) and the manifest records 2 processes on 2 machines."""
    single = make_recipe(tmp_path / "one", tiny_llama, number_data, **_sections(4, steps=STEPS))
    train(load_recipe(single))
    recipe = make_recipe(tmp_path / "two", tiny_llama, number_data, **_sections(2, steps=STEPS))
    _on_two_machines(["train", str(recipe)], tmp_path)

    one, two = _adapter(tmp_path / "one" / "run"), _adapter(tmp_path / "two" / "run")
    assert max((one[k] - two[k]).abs().max().item() for k in one) <= 1e-5
    lines = _lines(tmp_path / "two" / "run")
    assert [x["step"] for x in lines if "loss" in x] == list(range(1, STEPS + 1))
    for a, b in zip(_lines(tmp_path / "one" / "run"), lines, strict=True):
        assert abs(a.get("loss", a.get("eval_loss")) - b.get("loss", b.get("eval_loss"))) <= 1e-5
    manifest = json.loads((tmp_path / "two" / "run" / "manifest.json").read_text())
    assert manifest["distributed"] == {"processes": 2, "backend": "gloo", "type": "MULTI_CPU", "machines": 2,
                                       "trimmed_slices": True}


def test_a_process_that_does_not_see_the_checkpoints_says_the_run_directory_must_be_shared(tmp_path):
    """--resume on a machine without the main process's run directory (no shared filesystem) is said as such,
    not as damaged checkpoints."""
    with pytest.raises(PeftkitError) as error:
        check_sees_checkpoints(tmp_path, 1)
    assert str(error.value) == (
        f"--resume: process 1 (on {socket.gethostname()}) finds no checkpoint in {tmp_path / 'checkpoints'}, where "
        "the main process resumes from. Every machine of a run must see export.output_dir at the same path: put it "
        "on a filesystem they share.")
    (tmp_path / "checkpoints" / "step-00000005").mkdir(parents=True)
    check_sees_checkpoints(tmp_path, 1)
