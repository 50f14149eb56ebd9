"""README.md and docs/*.md agree with the code they document, mechanically: the recipe reference's tables
(`| key | default | meaning |`) against the pydantic recipe models, README's methods table against the method
registry, every `peftkit COMMAND --flag` they spell against the typer app, and every link between them to a file
and heading that exist. Nothing here trains or reads a model's weights (the methods table's counts are taken on a
meta-device model)."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, Literal, get_args

import pytest
import typer
import yaml
from pydantic import BaseModel, ValidationError

from peftkit.cli import app
from peftkit.methods import METHODS
from peftkit.recipe.schema import Recipe

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]
RECIPE_DOC, METHODS_DOC, CLI_DOC = "docs/recipe.md", "docs/methods.md", "docs/cli.md"
SPAN = re.compile(r"`([^`]+)`")

# A table's intro that names no `method: X`: the methods whose keys it lists.
TABLE_METHODS = {
    "LoRA's keys": ("lora",),
    "The prompt family": ("prompt_tuning", "p_tuning", "prefix_tuning", "multitask_prompt_tuning", "cartridge",
                          "cpt"),
    "Every method but `fusion` and `xlora`": tuple(m for m in METHODS if m not in ("fusion", "xlora")),
}
ALSO_TAKES = {"lokr": "loha"}  # "LoKr's keys (`method: lokr`): LoHa's, and"
# Fields a user cannot usefully set, so the README leaves them out: they exist only to be refused with a message.
REFUSED = {
    ("trainable_tokens", "modules_to_save"): "empty or an error: peft's method has none",
    **{(m, "modules_to_save"): "empty or an error: the prompt family changes no weight"
       for m in TABLE_METHODS["The prompt family"]},
    ("fusion", "init_from"): "an error: a fusion starts from the adapters it fuses",
    ("xlora", "init_from"): "an error: an X-LoRA starts from its experts and a new classifier",
}

# Defaults the docs say in words ("the model's"), not as a value: "section.key" -> why. None so far.
PROSE_DEFAULTS: dict[str, str] = {}

# ---------------------------------------------------------------------------------------------------- parsing

def _blocks(lines: list[str]) -> list[tuple[str, int, list[str]]]:
    """A markdown file as ("heading" | "text" | "table" | "code", first line number, lines), fenced code kept apart
    (a `# comment` there is no heading, a `|` no table)."""
    blocks, fenced = [], False
    for number, line in enumerate(lines, 1):
        if line.startswith("```"):
            fenced = not fenced
            kind = "code"
        else:
            kind = ("code" if fenced else "heading" if re.match(r"#+ ", line) else "table" if line.startswith("|")
                    else "blank" if not line.strip() else "text")
        if blocks and kind == blocks[-1][0] and kind in ("text", "table", "code"):
            blocks[-1][2].append(line)
        else:
            blocks.append((kind, number, [line]))
    return [b for b in blocks if b[0] != "blank"]


BLOCKS = {name: _blocks((ROOT / name).read_text(encoding="utf-8").splitlines()) for name in DOCS}


def cells(row: str) -> list[str]:
    """A table row's cells: split at `|` but not at an escaped `\\|`."""
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", row.strip())[1:-1]]


def chapter(name: str, title: str) -> list[tuple[str, int, list[str]]]:
    """The blocks of file `name` under its heading `title` (`# title`, `## title`, ...), up to the next heading of
    that level or above."""
    blocks = BLOCKS[name]
    start, level = next((i, text[0].index(" ")) for i, (kind, _, text) in enumerate(blocks)
                        if kind == "heading" and re.sub(r"^#+ ", "", text[0]) == title)
    end = next((i for i in range(start + 1, len(blocks))
                if blocks[i][0] == "heading" and blocks[i][2][0].index(" ") <= level), len(blocks))
    return blocks[start + 1:end]


