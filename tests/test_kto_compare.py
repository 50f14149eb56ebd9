"""`peftkit eval RECIPE --adapter a=DIR --adapter b=DIR [--merged m=DIR]` on KTO's unpaired answers: each row's
figures are `peftkit eval --adapter DIR` of that model alone against the base (the reference computed once, each
answer with the mismatched example of its eval batch), the base row what KTO's formula gives the reference itself."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import cli_user_error, make_recipe, save_random_adapter
from peftkit.cli import app
from peftkit.kto import FIGURES
from peftkit.tiny import write_jsonl

DESIRABLE, UNDESIRABLE = 1.0, 1.5


@pytest.fixture(scope="module")
def unpaired(tmp_path_factory) -> dict[str, Path]:
    """Sums, the right answer desirable and its negative not, in a random order; 7 eval rows, so that an eval batch
    of 3 leaves a run of one at the end (its mismatched example is its own prompt and answer)."""
    root, rng = tmp_path_factory.mktemp("kto_cmp"), random.Random(0)
    for name, n in (("train", 8), ("eval", 7)):
        rows = []
        for _ in range(n):
            a, b, good = rng.randint(1, 50), rng.randint(1, 50), rng.random() < 0.5
            rows.append({"prompt": f"{a}+{b}=", "completion": str(a + b) if good else str(-a - b), "label": good})
        write_jsonl(root / f"{name}.jsonl", rows)
    return {"train": root / "train.jsonl", "eval": root / "eval.jsonl"}


def _recipe(tmp_path: Path, model: Path, data: dict) -> Path:
    return make_recipe(tmp_path, model, data, data={"format": "unpaired", "max_length": 64}, adapter={"dropout": 0.0},
                       training={"objective": "kto", "kto_beta": 0.5, "kto_desirable_weight": DESIRABLE,
                                 "kto_undesirable_weight": UNDESIRABLE}, eval={"batch_size": 3, "samples": 0})


def _eval(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "figures.json"
    result = CliRunner().invoke(app, ["eval", *args, "--json", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return json.loads(out.read_text())


def _lora(model: Path, out: Path, seed: int) -> Path:
    from peftkit.methods.lora import LoraConfig

    return save_random_adapter(model, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"), out,
                               seed=seed, std=0.3)


def _close(got: dict, want: dict, tol: float) -> bool:
    return all(abs(got[k] - want[k]) <= tol for k in FIGURES) and got["num_examples"] == want["num_examples"]


def test_a_kto_comparison_scores_each_row_against_the_base_as_eval_alone_does(tiny_llama, unpaired, tmp_path):
    """Two adapters and one merged: each adapter's row is `peftkit eval RECIPE --adapter DIR` of it alone (the
    recipe's eval.batch_size, 3, makes the mismatched examples and the KL estimate's batches), and without a recipe
    at --batch-size 2 `peftkit eval --adapter DIR --format unpaired --batch-size 2`'s (another KL estimate); the
    merged model's row its adapter's; the base row the reference against itself: rewards and KL 0, each answer's
    loss its weight / 2."""
    a, b = _lora(tiny_llama, tmp_path / "a", 1), _lora(tiny_llama, tmp_path / "b", 2)
    assert CliRunner().invoke(app, ["merge", "--adapter", str(a), "--output", str(tmp_path / "m")]).exit_code == 0
    recipe = _recipe(tmp_path / "r", tiny_llama, unpaired)
    rows = _eval(tmp_path, str(recipe), "--adapter", f"a={a}", "--adapter", f"b={b}", "--merged",
                 f"m={tmp_path / 'm'}")
    assert sorted(rows) == ["a", "b", "base", "m"]
    for name, adapter in (("a", a), ("b", b)):
        alone = _eval(tmp_path, str(recipe), "--adapter", str(adapter))
        assert _close(rows[name], alone, 1e-5), (name, rows[name], alone)
        assert rows[name]["kl"] > 0 and abs(rows[name]["reward_margin"]) > 1e-3  # (not the base's figures)
    assert _close(rows["m"], rows["a"], 1e-4), (rows["m"], rows["a"])
    labels = [json.loads(line)["label"] for line in unpaired["eval"].read_text().splitlines()]
    want = sum(DESIRABLE if good else UNDESIRABLE for good in labels) / 2 / len(labels)
    base = rows["base"]
    assert abs(base["loss"] - want) <= 1e-6 and base["num_examples"] == 7, (base, want)
    assert base["reward_margin"] == base["chosen_reward"] == base["rejected_reward"] == base["kl"] == 0.0
    assert rows["a"]["trainable_params"] > 0 and "trainable_params" not in rows["m"]

    data = ["--data", str(unpaired["eval"]), "--format", "unpaired", "--batch-size", "2"]  # (no recipe: KTO's defaults)
    two = _eval(tmp_path, "--model", str(tiny_llama), "--adapter", f"a={a}", *data)
    alone = _eval(tmp_path, "--adapter", str(a), *data)
    assert _close(two["a"], alone, 1e-5) and abs(two["a"]["kl"] - rows["a"]["kl"]) > 1e-4, (two["a"], alone)
    assert abs(two["base"]["loss"] - 0.5) <= 1e-6  # (both weights 1)
    # without --model: the base a and b (and m's peftkit.json merged_from) record, the same rows
    args = ["--adapter", f"a={a}", "--adapter", f"b={b}", "--merged", f"m={tmp_path / 'm'}", *data]
    recorded, given = _eval(tmp_path, *args), _eval(tmp_path, "--model", str(tiny_llama), *args)
    assert recorded == given and sorted(recorded) == ["a", "b", "base", "m"], (recorded, given)


def test_a_sequence_classifier_in_a_kto_comparison_is_refused(tiny_llama, unpaired, tmp_path, monkeypatch, capsys):
    """A reward model's adapter gives unpaired answers no log-probability: refused, as `peftkit eval` of it alone."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    lm, rm = _lora(tiny_llama, tmp_path / "lm", 1), tmp_path / "rm"
    base = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1)
    get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules="all-linear")
                   ).save_pretrained(rm)
    err = cli_user_error(monkeypatch, capsys, "eval", str(_recipe(tmp_path, tiny_llama, unpaired)),
                         "--adapter", f"lm={lm}", "--adapter", f"rm={rm}")
    assert ("'rm' is a sequence classifier, which scores an answer and gives it no log-probability, and unpaired "
            "answers (data.format 'unpaired') are scored by KTO's figures") in " ".join(err.split())
