"""Lily (method: lily) against HF peft 0.21.2's Lily: from one seed peft's A, B and routers, peft's sharing of A (per
stride_A layers of a kind) and B (per kind), the generator where peft's ends; outputs and gradients bit for bit; peft's
adapter loaded and trained with peft's numbers and peft re-tying ours; the shipped recipe; the batch-dependent update
and the refusals. The conformance battery (tests/test_methods.py) checks the rest."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from peft import PeftModel, get_peft_model

from peftkit.adapters import adapter_layers, inject_adapters
from peftkit.adapter_base import load_adapted_model
from peftkit.errors import PeftkitError
from peftkit.methods.lily import LilyConfig
from tests.conftest import load_fp32 as _load  # (float32, eval mode)
from tests.conftest import cli_user_error, method_recipe, peft_and_our_gradients, train_shipped_recipe

IDS = torch.tensor([[3, 4, 5, 9, 7, 8, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47]])
SETTINGS = {"r": 4, "stride_A": 2, "num_B": 3, "scaling": 1.5, "init_weights": False,
            "target_modules": ["q_proj", "v_proj", "down_proj"]}


def _shared(model: torch.nn.Module) -> list[tuple[str, int, int]]:
    """Per adapted layer (model order): its path and which distinct A and B module (by first appearance) it holds."""
    seen: dict[int, int] = {}
    rows = []
    for name, module in model.named_modules():
        if hasattr(module, "lily_router"):
            a, b = (getattr(module, n) for n in ("lily_A", "lily_B"))
            a, b = (m["default"] if isinstance(m, torch.nn.ModuleDict) else m for m in (a, b))
            rows.append((name.removeprefix("base_model.model."), seen.setdefault(id(a), len(seen)),
                         seen.setdefault(id(b), len(seen))))
    return rows


def _peft_named(model) -> dict[str, torch.Tensor]:
    return {n.replace("base_model.model.", "").replace(".default", ""): p for n, p in model.named_parameters()
            if p.requires_grad}


def test_draws_sharing_outputs_and_gradients_are_peft_s(tiny_llama):
    """One seed: peft's A, B and routers bit for bit, shared as peft shares them (q, v and down each their kind; the two
    layers one A at stride_A 2; one B per kind), the generator where peft's ends; the forward and every trained
    tensor's gradient bit for bit."""
    torch.manual_seed(0)
    theirs = get_peft_model(_load(tiny_llama), peft.LilyConfig(**SETTINGS))
    after_peft = torch.get_rng_state()
    torch.manual_seed(0)
    model = _load(tiny_llama)
    inject_adapters(model, LilyConfig(method="lily", **SETTINGS))
    assert torch.equal(torch.get_rng_state(), after_peft)
    assert _shared(model) == _shared(theirs) and len({a for _, a, _ in _shared(model)}) == 3
    ours, peft_s = {n: p for n, p in model.named_parameters() if p.requires_grad}, _peft_named(theirs)
    assert ours.keys() == peft_s.keys() and len(ours) == 3 + 3 + 6  # A per kind, B per kind, a router per layer
    assert all(torch.equal(ours[n], peft_s[n]) for n in ours)
    mine, expected = model(input_ids=IDS).logits, theirs(input_ids=IDS).logits
    assert torch.equal(mine, expected) and (mine - _load(tiny_llama)(input_ids=IDS).logits).abs().max() > 1e-2
    mine.square().mean().backward()
    expected.square().mean().backward()
    assert all(torch.equal(ours[n].grad, peft_s[n].grad) for n in ours)


