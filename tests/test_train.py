"""End to end: train → export → eval → merge, through the functions and the CLI, on CPU."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from peftkit.cli import app
from peftkit.fileio import sha256_file
from peftkit.adapter_base import load_adapted_model
from peftkit.recipe import load_recipe
from peftkit.runtime import lr_lambda
from peftkit.train import train
from tests.conftest import make_recipe

IDS = torch.tensor([[1, 40, 41, 42, 7, 60, 61, 62]])


def _adapter_sha(run):
    return sha256_file(run / "adapter" / "adapter_model.safetensors")


def test_train_export_eval_merge_cli(tiny_llama, number_data, tmp_path):
    recipe = make_recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 20}, export={"merged": True})
    runner = CliRunner()
    result = runner.invoke(app, ["train", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "eval loss, base model" in result.output and "eval loss, fine-tuned" in result.output
    run = tmp_path / "run"

    # Outputs contract.
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == str(tiny_llama)
    keys = load_file(run / "adapter" / "adapter_model.safetensors")
    assert keys and all(k.startswith("base_model.model.") and k.endswith(("lora_A.weight", "lora_B.weight")) for k in keys)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["outputs_sha256"]["adapter/adapter_model.safetensors"] == _adapter_sha(run)
    assert manifest["metrics"]["eval_loss"] < manifest["metrics"]["base_eval_loss"]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, 21))
    assert all(r["peak_mem_mb"] > 0 for r in lines if "loss" in r)

    # The merged export equals base + adapter in peft (an independent implementation).
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, run / "adapter").eval()
    # total_params is the adapted model's, base and adapter together, as peft counts its "all params"
    assert manifest["metrics"]["total_params"] == reference.get_nb_trainable_parameters()[1]
    assert manifest["metrics"]["trainable_params"] == sum(t.numel() for t in keys.values())
    merged = AutoModelForCausalLM.from_pretrained(run / "merged").eval()
    ours, _, _, _, _ = load_adapted_model(None, str(run / "adapter"), torch.device("cpu"))
    with torch.no_grad():
        expected = reference(IDS).logits
        assert (merged(IDS).logits - expected).abs().max() <= 1e-4
        assert (ours(IDS).logits - expected).abs().max() <= 1e-5

    # eval: base, adapter and merged through the CLI; adapter and merged agree, both beat the base.
    results = {}
    for name, extra in {"base": [], "adapter": ["--adapter", str(run / "adapter")], "merged": None}.items():
        model = str(run / "merged") if extra is None else str(tiny_llama)
        out = tmp_path / f"{name}.json"
        result = runner.invoke(app, ["eval", "--model", model, "--data", str(number_data["eval"]), "--format", "alpaca",
                                     "--max-length", "128", "--json", str(out), *(extra or [])])
        assert result.exit_code == 0, result.output
        results[name] = json.loads(out.read_text())
        assert set(results[name]) == {"loss", "perplexity", "num_tokens"}
    assert results["adapter"]["loss"] == pytest.approx(results["merged"]["loss"], abs=1e-4)
    # On CUDA the run evaluates at its training precision (bf16 autocast), `peftkit eval` in the weights' fp32.
    tolerance = 1e-3 if torch.cuda.is_available() else 1e-4
    assert results["adapter"]["loss"] == pytest.approx(manifest["metrics"]["eval_loss"], abs=tolerance)
    assert results["adapter"]["loss"] < results["base"]["loss"]
    assert results["base"]["num_tokens"] == results["merged"]["num_tokens"] > 0

    # merge: the CLI's merged model equals the one exported by train.
    result = runner.invoke(app, ["merge", "--adapter", str(run / "adapter"), "--output", str(tmp_path / "m2")])
    assert result.exit_code == 0, result.output
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m2").eval()
    with torch.no_grad():
        assert (again(IDS).logits - merged(IDS).logits).abs().max() <= 1e-6



def test_a_bf16_base_trained_in_float32_exports_its_merge_in_bf16_as_peftkit_merge_does(tiny_llama, number_data,
                                                                                         tmp_path):
    """export.merged_dtype's default is the base checkpoint's dtype, as `peftkit merge`'s: a bf16 base loaded in
    float32 (model.dtype's default) wrote a float32 merged/, twice the size, unlike `peftkit merge` of the same
    adapter."""
    import shutil

    from safetensors.torch import load_file

    base = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).save_pretrained(base)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_llama / name).exists():
            shutil.copy(tiny_llama / name, base / name)
    recipe = make_recipe(tmp_path, base, number_data, training={"max_steps": 2}, export={"merged": True})
    train(load_recipe(recipe), show_summary=False)
    run = tmp_path / "run"
    assert json.loads((run / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    result = CliRunner().invoke(app, ["merge", "--adapter", str(run / "adapter"), "--output", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    exported, merged = load_file(run / "merged" / "model.safetensors"), load_file(tmp_path / "m" / "model.safetensors")
    assert exported.keys() == merged.keys() and all(t.dtype == torch.bfloat16 for t in exported.values())
    assert all(torch.equal(exported[k], merged[k]) for k in exported)

CRASH_AT_STEP_3 = """
import sys
import peftkit.train as pt
real, calls = pt._step, []
def step(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        raise RuntimeError("a bug at step 3")
    return real(*args, **kwargs)
pt._step = step
from peftkit.cli import main
sys.argv = ["peftkit", "train", sys.argv[1]]
main()
"""


def test_a_crash_with_data_workers_ends_the_process(tiny_llama, number_data, tmp_path):
    """An unexpected error in training with data.num_workers > 0 printed its traceback and then hung for ever: the
    traceback kept the data loader alive to the interpreter's exit, which waited on workers that ignore SIGTERM."""
    recipe = make_recipe(tmp_path, tiny_llama, number_data, data={"num_workers": 2}, training={"max_steps": 20},
                         eval={"base_model": False})
    (tmp_path / "crash.py").write_text(CRASH_AT_STEP_3)
    done = subprocess.run([sys.executable, str(tmp_path / "crash.py"), str(recipe)], capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 1 and "RuntimeError: a bug at step 3" in done.stderr, done.stderr[-2000:]


def test_same_seed_same_bits_with_accumulation_and_workers(tiny_llama, number_data, tmp_path):
    """Bit-identical adapters across runs; data loader workers do not change the data order."""
    shas = []
    for i, workers in enumerate([0, 2]):
        recipe = make_recipe(tmp_path / str(i), tiny_llama, number_data,
                             training={"max_steps": 5, "batch_size": 2, "grad_accum": 2},
                             data={"num_workers": workers}, adapter={"dropout": 0.1}, eval={"base_model": False})
        train(load_recipe(recipe))
        shas.append(_adapter_sha(tmp_path / str(i) / "run"))
    assert shas[0] == shas[1]
    other = make_recipe(tmp_path / "seed1", tiny_llama, number_data,
                        training={"max_steps": 5, "batch_size": 2, "grad_accum": 2, "seed": 1},
                        adapter={"dropout": 0.1}, eval={"base_model": False})
    train(load_recipe(other))
    assert _adapter_sha(tmp_path / "seed1" / "run") != shas[0]


def test_accumulation_is_token_weighted(tiny_llama, number_data, tmp_path):
    """batch 4 x accum 1 and batch 2 x accum 2 see the same examples per step: the same first-step loss, and the
    same gradient (its pre-clip norm): each micro-batch's token sum is scaled by the whole window's token count,
    not averaged per micro-batch (whose rows hold different numbers of target tokens)."""
    firsts = []
    for bs, ga in [(4, 1), (2, 2)]:
        recipe = make_recipe(tmp_path / f"{bs}", tiny_llama, number_data,
                             training={"max_steps": 1, "batch_size": bs, "grad_accum": ga},
                             adapter={"dropout": 0.0}, data={"shuffle": False}, eval={"base_model": False})
        train(load_recipe(recipe))
        firsts.append(json.loads((tmp_path / f"{bs}" / "run" / "metrics.jsonl").read_text().splitlines()[0]))
    assert firsts[0]["loss"] == pytest.approx(firsts[1]["loss"], rel=1e-5)
    assert firsts[0]["grad_norm"] == pytest.approx(firsts[1]["grad_norm"], rel=1e-5)


def test_an_epoch_trains_every_example_once_whatever_grad_accum(tiny_llama, number_data, tmp_path):
    """64 rows in micro-batches of 5 are 13 micro-batches: with grad_accum 3, an epoch is 5 steps (windows of 3, 3, 3,
    3, 1), as transformers' Trainer has it. It was 4 steps that left the last micro-batch out, and windows ran
    across epochs. A resume from inside an epoch, before its short window, finishes bit-identically."""
    import shutil

    from peftkit.data import load_examples
    from peftkit.modeling import load_tokenizer

    recipe = make_recipe(tmp_path, tiny_llama, number_data, eval={"base_model": False},
                         training={"max_steps": None, "epochs": 2, "batch_size": 5, "grad_accum": 3, "save_steps": 2,
                                   "save_total_limit": 5, "max_grad_norm": None, "warmup_steps": 1})
    cfg = load_recipe(recipe)
    train(cfg)
    run = tmp_path / "run"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    examples = load_examples(load_tokenizer(cfg.model), cfg.data.train, "train", cfg.data)[0]
    every_token = sum(len(e.input_ids) for e in examples)
    assert [r["step"] for r in lines] == list(range(1, 11))
    assert lines[4]["tokens"] == every_token and lines[9]["tokens"] == 2 * every_token
    # The logged rate is the one the step applied: half of lr in the one warmup step (it was the next step's).
    assert lines[0]["lr"] == pytest.approx(0.5e-2) and lines[1]["lr"] == pytest.approx(1e-2)
    assert all(isinstance(r["grad_norm"], float) for r in lines)  # measured unclipped too (it was logged null)
    sha = _adapter_sha(run)
    for step in (6, 8, 10):
        shutil.rmtree(run / "checkpoints" / f"step-{step:08d}")
    (run / "manifest.json").unlink()
    train(load_recipe(recipe), resume=True)
    assert _adapter_sha(run) == sha


def test_a_warmup_longer_than_an_epochs_run_is_refused_before_loading(tiny_llama, number_data, tmp_path):
    from peftkit.errors import PeftkitError

    recipe = make_recipe(tmp_path, tiny_llama, number_data, training={"max_steps": None, "batch_size": 8,
                                                                      "warmup_steps": 10})
    with pytest.raises(PeftkitError, match=r"training.warmup_steps \(10\) is larger than the run's 8 optimizer steps "
                                           r"\(training.epochs 1 over 64 training examples"):
        train(load_recipe(recipe))


def test_a_warmup_as_long_as_the_run_is_said(tiny_llama, number_data, tmp_path):
    """warmup_steps == max_steps was accepted without a word: the learning rate never reaches training.lr."""
    from peftkit.errors import PeftkitWarning
    from peftkit.start_checks import _total_steps

    tcfg = load_recipe(make_recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 4, "warmup_steps": 4}))
    with pytest.warns(PeftkitWarning, match=r"training.warmup_steps \(4\) is the whole run: .* ends at 4/5 of "
                                            r"training.lr, never reaching it"):
        assert _total_steps(tcfg.training, 64, 1) == 4


def test_resume_after_sigkill_is_bit_identical(tiny_llama, number_data, tmp_path):
    """SIGKILL (no handler runs) once the first checkpoint (step 4) is written; resumed, the run crosses into the
    second epoch (16 steps an epoch) with dropout on, and ends with the unbroken run's adapter, byte for byte."""
    sections = dict(training={"max_steps": 24, "save_steps": 4, "batch_size": 2, "grad_accum": 2},
                    adapter={"dropout": 0.1}, eval={"base_model": False})
    straight = make_recipe(tmp_path / "a", tiny_llama, number_data, **sections)
    train(load_recipe(straight))

    killed = make_recipe(tmp_path / "b", tiny_llama, number_data, **sections)
    proc = subprocess.Popen([sys.executable, "-m", "peftkit", "train", str(killed)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    ckpts = tmp_path / "b" / "run" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not (ckpts.exists() and any(p.name.startswith("step-") for p in ckpts.iterdir())):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b" / "run" / "adapter").exists(), "killed too late to test anything"
    result = CliRunner().invoke(app, ["train", str(killed), "--resume"])
    assert result.exit_code == 0, result.output
    assert "Resumed from step-" in result.output
    assert _adapter_sha(tmp_path / "b" / "run") == _adapter_sha(tmp_path / "a" / "run")
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 25))


def test_verify_reproduces_and_reports_divergence(tiny_llama, number_data, tmp_path):
    recipe = make_recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 4}, eval={"base_model": False})
    train(load_recipe(recipe))
    run = tmp_path / "run"
    runner = CliRunner()
    assert runner.invoke(app, ["verify", str(run)]).exit_code == 0

    manifest = json.loads((run / "manifest.json").read_text())
    manifest["losses"][2] += 1e-3  # as if the third step had gone differently
    manifest["outputs_sha256"]["adapter/adapter_model.safetensors"] = "0" * 64
    (run / "manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["verify", str(run)])
    assert result.exit_code == 1
    assert "loss diverges first at step 3" in result.output
    assert "adapter/adapter_model.safetensors" in result.output


def test_lr_schedule_shapes():
    from peftkit.recipe import TrainingConfig

    cos = lr_lambda(TrainingConfig(max_steps=10, warmup_steps=2, scheduler="cosine"), 10)
    assert [round(cos(s), 4) for s in (0, 1, 2, 6, 10)] == [0.3333, 0.6667, 1.0, 0.5, 0.0]
    lin = lr_lambda(TrainingConfig(max_steps=10, warmup_steps=0, scheduler="linear"), 10)
    assert lin(5) == pytest.approx(0.5)
    const = lr_lambda(TrainingConfig(max_steps=10, warmup_steps=0, scheduler="constant"), 10)
    assert const(9) == 1.0


def test_warmup_ratio_counts_steps_as_transformers_does():
    """training.warmup_ratio: the warmup is ceil(ratio x steps), transformers' TrainingArguments.get_warmup_steps."""
    from transformers import TrainingArguments

    from peftkit.recipe import TrainingConfig
    from peftkit.runtime import warmup_steps

    for ratio, total in ((0.15, 10), (0.1, 37), (0.5, 3), (0.01, 1000)):
        expected = TrainingArguments("unused", warmup_steps=ratio).get_warmup_steps(total)
        assert warmup_steps(TrainingConfig(warmup_ratio=ratio), total) == expected
        ratio_schedule = lr_lambda(TrainingConfig(warmup_ratio=ratio), total)
        steps_schedule = lr_lambda(TrainingConfig(warmup_steps=expected), total)
        assert [ratio_schedule(s) for s in range(total)] == [steps_schedule(s) for s in range(total)]


def test_min_lr_ratio_ends_the_decay_above_zero_as_transformers_does():
    """training.min_lr_ratio: cosine decays to that share of lr, as transformers'
    get_cosine_with_min_lr_schedule_with_warmup (min_lr_rate) after the warmup; linear ends there too."""
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    from peftkit.recipe import TrainingConfig

    parameter = torch.nn.Parameter(torch.zeros(1))
    reference = get_cosine_with_min_lr_schedule_with_warmup(torch.optim.SGD([parameter], lr=1.0), 0, 20,
                                                            min_lr_rate=0.1)
    expected = []
    for _ in range(21):
        expected.append(reference.get_last_lr()[0])
        reference.optimizer.step()
        reference.step()
    cosine = lr_lambda(TrainingConfig(min_lr_ratio=0.1), 20)
    assert [cosine(s) for s in range(21)] == pytest.approx(expected, abs=1e-12)
    assert cosine(20) == pytest.approx(0.1) and cosine(0) == 1.0
    linear = lr_lambda(TrainingConfig(scheduler="linear", min_lr_ratio=0.2, warmup_steps=4), 14)
    assert [linear(s) for s in (0, 4, 9, 14)] == pytest.approx([0.2, 1.0, 0.6, 0.2])
    plain = lr_lambda(TrainingConfig(), 20)
    at_zero = lr_lambda(TrainingConfig(min_lr_ratio=0.0), 20)
    assert [plain(s) for s in range(21)] == [at_zero(s) for s in range(21)]


def _transformers_factors(schedule, steps: int) -> list[float]:
    """A transformers schedule's factor at steps 0..steps-1, stepped as its Trainer steps it."""
    factors = []
    for _ in range(steps):
        factors.append(schedule.get_last_lr()[0])
        schedule.optimizer.step()
        schedule.step()
    return factors


@pytest.mark.parametrize(("training", "total", "decay_steps"), [
    ({}, 20, 2),
    ({"warmup_steps": 3, "decay_ratio": 0.3, "decay_type": "linear", "min_lr_ratio": 0.1}, 25, 8),  # 7.5 rounded up
    ({"warmup_ratio": 0.1, "decay_ratio": 0.25, "decay_type": "1-sqrt", "min_lr_ratio": 0.05}, 37, 10),
    ({"warmup_steps": 4, "decay_ratio": 1.0}, 10, 6),  # the decay stops at the warmup's end
])
def test_wsd_is_transformers_get_wsd_schedule_after_the_warmup(training, total, decay_steps):
    """scheduler wsd: after the warmup, transformers' get_wsd_schedule with the same warmup, decay steps, decay_type
    and min_lr_ratio, step by step to the run's end; the warmup is peftkit's own, (s + 1) / (warmup + 1)."""
    from transformers.optimization import get_wsd_schedule

    from peftkit.recipe import TrainingConfig
    from peftkit.runtime import warmup_steps

    cfg = TrainingConfig(scheduler="wsd", **training)
    warmup = warmup_steps(cfg, total)
    parameter = torch.nn.Parameter(torch.zeros(1))
    reference = get_wsd_schedule(torch.optim.SGD([parameter], lr=1.0), warmup, decay_steps, total,
                                 decay_type=cfg.decay_type, min_lr_ratio=cfg.min_lr_ratio)
    expected = _transformers_factors(reference, total + 1)
    wsd = lr_lambda(cfg, total)
    assert [wsd(s) for s in range(warmup, total + 1)] == pytest.approx(expected[warmup:], abs=1e-12)
    assert [wsd(s) for s in range(warmup)] == [(s + 1) / (warmup + 1) for s in range(warmup)]
    assert [wsd(s) for s in range(warmup, total - decay_steps + 1)] == [1.0] * (total - decay_steps - warmup + 1)
    assert wsd(total - 1) < 1.0 and wsd(total) == pytest.approx(cfg.min_lr_ratio)
    whole = lr_lambda(TrainingConfig(scheduler="wsd", warmup_steps=4, decay_ratio=1.0), 10)
    cosine = lr_lambda(TrainingConfig(warmup_steps=4), 10)
    assert [whole(s) for s in range(11)] == [cosine(s) for s in range(11)]


def test_a_wsd_run_applies_its_schedule_and_resumes_to_the_same_bits(tiny_llama, number_data, tmp_path):
    """A wsd run killed after step 2, before its decay, and resumed gives the unbroken run's adapter; each step
    logged the rate of its schedule (a warmup step, two at lr, three decaying to min_lr_ratio)."""
    from tests.conftest import check_resumes_to_the_same_bits

    training = {"max_steps": 6, "save_steps": 2, "save_total_limit": 5, "lr": 1e-2, "scheduler": "wsd",
                "warmup_steps": 1, "decay_ratio": 0.5, "min_lr_ratio": 0.1}
    recipe = make_recipe(tmp_path, tiny_llama, number_data, training=training)
    check_resumes_to_the_same_bits(recipe, tmp_path / "run", kill_after=2, steps=6)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    schedule = lr_lambda(load_recipe(recipe).training, 6)
    assert [r["lr"] for r in lines] == pytest.approx([1e-2 * schedule(s) for s in range(6)])
    assert [r["lr"] for r in lines][:4] == pytest.approx([0.5e-2, 1e-2, 1e-2, 1e-2])


@pytest.mark.parametrize(("training", "total"), [
    ({"num_cycles": 3}, 30), ({"num_cycles": 4, "warmup_steps": 5}, 27), ({"num_cycles": 2, "warmup_ratio": 0.1}, 13),
])
def test_cosine_with_restarts_is_transformers_hard_restarts_after_the_warmup(training, total):
    """scheduler cosine_with_restarts: after the warmup, transformers' get_cosine_with_hard_restarts_schedule_with_
    warmup with the same warmup and num_cycles, step by step to the run's end; the warmup is peftkit's own."""
    from transformers.optimization import get_cosine_with_hard_restarts_schedule_with_warmup

    from peftkit.recipe import TrainingConfig
    from peftkit.runtime import warmup_steps

    cfg = TrainingConfig(scheduler="cosine_with_restarts", **training)
    warmup = warmup_steps(cfg, total)
    parameter = torch.nn.Parameter(torch.zeros(1))
    reference = get_cosine_with_hard_restarts_schedule_with_warmup(torch.optim.SGD([parameter], lr=1.0), warmup,
                                                                   total, num_cycles=cfg.num_cycles)
    expected = _transformers_factors(reference, total + 1)
    restarts = lr_lambda(cfg, total)
    assert [restarts(s) for s in range(warmup, total + 1)] == pytest.approx(expected[warmup:], abs=1e-12)
    assert [restarts(s) for s in range(warmup)] == [(s + 1) / (warmup + 1) for s in range(warmup)]
    rises = sum(restarts(s + 1) > restarts(s) for s in range(warmup, total))
    assert rises == cfg.num_cycles - 1 and restarts(warmup) == 1.0  # each cycle after the first starts over
    one = lr_lambda(TrainingConfig(scheduler="cosine_with_restarts", warmup_steps=3), 20)
    cosine = lr_lambda(TrainingConfig(warmup_steps=3), 20)
    assert [one(s) for s in range(21)] == pytest.approx([cosine(s) for s in range(21)], abs=1e-12)


def test_a_cosine_with_restarts_run_resumes_to_the_same_bits(tiny_llama, number_data, tmp_path):
    """A cosine_with_restarts run (3 cycles of 2 steps) killed after step 2 and resumed gives the unbroken run's
    adapter; each step logged the rate of its schedule, back at lr at steps 3 and 5."""
    from tests.conftest import check_resumes_to_the_same_bits

    training = {"max_steps": 6, "save_steps": 2, "save_total_limit": 5, "lr": 1e-2, "warmup_steps": 0,
                "scheduler": "cosine_with_restarts", "num_cycles": 3}
    recipe = make_recipe(tmp_path, tiny_llama, number_data, training=training)
    check_resumes_to_the_same_bits(recipe, tmp_path / "run", kill_after=2, steps=6)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert [r["lr"] for r in lines] == pytest.approx([1e-2, 0.5e-2] * 3)


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit", "paged_adamw_32bit"])
def test_adam_betas_and_epsilon_reach_the_optimizer(optimizer):
    """training.adam_betas / adam_epsilon: one step of each AdamW optimizer with betas (0.5, 0.9) and eps 1e-3 is
    torch's reference AdamW's with them (those values move a step far from the defaults')."""
    from rich.console import Console

    from peftkit.recipe import TrainingConfig
    from peftkit.runtime import build_optimizer

    cfg = TrainingConfig(optimizer=optimizer, adam_betas=(0.5, 0.9), adam_epsilon=1e-3, lr=0.1)
    torch.manual_seed(0)
    ours, reference = torch.nn.Parameter(torch.randn(64, 64)), torch.nn.Parameter(torch.zeros(64, 64))
    reference.data.copy_(ours.data)
    step = build_optimizer(cfg, [ours], torch.device("cpu"), Console(quiet=True))
    expected = torch.optim.AdamW([reference], lr=0.1, betas=(0.5, 0.9), eps=1e-3, weight_decay=0.0)
    for _ in range(2):
        for p, opt in ((ours, step), (reference, expected)):
            p.grad = torch.linspace(-1e-3, 1e-3, 64 * 64).view(64, 64).clone()
            opt.step()
    tolerance = 2e-3 if "8bit" in optimizer else 1e-6  # (8-bit state)
    assert (ours - reference).abs().max() <= tolerance
    default = TrainingConfig(optimizer=optimizer, lr=0.1)
    other = torch.nn.Parameter(reference.data.clone())
    assert build_optimizer(default, [other], torch.device("cpu"), Console(quiet=True)).param_groups[0]["eps"] == 1e-8


@pytest.mark.parametrize(("training", "message"), [
    ({"warmup_steps": 2, "warmup_ratio": 0.1}, "warmup_steps (2) and warmup_ratio (0.1) both set the warmup; keep one"),
    ({"optimizer": "sgd", "adam_betas": [0.9, 0.95]}, "adam_betas and adam_epsilon are the AdamW optimizers', and "
                                                      "optimizer is sgd"),
    ({"adam_betas": [0.9, 1.0]}, "adam_betas [0.9, 1.0]: each beta is in [0, 1)"),
    ({"scheduler": "constant", "min_lr_ratio": 0.1}, "min_lr_ratio (0.1) is where cosine, linear and wsd decay end, "
                                                     "and scheduler is constant; remove it or use cosine, linear or wsd"),
    ({"scheduler": "cosine_with_restarts", "min_lr_ratio": 0.1}, "min_lr_ratio (0.1) is where cosine, linear and wsd "
                                                                 "decay end, and scheduler is cosine_with_restarts"),
    ({"scheduler": "cosine_with_restarts", "num_cycles": 0}, "'training.num_cycles' = 0: must be greater than or "
                                                             "equal to 1"),
    ({"num_cycles": 2}, "num_cycles (2) shapes the cosine_with_restarts scheduler, and scheduler is cosine; remove it "
                        "or use scheduler: cosine_with_restarts"),
    ({"scheduler": "wsd", "decay_ratio": 0}, "'training.decay_ratio' = 0: must be greater than 0"),
    ({"scheduler": "wsd", "decay_ratio": 1.5}, "'training.decay_ratio' = 1.5: must be less than or equal to 1"),
    ({"decay_ratio": 0.2}, "decay_ratio (0.2) shapes the wsd scheduler, and scheduler is cosine; remove it or use "
                           "scheduler: wsd"),
    ({"scheduler": "linear", "decay_type": "1-sqrt"}, "decay_type (1-sqrt) shapes the wsd scheduler, and scheduler is "
                                                      "linear; remove it or use scheduler: wsd"),
    ({"min_lr_ratio": 1.0}, "'training.min_lr_ratio' = 1.0: must be less than 1"),
    # one beta was "missing required key 'training.adam_betas'. Add 'adam_betas:' under 'training:'"
    ({"adam_betas": [0.9]}, "'training.adam_betas' = list: must be two numbers, [beta1, beta2] (default [0.9, 0.999])"),
    ({"adam_betas": 0.9}, "'training.adam_betas' = 0.9: must be two numbers, [beta1, beta2] (default [0.9, 0.999])"),
])
def test_optimizer_settings_that_conflict_are_recipe_errors(training, message, tiny_llama, number_data, tmp_path,
                                                            monkeypatch, capsys):
    from tests.conftest import cli_user_error

    recipe = make_recipe(tmp_path, tiny_llama, number_data, training=training)
    err = " ".join(cli_user_error(monkeypatch, capsys, "validate", str(recipe)).split())
    assert message in err and f"{recipe}:" in err


@pytest.mark.parametrize(("scheduler", "message"), [
    ("cosine_with_min_lr", "cosine_with_min_lr is transformers' lr_scheduler_type; write scheduler: cosine, with "
                           "min_lr_ratio (transformers' min_lr_rate, or min_lr / lr)"),
    ("warmup_stable_decay", "warmup_stable_decay is transformers' lr_scheduler_type; write scheduler: wsd"),
    ("constant_with_warmup", "write scheduler: constant (peftkit's constant warms up first, over warmup_steps or "
                             "warmup_ratio)"),
    ("polynomial", "polynomial is transformers' lr_scheduler_type, and peftkit has no scheduler like it; use one of "
                   "cosine, linear, constant, wsd, cosine_with_restarts"),
    ("inverse_sqrt", "inverse_sqrt is transformers' lr_scheduler_type, and peftkit has no scheduler like it"),
    ("reduce_lr_on_plateau", "peftkit has no scheduler like it"),
    ("cosine_warmup_with_min_lr", "peftkit has no scheduler like it"),
    ("cosin", "'training.scheduler' = 'cosin': must be one of 'cosine', 'linear'"),
])
def test_a_transformers_scheduler_name_says_what_to_write(scheduler, message, tiny_llama, number_data, tmp_path,
                                                          monkeypatch, capsys):
    """transformers' lr_scheduler_type values (a recipe carried over from the Trainer or axolotl) were refused with
    the list of choices alone: the error now names peftkit's equivalent, or says there is none."""
    from tests.conftest import cli_user_error

    recipe = make_recipe(tmp_path, tiny_llama, number_data, training={"scheduler": scheduler})
    err = " ".join(cli_user_error(monkeypatch, capsys, "validate", str(recipe)).split())
    assert f"{recipe}:" in err and f"'training.scheduler' = '{scheduler}': " in err and message in err, err


def test_16bit_weights_on_a_cpu_without_bf16_matmuls_get_a_note(monkeypatch):
    from peftkit.runtime import cpu_dtype_note

    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    note = cpu_dtype_note("bfloat16", cpu)
    assert "model.dtype: bfloat16 on a CPU without native 16-bit matmuls" in note and "float32" in note
    assert "model.dtype: float16 on a CPU" in cpu_dtype_note("float16", cpu)
    assert cpu_dtype_note("bfloat16", torch.device("cuda", 0)) is None
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert cpu_dtype_note("bfloat16", cpu) is None
    assert cpu_dtype_note("float32", cpu) is None and cpu_dtype_note("auto", cpu) is None


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_fa_trains_b_only(use_dora, tiny_llama, number_data, tmp_path):
    """adapter.lora_fa through `peftkit train`: the exported A is bit for bit the seeded init, B (and DoRA's
    magnitude) moved, the parameter-count line counts B (and m) only, and the export is a plain PEFT LoRA."""
    from peftkit.adapters import adapter_layers, inject_adapters
    from peftkit.methods.lora import LoraConfig

    recipe = make_recipe(tmp_path, tiny_llama, number_data, adapter={"lora_fa": True, "use_dora": use_dora},
                         training={"max_steps": 4, "lr": 5e-2})
    result = CliRunner().invoke(app, ["train", str(recipe)])
    assert result.exit_code == 0, result.output
    fresh = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    torch.manual_seed(0)  # training.seed: what _setup seeds right before injecting
    inject_adapters(fresh, LoraConfig(r=4, alpha=8, use_dora=use_dora))
    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    layers = adapter_layers(fresh)
    for name, layer in layers.items():
        assert torch.equal(saved[f"base_model.model.{name}.lora_A.weight"], layer.lora_A.weight.detach()), name
        assert not torch.equal(saved[f"base_model.model.{name}.lora_B.weight"], layer.lora_B.weight.detach()), name
    trained = sum(layer.lora_B.weight.numel() + (layer.base_layer.weight.shape[0] if use_dora else 0)
                  for layer in layers.values())
    assert f"{trained:,} trainable" in result.output and "LoRA-FA (A frozen)" in result.output
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["use_dora"] is use_dora and "lora_fa" not in config  # peft reads it as LoRA


def test_lora_fa_refuses_an_embedding(tiny_llama):
    from peftkit.adapters import inject_adapters
    from peftkit.errors import PeftkitError
    from peftkit.methods.lora import LoraConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with pytest.raises(PeftkitError, match="adapter.lora_fa: 'model.embed_tokens' is an Embedding, whose LoRA A starts at zero"):
        inject_adapters(model, LoraConfig(r=4, lora_fa=True, target_modules=["embed_tokens", "q_proj"]))


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None,
                    reason="flash-attn on a CUDA device (scripts/gpu_check.sh runs it)")
