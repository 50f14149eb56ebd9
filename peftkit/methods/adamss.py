"""AdaMSS, adaptive multi-subspaces (peft 0.21.2's AdamssConfig/ADAMSS): each target's weight W (out x in, with its
bias as one more column where it has one) is decomposed by a rank-`r` randomized SVD, W ~ U S V^T; the rows of U (one
per output) are clustered by scikit-learn's KMeans into `num_subspaces` subspaces, and each subspace k (its output
rows) learns a rank-`subspace_rank` update in the r-dimensional space V^T spans:

    y = W x + b + P (B_1 A_1 ; ... ; B_K A_K) V^T [x; 1]

P putting each subspace's rows back in place; A_k (rank x r) starts at an orthonormal basis of the subspace's part of U
(QR, as peft), B_k (rows_k x rank) at 0: the base model. V^T (`adamss_newB`, frozen) is saved in the file; the
clustering is not (peft's file holds no row placement): it is computed again from the base weight on loading, exactly
as peft computes it (torch.svd_lowrank seeded with `random_seed` on the CPU, KMeans with peft's fixed random_state),
and the file's B shapes (each subspace's row count) must agree with it, else the adapter is refused: peft's loader swaps
in the file's shapes and keeps its own placement, putting rows in the wrong places without a word.

Names, shapes, defaults and init are peft's: `<path>.adamss_A.<k>` (rank x r), `<path>.adamss_B.<k>` (rows_k x rank),
`<path>.adamss_newB` (r x in[+1]). One seed gives peft's tensors (A's QR follows a torch.svd_lowrank that draws from the
global generator, subspace after subspace; init_weights null draws B from N(0, 0.01^2) in the weight's dtype) and leaves
the generator where peft's does. peft computes in the base weight's dtype; so does the forward here.

ASA (use_asa: adaptive subspace allocation) freezes the least important subspaces while training:
`peftkit.methods.adamss_trainer`, the method's `trainer`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.nn import functional as F

from peftkit.errors import PeftkitError, PeftkitWarning
from peftkit.methods.base import Method, refuse_unsupported, targets_from_peft
from peftkit.methods.layer import AdapterLayer, is_quantized, linear_shape, not_a_linear
from peftkit.methods.supertuning import DEFAULTS
from peftkit.methods.target_filters import LayerTargets, NoDefault, PeftLayerTargets, filters_from_peft
from peftkit.section import TargetRegex

KMEANS_SEED, KMEANS_ITERATIONS = 123456789, 10
"""peft's clustering_Z: KMeans(init="random", n_init=1, max_iter=10, random_state=123456789)."""
MAX_SUBSPACES = 64
"""The most subspaces a layer may have: its tensors' names (`adamss_A.<k>`) are listed in `param_names`."""


