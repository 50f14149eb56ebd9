"""NEFTune (Jain et al. 2023, arXiv:2310.05914): noise on the input embeddings while training
(`training.neftune_noise_alpha`), as TRL's trainers add it."""

from __future__ import annotations

import torch
from torch import nn


def attach(model: nn.Module, alpha: float) -> torch.utils.hooks.RemovableHandle:
    """Add uniform noise in [-m, m], m = alpha / sqrt(length x hidden) of the padded batch, to the output of the
    model's input embeddings in training mode (evaluation and generation see none), as TRL does. The noise is drawn
    from torch's generator, whose state checkpoints keep, so a resumed run draws what the unbroken one drew."""
    def noisy(module: nn.Module, _args, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        # The bound as a tensor: a Python float of the length is a constant to torch.compile (training.compile),
        # which then recompiled the step for each padded length, up to its limit of 8, and ran the rest uncompiled.
        elements = torch.scalar_tensor(output.size(1) * output.size(2), dtype=torch.float32, device=output.device)
        magnitude = (alpha * elements.rsqrt()).to(output.dtype)
        return output + (torch.rand_like(output) * 2 - 1) * magnitude
    return model.get_input_embeddings().register_forward_hook(noisy)
