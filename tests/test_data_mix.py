"""data.train as a list of datasets (axolotl's `datasets:`, LLaMA-Factory's `dataset: a,b`): the rows of each, read with
its own split and columns, concatenated in order; every message names the file and line of its row; each file is
hashed for --resume and verify; the tokenized-data cache keys the whole mix. And data.eval as several named sets
(TRL's eval_dataset dict): each evaluated beside the first, the primary one, as `peftkit eval` evaluates its file."""

import io
import json
import shutil
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from peftkit.data import describe_stats, load_examples
from peftkit.errors import PeftkitError
from peftkit.recipe import DataConfig, load_recipe
from peftkit.tiny import build_char_tokenizer, number_rows, write_jsonl
from peftkit.train import train
from tests.conftest import check_resumes_to_the_same_bits, cli_user_error, make_recipe
from tests.test_hub import hub_dataset  # noqa: F401 - a fixture

TOK = build_char_tokenizer()
ADAPTER = "adapter/adapter_model.safetensors"


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=1000)


@pytest.fixture
def two_files(tmp_path) -> tuple[Path, Path]:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_jsonl(a, number_rows(5, seed=1))
    write_jsonl(b, [{"question": r["input"], "answer": r["output"]} for r in number_rows(4, seed=2)])
    return a, b


def _pairs(examples) -> list[tuple[list[int], list[int]]]:
    return [(e.input_ids, e.labels) for e in examples]


def _b_as_alpaca(b: Path) -> Path:
    """b.jsonl's rows as alpaca rows of their own file: what a per-entry `columns` reads them as."""
    rows = [json.loads(line) for line in b.read_text().splitlines()]
    out = b.with_name("b_alpaca.jsonl")
    write_jsonl(out, [{"instruction": "Write the number in words.", "input": r["question"], "output": r["answer"]}
                      for r in rows])
    return out


def test_a_mix_s_examples_are_each_file_s_in_order_with_its_own_columns(two_files):
    a, b = two_files
    b_alpaca = _b_as_alpaca(b)
    rows = [json.loads(line) for line in b.read_text().splitlines()]
    b.write_text("".join(json.dumps({"instruction": "Write the number in words.", **r}) + "\n" for r in rows))
    mix = DataConfig(train=[str(a), {"path": str(b), "columns": {"input": "question", "output": "answer"}}],
                     max_length=128)
    examples, stats = load_examples(TOK, mix.train, mix.train_split, mix, cache=False)
    alone = [load_examples(TOK, str(path), "train", DataConfig(train=str(path), max_length=128), cache=False)[0]
             for path in (a, b_alpaca)]
    assert _pairs(examples) == _pairs(alone[0]) + _pairs(alone[1])
    assert stats["examples"] == stats["rows"] == 9


def test_each_entry_has_its_own_split(two_files):
    a, b = two_files
    mix = DataConfig(train=[str(a), {"path": str(b), "split": "train[:2]", "columns": {"input": "question",
                                                                                       "output": "answer",
                                                                                       "instruction": "question"}}],
                     train_split="train[:3]", max_length=128)
    examples, _ = load_examples(TOK, mix.train, mix.train_split, mix, cache=False)
    assert len(examples) == 3 + 2


def test_a_row_is_named_by_its_own_file_and_line_and_skipped_rows_are_counted_over_the_mix(two_files):
    a, b = two_files
    good = b.read_text()
    mix = DataConfig(train=[str(a), {"path": str(b), "columns": {"instruction": "question", "output": "answer"}}],
                     max_length=128)
    b.write_text(good + "{not json\n")
    with pytest.raises(PeftkitError, match=f"^{b}:5: not a valid JSON object"):
        load_examples(TOK, mix.train, mix.train_split, mix, cache=False)
    b.write_text(good + "\n" + json.dumps({"question": "1"}) + "\n")
    with pytest.raises(PeftkitError, match=f"^{b}:6: missing column 'answer' \\(data.train\\[1\\].columns.output\\)"):
        load_examples(TOK, mix.train, mix.train_split, mix, cache=False)
    b.write_text(good + "{not json\n" + json.dumps({"question": "1"}) + "\n")
    examples, stats = load_examples(TOK, mix.train, mix.train_split, mix.model_copy(update={"on_bad_rows": "skip"}),
                                    cache=False)
    assert len(examples) == 9 and stats["bad_rows"] == 2  # one unreadable line, one row without its answer
    assert describe_stats(stats, mix)[0] == "9 training examples; skipped 2 bad rows (b.jsonl 2; data.on_bad_rows: skip)"
    a.write_text(a.read_text() + "[]\n")
    _, stats = load_examples(TOK, mix.train, mix.train_split, mix.model_copy(update={"on_bad_rows": "skip"}),
                             cache=False)
    assert "skipped 3 bad rows (a.jsonl 1, b.jsonl 2; data.on_bad_rows: skip)" in describe_stats(stats, mix)[0]


def test_skipped_rows_of_a_file_listed_twice_or_of_two_files_of_one_name_are_all_counted(two_files, tmp_path):
    """A file listed twice (its two halves) counts both halves' bad rows; two files named alike in other directories
    are told apart. The per-file counts add up to the total."""
    a, _ = two_files
    a.write_text("[]\n" + a.read_text() + "[]\n" + a.read_text())  # a bad line in each half
    twice = DataConfig(train=[{"path": str(a), "split": "train[:50%]"}, {"path": str(a), "split": "train[50%:]"}],
                       max_length=128, on_bad_rows="skip")
    _, stats = load_examples(TOK, twice.train, twice.train_split, twice, cache=False)
    assert "skipped 2 bad rows (a.jsonl 2; data.on_bad_rows: skip)" in describe_stats(stats, twice)[0]
    other = tmp_path / "other" / "a.jsonl"
    other.parent.mkdir()
    shutil.copyfile(a, other)
    alike = DataConfig(train=[str(a), str(other)], max_length=128, on_bad_rows="skip")
    _, stats = load_examples(TOK, alike.train, alike.train_split, alike, cache=False)
    assert f"skipped 4 bad rows ({a} 2, {other} 2; data.on_bad_rows: skip)" in describe_stats(stats, alike)[0]


def test_a_warning_about_a_row_names_its_entry_s_columns(two_files):
    """A special token's text in an answer is warned about in the data's words: for a row of an entry with its own
    columns, that entry's column (data.train[1].columns.output), not data.columns' field the file has not."""
    a, b = two_files
    write_jsonl(b, [{"question": "1", "answer": "one </s>."}])
    mix = DataConfig(train=[str(a), {"path": str(b), "columns": {"instruction": "question", "output": "answer"}}],
                     max_length=128)
    _, stats = load_examples(TOK, mix.train, mix.train_split, mix, cache=False)
    assert stats["special_text_first"] == f"{b}:1: column 'answer' (data.train[1].columns.output) holds '</s>'"


def test_the_cache_keys_the_whole_mix(two_files):
    a, b = two_files
    columns = {"instruction": "question", "output": "answer"}
    mix = DataConfig(train=[str(a), {"path": str(b), "columns": columns}], max_length=128)
    first, stats = load_examples(TOK, mix.train, mix.train_split, mix)
    assert "cached" not in stats
    again, stats = load_examples(TOK, mix.train, mix.train_split, mix)
    assert "cached" in stats and _pairs(again) == _pairs(first)
    for other in ([str(a), {"path": str(b), "columns": columns, "split": "train[:2]"}],  # an entry's split
                  [str(a), {"path": str(b), "columns": {**columns, "input": "question"}}],  # its columns
                  [{"path": str(b), "columns": columns}, str(a)]):  # the order
        changed = mix.model_copy(update={"train": DataConfig(train=other).train})
        examples, stats = load_examples(TOK, changed.train, changed.train_split, changed)
        assert "cached" not in stats and _pairs(examples) != _pairs(first), other
    b.write_text(b.read_text().replace('"answer": "', '"answer": "x'))  # a file's content
    examples, stats = load_examples(TOK, mix.train, mix.train_split, mix)
    assert "cached" not in stats and _pairs(examples) != _pairs(first)


def _mix_recipe(tmp_path: Path, tiny_llama: Path, number_data: dict, train_data, **sections) -> Path:
    return make_recipe(tmp_path, tiny_llama, number_data, data={"train": train_data}, eval={"base_model": False},
                       **sections)


def test_a_list_of_one_entry_trains_the_same_bits_as_the_plain_path(tiny_llama, number_data, tmp_path):
    plain = _mix_recipe(tmp_path / "plain", tiny_llama, number_data, str(number_data["train"]),
                        training={"max_steps": 3})
    listed = _mix_recipe(tmp_path / "listed", tiny_llama, number_data, [{"path": str(number_data["train"])}],
                         training={"max_steps": 3})
    for recipe in (plain, listed):
        train(load_recipe(recipe), console=_quiet())
    assert (tmp_path / "plain/run" / ADAPTER).read_bytes() == (tmp_path / "listed/run" / ADAPTER).read_bytes()


