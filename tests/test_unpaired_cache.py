"""Unpaired answers (data.format: unpaired, KTO's) in the tokenized-data cache (`peftkit.data.cache`): a second load
reads the answers, their mismatched examples, labels and counts the first kept, equal to a fresh tokenization; the
files, the data settings and the `chunk` the mismatched examples are made within each make another key; a KTO run
from the cache trains the same bits as one without."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
from rich.console import Console

from peftkit.data import unpaired
from conftest import make_recipe
from peftkit.data.unpaired import load_unpaired
from peftkit.modeling import load_tokenizer
from peftkit.recipe import DataConfig, ModelConfig, load_recipe
from peftkit.tiny import write_jsonl
from peftkit.train import train


def _rows(n: int, seed: int) -> list[dict]:
    """Sums, right (desirable) or negated (not), some answers long enough for a short data.max_length to cut."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b, good = rng.randint(1, 50), rng.randint(1, 50), rng.random() < 0.5
        answer = str(a + b) if good else str(-a - b)
        rows.append({"prompt": f"{a}+{b}=", "completion": answer * rng.randint(1, 6), "label": good})
    return rows


def _entries(root: Path) -> list[Path]:
    return sorted((root / "examples").glob("*.safetensors")) if (root / "examples").is_dir() else []


def _load(tok, path: Path, chunk: int = 4, cache: bool = True, **data):
    cfg = DataConfig(train=str(path), format="unpaired", **({"max_length": 64} | data))
    return load_unpaired(tok, str(path), None, cfg, chunk, cache=cache)


def _as_lists(data) -> tuple[list, list, list]:
    """The answers and their mismatched examples (token ids, labels), and whether each answer is desirable."""
    return ([(e.input_ids, e.labels) for e in data.examples], list(data.desirable), [len(data)])


@pytest.fixture()
def tok(tiny_llama):
    return load_tokenizer(ModelConfig(name_or_path=str(tiny_llama)))


def test_a_second_load_reads_the_answers_and_counts_kept_by_the_first(tok, tmp_path, monkeypatch):
    """The first load keeps one entry; the second reads it (nothing is tokenized: `build_unpaired` is not called) and
    gives the answers, their mismatched examples, labels and counts of a load without the cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("PEFTKIT_CACHE", str(cache))
    path = tmp_path / "train.jsonl"
    write_jsonl(path, [*_rows(30, seed=1), {"prompt": "1+1=", "label": True}])  # a bad row, skipped
    fresh = _load(tok, path, cache=False, max_length=12, on_bad_rows="skip")
    assert not _entries(cache)
    assert fresh[1]["bad_rows"] == 1 and fresh[1]["truncated"] > 0 and fresh[1]["examples"] == len(fresh[0]) == 30
    first = _load(tok, path, max_length=12, on_bad_rows="skip")
    assert len(_entries(cache)) == 1 and "cached" not in first[1]

    def tokenizes(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(unpaired, "build_unpaired", tokenizes)
    second = _load(tok, path, max_length=12, on_bad_rows="skip")
    assert second[1].pop("cached") == str(_entries(cache)[0])
    assert _as_lists(first[0]) == _as_lists(second[0]) == _as_lists(fresh[0])
    assert first[0].task_ids == second[0].task_ids == fresh[0].task_ids
    assert first[1] == second[1] == fresh[1]
    assert sum(second[0].desirable) not in (0, 30)  # (both labels, in the rows' order)


def test_the_files_the_settings_and_the_chunk_are_each_another_key(tok, tmp_path, monkeypatch):
    """Each change misses the entries before it (a new entry, no `cached`) and gives a fresh tokenization's answers;
    read again, the entry it kept gives them too. The chunk makes other mismatched examples of the same answers."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("PEFTKIT_CACHE", str(cache))
    path = tmp_path / "train.jsonl"
    rows = _rows(16, seed=2)
    write_jsonl(path, rows)
    changed = [{**rows[5], "completion": rows[5]["completion"][::-1] + "9"}]  # one answer's bytes

    variants = [("start", {}), ("a row's bytes", {}), ("max_length", {"max_length": 10}),
                ("truncation", {"max_length": 10, "truncation": "drop"}), ("chunk", {"chunk": 8}),
                ("another chunk", {"chunk": 2})]
    seen = []
    for i, (what, settings) in enumerate(variants):
        if what == "a row's bytes":
            write_jsonl(path, rows[:5] + changed + rows[6:])
        kept = _load(tok, path, **settings)
        assert "cached" not in kept[1] and len(_entries(cache)) == i + 1, what
        again = _load(tok, path, **settings)
        assert again[1].pop("cached"), what
        fresh = _load(tok, path, cache=False, **settings)
        assert _as_lists(kept[0]) == _as_lists(again[0]) == _as_lists(fresh[0]), what
        assert kept[1] == again[1] == fresh[1], what
        assert _as_lists(fresh[0]) not in seen, what  # (each key's examples are others: a stale read would show)
        seen.append(_as_lists(fresh[0]))
    by_chunk = {chunk: _load(tok, path, chunk=chunk)[0].examples for chunk in (2, 4, 8)}
    assert [e.input_ids for e in by_chunk[2]][::2] == [e.input_ids for e in by_chunk[8]][::2]  # the same answers,
    assert [e.input_ids for e in by_chunk[2]][1::2] != [e.input_ids for e in by_chunk[8]][1::2]  # other mismatches


