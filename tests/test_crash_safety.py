"""Crash safety: atomic writes, a full disk, NaN losses, Ctrl-C."""

import errno
import io
import json
import math
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
from peftkit.errors import PeftkitError
from peftkit.fileio import atomic_directory, atomic_write_bytes
from peftkit.recipe import load_recipe
from peftkit.train import train
from tests.conftest import make_recipe, signal_after_step


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


@pytest.fixture
def full_disk(tmp_path):
    """A real filesystem of 256 KiB with all but 12 KiB taken (a tmpfs: needs the right to mount, root in CI)."""
    mount = tmp_path / "full"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (mount / "filler").write_bytes(b"\0" * (256 - 12) * 1024)
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)  # lazy: a file a failed writer left open


@pytest.mark.parametrize("writer", ["safetensors", "torch.save"])
def test_a_library_writing_onto_a_full_disk_is_a_disk_full_error(writer, full_disk):
    """safetensors and torch.save write checkpoint files themselves and report a full disk in their own words
    (a SafetensorError "No space left on device (os error 28)"; a RuntimeError of torch's zip writer, "unexpected
    pos"): they came out as tracebacks, where an OSError was the clear error; the half-written directory is gone."""
    from safetensors.torch import save_file

    tensors = {"w": torch.arange(64 * 1024, dtype=torch.float32)}  # 256 KiB
    with pytest.raises(PeftkitError, match=r"^No space left on the device while writing .*step-00000002\. The previous"):
        with atomic_directory(full_disk / "step-00000002") as d:
            save_file(tensors, d / "adapter_model.safetensors") if writer == "safetensors" else torch.save(tensors, d / "s.pt")
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]


@pytest.mark.parametrize("writer", ["safetensors", "torch.save"])
def test_a_library_writing_past_a_file_size_limit_is_a_clear_error(writer, tmp_path):
    """Under `ulimit -f`, safetensors said "File too large (os error 27)" and torch.save made a short write: both
    were tracebacks (only an OSError EFBIG was said)."""
    write = "save_file(tensors, d / 'w.safetensors')" if writer == "safetensors" else "torch.save(tensors, d / 's.pt')"
    script = ("import resource, sys, torch\nfrom pathlib import Path\nfrom safetensors.torch import save_file\n"
              "from peftkit.errors import PeftkitError\nfrom peftkit.fileio import atomic_directory\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))\n"
              "tensors = {'w': torch.arange(64 * 1024, dtype=torch.float32)}\ntry:\n"
              "    with atomic_directory(Path(sys.argv[1]) / 'step-00000002') as d:\n"
              "        " + write + "\nexcept PeftkitError as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.stdout.startswith(f"{tmp_path / 'step-00000002'} would be larger than this process may write (File "
                                  "too large: a file-size limit such as `ulimit -f`)"), done.stdout + done.stderr
    assert not list(tmp_path.iterdir())


def _exploding(tmp_path, tiny_llama, number_data, policy, lr=3e38):
    # SGD without clipping: at lr 3e38 the first step makes the model's outputs overflow (the loss is then NaN); at
    # lr 1e4 the gradients overflow at step 3 while the loss is still finite.
    return make_recipe(tmp_path, tiny_llama, number_data,
                       training={"max_steps": 12, "lr": lr, "optimizer": "sgd", "max_grad_norm": None,
                                 "scheduler": "constant", "warmup_steps": 0, "save_steps": 1, "nan_policy": policy},
                       eval={"base_model": False})


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tiny_llama, number_data, tmp_path):
    with pytest.raises(PeftkitError) as e:
        train(load_recipe(_exploding(tmp_path, tiny_llama, number_data, "stop")))
    message = str(e.value)
    assert "Loss became" in message and "at step" in message and "nan_policy: skip_step" in message
    step = int(message.split("at step ")[1].split(";")[0])
    assert f"step-{step - 1:08d}" in message  # the last good checkpoint is named
    assert "start again with `peftkit train RECIPE --overwrite`: --resume continues only the same recipe" in message
    assert (tmp_path / "run" / "checkpoints" / f"step-{step - 1:08d}" / "adapter_model.safetensors").exists()