def test_deterministic_runs_with_flash_attention_repeat_bit_for_bit(tiny_llama, number_data, tmp_path):
    """training.deterministic: true reaches flash-attn's kernels through FLASH_ATTENTION_DETERMINISTIC, which torch's
    switch does not: two runs give the same adapter bits."""
    hashes = []
    for i in range(2):
        recipe = make_recipe(tmp_path / str(i), tiny_llama, number_data,
                             model={"attn_implementation": "flash_attention_2", "dtype": "bfloat16", "device": "cuda"},
                             training={"max_steps": 5, "deterministic": True})
        train(load_recipe(recipe), show_summary=False)
        hashes.append(sha256_file(tmp_path / str(i) / "run" / "adapter" / "adapter_model.safetensors"))
    assert hashes[0] == hashes[1]


def test_train_on_all_trains_and_evaluates_every_token(tiny_llama, number_data, tmp_path, monkeypatch):
    """data.train_on: all puts the loss on the prompt too, in training and in the run's evaluation, and
    `peftkit eval RUN_DIR` gives that run's final eval loss; the base's loss over every token is another figure."""
    from peftkit.cli import main

    summaries = {}
    for train_on in ("answers", "all"):
        (tmp_path / train_on).mkdir()
        recipe = make_recipe(tmp_path / train_on, tiny_llama, number_data, data={"train_on": train_on},
                             training={"max_steps": 2})
        summaries[train_on] = train(load_recipe(recipe), show_summary=False)
    assert summaries["all"]["base_eval_loss"] != summaries["answers"]["base_eval_loss"]
    out = tmp_path / "eval.json"
    monkeypatch.setattr("sys.argv", ["peftkit", "eval", str(tmp_path / "all" / "run"), "--json", str(out)])
    main()
    assert abs(json.loads(out.read_text())["loss"] - summaries["all"]["eval_loss"]) <= 1e-6


