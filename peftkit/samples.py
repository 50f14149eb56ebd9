"""A few generations before and after fine-tuning (`eval.samples`): the first rows of data.eval, answered
greedily by the base model (before training) and by the fine-tuned one; the summary table shows them beside
the reference, and the manifest and report keep them."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text
from torch import nn

from peftkit.data.prompts import Prompt, load_prompts
from peftkit.decoding import Sampling, generate_texts
from peftkit.errors import visible
from peftkit.recipe import Recipe
from peftkit.start_eval import sample_key


def sample_prompts(cfg: Recipe, tok) -> list[Prompt]:
    """The prompts of the first eval.samples rows of data.eval (a preference pair's prompt, its chosen answer the
    reference); none when off, without eval data, for the `text` and `classification` formats (no prompt to
    answer: a classifier's eval reports accuracy instead), or for a reward model (it scores answers, writes none)."""
    name = next(iter(cfg.data.eval_sources()), None)  # the primary set of data.eval
    data = cfg.data.for_eval(name) if name else None
    if not (cfg.eval.samples and data) or data.format in ("text", "classification") or cfg.classifier:
        return []
    from peftkit.task_ids import recipe_reads_tasks

    source = cfg.data.eval_sources()[name]
    return load_prompts(tok, source.path, source.split, data, limit=cfg.eval.samples, skip_empty=True,
                        tasks=recipe_reads_tasks(cfg))


def answers(model: nn.Module, tok, prompts: list[Prompt], cfg: Recipe) -> list[str]:
    """Greedy answers of `model`, up to eval.max_new_tokens (its mode and torch's RNG left as they were)."""
    return generate_texts(model, tok, prompts, Sampling(max_new_tokens=cfg.eval.max_new_tokens), cfg.eval.batch_size)


def _short(text: str, width: int = 60) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else "…" + flat[-(width - 1):]


def print_samples(console: Console, samples: list[dict], before: str = "base model") -> None:
    """The samples: a table on a terminal; in a log, a line per field, never wrapped (newlines shown as spaces).
    `before`: the title of the answers before training (`peftkit.start_eval.title`)."""
    if console.is_terminal:
        console.print(samples_table(samples, before))
        return
    console.print("generations (greedy)", highlight=False)
    key = sample_key(samples)
    for i, s in enumerate(samples, 1):
        fields = [("prompt", _short(s["prompt"])), ("reference", s["reference"] or "")]
        fields += [(before, s.get(key) or "")] if key in s else []
        for name, value in [*fields, ("fine-tuned", s["fine_tuned"])]:
            console.print(Text(visible(f"  {i}  {name:<10}  {' '.join(value.split())}")), soft_wrap=True, highlight=False)


def samples_table(samples: list[dict], before: str = "base model") -> Table:
    """prompt (its end), reference, the answer before training (when evaluated: the base model's, or an init_from
    run's start's, titled `before`), fine-tuned answer."""
    table = Table(title="generations (greedy)", show_lines=True)
    key = sample_key(samples)
    answered = any(key in s for s in samples)
    columns = ["prompt", "reference"] + ([before] if answered else []) + ["fine-tuned"]
    for column in columns:
        table.add_column(column, overflow="fold")
    for s in samples:
        row = [_short(s["prompt"]), s["reference"] or ""] + ([s.get(key, "")] if answered else [])
        table.add_row(*(Text(visible(cell)) for cell in (*row, s["fine_tuned"])))  # as written: `[/INST]` is not markup
    return table
