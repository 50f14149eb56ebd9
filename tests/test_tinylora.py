"""TinyLoRA (peftkit.methods.tinylora) beyond the conformance battery of tests/test_methods.py: its SVD factors,
projections and v groups against peft 0.21's for each weight_tying and init, peft's adapters on GPT-2's Conv1D and
embeddings loaded, trained and merged with peft's numbers, the shipped recipe with tied v (peft loads it), combining
two adapters into the base, Gemma's scaled embedding (where peft's forward is not its own merge), and what it
refuses."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
import yaml
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from peftkit.adapters import adapter_layers, inject_adapters
from peftkit.methods.tinylora import TinyLora, TinyLoraConfig
from tests.conftest import load_fp32 as _load  # (float32, eval mode)
from tests.conftest import (check_loads_and_merges_as_peft, check_shipped_recipe_is_peft_s, check_trained_bias_refused,
                            cli_user_error, gpt2_without_dropout, method_recipe, peft_and_our_gradients)

IDS = torch.tensor([[3, 4, 5, 9, 7, 8, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47]])
TARGETS = ["embed_tokens", "q_proj", "v_proj", "down_proj"]


def _peft_adapter(base: Path, out: Path, **settings) -> Path:
    """peft's TinyLoRA with v ~ U(-1, 1) (its default v is 0, the identity), saved by peft."""
    torch.manual_seed(0)
    config = {"r": 2, "u": 4, "init_weights": "uniform", "init_v_bound": 1.0, "target_modules": TARGETS} | settings
    model = get_peft_model(_load(base), peft.TinyLoraConfig(**config))
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("weight_tying", [0.0, 0.5, 1.0])
def test_factors_projections_and_groups_are_peft_s(weight_tying, tiny_llama):
    """From one seed, peftkit's and peft's models hold the same SVD factors, projections and (uniform) v, tied in the
    same groups of consecutive layers, and give the same logits (an embedding among the targets)."""
    settings = {"r": 2, "u": 4, "weight_tying": weight_tying, "target_modules": TARGETS, "init_weights": "uniform",
                "init_v_bound": 1.0}
    torch.manual_seed(0)
    theirs = get_peft_model(_load(tiny_llama), peft.TinyLoraConfig(**settings))
    ours = _load(tiny_llama)
    torch.manual_seed(0)
    inject_adapters(ours, TinyLoraConfig(method="tinylora", **settings))
    layers = adapter_layers(ours)
    for path, layer in layers.items():
        reference = theirs.base_model.model.get_submodule(path)
        for name in ("tinylora_A", "tinylora_B", "tinylora_P"):
            assert torch.equal(getattr(layer, name), getattr(reference, name)["default"]), (path, name)
        assert torch.equal(layer.tinylora_v, reference.tinylora_v["default"][reference._tinylora_v_key["default"]])
    groups = {id(layer.tinylora_v) for layer in layers.values()}
    assert len(groups) == len(theirs.base_model.tinylora_v["default"]) == {0.0: 7, 0.5: 4, 1.0: 1}[weight_tying]
    with torch.no_grad():
        assert torch.equal(ours(IDS).logits, theirs(IDS).logits)


def test_peft_s_adapter_loads_merges_and_trains_as_peft_s(tiny_gpt2, tmp_path):
    """peft's adapter on GPT-2's Conv1D and its embeddings, v tied in groups (far from identity), gives peft's logits,
    merged in place, by `merged_model` and by `peftkit merge` (peft's merge_and_unload's logits); one training step
    gives peft's loss and the gradients of each group's v."""
    path = gpt2_without_dropout(tiny_gpt2, tmp_path / "gpt2")  # (peft's and peftkit's dropout masks differ)
    adapter = _peft_adapter(path, tmp_path / "peft", target_modules=["wte", "c_attn", "mlp.c_proj"], weight_tying=0.4)
    check_loads_and_merges_as_peft(path, adapter, IDS, tmp_path / "merged", unloaded=True)
    difference, expected, grads = peft_and_our_gradients(path, adapter, IDS)
    grads = {n: g for n, g in grads.items() if n.endswith(".tinylora_v")}  # (it sets the frozen factors trainable)
    assert difference <= 1e-6 and len(grads) == len(expected) == 3  # 5 targets, round(5 x 0.6) groups
    expected = [g for _, g in sorted(expected.items(), key=lambda kv: int(kv[0].rsplit(".", 1)[1]))]
    assert max(float((g - e).abs().max() / e.abs().max()) for g, e in zip(grads.values(), expected)) <= 1e-5