def key_tables() -> list[tuple[str | None, str, int, list[list[str]]]]:
    """The `| key | default | meaning |` tables of docs/recipe.md and docs/methods.md: (recipe section of the
    `## `section`` heading they are under, or None; every table of docs/methods.md is the `adapter` section's; the
    paragraph before the table; its line; its rows)."""
    tables = []
    for name, section in ((RECIPE_DOC, None), (METHODS_DOC, "adapter")):
        tables += [(section or at, intro, line, rows) for at, intro, line, rows in _key_tables(BLOCKS[name])]
    return tables


def _key_tables(blocks) -> list[tuple[str | None, str, int, list[list[str]]]]:
    tables, section, intro = [], None, ""
    for kind, line, text in blocks:
        if kind == "heading" and text[0].startswith("## "):
            spans = SPAN.findall(text[0])
            section = spans[0] if spans and text[0].startswith("## `") else None
            intro = ""
        elif kind == "text":
            intro = " ".join(text)
        elif kind == "table" and cells(text[0])[:2] == ["key", "default"]:
            tables.append((section, intro, line, [cells(row) for row in text[2:]]))
    return tables


def documented(rows: list[list[str]], line: int) -> list[tuple[str, str | None, tuple[str, ...], str]]:
    """(key, default as written: a code span's text, "required", or None for prose; the methods a parenthesised
    qualifier restricts it to; its row's text) for each key of the rows. `a` / `b` | `1` / `2` pairs keys and
    defaults; `a`, `b` | `1` gives both the one default."""
    out = []
    for offset, row in enumerate(rows):
        key_cell, default_cell = row[:2]
        keys_text, _, qualifier = key_cell.partition(" (")
        keys, only = SPAN.findall(keys_text), tuple(SPAN.findall(qualifier))
        defaults = SPAN.findall(default_cell)
        if "required" in default_cell and not defaults:
            defaults = ["required"]
        if len(keys) > 1 and len(defaults) == 1:  # `a`, `b` | `null`: one default for both
            defaults *= len(keys)
        elif len(keys) == 1:  # `32` (`0` when `r` is set): the first value is the default
            defaults = defaults[:1]
        assert len(defaults) in (0, len(keys)), f"docs:{line + 2 + offset}: keys {keys}, defaults {defaults}"
        out += [(key, defaults[i] if defaults else None, only, " ".join(row)) for i, key in enumerate(keys)]
    return out


# ------------------------------------------------------------------------------------------------ comparing

def as_yaml(written: str) -> Any:
    """A default as the README writes it, read as YAML."""
    return as_number(yaml.safe_load(written))


def as_number(value: Any) -> Any:
    """`2e-4`, which PyYAML (wanting a dot) reads as a string, as the number it is."""
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", value):
        return float(value)
    return value


def same(doc: Any, code: Any) -> bool:
    """`doc` (read from YAML) is the field's default `code`: numbers by value, a bool only as a bool, a tuple as
    a list."""
    if isinstance(code, tuple):
        code = list(code)
    if isinstance(doc, bool) or isinstance(code, bool):
        return type(doc) is type(code) and doc == code
    if isinstance(doc, (int, float)) and isinstance(code, (int, float)):
        return float(doc) == float(code)
    if isinstance(doc, list) and isinstance(code, list):
        return len(doc) == len(code) and all(map(same, doc, code))
    return doc == code


def default_of(model: type[BaseModel], key: str) -> Any:
    field = model.model_fields[key]
    return "required" if field.is_required() else field.get_default(call_default_factory=True)


def sub_model(model: type[BaseModel], key: str) -> type[BaseModel] | None:
    """The recipe section a field holds (a `{...}` of its own, in a list or mapping too), or None."""
    todo, seen = [model.model_fields[key].annotation], []
    while todo:
        kind = todo.pop()
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            seen.append(kind)
        todo += get_args(kind)
    return seen[0] if seen else None


