"""Recipes: the YAML file that describes a run, validated by pydantic.

These models are the single source of truth for every setting and its default; the rest of peftkit
reads typed fields, never `dict.get(key, default)`. `peftkit validate RECIPE` prints the fully resolved
recipe, defaults included.

Paths. A relative path in a recipe (`model.name_or_path`, `data.train`, `data.eval`,
`export.output_dir`) is resolved against the directory of the recipe file, not the current directory,
so a recipe runs the same from anywhere. A model or dataset value that is not an existing path, does not
start with `/`, `./`, `../` or `~`, and (for data) has no file extension is taken as a Hugging Face hub id.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from peftkit.errors import PeftkitError, did_you_mean

DType = Literal["float32", "bfloat16", "float16"]
DATA_EXTENSIONS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


class Section(BaseModel):
    # allow_inf_nan=False: `lr: .inf` would pass `gt=0` and only fail as a NaN loss at step 1.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """pydantic's lax mode reads `true` as 1, so `max_steps: yes` would train one step. Strict mode is
        not the fix: PyYAML reads `lr: 2e-4` (no dot) as a string, which lax mode rightly converts."""
        annotation = cls.model_fields[info.field_name].annotation
        members = getattr(annotation, "__args__", (annotation,))  # `int | None` -> (int, NoneType)
        kind = next((word for number, word in _NUMBER_KINDS.items() if number in members), None)
        if isinstance(value, bool) and kind:
            raise ValueError(f"must be {kind}, not a boolean (YAML reads true/false, yes/no and on/off as booleans)")
        return value


_NUMBER_KINDS = {float: "a number", int: "an integer"}  # float first: a float field also takes `lr: 1`


class ModelConfig(Section):
    """The base model."""

    name_or_path: str
    """A local directory with `config.json` and weights, or a hub id (e.g. `meta-llama/Llama-3.2-1B`)."""
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    """Dtype the base weights are loaded in; `auto` keeps the checkpoint's own."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when `name_or_path` is a hub id."""
    trust_remote_code: bool = False
    """Run modelling code shipped with a hub model. Off unless you trust the repository."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto`: CUDA when available, else CPU."""
    attn_implementation: Literal["eager", "sdpa"] | None = None
    """Attention kernel; None lets transformers choose."""


class QuantizationConfig(Section):
    """Load the base quantized through bitsandbytes (QLoRA). Omit the section for a 16/32-bit base."""

    method: Literal["nf4", "fp4", "int8"] = "nf4"
    """nf4: 4-bit NormalFloat (QLoRA); fp4: 4-bit float; int8: LLM.int8()."""
    double_quant: bool = True
    """Quantize the per-block absmax constants too (bitsandbytes `compress_statistics`): ~0.37 bit/param less."""
    compute_dtype: DType = "bfloat16"
    """Dtype the 4-bit weights are dequantized to for each matmul."""
    quant_storage: Literal["uint8", "float32", "bfloat16", "float16"] = "uint8"
    """Storage dtype of the packed 4-bit weights; FSDP sharding needs a float type matching the model."""
    skip_modules: list[str] = Field(default_factory=lambda: ["lm_head"])
    """Modules kept in full precision (the output head by default, as bitsandbytes/transformers do)."""


class TargetRegex(Section):
    regex: str
    """Python regular expression matched against the full module path (`re.fullmatch`)."""

    @field_validator("regex")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"is not a valid regular expression ({e})") from None
        return v


class AdapterConfig(Section):
    """The adapter injected into the frozen base."""

    method: Literal["lora"] = "lora"
    r: int = Field(8, gt=0)
    """LoRA rank: higher = more capacity, more memory."""
    alpha: float = Field(16.0, gt=0)
    """Scaling numerator: the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapter's input."""
    target_modules: Literal["all-linear"] | list[str] | TargetRegex = "all-linear"
    """`all-linear` (every Linear/Conv1D except the output head), module-name suffixes, or {regex: ...}."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full and saved whole (e.g. `lm_head`)."""

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("is an empty list; name at least one module or use 'all-linear'")
        return v