def test_peft_s_adapter_loads_trains_and_peft_ties_ours(tiny_llama, tmp_path):
    """peft's adapter: peft's logits, one training step's loss and gradients (1e-6, 1e-5 relative), the sharing kept
    (as many trained numbers as peft's, and inspect's count); merging refused by text. peft loads our export of it
    tied as ours."""
    from peftkit.adapters.state_dicts import adapter_state_dict
    from peftkit.inspect import inspect_adapter
    from peftkit.merge import merge_adapter
    from peftkit.peft_format import save_adapter

    torch.manual_seed(0)
    made = get_peft_model(_load(tiny_llama), peft.LilyConfig(task_type="CAUSAL_LM", **SETTINGS))
    made.save_pretrained(tmp_path / "peft")
    model, cfg = load_adapted_model(str(tiny_llama), str(tmp_path / "peft"), torch.device("cpu"))[:2]
    with torch.no_grad():
        assert (model(input_ids=IDS).logits - made(input_ids=IDS).logits).abs().max() <= 1e-6
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trained == sum(p.numel() for p in made.parameters() if p.requires_grad)
    # peftkit inspect counts the file's repeated A and B once (it counted every copy)
    assert inspect_adapter(tmp_path / "peft")["trainable_params"] == trained
    difference, expected, grads = peft_and_our_gradients(tiny_llama, tmp_path / "peft", IDS)
    assert difference <= 1e-6 and grads.keys() == expected.keys()
    assert max(float((grads[n] - expected[n]).abs().max() / expected[n].abs().max()) for n in grads) <= 1e-5
    with pytest.raises(PeftkitError, match="each layer's router averages over every token of the batch"):
        next(iter(adapter_layers(model).values())).merge()
    with pytest.raises(PeftkitError, match="Lily adapters \\(method: lily\\) cannot be merged"):
        merge_adapter(str(tmp_path / "peft"), str(tmp_path / "merged"), base=str(tiny_llama))
    from peftkit.peft_format import peft_config

    targets = list(adapter_layers(model))
    save_adapter(tmp_path / "ours", adapter_state_dict(model, []), peft_config(cfg, targets, str(tiny_llama), False,
                                                                             "llama", model_config=model.config))
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["target_modules"] == [
        "down_proj", "q_proj", "v_proj"]
    again = PeftModel.from_pretrained(_load(tiny_llama), tmp_path / "ours")
    assert _shared(again) == _shared(model)


def test_the_update_depends_on_the_batch_as_peft_s(tiny_llama):
    """The router's mean runs over every token of the batch: a row's logits alone differ from its logits beside
    another row, in peft as here (by the same numbers)."""
    torch.manual_seed(0)
    theirs = get_peft_model(_load(tiny_llama), peft.LilyConfig(**SETTINGS))
    torch.manual_seed(0)
    model = _load(tiny_llama)
    inject_adapters(model, LilyConfig(method="lily", **SETTINGS))
    with torch.no_grad():
        alone, beside = model(input_ids=IDS[:1]).logits, model(input_ids=IDS).logits[:1]
        assert (alone - beside).abs().max() > 1e-4
        assert torch.equal(alone, theirs(input_ids=IDS[:1]).logits)


def test_the_shipped_recipe_trains_and_peft_loads_its_export(tiny_llama, number_data, tmp_path):
    summary = train_shipped_recipe("lily", tiny_llama, number_data, tmp_path / "run", steps=2, batch_size=2)
    assert summary["eval_loss"] < summary["base_eval_loss"]
    adapter = tmp_path / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["stride_A"], config["num_B"]) == ("LILY", 16, 2, 2)
    ours = load_adapted_model(str(tiny_llama), str(adapter), torch.device("cpu"))[0]
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(_load(tiny_llama), adapter)(input_ids=IDS).logits
        assert (ours(input_ids=IDS).logits - theirs).abs().max() <= 1e-5


@pytest.mark.parametrize(("adapter", "message"), [
    ({"num_B": 1}, "'adapter.num_B' = 1"),
    ({"stride_A": 0}, "'adapter.stride_A' = 0"),
    ({"target_modules": ["embed_tokens"]}, "adapter.target_modules: 'model.embed_tokens' is an Embedding; Lily adapts "
                                           "nn.Linear (and 4-bit/8-bit) layers only"),
    ({"dropout": 0.1}, "Lily (method: lily) has no 'dropout'."),
])
def test_recipe_mistakes_are_refused(adapter, message, tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    recipe = method_recipe(tmp_path, tiny_llama, number_data, {"method": "lily", **adapter})
    assert message in " ".join(cli_user_error(monkeypatch, capsys, "validate", str(recipe)).split())


def test_gpt2_s_conv1d_and_a_merged_export_are_refused(tiny_gpt2, tiny_llama, number_data, tmp_path, monkeypatch,
                                                        capsys):
    """peft's Lily has no Conv1D layer (its default c_attn for GPT-2 fails in peft); a merged export is refused."""
    with pytest.raises(PeftkitError, match="'transformer.h.0.attn.c_attn' is GPT-2's Conv1D; Lily adapts nn.Linear"):
        inject_adapters(_load(tiny_gpt2), LilyConfig(method="lily", target_modules=["c_attn"]))
    recipe = method_recipe(tmp_path, tiny_llama, number_data, {"method": "lily"}, export={"merged": True})
    assert "export.merged: Lily adapters (method: lily) cannot be merged" in " ".join(
        cli_user_error(monkeypatch, capsys, "validate", str(recipe)).split())
