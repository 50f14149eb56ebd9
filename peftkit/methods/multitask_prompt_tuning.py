"""Multitask prompt tuning (Wang et al. 2023, "Multitask Prompt Tuning Enables Parameter-Efficient Transfer
Learning"): one shared soft prompt P (n, hidden), and per task a rank-r factor pair, cols (n, r) and rows (r, hidden);
task t's prompt is P * (cols_t @ rows_t), elementwise. A row's task is the data's `task` column (an integer);
training, `peftkit eval` and the loss read it per row, and a forward given no task ids uses task 0. `peftkit
generate`/`eval`/`chat` take `--task N` or the rows' column, and refuse neither for several tasks (`peftkit.task_ids`);
generation hands each row's task to the prefill of the virtual tokens (`prefilled_cache`).

Two stages: train on several source tasks (num_tasks: K), then start a target task's adapter (num_tasks: 1) from
that one (`init: source`, `source_adapter: DIR`): the shared prompt, and the source tasks' factors averaged
(peft's AVERAGE_SOURCE_TASKS) or one source task's (`source_task: k`, peft's EXACT_SOURCE_TASK).

peft's format: `prompt_embeddings` (n, hidden), `prefix_task_cols` (K, n, r), `prefix_task_rows` (K, r, hidden),
adapter_config.json with `peft_type: MULTITASK_PROMPT_TUNING`, `num_tasks`, `num_ranks`. Forward numerics as peft's
`MultitaskPromptEmbedding` and `PeftModelForCausalLM.forward`: inputs_embeds = [prompt(task); embed(input_ids)].
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from safetensors.torch import load_file
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.methods.prompt_tuning import PromptTuning
from peftkit.methods.virtual import (
    PROMPT_KEY,
    VirtualConfig,
    VirtualPeftConfig,
    VirtualTokens,
    install,
)

COLS, ROWS = "prefix_task_cols", "prefix_task_rows"
KEYS = (PROMPT_KEY, COLS, ROWS)
PEFT_INITS = ("RANDOM", "AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED", "TEXT")


class MultitaskPromptTuningConfig(VirtualConfig):
    """Multitask prompt tuning: a shared soft prompt, scaled per task by a rank-`num_ranks` product."""

    method: Literal["multitask_prompt_tuning"]
    num_tasks: int = Field(1, gt=0)
    """How many tasks the data's `task` ids (0 .. num_tasks - 1) name; 1 for a target task started from a source."""
    num_ranks: int = Field(1, gt=0)
    """The rank r of each task's factor pair (cols (n, r) @ rows (r, hidden))."""
    init: Literal["random", "source"] = "random"
    """random: the prompt N(0, 1), the factors N(0, 0.02) (peft's RANDOM); source: everything from `source_adapter`."""
    source_adapter: str | None = None
    """With init: source, the directory of a trained multitask prompt tuning adapter (adapter_model.safetensors); relative to the recipe's directory."""
    source_task: int | None = Field(None, ge=0)
    """With init: source, the source task whose factors to take (peft's EXACT_SOURCE_TASK); unset: their mean
    over all source tasks (AVERAGE_SOURCE_TASKS)."""

    @model_validator(mode="after")
    def _source_given(self) -> MultitaskPromptTuningConfig:
        if self.init == "source":
            if self.source_adapter is None:
                raise ValueError("init: source needs source_adapter (the directory of a trained multitask prompt "
                                 "tuning adapter)")
            if self.num_tasks != 1:
                raise ValueError(f"init: source starts one target task (as peft); set num_tasks: 1, not {self.num_tasks}")
        elif self.source_adapter is not None or self.source_task is not None:
            raise ValueError("source_adapter and source_task are only read with init: source; remove them or set "
                             "init: source")
        return self


class MultitaskPromptTuningPeftConfig(VirtualPeftConfig):
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    prompt_tuning_init_state_dict_path: str | None = None
    prompt_tuning_init_task: int | None = 0
    tokenizer_name_or_path: str | None = None
    num_tasks: int = Field(1, gt=0)
    num_ranks: int = Field(1, gt=0)


