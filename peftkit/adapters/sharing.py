"""Which adapters can share one base model with others (`peftkit.adapters.named`): each must have been trained on
the same base (its recorded name and revision, RoPE scaling, quantization and the dtype it was quantized from), with
the base's own tokenizer, for a causal LM; and none may change what the base is for the others (`ALONE`: layers
stacked again, truncated weights, trained embedding rows...). Each refusal says which adapter and what to do
instead: load it alone, or merge it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from peftkit.adapter_meta import describe_rope, read_meta
from peftkit.errors import PeftkitError
from peftkit.methods import method_of
from peftkit.new_tokens import held_tokenizer_length
from peftkit.recipe import AdapterConfig, QuantizationConfig

ALONE = ("layer_replication", "use_bdlora", "kasa_config", "target_parameters", "bias", "trainable_token_indices",
         "alora_invocation_tokens", "poly_type")
"""adapter_config.json fields of the adapters that do not share a base with others (each refused below, saying why)."""


@dataclass(frozen=True)
class FirstAdapter:
    """What the first adapter loaded says of the base, which every later one must match."""

    name: str
    base: str | None
    """Its recorded base_model_name_or_path."""
    revision: str | None
    rope_scaling: dict | None
    """Its model.rope_scaling (peftkit.json), which the base loaded with."""
    base_dtype: str | None
    """Its quantized base's dtype before quantization (peftkit.json), which the base was loaded in."""

    @classmethod
    def of(cls, name: str, directory: str, raw) -> FirstAdapter:
        meta = read_meta(directory) if directory else None
        return cls(name, raw.base_model_name_or_path, raw.revision, meta.rope_scaling if meta else None,
                   meta.quantized_from if meta else "float32")


def check_fits(model: nn.Module, name: str, directory: str, raw, quant: QuantizationConfig | None,
               first: FirstAdapter | None, caller_base: str | None, quantization: QuantizationConfig | None) -> None:
    """Adapter `name` (read from `directory`: adapter_config.json `raw`, its quantization `quant`) was trained on
    this model's base, as `first` was: its recorded base (unless the caller named the base: `caller_base`), its
    revision, RoPE scaling and quantization (the model's: `quantization`), a causal LM without tokens of its own."""
    if raw.task_type == "SEQ_CLS":
        raise PeftkitError(f"Adapter {name!r} ({directory}) is for a sequence classifier (task_type SEQ_CLS), whose "
                           "head is the model's class; load it alone (peftkit eval --adapter DIR).")
    _check_tokens(model, name, directory)
    if caller_base is None and first is not None and raw.base_model_name_or_path != first.base:
        raise PeftkitError(f"Adapter {name!r} ({directory}) was trained on {raw.base_model_name_or_path}, adapter "
                           f"{first.name!r} on {first.base}: adapters in one model share one base. Load adapters of "
                           "one base, or name the base yourself (--model) if both bases are the same model.")
    if first is not None and raw.base_model_name_or_path == first.base:
        # The base loads at the first adapter's commit (`adapter_base.base_revision`); one that records none was
        # saved before peftkit recorded it (or by another tool), and is taken as trained on that one.
        if None not in (raw.revision, first.revision) and raw.revision != first.revision:
            raise PeftkitError(f"Adapter {name!r} ({directory}) was trained on {first.base} at revision "
                               f"{raw.revision}, adapter {first.name!r} at revision {first.revision}: adapters in one "
                               "model share one base, at one commit. Load adapters trained on one revision.")
    if first is not None and (scaling := read_meta(directory).rope_scaling) != first.rope_scaling:
        raise PeftkitError(f"Adapter {name!r} ({directory}) was trained with RoPE scaling {describe_rope(scaling)}, "
                           f"adapter {first.name!r} with {describe_rope(first.rope_scaling)}: adapters in one model "
                           "share one base, scaled one way.")
    if quant != quantization:
        def what(q): return f"a {q.method} (bitsandbytes) base" if q else "an unquantized base"
        raise PeftkitError(f"Adapter {name!r} ({directory}) was trained on {what(quant)}, but the model here is "
                           f"{what(quantization)[3:]}: adapters in one model share one base, loaded one way.")
    if quant is not None and first is not None and (dtype := read_meta(directory).quantized_from) != first.base_dtype:
        # The 4-bit codes are rounded from the weights in that dtype (none recorded: float32, as loading reads it).
        raise PeftkitError(f"Adapter {name!r} ({directory}) was trained on a base quantized from {dtype}, adapter "
                           f"{first.name!r} on one quantized from {first.base_dtype} (their peftkit.json base_dtype): "
                           "adapters in one model share one base, loaded one way.")


