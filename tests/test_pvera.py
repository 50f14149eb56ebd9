"""PVeRA (peftkit.methods.pvera) beyond the conformance battery of tests/test_methods.py: its layer against peft 0.21's
(Linear, GPT-2's Conv1D: the init drawn for a seed, the sampled training forward with a seeded generator, gradients,
merge, unmerge), peft's projections and first weights from the same seeds, peft's adapters loaded, trained and merged
with peft's numbers (sampling at inference too), a resumed run with seeded noise and dropout, the shipped recipe, two
adapters in one mixed batch, and what it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
import yaml
from peft import PeftModel, get_peft_model
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.pvera.layer import Linear as PeftPveraLinear
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit.adapters import adapter_layers, inject_adapters, share_tensors
from peftkit.errors import PeftkitError
from peftkit.methods.pvera import Pvera, PveraConfig
from tests.conftest import load_fp32 as _load  # (float32, eval mode)
from tests.conftest import (check_loads_and_merges_as_peft, check_resumes_to_the_same_bits, check_routed_as_peft,
                            check_trained_bias_refused, cli_user_error, gpt2_without_dropout, method_recipe,
                            peft_and_our_gradients)

IDS = torch.tensor([[3, 4, 5, 9, 7, 8, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47]])
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _peft_adapter(base, out, **settings):
    """peft's PVeRA with b = 1 and d ~ N(0, 1) (init_weights=False: its default b is 0, the identity), saved by peft."""
    torch.manual_seed(0)
    config = {"r": 4, "init_weights": False, "target_modules": TARGETS} | settings
    model = get_peft_model(_load(base), peft.PveraConfig(**config))
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("init", [True, False])
def test_the_layer_is_peft_s(kind, init):
    """One layer: from one seed, peftkit's layer draws peft's b and d for each init_weights; its training forward
    (noise from a generator seeded alike) and its gradients are peft's bit for bit, its evaluation forward (the mean)
    too; merged, peft's weight (the mean update); unmerged, the weight before."""
    cfg = PveraConfig(method="pvera", r=3, init_weights=init, generator_seed=5)
    torch.manual_seed(0)
    ours = Pvera.wrap(nn.Linear(12, 7) if kind == "linear" else Conv1D(7, 12), cfg, "layer")
    share_tensors(Pvera, cfg, [ours])
    projections = {n: BufferDict({"default": t.clone()}) for n, t in ours.shared.tensors().items()}
    torch.manual_seed(0)
    config = peft.PveraConfig(r=3, init_weights=init, generator_seed=5, fan_in_fan_out=kind == "conv1d")
    theirs = PeftPveraLinear(nn.Linear(12, 7) if kind == "linear" else Conv1D(7, 12), projections["pvera_A"],
                             projections["pvera_B"], "default", r=3, config=config)
    pairs = [(getattr(ours, n), getattr(theirs, n)["default"]) for n in ("pvera_lambda_b", "pvera_lambda_d")]
    assert all(torch.equal(mine, peft_s) for mine, peft_s in pairs)
    assert torch.equal(ours.base_layer.weight, theirs.base_layer.weight)
    with torch.no_grad():
        for mine, peft_s in pairs:
            mine.copy_(torch.randn(mine.shape))
            peft_s.copy_(mine)
    x = torch.randn(3, 5, 12)
    out_theirs, out_ours = theirs.train()(x), ours.train()(x)
    assert torch.equal(out_ours, out_theirs) and (out_ours - ours.base_layer(x)).abs().max() > 0.1
    out_theirs.square().sum().backward()
    out_ours.square().sum().backward()
    assert all(torch.equal(mine.grad, peft_s.grad) for mine, peft_s in pairs)
    assert not torch.equal(ours(x), out_ours)  # the next draw: sampled anew

    mean = theirs.eval()(x)
    assert torch.equal(ours.eval()(x), mean)
    weight = theirs.base_layer.weight.detach().clone()
    theirs.merge()
    ours.merge()
    assert (ours.base_layer.weight - theirs.base_layer.weight).abs().max() <= 1e-6 * weight.abs().max()
    assert (ours(x) - mean).abs().max() <= 1e-5
    ours.unmerge()
    assert (ours.base_layer.weight - weight).abs().max() <= 1e-6


