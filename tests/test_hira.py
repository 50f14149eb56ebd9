"""HiRA (peftkit.methods.hira) beyond the conformance battery of tests/test_methods.py: its layers against peft 0.21's
(Linear, GPT-2's Conv1D, embedding: the init drawn for a seed, forward, gradients, merge, unmerge), peft's adapters
loaded, trained and merged with peft's numbers, a resumed run with dropout, the shipped recipe, Gemma's scaled
embedding (where peft's forward is not its own merge), and what it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
import yaml
from peft import PeftModel, get_peft_model
from peft.tuners.hira.layer import Embedding as PeftHiraEmbedding
from peft.tuners.hira.layer import Linear as PeftHiraLinear
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit.errors import PeftkitError
from peftkit.methods.hira import Hira, HiraConfig
from tests.conftest import load_fp32 as _load  # (float32, eval mode)
from tests.conftest import (check_loads_and_merges_as_peft, check_resumes_to_the_same_bits, cli_user_error,
                            gpt2_without_dropout, make_recipe, method_recipe, peft_and_our_gradients,
                            train_shipped_recipe)

IDS = torch.tensor([[3, 4, 5, 9, 7, 8, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47]])
TARGETS = ["q_proj", "v_proj", "down_proj"]
LAYERS = {"linear": lambda: nn.Linear(12, 7), "conv1d": lambda: Conv1D(7, 12), "embedding": lambda: nn.Embedding(20, 7)}


def _peft_adapter(base: Path, out: Path, **settings) -> Path:
    """peft's HiRA with A and B drawn (init_weights=False: its default B is 0, the identity), saved by peft."""
    torch.manual_seed(0)
    config = {"r": 4, "init_weights": False, "target_modules": TARGETS} | settings
    model = get_peft_model(_load(base), peft.HiraConfig(**config))
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("init", [True, "gaussian", False])
def test_the_layer_is_peft_s(kind, init):
    """One layer: from one seed, peftkit's layer draws peft's A and B for each init_weights; on random A and B its
    output and gradients are peft's bit for bit; merged, peft's weight; unmerged, the weight before (kept, as peft)."""
    torch.manual_seed(0)
    peft_layer = PeftHiraEmbedding if kind == "embedding" else PeftHiraLinear
    theirs = peft_layer(LAYERS[kind](), "default", config=peft.HiraConfig(r=3, init_weights=init), r=3,
                        fan_in_fan_out=kind == "conv1d")
    torch.manual_seed(0)
    ours = Hira.wrap(LAYERS[kind](), HiraConfig(method="hira", r=3, init_weights=init), "layer")
    names = [f"hira_{'embedding_' if kind == 'embedding' else ''}{n}" for n in "AB"]
    pairs = [(getattr(ours, n), getattr(theirs, n)["default"]) for n in names]
    assert all(torch.equal(mine, peft_s) for mine, peft_s in pairs)
    assert torch.equal(ours.base_layer.weight, theirs.base_layer.weight)
    with torch.no_grad():
        for mine, peft_s in pairs:
            mine.copy_(torch.randn(mine.shape))
            peft_s.copy_(mine)
    x = torch.randint(0, 20, (3, 5)) if kind == "embedding" else torch.randn(3, 5, 12)
    out_theirs, out_ours = theirs(x), ours(x)
    assert torch.equal(out_ours, out_theirs) and (out_ours - ours.base_layer(x)).abs().max() > 0.1
    out_theirs.square().sum().backward()
    out_ours.square().sum().backward()
    assert all(torch.equal(mine.grad, peft_s.grad) for mine, peft_s in pairs)

    weight = theirs.base_layer.weight.detach().clone()
    theirs.merge()
    ours.merge()
    assert (ours.base_layer.weight - theirs.base_layer.weight).abs().max() <= 1e-6 * weight.abs().max()
    assert (ours(x) - out_theirs).abs().max() <= 1e-5
    theirs.unmerge()
    ours.unmerge()
    assert torch.equal(ours.base_layer.weight, weight)


