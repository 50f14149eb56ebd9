"""What the prompt family shares (prompt tuning, P-tuning, prefix tuning): virtual tokens that adapt the model as
a whole, not its layers.

The method installs one `VirtualTokens` module on the top-level causal LM (attribute `peftkit_virtual`) with a
forward pre-hook. On a fresh forward (no cache, or an empty one: training, evaluation, a cache-free reference) the
hook adds the method's n virtual tokens in front of every sequence, as peft's `PeftModelForCausalLM.forward` does:

    prompt tuning, P-tuning   inputs_embeds = [prompt; embed(input_ids)]   labels padded with -100, and the
                              first n logits cut off again, so callers see one logit per input token (or
                              the last `logits_to_keep` of them, as asked)
    prefix tuning             a `Cache` holding n key/value prefixes per layer (`Cache.update`, the public API)

In both the attention mask gets n ones in front, and with a mask the position ids are explicit: the mask's running
count minus one, so a left-padded row starts where an unpadded one does (n for the first real token, as peft's
default positions for an unpadded row). A forward with a non-empty cache is a later decoding step: it passes
through. Generation (`generation_inputs`) fills the cache with the virtual tokens first and hands `generate` the
mask with n ones in front; its cumulative-sum position ids then agree with the cache-free forward's. Where a KV cache
goes stale (dynamic RoPE or longrope past the switch: `peftkit.decoding`), each new token is a fresh forward instead.

What trains is a table (n, width) and, for P-tuning and a projected prefix, an encoder over it; what peft saves,
and peftkit exports, is its output, `prompt_embeddings`. These methods change no weight and cannot be merged.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field, field_validator
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.methods.base import Method, MethodTrainer, PeftConfigBase
from peftkit.methods.layer import AdapterLayer
from peftkit.section import AdapterSection, none_saved

ATTR = "peftkit_virtual"
PROMPT_KEY = "prompt_embeddings"
"""The one tensor peft saves for a prompt-learning adapter (no `base_model.model.` prefix)."""
IGNORE_INDEX = -100


class VirtualConfig(AdapterSection):
    """Settings every prompt-family method has."""

    num_virtual_tokens: int = Field(20, gt=0)
    """How many virtual tokens go in front of every sequence: each costs attention over n more positions."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Not supported by the prompt family (always empty)."""

    _none_saved = field_validator("modules_to_save")(lambda value: none_saved(
        value, "the prompt family trains its virtual tokens (and their encoder) only, not modules in full; remove "
        "adapter.modules_to_save, or use adapter.method: lora, which takes it"))


class VirtualPeftConfig(PeftConfigBase):
    """adapter_config.json fields of peft's `PromptLearningConfig`."""

    num_virtual_tokens: int = Field(gt=0)
    token_dim: int | None = Field(None, gt=0)
    num_transformer_submodules: int | None = 1
    num_attention_heads: int | None = None
    num_layers: int | None = None
    task_type: str | None = "CAUSAL_LM"


