"""Bottleneck adapters (`method: bottleneck`), beyond the conformance suite of test_methods.py: Houlsby's serial and
He et al.'s parallel formulas written out densely, the exact base model at step 0, the documented file layout,
trained norms, `peftkit eval/generate --adapter` on a trained run, and the refusals."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from safetensors.torch import load_file

from peftkit.adapters import adapter_layers, count_parameters, inject_adapters
from peftkit.adapters.state_dicts import adapter_state_dict
from peftkit.errors import PeftkitError
from peftkit.merge import merge_adapter
from peftkit.methods.bottleneck import BottleneckConfig
from peftkit.peft_format import peft_config, save_adapter
from tests.conftest import load_fp32, make_recipe, random_adapters
from tests.test_methods import IDS, models  # noqa: F401  (the fixture: tiny llama, qwen2 and gpt2)


def _cfg(**kw) -> BottleneckConfig:
    return BottleneckConfig(method="bottleneck", **kw)


@pytest.mark.parametrize("placement", ["serial", "parallel"])
def test_dense_formula(placement, models):  # noqa: F811
    """serial: y + s (W_u act(W_d y + b_d) + b_u) on the sub-layer's output y; parallel: the same of its input x,
    added to y; on the MLP and on the attention block (after o_proj) of a Llama layer, gelu, s = 2."""
    model = load_fp32(models["llama"])
    inject_adapters(model, _cfg(placement=placement, after="both", non_linearity="gelu", scaling=2.0,
                                reduction_factor=4))
    random_adapters(model, seed=1, std=0.5)
    layers = adapter_layers(model)
    x = torch.randn(2, 6, 32)
    cos, sin = model.model.rotary_emb(x, torch.arange(6)[None].expand(2, -1))
    for path, call in (("model.layers.0.mlp", lambda m: m(x)),
                       ("model.layers.1.self_attn", lambda m: m(hidden_states=x, position_embeddings=(cos, sin),
                                                                attention_mask=None)[0])):
        layer = layers[path]
        p = {n: t.detach() for n, t in layer.adapter_params().items()}
        with torch.no_grad():
            got, y = call(layer), call(layer.base_layer)
        source = y if placement == "serial" else x
        hidden = torch.nn.functional.gelu(source @ p["adapter_down.weight"].T + p["adapter_down.bias"])
        expected = y + 2.0 * (hidden @ p["adapter_up.weight"].T + p["adapter_up.bias"])
        assert p["adapter_down.weight"].shape == (8, 32)  # 32 / reduction_factor 4
        assert float((got - expected).abs().max()) <= 1e-5, path
        assert float((got - y).abs().max()) > 1e-2, path


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("cfg", [_cfg(after="both", train_norms=True), _cfg(placement="parallel", after="both")],
                         ids=["serial-norms", "parallel"])
def test_step_0_is_exactly_the_base(cfg, arch, models):  # noqa: F811
    """The up-projection starts at zero (weight and bias): the adapter adds exactly 0, bit for bit."""
    model = load_fp32(models[arch])
    with torch.no_grad():
        base = model(IDS).logits
    torch.manual_seed(0)
    inject_adapters(model, cfg)
    assert all(not p.any() for layer in adapter_layers(model).values() for n, p in layer.adapter_params().items()
               if n.startswith("adapter_up"))
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, base)


def test_saved_layout_and_trained_norms(models, tmp_path):  # noqa: F811
    """The layout the README documents: per sub-layer adapter_down/up weight and bias, per norm norm_weight (and
    norm_bias for a LayerNorm); the norms' copies train, the base norms stay frozen."""
    cfg = _cfg(after="attention", train_norms=True, reduction_factor=8)
    model = load_fp32(models["gpt2"])
    targets = inject_adapters(model, cfg)
    save_adapter(tmp_path / "a", adapter_state_dict(model, []),
                 peft_config(cfg, targets, str(models["gpt2"]), True, "gpt2"))
    shapes = {k: tuple(v.shape) for k, v in load_file(tmp_path / "a" / "adapter_model.safetensors").items()}
    expected = {}
    for i in (0, 1):
        prefix = f"base_model.model.transformer.h.{i}."
        expected |= {prefix + "attn.adapter_down.weight": (4, 32), prefix + "attn.adapter_down.bias": (4,),
                     prefix + "attn.adapter_up.weight": (32, 4), prefix + "attn.adapter_up.bias": (32,)}
        expected |= {prefix + f"{ln}.norm_{p}": (32,) for ln in ("ln_1", "ln_2") for p in ("weight", "bias")}
    expected |= {f"base_model.model.transformer.ln_f.norm_{p}": (32,) for p in ("weight", "bias")}
    assert shapes == expected
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "placement", "reduction_factor", "non_linearity", "after", "scaling",
                                   "train_norms")} == {"peft_type": "BOTTLENECK", "placement": "serial",
                                                       "reduction_factor": 8.0, "non_linearity": "relu",
                                                       "after": "attention", "scaling": 1.0, "train_norms": True}
    assert count_parameters(model)[0] == sum(math.prod(shape) for shape in shapes.values())
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    norm = adapter_layers(model)["transformer.h.0.ln_1"]
    assert norm.norm_weight.grad.abs().sum() > 0 and norm.base_layer.weight.grad is None


