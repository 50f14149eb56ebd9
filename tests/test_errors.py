"""Every user mistake ends in one clear `PeftkitError` (printed by the CLI as `error: ...`, exit 2) that
names the key, the file and the line where there is one, and says how to fix it; never a traceback.

Each test makes one mistake with real files (tiny models and data built here, no mocks) and checks the
parts of the message a user needs: what is wrong, where, and what to do instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from peftkit import fileio
from peftkit.data import load_examples, load_rows
from peftkit.errors import PeftkitError
from peftkit.recipe import DataConfig, load_recipe
from peftkit.tiny import build_char_tokenizer, build_tiny_model, number_rows, write_jsonl
from tests.conftest import cli_user_error

TOK = build_char_tokenizer()

# A complete recipe written out by hand, so that a test knows the line of every key (`_line`).
RECIPE = """\
model:
  name_or_path: ./tiny-model
  dtype: float32
adapter:
  r: 4
  alpha: 8
  dropout: 0.0
  target_modules: all-linear
data:
  train: ./data/train.jsonl
  format: alpaca
  max_length: 128
training:
  max_steps: 6
  batch_size: 4
  lr: 0.01
  optimizer: adamw
  warmup_steps: 1
export:
  output_dir: ./run
eval:
  batch_size: 8
"""


def _line(text: str, start: str) -> int:
    """1-based number of the first line of `text` that starts with `start`."""
    return next(i for i, line in enumerate(text.splitlines(), 1) if line.startswith(start))


def _write(tmp_path: Path, text: str, name: str = "my-recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _error(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """The message of the PeftkitError that load_recipe must raise."""
    with pytest.raises(PeftkitError) as info:
        load_recipe(path, overrides)
    message = str(info.value)
    assert message and "Traceback" not in message
    return message


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "1000", "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "peftkit", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=120)


def _assert_user_error(result: subprocess.CompletedProcess) -> str:
    """Exit code 2, 'error: ...' on stderr, no traceback anywhere; returns stderr."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.startswith("error: "), result.stderr
    return result.stderr


# ------------------------------------------------------------------------------------------ recipe file


def test_the_base_recipe_is_valid(tmp_path):
    recipe = load_recipe(_write(tmp_path, RECIPE))
    assert recipe.adapter.r == 4 and recipe.data.train == str((tmp_path / "data" / "train.jsonl").resolve())


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    text = RECIPE.replace("  dtype: float32", " dtype: float32")  # line 3 indented by one space, not two
    message = _error(_write(tmp_path, text))
    assert message.startswith(f"{tmp_path / 'my-recipe.yaml'}:3:2: YAML syntax error")
    assert "Check indentation and quoting there." in message


def test_yaml_unclosed_quote_names_its_line(tmp_path):
    text = RECIPE.replace("  train: ./data/train.jsonl", '  train: "./data/train.jsonl')
    message = _error(_write(tmp_path, text))
    assert "while scanning a quoted scalar that starts at line 10, column 10: found unexpected end of stream" in message


def test_tab_indentation(tmp_path):
    message = _error(_write(tmp_path, RECIPE.replace("  r: 4", "\tr: 4")))
    assert message.startswith(f"{tmp_path / 'my-recipe.yaml'}:{_line(RECIPE, '  r:')}:1: YAML syntax error: ")
    assert message.endswith("found character '\\t' that cannot start any token. YAML indents with spaces, not tabs: "
                            "replace the tab.")


@pytest.mark.parametrize("text", ["", "# nothing but a comment\n", "---\n"])
def test_empty_recipe(tmp_path, text):
    message = _error(_write(tmp_path, text))
    assert message == (
        f"{tmp_path / 'my-recipe.yaml'}: the recipe is empty. A recipe needs at least the sections model, data and "
        "export; see recipes/quickstart.yaml for a complete example."
    )


@pytest.mark.parametrize(("text", "kind"), [("- model\n- data\n", "list"), ("just words\n", "str"), ("42\n", "int")])
def test_recipe_that_is_not_a_mapping(tmp_path, text, kind):
    message = _error(_write(tmp_path, text))
    assert message == (f"{tmp_path / 'my-recipe.yaml'}:1: a recipe must be a mapping of sections (model:, data:, ...), "
                       f"not a {kind}.")


def test_missing_and_unreadable_recipe_files(tmp_path):
    assert _error(tmp_path / "nope.yaml") == f"Recipe file not found: {tmp_path / 'nope.yaml'}"
    assert _error(tmp_path) == f"{tmp_path} is a directory, not a recipe file."
    (tmp_path / "recipe.yaml").write_text("model: {}\n")  # a run directory: its recipe is named
    assert _error(tmp_path) == (f"{tmp_path} is a directory, not a recipe file. It is a run directory: its recipe is "
                                f"{tmp_path / 'recipe.yaml'}.")
    # These said "Cannot read recipe ...: 'utf-8' codec can't decode byte 0xe9 in position 25": no line, no fix.
    (tmp_path / "latin1.yaml").write_bytes(b"model:  # caf\xc3\xa9\n  name_or_path: caf\xe9\n")  # line 1: a UTF-8 é
    assert _error(tmp_path / "latin1.yaml") == (
        f"{tmp_path / 'latin1.yaml'}:2: not UTF-8 text (byte 0xe9 at character 20; a file saved as Latin-1 or "
        "Windows-1252?). Save the recipe as UTF-8.")
    (tmp_path / "utf16.yaml").write_bytes(RECIPE.encode("utf-16"))
    assert _error(tmp_path / "utf16.yaml") == (f"{tmp_path / 'utf16.yaml'}:1: the recipe is UTF-16 text (it begins "
                                               "with a UTF-16 byte order mark). Save it as UTF-8.")


# Unknown keys at every level: (line of RECIPE to change, its replacement, the typo, the key meant, section).
UNKNOWN_KEYS = [
    ("training:", "trainig:", "trainig", "training", "the recipe"),
    ("model:", "modle:", "modle", "model", "the recipe"),  # a required section: no "missing 'model'" as well
    ("  name_or_path:", "  nme_or_path:", "nme_or_path", "name_or_path", "model"),
    ("  alpha:", "  alhpa:", "alhpa", "alpha", "adapter"),
    ("  format:", "  fromat:", "fromat", "format", "data"),
    ("  lr:", "  learning_rate:", "learning_rate", "lr", "training"),  # another tool's name for it
    ("  optimizer:", "  optimiser:", "optimiser", "optimizer", "training"),
    ("  output_dir:", "  ouput_dir:", "ouput_dir", "output_dir", "export"),
    ("  batch_size: 8", "  batchsize: 8", "batchsize", "batch_size", "eval"),
    ("  r:", "  lora_r:", "lora_r", "r", "adapter"),
    ("  dtype:", "  DType:", "DType", "dtype", "model"),
    ("  max_length:", "  max-length:", "max-length", "max_length", "data"),
]


@pytest.mark.parametrize(("old", "new", "typo", "meant", "section"), UNKNOWN_KEYS, ids=[u[2] for u in UNKNOWN_KEYS])
def test_unknown_key_names_line_and_suggests_the_closest(tmp_path, old, new, typo, meant, section):
    lines = RECIPE.splitlines(keepends=True)
    i = _line(RECIPE, old) - 1
    lines[i] = lines[i].replace(old, new, 1)
    text = "".join(lines)
    message = _error(_write(tmp_path, text))
    # A misspelled required key (name_or_path, output_dir) is one problem, not also "missing 'name_or_path'".
    assert message.startswith("Invalid recipe (1 problem):\n  ")
    assert f"my-recipe.yaml:{i + 1}: unknown key '{typo}' in {section}. Did you mean '{meant}'? Valid keys: " in message
    assert meant in message.split("Valid keys: ")[1]


def test_unknown_key_in_quantization_section(tmp_path):
    text = RECIPE + "quantization:\n  method: nf4\n  double_qaunt: true\n"
    message = _error(_write(tmp_path, text))
    assert (f"my-recipe.yaml:{_line(text, '  double_qaunt')}: unknown key 'double_qaunt' in quantization. "
            "Did you mean 'double_quant'?") in message


def test_unknown_key_in_target_modules_regex(tmp_path):
    text = RECIPE.replace("  target_modules: all-linear", "  target_modules:\n    regx: '.*q_proj'")
    message = _error(_write(tmp_path, text))
    assert message == ("Invalid recipe (1 problem):\n  "
                       f"{tmp_path / 'my-recipe.yaml'}:{_line(text, '    regx')}: unknown key 'regx' in "
                       "adapter.target_modules. Did you mean 'regex'? Valid keys: regex.")


def test_peft_s_bias_key_is_not_pointed_at_lora_bias(tmp_path):
    """peft's `bias: all` trains the base's biases; 'lora_bias' (what the closest-name rule suggested) is a bias of
    the update: another setting, which would have trained silently otherwise."""
    text = RECIPE.replace("  dropout: 0.0\n", "  dropout: 0.0\n  bias: all\n")
    message = _error(_write(tmp_path, text))
    assert (f"my-recipe.yaml:{_line(text, '  bias: all')}: unknown key 'bias' in adapter. peft's `bias` (all / "
            "lora_only: train the base's own biases) has no peftkit key; 'lora_bias' is another setting") in message
    assert "Did you mean" not in message


# Other tools' keys that are no spelling of one here: (line of RECIPE it follows, the line added, what is said).
FOREIGN_KEYS = [
    ("  lr:", "  bf16: true", "unknown key 'bf16' in training. transformers' `bf16: true` is training's "
     "`mixed_precision: bf16` here."),  # (no suggestion)
    ("  lr:", "  per_device_eval_batch_size: 4", "unknown key 'per_device_eval_batch_size' in training. The "
     "evaluation's batch size is eval's `batch_size` (eval: {batch_size: N})."),  # (was: Did you mean 'batch_size'?)
    ("  lr:", "  load_best_model_at_end: true", "unknown key 'load_best_model_at_end' in training. `export.best: true` "
     "exports the adapter of the best evaluation instead of the last."),
    ("  dtype:", "  load_in_4bit: true", "unknown key 'load_in_4bit' in model. A 4-bit base is a `quantization:` "
     "section (top level: method nf4, double_quant ...)."),
    ("training:", "quantization: {load_in_4bit: true}", "unknown key 'load_in_4bit' in quantization. Here a 4-bit "
     "base is `method: nf4`"),  # (was: "A 4-bit base is a `quantization:` section", where it was written)
    ("  lr:", "  wandb_project: x", "unknown key 'wandb_project' in training. The W&B project is the run directory's "
     "name"),  # (was: Did you mean 'nan_policy'?)
    ("training:", "learning_rate: 2.0e-4", "unknown key 'learning_rate' in the recipe: it is training's 'lr' here; "
     "write it under 'training:' as 'lr'."),  # axolotl's flat recipe (no suggestion)
    ("training:", "base_model: acme/tiny", "unknown key 'base_model' in the recipe: it is model's 'name_or_path' "
     "here; write it under 'model:' as 'name_or_path'."),  # (was: "it is a key of 'eval:'", eval's base_model a bool)
    ("  lr:", "  sequence_len: 256", "unknown key 'sequence_len' in training: it is data's 'max_length' here; write "
     "it under 'data:' as 'max_length'."),
    # TRL's preference settings (was: Did you mean 'kto_beta'? / 'log_steps'? / 'early_stopping'? / 'orpo_lambda'?)
    ("  lr:", "  beta: 0.1", "unknown key 'beta' in training. TRL's `beta` is training's `dpo_beta` here"),
    ("  lr:", "  loss_type: ipo", "unknown key 'loss_type' in training. TRL's DPO `loss_type` is training's "
     "`dpo_loss` here (sigmoid, ipo or hinge)"),
    ("  lr:", "  label_smoothing: 0.1", "unknown key 'label_smoothing' in training. TRL's `label_smoothing` "
     "(conservative DPO, the robust loss) has no peftkit setting"),
    ("  lr:", "  rpo_alpha: 1.0", "unknown key 'rpo_alpha' in training. TRL's `rpo_alpha` (an SFT loss on the chosen "
     "answers added to DPO's) has no peftkit setting"),
    ("  lr:", "  max_prompt_length: 64", "unknown key 'max_prompt_length' in training. peftkit does not cut a prompt "
     "apart from its answer: data's `max_length` bounds each prompt with its answer"),
    ("  lr:", "  ref_model: x", "unknown key 'ref_model' in training. The DPO and KTO reference is the model training "
     "starts from"),
    ("  lr:", "  precompute_ref_log_probs: true", "unknown key 'precompute_ref_log_probs' in training. peftkit "
     "computes the reference's log-probabilities once, before training, always"),
]


