"""Cartridge (peftkit.methods.cartridge) beyond the conformance battery of tests/test_methods.py (peft both ways,
generation against cache-free greedy decoding): its start against peft 0.21's (the same table and generator for a
seed), frozen rows that never train and a resumed run with them, peft's file layout, and what it refuses."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from peftkit.adapters import inject_adapters
from peftkit.methods.cartridge import CartridgeConfig
from peftkit.methods.virtual import virtual_tokens
from tests.conftest import load_fp32 as _load  # (float32, eval mode)
from tests.conftest import check_resumes_to_the_same_bits, cli_user_error, method_recipe

IDS = torch.tensor([[3, 4, 5, 9, 7, 8, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47]])


def test_it_starts_as_peft_s_and_peft_s_adapter_loads(tiny_llama, tmp_path):
    """From one seed, the table of peft's two tensors (frozen rows first, each N(0, 1)) and the generator after them;
    peft's adapter (two frozen rows) gives peft's logits loaded here, and ours in peft."""
    from peftkit.adapter_base import load_adapted_model

    torch.manual_seed(0)
    theirs = get_peft_model(_load(tiny_llama), peft.CartridgeConfig(num_virtual_tokens=5, num_frozen_tokens=2,
                                                                    task_type="CAUSAL_LM"))
    after_theirs = torch.randn(3)
    model = _load(tiny_llama)
    torch.manual_seed(0)
    inject_adapters(model, CartridgeConfig(method="cartridge", num_virtual_tokens=5, num_frozen_tokens=2))
    assert torch.equal(torch.randn(3), after_theirs)
    assert torch.equal(virtual_tokens(model).prompt().detach(), theirs.prompt_encoder["default"].weight.detach())
    assert [p.shape for p in model.parameters() if p.requires_grad] == [(3, 2 * 2 * 16)]  # 2 rows of 5 frozen
    theirs.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected = theirs.eval()(input_ids=IDS).logits
        loaded = load_adapted_model(None, str(tmp_path / "peft"))[0].eval()
        assert (loaded(input_ids=IDS).logits - expected).abs().max() <= 1e-5
    assert virtual_tokens(loaded).frozen.shape == (2, 64)


def test_frozen_rows_never_train_and_a_resumed_run_is_the_unbroken_one(tiny_llama, number_data, tmp_path):
    """A run (two frozen rows of four) killed after a checkpoint and resumed saves the unbroken run's file byte for
    byte, whose frozen rows are their start's and the others moved; peft loads it as a CARTRIDGE with our logits."""
    recipe = method_recipe(tmp_path, tiny_llama, number_data, {"method": "cartridge", "num_virtual_tokens": 4,
                                                                "num_frozen_tokens": 2},
                           training={"max_steps": 4, "save_steps": 2, "lr": 5e-2})
    check_resumes_to_the_same_bits(recipe, tmp_path / "run", kill_after=2, steps=4)
    adapter = tmp_path / "run" / "adapter"
    saved = load_file(adapter / "adapter_model.safetensors")["prompt_embeddings"]
    start = _load(tiny_llama)
    torch.manual_seed(0)  # (the recipe's training.seed: the table is drawn from it)
    inject_adapters(start, CartridgeConfig(method="cartridge", num_virtual_tokens=4, num_frozen_tokens=2))
    initial = virtual_tokens(start).prompt().detach()
    assert torch.equal(saved[:2], initial[:2]) and (saved[2:] - initial[2:]).abs().min() > 0
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["peft_type"], config["num_frozen_tokens"], config["token_dim"]) == ("CARTRIDGE", 2, 16)
    from peftkit.inspect import inspect_adapter
    from peftkit.inspect_text import describe

    assert ("parameters     128 trainable; 256 saved (its first num_frozen_tokens rows, frozen, are saved with the "
            "trained ones)") in describe(inspect_adapter(adapter))  # (it said: the prompt encoder's output)
    from peftkit.adapter_base import load_adapted_model

    with torch.no_grad():
        theirs = PeftModel.from_pretrained(_load(tiny_llama), adapter).eval()(input_ids=IDS).logits
        ours = load_adapted_model(None, str(adapter))[0].eval()(input_ids=IDS).logits
    assert (ours - theirs).abs().max() <= 1e-5


@pytest.mark.parametrize(("adapter", "message"), [
    ({"num_virtual_tokens": 2, "num_frozen_tokens": 3},
     "adapter: num_frozen_tokens (3) is more than num_virtual_tokens (2); freeze at most that many (peft refuses it too)"),
    ({"num_virtual_tokens": 2, "num_frozen_tokens": 2},
     "adapter.num_frozen_tokens: all 2 virtual tokens are frozen, so nothing would train; freeze fewer (peft's default "
     "1), or give more num_virtual_tokens."),
    ({"modules_to_save": ["lm_head"]}, "the prompt family trains its virtual tokens"),
])
def test_recipe_mistakes_are_refused(adapter, message, tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    recipe = method_recipe(tmp_path, tiny_llama, number_data, {"method": "cartridge", **adapter})
    assert message in " ".join(cli_user_error(monkeypatch, capsys, "validate", str(recipe)).split())
