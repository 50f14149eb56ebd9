"""`data.format: classification` (model.task: sequence_classification): rows of `text`, `label` and an optional
`text_pair` -> token ids with one class id each -> padded batches.

Labels are class names (strings) or class ids (integers >= 0); one dataset uses one kind. The classes are fixed
by data.train: integer labels are their own ids (0 .. model.num_labels - 1, or up to the largest label seen),
string labels are numbered in sorted order, and a `datasets` ClassLabel column's ids are its names, in its order
(`peftkit.data.class_labels`). That `LabelSet` becomes the model config's `id2label`/`label2id` and
is saved with the adapter (peftkit.json `labels`), so evaluation maps labels to the same ids; an eval row whose
label is not one of them is an error naming its row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from peftkit.data.bad_rows import bad_rows_fix, usable_row
from peftkit.data.class_labels import ClassId, declared_classes
from peftkit.data.examples import Example, row_location
from peftkit.data.sources import read_rows
from peftkit.errors import PeftkitError
from peftkit.recipe import DataConfig

_INTEGER = re.compile(r"[+-]?\d+")  # a class name that an integer label could mean


@dataclass(frozen=True)
class LabelSet:
    """The classes of a classifier: `names[i]` is the name of class id i."""

    names: tuple[str, ...]

    @classmethod
    def from_rows(cls, rows: list[tuple[str, dict]], num_labels: int | None, source: str) -> LabelSet:
        """The classes of data.train's usable rows (`(location, row)` pairs), checked against model.num_labels; a
        ClassLabel column's names where the rows carry one (`_declared`)."""
        labels = [(where, r["label"]) for where, r in rows]
        declared = declared_classes(labels, source)
        labels = [(where, label.name if isinstance(label, ClassId) else label) for where, label in labels]
        ints = [(where, label) for where, label in labels if isinstance(label, int)]
        strings = sorted({label for _, label in labels if isinstance(label, str)})
        if ints and strings:
            raise PeftkitError(
                f"{source}: labels mix integers ({ints[0][0]}: {ints[0][1]}) and strings ({strings[0]!r}); use class "
                "names everywhere or class ids everywhere."
            )
        if declared is not None:
            return cls._declared(declared, labels, num_labels, source)
        if strings:
            if len(strings) < 2:
                raise PeftkitError(f"{source}: every label is {strings[0]!r}, so there is only one class; a classifier "
                                   "needs at least 2.")
            if num_labels is not None and num_labels != len(strings):
                raise PeftkitError(
                    f"model.num_labels is {num_labels}, but {source} has {len(strings)} distinct string labels "
                    f"({', '.join(strings[:6])}{', ...' if len(strings) > 6 else ''}). Remove model.num_labels (it is "
                    "read from the data), or fix the labels."
                )
            return cls(tuple(strings))
        n = num_labels or max((label for _, label in ints), default=0) + 1
        if num_labels is not None and (over := next(((w, v) for w, v in ints if v >= n), None)):
            raise PeftkitError(f"{over[0]}: label {over[1]} is not a class id below model.num_labels ({n}). Raise "
                               "model.num_labels, or remove it to read the classes from the data.")
        if n < 2:
            raise PeftkitError(f"{source}: every label is 0, so there is only one class; a classifier needs at least 2.")
        return cls(tuple(str(i) for i in range(n)))

    @classmethod
    def _declared(cls, names: tuple[str, ...], labels: list[tuple[str, str]], num_labels: int | None,
                  source: str) -> LabelSet:
        """The classes a ClassLabel column names, in its order, those no row uses too (a head's output each: a
        dataset's declared classes), checked against model.num_labels and against the string labels of a mix's
        other datasets (`labels`: (location, class name) of each row)."""
        known = set(names)
        if other := next(((where, label) for where, label in labels if label not in known), None):
            raise PeftkitError(f"{other[0]}: label {other[1]!r} is not one of the names of {source}'s ClassLabel "
                               f"({', '.join(names)}), which are the classes; fix the row, or give the classes one name.")
        if len(names) < 2:
            raise PeftkitError(f"{source}: its ClassLabel names one class ({', '.join(names)}); a classifier needs at "
                               "least 2.")
        if num_labels is not None and num_labels != len(names):
            raise PeftkitError(f"model.num_labels is {num_labels}, but {source}'s label column is a ClassLabel of "
                               f"{len(names)} classes ({', '.join(names[:6])}{', ...' if len(names) > 6 else ''}). "
                               "Remove model.num_labels (it is read from the data), or fix the labels.")
        return cls(names)

    @classmethod
    def from_config(cls, config) -> LabelSet:
        """The classes a model config's `id2label` names (transformers' `LABEL_0` ... when none were given)."""
        return cls(tuple(config.id2label[i] for i in range(config.num_labels)))

    def id_of(self, label: str | int, where: str) -> int:
        """The class id of a row's label; an unknown one is a PeftkitError naming `where`.

        An integer is the class its digits name when there is one (classes named "1", "2", "3" from one file's
        string labels, and 1, 2, 3 in a CSV that reads them as integers: 1 is "1", not id 1, "2"), else a class id
        unless some class name is an integer's digits, where an id would be read as the wrong name. A ClassLabel
        column's id is the class of its name (an eval set's ClassLabel may order the names otherwise), or its id where
        the classes have no names of their own (`0`, `1` or transformers' `LABEL_0`: a model trained on the ids)."""
        if isinstance(label, ClassId):
            if label.name in self.names or not self.placeholders:
                return self._named(label, where)
            label = int(label)
        if isinstance(label, int) and str(label) in self.names:
            return self.names.index(str(label))
        ids = not any(_INTEGER.fullmatch(n) for n in self.names)
        if isinstance(label, int) and ids and label < len(self.names):
            return label
        if isinstance(label, str) and label in self.names:
            return self.names.index(label)
        shown = ", ".join(self.names[:8]) + (", ..." if len(self.names) > 8 else "")
        raise PeftkitError(
            f"{where}: label {label!r} is not one of the {len(self.names)} classes the model was trained on ({shown}"
            f"{f'; or their ids 0-{len(self.names) - 1}' if ids else ''}). Fix the row, or train with data that has "
            "this class."
        )

    def _named(self, label: ClassId, where: str) -> int:
        """The class id of a ClassLabel column's label, by its name."""
        if label.name in self.names:
            return self.names.index(label.name)
        shown = ", ".join(self.names[:8]) + (", ..." if len(self.names) > 8 else "")
        raise PeftkitError(
            f"{where}: label {label.name!r} (id {int(label)} of its ClassLabel: {', '.join(label.names[:8])}"
            f"{', ...' if len(label.names) > 8 else ''}) is not one of the {len(self.names)} classes the model was "
            f"trained on ({shown}); a ClassLabel's ids are read as its names. Name the classes as the model does "
            "(datasets' Dataset.align_labels_with_mapping, or cast_column), or train with data that has this class."
        )

    @property
    def placeholders(self) -> bool:
        """Whether the class names only number the classes: `0`, `1`, ... or transformers' `LABEL_0`, ..."""
        return all(name in (str(i), f"LABEL_{i}") for i, name in enumerate(self.names))

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}