def test_a_held_out_slice_of_the_training_file_is_the_runs_eval(tiny_llama, number_data, tmp_path, monkeypatch):
    """data.eval the training file itself, sliced apart (train_split train[:75%], eval_split train[75%:]): the run
    evaluates on the held-out rows, and `peftkit eval RUN_DIR` reads the same slice."""
    from peftkit.cli import main

    data = {"eval": str(number_data["train"]), "train_split": "train[:75%]", "eval_split": "train[75%:]"}
    recipe = make_recipe(tmp_path, tiny_llama, number_data, data=data, training={"max_steps": 2})
    summary = train(load_recipe(recipe), show_summary=False)
    out = tmp_path / "eval.json"
    for args in ([str(tmp_path / "run")], ["--model", str(tiny_llama), "--adapter", str(tmp_path / "run" / "adapter"),
                                           "--data", str(number_data["train"]), "--split", "train[75%:]",
                                           "--max-length", "128"]):
        monkeypatch.setattr("sys.argv", ["peftkit", "eval", *args, "--json", str(out)])
        main()
        assert abs(json.loads(out.read_text())["loss"] - summary["eval_loss"]) <= 1e-6
    monkeypatch.setattr("sys.argv", ["peftkit", "eval", str(tmp_path / "run"), "--data", str(number_data["train"]),
                                     "--json", str(out)])
    main()  # the whole file: another figure
    assert abs(json.loads(out.read_text())["loss"] - summary["eval_loss"]) > 1e-4


