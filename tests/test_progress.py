"""What the user sees of a run: progress lines without a terminal, evaluations as they happen, `peftkit eval` on a
recipe or run directory with the figures training reported, and flags that read as flags in --help."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time

import pytest
from rich.console import Console
from typer.testing import CliRunner

from peftkit.cli import app
from peftkit.errors import PeftkitError
from peftkit.progress import TrainProgress
from peftkit.recipe import load_recipe
from peftkit.train import train
from tests.conftest import make_recipe

PLAIN_LINE = re.compile(r"^step (\d+)/(\d+) \(\d+%\)  loss \d+\.\d{4}  lr \d\.\d\de[-+]\d\d  [\d,]+ tok/s  "
                        r"elapsed \d+:\d\d:\d\d  ETA \d+:\d\d:\d\d$")


def _plain_steps(text: str) -> list[int]:
    return [int(m.group(1)) for line in text.splitlines() if (m := PLAIN_LINE.match(line))]


def test_plain_lines_every_tenth_of_the_run_and_at_both_ends():
    buffer = io.StringIO()
    with TrainProgress(Console(file=buffer, width=200), total=1000, interval_s=1e9) as progress:
        for step in range(1, 1001):
            progress.update(step, loss=1.0, lr=1e-4, tokens_per_s=1234.0)
    assert _plain_steps(buffer.getvalue()) == [1, *range(100, 1001, 100)]


def test_a_run_stopped_early_logs_its_last_step():
    """Early stopping ends a run between its planned lines: a log had no line for the step it stopped at."""
    buffer = io.StringIO()
    with TrainProgress(Console(file=buffer, width=200), total=1000, interval_s=1e9) as progress:
        for step in range(1, 138):
            progress.update(step, loss=1.0, lr=1e-4, tokens_per_s=1234.0)
        progress.stopped()
        progress.stopped()  # once
    assert _plain_steps(buffer.getvalue()) == [1, 100, 137]
    buffer = io.StringIO()
    with TrainProgress(Console(file=buffer, width=200), total=1000, interval_s=1e9) as progress:
        for step in range(1, 201):
            progress.update(step, loss=1.0, lr=1e-4, tokens_per_s=1234.0)
        progress.stopped()  # its line is out already
    assert _plain_steps(buffer.getvalue()) == [1, 100, 200]


def test_plain_lines_at_least_every_interval():
    buffer = io.StringIO()
    with TrainProgress(Console(file=buffer, width=200), total=1000, interval_s=0.0) as progress:
        for step in range(1, 51):
            progress.update(step, loss=1.0, lr=1e-4, tokens_per_s=1.0)
    assert _plain_steps(buffer.getvalue()) == list(range(1, 51))


def test_a_phase_without_a_terminal_says_it_is_still_running(monkeypatch):
    from peftkit import progress

    monkeypatch.setattr(progress, "PHASE_INTERVAL_S", 0.05)
    buffer = io.StringIO()
    with progress.phase("Loading model...", Console(file=buffer, width=200)):
        time.sleep(0.18)
    lines = buffer.getvalue().splitlines()  # about 3: a loaded machine wakes the beat late
    assert lines and set(lines) == {"Loading model... (still running, 0:00:00)"}
    buffer = io.StringIO()
    with progress.phase("Loading model...", Console(file=buffer, width=200)):
        pass  # work that ends sooner: not a word
    time.sleep(0.1)
    assert buffer.getvalue() == ""


def test_a_phase_s_label_is_text_on_a_terminal():
    """A label holds paths: `runs/sweep[/lr]/adapter` was rich markup to the spinner (a MarkupError)."""
    from peftkit import progress

    buffer = io.StringIO()
    with progress.phase("Merging runs/sweep[/lr]/adapter...", Console(file=buffer, force_terminal=True, width=200)):
        pass


def test_a_run_s_long_phases_are_not_silent_in_a_log(tiny_llama, number_data, tmp_path, monkeypatch):
    """Loading the model and generating the samples before and after training printed nothing in a log: a real model
    on a CPU stayed silent for minutes (119 s for the base model's samples of a 300M model). Each now says it is
    still running every PHASE_INTERVAL_S seconds (30 s; 1 ms here), as do eval, generate, chat and merge loading."""
    import contextlib
    import time

    from peftkit import finish, progress, start, start_base

    monkeypatch.setattr(progress, "PHASE_INTERVAL_S", 0.001)
    real = progress.phase

    @contextlib.contextmanager
    def lasting(label, console=None):
        """The real phase, its work made to last 0.2 s: a tiny model's base evaluation ends in a few milliseconds,
        sooner than a busy machine may run the beat's thread at all (seen once in a clean-clone CI run)."""
        with real(label, console):
            yield
            time.sleep(0.2)

    for module in (progress, start, finish, start_base):
        monkeypatch.setattr(module, "phase", lasting)
    recipe = make_recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 2}, eval={"samples": 2})
    done = CliRunner().invoke(app, ["train", str(recipe)])
    assert done.exit_code == 0, done.output
    for label in ("Loading model...", "Evaluating the base model on 16 examples (eval.base_model: true)...",
                  "Generating 2 samples with the base model (eval.samples)...",
                  "Generating 2 samples with the fine-tuned model (eval.samples)..."):
        assert re.search(f"^{re.escape(label)} \\(still running, 0:00:0\\d\\)$", done.output, re.MULTILINE), label
    done = CliRunner().invoke(app, ["merge", "--adapter", str(tmp_path / "run" / "adapter"), "--output",
                                    str(tmp_path / "merged")])
    assert done.exit_code == 0 and f"Merging {tmp_path / 'run' / 'adapter'} into its base... (still running" in (
        done.output), done.output


