"""GLoRA (method: glora) against HF peft 0.21's GLoRA: its layer under each kind of path, with and without a bias (the
draws for a seed, outputs, gradients, merge, unmerge: peft's divides, and fails where 1 + A is 0), peft's adapters
loaded, merged, trained and written again with peft's numbers, keys and shapes, the shipped recipe, and what it
refuses. The conformance battery (tests/test_methods.py) checks the rest."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.glora.layer import GloraLinear as PeftGloraLinear
from safetensors.torch import load_file
from torch import nn

from peftkit.adapters import inject_adapters
from peftkit.errors import PeftkitError
from peftkit.methods.glora import Glora, GloraConfig
from tests.conftest import load_fp32 as _load  # (float32, eval mode)
from tests.conftest import (check_loads_and_merges_as_peft, cli_user_error, method_recipe, peft_and_our_gradients,
                            train_shipped_recipe)

IDS = torch.tensor([[3, 4, 5, 9, 7, 8, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47]])
SETTINGS = [("lora", "lora", "constant"), ("vector", "vector", "vector"), ("constant", "none", "none"),
            ("none", "lora", "vector")]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _pair(settings: tuple[str, str, str], bias: bool, init: bool) -> tuple[nn.Module, nn.Module]:
    """peft's layer and peftkit's on equal base layers, each built from the same seed."""
    layers = []
    for _ in range(2):
        torch.manual_seed(0)
        layers.append(nn.Linear(12, 9, bias=bias))
    keys = dict(zip(("config_A_B", "config_C", "config_D_E"), settings))
    torch.manual_seed(1)
    theirs = PeftGloraLinear(layers[0], "default", config=peft.GloraConfig(r=3, init_weights=init, **keys))
    torch.manual_seed(1)
    return theirs, Glora.wrap(layers[1], GloraConfig(method="glora", r=3, init_weights=init, **keys), "layer")


@pytest.mark.parametrize("settings", SETTINGS, ids="-".join)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("init", [True, False])
def test_the_layer_is_peft_s(settings, bias, init):
    """From one seed, peftkit's layer draws peft's tensors (and holds peft's zeros, under peft's names); on moved
    tensors its output and gradients are peft's (the same sum, rounded otherwise), its merge is peft's weight and bias,
    and its unmerge gives back the weight and bias it kept, bit for bit."""
    theirs, ours = _pair(settings, bias, init)
    peft_s = {k.replace(".default", ""): v for k, v in theirs.state_dict().items() if k.startswith("glora_")}
    mine = ours.adapter_params()
    assert peft_s.keys() == mine.keys() and all(torch.equal(mine[k], peft_s[k]) for k in mine)
    trained = {k.replace(".default", ""): p for k, p in theirs.named_parameters() if k.startswith("glora_")}
    with torch.no_grad():
        for k, p in trained.items():
            mine[k].add_(torch.randn(p.shape) * 0.2)
            p.copy_(mine[k])
    x = torch.randn(3, 5, 12)
    out_theirs, out_ours = theirs(x), ours(x)
    assert (out_ours - out_theirs).abs().max() <= 1e-6 * out_theirs.abs().max()
    assert (out_ours - ours.base_layer(x)).abs().max() > 0.05 or not trained
    if trained:
        out_theirs.square().sum().backward()
        out_ours.square().sum().backward()
        assert max(float((mine[k].grad - p.grad).abs().max() / p.grad.abs().max()) for k, p in trained.items()) <= 1e-5

    weight, base_bias = ours.base_layer.weight.detach().clone(), None if not bias else ours.base_layer.bias.detach().clone()
    with torch.no_grad():
        theirs.merge()
        ours.merge()
        assert torch.equal(ours.base_layer.weight, theirs.base_layer.weight)
        assert not bias or torch.equal(ours.base_layer.bias, theirs.base_layer.bias)
        assert (ours(x) - out_theirs).abs().max() <= 1e-5
        ours.unmerge()
    assert torch.equal(ours.base_layer.weight, weight) and (not bias or torch.equal(ours.base_layer.bias, base_bias))


def test_peft_s_unmerge_divides_by_1_plus_a_and_fails_where_it_is_0():
    """peft unmerges by (W' - B) / (1 + A): a constant A of -1 (W' = B: the merge forgot W) gives it inf and NaN
    weights, where peftkit puts back the weight it kept before the merge."""
    theirs, ours = _pair(("constant", "none", "none"), True, False)
    weight = ours.base_layer.weight.detach().clone()
    with torch.no_grad():
        for layer, a in ((theirs, theirs.glora_A["default"].X), (ours, ours.glora_A.X)):
            a.fill_(-1.0)
            layer.merge()
            layer.unmerge()
    assert not torch.isfinite(theirs.base_layer.weight).all()
    assert torch.equal(ours.base_layer.weight, weight)


def test_peft_s_adapter_loads_merges_trains_and_is_written_again_as_peft_s(tmp_path):
    """peft's adapter of vectors on a Qwen2 (q and v biased: C, D and E there; o without: zeros): peft's logits,
    merged in place, by merged_model and by `peftkit merge` (peft's merge_and_unload's logits), one training step's
    loss and gradients, and exported again the same file, keys, shapes and tensors."""
    from peftkit.adapter_base import load_adapted_model
    from peftkit.adapters.state_dicts import adapter_state_dict
    from peftkit.peft_format import peft_config, save_adapter
    from peftkit.tiny import build_tiny_model

    build_tiny_model(qwen2 := tmp_path / "qwen2", arch="qwen2", hidden_size=32, num_layers=2, seed=0)
    torch.manual_seed(0)
    made = get_peft_model(_load(qwen2), peft.GloraConfig(config_A_B="vector", config_C="vector", config_D_E="vector",
                                                         init_weights=False, target_modules=["q_proj", "v_proj",
                                                                                             "o_proj"]))
    made.save_pretrained(adapter := tmp_path / "peft")
    check_loads_and_merges_as_peft(qwen2, adapter, IDS, tmp_path / "merged", unloaded=True)
    difference, expected, grads = peft_and_our_gradients(qwen2, adapter, IDS)
    assert difference <= 1e-6 and grads.keys() == expected.keys() and len(grads) == 2 * (2 * 5 + 2)
    assert max(float((grads[n] - expected[n]).abs().max() / expected[n].abs().max()) for n in grads) <= 1e-5

    model, cfg, *_ = load_adapted_model(str(qwen2), str(adapter))
    targets = sorted(n.removesuffix(".glora_A") for n, _ in model.named_modules() if n.endswith(".glora_A"))
    save_adapter(tmp_path / "again", adapter_state_dict(model, []), peft_config(cfg, targets, str(qwen2), False, "qwen2"))
    theirs, ours = (load_file(d / "adapter_model.safetensors") for d in (adapter, tmp_path / "again"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert theirs["base_model.model.model.layers.0.self_attn.o_proj.glora_C.zeros"].shape == (32, 1)
    assert theirs["base_model.model.model.layers.0.self_attn.q_proj.glora_C.X"].shape == (32, 1)


def test_the_shipped_recipe_trains_and_saves_peft_s_file(tiny_llama, number_data, tmp_path):
    """recipes/methods/glora.yaml: the loss falls, the file holds peft's keys and shapes (a Llama has no biases: C, D
    and E are zeros there, saved as peft saves them) and peft loads it with the merged model's logits."""
    from peftkit.inspect import inspect_adapter

    summary = train_shipped_recipe("glora", tiny_llama, number_data, tmp_path / "run", steps=2)
    assert summary["eval_loss"] < summary["base_eval_loss"]
    adapter = tmp_path / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["config_C"], config["bias"]) == ("GLORA", 8, "lora", "none")
    get_peft_model(_load(tiny_llama), peft.GloraConfig(r=8, target_modules=LLAMA_TARGETS)).save_pretrained(
        tmp_path / "peft")
    shapes = [{k: tuple(v.shape) for k, v in load_file(d / "adapter_model.safetensors").items()}
              for d in (adapter, tmp_path / "peft")]
    assert shapes[0] == shapes[1] and shapes[0]["base_model.model.model.layers.0.mlp.down_proj.glora_D.zeros"] == (32,)
    info = inspect_adapter(adapter)  # A's and B's Xd, Xu: 2 x 8 x (in + out) a layer; not the zeros
    assert info["trainable_params"] == 2 * 2 * 8 * (64 + 48 + 48 + 64 + 3 * 96) and set(info["ranks"].values()) == {8}
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(_load(tiny_llama), adapter)(IDS).logits
        assert (_load(tmp_path / "run" / "merged")(IDS).logits - theirs).abs().max() <= 1e-5


