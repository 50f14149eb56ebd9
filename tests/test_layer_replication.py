"""LoRA's `layer_replication` (the base's layers stacked again, sharing weights, each copy with its own LoRA), against
peft: peft's adapters load with peft's logits, merged and generated too, and peft loads a run's export with its logits.
On Qwen2 and Gemma 2 (whose configs list each layer's attention type) peft 0.21 fails on its own forward (it leaves
`layer_types` at the old depth); with that list set as peftkit sets it, its numbers are peftkit's."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig as PeftLora
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from conftest import cli_user_error, make_recipe
from peftkit.errors import PeftkitError
from peftkit.merge_weights import merged_model
from peftkit.adapter_base import load_adapted_model
from peftkit.recipe import load_recipe
from peftkit.tiny import build_tiny_model
from tests.conftest import load_fp32

IDS = torch.tensor([[1, 40, 41, 42, 7, 60, 61, 62]])
STACK = [[0, 2], [1, 2]]  # layers 0, 1, 1 of the 2-layer tiny models


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stack-models")
    for arch in ("llama", "qwen2", "gemma2"):
        build_tiny_model(root / arch, arch=arch, hidden_size=32, num_layers=2, seed=0)
    return {arch: root / arch for arch in ("llama", "qwen2", "gemma2")}


@torch.no_grad()
def _logits(model: torch.nn.Module) -> torch.Tensor:
    return model.eval()(IDS).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_peft_s_adapter_loads_merges_and_generates_with_peft_s_numbers(arch, models, tmp_path):
    torch.manual_seed(0)
    peft_model = get_peft_model(load_fp32(models[arch]), PeftLora(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"],
                                                             init_lora_weights=False, layer_replication=STACK)).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    config = peft_model.base_model.model.config
    if getattr(config, "layer_types", None):  # peft's own forward fails: it left the list at 2 layers
        with pytest.raises(IndexError):
            _logits(peft_model)
        config.layer_types = [config.layer_types[i] for i in (0, 1, 1)]
    expected = _logits(peft_model)
    model, cfg, *_ = load_adapted_model(str(models[arch]), str(tmp_path / "peft"), torch.device("cpu"))
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3
    assert torch.equal(_logits(model), expected)
    # The copies share the base's weights; each has its own LoRA.
    layers = model.model.layers
    assert layers[1].mlp.up_proj.weight is layers[2].mlp.up_proj.weight
    assert not torch.equal(layers[1].self_attn.q_proj.lora_B.weight, layers[2].self_attn.q_proj.lora_B.weight)
    merged_model(model, cfg, torch.float32).save_pretrained(tmp_path / "merged")
    merged = load_fp32(tmp_path / "merged")
    assert merged.config.num_hidden_layers == 3 and (_logits(merged) - expected).abs().max() <= 1e-5
    generated = model.generate(IDS, max_new_tokens=6, do_sample=False)  # with the KV cache of 3 layers
    assert torch.equal(generated, peft_model.generate(input_ids=IDS, max_new_tokens=6, do_sample=False))


def test_a_run_trains_each_copy_and_peft_loads_the_export(tiny_llama, number_data, tmp_path):
    from peftkit.train import train

    recipe = make_recipe(tmp_path, tiny_llama, number_data, export={"merged": True},
                         adapter={"target_modules": ["q_proj", "v_proj"], "layer_replication": STACK})
    summary = train(load_recipe(recipe), show_summary=False)
    assert summary["trainable_params"] == 3 * 4 * ((32 + 32) + (32 + 16))  # 3 layers x r 4 x (q: 32 -> 32, v: -> 16)
    run = tmp_path / "run"
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["layer_replication"] == STACK
    tensors = load_file(run / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.2.self_attn.q_proj.lora_B.weight" in tensors
    ours = load_adapted_model(str(tiny_llama), str(run / "adapter"))[0]
    peft_model = PeftModel.from_pretrained(load_fp32(tiny_llama), run / "adapter")
    assert (_logits(ours) - _logits(peft_model)).abs().max() <= 1e-5
    assert (_logits(load_fp32(run / "merged")) - _logits(ours)).abs().max() <= 1e-5


def test_mistakes_are_refused_saying_why(tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    recipe = make_recipe(tmp_path, tiny_llama, number_data, adapter={"layer_replication": [[0, 2], [1, 3]]})
    assert ("adapter.layer_replication: range [1, 3] reaches past the model's 2 layers"
            in cli_user_error(monkeypatch, capsys, "train", str(recipe)))
    recipe = make_recipe(tmp_path, tiny_llama, number_data, adapter={"layer_replication": [[1, 1]]})
    assert "range [1, 1] is empty" in cli_user_error(monkeypatch, capsys, "train", str(recipe))


def test_sharded_engines_named_adapters_and_combining_refuse_it(tiny_llama, number_data, tmp_path):
    from accelerate.utils import DistributedType

    from peftkit.adapters.named import load_named_model
    from peftkit.combine_inputs import read_sources
    from peftkit.distributed import check_engine

    recipe = load_recipe(make_recipe(tmp_path, tiny_llama, number_data, adapter={"layer_replication": STACK}))
    with pytest.raises(PeftkitError, match="FSDP and ZeRO-3 shard once per layer"):
        check_engine(recipe, SimpleNamespace(distributed_type=DistributedType.FSDP))
    torch.manual_seed(0)
    get_peft_model(load_fp32(tiny_llama), PeftLora(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"],
                                               layer_replication=STACK)).save_pretrained(tmp_path / "peft")
    with pytest.raises(PeftkitError, match="stacks the base's layers again"):
        load_named_model([("a", str(tmp_path / "peft"))], str(tiny_llama))
    with pytest.raises(PeftkitError, match="stacks the base's layers again"):
        read_sources([str(tmp_path / "peft")] * 2, False)


def test_init_from_with_the_ranges_in_another_order_is_a_conflict(tiny_llama, number_data, tmp_path, monkeypatch,
                                                                  capsys):
    """[[1, 2], [0, 2]] stacks layers 1, 0, 1, not the file's 0, 1, 1: the order is no detail to sort away."""
    import yaml

    torch.manual_seed(0)
    get_peft_model(load_fp32(tiny_llama), PeftLora(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"],
                                               layer_replication=STACK)).save_pretrained(tmp_path / "peft")
    recipe = make_recipe(tmp_path, tiny_llama, number_data)
    text = yaml.safe_load(recipe.read_text())
    text["adapter"] = {"init_from": str(tmp_path / "peft"), "layer_replication": [[1, 2], [0, 2]]}
    recipe.write_text(yaml.safe_dump(text))
    err = cli_user_error(monkeypatch, capsys, "train", str(recipe))
    assert "the recipe says otherwise (layer_replication: [[1, 2], [0, 2]] in the recipe" in err


