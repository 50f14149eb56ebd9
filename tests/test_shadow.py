"""ShadowPEFT (method: shadow) against HF peft 0.21.2's SHADOW: from one seed peft's backbone and block parts, the
generator where peft's ends, logits and gradients bit for bit (a narrower two-block mirror with its own embeddings and a
projection too); peft's adapter loaded with peft's logits and ours loaded by peft; the auxiliary loss peft adds in
training; cached generation equal to cache-free greedy decoding, where peft's is not; the shipped recipe; the refusals.
The conformance battery (tests/test_methods.py) checks the rest."""

from __future__ import annotations

import json

import peft
import pytest
import torch
import yaml
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from peftkit.adapter_base import load_adapted_model
from peftkit.adapters import adapter_layers, inject_adapters
from peftkit.adapters.state_dicts import adapter_state_dict
from peftkit.errors import PeftkitError
from peftkit.methods.shadow import ShadowConfig, ShadowTrainer
from tests.conftest import load_fp32 as _load  # (float32, eval mode)
from tests.conftest import check_resumes_to_the_same_bits, cli_user_error, method_recipe, train_shipped_recipe

IDS = torch.tensor([[3, 4, 5, 9, 7, 8, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47]])
MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])  # the first row left-padded
NARROW = {"shadow_num_hidden_layers": 2, "shadow_hidden_size": 16, "shadow_num_attention_heads": 2,
          "shadow_intermediate_size": 24, "update_hidden_size": 6}


def _pair(path, **settings):
    """(peft's model, ours) from seed 0 each, and whether the generator ended where peft's did."""
    torch.manual_seed(0)
    theirs = get_peft_model(_load(path), peft.ShadowConfig(task_type="CAUSAL_LM", **settings)).eval()
    after = torch.get_rng_state()
    torch.manual_seed(0)
    ours = _load(path)
    inject_adapters(ours, ShadowConfig(method="shadow", **settings))
    return theirs, ours.eval(), torch.equal(torch.get_rng_state(), after)