@pytest.fixture
def mix_run(tiny_llama, number_data, tmp_path) -> tuple[Path, Path, Path]:
    """A recipe training on two files (a checkpoint every 2 of 6 steps), and its run directory and second file."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_jsonl(a, number_rows(12, seed=3))
    write_jsonl(b, number_rows(12, seed=4))
    recipe = _mix_recipe(tmp_path, tiny_llama, number_data, [str(a), str(b)],
                         training={"max_steps": 6, "save_steps": 2, "save_total_limit": 10})
    return recipe, tmp_path / "run", b


def test_a_mix_resumes_to_the_same_bits(mix_run):
    recipe, run, _ = mix_run
    check_resumes_to_the_same_bits(recipe, run, kill_after=2, steps=6)


def test_a_changed_second_file_is_refused_by_resume_and_named_by_verify(mix_run):
    from peftkit.verify import verify

    recipe, run, b = mix_run
    train(load_recipe(recipe), console=_quiet())
    assert set(json.loads((run / "manifest.json").read_text())["data_sha256"]) == {"train[0]", "train[1]", "eval"}
    b.write_text(b.read_text() + json.dumps(number_rows(1, seed=5)[0]) + "\n")
    report = verify(run, console=_quiet())
    assert f"data.train[1]: the content of {b} differs from the recorded one" in report.differences
    shutil.rmtree(run / "checkpoints" / "step-00000006")
    (run / "manifest.json").unlink()
    with pytest.raises(PeftkitError, match=r"^--resume: data.train\[1\] file b.jsonl changed since checkpoint "
                                           "step-00000004 was written"):
        train(load_recipe(recipe), resume=True, console=_quiet())


def _recipe_text(tmp_path: Path, tiny_llama: Path, number_data: dict, train_yaml: str) -> Path:
    """A recipe whose data.train is `train_yaml` (list entries), from its line 3."""
    recipe = make_recipe(tmp_path, tiny_llama, number_data)
    raw = yaml.safe_load(recipe.read_text())
    data = raw.pop("data")
    del data["train"]
    recipe.write_text("data:\n  train:\n" + train_yaml + yaml.safe_dump({"data": data, **raw}, sort_keys=False)
                      .removeprefix("data:\n"))
    return recipe


@pytest.mark.parametrize(("entries", "line", "message"), [
    ("  - a.jsonl\n  - path: b.jsonl\n    colums: {answer: output}\n", 5,
     "unknown key 'colums' in data.train[1]. Did you mean 'columns'? Valid keys: path, split, columns, format."),
    ("  - a.jsonl\n  - path: b.jsonl\n    columns: {answr: output}\n", 5,
     "data.train[1].columns: 'answr' is not a field of data.format alpaca (instruction, output, input, task)"),
    ("  - a.jsonl\n  - split: train\n", 4, "missing required key 'data.train[1].path'."),
    ("  - a.jsonl\n  - 5\n", 4, ("'data.train[1]' = 5: must be a path or hub id, or {path: ..., split: ..., "
                                 "columns: {...}, format: ...}.")),
    ("  - a.jsonl\n  - path: ''\n", 4, "'data.train[1]' is empty."),
    # axolotl's `datasets: [{path: ..., type: ...}]`: its `type` is our `format`, its sharegpt our chat
    ("  - a.jsonl\n  - path: b.jsonl\n    type: alpaca\n", 5,
     "unknown key 'type' in data.train[1]. Did you mean 'format'? Valid keys: path, split, columns, format."),
    ("  - path: b.jsonl\n    type: sharegpt\n", 4, "unknown key 'type' in data.train[0]. Did you mean 'format'? "
     "axolotl's `type: sharegpt` is `format: chat` here. Valid keys: path, split, columns, format."),
])
def test_a_bad_entry_is_a_recipe_error_at_its_line(tiny_llama, number_data, tmp_path, monkeypatch, capsys, entries,
                                                    line, message):
    recipe = _recipe_text(tmp_path, tiny_llama, number_data, entries)
    err = " ".join(cli_user_error(monkeypatch, capsys, "validate", str(recipe)).split())
    assert f"{recipe}:{line}: {message}" in err, err


def test_an_empty_list_is_a_recipe_error(tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    recipe = make_recipe(tmp_path, tiny_llama, number_data, data={"train": []})
    err = " ".join(cli_user_error(monkeypatch, capsys, "validate", str(recipe)).split())
    assert f"{recipe}:" in err and ("'data.train' = list: an empty list; give a path or hub id, or a list of one or "
                                    "more.") in err


def test_one_mapping_for_data_train_or_a_list_for_data_eval_is_one_clear_problem(tiny_llama, number_data, tmp_path,
                                                                                  monkeypatch, capsys):
    """`data.train: {path: ...}` (an entry not in a list) said two problems, 'must be a valid string' and 'must be a
    valid list'; `data.eval: [...]` 'must be a valid string'. Each is now one problem saying what the key takes."""
    recipe = make_recipe(tmp_path, tiny_llama, number_data, data={"train": {"path": str(number_data["train"])}})
    err = " ".join(cli_user_error(monkeypatch, capsys, "validate", str(recipe)).split())
    assert "(1 problem)" in err and ("'data.train' = dict: must be a path or hub id, or a list of datasets (each a "
                                     "path or hub id or {path: ..., split: ..., columns: {...}, format: ...}); one dataset's {path: "
                                     "...} is a list of one: put '- ' before it.") in err, err
    recipe = make_recipe(tmp_path, tiny_llama, number_data, data={"eval": [str(number_data["eval"])]})
    err = " ".join(cli_user_error(monkeypatch, capsys, "validate", str(recipe)).split())
    assert ("'data.eval' = list: must be a path or hub id, or a mapping of names to datasets (`{NAME: path, NAME2: "
            "{path: ..., split: ..., columns: {...}, format: ...}}`); a list of datasets is data.train's.") in err, err


def test_validate_warns_of_a_missing_file_of_the_list(tiny_llama, number_data, tmp_path, capsys):
    from typer.testing import CliRunner

    from peftkit.cli import app

    recipe = make_recipe(tmp_path, tiny_llama, number_data,
                         data={"train": [str(number_data["train"]), {"path": "gone.jsonl"}]})
    result = CliRunner().invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 0, result.output
    assert f"warning: data.train[1] {tmp_path / 'gone.jsonl'} does not exist here" in " ".join(result.output.split())


def test_preview_shows_the_mix(tiny_llama, number_data, tmp_path, two_files):
    from peftkit.preview import preview

    a, b = two_files
    recipe = make_recipe(tmp_path, tiny_llama, number_data, data={
        "train": [str(a), {"path": str(b), "columns": {"instruction": "question", "output": "answer"}}]})
    console = Console(file=io.StringIO(), width=1000, no_color=True)
    shown = preview(load_recipe(recipe), 9, console)
    assert [built.where for built in shown] == [f"{a}:{i}" for i in range(1, 6)] + [f"{b}:{i}" for i in range(1, 5)]
    out = console.file.getvalue()
    assert f"data.train {a}, {b}: format alpaca" in out and "9 training examples" in out
    b.write_text(b.read_text() + "{not json\n")
    preview(load_recipe(recipe, ["data.on_bad_rows=skip"]), 1, console)
    assert "9 training examples; skipped 1 bad row (b.jsonl 1; data.on_bad_rows: skip)" in console.file.getvalue()


def test_a_classifier_s_classes_come_from_every_dataset_of_the_mix(tmp_path):
    from peftkit.data.classification import load_classification

    write_jsonl(tmp_path / "a.jsonl", [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}])
    write_jsonl(tmp_path / "b.jsonl", [{"sentence": "fine", "label": "meh"}, {"sentence": 5, "label": "pos"}])
    mix = DataConfig(train=[str(tmp_path / "a.jsonl"), {"path": str(tmp_path / "b.jsonl"),
                                                        "columns": {"text": "sentence"}}], format="classification")
    with pytest.raises(PeftkitError, match=f"^{tmp_path / 'b.jsonl'}:2: "):
        load_classification(TOK, mix.train, mix.train_split, mix)
    write_jsonl(tmp_path / "b.jsonl", [{"sentence": "fine", "label": "meh"}])
    examples, _, labels = load_classification(TOK, mix.train, mix.train_split, mix)
    assert len(examples) == 3 and sorted(labels.names) == ["meh", "neg", "pos"]


def test_a_classifier_s_bad_row_names_its_entry_s_columns(tmp_path):
    """A bad row of an entry with its own columns is told in that entry's columns (data.train[1].columns.text), as
    the other formats' rows are, not in data.columns, which that entry's rows were not read through."""
    from peftkit.data.classification import load_classification

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_jsonl(a, [{"body": "good", "label": "pos"}, {"body": "bad", "label": "neg"}])
    write_jsonl(b, [{"sentence": "fine", "label": "pos"}, {"sentence": 5, "label": "neg"}])
    mix = DataConfig(train=[str(a), {"path": str(b), "columns": {"text": "sentence"}}], columns={"text": "body"},
                     format="classification")
    with pytest.raises(PeftkitError) as bad:
        load_classification(TOK, mix.train, mix.train_split, mix)
    assert str(bad.value).startswith(f"{b}:2: column 'sentence' (data.train[1].columns.text) must be a string, got int "
                                     "for data.format 'classification' (each row needs sentence (as text), label)")
    write_jsonl(b, [{"sentence": "fine", "label": "pos"}, {"label": "neg"}])
    with pytest.raises(PeftkitError, match=r":2: missing column 'sentence' \(data.train\[1\].columns.text\)"):
        load_classification(TOK, mix.train, mix.train_split, mix)
    write_jsonl(a, [{"body": "good", "label": "pos"}, {"label": "neg"}])  # the entry without its own: data.columns
    with pytest.raises(PeftkitError, match=rf"^{a}:2: missing column 'body' \(data.columns.text\)"):
        load_classification(TOK, mix.train, mix.train_split, mix)


