"""Data-parallel training in real processes (accelerate's launcher, torch DDP over gloo on the CPU)."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from peftkit.distributed import shard
from peftkit.recipe import load_recipe
from peftkit.train import train
from tests.conftest import make_recipe

STEPS = 40


def _peftkit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peftkit", *args], capture_output=True, text=True, timeout=600)


def _sections(batch_size: int) -> dict:
    # No dropout: its masks are drawn per process, so they cannot match a single process's.
    return dict(training={"max_steps": STEPS, "batch_size": batch_size, "grad_accum": 2, "save_steps": 5,
                          "eval_steps": 20},
                adapter={"dropout": 0.0}, eval={"base_model": False})


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torch's launcher starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, tree = [pid], []
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for p in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def _adapter(run):
    return load_file(run / "adapter" / "adapter_model.safetensors")


def _lines(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_shard_splits_rows_in_order():
    batch = {"input_ids": torch.arange(10).reshape(5, 2), "labels": torch.arange(10).reshape(5, 2)}
    parts = [shard(batch, r, 2)["input_ids"][:, 0].tolist() for r in range(2)]
    assert parts == [[0, 2, 4], [6, 8]]
    assert shard(batch, 0, 1) is batch


def test_two_processes_train_the_adapter_of_one_with_twice_the_batch_and_resume_bit_identically(
        tiny_llama, number_data, tmp_path):
    """2 processes x batch 2 (x grad_accum 2) = 1 process x batch 4: the same adapter up to float rounding; a
    2-process run (`accelerate launch` with configs/accelerate/ddp.yaml) killed after a checkpoint and resumed
    (`--num-processes 2`) gives the uninterrupted 2-process run's bits; only the main process writes."""
    single = make_recipe(tmp_path / "one", tiny_llama, number_data, **_sections(4))
    train(load_recipe(single))

    straight = make_recipe(tmp_path / "two", tiny_llama, number_data, **_sections(2))
    done = _peftkit("train", str(straight), "--num-processes", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    one, two = _adapter(tmp_path / "one" / "run"), _adapter(tmp_path / "two" / "run")
    assert max((one[k] - two[k]).abs().max().item() for k in one) <= 1e-5
    lines = _lines(tmp_path / "two" / "run")
    assert [x["step"] for x in lines if "loss" in x] == list(range(1, STEPS + 1))  # one writer: no line twice
    for a, b in zip(_lines(tmp_path / "one" / "run"), lines, strict=True):
        assert abs(a.get("loss", a.get("eval_loss")) - b.get("loss", b.get("eval_loss"))) <= 1e-5
    manifest = json.loads((tmp_path / "two" / "run" / "manifest.json").read_text())
    assert manifest["distributed"] == {"processes": 2, "backend": "gloo", "type": "MULTI_CPU"}
    verified = _peftkit("verify", str(tmp_path / "two" / "run"))  # re-runs in 2 processes too
    assert verified.returncode == 0 and "reproduces bit for bit" in verified.stdout, verified.stdout + verified.stderr

    killed = make_recipe(tmp_path / "kill", tiny_llama, number_data, **_sections(2))
    config = Path(__file__).parents[1] / "configs" / "accelerate" / "ddp.yaml"  # the shipped config, as users launch
    proc = subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                             "-m", "peftkit", "train", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "kill" / "run" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (ckpts.exists() and any(p.name.startswith("step-") for p in ckpts.iterdir())):
        time.sleep(0.05)
    _kill_tree(proc.pid)
    proc.wait()
    assert not (tmp_path / "kill" / "run" / "adapter").exists(), "killed too late to test anything"
    resumed = _peftkit("train", str(killed), "--num-processes", "2", "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "Resumed from step-" in resumed.stdout
    again = _adapter(tmp_path / "kill" / "run")
    assert all(again[k].equal(two[k]) for k in two)


def test_a_user_error_in_several_processes_is_one_clear_message(tiny_llama, number_data, tmp_path):
    recipe = make_recipe(tmp_path, tiny_llama, {**number_data, "train": tmp_path / "missing.jsonl"}, **_sections(2))
    done = _peftkit("train", str(recipe), "--num-processes", "2")
    assert done.returncode == 2
    assert done.stderr.count("error: Data file not found") == 1, done.stderr  # said once, not by each process
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr, done.stderr
    assert "error: the run stopped in its 2 processes (the message is above)." in done.stderr


class _Process:
    """One process of `world` as `evaluate_loss` sees an Accelerator, with the cross-process sum left to the test."""

    def __init__(self, rank: int, world: int) -> None:
        self.process_index, self.num_processes = rank, world

    def reduce(self, value, reduction):
        return value


def test_eval_loss_batches_are_shared_out_and_add_up(tiny_llama, number_data):
    """Each of N processes evaluates every N-th batch (a process one batch short repeats its first, uncounted, so
    FSDP's forwards stay in step); their token counts partition the whole and their sums add up to its loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.data import load_examples
    from peftkit.evaluate import evaluate_loss
    from peftkit.recipe import DataConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    data = DataConfig(train=str(number_data["eval"]), format="alpaca", max_length=128)
    examples = load_examples(tok, data.train, "train", data)[0]  # 16 rows: 6 batches of 3
    whole = evaluate_loss(model, examples, 3, tok.pad_token_id)
    for world in (2, 4):  # 3 + 3 batches; 2 + 2 + 1 + 1
        parts = [evaluate_loss(model, examples, 3, tok.pad_token_id, _Process(r, world)) for r in range(world)]
        assert all(p["num_tokens"] > 0 for p in parts)
        assert sum(p["num_tokens"] for p in parts) == whole["num_tokens"]
        summed = sum(p["loss"] * p["num_tokens"] for p in parts) / whole["num_tokens"]
        assert abs(summed - whole["loss"]) <= 1e-12
