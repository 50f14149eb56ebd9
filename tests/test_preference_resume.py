"""Stopped and resumed preference runs (training.objective kto, reward, orpo, simpo; dpo's is in test_preference.py):
the resumed run's adapter bytes, metrics.jsonl lines and results are the unbroken run's, whatever the objective
carries besides an adapter (KTO's reference log-probabilities and per-batch KL estimate, a reward model's trained
`score` head and its optimizer state, the reward_center term); `peftkit verify` re-runs it to the same bits and
reports a tampered head or manifest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from conftest import make_recipe
from peftkit.recipe import load_recipe
from peftkit.reproduced import VARYING
from peftkit.tiny import write_jsonl
from peftkit.train import train
from peftkit.verify import verify

ADAPTER = Path("adapter") / "adapter_model.safetensors"


@pytest.fixture(scope="module")
def pairs_data(tmp_path_factory) -> dict[str, Path]:
    """Sums, the chosen answer right and the rejected one its negative (test_reward's)."""
    import random

    root, rng = tmp_path_factory.mktemp("pairs"), random.Random(0)
    for name, n in (("train", 32), ("eval", 8)):
        sums = [(rng.randint(1, 50), rng.randint(1, 50)) for _ in range(n)]
        write_jsonl(root / f"{name}.jsonl", [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(-a - b)}
                                             for a, b in sums])
    return {"train": root / "train.jsonl", "eval": root / "eval.jsonl"}


@pytest.fixture(scope="module")
def unpaired_data(tmp_path_factory) -> dict[str, Path]:
    """Sums, the right answer desirable and its negative not, in a random order (test_kto's)."""
    import random

    root, rng = tmp_path_factory.mktemp("unpaired"), random.Random(0)
    for name, n in (("train", 32), ("eval", 8)):
        rows = [(rng.randint(1, 50), rng.randint(1, 50), rng.random() < 0.5) for _ in range(n)]
        write_jsonl(root / f"{name}.jsonl", [{"prompt": f"{a}+{b}=", "completion": str(a + b) if good else
                                              str(-a - b), "label": good} for a, b, good in rows])
    return {"train": root / "train.jsonl", "eval": root / "eval.jsonl"}


def _recipe(tmp_path: Path, model: Path, data: dict, objective: str, **training) -> Path:
    """test_kto's, test_reward's and test_preference's recipes: `objective` on its data, a reward model's head."""
    recipe = make_recipe(tmp_path, model, data, adapter={"dropout": 0.0},
                         data={"format": "unpaired" if objective == "kto" else "preference", "max_length": 64},
                         training={"objective": objective, "lr": 2e-2, **training})
    return _with(recipe, model={"task": "sequence_classification"}) if objective == "reward" else recipe


def _steady(record: dict) -> dict:
    """A metrics line or the results without what no re-run repeats (time, speed, memory, where it resumed)."""
    return {k: v for k, v in record.items() if k not in VARYING}


def _records(run: Path) -> tuple[bytes, list[dict], dict]:
    """(the adapter's bytes, metrics.jsonl's lines, the manifest's results) of a finished run."""
    lines = [_steady(json.loads(x)) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return (run / ADAPTER).read_bytes(), lines, _steady(json.loads((run / "manifest.json").read_text())["metrics"])


def _stop_and_resume(recipe: Path, run: Path, stopped_at: int, steps: int) -> dict:
    """Train `recipe` straight to `run`; leave it as a run killed after step `stopped_at` (the later checkpoints, the
    export and the manifest gone, metrics.jsonl's later lines left for --resume to cut), resume it, and check the
    adapter's bytes, every metrics line (losses, the objective's figures, evaluations) and the results are the
    unbroken run's. The resumed run's summary."""
    train(load_recipe(recipe), console=Console(quiet=True))
    unbroken = _records(run)
    assert any("eval_loss" in line for line in unbroken[1]), unbroken[1]  # evaluations before and after the stop
    for step in range(stopped_at + 1, steps + 1):
        shutil.rmtree(run / "checkpoints" / f"step-{step:08d}", ignore_errors=True)
    shutil.rmtree(run / "adapter")
    (run / "manifest.json").unlink()
    summary = train(load_recipe(recipe), resume=True, console=Console(quiet=True))
    assert summary["resumed_at_step"] == stopped_at
    resumed = _records(run)
    assert resumed[0] == unbroken[0]
    assert resumed[1] == unbroken[1]
    assert resumed[2] == unbroken[2]
    return summary


def _with(recipe: Path, **sections) -> Path:
    raw = yaml.safe_load(recipe.read_text())
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    recipe.write_text(yaml.safe_dump(raw))
    return recipe


STOPPED = {"max_steps": 6, "save_steps": 2, "save_total_limit": 5, "eval_steps": 2}


@pytest.mark.filterwarnings("ignore:training.early_stopping.patience")
def test_a_stopped_kto_run_resumes_to_the_same_bits_figures_and_kl_and_verifies(tiny_llama, unpaired_data, tmp_path):
    """KTO's reference log-probabilities (of the answers and of their mismatched examples) are computed again at the
    resume to the same numbers: the KL estimate of every step and evaluation after it is the unbroken run's."""
    recipe = _with(_recipe(tmp_path, tiny_llama, unpaired_data, "kto", **STOPPED), export={"best": True},
                   training={"early_stopping": {"metric": "kl", "mode": "max", "patience": 10}})
    _stop_and_resume(recipe, tmp_path / "run", stopped_at=2, steps=6)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "kl" in x] == [1, 2, 3, 4, 5, 6]  # each step's KL estimate was logged
    evals = {x["step"]: x["eval_kl"] for x in lines if "eval_kl" in x}
    assert len(set(evals.values())) > 1  # and moved: a figure the resume had to repeat
    # export.best by the largest KL estimate: step 2's, before the stop (its weights came back from the checkpoint)
    assert max(evals, key=lambda step: (evals[step], -step)) == 2
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["metrics"]["best"]["step"] == 2
    report = verify(tmp_path / "run", console=Console(quiet=True))
    assert report.ok, report.differences