class VirtualTokens(nn.Module):
    """The model-level adapter: a trainable table (n, width), an optional encoder over it, and the hooks."""

    def __init__(self, method: type[VirtualMethod], table: torch.Tensor, encoder: nn.Module | None = None,
                 frozen: torch.Tensor | None = None) -> None:
        super().__init__()
        self.method = method
        self.table = nn.Parameter(table)
        self.encoder = encoder
        # Rows in front of the prompt that never train (Cartridge's attention sinks), saved with it.
        self.register_buffer("frozen", frozen, persistent=False)
        self.bypass = False
        self.task_ids: torch.Tensor | None = None  # this forward's per-row task ids, if it was given them
        self.strip = 0  # logits to cut off the front of this forward's output

    @property
    def num_virtual_tokens(self) -> int:
        return self.table.shape[0] + (0 if self.frozen is None else self.frozen.shape[0])

    def prompt(self) -> torch.Tensor:
        """(n, width): the table, or the encoder's output for it, after the frozen rows where there are some."""
        prompt = self.table if self.encoder is None else self.encoder(self.table)
        return prompt if self.frozen is None else torch.cat([self.frozen.to(prompt.dtype), prompt])

    def row_prompts(self, batch: int, task_ids: torch.Tensor | None) -> torch.Tensor:
        """(batch, n, width): each row's prompt. One for all rows here; multitask prompt tuning's depends on the
        row's task id (`task_ids`, which the other methods never get: `task_inputs`)."""
        return self.prompt().unsqueeze(0).expand(batch, -1, -1)

    def peft_state(self) -> dict[str, torch.Tensor]:
        return {PROMPT_KEY: self.prompt().detach().float().cpu().contiguous()}

    def load_peft_state(self, state: dict[str, torch.Tensor], encoder_restored: bool = False) -> None:
        """Take `prompt_embeddings` from a PEFT-keyed state dict. A module with an encoder whose output is not the
        saved prompt (a file peft or an earlier run wrote: it carries no encoder) drops the encoder and holds the
        prompt itself, as peft's inference mode does. Resuming a checkpoint restores the encoder first
        (`MethodTrainer.load_state_dict`) and says so (`encoder_restored`): the encoder is kept. Its output is the
        saved prompt, but under DeepSpeed's 16-bit modes only up to bf16 rounding: the checkpoint holds the
        optimizer's fp32 masters' output (`zero.masters`), the model runs their 16-bit copy."""
        saved, current = self.saved_prompt(state), self.prompt().detach()
        if self.encoder is not None:
            if encoder_restored or torch.allclose(current.float(), saved, rtol=1e-4, atol=1e-6):
                return
            self.encoder = None
            self.table = nn.Parameter(saved.clone(), requires_grad=self.table.requires_grad)
            return
        frozen = 0 if self.frozen is None else self.frozen.shape[0]
        with torch.no_grad():
            if frozen:
                self.frozen.copy_(saved[:frozen])
            self.table.copy_(saved[frozen:])

    def saved_prompt(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """`prompt_embeddings` of a PEFT-keyed state dict, fp32 on the table's device, checked to be all it holds and
        of this prompt's shape."""
        if set(state) != {PROMPT_KEY}:
            extra = sorted(set(state) - {PROMPT_KEY})
            raise PeftkitError(f"The adapter does not fit a {self.method.name} model: it should hold exactly "
                               f"'{PROMPT_KEY}'" + (f", not {extra[0]}" if extra else "") + ".")
        saved, current = state[PROMPT_KEY], self.prompt().detach()
        if tuple(saved.shape) != tuple(current.shape):
            raise PeftkitError(f"The adapter does not fit this model: {self.method.name} expects {PROMPT_KEY} of "
                               f"shape {tuple(current.shape)} but the adapter has {tuple(saved.shape)}. It was trained "
                               "on a different base model, or with another num_virtual_tokens.")
        return saved.to(self.table.device, torch.float32)

    @contextmanager
    def bypassed(self):
        """Forwards that run the model itself (generation's prefill of the virtual tokens)."""
        self.bypass = True
        try:
            yield
        finally:
            self.bypass = False

    def before_forward(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """The forward pre-hook: add the virtual tokens to a fresh forward (see the module docstring)."""
        self.strip = 0
        if "task_ids" in kwargs:  # never the model's own input: `task_inputs` gave it for this module
            kwargs = dict(kwargs)
            self.task_ids = kwargs.pop("task_ids")
        else:
            self.task_ids = None
        if self.bypass or cache_length(kwargs) > 0:
            return (args, kwargs) if self.task_ids is not None else None
        if len(args) > 1:
            raise PeftkitError(f"A {self.method.name} model takes its inputs by keyword (input_ids=..., attention_mask=...).")
        kwargs = dict(kwargs) | ({"input_ids": args[0]} if args else {})
        if kwargs.get("position_ids") is not None:
            raise PeftkitError(
                f"{self.method.title} puts its virtual tokens in front of each sequence; a batch with its own position "
                "ids (data.packing) would hide them from every packed example but the first. Set data.packing: false."
            )
        inputs = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
        batch, length = inputs.shape[0], inputs.shape[1]
        n = self.num_virtual_tokens
        mask = kwargs.get("attention_mask")
        if mask is not None:
            mask = torch.cat([mask.new_ones(batch, n), mask], dim=1)
            kwargs["attention_mask"] = mask
        self.method.add_virtual_tokens(self, model, kwargs, batch)
        if mask is not None:
            kwargs["position_ids"] = positions(mask)[:, -(length + self.strip):]
        keep = kwargs.get("logits_to_keep")
        if isinstance(keep, int) and 0 < keep <= length:  # the last `keep` logits, the input's own: none to cut
            self.strip = 0
        return (), kwargs

    def after_forward(self, model: nn.Module, args: tuple, output: Any) -> Any:
        """The forward hook: one logit per input token, as the caller gave them (the last `logits_to_keep`)."""
        if self.strip and getattr(output, "logits", None) is not None:
            output.logits = output.logits[:, self.strip:]
        self.strip = 0
        return output


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids from a 2-D attention mask: the count of real tokens before each (pads: 0)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def cache_length(kwargs: dict) -> int:
    """Tokens already in the forward's cache (`cache`, transformers 5's name, or `past_key_values`)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return 0 if cache is None else int(cache.get_seq_length())


def virtual_tokens(model: nn.Module) -> VirtualTokens | None:
    """The prompt-family adapter installed on `model`, if any."""
    module = getattr(model, ATTR, None)
    return module if isinstance(module, VirtualTokens) else None


def task_inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{'task_ids': ...} from a batch whose data has a `task` column, for a model whose method reads task ids
    (`VirtualMethod.reads_task_ids`, or layers that do: `peftkit.methods.task_routing`); {} otherwise (another method
    ignores the column)."""
    from peftkit.methods.task_routing import reads_layer_task_ids

    model = getattr(model, "module", model)  # DDP wraps the model in `.module`
    virtual = virtual_tokens(model)
    reads = reads_layer_task_ids(model) or (virtual is not None and virtual.method.reads_task_ids)
    return {"task_ids": batch["task_ids"]} if "task_ids" in batch and reads else {}


def install(model: nn.Module, module: VirtualTokens) -> VirtualTokens:
    """Put `module` on `model` (on its device) with its two hooks. The facts the export records (`model_dims`) are
    read now: a model without them is refused before training, not at the export after it."""
    model_dims(model.config)
    module.to(model.get_input_embeddings().weight.device)
    setattr(model, ATTR, module)
    module.hooks = [model.register_forward_pre_hook(module.before_forward, with_kwargs=True),
                    model.register_forward_hook(module.after_forward)]
    return module


def uninstall(model: nn.Module) -> VirtualTokens | None:
    """Take the prompt-family adapter off `model` (its attribute and its two hooks) and return it, to `install` again
    later (`peftkit.adapters.named` keeps one of several active); None when there is none."""
    module = virtual_tokens(model)
    if module is None:
        return None
    for hook in module.hooks:
        hook.remove()
    delattr(model, ATTR)
    return module


def generation_inputs(model: nn.Module, mask: torch.Tensor, task_ids: torch.Tensor | None = None) -> dict[str, Any]:
    """Extra `generate` arguments for a (left-padded) batch whose attention mask is `mask`: nothing for a model
    without virtual tokens; else the cache filled with them and the mask with n ones in front. `task_ids`: each
    row's task, for a method that reads them (multitask prompt tuning: only the prefill sees the prompt, so the
    task picks it there; the decoding steps that follow find it in the cache)."""
    virtual = virtual_tokens(model)
    if virtual is None:
        return {}
    batch, n = mask.shape[0], virtual.num_virtual_tokens
    tasks = {"task_ids": task_ids} if task_ids is not None and virtual.method.reads_task_ids else {}
    with torch.no_grad():
        cache = virtual.method.prefilled_cache(virtual, model, batch, **tasks)
    return {"attention_mask": torch.cat([mask.new_ones(batch, n), mask], dim=1), "cache": cache}


def text_config(model_config):
    """The decoder's config: a multimodal model's text config (Gemma 3's), else the config itself."""
    return model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config


def model_dims(model_config) -> dict[str, int]:
    """peft's `_prepare_prompt_learning_config` facts for a decoder-only model, read by the names peft reads, in its
    order: hidden size, heads, layers. A model whose config has none of a fact's names (Mamba has no attention heads)
    is a PeftkitError, where peft asks to specify it."""
    text = text_config(model_config)
    names = {"token_dim": ("hidden_size", "n_embd", "d_model"),
             "num_attention_heads": ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"),
             "num_layers": ("num_hidden_layers", "num_layers", "n_layer")}
    dims = {key: next((getattr(text, n) for n in pair if getattr(text, n, None)), None) for key, pair in names.items()}
    if missing := [key for key, value in dims.items() if value is None]:
        raise PeftkitError(f"The prompt family (prompt tuning, P-tuning, prefix tuning) records the model's "
                           f"{', '.join(missing)} in adapter_config.json, as peft, and this {text.model_type} model's "
                           f"config has no {' nor '.join('/'.join(names[key]) for key in missing)} (an attention-free "
                           "model, as Mamba); peft's prompt learning refuses it too. Use lora.")
    return dims


class VirtualMethod(Method):
    """The prompt family's side of the `Method` protocol: no layers, nothing to merge."""

    layer_targets: ClassVar[bool] = False
    mergeable: ClassVar[bool] = False
    param_names: ClassVar[tuple[str, ...]] = ()
    saved_beyond_trained: ClassVar[str] = "the prompt encoder's output: training's encoder is not saved"
    """Why the file holds other numbers than trained (`trained_params`), for `peftkit inspect`."""

    @classmethod
    def install(cls, model: nn.Module, cfg: Any) -> VirtualTokens:
        """Build the method's `VirtualTokens` for `model` and put it there."""
        raise NotImplementedError

    @classmethod
    def add_virtual_tokens(cls, virtual: VirtualTokens, model: nn.Module, kwargs: dict, batch: int) -> None:
        """Edit a fresh forward's `kwargs` (attention mask already extended) to carry the virtual tokens."""
        raise NotImplementedError

    @classmethod
    def prefilled_cache(cls, virtual: VirtualTokens, model: nn.Module, batch: int):
        """A `Cache` holding the virtual tokens' keys and values for `batch` rows (a method that `reads_task_ids`
        also takes `task_ids`, each row's task)."""
        raise NotImplementedError

    @classmethod
    def merge_refusal(cls, cfg: Any = None) -> str | None:
        return (f"A {cls.name} adapter cannot be merged: it adds virtual tokens in front of the input, not a change "
                "to any weight. Keep the adapter separate (set export.merged: false; skip `peftkit merge`) and use "
                "it: `peftkit generate` / `peftkit eval` with --adapter DIR (or the run directory), or peft's "
                "PeftModel.from_pretrained.")

    @classmethod
    def recipe_conflict(cls, recipe: Any) -> str | None:
        if recipe.data.packing:
            return (f"data.packing: {cls.name} puts its virtual tokens in front of each sequence, and a packed row "
                    "holds several; set data.packing: false")
        return None

    @classmethod
    def peft_common(cls, cfg: Any, targets: list[str], base_name: str) -> dict:
        return {"peft_type": cls.peft_type, "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
                "num_virtual_tokens": cfg.num_virtual_tokens, "num_transformer_submodules": 1,
                "modules_to_save": None, "inference_mode": True, "revision": None}

    @classmethod
    def model_facts(cls, cfg: Any, model_config) -> dict:
        """peft's facts, but `token_dim` the width of the input embeddings the prompt joins where the config says it
        differs from the hidden size (OPT-350m's `word_embed_proj_dim`, 512 beside 1024): peft's own rule takes the
        hidden size, whose prompt fails beside the embeddings in peft's forward, and a file saying it could not be
        loaded by peft (the saved prompt is as wide as the embeddings); given `token_dim`, peft builds that prompt."""
        width = getattr(text_config(model_config), "word_embed_proj_dim", None)
        return model_dims(model_config) | ({"token_dim": width} if width else {})

    @classmethod
    def check_peft(cls, peft: VirtualPeftConfig, config_file: Path) -> None:
        """Refuse what a decoder-only model cannot take: two transformer submodules (encoder-decoder models)."""
        if peft.num_transformer_submodules not in (None, 1):
            raise PeftkitError(f"{config_file}: num_transformer_submodules is {peft.num_transformer_submodules}; "
                               "peftkit applies prompt-learning adapters to decoder-only models (1).")
        if peft.modules_to_save:
            raise PeftkitError(f"{config_file}: 'modules_to_save' is set; peftkit's {cls.name} does not support it.")

    @classmethod
    def trainer(cls, model: nn.Module, cfg: Any, total_steps: int) -> MethodTrainer | None:
        virtual = virtual_tokens(model)
        return EncoderTrainer(virtual) if virtual is not None and virtual.encoder is not None else None

    @classmethod
    def kept_for_backward(cls, cfg: Any, layer: AdapterLayer) -> tuple[int, int]:
        return 0, 0

    @classmethod
    def describe(cls, cfg: Any) -> str:
        return f"{cls.title}, {cfg.num_virtual_tokens} virtual tokens"


class EncoderTrainer(MethodTrainer):
    """Keeps the encoder of P-tuning or a projected prefix in checkpoints: the adapter file holds only its output,
    from which the encoder cannot be recovered. `load_state_dict` runs before the adapter weights are loaded."""

    def __init__(self, virtual: VirtualTokens) -> None:
        self.virtual = virtual

    def state_dict(self) -> dict:
        return {name: p.detach().cpu().clone() for name, p in self.virtual.named_parameters()}

    def load_state_dict(self, state: dict) -> None:
        params = dict(self.virtual.named_parameters())
        if set(state) != set(params):
            raise PeftkitError(f"the checkpoint's {self.virtual.method.name} encoder has other tensors than this model's")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state[name])