def test_a_mix_s_files_moved_is_the_same_run_and_an_entry_s_split_changed_is_not(tiny_llama, number_data, tmp_path):
    from peftkit.rundir import check_output_dir

    out = tmp_path / "run"
    out.mkdir()
    moved = Path(shutil.copytree(number_data["train"].parent, tmp_path / "moved"))
    first = _mix_recipe(tmp_path / "a", tiny_llama, number_data, [str(number_data["eval"]),
                                                                    {"path": str(number_data["train"])}])
    (out / "recipe.yaml").write_text(load_recipe(first).to_yaml())
    same = _mix_recipe(tmp_path / "b", tiny_llama, number_data, [str(moved / "eval.jsonl"),
                                                                   {"path": str(moved / "train.jsonl")}])
    assert "taken as the same run" in check_output_dir(out, load_recipe(same).to_yaml(), False, False)[0]
    other = _mix_recipe(tmp_path / "c", tiny_llama, number_data, [str(number_data["eval"]),
                                                                    {"path": str(number_data["train"]),
                                                                     "split": "train[:50%]"}])
    with pytest.raises(PeftkitError, match=r"differs in data.train\[1\].split\)"):
        check_output_dir(out, load_recipe(other).to_yaml(), False, False)


def test_a_hub_dataset_in_a_mix_records_its_rows_and_commit(hub_dataset, tiny_llama, number_data, tmp_path):
    from peftkit.data.rows import rows_digest
    from tests.test_hub import DATASET, _publish_dataset

    recipe = _mix_recipe(tmp_path, tiny_llama, number_data, [str(number_data["eval"]),
                                                               {"path": DATASET, "split": "train[:10]"}],
                         training={"max_steps": 2, "save_steps": 2})
    train(load_recipe(recipe), console=_quiet())
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["data_sha256"]["train[1]"] == {"rows": rows_digest(number_rows(64, seed=1)[:10])}
    assert manifest["data_commits"] == {"train[1]": "a" * 40}
    rows = number_rows(64, seed=1)
    rows[5]["output"] = "five"
    _publish_dataset(hub_dataset, rows, "b" * 40, tmp_path)
    (tmp_path / "run" / "manifest.json").unlink()
    with pytest.raises(PeftkitError, match=r"^--resume: data.train\[1\]: the rows read from the hub changed since"):
        train(load_recipe(recipe), resume=True, console=_quiet())


def test_eval_and_generate_data_of_a_list_entry_read_it_with_its_own_columns(two_files, tiny_llama, tmp_path,
                                                                              monkeypatch, capsys):
    """`peftkit eval|generate RECIPE --data FILE` where FILE is a dataset of data.train's list with its own columns:
    its rows are read through those (they were read with data.columns, which names none of its fields), the file
    named however the command line writes it."""
    from peftkit.cli import main

    a, b = two_files
    rows = [json.loads(line) for line in b.read_text().splitlines()]
    b.write_text("".join(json.dumps({"instruction": "Write the number in words.", **r}) + "\n" for r in rows))
    recipe = make_recipe(tmp_path, tiny_llama, {"train": a, "eval": a}, data={
        "train": [str(a), {"path": str(b), "columns": {"input": "question", "output": "answer"}}]})
    monkeypatch.chdir(tmp_path)
    for command in (["eval", str(recipe), "--model", str(tiny_llama), "--data", "b.jsonl", "--json", "-"],
                    ["generate", str(recipe), "--model", str(tiny_llama), "--data", "./b.jsonl", "--limit", "2",
                     "--max-new-tokens", "2"]):
        monkeypatch.setattr("sys.argv", ["peftkit", *command])
        main()
        out = capsys.readouterr().out
        assert out.strip(), command
    cfg = load_recipe(recipe).data
    assert cfg.reading("b.jsonl").columns == {"input": "question", "output": "answer"}
    assert cfg.reading(str(a)).columns == {} and cfg.reading(str(a)).revision is None


def test_eval_and_generate_name_a_list_entry_s_columns_in_a_bad_row(two_files, tiny_llama, tmp_path, monkeypatch,
                                                                    capsys):
    """`peftkit eval|generate RECIPE --data FILE` of a dataset of data.train's list with its own columns read it
    through those, but a bad row was told in data.columns (`column 'answer' (data.columns.output)`), a key the recipe
    does not set; it now names the entry's, as training does."""
    a, b = two_files
    rows = [json.loads(line) for line in b.read_text().splitlines()]
    rows[1] |= {"question": 7, "answer": ""}
    write_jsonl(b, [{"instruction": "Write the number in words.", **r} for r in rows])
    recipe = make_recipe(tmp_path, tiny_llama, {"train": a, "eval": a}, data={
        "train": [str(a), {"path": str(b), "columns": {"input": "question", "output": "answer"}}]})
    monkeypatch.chdir(tmp_path)
    err = cli_user_error(monkeypatch, capsys, "eval", str(recipe), "--model", str(tiny_llama), "--data", "b.jsonl")
    assert "b.jsonl:2: column 'answer' (data.train[1].columns.output) is empty for data.format 'alpaca'" in err
    err = cli_user_error(monkeypatch, capsys, "generate", str(recipe), "--model", str(tiny_llama), "--data", "b.jsonl")
    assert "b.jsonl:2: column 'question' (data.train[1].columns.input) must be a string, got int" in err
    rows[1] |= {"question": "7", "answer": "seven</s>."}  # a warning about a row's text names it too
    write_jsonl(b, [{"instruction": "Write the number in words.", **r} for r in rows])
    cfg = load_recipe(recipe).data.reading("b.jsonl")
    _, stats = load_examples(TOK, "b.jsonl", "train", cfg, cache=False)
    assert stats["special_text_first"] == "b.jsonl:2: column 'answer' (data.train[1].columns.output) holds '</s>'"


def _chat_file(path: Path, n: int, seed: int) -> Path:
    write_jsonl(path, [{"messages": [{"role": "user", "content": r["input"]}, {"role": "assistant", "content": r["output"]}]}
                       for r in number_rows(n, seed=seed)])
    return path


def test_eval_and_generate_name_a_list_entry_s_format_in_a_bad_row(two_files, tiny_llama, tmp_path, monkeypatch,
                                                                   capsys):
    """`peftkit eval|generate RECIPE --data FILE` of a dataset of data.train's list with its own format read it in
    that format, but a bad row was told as one of data.format (`for data.format 'chat'`), a key the recipe does not
    set: it now names the entry's, as training does, and so do eval's other errors about the format (a tokenizer
    without a chat template, every row skipped). --format over it is named as the flag."""
    a, _ = two_files
    rows = [json.loads(line) for line in _chat_file(tmp_path / "c.jsonl", 3, seed=7).read_text().splitlines()]
    rows[1]["messages"][0]["role"] = "human"
    write_jsonl(tmp_path / "c.jsonl", rows)
    model = shutil.copytree(tiny_llama, tmp_path / "model")
    recipe = make_recipe(tmp_path, model, {"train": a, "eval": a}, data={
        "train": [str(a), {"path": str(tmp_path / "c.jsonl"), "format": "chat"}]})
    monkeypatch.chdir(tmp_path)
    for command in ("eval", "generate"):
        err = " ".join(cli_user_error(monkeypatch, capsys, command, str(recipe), "--data", "c.jsonl").split())
        assert ("c.jsonl:2: messages[0].role is 'human', not a chat role (system, user, assistant, tool, developer, "
                "ipython, function); rename it 'user' for data.train[1].format 'chat' (each row needs messages, or "
                "ShareGPT's conversations). Fix the row, set the right data.train[1].format (or pass --format") in err, (command, err)
    err = " ".join(cli_user_error(monkeypatch, capsys, "eval", str(recipe), "--data", "c.jsonl", "--on-bad-rows",
                                  "skip", "--format", "text").split())
    assert "missing the fields of --format 'text' (text); check --format," in err, err
    write_jsonl(tmp_path / "c.jsonl", [{"messages": "hi"}] * 2)
    err = " ".join(cli_user_error(monkeypatch, capsys, "eval", str(recipe), "--data", "c.jsonl", "--on-bad-rows",
                                  "skip").split())
    assert "all 2 rows were skipped as malformed or missing the fields of data.train[1].format 'chat' (messages, or " \
           "ShareGPT's conversations); check data.train[1].format," in err, err
    _chat_file(tmp_path / "c.jsonl", 3, seed=7)
    (model / "chat_template.jinja").unlink()
    err = " ".join(cli_user_error(monkeypatch, capsys, "eval", str(recipe), "--data", "c.jsonl").split())
    assert "c.jsonl:1: data.train[1].format is 'chat' but the tokenizer has no chat_template" in err, err