def default_problems(model: type[BaseModel], where: str, docs) -> list[str]:
    """Each documented key that `model` lacks, and each default the docs give otherwise than the code."""
    problems = []
    for key, written, *_ in docs:
        if key not in model.model_fields:
            problems.append(f"{where}.{key}: documented, and {model.__name__} has no such field")
        elif written is None and f"{where}.{key}" not in PROSE_DEFAULTS:
            problems.append(f"{where}.{key}: the default column holds no value in backticks")
        elif written is not None and not same(written if written == "required" else as_yaml(written),
                                              default_of(model, key)):
            problems.append(f"{where}.{key}: the docs' default {written}, the code's {default_of(model, key)!r}")
    return problems


def choices(annotation: Any) -> list[str]:
    """The strings a field's Literal (in a union too) allows."""
    if getattr(annotation, "__origin__", None) is Literal:
        return [v for v in get_args(annotation) if isinstance(v, str)]
    return [v for member in get_args(annotation) for v in choices(member)]


def choice_problems(model: type[BaseModel], where: str, docs) -> list[str]:
    """Each value a documented field allows (a Literal's strings) that its row does not show in backticks."""
    return [f"{where}.{key}: {value!r} is allowed and its row does not say `{value}`"
            for key, _, _, row in docs if key in model.model_fields and key != "method"
            for value in choices(model.model_fields[key].annotation) if value not in SPAN.findall(row)]


def missing(model: type[BaseModel], where: str, keys: set[str], skip=()) -> list[str]:
    return [f"{where}.{key}: a field of {model.__name__} the README does not document"
            for key in model.model_fields if key not in keys and key not in skip]


# ------------------------------------------------------------------------------------------------------ tests

SECTIONS = {name: sub_model(Recipe, name) for name in Recipe.model_fields if name != "adapter"}


def test_every_recipe_section_has_its_table():
    tables = key_tables()
    assert {t[0] for t in tables} == set(Recipe.model_fields), [t[:1] + t[2:3] for t in tables]


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_section_table_matches_schema(name):
    model = SECTIONS[name]
    docs = [d for section, _, line, rows in key_tables() if section == name for d in documented(rows, line)]
    problems = default_problems(model, name, docs) + choice_problems(model, name, docs)
    problems += missing(model, name, {key for key, *_ in docs})
    assert not problems, "\n".join(problems)


def nested_rows() -> list[tuple[str, str, type[BaseModel], str]]:
    """(section, key, the section the field holds, its meaning cell) for each documented field holding one."""
    return [(section, row_cells[0].strip("`"), nested, row_cells[2])
            for section, _, _, rows in key_tables() if section in SECTIONS for row_cells in rows
            if row_cells[0].strip("`") in SECTIONS[section].model_fields
            and (nested := sub_model(SECTIONS[section], row_cells[0].strip("`")))]


@pytest.mark.parametrize("section,key,nested,meaning", nested_rows(),
                         ids=[f"{section}.{key}" for section, key, *_ in nested_rows()])
def test_nested_section_is_spelled_out(section, key, nested, meaning):
    """A field holding a section of its own (`training.early_stopping`, `data.train`'s `{path, ...}`) shows its keys
    as a flow mapping in its meaning, each default (a value other than a placeholder such as `...` or `F`) the
    code's."""
    check_spelled_out(f"{section}.{key}", nested, meaning)


def check_spelled_out(where: str, nested: type[BaseModel], meaning: str) -> None:
    mappings = [m for span in SPAN.findall(meaning) if span.startswith("{")
                and isinstance(m := yaml.safe_load(span), dict) and set(m) == set(nested.model_fields)]
    assert mappings, (f"{where}: no `{{...}}` in its meaning names exactly {sorted(nested.model_fields)}: "
                      f"{[s for s in SPAN.findall(meaning) if s.startswith('{')]}")
    problems = [f"{where}.{k}: the docs' default {v!r}, the code's {default_of(nested, k)!r}"
                for k, v in mappings[0].items() if not placeholder(v) and not nested.model_fields[k].is_required()
                and not same(as_number(v), default_of(nested, k))]
    assert not problems, "\n".join(problems)


