"""`model.add_tokens`: ChatML's markers added to a base model's tokenizer, its embeddings resized, the new rows trained
(LoRA's trainable_token_indices), and the adapter read back by eval, merge and peft with the same numbers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoTokenizer

from peftkit.adapter_base import load_adapted_model
from peftkit.tiny import build_tiny_model, write_jsonl
from tests.conftest import check_resumes_to_the_same_bits, cli_user_error, load_fp32, make_recipe, save_peft_lora

MARKERS = ["<|im_start|>", "<|im_end|>"]
CONVERSATIONS = [[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
                 [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]
# rows 102 and 103 are the new markers' (the character tokenizer has 102 tokens)
IDS = torch.tensor([[1, 102, 40, 41, 103, 7, 102, 60], [2, 7, 103, 42, 9, 41, 3, 5]])


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """Tiny base models without a chat template: a Llama (output head untied) and a Qwen2 (tied)."""
    root = tmp_path_factory.mktemp("new-token-bases")
    for arch in ("llama", "qwen2"):
        build_tiny_model(root / arch, arch=arch, hidden_size=32, num_layers=2, seed=0)
        for file in (root / arch).glob("chat_template.*"):
            file.unlink()
        config = json.loads((root / arch / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (root / arch / "tokenizer_config.json").write_text(json.dumps(config))
    return {arch: root / arch for arch in ("llama", "qwen2")}


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("new-token-chats")
    write_jsonl(root / "train.jsonl", [{"messages": CONVERSATIONS[i % 2]} for i in range(8)])
    write_jsonl(root / "eval.jsonl", [{"messages": CONVERSATIONS[i % 2]} for i in range(4)])
    return {"train": root / "train.jsonl", "eval": root / "eval.jsonl"}


def _recipe(tmp_path: Path, base: Path, chats: dict[str, Path], tokens=MARKERS, adapter=None, **sections) -> Path:
    """A chat recipe with ChatML on `base` and model.add_tokens `tokens`; `adapter` with a `method` replaces LoRA's."""
    import yaml

    lora = {"target_modules": ["q_proj", "v_proj"], **(adapter or {})}
    recipe = make_recipe(tmp_path, base, chats, adapter=lora, **sections,
                         data={"format": "chat", "chat_template": "chatml", "max_length": 128})
    text = yaml.safe_load(recipe.read_text())
    text["model"]["add_tokens"] = tokens
    if adapter and adapter.get("method"):  # (the LoRA keys make_recipe writes are not another method's)
        text["adapter"] = adapter
    recipe.write_text(yaml.safe_dump(text, sort_keys=False))
    return recipe


def _train(recipe: Path, monkeypatch, capsys, *flags: str) -> str:
    from peftkit.cli import main

    monkeypatch.setattr("sys.argv", ["peftkit", "train", str(recipe), *flags])
    main()
    return capsys.readouterr().out


def _logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_run_adds_the_markers_trains_their_rows_and_peft_loads_it(arch, bases, chats, tmp_path, monkeypatch, capsys):
    """The markers get ids 102 and 103 and rows of their own, trained (the head's too where it is not tied); the
    adapter records them; peftkit's eval, its merged model and peft on a base resized to the adapter's tokenizer give
    the same logits on text with the markers; no warning that the template's marker is no token."""
    out = _train(_recipe(tmp_path, bases[arch], chats, export={"merged": True}), monkeypatch, capsys)
    assert ("model.add_tokens: 2 new special tokens (<|im_start|> = 102, <|im_end|> = 103), their embedding rows "
            "trained; the embeddings resized from 102 to 104 rows") in out
    assert "not a token of this" not in out + capsys.readouterr().err
    adapter = tmp_path / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    untied = {"lm_head": [102, 103], "model.embed_tokens": [102, 103]}
    assert config["trainable_token_indices"] == (untied if arch == "llama" else [102, 103])
    assert json.loads((adapter / "peftkit.json").read_text())["added_tokens"] == MARKERS
    rows = load_file(adapter / "adapter_model.safetensors")
    embedded = rows["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    assert embedded.shape == (2, 32) and ("base_model.model.lm_head.token_adapter.trainable_tokens_delta" in rows) == (
        arch == "llama")

    ours, _, tok, *_ = load_adapted_model(None, str(adapter), torch.device("cpu"))
    assert len(tok) == 104 and tok.convert_tokens_to_ids(MARKERS) == [102, 103]
    assert tok("x<|im_end|>")["input_ids"][-1] == 103 and tok.decode([95, 103], skip_special_tokens=True) == "x"
    assert torch.equal(ours.get_input_embeddings().weight[[102, 103]], embedded)  # trained from the resized rows
    from peft import PeftModel

    peft_tok = AutoTokenizer.from_pretrained(adapter)  # the tokenizer the adapter directory holds
    base = load_fp32(bases[arch])
    base.resize_token_embeddings(len(peft_tok))
    theirs = PeftModel.from_pretrained(base, adapter)
    assert (_logits(ours) - _logits(theirs)).abs().max() <= 1e-5
    merged = load_fp32(tmp_path / "run" / "merged")
    # transformers' and vLLM's generate stop at the end of a turn, as peftkit's does
    assert json.loads((tmp_path / "run" / "merged" / "generation_config.json").read_text())["eos_token_id"] == [2, 103]
    assert merged.config.vocab_size == 104 and (_logits(ours) - _logits(merged)).abs().max() <= 1e-5
    merged_tok = AutoTokenizer.from_pretrained(tmp_path / "run" / "merged")
    assert merged_tok("x<|im_end|>")["input_ids"] == tok("x<|im_end|>")["input_ids"]
    from peftkit.cli import main

    monkeypatch.setattr("sys.argv", ["peftkit", "inspect", str(adapter)])
    main()
    assert "added tokens   <|im_start|>, <|im_end|> (model.add_tokens)" in capsys.readouterr().out


