"""AdaLoRA's part of the training loop: the orthogonality regulariser and the rank allocator (peft's
`AdaLoraModel.forward` and `RankAllocator`, reimplemented so that a peftkit run does what a peft run does).

Each optimizer step `step` (1 for the first; `total_step` is the run's number of optimizer steps):

1. the loss gains orth_reg_weight * mean over the A and B matrices of ||A A^T - I||_F and ||B^T B - I||_F.
   peft takes the Frobenius norm itself, not its square as in the paper's equation (3); we follow peft. It adds
   the term to every micro-batch's mean loss, so its gradient enters each optimizer step once; we add it once
   per optimizer step, the same gradient whatever the micro-batch split.
2. after optimizer.step(), before the gradients are zeroed (where peft's `update_and_allocate` goes):
   - while step < total_step - tfinal: each parameter's importance I = |p * grad| is smoothed,
     Ibar = beta1 Ibar + (1 - beta1) I, with uncertainty U = beta2 U + (1 - beta2) |I - Ibar|; a triplet i
     (A row, E entry, B column) scores s_i = Ibar U of E_i + mean over A's row + mean over B's column;
   - the budget (kept triplets over all layers) stays init_r x layers up to step tinit, then falls on a cubic,
     int((init - target) (1 - (step - tinit) / (total_step - tfinal - tinit))^3 + target), to target_r x
     layers at step total_step - tfinal; every deltaT steps (and at total_step - tfinal) the E entries of all
     triplets scoring at or below the (init - budget)-th smallest score are zeroed;
   - after total_step - tfinal the final pattern is re-applied every step (the optimizer moves zeroed entries).
"""

from __future__ import annotations

import torch
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.methods.adalora import E_KEY, AdaLoraConfig, AdaLoraLinear, cut_to_pattern
from peftkit.methods.base import MethodTrainer

PARTS = ("lora_A", "lora_B", "lora_E")


def budget_schedule(step: int, init_bgt: int, target_bgt: int, tinit: int, tfinal: int, total_step: int,
                    delta_t: int) -> tuple[int, bool]:
    """(the number of triplets kept after optimizer step `step`, whether that step prunes): peft's schedule."""
    if step <= tinit:
        return init_bgt, False
    if step > total_step - tfinal:
        return target_bgt, True
    remaining = 1 - (step - tinit) / (total_step - tfinal - tinit)
    return int((init_bgt - target_bgt) * remaining**3 + target_bgt), step % delta_t == 0


def check_schedule(cfg: AdaLoraConfig, total_steps: int) -> None:
    """Refuse settings this run's `total_steps` contradicts, naming the keys."""
    if cfg.total_step is not None and cfg.total_step != total_steps:
        raise PeftkitError(f"adapter.total_step is {cfg.total_step}, but this run does {total_steps} optimizer steps. "
                           "Remove adapter.total_step: peftkit takes it from the run.")
    if cfg.tinit + cfg.tfinal >= total_steps:
        raise PeftkitError(
            f"adapter.tinit ({cfg.tinit}) + adapter.tfinal ({cfg.tfinal}) leave no step of this run's {total_steps} "
            "optimizer steps for AdaLoRA to reallocate ranks in (it needs tinit + tfinal < the run's steps). Lower "
            "tinit or tfinal, or train longer (training.max_steps / training.epochs).")
    if total_steps - cfg.tfinal < 2:  # (tinit 0) the final allocation at step 1 would have no score to go by
        raise PeftkitError(
            f"adapter.tfinal ({cfg.tfinal}) puts AdaLoRA's final rank allocation at step {total_steps - cfg.tfinal} "
            f"of this run's {total_steps} optimizer steps, before any step has scored the ranks' importance: every "
            "rank would be pruned and the adapter exported empty. "
            + (f"Lower tfinal to at most {total_steps - 2}, or train" if total_steps >= 2 else "Train")
            + f" at least {cfg.tfinal + 2} steps (training.max_steps / training.epochs).")
    if cfg.rank_pattern:
        raise PeftkitError(
            "adapter.rank_pattern is set (the adapter was pruned by an earlier AdaLoRA run, e.g. through init_from): "
            "peftkit does not continue AdaLoRA's rank allocation from a pruned adapter. Remove adapter.rank_pattern; or "
            "merge the pruned adapter into its base (`peftkit merge`) and train a new one on the merged model.")