def placeholder(value: Any) -> bool:
    """A value that stands for any: `...`, `{...}`, a capital letter (`F`), alternatives (`linear | yarn`), or
    none at all (`{path, split}`)."""
    return value is None or value == {"...": None} or (
        isinstance(value, str) and bool(re.fullmatch(r"\.\.\.|[A-Z]|.* \| .*", value)))


def method_docs() -> dict[str, list[tuple[str, str | None, tuple[str, ...], str]]]:
    """Each method's documented keys, from the `adapter` tables whose intro names it."""
    per_method: dict[str, list] = {name: [] for name in METHODS}
    for section, intro, line, rows in key_tables():
        if section != "adapter":
            continue
        named = re.findall(r"`method: (\w+)`", intro)[:1] or next(
            (list(methods) for start, methods in TABLE_METHODS.items() if intro.startswith(start)), None)
        assert named, f"{METHODS_DOC}:{line}: say which method's keys this table lists (`method: X` in its intro)"
        for key, written, only, row in documented(rows, line):
            assert set(only) <= set(named), f"{METHODS_DOC}:{line}: {key} ({', '.join(only)}) for methods {named}"
            for method in only or named:
                per_method[method].append((key, written, only, row))
    for method, other in ALSO_TAKES.items():
        per_method[method] += per_method[other]
    return per_method


def adapter_nested_rows() -> list[tuple[str, str, type[BaseModel], str]]:
    """(method, key, its settings' model, its row) for each documented method key holding settings of their own
    (LoRA's `velora_config`, `kasa_config`, `use_bdlora`); the target selectors' `{regex: ...}`, another spelling of
    a list rather than settings, are left to the tables' own checks."""
    rows = {}
    for method, docs in method_docs().items():
        config = METHODS[method].config
        for key, _, _, row in docs:
            nested = sub_model(config, key) if key in config.model_fields else None
            if nested is not None and set(nested.model_fields) != {"regex"}:
                rows.setdefault((key, nested), (method, key, nested, row))
    return list(rows.values())


@pytest.mark.parametrize("method,key,nested,row", adapter_nested_rows(),
                         ids=[f"{method}.{key}" for method, key, *_ in adapter_nested_rows()])
def test_adapter_settings_are_spelled_out(method, key, nested, row):
    """An adapter key holding settings of its own shows them as a recipe section's does: `{...}` with its defaults."""
    check_spelled_out(f"adapter ({method}).{key}", nested, row)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_keys_match_its_config(method):
    config, docs = METHODS[method].config, method_docs()[method]
    skip = {key for m, key in REFUSED if m == method} | ({"method"} if method != "lora" else set())
    where = f"adapter ({method})"
    problems = default_problems(config, where, docs) + choice_problems(config, where, docs)
    problems += missing(config, where, {key for key, *_ in docs}, skip)
    problems += [f"adapter ({method}).{key}: listed as refused ({REFUSED[method, key]}), and documented"
                 for key, *_ in docs if (method, key) in REFUSED]
    assert not problems, "\n".join(problems)


def test_refused_fields_are_refused():
    """REFUSED holds fields that are there and say no: a modules_to_save the section refuses, fusion's init_from the
    recipe."""
    for method, key in REFUSED:
        config = METHODS[method].config
        assert key in config.model_fields, (method, key)
        if key == "modules_to_save":
            required = {"token_indices": [0]} if method == "trainable_tokens" else {}
            with pytest.raises(ValidationError, match="modules_to_save"):
                config(method=method, modules_to_save=["lm_head"], **required)
    recipe = SimpleNamespace(classifier=False, adapter=SimpleNamespace(init_from="adapters/x"))
    assert "remove init_from" in METHODS["fusion"].recipe_conflict(recipe)