@pytest.mark.parametrize(("arch", "after"), [("gemma3", "both"), ("qwen3_moe", "attention"),
                                             ("qwen3_moe", "both")])
def test_norms_inside_the_attention_train_and_load(arch, after, tmp_path):
    """Gemma 3's and Qwen3's attention holds norms of its own (q_norm, k_norm): with train_norms they are trained too, saved under the attention's base_layer, and load back to the same logits (injecting crashed:
    'BottleneckLayer' object has no attribute 'q_norm')."""
    from peftkit.adapter_base import load_adapted_model
    from peftkit.tiny import build_tiny_model

    build_tiny_model(tmp_path / "base", arch=arch, hidden_size=32, num_layers=2, seed=0)
    model, cfg = load_fp32(tmp_path / "base"), _cfg(after=after, train_norms=True)
    with torch.no_grad():
        base = model(IDS).logits
    torch.manual_seed(0)
    targets = inject_adapters(model, cfg)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, base)
    random_adapters(model, seed=1, std=0.5)
    state = adapter_state_dict(model, [])
    q_norm = "base_model.model.model.layers.0.self_attn.base_layer.q_norm.norm_weight"
    assert q_norm in state and "base_model.model.model.layers.0.self_attn.adapter_down.weight" in state
    assert ("base_model.model.model.layers.0.mlp.adapter_down.weight" in state) == (after == "both")
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert adapter_layers(model)["model.layers.0.self_attn.base_layer.q_norm"].norm_weight.grad.abs().sum() > 0
    model.eval()
    save_adapter(tmp_path / "a", state, peft_config(cfg, targets, str(tmp_path / "base"), False, arch))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (the saved q_norm was taken for a target its weights do not adapt)
        loaded = load_adapted_model(str(tmp_path / "base"), str(tmp_path / "a"), torch.device("cpu"))[0]
    with torch.no_grad():
        trained = model(IDS).logits
        assert torch.equal(loaded(IDS).logits, trained) and not torch.equal(trained, base)


def _moe_by_hand(block, config, x: torch.Tensor) -> torch.Tensor:
    """A fused-expert MoE block's output written out from its parameters: the router's softmax over the experts, the
    top k renormalised (Mixtral always, Qwen3-MoE where norm_topk_prob), each chosen expert's SwiGLU
    down(silu(gate x) * up x) weighted by its probability and summed, token by token."""
    flat = x.reshape(-1, x.shape[-1])
    probs = torch.softmax(flat @ block.gate.weight.T, dim=-1)
    top, chosen = probs.topk(config.num_experts_per_tok, dim=-1)
    if config.model_type == "mixtral" or config.norm_topk_prob:
        top = top / top.sum(-1, keepdim=True)
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for weight, e in zip(top[t], chosen[t], strict=True):
            gate, up = (block.experts.gate_up_proj[e] @ flat[t]).chunk(2)
            out[t] += weight * (block.experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up))
    return out.reshape(x.shape)


