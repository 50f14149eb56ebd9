"""`adapter.init_from` an adapter trained with `model.add_tokens` [A, B] under a recipe that lists more tokens after
them ([A, B, C]: a run continued with a new token): A's and B's rows start as the adapter's, C's as a fresh run's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from transformers import AutoTokenizer

from peftkit.adapter_base import load_adapted_model
from tests import test_new_tokens
from tests.conftest import cli_user_error, load_fp32
from tests.test_new_tokens import MARKERS, _logits, _recipe, _train

bases, chats = test_new_tokens.bases, test_new_tokens.chats  # its fixtures: the tiny bases, the conversations

MORE = [*MARKERS, "<tool_call>"]  # <tool_call> gets id 104
IDS = torch.tensor([[1, 102, 40, 104, 103, 7, 104, 60], [2, 7, 103, 42, 104, 41, 3, 5]])
ROWS = {  # the keys of the rows each case trains: the embeddings', and an untied head's
    "rows": ["model.embed_tokens.token_adapter.trainable_tokens_delta", "lm_head.token_adapter.trainable_tokens_delta"],
    "tied": ["model.embed_tokens.token_adapter.trainable_tokens_delta"],
    "whole": ["model.embed_tokens.weight", "lm_head.weight"],
    "method": ["model.embed_tokens.trainable_tokens_delta", "lm_head.trainable_tokens_delta"],  # rows of 5 too
}
ADAPTERS = {"rows": None, "tied": None, "whole": {"modules_to_save": ["embed_tokens", "lm_head"]},
            "method": {"method": "trainable_tokens", "target_modules": ["embed_tokens", "lm_head"],
                       "token_indices": [5]}}


def _step0_model(recipe):
    """The model `peftkit train` would start its first step from, and the recipe."""
    from peftkit.recipe import load_recipe
    from peftkit.start import make_accelerator, setup

    cfg = load_recipe(recipe)
    out = recipe.parent / "run"
    return setup(cfg, out, False, Console(quiet=True), make_accelerator(cfg, out)).model, cfg


def _step0_state(recipe) -> dict[str, torch.Tensor]:
    """The adapter tensors `peftkit train` would start its first step from, by their keys after base_model.model."""
    from peftkit.adapters.state_dicts import adapter_state_dict

    model, cfg = _step0_model(recipe)
    state = adapter_state_dict(model, cfg.adapter.modules_to_save or [])
    return {k.removeprefix("base_model.model."): v for k, v in state.items()}


def _from(recipe, adapter) -> None:
    """`recipe`'s adapter section made `init_from: adapter` alone (the method and its settings are the adapter's)."""
    import yaml

    raw = yaml.safe_load(recipe.read_text())
    raw["adapter"] = {"init_from": str(adapter)}
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.mark.parametrize("case", list(ROWS))
def test_a_run_from_an_adapter_adds_tokens_after_its_own(case, bases, chats, tmp_path, monkeypatch, capsys):
    """trainable_token_indices on Llama (embeddings and head) and Qwen2 (tied), modules_to_save (the matrices whole)
    and the trainable tokens method (with row 5): at step 0 the rows of 102, 103 (5) are the adapter's and 104's those
    of a run without init_from, which are transformers' mean resizing to 105 rows from seed 0; the run trains, its
    memory estimate counts the new rows, its adapter loads in peft with peftkit's logits, and inspect lists the three
    tokens."""
    from peft import PeftModel

    from peftkit.cli import main

    base = bases["qwen2" if case == "tied" else "llama"]
    lora = ADAPTERS[case]
    _train(_recipe(tmp_path / "first", base, chats, adapter=lora, training={"max_steps": 2}), monkeypatch, capsys)
    trained = tmp_path / "first" / "run" / "adapter"
    saved = {k.removeprefix("base_model.model."): v
             for k, v in load_file(trained / "adapter_model.safetensors").items()}
    fresh = _step0_state(_recipe(tmp_path / "fresh", base, chats, tokens=MORE, adapter=lora))
    recipe = _recipe(tmp_path, base, chats, tokens=MORE, training={"max_steps": 2})
    _from(recipe, trained)
    start = _step0_state(recipe)
    resized = load_fp32(base)
    torch.manual_seed(0)
    resized.resize_token_embeddings(105)
    for key in ROWS[case]:
        old = saved[key].shape[0]  # 2 rows (102, 103), 3 (5 too), or 104 (the whole matrix)
        assert start[key].shape[0] == old + 1 and torch.equal(start[key][:old], saved[key])
        assert torch.equal(start[key][old], fresh[key][old])
        module = resized.get_input_embeddings() if key.startswith("model.embed_tokens") else resized.lm_head
        assert torch.equal(start[key][old], module.weight[104])

    monkeypatch.setattr("sys.argv", ["peftkit", "validate", str(recipe)])
    main()  # (its model checks load the adapter's rows into a meta model)
    assert "model checks (no weight read)" in capsys.readouterr().out
    out = _train(recipe, monkeypatch, capsys)
    said = {"rows": "LoRA r=4 with trainable tokens {'lm_head': [102, 103, 104], 'model.embed_tokens': [102, 103, 104]} "
                    "on 4 modules", "tied": "LoRA r=4 with trainable tokens [102, 103, 104] on 4 modules",
            "whole": "LoRA r=4 on 4 modules", "method": "Trainable tokens (4 rows) on 2 modules"}[case]
    assert f"\n{said}: " in out, out  # (the run's ids: it said the adapter's [102, 103], 3 rows)
    trainable = {"whole": 896 + 2 * 105 * 32, "method": 2 * 4 * 32}.get(case, 896 + len(ROWS[case]) * 3 * 32)
    assert f"adapter {trainable * 4 / 1024:.1f} KiB + gradients" in out and f"{trainable:,} trainable of" in out
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "peftkit.json").read_text())["added_tokens"] == MORE
    ours, _, tok, *_ = load_adapted_model(None, str(adapter), torch.device("cpu"))
    assert tok.convert_tokens_to_ids(MORE) == [102, 103, 104]
    peft_base = load_fp32(base)
    peft_base.resize_token_embeddings(len(AutoTokenizer.from_pretrained(adapter)))
    theirs = PeftModel.from_pretrained(peft_base, adapter)
    assert (_logits(ours, IDS) - _logits(theirs, IDS)).abs().max() <= 1e-5
    monkeypatch.setattr("sys.argv", ["peftkit", "inspect", str(adapter)])
    main()
    assert "added tokens   <|im_start|>, <|im_end|>, <tool_call> (model.add_tokens)" in capsys.readouterr().out


def test_a_list_that_leaves_out_a_trained_token_is_refused(bases, chats, tmp_path, monkeypatch, capsys):
    """The adapter's tokens must begin model.add_tokens: one left out (its trained row would go to another token, or
    nowhere) is named, with the list to set."""
    _train(_recipe(tmp_path / "first", bases["llama"], chats, training={"max_steps": 1}), monkeypatch, capsys)
    trained = tmp_path / "first" / "run" / "adapter"
    recipe = _recipe(tmp_path, bases["llama"], chats, tokens=[MARKERS[0], "<tool_call>"],
                     adapter={"method": "lora", "init_from": str(trained)})
    assert (f"recipe.yaml:4: adapter.init_from {trained} was trained with model.add_tokens: ['<|im_start|>', "
            "'<|im_end|>'], whose rows it holds by id, and this recipe's model.add_tokens is ['<|im_start|>', "
            "'<tool_call>'], which leaves out <|im_end|>, whose row the adapter trained. Set model.add_tokens: "
            "['<|im_start|>', '<|im_end|>', '<tool_call>'] (the adapter's tokens first, in its order; tokens after "
            "them are new, their rows trained from the start).") in " ".join(
        cli_user_error(monkeypatch, capsys, "validate", str(recipe)).split())


def test_eval_of_a_dpo_run_from_it_gives_its_last_evaluation(bases, chats, tmp_path):
    """DPO from the adapter with a token added: `peftkit eval RUN_DIR` takes init_from's adapter in the run's layers as
    the reference, the new token's rows as training started them, and gives the run's last evaluation (it said the
    adapter was not trained from init_from: the rows' shapes differed)."""
    import yaml
    from typer.testing import CliRunner

    from peftkit.cli import app
    from peftkit.recipe import load_recipe
    from peftkit.tiny import write_jsonl
    from peftkit.train import train
    from tests.conftest import make_recipe

    train(load_recipe(_recipe(tmp_path / "first", bases["llama"], chats, training={"max_steps": 2})))
    pairs = [{"prompt": f"{a}+{a}=", "chosen": str(2 * a), "rejected": str(-2 * a)} for a in range(1, 13)]
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    data = {"train": tmp_path / "pairs.jsonl", "eval": tmp_path / "pairs.jsonl"}
    recipe = make_recipe(tmp_path, bases["llama"], data, data={"format": "preference", "max_length": 64},
                         training={"objective": "dpo", "lr": 2e-2, "max_steps": 2, "eval_steps": 2})
    raw = yaml.safe_load(recipe.read_text())
    raw["adapter"] = {"init_from": str(tmp_path / "first" / "run" / "adapter")}
    raw["model"]["add_tokens"] = MORE
    recipe.write_text(yaml.safe_dump(raw))
    train(load_recipe(recipe), console=Console(quiet=True))
    run = tmp_path / "run"
    last = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x][-1]
    result = CliRunner().invoke(app, ["eval", str(run), "--json", str(tmp_path / "figures.json")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    figures = json.loads((tmp_path / "figures.json").read_text())
    assert abs(figures["loss"] - last["eval_loss"]) <= 1e-5 and abs(last["eval_loss"] - 0.6931) > 1e-3, (figures, last)
    assert abs(figures["reward_margin"] - last["eval_reward_margin"]) <= 1e-5


def test_the_check_reads_peft_s_adapter_tokenizer_once(bases, chats, tmp_path, monkeypatch):
    """The recipe's check of init_from's tokens (a peft adapter: those of the tokenizer beside it) read that tokenizer
    twice, once for its length and once for its tokens (194 ms a load for SmolLM2's); now once, with the same answer:
    the run lists the adapter's tokens and one more."""
    from peft import LoraConfig, get_peft_model

    from peftkit.recipe import load_recipe

    tok = AutoTokenizer.from_pretrained(bases["llama"])
    tok.add_special_tokens({"additional_special_tokens": MARKERS})
    base = load_fp32(bases["llama"])
    base.resize_token_embeddings(len(tok))
    adapter = tmp_path / "peft-adapter"
    config = LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [102, 103]})
    get_peft_model(base, config).save_pretrained(adapter)
    tok.save_pretrained(adapter)
    recipe = _recipe(tmp_path, bases["llama"], chats, tokens=MORE, adapter={"method": "lora", "init_from": str(adapter)})
    loads, load = [], AutoTokenizer.from_pretrained.__func__
    monkeypatch.setattr(AutoTokenizer, "from_pretrained",
                        classmethod(lambda cls, path, *a, **k: loads.append(str(path)) or load(cls, path, *a, **k)))
    assert load_recipe(recipe).model.add_tokens == MORE
    assert loads.count(str(adapter)) == 1, loads


