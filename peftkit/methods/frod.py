"""FRoD (full-rank rotation decomposition; peft 0.21.2's FrodConfig/FROD, https://doi.org/10.1609/aaai.v40i31.39813):
each target's weight is rewritten in a basis V (in x in) shared by all the targets of its category (peft's
`_category_from_key`: `self_attn_q_proj`, `mlp_down_proj`, ...) and replaced by

    W' = U (S + diag(lambda_l)) V^T

where U (out x in, frozen) and lambda_l (in, trained) are W V^-T's unit columns and their norms (so W' = W at init, up
to rounding), and S (in x in, trained) is sparse: `frod_lambda_s_values` on a fixed random set of off-diagonal
entries (`frod_s_indices`, `sparse_rate` of them), 0 at init. V is computed from the category's weights stacked
(peft's `_projection_from_weights`: full SVD, or QR and the eigenvectors of the averaged ridge-regularised inverses),
the entries drawn with `torch.randperm` from a generator seeded with `projection_prng_key`, category after category in
sorted order: peftkit computes them as peft does (CPU, fp32/fp64) and one seed gives peft's tensors.

The file is peft's: `<path>.frod_lambda_l`, `<path>.frod_lambda_s_values` and, with save_projection, one
`base_model.frod_V.<category>`, `base_model.frod_s_indices.<category>`, `base_model.frod_s_size.<category>` per
category. In the model each layer holds its category's V, indices and size as frozen tensors (`to_peft_file` and
`layer_state` convert); U is recomputed from the base weight and V whenever V changes (peft's non-persistent frod_U).
The forward is peft's: the adapted weight's product x V (S + L)^T U^T + b, replacing the base layer's (with dropout in
training, base output + that product of the dropped input - its base product).
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
from peftkit.methods.base import Method, refuse_unsupported, targets_from_peft
from peftkit.methods.layer import AdapterLayer, KeptWeightLayer, dense_weight, is_conv1d, is_quantized, linear_shape
from peftkit.methods.supertuning import DEFAULTS as LORA_DEFAULTS
from peftkit.methods.target_filters import LayerTargets, NoDefault, PeftLayerTargets, filters_from_peft
from peftkit.section import TargetRegex

PEFT_PREFIX, SHARED_PREFIX = "base_model.model.", "base_model."
PROJECTIONS = ("frod_V", "frod_s_indices", "frod_s_size")
TRAINED = ("frod_lambda_l", "frod_lambda_s_values")
DEFAULTS = LORA_DEFAULTS | {"gpt2": ["c_attn"], "phi": ["q_proj", "v_proj"]}
"""peft 0.21's TRANSFORMERS_MODELS_TO_FROD_TARGET_MODULES_MAPPING for the architectures peftkit is tested on."""


class FrodConfig(LayerTargets):
    """FRoD: each target's weight rewritten as U (S + diag(lambda_l)) V^T, lambda_l and a sparse S trained."""

    method: Literal["frod"]
    sparse_rate: float = Field(0.01, ge=0.0, le=1.0)
    """Fraction of S's in x in entries trained (off the diagonal; at least one where > 0)."""
    regularization_alpha: float = 1e-3
    """Ridge term of the category basis' inverses (keeps correlated layers' basis stable)."""
    projection_prng_key: int = 0
    """Seed of the generator that picks S's trained entries."""
    save_projection: bool = True
    """Save V and S's entries in the adapter file (else recomputed from the base weights on loading)."""
    frod_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapter's input."""
    init_weights: bool = True
    """false (debugging, as peft): S's values start at N(0, 0.1^2) and lambda_l moves by N(0, 0.1^2)."""
    target_modules: Literal["all-linear"] | list[str] | TargetRegex | None = None
    """Module-name suffixes, `all-linear` or {regex: ...}; null: peft's default for the architecture (q_proj, v_proj
    for Llama). Linear and GPT-2's Conv1D layers."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full and saved whole (e.g. `lm_head`)."""


def category_of(path: str) -> str:
    """peft's `_category_from_key`: the role a module plays in its block (`self_attn_q_proj`)."""
    parts = path.split(".")
    if len(parts) == 1:
        return parts[0]
    if parts[-2].isdigit():
        return parts[-1]
    category = f"{parts[-2]}_{parts[-1]}"
    return "attention_output" if category == "output_dense" and len(parts) >= 3 and parts[-3] == "attention" \
        else category


