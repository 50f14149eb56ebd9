"""`peftkit report RUN_DIR`: a self-contained `report.html` (plots embedded) and the plots as PNG files, from
what a run wrote: metrics.jsonl (the curves), manifest.json (base vs fine-tuned, environment) and recipe.yaml.

    RUN_DIR/report/report.html   open anywhere: images inline, no scripts, no network
    RUN_DIR/report/*.png         loss (train and eval), eval metrics (eval.metrics), learning rate, grad norm,
                                 tokens/s, peak memory

Plots are drawn with matplotlib's Agg backend (no display needed). Reading needs no model and no GPU.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import math
import os
import re
from pathlib import Path

from peftkit import start_eval
from peftkit.errors import PeftkitError
from peftkit.fileio import atomic_directory, locked_directory
from peftkit.manifest import read_manifest
from peftkit.metrics import CLASSIFICATION_METRICS, GENERATION_METRICS, PREFERENCE_METRICS, REWARDS

REPORT_DIR = "report"
# (file stem, title, metrics.jsonl key of the training lines, y label)
CURVES = [
    ("lr", "Learning rate", "lr", "lr"),
    ("grad_norm", "Gradient norm (before clipping)", "grad_norm", "norm"),
    ("throughput", "Throughput", "tokens_per_s", "tokens / s"),
    ("memory", "Peak memory", "peak_mem_mb", "MiB"),
]


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training lines, eval lines) of RUN_DIR/metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if run_dir.is_file():
        raise PeftkitError(f"{run_dir} is a file: give the run directory that holds it ({run_dir.parent}).")
    if not path.is_file():
        if not run_dir.exists():  # (it was said to have no metrics.jsonl, as an existing directory is)
            raise PeftkitError(f"{run_dir} does not exist: give a peftkit run directory (a recipe's export.output_dir).")
        if (run_dir.parent / "metrics.jsonl").is_file():  # its adapter/, merged/ or report/
            raise PeftkitError(f"{run_dir} is inside the run directory {run_dir.parent}: give that directory.")
        raise PeftkitError(f"{run_dir} has no metrics.jsonl: give a peftkit run directory (`peftkit train` writes one).")
    rows = []
    text = _read_text(path)
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines) and not text.endswith("\n"):
                break  # the partial last line of a killed run (fileio.append_line), or of one writing it now
            raise PeftkitError(f"{path}:{number} is not a JSON line; the file is damaged.") from None
        # A line that parses but is not one peftkit writes (edited by hand, or another tool's) was a KeyError
        # traceback (no step), or a curve of strings drawn as categories.
        row = rows[-1]
        if not (isinstance(row, dict) and _number(row.get("step")) and all(
                _number(row[key]) or row[key] is None and key in _CURVE_KEYS for key in _PLOTTED if key in row)
                and all(_number(row[key]) for key in _other_set_losses(row))):
            raise PeftkitError(f"{path}:{number} is not a peftkit metrics line (a JSON object with a numeric step and "
                               "numeric values); the file is damaged.")
    return [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]


def _read_text(path: Path) -> str:
    """A run's text file (peftkit writes UTF-8); one that is not, damaged or not peftkit's, is an error naming it, not
    a UnicodeDecodeError traceback."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PeftkitError(f"{path} is not UTF-8 text (at byte {e.start}); the file is damaged.") from None


_CURVE_KEYS = tuple(key for _, _, key, _ in CURVES)
EVAL_CURVES = (*GENERATION_METRICS, *CLASSIFICATION_METRICS, PREFERENCE_METRICS[0], "kl")
"""The evaluations' metrics the eval metrics plot draws, each a share or score of 0 to 1 (a DPO run's reward
accuracy; its margin and rewards have scales of their own: the report's table shows them)."""
_PLOTTED = ("loss", "eval_loss", *_CURVE_KEYS, *(f"eval_{m}" for m in EVAL_CURVES))
"""The metrics.jsonl keys that `plot_curves` draws: each a number (a skipped step's loss NaN); a `CURVES` one may be
null (not measured at that step)."""


def _other_set_losses(row: dict) -> list[str]:
    """The `eval_<name>_loss` keys of an evaluation's line or the run's metrics: data.eval's other sets, drawn and
    shown beside the primary set's `eval_loss`."""
    return [key for key in row if isinstance(key, str) and key.startswith("eval_") and key.endswith("_loss")
            and key != "eval_loss"]


FEW_POINTS = 20
"""A curve of at most this many points is drawn with a dot at each (a run of one step has one point: no line)."""


