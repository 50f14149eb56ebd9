"""Arrow routing (Ostapenko et al. 2024, arXiv:2405.11157), peft's `create_arrow_model`: a library of LoRA adapters
on one base, combined per token with no training. In each adapted layer, each task adapter's prototype is the top
right singular vector of its update B A (in the input's space); a token's scores are |x . prototype|, its top_k
adapters are weighed by the softmax of their scores over `temperature` (the others by 0), and the layer adds the
weighed sum of their updates s B A x. With general adapters (GenKnowSub, arXiv:2505.10939), their mean A and mean B
are first taken from every task adapter's A and B.

As peft's, step for step: the prototype by 15 power iterations on A^T (B^T B) A from a normal vector drawn with
`seed` (peft's `rng_seed`; peft draws from the global generator without one, so its routing is then not
reproducible: here the seed defaults to 0), the mean over adapters of A and of B (as peft subtracts them), and each
adapter's own scaling. `NamedAdapters.arrow` routes the named adapters so; nothing in them changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

POWER_ITERATIONS = 15
EPS = 1e-8


@dataclass(frozen=True)
class ArrowSettings:
    """peft's ArrowConfig: how many adapters each token takes, the softmax temperature, the prototypes' seed."""

    top_k: int = 3
    temperature: float = 1.0
    seed: int = 0


def prototype(a: torch.Tensor, b: torch.Tensor, seed: int) -> torch.Tensor:
    """The top right singular vector of B A, in fp32, without forming B A: peft's power iteration on A^T (B^T B) A."""
    a, b = a.float(), b.float()
    c = b.T @ b
    generator = torch.Generator(device=a.device.type).manual_seed(seed)
    v = torch.randn(a.shape[1], dtype=a.dtype, device=a.device, generator=generator)
    v = v / (v.norm() + EPS)
    for _ in range(POWER_ITERATIONS):
        w = a.T @ (c @ (a @ v))
        v = w / (w.norm() + EPS)
    return v


@dataclass
class ArrowLayer:
    """One layer's task adapters, stacked: A (E, r, in), B (E, out, r), scalings (E,), prototypes (E, in)."""

    a: torch.Tensor
    b: torch.Tensor
    scales: torch.Tensor
    prototypes: torch.Tensor
    settings: ArrowSettings

    @classmethod
    def build(cls, tasks: list, general: list, settings: ArrowSettings) -> ArrowLayer:
        """From the task adapters' and the general adapters' LoRA layers of one base layer."""
        with torch.no_grad():
            a = torch.stack([layer.lora_A.weight for layer in tasks])
            b = torch.stack([layer.lora_B.weight for layer in tasks])
            if general:  # GenKnowSub: the general adapters' mean A and mean B taken from each task adapter's
                a = a - torch.stack([layer.lora_A.weight for layer in general]).mean(0)
                b = b - torch.stack([layer.lora_B.weight for layer in general]).mean(0)
            protos = torch.stack([prototype(a[i], b[i], settings.seed).to(a.dtype) for i in range(len(tasks))])
            scales = torch.tensor([layer.scaling for layer in tasks], dtype=a.dtype, device=a.device)
        return cls(a, b, scales, protos, settings)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """Each token's weighed sum of its top_k adapters' updates, in the adapters' dtype (under autocast, the
        update's products in autocast's, as a LoRA layer's)."""
        tokens = x.to(self.a.dtype).reshape(-1, x.shape[-1])
        with torch.autocast(x.device.type, enabled=False):  # the routing in the adapters' dtype, whatever autocast
            # says: under bf16 autocast the scores came out bf16, which scatter refused (and top-k tied more often)
            scores = (tokens @ self.prototypes.T).abs()
            top, index = torch.topk(scores, self.settings.top_k, dim=1)
            weights = torch.softmax(tokens.new_full(scores.shape, float("-inf")).scatter(1, index, top)
                                    / self.settings.temperature, dim=1)
        # sum_e w_e s_e B_e (A_e x) as one product over (adapter, rank): never a (tokens, adapters, out) tensor, which
        # peft builds (gigabytes per layer at an evaluation's batch of a large model's MLP)
        h = torch.einsum("tf,erf->ter", tokens, self.a) * (weights * self.scales).unsqueeze(-1)
        return torch.einsum("ter,eor->to", h, self.b).reshape(*x.shape[:-1], -1)
