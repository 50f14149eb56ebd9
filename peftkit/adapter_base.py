"""The base model an adapter applies to: the recorded base and revision, re-quantized as the adapter was trained,
its remote-code and classification-head checks, and the adapter injected over it (`load_adapted_model`)."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from peftkit.errors import PeftkitError, PeftkitWarning
from peftkit.manifest import base_changes
from peftkit.modeling import Tokenizers, load_model
from peftkit.recipe import ModelConfig

if TYPE_CHECKING:
    from peftkit.data.classification import LabelSet


def check_remote_code(adapter_dir: str, allowed: bool) -> None:
    """Refuse an adapter whose peftkit.json records a base that runs its own modelling code, unless the user
    passed --trust-remote-code (`allowed`): a file never decides to run code."""
    from peftkit.adapter_meta import read_meta

    if read_meta(adapter_dir).trust_remote_code and not allowed:
        raise PeftkitError(
            f"{adapter_dir} was trained on a base that runs its own modelling code (model.trust_remote_code: true, "
            "recorded in its peftkit.json). Loading that base executes code from its repository: pass "
            "--trust-remote-code if you trust it."
        )


def load_adapted_model(base: str | ModelConfig | None, adapter_dir: str, device: torch.device | None = None,
                       trust_remote_code: bool = False, warn_requantized: bool = True, tokens_of=None,
                       tokenizer_of=None):
    """Base model (re-quantized as the adapter was trained, if it was) with a PEFT adapter injected.

    bitsandbytes quantization is deterministic, so re-quantizing the same base weights gives the exact
    4-bit weights the adapter was trained against. RoPE scaling recorded in peftkit.json is applied too. The base loads at the adapter's recorded `revision`
    unless `base` names another model.

    Args:
        base: the base model; default the adapter's base_model_name_or_path. A ModelConfig (a recipe's `model`)
            loads it with its dtype, attn_implementation and revision, as the run that trained the adapter did;
            a name, in the checkpoint's own dtype (float32 under quantization, the recipe default).
        trust_remote_code: the user's own `--trust-remote-code`. An adapter whose peftkit.json records that
            its base runs its own code is refused without it: a file never decides to run code.
        warn_requantized: warn where the base is quantized on another kind of device than the adapter's was
            (`warn_if_requantized`); False where the caller said so already (`peftkit.merge.merge_device`).
        tokens_of: `peftkit.new_tokens.adapter_tokens`, or a caller's function that remembers its answers (a peft
            adapter's tokenizer is read to find them: `ModelSource.added_tokens` reads it once per command).
        tokenizer_of: the base's tokenizer for its ModelConfig (a `peftkit.modeling.Tokenizers`: a new one, the
            default, or a caller's that has read it already: `ModelSource.tokenizers`), so that loading the model (model.add_tokens'
            rows, a classifier's pad id) and the tokenizer returned read its files once.

    Returns:
        (model, adapter settings, tokenizer, base ModelConfig, quantization or None)
    """
    from peftkit.adapters import inject_adapters
    from peftkit.adapters.state_dicts import load_adapter_state_dict

    tokenizer_of = tokenizer_of or Tokenizers()
    model, adapter_cfg, state, _, model_cfg, quant = load_adapter_base(base, adapter_dir, device, trust_remote_code,
                                                                       warn_requantized, tokens_of, tokenizer_of)
    # PEFT itself accepts a target list with entries for other architectures (its generic defaults); the
    # weights then decide, and load_adapter_state_dict refuses any that do not land.
    inject_adapters(model, adapter_cfg, every_entry=False, state=state, saved_only=True)
    load_adapter_state_dict(model, state)
    model.eval()
    return model, adapter_cfg, tokenizer_of(model_cfg), model_cfg, quant


def load_adapter_base(base: str | ModelConfig | None, adapter_dir: str, device: torch.device | None = None,
                      trust_remote_code: bool = False, warn_requantized: bool = True, tokens_of=None,
                      tokenizer_of=None):
    """An adapter's files and the base model it applies to, not yet adapted (`load_adapted_model`'s first half,
    which `peftkit.adapters.named` shares: several adapters, one base). `tokenizer_of`: as `load_adapted_model`'s,
    for what loading the model reads of the tokenizer (else `load_model` reads it where it needs it).

    Returns:
        (base model, adapter settings, PEFT-keyed tensors, PEFT config, base ModelConfig, quantization or None)
    """
    from peftkit.adapter_meta import read_meta
    from peftkit.methods.expert_lists import on_fused_experts
    from peftkit.methods.lora_init import base_weight_of, on_original_base
    from peftkit.new_tokens import adapter_tokens, check_rows_known, resize, saved_rows
    from peftkit.peft_fields import check_weight_tying
    from peftkit.peft_format import load_adapter

    adapter_cfg, state, raw, quant = load_adapter(adapter_dir)
    check_remote_code(adapter_dir, trust_remote_code)
    recorded = raw.base_model_name_or_path
    settings = base if isinstance(base, ModelConfig) else None
    name = (settings.name_or_path if settings else base) or recorded
    if not name:
        raise PeftkitError(f"{adapter_dir}/adapter_config.json names no base_model_name_or_path; pass --base.")
    revision = base_revision(adapter_dir, name, recorded, raw.revision, settings.revision if settings else None)
    classify = raw.task_type == "SEQ_CLS"
    meta = read_meta(adapter_dir)
    # A quantized base is quantized from the dtype training loaded it in (other weights, other 4-bit codes).
    dtype = settings.dtype if settings else "auto" if quant is None else meta.base_dtype or "float32"
    model_cfg = ModelConfig(name_or_path=name, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code,
                            attn_implementation=settings.attn_implementation if settings else None,
                            rope_scaling=meta.rope_scaling,
                            task="sequence_classification" if classify else "causal_lm")
    tokens = (tokens_of or adapter_tokens)(adapter_dir, model_cfg)  # model.add_tokens
    model_cfg = model_cfg.model_copy(update={"add_tokens": tokens})
    labels = adapter_labels(adapter_dir, state) if classify else None
    changes = base_changes(adapter_dir, name, revision) if name == recorded else None
    tok = tokenizer_of(model_cfg) if tokenizer_of and (model_cfg.add_tokens or classify) else None  # (load_model's)
    model = load_model(model_cfg, quant, device, labels, tok=tok)
    if model_cfg.add_tokens and (rows := saved_rows(model, state)):  # peft's base resized to a multiple of 64
        resize(model, rows)
    elif not model_cfg.add_tokens:  # (rows past the base's, and no tokenizer beside the adapter to say why)
        check_rows_known(adapter_dir, adapter_cfg, state, model, name)
    if changes is not None and (changed := changes()):
        warnings.warn(PeftkitWarning(changed_base_note(name, Path(adapter_dir).parent, changed)), stacklevel=3)
    if quant is not None and warn_requantized:
        warn_if_requantized(adapter_dir, model)
    check_weight_tying(adapter_dir, model)
    adapter_cfg, state = on_original_base(adapter_cfg, state, base_weight_of(model))  # peft's unconverted PiSSA/OLoRA
    adapter_cfg, state = on_fused_experts(adapter_cfg, state, model)  # transformers 4's per-expert LoRA
    if classify:
        from peftkit.classify import with_head

        adapter_cfg = with_head(adapter_cfg, model)
    return model, adapter_cfg, state, raw, model_cfg, quant


def warn_if_requantized(adapter_dir: str, model: torch.nn.Module) -> None:
    """Warn where the adapter's quantized base was quantized on another kind of device (peftkit.json `quantized_on`)
    than `model`'s is now: eval, generate and chat then run on slightly other base weights, as merge would merge
    them (`peftkit.adapter_meta.requantized_note`)."""
    from peftkit.adapter_meta import requantized_note

    here = next(model.parameters()).device.type
    if note := requantized_note(adapter_dir, here, "its outputs may differ slightly from the trained model's",
                                "Run it on {where} for the exact base.", f"adapter {adapter_dir}"):
        warnings.warn(PeftkitWarning(note), stacklevel=3)


def base_revision(adapter_dir: str, name: str, recorded_name: str | None, recorded: str | None, asked: str | None,
                  say: bool = True) -> str | None:
    """The revision of base `name` to load under the adapter at `adapter_dir`, which records `recorded_name` at
    `recorded`; `asked`: a recipe's model.revision. The recorded revision belongs to the recorded base: another base is
    taken as given. A run's adapter records the commit its base loaded, where its recipe may name a branch or tag:
    asked for that branch (the run's own, as its manifest says, or one that names the commit now), the commit is what
    the adapter was trained on, and is loaded (said with `say` where the branch has moved since). Any other revision
    is refused: the adapter was not trained on it."""
    recorded = recorded if name == recorded_name else None
    if not asked or not recorded or asked == recorded:
        return asked or recorded
    commit = re.fullmatch(r"[0-9a-f]{40}", recorded) is not None
    if commit and re.fullmatch(r"[0-9a-f]{7,40}", asked):  # a commit's hash, or its short form
        if recorded.startswith(asked):
            return recorded
    elif commit:
        from peftkit.manifest import hub_commit

        now = hub_commit(name, asked)
        if now == recorded:
            return recorded
        if asked == _run_revision(adapter_dir, recorded):
            if say and now is not None:
                warnings.warn(PeftkitWarning(
                    f"{adapter_dir} was trained on {name} at commit {recorded}, which model.revision '{asked}' named "
                    f"then; it names {now} now. Loading {recorded}, the base the adapter was trained on."),
                    stacklevel=2)
            return recorded
    raise PeftkitError(f"{adapter_dir} was trained on {name} at revision {recorded}, and the recipe's "
                       f"model.revision is {asked}: drop model.revision (or --set "
                       f"model.revision={recorded}) to load the base it was trained on.")


def _run_revision(adapter_dir: str, commit: str) -> str | None:
    """The model.revision the run that exported `adapter_dir` (its run directory's manifest.json) named, where that
    run loaded `commit`; None for an adapter outside its run directory."""
    try:
        manifest = json.loads((Path(adapter_dir).parent / "manifest.json").read_text(encoding="utf-8"))
        if manifest["base_model_commit"] == commit:
            return manifest["recipe"]["model"]["revision"] or "main"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def changed_base_note(base: str, run_dir: Path, changed: list[tuple[str, str]]) -> str:
    """What is said of a base whose files differ from those the run at `run_dir` trained its adapter on."""
    files = ", ".join(f"{name} {how}" for name, how in changed[:3]) + (f", and {len(changed) - 3} more"
                                                                       if len(changed) > 3 else "")
    return (f"the base model {base} has changed since {run_dir} trained its adapter on it: {files} "
            f"({run_dir / 'manifest.json'} records the files' sha256). What loads is the adapter over the base as it "
            f"is now, not the model the run trained. Restore the base, or see `peftkit verify {run_dir}`.")


def adapter_labels(adapter_dir: str, state: dict[str, torch.Tensor]) -> LabelSet:
    """The classes of a SEQ_CLS adapter: peftkit.json's `labels`, or (an adapter peft made) as many as its saved
    head has outputs, named by their ids."""
    from peftkit.adapter_meta import read_meta
    from peftkit.adapters import PEFT_PREFIX
    from peftkit.classify import HEAD_NAMES
    from peftkit.data.classification import LabelSet

    if names := read_meta(adapter_dir).labels:
        return LabelSet(tuple(names))
    # BERT's head is one Linear (classifier.weight), RoBERTa's ends in out_proj, a decoder's is score.weight.
    for key in (f"{PEFT_PREFIX}{head}{part}.weight" for head in HEAD_NAMES for part in ("", ".out_proj")):
        if key in state:
            return LabelSet(tuple(str(i) for i in range(state[key].shape[0])))
    raise PeftkitError(f"{adapter_dir} is a SEQ_CLS adapter without its classification head ({' or '.join(HEAD_NAMES)} "
                       "in modules_to_save), so the number of classes is unknown. Export the adapter again with its head.")
