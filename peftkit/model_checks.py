"""What `peftkit validate` checks against the recipe's model without reading a weight: the refusals train makes
before its first step that config.json, the tokenizer and an empty model decide, made by train's own functions, in
its words. The model is built from config.json on the meta device (every module and shape, no value: nothing is
read or allocated: a Llama-3-8B config built in 4 s here), and the adapter injected there as the memory estimate does.

Not checked here, since they need more than that: the weights' fit to config.json (`modeling.load_model`), the data (its
rows, but for a classifier's labels, preference pairs' and KTO rows' bad rows and the first row's form; their lengths
and the steps they make: warmup, evaluation and checkpoint intervals, and with training.epochs the method's own checks
of the run, AdaLoRA's schedule; eval.max_new_tokens within a learned position table), data.packing's test of the model's
attention (it compares logits), what depends on the device (flash attention's CUDA and package, though its refusal of
float32 weights is made here; bfloat16 support, fp16 gradients, whether the estimate fits).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path

from peftkit.recipe import Recipe, is_local_dataset


def unavailable(cfg: Recipe) -> str | None:
    """Why the recipe's model cannot be checked on this machine (nothing is downloaded), or None where it can: a local
    directory, or a hub id whose snapshot is in the local Hugging Face cache."""
    from huggingface_hub import constants

    from peftkit.manifest import model_directory

    name = cfg.model.name_or_path
    if model_directory(name, cfg.model.revision) is not None:
        return None
    if Path(name).is_absolute():
        return f"model.name_or_path {name} is not here"
    return (f"model.name_or_path {name} is no local directory, and as a hub id it is not in the local Hugging Face "
            f"cache ({constants.HF_HUB_CACHE}); validate downloads nothing")


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """HF_HUB_OFFLINE while the checks read a hub id's files: from the local cache only, nothing downloaded."""
    from huggingface_hub import constants

    was = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = was


def check_model(cfg: Recipe) -> str:
    """Run train's refusals that the model's config.json, its tokenizer and a meta-device model decide (a
    PeftkitError, as train raises it); returns what was checked: the adapter's line as train prints it (its trainable
    parameters counted as train counts them) and the kinds of modules it adapts. Call where `unavailable` is None."""
    from peftkit import long_context
    from peftkit.classify import with_head
    from peftkit.data.tokenized import check_embedding_rows
    from peftkit.manifest import hub_commit
    from peftkit.memory import meta_model
    from peftkit.methods import method_of
    from peftkit.modeling import check_attention_dtype, load_config, load_tokenizer
    from peftkit.quantization import check_prequantized, check_quantization_section
    from peftkit.rope_scaling import check_context_length
    from peftkit.start_adapter import adapt, adapter_line

    with _offline():
        config = load_config(cfg.model)
        check_attention_dtype(cfg.model)
        check_context_length(cfg, config)
        check_quantization_section(config, cfg.model, cfg.quantization)
        if cfg.quantization is not None:
            check_prequantized(config, cfg.quantization, cfg.model.name_or_path)
        tok = load_tokenizer(cfg.model, cfg.data.chat_template)
        _check_tokenizer(cfg, tok)
        if cfg.classifier:  # the head's size: the classes, as train reads them (a reward model's one score)
            from peftkit.modeling import classifier_kwargs

            classes = _classes(cfg) if cfg.classification else None
            if classes is not None:
                _check_eval_labels(cfg, classes)
            config.update(classifier_kwargs(cfg.model, classes))
        model = meta_model(cfg, config)
        if model is None:
            return "config.json and the tokenizer only: transformers builds no model of this task from this config"
        if cfg.quantization is not None:
            _quantize(model, cfg)
        commit = hub_commit(cfg.model.name_or_path, cfg.model.revision)  # (the local cache's, offline)
        method_of(cfg.adapter).check_sources(cfg.adapter, cfg, model, commit)  # fusion's, X-LoRA's: this base's
        long_context.apply(model, cfg)
        adapter = with_head(cfg.adapter, model) if cfg.classifier else cfg.adapter
        if cfg.model.add_tokens:  # the new tokens' rows, as train adds and trains them
            from peftkit.new_tokens import added_ids, resize, with_new_rows

            rows = resize(model, len(tok))
            adapter = with_new_rows(adapter, model, added_ids(cfg.model, tok, rows)[0])
        check_embedding_rows(cfg.data, model.get_input_embeddings().weight.shape[0], tok)  # tokenized rows' ids
        targets = adapt(cfg, model, adapter)
        method_of(cfg.adapter).check_run(model, cfg.adapter)
        if cfg.training.max_steps:  # the run's steps, known without the data: what the method adds to the loop
            method_of(cfg.adapter).trainer(model, cfg.adapter, cfg.training.max_steps)
    kinds = sorted({name.rpartition(".")[2] for name in targets})
    return adapter_line(adapter, model, targets) + (f"; adapted: {', '.join(kinds)}" if kinds else "")


