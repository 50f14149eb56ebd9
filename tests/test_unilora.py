"""Uni-LoRA (method: unilora) against HF peft 0.21.2's Uni-LoRA: from one seed, peft's theta_d, indices, scales, saved
file and generator state on Llama (Linear) and GPT-2 (Conv1D); outputs and gradients bit for bit; peft's adapter
loaded, merged and trained with peft's numbers; combining; the shipped recipe; and what it refuses. The conformance
battery (tests/test_methods.py) checks the rest."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.unilora.model import UniLoraModel
from safetensors.torch import load_file, save_file

from peftkit.adapters import adapter_layers, inject_adapters, shared_holders
from peftkit.adapters.state_dicts import adapter_state_dict
from peftkit.errors import PeftkitError
from peftkit.methods.unilora import UniLoraConfig, generate_index
from tests.conftest import load_fp32 as _load  # (float32, eval mode)
from tests.conftest import (check_halves_into_base_and_refuses_fusion, check_loads_and_merges_as_peft, cli_user_error,
                            method_recipe, peft_and_our_gradients, train_shipped_recipe)

IDS = torch.tensor([[3, 4, 5, 9, 7, 8, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47]])


def test_the_assignment_is_peft_s():
    """Balanced (each entry taken floor or ceil of D / d times) and peft's, with and without a remainder."""
    for count, length, seed in ((1000, 64, 42), (640, 64, 3), (10, 64, 0)):
        ours = generate_index(count, length, seed)
        assert torch.equal(ours, UniLoraModel.generate_index(count, length, seed))
        taken = torch.bincount(ours, minlength=length)
        assert int(taken.max()) - int(taken.min()) <= 1 and int(taken.sum()) == count


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_draws_file_outputs_and_gradients_are_peft_s(arch, tiny_llama, tiny_gpt2, tmp_path):
    """One seed: peft's theta_d, indices and scales (1 / sqrt of each entry's count over all the layers, counted here),
    the generator where peft's ends, peft's file with save_indices; theta_d moved, the forward
    and theta_d's gradient bit for bit (GPT-2's Conv1D c_attn: peft's default)."""
    base = tiny_llama if arch == "llama" else tiny_gpt2
    settings = {"r": 3, "theta_d_length": 64, "init_weights": False}
    torch.manual_seed(0)
    theirs = get_peft_model(_load(base), peft.UniLoraConfig(**settings, save_indices=True))
    after_peft = torch.get_rng_state()
    torch.manual_seed(0)
    model = _load(base)
    inject_adapters(model, UniLoraConfig(method="unilora", **settings, save_indices=True))
    assert torch.equal(torch.get_rng_state(), after_peft)
    (holder,) = shared_holders(model)
    theta, peft_theta = holder.unilora_theta_d, theirs.base_model.unilora_theta_d["default"]
    assert torch.equal(theta, peft_theta)
    layers = adapter_layers(model)
    indices = torch.cat([getattr(layer, n).flatten() for layer in layers.values()
                         for n in ("unilora_indices_A", "unilora_indices_B")])
    taken = torch.bincount(indices, minlength=64).float()
    for path, layer in layers.items():
        assert torch.equal(layer.unilora_scales_A, taken[layer.unilora_indices_A].rsqrt())
    theirs.save_pretrained(tmp_path / "peft")
    ours = adapter_state_dict(model, [])
    peft_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert ours.keys() == peft_file.keys() and len(ours) == 1 + 4 * len(layers)
    assert all(torch.equal(ours[k], peft_file[k]) for k in ours)
    # theta_d moved far from its start, then one training forward and backward on each side
    with torch.no_grad():
        theta.copy_(torch.randn(64) * 0.3)
        peft_theta.copy_(theta)
    mine, peft_s = model.eval()(input_ids=IDS).logits, theirs.eval()(input_ids=IDS).logits  # (GPT-2: no dropout)
    assert torch.equal(mine, peft_s) and (mine - _load(base)(input_ids=IDS).logits).abs().max() > 1e-2
    mine.square().mean().backward()
    peft_s.square().mean().backward()
    assert torch.equal(theta.grad, peft_theta.grad)