@pytest.mark.parametrize(("after", "added", "said"), FOREIGN_KEYS, ids=[f[1].split(":")[0].strip() for f in FOREIGN_KEYS])
def test_other_tools_keys_are_pointed_at_what_they_are_here(tmp_path, after, added, said):
    """transformers', axolotl's and W&B's names that no spelling rule maps (`bf16`, `load_in_4bit`), that the
    closest spelling mapped wrong (`per_device_eval_batch_size` to training's batch_size), or that belong to another
    section here (axolotl's flat `learning_rate` at the top level) say what to write instead."""
    lines = RECIPE.splitlines(keepends=True)
    i = _line(RECIPE, after) - 1
    lines.insert(i + 1 if added.startswith(" ") else i, f"{added}\n")  # (a top-level key: before the section)
    text = "".join(lines)
    message = _error(_write(tmp_path, text))
    assert f"my-recipe.yaml:{_line(text, added)}: {said}" in message, message
    assert "Did you mean" not in message


def test_report_to_takes_one_tracker_as_transformers_does(tmp_path):
    """`report_to: wandb` (transformers' TrainingArguments' form) was "must be a valid list": a list of one; `none`
    is none, and `[none]`, transformers' list form of it (was "must be one of 'tensorboard', 'wandb' or
    'mlflow'")."""
    for value, trackers in (("tensorboard", ["tensorboard"]), ("none", []), ("[none]", []), ('["none"]', [])):
        text = RECIPE.replace("training:\n", f"training:\n  report_to: {value}\n")
        assert load_recipe(_write(tmp_path, text)).training.report_to == trackers


def test_unknown_key_far_from_any_valid_one_lists_the_valid_keys(tmp_path):
    text = RECIPE.replace("  dropout: 0.0\n", "  dropout: 0.0\n  zzzz: 1\n")
    message = _error(_write(tmp_path, text))
    assert "unknown key 'zzzz' in adapter. Valid keys: method, r, alpha, dropout, target_modules" in message
    assert "Did you mean" not in message


def test_unknown_key_of_another_method_names_the_chosen_method_and_its_keys(tmp_path):
    """The adapter section is a union chosen by `method:`; an error lists the chosen method's keys only."""
    text = RECIPE.replace("adapter:\n", "adapter:\n  method: ia3\n").replace("  alpha: 8\n  dropout: 0.0\n", "")
    message = _error(_write(tmp_path, text))
    assert message == ("Invalid recipe (1 problem):\n  "
                       f"{tmp_path / 'my-recipe.yaml'}:{_line(text, '  r: 4')}: unknown key 'r' in adapter: IA3 "
                       "(method: ia3) has no 'r'. Valid keys for method ia3: method, target_modules, "
                       "feedforward_modules, modules_to_save, exclude_modules, init_from.")
    lora = _error(_write(tmp_path, RECIPE.replace("  dropout: 0.0\n", "  feedforward_modules: [down_proj]\n")))
    assert ("unknown key 'feedforward_modules' in adapter: LoRA (method: lora) has no 'feedforward_modules'. Did you "
            "mean 'target_modules'? Valid keys for method lora: method, r, alpha,") in lora
    ia3 = _write(tmp_path, RECIPE.replace("adapter:\n  r: 4\n  alpha: 8\n  dropout: 0.0\n", "adapter:\n  method: ia3\n"))
    assert _error(ia3, ["adapter.r=8"]) == ("--set adapter.r: unknown key 'r' in adapter: IA3 (method: ia3) has no "
                                            "'r'. Valid keys for method ia3: method, target_modules, "
                                            "feedforward_modules, modules_to_save, exclude_modules, init_from.")
    assert load_recipe(ia3).adapter.feedforward_modules is None  # peft's default for the architecture


def test_unknown_method(tmp_path):
    text = RECIPE.replace("adapter:\n", "adapter:\n  method: lorra\n")
    assert _error(_write(tmp_path, text)) == ("Invalid recipe (1 problem):\n  "
                                              f"{tmp_path / 'my-recipe.yaml'}:{_line(text, '  method')}: "
                                              "'adapter.method' = 'lorra': must be one of 'lora', 'ia3', 'loha', 'lokr', "
                                              "'vera', 'adalora', 'oft', 'hra', 'boft', 'trainable_tokens', "
                                              "'llama_adapter', 'bottleneck', "
                                              "'prompt_tuning', 'p_tuning', 'prefix_tuning', 'multitask_prompt_tuning', "
                                              "'fusion', 'ln_tuning', 'fourierft', 'randlora', 'vblora', 'miss', 'delora', "
                                              "'road', 'hira', 'c3a', 'shira', 'beft', 'supertuning', "
                                              "'gralora', 'deft', 'peanut', "
                                              "'pvera', 'tinylora', 'psoft', 'glora', 'unilora', 'lily', 'cartridge', 'osf', 'frod', 'waveft', 'poly', 'adamss', 'shadow', 'xlora', 'cpt'.")


def test_bad_regex_in_target_modules(tmp_path):
    text = RECIPE.replace("  target_modules: all-linear", "  target_modules:\n    regex: 'q_proj('")
    message = _error(_write(tmp_path, text))
    assert f"my-recipe.yaml:{_line(text, '    regex')}: 'adapter.target_modules.regex' = 'q_proj(': is not a valid " \
           "regular expression (missing ), unterminated subpattern" in message


# (line of RECIPE to replace, replacement, expected message after "file:line: ")
BAD_VALUES = [
    ("  r: 4", "  r: four", "'adapter.r' = 'four': must be a valid integer, unable to parse string as an integer"),
    ("  r: 4", "  r: 4.5", "'adapter.r' = 4.5: must be a valid integer, got a number with a fractional part"),
    ("  lr: 0.01", "  lr: fast", "'training.lr' = 'fast': must be a valid number, unable to parse string as a number"),
    ("  max_length: 128", "  max_length: [128]", "'data.max_length' = list: must be a valid integer"),
    ("  name_or_path: ./tiny-model", "  name_or_path: [a, b]", "'model.name_or_path' = list: must be a valid string"),
    ("  target_modules: all-linear", "  target_modules: 5",
     "'adapter.target_modules' = 5: must be 'all-linear', a list of module-name suffixes, or {regex: PATTERN}"),
    ("  target_modules: all-linear", "  target_modules: []",
     "'adapter.target_modules' = list: is an empty list; name at least one module, or use 'all-linear'"),
    # `[all-linear]` passed validate, then train said after loading the model that it matched no module
    ("  target_modules: all-linear", "  target_modules: [all-linear]",
     "'adapter.target_modules' = list: lists 'all-linear', which is a value of its own, not a module name; write "
     "`target_modules: all-linear` (not in a list)"),
    ("  target_modules: all-linear", "  target_modules: [all-linear, lm_head]",
     "'adapter.target_modules' = list: lists 'all-linear', which is a value of its own, not a module name; write "
     "`target_modules: all-linear` (not in a list), or list module names only"),
    ("  max_steps: 6", "  max_steps: lots",
     "'training.max_steps' = 'lots': must be a positive integer, or null to train for `epochs`"),
    ("eval:\n  batch_size: 8", "eval: fast", "'eval' = 'fast': must be a valid dictionary (a section of keys)"),
    ("  dtype: float32", "  dtype: fp32",
     "'model.dtype' = 'fp32': must be one of 'float32', 'bfloat16', 'float16' or 'auto'"),
    # Out of range.
    ("  r: 4", "  r: 0", "'adapter.r' = 0: must be greater than 0"),
    ("  r: 4", "  r: -8", "'adapter.r' = -8: must be greater than 0"),
    ("  lr: 0.01", "  lr: 0", "'training.lr' = 0: must be greater than 0"),
    ("  lr: 0.01", "  lr: -1.0e-3", "'training.lr' = -0.001: must be greater than 0"),
    ("  lr: 0.01", "  lr: .inf", "'training.lr' = inf: must be a finite number"),
    ("  dropout: 0.0", "  dropout: 1.0", "'adapter.dropout' = 1.0: must be less than 1"),
    ("  dropout: 0.0", "  dropout: -0.1", "'adapter.dropout' = -0.1: must be greater than or equal to 0"),
    ("  max_steps: 6", "  max_steps: 0", "'training.max_steps' = 0: must be a positive integer, or null to train for `epochs`"),
    ("  max_length: 128", "  max_length: 0", "'data.max_length' = 0: must be greater than 0"),
    # Literal choices.
    ("  format: alpaca", "  format: sharegpt",
     "'data.format' = 'sharegpt': must be one of 'alpaca', 'chat', 'completion', 'text', 'classification', "
     "'preference', 'unpaired' or 'tokenized'"),
    ("  optimizer: adamw", "  optimizer: adam",
     "'training.optimizer' = 'adam': must be one of 'adamw', 'adamw_8bit', 'paged_adamw_8bit', 'paged_adamw_32bit' "
     "or 'sgd'"),
]


@pytest.mark.parametrize(("old", "new", "expected"), BAD_VALUES, ids=[b[1].strip() for b in BAD_VALUES])
def test_bad_value_names_key_line_and_what_is_allowed(tmp_path, old, new, expected):
    text = RECIPE.replace(old, new, 1)
    message = _error(_write(tmp_path, text))
    assert message == f"Invalid recipe (1 problem):\n  {tmp_path / 'my-recipe.yaml'}:{_line(text, new)}: {expected}."


