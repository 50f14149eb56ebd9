"""X-LoRA (Buehler & Buehler 2024, "X-LoRA: Mixture of Low-Rank Adapter Experts", arXiv:2402.07148; peft 0.21.2's
XLoraConfig/XLORA): several trained LoRA adapters (the experts, `adapters`) stay frozen; a small classifier reads
the model's last hidden state and weighs each expert per token (and per adapted layer with `layerwise_scalings`).
Only the classifier trains.

Every forward of the model is two, as peft's (`_enable_peft_forward_hooks`): a *scalings pass* without gradients in
which every expert's input is scaled by `scaling_pass_value` (0 by default: the base model), whose last hidden state
(`output_hidden_states`, the final norm's output) the classifier turns into scalings s (batch, seq, layers, experts),
softmaxed over the experts (`enable_softmax`, at `softmax_temperature`); then the real pass, in which layer l adds

    sum_i  B_i A_i dropout_i(x * s[..., l, i]) * scaling_i * global_scaling_weight

to its base output (peft's order of operations: one product per expert, in expert order, added to the base output).
`top_k_lora` keeps each token's k largest scalings of a layer (the others 0), and `enable_softmax_topk` softmaxes
those k. The classifier is peft's: one Linear (hidden -> experts, or experts x layers) at `xlora_depth` 1, else
Linear -> ReLU (-> Dropout) repeated with `xlora_size` units; in the base model's dtype, as peft's. A layer is
numbered by its place among all the layers any expert adapts, in model order (peft's `convert_layers_to_xlora`).

The experts are peft's LoRA adapters (peftkit's export, or peft's), read from their directories: plain LoRA on
Linear and Conv1D layers (DoRA, which peft refuses in its X-LoRA forward too, lora_bias, embeddings and LoRA's
variants are refused). peft 0.21.2 names them by position ("0", "1", ...: other names fail in its
disable_adapter_layers with a KeyError), so the recipe's `adapters` must too.

Saved as peft loads it: adapter_config.json (peft_type XLORA, `adapters` the experts as peft loads them: a local one's
directory, a hub one's id, `xlora_experts.loadable`; the classifier's settings) and adapter_model.safetensors with the
classifier alone, `base_model.internal_xlora_classifier.layers.<i>.weight/.bias` (nn.Sequential's indices: 0 and 3 at
depth 2 with dropout); and a copy of each expert, in the subdirectory of its name (`XLora.save_sources`), which
peftkit.json names relative to the export: peftkit reads the copies wherever the directory moves. peft 0.21.2 reads the
experts where `adapters` says (its `adapters=` argument to PeftModel.from_pretrained is overridden by the file's): pass
it `config=` with `adapters` set to the copies. peft 0.21.2's own save_pretrained leaves the classifier's first layer
out of that file (its adapter-name filter drops `layers.0.`, taking it for the expert "0") and writes it to the
subfolder 0/ as `layers.weight/.bias`, beside the whole base model under lora_ keys, so that peft's own reload draws a
new one: peftkit reads it from there (`_first_layer_saved_apart`), and refuses a file short of a classifier tensor found
nowhere, naming it.

Not mergeable (the scalings change per token); generation runs without the KV cache, as peft's (the scalings pass
needs the whole sequence each step).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, PrivateAttr, field_validator, model_validator
from torch import nn
from torch.nn import functional as F

from peftkit.errors import PeftkitError
from peftkit.methods.base import REEXPORT, Method, PeftConfigBase
from peftkit.methods.layer import AdapterLayer, linear_shape
from peftkit.methods.xlora_classifier import Scalings, XLoraClassifier
from peftkit.methods.xlora_experts import copied_experts, loadable, peft_expert, warn_of_hub_subfolders
from peftkit.section import AdapterSection

CLASSIFIER = "internal_xlora_classifier"
"""peft's attribute name of the classifier, and its file's key prefix (`base_model.internal_xlora_classifier.`)."""


class XLoraConfig(AdapterSection):
    """X-LoRA: a trained classifier weighs frozen LoRA experts per token."""

    method: Literal["xlora"]
    adapters: dict[str, str]
    """The LoRA experts' directories (peftkit's exports or peft's), by position: {"0": DIR, "1": DIR, ...}; relative
    to the recipe's directory."""
    hidden_size: int | None = Field(None, ge=1)
    """The width the classifier reads: the base's hidden size (null: read from the model; set, it must match)."""
    enable_softmax: bool = True
    """Softmax the classifier's outputs over the experts."""
    enable_softmax_topk: bool = False
    """Softmax each token's top_k_lora scalings of a layer (the others stay 0)."""
    layerwise_scalings: bool = False
    """The classifier gives each adapted layer its own scalings (else one set for all the layers)."""
    xlora_depth: int = Field(1, ge=1)
    """Linear layers in the classifier."""
    xlora_size: int = Field(2048, ge=1)
    """Width of the classifier's hidden layers (with xlora_depth > 1)."""
    xlora_dropout_p: float = Field(0.2, ge=0.0, lt=1.0)
    """Dropout after each hidden layer of the classifier (with xlora_depth > 1)."""
    use_trainable_adapters: Literal[False] = False
    """peft's option to train the experts too; peftkit keeps them frozen (train a LoRA adapter for that)."""
    softmax_temperature: float = Field(1.0, gt=0)
    top_k_lora: int | None = Field(None, ge=1)
    """Keep each token's k largest scalings per layer (null: all the experts)."""
    scaling_pass_value: float = 0.0
    """Every expert's scaling in the scalings pass (0: the classifier reads the base model's hidden states)."""
    global_scaling_weight: float = 1.0
    """Multiplies every expert's output in the real pass."""

    _experts: list | None = PrivateAttr(None)
    _targets: list[list[str]] = PrivateAttr(default_factory=list)
    """Each expert's adapted layers, in model order (`XLora.select_targets`)."""

    @field_validator("adapters")
    @classmethod
    def _by_position(cls, adapters: dict[str, str]) -> dict[str, str]:
        if not adapters:
            raise ValueError("is empty; list the LoRA experts' directories as {\"0\": DIR, \"1\": DIR, ...}")
        if list(adapters) != [str(i) for i in range(len(adapters))]:
            raise ValueError(f"names its experts {', '.join(map(repr, adapters))}; X-LoRA's experts are named by "
                             f"position, '0' to '{len(adapters) - 1}' in order (peft 0.21.2 indexes them so and fails "
                             "on other names). Rename the keys")
        return adapters

    @model_validator(mode="after")
    def _top_k_of_the_experts(self) -> XLoraConfig:
        if self.top_k_lora is not None and self.top_k_lora > len(self.adapters):
            raise ValueError(f"top_k_lora is {self.top_k_lora}, and adapter.adapters lists {len(self.adapters)} "
                             f"experts; keep at most {len(self.adapters)} (or null for all)")
        return self

    @property
    def modules_to_save(self) -> list[str]:
        return []  # only the classifier trains


