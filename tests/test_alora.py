"""Activated LoRA (`alora_invocation_tokens`, peftkit.methods.alora): LoRA from the invocation's last occurrence in
a row on, the base model before it. Checked against peft 0.21 (its adapters load with its logits and gradients, and
it loads ours), against the base model (every position before the invocation, and a row without it, bit for bit),
and against greedy decoding with one full forward per token (KV-cache generation). Settings peft refuses, and what
cannot work (a merge, packed rows), are refused saying why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig as PeftLora
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftkit.adapters import adapter_layers, inject_adapters
from peftkit.decoding import Sampling, generate_ids, stop_token_ids
from peftkit.errors import PeftkitError
from peftkit.methods.alora import invocation_coverage, last_starts
from peftkit.methods.lora import LoraConfig
from peftkit.adapter_base import load_adapted_model
from peftkit.recipe import load_recipe
from peftkit.tiny import write_jsonl
from tests.conftest import cli_user_error, load_fp32, make_recipe, save_random_adapter
from tests.test_generate import greedy_no_cache
from tests.test_methods import models  # noqa: F401  (the fixture: tiny llama, qwen2, gpt2 and gemma2)

INVOCATION = [5, 9]
# Row 0: the invocation at 2; row 1: twice, the last at 4; row 2: none (the base's outputs throughout).
IDS = torch.tensor([[3, 4, 5, 9, 7, 8, 11, 12], [3, 5, 9, 4, 5, 9, 6, 7], [1, 2, 3, 4, 6, 7, 8, 10]])
STARTS = [2, 4, None]


def _peft_alora(base: Path, out: Path, invocation: list[int] = INVOCATION, **settings) -> Path:
    torch.manual_seed(0)
    settings = {"r": 4, "lora_alpha": 8} | settings
    model = get_peft_model(load_fp32(base), PeftLora(task_type="CAUSAL_LM", init_lora_weights=False,
                                                 alora_invocation_tokens=invocation, **settings))
    model.save_pretrained(out)
    return out


def _check_base_before_invocation(adapted: torch.Tensor, base: torch.Tensor) -> None:
    for row, start in enumerate(STARTS):
        before = slice(None) if start is None else slice(None, start)
        assert torch.equal(adapted[row, before], base[row, before])  # the KV cache is the base's
        if start is not None:
            assert (adapted[row, start:] - base[row, start:]).abs().amax(-1).min() > 1e-2


def test_last_starts_finds_the_last_occurrence_on_the_device():
    assert last_starts(IDS, torch.tensor(INVOCATION)).tolist() == [2, 4, -1]
    assert last_starts(IDS[:, :1], torch.tensor(INVOCATION)).tolist() == [-1, -1, -1]  # shorter than the invocation


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_peft_s_alora_loads_with_peft_s_logits_and_the_base_s_before_the_invocation(arch, models, tmp_path):
    """peft's aLoRA, far from identity (init_lora_weights=False), on Llama, Qwen2 (biased q/k/v) and GPT-2 (Conv1D):
    peftkit's logits are peft's, and every position before a row's invocation (all of a row without one) is the
    base model's, bit for bit."""
    adapter = _peft_alora(models[arch], tmp_path / "peft")
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(load_fp32(models[arch]), adapter).eval()(input_ids=IDS).logits
        ours = load_adapted_model(str(models[arch]), str(adapter), torch.device("cpu"))[0](input_ids=IDS).logits
        base = load_fp32(models[arch])(input_ids=IDS).logits
    assert (ours - theirs).abs().max() <= 1e-5
    _check_base_before_invocation(ours, base)