def test_the_new_rows_train_from_the_resized_ones(bases, chats, tmp_path, monkeypatch, capsys):
    """The rows start as transformers' mean resizing draws them (seeded: the same on every load of the base) and
    move; the base's other rows stay its own."""
    _train(_recipe(tmp_path, bases["llama"], chats), monkeypatch, capsys)
    resized = load_fp32(bases["llama"])
    torch.manual_seed(0)
    resized.resize_token_embeddings(104)
    trained = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    embedded = trained["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    head = trained["base_model.model.lm_head.token_adapter.trainable_tokens_delta"]
    assert (embedded - resized.get_input_embeddings().weight[102:]).abs().max() > 1e-3
    assert (head - resized.lm_head.weight[102:]).abs().max() > 1e-3
    ours = load_adapted_model(None, str(tmp_path / "run" / "adapter"), torch.device("cpu"))[0]
    base_rows = ours.get_input_embeddings().token_adapter.base_layer.weight
    assert torch.equal(base_rows[:102], load_fp32(bases["llama"]).get_input_embeddings().weight)
    assert torch.equal(base_rows[102:], resized.get_input_embeddings().weight[102:])  # drawn alike on every load


def test_eval_of_the_run_gives_its_final_eval_loss(bases, chats, tmp_path, monkeypatch, capsys):
    """`peftkit eval RUN_DIR` tokenizes with the added markers (split into characters, the loss would differ)."""
    from peftkit.cli import main

    _train(_recipe(tmp_path, bases["llama"], chats), monkeypatch, capsys)
    final = json.loads((tmp_path / "run" / "manifest.json").read_text())["metrics"]["eval_loss"]
    monkeypatch.setattr("sys.argv", ["peftkit", "eval", str(tmp_path / "run")])
    main()
    assert f"loss {final:.4f}" in capsys.readouterr().out


def test_a_killed_run_resumes_to_the_same_bits(bases, chats, tmp_path):
    recipe = _recipe(tmp_path, bases["llama"], chats, training={"max_steps": 4, "save_steps": 2})
    check_resumes_to_the_same_bits(recipe, tmp_path / "run", kill_after=2, steps=4)


def test_a_token_the_tokenizer_has_is_left_and_one_past_the_rows_trains(bases, chats, tmp_path, monkeypatch, capsys):
    """`</s>` is the tokenizer's already: a note, no row. A marker added to the tokenizer after the model was saved
    (which has no row: an error before) gets its row and trains."""
    base = tmp_path / "base"
    shutil.copytree(bases["llama"], base)
    tok = AutoTokenizer.from_pretrained(base)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tok.save_pretrained(base)
    out = _train(_recipe(tmp_path, base, chats, tokens=["</s>", *MARKERS]), monkeypatch, capsys)
    assert "model.add_tokens: 2 new special tokens (<|im_start|> = 102, <|im_end|> = 103)" in out
    assert "note: model.add_tokens: </s> already in the tokenizer: left as it is, its row the model's own" in out
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["trainable_token_indices"]["model.embed_tokens"] == [102, 103]


def test_modules_to_save_trains_the_resized_embeddings_whole(bases, chats, tmp_path, monkeypatch, capsys):
    """Embeddings and head in modules_to_save: no rows of their own; the saved matrices have the new rows and load."""
    adapter = {"modules_to_save": ["embed_tokens", "lm_head"]}
    _train(_recipe(tmp_path, bases["llama"], chats, adapter=adapter), monkeypatch, capsys)
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert not config.get("trainable_token_indices")
    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert saved["base_model.model.model.embed_tokens.weight"].shape == (104, 32)
    ours = load_adapted_model(None, str(tmp_path / "run" / "adapter"), torch.device("cpu"))[0]
    assert torch.equal(ours.get_input_embeddings().modules_to_save.weight
                       if hasattr(ours.get_input_embeddings(), "modules_to_save")
                       else ours.get_input_embeddings().weight, saved["base_model.model.model.embed_tokens.weight"])


def test_the_embeddings_in_modules_to_save_leave_the_untied_head_s_rows_to_train(bases, chats, tmp_path, monkeypatch,
                                                                                 capsys):
    """modules_to_save: [embed_tokens] on an untied model: the embeddings train whole, the head's new rows as
    trainable_token_indices {lm_head: ids} (the list form named the embeddings, refused as in modules_to_save too)."""
    adapter = {"modules_to_save": ["embed_tokens"]}
    _train(_recipe(tmp_path, bases["llama"], chats, adapter=adapter, training={"max_steps": 2}), monkeypatch, capsys)
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == {"lm_head": [102, 103]}
    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert saved["base_model.model.model.embed_tokens.weight"].shape == (104, 32)
    assert saved["base_model.model.lm_head.token_adapter.trainable_tokens_delta"].shape == (2, 32)

def test_a_tied_head_named_with_ids_of_its_own_trains_the_new_rows_too(bases, chats, tmp_path, monkeypatch, capsys):
    """Qwen2's head is tied; trainable_token_indices {embed_tokens: [5], lm_head: [6]} gives it rows of its own
    (peft's), and the new tokens' rows must be among them (left out, the markers' head rows stayed the resized ones)."""
    adapter = {"trainable_token_indices": {"embed_tokens": [5], "lm_head": [6]}}
    _train(_recipe(tmp_path, bases["qwen2"], chats, adapter=adapter, training={"max_steps": 2}), monkeypatch, capsys)
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == {"lm_head": [6, 102, 103], "model.embed_tokens": [5, 102, 103]}

def test_a_run_starts_from_an_adapter_that_added_them(bases, chats, tmp_path, monkeypatch, capsys):
    """adapter.init_from a run that added the markers: its trainable_token_indices name ids 102, 103, past the base's
    102 rows, which the memory estimate's model (built before train resized the embeddings) refused."""
    first = tmp_path / "first"
    _train(_recipe(first, bases["llama"], chats, training={"max_steps": 2}), monkeypatch, capsys)
    adapter = {"method": "lora", "init_from": str(first / "run" / "adapter")}
    recipe = _recipe(tmp_path, bases["llama"], chats, adapter=adapter, training={"max_steps": 2})
    out = _train(recipe, monkeypatch, capsys)
    assert "Memory estimate: weights 98.1 KiB + adapter 4.0 KiB" in out  # 896 LoRA + 2 x 2 rows of 32, fp32
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == {"lm_head": [102, 103], "model.embed_tokens": [102, 103]}

def test_init_from_needs_the_tokens_it_was_trained_with(bases, chats, tmp_path, monkeypatch, capsys):
    """Its rows are by id: model.add_tokens left out (the ids past the rows: "Resize the embeddings first"), in
    another order (the markers' rows swapped, silently) or added to an adapter without rows ("was it trained on
    another base model?") is said at the recipe's line."""
    first = tmp_path / "first"
    _train(_recipe(first, bases["llama"], chats, training={"max_steps": 1}), monkeypatch, capsys)
    trained = first / "run" / "adapter"
    plain = tmp_path / "plain"
    shutil.copytree(trained, plain)
    meta = json.loads((plain / "peftkit.json").read_text())
    (plain / "peftkit.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "added_tokens"}))
    for tokens, adapter, said in [
        ([], trained, f"recipe.yaml:4: adapter.init_from {trained} was trained with model.add_tokens: "
                      "['<|im_start|>', '<|im_end|>'], whose rows it holds by id, and this recipe's model.add_tokens "
                      "is empty, which leaves out <|im_start|>, <|im_end|>, whose rows the adapter trained. Set "
                      "model.add_tokens: ['<|im_start|>', '<|im_end|>'] (the adapter's tokens first, in its order"),
        (MARKERS[::-1], trained, "and this recipe's model.add_tokens is ['<|im_end|>', '<|im_start|>'], which lists "
                                 "them in another order. Set model.add_tokens: ['<|im_start|>', '<|im_end|>']"),
        (MARKERS, plain, f"adapter.init_from {plain} was trained without new tokens and holds no rows for them"),
    ]:
        recipe = _recipe(tmp_path, bases["llama"], chats, tokens=tokens, adapter={"method": "lora",
                                                                                "init_from": str(adapter)})
        assert said in " ".join(cli_user_error(monkeypatch, capsys, "validate", str(recipe)).split())

def test_init_from_peft_s_adapter_with_new_tokens_needs_them_too(bases, chats, tmp_path, monkeypatch, capsys):
    """adapter.init_from an adapter peft trained with new tokens (the tokenizer beside it, the base resized) with
    model.add_tokens left out stopped at the memory estimate with "adapter.trainable_token_indices: token id 102 is
    past the 102 rows", a key the recipe does not set: only peftkit's adapters (peftkit.json) were checked. A peft
    adapter whose tokenizer adds a token within the base's spare rows (a pad token, no resize) trains as before."""
    from peft import LoraConfig, get_peft_model

    tok = AutoTokenizer.from_pretrained(bases["llama"])
    tok.add_special_tokens({"additional_special_tokens": MARKERS})
    base = load_fp32(bases["llama"])
    base.resize_token_embeddings(len(tok))
    config = LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [102, 103]})
    adapter = tmp_path / "peft-adapter"
    get_peft_model(base, config).save_pretrained(adapter)
    tok.save_pretrained(adapter)
    recipe = _recipe(tmp_path, bases["llama"], chats, tokens=[], adapter={"method": "lora", "init_from": str(adapter)})
    assert (f"adapter.init_from {adapter} was trained with model.add_tokens: ['<|im_start|>', '<|im_end|>'], whose "
            "rows it holds by id, and this recipe's model.add_tokens is empty") in " ".join(
        cli_user_error(monkeypatch, capsys, "validate", str(recipe)).split())
    padded = tmp_path / "padded"
    build_tiny_model(padded, arch="llama", hidden_size=32, num_layers=2, seed=0, vocab_size=110)
    adapter = save_peft_lora(padded, tmp_path / "pad-adapter", LoraConfig(r=4, target_modules=["q_proj"]))
    tok = AutoTokenizer.from_pretrained(padded)
    tok.add_special_tokens({"pad_token": "<pad>"})
    tok.save_pretrained(adapter)
    recipe = _recipe(tmp_path, padded, chats, tokens=[], adapter={"method": "lora", "init_from": str(adapter)},
                     training={"max_steps": 1})
    _train(recipe, monkeypatch, capsys)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_a_new_token_in_the_data_is_meant_but_the_template_s_marker_is_said(bases, tmp_path, monkeypatch, capsys):
    """A tool-call marker added to be written in the answers is not warned of as "the text of a special token" (every
    such row was, telling the user to remove it); <|im_end|> in an answer still is (it ends the turn there)."""
    from peftkit.cli import main

    for name, answer, warned in [("tool", "<tool_call>x</tool_call>", False), ("end", "<tool_call>x<|im_end|>", True)]:
        rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": answer}]}] * 2
        write_jsonl(tmp_path / name / "rows.jsonl", rows)
        files = {"train": tmp_path / name / "rows.jsonl", "eval": tmp_path / name / "rows.jsonl"}
        recipe = _recipe(tmp_path / name, bases["llama"], files, tokens=[*MARKERS, "<tool_call>", "</tool_call>"])
        monkeypatch.setattr("sys.argv", ["peftkit", "preview", str(recipe)])
        main()
        said = capsys.readouterr()
        assert ("rows hold the text of a special token" in said.out + said.err) == warned
        assert not warned or "'<|im_end|>'" in said.out + said.err

