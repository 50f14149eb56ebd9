"""data.format tokenized: rows of token ids made by the user's own pipeline (their packing, masking, a tokenizer shared
with another trainer), taken as given: no template, no EOS appended, no re-tokenizing. The fields are those of
axolotl's pre-tokenized datasets (`input_ids`, `labels`, `attention_mask`; axolotl's docs: dataset-formats/tokenized)
and of TRL's SFTTrainer given `input_ids`:

- `input_ids`: a nonempty list of token ids, each below the tokenizer's length (`len(tok)`: its vocabulary and added
  tokens, model.add_tokens' among them).
- `labels` (optional): one a token, aligned with `input_ids` as the other formats' examples are: -100 where the token
  is not trained, else the token's own id (peftkit shifts them, as transformers' causal models do: position t-1
  predicts the label at t). A label that differs from its input id is a bad row: that is what labels shifted by one
  already (for a trainer that does not shift) look like, and generation's reference is read from them. Without
  `labels`, every token trains (axolotl's pretraining rows, TRL without a completion mask).
- `completion_mask` or `assistant_masks` (optional, instead of `labels`): TRL's pre-tokenized columns, 1 where the
  token trains (a completion's, an assistant turn's), 0 where it does not; read as the labels they stand for.
- `attention_mask` (optional): all 1 (a row's padding is peftkit's to add); a 0 is a bad row, whose padding would
  otherwise be trained.
- `input_type_mask` (optional, CPT's: `peftkit.methods.cpt`): each token's type in peft's codes (0 none, 4k + 1 ..
  4k + 4), handed to CPT's loss per row (the batch's `input_type_mask`, padded with 0 as peft's example pads it). A
  token trains where its type is an output's (4k + 4) and its label (if given) is not -100: peft's `_cpt_forward`
  masks every other label, so the example's labels are masked so too, and the count the loss averages over is
  peft's. Any other method refuses data with the column (`Method.reads_input_types`).

A row packed of several examples by another tool (several `seq_lengths`, as TRL's pack_dataset writes them, or
`position_ids` restarting at 0) is a bad row: read as one sequence its examples would attend to one another;
data.packing packs rows with positions that restart and no attention across.

data.train_on does not apply (the labels say what trains), nor do data.chat_template and data.system_prompt.
"""

from __future__ import annotations

from peftkit.data.stored import IGNORE_INDEX
from peftkit.errors import PeftkitError

FIELDS = ("input_ids",)
MASKS = ("completion_mask", "assistant_masks")
"""TRL's columns of 0s and 1s that say which tokens train (SFTTrainer's `completion_only_loss` and
`assistant_only_loss`), read in place of `labels`."""
OPTIONAL = ("labels", *MASKS, "attention_mask", "input_type_mask")
TYPES = "input_type_mask"
"""CPT's per-token types (peft's `input_type_mask=` keyword)."""
PACKED = ("position_ids", "seq_lengths")
"""Columns of rows another tool packed (TRL's pack_dataset writes `seq_lengths`), refused where they pack several
examples (`_packed_problem`)."""


def _int_list_problem(key: str, value: object) -> str | None:
    if not isinstance(value, list):
        got = "null" if value is None else type(value).__name__
        return f"field '{key}' must be a list of integers, got {got}"
    bad = next((i for i, v in enumerate(value) if isinstance(v, bool) or not isinstance(v, int)), None)
    if bad is not None:
        return f"{key}[{bad}] is {value[bad]!r}, not an integer"
    return None


