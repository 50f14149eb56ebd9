"""Early stopping (`training.early_stopping`), the best adapter (`export.best`) and trackers (`training.report_to`)."""

import importlib.util
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from peftkit.checkpoint import checkpoint_dirs
from peftkit.recipe import load_recipe
from peftkit.selection import Watch, lower_is_better
from peftkit.train import train
from tests.conftest import cli_user_error, make_recipe

ADAPTER = "adapter/adapter_model.safetensors"


def _lines(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(path):
    return load_file(path / "adapter_model.safetensors")


def _same(a, b):
    return a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_watch_counts_improvements_and_stale_evaluations():
    w = Watch("loss", lower=True, min_delta=0.1)
    assert [w.see(s, v) for s, v in enumerate([2.0, 1.95, 1.8, float("nan"), 1.8, 1.5], 1)] == [
        True, False, True, False, False, True]
    assert (w.value, w.step, w.stale) == (1.5, 6, 0)
    up = Watch("exact_match", lower=False)
    assert [up.see(s, v) for s, v in enumerate([0.0, 0.0, 0.5, float("inf")], 1)] == [True, False, True, False]
    assert up.step == 3  # a tie keeps the earlier evaluation
    assert lower_is_better("perplexity") and not lower_is_better("rouge_l") and lower_is_better("rouge_l", "min")


def test_early_stopping_stops_after_patience_and_exports_that_step(tiny_llama, number_data, tmp_path):
    """mode max on the loss: the loss falls, so only the first evaluation counts as an improvement and the run
    stops `patience` evaluations later, with the adapter of that step (= the same run's checkpoint there)."""
    training = {"max_steps": 12, "eval_steps": 1, "save_steps": 3, "save_total_limit": 10}
    stopped = make_recipe(tmp_path / "stop", tiny_llama, number_data, eval={"base_model": False}, training=training
                          | {"early_stopping": {"metric": "loss", "mode": "max", "patience": 2}})
    summary = train(load_recipe(stopped))
    assert summary["steps"] == 3 and summary["stopped_early"] is True
    lines = _lines(tmp_path / "stop" / "run")
    assert [x["step"] for x in lines if "eval_loss" in x] == [1, 2, 3]  # the end reuses step 3's evaluation
    assert max(x["step"] for x in lines) == 3
    first = _weights(tmp_path / "stop" / "run" / "adapter")
    again = train(load_recipe(stopped), resume=True)  # as if killed after its checkpoint at the stop: no step past it
    assert again["steps"] == 3 and again["stopped_early"] is True
    assert max(x["step"] for x in _lines(tmp_path / "stop" / "run")) == 3
    assert _same(_weights(tmp_path / "stop" / "run" / "adapter"), first)

    # The same stop falling on the run's last step (its final evaluation is the second stale one): every step
    # trained, so not stopped early (the manifest said so, and the summary printed "3 (stopped early)").
    last = make_recipe(tmp_path / "last", tiny_llama, number_data, eval={"base_model": False}, training=training
                       | {"max_steps": 3, "early_stopping": {"metric": "loss", "mode": "max", "patience": 2}})
    summary = train(load_recipe(last))
    assert summary["steps"] == 3 and summary["stopped_early"] is False
    full = make_recipe(tmp_path / "full", tiny_llama, number_data, eval={"base_model": False}, training=training)
    train(load_recipe(full))
    step3 = tmp_path / "full" / "run" / "checkpoints" / "step-00000003"
    assert _same(_weights(tmp_path / "stop" / "run" / "adapter"), _weights(step3))


def test_a_run_stopped_at_an_evaluation_and_resumed_stops_as_an_unbroken_one(tiny_llama, number_data, tmp_path,
                                                                             monkeypatch):
    """SIGTERM at step 2, an evaluation step between checkpoints: the stop's checkpoint holds that evaluation, and the
    resumed run neither makes it again nor counts it twice toward the patience: metrics.jsonl (but for timings) and
    the early stop at step 4 are the unbroken run's."""
    import signal

    import torch

    from peftkit.errors import PeftkitError
    from tests.conftest import signal_after_step

    training = {"max_steps": 12, "eval_steps": 1, "save_steps": 5, "log_steps": 2,
                "early_stopping": {"metric": "loss", "mode": "max", "patience": 3}}
    runs = [make_recipe(tmp_path / name, tiny_llama, number_data, eval={"base_model": False}, training=training)
            for name in ("unbroken", "stopped")]
    unbroken = train(load_recipe(runs[0]))
    signal_after_step(monkeypatch, torch.optim.AdamW, 2, signal.SIGTERM)
    with pytest.raises(PeftkitError, match="^Stopped by SIGTERM at step 2"):
        train(load_recipe(runs[1]))
    monkeypatch.undo()
    resumed = train(load_recipe(runs[1]), resume=True)
    assert (resumed["steps"], resumed["stopped_early"]) == (unbroken["steps"], unbroken["stopped_early"]) == (4, True)
    timings = ("tokens_per_s", "peak_mem_mb")
    lines = [[{k: v for k, v in x.items() if k not in timings} for x in _lines(tmp_path / name / "run")]
             for name in ("unbroken", "stopped")]
    assert lines[0] == lines[1] and [x["step"] for x in lines[1] if "eval_loss" in x] == [1, 2, 3, 4]


def test_an_early_stop_between_log_steps_logs_its_last_step(tiny_llama, number_data, tmp_path):
    """log_steps 2, stopped early at step 3: metrics.jsonl ends with step 3's training line, then its evaluation, as
    a run of max_steps 3 does. The line was missing: its last training line was step 2's, and the summary's
    train_loss (step 3's) was in no line."""
    recipe = make_recipe(tmp_path, tiny_llama, number_data, eval={"base_model": False},
                         training={"max_steps": 12, "eval_steps": 1, "log_steps": 2,
                                   "early_stopping": {"metric": "loss", "mode": "max", "patience": 2}})
    summary = train(load_recipe(recipe))
    assert summary["steps"] == 3 and summary["stopped_early"] is True
    lines = _lines(tmp_path / "run")
    assert [(x["step"], "loss" in x) for x in lines] == [(1, False), (2, True), (2, False), (3, True), (3, False)]
    assert lines[3]["loss"] == summary["train_loss"] and lines[3]["tokens"] == summary["tokens"]


def test_export_best_exports_the_best_evaluation_and_survives_a_resume(tiny_llama, number_data, tmp_path):
    """export.best by the *highest* eval loss (early_stopping mode max, patience never reached) is step 1's adapter:
    the exported weights equal the run's step-1 checkpoint and the summary's eval loss is step 1's. Resuming
    from a later checkpoint keeps that choice."""
    sections = dict(training={"max_steps": 6, "eval_steps": 1, "save_steps": 1, "save_total_limit": 10,
                              "early_stopping": {"metric": "loss", "mode": "max", "patience": 100}},
                    export={"best": True}, eval={"base_model": False})
    recipe = make_recipe(tmp_path, tiny_llama, number_data, **sections)
    summary = train(load_recipe(recipe))
    run = tmp_path / "run"
    evals = [x for x in _lines(run) if "eval_loss" in x]
    assert summary["best"] == {"metric": "eval_loss", "value": evals[0]["eval_loss"], "step": 1}
    assert summary["eval_loss"] == evals[0]["eval_loss"] and summary["stopped_early"] is False
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]  # the final adapter was not the one exported
    exported = _weights(run / "adapter")
    assert _same(exported, _weights(run / "checkpoints" / "step-00000001"))
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["metrics"]["best"]["step"] == 1
    from peftkit.report import write_report

    assert "exported adapter: the best eval_loss" in write_report(run).read_text()

    for ckpt in checkpoint_dirs(run)[4:]:  # as if killed after step 4's checkpoint
        shutil.rmtree(ckpt)
    train(load_recipe(recipe), resume=True)
    assert _same(_weights(run / "adapter"), exported)