@pytest.mark.parametrize("settings", [{}, NARROW, "pretrained"], ids=["mirror", "narrow-mirror", "pretrained"])
def test_draws_logits_and_gradients_are_peft_s(settings, tiny_llama):
    """One seed: peft's file (names, tensors) bit for bit and its generator state; the logits of a padded batch bit for
    bit and every trained tensor's gradient to 1e-6 relative (init_weights false: W_up drawn, the injection far from
    0). A pretrained backbone (shadow_model: a local directory, here the base's own) keeps its embeddings, frozen, and
    saves them, as peft's."""
    from peft.utils import get_peft_model_state_dict

    settings = {"shadow_model": str(tiny_llama)} if settings == "pretrained" else settings
    theirs, ours, same_generator = _pair(tiny_llama, init_weights=False, shadow_dropout=0.0, **settings)
    assert same_generator
    mine, expected = adapter_state_dict(ours, []), get_peft_model_state_dict(theirs)
    assert mine.keys() == expected.keys() and all(torch.equal(mine[k], expected[k]) for k in mine)
    assert any(k.startswith("base_model.shadow_projection.") for k in mine) == (settings == NARROW)
    embeddings = "base_model.shadow_backbone.default.embed_tokens.weight"
    assert (embeddings in mine) == bool(settings) and (embeddings in _grads(ours)) == (settings == NARROW)
    a, b = ours(input_ids=IDS, attention_mask=MASK).logits, theirs(input_ids=IDS, attention_mask=MASK).logits
    assert torch.equal(a, b) and (a - _load(tiny_llama)(input_ids=IDS, attention_mask=MASK).logits).abs().max() > 1e-2
    a.square().mean().backward()
    b.square().mean().backward()
    grads, peft_grads = _grads(ours), {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert grads.keys() == peft_grads.keys()
    # (the last block's update feeds nothing, in peft as here: no gradient)
    assert all(n.startswith("base_model.model.model.layers.1.shadow_update") == (g is None) for n, g in grads.items())
    assert all((g is None) == (peft_grads[n] is None) for n, g in grads.items())
    # (summed in another order: 2e-7 of the largest entry at most, measured)
    assert max(float((g - peft_grads[n]).abs().max() / peft_grads[n].abs().max()) for n, g in grads.items()
               if g is not None) <= 1e-6


def _grads(model) -> dict[str, torch.Tensor | None]:
    """The trained tensors' gradients under peft's parameter names (the trunk's once, as peft's model-level modules)."""
    return {f"base_model.{n.split('.shared.', 1)[1]}" if ".shared." in n else f"base_model.model.{n}": p.grad
            for n, p in model.named_parameters() if p.requires_grad}


def test_peft_s_adapter_loads_ours_loads_in_peft_and_merging_is_refused(tiny_llama, tmp_path):
    """peft's adapter (a narrower mirror, moved from its start): peft's logits bit for bit, as many trained numbers as
    peft's and inspect's count, inspect's rank; our export of it loads in peft with our logits; every merge refused by text."""
    from peftkit.inspect import inspect_adapter
    from peftkit.merge import merge_adapter
    from peftkit.peft_format import peft_config, save_adapter

    torch.manual_seed(0)
    made = get_peft_model(_load(tiny_llama), peft.ShadowConfig(task_type="CAUSAL_LM", init_weights=False, **NARROW))
    made.eval().save_pretrained(tmp_path / "peft")
    model, cfg = load_adapted_model(str(tiny_llama), str(tmp_path / "peft"), torch.device("cpu"))[:2]
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS, attention_mask=MASK).logits,
                           made(input_ids=IDS, attention_mask=MASK).logits)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trained == sum(p.numel() for p in made.parameters() if p.requires_grad) == 9_288
    info = inspect_adapter(tmp_path / "peft")  # (its rank was 'none': rank_dims held the last names alone)
    assert info["trainable_params"] == trained and info["ranks"] == {"model.layers.0": 8, "model.layers.1": 8}
    assert info["targets"]["modules"] == {"layers": 2}  # (its blocks' list, not their indices: it said '0 x1, 1 x1')
    with pytest.raises(PeftkitError, match="the shadow state injected into each block depends on the input"):
        next(iter(adapter_layers(model).values())).merge()
    with pytest.raises(PeftkitError, match="ShadowPEFT adapters \\(method: shadow\\) cannot be merged"):
        merge_adapter(str(tmp_path / "peft"), str(tmp_path / "merged"), base=str(tiny_llama))
    save_adapter(tmp_path / "ours", adapter_state_dict(model, []), peft_config(
        cfg, list(adapter_layers(model)), str(tiny_llama), False, "llama", model_config=model.config))
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (written["peft_type"], written["target_modules"]) == ("SHADOW", ["model.layers.0", "model.layers.1"])
    again = PeftModel.from_pretrained(_load(tiny_llama), tmp_path / "ours").eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=IDS).logits, model(input_ids=IDS).logits)


@pytest.mark.parametrize("head", [[], ["lm_head"]], ids=["base-head", "trained-head"])
def test_the_auxiliary_loss_is_peft_s(head, tiny_llama):
    """peft adds auxiliary_loss_weight x the cross-entropy of the base's head on s0 to the loss when given labels; the
    training step's term (ShadowTrainer.batch_loss, summed over the labelled positions, as the loss) gives peft's loss
    over one micro-batch (1e-6) and peft's gradients (1e-6 relative). With lm_head in modules_to_save (moved), the
    term reads the trained copy, as peft's."""
    from peftkit.evaluate import token_loss_sum
    from peftkit.data import IGNORE_INDEX
    from peftkit.loss import labelled_count

    theirs, ours, _ = _pair(tiny_llama, init_weights=False, shadow_dropout=0.0, auxiliary_loss_weight=0.5,
                            modules_to_save=head)
    with torch.no_grad():
        for p in [p for n, p in theirs.named_parameters() if p.requires_grad and "lm_head" in n] + [
                p for n, p in ours.named_parameters() if p.requires_grad and "lm_head" in n]:
            p.mul_(1.5)
    labels = IDS.clone()
    labels[:, :3] = IGNORE_INDEX
    batch = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS), "labels": labels}
    n = labelled_count(labels)
    loss, _ = token_loss_sum(ours, batch, n)
    extra = ShadowTrainer(ours, 0.5).batch_loss(batch, n)
    total = (loss + extra) / n
    expected = theirs(input_ids=IDS, labels=labels).loss
    assert abs(float((total - expected).detach())) <= 1e-6 and float(extra.detach()) > 0.1 * float(loss.detach())
    total.backward()
    expected.backward()
    grads = _grads(ours)
    peft_grads = {n.replace(".modules_to_save.default.", "."): p.grad for n, p in theirs.named_parameters()
                  if p.requires_grad}
    assert grads.keys() == peft_grads.keys() and ("base_model.model.lm_head.weight" in grads) == bool(head)
    assert all((g is None) == (peft_grads[n] is None) for n, g in grads.items())
    assert max(float((g - peft_grads[n]).abs().max() / peft_grads[n].abs().max()) for n, g in grads.items()
               if g is not None) <= 1e-6


