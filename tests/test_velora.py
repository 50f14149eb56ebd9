"""VeLoRA (`velora_config`, peftkit.methods.velora): LoRA whose A trains from inputs compressed to one value a group.
Checked against peft 0.21: one step's loss and gradients (A's approximate, and not LoRA's exact one) for each
projection init, its adapters' logits (plain LoRA outside training) and merges, and peft loading ours; settings peft
refuses are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig as PeftLora
from peft import PeftModel
from peft.tuners.lora.config import VeloraConfig
from safetensors.torch import load_file

from peftkit.adapters import inject_adapters
from peftkit.errors import PeftkitError
from peftkit.methods.lora import LoraConfig
from peftkit.adapter_base import load_adapted_model
from tests.conftest import (check_loads_and_merges_as_peft, check_resumes_to_the_same_bits, cli_user_error, load_fp32,
                            make_recipe, peft_and_our_gradients, save_peft_lora, save_random_adapter)

IDS = torch.tensor([[3, 4, 5, 9, 7, 8, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47]])
TARGETS = ["q_proj", "down_proj"]


def _peft_adapter(base: Path, out: Path, **velora) -> Path:
    return save_peft_lora(base, out, PeftLora(r=4, lora_alpha=8, init_lora_weights=False, target_modules=TARGETS,
                                              velora_config=VeloraConfig(num_groups=5, **velora)))


@pytest.mark.parametrize("init_type", ["batch_average", "batch_average_once", "random"])
def test_a_step_s_gradients_are_peft_s(init_type, tiny_llama, tmp_path):
    """The projection (the batch's, or the file's random one) and A's gradient from the compressed inputs equal peft's
    (5 groups of 32 and 64 features: padded); that gradient is not plain LoRA's exact one."""
    adapter = _peft_adapter(tiny_llama, tmp_path / "peft", init_type=init_type)
    difference, expected, grads = peft_and_our_gradients(tiny_llama, adapter, IDS)
    assert difference <= 1e-6 and set(grads) >= set(expected)
    assert max((grads[n] - expected[n]).abs().max() for n in expected) <= 1e-6
    model = load_adapted_model(str(tiny_llama), str(adapter), torch.device("cpu"))[0].eval()  # (no dropout: LoRA's)
    a = model.get_parameter("model.layers.0.self_attn.q_proj.lora_A.weight").requires_grad_(True)
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert (a.grad - grads["model.layers.0.self_attn.q_proj.lora_A.weight"]).abs().max() > 1e-4


def test_adapters_load_and_merge_as_peft_s_both_ways(tiny_llama, tmp_path):
    check_loads_and_merges_as_peft(tiny_llama, _peft_adapter(tiny_llama, tmp_path / "peft"), IDS, tmp_path / "merged")
    cfg = LoraConfig(r=4, alpha=8, target_modules=TARGETS, velora_config={"num_groups": 5, "init_type": "random"})
    ours = save_random_adapter(tiny_llama, cfg, tmp_path / "ours", seed=3)
    saved = load_file(ours / "adapter_model.safetensors")
    assert saved["base_model.model.model.layers.0.mlp.down_proj.lora_velora_embed"].shape == (13,)  # 64 in 5 groups
    logits = load_adapted_model(str(tiny_llama), str(ours), torch.device("cpu"))[0](input_ids=IDS).logits
    assert (logits - PeftModel.from_pretrained(load_fp32(tiny_llama), ours)(input_ids=IDS).logits).abs().max() <= 1e-5


def test_a_run_trains_it(tiny_llama, number_data, tmp_path):
    from peftkit.recipe import load_recipe
    from peftkit.train import train

    recipe = make_recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 4})
    raw = yaml.safe_load(recipe.read_text())
    raw["adapter"] |= {"target_modules": TARGETS, "velora_config": {"num_groups": 8}}
    recipe.write_text(yaml.safe_dump(raw))
    cfg = load_recipe(recipe)
    train(cfg)
    adapter = Path(cfg.export.output_dir) / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["velora_config"]["num_groups"] == 8
    with torch.no_grad():
        ours = load_adapted_model(str(tiny_llama), str(adapter), torch.device("cpu"))[0](input_ids=IDS).logits
        theirs = PeftModel.from_pretrained(load_fp32(tiny_llama), adapter)(input_ids=IDS).logits
    assert (ours - theirs).abs().max() <= 1e-5


