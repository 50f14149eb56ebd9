"""CPT (peftkit.methods.cpt) beyond the conformance battery of tests/test_methods.py and the prompt family's checks in
tests/test_prompt_methods.py (peft both ways, eval loss, generation against cache-free greedy decoding): its training
against peft 0.21's own model (loss, gradient and projected delta, step after step), a context given as examples,
a resumed run, and what it refuses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import peft
import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoTokenizer

from peftkit.adapters import inject_adapters
from peftkit.data import IGNORE_INDEX
from peftkit.data.examples import ALPACA_PROMPT
from peftkit.errors import PeftkitError
from peftkit.methods.cpt import Cpt, CptConfig
from peftkit.methods.virtual import virtual_tokens
from tests.conftest import (
    check_resumes_to_the_same_bits,
    cli_user_error,
    method_recipe,
    train_shipped_recipe,
)
from tests.conftest import load_fp32 as _load  # (float32, eval mode)

IDS = torch.tensor([[1, 40, 41, 42, 7, 60, 61, 62], [1, 55, 12, 80, 81, 3, 47, 2]])
# Two examples: input template 1, inputs 2, output template 3, outputs 4 (a separator 0), then 5 .. 8.
CONTEXT = {"cpt_token_ids": [5, 6, 7, 8, 9, 10, 11, 12, 13, 14], "cpt_mask": [1] * 10,
           "cpt_tokens_type_mask": [1, 2, 2, 3, 4, 0, 6, 7, 8, 8]}
EXAMPLES = [{"prompt": "12 is ", "completion": "twelve"}, {"instruction": "Spell 3.", "output": "three"}]


def test_training_steps_are_peft_s_bit_for_bit(tiny_llama):
    """Four Adam steps with decay weights and both balls (rows projected onto them): the loss (the trainer's, and the
    model's given labels), the delta's gradient and the projected delta after each step equal peft's, and so do the
    logits; the first input token, labelled, is predicted by the context's last."""
    kw = CONTEXT | {"opt_weighted_loss_type": "decay", "opt_loss_decay_factor": 0.7, "opt_projection_epsilon": 0.05,
                    "opt_projection_format_epsilon": 0.02}
    theirs = get_peft_model(_load(tiny_llama), peft.CPTConfig(task_type="CAUSAL_LM", **kw))
    ours = _load(tiny_llama)
    inject_adapters(ours, CptConfig(method="cpt", **kw))
    trainer = Cpt.trainer(ours, None, 4)
    labels = IDS.masked_fill(torch.arange(8) < 3, IGNORE_INDEX)
    labels[0, 0] = 1
    batch = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS), "labels": labels}
    delta, their_delta = virtual_tokens(ours).table, theirs.prompt_encoder["default"].delta_embedding.weight
    optimizers = [torch.optim.Adam([p], lr=0.05) for p in (delta, their_delta)]
    counted = virtual_tokens(ours).counted(labels)
    assert counted == 2 * 3 + 11  # each row's context outputs (at 4, 8, 9) and its labelled tokens
    for _ in range(4):
        expected = theirs(**batch | {"labels": labels.clone()}).loss  # (peft shifts its argument's types in place)
        total, n = trainer.loss_sum(ours, batch, counted)
        assert int(n) == counted and torch.equal(total / counted, expected)
        assert torch.equal(ours(**batch).loss, expected)
        expected.backward()
        (total / counted).backward()
        assert torch.equal(delta.grad, their_delta.grad) and delta.grad[[4, 5, 8, 9]].abs().max() == 0
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        trainer.after_step(1)
    with torch.no_grad():
        assert torch.equal(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits[:, 10:])
    assert torch.equal(delta, their_delta)  # (peft projected it in the forward just above: a projected delta stays)
    balls = {1: 0.02, 2: 0.05, 3: 0.02} | {k: 0.02 for k in (5, 7)} | {6: 0.05}
    norms = delta.detach().norm(dim=1) / (32 / 2048) ** 0.5
    assert all(norms[i] <= balls[t] * (1 + 1e-6) for i, t in enumerate(CONTEXT["cpt_tokens_type_mask"]) if t in balls)
    assert any(abs(norms[i] - balls[t]) <= 1e-6 for i, t in enumerate(CONTEXT["cpt_tokens_type_mask"]) if t in balls)


