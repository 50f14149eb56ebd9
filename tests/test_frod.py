"""FRoD (peftkit.methods.frod) beyond the conformance battery of tests/test_methods.py: its bases, sparse entries, U
and lambda_l against peft 0.21's from one seed, peft's adapter without saved projections loaded and merged with peft's numbers, our export loaded by peft with our logits and gradients, the
shipped recipe, combining two adapters into the base, and what it refuses."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import peft
import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from peftkit.adapters import adapter_layers, inject_adapters
from peftkit.errors import PeftkitError
from peftkit.inspect import inspect_adapter
from peftkit.methods.frod import FrodConfig
from tests.conftest import load_fp32 as _load  # (float32, eval mode)
from tests.conftest import (check_combined_into_base_as_peft_merges, check_loads_and_merges_as_peft,
                            check_shipped_recipe_is_peft_s, check_trained_bias_refused, save_random_adapter)

IDS = torch.tensor([[3, 4, 5, 9, 7, 8, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47]])
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _peft_adapter(base: Path, out: Path, seed: int = 0, **settings) -> Path:
    """peft's FRoD with init_weights false (S's values and lambda_l moved: not the base), saved by peft."""
    torch.manual_seed(seed)
    config = {"target_modules": TARGETS, "init_weights": False, "sparse_rate": 0.05, "progressbar": False} | settings
    model = get_peft_model(_load(base), peft.FrodConfig(**config))
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("init_weights", [False])  # (the default init: the battery's identity and peft checks)
def test_projections_and_start_are_peft_s(init_weights, tiny_llama):
    """From one seed, peftkit's and peft's layers hold the same V, S entries, U, lambda_l and S values bit for bit
    (two categories of 32 inputs, one of 64: QR and SVD bases), give the same logits (the base's at default init, to
    rounding) and leave torch's generator in the same state."""
    settings = {"target_modules": TARGETS, "init_weights": init_weights, "sparse_rate": 0.05}
    torch.manual_seed(0)
    theirs = get_peft_model(_load(tiny_llama), peft.FrodConfig(progressbar=False, **settings))
    after_theirs = torch.rand(1)
    ours = _load(tiny_llama)
    torch.manual_seed(0)
    inject_adapters(ours, FrodConfig(method="frod", **settings))
    assert torch.equal(torch.rand(1), after_theirs)
    for path, layer in adapter_layers(ours).items():
        reference = theirs.base_model.model.get_submodule(path)
        for name in ("frod_V", "frod_s_indices", "frod_lambda_l", "frod_lambda_s_values"):
            assert torch.equal(getattr(layer, name), getattr(reference, name)["default"]), (path, name)
        assert torch.equal(layer.u_matrix(), reference.frod_U["default"]), path
    with torch.no_grad():
        logits = ours(IDS).logits
        assert torch.equal(logits, theirs(IDS).logits)
        if init_weights:
            assert (logits - _load(tiny_llama)(IDS).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("save_projection", [False])  # (saved: the battery's test_we_read_peft_adapter)
def test_peft_adapter_loads_and_merges_as_peft(save_projection, tiny_llama, tmp_path):
    """peft's file without its projections (recomputed from the base, as peft does) gives peft's logits in peftkit
    and in every merge (in place and back, merged_model), peftkit merge as merge_and_unload."""
    adapter = _peft_adapter(tiny_llama, tmp_path / "adapter", save_projection=save_projection)
    keys = load_file(adapter / "adapter_model.safetensors")
    assert ("base_model.frod_V.self_attn_q_proj" in keys) == save_projection
    trained = sum(t.numel() for k, t in keys.items() if k.endswith(("frod_lambda_l", "frod_lambda_s_values")))
    assert inspect_adapter(adapter)["trainable_params"] == trained == 2 * (64 + 204) + 4 * (32 + 51)
    check_loads_and_merges_as_peft(tiny_llama, adapter, IDS, tmp_path / "merged", unloaded=True)


def test_export_loads_in_peft_with_our_logits(tiny_llama, tmp_path):
    """Our export (names and shapes as peft's: one V per category) loads in peft with our logits, and peft's
    gradients of a step equal ours."""
    cfg = FrodConfig(method="frod", target_modules=TARGETS, sparse_rate=0.05)
    adapter = save_random_adapter(tiny_llama, cfg, tmp_path / "ours", seed=3, std=0.05)
    saved = load_file(adapter / "adapter_model.safetensors")
    assert sorted(k for k in saved if k.startswith("base_model.frod_V.")) == [
        "base_model.frod_V.mlp_down_proj", "base_model.frod_V.self_attn_q_proj", "base_model.frod_V.self_attn_v_proj"]
    assert saved["base_model.frod_s_size.mlp_down_proj"].tolist() == [64, 64]
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "FROD"
    from peftkit.adapter_base import load_adapted_model

    ours = load_adapted_model(str(tiny_llama), str(adapter), torch.device("cpu"))[0].eval()
    theirs = PeftModel.from_pretrained(_load(tiny_llama), adapter, is_trainable=True)
    theirs_logits = theirs(input_ids=IDS).logits
    ours_logits = ours(input_ids=IDS).logits
    assert (ours_logits - _load(tiny_llama)(IDS).logits).abs().max() > 1e-2
    assert (ours_logits - theirs_logits).abs().max() <= 1e-5
    theirs_logits.square().mean().backward()
    ours_logits.square().mean().backward()
    for path, layer in adapter_layers(ours).items():
        reference = theirs.base_model.model.get_submodule(path)
        for name in ("frod_lambda_l", "frod_lambda_s_values"):
            ref = getattr(reference, name)["default"].grad
            assert torch.allclose(getattr(layer, name).grad, ref, rtol=1e-4, atol=1e-7), (path, name)


def test_shipped_recipe_trains_and_peft_loads_its_export(tiny_llama, number_data, tmp_path):
    """recipes/methods/frod.yaml trains (eval loss down), its adapter has peft's names and shapes for the recipe's
    settings and loads in peft with the merged export's logits."""
    check_shipped_recipe_is_peft_s("frod", partial(peft.FrodConfig, progressbar=False), tiny_llama, number_data,
                                   tmp_path, IDS)


def test_combining_two_adapters_into_the_base_is_peft_s_merges_mean(tiny_llama, tmp_path):
    """Two peft adapters (seeds 0, 1) combined at 0.5 each into the base give the mean of peft's merge_and_unload
    weights (the kinds' saved V under each layer: it failed, the file's base_model.frod_V.<kind> not a layer's key);
    one saved without its projections is refused by text."""
    from peftkit.combine_adapters import combine_adapters
    from peftkit.combine_inputs import Combination

    adapters = [_peft_adapter(tiny_llama, tmp_path / f"a{seed}", seed, target_modules=["q_proj", "v_proj"])
                for seed in (0, 1)]
    check_combined_into_base_as_peft_merges(tiny_llama, adapters, tmp_path / "combined")
    bare = _peft_adapter(tiny_llama, tmp_path / "bare", save_projection=False)
    with pytest.raises(PeftkitError, match="saved without its projections .save_projection: false.: each kind"):
        combine_adapters([str(adapters[0]), str(bare)], Combination("linear", (0.5, 0.5)), str(tmp_path / "c2"),
                         into_base=True)


def test_refusals(tiny_llama, tmp_path):
    """A trained bias in peft's config and an embedding target are refused by text."""
    adapter = _peft_adapter(tiny_llama, tmp_path / "adapter")
    check_trained_bias_refused(adapter, "frod_only")
    with pytest.raises(PeftkitError, match="'model.embed_tokens' is an Embedding; FRoD .as peft's. adapts Linear"):
        inject_adapters(_load(tiny_llama), FrodConfig(method="frod", target_modules=["embed_tokens"]))
