"""`peftkit eval --adapter a=DIR --adapter b=DIR [--merged c=DIR]` on preference pairs (data.format: preference): the
base and each candidate scored on the same pairs by the recipe's preference loss (`PreferenceEval`), in the table
of `peftkit.compare`; unpaired answers (data.format: unpaired) by KTO's figures (`peftkit.kto.KTOLoss`).

DPO's losses (sigmoid, ipo, hinge) and KTO's need a reference: in a comparison it is the base, the comparison's base
row (a recipe's adapter.init_from is not used: a comparison takes the base only from the recipe). Its log-probabilities
of the pairs are computed once, on the base that the adapters then share (`ModelSource.load_named`, none active),
and each adapter, and each merged model, is scored against them; the base row is the base scored against itself,
as the formula gives it: loss log 2 (sigmoid), rewards and margins 0; KTO's the same, each unpaired answer with its
mismatched example (within runs of the eval batch, as `peftkit eval --adapter DIR` of one adapter reads them), its
rewards and KL estimate 0 and its loss w/2 (each answer's weight). ORPO, SimPO and reward models need none:
each row, the base's included, is scored alone. A reward model's rows each load on their own (a classifier's head
is its model's), the base as a classifier of one output with a new head drawn from the recipe's training.seed
(`EvalJob.seed`: 0 without a recipe)."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from peftkit.compare import BASE, _adapter_figures
from peftkit.errors import PeftkitError
from peftkit.eval_job import EvalJob
from peftkit.evaluate import _check_finite_loss
from peftkit.evaluate_pairs import (check_answers_fit, check_reference, evaluate_preference, objective_of,
                                   read_answers)


def compare_preference(sets: dict[str | None, dict[str, EvalJob]], arrow=None) -> dict[str | None, dict[str, dict]]:
    """`compare_sets` on preference pairs: each set's rows' figures (loss, reward_accuracy, reward_margin,
    chosen_reward, rejected_reward, num_pairs, and an adapter's trainable parameters and size), by set name."""
    if arrow is not None:
        raise PeftkitError("--arrow on preference pairs (data.format 'preference') is not supported yet: compare the "
                           "adapters without --arrow.")
    rows = next(iter(sets.values()))
    if rows[BASE].data_cfg.format == "unpaired":
        _check_language_models(rows)
    if _reward_models(rows):
        results = _each_alone({each: _as_reward_models(jobs) for each, jobs in sets.items()})
    else:
        results = _on_the_base(sets)
    for name, job in rows.items():
        info = _adapter_figures(job)
        for each in sets:
            results[each][name] |= info
    return results


def _reward_models(rows: dict[str, EvalJob]) -> bool:
    """Whether the rows are reward models (classifiers of one output): the base's recipe says so, or a candidate is
    one; then every candidate must be one, as a policy's figures and a reward model's scores are not comparable."""
    candidates = {name: job.source for name, job in rows.items() if name != BASE}
    scorers = [name for name, source in candidates.items() if source.reward_model()]
    if classes := next((name for name, source in candidates.items() if source.classifier() and name not in scorers),
                       None):  # (as `peftkit eval` of it alone says)
        raise PeftkitError(f"{classes!r} is a classifier of classes, not a reward model (a classifier of one output, "
                           "training.objective: reward), so it scores no preference pairs; compare it on "
                           "data.format classification rows.")
    if not scorers and not rows[BASE].source.classifier():
        return False
    if not scorers and not rows[BASE].source.reward_model():  # a recipe's classifier of classes, with no reward model
        raise PeftkitError(f"{rows[BASE].source.describe()} is a classifier of classes, not a reward model (a "
                           "classifier of one output, training.objective: reward), so it scores no preference pairs; "
                           "evaluate it on data.format classification rows.")
    if others := [name for name in candidates if name not in scorers]:
        raise PeftkitError(f"{others[0]!r} is not a reward model (a classifier of one output, training.objective: "
                           f"reward), and {'the base' if not scorers else repr(scorers[0])} is: a comparison scores "
                           "reward models, or language models, not both.")
    return True


def _check_language_models(rows: dict[str, EvalJob]) -> None:
    """Unpaired answers are scored by KTO's figures, a language model's log-probabilities of them: a candidate that
    is a sequence classifier (a reward model's or classifier's SEQ_CLS adapter) is refused, as alone."""
    if odd := next((name for name, job in rows.items() if name != BASE and job.source.classifier()), None):
        raise PeftkitError(f"{odd!r} is a sequence classifier, which scores an answer and gives it no log-probability, "
                           "and unpaired answers (data.format 'unpaired') are scored by KTO's figures, a language "
                           "model's log-probabilities of them against the base; compare reward models on "
                           "data.format preference pairs (prompt, chosen, rejected).")


def _as_reward_models(jobs: dict[str, EvalJob]) -> dict[str, EvalJob]:
    """Each row's job scoring pairs as a reward model: the Bradley-Terry loss (with the reward recipe's reward_center,
    else the one each row's peftkit.json records, as `peftkit eval` of it alone scores it: the rows took 0), every
    model loaded as a sequence classifier; a base that is none (a causal LM's --model) with one output, a new head."""
    from peftkit.evaluate_pairs import recorded_center

    first = jobs[BASE]
    given = first.preference[3] if first.preference[1] == "reward" else None
    out = {}
    for name, job in jobs.items():
        source, model = job.source, job.source.model
        if model is not None and (name == BASE or not source.adapter):  # the base, a merged model
            update = {"task": "sequence_classification"}
            if name == BASE and not source.reward_model():
                update["num_labels"] = 1
            source = replace(source, model=model.model_copy(update=update))
        center = given if given is not None else recorded_center(job.source)
        out[name] = replace(job, source=source, preference=(1.0, "reward", 0.0, center), init_from=None)
    return out


def _each_alone(sets: dict[str | None, dict[str, EvalJob]]) -> dict[str | None, dict[str, dict]]:
    """Every row scored on its own model as `peftkit eval` scores it alone (`evaluate_preference`: the model loads once
    for all the sets)."""
    rows = next(iter(sets.values()))
    results = {each: {} for each in sets}
    for name in rows:
        figures = evaluate_preference({each: replace(jobs[name], name=_row(name, each)) for each, jobs in sets.items()})
        for each in sets:
            results[each][name] = figures[each]
    return results


def _row(name: str, eval_set: str | None) -> str:
    return name if eval_set is None else f"{name} on {eval_set}"


def _on_the_base(sets: dict[str | None, dict[str, EvalJob]]) -> dict[str | None, dict[str, dict]]:
    """A policy comparison (DPO, ORPO, SimPO; KTO's on unpaired answers): every row's pairs read with its tokenizer,
    then the base loaded once with the adapters that share it and, for DPO and KTO, each set's reference
    log-probabilities computed on it (no adapter active); then each row scored. An adapter that loads on a model of
    its own (`loads_alone`: layer_replication stacks the base's layers...), or whose tokenizer reads the pairs
    otherwise (a chat template of its own), is scored as `peftkit eval --adapter DIR` scores it, against the base it
    loads over on its own tokens (for layer_replication the stacked base, its DPO run's reference); a merged model
    loads on its own and is scored against the base's reference."""
    from peftkit.adapters.sharing import loads_alone
    from peftkit.compare import base_adds_tokens

    rows = next(iter(sets.values()))
    base = rows[BASE]
    loss = objective_of(base)  # (a KTO recipe's pairs: DPO's defaults, as `peftkit eval` of one adapter scores them)
    tok = base.source.tokenizer()
    pairs = {each: _pairs(tok, jobs[BASE]) for each, jobs in sets.items()}  # (the data's mistakes first)
    own = {name: _own_pairs(sets, name, pairs) for name in rows if name != BASE}
    # (a recipe's model.add_tokens: the base has the new tokens' rows, which no adapter that shares it was trained on)
    shared = [] if base_adds_tokens(base) else [
        (name, job.source.adapter) for name, job in rows.items() if job.source.adapter
        and not loads_alone(job.source.adapter) and (own[name] is None or not loss.needs_reference)]
    if loss.needs_reference:
        _check_merged(rows, own, "KTO" if loss.kind == "kto" else "DPO")
    model, named = base.source.load_named(shared) if shared else (base.source.load(), None)
    _check_fits(model, tok, pairs, {each: jobs[BASE] for each, jobs in sets.items()})
    for name, _ in shared:  # each adapter active: its virtual tokens (prompt tuning) go in front of the answers
        named.activate(name)
        check_answers_fit(model, own.get(name) or pairs, {each: jobs[name] for each, jobs in sets.items()})
    if named is not None:
        named.activate(None)
    if loss.needs_reference:
        for each, jobs in sets.items():
            pairs[each].reference = _reference(model, tok, pairs[each], jobs[BASE])
    results = {each: {} for each in sets}
    for name, job in rows.items():
        on = own.get(name) or pairs
        if name == BASE or name in dict(shared):
            if named is not None:
                named.activate(None if name == BASE else name)
            figures = {each: _score(model, tok.pad_token_id, on[each], jobs[name], loss) for each, jobs in sets.items()}
        elif job.source.adapter:
            figures = _each_alone({each: {name: jobs[name]} for each, jobs in sets.items()})
            figures = {each: figures[each][name] for each in sets}
        else:
            figures = _merged(sets, name, on, loss)
        for each in sets:
            results[each][name] = figures[each]
    return results


def _check_merged(rows: dict[str, EvalJob], own: dict, run: str) -> None:
    """Under `run` (DPO, KTO: scored against the base's log-probabilities), a merged model whose tokenizer reads the
    answers into other tokens than the base's (`own`: its readings) is refused: they are not of its answers."""
    if odd := next((n for n, j in rows.items() if own.get(n) and not j.source.adapter), None):
        what = "unpaired answers" if run == "KTO" else "pairs"
        raise PeftkitError(f"--merged {odd}: its tokenizer reads the {what} into other tokens than the base's (added "
                           f"tokens, another chat template), so the base's log-probabilities, {run}'s reference, are "
                           "not of its answers; compare it with --model of a base with its tokenizer.")
    _check_merged_bases(rows, run)


def _check_merged_bases(rows: dict[str, EvalJob], run: str) -> None:
    """A merged model whose peftkit.json records another base than the comparison's is refused under DPO (and KTO):
    its figures against that base's log-probabilities, the reference, are not its DPO run's (a tiny GPT-2's merge in a
    Llama comparison was scored silently). A model without the record (not merged by peftkit) is taken as given; a hub
    model's record is read at the revision its weights load at (it was read at main whatever the revision)."""
    from peftkit.merge import merged_from, same_base

    base = rows[BASE].source.base
    for name, job in rows.items():
        model = job.source.model
        if name == BASE or job.source.adapter or not (made := merged_from(model.name_or_path, model.revision)):
            continue
        if base and not same_base(made, base):
            raise PeftkitError(f"--merged {name}: {job.source.model.name_or_path} was merged from {made} (its "
                               f"peftkit.json merged_from), and the comparison's base, {run}'s reference, is {base}, "
                               f"so its figures against that reference would not be its {run} run's. Compare it with a "
                               f"recipe or --model of {made}.")


def _own_pairs(sets: dict, name: str, pairs: dict) -> dict | None:
    """Row `name`'s pairs read with its own tokenizer, by set; None where they are the base's, token for token."""
    tok = next(iter(sets.values()))[name].source.tokenizer()
    own = {each: _pairs(tok, jobs[name]) for each, jobs in sets.items()}
    return None if all(_same_tokens(own[each], pairs[each]) for each in sets) else own


def _pairs(tok, job: EvalJob):
    """`job`'s pairs, each with its task where the row's adapter reads one (`read_answers`)."""
    return read_answers(tok, job)


def _check_fits(model: nn.Module, tok, pairs: dict, jobs: dict[str | None, EvalJob]) -> None:
    """The tokenizer's ids are the model's, and every set's longest answer fits its positions."""
    from peftkit.data.checks import guard_token_ids
    from peftkit.decoding import check_room

    guard_token_ids(model, tok)
    for each, job in jobs.items():
        check_room(model, max(pairs[each].lengths()), f"longest answer of {job.data}", 0,
                   "Lower --max-length (the answers are cut to it).")


def _reference(model: nn.Module, tok, pairs, job: EvalJob) -> torch.Tensor:
    """The base's summed log-probabilities of each pair's answers (`reference_logps`), once for every row."""
    from peftkit.preference import reference_logps
    from peftkit.progress import work
    from peftkit.rope_scaling import fresh_dynamic_rope

    with fresh_dynamic_rope(model), work("reference (the base)", len(pairs), "pairs") as advance:
        reference = reference_logps(model, pairs, job.batch_size, tok.pad_token_id, advance=advance)
    check_reference(reference, job, f"the comparison's base, {job.source.base}")
    return reference


def _score(model: nn.Module, pad_id: int, pairs, job: EvalJob, loss) -> dict[str, float]:
    """`PreferenceEval`'s figures of `model` (as it is now: one adapter active) on `pairs`."""
    from peftkit.preference import PreferenceEval
    from peftkit.rope_scaling import fresh_dynamic_rope

    with fresh_dynamic_rope(model):
        figures = PreferenceEval(pairs, pad_id, job.batch_size, loss)(model)
    _check_finite_loss(figures["loss"], job.source, job.data)
    return figures


def _merged(sets: dict, name: str, pairs: dict, loss) -> dict:
    """A merged model's figures on each set's `pairs` (the base's, with DPO's or KTO's reference), loaded once."""
    source = next(iter(sets.values()))[name].source
    model = source.load()
    tok = source.tokenizer()
    _check_fits(model, tok, pairs, {each: jobs[name] for each, jobs in sets.items()})
    return {each: _score(model, tok.pad_token_id, pairs[each], jobs[name], loss) for each, jobs in sets.items()}


def _same_tokens(a, b) -> bool:
    """Whether two readings of the pairs hold the same answers, token for token, label for label."""
    return len(a.examples) == len(b.examples) and all(
        (x.input_ids, x.labels, x.task_id) == (y.input_ids, y.labels, y.task_id)
        for x, y in zip(a.examples, b.examples, strict=True))