PEFT = {  # peft's adapters over the base resized to 104 rows: (base, its config, the run's add_tokens, what peft 0.21.2
    # saves beside the LoRA tensors, after base_model.model.: the resized embeddings and head, save_embedding_layers)
    "rows": ("llama", {"trainable_token_indices": {"embed_tokens": [102, 103]}}, MARKERS,
             ["lm_head.weight", "model.embed_tokens.token_adapter.base_layer.weight",  # (the head whole, untrained)
              "model.embed_tokens.token_adapter.trainable_tokens_delta"]),
    "tied": ("qwen2", {"trainable_token_indices": {"embed_tokens": [102, 103]}}, MORE,
             ["lm_head.token_adapter.base_layer.weight", "lm_head.token_adapter.trainable_tokens_delta",  # (a copy)
              "model.embed_tokens.token_adapter.base_layer.weight",
              "model.embed_tokens.token_adapter.trainable_tokens_delta"]),
    "method": ("llama", {"target_modules": ["embed_tokens", "lm_head"], "token_indices": [102, 103]}, MORE,
               ["lm_head.base_layer.weight", "lm_head.trainable_tokens_delta", "model.embed_tokens.base_layer.weight",
                "model.embed_tokens.trainable_tokens_delta"]),
}


def _peft_adapter(base_dir, settings: dict, out):
    """peft's adapter with new tokens, as its docs make one: MARKERS added to the tokenizer, the base resized (a draw
    of its own: seed 7, where peftkit's is 0), LoRA on q_proj with the rows trained (`settings`: the rows; with
    token_indices the trainable tokens method), moved off the resized ones; saved with the tokenizer beside it.
    (the adapter's directory, peft's model)."""
    from peft import LoraConfig, TrainableTokensConfig, get_peft_model

    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.add_special_tokens({"additional_special_tokens": MARKERS})
    base = load_fp32(base_dir)
    torch.manual_seed(7)
    base.resize_token_embeddings(len(tok))
    torch.manual_seed(1)
    config = (TrainableTokensConfig(**settings) if "token_indices" in settings else
              LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False, **settings))
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, model.eval()


