"""An example (token ids and labels), and a dataset's examples held compactly: every token id and label in flat int32
arrays, not lists of Python ints.

A list of `Example`s costs about 45 bytes a token with a real tokenizer (an int object for each id above 256, and
a pointer to it in each of two lists): 455 MiB for the 10.7M tokens of 100k alpaca rows on SmolLM2's tokenizer,
held by every process of a run. Here a token costs 8 bytes (12 with packed rows' position ids). Indexing gives an
`Example` of lists, made when asked: a batch at a time.
"""

from __future__ import annotations

import hashlib
import itertools
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

IGNORE_INDEX = -100  # label value that cross-entropy skips


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None
    """Only for a packed row (`data.packing`): positions restarting at 0 at each packed example."""
    token_type_ids: list[int] | None = None
    """Only for a classification row whose tokenizer marks its text_pair (BERT's segment ids)."""
    task_id: int | None = None
    """The row's `task` (an integer >= 0), when the data has one: multitask prompt tuning's task id."""
    types: list[int] | None = None
    """CPT's type of each token (a tokenized row's `input_type_mask`, peft's codes), when the data has them."""


UNTYPED = 4
"""The type of each token of a row without `input_type_mask` among rows with one: peft's default (its `_cpt_forward`
types every input token 4, raised by the context's largest), which CPT's loss reads as it reads no mask at all."""


class Examples(Sequence[Example]):
    """Examples in order, as `append`ed. All of them have position ids (packed rows: `peftkit.data.packing`) or
    none; a classifier's (one label a row, segment ids) stay a list (`peftkit.data.classification`)."""

    def __init__(self, examples: Iterable[Example] = ()) -> None:
        self._ids, self._labels = array("i"), array("i")
        self._positions: array | None = None
        self._types: array | None = None  # CPT's per-token types, once an example has them (`UNTYPED` before)
        self._ends = array("q")  # where each example ends in the flat arrays
        self.task_ids: list[int | None] = []
        """Each example's task id (multitask prompt tuning), None without one."""
        for example in examples:
            self.append(example)

    def append(self, example: Example) -> None:
        if example.token_type_ids is not None:
            raise ValueError("Examples holds causal-LM examples; a classifier's stay a list")
        if not self._ends and example.position_ids is not None:
            self._positions = array("i")
        if (example.position_ids is None) != (self._positions is None):
            raise ValueError("examples with and without position ids in one Examples")
        n = len(example.input_ids)
        if len(example.labels) != n or any(part is not None and len(part) != n
                                           for part in (example.position_ids, example.types)):
            raise ValueError("an example's labels, position ids or types differ in length from its input_ids")
        if example.types is not None and self._types is None:
            self._types = array("i", [UNTYPED]) * len(self._ids)
        if self._types is not None:
            self._types.extend(example.types if example.types is not None else [UNTYPED] * n)
        self._ids.extend(example.input_ids)
        self._labels.extend(example.labels)
        if self._positions is not None:
            self._positions.extend(example.position_ids)
        self._ends.append(len(self._ids))
        self.task_ids.append(example.task_id)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i: int) -> Example:  # type: ignore[override]  (no slices: nothing needs them)
        i = range(len(self))[i]  # a negative index counts from the end; out of range raises IndexError
        a, b = (self._ends[i - 1] if i else 0), self._ends[i]
        positions = None if self._positions is None else self._positions[a:b].tolist()
        types = None if self._types is None else self._types[a:b].tolist()
        return Example(self._ids[a:b].tolist(), self._labels[a:b].tolist(), positions, task_id=self.task_ids[i],
                       types=types)

    def __iter__(self) -> Iterator[Example]:
        return (self[i] for i in range(len(self)))

    def lengths(self) -> list[int]:
        """Each example's token count, from where each ends in the flat arrays."""
        return [b - a for a, b in zip(itertools.chain((0,), self._ends), self._ends)]

    @property
    def types(self) -> array | None:
        """Every token's CPT type, flat as the ids (None where no example has them)."""
        return self._types

    def arrays(self) -> tuple[array, array, array]:
        """The flat token ids and labels, and where each example ends in them (`from_arrays` makes them again, with
        `types`)."""
        if self._positions is not None:
            raise ValueError("packed rows (with position ids) are made from examples, not kept")
        return self._ids, self._labels, self._ends

    @classmethod
    def from_arrays(cls, ids: array, labels: array, ends: array, task_ids: list[int | None],
                    types: array | None = None) -> Examples:
        """The examples of `arrays()` (and their task ids and types), checked to fit together."""
        if (ids.typecode, labels.typecode, ends.typecode) != ("i", "i", "q") or getattr(types, "typecode", "i") != "i":
            raise ValueError("ids, labels and types are int32 arrays, ends an int64 one")
        bounds = [0, *ends]
        if (len(ids) != len(labels) or len(task_ids) != len(ends) or bounds[-1] != len(ids)
                or (types is not None and len(types) != len(ids))
                or any(a > b for a, b in zip(bounds, bounds[1:]))):
            raise ValueError("the arrays do not fit together")
        examples = cls()
        examples._ids, examples._labels, examples._ends, examples.task_ids = ids, labels, ends, list(task_ids)
        examples._types = types
        return examples


def examples_digest(examples: Sequence[Example]) -> str:
    """sha256 of the examples' token ids, labels, boundaries and task ids (a classifier's segment ids too): what the
    data became for the model. A run records it (manifest.json's `examples_sha256`), so that `peftkit verify` tells a
    re-run that tokenized the same files otherwise (another tokenizer, template or library version) from one that
    trained otherwise on the same tokens."""
    digest = hashlib.sha256()
    if isinstance(examples, Examples) and examples._positions is None:
        for part in examples.arrays():
            digest.update(part)  # (the array's buffer itself: tobytes() copied the token ids whole, 4 bytes a token)
        if examples.types is not None:  # (CPT's types; data without them digests as before they existed)
            digest.update(b"types\0")
            digest.update(examples.types)
    else:  # a classifier's list of examples
        for example in examples:
            for part in (example.input_ids, example.labels, example.token_type_ids or ()):
                digest.update(array("q", [len(part), *part]).tobytes())
    digest.update(repr(list(getattr(examples, "task_ids", None) or [e.task_id for e in examples])).encode())
    return digest.hexdigest()
