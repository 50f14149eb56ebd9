"""Loading the base model and tokenizer (optionally quantized by bitsandbytes), and k-bit preparation.

The checks of the model's source before transformers reads it are in `peftkit.model_source`; the bitsandbytes
settings and their refusals in `peftkit.quantization`.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.manifest import TOKENIZER_FILES, model_directory
from peftkit.model_source import (
    check_config_json,
    check_source,
    check_weight_files,
    not_loadable,
)
from peftkit.quantization import (
    bnb_config,
    check_prequantized,
    quantized_shape_mismatches,
    refuse_quantized_tied_head,
    saved_quantization,
)
from peftkit.recipe import ModelConfig, QuantizationConfig
from peftkit.rope_scaling import scale_rope

if TYPE_CHECKING:
    from peftkit.data.classification import LabelSet

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(recorded: object) -> str:
    """A dtype a config records (`torch.bfloat16`, "float16", None) as one of DTYPES' names; float32 otherwise."""
    name = str(recorded or "float32").removeprefix("torch.")
    return name if name in DTYPES else "float32"


def resolve_device(preference: str = "auto") -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise PeftkitError("model.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'.")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def quiet_transformers() -> None:
    """Silence per-file progress bars and hints ('kernels' not installed) that drown peftkit's own output."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # Where deepspeed is installed, saving a model imports it (accelerate's unwrap_model), and without a GPU it warns
    # "Setting accelerator to CPU" in every run. A filter, since deepspeed sets its logger's level when imported.
    logging.getLogger("DeepSpeed").addFilter(_not_the_cpu_fallback_warning)
    # DeepSpeed's ZeRO calls torch.distributed's all_gather_into_tensor and reduce_scatter_tensor, which torch 2.13
    # deprecates with a FutureWarning at every call: about 100 in a 12-step ZeRO-3 run, none of them the user's to act on.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _not_the_cpu_fallback_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Setting accelerator to CPU")


def load_config(cfg: ModelConfig):
    """The model's transformers config, checked before any weight is read.

    Raises a PeftkitError naming config.json for a file transformers cannot use: not JSON, an unknown
    `model_type`, a field of the wrong type ('hidden_size': "abc") or settings that contradict each other.
    """
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    check_source(cfg)
    try:
        config = AutoConfig.from_pretrained(cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        raise not_loadable(cfg.name_or_path, e, cfg.revision) from None
    except (ValueError, TypeError, StrictDataclassError) as e:
        snapshot = None if Path(cfg.name_or_path).is_dir() else model_directory(cfg.name_or_path, cfg.revision)
        if snapshot is not None and (snapshot / "config.json").is_file():  # a hub id's: said as a local one's is
            check_config_json(snapshot / "config.json", cfg.trust_remote_code)
        where = Path(cfg.name_or_path) / "config.json" if Path(cfg.name_or_path).is_dir() else cfg.name_or_path
        raise PeftkitError(f"{where}: transformers cannot use this model config: {' '.join(str(e).split())} Fix "
                           "config.json, or restore it from where the model came from.") from None
    if cfg.rope_scaling is not None:  # model.rope_scaling: on the config the model is built from
        scale_rope(config, cfg.rope_scaling, cfg.name_or_path)
    return config


def load_tokenizer(cfg: ModelConfig, chat_template: str | None = None):
    """The tokenizer of `cfg`'s model, with a pad token (`pad_token`: EOS, UNK or BOS where it has none) and
    `chat_template` where given: a recipe's data.chat_template (`peftkit.data.chat_templates.template_text`), in
    place of the tokenizer's own."""
    from transformers import AutoTokenizer

    load_config(cfg)  # a broken config.json fails here in our words, not in the tokenizer's
    try:
        tok = AutoTokenizer.from_pretrained(cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        directory = Path(cfg.name_or_path) if Path(cfg.name_or_path).is_dir() else model_directory(cfg.name_or_path,
                                                                                                   cfg.revision)
        if directory is not None and not any((directory / name).is_file() for name in TOKENIZER_FILES):
            raise PeftkitError(f"Could not load a tokenizer from {cfg.name_or_path}: {directory} holds none of its "
                               f"files ({', '.join(TOKENIZER_FILES)}). Copy the tokenizer files from where the model "
                               "came from.") from None
        raise PeftkitError(f"Could not load a tokenizer from {cfg.name_or_path}: {e}") from None
    # transformers 5 keeps how the files were fetched, true under HF_HUB_OFFLINE=1, and save_pretrained writes it into
    # tokenizer_config.json: an export's tokenizer (adapter/ with model.add_tokens, merged/), the tokenized-data cache's
    # key and verify's comparison of them then depended on the environment. Its default, as an online load has it.
    tok.init_kwargs["local_files_only"] = False
    if tok.pad_token is None:
        # Padding positions are masked out of attention and loss, so reusing another token is safe.
        spare = next((t for t in (tok.eos_token, tok.unk_token, tok.bos_token) if t is not None), None)
        if spare is None:
            raise PeftkitError(f"The tokenizer of {cfg.name_or_path} has no pad token and no EOS, UNK or BOS token to "
                               "pad with. Give it one (tokenizer_config.json's pad_token or eos_token).")
        tok.pad_token = spare
    if chat_template is not None:
        from peftkit.data.chat_templates import template_text

        tok.chat_template = template_text(chat_template)
    if cfg.add_tokens:
        from peftkit.new_tokens import add_to_tokenizer

        add_to_tokenizer(tok, cfg.add_tokens)
    return tok


class Tokenizers:
    """The tokenizers one command reads, each from disk once (1 to 2 s a read for a 151k-token vocabulary) however
    often it is asked: each set's or comparison row's rows, loading the model's (model.add_tokens' rows, a
    classifier's pad id), the one an adapted model's loading returns. Kept by `tokenizer_key` (what `load_tokenizer`
    reads of a ModelConfig) and chat template."""

    def __init__(self) -> None:
        self._read: dict[tuple, dict] = {}  # tokenizer_key: {chat template: tokenizer}, the last read last

    def __call__(self, cfg: ModelConfig):
        """`cfg`'s tokenizer as read for this command (with the chat template it was last read with, which loading
        the model does not use), else `load_tokenizer(cfg)` read now."""
        read = self._read.get(tokenizer_key(cfg))
        return next(reversed(read.values())) if read else self.read(cfg, None)

    def read(self, cfg: ModelConfig, chat_template: str | None):
        """`load_tokenizer(cfg, chat_template)`, read once for this command."""
        read = self._read.setdefault(tokenizer_key(cfg), {})
        if chat_template not in read:
            read[chat_template] = load_tokenizer(cfg, chat_template)
        return read[chat_template]


def tokenizer_key(cfg: ModelConfig) -> tuple:
    """What `load_tokenizer` reads of a ModelConfig: its name, revision, remote code and added tokens."""
    return cfg.name_or_path, cfg.revision, cfg.trust_remote_code, tuple(cfg.add_tokens)


def check_attention(cfg: ModelConfig, device: torch.device) -> None:
    """model.attn_implementation: flash_attention_2 runs on CUDA devices, with the flash-attn package, on 16-bit
    weights: flash-attn computes in fp16/bf16 only, and transformers casts fp32 queries to the weights' dtype
    wherever no autocast runs (mixed_precision: no, `peftkit eval`/`generate` without a recipe), which flash-attn
    then refuses."""
    if cfg.attn_implementation != "flash_attention_2":
        return
    check_attention_dtype(cfg)
    if need := flash_attention_missing(device):
        raise PeftkitError(f"model.attn_implementation: flash_attention_2 needs {need}; use sdpa (or leave the key "
                           "out) here.")


def check_attention_dtype(cfg: ModelConfig) -> None:
    """flash_attention_2's refusal of float32 weights (see `check_attention`): the recipe and config.json decide it,
    no device, so `peftkit validate` says it too."""
    if cfg.attn_implementation != "flash_attention_2":
        return
    if cfg.dtype == "float32" or (cfg.dtype == "auto" and _checkpoint_dtype(cfg) == "float32"):
        said = "float32" if cfg.dtype == "float32" else "auto, the checkpoint's float32"
        raise PeftkitError("model.attn_implementation: flash_attention_2 computes in float16 or bfloat16 only, and "
                           f"model.dtype is {said}. Set model.dtype: bfloat16 (the adapter still trains in float32), "
                           "or use sdpa.")


def _checkpoint_dtype(cfg: ModelConfig) -> str | None:
    """The dtype model.dtype `auto` loads, as the checkpoint's config.json records it; None where it records none or
    cannot be read yet (loading then says why)."""
    from transformers import PretrainedConfig

    try:
        raw = PretrainedConfig.get_config_dict(cfg.name_or_path, revision=cfg.revision)[0]
    except (OSError, ValueError):
        return None
    recorded = raw.get("dtype") or raw.get("torch_dtype")
    return dtype_name(recorded) if recorded else None


def flash_attention_missing(device: torch.device) -> str | None:
    """What flash_attention_2 lacks on `device` (a CUDA device, or the flash-attn package), or None."""
    import importlib.util

    if device.type != "cuda":
        return "a CUDA device"
    return "the flash-attn package (pip install flash-attn)" if importlib.util.find_spec("flash_attn") is None else None


def load_model(cfg: ModelConfig, quant: QuantizationConfig | None = None, device: torch.device | None = None,
               labels: LabelSet | None = None, tok=None) -> nn.Module:
    """AutoModelForCausalLM (model.task: sequence_classification: AutoModelForSequenceClassification) from a local
    directory or hub id, in the recipe dtype, on `device`.

    Only safetensors weights are read (`use_safetensors=True`): loading never unpickles. A config.json or
    weights file that is corrupt, or weights that do not fit the config, raise a PeftkitError.

    Args:
        labels: a classifier's classes (its head's size, and the config's id2label/label2id); default
            model.num_labels classes named by their ids, else those of the checkpoint's config.json.
        tok: `cfg`'s tokenizer as `load_tokenizer` gives it, where the caller has it (train's): its length sizes
            model.add_tokens' rows and its pad token a classifier's; else it is loaded (another read of its files:
            1 to 2 s for a 151k-token vocabulary).
    """
    config = load_config(cfg)
    saved = saved_quantization(config)  # a checkpoint saved quantized: its config.json's quantization_config
    check_weight_files(cfg)
    device = device or resolve_device(cfg.device)
    check_attention(cfg, device)
    kwargs = _loading_kwargs(cfg, config, saved, quant, device, labels)
    if saved is not None and saved.get("quant_method") == "bitsandbytes":
        from peftkit.quantization import import_bitsandbytes

        import_bitsandbytes()  # before transformers imports it for the stored codes (`eval --model MERGED-nf4`)
    quiet_transformers()
    model, loading_info = _from_pretrained(cfg.name_or_path, kwargs, device, cfg.task)
    if cfg.task == "sequence_classification":
        loading_info = _expected_for_new_head(model, loading_info, tok if tok is not None else load_tokenizer(cfg))
    _check_weights_fit(model, loading_info, cfg.name_or_path)
    if quant is not None:
        refuse_quantized_tied_head(model, quant)
    if cfg.add_tokens:  # the embeddings hold the new tokens' rows (before any adapter wraps them)
        from peftkit.new_tokens import resize

        resize(model, len(tok if tok is not None else load_tokenizer(cfg)))
    if quant is None and device.type != "cuda" and "device_map" not in kwargs:
        model.to(device)
    _as_trained(model, quant, saved)
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    model.peftkit_revision = cfg.revision  # what else reads the base's files (a tokenizer) reads them at
    return model


def _loading_kwargs(cfg: ModelConfig, config, saved: dict | None, quant: QuantizationConfig | None,
                    device: torch.device, labels: LabelSet | None) -> dict:
    """`from_pretrained`'s arguments for the recipe's model: safetensors only, no hub kernels, the recipe's dtype,
    attention, RoPE scaling, classifier head and quantization, and where the weights go."""
    kwargs: dict = dict(
        revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
        use_safetensors=True,
        dtype="auto" if cfg.dtype == "auto" else DTYPES[cfg.dtype],
        # Weights whose shape differs from the config are then listed in the loading info (and refused by
        # load_model, in our words) instead of raising an error whose details went to a log we silence.
        ignore_mismatched_sizes=True,
        output_loading_info=True,
        # transformers 5 swaps layers for hub kernels by default once the `kernels` package is installed (transformers
        # 5.25 requires it): code downloaded and run at load time, which fails offline on a GPU (measured on an H200)
        # and makes a run's bits depend on the hub's state. The model's own code runs instead.
        use_kernels=False,
    )
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.rope_scaling is not None:  # transformers' standardized parameters: kwargs replace the config's dict
        kwargs["rope_parameters"] = config.rope_parameters
    if cfg.task == "sequence_classification":
        kwargs |= classifier_kwargs(cfg, labels)
    if quant is not None:
        check_prequantized(config, quant, cfg.name_or_path)
        kwargs["quantization_config"] = bnb_config(quant, cfg.task)
    if device.type == "cuda":
        kwargs["device_map"] = {"": device.index or 0}
    elif quant is not None or saved is not None:
        # Spelled out: without a device_map, transformers puts a bitsandbytes model (a checkpoint saved quantized
        # too) on the GPU whenever one is present, whatever model.device says.
        kwargs["device_map"] = {"": "cpu"}
    return kwargs


def _as_trained(model: nn.Module, quant: QuantizationConfig | None, saved: dict | None) -> None:
    """A 4-bit model's layers computing as the recipe says: the recipe's compute dtype over a checkpoint saved
    quantized, and bitsandbytes' CPU bf16 repacking off."""
    if quant is not None and quant.method != "int8" and saved is not None:
        # A checkpoint saved 4-bit loads with the compute dtype its config.json records: the recipe's is set here.
        from peftkit.methods.layer import is_quantized

        for module in model.modules():
            if is_quantized(module) and hasattr(module, "compute_dtype"):
                module.compute_dtype, module.compute_type_is_set = DTYPES[quant.compute_dtype], True
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            # On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a Linear4bit's weight in place on its
            # first no-grad eval forward (our base eval) and from then on runs the layer in bf16 whatever
            # compute_dtype says, through a kernel without autograd: measured here, LoRA gradients off by
            # 112%, eval loss after 30 steps 3.46 instead of 1.97, absmax rounded to bf16 (so merges drift),
            # and a crash for layers narrower than 64. We keep the weights as quantized, on every CPU.
            module.support_avx512bf16_for_cpu = False


def _from_pretrained(name_or_path: str, kwargs: dict, device: torch.device, task: str = "causal_lm") -> tuple[nn.Module, dict]:
    """AutoModelForCausalLM.from_pretrained (AutoModelForSequenceClassification for `task`
    sequence_classification), with the errors a user can cause said in our words."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if task == "sequence_classification" else AutoModelForCausalLM
    try:
        return auto.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as e:
        raise not_loadable(name_or_path, e, kwargs.get("revision")) from None
    except SafetensorError as e:  # local files were checked before; this is a hub download or cache
        raise PeftkitError(f"The weights of model {name_or_path} are truncated or corrupt ({e}); delete its copy in "
                           "the Hugging Face cache and download it again.") from None
    except torch.cuda.OutOfMemoryError:
        raise PeftkitError(f"Model {name_or_path} does not fit in the memory of {device}. Load it 4-bit (a "
                           "quantization section with method: nf4; causal language models), or use a smaller model "
                           "or a larger GPU.") from None


def classifier_kwargs(cfg: ModelConfig, labels: LabelSet | None) -> dict:
    """from_pretrained's arguments for a classifier: its classes (the head's size) and their names; none (the
    checkpoint's config.json decides) without `labels` or model.num_labels."""
    from peftkit.data.classification import LabelSet

    if labels is None:
        if cfg.num_labels is None:  # the checkpoint's own config says (a fine-tuned or merged classifier)
            return {}
        labels = LabelSet(tuple(str(i) for i in range(cfg.num_labels)))
    return {"num_labels": len(labels.names), "id2label": labels.id2label, "label2id": labels.label2id}


def _expected_for_new_head(model: nn.Module, loading_info: dict, tok) -> dict:
    """The loading info without what a classifier is expected to lack: its new head (missing, or of another
    size when the base was a classifier with other classes) and the base's own output head (lm_head, BERT's
    `cls`), which the classifier does not use (unexpected). The decoder's pad token is set here too: the head
    reads the last token that is not padding, and transformers refuses batches of several rows without it. It is the
    tokenizer's, which pads the batches: a checkpoint's other pad id made the head read padding (figures that changed
    with the batch size)."""
    from peftkit.classify import head_names

    heads = tuple(f"{name}." for name in head_names(model))
    model.config.pad_token_id = tok.pad_token_id
    return {"missing_keys": [k for k in loading_info["missing_keys"] if not k.startswith(heads)],
            "mismatched_keys": [m for m in loading_info["mismatched_keys"] if not m[0].startswith(heads)],
            "unexpected_keys": []}


def _check_weights_fit(model: nn.Module, loading_info: dict, source: str) -> None:
    """Refuse weights that do not fit the config: transformers fills missing or mis-shaped weights with
    random values and only logs it, which gives a model that trains and evaluates as garbage.

    transformers already leaves out what is normal: an output head tied to the embeddings and absent from
    the files, non-persistent buffers (rotary inv_freq), keys the model class declares ignorable.
    """
    mismatched = [(key, tuple(saved), tuple(expected)) for key, saved, expected in loading_info["mismatched_keys"]]
    mismatched = sorted(mismatched + quantized_shape_mismatches(model))
    missing, unexpected = sorted(loading_info["missing_keys"]), sorted(loading_info["unexpected_keys"])
    if not (mismatched or missing or unexpected):
        return
    problems = []
    if mismatched:
        key, saved, expected = mismatched[0]
        problems.append(f"{len(mismatched)} weights have another shape than config.json says (e.g. {key} is "
                        f"{saved} in the weights files, {expected} by the config)")
    if missing:
        problems.append(f"{len(missing)} weights the config describes are not in the weights files (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} weights in the files have no place in the model the config describes "
                        f"(e.g. {unexpected[0]})")
    saved_as = getattr(model.config, "architectures", None) or []
    if saved_as and type(model).__name__ not in saved_as:  # another head or task: the user's choice of model, not a file
        raise PeftkitError(
            f"{source} holds a {saved_as[0]}, and it was to load as a {type(model).__name__}: {'; '.join(problems)}. "
            "Is it the model you meant? (a base for an adapter is the model the adapter was trained on)")
    raise PeftkitError(
        f"The weights of {source} do not match its config.json: {'; '.join(problems)}. Loading would fill them "
        "with random values. Was config.json edited, or copied from another model? Put back the config.json "
        "saved with these weights."
    )


def prepare_for_training(model: nn.Module, gradient_checkpointing: bool) -> None:
    """Get a (possibly k-bit) model ready for adapter training, doing no more than needed.

    peft's `prepare_model_for_kbit_training` upcasts every non-quantized parameter to fp32, which costs
    gigabytes on large models (users report 81 vs 63 GB). We don't: the base is frozen (by injection), its
    norms stay in the load dtype (Llama-style RMSNorm already computes in fp32 internally), and LoRA weights
    are fp32 on their own. Gradient checkpointing uses the non-reentrant implementation, which needs no
    `requires_grad` hook on the embedding outputs (the reentrant one would not backpropagate without it).
    """
    if gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise PeftkitError(
                f"training.gradient_checkpointing: {type(model).__name__} does not support gradient checkpointing; "
                "set it to false."
            )
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False
