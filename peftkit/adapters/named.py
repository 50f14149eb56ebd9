"""Several named adapters on one base model: load, activate one (or none: the base), disable for a while,
delete; and mixed batches, where each row of one forward goes through its own adapter or the base.

    model, adapters, tok = load_named_model([("sql", "runs/sql/adapter"), ("chat", "runs/chat/adapter")])
    adapters.activate("sql")              # every forward now runs the sql adapter
    with adapters.disabled():             # the base, nothing unloaded
        ...
    with adapters.routed(["sql", None, "chat"]):  # one forward (or generate): row 0 sql, row 1 base, row 2 chat
        logits = model(input_ids=ids, attention_mask=mask).logits
    adapters.delete("chat")               # its layers and parameters are gone

Design. The single-adapter path (training, export, `load_adapted_model`) is not touched: it keeps one method
layer per target, wrapping the base layer. Here each adapter is loaded exactly as that path loads one (the same
`inject_adapters` and `load_adapter_state_dict`, on the model with every other adapter taken out), so each is its
own set of method layers, all wrapping the *same* frozen base layer objects; an `AdapterHost`
(`peftkit.adapters.host`) then takes the target's place in the model and holds the base layer and {name: that
adapter's layer}. Its forward runs the
active adapter's layer, or the base layer when none is active or the active adapter does not adapt this layer
(adapters may target different layers). A `modules_to_save` module is held the same way: a copy per adapter
with that adapter's weights, the base's own left as it was. Nothing is merged, so switching costs nothing.

HF peft instead keeps per-name dicts (`lora_A["name"]`) inside every layer of every model, even for one adapter
(`set_adapter`, `disable_adapter`, `delete_adapter`); that is the cost this design avoids for the common case.

Mixed batches, as peft's `adapter_names=` (`LoraLayer._mixed_batch_forward`): a host computes the base layer once
for the whole batch, then adds each row's adapter. Its LoRA linear adapters go in together, as S-LoRA/Punica's
batched kernels do: their A and B are stacked once per mixed batch (a lower rank zero-padded, exactly), each row
gathers its own, and two batched matmuls give every row its update, so the cost per layer does not grow with the
number of adapters (peft loops over them, one small matmul pair each). A LoRA embedding adds its update to its
rows; any other weight-update layer (DoRA, IA3, LoHa, LoKr, VeRA, OFT, AdaLoRA) and a `modules_to_save` copy
recompute their rows whole through their own forward (correct for every method, at the cost of the base rows
computed twice). Module adapters (bottleneck, Llama-Adapter: their blocks take more than one batch-first tensor)
and the prompt family (one module on the whole model, which changes the sequence length) cannot split a batch by
rows: a route naming one is refused. Mixed batches are for inference (peft refuses them in training mode too).

The prompt family keeps one adapter active at a time: each is its own `VirtualTokens` module, installed on the
model (`peftkit.methods.virtual.install`) while active and taken off otherwise.

Adapters must share the base: same recorded base_model_name_or_path (unless the caller names the base itself, as
`--model` does), at the same revision where both record one, and the same quantization; one trained for a sequence classifier is refused (its head is the
model's class). `peftkit.adapters.sharing` holds these checks.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from peftkit.adapters import inject_adapters, modules_to_save, saved_base_modules
from peftkit.adapters.arrow import ArrowLayer, ArrowSettings
from peftkit.adapters.host import AdapterHost, stackable
from peftkit.adapters.sharing import FirstAdapter, check_fits, refuse_alone
from peftkit.adapters.state_dicts import load_adapter_state_dict
from peftkit.errors import PeftkitError, did_you_mean
from peftkit.methods import method_of
from peftkit.methods.base import Method
from peftkit.methods.lora_layers import LoraLinear
from peftkit.methods.virtual import VirtualTokens, install, uninstall
from peftkit.peft_fields import check_weight_tying
from peftkit.peft_format import trained_base_biases
from peftkit.recipe import AdapterConfig, ModelConfig, QuantizationConfig

BASE_NAMES = ("", "base")
"""What a route names for a row that runs the base model (as does None)."""
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
"""What `--adapter NAME=DIR` takes (`peftkit.compare.split_named`): letters, digits, '_', '.' and '-'."""


@dataclass
class _Adapter:
    method: type[Method]
    directory: str
    paths: list[str] = field(default_factory=list)
    """The host paths this adapter has a module in."""
    virtual: VirtualTokens | None = None
    """A prompt-family adapter's module (installed on the model while active)."""


