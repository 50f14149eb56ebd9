"""LoRA's `trainable_token_indices` (rows of the embeddings trained, the rest frozen), against peft: peft's adapters load
with peft's logits and merge to peft's merged model, peftkit's exports load in peft with peftkit's logits, a training
step's gradients are peft's, and a run trains those rows alone. Tied heads (Qwen2, Gemma 2, GPT-2) use the trained
rows too, as in peft; Gemma 2's embeddings are scaled."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig as PeftLora
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from conftest import cli_user_error, make_recipe, unplaced
from peftkit.errors import PeftkitError
from peftkit.merge_weights import merged_model
from peftkit.adapter_base import load_adapted_model
from peftkit.recipe import load_recipe
from peftkit.tiny import build_tiny_model
from tests.conftest import load_fp32

IDS = torch.tensor([[1, 40, 41, 42, 7, 60, 61, 62], [2, 7, 7, 42, 9, 41, 3, 5]])
TOKENS = [7, 42, 61]
ROWS = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("token-models")
    for arch in ("llama", "qwen2", "gemma2", "gpt2"):
        build_tiny_model(root / arch, arch=arch, hidden_size=32, num_layers=2, seed=0)
    return {arch: root / arch for arch in ("llama", "qwen2", "gemma2", "gpt2")}


def _logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids).logits


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference relative to the logits' scale: a tied head computes the trained tokens' logits apart
    from the others (peft: with the whole matrix), the same dot products summed in another order."""
    return ((a - b).abs().max() / b.abs().max().clamp(min=1)).item()


def _peft_adapter(base: Path, out: Path, indices, targets=("q_proj",)) -> tuple[PeftModel, Path]:
    """A peft LoRA with trained token rows, its rows and B moved far from the base's (a merge must not pass
    trivially), saved by peft."""
    torch.manual_seed(0)
    model = get_peft_model(load_fp32(base), PeftLora(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=list(targets),
                                                 init_lora_weights=False, trainable_token_indices=indices))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p))
    model.eval().save_pretrained(out)
    return model, out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "gpt2"])
def test_peft_s_adapter_loads_and_merges_with_peft_s_numbers(arch, models, tmp_path):
    """Untied (Llama) and tied (Qwen2, Gemma 2 with its scaled lookup, GPT-2's Conv1D model) bases: the trained rows
    reach the lookup and, where tied, the head's logits of those tokens, as in peft; merged, peft's merged model."""
    targets = ("c_attn",) if arch == "gpt2" else ("q_proj",)
    peft_model, adapter = _peft_adapter(models[arch], tmp_path / "peft", TOKENS, targets)
    expected = _logits(peft_model)
    assert (expected - _logits(load_fp32(models[arch]))).abs().max() > 1e-2  # the rows really change the output
    model, cfg, *_ = load_adapted_model(str(models[arch]), str(adapter), torch.device("cpu"))
    assert cfg.trainable_token_indices == TOKENS
    assert _diff(_logits(model), expected) <= 1e-6
    merged = merged_model(model, cfg, torch.float32)
    reference = peft_model.merge_and_unload()
    assert _diff(_logits(merged), _logits(reference)) <= 1e-6
    tied = reference.config.tie_word_embeddings
    assert merged.config.tie_word_embeddings == tied  # the head took the same rows: still one matrix
    if tied:
        assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight


def test_the_dict_form_trains_rows_of_each_module_named(models, tmp_path):
    """{embed_tokens: ids, lm_head: other ids} on an untied model: each module its own rows, both saved."""
    indices = {"embed_tokens": [7, 42], "lm_head": [5, 61, 62]}
    peft_model, adapter = _peft_adapter(models["llama"], tmp_path / "peft", indices)
    keys = load_file(adapter / "adapter_model.safetensors")
    assert keys["base_model.model.lm_head.token_adapter.trainable_tokens_delta"].shape == (3, 32)
    model, cfg, *_ = load_adapted_model(str(models["llama"]), str(adapter), torch.device("cpu"))
    assert _diff(_logits(model), _logits(peft_model)) <= 1e-6
    merged = merged_model(model, cfg, torch.float32)
    assert _diff(_logits(merged), _logits(peft_model.merge_and_unload())) <= 1e-6