def test_a_bad_row_of_a_plain_path_in_a_mix_of_formats_names_data_format(two_files, tiny_llama, tmp_path,
                                                                          monkeypatch, capsys):
    """A path of data.train's list (no format of its own) beside an entry of another format had its bad row told as
    one of `data.train[0].format 'alpaca'`, a key the recipe does not hold (a str's `format` is its method, which
    passed for an entry's own format), in training and in `peftkit eval RECIPE --data FILE`: data.format, which it
    reads."""
    a, _ = two_files
    rows = [json.loads(line) for line in a.read_text().splitlines()]
    del rows[1]["output"]
    write_jsonl(a, rows)
    chat = _chat_file(tmp_path / "c.jsonl", 2, seed=7)
    recipe = make_recipe(tmp_path, tiny_llama, {"train": a, "eval": chat}, data={
        "train": [str(a), {"path": str(chat), "format": "chat"}], "eval": {"x": {"path": str(chat), "format": "chat"}}})
    said = f"{a}:2: missing field 'output' for data.format 'alpaca' (each row needs instruction, output). Fix the " \
           "row, set the right data.format"
    with pytest.raises(PeftkitError) as error:
        train(load_recipe(recipe), console=_quiet())
    assert str(error.value).startswith(said + ", or set data.on_bad_rows: skip."), str(error.value)
    err = " ".join(cli_user_error(monkeypatch, capsys, "eval", str(recipe), "--data", str(a)).split())
    assert said + " (or pass --format), or set data.on_bad_rows: skip (or pass --on-bad-rows skip)." in err, err


def test_a_bad_row_of_an_eval_set_with_its_own_format_names_its_format_key(two_files, tiny_llama, tmp_path,
                                                                          monkeypatch, capsys):
    """data.eval's set with a format of its own (`eval: {x: {path, format: chat}}`) had its bad rows told as rows of
    data.format ("set the right data.format"), which the recipe does not set for them: they name data.eval.x.format,
    in training, `peftkit eval RECIPE` and `peftkit eval RECIPE --data FILE`."""
    a, _ = two_files
    chat = _chat_file(tmp_path / "c.jsonl", 2, seed=7)
    with chat.open("a") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "1"}]}) + "\n")
    recipe = make_recipe(tmp_path, tiny_llama, {"train": a, "eval": chat}, data={
        "eval": {"x": {"path": str(chat), "format": "chat"}}}, training={"max_steps": 2, "eval_steps": 2})
    said = (f"{chat}:3: no assistant message to learn from for data.eval.x.format 'chat' (each row needs messages, "
            "or ShareGPT's conversations). Fix the row, set the right data.eval.x.format")
    with pytest.raises(PeftkitError) as error:  # (training has neither of eval's flags to name)
        train(load_recipe(recipe), console=_quiet())
    assert str(error.value) == said + ", or set data.on_bad_rows: skip.", str(error.value)
    for data in ([], ["--data", str(chat)]):
        err = " ".join(cli_user_error(monkeypatch, capsys, "eval", str(recipe), *data).split())
        assert said + " (or pass --format), or set data.on_bad_rows: skip (or pass --on-bad-rows skip)." in err, (
            data, err)


def test_each_entry_s_rows_are_tokenized_with_the_entry_s_own_format(two_files, tmp_path):
    """A mix of alpaca and chat files (axolotl's per-dataset `type:`): each row's ids and labels are those of a run on
    its file alone with its format; data.format is that of the entries without one."""
    a, _ = two_files
    chat = _chat_file(tmp_path / "c.jsonl", 3, seed=7)
    text = tmp_path / "t.jsonl"
    write_jsonl(text, [{"text": "one two"}, {"text": "three"}])
    mix = DataConfig(train=[str(a), {"path": str(chat), "format": "chat"}, {"path": str(text), "format": "text"}],
                     max_length=128)
    examples, stats = load_examples(TOK, mix.train, mix.train_split, mix, cache=False)
    alone = [load_examples(TOK, str(path), "train", DataConfig(train=str(path), format=fmt, max_length=128),
                           cache=False)[0] for path, fmt in ((a, "alpaca"), (chat, "chat"), (text, "text"))]
    assert _pairs(examples) == _pairs(alone[0]) + _pairs(alone[1]) + _pairs(alone[2])
    assert stats["examples"] == 5 + 3 + 2
    assert mix.reading(str(chat)).format == "chat" and mix.reading(str(a)).format == "alpaca"  # eval/generate --data
    chat_first = mix.model_copy(update={"format": "chat", "train": DataConfig(train=[
        {"path": str(a), "format": "alpaca"}, str(chat), {"path": str(text), "format": "text"}]).train})
    examples, _ = load_examples(TOK, chat_first.train, chat_first.train_split, chat_first, cache=False)
    assert _pairs(examples) == _pairs(alone[0]) + _pairs(alone[1]) + _pairs(alone[2])


def test_entries_giving_data_format_s_own_format_are_the_same_examples_and_cache_entry(two_files):
    a, b = two_files
    columns = {"instruction": "question", "output": "answer"}
    plain = DataConfig(train=[str(a), {"path": str(b), "columns": columns}], max_length=128)
    first, stats = load_examples(TOK, plain.train, plain.train_split, plain)
    assert "cached" not in stats
    said = DataConfig(train=[{"path": str(a), "format": "alpaca"}, {"path": str(b), "columns": columns,
                                                                   "format": "alpaca"}], max_length=128)
    again, stats = load_examples(TOK, said.train, said.train_split, said)
    assert "cached" in stats and _pairs(again) == _pairs(first)
    assert _pairs(load_examples(TOK, said.train, said.train_split, said, cache=False)[0]) == _pairs(first)


def test_the_cache_keys_each_entry_s_format(two_files, tmp_path):
    a, _ = two_files
    text = tmp_path / "t.jsonl"
    write_jsonl(text, [{"text": "one two", "prompt": "one", "completion": " two"}])
    mix = DataConfig(train=[str(a), {"path": str(text), "format": "text"}], max_length=128)
    first, _ = load_examples(TOK, mix.train, mix.train_split, mix)
    other = DataConfig(train=[str(a), {"path": str(text), "format": "completion"}], max_length=128)
    examples, stats = load_examples(TOK, other.train, other.train_split, other)
    assert "cached" not in stats and _pairs(examples) != _pairs(first)


def test_a_bad_row_of_a_chat_entry_is_named_by_its_file_and_line_and_counted_under_skip(two_files, tmp_path):
    a, _ = two_files
    chat = _chat_file(tmp_path / "c.jsonl", 2, seed=7)
    chat.write_text(chat.read_text() + json.dumps({"messages": [{"role": "user", "content": "1"}]}) + "\n")
    mix = DataConfig(train=[str(a), {"path": str(chat), "format": "chat"}], max_length=128)
    with pytest.raises(PeftkitError, match=fr"^{chat}:3: .*for data.train\[1\].format 'chat' .*set the right "
                                           r"data.train\[1\].format, or set data.on_bad_rows: skip\.$"):
        load_examples(TOK, mix.train, mix.train_split, mix, cache=False)
    skip = mix.model_copy(update={"on_bad_rows": "skip"})
    examples, stats = load_examples(TOK, skip.train, skip.train_split, skip, cache=False)
    assert len(examples) == 7
    assert describe_stats(stats, skip)[0] == "7 training examples; skipped 1 bad row (c.jsonl 1; data.on_bad_rows: skip)"


def test_a_mix_whose_rows_are_all_skipped_names_each_entry_s_format_and_fields(two_files, tiny_llama, number_data,
                                                                               tmp_path):
    """Every row of a mix of formats skipped: the message named data.format's fields alone, those of one entry's
    format; it now names each entry's format key and its fields (the entries of one format together)."""
    a, b = two_files
    chat, text = tmp_path / "c.jsonl", tmp_path / "t.jsonl"
    for path in (a, chat):  # completion rows: no entry's format reads them
        write_jsonl(path, [{"prompt": "1", "completion": "one"}])
    mix = DataConfig(train=[str(a), {"path": str(chat), "format": "chat", "columns": {}}, str(b),
                            {"path": str(text), "format": "text", "columns": {"text": "body"}}],
                     columns={"instruction": "question", "output": "answer"}, max_length=128, on_bad_rows="skip")
    write_jsonl(b, [{"question": "1"}])  # without its answer
    write_jsonl(text, [{"text": "one two"}])  # its text is in column body
    message = ("No examples from data.train (a.jsonl, c.jsonl, b.jsonl, t.jsonl): all 4 rows were skipped as "
               "malformed or missing the fields of their dataset's format: data.format 'alpaca' (question (as "
               "instruction), answer (as output)) for data.train[0] and data.train[2]; data.train[1].format 'chat' "
               "(messages, or ShareGPT's conversations) for data.train[1]; data.train[3].format 'text' (body (as "
               "text)) for data.train[3]; check those keys, or set data.on_bad_rows: error to see the first bad row.")
    with pytest.raises(PeftkitError) as caught:
        load_examples(TOK, mix.train, mix.train_split, mix, cache=False)
    assert str(caught.value) == message  # what train stops with; preview says the same
    from peftkit.preview import preview

    recipe = make_recipe(tmp_path, tiny_llama, number_data,
                         data=mix.model_dump(include={"train", "columns", "on_bad_rows"}, exclude_none=True))
    console = Console(file=io.StringIO(), width=1000, no_color=True)
    preview(load_recipe(recipe), 3, console)
    assert f"training would stop: {message}" in console.file.getvalue()