def _greedy(model, ids: list[int], n: int) -> list[int]:
    seq = list(ids)
    for _ in range(n):
        with torch.no_grad():
            seq.append(int(model(torch.tensor([seq]), use_cache=False).logits[0, -1].argmax()))
    return seq[len(ids):]


@pytest.mark.parametrize("targets", [None, ["model.layers.1"]], ids=["every-block", "from-block-1"])
def test_cached_generation_is_cache_free_greedy_where_peft_s_is_not(targets, tiny_llama):
    """peft 0.21.2's ShadowCache is never built under transformers 5 (its hook reads `past_key_values`; generate passes
    `cache`), so each step's s0 is the backbone's output for the new token alone: its cached greedy generation leaves
    its own cache-free decoding. peftkit's generate keeps the backbone's cache beside the base's and gives cache-free
    greedy decoding's tokens (which are peft's cache-free ones: same logits). From block 1: the base cache holds block
    0's keys of the step already when the state starts (it was refused as a cache filled without the shadow's)."""
    from peftkit.decoding import Sampling, generate_ids

    theirs, ours, _ = _pair(tiny_llama, init_weights=False, shadow_alpha=2.0, target_modules=targets)
    prompt, new = [3, 4, 5, 9, 7, 8], 10
    reference = _greedy(ours, prompt, new)
    assert reference == _greedy(theirs, prompt, new)
    with torch.no_grad():
        cached = theirs.generate(input_ids=torch.tensor([prompt]), max_new_tokens=new, do_sample=False,
                                 pad_token_id=0)[0, len(prompt):].tolist()
    assert cached != reference
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    got = generate_ids(ours, tok, [prompt, [40, 41, 42]], Sampling(max_new_tokens=new))  # (batched, left-padded)
    assert got[0] and got[0] == reference[:len(got[0])]  # (up to a stop token)
    assert got[1] == _greedy(ours, [40, 41, 42], new)[:len(got[1])]


def test_the_shipped_recipe_trains_and_peft_loads_its_export(tiny_llama, number_data, tmp_path):
    """Two steps of recipes/methods/shadow.yaml: the eval loss falls, peft loads the export with our logits; with
    gradient checkpointing (the base blocks' recomputed inside the shadow layers) the same adapter (1e-6)."""
    from safetensors.torch import load_file

    summary = train_shipped_recipe("shadow", tiny_llama, number_data, tmp_path / "run", steps=2, batch_size=2)
    assert summary["eval_loss"] < summary["base_eval_loss"]
    train_shipped_recipe("shadow", tiny_llama, number_data, tmp_path / "gc", steps=2, batch_size=2,
                         sets=("training.gradient_checkpointing=true",))
    plain, checkpointed = (load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("run", "gc"))
    assert plain.keys() == checkpointed.keys()
    assert max(float((plain[k] - checkpointed[k]).abs().max()) for k in plain) <= 1e-6
    adapter = tmp_path / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["shadow_model"]) == ("SHADOW", 8, "mirror")
    ours = load_adapted_model(str(tiny_llama), str(adapter), torch.device("cpu"))[0]
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(_load(tiny_llama), adapter).eval()(input_ids=IDS).logits
        assert torch.equal(ours(input_ids=IDS).logits, theirs)


def test_a_resumed_run_is_the_unbroken_one(tiny_llama, number_data, tmp_path):
    """A run (dropout on, the auxiliary loss, W_up moving from 0) killed after a checkpoint and resumed saves the
    unbroken run's file byte for byte: the backbone's tensors come back into the trunk with the optimizer's state."""
    recipe = method_recipe(tmp_path, tiny_llama, number_data, {"method": "shadow", "r": 4},
                           training={"max_steps": 2, "save_steps": 1, "lr": 5e-2, "batch_size": 2})
    check_resumes_to_the_same_bits(recipe, tmp_path / "run", kill_after=1, steps=2)


