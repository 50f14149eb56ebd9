"""KaSA (Wang et al. 2024, arXiv:2412.06071), peft's `kasa_config`: knowledge-aware singular-value adaptation.

1. Each target's frozen weight W (out, in) loses its r smallest singular components once, when the layer is built:
   W = U S V^T becomes U_k S_k V_k^T, k = min(out, in) - r (an exact SVD in fp32, as peft's, so both give the same
   bits). The base is changed for good, as in peft: a merged model holds the truncated weight plus the update.
2. The update is s B diag(d) A, with d (`lora_diag`, r values, saved under that key) trained beside A and B.
3. The paper's two regularisers join the loss once per optimizer step (`KasaTrainer`): beta sum(d^2) and
   gamma (||B^T B - I||_F + ||A A^T - I||_F), summed over the layers, as peft's `_get_kasa_loss` (which peft leaves to
   the user to add; peftkit owns the training loop and adds it, `beta: 0, gamma: 0` to go without).

`adapter.kasa_config: {beta: 1e-4, gamma: 1e-3}` (peft's defaults). Linear layers only, unquantized (peft: nn.Linear;
a 4-bit weight cannot be truncated and trained on), and alone among LoRA's variants (peft has no combination).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.methods.base import MethodTrainer, PeftConfigBase
from peftkit.section import AdapterSection, Section


class KasaSettings(Section):
    """peft's KasaConfig."""

    beta: float = Field(1e-4, ge=0)
    """Weight of the singular values' L2 penalty, beta sum(lora_diag^2), added to the loss."""
    gamma: float = Field(1e-3, ge=0)
    """Weight of the orthogonality penalty, gamma (||B^T B - I||_F + ||A A^T - I||_F), added to the loss."""


class Kasa(AdapterSection):
    """The `adapter` key of KaSA."""

    kasa_config: KasaSettings | None = None
    """KaSA: drop each target's r smallest singular components and train s B diag(d) A (lora_diag d) in their place."""


class PeftKasa(PeftConfigBase):
    """adapter_config.json's kasa_config."""

    kasa_config: KasaSettings | None = None

    def kasa_settings(self) -> dict[str, Any]:
        return {"kasa_config": self.kasa_config} if self.kasa_config is not None else {}


def kasa_conflict(cfg: Any) -> str | None:
    """Why LoRA settings cannot go with kasa_config (peft refuses each, or the base would move twice), or None."""
    if cfg.kasa_config is None:
        return None
    for key, on in (("use_dora", cfg.use_dora), ("alora_invocation_tokens", cfg.alora_invocation_tokens),
                    ("use_bdlora", cfg.use_bdlora), ("velora_config", cfg.velora_config),
                    ("target_parameters", cfg.target_parameters), ("lora_bias", cfg.lora_bias),
                    ("init", cfg.init not in ("default", "gaussian"))):
        if on:
            return (f"adapter.kasa_config with {key} is not supported (peft refuses the combination); remove {key}, "
                    "or kasa_config")
    return None


def truncate(weight: nn.Parameter, r: int, path: str) -> None:
    """`weight` (out, in) without its r smallest singular components, in place: peft's `_truncate_base_weight`, step
    for step (an exact fp32 SVD, U_k S_k V_k^T, cast back), so both truncate to the same bits on one device (a GPU's
    SVD rounds otherwise than a CPU's). Nothing on the meta device (the memory estimate)."""
    k = min(weight.shape)
    if r >= k:
        raise PeftkitError(f"adapter.kasa_config: '{path}' has {k} singular values (min of {tuple(weight.shape)}), and "
                           f"KaSA drops r = {r} of them: at least one must stay. Use a smaller r (or a rank_pattern "
                           "entry) for it.")
    if weight.device.type == "meta":
        return
    u, s, vh = torch.linalg.svd(weight.detach().to(torch.float32), full_matrices=False)
    with torch.no_grad():
        weight.copy_(((u[:, :k - r] * s[:k - r]) @ vh[:k - r, :]).to(weight.dtype))


class Diagonal:
    """What makes a LoRA layer (before it in the bases, `KasaLinear(Diagonal, LoraLinear)`) KaSA's; set up by
    `setup_kasa` after the layer is built, which truncates the base weight."""

    lora_diag: nn.Parameter

    def setup_kasa(self, path: str) -> None:
        truncate(self.base_layer.weight, self.r, path)
        # Any start: B is zero, so the update is (peft draws it from a normal distribution too). Drawn on the CPU, as
        # A: one seed gives one adapter on any device.
        self.lora_diag = nn.Parameter(torch.randn(self.r).to(self.lora_A.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapted(x)  # (LoRA's forward without its fused path, which knows no diagonal)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """s B diag(d) A dropout(x), in the adapter's dtype (the scaling on the r-wide product, as LoRA's)."""
        h = self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))
        return self.lora_B(h * (self.lora_diag * self.scaling))


def regularizer(layer: nn.Module, settings: KasaSettings) -> torch.Tensor:
    """beta sum(d^2) + gamma (||B^T B - I||_F + ||A A^T - I||_F) of one layer, in fp32 (peft's
    `_kasa_layer_regularization_loss`)."""
    a, b, d = layer.lora_A.weight.float(), layer.lora_B.weight.float(), layer.lora_diag.float()
    eye = torch.eye(d.shape[0], device=d.device)
    orthogonal = torch.linalg.norm(b.T @ b - eye) + torch.linalg.norm(a @ a.T - eye)
    return settings.beta * (d ** 2).sum() + settings.gamma * orthogonal


class KasaTrainer(MethodTrainer):
    """KaSA's regularisers, summed over the layers, added to each optimizer step's loss."""

    def __init__(self, model: nn.Module, settings: KasaSettings) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, Diagonal)]
        self.settings = settings

    def regularizer(self) -> torch.Tensor | None:
        if not self.layers or self.settings.beta == self.settings.gamma == 0:
            return None
        return torch.stack([regularizer(layer, self.settings) for layer in self.layers]).sum()