def tokenized_problem(row: dict, target: bool = True) -> str | None:
    """What makes a tokenized row unusable, or None (the ids' range is the tokenizer's: `vocabulary_problem`).
    `target`: the row must train a token (not where rows are only prompts, `peftkit generate --data`)."""
    ids = row.get("input_ids")
    if ids is None:
        return "missing field 'input_ids'"
    if problem := _int_list_problem("input_ids", ids):
        return problem
    if not ids:
        return "field 'input_ids' is empty"
    if (low := next((i for i, t in enumerate(ids) if t < 0), None)) is not None:
        return f"input_ids[{low}] is {ids[low]} (a token id is 0 or more)"
    for key in OPTIONAL:
        if row.get(key) is None:
            continue
        if problem := _int_list_problem(key, row[key]):
            return problem
        if len(row[key]) != len(ids):
            return f"field '{key}' has {len(row[key])} entries and field 'input_ids' {len(ids)} (one for each token)"
    given = [key for key in ("labels", *MASKS) if row.get(key) is not None]
    if len(given) > 1:
        return f"fields {given[0]!r} and {given[1]!r} both say which tokens train: give one"
    if given and given[0] in MASKS and (problem := _trained_mask_problem(given[0], row[given[0]], target)):
        return problem
    return _labels_problem(ids, row.get("labels"), target) or _masks_problem(row, target) or _packed_problem(row)


def _packed_problem(row: dict) -> str | None:
    """A row that packs several examples: `position_ids` that do not count 0, 1, 2, ... (they restart at each
    example), or more than one of `seq_lengths`."""
    fix = ("the row packs several examples, which would attend to one another here (a row is one sequence); give "
           "each example as a row of its own and set data.packing: true (positions restart there, with no attention "
           "across examples)")
    positions, lengths = (row.get(key) for key in PACKED)
    if positions is not None:
        if problem := _int_list_problem("position_ids", positions):
            return problem
        if len(positions) != len(row["input_ids"]):
            return (f"field 'position_ids' has {len(positions)} entries and field 'input_ids' {len(row['input_ids'])} "
                    "(one for each token)")
        if (i := next((i for i, p in enumerate(positions) if p != i), None)) is not None:
            return f"position_ids[{i}] is {positions[i]}, not {i}: {fix}"
    if lengths is not None and (_int_list_problem("seq_lengths", lengths) or len(lengths) > 1):
        return f"field 'seq_lengths' is {lengths!r}, not one length: {fix}"
    return None


def _trained_mask_problem(key: str, mask: list[int], target: bool) -> str | None:
    if (bad := next((i for i, m in enumerate(mask) if m not in (0, 1)), None)) is not None:
        return f"{key}[{bad}] is {mask[bad]} (1: the token trains, 0: it does not)"
    if target and not any(mask):
        return f"field '{key}' trains no token (every entry is 0)"
    return None


def _labels_problem(ids: list[int], labels: list[int] | None, target: bool) -> str | None:
    if labels is None:
        return None
    for i, (token, label) in enumerate(zip(ids, labels, strict=True)):
        if label != IGNORE_INDEX and label != token:
            return (f"labels[{i}] is {label}, neither input_ids[{i}] ({token}) nor {IGNORE_INDEX} (a label is its "
                    "own token's id, which peftkit shifts as transformers' causal models do: shifted by one already?)")
    if target and all(label == IGNORE_INDEX for label in labels):
        return f"field 'labels' trains no token (every label is {IGNORE_INDEX})"
    return None


def _masks_problem(row: dict, target: bool) -> str | None:
    mask = row.get("attention_mask")
    if mask is not None and (zero := next((i for i, m in enumerate(mask) if m != 1), None)) is not None:
        return (f"attention_mask[{zero}] is {mask[zero]} (every token of a row is attended: peftkit pads batches "
                "itself, so leave the row's padding out)")
    types = row.get(TYPES)
    if types is not None and (low := next((i for i, t in enumerate(types) if t < 0), None)) is not None:
        return f"{TYPES}[{low}] is {types[low]} (CPT's types are 0, none, or 4k + 1 .. 4k + 4)"
    if types is not None and target and all(label == IGNORE_INDEX for label in ids_and_labels(row)[1]):
        return (f"field '{TYPES}' marks no trained token an output (4k + 4), so CPT's loss has none of this row's "
                "tokens")
    return None