@pytest.mark.parametrize("case", list(PEFT))
def test_a_run_from_peft_s_adapter_starts_as_it_and_peft_loads_its_export(case, bases, chats, tmp_path, monkeypatch,
                                                                          capsys):
    """adapter.init_from peft's adapter with new tokens: LoRA's rows of the embeddings alone on the untied Llama, with
    model.add_tokens its tokens (peft saves the resized head whole, which the run's head rows did not take: "1 adapter
    weights missing (...lm_head.token_adapter.trainable_tokens_delta)"); on the tied Qwen2 (peft saves the head's
    copy of the rows: "weights for modules this model lacks", in eval too) and the trainable tokens method, with a
    token added after the adapter's (its 104-row bases did not fit 105). peftkit's model at step 0 gives peft's
    logits, the new rows of the resized base (peft's draw) included, as eval's load does; the run trains, and peft
    loads its adapter with peftkit's logits."""
    from peft import PeftModel

    arch, settings, tokens, saved = PEFT[case]
    adapter, theirs = _peft_adapter(bases[arch], settings, tmp_path / "peft-adapter")
    assert sorted(k for k in load_file(adapter / "adapter_model.safetensors") if "lora_" not in k) == [
        f"base_model.model.{key}" for key in saved]
    recipe = _recipe(tmp_path, bases[arch], chats, tokens=tokens, training={"max_steps": 2})
    _from(recipe, adapter)
    ids = IDS.clamp(max=103)  # (peft's model has 104 rows)
    loaded = load_adapted_model(str(bases[arch]), str(adapter), torch.device("cpu"))[0]  # (eval's load)
    assert (_logits(loaded, ids) - _logits(theirs, ids)).abs().max() <= 1e-5
    start = _logits(_step0_model(recipe)[0], ids)[..., :104]
    assert (start - _logits(theirs, ids)).abs().max() <= 1e-5
    _train(recipe, monkeypatch, capsys)
    export = tmp_path / "run" / "adapter"
    ours = load_adapted_model(None, str(export), torch.device("cpu"))[0]
    assert (_logits(ours, ids)[..., :104] - start).abs().max() > 1e-3  # (trained)
    peft_base = load_fp32(bases[arch])
    peft_base.resize_token_embeddings(len(AutoTokenizer.from_pretrained(export)))
    every = IDS.clamp(max=101 + len(tokens))  # (104 where the run added it)
    assert (_logits(ours, every) - _logits(PeftModel.from_pretrained(peft_base, export), every)).abs().max() <= 1e-5


