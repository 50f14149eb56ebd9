"""SHiRA (method: shira) against HF peft 0.21's SHiRA: its layer (outputs, gradients, merge, unmerge), its mask and
start for a seed, peft's adapters (its random mask and a custom one) loaded, merged and trained with peft's numbers,
the shipped recipe resumed to the same bits, and what it refuses. The conformance battery (tests/test_methods.py)
checks the rest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel, ShiraConfig as PeftShira, get_peft_model
from peft.tuners.shira.layer import Linear as PeftShiraLinear
from peft.tuners.shira.mask_functions import random_mask
from torch import nn

from peftkit.adapters import inject_adapters
from peftkit.adapter_base import load_adapted_model
from peftkit.errors import PeftkitError
from peftkit.methods.shira import Shira, ShiraConfig
from tests.conftest import load_fp32 as _load  # (float32, eval mode)
from tests.conftest import (check_loads_and_merges_as_peft, check_resumes_to_the_same_bits, cli_user_error,
                            method_recipe, peft_and_our_gradients)

IDS = torch.tensor([[3, 4, 5, 9, 7, 8, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47]])
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def test_the_layer_computes_merges_and_unmerges_as_peft_s():
    """A 12 -> 8 Linear, r 1 (20 entries): outputs, the values' and the input's gradients, merge and unmerge equal
    peft's Linear's on the same mask and values."""
    torch.manual_seed(0)
    base = nn.Linear(12, 8).requires_grad_(False)
    weight = base.weight.detach().clone()
    config = PeftShira(r=1, random_seed=3, init_weights=False)
    theirs = PeftShiraLinear(base, random_mask(base, 1, random_seed=3), "default", config, r=1)
    ours = Shira.wrap(nn.Linear(12, 8).requires_grad_(False), ShiraConfig(method="shira", r=1, random_seed=3), "l")
    ours.base_layer.load_state_dict({"weight": weight, "bias": base.bias})
    with torch.no_grad():
        ours.shira_weight.copy_(theirs.shira_weight["default"])
    assert torch.equal(ours.shira_indices, theirs.shira_indices["default"])
    x = torch.randn(3, 5, 12).requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    out, expected = ours(x), theirs(x2)
    assert (out - expected).abs().max() <= 1e-6 and (out - (x @ weight.T + base.bias)).abs().max() > 1e-2
    (out * torch.linspace(-1, 1, 8)).sum().backward()
    (expected * torch.linspace(-1, 1, 8)).sum().backward()
    assert (ours.shira_weight.grad - theirs.shira_weight["default"].grad).abs().max() <= 1e-6
    assert (x.grad - x2.grad).abs().max() <= 1e-6
    ours.merge()
    theirs.merge()
    assert (ours.base_layer.weight - theirs.base_layer.weight).abs().max() <= 1e-7
    ours.unmerge()
    assert (ours.base_layer.weight - weight).abs().max() <= 1e-7


@pytest.mark.parametrize("seed", [None, 7])
def test_the_same_seed_gives_peft_s_mask_and_start(seed, tiny_llama):
    """peft's mask (torch's default seed for null) and N(0, 1) values for a seed; its default start is the base
    model's logits."""
    settings = {"r": 2, "random_seed": seed, "target_modules": TARGETS}
    torch.manual_seed(4)
    theirs = get_peft_model(_load(tiny_llama), PeftShira(task_type="CAUSAL_LM", init_weights=False, **settings))
    torch.manual_seed(4)
    ours = _load(tiny_llama)
    inject_adapters(ours, ShiraConfig(method="shira", init_weights=False, **settings))
    for path in ("model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"):
        layer, reference = ours.get_submodule(path), theirs.base_model.model.get_submodule(path)
        assert torch.equal(layer.shira_indices, reference.shira_indices["default"])
        assert torch.equal(layer.shira_weight, reference.shira_weight["default"])
    assert (_logits(ours) - _logits(theirs)).abs().max() <= 1e-5
    fresh = _load(tiny_llama)
    inject_adapters(fresh, ShiraConfig(method="shira", **settings))
    assert torch.equal(_logits(fresh), _logits(_load(tiny_llama)))


def _peft_adapter(base: Path, out: Path, mask_fn=None) -> Path:
    """peft's SHiRA, N(0, 1) values (far from the base model), on its random mask or `mask_fn`'s."""
    torch.manual_seed(0)
    config = PeftShira(task_type="CAUSAL_LM", r=2, random_seed=5, init_weights=False, target_modules=TARGETS,
                       mask_type="random" if mask_fn is None else "rows")
    if mask_fn is not None:
        config.mask_fn = mask_fn
    get_peft_model(_load(base), config).save_pretrained(out)
    return out


def _first_rows(base_layer: nn.Module, r: int, **kwargs) -> torch.Tensor:
    """A custom peft mask: the first r (out + in) entries in row-major order."""
    mask = torch.zeros(base_layer.weight.numel())
    mask[:r * sum(base_layer.weight.shape)] = 1
    return mask.view(base_layer.weight.shape)


