"""Decoding by a forward of the whole sequence per new token, for a prompt-family adapter where a KV cache would go
stale (`peftkit.rope_scaling.stale_cache_past_context`: dynamic RoPE past the original context, longrope past its
switch): transformers' generate keeps the cache the virtual tokens come in (`peftkit.methods.virtual`), and without
it hands the model position ids, which the adapter refuses (as packing). `peftkit.decoding.generate_ids` calls it; the
tokens are chosen as generate's sampling loop chooses them."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from peftkit.decoding import Sampling


def whole_forwards(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, sampling: Sampling, stops: list[int],
                    pad: int, streamer=None, ends: list | None = None,
                    task_ids: torch.Tensor | None = None) -> torch.Tensor:
    """`generate`'s decoding of a left-padded batch (`ids`, `mask`) for a prompt-family adapter where a KV cache goes
    stale: each new token from a forward of the whole sequence, the adapter putting its virtual tokens in front as
    in training and evaluation. generate would keep the cache they come in (`generation_inputs`), and without it
    hands the model position ids, which the adapter refuses (as packing). The same processors and token choice as
    generate's sampling loop (`_processors`; the softmax's torch.multinomial, seeded by the caller), a row that met a
    stop token going on with pads; `ends`: generate_ids' stopping criteria. The prompts with their answers."""
    processors = _processors(sampling, pads=(mask == 0).sum(1))
    last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(type(model).forward).parameters else {}
    tasks = {"task_ids": task_ids} if task_ids is not None else {}
    stop = torch.tensor(stops, device=ids.device)
    done = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
    if streamer is not None:
        streamer.put(ids.cpu())
    for _ in range(sampling.max_new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **last, **tasks).logits[:, -1].float()
        scores = processors(ids, logits)
        new = torch.multinomial(scores.softmax(-1), 1)[:, 0] if sampling.temperature > 0 else scores.argmax(-1)
        new = torch.where(done, pad, new)
        ids, mask = torch.cat([ids, new[:, None]], dim=1), torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
        if streamer is not None:
            streamer.put(new.cpu())
        done |= torch.isin(new, stop) | (ends[0](ids, scores) if ends else False)
        if done.all():
            break
    if streamer is not None:
        streamer.end()
    return ids


def _processors(sampling: Sampling, pads: torch.Tensor):
    """The logits processors generate makes of `sampling.options()` (transformers 5's `_get_logits_processor`, in its
    order): the repetition penalty, past each row's `pads`, then, when sampling, the temperature and the cuts."""
    from transformers import (LogitsProcessorList, MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                              TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    made = [RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty, prompt_ignore_length=pads)] if (
        sampling.repetition_penalty != 1) else []
    if sampling.temperature > 0:
        made += [TemperatureLogitsWarper(sampling.temperature)] if sampling.temperature != 1 else []
        made += [TopKLogitsWarper(sampling.top_k)] if sampling.top_k else []
        made += [TopPLogitsWarper(sampling.top_p)] if sampling.top_p < 1 else []
        made += [MinPLogitsWarper(sampling.min_p)] if sampling.min_p else []
    return LogitsProcessorList(made)