@pytest.mark.parametrize(("adapter", "message"), [
    ({"velora_config": {"num_groups": 0}}, "'adapter.velora_config.num_groups' = 0"),
    ({"velora_config": {}, "use_dora": True}, "adapter.velora_config with use_dora is not supported"),
    ({"velora_config": {"scale": 0}}, "'adapter.velora_config.scale' = 0: 0 leaves A with no gradient"),
    ({"velora_config": {"scale": -1.0}}, "'adapter.velora_config.scale' = -1.0: a negative scale turns A's gradient"),
])
def test_recipe_mistakes_are_refused(adapter, message, tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    recipe = make_recipe(tmp_path, tiny_llama, number_data)
    raw = yaml.safe_load(recipe.read_text())
    raw["adapter"] |= {"target_modules": TARGETS} | adapter
    recipe.write_text(yaml.safe_dump(raw))
    assert message in cli_user_error(monkeypatch, capsys, "train", str(recipe))


def test_an_embedding_target_is_refused(tiny_llama):
    with pytest.raises(PeftkitError, match="'model.embed_tokens' is an Embedding, and VeLoRA trains linear layers"):
        inject_adapters(load_fp32(tiny_llama), LoraConfig(target_modules=["embed_tokens"], velora_config={}))


def test_inspect_says_what_it_is(tiny_llama, tmp_path):
    from peftkit.inspect import inspect_adapter

    info = inspect_adapter(_peft_adapter(tiny_llama, tmp_path / "peft"))
    assert "VeLoRA (trained from compressed inputs)" in info["variants"] and info["peftkit_reads"]["ok"]
    assert info["targets"]["modules"] == {"down_proj": 2, "q_proj": 2} and set(info["ranks"].values()) == {4}
    assert not info["llama_cpp"]["accepts"] and "lora_velora_embed" in info["llama_cpp"]["reasons"][0]


@pytest.mark.parametrize("init_type", ["batch_average_once", "random"])
def test_a_resumed_run_gives_the_unbroken_run_s_bits(init_type, tiny_llama, number_data, tmp_path):
    """A run killed after step 2 and resumed ends with the unbroken run's adapter, bit for bit: the projection a
    checkpoint holds is kept (batch_average_once), and a random one is drawn once (the memory estimate builds the
    layers on the meta device first)."""
    recipe = make_recipe(tmp_path, tiny_llama, number_data, eval={"base_model": False},
                         adapter={"dropout": 0.1, "velora_config": {"num_groups": 5, "init_type": init_type}},
                         training={"max_steps": 6, "batch_size": 4, "save_steps": 2, "save_total_limit": 10})
    check_resumes_to_the_same_bits(recipe, tmp_path / "run", kill_after=2, steps=6)


def test_two_processes_project_on_the_whole_batch_as_one_process(tiny_llama, number_data, tmp_path):
    """2 processes x batch 2 train the adapter of 1 process x batch 4 (as LoRA, tests/test_distributed.py): each
    process holds half of the global batch, and the projection is its mean over both (batch_average_once). Each
    process projected on its own half: the adapters differed by 0.06, and each process kept its own projection,
    where a checkpoint holds the main process's (a resumed 2-process run left the unbroken one)."""
    import subprocess
    import sys

    adapter = {"dropout": 0.0, "target_modules": TARGETS,
               "velora_config": {"num_groups": 4, "init_type": "batch_average_once"}}
    from peftkit.recipe import load_recipe
    from peftkit.train import train

    recipes = {name: make_recipe(tmp_path / name, tiny_llama, number_data, adapter=adapter, eval={"base_model": False},
                                 training={"max_steps": 3, "batch_size": batch_size, "lr": 2e-2})
               for name, batch_size in (("one", 4), ("two", 2))}
    train(load_recipe(recipes["one"]))
    done = subprocess.run([sys.executable, "-m", "peftkit", "train", str(recipes["two"]), "--num-processes", "2"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    one, two = (load_file(tmp_path / name / "run" / "adapter" / "adapter_model.safetensors") for name in recipes)
    assert any("lora_velora_embed" in k for k in one)
    assert max((one[k] - two[k]).abs().max().item() for k in one) <= 1e-5