class MultitaskTokens(VirtualTokens):
    """The shared prompt (`table`) and the per-task factors `cols` (K, n, r) and `rows` (K, r, hidden)."""

    def __init__(self, method, table: torch.Tensor, cols: torch.Tensor, rows: torch.Tensor) -> None:
        super().__init__(method, table)
        self.cols = nn.Parameter(cols)
        self.rows = nn.Parameter(rows)

    def row_prompts(self, batch: int, task_ids: torch.Tensor | None) -> torch.Tensor:
        """(batch, n, hidden): P * (cols_t @ rows_t) for each row's task t (task 0 without task ids)."""
        if task_ids is None:
            task_ids = torch.zeros(batch, dtype=torch.long, device=self.cols.device)  # made there: no copy
        task_ids = task_ids.reshape(-1)
        if len(task_ids) != batch:
            raise PeftkitError(f"{len(task_ids)} task ids for a batch of {batch} rows.")
        # The ids are not range-checked here, where on a GPU reading them would stop the host every forward:
        # training (`check_training_tasks`) and inference (`resolve_tasks`) check the data's ids as it loads.
        task_ids = task_ids.to(self.cols.device, torch.long)
        scale = torch.matmul(self.cols.index_select(0, task_ids), self.rows.index_select(0, task_ids))
        return self.prompt().unsqueeze(0) * scale

    def peft_state(self) -> dict[str, torch.Tensor]:
        return {key: t.detach().float().cpu().contiguous() for key, t in zip(KEYS, (self.table, self.cols, self.rows))}

    def load_peft_state(self, state: dict[str, torch.Tensor], encoder_restored: bool = False) -> None:
        """Take the three tensors peft saves (shapes checked against this model's); no encoder to keep."""
        if set(state) != set(KEYS):
            raise PeftkitError(f"The adapter does not fit a {self.method.name} model: it should hold exactly "
                               f"{', '.join(KEYS)}, not {', '.join(sorted(state))}.")
        params = dict(zip(KEYS, (self.table, self.cols, self.rows)))
        for key, param in params.items():
            if tuple(state[key].shape) != tuple(param.shape):
                raise PeftkitError(f"The adapter does not fit this model: {self.method.name} expects {key} of shape "
                                   f"{tuple(param.shape)} but the adapter has {tuple(state[key].shape)}. It was "
                                   "trained on a different base model, or with other num_virtual_tokens, num_tasks "
                                   "or num_ranks.")
        with torch.no_grad():
            for key, param in params.items():
                param.copy_(state[key].to(param.device, torch.float32))


def source_state(cfg: MultitaskPromptTuningConfig, n: int, dim: int) -> dict[str, torch.Tensor]:
    """The three tensors of `init: source`: the source adapter's prompt, and its factors for one task (source_task)
    or averaged over its tasks, each with a task axis of 1 (peft's AVERAGE_SOURCE_TASKS / EXACT_SOURCE_TASK)."""
    file = Path(cfg.source_adapter) / "adapter_model.safetensors"
    if not file.is_file():
        raise PeftkitError(f"adapter.source_adapter: {file} does not exist; give the directory of a trained "
                           "multitask prompt tuning adapter (its adapter_model.safetensors).")
    state = load_file(str(file))
    if not set(KEYS) <= set(state):
        raise PeftkitError(f"adapter.source_adapter: {file} is not a multitask prompt tuning adapter (it lacks "
                           f"{', '.join(sorted(set(KEYS) - set(state)))}).")
    prompt, cols, rows = (state[k].float() for k in KEYS)
    if tuple(prompt.shape) != (n, dim) or cols.shape[1] != n or cols.shape[2] != rows.shape[1]:
        raise PeftkitError(f"adapter.source_adapter: its prompt is {tuple(prompt.shape)} (factors {tuple(cols.shape)}), "
                           f"this model's is ({n}, {dim}); use the same base model and num_virtual_tokens.")
    if cols.shape[2] != cfg.num_ranks:  # (else: "the adapter does not fit this model", naming neither key)
        raise PeftkitError(f"adapter.source_adapter: its tasks' factors have rank {cols.shape[2]} (prefix_task_cols "
                           f"{tuple(cols.shape)}), but adapter.num_ranks is {cfg.num_ranks}; set adapter.num_ranks: "
                           f"{cols.shape[2]}.")
    if cfg.source_task is None:
        return {PROMPT_KEY: prompt, COLS: cols.mean(0, keepdim=True), ROWS: rows.mean(0, keepdim=True)}
    if cfg.source_task >= cols.shape[0]:
        raise PeftkitError(f"adapter.source_task is {cfg.source_task}, but the source adapter has "
                           f"{cols.shape[0]} tasks (0 .. {cols.shape[0] - 1}).")
    return {PROMPT_KEY: prompt, COLS: cols[cfg.source_task : cfg.source_task + 1],
            ROWS: rows[cfg.source_task : cfg.source_task + 1]}


