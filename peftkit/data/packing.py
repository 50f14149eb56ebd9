"""`data.packing`: several examples in one row of up to `data.max_length` tokens.

Each packed example keeps its own position ids, from 0; with those and no attention mask, transformers builds
a block-diagonal causal mask (its packed-sequence detection in `masking_utils`: a position that does not follow
the one before starts a new sequence), so no token attends across an example boundary, on the SDPA and eager
paths alike. The first label of each example is masked: in an unpacked batch it is never predicted (position t
predicts t + 1), and packed it would be predicted from the end of the example before it. So a packed batch has
the loss and gradients of the same examples unpacked (tests/test_packing.py).

Rows are filled in the data's order, each example going into the current row while it fits (next fit), so the
packing is the same for every run of the same data; the seeded epoch order then shuffles rows.
"""

from __future__ import annotations

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