@pytest.mark.parametrize(("adapter", "message"), [
    ({"target_modules": ["q_proj"]}, "adapter.target_modules: 'model.layers.0.self_attn.q_proj' is no decoder block; "
                                     "ShadowPEFT wraps whole blocks"),
    ({"shadow_model": "someone/shadow-model"}, "is 'someone/shadow-model': give 'mirror' (a backbone built from the "
                                               "base's config) or a local directory"),
    ({"shadow_model": ".", "shadow_hidden_size": 16}, "a shadow_model directory defines its own architecture; remove "
                                                      "shadow_hidden_size"),
    ({"r": 0}, "'adapter.r' = 0"),
])
def test_recipe_mistakes_are_refused(adapter, message, tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    recipe = method_recipe(tmp_path, tiny_llama, number_data, {"method": "shadow", **adapter})
    assert message in " ".join(cli_user_error(monkeypatch, capsys, "validate", str(recipe)).split())


def test_a_relative_shadow_model_is_under_the_recipe_s_directory(tiny_llama, number_data, tmp_path, monkeypatch):
    """`shadow_model: backbone` names the directory beside the recipe, as every path of a recipe does: it was read
    from the working directory (refused from elsewhere, and another directory of that name taken silently)."""
    import shutil

    from peftkit.recipe import load_recipe

    shutil.copytree(tiny_llama, tmp_path / "backbone")
    recipe = method_recipe(tmp_path, tiny_llama, number_data, {"method": "shadow", "shadow_model": "backbone"})
    monkeypatch.chdir(tmp_path.parent)
    assert load_recipe(recipe).adapter.shadow_model == str((tmp_path / "backbone").resolve())


def test_blocks_apart_gpt2_a_classifier_and_a_merged_export_are_refused(tiny_gpt2, tiny_llama, number_data, tmp_path,
                                                                       monkeypatch, capsys):
    """The state rides the loop from the first targeted block to the last: blocks 0 and 2 of three are refused; GPT-2
    (no mirror here), a classifier (peft's keeps a shadow head) and a merged export are refused by text."""
    three = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                                         num_attention_heads=2, vocab_size=50))
    with pytest.raises(PeftkitError, match="the blocks 0, 2 are not consecutive"):
        inject_adapters(three, ShadowConfig(method="shadow", target_modules=["layers.0", "layers.2"]))
    with pytest.raises(PeftkitError, match="model type 'gpt2' has no decoder of Llama's shape"):
        inject_adapters(_load(tiny_gpt2), ShadowConfig(method="shadow"))
    recipe = method_recipe(tmp_path, tiny_llama, number_data, {"method": "shadow"}, export={"merged": True})
    assert "export.merged: ShadowPEFT adapters (method: shadow) cannot be merged" in " ".join(
        cli_user_error(monkeypatch, capsys, "validate", str(recipe)).split())
    recipe = method_recipe(tmp_path, tiny_llama, number_data, {"method": "shadow"})
    raw = yaml.safe_load(recipe.read_text())
    recipe.write_text(yaml.safe_dump(raw | {"model": raw["model"] | {"task": "sequence_classification"},
                                            "data": raw["data"] | {"format": "classification"}}))
    assert "adapter.method: shadow trains causal language models here" in " ".join(
        cli_user_error(monkeypatch, capsys, "validate", str(recipe)).split())


def test_named_adapters_combining_fusion_and_peft_s_classifier_are_refused(tiny_llama, tmp_path):
    """Named adapters (mixed batches, switching) hold layers per adapter; the shadow network runs beside the whole
    decoder: refused by text. Combining two (into the base or into one adapter) and AdapterFusion over one are refused,
    and peft's sequence-classification adapter (a shadow head of its own)."""
    from peftkit.adapters.named import NamedAdapters
    from peftkit.combine_adapters import combine_adapters
    from peftkit.combine_inputs import Combination
    from peftkit.methods.fusion import FusionConfig
    from peftkit.methods.fusion_sources import check_fusable, fused_adapters

    torch.manual_seed(0)
    get_peft_model(_load(tiny_llama), peft.ShadowConfig(task_type="CAUSAL_LM")).save_pretrained(tmp_path / "peft")
    adapter = str(tmp_path / "peft")
    for into_base in (True, False):
        with pytest.raises(PeftkitError, match="ShadowPEFT adapters \\(method: shadow\\) cannot be merged"):
            combine_adapters([adapter, adapter], Combination("linear", (0.5, 0.5)), str(tmp_path / "out"), into_base)
    with pytest.raises(PeftkitError, match="is a ShadowPEFT adapter; AdapterFusion fuses bottleneck adapters"):
        check_fusable(fused_adapters(FusionConfig(method="fusion", fuse=[adapter, adapter])), "adapter.fuse")
    with pytest.raises(PeftkitError, match="is ShadowPEFT \\(method: shadow\\), which loads alone: its shadow network "
                                           "runs beside the whole decoder"):
        NamedAdapters(_load(tiny_llama)).load("a", tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config | {"task_type": "SEQ_CLS"}))
    with pytest.raises(PeftkitError, match="task_type 'SEQ_CLS'; peftkit reads causal-LM ShadowPEFT adapters only"):
        load_adapted_model(str(tiny_llama), str(tmp_path / "peft"), torch.device("cpu"))