def test_the_shipped_recipe_with_tied_v_trains_and_loads_in_peft(tiny_llama, number_data, tmp_path):
    """recipes/methods/tinylora.yaml (v tied across all targets: one group) trains; its adapter holds peft's keys and
    shapes and loads in peft with the merged model's logits."""
    shapes = check_shipped_recipe_is_peft_s("tinylora", peft.TinyLoraConfig, tiny_llama, number_data, tmp_path, IDS)
    raw = yaml.safe_load((Path(__file__).resolve().parent.parent / "recipes" / "methods" / "tinylora.yaml").read_text())
    assert shapes["base_model.tinylora_v.0"] == (raw["adapter"]["u"],) and "base_model.tinylora_v.1" not in shapes
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["weight_tying"]) == ("TINYLORA", raw["adapter"]["weight_tying"])


def test_combining_is_refused_saying_why(tiny_llama, tmp_path):
    from peftkit.combine_adapters import combine_adapters
    from peftkit.combine_inputs import Combination
    from peftkit.errors import PeftkitError

    adapter = str(_peft_adapter(tiny_llama, tmp_path / "a"))
    with pytest.raises(PeftkitError, match=r"a is a TinyLoRA adapter, whose trained v each group of consecutive target "
                                           r"layers shares .* Merge it alone \(`peftkit merge --adapter` once\).$"):
        combine_adapters([adapter, adapter], Combination("linear", (0.5, 0.5)), str(tmp_path / "c"), into_base=True)


def test_gemma_s_scaled_embedding_takes_the_update_as_its_merge(tmp_path):
    """Gemma's embedding scales its lookup by sqrt(hidden). peft's TinyLoRA embedding adds its update unscaled, while
    its merge puts the update into the table that is scaled: peft's rows differ merged and unmerged. peftkit scales
    the update with the lookup: its rows are peft's merged ones, unmerged and merged alike."""
    from peftkit.tiny import build_tiny_model

    build_tiny_model(tmp_path / "gemma2", arch="gemma2", hidden_size=32, num_layers=1, seed=0)
    settings = {"r": 2, "u": 4, "target_modules": ["embed_tokens"], "init_weights": "uniform", "init_v_bound": 1.0}
    torch.manual_seed(0)
    theirs = get_peft_model(_load(tmp_path / "gemma2"), peft.TinyLoraConfig(**settings))
    ours = _load(tmp_path / "gemma2")
    torch.manual_seed(0)
    inject_adapters(ours, TinyLoraConfig(method="tinylora", **settings))
    embedding = ours.get_input_embeddings()
    assert float(embedding.base_layer.embed_scale) > 5  # sqrt(32)
    with torch.no_grad():
        unmerged, mine = theirs.get_input_embeddings()(IDS), embedding(IDS)
        merged = theirs.merge_and_unload().get_input_embeddings()(IDS)
        ours.lm_head.weight = torch.nn.Parameter(ours.lm_head.weight.clone())  # (untied: merged in place here)
        embedding.tied_to = None
        embedding.merge()
    assert (unmerged - merged).abs().max() > 1e-1  # peft's forward is not its merge
    assert (mine - merged).abs().max() <= 1e-5 * merged.abs().max()
    assert (embedding(IDS) - merged).abs().max() <= 1e-5 * merged.abs().max()