def test_every_table_row_has_the_headers_cells():
    """A `|` in a cell (`<|im_end|>` in a code span too) ends the cell unless written `\\|`: GitHub shows such a
    row cut short."""
    cut = [f"{name}:{line + i}: {len(cells(row))} cells, the header {len(cells(text[0]))}"
           for name, blocks in BLOCKS.items() for kind, line, text in blocks if kind == "table"
           for i, row in enumerate(text)
           if i != 1 and len(cells(row)) != len(cells(text[0]))]
    assert not cut, "\n".join(cut)


def test_methods_table_is_the_registry():
    _, _, rows = next(b for b in chapter("README.md", "Methods")
                      if b[0] == "table" and cells(b[2][0])[:2] == ["method", "what it is"])
    assert {SPAN.findall(cells(row)[0])[0] for row in rows[2:]} == set(METHODS)


def yaml_snippets() -> list[tuple[str, int, str]]:
    """(file, line, text) of each fenced ```yaml block of the docs."""
    return [(name, line, "\n".join(text[1:-1])) for name, blocks in BLOCKS.items()
            for kind, line, text in blocks if kind == "code" and text[0].strip() == "```yaml"]


@pytest.mark.parametrize("name,line,snippet", yaml_snippets(), ids=[f"{n}:{l}" for n, l, _ in yaml_snippets()])
def test_yaml_snippets_validate(name, line, snippet, tmp_path):
    """A recipe snippet the docs show (a section or a few) validates laid over recipes/quickstart.yaml, each section
    it gives merged key by key into the quickstart's: a key, a value or a combination of keys it shows is one a
    recipe takes."""
    from peftkit.recipe import load_recipe

    recipe = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text(encoding="utf-8"))
    for section, keys in yaml.safe_load(snippet).items():
        recipe[section] = {**recipe.get(section, {}), **keys} if isinstance(keys, dict) else keys
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    load_recipe(tmp_path / "recipe.yaml")


# The settings README's methods table gives each row's count at ("r 8, all-linear"), beyond the method's defaults.
ALL_LINEAR = {"target_modules": "all-linear"}
TABLE_SETTINGS = {
    "lora": {"r": 8, **ALL_LINEAR}, "lora use_dora: true": {"r": 8, "use_dora": True, **ALL_LINEAR},
    "lora lora_fa: true": {"r": 8, "lora_fa": True, **ALL_LINEAR}, "ia3": {}, "loha": ALL_LINEAR,
    "lokr": ALL_LINEAR, "vera": ALL_LINEAR, "fourierft": ALL_LINEAR, "randlora": ALL_LINEAR, "vblora": ALL_LINEAR,
    "c3a": ALL_LINEAR, "shira": ALL_LINEAR, "beft": {}, "supertuning": {}, "gralora": ALL_LINEAR, "deft": ALL_LINEAR,
    "peanut": {}, "psoft": ALL_LINEAR, "glora": ALL_LINEAR, "unilora": {}, "lily": {}, "osf": {}, "poly": {},
    "frod": {}, "waveft": {}, "adamss": {}, "shadow": {}, "adalora": {}, "ln_tuning": {}, "llama_adapter": {},
    "bottleneck": {}, "oft": ALL_LINEAR, "hra": ALL_LINEAR, "boft": ALL_LINEAR, "miss": ALL_LINEAR,
    "delora": ALL_LINEAR, "road": ALL_LINEAR, "hira": ALL_LINEAR, "pvera": ALL_LINEAR, "tinylora": ALL_LINEAR,
    "prompt_tuning": {}, "p_tuning": {}, "prefix_tuning": {}, "cartridge": {},
}  # not counted here: PiSSA/OLoRA ("LoRA's"), X-LoRA (built from trained experts), and the rows that give a formula
# (per token, per site, per task)