def usable_rows(rows: list, cfg: DataConfig, source: str, line_numbers: list[int] | None) -> list[tuple[str, dict]]:
    """(location, row) of each row with a text and a valid label; a bad row raises or is left out as
    data.on_bad_rows says."""
    located = [(row_location(source, i, line_numbers), row) for i, row in enumerate(rows)]
    return [(where, row) for where, row in located if usable_row(row, cfg, where)]


def encode(tok, row: dict, max_length: int) -> tuple[dict, bool]:
    """Token ids (and token_type_ids, when the tokenizer marks the second text) of a row, cut to `max_length`
    (the longer of text and text_pair first, transformers' `longest_first`); and whether it was cut."""
    pair = row.get("text_pair")
    full = tok(row["text"], pair, add_special_tokens=True)
    cut = len(full["input_ids"]) > max_length
    return (tok(row["text"], pair, add_special_tokens=True, truncation=True, max_length=max_length) if cut else full), cut


def joins_pair_unmarked(tok, row: dict) -> bool:
    """Whether `tok` joins `row`'s text and text_pair with nothing between them: no token of its own (BERT's [SEP])
    and no token_type_ids, so the model reads one text ('...on the matA cat is...': SmolLM2-135M's and the tiny
    Llama's tokenizers, whose pair template is the two texts' tokens one after the other)."""
    joined = tok(row["text"], row["text_pair"], add_special_tokens=True)
    if any(joined.get("token_type_ids") or ()):
        return False
    both = [i for text in (row["text"], row["text_pair"]) for i in tok(text, add_special_tokens=False)["input_ids"]]
    ids = joined["input_ids"]
    return any(ids[start:start + len(both)] == both for start in range(len(ids) - len(both) + 1))


