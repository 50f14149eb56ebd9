"""WaveFT (`method: waveft`, peftkit.methods.waveft): trained wavelet coefficients at random entries, the update their
inverse 2-D DWT. Checked against peft 0.21.2 beyond the conformance suite (tests/test_methods.py): its layer's update,
output and gradients bit for bit (db1, sym2, db4, coif1, with and without the transform, Linear and Conv1D, odd
shapes), the same entries and first coefficients from the same seeds, PyWavelets' filters against peft's table (and
where peft's is wrong), peft's adapters loading and merging as its merge_and_unload, one step's gradients, combining,
mixed batches, and what it refuses."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
from peft import WaveFTConfig, get_peft_model
from peft.tuners.waveft.constants import WAVELET_REDUCTIONS
from peft.tuners.waveft.layer import WaveFTLinear
from peft.tuners.waveft.wavelet import Wavelet as PeftWavelet
from peft.tuners.waveft.wavelet import wavelist as peft_wavelist
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit.adapters import inject_adapters
from peftkit.errors import PeftkitError, PeftkitWarning
from peftkit.inspect import inspect_adapter
from peftkit.methods.waveft import (FAMILIES, PEFT_COMPUTES, WaveFtConfig, WaveFtLinear, reconstruction_filters,
                                    wave_delta)
from tests.conftest import load_fp32 as _load  # (float32, eval mode)
from tests.conftest import (check_halves_into_base_and_refuses_fusion, check_loads_and_merges_as_peft,
                            check_routed_as_peft, check_trained_bias_refused, cli_user_error, gpt2_without_dropout,
                            method_recipe, peft_and_our_gradients)
from tests.test_methods import waveft_dense

IDS = torch.tensor([[3, 4, 5, 9, 7, 8, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47]])
TARGETS = {"llama": ["q_proj", "down_proj"], "gpt2": ["c_attn", "mlp.c_proj"]}  # Linear; Conv1D


def _peft_adapter(base: Path, out: Path, targets: list[str], **settings) -> Path:
    """peft's WaveFT adapter, its coefficients moved far from their start as by training."""
    torch.manual_seed(0)
    model = get_peft_model(_load(base), WaveFTConfig(task_type="CAUSAL_LM", target_modules=targets,
                                                     **{"n_frequency": 40, "scaling": 4.0} | settings))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "waveft_spectrum" in name:
                p.add_(torch.randn(p.shape) * 0.5)
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("family", ["db1", "sym2", "db4", "coif1"])
@pytest.mark.parametrize("use_idwt", [True, False])
def test_the_layer_is_peft_s_bit_for_bit(family, use_idwt):
    """Update, output and the coefficients' and input's gradients equal peft's layer's, on layers of even and odd
    sizes, Linear and Conv1D (weight (in, out))."""
    for out_features, in_features, conv1d in ((32, 16, False), (7, 12, False), (33, 17, False), (96, 32, True)):
        torch.manual_seed(0)
        base = Conv1D(out_features, in_features) if conv1d else nn.Linear(in_features, out_features)
        settings = {"n_frequency": 50, "scaling": 3.0, "wavelet_family": family, "use_idwt": use_idwt,
                    "random_loc_seed": 5, "init_weights": False}
        torch.manual_seed(1)
        theirs = WaveFTLinear(base, "default", WaveFTConfig(**settings), n_frequency=50)
        torch.manual_seed(1)
        ours = WaveFtLinear(base, 50, WaveFtConfig(method="waveft", **settings), init_weights=False)
        assert torch.equal(ours.waveft_spectrum, theirs.waveft_spectrum["default"])
        assert torch.equal(ours.waveft_indices, theirs.waveft_indices["default"])
        delta = wave_delta(ours.waveft_spectrum, ours.waveft_indices, ours.shape, ours.facts)
        assert torch.equal(delta, theirs.get_delta_weight("default")) and delta.abs().max() > 1e-3
        if use_idwt:  # and PyWavelets' own float64 transform (tests/test_methods.py's waveft_dense) within 1e-7
            parts = {"waveft_spectrum": ours.waveft_spectrum.detach()}
            weight = torch.zeros(out_features, in_features, dtype=torch.float64)
            expected = waveft_dense(weight, None, parts, WaveFtConfig(method="waveft", **settings), "linear")[0]
            assert (delta.double() - expected).abs().max() <= 1e-7
        x = torch.randn(3, in_features)
        grads = []
        for layer in (theirs, ours):
            xi = x.clone().requires_grad_()
            y = layer(xi)
            y.square().sum().backward()
            grads.append((y, xi.grad, dict(layer.named_parameters())[
                "waveft_spectrum.default" if layer is theirs else "waveft_spectrum"].grad))
        assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_pywavelets_filters_are_peft_s_except_its_coif4_and_coif5():
    """PyWavelets' filters equal peft's table in fp32 for every family peft has, but coif4 and coif5: peft's coif4 is
    not orthonormal (its taps sum to 1.448, not sqrt 2) and its coif5 has 48 taps for 30, so its reconstruction is
    smaller than the layer and peft's forward fails; PyWavelets' are orthonormal. Every family of peft's padding table
    shrinks by its filter length - 2 (peftkit pads by that), and all of them, past peft's db10, sym10 and coif5, run."""
    assert set(FAMILIES) == set(WAVELET_REDUCTIONS)
    for family in FAMILIES:
        assert WAVELET_REDUCTIONS[family] == (len(reconstruction_filters(family)[0]) - 2,) * 2, family
    for family in set(peft_wavelist()) - {"haar", "coif4", "coif5"}:
        peft_filters = PeftWavelet(family)
        for ours, theirs in zip(reconstruction_filters(family), (peft_filters.rec_lo, peft_filters.rec_hi)):
            assert torch.equal(torch.tensor(ours, dtype=torch.float32), torch.tensor(theirs, dtype=torch.float32))
    for family in ("coif4", "coif5"):
        lo = torch.tensor(reconstruction_filters(family)[0], dtype=torch.float64)
        theirs = torch.tensor(PeftWavelet(family).rec_lo, dtype=torch.float64)
        shifts = [lo[:len(lo) - 2 * k] @ lo[2 * k:] for k in range(1, len(lo) // 2)]
        assert abs(lo @ lo - 1) < 1e-12 and max(map(abs, shifts)) < 1e-12 and abs(lo.sum() - 2 ** 0.5) < 1e-12
        assert abs(theirs @ theirs - 1) > 5e-3
    assert len(PeftWavelet("coif5").rec_lo) == 48 and len(reconstruction_filters("coif5")[0]) == 30
    assert set(PEFT_COMPUTES) == set(peft_wavelist()) - {"haar", "coif4", "coif5"}
    base = nn.Linear(16, 32)
    with pytest.raises(RuntimeError):
        WaveFTLinear(base, "default", WaveFTConfig(wavelet_family="coif5", init_weights=False), n_frequency=8)(
            torch.randn(2, 16))
    for family in ("coif5", "db38", "sym20", "coif17"):
        with pytest.warns(PeftkitWarning, match=f"adapter.wavelet_family '{family}': peftkit computes it with "
                          "PyWavelets' filters, but peft 0.21.2 cannot compute it: its forward fails"):
            cfg = WaveFtConfig(method="waveft", wavelet_family=family)
        assert WaveFtLinear(base, 8, cfg, init_weights=False)(torch.randn(2, 16)).shape == (2, 32)
    with pytest.warns(PeftkitWarning, match="peft 0.21.2 computes another update from the same coefficients: its "
                      "coif4 filter is not PyWavelets'"):
        WaveFtConfig(method="waveft", wavelet_family="coif4")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        WaveFtConfig(method="waveft", wavelet_family="sym10")


@pytest.mark.parametrize("proportional", [True, False])
def test_the_same_seeds_give_peft_s_entries_coefficients_and_generator(proportional, tiny_gpt2):
    """GPT-2's Conv1D layers, the counts in proportion to the layers or not, the coefficients drawn."""
    settings = {"n_frequency": 40, "random_loc_seed": 11, "init_weights": False,
                "proportional_parameters": proportional, "target_modules": ["c_attn", "mlp.c_proj"]}
    torch.manual_seed(4)
    theirs = get_peft_model(_load(tiny_gpt2), WaveFTConfig(task_type="CAUSAL_LM", **settings))
    after_peft = torch.rand(1)
    torch.manual_seed(4)
    ours = _load(tiny_gpt2)
    inject_adapters(ours, WaveFtConfig(method="waveft", **settings))
    assert torch.equal(torch.rand(1), after_peft)
    sizes = set()
    for path in ("transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"):
        layer, reference = ours.get_submodule(path), theirs.base_model.model.get_submodule(path)
        assert torch.equal(layer.waveft_indices, reference.waveft_indices["default"])
        assert torch.equal(layer.waveft_spectrum, reference.waveft_spectrum["default"])
        sizes.add(len(layer.waveft_spectrum))
    # 40 x 4 layers shared by 2 c_attn (32 x 96) and 2 mlp.c_proj (128 x 32): 160 x 3072 / 14336 = 34.3, 160 x 4096 /
    # 14336 = 45.7
    assert sizes == ({34, 46} if proportional else {40})


def test_target_modules_null_adapts_what_peft_s_default_adapts(tiny_llama, tiny_gpt2):
    """peft's TRANSFORMERS_MODELS_TO_WAVEFT_TARGET_MODULES_MAPPING: q_proj, v_proj on a Llama, mlp.c_proj on GPT-2."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for base in (tiny_llama, tiny_gpt2):
        theirs = get_peft_model(_load(base), WaveFTConfig(task_type="CAUSAL_LM", n_frequency=16)).base_model.model
        expected = {n for n, m in theirs.named_modules() if isinstance(m, BaseTunerLayer)}
        assert set(inject_adapters(_load(base), WaveFtConfig(method="waveft", n_frequency=16))) == expected


@pytest.mark.parametrize(("arch", "family"), [("llama", "sym2"), ("gpt2", "db1")])
def test_peft_s_adapters_load_and_merge_as_peft_s_merge_and_unload(arch, family, tiny_llama, tiny_gpt2, tmp_path):
    """n_frequency_pattern read as peft's WaveFT reads it (get_pattern_key: a key may be a regex over the whole path,
    which FourierFT's `.*\.key$` would not match)."""
    base = {"llama": tiny_llama, "gpt2": tiny_gpt2}[arch]
    pattern = {"q_proj": 30, "c_attn": 70, r"model\.layers\.1\.mlp\.down_proj": 50,
               r"transformer\.h\.1\.mlp\.c_proj": 60}
    adapter = _peft_adapter(base, tmp_path / "peft", TARGETS[arch], wavelet_family=family, n_frequency_pattern=pattern)
    check_loads_and_merges_as_peft(base, adapter, IDS, tmp_path / "merged", unloaded=True)
    assert inspect_adapter(adapter)["trainable_params"] == (2 * 30 + 40 + 50 if arch == "llama" else 2 * 70 + 40 + 60)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_step_s_gradients_are_peft_s(arch, tiny_llama, tiny_gpt2, tmp_path):
    base = gpt2_without_dropout(tiny_gpt2, tmp_path / "gpt2") if arch == "gpt2" else tiny_llama
    adapter = _peft_adapter(base, tmp_path / "peft", TARGETS[arch], wavelet_family="db4", use_idwt=arch == "llama")
    difference, expected, grads = peft_and_our_gradients(base, adapter, IDS)
    assert difference <= 1e-5 and set(grads) >= set(expected) and len(expected) == 4
    assert max((grads[n] - expected[n]).abs().max() for n in expected) <= 1e-5
    assert min(expected[n].abs().max() for n in expected) > 1e-4


def _recipe(tmp_path: Path, model: Path, data: dict, **adapter) -> Path:
    return method_recipe(tmp_path, model, data, {"method": "waveft", "n_frequency": 64, "scaling": 4.0, **adapter},
                         eval={"base_model": False})


@pytest.mark.parametrize(("adapter", "message"), [
    ({"n_frequency": 0}, "'adapter.n_frequency' = 0"),
    ({"n_frequency": 600}, "adapter.n_frequency: 600 coefficients do not fit a layer of 16 x 32 = 512 entries"),
    ({"wavelet_family": "haar"}, "'haar' is not one of peft's wavelet families: db1 to db38 (db1 is the Haar wavelet), "
                                 "sym2 to sym20, coif1 to coif17"),
    ({"n_frequency_pattern": {"q_prj": 4}, "target_modules": ["q_proj", "v_proj"]},
     "adapter.n_frequency_pattern: 'q_prj' matches none of the 4 adapted modules"),
    ({"n_frequency_pattern": {"q_proj[": 4}}, "'q_proj[' is not a regular expression"),
    ({"target_modules": ["embed_tokens"]}, "'model.embed_tokens' is an embedding; WaveFT (as peft's) adapts Linear"),
    ({"r": 8}, "has no 'r'. Valid keys for method waveft: method, n_frequency, scaling, wavelet_family"),
])
def test_recipe_mistakes_are_refused(adapter, message, tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    recipe = _recipe(tmp_path, tiny_llama, number_data, **adapter)
    for command in ("validate", "train"):
        assert message in " ".join(cli_user_error(monkeypatch, capsys, command, str(recipe)).split()), command


def test_without_pywavelets_the_transform_is_refused_naming_the_extra(tiny_llama, number_data, tmp_path,
                                                                      monkeypatch, capsys):
    """The filters come from PyWavelets, an optional extra: without it the recipe is refused saying how to install it;
    use_idwt: false needs no wavelet and builds."""
    monkeypatch.setitem(sys.modules, "pywt", None)  # (import pywt raises ImportError)
    reconstruction_filters.cache_clear()
    try:
        message = cli_user_error(monkeypatch, capsys, "validate", str(_recipe(tmp_path, tiny_llama, number_data)))
        assert ("WaveFT's inverse wavelet transform takes its filters from PyWavelets, which is not installed. pip "
                'install "peftkit[waveft]" (or set adapter.use_idwt: false, which needs no wavelet)') in " ".join(
                    message.split())
        model = _load(tiny_llama)
        inject_adapters(model, WaveFtConfig(method="waveft", n_frequency=8, use_idwt=False))
        model(IDS)
    finally:
        reconstruction_filters.cache_clear()  # (none kept from without PyWavelets)


def test_peft_s_settings_it_cannot_apply_are_refused(tiny_llama, tmp_path):
    from peftkit.adapter_base import load_adapted_model

    adapter = _peft_adapter(tiny_llama, tmp_path / "peft", TARGETS["llama"])
    config = adapter / "adapter_config.json"
    written = config.read_text()
    for edit, message in (({"random_loc_seed": None}, "random_loc_seed is null, so the coefficients' entries cannot"),
                          ({"wavelet_family": "haar"}, "'haar' is not one of peft's wavelet families")):
        config.write_text(json.dumps(json.loads(written) | edit))
        with pytest.raises(PeftkitError, match=message):
            load_adapted_model(str(tiny_llama), str(adapter))
    config.write_text(written)
    check_trained_bias_refused(adapter, "waveft_only")


def test_two_named_adapters_serve_each_its_rows_and_combine_as_peft(tiny_llama, tmp_path):
    for name, seed, family in (("a", 777, "db1"), ("b", 3, "sym2")):  # other entries and wavelets too
        _peft_adapter(tiny_llama, tmp_path / name, TARGETS["llama"], random_loc_seed=seed, wavelet_family=family)
    check_routed_as_peft(tiny_llama, [tmp_path / "a", tmp_path / "b"], IDS)
    check_halves_into_base_and_refuses_fusion(tiny_llama, str(tmp_path / "a"), "WaveFT", tmp_path / "half", IDS)


@pytest.mark.parametrize("family", ["db1", "sym2"])
def test_a_layer_compiles_to_one_graph_with_the_eager_numbers(family):
    """torch.compile traces the layer's forward and backward whole (fullgraph): the forward read PyWavelets' filters
    (`reconstruction_filters`) every call, which dynamo cannot trace, a graph break in every WaveFT layer of a
    compiled training step (16 in a 3-step run of a 1-layer Llama, q and v adapted). The output and the
    coefficients' gradient are the eager layer's."""
    import torch._dynamo

    torch.manual_seed(0)
    layer = WaveFtLinear(nn.Linear(12, 20), 30, WaveFtConfig(method="waveft", scaling=3.0, wavelet_family=family),
                         init_weights=False)
    x = torch.randn(3, 12)
    results = []
    for forward in (layer, torch.compile(layer, backend="aot_eager", fullgraph=True)):
        layer.waveft_spectrum.grad = None
        y = forward(x)
        y.square().sum().backward()
        results.append((y.detach(), layer.waveft_spectrum.grad.clone()))
    torch._dynamo.reset()
    assert all((a - b).abs().max() <= 1e-6 for a, b in zip(*results)) and results[0][1].abs().max() > 0


def test_lora_plus_with_a_run_from_a_waveft_adapter_is_refused_by_text(tiny_llama, number_data, tmp_path, monkeypatch,
                                                                        capsys):
    """training.loraplus_lr_ratio with adapter.init_from a WaveFT adapter (a recipe's adapter section parses as LoRA
    until init_from's settings replace it): validate crashed with pydantic's traceback, now LoRA+'s refusal."""
    adapter = _peft_adapter(tiny_llama, tmp_path / "peft", TARGETS["llama"])
    recipe = method_recipe(tmp_path, tiny_llama, number_data, {"init_from": str(adapter)},
                           training={"loraplus_lr_ratio": 16})
    said = " ".join(cli_user_error(monkeypatch, capsys, "validate", str(recipe)).split())
    assert (f"adapter.init_from {adapter} holds a waveft adapter, which the recipe's other settings do not allow: "
            "training.loraplus_lr_ratio: LoRA+ gives lora_B its own learning rate") in said


def test_a_run_resumes_to_the_same_bits_and_checkpointing_changes_nothing(tiny_llama, number_data, tmp_path):
    """A run with the coefficients in proportion to the layers (drawn again at every start: link_layers) killed after
    step 2 of 4 and resumed writes the unbroken run's file byte for byte; gradient checkpointing trains the same
    coefficients (measured: equal bits)."""
    from tests.conftest import check_resumes_and_checkpoints_alike

    adapter = {"method": "waveft", "n_frequency": 40, "scaling": 4.0, "wavelet_family": "db4", "init_weights": False,
               "proportional_parameters": True, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    check_resumes_and_checkpoints_alike(tmp_path, tiny_llama, number_data, adapter)