@pytest.mark.parametrize(("entries", "line", "message"), [
    ("  - a.jsonl\n  - path: b.jsonl\n    format: classification\n", 5,
     "data.train[1].format: classification is data.format's alone"),
    ("  - a.jsonl\n  - path: b.jsonl\n    format: chat\n    columns: {output: answer}\n", 6,
     ("data.train[1].columns: 'output' is not a field of data.train[1].format chat (messages, tools, conversations, "
      "system, task)")),
])
def test_an_entry_s_format_is_checked_and_its_columns_against_it(tiny_llama, number_data, tmp_path, monkeypatch,
                                                                   capsys, entries, line, message):
    recipe = _recipe_text(tmp_path, tiny_llama, number_data, entries)
    err = " ".join(cli_user_error(monkeypatch, capsys, "validate", str(recipe)).split())
    assert f"{recipe}:{line}: {message}" in err, err


def test_an_entry_s_format_with_a_classifier_and_data_columns_of_another_format_are_refused():
    with pytest.raises(ValueError, match=r"data.train\[1\].format: a classifier's datasets are all read as data.format "
                                         "classification"):
        DataConfig(train=["a.jsonl", {"path": "b.jsonl", "format": "text"}], format="classification")
    with pytest.raises(ValueError, match=r"data.columns: 'output' is not a field of data.train\[1\].format chat .*"
                                         r"give data.train\[1\] columns of its own"):
        DataConfig(train=["a.jsonl", {"path": "b.jsonl", "format": "chat"}], columns={"output": "answer"})
    assert DataConfig(train=["a.jsonl", {"path": "b.jsonl", "format": "chat", "columns": {}}],
                      columns={"output": "answer"}).train_sources()[1].columns == {}


def test_system_prompt_and_chat_template_serve_a_chat_entry(two_files, tmp_path):
    a, _ = two_files
    chat = _chat_file(tmp_path / "c.jsonl", 2, seed=7)
    mix = DataConfig(train=[str(a), {"path": str(chat), "format": "chat"}], system_prompt="Be brief.",
                     chat_template="chatml", max_length=256)
    assert mix.train_sources()[1].format == "chat"
    with pytest.raises(ValueError, match="data.system_prompt is the system message of chat conversations, and "
                                         "data.format is alpaca, and no dataset of data.train is chat"):
        DataConfig(train=[str(a), {"path": str(chat), "format": "text"}], system_prompt="Be brief.")
    tok = build_char_tokenizer()
    examples, _ = load_examples(tok, mix.train, mix.train_split, mix, cache=False)
    assert "Be brief." in tok.decode(examples[5].input_ids) and "Be brief." not in tok.decode(examples[0].input_ids)


def test_preview_shows_each_entry_in_its_format(tiny_llama, number_data, tmp_path, two_files):
    from peftkit.preview import preview

    a, _ = two_files
    chat = _chat_file(tmp_path / "c.jsonl", 2, seed=7)
    recipe = make_recipe(tmp_path, tiny_llama, number_data, data={
        "train": [{"path": str(a), "split": "train[:1]"}, {"path": str(chat), "format": "chat"}]})
    console = Console(file=io.StringIO(), width=1000, no_color=True)
    shown = preview(load_recipe(recipe), 3, console)
    assert [built.where for built in shown] == [f"{a}:1", f"{chat}:1", f"{chat}:2"]
    out = console.file.getvalue()
    assert f"data.train {a} (train[:1]), {chat} (format chat): format alpaca" in out
    assert "### Instruction" in out and "<|user|>" in out and "3 training examples" in out


def test_a_mix_of_formats_resumes_to_the_same_bits(tiny_llama, number_data, tmp_path):
    chat = _chat_file(tmp_path / "c.jsonl", 12, seed=4)
    recipe = _mix_recipe(tmp_path, tiny_llama, number_data, [str(number_data["train"]),
                                                               {"path": str(chat), "format": "chat"}],
                         training={"max_steps": 6, "save_steps": 2, "save_total_limit": 10})
    check_resumes_to_the_same_bits(recipe, tmp_path / "run", kill_after=2, steps=6)


def test_a_cached_warning_names_the_columns_key_of_the_read_that_asks(two_files, tiny_llama, tmp_path):
    """The tokenized-data cache keyed a dataset's examples by its columns but not by the key they came from, so a
    file read through data.columns, then as data.train[1]'s (`eval --data FILE`, the same columns), was handed the
    first read's counts: a warning about a row's text named data.columns.output, a key that recipe does not set."""
    a, b = two_files
    rows = [json.loads(line) for line in b.read_text().splitlines()]
    rows[1] |= {"answer": "seven</s>."}
    write_jsonl(b, [{"instruction": "Write the number in words.", **r} for r in rows])
    columns = {"input": "question", "output": "answer"}
    recipe = make_recipe(tmp_path, tiny_llama, {"train": a, "eval": a}, data={
        "train": [str(a), {"path": str(b), "columns": columns}]})
    cfg = load_recipe(recipe).data
    _, stats = load_examples(TOK, str(b), "train", cfg.model_copy(update={"train": str(b), "columns": columns}))
    assert stats["special_text_first"] == f"{b}:2: column 'answer' (data.columns.output) holds '</s>'"
    _, stats = load_examples(TOK, str(b), "train", cfg.reading(str(b)))
    assert stats["special_text_first"] == f"{b}:2: column 'answer' (data.train[1].columns.output) holds '</s>'"


def test_eval_and_generate_name_the_format_flag_in_errors_its_value_causes(two_files, tiny_llama, tmp_path,
                                                                          monkeypatch, capsys):
    """`peftkit eval|generate --format F` whose F the rows or the tokenizer cannot use told the user of data.format,
    a recipe key they had not set (there may be no recipe at all): each such error now names --format (a bad row,
    every row skipped, text without prompts, a tokenizer without a chat template or without an EOS)."""
    from transformers import AutoTokenizer

    a, _ = two_files
    model = shutil.copytree(tiny_llama, tmp_path / "model")
    recipe = make_recipe(tmp_path, model, {"train": a, "eval": a})
    fixes = {("eval", True): "Fix the row, pass the right --format, or pass --on-bad-rows skip.",  # no recipe
             ("eval", False): "Fix the row, pass the right --format, or set data.on_bad_rows: skip (or pass "
                              "--on-bad-rows skip).",
             ("generate", True): "Fix the row or pass the right --format.",  # (it has no --on-bad-rows)
             ("generate", False): "Fix the row, pass the right --format, or set data.on_bad_rows: skip."}
    for command in ("eval", "generate"):
        for source in (["--model", str(model)], [str(recipe)]):
            err = " ".join(cli_user_error(monkeypatch, capsys, command, *source, "--data", str(a), "--format",
                                          "chat").split())
            assert ("a.jsonl:1: missing field 'messages' for --format 'chat' (each row needs messages, or ShareGPT's "
                    f"conversations). {fixes[command, source[0] == '--model']}") in err, (command, source, err)
    err = " ".join(cli_user_error(monkeypatch, capsys, "eval", str(recipe), "--data", str(a), "--on-bad-rows", "skip",
                                  "--format", "chat").split())
    assert "all 5 rows were skipped as malformed or missing the fields of --format 'chat' (messages, or ShareGPT's " \
           "conversations); check --format," in err, err
    err = " ".join(cli_user_error(monkeypatch, capsys, "generate", str(recipe), "--data", str(a), "--format",
                                  "text").split())
    assert "--format 'text' has no prompt to generate from in " in err, err
    err = " ".join(cli_user_error(monkeypatch, capsys, "generate", "--model", str(model), "--data", str(a), "--format",
                                  "classification").split())
    assert "--format 'classification' has no prompt to generate from in " in err, err
    _chat_file(tmp_path / "c.jsonl", 2, seed=7)
    (model / "chat_template.jinja").unlink()
    err = " ".join(cli_user_error(monkeypatch, capsys, "eval", "--model", str(model), "--data",
                                  str(tmp_path / "c.jsonl"), "--format", "chat").split())
    assert ("--format is 'chat' but the tokenizer has no chat_template (a base model's has none); use a model whose "
            "tokenizer has a template (or a recipe that sets data.chat_template: chatml,") in err, err
    assert "--format alpaca, completion or text)." in err and "; set data.chat_template" not in err, err  # (no recipe)
    tok = AutoTokenizer.from_pretrained(model)
    tok.eos_token = None
    tok.save_pretrained(model)
    err = " ".join(cli_user_error(monkeypatch, capsys, "eval", "--model", str(model), "--data", str(a), "--format",
                                  "alpaca").split())
    assert ("--format 'alpaca' ends each target with the tokenizer's EOS token, so the model learns to stop, and this "
            "tokenizer has none. Give it one (tokenizer_config.json's eos_token), or use --format chat with a chat "
            "template") in err, err


def _unformatted_recipe(tmp_path: Path, tiny_llama: Path, number_data: dict, train_data, eval_data, **data) -> Path:
    """make_recipe's recipe with data.train `train_data` and data.eval `eval_data`, data.format not set."""
    recipe = make_recipe(tmp_path, tiny_llama, number_data, data={"train": train_data, "eval": eval_data, **data},
                         training={"max_steps": 4, "save_steps": 2, "save_total_limit": 10}, eval={"base_model": False})
    raw = yaml.safe_load(recipe.read_text())
    if "format" not in data:
        del raw["data"]["format"]
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    return recipe


C, A = {"path": "c.jsonl", "format": "chat"}, {"path": "a.jsonl", "format": "alpaca"}


