"""DeFT (method: deft) against HF peft 0.21.2's DeFT: its layer for Linear and GPT-2's Conv1D under relu, qr, alpha,
PaRa and a rank capped at the outputs (the draws and the data-dependent start for a seed, forward, gradients, merge,
unmerge), peft's adapter loaded, merged and trained with peft's numbers, the start on a 4-bit base, the shipped recipe,
and what it refuses. The conformance battery (tests/test_methods.py) checks the rest."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.deft.layer import DeftLinear as PeftDeftLinear
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit.adapters import inject_adapters
from peftkit.errors import PeftkitError
from peftkit.methods.deft import Deft, DeftConfig
from tests.conftest import load_fp32 as _load  # (float32, eval mode)
from tests.conftest import (check_halves_into_base_and_refuses_fusion, check_loads_and_merges_as_peft,
                            check_trained_bias_refused, cli_user_error, method_recipe, peft_and_our_gradients,
                            train_shipped_recipe)
from tests.test_methods import deft_dense

IDS = torch.tensor([[3, 4, 5, 9, 7, 8, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47]])
LAYERS = {"linear": lambda: nn.Linear(12, 8), "conv1d": lambda: Conv1D(8, 12)}


@pytest.mark.parametrize(("kind", "settings"), [
    ("linear", {}), ("conv1d", {"decomposition_method": "qr", "alpha": 6, "init_weights": False}),
    ("linear", {"para": True}), ("conv1d", {"r": 12, "alpha": 3}),  # r capped at the 8 outputs
], ids=["relu", "qr-alpha-random", "para", "capped"])
def test_the_layer_is_peft_s(kind, settings):
    """One layer: from one seed, peft's P and R bit for bit (R's start reads the base weight: the update is 0, the
    base's output, with init_weights); on random tensors the output and gradients are peft's bit for bit and the dense
    projector's (tests/test_methods.py's deft_dense); merged, peft's weight (1e-6); unmerged, the weight before (1e-6)."""
    settings = {"r": 4} | settings
    cfg = DeftConfig(method="deft", **settings)
    torch.manual_seed(0)
    theirs = PeftDeftLinear(LAYERS[kind](), "default", config=peft.DeftConfig(**settings, fan_in_fan_out=kind == "conv1d"),
                            r=settings["r"])
    torch.manual_seed(0)
    ours = Deft.wrap(LAYERS[kind](), cfg, "layer")
    names = ["deft_P"] + ([] if cfg.para else ["deft_R"])
    pairs = [(getattr(ours, n), getattr(theirs, n)["default"]) for n in names]
    assert all(torch.equal(mine, peft_s) for mine, peft_s in pairs) and ours.deft_P.shape == (8, min(cfg.r, 8))
    x = torch.randn(3, 5, 12)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
        if cfg.init_weights and not cfg.para:
            assert (ours(x) - ours.base_layer(x)).abs().max() <= 1e-6
        for mine, peft_s in pairs:
            mine.copy_(torch.randn(mine.shape) * 0.3)
            peft_s.copy_(mine)
    weight = ours.base_layer.weight.detach().clone()
    dense = deft_dense(weight, None, {n: p.detach() for n, p in ours.parts().items()}, cfg, kind)[0]
    out_theirs, out_ours = theirs(x), ours(x)
    exact = (x @ dense if kind == "conv1d" else x @ dense.T) + ours.base_layer.bias
    assert torch.equal(out_ours, out_theirs) and (out_ours - exact).abs().max() <= 1e-5
    assert (out_ours - ours.base_layer(x)).abs().max() > 0.05
    out_theirs.square().sum().backward()
    out_ours.square().sum().backward()
    assert all(torch.equal(mine.grad, peft_s.grad) for mine, peft_s in pairs)
    theirs.merge()
    ours.merge()
    assert (ours.base_layer.weight - theirs.base_layer.weight).abs().max() <= 1e-6
    assert (ours.base_layer.weight - dense).abs().max() <= 1e-5
    theirs.unmerge()
    ours.unmerge()
    assert (ours.base_layer.weight - weight).abs().max() <= 1e-6
    assert (ours.base_layer.weight - theirs.base_layer.weight).abs().max() <= 1e-6