def test_peft_s_trainable_tokens_of_the_embeddings_alone_over_an_untied_head_is_refused_with_what_to_do(
        bases, chats, tmp_path, monkeypatch, capsys):
    """peft's trainable tokens method on embed_tokens alone, over the untied Llama's head: the new tokens' head rows
    would not train. The refusal told the user to name lm_head in adapter.target_modules, which init_from takes from
    the adapter, so no recipe could follow it; it says what the adapter is and what to do instead now."""
    adapter = _peft_adapter(bases["llama"], {"target_modules": ["embed_tokens"], "token_indices": [102, 103]},
                            tmp_path / "peft-adapter")[0]
    recipe = _recipe(tmp_path, bases["llama"], chats, training={"max_steps": 1})
    _from(recipe, adapter)
    err = " ".join(cli_user_error(monkeypatch, capsys, "train", str(recipe)).split())
    assert err.endswith(
        f"error: model.add_tokens: adapter.init_from {adapter} is a trainable tokens adapter that trains rows of the "
        "embeddings alone, none of the output head lm_head (not tied to the embeddings; peft's adapter on embed_tokens "
        "only), so the new tokens' output rows would stay untrained; its settings come from the adapter, so they "
        "cannot name the head. Train a new adapter without adapter.init_from instead: with model.add_tokens, method "
        "lora trains the new tokens' rows of the embeddings and of lm_head (trainable_token_indices)."), err
    followed = _recipe(tmp_path / "followed", bases["llama"], chats, adapter={"method": "lora"})  # what it says to do
    assert sorted(k for k in _step0_state(followed) if "trainable_tokens" in k) == sorted(ROWS["rows"])