class AdamssConfig(LayerTargets):
    """AdaMSS: each target's SVD space clustered into subspaces, each learning a low-rank update."""

    method: Literal["adamss"]
    r: int = Field(100, gt=0)
    """Rank of the SVD each weight is decomposed by (capped at the weight's smaller side)."""
    num_subspaces: int = Field(5, gt=0, le=MAX_SUBSPACES)
    """Subspaces (KMeans clusters of the output rows) per layer (capped at the layer's outputs)."""
    subspace_rank: int = Field(1, gt=0)
    """Rank of each subspace's update (capped at its row count)."""
    init_weights: Literal["orthogonal"] | None = "orthogonal"
    """orthogonal: B = 0, the base model; null (debugging, as peft): B drawn from N(0, 0.01^2)."""
    use_dynamic_rank: bool = False
    """Each subspace's rank: the number of singular values of its Gram matrix above svd_threshold x the largest (at
    most subspace_rank)."""
    svd_threshold: float = 0.1
    """With use_dynamic_rank: the share of the largest singular value a counted one exceeds."""
    random_seed: int = 0
    """Seed of the randomized SVD (its own generator: the same decomposition on every loading)."""
    use_asa: bool = False
    """Adaptive subspace allocation: freeze the least important subspaces while training (peftkit.methods.adamss_trainer)."""
    asa_target_subspaces: int = 50
    """With use_asa: subspaces left training, over all the layers, from final_warmup on."""
    init_warmup: int = 50
    """With use_asa: the first step (peft's count: optimizer steps before it) that scores and freezes."""
    final_warmup: int = 1000
    """With use_asa: the last step that scores and freezes."""
    mask_interval: int = 100
    """With use_asa: freeze every mask_interval steps, between init_warmup and final_warmup."""
    asa_importance_beta: float = 0.85
    """With use_asa: moving average of the importance |p grad|."""
    asa_uncertainty_beta: float = 0.85
    """With use_asa: moving average of its distance to that average."""
    asa_schedule_exponent: float = 3.0
    """With use_asa: the subspaces kept fall from all to asa_target_subspaces as (1 - progress)^exponent."""
    target_modules: Literal["all-linear"] | list[str] | TargetRegex | None = None
    """Module-name suffixes, `all-linear` or {regex: ...}; null: peft's default for the architecture (q_proj, v_proj
    for Llama). nn.Linear layers only."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full and saved whole (e.g. `lm_head`)."""

    @model_validator(mode="after")
    def _asa_schedule(self) -> AdamssConfig:
        """peft's checks of the ASA schedule (only with use_asa)."""
        if not self.use_asa:
            return self
        if self.mask_interval <= 0:
            raise ValueError(f"adapter.mask_interval must be a positive number of steps with use_asa, got "
                             f"{self.mask_interval}")
        if self.init_warmup >= self.final_warmup:
            raise ValueError(f"adapter.init_warmup ({self.init_warmup}) must be below adapter.final_warmup "
                             f"({self.final_warmup}) with use_asa: ASA freezes subspaces between the two")
        if self.asa_target_subspaces <= 0:
            raise ValueError(f"adapter.asa_target_subspaces must be positive with use_asa, got "
                             f"{self.asa_target_subspaces}")
        if self.asa_schedule_exponent <= 0:
            raise ValueError(f"adapter.asa_schedule_exponent must be positive with use_asa, got "
                             f"{self.asa_schedule_exponent}")
        return self


def kmeans():
    """scikit-learn's KMeans (an optional dependency: peftkit[adamss])."""
    try:
        from sklearn.cluster import KMeans
    except ImportError:
        raise PeftkitError('AdaMSS clusters each weight\'s singular vectors with scikit-learn\'s KMeans, which is not '
                           'installed: pip install "peftkit[adamss]" (or scikit-learn>=1.6).') from None
    return KMeans