def test_peft_loads_our_alora_export_with_our_logits(models, tmp_path):
    cfg = LoraConfig(r=4, alpha=8, alora_invocation_tokens=INVOCATION, target_modules=["q_proj", "v_proj", "down_proj"])
    adapter = save_random_adapter(models["qwen2"], cfg, tmp_path / "ours", seed=3)
    config = yaml.safe_load((adapter / "adapter_config.json").read_text())
    assert config["alora_invocation_tokens"] == INVOCATION
    with torch.no_grad():
        ours = load_adapted_model(str(models["qwen2"]), str(adapter), torch.device("cpu"))[0](input_ids=IDS).logits
        theirs = PeftModel.from_pretrained(load_fp32(models["qwen2"]), adapter).eval()(input_ids=IDS).logits
        base = load_fp32(models["qwen2"])(input_ids=IDS).logits
    assert (ours - theirs).abs().max() <= 1e-5
    _check_base_before_invocation(ours, base)


def test_alora_gradients_equal_peft_s(models, tmp_path):
    """One training forward and backward, dropout off: the loss and every LoRA gradient equal peft's (≤ 1e-6); the
    adapter is updated only through the tokens from the invocation on. With gradient checkpointing too (its
    recomputed forward reads the same rows)."""
    adapter = _peft_alora(models["llama"], tmp_path / "peft")
    theirs = PeftModel.from_pretrained(load_fp32(models["llama"]), adapter, is_trainable=True).train()
    loss = theirs(input_ids=IDS, labels=IDS).loss
    loss.backward()
    expected = {n.replace("base_model.model.", "").replace(".default", ""): p.grad
                for n, p in theirs.named_parameters() if p.requires_grad}
    for checkpointing in (False, True):
        model = load_adapted_model(str(models["llama"]), str(adapter), torch.device("cpu"))[0]
        for p in adapter_layers(model).values():
            p.requires_grad_(True)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        ours = model(input_ids=IDS, labels=IDS).loss
        ours.backward()
        assert (ours - loss).abs() <= 1e-6
        grads = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
        assert grads.keys() == expected.keys() and all(g is not None for g in grads.values())
        assert max((grads[n] - expected[n]).abs().max() for n in grads) <= 1e-6


def test_generation_with_a_cache_is_greedy_decoding_without_one(models, tmp_path):
    """peftkit's generation (left-padded batch, KV cache: each new token's forward sees that token alone) gives
    greedy decoding with one full forward per token through the same model, which finds the invocation in the whole
    sequence each time: in a row holding it every new token is adapted, in a row without it none is (the base's
    continuation). peft's generate gives the same tokens."""
    path = models["llama"]
    adapter = _peft_alora(path, tmp_path / "peft")
    model = load_adapted_model(str(path), str(adapter), torch.device("cpu"))[0]
    tok = AutoTokenizer.from_pretrained(path)
    prompts = [[3, 4, 5, 9, 7], [6, 5, 9, 4, 5, 9, 6, 7, 8], [1, 2, 3, 4]]
    out = generate_ids(model, tok, prompts, Sampling(max_new_tokens=8))
    stops = stop_token_ids(model, tok)
    expected = [greedy_no_cache(model, p, stops, n=8) for p in prompts]
    assert out == expected
    assert out[2] == greedy_no_cache(load_fp32(path), prompts[2], stops, n=8)  # no invocation: the base's
    assert out[0] != greedy_no_cache(load_fp32(path), prompts[0], stops, n=8)
    for prompt, new in zip(prompts, out):  # (a full forward finds a later occurrence in generated text: none here)
        assert last_starts(torch.tensor([prompt + new]), torch.tensor(INVOCATION)).item() == \
            last_starts(torch.tensor([prompt]), torch.tensor(INVOCATION)).item()
    peft_model = PeftModel.from_pretrained(load_fp32(path), adapter).eval()
    with torch.no_grad():
        for prompt, new in zip(prompts, out):
            theirs = peft_model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                         eos_token_id=stops, pad_token_id=tok.pad_token_id)
            generated = theirs[0, len(prompt):].tolist()
            assert generated[:len(new)] == new