class NamedAdapters:
    """The named adapters of one base model (see the module docstring). Create it with `load_named_model`, or on a
    base model you loaded (`NamedAdapters(model)`) and then `load` each adapter.

    Args:
        model: the base model, without an adapter.
        base: the base's name when the caller chose it (`--model`): adapters recorded on other bases are then
            accepted as the caller says; None: every adapter must record the same base.
        quantization: how the base was loaded (bitsandbytes settings); every adapter must have been trained on
            that (a 4-bit base is re-quantized as its adapter was trained: `load_adapted_model`).
    """

    def __init__(self, model: nn.Module, base: str | None = None, quantization: QuantizationConfig | None = None) -> None:
        self.model = model
        self.base = base
        self.quantization = quantization
        self.active: str | None = None
        self._adapters: dict[str, _Adapter] = {}
        self._hosts: dict[str, AdapterHost] = {}
        self._first: FirstAdapter | None = None  # what the first adapter loaded says of the base

    @property
    def names(self) -> list[str]:
        """The loaded adapters, in loading order."""
        return list(self._adapters)

    def load(self, name: str, directory: str | Path) -> None:
        """Load the PEFT-format adapter in `directory` under `name` (inactive)."""
        from peftkit.peft_format import load_adapter

        self._check_new_name(name)
        self._add_read(name, str(directory), *load_adapter(directory))

    def _add_read(self, name: str, directory: str, cfg: AdapterConfig, state: dict[str, torch.Tensor], raw,
                  quant: QuantizationConfig | None) -> None:
        """`add` what `load_adapter` read from `directory`, once it is known to fit this base."""
        from peftkit.methods.expert_lists import on_fused_experts
        from peftkit.methods.lora_init import base_weight_of, on_original_base

        check_fits(self.model, name, directory, raw, quant, self._first, self.base, self.quantization)
        # peft's `bias: all` / `lora_only` saves the base's own biases, trained: loaded into the shared base layers,
        # they ran under the base's rows and every other adapter's too.
        if getattr(raw, "bias", "none") not in (None, "none") and (biases := trained_base_biases(cfg, state)):
            raise PeftkitError(f"Adapter {name!r} ({directory}) also trained the base's biases (bias: {raw.bias} in its "
                               f"adapter_config.json; {len(biases)} saved, e.g. {biases[0]}), which would change the "
                               "base the other adapters and the base's rows share; load it alone (--adapter DIR), or "
                               "merge it (`peftkit merge`).")
        if directory:
            check_weight_tying(directory, self.model)
        cfg, state = on_original_base(cfg, state, base_weight_of(self.model))  # peft's unconverted PiSSA/OLoRA
        cfg, state = on_fused_experts(cfg, state, self.model)  # transformers 4's per-expert LoRA
        self.add(name, cfg, state, directory)
        if self._first is None:
            self._first = FirstAdapter.of(name, directory, raw)

    def add(self, name: str, cfg: AdapterConfig, state: dict[str, torch.Tensor], directory: str = "") -> None:
        """Put an adapter given as settings and PEFT-keyed tensors (what `load_adapter` reads) under `name` (inactive)."""
        self._check_new_name(name)
        method = method_of(cfg)
        entry = _Adapter(method, directory)
        with self._bare(), _said_of(name, directory):
            if not method.layer_targets:
                try:
                    inject_adapters(self.model, cfg, every_entry=False, state=state, saved_only=True)
                    load_adapter_state_dict(self.model, state)
                finally:
                    entry.virtual = uninstall(self.model)
                params = list(entry.virtual.parameters())
            else:
                entry.paths = self._attach_layers(name, cfg, state)
                params = [p for path in entry.paths for n, p in self._hosts[path].adapters[name].named_parameters()
                          if not n.startswith("base_layer.")]
        for p in params:
            p.requires_grad_(False)
        self._adapters[name] = entry

    def activate(self, name: str | None) -> None:
        """Run every forward with adapter `name` from now on; None (or 'base'): the base model."""
        if self._routing():
            raise PeftkitError("A mixed batch (or Arrow routing) is on: it picks each row's (each token's) adapters, so "
                               "activate and disabled would change nothing inside its block. End the block first.")
        self._activate(name)

    def _routing(self) -> bool:
        """A `routed` or `arrow` block is on."""
        return any(host.routes is not None or host.arrow is not None for host in self._hosts.values())

    def _activate(self, name: str | None) -> None:
        name = None if name is None or name in BASE_NAMES else self._known(name)
        uninstall(self.model)
        for host in self._hosts.values():
            host.active = name
        if name is not None and (virtual := self._adapters[name].virtual) is not None:
            install(self.model, virtual)
        self.active = name

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the base model inside the block, nothing unloaded; the adapter active before is active again after."""
        previous = self.active
        self.activate(None)
        try:
            yield
        finally:
            self.activate(previous)

    def delete(self, name: str) -> None:
        """Unload adapter `name`: its modules leave the model (and their memory, once nothing else holds them); a
        layer no adapter adapts any more gets its plain base layer back."""
        entry = self._adapters[self._known(name)]
        if self._routing():  # the block's rows (tokens) of this adapter would run the base from here on
            raise PeftkitError(f"A mixed batch (or Arrow routing) is on: delete adapter {name!r} after its block ends.")
        if self.active == name:
            self.activate(None)
        with self._bare():
            for path in entry.paths:
                del self._hosts[path].adapters[name]
                if not len(self._hosts[path].adapters):
                    del self._hosts[path]  # its base layer is in the tree already
        del self._adapters[name]

    @contextmanager
    def routed(self, rows: Sequence[str | None]) -> Iterator[None]:
        """Forwards (and `generate`) inside the block are mixed batches: row i runs adapter `rows[i]` (None, '' or
        'base': the base model). The adapter active before is active again after."""
        if self.model.training:
            raise PeftkitError("A mixed batch is for inference: call model.eval() first (dropout would differ per row).")
        if any(host.arrow is not None for host in self._hosts.values()):
            raise PeftkitError("A mixed batch inside Arrow routing: end the `arrow` block first.")
        if any(host.routes is not None for host in self._hosts.values()):  # the inner block's end would end both
            raise PeftkitError("A mixed batch inside a mixed batch: blocks of `routed` do not nest; end the first one.")
        names = [None if r is None or r in BASE_NAMES else r for r in rows]
        for name in dict.fromkeys(n for n in names if n is not None):
            self._check_mixable(name)
        device = next(self.model.parameters()).device
        groups = [(name, torch.tensor([i for i, n in enumerate(names) if n == name], device=device))
                  for name in dict.fromkeys(n for n in names if n is not None)]
        previous = self.active
        self._activate(None)
        for host in self._hosts.values():
            host.route(len(names), groups)
        hook = self.model.register_forward_pre_hook(self._count_tokens, with_kwargs=True)
        try:
            yield
        finally:
            hook.remove()
            for host in self._hosts.values():
                host.route(len(names), None)
                host.tokens = None
            self._activate(previous)

    def _count_tokens(self, _model, args, kwargs) -> None:
        """Before each forward of a mixed batch: tell the hosts how many tokens a row has in it (`AdapterHost.tokens`)."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        ids = ids if ids is not None else kwargs.get("inputs_embeds")
        tokens = ids.shape[1] if ids is not None and ids.dim() >= 2 else None
        for host in self._hosts.values():
            host.tokens = tokens

    @contextmanager
    def arrow(self, tasks: Sequence[str], general: Sequence[str] = (), settings: ArrowSettings | None = None
              ) -> Iterator[None]:
        """Forwards (and `generate`) inside the block route each token, in every adapted layer, among the `tasks`
        adapters by Arrow (`peftkit.adapters.arrow`; with `general` adapters, GenKnowSub first): peft's
        `create_arrow_model`. Plain LoRA adapters on the same layers with the same rank, as peft requires; for
        inference. The adapter active before is active again after."""
        settings = settings or ArrowSettings()
        if self.model.training:
            raise PeftkitError("Arrow routing is for inference: call model.eval() first.")
        if any(host.arrow is not None or host.routes is not None for host in self._hosts.values()):
            raise PeftkitError("Arrow routing is on already (or a mixed batch is): blocks of either do not nest.")
        layers = self.check_arrow(tasks, general, settings)
        tasks, general = list(tasks), list(general)
        previous = self.active
        self._activate(None)
        for path, by_name in layers.items():
            self._hosts[path].arrow = ArrowLayer.build([by_name[n] for n in tasks], [by_name[n] for n in general],
                                                      settings)
        try:
            yield
        finally:
            for path in layers:
                self._hosts[path].arrow = None
            self._activate(previous)

    def check_arrow(self, tasks: Sequence[str], general: Sequence[str] = (), settings: ArrowSettings | None = None
                    ) -> dict[str, dict[str, LoraLinear]]:
        """Refuse what `arrow` cannot route (unknown names, no task adapter, other methods, layers or ranks) without
        routing: `peftkit eval --arrow` says so before it evaluates anything. Returns `_arrow_layers`."""
        settings = settings or ArrowSettings()
        tasks, general = [self._known(n) for n in tasks], [self._known(n) for n in general]
        if (not tasks or set(tasks) & set(general) or len(set(tasks)) < len(tasks)
                or len(set(general)) < len(general)):  # a general adapter named twice counted twice in the mean
            raise PeftkitError("Arrow routes among one or more task adapters, each named once, none of them also a "
                               f"general adapter (tasks: {', '.join(tasks) or 'none'}; general: "
                               f"{', '.join(general) or 'none'}).")
        if not 1 <= settings.top_k <= len(tasks) or not 0 < settings.temperature < math.inf:
            raise PeftkitError(f"Arrow's top_k is {settings.top_k} and its temperature {settings.temperature}: top_k "
                               f"takes 1 to {len(tasks)} (the task adapters), and the temperature is a finite number "
                               "above 0.")
        return self._arrow_layers(tasks + general)

    def _arrow_layers(self, names: list[str]) -> dict[str, dict[str, LoraLinear]]:
        """{layer path: {adapter: its LoRA layer}}: every adapter plain LoRA on the same layers with the same rank."""
        paths = {name: set(self._adapters[name].paths) for name in names}
        for name in names:
            if not paths[name] or self._adapters[name].virtual is not None:
                raise PeftkitError(f"Adapter {name!r} is a {self._adapters[name].method.title} adapter, not a LoRA on "
                                   "linear layers: Arrow routes those only (as peft's). Leave it out of the routing.")
            odd = next((p for p in paths[name] if not stackable(self._hosts[p].adapters[name])), None)
            if odd is not None:
                raise PeftkitError(f"Adapter {name!r} is not a plain LoRA on linear layers at '{odd}' "
                                   f"({type(self._hosts[odd].adapters[name]).__name__}): Arrow routes those only (as "
                                   "peft's). Leave it out of the routing.")
            if paths[name] != paths[names[0]]:
                other = sorted(paths[name] ^ paths[names[0]])[0]
                raise PeftkitError(f"Adapters {names[0]!r} and {name!r} adapt other layers (e.g. '{other}'): Arrow "
                                   "routes adapters of the same target modules (as peft's).")
        for path in sorted(paths[names[0]]):
            ranks = {name: self._hosts[path].adapters[name].r for name in names}
            if len(set(ranks.values())) > 1:
                raise PeftkitError(f"Arrow routes adapters of one rank (as peft's), and at '{path}' these differ: "
                                   f"{', '.join(f'{n} r={r}' for n, r in ranks.items())}.")
        return {p: {n: self._hosts[p].adapters[n] for n in names} for p in sorted(paths[names[0]])}

    # ------------------------------------------------------------------------------------------- internals

    def _known(self, name: str) -> str:
        if name not in self._adapters:
            loaded = ", ".join(self._adapters) or "none"
            raise PeftkitError(f"No adapter named {name!r} is loaded (loaded: {loaded}).{did_you_mean(name, self._adapters)}"
                               " Use one of those, or None / 'base' for the base model.")
        return name

    def _check_new_name(self, name: str) -> None:
        if name in BASE_NAMES or not _NAME.match(name):
            raise PeftkitError(f"Adapter name {name!r}: use letters, digits, _, . and - ('base' means the base model).")
        if name in self._adapters:
            raise PeftkitError(f"An adapter named {name!r} is already loaded (from {self._adapters[name].directory or 'memory'}); "
                               "give this one another name, or delete that one first.")

    def _check_mixable(self, name: str) -> None:
        method = self._adapters[self._known(name)].method
        if not method.mergeable:
            raise PeftkitError(
                f"Adapter {name!r} is {method.title} (method: {method.name}), which cannot serve a mixed batch: "
                + ("it adds virtual tokens to the whole batch" if not method.layer_targets else
                   "it computes outputs of its own beside the base's layers, which are not routed by row") +
                ". Mixed batches take weight-update adapters (LoRA, DoRA, IA3, LoHa, LoKr, VeRA, OFT, AdaLoRA); "
                f"run the rows for {name!r} apart, with adapters.activate({name!r}).")

    def _attach_layers(self, name: str, cfg: AdapterConfig, state: dict[str, torch.Tensor]) -> list[str]:
        """Inject the adapter into the bare model (its modules_to_save as copies), load its tensors, then move each
        new module into the host at its path and put the base module back in the tree."""
        refuse_alone(self.model, name, cfg)
        originals = modules_to_save(self.model, cfg.modules_to_save)
        for path, module in saved_base_modules(self.model, state).items():  # peft's file may hold more
            if not any(path == p or path.startswith(f"{p}.") for p in originals):
                originals[path] = module
        for path, module in originals.items():
            _replace(self.model, path, copy.deepcopy(module))
        targets: list[str] = []
        try:
            targets = inject_adapters(self.model, cfg, every_entry=False, state=state, saved_only=True)
            load_adapter_state_dict(self.model, state)
        except BaseException:
            for path in targets:
                _replace(self.model, path, self.model.get_submodule(path).base_layer)
            for path, module in originals.items():
                _replace(self.model, path, module)
            raise
        paths = []
        for path, base in [(t, None) for t in targets] + list(originals.items()):
            module = self.model.get_submodule(path)
            base = module.base_layer if base is None else base
            _replace(self.model, path, base)
            host = self._hosts.get(path) or self._hosts.setdefault(path, AdapterHost(base))
            host.adapters[name] = module
            paths.append(path)
        return paths

    @contextmanager
    def _bare(self) -> Iterator[None]:
        """The base model's own modules in the tree (hosts and the prompt adapter taken out) for the block."""
        # Outer hosts first out and last in: a module adapter's host (a whole MLP) may hold a LoRA host's layer,
        # whose path is then reached through the plain block.
        uninstall(self.model)
        for path in sorted(self._hosts, key=lambda p: p.count(".")):
            _replace(self.model, path, self._hosts[path].base_layer)
        try:
            yield
        finally:
            for path in sorted(self._hosts, key=lambda p: -p.count(".")):
                _replace(self.model, path, self._hosts[path])
            self._activate(self.active)


