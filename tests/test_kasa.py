"""KaSA (`kasa_config`, peftkit.methods.kasa): LoRA with trained singular values on a base weight without its r
smallest singular components. Checked against peft 0.21: the truncated base weights (bit for bit), its adapters'
logits, merges and one step's gradients, the regulariser (peft's `_get_kasa_loss`), and peft loading ours; settings
peft refuses are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig as PeftLora
from peft import PeftModel
from safetensors.torch import load_file

from peftkit.adapters import inject_adapters
from peftkit.errors import PeftkitError
from peftkit.methods.kasa import KasaSettings, KasaTrainer
from peftkit.methods.lora import LoraConfig
from peftkit.adapter_base import load_adapted_model
from tests.conftest import (check_loads_and_merges_as_peft, check_resumes_to_the_same_bits, cli_user_error, load_fp32,
                            make_recipe, peft_and_our_gradients, peft_lora, save_random_adapter)

IDS = torch.tensor([[3, 4, 5, 9, 7, 8, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47]])
TARGETS = ["q_proj", "down_proj"]
SETTINGS = {"beta": 0.01, "gamma": 0.02}


def _peft_model(base: Path):
    return peft_lora(base, PeftLora(r=4, lora_alpha=8, target_modules=TARGETS, kasa_config=SETTINGS))


def _peft_adapter(base: Path, out: Path) -> Path:
    _peft_model(base).save_pretrained(out)
    return out


def test_adapters_load_and_merge_as_peft_s_on_the_same_truncated_base(tiny_llama, tmp_path):
    adapter = _peft_adapter(tiny_llama, tmp_path / "peft")
    check_loads_and_merges_as_peft(tiny_llama, adapter, IDS, tmp_path / "merged")
    theirs = PeftModel.from_pretrained(load_fp32(tiny_llama), adapter)
    ours = load_adapted_model(str(tiny_llama), str(adapter), torch.device("cpu"))[0]
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        truncated = ours.get_submodule(path).base_layer.weight
        assert torch.equal(truncated, theirs.base_model.model.get_submodule(path).base_layer.weight)
        singular = torch.linalg.svdvals(truncated)  # (r = 4 of them dropped, the rest kept)
        original = torch.linalg.svdvals(load_fp32(tiny_llama).get_submodule(path).weight)
        assert singular[-4:].abs().max() < 1e-4 and (singular[:-4] - original[:-4]).abs().max() < 1e-4
    # The update s B diag(d) A: without the diagonal (plain LoRA on the truncated base), other logits.
    diag = ours.get_parameter("model.layers.0.self_attn.q_proj.lora_diag")
    before = ours(input_ids=IDS).logits
    with torch.no_grad():
        diag.fill_(1.0)
    assert (ours(input_ids=IDS).logits - before).abs().max() > 1e-3


def test_a_step_s_gradients_and_the_regulariser_are_peft_s(tiny_llama, tmp_path):
    adapter = _peft_adapter(tiny_llama, tmp_path / "peft")
    difference, expected, grads = peft_and_our_gradients(tiny_llama, adapter, IDS)
    assert difference <= 1e-6 and set(grads) == set(expected)
    assert any(n.endswith("lora_diag") for n in expected)
    assert max((grads[n] - expected[n]).abs().max() for n in expected) <= 1e-6
    peft_model = _peft_model(tiny_llama)
    ours = load_adapted_model(str(tiny_llama), str(adapter), torch.device("cpu"))[0]
    reg = KasaTrainer(ours, KasaSettings(**SETTINGS)).regularizer()
    assert abs(float(reg) - float(peft_model.base_model._get_kasa_loss())) <= 1e-6 * float(reg)


def test_peft_loads_ours_with_our_logits(tiny_llama, tmp_path):
    cfg = LoraConfig(r=4, alpha=8, target_modules=TARGETS, kasa_config=SETTINGS)
    ours = save_random_adapter(tiny_llama, cfg, tmp_path / "ours", seed=3)
    saved = load_file(ours / "adapter_model.safetensors")
    assert saved["base_model.model.model.layers.0.mlp.down_proj.lora_diag"].shape == (4,)
    assert json.loads((ours / "adapter_config.json").read_text())["kasa_config"] == SETTINGS
    with torch.no_grad():
        logits = load_adapted_model(str(tiny_llama), str(ours), torch.device("cpu"))[0](input_ids=IDS).logits
        theirs = PeftModel.from_pretrained(load_fp32(tiny_llama), ours)(input_ids=IDS).logits
    assert (logits - theirs).abs().max() <= 1e-5
    assert (logits - load_fp32(tiny_llama)(input_ids=IDS).logits).abs().max() > 1e-2


def test_a_run_trains_it_with_the_regulariser_and_exports_what_peft_loads(tiny_llama, number_data, tmp_path):
    from peftkit.recipe import load_recipe
    from peftkit.train import train

    recipe = make_recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 4}, export={"merged": True},
                         adapter={"target_modules": TARGETS, "kasa_config": SETTINGS})
    train(load_recipe(recipe))
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["regularizer"] for r in records if "regularizer" in r][0] > 0
    with torch.no_grad():
        ours = load_adapted_model(str(tiny_llama), str(run / "adapter"), torch.device("cpu"))[0](input_ids=IDS).logits
        theirs = PeftModel.from_pretrained(load_fp32(tiny_llama), run / "adapter")(input_ids=IDS).logits
        merged = load_fp32(run / "merged")(input_ids=IDS).logits
    assert (ours - theirs).abs().max() <= 1e-5 and (merged - theirs).abs().max() <= 1e-5


@pytest.mark.parametrize(("adapter", "message"), [
    ({"kasa_config": {"beta": -1}}, "'adapter.kasa_config.beta' = -1"),
    ({"kasa_config": {}, "use_dora": True}, "adapter.kasa_config with use_dora is not supported"),
    ({"kasa_config": {}, "init": "pissa"}, "adapter.kasa_config with init is not supported"),
    ({"kasa_config": {}, "r": 32}, "'model.layers.0.self_attn.q_proj' has 32 singular values"),
])
def test_recipe_mistakes_are_refused(adapter, message, tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    recipe = make_recipe(tmp_path, tiny_llama, number_data)
    raw = yaml.safe_load(recipe.read_text())
    raw["adapter"] |= {"target_modules": TARGETS} | adapter
    recipe.write_text(yaml.safe_dump(raw))
    assert message in " ".join(cli_user_error(monkeypatch, capsys, "train", str(recipe)).split())


def test_layers_it_cannot_adapt_are_refused(tiny_llama, tiny_gpt2, tmp_path):
    from peftkit.tiny import build_tiny_model
    from tests.test_qlora import load_quantized

    with pytest.raises(PeftkitError, match="'model.embed_tokens' is an Embedding, and KaSA adapts linear layers"):
        inject_adapters(load_fp32(tiny_llama), LoraConfig(target_modules=["embed_tokens"], kasa_config={}))
    with pytest.raises(PeftkitError, match="'transformer.h.0.attn.c_attn' is a Conv1D, which peft's KaSA refuses"):
        inject_adapters(load_fp32(tiny_gpt2), LoraConfig(target_modules=["c_attn"], kasa_config={}))
    llama = tmp_path / "llama64"
    build_tiny_model(llama, arch="llama", hidden_size=64, num_layers=2, seed=0)
    with pytest.raises(PeftkitError, match="'model.layers.0.self_attn.q_proj' is a 4-bit/8-bit layer, whose weight "
                                           "cannot be truncated"):
        inject_adapters(load_quantized(llama), LoraConfig(r=4, target_modules=["q_proj"], kasa_config={}))


def test_a_resumed_run_gives_the_unbroken_run_s_bits(tiny_llama, number_data, tmp_path):
    """Killed after step 2 and resumed: the base truncated again (the same SVD, the same bits) and the singular
    values from the checkpoint give the unbroken run's adapter, bit for bit."""
    recipe = make_recipe(tmp_path, tiny_llama, number_data, eval={"base_model": False},
                         adapter={"dropout": 0.1, "kasa_config": SETTINGS},
                         training={"max_steps": 6, "batch_size": 4, "save_steps": 2, "save_total_limit": 10})
    check_resumes_to_the_same_bits(recipe, tmp_path / "run", kill_after=2, steps=6)