def test_a_cached_read_of_the_data_is_not_served_to_a_recipe_that_means_another_token(bases, tmp_path):
    """A token the base's tokenizer has already (a special <tool_call>) listed in model.add_tokens is the data's to
    write, and not warned of; left out, it is. The tokenizer is the same file for file either way, and the
    tokenized-data cache keyed on its files: the second recipe was served the first's counts, warning or none."""
    from peftkit.data import load_examples
    from peftkit.modeling import load_tokenizer
    from peftkit.recipe import DataConfig, ModelConfig

    base = shutil.copytree(bases["llama"], tmp_path / "base")
    tok = AutoTokenizer.from_pretrained(base)
    tok.add_tokens(["<tool_call>"], special_tokens=True)
    tok.save_pretrained(base)
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<tool_call>x"}]}] * 2
    write_jsonl(tmp_path / "rows.jsonl", rows)
    cfg = DataConfig(train=str(tmp_path / "rows.jsonl"), format="chat", chat_template="chatml")
    for tokens, warned in [([*MARKERS, "<tool_call>"], False), (MARKERS, True), ([*MARKERS, "<tool_call>"], False)]:
        tok = load_tokenizer(ModelConfig(name_or_path=str(base), add_tokens=tokens), cfg.chat_template)
        _, stats = load_examples(tok, cfg.train, "train", cfg)
        assert bool(stats.get("special_text_first")) == warned, (tokens, stats)