def with_bias(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """[W b] (out x in+1) in fp32 on the CPU, or W alone: what peft decomposes."""
    weight = weight.detach().float().cpu()
    return weight if bias is None else torch.cat([weight, bias.detach().float().cpu().unsqueeze(1)], dim=1)


def decompose(matrix: torch.Tensor, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's slice_pca: (V^T (r x in), U (out x r)) of torch.svd_lowrank(matrix, r, niter=2), its random projection
    drawn from the CPU generator seeded with `seed` (and put back after, as peft's fork_rng)."""
    r = min(r, *matrix.shape)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # (the CPU's alone: torch.manual_seed would reseed CUDA's too)
        u, _, v = torch.svd_lowrank(matrix, q=r, niter=2)
    return v[:, :r].T.contiguous(), u[:, :r].contiguous()


def segments(u: torch.Tensor, num_subspaces: int) -> list[torch.Tensor]:
    """peft's clustering_Z and seg_locations: the output rows of each KMeans cluster of U's rows, by cluster label."""
    k = min(num_subspaces, u.shape[0])
    labels = kmeans()(n_clusters=k, init="random", n_init=1, max_iter=KMEANS_ITERATIONS,
                      random_state=KMEANS_SEED).fit_predict(u.numpy().astype("float32"))
    labels = torch.from_numpy(labels).long()
    return [torch.where(labels == i)[0] for i in range(k)]


def placement(rows: list[torch.Tensor]) -> torch.Tensor:
    """Where each output row is in the subspaces' concatenated outputs (the inverse of peft's scatter_index)."""
    scatter = torch.cat(rows)
    return torch.empty_like(scatter).index_put_((scatter,), torch.arange(len(scatter)))


def subspace_rank(data: torch.Tensor, cfg: AdamssConfig) -> int:
    """The rank of one subspace's update (peft's update_layer: at least 1)."""
    if not cfg.use_dynamic_rank:
        return max(1, min(data.shape[0], cfg.subspace_rank))
    gram = data @ data.T
    s = torch.svd_lowrank(gram, q=min(gram.shape), niter=2)[1]  # (a draw from the global generator, as peft's)
    return max(1, min(int((s > cfg.svd_threshold * s[0]).sum()), cfg.subspace_rank, len(s)))


def start_factors(data: torch.Tensor, cfg: AdamssConfig, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of one subspace from its rows of U (`data`, rows x r), as peft: A = Q^T of the QR of data^T times the
    leading singular vectors of data data^T (torch.svd_lowrank: a draw from the global generator); B = 0, or N(0,
    0.01^2) in the weight's dtype without init_weights. Both rounded to the weight's dtype, held in fp32."""
    rank = subspace_rank(data, cfg)
    gram = data @ data.T
    basis = torch.svd_lowrank(gram, q=min(gram.shape[0], rank), niter=2)[0][:, :rank]
    a = torch.linalg.qr(data.T @ basis, mode="reduced")[0].T.contiguous()
    b = torch.zeros(data.shape[0], rank, dtype=dtype) if cfg.init_weights == "orthogonal" else \
        torch.randn(data.shape[0], rank, dtype=dtype) * 0.01
    return a.to(dtype).float(), b.float()


def adapter_parts(parts: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """(A_k, B_k by k, V^T) of a layer's tensors by PEFT suffix."""
    count = sum(name.startswith("adamss_A.") for name in parts)
    return ([parts[f"adamss_A.{k}"] for k in range(count)], [parts[f"adamss_B.{k}"] for k in range(count)],
            parts["adamss_newB"])


def delta(parts: dict[str, torch.Tensor], order: torch.Tensor) -> torch.Tensor:
    """P (B_k A_k V^T)_k (out x in[+1]) in fp32: peft's get_delta_weight before it splits off the bias column."""
    a, b, newb = adapter_parts(parts)
    chunks = [bk.float() @ ak.float() @ newb.float() for ak, bk in zip(a, b)]
    return torch.cat(chunks).index_select(0, order.to(newb.device))


@dataclass(frozen=True)
class AdamssFacts:
    order: torch.Tensor | None = field(default=None, compare=False)
    """Where each output row is among the subspaces' rows (`placement`); None: a file's, computed from the base
    weight it is merged into (`Adamss.base_facts`)."""
    r: int = 100
    num_subspaces: int = 5
    random_seed: int = 0


def refuse(path: str, kind: str, quantized: bool = False) -> PeftkitError:
    """`path` is `kind`, which AdaMSS cannot adapt; the fix: a quantized layer's is the recipe's quantization section
    (the top-level key, not model's), another kind's the target list."""
    fix = ("Load the base unquantized (remove the recipe's quantization section, or set quantization: null)"
           if quantized else "Leave it out of adapter.target_modules")
    return PeftkitError(
        f"adapter.target_modules: '{path}' is {kind}; AdaMSS decomposes the plain weight of an nn.Linear layer (peft "
        "0.21's AdaMSS adapts nn.Linear only, and computes the decomposition from the unquantized weight again on "
        f"loading). {fix}, or use adapter.method: lora.")


class AdamssLinear(AdapterLayer):
    """AdaMSS around nn.Linear."""

    def __init__(self, base_layer: nn.Module, cfg: AdamssConfig) -> None:
        super().__init__(base_layer)
        in_features, out_features = linear_shape(base_layer)
        weight, bias = base_layer.weight, base_layer.bias
        columns, r = in_features + (bias is not None), min(cfg.r, out_features, in_features + (bias is not None))
        if weight.device.type == "meta":  # (the memory estimate: rows split evenly, shapes only)
            k = min(cfg.num_subspaces, out_features)
            rows = list(torch.arange(out_features).tensor_split(k))
            newb = torch.empty(r, columns, device="meta")
            factors = [(torch.empty(min(len(g), cfg.subspace_rank), r, device="meta"),
                        torch.empty(len(g), min(len(g), cfg.subspace_rank), device="meta")) for g in rows]
        else:
            with torch.no_grad():
                newb, u = decompose(with_bias(weight, bias), cfg.r, cfg.random_seed)
                rows = segments(u, cfg.num_subspaces)
                factors = [start_factors(u[g], cfg, weight.dtype) for g in rows]
                newb = newb.to(weight.dtype).float().to(weight.device)
        self.adamss_A = nn.ParameterList([nn.Parameter(a.to(weight.device)) for a, _ in factors])
        self.adamss_B = nn.ParameterList([nn.Parameter(b.to(weight.device)) for _, b in factors])
        self.adamss_newB = nn.Parameter(newb, requires_grad=False)
        self.register_buffer("adamss_order", placement(rows).to(weight.device), persistent=False)
        self.cfg = cfg

    @property
    def facts(self) -> AdamssFacts:
        return AdamssFacts(self.adamss_order, self.cfg.r, self.cfg.num_subspaces, self.cfg.random_seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype, previous = self.base_layer.weight.dtype, x.dtype
        x = x.to(dtype)  # (peft's: the adapter computes in the base weight's dtype)
        result = self.base_layer(x)
        if self.merged:
            return result.to(previous)
        if self.base_layer.bias is not None:
            x = torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=dtype, device=x.device)], dim=-1)
        projected = F.linear(x, self.adamss_newB.to(dtype))
        chunks = [F.linear(F.linear(projected, a.to(dtype)), b.to(dtype))
                  for a, b in zip(self.adamss_A, self.adamss_B)]
        update = torch.cat(chunks, dim=-1).index_select(-1, self.adamss_order)
        return (result + update).to(previous)


class PeftAdamssConfig(PeftLayerTargets):
    """The fields of an ADAMSS adapter_config.json that peftkit reads (defaults: peft 0.21's AdamssConfig)."""

    r: int = Field(100, gt=0)
    num_subspaces: int = Field(5, gt=0)
    subspace_rank: int = Field(1, gt=0)
    init_weights: Literal["orthogonal"] | bool | None = "orthogonal"
    use_dynamic_rank: bool = False
    svd_threshold: float = 0.1
    random_seed: int = 0
    use_asa: bool = False
    asa_target_subspaces: int = 50
    init_warmup: int = 50
    final_warmup: int = 1000
    mask_interval: int = 100
    asa_importance_beta: float = 0.85
    asa_uncertainty_beta: float = 0.85
    asa_schedule_exponent: float = 3.0


ASA_KEYS = ("use_asa", "asa_target_subspaces", "init_warmup", "final_warmup", "mask_interval", "asa_importance_beta",
            "asa_uncertainty_beta", "asa_schedule_exponent")


class Adamss(Method):
    name = "adamss"
    title = "AdaMSS"
    peft_type = "ADAMSS"
    config = AdamssConfig
    peft_config = PeftAdamssConfig
    param_names = tuple(f"adamss_{n}.{k}" for n in "AB" for k in range(MAX_SUBSPACES)) + ("adamss_newB",)
    untrained_names = ("adamss_newB",)
    rank_dims = {"adamss_newB": 0} | {f"adamss_A.{k}": 1 for k in range(MAX_SUBSPACES)}  # (r: the SVD's rank)

    @classmethod
    def resolve(cls, cfg: AdamssConfig, model_type: str | None) -> AdamssConfig:
        if cfg.target_modules is not None:
            return cfg
        if model_type not in DEFAULTS:
            raise NoDefault("target_modules", "AdaMSS", model_type, DEFAULTS, "name the modules",
                            "target_modules: [q_proj, v_proj] for a Llama-like model")
        return cfg.model_copy(update={"target_modules": DEFAULTS[model_type]})

    @classmethod
    def wrap(cls, base: nn.Module, cfg: AdamssConfig, path: str) -> AdamssLinear:
        if kind := not_a_linear(base):
            raise refuse(path, kind)
        if is_quantized(base):
            raise refuse(path, "a 4-bit/8-bit (bitsandbytes) layer", quantized=True)
        kmeans()  # (before anything is built: also on the memory estimate's meta model, which clusters nothing)
        return AdamssLinear(base, cfg)

    @classmethod
    def layer_state(cls, layers: dict[str, AdapterLayer], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The file as it is, once each layer's subspaces have the row counts of its B tensors: the clustering is not
        in the file, and peft's loader would put rows in the wrong places where its own clustering differs."""
        from peftkit.adapters import PEFT_PREFIX

        for path, layer in layers.items():
            saved = [state[k].shape[0] for n in range(len(layer.adamss_B))
                     if (k := f"{PEFT_PREFIX}{path}.adamss_B.{n}") in state]
            check_rows(path, saved, [len(b) for b in layer.adamss_B])
            if (newb := state.get(f"{PEFT_PREFIX}{path}.adamss_newB")) is not None:
                check_projection(path, newb, layer.adamss_newB)
        return state

    @classmethod
    def base_facts(cls, facts: AdamssFacts, parts: dict[str, torch.Tensor], weight: torch.Tensor,
                   bias: torch.Tensor | None, path: str) -> AdamssFacts:
        """The placement of the subspaces' rows, from the clustering of the base weight merged into (as on loading)."""
        a, b, newb = adapter_parts(parts)
        if newb.shape[1] != weight.shape[1] + (bias is not None):
            raise PeftkitError(
                f"The adapter does not fit this model: its AdaMSS projection of '{path}' has {newb.shape[1]} columns "
                f"for a weight of {tuple(weight.shape)} {'with' if bias is not None else 'without'} a bias. It was "
                "trained on a different base model.")
        vt, u = decompose(with_bias(weight, bias), facts.r, facts.random_seed)
        rows = segments(u, facts.num_subspaces)
        check_rows(path, [len(t) for t in b], [len(g) for g in rows])
        check_projection(path, newb, vt)
        return AdamssFacts(placement(rows), facts.r, facts.num_subspaces, facts.random_seed)

    @classmethod
    def layer_facts(cls, cfg: AdamssConfig, path: str, fan_in_fan_out: bool) -> AdamssFacts:
        if fan_in_fan_out:
            raise refuse(path, "GPT-2's Conv1D")
        return AdamssFacts(None, cfg.r, cfg.num_subspaces, cfg.random_seed)

    @staticmethod
    def merge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: AdamssFacts) -> torch.Tensor:
        return weight + delta(parts, facts.order)[:, : weight.shape[1]].to(weight.device)

    @staticmethod
    def unmerge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: AdamssFacts) -> torch.Tensor:
        return weight - delta(parts, facts.order)[:, : weight.shape[1]].to(weight.device)

    @staticmethod
    def merge_bias(bias: torch.Tensor, parts: dict[str, torch.Tensor], facts: AdamssFacts) -> torch.Tensor | None:
        return bias + delta(parts, facts.order)[:, -1].to(bias.device)

    @staticmethod
    def unmerge_bias(bias: torch.Tensor, parts: dict[str, torch.Tensor], facts: AdamssFacts) -> torch.Tensor | None:
        return bias - delta(parts, facts.order)[:, -1].to(bias.device)

    @staticmethod
    def update_shape(parts: dict[str, torch.Tensor], facts: AdamssFacts) -> tuple[int | None, ...]:
        return sum(len(b) for b in adapter_parts(parts)[1]), None  # (in: with or without the bias column)

    @classmethod
    def to_peft(cls, cfg: AdamssConfig, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        return cls.peft_common(cfg, targets, base_name) | {
            "r": cfg.r, "num_subspaces": cfg.num_subspaces, "subspace_rank": cfg.subspace_rank,
            "init_weights": cfg.init_weights, "use_dynamic_rank": cfg.use_dynamic_rank,
            "svd_threshold": cfg.svd_threshold, "random_seed": cfg.random_seed,
        } | {key: getattr(cfg, key) for key in ASA_KEYS}

    @classmethod
    def from_peft(cls, peft: PeftAdamssConfig, config_file: Path) -> AdamssConfig:
        refuse_unsupported(peft, config_file, ())
        if peft.num_subspaces > MAX_SUBSPACES:
            raise PeftkitError(f"{config_file}: num_subspaces {peft.num_subspaces} is above the {MAX_SUBSPACES} "
                               "subspaces per layer peftkit reads.")
        asa = {key: getattr(peft, key) for key in ASA_KEYS} if peft.use_asa else {}
        return AdamssConfig(
            method="adamss", r=peft.r, num_subspaces=peft.num_subspaces, subspace_rank=peft.subspace_rank,
            init_weights="orthogonal" if peft.init_weights == "orthogonal" else None,
            use_dynamic_rank=peft.use_dynamic_rank, svd_threshold=peft.svd_threshold, random_seed=peft.random_seed,
            target_modules=targets_from_peft(peft.target_modules, config_file) if peft.target_modules else None,
            modules_to_save=peft.modules_to_save or [], **asa, **filters_from_peft(peft, config_file))

    @classmethod
    def trainer(cls, model: nn.Module, cfg: AdamssConfig, total_steps: int):
        """ASA's allocator, with use_asa (`peftkit.methods.adamss_trainer`)."""
        if not cfg.use_asa:
            return None
        from peftkit.methods.adamss_trainer import AsaTrainer

        return AsaTrainer(model, cfg)

    @classmethod
    def skips_parameters(cls, cfg: AdamssConfig) -> bool:
        return cfg.use_asa  # (the subspaces ASA freezes leave the graph: DDP must look for them)

    @classmethod
    def kept_for_backward(cls, cfg: AdamssConfig, layer: AdapterLayer) -> tuple[int, int]:
        # Per token: the input with its ones column, the projection (r), each subspace's rank-wide product, the
        # concatenated update (out); per layer: the fp32 factors cast to the weight's dtype (an upper bound).
        in_features, out_features = linear_shape(layer.base_layer)
        r = layer.adamss_newB.shape[0]
        ranks = sum(a.shape[0] for a in layer.adamss_A)
        return in_features + 1 + r + ranks + 2 * out_features, layer.adamss_newB.numel() + sum(
            p.numel() for p in layer.adapter_params().values())

    @classmethod
    def describe(cls, cfg: AdamssConfig) -> str:
        return f"AdaMSS r={cfg.r} num_subspaces={cfg.num_subspaces} subspace_rank={cfg.subspace_rank}"

    @classmethod
    def randomize(cls, layer: AdapterLayer, generator: torch.Generator, std: float) -> None:
        with torch.no_grad():  # A and B (V^T is the weight's)
            for p in [*layer.adamss_A, *layer.adamss_B]:
                p.copy_(torch.randn(p.shape, generator=generator).to(p.device) * std)


def check_rows(path: str, saved: list[int], clustered: list[int]) -> None:
    """Refuse a file whose subspaces' row counts (its B tensors') are not those of the clustering computed here."""
    if saved != clustered:
        raise PeftkitError(
            f"The AdaMSS adapter does not fit '{path}': its subspaces have {saved} rows (the file's adamss_B shapes) "
            f"where the clustering of this base weight gives {clustered}. The clustering is not saved: it is computed "
            "again from the base weight (KMeans over its randomized SVD, as peft does), so the adapter must be loaded "
            "on the base it was trained on, in the dtype it was trained in, with the settings of its adapter_config.json "
            "(r, num_subspaces, random_seed); a scikit-learn whose KMeans clusters otherwise gives this too. (peft "
            "would load it with rows in the wrong places.)")


def check_projection(path: str, saved: torch.Tensor, computed: torch.Tensor) -> None:
    """Warn where the file's V^T is not the decomposition computed here (each row up to its sign, within two units of
    the file dtype's last place): the adapter was decomposed from other weights or on another device (a GPU's
    svd_lowrank draws another projection), so this base's clustering, whose row counts agree, may not be the one it
    was trained with."""
    if saved.shape != computed.shape:
        return  # (the shapes' own check says so)
    saved, computed = saved.detach().float().cpu(), computed.detach().cpu().to(saved.dtype).float()
    signs = torch.where((saved * computed).sum(dim=1, keepdim=True) < 0, -1.0, 1.0)
    off = float((saved - signs * computed).abs().max())
    if off > max(2 * torch.finfo(saved.dtype).eps, 1e-5):
        warnings.warn(PeftkitWarning(
            f"The AdaMSS adapter's projection (adamss_newB) of '{path}' is {off:.3g} from the decomposition of this "
            "base weight: it was decomposed from other weights (another base or dtype) or on another device (a GPU's "
            "svd_lowrank draws another projection). Its rows are placed by this base's clustering, whose row counts "
            "agree, but which may not be the one it was trained with: load it on the base (and dtype) it was trained "
            "on."), stacklevel=3)


AdamssLinear.method = Adamss