def test_the_default_file_holds_theta_d_alone_as_peft_s(tiny_llama, tmp_path):
    """save_indices: false (peft's default): the file holds base_model.unilora_theta_d only, peft's for one seed (the
    indices are regenerated from proj_seed on loading, on both sides: the battery loads such files both ways)."""
    settings = {"theta_d_length": 32, "proj_seed": 7, "target_modules": ["q_proj", "down_proj"]}
    torch.manual_seed(0)
    get_peft_model(_load(tiny_llama), peft.UniLoraConfig(**settings)).save_pretrained(tmp_path / "peft")
    torch.manual_seed(0)
    model = _load(tiny_llama)
    inject_adapters(model, UniLoraConfig(method="unilora", **settings))
    ours, theirs = adapter_state_dict(model, []), load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert list(ours) == list(theirs) == ["base_model.unilora_theta_d"]
    assert torch.equal(ours["base_model.unilora_theta_d"], theirs["base_model.unilora_theta_d"])


def _peft_adapter(base: Path, out: Path, **settings) -> Path:
    """peft's Uni-LoRA with theta_d ~ N(0, 1) (its default starts near the base model), saved by peft."""
    torch.manual_seed(0)
    config = {"r": 4, "theta_d_length": 128, "init_weights": False, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    model = get_peft_model(_load(base), peft.UniLoraConfig(task_type="CAUSAL_LM", **config | settings))
    model.save_pretrained(out)
    return out


def test_peft_s_adapter_loads_merges_and_trains_as_peft_s(tiny_llama, tmp_path):
    """peft's adapter with its indices saved: peft's logits in peftkit, merged in place (and back), by merged_model and
    by `peftkit merge` (merge_and_unload's weights within 1e-6), and a training step's loss and theta_d gradient."""
    adapter = _peft_adapter(tiny_llama, tmp_path / "peft", save_indices=True)
    check_loads_and_merges_as_peft(tiny_llama, adapter, IDS, tmp_path / "merged", unloaded=True)
    theirs = PeftModel.from_pretrained(_load(tiny_llama), adapter).merge_and_unload().state_dict()
    ours = _load(tmp_path / "merged").state_dict()
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours if k in theirs) <= 1e-6
    difference, expected, grads = peft_and_our_gradients(tiny_llama, adapter, IDS)
    assert difference <= 1e-6 and len(grads) == len(expected) == 1  # theta_d, once for all the layers
    (mine,), (peft_s,) = grads.values(), expected.values()
    assert float((mine - peft_s).abs().max() / peft_s.abs().max()) <= 1e-5


def test_combined_into_the_base_fusion_refused_and_inspected(tiny_llama, tmp_path):
    """With its indices saved, the adapter combined with itself at 0.5 and 0.5 gives peft's logits of it alone; without
    them combining is refused by text (its file names no layer), and AdapterFusion over Uni-LoRA too; inspect says
    what a file without them adapts."""
    from peftkit.combine_adapters import combine_adapters
    from peftkit.combine_inputs import Combination
    from peftkit.inspect import inspect_adapter
    from peftkit.inspect_text import describe

    adapter = str(_peft_adapter(tiny_llama, tmp_path / "peft", save_indices=True))
    check_halves_into_base_and_refuses_fusion(tiny_llama, adapter, "Uni-LoRA", tmp_path / "half", IDS)
    bare = str(_peft_adapter(tiny_llama, tmp_path / "bare"))
    with pytest.raises(PeftkitError, match=r"saved without its layers' indices \(save_indices: false\): its file names "
                                           "no layer for combining to read"):
        combine_adapters([bare, bare], Combination("linear", (0.5, 0.5)), str(tmp_path / "out"), into_base=True)
    # `peftkit inspect` of such a file says which layers it adapts (it said "0 modules", "every target's factors are
    # full matrices"), and counts theta_d, trained once for all of them
    lines = describe(inspect_adapter(bare))
    assert ("targets        those adapter_config.json's target_modules name on the base (down_proj, q_proj, v_proj): "
            "the file holds no per-layer tensor") in lines and not any(line.startswith("rank") for line in lines)
    assert "parameters     128 trainable (0 in the adapter layers)" in lines
    assert "targets        6 modules: down_proj x2, q_proj x2, v_proj x2" in describe(inspect_adapter(adapter))