def test_peft_s_adapter_loads_merges_and_trains_as_peft_s(tiny_gpt2, tmp_path):
    """peft's adapter on GPT-2's Conv1D (far from identity; the battery loads and merges peft's on Llama too, and the
    layer test above checks gradients of Linear and embeddings) gives peft's logits, merged in place,
    by `merged_model` and by `peftkit merge` (whose weights are peft's merge_and_unload's), and one training step's
    loss and gradients are peft's."""
    path = gpt2_without_dropout(tiny_gpt2, tmp_path / "gpt2")  # (peft's and peftkit's dropout masks differ)
    targets = ["c_attn", "mlp.c_proj"]
    adapter = _peft_adapter(path, tmp_path / "peft", target_modules=targets)
    check_loads_and_merges_as_peft(path, adapter, IDS, tmp_path / "merged")
    theirs = PeftModel.from_pretrained(_load(path), adapter).merge_and_unload().state_dict()
    ours = _load(tmp_path / "merged").state_dict()
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours if k in theirs) <= 1e-6

    difference, expected, grads = peft_and_our_gradients(path, adapter, IDS)
    assert difference <= 1e-6 and grads.keys() == expected.keys() and len(grads) == 4 * len(targets)
    assert max(float((grads[n] - expected[n]).abs().max() / expected[n].abs().max()) for n in grads) <= 1e-5


def test_gemma_s_scaled_embedding_takes_the_update_as_its_merge(tmp_path):
    """Gemma's embedding scales its lookup by sqrt(hidden) in forward. peft's HiRA embedding adds its update unscaled,
    while its own merge puts the update in the table that is scaled: peft's layer gives other rows merged than unmerged.
    peftkit scales the update with the lookup: its rows are peft's merged ones, unmerged and merged alike."""
    from peftkit.tiny import build_tiny_model

    build_tiny_model(tmp_path / "gemma2", arch="gemma2", hidden_size=32, num_layers=2, seed=0)
    embedding = _load(tmp_path / "gemma2").get_input_embeddings()
    assert float(embedding.embed_scale) > 5  # sqrt(32)
    torch.manual_seed(0)
    theirs = PeftHiraEmbedding(embedding, "default", config=peft.HiraConfig(r=3, init_weights=False), r=3)
    ours = Hira.wrap(_load(tmp_path / "gemma2").get_input_embeddings(), HiraConfig(method="hira", r=3), "embed_tokens")
    with torch.no_grad():
        ours.hira_embedding_A.copy_(theirs.hira_embedding_A["default"])
        ours.hira_embedding_B.copy_(theirs.hira_embedding_B["default"])
        unmerged, mine = theirs(IDS), ours(IDS)
        theirs.merge()
        merged = theirs(IDS)
        ours.merge()
    assert (unmerged - merged).abs().max() > 1e-1  # peft's forward is not its merge
    assert (mine - merged).abs().max() <= 1e-5 * merged.abs().max() and torch.equal(ours.base_layer.weight,
                                                                                   theirs.base_layer.weight)