def test_peft_s_adapters_load_merge_and_train_as_peft_s(tiny_llama, tmp_path):
    """peft's random mask: logits, merges (merge_and_unload too), one step's gradients. A custom mask (peft's
    mask_fn): its saved indices, with peft's logits and merge."""
    from peftkit.inspect import inspect_adapter

    adapter = _peft_adapter(tiny_llama, tmp_path / "peft")
    check_loads_and_merges_as_peft(tiny_llama, adapter, IDS, tmp_path / "merged", unloaded=True)
    # 2 layers x r 2 x (q 32 + 32, v 32 + 16, down 64 + 32) values; the indices (twice as many) are not trained
    assert inspect_adapter(adapter)["trainable_params"] == 2 * 2 * (64 + 48 + 96)
    difference, expected, grads = peft_and_our_gradients(tiny_llama, adapter, IDS)
    assert difference <= 1e-5 and set(grads) == set(expected) and len(expected) == 6
    assert max((grads[n] - expected[n]).abs().max() for n in expected) <= 1e-6
    assert min(expected[n].abs().max() for n in expected) > 1e-4

    custom = _peft_adapter(tiny_llama, tmp_path / "custom", _first_rows)
    theirs = _logits(PeftModel.from_pretrained(_load(tiny_llama), custom))
    ours, cfg = load_adapted_model(str(tiny_llama), str(custom))[:2]
    assert ours.model.layers[0].self_attn.q_proj.shira_indices[:, :3].tolist() == [[0, 0, 0], [0, 1, 2]]
    assert (_logits(ours) - theirs).abs().max() <= 1e-5 and (theirs - _logits(_load(tiny_llama))).abs().max() > 1e-2


def test_the_shipped_recipe_resumes_to_the_same_bits_and_peft_loads_its_export(tiny_llama, number_data, tmp_path):
    raw = yaml.safe_load((Path(__file__).resolve().parent.parent / "recipes" / "methods" / "shira.yaml").read_text())
    raw["model"]["name_or_path"] = str(tiny_llama)
    raw["data"] |= {"train": str(number_data["train"]), "eval": str(number_data["eval"])}
    raw["training"] |= {"max_steps": 2, "save_steps": 1, "save_total_limit": 10, "warmup_steps": 1, "eval_steps": 2,
                        "batch_size": 2, "mixed_precision": "no"}
    raw["export"] |= {"output_dir": str(tmp_path / "run"), "report": False}
    raw["eval"] = {"samples": 0}
    (recipe := tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    check_resumes_to_the_same_bits(recipe, tmp_path / "run", kill_after=1, steps=2)
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["random_seed"]) == ("SHIRA", 8, 0)
    theirs = _logits(PeftModel.from_pretrained(_load(tiny_llama), tmp_path / "run" / "adapter"))
    assert (_logits(_load(tmp_path / "run" / "merged")) - theirs).abs().max() <= 1e-5
    assert (theirs - _logits(_load(tiny_llama))).abs().max() > 1e-3


@pytest.mark.parametrize(("adapter", "message"), [
    ({"r": 0}, "'adapter.r' = 0"),
    ({"r": 16}, "adapter.r: 16 gives 16 x (16 + 32) = 768 entries, more than a layer of 16 x 32 = 512 has (peft "
                "refuses it too); use a smaller r."),
    ({"mask_type": "rows"}, "'adapter.mask_type' = 'rows'"),
    ({"target_modules": ["embed_tokens"]}, "'model.embed_tokens' is an Embedding; SHiRA adapts nn.Linear (and "
                                           "4-bit/8-bit) layers only"),
    ({"alpha": 8}, "has no 'alpha'. Valid keys for method shira: method, r, mask_type, random_seed, init_weights"),
])
def test_recipe_mistakes_are_refused(adapter, message, tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    recipe = method_recipe(tmp_path, tiny_llama, number_data, {"method": "shira", "r": 2, **adapter})
    assert message in " ".join(cli_user_error(monkeypatch, capsys, "validate", str(recipe)).split())


def test_gpt2_s_conv1d_and_another_base_s_indices_are_refused(tiny_llama, tiny_gpt2, tmp_path):
    """peft's SHiRA refuses Conv1D (TypeError); indices past a base's weight are another base's adapter."""
    from peftkit.merge import merge_adapter

    with pytest.raises(PeftkitError, match=r"'transformer.h.0.attn.c_attn' is GPT-2's Conv1D; SHiRA adapts nn.Linear"):
        inject_adapters(_load(tiny_gpt2), ShiraConfig(method="shira", r=2, target_modules=["c_attn"]))
    adapter = _peft_adapter(tiny_llama, tmp_path / "peft")
    from safetensors.torch import load_file, save_file

    weights = adapter / "adapter_model.safetensors"
    state = load_file(weights)
    state["base_model.model.model.layers.0.self_attn.q_proj.shira_indices"][0, -1] = 32  # one row past the 32
    save_file(state, weights)
    with pytest.raises(PeftkitError, match=r"shira_indices \(\(2, 128\), up to \[32, \d+\]\) do not fit a weight of "
                                           r"\(32, 32\): it was trained on a different base model"):
        merge_adapter(str(adapter), str(tmp_path / "merged"), base=str(tiny_llama))


def test_two_named_adapters_serve_each_its_rows_as_peft(tiny_llama, tmp_path):
    """Each layer of two adapters of one mask shape keeps its own indices: a custom mask beside the random one."""
    from peftkit.adapters.named import load_named_model

    paths = (_peft_adapter(tiny_llama, tmp_path / "a"), _peft_adapter(tiny_llama, tmp_path / "b", _first_rows))
    expected = [_logits(PeftModel.from_pretrained(_load(tiny_llama), path)) for path in paths]
    model, adapters = load_named_model([("a", str(paths[0])), ("b", str(paths[1]))], str(tiny_llama))[:2]
    with adapters.routed(["b", "a"]):
        mixed = _logits(model)
    assert (mixed[0] - expected[1][0]).abs().max() <= 1e-5 and (mixed[1] - expected[0][1]).abs().max() <= 1e-5
    assert (expected[0] - expected[1]).abs().max() > 1e-2