@contextmanager
def _said_of(name: str, directory: str) -> Iterator[None]:
    """An error of loading adapter `name`'s weights (which say "the adapter's ...", "adapter_config.json's ...") says
    which adapter, of the several a command loads, it is about."""
    try:
        yield
    except PeftkitError as e:
        if str(e).startswith(f"Adapter {name!r}"):
            raise
        raise PeftkitError(f"Adapter {name!r}{f' ({directory})' if directory else ''}: {e}") from None


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def load_named_model(adapters: Sequence[tuple[str, str]], base: str | ModelConfig | None = None,
                     device: torch.device | None = None, trust_remote_code: bool = False, tokenizer_of=None):
    """The base loaded once (as `load_adapted_model` loads it for the first adapter: re-quantized as it was trained)
    with every adapter on it by name, in eval mode, none active.

    Args:
        adapters: (name, adapter directory) pairs.
        base: the base model (a name, or a recipe's `model`: `peftkit.adapter_base.load_adapter_base`); default the
            adapters' recorded base_model_name_or_path (which must then agree).
        tokenizer_of: the base's tokenizers read so far (`peftkit.modeling.Tokenizers`: `ModelSource.tokenizers`),
            default a new one: as `load_adapted_model`'s.

    Returns:
        (model, NamedAdapters, tokenizer)
    """
    from peftkit.adapter_base import check_remote_code, load_adapter_base, warn_if_requantized
    from peftkit.modeling import Tokenizers

    if not adapters:
        raise PeftkitError("No adapters to load: give at least one (name, directory).")
    first_name, first_dir = adapters[0]
    tokenizer_of = tokenizer_of or Tokenizers()
    model, cfg, state, raw, model_cfg, quant = load_adapter_base(base, first_dir, device, trust_remote_code,
                                                                 tokenizer_of=tokenizer_of)
    named = NamedAdapters(model, model_cfg.name_or_path if base else None, quant)
    named._check_new_name(first_name)
    named._add_read(first_name, first_dir, cfg, state, raw, quant)
    for name, directory in adapters[1:]:
        check_remote_code(directory, trust_remote_code)
        named.load(name, directory)
        if quant is not None:  # the same quantization as the first's (`sharing.check_fits`), maybe not on the same device
            warn_if_requantized(directory, model)
    model.eval()
    return model, named, tokenizer_of(model_cfg)
