"""OSF (method: osf) against HF peft 0.21's OSF: its layer (the draw for a seed, the SVD split, outputs, projected
gradients, merge), peft's adapters loaded, merged and trained with peft's numbers (the split computed again from the
base on loading, as peft does), the shipped recipe's export loaded by peft, and what it refuses. The conformance
battery (tests/test_methods.py) checks the rest."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
import yaml
from peft import PeftModel, get_peft_model
from peft.tuners.osf.layer import Linear as PeftOsfLinear
from torch import nn

from peftkit.adapters import inject_adapters
from peftkit.errors import PeftkitError
from peftkit.methods.osf import Osf, OsfConfig
from tests.conftest import load_fp32 as _load  # (float32, eval mode)
from tests.conftest import check_loads_and_merges_as_peft, cli_user_error, method_recipe, peft_and_our_gradients

IDS = torch.tensor([[3, 4, 5, 9, 7, 8, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47]])


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


@pytest.mark.parametrize("shape", [(12, 9), (9, 12), (10, 10)], ids=["wide", "tall", "square"])
@pytest.mark.parametrize("init", [True, False])
def test_the_layer_is_peft_s(shape, init):
    """From one seed, peftkit's layer draws peft's factors (or takes peft's SVD split); on moved factors its output
    and its projected gradients (U_high / U0 U0^T, as peft's hooks pick) are peft's bit for bit; its merge is peft's
    weight, and its unmerge (which peft lacks) gives the weight back."""
    layers = []
    for _ in range(2):
        torch.manual_seed(0)
        layers.append(nn.Linear(*shape))
    torch.manual_seed(1)
    theirs = PeftOsfLinear(layers[0], "default", config=peft.OSFConfig(init_weights=init), effective_rank=3)
    torch.manual_seed(1)
    ours = Osf.wrap(layers[1], OsfConfig(method="osf", effective_rank=3, init_weights=init), "layer")
    peft_s, mine = dict(theirs.osf_svd_params["default"].named_parameters()), dict(ours.osf_svd_params.named_parameters())
    assert peft_s.keys() == mine.keys() and all(torch.equal(mine[n], peft_s[n]) for n in mine)
    assert torch.equal(ours.osf_U_low_init, theirs._osf_U_low_init["default"])
    with torch.no_grad():
        for n in mine:
            mine[n].add_(torch.randn(mine[n].shape) * 0.2)
            peft_s[n].copy_(mine[n])
    x = torch.randn(3, 5, shape[0])
    out_theirs, out_ours = theirs(x), ours(x)
    assert torch.equal(out_ours, out_theirs) and (out_ours - layers[1](x)).abs().max() > 0.1
    out_theirs.square().sum().backward()
    out_ours.square().sum().backward()
    assert all(torch.equal(mine[n].grad, peft_s[n].grad) for n in mine)
    # independent: the projected gradient has no component along the frozen directions
    u, _, vh = torch.linalg.svd(layers[1].weight.detach(), full_matrices=False)
    gu, gv = mine["U_low"].grad, mine["V_low"].grad
    assert (u[:, :3].T @ gu).abs().max() <= 1e-5 * gu.abs().max() and gu.abs().max() > 0
    assert (gv @ vh[:3].T).abs().max() <= 1e-5 * gv.abs().max() and gv.abs().max() > 0

    weight = layers[1].weight.detach().clone()
    with torch.no_grad():
        theirs.merge()
        ours.merge()
        assert (ours.base_layer.weight - theirs.base_layer.weight).abs().max() <= 1e-6
        assert (ours(x) - out_theirs).abs().max() <= 1e-5
        ours.unmerge()
        assert torch.equal(ours.base_layer.weight, weight)


def _peft_adapter(base: Path, out: Path, **settings) -> Path:
    """peft's OSF with its factors drawn (init_weights=False: its default is the identity), saved by peft."""
    torch.manual_seed(0)
    config = {"init_weights": False, "target_modules": ["q_proj", "v_proj", "down_proj"]} | settings
    model = get_peft_model(_load(base), peft.OSFConfig(**config))
    with torch.no_grad():  # small factors: a model still near the base's logits
        for name, p in model.named_parameters():
            if "osf_svd_params" in name:
                p.mul_(0.05)
    model.save_pretrained(out)
    return out


def test_peft_s_adapter_loads_merges_and_trains_as_peft_s(tiny_llama, tmp_path):
    """peft's adapter with a rank_pattern and a fractional effective_rank (the split computed again from the base on
    loading, by peftkit as by peft): peft's logits, merged in place, by `merged_model` and by `peftkit merge` (which
    splits the weight it merges into; peft's merge_and_unload's logits), and one step's projected gradients."""
    from peftkit.inspect import inspect_adapter

    adapter = _peft_adapter(tiny_llama, tmp_path / "peft", effective_rank=0.25, rank_pattern={"down_proj": 3})
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["peft_type"], config["effective_rank"], config["rank_pattern"]) == ("OSF", 0.25, {"down_proj": 3})
    check_loads_and_merges_as_peft(tiny_llama, adapter, IDS, tmp_path / "merged", unloaded=True)
    info = inspect_adapter(adapter)
    # q (32 x 32): 8 frozen, 24 trained; v (16 x 32): 4 / 12; down (32 x 48?) read from the file's shapes below
    from safetensors.torch import load_file

    tensors = load_file(adapter / "adapter_model.safetensors")
    assert info["trainable_params"] == sum(t.numel() for t in tensors.values())
    assert {tuple(t.shape) for k, t in tensors.items() if "layers.0.self_attn.q_proj" in k} == {(32, 24), (24,),
                                                                                                  (24, 32)}
    difference, expected, grads = peft_and_our_gradients(tiny_llama, adapter, IDS)
    assert difference <= 1e-6 and grads.keys() == expected.keys() and len(grads) == 3 * 2 * 3
    assert max(float((grads[n] - expected[n]).abs().max() / expected[n].abs().max()) for n in grads) <= 1e-4


def test_the_shipped_recipe_trains_and_peft_loads_its_export(tiny_llama, number_data, tmp_path):
    """Two steps of recipes/methods/osf.yaml (on q and v: the battery runs peft's default targets): peft loads the
    adapter with the merged model's logits, and the config is peft's."""
    from peftkit.recipe import load_recipe
    from peftkit.train import train

    raw = yaml.safe_load((Path(__file__).resolve().parent.parent / "recipes" / "methods" / "osf.yaml").read_text())
    raw["model"]["name_or_path"] = str(tiny_llama)
    raw["adapter"] |= {"target_modules": ["q_proj", "v_proj"], "rank_pattern": {"v_proj": 0.75}}
    raw["data"] |= {"train": str(number_data["train"]), "eval": str(number_data["eval"])}
    raw["training"] |= {"max_steps": 2, "warmup_steps": 1, "eval_steps": 2, "batch_size": 2, "lr": 0.01,
                        "mixed_precision": "no"}
    raw["export"] |= {"output_dir": str(tmp_path / "run"), "report": False}
    raw["eval"] = {"samples": 0}
    (recipe := tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    train(load_recipe(recipe))
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["effective_rank"], config["init_weights"]) == ("OSF", None, True)
    assert len(config["target_modules"]) == 2 * 2 and config["rank_pattern"] == {"v_proj": 0.75}
    theirs = _logits(PeftModel.from_pretrained(_load(tiny_llama), tmp_path / "run" / "adapter"))
    assert (_logits(_load(tmp_path / "run" / "merged")) - theirs).abs().max() <= 1e-5
    assert (theirs - _logits(_load(tiny_llama))).abs().max() > 1e-4


@pytest.mark.parametrize(("adapter", "message"), [
    ({"effective_rank": 0}, "adapter.effective_rank: 'model.layers.0.self_attn.q_proj' (32 x 32) would keep 0 "
                            "singular directions frozen (peft refuses a rank of 0 too)"),
    ({"effective_rank": -1}, "'adapter.effective_rank' = -1"),
    ({"target_modules": ["embed_tokens"]}, "'model.embed_tokens' is an Embedding; OSF adapts nn.Linear layers only"),
])
def test_recipe_mistakes_are_refused(adapter, message, tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    recipe = method_recipe(tmp_path, tiny_llama, number_data, {"method": "osf", **adapter})
    assert message in " ".join(cli_user_error(monkeypatch, capsys, "validate", str(recipe)).split())


def test_gpt2_s_conv1d_and_a_quantized_base_are_refused(tiny_llama, tiny_gpt2, number_data, tmp_path, monkeypatch,
                                                        capsys):
    """peft's OSF wraps nn.Linear only (it leaves GPT-2's Conv1D alone) and splits the plain weight: both refused."""
    with pytest.raises(PeftkitError, match=r"'transformer.h.0.attn.c_attn' is GPT-2's Conv1D; OSF adapts nn.Linear"):
        inject_adapters(_load(tiny_gpt2), OsfConfig(method="osf", target_modules=["c_attn"]))
    said = ("adapter.target_modules: 'model.layers.0.self_attn.q_proj' is a 4-bit/8-bit (bitsandbytes) layer; OSF "
            "trains a part of the SVD of the base weight")
    recipe = method_recipe(tmp_path, tiny_llama, number_data, {"method": "osf", "target_modules": ["q_proj"]},
                           quantization={"method": "nf4"})
    shown = " ".join(cli_user_error(monkeypatch, capsys, "validate", str(recipe)).split())
    assert said in shown and "(remove the recipe's quantization section)" in shown  # (no model.quantization key)