def test_non_finite_gradients_of_a_finite_loss_stop_or_skip_the_step(tiny_llama, number_data, tmp_path):
    """Gradients that overflow while the loss is still finite are not applied: `stop` names the step, `skip_step`
    skips it (before, the step corrupted the weights and the run failed later)."""
    with pytest.raises(PeftkitError, match=r"^The gradient norm became nan at step 3; training stopped. The last good "
                       r"checkpoint is .*step-00000002"):
        train(load_recipe(_exploding(tmp_path / "stop", tiny_llama, number_data, "stop", lr=1e4)))
    summary = train(load_recipe(_exploding(tmp_path / "skip", tiny_llama, number_data, "skip_step", lr=1e4)))
    assert summary["skipped_steps"] == 10 and math.isfinite(summary["eval_loss"])
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "skip" / "run" / "adapter" / "adapter_model.safetensors")
    step2 = load_file(tmp_path / "stop" / "run" / "checkpoints" / "step-00000002" / "adapter_model.safetensors")
    assert exported.keys() == step2.keys() and all(torch.equal(exported[k], step2[k]) for k in step2)


def _nan_loss_at_step(monkeypatch, step: int) -> list:
    """The training loss made nan at micro-batch `step` (one a step here); the calls made, as a list."""
    import peftkit.train as train_mod
    from peftkit.evaluate import token_loss_sum

    calls = []

    def nan_once(model, batch, labelled):
        loss, n = token_loss_sum(model, batch, labelled)
        calls.append(1)
        return (loss * float("nan"), n) if len(calls) == step else (loss, n)

    monkeypatch.setattr(train_mod, "token_loss_sum", nan_once)
    return calls


def test_skip_step_past_a_one_off_nan_finishes(tiny_llama, number_data, tmp_path, monkeypatch):
    calls = _nan_loss_at_step(monkeypatch, 3)
    recipe = make_recipe(tmp_path, tiny_llama, number_data, eval={"base_model": False},
                         training={"nan_policy": "skip_step", "eval_steps": 3, "save_steps": 3})
    summary = train(load_recipe(recipe))
    assert summary["steps"] == 6 and summary["skipped_steps"] == 1 and len(calls) == 6
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()
    # The skipped step has no loss to log, but its evaluation and checkpoint are made as scheduled.
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "loss" in line] == [1, 2, 4, 5, 6]
    # The schedule counts updates: step 4 applies the rate step 3 would have (warmup 1, then cosine over 5 steps).
    cosine = [0.5 * (1 + math.cos(math.pi * k / 5)) for k in range(4)]
    assert [line["lr"] for line in lines if "loss" in line] == pytest.approx([1e-2 / 2] + [1e-2 * c for c in cosine])
    assert 3 in [line["step"] for line in lines if "eval_loss" in line]
    assert (tmp_path / "run" / "checkpoints" / "step-00000003").is_dir()


def test_a_skipped_last_step_takes_the_live_bar_to_the_end(tiny_llama, number_data, tmp_path, monkeypatch):
    """The live bar moved only with a step's loss: a run whose last step was skipped ended on `5/6`."""
    import io
    import re

    from rich.console import Console

    _nan_loss_at_step(monkeypatch, 6)
    recipe = make_recipe(tmp_path, tiny_llama, number_data, eval={"base_model": False},
                         training={"nan_policy": "skip_step"})
    buffer = io.StringIO()
    summary = train(load_recipe(recipe), console=Console(file=buffer, width=150, force_terminal=True,
                                                         color_system=None))
    assert summary["skipped_steps"] == 1
    bars = [part for part in re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", buffer.getvalue()).split("\r")
            if part.lstrip().startswith("train")]
    assert "6/6" in bars[-1], bars[-1]


def test_skip_step_that_leaves_a_broken_model_fails_and_exports_nothing(tiny_llama, number_data, tmp_path):
    with pytest.raises(train_failed()) as e:
        train(load_recipe(_exploding(tmp_path, tiny_llama, number_data, "skip_step")))
    message = str(e.value)
    assert message.startswith("The final eval loss is nan (11 steps were skipped for a non-finite loss or "
                              "gradients): the fine-tuned model's predictions are not finite on data.eval, so nothing "
                              "was exported. Lower training.lr")
    assert e.value.exit_code == 1
    assert not (tmp_path / "run" / "adapter").exists() and not (tmp_path / "run" / "manifest.json").exists()


def test_non_finite_adapter_weights_are_never_exported():
    """What no skipped step can leave behind (a finite update that overflows a weight): the run fails, naming the
    tensor and the skipped steps, and says to start again, not to resume the same recipe."""
    from peftkit.checkpoint import LoopState
    from peftkit.finish import _check_finite

    weights = {"base_model.model.layers.0.q_proj.lora_B.weight": torch.tensor([1.0, float("inf")])}
    with pytest.raises(train_failed()) as e:
        _check_finite(None, None, {"loss": 1.0}, LoopState(skipped_steps=2), weights)
    message = str(e.value)
    assert message.startswith("Training ended with non-finite adapter weights (base_model.model.layers.0.q_proj."
                              "lora_B.weight) (2 steps were skipped for a non-finite loss or gradients); nothing was "
                              "exported.")
    # not "--resume": the same recipe would diverge again the same way
    assert "Lower training.lr and start again with `peftkit train RECIPE --overwrite`" in message


