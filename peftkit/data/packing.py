"""`data.packing`: several examples in one row of up to `data.max_length` tokens.

Each packed example keeps its own position ids, from 0; with those and no attention mask, transformers builds
a block-diagonal causal mask (its packed-sequence detection in `masking_utils`: a position that does not follow
the one before starts a new sequence), so no token attends across an example boundary, on the SDPA and eager
paths alike. The first label of each example is masked: in an unpacked batch it is never predicted (position t
predicts t + 1), and packed it would be predicted from the end of the example before it. So a packed batch has
the loss and gradients of the same examples unpacked (tests/test_packing.py).

With a flash-attention model (model.attn_implementation: flash_attention_2) a packed batch is flattened into one
row without its padding (`flatten`): transformers' flash path then finds the examples from the position ids and runs
its variable-length kernels on them, computing no padding at all. (Left as rows, the flash kernels would see one
causal sequence per row: they take packed sequences from position ids only in a batch of one.)

Rows are filled in the data's order, each example going into the current row while it fits (next fit), so the
packing is the same for every run of the same data; the seeded epoch order then shuffles rows.
"""

from __future__ import annotations

import torch

from peftkit.data.examples import IGNORE_INDEX, Example


def pack_examples(examples: list[Example], max_length: int) -> list[Example]:
    """Rows of consecutive examples, each at most `max_length` tokens (an example is never split)."""
    rows: list[Example] = []
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


def describe_packing(examples: list[Example], rows: list[Example], max_length: int) -> str:
    tokens = sum(len(r.input_ids) for r in rows)
    return (f"data.packing: {len(examples)} examples in {len(rows)} rows of up to {max_length} tokens "
            f"({100 * tokens / (len(rows) * max_length):.0f}% filled)")


def flatten(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A packed batch's real tokens as one row (1, tokens), row after row, without the padding or the mask. Each
    example keeps its position ids and its masked first label, so the loss is the batch's."""
    keep = batch["attention_mask"].bool()
    return {k: batch[k][keep].unsqueeze(0) for k in ("input_ids", "position_ids", "labels")}
