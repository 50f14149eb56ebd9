"""BOFT (peftkit.methods.boft) beyond the conformance battery of tests/test_methods.py: layer by layer against peft
0.21's (forward, gradients, merge, unmerge; one butterfly factor on peft's pure-PyTorch path, more through its
block-diagonal extension, given in PyTorch by tests/conftest.py), peft's adapters loaded, trained and merged with peft's
numbers, the block dropout, a resumed run, the shipped recipe, and what it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
import yaml
from peft import PeftModel, get_peft_model
from peft.tuners.boft.layer import Linear as PeftBoftLinear
from safetensors.torch import load_file
from torch import nn

from peftkit.adapters import inject_adapters
from peftkit.errors import PeftkitError
from peftkit.methods.boft import Boft, BoftConfig
from tests.conftest import load_fp32 as _load  # (float32, eval mode)
from tests.conftest import (check_loads_and_merges_as_peft, check_resumes_to_the_same_bits, check_trained_bias_refused,
                            cli_user_error, make_recipe, method_recipe, peft_and_our_gradients, train_shipped_recipe)

IDS = torch.tensor([[3, 4, 5, 9, 7, 8, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47]])
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _peft_adapter(base: Path, out: Path, **settings) -> Path:
    """peft's BOFT far from identity (init_weights=False: R ~ N(0, 0.1^2), s ~ N(1, 0.1^2)), saved by peft."""
    torch.manual_seed(0)
    config = {"boft_block_size": 4, "init_weights": False, "target_modules": TARGETS} | settings
    get_peft_model(_load(base), peft.BOFTConfig(**config)).save_pretrained(out)
    return out


@pytest.mark.parametrize("settings", [{"boft_block_size": 4}, {"boft_block_num": 4, "boft_block_size": 0,
                                                                "boft_n_butterfly_factor": 3}])
def test_a_layer_is_peft_s(settings, peft_boft_factors):
    """One biased layer of 16 inputs: peft's and peftkit's give the same output, gradients, merged and unmerged weights
    (4 blocks of 4, or 4 blocks with 3 butterfly factors)."""
    torch.manual_seed(0)
    theirs = PeftBoftLinear(nn.Linear(16, 7), "default", config=peft.BOFTConfig(init_weights=False, **settings))
    ours = Boft.wrap(nn.Linear(16, 7), BoftConfig(method="boft", **settings), "layer")
    ours.base_layer.load_state_dict(theirs.base_layer.state_dict())
    with torch.no_grad():
        ours.boft_R.copy_(theirs.boft_R["default"] * 5)  # far from identity
        theirs.boft_R["default"].mul_(5)
        ours.boft_s.copy_(theirs.boft_s["default"])
    x = torch.randn(3, 5, 16)
    out_theirs, out_ours = theirs(x), ours(x)
    assert (out_ours - out_theirs).abs().max() <= 1e-5 and (out_ours - ours.base_layer(x)).abs().max() > 0.1
    out_theirs.square().sum().backward()
    out_ours.square().sum().backward()
    for name in ("boft_R", "boft_s"):
        grad = getattr(theirs, name)["default"].grad
        assert (getattr(ours, name).grad - grad).abs().max() <= 2e-6 * grad.abs().max(), name
    weight = theirs.base_layer.weight.detach().clone()
    theirs.merge()
    ours.merge()
    assert (ours.base_layer.weight - theirs.base_layer.weight).abs().max() <= 1e-6
    ours.unmerge()
    assert (ours.base_layer.weight - weight).abs().max() <= 1e-6


@pytest.mark.parametrize("factors", [1, 2])
def test_peft_s_adapter_loads_merges_and_trains_as_peft_s(factors, tiny_llama, tmp_path, monkeypatch):
    """peft's adapter (far from identity) gives peft's logits, merged in place, by `merged_model` and by `peftkit merge`
    (whose weights are peft's merge_and_unload's), and one training step's loss and gradients are peft's. One factor
    on peft's own pure-PyTorch path; two through the extension's stand-in."""
    if factors > 1:
        import peft.tuners.boft.layer as boft_layer

        from tests.conftest import _BlockDiagonal

        monkeypatch.setattr(boft_layer, "_FBD_CUDA", _BlockDiagonal())
    adapter = _peft_adapter(tiny_llama, tmp_path / "peft", boft_n_butterfly_factor=factors, boft_block_size=2)
    assert load_file(adapter / "adapter_model.safetensors")[
        "base_model.model.model.layers.0.self_attn.q_proj.boft_R"].shape == (factors, 16, 2, 2)
    check_loads_and_merges_as_peft(tiny_llama, adapter, IDS, tmp_path / "merged")
    theirs = PeftModel.from_pretrained(_load(tiny_llama), adapter).merge_and_unload().state_dict()
    ours = _load(tmp_path / "merged").state_dict()
    assert ours.keys() == theirs.keys() and max(float((ours[k] - theirs[k]).abs().max()) for k in ours) <= 1e-6

    difference, expected, grads = peft_and_our_gradients(tiny_llama, adapter, IDS)
    assert difference <= 1e-6 and grads.keys() == expected.keys() and len(grads) == 12
    assert max(float((grads[n] - expected[n]).abs().max() / expected[n].abs().max()) for n in grads) <= 1e-5


