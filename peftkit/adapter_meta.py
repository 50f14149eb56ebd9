"""peftkit.json: what an adapter directory records that the PEFT format has no field for.

The quantization the adapter was trained against (so that a merge, eval or generate re-quantizes the same 4-bit
weights, and warns where it re-quantizes on another kind of device), the base's RoPE scaling, a classifier's labels
and the tokens added to the base's tokenizer. PEFT tools ignore the file; `peftkit.peft_format.save_adapter` writes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

from peftkit.recipe import QuantizationConfig, RopeScalingConfig
from peftkit.settings_json import read_json_object, validated

META_NAME = "peftkit.json"


class PeftkitMeta(BaseModel):
    """peftkit.json: what the PEFT format has no field for."""

    model_config = ConfigDict(extra="ignore")

    peftkit_version: str | None = None
    quantization: QuantizationConfig | None = None
    """The bitsandbytes settings of the base the adapter was trained against, if any."""
    quantized_on: Literal["cpu", "cuda"] | None = None
    """Where that base was quantized: a merge re-quantizes there."""
    trust_remote_code: bool = False
    """The base needed its own modelling code. Never acted on: merge and eval ask for --trust-remote-code."""
    labels: list[str] | None = None
    """A classifier's class names by id (SEQ_CLS adapters peftkit trained)."""
    rope_scaling: RopeScalingConfig | None = None
    """The base's RoPE scaling in training (model.rope_scaling): the base loads with it wherever the adapter is used."""
    base_dtype: Literal["float32", "bfloat16", "float16", "auto"] | None = None
    """A quantized base's model.dtype in training, the dtype its weights were quantized from: a merge, eval or generate
    without the recipe loads it so, to re-quantize the same 4-bit codes (None: float32, as before it was recorded)."""

    reward_center: float | None = None
    """A reward model's training.reward_center: its loss's centring weight, which eval without the recipe adds too."""

    added_tokens: list[str] = []
    """model.add_tokens in training: added to the base's tokenizer, in this order, and the base's embeddings resized to
    hold them, wherever the adapter is used (`peftkit.new_tokens`)."""

    experts: dict[str, str] | None = None
    """X-LoRA's experts as copied into the adapter directory, by name: their directories relative to it, which peftkit
    reads in place of adapter_config.json's `adapters` (where they were), so the directory loads wherever it moves."""

    @property
    def quantized_from(self) -> str:
        """`base_dtype`, float32 where none is recorded: what adapters sharing a 4-bit base must agree on."""
        return self.base_dtype or "float32"


def describe_rope(rope_scaling: RopeScalingConfig | None) -> str:
    """A recorded RoPE scaling in words, for the errors refusing adapters of bases scaled two ways."""
    return "none" if rope_scaling is None else f"{rope_scaling.type} x{rope_scaling.factor}"


def read_meta(path: str | Path) -> PeftkitMeta:
    """peftkit.json of an adapter directory; all defaults (no quantization) when there is none."""
    meta = Path(path) / META_NAME
    if not meta.exists():
        return PeftkitMeta()
    what = "Fix it, delete it (for an adapter trained without quantization), or export the adapter again."
    return validated(PeftkitMeta, meta, read_json_object(meta, what), what)


def quantized_on(path: str | Path) -> str | None:
    """'cpu' or 'cuda': where the 4-bit/8-bit base of a peftkit adapter was quantized (None if unknown)."""
    return read_meta(path).quantized_on


def requantized_note(path: str | Path, here: str, result: str, fix: str, subject: str = "this adapter") -> str | None:
    """What to warn when the adapter at `path` was trained on a base quantized on another kind of device than `here`
    ('cpu' or 'cuda'), where it is re-quantized now (None when they agree or nothing is recorded): bitsandbytes' CUDA
    and CPU kernels round a few weights to other 4-bit codes, so the base is not quite the one it was trained on.
    `peftkit merge` says it, and eval, generate and chat (`peftkit.adapter_base.load_adapter_base`).

    Args:
        result: what differs, e.g. "the merged model may differ slightly from the trained one".
        fix: the sentence saying where to run instead; `{where}` in it is where the base was quantized.
        subject: how the adapter is named.
    """
    where = quantized_on(path)
    if where is None or where == here:
        return None
    names = {"cpu": "CPU", "cuda": "CUDA"}
    here = names.get(here, here)
    reason = "no CUDA device is here" if where == "cuda" and not torch.cuda.is_available() else f"this runs on {here}"
    return (f"{subject} was trained on a base quantized on {names[where]}, and {reason}: the base is re-quantized on "
            f"{here}, whose rounding can differ for a few weights, so {result} (about 1e-3 in logits on a test "
            f"model). {fix.format(where=names[where])}")