def _reward_run_recipe(tmp_path: Path, tiny_llama: Path, data: dict) -> Path:
    return _with(_recipe(tmp_path, tiny_llama, data, "reward", reward_center=0.01, **STOPPED),
                 adapter={"dropout": 0.1}, eval={"base_model": True})


def test_a_stopped_reward_model_resumes_with_its_head_and_its_optimizer_state_and_verifies(tiny_llama, pairs_data,
                                                                                          tmp_path):
    """The trained `score` head (modules_to_save) and its Adam moments come back from the checkpoint, the adapter's
    dropout masks from its random state, under a reward_center: the same bytes, lines and
    results, the base model's figures (its untrained head) included; verify passes."""
    from safetensors.torch import load_file

    recipe = _reward_run_recipe(tmp_path, tiny_llama, pairs_data)
    _stop_and_resume(recipe, tmp_path / "run", stopped_at=2, steps=6)
    heads = [k for k in load_file(tmp_path / "run" / ADAPTER) if "score" in k]
    assert heads, "the reward head is exported with the adapter"
    report = verify(tmp_path / "run", console=Console(quiet=True))
    assert report.ok, report.differences


@pytest.mark.filterwarnings("ignore:training.early_stopping.patience")
def test_a_reward_model_s_best_evaluation_before_the_stop_is_exported_head_and_all(tiny_llama, pairs_data, tmp_path):
    """export.best taken before the stop (the largest eval loss: step 2's) comes back from the checkpoint's best
    weights: the exported adapter is step 2's, its trained head included, as the unbroken run exported it."""
    from safetensors.torch import load_file

    recipe = _with(_reward_run_recipe(tmp_path, tiny_llama, pairs_data),
                   training={"early_stopping": {"metric": "loss", "mode": "max", "patience": 10}},
                   export={"best": True})
    _stop_and_resume(recipe, tmp_path / "run", stopped_at=2, steps=6)
    run = tmp_path / "run"
    assert json.loads((run / "manifest.json").read_text())["metrics"]["best"]["step"] == 2
    exported = load_file(run / ADAPTER)
    at_two = load_file(run / "checkpoints" / "step-00000002" / "adapter_model.safetensors")
    head = next(k for k in exported if "score" in k)
    assert exported[head].equal(next(v for k, v in at_two.items() if "score" in k))
    final = load_file(run / "checkpoints" / "step-00000006" / "adapter_model.safetensors")
    assert not exported[head].equal(next(v for k, v in final.items() if "score" in k))  # (the head trained on)


