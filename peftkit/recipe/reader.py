"""Reading recipe YAML: line numbers of every key, duplicate keys, and limits on size, depth and alias
expansion checked before anything recursive or expanding touches the document."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from peftkit.errors import PeftkitError

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


def _parse_yaml(text: str, what: str) -> tuple[Any, dict[tuple, int], list[tuple[tuple, int, int]], set[tuple]]:
    """(data, line of every key path, keys given twice, key paths written with no value at all) of a YAML document.

    Raises yaml.YAMLError for a syntax error and _YamlProblem for a document refused by `_check_shape` or a
    value PyYAML's constructors cannot build.
    """
    _check_shape(text, what)
    node = _compose(text)
    lines: dict[tuple, int] = {}
    duplicates: list[tuple[tuple, int, int]] = []
    empty: set[tuple] = set()
    if node is None:
        return None, lines, duplicates, empty
    _compose_lines(node, (), lines, duplicates, empty)  # first: constructing merges `<<: *x` keys into the nodes
    try:
        data = _LineLoader("").construct_document(node)
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        # PyYAML's constructors fail with plain exceptions on explicitly tagged values (`!!int abc`, `!!timestamp x`).
        bad = _unreadable_scalar(node)
        where = f":{bad.start_mark.line + 1}:{bad.start_mark.column + 1}" if bad else ""
        problem = (f"{bad.value!r} cannot be read as {bad.tag.rsplit(':', 1)[-1]}" if bad
                   else f"a value cannot be read ({e!r})")
        raise _YamlProblem(where, f"YAML error: {problem}. Remove the explicit !!tag or fix the value.") from None
    return data, lines, duplicates, empty


def _compose_lines(node: yaml.Node, path: tuple, lines: dict[tuple, int],
                   duplicates: list[tuple[tuple, int, int]], empty: set[tuple]) -> None:
    """Record the line of every key path, each key given twice in one mapping as (key path, first line,
    second line): PyYAML silently keeps the last value, and each key written with nothing after it (`quantization:`,
    which YAML reads as null, unlike an explicit `null`). Aliases are walked as what they stand for (bounded by
    `_check_shape`), so the keys of an anchored section have lines too."""
    if isinstance(node, yaml.MappingNode):
        first_line: dict[tuple[str, Any], int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):  # `? [r, alpha]`: YAML allows it, a recipe has names
                mark = key_node.start_mark
                raise _YamlProblem(f":{mark.line + 1}:{mark.column + 1}",
                                   "a key must be a plain name, not a list or a mapping (YAML's `? [a, b]: ...`).")
            key_path, line = (*path, key_node.value), key_node.start_mark.line + 1
            key = (key_node.tag, key_node.value)  # `1:` and `"1":` are different keys
            if key in first_line:
                duplicates.append((key_path, first_line[key], line))
            first_line.setdefault(key, line)
            lines[key_path] = line
            if isinstance(value_node, yaml.ScalarNode) and value_node.tag.endswith(":null") and not value_node.value:
                empty.add(key_path)
            _compose_lines(value_node, key_path, lines, duplicates, empty)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*path, i)] = item.start_mark.line + 1
            _compose_lines(item, (*path, i), lines, duplicates, empty)


def _not_utf8(path: Path, raw: bytes, at: int) -> str:
    """What is wrong with a recipe whose byte `at` is not UTF-8, at its line, as a data file's line says it."""
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):  # Windows' Notepad and PowerShell save "Unicode" so
        return f"{path}:1: the recipe is UTF-16 text (it begins with a UTF-16 byte order mark). Save it as UTF-8."
    start = raw.rfind(b"\n", 0, at) + 1
    line, column = raw.count(b"\n", 0, at) + 1, len(raw[start:at].decode("utf-8", errors="replace")) + 1
    return (f"{path}:{line}: not UTF-8 text (byte 0x{raw[at]:02x} at character {column}; a file saved as Latin-1 or "
            "Windows-1252?). Save the recipe as UTF-8.")


def _read_yaml(path: Path) -> tuple[dict, dict[tuple, int], set[tuple]]:
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise PeftkitError(f"{path}: the recipe is {size / 2**20:.1f} MB; a recipe is a few KB (the limit is "
                               f"{MAX_RECIPE_BYTES // 2**20} MB). Check that this is the recipe file you meant.")
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise PeftkitError(f"Recipe file not found: {path}") from None
    except IsADirectoryError:
        run = f" It is a run directory: its recipe is {path / 'recipe.yaml'}." if (path / "recipe.yaml").is_file() else ""
        raise PeftkitError(f"{path} is a directory, not a recipe file.{run}") from None
    except UnicodeDecodeError as e:
        raise PeftkitError(_not_utf8(path, raw, e.start)) from None
    except PermissionError as e:
        raise PeftkitError(f"Cannot read recipe {path}: {e}") from None
    try:
        data, lines, duplicates, empty = _parse_yaml(text, "the recipe")
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
    return data, lines, empty


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


def _invalid(messages: list[str]) -> PeftkitError:
    """One error listing the distinct problems, the first MAX_MESSAGES of them."""
    messages = list(dict.fromkeys(messages))
    shown = messages[:MAX_MESSAGES]
    more = f"\n  ... and {len(messages) - len(shown)} more" if len(messages) > len(shown) else ""
    plural = "s" if len(messages) > 1 else ""
    return PeftkitError(f"Invalid recipe ({len(messages)} problem{plural}):\n  " + "\n  ".join(shown) + more)