class DataConfig(Section):
    """Training and evaluation data."""

    train: str
    """A local .json/.jsonl/.csv/.parquet/.txt file or a hub dataset id."""
    eval: str | None = None
    """Same forms as `train`; omit to skip evaluation."""
    format: Literal["alpaca", "chat", "completion", "text"] = "alpaca"
    """alpaca: instruction/input/output; chat: messages; completion: prompt/completion; text: text."""
    max_length: int = Field(512, gt=0)
    """Examples are truncated to this many tokens."""
    train_split: str = "train"
    eval_split: str = "train"
    """Split to read; a local file has only `train`."""
    shuffle: bool = True
    num_workers: int = Field(0, ge=0)
    """DataLoader worker processes. Batches are formed in the main process, so the order is the same."""
    on_bad_rows: Literal["error", "skip"] = "error"
    """A row that is malformed or whose format fields are missing, not text, or not valid Unicode: stop with
    its line, or skip it and report the count."""


class TrainingConfig(Section):
    """The optimisation loop."""

    max_steps: int | None = Field(None, gt=0)
    """Optimizer steps to run; wins over `epochs`."""
    epochs: int = Field(1, gt=0)
    batch_size: int = Field(4, gt=0)
    """Examples per micro-batch."""
    grad_accum: int = Field(1, gt=0)
    """Micro-batches per optimizer step: effective batch = batch_size x grad_accum."""
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd"] = "adamw"
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm; null disables clipping."""
    seed: int = Field(0, ge=0, le=2**32 - 1)
    """Seeds torch and the data order; < 2**32 because the data order seeds with seed x 1_000_003 + epoch."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """auto: bf16 autocast on a CUDA device that supports it, none on CPU."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, ~30% more compute."""
    log_steps: int = Field(1, gt=0)
    eval_steps: int | None = Field(None, gt=0)
    """Evaluate every N steps (and always at the end when data.eval is set)."""
    save_steps: int | None = Field(None, gt=0)
    """Write a resumable checkpoint every N steps."""
    save_total_limit: int = Field(2, gt=0)
    """Checkpoints kept on disk (oldest removed first)."""
    deterministic: bool = False
    """Deterministic kernels on CUDA too (slower); CPU runs are always deterministic."""
    nan_policy: Literal["stop", "skip_step"] = "stop"
    """A NaN/inf loss stops the run (keeping the last checkpoint) or skips that optimizer step."""

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainingConfig:
        if self.max_steps is not None and self.warmup_steps > self.max_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) is larger than max_steps ({self.max_steps}); "
                "lower warmup_steps"
            )
        return self


class ExportConfig(Section):
    """What the run writes."""

    output_dir: str
    """Run directory: adapter/, merged/, checkpoints/, metrics.jsonl, recipe.yaml, manifest.json."""
    adapter: bool = True
    """Write adapter/ in Hugging Face PEFT format."""
    merged: bool = False
    """Write merged/: the base with the adapter folded in, plus the tokenizer."""
    merged_dtype: DType | None = None
    """Dtype of the merged weights; default: the base model's dtype."""


class EvalConfig(Section):
    """Evaluation during and after training."""

    batch_size: int = Field(8, gt=0)
    base_model: bool = True
    """Also evaluate the base model before training, so the summary shows base vs fine-tuned loss."""


