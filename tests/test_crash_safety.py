"""Crash safety: atomic writes, a full disk, NaN losses, Ctrl-C."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from peftkit import fileio
from peftkit.cli import app
from peftkit.errors import PeftkitError
from peftkit.fileio import atomic_directory, atomic_write_bytes
from peftkit.recipe import load_recipe
from peftkit.train import train
from tests.conftest import make_recipe


def _disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_keeps_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "manifest.json"
    atomic_write_bytes(target, b"old")
    monkeypatch.setattr(fileio.os, "fsync", _disk_full)
    with pytest.raises(PeftkitError, match="No space left on the device while writing .*manifest.json.*intact"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temp file left behind


def test_disk_full_keeps_previous_checkpoint(tmp_path, monkeypatch):
    ckpt = tmp_path / "checkpoints" / "step-00000004"
    with atomic_directory(ckpt) as d:
        (d / "adapter_model.safetensors").write_bytes(b"step 4")
    monkeypatch.setattr(fileio.os, "fsync", _disk_full)
    with pytest.raises(PeftkitError, match="No space left"):
        with atomic_directory(ckpt) as d:
            (d / "adapter_model.safetensors").write_bytes(b"step 8")
    assert (ckpt / "adapter_model.safetensors").read_bytes() == b"step 4"
    assert [p.name for p in ckpt.parent.iterdir()] == ["step-00000004"]


def _exploding(tmp_path, tiny_llama, number_data, policy):
    # SGD at lr 1e4 without clipping overflows within a few steps.
    return make_recipe(tmp_path, tiny_llama, number_data,
                       training={"max_steps": 12, "lr": 1e4, "optimizer": "sgd", "max_grad_norm": None,
                                 "scheduler": "constant", "warmup_steps": 0, "save_steps": 1, "nan_policy": policy},
                       eval={"base_model": False})


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tiny_llama, number_data, tmp_path):
    with pytest.raises(PeftkitError) as e:
        train(load_recipe(_exploding(tmp_path, tiny_llama, number_data, "stop")))
    message = str(e.value)
    assert "Loss became" in message and "at step" in message and "nan_policy: skip_step" in message
    step = int(message.split("at step ")[1].split(";")[0])
    assert f"step-{step - 1:08d}" in message  # the last good checkpoint is named
    assert (tmp_path / "run" / "checkpoints" / f"step-{step - 1:08d}" / "adapter_model.safetensors").exists()


def test_nan_loss_skip_step_finishes(tiny_llama, number_data, tmp_path):
    summary = train(load_recipe(_exploding(tmp_path, tiny_llama, number_data, "skip_step")))
    assert summary["steps"] == 12 and summary["skipped_steps"] > 0


def test_ctrl_c_saves_checkpoint_and_resumes(tiny_llama, number_data, tmp_path):
    recipe = make_recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 400, "batch_size": 2},
                         eval={"base_model": False})
    proc = subprocess.Popen([sys.executable, "-m", "peftkit", "train", str(recipe)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert "Interrupted at step" in err and "--resume" in err and "Traceback" not in err
    result = CliRunner().invoke(app, ["train", str(recipe), "--resume"])
    assert result.exit_code == 0, result.output
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if "loss" in json.loads(line)]
    assert steps == list(range(1, 401))