@pytest.mark.parametrize("method", ["lora", "ia3", "loha", "lokr", "vera", "adalora", "oft", "hra", "boft",
                                    "trainable_tokens", "randlora", "vblora", "miss", "delora", "road", "hira", "c3a",
                                    "shira", "beft", "supertuning",
                                    "gralora",
                                    "deft", "peanut",
                                    "pvera",
                                    "tinylora",
                                    "psoft",
                                    "glora",
                                    "unilora",
                                    "lily",
                                    "osf",
                                    "frod",
                                    "waveft",
                                    "poly",
                                    "adamss",
                                    "shadow"])
def test_all_linear_in_a_list_is_refused_by_every_method_with_target_modules(tmp_path, method):
    """`[all-linear]` passed validate, and train said after loading the model that entry 'all-linear' matched no
    module; trainable_tokens and shadow (whose targets are decoder blocks) have no all-linear at all."""
    text = RECIPE.replace("  r: 4\n  alpha: 8\n  dropout: 0.0\n", "").replace(
        "  target_modules: all-linear", f"  method: {method}\n  token_indices: [0]\n  target_modules: [all-linear]")
    if method != "trainable_tokens":
        text = text.replace("  token_indices: [0]\n", "")
    fix = ("which is no module name (and this method has no all-linear); list the modules by name" if
           method in ("trainable_tokens", "shadow") else
           "which is a value of its own, not a module name; write `target_modules: all-linear` (not in a list)")
    assert _error(_write(tmp_path, text)) == (
        f"Invalid recipe (1 problem):\n  {tmp_path / 'my-recipe.yaml'}:{_line(text, '  target_modules')}: "
        f"'adapter.target_modules' = list: lists 'all-linear', {fix}.")


def test_training_compile_names_its_choices(tmp_path):
    message = _error(_write(tmp_path, RECIPE.replace("  warmup_steps: 1", "  warmup_steps: 1\n  compile: fast")))
    assert "'training.compile' = 'fast': must be one of False, True, 'inductor' or 'aot_eager'" in message


def test_training_seed_must_fit_the_rng(tmp_path):
    # torch.manual_seed overflows past 2**64 and the data order seeds with seed x 1_000_003.
    message = _error(_write(tmp_path, RECIPE.replace("  warmup_steps: 1", "  warmup_steps: 1\n  seed: 1099511627776")))
    assert "'training.seed' = 1099511627776: must be less than or equal to 4294967295" in message


def test_empty_section_says_so(tmp_path):
    text = RECIPE.replace("eval:\n  batch_size: 8\n", "eval:\n")
    message = _error(_write(tmp_path, text))
    assert (f"my-recipe.yaml:{_line(text, 'eval:')}: 'eval' = None: the section is empty; indent its keys under it, "
            "or delete the line to use the defaults.") in message
    text = RECIPE.replace("export:\n  output_dir: ./run\n", "export:\n")  # required: no defaults to fall back on
    message = _error(_write(tmp_path, text))
    assert (f"my-recipe.yaml:{_line(text, 'export:')}: 'export' = None: the section is empty; indent its keys under "
            "it (the section is required).") in message


def test_an_empty_optional_section_is_not_silently_none(tmp_path):
    """`quantization:` with nothing under it is YAML's null, which meant "no quantization": a QLoRA recipe trained a
    full-precision base without a word. An explicit null (or --set quantization=null) still means none."""
    text = RECIPE.replace("training:\n", "quantization:\ntraining:\n  early_stopping:\n")
    path = _write(tmp_path, text)
    assert _error(path) == (
        "Invalid recipe (2 problems):\n"
        f"  {path}:{_line(text, 'quantization:')}: 'quantization' = None: the section is empty, which would mean no "
        "quantization at all; indent its keys under it, write 'quantization: {}' for its defaults, or write "
        "'quantization: null' (or delete the line) to go without it.\n"
        f"  {path}:{_line(text, '  early_stopping:')}: 'training.early_stopping' = None: the section is empty, which "
        "would mean no early_stopping at all; indent its keys under it, write 'early_stopping: {}' for its defaults, "
        "or write 'early_stopping: null' (or delete the line) to go without it.")
    recipe = load_recipe(path, ["quantization.method=nf4", "training.early_stopping=null"])
    assert recipe.quantization.method == "nf4" and recipe.training.early_stopping is None
    assert load_recipe(_write(tmp_path, text.replace("quantization:", "quantization: null").replace(
        "early_stopping:", "early_stopping: ~"), "explicit.yaml")).quantization is None


def test_warmup_longer_than_the_run(tmp_path):
    text = RECIPE.replace("  warmup_steps: 1", "  warmup_steps: 10")
    message = _error(_write(tmp_path, text))
    assert message == ("Invalid recipe (1 problem):\n  "
                       f"{tmp_path / 'my-recipe.yaml'}:{_line(text, '  warmup_steps')}: training: warmup_steps (10) is larger "
                       "than max_steps (6); lower warmup_steps.")


def test_an_unquoted_no_is_mixed_precision_no(tmp_path):
    """`mixed_precision: no`, as the README writes it, is YAML 1.1's false; it reads as `no`, in a file and in
    --set (a true is still refused: it names no mode)."""
    path = _write(tmp_path, RECIPE.replace("  warmup_steps: 1", "  warmup_steps: 1\n  mixed_precision: no"))
    assert load_recipe(path).training.mixed_precision == "no"
    overridden = load_recipe(_write(tmp_path, RECIPE, "plain.yaml"), ["training.mixed_precision=no"])
    assert overridden.training.mixed_precision == "no"
    with pytest.raises(PeftkitError, match="'training.mixed_precision' = True: must be one of 'auto', 'no'"):
        load_recipe(path, ["training.mixed_precision=yes"])


def test_fp16_with_a_4bit_base(tmp_path):
    text = RECIPE.replace("  warmup_steps: 1", "  warmup_steps: 1\n  mixed_precision: fp16") + "quantization:\n  method: nf4\n"
    message = _error(_write(tmp_path, text))
    # A check across sections points at the key its message starts with.
    assert (f"{tmp_path / 'my-recipe.yaml'}:{_line(text, '  mixed_precision: fp16')}: training.mixed_precision: fp16 "
            "with a 4-bit base overflows easily; use bf16 or auto.") in message



def test_a_loraplus_embedding_rate_without_loraplus(tmp_path):
    """training.loraplus_lr_embedding without loraplus_lr_ratio was ignored without a word: the embedding's LoRA
    trained at training.lr. It is a warning when training starts, not a recipe error: a run made before that was said
    has it in its recipe.yaml, which `peftkit eval RUN_DIR`, --resume and verify must still load."""
    from peftkit.errors import PeftkitWarning
    from peftkit.start_checks import _check_loraplus

    text = RECIPE.replace("  warmup_steps: 1", "  warmup_steps: 1\n  loraplus_lr_embedding: 1.0e-5")
    recipe = load_recipe(_write(tmp_path, text))
    assert load_recipe(_write(tmp_path, recipe.to_yaml())).training.loraplus_lr_embedding == 1e-5  # a run's copy
    with pytest.warns(PeftkitWarning) as caught:
        _check_loraplus(recipe.training)
    assert str(caught[0].message) == (
        "training.loraplus_lr_embedding: 1e-05 is the learning rate of an embedding's LoRA under LoRA+, and "
        "training.loraplus_lr_ratio is null (LoRA+ off: every parameter trains at training.lr), so it is ignored; set "
        "loraplus_lr_ratio (e.g. 16), or remove loraplus_lr_embedding.")
    with_ratio = text.replace("  warmup_steps: 1\n", "  warmup_steps: 1\n  loraplus_lr_ratio: 16\n")
    default = text.replace("1.0e-5", "1.0e-6")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for quiet in (with_ratio, default):
            _check_loraplus(load_recipe(_write(tmp_path, quiet)).training)


def test_fp16_with_fp16_modules_trained_in_full(tmp_path):
    text = (RECIPE.replace("  warmup_steps: 1", "  warmup_steps: 1\n  mixed_precision: fp16")
            .replace("dtype: float32", "dtype: float16").replace("  dropout: 0.0", "  dropout: 0.0\n  modules_to_save: [lm_head]"))
    message = _error(_write(tmp_path, text))
    assert (f"{tmp_path / 'my-recipe.yaml'}:{_line(text, '  mixed_precision: fp16')}: training.mixed_precision: fp16 "
            "unscales fp32 gradients only, and with "
            "model.dtype: float16 the modules trained in full") in message
    assert "set model.dtype: float32" in message
    _ = load_recipe(_write(tmp_path, text.replace("dtype: float16", "dtype: float32")))  # fp32 weights: accepted


@pytest.mark.parametrize(("remove", "key", "where"), [
    ("model:\n  name_or_path: ./tiny-model\n  dtype: float32\n", "model", "as a top-level section"),
    ("  name_or_path: ./tiny-model\n", "model.name_or_path", "under 'model:'"),
    ("  train: ./data/train.jsonl\n", "data.train", "under 'data:'"),
    ("export:\n  output_dir: ./run\n", "export", "as a top-level section"),
    ("  output_dir: ./run\n", "export.output_dir", "under 'export:'"),
])
def test_missing_required_key(tmp_path, remove, key, where):
    text = RECIPE.replace(remove, "")
    if key == "export.output_dir":
        text = text.replace("export:\n", "export:\n  adapter: true\n")
    message = _error(_write(tmp_path, text))
    assert f"missing required key '{key}'. Add '{key.split('.')[-1]}:' {where}; recipes/quickstart.yaml shows a " \
           "complete recipe." in message
    assert "my-recipe.yaml" in message
    if "." in key:  # the line of the section it belongs in
        assert f"my-recipe.yaml:{_line(text, key.split('.')[0] + ':')}: missing" in message


def test_several_problems_are_reported_together(tmp_path):
    text = RECIPE.replace("  r: 4", "  r: 0").replace("  lr: 0.01", "  lr: -1").replace("  format: alpaca", "  fromat: alpaca")
    message = _error(_write(tmp_path, text))
    assert message.startswith("Invalid recipe (3 problems):\n  ")
    assert [line.split(": ", 1)[0].rsplit(":", 1)[1] for line in message.splitlines()[1:]] == [
        str(_line(text, "  r:")), str(_line(text, "  fromat:")), str(_line(text, "  lr:"))]


def test_non_string_key(tmp_path):
    text = RECIPE.replace("  dropout: 0.0\n", "  dropout: 0.0\n  1: x\n")
    message = _error(_write(tmp_path, text))
    assert ("key 1 in adapter is not a name (YAML read it as a number); quote it if it is meant as one. Valid keys: "
            "method, r") in message


@pytest.mark.parametrize(("pattern", "key", "read_as"), [
    ("\n    q_proj: 4\n    yes: 2", "yes", "a boolean"), ("\n    1: 2", "1", "a number"),
    (" {q_proj: 4, null: 2}", "null", "null")])