def table_counts() -> dict[str, int]:
    """README's methods table: each row ("lora", "lora use_dora: true") and the count its trainable column starts with."""
    _, _, rows = next(b for b in chapter("README.md", "Methods")
                      if b[0] == "table" and cells(b[2][0])[:2] == ["method", "what it is"])
    counts = {}
    for row in rows[2:]:
        first, count = cells(row)[0], cells(row)[3]
        name = " ".join([SPAN.findall(first)[0], *SPAN.findall(first.partition(")")[2])[:1]])
        if (said := re.match(r"[\d,]+(?= \(| trained)", count)) and name != "xlora":
            counts[name] = int(said[0].replace(",", ""))
    return counts


def test_methods_table_counts_are_peftkits(tmp_path):
    """Each count of README's methods table, at the settings its row names, is the trainable count peftkit validate
    (train's own count) gives on a meta-device Llama-2-7B (hidden 4096, FFN 11008, 32 layers, vocabulary 32000)."""
    from transformers import LlamaConfig

    from peftkit.model_checks import check_model
    from peftkit.recipe import load_recipe
    from peftkit.tiny import build_char_tokenizer

    counts = table_counts()
    assert set(counts) == set(TABLE_SETTINGS), set(counts) ^ set(TABLE_SETTINGS)
    LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                vocab_size=32000).save_pretrained(tmp_path / "llama-2-7b")
    build_char_tokenizer(tmp_path / "llama-2-7b")
    wrong = []
    for name, settings in TABLE_SETTINGS.items():
        adapter = {"method": name.split()[0], **settings}
        recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", [
            f"model.name_or_path={tmp_path / 'llama-2-7b'}", "model.dtype=bfloat16", "export.merged=false",
            f"adapter={yaml.safe_dump(adapter, default_flow_style=True).strip()}"])
        line = check_model(recipe)
        if f"{counts[name]:,} trainable of" not in line:
            wrong.append(f"{name}: README {counts[name]:,}, peftkit: {line}")
    assert not wrong, "\n".join(wrong)


# -------------------------------------------------------------------------------------------------------- CLI

def app_flags() -> dict[str, set[str]]:
    """Each command of the typer app and its options' spellings (with click's `--help`)."""
    group = typer.main.get_command(app)
    return {name: {opt for p in cmd.params for opt in p.opts + p.secondary_opts if opt.startswith("-")} | {"--help"}
            for name, cmd in group.commands.items()}


def command_lines(blocks) -> list[tuple[int, str]]:
    """(line, text) of each code span and each command of a code block (`\\` continuations joined) of `blocks`."""
    out = []
    for kind, line, text in blocks:
        if kind == "code":
            joined = "\n".join(text).replace("\\\n", " ")
            out += [(line, part) for part in joined.splitlines()]
        else:
            joined = "\n".join(text)
            out += [(line + joined.count("\n", 0, hit.start()), hit[1].replace("\n", " "))
                    for hit in SPAN.finditer(joined)]
    return out


def spelled_flags(blocks) -> list[tuple[int, str, str]]:
    """(line, command, flag) for each `--flag` after `peftkit COMMAND` (or `peftkit eval/generate`) in a span or
    a command line of `blocks`, up to the next `peftkit COMMAND`."""
    out = []
    for line, text in command_lines(blocks):
        for hit in re.finditer(r"\bpeftkit ([a-z]+(?:/[a-z]+)*)(.*?)(?=\bpeftkit [a-z]|$)", text):
            for command in hit[1].split("/"):
                out += [(line, command, flag) for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", hit[2])]
    return out


def test_every_flag_the_readme_spells_exists():
    flags = app_flags()
    wrong = [f"{name}:{line}: peftkit {command} {flag}" for name, blocks in BLOCKS.items()
             for line, command, flag in spelled_flags(blocks) if command in flags and flag not in flags[command]]
    assert not wrong, "\n".join(wrong)


def test_help_names_only_the_commands_own_flags():
    """A `--flag` that a command's `--help` names (its description, outside a code span, which may quote another
    command, and each option's help) is one of that command's: `eval --help` spoke of `--base`, merge's flag."""
    group, flags = typer.main.get_command(app), app_flags()
    wrong = [f"peftkit {name} --help: {flag}" for name, cmd in group.commands.items()
             for text in [SPAN.sub("", cmd.help or ""), *(getattr(p, "help", None) or "" for p in cmd.params)]
             for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text) if flag not in flags[name]]
    assert not wrong, "\n".join(wrong)