def test_an_input_type_mask_gives_peft_s_loss_and_gradient(tiny_llama):
    """peft's input_type_mask (a type for each input token, as its example's rows carry: 1 template, 2 input, 3 the
    output's template, 4 its answer, 8 a second example's answer, 0 none): a label counts where its type is an
    output's, and decay weighs each row's output types apart (its largest 1, the next 0.7, ...). Three Adam steps:
    the loss (the model's given the mask, the trainer's of a batch whose labels are its outputs' alone, as data rows'
    are) and the delta's gradient equal peft's. peft raises the caller's mask in place (a second forward of the same
    batch is another loss); ours is left as it was."""
    kw = CONTEXT | {"opt_weighted_loss_type": "decay", "opt_loss_decay_factor": 0.7}
    theirs = get_peft_model(_load(tiny_llama), peft.CPTConfig(task_type="CAUSAL_LM", **kw))
    ours = _load(tiny_llama)
    inject_adapters(ours, CptConfig(method="cpt", **kw))
    trainer = Cpt.trainer(ours, None, 3)
    types = torch.tensor([[0, 1, 2, 3, 4, 4, 0, 0], [1, 2, 3, 4, 1, 3, 8, 8]])
    labels = IDS.clone()
    labels[1, 7] = IGNORE_INDEX  # (a label the data left out: its type still counts for decay)
    batch = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS), "labels": labels, "input_type_mask": types}
    outputs = labels.masked_fill((types == 0) | (types % 4 != 0), IGNORE_INDEX)  # the data's labels of typed rows
    delta, their_delta = virtual_tokens(ours).table, theirs.prompt_encoder["default"].delta_embedding.weight
    optimizers = [torch.optim.Adam([p], lr=0.05) for p in (delta, their_delta)]
    counted = virtual_tokens(ours).counted(outputs)
    assert counted == 2 * 3 + 4  # each row's context outputs, and its own outputs labelled (2 and 2)
    for _ in range(3):
        expected = theirs(**batch | {"input_type_mask": types.clone()}).loss
        assert torch.equal(ours(**batch).loss, expected)
        _one_step_alike(trainer, ours, batch | {"labels": outputs}, counted, expected, (delta, their_delta),
                        optimizers)
    assert torch.equal(batch["input_type_mask"], types)
    again = types.clone()
    first, second = (theirs(**batch | {"input_type_mask": again}).loss for _ in range(2))
    assert not torch.equal(again, types) and not torch.equal(first, second)  # peft's mask raised twice: 8 -> 16 -> 24
    assert torch.equal(ours(**batch).loss, ours(**batch).loss)


def test_an_input_type_mask_of_another_shape_is_refused(tiny_llama):
    ours = _load(tiny_llama)
    inject_adapters(ours, CptConfig(method="cpt", **CONTEXT))
    with pytest.raises(PeftkitError, match=r"CPT's input_type_mask has the shape \(2, 7\) and the input \(2, 8\): "
                                           r"give one type for each input token"):
        ours(input_ids=IDS, labels=IDS, input_type_mask=torch.full((2, 7), 4))


def test_peft_s_default_types_give_a_nan_loss_and_are_refused(tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    """peft's cpt_tokens_type_mask default (all 1) marks no output, and its loss masks every label of the data too
    (the input's types, 4 + 1, are no output): NaN, the mean of nothing. peftkit refuses to train with it."""
    theirs = get_peft_model(_load(tiny_llama), peft.CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=[5, 6, 7]))
    assert torch.isnan(theirs(input_ids=IDS, labels=IDS).loss)
    recipe = method_recipe(tmp_path, tiny_llama, number_data, {"method": "cpt", "cpt_token_ids": [5, 6, 7]})
    said = " ".join(cli_user_error(monkeypatch, capsys, "validate", str(recipe)).split())
    assert ("adapter.cpt_tokens_type_mask: its largest type is 1, not an output's (4k + 4), so peft's loss would mask "
            "every label of the data") in said


