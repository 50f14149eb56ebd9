"""Block-diagonal LoRA (`use_bdlora`, peftkit.methods.bdlora): one factor of each target block-diagonal, saved as its
blocks stacked. Checked against peft 0.21 both ways (logits, gradients, keys and shapes), against the merged weights
(in place, `merged_model`, `peftkit merge`), and against a dense block-diagonal product; what peft refuses beside it,
and what cannot carry it, is refused saying why."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig as PeftLora
from peft import PeftModel
from peft.tuners.lora.config import BdLoraConfig
from safetensors.torch import load_file

from peftkit.adapters import inject_adapters
from peftkit.errors import PeftkitError
from peftkit.methods.bdlora import BlockDiagonal
from peftkit.methods.lora import LoraConfig
from peftkit.adapter_base import load_adapted_model
from tests.conftest import (check_loads_and_merges_as_peft, cli_user_error, load_fp32, make_recipe,
                            peft_and_our_gradients, save_peft_lora, save_random_adapter)

IDS = torch.tensor([[3, 4, 5, 9, 7, 8, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47]])
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
BLOCKS = {"target_modules_bd_a": ["o_proj", "down_proj"], "target_modules_bd_b": ["q_proj", "v_proj"], "nblocks": 2}


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _peft_adapter(base: Path, out: Path) -> Path:
    """peft's BD-LoRA, far from identity (its block-diagonal B starts at zero even with init_lora_weights=False)."""
    return save_peft_lora(base, out, PeftLora(r=4, lora_alpha=8, init_lora_weights=False, target_modules=TARGETS,
                                              use_bdlora=BdLoraConfig(**BLOCKS)))


def test_a_block_diagonal_factor_is_a_dense_block_diagonal_matrix():
    layer = BlockDiagonal(8, 6, nblocks=2, zero=False)
    x = torch.randn(3, 5, 8)
    dense = torch.block_diag(*layer.weight.detach().chunk(2, dim=0))  # (6, 8): blocks of 3 x 4
    assert dense[:3, 4:].abs().max() == 0 and dense[3:, :4].abs().max() == 0
    assert (layer(x) - x @ dense.T).abs().max() <= 1e-6


def test_peft_s_adapter_loads_with_peft_s_logits_and_merges_to_them(tiny_llama, tmp_path):
    check_loads_and_merges_as_peft(tiny_llama, _peft_adapter(tiny_llama, tmp_path / "peft"), IDS, tmp_path / "merged")


def test_peft_loads_our_export_with_its_shapes_and_our_logits(tiny_llama, tmp_path):
    cfg = LoraConfig(r=4, alpha=8, target_modules=TARGETS, use_bdlora=BLOCKS)
    ours = save_random_adapter(tiny_llama, cfg, tmp_path / "ours", seed=3)
    theirs = {k: v.shape for k, v in load_file(_peft_adapter(tiny_llama, tmp_path / "peft") /
                                                "adapter_model.safetensors").items()}
    assert {k: v.shape for k, v in load_file(ours / "adapter_model.safetensors").items()} == theirs
    assert theirs["base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"] == (4, 16)  # (r, in / 2)
    assert theirs["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] == (32, 2)  # (out, r / 2)
    ours_logits = _logits(load_adapted_model(str(tiny_llama), str(ours), torch.device("cpu"))[0])
    assert (ours_logits - _logits(PeftModel.from_pretrained(load_fp32(tiny_llama), ours).eval())).abs().max() <= 1e-5


def test_gradients_equal_peft_s(tiny_llama, tmp_path):
    adapter = _peft_adapter(tiny_llama, tmp_path / "peft")
    difference, expected, grads = peft_and_our_gradients(tiny_llama, adapter, IDS)
    assert difference <= 1e-6 and grads.keys() == expected.keys()
    assert max((grads[n] - expected[n]).abs().max() for n in grads) <= 1e-6


def test_a_run_trains_what_peft_loads(tiny_llama, number_data, tmp_path):
    from peftkit.recipe import load_recipe
    from peftkit.train import train

    recipe = make_recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 4}, export={"merged": True})
    raw = yaml.safe_load(recipe.read_text())
    raw["adapter"] |= {"target_modules": TARGETS, "use_bdlora": BLOCKS}
    recipe.write_text(yaml.safe_dump(raw))
    cfg = load_recipe(recipe)
    train(cfg)
    run = Path(cfg.export.output_dir)
    ours = _logits(load_adapted_model(str(tiny_llama), str(run / "adapter"), torch.device("cpu"))[0])
    assert (ours - _logits(PeftModel.from_pretrained(load_fp32(tiny_llama), run / "adapter").eval())).abs().max() <= 1e-5
    assert (ours - _logits(load_fp32(run / "merged"))).abs().max() <= 1e-5
    assert (ours - _logits(load_fp32(tiny_llama))).abs().max() > 1e-3


