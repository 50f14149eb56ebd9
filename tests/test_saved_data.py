"""A directory `datasets` wrote with save_to_disk as a data entry (peftkit.data.saved). The independent computation is
the .jsonl file's own run: the same rows saved train its adapter bit for bit; its rows are named by index; the cache,
--resume's and verify's hashes see a rewritten dataset (and not the cache files `Dataset.map` leaves beside it)."""

from __future__ import annotations

import io
import json
import shutil

import datasets
import pytest
from rich.console import Console
from safetensors.torch import load_file

from peftkit.data import load_examples
from peftkit.errors import PeftkitError
from peftkit.manifest import source_hashes
from peftkit.recipe import DataConfig, is_hub_dataset, load_recipe
from peftkit.tiny import build_char_tokenizer, number_rows, write_jsonl
from peftkit.train import train
from peftkit.verify import verify
from tests.conftest import make_recipe

TOK = build_char_tokenizer()


@pytest.fixture(autouse=True)
def _quiet() -> None:
    datasets.disable_progress_bars()  # (save_to_disk's bar; peftkit's reads turn it off themselves)


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def _save(path, splits: dict[str, list[dict]] | list[dict]):
    """`rows` saved as a Dataset, or `{split: rows}` as a DatasetDict, with save_to_disk at `path`."""
    made = (datasets.Dataset.from_list(splits) if isinstance(splits, list)
            else datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()}))
    made.save_to_disk(str(path))
    return path


def _examples(path, split="train", **settings) -> tuple[list[tuple], dict]:
    cfg = DataConfig(train=str(path), **settings)
    examples, stats = load_examples(TOK, str(path), split, cfg)
    return [(e.input_ids, e.labels) for e in examples], stats


def test_a_datasetdict_trains_the_jsonl_run_bit_for_bit_and_verify_sees_it_rewritten(tiny_llama, number_data,
                                                                                       tmp_path):
    """number_data's train and eval rows saved as one DatasetDict (train, test), read at data.eval_split: test: the
    .jsonl run's adapter, bit for bit, and eval loss; the run records the train split's files. A read kept in the
    cache is read from it again after a `Dataset.map` of the dataset (which writes a cache file into the split's
    directory: no hash changes); rewritten (one answer changed), it is tokenized again, and `verify` names both
    datasets as changed."""
    saved = _save(tmp_path / "numbers", {"train": _rows(number_data["train"]), "test": _rows(number_data["eval"])})
    common = {"training": {"max_steps": 3}, "eval": {"base_model": False}}
    text = make_recipe(tmp_path / "a", tiny_llama, number_data, **common)
    ours = make_recipe(tmp_path / "b", tiny_llama, {"train": saved, "eval": saved}, data={"eval_split": "test"},
                       **common)
    theirs, summary = (train(load_recipe(r), show_summary=False) for r in (text, ours))
    adapters = [load_file(tmp_path / run / "run" / "adapter" / "adapter_model.safetensors") for run in "ab"]
    assert adapters[0].keys() == adapters[1].keys() and all(adapters[0][k].equal(adapters[1][k]) for k in adapters[0])
    assert summary["eval_loss"] == theirs["eval_loss"]
    recorded = json.loads((tmp_path / "b" / "run" / "manifest.json").read_text())["data_sha256"]
    assert sorted(recorded["train"]) == ["dataset_dict.json", "train/data-00000-of-00001.arrow",
                                         "train/dataset_info.json", "train/state.json"]

    first, stats = _examples(saved)  # (kept in the cache)
    datasets.load_from_disk(str(saved))["train"].map(lambda row: {"output": row["output"] + "!"})
    assert len(list((saved / "train").glob("cache-*.arrow"))) == 1
    assert source_hashes(str(saved), "train") == recorded["train"]
    hit, cached = _examples(saved)
    assert "cached" not in stats and "cached" in cached and hit == first

    rows = _rows(number_data["train"])
    rows[0]["output"] = "a changed answer"
    shutil.rmtree(saved)
    _save(saved, {"train": rows, "test": _rows(number_data["eval"])[:4]})
    write_jsonl(tmp_path / "changed.jsonl", rows)
    again, stats = _examples(saved)
    assert "cached" not in stats and again == _examples(tmp_path / "changed.jsonl")[0]
    report = verify(tmp_path / "b" / "run", console=Console(file=io.StringIO()))
    assert not report.ok
    for key in ("train", "eval"):
        assert f"data.{key}: the content of {saved} differs from the recorded one" in report.differences


