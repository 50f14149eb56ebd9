"""`peftkit report RUN_DIR`: the PNGs are real plots of the run's curves, report.html embeds them and holds the
base vs fine-tuned table, and a real headless browser (Debian's Chromium) renders the plots."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from rich.console import Console

from peftkit.errors import PeftkitError
from peftkit.recipe import load_recipe
from peftkit.report import read_metrics, write_report
from peftkit.train import train
from tests.conftest import make_recipe

PNG = b"\x89PNG\r\n\x1a\n"
# matplotlib's first line colour, (31, 119, 180): the train loss and every single curve. Anti-aliasing blends a
# thin line with the white around it, so a pixel counts as the curve's where blue exceeds red by a margin (the
# grid, text and frame are grey or black).


@pytest.fixture(scope="module")
def run(tiny_llama, number_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    recipe = make_recipe(root, tiny_llama, number_data, training={"max_steps": 4, "eval_steps": 2})
    train(load_recipe(recipe), console=Console(quiet=True))
    return root / "run"


def _blue_pixels(png: bytes) -> int:
    import io

    import matplotlib.image

    pixels = matplotlib.image.imread(io.BytesIO(png), format="png")[..., :3] * 255
    return int((pixels[..., 2] - pixels[..., 0] > 50).sum())


def test_report_files(run):
    page = write_report(run)
    assert page == run / "report" / "report.html"
    pngs = {p.stem: p.read_bytes() for p in (run / "report").glob("*.png")}
    assert set(pngs) == {"loss", "lr", "grad_norm", "throughput", "memory"}
    drawn = {stem: data.startswith(PNG) and _blue_pixels(data) for stem, data in pngs.items()}
    assert all(n > 50 for n in drawn.values()), drawn  # a drawn curve each
    text = page.read_text()
    embedded = [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', text)]
    assert sorted(embedded) == sorted(pngs.values())  # self-contained: the same images, inline
    import json

    metrics = json.loads((run / "manifest.json").read_text())["metrics"]
    assert f"<td>{metrics['base_eval_loss']:.4f}</td><td>{metrics['eval_loss']:.4f}</td>" in text
    # (the images' base64 left out: "http" turns up in one by chance, in about 1 run in 100, as the speed plot varies)
    page_text = re.sub(r"data:image/png;base64,[^\"]+", "", text.split("<h2>Environment</h2>")[0])
    assert "<script" not in text and "http" not in page_text.replace("http-equiv", "")


def test_a_directory_without_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(PeftkitError, match="has no metrics.jsonl: give a peftkit run directory"):
        write_report(tmp_path)
    # A path that does not exist, or the run's adapter/, was said to have no metrics.jsonl, as any directory is.
    with pytest.raises(PeftkitError, match=r"nothing does not exist: give a peftkit run directory \(a recipe's "
                                           r"export.output_dir\)\.$"):
        write_report(tmp_path / "nothing")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (tmp_path / "adapter").mkdir()
    said = f"{tmp_path}/adapter is inside the run directory {tmp_path}: give that directory."
    with pytest.raises(PeftkitError, match=f"^{re.escape(said)}$"):
        write_report(tmp_path / "adapter")


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_a_browser_renders_the_plots(run, tmp_path):
    page = write_report(run)
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2400",
                    page.as_uri()], check=True, capture_output=True, timeout=120)
    assert _blue_pixels(shot.read_bytes()) > 500  # the plots' curves are on screen, not broken images


def test_a_run_writes_its_report(tiny_llama, number_data, tmp_path):
    """export.report (on by default): the run ends with report/ written, the summary names it, and `verify`
    still vouches for the run (the report is not among the hashed exports, which stay adapter/ and merged/)."""
    import io

    from peftkit.verify import verify

    out = io.StringIO()
    recipe = make_recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 2}, export={"report": True})
    train(load_recipe(recipe), console=Console(file=out, width=300))
    page = tmp_path / "run" / "report" / "report.html"
    assert page.is_file() and "<h2>Curves</h2>" in page.read_text()
    assert re.search(r"^  report\.html\s+" + re.escape(str(page)) + "$", out.getvalue(), re.M)  # the summary's line
    assert verify(tmp_path / "run", console=Console(quiet=True)).ok


def test_a_damaged_or_empty_metrics_file_is_a_clear_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "eval_loss": 2.0}\n')
    with pytest.raises(PeftkitError, match="metrics.jsonl has no training step yet; nothing to plot"):
        write_report(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(PeftkitError, match=r"metrics.jsonl:2 is not a JSON line; the file is damaged"):
        write_report(tmp_path)
    # A line that reads as JSON but is not one peftkit writes was a KeyError traceback (no step), or a curve of
    # strings drawn as categories.
    for line in ('{"loss": 1.0}', '{"step": 2, "loss": "x"}', '["loss"]', '{"step": 2, "eval_loss": null}'):
        (tmp_path / "metrics.jsonl").write_text(f'{{"step": 1, "loss": 2.0}}\n{line}\n')
        with pytest.raises(PeftkitError, match=r"metrics.jsonl:2 is not a peftkit metrics line \(a JSON object with a "
                                               r"numeric step and numeric values\); the file is damaged"):
            write_report(tmp_path)
    # Bytes that are not UTF-8 were a UnicodeDecodeError traceback, in metrics.jsonl or in recipe.yaml.
    (tmp_path / "metrics.jsonl").write_bytes(b'{"step": 1, "loss": 2.0}\n\xff\n')
    with pytest.raises(PeftkitError, match=r"metrics.jsonl is not UTF-8 text \(at byte 25\); the file is damaged"):
        write_report(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (tmp_path / "recipe.yaml").write_bytes(b"model: {name_or_path: caf\xe9}\n")
    with pytest.raises(PeftkitError, match=r"recipe.yaml is not UTF-8 text \(at byte 25\); the file is damaged"):
        write_report(tmp_path)
    (tmp_path / "recipe.yaml").unlink()
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": NaN, "grad_norm": null}\n')  # a skipped step's
    assert read_metrics(tmp_path)[0][0]["grad_norm"] is None
    # A partial last line is what a killed run leaves (fileio.append_line), or one writing it now: left out. It was
    # refused as damage, and `peftkit report` of such a run (documented to work on unfinished runs) failed.
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert read_metrics(tmp_path) == ([{"step": 1, "loss": 2.0}], [])
    assert write_report(tmp_path).is_file()


def test_a_report_replaces_only_an_earlier_report(run, tmp_path, monkeypatch, capsys):
    """RUN_DIR/report/ is replaced as a whole: a user's notes kept there, or a file named `report`, were deleted
    without a word. They are refused, as --output refuses a directory holding files that are not a report's."""
    from tests.conftest import cli_user_error

    copy = shutil.copytree(run, tmp_path / "run")
    write_report(copy)
    (copy / "report" / "notes.md").write_text("mine")
    said = cli_user_error(monkeypatch, capsys, "report", str(copy))
    assert (f"{copy}/report holds files that are not a report's (notes.md); the report replaces its directory as a "
            "whole. Move them out, or write the report elsewhere with --output DIR.") in said
    assert (copy / "report" / "notes.md").read_text() == "mine"
    shutil.rmtree(copy / "report")
    (copy / "report").write_text("mine")
    said = cli_user_error(monkeypatch, capsys, "report", str(copy))
    assert (f"{copy}/report is a file, where the report's directory goes. Move it out, or write the report elsewhere "
            "with --output DIR.") in said
    assert (copy / "report").read_text() == "mine"