def test_pairs_and_unpaired_answers_of_one_setting_are_apart(tok, tmp_path, monkeypatch):
    """The same file and settings read as another format is another entry (data.format is in the key)."""
    from peftkit.data.preference import load_pairs

    cache = tmp_path / "cache"
    monkeypatch.setenv("PEFTKIT_CACHE", str(cache))
    path = tmp_path / "both.jsonl"
    write_jsonl(path, [{"prompt": "1+1=", "chosen": "2", "rejected": "3", "completion": "2", "label": True},
                       {"prompt": "2+2=", "chosen": "4", "rejected": "5", "completion": "5", "label": False}])
    pairs, _ = load_pairs(tok, str(path), None, DataConfig(train=str(path), format="preference", max_length=64))
    answers, stats = _load(tok, path, chunk=2)
    assert "cached" not in stats and len(_entries(cache)) == 2 and answers.desirable == [True, False]
    assert _as_lists(answers) == _as_lists(_load(tok, path, chunk=2, cache=False)[0])
    assert [e.input_ids for e in pairs.examples] != [e.input_ids for e in answers.examples]


def test_a_kto_run_from_the_cache_trains_the_same_bits(tiny_llama, tmp_path, monkeypatch):
    """data.train and data.eval, one file read in runs of a training batch (4) and of an evaluation batch (2): two
    entries. A second run reads both (said) and writes the adapter and losses of the first and of a run without the
    cache, which reads and keeps nothing."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("PEFTKIT_CACHE", str(cache))
    write_jsonl(tmp_path / "rows.jsonl", _rows(16, seed=3))
    files = {"train": tmp_path / "rows.jsonl", "eval": tmp_path / "rows.jsonl"}
    runs = {}
    for name, cached in (("first", True), ("second", True), ("without", False)):
        recipe = make_recipe(tmp_path / name, tiny_llama, files, data={"format": "unpaired", "max_length": 64},
                             adapter={"dropout": 0.0}, eval={"batch_size": 2, "samples": 0},
                             training={"objective": "kto", "lr": 2e-2, "max_steps": 4, "eval_steps": 2})
        shown = io.StringIO()
        train(load_recipe(recipe), console=Console(file=shown, width=400), cache=cached)
        run = tmp_path / name / "run"
        metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        runs[name] = ((run / "adapter" / "adapter_model.safetensors").read_bytes(),
                      json.loads((run / "manifest.json").read_text())["losses"],
                      [m for m in metrics if "eval_loss" in m][-1]["eval_loss"])
        said = "16 training examples, read from the tokenized-data cache (" in shown.getvalue()
        assert said == (name == "second"), (name, shown.getvalue())
        assert len(_entries(cache)) == 2
    assert runs["first"] == runs["second"] == runs["without"]
