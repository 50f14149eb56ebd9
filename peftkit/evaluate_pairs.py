"""`peftkit eval` of preference data: pairs (data.format preference: DPO's, ORPO's, SimPO's and a reward model's
figures) and unpaired answers (data.format unpaired: KTO's), each model against its reference where its objective has
one (the model its training started from: the base, or a recipe's adapter.init_from over it). `eval_job` hands a job
on such data to `preference_job`; `evaluate` and `evaluate_sets` to `evaluate_preference`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from peftkit.data.checks import guard_token_ids
from peftkit.decoding import check_room
from peftkit.errors import PeftkitError
from peftkit.eval_job import EvalJob
from peftkit.evaluate import _check_finite_loss
from peftkit.inference import ModelSource
from peftkit.progress import work
from peftkit.recipe import Recipe, TrainingConfig


def objective_of(job: EvalJob):
    """The loss `job`'s pairs (or unpaired answers) are scored by: its recipe's objective's where it fits the data
    (KTO's for unpaired answers, the others' for pairs), else that data's default (DPO's, KTO's)."""
    from peftkit.kto import KTOLoss
    from peftkit.preference import PreferenceLoss

    kto, unpaired = job.preference[0] == "kto", job.data_cfg.format == "unpaired"
    if unpaired:
        return KTOLoss(*job.preference[1:]) if kto else KTOLoss(TrainingConfig().kto_beta)
    return PreferenceLoss(*EvalJob.preference) if kto else PreferenceLoss(*job.preference)


def recorded_center(source: ModelSource) -> float:
    """A reward model's centring weight without a reward recipe: the one its adapter's (else its merged model's)
    peftkit.json records, so its loss is the run's; 0 scored a run of reward_center 0.01 0.0013 where it had 0.0053.
    Each row of a comparison takes its own (`compare_preference._as_reward_models`)."""
    from peftkit.merge import recorded_reward_center

    if source.adapter:
        return recorded_reward_center(source.adapter)
    # (a merged model on the hub: its peftkit.json, which transformers does not fetch, at the revision it loads)
    return recorded_reward_center(source.model.name_or_path, source.model.revision) if source.model else 0.0


def recipe_objective(cfg: Recipe) -> tuple:
    """The (beta, kind, gamma, center) of a recipe's preference objective (`PreferenceLoss.of`); DPO's for an sft
    recipe; a KTO recipe's ("kto", beta, desirable weight, undesirable weight)."""
    if cfg.training.objective == "kto":
        t = cfg.training
        return ("kto", t.kto_beta, t.kto_desirable_weight, t.kto_undesirable_weight)
    from dataclasses import astuple

    from peftkit.preference import PreferenceLoss

    return astuple(PreferenceLoss.of(cfg.training))


def preference_job(job: EvalJob, comparing: bool, flags: dict) -> None:
    """A job on data.format: preference pairs reports the DPO figures of an adapter against its reference (the model
    its DPO training started from): there is no adapter to compare without one, and nothing is generated. In a
    comparison (`peftkit.compare_preference`, of pairs or of unpaired answers) the reference is the base row, the
    recipe's model: adapter.init_from, which the recipe's own adapter trained from, is not the candidates' base."""
    from peftkit.preference import FIGURES

    if job.data_cfg.format == "unpaired" and job.batch_size < 2:
        raise PeftkitError(f"--batch-size {job.batch_size}: KTO's figures estimate the KL term from each answer's "
                           "prompt with another answer of its batch, and a batch of one has none (the estimate would "
                           "be the answer's own reward); use a batch size of at least 2 (a KTO run's: its "
                           "eval.batch_size, the default)")
    if comparing:
        job.init_from = None
    if given := [flag for flag, value in flags.items() if value is not None]:
        scored = ("unpaired answers (data.format 'unpaired') are scored by KTO's figures "
                  f"({', '.join(objective_of(job).FIGURES)})" if job.data_cfg.format == "unpaired" else
                  f"preference pairs (data.format 'preference') are scored by the preference figures "
                  f"({', '.join(FIGURES)})")
        raise PeftkitError(f"{', '.join(given)}: {scored}, and nothing is generated; drop {' and '.join(given)}.")
    if job.source.classifier():  # a reward model's pairs are scored by its Bradley-Terry loss
        if job.data_cfg.format == "unpaired":  # (KTO's figures are a language model's answer log-probabilities)
            raise PeftkitError(f"{job.source.describe()} is a sequence classifier, which scores an answer and gives "
                               "it no log-probability, and unpaired answers (data.format 'unpaired') are scored by "
                               "KTO's figures, a language model's log-probabilities of them against its reference; "
                               "evaluate a reward model on data.format preference pairs (prompt, chosen, rejected).")
        if not job.source.reward_model() and not comparing:  # (a comparison's base: `_reward_models` says)
            raise PeftkitError(f"{job.source.describe()} is a classifier of classes, not a reward model (a classifier "
                               "of one output, training.objective: reward), so it scores no preference pairs; evaluate "
                               "it on data.format classification rows.")
        if job.preference[1] == "reward" or not comparing:  # (a comparison's rows: each its own, `_as_reward_models`)
            job.preference = (1.0, "reward", 0.0, job.preference[3] if job.preference[1] == "reward" else
                              recorded_center(job.source))
        if job.source.model is not None:  # (--model DIR: a merged reward model loads as the classifier it is)
            job.source = replace(job.source, model=job.source.model.model_copy(
                update={"task": "sequence_classification"}))
    # (ORPO's, SimPO's and a reward model's have no reference; a comparison's is its base row. The loss is the data's
    # (`objective_of`): an ORPO recipe's unpaired answers are scored by KTO's, which has one)
    if not comparing and not job.source.adapter and objective_of(job).needs_reference:
        what, run = ("KTO's figures", "KTO") if job.data_cfg.format == "unpaired" else ("A preference evaluation", "DPO")
        raise PeftkitError(f"{what} compare{'s' * (run == 'DPO')} an adapter with its base (the reference, as {run} "
                           f"training does), and {job.source.describe()} has no adapter: pass --adapter DIR, or a "
                           f"{run} run's directory.")
    job.metrics = list(objective_of(job).FIGURES if job.data_cfg.format == "unpaired" else FIGURES)