def test_one_new_token_is_said_in_the_singular():
    from peftkit.new_tokens import describe

    assert describe(["<x>"], [102], [], (102, 103)) == [
        "model.add_tokens: 1 new special token (<x> = 102), its embedding row trained; the embeddings resized from 102 "
        "to 103 rows"]

def test_validate_counts_the_new_rows_as_train_does(bases, chats, tmp_path, monkeypatch, capsys):
    from peftkit.cli import main

    recipe = _recipe(tmp_path, bases["llama"], chats)
    line = next(ln for ln in _train(recipe, monkeypatch, capsys).splitlines() if "trainable of" in ln)
    assert line.startswith("LoRA r=4 with trainable tokens {'model.embed_tokens': [102, 103], 'lm_head': [102, 103]} "
                           "on 4 modules: 1,024 trainable of")  # 896 LoRA + 2 x 2 rows of 32
    monkeypatch.setattr("sys.argv", ["peftkit", "validate", str(recipe)])
    main()
    assert f"# model checks (no weight read): {line}; adapted: q_proj, v_proj\n" in capsys.readouterr().out


@pytest.mark.parametrize(("tokens", "adapter", "said"), [
    (["<x>", "<x>"], {}, "'model.add_tokens' = list: '<x>' is listed twice"),
    ([" "], {}, "'model.add_tokens' = list: ' ' is empty or whitespace"),
    (MARKERS, {"method": "ia3", "target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
     "model.add_tokens: the new tokens' embedding rows must train, and adapter.method 'ia3' trains no rows of "
     "model.embed_tokens or lm_head. Add embed_tokens, lm_head to adapter.modules_to_save"),
    (MARKERS, {"method": "prompt_tuning", "num_virtual_tokens": 4},  # (it said to add what the method refuses)
     "adapter.method 'prompt_tuning' trains no rows of model.embed_tokens or lm_head. It takes no "
     "adapter.modules_to_save either: use method lora (trainable_token_indices) or trainable_tokens."),
    (MARKERS, {"method": "trainable_tokens", "target_modules": None, "token_indices": [5]},
     "model.add_tokens: the new tokens' rows of lm_head must train too"),
    (MARKERS, {"target_modules": ["q_proj", "lm_head"]},  # (it said adapter.trainable_token_indices, not set)
     "model.add_tokens: the new tokens' rows of lm_head train as trainable_token_indices, and adapter.target_modules "
     "adapts lm_head too: a module takes one of the two. Leave lm_head out of adapter.target_modules (its new rows "
     "train), or move it to adapter.modules_to_save (trained whole)."),
])
def test_what_cannot_apply_is_said(tokens, adapter, said, bases, chats, tmp_path, monkeypatch, capsys):
    recipe = _recipe(tmp_path, bases["llama"], chats, tokens=tokens, adapter=adapter)
    assert said in " ".join(cli_user_error(monkeypatch, capsys, "train", str(recipe)).split())


def test_combining_or_naming_it_beside_others_is_refused(bases, chats, tmp_path, monkeypatch, capsys):
    """The other adapters' base has no rows for the new tokens: merging several, or named adapters, refuse it."""
    _train(_recipe(tmp_path, bases["llama"], chats, adapter={"modules_to_save": ["embed_tokens", "lm_head"]}),
           monkeypatch, capsys)
    adapter = str(tmp_path / "run" / "adapter")
    said = cli_user_error(monkeypatch, capsys, "merge", "--adapter", adapter, "--adapter", adapter, "--weights", "1,1",
                          "--method", "linear", "--output", str(tmp_path / "out"))
    assert "adds tokens to its base's tokenizer and embeddings (model.add_tokens: <|im_start|>, <|im_end|>)" in said
    said = cli_user_error(monkeypatch, capsys, "generate", "--adapter", f"a={adapter}", "--prompt", "hi")
    assert "Adapter 'a' (" in said and "load it alone (--adapter DIR)" in " ".join(said.split())


def test_a_qlora_run_adds_them_beside_the_4bit_layers(bases, chats, tmp_path, monkeypatch, capsys):
    """The 4-bit base (lm_head kept in full precision, as by default) takes the rows; its eval gives the run's loss."""
    from peftkit.cli import main

    recipe = _recipe(tmp_path, bases["llama"], chats, quantization={"method": "nf4", "compute_dtype": "float32"})
    assert "2 new special tokens" in _train(recipe, monkeypatch, capsys)
    final = json.loads((tmp_path / "run" / "manifest.json").read_text())["metrics"]["eval_loss"]
    monkeypatch.setattr("sys.argv", ["peftkit", "eval", str(tmp_path / "run")])
    main()
    assert f"loss {final:.4f}" in capsys.readouterr().out


def test_peft_s_adapter_with_new_tokens_loads_with_peft_s_numbers(bases, tmp_path, monkeypatch, capsys):
    """peft's way (TRL's setup_chat_format): markers added to the tokenizer, the base resized, LoRA with the rows
    trained, the tokenizer saved beside the adapter. peftkit adds the tokens it finds there and gives peft's logits,
    merged too."""
    from peft import LoraConfig, get_peft_model

    from peftkit.cli import main

    tok = AutoTokenizer.from_pretrained(bases["llama"])
    tok.add_special_tokens({"additional_special_tokens": MARKERS})
    base = load_fp32(bases["llama"])
    base.resize_token_embeddings(len(tok))
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False,
                        trainable_token_indices={"embed_tokens": [102, 103], "lm_head": [102, 103]})
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p))  # far from the resized rows
    adapter = tmp_path / "peft-adapter"
    model.save_pretrained(adapter)
    tok.save_pretrained(adapter)
    ours, _, our_tok, *_ = load_adapted_model(str(bases["llama"]), str(adapter), torch.device("cpu"))
    assert our_tok.convert_tokens_to_ids(MARKERS) == [102, 103]
    theirs = model.eval()
    assert (_logits(ours) - _logits(theirs)).abs().max() <= 1e-5
    monkeypatch.setattr("sys.argv", ["peftkit", "merge", "--adapter", str(adapter), "--base", str(bases["llama"]),
                                     "--output", str(tmp_path / "merged")])
    main()
    assert (_logits(load_fp32(tmp_path / "merged")) - _logits(theirs)).abs().max() <= 1e-5
    assert AutoTokenizer.from_pretrained(tmp_path / "merged")("<|im_end|>")["input_ids"][-1] == 103


