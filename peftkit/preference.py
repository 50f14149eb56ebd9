"""DPO (training.objective: dpo; orpo, simpo, and a reward model's, reward): the loss of a batch of answer pairs,
the reference model's log-probabilities of them, and what a run's evaluations report of preference data.

Direct Preference Optimization (Rafailov et al. 2023, arXiv:2305.18290) trains the policy (the adapted model) to
raise the chosen answer's log-likelihood ratio to the reference over the rejected's: with the log-ratios
r_c = log pi(chosen) - log ref(chosen) and r_r alike, each a sum over the answer's tokens, a pair's loss is
-log sigmoid(beta (r_c - r_r)) (`sigmoid`); `ipo` and `hinge` as TRL's DPOTrainer computes them. The rewards it
logs are beta r_c and beta r_r; reward accuracy is the share of pairs whose chosen reward is the larger.

The reference is the model training starts from, as TRL's DPOTrainer takes it for a PEFT model: the base model,
the model without the adapter; with adapter.init_from (DPO after SFT, on the SFT adapter), the base with that
adapter as it starts (TRL's frozen copy of a PeftModel's pretrained adapter, "ref"). Its log-probabilities do not
change, so they are computed once, before training (`reference_logps`: in eval mode, under the run's precision;
the base before the adapter is injected), for data.train and every set of data.eval, and each batch carries its
pairs' (`peftkit.data.preference.PairCollator`): training runs one forward a micro-batch, not two, and needs no
second model nor any way of switching the adapter off, whatever the method (a prompt-tuning or PiSSA adapter's
too). A resumed run computes them again, on the same model and batches: the same numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from peftkit.classify import classification_logits
from peftkit.data import IGNORE_INDEX
from peftkit.data.preference import Pairs
from peftkit.data.unpaired import Unpaired
from peftkit.loss import labelled_count, on_device, row_logps, trimmed_head
from peftkit.methods.virtual import task_inputs
from peftkit.metrics import PREFERENCE_METRICS, REWARDS
from peftkit.rope_scaling import alone_batches, fresh_dynamic_rope, row_positions


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor], labelled: int | None = None) -> torch.Tensor:
    """Each row's summed log-probability of its labelled tokens under `model`, (rows,) fp32 (`row_logps`)."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]} | task_inputs(model, batch)
    kept, labels = trimmed_head(model, batch)  # the head from the first position a row's sum reads
    return row_logps(model(**inputs, **kept, use_cache=False).logits, labels, labelled)