def test_inspect_says_servers_do_not_stack_the_layers(tiny_llama, tmp_path):
    from peftkit.inspect import inspect_adapter

    torch.manual_seed(0)
    get_peft_model(load_fp32(tiny_llama), PeftLora(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"],
                                               layer_replication=STACK)).save_pretrained(tmp_path / "peft")
    info = inspect_adapter(tmp_path / "peft")
    assert info["layer_replication"] == STACK
    for verdict in (info["vllm"], info["llama_cpp"]):
        assert not verdict["accepts"] and any("does not stack the base's layers" in r for r in verdict["reasons"])


def test_an_in_place_merge_into_weights_copies_share_is_refused(tiny_llama, tmp_path):
    """Layers 1 and 2 of the stack share layer 1's weights: merging each one's LoRA in place added both updates into
    them (peft's own merge_and_unload does: its logits 0.22 off its unmerged model's here). It is refused, naming what to use; a
    layer of its own (0) still merges, and merged_model writes each layer's weight apart, with peft's logits."""
    from peftkit.adapters import adapter_layers

    torch.manual_seed(0)
    peft_model = get_peft_model(load_fp32(tiny_llama), PeftLora(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"],
                                                           init_lora_weights=False, layer_replication=STACK)).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    expected = _logits(peft_model)
    assert (_logits(peft_model.merge_and_unload()) - expected).abs().max() > 0.1  # peft's in-place merge
    model, cfg, *_ = load_adapted_model(str(tiny_llama), str(tmp_path / "peft"), torch.device("cpu"))
    assert (_logits(merged_model(model, cfg, torch.float32)) - expected).abs().max() <= 1e-5
    layers = adapter_layers(model)
    layers["model.layers.0.self_attn.q_proj"].merge()
    with pytest.raises(PeftkitError) as refused:
        layers["model.layers.1.self_attn.q_proj"].merge()
    assert str(refused.value) == (
        "Cannot merge in place into a layer whose weight 2 stacked layers share (layer_replication): each copy's "
        "update would change them all. Use `peftkit merge` or merged_model, which write each layer's weight on its own.")
    assert (_logits(model) - expected).abs().max() <= 1e-5


