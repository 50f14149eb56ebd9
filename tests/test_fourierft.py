"""FourierFT (`method: fourierft`, peftkit.methods.fourierft): trained spectral coefficients at random frequencies,
the update their inverse 2-D DFT. Checked against peft 0.21 beyond the conformance suite (tests/test_methods.py):
the same frequencies and first coefficients from the same seeds, one step's gradients, peft's adapters loading and
merging as peft's merge_and_unload (Linear and Conv1D), a resumed run's bits, combining, and what it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import FourierFTConfig, get_peft_model

from peftkit.adapters import inject_adapters
from peftkit.errors import PeftkitError
from peftkit.methods.fourierft import FourierFtConfig
from tests.conftest import load_fp32 as _load  # (float32, eval mode)
from tests.conftest import (check_halves_into_base_and_refuses_fusion, check_loads_and_merges_as_peft,
                            check_routed_as_peft, check_run_for_peft_resumes, cli_user_error, gpt2_without_dropout,
                            method_recipe, peft_and_our_gradients)

IDS = torch.tensor([[3, 4, 5, 9, 7, 8, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47]])
TARGETS = {"llama": ["q_proj", "down_proj"], "gpt2": ["c_attn", "mlp.c_proj"]}  # Linear; Conv1D


def _peft_adapter(base: Path, out: Path, targets: list[str], **settings) -> Path:
    """peft's FourierFT adapter (its default start, c ~ N(0, 1)), its coefficients moved on as by training."""
    torch.manual_seed(0)
    model = get_peft_model(_load(base), FourierFTConfig(task_type="CAUSAL_LM", target_modules=targets,
                                                        **{"n_frequency": 50, "scaling": 100.0} | settings))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "fourierft_spectrum" in name:
                p.add_(torch.randn(p.shape) * 0.5)
    model.save_pretrained(out)
    return out


def _recipe(tmp_path: Path, model: Path, data: dict, **adapter) -> Path:
    recipe = method_recipe(tmp_path, model, data,
                           {"method": "fourierft", "n_frequency": 64, "scaling": 100.0, **adapter},
                           eval={"base_model": False})
    return recipe


def test_the_same_seeds_give_peft_s_frequencies_and_first_coefficients(tiny_gpt2):
    settings = {"n_frequency": 40, "random_loc_seed": 11, "target_modules": ["c_attn", "mlp.c_proj"]}
    torch.manual_seed(4)
    theirs = get_peft_model(_load(tiny_gpt2), FourierFTConfig(task_type="CAUSAL_LM", **settings))
    torch.manual_seed(4)
    ours = _load(tiny_gpt2)
    inject_adapters(ours, FourierFtConfig(method="fourierft", **settings))
    for path in ("transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"):
        layer, reference = ours.get_submodule(path), theirs.base_model.model.get_submodule(path)
        assert torch.equal(layer.fourierft_indices, reference.indices["default"])
        assert torch.equal(layer.fourierft_spectrum, reference.fourierft_spectrum["default"])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_step_s_gradients_are_peft_s(arch, tiny_llama, tiny_gpt2, tmp_path):
    base = gpt2_without_dropout(tiny_gpt2, tmp_path / "gpt2") if arch == "gpt2" else tiny_llama
    adapter = _peft_adapter(base, tmp_path / "peft", TARGETS[arch])
    difference, expected, grads = peft_and_our_gradients(base, adapter, IDS)
    assert difference <= 1e-5 and set(grads) >= set(expected) and len(expected) == 4
    assert max((grads[n] - expected[n]).abs().max() for n in expected) <= 1e-5
    assert min(expected[n].abs().max() for n in expected) > 1e-4


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_s_adapters_load_and_merge_as_peft_s_merge_and_unload(arch, tiny_llama, tiny_gpt2, tmp_path):
    base = {"llama": tiny_llama, "gpt2": tiny_gpt2}[arch]
    adapter = _peft_adapter(base, tmp_path / "peft", TARGETS[arch], n_frequency_pattern={"q_proj": 30, "c_attn": 70})
    check_loads_and_merges_as_peft(base, adapter, IDS, tmp_path / "merged", unloaded=True)


def test_a_run_exports_what_peft_loads_and_resumes_to_the_same_bits(tiny_llama, number_data, tmp_path):
    # (the tolerance, fp32: peft adds x dW^T to the base output, the merge (W + dW) x: other roundings)
    check_run_for_peft_resumes(_recipe(tmp_path, tiny_llama, number_data), tiny_llama, IDS, 1e-4)


@pytest.mark.parametrize(("adapter", "message"), [
    ({"n_frequency": 0}, "'adapter.n_frequency' = 0"),
    ({"n_frequency": 600}, "adapter.n_frequency: 600 coefficients do not fit a layer of 16 x 32 = 512 entries"),
    ({"n_frequency_pattern": {"q_proj": -1}}, "adapter.n_frequency_pattern.q_proj"),
    ({"target_modules": ["embed_tokens"]}, "'model.embed_tokens' is an embedding; FourierFT (as peft's) adapts Linear"),
    ({"r": 8}, "has no 'r'. Valid keys for method fourierft: method, n_frequency, scaling, random_loc_seed"),
])
def test_recipe_mistakes_are_refused(adapter, message, tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    """By validate as by train (n_frequency past a layer's entries was said by train only, after loading weights)."""
    recipe = _recipe(tmp_path, tiny_llama, number_data, **adapter)
    for command in ("validate", "train"):
        assert message in " ".join(cli_user_error(monkeypatch, capsys, command, str(recipe)).split()), command


def test_peft_s_settings_it_cannot_apply_are_refused(tiny_llama, tmp_path):
    from peftkit.adapter_base import load_adapted_model

    adapter = _peft_adapter(tiny_llama, tmp_path / "peft", TARGETS["llama"])
    config = adapter / "adapter_config.json"
    written = config.read_text()
    for edit, message in (({"bias": "fourier_only"}, "bias='fourier_only'; peftkit supports bias='none' only"),
                          ({"random_loc_seed": None}, "random_loc_seed is null, so the frequencies cannot be drawn")):
        config.write_text(json.dumps(json.loads(written) | edit))
        with pytest.raises(PeftkitError, match=message):
            load_adapted_model(str(tiny_llama), str(adapter))


def test_two_named_adapters_serve_each_its_rows_as_peft(tiny_llama, tmp_path):
    for name, seed in (("a", 777), ("b", 3)):  # other frequencies too
        _peft_adapter(tiny_llama, tmp_path / name, TARGETS["llama"], random_loc_seed=seed)
    check_routed_as_peft(tiny_llama, [tmp_path / "a", tmp_path / "b"], IDS)


def test_combined_into_the_base_it_adds_the_updates_and_fusion_refuses_it(tiny_llama, tmp_path):
    a = str(_peft_adapter(tiny_llama, tmp_path / "a", TARGETS["llama"]))
    check_halves_into_base_and_refuses_fusion(tiny_llama, a, "FourierFT", tmp_path / "half", IDS)