def test_export_best_by_a_task_metric_name(tiny_llama, number_data, tmp_path, monkeypatch):
    """export.best: token_f1 keeps the evaluation with the highest token_f1. The tiny model's scores after a few
    steps tie (all 0), where any choice passes: the scores are scripted, so a min/max or metric mix-up fails."""
    import peftkit.evaluate as evaluate_mod

    scripted, real = iter([0.2, 0.5, 0.3]), evaluate_mod.score
    monkeypatch.setattr(evaluate_mod, "score", lambda *a, **k: real(*a, **k) | {"token_f1": next(scripted)})
    recipe = make_recipe(tmp_path, tiny_llama, number_data,
                         training={"max_steps": 3, "eval_steps": 1}, export={"best": "token_f1"},
                         eval={"base_model": False, "metrics": ["token_f1"], "max_new_tokens": 4})
    summary = train(load_recipe(recipe))
    f1 = [x["eval_token_f1"] for x in _lines(tmp_path / "run") if "eval_token_f1" in x]
    assert f1 == [0.2, 0.5, 0.3]
    assert summary["best"] == summary["best"] | {"metric": "eval_token_f1", "value": 0.5, "step": 2}


@pytest.mark.parametrize(("sections", "expected"), [
    (dict(training={"eval_steps": None, "early_stopping": {"patience": 2}}),
     "training.early_stopping chooses among the evaluations during training, and this recipe has none; "
     "set data.eval and training.eval_steps"),
    (dict(training={"eval_steps": 2, "early_stopping": {"metric": "exact_match"}}),
     "metric 'exact_match' is not computed during training (computed: loss, perplexity); use one of those, "
     "or add 'exact_match' to eval.metrics"),
    (dict(training={"eval_steps": 2}, export={"best": "rouge_l"}), "export.best: metric 'rouge_l' is not computed"),
    (dict(training={"eval_steps": 2, "early_stopping": {"mode": "up"}}), "early_stopping.mode"),
    (dict(training={"eval_steps": 2}, adapter={"method": "adalora", "total_step": 6}, export={"best": True}),
     "export.best: adapter.method adalora changes the adapter's layout while it trains"),
    (dict(training={"report_to": ["neptune"]}), "training.report_to"),
])
def test_selection_recipe_errors(sections, expected, tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    adapter = sections.pop("adapter", None)
    recipe = make_recipe(tmp_path, tiny_llama, number_data, **sections)
    if adapter:  # a whole section of another method's keys, not LoRA's with some replaced
        raw = yaml.safe_load(recipe.read_text())
        recipe.write_text(yaml.safe_dump(raw | {"adapter": adapter}, sort_keys=False))
    err = cli_user_error(monkeypatch, capsys, "validate", str(recipe))
    assert expected in " ".join(err.split())
    assert "recipe.yaml" in err


def _killed_before_the_last_checkpoint(recipe, run) -> None:
    """Train `recipe` (4 steps, a checkpoint every 2) into `run`, then leave it as if killed after step 4, before its
    checkpoint."""
    train(recipe)
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    shutil.rmtree(run / "adapter")
    (run / "manifest.json").unlink()


def test_tensorboard_gets_what_metrics_jsonl_has_after_resumes_too(tiny_llama, number_data, tmp_path):
    """Each resume (from a checkpoint before the end, and of a finished run, whose final evaluation is made again)
    logs its steps again: TensorBoard purges what the stopped run had logged after the checkpoint, so each step is
    there once, as in metrics.jsonl (it had steps 3, 4, 3, 4 after the first resume, a second final eval after the
    other)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = load_recipe(make_recipe(tmp_path, tiny_llama, number_data, training={
        "max_steps": 4, "eval_steps": 2, "save_steps": 2, "report_to": ["tensorboard"]}))
    run = tmp_path / "run"
    _killed_before_the_last_checkpoint(recipe, run)
    train(recipe, resume=True)
    train(recipe, resume=True)
    acc = EventAccumulator(str(run / "trackers" / "run")).Reload()
    # the recipe as hyperparameters once (each call writes directories of its own), not once per start
    assert len(list((run / "trackers" / "run").glob("*/hparams.yml"))) == 1
    lines = _lines(run)
    assert [x["step"] for x in lines if "eval_loss" in x] == [2, 4]
    for key in ("loss", "lr", "eval_loss"):
        expected = [(x["step"], x[key]) for x in lines if key in x]
        got = [(e.step, e.value) for e in acc.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in expected]
        assert all(math.isclose(g, v, rel_tol=1e-6) for (_, g), (_, v) in zip(got, expected, strict=True))


def _wandb_records(run_file):
    """The records of an offline W&B run's .wandb file: a 7-byte header, then a LevelDB log (32 KiB blocks of
    records, each with a 7-byte header: crc, length, type 1 full, 2 first, 3 middle, 4 last)."""
    import struct

    from wandb.proto.wandb_internal_pb2 import Record

    data, pos, part = run_file.read_bytes(), 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        part, pos = part + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            yield Record.FromString(part)
            part = b""


def _wandb_history(run_file):
    """(step, values) of each history record in an offline W&B run's .wandb file."""
    history = []
    for record in _wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            values = {i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            history.append((record.history.step.num, {k: v for k, v in values.items() if not k.startswith("_")}))
    return history


def test_an_offline_wandb_run_resumed_holds_the_whole_run(tiny_llama, number_data, tmp_path, monkeypatch):
    """A resumed offline W&B run is a new run (wandb cannot resume one offline), and it got only the steps after the
    checkpoint, while the stopped run may hold nothing of the steps before: a killed run's offline file kept only its
    7-byte header (wandb 0.31). The new run now starts with metrics.jsonl's records up to the checkpoint, so the
    newest holds each record once, as metrics.jsonl does."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    recipe = load_recipe(make_recipe(tmp_path, tiny_llama, number_data, training={
        "max_steps": 4, "eval_steps": 2, "save_steps": 2, "report_to": ["wandb"]}))
    run = tmp_path / "run"
    _killed_before_the_last_checkpoint(recipe, run)
    train(recipe, resume=True)
    wandb.teardown()  # wandb-core may still be writing the offline file when the run's finish returns
    [newest] = (run / "trackers" / "wandb" / "latest-run").glob("run-*.wandb")
    logged = {}  # wandb merges the values logged at one step into one history record
    for step, values in _wandb_history(newest):
        logged.setdefault(step, {}).update(values)
    expected = {}
    for line in _lines(run):
        expected.setdefault(line["step"], {}).update({k: v for k, v in line.items() if k != "step"})
    assert sorted(logged) == sorted(expected) == [1, 2, 3, 4]
    for step, values in expected.items():
        assert logged[step].keys() == values.keys()
        assert all(math.isclose(logged[step][k], v, rel_tol=1e-9) for k, v in values.items())


def test_resuming_into_another_mlflow_store_is_a_clear_error(tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    """--resume continues the MLflow run of trackers/runs.json; with MLFLOW_TRACKING_URI now naming another store (or
    the run's own mlflow.db removed) that run is not there, and the resume stopped on MLflow's traceback. The error
    says to remove the run id to go on in a new run, which got only the steps after the checkpoint."""
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")  # for MLflow's SQLite store: mlflow-skinny lacks it
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    recipe = make_recipe(tmp_path, tiny_llama, number_data, training={
        "max_steps": 4, "save_steps": 2, "report_to": ["mlflow"]})
    run = tmp_path / "run"
    train(load_recipe(recipe))
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    err = " ".join(cli_user_error(monkeypatch, capsys, "train", str(recipe), "--resume").split())
    run_id = json.loads((run / "trackers" / "runs.json").read_text())["mlflow"]
    assert (f"training.report_to: the MLflow run {run_id} that {run / 'trackers' / 'runs.json'} names for --resume "
            f"to continue is not in the store MLFLOW_TRACKING_URI names (sqlite:///{tmp_path / 'other.db'})") in err
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path / 'other.db'}"
    # as it says: without the run id, a new MLflow run, which starts with metrics.jsonl's records up to the checkpoint
    (run / "trackers" / "runs.json").write_text("{}")
    train(load_recipe(recipe), resume=True)
    client = mlflow.tracking.MlflowClient()
    [new] = client.search_runs([client.get_experiment_by_name("run").experiment_id])
    assert [(m.step, m.value) for m in client.get_metric_history(new.info.run_id, "loss")] == [
        (x["step"], x["loss"]) for x in _lines(run) if "loss" in x]


def test_a_run_that_ends_early_is_not_marked_finished_in_mlflow(tiny_llama, number_data, tmp_path, monkeypatch):
    """accelerate ends every tracker's run as a success, so an interrupted or crashed run was FINISHED in MLflow.
    Now: stopped by a signal (with a checkpoint) is KILLED, an error FAILED, and the same run is FINISHED once a
    --resume completes it."""
    import signal

    import torch

    from peftkit.errors import PeftkitError
    from tests.conftest import signal_after_step

    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")  # for MLflow's SQLite store: mlflow-skinny lacks it
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    recipe = load_recipe(make_recipe(tmp_path, tiny_llama, number_data, training={
        "max_steps": 4, "save_steps": 2, "report_to": ["mlflow"]}))
    run_ids = tmp_path / "run" / "trackers" / "runs.json"

    def status() -> str:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'run' / 'trackers' / 'mlflow.db'}"
        try:
            return mlflow.tracking.MlflowClient().get_run(json.loads(run_ids.read_text())["mlflow"]).info.status
        finally:
            del os.environ["MLFLOW_TRACKING_URI"]

    signal_after_step(monkeypatch, torch.optim.AdamW, 2, signal.SIGINT)
    with pytest.raises(PeftkitError, match="^Interrupted at step 2"):
        train(recipe)
    assert status() == "KILLED"
    monkeypatch.undo()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    real = torch.optim.AdamW.step

    def fails(self, *args, **kwargs):
        raise RuntimeError("a crash")
    monkeypatch.setattr(torch.optim.AdamW, "step", fails)
    with pytest.raises(RuntimeError, match="a crash"):
        train(recipe, resume=True)
    assert status() == "FAILED"
    monkeypatch.setattr(torch.optim.AdamW, "step", real)
    train(recipe, resume=True)
    assert status() == "FINISHED"


def test_a_wandb_run_that_ends_early_exits_with_a_failure(tiny_llama, number_data, tmp_path, monkeypatch):
    """The same for W&B: a stopped run's exit code was 0 (a success); it is 1 now."""
    import signal

    import torch

    from peftkit.errors import PeftkitError
    from tests.conftest import signal_after_step

    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    recipe = load_recipe(make_recipe(tmp_path, tiny_llama, number_data, training={
        "max_steps": 4, "save_steps": 2, "report_to": ["wandb"]}))
    signal_after_step(monkeypatch, torch.optim.AdamW, 2, signal.SIGINT)
    with pytest.raises(PeftkitError, match="^Interrupted at step 2"):
        train(recipe)
    wandb.teardown()
    [file] = (tmp_path / "run" / "trackers" / "wandb" / "latest-run").glob("run-*.wandb")
    assert [r.exit.exit_code for r in _wandb_records(file) if r.WhichOneof("record_type") == "exit"] == [1]


def test_a_full_disk_under_tensorboard_is_said_with_the_checkpoint_to_resume_from(tiny_llama, number_data, tmp_path,
                                                                                monkeypatch):
    """TensorBoard's writer raising ENOSPC mid-run was two tracebacks (the log, then closing the trackers), with no
    word of the checkpoint to go on from."""
    import errno

    from accelerate import Accelerator

    from peftkit.errors import PeftkitError, PeftkitWarning

    pytest.importorskip("tensorboard")
    real_log, real_end = Accelerator.log, Accelerator.end_training

    def log(self, values, step=None, **kwargs):
        if step == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_log(self, values, step=step, **kwargs)

    def end(self):
        real_end(self)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Accelerator, "log", log)
    monkeypatch.setattr(Accelerator, "end_training", end)
    recipe = load_recipe(make_recipe(tmp_path, tiny_llama, number_data, training={
        "max_steps": 4, "save_steps": 2, "report_to": ["tensorboard"]}))
    with pytest.raises(PeftkitError) as e, pytest.warns(PeftkitWarning, match="could not be closed"):
        train(recipe)
    assert str(e.value).startswith(f"No space left on the device while writing {tmp_path / 'run' / 'trackers'}")
    assert str(e.value).endswith("The newest whole checkpoint is step-00000002: continue with `peftkit train RECIPE "
                                 "--resume`.")


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_a_tracker_without_its_package_is_a_clear_error(tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    recipe = make_recipe(tmp_path, tiny_llama, number_data, training={"report_to": ["wandb"]})
    err = cli_user_error(monkeypatch, capsys, "train", str(recipe))
    assert "training.report_to: wandb needs its package, which is not installed; run `pip install wandb`" in err
    assert not any(p.name in ("metrics.jsonl", "checkpoints", "trackers") for p in (tmp_path / "run").glob("*"))
    if importlib.util.find_spec("mlflow") is None:  # two missing: said of both ("wandb, mlflow needs its package")
        from peftkit.errors import PeftkitError
        from peftkit.trackers import check_trackers

        with pytest.raises(PeftkitError, match=r"^training.report_to: wandb and mlflow need their packages, which are "
                                               r"not installed; run `pip install wandb mlflow`, or remove them from"):
            check_trackers(["wandb", "mlflow"])


def test_mlflow_sends_no_telemetry_and_the_users_settings_win(tiny_llama, number_data, tmp_path, monkeypatch):
    """MLflow 3 posts usage telemetry (config.mlflow-telemetry.io, from `import mlflow` on): a run's DNS lookup of it
    was seen. peftkit now sets MLFLOW_DISABLE_TELEMETRY for the run (unless the user set it), as it sets the run's
    own store where MLFLOW_TRACKING_URI is unset, and takes both away after."""
    from accelerate import Accelerator

    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")  # for MLflow's SQLite store: mlflow-skinny lacks it
    seen, real = [], Accelerator.init_trackers

    def init_trackers(self, *args, **kwargs):
        seen.append({k: os.environ.get(k) for k in ("MLFLOW_DISABLE_TELEMETRY", "MLFLOW_TRACKING_URI")})
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Accelerator, "init_trackers", init_trackers)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    recipe = load_recipe(make_recipe(tmp_path, tiny_llama, number_data, training={
        "max_steps": 2, "report_to": ["mlflow"]}))
    train(recipe)
    assert seen.pop() == {"MLFLOW_DISABLE_TELEMETRY": "true",
                          "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'run' / 'trackers' / 'mlflow.db'}"}
    assert "MLFLOW_DISABLE_TELEMETRY" not in os.environ and "MLFLOW_TRACKING_URI" not in os.environ
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "false")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mine.db'}")
    train(recipe, overwrite=True)
    assert seen.pop() == {"MLFLOW_DISABLE_TELEMETRY": "false", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mine.db'}"}
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "false"
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path / 'mine.db'}"


