"""The recipe's `data` section: the training datasets (one, or a list of entries with their own split, columns and
format), the evaluation sets (one, or several by name), the format rows are read in and the settings of their
tokenizing."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from peftkit.errors import did_you_mean
from peftkit.section import Section

DATA_EXTENSIONS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def is_hub_dataset(source: str) -> bool:
    """Whether data.train / data.eval names a hub dataset: not an absolute path (a recipe's data files are made
    absolute when it loads), without a data file's extension, and not a directory of a saved dataset (`--data DIR`
    of one, relative to the current directory: `datasets.load_dataset` refuses those)."""
    path = Path(source)
    return not path.is_absolute() and path.suffix.lower() not in DATA_EXTENSIONS and not is_saved_dataset(source)


def is_saved_dataset(source: str) -> bool:
    """Whether `source` is a directory `datasets` wrote with `save_to_disk`: a Dataset's (state.json) or a
    DatasetDict's (dataset_dict.json), which `peftkit.data.saved` reads."""
    path = Path(source)
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def is_local_dataset(source: str) -> bool:
    """Whether `source` is data peftkit reads and hashes itself, before any row is read: a file, or a saved dataset's
    directory. (A path that is neither fails where its rows are read, in its words.)"""
    return Path(source).is_file() or is_saved_dataset(source)


class DataSource(Section):
    """One dataset of a list in data.train, read with its own split, columns and format."""

    path: str
    """A local .json/.jsonl/.csv/.parquet/.txt file, a directory datasets' save_to_disk wrote, or a hub dataset
    id."""
    split: str | None = None
    """Its split (a saved DatasetDict's, a slice of a local file: `train[:1000]`); default data.train_split."""
    columns: dict[str, str] | None = None
    """Its columns for the format's fields (as data.columns, which it replaces for this dataset); default
    data.columns."""
    format: Literal["alpaca", "chat", "completion", "text", "classification", "preference", "unpaired",
                    "tokenized"] | None = None
    """The format its rows are read and tokenized in (axolotl's per-dataset `type:`), to mix alpaca rows with
    conversations; default data.format, which data.eval and generation's prompts are read in. Not `classification`
    nor `preference` (a classifier's datasets are all data.format classification, a DPO run's all preference)."""


def _own_format(entry: str | DataSource | None) -> str | None:
    """The format a dataset of data.train or data.eval names itself; None for a path (whose `format` is str's)."""
    return entry.format if isinstance(entry, DataSource) else None


def _check_columns(key: str, columns: dict[str, str], named: str, fmt: str, fix: str = "") -> None:
    """Each key of `columns` a field of format `fmt`, `named` as its key (data.format, data.train[1].format)."""
    from peftkit.data.formats import format_fields

    fields = format_fields(fmt)
    for field in columns:
        if field not in fields:
            raise ValueError(f"{key}: {field!r} is not a field of {named} {fmt} ({', '.join(fields)}); each key names "
                             f"a field, its value the data's column.{did_you_mean(field, fields)}{fix}")