def _alora_recipe(tmp_path, model, data, invocation, **sections):
    recipe = make_recipe(tmp_path, model, data, **sections)
    raw = yaml.safe_load(recipe.read_text())
    raw["adapter"] |= {"target_modules": ["q_proj", "v_proj"], "alora_invocation_tokens": invocation}
    recipe.write_text(yaml.safe_dump(raw))
    return recipe


def test_a_run_trains_an_alora_that_peft_loads(tiny_llama, number_data, tmp_path):
    """`peftkit train` with alora_invocation_tokens the alpaca template's '### Response:' (as the tokenizer encodes it
    in context): the adapter trains, the export keeps the invocation, and peft loads it with peftkit's logits; the
    tokens before the invocation keep the base's."""
    from peftkit.train import train

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    invocation = tok("### Response:", add_special_tokens=False)["input_ids"]
    recipe = load_recipe(_alora_recipe(tmp_path, tiny_llama, number_data, invocation, training={"max_steps": 3}))
    train(recipe)
    adapter = Path(recipe.export.output_dir) / "adapter"
    assert yaml.safe_load((adapter / "adapter_config.json").read_text())["alora_invocation_tokens"] == invocation
    text = "### Instruction:\nWrite the number in words.\n\n### Input:\n12\n\n### Response:\ntwelve"
    ids = torch.tensor([tok(text)["input_ids"]])
    start = last_starts(ids, torch.tensor(invocation)).item()
    assert start > 0
    with torch.no_grad():
        ours = load_adapted_model(str(tiny_llama), str(adapter), torch.device("cpu"))[0](input_ids=ids).logits
        theirs = PeftModel.from_pretrained(load_fp32(tiny_llama), adapter).eval()(input_ids=ids).logits
        base = load_fp32(tiny_llama)(input_ids=ids).logits
    assert (ours - theirs).abs().max() <= 1e-5
    assert torch.equal(ours[:, :start], base[:, :start]) and (ours[:, start:] - base[:, start:]).abs().max() > 1e-3


