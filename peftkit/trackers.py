"""Experiment trackers (`training.report_to`): TensorBoard, Weights & Biases and MLflow through accelerate's
tracker API. metrics.jsonl stays the record of a run; a tracker gets a copy of each of its lines.

Where they write: TensorBoard under `<output_dir>/trackers/<run name>/`; MLflow to `MLFLOW_TRACKING_URI`, by
default the SQLite store `<output_dir>/trackers/mlflow.db` (MLflow 3 refuses its plain file store unless told to
allow it); W&B offline (files under `<output_dir>/trackers/wandb`) unless `WANDB_MODE` is set, so no account is
needed. The recipe goes along as the run's hyperparameters, as its recipe.yaml records it (a hub adapter as
`user/name@COMMIT`, `peftkit.recipe.recorded`).

On --resume the trackers continue the run's own records, as metrics.jsonl does: TensorBoard purges what was logged
after the checkpoint (the resumed run logs those steps again), and MLflow and online W&B continue the same run (ids
in `trackers/runs.json`; a store without the MLflow run is an error). W&B cannot resume an offline run
(wandb/wandb#2423): each resumed part is a new run, which starts with metrics.jsonl's records up to the checkpoint,
so the newest holds the whole run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from pathlib import Path

from peftkit.errors import PeftkitError, PeftkitWarning, Stopped

PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",)}
DIRECTORY = "trackers"
RUN_IDS = "runs.json"


def check_trackers(report_to: list[str]) -> None:
    """A PeftkitError naming the package to install for each tracker whose package is missing."""
    missing = [name for name in report_to if not any(importlib.util.find_spec(p) for p in PACKAGES[name])]
    if missing:
        one = len(missing) == 1
        need = "needs its package, which is" if one else "need their packages, which are"
        raise PeftkitError(
            f"training.report_to: {' and '.join(missing)} {need} not installed; run "
            f"`pip install {' '.join(PACKAGES[m][0] for m in missing)}`, or remove {'it' if one else 'them'} from "
            "training.report_to."
        )
    # mlflow-skinny is `mlflow` without SQLAlchemy and alembic, which a SQLite store needs: peftkit's own included
    own = "MLFLOW_TRACKING_URI" not in os.environ
    if "mlflow" in report_to and (own or os.environ["MLFLOW_TRACKING_URI"].startswith("sqlite:")) and not all(
            importlib.util.find_spec(p) for p in ("sqlalchemy", "alembic")):
        store = "its own store, <output_dir>/trackers/mlflow.db" if own else "the store MLFLOW_TRACKING_URI names"
        raise PeftkitError(
            f"training.report_to: mlflow would log to {store}, a SQLite database, which needs the full mlflow package "
            "(this one lacks SQLAlchemy and alembic, as mlflow-skinny does); run `pip install mlflow`, or set "
            "MLFLOW_TRACKING_URI to a tracking server."
        )


def flat_config(recipe_dict: dict, prefix: str = "") -> dict:
    """The recipe as `section.key: value` with scalar values (trackers take no nesting; lists become text)."""
    flat = {}
    for key, value in recipe_dict.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flat_config(value, f"{name}.")
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:  # None, lists
            flat[name] = str(value)
    return flat


class Trackers:
    """The run's trackers on one accelerator; `log` sends a metrics.jsonl record, `close` ends them.

    `resumed`: on --resume, the checkpoint's step and the metrics.jsonl records kept (up to that step)."""

    def __init__(self, accelerator, recipe, out: Path, resumed: tuple[int, list[dict]] | None = None) -> None:
        from peftkit.fileio import atomic_write_text

        self.accelerator = accelerator
        names, directory = recipe.training.report_to, (out / DIRECTORY).resolve()
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        ids = (json.loads((directory / RUN_IDS).read_text(encoding="utf-8"))
               if resumed and (directory / RUN_IDS).is_file() else {})
        # For this run only (until close), the user's own settings winning: the run's own store, and no telemetry
        # (MLflow 3 posts usage data to mlflow-telemetry.io from `import mlflow` on; a run makes no network call).
        self.own_env = {key: value for key, value in (("MLFLOW_TRACKING_URI", f"sqlite:///{directory / 'mlflow.db'}"),
                                                      ("MLFLOW_DISABLE_TELEMETRY", "true"))
                        if "mlflow" in names and key not in os.environ}
        os.environ.update(self.own_env)
        wandb_mode = os.environ.get("WANDB_MODE", "offline")
        init = {"wandb": {"mode": wandb_mode, "dir": str(directory)}
                         | ({"id": ids["wandb"], "resume": "allow"} if "wandb" in ids and wandb_mode != "offline" else {}),
                "mlflow": {"logging_dir": str(directory / "mlartifacts"), "run_id": ids.get("mlflow")},
                # Events from this step on, logged before the run stopped, are hidden: the resumed run logs them again.
                "tensorboard": {"purge_step": resumed[0]} if resumed else {}}
        from peftkit.recipe import recorded

        config = flat_config(recorded(recipe).model_dump(mode="json"))  # as recipe.yaml: hub adapters pinned
        try:
            if ids.get("mlflow") and "mlflow" in names:
                _check_mlflow_run(ids["mlflow"], directory / RUN_IDS)
            # TensorBoard keeps the recipe from the first start: each add_hparams is a run of its own (a directory
            # named by the time), so a resumed run showed up once per start. The others take it again (an offline
            # wandb run resumes as a new one; MLflow's run accepts the same values).
            accelerator.init_trackers(out.resolve().name, config=None if resumed else config,
                                      init_kwargs={n: init[n] for n in names})
            for name in names if resumed else ():
                if name != "tensorboard":
                    accelerator.get_tracker(name).store_init_configuration(config)
        except BaseException:
            self.close()
            raise
        if resumed:
            continued = {"wandb": "id" in init["wandb"], "mlflow": bool(ids.get("mlflow"))}  # the stopped run's
            self._log_kept(names, resumed, [n for n in continued if n in names and not continued[n]])
        run_id = {"wandb": lambda run: run.id, "mlflow": lambda run: run.info.run_id}
        if ids := {n: run_id[n](accelerator.get_tracker(n, unwrap=True)) for n in names if n in run_id}:
            atomic_write_text(directory / RUN_IDS, json.dumps(ids, indent=2))

    def _log_kept(self, names: list[str], resumed: tuple[int, list[dict]], new: list[str]) -> None:
        """What metrics.jsonl kept of a resumed run: TensorBoard's records of the purged step, and every record to a
        `new` run (W&B offline, which cannot resume one; MLflow without a run id in runs.json), which else had only
        the steps after the checkpoint, while the stopped run's own may have none (a killed W&B run's offline file
        kept only its header)."""
        for record in resumed[1]:
            purged = ["tensorboard"] if "tensorboard" in names and record["step"] == resumed[0] else []
            for name in new + purged:
                self.accelerator.get_tracker(name).log(_scalars(record), step=record["step"])

    def log(self, record: dict) -> None:
        """A full disk is a DiskFullError naming the trackers' directory (TensorBoard's writer raised OSError)."""
        from peftkit.fileio import _disk_errors

        with _disk_errors(self.directory):
            self.accelerator.log(_scalars(record), step=record["step"])

    def _end_unfinished(self, stopped: bool) -> None:
        names = [tracker.name for tracker in self.accelerator.trackers]
        if "mlflow" in names:
            import mlflow

            mlflow.end_run(status="KILLED" if stopped else "FAILED")
        if "wandb" in names:
            self.accelerator.get_tracker("wandb", unwrap=True).finish(exit_code=1)

    def close(self, ended_by: BaseException | None = None) -> None:
        """End the trackers; one that cannot write its last events (a full disk) is said, not raised: closing runs
        while another error (the full disk's own) is on its way to the user. `ended_by`: the error that ended the
        run before its end, which accelerate's own ending marked a success: MLflow's run is then KILLED (stopped by
        a signal) or FAILED, and W&B's run failed (exit code 1)."""
        try:
            if ended_by is not None:
                self._end_unfinished(isinstance(ended_by, Stopped | KeyboardInterrupt))
            self.accelerator.end_training()
        except OSError as e:
            warnings.warn(PeftkitWarning(f"the trackers of {self.directory} could not be closed ({e}); their last "
                                         "events may be missing."), stacklevel=2)
        finally:
            for key in self.own_env:
                os.environ.pop(key, None)


def _check_mlflow_run(run_id: str, run_ids: Path) -> None:
    """A PeftkitError where the store MLFLOW_TRACKING_URI names lacks the run --resume continues (the run logged to
    another store, or its mlflow.db was removed): MLflow's own error was a traceback."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.tracking.MlflowClient().get_run(run_id)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise PeftkitError(
            f"training.report_to: the MLflow run {run_id} that {run_ids} names for --resume to continue is not in the "
            f"store MLFLOW_TRACKING_URI names ({mlflow.get_tracking_uri()}). Set MLFLOW_TRACKING_URI to the store the "
            f"run logged to, or remove the \"mlflow\" entry of {run_ids} to go on in a new MLflow run.") from None


def _scalars(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
