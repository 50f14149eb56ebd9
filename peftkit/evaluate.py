"""Loss and perplexity of a model on a dataset (mean next-token cross-entropy over the labelled tokens), and task
metrics of its greedy answers to the rows' prompts: for `peftkit eval` and for the evaluations of a training run
(`RunEval`), which share `generation_scores` so that a run's final metrics are what `peftkit eval` gives.
`peftkit eval`'s job is resolved from its arguments in `peftkit.eval_job`; a classifier's is evaluated in
`peftkit.evaluate_classifier`, preference pairs' and unpaired answers' in `peftkit.evaluate_pairs`."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from peftkit.data import Collator, Example, Examples
from peftkit.data.checks import guard_token_ids
from peftkit.data.packing import VARLEN_KEYS
from peftkit.decoding import (Sampling, check_room, generate_texts, length_batches, longest_padded, marked_text,
                              padding_hides_virtual_tokens)
from peftkit.distributed import sharded
from peftkit.errors import PeftkitError
from peftkit.eval_job import EvalJob
from peftkit.fileio import atomic_write_text
from peftkit.inference import ModelSource
from peftkit.loss import labelled_count, next_token_loss_sum, on_device, trimmed_head
from peftkit.methods.virtual import task_inputs
from peftkit.metrics import GENERATION_METRICS, LOSS_METRICS, score
from peftkit.progress import work
from peftkit.rope_scaling import alone_batches, fresh_dynamic_rope, row_positions
from peftkit.recipe import Recipe
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
    kept, labels = trimmed_head(model, batch)  # the head from the first position the loss reads
    logits = model(**inputs, **kept, use_cache=False).logits
    return next_token_loss_sum(logits, labels, labelled)  # tensors: the caller decides when to sync


@torch.no_grad()
def evaluate_loss(model: nn.Module, examples: Sequence[Example], batch_size: int, pad_id: int,
                  processes=None, advance: Callable[[int], None] | None = None) -> dict[str, float]:
    """{'loss', 'perplexity', 'num_tokens'} of `model` on `examples` (eval mode, restored afterwards).

    `processes` (an accelerate Accelerator, several processes): each evaluates every num_processes-th batch and the
    sums are added across processes, so N processes evaluate N times faster. Every process runs as many forwards
    (one short of batches repeats its first, uncounted), which keeps FSDP's collectives in step. `advance(n)`:
    told of each batch's n examples (a progress bar).

    Each batch runs with dynamic RoPE as the model loaded (`fresh_dynamic_rope`): transformers keeps the frequencies
    of the longest sequence it has seen, so a batch's loss depended on the batches before it (their order, the
    training before the evaluation). Training itself keeps transformers' behaviour. The batches are `loss_batches`'."""
    rank, world = (processes.process_index, processes.num_processes) if processes is not None else (0, 1)
    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.long, device=device)
    batches, collate = loss_batches(model, examples, batch_size), Collator(pad_id)
    rounds, first, done = -(-len(batches) // world), None, 0  # rounds: batches per process, rounded up
    try:
        for i, batch in enumerate(collate([examples[j] for j in rows]) for rows in batches):
            first = batch if first is None else first
            if i % world == rank:  # this process's share, collated one batch at a time
                with fresh_dynamic_rope(model):  # each batch as on a freshly loaded model
                    loss, n = token_loss_sum(model, on_device(batch, device), labelled_count(batch["labels"]))
                total += loss.double()
                tokens += n
                done += 1
            if advance is not None:
                advance(len(batch["input_ids"]))
        for _ in range(rounds - done):  # one short: the same number of forwards as the others, uncounted
            with fresh_dynamic_rope(model):
                token_loss_sum(model, on_device(first, device))
    finally:
        model.train(was_training)
    if world > 1:
        from peftkit.distributed import total as summed

        total, tokens = summed(processes, total), summed(processes, tokens)
    tokens = int(tokens)
    mean = float(total) / max(tokens, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 700.0)), "num_tokens": tokens}


def loss_batches(model: nn.Module, examples: Sequence[Example], batch_size: int) -> list[list[int]]:
    """The examples' indices in the batches `evaluate_loss` scores: `alone_batches` of each row's positions (a
    packed row's positions restart at each of its examples): under dynamic RoPE (and longrope's choice of factors)
    a row past the context shares a batch only with rows of its own positions, so that the loss (a sum over tokens,
    divided once) does not depend on eval.batch_size."""
    return alone_batches(model, len(examples), lambda i: row_positions(examples[i]), batch_size)


def generation_scores(model: nn.Module, tok, prompts: list, metrics: list[str], sampling: Sampling, batch_size: int,
                      normalize: str, processes=None, advance: Callable[[int], None] | None = None,
                      ) -> tuple[dict[str, float], list[str]]:
    """({metric: mean over rows}, answers): `model`'s answers to `prompts` (`peftkit.data.prompts.Prompt`) scored
    against their references. Like `generate_texts`, it leaves the model's mode and torch's RNG as they were.
    `processes` (an accelerate Accelerator, several processes): they share out the prompts (`shared_answers`)."""
    shown = (lambda batch, _: advance(len(batch))) if advance is not None else None
    texts = (shared_answers(model, tok, prompts, sampling, batch_size, processes) if processes is not None
             else generate_texts(model, tok, prompts, sampling, batch_size, on_batch=shown, decode=answer_text(tok)))
    return score(texts, [p.reference for p in prompts], metrics, normalize), texts


def answer_text(tok) -> Callable[[list[int]], str]:
    """An answer's ids as the text scored against its reference (and written to --predictions): with
    `model.add_tokens`' markers, which the data's references write (`<calc>8+3</calc> eleven`), so that an answer
    that is the reference token for token scores 1; decoded without them it scored 0 (`marked_text`)."""
    return lambda ids: marked_text(tok, ids)


def generation_share(prompts: list, batch_size: int, rank: int, world: int,
                     padded_up_to: int | None = None) -> list[int]:
    """The indices of the prompts that process `rank` of `world` answers: every world-th batch of
    `length_batches`, from its rank-th, in that order.

    `generate_texts` given just these prompts batches them exactly so again: sorting keeps their order (they
    are already sorted by length, equal lengths by index), and every batch is full but the last of its run (the
    whole, or the prompts up to `padded_up_to` and each longer length's), which comes last here too. So each prompt
    is answered beside the same prompts, with the same left padding, as in one process: the same greedy answers,
    bit for bit."""
    return [i for batch in length_batches(prompts, batch_size, padded_up_to)[rank::world] for i in batch]


def shared_answers(model: nn.Module, tok, prompts: list, sampling: Sampling, batch_size: int, processes) -> list[str]:
    """`generate_texts`'s answers to `prompts`, each process generating its `generation_share` and every process
    receiving all of them, in the prompts' order (a gather over the processes: all must call this).

    For greedy answers (evaluation's): sampling draws from one seeded stream per process, not the single
    process's one stream, so sampled answers would differ from one process's. The processes run different
    numbers of generate calls and steps, so this is not for FSDP, where every forward is a collective."""
    from accelerate.utils import gather_object

    unpadded = padding_hides_virtual_tokens(model, prompts, sampling.max_new_tokens)  # decided for all prompts
    padded_up_to = longest_padded(model, prompts, sampling.max_new_tokens, unpadded)
    mine = generation_share(prompts, batch_size, processes.process_index, processes.num_processes, padded_up_to)
    texts = generate_texts(model, tok, [prompts[i] for i in mine], sampling, batch_size, unpadded=unpadded,
                           decode=answer_text(tok))
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
    left_out: int = 0
    """Usable rows of the set that the metrics leave out, as the loss does (`peftkit.data.prompts.LossRows`)."""

    @classmethod
    def of(cls, cfg: Recipe, tok, examples: Examples, name: str = "eval") -> RunEval:
        """The evaluation of data.eval's set `name` (`DataConfig.eval_sources`), whose `examples` are given."""
        from peftkit.data.prompts import load_prompts
        from peftkit.task_ids import recipe_reads_tasks

        metrics = cfg.eval.generation_metrics
        source = cfg.data.eval_sources()[name]
        prompts = load_prompts(tok, source.path, source.split, cfg.data.for_eval(name),
                               tasks=recipe_reads_tasks(cfg), as_loss=True) if metrics else []
        return cls(examples, tok.pad_token_id, cfg.eval.batch_size, metrics, prompts, tok,
                   Sampling(max_new_tokens=cfg.eval.max_new_tokens), cfg.eval.normalize,
                   left_out=getattr(prompts, "left_out", 0))

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
        from peftkit.evaluate_classifier import evaluate_classifier

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
    jobs = _sharing_tokenizers(jobs)
    first = next(iter(jobs.values()))
    if first.data_cfg.format == "classification":
        from peftkit.evaluate_classifier import (_classes_of_model, _classifier_source, _load_classifier,
                                                 evaluate_classifier)

        tok = _classifier_source(first).tokenizer()  # (kept by the source: each set's rows, the model's pad id)
        model = _load_classifier(first, tok) if _classes_of_model(first) else None
        return {name: evaluate_classifier(job, model) for name, job in jobs.items()}
    if first.data_cfg.format in ("preference", "unpaired"):
        from peftkit.evaluate_pairs import evaluate_preference

        return evaluate_preference(jobs)
    tok = first.source.tokenizer()  # (one source: one tokenizer, read once for every set and the model's loading)
    rows = {name: _read_rows(job, tok) for name, job in jobs.items()}
    model = first.source.load()
    return {name: _scored(job, model, *rows[name]) for name, job in jobs.items()}


def _sharing_tokenizers(jobs: dict[str, EvalJob]) -> dict[str, EvalJob]:
    """`jobs` whose sources keep the tokenizers they read in the first's (`ModelSource.tokenizers`): `eval_job` made
    each set's source apart, so each read the base's tokenizer again (a classifier's each set's rows, a headless
    base's each set's model)."""
    tokenizers = next(iter(jobs.values())).source.tokenizers
    return {name: replace(job, source=replace(job.source, tokenizers=tokenizers)) for name, job in jobs.items()}


def _read_rows(job: EvalJob, tok=None) -> tuple:
    """(tokenizer, examples, prompts) of `job`'s data: examples for the loss metrics, prompts for the generation
    ones (None where no metric needs them), with their task ids. The prompts are those of the rows the loss scores
    (`load_prompts(as_loss=True)`), as the run's evaluation (`RunEval`) reads them. `tok`: the source's tokenizer,
    where the caller has read it (`evaluate_sets`); else read here."""
    from peftkit.data import load_examples
    from peftkit.data.prompts import Prompts, load_prompts

    source = job.source
    tok = tok if tok is not None else source.tokenizer()
    tasks = job.task is None and adapter_task_count(source) is not None  # --task: the column is not read at all
    examples = (load_examples(tok, job.data, job.split, job.data_cfg, tasks=tasks)[0]
                if set(job.metrics) & set(LOSS_METRICS) else None)
    prompts = (load_prompts(tok, job.data, job.split, job.data_cfg, tasks=tasks, as_loss=True)
               if any(m in GENERATION_METRICS for m in job.metrics) else None)
    if examples is not None:
        examples = with_tasks(source, job.task, examples, job.data, job.untasked)
    if prompts is not None:
        prompts = Prompts(with_tasks(source, job.task, prompts, job.data, job.untasked), prompts.left_out)
    return tok, examples, prompts


def _scored(job: EvalJob, model: nn.Module, tok, examples: Examples | None, prompts: list | None) -> dict[str, float]:
    """`evaluate`'s figures of the loaded `model` on `_read_rows`'s rows (and `job.predictions` written), with dynamic
    RoPE as the model loaded: one evaluated before on other rows (another data.eval set, another row of a comparison)
    kept the frequencies of the longest sequence it saw, so a set's figures depended on the set before it."""
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
        result["rows_left_out"] = prompts.left_out  # as the loss leaves them out (`LossRows`)
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
