"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"): n trainable
embeddings, a soft prompt, in front of every input. The base model is frozen; n x hidden parameters train
(20 x 4096 = 82k on a 7B Llama).

peft's format: `prompt_embeddings` (n, hidden) and adapter_config.json with `peft_type: PROMPT_TUNING`,
`prompt_tuning_init` (RANDOM, TEXT, SAMPLE_VOCAB) and, for TEXT, the text and the tokenizer it was read with.
Forward numerics as peft's `PeftModelForCausalLM.forward`: inputs_embeds = [prompt; embed(input_ids)].
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import model_validator
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.methods.virtual import (IGNORE_INDEX, VirtualConfig, VirtualMethod, VirtualPeftConfig, VirtualTokens,
                                     install)

PEFT_INIT = {"random": "RANDOM", "text": "TEXT", "vocab": "SAMPLE_VOCAB"}


class PromptTuningConfig(VirtualConfig):
    """Prompt tuning: a trainable soft prompt of `num_virtual_tokens` embeddings before every input."""

    method: Literal["prompt_tuning"]
    init: Literal["random", "text", "vocab"] = "random"
    """random: N(0, 1) entries (peft's RANDOM); text: the embeddings of `init_text`'s tokens, repeated or cut to
    num_virtual_tokens (the paper's best start); vocab: embeddings of tokens drawn at random from the vocabulary."""
    init_text: str | None = None
    """The text of `init: text`, e.g. "Answer the question:"."""

    @model_validator(mode="after")
    def _text_given(self) -> PromptTuningConfig:
        if self.init == "text" and not self.init_text:
            raise ValueError("init: text needs init_text (the words whose embeddings start the prompt)")
        if self.init != "text" and self.init_text is not None:
            raise ValueError(f"init_text is only read with init: text (init is {self.init!r}); remove it or set init: text")
        return self


class PromptTuningPeftConfig(VirtualPeftConfig):
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None


def initial_prompt(model: nn.Module, cfg: PromptTuningConfig) -> torch.Tensor:
    """(n, hidden) fp32 starting prompt, from torch's global RNG (seeded by the caller) or the model's embeddings."""
    embed = model.get_input_embeddings()
    n, dim = cfg.num_virtual_tokens, embed.weight.shape[1]
    if cfg.init == "random" or embed.weight.device.type == "meta":  # the memory estimate: values never read
        return torch.randn(n, dim)
    if cfg.init == "vocab":
        ids = torch.randint(0, embed.num_embeddings, (n,))
    else:
        ids = text_ids(model, cfg.init_text, n)
    with torch.no_grad():
        return embed(ids.to(embed.weight.device)).detach().float().cpu().clone()


def text_ids(model: nn.Module, text: str, n: int) -> torch.Tensor:
    """peft's TEXT init: the tokens of `text` (with the tokenizer's special tokens, as peft), repeated or cut to n."""
    from transformers import AutoTokenizer

    source = getattr(model, "name_or_path", None) or model.config._name_or_path
    try:  # a hub base's tokenizer at the revision the model loaded (`peftkit.modeling.load_model`), not main's
        tok = AutoTokenizer.from_pretrained(source, revision=getattr(model, "peftkit_revision", None))
    except (OSError, ValueError) as e:
        raise PeftkitError(f"adapter.init: text needs the base model's tokenizer, which did not load from "
                           f"{source!r} ({e}). Use init: random or vocab (and remove init_text).") from None
    ids = tok(text)["input_ids"]
    if not ids:
        raise PeftkitError(f"adapter.init_text {text!r} has no tokens.")
    return torch.tensor((ids * -(-n // len(ids)))[:n])


class PromptTuning(VirtualMethod):
    name: ClassVar[str] = "prompt_tuning"
    title: ClassVar[str] = "Prompt tuning"
    peft_type: ClassVar[str] = "PROMPT_TUNING"
    config: ClassVar[type] = PromptTuningConfig
    peft_config: ClassVar[type] = PromptTuningPeftConfig

    @classmethod
    def install(cls, model: nn.Module, cfg: PromptTuningConfig) -> VirtualTokens:
        return install(model, VirtualTokens(cls, initial_prompt(model, cfg)))

    @classmethod
    def add_virtual_tokens(cls, virtual: VirtualTokens, model: nn.Module, kwargs: dict, batch: int) -> None:
        embeds = kwargs.pop("inputs_embeds", None)
        ids = kwargs.pop("input_ids", None)
        if embeds is None:
            embeds = model.get_input_embeddings()(ids)
        prompt = virtual.row_prompts(batch, virtual.task_ids).to(embeds.dtype)
        kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
        n = virtual.num_virtual_tokens
        if kwargs.get("labels") is not None:  # virtual tokens are never a target
            labels = kwargs["labels"]
            kwargs["labels"] = torch.cat([labels.new_full((batch, n), IGNORE_INDEX), labels], dim=1)
        virtual.strip = n

    @classmethod
    def prefilled_cache(cls, virtual: VirtualTokens, model: nn.Module, batch: int, task_ids: torch.Tensor | None = None):
        """The model's own forward over each row's prompt alone (positions 0..n-1, as in the full forward)."""
        embeds = virtual.row_prompts(batch, task_ids).to(model.get_input_embeddings().weight.dtype)
        mask = torch.ones(batch, virtual.num_virtual_tokens, dtype=torch.long, device=embeds.device)
        with virtual.bypassed():
            out = model(inputs_embeds=embeds, attention_mask=mask, use_cache=True)
        return out.cache if hasattr(out, "cache") else out.past_key_values

    @classmethod
    def to_peft(cls, cfg: PromptTuningConfig, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        text = cfg.init == "text"
        return cls.peft_common(cfg, targets, base_name) | {
            "prompt_tuning_init": PEFT_INIT[cfg.init], "prompt_tuning_init_text": cfg.init_text if text else None,
            "tokenizer_name_or_path": base_name if text else None, "tokenizer_kwargs": None}

    @classmethod
    def from_peft(cls, peft: PromptTuningPeftConfig, config_file: Path) -> PromptTuningConfig:
        cls.check_peft(peft, config_file)
        init = {v: k for k, v in PEFT_INIT.items()}.get(peft.prompt_tuning_init)
        if init is None:
            raise PeftkitError(f"{config_file}: prompt_tuning_init is {peft.prompt_tuning_init!r}; peft writes one "
                               f"of {', '.join(PEFT_INIT.values())}.")
        text = peft.prompt_tuning_init_text if init == "text" else None
        return PromptTuningConfig(method="prompt_tuning", num_virtual_tokens=peft.num_virtual_tokens,
                                  init=init if init != "text" or text else "random", init_text=text or None)
