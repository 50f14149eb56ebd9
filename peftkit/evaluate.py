"""Loss and perplexity of a model on a dataset (mean next-token cross-entropy over the labelled tokens), and task
metrics of its greedy answers to the rows' prompts: for `peftkit eval` and for the evaluations of a training run
(`RunEval`), which share `generation_scores` so that a run's final metrics are what `peftkit eval` gives."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from peftkit.data import Example, Examples, eval_loader
from peftkit.data.checks import guard_token_ids
from peftkit.data.packing import VARLEN_KEYS
from peftkit.decoding import Sampling, check_room, generate_texts, length_batches, padding_hides_virtual_tokens
from peftkit.distributed import sharded
from peftkit.errors import PeftkitError, PeftkitWarning
from peftkit.fileio import atomic_write_text
from peftkit.inference import (ModelSource, check_base_is_there, check_choices, check_no_overrides, hub_data_flags,
                               recipe_source)
from peftkit.loss import labelled_count, next_token_loss_sum
from peftkit.methods.virtual import task_inputs
from peftkit.metrics import CLASSIFICATION_METRICS, GENERATION_METRICS, LOSS_METRICS, NORMALIZATIONS, parse_metrics, score
from peftkit.progress import work
from peftkit.recipe import DataConfig, EvalConfig, ModelConfig, Recipe, TrainingConfig
from peftkit.task_ids import adapter_task_count, with_tasks


def token_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor],
                   labelled: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropies over labelled positions, number of labelled positions); `labelled`, their
    number counted on the CPU (`labelled_count`), spares the loss a host sync on a GPU.

    Summing and dividing by the token count of the whole accumulation window (not averaging per
    micro-batch) weights every token equally however the padding falls.
    """
    # A packed batch (data.packing) goes in with its position ids and no mask: transformers then masks per example;
    # flattened for flash attention, with the examples' boundaries (`peftkit.data.packing.flatten`).
    packed = "position_ids" in batch
    inputs = {"input_ids": batch["input_ids"]} | ({"position_ids": batch["position_ids"]} if packed
                                                  else {"attention_mask": batch["attention_mask"]})
    inputs |= {k: batch[k] for k in VARLEN_KEYS if k in batch}
    inputs |= task_inputs(model, batch)  # per-row task ids, for a method that reads them (multitask prompt tuning)
    logits = model(**inputs, use_cache=False).logits
    return next_token_loss_sum(logits, batch["labels"], labelled)  # tensors: the caller decides when to sync


@torch.no_grad()
def evaluate_loss(model: nn.Module, examples: Sequence[Example], batch_size: int, pad_id: int,
                  processes=None, advance: Callable[[int], None] | None = None) -> dict[str, float]:
    """{'loss', 'perplexity', 'num_tokens'} of `model` on `examples` (eval mode, restored afterwards).

    `processes` (an accelerate Accelerator, several processes): each evaluates every num_processes-th batch and the
    sums are added across processes, so N processes evaluate N times faster. Every process runs as many forwards
    (one short of batches repeats its first, uncounted), which keeps FSDP's collectives in step. `advance(n)`:
    told of each batch's n examples (a progress bar)."""
    rank, world = (processes.process_index, processes.num_processes) if processes is not None else (0, 1)
    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.long, device=device)
    batches = -(-len(examples) // batch_size)
    rounds, first, done = -(-batches // world), None, 0  # rounds: batches per process, rounded up
    try:
        for i, batch in enumerate(eval_loader(examples, batch_size, pad_id)):
            first = batch if first is None else first
            if i % world == rank:  # this process's share, collated one batch at a time
                loss, n = token_loss_sum(model, {k: v.to(device) for k, v in batch.items()},
                                         labelled_count(batch["labels"]))
                total += loss.double()
                tokens += n
                done += 1
            if advance is not None:
                advance(len(batch["input_ids"]))
        for _ in range(rounds - done):  # one short: the same number of forwards as the others, uncounted
            token_loss_sum(model, {k: v.to(device) for k, v in first.items()})
    finally:
        model.train(was_training)
    if world > 1:
        from peftkit.distributed import total as summed

        total, tokens = summed(processes, total), summed(processes, tokens)
    tokens = int(tokens)
    mean = float(total) / max(tokens, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 700.0)), "num_tokens": tokens}