@pytest.mark.parametrize(("adapter", "message"), [
    ({"init_weights": False}, "'adapter.init_weights' = False: false leaves v uninitialised in peft (torch.empty: "
                              "whatever the memory held), no defined start; use true (v = 0, the base model) or "
                              "uniform"),
    ({"weight_tying": 1.5}, "'adapter.weight_tying' = 1.5"),
    ({"u": 0}, "'adapter.u' = 0"),
    ({"lora_dropout": 0.1}, "TinyLoRA (method: tinylora) has no 'lora_dropout'. Did you mean 'tinylora_dropout'?"),
])
def test_recipe_mistakes_are_refused(adapter, message, tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    recipe = method_recipe(tmp_path, tiny_llama, number_data, {"method": "tinylora", **adapter})
    assert message in " ".join(cli_user_error(monkeypatch, capsys, "train", str(recipe)).split())


def test_a_file_without_a_group_s_v_is_refused(tiny_llama, tmp_path):
    from safetensors.torch import save_file

    from peftkit.adapter_base import load_adapted_model
    from peftkit.errors import PeftkitError

    adapter = _peft_adapter(tiny_llama, tmp_path / "peft", weight_tying=0.5)
    state = load_file(adapter / "adapter_model.safetensors")
    del state["base_model.tinylora_v.3"]
    save_file(state, adapter / "adapter_model.safetensors")
    with pytest.raises(PeftkitError, match=r"^The adapter holds no base_model.tinylora_v.3, the v of the group of "
                                           r"'model.layers.0.mlp.down_proj' \(weight_tying 0.5 over 7 targets\): the "
                                           r"file is damaged"):
        load_adapted_model(str(tiny_llama), str(adapter), torch.device("cpu"))


def test_describe_and_count(tiny_llama):
    cfg = TinyLoraConfig(method="tinylora", u=13, weight_tying=1.0)
    model = _load(tiny_llama)
    inject_adapters(model, cfg)
    assert TinyLora.describe(cfg) == "TinyLoRA r=2 u=13"
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 13  # the paper's 13 parameters


def test_two_adapters_serve_one_mixed_batch_as_peft_s(tiny_llama, tmp_path):
    from tests.conftest import check_routed_as_peft

    adapters = [_peft_adapter(tiny_llama, tmp_path / "a", weight_tying=0.5),
                _peft_adapter(tiny_llama, tmp_path / "b", projection_seed=7, target_modules=["q_proj", "o_proj"])]
    check_routed_as_peft(tiny_llama, adapters, IDS)


def test_peft_s_bias_and_fusion_are_refused(tiny_llama, tmp_path):
    from peftkit.errors import PeftkitError
    from peftkit.methods.fusion import FusionConfig
    from peftkit.methods.fusion_sources import check_fusable, fused_adapters

    adapter = _peft_adapter(tiny_llama, tmp_path / "peft")
    with pytest.raises(PeftkitError, match=r"is a TinyLoRA adapter; AdapterFusion fuses bottleneck adapters, or"):
        check_fusable(fused_adapters(FusionConfig(method="fusion", fuse=[str(adapter), str(adapter)])), "adapter.fuse")
    check_trained_bias_refused(adapter, "all")


def test_a_file_without_target_modules_takes_them_from_its_layers_tensors(tiny_llama, tmp_path):
    """peft's config with target_modules null: the targets are read from the weights' keys, and the groups' v
    (`base_model.tinylora_v.0`, a model-level key) name no module (they were taken for a module 'base_model')."""
    from peftkit.adapter_base import load_adapted_model
    from peftkit.peft_format import read_peft_config

    adapter = _peft_adapter(tiny_llama, tmp_path / "peft", weight_tying=0.5)
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(_load(tiny_llama), adapter).eval()(IDS).logits  # (its config as saved)
    config = adapter / "adapter_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"target_modules": None}))
    assert sorted(read_peft_config(adapter)[1].target_modules) == ["down_proj", "embed_tokens", "q_proj", "v_proj"]
    with torch.no_grad():
        ours = load_adapted_model(str(tiny_llama), str(adapter), torch.device("cpu"))[0].eval()(IDS).logits
    assert (ours - theirs).abs().max() <= 1e-5


def test_a_4_bit_base_takes_the_factors_of_its_dequantized_weight_where_peft_fails(tiny_llama):
    """peft 0.21's TinyLoRA takes the SVD of a 4-bit layer's packed uint8 weight and fails (RuntimeError: its factors
    are not floating-point); peftkit's factors are the SVD of the weight the layer computes with (dequantized)."""
    from peftkit.merge_weights import dequantize_weight
    from peftkit.methods.tinylora import svd_factors
    from peftkit.modeling import load_model
    from peftkit.recipe import ModelConfig, QuantizationConfig

    def quantized():
        return load_model(ModelConfig(name_or_path=str(tiny_llama), dtype="float32"),
                          QuantizationConfig(method="nf4", compute_dtype="float32"), torch.device("cpu"))

    with pytest.raises(RuntimeError, match="Only Tensors of floating point and complex dtype can require gradients"):
        get_peft_model(quantized(), peft.TinyLoraConfig(r=2, u=4, target_modules=["q_proj"]))
    model = quantized()
    inject_adapters(model, TinyLoraConfig(method="tinylora", u=4, target_modules=["q_proj"]))
    layer = model.model.layers[0].self_attn.q_proj
    a, b = svd_factors(dequantize_weight(layer.base_layer), 2)
    assert torch.equal(layer.tinylora_A, a) and torch.equal(layer.tinylora_B, b) and a.shape == (2, 32)