def test_a_run_without_a_terminal_logs_progress_and_evaluations(tiny_llama, number_data, tmp_path):
    buffer = io.StringIO()
    recipe = make_recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 6, "eval_steps": 2})
    train(load_recipe(recipe), console=Console(file=buffer, width=200))
    out = buffer.getvalue()
    assert _plain_steps(out) == [1, 2, 3, 4, 5, 6]  # a tenth of 6 steps rounds up to every step
    assert re.search(r"^base model: eval loss \d+\.\d{4} \(ppl [\d.]+\) on 16 examples$", out, re.M)
    evals = {json.loads(line)["step"]: json.loads(line)["eval_loss"]
             for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line}
    for step in (2, 4):
        assert f"step {step}: eval loss {evals[step]:.4f} (ppl " in out
    assert "━" not in out  # no live bar drawn into a file


def test_tokens_per_s_leaves_evaluations_out(tiny_llama, number_data, tmp_path, monkeypatch):
    """A step after an evaluation was charged with its time (a tenth of the throughput, in the log and the report's
    plot). The loop's clock is made one that moves only by what the test says: a second per step, a hundred per
    evaluation. Each step's tokens_per_s is then exactly its own tokens per second, those after an evaluation too (a
    hundred and one times less if the evaluation were counted), whatever the machine's load."""
    import time
    from types import SimpleNamespace

    from peftkit import start
    from peftkit import train as train_module

    clock = [float(int(time.time()))]  # whole seconds: every difference below is exact in floating point
    monkeypatch.setattr(train_module, "time", SimpleNamespace(time=lambda: clock[0]))
    step, evaluate = train_module._step, start.Run.evaluate

    def timed(took: float, run_it):
        def run(*args):
            result = run_it(*args)
            clock[0] += took
            return result
        return run

    monkeypatch.setattr(train_module, "_step", timed(1.0, step))
    monkeypatch.setattr(start.Run, "evaluate", timed(100.0, evaluate))
    recipe = make_recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 8, "eval_steps": 3},
                         eval={"base_model": False})
    train(load_recipe(recipe), console=Console(quiet=True))
    records = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").open()) if "tokens_per_s" in r]
    assert [r["step"] for r in records] == list(range(1, 9))
    before = [0] + [r["tokens"] for r in records[:-1]]
    assert [r["tokens_per_s"] for r in records] == [r["tokens"] - b for r, b in zip(records, before, strict=True)]