def test_cli_reference_lists_every_command_and_flag():
    """Every command has a row of the CLI reference table and a section of its own, and each of its flags is
    spelled somewhere in the CLI reference (its row or section, or a `peftkit COMMAND ... --flag` example)."""
    blocks = chapter(CLI_DOC, "CLI reference")
    rows = [cells(row) for kind, _, text in blocks if kind == "table" and cells(text[0]) == ["command", "what it does"]
            for row in text[2:]]
    listed = {(name := re.match(r"peftkit (\w+)", SPAN.findall(row[0])[0])[1]): " ".join(
        [*row, *(line for _, _, text in chapter(CLI_DOC, f"`peftkit {name}`") for line in text)]) for row in rows}
    assert set(listed) == set(app_flags())
    said = {(command, flag) for _, command, flag in spelled_flags(blocks)}
    unsaid = [f"peftkit {command} {flag}" for command, flags in app_flags().items() for flag in sorted(flags)
              if flag != "--help" and (command, flag) not in said and f"`{flag}" not in listed[command]]
    assert not unsaid, "\n".join(unsaid)


def test_numbers_in_the_synopses_are_the_defaults():
    """`[--max-new-tokens 128]`, `[--n 3]` in a command's synopsis (the CLI reference's first column) is its default."""
    group = typer.main.get_command(app)
    rows = [cells(row)[0] for kind, _, text in chapter(CLI_DOC, "CLI reference")
            if kind == "table" and cells(text[0]) == ["command", "what it does"] for row in text[2:]]
    wrong = []
    for synopsis in map(lambda cell: SPAN.findall(cell)[0], rows):
        command = group.commands[synopsis.split()[1]]
        defaults = {opt: p.default for p in command.params for opt in p.opts}
        wrong += [f"{synopsis.split()[1]} {flag} {number}: default {defaults[flag]}"
                  for flag, number in re.findall(r"(--[a-z-]+) (\d+(?:\.\d+)?)\b", synopsis)
                  if float(number) != defaults[flag]]
    assert not wrong, "\n".join(wrong)


def synopses() -> dict[str, list[str]]:
    """Each command's synopses in the CLI reference: its table row's first code span, and for `merge` the combining
    one (the code block that starts `peftkit merge --adapter A --adapter B`)."""
    out: dict[str, list[str]] = {}
    for kind, _, text in chapter(CLI_DOC, "CLI reference"):
        if kind == "table" and cells(text[0]) == ["command", "what it does"]:
            for row in text[2:]:
                span = SPAN.findall(cells(row)[0])[0]
                out.setdefault(span.split()[1], []).append(span)
        elif kind == "code" and len(text) > 1 and text[1].startswith("peftkit merge --adapter A --adapter B"):
            out["merge"].append(" ".join(text[1:-1]))
    return out