def test_a_comparison_evaluates_it_alone(tiny_llama, number_data, tmp_path, monkeypatch):
    """`peftkit eval --adapter NAME=DIR ...` with peft's ShadowPEFT adapter beside a LoRA: named adapters refuse it,
    so it is evaluated on a model of its own (`loads_alone`: it failed, exit 2), with the loss of evaluating it alone."""
    from peft import LoraConfig

    from peftkit.adapters.sharing import loads_alone
    from peftkit.cli import main
    from peftkit.eval_job import eval_job
    from peftkit.evaluate import evaluate

    torch.manual_seed(0)
    get_peft_model(_load(tiny_llama), peft.ShadowConfig(task_type="CAUSAL_LM", init_weights=False)).save_pretrained(
        tmp_path / "shadow")
    get_peft_model(_load(tiny_llama), LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"],
                                                 init_lora_weights=False)).save_pretrained(tmp_path / "lora")
    assert (loads_alone(str(tmp_path / "shadow")), loads_alone(str(tmp_path / "lora"))) == ("peft_type SHADOW", None)
    data, out = str(number_data["eval"]), tmp_path / "cmp.json"
    monkeypatch.setattr("sys.argv", ["peftkit", "eval", "--model", str(tiny_llama), "--data", data, "--adapter",
                                     f"shadow={tmp_path / 'shadow'}", "--adapter", f"lora={tmp_path / 'lora'}",
                                     "--json", str(out)])
    main()
    results = json.loads(out.read_text())
    alone = evaluate(eval_job(None, [], str(tiny_llama), data, None, str(tmp_path / "shadow"), None, None, None,
                              metrics="loss"))
    assert results["shadow"]["loss"] == alone["loss"] != results["base"]["loss"]


