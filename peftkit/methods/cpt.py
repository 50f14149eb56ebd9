"""CPT (context-aware prompt tuning, Blau et al. 2024, "Context-aware Prompt Tuning: Advancing In-Context Learning
with Adversarial Methods", arXiv:2410.17222; peft's CPTConfig/CPT): in-context learning whose context trains. A few
worked examples, tokenized, go in front of every input as prompt tuning's virtual tokens do, starting at their own
token embeddings; a trained delta moves each embedding within a small ball around its start, and the examples' own
answers are scored by the loss beside the input's.

The context is peft's three lists, one entry per token: `cpt_token_ids`, `cpt_mask` (peft keeps it and never reads
it) and `cpt_tokens_type_mask`, whose value says what the token is in example k (counted from 0): 4k + 1 the input's
template, 4k + 2 the input, 4k + 3 the output's template, 4k + 4 the output (a label), 0 neither (a separator). A
recipe gives them as they are, or gives `context`, the examples as rows of the data (alpaca, completion or chat
rows), which peftkit tokenizes as it tokenizes data rows (`peftkit.data.examples`: the prompt with the tokenizer's
leading special tokens, then the answer and EOS; a conversation rendered by the chat template the data's are,
data.chat_template or the tokenizer's own): the tokens the data would train (the answer and EOS, the assistant turns
and their end-of-turn marks) are outputs (4k + 4), the others inputs (4k + 2), special tokens among them 0.

As peft 0.21's `CPTEmbedding` and `PeftModelForCausalLM._cpt_forward`:
    prompt     start + delta: start the fp32 embeddings of the ids (frozen), delta (n, hidden) trained, zeros at
               first; only rows of types 1, 2 and 3 (mod 4) move (peft masks the others' gradient; here the forward
               multiplies by the mask: the same numbers, and their gradient is 0)
    projection after each optimizer step each delta row of norm above its epsilon is scaled to it: epsilon
               opt_projection_format_epsilon (types 1, 3) or opt_projection_epsilon (type 2), times
               sqrt(hidden / 2048), and 1e-10 for the others. peft projects at the start of every forward instead:
               the same delta in training, whose projection of a projected delta changes it by rounding alone
    loss       over the whole sequence, context then input: the context's output tokens and the input's labelled
               ones (the input's tokens are all of type 4 + the context's largest type: its last example), each
               token's cross-entropy times its weight, summed and divided by their number. Weights are 1, or with
               opt_weighted_loss_type: decay, opt_loss_decay_factor^j for the example j places before the input
peftkit's evaluation loss is the data's own (the input's labelled tokens, as for every method), and the file holds
the prompt, start + delta, as `prompt_embeddings` (fp32). Loading it (peft does the same) makes it the start, with a
zero delta: training from it (adapter.init_from) moves within the balls around it. Not mergeable.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, PrivateAttr, field_validator, model_serializer, model_validator
from torch import nn
from torch.nn import functional as F

from peftkit.errors import PeftkitError
from peftkit.methods.base import MethodTrainer, draw_device
from peftkit.methods.prompt_tuning import PromptTuning
from peftkit.methods.virtual import (
    IGNORE_INDEX,
    VirtualConfig,
    VirtualPeftConfig,
    VirtualTokens,
    install,
    virtual_tokens,
)

MIN_EPSILON = 1e-10
"""peft's ball for the tokens that never move (outputs, separators)."""


