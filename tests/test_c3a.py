"""C3A (method: c3a) against HF peft 0.21's C3A: its layer (outputs, gradients, merge, unmerge) and its starts for a
seed, peft's adapters (per-module block sizes) loaded, merged and trained with peft's numbers, the shipped recipe, and
what it refuses. The conformance battery (tests/test_methods.py) checks the rest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import C3AConfig, PeftModel, get_peft_model
from peft.tuners.c3a.layer import C3ALinear
from torch import nn

from peftkit.adapters import inject_adapters
from peftkit.adapters.state_dicts import merge_state_dict
from peftkit.errors import PeftkitError
from peftkit.methods.c3a import C3a, C3aConfig
from tests.conftest import load_fp32 as _load  # (float32, eval mode)
from tests.conftest import (check_halves_into_base_and_refuses_fusion, check_loads_and_merges_as_peft,
                            check_trained_bias_refused, cli_user_error, method_recipe, peft_and_our_gradients,
                            train_shipped_recipe)
from tests.test_methods import c3a_dense

IDS = torch.tensor([[3, 4, 5, 9, 7, 8, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47]])


def test_the_layer_computes_merges_and_unmerges_as_peft_s_and_the_dense_circulant():
    """Blocks of 4 on a 12 -> 8 Linear: outputs, input and kernel gradients equal peft's C3ALinear's and the dense
    block-circulant weight's (tests/test_methods.py's c3a_dense); merge, the state-dict merge and unmerge too."""
    torch.manual_seed(0)
    base = nn.Linear(12, 8)
    weight = base.weight.detach().clone()
    cfg = C3aConfig(method="c3a", block_size=4, init_weights="gaussian")
    ours = C3a.wrap(nn.Linear(12, 8).requires_grad_(False), cfg, "layer")
    ours.base_layer.load_state_dict(base.state_dict())
    theirs = C3ALinear(base.requires_grad_(False), "default", C3AConfig(block_size=4, init_weights="gaussian"), 4)
    with torch.no_grad():
        ours.c3a_kernel.copy_(theirs.c3a_kernel["default"])
    dense = c3a_dense(weight, None, {"c3a_kernel": ours.c3a_kernel.detach()}, cfg, "linear")[0]
    assert (dense - weight).abs().max() > 1e-2
    x, x2, x3 = (torch.randn(3, 5, 12).requires_grad_(True) for _ in range(3))
    with torch.no_grad():
        x2.copy_(x), x3.copy_(x)
    out, expected, exact = ours(x), theirs(x2), x3 @ dense.T + base.bias
    assert (out - expected).abs().max() <= 1e-6 and (out - exact).abs().max() <= 1e-5
    for y in (out, expected, exact):
        (y * torch.linspace(-1, 1, 8)).sum().backward()
    assert (ours.c3a_kernel.grad - theirs.c3a_kernel["default"].grad).abs().max() <= 1e-6
    assert (x.grad - x3.grad).abs().max() <= 1e-5 and ours.c3a_kernel.grad.abs().max() > 1e-3
    # peft's hand-written backward gives the input the gradient of the blocks' index-reversed circulant (dx_t =
    # sum_u k_u g_(u - t), where y_s = sum_u k_u x_(s + u) gives sum_u k_u g_(t - u)): wrong below the top layer.
    assert (x2.grad - x3.grad).abs().max() > 1e-2
    state = merge_state_dict({"layer.weight": weight}, {"base_model.model.layer.c3a_kernel": ours.c3a_kernel.detach()},
                             cfg)
    assert (state["layer.weight"] - dense).abs().max() <= 1e-6
    ours.merge()
    theirs.merge()
    assert (ours.base_layer.weight - theirs.base_layer.weight).abs().max() <= 1e-6
    assert (ours.base_layer.weight - dense).abs().max() <= 1e-6
    ours.unmerge()
    assert (ours.base_layer.weight - weight).abs().max() <= 1e-6


@pytest.mark.parametrize("init", ["xavier_uniform", False, "kaiming_uniform", "gaussian", True])
def test_the_same_seed_gives_peft_s_start(init, tiny_llama):
    """peft's kernels for a seed, each init (true: zeros, the base model's logits)."""
    settings = {"block_size": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], "init_weights": init,
                "block_size_pattern": {"down_proj": 16}}
    torch.manual_seed(4)
    theirs = get_peft_model(_load(tiny_llama), C3AConfig(task_type="CAUSAL_LM", **settings))
    torch.manual_seed(4)
    ours = _load(tiny_llama)
    inject_adapters(ours, C3aConfig(method="c3a", **settings))
    for path in ("model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"):
        kernel = ours.get_submodule(path).c3a_kernel
        assert torch.equal(kernel, theirs.base_model.model.get_submodule(path).c3a_kernel["default"])
        assert kernel.shape == ((2, 4, 8) if path.endswith("v_proj") else (2, 4, 16))
        assert (kernel.abs().max() == 0) == (init is True)
    if init is True:
        with torch.no_grad():
            assert torch.equal(ours(IDS).logits, _load(tiny_llama)(IDS).logits)


def _peft_adapter(base: Path, out: Path) -> Path:
    """peft's C3A with per-module block sizes, N(0, 1) kernels (far from the base model)."""
    torch.manual_seed(0)
    model = get_peft_model(_load(base), C3AConfig(task_type="CAUSAL_LM", block_size=8, init_weights="gaussian",
                                                  block_size_pattern={"down_proj": 16, "q_proj": 4},
                                                  target_modules=["q_proj", "v_proj", "down_proj"]))
    model.save_pretrained(out)
    return out


