"""LN tuning (`method: ln_tuning`, peftkit.methods.ln_tuning): trained copies of the normalisation layers. Checked
against peft 0.21 beyond the conformance suite (tests/test_methods.py): one step's gradients, peft's adapters loading
and merging as peft's merge_and_unload, a resumed run's bits, and what it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LNTuningConfig, PeftModel, get_peft_model

from peftkit.adapters import inject_adapters
from peftkit.errors import PeftkitError
from peftkit.methods.ln_tuning import LnTuningConfig
from tests.conftest import (check_loads_and_merges_as_peft, check_run_for_peft_resumes, cli_user_error,
                            gpt2_without_dropout, load_fp32, method_recipe, peft_and_our_gradients)

IDS = torch.tensor([[3, 4, 5, 9, 7, 8, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47]])


def _peft_adapter(base: Path, out: Path, seed: int = 0) -> Path:
    """peft's LN tuning adapter on `base` (its defaults), its copies moved off the base's values."""
    torch.manual_seed(seed)
    model = get_peft_model(load_fp32(base), LNTuningConfig(task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_tuning_layers" in name:
                p.add_(torch.randn(p.shape) * 0.3)
    model.save_pretrained(out)
    return out


def _recipe(tmp_path: Path, model: Path, data: dict, **adapter) -> Path:
    recipe = method_recipe(tmp_path, model, data, {"method": "ln_tuning", **adapter}, eval={"base_model": False})
    return recipe


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # RMSNorm; LayerNorm with its shift
def test_a_step_s_gradients_are_peft_s(arch, tiny_llama, tiny_gpt2, tmp_path):
    base = gpt2_without_dropout(tiny_gpt2, tmp_path / "gpt2") if arch == "gpt2" else tiny_llama
    adapter = _peft_adapter(base, tmp_path / "peft")
    difference, expected, grads = peft_and_our_gradients(base, adapter, IDS)
    assert difference <= 1e-6 and set(grads) >= set(expected) and len(expected) == (5 if arch == "llama" else 10)
    assert max((grads[n] - expected[n]).abs().max() for n in expected) <= 1e-6
    assert min(expected[n].abs().max() for n in expected) > 1e-4  # every copy gets a gradient


def test_peft_s_adapters_load_and_merge_as_peft_s_merge_and_unload(tiny_gpt2, tmp_path):
    adapter = _peft_adapter(tiny_gpt2, tmp_path / "peft")
    check_loads_and_merges_as_peft(tiny_gpt2, adapter, IDS, tmp_path / "merged", unloaded=True)


def test_a_run_exports_what_peft_loads_and_resumes_to_the_same_bits(tiny_llama, number_data, tmp_path):
    check_run_for_peft_resumes(_recipe(tmp_path, tiny_llama, number_data), tiny_llama, IDS, 1e-5)


@pytest.mark.parametrize(("adapter", "message"), [
    ({"target_modules": ["q_proj"]}, "adapter.target_modules matches 'model.layers.0.self_attn.q_proj', a Linear: LN "
                                     "tuning trains normalisation layers (LayerNorm, RMSNorm) only"),
    ({"target_modules": ["input_layernrm"]}, "adapter.target_modules entry 'input_layernrm' names no module"),
    ({"target_modules": "all-linear"}, "'adapter.target_modules' = 'all-linear': is 'all-linear', which names linear "
                                       "layers; LN tuning trains normalisation layers"),
    ({"r": 8}, "has no 'r'. Valid keys for method ln_tuning: method, target_modules, modules_to_save"),
])
def test_recipe_mistakes_are_refused(adapter, message, tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    recipe = _recipe(tmp_path, tiny_llama, number_data, **adapter)
    assert message in " ".join(cli_user_error(monkeypatch, capsys, "train", str(recipe)).split())


def test_an_architecture_without_a_default_is_told_to_name_the_norms(tmp_path):
    from peftkit.tiny import build_tiny_model

    build_tiny_model(tmp_path / "m", arch="gemma2", hidden_size=32, num_layers=1, seed=0)
    model = load_fp32(tmp_path / "m")
    model.config.model_type = "unknown"
    with pytest.raises(PeftkitError, match="LN tuning has no default for model type 'unknown'"):
        inject_adapters(model, LnTuningConfig(method="ln_tuning"))


def test_two_named_adapters_serve_each_its_rows_as_peft(tiny_llama, tmp_path):
    from peftkit.adapters.named import load_named_model

    expected = []
    for seed in (0, 1):
        _peft_adapter(tiny_llama, tmp_path / str(seed), seed=seed)
        with torch.no_grad():
            expected.append(PeftModel.from_pretrained(load_fp32(tiny_llama), tmp_path / str(seed))(input_ids=IDS).logits)
    model, adapters = load_named_model([("a", str(tmp_path / "0")), ("b", str(tmp_path / "1"))], str(tiny_llama))[:2]
    with torch.no_grad(), adapters.routed(["a", "b"]):
        mixed = model.eval()(input_ids=IDS).logits
    assert (mixed[0] - expected[0][0]).abs().max() <= 1e-5 and (mixed[1] - expected[1][1]).abs().max() <= 1e-5
    assert (expected[0] - expected[1]).abs().max() > 1e-3


def test_combining_and_fusion_refuse_it_and_inspect_reads_it(tiny_llama, tmp_path):
    from peftkit.combine_inputs import read_sources
    from peftkit.inspect import inspect_adapter
    from peftkit.methods.fusion import FusionConfig
    from peftkit.methods.fusion_sources import check_fusable, fused_adapters

    adapter = str(_peft_adapter(tiny_llama, tmp_path / "peft"))
    with pytest.raises(PeftkitError, match="is an LN tuning adapter, whose trained copies replace the norms' weights"):
        read_sources([adapter] * 2, False)
    with pytest.raises(PeftkitError, match=r"is an LN tuning adapter; AdapterFusion fuses bottleneck adapters"):
        check_fusable(fused_adapters(FusionConfig(method="fusion", fuse=[adapter, adapter])), "adapter.fuse")
    info = inspect_adapter(adapter)
    assert info["peftkit_reads"]["ok"] and not info["vllm"]["accepts"]


def test_exclude_modules_leaves_out_what_peft_leaves_out(tiny_llama):
    from peft.tuners.tuners_utils import BaseTunerLayer

    from peftkit.adapters import adapter_layers

    excluded = ["model.norm", "layers.0.input_layernorm"]
    theirs = get_peft_model(load_fp32(tiny_llama), LNTuningConfig(task_type="CAUSAL_LM", exclude_modules=excluded))
    kept = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if isinstance(m, BaseTunerLayer)}
    ours = load_fp32(tiny_llama)
    inject_adapters(ours, LnTuningConfig(method="ln_tuning", exclude_modules=excluded))
    assert set(adapter_layers(ours)) == kept and len(kept) == 3
