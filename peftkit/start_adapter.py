"""The adapter at the start of a run (`peftkit.start.setup`): its settings with what the run adds (model.add_tokens'
rows), drawn or adapter.init_from's loaded into the model, train's refusals on the way, and the line train prints
of it. `peftkit validate` runs the same on a meta-device model (`peftkit.model_checks`)."""

from __future__ import annotations

import torch
from rich.console import Console

from peftkit import neftune, zero
from peftkit.adapters import adapter_layers, count_parameters, inject_adapters
from peftkit.adapters.state_dicts import load_adapter_state_dict
from peftkit.errors import PeftkitError
from peftkit.methods import method_of
from peftkit.methods.expert_lists import check_start
from peftkit.modeling import prepare_for_training
from peftkit.peft_format import load_adapter
from peftkit.saved_embeddings import oversized
from peftkit.recipe import Recipe
from peftkit.runtime import check_fp16_gradients


def _with_new_tokens(cfg: Recipe, model, tok, adapter, config, console: Console):
    """model.add_tokens: the adapter settings with the new tokens' rows trained, and what was added said."""
    if not cfg.model.add_tokens:
        return adapter
    from peftkit.new_tokens import added_ids, describe, with_new_rows

    rows = (getattr(config.get_text_config(), "vocab_size", None) or 0, model.get_input_embeddings().weight.shape[0])
    ids, present = added_ids(cfg.model, tok, rows[0])
    for line in describe(cfg.model.add_tokens, ids, present, rows):
        console.print(line, markup=False, highlight=False, style="yellow" if line.startswith("note:") else None)
    return with_new_rows(adapter, model, ids)


def _inject(cfg: Recipe, model, adapter, accelerator, console: Console, summary: dict) -> list[str]:
    """The adapter drawn (or adapter.init_from's loaded) into `model`, prepared for training and counted in
    `summary`; the adapted modules' names."""
    # Seed again right before the adapter is drawn: its init must not depend on what loading consumed.
    torch.manual_seed(cfg.training.seed)
    targets = adapt(cfg, model, adapter)
    if not zero.active(accelerator):  # (DeepSpeed scales fp16 losses with fp32 master weights of its own)
        check_fp16_gradients(model, accelerator.mixed_precision)
    summary["trainable_params"], summary["total_params"] = count_parameters(model)
    console.print(adapter_line(adapter, model, targets))
    return targets


def adapt(cfg: Recipe, model, adapter) -> list[str]:
    """`adapter` (the recipe's, with a classifier's head) drawn, or adapter.init_from's loaded, into `model`, and the
    model prepared for training, with train's refusals on the way; the adapted modules' names. `peftkit validate`
    runs it on a meta-device model (`peftkit.model_checks`): nothing is drawn there, and init_from's weights only
    checked to fit."""
    # An adapter to start from may list targets for other architectures (peft's generic defaults); its
    # weights decide, and load_adapter_state_dict refuses any that do not land (as for `peftkit eval`).
    check_start(adapter, model)
    start = load_adapter(cfg.adapter.init_from)[1] if cfg.adapter.init_from else None
    targets = inject_adapters(model, adapter, every_entry=start is None, state=start)
    # (tokens listed after the adapter's: their rows start fresh; a padded base's rows past the model's left out)
    if start is not None and (cfg.model.add_tokens or oversized(model, start)):
        from peftkit.new_tokens import held_tokenizer_length, start_state

        start = start_state(model, start, cfg.adapter, held_tokenizer_length(cfg.adapter.init_from))
    if start is not None:
        load_adapter_state_dict(model, start)
    if cfg.export.merged:
        _check_biases_merge(model)
    prepare_for_training(model, cfg.training.gradient_checkpointing)
    if cfg.training.neftune_noise_alpha:
        neftune.attach(model, cfg.training.neftune_noise_alpha)
    return targets


def adapter_line(adapter, model, targets: list[str]) -> str:
    """The line train prints of the adapter: the method, how many modules it adapts, its trainable parameters.
    `adapter`: the settings injected, the recipe's with what the run adds (model.add_tokens' ids: the run's rows, not
    adapter.init_from's alone)."""
    trainable, total = count_parameters(model)
    where = f" on {len(targets)} modules" if targets else ""  # the prompt family adapts the model as a whole
    return (f"{method_of(adapter).describe(adapter)}{where}: {trainable:,} trainable of {total:,} parameters "
            f"({100 * trainable / total:.3f}%)")


def _check_biases_merge(model) -> None:
    """export.merged with lora_bias, or a method whose update is a bias (BEFT), on a layer without a bias: refused
    before training, not after it."""
    layers = adapter_layers(model)
    if bare := [name for name, layer in layers.items()
                if layer.method.needs_bias and getattr(layer.base_layer, "bias", None) is None]:
        layer = layers[bare[0]]
        raise PeftkitError(f"adapter.target_modules: '{bare[0]}' (and {len(bare) - 1} more) has no bias, so "
                           f"export.merged cannot fold {layer.method.title}'s trained bias into the model (peft cannot "
                           "either). Set export.merged: false (the adapter loads in peft), or target layers that have "
                           "a bias (Qwen2's q_proj, k_proj, v_proj).")
    if bare := [name for name, layer in layers.items()
                if getattr(getattr(layer, "lora_B", None), "bias", None) is not None
                and getattr(layer.base_layer, "bias", None) is None]:
        raise PeftkitError(f"adapter.lora_bias: '{bare[0]}' (and {len(bare) - 1} more) has no bias, so export.merged "
                           "cannot fold lora_B's bias into the model (peft cannot either). Set export.merged: false "
                           "(the adapter loads in peft with its biases), or lora_bias: false.")