def _check_tokens(model: nn.Module, name: str, directory: str) -> None:
    """The adapter was trained with the base's tokenizer as it is: no tokens added (ours, or peft's with a longer
    tokenizer saved beside it)."""
    if directory and (added := read_meta(directory).added_tokens):
        raise PeftkitError(f"Adapter {name!r} ({directory}) adds tokens to its base's tokenizer and embeddings "
                           f"(model.add_tokens: {', '.join(added)}), which the other adapters' base lacks; load "
                           "it alone (--adapter DIR), or merge it (`peftkit merge`).")
    rows = model.get_input_embeddings().weight.shape[0]
    if directory and (length := held_tokenizer_length(directory)) and length > rows:  # peft's, with new tokens
        raise PeftkitError(f"Adapter {name!r} ({directory}) holds a tokenizer of {length:,} tokens, past the "
                           f"{rows:,} rows of the base's embeddings: it was trained with tokens added, which the "
                           "other adapters' base lacks; load it alone (--adapter DIR), or merge it (`peftkit "
                           "merge`).")


def refuse_alone(model: nn.Module, name: str, cfg: AdapterConfig) -> None:
    """Refuse an adapter whose layers cannot sit beside others' on one base (`ALONE`), saying why and what to do."""
    if getattr(cfg, "layer_replication", None):
        raise PeftkitError(f"Adapter {name!r} stacks the base's layers again (layer_replication): its model is not "
                           "the others' base; load it alone (--adapter DIR), or merge it (`peftkit merge`).")
    if getattr(cfg, "use_bdlora", None):
        raise PeftkitError(f"Adapter {name!r} has block-diagonal factors (use_bdlora), which mixed batches do not "
                           "stack; load it alone (--adapter DIR), or merge it (`peftkit merge`).")
    if getattr(cfg, "kasa_config", None):
        raise PeftkitError(f"Adapter {name!r} is a KaSA adapter (kasa_config), which truncates the base weights "
                           "the other adapters and the base's rows share; load it alone (--adapter DIR), or merge "
                           "it (`peftkit merge`).")
    if getattr(cfg, "target_parameters", None):
        raise PeftkitError(f"Adapter {name!r} adapts parameters (target_parameters), which named adapters do not "
                           "route per row; load it alone (--adapter DIR), or merge it (`peftkit merge`).")
    if getattr(cfg, "alora_invocation_tokens", None):
        raise PeftkitError(f"Adapter {name!r} is an activated LoRA (alora_invocation_tokens), which acts from its "
                           "invocation in each row on: named adapters do not route it; load it alone (--adapter "
                           "DIR).")
    if getattr(cfg, "poly_type", None):
        raise PeftkitError(f"Adapter {name!r} is a Poly adapter, whose layers mix their skills by each row's task id, "
                           "which named adapters do not hand them; load it alone (--adapter DIR, with --task N).")
    if why := method_of(cfg).alone:
        raise PeftkitError(f"Adapter {name!r} is {method_of(cfg).title} (method: {cfg.method}), which loads alone: "
                           f"{why}; load it alone (--adapter DIR).")
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and getattr(head, "weight", None) is getattr(embedding, "weight", False)
    if getattr(cfg, "trainable_token_indices", None) or (cfg.method == "trainable_tokens" and tied):
        why = " (trainable_token_indices)" if cfg.method == "lora" else ", whose weight the output head shares"
        raise PeftkitError(f"Adapter {name!r} trains rows of the embeddings{why}: one model cannot hold those per "
                           "adapter; load it alone (--adapter DIR), or merge it (`peftkit merge`).")


def loads_alone(adapter_dir: str) -> str | None:
    """The `ALONE` field set in `adapter_dir`'s adapter_config.json (or `peft_type X` for a method that loads alone,
    `Method.alone`), or None: a comparison evaluates such an adapter on a model of its own."""
    from peftkit.methods import METHODS
    from peftkit.methods.base import is_set

    config = Path(adapter_dir) / "adapter_config.json"
    raw = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
    if any(m.alone and m.peft_type == raw.get("peft_type") for m in METHODS.values()):
        return f"peft_type {raw['peft_type']}"
    return next((key for key in ALONE if is_set(raw.get(key))), None)
