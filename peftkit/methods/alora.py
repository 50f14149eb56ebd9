"""Activated LoRA (aLoRA; Greenewald et al. 2025, arXiv:2504.12397), peft's `alora_invocation_tokens`: LoRA that
acts only on the tokens from its invocation on. Before the last occurrence of the invocation sequence in a row
every layer gives the base's output, so the KV cache of a conversation so far is the base model's, and an aLoRA is
called in mid-conversation without computing it again.

`adapter.alora_invocation_tokens` is the invocation's token ids, as the base's tokenizer encodes it *in context*
(the same string can tokenize otherwise at the start of a text: training checks that the examples hold it). In a
row, the adapter is on at the start of the invocation's last occurrence and every position after; a row without it
is the base's. As peft:

- the positions come from each forward's `input_ids` (a forward pre-hook on the model, `Invocation`); a forward
  from `inputs_embeds` alone runs the base;
- during generation with a KV cache, each new token's forward sees only that token: the rows' starts are kept with
  the cache (`Invocation`), so every generated token is adapted in a row whose prompt held the invocation, and none
  in a row whose prompt did not (as peft's generate: an invocation the model generates does not start it); a cache
  cropped back to before the invocation drops it;
- only linear layers (and Conv1D): not embeddings, not with DoRA; an aLoRA cannot be merged into the weights.

Where peft picks the adapted tokens by a boolean index (a host sync per layer), the update here is computed for
every token and zeroed where the adapter is off (`torch.where`): the same values, without a sync. (With dropout in
training, the draws therefore differ from peft's, which draws for the adapted tokens only: the same distribution.)
"""

from __future__ import annotations

import warnings
import weakref
from typing import Annotated, Any

import torch
from pydantic import Field, field_validator
from torch import nn

from peftkit.errors import PeftkitError, PeftkitWarning
from peftkit.methods.base import PeftConfigBase
from peftkit.section import AdapterSection

InvocationIds = list[Annotated[int, Field(ge=0)]] | None


def _check_ids(value: InvocationIds) -> InvocationIds:
    if value is not None and not value:
        raise ValueError("is empty; give the token ids of the invocation (e.g. the tokenizer's encoding of "
                         "'<|im_start|>assistant\\n'), or leave the key out for plain LoRA")
    return value


class Activation(AdapterSection):
    """The `adapter` key that makes LoRA an activated LoRA."""

    alora_invocation_tokens: InvocationIds = None
    """aLoRA: the token ids of the invocation sequence (as the base's tokenizer encodes it in context); the adapter
    acts from its last occurrence in a row on, and the tokens before it keep the base's outputs (and KV cache)."""

    _ids = field_validator("alora_invocation_tokens")(lambda value: _check_ids(value))


class PeftActivation(PeftConfigBase):
    """adapter_config.json's alora_invocation_tokens."""

    alora_invocation_tokens: InvocationIds = None
    _ids = field_validator("alora_invocation_tokens")(lambda value: _check_ids(value))

    def activation_settings(self) -> dict[str, Any]:
        return {"alora_invocation_tokens": self.alora_invocation_tokens} if self.alora_invocation_tokens else {}


def last_starts(ids: torch.Tensor, invocation: torch.Tensor) -> torch.Tensor:
    """The index in each row of `ids` (batch, T) where the last occurrence of `invocation` (n,), on the same device,
    starts, -1 where it does not occur: (batch,) long, computed on the device without a host sync."""
    n, width = invocation.numel(), ids.shape[1]
    if width < n:
        return torch.full(ids.shape[:1], -1, dtype=torch.long, device=ids.device)
    found = (ids.unfold(1, n, 1) == invocation).all(-1)  # (batch, T - n + 1)
    where = torch.arange(width - n + 1, device=ids.device)
    return torch.where(found, where, -1).amax(dim=1)


def _seen(cache: Any, kwargs: dict) -> int:
    """Positions a KV cache already holds before this forward (0 without one)."""
    if cache is not None and hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    position = kwargs.get("cache_position")
    return int(position[0]) if isinstance(position, torch.Tensor) and position.numel() else 0


