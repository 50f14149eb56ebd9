"""A `datasets` ClassLabel column (GLUE's sst2 `label`: ids 0 and 1, named negative and positive) read as what it
means: each stored id kept as a `ClassId`, an int that knows the ClassLabel's names, so that a classifier's classes
are those names in the ClassLabel's order (id i is names[i], as transformers' run_glue.py reads them) and any other
reader (a task id, tokenized rows) sees the same integer as before. -1 is datasets' "no label" (GLUE's test
splits): no class, a bad row (`formats._label_problem`).

Read where the rows come from a `datasets.Dataset` with features: a hub dataset, a directory save_to_disk wrote, a
.parquet file whose schema carries datasets' features (`Dataset.to_parquet` writes them there, and datasets' parquet
reader reads them back).
"""

from __future__ import annotations

from typing import Self

from peftkit.errors import PeftkitError

NO_LABEL = -1
"""What datasets stores in a ClassLabel column for a row without a class."""


class ClassId(int):
    """A ClassLabel column's stored id, with `names`, the ClassLabel's names in order."""

    names: tuple[str, ...]

    def __new__(cls, value: int, names: tuple[str, ...]) -> Self:
        made = super().__new__(cls, value)
        made.names = names
        return made

    def __getnewargs__(self) -> tuple[int, tuple[str, ...]]:  # (pickled with its names: a copy is still a ClassId)
        return int(self), self.names

    @property
    def name(self) -> str | None:
        """The class's name; None for the no-label -1 and for an id past the names."""
        return self.names[self] if 0 <= self < len(self.names) else None


def type_name(value: object) -> str:
    """`value`'s type as a bad row's message names it: a `ClassId` (a ClassLabel column that is not a classifier's
    label) as the int it stores, with its name, not as peftkit's own class."""
    if isinstance(value, ClassId):
        name = f" named {value.name!r}" if value.name is not None else ""
        return (f"int (id {int(value)}{name} of a ClassLabel; only data.format classification's label reads a "
                "ClassLabel as its names)")
    return "null" if value is None else type(value).__name__


def class_label_names(dataset) -> dict[str, tuple[str, ...]]:
    """{column: its names} of each ClassLabel column of a `datasets.Dataset` (top-level columns only)."""
    import datasets

    return {column: tuple(feature.names) for column, feature in dataset.features.items()
            if isinstance(feature, datasets.ClassLabel)}


def with_class_ids(dataset, rows: list[dict]) -> list[dict]:
    """`rows` (read of `dataset`, changed in place) with each value of a ClassLabel column as its `ClassId`."""
    columns = class_label_names(dataset)
    for row in rows if columns else ():
        for column, names in columns.items():
            if isinstance(row.get(column), int):
                row[column] = ClassId(row[column], names)
    return rows


def label_problem(label: ClassId) -> str | None:
    """What makes a ClassLabel's id no class, in a bad row's words (`formats._label_problem`), or None."""
    if label == NO_LABEL:
        return ("field 'label' is -1, datasets' 'no label' in a ClassLabel column (a split without labels, as GLUE's "
                "test splits): no class to train or score on; read a split that has its labels")
    if label.name is None:
        return f"field 'label' is {int(label)}, not an id of its ClassLabel's {len(label.names)} names"
    return None


def declared_classes(labels: list[tuple[str, object]], source: str) -> tuple[str, ...] | None:
    """The ClassLabel names that `labels` ((location, label) of data.train's rows) carry, or None where none is a
    `ClassId`; an error where the datasets of a mix declare different ones. The same names in another order are one
    ClassLabel, in the first's order: each row's id is read as its name (`LabelSet.id_of`), never as the id."""
    firsts = {}  # each ClassLabel once (a dataset's rows share its names' tuple), at its first row
    for where, label in labels:
        if isinstance(label, ClassId):
            firsts.setdefault(id(label.names), (label.names, where))
    declared = {}
    for names, where in firsts.values():
        if not any(sorted(names) == sorted(n) for n in declared):
            declared[names] = where
    if len(declared) > 1:
        (a, at_a), (b, at_b) = list(declared.items())[:2]
        raise PeftkitError(f"{source}: its ClassLabel columns name the classes differently ({at_a}: "
                           f"{', '.join(a)}; {at_b}: {', '.join(b)}), so a class id means one class in one dataset "
                           "and another in the other. Give them one ClassLabel (datasets' "
                           "Dataset.align_labels_with_mapping, or cast_column), or labels as class names.")
    return next(iter(declared), None)