def test_progress_lines_do_not_wait_for_logged_steps(tiny_llama, number_data, tmp_path):
    """With training.log_steps > 1 the first step still gets its line (it was the first logged step's), and the
    lines fall on tenths of the run, not on multiples of log_steps."""
    buffer = io.StringIO()
    recipe = make_recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 20, "log_steps": 7},
                         eval={"base_model": False})
    train(load_recipe(recipe), console=Console(file=buffer, width=200))
    assert _plain_steps(buffer.getvalue()) == [1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [7, 14, 20]


def test_the_summary_of_a_run_in_a_log_keeps_each_path_on_its_line(tiny_llama, number_data, tmp_path):
    """Not a terminal (80 columns, rich's default there): the summary table folded long paths across lines, so a
    path could not be copied out of a CI log."""
    deep = tmp_path / ("a-rather-long-directory-name-" * 3) / "run"
    recipe = make_recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 1}, eval={"base_model": False},
                         export={"output_dir": str(deep)})
    buffer = io.StringIO()
    train(load_recipe(recipe), console=Console(file=buffer, width=80))
    lines = buffer.getvalue().splitlines()
    assert "peftkit train: done" in lines
    assert any(line.split() == ["adapter", str(deep / "adapter")] for line in lines)
    assert any(line.split() == ["run", "directory", str(deep)] for line in lines)


def test_a_terminal_gets_the_live_bar_not_plain_lines(tiny_llama, number_data, tmp_path):
    buffer = io.StringIO()
    recipe = make_recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 3}, eval={"base_model": False})
    train(load_recipe(recipe), console=Console(file=buffer, width=200, force_terminal=True))
    out = buffer.getvalue()
    assert _plain_steps(out) == [] and "3/3" in out and "tok/s" in out


def test_the_live_bar_shows_no_loss_before_the_first_step_ends():
    """A fresh or resumed run's bar showed `loss nan  lr 0.00e+00  0 tok/s` until its first step ended: a run that
    reads as diverged."""
    buffer = io.StringIO()
    with TrainProgress(Console(file=buffer, width=200, force_terminal=True), total=60, start_step=33) as progress:
        progress.bar.refresh()
        before = buffer.getvalue()
        progress.update(34, 1.25, 2e-4, 1234.0)
        progress.bar.refresh()
    assert "first step running" in before and "nan" not in before and "33/60" in before
    assert "loss 1.2500  lr 2.00e-04  1,234 tok/s" in buffer.getvalue()


def test_cli_with_stdout_redirected_to_a_file_logs_progress(tiny_llama, number_data, tmp_path):
    """Plain step lines in a log file, and no library's noise among them: where deepspeed is installed (the dev
    extras), saving the merged model imports it (accelerate's unwrap_model) and, without a GPU, it warned "Setting
    accelerator to CPU" in the middle of the run's output."""
    recipe = make_recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 4}, eval={"base_model": False},
                         export={"merged": True})
    log = tmp_path / "train.log"
    with open(log, "w") as f:  # as under nohup or a cluster scheduler
        subprocess.run([sys.executable, "-m", "peftkit", "train", str(recipe)], stdout=f, stderr=subprocess.STDOUT,
                       check=True, timeout=300)
    assert _plain_steps(log.read_text()) == [1, 2, 3, 4]
    assert (tmp_path / "run" / "merged" / "config.json").is_file()
    assert "Setting accelerator to CPU" not in log.read_text() and "WARNING" not in log.read_text()


# ---------------------------------------------------------------------------------------------- peftkit eval