def test_non_string_key_in_a_mapping_value(tmp_path, pattern, key, read_as):
    """A key of `rank_pattern:` was "'adapter.rank_pattern.1' = True: must be a valid string", on the line of
    rank_pattern, with a path that is no key and no fix."""
    text = RECIPE.replace("  dropout: 0.0\n", f"  dropout: 0.0\n  rank_pattern:{pattern}\n")
    line = _line(text, f"    {key}:") if pattern.startswith("\n") else _line(text, "  rank_pattern:")
    said = (f"key {key} in adapter.rank_pattern is not a name (YAML read it as {read_as}); quote it if it is meant "
            "as one.")
    assert _error(_write(tmp_path, text)) == f"Invalid recipe (1 problem):\n  {tmp_path / 'my-recipe.yaml'}:{line}: {said}"
    said = said.replace(f"key {key}", f"key {yaml.safe_load(key)!r}")  # (as YAML read it: a --set has no lines)
    assert _error(_write(tmp_path, RECIPE), [f"adapter.rank_pattern={{{key}: 2}}"]) == (
        f"Invalid recipe (1 problem):\n  {tmp_path / 'my-recipe.yaml'} (--set adapter.rank_pattern): {said}")


@pytest.mark.parametrize(("value", "tag"), [("!!int abc", "int"), ("!!bool maybe", "bool"), ("!!timestamp soon", "timestamp")])
def test_value_with_an_explicit_tag_it_does_not_fit(tmp_path, value, tag):
    # PyYAML's own constructors raise ValueError/KeyError/AttributeError here, not a YAMLError.
    text = RECIPE.replace("  r: 4", f"  r: {value}")
    assert _error(_write(tmp_path, text)) == (
        f"{tmp_path / 'my-recipe.yaml'}:{_line(text, '  r:')}:6: YAML error: {value.split()[1]!r} cannot be read as "
        f"{tag}. Remove the explicit !!tag or fix the value.")


def test_recursive_yaml_alias(tmp_path):
    text = RECIPE + "junk: &loop [1, *loop]\n"
    assert _error(_write(tmp_path, text)) == (
        f"{tmp_path / 'my-recipe.yaml'}:{_line(text, 'junk')}: a YAML alias (*name) is used inside its own anchor "
        "(&name), which makes an endlessly nested value. Write the value out instead.")


@pytest.mark.parametrize(("old", "new", "reason"), [
    ("./tiny-model", "~peftkit-no-such-user-x/model", "Could not determine home directory"),
    ("./data/train.jsonl", "./" + "d" * 300 + ".jsonl", "File name too long"),
])
def test_unusable_path(tmp_path, old, new, reason):
    text = RECIPE.replace(old, new)
    key = "model.name_or_path" if old == "./tiny-model" else "data.train"
    message = _error(_write(tmp_path, text))
    assert message.startswith(f"{tmp_path / 'my-recipe.yaml'}:{_line(text, '  ' + key.split('.')[1])}: '{key}' = ")
    assert f"is not a usable path ({reason})" in message
    assert "Give an existing path (relative to the recipe's directory) or a hub id." in message
    assert ("..." in message) == (len(new) > 80)  # a value cut to 80 characters says so


def test_an_unusable_output_dir_gets_an_output_s_advice(tmp_path):
    message = _error(_write(tmp_path, RECIPE.replace("output_dir: ./run", "output_dir: ./" + "o" * 300)))
    assert "is not a usable path (File name too long). Give a directory path that can be created." in message


# ------------------------------------------------------------------------------------------ --set


@pytest.mark.parametrize(("override", "expected"), [
    ("training.learning_rate=1e-3",
     "--set training.learning_rate: unknown key 'learning_rate' in training. Did you mean 'lr'? Valid keys: max_steps"),
    ("trainig.lr=1e-3", "--set trainig.lr: unknown key 'trainig' in the recipe. Did you mean 'training'? Valid keys: "),
    ("adapter.rank=16", "--set adapter.rank: unknown key 'rank' in adapter. Did you mean 'r'?"),
    ("adapter.target_modules.regx=q_proj",
     "--set adapter.target_modules.regx: unknown key 'regx' in adapter.target_modules. Did you mean 'regex'?"),
    ("training.lr", "--set 'training.lr': expected KEY=VALUE, for example --set training.lr=2e-4"),
    ("=3", "--set '=3': expected KEY=VALUE, for example --set training.lr=2e-4"),
    ("training.lr.x=1", "--set training.lr.x: 'training.lr' is a value, not a section with keys; set it whole: "
     "--set training.lr=VALUE."),
    # an entry of a list: these said "unknown key '0' in adapter.target_modules ... Valid keys: regex"
    ("adapter.target_modules.0=q_proj", "--set adapter.target_modules.0: 'adapter.target_modules' is a value, not a "
     "section with keys; set it whole: --set adapter.target_modules=[...]."),
    ("training.lr=[", "--set training.lr=[: the value is not valid YAML (expected the node content, but found "
     "'<stream end>'). Quote a string value, for example --set 'training.lr=\"[\"'."),
    # a key of another section: said as a recipe file's is (it was "Did you mean 'lr'?" for training.r)
    ("training.r=16", "--set training.r: unknown key 'r' in training: it is a key of 'adapter:'; use --set adapter.r=16."),
    ("lr=1", "--set lr: unknown key 'lr' in the recipe: it is a key of 'training:'; use --set training.lr=1."),
    ("data.batch_size=4", "--set data.batch_size: unknown key 'batch_size' in data: it is a key of 'training:' and of "
     "'eval:'; use --set training.batch_size=4 or --set eval.batch_size=4."),
    # of two homes, the one that takes the value (it named quantization.method for lora too)
    ("model.method=lora", "--set model.method: unknown key 'method' in model: it is a key of 'adapter:'; use --set "
     "adapter.method=lora."),
    ("model.method=nf4", "--set model.method: unknown key 'method' in model: it is a key of 'quantization:'; use "
     "--set quantization.method=nf4."),
    ("model.method=[lora]", "--set model.method: unknown key 'method' in model: it is a key of 'quantization:' and of "
     "'adapter:'; use --set quantization.method=[lora] or --set adapter.method=[lora]."),  # a list: no traceback
    ("data.batch_size=x", "--set data.batch_size: unknown key 'batch_size' in data: it is a key of 'training:' and of "
     "'eval:'; use --set training.batch_size=x or --set eval.batch_size=x."),
    # another tool's name for another section's key, as a recipe file's says it (was "Did you mean 'max_steps'?",
    # "'target_parameters'?", "'num_workers'?": other settings)
    ("training.max_seq_length=100", "--set training.max_seq_length: unknown key 'max_seq_length' in training: it is "
     "data's 'max_length' here; use --set data.max_length=100."),
    ("adapter.learning_rate=1e-4", "--set adapter.learning_rate: unknown key 'learning_rate' in adapter: it is "
     "training's 'lr' here; use --set training.lr=1e-4."),
    ("data.num_epochs=2", "--set data.num_epochs: unknown key 'num_epochs' in data: it is training's 'epochs' here; "
     "use --set training.epochs=2."),
    ("lora_r=8", "--set lora_r: unknown key 'lora_r' in the recipe: it is adapter's 'r' here; use --set adapter.r=8."),
    ("eval.micro_batch_size=4", "--set eval.micro_batch_size: unknown key 'micro_batch_size' in eval. Did you mean "
     "'batch_size'?"),  # (its own section's: eval's)
])
def test_bad_override(tmp_path, override, expected):
    assert _error(_write(tmp_path, RECIPE), [override]).startswith(expected)


def test_an_override_into_a_list_says_to_set_it_whole(tmp_path):
    path = _write(tmp_path, RECIPE.replace("target_modules: all-linear", "target_modules: [q_proj, v_proj]"))
    assert _error(path, ["adapter.target_modules.1=k_proj"]) == (
        "--set adapter.target_modules.1: 'adapter.target_modules' is a value, not a section with keys; set it whole: "
        "--set adapter.target_modules=[...].")
    assert load_recipe(path, ["adapter.target_modules=[k_proj]"]).adapter.target_modules == ["k_proj"]


def test_override_with_a_bad_value_names_the_override(tmp_path):
    message = _error(_write(tmp_path, RECIPE), ["training.lr=0", "adapter.r=8"])
    assert message == (f"Invalid recipe (1 problem):\n  {tmp_path / 'my-recipe.yaml'} (--set training.lr): "
                       "'training.lr' = 0: must be greater than 0.")


@pytest.mark.parametrize(("override", "expected"), [
    ("adapter.method=lroa", "(--set adapter.method): 'adapter.method' = 'lroa': must be one of"),
    ("training={max_steps: 0}", "(--set training): 'training.max_steps' = 0: must be a positive integer"),
    ("model.name_or_path=~peftkit-no-such-user-x/m", "(--set model.name_or_path): 'model.name_or_path' = "),
    ('data.eval=""', "(--set data.eval): 'data.eval' is empty. Give a path"),
])
def test_a_mistake_made_by_a_set_names_the_set_not_a_line_of_the_file(tmp_path, override, expected):
    message = _error(_write(tmp_path, RECIPE), [override])
    assert f"{tmp_path / 'my-recipe.yaml'} {expected}" in message, message


def test_a_check_across_a_section_names_the_set_inside_it(tmp_path):
    message = _error(_write(tmp_path, RECIPE), ["training.warmup_steps=10"])
    assert f"my-recipe.yaml:{_line(RECIPE, 'training:')} (with --set training.warmup_steps): training: " in message


@pytest.mark.parametrize("override", ["data.format=classification", "data={format: classification, train: t.jsonl}"])
def test_a_check_across_sections_names_the_set_it_names(tmp_path, override):
    """The file's model.task (causal_lm, by default) against a --set data.format was blamed on line 1 (`model:`)
    alone, the --set that made it unsaid."""
    message = _error(_write(tmp_path, RECIPE), [override])
    assert message == (f"Invalid recipe (1 problem):\n  {tmp_path / 'my-recipe.yaml'}:1 (with --set "
                       f"{override.split('=')[0]}): model.task is 'causal_lm' and data.format is 'classification': a "
                       "sequence_classification model trains on data.format: classification (text, label, optional "
                       "text_pair) and that format needs it; set both, or neither.")


def test_an_empty_path_in_the_file_is_refused(tmp_path):
    text = RECIPE.replace("output_dir: ./run", 'output_dir: ""')  # Path("") would be the recipe's own directory
    assert _error(_write(tmp_path, text)).startswith(
        f"{tmp_path / 'my-recipe.yaml'}:{_line(text, '  output_dir')}: 'export.output_dir' is empty.")


@pytest.mark.parametrize(("where", "key", "home"), [
    ("training:\n", "max_length: 256", "it is a key of 'data:'; move it there."),  # not "Did you mean max_steps?"
    ("eval:\n", "seed: 3", "it is a key of 'training:'; move it there."),
    ("data:\n", "batch_size: 2", "it is a key of 'training:' and of 'eval:'; move it under the one you mean."),
    ("model:\n", "method: ia3", "it is a key of 'adapter:'; move it there."),
])
def test_a_key_written_in_another_section_says_where_it_belongs(tmp_path, where, key, home):
    text = RECIPE.replace(where, f"{where}  {key}\n")
    section, name = where.strip(" :\n"), key.split(":")[0]
    assert _error(_write(tmp_path, text)).endswith(
        f"{tmp_path / 'my-recipe.yaml'}:{_line(text, '  ' + key)}: unknown key '{name}' in {section}: {home}")