@pytest.mark.parametrize("tokens", [MARKERS, MORE], ids=["its-tokens", "one-more"])
@pytest.mark.parametrize("head", [True, False], ids=["head-rows", "head-whole"])
def test_a_run_from_peft_s_adapter_on_a_base_padded_to_a_multiple_of_64_starts_as_it(head, tokens, bases, chats,
                                                                                    tmp_path, monkeypatch, capsys):
    """TRL's setup_chat_format pads the resized base to a multiple of 64 (104 tokens, 128 rows), and peft saves the
    resized embeddings and head whole as the frozen bases of the trained rows (`head`: the head's rows trained too;
    else the head itself, lm_head.weight): eval loads such an adapter (on 128 rows), but a run from it
    (adapter.init_from) refused to start, with its own tokens or one more: "module 'lm_head.token_adapter' expects
    base_layer of shape (104, 32) but the adapter has (128, 32)". The run's model has
    its tokenizer's rows, as its exported adapter is loaded again; the 24 rows no token has are left out. At step 0
    its logits of the adapter's 104 tokens are peft's model's, 102's and 103's rows peft's trained ones, <tool_call>'s
    (104) that of transformers' mean resizing to 105 rows from seed 0 (a fresh run's); the run trains."""
    indices = {"embed_tokens": [102, 103]} | ({"lm_head": [102, 103]} if head else {})
    theirs, adapter = _padded_peft_adapter(bases["llama"], indices, tmp_path)
    saved = {k.removeprefix("base_model.model."): v for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    assert saved["lm_head.token_adapter.base_layer.weight" if head else "lm_head.weight"].shape == (128, 32)

    recipe = _recipe(tmp_path, bases["llama"], chats, tokens=tokens, training={"max_steps": 2})
    _from(recipe, adapter)
    ids = IDS.clamp(max=103)  # (the tokens peft's model has)
    model = _step0_model(recipe)[0]
    rows = 102 + len(tokens)
    assert model.get_input_embeddings().weight.shape[0] == model.get_output_embeddings().weight.shape[0] == rows
    assert (_logits(model, ids)[..., :104] - _logits(theirs.eval(), ids)[..., :104]).abs().max() <= 1e-5
    start = _step0_state(recipe)
    fresh = load_fp32(bases["llama"])
    torch.manual_seed(0)
    fresh.resize_token_embeddings(105)
    for module, resized in (("model.embed_tokens", fresh.get_input_embeddings()), ("lm_head", fresh.lm_head)):
        trained = start[f"{module}.token_adapter.trainable_tokens_delta"]  # (a head saved whole: its rows 102, 103)
        rows_of = saved.get(f"{module}.token_adapter.trainable_tokens_delta", saved.get(f"{module}.weight"))
        assert torch.equal(trained[:2], rows_of[:2] if head or module != "lm_head" else rows_of[102:104])
        if len(tokens) == 3:
            assert trained.shape[0] == 3 and torch.equal(trained[2], resized.weight[104])
    _train(recipe, monkeypatch, capsys)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def _padded_peft_adapter(base_dir: Path, indices: dict, tmp_path: Path):
    """(peft's model, its saved adapter): TRL's setup_chat_format on `base_dir` (the two MARKERS added, the base
    resized to a multiple of 64), a LoRA on q_proj with trainable token rows `indices`, every tensor away from its
    start; the adapter saved with its tokenizer, as TRL's runs save it."""
    from peft import LoraConfig, get_peft_model

    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.add_special_tokens({"additional_special_tokens": MARKERS})
    base = load_fp32(base_dir)
    torch.manual_seed(7)
    base.resize_token_embeddings(len(tok), pad_to_multiple_of=64)
    torch.manual_seed(1)
    theirs = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False,
                                             trainable_token_indices=indices))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p))
    adapter = tmp_path / "peft-adapter"
    theirs.save_pretrained(adapter)
    tok.save_pretrained(adapter)
    return theirs, adapter