def _peft_forward_under_autograd(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """peft's BlockCircularConvolution.forward, differentiated by autograd instead of its own backward."""
    m, n, b = w.shape
    mixed = torch.einsum("...nb,mnb->...mb", torch.fft.ifft(x.reshape(*x.shape[:-1], n, b)), torch.fft.fft(w))
    return torch.fft.fft(mixed).real.reshape(*x.shape[:-1], m * b)


def test_peft_s_adapter_loads_merges_and_trains_as_peft_s(tiny_llama, tmp_path, monkeypatch):
    """peft's logits and merges (merge_and_unload too). A step's gradients: the top adapted layer's are peft's; every
    layer's are those of peft's forward differentiated by autograd, as peft's own backward gets its input's gradient
    wrong (test above), so its kernels below the top layer get other gradients."""
    import peft.tuners.c3a.layer as peft_c3a

    adapter = _peft_adapter(tiny_llama, tmp_path / "peft")
    check_loads_and_merges_as_peft(tiny_llama, adapter, IDS, tmp_path / "merged", unloaded=True)
    difference, peft_s, grads = peft_and_our_gradients(tiny_llama, adapter, IDS)
    top = "model.layers.1.mlp.down_proj.c3a_kernel"
    assert difference <= 1e-5 and set(grads) == set(peft_s) and len(peft_s) == 6
    assert (grads[top] - peft_s[top]).abs().max() <= 1e-6
    low = "model.layers.0.self_attn.q_proj.c3a_kernel"
    assert (grads[low] - peft_s[low]).abs().max() > 0.1 * grads[low].abs().max()
    monkeypatch.setattr(peft_c3a.BlockCircularConvolution, "apply", _peft_forward_under_autograd)
    expected = peft_and_our_gradients(tiny_llama, adapter, IDS)[1]
    assert max((grads[n] - expected[n]).abs().max() for n in expected) <= 1e-6
    assert min(expected[n].abs().max() for n in expected) > 1e-4


def test_the_shipped_recipe_trains_and_peft_loads_its_export(tiny_llama, number_data, tmp_path):
    summary = train_shipped_recipe("c3a", tiny_llama, number_data, tmp_path / "run", steps=3, batch_size=2)
    assert summary["eval_loss"] < summary["base_eval_loss"]
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["block_size"], config["init_weights"]) == ("C3A", 16, "xavier_uniform")
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(_load(tiny_llama), tmp_path / "run" / "adapter")(input_ids=IDS).logits
        merged = _load(tmp_path / "run" / "merged")(input_ids=IDS).logits
    assert (merged - theirs).abs().max() <= 1e-5