def test_block_dropout_sets_blocks_of_one_factor_to_identity_in_training():
    cfg = BoftConfig(method="boft", boft_block_size=2, boft_n_butterfly_factor=2, boft_dropout=0.5)
    layer = Boft.wrap(nn.Linear(8, 3), cfg, "layer")
    Boft.randomize(layer, torch.Generator().manual_seed(0), 0.3)
    x = torch.randn(2, 8)
    with torch.no_grad():
        evaluated = layer.eval()(x)
        assert torch.equal(layer(x), evaluated)
        trained = [layer.train()(x) for _ in range(8)]
    assert all((t - evaluated).abs().max() > 1e-4 for t in trained)  # 2 of 4 blocks of one factor dropped each time
    import peftkit.methods.boft as boft

    dropped = boft.block_dropout(torch.randn(2, 4, 2, 2), 0.5)
    identity = [(dropped[f, d] == torch.eye(2)).all() for f in range(2) for d in range(4)]
    assert sum(identity) == 2 and (sum(identity[:4]) == 2 or sum(identity[4:]) == 2)


def test_a_run_exports_peft_s_keys_and_resumes_to_the_same_bits(tiny_llama, number_data, tmp_path):
    """A recipe run (two factors, block dropout: random per step) saves peft's keys and config, and a run killed after
    step 2 and resumed gives the unbroken run's adapter, bit for bit."""
    recipe = make_recipe(tmp_path, tiny_llama, number_data, eval={"base_model": False},
                         training={"max_steps": 6, "save_steps": 2, "save_total_limit": 10})
    raw = yaml.safe_load(recipe.read_text())
    raw["adapter"] = {"method": "boft", "boft_block_size": 2, "boft_n_butterfly_factor": 2, "boft_dropout": 0.25,
                      "target_modules": TARGETS}
    recipe.write_text(yaml.safe_dump(raw))
    check_resumes_to_the_same_bits(recipe, tmp_path / "run", kill_after=2, steps=6)
    adapter = tmp_path / "run" / "adapter"
    shapes = {k: tuple(v.shape) for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    assert shapes["base_model.model.model.layers.0.mlp.down_proj.boft_R"] == (2, 32, 2, 2)  # (factors, blocks, b, b)
    assert shapes["base_model.model.model.layers.0.self_attn.v_proj.boft_s"] == (16, 1)  # (out, 1)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["peft_type"], config["boft_n_butterfly_factor"], config["boft_dropout"]) == ("BOFT", 2, 0.25)


def test_the_shipped_recipe_trains(tiny_llama, number_data, tmp_path):
    summary = train_shipped_recipe("boft", tiny_llama, number_data, tmp_path / "run")
    assert summary["eval_loss"] < summary["base_eval_loss"]
    assert (tmp_path / "run" / "merged").is_dir()


@pytest.mark.parametrize(("adapter", "message"), [
    ({"boft_block_size": 5}, "adapter.boft_block_size: 5 does not divide the 32 input features of "
                             "'model.layers.0.self_attn.q_proj'"),
    ({"boft_block_size": 4, "boft_block_num": 8},
     "boft_block_size is 4 and boft_block_num is 8; BOFT takes exactly one"),
    ({"boft_block_size": 16, "boft_n_butterfly_factor": 3}, "adapter.boft_n_butterfly_factor: 3 factors need an even "
                                                            "block size and a block count divisible by 4"),
])
def test_recipe_mistakes_are_refused(adapter, message, tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    recipe = method_recipe(tmp_path, tiny_llama, number_data, {"method": "boft", **adapter})
    assert message in cli_user_error(monkeypatch, capsys, "train", str(recipe))


def test_what_it_cannot_do_is_refused(tiny_llama, tiny_gpt2, tmp_path):
    """GPT-2's Conv1D (peft's BOFT refuses it too), a peft file whose bias is trained, and AdapterFusion."""
    from peftkit.methods.fusion import FusionConfig
    from peftkit.methods.fusion_sources import check_fusable, fused_adapters

    with pytest.raises(PeftkitError, match=r"'transformer.h.0.attn.c_attn' is GPT-2's Conv1D; BOFT rotates the input"):
        inject_adapters(_load(tiny_gpt2), BoftConfig(method="boft"))
    adapter = _peft_adapter(tiny_llama, tmp_path / "peft")
    with pytest.raises(PeftkitError, match=r"BOFT adapter; AdapterFusion fuses bottleneck adapters, or"):
        check_fusable(fused_adapters(FusionConfig(method="fusion", fuse=[str(adapter), str(adapter)])), "adapter.fuse")
    check_trained_bias_refused(adapter, "boft_only")


def test_peft_s_file_of_one_factor_under_a_setting_of_more_loads_as_peft_loads_it(tiny_llama, tmp_path):
    """peft without its CUDA extension trains one factor whatever boft_n_butterfly_factor says, and saves that setting:
    the file loads as the one factor it holds (with a warning), with the logits peft gives it; it was refused as an
    adapter of another base model."""
    from peftkit.adapter_base import load_adapted_model
    from peftkit.errors import PeftkitWarning

    adapter = _peft_adapter(tiny_llama, tmp_path / "peft", boft_block_size=2, boft_n_butterfly_factor=2)
    assert json.loads((adapter / "adapter_config.json").read_text())["boft_n_butterfly_factor"] == 2
    assert load_file(adapter / "adapter_model.safetensors")[
        "base_model.model.model.layers.0.self_attn.q_proj.boft_R"].shape == (1, 16, 2, 2)
    with pytest.warns(PeftkitWarning, match="boft_n_butterfly_factor is 2, but the weights hold 1 factor"):
        ours = load_adapted_model(str(tiny_llama), str(adapter), torch.device("cpu"))[0]
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(_load(tiny_llama), adapter).eval()(IDS).logits
        assert (ours(IDS).logits - theirs).abs().max() <= 1e-5
        assert (theirs - _load(tiny_llama)(IDS).logits).abs().max() > 1e-2
