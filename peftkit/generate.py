"""`peftkit generate`: the completions of given prompts, or of the prompts of a dataset's rows, decoded as
`peftkit.decoding` decodes (greedy or sampled, batched with left padding, cut at stop strings).
"""

from __future__ import annotations

import warnings
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from peftkit.adapters.arrow import ArrowSettings
from peftkit.data.checks import guard_token_ids
from peftkit.data.examples import prompt_and_target_text
from peftkit.data.prompts import Prompt, chat_prompt, load_prompts, text_prompt
from peftkit.decoding import Sampling, generate_texts
from peftkit.errors import PeftkitError, PeftkitWarning
from peftkit.inference import ModelSource, check_choices, hub_data_flags, model_source
from peftkit.recipe import DataConfig
from peftkit.task_ids import adapter_task_count, with_tasks


@dataclass
class GenerateJob:
    """What `peftkit generate` runs: a model source and its prompts (given, or a dataset's)."""

    source: ModelSource
    prompts: list[str] = field(default_factory=list)
    chat: bool = False
    instructions: bool = False
    """--format alpaca with --prompt: each prompt an instruction in the alpaca template, as training's prompts were."""
    inputs: list[str] = field(default_factory=list)
    """--input, with `instructions`: each prompt's input section, by position ('' or none given: no input section)."""
    data: str | None = None
    data_cfg: DataConfig | None = None
    split: str = "train"
    limit: int | None = None
    sampling: Sampling = field(default_factory=Sampling)
    batch_size: int = 8
    task: int | None = None
    """--task: every prompt's task id (multitask prompt tuning); without it, --data rows' own `task`."""
    adapters: list[tuple[str, str]] = field(default_factory=list)
    """Named adapters (--adapter NAME=DIR) loaded together on the base; `source.adapter` is the first."""
    route: str | None = None
    """The data column naming each row's adapter (--route): one mixed batch, each row through its own."""
    arrow: ArrowSettings | None = None
    """--arrow: route each token among the named adapters (`NamedAdapters.arrow`); `general` names GenKnowSub's."""
    general: list[str] = field(default_factory=list)
    start: str | None = None
    """The title of a recipe's start where the source is it (adapter.init_from: `peftkit.start_eval.from_the_start`),
    said on generate's first line."""

    def build_prompts(self, tok) -> list[Prompt]:
        if self.data:
            return load_prompts(tok, self.data, self.split, self.data_cfg, self.limit,
                                tasks=self.task is None and adapter_task_count(self.source) is not None,
                                targets=False)  # --task: the rows' column is not read at all
        if self.chat:  # (opened with the recipe's data.system_prompt, as its training conversations were)
            system = self.data_cfg.system_prompt if self.data_cfg is not None else None
            opening = [{"role": "system", "content": system}] if system is not None else []
            return [chat_prompt(tok, [*opening, {"role": "user", "content": p}]) for p in self.prompts]
        if self.instructions:  # (an alpaca row's prompt: its input section where `input` is not empty)
            inputs = self.inputs or [""] * len(self.prompts)
            return [text_prompt(tok, prompt_and_target_text({"instruction": p, "input": i}, "alpaca")[0])
                    for p, i in zip(self.prompts, inputs, strict=True)]
        return [text_prompt(tok, p) for p in self.prompts]


