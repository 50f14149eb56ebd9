"""AdaMSS (peftkit.methods.adamss) beyond the conformance battery of tests/test_methods.py: its decomposition,
clustering and start against peft 0.21's from one seed, peft's adapter loaded and merged with peft's numbers, our
export loaded by peft with our logits and gradients, the shipped recipe, combining two adapters into the base, and what
it refuses (a file whose subspaces are not this base's clustering, which peft loads with rows misplaced)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import peft
import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from peftkit.adapters import adapter_layers, inject_adapters
from peftkit.combine_adapters import combine_adapters
from peftkit.combine_inputs import Combination
from peftkit.errors import PeftkitError
from peftkit.inspect import inspect_adapter
from peftkit.methods.adamss import AdamssConfig
from tests.conftest import load_fp32 as _load  # (float32, eval mode)
from peftkit.methods.fusion import FusionConfig
from peftkit.methods.fusion_sources import fused_adapters
from tests.conftest import (check_combined_into_base_as_peft_merges, check_loads_and_merges_as_peft,
                            check_routed_as_peft, check_shipped_recipe_is_peft_s, save_random_adapter)

IDS = torch.tensor([[3, 4, 5, 9, 7, 8, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47]])
TARGETS = ["q_proj", "v_proj", "down_proj"]
SMALL = {"r": 8, "num_subspaces": 3, "subspace_rank": 2}


def _peft_adapter(base: Path, out: Path, seed: int = 0, **settings) -> Path:
    """peft's AdaMSS with B moved (N(0, 0.1^2): trained), saved by peft."""
    torch.manual_seed(seed)
    model = get_peft_model(_load(base), peft.AdamssConfig(**({"target_modules": TARGETS} | SMALL | settings)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adamss_B" in name:
                p.copy_(torch.randn(p.shape) * 0.1)
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("settings", [SMALL | {"init_weights": None},
                                      SMALL | {"subspace_rank": 3, "use_dynamic_rank": True, "init_weights": None},
                                      {}], ids=["fixed", "dynamic", "defaults"])
def test_start_is_peft_s(settings, tiny_llama):
    """From one seed, peftkit's layers hold peft's A, B, V^T and row placement bit for bit (r 8 of 32 and 64 inputs,
    three subspaces; peft's default r 100, capped at 32), give peft's logits bit for bit and leave torch's generator
    where peft's does; at the default init the base model's logits."""
    settings = {"target_modules": TARGETS} | settings
    torch.manual_seed(0)
    theirs = get_peft_model(_load(tiny_llama), peft.AdamssConfig(**settings))
    after_theirs = torch.rand(1)
    ours = _load(tiny_llama)
    torch.manual_seed(0)
    inject_adapters(ours, AdamssConfig(method="adamss", **settings))
    assert torch.equal(torch.rand(1), after_theirs)
    for path, layer in adapter_layers(ours).items():
        reference = theirs.base_model.model.get_submodule(path)
        assert len(layer.adamss_A) == len(reference.adamss_A["default"]) == settings.get("num_subspaces", 5)
        for k, (a, b) in enumerate(zip(reference.adamss_A["default"], reference.adamss_B["default"])):
            assert torch.equal(layer.adamss_A[k], a) and torch.equal(layer.adamss_B[k], b), (path, k)
        assert torch.equal(layer.adamss_newB, reference.adamss_newB["default"]), path
        assert torch.equal(layer.adamss_order.argsort(), reference.scatter_index["default"]), path
    with torch.no_grad():
        logits = ours(IDS).logits
        assert torch.equal(logits, theirs(IDS).logits)
        if "init_weights" not in settings:
            assert (logits - _load(tiny_llama)(IDS).logits).abs().max() <= 1e-6


def test_peft_adapter_loads_and_merges_as_peft(tiny_llama, tmp_path):
    """peft's file (clustering computed again from the base, as peft does) gives peft's logits in peftkit and in every
    merge (in place and back, merged_model), peftkit merge as merge_and_unload; inspect counts A and B as trained and
    gives the SVD's r as the rank."""
    adapter = _peft_adapter(tiny_llama, tmp_path / "adapter")
    keys = load_file(adapter / "adapter_model.safetensors")
    trained = sum(t.numel() for k, t in keys.items() if ".adamss_A." in k or ".adamss_B." in k)
    # per layer 3 A of 2 x 8 and B of (rows, 2), the rows adding up to the outputs: q, down 48 + 64, v (16) 48 + 32
    info = inspect_adapter(adapter)
    assert info["trainable_params"] == trained == 2 * (2 * 112 + 80)
    assert set(info["ranks"].values()) == {8}  # (the SVD's r, not the subspaces' rank 2)
    check_loads_and_merges_as_peft(tiny_llama, adapter, IDS, tmp_path / "merged", unloaded=True)


def test_export_loads_in_peft_with_our_logits_and_gradients(tiny_llama, tmp_path):
    """Our export (peft's names and shapes, V^T saved) loads in peft with our logits, and a step's gradients of A and B
    are peft's."""
    from peftkit.adapter_base import load_adapted_model

    cfg = AdamssConfig(method="adamss", target_modules=TARGETS, **SMALL)
    adapter = save_random_adapter(tiny_llama, cfg, tmp_path / "ours", seed=3, std=0.1)
    saved = load_file(adapter / "adapter_model.safetensors")
    assert saved["base_model.model.model.layers.0.mlp.down_proj.adamss_newB"].shape == (8, 64)
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "ADAMSS"
    ours = load_adapted_model(str(tiny_llama), str(adapter), torch.device("cpu"))[0].eval()
    theirs = PeftModel.from_pretrained(_load(tiny_llama), adapter, is_trainable=True)
    theirs_logits, ours_logits = theirs(input_ids=IDS).logits, ours(input_ids=IDS).logits
    assert (ours_logits - _load(tiny_llama)(IDS).logits).abs().max() > 1e-2
    assert (ours_logits - theirs_logits).abs().max() <= 1e-5
    theirs_logits.square().mean().backward()
    ours_logits.square().mean().backward()
    for path, layer in adapter_layers(ours).items():
        reference = theirs.base_model.model.get_submodule(path)
        for name in ("adamss_A", "adamss_B"):
            for k, p in enumerate(getattr(layer, name)):
                ref = getattr(reference, name)["default"][k].grad
                assert torch.allclose(p.grad, ref, rtol=1e-4, atol=1e-7), (path, name, k)
        assert layer.adamss_newB.grad is None


def test_shipped_recipe_trains_and_peft_loads_its_export(tiny_llama, number_data, tmp_path):
    """recipes/methods/adamss.yaml trains (eval loss down); its adapter has peft's names and shapes for the recipe's
    settings and loads in peft with the merged export's logits."""
    check_shipped_recipe_is_peft_s("adamss", peft.AdamssConfig, tiny_llama, number_data, tmp_path, IDS)


def test_combining_and_routing_two_adapters_is_peft_s(tiny_llama, tmp_path):
    """Two peft adapters (seeds 0, 1) combined at 0.5 each into the base give the mean of peft's merge_and_unload
    weights (each file's rows placed by the clustering of the base weight: Method.base_facts), the two in one mixed
    batch each row peft's logits of its adapter, their SVD combination at full rank a LoRA of the combined base's logits
    (peft loads it); AdapterFusion over them is refused by text."""
    adapters = [_peft_adapter(tiny_llama, tmp_path / f"a{seed}", seed) for seed in (0, 1)]
    check_combined_into_base_as_peft_merges(tiny_llama, adapters, tmp_path / "combined")
    check_routed_as_peft(tiny_llama, adapters, IDS)
    lora = combine_adapters([str(a) for a in adapters], Combination("svd", (0.5, 0.5), svd_rank=32),
                            str(tmp_path / "svd"))
    with torch.no_grad():  # (full rank: the LoRA of the mean update, loaded by peft, is the combined base)
        expected = _load(tmp_path / "combined")(IDS).logits
        assert (PeftModel.from_pretrained(_load(tiny_llama), lora)(input_ids=IDS).logits - expected).abs().max() <= 1e-5
    with pytest.raises(PeftkitError, match="is an AdaMSS adapter; AdapterFusion fuses bottleneck adapters"):
        fused_adapters(FusionConfig(method="fusion", fuse=[str(adapters[0]), str(adapters[1])]))


def test_another_clustering_is_refused_where_peft_misplaces_rows(tiny_llama, tmp_path):
    """An adapter trained on the bf16 base (peft's defaults: r 100, five subspaces) loaded on the fp32 base: the
    clustering of the fp32 weight gives other subspaces (row counts [10, 11, 7, 1, 3] for layer 0's q_proj where
    this was written, [9, 11, 8, 1, 3] with scikit-learn 1.9.1, the bf16 weight's [12, 3, 7, 1, 9]: KMeans' exact clusters are
    its version's, so the test compares the two, not either with a number). peft loads it without a word, its B
    tensors reshaped to the file's and its rows placed by its own clustering; peftkit refuses it by text, in loading
    and in peftkit merge. On the bf16 base, peft's logits."""
    from peftkit.adapter_base import load_adapted_model
    from peftkit.merge import merge_adapter

    torch.manual_seed(0)
    model = get_peft_model(_load(tiny_llama).to(torch.bfloat16), peft.AdamssConfig(target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(_load(tiny_llama), tmp_path / "adapter")  # (no error, no warning)
    q = theirs.base_model.model.model.layers[0].self_attn.q_proj
    saved = [len(b) for b in q.adamss_B["default"]]  # the file's subspaces, the bf16 weight's clustering
    assert [len(rows) for rows in q.seg_result["default"].values()] != saved and sum(saved) == 32
    said = (r"The AdaMSS adapter does not fit 'model.layers.0.self_attn.q_proj': its subspaces have "
            + re.escape(str(saved)) + " rows")
    with pytest.raises(PeftkitError, match=said):
        load_adapted_model(str(tiny_llama), str(tmp_path / "adapter"), torch.device("cpu"))
    with pytest.raises(PeftkitError, match=said):
        merge_adapter(str(tmp_path / "adapter"), str(tmp_path / "merged"), base=str(tiny_llama))


ASA = {"use_asa": True, "asa_target_subspaces": 6, "init_warmup": 1, "final_warmup": 7, "mask_interval": 2}


def test_asa_freezes_what_peft_s_callback_freezes_and_one_subspace_less(tiny_llama):
    """ASA against peft's AdamssAsaCallback on the same parameters and gradients, step after step (18 subspaces, kept
    12, 7 and 6 after steps 3, 5 and 7: peft's global_step 2, 4, 6), each round from the same training subspaces:
    peftkit keeps the schedule's number, peft one fewer (its kth-largest threshold freezes the kth too), the subspaces
    peft keeps among peftkit's."""
    from types import SimpleNamespace

    from peft.tuners.adamss.asa_callback import AdamssAsaCallback

    from peftkit.methods.adamss import Adamss

    settings = {"target_modules": TARGETS, **SMALL, **ASA}
    theirs = get_peft_model(_load(tiny_llama), peft.AdamssConfig(**settings))
    cfg = AdamssConfig(method="adamss", **settings)
    ours = _load(tiny_llama)
    inject_adapters(ours, cfg)
    allocator = Adamss.trainer(ours, cfg, 10)
    pairs = [(getattr(layer, n)[k], getattr(theirs.base_model.model.get_submodule(path), n)["default"][k])
             for path, layer in adapter_layers(ours).items() for k in range(3) for n in ("adamss_A", "adamss_B")]
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p, q in pairs:
            p.copy_(torch.randn(p.shape, generator=gen))
            q.copy_(p)
    kept = {3: 12, 5: 7, 7: 6}
    for step in range(1, 10):
        for p, q in pairs:
            grad = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = (grad.clone() if t.requires_grad else None for t in (p, q))
        allocator.after_step(step)
        AdamssAsaCallback().on_optimizer_step(None, SimpleNamespace(global_step=step - 1), None, model=theirs)
        ours_on = {i for i, (p, _) in enumerate(pairs[::2]) if p.requires_grad}
        theirs_on = {i for i, (_, q) in enumerate(pairs[::2]) if q.requires_grad}
        assert all(p.requires_grad == pairs[2 * i][0].requires_grad for i, (p, _) in enumerate(pairs[1::2]))
        expected = kept.get(step, len(ours_on))
        assert len(ours_on) == expected and theirs_on <= ours_on, step
        assert len(theirs_on) == expected - (step in kept), step  # (one fewer at each freeze)
        for p, q in pairs:  # the next round from the same subspaces (the averages start again on both sides)
            q.requires_grad_(p.requires_grad)
    assert len(ours_on) == 6 and all(p.grad is None for p, _ in pairs if not p.requires_grad)


def test_asa_run_resumes_to_the_same_bits(tiny_llama, number_data, tmp_path):
    """A run with ASA (12 subspaces, 7 kept after step 3, 5 after step 5 of 6) killed after step 4 and resumed gives the
    unbroken run's file, byte for byte: the checkpoint keeps the frozen subspaces (it fails without them) and step 4's
    averages. ZeRO and FSDP are refused by text."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from peftkit.distributed import check_engine
    from peftkit.recipe import load_recipe
    from tests.conftest import check_resumes_to_the_same_bits, method_recipe

    adapter = {"method": "adamss", "target_modules": ["q_proj", "v_proj"], **SMALL, **ASA, "init_warmup": 1,
               "final_warmup": 5, "asa_target_subspaces": 5}
    recipe = method_recipe(tmp_path, tiny_llama, number_data, adapter,
                           training={"max_steps": 6, "save_steps": 2, "save_total_limit": 10})
    check_resumes_to_the_same_bits(recipe, tmp_path / "run", kill_after=4, steps=6)
    with pytest.raises(PeftkitError, match="adapter.use_asa: AdaMSS's subspace allocation freezes subspaces while"):
        check_engine(load_recipe(recipe), SimpleNamespace(distributed_type=DistributedType.FSDP))


def test_a_projection_decomposed_elsewhere_is_a_warning(tiny_llama, tmp_path):
    """peft's file whose V^T of one layer is not this base's decomposition (an entry moved by 0.01, as another device's
    projection would be) but whose row counts agree loads with a warning naming the layer, in loading and in peftkit
    merge; peft's own file (its V^T this base's, bit for bit) loads without one (the other tests: none)."""
    from safetensors.torch import save_file

    from peftkit.adapter_base import load_adapted_model
    from peftkit.errors import PeftkitWarning
    from peftkit.merge import merge_adapter

    adapter = _peft_adapter(tiny_llama, tmp_path / "adapter")
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.1.self_attn.v_proj.adamss_newB"][0, 0] += 0.01
    save_file(tensors, adapter / "adapter_model.safetensors")
    said = r"projection \(adamss_newB\) of 'model.layers.1.self_attn.v_proj' is 0.01 from the decomposition of this"
    with pytest.warns(PeftkitWarning, match=said):
        load_adapted_model(str(tiny_llama), str(adapter), torch.device("cpu"))
    with pytest.warns(PeftkitWarning, match=said):
        merge_adapter(str(adapter), str(tmp_path / "merged"), base=str(tiny_llama))


def test_refusals(tiny_llama, tiny_gpt2, monkeypatch):
    """GPT-2's Conv1D, an embedding and scikit-learn missing are refused by text."""
    with pytest.raises(PeftkitError, match="'transformer.h.0.attn.c_attn' is GPT-2's Conv1D; AdaMSS decomposes"):
        inject_adapters(_load(tiny_gpt2), AdamssConfig(method="adamss", target_modules=["c_attn"]))
    with pytest.raises(PeftkitError, match="'model.embed_tokens' is an Embedding; AdaMSS decomposes"):
        inject_adapters(_load(tiny_llama), AdamssConfig(method="adamss", target_modules=["embed_tokens"]))
    monkeypatch.setitem(sys.modules, "sklearn.cluster", None)
    with pytest.raises(PeftkitError,
                       match=r'scikit-learn\'s KMeans, which is not installed: pip install "peftkit\[adamss\]"'):
        inject_adapters(_load(tiny_llama), AdamssConfig(method="adamss"))


def test_a_quantized_base_is_refused_naming_the_recipe_s_key(tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    """An NF4 base is refused by validate and train, which name the recipe's top-level quantization section: the
    refusal said 'model.quantization: null', a key the recipe's model section does not have (setting it is an
    error of its own). A Conv1D or embedding target is told to leave the target list instead."""
    import yaml

    from tests.conftest import cli_user_error, method_recipe

    recipe = method_recipe(tmp_path, tiny_llama, number_data, {"method": "adamss", **SMALL})
    raw = yaml.safe_load(recipe.read_text())
    recipe.write_text(yaml.safe_dump(raw | {"quantization": {"method": "nf4"}}))
    for command in ("validate", "train"):
        said = " ".join(cli_user_error(monkeypatch, capsys, command, str(recipe)).split())
        assert ("'model.layers.0.self_attn.q_proj' is a 4-bit/8-bit (bitsandbytes) layer; AdaMSS decomposes" in said
                and "Load the base unquantized (remove the recipe's quantization section, or set quantization: null), "
                    "or use adapter.method: lora." in said and "model.quantization" not in said), command
    with pytest.raises(PeftkitError, match="is an Embedding; .* Leave it out of adapter.target_modules, or use"):
        inject_adapters(_load(tiny_llama), AdamssConfig(method="adamss", target_modules=["embed_tokens"]))