@pytest.mark.parametrize(("adapter", "message"), [
    ({"config_A_B": "none"}, "adapter.config_A_B: none leaves nothing to train: none of the 14 target modules has a "
                             "bias, and C, D and E are zeros on a layer without one. Set config_A_B to lora, vector or "
                             "constant, or target layers with a bias."),
    ({"config_D_E": "lora"}, "'adapter.config_D_E' = 'lora'"),
    ({"config_C": "constant"}, "'adapter.config_C' = 'constant'"),
    ({"target_modules": ["embed_tokens"]}, "'model.embed_tokens' is an Embedding; GLoRA adapts nn.Linear (and "
                                           "4-bit/8-bit) layers only"),
])
def test_recipe_mistakes_are_refused(adapter, message, tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    recipe = method_recipe(tmp_path, tiny_llama, number_data, {"method": "glora", "r": 2, **adapter})
    assert message in " ".join(cli_user_error(monkeypatch, capsys, "validate", str(recipe)).split())


def test_gpt2_s_conv1d_and_a_trained_bias_are_refused(tiny_llama, tiny_gpt2, tmp_path):
    """peft's GLoRA refuses GPT-2's Conv1D (a plain nn.Linear only); its bias 'all' or 'glora_only' trains the base's
    biases, which peftkit does not: refused by text, never loaded without them."""
    from peftkit.adapter_base import load_adapted_model

    with pytest.raises(PeftkitError, match=r"'transformer.h.0.attn.c_attn' is GPT-2's Conv1D; GLoRA adapts nn.Linear"):
        inject_adapters(_load(tiny_gpt2), GloraConfig(method="glora", r=2, target_modules=["c_attn"]))
    get_peft_model(_load(tiny_llama), peft.GloraConfig(r=2, target_modules=["q_proj"], bias="all")).save_pretrained(
        tmp_path / "peft")
    with pytest.raises(PeftkitError, match=r"adapter_config.json: bias='all'; peftkit supports bias='none' only."):
        load_adapted_model(str(tiny_llama), str(tmp_path / "peft"))