def test_rows_are_named_by_index_and_bad_ones_counted_per_dataset(tmp_path):
    """A bad row is `DIR[i]` (`DIR[split][i]` in a DatasetDict's split), with its key, as a file's `FILE:LINE`;
    under on_bad_rows: skip a mix counts it per dataset. Tokenized rows (input_ids, labels) read as from .jsonl, a
    Dataset saved with set_format("torch") as Python values, and a slice of a split by its rows' own indices."""
    rows = number_rows(4, seed=1)
    alpaca = _save(tmp_path / "alpaca", [*rows[:2], {"instruction": "no output"}])
    with pytest.raises(PeftkitError, match=r"^" + str(alpaca) + r"\[2\]: missing field 'output' for data.format "
                                           r"'alpaca' \(each row needs instruction, output\)\. Fix the row"):
        _examples(alpaca)
    write_jsonl(tmp_path / "more.jsonl", [*rows[2:], {"input": "no instruction"}])
    mix = DataConfig(train=[str(alpaca), str(tmp_path / "more.jsonl")], on_bad_rows="skip")
    _, stats = load_examples(TOK, mix.train, None, mix, cache=False)
    assert stats["examples"] == 4 and stats["bad_rows_by_dataset"] == {"alpaca": 1, "more.jsonl": 1}

    write_jsonl(tmp_path / "d.jsonl", rows)
    expected, _ = _examples(tmp_path / "d.jsonl")
    ids = [{"input_ids": i, "labels": labels} for i, labels in expected]
    tokenized = _save(tmp_path / "ids", {"train": [ids[0], {"input_ids": [5, 500, 6], "labels": None}, *ids[1:]]})
    with pytest.raises(PeftkitError, match=r"^" + str(tokenized) + r"\[train\]\[1\]: input_ids\[1\] is 500, past "
                                           r"this tokenizer's"):
        _examples(tokenized, format="tokenized")
    assert _examples(tokenized, "train[2:]", format="tokenized")[0] == expected[1:]
    with pytest.raises(PeftkitError, match=r"\[train\]\[1\]"):  # (its index in the split, not in the slice)
        _examples(tokenized, "train[1:]", format="tokenized")
    as_torch = datasets.Dataset.from_list(rows)
    as_torch.set_format("torch")
    as_torch.save_to_disk(str(tmp_path / "torch"))
    assert _examples(tmp_path / "torch")[0] == expected


def test_a_split_it_lacks_and_a_directory_that_is_no_saved_dataset_are_errors(tiny_llama, number_data, tmp_path,
                                                                                monkeypatch):
    """A DatasetDict without the split asked (the default train too) is a recipe error at the key that sets the
    split, naming the splits there; a saved Dataset is one split, train; a directory without state.json or
    dataset_dict.json says what peftkit reads. `--data DIR` of one, relative, is no hub id."""
    rows = number_rows(2, seed=1)
    saved = _save(tmp_path / "qa", {"validation": rows, "test": rows})
    recipe = make_recipe(tmp_path, tiny_llama, {"train": saved, "eval": saved}, data={"eval_split": "test"})
    line = next(n for n, text in enumerate(recipe.read_text().splitlines(), 1) if text.lstrip().startswith("train:"))
    with pytest.raises(PeftkitError) as info:
        load_recipe(recipe)
    assert str(info.value) == (
        f"{recipe}:{line}: data.train: saved dataset {saved}: split 'train': 'train' is not a split of this "
        "DatasetDict, whose splits are 'validation', 'test'. Set data.train_split to a split it has.")
    with pytest.raises(PeftkitError, match=r"recipe.yaml \(--set data.train\): data.train\[0\]: saved dataset .*qa: "
                                           r"split 'valid': 'valid' is not a split of this DatasetDict, whose "
                                           r"splits are 'validation', 'test'\. Set data.train\[0\].split to a split "
                                           r"it has\.$"):
        load_recipe(recipe, [f"data.train=[{{path: {saved}, split: valid}}]"])
    one = _save(tmp_path / "one", rows)
    with pytest.raises(PeftkitError, match=r"split 'test': a saved Dataset \(not a DatasetDict\) is one split, "
                                           r"'train', which may be sliced"):
        _examples(one, "test")
    write_jsonl(tmp_path / "files" / "a.jsonl", rows)
    with pytest.raises(PeftkitError) as info:
        _examples(tmp_path / "files")
    assert str(info.value) == (
        f"Data path {tmp_path / 'files'} is a directory without state.json or dataset_dict.json, so not a dataset "
        "saved with datasets' save_to_disk (a Dataset's directory holds state.json beside its arrow files, a "
        "DatasetDict's dataset_dict.json and a directory a split). Point it at such a directory, or at a "
        ".json/.jsonl/.csv/.parquet/.txt file. It holds a.jsonl: name a file (a recipe's data.train may list several).")
    monkeypatch.chdir(tmp_path)
    assert not is_hub_dataset("one") and is_hub_dataset("files") and is_hub_dataset("org/name")