@pytest.mark.parametrize(("arch", "indices"), [
    ("qwen2", {"embed_tokens": TOKENS, "lm_head": TOKENS}),  # peft ties the head to the embeddings' rows
    ("qwen2", {"embed_tokens": TOKENS, "lm_head": [5, 61, 62]}),  # other ids: each its own rows, untied
    ("gemma2", {"model.embed_tokens": [7, 42], "lm_head": [61]}),
], ids=["same-ids", "other-ids", "gemma2-other-ids"])
def test_the_dict_form_on_a_tied_model_ties_as_peft_does(arch, indices, models, tmp_path):
    peft_model, adapter = _peft_adapter(models[arch], tmp_path / "peft", indices)
    saved = load_file(adapter / "adapter_model.safetensors")
    model, cfg, *_ = load_adapted_model(str(models[arch]), str(adapter), torch.device("cpu"))
    assert _diff(_logits(model), _logits(peft_model)) <= 1e-6
    merged = merged_model(model, cfg, torch.float32)
    assert _diff(_logits(merged), _logits(model)) <= 1e-6
    # Tied (same ids): one set of rows saved, the merged model tied; else each module's rows, the merge untied.
    # (peft's own merge of the untied case writes both into the one shared matrix.)
    same = len({tuple(ids) for ids in indices.values()}) == 1
    assert len([k for k in saved if "trainable_tokens_delta" in k]) == (1 if same else 2)
    assert merged.config.tie_word_embeddings == same


def test_lora_on_a_tied_head_beside_trained_rows_as_peft_nests_them(models, tmp_path):
    """peft's LoRA on lm_head with trainable tokens on a tied model: the head's base layer, inside the LoRA layer,
    takes the rows (peft's structure); merged, the rows and then the LoRA update land in the head's weight."""
    peft_model, adapter = _peft_adapter(models["qwen2"], tmp_path / "peft", TOKENS, ("q_proj", "lm_head"))
    model, cfg, *_ = load_adapted_model(str(models["qwen2"]), str(adapter), torch.device("cpu"))
    assert _diff(_logits(model), _logits(peft_model)) <= 1e-6
    assert _diff(_logits(merged_model(model, cfg, torch.float32)), _logits(model)) <= 1e-6


@pytest.mark.parametrize(("arch", "tokens"), [("llama", TOKENS), ("qwen2", TOKENS), ("llama", [0, 7, 42])],
                         ids=["llama", "qwen2", "padding-row"])