def test_mlflow_without_sqlalchemy_on_a_sqlite_store_is_a_clear_error(tiny_llama, number_data, tmp_path, monkeypatch,
                                                                     capsys):
    """mlflow-skinny installs the `mlflow` module without SQLAlchemy and alembic, so the check of the package passed
    and MLflow's SQLite store (peftkit's own by default) failed with a traceback after the model had loaded. Stood in
    for here: CI has no mlflow."""
    import peftkit.trackers

    real = importlib.util.find_spec
    monkeypatch.setattr(peftkit.trackers.importlib.util, "find_spec", lambda name: (
        None if name in ("sqlalchemy", "alembic") else object() if name == "mlflow" else real(name)))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    recipe = make_recipe(tmp_path, tiny_llama, number_data, training={"report_to": ["mlflow"]})
    err = " ".join(cli_user_error(monkeypatch, capsys, "train", str(recipe)).split())
    assert ("training.report_to: mlflow would log to its own store, <output_dir>/trackers/mlflow.db, a SQLite "
            "database, which needs the full mlflow package (this one lacks SQLAlchemy and alembic, as mlflow-skinny "
            "does); run `pip install mlflow`, or set MLFLOW_TRACKING_URI to a tracking server.") in err
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/elsewhere.db")
    assert "mlflow would log to the store MLFLOW_TRACKING_URI names" in cli_user_error(monkeypatch, capsys, "train",
                                                                                        str(recipe))