def evaluate_preference(jobs: dict) -> dict:
    """`peftkit eval` of preference pairs (data.format: preference): each set's figures (`PreferenceEval`: loss,
    reward accuracy and margin, chosen and rejected rewards, by the job's `PreferenceLoss`) of the adapter against
    its DPO reference, the model its DPO training started from: the base without the adapter, or where the recipe
    has adapter.init_from, the base with that adapter (ORPO and SimPO: the model alone, adapted or not). Every set's pairs are read first ({set name: job}, as
    `evaluate_sets`); the base loads once, the reference's log-probabilities are computed on it, then the adapter's
    weights go in."""
    from peftkit.preference import PreferenceEval, reference_logps
    from peftkit.rope_scaling import fresh_dynamic_rope

    first = next(iter(jobs.values()))
    loss = objective_of(first)
    tok = first.source.tokenizer()
    sets = {name: read_answers(tok, job) for name, job in jobs.items()}
    # ORPO and SimPO have no reference: the model as it is scores the pairs
    model, adapt = _reference_model(first.source, first.init_from) if loss.needs_reference else (_scorer(first.source, first.seed),
                                                                                                   lambda: None)
    guard_token_ids(model, tok)
    check_answers_fit(model, sets, jobs)
    for name, job in jobs.items():
        if not loss.needs_reference:
            continue
        with fresh_dynamic_rope(model), work("reference", len(sets[name]), "pairs") as advance:
            sets[name].reference = reference_logps(model, sets[name], job.batch_size, tok.pad_token_id,
                                                   advance=advance)
        check_reference(sets[name].reference, job, reference_name(first.source, first.init_from))
    adapt()
    if loss.needs_reference:  # the adapter's virtual tokens (prompt tuning) go in front of every answer now
        check_answers_fit(model, sets, jobs)
    results = {}
    for name, job in jobs.items():
        with fresh_dynamic_rope(model):
            results[name] = PreferenceEval(sets[name], tok.pad_token_id, job.batch_size, loss)(model)
        _check_finite_loss(results[name]["loss"], job.source, job.data)
    return results


def reference_name(source: ModelSource, init_from: str | None) -> str:
    """The reference of `peftkit eval` of one adapter, as its messages name it: the base, or adapter.init_from's."""
    if init_from:
        return f"the recipe's adapter.init_from {init_from} over the base model {source.base}"
    return f"the base model {source.base}"


def check_reference(reference: torch.Tensor, job: EvalJob, what: str) -> None:
    """The reference's log-probabilities of `job`'s answers (`reference_logps`) are all finite: else every figure
    against them is nan, and the evaluated adapter would be blamed for them (`_check_finite_loss`) as training is
    not (`peftkit.start_base._reference_logps` says the same)."""
    from peftkit.preference import nonfinite_references

    if (bad := nonfinite_references(reference)) is None:
        return
    (count, first), pair = bad, "answer" if job.data_cfg.format == "unpaired" else "pair"
    way_out = ("; or evaluate against the base with --set adapter.init_from=null"
               if "adapter.init_from" in what else "")
    raise PeftkitError(
        f"The reference ({what}) gives {count} of the {len(reference)} {pair}s of {job.data} a "
        f"log-probability that is not finite (the first: {pair} {first + 1} as kept), so no figure against it is "
        "either, whatever the adapters: its weights hold inf or nan, or its activations overflow in 16-bit. Check "
        f"the reference's weights, or evaluate a float32 copy of the model{way_out}.")