class AdaLoraTrainer(MethodTrainer):
    """The regulariser and rank allocator of one run over the AdaLoRA layers of `model`."""

    def __init__(self, model: nn.Module, cfg: AdaLoraConfig, total_steps: int) -> None:
        check_schedule(cfg, total_steps)
        self.cfg, self.total_step = cfg, total_steps
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, AdaLoraLinear)}
        self.init_bgt = sum(layer.lora_A.shape[0] for layer in self.layers.values())
        self.target_bgt = cfg.target_r * len(self.layers)
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}
        self.rank_pattern: dict[str, list[bool]] | None = None

    def _params(self):
        for path, layer in self.layers.items():
            for part in PARTS:
                yield f"{path}.{part}", getattr(layer, part)

    # ------------------------------------------------------------------------------------ regulariser

    def regularizer(self) -> torch.Tensor | None:
        if self.cfg.orth_reg_weight == 0:
            return None
        terms = []
        for layer in self.layers.values():
            a, b = layer.lora_A, layer.lora_B
            for cov in (a @ a.T, b.T @ b):
                terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=cov.device), "fro"))
        return self.cfg.orth_reg_weight * torch.stack(terms).sum() / len(terms)

    # ------------------------------------------------------------------------------------ allocator

    def after_step(self, step: int) -> None:
        final = self.total_step - self.cfg.tfinal
        if step < final:
            self._update_importance()
            budget, prune = self._budget(step)
            if prune:
                self.rank_pattern = self._mask_to_budget(budget)
        elif step == final:  # the final allocation, then the scores are dropped (as peft)
            self.rank_pattern = self._mask_to_budget(self.target_bgt)
            self.exp_avg_ipt, self.exp_avg_unc = {}, {}
        elif self.rank_pattern is not None:
            self._apply_pattern()

    def _budget(self, step: int) -> tuple[int, bool]:
        c = self.cfg
        return budget_schedule(step, self.init_bgt, self.target_bgt, c.tinit, c.tfinal, self.total_step, c.deltaT)

    @torch.no_grad()
    def _update_importance(self) -> None:
        """The moving averages of |p * grad| and of its distance to that average. An entry whose gradient is not
        finite keeps its averages: fp16's loss scaler skips such steps (often in its first ones) but the loop still
        counts them, and one inf made an entry's uncertainty |inf - inf| = NaN for good, and the triplet pruned."""
        beta1, beta2 = self.cfg.beta1, self.cfg.beta2
        for name, p in self._params():
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            ipt = (p * grad).abs()
            old_avg = self.exp_avg_ipt.get(name, torch.zeros_like(p))
            old_unc = self.exp_avg_unc.get(name, torch.zeros_like(p))
            avg = beta1 * old_avg + (1 - beta1) * ipt
            unc = beta2 * old_unc + (1 - beta2) * (ipt - avg).abs()
            finite = torch.isfinite(ipt)  # (elementwise: no host sync; where all are, the same values to the bit)
            self.exp_avg_ipt[name] = torch.where(finite, avg, old_avg)
            self.exp_avg_unc[name] = torch.where(finite, unc, old_unc)

    def _triplet_scores(self) -> dict[str, torch.Tensor]:
        """s_i per layer, (r,): Ibar U of E_i + mean of A's row i + mean of B's column i."""
        def score(name: str, p: torch.Tensor) -> torch.Tensor:
            zero = torch.zeros_like(p)
            return self.exp_avg_ipt.get(name, zero) * self.exp_avg_unc.get(name, zero)

        scores = {}
        for path, layer in self.layers.items():
            a = score(f"{path}.lora_A", layer.lora_A).mean(dim=1, keepdim=True)
            b = score(f"{path}.lora_B", layer.lora_B).mean(dim=0).view(-1, 1)
            e = score(f"{path}.lora_E", layer.lora_E)
            scores[path] = e.view(-1) + torch.cat([a, b], dim=1).sum(dim=1)  # peft's order of additions
        return scores

    @torch.no_grad()
    def _mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        scores = self._triplet_scores()
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=self.init_bgt - budget)[0].item()
        pattern = {}
        for path, layer in self.layers.items():
            keep = scores[path] > threshold
            layer.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)
            pattern[path + E_KEY] = keep.tolist()
        return pattern

    @torch.no_grad()
    def _apply_pattern(self) -> None:
        for path, layer in self.layers.items():
            keep = torch.tensor(self.rank_pattern[path + E_KEY], device=layer.lora_E.device)
            layer.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)

    # ------------------------------------------------------------------------------------ checkpoint, export

    def state_dict(self) -> dict:
        return {"exp_avg_ipt": dict(self.exp_avg_ipt), "exp_avg_unc": dict(self.exp_avg_unc),
                "rank_pattern": self.rank_pattern}

    def load_state_dict(self, state: dict) -> None:
        # A checkpoint loads onto the CPU; each score goes back beside its parameter (on its GPU in a CUDA run).
        device = {name: p.device for name, p in self._params()}
        self.exp_avg_ipt, self.exp_avg_unc = ({name: t.to(device[name]) for name, t in state[key].items()}
                                              for key in ("exp_avg_ipt", "exp_avg_unc"))
        self.rank_pattern = state["rank_pattern"]

    def export(self, cfg: AdaLoraConfig, state: dict[str, torch.Tensor]) -> tuple[AdaLoraConfig, dict[str, torch.Tensor]]:
        """The run's total_step and rank pattern in the settings; pruned triplets cut from the tensors (as peft's
        save_pretrained), so each layer loads at its own rank. Dropping them changes no output: their E is 0."""
        from peftkit.adapters import PEFT_PREFIX

        cfg = cfg.model_copy(update={"total_step": self.total_step, "rank_pattern": self.rank_pattern})
        return cfg, cut_to_pattern(state, self.rank_pattern, PEFT_PREFIX) if self.rank_pattern else state
