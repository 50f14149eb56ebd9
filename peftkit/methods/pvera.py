"""PVeRA (Fein-Ashley et al. 2025, "PVeRA: Probabilistic Vector-Based Random Matrix Adaptation", arXiv:2512.07703):
VeRA made probabilistic. One frozen random pair A (2r x max in), B (max out x r) is shared by every adapted layer,
which trains two vectors, d (2r) and b (out). The first r rows of diag(d) A x are a mean, the last r a log-variance:

    mu, logvar = split(d * (A[:, :in] x)),  z = mu + eps * exp(logvar / 2)  (eps ~ N(0, 1)),
    y = W x + b * (B[:out, :] z).

Training samples z; evaluation takes z = mu (unless `sample_at_inference`), which is also what a merge folds in:
W' = W + diag(b) B[:out, :] diag(d[:r]) A[:r, :in], the mean update (the log-variance half does not merge).
A and B are drawn from a generator seeded with `projection_prng_key` (kaiming-uniform, A first, as HF peft), so an
adapter may leave them out of its file (`save_projection: false`). b starts at 0 (the base model), d at `d_initial`.
With `generator_seed`, each layer draws its noise from a CPU generator of its own seeded with it (as peft: every layer
the same sequence), whose state a checkpoint keeps (`PveraTrainer`); without, from torch's global generator. Names as
HF peft: `<path>.pvera_lambda_b`, `<path>.pvera_lambda_d`, and `base_model.pvera_A`, `base_model.pvera_B`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from peftkit.errors import PeftkitError
from peftkit.methods.base import Method, MethodTrainer, refuse_unsupported, targets_from_peft
from peftkit.methods.layer import AdapterLayer, is_conv1d, linear_shape, refuse_embedding
from peftkit.methods.target_filters import LayerTargets, PeftLayerTargets, filters_from_peft
from peftkit.methods.vera import SEED_RANGE, kaiming_uniform
from peftkit.section import TargetRegex


class PveraConfig(LayerTargets):
    """PVeRA: VeRA whose update is sampled around a learned mean while training."""

    method: Literal["pvera"]
    r: int = Field(256, gt=0)
    """Rank of the shared random projections: A has 2r rows (mean and log-variance), B r columns; each layer trains
    2r entries of d, so PVeRA runs at far higher ranks than LoRA (peft's default 256)."""
    target_modules: Literal["all-linear"] | list[str] | TargetRegex = "all-linear"
    """As LoRA's: Linear and Conv1D layers (and 4-bit/8-bit ones); embeddings are refused."""
    projection_prng_key: int = Field(0, **SEED_RANGE)
    """Seed of the generator that draws the shared projections A and B."""
    save_projection: bool = True
    """Save A and B in the adapter; false: drawn again from the key on loading, which relies on torch's generator
    giving the same numbers on every machine."""
    pvera_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapter's input, training only."""
    d_initial: float = 0.1
    """Initial value of every d entry (small values, <= 0.1, are recommended)."""
    init_weights: bool = True
    """True: b = 0 (the base model), d = d_initial. False (debugging, as peft): b = 1, d ~ N(0, 1)."""
    sample_at_inference: bool = False
    """Sample z in evaluation and generation too; false: the mean. A merge folds in the mean either way."""
    generator_seed: int | None = Field(None, **SEED_RANGE)
    """Seed of each layer's own noise generator (every layer draws the same sequence, as peft); null: torch's."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full and saved whole (e.g. `lm_head`)."""


def projections(r: int, key: int, shapes: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """The shared A (2r, max in) and B (max out, r) for layers of (in, out) `shapes`, drawn in that order (peft's)."""
    generator = torch.Generator(device="cpu").manual_seed(key)
    pvera_a = kaiming_uniform((2 * r, max(i for i, _ in shapes)), generator)
    return {"pvera_A": pvera_a, "pvera_B": kaiming_uniform((max(o for _, o in shapes), r), generator)}


@dataclass(frozen=True)
class PveraFacts:
    fan_in_fan_out: bool = False
    """The base weight is stored (in, out) (transformers' Conv1D)."""


def pvera_delta(parts: dict[str, torch.Tensor], in_features: int) -> torch.Tensor:
    """The mean update diag(b) B[:out, :] diag(d[:r]) A[:r, :in] in fp32, (out, in); out is b's length."""
    a, b = parts["pvera_A"].float(), parts["pvera_B"].float()
    lambda_b, lambda_d = parts["pvera_lambda_b"].float(), parts["pvera_lambda_d"].float()
    out_features, r = len(lambda_b), len(lambda_d) // 2
    if a.shape[1] < in_features or b.shape[0] < out_features or len({a.shape[0], len(lambda_d), 2 * b.shape[1]}) != 1:
        raise PeftkitError(
            f"PVeRA's shared projections pvera_A {tuple(a.shape)} and pvera_B {tuple(b.shape)} do not fit a layer of "
            f"{in_features} inputs, {out_features} outputs and pvera_lambda_d of {len(lambda_d)} (2 x rank). Export "
            "the adapter again."
        )
    return (lambda_b[:, None] * b[:out_features]) @ (lambda_d[:r, None] * a[:r, :in_features])


class PveraLinear(AdapterLayer):
    """PVeRA around nn.Linear, transformers' Conv1D or a bitsandbytes linear layer; `shared` holds A and B."""

    def __init__(self, base_layer: nn.Module, cfg: PveraConfig) -> None:
        super().__init__(base_layer)
        self.in_features, out_features = linear_shape(base_layer)
        self.facts = PveraFacts(is_conv1d(base_layer))
        lambda_b, lambda_d = torch.ones(out_features), torch.randn(2 * cfg.r)  # peft draws d whatever its init
        if cfg.init_weights:
            lambda_b, lambda_d = torch.zeros(out_features), torch.full((2 * cfg.r,), float(cfg.d_initial))
        device = base_layer.weight.device
        self.pvera_lambda_b = nn.Parameter(lambda_b.to(device))
        self.pvera_lambda_d = nn.Parameter(lambda_d.to(device))
        self.pvera_dropout = nn.Dropout(cfg.pvera_dropout) if cfg.pvera_dropout > 0 else nn.Identity()
        self.sample_at_inference = cfg.sample_at_inference
        self.generator = None if cfg.generator_seed is None else torch.Generator().manual_seed(cfg.generator_seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        lambda_b, lambda_d = self.pvera_lambda_b, self.pvera_lambda_d
        a = self.shared.pvera_A[:, : self.in_features]
        b = self.shared.pvera_B[: len(lambda_b)]
        mu, logvar = (lambda_d * F.linear(self.pvera_dropout(x.to(lambda_d.dtype)), a)).chunk(2, dim=-1)
        update = lambda_b * F.linear(self._sample(mu, logvar), b)
        return (result + update).to(result.dtype)

    def _sample(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """mu + eps * exp(logvar / 2) in training (and with sample_at_inference), else mu: peft's reparametrisation,
        its noise drawn as peft draws it (on the CPU from the layer's generator, moved to the device)."""
        if not (self.training or self.sample_at_inference):
            return mu
        std = torch.exp(0.5 * logvar)
        if self.generator is None:
            eps = torch.randn_like(std)
        else:
            eps = torch.randn(std.shape, dtype=std.dtype, generator=self.generator).to(std.device)
        return mu + eps * std


class PveraTrainer(MethodTrainer):
    """With generator_seed: each layer's noise generator state, kept in a checkpoint so a resumed run draws on. Per
    process: each draws as many numbers as its own batches hold, which may differ (their padded lengths)."""

    per_process = True

    def __init__(self, layers: dict[str, PveraLinear]) -> None:
        self.layers = layers

    def state_dict(self) -> dict:
        return {"generators": {path: layer.generator.get_state() for path, layer in self.layers.items()}}

    def load_state_dict(self, state: dict) -> None:
        for path, layer in self.layers.items():
            layer.generator.set_state(state["generators"][path])


class PeftPveraConfig(PeftLayerTargets):
    """The fields of a PVERA adapter_config.json that peftkit reads (defaults: peft's PveraConfig)."""

    r: int = Field(256, gt=0)
    projection_prng_key: int = Field(0, **SEED_RANGE)
    save_projection: bool = True
    pvera_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    d_initial: float = 0.1
    init_weights: bool = True
    sample_at_inference: bool = False
    generator_seed: int | None = Field(None, **SEED_RANGE)
    # Features peftkit does not implement: a value here is refused rather than silently ignored.
    bias: str = "none"


class Pvera(Method):
    name = "pvera"
    title = "PVeRA"
    peft_type = "PVERA"
    config = PveraConfig
    peft_config = PeftPveraConfig
    param_names = ("pvera_lambda_b", "pvera_lambda_d")
    # d is (2r,); the shared A is (2r, max in), B (max out, r).
    rank_dims = {"pvera_lambda_d": 0, "pvera_A": 0, "pvera_B": 1}
    shared_names = ("pvera_A", "pvera_B")

    @classmethod
    def wrap(cls, base: nn.Module, cfg: PveraConfig, path: str) -> PveraLinear:
        refuse_embedding(base, path, "PVeRA")
        return PveraLinear(base, cfg)

    @classmethod
    def shared_tensors(cls, cfg: PveraConfig, shapes: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        return projections(cfg.r, cfg.projection_prng_key, shapes)

    @classmethod
    def saves_shared(cls, cfg: PveraConfig) -> bool:
        return cfg.save_projection

    @classmethod
    def layer_facts(cls, cfg: PveraConfig, path: str, fan_in_fan_out: bool) -> PveraFacts:
        return PveraFacts(fan_in_fan_out)

    @staticmethod
    def merge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: PveraFacts) -> torch.Tensor:
        return weight + _delta(weight, parts, facts)

    @staticmethod
    def unmerge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: PveraFacts) -> torch.Tensor:
        return weight - _delta(weight, parts, facts)

    @staticmethod
    def update_shape(parts: dict[str, torch.Tensor], facts: PveraFacts) -> tuple[int | None, ...]:
        out_in = (len(parts["pvera_lambda_b"]), None)  # any input size up to pvera_A's: the layer slices A
        return out_in[::-1] if facts.fan_in_fan_out else out_in

    @classmethod
    def to_peft(cls, cfg: PveraConfig, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        # The exact module paths (peft_common) also make peft size the shared projections from the same layers.
        return cls.peft_common(cfg, targets, base_name) | {
            "r": cfg.r, "projection_prng_key": cfg.projection_prng_key, "save_projection": cfg.save_projection,
            "pvera_dropout": cfg.pvera_dropout, "d_initial": cfg.d_initial, "fan_in_fan_out": fan_in_fan_out,
            "bias": "none", "init_weights": cfg.init_weights, "sample_at_inference": cfg.sample_at_inference,
            "generator_seed": cfg.generator_seed,
        }

    @classmethod
    def from_peft(cls, peft: PeftPveraConfig, config_file: Path) -> PveraConfig:
        refuse_unsupported(peft, config_file, ())  # (its bias)
        return PveraConfig(method="pvera", r=peft.r, target_modules=targets_from_peft(peft.target_modules, config_file),
                           projection_prng_key=peft.projection_prng_key, save_projection=peft.save_projection,
                           pvera_dropout=peft.pvera_dropout, d_initial=peft.d_initial, init_weights=peft.init_weights,
                           sample_at_inference=peft.sample_at_inference, generator_seed=peft.generator_seed,
                           modules_to_save=peft.modules_to_save or [], **filters_from_peft(peft, config_file))

    @classmethod
    def trainer(cls, model: nn.Module, cfg: PveraConfig, total_steps: int) -> PveraTrainer | None:
        from peftkit.adapters import adapter_layers  # (it imports the methods)

        return None if cfg.generator_seed is None else PveraTrainer(adapter_layers(model))

    @classmethod
    def kept_for_backward(cls, cfg: PveraConfig, layer: AdapterLayer) -> tuple[int, int]:
        # A x (2r), exp's output and the noise (r each), z (r) and, for b's gradient, B z (out) per token; with
        # dropout its fp32 input and mask (in each).
        dropout = 2 * linear_shape(layer.base_layer)[0] if cfg.pvera_dropout > 0 else 0
        return 5 * cfg.r + linear_shape(layer.base_layer)[1] + dropout, 0

    @classmethod
    def describe(cls, cfg: PveraConfig) -> str:
        return f"PVeRA r={cfg.r}"

    @classmethod
    def randomize(cls, layer: AdapterLayer, generator: torch.Generator, std: float) -> None:
        # b starts at 0: a nonzero b makes the update nonzero; d moves by a relative `std`. Trained b grow
        # large (the random pair is fixed), hence the factor.
        with torch.no_grad():
            layer.pvera_lambda_b.copy_(torch.randn(layer.pvera_lambda_b.shape, generator=generator) * std * 10)
            layer.pvera_lambda_d.mul_(1 + torch.randn(layer.pvera_lambda_d.shape, generator=generator) * std)


def _delta(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: PveraFacts) -> torch.Tensor:
    """PVeRA's mean update in the base weight's layout ((in, out) for Conv1D), on its device."""
    in_features = weight.shape[0] if facts.fan_in_fan_out else weight.shape[1]
    delta = pvera_delta(parts, in_features).to(weight.device)
    return delta.T if facts.fan_in_fan_out else delta


PveraLinear.method = Pvera
