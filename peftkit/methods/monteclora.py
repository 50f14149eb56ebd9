"""MonteCLoRA (Sengupta et al. 2024, arXiv:2411.04358), peft's `monteclora_config`, read: outside training it is plain
LoRA. In training, peft perturbs A with Monte Carlo samples of learned variational distributions; evaluating, it
computes s B A x, and a merge adds s B A. So a MonteCLoRA adapter loads, evaluates, generates and merges in peftkit as
the LoRA it is there (its sampler's tensors, `lora_monteclora_sampler.*`, are training state, left out), and is
refused where training would continue (`adapter.init_from`): peftkit does not train MonteCLoRA.
"""

from __future__ import annotations

from pydantic import ConfigDict, Field

from peftkit.methods.base import PeftConfigBase
from peftkit.section import Section

SAMPLER = ".lora_monteclora_sampler."
"""The part of the keys of MonteCLoRA's sampler tensors (its variational parameters and their last sample)."""


class MontecloraSettings(Section):
    """peft's MontecloraConfig (its fields as peft 0.21 saves them; a newer peft's extra ones are kept)."""

    model_config = ConfigDict(extra="allow")

    num_samples: int = Field(8, gt=0)
    use_entropy: bool = False
    dirichlet_prior: float = Field(0.1, gt=0)
    sample_scaler: float = 1e-4
    kl_loss_weight: float = 1e-5
    buffer_size: int = 150


class PeftMonteclora(PeftConfigBase):
    """adapter_config.json's monteclora_config."""

    monteclora_config: MontecloraSettings | None = None


def without_sampler(state: dict, peft: PeftConfigBase) -> dict:
    """A MonteCLoRA adapter's tensors without its sampler's (none of them acts outside training)."""
    if getattr(peft, "monteclora_config", None) is None:
        return state
    return {key: value for key, value in state.items() if SAMPLER not in key}
