"""VeLoRA (Miles et al. 2024, arXiv:2405.17991), peft's `velora_config`: LoRA trained with less memory. LoRA's A
product keeps, for its weight's gradient, each token's input compressed to one value per group of features (its
projection on a unit vector, the "embed", per layer), instead of the whole input, and rebuilds the input from them in
backward: A's gradient is approximate, every other gradient and every output exact. Outside training the layer is
plain LoRA, and so is a merge.

`adapter.velora_config: {num_groups: 64, scale: 1.0, init_type: batch_average}`, as peft's: the input's features in
`num_groups` groups (zero-padded to a multiple), the rebuilt input scaled by `scale`, and the embed the normalised mean
of the batch's groups at each training forward (`batch_average`), at the first only (`batch_average_once`), or a
random unit vector drawn once (`random`). Saved as peft's `<path>.lora_velora_embed` (a frozen tensor).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn
from torch.nn import functional as F

from peftkit.methods.base import PeftConfigBase
from peftkit.section import AdapterSection, Section


class VeloraSettings(Section):
    """peft's VeloraConfig."""

    num_groups: int = Field(64, ge=1)
    """Groups the input's features are cut into; each token keeps one value per group for backward."""
    scale: float = 1.0
    """Scale of the input rebuilt in backward."""

    @field_validator("scale")
    @classmethod
    def _scale_positive(cls, value: float) -> float:
        """A's gradient is taken against the input rebuilt times `scale`: 0 leaves A at its initial values, and a
        negative scale turns A's gradient around, so A would climb the loss; neither says so in the run."""
        if value == 0:
            raise ValueError("0 leaves A with no gradient, so A would never train; use the default 1.0")
        if value < 0:
            raise ValueError("a negative scale turns A's gradient around, so A would be trained to raise the loss; "
                             "use the default 1.0")
        return value

    init_type: Literal["batch_average", "batch_average_once", "random"] = "batch_average"
    """The projection: the normalised batch mean of the groups at each training forward, at the first only, or random."""


class Velora(AdapterSection):
    """The `adapter` key of VeLoRA."""

    velora_config: VeloraSettings | None = None
    """VeLoRA: train LoRA's A from inputs compressed to num_groups values a token (less activation memory)."""


class PeftVelora(PeftConfigBase):
    """adapter_config.json's velora_config."""

    velora_config: VeloraSettings | None = None

    def velora_settings(self) -> dict[str, Any]:
        return {"velora_config": self.velora_config} if self.velora_config is not None else {}


def _groups(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    """(tokens, num_groups, group width): the features in groups, zero-padded to a multiple (peft's layout)."""
    width = -(-x.shape[-1] // num_groups)
    if x.shape[-1] != num_groups * width:
        x = F.pad(x, (0, num_groups * width - x.shape[-1]))
    return x.reshape(-1, num_groups, width)


def unit(vector: torch.Tensor) -> torch.Tensor:
    """`vector` (fp32) of norm 1; all ones, normalised, for a zero vector (as peft)."""
    vector = vector.float()
    norm = torch.linalg.vector_norm(vector)  # (no Python branch on it: the memory estimate builds on the meta device)
    return torch.where(norm > 0, vector / norm, torch.ones_like(vector) / vector.numel() ** 0.5)


def _batch_mean(groups: torch.Tensor) -> torch.Tensor:
    """The mean of (tokens, num_groups, width) `groups` over the tokens and groups: the batch's. In a run of several
    processes each holds a slice of the global batch (`peftkit.distributed.shard`), so the sums and counts are added
    over them (a collective: every process's training forwards run alike): each process projected on its own
    slice's mean, which made N processes train another adapter than one process with the whole batch, and keep
    different projections, of which a checkpoint holds the main process's (a resumed batch_average_once run
    differed from the unbroken one). A process running a stand-in for an empty slice (`peftkit.distributed.shard`:
    the batch's first row again) adds zeros: its row counted twice in the mean (3 processes, a batch of 2 rows)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1):
        return groups.mean(dim=(0, 1))
    from peftkit.distributed import in_batch_statistics

    sums = torch.cat([groups.float().sum(dim=(0, 1)), groups.new_tensor([groups.shape[0] * groups.shape[1]],
                                                                        dtype=torch.float32)])
    if not in_batch_statistics():
        sums = torch.zeros_like(sums)
    torch.distributed.all_reduce(sums)
    return (sums[:-1] / sums[-1]).to(groups.dtype)


class CompressedInputLinear(torch.autograd.Function):
    """x A^T, keeping for A's gradient only x's projection on `embed` per group (peft's VeloraFunction)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, embed: torch.Tensor, num_groups: int, scale: float):
        ctx.shape, ctx.dtype, ctx.scale = tuple(x.shape), x.dtype, scale
        compressed = torch.einsum("tgd,d->tg", _groups(x, num_groups), embed.to(x.dtype))
        ctx.save_for_backward(compressed, weight, embed)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        compressed, weight, embed = ctx.saved_tensors
        grad2d = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad2d @ weight.to(grad2d.dtype)).reshape(ctx.shape).to(ctx.dtype)
        if ctx.needs_input_grad[1]:
            rebuilt = (compressed.to(grad2d.dtype).unsqueeze(-1) * embed.to(grad2d.dtype).view(1, 1, -1))
            rebuilt = rebuilt.reshape(compressed.shape[0], -1)[:, :ctx.shape[-1]] * ctx.scale
            grad_w = (grad2d.T @ rebuilt).to(weight.dtype)
        return grad_x, grad_w, None, None, None


class Compressed:
    """What makes a LoRA layer (before it in the bases, `VeloraLinear(Compressed, LoraLinear)`) train as VeLoRA; set
    up by `setup_velora` after the layer is built."""

    lora_velora_embed: nn.Parameter

    def setup_velora(self, settings: VeloraSettings) -> None:
        self.velora = settings
        in_features = self.lora_A.in_features
        width = -(-in_features // settings.num_groups)
        where = self.lora_A.weight.device
        # Drawn on the CPU, then moved beside the base, as LoRA's A: one seed gives one adapter on any device (drawn
        # on a GPU, it also left the CPU's generator, and so every later layer's A, other than a CPU run's).
        start = unit(torch.randn(width)) if settings.init_type == "random" else torch.zeros(width)
        # A frozen tensor saved with the adapter (peft's persistent buffer): no gradient, no optimizer state.
        self.lora_velora_embed = nn.Parameter(start.to(where), requires_grad=False)
        self._embed_set = settings.init_type == "random"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()) or self.merged:
            return super().forward(x)
        result = self.base_layer(x)
        h = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        settings = self.velora
        if settings.init_type == "batch_average_once" and not self._embed_set:
            # (once: a projection loaded with the weights, a checkpoint's on --resume, is kept; peft draws it again)
            self._embed_set = bool(self.lora_velora_embed.abs().sum() > 0)
        if settings.init_type == "batch_average" or (settings.init_type == "batch_average_once" and not self._embed_set):
            with torch.no_grad():
                self.lora_velora_embed.copy_(unit(_batch_mean(_groups(h.detach(), settings.num_groups))))
            self._embed_set = True
        a = CompressedInputLinear.apply(h, self.lora_A.weight, self.lora_velora_embed, settings.num_groups,
                                        settings.scale)
        update = self.lora_B(a) * self.scaling
        return (result + update).to(result.dtype)