def test_an_older_run_with_a_local_split_name_still_evaluates_as_it_was_trained(tiny_llama, number_data, tmp_path,
                                                                                  monkeypatch, capsys):
    """A run made before local files were sliced may hold eval_split: validation for a local file, which read the
    whole file; it still does, with a warning, so `peftkit eval RUN_DIR` gives the run's final eval loss."""
    import yaml

    from peftkit.cli import main

    recipe = make_recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 1})
    summary = train(load_recipe(recipe), show_summary=False)
    saved = tmp_path / "run" / "recipe.yaml"
    older = yaml.safe_load(saved.read_text())
    older["data"]["eval_split"] = "validation"  # what such a run's recipe.yaml holds
    saved.write_text(yaml.safe_dump(older, sort_keys=False))
    out = tmp_path / "eval.json"
    monkeypatch.setattr("sys.argv", ["peftkit", "eval", str(tmp_path / "run"), "--json", str(out)])
    main()
    assert "split 'validation': a local file is one split, 'train', so every row is read" in capsys.readouterr().err
    assert abs(json.loads(out.read_text())["loss"] - summary["eval_loss"]) <= 1e-6


def test_neftune_noises_the_embeddings_in_training_only(tiny_llama):
    """training.neftune_noise_alpha: uniform noise within alpha / sqrt(length x hidden) on the input embeddings in
    training mode (TRL's NEFTune), none in evaluation."""
    from peftkit import neftune

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    ids = torch.randint(5, 90, (3, 11))
    plain = model.get_input_embeddings()(ids)
    neftune.attach(model, 5.0)
    bound = 5.0 / (11 * model.config.hidden_size) ** 0.5
    noise = model.train().get_input_embeddings()(ids) - plain
    assert 0.9 * bound < noise.abs().max() <= bound and noise.abs().min() < 0.1 * bound
    assert torch.equal(model.eval().get_input_embeddings()(ids), plain)