def test_the_stop_reason_names_the_last_improvement_by_min_delta():
    """Early stopping counts from the last improvement by more than min_delta; export.best takes the best value
    whatever min_delta, so the two may name different steps, and the message says which one it means."""
    from peftkit.selection import Selection, Watch

    selection = Selection(Watch("loss", True, 0.5), 2, Watch("loss", True))
    for step, value in ((1, 4.0), (2, 3.8), (3, 3.7)):
        selection.observe(step, {"loss": value}, dict)
    assert selection.should_stop
    assert selection.stop_reason() == ("early stopping: eval loss has not improved by more than min_delta 0.5 (lower "
                                       "is better) for 2 evaluations, since 4.0000 at step 1")
    assert selection.summary(trained_all=False) == {"stopped_early": True,
                                                    "best": {"metric": "eval_loss", "value": 3.7, "step": 3}}


def test_eval_steps_without_data_eval_is_said(tiny_llama, number_data, tmp_path):
    """training.eval_steps without data.eval evaluates nothing: it was accepted without a word."""
    from peftkit.errors import PeftkitWarning
    from peftkit.start_checks import _check_evaluations

    cfg = load_recipe(make_recipe(tmp_path, tiny_llama, number_data, training={"eval_steps": 2}, data={"eval": None}))
    with pytest.warns(PeftkitWarning, match=r"^training.eval_steps is 2, but this recipe has no data.eval to evaluate "
                                            r"on, so nothing is evaluated during training; set data.eval, or remove "
                                            r"training.eval_steps.$"):
        _check_evaluations(cfg, 6)