def _curve(ax, steps: list, values: list, fmt: str = "-", **style) -> None:
    """A curve against whole steps; short ones with their points marked."""
    from matplotlib.ticker import MaxNLocator

    few = len(steps) <= FEW_POINTS and "o" not in fmt
    ax.plot(steps, values, fmt, **({"marker": "o", "markersize": 3.5} if few else {}) | style)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # steps are whole: no 0.96-1.04 ticks


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


SMOOTH_FROM = 200
"""From this many logged training steps on, the loss plot adds the losses' moving average (over a 50th of them)."""


def moving_average(values: list[float], window: int) -> list[float]:
    """Each value's mean with the `window - 1` before it (fewer at the start), over the finite ones only (a skipped
    step's NaN loss leaves no hole beyond itself); NaN where a window holds none."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    finite = np.isfinite(v)
    sums = np.concatenate([[0.0], np.cumsum(np.where(finite, v, 0.0))])
    counts = np.concatenate([[0], np.cumsum(finite)])
    end = np.arange(1, len(v) + 1)
    start = np.maximum(0, end - window)
    n = counts[end] - counts[start]
    return np.where(n > 0, (sums[end] - sums[start]) / np.maximum(n, 1), np.nan).tolist()


def plot_curves(train: list[dict], evals: list[dict], log_scale: bool) -> dict[str, bytes]:
    """PNG bytes by file stem: the loss plot, and one per recorded training curve."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    plots = {}
    fig, ax = plt.subplots(figsize=(7, 3.6))
    steps, losses = [r["step"] for r in train], [r["loss"] for r in train]
    if len(losses) < SMOOTH_FROM:
        _curve(ax, steps, losses, label="train loss", linewidth=1.2)
    else:  # thousands of noisy per-step losses are a solid band: drawn faint, under their moving average
        window = max(2, len(losses) // 50)
        _curve(ax, steps, losses, label="train loss", linewidth=0.8, alpha=0.3, color="C0")
        _curve(ax, steps, moving_average(losses, window), label=f"train loss, mean of the last {window}",
               linewidth=1.6, color="C0")
    if evals:
        _curve(ax, [r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss", linewidth=1.5,
               color="C1")
    for i, key in enumerate(dict.fromkeys(key for r in evals for key in _other_set_losses(r))):  # data.eval's others
        points = [(r["step"], r[key]) for r in evals if key in r]
        _curve(ax, *zip(*points, strict=True), "o--", label=f"eval loss, {key[5:-5]}", linewidth=1.2,
               color=f"C{2 + i % 8}")  # (C0, C1: the train and primary eval losses)
    ax.set(xlabel="step", ylabel="loss", title="Loss", yscale="log" if log_scale else "linear")
    ax.grid(alpha=0.3)
    ax.legend()
    plots["loss"] = _png(fig)
    plt.close(fig)
    metric_curves = {m: [(r["step"], r[f"eval_{m}"]) for r in evals if f"eval_{m}" in r] for m in EVAL_CURVES}
    if any(metric_curves.values()):
        fig, ax = plt.subplots(figsize=(7, 3.0))
        for metric, points in metric_curves.items():
            if points:
                _curve(ax, *zip(*points, strict=True), "o-", label=metric, linewidth=1.5)
        generated = any(metric_curves[m] for m in GENERATION_METRICS)
        pairs, kto = bool(metric_curves[PREFERENCE_METRICS[0]]), bool(metric_curves["kl"])
        ax.set(xlabel="step", ylabel="mean over eval rows" if generated else "over eval pairs" if pairs else
               "over eval answers" if kto else "over eval rows", title="Eval metrics (greedy answers)" if generated
               else "Eval metrics (answer pairs)" if pairs else "Eval metrics (KTO's KL estimate)" if kto else
               "Eval metrics (classes)")
        ax.grid(alpha=0.3)
        ax.legend()
        plots["eval_metrics"] = _png(fig)
        plt.close(fig)
    for stem, title, key, ylabel in CURVES:
        points = [(r["step"], r[key]) for r in train if r.get(key) is not None]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(7, 3.0))
        _curve(ax, *zip(*points, strict=True), linewidth=1.2)
        ax.set(xlabel="step", ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
        plots[stem] = _png(fig)
        plt.close(fig)
    return plots


def _table(rows: list[tuple[str, str, str]], before: str = "base") -> str:
    cells = "".join(f"<tr><th>{html.escape(a)}</th><td>{html.escape(b)}</td><td>{html.escape(c)}</td></tr>"
                    for a, b, c in rows)
    return f"<table><tr><th></th><th>{html.escape(before)}</th><th>fine-tuned</th></tr>{cells}</table>"


def metrics_rows(metrics: dict, classifier: bool) -> list[tuple[str, str, str]]:
    """Eval loss and perplexity (a classifier's loss has none), and the eval.metrics (a classifier's accuracy and
    macro-F1), before training (the base model's, or an adapter.init_from run's start's: `peftkit.start_eval`) and of
    the fine-tuned model."""
    before = start_eval.prefix(metrics)
    base, tuned = metrics.get(f"{before}loss"), metrics.get("eval_loss")

    def fmt(value: float | None) -> str:  # a manifest from elsewhere may hold anything: shown as its text
        return "" if value is None else f"{value:.4f}" if _number(value) else str(value)

    pairs = f"eval_{PREFERENCE_METRICS[0]}" in metrics or "eval_kl" in metrics  # DPO's, KTO's: no token's loss
    base_ppl = fmt(math.exp(min(base, 700.0)) if _number(base) else base)
    perplexity = [] if classifier or pairs else [("eval perplexity", base_ppl, fmt(metrics.get("eval_perplexity")))]
    return [("eval loss", fmt(base), fmt(tuned)), *perplexity] + [
        (metric.replace("_", " "), fmt(metrics.get(f"{before}{metric}")), fmt(metrics.get(f"eval_{metric}")))
        for metric in (*GENERATION_METRICS, *CLASSIFICATION_METRICS, *PREFERENCE_METRICS, *REWARDS, "kl")
        if f"eval_{metric}" in metrics]


STYLE = ("body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;color:#222}"
         "table{border-collapse:collapse;margin:1rem 0}th,td{border:1px solid #ccc;padding:.3rem .7rem;text-align:right}"
         "pre{background:#f6f6f6;padding:1rem;overflow:auto}img{max-width:100%}"
         "table.samples{table-layout:fixed;width:100%}"
         "td.text{text-align:left;vertical-align:top;white-space:pre-wrap;overflow-wrap:anywhere}")
_BIDI_CONTROLS = re.compile("[\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _text_cell(value: object) -> str:
    """A sample's text as a table cell: as written (newlines kept, long words broken), each bidirectional control
    character shown as its code point (`<U+202E>`), not obeyed: it would reverse the text after it."""
    shown = _BIDI_CONTROLS.sub(lambda m: f"<U+{ord(m.group()):04X}>", str(value or ""))
    return f"<td class='text'>{html.escape(shown)}</td>"


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shown(value: object, float_format: str = "") -> str:
    """A manifest's value as HTML text: a number formatted (whole ones with thousands separators), anything else as
    its text, escaped. A manifest may come from elsewhere: its values are never markup (a `<script>` in one ran when
    the report was opened), nor need they be numbers where peftkit writes numbers."""
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, float) and float_format:
        return html.escape(format(value, float_format))
    return html.escape(str(value))


def render_html(run_dir: Path, plots: dict[str, bytes], manifest: dict | None, recipe_text: str) -> str:
    metrics = (manifest or {}).get("metrics", {})
    if run_dir.name in ("", ".."):  # `peftkit report .` titled the page "peftkit report: " and named the run "."
        run_dir = run_dir.resolve()
    classifier = _recipe_value(recipe_text, "model", "task") == "sequence_classification"
    images = "".join(f'<figure><img alt="{stem}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
                     f"</figure>" for stem, data in plots.items())
    facts = [("steps", metrics.get("steps")), ("trainable parameters", metrics.get("trainable_params")),
             ("tokens", metrics.get("tokens")), ("elapsed (s)", metrics.get("elapsed_s")),
             ("steps skipped for a non-finite loss or gradients (training.nan_policy, the fp16 loss scaler)",
              metrics.get("skipped_steps") or None)]
    fact_rows = "".join(f"<li>{html.escape(k)}: {_shown(v, '.1f')}</li>" for k, v in facts if v is not None)
    if metrics.get("resumed_at_step") is not None:
        fact_rows += (f"<li>resumed at step {_shown(metrics['resumed_at_step'])}: elapsed time and peak memory are the "
                      "resumed process's</li>")
    if metrics.get("stopped_early"):
        fact_rows += "<li>stopped early (training.early_stopping)</li>"
    if isinstance(best := metrics.get("best"), dict):
        fact_rows += (f"<li>exported adapter: the best {_shown(best.get('metric'))} ({_shown(best.get('value'), '.4f')}), "
                      f"at step {_shown(best.get('step'))} (export.best); the fine-tuned column is that evaluation</li>")
    environment = json.dumps((manifest or {}).get("environment", {}), indent=2)
    samples = metrics.get("samples") or []
    # A manifest from elsewhere: samples that are not a list of objects are shown as text (an AttributeError before).
    samples = [s if isinstance(s, dict) else {"prompt": s} for s in (samples if isinstance(samples, list) else [samples])]
    # The base model's column only where it answered (eval.base_model): an empty cell reads as an empty answer.
    # An init_from run's answers before training are its start's (`start`), titled so.
    key, before = start_eval.sample_key(samples), start_eval.prefix(metrics)
    start = start_eval.title(True, _recipe_value(recipe_text, "adapter", "init_from"))
    columns = {"prompt": "prompt", "reference": "reference"} | (
        {key: start if key == "start" else "base model"} if any(key in s for s in samples) else {}) | {
        "fine_tuned": "fine-tuned"}
    sample_rows = "".join("<tr>" + "".join(_text_cell(s.get(k)) for k in columns) + "</tr>" for s in samples)
    headers = "".join(f"<th>{html.escape(name)}</th>" for name in columns.values())  # (init_from's name: the recipe's)
    sample_table = (f"<h2>Generations (greedy)</h2><table class='samples'><tr>{headers}</tr>{sample_rows}</table>"
                    if samples else "")
    # (a report is drawn of a run still training too: "did not finish" said it had stopped)
    status = "" if manifest else ("<p><b>No manifest.json: the run has not finished (it is still training, or it "
                                  "stopped); the curves show what it has logged.</b></p>")
    def fmt(value: object) -> str:  # as metrics_rows shows a figure (its table escapes the text)
        return "" if value is None else f"{value:.4f}" if _number(value) else str(value)

    rows = metrics_rows(metrics, classifier) + [  # data.eval's other sets
        (f"eval loss, {key[5:-5]}", fmt(metrics.get(f"{before}{key[5:]}")), fmt(metrics.get(key)))
        for key in _other_set_losses(metrics)]
    # A table of empty cells read as results missing by mistake: say why there are none.
    first = start if before == start_eval.START else "base"
    evaluation = _table(rows, first) if any(base or tuned for _, base, tuned in rows) else (
        "<p>None recorded yet: the run has not finished (the evaluations it has logged, if any, are drawn with the "
        "loss).</p>" if manifest is None else "<p>None: the run evaluated nothing (its recipe has no data.eval).</p>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>peftkit report: {html.escape(run_dir.name)}"
            f"</title><style>{STYLE}</style></head><body><h1>peftkit run {html.escape(str(run_dir))}</h1>{status}"
            f"<ul>{fact_rows}</ul><h2>Evaluation</h2>{evaluation}{sample_table}<h2>Curves</h2>{images}"
            f"<h2>Recipe</h2><pre>{html.escape(recipe_text)}</pre>"
            f"<h2>Environment</h2><pre>{html.escape(environment)}</pre></body></html>")


def _recipe_value(recipe_text: str, section: str, key: str) -> object:
    """`section.key` of a run's resolved recipe.yaml (model.task, adapter.init_from; None where there is none, or it
    does not read)."""
    import yaml

    try:
        recipe = yaml.safe_load(recipe_text)
    except yaml.YAMLError:
        return None
    values = recipe.get(section) if isinstance(recipe, dict) else None
    return values.get(key) if isinstance(values, dict) else None


def write_report(run_dir: Path, log_scale: bool = False, output: Path | None = None) -> Path:
    """Write RUN_DIR/report/ (or `output`: report.html and the PNGs) as a whole; returns the html file.

    A report of a run still training may be drawn while the run finishes and writes its own final report: it is
    then drawn again from the finished run rather than put over the final one."""
    run_dir = Path(run_dir)
    out = None
    while True:
        finished = _finished(run_dir)
        train, evals = read_metrics(run_dir)  # (what is not a run is said first)
        if out is None and output is None:  # a user's file there, or notes kept in it, were deleted with the old report
            default, fix = run_dir / REPORT_DIR, "Move them out, or write the report elsewhere with --output DIR."
            if default.exists() and not default.is_dir():
                raise PeftkitError(f"{default} is a file, where the report's directory goes. {fix.replace('them', 'it')}")
            _check_only_a_report(default, str(default), fix)
        out = out or (check_report_output(output, run_dir) if output is not None else run_dir / REPORT_DIR)
        _check_writable(out.parent, out)  # before drawing
        plots, page = _render(run_dir, train, evals, log_scale)
        with locked_directory(run_dir):  # one report put in place at a time (a training holds the run's own lock)
            if _finished(run_dir) == finished:
                with atomic_directory(out) as tmp:
                    for stem, data in plots.items():
                        (tmp / f"{stem}.png").write_bytes(data)
                    # backslashreplace: a lone surrogate (JSON "\ud83d" in a manifest from elsewhere) is no UTF-8
                    (tmp / "report.html").write_text(page, encoding="utf-8", errors="backslashreplace")
                return out / "report.html"


def check_report_output(output: Path, run_dir: Path) -> Path:
    """`--output`, resolved, when writing the report there (which replaces that directory as a whole) deletes nothing
    peftkit did not write: a new directory, or one holding only an earlier report; never the run directory, a
    directory above it or inside it (but its own report/), or the current directory or one above it."""
    from peftkit.fileio import resolved
    from peftkit.rundir import make_writable_dir

    out, run, cwd = resolved(output, "--output"), resolved(run_dir, "RUN_DIR"), Path.cwd().resolve()
    instead = f"Name a new directory, e.g. --output {run.parent / (run.name + '-report')}."
    if out == cwd or out in cwd.parents:
        raise PeftkitError(f"--output {out} is the current directory or one above it; the report replaces its "
                           f"directory as a whole. {instead}")
    if out == run or out in run.parents:
        raise PeftkitError(f"--output {out} is the run directory {run}{' or holds it' if out != run else ''}; the "
                           f"report replaces its directory as a whole, which would delete the run. {instead}")
    if run in out.parents and out != run / REPORT_DIR:
        raise PeftkitError(f"--output {out} is inside the run directory {run}, whose files its manifest.json lists. "
                           f"{instead}")
    make_writable_dir(out.parent, "--output's parent")
    if out.exists() and not out.is_dir():
        raise PeftkitError(f"--output {out} is a file. {instead}")
    _check_only_a_report(out, f"--output {out}", instead)
    return out


def _check_only_a_report(out: Path, what: str, instead: str) -> None:
    """Refuse a report directory that holds files an earlier report did not write: writing replaces it as a whole."""
    if out.is_dir() and (others := sorted(e.name for e in out.iterdir()
                                          if e.name != "report.html" and not e.name.endswith(".png"))):
        listed = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise PeftkitError(f"{what} holds files that are not a report's ({listed}); the report replaces its "
                           f"directory as a whole. {instead}")


def _check_writable(parent: Path, out: Path) -> None:
    """Refuse, before drawing, a report directory whose parent cannot be written (read-only storage, permissions)."""
    if parent.is_dir() and not os.access(parent, os.W_OK):
        read_only = bool(os.statvfs(parent).f_flag & os.ST_RDONLY)
        why = "read-only file system" if read_only else f"permission denied ({parent} is not writable by this user)"
        raise PeftkitError(f"{out}: {why}. Write the report elsewhere with --output DIR.")


def _render(run_dir: Path, train: list[dict], evals: list[dict], log_scale: bool) -> tuple[dict[str, bytes], str]:
    """The plots (PNG bytes by stem) and the html page of what the run has written so far (`read_metrics`)."""
    if not train:
        raise PeftkitError(f"{run_dir}/metrics.jsonl has no training step yet; nothing to plot.")
    manifest_path = run_dir / "manifest.json"
    # Checked as verify checks it: a damaged manifest is an error naming it, not a traceback.
    manifest = read_manifest(run_dir).model_dump(mode="json") if manifest_path.is_file() else None
    recipe_path = run_dir / "recipe.yaml"
    recipe_text = _read_text(recipe_path) if recipe_path.is_file() else "(no recipe.yaml)"
    plots = plot_curves(train, evals, log_scale)
    return plots, render_html(run_dir, plots, manifest, recipe_text)


def _finished(run_dir: Path) -> tuple[int, int] | None:
    """Which finish of the run its manifest.json records (None: not finished), told apart by inode and mtime (a
    manifest is written once per finish, by a rename)."""
    with contextlib.suppress(OSError):  # (not there; or RUN_DIR a file, which reading it says)
        stat = (run_dir / "manifest.json").stat()
        return stat.st_ino, stat.st_mtime_ns
    return None