def test_synopses_are_the_help():
    """Each command's synopsis names every flag its `--help` lists, and the choices it spells (`squad|strip|none`,
    `{nf4,fp4}`) are the ones that flag's help names."""
    group, said = typer.main.get_command(app), synopses()
    assert set(said) == set(group.commands)
    problems = []
    for name, cmd in group.commands.items():
        text = " ".join(said[name])
        problems += [f"peftkit {name}: {p.opts[0]} is not in its synopsis" for p in cmd.params
                     if p.opts[0].startswith("-") and not re.search(re.escape(p.opts[0]) + r"(?![\w-])", text)]
        helps = {opt: getattr(p, "help", None) or "" for p in cmd.params for opt in p.opts}
        for flag, spelled in re.findall(r"(--[a-z-]+) \{?([a-z0-9_]+(?:(?:\\?\||,)[a-z0-9_]+)+)\}?", text):
            problems += [f"peftkit {name} {flag}: the synopsis offers {choice}, its --help does not"
                         for choice in re.split(r"\\?\||,", spelled) if not re.search(rf"\b{choice}\b", helps[flag])]
    assert not problems, "\n".join(problems)


def test_merge_method_table_is_the_combinations():
    """The `peftkit merge --method` table (a row may name a type and its `_svd` twin) lists peftkit.combine's."""
    from peftkit.combine import COMBINATIONS

    _, _, rows = next(b for b in chapter(CLI_DOC, "CLI reference")
                      if b[0] == "table" and cells(b[2][0])[0] == "`--method`")
    assert sorted(name for row in rows[2:] for name in SPAN.findall(cells(row)[0])) == sorted(COMBINATIONS)


def test_development_tree_names_every_module_and_script():
    """README's Development tree (the code block under `## Development`) names each module of peftkit/ (`combine*.py`
    names several) and each file of scripts/, and nothing that is not there."""
    from fnmatch import fnmatch

    tree = "\n".join(line for kind, _, text in chapter("README.md", "Development") if kind == "code" for line in text)
    named = set(re.findall(r"[\w*]+\.(?:py|sh)\b", tree))
    files = {p.name for p in (ROOT / "peftkit").rglob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    files |= {p.name for p in (ROOT / "scripts").iterdir() if p.is_file()}
    tests = {p.name for p in (ROOT / "tests").glob("test_*.py")}
    unnamed = sorted(f for f in files if not any(fnmatch(f, n) for n in named))
    gone = sorted(n for n in named if not any(fnmatch(f, n) for f in files | tests | {"__init__.py"}))
    assert not unnamed and not gone, f"not in README's Development tree: {unnamed}; named there, no such file: {gone}"


# ------------------------------------------------------------------------------------------------------ links

def anchors(name: str) -> Iterator[str]:
    """The anchors GitHub gives file `name`'s headings: lower case, punctuation but `-` and `_` dropped, spaces as
    `-`, a repeated one numbered (`-1`, `-2`)."""
    counts: dict[str, int] = {}
    for kind, _, text in BLOCKS[name]:
        if kind == "heading":
            slug = re.sub(r"[^\w\- ]", "", re.sub(r"^#+ ", "", text[0]).strip().lower()).replace(" ", "-")
            counts[slug] = counts.get(slug, 0) + 1
            yield slug if counts[slug] == 1 else f"{slug}-{counts[slug] - 1}"


def test_every_link_between_the_docs_resolves():
    """README.md and docs/*.md link each other's sections (`docs/recipe.md#adapter`, `../README.md#methods`): each
    local link names a file that exists, and a heading of it where it has a `#`."""
    broken = []
    for name in DOCS:
        text = "\n".join(line for kind, _, lines in BLOCKS[name] if kind != "code" for line in lines)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            path, _, anchor = target.partition("#")
            if re.match(r"[a-z]+:", path):  # https://..., mailto:
                continue
            linked = (ROOT / name).parent.joinpath(path).resolve().relative_to(ROOT).as_posix() if path else name
            if not (ROOT / linked).exists():
                broken.append(f"{name}: {target}: no file {linked}")
            elif anchor and (linked not in BLOCKS or anchor not in set(anchors(linked))):
                broken.append(f"{name}: {target}: no heading #{anchor} in {linked}")
    assert not broken, "\n".join(broken)