def generation_scores(model: nn.Module, tok, prompts: list, metrics: list[str], sampling: Sampling, batch_size: int,
                      normalize: str, processes=None, advance: Callable[[int], None] | None = None,
                      ) -> tuple[dict[str, float], list[str]]:
    """({metric: mean over rows}, answers): `model`'s answers to `prompts` (`peftkit.data.prompts.Prompt`) scored
    against their references. Like `generate_texts`, it leaves the model's mode and torch's RNG as they were.
    `processes` (an accelerate Accelerator, several processes): they share out the prompts (`shared_answers`)."""
    shown = (lambda batch, _: advance(len(batch))) if advance is not None else None
    texts = (shared_answers(model, tok, prompts, sampling, batch_size, processes) if processes is not None
             else generate_texts(model, tok, prompts, sampling, batch_size, on_batch=shown))
    return score(texts, [p.reference for p in prompts], metrics, normalize), texts


def generation_share(prompts: list, batch_size: int, rank: int, world: int, unpadded: bool = False) -> list[int]:
    """The indices of the prompts that process `rank` of `world` answers: every world-th batch of
    `length_batches`, from its rank-th, in that order.

    `generate_texts` given just these prompts batches them exactly so again: sorting keeps their order (they
    are already sorted by length, equal lengths by index), and every batch is full but the last of its run (the
    whole, or with `unpadded` one length's), which comes last here too. So each prompt is answered beside the
    same prompts, with the same left padding, as in one process: the same greedy answers, bit for bit."""
    return [i for batch in length_batches(prompts, batch_size, unpadded)[rank::world] for i in batch]


def shared_answers(model: nn.Module, tok, prompts: list, sampling: Sampling, batch_size: int, processes) -> list[str]:
    """`generate_texts`'s answers to `prompts`, each process generating its `generation_share` and every process
    receiving all of them, in the prompts' order (a gather over the processes: all must call this).

    For greedy answers (evaluation's): sampling draws from one seeded stream per process, not the single
    process's one stream, so sampled answers would differ from one process's. The processes run different
    numbers of generate calls and steps, so this is not for FSDP, where every forward is a collective."""
    from accelerate.utils import gather_object

    unpadded = padding_hides_virtual_tokens(model, prompts, sampling.max_new_tokens)  # decided for all prompts
    mine = generation_share(prompts, batch_size, processes.process_index, processes.num_processes, unpadded)
    texts = generate_texts(model, tok, [prompts[i] for i in mine], sampling, batch_size, unpadded=unpadded)
    answers = [""] * len(prompts)
    for i, text in gather_object(list(zip(mine, texts, strict=True))):  # every process's (index, answer) pairs
        answers[i] = text
    return answers


@dataclass
class RunEval:
    """What a training run evaluates on data.eval, before training (the base), every training.eval_steps and at
    the end: the loss and perplexity, and eval.metrics of greedy answers up to eval.max_new_tokens, batched by
    eval.batch_size, from the prompts `peftkit eval RUN_DIR --metrics` uses (all usable rows of data.eval)."""

    examples: Examples
    pad_id: int
    batch_size: int
    metrics: list[str] = field(default_factory=list)
    """Generation metrics, in the recipe's order; none: the loss only, and no prompt is read."""
    prompts: list = field(default_factory=list)
    tok: object = None
    sampling: Sampling = field(default_factory=Sampling)
    normalize: str = "squad"
    processes: object = None
    """The run's Accelerator when it has several processes: they share out the loss batches (`evaluate_loss`) and,
    unless FSDP shards the parameters, the prompts (`shared_answers`)."""

    @classmethod
    def of(cls, cfg: Recipe, tok, examples: Examples, name: str = "eval") -> RunEval:
        """The evaluation of data.eval's set `name` (`DataConfig.eval_sources`), whose `examples` are given."""
        from peftkit.data.prompts import load_prompts
        from peftkit.task_ids import recipe_reads_tasks

        metrics = cfg.eval.generation_metrics
        source = cfg.data.eval_sources()[name]
        prompts = load_prompts(tok, source.path, source.split, cfg.data.for_eval(name),
                               tasks=recipe_reads_tasks(cfg)) if metrics else []
        return cls(examples, tok.pad_token_id, cfg.eval.batch_size, metrics, prompts, tok,
                   Sampling(max_new_tokens=cfg.eval.max_new_tokens), cfg.eval.normalize)

    def __len__(self) -> int:
        return len(self.examples)

    def __call__(self, model: nn.Module, generator: nn.Module | None = None) -> dict[str, float]:
        """{'loss', 'perplexity', 'num_tokens', and each metric} of `model`; `generator` (default `model`) answers
        the prompts (the loop passes the model unwrapped from accelerate's wrapper)."""
        result = evaluate_loss(model, self.examples, self.batch_size, self.pad_id, self.processes)
        if self.metrics:
            # Under FSDP every forward is a collective, and a share would end at EOS after its own number of steps
            # (and one process may have a batch fewer): there each process generates the whole, all in step.
            sharing = self.processes if self.processes is not None and not sharded(self.processes) else None
            result |= generation_scores(generator or model, self.tok, self.prompts, self.metrics, self.sampling,
                                        self.batch_size, self.normalize, sharing)[0]
        return result

    def record(self, result: dict[str, float], prefix: str = "eval_") -> dict[str, float]:
        """The result under metrics.jsonl / summary names: `eval_loss`, `eval_perplexity`, `eval_exact_match`, ..."""
        return {f"{prefix}{k}": result[k] for k in ("loss", "perplexity", *self.metrics)}

    def describe(self, result: dict[str, float]) -> str:
        """`eval loss 1.2345 (ppl 3.44), exact_match 0.2500, ...` for the console."""
        return f"eval loss {result['loss']:.4f} (ppl {result['perplexity']:.2f})" + "".join(
            f", {m} {result[m]:.4f}" for m in self.metrics)


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
    eval_cfg = EvalConfig()
    if recipe is None:
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
        job = EvalJob(data=data, data_cfg=DataConfig(train=data), source=base or ModelSource())
    else:
        from peftkit.evaluate_pairs import recipe_objective

        cfg, run_adapter = recipe_source(recipe, overrides, named=bool(model or adapter or comparing),
                                         trust_remote_code=trust_remote_code)
        eval_cfg = cfg.eval
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
    check_choices(fmt, on_bad_rows)
    job.split, job.data_cfg = hub_data_flags(data, split, data_revision, job.data_cfg, job.split)
    updates = {k: v for k, v in (("format", fmt), ("max_length", max_length), ("on_bad_rows", on_bad_rows)) if v}
    job.data_cfg = job.data_cfg.model_copy(update=updates)
    job.data_cfg._flags = ("--format", "--on-bad-rows")  # errors name them beside a recipe key
    if fmt or recipe is None:  # errors name the flag, not a recipe key (data.format, an entry's), or no recipe's
        job.data_cfg._format_key = "--format"
    if on_bad_rows or recipe is None:
        job.data_cfg._on_bad_rows_key = "--on-bad-rows"
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
    if normalize_flag is not None and not {"exact_match", "token_f1"} & set(job.metrics):
        warnings.warn(f"--normalize {normalize_flag}: only exact_match and token_f1 are normalized, and neither is "
                      f"among the metrics ({', '.join(job.metrics)}); add --metrics exact_match to use it.",
                      PeftkitWarning, stacklevel=2)
    if max_new_tokens is not None and not any(m in GENERATION_METRICS for m in job.metrics):
        warnings.warn(f"--max-new-tokens {max_new_tokens}: only the generation metrics ({', '.join(GENERATION_METRICS)}) "
                      f"generate, and none is among the metrics ({', '.join(job.metrics)}); add --metrics exact_match "
                      "to use it.", PeftkitWarning, stacklevel=2)
    if predictions is not None and not any(m in GENERATION_METRICS for m in job.metrics):
        raise PeftkitError(f"--predictions: nothing is generated without a generation metric; add --metrics "
                           f"{GENERATION_METRICS[0]} (or {', '.join(GENERATION_METRICS[1:])}).")
    return job


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


def evaluate_classifier(job: EvalJob, model: nn.Module | None = None) -> dict[str, float]:
    """`peftkit eval` of a sequence classifier on data.format: classification rows: {'loss' (mean cross-entropy per
    row), 'accuracy', 'macro_f1', 'num_examples'}. The rows' labels map to the classes the model has: an adapter's
    (peftkit.json, else as many as its head has outputs), a model's config.json `id2label`. A model given without an
    adapter loads as a sequence classifier; a base without a head (`_named_classes`) gets the data's classes and a
    random head, drawn from the recipe's training.seed (0 without one) so that the figures repeat, its run's base
    evaluation's. `model`: the classifier already loaded (`evaluate_sets`); default: `_load_classifier(job)`."""
    from peftkit.classify import evaluate_classification
    from peftkit.data.classification import LabelSet, load_classification
    from peftkit.rope_scaling import fresh_dynamic_rope

    tok = _classifier_source(job).tokenizer()
    model = _load_classifier(job, tok) if model is None else model
    if not type(model).__name__.endswith("ForSequenceClassification"):
        raise PeftkitError(f"{job.source.describe()} is not a sequence classifier (its adapter's task_type is not "
                           f"SEQ_CLS), so it cannot be scored on data.format 'classification' rows of {job.data}.")
    examples = load_classification(tok, job.data, job.split, job.data_cfg, LabelSet.from_config(model.config))[0]
    if examples:  # BERT's learned positions end at 512: past them a traceback, not a number
        check_room(model, max(len(e.input_ids) for e in examples), f"longest row of {job.data}", 0,
                   "Lower --max-length (the rows are cut to it).")
    with fresh_dynamic_rope(model):  # (as `_scored`: a classifier shared by several sets)
        result = evaluate_classification(model, examples, job.batch_size, tok.pad_token_id)
    _check_finite_loss(result["loss"], job.source, job.data)
    return result