class PeftXLoraConfig(PeftConfigBase):
    """peft's XLoraConfig fields (its defaults: hidden_size 4096 where left out, as peft sets it)."""

    adapters: dict[str, str] = Field(default_factory=dict)
    hidden_size: int = Field(4096, ge=1)
    enable_softmax: bool = True
    enable_softmax_topk: bool = False
    layerwise_scalings: bool = False
    xlora_depth: int = Field(1, ge=1)
    xlora_size: int = Field(2048, ge=1)
    xlora_dropout_p: float = Field(0.2, ge=0.0, lt=1.0)
    use_trainable_adapters: bool = False
    softmax_temperature: float = Field(1.0, gt=0)
    top_k_lora: int | None = Field(None, ge=1)
    scaling_pass_value: float = 0.0
    global_scaling_weight: float = 1.0


class XLoraLayer(AdapterLayer):
    """One layer the experts adapt: its base and the experts' LoRA layers there (`experts`, by position), added at
    the scalings of the forward. The first adapted layer also holds the classifier (saved under peft's name)."""

    def __init__(self, base_layer: nn.Module, number: int) -> None:
        super().__init__(base_layer)
        self.facts = None
        self.number = number
        self.experts = nn.ModuleDict()
        self.scalings: Scalings | None = None

    def add_expert(self, position: int, layer: AdapterLayer) -> None:
        """Hold `layer` (an expert's LoRA layer on this base, which it keeps outside its module tree: the base is
        this layer's), frozen."""
        base = layer._modules.pop("base_layer")
        object.__setattr__(layer, "base_layer", base)
        layer.requires_grad_(False)
        self.experts[str(position)] = layer

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        previous = x.dtype
        s = self.scalings.of_layer(self.number)
        result = self.base_layer(x, *args, **kwargs)
        for position, expert in self.experts.items():
            x = x.to(expert.lora_A.weight.dtype)
            if s is not None:
                x_mod, weight = x * s[:, :, int(position)].unsqueeze(-1), self.scalings.cfg.global_scaling_weight
            else:
                x_mod, weight = x, 1
            # (F.linear, as peft's nn.Linear: LowRankLinear's CPU products are summed in another order)
            after_a = F.linear(expert.lora_dropout(x_mod), expert.lora_A.weight)
            result += F.linear(after_a, expert.lora_B.weight) * expert.scaling * weight
        return result.to(previous)