class CptConfig(VirtualConfig):
    """CPT: a context of worked examples in front of every input, its embeddings trained within small balls."""

    method: Literal["cpt"]
    context: list[dict[str, Any]] | str | None = None
    """The examples, as rows of the data: alpaca ({instruction, input (optional), output}), completion ({prompt,
    completion}) or chat ({messages, tools (optional)}), or a .jsonl file of them (relative to the recipe's directory);
    tokenized with the base's tokenizer (and data.chat_template) into cpt_token_ids and the masks (leave those out)."""
    cpt_token_ids: list[int] | None = None
    """The context's token ids (peft's field; a context of examples fills it in the exported adapter)."""
    cpt_mask: list[int] | None = None
    """peft's attention mask of the context (kept in adapter_config.json, never read); default all 1."""
    cpt_tokens_type_mask: list[int] | None = None
    """Each token's type (module docstring: 4k + 1 .. 4k + 4 in example k, 0 none); default all 1, peft's, which
    marks no output: train refuses it (peft's loss is then NaN)."""
    opt_weighted_loss_type: Literal["none", "decay"] = "none"
    """decay: each example's outputs weigh opt_loss_decay_factor^j, j its distance from the input (which weighs 1)."""
    opt_loss_decay_factor: float = Field(1.0, ge=0)
    opt_projection_epsilon: float = Field(0.1, ge=0)
    """The ball of the inputs' tokens (type 2), scaled by sqrt(hidden / 2048) as peft's."""
    opt_projection_format_epsilon: float = Field(0.1, ge=0)
    """The ball of the templates' tokens (types 1, 3), scaled alike."""
    tokenizer_name_or_path: str | None = None
    """peft's record of the tokenizer (never read here)."""
    _chat_template: str | None = PrivateAttr(None)
    """The recipe's data.chat_template, which renders the context's conversations as the data's (`Cpt.with_recipe`)."""
    _tokenizer: tuple[str, str | None] | None = PrivateAttr(None)
    """The recipe's base model (name_or_path, revision), whose tokenizer gives the context's length before the model
    loads (`Cpt.positions_in_front`)."""

    @field_validator("context")
    @classmethod
    def _rows(cls, rows: list[dict[str, Any]] | str | None) -> list[dict[str, Any]] | str | None:
        if isinstance(rows, str):
            if not rows.endswith(".jsonl"):
                raise ValueError(f"{rows!r} is no .jsonl file; give the examples as a list, or a .jsonl file of them "
                                 "(one row a line)")
            return rows
        if rows is not None and not rows:
            raise ValueError("is an empty list; give at least one example, or cpt_token_ids")
        for i, row in enumerate(rows or []):
            if (problem := example_problem(row)) is not None:
                raise ValueError(f"[{i}] {problem}")
        return rows

    @model_validator(mode="before")
    @classmethod
    def _filled(cls, data: Any) -> Any:
        """peft's defaults of the masks (all 1), and num_virtual_tokens the context's length, where the ids are given."""
        ids = data.get("cpt_token_ids") if isinstance(data, dict) else None
        if not isinstance(ids, list) or not ids:
            return data
        if "num_virtual_tokens" in data and data["num_virtual_tokens"] != len(ids):
            raise ValueError(f"num_virtual_tokens is {data['num_virtual_tokens']} and cpt_token_ids has {len(ids)} "
                             "ids: CPT's virtual tokens are the context's; remove num_virtual_tokens")
        return {"cpt_mask": [1] * len(ids), "cpt_tokens_type_mask": [1] * len(ids)} | {
            k: v for k, v in data.items() if v is not None} | {"num_virtual_tokens": len(ids)}

    @model_serializer(mode="wrap")
    def _without_length(self, handler) -> dict[str, Any]:
        """A context of examples is written without num_virtual_tokens (its default, never read: the examples give
        the length once tokenized), so that a run's recipe.yaml and manifest load again (`_one_context`)."""
        data = handler(self)
        return {k: v for k, v in data.items() if k != "num_virtual_tokens"} if self.context is not None else data

    @model_validator(mode="after")
    def _one_context(self) -> CptConfig:
        if (self.context is None) == (self.cpt_token_ids is None):
            raise ValueError("give the context once: context (examples, which peftkit tokenizes) or cpt_token_ids "
                             "(with cpt_mask and cpt_tokens_type_mask), not " + ("both" if self.context else "neither"))
        if self.context is not None:
            if self.cpt_mask is not None or self.cpt_tokens_type_mask is not None:
                raise ValueError("cpt_mask and cpt_tokens_type_mask go with cpt_token_ids; context's examples make "
                                 "their own (remove them)")
            if "num_virtual_tokens" in self.model_fields_set:
                raise ValueError("num_virtual_tokens is the context's length, which its examples give once tokenized; "
                                 "remove num_virtual_tokens")
            return self
        n = len(self.cpt_token_ids)
        if not n:
            raise ValueError("cpt_token_ids is an empty list; give the context's token ids")
        if not len(self.cpt_mask) == len(self.cpt_tokens_type_mask) == n:
            raise ValueError(f"cpt_token_ids ({n}), cpt_mask ({len(self.cpt_mask)}) and cpt_tokens_type_mask "
                             f"({len(self.cpt_tokens_type_mask)}) must have the same length (peft refuses it too)")
        if min(self.cpt_tokens_type_mask) < 0:
            raise ValueError("cpt_tokens_type_mask has a negative type; types are 0 (none) or 4k + 1 .. 4k + 4")
        return self


