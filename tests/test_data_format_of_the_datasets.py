"""data.format not set over a data.train list whose datasets all name one format (`_format_of_the_datasets`): a file
`peftkit eval|generate RECIPE --data FILE` names is read in that format whether or not the recipe has a data.eval,
and whatever format its sets read; a run's recipe.yaml writes it, so `peftkit eval RUN_DIR --data FILE` agrees."""

from __future__ import annotations

import sys

import pytest
import yaml

from peftkit.eval_job import eval_job

from peftkit.evaluate import evaluate
from peftkit.recipe import DataConfig, load_recipe
from peftkit.train import train
from tests.test_data_mix import _chat_file, _eval_flags, _quiet, _unformatted_recipe

C = {"path": "c.jsonl", "format": "chat"}


@pytest.mark.parametrize("eval_data", [None, {"x": {"path": "e.jsonl", "format": "text"}}, "e.jsonl"])
def test_data_format_is_the_datasets_one_format_with_or_without_a_set_that_reads_it(eval_data):
    """It was taken only where a set of data.eval read data.format: without data.eval, or with sets of their own
    formats only, data.format stayed alpaca, and `--data FILE` was read so."""
    assert DataConfig(train=[C, C | {"path": "d.jsonl"}], eval=eval_data).format == "chat"
    assert DataConfig(train=[C], eval=eval_data, format="alpaca").format == "alpaca"  # set: it wins
    assert DataConfig(train=[C, "a.jsonl"], eval=eval_data).format == "alpaca"  # a mix: the default


@pytest.mark.parametrize("case", ["no data.eval", "a set of its own format", "a set reading data.format"])
def test_eval_and_generate_read_a_data_file_in_the_datasets_format_whatever_data_eval_is(
        case, tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    """A recipe training on chat datasets alone, data.format not set: `peftkit eval RECIPE --data FILE` of a chat file
    gives the loss `--format chat` gives (it was a bad row 'missing field instruction' without a data.eval reading
    data.format), and `peftkit generate RECIPE --data FILE` the same answers as with `--format chat`."""
    from peftkit.cli import main

    other = str(_chat_file(tmp_path / "e.jsonl", 4, seed=5))
    eval_data = {"no data.eval": None, "a set of its own format": {"x": {"path": other, "format": "chat"}},
                 "a set reading data.format": other}[case]
    recipe = _unformatted_recipe(tmp_path, tiny_llama, number_data,
                                 [{"path": str(_chat_file(tmp_path / "c.jsonl", 12, seed=4)), "format": "chat"}],
                                 eval_data)
    assert "format" not in yaml.safe_load(recipe.read_text())["data"]
    file = str(_chat_file(tmp_path / "f.jsonl", 5, seed=6))
    loss = evaluate(eval_job(recipe, **_eval_flags(data=file)))["loss"]
    assert loss == evaluate(eval_job(recipe, **_eval_flags(data=file, fmt="chat")))["loss"]
    assert loss == evaluate(eval_job(None, **_eval_flags(model=str(tiny_llama), data=file, fmt="chat")))["loss"]

    def generated(*flags: str) -> str:
        monkeypatch.setattr(sys, "argv", ["peftkit", "generate", str(recipe), "--data", file, "--max-new-tokens", "3",
                                          *flags])
        main()
        return capsys.readouterr().out

    capsys.readouterr()
    answers = generated()
    assert answers.strip() and answers == generated("--format", "chat")


def test_a_run_without_data_eval_writes_the_datasets_format_and_eval_of_it_reads_data_in_it(tiny_llama, number_data,
                                                                                            tmp_path):
    """A run of chat datasets without data.eval writes data.format: chat in its recipe.yaml (it wrote alpaca), so
    `peftkit eval RUN_DIR --data FILE` of a chat file gives its adapter's loss read as chat."""
    recipe = _unformatted_recipe(tmp_path, tiny_llama, number_data,
                                 [{"path": str(_chat_file(tmp_path / "c.jsonl", 12, seed=4)), "format": "chat"}], None)
    train(load_recipe(recipe), console=_quiet())
    run = tmp_path / "run"
    assert yaml.safe_load((run / "recipe.yaml").read_text())["data"]["format"] == "chat"
    file = str(_chat_file(tmp_path / "f.jsonl", 5, seed=6))
    assert evaluate(eval_job(run, **_eval_flags(data=file)))["loss"] == evaluate(eval_job(
        None, **_eval_flags(model=str(tiny_llama), adapter=str(run / "adapter"), data=file, fmt="chat")))["loss"]