def test_early_stopping_on_evaluations_that_were_never_finite_says_so(tiny_llama, number_data, tmp_path, monkeypatch):
    """An eval loss NaN at every evaluation never improves, so patience 2 stops the run at step 2, which then fails
    as any run with a non-finite final eval loss does. The stop's message formatted the best value, None: a
    TypeError traceback."""
    import peftkit.evaluate as evaluate_mod
    from peftkit.finish import TrainingFailed

    monkeypatch.setattr(evaluate_mod, "evaluate_loss", lambda *a, **k: {"loss": math.nan, "perplexity": math.nan,
                                                                          "num_tokens": 1})
    recipe = make_recipe(tmp_path, tiny_llama, number_data, eval={"base_model": False},
                         training={"max_steps": 6, "eval_steps": 1, "early_stopping": {"patience": 2}})
    with pytest.raises(TrainingFailed, match="The final eval loss is nan"):
        train(load_recipe(recipe))
    assert max(x["step"] for x in _lines(tmp_path / "run")) == 2


def test_too_few_evaluations_for_early_stopping_or_export_best_are_said(tiny_llama, number_data, tmp_path):
    """eval_steps 4 in 10 steps makes 2 evaluations before the last step (4, 8): early stopping with patience 2
    needs 3 (one to improve on, two without), so it could never stop the run; eval_steps 10 leaves export.best the
    final evaluation only. Both were accepted without a word."""
    import warnings

    from peftkit.errors import PeftkitWarning
    from peftkit.start_checks import _check_evaluations

    def said(training, export=None):
        cfg = load_recipe(make_recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 10} | training,
                                      export=export or {}))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _check_evaluations(cfg, 10)
        return [str(w.message) for w in caught if w.category is PeftkitWarning]

    assert said({"eval_steps": 4, "early_stopping": {"patience": 2}}) == [(
        "training.early_stopping.patience is 2, and training.eval_steps 4 makes 2 evaluation(s) before the run's last "
        "step (10): too few for it ever to stop the run, which needs 3; lower eval_steps or patience.")]
    assert said({"eval_steps": 3, "early_stopping": {"patience": 2}}) == []  # 3, 6, 9
    assert said({"eval_steps": 10}, {"best": True}) == [(
        "export.best: training.eval_steps 10 makes 0 evaluation(s) before the run's last step (10), so the final "
        "evaluation is the only one and its adapter, the final one, is exported; lower eval_steps.")]
    assert said({"eval_steps": 9}, {"best": True}) == []


