"""Decoding for a prompt-family adapter where generate's KV cache would go stale
(`peftkit.rope_scaling.stale_cache_past_context`: dynamic RoPE past the original context, longrope past its switch):
transformers' generate keeps the cache the virtual tokens come in (`peftkit.methods.virtual`), and without it hands
the model position ids, which the adapter refuses (as packing). Each new token is chosen as from a forward of the
whole sequence, the adapter putting its virtual tokens in front as in training and evaluation; such a forward runs
where the RoPE frequencies change (`rotation_by_length`), and a KV cache it fills decodes the steps whose frequencies
are its own: under dynamic RoPE up to the original context (past it every length has its own), under longrope up to
the switch and after one whole forward there. `peftkit.decoding.generate_ids` calls it; the tokens are chosen as
generate's sampling loop chooses them."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import torch
from torch import nn

from peftkit.methods.virtual import positions, virtual_tokens
from peftkit.rope_scaling import rotation_by_length

if TYPE_CHECKING:
    from peftkit.decoding import Sampling


def whole_forwards(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, sampling: Sampling, stops: list[int],
                   pad: int, streamer=None, ends: list | None = None,
                   task_ids: torch.Tensor | None = None) -> torch.Tensor:
    """`generate`'s decoding of a left-padded batch (`ids`, `mask`) for a prompt-family adapter where generate's KV
    cache goes stale: each new token's logits those of a forward of the whole sequence (`_Forwards`), the adapter
    putting its virtual tokens in front as in training and evaluation. generate would keep the cache they come in
    (`generation_inputs`), and without it hands the model position ids, which the adapter refuses (as packing). The
    same processors and token choice as generate's sampling loop (`_processors`; the softmax's torch.multinomial,
    seeded by the caller), a row that met a stop token going on with pads; `ends`: generate_ids' stopping criteria.
    The prompts with their answers."""
    processors = _processors(sampling, pads=(mask == 0).sum(1))
    forwards = _Forwards(model, {"task_ids": task_ids} if task_ids is not None else {})
    stop = torch.tensor(stops, device=ids.device)
    done = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
    if streamer is not None:
        streamer.put(ids.cpu())
    for _ in range(sampling.max_new_tokens):
        scores = processors(ids, forwards(ids, mask))
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


class _Forwards:
    """The logits of a sequence's next token, as a forward of the whole sequence gives them. Its keys are rotated by
    frequencies the sequence's length sets (`rotation_by_length`); a KV cache filled at lengths of the same rotation
    holds those keys, so a forward of the newest token over it gives them too (up to float rounding, as generate's
    cache does), where the whole forward's cost grows with the length: the tiny Llama of 64 original positions under
    longrope, 8 virtual tokens and a 46-token prompt, 48 new tokens: 2 whole forwards instead of 48. A whole forward
    runs where the cache's rotation is not the sequence's (the first step, longrope's switch, each step of dynamic
    RoPE past its context) and fills a new cache where the next length's rotation is its own."""

    def __init__(self, model: nn.Module, tasks: dict) -> None:
        self.model, self.tasks = model, tasks
        self.virtual = getattr(virtual_tokens(model), "num_virtual_tokens", 0)
        self.rotation = rotation_by_length(model)
        takes = inspect.signature(type(model).forward).parameters
        self.last = {"logits_to_keep": 1} if "logits_to_keep" in takes else {}
        self.cache_key = "cache" if "cache" in takes else "past_key_values"  # (transformers 5's name; 4's)
        self.cache, self.cache_rotation = None, None

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(batch, vocab) fp32 logits of the token after each row of `ids` (left-padded, `mask`)."""
        # The forward's positions: its largest position id + 1 (the virtual tokens', then the mask's running count)
        length = self.virtual + int(mask.sum(1).max())
        rotation = self.rotation(length)
        if self.cache is not None and rotation == self.cache_rotation:
            full = torch.cat([mask.new_ones(len(mask), self.virtual), mask], dim=1)  # the cache's virtual tokens too
            out = self.model(input_ids=ids[:, -1:], attention_mask=full, position_ids=positions(full)[:, -1:],
                             use_cache=True, **{self.cache_key: self.cache}, **self.tasks)
            return out.logits[:, -1].float()
        keep = self.rotation(length + 1) == rotation  # (past dynamic RoPE's context: never)
        out = self.model(input_ids=ids, attention_mask=mask, use_cache=keep, **self.last, **self.tasks)
        self.cache = (out.cache if hasattr(out, "cache") else out.past_key_values) if keep else None
        self.cache_rotation = rotation
        return out.logits[:, -1].float()


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