def test_peft_s_adapter_on_a_base_resized_to_a_multiple_of_64_loads(bases, tmp_path, monkeypatch, capsys):
    """TRL's setup_chat_format resizes the base to a multiple of 64 (104 tokens, 128 rows), and peft saves the
    embeddings whole (128 rows): peftkit resizes the base to those rows, not the tokenizer's 104, and gives peft's
    logits, merged too."""
    from peft import LoraConfig, get_peft_model

    from peftkit.cli import main

    tok = AutoTokenizer.from_pretrained(bases["llama"])
    tok.add_special_tokens({"additional_special_tokens": MARKERS})
    base = load_fp32(bases["llama"])
    base.resize_token_embeddings(len(tok), pad_to_multiple_of=64)
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False,
                        trainable_token_indices={"embed_tokens": [102, 103], "lm_head": [102, 103]})
    model = get_peft_model(base, config)
    adapter = tmp_path / "peft-adapter"
    model.save_pretrained(adapter)
    tok.save_pretrained(adapter)
    ours = load_adapted_model(str(bases["llama"]), str(adapter), torch.device("cpu"))[0]
    theirs = _logits(model.eval())
    assert theirs.shape[-1] == 128 and (_logits(ours) - theirs).abs().max() <= 1e-5
    monkeypatch.setattr("sys.argv", ["peftkit", "merge", "--adapter", str(adapter), "--base", str(bases["llama"]),
                                     "--output", str(tmp_path / "merged")])
    main()
    assert (_logits(load_fp32(tmp_path / "merged")) - theirs).abs().max() <= 1e-5