@pytest.mark.parametrize(("adapter", "message"), [
    ({"use_bdlora": BLOCKS | {"target_modules_bd_b": ["q_proj"]}},
     "target 'model.layers.0.self_attn.v_proj' matches neither target_modules_bd_a nor target_modules_bd_b"),
    ({"use_bdlora": BLOCKS | {"nblocks": 3}}, "nblocks 3 does not divide"),
    ({"use_bdlora": BLOCKS | {"target_modules_bd_b": ["q_proj", "v_proj", "o_proj"]}},
     "['o_proj'] are in both target_modules_bd_a and target_modules_bd_b"),
    ({"use_bdlora": BLOCKS, "use_dora": True}, "adapter.use_bdlora with use_dora is not supported"),
    ({"use_bdlora": BLOCKS, "init": "gaussian"}, "adapter.use_bdlora with init: gaussian is not supported (peft draws"),
    ({"use_bdlora": BLOCKS, "lora_bias": True}, "(peft drops the bias of a block-diagonal B without a word)"),
])
def test_recipe_mistakes_are_refused(adapter, message, tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    recipe = make_recipe(tmp_path, tiny_llama, number_data)
    raw = yaml.safe_load(recipe.read_text())
    raw["adapter"] |= {"target_modules": TARGETS, "r": 4} | adapter
    recipe.write_text(yaml.safe_dump(raw))
    assert message in cli_user_error(monkeypatch, capsys, "train", str(recipe))


def test_what_cannot_carry_it_refuses_it(tiny_llama, tmp_path):
    from peftkit.adapters.named import NamedAdapters
    from peftkit.inspect import inspect_adapter

    with pytest.raises(PeftkitError, match="'model.embed_tokens' is an Embedding, and BD-LoRA"):
        inject_adapters(load_fp32(tiny_llama), LoraConfig(target_modules=["embed_tokens"], use_bdlora=BLOCKS | {
            "target_modules_bd_a": ["embed_tokens"]}))
    adapter = _peft_adapter(tiny_llama, tmp_path / "peft")
    with pytest.raises(PeftkitError, match="'bd' has block-diagonal factors"):
        NamedAdapters(load_fp32(tiny_llama)).load("bd", adapter)
    info = inspect_adapter(adapter)
    assert "BD-LoRA (block-diagonal factors)" in info["variants"] and set(info["ranks"].values()) == {4}
    assert not info["llama_cpp"]["accepts"] and info["peftkit_reads"]["ok"]
    # vLLM's BD-LoRA pull request (#28136) was open; the newest PEFTHelper refuses the field (the reason sent the user
    # to 'an engine that supports BD-LoRA (not verified here)')
    assert info["vllm"]["reasons"] == [
        "use_bdlora: vLLM serves no BD-LoRA (vllm-project/vllm#28136 was open): versions that read the field refuse it "
        "('vLLM does not support block-diagonal LoRA (BD-LoRA).'), older ones misread its factors, saved as their "
        "blocks stacked (A (r, in / N), B (out, r / N)), as plain LoRA factors: merge it"]


def test_conv1d_and_quantized_targets_are_refused_where_peft_builds_no_block(tmp_path):
    """peft's BD-LoRA reads a Linear's in/out features (a Conv1D fails there) and its bitsandbytes layers build plain
    factors: such a target in the lists would make a file neither side reads as the other; refused, naming it."""
    from peftkit.tiny import build_tiny_model
    from tests.test_qlora import load_quantized

    gpt2 = tmp_path / "gpt2"
    build_tiny_model(gpt2, arch="gpt2", hidden_size=32, num_layers=2, seed=0)
    with pytest.raises(PeftkitError, match="'transformer.h.0.attn.c_attn' is a Conv1D layer, where peft builds no"):
        inject_adapters(load_fp32(gpt2), LoraConfig(r=4, target_modules=["c_attn"], use_bdlora={
            "target_modules_bd_b": ["c_attn"], "nblocks": 2}))
    llama = tmp_path / "llama64"
    build_tiny_model(llama, arch="llama", hidden_size=64, num_layers=2, seed=0)
    with pytest.raises(PeftkitError, match="'model.layers.0.self_attn.q_proj' is a 4-bit/8-bit layer"):
        inject_adapters(load_quantized(llama), LoraConfig(r=4, target_modules=["q_proj"], use_bdlora={
            "target_modules_bd_b": ["q_proj"], "nblocks": 2}))


def test_peft_s_settings_read_as_peft_reads_them(tiny_llama, tmp_path):
    """An unknown key inside use_bdlora (a newer peft's) is dropped and a null match_strict is false, as in peft."""
    import json

    adapter = _peft_adapter(tiny_llama, tmp_path / "peft")
    theirs = _logits(PeftModel.from_pretrained(load_fp32(tiny_llama), adapter).eval())
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["use_bdlora"] |= {"future_key": 1, "match_strict": None}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert (_logits(load_adapted_model(str(tiny_llama), str(adapter), torch.device("cpu"))[0]) - theirs).abs().max() \
        <= 1e-5