class Recipe(Section):
    model: ModelConfig
    quantization: QuantizationConfig | None = None
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    data: DataConfig
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    export: ExportConfig
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _combinations(self) -> Recipe:
        q = self.quantization
        if q is not None and q.method != "int8" and self.training.mixed_precision == "fp16":
            raise ValueError(
                "training.mixed_precision: fp16 with a 4-bit base overflows easily; use bf16 or auto"
            )
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def sha256(self) -> str:
        return hashlib.sha256(self.to_yaml().encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# Loading: YAML with line numbers, --set overrides, errors that name the key, file and line.


# A real recipe is a few KB, nests about 4 levels (section, key, list, item) and holds < 200 keys and values.
# The limits sit far above that and far below where reading gets slow: PyYAML's pure-Python scanner reads
# ~1 MB/s, its composer and pydantic recurse once per level (1000 levels is a RecursionError), and whatever
# walks a document with aliases walks each alias as what it stands for.
MAX_RECIPE_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_VALUES = 10_000
MAX_MESSAGES = 20  # problems listed at once; more would scroll the first (often the cause of the rest) away


class _LineLoader(yaml.SafeLoader):
    """The loader of recipes and --set values: PyYAML's safe one, which builds only plain data."""


class _YamlProblem(Exception):
    """A document refused while reading it; `where` is ':LINE' or ':LINE:COLUMN' (or '')."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(message)
        self.where, self.message = where, message


def _check_shape(text: str, what: str) -> None:
    """Refuse a document nested deeper than MAX_DEPTH or holding more than MAX_VALUES keys and values,
    aliases counted as what they expand to, before anything recursive or expanding reads it. An alias bomb
    (`a: &a [x, x, x]`, `b: &b [*a, *a, *a]`, ... 9 levels of 9 stand for 387M values) composes in
    microseconds but expands in everything that walks it.

    Args:
        what: 'the recipe' or 'the value', for the message.
    """
    try:
        _check_events(yaml.parse(text, Loader=_FAST_LOADER), what)
    except yaml.YAMLError:
        # libyaml found a syntax error. PyYAML's parser reads the text again: it raises the error in the words
        # and positions our messages use or, should the two parsers disagree, checks what it will compose.
        _check_events(yaml.parse(text, Loader=_LineLoader), what)


def _check_events(events: Iterator[yaml.Event], what: str) -> None:
    """`_check_shape` on an event stream: a loop (no recursion) that keeps one number per anchor and stops at
    the first value over a limit, so its cost is bounded by the limits, not by the document."""
    expanded: dict[str, int] = {}  # anchor -> how many values it stands for
    open_collections: list[tuple[str | None, int]] = []  # (anchor, values counted before it began)
    total, through_alias = 0, False
    for event in events:
        if isinstance(event, yaml.CollectionEndEvent):
            anchor, before = open_collections.pop()
            if anchor is not None:
                expanded[anchor] = total - before
            continue
        if not isinstance(event, yaml.NodeEvent):  # stream and document markers
            continue
        line = f":{event.start_mark.line + 1}"
        if isinstance(event, yaml.AliasEvent):
            if any(anchor == event.anchor for anchor, _ in open_collections):
                raise _YamlProblem(line, "a YAML alias (*name) is used inside its own anchor (&name), which makes an "
                                         "endlessly nested value. Write the value out instead.")
            total += expanded.get(event.anchor, 1)  # an undefined alias is the composer's error to report
            through_alias = True
        else:
            total += 1
        if isinstance(event, yaml.CollectionStartEvent):
            open_collections.append((event.anchor, total - 1))
            if len(open_collections) > MAX_DEPTH:
                raise _YamlProblem(line, f"{what} is nested more than {MAX_DEPTH} levels deep here; a recipe needs "
                                         "about 4 (section, key, list, item). Look for repeated or unclosed brackets.")
        if total > MAX_VALUES:
            aliases = " once its YAML aliases (*name) are expanded" if through_alias else ""
            fix = "Write the values out instead of nesting aliases." if through_alias else \
                "Check that this is the file you meant."
            raise _YamlProblem(line, f"{what} holds more than {MAX_VALUES:,} keys and values{aliases}; a recipe has a "
                                     f"few hundred at most. {fix}")


# libyaml, where PyYAML has it: ~20x faster than PyYAML's Python parser, which takes ~1 s for 10,000 keys.
_FAST_LOADER = getattr(yaml, "CSafeLoader", _LineLoader)


def _compose(text: str) -> yaml.Node | None:
    """The document's node tree. On an error PyYAML's Python parser reads it again to raise it: our messages
    use its words and positions (libyaml's leave out, for one, the name of an undefined alias)."""
    try:
        return yaml.compose(text, Loader=_FAST_LOADER)
    except yaml.YAMLError:
        return yaml.compose(text, Loader=_LineLoader)


def _parse_yaml(text: str, what: str) -> tuple[Any, dict[tuple, int], list[tuple[tuple, int, int]]]:
    """(data, line of every key path, keys given twice) of a YAML document.

    Raises yaml.YAMLError for a syntax error and _YamlProblem for a document refused by `_check_shape` or a
    value PyYAML's constructors cannot build.
    """
    _check_shape(text, what)
    node = _compose(text)
    lines: dict[tuple, int] = {}
    duplicates: list[tuple[tuple, int, int]] = []
    if node is None:
        return None, lines, duplicates
    _compose_lines(node, (), lines, duplicates)  # first: constructing merges `<<: *x` keys into the nodes
    try:
        data = _LineLoader("").construct_document(node)
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        # PyYAML's constructors fail with plain exceptions on explicitly tagged values (`!!int abc`, `!!timestamp x`).
        bad = _unreadable_scalar(node)
        where = f":{bad.start_mark.line + 1}:{bad.start_mark.column + 1}" if bad else ""
        problem = (f"{bad.value!r} cannot be read as {bad.tag.rsplit(':', 1)[-1]}" if bad
                   else f"a value cannot be read ({e!r})")
        raise _YamlProblem(where, f"YAML error: {problem}. Remove the explicit !!tag or fix the value.") from None
    return data, lines, duplicates


def _compose_lines(node: yaml.Node, path: tuple, lines: dict[tuple, int],
                   duplicates: list[tuple[tuple, int, int]]) -> None:
    """Record the line of every key path, and each key given twice in one mapping as (key path, first line,
    second line): PyYAML silently keeps the last value. Aliases are walked as what they stand for (bounded by
    `_check_shape`), so the keys of an anchored section have lines too."""
    if isinstance(node, yaml.MappingNode):
        first_line: dict[tuple[str, Any], int] = {}
        for key_node, value_node in node.value:
            key_path, line = (*path, key_node.value), key_node.start_mark.line + 1
            key = (key_node.tag, key_node.value)  # `1:` and `"1":` are different keys
            if key in first_line:
                duplicates.append((key_path, first_line[key], line))
            first_line.setdefault(key, line)
            lines[key_path] = line
            _compose_lines(value_node, key_path, lines, duplicates)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*path, i)] = item.start_mark.line + 1
            _compose_lines(item, (*path, i), lines, duplicates)