@pytest.fixture(scope="module")
def finished(tiny_llama, number_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-run")
    recipe = make_recipe(root, tiny_llama, number_data, training={"max_steps": 4}, eval={"base_model": True})
    summary = train(load_recipe(recipe), console=Console(file=io.StringIO()))
    return root, summary


def _eval(*args: str) -> dict:
    result = CliRunner().invoke(app, ["eval", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    loss, ppl, tokens = re.fullmatch(r"loss (\S+)  perplexity (\S+)  tokens (\d+)\n", result.output).groups()
    return {"loss": float(loss), "tokens": int(tokens)}


def test_eval_of_a_run_directory_gives_training_s_figures(finished):
    root, summary = finished
    from_run = _eval(str(root / "run"))  # recipe.yaml for data/format/settings, adapter/ as the adapter
    assert from_run["loss"] == pytest.approx(summary["eval_loss"], abs=1e-4)
    base = _eval(str(root / "recipe.yaml"))  # the recipe alone: the base model, as training's base eval
    assert base["loss"] == pytest.approx(summary["base_eval_loss"], abs=1e-4)
    explicit = _eval(str(root / "recipe.yaml"), "--adapter", str(root / "run" / "adapter"))
    assert explicit == from_run


def test_a_run_without_its_adapter_is_not_evaluated_as_its_base(tiny_llama, number_data, tmp_path, monkeypatch,
                                                                 capsys):
    """export.adapter: false (or an unfinished run): `peftkit eval RUN` and `generate RUN` scored the base model
    and exited 0, as if it were the fine-tuned one."""
    from tests.conftest import cli_user_error

    recipe = make_recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 2}, eval={"base_model": False},
                         export={"adapter": False, "merged": True})
    train(load_recipe(recipe), console=Console(quiet=True))
    run = tmp_path / "run"
    for command in ("eval", "generate"):
        message = cli_user_error(monkeypatch, capsys, command, str(run))
        assert f"{run} holds no adapter/" in message and f"--model {run / 'merged'}" in message
    merged = _eval(str(run), "--model", str(run / "merged"))
    final = json.loads((run / "manifest.json").read_text())["metrics"]["eval_loss"]
    assert merged["loss"] == pytest.approx(final, abs=1e-4)


def test_eval_flags_default_to_the_recipe_defaults(finished, tiny_llama, number_data):
    root, summary = finished
    flags = _eval("--model", str(tiny_llama), "--adapter", str(root / "run" / "adapter"), "--data",
                  str(number_data["eval"]))  # no --format: alpaca, as a recipe's default
    assert flags["loss"] == pytest.approx(summary["eval_loss"], abs=1e-4)


def test_eval_format_mismatch_is_reported_before_the_model_loads(finished, number_data, tmp_path):
    root, _ = finished
    import shutil

    broken = shutil.copytree(root / "run" / "adapter", tmp_path / "adapter")
    (broken / "adapter_model.safetensors").write_bytes(b"not weights")  # would fail if it were loaded first
    result = CliRunner().invoke(app, ["eval", str(root / "recipe.yaml"), "--adapter", str(broken), "--format", "chat"])
    assert isinstance(result.exception, PeftkitError)
    assert "missing field 'messages' for --format 'chat'" in str(result.exception)


NEEDS = ("peftkit eval needs a RECIPE (or a run directory), or both --model and --data (or --adapter DIR and --data: "
         "the adapter over its recorded base).")


@pytest.mark.parametrize("args, message", [
    ([], NEEDS),
    (["--model", "m"], NEEDS),
    (["--model", "m", "--data", "d.jsonl", "--format", "xml"],
     "--format 'xml': use alpaca, chat, completion, text, classification, preference, unpaired or tokenized."),
    (["--model", "m", "--data", "d.jsonl", "--on-bad-rows", "drop"], "--on-bad-rows 'drop': use error or skip."),
])
def test_eval_bad_arguments(args, message):
    result = CliRunner().invoke(app, ["eval", *args])
    assert isinstance(result.exception, PeftkitError) and str(result.exception) == message


def test_eval_of_a_recipe_without_eval_data(tiny_llama, number_data, tmp_path):
    recipe = make_recipe(tmp_path, tiny_llama, {"train": number_data["train"], "eval": number_data["eval"]})
    text = recipe.read_text().replace(f"  eval: {number_data['eval']}\n", "")
    recipe.write_text(text)
    result = CliRunner().invoke(app, ["eval", str(recipe)])
    assert str(result.exception) == f"{recipe} has no data.eval to evaluate on; pass --data FILE (or set data.eval)."


@pytest.mark.parametrize("command, flags", [("train", ["--resume", "--overwrite"]), ("merge", ["--overwrite"]),
                                            ("verify", ["--trust-remote-code"])])
def test_boolean_options_read_as_flags_in_help(command, flags):
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "<bool>" not in result.output
    for flag in flags:
        assert re.search(rf"^\s+{flag}\s{{2,}}\S", result.output, re.M), result.output


# ------------------------------------------------------------------ other long work: tokenizing, evaluating


@pytest.fixture
def work_console():
    """The console `peftkit.progress.work` shows on, as the CLI sets it; none again afterwards."""
    from peftkit.progress import show_work_on

    def shown_on(**kwargs) -> io.StringIO:
        buffer = io.StringIO()
        show_work_on(Console(file=buffer, width=200, **kwargs))
        return buffer

    yield shown_on
    show_work_on(None)


def test_work_in_a_log_is_a_line_per_interval(work_console):
    from peftkit.progress import work

    buffer = work_console()
    with work("tokenizing train.jsonl", 4, "rows", interval_s=0.0) as advance:
        for _ in range(4):
            advance()
    assert [line.split("  elapsed")[0] for line in buffer.getvalue().splitlines()] == [
        f"tokenizing train.jsonl: {n}/4 rows ({25 * n}%)" for n in (1, 2, 3)]  # the end is the caller's line
    with work("tokenizing train.jsonl", 4, "rows") as advance:  # work shorter than the interval: no line
        advance(4)
    assert len(buffer.getvalue().splitlines()) == 3


def test_tokenizing_and_evaluating_show_a_bar_on_a_terminal(work_console, tiny_llama, number_data):
    """A 500k-row dataset tokenized for 17 minutes, and `peftkit eval` of 20k rows ran 6, without a word."""
    from transformers import AutoTokenizer

    from peftkit.data import load_examples
    from peftkit.decoding import Sampling
    from peftkit.eval_job import EvalJob
    from peftkit.evaluate import evaluate
    from peftkit.inference import ModelSource
    from peftkit.recipe import DataConfig, ModelConfig

    buffer = work_console(force_terminal=True)
    data = DataConfig(train=str(number_data["train"]), max_length=256)
    assert len(load_examples(AutoTokenizer.from_pretrained(tiny_llama), data.train, "train", data)[0]) == 64
    assert re.search(r"tokenizing train\.jsonl.*64/64 rows", _plain(buffer))
    evaluate(EvalJob(data=str(number_data["eval"]), data_cfg=data, batch_size=4, metrics=["loss", "exact_match"],
                     sampling=Sampling(max_new_tokens=4),
                     source=ModelSource(ModelConfig(name_or_path=str(tiny_llama), dtype="float32"))))
    assert re.search(r"loss.*16/16 examples", _plain(buffer))
    assert re.search(r"answers.*16/16 rows", _plain(buffer))
    evaluate(EvalJob(data=str(number_data["eval"]), data_cfg=data, batch_size=4, name="tuned",  # in a comparison
                     source=ModelSource(ModelConfig(name_or_path=str(tiny_llama), dtype="float32"))))
    assert re.search(r"tuned: loss.*16/16 examples", _plain(buffer))


def _plain(buffer: io.StringIO) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buffer.getvalue())