def _experts(cfg: XLoraConfig) -> list:
    """The experts `cfg.adapters` names, read (weights included) and checked once."""
    if cfg._experts is None:
        from peftkit.methods.fusion_sources import _read_dir, check_same_base

        cfg._experts = [_read_dir(path, f"adapter.adapters['{name}']", "of the LoRA experts",
                                  "X-LoRA reads its experts as saved") for name, path in cfg.adapters.items()]
        for name, expert in zip(cfg.adapters, cfg._experts):
            _check_expert(expert, f"adapter.adapters['{name}']")
        check_same_base(cfg._experts, "adapter.adapters", "X-LoRA weighs experts", lambda i: f"adapter.adapters['{i}']")
    return cfg._experts


def _check_expert(expert, where: str) -> None:
    """A plain LoRA adapter on linear layers: what peft's X-LoRA layers compute."""
    c = expert.cfg
    if expert.method.name != "lora":
        raise PeftkitError(f"{where}: {expert.source} is a {expert.method.title} adapter; X-LoRA's experts are LoRA "
                           "adapters (method: lora). Train LoRA experts first.")
    refused = {"use_dora": "DoRA (peft's X-LoRA refuses it too)", "lora_bias": "a trained bias (lora_bias)",
               "modules_to_save": "whole modules (modules_to_save)",
               "target_parameters": "parameters (target_parameters)",
               "trainable_token_indices": "embedding rows (trainable_token_indices)",
               "alora_invocation_tokens": "aLoRA's invocation", "velora_config": "VeLoRA",
               "kasa_config": "KaSA", "use_bdlora": "block-diagonal factors (use_bdlora)",
               "layer_replication": "replicated layers (layer_replication)"}
    for key, what in refused.items():
        if getattr(c, key, None):
            raise PeftkitError(f"{where}: {expert.source} has {what}, which X-LoRA does not weigh per token. Use "
                               f"plain LoRA experts (train them without {key}).")