def reward_scores(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each row's score under a reward model (a sequence classifier of one output, training.objective: reward),
    (rows,) fp32: its head on the last token that is not padding, as transformers' classifiers read a decoder's."""
    return classification_logits(model, batch).squeeze(-1).float()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2 (TRL's ORPO's, Maechler 2012)."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@dataclass(frozen=True)
class PreferenceLoss:
    """A pair's loss: DPO's (`kind` sigmoid, ipo or hinge: training.dpo_loss, at training.dpo_beta), ORPO's or
    SimPO's; called on a batch as the training step calls a loss: (the sum over its pairs, the other `sums`), the
    mean taken over the whole accumulation window's pairs.

    ORPO and SimPO need no reference: they score each answer by its mean log-probability per token, `avg`. ORPO
    (Hong et al. 2024): -avg(chosen) - lambda log sigmoid(log odds(chosen) - log odds(rejected)), the odds of p being
    p / (1 - p) at p = exp(avg), as LLaMA-Factory computes it per pair (TRL's ORPOTrainer takes the negative
    log-likelihood over the whole chosen sequence, the prompt's tokens too, as a mean over a micro-batch's tokens:
    the same on pairs without a prompt, one a micro-batch). SimPO (Meng et al. 2024): -log
    sigmoid(beta (avg(chosen) - avg(rejected)) - gamma), as TRL's CPOTrainer (loss_type simpo, cpo_alpha 0) and
    LLaMA-Factory. Their rewards are beta (lambda) x avg, as both log them. A reward model's (`reward`, training.objective
    reward): -log sigmoid(s(chosen) - s(rejected)) + center (s(chosen) + s(rejected))^2 of its scores s (`reward_scores`),
    as TRL's RewardTrainer computes it; its rewards are the scores."""

    beta: float
    kind: str = "sigmoid"
    gamma: float = 0.0
    """SimPO's target reward margin."""
    center: float = 0.0
    """A reward model's centering weight (training.reward_center)."""
    SUMS: ClassVar[tuple[str, ...]] = ("loss", "pairs", "right", "margin", "chosen", "rejected")
    FIGURES: ClassVar[tuple[str, ...]] = ("loss", *PREFERENCE_METRICS, *REWARDS)

    @classmethod
    def of(cls, training) -> PreferenceLoss:
        if training.objective == "reward":
            return cls(1.0, "reward", center=training.reward_center)
        if training.objective == "orpo":
            return cls(training.orpo_lambda, "orpo")
        if training.objective == "simpo":
            return cls(training.simpo_beta, "simpo", training.simpo_gamma)
        return cls(training.dpo_beta, training.dpo_loss)

    @property
    def needs_reference(self) -> bool:
        """DPO's losses compare with a reference model's log-probabilities; ORPO's, SimPO's and a reward model's do
        not."""
        return self.kind not in ("orpo", "simpo", "reward")

    def pairs(self, policy: torch.Tensor, reference: torch.Tensor | None,
              tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(each pair's loss, chosen reward, rejected reward) from the rows' (chosen, rejected, chosen, ...) summed
        log-probabilities under the policy and the reference (None for ORPO and SimPO), and their labelled token
        counts."""
        if self.kind == "reward":  # the scores are the rewards (policy: a reward model's scores, `scores`)
            chosen, rejected = policy[0::2], policy[1::2]
            loss = -F.logsigmoid(chosen - rejected) + self.center * (chosen + rejected) ** 2
            return loss, chosen.detach(), rejected.detach()
        if not self.needs_reference:
            return self._without_reference(policy / tokens.clamp(min=1))
        chosen, rejected = policy[0::2] - reference[0::2], policy[1::2] - reference[1::2]  # the log-ratios
        margin = chosen - rejected
        if self.kind == "sigmoid":
            loss = -F.logsigmoid(self.beta * margin)
        elif self.kind == "hinge":
            loss = torch.relu(1 - self.beta * margin)
        else:  # ipo: the log-ratios per answer token (TRL's, as the IPO paper's authors confirmed to it)
            per_token = chosen / tokens[0::2].clamp(min=1) - rejected / tokens[1::2].clamp(min=1)
            loss = (per_token - 1 / (2 * self.beta)) ** 2
        return loss, self.beta * chosen.detach(), self.beta * rejected.detach()

    def _without_reference(self, mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`pairs` of ORPO and SimPO, from each row's mean log-probability per token."""
        chosen, rejected = mean[0::2], mean[1::2]
        if self.kind == "simpo":
            loss = -F.logsigmoid(self.beta * (chosen - rejected) - self.gamma)
        else:  # orpo
            log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
            loss = -chosen - self.beta * F.logsigmoid(log_odds)
        return loss, self.beta * chosen.detach(), self.beta * rejected.detach()

    def sums(self, model: nn.Module, batch: dict[str, torch.Tensor], labelled: int | None = None) -> torch.Tensor:
        """(6,) fp32, sums over the batch's pairs (`SUMS`): the loss (with its gradient), the pairs, those whose chosen
        reward is the larger, the reward margins, the chosen and the rejected rewards. A pair without labelled tokens
        (a process's stand-in rows: `peftkit.distributed.shard`) adds nothing, its backward still reaching every
        parameter."""
        tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1)
        scores = reward_scores(model, batch) if self.kind == "reward" else sequence_logps(model, batch, labelled)
        loss, chosen, rejected = self.pairs(scores, batch.get("reference_logps"), tokens)
        real = ((tokens[0::2] > 0) & (tokens[1::2] > 0)).float()
        return torch.stack([torch.where(real > 0, loss, loss * 0).sum(), real.sum(), ((chosen > rejected) * real).sum(),
                            ((chosen - rejected) * real).sum(), (chosen * real).sum(), (rejected * real).sum()])

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor],
                 labelled: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of the batch's pair losses, the other `sums`: the number of pairs first), as the training step calls
        a loss."""
        sums = self.sums(model, batch, labelled)
        return sums[0], sums[1:]


    @staticmethod
    def figures(sums: torch.Tensor) -> dict[str, float]:
        """The mean loss, reward accuracy, margin and rewards (`FIGURES`) of `sums` added up."""
        loss, pairs, right, margin, chosen, rejected = sums.tolist()  # one read from the device, not six
        n = max(pairs, 1.0)
        return dict(zip(FIGURES, (loss / n, right / n, margin / n, chosen / n, rejected / n), strict=True))

    @staticmethod
    def count(sums: torch.Tensor) -> int:
        """The pairs `sums` counts."""
        return int(sums[1])


SUMS = PreferenceLoss.SUMS
"""What `PreferenceLoss.sums` adds up, in order."""
figures = PreferenceLoss.figures


def objective_loss(training, processes=None):
    """The loss of training.objective's pairs: `PreferenceLoss` (dpo, orpo, simpo, reward) or `KTOLoss` (kto, whose
    KL estimate is over each whole batch: `processes`, the run's Accelerator, where processes share a batch)."""
    if training.objective == "kto":
        from peftkit.kto import KTOLoss

        return KTOLoss.of(training, processes)
    return PreferenceLoss.of(training)


