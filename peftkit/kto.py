"""KTO (training.objective: kto): the loss of a batch of unpaired answers, each with its mismatched example
(`peftkit.data.unpaired`), against a reference as DPO's (`peftkit.preference`: the model training starts from,
its log-probabilities computed once, before training).

Kahneman-Tversky Optimization (Ethayarajh et al. 2024, arXiv:2402.01306), as TRL's KTOTrainer computes it: with
r = log pi(answer) - log ref(answer), summed over the answer's tokens, and z the batch's KL estimate, the mean over
its mismatched examples of log pi - log ref, clamped at 0 and taken as a constant (no gradient), a desirable
answer's loss is w_d (1 - sigmoid(beta (r - z))) and an undesirable one's w_u (1 - sigmoid(beta (z - r))). The rewards
are beta r. Several processes share a batch: z is taken over all of it (summed across them), as TRL's gathered mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from peftkit.data import IGNORE_INDEX

SUMS = ("loss", "examples", "desirable", "undesirable", "chosen", "rejected", "kl")
"""What `KTOLoss.sums` adds up, in order: the loss, the examples, the desirable and undesirable ones, their rewards'
sums, and the KL estimate weighted by its batch's examples."""

FIGURES = ("loss", "reward_margin", "chosen_reward", "rejected_reward", "kl")
"""What a KTO step logs and an evaluation reports: the mean loss, the mean desirable answer's reward less the mean
undesirable one's (TRL's `rewards/margins`), those means (`rewards/chosen`, `rewards/rejected`), and the KL estimate
(`kl`), averaged over the examples. A mean of no answers is None, and so is the margin without both: a batch of
desirable answers alone has no undesirable mean to subtract (the margin was the chosen mean less 0), and TRL's
KTOTrainer logs neither `rewards/rejected` nor `rewards/margins` for it."""


@dataclass(frozen=True)
class KTOLoss:
    """KTO's loss at training.kto_beta, with the desirable and undesirable answers' weights; called on a batch as the
    training step calls a loss: (the sum over its examples, the other `sums`). `processes`: the run's Accelerator
    when several processes share each batch (training; an evaluation's batches are each one process's)."""

    beta: float
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    processes: object = None
    kind = "kto"
    needs_reference = True
    SUMS = SUMS
    FIGURES = FIGURES

    @classmethod
    def of(cls, training, processes=None) -> KTOLoss:
        return cls(training.kto_beta, training.kto_desirable_weight, training.kto_undesirable_weight, processes)

    def examples(self, logps: torch.Tensor, reference: torch.Tensor, desirable: torch.Tensor,
                 real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(each example's loss, its reward, the batch's KL estimate) from the rows' (example, mismatched, ...) summed
        log-probabilities under the policy and the reference; `real`: the examples that count (a process's
        stand-in rows do not)."""
        ratios = logps - reference
        own, mismatched = ratios[0::2], ratios[1::2].detach()
        kl_sum, count = (mismatched * real).sum(), real.sum()
        if self.processes is not None and self.processes.num_processes > 1:
            from peftkit.distributed import total

            kl_sum, count = total(self.processes, torch.stack([kl_sum, count])).unbind()
        kl = (kl_sum / count.clamp(min=1)).clamp(min=0)
        loss = torch.where(desirable, self.desirable_weight * (1 - torch.sigmoid(self.beta * (own - kl))),
                           self.undesirable_weight * (1 - torch.sigmoid(self.beta * (kl - own))))
        return loss, self.beta * own.detach(), kl

    def sums(self, model: nn.Module, batch: dict[str, torch.Tensor], labelled: int | None = None) -> torch.Tensor:
        """(7,) fp32, sums over the batch's examples (`SUMS`)."""
        from peftkit.preference import sequence_logps

        tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1)
        real = (tokens[0::2] > 0).float()
        desirable = batch["desirable"][0::2]  # (each row's example's: the example's own)
        loss, reward, kl = self.examples(sequence_logps(model, batch, labelled), batch["reference_logps"], desirable,
                                         real)
        good, bad = desirable.float() * real, (~desirable).float() * real
        return torch.stack([torch.where(real > 0, loss, loss * 0).sum(), real.sum(), good.sum(), bad.sum(),
                            (reward * good).sum(), (reward * bad).sum(), kl.detach() * real.sum()])

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor],
                 labelled: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        sums = self.sums(model, batch, labelled)
        return sums[0], sums[1:]

    @staticmethod
    def figures(sums: torch.Tensor) -> dict[str, float | None]:
        """The mean loss, reward margin, rewards and KL estimate (`FIGURES`) of `sums` added up; a reward's mean None
        where no answer of its kind counted, and the margin None unless both did (`FIGURES`)."""
        loss, examples, good, bad, chosen, rejected, kl = sums.tolist()  # one read from the device, not seven
        chosen, rejected = chosen / good if good else None, rejected / bad if bad else None
        n = max(examples, 1.0)
        return {"loss": loss / n, "reward_margin": chosen - rejected if good and bad else None,
                "chosen_reward": chosen, "rejected_reward": rejected, "kl": kl / n}

    @staticmethod
    def count(sums: torch.Tensor) -> int:
        """The examples `sums` counts."""
        return int(sums[1])


NEEDS = {"reward_margin": (True, False), "chosen_reward": (True,), "rejected_reward": (False,)}
"""The figures a KTO evaluation defines only on answers of these kinds (desirable: True), as `KTOLoss.figures`."""


def check_watched_figures(cfg, evals: dict) -> None:
    """A KTO run whose early stopping or export.best follows a reward figure that its eval set can never define (a
    set of desirable answers alone has no undesirable mean, hence no margin: `FIGURES`) is refused before training,
    where the run would train to its end unable to choose. `evals`: data.eval's `PreferenceEval`s by name, the
    primary first."""
    from peftkit.errors import PeftkitError

    es = cfg.training.early_stopping
    for key, metric in (("training.early_stopping.metric", es and es.metric), ("export.best", cfg.best_metric)):
        name, _, figure = (metric or "").rpartition(".")
        if figure not in NEEDS or not evals:
            continue
        name = name or next(iter(evals))
        desirable = evals[name].pairs.desirable
        missing = [kind for kind in NEEDS[figure] if kind not in desirable]
        if missing:
            where = cfg.data.eval_setting(name)
            lacks = " or ".join(f"{'a desirable' if kind else 'an undesirable'} one (`label: {str(kind).lower()}`)"
                                for kind in missing)
            raise PeftkitError(f"{key} follows {metric}, which {where} never defines: none of its {len(desirable)} "
                               f"answers is {lacks}, and KTO's {figure} is a mean over those. Follow loss or kl, "
                               f"or add such answers to {where}.")