@pytest.mark.parametrize(("data", "read"), [
    ({"train": [C, C | {"path": "d.jsonl"}], "eval": "e.jsonl"}, "chat"),  # every dataset chat: the eval set too
    ({"train": [C], "eval": {"x": "e.jsonl", "y": {"path": "t.jsonl", "format": "text"}}}, "chat"),
    ({"train": [C], "eval": "e.jsonl", "columns": {"messages": "dialog"}}, "chat"),
    ({"train": [C], "eval": "e.jsonl", "format": "alpaca"}, "alpaca"),  # set: it wins
    ({"train": [C, "a.jsonl"], "eval": "e.jsonl"}, "alpaca"),  # a mix (a.jsonl reads the default): the default
    ({"train": [C, A], "eval": "e.jsonl"}, "alpaca"),
    ({"train": [C | {"columns": {}}], "eval": "e.jsonl", "columns": {"output": "answer"}}, "alpaca"),  # alpaca's
    ({"train": [C], "eval": {"x": {"path": "e.jsonl", "columns": {"output": "answer"}}}}, "alpaca"),  # the set's
    ({"train": "c.jsonl", "eval": "e.jsonl"}, "alpaca"),
])
def test_an_eval_set_is_read_in_the_format_every_dataset_of_data_train_names(data, read):
    """data.eval was read in data.format, whose default is alpaca, so a recipe training on chat datasets alone (each
    entry's own format) evaluated its conversations as alpaca rows and failed. data.format, not set, is now that one
    format where a set of data.eval has none of its own; not set over a mix of formats, a data.format set, or
    data.columns of another format's fields, which were written for the default. (Without a set that reads it too:
    tests/test_data_format_of_the_datasets.py.)"""
    cfg = DataConfig(**data)
    assert cfg.for_eval(next(iter(cfg.eval_sources()))).format == read
    assert cfg.format == read  # what the run's recipe.yaml writes
    fixed = {k: v for k, v in data.items() if k != "columns"} | {"format": "alpaca"}
    assert DataConfig(**fixed).for_eval(next(iter(cfg.eval_sources()))).format == "alpaca"


def test_a_run_on_chat_datasets_evaluates_its_eval_set_as_chat_and_peftkit_eval_of_it_agrees(tiny_llama, number_data,
                                                                                              tmp_path):
    """The run of a recipe whose datasets are all chat (no data.format) evaluates its chat eval set as chat (it
    stopped on its first row, read as alpaca); its recipe.yaml writes data.format: chat, so `peftkit eval RUN_DIR`
    gives the run's final eval loss; a run killed after step 2 resumes to the same bits."""
    from peftkit.eval_job import eval_job
    from peftkit.evaluate import evaluate

    chats = [str(_chat_file(tmp_path / f"{name}.jsonl", n, seed)) for name, n, seed in (("c", 12, 4), ("d", 8, 5),
                                                                                          ("e", 6, 6))]
    recipe = _unformatted_recipe(tmp_path, tiny_llama, number_data, [{"path": chats[0], "format": "chat"},
                                                                      {"path": chats[1], "format": "chat"}], chats[2])
    run = tmp_path / "run"
    check_resumes_to_the_same_bits(recipe, run, kill_after=2, steps=4)
    assert yaml.safe_load((run / "recipe.yaml").read_text())["data"]["format"] == "chat"
    final = json.loads((run / "manifest.json").read_text())["metrics"]["eval_loss"]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line]
    assert lines[-1]["eval_loss"] == final == evaluate(eval_job(run, **_eval_flags()))["loss"]
    assert final == evaluate(eval_job(run, **_eval_flags(data=chats[2], fmt="chat")))["loss"]


def test_a_data_format_set_still_wins_and_a_run_of_it_resumes_only_with_it(tiny_llama, number_data, tmp_path):
    """data.format: alpaca over chat datasets (what a run made before recorded) evaluates alpaca rows as alpaca, and
    `peftkit eval RUN_DIR` agrees; the same recipe without it now reads its eval set as chat, another recipe, which
    --resume refuses, naming data.format."""
    from peftkit.eval_job import eval_job
    from peftkit.evaluate import evaluate

    chat = str(_chat_file(tmp_path / "c.jsonl", 12, seed=4))
    recipe = _unformatted_recipe(tmp_path, tiny_llama, number_data, [{"path": chat, "format": "chat"}],
                                 str(number_data["eval"]), format="alpaca")
    run = tmp_path / "run"
    check_resumes_to_the_same_bits(recipe, run, kill_after=2, steps=4)
    final = json.loads((run / "manifest.json").read_text())["metrics"]["eval_loss"]
    assert final == evaluate(eval_job(run, **_eval_flags()))["loss"] == evaluate(eval_job(run, **_eval_flags(
        data=str(number_data["eval"]), fmt="alpaca")))["loss"]
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    (run / "manifest.json").unlink()
    raw = yaml.safe_load(recipe.read_text())
    del raw["data"]["format"]
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(PeftkitError, match=r"holds a run of a different recipe \(its recipe.yaml differs in "
                                           r"data.format\).* If this recipe sets no data.format: it now reads "
                                           r"data.eval and --data files as chat, .* set data.format: alpaca to go "
                                           r"on with that run."):
        train(load_recipe(recipe), resume=True, console=_quiet())


def test_an_eval_set_read_in_the_default_over_a_mix_of_formats_says_so(tiny_llama, number_data, tmp_path,
                                                                         monkeypatch, capsys):
    """Over datasets of several formats data.format keeps its default, alpaca, for data.eval; a chat eval set read so
    now says why, and what to set (training's error, and peftkit eval's, every row skipped too); a set of data.eval
    given its own format is read in it."""
    chat = str(_chat_file(tmp_path / "c.jsonl", 4, seed=4))
    recipe = _unformatted_recipe(tmp_path, tiny_llama, number_data, [{"path": chat, "format": "chat"},
                                                                      str(number_data["train"])], chat)
    said = ("data.format is not set, so data.eval is read in its default, alpaca: data.train's datasets are of "
            "several formats (data.train[0] chat, data.train[1] alpaca). Set data.format, or give the set a format of "
            "its own (`eval: {NAME: {path: ..., format: ...}}`).")
    with pytest.raises(PeftkitError) as error:
        train(load_recipe(recipe), console=_quiet())
    assert str(error.value).startswith(f"{chat}:1: missing field 'instruction' for data.format 'alpaca'")
    assert str(error.value).endswith(f"set data.on_bad_rows: skip. {said}"), str(error.value)
    err = " ".join(cli_user_error(monkeypatch, capsys, "eval", str(recipe), "--set", "data.on_bad_rows=skip").split())
    assert f"to see the first bad row. {said}" in err, err
    err = " ".join(cli_user_error(monkeypatch, capsys, "eval", str(recipe), "--format", "completion").split())
    assert "--format 'completion'" in err and "data.format is not set" not in err, err
    own = load_recipe(recipe, ["data.eval={x: {path: " + chat + ", format: chat}}"]).data
    assert own.for_eval("x").format == "chat" and own.format == "alpaca"


# ------------------------------------------------------------------- data.eval: several named evaluation sets

@pytest.fixture
def eval_sets(tiny_llama, number_data, tmp_path) -> tuple[Path, Path, Path]:
    """A recipe evaluating on two sets every 2 of 6 steps (a checkpoint every 2), numbers (number_data's eval file,
    the primary one) and general (plain text of its own format), and its run directory and general's file."""
    general = tmp_path / "general.jsonl"
    write_jsonl(general, [{"text": f"The cat sat on mat number {k}."} for k in range(6)])
    recipe = make_recipe(tmp_path, tiny_llama, number_data,
                         data={"eval": {"numbers": str(number_data["eval"]),
                                        "general": {"path": str(general), "format": "text"}}},
                         training={"max_steps": 6, "eval_steps": 2, "save_steps": 2, "save_total_limit": 10},
                         eval={"base_model": True})
    return recipe, tmp_path / "run", general


def _eval_flags(**flags) -> dict:
    return dict(overrides=[], model=None, data=None, fmt=None, adapter=None, max_length=None, batch_size=None,
                on_bad_rows=None) | flags


def test_each_eval_set_s_loss_is_peftkit_eval_of_its_file(eval_sets, number_data):
    from peftkit.eval_job import eval_job
    from peftkit.evaluate import evaluate

    recipe, run, general = eval_sets
    out = io.StringIO()
    summary = train(load_recipe(recipe), console=Console(file=out, width=1000))
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line]
    assert [r["step"] for r in lines] == [2, 4, 6]
    assert list(lines[-1]) == ["step", "eval_loss", "eval_perplexity", "eval_general_loss", "eval_general_perplexity"]
    # `peftkit eval RUN_DIR --data FILE` of the exported adapter, and `peftkit eval RECIPE --data FILE` of the base
    for key, data in (("eval", number_data["eval"]), ("eval_general", general)):
        assert lines[-1][f"{key}_loss"] == summary[f"{key}_loss"] == evaluate(eval_job(run, **_eval_flags(
            data=str(data))))["loss"]
        assert summary[f"base_{key}_loss"] == evaluate(eval_job(recipe, **_eval_flags(data=str(data))))["loss"]
    assert summary["eval_general_loss"] != summary["eval_loss"]
    manifest = json.loads((run / "manifest.json").read_text())
    assert {k: v for k, v in manifest["metrics"].items() if "general" in k} == {
        k: summary[k] for k in ("eval_general_loss", "eval_general_perplexity", "base_eval_general_loss")}
    assert manifest["eval_sets"] == ["numbers", "general"]  # the order, which the sorted keys of the file lose
    assert set(manifest["data_sha256"]) == set(manifest["examples_sha256"]) == {"train", "eval[numbers]",
                                                                                 "eval[general]"}
    printed = " ".join(out.getvalue().split())
    assert (f"eval loss, general {summary['base_eval_general_loss']:.4f} base -> {summary['eval_general_loss']:.4f} "
            f"(ppl {summary['eval_general_perplexity']:.2f})") in printed
    assert f"step 2: eval loss {lines[0]['eval_loss']:.4f}" in printed and "; general: eval loss " in printed