def test_verify_of_a_reward_model_reports_a_tampered_head_and_manifest(tiny_llama, pairs_data, tmp_path):
    """A reward head edited in adapter_model.safetensors is reported as changed after the run; edited with its hash
    made anew in the manifest, it is reported as not the re-run's; a manifest whose recorded reward figures were
    edited is reported at that figure."""
    from safetensors.torch import load_file, save_file

    from peftkit.fileio import sha256_file

    recipe = _with(_recipe(tmp_path, tiny_llama, pairs_data, "reward", max_steps=4, eval_steps=4, reward_center=0.01),
                   eval={"base_model": False})
    train(load_recipe(recipe), console=Console(quiet=True))
    run = tmp_path / "run"
    weights = load_file(run / ADAPTER)
    head = next(k for k in weights if "score" in k)
    weights[head] = weights[head] * 2
    save_file(weights, run / ADAPTER, metadata={"format": "pt"})

    report = verify(run, console=Console(quiet=True))
    assert not report.ok
    assert any(d.startswith(f"{ADAPTER.as_posix()} in {run} was changed after the run") for d in report.differences), \
        report.differences

    manifest = json.loads((run / "manifest.json").read_text())
    manifest["outputs_sha256"][ADAPTER.as_posix()] = sha256_file(run / ADAPTER)
    accuracy = manifest["metrics"]["eval_reward_accuracy"]
    manifest["metrics"]["eval_reward_accuracy"] = 1.0 - accuracy if accuracy != 0.5 else 0.25
    (run / "manifest.json").write_text(json.dumps(manifest))
    report = verify(run, console=Console(quiet=True))
    assert not report.ok
    said = "\n".join(report.differences)
    assert f"output {ADAPTER.as_posix()}" in said and "eval_reward_accuracy" in said, report.differences


@pytest.mark.parametrize("objective", ["dpo", "orpo", "simpo"])
def test_a_stopped_pair_run_resumes_to_the_same_lines_and_results(tiny_llama, pairs_data, tmp_path, objective):
    """DPO (its reference computed again; test_preference checks its adapter's bytes and verify), ORPO and SimPO (no
    reference, a base evaluation recorded again at the resume): the same bytes, metrics lines and results."""
    recipe = _recipe(tmp_path, tiny_llama, pairs_data, objective, **STOPPED)
    _stop_and_resume(recipe, tmp_path / "run", stopped_at=2, steps=6)


@pytest.mark.parametrize("objective", ["kto", "reward"])
def test_sigterm_in_a_real_process_resumes_and_verifies(tiny_llama, unpaired_data, pairs_data, tmp_path, objective):
    """`peftkit train` stopped by SIGTERM a few steps in (a checkpoint at that step, which no save_steps makes) and
    resumed in another process: verify's uninterrupted re-run gives the same bits, the stop checkpoint's included."""
    import signal
    import subprocess
    import sys
    import time

    from typer.testing import CliRunner

    from peftkit.cli import app

    steps = {"max_steps": 24, "eval_steps": 8, "batch_size": 2}
    recipe = (_recipe(tmp_path, tiny_llama, unpaired_data, "kto", **steps) if objective == "kto" else
              _recipe(tmp_path, tiny_llama, pairs_data, "reward", reward_center=0.01, **steps))
    proc = subprocess.Popen([sys.executable, "-m", "peftkit", "train", str(recipe)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    run, deadline = tmp_path / "run", time.time() + 120
    while time.time() < deadline and not ((run / "metrics.jsonl").exists()
                                          and (run / "metrics.jsonl").read_text().count("\n") >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "--resume" in err and "Traceback" not in err, err
    assert not (run / "adapter").exists(), "stopped too late to test anything"
    stops = [p.name for p in (run / "checkpoints").iterdir()]
    result = CliRunner().invoke(app, ["train", str(recipe), "--resume"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == list(range(1, 25))
    report = verify(run, console=Console(quiet=True))
    assert len(stops) == 1 and report.ok, (stops, report.differences)


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_a_stopped_run_from_init_from_takes_that_adapter_as_its_reference_again(tiny_llama, pairs_data,
                                                                                unpaired_data, tmp_path, objective):
    """adapter.init_from: the reference is computed after the injection, from the adapter started from, and the
    resume loads the checkpoint's weights only after it: its reference, and so every line and result after the stop,
    are the unbroken run's (had it taken the checkpoint's weights, the steps after the stop would have other
    rewards); verify passes."""
    from conftest import save_random_adapter
    from peftkit.methods.lora import LoraConfig

    sft = save_random_adapter(tiny_llama, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"),
                              tmp_path / "sft", seed=2, std=0.3)
    recipe = _recipe(tmp_path, tiny_llama, unpaired_data if objective == "kto" else pairs_data, objective, **STOPPED)
    raw = yaml.safe_load(recipe.read_text())
    raw["adapter"] = {"init_from": str(sft)}
    recipe.write_text(yaml.safe_dump(raw))
    _stop_and_resume(recipe, tmp_path / "run", stopped_at=2, steps=6)
    report = verify(tmp_path / "run", console=Console(quiet=True))
    assert report.ok, report.differences
