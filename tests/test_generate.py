"""`peftkit generate`: cached, batched, left-padded generation gives the tokens of cache-free greedy decoding
(one full forward of the whole sequence per new token) for every method on every tiny architecture, over a
4-bit base too; `--data` generates from the prompt tokens training used; bad input is a clear error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftkit.adapters import inject_adapters
from peftkit.data import load_examples
from peftkit.data.prompts import Prompt, load_prompts
from peftkit.decoding import Sampling, generate_ids, generate_texts, stop_token_ids
from peftkit.errors import PeftkitError
from peftkit.recipe import DataConfig
from tests.conftest import cli_user_error, make_recipe, random_adapters
from tests.test_methods import CASES, models  # noqa: F401  (the fixture: tiny llama, qwen2 and gpt2)

PROMPTS = ["### Instruction:\nadd 12 and 30\n\n### Response:\n", "hi", "count: 1 2 3 4 5 6 7 8 9"]
NEW = 12


def greedy_no_cache(model, ids: list[int], stops: list[int], n: int = NEW) -> list[int]:
    """The reference: argmax of one full forward (no KV cache, no padding) per new token, up to a stop token."""
    seq = list(ids)
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([seq]), use_cache=False).logits[0, -1]
        token = int(logits.argmax())
        if token in stops:
            break
        seq.append(token)
    return seq[len(ids):]


def _check_matches_reference(model, tok) -> None:
    prompts = [Prompt(tok(p)["input_ids"], p) for p in PROMPTS]
    texts = generate_texts(model, tok, prompts, Sampling(max_new_tokens=NEW), batch_size=len(prompts))
    stops = stop_token_ids(model, tok)
    expected = [tok.decode(greedy_no_cache(model, p.ids, stops), skip_special_tokens=True) for p in prompts]
    assert texts == expected
    assert len(set(texts)) > 1 and any(texts)  # not trivially empty or identical


@pytest.mark.parametrize("name", sorted(CASES))  # AdapterFusion: tests/test_fusion.py
# gemma2: a sliding window of 8, which the pads in front of a short prompt pushed the prompt family's virtual tokens
# out of (they come before the pads): such batches are not padded.
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gemma2"])
def test_batched_generation_is_cache_free_greedy(name, arch, models):  # noqa: F811
    case = CASES[name][0]
    if arch not in case.archs:
        pytest.skip(f"{case.id} does not run on {arch}")
    if name == "lily":  # (README: in peft as here; tests/test_lily.py checks that a row depends on the others)
        pytest.skip("Lily's router averages over the batch's tokens, in generation over each step's: a row's answer "
                    "depends on the other rows and on the cache, unlike cache-free greedy decoding of it alone")
    model = AutoModelForCausalLM.from_pretrained(models[arch], dtype=torch.float32).eval()
    torch.manual_seed(0)
    inject_adapters(model, case.cfg)
    random_adapters(model, seed=1, std=0.3)
    _check_matches_reference(model, AutoTokenizer.from_pretrained(models[arch]))


def test_generation_over_a_4bit_base(models):  # noqa: F811
    from peftkit.methods.lora import LoraConfig
    from peftkit.modeling import load_model
    from peftkit.recipe import ModelConfig, QuantizationConfig

    quant = QuantizationConfig(method="nf4", double_quant=True, compute_dtype="float32")
    model = load_model(ModelConfig(name_or_path=str(models["llama"]), dtype="float32"), quant, torch.device("cpu"))
    torch.manual_seed(0)
    inject_adapters(model, LoraConfig(r=4, alpha=8))
    random_adapters(model, seed=1, std=0.3)
    _check_matches_reference(model.eval(), AutoTokenizer.from_pretrained(models["llama"]))


@pytest.mark.parametrize("decoding", [
    {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05},  # Qwen2.5-Instruct's
    {"no_repeat_ngram_size": 2}, {"num_beams": 2}, {"min_new_tokens": 5}])
def test_greedy_ignores_the_decoding_options_of_the_model_s_generation_config(decoding, models, tmp_path):  # noqa: F811
    """transformers fills what a generate() call leaves unset from generation_config.json: a chat model's shipped
    options must not change greedy answers (nor eval.metrics' scores of them)."""
    shipped = tmp_path / "model"
    shutil.copytree(models["llama"], shipped)
    config = json.loads((shipped / "generation_config.json").read_text())
    (shipped / "generation_config.json").write_text(json.dumps(config | decoding))
    model = AutoModelForCausalLM.from_pretrained(shipped, dtype=torch.float32).eval()
    assert all(getattr(model.generation_config, k) == v for k, v in decoding.items())
    _check_matches_reference(model, AutoTokenizer.from_pretrained(shipped))


def test_sampling_is_seeded(models):  # noqa: F811
    model = AutoModelForCausalLM.from_pretrained(models["llama"], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(models["llama"])
    prompts = [Prompt(tok("hi")["input_ids"], "hi")]
    runs = [generate_texts(model, tok, prompts, Sampling(NEW, temperature=1.5, seed=s)) for s in (1, 1, 2)]
    assert runs[0] == runs[1] != runs[2]


def transformers_answer(model, tok, prompt: str | list[int], seed: int = 0, new: int = NEW, **options) -> str:
    """The reference, built apart from peftkit: transformers' own generate() of the plain model, one prompt (text or
    ids) unpadded, with these GenerationConfig values and torch seeded with `seed`, cut at the tiny tokenizer's EOS
    (its one stop)."""
    from transformers import GenerationConfig

    ids = torch.tensor([tok(prompt)["input_ids"] if isinstance(prompt, str) else prompt])
    config = GenerationConfig(max_new_tokens=new, pad_token_id=tok.pad_token_id, eos_token_id=[tok.eos_token_id],
                              **options)
    torch.manual_seed(seed)
    with torch.no_grad():
        new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    new = new[0, ids.shape[1]:].tolist()
    return tok.decode(new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new, skip_special_tokens=True)


@pytest.mark.parametrize("flags, options", [
    ({"top_k": 5}, {"top_k": 5, "top_p": 1.0}),
    ({"min_p": 0.5}, {"min_p": 0.5, "top_k": 0, "top_p": 1.0}),
    ({"top_k": 8, "top_p": 0.9, "min_p": 0.1}, {"top_k": 8, "top_p": 0.9, "min_p": 0.1}),
])
def test_sampling_cuts_are_transformers_own(flags, options, tiny_llama):
    """--top-k and --min-p sample as transformers' generate() does with the same GenerationConfig values and seed."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    prompts = [Prompt(tok(p)["input_ids"], p) for p in PROMPTS]
    ours = [generate_texts(model, tok, [p], Sampling(NEW, temperature=1.5, seed=3, **flags))[0] for p in prompts]
    uncut = [generate_texts(model, tok, [p], Sampling(NEW, temperature=1.5, seed=3))[0] for p in prompts]
    assert ours == [transformers_answer(model, tok, p, 3, do_sample=True, temperature=1.5, **options) for p in PROMPTS]
    assert ours != uncut  # the cut changed the answers


@pytest.mark.parametrize("flags, options", [
    ({}, {"do_sample": False}),  # greedy decoding
    ({"temperature": 1.5, "seed": 3}, {"do_sample": True, "temperature": 1.5, "top_k": 0, "top_p": 1.0}),
    ({"temperature": 1.5, "seed": 3, "top_k": 8}, {"do_sample": True, "temperature": 1.5, "top_k": 8, "top_p": 1.0}),
])
def test_the_repetition_penalty_is_transformers_own(flags, options, tiny_llama):
    """--repetition-penalty, greedy or sampled, decodes as transformers' generate() with the same values and seed."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    prompts = [Prompt(tok(p)["input_ids"], p) for p in PROMPTS]
    ours = [generate_texts(model, tok, [p], Sampling(NEW, repetition_penalty=3.0, **flags))[0] for p in prompts]
    seed = flags.get("seed", 0)
    assert ours == [transformers_answer(model, tok, p, seed, repetition_penalty=3.0, **options) for p in PROMPTS]
    assert ours != [generate_texts(model, tok, [p], Sampling(NEW, **flags))[0] for p in prompts]  # it penalized


def test_the_repetition_penalty_leaves_a_padded_row_s_pads_out(tiny_llama):
    """transformers' penalty finds a row's pads by the attention mask's first 1, which a prompt-family adapter's
    virtual tokens put in front: it penalized the pads as tokens of the prompt, and with the EOS as pad (a tokenizer
    without a pad token) a padded row's answer ran on past where it ends alone."""
    from peftkit.decoding import generate_ids
    from peftkit.methods.prompt_tuning import PromptTuningConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    torch.manual_seed(0)
    inject_adapters(model, PromptTuningConfig(method="prompt_tuning", num_virtual_tokens=4))
    random_adapters(model, seed=1, std=0.3)
    tok.pad_token = tok.eos_token
    rows = [tok(p)["input_ids"] for p in ("hi", PROMPTS[2])]
    sampling = Sampling(NEW, repetition_penalty=1.3)
    first = generate_ids(model, tok, rows[:1], sampling)[0][0]
    with torch.no_grad():  # the EOS a hair likelier than that first token: alone, "hi" is answered with the EOS
        head = model.get_output_embeddings().weight
        head[tok.eos_token_id] = 1.01 * head[first]
    alone = [generate_ids(model, tok, [row], sampling)[0] for row in rows]
    assert alone[0] == []
    assert generate_ids(model, tok, rows, sampling) == alone  # the old code answered "hi" with its first token


def test_stop_strings_cut_the_answer_before_them(tiny_llama, tmp_path):
    """--stop: each answer of one padded batch ends before the first stop string its text holds, the string left out,
    and generation ends at the token that completes it. The greedy answers of the tiny model (20 tokens):
    '`T`T`T`T`^mq`^mq' (the instruction; `<unk>` tokens between its '`' and 'T' or '^' decode to nothing), 'qqq...'
    ("hi") and 'P66666V6V6VrPBSVBB6B' (the count)."""
    from typer.testing import CliRunner

    from peftkit.cli import app
    from peftkit.decoding import generate_ids

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    greedy = [transformers_answer(model, tok, p, new=20, do_sample=False) for p in PROMPTS]
    assert greedy[0] == "`T`T`T`T`^mq`^mq" and greedy[2] == "P66666V6V6VrPBSVBB6B"
    for stop, cut in [(("6V",), ["`T`T`T`T`^mq`^mq", "qqqqqqqqqqqqqqqqqqqq", "P6666"]),
                      (("`^m", "qqq", "6"), ["`T`T`T`T", "", "P"]),  # '`^m': text that decoding made of '`<unk>^m'
                      (("9P", "zz"), greedy),  # '9P': the count's 9 and the answer's P; the answer holds no 9P
                      (("<unk>",), ["`T`T`", *greedy[1:]]),  # a special token, which decoding drops from the text
                      # '`T`T`T' straddles the first <unk>, where the answer ends: what follows is not the answer's
                      (("<unk>", "`T`T`T"), ["`T`T`", *greedy[1:]])]:
        out = tmp_path / "gen.json"
        args = ["generate", "--model", str(tiny_llama), *(a for p in PROMPTS for a in ("--prompt", p)),
                "--max-new-tokens", "20", "--json", str(out), *(a for s in stop for a in ("--stop", s))]
        assert CliRunner().invoke(app, args).exit_code == 0
        assert [r["completion"] for r in json.loads(out.read_text())] == cut
    ids = generate_ids(model, tok, [tok(p)["input_ids"] for p in PROMPTS], Sampling(20, stop=("6V", "^m")))
    assert [len(row) for row in ids] == [14, 20, 7]  # '`T`T`<unk>T`<unk>T`<unk>^m', 'qqq...', 'P66666V'
    assert stop_token_ids(model, tok, ("<unk>", "6V", "<unk>")) == [tok.eos_token_id, tok.unk_token_id]


def _byte_level_tokenizer():
    """A byte-level BPE (GPT-2's kind), trained here on text of 2-, 3- and 4-byte characters: tokens that split one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(STOP_TEXTS * 20, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|end|>", "<|sep|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|end|>", additional_special_tokens=["<|sep|>"])


def _sentencepiece_tokenizer():
    """Llama 2's kind: '▁' pieces, a leading space stripped from the decoded text, bytes for what the pieces lack."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece in ["▁", "a", "b", "▁a", "▁ab", "ab", "é", "▁é", "n", "'", "t", ".", "▁n"]:
        vocab[piece] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _cleaning_char_tokenizer():
    """The tiny character tokenizer, told to clean up spaces before punctuation ("do n't ." decodes "don't.")."""
    from peftkit.tiny import build_char_tokenizer

    tok = build_char_tokenizer()
    tok.clean_up_tokenization_spaces = True
    return tok


STOP_TEXTS = ["héllo wörld, naïve café", "中文字符 and 日本語 text", "emoji 😀 🎉 here", "do n't it . ab ! a b"]


def _first_stop(crit, ids: list[int]) -> int | None:
    """The answer length at which the stop check `crit` first ends the row, fed one token a step behind a prompt
    token (width 1); None: never."""
    for n in range(1, len(ids) + 1):
        if crit(torch.tensor([[0] + ids[:n]]), None)[0]:
            return n
    return None


@pytest.mark.parametrize("make_tok", [_byte_level_tokenizer, _sentencepiece_tokenizer, _cleaning_char_tokenizer])
def test_the_stop_check_ends_a_row_where_its_whole_text_first_holds_a_stop_string(make_tok):
    """The stop check decodes the answer's last tokens, not all of them, and must find what decoding all of them
    finds: the first answer length whose decoded text holds a stop string. Checked on random answers (text the
    tokenizer encodes, special tokens, which decoding skips, in runs of up to 40 between, stray byte tokens) and
    stop strings of their text, for tokenizers whose decoding of a window differs at its start from the whole's: a
    byte-level BPE (a character split between tokens), a sentencepiece one (a leading space stripped) and one that
    cleans up spaces before punctuation."""
    import random

    from peftkit.decoding import _holds, _StopAtText

    tok = make_tok()
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731  (generate's)
    specials = [i for i in tok.all_special_ids if i != tok.eos_token_id]
    rng = random.Random(0)
    for trial in range(60):
        ids: list[int] = []
        while len(ids) < 80:
            kind = rng.random()
            if kind < 0.15:
                ids += [rng.choice(specials)] * rng.choice([1, 1, 3, 40])
            elif kind < 0.2:
                ids.append(rng.randrange(len(tok)))
            else:
                text = rng.choice(STOP_TEXTS)
                start = rng.randrange(len(text))
                ids += tok(text[start:start + rng.randrange(1, 12)], add_special_tokens=False)["input_ids"]
        whole = decode(ids)
        starts = [rng.randrange(len(whole)) for _ in range(rng.choice([1, 2]))] if whole else []
        stop = tuple(dict.fromkeys(whole[s:s + rng.randrange(1, 6)] for s in starts))
        if not stop or any("\ufffd" in s for s in stop):  # (a byte of a split character: no one's stop string)
            continue
        expected = next((n for n in range(1, len(ids) + 1) if _holds(decode(ids[:n]), stop)), None)
        assert _first_stop(_StopAtText(stop, 1, set(), decode), ids) == expected, (trial, stop, whole)
    ab = tok("ab", add_special_tokens=False)["input_ids"]  # a stop string across 40 skipped special tokens
    assert _first_stop(_StopAtText(("ab",), 1, set(), decode), ab[:-1] + specials[:1] * 40 + ab[-1:]) == len(ab) + 40


def test_the_stop_check_decodes_a_bounded_window_a_step(tiny_llama):
    """--stop decoded each row's whole answer at every step (and each of its beginnings once more after), so its
    cost grew with the square of the answer's length: 120 new tokens in 3 rows decoded about 44,000 tokens. The
    check now decodes a window of the last tokens a step, which holds 7 + 8 characters (the stop string's and 8 more)
    before the newest token's: here 16 tokens, or 32 where skipped <unk> tokens decode to nothing."""
    from peftkit.decoding import generate_ids

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    decoded = []

    def decode(ids: list[int]) -> str:
        decoded.append(len(ids))
        return tok.decode(ids, skip_special_tokens=True)

    rows = [tok(p)["input_ids"] for p in PROMPTS]
    answers = generate_ids(model, tok, rows, Sampling(120, stop=("~never~",)), decode=decode)
    assert min(map(len, answers)) > 100  # (no row ended early)
    assert sum(decoded) < 120 * len(rows) * 40  # (the old check: 43,560)


def test_data_batches_decode_as_each_prompt_alone(tiny_llama, number_data, tmp_path):
    """`peftkit generate --data` with a repetition penalty and a stop string: each row of the padded batches answers
    as transformers' generate() answers its prompt alone, cut before the stop string."""
    from typer.testing import CliRunner

    from peftkit.cli import app

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    prompts = load_prompts(tok, str(number_data["eval"]), "train", DataConfig(train=str(number_data["eval"])), 6)
    assert len({len(p.ids) for p in prompts}) > 1  # padded batches
    alone = [transformers_answer(model, tok, p.ids, repetition_penalty=1.5) for p in prompts]
    stop = alone[0][2:4]  # a piece of the first answer
    out = tmp_path / "gen.json"
    args = ["generate", "--model", str(tiny_llama), "--data", str(number_data["eval"]), "--limit", "6",
            "--batch-size", "4", "--max-new-tokens", str(NEW), "--repetition-penalty", "1.5", "--stop", stop,
            "--json", str(out)]
    assert CliRunner().invoke(app, args).exit_code == 0
    assert [r["completion"] for r in json.loads(out.read_text())] == [a.split(stop)[0] for a in alone]


def test_under_dynamic_rope_a_prompt_answers_as_on_a_fresh_model_whatever_came_before(tmp_path):
    """transformers' dynamic RoPE keeps the frequencies of the longest sequence it has seen until a forward shorter
    than the original context comes: a prompt past that context was answered with the frequencies of the prompt
    before it (or of `peftkit eval`'s loss batches). Each generation starts from the model's own frequencies, as the
    same prompt on a freshly loaded model does (transformers' generate of it: the same tokens)."""
    from transformers import AutoConfig

    from peftkit.tiny import build_tiny_model

    build_tiny_model(tmp_path, arch="llama", hidden_size=32, num_layers=2, seed=0, max_position_embeddings=24)
    config = AutoConfig.from_pretrained(tmp_path)
    config.rope_parameters = {"rope_type": "dynamic", "factor": 4.0, "rope_theta": config.rope_parameters["rope_theta"]}

    def fresh():
        return AutoModelForCausalLM.from_pretrained(tmp_path, config=config, dtype=torch.float32).eval()

    tok = AutoTokenizer.from_pretrained(tmp_path)
    longer, later = (tok(t)["input_ids"] for t in ("count: 1 2 3 4 5 6 7 8 9 10 11 12", "say: one two three four five"))
    assert 24 < len(later) < len(longer)  # past the original context from the prompt on
    sampling = Sampling(max_new_tokens=40)
    alone = generate_ids(fresh(), tok, [later], sampling)[0]
    assert tok.decode(alone) == transformers_answer(fresh(), tok, later, new=40)
    model = fresh()
    generate_ids(model, tok, [longer], sampling)  # 74 positions: frequencies for more than `later`'s 69
    assert generate_ids(model, tok, [later], sampling)[0] == alone  # (before: [35, 80, 89, ...], alone [59, 89, 59, ...])
    prompts = [Prompt(longer, "longer"), Prompt(later, "later")]
    assert generate_texts(fresh(), tok, prompts, sampling, batch_size=1)[1] == tok.decode(alone)


DEFAULTS = ["--temperature", "0", "--top-p", "1", "--top-k", "0", "--min-p", "0", "--repetition-penalty", "1",
            "--seed", "0"]  # (and no --stop)


def test_the_decoding_defaults_given_explicitly_change_no_answer(tiny_llama, tmp_path):
    """`peftkit generate` with every decoding flag at its default gives the greedy answers it gives without them."""
    from typer.testing import CliRunner

    from peftkit.cli import app

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    answers = []
    for flags in ([], DEFAULTS):
        out = tmp_path / f"{len(flags)}.json"
        args = ["generate", "--model", str(tiny_llama), *(a for p in PROMPTS for a in ("--prompt", p)),
                "--max-new-tokens", str(NEW), "--json", str(out), *flags]
        assert CliRunner().invoke(app, args).exit_code == 0
        answers.append([r["completion"] for r in json.loads(out.read_text())])
    greedy = [tok.decode(greedy_no_cache(model, tok(p)["input_ids"], [tok.eos_token_id]), skip_special_tokens=True)
              for p in PROMPTS]
    assert answers == [greedy, greedy]


@pytest.mark.parametrize("fmt", ["alpaca", "chat"])
def test_data_prompts_are_the_prompts_training_used(fmt, tiny_llama, tmp_path):
    """The prompt tokens of each row are exactly the masked (no-loss) prefix of its training example."""
    from peftkit.tiny import write_jsonl

    rows = ([{"instruction": "add 1 and 2", "output": "3"}, {"instruction": "sum", "input": "4 5", "output": "9"}]
            if fmt == "alpaca" else
            [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}])
    write_jsonl(tmp_path / "d.jsonl", rows)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    cfg = DataConfig(train=str(tmp_path / "d.jsonl"), format=fmt)
    prompts = load_prompts(tok, cfg.train, "train", cfg)
    examples, _ = load_examples(tok, cfg.train, "train", cfg)
    for prompt, example, row in zip(prompts, examples, rows, strict=True):
        masked = next(i for i, label in enumerate(example.labels) if label != -100)
        assert prompt.ids == example.input_ids[:masked]
        assert prompt.reference == (row["output"] if fmt == "alpaca" else "hello")


def test_format_help_names_every_format_with_prompts():
    """`generate --format`'s help names each data format whose rows have a prompt to generate from: it said
    'alpaca | chat | completion', while preference pairs, unpaired answers and tokenized rows generate too
    (`load_prompts`); text and classification rows have none and are refused."""
    from typing import get_args

    from typer.testing import CliRunner

    from peftkit.cli import app

    said = " ".join(CliRunner().invoke(app, ["generate", "--help"], terminal_width=200).output.split())
    named = said.split("--format <str> ")[1].split(";")[0].split(" (")[0].split(" | ")
    assert named == [f for f in get_args(DataConfig.model_fields["format"].annotation)
                     if f not in ("text", "classification")]


def test_cli_generates_from_a_run_directory(tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    """`peftkit generate RUN_DIR --data ... --json OUT`: the run's adapter applied, one completion per row, each
    the same as generating through the adapter loaded by hand."""
    from rich.console import Console

    from peftkit.cli import main
    from peftkit.adapter_base import load_adapted_model
    from peftkit.recipe import load_recipe
    from peftkit.train import train

    recipe = make_recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 3, "lr": 5e-2})
    train(load_recipe(recipe), console=Console(quiet=True))
    out = tmp_path / "gen.json"
    monkeypatch.setattr("sys.argv", ["peftkit", "generate", str(tmp_path / "run"), "--limit", "3",
                                     "--max-new-tokens", "8", "--json", str(out)])
    main()
    results = json.loads(out.read_text())
    assert [sorted(r) for r in results] == [["completion", "prompt", "reference"]] * 3
    model, _, tok, *_ = load_adapted_model(None, str(tmp_path / "run" / "adapter"))
    prompts = load_prompts(tok, str(number_data["eval"]), "train", DataConfig(train=str(number_data["eval"])), 3)
    assert [r["completion"] for r in results] == generate_texts(model, tok, prompts, Sampling(max_new_tokens=8))
    assert "3 completions written" in capsys.readouterr().out


def test_generation_stops_at_the_token_the_chat_template_closes_turns_with(tiny_llama):
    """A base model's config names its EOS only (Llama 3's `<|end_of_text|>`), and its chat fine-tune learns to end a
    turn with the template's `<|eot_id|>`: generation ran past it to --max-new-tokens, into a made-up next turn."""
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert stop_token_ids(model, tok) == [tok.eos_token_id]  # the tiny template closes turns with </s>, its EOS
    tok.chat_template = tok.chat_template.replace("</s>", "<pad>")
    assert stop_token_ids(model, tok) == [tok.eos_token_id, tok.pad_token_id]
    tok.chat_template = tok.chat_template.replace("<pad>", "")  # turns closed by a newline: nothing to stop at
    assert stop_token_ids(model, tok) == [tok.eos_token_id]
    template = tok.chat_template.replace("\n{% endfor %}", "<pad>\n{% endfor %}")
    tok.chat_template = {"default": template, "tool_use": "{{ messages }}"}  # named templates (Hermes, Command-R)
    assert stop_token_ids(model, tok) == [tok.eos_token_id, tok.pad_token_id]  # apply_chat_template's: "default"


def test_the_printed_prompt_and_completion_are_the_text_itself(tiny_llama, tmp_path):
    """Printed through rich markup, a prompt ending in two backslashes showed one, and a completion ending in one
    showed two."""
    from typer.testing import CliRunner

    from peftkit.cli import app

    args = ["generate", "--model", str(tiny_llama), "--prompt", "[b]x\\\\", "--max-new-tokens", "3"]
    assert CliRunner().invoke(app, [*args, "--json", str(tmp_path / "g.json")]).exit_code == 0
    [result] = json.loads((tmp_path / "g.json").read_text())
    printed = CliRunner().invoke(app, args).output
    assert printed.splitlines()[0] == "[b]x\\\\" + result["completion"].split("\n")[0]


@pytest.mark.parametrize("flags, said", [
    ({"top_p": 0.9}, "--top-p changes nothing under greedy decoding"),
    ({"top_p": 0.9, "seed": 3}, "--top-p and --seed change nothing under greedy decoding"),
    ({"top_k": 40}, "--top-k changes nothing under greedy decoding"),
    ({"min_p": 0.05, "top_k": 40, "seed": 1}, "--top-k, --min-p and --seed change nothing under greedy decoding"),
])
def test_sampling_flags_under_greedy_decoding_are_said_to_do_nothing(flags, said):
    """--top-p and --seed were silently ignored without --temperature; sampling with them says nothing."""
    import warnings

    from peftkit.decoding import Sampling
    from peftkit.errors import PeftkitWarning

    with pytest.warns(PeftkitWarning, match=said):
        Sampling(**flags).check()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Sampling(temperature=0.7, **flags).check()
        Sampling().check()


def test_bad_input_is_a_clear_error(tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    model = str(tiny_llama)
    assert "--temperature -1.0: must be a number >= 0" in cli_user_error(
        monkeypatch, capsys, "generate", "--model", model, "--prompt", "x", "--temperature", "-1")
    assert "--temperature 1e-45: too small to sample with; use 0 for greedy decoding, or at least 1e-05." in (
        cli_user_error(monkeypatch, capsys, "generate", "--model", model, "--prompt", "x", "--temperature", "1e-45"))
    assert "--seed 99999999999999999999: must be an integer from -2**63 to 2**64 - 1." in cli_user_error(
        monkeypatch, capsys, "generate", "--model", model, "--prompt", "x", "--seed", "99999999999999999999")
    for command in ("generate", "chat"):
        for flag, value, said in [("--top-k", "-1", "--top-k -1: must be an integer >= 0 (0 = no cut)."),
                                  ("--min-p", "1.5", "--min-p 1.5: must be in [0, 1] (0 = no cut)."),
                                  ("--min-p", "nan", "--min-p nan: must be in [0, 1] (0 = no cut)."),
                                  ("--repetition-penalty", "0", "--repetition-penalty 0.0: must be a number > 0 (1 = "
                                   "none; above 1 discourages repeating a token, e.g. 1.1)."),
                                  ("--repetition-penalty", "inf", "--repetition-penalty inf: must be a number > 0"),
                                  ("--stop", "", "--stop '': an empty stop string would end every answer before its "
                                   "first token")]:
            given = ["--prompt", "x"] if command == "generate" else []
            assert said in cli_user_error(monkeypatch, capsys, command, "--model", model, *given, flag, value)
    assert "Give --prompt or --data, not both" in cli_user_error(
        monkeypatch, capsys, "generate", "--model", model, "--prompt", "x", "--data", str(number_data["eval"]))
    assert "Nothing to generate from" in cli_user_error(monkeypatch, capsys, "generate", "--model", model)
    assert "--limit takes the first N rows of --data" in cli_user_error(  # it was ignored
        monkeypatch, capsys, "generate", "--model", model, "--prompt", "x", "--limit", "2")
    assert "--format 'text' has no prompt to generate from" in cli_user_error(
        monkeypatch, capsys, "generate", "--model", model, "--data", str(number_data["eval"]), "--format", "text")
    plain = tmp_path / "no-template"
    shutil.copytree(tiny_llama, plain)
    for f in plain.glob("chat_template.*"):
        f.unlink()
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    assert "This tokenizer has no chat_template" in cli_user_error(
        monkeypatch, capsys, "generate", "--model", str(plain), "--prompt", "x", "--chat")
    said = cli_user_error(monkeypatch, capsys, "chat", "--model", str(plain))  # a way out chat has: not "drop --chat"
    assert "no chat_template" in said and "peftkit chat needs one" in said and "--chat" not in said


def test_past_a_learned_position_table_is_a_clear_error(tmp_path, monkeypatch, capsys):
    """GPT-2's positions are a table (here 48): a prompt, its new tokens, an eval example or a prompt-tuning adapter's
    virtual tokens past it are refused with the count (they failed with an IndexError traceback)."""
    from peftkit.tiny import build_tiny_model, number_rows, write_jsonl

    build_tiny_model(tmp_path / "gpt2", arch="gpt2", hidden_size=32, num_layers=1, seed=0, max_position_embeddings=48)
    model = str(tmp_path / "gpt2")
    long = "1 2 3 4 5 6 7 8 9 " * 3  # 55 tokens
    assert ("The longest prompt needs 55 tokens + 4 new tokens (max_new_tokens) = 59, more than the 48 positions this "
            "gpt2 model has") in " ".join(cli_user_error(monkeypatch, capsys, "generate", "--model", model, "--prompt",
                                                         long, "--max-new-tokens", "4").split())
    write_jsonl(tmp_path / "rows.jsonl", [{"prompt": long, "completion": "x"}])
    err = " ".join(cli_user_error(monkeypatch, capsys, "eval", "--model", model, "--data", str(tmp_path / "rows.jsonl"),
                                  "--format", "completion").split())
    assert "The longest example of" in err and "more than the 48 positions" in err and "Lower --max-length" in err
    write_jsonl(tmp_path / "fit.jsonl", number_rows(4, seed=0))
    recipe = make_recipe(tmp_path, tmp_path / "gpt2", {"train": tmp_path / "fit.jsonl", "eval": tmp_path / "fit.jsonl"},
                         data={"max_length": 48})
    raw = yaml.safe_load(recipe.read_text())
    raw["adapter"] = {"method": "prompt_tuning", "num_virtual_tokens": 4}
    recipe.write_text(yaml.safe_dump(raw))
    err = " ".join(cli_user_error(monkeypatch, capsys, "train", str(recipe)).split())
    assert "data.max_length 48 plus the adapter's 4 virtual tokens is longer than the 48 positions" in err
    assert "Lower data.max_length to 44" in err


def test_a_run_whose_samples_pass_a_learned_position_table_is_refused_before_training(tmp_path, monkeypatch, capsys):
    """eval.samples' prompts (32 tokens) + a prompt-tuning adapter's 4 virtual tokens + eval.max_new_tokens 16 = 52,
    past GPT-2's 48 positions: the run trained to its end, then stopped generating the samples, before the export
    (no adapter written). It is refused before the model loads; 12 new tokens fit."""
    from peftkit.recipe import load_recipe
    from peftkit.rope_scaling import check_answer_room
    from peftkit.samples import sample_prompts
    from peftkit.tiny import build_tiny_model, write_jsonl

    build_tiny_model(tmp_path / "gpt2", arch="gpt2", hidden_size=32, num_layers=1, seed=0, max_position_embeddings=48)
    write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "1 2 3 4 5 6 7 8 9 1 2 3 4 5 6 7", "completion": " ok"}] * 4)
    recipe = make_recipe(tmp_path, tmp_path / "gpt2", {"train": tmp_path / "rows.jsonl", "eval": tmp_path / "rows.jsonl"},
                         data={"max_length": 44, "format": "completion"}, training={"max_steps": 1},
                         eval={"samples": 2, "max_new_tokens": 16, "base_model": False})
    raw = yaml.safe_load(recipe.read_text())
    raw["adapter"] = {"method": "prompt_tuning", "num_virtual_tokens": 4}
    recipe.write_text(yaml.safe_dump(raw))
    err = " ".join(cli_user_error(monkeypatch, capsys, "train", str(recipe)).split())
    assert ("eval.max_new_tokens 16: the run's generations (eval.samples, eval.metrics) answer prompts of data.eval "
            "that need 32 tokens + the adapter's 4 virtual tokens + 16 new tokens = 52 positions, more than the 48 "
            "positions") in err and "Lower eval.max_new_tokens to 12" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing trained
    fits = load_recipe(recipe, ["eval.max_new_tokens=12"])
    check_answer_room(fits, AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2").config,
                      sample_prompts(fits, AutoTokenizer.from_pretrained(tmp_path / "gpt2")))