def train_failed():
    from peftkit.train import TrainingFailed

    return TrainingFailed


def _adapter_bytes(run) -> bytes:
    return (run / "adapter" / "adapter_model.safetensors").read_bytes()


def _logged_steps(run) -> list[int]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


@pytest.mark.parametrize(("sig", "at"), [(signal.SIGINT, 3), (signal.SIGTERM, 3), (signal.SIGINT, 8)])
def test_signal_mid_step_checkpoints_that_step_and_resumes_bit_identically(tiny_llama, number_data, tmp_path,
                                                                           monkeypatch, sig, at):
    # The signal lands right after optimizer.step() of step 3, before the loop counts the step: acting on it
    # there would checkpoint step-2 state with step-3 weights (a resumed run would then apply step 3 twice).
    # At the last step (8) it stops too, before the final evaluation and export (it was ignored).
    sections = dict(training={"max_steps": 8, "batch_size": 2, "grad_accum": 2, "optimizer": "sgd"},
                    adapter={"dropout": 0.1}, eval={"base_model": False})
    straight = make_recipe(tmp_path / "a", tiny_llama, number_data, **sections)
    train(load_recipe(straight))

    signal_after_step(monkeypatch, torch.optim.SGD, at, sig)
    interrupted = load_recipe(make_recipe(tmp_path / "b", tiny_llama, number_data, **sections))
    with pytest.raises(PeftkitError, match=f"at step {at}; checkpoint saved to .*step-0000000{at}.*--resume"):
        train(interrupted)
    run = tmp_path / "b" / "run"
    assert _logged_steps(run) == list(range(1, at + 1)) and not (run / "adapter").exists()
    assert signal.getsignal(sig) is not None and signal.getsignal(sig) == {
        signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}[sig]  # handlers restored
    monkeypatch.undo()
    summary = train(interrupted, resume=True)
    assert _logged_steps(run) == list(range(1, 9))
    assert _adapter_bytes(run) == _adapter_bytes(tmp_path / "a" / "run")
    assert summary["resumed_at_step"] == at  # the time and peak memory recorded are the resumed process's

    from peftkit.reproduced import _differ

    assert _differ("", {"resumed_at_step": at, "steps": 8}, {"steps": 8}, 0) == []  # verify's re-run runs straight


def _project(root: Path, model: Path, files: dict[str, Path], lr: float = 0.1) -> Path:
    """A project as users lay one out: model, data and a recipe naming them by relative paths."""
    shutil.copytree(model, root / "model")
    for name in ("train", "eval"):
        (root / "data").mkdir(parents=True, exist_ok=True)
        shutil.copy(files[name], root / "data" / f"{name}.jsonl")
    (root / "recipe.yaml").write_text(
        "model: {name_or_path: model, dtype: float32}\n"
        "adapter: {r: 4, alpha: 8, target_modules: all-linear}\n"
        "data: {train: data/train.jsonl, eval: data/eval.jsonl, format: alpaca, max_length: 128}\n"
        f"training: {{max_steps: 6, batch_size: 4, lr: {lr}, optimizer: sgd, save_steps: 2, seed: 0}}\n"
        "export: {output_dir: run, report: false}\neval: {base_model: false, samples: 0}\n")
    return root / "recipe.yaml"


def test_a_moved_project_resumes_its_run(tiny_llama, number_data, tmp_path, monkeypatch):
    """A project moved (or a run copied to another machine) with its unfinished run: --resume was refused as "a run
    of a different recipe" (the resolved paths differ), and the advice was --overwrite, which deletes the
    checkpoints. The same recipe at other paths is the same run; the checkpoint's record of the inputs' contents
    decides, as for any resume."""
    straight = _project(tmp_path / "straight", tiny_llama, number_data)
    train(load_recipe(straight))
    moved = _project(tmp_path / "here", tiny_llama, number_data)
    signal_after_step(monkeypatch, torch.optim.SGD, 3, signal.SIGTERM)
    with pytest.raises(PeftkitError, match="Stopped by SIGTERM at step 3"):
        train(load_recipe(moved))
    monkeypatch.undo()
    (tmp_path / "here").rename(tmp_path / "there")
    out = io.StringIO()
    train(load_recipe(tmp_path / "there" / "recipe.yaml"), resume=True, console=Console(file=out, width=1000))
    assert f"made with its files at other paths (model.name_or_path: {tmp_path / 'here' / 'model'} -> " \
        f"{tmp_path / 'there' / 'model'}" in " ".join(out.getvalue().split())
    assert _adapter_bytes(tmp_path / "there" / "run") == _adapter_bytes(tmp_path / "straight" / "run")
    # Another recipe is still another run, its changed keys named.
    other = _project(tmp_path / "other", tiny_llama, number_data, lr=0.2)
    shutil.copytree(tmp_path / "there" / "run", tmp_path / "other" / "run")
    with pytest.raises(PeftkitError, match=r"holds a run of a different recipe \(its recipe.yaml differs in "
                                           r"training.lr\)"):
        train(load_recipe(other), resume=True)