def test_ddp_looks_for_the_unused_last_update_and_fsdp_is_refused(tiny_llama, number_data, tmp_path):
    """The last targeted block's update MLPs feed nothing (peft's neither): DDP is told to look for unused parameters
    (without it the second forward failed; tests/test_distributed.py trains on 2 processes). FSDP cannot shard the one
    backbone every block reaches: refused by text before the model loads."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedDataParallelKwargs, DistributedType

    from peftkit.distributed import accelerator_handlers, check_engine
    from peftkit.recipe import load_recipe

    recipe = load_recipe(method_recipe(tmp_path, tiny_llama, number_data, {"method": "shadow"}))
    _, ddp = accelerator_handlers(recipe, [])
    assert isinstance(ddp, DistributedDataParallelKwargs) and ddp.find_unused_parameters
    with pytest.raises(PeftkitError, match="adapter.method: shadow cannot train under FSDP: its backbone is one module "
                                           "every targeted block reaches"):
        check_engine(recipe, SimpleNamespace(distributed_type=DistributedType.FSDP))


def test_a_compiled_step_draws_eager_s_dropout_masks(tiny_llama):
    """training.compile's inductor drew the shadow dropout's masks with its own fused generator, not eager's: from one
    seed another mask, and the shipped recipe (shadow_dropout 0.2) trained 2.9e-3 away from the eager run in 2 steps
    (measured). `start.compiled` has it draw eager's: the injection, compiled, is the eager one's from the same seed."""
    from peftkit.start import compiled as compile_step

    model = _load(tiny_llama)
    inject_adapters(model, ShadowConfig(method="shadow", init_weights=False, shadow_alpha=1.0))  # (shadow_dropout 0.2)
    layer = adapter_layers(model)["model.layers.0"].train()
    hidden, shadow = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    torch.manual_seed(3)
    eager = layer._inject(hidden, shadow)
    torch.manual_seed(3)
    compiled = compile_step(layer._inject, "inductor")(hidden, shadow)
    assert torch.allclose(compiled, eager, rtol=0, atol=1e-6) and not torch.allclose(eager, layer._inject(hidden, shadow))
    torch._dynamo.reset()


def test_a_compiled_run_trains_the_eager_run_s_adapter(number_data, tmp_path):
    """training.compile (aot_eager: graph capture and compiled autograd without code generation, fast enough here) of
    a ShadowPEFT run with dropout and the auxiliary loss (read from s0, which the graph hands out through the trunk)
    is one graph without a break, and under SGD trains the eager run's adapter (1e-6; 4e-9 measured). Under AdamW
    the two differ where a gradient entry is near Adam's eps (1e-8): its first step g / (|g| + eps) magnifies a
    last-bit difference of the summation order (5.6e-6 at lr 1e-2, measured; README)."""
    from safetensors.torch import load_file
    from torch._dynamo.utils import counters

    from peftkit.recipe import load_recipe
    from peftkit.tiny import build_tiny_model
    from peftkit.train import train

    model = tmp_path / "one-layer"
    build_tiny_model(model, arch="llama", hidden_size=32, num_layers=1, seed=0)
    runs = {}
    for backend in (False, "aot_eager"):
        counters.clear()
        train(load_recipe(method_recipe(tmp_path / str(backend), model, number_data, {"method": "shadow", "r": 4},
                                        training={"max_steps": 2, "batch_size": 2, "optimizer": "sgd", "lr": 0.5,
                                                  "compile": backend}, eval={"base_model": False})), show_summary=False)
        runs[backend] = load_file(tmp_path / str(backend) / "run" / "adapter" / "adapter_model.safetensors")
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters["graph_break"])
    eager, compiled = runs.values()
    assert max(float((eager[k] - compiled[k]).abs().max()) for k in eager) <= 1e-6
    assert eager["base_model.model.model.layers.0.shadow_up.default.weight"].abs().max() > 1e-3  # (moved from 0)
    torch._dynamo.reset()


def test_a_pretrained_backbone_s_recipe_is_estimated(tiny_llama, number_data, tmp_path):
    """shadow_model: a local directory. The memory estimate (`peftkit validate`, and `train` before it loads the model)
    builds the model on the meta device, where transformers refuses from_pretrained: both failed with its RuntimeError
    ('You are using `from_pretrained` with a meta device context manager'). There the backbone is built from its
    config; the estimate trains peft's count of numbers (AdamW: 8 bytes each). Its adapter's bytes are every tensor
    peft's model adds to the base, the backbone's frozen embeddings too (left out: 13,056 bytes here, a vocabulary x
    the backbone's width in general), and its rotary buffers."""
    from peftkit.memory import estimate_memory
    from peftkit.recipe import load_recipe

    recipe = load_recipe(method_recipe(tmp_path, tiny_llama, number_data,
                                       {"method": "shadow", "r": 4, "shadow_model": str(tiny_llama)}))
    torch.manual_seed(0)
    theirs = get_peft_model(_load(tiny_llama), peft.ShadowConfig(task_type="CAUSAL_LM", r=4,
                                                                 shadow_model=str(tiny_llama)))
    estimate = estimate_memory(recipe)
    assert estimate.optimizer == 8 * sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    added = sum(p.numel() for p in theirs.parameters()) - sum(p.numel() for p in _load(tiny_llama).parameters())
    buffers = sum(b.numel() for b in theirs.base_model.shadow_backbone["default"].buffers())
    assert estimate.adapter == 4 * (added + buffers)


def test_layers_to_transform_picks_blocks_by_their_own_index(tmp_path):
    """layers_to_transform [1] over every block (target_modules null) was refused, saying no layer index was found in
    'model.layers.0' (peft's layer index is the number before a further dot, and a block's path ends in its own). It
    keeps block 1, and the export loads in peft with our logits (peft adapts the blocks target_modules lists). peft
    0.21.2's own ShadowConfig(layers_to_transform=[1]) adapts every block: its injection never reads the setting its
    docstring describes ('The block indices to transform'), a peft bug. A layers_pattern that is not the blocks'
    list and indices past the blocks are refused by text."""
    from peftkit.peft_format import peft_config, save_adapter

    path = tmp_path / "three"
    AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                                 num_attention_heads=2, vocab_size=50)).save_pretrained(path)
    torch.manual_seed(0)
    ours, cfg = _load(path), ShadowConfig(method="shadow", init_weights=False, layers_to_transform=[1])
    inject_adapters(ours, cfg)
    ours.eval()
    assert list(adapter_layers(ours)) == ["model.layers.1"]
    save_adapter(tmp_path / "ours", adapter_state_dict(ours, []), peft_config(
        cfg, list(adapter_layers(ours)), str(path), False, "llama", model_config=ours.config))
    theirs = PeftModel.from_pretrained(_load(path), tmp_path / "ours").eval()
    ids = IDS % 50
    with torch.no_grad():
        assert torch.equal(theirs(input_ids=ids).logits, ours(input_ids=ids).logits)
    assert [n for n, _ in theirs.named_modules() if n.endswith(".shadow_down")] == [
        "base_model.model.model.layers.1.shadow_down"]
    everything = get_peft_model(_load(path), peft.ShadowConfig(task_type="CAUSAL_LM", layers_to_transform=[1]))
    assert len([n for n, _ in everything.named_modules() if n.endswith(".shadow_down")]) == 3  # (peft's bug)
    with pytest.raises(PeftkitError, match="adapter.layers_pattern 'h' does not name the decoder's list of blocks, "
                                           "'layers'; set layers_pattern: layers"):
        inject_adapters(_load(path), ShadowConfig(method="shadow", layers_to_transform=[1], layers_pattern="h"))
    with pytest.raises(PeftkitError, match="adapter.layers_to_transform \\[5\\] keeps none of the targeted blocks "
                                           "\\(numbered 0 to 2\\)"):
        inject_adapters(_load(path), ShadowConfig(method="shadow", layers_to_transform=[5]))