def test_training_data_without_the_invocation_is_refused_and_partial_data_warned(tiny_llama, tmp_path, monkeypatch,
                                                                                 capsys):
    """Ids that occur in no example (the string encoded out of context, a typo) would train nothing: refused before
    the model loads, naming the decoded invocation. Examples without it are counted in a warning."""
    from peftkit.data import load_examples
    from peftkit.methods.alora import check_invocation
    from peftkit.recipe import DataConfig

    rows = [{"instruction": "Say it.", "input": "12" if i % 4 else "", "output": "twelve"} for i in range(8)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    data = {"train": tmp_path / "train.jsonl", "eval": tmp_path / "train.jsonl"}
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    recipe = _alora_recipe(tmp_path, tiny_llama, data, tok("@@", add_special_tokens=False)["input_ids"])
    err = cli_user_error(monkeypatch, capsys, "train", str(recipe))
    assert "occurs in none of the 8 training examples, so the adapter would be off on every trained token" in err
    assert "'@@'" in err and not (tmp_path / "run" / "adapter").exists()

    examples = load_examples(tok, str(data["train"]), None, DataConfig(train=str(data["train"]), format="alpaca"))[0]
    inputs = tok("### Input:", add_special_tokens=False)["input_ids"]  # only in the rows with an input: 6 of 8
    assert invocation_coverage(examples, inputs) == (6, 6)
    assert "2 of the 8 training examples train nothing" in check_invocation(inputs, examples, tok)
    response = tok("### Response:", add_special_tokens=False)["input_ids"]
    assert invocation_coverage(examples, response) == (8, 8) and check_invocation(response, examples, tok) is None
    # The closing EOS, each example's last labelled token: it is predicted at the position before the invocation.
    assert invocation_coverage(examples, [tok.eos_token_id]) == (8, 0)
    with pytest.raises(PeftkitError, match="occurs in 8 of the 8 training examples, but never before a labelled"):
        check_invocation([tok.eos_token_id], examples, tok)


@pytest.mark.parametrize(("adapter", "sections", "message"), [
    ({"alora_invocation_tokens": []}, {}, "'adapter.alora_invocation_tokens' = list: is empty; give the token ids"),
    ({"alora_invocation_tokens": [5], "use_dora": True}, {}, "(aLoRA) with use_dora is not supported"),
    ({"alora_invocation_tokens": [5], "init": "pissa"}, {}, "with init: pissa is not supported"),
    ({"alora_invocation_tokens": [5]}, {"export": {"merged": True}}, "export.merged: An aLoRA adapter"),
    ({"alora_invocation_tokens": [5]}, {"data": {"packing": True}}, "(aLoRA) with data.packing"),
])
def test_recipes_that_cannot_work_are_refused(adapter, sections, message, tiny_llama, number_data, tmp_path,
                                              monkeypatch, capsys):
    recipe = make_recipe(tmp_path, tiny_llama, number_data, **sections)
    raw = yaml.safe_load(recipe.read_text())
    raw["adapter"] |= adapter
    recipe.write_text(yaml.safe_dump(raw))
    assert message in cli_user_error(monkeypatch, capsys, "train", str(recipe))


def test_an_embedding_target_and_a_merge_are_refused(models, tmp_path, monkeypatch, capsys):
    cfg = LoraConfig(alora_invocation_tokens=INVOCATION, target_modules=["embed_tokens", "q_proj"])
    with pytest.raises(PeftkitError, match="'model.embed_tokens' is an Embedding, and aLoRA adapts linear layers"):
        inject_adapters(load_fp32(models["llama"]), cfg)
    adapter = _peft_alora(models["llama"], tmp_path / "peft")
    err = cli_user_error(monkeypatch, capsys, "merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged"))
    assert "An aLoRA adapter (alora_invocation_tokens) cannot be merged" in err and not (tmp_path / "merged").exists()
    model = load_adapted_model(str(models["llama"]), str(adapter), torch.device("cpu"))[0]
    with pytest.raises(PeftkitError, match="cannot be merged"):
        next(iter(adapter_layers(model).values())).merge()


def test_inspect_says_what_an_alora_is(models, tmp_path):
    from peftkit.inspect import inspect_adapter
    from peftkit.inspect_text import describe

    info = inspect_adapter(_peft_alora(models["llama"], tmp_path / "peft"))
    assert info["alora_invocation_tokens"] == INVOCATION and info["peftkit_reads"]["ok"]
    assert "activated      from the invocation [5, 9] on (aLoRA)" in "\n".join(describe(info))
    # no vLLM serves an aLoRA (vllm-project/vllm#19710 closed unmerged); the newest PEFTHelper refuses it, older ones
    # apply it to every token: a reason (inspect had a caveat, 'only a vLLM with activated-LoRA support honours it')
    assert not info["vllm"]["accepts"] and info["vllm"]["reasons"] == [
        "alora_invocation_tokens (aLoRA): vLLM serves no activated LoRA (vllm-project/vllm#19710 was closed unmerged): "
        "versions that read the field refuse it ('vLLM does not support Activated LoRA (aLoRA).'), older ones apply "
        "the adapter to every token, the prompt before the invocation too (different outputs, without an error)"]
    assert not any("aLoRA" in c for c in info["vllm"]["caveats"])
    assert any("activated-LoRA support" in c for c in info["llama_cpp"]["caveats"])