def _peft_adapter(base: Path, out: Path, **settings) -> Path:
    """peft's DeFT with R drawn (init_weights=False: its default starts at the base model), saved by peft."""
    torch.manual_seed(0)
    config = {"r": 4, "init_weights": False, "init_scale": 25.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    model = get_peft_model(_load(base), peft.DeftConfig(task_type="CAUSAL_LM", **config | settings))
    model.save_pretrained(out)
    return out


def test_peft_s_adapter_loads_merges_and_trains_as_peft_s(tiny_llama, tmp_path):
    """peft's qr adapter with alpha (the battery loads peft's relu adapters on Llama and GPT-2): peft's logits in
    peftkit, merged in place (and back), by merged_model and by `peftkit merge` (peft's merge_and_unload's logits, and
    weights within 1e-6), and one training step's loss and gradients are peft's (1e-5 relative)."""
    adapter = _peft_adapter(tiny_llama, tmp_path / "peft", decomposition_method="qr", alpha=8)
    check_loads_and_merges_as_peft(tiny_llama, adapter, IDS, tmp_path / "merged", unloaded=True)
    theirs = PeftModel.from_pretrained(_load(tiny_llama), adapter).merge_and_unload().state_dict()
    ours = _load(tmp_path / "merged").state_dict()
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours if k in theirs) <= 1e-6
    difference, expected, grads = peft_and_our_gradients(tiny_llama, adapter, IDS)
    assert difference <= 1e-6 and grads.keys() == expected.keys() and len(grads) == 2 * 3 * 2  # P, R; 3 targets
    assert max(float((grads[n] - expected[n]).abs().max() / expected[n].abs().max()) for n in grads) <= 1e-5


def test_a_4_bit_base_starts_at_its_own_outputs(tiny_llama):
    """R's start reads the dequantized weight of a 4-bit base (peft has no bitsandbytes DeFT): the update is 0 against
    the weights the layer computes with, so the adapted 4-bit model gives the 4-bit base's logits."""
    from peftkit.modeling import load_model
    from peftkit.recipe import ModelConfig, QuantizationConfig

    quant = QuantizationConfig(method="nf4", compute_dtype="float32")
    model = load_model(ModelConfig(name_or_path=str(tiny_llama), dtype="float32"), quant, torch.device("cpu"))
    with torch.no_grad():
        base = model(IDS).logits
        inject_adapters(model, DeftConfig(method="deft", r=4))
        assert (model(IDS).logits - base).abs().max() <= 1e-5


def test_the_shipped_recipe_trains_and_peft_loads_its_export(tiny_llama, number_data, tmp_path):
    summary = train_shipped_recipe("deft", tiny_llama, number_data, tmp_path / "run", steps=3, batch_size=2)
    assert summary["eval_loss"] < summary["base_eval_loss"]
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["decomposition_method"]) == ("DEFT", 8, "relu")
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(_load(tiny_llama), tmp_path / "run" / "adapter")(input_ids=IDS).logits
        merged = _load(tmp_path / "run" / "merged")(input_ids=IDS).logits
    assert (merged - theirs).abs().max() <= 1e-5


@pytest.mark.parametrize(("adapter", "message"), [
    ({"decomposition_method": "svd"}, "'adapter.decomposition_method' = 'svd': must be one of 'relu' or 'qr'"),
    ({"alpha": 0}, "'adapter.alpha' = 0"),
    ({"deft_dropout": 1.0}, "'adapter.deft_dropout' = 1.0"),
    ({"target_modules": ["embed_tokens"]}, "adapter.target_modules: 'model.embed_tokens' is an Embedding; DeFT adapts "
                                           "nn.Linear and GPT-2's Conv1D (and 4-bit/8-bit) layers only"),
    ({"dropout": 0.1}, "DeFT (method: deft) has no 'dropout'. Did you mean 'deft_dropout'? Valid keys for method "
                       "deft: method, r, decomposition_method, init_scale, alpha, para, deft_dropout, init_weights"),
])
def test_recipe_mistakes_are_refused(adapter, message, tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    recipe = method_recipe(tmp_path, tiny_llama, number_data, {"method": "deft", "r": 4, **adapter})
    assert message in " ".join(cli_user_error(monkeypatch, capsys, "validate", str(recipe)).split())


def test_a_trained_bias_and_embeddings_are_refused(tiny_llama, tmp_path):
    """peftkit does not train a bias (peft's bias 'deft_only'), and peft's DeFT has no embedding layer."""

    with pytest.raises(PeftkitError, match=r"'model.embed_tokens' is an Embedding; DeFT adapts nn.Linear"):
        inject_adapters(_load(tiny_llama), DeftConfig(method="deft", r=4, target_modules=["embed_tokens"]))
    adapter = _peft_adapter(tiny_llama, tmp_path / "peft")
    check_trained_bias_refused(adapter, "deft_only")


def test_combined_into_the_base_each_update_reads_the_base_and_fusion_refuses_it(tiny_llama, tmp_path):
    """`peftkit merge --into-base` of the adapter with itself at 0.5 and 0.5: each update is taken against the base
    weight (W' - W), so the halves give peft's logits of the adapter alone; AdapterFusion over DeFT is refused."""
    adapter = str(_peft_adapter(tiny_llama, tmp_path / "peft"))
    check_halves_into_base_and_refuses_fusion(tiny_llama, adapter, "DeFT", tmp_path / "half", IDS)