def test_a_report_drawn_while_the_run_finishes_does_not_replace_the_final_one(run, tmp_path, monkeypatch):
    """`peftkit report RUN` of a run still training, drawn while the run finished: it was put in place after the
    run's own final report, which then said "the run did not finish" (and a report's PNGs were put in place one by
    one, so two reports at once could mix). Now it is drawn again from the finished run."""
    from peftkit import report

    copy = shutil.copytree(run, tmp_path / "run")
    manifest = (copy / "manifest.json").read_bytes()
    (copy / "manifest.json").unlink()
    shutil.rmtree(copy / "report", ignore_errors=True)
    real, calls = report.plot_curves, []

    def the_run_finishes_meanwhile(*args):
        calls.append(args)
        if len(calls) == 1:  # while the user's report draws the unfinished run, the run writes its manifest and report
            (copy / "manifest.json").write_bytes(manifest)
            assert "No manifest.json" not in write_report(copy).read_text(encoding="utf-8")
        return real(*args)

    monkeypatch.setattr(report, "plot_curves", the_run_finishes_meanwhile)
    page = write_report(copy).read_text(encoding="utf-8")
    assert "No manifest.json" not in page and len(calls) == 3  # drawn again, from the finished run
    assert not list(copy.glob(".*.tmp"))  # no temporary left