def test_a_4bit_base_takes_peft_s_alora_with_peft_s_logits(tmp_path):
    """QLoRA: peft's aLoRA on an NF4 base (its bitsandbytes layers' aLoRA path): peftkit's logits are peft's, and
    the positions before the invocation are the quantized base's."""
    from peftkit.adapters.state_dicts import load_adapter_state_dict
    from peftkit.peft_format import load_adapter
    from peftkit.tiny import build_tiny_model
    from tests.test_qlora import load_quantized

    path = tmp_path / "llama64"  # (hidden 64: k_proj's 32 rows, which bitsandbytes' CPU kernel needs)
    build_tiny_model(path, arch="llama", hidden_size=64, num_layers=2, seed=0)
    adapter = _peft_alora(path, tmp_path / "peft")
    cfg, state = load_adapter(adapter)[:2]
    ours = load_quantized(path)
    inject_adapters(ours, cfg, every_entry=False, state=state)
    load_adapter_state_dict(ours, state)
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(load_quantized(path), adapter).eval()(input_ids=IDS).logits
        logits = ours.eval()(input_ids=IDS).logits
        base = load_quantized(path).eval()(input_ids=IDS).logits
    assert (logits - theirs).abs().max() <= 1e-5
    _check_base_before_invocation(logits, base)


def test_named_adapters_refuse_an_alora(models, tmp_path):
    from peftkit.adapters.named import NamedAdapters

    adapters = NamedAdapters(load_fp32(models["llama"]))
    with pytest.raises(PeftkitError, match="'helper' is an activated LoRA .* load it alone"):
        adapters.load("helper", _peft_alora(models["llama"], tmp_path / "peft"))


def _peft_generate(model, prompts: list[list[int]], stops: list[int], pad: int, n: int) -> list[list[int]]:
    """peft's generate on a left-padded batch, each row cut before its first stop token."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=stops,
                             pad_token_id=pad)
    return [row[:next((i for i, t in enumerate(row) if t in stops), len(row))] for row in out[:, width:].tolist()]


@pytest.mark.parametrize("invocation", [[5, 9], [29]])
def test_generation_is_peft_s_and_a_generated_invocation_does_not_start_the_adapter(invocation, models, tmp_path):
    """Batches of left-padded prompts, some holding the invocation (twice in one), some not: peftkit's tokens are
    peft's generate's. The invocation [29], which the model itself generates in a row without it, does not start the
    adapter there: as peft's generate, the prompt alone invokes it."""
    path = models["llama"]
    adapter = _peft_alora(path, tmp_path / "peft", invocation, lora_alpha=32)
    model = load_adapted_model(str(path), str(adapter), torch.device("cpu"))[0]
    theirs = PeftModel.from_pretrained(load_fp32(path), adapter).eval()
    tok = AutoTokenizer.from_pretrained(path)
    stops = stop_token_ids(model, tok)
    generated = []
    for prompts in ([[3, 4, *invocation, 7], [6, *invocation, 4, *invocation, 6, 7, 8], [1, 2, 3, 4]],
                    [list(range(1, 13)), [30, 31, *invocation], [40, 41, 42]]):
        out = generate_ids(model, tok, prompts, Sampling(max_new_tokens=8))
        assert out == _peft_generate(theirs, prompts, stops, tok.pad_token_id, 8)
        generated += [new for prompt, new in zip(prompts, out) if not set(invocation) <= set(prompt)]
    if invocation == [29]:
        assert any(29 in new for new in generated)  # (the case this checks: generated, and no adapter after it)


def test_a_cache_cropped_back_before_the_invocation_runs_the_base(models, tmp_path):
    """The aLoRA workflow: a conversation's cache, the aLoRA invoked on it, the cache cropped back to the
    conversation, which goes on without the invocation: the base's tokens (and peft's), not the aLoRA's."""
    from transformers import DynamicCache

    path = models["llama"]
    adapter = _peft_alora(path, tmp_path / "peft", lora_alpha=32)
    conversation, invoked, going_on = [3, 4, 6, 7, 8], [*INVOCATION, 11], [12, 13, 14, 15]

    def run(model) -> list[int]:
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model.generate(input_ids=torch.tensor([conversation + invoked]), cache=cache, max_new_tokens=3,
                           do_sample=False, pad_token_id=0)
            cache.crop(len(conversation) - cache.get_seq_length())  # (a negative count: tokens dropped)
            out = model.generate(input_ids=torch.tensor([conversation + going_on]), cache=cache, max_new_tokens=6,
                                 do_sample=False, pad_token_id=0)
        return out[0, len(conversation + going_on):].tolist()

    ours = run(load_adapted_model(str(path), str(adapter), torch.device("cpu"))[0].eval())
    assert ours == run(PeftModel.from_pretrained(load_fp32(path), adapter).eval()) == run(load_fp32(path))