def test_inspect_counts_a_pretrained_backbone_s_embeddings_as_saved_not_trained(tiny_llama, tmp_path):
    """peft saves a pretrained backbone's embeddings (frozen) beside what trains; `peftkit inspect` counted them as
    trained (23,536 for peft's 20,272 here). It now gives peft's trainable count, and the file's numbers as saved."""
    from peftkit.inspect import inspect_adapter

    torch.manual_seed(0)
    made = get_peft_model(_load(tiny_llama), peft.ShadowConfig(task_type="CAUSAL_LM", r=4,
                                                               shadow_model=str(tiny_llama)))
    made.save_pretrained(tmp_path / "peft")
    info = inspect_adapter(tmp_path / "peft")
    trained = sum(p.numel() for p in made.parameters() if p.requires_grad)
    embeddings = made.base_model.shadow_backbone["default"].embed_tokens.weight
    assert not embeddings.requires_grad
    assert (info["trainable_params"], info["saved_params"]) == (trained, trained + embeddings.numel())


@pytest.mark.parametrize("backbone", ["mirror", "pretrained"])
def test_a_bf16_base_s_estimate_holds_the_trunk_s_tensors_as_loaded(backbone, tiny_llama, number_data, tmp_path):
    """On a bf16 base the backbone takes the base's dtype, its rotary buffers and a pretrained one's frozen embeddings
    too: the estimate counted frozen shared tensors at 4 bytes each (16 bytes too many for the mirror's buffers here).
    Its adapter bytes are now what the loaded model holds: the trained tensors and the trunk's frozen ones."""
    from peftkit.adapters import shared_holders, trainable_parameters
    from peftkit.memory import estimate_memory
    from peftkit.modeling import load_model
    from peftkit.recipe import load_recipe

    adapter = {"method": "shadow", "r": 4} | ({"shadow_model": str(tiny_llama)} if backbone == "pretrained" else {})
    path = method_recipe(tmp_path, tiny_llama, number_data, adapter)
    raw = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump(raw | {"model": raw["model"] | {"dtype": "bfloat16"}}))
    recipe = load_recipe(path)
    model = load_model(recipe.model, None, torch.device("cpu"))
    inject_adapters(model, recipe.adapter)
    (trunk,) = shared_holders(model)
    held = [*trainable_parameters(model), *trunk.buffers(), *(p for p in trunk.parameters() if not p.requires_grad)]
    assert estimate_memory(recipe).adapter == sum(t.numel() * t.element_size() for t in held)