def test_a_context_of_examples_is_tokenized_as_data_rows(tiny_llama, number_data, tmp_path):
    """adapter.context: each example as its format's data rows are tokenized (the prompt after BOS, the answer and
    EOS); types 2 (prompt), 0 (BOS), 4 (answer), counted per example. A run exports peft's fields with those ids,
    and peft loads the adapter with our logits."""
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    first = tok("12 is ")["input_ids"], tok("twelve", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    second = tok(ALPACA_PROMPT.format(instruction="Spell 3."))["input_ids"], tok("three", add_special_tokens=False)[
        "input_ids"] + [tok.eos_token_id]
    ids = first[0] + first[1] + second[0] + second[1]
    types = [0] + [2] * (len(first[0]) - 1) + [4] * len(first[1]) + [0] + [6] * (len(second[0]) - 1) + [8] * len(second[1])
    recipe = method_recipe(tmp_path, tiny_llama, number_data, {"method": "cpt", "context": EXAMPLES},
                           training={"max_steps": 2, "lr": 5e-2})
    from peftkit.recipe import load_recipe
    from peftkit.train import train

    train(load_recipe(recipe), show_summary=False)
    adapter = tmp_path / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["peft_type"], config["cpt_token_ids"], config["cpt_tokens_type_mask"]) == ("CPT", ids, types)
    assert config["num_virtual_tokens"] == len(ids) and config["cpt_mask"] == [1] * len(ids)
    from peftkit.adapter_base import load_adapted_model

    with torch.no_grad():
        theirs = PeftModel.from_pretrained(_load(tiny_llama), adapter).eval()(input_ids=IDS).logits[:, len(ids):]
        ours = load_adapted_model(None, str(adapter))[0].eval()(input_ids=IDS).logits
    assert (ours - theirs).abs().max() <= 1e-5


def test_a_run_of_a_context_of_examples_is_verified_and_its_recipe_yaml_loads(tiny_llama, number_data, tmp_path):
    """A run's recipe.yaml and manifest.json write the adapter section whole; a context's is written without
    num_virtual_tokens (its examples give it once tokenized), so both load again: `peftkit verify` re-runs the run
    to the same bits (its manifest was refused: 'remove num_virtual_tokens')."""
    from peftkit.recipe import load_recipe
    from peftkit.train import train
    from peftkit.verify import verify

    recipe = method_recipe(tmp_path, tiny_llama, number_data, {"method": "cpt", "context": EXAMPLES},
                           training={"max_steps": 2, "lr": 5e-2})
    train(load_recipe(recipe), show_summary=False)
    assert "num_virtual_tokens" not in (tmp_path / "run" / "recipe.yaml").read_text()
    assert load_recipe(tmp_path / "run" / "recipe.yaml").adapter.context == EXAMPLES
    report = verify(tmp_path / "run")
    assert report.ok, report.differences


def test_a_context_file_is_its_rows(tiny_llama, number_data, tmp_path):
    """adapter.context: a .jsonl file (relative to the recipe's directory) gives the context its rows give inline;
    a line that is no example is refused by its line number."""
    from peftkit.errors import PeftkitError
    from peftkit.recipe import load_recipe

    (tmp_path / "examples.jsonl").write_text("".join(json.dumps(row) + "\n" for row in EXAMPLES))
    contexts = []
    for context in ("examples.jsonl", EXAMPLES):
        model = _load(tiny_llama)
        inject_adapters(model, load_recipe(method_recipe(tmp_path, tiny_llama, number_data,
                                                         {"method": "cpt", "context": context})).adapter)
        contexts.append(virtual_tokens(model).cfg)
    assert contexts[0].cpt_token_ids == contexts[1].cpt_token_ids and contexts[0] == contexts[1]
    (tmp_path / "examples.jsonl").write_text(json.dumps(EXAMPLES[0]) + "\n" + '{"question": "a"}\n')
    with pytest.raises(PeftkitError, match=r"examples.jsonl:2 has the fields \['question'\]; an example is an alpaca "
                                           r"row \(instruction, input, output\), a completion row \(prompt, "
                                           r"completion\) or a chat row \(messages\)"):
        inject_adapters(_load(tiny_llama), load_recipe(method_recipe(tmp_path, tiny_llama, number_data,
                                                                     {"method": "cpt", "context": "examples.jsonl"})).adapter)


