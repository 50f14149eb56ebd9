"""The recipe's `model` section (the base model: where it is, how it loads, LongLoRA's attention, RoPE scaling,
new tokens) and its `quantization` section (the base loaded quantized through bitsandbytes)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from peftkit.section import Section

DType = Literal["float32", "bfloat16", "float16"]


class LongContextConfig(Section):
    """LongLoRA (Chen et al. 2023): shifted sparse attention while training; full attention at eval and generation."""

    s2_attention: bool = False
    """Train with S²-Attn: each token attends causally only inside its group of `group_size_ratio × data.max_length`
    tokens, and half of the heads see the groups shifted by half a group. Llama-style models (sdpa or eager)."""
    group_size_ratio: float = Field(0.25, gt=0, le=1)
    """Group size as a fraction of data.max_length; their product must be a whole number of at least 2 tokens."""

    def group_size(self, max_length: int) -> int:
        return round(self.group_size_ratio * max_length)


class RopeScalingConfig(Section):
    """RoPE scaling, set on the model's config as it loads (transformers' `rope_parameters`, checked by transformers'
    own validation): the model then covers `factor` × its max_position_embeddings positions. LongLoRA extends a
    context this way: linear, factor = data.max_length / max_position_embeddings rounded up."""

    type: Literal["linear", "dynamic", "yarn"]
    """transformers' rope_type. linear: position interpolation (positions divided by factor; Chen et al. 2023, the
    LongLoRA paper's choice); dynamic: NTK-aware scaling of the rotary base, growing with the sequence length; yarn:
    YaRN (Peng et al. 2023). (llama3 and longrope need more than a factor: they come in a model's own config.json.)"""
    factor: float = Field(gt=1)
    """How many times the model's max_position_embeddings the scaled model covers."""


class ModelConfig(Section):
    """The base model."""

    name_or_path: str
    """A local directory with `config.json` and weights, or a hub id (e.g. `meta-llama/Llama-3.2-1B`)."""
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    """Dtype the base weights are loaded in; `auto` keeps the checkpoint's own."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when `name_or_path` is a hub id."""
    trust_remote_code: bool = False
    """Run modelling code shipped with a hub model. Off unless you trust the repository."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto`: CUDA when available, else CPU."""
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = None
    """Attention kernel; None lets transformers choose. flash_attention_2 needs CUDA and the flash-attn package;
    with data.packing its batches are flattened into one row (padding-free, varlen kernels)."""
    task: Literal["causal_lm", "sequence_classification"] = "causal_lm"
    """causal_lm: next-token prediction (AutoModelForCausalLM). sequence_classification: one label per row
    (AutoModelForSequenceClassification, data.format: classification), its new head (`classifier` or `score`)
    trained in full and saved with the adapter."""
    num_labels: int | None = Field(None, ge=1)
    """sequence_classification: the number of classes, for integer labels 0..num_labels-1. Default: read from
    data.train (the largest integer label + 1, or the sorted set of string labels). 1 is a reward model's one score
    (training.objective: reward), and its default there."""
    long_context: LongContextConfig | None = None
    """LongLoRA's shifted sparse attention during training (`s2_attention: true`); omit for plain attention."""
    rope_scaling: RopeScalingConfig | None = None
    """`{type: linear, factor: 2}`: RoPE scaling, to train (and run) past the model's max_position_embeddings; the
    adapter records it (peftkit.json), so `peftkit eval`/`generate` load the base scaled the same way."""
    add_tokens: list[str] = Field(default_factory=list)
    """New special tokens (`["<|im_start|>", "<|im_end|>"]`: ChatML's markers for a base model): added to the
    tokenizer, the embeddings resized to hold them, their rows trained (`peftkit.new_tokens`). A token the tokenizer
    has already is left as it is."""

    @field_validator("add_tokens")
    @classmethod
    def _distinct_tokens(cls, tokens: list[str]) -> list[str]:
        if blank := [t for t in tokens if not t.strip()]:
            raise ValueError(f"{blank[0]!r} is empty or whitespace: a token needs text")
        if len(set(tokens)) < len(tokens):
            raise ValueError(f"{next(t for t in tokens if tokens.count(t) > 1)!r} is listed twice")
        return tokens


class QuantizationConfig(Section):
    """Load the base quantized through bitsandbytes (QLoRA). Omit the section for a 16/32-bit base."""

    method: Literal["nf4", "fp4", "int8"] = "nf4"
    """nf4: 4-bit NormalFloat (QLoRA); fp4: 4-bit float; int8: LLM.int8()."""
    double_quant: bool = True
    """Quantize the per-block absmax constants too (bitsandbytes `compress_statistics`): ~0.37 bit/param less."""
    compute_dtype: DType = "bfloat16"
    """Dtype the 4-bit weights are dequantized to for each matmul."""
    quant_storage: Literal["uint8", "float32", "bfloat16", "float16"] = "uint8"
    """Storage dtype of the packed 4-bit weights; FSDP sharding needs a float type matching the model."""
    skip_modules: list[str] = Field(default_factory=lambda: ["lm_head"])
    """Modules kept in full precision (the output head by default, as bitsandbytes/transformers do)."""