def _classifier_source(job: EvalJob) -> ModelSource:
    """`job`'s source loaded as a sequence classifier."""
    if job.task is not None:  # (multitask prompt tuning cannot train a classifier: none reads one)
        raise PeftkitError(f"--task {job.task}: only a multitask prompt tuning adapter reads a task id, and a sequence "
                           "classifier is never one; drop --task.")
    source = job.source
    if source.model is not None:
        source = replace(source, model=source.model.model_copy(update={"task": "sequence_classification"}))
    return source


def _classes_of_model(job: EvalJob) -> bool:
    """Whether `job`'s classifier has its classes whatever the rows: an adapter's, or a model's named ones."""
    source = _classifier_source(job)
    return bool(source.adapter) or _named_classes(source.model) is not None


def _load_classifier(job: EvalJob, tok=None) -> nn.Module:
    """`job`'s classifier loaded (`tok`: its tokenizer, read again if not given), a headless base's classes read
    from `job`'s rows."""
    from peftkit.data.classification import load_classification

    source, labels = _classifier_source(job), None
    if not source.adapter:
        labels = _named_classes(source.model) or load_classification(tok or source.tokenizer(), job.data, job.split,
                                                                      job.data_cfg, None, source.model.num_labels)[2]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(job.seed)
        return source.load(labels=labels)


def _named_classes(model_cfg: ModelConfig):
    """The classes of a model's config.json (a fine-tuned or merged classifier: its head's outputs), or None for a
    base without a head: one with only transformers' placeholders (`LABEL_0`, ...) whose architecture is no
    sequence classifier. A classifier saved with placeholder names (peft's or transformers' own training) keeps its
    head: the eval data's classes would give a head of their own count, drawn at random."""
    from peftkit.data.classification import LabelSet
    from peftkit.modeling import load_config

    config = load_config(model_cfg)
    named = any(name != f"LABEL_{i}" for i, name in config.id2label.items())
    classifier = any(a.endswith("ForSequenceClassification") for a in config.architectures or ())
    return LabelSet.from_config(config) if named or classifier else None


def evaluate(job: EvalJob, model: nn.Module | None = None) -> dict[str, float]:
    """`peftkit eval`: loss, perplexity and token count, and/or task metrics of generated answers, of a base,
    adapted or merged model on a dataset.

    The tokenizer, data and prompts are read before the model loads, so a data or format mistake is reported
    in seconds. With an adapter, the base is the job's model or the adapter's base_model_name_or_path, loaded
    (and re-quantized) as the adapter was trained. Generation metrics generate greedily from the prompt tokens
    training built for each row (`peftkit.data.prompts`), batched with left padding, up to EOS.

    Args:
        model: the model to evaluate, already loaded (one of several named adapters active: `peftkit.compare`; the
            model of every data.eval set: `evaluate_sets`); default: `job.source` loaded.
    """
    if job.data_cfg.format == "classification":
        return evaluate_classifier(job, model)
    if job.data_cfg.format in ("preference", "unpaired"):
        from peftkit.evaluate_pairs import evaluate_preference

        return evaluate_preference({None: job})[None]
    rows = _read_rows(job)
    return _scored(job, job.source.load() if model is None else model, *rows)