def generate_job(recipe: Path | None, overrides: list[str], model: str | None, adapter: str | None,
                 prompts: list[str], data: str | None, fmt: str | None, chat: bool, limit: int | None,
                 sampling: Sampling, batch_size: int, trust_remote_code: bool = False,
                 task: int | None = None, adapters: list[tuple[str, str]] | None = None,
                 route: str | None = None, split: str | None = None, data_revision: str | None = None,
                 arrow: ArrowSettings | None = None, general: list[str] | None = None,
                 inputs: list[str] | None = None) -> GenerateJob:
    """The `peftkit generate` arguments as one job. A recipe (or run directory) gives the model, the adapter
    (a run's adapter/), the data format and, without --prompt or --data, data.eval's prompts. `adapters`: named
    adapters (instead of `adapter`), each row of --data picking one by its `route` column. `split`, `data_revision`:
    what is read of a hub dataset given as `data` (`hub_data_flags`). `arrow`: Arrow routing among the named adapters
    (all but the `general` ones, GenKnowSub's). `inputs`: --input, each --prompt's alpaca input section."""
    sampling.check()
    adapters = adapters or []
    check_arrow(adapters, arrow, general or [], route)
    _check_route(adapters, route, data, arrow is not None)
    adapter = adapters[0][1] if adapters else adapter
    if prompts and data:
        raise PeftkitError("Give --prompt or --data, not both.")
    if prompts and limit is not None:
        raise PeftkitError("--limit takes the first N rows of --data (or of a run's data.eval); with --prompt, give "
                           "the prompts you want.")
    if prompts and fmt is not None and (fmt != "alpaca" or chat):
        raise PeftkitError(f"--format {fmt} says how --data rows (or a run's data.eval) are read; --prompt is used as "
                           "given (--chat wraps it as a user turn in the chat template, --format alpaca as an "
                           f"instruction in the alpaca template): drop --format{' or --chat' * chat}.")
    if chat and not prompts:  # the prompts of --data, or of a recipe's data.eval: their format decides
        source = f"{recipe}'s data.eval" if recipe and not data else "--data"
        raise PeftkitError(f"--chat applies to --prompt: with the prompts of {source}, the data's format decides (chat "
                           "rows are rendered with the chat template already). Drop --chat, or give --prompt TEXT.")
    check_choices(fmt, None)
    _check_inputs(inputs or [], prompts, fmt)
    source, cfg, start = model_source(recipe, overrides, model, adapter, trust_remote_code, "generate")
    run = recipe if cfg is not None else _run_of(adapter)  # (a run's --adapter RUN_DIR: its recipe.yaml says)
    if prompts and not chat and fmt is None:
        _warn_if_untemplated(run, cfg.data if cfg is not None else _run_data(run), prompts, source.adapter)
    job = GenerateJob(source=source, prompts=prompts, chat=chat, instructions=bool(prompts) and fmt == "alpaca",
                      limit=limit, sampling=sampling, batch_size=batch_size, task=task, adapters=adapters, route=route,
                      arrow=arrow, general=list(general or []), inputs=list(inputs or []), start=start)
    if cfg is not None:
        job.data_cfg = cfg.data
        if not prompts and not data:
            if not cfg.data.eval:
                raise PeftkitError(f"{recipe} has no data.eval to take prompts from; pass --prompt TEXT or --data FILE.")
            name, primary = next(iter(cfg.data.eval_sources().items()))  # data.eval's first (or only) set
            job.data, job.split, job.data_cfg = primary.path, primary.split, cfg.data.for_eval(name)
    if data:
        job.data, job.split = data, "train"
        if job.data_cfg is not None:  # the recipe's datasets' revision and a list entry's own columns and format
            job.data_cfg = job.data_cfg.reading(data)
    if job.data:
        job.data_cfg = (job.data_cfg or DataConfig(train=job.data)).model_copy(update={"format": fmt} if fmt else {})
        job.data_cfg._flags = ("--format",)  # errors name it beside data.format (generate has no --on-bad-rows)
        if fmt or cfg is None:  # errors name the flag, not a recipe key (data.format, an entry's), or no recipe's
            job.data_cfg._format_key = "--format"
        if cfg is None:  # nothing skips a bad row: no data.on_bad_rows to set
            job.data_cfg._on_bad_rows_key = ""
    elif not prompts:
        raise PeftkitError("Nothing to generate from: pass --prompt TEXT (repeatable) or --data FILE.")
    job.split, job.data_cfg = hub_data_flags(data, split, data_revision, job.data_cfg, job.split)
    return job


def _check_inputs(inputs: list[str], prompts: list[str], fmt: str | None) -> None:
    """--input is the alpaca input section of the --prompt at its place: one per prompt, with --format alpaca."""
    if not inputs:
        return
    if not prompts or fmt != "alpaca":
        raise PeftkitError(f"--input {inputs[0]!r} is the input section of an alpaca prompt: give it with --prompt "
                           "TEXT and --format alpaca (--data rows hold their own input).")
    if len(inputs) != len(prompts):
        raise PeftkitError(f"{len(prompts)} --prompt and {len(inputs)} --input given: each --input is the input of the "
                           "--prompt at its place, so give one per --prompt (--input '' for a prompt without one).")


