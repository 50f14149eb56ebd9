"""What `peftkit eval` (`peftkit.cli.model_commands.eval_cmd`) does around its jobs: the comparison's flags and its
table, a recipe's several data.eval sets, the outputs checked apart from the inputs and from each other, and the
figures printed and written."""

from __future__ import annotations

from pathlib import Path

from peftkit.cli.application import said_beside
from peftkit.cli.options import Inputs, adapter_path, check_json_out, check_merged, check_not_input, job_inputs, local_path
from peftkit.errors import PeftkitError


def comparison_flags(adapters: list[str], merged: list[str], comparing: bool, settings, general: list[str]
                     ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(the --adapter NAME=DIR, the --merged NAME=DIR) of a comparison, parsed and checked with --arrow's `settings`
    (None without it) and --general; ([], those --merged) when not `comparing`."""
    from peftkit.compare import ARROW, parse_named
    from peftkit.generate import check_arrow

    if settings is not None and not (comparing and adapters):
        raise PeftkitError("--arrow routes among named adapters: pass them as --adapter NAME=DIR.")
    named = parse_named(adapters, "--adapter") if comparing else []
    named_merged = parse_named(merged, "--merged", [n for n, _ in named])
    check_merged(named_merged)
    check_arrow(named, settings, general, None)  # (a hub adapter is fetched once the flags are right)
    if settings is not None and ARROW in [n for n, _ in named + named_merged]:
        raise PeftkitError(f"--arrow adds a row named {ARROW!r} to the comparison: name that adapter otherwise.")
    return named, named_merged


def check_outputs(outputs, inputs: Inputs) -> None:
    """Each (path, flag) of `outputs` given (not None) is no input's file or directory (`check_json_out`)."""
    for path, flag in outputs:
        if path is not None:
            check_json_out(path, flag, inputs)


def several_sets(job, job_of, predictions: Path | None, recipe: Path, json_out: Path | None, inputs: Inputs) -> dict:
    """{set name: its job} of the recipe's several data.eval sets (`job`: the first's; `job_of(data, predictions,
    eval_set=NAME)`: another's, with the same flags), each writing its own --predictions file (`predictions`: None in
    a comparison, whose files `compare` names). `inputs` is extended with every set's data, which no output may be."""
    own = _set_predictions(predictions, job.eval_sets, recipe)
    job.predictions = own[job.eval_sets[0]]
    sets = {job.eval_sets[0]: job} | {name: job_of(None, own[name], eval_set=name) for name in job.eval_sets[1:]}
    for each in list(sets.values())[1:]:  # nor may an output be (inside) another set's data
        inputs += job_inputs(each)
    check_outputs(((json_out, "--json"), *((own[name], "--predictions") for name in job.eval_sets)), inputs)
    for name, path in own.items():
        if path is not None:
            check_apart(json_out, path, f"the --predictions file of {name}, {path},")
    return sets


def evaluate_and_print(job, sets: dict, json_out: Path | None, predictions: Path | None) -> None:
    """`peftkit eval` of one model: `job`, or each of the several data.eval `sets` (the model loaded once for all);
    the figures printed, and written to --json."""
    from peftkit.evaluate import evaluate, evaluate_sets
    from peftkit.fileio import atomic_write_json

    if job.start:  # (a recipe's adapter.init_from: `eval_job._from_the_start`)
        from peftkit.start_eval import said

        said_beside(json_out, predictions).print(said(job.start), markup=False, highlight=False, soft_wrap=True)
    if sets:
        results = evaluate_sets(sets)  # the model loads once, for every set
        for name, result in results.items():
            said_beside(json_out).print(f"{name}: {_shown(result, job.metrics)}")
        if json_out:
            atomic_write_json(json_out, results)
        return
    result = evaluate(job)
    said_beside(json_out, predictions).print(_shown(result, job.metrics))
    if json_out:
        atomic_write_json(json_out, result)


def _set_predictions(predictions: Path | None, names: list[str], recipe: Path) -> dict[str, Path | None]:
    """--predictions of data.eval's sets `names` (several): a file each, the set's name before the suffix (preds.jsonl:
    preds.NAME.jsonl, `set_predictions`), by set name; None each without it. A stream (/dev/stdout) is refused: the
    sets' lines would run together, none saying its set."""
    from peftkit.eval_job import set_predictions
    from peftkit.fileio import special_file

    if predictions is not None and special_file(predictions):
        raise PeftkitError(f"--predictions {predictions}: {recipe}'s data.eval has {len(names)} sets "
                           f"({', '.join(names)}), whose answers go to a file each (FILE.NAME.jsonl); give a file "
                           "name, or --data FILE of one set.")
    return {name: None if predictions is None else set_predictions(predictions, name) for name in names}


def _shown(result: dict, metrics: list[str]) -> str:
    """One evaluation's figures as `peftkit eval` prints them: `loss 1.2345  perplexity 3.436  tokens 120  ...`."""
    shown = []
    if "perplexity" in result:
        shown.append(f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}  tokens {result['num_tokens']}")
    elif "num_pairs" in result:  # preference pairs: the DPO loss, the rewards follow
        shown.append(f"loss {result['loss']:.4f}  pairs {result['num_pairs']}")
    elif "kl" in result:  # unpaired answers: the KTO loss, the rewards and the KL estimate follow
        shown.append(f"loss {result['loss']:.4f}  answers {result['num_examples']}")
    elif "loss" in result:  # a classifier: cross-entropy per row, accuracy and macro_f1 follow
        shown.append(f"loss {result['loss']:.4f}  rows {result['num_examples']}")
    shown += [f"{name} {'n/a' if result[name] is None else format(result[name], '.4f')}" for name in metrics
              if name in result and name not in ("loss", "perplexity")]  # None: a KTO margin without both kinds
    if "num_rows" in result:
        left = result.get("rows_left_out", 0)
        shown.append(f"rows {result['num_rows']}" + (f" ({left} left out, as the loss leaves them out: the answer "
                                                      "past max_length, or cut under truncation: drop)" if left else ""))
    return "  ".join(shown)


def compare(sets: dict, named: list[tuple[str, str]], merged: list[tuple[str, str]], predictions: Path | None,
             json_out: Path | None, arrow=None, general: list[str] = (), inputs: Inputs = ()) -> None:
    """`peftkit eval` with several --adapter NAME=DIR (and --merged NAME=DIR), as parsed: one table against the base
    per data.eval set of `sets` ({set name: its job}; {None: the job} for one data); with `arrow` (ArrowSettings), a
    row of Arrow routing among them too (`general`: GenKnowSub's). `inputs`: what no --predictions file may be
    (`check_not_input`)."""
    from peftkit.compare import ARROW, BASE, compare_sets, comparison_jobs, comparison_table, prediction_file
    from peftkit.fileio import atomic_write_json
    from peftkit.rundir import make_writable_dir

    named = [(n, adapter_path(p, f"--adapter {n}={p}")) for n, p in named]
    named_merged = [(n, local_path(p)) for n, p in merged]
    routing = (arrow, [n for n, _ in named if n not in general], list(general)) if arrow is not None else None
    made = predictions is not None and not predictions.exists()
    if predictions is not None:
        if predictions.suffix.lower() in (".jsonl", ".json") and not predictions.is_dir():
            raise PeftkitError(f"--predictions {predictions}: a comparison writes one NAME.jsonl per model, into a "
                               f"directory; give a directory (e.g. --predictions {predictions.with_suffix('')}).")
        check_not_input(predictions, "--predictions", inputs)
        for name in [BASE, *(n for n, _ in named + named_merged), *([ARROW] if arrow is not None else [])]:
            for each in sets:  # (None: the one data; else each data.eval set's file)
                path = prediction_file(predictions, name, each)
                check_not_input(path, "--predictions", inputs, f"{predictions}: the comparison's {path.name}")
                check_apart(json_out, path, f"the --predictions file of {name}, {path},")
        make_writable_dir(predictions, "--predictions (in a comparison, a directory)")
    try:
        results = compare_sets({each: comparison_jobs(job, named, named_merged) for each, job in sets.items()},
                               predictions, routing)
    except BaseException:  # an error or Ctrl-C before any model's predictions: no empty directory left behind
        if made and not any(predictions.iterdir()):
            predictions.rmdir()
        raise
    metrics = next(iter(sets.values())).metrics
    for each, rows in results.items():
        said_beside(json_out).print(comparison_table(rows, metrics, each))
    if json_out:  # by set name, as `peftkit eval` of several sets writes its figures; one data's: by row name
        atomic_write_json(json_out, results if None not in results else results[None])


def check_apart(json_out: Path | None, predictions: Path, which: str) -> None:
    """--json must not name a file --predictions writes: the JSON, written last, replaced the predictions unsaid."""
    from peftkit.fileio import special_file

    if json_out is None or special_file(json_out):  # /dev/stdout: both are written into the stream
        return
    if json_out.expanduser().resolve() == predictions.expanduser().resolve():
        raise PeftkitError(f"--json {json_out} is {which} too: the metrics would replace the predictions. Give --json "
                           "another path.")
