"""Llama-Adapter (Zhang et al. 2023, "LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init
Attention", arXiv:2303.16199): `adapter_len` learned prompt vectors in each of the top `adapter_layers` attention
blocks, which every token also attends to through a gate that starts at zero (so step 0 is the base model).

Numerics are HF peft's `ADAPTION_PROMPT` (peft 0.21 `tuners/adaption_prompt/layer.py`), so adapters load in either
tool: per attention block, with the prompt P (1, L, hidden) and the block's input h,

    keys K = k_proj(P), values V = v_proj(P)     (no RoPE, no causal mask; GQA: each K/V head repeated for its
                                                  query heads)
    queries Q = RoPE(q_proj(h))                  (the block's own query projection, recomputed, at h's positions)
    out = attention(h) + o_proj(gate * softmax(Q K^T / sqrt(head_dim)) V)

The prompt's softmax is separate from the block's own (peft's form, not the paper's joint one); every token
attends to all L prompt vectors, padding included (harmless: a pad's output is never read). GPT-2: K, V, Q are
the split of `c_attn`, and the result is added without `c_proj` (peft's AdaptedAttentionGPT).

The adapter is a computation of its own, not a weight update: there is nothing to merge (`mergeable = False`).
Saved as peft saves it: `base_model.model.<attention path>.adaption_prompt` (1, L, hidden) and
`.adaption_gate` (1,), adapter_config.json with `target_modules` the attention module's name (`self_attn`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.methods.base import REEXPORT, Method, PeftConfigBase, draw_device
from peftkit.methods.layer import AdapterLayer
from peftkit.methods.blocks import CallArguments, first_output, with_first_output
from peftkit.section import AdapterSection

# The architectures peft 0.21's ADAPTION_PROMPT supports (its TRANSFORMERS_MODEL_CONFIG) and the name of their
# attention modules: only these, so that every adapter peftkit writes loads in peft (but for heads that do not add up
# to the hidden size, Mistral-Nemo's 32 x 128 of 5120, on which peft's own forward fails: README).
ATTENTION_MODULE = {"llama": "self_attn", "mistral": "self_attn", "gpt2": "attn"}


class LlamaAdapterConfig(AdapterSection):
    """Llama-Adapter: zero-init gated adaption prompts in the top attention layers."""

    method: Literal["llama_adapter"]
    adapter_len: int = Field(10, gt=0)
    """Prompt vectors per adapted layer (the paper's 10)."""
    adapter_layers: int | None = Field(None, gt=0)
    """How many attention layers, counted from the top, get a prompt (the paper: 30 of LLaMA-7B's 32); null:
    every layer."""

    @property
    def modules_to_save(self) -> list[str]:
        # peft's ADAPTION_PROMPT trains the prompts and gates only: no module is saved whole.
        return []


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class AdaptionPromptLayer(AdapterLayer):
    """Llama-Adapter around one attention block (`base_layer`: LlamaAttention, MistralAttention, GPT2Attention)."""

    def __init__(self, base_layer: nn.Module, adapter_len: int, hidden_size: int) -> None:
        super().__init__(base_layer)
        self.facts = None
        self.gpt2 = hasattr(base_layer, "c_attn")
        device = next(base_layer.parameters()).device
        # peft draws the prompt from N(0, 1) (the official repo's nn.Embedding init); the gate starts at 0.
        # Drawn on the CPU, then moved: one seed, one adapter on any device.
        self.adaption_prompt = nn.Parameter(
            torch.empty(1, adapter_len, hidden_size, device=draw_device(device)).normal_().to(device))
        self.adaption_gate = nn.Parameter(torch.zeros(1, device=device))
        self.arguments = CallArguments(base_layer)

    def forward(self, *args, **kwargs):
        out = self.base_layer(*args, **kwargs)
        hidden = self.arguments.get("hidden_states", args, kwargs)
        output = first_output(out)
        extra = self._gpt2_extra(hidden) if self.gpt2 else self._llama_extra(hidden, args, kwargs)
        return with_first_output(out, (output + extra).to(output.dtype))

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """gate * softmax(Q K^T / sqrt(d)) V for Q (b, heads, n, d), K and V (1, heads, L, d): (b, n, heads * d)."""
        scores = query @ key.transpose(2, 3).to(query.dtype) / math.sqrt(query.shape[-1])
        probs = (self.adaption_gate * torch.softmax(scores, dim=-1, dtype=torch.float32)).to(value.dtype)
        b, _, n, _ = query.shape
        return (probs @ value).transpose(1, 2).reshape(b, n, -1)

    def _llama_extra(self, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        attn = self.base_layer
        b, n, _ = hidden.shape
        heads, head_dim, length = attn.config.num_attention_heads, attn.head_dim, self.adaption_prompt.shape[1]
        prompt = self.adaption_prompt.to(hidden.dtype)
        key, value = attn.k_proj(prompt), attn.v_proj(prompt)
        kv_heads = key.shape[-1] // head_dim
        key, value = (t.view(1, length, kv_heads, head_dim).transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
                      for t in (key, value))
        query = attn.q_proj(hidden).view(b, n, heads, head_dim).transpose(1, 2)
        cos, sin = self.arguments.get("position_embeddings", args, kwargs)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        query = query * cos + _rotate_half(query) * sin  # RoPE on the queries only: the prompt has no position
        return attn.o_proj(self._attend(query, key, value))

    def _gpt2_extra(self, hidden: torch.Tensor) -> torch.Tensor:
        attn = self.base_layer
        b, n, embed = hidden.shape
        heads, head_dim, length = attn.num_heads, attn.head_dim, self.adaption_prompt.shape[1]
        query = attn.c_attn(hidden).split(embed, dim=2)[0].view(b, n, heads, head_dim).transpose(1, 2)
        _, key, value = attn.c_attn(self.adaption_prompt.to(hidden.dtype)).split(embed, dim=2)
        key, value = (t.view(1, length, heads, head_dim).transpose(1, 2) for t in (key, value))
        return self._attend(query, key, value)  # peft adds it without c_proj


class PeftAdaptionPromptConfig(PeftConfigBase):
    """The fields of an ADAPTION_PROMPT adapter_config.json (peft's AdaptionPromptConfig)."""

    adapter_len: int | None = Field(None, gt=0)
    adapter_layers: int | None = Field(None, gt=0)


class LlamaAdapter(Method):
    name = "llama_adapter"
    title = "Llama-Adapter"
    peft_type = "ADAPTION_PROMPT"
    config = LlamaAdapterConfig
    peft_config = PeftAdaptionPromptConfig
    param_names = ("adaption_prompt", "adaption_gate")
    mergeable = False

    @classmethod
    def select_targets(cls, model: nn.Module, cfg: LlamaAdapterConfig, every_entry: bool) -> list[str]:
        """The top `adapter_layers` attention modules, found as peft finds them: by the architecture's name."""
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in ATTENTION_MODULE:
            raise PeftkitError(
                f"adapter.method llama_adapter: model type {model_type!r} is not supported; peft's ADAPTION_PROMPT, "
                f"whose format peftkit writes, supports {', '.join(ATTENTION_MODULE)}. Use another method (lora, "
                "bottleneck) for this model."
            )
        names = [n for n, _ in model.named_modules() if n.endswith("." + ATTENTION_MODULE[model_type])]
        wanted = cfg.adapter_layers or len(names)
        if wanted > len(names):
            raise PeftkitError(f"adapter.adapter_layers: {wanted}, but the model has {len(names)} attention layers; "
                               f"set it to at most {len(names)} (or null for all).")
        return names[len(names) - wanted:]

    @classmethod
    def wrap(cls, base: nn.Module, cfg: LlamaAdapterConfig, path: str) -> AdaptionPromptLayer:
        return AdaptionPromptLayer(base, cfg.adapter_len, base.config.hidden_size)

    @classmethod
    def to_peft(cls, cfg: LlamaAdapterConfig, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        return {"peft_type": cls.peft_type, "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
                "target_modules": targets[0].rsplit(".", 1)[-1], "adapter_len": cfg.adapter_len,
                "adapter_layers": len(targets), "inference_mode": True, "revision": None}

    @classmethod
    def from_peft(cls, peft: PeftAdaptionPromptConfig, config_file: Path) -> LlamaAdapterConfig:
        for key in ("adapter_len", "adapter_layers"):
            if getattr(peft, key) is None:
                raise PeftkitError(f'{config_file}: "{key}" is missing; an ADAPTION_PROMPT adapter needs it. {REEXPORT}')
        if peft.target_modules not in set(ATTENTION_MODULE.values()):
            raise PeftkitError(f'{config_file}: "target_modules" is {peft.target_modules!r}; peft\'s ADAPTION_PROMPT '
                               f"adapts the attention modules ({' or '.join(sorted(set(ATTENTION_MODULE.values())))}). "
                               f"{REEXPORT}")
        return LlamaAdapterConfig(method="llama_adapter", adapter_len=peft.adapter_len, adapter_layers=peft.adapter_layers)

    @classmethod
    def kept_for_backward(cls, cfg: LlamaAdapterConfig, layer: AdapterLayer) -> tuple[int, int]:
        # Per token: the recomputed query and its RoPE'd copy (2 x hidden), the softmax and the gated
        # probabilities (2 x heads x L, fp32), the attended values before o_proj (hidden). Per layer: the
        # prompt's keys and values (2 x L x hidden at most).
        hidden, length = layer.adaption_prompt.shape[2], layer.adaption_prompt.shape[1]
        heads = layer.base_layer.config.num_attention_heads
        return 3 * hidden + 2 * heads * length, 2 * length * hidden

    @classmethod
    def describe(cls, cfg: LlamaAdapterConfig) -> str:
        return f"{cls.title} adapter_len={cfg.adapter_len}"

    @classmethod
    def randomize(cls, layer: AdapterLayer, generator: torch.Generator, std: float) -> None:
        # A gate far from 0 (both signs over the layers), so that the prompt really changes the output.
        with torch.no_grad():
            layer.adaption_prompt.copy_(torch.randn(layer.adaption_prompt.shape, generator=generator))
            sign = 1 if torch.rand(1, generator=generator) < 0.5 else -1
            layer.adaption_gate.fill_(sign * std * 5 * (1 + float(torch.rand(1, generator=generator))))


AdaptionPromptLayer.method = LlamaAdapter