class XLora(Method):
    name = "xlora"
    title = "X-LoRA"
    peft_type = "XLORA"
    config = XLoraConfig
    peft_config = PeftXLoraConfig
    param_names = ("experts", CLASSIFIER)
    mergeable = False
    targets_in_config = False
    alone = ("its scalings pass runs over the whole model before each forward and weighs the experts per token, "
             "which named adapters cannot switch or route rows to")

    @classmethod
    def merge_refusal(cls, cfg: Any = None) -> str | None:
        return ("X-LoRA adapters (method: xlora) weigh their LoRA experts per token by a classifier, so no single "
                "weight holds them: they cannot be merged into a plain model. Keep the adapter separate: set "
                "export.merged: false (or skip `peftkit merge`) and use it with `peftkit eval/generate --adapter DIR`; "
                "or merge one expert, a LoRA adapter, on its own.")

    @classmethod
    def select_targets(cls, model: nn.Module, cfg: XLoraConfig, every_entry: bool) -> list[str]:
        """Every layer any expert adapts, in model order (peft's layer numbering)."""
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        adapted: set[str] = set()
        cfg._targets = []
        for i, expert in enumerate(_experts(cfg)):
            expert.cfg = expert.method.resolve(expert.cfg, model_type)
            paths = expert.method.select_targets(model, expert.cfg, False)
            for path in paths:
                if isinstance(model.get_submodule(path), nn.Embedding):
                    raise PeftkitError(f"adapter.adapters['{i}']: {expert.source} adapts the embedding '{path}'; "
                                       "peftkit's X-LoRA weighs experts on linear layers only. Use experts trained "
                                       "without embeddings in target_modules.")
            adapted |= set(paths)
            cfg._targets.append(paths)
        order = {n: i for i, (n, _) in enumerate(model.named_modules())}
        return sorted(adapted, key=order.__getitem__)

    @classmethod
    def wrap(cls, base: nn.Module, cfg: XLoraConfig, path: str) -> XLoraLayer:
        return XLoraLayer(base, -1)  # numbered, given its experts and the classifier by link_layers

    @classmethod
    def link_layers(cls, model: nn.Module, cfg: XLoraConfig, layers: dict[str, AdapterLayer]) -> None:
        """The experts' layers, expert after expert, each over its targets in model order, then the classifier: the
        order peft builds them in, so one seed draws peft's classifier (the experts' draws are overwritten by their
        weights). Then the scalings pass before each forward, and generation without the cache."""
        from peftkit.methods.fusion_sources import copy_weights

        for number, layer in enumerate(layers.values()):
            layer.number = number
        for i, (expert, paths) in enumerate(zip(_experts(cfg), cfg._targets)):
            for path in paths:
                if path in layers:
                    lora = expert.method.wrap(layers[path].base_layer, expert.cfg, path)
                    if expert.state is not None:
                        copy_weights(lora, expert, path)
                    layers[path].add_expert(i, lora)
        hidden = _hidden_size(model, cfg)
        first = next(iter(layers.values()))
        shared = Scalings(cfg)
        device = first.base_layer.weight.device
        shared.classifier = XLoraClassifier(cfg, hidden, len(cfg.adapters), len(layers),
                                            next(model.parameters()).dtype, device)
        first.add_module(CLASSIFIER, shared.classifier)
        for layer in layers.values():
            layer.scalings = shared
        model.register_forward_pre_hook(shared.model_hook, with_kwargs=True)
        _generate_without_cache(model)


    @classmethod
    def to_peft(cls, cfg: XLoraConfig, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        """peft's XLoraConfig fields: no target_modules (the experts' configs say theirs)."""
        settings = cfg.model_dump(exclude={"method", "init_from", "adapters"})
        return {"peft_type": cls.peft_type, "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
                "inference_mode": True, "revision": None,
                "adapters": {n: loadable(p) for n, p in cfg.adapters.items()}} | settings

    @classmethod
    def model_facts(cls, cfg: XLoraConfig, model_config: Any) -> dict:
        """hidden_size, the width the classifier reads (peft's config holds it): the model's."""
        from peftkit.methods.virtual import text_config

        config = text_config(model_config)
        return {"hidden_size": cfg.hidden_size or getattr(config, "hidden_size", None) or config.n_embd}

    @classmethod
    def from_peft(cls, peft: PeftXLoraConfig, config_file: Path) -> XLoraConfig:
        if peft.use_trainable_adapters:
            raise PeftkitError(f"{config_file}: use_trainable_adapters is true: the experts were trained with the "
                               "classifier, and their trained weights are not in this file (peft saves the "
                               "classifier only). peftkit's X-LoRA keeps the experts frozen.")
        where = Path(config_file).parent
        adapters = copied_experts(where, peft.adapters, config_file) or {
            n: peft_expert(n, p, config_file) for n, p in peft.adapters.items()}
        try:
            return XLoraConfig(method="xlora", adapters=adapters, **peft.model_dump(
                include=set(XLoraConfig.model_fields) - {"method", "adapters", "use_trainable_adapters"}))
        except ValueError as e:
            raise PeftkitError(f"{config_file}: {e}. {REEXPORT}") from None

    @classmethod
    def to_peft_file(cls, state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
        """The classifier alone, under peft's keys (the experts are in their own directories)."""
        marker = f".{CLASSIFIER}."
        return {f"base_model.{CLASSIFIER}.{k.partition(marker)[2]}": t for k, t in state.items() if marker in k}

    @classmethod
    def from_peft_file(cls, state: dict[str, torch.Tensor], peft: Any, file: Path) -> dict[str, torch.Tensor]:
        """The classifier as peft's file holds it, its first layer taken from the subfolder 0/ where peft 0.21.2's
        save_pretrained puts it (`_first_layer_saved_apart`); a file short of any of its tensors is refused."""
        top = f"base_model.{CLASSIFIER}."
        if any(f".{CLASSIFIER}." in k and not k.startswith(top) for k in state):
            return state  # (a training checkpoint's: under the first layer)
        expected = _classifier_keys(peft)
        if missing := expected - set(state):
            state = state | _first_layer_saved_apart(file.parent, missing)
        if missing := sorted(expected - set(state)):
            raise PeftkitError(
                f"{file} lacks the X-LoRA classifier's {', '.join(missing)}: peft 0.21.2's save_pretrained drops a "
                "key holding '.<expert name>.' (its filter of the other adapters' tensors), so it writes the first "
                "layer (layers.0) to the subfolder 0/ as layers.weight/.bias (read from there where it is) and loses "
                "any layers.<n> with an expert named n. Save the classifier's tensors under these keys (peft's "
                "model.state_dict() holds them), or train it with peftkit.")
        return state

    @classmethod
    def layer_state(cls, layers: dict[str, AdapterLayer], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """peft's file (the classifier alone) as the layers hold it: the classifier under the first layer, and the
        experts' tensors (read from their own directories) as the layers hold them."""
        from peftkit.adapters import PEFT_PREFIX

        top = f"base_model.{CLASSIFIER}."
        if not any(k.startswith(top) for k in state):
            return state
        first = next(iter(layers))
        out = {f"{PEFT_PREFIX}{first}.{CLASSIFIER}.{k[len(top):]}" if k.startswith(top) else k: t
               for k, t in state.items()}
        for path, layer in layers.items():
            for name, p in layer.adapter_params().items():
                if name.startswith("experts."):
                    out.setdefault(f"{PEFT_PREFIX}{path}.{name}", p.detach())
        return out

    @classmethod
    def source_dirs(cls, cfg: XLoraConfig) -> dict[str, str]:
        return {f"adapter.adapters['{name}']": path for name, path in cfg.adapters.items()}

    @classmethod
    def save_sources(cls, cfg: XLoraConfig, directory: Path) -> dict:
        """A copy of each expert in the export, in the subdirectory of its name (`0/`, `1/`: where peft looks for them
        in a hub repository), its directory's files byte for byte: what the classifier was trained with, wherever the
        export moves and whatever becomes of the experts' own directories. peftkit.json's `experts` names the copies
        relative to the export, and peftkit reads them (`copied_experts`); adapter_config.json's `adapters` still
        records the experts as the recipe names them (where peft looks by default: `loadable`)."""
        import shutil

        warn_of_hub_subfolders(cfg.adapters)
        for name, source in cfg.adapters.items():
            (directory / name).mkdir()
            for file in sorted(Path(source).iterdir()):
                if file.is_file():  # (an expert is read from its directory's own files)
                    shutil.copyfile(file, directory / name / file.name)
        return {"experts": {name: name for name in cfg.adapters}}

    @classmethod
    def check_sources(cls, cfg: XLoraConfig, recipe: Any, model: nn.Module, commit: str | None) -> None:
        """The experts were trained on the recipe's base: its name, commit and RoPE scaling (AdapterFusion's checks),
        and the 4-bit/8-bit weights they were trained against where they were (the same quantization section, from
        the same dtype); experts trained unquantized may be weighed over a quantized base (X-LoRA over NF4)."""
        from peftkit.methods import fusion_sources as sources

        experts, where = _experts(cfg), {"section": "adapter.adapters", "who": "X-LoRA"}
        sources.check_model(experts, model, **where)
        sources.check_commit(experts, recipe.model.name_or_path, recipe.model.revision, commit, **where)
        sources.check_rope(experts, recipe.model.rope_scaling, **where)
        device = next(model.parameters()).device.type
        sources.check_quantization(experts, recipe.quantization, recipe.model.dtype,
                                   None if device == "meta" else device, **where, quantized_base_allowed=True)

    @classmethod
    def recipe_conflict(cls, recipe: Any) -> str | None:
        if recipe.adapter.init_from:  # (a classifier task: refused before, by recipe.combinations.check_task)
            return ("adapter.init_from: an X-LoRA starts from the experts adapter.adapters lists (and a new "
                    "classifier); remove init_from")
        return None

    @classmethod
    def layer_facts(cls, cfg: Any, path: str, fan_in_fan_out: bool) -> None:
        return None

    @classmethod
    def kept_for_backward(cls, cfg: XLoraConfig, layer: AdapterLayer) -> tuple[int, int]:
        """Per token: each expert's input and scaling (x * s keeps both for s's gradient; its frozen factors keep
        nothing more) and its dropout mask (1 byte: a quarter of an fp32 value); on the first layer the classifier's
        too: the hidden state, each hidden layer's output and dropout mask, the logits and the two softmaxes'."""
        if not isinstance(layer, XLoraLayer):
            return 0, 0
        width = linear_shape(layer.base_layer)[0]
        per_token = sum(width + 1 + (width // 4 + 1 if not isinstance(e.lora_dropout, nn.Identity) else 0)
                        for e in layer.experts.values())
        if layer.number == 0:
            hidden = cfg.xlora_size + (cfg.xlora_size // 4 + 1 if cfg.xlora_dropout_p else 0)
            classifier = layer.scalings.classifier
            per_token += (classifier.layers[0].in_features + (cfg.xlora_depth - 1) * hidden
                          + 3 * len(cfg.adapters) * classifier.n_layers)
        return per_token, 0

    @classmethod
    def describe(cls, cfg: XLoraConfig) -> str:
        return f"{cls.title} of {len(cfg.adapters)} LoRA experts"

    @classmethod
    def randomize(cls, layer: AdapterLayer, generator: torch.Generator, std: float) -> None:
        """The classifier moved (the experts keep their trained weights)."""
        with torch.no_grad():
            for name, p in layer.adapter_params().items():
                if name.startswith(CLASSIFIER):
                    p.copy_(torch.randn(p.shape, generator=generator) * std)


def _classifier_keys(peft: PeftXLoraConfig) -> set[str]:
    """The keys of the classifier of adapter_config.json `peft` in peft's file: nn.Sequential's indices of its Linear
    layers (each hidden one followed by a ReLU and, with xlora_dropout_p, a Dropout)."""
    step = 3 if peft.xlora_dropout_p > 0 else 2
    return {f"base_model.{CLASSIFIER}.layers.{i * step}.{t}" for i in range(peft.xlora_depth)
            for t in ("weight", "bias")}


def _first_layer_saved_apart(directory: Path, missing: set[str]) -> dict[str, torch.Tensor]:
    """The classifier's first layer where peft 0.21.2's save_pretrained writes it (with an expert named '0': always):
    `0/adapter_model.safetensors`, as `base_model.internal_xlora_classifier.layers.weight/.bias` (its adapter-name
    removal turns `.0` into nothing), beside the whole base model's weights. {} where it is not there."""
    import warnings

    from safetensors import safe_open

    from peftkit.errors import PeftkitWarning

    file = directory / "0" / "adapter_model.safetensors"
    wanted = {f"base_model.{CLASSIFIER}.layers.{t}": f"base_model.{CLASSIFIER}.layers.0.{t}"
              for t in ("weight", "bias")}
    if not file.is_file() or not set(wanted.values()) & missing:
        return {}
    with safe_open(file, "pt") as f:
        found = {wanted[k]: f.get_tensor(k) for k in f.keys() if k in wanted}  # noqa: SIM118 (safe_open is no dict)
    if found:
        warnings.warn(PeftkitWarning(f"{directory}: the X-LoRA classifier's first layer is read from {file}, where "
                                     "peft 0.21.2's save_pretrained puts it."), stacklevel=4)
    return found


def _hidden_size(model: nn.Module, cfg: XLoraConfig) -> int:
    from peftkit.methods.virtual import text_config

    config = text_config(model.config)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if cfg.hidden_size is not None and hidden is not None and cfg.hidden_size != hidden:
        raise PeftkitError(f"adapter.hidden_size is {cfg.hidden_size}, and this model's hidden size is {hidden}: the "
                           "classifier reads its hidden states. Set hidden_size to it (or leave it out).")
    return cfg.hidden_size or hidden


def _generate_without_cache(model: nn.Module) -> None:
    """`model.generate` with use_cache=False, as peft's XLoraModel.generate: each step's scalings pass reads the
    whole sequence."""
    generate = model.generate

    def without_cache(*args, **kwargs):
        return generate(*args, **(kwargs | {"use_cache": False}))

    model.generate = without_cache


for _layer in (XLoraLayer,):
    _layer.method = XLora