def test_a_damaged_manifest_is_a_clear_error(run, tmp_path):
    """A bare json.loads gave report a JSONDecodeError (or, for `[1, 2]`, an AttributeError) traceback."""
    copy = shutil.copytree(run, tmp_path / "run")
    for text, problem in (('{"truncated', "is not valid JSON"), ("[1, 2]", "holds an array, not the JSON object")):
        (copy / "manifest.json").write_text(text)
        with pytest.raises(PeftkitError, match=problem):
            write_report(copy)


def test_a_manifest_s_values_are_text_in_the_report_never_markup(run, tmp_path):
    """A manifest from elsewhere put `<script>` into report.html (metrics.resumed_at_step, metrics.best.step, which
    verify passes over as varying), and a text where a number belongs was a ValueError traceback."""
    import json

    copy = shutil.copytree(run, tmp_path / "run")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["metrics"] |= {"resumed_at_step": "<script>alert(1)</script>", "steps": "six", "eval_loss": "<b>x</b>",
                            "base_eval_loss": "low", "best": {"metric": "eval_loss", "value": "<i>", "step": "<img src=x onerror=alert(2)>"}}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    page = write_report(copy).read_text(encoding="utf-8")
    assert "<script>" not in page and "<img src=x" not in page and "<b>x" not in page and "<i>" not in page
    assert "resumed at step &lt;script&gt;alert(1)&lt;/script&gt;" in page and "steps: six" in page
    assert "at step &lt;img src=x onerror=alert(2)&gt;" in page
    # Samples that are not a list of objects were an AttributeError (or TypeError) traceback: shown as text.
    from peftkit.report import render_html

    for samples, shown in (("<s>", "&lt;s&gt;"), ([None, 7], "7"), ({"prompt": "p"}, "p")):
        page = render_html(copy, {}, {"metrics": {"samples": samples}}, "")
        assert f"<tr><td class='text'>{shown}</td><td class='text'></td>" in page
    # A lone surrogate (JSON "\ud83d", half an emoji) has no UTF-8: writing the page was a UnicodeEncodeError.
    manifest["metrics"]["samples"] = [{"prompt": "half \ud83d", "fine_tuned": "ok"}]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert "<td class='text'>half \\ud83d</td>" in write_report(copy).read_text(encoding="utf-8")


def test_a_file_given_for_the_run_directory_says_so(run):
    with pytest.raises(PeftkitError, match=r"metrics.jsonl is a file: give the run directory that holds it"):
        write_report(run / "metrics.jsonl")


@pytest.mark.filterwarnings("ignore:No artists with labels")  # (the stand-in draws none)
def test_a_long_run_s_loss_is_drawn_with_its_moving_average(monkeypatch):
    """20k noisy per-step losses drew a solid band; from SMOOTH_FROM logged steps on, their trailing moving average
    is drawn over them (NaN losses, skipped steps, left out of it)."""
    import math
    import random

    from peftkit import report

    rng = random.Random(0)
    losses = [2.0 - i / 1000 + rng.uniform(-0.5, 0.5) for i in range(1000)]
    losses[10] = losses[11] = float("nan")
    window = 20
    for i, got in enumerate(report.moving_average(losses, window)):
        kept = [x for x in losses[max(0, i - window + 1):i + 1] if not math.isnan(x)]
        assert got == pytest.approx(sum(kept) / len(kept), rel=1e-12), i
    assert math.isnan(report.moving_average([float("nan"), 1.0], 1)[0])

    drawn = []
    monkeypatch.setattr(report, "_curve", lambda ax, steps, values, fmt="-", **style: drawn.append(style.get("label")))
    train = [{"step": i + 1, "loss": x} for i, x in enumerate(losses)]
    report.plot_curves(train[:report.SMOOTH_FROM - 1], [], False)
    assert drawn == ["train loss"]  # fewer steps: the losses alone
    drawn.clear()
    report.plot_curves(train, [], False)
    assert drawn == ["train loss", "train loss, mean of the last 20"]


