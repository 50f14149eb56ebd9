"""The commands on models and adapters: merge (or combine), eval (or compare), generate, chat, inspect, push."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from peftkit.cli.application import app, console, err_console, said_beside
from peftkit.cli.options import (Arrow, ArrowTemperature, ArrowTopK, DataRevision, DataSplit, EvalAdapters,
                                 EvalBatchSize, EvalData, EvalFormat, EvalJson, EvalMaxLength, EvalMaxNewTokens,
                                 EvalMerged, EvalMetrics, EvalModel, EvalNormalize, EvalOnBadRows, EvalPredictions,
                                 EvalRecipe, General, MergeTrustRemoteCode, MinP, Overrides, RepetitionPenalty,
                                 Stop, Task, TopK, TrustRemoteCode, adapter_flags, adapter_path, arrow_settings, check_json_out,
                                 command_inputs, data_path, fetched, job_inputs, local_path, model_path, typed,
                                 user_path)
from peftkit.errors import PeftkitError, visible


@app.command()
def merge(
    adapter: Annotated[list[str], typer.Option("--adapter", metavar="DIR", help="PEFT adapter directory (or hub id user/name[@REV]); repeat it, with --weights "
                                               "and --method, to combine several.")],
    output: Annotated[str, typer.Option("--output", help="Directory for the merged model (or combined adapter).")],
    base: Annotated[Optional[str], typer.Option("--base", help="Base model; default: the adapter's base_model_name_or_path.")] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="float32 | bfloat16 | float16; default: the base's dtype.")] = None,
    requantize: Annotated[Optional[str], typer.Option("--requantize", help="nf4 or fp4: also save OUTPUT-nf4 (OUTPUT-fp4), re-quantized (lossy).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing OUTPUT (never the base or the adapter).")] = False,
    weights: Annotated[Optional[str], typer.Option("--weights", help="Combining: one weight per --adapter, e.g. "
                                                   "0.7,0.3; a negative weight subtracts that adapter.")] = None,
    method: Annotated[Optional[str], typer.Option("--method", help="Combining: linear | cat | svd | ties | ties_svd | "
                                                  "dare_linear | dare_ties | dare_linear_svd | dare_ties_svd | "
                                                  "magnitude_prune | magnitude_prune_svd.")] = None,
    density: Annotated[Optional[float], typer.Option("--density", help="Pruning methods: fraction kept, in (0, 1].")] = None,
    svd_rank: Annotated[Optional[int], typer.Option("--svd-rank", help="SVD methods: rank of the result; default: "
                                                    "the largest input rank.")] = None,
    svd_clamp: Annotated[Optional[float], typer.Option("--svd-clamp", help="SVD methods: clip the factors at this "
                                                       "quantile of their values.")] = None,
    majority_sign: Annotated[str, typer.Option("--majority-sign", help="TIES methods: total | frequency.")] = "total",
    seed: Annotated[int, typer.Option("--seed", help="DARE methods: seed of the random pruning.")] = 0,
    into_base: Annotated[bool, typer.Option("--into-base", help="Combining: fold the result into the base and save "
                                            "a plain model, instead of a LoRA adapter.")] = False,
    task: Annotated[Optional[int], typer.Option("--task", min=0, help="Poly: the task whose update is folded in "
                                                "(the others are dropped).")] = None,
    trust_remote_code: MergeTrustRemoteCode = False,
) -> None:
    """Fold one adapter into its base (a 4-bit base is dequantized first) and save a plain model; or combine
    several adapters (--weights, --method) into one LoRA adapter, or with --into-base into the base."""
    from peftkit.merge import merge_adapter, requantized_dir
    from peftkit.progress import phase

    output = str(Path(output).expanduser())

    if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
        raise PeftkitError(f"--dtype {dtype!r}: use float32, bfloat16 or float16.")
    if requantize is not None and requantize not in ("nf4", "fp4"):
        raise PeftkitError(f"--requantize {requantize!r}: use nf4 (or fp4).")
    if len(adapter) > 1 or weights is not None or method is not None:
        if task is not None:
            raise PeftkitError(f"--task {task} picks the task of one Poly adapter merged into its base; combining "
                               "adapters takes none. Drop --task.")
        _combine(adapter, output, base, dtype, requantize, overwrite, weights, method, density, svd_rank, svd_clamp,
                 majority_sign, seed, into_base, trust_remote_code)
        return
    combining = {"--into-base": into_base, "--density": density is not None, "--svd-rank": svd_rank is not None,
                 "--svd-clamp": svd_clamp is not None, "--majority-sign": majority_sign != "total", "--seed": seed != 0}
    if given := next((flag for flag, set_ in combining.items() if set_), None):
        raise PeftkitError(f"{given} is for combining several adapters (--adapter repeated, with --weights and "
                           f"--method); one --adapter is merged into its base as it is. Remove {given}.")
    if requantize:
        # Not "slightly": an additive update (LoRA's, DoRA's, LoHa's, LoKr's, VeRA's) is mostly below half a 4-bit
        # step, so rounding W + dW again gives W's codes back. The line printed after the merge says how much is kept
        # (peftkit.requantized; SmolLM2-135M, QLoRA r 8 after 4 steps: see docs/cli.md's merge).
        err_console.print(f"[yellow]warning:[/] --requantize {requantize} rounds the merged weights to 4 bits again, "
                          "which rounds away an update smaller than half a 4-bit step, as most of a LoRA's "
                          "is: the re-quantized model may give the base's outputs rather than the trained model's. "
                          "The merge says how much of the update it keeps (peftkit eval --model on it tells the "
                          "rest); the full-precision merge, kept too, holds the whole update.")
    with phase(f"Merging {adapter[0]} into its base..."):
        out = merge_adapter(adapter_path(adapter[0]), output, model_path(base, "--base"), dtype, requantize,
                            overwrite, trust_remote_code, task)
    console.print(f"Merged model written to {out}", markup=False, highlight=False)
    if requantize:
        _say_requantized(requantized_dir(out, requantize), requantize)


def _say_requantized(directory: Path, method: str) -> None:
    """Where `merge --requantize` wrote the 4-bit model, and how much of the update it keeps (its peftkit.json's
    `requantized`, `peftkit.requantized.kept_line`)."""
    from peftkit.merge import model_record
    from peftkit.requantized import kept_line

    console.print(f"Re-quantized ({method}) model written to {directory}", markup=False, highlight=False)
    if (record := (model_record(directory) or {}).get("requantized")) is not None:
        console.print(kept_line(record, directory), markup=False, highlight=False)


def _combine(adapters: list[str], output: str, base: str | None, dtype: str | None, requantize: str | None,
             overwrite: bool, weights: str | None, method: str | None, density: float | None, svd_rank: int | None,
             svd_clamp: float | None, majority_sign: str, seed: int, into_base: bool, trust_remote_code: bool) -> None:
    """`peftkit merge` with several --adapter: parse the combination and hand it to `combine_adapters`."""
    from peftkit.combine_adapters import combine_adapters
    from peftkit.combine_inputs import Combination

    if weights is None or method is None:
        missing = " and ".join(f for f, v in (("--weights", weights), ("--method", method)) if v is None)
        one = (" (or drop --weights and --method to merge the one adapter into its base)" if len(adapters) == 1
               else "")
        raise PeftkitError(f"Combining adapters needs {missing}: --weights one per adapter (e.g. "
                           f"{','.join(['0.5'] * len(adapters))}), --method how (e.g. linear, cat or svd){one}.")
    if requantize is not None:
        raise PeftkitError("--requantize is for the single-adapter merge; merge the combined adapter with "
                           "--into-base, then load it quantized.")
    if dtype is not None and not into_base:
        raise PeftkitError("--dtype is the dtype of a merged model: add --into-base, or leave --dtype out (a combined "
                           "adapter is saved in fp32).")
    try:
        parsed = tuple(float(w) for w in weights.split(","))
    except ValueError:
        raise PeftkitError(f"--weights {weights!r}: give numbers separated by commas, e.g. --weights 0.7,0.3.") from None
    combination = Combination(method, parsed, density, svd_rank, svd_clamp, majority_sign, seed)
    out = combine_adapters([adapter_path(a) for a in adapters], combination, output, into_base, model_path(base, "--base"),
                           dtype, overwrite, trust_remote_code)
    what = "Merged model" if into_base else f"Combined adapter ({method})"
    console.print(f"{what} written to {out}", markup=False, highlight=False)


@app.command("eval")
def eval_cmd(
    recipe: EvalRecipe = None,
    model: EvalModel = None,
    data: EvalData = None,
    fmt: EvalFormat = None,
    adapter: EvalAdapters = None,
    merged: EvalMerged = None,
    max_length: EvalMaxLength = None,
    batch_size: EvalBatchSize = None,
    on_bad_rows: EvalOnBadRows = None,
    json_out: EvalJson = None,
    metrics: EvalMetrics = None,
    max_new_tokens: EvalMaxNewTokens = None,
    normalize: EvalNormalize = None,
    predictions: EvalPredictions = None,
    arrow: Arrow = False,
    arrow_top_k: ArrowTopK = None,
    arrow_temperature: ArrowTemperature = None,
    general: General = None,
    task: Task = None,
    split: DataSplit = None,
    data_revision: DataRevision = None,
    overrides: Overrides = None,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Loss, perplexity and token count of a base model, a base + adapter, or a merged model, counted on the
    same target tokens as in training; with --metrics, task metrics of its greedy answers too."""
    from peftkit.cli.evaluation import (check_apart, check_outputs, compare, comparison_flags, evaluate_and_print,
                                        several_sets)
    from peftkit.compare import split_named
    from peftkit.eval_job import eval_job

    adapters, merged = adapter or [], merged or []
    json_out, predictions = user_path(json_out), user_path(predictions)
    comparing = len(adapters) > 1 or bool(merged) or any(split_named(a) for a in adapters)
    settings = arrow_settings(arrow, arrow_top_k, arrow_temperature, general, len(adapters), task)
    named, named_merged = comparison_flags(adapters, merged, comparing, settings, general or [])
    inputs = command_inputs(recipe, local_path(model) if model else None, data_path(data) if data else None,
                            [local_path(p) for _, p in named] or adapters, [local_path(p) for _, p in named_merged])
    outputs = ((json_out, "--json"), (None if comparing else predictions, "--predictions"))
    check_outputs(outputs, inputs)
    single = adapter_path(adapters[0]) if adapters and not comparing else None
    base = None
    if comparing and recipe is None and not model and data:  # the base row its candidates record
        from peftkit.compare_base import comparison_base

        named = [(n, adapter_path(p, f"--adapter {n}={p}")) for n, p in named]
        base = comparison_base(named, [(n, local_path(p)) for n, p in named_merged], trust_remote_code)

    def job_of(data_source: str | None, predictions_file: Path | None, **where):
        """The job of these flags on `data_source` (None: the recipe's data.eval set `where['eval_set']`, or its first)."""
        return eval_job(recipe, overrides or [], model_path(model), data_source, fmt, single, max_length,
                        batch_size, on_bad_rows, trust_remote_code, metrics, max_new_tokens, normalize, predictions_file,
                        task, comparing=comparing, **where)

    job = job_of(data_path(data) if data else None, predictions, split=split, data_revision=data_revision, base=base)
    inputs += job_inputs(job)  # a recipe's data.eval and model, a run's adapter/
    if predictions is not None and not comparing and len(job.eval_sets) <= 1:  # (several: each set's file, below)
        check_apart(json_out, predictions, "the --predictions file")
    check_outputs(outputs, inputs)
    sets = {}
    if len(job.eval_sets) > 1:  # the recipe's data.eval names several sets: each, by name
        sets = several_sets(job, job_of, None if comparing else predictions, recipe, json_out, inputs)
    if comparing:
        compare(sets or {None: job}, named, named_merged, predictions, json_out, settings, general or [], inputs)
        return
    evaluate_and_print(job, sets, json_out, predictions)