def _read_yaml(path: Path) -> tuple[dict, dict[tuple, int]]:
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise PeftkitError(f"{path}: the recipe is {size / 2**20:.1f} MB; a recipe is a few KB (the limit is "
                               f"{MAX_RECIPE_BYTES // 2**20} MB). Check that this is the recipe file you meant.")
        text = path.read_text()
    except FileNotFoundError:
        raise PeftkitError(f"Recipe file not found: {path}") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
        raise PeftkitError(f"Cannot read recipe {path}: {e}") from None
    try:
        data, lines, duplicates = _parse_yaml(text, "the recipe")
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        context = e.context
        if context and e.context_mark and e.problem_mark and e.context_mark.line != e.problem_mark.line:
            # An unclosed quote or bracket is noticed lines later, often at the end of the file: say where it began.
            context += f" that starts at line {e.context_mark.line + 1}, column {e.context_mark.column + 1}:"
        problem = " ".join(str(p) for p in (context, e.problem) if p)
        fix = "YAML indents with spaces, not tabs: replace the tab" if "'\\t'" in str(e.problem) else \
            "Check indentation and quoting there"
        raise PeftkitError(f"{where}: YAML syntax error: {problem}. {fix}.") from None
    except yaml.YAMLError as e:
        raise PeftkitError(f"{path}: YAML syntax error: {e}") from None
    except _YamlProblem as e:
        raise PeftkitError(f"{path}{e.where}: {e.message}") from None
    if data is None:
        raise PeftkitError(
            f"{path}: the recipe is empty. A recipe needs at least the sections model, data and export; "
            "see recipes/quickstart.yaml for a complete example."
        )
    if not isinstance(data, dict):
        raise PeftkitError(
            f"{path}:1: a recipe must be a mapping of sections (model:, data:, ...), not a {type(data).__name__}."
        )
    if duplicates:
        raise _invalid([
            f"{path}:{second}: key '{key_path[-1]}' is given twice in {_dotted_parent(key_path)} (lines {first} and "
            f"{second}); YAML would silently keep only the last. Delete one of them."
            for key_path, first, second in duplicates
        ])
    return data, lines