class DataConfig(Section):
    """Training and evaluation data."""

    train: str | list[str | DataSource]
    """A local .json/.jsonl/.csv/.parquet/.txt file, a directory datasets' save_to_disk wrote (`peftkit.data.saved`),
    or a hub dataset id; or a list of them, each a path or hub id or {path, split, columns, format}, whose rows are
    concatenated in the list's order and then shuffled together."""

    @field_validator("train")
    @classmethod
    def _some_train_data(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("an empty list; give a path or hub id, or a list of one or more")
        return value
    eval: str | dict[str, str | DataSource] | None = None
    """A file or hub dataset id, as one entry of `train` (one, not a list); or several evaluation sets by name, each
    a path or hub id or {path, split, columns, format}: `{numbers: data/eval.jsonl, general: data/general.jsonl}`.
    The first is the primary set, whose figures are `eval_loss`, `eval_perplexity`, ... (what early stopping,
    export.best and the summary read, unless they name another set's: `general.loss`); each other set's are
    `eval_<name>_loss`, ... Omit to skip evaluation."""

    @field_validator("eval")
    @classmethod
    def _eval_names(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        if not value:
            raise ValueError("an empty mapping; give a path or hub id, or one or more `name: dataset`")
        if "path" in value and set(value) <= set(DataSource.model_fields):
            raise ValueError("a mapping of names to datasets, and this is one dataset's {path, ...}; name it: "
                             "`eval: {NAME: {path: ..., format: ...}}`, or give its path alone")
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
                raise ValueError(f"{name!r} is not a usable name of an evaluation set: its figures are logged as "
                                 "eval_<name>_loss, so use letters, digits, `_` and `-` only")
        return value
    revision: str | None = None
    """Hub revision (branch, tag or commit) of `train` and `eval` when they are hub datasets. A run records a digest
    of the rows it read, so `--resume` and `verify` tell when a branch has moved; pin a commit to read the same rows."""
    format: Literal["alpaca", "chat", "completion", "text", "classification", "preference", "unpaired",
                    "tokenized"] = "alpaca"
    """alpaca: instruction/input/output; chat: messages; completion: prompt/completion; text: text; tokenized:
    input_ids and optional labels, taken as given (`peftkit.data.tokenized`);
    classification: text, label and optional text_pair (model.task: sequence_classification); preference: prompt,
    chosen, rejected (training.objective: dpo; `peftkit.data.preference`); unpaired: prompt, completion and a true/false
    label (training.objective: kto; `peftkit.data.unpaired`). Not set, where every
    dataset of a data.train list names one format: that one (`_format_of_the_datasets`)."""
    max_length: int = Field(512, gt=0)
    """Examples are truncated to this many tokens; one with no target token left is dropped (and counted)."""
    truncation: Literal["keep", "drop", "error"] = "keep"
    """An example whose target is cut by `max_length` (its end, EOS / end-of-turn, is lost, so the model does not
    learn to stop there): `keep` trains on it as cut and reports the count, `drop` leaves it out, `error` stops
    naming the first such row."""
    train_on: Literal["answers", "last_answer", "all"] = "answers"
    """Which tokens carry the loss: `answers`, every answer (alpaca's output, a completion, each assistant turn of a
    conversation, with its EOS or end-of-turn token); `last_answer`, a conversation's last assistant turn only (the
    earlier ones are context; the same as `answers` for the other formats, whose rows hold one answer); `all`, every
    token, prompts, system and user turns too (axolotl's `train_on_inputs: true`)."""
    system_prompt: str | None = None
    """data.format chat (or a data.train entry's): the system message of each conversation that opens without one
    (LLaMA-Factory's default_system, axolotl's default_system_message)."""
    chat_template: str | None = None
    """data.format chat (or a data.train entry's): the chat template to set on the tokenizer (a base model's has
    none; an instruct model's is replaced): a built-in (`chatml`, `llama3`), a .jinja file, a local tokenizer or model directory whose template
    to copy, or the jinja text itself (`peftkit.data.chat_templates`); load_recipe reads a file or directory into its
    text, which the run's recipe.yaml keeps. null: the tokenizer's own."""
    columns: dict[str, str] = Field(default_factory=dict)
    """The data's own column for a field the format reads, where it names it otherwise: `{instruction: question,
    output: answer}` reads alpaca rows from `question` and `answer` columns."""

    @model_validator(mode="after")
    def _format_of_the_datasets(self) -> DataConfig:
        """data.format, where the recipe does not set it, is the format every dataset of data.train's list names: a
        recipe that trains on conversations evaluates on conversations, its data.eval's sets without a format of their
        own and a file `eval`/`generate --data` name alike. The run's recipe.yaml writes it, so `peftkit eval RUN_DIR`
        reads them so too. Not where data.columns, or a set of data.eval's own columns read in data.format, name
        fields of another format (written for data.format's default). Taken whether or not data.eval is there or reads
        data.format (it was only where a set of it did, so `--data FILE` of a recipe without one was read as alpaca):
        a run made before of a recipe without data.eval resumes with data.format set as its recipe.yaml has it
        (`rundir._derived_format_hint` says so)."""
        from peftkit.data.formats import format_fields

        sets = list(self.eval.values()) if isinstance(self.eval, dict) else [self.eval]
        if "format" in self.model_fields_set or not isinstance(self.train, list):
            return self
        named = [_own_format(entry) for entry in self.train]
        # columns for data.format's fields, data.columns or a set's own (`eval: {x: {path, columns: {output: a}}}`):
        # written for the default, which that set is read in
        written = set(self.columns).union(*(entry.columns or {} for entry in sets if isinstance(entry, DataSource)
                                            and entry.format is None))
        if len({fmt or self.format for fmt in named}) > 1:  # a mix: data.format's default, said where a set errs
            read = ", ".join(f"data.train[{i}] {fmt or self.format}" for i, fmt in enumerate(named))
            if self.eval is not None and None in map(_own_format, sets):  # (a set read in data.format)
                self._eval_format_note = (
                    f"data.format is not set, so data.eval is read in its default, {self.format}: data.train's "
                    f"datasets are of several formats ({read}). Set data.format, or give the set a format of its own "
                    "(`eval: {NAME: {path: ..., format: ...}}`)")
        elif (None not in named and named[0] not in (self.format, "classification")  # (refused at its entry)
              and written <= set(format_fields(named[0]))):
            self.format = named[0]  # (validate_assignment runs the validators again, with "format" set now)
            self._eval_format_note = (f"data.format is not set, so data.eval is read as {self.format}, the format "
                                      "of every dataset of data.train; set data.format to read it otherwise")
        return self

    @model_validator(mode="after")
    def _columns_are_fields(self) -> DataConfig:
        entries = [(f"data.train[{i}]", e) for i, e in enumerate(self.train) if isinstance(e, DataSource)] \
            if isinstance(self.train, list) else []
        entries += [(f"data.eval.{name}", e) for name, e in self.eval.items() if isinstance(e, DataSource)] \
            if isinstance(self.eval, dict) else []
        for i, entry in entries:
            if entry.format in ("classification", "preference", "unpaired"):
                raise ValueError(f"{i}.format: {entry.format} is data.format's alone: a "
                                 f"{ {'classification': 'classifier', 'preference': 'DPO run'}.get(entry.format, 'KTO run')}'s datasets are "
                                 f"all read as data.format {entry.format}; remove it")
            if entry.format is not None and self.format == "classification":
                raise ValueError(f"{i}.format: a classifier's datasets are all read as data.format "
                                 "classification (text, label, optional text_pair); remove it")
        chat = self.format in ("chat", "preference", "unpaired") or any(entry.format == "chat" for _, entry in entries)
        said = f"data.format is {self.format}" + (", and no dataset of data.train is chat" if entries else "")
        if self.system_prompt is not None and not chat:
            raise ValueError(f"data.system_prompt is the system message of chat conversations, and {said}; remove "
                             "it, or use data.format: chat")
        if self.chat_template is not None and not chat:
            raise ValueError(f"data.chat_template is the template of chat conversations, and {said}, whose rows no "
                             "template renders; remove it, or use data.format: chat")
        if self.train_on != "answers" and all(fmt == "tokenized" for fmt in self._formats_read()):
            raise ValueError(f"data.train_on: {self.train_on}: tokenized rows say which tokens train by their labels "
                             "(-100: not trained; no labels: every token), and every dataset here is tokenized; "
                             "remove data.train_on")
        _check_columns("data.columns", self.columns, "data.format", self.format)
        for i, entry in entries:
            fmt = entry.format or self.format
            named = "data.format" if fmt == self.format else f"{i}.format"
            if entry.columns:
                _check_columns(f"{i}.columns", entry.columns, named, fmt)
            elif entry.columns is None and fmt != self.format:  # it reads data.columns, another format's
                _check_columns("data.columns", self.columns, named, fmt,
                               f" Or give {i} columns of its own ({{}} for none).")
        return self

    def _formats_read(self) -> list[str]:
        """The format each dataset of data.train and data.eval is read in (its own, else data.format)."""
        return [source.format for source in (*self.train_sources(), *self.eval_sources().values())]

    train_split: str = "train"
    eval_split: str = "train"
    """Split to read (of a hub dataset or a saved DatasetDict); a local file is one, `train`, which both may slice as
    a hub split is sliced: `train[:95%]`."""
    shuffle: bool = True
    packing: bool = False
    """Pack several training examples into each row of up to `max_length` tokens, each with its own position ids
    from 0, so that no token attends across an example boundary (transformers' packed-sequence masks); fewer
    pad tokens are computed. Evaluation is never packed."""
    group_by_length: bool = False
    """Batch training examples of similar length (transformers' `group_by_length`, its get_length_grouped_indices):
    less padding, the order of the batches still random by (seed, epoch). Not with `packing` (no padding to save)
    nor with `shuffle: false` (the grouping is a random draw)."""

    @model_validator(mode="after")
    def _grouping_needs_padded_shuffled_rows(self) -> DataConfig:
        if self.group_by_length and self.packing:
            raise ValueError("data.group_by_length and data.packing both cut padding: packing fills each row with "
                             "several examples, so there is no padding left to group away; keep one of them")
        if self.group_by_length and not self.shuffle:
            raise ValueError("data.group_by_length draws a random order (megabatches sorted by length), and "
                             "data.shuffle: false keeps the data's own order; keep one of them")
        return self
    num_workers: int = Field(0, ge=0)
    """DataLoader worker processes. Batches are formed in the main process, so the order is the same."""
    on_bad_rows: Literal["error", "skip"] = "error"
    """A row that is malformed or whose format fields are missing, not text, or not valid Unicode: stop with
    its line, or skip it and report the count."""
    _columns_key: str = PrivateAttr("data.columns")
    """The recipe key `columns` came from, as a bad row's error names it: data.train[1].columns where `reading` read
    a dataset of the list through that entry's own."""
    _format_key: str = PrivateAttr("data.format")
    """The recipe key `format` came from, as `_columns_key` is for columns: data.train[1].format where `reading` read
    a dataset of the list with that entry's own."""
    _eval_format_note: str = PrivateAttr("")
    """Why data.eval's sets are read in `format` where the recipe does not set it and data.train's datasets name
    formats of their own (`_format_of_the_datasets`); `for_eval` hands it to a set without a format of its own."""
    _format_note: str = PrivateAttr("")
    """A sentence (no final stop) the errors of rows read in `format` (named data.format) end with:
    `_eval_format_note`, in a read of a set of data.eval's; the format it took, in a read of another file (--data)."""
    _on_bad_rows_key: str = PrivateAttr("data.on_bad_rows")
    """Where `on_bad_rows` came from, as the errors its value causes name it: `--on-bad-rows` where `peftkit eval`'s
    flag gave it (`set data.on_bad_rows: error` would change nothing) or there is no recipe; "" where nothing the
    command takes sets it (`peftkit generate --model M --data F`: a bad row is an error)."""
    _flags: tuple[str, ...] = PrivateAttr(())
    """The flags of the command reading the data that override `format` and `on_bad_rows` (`peftkit eval`: --format,
    --on-bad-rows; generate: --format), which errors name beside the recipe's keys; none in training."""

    def train_sources(self) -> list[DataSource]:
        """data.train as a list of datasets, each with its split, columns and format filled in (one for a single
        path)."""
        entries = self.train if isinstance(self.train, list) else [self.train]
        return [DataSource(path=entry, split=self.train_split, columns=self.columns, format=self.format)
                if isinstance(entry, str)
                else entry.model_copy(update={"split": entry.split or self.train_split,
                                              "columns": self.columns if entry.columns is None else entry.columns,
                                              "format": entry.format or self.format})
                for entry in entries]

    def eval_sources(self) -> dict[str, DataSource]:
        """data.eval by name, each with its split (default data.eval_split), columns and format filled in; the first
        is the primary set. One path is the one set named `eval`; {} without data.eval."""
        if self.eval is None:
            return {}
        entries = self.eval if isinstance(self.eval, dict) else {"eval": self.eval}
        return {name: DataSource(path=entry, split=self.eval_split, columns=self.columns, format=self.format)
                if isinstance(entry, str)
                else entry.model_copy(update={"split": entry.split or self.eval_split,
                                              "columns": self.columns if entry.columns is None else entry.columns,
                                              "format": entry.format or self.format})
                for name, entry in entries.items()}

    @property
    def primary_eval(self) -> DataSource | None:
        """data.eval's first (or only) set, whose figures are eval_loss, ...; None without data.eval."""
        return next(iter(self.eval_sources().values()), None)

    def eval_key(self, name: str) -> str:
        """The key of data.eval's set `name` in a run's records (data_sha256): `eval` for one path, `eval[name]`."""
        return f"eval[{name}]" if isinstance(self.eval, dict) else "eval"

    def eval_setting(self, name: str) -> str:
        """data.eval's set `name` as the recipe spells it, for messages: `data.eval` for one path, `data.eval.NAME`."""
        return f"data.eval.{name}" if isinstance(self.eval, dict) else "data.eval"

    def for_eval(self, name: str) -> DataConfig:
        """This section as data.eval's set `name` is read: with its own columns and format."""
        entry = self.eval_sources()[name]
        read = self.model_copy(update={"columns": entry.columns, "format": entry.format})
        if isinstance(self.eval, dict) and getattr(self.eval[name], "columns", None) is not None:
            read._columns_key = f"data.eval.{name}.columns"
        if _own_format(self.eval[name] if isinstance(self.eval, dict) else None) is None:
            read._format_note = self._eval_format_note
        else:  # (its rows' errors name the key that set their format, as `reading`'s of a train entry do)
            read._format_key = f"data.eval.{name}.format"
        return read

    def reading(self, source: str) -> DataConfig:
        """This section as a command reads `source` (`eval`/`generate --data`): data.revision is the recipe's
        datasets', so another dataset is read without it; a dataset of data.train's list is read with its own
        columns and format. A local path matches as the same file, however it is written."""
        def same(path: str) -> bool:
            return path == source or (not is_hub_dataset(path) and Path(path).resolve() == Path(source).resolve())

        if not any(same(path) for _, path, _ in self.sources()):
            read = self.model_copy(update={"revision": None})
            if "format" in self.model_fields_set and self._eval_format_note:  # set by _format_of_the_datasets
                read._format_note = (f"data.format is not set, so --data is read as {self.format}, the format of "
                                     "every dataset of data.train; set data.format, or pass --format, to read it "
                                     "otherwise")
            return read
        i, entry = next(((i, e) for i, e in enumerate(self.train_sources()) if same(e.path)), (None, None))
        if entry is None:  # a set of data.eval's, read with its own columns and format
            return next((self.for_eval(name) for name, e in self.eval_sources().items() if same(e.path)), self)
        read = self.model_copy(update={"columns": entry.columns, "format": entry.format})
        if isinstance(self.train, list) and getattr(self.train[i], "columns", None) is not None:
            read._columns_key = f"data.train[{i}].columns"
        if isinstance(self.train, list) and _own_format(self.train[i]) is not None:
            read._format_key = f"data.train[{i}].format"
        return read

    def sources(self) -> list[tuple[str, str, str]]:
        """(key, path or hub id, split) of each dataset the recipe reads: `train` (one path), or `train[0]`,
        `train[1]`, ... (a list), and `eval` (one path) or `eval[name]` (a mapping). The keys name the datasets in a
        run's records (data_sha256)."""
        train = self.train_sources()
        keys = [f"train[{i}]" for i in range(len(train))] if isinstance(self.train, list) else ["train"]
        found = [(key, entry.path, entry.split) for key, entry in zip(keys, train, strict=True)]
        return found + [(self.eval_key(name), entry.path, entry.split) for name, entry in self.eval_sources().items()]