def test_a_one_step_run_s_curves_are_drawn_and_sample_text_is_shown_as_written(tmp_path):
    """A curve of one point was an invisible line: a run of one step (or log_steps >= max_steps) had empty plots. A
    sample's newlines are kept, and a bidirectional control character is shown, not obeyed."""
    from peftkit.report import plot_curves, render_html

    one = [{"step": 1, "loss": 4.8, "lr": 0.01, "grad_norm": 2.6, "tokens_per_s": 4713.0, "peak_mem_mb": 451.7}]
    drawn = {stem: _blue_pixels(data) for stem, data in plot_curves(one, [], False).items()}
    assert set(drawn) == {"loss", "lr", "grad_norm", "throughput", "memory"} and min(drawn.values()) > 10, drawn
    sample = {"prompt": "### Instruction:\nSay \u202ehi\n\n### Response:\n", "reference": "x" * 300, "base": "<b>",
              "fine_tuned": "ok"}
    page = render_html(tmp_path, {}, {"metrics": {"samples": [sample], "skipped_steps": 2, "resumed_at_step": 33}}, "")
    assert "<li>resumed at step 33: elapsed time and peak memory are the resumed process's</li>" in page
    assert ("<td class='text'>### Instruction:\nSay &lt;U+202E&gt;hi\n\n### Response:\n</td>" in page
            and "\u202e" not in page and "<td class='text'>&lt;b&gt;</td>" in page)
    assert "white-space:pre-wrap;overflow-wrap:anywhere" in page
    assert ("<li>steps skipped for a non-finite loss or gradients (training.nan_policy, the fp16 loss scaler): 2</li>"
            in page)


def test_a_run_without_the_base_model_s_answers_has_no_base_column(tmp_path):
    """With eval.base_model: false the samples hold no base answer: the report showed a "base model" column of empty
    cells, which read as the base model answering nothing. The column is left out, as the terminal's table does."""
    from peftkit.report import render_html

    sample = {"prompt": "p", "reference": "r", "fine_tuned": "f"}
    page = render_html(tmp_path, {}, {"metrics": {"samples": [sample]}}, "")
    assert ("<table class='samples'><tr><th>prompt</th><th>reference</th><th>fine-tuned</th></tr><tr><td class='text'>"
            "p</td><td class='text'>r</td><td class='text'>f</td></tr></table>") in page
    page = render_html(tmp_path, {}, {"metrics": {"samples": [sample | {"base": ""}]}}, "")  # an empty answer: shown
    assert ("<th>base model</th><th>fine-tuned</th></tr><tr><td class='text'>p</td><td class='text'>r</td>"
            "<td class='text'></td>") in page


def test_a_report_of_the_current_directory_names_the_run(run, tmp_path, monkeypatch):
    """`peftkit report .` titled the page "peftkit report: " and headed it "peftkit run .": a report passed on named
    no run. The current directory (or its parent, `..`) is named by its path."""
    copy = shutil.copytree(run, tmp_path / "run")
    monkeypatch.chdir(copy)
    page = write_report(Path(".")).read_text()
    assert "<title>peftkit report: run</title>" in page and f"<h1>peftkit run {copy.resolve()}</h1>" in page