@pytest.mark.parametrize("width", [50, 60, 70, 120])
def test_the_live_bar_on_a_narrow_terminal_keeps_every_figure_whole(width):
    """Cut to fit one line of a 70-column terminal, the bar showed `120/…`, `0:00…` and `ETA 0:0…`: the step count
    and times were cropped. Now the figures go on a line of their own when one line cannot hold them all."""
    buffer = io.StringIO()
    with TrainProgress(Console(file=buffer, width=width, force_terminal=True, color_system=None), total=1000,
                       start_step=119) as progress:
        progress.update(120, 2.148, 1.09e-4, 146839.0)
        progress.bar.refresh()
    shown = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", buffer.getvalue()).split("\r")[-1]
    assert "…" not in shown
    assert "120/1000" in shown and "loss 2.1480  lr 1.09e-04  146,839 tok/s" in shown
    assert re.search(r"\d:\d\d:\d\d ETA (\d:\d\d:\d\d|-:--:--)", shown)
    assert len(shown.strip().splitlines()) == (1 if width >= 100 else 2)


def test_the_live_bar_moves_on_past_a_skipped_step():
    """A step skipped for a non-finite loss (nan_policy: skip_step) left the bar where it was: a run whose last step
    was skipped ended on `19/20`."""
    buffer = io.StringIO()
    with TrainProgress(Console(file=buffer, width=120, force_terminal=True, color_system=None), total=20,
                       start_step=18) as progress:
        progress.update(19, 2.148, 1.09e-4, 1000.0)
        progress.skipped(20)
        progress.bar.refresh()
    shown = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", buffer.getvalue()).split("\r")[-1]
    assert "20/20" in shown, shown


def test_one_sample_is_said_in_the_singular(tiny_llama, number_data, tmp_path, monkeypatch):
    """`eval.samples: 1` logged "Generating 1 samples with the base model" (a SmolLM2 run's log)."""
    from peftkit import progress

    monkeypatch.setattr(progress, "PHASE_INTERVAL_S", 0.001)
    recipe = make_recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 1}, eval={"samples": 1})
    done = CliRunner().invoke(app, ["train", str(recipe)])
    assert done.exit_code == 0, done.output
    for label in ("Generating 1 sample with the base model (eval.samples)...",
                  "Generating 1 sample with the fine-tuned model (eval.samples)..."):
        assert re.search(f"^{re.escape(label)} \\(still running, 0:00:0\\d\\)$", done.output, re.MULTILINE), label
    assert "1 samples" not in done.output