def test_peft_s_adapter_with_the_resized_modules_saved_whole_loads(bases, tmp_path):
    """peft's docs' way: embed_tokens and lm_head in modules_to_save over a resized base. Its save_pretrained then
    writes each module's wrapper copies (modules_to_save.weight, original_module.weight) beside its weight; peftkit
    takes the module's weight, as peft does (it refused the file as a peft model's in-memory state_dict)."""
    from peft import LoraConfig, get_peft_model

    tok = AutoTokenizer.from_pretrained(bases["llama"])
    tok.add_special_tokens({"additional_special_tokens": MARKERS})
    base = load_fp32(bases["llama"])
    base.resize_token_embeddings(len(tok))
    config = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"])
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p, generator=torch.Generator().manual_seed(1)))
    adapter = tmp_path / "peft-adapter"
    model.save_pretrained(adapter)
    tok.save_pretrained(adapter)
    assert "base_model.model.lm_head.original_module.weight" in load_file(adapter / "adapter_model.safetensors")
    ours = load_adapted_model(str(bases["llama"]), str(adapter), torch.device("cpu"))[0]
    assert (_logits(ours) - _logits(model.eval())).abs().max() <= 1e-5

def test_eval_of_peft_s_adapter_reads_its_tokenizer_once(bases, tmp_path, monkeypatch):
    """`peftkit eval --adapter DIR` of peft's adapter with new tokens reads the tokenizer beside it once, for both the
    tokenizer and the model (the tokens it adds were found twice: each a tokenizer load), and evaluates as before."""
    from peft import LoraConfig, get_peft_model
    from typer.testing import CliRunner

    from peftkit.cli import app
    from peftkit.tiny import number_rows

    tok = AutoTokenizer.from_pretrained(bases["llama"])
    tok.add_special_tokens({"additional_special_tokens": MARKERS})
    base = load_fp32(bases["llama"])
    base.resize_token_embeddings(len(tok))
    adapter = tmp_path / "peft-adapter"
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [102, 103]})
                   ).save_pretrained(adapter)
    tok.save_pretrained(adapter)
    write_jsonl(tmp_path / "eval.jsonl", number_rows(4, seed=2))
    loads, load = [], AutoTokenizer.from_pretrained.__func__
    monkeypatch.setattr(AutoTokenizer, "from_pretrained",
                        classmethod(lambda cls, path, *a, **k: loads.append(str(path)) or load(cls, path, *a, **k)))
    result = CliRunner().invoke(app, ["eval", "--model", str(bases["llama"]), "--data", str(tmp_path / "eval.jsonl"),
                                      "--adapter", str(adapter)], catch_exceptions=False)
    assert result.exit_code == 0 and result.stdout.startswith("loss "), result.output
    assert loads.count(str(adapter)) == 1, loads

