"""Which of peft's adapter_config.json fields peftkit implements, ignores as bookkeeping, or refuses.

A field that changes an adapter's outputs and that peftkit does not implement is refused, so that an adapter never
loads as something else; a field peftkit does not know (a newer peft's) is warned of and ignored.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch

from peftkit.errors import PeftkitError, PeftkitWarning
from peftkit.methods import Method
from peftkit.methods.base import is_set

UNSUPPORTED_FEATURES = {
    "alora_invocation_tokens": "activated LoRA (aLoRA), which adapts only the tokens from its invocation on",
    "use_qalora": "QA-LoRA, which pools the input groupwise",
    "use_bdlora": "block-diagonal LoRA",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "megatron_config": "Megatron's parallel linear layers",
    "velora_config": "VeLoRA",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
    "arrow_config": "Arrow routing's router (peftkit routes adapters with `peftkit generate --arrow` instead)",
}
"""peft features that change an adapter's outputs and that peftkit does not implement: one that is set is refused,
for any method whose config does not read it, so that an adapter never loads as something else (QA-LoRA saves plain
LoRA tensor names)."""

PEFT_BOOKKEEPING = {
    "ensure_weight_tying",  # checked against the model: `check_weight_tying`
    "auto_mapping", "peft_version", "inference_mode", "fan_in_fan_out", "layers_pattern", "megatron_core",
    "qalora_group_size", "runtime_config", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    "init_lora_weights", "init_weights", "init_ia3_weights", "r", "target_r", "init_r", "tinit", "tfinal", "deltaT",
    "beta1", "beta2", "orth_reg_weight", "total_step", "token_dim", "num_transformer_submodules",
    "num_attention_heads", "num_layers", "tokenizer_name_or_path", "tokenizer_kwargs", "prompt_tuning_init",
    "prompt_tuning_init_text", "prompt_tuning_init_state_dict_path", "prompt_tuning_init_task",
    "use_effective_conv2d",  # LoHa/LoKr: convolution layers only, which peftkit does not adapt
}
"""Fields of peft's configs that do not change a saved adapter's outputs (settings of its training, its first values,
or the wrapper's) or that peftkit derives from the model (`fan_in_fan_out`); a method reads what it needs of them
(AdaLoRA's `r` is one: its ranks are the saved tensors')."""


def check_peft_fields(method: type[Method], raw: dict, config_file: Path) -> None:
    """Refuse a set `UNSUPPORTED_FEATURES` field of adapter_config.json; warn of a set field that peftkit does not know
    (a newer peft's), which is ignored: if it changes the outputs, they differ from peft's."""
    for key, what in UNSUPPORTED_FEATURES.items():
        if is_set(raw.get(key)) and key not in method.peft_config.model_fields:  # (LoRA reads aLoRA's)
            raise PeftkitError(f"{config_file}: '{key}' is {json.dumps(raw[key])}: {what}; peftkit does not implement "
                               "it, and loading the adapter without it would give outputs other than peft's.")
    unknown = sorted(k for k, v in raw.items() if is_set(v) and k not in method.peft_config.model_fields
                     and k not in PEFT_BOOKKEEPING)
    if unknown:
        warnings.warn(f"{config_file} sets {', '.join(repr(k) for k in unknown)}, which peftkit does not know and "
                      "ignores; if a field changes the adapter's outputs, they differ from peft's.", PeftkitWarning,
                      stacklevel=2)


def check_weight_tying(adapter_dir: str | Path, model: torch.nn.Module) -> None:
    """Refuse an adapter saved with peft's `ensure_weight_tying` on embeddings when `model` ties its input and output
    embeddings: peft then gives the output embeddings the same adapter, which peftkit does not implement (on an
    untied model the flag does nothing, in peft too)."""
    from peftkit.peft_format import CONFIG_NAME

    config_file = Path(adapter_dir) / CONFIG_NAME
    raw = json.loads(config_file.read_text(encoding="utf-8"))
    if raw.get("ensure_weight_tying") is not True or not (embeddings := _embeddings_adapted(raw)):
        return
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if inputs is not None and outputs is not None and inputs.weight is outputs.weight:
        raise PeftkitError(f"{config_file}: 'ensure_weight_tying' is true and the adapter covers {embeddings} of a model "
                           "whose input and output embeddings are tied: peft then gives the output embeddings the same "
                           "adapter; peftkit does not implement that tying, and loading the adapter without it would "
                           "give outputs other than peft's.")


def _embeddings_adapted(raw: dict) -> str:
    """The embedding layers (peft's names for those it ties) that an adapter's targets or modules_to_save name."""
    targets, saved = raw.get("target_modules"), raw.get("modules_to_save") or []
    names = [*(targets if isinstance(targets, list) else []), *saved]
    hits = [e for e in ("embed_tokens", "lm_head") if any(n.rsplit(".", 1)[-1] == e for n in names)
            or isinstance(targets, str) and re.fullmatch(targets, e)]
    return " and ".join(hits)