def test_a_list_as_a_key_is_a_clear_error(tmp_path):
    text = RECIPE.replace("  r: 4\n", "  ? [r, alpha]\n  : 4\n")
    assert f"my-recipe.yaml:{_line(text, '  ? [r')}:5: a key must be a plain name, not a list or a mapping" in _error(
        _write(tmp_path, text))


def test_an_unusable_fuse_directory_names_its_entry(tmp_path):
    text = RECIPE.replace("  r: 4\n  alpha: 8\n  dropout: 0.0\n  target_modules: all-linear\n",
                          "  method: fusion\n  fuse: [./a, ~peftkit-no-such-user-x/b]\n")
    message = _error(_write(tmp_path, text))
    assert f"my-recipe.yaml:{_line(text, '  fuse')}: 'adapter.fuse[1]' = '~peftkit-no-such-user-x/b' is not a " \
           "usable path (Could not determine home directory)" in message


# ------------------------------------------------------------------------------------------ data


def _data_cfg(path: Path, **kw) -> DataConfig:
    return DataConfig(train=str(path), **{"max_length": 256, **kw})


def _data_error(path: Path, **kw) -> str:
    with pytest.raises(PeftkitError) as info:
        load_examples(TOK, str(path), "train", _data_cfg(path, **kw))
    return str(info.value)


def test_missing_data_file(tmp_path):
    missing = tmp_path / "data" / "trian.jsonl"
    assert _data_error(missing) == (
        f"Data file not found: {missing}. Check the path: a relative one is resolved against the recipe's directory "
        "in a recipe (data.train, data.eval), against the current directory in --data.")


def test_data_path_that_is_a_directory(tmp_path):
    """A directory is read as a dataset save_to_disk wrote (tests/test_saved_data.py); another is said as not one."""
    (tmp_path / "data.jsonl").mkdir()
    assert _data_error(tmp_path / "data.jsonl") == (
        f"Data path {tmp_path / 'data.jsonl'} is a directory without state.json or dataset_dict.json, so not a "
        "dataset saved with datasets' save_to_disk (a Dataset's directory holds state.json beside its arrow files, a "
        "DatasetDict's dataset_dict.json and a directory a split). Point it at such a directory, or at a "
        ".json/.jsonl/.csv/.parquet/.txt file.")


def test_data_file_with_unknown_extension(tmp_path):
    (tmp_path / "train.yaml").write_text("a: 1\n")
    assert _data_error(tmp_path / "train.yaml").startswith(
        f"Data file {tmp_path / 'train.yaml'}: unknown extension '.yaml'. Use one of .json, .jsonl")


def _jsonl(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD = '{"instruction": "Write the number in words.", "input": "7", "output": "seven"}'


def test_malformed_jsonl_line_is_reported_by_number(tmp_path):
    path = _jsonl(tmp_path, [GOOD, "", '{"instruction": "x", "output": "y"', GOOD])
    message = _data_error(path)
    assert message.startswith(f"{path}:3: not a valid JSON object (")
    assert message.endswith("Fix the line, or set data.on_bad_rows: skip to drop such rows.")


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = _jsonl(tmp_path, [GOOD, '["a", "list"]'])
    assert _data_error(path).startswith(f"{path}:2: not a valid JSON object (expected a JSON object, got list).")


def test_row_missing_the_format_fields_names_its_line(tmp_path):
    # Blank lines do not shift the number: the message names the file line, not the row index.
    path = _jsonl(tmp_path, [GOOD, "", "", '{"instruction": "Write the number in words.", "input": "8"}', GOOD])
    assert _data_error(path) == (
        f"{path}:4: missing field 'output' for data.format 'alpaca' (each row needs instruction, output). Fix the "
        "row, set the right data.format, or set data.on_bad_rows: skip.")


def test_rows_of_another_format(tmp_path):
    path = _jsonl(tmp_path, [GOOD])
    assert _data_error(path, format="completion").startswith(
        f"{path}:1: missing field 'prompt' for data.format 'completion' (each row needs prompt, completion).")
    path = _jsonl(tmp_path, ['{"instruction": "Say hi.", "output": 7}'])
    assert _data_error(path).startswith(f"{path}:1: field 'output' must be a string, got int for data.format 'alpaca'")


def test_on_bad_rows_skip_drops_and_counts(tmp_path):
    path = _jsonl(tmp_path, [GOOD, "{not json", '{"instruction": "no output"}', "", GOOD, "[1]"])
    examples, stats = load_examples(TOK, str(path), "train", _data_cfg(path, on_bad_rows="skip"))
    assert len(examples) == stats["examples"] == 2
    assert stats["bad_rows"] == 3  # the malformed line, the list and the row without 'output'


def test_on_bad_rows_skip_with_nothing_left(tmp_path):
    path = _jsonl(tmp_path, ["{not json", '{"instruction": "no output"}'])
    assert _data_error(path, on_bad_rows="skip") == (
        f"No examples from {path}: all 2 rows were skipped as malformed or missing the fields of data.format "
        "'alpaca' (instruction, output); check data.format, or set data.on_bad_rows: error to see the first bad row.")


def test_empty_data_file(tmp_path):
    path = _jsonl(tmp_path, [])
    assert _data_error(path) == (f"No examples from {path}: it has no rows; point data.train/data.eval at "
                                 "data with examples.")


def test_every_example_longer_than_max_length(tmp_path):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, number_rows(5, seed=0))
    # The alpaca prompt alone is ~60 characters (= tokens here), so 16 tokens leave no response token.
    assert _data_error(path, max_length=16) == (
        f"No examples from {path}: all 5 examples have their whole target beyond data.max_length=16 tokens, "
        "so there is nothing left to learn; raise data.max_length.")


def test_load_rows_reports_line_numbers(tmp_path):
    path = _jsonl(tmp_path, ["", GOOD, "  ", GOOD])
    rows, bad, line_numbers = load_rows(str(path), "train")
    assert len(rows) == 2 and bad == 0 and line_numbers == [2, 4]


# ------------------------------------------------------------------------------------------ models and adapters


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """Two tiny Llamas that differ only in width, alpaca data, and a 2-step run on the narrow one."""
    from peftkit.train import train

    root = tmp_path_factory.mktemp("errors")
    build_tiny_model(root / "narrow", arch="llama", hidden_size=32, num_layers=1)
    build_tiny_model(root / "wide", arch="llama", hidden_size=64, num_layers=1)
    write_jsonl(root / "train.jsonl", number_rows(8, seed=0))
    recipe = _run_recipe(root, root / "run")
    train(load_recipe(recipe), console=_quiet())
    return {"root": root, "narrow": root / "narrow", "wide": root / "wide", "run": root / "run", "recipe": recipe}