def test_an_in_place_merge_into_experts_copies_share_is_refused_too(tmp_path):
    """target_parameters' LoRA on the experts' 3-D weights (Mixtral's) folded its update in place without the check
    above: merging every layer of peft's replicated adapter added layer 1's two copies' updates into the one weight
    they share (logits ~1.9 off the unmerged model's). It is refused as a Linear's is; layer 0's experts still merge,
    and merged_model writes each layer apart, with peft's logits."""
    from peftkit.adapters import adapter_layers

    build_tiny_model(tmp_path / "mixtral", arch="mixtral", hidden_size=32, num_layers=2, seed=0)
    torch.manual_seed(0)
    peft_model = get_peft_model(load_fp32(tmp_path / "mixtral"), PeftLora(
        task_type="CAUSAL_LM", r=2, target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"],
        init_lora_weights=False, layer_replication=STACK)).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    expected = _logits(peft_model)
    model, cfg, *_ = load_adapted_model(str(tmp_path / "mixtral"), str(tmp_path / "peft"), torch.device("cpu"))
    assert (_logits(model) - expected).abs().max() <= 1e-5
    assert (_logits(merged_model(model, cfg, torch.float32)) - expected).abs().max() <= 1e-5
    layers = adapter_layers(model)
    for path in ("model.layers.0.mlp.experts", "model.layers.0.mlp.experts.base_layer"):
        layers[path].merge()
    for path in ("model.layers.1.mlp.experts", "model.layers.2.mlp.experts.base_layer"):
        with pytest.raises(PeftkitError) as refused:
            layers[path].merge()
        assert str(refused.value) == (
            "Cannot merge in place into a layer whose weight 2 stacked layers share (layer_replication): each copy's "
            "update would change them all. Use `peftkit merge` or merged_model, which write each layer's weight on "
            "its own.")
    assert (_logits(model) - expected).abs().max() <= 1e-5


def test_a_deep_copy_of_the_stacked_model_still_refuses_the_in_place_merge(tiny_llama, tmp_path):
    """copy.deepcopy of the stacked model keeps the copies' weights shared but dropped the Parameters' mark
    (`stacked_copies`: torch's Parameter.__deepcopy__ keeps no attribute), so merging each layer of the copy folded
    both copies' updates into layer 1's weight (0.22 off peft's unmerged logits). The modules holding them carry the
    mark too, which deepcopy keeps."""
    import copy

    from peftkit.adapters import adapter_layers

    torch.manual_seed(0)
    peft_model = get_peft_model(load_fp32(tiny_llama), PeftLora(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"],
                                                           init_lora_weights=False, layer_replication=STACK)).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    expected = _logits(peft_model)
    model, *_ = load_adapted_model(str(tiny_llama), str(tmp_path / "peft"), torch.device("cpu"))
    copied = copy.deepcopy(model)
    layers = adapter_layers(copied)
    assert layers["model.layers.1.self_attn.q_proj"].weight is layers["model.layers.2.self_attn.q_proj"].weight
    layers["model.layers.0.self_attn.q_proj"].merge()
    for path in ("model.layers.1.self_attn.q_proj", "model.layers.2.self_attn.q_proj"):
        with pytest.raises(PeftkitError, match="^Cannot merge in place into a layer whose weight 2 stacked layers"):
            layers[path].merge()
    assert (_logits(copied) - expected).abs().max() <= 1e-5