def layer_index_of(path: str, fallback: int) -> int:
    """peft's `_layer_index_from_key`: the number after `layers`, else the first number in the path."""
    parts = path.split(".")
    if "layers" in parts:
        try:
            return int(parts[parts.index("layers") + 1])
        except (ValueError, IndexError):
            pass
    return next((int(p) for p in parts if p.isdigit()), fallback)


def projection(matrices: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """peft's `_projection_from_weights`: the category's basis V (in x in) from its fp32 (out x in) weights."""
    stacked = torch.cat(matrices, dim=0)
    if stacked.shape[0] < stacked.shape[1]:
        return torch.linalg.svd(stacked, full_matrices=True)[2].T
    q, r = torch.linalg.qr(stacked)
    dim, start, t_pi = r.shape[1], 0, torch.zeros((r.shape[1], r.shape[1]), dtype=r.dtype)
    for matrix in matrices:
        part = q[start: start + matrix.shape[0]]
        start += matrix.shape[0]
        t_pi += torch.linalg.inv(part.T @ part + alpha * torch.eye(dim, dtype=r.dtype))
    t_pi /= len(matrices)
    return r.T @ torch.linalg.eigh(t_pi)[1]


def sparse_entries(dim: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """peft's trained entries of S (2, nnz): a randperm of the off-diagonal entries, row-major, cut to dim^2 rate."""
    rows, cols = torch.meshgrid(torch.arange(dim), torch.arange(dim), indexing="ij")
    every = torch.stack([rows.flatten(), cols.flatten()], dim=1)
    off = every[every[:, 0] != every[:, 1]]
    nnz = min(int(dim * dim * rate), off.shape[0])
    if rate > 0 and off.shape[0] > 0:
        nnz = max(1, nnz)
    if not nnz:
        return torch.empty(2, 0, dtype=torch.long)
    return off[torch.randperm(off.shape[0], generator=generator)[:nnz]].t().contiguous()


def nnz_of(dim: int, rate: float) -> int:
    nnz = min(int(dim * dim * rate), dim * dim - dim)
    return max(1, nnz) if rate > 0 and dim > 1 else nnz


def u_and_lambda(v: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's `_calculate_frod_u_and_lambda`: W V^-T (fp64) split into unit columns U and their norms, as fp32."""
    w, v = w.detach().to(torch.float64).cpu(), v.detach().to(torch.float64).cpu()
    try:
        bi = torch.linalg.solve(v, w.T).T
    except RuntimeError:
        bi = w @ torch.linalg.pinv(v, rtol=1e-6).T
    lam = torch.linalg.norm(bi, dim=0)
    u = torch.zeros_like(bi)
    nonzero = lam > 1e-12
    u[:, nonzero] = bi[:, nonzero] / lam[nonzero]
    return u.float(), lam.float()


def adapted_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """U (S + diag(lambda_l)) V^T (out x in) in `dtype`, U from the (out x in) `weight` before the adapter."""
    v = parts["frod_V"].to(weight.device, dtype)
    u = u_and_lambda(v, weight)[0].to(weight.device, dtype)
    s = torch.zeros(v.shape, dtype=dtype, device=weight.device)
    index = parts["frod_s_indices"].long().to(weight.device)
    s.index_put_((index[0], index[1]), parts["frod_lambda_s_values"].to(weight.device, dtype), accumulate=True)
    return u @ (s + torch.diag_embed(parts["frod_lambda_l"].to(weight.device, dtype))) @ v.T


@dataclass(frozen=True)
class FrodFacts:
    fan_in_fan_out: bool = False
    """The base weight is stored (in, out) (transformers' Conv1D)."""


def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


class FrodLayer(KeptWeightLayer):
    """FRoD around nn.Linear or transformers' Conv1D; V, S's entries and lambda_l's start are set for all the layers
    at once (`Frod.link_layers`)."""

    def __init__(self, base_layer: nn.Module, cfg: FrodConfig) -> None:
        super().__init__(base_layer)
        in_features, _ = linear_shape(base_layer)
        self.facts = FrodFacts(is_conv1d(base_layer))
        device = base_layer.weight.device
        nnz = nnz_of(in_features, cfg.sparse_rate)
        self.frod_lambda_l = nn.Parameter(torch.zeros(in_features, device=device))
        self.frod_lambda_s_values = nn.Parameter(torch.zeros(nnz, device=device))
        self.frod_V = _frozen(torch.zeros(in_features, in_features, device=device))
        self.frod_s_indices = _frozen(torch.zeros(2, nnz, dtype=torch.long, device=device))
        self.frod_s_size = _frozen(torch.tensor([in_features, in_features], device=device))
        self.frod_dropout = nn.Dropout(cfg.frod_dropout) if cfg.frod_dropout > 0 else nn.Identity()
        self.register_buffer("frod_U", None, persistent=False)
        self._u_of: tuple | None = None

    def u_matrix(self) -> torch.Tensor:
        """peft's frod_U: computed again from the (unmerged) base weight whenever V is another tensor."""
        v = self.frod_V
        key = (v.data_ptr(), v._version, v.device, v.dtype)
        if self._u_of != key:
            weight = dense_weight(self.base_layer, self.facts.fan_in_fan_out)
            self.frod_U = u_and_lambda(v.to(weight.dtype), weight)[0].to(v.device)
            self._u_of = key
        return self.frod_U

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        dtype, bias = x.dtype, getattr(self.base_layer, "bias", None)
        u, v = self.u_matrix().to(dtype), self.frod_V.to(dtype)
        values, lam = self.frod_lambda_s_values.to(dtype), self.frod_lambda_l.to(dtype)
        s = torch.sparse_coo_tensor(self.frod_s_indices, values, tuple(self.frod_V.shape), check_invariants=False).coalesce()
        h = self.frod_dropout(x)
        z = h.reshape(-1, h.shape[-1]) @ v
        if s._nnz() == 0:
            z_s = torch.zeros_like(z)
        elif dtype in (torch.float16, torch.bfloat16):
            z_s = z @ s.to_dense().t()
        else:
            z_s = torch.sparse.mm(s, z.t()).t()
        out = F.linear(z_s + z * lam, u).reshape(*h.shape[:-1], u.shape[0])
        if isinstance(self.frod_dropout, nn.Identity) or not self.training:
            return (out if bias is None else out + bias).to(dtype)
        weight = self.base_layer.weight
        weight = (weight.T if self.facts.fan_in_fan_out else weight).to(dtype)
        return (self.base_layer(x) + out - F.linear(h, weight)).to(dtype)


class PeftFrodConfig(PeftLayerTargets):
    """The fields of a FROD adapter_config.json that peftkit reads (defaults: peft 0.21's FrodConfig)."""

    sparse_rate: float = Field(0.01, ge=0.0, le=1.0)
    regularization_alpha: float = 1e-3
    projection_prng_key: int = 0
    save_projection: bool = True
    frod_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    init_weights: bool = True
    fan_in_fan_out: bool = False  # (read from the layers: Conv1D's are (in, out) whatever it says, as peft)
    progressbar: bool = True  # (a progress bar: nothing to do with the numbers)
    runtime_offload_base_weight: bool = False  # (where the base weight lives while unused: the same numbers)
    # Features peftkit does not implement: a value here is refused rather than silently ignored.
    bias: str = "none"


class Frod(Method):
    name = "frod"
    title = "FRoD"
    peft_type = "FROD"
    config = FrodConfig
    peft_config = PeftFrodConfig
    param_names = TRAINED + PROJECTIONS
    untrained_names = PROJECTIONS
    integer_names = ("frod_s_indices", "frod_s_size")
    rank_dims = {"frod_V": 0, "frod_lambda_l": 0}

    @classmethod
    def shared_across_layers(cls, cfg: FrodConfig) -> str:
        # (FSDP2: fully_shard of the second decoder layer failed, 'shared with a parameter already managed by another
        # FSDP group', by hand on the CPU: frozen, V is a parameter all the same)
        return ("holds one V (frod_V, frozen) and one set of S entries per kind of layer, which the layers of that kind "
                "in every decoder layer share")

    @classmethod
    def resolve(cls, cfg: FrodConfig, model_type: str | None) -> FrodConfig:
        if cfg.target_modules is not None:
            return cfg
        if model_type not in DEFAULTS:
            raise NoDefault("target_modules", "FRoD", model_type, DEFAULTS, "name the modules",
                            "target_modules: [q_proj, v_proj] for a Llama-like model")
        return cfg.model_copy(update={"target_modules": DEFAULTS[model_type]})

    @classmethod
    def wrap(cls, base: nn.Module, cfg: FrodConfig, path: str) -> FrodLayer:
        if is_quantized(base):
            raise PeftkitError(
                f"adapter.target_modules: '{path}' is a 4-bit/8-bit (bitsandbytes) layer; FRoD replaces the whole "
                "weight by U (S + diag(lambda_l)) V^T, computed from the unquantized weights (peft 0.21's FRoD takes "
                "plain Linear and Conv1D layers only). Load the model unquantized (remove the recipe's quantization section), or use "
                "adapter.method: lora for QLoRA.")
        if not (isinstance(base, nn.Linear) or is_conv1d(base)):
            raise PeftkitError(
                f"adapter.target_modules: '{path}' is an {type(base).__name__}; FRoD (as peft's) adapts Linear and "
                "Conv1D layers only. Leave it out of adapter.target_modules (all-linear does), or use adapter.method: "
                "lora.")
        return FrodLayer(base, cfg)

    @classmethod
    def link_layers(cls, model: nn.Module, cfg: FrodConfig, layers: dict[str, AdapterLayer]) -> None:
        """Each category's V and S entries, computed as peft's `_init_frod_projections` and held by all its layers (one
        tensor each, as peft's), then each layer's lambda_l (and with init_weights false, peft's draws, layer after
        layer)."""
        by_index: dict[int, dict[str, FrodLayer]] = {}
        for fallback, (path, layer) in enumerate(layers.items()):
            by_index.setdefault(layer_index_of(path, fallback), {})[category_of(path)] = layer
        meta = any(layer.frod_V.device.type == "meta" for layer in layers.values())
        generator = torch.Generator(device="cpu").manual_seed(cfg.projection_prng_key)
        for category in sorted({c for group in by_index.values() for c in group}):
            members = [group[category] for _, group in sorted(by_index.items()) if category in group]
            first = members[0]
            if not meta:  # (the memory estimate's meta model: nothing to compute)
                weights = [dense_weight(m.base_layer, m.facts.fan_in_fan_out).cpu() for m in members]
                v = projection(weights, cfg.regularization_alpha).to(first.base_layer.weight.dtype)
                first.frod_V.data = v.float().to(first.frod_V.device)
                first.frod_s_indices.data = sparse_entries(v.shape[0], cfg.sparse_rate, generator).to(v.device)
            for path, layer in layers.items():
                if category_of(path) == category:
                    layer.frod_V, layer.frod_s_indices, layer.frod_s_size = (
                        first.frod_V, first.frod_s_indices, first.frod_s_size)
        if meta:
            return
        for layer in layers.values():
            weight = dense_weight(layer.base_layer, layer.facts.fan_in_fan_out)
            lam = u_and_lambda(layer.frod_V.to(weight.dtype), weight)[1]
            with torch.no_grad():
                layer.frod_lambda_l.copy_(lam)
                if not cfg.init_weights:
                    nn.init.normal_(layer.frod_lambda_s_values, std=0.1)
                    layer.frod_lambda_l.add_(torch.randn_like(layer.frod_lambda_l) * 0.1)

    @classmethod
    def to_peft_file(cls, state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
        """Each category's V, entries and size once, as `base_model.frod_V.<category>` (none without
        save_projection)."""
        out = {k: t for k, t in state.items() if not k.endswith(tuple(f".{n}" for n in PROJECTIONS))}
        if not config.get("save_projection", True):
            return out
        for key, tensor in state.items():
            path, _, name = key.rpartition(".")
            if name in PROJECTIONS:
                out.setdefault(f"{SHARED_PREFIX}{name}.{category_of(path.removeprefix(PEFT_PREFIX))}", tensor)
        return out

    @classmethod
    def from_peft_file(cls, state: dict[str, torch.Tensor], peft: PeftFrodConfig, file: Path
                       ) -> dict[str, torch.Tensor]:
        """Each kind's saved V, entries and size under each of its layers as well, so that a merge of the file's
        tensors alone (combining adapters) finds every layer's."""
        paths = [k[: -len(".frod_lambda_l")] for k in state if k.endswith(".frod_lambda_l")]
        out = dict(state)
        for path in paths:
            for name in PROJECTIONS:
                key = f"{SHARED_PREFIX}{name}.{category_of(path.removeprefix(PEFT_PREFIX))}"
                if key in state:
                    out.setdefault(f"{path}.{name}", state[key])
        return {k: t for k, t in out.items() if not k.startswith(tuple(f"{SHARED_PREFIX}{n}." for n in PROJECTIONS))}

    @classmethod
    def layer_state(cls, layers: dict[str, AdapterLayer], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """peft's file as the layers hold it: each layer's category's V, entries and size under the layer (those
        computed at injection where the file leaves them out: save_projection false)."""
        shared = {k: t for k, t in state.items() if k.startswith(tuple(f"{SHARED_PREFIX}{n}." for n in PROJECTIONS))}
        out = {k: t for k, t in state.items() if k not in shared}
        for path, layer in layers.items():
            for name in PROJECTIONS:
                key = f"{SHARED_PREFIX}{name}.{category_of(path)}"
                own = f"{PEFT_PREFIX}{path}.{name}"
                out.setdefault(own, shared[key] if key in shared else getattr(layer, name).detach())
        return out

    @classmethod
    def layer_facts(cls, cfg: FrodConfig, path: str, fan_in_fan_out: bool) -> FrodFacts:
        return FrodFacts(fan_in_fan_out)

    @staticmethod
    def merge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: FrodFacts) -> torch.Tensor:
        dense = weight.T if facts.fan_in_fan_out else weight
        merged = adapted_weight(dense, parts, weight.dtype)
        return merged.T if facts.fan_in_fan_out else merged

    @staticmethod
    def unmerge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: FrodFacts) -> torch.Tensor:
        raise PeftkitError("FRoD replaces the weight: its merge cannot be taken out of the merged weight (the layer "
                           "keeps the weight before it).")

    @staticmethod
    def update_shape(parts: dict[str, torch.Tensor], facts: FrodFacts) -> tuple[int | None, ...]:
        return (None, parts["frod_V"].shape[0]) if not facts.fan_in_fan_out else (parts["frod_V"].shape[0], None)

    @classmethod
    def to_peft(cls, cfg: FrodConfig, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        return cls.peft_common(cfg, targets, base_name) | {
            "sparse_rate": cfg.sparse_rate, "regularization_alpha": cfg.regularization_alpha,
            "projection_prng_key": cfg.projection_prng_key, "save_projection": cfg.save_projection,
            "frod_dropout": cfg.frod_dropout, "fan_in_fan_out": fan_in_fan_out, "bias": "none",
            "init_weights": cfg.init_weights, "progressbar": True, "runtime_offload_base_weight": False,
        }

    @classmethod
    def from_peft(cls, peft: PeftFrodConfig, config_file: Path) -> FrodConfig:
        refuse_unsupported(peft, config_file, ())  # (its bias)
        return FrodConfig(
            method="frod", sparse_rate=peft.sparse_rate, regularization_alpha=peft.regularization_alpha,
            projection_prng_key=peft.projection_prng_key, save_projection=peft.save_projection,
            frod_dropout=peft.frod_dropout, init_weights=True,  # (the file holds what it trained to)
            target_modules=targets_from_peft(peft.target_modules, config_file) if peft.target_modules else None,
            modules_to_save=peft.modules_to_save or [], **filters_from_peft(peft, config_file))

    @classmethod
    def kept_for_backward(cls, cfg: FrodConfig, layer: AdapterLayer) -> tuple[int, int]:
        # Per token the input, x V and the mixed product (in each; with dropout the dropped copy and its mask); per
        # layer U and V in the input's dtype and S made dense (bf16).
        in_features, out_features = linear_shape(layer.base_layer)
        mask = 2 * in_features if cfg.frod_dropout else 0
        return 3 * in_features + mask, in_features * (out_features + 2 * in_features)

    @classmethod
    def describe(cls, cfg: FrodConfig) -> str:
        return f"FRoD sparse_rate={cfg.sparse_rate}"

    @classmethod
    def randomize(cls, layer: AdapterLayer, generator: torch.Generator, std: float) -> None:
        # S's values start at 0 (the identity); lambda_l at the weight's column norms, moved a little. A layer wrapped
        # alone (never linked to a category: `link_layers`) takes its own weight's basis first.
        with torch.no_grad():
            if not layer.frod_V.any():
                weight = dense_weight(layer.base_layer, layer.facts.fan_in_fan_out).cpu()
                layer.frod_V.copy_(projection([weight], 1e-3).to(layer.frod_V.device))
                layer.frod_lambda_l.copy_(u_and_lambda(layer.frod_V, weight)[1].to(layer.frod_V.device))
            s = layer.frod_lambda_s_values
            s.copy_(torch.randn(s.shape, generator=generator).to(s.device) * std)
            lam = layer.frod_lambda_l
            lam.mul_(1 + torch.randn(lam.shape, generator=generator).to(lam.device) * std)


FrodLayer.method = Frod