@pytest.mark.parametrize("placement", ["serial", "parallel"])
@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_a_mixture_s_fused_experts_take_the_adapter_after_the_block(arch, placement, tmp_path):
    """Mixtral's and Qwen3-MoE's MLP is a block of fused expert parameters, without a Linear to read the hidden size
    from (adapter.after: ffn and both were refused): the size is the model config's, which transformers copies into
    the router and experts (hidden_dim). The adapter sits on the block's output (serial) or input (parallel), the
    block and the bottleneck computed by hand; step 0 is the base model exactly."""
    from peftkit.tiny import build_tiny_model

    build_tiny_model(tmp_path / "base", arch=arch, hidden_size=32, num_layers=2, seed=0)
    model = load_fp32(tmp_path / "base")
    with torch.no_grad():
        base = model(IDS).logits
    inject_adapters(model, _cfg(placement=placement, after="both", non_linearity="gelu", scaling=2.0,
                                reduction_factor=4))
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, base)
    random_adapters(model, seed=1, std=0.5)
    layer = adapter_layers(model)["model.layers.0.mlp"]
    p = {n: t.detach() for n, t in layer.adapter_params().items()}
    assert p["adapter_down.weight"].shape == (8, 32)  # the model's hidden size 32 / reduction_factor 4
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, y = layer(x), _moe_by_hand(layer.base_layer, model.config, x)
    source = y if placement == "serial" else x
    hidden = torch.nn.functional.gelu(source @ p["adapter_down.weight"].T + p["adapter_down.bias"])
    expected = y + 2.0 * (hidden @ p["adapter_up.weight"].T + p["adapter_up.bias"])
    assert float((got - expected).abs().max()) <= 1e-5 and float((got - y).abs().max()) > 1e-2


def test_a_sub_layer_without_a_hidden_size_is_refused_with_the_way_out():
    """A block's MLP with neither a Linear layer nor transformers' hidden_dim (a bare parameter here): the error says
    so and names the setting that leaves it out."""
    class ScaleMLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(8))

        def forward(self, x):
            return x * self.scale

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.self_attn, self.mlp = torch.nn.Linear(8, 8), ScaleMLP()

    with pytest.raises(PeftkitError) as error:
        inject_adapters(torch.nn.Sequential(Block()), _cfg(after="ffn"))
    assert str(error.value) == ("adapter.method bottleneck: cannot tell the hidden size of '0.mlp' (ScaleMLP): it "
                                "holds no Linear layer, nor a hidden_dim (transformers' copy of the model's hidden_size "
                                "in fused experts); leave that sub-layer out with adapter.after (attention or ffn).")