def test_what_shares_its_base_refuses_it_and_inspect_says_what_it_is(tiny_llama, number_data, tmp_path):
    """A KaSA adapter truncates the base weights it applies to: sharded engines (not run), named adapters (the base's
    rows and the others' share them), combining (it adds updates to the base as saved) and fusion refuse it."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from peftkit.adapters.named import load_named_model
    from peftkit.combine_inputs import read_sources
    from peftkit.distributed import check_engine
    from peftkit.inspect import inspect_adapter
    from peftkit.methods.fusion_sources import check_fusable, fused_adapters
    from peftkit.methods.fusion import FusionConfig
    from peftkit.recipe import load_recipe

    recipe = load_recipe(make_recipe(tmp_path, tiny_llama, number_data, adapter={"kasa_config": {}}))
    with pytest.raises(PeftkitError, match="kasa_config truncates each target's whole base weight by its SVD"):
        check_engine(recipe, SimpleNamespace(distributed_type=DistributedType.FSDP))
    adapter = str(_peft_adapter(tiny_llama, tmp_path / "peft"))
    with pytest.raises(PeftkitError, match="is a KaSA adapter .* load it alone"):
        load_named_model([("a", adapter)], str(tiny_llama))
    with pytest.raises(PeftkitError, match="is a KaSA adapter .* Merge it alone"):
        read_sources([adapter] * 2, False)
    with pytest.raises(PeftkitError, match="is a KaSA adapter .* truncates the base the others share"):
        check_fusable(fused_adapters(FusionConfig(method="fusion", fuse=[adapter, adapter])), "adapter.fuse")
    info = inspect_adapter(adapter)
    assert "KaSA (trained singular values, truncated base)" in info["variants"] and info["peftkit_reads"]["ok"]
    assert not info["vllm"]["accepts"] and not info["llama_cpp"]["accepts"]


def test_loraplus_trains_the_singular_values_with_b_as_peft(tiny_llama):
    """peft's create_loraplus_optimizer puts every 1-D tensor with B: lora_diag trains at lr x loraplus_lr_ratio."""
    from peftkit.recipe.schema import TrainingConfig
    from peftkit.runtime import optimizer_groups

    model = load_fp32(tiny_llama)
    inject_adapters(model, LoraConfig(r=4, target_modules=TARGETS, kasa_config={}))
    groups = optimizer_groups(TrainingConfig(lr=1e-3, loraplus_lr_ratio=16), model)
    diag = model.get_parameter("model.layers.0.self_attn.q_proj.lora_diag")
    assert next(g["lr"] for g in groups if any(p is diag for p in g["params"])) == pytest.approx(16e-3)