class Invocation:
    """Where each row's adapter is on, for the current forward: a forward pre-hook on the model computes it from the
    input ids (`mask`, (batch, T) bool); every aLoRA layer of the model reads it.

    The rows' starts are absolute positions, kept with the KV cache they were found for: a forward continuing that
    cache (transformers' generate feeds the uncached tokens only) keeps them, where they lie inside what the cache
    still holds (a cache cropped back to before an invocation drops it), and a later occurrence in its new tokens
    replaces them. A generated token (a one-token forward right at the cache's end) is not searched: as peft's
    generate, which finds the invocation in the prompt only."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = torch.tensor(ids, dtype=torch.long)
        self.mask: torch.Tensor | None = None
        self._starts: torch.Tensor | None = None
        self._cache: Any = None
        self._end = 0  # the position after the last forward's tokens
        self._warned = False

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            self.mask = self._starts = None
            if not self._warned:
                warnings.warn(PeftkitWarning("aLoRA: a forward without input_ids (inputs_embeds only) cannot find the "
                                             "invocation, so it runs the base model (as peft's)."), stacklevel=2)
                self._warned = True
            return
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # (transformers 5.2x's name, and 4's)
        seen, width = _seen(cache, kwargs), ids.shape[1]
        if self.ids.device != ids.device:  # (once: a copy from the host each forward would wait for the device)
            self.ids = self.ids.to(ids.device)
        kept = self._cache() if self._cache is not None else None
        same = bool(seen) and cache is not None and kept is cache and self._starts is not None \
            and self._starts.shape[0] == ids.shape[0]
        if same and width == 1 and seen == self._end:
            starts = self._starts  # a generated token
        else:
            starts = last_starts(ids, self.ids)
            starts = torch.where(starts >= 0, starts + seen, -1)
            if same:  # a continuation of the cache: its starts still inside it count
                earlier = torch.where(self._starts < seen, self._starts, -1)
                starts = torch.where(starts >= 0, starts, earlier)
        self._starts, self._end = starts, seen + width
        try:
            self._cache = weakref.ref(cache) if cache is not None else None
        except TypeError:  # (a cache class that takes no weak references: its starts are not carried over)
            self._cache = None
        positions = torch.arange(seen, seen + width, device=ids.device)
        self.mask = (starts[:, None] >= 0) & (positions[None, :] >= starts[:, None])


class Activated:
    """What makes a LoRA layer (before it in the bases, `ALoraLinear(Activated, LoraLinear)`) an aLoRA: its update on
    the tokens from the invocation on, the base's output before it, where the model's `Invocation` says. Added in the
    adapter's dtype and rounded once, as peft's in-place add (its bitsandbytes layers' too): the positions before the
    invocation add 0 exactly. It cannot be merged."""

    invocation: Invocation | None = None
    path = ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        update = masked(self.update(x), self.invocation, self.path)
        return result if update is None else (result + update).to(result.dtype)

    def merge(self) -> None:
        raise PeftkitError(UNMERGEABLE)


UNMERGEABLE = ("An aLoRA adapter (alora_invocation_tokens) cannot be merged: it changes only the tokens from its "
               "invocation on, which no weight can do. Keep it separate (export.merged: false; skip `peftkit merge`) "
               "and use it with --adapter DIR, or peft's PeftModel.from_pretrained.")


def alora_conflict(recipe: Any) -> str | None:
    """Why a recipe cannot train an aLoRA, or None."""
    if recipe.data.packing:
        return ("adapter.alora_invocation_tokens (aLoRA) with data.packing: the adapter acts from the invocation's "
                "last occurrence in a row, and a packed row holds several examples; set data.packing: false")
    if recipe.classifier:
        return ("adapter.alora_invocation_tokens (aLoRA) is for causal language models (peft's too), not a classifier "
                "(model.num_labels); remove alora_invocation_tokens")
    return None


def install_invocation(model: nn.Module, ids: list[int], layers: dict[str, nn.Module]) -> Invocation:
    """The model's `Invocation`, hooked on its forward and given to each aLoRA layer (by path)."""
    invocation = Invocation(ids)
    model.register_forward_pre_hook(invocation, with_kwargs=True)
    for path, layer in layers.items():
        layer.invocation, layer.path = invocation, path
    return invocation


def masked(update: torch.Tensor, invocation: Invocation | None, where: str) -> torch.Tensor | None:
    """`update` (batch, T, out) where the adapter is on and 0 elsewhere; None where it is on nowhere (no input ids).
    A layer that sees the last positions only (the output head under generate's logits_to_keep) takes theirs; one
    that sees the tokens flattened (batch x T, out) (a mixture-of-experts' shared expert) takes them so."""
    mask = invocation.mask if invocation is not None else None
    if mask is None:
        return None
    shape = update.shape[:-1]
    if len(shape) == 2 and shape[0] == mask.shape[0] and shape[1] <= mask.shape[1]:
        mask = mask[:, mask.shape[1] - shape[1]:]
    elif len(shape) == 1 and shape[0] == mask.numel():
        mask = mask.reshape(-1)
    else:
        raise PeftkitError(f"aLoRA: '{where}' got {tuple(shape)} tokens where the model's input ids were "
                           f"{tuple(mask.shape)}, so which of them follow the invocation is unknown (a layer that "
                           "takes a subset of the tokens, such as a routed expert). Leave it out of "
                           "adapter.target_modules.")
    return torch.where(mask[..., None], update, 0)


COVERAGE_CHUNK = 1 << 24
"""Tokens searched at a time by `invocation_coverage` (its scratch: a few bytes a token of a chunk)."""


def invocation_coverage(examples: Any, invocation: list[int]) -> tuple[int, int]:
    """(examples that hold the invocation, those of them with a labelled token after its last occurrence's start:
    the ones that train the adapter) among causal-LM `examples` (`peftkit.data.stored.Examples`)."""
    from peftkit.data import IGNORE_INDEX

    flat_ids, flat_labels, ends = examples.arrays()
    n, count = len(invocation), len(ends)
    if len(flat_ids) < n or not count:
        return 0, 0
    ids = torch.frombuffer(flat_ids, dtype=torch.int32)
    ends = torch.tensor(ends, dtype=torch.long)
    pattern = torch.tensor(invocation, dtype=torch.int32)
    last = torch.full((count,), -1, dtype=torch.long)
    for begin in range(0, len(flat_ids) - n + 1, COVERAGE_CHUNK):  # (windows starting in the chunk)
        window = ids[begin:begin + COVERAGE_CHUNK + n - 1]
        starts = torch.nonzero((window.unfold(0, n, 1) == pattern).all(-1)).flatten() + begin
        owner = torch.searchsorted(ends, starts, right=True)
        inside = starts + n <= ends[owner]  # (not across two examples)
        last.scatter_reduce_(0, owner[inside], starts[inside], "amax")
    last_label = torch.full((count,), -1, dtype=torch.long)
    labels = torch.frombuffer(flat_labels, dtype=torch.int32)
    for begin in range(0, len(flat_labels), COVERAGE_CHUNK):
        labelled = torch.nonzero(labels[begin:begin + COVERAGE_CHUNK] != IGNORE_INDEX).flatten() + begin
        last_label.scatter_reduce_(0, torch.searchsorted(ends, labelled, right=True), labelled, "amax")
    holding = last >= 0
    # the label of token j is predicted at position j - 1, which the adapter changes from the start on
    return int(holding.sum()), int((holding & (last_label > last)).sum())


def check_invocation_ids(invocation: list[int], tok: Any) -> None:
    """Refuse an invocation id past the tokenizer's vocabulary: no text encodes to it, so the adapter would never act
    (said before the data is read, by validate too; it was said as an invocation the data lacks)."""
    if past := [i for i in invocation if i >= len(tok)]:
        raise PeftkitError(
            f"adapter.alora_invocation_tokens {invocation}: token id {past[0]} is past the tokenizer's {len(tok)} "
            f"tokens (ids 0 to {len(tok) - 1}), so no text holds the invocation and the adapter would never act. Give "
            "the ids as the tokenizer encodes the invocation inside a text (tok(example_text).input_ids shows them).")


def check_invocation(invocation: list[int], examples: Any, tok: Any) -> str | None:
    """Refuse training data in which the invocation never occurs before a labelled token (the adapter would train
    nothing: most often ids encoded out of context); a warning (returned) where some examples lack it."""
    check_invocation_ids(invocation, tok)
    holding, training = invocation_coverage(examples, invocation)
    total = len(examples)
    shown = f"adapter.alora_invocation_tokens {invocation} ({tok.decode(invocation)!r})"
    if not training:
        where = (f"occurs in none of the {total} training examples" if not holding else
                 f"occurs in {holding} of the {total} training examples, but never before a labelled token")
        raise PeftkitError(
            f"{shown} {where}, so the adapter would be off on every trained token and "
            "learn nothing. Give the ids as the tokenizer encodes the invocation inside a text, which can differ from "
            "the string alone (compare tok(example_text).input_ids with tok(invocation, add_special_tokens=False)), "
            "and put it before the answer the adapter learns.")
    if training < total:
        where = "does not occur in them" if holding == training else "is missing from them or comes after their labels"
        return (f"warning: {total - training} of the {total} training examples train nothing: {shown} {where}, and "
                "the adapter acts only from it on.")
    return None