@pytest.mark.parametrize(("adapter", "message"), [
    ({"block_size": 0}, "'adapter.block_size' = 0"),
    ({"block_size": 12}, "adapter.block_size: 12 does not divide both sizes of 'model.layers.0.self_attn.q_proj' (32 "
                         "inputs, 32 outputs); C3A's circulant blocks must tile every target (peft refuses it too). "
                         "Use a divisor of both, at most 32 here"),
    ({"block_size": 32}, "does not divide both sizes of 'model.layers.0.self_attn.k_proj' (32 inputs, 16 outputs)"),
    ({"block_size_pattern": {"q_prj": 4}}, "adapter.block_size_pattern: 'q_prj' matches none of the 14 adapted modules"),
    ({"init_weights": "orthogonal"}, "adapter.init_weights"),
    ({"target_modules": ["embed_tokens"]}, "'model.embed_tokens' is an Embedding; C3A adapts nn.Linear (and "
                                           "4-bit/8-bit) layers only"),
    ({"r": 8}, "has no 'r'. Valid keys for method c3a: method, block_size, block_size_pattern, init_weights"),
])
def test_recipe_mistakes_are_refused(adapter, message, tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    recipe = method_recipe(tmp_path, tiny_llama, number_data, {"method": "c3a", "block_size": 8, **adapter})
    assert message in " ".join(cli_user_error(monkeypatch, capsys, "validate", str(recipe)).split())


def test_gpt2_s_conv1d_and_a_trained_bias_are_refused(tiny_llama, tiny_gpt2, tmp_path):
    """peft's C3A refuses Conv1D (TypeError) and peftkit does not train a bias: refused, naming what to do."""

    with pytest.raises(PeftkitError, match=r"'transformer.h.0.attn.c_attn' is GPT-2's Conv1D; C3A adapts nn.Linear"):
        inject_adapters(_load(tiny_gpt2), C3aConfig(method="c3a", block_size=8, target_modules=["c_attn"]))
    adapter = _peft_adapter(tiny_llama, tmp_path / "peft")
    check_trained_bias_refused(adapter, "c3a_only")


def test_combined_into_the_base_it_adds_the_updates_and_fusion_refuses_it(tiny_llama, tmp_path):
    a = str(_peft_adapter(tiny_llama, tmp_path / "a"))
    check_halves_into_base_and_refuses_fusion(tiny_llama, a, "C3A", tmp_path / "half", IDS)


def test_two_named_adapters_serve_each_its_rows_as_peft(tiny_llama, tmp_path):
    from peftkit.adapters.named import load_named_model

    expected = []
    for name in ("a", "b"):
        adapter = _peft_adapter(tiny_llama, tmp_path / name)
        if name == "b":  # other kernels
            from safetensors.torch import load_file, save_file

            state = {k: -2 * v for k, v in load_file(adapter / "adapter_model.safetensors").items()}
            save_file(state, adapter / "adapter_model.safetensors")
        expected.append(_logits_of(PeftModel.from_pretrained(_load(tiny_llama), adapter)))
    model, adapters = load_named_model([("a", str(tmp_path / "a")), ("b", str(tmp_path / "b"))], str(tiny_llama))[:2]
    with adapters.routed(["b", "a"]):
        mixed = _logits_of(model.eval())
    assert (mixed[0] - expected[1][0]).abs().max() <= 1e-5 and (mixed[1] - expected[0][1]).abs().max() <= 1e-5
    assert (expected[0] - expected[1]).abs().max() > 1e-2


def _logits_of(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits
