"""What `peftkit eval` evaluates, resolved from its arguments: a job (`EvalJob`) of a model source, one data source
read as training reads it, and the metrics and generation settings, from a recipe (or a run directory) with flags
over it, or from flags alone. `peftkit.evaluate` runs a job."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

from peftkit.decoding import Sampling
from peftkit.errors import PeftkitError, PeftkitWarning
from peftkit.inference import (ModelSource, check_base_is_there, check_choices, check_no_overrides, hub_data_flags,
                               recipe_source)
from peftkit.metrics import CLASSIFICATION_METRICS, GENERATION_METRICS, LOSS_METRICS, NORMALIZATIONS, parse_metrics
from peftkit.recipe import DataConfig, EvalConfig, TrainingConfig


@dataclass
class EvalJob:
    """What `peftkit eval` evaluates: a model (or base + adapter) on one data source, as training reads it."""

    data: str
    data_cfg: DataConfig
    split: str = "train"
    source: ModelSource = field(default_factory=ModelSource)
    batch_size: int = 8
    metrics: list[str] = field(default_factory=lambda: list(LOSS_METRICS))
    """Loss metrics (`loss`, `perplexity`) and generation metrics (`exact_match`, ...: `peftkit.metrics`)."""
    sampling: Sampling = field(default_factory=Sampling)
    """How generation metrics generate: greedy, up to max_new_tokens."""
    normalize: str = "squad"
    predictions: Path | None = None
    """Write one JSON line per row here: prompt, prediction, reference."""
    task: int | None = None
    """--task: every row's task id (multitask prompt tuning); without it, the rows' own `task` (`peftkit.task_ids`)."""
    untasked: int | None = None
    """The task of data without a `task` column: 0 for a recipe's own data, which training read so; None for data
    given apart, which must say (or --task)."""
    name: str | None = None
    """A comparison's name for the model: its progress lines say which model they are about."""
    eval_sets: list[str] = field(default_factory=list)
    """The names of the recipe's data.eval sets where it has several and no --data was given (this job evaluates
    the first): `peftkit eval` evaluates each."""
    preference: tuple = (TrainingConfig().dpo_beta, TrainingConfig().dpo_loss, 0.0, 0.0)
    """Preference pairs (data.format 'preference'): the `PreferenceLoss` (beta, kind, gamma, center) the figures are
    computed with, the recipe's objective's (DPO's defaults without a recipe; a reward model's loss for a
    classifier of one output); unpaired answers (data.format 'unpaired'): ("kto", beta, desirable weight,
    undesirable weight), a `KTOLoss`'s (`peftkit.evaluate_pairs.objective_of`)."""
    init_from: str | None = None
    """The recipe's adapter.init_from: a preference evaluation's reference is that adapter over the base, as the
    DPO run's was (`peftkit.evaluate_pairs.evaluate_preference`)."""
    start: str | None = None
    """The title of a recipe's start where the job evaluates it (`_from_the_start`): "start (init_from: NAME)"."""
    seed: int = 0
    """What a base's new classification head (a headless base scored as a classifier or a reward model) is drawn
    from: the recipe's training.seed, as its run drew the head its base evaluation scored; 0 without a recipe."""


def set_predictions(path: Path, eval_set: str) -> Path:
    """The --predictions file of data.eval's set `eval_set` where `peftkit eval` evaluates several: the set's name
    before the suffix (preds.jsonl: preds.general.jsonl; a comparison's DIR/base.jsonl: DIR/base.general.jsonl),
    each set's answers in a file of their own, as one set's are."""
    return path.with_name(f"{path.stem}.{eval_set}{path.suffix}")


def eval_job(recipe: Path | None, overrides: list[str], model: str | None, data: str | None, fmt: str | None,
             adapter: str | None, max_length: int | None, batch_size: int | None, on_bad_rows: str | None,
             trust_remote_code: bool = False, metrics: str | None = None, max_new_tokens: int | None = None,
             normalize: str | None = None, predictions: Path | None = None, task: int | None = None, *,
             comparing: bool = False, split: str | None = None, data_revision: str | None = None,
             eval_set: str | None = None, base: ModelSource | None = None) -> EvalJob:
    """The `peftkit eval` arguments as one job. With a recipe (or a run directory, read through its recipe.yaml,
    whose adapter/ is then the default --adapter) its model, data.eval, format and eval settings are the
    defaults and flags override them; without one, --data and --model (or --adapter) are needed and the rest take the
    recipe defaults, so figures are comparable with training's (a run's eval.metrics, eval.max_new_tokens and
    eval.normalize too: `peftkit eval RUN_DIR` gives the run's final figures). `comparing`: the candidates are
    named apart (--adapter NAME=DIR, --merged), and the recipe gives the base only. `split`, `data_revision`: what is
    read of a hub dataset given as `data` (`hub_data_flags`). `eval_set`: which set of the recipe's data.eval is
    evaluated without `data` (default: the primary one). `base`: a comparison's base row without a recipe or --model,
    as its candidates record it (`peftkit.compare_base.comparison_base`)."""
    if recipe is None:
        job, eval_cfg = _job_without_recipe(overrides, model, data, adapter, comparing, base), EvalConfig()
    else:
        job, eval_cfg = _job_of_recipe(recipe, overrides, model, data, adapter, trust_remote_code, comparing, eval_set)
    check_choices(fmt, on_bad_rows)
    _apply_data_flags(job, recipe, data, fmt, max_length, on_bad_rows, split, data_revision)
    if recipe is not None and not (model or adapter or comparing):
        _from_the_start(job)
    job.source = job.source.with_flags(model, adapter, trust_remote_code)
    check_base_is_there(job.source, recipe)
    job.source.check_adapter_task()
    job.batch_size = batch_size or job.batch_size
    job.metrics = parse_metrics(metrics) if metrics else list(dict.fromkeys([*job.metrics, *eval_cfg.metrics]))
    normalize_flag, normalize = normalize, normalize or eval_cfg.normalize
    job.sampling = Sampling(max_new_tokens=max_new_tokens or eval_cfg.max_new_tokens)
    job.normalize, job.predictions, job.task = normalize, predictions, task
    job.sampling.check()
    if normalize not in NORMALIZATIONS:
        raise PeftkitError(f"--normalize {normalize!r}: use one of {', '.join(NORMALIZATIONS)}.")
    if job.data_cfg.format in ("preference", "unpaired"):  # (pairs, unpaired answers: peftkit.evaluate_pairs)
        from peftkit.evaluate_pairs import preference_job

        preference_job(job, comparing, {"--metrics": metrics, "--predictions": predictions,
                                         "--max-new-tokens": max_new_tokens, "--normalize": normalize_flag})
        return job
    if job.data_cfg.format == "classification":
        _classification_job(job)
    elif labelled := [m for m in job.metrics if m in CLASSIFICATION_METRICS]:
        raise PeftkitError(f"--metrics {','.join(labelled)}: {' and '.join(labelled)} score{'s' * (len(labelled) == 1)} a classifier's predicted "
                           f"labels, on data.format 'classification' rows; these rows are '{job.data_cfg.format}'. "
                           f"Use {', '.join((*LOSS_METRICS, *GENERATION_METRICS))} (or --format "
                           "classification for rows with text and label).")
    _check_generation_flags(job, normalize_flag, max_new_tokens, predictions)
    return job


def _job_without_recipe(overrides: list[str], model: str | None, data: str | None, adapter: str | None,
                        comparing: bool, base: ModelSource | None) -> EvalJob:
    """`eval_job`'s job from flags alone: --data, and --model or --adapter (or a comparison's recorded `base`)."""
    if comparing and not data:
        raise PeftkitError("peftkit eval of a comparison (--adapter NAME=DIR, --merged) needs the data to compare "
                           "the candidates on: --data FILE, or a RECIPE (or a run directory) whose data.eval it is.")
    if comparing and not (model or base):  # (the CLI gives `base`: what the candidates record)
        raise PeftkitError("peftkit eval of a comparison (--adapter NAME=DIR, --merged) needs the base the "
                           "candidates are compared on, its base row: --model M, or a RECIPE (or a run directory) "
                           "whose model it is.")
    if not (model or adapter or base) or not data:  # (an adapter alone: over its recorded base)
        raise PeftkitError("peftkit eval needs a RECIPE (or a run directory), or both --model and --data (or "
                           "--adapter DIR and --data: the adapter over its recorded base).")
    check_no_overrides(overrides, "eval")
    return EvalJob(data=data, data_cfg=DataConfig(train=data), source=base or ModelSource())


def _job_of_recipe(recipe: Path, overrides: list[str], model: str | None, data: str | None, adapter: str | None,
                   trust_remote_code: bool, comparing: bool, eval_set: str | None) -> tuple[EvalJob, EvalConfig]:
    """`eval_job`'s job from a recipe (or a run directory) before the flags apply, and the recipe's eval section: its
    model (and a run's adapter/), its data.eval set `eval_set` (or --data read as the recipe reads its data), its
    eval batch size, preference objective, adapter.init_from and training.seed."""
    from peftkit.evaluate_pairs import recipe_objective

    cfg, run_adapter = recipe_source(recipe, overrides, named=bool(model or adapter or comparing),
                                     trust_remote_code=trust_remote_code)
    sets = cfg.data.eval_sources()
    name = eval_set or next(iter(sets), None)  # data.eval's set to evaluate: the primary one by default
    source = data or (sets[name].path if name else None)
    if not source:
        raise PeftkitError(f"{recipe} has no data.eval to evaluate on; pass --data FILE (or set data.eval).")
    if not data and Path(source).is_absolute() and not Path(source).exists():  # a moved project, a copied run
        raise PeftkitError(f"data.eval {source} of {recipe} is not there: moved or deleted since? Give the data "
                           "with --data FILE.")
    # data.revision is the recipe's datasets' revision, not another dataset's given with --data; a dataset of
    # data.train's list (or data.eval's mapping) is read with its own columns and format
    own = cfg.data.for_eval(name) if data is None else cfg.data.reading(data)
    ours = data is None or data in {entry.path for entry in sets.values()}
    job = EvalJob(data=source, data_cfg=own, split=sets[name].split if not data else "train",
                  source=ModelSource.of_recipe(cfg, run_adapter),
                  batch_size=cfg.eval.batch_size, untasked=0 if ours else None,
                  eval_sets=list(sets) if isinstance(cfg.data.eval, dict) and not data and not eval_set else [],
                  preference=recipe_objective(cfg), init_from=cfg.adapter.init_from, seed=cfg.training.seed)
    return job, cfg.eval