CHATS = [[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
          {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
          {"role": "assistant", "content": "ciao"}]]


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory, tiny_llama) -> tuple[Path, dict[str, Path]]:
    """The tiny Llama with a tokenizer without a chat template (a base model's), and chat data."""
    root = tmp_path_factory.mktemp("cpt-chat")
    shutil.copytree(tiny_llama, root / "base")
    for f in (root / "base").glob("chat_template.*"):
        f.unlink()
    config = json.loads((root / "base" / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (root / "base" / "tokenizer_config.json").write_text(json.dumps(config))
    for name in ("train", "eval"):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"messages": CHATS[i % 2]}) + "\n" for i in range(4)))
    return root / "base", {"train": root / "train.jsonl", "eval": root / "eval.jsonl"}


def test_a_context_of_conversations_is_rendered_by_the_data_s_chat_template(chat_files, number_data, tmp_path,
                                                                            monkeypatch, capsys):
    """adapter.context's chat rows are rendered by data.chat_template (ChatML, on a tokenizer without a template),
    as the data's conversations: one token a character on the character tokenizer; each assistant turn's content and
    its <|im_end|> outputs (4k + 4), the rest inputs (4k + 2); `peftkit verify` re-runs the run from its manifest to
    the same bits. Without a template (alpaca data, which takes no data.chat_template), refused by text."""
    from peftkit.recipe import load_recipe

    base, data = chat_files
    tok = AutoTokenizer.from_pretrained(base)
    expected_ids, expected_types = [], []
    for k, messages in enumerate(CHATS):
        for m in messages:
            head, body = f"<|im_start|>{m['role']}\n", m["content"] + "<|im_end|>"
            out = 4 * k + 4 if m["role"] == "assistant" else 4 * k + 2
            expected_types += [4 * k + 2] * len(head) + [out] * len(body) + [4 * k + 2]
            expected_ids += tok(head + body + "\n", add_special_tokens=False)["input_ids"]
    assert len(expected_ids) == len(expected_types)  # (one token a character)
    from peftkit.train import train
    from peftkit.verify import verify

    adapter = {"method": "cpt", "context": [{"messages": m} for m in CHATS]}
    recipe = method_recipe(tmp_path, base, data, adapter, data={"format": "chat", "chat_template": "chatml",
                                                               "max_length": 256}, training={"max_steps": 1})
    train(load_recipe(recipe), show_summary=False)
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert (config["cpt_token_ids"], config["cpt_tokens_type_mask"]) == (expected_ids, expected_types)
    report = verify(tmp_path / "run")  # (the recipe its manifest records renders the context by the template too)
    assert report.ok, report.differences
    recipe = method_recipe(tmp_path, base, number_data, adapter)
    said = " ".join(cli_user_error(monkeypatch, capsys, "validate", str(recipe)).split())
    assert ("adapter.context[0] is a conversation (messages), and the base model's tokenizer has no chat template to "
            "render it; set data.chat_template") in said


def test_the_shipped_recipe_trains_a_context_peft_loads(tiny_llama, number_data, tmp_path):
    """recipes/methods/cpt.yaml (two alpaca examples, decay, peft's example's balls): the eval loss falls, and peft
    loads its adapter (the tokenized context in adapter_config.json) with our logits."""
    from peftkit.adapter_base import load_adapted_model

    summary = train_shipped_recipe("cpt", tiny_llama, number_data, tmp_path / "run", steps=2)
    assert summary["eval_loss"] < summary["base_eval_loss"]
    adapter = tmp_path / "run" / "adapter"
    n = json.loads((adapter / "adapter_config.json").read_text())["num_virtual_tokens"]
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(_load(tiny_llama), adapter).eval()(input_ids=IDS).logits[:, n:]
        ours = load_adapted_model(None, str(adapter))[0].eval()(input_ids=IDS).logits
    assert (ours - theirs).abs().max() <= 1e-5


