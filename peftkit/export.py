"""The last stage of a run: adapter/ (the PEFT format) and/or merged/ (a plain model), as the recipe's `export`
section asks. Each directory is written whole (temp directory, then rename). With data.chat_template, adapter/ holds
the template (chat_template.jinja) and merged/'s tokenizer has it."""

from __future__ import annotations

from pathlib import Path

import torch

from peftkit.adapters import adapter_layers
from peftkit.adapters.state_dicts import adapter_state_dict
from peftkit.data.chat_templates import ADAPTER_TEMPLATE
from peftkit.data.classification import LabelSet
from peftkit.fileio import atomic_directory, atomic_write_bytes
from peftkit.merge import base_provenance, checkpoint_dtype, save_merged
from peftkit.merge_weights import conv1d_modules, merged_model
from peftkit.methods import MethodTrainer, method_of
from peftkit.model_card import CARD_NAME, model_card
from peftkit.modeling import DTYPES
from peftkit.peft_format import peft_config, save_adapter
from peftkit.recipe import Recipe


def _card_pad_id(cfg: Recipe, model) -> int | None:
    """A classifier's pad id, for its card's snippet, where the base checkpoint's config.json says another or none:
    the head reads the last token that is not padding, and peftkit pads with the tokenizer's id (`modeling`'s
    `_expected_for_new_head`), so the base loaded with its own read padding on padded rows (or refused batches of
    several rows). None where they agree, or for a causal LM."""
    from peftkit.modeling import load_config

    if not cfg.classifier:
        return None
    pad = model.config.pad_token_id
    return pad if load_config(cfg.model).pad_token_id != pad else None


def export(model, tok, cfg: Recipe, targets: list[str], out: Path, method_trainer: MethodTrainer | None = None,
           labels: LabelSet | None = None, state: dict | None = None, metrics: dict | None = None) -> list[Path]:
    """Write adapter/ and/or merged/ as the recipe asks; returns the exported directories. `method_trainer`
    fills in what only the run knows (AdaLoRA: its length and rank pattern, with the pruned triplets cut);
    `labels`, a classifier's classes (saved in peftkit.json; a merged model has them in its config.json); `state`,
    the adapter's state dict if already gathered (FSDP), else read from `model`; `metrics`, the run's evaluations for
    adapter/README.md, its model card (peftkit.model_card)."""
    exported = []
    if cfg.export.adapter:
        adapter = cfg.adapter
        state = adapter_state_dict(model, cfg.adapter.modules_to_save) if state is None else state
        if method_trainer is not None:
            adapter, state = method_trainer.export(adapter, state)
        config = peft_config(adapter, targets, _base_name(cfg), bool(conv1d_modules(model)), model.config.model_type,
                             revision=cfg.model.revision, task=cfg.model.task, model_config=model.config)
        state, config = method_of(cfg.adapter).for_original_base(adapter_layers(model), state, config)
        with atomic_directory(out / "adapter") as tmp:
            sources = method_of(cfg.adapter).save_sources(adapter, tmp)  # (X-LoRA's experts, copied beside it)
            save_adapter(tmp, state, config, cfg.quantization, quantized_on=_device_of(model).type,
                         trust_remote_code=cfg.model.trust_remote_code,
                         labels=list(labels.names) if labels is not None else None,
                         rope_scaling=cfg.model.rope_scaling, base_dtype=cfg.model.dtype,
                         added_tokens=cfg.model.add_tokens, reward_center=_reward_center(cfg), sources=sources)
            if cfg.model.add_tokens:  # the tokenizer with the new tokens, for peft's and vLLM's users (Trainer's way)
                tok.save_pretrained(tmp)
            atomic_write_bytes(tmp / CARD_NAME, model_card(cfg, config["peft_type"], metrics or {},
                                                            list(labels.names) if labels is not None else None,
                                                            _card_pad_id(cfg, model)).encode())
            if cfg.data.chat_template is not None:  # the template it was trained with, which its base's tokenizer lacks
                atomic_write_bytes(tmp / ADAPTER_TEMPLATE, tok.chat_template.encode())
        exported.append(out / "adapter")
    if cfg.export.merged:
        # As `peftkit merge`: the base checkpoint's own dtype (a bf16 base trained in float32 merges to bf16).
        dtype = DTYPES[cfg.export.merged_dtype or checkpoint_dtype(cfg.model.name_or_path, cfg.model.revision)]
        save_merged(merged_model(model, cfg.adapter, dtype), tok, out / "merged",
                    base_provenance(cfg.model.name_or_path, cfg.model.revision, cfg.model.trust_remote_code,
                                    _reward_center(cfg)))
        exported.append(out / "merged")
    return exported


def _reward_center(cfg: Recipe) -> float | None:
    """A reward model's centring weight, recorded beside its adapter and merged model (None: none, or no reward
    model)."""
    return cfg.training.reward_center if cfg.training.objective == "reward" else None


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _base_name(cfg: Recipe) -> str:
    return cfg.model.name_or_path