def test_ctrl_c_in_a_real_process_saves_checkpoint_and_resumes(tiny_llama, number_data, tmp_path):
    """Ctrl-C at step 3 or so of 40 (32 steps an epoch: the resumed run crosses into the second epoch); resumed, the
    run's files are those of verify's uninterrupted re-run, bit for bit, its stop checkpoint included."""
    sections = dict(training={"max_steps": 40, "batch_size": 2}, eval={"base_model": False})
    recipe = make_recipe(tmp_path / "b", tiny_llama, number_data, **sections)
    proc = subprocess.Popen([sys.executable, "-m", "peftkit", "train", str(recipe)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    run = tmp_path / "b" / "run"
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert "Interrupted at step" in err and "--resume" in err and "Traceback" not in err
    assert not (run / "adapter").exists(), "interrupted too late to test anything"
    result = CliRunner().invoke(app, ["train", str(recipe), "--resume"])
    assert result.exit_code == 0, result.output
    assert _logged_steps(run) == list(range(1, 41))
    # verify re-runs the recipe uninterrupted and compares the bytes of every exported file (the adapter's among
    # them: tests/test_train.py::test_verify_reproduces_and_reports_divergence) and of the checkpoint at the stop,
    # which no save_steps made, with the re-run's at that step.
    from peftkit.verify import verify

    stops = [p.name for p in (run / "checkpoints").iterdir()]
    report = verify(run, console=Console(file=io.StringIO()))
    assert len(stops) == 1 and report.ok, (stops, report.differences)


@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_atomic_writes_get_the_modes_an_ordinary_write_would(tmp_path, umask, file_mode, dir_mode):
    """mkstemp/mkdtemp made every exported file 0600 and directory 0700 whatever the umask: a run's adapter was
    unreadable to the account serving it. A file a library writes inside an atomic directory is covered too."""
    import os
    import stat

    from peftkit.fileio import atomic_directory, atomic_write_text

    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        with atomic_directory(tmp_path / "adapter") as tmp:
            (tmp / "sub").mkdir(mode=0o700)
            fd = os.open(tmp / "sub" / "weights", os.O_CREAT | os.O_WRONLY, 0o600)  # as safetensors may
            os.close(fd)
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "a.json") == file_mode and mode(tmp_path / "adapter" / "sub" / "weights") == file_mode
    assert mode(tmp_path / "adapter") == dir_mode and mode(tmp_path / "adapter" / "sub") == dir_mode


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_command_stopped_outside_the_training_steps_says_so(tiny_llama, number_data, tmp_path, sig):
    """Ctrl-C in a command (typer turns it into exit status 130 and says nothing) printed nothing; SIGTERM outside the
    training loop (loading, evaluation, export, any other command) killed the process silently, its cleanups not run.
    Both now stop the command with `interrupted` and status 130."""
    recipe = make_recipe(tmp_path, tiny_llama, number_data)
    code = ("import os, signal, sys\n"
            "import peftkit.recipe as recipe\n"
            "from peftkit import cli\n"
            "load = recipe.load_recipe\n"
            "def stopped(*args, **kwargs):\n"
            f"    os.kill(os.getpid(), signal.{sig})\n"
            "    return load(*args, **kwargs)\n"
            "recipe.load_recipe = stopped\n"
            f"sys.argv = ['peftkit', 'validate', {str(recipe)!r}]\n"
            "cli.main()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "interrupted", done.stderr


def _fp16_loss_scaler(monkeypatch, init_scale: float, growth_interval: int) -> None:
    """fp16's loss scaling, on the CPU: accelerate makes a GradScaler only for CUDA, so the run's accelerator is given
    torch's GradScaler for the CPU, and the gradients overflow as fp16's do when the scale is too large: a hook on the
    first trainable parameter makes its gradient inf while the scale is above 2^17. The scaler then skips the step
    and halves its scale."""
    import peftkit.train as train_mod

    make = train_mod.make_accelerator

    def with_scaler(cfg, out):
        accelerator = make(cfg, out)
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=growth_interval)
        prepare = accelerator.prepare

        def prepare_overflowing(model, optimizer):
            model, optimizer = prepare(model, optimizer)
            param = next(p for p in model.parameters() if p.requires_grad)
            param.register_hook(lambda grad: torch.full_like(grad, math.inf) if scaler.get_scale() > 2**17 else grad)
            return model, optimizer

        accelerator.scaler, accelerator.prepare = scaler, prepare_overflowing
        return accelerator

    monkeypatch.setattr(train_mod, "make_accelerator", with_scaler)


def test_a_step_the_loss_scaler_skips_leaves_the_schedule_and_is_counted_skipped(tiny_llama, number_data, tmp_path,
                                                                                  monkeypatch):
    """The scaler's skipped step still stepped the schedule (warmup went on without an update) and was logged as an
    optimizer step, with the lr it never applied; now, as accelerate's AcceleratedScheduler and transformers' Trainer
    do, the schedule waits for the next update, and the step is counted as skipped, with no loss line."""
    _fp16_loss_scaler(monkeypatch, init_scale=2.0**18, growth_interval=10**6)  # step 1 overflows, then 2^17 holds
    recipe = make_recipe(tmp_path, tiny_llama, number_data, eval={"base_model": False},
                         training={"max_grad_norm": None, "warmup_steps": 2, "scheduler": "linear", "save_steps": 3})
    summary = train(load_recipe(recipe))
    _check_step_1_skipped(summary, tmp_path / "run")


def _check_step_1_skipped(summary: dict, run: Path) -> None:
    """Step 1 of 6 skipped: no loss line, and the schedule (warmup 2, linear) waits for the next update."""
    assert summary["steps"] == 6 and summary["skipped_steps"] == 1
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [row for row in rows if "loss" in row]
    assert [row["step"] for row in rows] == [2, 3, 4, 5, 6]
    # warmup 2 over the 5 updates: 1/3, 2/3 of lr, then linear decay from 1 by 1/4 of the 4 steps after warmup
    assert [row["lr"] for row in rows] == pytest.approx([1e-2 / 3, 2e-2 / 3, 1e-2, 0.75e-2, 0.5e-2])


def test_the_loss_scale_is_part_of_the_checkpoint(tiny_llama, number_data, tmp_path, monkeypatch):
    """A resumed fp16 run started again from the scaler's first scale, so it skipped other steps than the unbroken
    run (here: 2^16 doubled after every update, and steps 3 and 5 overflow at 2^18; resumed at step 3, step 6 did)."""
    from tests.conftest import check_resumes_to_the_same_bits

    _fp16_loss_scaler(monkeypatch, init_scale=2.0**16, growth_interval=1)
    recipe = make_recipe(tmp_path, tiny_llama, number_data, eval={"base_model": False},
                         training={"max_grad_norm": None, "save_steps": 3})
    check_resumes_to_the_same_bits(recipe, tmp_path / "run", kill_after=3, steps=6)


def test_a_step_deepspeeds_loss_scaler_skips_leaves_the_schedule_and_is_counted_skipped(tiny_llama, number_data,
                                                                                        tmp_path, monkeypatch):
    """Under DeepSpeed the engine's own fp16 scaler skips overflowing steps (accelerate has no scaler there), and the
    loop stepped the run's schedule, which lives outside the engine, and logged the step as an update all the same.
    The engine's word (`was_step_applied`) now counts it skipped, as accelerate's scaler's. Here the engine is stood
    in for: `zero.skipped` says step 1 was skipped (DeepSpeed's fp16 needs a GPU)."""
    from types import SimpleNamespace

    from peftkit import zero

    assert zero.skipped(SimpleNamespace(distributed_type="DistributedType.DEEPSPEED"),
                        SimpleNamespace(was_step_applied=lambda: False))
    assert not zero.skipped(SimpleNamespace(distributed_type="DistributedType.NO"), None)
    calls = []
    monkeypatch.setattr(zero, "skipped", lambda accelerator, engine: calls.append(1) or len(calls) == 1)
    recipe = make_recipe(tmp_path, tiny_llama, number_data, eval={"base_model": False},
                         training={"max_grad_norm": None, "warmup_steps": 2, "scheduler": "linear"})
    summary = train(load_recipe(recipe))
    _check_step_1_skipped(summary, tmp_path / "run")
