"""A locale that is not UTF-8 (LANG=en_US.ISO-8859-1 on an old cluster, PYTHONUTF8=0, PYTHONIOENCODING=ascii):
peftkit's own files are UTF-8 whatever the locale, and what stdout cannot encode is printed escaped. Before, a
recipe with an accent in a comment could not be read, a run's report and its recipe.yaml were written in the
locale's encoding, and training crashed at its first line of output (`Memory estimate: ... «...»`) with
UnicodeEncodeError; a prompt typed with an accent was a TypeError in the tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml
from conftest import make_recipe

from peftkit.tiny import write_jsonl

INIT_TEXT = "Réponds en français ✓"


def _ascii_locale() -> dict[str, str]:
    """The environment of a C locale with Python's UTF-8 mode off: the locale encoding, stdout's and the file system's
    are ASCII (the harshest case; a Latin-1 locale would garble instead of failing)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "PYTHONIOENCODING"))}
    return env | {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "COLUMNS": "200", "NO_COLOR": "1"}


def _peftkit(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "peftkit", *args], capture_output=True, env=_ascii_locale(),
                            timeout=600, check=False)
    out, err = result.stdout.decode("ascii"), result.stderr.decode("ascii")  # escaped, never raw UTF-8 bytes
    assert result.returncode == 0 and "Traceback" not in out + err, out + err
    return subprocess.CompletedProcess(result.args, 0, out, err)


def test_a_run_in_an_ascii_locale(tmp_path, tiny_llama):
    check = subprocess.run([sys.executable, "-c", "import locale, sys; print(locale.getpreferredencoding(False), "
                            "sys.stdout.encoding)"], capture_output=True, text=True, env=_ascii_locale(), check=True)
    assert check.stdout.split() == ["ANSI_X3.4-1968", "ascii"]  # the environment is what the test means
    rows = [{"instruction": "Salue en japonais ✓", "input": "", "output": "こんにちは 🎉"},
            {"instruction": "Say hi", "input": "«café»", "output": "hello"}] * 4
    write_jsonl(tmp_path / "train.jsonl", rows)
    recipe = make_recipe(tmp_path, tiny_llama, {"train": tmp_path / "train.jsonl", "eval": tmp_path / "train.jsonl"},
                         training={"max_steps": 2, "batch_size": 4})
    sections = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    sections["export"]["report"] = True
    sections["adapter"] = {"method": "prompt_tuning", "num_virtual_tokens": 4, "init": "text", "init_text": INIT_TEXT}
    recipe.write_text("# une recette «à la française»\n" + yaml.safe_dump(sections, allow_unicode=True),
                      encoding="utf-8")

    train = _peftkit("train", str(recipe))
    assert "activations \\u2264" in train.stdout  # what ASCII cannot hold, escaped (a ≤)
    run = tmp_path / "run"
    assert yaml.safe_load((run / "recipe.yaml").read_text(encoding="utf-8"))["adapter"]["init_text"] == INIT_TEXT
    config = json.loads((run / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["prompt_tuning_init_text"] == INIT_TEXT
    assert "<h2>Recipe</h2>" in (run / "report" / "report.html").read_text(encoding="utf-8")

    generated = _peftkit("generate", str(run), "--prompt", "Salue ✓", "--max-new-tokens", "2")
    assert generated.stdout.startswith("Salue \\u2713")  # the prompt's bytes read as UTF-8, not lone surrogates
    assert "verified" in _peftkit("verify", str(run)).stdout
    assert "prompt_tuning" in _peftkit("inspect", str(run / "adapter")).stdout


def test_a_file_name_the_locale_cannot_decode_is_printed_as_its_bytes(tmp_path):
    """Python keeps such a name's bytes as lone surrogates; escaping them (`\\udce9`) printed a path that is not
    the file's: they go out as the bytes they were."""
    folder = os.fsencode(tmp_path) + b"/caf\xe9"
    os.mkdir(folder)
    with open(folder + b"/r.yaml", "w", encoding="utf-8") as f:
        f.write("model: {name_or_path: m}\ndata: {train: t.jsonl}\nexport: {output_dir: o}\n")
    result = subprocess.run([sys.executable, "-m", "peftkit", "validate", folder + b"/r.yaml"], capture_output=True,
                            env=_ascii_locale(), timeout=120, check=False)
    assert result.returncode == 0 and result.stdout.startswith(b"# " + folder + b"/r.yaml: valid"), result