@app.command()
def generate(
    recipe: Annotated[Optional[Path], typer.Argument(help="A recipe, or a run directory (its recipe.yaml; its adapter/ "
                                                     "is the default --adapter). Without --prompt or --data, the "
                                                     "prompts of its data.eval.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Model directory or hub id (base or merged).")] = None,
    adapter: Annotated[Optional[list[str]], typer.Option("--adapter", metavar="[NAME=]DIR", help="PEFT adapter directory (or hub id user/name[@REV]) to apply. Repeat "
                                                         "as NAME=DIR to load several, picked per row by --route.")] = None,
    route: Annotated[Optional[str], typer.Option("--route", help="With --data and NAME=DIR adapters: the column naming "
                                                 "each row's adapter (empty or 'base': the base model); all rows "
                                                 "generate in mixed batches.")] = None,
    arrow: Arrow = False,
    arrow_top_k: ArrowTopK = None,
    arrow_temperature: ArrowTemperature = None,
    general: General = None,
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", metavar="TEXT", help="A prompt (repeatable).")] = None,
    data: Annotated[Optional[str], typer.Option("--data", help="Generate for each row's prompt (the prompt training "
                                                "used); the row's target is kept as the reference.")] = None,
    fmt: Annotated[Optional[str], typer.Option("--format", help="alpaca | chat | completion | preference | unpaired "
                                               "| tokenized (each row's prompt); default: the recipe's, else "
                                               "alpaca. With --prompt, alpaca gives each prompt as an instruction "
                                               "in the alpaca template.")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap each --prompt as a user turn in the chat template.")] = False,
    input_: Annotated[Optional[list[str]], typer.Option("--input", metavar="TEXT", help="--format alpaca: the input "
                                                        "section of the --prompt at its place (one per --prompt; '' "
                                                        "for none).")] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="--data: only the first N rows.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Stop after this many new tokens (or at EOS).")] = 128,
    temperature: Annotated[float, typer.Option(help="0 (the default): greedy; > 0: sample.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Sampling: nucleus cut, in (0, 1].")] = 1.0,
    top_k: TopK = 0,
    min_p: MinP = 0.0,
    repetition_penalty: RepetitionPenalty = 1.0,
    stop: Stop = None,
    seed: Annotated[int, typer.Option(help="Sampling: the seed.")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per batch (left-padded).")] = 8,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write [{prompt, completion, reference}, ...] here instead "
                                                     "of printing.")] = None,
    task: Task = None,
    split: DataSplit = None,
    data_revision: DataRevision = None,
    overrides: Overrides = None,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Generate completions with a base model, a base + adapter, or a merged model: greedy unless
    --temperature > 0, stopping at EOS (or before a --stop string)."""
    from rich.markup import escape
    from rich.text import Text

    from peftkit.decoding import Sampling
    from peftkit.fileio import atomic_write_json
    from peftkit.generate import check_arrow, generate_job, run_generate

    json_out = user_path(json_out)
    single, named = adapter_flags(adapter or [])
    inputs = command_inputs(recipe, local_path(model) if model else None, data_path(data) if data else None,
                            [local_path(p) for p in [single] if p] + [local_path(p) for _, p in named])
    if json_out is not None:
        check_json_out(json_out, "--json", inputs, "completions.json")  # (eval.json was suggested)
    prompts = [typed(text) for text in prompt or []]
    settings = arrow_settings(arrow, arrow_top_k, arrow_temperature, general, len(named), task)
    check_arrow(named, settings, general or [], route)  # before a hub adapter is fetched
    single, named = fetched(single, named)
    job = generate_job(recipe, overrides or [], model_path(model), single, prompts,
                       data_path(data) if data else None, fmt, chat, limit,
                       Sampling(max_new_tokens, temperature, top_p, seed, top_k, min_p, repetition_penalty,
                                  tuple(typed(t) for t in stop or [])),
                       batch_size, trust_remote_code, task, named, route, split, data_revision, settings, general,
                       [typed(text) for text in input_ or []])
    if json_out is not None:  # and what the recipe gives: its data.eval, a run's adapter/
        check_json_out(json_out, "--json", inputs + job_inputs(job), "completions.json")
    if job.start:  # (a recipe's adapter.init_from: `peftkit.start_eval.from_the_start`)
        from peftkit.start_eval import said

        said_beside(json_out).print(said(job.start), markup=False, highlight=False, soft_wrap=True)

    def show(prompts, completions) -> None:
        from peftkit.decoding import blank_answer

        for p, c in zip(prompts, completions, strict=True):
            note = blank_answer(c)
            console.print(Text.assemble((visible(p.text), "dim"), (note, "italic") if note else visible(c)),
                          highlight=False)  # no markup
            console.rule(style="dim", characters="─" if console.encoding.startswith("utf") else "-")

    results = run_generate(job, on_batch=None if json_out else show)
    if json_out:
        atomic_write_json(json_out, results)
        n = len(results)
        said_beside(json_out).print(f"{n} completion{'s' * (n != 1)} written to {escape(str(json_out))}")


@app.command()
def chat(
    recipe: Annotated[Optional[Path], typer.Argument(help="A recipe, or a run directory (its model; its adapter/ is "
                                                     "the default --adapter).")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Model directory or hub id (base or merged).")] = None,
    adapter: Annotated[Optional[list[str]], typer.Option("--adapter", metavar="[NAME=]DIR", help="PEFT adapter directory "
                                                         "(or hub id user/name[@REV]) to apply; with --arrow, several "
                                                         "as NAME=DIR.")] = None,
    arrow: Arrow = False,
    arrow_top_k: ArrowTopK = None,
    arrow_temperature: ArrowTemperature = None,
    general: General = None,
    system: Annotated[Optional[str], typer.Option("--system", help="A system message opening the conversation "
                                                  "(default: a recipe's data.system_prompt; '' for none).")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest reply, in tokens.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 (the default): greedy; > 0: sample.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Sampling: nucleus cut, in (0, 1].")] = 1.0,
    top_k: TopK = 0,
    min_p: MinP = 0.0,
    repetition_penalty: RepetitionPenalty = 1.0,
    stop: Stop = None,
    seed: Annotated[int, typer.Option(help="Sampling: the seed.")] = 0,
    task: Task = None,
    overrides: Overrides = None,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Chat with a model in the terminal (its chat template), replies streamed; /reset, /exit."""
    from contextlib import nullcontext

    import torch

    from peftkit.chat import chat_loop, unlike_training
    from peftkit.data.checks import guard_token_ids
    from peftkit.data.prompts import chat_prompt
    from peftkit.decoding import Sampling
    from peftkit.generate import check_arrow, warn_arrow_templates
    from peftkit.inference import model_source
    from peftkit.task_ids import resolve_tasks

    sampling = Sampling(max_new_tokens, temperature, top_p, seed, top_k, min_p, repetition_penalty,
                        tuple(typed(t) for t in stop or []))
    sampling.check()
    single, named = adapter_flags(adapter or [])
    settings = arrow_settings(arrow, arrow_top_k, arrow_temperature, general, len(named), task)
    check_arrow(named, settings, general or [], None)
    if settings is None and len(named) > 1:
        raise PeftkitError("peftkit chat runs one adapter: give --adapter once, or route each token among several "
                           "NAME=DIR adapters with --arrow.")
    single, named = fetched(single, named)  # (hub adapters downloaded once the flags are known to be right)
    source, cfg, start = model_source(recipe, overrides or [], model_path(model),
                                      single or (named[0][1] if named else None), trust_remote_code, "chat")
    if start:  # (a recipe's adapter.init_from: `peftkit.start_eval.from_the_start`)
        from peftkit.start_eval import said

        console.print(said(start), markup=False, highlight=False, soft_wrap=True)
    if cfg is not None and (note := unlike_training(cfg.data, recipe)):
        err_console.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
    tok = source.tokenizer()
    if settings is not None:
        warn_arrow_templates(source, named)
    # A recipe's data.system_prompt opened each conversation it trained on, an empty one too: the default of --system
    # ('' for none).
    system = (typed(system) or None) if system is not None else cfg.data.system_prompt if cfg is not None else None
    opening = [{"role": "system", "content": system}] if system is not None else []
    # No template, or one that refuses a system message: said before the model loads.
    chat_prompt(tok, [*opening, {"role": "user", "content": "probe"}],
                "peftkit chat needs one. Use a model whose tokenizer has a template, or `peftkit generate --prompt "
                "TEXT` to continue plain text")
    task = resolve_tasks(source, task, [None], None)[0]  # and a missing --task
    if settings is not None:  # one Arrow block for the whole conversation: each layer's prototypes computed once
        loaded, adapters = source.load_named(named)
        routing = adapters.arrow([n for n, _ in named if n not in (general or [])], general or [], settings)
    else:
        loaded, routing = source.load(), nullcontext()
    guard_token_ids(loaded, tok)
    torch.manual_seed(seed)
    with routing:
        chat_loop(loaded, tok, sampling, read=lambda asked: typed(input(asked)), system=system, task=task)


