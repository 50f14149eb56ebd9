"""The run's data, read at its start before the model loads (`peftkit.start.setup`), so that a data mistake shows
in seconds: data.train's examples (a classifier's rows, preference pairs, KTO's unpaired answers), data.eval's sets
as their evaluations, and the rows training draws from (packed for data.packing)."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console

from peftkit.classify import ClassifyEval
from peftkit.data import describe_stats, load_examples
from peftkit.data.classification import LabelSet, load_classification
from peftkit.data.packing import describe_packing, pack_examples
from peftkit.data.preference import Pairs, load_pairs
from peftkit.data.tokenized import check_embedding_rows
from peftkit.errors import PeftkitError
from peftkit.evaluate import RunEval
from peftkit.preference import objective_loss
from peftkit.recipe import Recipe
from peftkit.rope_scaling import check_answer_room
from peftkit.samples import sample_prompts
from peftkit.task_ids import check_training_tasks, recipe_reads_tasks


def _training_rows(cfg: Recipe, examples: Sequence, stats: dict, console: Console) -> Sequence:
    """The rows training draws from: the examples, packed into rows for data.packing; their counts printed."""
    for line in describe_stats(stats, cfg.data):
        console.print(line, markup=False, highlight=False, style="yellow" if line.startswith("warning:") else None)
    if not cfg.data.packing:
        return examples
    rows = pack_examples(examples, cfg.data.max_length)
    console.print(describe_packing(examples, rows, cfg.data.max_length), highlight=False)
    return rows


def _load_data(cfg: Recipe, tok, config, cache: bool = True,
               processes: int = 1) -> tuple[list, dict, dict, LabelSet | None]:
    """(training examples, their counts, data.eval's evaluations by name ({} without it), a classifier's classes or
    None), all read before the model loads (whose `config` says how many positions the generations have), so that a
    data mistake shows in seconds."""
    data = cfg.data
    evals = {}  # data.eval's sets by name, the primary first
    if cfg.classification:  # the classes come from data.train; data.eval's labels are mapped to them
        train_ex, stats, labels = load_classification(tok, data.train, data.train_split, data, None, cfg.model.num_labels)
        for name, source in data.eval_sources().items():
            examples = load_classification(tok, source.path, source.split, data.for_eval(name), labels)[0]
            evals[name] = ClassifyEval(examples, tok.pad_token_id, cfg.eval.batch_size)
        return train_ex, stats, evals, labels
    if cfg.training.pairs:  # pairs of answers: peftkit.data.preference
        return _load_pairs(cfg, tok, cache, processes)
    tasks = recipe_reads_tasks(cfg)
    train_ex, stats = load_examples(tok, data.train, data.train_split, data, tasks=tasks, cache=cache)
    check_training_tasks(cfg, "data.train", train_ex.task_ids)
    _check_input_types(cfg, "data.train", train_ex)
    for i, (name, source) in enumerate(data.eval_sources().items()):  # the loss examples, and eval.metrics' prompts
        examples = load_examples(tok, source.path, source.split, data.for_eval(name), tasks=tasks, cache=cache)[0]
        _check_input_types(cfg, data.eval_setting(name), examples)
        evals[name] = RunEval.of(cfg, tok, examples, name)
        prompts = [*evals[name].prompts, *(sample_prompts(cfg, tok) if i == 0 else [])]
        key = data.eval_setting(name)
        check_training_tasks(cfg, key, [*examples.task_ids, *(p.task_id for p in prompts)])
        check_answer_room(cfg, config, prompts)
    if not cfg.model.add_tokens:  # (which give the model a row for each token of its tokenizer)
        check_embedding_rows(data, getattr(config.get_text_config(), "vocab_size", None), tok)
    return train_ex, stats, evals, None


def _check_input_types(cfg: Recipe, key: str, examples) -> None:
    """Refuse data whose rows carry CPT's per-token types (`input_type_mask`) for a method that reads none
    (`Method.reads_input_types`): its loss would ignore them, and the labels they masked."""
    if error := input_types_error(cfg.adapter, key, examples):
        raise PeftkitError(error)


def input_types_error(adapter, key: str, examples) -> str | None:
    """`_check_input_types`' error of the data at `key`, or None (`peftkit preview` says it too)."""
    from peftkit.methods import method_of

    method = method_of(adapter)
    if examples.types is None or method.reads_input_types:
        return None
    return (f"{key}: its rows have an 'input_type_mask' (CPT's per-token types, which mask the labels of every token "
            f"not typed an output), and adapter.method: {method.name} reads none; remove the column, or train with "
            "adapter.method: cpt.")


def _load_pairs(cfg: Recipe, tok, cache: bool, processes: int = 1) -> tuple[Pairs, dict, dict, None]:
    """`_load_data` of a DPO recipe: data.train's pairs, and each set of data.eval's as its `PreferenceEval`."""
    from peftkit.data.unpaired import load_unpaired
    from peftkit.kto import check_watched_figures
    from peftkit.preference import PreferenceEval

    def read(source: str | list, split: str | None, data, chunk: int):
        # KTO: each answer with its mismatched one, within runs of a global micro-batch's rows (batch_size on each of
        # the processes: N processes x batch b train as 1 x N b) or of an evaluation batch's
        if cfg.training.objective == "kto":
            return load_unpaired(tok, source, split, data, chunk, tasks, cache)
        return load_pairs(tok, source, split, data, cache, tasks)

    tasks = recipe_reads_tasks(cfg)  # (multitask prompt tuning: a pair's `task`)
    train_ex, stats = read(cfg.data.train, cfg.data.train_split, cfg.data, cfg.training.batch_size * processes)
    check_training_tasks(cfg, "data.train", train_ex.task_ids)
    evals = {}
    for name, source in cfg.data.eval_sources().items():
        pairs = read(source.path, source.split, cfg.data.for_eval(name), cfg.eval.batch_size)[0]
        check_training_tasks(cfg, cfg.data.eval_setting(name), pairs.task_ids)
        evals[name] = PreferenceEval(pairs, tok.pad_token_id, cfg.eval.batch_size, objective_loss(cfg.training))
    if cfg.training.objective == "kto":
        check_watched_figures(cfg, evals)
    return train_ex, stats, evals, None
