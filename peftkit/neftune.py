"""NEFTune (Jain et al. 2023, arXiv:2310.05914): noise on the input embeddings while training
(`training.neftune_noise_alpha`), as TRL's trainers add it."""

from __future__ import annotations

import math

import torch
from torch import nn


def attach(model: nn.Module, alpha: float) -> torch.utils.hooks.RemovableHandle:
    """Add uniform noise in [-m, m], m = alpha / sqrt(length x hidden) of the padded batch, to the output of the
    model's input embeddings in training mode (evaluation and generation see none), as TRL does. The noise is drawn
    from torch's generator, whose state checkpoints keep, so a resumed run draws what the unbroken one drew."""
    def noisy(module: nn.Module, _args, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        magnitude = alpha / math.sqrt(output.size(1) * output.size(2))
        return output + torch.empty_like(output).uniform_(-magnitude, magnitude)
    return model.get_input_embeddings().register_forward_hook(noisy)