def _from_the_start(job: EvalJob) -> None:
    """A recipe with adapter.init_from, and no adapter of its own (a run directory's adapter/, --adapter; nor --model),
    is evaluated from its run's start, the base with that adapter, titled as train titles its figures before training
    ("start (init_from: NAME)", `peftkit.start_eval`): the bare base's figures, which eval gave, no run of the recipe
    gives. DPO's pairs and KTO's answers keep init_from as the reference an adapter is scored against (their run
    evaluates no start: its figures are the reference's own)."""
    if not job.init_from or job.source.adapter is not None:
        return
    if job.data_cfg.format in ("preference", "unpaired"):
        from peftkit.evaluate_pairs import objective_of

        if objective_of(job).needs_reference:
            return
    from peftkit.start_eval import from_the_start

    job.source, job.start = from_the_start(job.source, job.init_from)


def _apply_data_flags(job: EvalJob, recipe: Path | None, data: str | None, fmt: str | None, max_length: int | None,
                      on_bad_rows: str | None, split: str | None, data_revision: str | None) -> None:
    """--format, --max-length, --on-bad-rows, --split and --data-revision over `job`'s data config, its errors naming
    the flag where one was given (or there is no recipe whose key they could name)."""
    job.split, job.data_cfg = hub_data_flags(data, split, data_revision, job.data_cfg, job.split)
    updates = {k: v for k, v in (("format", fmt), ("max_length", max_length), ("on_bad_rows", on_bad_rows)) if v}
    job.data_cfg = job.data_cfg.model_copy(update=updates)
    job.data_cfg._flags = ("--format", "--on-bad-rows")  # errors name them beside a recipe key
    if fmt or recipe is None:  # errors name the flag, not a recipe key (data.format, an entry's), or no recipe's
        job.data_cfg._format_key = "--format"
    if on_bad_rows or recipe is None:
        job.data_cfg._on_bad_rows_key = "--on-bad-rows"


def _check_generation_flags(job: EvalJob, normalize_flag: str | None, max_new_tokens: int | None,
                            predictions: Path | None) -> None:
    """--normalize and --max-new-tokens without a metric they change are warned of; --predictions without a
    generation metric, which would write nothing, is refused."""
    # stacklevel 3: the warnings point at `eval_job`'s caller, as they did when `eval_job` gave them itself
    if normalize_flag is not None and not {"exact_match", "token_f1"} & set(job.metrics):
        warnings.warn(f"--normalize {normalize_flag}: only exact_match and token_f1 are normalized, and neither is "
                      f"among the metrics ({', '.join(job.metrics)}); add --metrics exact_match to use it.",
                      PeftkitWarning, stacklevel=3)
    if max_new_tokens is not None and not any(m in GENERATION_METRICS for m in job.metrics):
        warnings.warn(f"--max-new-tokens {max_new_tokens}: only the generation metrics ({', '.join(GENERATION_METRICS)}) "
                      f"generate, and none is among the metrics ({', '.join(job.metrics)}); add --metrics exact_match "
                      "to use it.", PeftkitWarning, stacklevel=3)
    if predictions is not None and not any(m in GENERATION_METRICS for m in job.metrics):
        raise PeftkitError(f"--predictions: nothing is generated without a generation metric; add --metrics "
                           f"{GENERATION_METRICS[0]} (or {', '.join(GENERATION_METRICS[1:])}).")


def _classification_job(job: EvalJob) -> None:
    """A job on data.format: classification scores predicted classes: loss, accuracy, macro_f1, never generated text."""
    if generated := [m for m in job.metrics if m in GENERATION_METRICS]:
        raise PeftkitError(f"--metrics {','.join(generated)}: data.format 'classification' is scored by predicted "
                           f"class, not generated text; a classifier's eval reports loss, "
                           f"{', '.join(CLASSIFICATION_METRICS)} (drop --metrics, or pass --metrics accuracy).")
    if job.predictions is not None:  # (not the generation metrics' advice below: they are refused here)
        raise PeftkitError("--predictions writes generated answers, and a classifier (data.format 'classification') "
                           "generates none: drop --predictions.")
    job.metrics = ["loss", *CLASSIFICATION_METRICS]