def test_a_training_step_s_gradients_are_peft_s(arch, tokens, models, tmp_path):
    """The same adapter in both (peft's, loaded): the loss and the gradients of the trained rows and of LoRA's
    factors agree; rows not in a batch get a zero gradient, and so does the embedding's padding row (id 0 here)."""
    peft_model, adapter = _peft_adapter(models[arch], tmp_path / "peft", tokens)
    model, _, *_ = load_adapted_model(str(models[arch]), str(adapter), torch.device("cpu"))
    model.train()
    peft_model.train()
    ids = torch.cat([IDS, torch.tensor([[1, 0, 7, 0, 42, 0, 9, 2]])])
    labels = ids.clone()
    ours, theirs = model(ids, labels=labels).loss, peft_model(ids, labels=labels).loss
    ours.backward()
    theirs.backward()
    assert abs(ours.item() - theirs.item()) <= 1e-6 * theirs.item()
    peft_grads = {n.replace(".default", ""): p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    our_grads = {f"base_model.model.{n}": p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert our_grads.keys() == peft_grads.keys()
    for name, grad in our_grads.items():
        assert (grad - peft_grads[name]).abs().max() <= 1e-5 * peft_grads[name].abs().max(), name
    row_grad = our_grads[ROWS]
    trained = [i for i, t in enumerate(tokens) if t != 0]
    assert row_grad[trained].abs().sum(1).gt(0).all()  # every trained token is in the batch (and, tied, in every logit)
    if 0 in tokens:
        assert row_grad[tokens.index(0)].abs().max() == 0
    if arch == "llama":  # untied: a token that is not in the batch has no gradient
        absent = load_adapted_model(str(models[arch]), str(adapter), torch.device("cpu"))[0]
        absent.train()(torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss.backward()
        assert absent.get_parameter(ROWS.removeprefix("base_model.model.")).grad.abs().max() == 0


@pytest.mark.parametrize(("arch", "adapter"), [("llama", {}), ("qwen2", {}), ("qwen2", {"use_dora": True}),
                                               ("llama", {"init": "pissa"})], ids=["llama", "qwen2", "dora", "pissa"])
def test_a_run_trains_the_rows_and_peft_loads_the_export(arch, adapter, models, number_data, tmp_path):
    """`peftkit train` with trainable_token_indices: only those rows move (the rest of the embedding stays the base's,
    in the merged export too), the adapter_config.json says them, and peft loads the adapter with peftkit's logits
    (with DoRA, and with PiSSA, whose export is converted for the original base)."""
    from peftkit.train import train

    tok_ids = [76, 85, 86]  # "e", "n", "o": in every row of the number data ("one", "seven", ...)
    recipe = make_recipe(tmp_path, models[arch], number_data, adapter={"target_modules": ["q_proj"],
                                                                       "trainable_token_indices": tok_ids} | adapter,
                         export={"merged": True})
    train(load_recipe(recipe), overwrite=True)
    run = tmp_path / "run"
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == tok_ids
    rows = load_file(run / "adapter" / "adapter_model.safetensors")[ROWS]
    base = load_fp32(models[arch])
    start = base.get_input_embeddings().weight.detach()[tok_ids]
    assert (rows - start).abs().max() > 1e-3  # trained
    ours = load_adapted_model(str(models[arch]), str(run / "adapter"), torch.device("cpu"))[0]
    peft_model = PeftModel.from_pretrained(load_fp32(models[arch]), run / "adapter").eval()
    assert _diff(_logits(ours), _logits(peft_model)) <= 1e-6
    merged = load_fp32(run / "merged")
    others = [i for i in range(base.config.vocab_size) if i not in tok_ids]
    assert torch.equal(merged.get_input_embeddings().weight[others], base.get_input_embeddings().weight[others])
    assert torch.equal(merged.get_input_embeddings().weight[tok_ids], rows)
    assert _diff(_logits(merged), _logits(ours)) <= 1e-6


def _cfg(**adapter):
    from pydantic import TypeAdapter

    import peftkit.methods

    return TypeAdapter(peftkit.methods.AdapterConfig).validate_python({"r": 2, "target_modules": ["q_proj"]} | adapter)


@pytest.mark.parametrize(("adapter", "message"), [
    ({"trainable_token_indices": [7, 500]}, "token id 500 is past the 102 rows of 'model.embed_tokens'"),
    ({"trainable_token_indices": {"embed_token": [7]}}, "'embed_token' names no module of this model"),
    ({"trainable_token_indices": [7], "modules_to_save": ["embed_tokens"]}, "is in modules_to_save too"),
    ({"trainable_token_indices": [7], "target_modules": ["embed_tokens", "q_proj"]}, "not an embedding or a plain linear"),
])
def test_settings_that_cannot_apply_are_refused(adapter, message, models):
    from peftkit.adapters import inject_adapters

    with pytest.raises(PeftkitError, match=message.replace("(", r"\(").replace(")", r"\)")):
        inject_adapters(load_fp32(models["llama"]), _cfg(**adapter))


def test_the_recipe_refuses_repeated_or_empty_ids(monkeypatch, capsys, tiny_llama, number_data, tmp_path):
    recipe = make_recipe(tmp_path, tiny_llama, number_data, adapter={"trainable_token_indices": [7, 9, 7]})
    err = cli_user_error(monkeypatch, capsys, "train", str(recipe))
    assert "adapter.trainable_token_indices" in err and "token ids given twice: [7]" in err
    recipe = make_recipe(tmp_path, tiny_llama, number_data, adapter={"trainable_token_indices": {"lm_head": []}})
    assert "the list of token ids for 'lm_head' is empty" in cli_user_error(monkeypatch, capsys, "train", str(recipe))
    recipe = make_recipe(tmp_path, tiny_llama, number_data, adapter={"trainable_token_indices": []})
    assert "adapter.trainable_token_indices" in (err := cli_user_error(monkeypatch, capsys, "train", str(recipe)))
    assert "is empty; give the token ids" in err


def test_combining_fusing_and_naming_refuse_it(models, tmp_path):
    from peftkit.adapters.named import load_named_model
    from peftkit.combine_inputs import read_sources

    _, adapter = _peft_adapter(models["llama"], tmp_path / "peft", TOKENS)
    with pytest.raises(PeftkitError, match="trains rows of the embeddings"):
        load_named_model([("a", str(adapter))], str(models["llama"]))
    with pytest.raises(PeftkitError, match="trains rows of the embeddings"):
        read_sources([str(adapter), str(adapter)], False)


def test_inspect_shows_the_rows_and_what_vllm_makes_of_them(models, tmp_path):
    from peftkit.inspect import inspect_adapter

    _, adapter = _peft_adapter(models["qwen2"], tmp_path / "peft", TOKENS)
    info = inspect_adapter(adapter)
    assert info["trainable_tokens"] == {"model.embed_tokens": 3}
    assert info["peftkit_reads"]["ok"]
    # vLLM's loader stops at the rows with the error vllm-project/vllm#36501 quotes; #55796 (open) would read them.
    # The reason said only that the loader 'reads LoRA's tensors, not trained embedding rows'
    assert ("trainable_token_indices: vLLM's loader stops at its trained rows ('...token_adapter.trainable_tokens_delta "
            "is unsupported LoRA weight'); vllm-project/vllm#55796, open in September 2026, would read them"
            ) in info["vllm"]["reasons"]
    assert not any("modules_to_save" in r for r in info["vllm"]["reasons"])


def test_a_resumed_qlora_run_gives_the_unbroken_run_s_bits(tiny_llama, number_data, tmp_path):
    """Over a 4-bit base with the 8-bit paged optimizer (the rows are an fp32 tensor beside the 4-bit layers): the
    checkpoint carries the rows and their optimizer state, and a resumed run exports the unbroken run's bytes."""
    import shutil

    from peftkit.train import train

    recipe = make_recipe(tmp_path, tiny_llama, number_data, eval={"base_model": False},
                         adapter={"trainable_token_indices": [76, 85, 86]},
                         quantization={"method": "nf4", "compute_dtype": "float32"},
                         training={"max_steps": 4, "save_steps": 2, "optimizer": "paged_adamw_8bit"})
    train(load_recipe(recipe), show_summary=False)
    adapter = tmp_path / "run" / "adapter" / "adapter_model.safetensors"
    straight = adapter.read_bytes()
    assert ROWS in load_file(adapter)
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-00000004")
    train(load_recipe(recipe), resume=True, show_summary=False)
    assert adapter.read_bytes() == straight


# ------------------------------------------------------------------------ method: trainable_tokens (peft's alone)


def test_the_method_on_a_tied_model_saves_the_rows_under_both_names_as_peft(models, tmp_path):
    """TRAINABLE_TOKENS on Qwen2: the tied head holds the embeddings' rows (one tensor trained), saved under both
    names as peft saves them, with the embeddings alone as target_modules; peft loads the export with our logits."""
    from peftkit.methods.trainable_tokens import TrainableTokensConfig
    from tests.conftest import save_random_adapter

    cfg = TrainableTokensConfig(token_indices=TOKENS)
    adapter = save_random_adapter(models["qwen2"], cfg, tmp_path / "ours", seed=1)
    saved = load_file(adapter / "adapter_model.safetensors")
    assert set(saved) == {"base_model.model.model.embed_tokens.trainable_tokens_delta",
                          "base_model.model.lm_head.trainable_tokens_delta"}
    assert torch.equal(*saved.values())
    assert json.loads((adapter / "adapter_config.json").read_text())["target_modules"] == ["model.embed_tokens"]
    model, *_ = load_adapted_model(str(models["qwen2"]), str(adapter), torch.device("cpu"))
    trained = [p for p in model.parameters() if p.requires_grad]
    assert len(trained) == 1 and trained[0].shape == (3, 32)
    peft_model = PeftModel.from_pretrained(load_fp32(models["qwen2"]), adapter).eval()
    assert _diff(_logits(model), _logits(peft_model)) <= 1e-6


@pytest.mark.parametrize(("adapter", "message"), [
    ({"token_indices": [7, 500]}, "adapter.token_indices: token id 500 is past the 102 rows of 'model.embed_tokens'"),
    ({"token_indices": [7], "target_modules": ["q_proj"]}, "'model.layers.0.self_attn.q_proj' is a Linear"),
])
def test_the_method_refuses_what_cannot_apply(adapter, message, models):
    from peftkit.adapters import inject_adapters
    from peftkit.methods.trainable_tokens import TrainableTokensConfig

    cfg = TrainableTokensConfig(**adapter)
    with pytest.raises(PeftkitError, match=message.replace("(", r"\(").replace(")", r"\)")):
        inject_adapters(load_fp32(models["llama"]), cfg)


def test_the_method_s_recipe_mistakes(monkeypatch, capsys, tiny_llama, number_data, tmp_path):
    recipe = make_recipe(tmp_path, tiny_llama, number_data, adapter={"method": "trainable_tokens"})
    assert "adapter.token_indices" in cli_user_error(monkeypatch, capsys, "train", str(recipe))
    recipe = make_recipe(tmp_path, tiny_llama, number_data,
                         adapter={"method": "trainable_tokens", "token_indices": [7], "modules_to_save": ["lm_head"]})
    assert "peft's method has no modules_to_save" in cli_user_error(monkeypatch, capsys, "train", str(recipe))


def test_combining_the_method_s_adapters_is_refused(models, tmp_path):
    from peftkit.combine_inputs import read_sources
    from peftkit.methods.trainable_tokens import TrainableTokensConfig
    from tests.conftest import save_random_adapter

    adapter = save_random_adapter(models["llama"], TrainableTokensConfig(token_indices=TOKENS), tmp_path / "a", 1)
    with pytest.raises(PeftkitError, match="trains rows of the embeddings"):
        read_sources([str(adapter), str(adapter)], False)


def test_the_method_naming_a_tied_head_too_ties_it(models):
    """target_modules [embed_tokens, lm_head] on Qwen2: the head takes the embeddings' rows in place of its own (one
    tensor trains), so the model is the default one's (peft 0.21 fails on this setting)."""
    from peftkit.adapters import adapter_layers, inject_adapters
    from peftkit.methods.trainable_tokens import TrainableTokensConfig

    models_ = {}
    for name, targets in (("named", ["embed_tokens", "lm_head"]), ("default", None)):
        model = load_fp32(models["qwen2"])
        torch.manual_seed(0)
        inject_adapters(model, TrainableTokensConfig(token_indices=TOKENS, target_modules=targets))
        with torch.no_grad():
            next(p for p in model.parameters() if p.requires_grad).add_(1.0)
        models_[name] = model
    named = models_["named"]
    assert len([p for p in named.parameters() if p.requires_grad]) == 1 and len(adapter_layers(named)) == 2
    assert torch.equal(_logits(named), _logits(models_["default"]))


@pytest.mark.parametrize("order", [1, -1], ids=["embeddings-first", "head-first"])
def test_merging_and_unmerging_tied_layers_in_place_restores_the_base(order, models):
    """An embedding and its tied head are two layers over one weight: merged and unmerged in either order, the base's
    rows come back, and the merged model gives the adapted one's logits."""
    from peftkit.adapters import adapter_layers, inject_adapters
    from peftkit.methods.trainable_tokens import TrainableTokensConfig

    model, base = load_fp32(models["qwen2"]), load_fp32(models["qwen2"])
    inject_adapters(model, TrainableTokensConfig(token_indices=TOKENS))
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).add_(1.0)
    adapted = _logits(model)
    layers = list(adapter_layers(model).values())[::order]
    for layer in layers:
        layer.merge()
    assert _diff(_logits(model), adapted) <= 1e-6
    for layer in layers[::order]:
        layer.unmerge()
    assert torch.equal(model.get_input_embeddings().base_layer.weight, base.get_input_embeddings().weight)
    assert _diff(_logits(model), adapted) <= 1e-6


def test_named_adapters_refuse_the_method_on_a_tied_model(models, tmp_path):
    from peftkit.adapters.named import load_named_model
    from peftkit.methods.trainable_tokens import TrainableTokensConfig
    from tests.conftest import save_random_adapter

    adapter = save_random_adapter(models["qwen2"], TrainableTokensConfig(token_indices=TOKENS), tmp_path / "a", 1)
    with pytest.raises(PeftkitError, match="whose weight the output head shares: one model cannot hold those"):
        load_named_model([("a", str(adapter))], str(models["qwen2"]))


@pytest.mark.parametrize(("adapter", "key"), [
    ({"method": "trainable_tokens", "token_indices": [5], "target_modules": ["embed_positions"]},
     "adapter.target_modules"),
    ({"r": 4, "alpha": 8, "target_modules": ["embed_positions"]}, "adapter.target_modules"),
    ({"r": 4, "alpha": 8, "target_modules": ["q_proj"], "trainable_token_indices": {"embed_positions": [5]}},
     "adapter.trainable_token_indices"),
])
def test_an_embedding_of_positions_is_refused_by_validate(adapter, key, number_data, tmp_path, monkeypatch, capsys):
    """OPT's learned positions (an nn.Embedding whose forward takes the attention mask and positions) as a target of
    trainable tokens or LoRA, or in trainable_token_indices, were accepted by validate, and train's first forward
    failed with a traceback ("TokenLayer.forward() got an unexpected keyword argument 'position_ids'"). Refused by
    validate, naming the key and the module."""
    import yaml

    from peftkit.tiny import build_tiny_model

    build_tiny_model(tmp_path / "opt", arch="opt", hidden_size=32, num_layers=1, seed=0)
    recipe = make_recipe(tmp_path / "r", tmp_path / "opt", number_data)
    raw = yaml.safe_load(recipe.read_text())
    recipe.write_text(yaml.safe_dump({**raw, "adapter": adapter}, sort_keys=False))
    said = unplaced(" ".join(cli_user_error(monkeypatch, capsys, "validate", str(recipe)).split()), recipe)
    assert f"error: {key}: 'model.decoder.embed_positions' is a OPTLearnedPositionalEmbedding, whose forward takes " \
           "(attention_mask, cache_length, position_ids), not token ids to look up (learned positions), so no adapter " \
           "can wrap it" in said, said


@pytest.mark.parametrize("adapter", [
    {"r": 4, "alpha": 8, "target_modules": ["query", "value"], "trainable_token_indices": {"token_type_embeddings": [1, 5]}},
    {"method": "trainable_tokens", "target_modules": ["token_type_embeddings"], "token_indices": [1, 5]},
])
def test_ids_past_another_embedding_s_rows_are_not_told_to_resize(adapter, tmp_path, monkeypatch, capsys):
    """BERT's token_type_embeddings have 2 rows, which are no token's: an id past them was told "Resize the embeddings
    first", which model.add_tokens does to the word embeddings (and an output head) only. validate and train say so,
    in the same words; the word embeddings' rows keep the advice."""
    import yaml

    from peftkit.tiny import build_tiny_encoder, sentiment_rows, write_jsonl

    build_tiny_encoder(tmp_path / "bert", hidden_size=32, num_layers=1, seed=0)
    write_jsonl(tmp_path / "train.jsonl", sentiment_rows(16, seed=3))
    capsys.readouterr()
    recipe = make_recipe(tmp_path / "r", tmp_path / "bert", {"train": tmp_path / "train.jsonl", "eval": None},
                         data={"format": "classification", "max_length": 64})
    raw = yaml.safe_load(recipe.read_text())
    recipe.write_text(yaml.safe_dump(raw | {"model": raw["model"] | {"task": "sequence_classification"},
                                            "adapter": adapter}, sort_keys=False))
    key = "adapter.token_indices" if "token_indices" in adapter else "adapter.trainable_token_indices"
    expected = (f"error: {key}: token id 5 is past the 2 rows of 'bert.embeddings.token_type_embeddings'. model.add_tokens "
                "resizes the input embeddings and the output head only: this embedding's rows are not the tokenizer's "
                "ids, and stay 2. Give ids below 2, or name the input embeddings.")
    for command in ("validate", "train"):
        said = unplaced(" ".join(cli_user_error(monkeypatch, capsys, command, str(recipe)).split()), recipe)
        assert said == expected, said
    words = ({"target_modules": None, "token_indices": [1, 500]} if "token_indices" in adapter else
             {"trainable_token_indices": [1, 500]})  # the word embeddings
    recipe.write_text(yaml.safe_dump(raw | {"model": raw["model"] | {"task": "sequence_classification"},
                                            "adapter": adapter | words}, sort_keys=False))
    said = " ".join(cli_user_error(monkeypatch, capsys, "validate", str(recipe)).split())
    assert said.endswith("rows of 'bert.embeddings.word_embeddings'. Resize the embeddings first (the tokenizer's new tokens "
                         "need rows)."), said


def test_a_tied_head_trained_whole_beside_rows_of_the_embeddings_is_refused(models):
    """Rows of Qwen2's embeddings trained with its tied lm_head in modules_to_save: peft 0.21's own model of it fails in
    forward and could not load peftkit's export (a KeyError), so a recipe is refused, saying what to do. Untied (Llama)
    the two train together, as in peft."""
    from peftkit.adapters import inject_adapters

    settings = {"trainable_token_indices": [7], "modules_to_save": ["lm_head"]}
    with pytest.raises(PeftkitError) as refused:
        inject_adapters(load_fp32(models["qwen2"]), _cfg(**settings))
    assert str(refused.value) == (
        "adapter.trainable_token_indices trains rows of the input embeddings, and adapter.modules_to_save trains "
        "'lm_head', the output head tied to them, whole: peft 0.21 can neither run nor load that adapter (its trained "
        "rows wrap the head's copy). Leave 'lm_head' out of modules_to_save (the tied head then uses the trained rows, "
        "as in peft), or train the embeddings whole too (modules_to_save) without trainable_token_indices.")
    theirs = get_peft_model(load_fp32(models["qwen2"]), PeftLora(r=4, target_modules=["q_proj"], **settings))
    with pytest.raises(ValueError, match="TrainableTokensLayer wraps an unknown layer type"):
        theirs(IDS)
    assert inject_adapters(load_fp32(models["llama"]), _cfg(**settings))
