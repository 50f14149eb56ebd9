"""The activation model of the memory estimate: what one training micro-batch of a decoder keeps for backward, per
layer and for the logits, from the model's shape alone (`activation_memory`), and the measurement the constants come
from (`saved_activation_bytes`: the storages one forward saves, checked against the model in tests/test_memory.py).
`peftkit.memory` adds the model state and the recipe's settings around it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Activations, in units of one token's hidden state (h values) or MLP width (i values), that a decoder
# layer keeps for backward when its linears are frozen and carry LoRA (weights need no saved input, but the
# LoRA A matrices and the elementwise ops do). Llama-style layer, sdpa attention:
#   norm in (the residual stream) + norm out                              2 h   (x2 norms: 4 h)
#   q and k after RoPE, k and v repeated to all heads (GQA), attn out,
#   and its contiguous copy that o_proj's LoRA keeps                      5 h
#   gate, up, act(gate), act(gate) * up                                   4 i
# so 9 h + 4 i per token (+ r per adapted module for the LoRA A outputs). For SmolLM2-135M (h 576,
# i 1536, 30 layers) at 4 x 256 tokens in fp32: (9*576 + 4*1536) * 1024 * 4 B = 45 MiB a layer, 1.3 GiB
# in all. Eager attention also keeps the scores and their softmax: 2 x heads x seq^2 per sequence.
HIDDEN_PER_LAYER, MLP_PER_LAYER, EAGER_SCORES = 9, 4, 2
# Packed rows (data.packing) reach SDPA with a block-diagonal mask instead of its causal kernel, and each layer then
# keeps that (seq x seq) mask and, per token, one hidden state and one value per head more: batch x seq x (seq + h +
# heads) values a layer (measured exactly with `saved_activation_bytes`, tests/test_memory.py). Eager attention
# already keeps its scores; flash attention takes the rows flattened, without a mask.
# Prefix tuning's virtual keys and values: per virtual token, row and layer, each layer keeps them repeated to all heads
# (2 h values) and one value per query (the mask's extra columns, seq): measured with `saved_activation_bytes` at two
# lengths (tests/test_memory.py). Eager attention's scores grow by as many columns.
PREFIX_PER_TOKEN = 2
# LoRA-FA (A frozen) needs no A input for a weight gradient, so the two norm outputs (the input of q/k/v's and
# gate/up's A) and down_proj's input act(gate) * up are not kept: 2 h + 1 i less per token and layer (o_proj's
# input stays, held by attention's own backward). Measured with `saved_activation_bytes` (tests/test_memory.py).
LORA_FA_FREED_HIDDEN, LORA_FA_FREED_MLP = 2, 1
# The loss (peftkit.loss.next_token_loss_sum) takes the labelled positions' logits (a copy, at most batch x seq x
# vocab in the model's dtype) and computes cross-entropy in fp32 one chunk of rows at a time, recomputed in
# backward. Three batch x seq x vocab tensors of the activation dtype are alive at once (logits + the labelled
# copy in the forward; the gradients of both + the logits in the backward), plus one chunk's fp32 values and their
# log-softmax. SmolLM2 (vocab 49152) at 4 x 256 tokens, fp32: 3 x 192 MiB = 576 MiB, more than its layers. (The head
# computes logits from the first position any row's loss reads on, `peftkit.loss.trimmed_head`: fewer where every
# row has a prompt; counted whole here, as for rows trained from their first token.)
LOGITS_COPIES = 3
LOSS_CHUNK_COPIES = 2


@dataclass
class ModelShape:
    """What the activation term needs from a config."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int


def model_shape(config) -> ModelShape | None:
    """The shape of a decoder config (Llama, Qwen2, GPT-2 names via their attribute maps); None if a
    field is missing (an architecture this estimate does not know: its activations are not counted)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    try:
        hidden, layers = int(text.hidden_size), int(text.num_hidden_layers)
        heads, vocab = int(text.num_attention_heads), int(text.vocab_size)
    except (AttributeError, TypeError):
        return None
    # GPT-2 names its MLP width n_inner, None meaning 4 x hidden
    intermediate = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden
    return ModelShape(layers, hidden, int(intermediate), heads, vocab)


def logits_bytes(tokens: int, vocab: int, act_bytes: int) -> int:
    """What the logits and the loss keep at their peak for `tokens` positions (see the constants above)."""
    from peftkit.loss import CHUNK_ELEMENTS

    return LOGITS_COPIES * tokens * vocab * act_bytes + LOSS_CHUNK_COPIES * min(tokens * vocab, CHUNK_ELEMENTS) * 4


def activation_memory(shape: ModelShape, batch: int, seq: int, act_bytes: int, gradient_checkpointing: bool,
                      lora_width: int = 0, eager: bool = False, frozen_a: bool = False,
                      packed_sdpa: bool = False, prefix: int = 0) -> tuple[float, float]:
    """(logits bytes, layer bytes) one training micro-batch keeps at its peak (see the constants above).

    Args:
        shape: the model's dimensions.
        batch, seq: micro-batch size and sequence length (data.max_length: an upper bound).
        act_bytes: bytes per activation value (the compute dtype).
        gradient_checkpointing: keep only each layer's input, and recompute one layer at a time in backward.
        lora_width: sum of r over the adapted modules of one layer (their A outputs are kept).
        eager: eager attention, which also keeps the seq x seq scores.
        frozen_a: LoRA-FA: the A matrices' inputs are not kept.
        packed_sdpa: packed rows through SDPA, which keeps each layer's mask.
        prefix: prefix tuning's num_virtual_tokens, keys and values every layer attends to beside the sequence's.
    """
    tokens = batch * seq
    logits = logits_bytes(tokens, shape.vocab, act_bytes)
    hidden, mlp = HIDDEN_PER_LAYER, MLP_PER_LAYER
    if frozen_a:
        hidden, mlp = hidden - LORA_FA_FREED_HIDDEN, mlp - LORA_FA_FREED_MLP
    per_layer = tokens * (hidden * shape.hidden + mlp * shape.intermediate + lora_width)
    if eager:
        per_layer += EAGER_SCORES * batch * shape.heads * seq * (seq + prefix)
    if prefix:
        per_layer += batch * prefix * (PREFIX_PER_TOKEN * shape.hidden + seq)
    if packed_sdpa:
        per_layer += tokens * (seq + shape.hidden + shape.heads)
    if gradient_checkpointing:
        # each layer's input is kept, one layer's worth is recomputed during its backward
        layers = shape.layers * tokens * shape.hidden + per_layer
    else:
        layers = shape.layers * per_layer
    return float(logits), float(layers * act_bytes)


def saved_activation_bytes(model: torch.nn.Module, batch: dict) -> int:
    """Measured: bytes of the distinct tensor storages one forward of `model` on `batch` saves for backward,
    the model's own parameters left out (the activation term, for tests and benchmarks)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        # (a sparse COO tensor, FRoD's S, has no storage of its own: its indices' and values')
        for part in (t._indices(), t._values()) if t.is_sparse else (t,):
            storage = part.untyped_storage()
            if storage.data_ptr() not in params:
                saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch)
    return sum(saved.values())