def test_a_run_without_an_evaluation_says_why_there_is_none(tmp_path):
    """A run without data.eval (or one not finished) showed an Evaluation table of empty cells, as if its results
    had gone missing. It now says why there are none."""
    from peftkit.report import render_html

    finished = render_html(tmp_path, {}, {"metrics": {"steps": 3, "eval_loss": None, "base_eval_loss": None}}, "")
    assert "<h2>Evaluation</h2><p>None: the run evaluated nothing (its recipe has no data.eval).</p>" in finished
    assert "<td></td>" not in finished
    running = render_html(tmp_path, {}, None, "")  # a run still training was said to be one that "did not finish"
    assert ("<p><b>No manifest.json: the run has not finished (it is still training, or it stopped); the curves show "
            "what it has logged.</b></p>") in running
    assert ("<h2>Evaluation</h2><p>None recorded yet: the run has not finished (the evaluations it has logged, if any, "
            "are drawn with the loss).</p>") in running
    tuned = render_html(tmp_path, {}, {"metrics": {"eval_loss": 1.0}}, "")  # fine-tuned only (no eval.base_model)
    assert "<tr><th>eval loss</th><td></td><td>1.0000</td></tr>" in tuned


def test_the_other_eval_sets_losses_are_drawn_and_shown_beside_the_primary_s(monkeypatch, tmp_path):
    """data.eval naming several sets: each other set's eval_<name>_loss is a curve of the loss plot, beside the
    primary set's eval loss, and a row of the Evaluation table (base and fine-tuned); a line holding one that is no
    number is a damaged file."""
    from peftkit import report

    drawn = []
    monkeypatch.setattr(report, "_curve", lambda ax, steps, values, fmt="-", **style:
                        drawn.append((style.get("label"), list(steps), list(values))))
    train = [{"step": s, "loss": 5.0 - s} for s in (1, 2, 3, 4)]
    evals = [{"step": 2, "eval_loss": 3.5, "eval_perplexity": 33.1, "eval_general_loss": 4.5,
              "eval_general_perplexity": 90.0},
             {"step": 4, "eval_loss": 2.5, "eval_perplexity": 12.2, "eval_general_loss": 4.7,
              "eval_general_perplexity": 110.0}]
    report.plot_curves(train, evals, False)
    assert drawn[1:3] == [("eval loss", [2, 4], [3.5, 2.5]), ("eval loss, general", [2, 4], [4.5, 4.7])]
    metrics = {"base_eval_loss": 4.0, "eval_loss": 2.5, "eval_perplexity": 12.2, "base_eval_general_loss": 4.6,
               "eval_general_loss": 4.7, "eval_general_perplexity": 110.0}
    page = report.render_html(tmp_path, {}, {"metrics": metrics}, "")
    assert ("<tr><th>eval loss</th><td>4.0000</td><td>2.5000</td></tr>" in page
            and "<tr><th>eval loss, general</th><td>4.6000</td><td>4.7000</td></tr>" in page)
    (tmp_path / "metrics.jsonl").write_text('{"step": 2, "eval_loss": 3.5, "eval_general_loss": "x"}\n')
    with pytest.raises(PeftkitError, match="metrics.jsonl:1 is not a peftkit metrics line"):
        report.read_metrics(tmp_path)


def test_a_dpo_run_s_reward_accuracy_is_drawn(monkeypatch, tmp_path):
    """A DPO run's evaluations (eval_reward_accuracy: the share of pairs whose chosen answer has the larger reward)
    are a curve of the eval metrics plot, as a classifier's accuracy is; a line whose reward accuracy is no number is
    a damaged file."""
    from peftkit import report

    drawn = []
    monkeypatch.setattr(report, "_curve", lambda ax, steps, values, fmt="-", **style:
                        drawn.append((style.get("label"), list(steps), list(values))))
    train = [{"step": s, "loss": 0.7 - s / 10, "reward_accuracy": 0.5} for s in (1, 2, 3, 4)]
    evals = [{"step": s, "eval_loss": 0.6, "eval_reward_accuracy": a, "eval_reward_margin": 0.1,
              "eval_chosen_reward": 0.0, "eval_rejected_reward": -0.1} for s, a in ((2, 0.75), (4, 1.0))]
    plots = report.plot_curves(train, evals, False)
    assert "eval_metrics" in plots and ("reward_accuracy", [2, 4], [0.75, 1.0]) in drawn, drawn
    (tmp_path / "metrics.jsonl").write_text('{"step": 2, "eval_loss": 0.6, "eval_reward_accuracy": "x"}\n')
    with pytest.raises(PeftkitError, match="metrics.jsonl:1 is not a peftkit metrics line"):
        report.read_metrics(tmp_path)