def test_save_steps_longer_than_the_run_is_said(tiny_llama, number_data, tmp_path):
    """save_steps 20 in a 10-step run writes no checkpoint, so a run stopped midway had nothing to --resume from, and
    nothing said so; 10 checkpoints the last step."""
    import warnings

    from peftkit.errors import PeftkitWarning

    def said(save_steps):
        recipe = make_recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 10, "save_steps": save_steps})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(load_recipe(recipe, ["training.eval_steps=null"]), overwrite=True)
        return [str(w.message) for w in caught if w.category is PeftkitWarning and "save_steps" in str(w.message)]

    assert said(20) == ["training.save_steps is 20, longer than the run's 10 steps, so no checkpoint is written and a "
                        "run stopped midway cannot --resume; lower save_steps."]
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
    assert said(10) == []
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-00000010"]


# ------------------------------------------------------------------- a metric of another evaluation set

def _two_sets(tmp_path, tiny_llama, number_data, early_stopping: dict, best) -> Path:
    """12 steps evaluated on number_data's eval file (numbers, the primary set) and a text set (general) at each
    step, a checkpoint at each. The tiny model's general loss is lowest at step 8 and then rises (it forgets), while
    the numbers loss falls to the end: a metric mix-up picks another step."""
    from peftkit.tiny import write_jsonl

    general = tmp_path / "general.jsonl"
    write_jsonl(general, [{"text": f"The cat sat on mat number {k}."} for k in range(6)])
    return make_recipe(tmp_path, tiny_llama, number_data,
                       data={"eval": {"numbers": str(number_data["eval"]),
                                      "general": {"path": str(general), "format": "text"}}},
                       training={"max_steps": 12, "eval_steps": 1, "save_steps": 1, "save_total_limit": 20,
                                 "early_stopping": early_stopping},
                       export={"best": best, "report": True}, eval={"base_model": False})