def vocabulary_problem(row: dict, size: int) -> str | None:
    """A token id of a (well-formed) row at or past the tokenizer's `size` (`len(tok)`), or None: the model has no
    embedding for it (its embeddings are resized to the tokenizer's length with model.add_tokens)."""
    past = next((i for i, t in enumerate(row["input_ids"]) if t >= size), None)
    if past is None:
        return None
    return (f"input_ids[{past}] is {row['input_ids'][past]}, past this tokenizer's {size} tokens (ids 0 .. "
            f"{size - 1}: tokenized with another tokenizer?)")


def check_embedding_rows(data, rows: int | None, tok) -> None:
    """Refuse a tokenized row of `data` (data.train's, each data.eval set's; local files) holding an id at or past the
    model's `rows` embedding rows where its tokenizer `tok` has more tokens than that (tokens added to it after the
    model was saved; an id past the tokenizer's own is a bad row, `vocabulary_problem`), naming the row, as train and
    validate read the rows: it was caught at the first forward (`data.checks.guard_token_ids`, which still catches a
    hub dataset's). Not a bad row that data.on_bad_rows: skip leaves out: the model and its tokenizer disagree."""
    if rows is None or len(tok) <= rows:  # (every id within the tokenizer's has its row)
        return
    from peftkit.data.formats import format_rows
    from peftkit.data.rows import load_rows, row_location
    from peftkit.recipe import is_local_dataset

    for source in [*data.train_sources(), *data.eval_sources().values()]:
        if source.format != "tokenized" or not is_local_dataset(source.path):
            continue
        read, _, lines = load_rows(source.path, source.split, data.on_bad_rows)
        own = data.model_copy(update={"columns": source.columns, "format": "tokenized"})
        for i, row in enumerate(format_rows(read, own)):
            if not isinstance(row, dict) or tokenized_problem(row, target=False) or vocabulary_problem(row, len(tok)):
                continue  # (a bad row: said, or left out, where the examples are built)
            if (at := next((j for j, t in enumerate(row["input_ids"]) if t >= rows), None)) is not None:
                token = tok.convert_ids_to_tokens(row["input_ids"][at])
                raise PeftkitError(
                    f"{row_location(source.path, i, lines)}: input_ids[{at}] is {row['input_ids'][at]} ({token!r}), "
                    f"past the model's {rows} embedding rows (ids 0 .. {rows - 1}): its tokenizer has {len(tok)} "
                    "tokens, some added after the model was saved, which the model has no embedding for. Tokenize "
                    "the rows with the tokenizer the model was saved with (tokenized with another one?), or list the "
                    f"tokens they use in model.add_tokens (peftkit adds their rows and trains them: [{token!r}]).")


class PastVocabulary(PeftkitError):
    """The bad row error of a token id past the tokenizer's (`vocabulary_problem`), which a comparison says of its base
    row in its own words (`peftkit.compare`: an adapter's added tokens): `where`, the row; `problem`, the id."""

    def __init__(self, message: str, where: str, problem: str) -> None:
        super().__init__(message)
        self.where, self.problem = where, problem


def ids_and_labels(row: dict) -> tuple[list[int], list[int]]:
    """A valid row's token ids and labels (those `completion_mask` or `assistant_masks` stand for): every token
    trained without any, and with `input_type_mask` only those typed an output (4k + 4), as peft's CPT loss counts
    them."""
    ids = list(row["input_ids"])
    mask = next((row[key] for key in MASKS if row.get(key) is not None), None)
    labels = (list(row["labels"]) if row.get("labels") is not None else ids.copy() if mask is None
              else [token if m else IGNORE_INDEX for token, m in zip(ids, mask, strict=True)])
    if (types := row.get(TYPES)) is not None:
        labels = [label if is_output(t) else IGNORE_INDEX for label, t in zip(labels, types, strict=True)]
    return ids, labels


def is_output(kind: int) -> bool:
    """Whether a CPT type is an output's (4k + 4), whose tokens the loss scores."""
    return kind > 0 and kind % 4 == 0


def prompt_and_answer(ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """The ids before a row's last run of trained tokens (the prompt generation is given, exactly these ids) and that
    run (the reference), as a conversation's last trained answer is asked for after the turns before it."""
    end = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX) + 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return ids[:start], ids[start:end]