def check_arrow(adapters: list[tuple[str, str]], arrow: ArrowSettings | None, general: list[str],
                 route: str | None) -> None:
    """--arrow routes among NAME=DIR adapters (--general names some of them), not with --route."""
    if arrow is None:
        if general:
            raise PeftkitError(f"--general {general[0]} names a GenKnowSub adapter of Arrow routing: pass --arrow too.")
        return
    if route is not None:
        raise PeftkitError("--arrow routes each token among the adapters, --route each row to one: give one of them.")
    names = [name for name, _ in adapters]
    if not adapters or any(name not in names for name in general):
        missing = next((name for name in general if name not in names), None)
        raise PeftkitError("--arrow routes among named adapters: pass them as --adapter NAME=DIR"
                           + (f" (--general {missing} names none of them)." if missing else "."))


def _run_of(adapter: str | None) -> Path | None:
    """The training run whose adapter/ `adapter` is (`--adapter RUN_DIR` reads RUN_DIR/adapter), else None."""
    path = Path(adapter) if adapter else None
    if path is not None and path.name == "adapter" and (path.parent / "recipe.yaml").is_file():
        return path.parent
    return None


def _run_data(run: Path | None) -> DataConfig | dict | None:
    """The data section of a run's recipe.yaml (which records every key set) as `generate RUN_DIR` reads it, its
    inputs where they lie now in a project moved with its run (`rundir.moved_project`), so that its rows can be read
    (`_conversation_pairs`); the section as written where the file is no recipe; None where there is none to read."""
    import yaml
    from pydantic import ValidationError

    from peftkit.recipe import Recipe
    from peftkit.rundir import moved_project

    try:
        raw = yaml.safe_load((run / "recipe.yaml").read_text())
        data = raw["data"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):  # (run None: TypeError)
        return None
    try:  # (as checkpoint.py reads it back: no path resolved, nothing fetched)
        return moved_project(Recipe.model_validate(raw), run)[0].data
    except (ValidationError, PeftkitError, ValueError, TypeError):
        return data


def _warn_if_untemplated(run: Path | None, cfg: DataConfig | dict | None, prompts: list[str],
                         adapter: str | None = None) -> None:
    """Warn where --prompt, used as given, is outside the template a run's prompts were trained in: its conversations'
    chat template (an instruct model often answers bare text with its end of turn at once), or alpaca's (a prompt
    holding its `### Instruction:` already is left alone). `cfg`: a recipe's data section, or a run's recipe.yaml's
    as read (`_run_data`); `adapter`: the adapter directory that loads, a run's adapter/ beside its manifest.json."""
    data = cfg.model_dump() if isinstance(cfg, DataConfig) else cfg
    if said := _chat_key(data) or _recorded_pairs(data, adapter) or (
            _conversation_pairs(cfg) if isinstance(cfg, DataConfig) else None):
        warnings.warn(f"{run} trains on conversations ({said}), and --prompt is used as given, outside the chat "
                      "template: pass --chat to give it as a user turn, as training's prompts were.",
                      PeftkitWarning, stacklevel=3)
    elif isinstance(data, dict) and data.get("format") == "alpaca" and not any("### Instruction:" in p for p in prompts):
        warnings.warn(f"{run} trains on alpaca rows (data.format: alpaca), and --prompt is used as given, outside "
                      "their template: pass --format alpaca to give it as an instruction, as training's prompts "
                      "were.", PeftkitWarning, stacklevel=3)


def _chat_key(data: dict | None) -> str | None:
    """The key saying a data section trains on conversations, with its value: `data.format: chat`, or the first entry
    of a data.train list mixing conversations with other rows (`data.train[1].format: chat`); None where none does."""
    if not isinstance(data, dict):
        return None
    if data.get("format") == "chat":
        return "data.format: chat"
    train = data.get("train")
    return next((f"data.train[{i}].format: chat" for i, entry in enumerate(train if isinstance(train, list) else [])
                 if isinstance(entry, dict) and entry.get("format") == "chat"), None)