def _stop_step(values: list[tuple[int, float]], patience: int) -> int | None:
    """The step at which `patience` evaluations in a row have not lowered the loss below its best so far."""
    best, stale = math.inf, 0
    for step, value in values:
        best, stale = (value, 0) if value < best else (best, stale + 1)
        if stale == patience:
            return step
    return None


def test_early_stopping_and_export_best_follow_a_named_eval_set(tiny_llama, number_data, tmp_path):
    """early_stopping.metric general.loss (mode auto: lower is better) stops where eval_general_loss in metrics.jsonl
    says, which the primary set's eval_loss would not (it falls to the end), and export.best: true exports the
    adapter of that set's best step. Before, a dotted name was refused: not a metric computed."""
    from io import StringIO

    from rich.console import Console

    recipe = _two_sets(tmp_path, tiny_llama, number_data, {"metric": "general.loss", "patience": 2}, True)
    out = StringIO()
    summary = train(load_recipe(recipe), console=Console(file=out, width=1000))
    run = tmp_path / "run"
    evals = [x for x in _lines(run) if "eval_loss" in x]
    general = [(x["step"], x["eval_general_loss"]) for x in evals]
    stop = _stop_step(general, 2)
    assert stop is not None and (summary["steps"], summary["stopped_early"]) == (stop, True)
    assert [x["step"] for x in evals] == list(range(1, stop + 1))
    assert _stop_step([(x["step"], x["eval_loss"]) for x in evals], 2) is None  # the primary set's would go on
    best_step, best_value = min(general, key=lambda sv: sv[1])
    assert summary["best"] == {"metric": "eval_general_loss", "value": best_value, "step": best_step}
    assert best_step == stop - 2 and summary["eval_general_loss"] == best_value  # that evaluation's figures
    assert _same(_weights(run / "adapter"), _weights(run / "checkpoints" / f"step-{best_step:08d}"))
    assert "early stopping: eval general.loss has not improved by more than min_delta 0.0" in out.getvalue()
    assert "exported adapter: the best eval_general_loss" in (run / "report" / "report.html").read_text()


