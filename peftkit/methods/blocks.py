"""Finding a decoder's sub-layers (attention block, MLP) and reading the arguments they are called with: what
the module adapters (Llama-Adapter, bottleneck) wrap instead of single linear layers.

Architecture-agnostic where it can be: a decoder block is a module with one attention child and one MLP child,
each recognised by its usual name (`self_attn`/`attn`, `mlp`) or by its class name (`...Attention`, `...MLP`),
so Llama, Mistral, Qwen2 and GPT-2 (`model.layers.N.self_attn` / `transformer.h.N.attn`) need no table.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftkit.errors import PeftkitError

ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn")


@dataclass(frozen=True)
class DecoderBlock:
    path: str
    attention: str
    """Full path of the attention block (its output is after the output projection, before the residual)."""
    mlp: str
    """Full path of the feed-forward block."""


def _is_attention(name: str, module: nn.Module) -> bool:
    return name in ATTENTION_NAMES or type(module).__name__.endswith("Attention")


def _is_mlp(name: str, module: nn.Module) -> bool:
    return name in MLP_NAMES or type(module).__name__.endswith(("MLP", "Mlp"))


def decoder_blocks(model: nn.Module, method: str) -> list[DecoderBlock]:
    """The decoder blocks of `model` in model order; a PeftkitError naming `method` when it has none."""
    blocks = []
    for path, module in model.named_modules():
        children = dict(module.named_children())
        attention = next((n for n, c in children.items() if _is_attention(n, c)), None)
        mlp = next((n for n, c in children.items() if _is_mlp(n, c)), None)
        if attention and mlp:
            prefix = f"{path}." if path else ""
            blocks.append(DecoderBlock(path, prefix + attention, prefix + mlp))
    if not blocks:
        raise PeftkitError(
            f"adapter.method {method}: found no decoder blocks in {type(model).__name__} (a module with an attention "
            f"child named {'/'.join(ATTENTION_NAMES)} or a class ending in 'Attention', and an MLP child named "
            f"{'/'.join(MLP_NAMES)} or a class ending in 'MLP'). Use a LoRA-family method for this architecture."
        )
    return blocks


def norm_layers(model: nn.Module) -> list[str]:
    """Full paths of the normalisation layers with a learned scale (LayerNorm, RMSNorm, ...), in model order."""
    return [n for n, m in model.named_modules()
            if n and "norm" in type(m).__name__.lower() and isinstance(getattr(m, "weight", None), nn.Parameter)]


class CallArguments:
    """Reads a wrapped module's call arguments by name, however the caller passed them (by position or keyword):
    transformers' decoder layers pass `hidden_states=...`, older code and GPT-2 blocks pass it first."""

    def __init__(self, module: nn.Module) -> None:
        self.names = [n for n, p in inspect.signature(module.forward).parameters.items()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

    def get(self, name: str | int, args: tuple, kwargs: dict[str, Any]) -> Any:
        """The argument called `name` (or the `name`-th positional one), None when not given."""
        key = self.names[name] if isinstance(name, int) else name
        if key in kwargs:
            return kwargs[key]
        position = self.names.index(key) if key in self.names else len(args)
        return args[position] if position < len(args) else None


def first_output(out: Any) -> torch.Tensor:
    """The hidden states a sub-layer returns: the tensor, or the first element of an (output, weights) tuple."""
    return out[0] if isinstance(out, tuple) else out


def with_first_output(out: Any, hidden: torch.Tensor) -> Any:
    """`out` with its hidden states replaced by `hidden`, in the same form (tensor or tuple)."""
    return (hidden, *out[1:]) if isinstance(out, tuple) else hidden