def _recorded_pairs(data: dict | None, adapter: str | None) -> str | None:
    """`data.format: preference` (or unpaired) said with its rows' form where the run whose adapter/ `adapter` is
    records them as conversations (manifest.json's `data_form`): read offline, as a hub dataset's rows are not; None
    where it records text rows, or nothing (another directory, a run from before it was recorded)."""
    import json

    try:
        form = json.loads((Path(adapter).parent / "manifest.json").read_text()).get("data_form")
    except (OSError, ValueError, TypeError, AttributeError):  # (no adapter: TypeError; no manifest: OSError)
        return None
    fmt = data.get("format") if isinstance(data, dict) else None
    return f"data.format: {fmt}, its rows conversations (manifest.json's data_form)" if form == "chat" else None


def _conversation_pairs(data: DataConfig) -> str | None:
    """`data.format: preference` (or unpaired) said with its rows' form where data.train's first usable row, read from
    local files as validate reads it (not tokenized), is a conversation; None otherwise (text pairs, a hub dataset)."""
    from peftkit.model_checks import first_row_form
    from peftkit.recipe import is_local_dataset

    if data.format not in ("preference", "unpaired") or not all(is_local_dataset(s.path) for s in data.train_sources()):
        return None
    try:
        chat = first_row_form(data, data.train, data.train_split) == "chat"
    except PeftkitError:  # (unreadable rows: train says so)
        return None
    return f"data.format: {data.format}, its rows conversations" if chat else None


def _check_route(adapters: list[tuple[str, str]], route: str | None, data: str | None, arrow: bool = False) -> None:
    """--route picks among named adapters, per row of --data; several adapters need it (or --arrow)."""
    if route is not None and not adapters:
        raise PeftkitError(f"--route {route}: name the adapters it picks from, e.g. --adapter sql=DIR --adapter chat=DIR.")
    if route is not None and not data:
        raise PeftkitError(f"--route {route} reads a column of each --data row; pass --data FILE.")
    if len(adapters) > 1 and route is None and not arrow:
        raise PeftkitError(f"{len(adapters)} --adapter given: pass --data FILE --route COLUMN, the column naming each "
                           "row's adapter (empty or 'base': the base model), or give one --adapter.")


def row_routes(prompts: list[Prompt], column: str, names: list[str], data: str | None) -> list[str | None]:
    """Each prompt's adapter name from its row's `column` (None: the base), checked before the model loads."""
    from peftkit.adapters.named import BASE_NAMES

    routes: list[str | None] = []
    for i, prompt in enumerate(prompts):
        row = prompt.row or {}
        where = prompt.where or f"row {i + 1} of {data}"  # (the row's own line: rows skipped before it are not counted)
        if column not in row:
            raise PeftkitError(f"--route {column}: {where} has no {column!r} column (it has: "
                               f"{', '.join(row) or 'none'}).")
        value = row[column]
        if value is None or value in BASE_NAMES:
            routes.append(None)
        elif isinstance(value, str) and value in names:
            routes.append(value)
        else:
            raise PeftkitError(f"--route {column}: {where} names adapter {value!r}, which no --adapter "
                               f"NAME=DIR gives (given: {', '.join(names)}; empty or 'base' for the base model).")
    return routes


def _in_own_templates(job: GenerateJob, prompts: list[Prompt], routes: list[str | None]) -> list[Prompt]:
    """Each routed row's prompt as it is built alone with its adapter (or the base): in the chat template that adapter
    carries (a run's adapter/chat_template.jinja; the base's own for a base row), unless a recipe's data.chat_template
    sets one for all. `build_prompts` renders every row with the first adapter's tokenizer, so another adapter's rows
    were asked in a template it never trained on. The rows are read again for each other template, matched by place."""
    dirs = dict(job.adapters)
    first = job.source.tokenizer()
    tok_of = {name: job.source.routed_tokenizer(dirs.get(name)) for name in dict.fromkeys(routes)}
    own = {id(tok): {p.where: p for p in job.build_prompts(tok)}
           for tok in {id(t): t for t in tok_of.values() if t is not first}.values()}
    return [p if tok_of[r] is first else own[id(tok_of[r])][p.where]
            for p, r in zip(prompts, routes, strict=True)]