def test_the_primary_set_s_figures_are_a_run_s_evaluating_it_alone(eval_sets, tiny_llama, number_data, tmp_path):
    recipe, run, _ = eval_sets
    train(load_recipe(recipe), console=_quiet())
    alone = make_recipe(tmp_path / "alone", tiny_llama, number_data,
                        training={"max_steps": 6, "eval_steps": 2}, eval={"base_model": True})
    train(load_recipe(alone), console=_quiet())

    def primary_figures(r: Path) -> tuple:
        lines = [json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line]
        metrics = json.loads((r / "manifest.json").read_text())["metrics"]
        return ([{k: line[k] for k in ("step", "eval_loss", "eval_perplexity")} for line in lines],
                {k: metrics[k] for k in ("eval_loss", "eval_perplexity", "base_eval_loss")}, (r / ADAPTER).read_bytes())

    assert primary_figures(run) == primary_figures(tmp_path / "alone/run")
    manifest = json.loads((tmp_path / "alone/run/manifest.json").read_text())
    assert set(manifest["data_sha256"]) == {"train", "eval"} and "eval_sets" not in manifest


def test_the_model_card_shows_each_eval_set_s_loss(eval_sets):
    """adapter/README.md showed the primary set's figures alone, "On the recipe's `data.eval`", as if it were the only
    one; each other set's loss now has a row of its own, base and fine-tuned, named by its set."""
    recipe, run, _ = eval_sets
    train(load_recipe(recipe), console=_quiet())
    metrics = json.loads((run / "manifest.json").read_text())["metrics"]
    card = (run / "adapter/README.md").read_text()
    assert ("On the recipe's `data.eval` sets, `numbers` (the first: the rows without a set's name) and "
            "`general`:") in card
    assert f"| eval loss | {metrics['base_eval_loss']:.4f} | {metrics['eval_loss']:.4f} |" in card
    assert (f"| eval loss, general | {metrics['base_eval_general_loss']:.4f} | {metrics['eval_general_loss']:.4f} "
            "|\n\n") in card  # after the primary set's rows: the table's last


def test_a_run_with_two_eval_sets_resumes_to_the_same_bits(eval_sets):
    recipe, run, _ = eval_sets
    check_resumes_to_the_same_bits(recipe, run, kill_after=2, steps=6)


def test_a_changed_second_eval_set_is_refused_by_resume_and_named_by_verify(eval_sets):
    from peftkit.verify import verify

    recipe, run, general = eval_sets
    train(load_recipe(recipe), console=_quiet())
    assert verify(run, console=_quiet()).ok
    general.write_text(general.read_text() + json.dumps({"text": "A new line."}) + "\n")
    report = verify(run, console=_quiet())
    assert f"data.eval[general]: the content of {general} differs from the recorded one" in report.differences
    shutil.rmtree(run / "checkpoints" / "step-00000006")
    (run / "manifest.json").unlink()
    with pytest.raises(PeftkitError, match=r"^--resume: data.eval\[general\] file general.jsonl changed since "
                                           "checkpoint step-00000004 was written"):
        train(load_recipe(recipe), resume=True, console=_quiet())


@pytest.mark.parametrize(("eval_yaml", "message"), [
    ("    numbers: a.jsonl\n    bad name: b.jsonl\n", "data.eval: 'bad name' is not a usable name of an evaluation "
     "set: its figures are logged as eval_<name>_loss, so use letters, digits, `_` and `-` only."),
    ("    general: [b.jsonl]\n", "'data.eval.general' = list: must be a path or hub id, or {path: ..., split: ..., "
     "columns: {...}, format: ...}."),
    ("    general: {path: b.jsonl, colums: {text: body}}\n", "unknown key 'colums' in data.eval.general. Did you mean "
     "'columns'? Valid keys: path, split, columns, format."),
    ("    general: {path: b.jsonl, type: chat_template}\n", "unknown key 'type' in data.eval.general. Did you mean "
     "'format'? axolotl's `type: chat_template` is `format: chat` here. Valid keys: path, split, columns, format."),
    ("    general: {path: b.jsonl, format: classification}\n", "data.eval.general.format: classification is "
     "data.format's alone"),
    ("    general: {path: b.jsonl, columns: {txt: body}, format: text}\n", "data.eval.general.columns: 'txt' is "
     "not a field of data.eval.general.format text (text, task)"),
    ("    path: b.jsonl\n    format: text\n", "data.eval: a mapping of names to datasets, and this is one dataset's "
     "{path, ...}; name it: `eval: {NAME: {path: ..., format: ...}}`, or give its path alone."),
    ("    {}\n", "data.eval: an empty mapping; give a path or hub id, or one or more `name: dataset`."),
])
def test_a_bad_eval_set_is_a_recipe_error(tiny_llama, number_data, tmp_path, monkeypatch, capsys, eval_yaml, message):
    recipe = make_recipe(tmp_path, tiny_llama, number_data)
    text = recipe.read_text()
    start = text.index("  eval:")
    recipe.write_text(text[:start] + "  eval:\n" + eval_yaml + text[text.index("\n", start) + 1:])
    err = " ".join(cli_user_error(monkeypatch, capsys, "validate", str(recipe)).split())
    assert message in err, err


def test_eval_sets_moved_are_the_same_run_and_a_set_s_split_changed_is_not(tiny_llama, number_data, tmp_path):
    from peftkit.rundir import check_output_dir

    out = tmp_path / "run"
    out.mkdir()
    moved = Path(shutil.copytree(number_data["train"].parent, tmp_path / "moved"))

    def recipe(where: str, folder: Path, **general) -> Path:
        sets = {"numbers": str(folder / "eval.jsonl"), "general": {"path": str(folder / "train.jsonl"), **general}}
        return make_recipe(tmp_path / where, tiny_llama, number_data, data={"eval": sets})

    (out / "recipe.yaml").write_text(load_recipe(recipe("a", number_data["train"].parent)).to_yaml())
    assert "taken as the same run" in check_output_dir(out, load_recipe(recipe("b", moved)).to_yaml(), False, False)[0]
    other = load_recipe(recipe("c", number_data["train"].parent, split="train[:50%]")).to_yaml()
    with pytest.raises(PeftkitError, match=r"differs in data.eval.general.split\)"):
        check_output_dir(out, other, False, False)


def test_peftkit_eval_of_a_run_evaluates_each_eval_set(eval_sets, tmp_path, monkeypatch, capsys):
    from peftkit.cli import main

    recipe, run, general = eval_sets
    summary = train(load_recipe(recipe), console=_quiet(), show_summary=False)
    monkeypatch.setattr("sys.argv", ["peftkit", "eval", str(run), "--json", str(tmp_path / "eval.json")])
    main()
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "eval.json").read_text())
    assert list(results) == ["general", "numbers"]  # (the JSON file sorts its keys)
    for name, key in (("numbers", "eval"), ("general", "eval_general")):
        assert results[name]["loss"] == summary[f"{key}_loss"]  # the run's final figures, set by set
        assert f"{name}: loss {summary[f'{key}_loss']:.4f}  perplexity {summary[f'{key}_perplexity']:.3f}" in printed
    assert printed.index("numbers:") < printed.index("general:")  # in the recipe's order, the primary first


def test_peftkit_eval_loads_the_model_once_for_every_eval_set(eval_sets, number_data, tmp_path, monkeypatch, capsys):
    """`peftkit eval RECIPE` of a data.eval of two sets loaded the model once per set; it loads once, and each set's
    figures are still `peftkit eval RECIPE --data FILE`'s of its file, read with its own format."""
    from peftkit.cli import main
    from peftkit.eval_job import eval_job
    from peftkit.evaluate import evaluate
    from peftkit.inference import ModelSource

    recipe, _, general = eval_sets
    alone = {name: evaluate(eval_job(recipe, **_eval_flags(data=str(path))))
             for name, path in (("numbers", number_data["eval"]), ("general", general))}
    assert alone["numbers"]["loss"] != alone["general"]["loss"]
    loads, load = [], ModelSource.load
    monkeypatch.setattr(ModelSource, "load", lambda self, *args, **kwargs: loads.append(self) or load(self, *args,
                                                                                                    **kwargs))
    monkeypatch.setattr("sys.argv", ["peftkit", "eval", str(recipe), "--json", str(tmp_path / "eval.json")])
    main()
    printed = capsys.readouterr().out
    assert len(loads) == 1
    assert json.loads((tmp_path / "eval.json").read_text()) == alone
    for name, result in alone.items():
        assert f"{name}: loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}" in printed