def test_a_prompt_without_tokens_or_no_prompt_at_all_is_a_clear_error(tiny_llama, tmp_path, monkeypatch, capsys):
    from peftkit.decoding import generate_ids
    from peftkit.tiny import write_jsonl

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    with pytest.raises(PeftkitError, match="1 prompt has no tokens"):  # a tokenizer adding no BOS gives []
        generate_ids(model, tok, [[5, 6], []], Sampling(max_new_tokens=2))
    write_jsonl(tmp_path / "empty.jsonl", [])
    assert "No usable rows in" in cli_user_error(  # was: exact_match 0.0 over 0 rows
        monkeypatch, capsys, "eval", "--model", str(tiny_llama), "--data", str(tmp_path / "empty.jsonl"),
        "--metrics", "exact_match")


def test_a_broken_adapter_without_model_gets_its_own_error(tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    """Without --model the adapter names the base: its own errors come first (they read as a broken model dir)."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{not json")
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    assert "adapter_config.json: not valid JSON" in cli_user_error(
        monkeypatch, capsys, "generate", "--adapter", str(adapter), "--prompt", "hi")
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]}))
    assert "records no base model (base_model_name_or_path): name it with --model" in cli_user_error(
        monkeypatch, capsys, "generate", "--adapter", str(adapter), "--prompt", "hi")
    assert f"--adapter {tmp_path / 'missing'}: no such directory; {tmp_path}/ holds adapter/." in cli_user_error(
        monkeypatch, capsys, "generate", "--adapter", str(tmp_path / "missing"), "--prompt", "hi")


def test_trust_remote_code_flag_reaches_the_model_given_with_model():
    """`--model DIR --trust-remote-code` (eval, generate, chat): the model's own code may run, as the config-check
    message advises; without the flag it may not."""
    from peftkit.inference import ModelSource

    assert ModelSource().with_flags("some/model", None, True).model.trust_remote_code
    assert not ModelSource().with_flags("some/model", None, False).model.trust_remote_code


def test_an_adapter_flag_that_names_a_model_or_a_run_is_a_clear_error(tiny_llama, tmp_path, monkeypatch, capsys):
    """eval, generate and chat read the adapter's task count before loading: a model or run directory given as
    --adapter was a FileNotFoundError traceback there (exit 1). A run directory is read as its adapter/ now."""
    err = cli_user_error(monkeypatch, capsys, "generate", "--model", str(tiny_llama), "--adapter", str(tiny_llama),
                         "--prompt", "hi")
    assert f"{tiny_llama} is not a PEFT adapter directory: it has no adapter_config.json. It holds a full model" in err
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    err = cli_user_error(monkeypatch, capsys, "generate", "--model", str(tiny_llama), "--adapter", str(run),
                         "--prompt", "hi")
    assert f"error: {run / 'adapter'} has no adapter_model.safetensors." in err  # (a run: read as its adapter/)


@pytest.mark.parametrize(("fmt", "rows"), [("alpaca", [{"instruction": "Say hi."}, {"instruction": "Add", "input": "2+2"}]),
                                          ("completion", [{"prompt": "2+2="}, {"prompt": "3+3=", "completion": None}])])
def test_data_of_prompts_alone_generates(fmt, rows, tiny_llama, tmp_path, monkeypatch, capsys):
    """`peftkit generate --data` of rows that are prompts alone (no output or completion) was refused, "missing field
    'output'", though those rows are only prompts there; they generate, without a reference. eval still needs it."""
    from peftkit.cli import main
    from peftkit.tiny import write_jsonl

    write_jsonl(tmp_path / "prompts.jsonl", rows)
    out = tmp_path / "gen.json"
    monkeypatch.setattr("sys.argv", ["peftkit", "generate", "--model", str(tiny_llama), "--data",
                                     str(tmp_path / "prompts.jsonl"), "--format", fmt, "--max-new-tokens", "4",
                                     "--json", str(out)])
    main()
    results = json.loads(out.read_text())
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    prompts = load_prompts(tok, str(tmp_path / "prompts.jsonl"), "train",
                           DataConfig(train=str(tmp_path / "prompts.jsonl"), format=fmt), targets=False)
    assert results == [{"prompt": p.text, "completion": c}
                       for p, c in zip(prompts, generate_texts(model, tok, prompts, Sampling(max_new_tokens=4)),
                                       strict=True)]
    target = {"alpaca": "output", "completion": "completion"}[fmt]
    assert f"prompts.jsonl:1: missing field '{target}' for --format '{fmt}'" in " ".join(cli_user_error(
        monkeypatch, capsys, "eval", "--model", str(tiny_llama), "--data", str(tmp_path / "prompts.jsonl"), "--format",
        fmt, "--metrics", "exact_match").split())


def test_an_output_that_is_or_is_inside_an_input_is_refused(tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    """`generate --adapter A --json A/adapter_config.json` destroyed the adapter; `--json` over --data, the recipe or
    into the model is refused too, before anything loads."""
    from peft import LoraConfig

    from tests.conftest import save_peft_lora

    adapter = save_peft_lora(tiny_llama, tmp_path / "a0c", LoraConfig(r=2, target_modules=["q_proj"]))
    config = (adapter / "adapter_config.json").read_bytes()
    args = ["generate", "--model", str(tiny_llama)]
    for extra, said in [
        (["--adapter", str(adapter), "--prompt", "hi", "--json", str(adapter / "adapter_config.json")],
         f"--json {adapter / 'adapter_config.json'} is inside the adapter ({adapter}), an input of this command: "
         "writing there would change it. Give --json a path outside it."),
        (["--adapter", f"a={adapter}", "--adapter", f"b={adapter}", "--arrow", "--prompt", "hi", "--json",
          str(adapter)], f"--json {adapter} is the adapter"),
        (["--data", str(number_data["eval"]), "--json", str(number_data["eval"])], "is the data"),
        (["--prompt", "hi", "--json", str(tiny_llama / "config.json")], "is inside the model"),
    ]:
        assert said in " ".join(cli_user_error(monkeypatch, capsys, *args, *extra).split())
    assert (adapter / "adapter_config.json").read_bytes() == config
    recipe = make_recipe(tmp_path / "r", tiny_llama, number_data)
    assert f"--json {recipe} is the recipe" in " ".join(cli_user_error(
        monkeypatch, capsys, "generate", str(recipe), "--json", str(recipe)).split())
    assert f"is the data ({number_data['eval']})" in " ".join(cli_user_error(  # the recipe's data.eval
        monkeypatch, capsys, "generate", str(recipe), "--json", str(number_data["eval"])).split())
    # A directory is told to hold a file of completions (it was told to hold an `eval.json`, eval's name).
    said = " ".join(cli_user_error(monkeypatch, capsys, *args, "--prompt", "hi", "--json", str(tmp_path)).split())
    assert f"--json {tmp_path} is a directory; give a file name, e.g. --json {tmp_path / 'completions.json'}." in said


def test_flags_that_do_not_apply_to_the_prompts_are_refused(tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    """`generate RUN_DIR --chat` generated for the run's data.eval rows as their format says, ignoring --chat, and
    `--prompt hi --format chat` ignored --format; both are refused, as --limit with --prompt is."""
    recipe = make_recipe(tmp_path, tiny_llama, number_data)
    err = " ".join(cli_user_error(monkeypatch, capsys, "generate", str(recipe), "--chat").split())
    assert f"--chat applies to --prompt: with the prompts of {recipe}'s data.eval, the data's format decides" in err
    err = " ".join(cli_user_error(monkeypatch, capsys, "generate", "--model", str(tiny_llama), "--data",
                                  str(number_data["eval"]), "--chat").split())
    assert "--chat applies to --prompt: with the prompts of --data, the data's format decides" in err
    err = " ".join(cli_user_error(monkeypatch, capsys, "generate", "--model", str(tiny_llama), "--prompt", "hi",
                                  "--format", "chat").split())
    assert "--format chat says how --data rows (or a run's data.eval) are read; --prompt is used as given" in err
    err = " ".join(cli_user_error(monkeypatch, capsys, "generate", "--model", str(tiny_llama), "--prompt", "hi",
                                  "--format", "alpaca", "--chat").split())
    assert "--format alpaca as an instruction in the alpaca template): drop --format or --chat." in err
    hi = ["--model", str(tiny_llama), "--prompt", "hi"]
    for extra, said in ((["--prompt", "yo", "--input", "x", "--format", "alpaca"], "2 --prompt and 1 --input given: "
                         "each --input is the input of the --prompt at its place, so give one per --prompt (--input '' "
                         "for a prompt without one)."),
                        (["--input", "x"], "--input 'x' is the input section of an alpaca prompt: give it with "
                         "--prompt TEXT and --format alpaca (--data rows hold their own input).")):
        assert said in " ".join(cli_user_error(monkeypatch, capsys, "generate", *hi, *extra).split())


def test_a_chat_run_s_prompt_given_as_is_is_warned_and_an_empty_answer_said(tiny_llama, number_data, tmp_path,
                                                                            monkeypatch, capsys):
    """`peftkit generate RUN --prompt TEXT` of a run trained on conversations gives TEXT as is, outside the chat
    template: SmolLM2-135M-Instruct's LoRA run answered nothing (its first token an end of turn), and the screen
    showed the prompt alone, as if the command had failed. A warning says to pass --chat (for --adapter RUN_DIR
    too), and an empty answer is said to be one."""
    import sys

    from peftkit.cli import main

    silent = tmp_path / "silent"  # every logit 0: greedy takes id 0, <pad>, which decodes to nothing
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    model.save_pretrained(silent)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(silent)
    recipe = make_recipe(tmp_path, silent, number_data)
    for extra, warned in (([], True), (["--chat"], False), (["--set", "data.format=alpaca"], False)):
        monkeypatch.setattr(sys, "argv", ["peftkit", "generate", str(recipe), "--set", "data.format=chat",
                                          "--prompt", "hi", "--max-new-tokens", "2", *extra])
        main()
        out, err = capsys.readouterr()
        assert ("warning: " + f"{recipe} trains on conversations (data.format: chat), and --prompt is used as given, "
                "outside the chat template: pass --chat to give it as a user turn, as training's prompts were."
                in " ".join(err.split())) is warned, err
        assert "(an empty answer)" in out, out
    # --adapter RUN_DIR (its adapter/, 7b28871) of such a run: its recipe.yaml says so (no warning on the old code)
    from peft import LoraConfig, get_peft_model

    run = tmp_path / "run"
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(run / "adapter")
    (run / "recipe.yaml").write_text(f"model: {{name_or_path: {silent}}}\ndata: {{train: x.jsonl, format: chat}}\n")
    monkeypatch.setattr(sys, "argv", ["peftkit", "generate", "--adapter", str(run), "--prompt", "hi",
                                      "--max-new-tokens", "2"])
    main()
    out, err = capsys.readouterr()
    assert f"warning: {run} trains on conversations (data.format: chat)" in " ".join(err.split()), err
    # a data.train list mixing alpaca rows with conversations: its data.format is alpaca (no warning on the old code)
    (run / "recipe.yaml").write_text(f"model: {{name_or_path: {silent}}}\ndata: {{train: [a.jsonl, {{path: c.jsonl, "
                                     "format: chat}], format: alpaca}\n")
    main()
    out, err = capsys.readouterr()
    assert f"warning: {run} trains on conversations (data.train[1].format: chat)" in " ".join(err.split()), err
    # DPO's pairs (KTO's rows alike) given as conversations: their first row says so (no warning on the old code)
    from peftkit.tiny import write_jsonl

    pairs = tmp_path / "pairs.jsonl"
    dpo = make_recipe(tmp_path / "dpo", silent, {"train": pairs, "eval": pairs}, data={"format": "preference"},
                      training={"objective": "dpo"})
    shutil.copytree(run / "adapter", dpo.parent / "adapter")  # (dpo.parent: a run directory now, for --adapter)
    for prompt, warned in (([{"role": "user", "content": "2+2?"}], True), ("2+2?", False)):  # (text pairs: none)
        write_jsonl(pairs, [{"prompt": prompt, "chosen": "4", "rejected": "5"}])
        # --adapter RUN_DIR and RUN_DIR/adapter read its recipe's rows too (no warning on the old code)
        for given, named in ((str(dpo), dpo), (str(dpo.parent), dpo.parent), (str(dpo.parent / "adapter"), dpo.parent)):
            flag = [] if given == str(dpo) else ["--adapter"]
            monkeypatch.setattr(sys, "argv", ["peftkit", "generate", *flag, given, "--prompt", "hi",
                                              "--max-new-tokens", "2"])
            main()
            err = " ".join(capsys.readouterr().err.split())
            assert (f"warning: {named} trains on conversations (data.format: preference, its rows conversations), "
                    "and --prompt is used as given" in err) is warned, err
    # pairs of a hub dataset, whose rows are not read offline: the run's manifest.json records their form (data_form;
    # no warning on the old code), and a manifest without it (a run from before) says nothing, as before
    hub = make_recipe(tmp_path / "hub", silent, {"train": "someone/pairs", "eval": "someone/pairs"},
                      data={"format": "preference"}, training={"objective": "dpo"}).parent
    shutil.copytree(run / "adapter", hub / "adapter")
    for record, warned in (({"data_form": "chat"}, True), ({"data_form": "completion"}, False), ({}, False)):
        (hub / "manifest.json").write_text(json.dumps(record))
        for given in ([str(hub)], ["--adapter", str(hub)]):
            monkeypatch.setattr(sys, "argv", ["peftkit", "generate", *given, "--prompt", "hi", "--max-new-tokens", "2"])
            main()
            err = " ".join(capsys.readouterr().err.split())
            assert (f"warning: {hub} trains on conversations (data.format: preference, its rows conversations "
                    "(manifest.json's data_form)), and --prompt is used as given" in err) is warned, err


def test_an_answer_with_nothing_to_see_is_said_to_be_one():
    """What `peftkit generate` and `peftkit chat` show for an answer that prints blank: an empty one, and one of
    whitespace alone (printed as a blank line, as if the command had failed), given by its characters."""
    from peftkit.decoding import blank_answer

    assert blank_answer("") == "(an empty answer)"
    assert blank_answer("\n") == "(an answer of 1 whitespace character only: '\\n')"
    assert blank_answer(" \t" * 7) == "(an answer of 14 whitespace characters only: ' \\t \\t \\t \\t \\t \\t'...)"
    assert blank_answer(" a ") is None


def test_an_alpaca_run_s_prompt_is_given_as_an_instruction_with_format_alpaca(tiny_llama, number_data, tmp_path,
                                                                               monkeypatch, capsys):
    """`peftkit generate RUN --prompt TEXT` of a run trained on alpaca rows (the quickstart's) gave TEXT as is, outside
    the template training's prompts had, with no word of it: the tiny fine-tune answered noise. It warns, and
    `--format alpaca` gives each prompt as an instruction in the template: the completion of the template written out
    by hand (no warning: it holds its `### Instruction:`)."""
    import sys

    from peftkit.cli import main

    recipe = make_recipe(tmp_path, tiny_llama, number_data)  # (data.format alpaca)
    completions = {}
    written = "### Instruction:\nhi\n\n### Response:\n"
    with_input = "### Instruction:\nhi\n\n### Input:\n12 30\n\n### Response:\n"  # (an alpaca row with `input`)
    for name, prompts, extra in (("bare", ["hi"], []), ("flag", ["hi"], ["--format", "alpaca"]),
                                 ("written", [written, with_input], []),
                                 ("input", ["hi", "hi"], ["--format", "alpaca", "--input", "12 30", "--input", ""])):
        out = tmp_path / f"{name}.json"
        given = [arg for prompt in prompts for arg in ("--prompt", prompt)]
        monkeypatch.setattr(sys, "argv", ["peftkit", "generate", str(recipe), *given, "--max-new-tokens", "6",
                                          "--json", str(out), *extra])
        main()
        err = " ".join(capsys.readouterr().err.split())
        warned = (f"warning: {recipe} trains on alpaca rows (data.format: alpaca), and --prompt is used as given, "
                  "outside their template: pass --format alpaca to give it as an instruction, as training's prompts "
                  "were.")
        assert (warned in err) is (name == "bare"), err
        completions[name] = json.loads(out.read_text())
    assert completions["flag"][0] == completions["written"][0] != completions["bare"][0]
    # --input: the input section of the --prompt at its place ('' none), as training formats a row with `input`
    assert completions["input"] == completions["written"][::-1]
    assert completions["written"][0]["completion"] != completions["written"][1]["completion"]
    # --adapter RUN_DIR (or RUN_DIR/adapter) of that run warns alike; an adapter directory without a run: no recipe
    from peft import LoraConfig, get_peft_model

    run, plain = tmp_path / "run", tmp_path / "plain"
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(run / "adapter")
    lora.save_pretrained(plain)
    shutil.copy(recipe, run / "recipe.yaml")
    for given, warned in ((run, True), (run / "adapter", True), (plain, False)):
        monkeypatch.setattr(sys, "argv", ["peftkit", "generate", "--adapter", str(given), "--prompt", "hi",
                                          "--max-new-tokens", "2"])
        main()
        err = " ".join(capsys.readouterr().err.split())
        assert (f"warning: {run} trains on alpaca rows (data.format: alpaca)" in err) is warned, err