def test_a_bf16_base_rounds_as_peft_s_and_keeps_the_base_before_the_invocation(models, tmp_path):
    """bf16: the update is added in fp32 and the sum rounded once, as peft's in-place add: peft's logits bit for bit
    (rounding the update to bf16 first moved them by 0.03), and the base's before the invocation."""
    from peftkit.adapters.state_dicts import load_adapter_state_dict
    from peftkit.peft_format import load_adapter

    path = models["llama"]
    adapter = _peft_alora(path, tmp_path / "peft", lora_alpha=32)
    cfg, state = load_adapter(adapter)[:2]
    ours = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    inject_adapters(ours, cfg, every_entry=False, state=state)
    load_adapter_state_dict(ours, state)
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16),
                                           adapter).eval()(input_ids=IDS).logits
        logits = ours(input_ids=IDS).logits
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()(input_ids=IDS).logits
    assert torch.equal(logits, theirs)
    _check_base_before_invocation(logits, base)


def test_an_adapted_output_head_generates_as_peft_s(models, tmp_path):
    """generate computes the head on the last position only (logits_to_keep): an aLoRA on lm_head takes that
    position's row of the mask."""
    path = models["llama"]
    adapter = _peft_alora(path, tmp_path / "peft", target_modules=["q_proj", "lm_head"])
    model = load_adapted_model(str(path), str(adapter), torch.device("cpu"))[0]
    tok = AutoTokenizer.from_pretrained(path)
    prompts = [[3, 4, 5, 9, 7], [1, 2, 3, 4]]
    theirs = PeftModel.from_pretrained(load_fp32(path), adapter).eval()
    assert generate_ids(model, tok, prompts, Sampling(max_new_tokens=6)) == \
        _peft_generate(theirs, prompts, stop_token_ids(model, tok), tok.pad_token_id, 6)


def test_another_method_s_alora_field_is_refused(models, tmp_path):
    """aLoRA is LoRA's: an AdaLoRA file with alora_invocation_tokens (peft's own forward fails on it) is refused, not
    loaded as an AdaLoRA on every token."""
    from peftkit.peft_format import load_adapter

    adapter = _peft_alora(models["llama"], tmp_path / "peft")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config |= {"peft_type": "ADALORA", "init_r": 4, "target_r": 4, "total_step": 10}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(PeftkitError, match="'alora_invocation_tokens' is \\[5, 9\\]: activated LoRA"):
        load_adapter(adapter)


def test_the_coverage_search_in_chunks_finds_what_one_pass_finds(tiny_llama, number_data, monkeypatch):
    """The training-data check searches the flat token array a chunk at a time (bounded memory on large data): chunks
    of 5 tokens, occurrences straddling them, give the counts one pass gives."""
    import peftkit.methods.alora as alora
    from peftkit.data import load_examples
    from peftkit.recipe import DataConfig

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    data = DataConfig(train=str(number_data["train"]), format="alpaca")
    examples = load_examples(tok, str(number_data["train"]), None, data)[0]
    invocations = [tok(text, add_special_tokens=False)["input_ids"] for text in ("### Response:", "hundred", "zzz")]
    whole = [invocation_coverage(examples, ids) for ids in invocations]
    monkeypatch.setattr(alora, "COVERAGE_CHUNK", 5)
    assert [invocation_coverage(examples, ids) for ids in invocations] == whole
    assert whole[0] == (64, 64) and 0 < whole[1][0] < 64 and whole[2] == (0, 0)
