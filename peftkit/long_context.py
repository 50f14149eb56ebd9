"""LongLoRA's shifted sparse attention (S²-Attn, Chen et al. 2023), during training only.

The sequence is split into groups of `group_size` tokens and every token attends causally inside its group only;
half of the heads see the sequence rolled by -group_size/2, so their groups straddle the others' and information
flows between neighbouring groups. In eval mode (evaluation, generation) the model is the plain model again.

It is registered through transformers' attention interface as `peftkit_s2`, wrapping the model's own attention
function (SDPA or eager); a forward pre-hook on the model selects it while the model is in training mode and puts
the model's own implementation back otherwise. The mask of each group is cut from transformers' full boolean mask
(causal, padding, packed sequences), rolled with the heads: no token ever sees a later one, and the group that wraps
around is cut in two, the sequence's first half-group and its end each seeing only itself (LongLoRA's reference code
lets the first half-group there see the sequence's last half-group), so a row attends alike however far its batch
pads it.
A sequence whose length is not a multiple of the group size is padded at its end inside the attention (the padding
is attended by nothing real and cut from the output).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.errors import PeftkitError

NAME = "peftkit_s2"
KEY = "model.long_context.s2_attention"


def _s2_mask(*args, **kwargs):
    """transformers' SDPA mask, always materialised (boolean, True = may attend), never skipped for is_causal."""
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def register() -> None:
    """Register `peftkit_s2` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, s2_attention_forward)
    AttentionMaskInterface.register(NAME, _s2_mask)


def _base_function(module: nn.Module, base: str):
    """The attention function `base` names for `module` (eager: the function of the module's modelling file)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    return eager if base == "eager" else ALL_ATTENTION_FUNCTIONS.get_interface(base, eager)


def s2_attention_forward(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """The attention interface's signature: (b, heads, L, d) tensors in, ((b, L, heads, d), None) out."""
    group, base = module._peftkit_s2
    fn = _base_function(module, base)
    length = query.shape[2]
    if not module.training or key.shape[2] != length:  # a cache (generation) or eval: plain attention
        return fn(module, query, key, value, attention_mask, **kwargs)
    return shifted_group_attention(fn, module, query, key, value, attention_mask, group, **kwargs), None


def full_mask(attention_mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """A boolean (b, 1, L, L) mask, True = may attend: `attention_mask` (boolean or additive) or causal."""
    if attention_mask is None:
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        return causal.expand(batch, 1, length, length)
    if attention_mask.dtype != torch.bool:
        attention_mask = attention_mask == 0
    return attention_mask.expand(batch, 1, length, length)


def _pad(mask: torch.Tensor, q, k, v, padded: int):
    """Pad the sequence to `padded`: new keys are masked for real queries (they are later), new queries attend causally."""
    b, _, length, _ = mask.shape
    extra = padded - length
    q, k, v = (F.pad(x, (0, 0, 0, extra)) for x in (q, k, v))
    out = torch.ones(padded, padded, dtype=torch.bool, device=mask.device).tril().expand(b, 1, padded, padded).clone()
    out[:, :, :length, :length] = mask
    return out, q, k, v


def shifted_group_attention(fn, module, query, key, value, attention_mask, group: int, **kwargs) -> torch.Tensor:
    """S²-Attn through the attention function `fn`: the first half of the heads in groups of `group` tokens, the
    second half rolled by -group/2 first (and back after). Returns (b, L, heads, d)."""
    b, heads, length, _ = query.shape
    kv_heads = key.shape[1]
    mask = full_mask(attention_mask, b, length, query.device)
    padded = -(-length // group) * group
    if padded != length:
        mask, query, key, value = _pad(mask, query, key, value, padded)
    split, per_kv = heads // 2, heads // kv_heads  # LongLoRA shifts heads[heads // 2:]: 5 of SmolLM2's 9
    if split % per_kv:  # the split falls inside a key/value head's queries (9 heads on 3): give each query its own
        key, value = (x.repeat_interleave(per_kv, dim=1) for x in (key, value))
    kv_split = split * key.shape[1] // heads
    outs = []
    for half, shift in ((0, 0), (1, group // 2)):
        qs = query[:, :split] if half == 0 else query[:, split:]
        ks, vs = ((x[:, :kv_split] if half == 0 else x[:, kv_split:]) for x in (key, value))
        m = mask
        if shift:
            # The roll puts the sequence's last tokens and its first `shift` in one group: cut them apart, so that
            # neither sees the other (the end seeing the start made a row's attention depend on how far the batch
            # padded it: 12 of a 13-token row saw 0-3 alone, in a batch padded to 20 it did not).
            pos = torch.arange(padded, device=mask.device)
            m = m & ~((pos[:, None] >= shift) & (pos[None, :] < shift))
            qs, ks, vs = (x.roll(-shift, dims=2) for x in (qs, ks, vs))
            m = m.roll((-shift, -shift), dims=(2, 3))
        with _kv_groups(module, qs.shape[1] // ks.shape[1]):
            out = _grouped(fn, module, qs, ks, vs, m, group, **kwargs)
        outs.append(out.roll(shift, dims=1) if shift else out)
    return torch.cat(outs, dim=2)[:, :length]


@contextlib.contextmanager
def _kv_groups(module: nn.Module, groups: int) -> Iterator[None]:
    """The attention functions repeat each key/value head `module.num_key_value_groups` times: `groups` meanwhile
    (1 where shifted_group_attention repeated them already)."""
    own = module.num_key_value_groups
    module.num_key_value_groups = groups
    try:
        yield
    finally:
        module.num_key_value_groups = own


def _grouped(fn, module, q, k, v, mask: torch.Tensor, group: int, **kwargs) -> torch.Tensor:
    """Attention inside consecutive groups of `group` tokens: the groups become batch rows. Returns (b, L, h, d)."""
    b, _, length, _ = q.shape
    n = length // group

    def split(x):  # (b, h, L, d) -> (b * n, h, group, d)
        return x.view(b, x.shape[1], n, group, x.shape[3]).transpose(1, 2).reshape(b * n, x.shape[1], group, x.shape[3])

    blocks = mask.reshape(b, 1, n, group, n, group).diagonal(dim1=2, dim2=4)  # (b, 1, group, group, n)
    blocks = blocks.permute(0, 4, 1, 2, 3).reshape(b * n, 1, group, group)
    additive = torch.zeros(blocks.shape, dtype=q.dtype, device=q.device).masked_fill(~blocks, torch.finfo(q.dtype).min)
    out, _ = fn(module, split(q), split(k), split(v), additive, **kwargs)
    return out.reshape(b, length, *out.shape[2:])


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "num_key_value_groups") and hasattr(m, "head_dim")]


def _switch(model: nn.Module, _args, base: str) -> None:
    """Forward pre-hook: S²-Attn in training mode, the model's own attention otherwise."""
    wanted = NAME if model.training else base
    if model.config._attn_implementation != wanted:
        model.config._attn_implementation = wanted


def enable_s2_attention(model: nn.Module, group: int) -> None:
    """Train `model` (a transformers causal LM) with S²-Attn in groups of `group` tokens; eval mode stays plain.

    Raises PeftkitError naming model.long_context.s2_attention for a model it cannot shift (no Llama-style attention
    modules, one head, or an attention implementation that is not sdpa/eager)."""
    base = model.config._attn_implementation
    modules = _attention_modules(model)
    if not modules or base not in ("sdpa", "eager"):
        raise PeftkitError(f"{KEY}: needs a model whose attention goes through transformers' attention interface "
                           f"(Llama, Mistral, Qwen2, ...) with sdpa or eager attention; {type(model).__name__} with "
                           f"{base!r} is not one; set s2_attention: false")
    heads = model.config.num_attention_heads
    if heads < 2:
        raise PeftkitError(f"{KEY}: shifts half of the attention heads; this model has {heads}; set s2_attention: false")
    register()
    for module in modules:
        module._peftkit_s2 = (group, base)
    model.register_forward_pre_hook(partial(_switch, base=base))


def apply(model: nn.Module, recipe) -> None:
    """S²-Attn on `model` when the recipe's model.long_context.s2_attention is on; nothing otherwise."""
    lc = recipe.model.long_context
    if lc is not None and lc.s2_attention:
        enable_s2_attention(model, lc.group_size(recipe.data.max_length))
