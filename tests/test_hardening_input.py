"""Hostile or careless input to the recipe loader and the data reader ends in one clear PeftkitError that
names the file and line (or row), fast: duplicate keys, booleans given for numbers, alias bombs, huge or
deeply nested documents, data fields of the wrong type, empty data files and text no tokenizer can encode.
Never a traceback, a silent guess, or minutes of CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peftkit.data import load_examples
from peftkit.errors import PeftkitError
from peftkit.recipe import MAX_DEPTH, MAX_MESSAGES, MAX_VALUES, DataConfig, load_recipe
from peftkit.tiny import build_char_tokenizer

TOK = build_char_tokenizer()

RECIPE = """\
model:
  name_or_path: ./tiny-model
adapter:
  r: 4
  alpha: 8
data:
  train: ./data/train.jsonl
training:
  max_steps: 6
  lr: 0.01
  warmup_steps: 1
export:
  output_dir: ./run
"""
# A DoS guard, not a benchmark: generous for a slow CI machine. The old code took 15 s to minutes; the slowest
# case here takes 1.15 s on 2 idle cores. Counted in this process's CPU time, not the wall clock: on a machine busy
# with other processes (pytest -n auto's other workers and the processes their tests start) the wall clock took 6.9 s.
FAST_S = 5.0


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "my-recipe.yaml"
    path.write_text(text)
    return path


def _error(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> str:
    with pytest.raises(PeftkitError) as info:
        load_recipe(path, overrides)
    return str(info.value)


def _timed_error(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> str:
    start = time.process_time()
    message = _error(path, overrides)
    assert time.process_time() - start < FAST_S
    return message


# ------------------------------------------------------------------------------------------ duplicate keys


@pytest.mark.parametrize(("before", "extra", "key", "section", "first", "second"), [
    ("export:", "adapter:\n  r: 16\n", "adapter", "the recipe", 3, 12),  # a whole section given twice
    ("data:", "  r: 16\n", "r", "adapter", 4, 6),
    ("  warmup_steps", "  lr: 0.02\n", "lr", "training", 10, 11),
])
def test_duplicate_key_names_the_key_and_both_lines(tmp_path, before, extra, key, section, first, second):
    # PyYAML silently kept the last value.
    text = RECIPE.replace(before, extra + before, 1)
    assert _error(_write(tmp_path, text)) == (
        f"Invalid recipe (1 problem):\n  {tmp_path / 'my-recipe.yaml'}:{second}: key '{key}' is given twice in "
        f"{section} (lines {first} and {second}); YAML would silently keep only the last. Delete one of them.")


def test_duplicate_key_deep_inside_a_flow_mapping(tmp_path):
    text = RECIPE.replace("  alpha: 8\n", "  alpha: 8\n  target_modules: {regex: 'q.*',\n    regex: 'v.*'}\n")
    assert ("my-recipe.yaml:7: key 'regex' is given twice in adapter.target_modules (lines 6 and 7)"
            in _error(_write(tmp_path, text)))


def test_duplicate_key_in_a_set_value(tmp_path):
    message = _error(_write(tmp_path, RECIPE), ["adapter.target_modules={regex: a, regex: b}"])
    assert message == ("--set adapter.target_modules: key 'regex' is given twice in the value; YAML would silently "
                       "keep only the last. Give each key once.")


def test_a_merge_key_overridden_is_not_a_duplicate(tmp_path):
    # `<<: *defaults` then `lr:` is YAML's way to override one merged value, not a mistake.
    text = RECIPE.replace("training:\n", "training:\n  <<: {lr: 0.5, max_steps: 3}\n")
    recipe = load_recipe(_write(tmp_path, text))
    assert (recipe.training.lr, recipe.training.max_steps) == (0.01, 6)


# ------------------------------------------------------------------------------------------ booleans for numbers


@pytest.mark.parametrize(("old", "new", "key", "shown", "kind"), [
    ("  max_steps: 6", "  max_steps: true", "training.max_steps", True, "an integer"),
    ("  r: 4", "  r: yes", "adapter.r", True, "an integer"),
    ("  lr: 0.01", "  lr: false", "training.lr", False, "a number"),
    ("  alpha: 8", "  alpha: on", "adapter.alpha", True, "a number"),
    ("  warmup_steps: 1", "  warmup_steps: off", "training.warmup_steps", False, "an integer"),
    ("  lr: 0.01", "  lr: 0.01\n  save_steps: yes", "training.save_steps", True, "an integer"),
])
def test_boolean_where_a_number_belongs(tmp_path, old, new, key, shown, kind):
    text = RECIPE.replace(old, new)
    line = text.splitlines().index(new.splitlines()[-1]) + 1
    assert _error(_write(tmp_path, text)) == (
        f"Invalid recipe (1 problem):\n  {tmp_path / 'my-recipe.yaml'}:{line}: '{key}' = {shown}: must be {kind}, not a "
        "boolean (YAML reads true/false, yes/no and on/off as booleans).")


def test_boolean_through_set_names_the_override(tmp_path):
    assert ("my-recipe.yaml (--set training.max_steps): 'training.max_steps' = True: must be an integer, not a boolean"
            in _error(_write(tmp_path, RECIPE), ["training.max_steps=true"]))


def test_numbers_written_other_ways_still_work(tmp_path):
    # Quoted numbers are converted as before; `2e-4` is a string to PyYAML (no dot) and must stay accepted;
    # an integer is a fine float.
    text = RECIPE.replace("  r: 4", '  r: "8"').replace("  lr: 0.01", "  lr: 2e-4").replace("  alpha: 8", "  alpha: 1")
    recipe = load_recipe(_write(tmp_path, text), ["training.max_steps=7"])
    assert (recipe.adapter.r, recipe.training.lr, recipe.adapter.alpha, recipe.training.max_steps) == (8, 2e-4, 1.0, 7)


# ------------------------------------------------------------------------------------------ size and depth


def _alias_bomb(levels: int, indent: str = "") -> str:
    """`a0: &a0 [lol x 9]`, `a1: &a1 [*a0 x 9]`, ...: levels x 9 lines that stand for 9**levels values."""
    lines = [f"{indent}a0: &a0 [{', '.join(['lol'] * 9)}]"]
    lines += [f"{indent}a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_fast(tmp_path):
    # 9**6 = 531,441 values: the old loader walked them all (15 s) to find the lines of errors. The limit is
    # crossed on the 5th line of the bomb (9**5 values).
    text = RECIPE + "junk:\n" + _alias_bomb(6, indent="  ")
    message = _timed_error(_write(tmp_path, text))
    assert message == (
        f"{tmp_path / 'my-recipe.yaml'}:{RECIPE.count(chr(10)) + 1 + 5}: the recipe holds more than {MAX_VALUES:,} keys and "
        "values once its YAML aliases (*name) are expanded; a recipe has a few hundred at most. Write the values out "
        "instead of nesting aliases.")


def test_alias_bomb_in_a_set_value(tmp_path):
    bomb = "[" + ", ".join(line.split(": ", 1)[1] for line in _alias_bomb(9).splitlines()) + "]"
    assert _timed_error(_write(tmp_path, RECIPE), [f"adapter.target_modules={bomb}"]).startswith(
        f"--set adapter.target_modules: the value holds more than {MAX_VALUES:,} keys and values once its YAML aliases")


def test_tens_of_thousands_of_keys_are_refused_fast(tmp_path):
    text = RECIPE.replace("  alpha: 8\n", "  alpha: 8\n" + "".join(f"  key{i}: {i}\n" for i in range(30_000)))
    message = _timed_error(_write(tmp_path, text))
    assert message.startswith(f"{tmp_path / 'my-recipe.yaml'}:")
    assert message.endswith(f": the recipe holds more than {MAX_VALUES:,} keys and values; a recipe has a few hundred at "
                            "most. Check that this is the file you meant.")


def test_many_problems_are_listed_up_to_a_limit(tmp_path):
    # Just under the size limit: every key is an error, reported in linear time and shown capped.
    n = MAX_VALUES // 2 - 50
    text = RECIPE.replace("  alpha: 8\n", "  alpha: 8\n" + "".join(f"  key{i}: {i}\n" for i in range(n)))
    message = _timed_error(_write(tmp_path, text))
    lines = message.splitlines()
    assert lines[0] == f"Invalid recipe ({n} problems):"
    assert len(lines) == 1 + MAX_MESSAGES + 1 and lines[-1] == f"  ... and {n - MAX_MESSAGES} more"
    assert lines[1] == (f"  {tmp_path / 'my-recipe.yaml'}:6: unknown key 'key0' in adapter. Valid keys: method, r, alpha, "
                        "dropout, target_modules, use_rslora, use_dora, modules_to_save, init, "
                        "pissa_niter, lora_fa, rank_pattern, alpha_pattern, lora_bias, kasa_config, velora_config, use_bdlora, "
                        "target_parameters, alora_invocation_tokens, layer_replication, trainable_token_indices, exclude_modules, layers_to_transform, layers_pattern, init_from.")


def test_a_recipe_file_of_megabytes_is_refused_unread(tmp_path):
    path = _write(tmp_path, RECIPE + "# " + "x" * (3 << 20) + "\n")
    assert _timed_error(path) == (f"{path}: the recipe is 3.0 MB; a recipe is a few KB (the limit is 1 MB). Check that "
                                  "this is the recipe file you meant.")


@pytest.mark.parametrize("nested", [
    "{a: " * 1000 + "1" + "}" * 1000,
    "[" * 1000 + "]" * 1000,
    "".join("\n" + "  " * (i + 1) + "a:" for i in range(1000)) + " 1",
], ids=["flow-mapping", "flow-list", "block-mapping"])
def test_deeply_nested_recipe(tmp_path, nested):
    # PyYAML's composer recursed into a RecursionError here.
    text = RECIPE + "junk: " + nested + "\n"
    line = RECIPE.count("\n") + 1 + (MAX_DEPTH if nested.startswith("\n") else 0)
    assert _timed_error(_write(tmp_path, text)) == (
        f"{tmp_path / 'my-recipe.yaml'}:{line}: the recipe is nested more than {MAX_DEPTH} levels deep here; a recipe "
        "needs about 4 (section, key, list, item). Look for repeated or unclosed brackets.")


def test_deeply_nested_set_value_and_key(tmp_path):
    path = _write(tmp_path, RECIPE)
    assert _timed_error(path, ["adapter.target_modules=" + "[" * 1000 + "]" * 1000]) == (
        f"--set adapter.target_modules: the value is nested more than {MAX_DEPTH} levels deep here; a recipe needs "
        "about 4 (section, key, list, item). Look for repeated or unclosed brackets.")
    # A 1000-part key under a list-typed field builds a deep dict; it is reported by type, without recursing.
    assert "'quantization.skip_modules' = dict: must be a valid list." in _timed_error(
        path, ["quantization.skip_modules" + ".a" * 1000 + "=1"])


def test_set_value_with_a_tag_it_does_not_fit(tmp_path):
    # PyYAML raised a bare ValueError here (a traceback from the CLI).
    assert _error(_write(tmp_path, RECIPE), ["adapter.r=!!int abc"]) == (
        "--set adapter.r: YAML error: 'abc' cannot be read as int. Remove the explicit !!tag or fix the value.")


def test_cli_refuses_an_alias_bomb_with_exit_2(tmp_path):
    path = _write(tmp_path, RECIPE + "junk:\n" + _alias_bomb(9, indent="  "))
    env = {**os.environ, "COLUMNS": "1000", "NO_COLOR": "1"}
    result = subprocess.run([sys.executable, "-m", "peftkit", "validate", str(path)], capture_output=True, text=True,
                            env=env, timeout=120, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr + result.stdout
    assert result.stderr.startswith(f"error: {path}:") and "once its YAML aliases (*name) are expanded" in result.stderr


# ------------------------------------------------------------------------------------------ data rows


def _jsonl(tmp_path: Path, rows: list) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _load(path: Path, fmt: str = "alpaca", on_bad_rows: str = "error"):
    cfg = DataConfig(train=str(path), format=fmt, max_length=256, on_bad_rows=on_bad_rows)
    return load_examples(TOK, str(path), "train", cfg)


def _data_error(path: Path, fmt: str = "alpaca") -> str:
    with pytest.raises(PeftkitError) as info:
        _load(path, fmt)
    return str(info.value)


GOOD = {"alpaca": {"instruction": "Say hi.", "output": "hi"},
        "chat": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}}


def _chat(*messages: dict) -> dict:
    return {"messages": [{"role": "user", "content": "hi"}, *messages]}


BAD_ROWS = [
    # The old reader rendered these as the text "None", "5" or a Python list repr and trained on it.
    ("chat", _chat({"role": "assistant", "content": None}), "messages[1].content must be a string, got null"),
    ("chat", _chat({"role": "assistant", "content": 5}), "messages[1].content must be a string, got int"),
    ("chat", _chat({"role": "assistant", "content": [{"type": "text", "text": "yo"}]}),
     "messages[1].content must be a string, got list"),
    ("chat", {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "yo"}]},
     "messages[0].content must be a string, got null"),
    # The old reader said "no assistant message to learn from".
    ("chat", _chat({"role": 1, "content": "yo"}), "messages[1].role must be a string, got int"),
    # A role no template knows was rendered as a turn of its own (`<|bot|>`) and trained silently; ShareGPT's
    # `gpt` or a capitalised `Assistant` left "no assistant message to learn from", naming neither role nor fix.
    ("chat", _chat({"role": "bot", "content": "yo"}),
     "messages[1].role is 'bot', not a chat role (system, user, assistant, tool, developer, ipython, function); rename "
     "it 'assistant'"),
    ("chat", {"messages": [{"role": "human", "content": "hi"}, {"role": "gpt", "content": "yo"}]},
     "messages[0].role is 'human', not a chat role (system, user, assistant, tool, developer, ipython, function); "
     "rename it 'user'"),
    ("chat", _chat({"role": "Assistant", "content": "yo"}),
     "messages[1].role is 'Assistant', not a chat role (system, user, assistant, tool, developer, ipython, function); "
     "rename it 'assistant'"),
    ("chat", _chat({"role": "narrator", "content": "yo"}),
     "messages[1].role is 'narrator', not a chat role (system, user, assistant, tool, developer, ipython, function)"),
    ("alpaca", {"instruction": "Say hi.", "input": {"name": "Bo"}, "output": "hi"},
     "field 'input' must be a string, got dict"),
    ("alpaca", {"instruction": "Say hi.", "input": ["Bo"], "output": "hi"}, "field 'input' must be a string, got list"),
    ("alpaca", {"instruction": "Say hi.", "input": 7, "output": "hi"}, "field 'input' must be a string, got int"),
    ("alpaca", {"instruction": ["Say hi."], "output": "hi"}, "field 'instruction' must be a string, got list"),
    # JSON "\ud800": the tokenizer raised TypeError('TextEncodeInput must be Union[...]').
    ("alpaca", '{"instruction": "Say hi.\\ud800", "output": "hi"}',
     ("field 'instruction' holds a lone surrogate \\ud800 at character 7, which is not valid Unicode and cannot be "
      "tokenized")),
    ("chat", '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\\udfffyo"}]}',
     ("messages[1].content holds a lone surrogate \\udfff at character 0, which is not valid Unicode and cannot be "
      "tokenized")),
]


@pytest.mark.parametrize(("fmt", "row", "problem"), BAD_ROWS, ids=[p.split(" ")[0] + "-" + p.split()[-1]
                                                                  for _, _, p in BAD_ROWS])
def test_data_field_of_the_wrong_type_names_its_line(tmp_path, fmt, row, problem):
    path = _jsonl(tmp_path, [GOOD[fmt], "", row, GOOD[fmt]])
    needs = "instruction, output" if fmt == "alpaca" else "messages, or ShareGPT's conversations"
    assert _data_error(path, fmt) == (
        f"{path}:3: {problem} for data.format '{fmt}' (each row needs {needs}). Fix the row, set the right "
        "data.format, or set data.on_bad_rows: skip.")


@pytest.mark.parametrize(("fmt", "row", "problem"), BAD_ROWS, ids=[p.split(" ")[0] + "-" + p.split()[-1]
                                                                  for _, _, p in BAD_ROWS])
def test_data_field_of_the_wrong_type_is_skipped_and_counted(tmp_path, fmt, row, problem):
    examples, stats = _load(_jsonl(tmp_path, [GOOD[fmt], row, GOOD[fmt]]), fmt, on_bad_rows="skip")
    assert len(examples) == 2 and stats["bad_rows"] == 1


EMPTY_ANSWERS = [
    ("alpaca", {"instruction": "Say hi.", "output": ""}, "field 'output' is empty"),
    ("completion", {"prompt": "Say hi.", "completion": " \n"}, "field 'completion' is empty"),
    ("chat", _chat({"role": "assistant", "content": ""}), "messages[1].content is empty (an assistant turn)"),
    ("text", {"text": ""}, "field 'text' is empty"),
]


@pytest.mark.parametrize(("fmt", "row", "problem"), EMPTY_ANSWERS, ids=[e[0] for e in EMPTY_ANSWERS])
def test_an_empty_answer_is_a_bad_row(tmp_path, fmt, row, problem):
    """An empty output, completion or assistant turn trained on the end token alone, without a word; an empty text
    was already a bad row. Each is now named, or skipped and counted; `peftkit generate --data` takes rows whose
    answer is empty: there they are prompts, the answer a reference only."""
    from peftkit.data.prompts import load_prompts

    good = {"completion": {"prompt": "Say hi.", "completion": "hi"}, "text": {"text": "hi"}}.get(fmt) or GOOD[fmt]
    path = _jsonl(tmp_path, [good, row, good])
    message = _data_error(path, fmt)
    assert message.startswith(f"{path}:2: {problem} for data.format '{fmt}' (each row needs ")
    examples, stats = _load(path, fmt, on_bad_rows="skip")
    assert len(examples) == 2 and stats["bad_rows"] == 1
    if fmt != "text":  # (text rows have no prompt to generate from)
        cfg = DataConfig(train=str(path), format=fmt)
        assert len(load_prompts(TOK, str(path), "train", cfg, targets=False)) == 3


def test_null_alpaca_input_means_no_input(tmp_path):
    (example,), stats = _load(_jsonl(tmp_path, [{"instruction": "Say hi.", "input": None, "output": "hi"}]))
    assert "### Input" not in TOK.decode(example.input_ids) and stats["bad_rows"] == 0


def test_jsonl_line_nested_too_deeply(tmp_path):
    # The json module recursed into a RecursionError.
    path = _jsonl(tmp_path, [GOOD["alpaca"], "[" * 100_000 + "]" * 100_000])
    assert _data_error(path) == (f"{path}:2: not a valid JSON object (nested too deeply). Fix the line, or set "
                                 "data.on_bad_rows: skip to drop such rows.")


@pytest.mark.parametrize(("name", "content"), [
    ("train.json", b""),  # datasets raised StopIteration (a traceback)
    ("train.json", b"[]"),  # these said 'Instruction "train" corresponds to no data!'
    ("train.json", b"  \n\n "),
    ("train.json", b"{}"),
    ("train.csv", b"instruction,output\n"),
    ("train.csv", b""),  # these said "An error occurred while generating the dataset"
    ("train.txt", b""),
    ("train.parquet", b""),  # this one said "Parquet file size is 0 bytes"
    ("train.jsonl", b"\n\n  \n"),
])
def test_data_file_without_rows(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    assert _data_error(path, "text" if name.endswith(".txt") else "alpaca") == (
        f"No examples from {path}: it has no rows; point data.train/data.eval at data with examples.")


def test_unreadable_data_file_says_why(tmp_path):
    path = tmp_path / "train.parquet"
    path.write_bytes(b"not a parquet file at all")
    message = _data_error(path)
    assert message.startswith(f"Could not read data file {path}: ")
    assert "An error occurred while generating the dataset" not in message


def test_a_full_datasets_cache_is_named_not_the_data_file(tmp_path, monkeypatch):
    """datasets converts a .csv into its cache first: a full cache was "Could not read data file train.csv: Not enough
    disk space", the data file blamed and the cache unnamed."""
    import datasets

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    path = tmp_path / "train.csv"
    path.write_text("instruction,output\nAdd,two\n")
    monkeypatch.setattr(datasets, "load_dataset", full)
    message = _data_error(path)
    assert message == (f"Could not read data file {path}: the datasets library's cache, where it converts the file "
                       f"first, is full ({datasets.config.HF_DATASETS_CACHE}). Free space there, or set "
                       "HF_DATASETS_CACHE to a directory with room.")
