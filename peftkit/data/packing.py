"""`data.packing`: several examples in one row of up to `data.max_length` tokens.

Each packed example keeps its own position ids, from 0; with those and no attention mask, transformers builds
a block-diagonal causal mask (its packed-sequence detection in `masking_utils`: a position that does not follow
the one before starts a new sequence), so no token attends across an example boundary, on the SDPA and eager
paths alike. That holds for the models that hand their position ids to the mask (Llama, Qwen, Mistral, Gemma,
Phi, GPT-2, GPT-NeoX, Falcon...), not for OPT, Bloom or MPT in transformers 5.24: `check_isolated` tries the
loaded model and refuses packing where one example would see another. The first label of each example is
masked: in an unpacked batch it is never predicted (position t predicts t + 1), and packed it would be predicted
from the end of the example before it. So a packed batch has the loss and gradients of the same examples
unpacked (tests/test_packing.py).

With a flash-attention model (model.attn_implementation: flash_attention_2) a packed batch is flattened into one
row without its padding (`flatten`), with the examples' boundaries: transformers' flash path then runs its
variable-length kernels on the examples, computing no padding at all. (Left as rows, the flash kernels would see
one causal sequence per row: they take packed sequences from position ids only in a batch of one.)

Rows are filled in the data's order, each example going into the current row while it fits (next fit), so the
packing is the same for every run of the same data; the seeded epoch order then shuffles rows.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from peftkit.data.examples import IGNORE_INDEX
from peftkit.data.stored import Example, Examples
from peftkit.errors import PeftkitError


def pack_examples(examples: Sequence[Example], max_length: int) -> Examples:
    """Rows of consecutive examples, each at most `max_length` tokens (an example is never split)."""
    rows = Examples()
    current = Example([], [], [])
    for example in examples:
        n = len(example.input_ids)
        if current.input_ids and len(current.input_ids) + n > max_length:
            rows.append(current)
            current = Example([], [], [])
        current.input_ids += example.input_ids
        current.labels += [IGNORE_INDEX] + example.labels[1:]
        current.position_ids += list(range(n))
    if current.input_ids:
        rows.append(current)
    return rows


@torch.no_grad()
def check_isolated(model: torch.nn.Module) -> None:
    """Refuse data.packing for a model whose examples, packed in one row, would attend to each other: two rows that
    differ only in their first example must give the second example the same logits. (Two forwards of 8 tokens of
    the model as loaded, in eval mode, each as training runs a packed row: position ids and no mask, flattened with
    the examples' bounds for flash attention.)"""
    device, vocab = next(model.parameters()).device, model.config.get_text_config().vocab_size
    flash = getattr(model.config, "_attn_implementation", None) == "flash_attention_2"
    kind = getattr(model.config, "model_type", type(model).__name__)
    accepted = inspect.signature(model.forward).parameters.values()
    if not any(p.name == "position_ids" or p.kind is p.VAR_KEYWORD for p in accepted):  # (remote code can lack it)
        raise PeftkitError(f"data.packing: this {kind} model's forward takes no position_ids, and a packed row needs "
                           "them to keep its examples apart. Set data.packing: false.")
    logits = []
    for first in (range(1, 5), range(5, 9)):  # then the same second example, tokens 9-12
        ids = torch.tensor([[t % vocab for t in [*first, *range(9, 13)]]])
        row = {"input_ids": ids, "position_ids": torch.arange(4).repeat(2).unsqueeze(0), "labels": ids,
               "attention_mask": torch.ones_like(ids)}
        inputs = {k: v for k, v in (flatten(row) if flash else row).items() if k not in ("labels", "attention_mask")}
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        logits.append(model(**inputs, use_cache=False).logits[0, 4:])
    moved = float((logits[0].float() - logits[1].float()).abs().max())
    rounding = 1e-4 if logits[0].dtype == torch.float32 else 1e-2  # 16-bit kernels may round rows apart
    if moved > rounding * float(logits[0].float().abs().max()):
        attention = getattr(model.config, "_attn_implementation", None) or "default"
        raise PeftkitError(
            f"data.packing: with {kind} models ({attention} attention) the examples packed into one row would attend "
            f"to each other (a change in one moved the next one's logits by {moved:.3g}): transformers builds the "
            "per-example mask only for models that pass it their position ids. Set data.packing: false.")


def describe_packing(examples: Sequence[Example], rows: Examples, max_length: int) -> str:
    tokens = sum(rows.lengths())
    return (f"data.packing: {len(examples)} examples in {len(rows)} rows of up to {max_length} tokens "
            f"({100 * tokens / (len(rows) * max_length):.0f}% filled)")


VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
"""transformers' flash-attention kwargs for a flattened row: where each example starts, and the longest."""


def flatten(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | int]:
    """A packed batch's real tokens as one row (1, tokens), row after row, without the padding or the mask. Each
    example keeps its position ids and its masked first label, so the loss is the batch's.

    With them go the examples' boundaries (`VARLEN_KEYS`, as transformers' DataCollatorWithFlattening gives them),
    counted here on the CPU: without them every attention layer finds the boundaries again from the position ids,
    with a host sync each (a `nonzero`)."""
    keep = batch["attention_mask"].bool()
    flat = {k: batch[k][keep].unsqueeze(0) for k in ("input_ids", "position_ids", "labels")}
    positions = flat["position_ids"][0]
    starts = torch.nonzero(positions == 0).flatten().tolist()
    bounds = torch.tensor([*starts, len(positions)], dtype=torch.int32)
    longest = int((bounds[1:] - bounds[:-1]).max())
    return flat | {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": longest, "max_length_k": longest}
