"""AdaMSS's adaptive subspace allocation (ASA, `use_asa`) in the training loop: peft's
`AdamssModel.update_and_allocate`, which its `AdamssAsaCallback` calls after each optimizer step, reimplemented so that a
peftkit run freezes the subspaces a peft run freezes.

peft's callback sees transformers Trainer's `global_step` before the step is counted: g = step - 1 for optimizer step
`step` (1 for the first). After optimizer.step(), before the gradients are zeroed, while init_warmup <= g <= final_warmup:

1. each training subspace's A and B (those with a gradient) update their importance I = |p * grad| (the parameters
   after the step, as peft's): the uncertainty U = beta_u U + (1 - beta_u) |I - Ibar| first, then Ibar = beta_i Ibar +
   (1 - beta_i) I (both start at 0);
2. when g % mask_interval == 0: the subspaces kept, over all the layers, are asa_target_subspaces + (total -
   asa_target_subspaces) (1 - (g - init_warmup) / (final_warmup - init_warmup))^asa_schedule_exponent (int), total the
   number of subspaces of the model; each training subspace scores mean(Ibar U) of its A + mean(Ibar U) of its B, those
   scoring at or below the (n - kept)-th smallest of the n scores are frozen (requires_grad off, gradient dropped: the
   optimizer leaves them as they are from then on, and they score no more), and every average starts again at 0.

peft freezes those at or below the kept-th largest score: it keeps one subspace fewer than its target each time (49 of
asa_target_subspaces 50). peftkit keeps the target, as the setting says (tests/test_adamss.py: peft's frozen set is
peftkit's plus the subspace that scores kept-th).
"""

from __future__ import annotations

import torch
from torch import nn

from peftkit.methods.adamss import AdamssConfig, AdamssLinear
from peftkit.methods.base import MethodTrainer


class AsaTrainer(MethodTrainer):
    """The subspace allocator of one run over the AdaMSS layers of `model`."""

    def __init__(self, model: nn.Module, cfg: AdamssConfig) -> None:
        self.cfg = cfg
        self.subspaces = [(a, b) for m in model.modules() if isinstance(m, AdamssLinear)
                          for a, b in zip(m.adamss_A, m.adamss_B)]
        self.average: dict[int, torch.Tensor] = {}  # Ibar and U by parameter: 2 i for A_i, 2 i + 1 for B_i
        self.uncertainty: dict[int, torch.Tensor] = {}

    def _parameters(self):
        for i, pair in enumerate(self.subspaces):
            yield 2 * i, pair[0]
            yield 2 * i + 1, pair[1]

    def after_step(self, step: int) -> None:
        cfg, g = self.cfg, step - 1
        if not cfg.init_warmup <= g <= cfg.final_warmup:
            return
        self._update_importance()
        if g % cfg.mask_interval == 0:
            self._freeze_to(self.kept(g))
            self.average, self.uncertainty = {}, {}

    def kept(self, g: int) -> int:
        """peft's `_schedule_threshold`: the subspaces kept after step g."""
        cfg, total = self.cfg, len(self.subspaces)
        remaining = min(1.0, max(0.0, 1.0 - (g - cfg.init_warmup) / (cfg.final_warmup - cfg.init_warmup)))
        return int(cfg.asa_target_subspaces + (total - cfg.asa_target_subspaces) * remaining**cfg.asa_schedule_exponent)

    @torch.no_grad()
    def _update_importance(self) -> None:
        beta_i, beta_u = self.cfg.asa_importance_beta, self.cfg.asa_uncertainty_beta
        for key, p in self._parameters():
            if p.grad is None:
                continue
            importance = (p * p.grad).abs()
            average = self.average.setdefault(key, torch.zeros_like(p))
            uncertainty = self.uncertainty.setdefault(key, torch.zeros_like(p))
            uncertainty.mul_(beta_u).add_((importance - average).abs(), alpha=1 - beta_u)  # (before the average, as peft)
            average.mul_(beta_i).add_(importance, alpha=1 - beta_i)

    @torch.no_grad()
    def _freeze_to(self, kept: int) -> None:
        scored = [i for i in range(len(self.subspaces)) if 2 * i in self.average and 2 * i + 1 in self.average]
        if kept >= len(scored):
            return
        scores = torch.stack([(self.average[2 * i] * self.uncertainty[2 * i]).mean()
                              + (self.average[2 * i + 1] * self.uncertainty[2 * i + 1]).mean() for i in scored])
        threshold = torch.kthvalue(scores, len(scored) - kept)[0].item()  # (host reads every mask_interval steps)
        for i, score in zip(scored, scores.tolist()):
            if score <= threshold:
                for p in self.subspaces[i]:
                    p.requires_grad_(False)
                    p.grad = None

    def state_dict(self) -> dict:
        return {"average": dict(self.average), "uncertainty": dict(self.uncertainty),
                "frozen": [i for i, (a, _) in enumerate(self.subspaces) if not a.requires_grad]}

    def load_state_dict(self, state: dict) -> None:
        # A checkpoint loads onto the CPU; each average goes back beside its parameter (on its GPU in a CUDA run).
        device = {key: p.device for key, p in self._parameters()}
        self.average, self.uncertainty = ({key: t.to(device[key]) for key, t in state[name].items()}
                                          for name in ("average", "uncertainty"))
        for i in state["frozen"]:
            for p in self.subspaces[i]:
                p.requires_grad_(False)