def test_neftune_under_torch_compile_compiles_once_for_every_length():
    """training.compile traces with dynamic shapes so that a batch's padded length never recompiles; the noise's bound
    was a Python float of the length, which torch.compile specialized on: each new length recompiled the step (a
    minute each with inductor on a CPU) until its limit of 8, after which the step ran uncompiled."""
    import torch._dynamo.testing

    from peftkit import neftune

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = torch.nn.Embedding(50, 16), torch.nn.Linear(16, 50)

        def get_input_embeddings(self):
            return self.embed

        def forward(self, ids):
            return self.head(self.embed(ids)).sum()

    model = Tiny().train()
    neftune.attach(model, 5.0)
    counter = torch._dynamo.testing.CompileCounter()
    step = torch.compile(model, backend=counter, dynamic=True)
    for length in (3, 5, 7, 9, 11, 13, 17, 19, 23, 29):
        step(torch.randint(0, 50, (2, length)))
    assert counter.frame_count == 1


def test_a_neftune_run_trains_otherwise_and_resumes_to_the_same_bits(tiny_llama, number_data, tmp_path):
    from tests.conftest import check_resumes_to_the_same_bits

    (tmp_path / "plain").mkdir()
    plain = make_recipe(tmp_path / "plain", tiny_llama, number_data, training={"max_steps": 4})
    train(load_recipe(plain), show_summary=False)
    without = load_file(tmp_path / "plain" / "run" / "adapter" / "adapter_model.safetensors")
    noisy = make_recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 4, "save_steps": 2,
                                                                     "neftune_noise_alpha": 5.0})
    check_resumes_to_the_same_bits(noisy, tmp_path / "run", 2, 4)
    noised = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert any(not torch.equal(without[k], noised[k]) for k in without)
