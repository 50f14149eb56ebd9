"""`peftkit eval` of preference pairs whose reference (the base, or a recipe's adapter.init_from over it) gives
log-probabilities that are not finite: the reference is named, not the evaluated adapter, alone and in a comparison
(as training's `peftkit.start_base._reference_logps` says it)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import cli_user_error, save_random_adapter
from safetensors.torch import load_file, save_file
from test_kto import _kto_recipe, unpaired_data  # noqa: F401 (a fixture)
from test_preference import _dpo_recipe, pairs_data  # noqa: F401 (a fixture)

from peftkit.methods.lora import LoraConfig


def _with_nan(path: Path, name_part: str, value: float = float("nan")) -> None:
    """Every safetensors tensor of `path` whose name holds `name_part` set to `value` (nan, as a diverged run saves
    it)."""
    state = load_file(path)
    hit = [name for name in state if name_part in name]
    assert hit, list(state)
    for name in hit:
        state[name] = torch.full_like(state[name], value)
    save_file(state, path, metadata={"format": "pt"})


@pytest.fixture
def nan_llama(tiny_llama, tmp_path) -> Path:
    """tiny_llama whose final norm's weights are nan: every log-probability it gives is nan."""
    out = tmp_path / "nan-llama"
    shutil.copytree(tiny_llama, out)
    _with_nan(out / "model.safetensors", "model.norm.weight")
    return out


def _lora(base: Path, out: Path, seed: int) -> Path:
    return save_random_adapter(base, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"), out, seed)


def _said(monkeypatch, capsys, *args) -> str:
    return " ".join(cli_user_error(monkeypatch, capsys, "eval", *args).split())


def test_a_nan_base_is_named_as_the_reference_alone_and_in_a_comparison(nan_llama, pairs_data, tmp_path,
                                                                         monkeypatch, capsys):
    """A base whose weights hold nan gives nan reference log-probabilities: the message names it, the reference,
    and does not say the evaluated adapter 'produces a non-finite loss'."""
    recipe = _dpo_recipe(tmp_path, nan_llama, pairs_data)
    a, b = _lora(nan_llama, tmp_path / "a", 1), _lora(nan_llama, tmp_path / "b", 2)
    alone = _said(monkeypatch, capsys, str(recipe), "--adapter", str(a))
    assert (f"The reference (the base model {nan_llama}) gives 12 of the 12 pairs of {pairs_data['eval']} a "
            "log-probability that is not finite (the first: pair 1 as kept)") in alone, alone
    assert "Check the reference's weights, or evaluate a float32 copy of the model." in alone, alone
    assert "produces a non-finite loss" not in alone, alone
    both = _said(monkeypatch, capsys, str(recipe), "--adapter", f"a={a}", "--adapter", f"b={b}")
    assert (f"The reference (the comparison's base, {nan_llama}) gives 12 of the 12 pairs of {pairs_data['eval']} "
            "a log-probability that is not finite") in both, both
    assert "produces a non-finite loss" not in both, both


def test_an_overflowing_init_from_is_named_as_the_reference(tiny_llama, pairs_data, tmp_path, monkeypatch, capsys):
    """A recipe's adapter.init_from whose lora_B overflows the activations (1e30 everywhere: finite, so not refused as
    a NaN/inf adapter is when the recipe is read) is the reference of its adapters' evaluation: it is named, with the
    way out (the base as the reference), though the evaluated adapter is finite."""
    sft, adapter = _lora(tiny_llama, tmp_path / "sft", 1), _lora(tiny_llama, tmp_path / "dpo", 2)
    _with_nan(sft / "adapter_model.safetensors", "lora_B", 1e30)
    recipe = _dpo_recipe(tmp_path, tiny_llama, pairs_data)
    raw = yaml.safe_load(recipe.read_text())
    raw["adapter"] = {"init_from": str(sft)}
    recipe.write_text(yaml.safe_dump(raw))
    said = _said(monkeypatch, capsys, str(recipe), "--adapter", str(adapter))
    assert (f"The reference (the recipe's adapter.init_from {sft} over the base model {tiny_llama}) gives 12 of the "
            f"12 pairs of {pairs_data['eval']} a log-probability that is not finite") in said, said
    assert "or evaluate against the base with --set adapter.init_from=null." in said, said
    assert "produces a non-finite loss" not in said, said


def test_a_nan_base_is_named_as_the_reference_of_unpaired_answers(nan_llama, unpaired_data, tmp_path, monkeypatch,
                                                                   capsys):
    """KTO's figures against a nan base: the reference is named, in answers, alone and in a comparison."""
    recipe = _kto_recipe(tmp_path, nan_llama, unpaired_data)
    a, b = _lora(nan_llama, tmp_path / "a", 1), _lora(nan_llama, tmp_path / "b", 2)
    for args, what in (([str(a)], "the base model"), ([f"a={a}", "--adapter", f"b={b}"], "the comparison's base,")):
        said = _said(monkeypatch, capsys, str(recipe), "--adapter", *args)
        assert (f"The reference ({what} {nan_llama}) gives 8 of the 8 answers of {unpaired_data['eval']} a "
                "log-probability that is not finite (the first: answer 1 as kept)") in said, said
        assert "produces a non-finite loss" not in said, said