def test_export_best_by_a_named_eval_set_while_stopping_on_the_primary_one_survives_a_resume(tiny_llama, number_data,
                                                                                              tmp_path):
    """Stop on the in-domain loss (which never stalls here) and export the best adapter by the general set's loss:
    the exported adapter is the checkpoint of the step with the lowest eval_general_loss, the manifest says so, the
    checkpoint's selection state reads back with the dotted name, and a resume after that step exports the same
    bytes."""
    from peftkit.selection import Selection

    recipe = _two_sets(tmp_path, tiny_llama, number_data, {"metric": "loss", "patience": 3}, "general.loss")
    summary = train(load_recipe(recipe))
    run = tmp_path / "run"
    evals = [x for x in _lines(run) if "eval_loss" in x]
    best_step, best_value = min(((x["step"], x["eval_general_loss"]) for x in evals), key=lambda sv: sv[1])
    assert summary["steps"] == 12 and best_step not in (12, min(evals, key=lambda x: x["eval_loss"])["step"])
    exported = (run / ADAPTER).read_bytes()
    assert _same(_weights(run / "adapter"), _weights(run / "checkpoints" / f"step-{best_step:08d}"))
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["metrics"]["best"] == {"metric": "eval_general_loss", "value": best_value, "step": best_step}

    later = run / "checkpoints" / f"step-{best_step + 1:08d}"
    selection = Selection.of(load_recipe(recipe))
    selection.load(later)
    assert (selection.best.metric, selection.best.lower, selection.best.step, selection.best.value) == (
        "general.loss", True, best_step, best_value)
    assert _same(selection.best_weights, _weights(run / "checkpoints" / f"step-{best_step:08d}"))
    for step in range(best_step + 2, 13):  # as if killed after the step past the best
        shutil.rmtree(run / "checkpoints" / f"step-{step:08d}")
    (run / "manifest.json").unlink()
    assert train(load_recipe(recipe), resume=True)["best"] == summary["best"]
    assert (run / ADAPTER).read_bytes() == exported


@pytest.mark.parametrize(("eval_sets", "sections", "expected"), [
    (True, dict(training={"eval_steps": 2, "early_stopping": {"metric": "generl.loss"}}),
     "training.early_stopping.metric: 'generl.loss' is a metric of data.eval's set 'generl', and data.eval has "
     "no set of that name. Did you mean 'general'? Its sets: numbers, general."),
    (True, dict(training={"eval_steps": 2}, export={"best": "other.loss"}),
     "export.best: 'other.loss' is a metric of data.eval's set 'other', and data.eval has no set of that name. "
     "Its sets: numbers, general."),
    (False, dict(training={"eval_steps": 2, "early_stopping": {"metric": "general.loss"}}),
     "training.early_stopping.metric: 'general.loss' is a metric of data.eval's set 'general', and data.eval is "
     "one dataset, whose figures are eval_loss, ...; write 'loss', or give data.eval several sets by name: "
     "`eval: {NAME: path, ...}`."),
    (True, dict(training={"eval_steps": 2, "early_stopping": {"metric": ".loss"}}),
     "training.early_stopping.metric: '.loss' has no set name before its dot; write NAME.METRIC for a set of "
     "data.eval (general.loss), or the metric alone for the primary set's (loss)."),
    (True, dict(training={"eval_steps": 2}, export={"best": ".loss"}),
     "export.best: '.loss' has no set name before its dot;"),
    (False, dict(training={"eval_steps": 2}, export={"best": "general."}),
     "export.best: 'general.' has no metric after its dot; write NAME.METRIC"),
    (True, dict(training={"eval_steps": 2}, export={"best": "general.exact_match"}),
     "export.best: metric 'general.exact_match' is not computed during training (computed: general.loss, "
     "general.perplexity); use one of those, or add 'exact_match' to eval.metrics."),
])
def test_a_bad_metric_of_a_named_eval_set_is_a_recipe_error(eval_sets, sections, expected, tiny_llama, number_data,
                                                            tmp_path, monkeypatch, capsys):
    if eval_sets:
        sections["data"] = {"eval": {"numbers": str(number_data["eval"]), "general": str(number_data["eval"])}}
    recipe = make_recipe(tmp_path, tiny_llama, number_data, **sections)
    err = " ".join(cli_user_error(monkeypatch, capsys, "validate", str(recipe)).split())
    key = "metric:" if expected.startswith("training") else "best:"  # said at the line that names the metric
    line = next(i for i, text in enumerate(recipe.read_text().splitlines(), 1) if text.strip().startswith(key))
    assert f"{recipe}:{line}: {expected}" in err, err


def test_a_dotted_metric_of_the_primary_set_is_its_plain_one(tiny_llama, number_data, tmp_path):
    """`numbers.loss`, numbers being data.eval's first set, is the figure eval_loss: what `loss` follows."""
    from peftkit.selection import Selection

    sets = {"numbers": str(number_data["eval"]), "general": str(number_data["eval"])}
    cfg = load_recipe(make_recipe(tmp_path, tiny_llama, number_data, data={"eval": sets}, export={"best": "general.loss"},
                                  training={"eval_steps": 2, "early_stopping": {"metric": "numbers.perplexity"}}))
    selection = Selection.of(cfg)
    assert (selection.stopper.metric, selection.stopper.lower, selection.best.metric) == (
        "perplexity", True, "general.loss")
    selection.observe(2, {"loss": 1.0, "perplexity": 2.7, "sets": {"general": {"loss": 3.0, "perplexity": 20.1}}}, dict)
    assert (selection.stopper.value, selection.best.value, selection.summary(False)["best"]["metric"]) == (
        2.7, 3.0, "eval_general_loss")