def test_a_comparison_on_several_eval_sets_compares_on_each(eval_sets, tiny_llama, number_data, tmp_path, monkeypatch,
                                                            capsys):
    """`peftkit eval RECIPE --adapter a=DIR --adapter b=DIR --merged m=DIR` of a data.eval of two sets compared on
    the primary set alone, in a table that did not say which: it prints one table per set, headed by its name, and
    --json holds each set's rows by set name, each equal to the comparison with `--data FILE` of its file; the
    named adapters' base loads once, and the merged model once, for both sets."""
    from peftkit.cli import main
    from peftkit.inference import ModelSource
    from peftkit.methods.lora import LoraConfig
    from tests.conftest import save_random_adapter

    recipe, _, general = eval_sets
    flags = [f"{name}={save_random_adapter(tiny_llama, LoraConfig(r=2, target_modules=['q_proj']), tmp_path / name, seed)}"
             for name, seed in (("a", 1), ("b", 2))]
    flags = ["--adapter", flags[0], "--adapter", flags[1], "--merged", f"m={tiny_llama}"]

    def compared(*extra: str) -> dict:
        monkeypatch.setattr("sys.argv", ["peftkit", "eval", str(recipe), *flags, *extra, "--json",
                                         str(tmp_path / "cmp.json")])
        main()
        return json.loads((tmp_path / "cmp.json").read_text())

    alone = {name: compared("--data", str(path)) for name, path in (("numbers", number_data["eval"]),
                                                                     ("general", general))}
    assert alone["numbers"]["a"]["loss"] != alone["general"]["a"]["loss"]
    capsys.readouterr()
    loads, load, named, load_named = [], ModelSource.load, [], ModelSource.load_named
    monkeypatch.setattr(ModelSource, "load", lambda self, *a, **k: loads.append(self) or load(self, *a, **k))
    monkeypatch.setattr(ModelSource, "load_named", lambda self, *a, **k: named.append(self) or load_named(self, *a,
                                                                                                         **k))
    assert compared() == alone
    assert (len(loads), len(named)) == (1, 1)
    printed = " ".join(capsys.readouterr().out.split())
    assert "peftkit eval: comparison on numbers (Δ = row - base)" in printed
    assert "peftkit eval: comparison on general (Δ = row - base)" in printed
    assert printed.index("comparison on numbers") < printed.index("comparison on general")  # the recipe's order
    a, base = alone["general"]["a"]["loss"], alone["general"]["base"]["loss"]
    assert f"│ a │ {a:.4f} │ {a - base:+.4f} │" in printed[printed.index("comparison on general"):]


def test_eval_of_several_eval_sets_writes_each_set_s_predictions(tiny_llama, number_data, tmp_path, monkeypatch,
                                                                 capsys):
    """`peftkit eval RECIPE --predictions FILE` of a data.eval of several sets, compared or not, was refused ("pass
    --data FILE of one"): each set's answers now go to a file of their own, the set's name before the suffix
    (p.jsonl: p.numbers.jsonl; a comparison's DIR/NAME.jsonl: DIR/NAME.numbers.jsonl), each what `--data FILE` of
    the set's file writes. A stream is refused: the sets' lines would run together."""
    from peftkit.cli import main
    from peftkit.methods.lora import LoraConfig
    from tests.conftest import save_random_adapter

    other = tmp_path / "other.jsonl"
    write_jsonl(other, [{"instruction": f"Add one to {k}.", "output": str(k + 1)} for k in range(3)])
    files = {"numbers": number_data["eval"], "other": other}
    recipe = make_recipe(tmp_path / "r", tiny_llama, number_data, data={"eval": {k: str(v) for k, v in files.items()}},
                         eval={"max_new_tokens": 3})
    adapter = save_random_adapter(tiny_llama, LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "a", 1)

    def written(*args: str) -> None:
        monkeypatch.setattr("sys.argv", ["peftkit", "eval", str(recipe), "--metrics", "exact_match", *args])
        main()

    def lines(path: Path) -> list[dict]:
        return [json.loads(line) for line in path.read_text().splitlines()]

    written("--predictions", str(tmp_path / "p.jsonl"))
    written("--adapter", f"a={adapter}", "--predictions", str(tmp_path / "preds"))
    assert sorted(p.name for p in (tmp_path / "preds").iterdir()) == [
        "a.numbers.jsonl", "a.other.jsonl", "base.numbers.jsonl", "base.other.jsonl"]
    for name, path in files.items():
        written("--data", str(path), "--predictions", str(tmp_path / f"alone.{name}.jsonl"))
        written("--data", str(path), "--adapter", f"a={adapter}", "--predictions", str(tmp_path / f"alone-{name}"))
        alone = lines(tmp_path / f"alone.{name}.jsonl")
        assert len(alone) == len(path.read_text().splitlines())
        assert lines(tmp_path / f"p.{name}.jsonl") == alone == lines(tmp_path / "preds" / f"base.{name}.jsonl")
        assert lines(tmp_path / "preds" / f"a.{name}.jsonl") == lines(tmp_path / f"alone-{name}" / "a.jsonl")
    capsys.readouterr()
    err = " ".join(cli_user_error(monkeypatch, capsys, "eval", str(recipe), "--metrics", "exact_match",
                                  "--predictions", "/dev/stdout").split())
    assert (f"--predictions /dev/stdout: {recipe}'s data.eval has 2 sets (numbers, other), whose answers go to a file "
            "each (FILE.NAME.jsonl); give a file name, or --data FILE of one set.") in err, err


def test_train_and_preview_name_a_chat_entry_s_format_for_a_tokenizer_without_a_template(tiny_llama, number_data,
                                                                                           tmp_path, monkeypatch,
                                                                                           capsys):
    """An entry's chat rows tokenized by train or preview with a tokenizer without a chat template were told
    'data.format is chat' while data.format was alpaca: the error names the entry's format key."""
    chat = _chat_file(tmp_path / "c.jsonl", 12, seed=4)
    model = shutil.copytree(tiny_llama, tmp_path / "model")
    (model / "chat_template.jinja").unlink()
    recipe = _mix_recipe(tmp_path, model, number_data, [str(number_data["train"]), {"path": str(chat), "format": "chat"}])
    for command in ("train", "preview"):
        err = " ".join(cli_user_error(monkeypatch, capsys, command, str(recipe)).split())
        assert "c.jsonl:1: data.train[1].format is 'chat' but the tokenizer has no chat_template" in err, (command, err)


def test_an_alpaca_entry_s_format_is_named_for_a_tokenizer_without_an_eos(two_files, tmp_path):
    """alpaca rows end each target with the EOS: with data.format chat and an alpaca entry, a tokenizer without one
    was told 'data.format 'alpaca' ...', the key that is chat; the entry's key is named."""
    a, _ = two_files
    chat = _chat_file(tmp_path / "c.jsonl", 2, seed=7)
    mix = DataConfig(train=[{"path": str(a), "format": "alpaca"}, str(chat)], format="chat", max_length=256)
    tok = build_char_tokenizer()
    tok.eos_token = None
    with pytest.raises(PeftkitError, match=r"^data.train\[0\].format 'alpaca' ends each target with the tokenizer's "
                                           r"EOS token.* or use data.train\[0\].format: chat with a chat template"):
        load_examples(tok, mix.train, mix.train_split, mix, cache=False)


def test_generate_names_a_text_entry_s_format_for_its_missing_prompts(two_files, tiny_llama, tmp_path, monkeypatch,
                                                                     capsys):
    """`peftkit generate RECIPE --data FILE` of an entry of format text (data.format alpaca) said "data.format 'text'
    has no prompt", a key that is alpaca: it names the entry's format."""
    a, _ = two_files
    write_jsonl(tmp_path / "t.jsonl", [{"text": "one two"}] * 2)
    recipe = make_recipe(tmp_path, tiny_llama, {"train": a, "eval": a}, data={
        "train": [str(a), {"path": str(tmp_path / "t.jsonl"), "format": "text"}]})
    monkeypatch.chdir(tmp_path)
    err = " ".join(cli_user_error(monkeypatch, capsys, "generate", str(recipe), "--data", "t.jsonl").split())
    assert "data.train[1].format 'text' has no prompt to generate from in " in err, err


def test_eval_and_generate_data_of_another_file_say_why_it_is_read_in_the_format_of_the_datasets(
        tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    """`peftkit eval|generate RECIPE --data FILE` of a file the recipe does not name reads it in data.format, which
    a recipe without it takes from its chat datasets (_format_of_the_datasets): a bad row was told as one "for
    data.format 'chat'", a key the recipe does not set, without why; it now ends saying so."""
    chat = str(_chat_file(tmp_path / "c.jsonl", 6, seed=4))
    recipe = _unformatted_recipe(tmp_path, tiny_llama, number_data, [{"path": chat, "format": "chat"}],
                                 str(_chat_file(tmp_path / "e.jsonl", 4, seed=5)))
    for command in ("eval", "generate"):
        err = " ".join(cli_user_error(monkeypatch, capsys, command, str(recipe), "--data",
                                      str(number_data["eval"])).split())
        assert "missing field 'messages' for data.format 'chat'" in err, err
        assert err.endswith("data.format is not set, so --data is read as chat, the format of every dataset of "
                            "data.train; set data.format, or pass --format, to read it otherwise."), err