def test_eval_compares_it_beside_other_adapters_on_a_model_of_its_own(tiny_llama, number_data, tmp_path, monkeypatch,
                                                                       capsys):
    """`peftkit eval --adapter k=KASA --adapter l=LORA`: the KaSA adapter, which would truncate the base the others
    share, is evaluated on its own model (it was refused), with peft's loss; `--arrow` says why it cannot route it."""
    import sys

    from peftkit.cli import main
    from peftkit.eval_job import eval_job
    from peftkit.evaluate import evaluate
    from tests.conftest import save_peft_lora

    kasa = _peft_adapter(tiny_llama, tmp_path / "kasa")
    lora = save_peft_lora(tiny_llama, tmp_path / "lora", PeftLora(r=4, lora_alpha=8, target_modules=TARGETS))
    out = tmp_path / "out.json"
    argv = ["peftkit", "eval", "--model", str(tiny_llama), "--data", str(number_data["eval"]), "--adapter",
            f"k={kasa}", "--adapter", f"l={lora}"]
    monkeypatch.setattr(sys, "argv", [*argv, "--json", str(out)])
    main()
    results = json.loads(out.read_text())
    job = eval_job(None, [], str(tiny_llama), str(number_data["eval"]), None, None, None, None, None)
    for name, adapter in (("k", kasa), ("l", lora)):
        theirs = evaluate(job, PeftModel.from_pretrained(load_fp32(tiny_llama), adapter))
        assert abs(results[name]["loss"] - theirs["loss"]) <= 1e-5
    assert abs(results["base"]["loss"] - evaluate(job, load_fp32(tiny_llama))["loss"]) <= 1e-6
    err = cli_user_error(monkeypatch, capsys, *argv[1:], "--arrow", "--arrow-top-k", "1")
    assert "--arrow routes plain LoRA adapters, and 'k' sets kasa_config" in " ".join(err.split())