def test_training_from_an_adapter_moves_within_the_balls_around_its_prompt(tiny_llama, number_data, tmp_path):
    """adapter.init_from a peft adapter whose context moved: its prompt is the start (peft's loading with
    is_trainable too), so the run's tokens stay within their balls around it, not around their embeddings."""
    theirs = get_peft_model(_load(tiny_llama), peft.CPTConfig(task_type="CAUSAL_LM", **CONTEXT))
    with torch.no_grad():
        theirs.prompt_encoder["default"].delta_embedding.weight.normal_(0, 1)
    theirs.save_pretrained(tmp_path / "peft")  # (its forward projects the delta into the balls first)
    loaded = load_file(tmp_path / "peft" / "adapter_model.safetensors")["prompt_embeddings"]
    recipe = method_recipe(tmp_path, tiny_llama, number_data, {"init_from": str(tmp_path / "peft")},
                           training={"max_steps": 2, "lr": 5e-2})
    from peftkit.recipe import load_recipe
    from peftkit.train import train

    train(load_recipe(recipe), show_summary=False)
    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")["prompt_embeddings"]
    moved, ball = (saved - loaded).norm(dim=1), 0.1 * (32 / 2048) ** 0.5
    assert torch.equal(saved[[4, 5, 8, 9]], loaded[[4, 5, 8, 9]])
    assert (moved[[0, 1, 2, 3, 6, 7]] > ball / 2).all() and moved.max() <= ball * (1 + 1e-6)


def test_a_resumed_run_is_the_unbroken_one_and_only_inputs_and_templates_move(tiny_llama, number_data, tmp_path):
    """A run killed after a checkpoint and resumed saves the unbroken run's file byte for byte (the checkpoint keeps
    delta and start); the outputs' and separators' rows are their embeddings, the others moved within their balls."""
    recipe = method_recipe(tmp_path, tiny_llama, number_data, {"method": "cpt", **CONTEXT},
                           training={"max_steps": 4, "save_steps": 2, "lr": 5e-2})
    check_resumes_to_the_same_bits(recipe, tmp_path / "run", kill_after=2, steps=4)
    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")["prompt_embeddings"]
    start = _load(tiny_llama).get_input_embeddings().weight[CONTEXT["cpt_token_ids"]].detach()
    moved = (saved - start).norm(dim=1)
    assert torch.equal(saved[[4, 5, 8, 9]], start[[4, 5, 8, 9]])
    assert (moved[[0, 1, 2, 3, 6, 7]] > 0).all() and moved.max() <= 0.1 * (32 / 2048) ** 0.5 * (1 + 1e-6)


def test_gradient_checkpointing_trains_the_same_adapter(tiny_llama, number_data, tmp_path):
    """training.gradient_checkpointing recomputes each layer's forward in the backward, the context's positions too:
    the adapter file is the plain run's, byte for byte (a context of examples, decay)."""
    from peftkit.recipe import load_recipe
    from peftkit.train import train

    files = []
    for checkpointing in (False, True):
        recipe = method_recipe(tmp_path / str(checkpointing), tiny_llama, number_data,
                               {"method": "cpt", "context": EXAMPLES, "opt_weighted_loss_type": "decay",
                                "opt_loss_decay_factor": 0.9},
                               training={"max_steps": 2, "lr": 5e-2, "gradient_checkpointing": checkpointing})
        train(load_recipe(recipe), show_summary=False)
        files.append((tmp_path / str(checkpointing) / "run" / "adapter" / "adapter_model.safetensors").read_bytes())
    assert files[0] == files[1]