def test_peft_s_adapter_with_new_tokens_beside_others_is_refused(bases, tmp_path):
    """Named after a plain adapter, whose base has no rows for its tokens, peft's adapter with new tokens (its
    tokenizer beside it) is said so, as peftkit's are (it was "trained on a different base model")."""
    from peft import LoraConfig, get_peft_model

    from peftkit.adapters.named import load_named_model
    from peftkit.errors import PeftkitError

    get_peft_model(load_fp32(bases["llama"]), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(
        tmp_path / "plain")
    tok = AutoTokenizer.from_pretrained(bases["llama"])
    tok.add_special_tokens({"additional_special_tokens": MARKERS})
    base = load_fp32(bases["llama"])
    base.resize_token_embeddings(len(tok))
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"])
                   ).save_pretrained(tmp_path / "added")
    tok.save_pretrained(tmp_path / "added")
    with pytest.raises(PeftkitError) as said:
        load_named_model([("a", str(tmp_path / "plain")), ("b", str(tmp_path / "added"))], str(bases["llama"]))
    assert f"Adapter 'b' ({tmp_path / 'added'}) holds a tokenizer of 104 tokens, past the 102 rows of the base's " \
           "embeddings: it was trained with tokens added" in str(said.value)

def test_the_model_card_s_snippet_loads_it_with_the_run_s_logits(bases, chats, tmp_path, monkeypatch, capsys):
    """adapter/README.md's peft snippet, run as written (its paths filled in), gives peftkit's logits."""
    _train(_recipe(tmp_path, bases["qwen2"], chats), monkeypatch, capsys)
    adapter = tmp_path / "run" / "adapter"
    card = (adapter / "README.md").read_text()
    assert "It adds tokens to the base's tokenizer (`model.add_tokens`: `<|im_start|>`, `<|im_end|>`)" in card
    _check_card_snippet(adapter, bases["qwen2"])


def _check_card_snippet(adapter: Path, base: Path) -> None:
    """adapter/README.md's peft snippet, run with its paths filled in, gives peftkit's logits."""
    import re

    code = re.search(r"```python\n(.*?)```", (adapter / "README.md").read_text(), re.S).group(1)
    code = code.replace(f"PATH/TO/{base.name}", str(base)).replace("ADAPTER_DIR", str(adapter))
    scope: dict = {}
    exec(code, scope)  # noqa: S102 - the card's own snippet
    ours = load_adapted_model(None, str(adapter), torch.device("cpu"))[0]
    assert (_logits(scope["model"].float()) - _logits(ours)).abs().max() <= 1e-5