def evaluate_sets(jobs: dict[str, EvalJob]) -> dict[str, dict[str, float]]:
    """`peftkit eval` of a recipe's several data.eval sets: each set's figures by name, as `evaluate` gives them.
    The jobs are one recipe's with the same flags (`eval_job(..., eval_set=NAME)`), so one model source: every
    set's rows are read first, each with its own data config (columns, format, split), and the model loads once
    for all of them. A classifier whose classes come from each set's rows (a base without a head) is the
    exception: each set gets the head of its own classes, as `peftkit eval --data` of its file."""
    first = next(iter(jobs.values()))
    if first.data_cfg.format == "classification":
        model = _load_classifier(first) if _classes_of_model(first) else None
        return {name: evaluate_classifier(job, model) for name, job in jobs.items()}
    if first.data_cfg.format in ("preference", "unpaired"):
        from peftkit.evaluate_pairs import evaluate_preference

        return evaluate_preference(jobs)
    rows = {name: _read_rows(job) for name, job in jobs.items()}
    model = first.source.load()
    return {name: _scored(job, model, *rows[name]) for name, job in jobs.items()}


def _read_rows(job: EvalJob) -> tuple:
    """(tokenizer, examples, prompts) of `job`'s data: examples for the loss metrics, prompts for the generation
    ones (None where no metric needs them), with their task ids."""
    from peftkit.data import load_examples
    from peftkit.data.prompts import load_prompts

    source = job.source
    tok = source.tokenizer()
    tasks = job.task is None and adapter_task_count(source) is not None  # --task: the column is not read at all
    examples = (load_examples(tok, job.data, job.split, job.data_cfg, tasks=tasks)[0]
                if set(job.metrics) & set(LOSS_METRICS) else None)
    prompts = (load_prompts(tok, job.data, job.split, job.data_cfg, tasks=tasks)
               if any(m in GENERATION_METRICS for m in job.metrics) else None)
    if examples is not None:
        examples = with_tasks(source, job.task, examples, job.data, job.untasked)
    if prompts is not None:
        prompts = with_tasks(source, job.task, prompts, job.data, job.untasked)
    return tok, examples, prompts


def _scored(job: EvalJob, model: nn.Module, tok, examples: Examples | None, prompts: list | None) -> dict[str, float]:
    """`evaluate`'s figures of the loaded `model` on `_read_rows`'s rows (and `job.predictions` written), with dynamic
    RoPE as the model loaded: one evaluated before on other rows (another data.eval set, another row of a comparison)
    kept the frequencies of the longest sequence it saw, so a set's figures depended on the set before it."""
    from peftkit.rope_scaling import fresh_dynamic_rope

    with fresh_dynamic_rope(model):
        return _figures(job, model, tok, examples, prompts)


def _figures(job: EvalJob, model: nn.Module, tok, examples: Examples | None, prompts: list | None) -> dict[str, float]:
    guard_token_ids(model, tok)
    result: dict[str, float] = {}
    if examples:
        check_room(model, max(examples.lengths()), f"longest example of {job.data}", 0,
                   "Lower --max-length (the examples are cut to it).")
    if examples is not None:
        with work(f"{job.name}: loss" if job.name else "loss", len(examples), "examples") as advance:
            result |= evaluate_loss(model, examples, job.batch_size, tok.pad_token_id, advance=advance)
        _check_finite_loss(result["loss"], job.source, job.data)
    if prompts is not None:
        generated = [m for m in job.metrics if m in GENERATION_METRICS]
        with work(f"{job.name}: answers" if job.name else "answers", len(prompts), "rows") as advance:
            scores, texts = generation_scores(model, tok, prompts, generated, job.sampling, job.batch_size,
                                              job.normalize, advance=advance)
        result |= scores
        result["num_rows"] = len(prompts)
        if job.predictions:
            lines = [_jsonl_line({"prompt": p.text, "prediction": t, "reference": p.reference})
                     for p, t in zip(prompts, texts, strict=True)]
            atomic_write_text(job.predictions, "".join(line + "\n" for line in lines))
    return result


def _jsonl_line(record: dict) -> str:
    """One JSON line that stays one line for every reader: JSON keeps U+0085, U+2028 and U+2029 raw in a string, and
    Python's `str.splitlines()` (U+2028/9: JavaScript before ES2019 too) would split the row there; they are escaped."""
    line = json.dumps(record, ensure_ascii=False)
    return line.translate({0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"})


def _check_finite_loss(loss: float, source: ModelSource, data: str) -> None:
    if not math.isfinite(loss):
        # Reported, not printed as 'loss nan': a number that looks like a result hides a broken model.
        raise PeftkitError(
            f"{source.describe()} produces a non-finite loss ({loss}) on {data}: its weights hold NaN/inf, or its "
            "activations overflow in 16-bit. Check the model's weights (a diverged training run saves NaN), or "
            "evaluate a float32 copy of the model."
        )
