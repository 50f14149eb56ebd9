"""Datasets → token ids with loss masks → padded batches in a seeded, resumable order.

Formats (the fields each row must have):
- `alpaca`: instruction, output, optional input. Loss on the response only.
- `chat`: messages = [{role, content}, ...], rendered with the tokenizer's chat template. Loss on the
  assistant turns only (their content and the template's end-of-turn marker).
- `completion`: prompt, completion. Loss on the completion only.
- `text`: text. Loss on every token.
- `classification`: text, label, optional text_pair: one class per row, for model.task: sequence_classification
  (`peftkit.data.classification`: its own examples, labels and collator; none of the cuts and counts below).
EOS is appended to alpaca/completion/text examples so the model learns to stop. Examples are truncated
to `max_length`; one with no target token left after truncation is dropped, with a count. One whose target
lost its end (the EOS / end-of-turn it should learn to stop on) is kept, dropped or an error as
`data.truncation` says, and counted either way: `describe_stats` turns the counts into the lines to print.
The examples are held as flat int32 arrays (`Examples`), 8 bytes a token.
"""

from peftkit.data.batches import Collator, epoch_batches, eval_loader, step_windows, steps_per_epoch
from peftkit.data.checks import describe_stats, injected_system_tokens
from peftkit.data.examples import (
    IGNORE_INDEX,
    BuiltExample,
    build_examples,
    count_examples,
    no_examples_error,
    tokenize_rows,
    truncation_error,
)
from peftkit.data.formats import REQUIRED_FIELDS, format_rows
from peftkit.data.loading import load_examples
from peftkit.data.rows import load_rows
from peftkit.data.stored import Example, Examples

__all__ = ["IGNORE_INDEX", "REQUIRED_FIELDS", "BuiltExample", "Collator", "Example", "Examples", "build_examples", "count_examples",
           "describe_stats", "epoch_batches", "format_rows", "eval_loader", "injected_system_tokens", "load_examples", "load_rows",
           "no_examples_error", "step_windows", "steps_per_epoch", "tokenize_rows", "truncation_error"]