def test_the_card_s_snippet_keeps_a_base_s_spare_rows(chats, tmp_path, monkeypatch, capsys):
    """A base with 110 rows for its 102 tokens: the markers take ids 102, 103 within its rows (no resize), and the
    snippet leaves the 110 rows (resized to the tokenizer's 104, the base no longer took the embeddings and head that
    modules_to_save saved with 110 rows: peft's size mismatch)."""
    base = tmp_path / "padded"
    build_tiny_model(base, arch="llama", hidden_size=32, num_layers=2, seed=0, vocab_size=110)
    adapter = {"modules_to_save": ["embed_tokens", "lm_head"]}
    _train(_recipe(tmp_path, base, chats, adapter=adapter, training={"max_steps": 2}), monkeypatch, capsys)
    _check_card_snippet(tmp_path / "run" / "adapter", base)


def test_a_run_reads_the_base_tokenizer_once(bases, chats, tmp_path, monkeypatch, capsys):
    """train read the base's tokenizer five times with model.add_tokens (the memory estimate, the base vocabulary
    twice, the data, the model's resize: 1 to 2 s each for a 151k-token vocabulary); it reads it once and passes it
    on, and the new rows are still the ones the base lacks (102 and 103, past the character tokenizer's 102 tokens;
    `</s>`, which it has, left as it is)."""
    from peftkit.tiny import build_char_tokenizer

    loads, load = [], AutoTokenizer.from_pretrained.__func__
    monkeypatch.setattr(AutoTokenizer, "from_pretrained",
                        classmethod(lambda cls, path, *a, **k: loads.append(str(path)) or load(cls, path, *a, **k)))
    out = _train(_recipe(tmp_path, bases["llama"], chats, tokens=["</s>", *MARKERS]), monkeypatch, capsys)
    assert loads.count(str(bases["llama"])) == 1, loads
    first = len(build_char_tokenizer())
    assert f"model.add_tokens: 2 new special tokens (<|im_start|> = {first}, <|im_end|> = {first + 1})" in out
    assert "note: model.add_tokens: </s> already in the tokenizer: left as it is, its row the model's own" in out
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == {"lm_head": [first, first + 1], "model.embed_tokens": [first, first + 1]}


def test_eval_of_two_sets_and_merge_read_the_base_tokenizer_once(bases, chats, tmp_path, monkeypatch, capsys):
    """`peftkit eval RUN_DIR` read the base's tokenizer once per data.eval set, then twice more loading the adapted
    model (the resize to model.add_tokens' rows, the tokenizer it returned); `peftkit merge` twice (the resize, the
    tokenizer it saves). Each reads it once now (merge then reads back what it wrote, a check of the written files),
    and the figures are the run's: each set's eval loss its last eval_loss, the merged tokenizer holding the new
    tokens at 102 and 103."""
    from typer.testing import CliRunner

    from peftkit.cli import app

    recipe = _recipe(tmp_path, bases["llama"], chats, training={"max_steps": 2})
    raw = yaml.safe_load(recipe.read_text())
    raw["data"]["eval"] = {"a": str(chats["eval"]), "b": str(chats["train"])}
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    _train(recipe, monkeypatch, capsys)
    run, base = tmp_path / "run", str(bases["llama"])
    last = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x][-1]
    loads, load = [], AutoTokenizer.from_pretrained.__func__
    monkeypatch.setattr(AutoTokenizer, "from_pretrained",
                        classmethod(lambda cls, path, *a, **k: loads.append(str(path)) or load(cls, path, *a, **k)))
    result = CliRunner().invoke(app, ["eval", str(run), "--json", str(tmp_path / "eval.json")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    figures = json.loads((tmp_path / "eval.json").read_text())
    assert loads == [base], loads
    assert abs(figures["a"]["loss"] - last["eval_loss"]) <= 1e-6 and abs(figures["b"]["loss"] - last["eval_b_loss"]) <= 1e-6
    del loads[:]
    merged = tmp_path / "merged"
    result = CliRunner().invoke(app, ["merge", "--adapter", str(run / "adapter"), "--output", str(merged)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert loads.count(base) == 1 and all(Path(path).parent == tmp_path for path in loads if path != base), loads
    assert [load(AutoTokenizer, merged).convert_tokens_to_ids(t) for t in MARKERS] == [102, 103]
