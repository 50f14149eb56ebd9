"""`peftkit eval` of a sequence classifier on data.format: classification rows: the classifier loaded with the classes
it scores (an adapter's, a model's named ones, or a headless base's from the rows, its head drawn from a seed), and
its loss, accuracy and macro-F1."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from peftkit.decoding import check_room
from peftkit.errors import PeftkitError
from peftkit.eval_job import EvalJob
from peftkit.evaluate import _check_finite_loss
from peftkit.inference import ModelSource
from peftkit.recipe import ModelConfig


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
        raise PeftkitError(f"--task {job.task}: only a multitask prompt tuning or Poly adapter reads a task id, and a sequence "
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