def test_projections_and_first_weights_are_peft_s(tiny_gpt2):
    """From one seed, peft's model and peftkit's draw the same shared pair (sized for the largest target) and the same
    first b and d in every layer (init_weights=False: d drawn from torch's generator, layer after layer)."""
    targets = ["c_attn", "mlp.c_proj", "mlp.c_fc"]
    torch.manual_seed(1)
    theirs = get_peft_model(_load(tiny_gpt2), peft.PveraConfig(r=4, init_weights=False, projection_prng_key=9,
                                                               target_modules=targets, fan_in_fan_out=True))
    ours = _load(tiny_gpt2)
    torch.manual_seed(1)
    inject_adapters(ours, PveraConfig(method="pvera", r=4, init_weights=False, projection_prng_key=9,
                                      target_modules=targets))
    layers = adapter_layers(ours)
    shared = next(iter(layers.values())).shared.tensors()
    assert shared["pvera_A"].shape == (8, 128) and shared["pvera_B"].shape == (128, 4)  # (2r, max in), (max out, r)
    assert all(torch.equal(shared[n], getattr(theirs.base_model, n)["default"]) for n in ("pvera_A", "pvera_B"))
    for path, layer in layers.items():
        peft_layer = theirs.base_model.model.get_submodule(path)
        for name in ("pvera_lambda_b", "pvera_lambda_d"):
            assert torch.equal(getattr(layer, name), getattr(peft_layer, name)["default"]), (path, name)


def test_peft_s_adapter_loads_merges_and_trains_as_peft_s(tiny_gpt2, tmp_path):
    """peft's adapter on GPT-2's Conv1D (far from identity) gives peft's logits, merged in place, by `merged_model`
    and by `peftkit merge` (peft's merge_and_unload's logits); one training step, its noise drawn from the seeded
    generators, gives peft's loss and gradients."""
    path = gpt2_without_dropout(tiny_gpt2, tmp_path / "gpt2")  # (peft's and peftkit's dropout masks differ)
    adapter = _peft_adapter(path, tmp_path / "peft", target_modules=["c_attn", "mlp.c_proj"], generator_seed=2)
    check_loads_and_merges_as_peft(path, adapter, IDS, tmp_path / "merged", unloaded=True)
    difference, expected, grads = peft_and_our_gradients(path, adapter, IDS)
    assert difference <= 1e-6 and grads.keys() == expected.keys() and len(grads) == 2 * 2 * 2
    assert max(float((grads[n] - expected[n]).abs().max() / expected[n].abs().max()) for n in grads) <= 1e-5


def test_sampling_at_inference_gives_peft_s_draws(tiny_llama, tmp_path):
    """sample_at_inference with a generator seed: peftkit's evaluation samples as peft's (the same logits, which are not
    the mean's); a merge folds in the mean, as peft's."""
    from peftkit.adapter_base import load_adapted_model

    adapter = _peft_adapter(tiny_llama, tmp_path / "peft", sample_at_inference=True, generator_seed=4)
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(_load(tiny_llama), adapter).eval()
        expected, mean = theirs(IDS).logits, theirs.merge_and_unload()(IDS).logits
        model = load_adapted_model(str(tiny_llama), str(adapter), torch.device("cpu"))[0].eval()
        sampled = model(IDS).logits
        for layer in adapter_layers(model).values():
            layer.merge()
        merged = model(IDS).logits
    assert (sampled - expected).abs().max() <= 1e-5 and (expected - mean).abs().max() > 1e-2
    assert (merged - mean).abs().max() <= 1e-5