def _dotted_parent(key_path: tuple) -> str:
    return ".".join(map(str, key_path[:-1])) or "the recipe"


def _unreadable_scalar(node: yaml.Node | None) -> yaml.ScalarNode | None:
    """The first scalar node PyYAML's safe constructor cannot build, or None."""
    stack, seen = [node] if node is not None else [], set()
    constructor = yaml.SafeLoader("")  # one for all: making one per scalar costs more than the check
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if isinstance(n, yaml.ScalarNode):
            try:
                constructor.construct_object(n)
            except Exception:  # noqa: BLE001 - any failure is the answer
                return n
        elif isinstance(n, yaml.MappingNode):
            stack.extend(child for pair in reversed(n.value) for child in reversed(pair))
        elif isinstance(n, yaml.SequenceNode):
            stack.extend(reversed(n.value))
    return None


def _section_model(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model whose fields live at `loc` (a path of keys), or None."""
    model: Any = Recipe
    for key in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or key not in model.model_fields:
            return None
        annotation = model.model_fields[key].annotation
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type)]
        model = next((a for a in candidates if issubclass(a, BaseModel)), None)
    return model


def _apply_override(data: dict, assignment: str) -> None:
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise PeftkitError(f"--set {assignment!r}: expected KEY=VALUE, for example --set training.lr=2e-4")
    parts = key.strip().split(".")
    for depth in range(1, len(parts) + 1):
        model = _section_model(tuple(parts[: depth - 1]))
        if model is not None and parts[depth - 1] not in model.model_fields:
            valid = list(model.model_fields)
            where = ".".join(parts[: depth - 1]) or "the recipe"
            raise PeftkitError(
                f"--set {key}: unknown key '{parts[depth - 1]}' in {where}.{_suggest(parts[depth - 1], valid)} "
                f"Valid keys: {', '.join(valid)}."
            )
    try:
        value, _, duplicates = _parse_yaml(raw, "the value") if raw.strip() else (None, {}, [])
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise PeftkitError(
            f"--set {key.strip()}={raw}: the value is not valid YAML ({problem}). Quote a string value, for "
            f"example --set '{key.strip()}=\"{raw}\"'."
        ) from None
    except _YamlProblem as e:
        raise PeftkitError(f"--set {key.strip()}: {e.message}") from None
    if duplicates:
        raise PeftkitError(f"--set {key.strip()}: key '{duplicates[0][0][-1]}' is given twice in the value; YAML would "
                           "silently keep only the last. Give each key once.")
    node = data
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def _data_loc(loc: tuple, data: Any) -> tuple:
    """pydantic's error location without the union-member tags it inserts ('list[str]', ...)."""
    kept: list = []
    node = data
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        elif i < len(loc) - 1 or not isinstance(node, dict) or part not in _FIELD_NAMES:
            continue  # a union-member tag ('list[str]', 'TargetRegex'), not a key
        kept.append(part)
    return tuple(kept)


def _format_error(err: dict, data: dict, path: Path, lines: dict[tuple, int], overridden: set[tuple]) -> str:
    loc = _data_loc(err["loc"], data)
    dotted = ".".join(str(p) for p in loc) or "(top level)"
    where = str(path)
    for depth in range(len(loc), 0, -1):
        if loc[:depth] in overridden:
            where = f"{path} (--set {'.'.join(map(str, loc[:depth]))})"
            break
        if loc[:depth] in lines:
            where = f"{path}:{lines[loc[:depth]]}"
            break
    kind = err["type"]
    if kind == "invalid_key":  # `1: x` or `null: x`: YAML made a non-string key
        section_loc = _data_loc(err["loc"][:-1], data)
        valid = _valid_keys(section_loc)
        section = ".".join(map(str, section_loc)) or "the recipe"
        read_as = {bool: "a boolean", int: "a number", float: "a number", type(None): "null"}.get(
            type(err["input"]), f"a {type(err['input']).__name__}")
        return (
            f"{where}: key {err['input']!r} in {section} is not a name (YAML read it as {read_as}); quote it if it "
            f"is meant as one. Valid keys: {', '.join(valid)}."
        )
    if kind == "extra_forbidden":
        valid = _valid_keys(loc[:-1])
        section = ".".join(map(str, loc[:-1])) or "the recipe"
        return (
            f"{where}: unknown key '{loc[-1]}' in {section}.{_suggest(str(loc[-1]), valid)} "
            f"Valid keys: {', '.join(valid)}."
        )
    if kind == "missing":
        parent = ".".join(map(str, loc[:-1]))
        place = f"under '{parent}:'" if parent else "as a top-level section"
        return (
            f"{where}: missing required key '{dotted}'. Add '{loc[-1]}:' {place}; recipes/quickstart.yaml shows a "
            "complete recipe."
        )
    given = err.get("input")
    shown = repr(given) if not isinstance(given, dict | list) else type(given).__name__
    if len(shown) > 80:
        shown = shown[:60] + "..." + shown[-10:]
    msg = err["msg"].removeprefix("Value error, ")
    if kind == "literal_error":
        msg = msg.replace("Input should be", "must be one of")
    msg = re.sub(r" or instance of \w+", " (a section of keys)", msg.replace("Input should be", "must be"))
    if kind != "value_error":  # a validator's own message (`target_modules: []`) is more precise than the hint
        msg = _UNION_HINTS.get(loc, msg)
    if given is None and kind in ("model_type", "dict_type"):
        msg = "the section is empty; indent its keys under it, or delete the line to use the defaults"
    if kind == "value_error" and isinstance(given, dict):
        # A check across several keys of one section (or of the whole recipe): the message names the keys.
        return f"{where}: {dotted + ': ' if loc else ''}{msg}."
    return f"{where}: '{dotted}' = {shown}: {msg}."


# A union-typed key fails once per member type; one message says what any of them would accept.
_UNION_HINTS = {
    ("adapter", "target_modules"): "must be 'all-linear', a list of module-name suffixes, or {regex: PATTERN}",
    ("training", "max_steps"): "must be a positive integer, or null to train for `epochs`",
}

# Names other tools use for our keys: a user coming from peft/axolotl/transformers gets pointed at ours.
_SYNONYMS = {
    "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "learning_rate": "lr", "gradient_accumulation_steps": "grad_accum", "num_epochs": "epochs",
    "num_train_epochs": "epochs", "micro_batch_size": "batch_size", "per_device_train_batch_size": "batch_size",
    "lr_scheduler": "scheduler", "lr_scheduler_type": "scheduler", "optim": "optimizer", "base_model": "name_or_path",
    "torch_dtype": "dtype", "sequence_len": "max_length", "max_seq_length": "max_length", "target": "target_modules",
    "bnb_4bit_quant_type": "method", "bnb_4bit_use_double_quant": "double_quant",
    "bnb_4bit_compute_dtype": "compute_dtype", "bnb_4bit_quant_storage": "quant_storage", "type": "method",
}


def _all_fields(model: type[BaseModel]) -> set[str]:
    names = set(model.model_fields)
    for field in model.model_fields.values():
        for member in getattr(field.annotation, "__args__", (field.annotation,)):
            if isinstance(member, type) and issubclass(member, BaseModel):
                names |= _all_fields(member)
    return names


def _suggest(key: str, valid: list[str]) -> str:
    normal = key.lower().replace("-", "_")  # `Batch-Size` is `batch_size` written another way
    for name in (key, normal):
        if _SYNONYMS.get(name) in valid:
            return f" Did you mean '{_SYNONYMS[name]}'?"
    if normal != key and normal in valid:
        return f" Did you mean '{normal}'?"
    return did_you_mean(normal, valid)


def _valid_keys(loc: tuple) -> list[str]:
    model = _section_model(loc)
    return list(model.model_fields) if model else []


def _most_specific(errors: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    """Drop an error when another lies deeper under the same key: a union member that got further (a
    {regex: ...} with a bad pattern) explains better than the others. A set of prefixes keeps it linear."""
    deeper = {loc[:i] for loc, _ in errors for i in range(len(loc))}
    return [(loc, err) for loc, err in errors if loc not in deeper]


def _drop_misspelled(errors: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    """Drop a missing key that an unknown sibling key is a misspelling of (`nme_or_path`): that sibling's
    'Did you mean' message already says how to fix it, so the 'missing' one is only noise."""
    missing_in = {loc[:-1] for loc, err in errors if err["type"] == "missing"}
    meant = {(loc[:-1], _suggest(str(loc[-1]), _valid_keys(loc[:-1])))
             for loc, err in errors if err["type"] == "extra_forbidden" and loc[:-1] in missing_in}
    return [(loc, err) for loc, err in errors
            if not (err["type"] == "missing" and (loc[:-1], f" Did you mean '{loc[-1]}'?") in meant)]


def _invalid(messages: list[str]) -> PeftkitError:
    """One error listing the distinct problems, the first MAX_MESSAGES of them."""
    messages = list(dict.fromkeys(messages))
    shown = messages[:MAX_MESSAGES]
    more = f"\n  ... and {len(messages) - len(shown)} more" if len(messages) > len(shown) else ""
    plural = "s" if len(messages) > 1 else ""
    return PeftkitError(f"Invalid recipe ({len(messages)} problem{plural}):\n  " + "\n  ".join(shown) + more)


def _resolve(value: str, base: Path, kind: str) -> str:
    """Resolve a recipe path against the recipe's directory; leave hub ids alone."""
    expanded = Path(value).expanduser()
    candidate = expanded if expanded.is_absolute() else base / expanded
    looks_like_path = value.startswith(("/", "./", "../", "~")) or expanded.is_absolute()
    if kind == "data" and Path(value).suffix.lower() in DATA_EXTENSIONS:
        looks_like_path = True
    if candidate.exists() or looks_like_path or kind == "output":
        return str(candidate.resolve())
    return value  # a hub id


_FIELD_NAMES = _all_fields(Recipe)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe; raise PeftkitError with every problem found.

    Args:
        path: the YAML file.
        overrides: `KEY=VALUE` strings (`training.lr=2e-4`); VALUE is parsed as YAML.
    """
    path = Path(path)
    data, lines = _read_yaml(path)
    overridden = set()
    for assignment in overrides:
        _apply_override(data, assignment)
        overridden.add(tuple(assignment.partition("=")[0].strip().split(".")))
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        errors = _drop_misspelled(_most_specific([(_data_loc(err["loc"], data), err) for err in e.errors()]))
        raise _invalid([_format_error(err, data, path, lines, overridden) for _, err in errors]) from None
    base = path.resolve().parent
    for section, key, kind in (("model", "name_or_path", "model"), ("data", "train", "data"), ("data", "eval", "data"),
                               ("export", "output_dir", "output")):
        value = getattr(getattr(recipe, section), key)
        if value is None:
            continue
        try:
            setattr(getattr(recipe, section), key, _resolve(value, base, kind))
        except (OSError, RuntimeError, ValueError) as e:  # `~nosuchuser/x`, a name over 255 bytes, a NUL byte
            line = lines.get((section, key))
            reason = getattr(e, "strerror", None) or str(e).rstrip(".")
            raise PeftkitError(
                f"{path}{f':{line}' if line else ''}: '{section}.{key}' = {value[:80]!r} is not a usable path "
                f"({reason}). Give an existing path (relative to the recipe's directory) or a hub id."
            ) from None
    return recipe