class MultitaskPromptTuning(PromptTuning):
    name: ClassVar[str] = "multitask_prompt_tuning"
    title: ClassVar[str] = "Multitask prompt tuning"
    peft_type: ClassVar[str] = "MULTITASK_PROMPT_TUNING"
    config: ClassVar[type] = MultitaskPromptTuningConfig
    peft_config: ClassVar[type] = MultitaskPromptTuningPeftConfig
    reads_task_ids: ClassVar[bool] = True

    @classmethod
    def install(cls, model: nn.Module, cfg: MultitaskPromptTuningConfig) -> VirtualTokens:
        """Random tensors in peft's order and scales (fp32, torch's global RNG), or the source adapter's."""
        n, dim, r = cfg.num_virtual_tokens, model.get_input_embeddings().weight.shape[1], cfg.num_ranks
        table = torch.randn(n, dim)
        cols = torch.normal(0.0, 0.02, size=(cfg.num_tasks, n, r))
        rows = torch.normal(0.0, 0.02, size=(cfg.num_tasks, r, dim))
        module = MultitaskTokens(cls, table, cols, rows)
        if cfg.init == "source":
            module.load_peft_state(source_state(cfg, n, dim))
        return install(model, module)

    @classmethod
    def to_peft(cls, cfg: MultitaskPromptTuningConfig, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        """The saved tensors are the trained ones, so the config says RANDOM: peft re-reads an init's source file
        whenever it builds the model, which would fail wherever that path does not exist."""
        return cls.peft_common(cfg, targets, base_name) | {
            "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None,
            "tokenizer_kwargs": None, "prompt_tuning_init_state_dict_path": None, "prompt_tuning_init_task": 0,
            "num_tasks": cfg.num_tasks, "num_ranks": cfg.num_ranks}

    @classmethod
    def from_peft(cls, peft: MultitaskPromptTuningPeftConfig, config_file: Path) -> MultitaskPromptTuningConfig:
        """Whatever the adapter's init was, its file holds the trained tensors: peftkit loads them over random ones."""
        cls.check_peft(peft, config_file)
        if peft.prompt_tuning_init not in PEFT_INITS:
            raise PeftkitError(f"{config_file}: prompt_tuning_init is {peft.prompt_tuning_init!r}; peft writes one "
                               f"of {', '.join(PEFT_INITS)}.")
        return MultitaskPromptTuningConfig(method="multitask_prompt_tuning", num_virtual_tokens=peft.num_virtual_tokens,
                                           num_tasks=peft.num_tasks, num_ranks=peft.num_ranks)

    @classmethod
    def describe(cls, cfg: MultitaskPromptTuningConfig) -> str:
        return (f"{cls.title}, {cfg.num_virtual_tokens} virtual tokens, {cfg.num_tasks} task(s) of rank "
                f"{cfg.num_ranks}" + (f", from {cfg.source_adapter}" if cfg.init == "source" else ""))