def memory_line(cfg: Recipe) -> str | None:
    """train's memory estimate line for the recipe, computed as train computes it before loading (on the meta
    device, no weight read), or None where no model can be built from the config. Call where `unavailable` is None."""
    import torch

    from peftkit.memory import estimate_memory, estimate_text

    # Where the recipe would run, never checked here (model.device: cuda validates on a machine without a GPU): a GPU
    # run's estimate has no CPU runtime constant.
    cpu = cfg.model.device == "cpu" or (cfg.model.device == "auto" and not torch.cuda.is_available())
    with _offline():
        estimate = estimate_memory(cfg, torch.device("cpu" if cpu else "cuda"))
    return estimate_text(estimate) if estimate is not None else None


def _check_tokenizer(cfg: Recipe, tok) -> None:
    """Train's refusals that the tokenizer decides: a chat template for chat rows (preference and unpaired
    conversations too), an EOS token for the formats whose targets end with it (preference and unpaired rows of text
    too), aLoRA's invocation ids within its vocabulary."""
    from peftkit.data.conversations import check_chat_tokenizer
    from peftkit.data.examples import EOS_FORMATS, check_eos

    sources = cfg.data.train_sources()
    chat = [f"data.train[{i}].format" for i, entry in enumerate(sources) if entry.format == "chat"]
    if cfg.data.format == "chat" or chat:
        check_chat_tokenizer(tok, "data.format" if cfg.data.format == "chat" else chat[0])
    if not cfg.classifier:  # (a classifier's rows have no target text)
        for i, entry in enumerate(sources):
            if entry.format in EOS_FORMATS:
                check_eos(tok, entry.format, "data.format" if entry.format == cfg.data.format else
                          f"data.train[{i}].format")
    _check_eval_formats(cfg, tok)
    _check_answer_rows(cfg, tok)
    _check_pairs(cfg, tok)
    _warn_init_from_template(cfg, tok)
    if invocation := getattr(cfg.adapter, "alora_invocation_tokens", None):
        from peftkit.methods.alora import check_invocation_ids

        check_invocation_ids(invocation, tok)


def _check_eval_formats(cfg: Recipe, tok) -> None:
    """`_check_tokenizer`'s refusals of the formats data.eval's sets are read in, which train's read of a set refuses
    at its format key (data.eval.NAME.format of a set that sets its own, else data.format): chat on a tokenizer
    without a template, a format whose targets end with EOS on one without an EOS token. A set read in data.format is
    checked too: where every data.train entry sets a format of its own, data.train's check never reads data.format."""
    from peftkit.data.conversations import check_chat_tokenizer
    from peftkit.data.examples import EOS_FORMATS, check_eos

    for name, entry in cfg.data.eval_sources().items():
        key = cfg.data.for_eval(name)._format_key
        if entry.format == "chat":
            check_chat_tokenizer(tok, key)
        elif entry.format in EOS_FORMATS and not cfg.classifier:
            check_eos(tok, entry.format, key)


def _check_answer_rows(cfg: Recipe, tok) -> None:
    """Train's refusals of data.format preference's pairs (DPO, ORPO, SimPO, reward) or unpaired's rows (KTO) that
    their form decides: rows of text on a tokenizer without an EOS token (their answers end with it, as completion's
    targets do), conversations on one without a chat template (or offsets: a slow tokenizer). Their form is each
    dataset's first usable row's (data.train's, then each set of data.eval's: train refuses either as it reads it),
    read (not tokenized) where its files are local and the tokenizer lacks one of those; unreadable rows are left to
    train to say."""
    data = cfg.data
    if data.format not in ("preference", "unpaired"):
        return
    if tok.eos_token_id is not None and getattr(tok, "chat_template", None) and tok.is_fast:
        return
    if all(is_local_dataset(source.path) for source in data.train_sources()):
        _check_first_row(tok, data, data.train, data.train_split)
    for name, source in data.eval_sources().items():
        if is_local_dataset(source.path):
            _check_first_row(tok, data.for_eval(name), source.path, source.split)


def _check_pairs(cfg: Recipe, tok) -> None:
    """Train's refusal of a bad preference pair (`peftkit.data.preference.check_pairs`: its FILE:LINE and problem, the
    answers alike but for the EOS's text too, which needs the tokenizer) or a bad KTO row (data.format unpaired:
    `peftkit.data.unpaired.check_unpaired`, an answer of the EOS's text alone too), in data.train and each set of
    data.eval, where they are local; read, not tokenized."""
    from peftkit.data.preference import check_pairs
    from peftkit.data.unpaired import check_unpaired

    data = cfg.data
    if data.format == "preference":
        check = functools.partial(check_pairs, tok)
    elif data.format == "unpaired":
        check = functools.partial(check_unpaired, tok)
    else:
        return
    if all(is_local_dataset(source.path) for source in data.train_sources()):
        check(data.train, data.train_split, data)
    for name, source in data.eval_sources().items():
        if is_local_dataset(source.path):
            check(source.path, source.split, data.for_eval(name))