def nonfinite_references(reference: torch.Tensor) -> tuple[int, int] | None:
    """(how many rows of `reference_logps`' log-probabilities are not finite, the index of the first), or None where
    all are: a reference that overflows, or holds inf or nan, makes every figure against it nan, and training and
    eval say so, naming the reference rather than the adapter."""
    if (finite := torch.isfinite(reference).all(1)).all():
        return None
    return int((~finite).sum()), int((~finite).nonzero()[0])


def pair_batches(model: nn.Module, pairs: Pairs, batch_size: int, alone: bool = True) -> list[list[int]]:
    """The pairs' indices in the batches an evaluation scores them in (`PreferenceEval`, and `reference_logps` of the
    same batches): `alone_batches` of each pair's longer answer, so that under dynamic RoPE (longrope) a pair past the
    context scores as alone and the figures do not depend on eval.batch_size.

    KTO's unpaired answers, and `alone` False (data.train's references), keep runs of `batch_size` in order: a KTO
    batch's KL estimate is a mean over its answers' mismatched examples, drawn within runs of eval.batch_size
    (`peftkit.data.unpaired.mismatched`), so its batches are part of the figure; and training's batches are its own."""
    if isinstance(pairs, Unpaired) or not alone:
        return [list(range(start, min(start + batch_size, len(pairs)))) for start in range(0, len(pairs), batch_size)]
    rows = pairs.examples
    return alone_batches(model, len(pairs), lambda i: max(row_positions(rows[2 * i]), row_positions(rows[2 * i + 1])),
                         batch_size)


@torch.no_grad()
def reference_logps(model: nn.Module, pairs: Pairs, batch_size: int, pad_id: int, processes=None,
                    advance: Callable[[int], None] | None = None, *, fresh_rope: bool = True) -> torch.Tensor:
    """(pairs, 2) fp32 on the CPU: `model`'s summed log-probability of each pair's chosen and rejected answer, in
    eval mode (the model's mode is restored). `processes` (several): each computes every num_processes-th batch, and
    the shares are added up (each row computed by one process, zeros elsewhere: the sum is exact).

    `fresh_rope`: the batches `PreferenceEval` scores the policy's in (`pair_batches`), each with dynamic RoPE as the
    model loaded (`fresh_dynamic_rope`): else a batch after a longer one kept that one's frequencies, and a model
    scored against itself had rewards off 0. False for data.train's references, which training's forwards
    (transformers' own behaviour) are set against: runs of `batch_size` in order, the model's state carried over."""
    rank, world = (processes.process_index, processes.num_processes) if processes is not None else (0, 1)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows = torch.zeros(2 * len(pairs), dtype=torch.float32, device=device)
    collate = pairs.collator(pad_id)
    try:
        for i, indices in enumerate(pair_batches(model, pairs, batch_size, alone=fresh_rope)):
            if i % world == rank:
                batch = collate([pairs[j] for j in indices])
                at = torch.tensor([2 * j + answer for j in indices for answer in (0, 1)], device=device)
                labelled = labelled_count(batch["labels"])
                with fresh_dynamic_rope(model) if fresh_rope else contextlib.nullcontext():
                    rows[at] = sequence_logps(model, on_device(batch, device), labelled)
            if advance is not None:
                advance(len(indices))
    finally:
        model.train(was_training)
    if world > 1:
        from peftkit.distributed import total

        rows = total(processes, rows)
    return rows.view(-1, 2).cpu()