def test_the_shipped_recipe_with_seeded_noise_resumes_to_the_same_bits_and_saves_peft_s_file(tiny_llama, number_data,
                                                                                             tmp_path):
    """recipes/methods/pvera.yaml with generator_seed (each layer's noise generator: state beyond the parameters, which
    the checkpoint keeps) and dropout, killed after step 2 and resumed, gives the unbroken run's adapter bit for bit,
    with peft's keys, shapes and settings; peft loads it with the merged model's logits."""
    raw = yaml.safe_load((Path(__file__).resolve().parent.parent / "recipes" / "methods" / "pvera.yaml").read_text())
    raw["model"]["name_or_path"] = str(tiny_llama)
    raw["data"] |= {"train": str(number_data["train"]), "eval": str(number_data["eval"])}
    raw["adapter"] |= {"generator_seed": 1, "pvera_dropout": 0.1}
    raw["training"] |= {"max_steps": 4, "save_steps": 2, "save_total_limit": 10, "eval_steps": 4, "batch_size": 4,
                        "warmup_steps": 1}
    raw["export"] |= {"output_dir": str(tmp_path / "run"), "report": False}
    raw["eval"] = {"samples": 0, "base_model": False}
    (recipe := tmp_path / "pvera.yaml").write_text(yaml.safe_dump(raw))
    check_resumes_to_the_same_bits(recipe, tmp_path / "run", kill_after=2, steps=4)
    adapter = tmp_path / "run" / "adapter"
    shapes = {k: tuple(v.shape) for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    made = _peft_adapter(tiny_llama, tmp_path / "peft", r=64, target_modules="all-linear")
    assert shapes == {k: tuple(v.shape) for k, v in load_file(made / "adapter_model.safetensors").items()}
    assert shapes["base_model.pvera_A"] == (128, 64) and shapes["base_model.pvera_B"] == (64, 64)  # (2r, in), (out, r)
    assert shapes["base_model.model.model.layers.0.mlp.down_proj.pvera_lambda_d"] == (128,)  # (2r,)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["pvera_dropout"], config["generator_seed"]) == ("PVERA", 64, 0.1, 1)
    with torch.no_grad():
        merged = _load(tmp_path / "run" / "merged")(IDS).logits
        theirs = PeftModel.from_pretrained(_load(tiny_llama), adapter).eval()(IDS).logits
    assert (merged - theirs).abs().max() <= 1e-5 and (theirs - _load(tiny_llama)(IDS).logits).abs().max() > 1e-3


def test_two_adapters_serve_one_mixed_batch_as_peft_s(tiny_llama, tmp_path):
    adapters = [_peft_adapter(tiny_llama, tmp_path / "a"), _peft_adapter(tiny_llama, tmp_path / "b", d_initial=0.5,
                                                                          projection_prng_key=3)]
    check_routed_as_peft(tiny_llama, adapters, IDS)


@pytest.mark.parametrize(("adapter", "message"), [
    ({"target_modules": ["embed_tokens", "q_proj"]}, "adapter.target_modules: 'model.embed_tokens' is an embedding; "
                                                     "PVeRA (as peft's) adapts Linear and Conv1D layers only."),
    ({"dropout": 0.1}, "PVeRA (method: pvera) has no 'dropout'. Did you mean 'pvera_dropout'? Valid keys for method pvera: method, r, target_modules, "
                       "projection_prng_key, save_projection, pvera_dropout, d_initial, init_weights, "
                       "sample_at_inference, generator_seed, modules_to_save, layers_to_transform, layers_pattern, "
                       "init_from."),
    ({"pvera_dropout": 1.0}, "'adapter.pvera_dropout' = 1.0"),
])
def test_recipe_mistakes_are_refused(adapter, message, tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    recipe = method_recipe(tmp_path, tiny_llama, number_data, {"method": "pvera", "r": 4, **adapter})
    assert message in " ".join(cli_user_error(monkeypatch, capsys, "train", str(recipe)).split())


def test_peft_s_bias_is_refused_by_name(tiny_llama, tmp_path):

    adapter = _peft_adapter(tiny_llama, tmp_path / "peft")
    check_trained_bias_refused(adapter, "all")



def test_adapter_fusion_over_pvera_is_refused(tiny_llama, tmp_path):
    from peftkit.methods.fusion import FusionConfig
    from peftkit.methods.fusion_sources import check_fusable, fused_adapters

    adapter = _peft_adapter(tiny_llama, tmp_path / "peft")
    with pytest.raises(PeftkitError, match=r"is a PVeRA adapter \(its random projections are shared model-wide under "
                                           r"one name, so two cannot sit in one model\); AdapterFusion fuses"):
        check_fusable(fused_adapters(FusionConfig(method="fusion", fuse=[str(adapter), str(adapter)])), "adapter.fuse")


def test_two_adapters_combined_into_the_base_are_the_mean_of_peft_s_merges(tiny_llama, tmp_path):
    from tests.conftest import check_combined_into_base_as_peft_merges

    adapters = [_peft_adapter(tiny_llama, tmp_path / "a"), _peft_adapter(tiny_llama, tmp_path / "b", projection_prng_key=3)]
    check_combined_into_base_as_peft_merges(tiny_llama, adapters, tmp_path / "combined")