def classification_examples(tok, rows: list[tuple[str, dict]], labels: LabelSet, max_length: int) -> tuple[list[Example], int]:
    """(one Example per row, its `labels` the single class id; rows cut at max_length)."""
    examples, truncated = [], 0
    for where, row in rows:
        enc, cut = encode(tok, row, max_length)
        truncated += cut
        types = enc.get("token_type_ids")
        examples.append(Example(enc["input_ids"], [labels.id_of(row["label"], where)],
                                token_type_ids=types if types and any(types) else None))
    return examples, truncated


def classification_rows(source: str | list, split: str | None,
                        cfg: DataConfig) -> tuple[list[tuple[str, dict]], int, int, str]:
    """The usable `(location, row)` pairs of `source` (a path or hub id, or data.train's list: `read_rows`), the
    unreadable lines skipped, the rows read and the source's name for messages; a PeftkitError for a source without
    a usable row."""
    rows, skipped, line_numbers, source = read_rows(source, split, cfg)
    usable = usable_rows(rows, cfg, source, line_numbers)
    if not usable:  # (under on_bad_rows: error, the first bad row raised)
        fix = f"; or {bad_rows_fix(cfg, 'error')} to see the first bad row" if rows or skipped else ""
        raise PeftkitError(f"{source} has no usable rows for {cfg._format_key} 'classification' ({len(rows)} rows, "
                           f"{skipped} unreadable lines); each row needs text and label{fix}.")
    return usable, skipped, len(rows), source


def load_classification(tok, source: str | list, split: str | None, cfg: DataConfig, labels: LabelSet | None = None,
                        num_labels: int | None = None) -> tuple[list[Example], dict, LabelSet]:
    """The examples of `source` (as `classification_rows` reads it), the counts `describe_stats` prints, and the
    classes: `labels` when given (an eval set, mapped to the training classes), else read from these rows
    (data.train) with `num_labels`."""
    usable, skipped, read, source = classification_rows(source, split, cfg)
    labels = labels or LabelSet.from_rows(usable, num_labels, source)
    examples, truncated = classification_examples(tok, usable, labels, cfg.max_length)
    pairs = [(where, row) for where, row in usable if row.get("text_pair")]
    unmarked = pairs and joins_pair_unmarked(tok, pairs[0][1])  # (the tokenizer's pair template: one row tells)
    stats = {"bad_rows": skipped + read - len(usable), "too_long": 0, "truncated": truncated, "target_cut": 0,
             "truncation_dropped": 0, "system_prompt_rows": 0, "system_prompt_tokens": 0, "examples": len(examples),
             "unmarked_pair_rows": len(pairs) if unmarked else 0,
             "unmarked_pair_first": pairs[0][0] if unmarked else None}
    return examples, stats, labels


class ClassificationCollator:
    """Right-pads examples to the longest: input_ids (pad_id), attention_mask (0 on padding), token_type_ids (0 on
    padding; only when some example has them) and labels, one class id per row."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: list[Example]) -> dict[str, torch.Tensor]:
        width = max(len(e.input_ids) for e in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        types = torch.zeros((len(batch), width), dtype=torch.long)
        for i, e in enumerate(batch):
            n = len(e.input_ids)
            ids[i, :n], mask[i, :n] = torch.tensor(e.input_ids), 1
            if e.token_type_ids is not None:
                types[i, :n] = torch.tensor(e.token_type_ids)
        out = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([e.labels[0] for e in batch])}
        if any(e.token_type_ids is not None for e in batch):
            out["token_type_ids"] = types
        return out