def test_a_run_with_dropout_resumes_to_the_same_bits_and_saves_peft_s_file(tiny_llama, number_data, tmp_path):
    """A recipe run (dropout: random per step; an embedding target too) killed after step 2 and resumed gives the
    unbroken run's adapter, bit for bit, and saves peft's keys, shapes and settings; peft loads it with peftkit's
    logits."""
    from peftkit.adapter_base import load_adapted_model

    recipe = make_recipe(tmp_path, tiny_llama, number_data, eval={"base_model": False},
                         training={"max_steps": 6, "save_steps": 2, "save_total_limit": 10})
    raw = yaml.safe_load(recipe.read_text())
    raw["adapter"] = {"method": "hira", "r": 4, "hira_dropout": 0.25, "target_modules": TARGETS + ["embed_tokens"]}
    recipe.write_text(yaml.safe_dump(raw))
    check_resumes_to_the_same_bits(recipe, tmp_path / "run", kill_after=2, steps=6)
    adapter = tmp_path / "run" / "adapter"
    shapes = {k: tuple(v.shape) for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    made = _peft_adapter(tiny_llama, tmp_path / "peft", target_modules=TARGETS + ["embed_tokens"])
    theirs = {k: tuple(v.shape) for k, v in load_file(made / "adapter_model.safetensors").items()}
    # (peft also saves a copy of the embeddings' base weights, save_embedding_layers: none needed to load either file)
    assert shapes == {k: v for k, v in theirs.items() if not k.endswith("embed_tokens.base_layer.weight")}
    assert shapes["base_model.model.model.layers.0.mlp.down_proj.hira_A"] == (4, 64)  # (r, in_features)
    assert shapes["base_model.model.model.embed_tokens.hira_embedding_B"] == (32, 4)  # (dim, r)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["hira_dropout"], config["init_weights"]) == ("HIRA", 4, 0.25, True)
    with torch.no_grad():
        ours = load_adapted_model(str(tiny_llama), str(adapter), torch.device("cpu"))[0].eval()(IDS).logits
        theirs = PeftModel.from_pretrained(_load(tiny_llama), adapter).eval()(IDS).logits
    assert (ours - theirs).abs().max() <= 1e-5 and (theirs - _load(tiny_llama)(IDS).logits).abs().max() > 1e-3


def test_the_shipped_recipe_trains(tiny_llama, number_data, tmp_path):
    summary = train_shipped_recipe("hira", tiny_llama, number_data, tmp_path / "run")
    assert summary["eval_loss"] < summary["base_eval_loss"]
    assert (tmp_path / "run" / "merged").is_dir()


@pytest.mark.parametrize(("adapter", "message"), [
    ({"rank_pattern": {"q_proj": 2}}, "adapter.rank_pattern: peft 0.21's HiRA ignores it (its layers are built with r "
                                      "whatever the pattern says), so peft could not load an adapter with other ranks; "
                                      "remove rank_pattern, or give every layer the same r."),
    ({"init_weights": "orthogonal"}, "'adapter.init_weights' = 'orthogonal'"),
    ({"hira_dropout": 1.0}, "'adapter.hira_dropout' = 1.0"),
])
def test_recipe_mistakes_are_refused(adapter, message, tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    recipe = method_recipe(tmp_path, tiny_llama, number_data, {"method": "hira", **adapter})
    assert message in " ".join(cli_user_error(monkeypatch, capsys, "train", str(recipe)).split())


def test_peft_s_rank_pattern_is_not_applied_by_peft_and_loads_as_peft_s(tiny_llama, tmp_path):
    """peft 0.21's HiRA passes rank_pattern's rank to a dispatcher that reads config.r instead, so every layer gets r
    and the file saves the pattern beside weights of rank r: peftkit loads it as peft does (r everywhere, peft's
    logits), with a warning that the pattern is not applied (a recipe's rank_pattern is refused above)."""
    from peftkit.adapter_base import load_adapted_model
    from peftkit.errors import PeftkitWarning

    adapter = _peft_adapter(tiny_llama, tmp_path / "peft", rank_pattern={"down_proj": 2})
    assert json.loads((adapter / "adapter_config.json").read_text())["rank_pattern"] == {"down_proj": 2}
    assert load_file(adapter / "adapter_model.safetensors")[
        "base_model.model.model.layers.0.mlp.down_proj.hira_A"].shape == (4, 64)  # peft's r, not the pattern's 2
    with pytest.warns(PeftkitWarning, match=r"rank_pattern \{'down_proj': 2\} is not applied: peft 0.21's HiRA"):
        ours = load_adapted_model(str(tiny_llama), str(adapter), torch.device("cpu"))[0].eval()
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(_load(tiny_llama), adapter)(IDS).logits
        assert (ours(IDS).logits - theirs).abs().max() <= 1e-5


def test_adapter_fusion_over_hira_is_refused(tiny_llama, tmp_path):
    from peftkit.methods.fusion import FusionConfig
    from peftkit.methods.fusion_sources import check_fusable, fused_adapters

    adapter = _peft_adapter(tiny_llama, tmp_path / "peft")
    with pytest.raises(PeftkitError, match=r"is a HiRA adapter; AdapterFusion fuses bottleneck adapters, or"):
        check_fusable(fused_adapters(FusionConfig(method="fusion", fuse=[str(adapter), str(adapter)])), "adapter.fuse")