def test_a_run_from_peft_s_padded_adapter_whose_tokens_fit_the_base_s_spare_rows_starts_as_it(bases, chats, tmp_path,
                                                                                            monkeypatch, capsys):
    """A base with rows to spare (110 rows, 102 tokens, as Qwen's) takes setup_chat_format's two markers within them,
    so no model.add_tokens is asked for, but TRL still pads it to 128 rows, which peft saves as the frozen bases of the
    trained rows: a run from that adapter without model.add_tokens was refused as "trained on a different base model
    (another size or vocabulary)" (the padded rows were cut only under model.add_tokens). It starts as peft's model:
    its logits over the base's 110 rows are peft's (<= 1e-5), and it trains."""
    spare = tmp_path / "spare"
    resized = load_fp32(bases["llama"])
    resized.resize_token_embeddings(110, mean_resizing=False)
    resized.save_pretrained(spare)
    AutoTokenizer.from_pretrained(bases["llama"]).save_pretrained(spare)
    theirs, adapter = _padded_peft_adapter(spare, {"embed_tokens": [102, 103], "lm_head": [102, 103]}, tmp_path)
    assert load_file(adapter / "adapter_model.safetensors")[
        "base_model.model.lm_head.token_adapter.base_layer.weight"].shape == (128, 32)

    recipe = _recipe(tmp_path, spare, chats, tokens=[], training={"max_steps": 2})
    _from(recipe, adapter)
    model = _step0_model(recipe)[0]
    assert model.get_input_embeddings().weight.shape[0] == model.get_output_embeddings().weight.shape[0] == 110
    ids = IDS.clamp(max=103)
    assert (_logits(model, ids) - _logits(theirs.eval(), ids)[..., :110]).abs().max() <= 1e-5
    _train(recipe, monkeypatch, capsys)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