class CptPeftConfig(VirtualPeftConfig):
    cpt_token_ids: list[int] | None = None
    cpt_mask: list[int] | None = None
    cpt_tokens_type_mask: list[int] | None = None
    opt_weighted_loss_type: str | None = "none"
    opt_loss_decay_factor: float | None = 1.0
    opt_projection_epsilon: float | None = 0.1
    opt_projection_format_epsilon: float | None = 0.1
    tokenizer_name_or_path: str | None = None


def row_format(row: dict) -> str | None:
    """The data format an example row is written in, by its fields; None for none."""
    if isinstance(row, dict) and {"instruction", "output"} <= set(row) <= {"instruction", "input", "output"}:
        return "alpaca"
    if isinstance(row, dict) and set(row) == {"prompt", "completion"}:
        return "completion"
    if isinstance(row, dict) and "messages" in row and set(row) <= {"messages", "tools"}:
        return "chat"
    return None


def example_problem(row: Any) -> str | None:
    """What makes `row` no example (its fields, or a conversation's messages as the data's are checked); None."""
    from peftkit.data.formats import _row_problem

    if (fmt := row_format(row)) is None:
        fields = f"has the fields {sorted(row)}" if isinstance(row, dict) else "is no object"
        return (f"{fields}; an example is an alpaca row (instruction, input, output), a completion row (prompt, "
                "completion) or a chat row (messages)")
    problem = _row_problem(row, fmt) if fmt == "chat" else None
    return None if problem is None else f"is no example of data.format chat: {problem}"