def test_a_datasetdict_with_an_empty_split_reads_its_other_splits_and_a_hyphenated_one(tmp_path):
    """A DatasetDict holding a split saved without rows (`Dataset.from_dict` of empty columns: its state.json names no
    arrow file) could not be read at any split: datasets' load_from_disk of the whole dict fails on that split with a
    bare IndexError, which came out as a traceback. Only the splits asked are loaded, and the empty one is empty."""
    rows = number_rows(3, seed=1)
    saved = tmp_path / "qa"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_dict({key: [] for key in rows[0]})}).save_to_disk(str(saved))
    assert json.loads((saved / "test" / "state.json").read_text())["_data_files"] == []
    reference, _ = _examples(_save(tmp_path / "one", rows))
    assert _examples(saved)[0] == _examples(saved, "train+test")[0] == reference
    with pytest.raises(PeftkitError, match=r"^No examples from .*qa: it has no rows"):
        _examples(saved, "test")
    # A split named outside datasets' split syntax (`train-sft`; `\w+(\.\w+)*` only) was refused as 'Unrecognized
    # instruction format'; it is read whole by its name.
    named = _save(tmp_path / "sft", {"train-sft": rows})
    assert _examples(named, "train-sft")[0] == reference


def test_an_eval_set_at_the_default_split_of_the_trained_datasetdict_is_an_error(tiny_llama, tmp_path):
    """`train: DIR` and `eval: DIR` of one saved DatasetDict (train, validation), data.eval_split unset: the eval set
    was read at its default, train, the rows trained on, silently. It is a recipe error naming the other splits (also
    where train reads a slice of train); a split the recipe sets, train too, is its choice; a Dataset has no other."""
    rows = number_rows(4, seed=1)
    saved = _save(tmp_path / "qa", {"train": rows, "validation": rows[:2]})
    recipe = make_recipe(tmp_path, tiny_llama, {"train": saved, "eval": saved})
    line = next(n for n, text in enumerate(recipe.read_text().splitlines(), 1) if text.lstrip().startswith("eval:"))
    for overrides in ([], ["data.train_split=train[:50%]"]):
        with pytest.raises(PeftkitError) as info:
            load_recipe(recipe, overrides)
        assert str(info.value).endswith(
            f"{line}: data.eval: saved dataset {saved} is read at split 'train' (data.eval_split's default), which "
            "data.train trains on; it has 'validation' too. Set data.eval_split (or the set's own `split`) to the "
            "split to evaluate on: data.eval_split: validation (data.eval_split: train to evaluate on the training "
            "rows)."), info.value
    for overrides in (["data.eval_split=validation"], ["data.eval_split=train"],
                      [f"data.eval={{general: {{path: {saved}, split: validation}}}}"]):
        load_recipe(recipe, overrides)
    one = _save(tmp_path / "one", rows)
    load_recipe(make_recipe(tmp_path / "b", tiny_llama, {"train": one, "eval": one}))