def test_eval_and_generate_cli_on_a_trained_run(models, number_data, tmp_path, monkeypatch):  # noqa: F811
    """`peftkit train` a parallel bottleneck, then `peftkit eval RUN_DIR` gives the run's final eval loss and
    `peftkit generate --adapter` the completions of the reloaded adapter."""
    import yaml

    from peftkit.cli import main
    from peftkit.data.prompts import load_prompts
    from peftkit.adapter_base import load_adapted_model
    from peftkit.decoding import Sampling, generate_texts
    from peftkit.recipe import DataConfig, load_recipe
    from peftkit.train import train

    adapter = {"method": "bottleneck", "placement": "parallel", "reduction_factor": 4}
    recipe = make_recipe(tmp_path, models["llama"], number_data, training={"max_steps": 4, "lr": 2e-2})
    recipe.write_text(yaml.safe_dump(yaml.safe_load(recipe.read_text()) | {"adapter": adapter}, sort_keys=False))
    summary = train(load_recipe(recipe), show_summary=False)
    assert summary["eval_loss"] < summary["base_eval_loss"]
    run = tmp_path / "run"
    monkeypatch.setattr("sys.argv", ["peftkit", "eval", str(run), "--json", str(tmp_path / "eval.json")])
    main()
    assert abs(json.loads((tmp_path / "eval.json").read_text())["loss"] - summary["eval_loss"]) <= 1e-5
    monkeypatch.setattr("sys.argv", ["peftkit", "generate", "--model", str(models["llama"]), "--adapter",
                                     str(run / "adapter"), "--data", str(number_data["eval"]), "--limit", "2",
                                     "--max-new-tokens", "6", "--json", str(tmp_path / "gen.json")])
    main()
    model, _, tok, *_ = load_adapted_model(None, str(run / "adapter"))
    prompts = load_prompts(tok, str(number_data["eval"]), "train", DataConfig(train=str(number_data["eval"])), 2)
    completions = [r["completion"] for r in json.loads((tmp_path / "gen.json").read_text())]
    assert completions == generate_texts(model, tok, prompts, Sampling(max_new_tokens=6))
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(models["llama"], dtype=torch.float32).eval()
    assert completions != generate_texts(base, tok, prompts, Sampling(max_new_tokens=6))  # the adapter is applied


def test_refusals(models, tmp_path):  # noqa: F811
    from peftkit.recipe import load_recipe

    with pytest.raises(PeftkitError, match=r"adapter.reduction_factor: 64.0? leaves no bottleneck for hidden size 32"):
        inject_adapters(load_fp32(models["llama"]), _cfg(reduction_factor=64))
    model = load_fp32(models["llama"])
    targets = inject_adapters(model, _cfg())
    save_adapter(tmp_path / "a", adapter_state_dict(model, []), peft_config(_cfg(), targets, str(models["llama"]), False))
    with pytest.raises(PeftkitError, match=r"Bottleneck adapters \(method: bottleneck\) .* cannot be merged"):
        merge_adapter(str(tmp_path / "a"), str(tmp_path / "merged"))
    (tmp_path / "r.yaml").write_text("model: {name_or_path: m}\ndata: {train: t.jsonl}\n"
                                     "export: {output_dir: o, merged: true}\nadapter: {method: bottleneck}\n")
    with pytest.raises(PeftkitError, match=r"export.merged: Bottleneck adapters .*set export.merged: false"):
        load_recipe(tmp_path / "r.yaml")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "after"}))
    with pytest.raises(PeftkitError, match='"after" is missing; a bottleneck adapter needs it'):
        load_adapted_model_from(tmp_path / "a")


def load_adapted_model_from(path):
    from peftkit.adapter_base import load_adapted_model

    return load_adapted_model(None, str(path))


def test_defaults_and_inspect(models, tmp_path):  # noqa: F811
    from peftkit.inspect import inspect_adapter

    assert (_cfg().scaling, _cfg(placement="parallel").scaling, _cfg(placement="parallel", scaling=2).scaling) == \
        (1.0, 4.0, 2.0)
    model = load_fp32(models["qwen2"])
    targets = inject_adapters(model, _cfg(after="both", reduction_factor=8))
    save_adapter(tmp_path / "a", adapter_state_dict(model, []),
                 peft_config(_cfg(after="both", reduction_factor=8), targets, str(models["qwen2"]), False))
    info = inspect_adapter(tmp_path / "a")
    assert (info["method"], info["peft_type"], info["peftkit_reads"]["ok"]) == ("bottleneck", "BOTTLENECK", True)
    assert info["targets"] == {"count": 4, "modules": {"mlp": 2, "self_attn": 2}}
    assert info["adapter_params"] == 4 * (32 * 4 + 4 + 4 * 32 + 32)
