"""`peftkit eval --adapter a=DIR --adapter b=DIR [--merged c=DIR]`: the base and each candidate evaluated on
the same rows with the same metrics, in one table with each metric's difference from the base, the trainable
parameters and the adapter's size on disk."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from rich.table import Table
from rich.text import Text

from peftkit.data.tokenized import PastVocabulary
from peftkit.errors import PeftkitError, visible
from peftkit.eval_job import EvalJob, set_predictions
from peftkit.evaluate import evaluate
from peftkit.inspect_text import size_text
from peftkit.recipe import ModelConfig

BASE = "base"
ARROW = "arrow"
"""The row of `peftkit eval --arrow`: the adapters routed per token."""
_NAME = re.compile(r"^([A-Za-z0-9_.-]+)=(.+)$")


def split_named(value: str, flag: str = "--adapter") -> tuple[str, str] | None:
    """(NAME, DIR) of a `NAME=DIR` value; None for a bare DIR. A path that exists is a DIR whatever '=' it holds (a
    sweep's `lr=2e-4/adapter`); one that does not, with an empty NAME or DIR (`a=`, `=run/adapter`), is an error."""
    if Path(value).expanduser().exists():
        return None
    match = _NAME.match(value)
    name, _, path = value.partition("=")
    if match is None and "=" in value and not (name.strip() and path.strip()):
        raise PeftkitError(f"{flag} {value!r}: {'the NAME' if not name.strip() else 'the DIR'} of NAME=DIR is empty; "
                           f"give both, e.g. {flag} tuned=runs/a/adapter.")
    if match is None and "=" in value and "/" not in name:
        raise PeftkitError(f"{flag} {value!r}: a NAME holds only letters, digits, '_', '.' and '-' "
                           f"(e.g. {flag} {re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}={path}).")
    return None if match is None else (match.group(1), match.group(2))


def _dir_name(value: str) -> str:
    """The name of a bare DIR's row: its directory's name, with what a NAME may not hold as '_' (a space, brackets:
    `my run` was refused as a name the user never chose, after the base had loaded)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(value).name).strip("_") or "adapter"


def parse_named(values: list[str], flag: str, taken: list[str] = ()) -> list[tuple[str, str]]:
    """`NAME=DIR` values of a repeatable flag (a bare DIR is named after its directory), names unique among them,
    the base's and `taken` (another flag's rows)."""
    named = []
    for value in values:
        named.append(split_named(value, flag) or (_dir_name(value), value))
    names = [BASE, *taken] + [n for n, _ in named]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise PeftkitError(f"{flag}: the name {repeated[0]!r} is used twice (or is the base's row, or another flag's); "
                           "name each one, "
                           f"e.g. {flag} a=DIR {flag} b=DIR.")
    return named


def comparison_jobs(job: EvalJob, adapters: list[tuple[str, str]], merged: list[tuple[str, str]]) -> dict[str, EvalJob]:
    """One job per row: the base model, each adapter on it, each merged model; all on `job`'s data and metrics.
    (`eval_job` has made sure of a base: a recipe's model, --model, or the one the candidates record,
    `peftkit.compare_base`.) --task goes to the adapters that read task ids only (multitask prompt tuning): the base,
    merged models and other methods' adapters are compared on the same rows without one; a --task that no adapter
    reads is an error."""
    from peftkit.task_ids import adapter_task_count

    base = replace(job.source, adapter=None)
    jobs = {BASE: replace(job, source=_with_their_template(base, [path for _, path in adapters]), task=None)}
    reading = False
    for name, path in adapters:
        source = replace(base, adapter=path)
        source.check_adapter_task()
        reads = adapter_task_count(source) is not None
        reading |= reads
        jobs[name] = replace(job, source=source, task=job.task if reads else None)
    if job.task is not None and not reading:
        raise PeftkitError(f"--task {job.task}: only a multitask prompt tuning or Poly adapter reads a task id, and none of "
                           "the compared adapters is one; drop --task.")
    for name, path in merged:
        jobs[name] = replace(job, task=None, source=replace(base, model=ModelConfig(name_or_path=path, dtype="auto"),
                                                            quantization=None, model_from_recipe=False))
    return jobs


def _with_their_template(base, adapters: list[str]):
    """The base row's source: where neither a recipe nor the base's tokenizer gives a chat template and every adapter
    carries the one it was trained with (a run's adapter/chat_template.jinja, data.chat_template), with that template,
    as `peftkit eval --adapter DIR` evaluates each of them. The base row of a base model's comparison on conversations
    was refused for the template it lacked, which no flag could give it."""
    from peftkit.data.chat_templates import adapter_template

    templates = {adapter_template(path) for path in adapters}
    if base.chat_template is not None or len(templates) != 1 or None in templates:
        return base
    return base if base.tokenizer().chat_template else replace(base, chat_template=templates.pop())


def compare(jobs: dict[str, EvalJob], predictions_dir: Path | None = None, arrow=None) -> dict[str, dict]:
    """Each row's metrics (and, for an adapter, its trainable parameters and size on disk), by row name;
    `predictions_dir` gets NAME.jsonl per row when the metrics generate.

    The base and the adapters are evaluated in one loaded model, each adapter activated in turn
    (`peftkit.adapters.named`): the base loads once, as the adapters were trained on it (re-quantized as they
    were). A merged model loads on its own; so does each adapter of a classifier (its head is the model's class),
    and one that does not share its base (`sharing.ALONE`: KaSA truncates it, layer_replication stacks it...).
    `arrow`, (ArrowSettings, task adapters, general adapters): a last row, ARROW, of the shared model routing each
    token among the task adapters (`NamedAdapters.arrow`)."""
    return compare_sets({None: jobs}, predictions_dir, arrow)[None]


def compare_sets(sets: dict[str | None, dict[str, EvalJob]], predictions_dir: Path | None = None,
                 arrow=None) -> dict[str | None, dict[str, dict]]:
    """`compare` on each of a recipe's data.eval sets (`comparison_jobs` of each set's job: the same rows, on its
    data): each set's rows' figures, by set name. Every model loads once for all the sets: the shared one
    evaluates each set with each adapter active, a merged model (or an adapter loaded alone) is evaluated on every
    set by `evaluate_sets`. `predictions_dir`: each row's answers on each set, in `prediction_file`."""
    from peftkit.adapters.sharing import loads_alone
    from peftkit.evaluate import evaluate_sets

    rows = next(iter(sets.values()))  # every set has the same rows (models)
    if rows[BASE].data_cfg.format in ("preference", "unpaired"):  # scored against one reference: the base's
        from peftkit.compare_preference import compare_preference

        return compare_preference(sets, arrow)
    adapters = {name: job.source.adapter for name, job in rows.items() if job.source.adapter}
    alone = {name: key for name, path in adapters.items() if (key := loads_alone(path))}
    adapters = {name: path for name, path in adapters.items() if name not in alone}
    if arrow is not None and rows[BASE].data_cfg.format == "classification":
        raise PeftkitError("--arrow routes a causal LM's adapters; a classifier's load one at a time.")
    if arrow is not None and (odd := next((n for n in arrow[1] + arrow[2] if n in alone), None)):
        raise PeftkitError(f"--arrow routes plain LoRA adapters, and {odd!r} sets {alone[odd]}; compare it without "
                           "--arrow, or leave it out.")
    shared = None
    if adapters and rows[BASE].data_cfg.format != "classification":
        shared = rows[BASE].source.load_named(list(adapters.items()))
        if arrow is not None:  # ranks, layers, methods: refused before any row is evaluated (or predictions written)
            shared[1].check_arrow(arrow[1], arrow[2], arrow[0])
            _warn_arrow_templates(rows, arrow[1], [jobs[BASE] for jobs in sets.values()])
    results = {each: {} for each in sets}
    for name, job in rows.items():
        on = {each: _row_job(jobs[name], name, each, predictions_dir) for each, jobs in sets.items()}
        try:
            if shared is not None and (name in adapters or (name == BASE and not base_adds_tokens(job))):
                shared[1].activate(name if name in adapters else None)
                figures = {each: evaluate(row_job, shared[0]) for each, row_job in on.items()}
            elif len(on) > 1:
                figures = evaluate_sets(on)  # the model loads once, for every set
            else:
                figures = {each: evaluate(row_job) for each, row_job in on.items()}
        except PastVocabulary as e:  # (tokenized rows)
            raise (_base_lacks_tokens(e, rows) if name == BASE else e) from None
        info = _adapter_figures(job)
        for each in sets:
            results[each][name] = figures[each] | info
    if arrow is not None:
        settings, tasks, general = arrow
        with shared[1].arrow(tasks, general, settings):
            for each, jobs in sets.items():
                results[each][ARROW] = evaluate(_row_job(_arrow_job(jobs, tasks), ARROW, each, predictions_dir),
                                                shared[0])
    return results


def _arrow_job(jobs: dict[str, EvalJob], tasks: list[str]) -> EvalJob:
    """The job whose data the arrow row reads: the base row's, but the first task adapter's where the base row is the
    recipe's model with model.add_tokens (the adapters' tokens, not the recipe's: the shared base has no rows for
    them)."""
    return jobs[tasks[0]] if base_adds_tokens(jobs[BASE]) else jobs[BASE]


def _warn_arrow_templates(rows: dict[str, EvalJob], tasks: list[str], bases: list[EvalJob]) -> None:
    """`peftkit.generate.warn_arrow_templates` for the arrow row, whose conversations (data.format chat: no other
    format eval routes renders a template) are read in the base row's template, or its first task adapter's.
    `bases`: each data.eval set's base row."""
    from peftkit.generate import warn_arrow_templates

    if any(job.data_cfg.format == "chat" for job in bases):
        adapters = [(name, job.source.adapter) for name, job in rows.items() if job.source.adapter]
        warn_arrow_templates(_arrow_job(rows, tasks).source, adapters, reorder=False)


def base_adds_tokens(job: EvalJob) -> bool:
    """Whether the base row's model is the recipe's with model.add_tokens: its tokenizer and embeddings have the
    new tokens (the run's base evaluation), which the base the adapters share lacks (an adapter that added them loads
    alone, and one that did not is evaluated with its base's tokenizer), so the base row loads on its own. On the
    shared base, the recipe's tokenizer gave token ids past its embeddings (an error, where the data used them)."""
    model = job.source.model
    return bool(model is not None and model.add_tokens)


def _base_lacks_tokens(error: PastVocabulary, rows: dict[str, EvalJob]) -> PeftkitError:
    """The base row's error for a tokenized row with an id past its tokenizer's, where adapters compared with it were
    trained with tokens added (`peftkit.new_tokens.adapter_tokens`), which it lacks: said as the base row's, with why
    and what to do (the bare bad row's error, `error`, where none was)."""
    from peftkit.new_tokens import adapter_tokens

    base = rows[BASE].source
    base_cfg = base.model or ModelConfig(name_or_path=base.base)
    adding = [f"adapter '{name}' ({job.source.adapter}) {', '.join(tokens)}" for name, job in rows.items()
              if job.source.adapter and (tokens := adapter_tokens(job.source.adapter, base_cfg))]
    if not adding:
        return error
    problem = error.problem.partition(" (")[0]  # (not its guess, "tokenized with another tokenizer?")
    return PeftkitError(
        f"{error.where}: {problem}, in the comparison's base row ({base.base}): the compared adapters were trained with "
        f"tokens added to its tokenizer ({'; '.join(adding)}), which the base row reads the data without, and this row "
        "holds one. Compare on rows the base's tokenizer reads (without those ids), or leave the base row out by "
        "evaluating each such adapter on its own: peftkit eval --adapter DIR --data FILE (one --adapter, no NAME=).")


def _row_job(job: EvalJob, name: str, eval_set: str | None, predictions_dir: Path | None) -> EvalJob:
    """`job` as the comparison's row `name` on `eval_set` (None: the one data): progress lines name the row (and the
    set), and its predictions go to `prediction_file`."""
    job = replace(job, name=name if eval_set is None else f"{name} on {eval_set}")
    return job if predictions_dir is None else replace(job, predictions=prediction_file(predictions_dir, name,
                                                                                        eval_set))


def prediction_file(predictions_dir: Path, name: str, eval_set: str | None) -> Path:
    """Where a comparison writes row `name`'s answers: DIR/NAME.jsonl; on data.eval's set `eval_set` of several,
    DIR/NAME.SET.jsonl (`set_predictions`)."""
    path = predictions_dir / f"{name}.jsonl"
    return path if eval_set is None else set_predictions(path, eval_set)


def _adapter_figures(job: EvalJob) -> dict:
    """An adapter row's trainable parameters and size on disk (none for the base or a merged model)."""
    from peftkit.inspect import inspect_adapter

    if not job.source.adapter:
        return {}
    info = inspect_adapter(Path(job.source.adapter))
    return {"trainable_params": info["trainable_params"], "adapter_bytes": info["size_on_disk"]}


def comparison_table(results: dict[str, dict], metrics: list[str], eval_set: str | None = None) -> Table:
    """Rows as given; per metric, its value and (but for the base) the difference from the base; `eval_set`: the
    data.eval set the rows were evaluated on, named in the title. Every column is as wide as its widest cell: a
    table wider than the output (a pipe or a log is 80 columns) runs on rather than cut a number to `-3.03…`."""
    shown = [m for m in metrics if m in results[BASE]]
    headers = ["model", *(h for metric in shown for h in (metric, "Δ")), "trainable", "adapter size"]
    rows = []
    for name, row in results.items():
        cells = [visible(name)]  # (measured as shown: a control character is shown as `\x1b`)
        for metric in shown:
            value, base = row[metric], results[BASE][metric]  # None: a KTO margin of no undesirable answers
            cells += ["n/a" if value is None else f"{value:.4f}",
                      "" if name == BASE or value is None or base is None else f"{value - base:+.4f}"]
        rows.append(cells + [f"{row['trainable_params']:,}" if "trainable_params" in row else "",
                             size_text(row["adapter_bytes"]) if "adapter_bytes" in row else ""])
    on = "" if eval_set is None else f" on {eval_set}"
    table = Table(title=f"peftkit eval: comparison{on} (Δ = row - base)")
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i == 0 else "right", no_wrap=True,
                         min_width=max(len(header), *(len(cells[i]) for cells in rows)))
    for name, *cells in rows:  # a row named after its directory (`sweep[lr=2e-4]`) is text, not rich markup
        table.add_row(Text(name), *cells)
    return table