@pytest.mark.parametrize(("adapter", "message"), [
    ({}, "give the context once: context (examples, which peftkit tokenizes) or cpt_token_ids (with cpt_mask and "
         "cpt_tokens_type_mask), not neither"),
    ({"context": EXAMPLES, **CONTEXT}, "not both"),
    ({"context": [{"question": "a", "answer": "b"}]}, "'adapter.context' = list: [0] has the fields ['answer', "
                                                      "'question']; an example is an alpaca row"),
    ({"cpt_token_ids": [5, 6], "cpt_tokens_type_mask": [2]}, "cpt_token_ids (2), cpt_mask (2) and cpt_tokens_type_mask "
                                                             "(1) must have the same length (peft refuses it too)"),
    ({"cpt_token_ids": [5, 6], "cpt_tokens_type_mask": [2, 4], "num_virtual_tokens": 3},
     "num_virtual_tokens is 3 and cpt_token_ids has 2 ids: CPT's virtual tokens are the context's"),
    ({"cpt_token_ids": [5, 6], "cpt_tokens_type_mask": [0, 4]},
     "adapter.cpt_tokens_type_mask has no input or template token (types 1, 2, 3 mod 4), so nothing would train"),
    ({"context": EXAMPLES, "num_virtual_tokens": 4}, "num_virtual_tokens is the context's length"),
    ({"context": [{"messages": [{"role": "bot", "content": "4"}]}]},
     "[0] is no example of data.format chat: messages[0].role is 'bot', not a chat role"),
    ({"context": "examples.txt"}, "'examples.txt' is no .jsonl file; give the examples as a list, or a .jsonl file"),
    ({"cpt_token_ids": [5, 600], "cpt_tokens_type_mask": [2, 4]},
     "adapter.cpt_token_ids: id 600 is past the model's"),
])
def test_recipe_mistakes_are_refused(adapter, message, tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    recipe = method_recipe(tmp_path, tiny_llama, number_data, {"method": "cpt", **adapter})
    assert message in " ".join(cli_user_error(monkeypatch, capsys, "validate", str(recipe)).split())


def test_data_max_length_is_checked_with_the_context_s_length(tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    """data.max_length plus the context's tokens past the model's 512 positions is refused by validate, with the
    tokenized length (it counted num_virtual_tokens' default, 20, and took 492 with a context of dozens of tokens)."""
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    prompts = [row["prompt"] if "prompt" in row else ALPACA_PROMPT.format(**row) for row in EXAMPLES]
    answers = [row.get("completion") or row["output"] for row in EXAMPLES]
    n = sum(len(tok(p)["input_ids"]) + len(tok(a, add_special_tokens=False)["input_ids"]) + 1  # (+ EOS)
            for p, a in zip(prompts, answers, strict=True))
    recipe = method_recipe(tmp_path, tiny_llama, number_data, {"method": "cpt", "context": EXAMPLES},
                           data={"max_length": 492})
    said = " ".join(cli_user_error(monkeypatch, capsys, "validate", str(recipe)).split())
    assert (f"data.max_length 492 plus the adapter's {n} virtual tokens is longer than {tiny_llama}'s "
            f"max_position_embeddings (512). Lower data.max_length to {512 - n}") in said


def test_another_objective_is_refused(tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    recipe = method_recipe(tmp_path, tiny_llama, number_data, {"method": "cpt", **CONTEXT},
                           training={"objective": "dpo"}, data={"format": "preference"})
    said = " ".join(cli_user_error(monkeypatch, capsys, "validate", str(recipe)).split())
    assert "CPT trains with its own loss over the context's outputs and the data's labels (sft)" in said


def test_the_memory_estimate_counts_the_context_s_tokens(tiny_llama, number_data, tmp_path):
    """A context of examples puts its tokenized length in front of every sequence: the estimate counts that many (it
    took num_virtual_tokens' default, 20), as for the same ids given, and more than for fewer."""
    from peftkit.memory import estimate_memory
    from peftkit.recipe import load_recipe

    def activations(adapter: dict, where: str) -> float:
        return estimate_memory(load_recipe(method_recipe(tmp_path / where, tiny_llama, number_data,
                                                         {"method": "cpt", **adapter}))).activations

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    n = len(tok(ALPACA_PROMPT.format(instruction="Spell 3."))["input_ids"] + tok("three")["input_ids"])  # (+ EOS - BOS)
    assert n > 20
    same = {"cpt_token_ids": [5] * n, "cpt_tokens_type_mask": [2] * (n - 1) + [4]}
    fewer = {"cpt_token_ids": [5] * 20, "cpt_tokens_type_mask": [2] * 19 + [4]}
    assert activations({"context": EXAMPLES[1:]}, "a") == activations(same, "b") > activations(fewer, "c")


def test_deepspeed_and_fsdp_are_refused(tiny_llama, number_data, tmp_path):
    """The projection after each step reaches neither ZeRO's fp32 master copies nor FSDP's shards of the delta."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from peftkit import zero
    from peftkit.distributed import check_engine
    from peftkit.errors import PeftkitError
    from peftkit.recipe import load_recipe

    recipe = load_recipe(method_recipe(tmp_path, tiny_llama, number_data, {"method": "cpt", **CONTEXT}))
    with pytest.raises(PeftkitError, match="adapter.method: cpt cannot train under FSDP: its projection"):
        check_engine(recipe, SimpleNamespace(distributed_type=DistributedType.FSDP))
    plugin = SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": 2}})
    engine = SimpleNamespace(distributed_type="DistributedType.DEEPSPEED", num_processes=2,
                             state=SimpleNamespace(deepspeed_plugin=plugin), gradient_accumulation_steps=1)
    with pytest.raises(PeftkitError, match="adapter.method: cpt is not supported under DeepSpeed: its projection"):
        zero.check(recipe, engine)


def _typed_rows(tok) -> list[dict]:
    """Two tokenized rows of other lengths with peft's per-token types (1 template, 2 input, 3 the output's template,
    4 its answer, 8 a second example's answer, 0 none); the second with labels, one masked on an output."""
    first = [1, 40, 41, 42, 7, 60, 61, 62]
    second = [1, 55, 12, 80, 81, 3]
    return [{"input_ids": first, "input_type_mask": [0, 1, 2, 3, 4, 4, 0, 0]},
            {"input_ids": second, "labels": [1, 55, 12, 80, IGNORE_INDEX, 3], "input_type_mask": [1, 2, 3, 4, 8, 8]}]


def test_a_tokenized_input_type_mask_column_gives_peft_s_loss_and_gradient(tiny_llama, tmp_path):
    """Tokenized rows with an input_type_mask column, read as data and batched by the Collator (types padded 0,
    labels -100; the labels masked where the type is no output's), give the loss and gradient of peft's own model on
    those rows padded by hand as peft's CPT example pads them (ids pad, types 0, labels the ids), with decay, over
    three Adam steps."""
    from peftkit.data import Collator, load_examples
    from peftkit.recipe import DataConfig
    from peftkit.tiny import write_jsonl

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    rows = _typed_rows(tok)
    write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(train=str(tmp_path / "d.jsonl"), format="tokenized")
    batch = Collator(tok.pad_token_id)(list(load_examples(tok, cfg.train, "train", cfg)[0]))
    width = 8

    def padded(key, value):
        return torch.tensor([row.get(key, row["input_ids"]) + [value] * (width - len(row["input_ids"])) for row in rows])

    theirs_batch = {"input_ids": padded("input_ids", tok.pad_token_id), "labels": padded("labels", IGNORE_INDEX),
                    "attention_mask": torch.tensor([[1] * 8, [1] * 6 + [0] * 2])}
    assert torch.equal(batch["input_ids"], theirs_batch["input_ids"])
    assert torch.equal(batch["input_type_mask"], padded("input_type_mask", 0))
    kw = CONTEXT | {"opt_weighted_loss_type": "decay", "opt_loss_decay_factor": 0.7}
    theirs = get_peft_model(_load(tiny_llama), peft.CPTConfig(task_type="CAUSAL_LM", **kw))
    ours = _load(tiny_llama)
    inject_adapters(ours, CptConfig(method="cpt", **kw))
    trainer = Cpt.trainer(ours, None, 3)
    delta, their_delta = virtual_tokens(ours).table, theirs.prompt_encoder["default"].delta_embedding.weight
    optimizers = [torch.optim.Adam([p], lr=0.05) for p in (delta, their_delta)]
    counted = virtual_tokens(ours).counted(batch["labels"])
    assert counted == 2 * 3 + 4  # each row's context outputs; row 1's outputs at 4, 5, row 2's at 3, 5 (4: label -100)
    for _ in range(3):
        expected = theirs(**theirs_batch, input_type_mask=padded("input_type_mask", 0)).loss
        _one_step_alike(trainer, ours, batch, counted, expected, (delta, their_delta), optimizers)


def _tokenized_files(tok, number_data, root, types=None) -> dict:
    """number_data's alpaca rows as tokenized files (train, eval), each row typed by `types(example)` where given."""
    from peftkit.data import load_examples
    from peftkit.recipe import DataConfig
    from peftkit.tiny import write_jsonl

    files = {}
    for split in ("train", "eval"):
        cfg = DataConfig(train=str(number_data[split]), format="alpaca", max_length=128)
        examples = load_examples(tok, cfg.train, "train", cfg, cache=False)[0]
        write_jsonl(root / f"{split}.jsonl", [{"input_ids": e.input_ids, "labels": e.labels}
                                              | ({"input_type_mask": types(e)} if types else {}) for e in examples])
        files[split] = root / f"{split}.jsonl"
    return files


def test_a_cpt_run_on_typed_rows(tiny_llama, number_data, tmp_path):
    """A recipe's tokenized rows all typed 4 (peft's default) train the run without the column bit for bit; typed as
    peft's examples are (2 the prompt, 4 the answer, 3 its EOS: a template, not scored), the types reach the loss
    (another adapter); any other method refuses the column, by text."""
    from peftkit.recipe import load_recipe
    from peftkit.train import train

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    common = {"training": {"max_steps": 3, "lr": 5e-2}, "eval": {"base_model": False}}
    runs = {}
    for name, types in [("plain", None), ("fours", lambda e: [4] * len(e.input_ids)),
                        ("typed", lambda e: [2 if label == IGNORE_INDEX else 4 for label in e.labels[:-1]] + [3])]:
        files = _tokenized_files(tok, number_data, tmp_path / name, types)
        recipe = method_recipe(tmp_path / name, tiny_llama, files, {"method": "cpt", **CONTEXT},
                               data={"format": "tokenized"}, **common)
        runs[name] = train(load_recipe(recipe), show_summary=False)
    plain, fours, typed = (load_file(tmp_path / k / "run" / "adapter" / "adapter_model.safetensors")
                           for k in ("plain", "fours", "typed"))
    assert plain.keys() == fours.keys() and all(plain[k].equal(fours[k]) for k in plain)
    assert not all(plain[k].equal(typed[k]) for k in plain) and runs["typed"]["eval_loss"] != runs["plain"]["eval_loss"]
    lora = method_recipe(tmp_path / "lora", tiny_llama, _tokenized_files(tok, number_data, tmp_path / "lora",
                                                                          lambda e: [4] * len(e.input_ids)),
                         {"method": "lora", "r": 2, "target_modules": ["q_proj"]}, data={"format": "tokenized"})
    with pytest.raises(PeftkitError, match=r"data\.train: its rows have an 'input_type_mask' \(CPT's per-token types, "
                                           r"which mask the labels of every token not typed an output\), and "
                                           r"adapter\.method: lora reads none; remove the column, or train with "
                                           r"adapter\.method: cpt\."):
        train(load_recipe(lora), show_summary=False)


def _one_step_alike(trainer, ours, batch, counted: int, expected, tables, optimizers) -> None:
    """One training step of CPT's loss (`CptTrainer.loss_sum`) beside peft's `expected` loss: the same loss and count,
    the same gradient of the two delta tables, bit for bit; then both optimizers step (and CPT's projection)."""
    total, n = trainer.loss_sum(ours, batch, counted)
    assert int(n) == counted and torch.equal(total / counted, expected)
    expected.backward()
    (total / counted).backward()
    assert torch.equal(tables[0].grad, tables[1].grad)
    for optimizer in optimizers:
        optimizer.step()
        optimizer.zero_grad()
    trainer.after_step(1)