def check_answers_fit(model: nn.Module, sets: dict, jobs: dict[str | None, EvalJob]) -> None:
    """Every set's longest answer, behind the virtual tokens of `model`'s adapter as it is now (a prompt-tuning one's),
    fits the positions of a model with learned ones (`check_room`): past them GPT-2's lookup fails (an IndexError)."""
    for name, job in jobs.items():
        check_room(model, max(sets[name].lengths()), f"longest answer of {job.data}", 0,
                   "Lower --max-length (the answers are cut to it).")


def read_answers(tok, job: EvalJob):
    """`job`'s pairs (or unpaired answers) as its training's evaluation read them: where its adapter reads task ids
    (multitask prompt tuning), each answer with its row's `task` (a recipe's own rows without one: task 0), or --task's
    for all; --task on a model that reads none is refused (`peftkit.task_ids.with_tasks`), as on other rows."""
    from peftkit.data.preference import load_pairs
    from peftkit.data.unpaired import load_unpaired
    from peftkit.task_ids import adapter_task_count, with_tasks

    tasks = job.task is None and adapter_task_count(job.source) is not None  # --task: the column is not read at all
    read = (load_unpaired(tok, job.data, job.split, job.data_cfg, job.batch_size, tasks)[0]
            if job.data_cfg.format == "unpaired" else load_pairs(tok, job.data, job.split, job.data_cfg, tasks=tasks)[0])
    with_tasks(job.source, job.task, read.examples, job.data, job.untasked)
    return read


def _scorer(source: ModelSource, seed: int = 0) -> nn.Module:
    """The model of an evaluation without a reference (ORPO, SimPO, a reward model): a reward model without an
    adapter whose head is new (a base's) gets it drawn from `seed` (`EvalJob.seed`), as a headless classifier's
    (`peftkit.evaluate_classifier._load_classifier`), so that its figures repeat, those of its run's base evaluation."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return source.load()


def _reference_model(source: ModelSource, init_from: str | None) -> tuple[nn.Module, Callable[[], None]]:
    """(the reference of a preference evaluation, loaded as `ModelSource.load` loads an adapter's base: the base, or
    with `init_from` (a recipe's adapter.init_from) that adapter over it; a function that then makes it `source`'s
    adapted model). `init_from`'s weights go in the layers of `source`'s adapter, which its DPO run trained from
    them."""
    from peftkit.adapter_base import load_adapter_base
    from peftkit.adapters import inject_adapters
    from peftkit.adapters.state_dicts import load_adapter_state_dict
    from peftkit.modeling import resolve_device
    from peftkit.new_tokens import held_tokenizer_length, start_state
    from peftkit.peft_format import load_adapter
    from peftkit.progress import phase
    from peftkit.runtime import inference_autocast, under_autocast
    from peftkit.saved_embeddings import oversized

    device = resolve_device(source.model.device if source.model else "auto")
    source = source.here(device)
    with phase(f"Loading {source.describe()}..."):
        model, adapter_cfg, state, _, model_cfg, _ = load_adapter_base(
            source.adapter_base, source.adapter, device, source.trust_remote_code, tokens_of=source.added_tokens,
            tokenizer_of=source.tokenizers)
    model = under_autocast(model.eval(), inference_autocast(source.mixed_precision, device), device)

    def inject() -> None:
        inject_adapters(model, adapter_cfg, every_entry=False, state=state, saved_only=True)

    if init_from:
        inject()
        try:
            trained, start = load_adapter(init_from)[:2]
            # (tokens the run added after init_from's: their rows as training started them; a padded base's cut)
            if model_cfg.add_tokens or oversized(model, start):
                start = start_state(model, start, trained, held_tokenizer_length(init_from))
            load_adapter_state_dict(model, start)
        except PeftkitError as error:  # (it blamed the evaluated adapter's files, or its base)
            raise PeftkitError(f"The recipe's adapter.init_from {init_from}, the reference (the adapter the recipe's "
                               f"runs train from), does not fit {source.adapter}, so it was not trained from it "
                               "(another method, rank or layers). Evaluate it with the recipe it was trained by, or "
                               "evaluate it against the base with --set adapter.init_from=null.") from error
        model.eval()

    def adapt() -> None:
        if not init_from:
            inject()
        load_adapter_state_dict(model, state)
        model.eval()
    return model, adapt