def tokenized_context(tok, rows: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """(cpt_token_ids, cpt_tokens_type_mask) of the example `rows`, each tokenized as a data row of its format: the
    tokens the data trains (labels) outputs, 4k + 4, the others inputs, 4k + 2, but special tokens, 0."""
    from peftkit.data.conversations import _chat_example
    from peftkit.data.examples import _prompts_and_targets  # the data's own tokenization of a row

    specials = set(tok.all_special_ids)
    ids, types = [], []
    for k, row in enumerate(rows):
        if row_format(row) == "chat" and not getattr(tok, "chat_template", None):
            raise PeftkitError(f"adapter.context[{k}] is a conversation (messages), and the base model's tokenizer has "
                               "no chat template to render it; set data.chat_template (chatml, llama3, a .jinja file), "
                               "which renders the data's conversations and the context's, or write the example as an "
                               "alpaca or completion row.")
        if row_format(row) == "chat":  # (each assistant turn and its end-of-turn mark, as data.train_on: answers)
            row_ids, labels = _chat_example(tok, row["messages"], "answers", row.get("tools"), "adapter.context")
        else:
            prompt, target = _prompts_and_targets(tok, [row], row_format(row), "adapter.context")[0]
            row_ids, labels = prompt + target, [IGNORE_INDEX] * len(prompt) + target
        ids += row_ids
        types += [4 * k + 4 if label != IGNORE_INDEX else 0 if t in specials else 4 * k + 2
                  for t, label in zip(row_ids, labels, strict=True)]
    return ids, types


def base_tokenizer(source: str, revision: str | None, chat_template: str | None = None):
    """The base model's tokenizer (`source` at `revision`), for the context's examples, with `chat_template` (the
    recipe's data.chat_template: `Cpt.with_recipe`) in place of its own where given."""
    from transformers import AutoTokenizer

    from peftkit.data.chat_templates import template_text

    try:
        tok = AutoTokenizer.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as e:
        raise PeftkitError(f"adapter.context needs the base model's tokenizer, which did not load from {source!r} "
                           f"({e}). Give the context as cpt_token_ids and cpt_tokens_type_mask instead.") from None
    if chat_template is not None:
        tok.chat_template = template_text(chat_template)
    return tok


def context_rows(path: str) -> list[dict[str, str]]:
    """The example rows of a .jsonl file, each checked as the recipe's own (`CptConfig._rows`)."""
    try:
        lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as e:
        raise PeftkitError(f"adapter.context: {path} cannot be read ({e.strerror}); give a .jsonl file of examples, "
                           "one row a line.") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except ValueError:
            raise PeftkitError(f"adapter.context: {path}:{number} is no JSON object; write one example row a "
                               "line.") from None
        if (problem := example_problem(rows[-1])) is not None:
            raise PeftkitError(f"adapter.context: {path}:{number} {problem}.")
    if not rows:
        raise PeftkitError(f"adapter.context: {path} holds no example; write one row a line.")
    return rows


def with_context(cfg: CptConfig, model: nn.Module) -> CptConfig:
    """`cfg` with its examples tokenized into peft's lists (as it is where it gives them), by the tokenizer of
    `model` (at the revision it loaded)."""
    if cfg.context is None:
        return cfg
    source = getattr(model, "name_or_path", None) or model.config._name_or_path
    return context_of(cfg, base_tokenizer(source, getattr(model, "peftkit_revision", None), cfg._chat_template))


def context_of(cfg: CptConfig, tok) -> CptConfig:
    """`cfg` with its examples tokenized by `tok` into peft's lists."""
    rows = context_rows(cfg.context) if isinstance(cfg.context, str) else cfg.context
    ids, types = tokenized_context(tok, rows)
    return CptConfig(method="cpt", cpt_token_ids=ids, cpt_mask=[1] * len(ids), cpt_tokens_type_mask=types,
                     **cfg.model_dump(exclude={"method", "context", "cpt_token_ids", "cpt_mask",
                                               "cpt_tokens_type_mask", "num_virtual_tokens"}))


def epsilons(types: list[int], cfg: CptConfig, dim: int) -> torch.Tensor:
    """(n,) fp32: each token's ball, as peft's `get_epsilon` computes it (its fp32 sqrt of dim / 2048)."""
    scale = torch.sqrt(torch.tensor([dim / 2048], dtype=torch.float32))
    kinds = torch.tensor(types).remainder(4)
    eps = torch.full((len(types),), MIN_EPSILON, dtype=torch.float32)
    positive = torch.tensor(types) > 0
    eps[positive & ((kinds == 1) | (kinds == 3))] = cfg.opt_projection_format_epsilon * scale
    eps[positive & (kinds == 2)] = cfg.opt_projection_epsilon * scale
    return eps


class ContextPrompt(nn.Module):
    """The encoder over CPT's delta: start + delta, the rows that never move masked out; and the projection."""

    def __init__(self, start: torch.Tensor, moves: torch.Tensor, eps: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("start", start)  # (n, hidden) fp32: the context's embeddings, or a loaded prompt
        self.register_buffer("moves", moves.float().view(-1, 1))  # 1 for types 1, 2, 3 (mod 4), else 0
        self.register_buffer("eps", eps)

    def forward(self, delta: torch.Tensor) -> torch.Tensor:
        return self.start + delta * self.moves

    @torch.no_grad()
    def project(self, delta: torch.Tensor) -> None:
        """peft's `get_projection`, in place: each row of norm above its epsilon scaled onto it, by peft's factor
        eps / max(norm, eps) (a zero row left alone; no row picked by a mask: nothing read on the host)."""
        norm = torch.norm(delta, p=2, dim=1)
        scale = torch.where(norm > 0, self.eps / norm.clamp(min=self.eps), torch.ones_like(norm))
        delta.mul_(scale.view(-1, 1))


class ContextTokens(VirtualTokens):
    """CPT's virtual tokens: the table is the delta, the encoder adds it to the start (a loaded prompt is the start);
    and CPT's loss, which a forward given labels returns (peft's `_cpt_forward`) and training takes
    (`CptTrainer`)."""

    def __init__(self, method, delta: torch.Tensor, encoder: ContextPrompt, cfg: CptConfig) -> None:
        super().__init__(method, delta, encoder)
        self.cfg = cfg
        self.context_types = torch.tensor(cfg.cpt_tokens_type_mask)
        types = self.context_types
        self.context_labels = torch.where((types > 0) & (types % 4 == 0), torch.tensor(cfg.cpt_token_ids), IGNORE_INDEX)
        self.input_type = int(types.max()) + 4  # an input token's type (no input_type_mask): 4 + the context's last
        self.whole = False  # a forward whose logits keep the context's positions (the training loss)
        self.labels: torch.Tensor | None = None  # the labels this forward was given, for its loss
        self.types: torch.Tensor | None = None  # and its input_type_mask (peft's keyword), if any

    def load_peft_state(self, state: dict[str, torch.Tensor], encoder_restored: bool = False) -> None:
        """peft's loading: the saved prompt becomes the start, the delta zeros (a resumed run's checkpoint has set
        both already: `encoder_restored`)."""
        saved = self.saved_prompt(state)
        if encoder_restored:
            return
        with torch.no_grad():
            self.encoder.start.copy_(saved)
            self.table.zero_()

    def after_forward(self, model: nn.Module, args: tuple, output: Any) -> Any:
        """The forward given labels: CPT's loss from the whole logits, then those of the input alone (unless
        `whole_logits`)."""
        if self.labels is not None and getattr(output, "logits", None) is not None:
            total, count = self.loss_terms(output.logits, self.labels, types=self.types)
            output.loss = total / count
        self.labels = self.types = None
        if self.whole:
            self.strip = 0
        return super().after_forward(model, args, output)

    @contextmanager
    def whole_logits(self):
        self.whole = True
        try:
            yield
        finally:
            self.whole = False

    def counted(self, labels: torch.Tensor) -> int:
        """The positions a batch's loss averages over: each row's context outputs (but at position 0, which nothing
        predicts) and its labelled tokens (the first too, which the context's last token predicts)."""
        return len(labels) * int((self.context_labels[1:] != IGNORE_INDEX).sum()) + int((labels != IGNORE_INDEX).sum())

    def all_types(self, types: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        """(rows, n + length): the context's types, then the input's: peft's input_type_mask (`types`, (rows,
        length)) with its positive types raised by the context's largest, as peft's `_cpt_forward` does (without
        changing the caller's tensor, which peft's raises in place); without it, `input_type` everywhere."""
        rows, length = labels.shape
        if types is None:
            inputs = torch.full((rows, length), self.input_type, device=labels.device)
        elif types.shape != labels.shape:
            raise PeftkitError(f"CPT's input_type_mask has the shape {tuple(types.shape)} and the input "
                               f"{tuple(labels.shape)}: give one type for each input token (0 none, 4k + 1 .. 4k + 4).")
        else:
            types = types.to(labels.device).long()
            inputs = torch.where(types > 0, types + (self.input_type - 4), types)
        return torch.cat([self.context_types.to(labels.device).expand(rows, -1), inputs], dim=1)

    def weights(self, types: torch.Tensor) -> torch.Tensor:
        """(rows, time) fp32: the weight of each position of `types` (a row's from position 1 on), 1; with decay,
        peft's: opt_loss_decay_factor^j for the j-th largest of the row's output types (4k + 4) there, the largest
        weighing 1. Worked out on the device (no host sync): a position's j is the number of different output types
        above its own, read from the row's sorted types."""
        weights = torch.ones(types.shape, device=types.device)
        if self.cfg.opt_weighted_loss_type != "decay":
            return weights
        outputs = torch.where((types > 0) & (types % 4 == 0), types, 0)
        ordered = outputs.sort(dim=1).values  # ascending, each row
        new = torch.cat([ordered[:, :1] > 0, (ordered[:, 1:] != ordered[:, :-1]) & (ordered[:, 1:] > 0)], dim=1)
        seen = new.cumsum(dim=1)  # different output types up to each sorted place
        through = torch.searchsorted(ordered, outputs, right=True) - 1  # the last sorted place of each position's type
        above = seen[:, -1:] - seen.gather(1, through)  # different output types above each position's
        # factor^j in fp64 on the CPU (MPS has no fp64), then fp32: peft's running product of Python floats rounds
        # to the same fp32 numbers (checked over 240k random factors and j < 12)
        powers = self.cfg.opt_loss_decay_factor ** torch.arange(types.shape[1] + 1, dtype=torch.float64)
        return torch.where(outputs > 0, powers.float().to(types.device)[above], weights)

    def loss_terms(self, logits: torch.Tensor, labels: torch.Tensor, labelled: int | None = None,
                   types: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the weighted cross-entropies of the context's outputs and the input's labels, summed in fp32, their
        number) from the (rows, n + length, vocab) logits of context and input, the input's (rows, length) labels and
        peft's input_type_mask `types` (a label counts where its type is an output's, 4k + 4; default, all are);
        peft's CPT loss is their ratio. `labelled`: `counted(labels)`, from the CPU (no host sync)."""
        rows, length = labels.shape
        types = self.all_types(types, labels)[:, 1:]
        labels = torch.cat([self.context_labels.to(labels.device).expand(rows, -1), labels], dim=1)
        targets = labels[:, 1:]
        keep = (targets != IGNORE_INDEX) & (types > 0) & (types % 4 == 0)
        # The labelled positions in order, as (row, time), picked by their count from the CPU (no host sync).
        where = keep.nonzero() if labelled is None else torch.nonzero_static(keep, size=labelled)
        row, time = where.unbind(1)
        losses = F.cross_entropy(logits[row, time].float(), targets[row, time], reduction="none")
        return (losses * self.weights(types)[row, time]).sum(), keep.sum()


class Cpt(PromptTuning):
    name: ClassVar[str] = "cpt"
    title: ClassVar[str] = "CPT"
    peft_type: ClassVar[str] = "CPT"
    config: ClassVar[type] = CptConfig
    peft_config: ClassVar[type] = CptPeftConfig
    saved_beyond_trained: ClassVar[str] = "the prompt, start + delta: the context's embeddings moved"
    reads_input_types: ClassVar[bool] = True
    fsdp_refusal: ClassVar[str] = ("its projection after each step scales each context token's whole row of the delta "
                                   "by the row's norm, and FSDP holds the delta sharded")

    @classmethod
    def install(cls, model: nn.Module, cfg: CptConfig) -> VirtualTokens:
        cfg = with_context(cfg, model)
        embed = model.get_input_embeddings()
        ids = torch.tensor(cfg.cpt_token_ids)
        if ids.max() >= embed.num_embeddings:
            raise PeftkitError(f"adapter.cpt_token_ids: id {int(ids.max())} is past the model's {embed.num_embeddings} "
                               "embeddings; the context was tokenized for another model.")
        with torch.no_grad():  # (the memory estimate's meta model: shapes only)
            start = embed(ids.to(embed.weight.device)).detach().float().to(draw_device(embed.weight.device)).clone()
        kinds = ids.new_tensor(cfg.cpt_tokens_type_mask).remainder(4)
        moves = (kinds > 0) & (kinds < 4)
        encoder = ContextPrompt(start, moves, epsilons(cfg.cpt_tokens_type_mask, cfg, start.shape[1]))
        return install(model, ContextTokens(cls, torch.zeros_like(start), encoder, cfg))

    @classmethod
    def add_virtual_tokens(cls, virtual: ContextTokens, model: nn.Module, kwargs: dict, batch: int) -> None:
        """Prompt tuning's, but labels (and peft's input_type_mask) are kept for CPT's loss
        (`ContextTokens.after_forward`), not the model's."""
        virtual.labels = kwargs.pop("labels", None)
        virtual.types = kwargs.pop("input_type_mask", None)
        super().add_virtual_tokens(virtual, model, kwargs, batch)

    @classmethod
    def check_run(cls, model: nn.Module, cfg: CptConfig) -> None:
        types = virtual_tokens(model).cfg.cpt_tokens_type_mask
        if max(types) % 4:
            raise PeftkitError(f"adapter.cpt_tokens_type_mask: its largest type is {max(types)}, not an output's (4k + "
                               "4), so peft's loss would mask every label of the data (and find none at all with "
                               "peft's default, all 1). End the context with an example's output, or give context.")
        if not any(0 < t % 4 for t in types):
            raise PeftkitError("adapter.cpt_tokens_type_mask has no input or template token (types 1, 2, 3 mod 4), so "
                               "nothing would train; mark the examples' inputs.")

    @classmethod
    def recipe_conflict(cls, recipe: Any) -> str | None:
        if recipe.training.objective != "sft":
            return (f"training.objective: {recipe.training.objective}: CPT trains with its own loss over the "
                    "context's outputs and the data's labels (sft); remove training.objective")
        return super().recipe_conflict(recipe)

    @classmethod
    def with_recipe(cls, cfg: CptConfig, recipe: Any) -> None:
        """The context's conversations are rendered by the data's chat template: data.chat_template, where given;
        its length is counted with the base model's tokenizer (`positions_in_front`)."""
        cfg._chat_template = recipe.data.chat_template
        cfg._tokenizer = (recipe.model.name_or_path, recipe.model.revision)

    @classmethod
    def positions_in_front(cls, cfg: CptConfig) -> int:
        """The context's tokens: its ids, or its examples tokenized (num_virtual_tokens, never read for them, was
        counted: 20 where the examples made hundreds). A config not made by load_recipe knows no tokenizer: 0."""
        if cfg.context is None:
            return len(cfg.cpt_token_ids)
        if cfg._tokenizer is None:
            return 0
        return len(context_of(cfg, base_tokenizer(*cfg._tokenizer, cfg._chat_template)).cpt_token_ids)

    @classmethod
    def trainer(cls, model: nn.Module, cfg: CptConfig, total_steps: int) -> CptTrainer:
        return CptTrainer(virtual_tokens(model))

    @classmethod
    def to_peft(cls, cfg: CptConfig, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        if cfg.cpt_token_ids is None:
            raise PeftkitError("A CPT adapter of context examples is exported after they are tokenized (the run's "
                               "CptTrainer.export).")
        return cls.peft_common(cfg, targets, base_name) | {
            "num_virtual_tokens": len(cfg.cpt_token_ids), "cpt_token_ids": cfg.cpt_token_ids,
            "cpt_mask": cfg.cpt_mask, "cpt_tokens_type_mask": cfg.cpt_tokens_type_mask,
            "opt_weighted_loss_type": cfg.opt_weighted_loss_type, "opt_loss_decay_factor": cfg.opt_loss_decay_factor,
            "opt_projection_epsilon": cfg.opt_projection_epsilon,
            "opt_projection_format_epsilon": cfg.opt_projection_format_epsilon,
            "tokenizer_name_or_path": cfg.tokenizer_name_or_path}

    @classmethod
    def from_peft(cls, peft: CptPeftConfig, config_file: Path) -> CptConfig:
        cls.check_peft(peft, config_file)
        if peft.task_type not in (None, "CAUSAL_LM"):
            raise PeftkitError(f"{config_file}: task_type is {peft.task_type!r}; CPT is for CAUSAL_LM (peft refuses "
                               "any other too).")
        fields = {k: getattr(peft, k) for k in ("cpt_mask", "cpt_tokens_type_mask", "opt_weighted_loss_type",
                                                "opt_loss_decay_factor", "opt_projection_epsilon",
                                                "opt_projection_format_epsilon", "tokenizer_name_or_path")}
        try:
            return CptConfig(method="cpt", cpt_token_ids=peft.cpt_token_ids or [0],  # peft's default: [0]
                             **{k: v for k, v in fields.items() if v is not None})
        except ValueError as e:
            raise PeftkitError(f"{config_file}: {e}") from None

    @classmethod
    def describe(cls, cfg: CptConfig) -> str:
        if isinstance(cfg.context, str):
            return f"{cls.title}, a context of examples from {cfg.context}"
        if cfg.context is not None:
            return f"{cls.title}, a context of {len(cfg.context)} examples"
        return f"{cls.title}, a context of {len(cfg.cpt_token_ids)} tokens"


class CptTrainer(MethodTrainer):
    """CPT's part of the loop: its loss, the projection after each step, and the delta and start in checkpoints
    (the adapter file holds their sum only)."""

    def __init__(self, virtual: ContextTokens) -> None:
        self.virtual = virtual

    def after_step(self, step: int) -> None:
        self.virtual.encoder.project(self.virtual.table.data)

    def state_dict(self) -> dict:
        return {"delta": self.virtual.table.detach().cpu().clone(),
                "start": self.virtual.encoder.start.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"delta", "start"}:
            raise PeftkitError("the checkpoint's CPT state has other tensors than this model's (delta, start)")
        with torch.no_grad():
            self.virtual.table.copy_(state["delta"])
            self.virtual.encoder.start.copy_(state["start"])

    def export(self, cfg: Any, state: dict[str, torch.Tensor]) -> tuple[Any, dict[str, torch.Tensor]]:
        return self.virtual.cfg, state  # (the context's examples as peft's token ids)

    def token_loss(self) -> tuple[Callable, Callable]:
        return self.virtual.counted, self.loss_sum

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor],
                 labelled: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`ContextTokens.loss_terms` of one forward whose logits keep the context's positions; 0 for a process's
        stand-in slice (`peftkit.distributed.shard`), whose rows' context outputs would otherwise count, rows the
        global batch does not hold (its labels alone are ignored already)."""
        from peftkit.distributed import in_batch_statistics

        if "position_ids" in batch:
            raise PeftkitError("CPT puts its context in front of each sequence; set data.packing: false.")
        with self.virtual.whole_logits():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        types = batch.get("input_type_mask")  # (its outputs may be fewer than the labels `labelled` counted: found)
        total, count = self.virtual.loss_terms(logits, batch["labels"], labelled if types is None else None, types)
        return (total, count) if in_batch_statistics() else (total * 0, count * 0)