def _warn_init_from_template(cfg: Recipe, tok) -> None:
    """Train's warning of conversations rendered in another chat template than the one adapter.init_from carries
    (`peftkit.data.chat_templates.warn_init_from_template`); preference and KTO rows' form is data.train's first usable
    row's, where its files are local."""
    from peftkit.data.chat_templates import warn_init_from_template
    from peftkit.errors import PeftkitError

    data, form = cfg.data, None
    if cfg.adapter.init_from and data.format in ("preference", "unpaired") and all(
            is_local_dataset(source.path) for source in data.train_sources()):
        try:
            form = first_row_form(data, data.train, data.train_split)
        except PeftkitError:  # (unreadable rows: train's to say)
            pass
    warn_init_from_template(cfg, tok, form)


def _check_first_row(tok, data, path, split: str | None) -> None:
    """`_check_answer_rows` of one dataset (`path`, read as the section `data` reads it): train's check_eos for its
    first usable row given as text, check_chat_tokenizer for one given as a conversation, at data's format key."""
    from peftkit.data.conversations import check_chat_tokenizer
    from peftkit.data.examples import check_eos
    from peftkit.data.preference import TEXT_FIELDS as PAIR_FIELDS
    from peftkit.data.unpaired import TEXT_FIELDS
    from peftkit.errors import PeftkitError

    try:
        form = first_row_form(data, path, split)
    except PeftkitError:
        return
    if form == "completion":
        check_eos(tok, data.format, data._format_key, PAIR_FIELDS if data.format == "preference" else TEXT_FIELDS)
    elif form == "chat":  # (said as train's build_pairs / build_unpaired say it: as this format's rows)
        check_chat_tokenizer(tok, data._format_key, (data.format, PAIR_FIELDS if data.format == "preference"
                                                     else TEXT_FIELDS))


def first_row_form(data, path, split: str | None) -> str | None:
    """The form (`completion`, `chat`) of the first usable row of `path` (data.train's list: of its entries in order,
    each as its own columns and format read it), reading no row past it (`rows_in_order`: a 300k-row file was read
    whole); None where no row is usable."""
    from peftkit.data.formats import format_rows
    from peftkit.data.preference import split_pair
    from peftkit.data.rows import rows_in_order
    from peftkit.data.unpaired import split_unpaired

    parts = split_pair if data.format == "preference" else split_unpaired
    entries = [(path, split, data)] if isinstance(path, str) else [
        (entry.path, entry.split, data.model_copy(update={"columns": entry.columns, "format": entry.format}))
        for entry in data.train_sources()]
    for source, entry_split, cfg in entries:
        for row in rows_in_order(source, entry_split, cfg.on_bad_rows):
            row = format_rows([row], cfg)[0]
            if isinstance(row, dict) and isinstance(form := parts(row), tuple):
                return form[0]
    return None


def _quantize(model, cfg: Recipe) -> None:
    """The meta model's layers swapped for bitsandbytes' 4-bit/8-bit ones as from_pretrained swaps them (transformers'
    quantizer, before any weight loads; still nothing allocated): the adapter meets the layers train's meets, and their
    refusals (KaSA's, VeLoRA's, BD-LoRA's of a quantized layer)."""
    import torch
    from transformers.quantizers import AutoHfQuantizer

    from peftkit.quantization import bnb_config, check_skip_modules, refuse_quantized_tied_head

    check_skip_modules(model, cfg.quantization)
    quantizer = AutoHfQuantizer.from_config(bnb_config(cfg.quantization, cfg.model.task))
    with torch.device("meta"):
        quantizer.preprocess_model(model, dtype=next(model.parameters()).dtype, device_map={"": "cpu"})
    model.tie_weights()  # as from_pretrained ties them once loaded (a swapped output head holds its own weight till then)
    refuse_quantized_tied_head(model, cfg.quantization)


def _classes(cfg: Recipe):
    """A classifier's classes as train reads them from data.train (its rows, not tokenized) where its datasets are
    local (files, saved datasets); None otherwise, and model.num_labels or config.json's sizes the head (train's count
    may then differ)."""
    from peftkit.data.classification import LabelSet, classification_rows

    data = cfg.data
    if not all(is_local_dataset(source.path) for source in data.train_sources()):
        return None
    usable, _, _, name = classification_rows(data.train, data.train_split, data)
    return LabelSet.from_rows(usable, cfg.model.num_labels, name)


def _check_eval_labels(cfg: Recipe, classes) -> None:
    """Train's refusal of an eval row whose label is none of data.train's `classes` (`LabelSet.id_of`: its file, line
    and label), for each set of data.eval that is local; its rows read (not tokenized) as train reads them."""
    from peftkit.data.classification import classification_rows

    for name, source in cfg.data.eval_sources().items():
        if is_local_dataset(source.path):
            for where, row in classification_rows(source.path, source.split, cfg.data.for_eval(name))[0]:
                classes.id_of(row["label"], where)
