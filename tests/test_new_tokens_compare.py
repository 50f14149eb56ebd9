"""`peftkit eval RECIPE --adapter NAME=DIR` of a recipe with `model.add_tokens` beside an adapter that added none: the
base row is the recipe's base, its tokenizer and embeddings with the new tokens (the run's base evaluation), and the
adapter's row its evaluation alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from peftkit.methods.lora import LoraConfig
from peftkit.tiny import build_tiny_model, write_jsonl
from tests.conftest import make_recipe, save_random_adapter
from tests.test_new_tokens import MARKERS, _recipe, _train

ALPACA = [{"instruction": "Say it.", "input": str(i), "output": f"it is {i}"} for i in range(8)]


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama base without a chat template (`tests/test_new_tokens.py`'s)."""
    root = tmp_path_factory.mktemp("new-token-compare")
    build_tiny_model(root / "llama", arch="llama", hidden_size=32, num_layers=2, seed=0)
    for file in (root / "llama").glob("chat_template.*"):
        file.unlink()
    config = json.loads((root / "llama" / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (root / "llama" / "tokenizer_config.json").write_text(json.dumps(config))
    return {"llama": root / "llama"}


def _eval_json(monkeypatch, out: Path, *args: str) -> dict:
    from peftkit.cli import main

    monkeypatch.setattr("sys.argv", ["peftkit", "eval", *args, "--json", str(out)])
    main()
    return json.loads(out.read_text())


@pytest.mark.parametrize("data", ["chat", "alpaca"])
def test_the_base_row_is_the_recipe_s_base_with_the_new_tokens(data, bases, tmp_path, monkeypatch, capsys):
    """The shared base (the plain adapter's) lacks the new tokens' rows: the base row, evaluated on it with the
    recipe's tokenizer, was an error naming a token past its rows (the markers in chat data) or, where the data holds
    none of them (alpaca rows), the loss of a base without the new rows in its output head, not the run's base
    evaluation."""
    if data == "chat":
        rows = [[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]] * 8
        write_jsonl(tmp_path / "d.jsonl", [{"messages": r} for r in rows])
        recipe = _recipe(tmp_path, bases["llama"], {"train": tmp_path / "d.jsonl", "eval": tmp_path / "d.jsonl"},
                         training={"max_steps": 2})
    else:
        write_jsonl(tmp_path / "d.jsonl", ALPACA)
        files = {"train": tmp_path / "d.jsonl", "eval": tmp_path / "d.jsonl"}
        recipe = make_recipe(tmp_path, bases["llama"], files, training={"max_steps": 2})
        raw = yaml.safe_load(recipe.read_text())
        raw["model"]["add_tokens"] = MARKERS
        recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    _train(recipe, monkeypatch, capsys)
    base_eval = json.loads((tmp_path / "run" / "manifest.json").read_text())["metrics"]["base_eval_loss"]
    plain = save_random_adapter(bases["llama"], LoraConfig(r=2, target_modules=["q_proj", "v_proj"]),
                                tmp_path / "plain", seed=1)
    alone = _eval_json(monkeypatch, tmp_path / "alone.json", str(recipe), "--adapter", str(plain))
    rows = _eval_json(monkeypatch, tmp_path / "rows.json", str(recipe), "--adapter", f"plain={plain}",
                      "--adapter", f"tok={tmp_path / 'run' / 'adapter'}")
    assert rows["base"]["loss"] == pytest.approx(base_eval, abs=1e-6)
    assert rows["plain"]["loss"] == pytest.approx(alone["loss"], abs=1e-6)
    assert rows["plain"]["num_tokens"] == alone["num_tokens"]
    final = json.loads((tmp_path / "run" / "manifest.json").read_text())["metrics"]["eval_loss"]
    assert rows["tok"]["loss"] == pytest.approx(final, abs=1e-6)


@pytest.mark.parametrize(("objective", "chat"), [("orpo", True), ("simpo", False)])
def test_a_preference_comparison_s_base_row_has_the_new_tokens_too(objective, chat, bases, tmp_path, monkeypatch,
                                                                    capsys):
    """ORPO and SimPO score the base row on the model the adapters share: with model.add_tokens it lacked the new
    rows, an error on pairs with the markers, another loss than the run's base evaluation on pairs without them."""
    if chat:
        ask = [{"role": "user", "content": "2+2?"}]
        rows = [{"prompt": ask, "chosen": [{"role": "assistant", "content": "4"}],
                 "rejected": [{"role": "assistant", "content": "five"}]}] * 8
    else:
        rows = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": "no"} for i in range(8)]
    write_jsonl(tmp_path / "p.jsonl", rows)
    files = {"train": tmp_path / "p.jsonl", "eval": tmp_path / "p.jsonl"}
    recipe = make_recipe(tmp_path, bases["llama"], files, training={"max_steps": 2, "objective": objective},
                         data={"format": "preference", "chat_template": "chatml" if chat else None})
    raw = yaml.safe_load(recipe.read_text())
    raw["model"]["add_tokens"] = MARKERS
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    _train(recipe, monkeypatch, capsys)
    metrics = json.loads((tmp_path / "run" / "manifest.json").read_text())["metrics"]
    plain = save_random_adapter(bases["llama"], LoraConfig(r=2, target_modules=["q_proj", "v_proj"]),
                                tmp_path / "plain", seed=1)
    alone = _eval_json(monkeypatch, tmp_path / "alone.json", str(recipe), "--adapter", str(plain))
    rows = _eval_json(monkeypatch, tmp_path / "rows.json", str(recipe), "--adapter", f"plain={plain}",
                      "--adapter", f"tok={tmp_path / 'run' / 'adapter'}")
    assert rows["base"]["loss"] == pytest.approx(metrics["base_eval_loss"], abs=1e-6)
    assert rows["plain"]["loss"] == pytest.approx(alone["loss"], abs=1e-6)
    assert rows["tok"]["loss"] == pytest.approx(metrics["eval_loss"], abs=1e-6)


def test_the_arrow_row_reads_the_adapters_tokens(bases, tmp_path, monkeypatch, capsys):
    """--arrow routes plain LoRAs on the base they share: its row was evaluated with the recipe's tokenizer, whose new
    tokens that base has no rows for (an error on conversations with the markers). It is the row a recipe without
    model.add_tokens gives, the markers being text to these adapters."""
    rows = [[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]] * 4
    write_jsonl(tmp_path / "d.jsonl", [{"messages": r} for r in rows])
    files = {"train": tmp_path / "d.jsonl", "eval": tmp_path / "d.jsonl"}
    plain = make_recipe(tmp_path / "plain", bases["llama"], files, data={"format": "chat", "chat_template": "chatml"})
    tokens = _recipe(tmp_path / "tokens", bases["llama"], files)
    named = []
    for seed in (1, 2):
        out = save_random_adapter(bases["llama"], LoraConfig(r=2, target_modules=["q_proj", "v_proj"]),
                                  tmp_path / f"a{seed}", seed=seed)
        named += ["--adapter", f"a{seed}={out}"]
    with_tokens = _eval_json(monkeypatch, tmp_path / "t.json", str(tokens), *named, "--arrow")
    without = _eval_json(monkeypatch, tmp_path / "p.json", str(plain), *named, "--arrow")
    assert with_tokens["arrow"]["loss"] == pytest.approx(without["arrow"]["loss"], abs=1e-6)
    assert with_tokens["arrow"]["num_tokens"] == without["arrow"]["num_tokens"]