def warn_arrow_templates(source: ModelSource, adapters: list[tuple[str, str]], renders=None,
                         reorder: bool = True) -> None:
    """Arrow picks the adapters per token inside the model, so a prompt is rendered in one chat template for all: the
    one `source.tokenizer()` reads (generate's, chat's: the first --adapter's; eval's arrow row: the base row's, or
    its first task adapter's) unless a recipe's data.chat_template sets one. Where the named adapters carry others (a run's
    adapter/chat_template.jinja, data.chat_template; none: the base tokenizer's own), those are not used, which was
    silent: said, naming them and how to choose. `renders(tok)`: the prompts as that tokenizer renders them
    (generate's rows: alpaca or plain prompts use no template), None: a conversation. `reorder`: whether naming
    another adapter first renders in its template (generate, chat: not eval's arrow row)."""
    from peftkit.data.chat_templates import ADAPTER_TEMPLATE, adapter_template

    if source.chat_template is not None or len(adapters) < 2:
        return
    used = source.tokenizer()
    tok = {name: source.routed_tokenizer(path) for name, path in adapters}
    other = [name for name, t in tok.items() if t.chat_template != used.chat_template]
    if not other or (renders is not None and not _rendered_otherwise(renders, used, [tok[n] for n in other])):
        return
    paths = dict(adapters)

    def carried(name: str) -> str:
        return (f"{Path(paths[name]) / ADAPTER_TEMPLATE}" if adapter_template(paths[name]) is not None
                else "the base tokenizer's own")

    named = next((name for name, path in adapters if path == source.adapter), None)  # None: the base row's
    in_use = (f"{named}'s" + ", the first --adapter's" * (named == adapters[0][0]) + f" ({carried(named)})" if named
              else "the base row's (the base tokenizer's own)")
    warnings.warn(f"--arrow routes each token among adapters whose chat templates differ, and every prompt is "
                  f"rendered in {in_use}, not in " + ", ".join(f"{n}'s ({carried(n)})" for n in other)
                  + ". To prompt in another, give a recipe or run directory whose data.chat_template sets it for all "
                  "(or --set data.chat_template=NAME|FILE with one)" + ", or name that adapter first" * reorder + ".",
                  PeftkitWarning, stacklevel=2)


def _rendered_otherwise(renders, used, others: list) -> bool:
    """Whether any of the `others` tokenizers renders a prompt of `renders` otherwise than `used` (or cannot: a base
    without a chat template)."""
    texts = [p.text for p in renders(used)]
    try:
        return any([p.text for p in renders(t)] != texts for t in others)
    except PeftkitError:
        return True


def run_generate(job: GenerateJob, on_batch=None) -> list[dict]:
    """Generate for every prompt of `job`: [{"prompt", "completion"} (+ "reference", the row's target, for
    --data; + "adapter" with --route)]. The prompts (and their tasks and routes) are built before the model loads,
    so a data mistake is reported in seconds."""
    tok = job.source.tokenizer()
    prompts = job.build_prompts(tok)
    if not prompts:
        raise PeftkitError(f"{job.data} has no usable rows to take prompts from.")
    routes = row_routes(prompts, job.route, [n for n, _ in job.adapters], job.data) if job.route else None
    if job.arrow is not None:
        warn_arrow_templates(job.source, job.adapters, job.build_prompts)
    if routes is not None:
        prompts = _in_own_templates(job, prompts, routes)
    prompts = with_tasks(job.source, job.task, prompts, job.data)
    route, routing = None, nullcontext()
    if job.adapters:
        model, named = job.source.load_named(job.adapters)
        named.activate(job.adapters[0][0])  # one adapter, no --route: that adapter for every row
        if job.arrow is not None:  # (one block for every batch: each layer's prototypes computed once)
            routing = named.arrow([name for name, _ in job.adapters if name not in job.general], job.general,
                                  job.arrow)
        elif routes is not None:
            def route(batch: list[int]) -> AbstractContextManager:
                return named.routed([routes[i] for i in batch])
    else:
        model = job.source.load()
    guard_token_ids(model, tok)
    with routing:
        texts = generate_texts(model, tok, prompts, job.sampling, job.batch_size, on_batch, route)
    return [{"prompt": p.text, "completion": t} | ({"reference": p.reference} if p.reference is not None else {})
            | ({"adapter": routes[i] or "base"} if routes is not None else {})
            for i, (p, t) in enumerate(zip(prompts, texts, strict=True))]
