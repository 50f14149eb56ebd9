"""X-LoRA's classifier (peft's XLoraClassifier) and the scalings it gives the adapted layers of one model: the
scalings pass run before each forward of the model, and each layer's share of it (top-k, softmax), as peft's
`_pre_forward` and `get_maybe_topk_scalings`. The method around them: peftkit.methods.xlora."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.methods.base import draw_device

if TYPE_CHECKING:
    from peftkit.methods.xlora import XLoraConfig


class XLoraClassifier(nn.Module):
    """peft's XLoraClassifier: hidden states (batch, seq, hidden) -> scalings (batch, seq, layers, experts). Its
    modules and their order (hence the init a seed draws and the state-dict names) are peft's."""

    def __init__(self, cfg: XLoraConfig, hidden: int, experts: int, layers: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.cfg, self.experts, self.n_layers = cfg, experts, layers
        out = experts * layers if cfg.layerwise_scalings else experts
        where = draw_device(device)  # drawn in fp32 on the CPU, then moved and cast, as peft's `.to(device).to(dtype)`
        modules: list[nn.Module] = []
        width = hidden
        for _ in range(cfg.xlora_depth - 1):
            modules += [nn.Linear(width, cfg.xlora_size, device=where), nn.ReLU()]
            modules += [nn.Dropout(cfg.xlora_dropout_p)] if cfg.xlora_dropout_p > 0 else []
            width = cfg.xlora_size
        self.layers = nn.Sequential(*modules, nn.Linear(width, out, device=where)).to(device).to(dtype)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        batch, seq = hidden.shape[:2]
        logits = self.layers(hidden)
        if not self.cfg.layerwise_scalings:
            logits = logits.unsqueeze(2).expand(-1, -1, self.n_layers, -1)
        scalings = logits.reshape(batch, seq, self.n_layers, self.experts)
        if self.cfg.enable_softmax:
            scalings = torch.softmax(scalings / self.cfg.softmax_temperature, dim=-1)
        return scalings

    def dummy(self, batch: int, seq: int, device: torch.device) -> torch.Tensor:
        """The scalings pass's scalings: every one `scaling_pass_value`, in the classifier's dtype (peft's)."""
        return torch.full((batch, seq, self.n_layers, self.experts), self.cfg.scaling_pass_value,
                          device=device, dtype=self.layers[-1].weight.dtype)


class Scalings:
    """What the adapted layers of one model share: the classifier and the scalings of the forward running."""

    def __init__(self, cfg: XLoraConfig) -> None:
        self.cfg = cfg
        self.classifier: XLoraClassifier | None = None
        self.current: torch.Tensor | None = None
        """(batch, seq, layers, experts), set by the model's pre-forward hook; kept after it (a checkpointed
        layer's recomputation in backward reads it), as peft keeps its latest."""
        self.in_scalings_pass = False

    def model_hook(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        """The scalings pass, run before each forward of the model (peft's `_pre_forward`)."""
        if self.in_scalings_pass:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        shaped = ids if ids is not None else kwargs["inputs_embeds"]
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        if cache is not None and getattr(cache, "get_seq_length", lambda: 0)() > 0:
            raise PeftkitError("An X-LoRA model got a forward with a KV cache: its scalings pass needs the whole "
                               "sequence each step. Generate with use_cache=False (peftkit generate does).")
        pass_kwargs = {k: v for k, v in kwargs.items() if k not in ("labels", "past_key_values", "cache")}
        pass_kwargs |= {"output_hidden_states": True, "return_dict": True, "use_cache": False}
        self.current = self.classifier.dummy(shaped.shape[0], shaped.shape[1], shaped.device)
        self.in_scalings_pass = True
        try:
            with torch.no_grad():
                hidden = model(*args, **pass_kwargs).hidden_states[-1]
        finally:
            self.in_scalings_pass = False
        self.current = self.classifier(hidden)

    def of_layer(self, number: int) -> torch.Tensor | None:
        """Layer `number`'s scalings (batch, seq, experts), top-k'd (and softmaxed) as peft's
        `get_maybe_topk_scalings`; None outside a model forward (each expert then added at its own scaling)."""
        if self.current is None:
            return None
        s = self.current[:, :, number, :]
        if self.cfg.top_k_lora is not None:
            top = torch.topk(s, k=self.cfg.top_k_lora, dim=-1).indices
            s = s * torch.zeros_like(s, dtype=torch.bool).scatter_(-1, top, True).to(s.dtype)
        if self.cfg.enable_softmax_topk:
            kept = s != 0
            s = torch.softmax(s.masked_fill(~kept, float("-inf")), dim=-1).masked_fill(~kept, 0.0)
        return s
