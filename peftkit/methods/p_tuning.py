"""P-tuning (Liu et al. 2021, "GPT Understands, Too"): a soft prompt of n embeddings, as prompt tuning, but produced
by a small reparameterisation encoder over a trainable table, which trains more stably than the bare prompt.

Encoders as peft's `PromptEncoder`: `mlp`, Linear(d, h) ReLU Linear(h, h) ReLU Linear(h, d); `lstm`, a 2-layer
bidirectional LSTM of width h, then Linear(2h, 2h) ReLU Linear(2h, d). d is the model's hidden size. peft saves
only the encoder's output, `prompt_embeddings` (n, d), and so does peftkit's export: what loads (in peft, or in
peftkit for eval and generate) is that prompt, used exactly as prompt tuning's. A run's checkpoints keep the
encoder too, so `--resume` continues training it.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from peftkit.methods.prompt_tuning import PromptTuning
from peftkit.methods.virtual import VirtualConfig, VirtualPeftConfig, VirtualTokens, install

PEFT_ENCODER = {"mlp": "MLP", "lstm": "LSTM"}


class PTuningConfig(VirtualConfig):
    """P-tuning: a soft prompt computed by a small MLP or LSTM encoder."""

    method: Literal["p_tuning"]
    encoder: Literal["mlp", "lstm"] = "mlp"
    """The reparameterisation: mlp (peft's recommended default) or lstm (the paper's)."""
    encoder_hidden_size: int | None = Field(None, gt=0)
    """The encoder's width h; null: the model's hidden size (peft's default)."""


class PTuningPeftConfig(VirtualPeftConfig):
    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0


class LstmEncoder(nn.Module):
    """peft's LSTM head: a bidirectional LSTM over the table (one sequence of n), 2 layers as peftkit trains it
    (peft's `encoder_num_layers`, which only the LSTM reads), then an MLP."""

    def __init__(self, dim: int, hidden: int, num_layers: int = 2) -> None:
        super().__init__()
        self.lstm_head = nn.LSTM(dim, hidden, num_layers=num_layers, bidirectional=True, batch_first=True)
        self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))

    def forward(self, table: torch.Tensor) -> torch.Tensor:
        return self.mlp_head(self.lstm_head(table.unsqueeze(0))[0])[0]


def encoder(kind: str, dim: int, hidden: int, lstm_layers: int = 2) -> nn.Module:
    if kind == "lstm":
        return LstmEncoder(dim, hidden, lstm_layers)
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, dim))


class PTuning(PromptTuning):
    name: ClassVar[str] = "p_tuning"
    title: ClassVar[str] = "P-tuning"
    peft_type: ClassVar[str] = "P_TUNING"
    config: ClassVar[type] = PTuningConfig
    peft_config: ClassVar[type] = PTuningPeftConfig

    @classmethod
    def install(cls, model: nn.Module, cfg: PTuningConfig) -> VirtualTokens:
        dim = model.get_input_embeddings().weight.shape[1]
        table = torch.randn(cfg.num_virtual_tokens, dim)
        return install(model, VirtualTokens(cls, table, encoder(cfg.encoder, dim, cfg.encoder_hidden_size or dim)))

    @classmethod
    def to_peft(cls, cfg: PTuningConfig, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        return cls.peft_common(cfg, targets, base_name) | {
            "encoder_reparameterization_type": PEFT_ENCODER[cfg.encoder], "encoder_hidden_size": cfg.encoder_hidden_size,
            "encoder_num_layers": 2, "encoder_dropout": 0.0}

    @classmethod
    def model_facts(cls, cfg: PTuningConfig, model_config) -> dict:
        facts = super().model_facts(cfg, model_config)
        return facts | {"encoder_hidden_size": cfg.encoder_hidden_size or facts["token_dim"]}

    @classmethod
    def trained_params(cls, cfg: PTuningConfig, facts: dict) -> int | None:
        dim = facts.get("token_dim")
        if not isinstance(dim, int):
            return None
        # A peft adapter's LSTM has its own depth (encoder_num_layers: 1 trains 8,640 parameters where 2 train
        # 15,040 for d 32, h 16); peft's MLP ignores it, always 3 Linear layers.
        layers = facts.get("encoder_num_layers", 2)
        layers = layers if isinstance(layers, int) and layers > 0 else 2
        with torch.device("meta"):  # counted, not allocated
            head = encoder(cfg.encoder, dim, cfg.encoder_hidden_size or dim, layers)
        return cfg.num_virtual_tokens * dim + sum(p.numel() for p in head.parameters())

    @classmethod
    def from_peft(cls, peft: PTuningPeftConfig, config_file: Path) -> PTuningConfig:
        cls.check_peft(peft, config_file)
        kind = {v: k for k, v in PEFT_ENCODER.items()}.get(peft.encoder_reparameterization_type, "mlp")
        return PTuningConfig(method="p_tuning", num_virtual_tokens=peft.num_virtual_tokens, encoder=kind,
                             encoder_hidden_size=peft.encoder_hidden_size)