@app.command("inspect")
def inspect_cmd(
    adapter_dir: Annotated[str, typer.Argument(help="A PEFT-format adapter directory (peftkit's or peft's), a run directory (its adapter/), or a hub id user/name[@REV].")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the facts as one JSON object.")] = False,
) -> None:
    """Describe an adapter from its files: method, base model, targets, ranks, parameters, dtype, size,
    quantization, and whether vLLM would serve it (and why not). Loads no model."""
    import json

    from rich.text import Text

    from peftkit.inspect import inspect_adapter
    from peftkit.inspect_text import describe

    path = Path(adapter_path(adapter_dir, adapter_dir))  # (a str: typer's Path drops the `./` of `./x`; a run: its adapter/)
    info = inspect_adapter(path)
    if as_json:
        print(json.dumps(info, indent=2))
        return
    for line in describe(info):
        console.print(Text(visible(line)), highlight=False)


@app.command()
def push(
    path: Annotated[Path, typer.Argument(help="A run directory (its adapter/ is pushed), an adapter directory or a merged model's directory.")],
    repo_id: Annotated[str, typer.Argument(help="The Hub model repository, user/name (created where absent).")],
    revision: Annotated[Optional[str], typer.Option("--revision", help="The branch to commit to, created from main where absent (default: main).")] = None,
    private: Annotated[bool, typer.Option("--private", help="Create the repository private (an existing public one is refused).")] = False,
    merged: Annotated[bool, typer.Option("--merged", help="Push the run's merged/ instead of its adapter/.")] = False,
    message: Annotated[Optional[str], typer.Option("--message", help="The commit message.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete the branch's configs, weights, tokenizer files and templates that PATH lacks (an earlier push's), which would be read with the new files.")] = False,
) -> None:
    """Publish an adapter (or merged model) to a Hugging Face Hub model repository in one commit: a run's adapter/
    with its model card, never its checkpoints or data; the branch's top-level loader files it lacks (an earlier
    push's) are refused, or deleted with --overwrite. Needs a token with write access (`hf auth login`, or
    HF_TOKEN); `--adapter user/name` and peft's PeftModel.from_pretrained read it back."""
    from rich.text import Text

    from peftkit.push import push as run_push

    url, files, deleted, _ = run_push(path.expanduser(), repo_id, revision, private, merged, message, overwrite)
    for name in files:
        console.print(Text(visible(f"pushed {name}")), highlight=False)
    for name in deleted:
        console.print(Text(visible(f"deleted {name}")), highlight=False)
    console.print(Text(visible(f"commit {url}")), highlight=False)