def without_dropout(model: nn.Module) -> None:
    """The base model's dropout off (every nn.Dropout's p 0; an adapter's own, adapter.dropout, comes after and is as
    set), as TRL's preference trainers do by default (`disable_dropout`): the reference's log-probabilities are taken
    in eval mode, and a policy trained with dropout would be compared with them through noise (GPT-2's 0.1 put the
    first step's rewards off 0 before any update)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


FIGURES = PreferenceLoss.FIGURES
"""What a DPO evaluation reports, each a mean over the pairs (metrics.jsonl: eval_loss, eval_reward_accuracy, ...)."""


@dataclass
class PreferenceEval:
    """What a DPO run evaluates on a set of data.eval (every training.eval_steps, the end): `RunEval`'s counterpart,
    with the DPO loss, the reward accuracy (the share of pairs whose chosen answer has the larger reward), the mean
    reward margin, and the mean rewards of the chosen and of the rejected answers. The pairs' reference
    log-probabilities are set before training (`reference_logps`)."""

    pairs: Pairs
    pad_id: int
    batch_size: int
    loss: PreferenceLoss
    """Or a `peftkit.kto.KTOLoss` (`objective_loss`), on unpaired answers (`peftkit.data.unpaired.Unpaired`)."""
    processes: object = None
    """The run's Accelerator when it has several processes: they share out the batches."""
    metrics: tuple[str, ...] = PREFERENCE_METRICS

    @property
    def examples(self):
        """The answers as examples (chosen, rejected, ...): what the run's digest of data.eval covers."""
        return self.pairs.examples

    def __len__(self) -> int:
        return len(self.pairs)

    @torch.no_grad()
    def __call__(self, model: nn.Module, generator: nn.Module | None = None) -> dict[str, float]:
        """The figures of `model` on the pairs, in eval mode (restored afterwards), in `pair_batches`' batches. Every
        process runs as many forwards (one short of batches repeats its first, uncounted), which keeps FSDP's
        collectives in step."""
        rank, world = (self.processes.process_index, self.processes.num_processes) if self.processes else (0, 1)
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        sums = torch.zeros(len(self.loss.SUMS), dtype=torch.float64, device=device)
        batches, collate = pair_batches(model, self.pairs, self.batch_size), self.pairs.collator(self.pad_id)
        rounds, first, done = -(-len(batches) // world), None, 0
        try:
            for i, batch in enumerate(collate([self.pairs[j] for j in rows]) for rows in batches):
                first = batch if first is None else first
                if i % world == rank:
                    with fresh_dynamic_rope(model):  # each batch as on a freshly loaded model (`evaluate_loss`)
                        sums += self.loss.sums(model, on_device(batch, device)).double()
                    done += 1
            for _ in range(rounds - done):
                with fresh_dynamic_rope(model):
                    self.loss.sums(model, on_device(first, device))
        finally:
            model.train(was_training)
        if world > 1:
            from peftkit.distributed import total

            sums = total(self.processes, sums)
        counted = "num_examples" if self.loss.kind == "kto" else "num_pairs"
        return self.loss.figures(sums) | {counted: self.loss.count(sums)}

    def record(self, result: dict[str, float], prefix: str = "eval_") -> dict[str, float]:
        """The result under metrics.jsonl / summary names: `eval_loss`, `eval_reward_accuracy`, ..."""
        return {f"{prefix}{k}": result[k] for k in self.loss.FIGURES}

    def describe(self, result: dict[str, float]) -> str:
        """`eval loss 0.6931, reward accuracy 0.5000, margin 0.0000` for the console (KTO's: margin and KL)."""
        if self.loss.kind == "kto":
            margin = "n/a" if result["reward_margin"] is None else f"{result['reward_margin']:.4f}"  # (kto.FIGURES)
            return f"eval loss {result['loss']:.4f}, margin {margin}, kl {result['kl']:.4f}"
        return (f"eval loss {result['loss']:.4f}, reward accuracy {result['reward_accuracy']:.4f}, margin "
                f"{result['reward_margin']:.4f}")