def _run_recipe(root: Path, output_dir: Path, r: int = 2, name: str = "run.yaml") -> Path:
    recipe = {
        "model": {"name_or_path": str(root / "narrow")},
        "adapter": {"r": r, "alpha": 4, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": str(root / "train.jsonl"), "max_length": 128},
        "training": {"max_steps": 2, "batch_size": 4, "lr": 1e-2},
        "export": {"output_dir": str(output_dir)},
        "eval": {"base_model": False},
    }
    path = root / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _quiet():
    """A console that swallows train()'s progress output."""
    import io

    from rich.console import Console

    return Console(file=io.StringIO())


@pytest.mark.parametrize("target_modules", [["qproj"], {"regex": r".*\.attn\..*"}])
def test_target_modules_matching_nothing_lists_the_model_names(target_modules):
    from peftkit.adapters import inject_adapters
    from peftkit.methods.lora import LoraConfig

    model, _ = build_tiny_model(None, arch="llama", hidden_size=32, num_layers=1)
    with pytest.raises(PeftkitError) as info:
        inject_adapters(model, LoraConfig(target_modules=target_modules))
    message = str(info.value)
    assert "matches no module of this model. Its linear/embedding layers are named: embed_tokens, q_proj, k_proj, " \
           "v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head. Use some of those names, or 'all-linear'." in message
    assert message.startswith("adapter.target_modules ")


def test_target_modules_naming_a_container(tmp_path):
    from peftkit.adapters import find_targets

    model, _ = build_tiny_model(None, arch="llama", hidden_size=32, num_layers=1)
    with pytest.raises(PeftkitError, match=r"matches model\.layers\.0\.self_attn, which is LlamaAttention, not a Linear, "
                                           r"Conv1D or Embedding layer\. Target the linear layers inside instead, e\.g\. "
                                           r"embed_tokens, q_proj"):
        find_targets(model, ["self_attn"])


def test_model_directory_passed_as_adapter(assets):
    from peftkit.adapter_base import load_adapted_model

    with pytest.raises(PeftkitError) as info:
        load_adapted_model(None, str(assets["wide"]))
    assert str(info.value) == (f"{assets['wide']} is not a PEFT adapter directory: it has no adapter_config.json. "
                               "It holds a full model (config.json); pass it as --model/--base instead.")


def test_missing_adapter_directory(tmp_path):
    from peftkit.adapter_base import load_adapted_model

    with pytest.raises(PeftkitError, match="^Adapter directory not found: "):
        load_adapted_model(None, str(tmp_path / "no-adapter"))


def test_adapter_on_a_base_of_another_size(assets):
    from peftkit.adapter_base import load_adapted_model

    with pytest.raises(PeftkitError) as info:
        load_adapted_model(str(assets["wide"]), str(assets["run"] / "adapter"))
    message = str(info.value)
    assert message.startswith("The adapter does not fit this model: module 'model.layers.0.self_attn.")
    assert "of shape (2, 64) but the adapter has (2, 32)" in message  # lora_A: (r, in_features)
    assert message.endswith("It was trained on a different base model (another size or vocabulary); pass the base it "
                            "was trained on.")
    load_adapted_model(str(assets["narrow"]), str(assets["run"] / "adapter"))  # while the right base loads


def test_output_dir_holding_a_different_run(assets):
    from peftkit.train import train

    other = _run_recipe(assets["root"], assets["run"], r=4, name="other.yaml")
    with pytest.raises(PeftkitError) as info:
        train(load_recipe(other), console=_quiet())
    assert str(info.value) == (
        f"{assets['run']} holds a run of a different recipe (its recipe.yaml differs in adapter.r). Choose another "
        "export.output_dir, or pass --overwrite to replace that run.")
    assert (assets["run"] / "adapter").is_dir()  # refused before touching the earlier run


def test_overwrite_replaces_a_different_run(assets, tmp_path):
    import shutil

    from peftkit.train import train

    out = tmp_path / "run"
    shutil.copytree(assets["run"], out)
    other = _run_recipe(assets["root"], out, r=4, name="overwrite.yaml")
    train(load_recipe(other), overwrite=True, console=_quiet())
    assert "r: 4" in (out / "recipe.yaml").read_text()


def test_cli_train_refuses_a_different_run_with_exit_2(assets, monkeypatch, capsys):
    from peftkit.cli import main

    other = _run_recipe(assets["root"], assets["run"], r=4, name="cli.yaml")
    monkeypatch.setattr(sys, "argv", ["peftkit", "train", str(other)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: {assets['run']} holds a run of a different recipe")
    assert "--overwrite" in captured.err and "Traceback" not in captured.err + captured.out


# ------------------------------------------------------------------------------------------ CLI end to end


def test_cli_yaml_syntax_error(tmp_path):
    path = _write(tmp_path, RECIPE.replace("  dtype: float32", " dtype: float32"))
    stderr = _assert_user_error(_cli("validate", str(path)))
    assert f"{path}:3:2: YAML syntax error" in stderr


def test_cli_unknown_key_and_bad_overrides(tmp_path):
    path = _write(tmp_path, RECIPE.replace("  alpha: 8", "  alhpa: 8"))
    stderr = _assert_user_error(_cli("validate", str(path)))
    assert f"{path}:{_line(RECIPE, '  alpha')}: unknown key 'alhpa' in adapter. Did you mean 'alpha'?" in stderr

    path = _write(tmp_path, RECIPE)
    stderr = _assert_user_error(_cli("validate", str(path), "--set", "training.learnig_rate=1e-3"))
    assert "unknown key 'learnig_rate' in training." in stderr
    stderr = _assert_user_error(_cli("validate", str(path), "--set", "training.lr"))
    assert "expected KEY=VALUE" in stderr


def test_cli_missing_recipe_file(tmp_path):
    stderr = _assert_user_error(_cli("validate", "nope.yaml", cwd=tmp_path))
    assert "Recipe file not found: nope.yaml" in stderr


def test_cli_valid_recipe_exits_0(tmp_path):
    result = _cli("validate", str(_write(tmp_path, RECIPE)), "--set", "adapter.r=16")
    assert result.returncode == 0, result.stderr
    assert "r: 16" in result.stdout


def test_cli_merge_with_a_model_dir_as_adapter(assets, tmp_path):
    stderr = _assert_user_error(_cli("merge", "--adapter", str(assets["narrow"]), "--output", str(tmp_path / "m")))
    assert "is not a PEFT adapter directory" in stderr and "pass it as --model/--base instead" in stderr


def test_cli_prints_brackets_in_messages_verbatim(tmp_path):
    path = _write(tmp_path, RECIPE)
    stderr = _assert_user_error(_cli("validate", str(path), "--set", "adapter.target_modules={regex: '[qk]_proj('}"))
    assert "'[qk]_proj('" in stderr
    _assert_user_error(_cli("validate", str(path), "--set", "training.[/]=1"))


@pytest.mark.parametrize("args", [["validate"], ["train", "--nope", "x.yaml"], ["frobnicate"]])
def test_cli_usage_errors_exit_2_without_traceback(tmp_path, args):
    result = _cli(*args, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize("option", [["--max-length", "0"], ["--batch-size", "0"]])
def test_cli_eval_with_nonpositive_sizes(assets, monkeypatch, capsys, option):
    stderr = cli_user_error(monkeypatch, capsys, "eval", "--model", str(assets["narrow"]), "--data",
                   str(assets["root"] / "train.jsonl"), "--format", "alpaca", *option)
    assert option[0].lstrip("-").replace("-", "_") in stderr.replace("-", "_")


@pytest.mark.parametrize("overwrite", [False, True])
def test_output_dir_that_is_a_file(assets, tmp_path, overwrite):
    from peftkit.train import train

    (tmp_path / "run").write_text("not a directory\n")
    recipe = load_recipe(_run_recipe(assets["root"], tmp_path / "run", name="file-out.yaml"))
    with pytest.raises(PeftkitError, match="export.output_dir"):
        train(recipe, overwrite=overwrite, console=_quiet())


def test_fixing_a_recipe_after_a_data_error_is_not_refused(assets, tmp_path):
    from peftkit.train import train

    path = _run_recipe(assets["root"], tmp_path / "run", name="too-short.yaml")
    with pytest.raises(PeftkitError, match="nothing left to learn"):
        train(load_recipe(path, ["data.max_length=16"]), console=_quiet())
    train(load_recipe(path), console=_quiet())  # the fix: the default max_length of the helper, 128


# ------------------------------------------------------------------------------------------ permissions, limits


def _unprivileged(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """`peftkit ARGS` as a user whom file modes bind: root keeps its capabilities to override them unless dropped."""
    prefix = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("root without setpriv: file modes do not bind")
        caps = "-dac_override,-dac_read_search"
        prefix = ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", "--"]
    return subprocess.run([*prefix, sys.executable, "-m", "peftkit", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_overwrite_that_cannot_move_an_entry_leaves_the_earlier_run_whole(assets, tmp_path):
    """An entry the user may not move (here adapter/, read-only: a directory moves only with write access to it): --overwrite deleted the entries one by one and
    stopped on it with a traceback, leaving a run whose manifest listed an adapter that was gone."""
    out = tmp_path / "run"
    shutil.copytree(assets["run"], out)
    before = sorted(p.name for p in out.iterdir())
    other = _run_recipe(assets["root"], out, r=4, name="overwrite.yaml")
    (out / "adapter").chmod(0o555)
    try:
        done = _unprivileged("train", str(other), "--overwrite")
    finally:
        (out / "adapter").chmod(0o755)
    assert done.returncode == 2, done.stderr
    assert f"error: --overwrite: {out / 'adapter'} cannot be moved out of the way" in " ".join(done.stderr.split())
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in out.iterdir()) == before and "r: 4" not in (out / "recipe.yaml").read_text()


def test_a_run_whose_base_and_data_moved_says_where_they_were_named(tiny_llama, number_data, tmp_path, monkeypatch,
                                                                     capsys):
    """A project moved, or a run copied to another machine: eval, generate and merge of the run said only "Model
    directory not found: /old/path", not that it is the recipe's (or the adapter's) and how to give another."""
    from conftest import make_recipe

    from peftkit.train import train

    project = tmp_path / "project"
    shutil.copytree(tiny_llama, project / "model")
    shutil.copytree(number_data["eval"].parent, project / "data")
    data = {"train": project / "data" / "train.jsonl", "eval": project / "data" / "eval.jsonl"}
    recipe = make_recipe(project, project / "model", data, training={"max_steps": 1}, eval={"base_model": False})
    train(load_recipe(recipe))
    run = project / "run"
    (project / "model").rename(tmp_path / "model")
    (project / "data").rename(tmp_path / "data")

    def said(*args: str) -> str:
        return " ".join(cli_user_error(monkeypatch, capsys, *args).split())

    base = f"The base model {project / 'model'}"
    assert said("eval", str(run)) == (f"error: data.eval {project / 'data' / 'eval.jsonl'} of {run} is not there: "
                                      "moved or deleted since? Give the data with --data FILE.")
    assert said("eval", str(run), "--data", str(tmp_path / "data" / "eval.jsonl")) == (
        f"error: {base} (model.name_or_path of {run / 'recipe.yaml'}) is not there: moved or deleted since? Give it "
        "with --model DIR.")
    assert said("generate", "--adapter", str(run / "adapter"), "--prompt", "x") == (
        f"error: {base} (base_model_name_or_path of {run / 'adapter' / 'adapter_config.json'}) is not there: moved "
        "or deleted since? Give it with --model DIR.")
    assert said("merge", "--adapter", str(run / "adapter"), "--output", str(tmp_path / "m")) == (
        f"error: {base} (base_model_name_or_path of {run / 'adapter' / 'adapter_config.json'}) is not there: moved "
        "or deleted since? Give it with --base DIR.")
    from typer.testing import CliRunner

    from peftkit.cli import app

    done = CliRunner().invoke(app, ["eval", str(run), "--model", str(tmp_path / "model"), "--data",
                                    str(tmp_path / "data" / "eval.jsonl")])
    assert done.exit_code == 0 and "loss" in done.output, done.output  # what the messages say to do, works


def test_a_base_changed_since_the_run_is_said_by_eval_generate_and_merge(tiny_llama, number_data, tmp_path):
    """A base directory overwritten after training (another checkpoint saved over it, a fixed tokenizer): eval,
    generate and merge of the run's adapter loaded it without a word, and a merge wrote a model the run never
    trained. The run's manifest.json has the base files' sha256: each command now compares them and warns."""
    from conftest import make_recipe
    from safetensors.torch import load_file, save_file
    from typer.testing import CliRunner

    from peftkit.cli import app
    from peftkit.train import train

    shutil.copytree(tiny_llama, tmp_path / "model")
    recipe = make_recipe(tmp_path, tmp_path / "model", number_data, training={"max_steps": 1},
                         eval={"base_model": False})
    train(load_recipe(recipe))
    run = tmp_path / "run"
    commands = {"eval": ["eval", str(run)],
                "generate": ["generate", "--adapter", str(run / "adapter"), "--prompt", "12", "--max-new-tokens", "2"],
                "merge": ["merge", "--adapter", str(run / "adapter"), "--output", str(tmp_path / "merged")]}

    def said(args: list[str]) -> str:
        done = CliRunner().invoke(app, args)
        assert done.exit_code == 0, done.output
        return " ".join(done.output.split())

    assert not any("has changed since" in said(args) for args in commands.values())  # the base as trained
    weights = load_file(tmp_path / "model" / "model.safetensors")
    name = next(k for k in weights if k.endswith("q_proj.weight"))
    weights[name] = weights[name] + 0.01
    save_file(weights, tmp_path / "model" / "model.safetensors", metadata={"format": "pt"})
    commands["merge"].append("--overwrite")
    for command, args in commands.items():
        assert (f"warning: the base model {tmp_path / 'model'} has changed since {run} trained its adapter on it: "
                f"model.safetensors changed ({run / 'manifest.json'} records the files' sha256). What loads is the "
                "adapter over the base as it is now, not the model the run trained. Restore the base, or see "
                f"`peftkit verify {run}`.") in said(args), command
    assert "has changed since" not in said(["eval", str(run), "--model", str(tiny_llama)])  # another base, as given


def test_a_merge_onto_a_base_other_than_the_recorded_one_warns(tiny_llama, tmp_path):
    """`peftkit merge --adapter runs/quickstart/adapter --base OTHER`, OTHER a Llama of the same shapes and other
    weights, wrote a merged model without a word; it now warns, naming both bases. The recorded base, given by
    another path to the same directory, merges without it."""
    from peftkit.merge import merge_adapter
    from peftkit.merge_weights import MergeWarning
    from peftkit.methods.lora import LoraConfig
    from tests.conftest import save_random_adapter

    adapter = save_random_adapter(tiny_llama, LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "lora", seed=1)
    other = tmp_path / "other"
    build_tiny_model(other, hidden_size=32, seed=1)  # tiny_llama's shapes, its seed 0's weights redrawn
    with pytest.warns(MergeWarning) as said:
        merge_adapter(str(adapter), str(tmp_path / "merged"), base=str(other))
    assert [str(w.message) for w in said] == [
        f"--base {other} is not the base the adapter records (base_model_name_or_path: {tiny_llama}); the merge is "
        "right only if it holds the weights the adapter was trained on (a copy, a move)."]
    with warnings.catch_warnings():
        warnings.simplefilter("error", MergeWarning)
        merge_adapter(str(adapter), str(tmp_path / "merged-2"), base=str(tiny_llama / ".." / tiny_llama.name))


def test_the_base_check_hashes_a_file_once_and_skips_a_hub_base_not_fetched_yet(tmp_path):
    """An 8B base took ~11 s to hash at every eval, generate or merge: a file's hash is kept under its path, size,
    time and inode and read back while they hold. A hub base not in the cache yet was "gone" file by file (every
    recorded file "is gone") until the load fetched it: that base is not compared."""
    from peftkit.manifest import base_changes, remembered_sha256
    from peftkit.fileio import sha256_file

    file = tmp_path / "model.safetensors"
    file.write_bytes(b"weights")
    digest = remembered_sha256(file)
    assert digest == sha256_file(file)
    [entry] = (Path(os.environ["PEFTKIT_CACHE"]) / "file-hashes").iterdir()
    entry.write_text("f" * 64)  # the kept hash is what is read, the file is not
    assert remembered_sha256(file) == "f" * 64
    file.write_bytes(b"other weights")  # changed: hashed anew
    assert remembered_sha256(file) == sha256_file(file)

    (tmp_path / "run" / "adapter").mkdir(parents=True)
    (tmp_path / "run" / "manifest.json").write_text(json.dumps({"base_model_sha256": {"config.json": "0" * 64}}))
    assert base_changes(str(tmp_path / "run" / "adapter"), "someone/not-fetched-yet", None) is None


def test_a_full_cache_disk_still_hashes_a_base(tmp_path, monkeypatch):
    """A full disk under PEFTKIT_CACHE raised DiskFullError (no OSError) in the hashing thread: it died with a
    traceback on stderr, and the base's change went unsaid."""
    from peftkit import fileio
    from peftkit.manifest import remembered_sha256

    def full(path, text):
        raise fileio.DiskFullError(f"No space left on the device while writing {path}.")

    monkeypatch.setattr(fileio, "atomic_write_text", full)
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"weights")
    assert remembered_sha256(file) == fileio.sha256_file(file)


def test_a_read_only_run_directory_is_a_clear_error_for_report(assets, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(assets["run"], out)
    shutil.rmtree(out / "report", ignore_errors=True)
    out.chmod(0o555)
    try:
        done = _unprivileged("report", str(out))
    finally:
        out.chmod(0o755)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"error: {out / 'report'}: permission denied ({out} is not writable by this user). Write the report " \
        "elsewhere with --output DIR." in " ".join(done.stderr.split())


def test_a_run_on_a_read_only_file_system_is_reported_elsewhere(assets, tmp_path):
    """A run on read-only storage (a bind mount here): `peftkit report` printed an OSError traceback (EROFS is no
    PermissionError); it says so before drawing, and `--output DIR` writes the report elsewhere."""
    out = tmp_path / "run"
    shutil.copytree(assets["run"], out)
    shutil.rmtree(out / "report", ignore_errors=True)
    mount = f"mount --bind {out} {out} && mount -o remount,bind,ro {out}"
    script = f"{mount} && {sys.executable} -m peftkit report {out}; {sys.executable} -m peftkit report {out} " \
             f"--output {tmp_path / 'elsewhere'}"
    can = shutil.which("unshare") and subprocess.run(["unshare", "-m", "sh", "-c", mount], capture_output=True).returncode == 0
    if not can:
        pytest.skip("no read-only bind mount here (unshare -m needs root and a kernel that allows it)")
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    said = " ".join(done.stderr.split())
    assert "Traceback" not in said and f"error: {out / 'report'}: read-only file system. Write the report elsewhere " \
        "with --output DIR." in said, said
    assert (tmp_path / "elsewhere" / "report.html").is_file() and not (out / "report").exists()


def test_report_output_never_deletes_what_peftkit_did_not_write(assets, tmp_path, monkeypatch, capsys):
    """`report --output DIR` replaces DIR as a whole: pointed at the run itself it left only the report (adapter,
    checkpoints, manifest gone), and pointed at a user's directory, a file or the current directory it replaced
    them; "" and "." were tracebacks. Each is now refused, and an earlier report is replaced."""
    run = tmp_path / "run"
    shutil.copytree(assets["run"], run)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("precious")
    (tmp_path / "afile").write_text("keep")
    monkeypatch.chdir(tmp_path)
    instead = f"Name a new directory, e.g. --output {tmp_path / 'run-report'}."

    def said(output: str) -> str:
        return " ".join(cli_user_error(monkeypatch, capsys, "report", str(run), "--output", output).split())

    assert said(str(run)) == (f"error: --output {run} is the run directory {run}; the report replaces its directory "
                              f"as a whole, which would delete the run. {instead}")
    assert said(str(run / "adapter")) == (f"error: --output {run / 'adapter'} is inside the run directory {run}, whose "
                                          f"files its manifest.json lists. {instead}")
    assert said(str(tmp_path / "notes")) == (f"error: --output {tmp_path / 'notes'} holds files that are not a "
                                             f"report's (notes.txt); the report replaces its directory as a whole. "
                                             f"{instead}")
    assert said(str(tmp_path / "afile")) == f"error: --output {tmp_path / 'afile'} is a file. {instead}"
    for here in ("", "."):
        assert said(here).startswith(f"error: --output {tmp_path} is the current directory or one above it")
    assert said("afile/r") == f"error: --output's parent {tmp_path / 'afile'} is a file, not a directory; choose another path."
    assert (tmp_path / "notes" / "notes.txt").read_text() == "precious" and (run / "manifest.json").is_file()
    from typer.testing import CliRunner

    from peftkit.cli import app

    for _ in range(2):  # a new directory, then the same one holding that report
        done = CliRunner().invoke(app, ["report", str(run), "--output", str(tmp_path / "r")])
        assert done.exit_code == 0 and (tmp_path / "r" / "report.html").is_file(), done.output


def test_json_to_stdout_is_the_json_alone(assets, tmp_path):
    """README's `--json /dev/stdout | jq .`: eval printed its summary line before the JSON, and generate its
    "N completions written" after it, on the same stdout. Those lines now go to stderr when --json is stdout."""
    run = tmp_path / "run"
    shutil.copytree(assets["run"], run)
    data = str(assets["root"] / "train.jsonl")
    for args in (["eval", str(run), "--data", data],
                 ["generate", str(run), "--data", data, "--limit", "1", "--max-new-tokens", "2"]):
        done = subprocess.run([sys.executable, "-m", "peftkit", *args, "--json", "/dev/stdout"], capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert isinstance(json.loads(done.stdout), dict if args[0] == "eval" else list), done.stdout
        assert ("loss" if args[0] == "eval" else "1 completion written to /dev/stdout") in done.stderr  # ("completions")


def test_a_file_size_limit_is_a_clear_error(tmp_path):
    """`ulimit -f`: the write fails with EFBIG (Python ignores SIGXFSZ), which came out as a traceback."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (8192, hard))
    try:
        with pytest.raises(PeftkitError, match=r"a\.bin would be larger than this process may write \(File too large"):
            fileio.atomic_write_bytes(tmp_path / "a.bin", b"x" * 20000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert list(tmp_path.iterdir()) == []


def test_an_unreadable_weights_file_is_said_to_be_unreadable(assets, tmp_path):
    """safetensors says "No such file or directory" of a file it may not open, which came out as "truncated or
    corrupt ... Copy or download the model again"."""
    model = tmp_path / "model"
    shutil.copytree(assets["narrow"], model)
    (model / "model.safetensors").chmod(0o000)
    done = _unprivileged("eval", "--model", str(model), "--data", str(assets["root"] / "train.jsonl"))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert (f"error: {model / 'model.safetensors'} is not readable (permission denied). Ask for read access to it, "
            "or copy it somewhere you can read.") in " ".join(done.stderr.split())


def test_a_mistyped_local_model_path_is_said_to_be_one(tmp_path, monkeypatch, capsys):
    """`--model artifacts/nonexist`, where artifacts/ is a directory here: the error was the hub client's "couldn't
    connect to huggingface.co", as if the user had meant a hub id (then, after its retries, that it is no local
    directory either); now said at once (tests/test_local_or_hub.py: no hub request)."""
    from huggingface_hub import constants

    from tests.conftest import cli_user_error

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "artifacts" / "tiny-llama").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    err = " ".join(cli_user_error(monkeypatch, capsys, "generate", "--model", "artifacts/tiny-lama", "--prompt", "hi").split())
    assert ("error: --model artifacts/tiny-lama: no such directory (read as a local path, not a hub id: artifacts/ is "
            "a directory here and the local Hugging Face cache holds no such repository; download it there first for "
            "the hub's); artifacts/ holds tiny-llama/. Give a model's directory") in err, err


def test_names_near_the_filesystem_s_limit(tmp_path):
    """A legal 250-byte name failed in every atomic write with a traceback (its temporary name, 14 bytes longer,
    was not); a name over the limit is a clear error."""
    fileio.atomic_write_bytes(tmp_path / ("m" * 250), b"x")
    with fileio.atomic_directory(tmp_path / ("中" * 83)) as tmp:  # 249 bytes
        (tmp / "f").write_text("y")
    with fileio.atomic_directory(tmp_path / ("中" * 83)) as tmp:  # replacing it: the old one is set aside first
        (tmp / "f").write_text("z")
    assert (tmp_path / ("m" * 250)).read_bytes() == b"x" and (tmp_path / ("中" * 83) / "f").read_text() == "z"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m" * 250, "中" * 83])
    with pytest.raises(PeftkitError, match="a name in this path is longer than the filesystem allows"):
        fileio.atomic_write_bytes(tmp_path / ("m" * 256), b"x")


def test_long_names_alike_in_their_first_200_bytes_keep_their_own_set_aside_copies(tmp_path):
    """A kill between a replace's two renames leaves `.A.old`, the only whole copy of A. Names over 200 bytes were cut
    to their first 200 for it, so a write of B, alike in those, deleted it as its own stale `.B.old`."""
    a, b = tmp_path / ("m" * 220 + "a"), tmp_path / ("m" * 220 + "b")
    with fileio.atomic_directory(a) as tmp:
        (tmp / "f").write_text("a's only copy")
    os.replace(a, fileio._set_aside_name(a))  # (killed midway through replacing A)
    for text in ("b1", "b2"):  # (the second write of B replaces the first: it sets B aside)
        with fileio.atomic_directory(b) as tmp:
            (tmp / "f").write_text(text)
    assert (fileio._set_aside_name(a) / "f").read_text() == "a's only copy" and (b / "f").read_text() == "b2"
    assert len(fileio._set_aside_name(a).name.encode()) <= 205


def test_a_tilde_in_a_flag_s_path_is_the_home_directory(tmp_path, monkeypatch, capsys):
    """`--json=~/e.json` reaches peftkit unexpanded (the shell expands `~` only at a word's start): it made a
    directory named `~` in the current one. `~` is the home directory, as in a recipe."""
    from tests.conftest import cli_user_error

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    err = " ".join(cli_user_error(monkeypatch, capsys, "eval", "--model=~/no-model", "--data", "x.jsonl").split())
    assert f"{tmp_path / 'home' / 'no-model'}" in err, err
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "out").write_text("a file where --json wants a directory")
    err = " ".join(cli_user_error(monkeypatch, capsys, "eval", "--model=~/no-model", "--data", "x.jsonl",
                                  "--json=~/out/e.json").split())
    assert not (tmp_path / "~").exists() and f"--json's directory {tmp_path / 'home' / 'out'} is a file" in err, err


def test_a_symlink_loop_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from tests.conftest import cli_user_error

    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    err = cli_user_error(monkeypatch, capsys, "verify", str(tmp_path / "a"))
    assert f"RUN_DIR {tmp_path / 'a'}: a loop of symbolic links; point it at a real directory." in " ".join(err.split())
    with pytest.raises(PeftkitError, match="--output .*: a loop of symbolic links"):
        from peftkit.merge import check_merge_output

        check_merge_output(tmp_path / "a", {}, overwrite=False)


def test_json_out_to_a_link_a_pipe_or_stdout(tmp_path, capsys):
    """An output file flag (--json, --predictions) replaced a symbolic link by a file, refused a pipe, and (as root)
    renamed a temporary file over /dev/stdout itself, the system's link."""
    import threading

    (tmp_path / "link.json").symlink_to("real.json")
    fileio.atomic_write_json(tmp_path / "link.json", {"a": 1})
    assert (tmp_path / "link.json").is_symlink() and json.loads((tmp_path / "real.json").read_text()) == {"a": 1}

    os.mkfifo(tmp_path / "pipe")
    got = []
    reader = threading.Thread(target=lambda: got.append((tmp_path / "pipe").read_text()))
    reader.start()
    fileio.atomic_write_text(tmp_path / "pipe", "through the pipe")
    reader.join(timeout=30)
    assert got == ["through the pipe"] and not (tmp_path / "pipe").is_file()

    before = os.readlink("/dev/stdout") if os.path.islink("/dev/stdout") else None
    print("first line")
    fileio.atomic_write_json("/dev/stdout", {"b": 2})
    assert capsys.readouterr().out == 'first line\n{\n  "b": 2\n}\n'  # in order, through Python's stdout
    assert (os.readlink("/dev/stdout") if os.path.islink("/dev/stdout") else None) == before
    assert not fileio.special_file(Path("/dev/shm/out.json"))  # a file there is a file: replaced whole


@pytest.mark.parametrize(("value", "shown"), [("[serial, parallel]", "list"), ("{x: 1}", "dict")])
def test_bottleneck_placement_of_the_wrong_type_is_a_message(tmp_path, value, shown):
    # A list or mapping given as placement was looked up in the default scalings and raised TypeError (unhashable).
    text = RECIPE.replace("  r: 4\n", "  method: bottleneck\n").replace("  alpha: 8\n", f"  placement: {value}\n")
    text = text.replace("  dropout: 0.0\n  target_modules: all-linear\n", "")
    message = _error(_write(tmp_path, text))
    assert message == (f"Invalid recipe (1 problem):\n  {tmp_path / 'my-recipe.yaml'}:{_line(text, '  placement')}: "
                       f"'adapter.placement' = {shown}: must be one of 'serial' or 'parallel'.")


@pytest.mark.parametrize(("old", "new", "key", "expected"), [
    # A section's check of one key's value: said at the section's line (`training:`), not the key's.
    ("  warmup_steps: 1", "  warmup_steps: 1\n  adam_betas: [0.9, 1.0]", "  adam_betas",
     "training: adam_betas [0.9, 1.0]: each beta is in [0, 1)"),
    # across keys: at the first key it names
    ("  warmup_steps: 1", "  warmup_steps: 1\n  warmup_ratio: 0.1", "  warmup_steps",
     "training: warmup_steps (1) and warmup_ratio (0.1) both set the warmup; keep one"),
    ("  warmup_steps: 1", "  warmup_steps: 1\n  eval_steps: 2\n  early_stopping:\n    metric: acuracy", "    metric",
     "training.early_stopping.metric: metric 'acuracy' is not computed during training (computed: loss, perplexity); "
     "use one of those"),
])
def test_a_section_check_is_said_at_the_line_of_the_key_it_names(tmp_path, old, new, key, expected):
    text = RECIPE.replace(old, new, 1).replace("  format: alpaca", "  eval: ./data/eval.jsonl\n  format: alpaca")
    message = _error(_write(tmp_path, text))
    assert message == f"Invalid recipe (1 problem):\n  {tmp_path / 'my-recipe.yaml'}:{_line(text, key)}: {expected}."


def test_a_section_check_stays_at_the_section_when_a_set_gave_one_of_its_keys(tmp_path):
    text = RECIPE.replace("  warmup_steps: 1", "  warmup_steps: 1\n  adam_betas: [0.9, 1.0]")
    message = _error(_write(tmp_path, text), ["training.lr=0.001"])
    assert message == (f"Invalid recipe (1 problem):\n  {tmp_path / 'my-recipe.yaml'}:{_line(text, 'training:')} "
                       "(with --set training.lr): training: adam_betas [0.9, 1.0]: each beta is in [0, 1).")


@pytest.mark.parametrize(("method", "key", "expected"), [
    # each leaves every gradient of the adapter at zero: the run trained nothing, without a word
    ("fourierft", "scaling", "0 scales the update and its gradients to nothing, so the adapter would never train; use "
                             "the default 150 (the paper: 100-150 on RoBERTa, 300 on LLaMA)"),
    ("vera", "d_initial", "0 leaves d and b (which starts at 0) with no gradient, so the adapter would never train; "
                          "use the default 0.1 (values up to 0.1 are recommended)"),
    ("bottleneck", "scaling", "0 multiplies the adapter's output and its gradients by zero, so it would never train; "
                              "leave it out (null: 1 for serial, 4 for parallel)"),
    ("waveft", "scaling", "0 scales the update and its gradients to nothing, so the adapter would never train; use the "
                          "default 25"),
])
def test_a_zero_scale_that_would_train_nothing_is_refused(tmp_path, method, key, expected):
    text = RECIPE.replace("  r: 4\n  alpha: 8\n  dropout: 0.0\n", f"  method: {method}\n  {key}: 0\n")
    if method == "bottleneck":  # (placed by after:, no target_modules)
        text = text.replace("  target_modules: all-linear\n", "")
    message = _error(_write(tmp_path, text))
    assert message == (f"Invalid recipe (1 problem):\n  {tmp_path / 'my-recipe.yaml'}:{_line(text, f'  {key}')}: "
                       f"'adapter.{key}' = 0: {expected}.")


ALORA_UNMERGEABLE = ("An aLoRA adapter (alora_invocation_tokens) cannot be merged: it changes only the tokens from its "
                     "invocation on, which no weight can do. Keep it separate (export.merged: false; skip `peftkit "
                     "merge`) and use it with --adapter DIR, or peft's PeftModel.from_pretrained")
PROMPT_UNMERGEABLE = ("A prompt_tuning adapter cannot be merged: it adds virtual tokens in front of the input, not a change "
                      "to any weight. Keep the adapter separate (set export.merged: false; skip `peftkit merge`) and use "
                      "it: `peftkit generate` / `peftkit eval` with --adapter DIR (or the run directory), or peft's "
                      "PeftModel.from_pretrained")


@pytest.mark.parametrize(("override", "expected"), [
    ("adapter.alora_invocation_tokens=[1, 2]", f"{ALORA_UNMERGEABLE} (adapter.alora_invocation_tokens: [1, 2])."),
    ("adapter.method=prompt_tuning", f"{PROMPT_UNMERGEABLE} (adapter.method: prompt_tuning)."),
])
def test_an_unmergeable_adapter_by_a_set_names_that_set(tmp_path, override, expected):
    # export.merged: true in the file, the adapter made unmergeable by a --set: the error named the file's line alone.
    text = RECIPE.replace("  r: 4\n  alpha: 8\n  dropout: 0.0\n  target_modules: all-linear\n", "  method: lora\n")
    text = text.replace("  output_dir: ./run\n", "  output_dir: ./run\n  merged: true\n")
    message = _error(_write(tmp_path, text), [override])
    assert message == (f"Invalid recipe (1 problem):\n  {tmp_path / 'my-recipe.yaml'}:{_line(text, '  merged')} "
                       f"(with --set {override.partition('=')[0]}): export.merged: {expected}")


@pytest.mark.parametrize("command", ["eval", "generate", "chat"])
def test_a_missing_recipe_or_run_directory_is_said_so(command, tmp_path):
    """eval, generate and chat take a recipe or a run directory: a path that is neither was 'Recipe file not found:
    runs/nope', though the user named a run directory (README's `peftkit eval runs/quickstart`)."""
    from typer.testing import CliRunner

    from peftkit.cli import app

    done = CliRunner().invoke(app, [command, str(tmp_path / "runs" / "nope")])  # peftkit's main prints it as error:
    assert isinstance(done.exception, PeftkitError), done.output
    assert str(done.exception) == (f"{tmp_path / 'runs' / 'nope'} does not exist: give a recipe file or a peftkit run "
                                   "directory (a recipe's export.output_dir).")


def test_a_model_or_adapter_directory_given_as_the_run_says_which_option_takes_it(tiny_llama, tmp_path, monkeypatch,
                                                                                   capsys):
    """`peftkit generate artifacts/tiny-llama` or `... runs/quickstart/adapter` (a first try, as with peft's or
    transformers' from_pretrained(DIR)) said only 'a directory without recipe.yaml': it now names the option that
    takes the directory, or the run above the adapter. The model hint is followed, and generates."""
    said = cli_user_error(monkeypatch, capsys, "generate", str(tiny_llama), "--prompt", "12")
    assert said == (f"error: {tiny_llama} is a directory without recipe.yaml: give a recipe file or a peftkit run "
                    f"directory. It holds a model: pass it as --model {tiny_llama}.\n")
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (run / "recipe.yaml").write_text(RECIPE)
    assert cli_user_error(monkeypatch, capsys, "eval", str(run / "adapter")).endswith(
        f"directory. It holds an adapter of the run {run}: give that directory.\n")
    (run / "adapter").rename(tmp_path / "lone")
    assert cli_user_error(monkeypatch, capsys, "chat", str(tmp_path / "lone")).endswith(
        f"directory. It holds a PEFT adapter: pass it as --adapter {tmp_path / 'lone'} (with --model BASE if its "
        "recorded base moved).\n")
    from peftkit.cli import main

    monkeypatch.setattr(sys, "argv", ["peftkit", "generate", "--model", str(tiny_llama), "--prompt", "12",
                                      "--max-new-tokens", "2"])
    main()
    assert "12" in capsys.readouterr().out