def test_the_shipped_recipe_trains_and_peft_loads_its_export(tiny_llama, number_data, tmp_path):
    summary = train_shipped_recipe("unilora", tiny_llama, number_data, tmp_path / "run", steps=2, batch_size=2)
    assert summary["eval_loss"] < summary["base_eval_loss"]
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["theta_d_length"], config["save_indices"]) == ("UNILORA", 256, False)
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(_load(tiny_llama), tmp_path / "run" / "adapter")(input_ids=IDS).logits
        merged = _load(tmp_path / "run" / "merged")(input_ids=IDS).logits
    assert (merged - theirs).abs().max() <= 1e-5


@pytest.mark.parametrize(("adapter", "message"), [
    ({"r": 0}, "'adapter.r' = 0"),
    ({"theta_d_length": 0}, "'adapter.theta_d_length' = 0"),
    ({"unilora_dropout": 1.0}, "'adapter.unilora_dropout' = 1.0"),
    ({"target_modules": ["embed_tokens"]}, "adapter.target_modules: 'model.embed_tokens' is an embedding; Uni-LoRA (as "
                                           "peft's) adapts Linear and Conv1D layers only"),
    ({"dropout": 0.1}, "Uni-LoRA (method: unilora) has no 'dropout'. Did you mean 'unilora_dropout'?"),
])
def test_recipe_mistakes_are_refused(adapter, message, tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    recipe = method_recipe(tmp_path, tiny_llama, number_data, {"method": "unilora", **adapter})
    assert message in " ".join(cli_user_error(monkeypatch, capsys, "validate", str(recipe)).split())


def test_a_trained_bias_and_indices_past_theta_d_are_refused(tiny_llama, tmp_path):
    """peftkit does not train a bias (peft's bias 'unilora_only'); saved indices outside theta_d are refused by text
    (the forward would index past it)."""
    from peftkit.peft_format import load_adapter

    adapter = _peft_adapter(tiny_llama, tmp_path / "peft", save_indices=True)
    config = adapter / "adapter_config.json"
    original = config.read_text()
    config.write_text(json.dumps(json.loads(original) | {"bias": "unilora_only"}))
    with pytest.raises(PeftkitError, match="bias='unilora_only'; peftkit supports bias='none' only"):
        load_adapter(adapter)
    config.write_text(original)
    weights = adapter / "adapter_model.safetensors"
    state = load_file(weights)
    key = next(k for k in state if k.endswith("unilora_indices_B"))
    state[key] = state[key] + 128
    save_file(state, weights)
    with pytest.raises(PeftkitError, match=rf"{key} holds indices up to \d+, outside theta_d's 128 entries"):
        load_adapter(adapter)


def test_a_4_bit_base_gets_the_scales_peft_rounds_to_zero(tiny_llama):
    """peft 0.21.2's Uni-LoRA on a 4-bit base casts its scales to the weight's dtype, uint8: every scale is 0, the
    adapter does nothing and theta_d never trains (a peft bug). peftkit keeps them in fp32 there: the unquantized
    model's scales, and an update."""
    from peftkit.modeling import load_model
    from peftkit.recipe import ModelConfig, QuantizationConfig

    def nf4() -> torch.nn.Module:
        quant = QuantizationConfig(method="nf4", compute_dtype="float32")
        return load_model(ModelConfig(name_or_path=str(tiny_llama), dtype="float32"), quant, torch.device("cpu"))

    cfg = {"init_weights": False}
    theirs = get_peft_model(nf4(), peft.UniLoraConfig(**cfg))
    assert all(not t.any() for n, t in theirs.named_buffers() if "unilora_scales" in n)
    model, plain = nf4(), _load(tiny_llama)
    for m in (model, plain):
        inject_adapters(m, UniLoraConfig(method="unilora", **cfg))
    for layer, other in zip(adapter_layers(model).values(), adapter_layers(plain).values()):
        assert layer.unilora_scales_A.dtype == torch.float32 and torch.equal(layer.unilora_scales_A, other.unilora_scales_A)
    with torch.no_grad():  # theta_d ~ N(0, 1) against 0 (the 4-bit base's own logits)
        adapted = model(input_ids=IDS).logits
        (holder,) = shared_holders(model)
        holder.unilora_theta_d.zero_()
        assert (adapted - model(input_ids=IDS).logits).abs().max() > 1e-3
