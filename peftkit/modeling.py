"""Loading the base model and tokenizer (optionally quantized by bitsandbytes), and k-bit preparation."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from peftkit.errors import PeftkitError, did_you_mean
from peftkit.manifest import TOKENIZER_FILES, model_directory
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


def _check_source(cfg: ModelConfig) -> None:
    """A path that should be a model directory but is not gets a clear message before transformers' own."""
    name_or_path = cfg.name_or_path
    path = Path(name_or_path)
    if path.is_absolute() or name_or_path.startswith((".", "~")) or path.is_dir():
        if not path.exists():
            raise PeftkitError(
                f"Model directory not found: {name_or_path}. Give a local directory containing config.json, or a "
                "hub id such as 'meta-llama/Llama-3.2-1B'."
            )
        if not (path / "config.json").exists():
            raise PeftkitError(f"{name_or_path} has no config.json; it is not a transformers model directory.")
        _check_config_json(path / "config.json", cfg.trust_remote_code)


def _check_config_json(file: Path, trust_remote_code: bool) -> None:
    """The mistakes transformers reports without naming the file or the fix: not JSON, not an object, no
    or an unknown `model_type` (transformers says only 'Unrecognized model' or blames its own version)."""
    from transformers import __version__ as transformers_version
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from peftkit.settings_json import read_json_object

    raw = read_json_object(file, "Restore it from where the model came from.")
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise PeftkitError(f"{file} has no 'model_type' (the architecture, e.g. \"llama\"), so transformers cannot "
                           "tell which model it is. Restore config.json from where the model came from, or add the key.")
    # Models that ship their own code (auto_map) may use a type transformers does not know.
    if model_type not in CONFIG_MAPPING and not (trust_remote_code and "auto_map" in raw):
        raise PeftkitError(
            f"{file}: model_type {model_type!r} is not an architecture transformers {transformers_version} knows."
            f"{did_you_mean(model_type, CONFIG_MAPPING.keys())} If the model is newer than this transformers, upgrade "
            "it (pip install -U transformers); if it ships its own modelling code, set model.trust_remote_code: true "
            "(peftkit eval, generate, chat: --trust-remote-code)."
        )


def load_config(cfg: ModelConfig):
    """The model's transformers config, checked before any weight is read.

    Raises a PeftkitError naming config.json for a file transformers cannot use: not JSON, an unknown
    `model_type`, a field of the wrong type ('hidden_size': "abc") or settings that contradict each other.
    """
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    _check_source(cfg)
    try:
        config = AutoConfig.from_pretrained(cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        raise _not_loadable(cfg.name_or_path, e, cfg.revision) from None
    except (ValueError, TypeError, StrictDataclassError) as e:
        snapshot = None if Path(cfg.name_or_path).is_dir() else model_directory(cfg.name_or_path, cfg.revision)
        if snapshot is not None and (snapshot / "config.json").is_file():  # a hub id's: said as a local one's is
            _check_config_json(snapshot / "config.json", cfg.trust_remote_code)
        where = Path(cfg.name_or_path) / "config.json" if Path(cfg.name_or_path).is_dir() else cfg.name_or_path
        raise PeftkitError(f"{where}: transformers cannot use this model config: {' '.join(str(e).split())} Fix "
                           "config.json, or restore it from where the model came from.") from None
    if cfg.rope_scaling is not None:  # model.rope_scaling: on the config the model is built from
        scale_rope(config, cfg.rope_scaling, cfg.name_or_path)
    return config


def _not_loadable(name_or_path: str, error: Exception, revision: str | None = None) -> PeftkitError:
    """A model transformers cannot find or read (a hub id offline, a missing weights file). A name that is not on
    disk but whose first part is a local directory is most likely a mistyped path: said first; then what the local
    Hugging Face cache tells of a hub id (`_hub_problem`), or of a directory without weights."""
    path = Path(name_or_path)
    if not path.exists() and len(path.parts) > 1 and Path(path.parts[0]).is_dir():
        near = sorted(p.name for p in path.parent.iterdir())[:10] if path.parent.is_dir() else []
        return PeftkitError(f"Could not load model {name_or_path}: there is no such local directory (its start, "
                            f"{path.parts[0]}, is one here" + (f"; {path.parent} holds {', '.join(near)}" if near else "")
                            + f"), and as a hub id it could not be loaded either ({str(error).splitlines()[0]}).")
    problem = _no_weights(path) if path.is_dir() else _hub_problem(name_or_path, revision)
    if problem:
        return PeftkitError(f"Could not load model {name_or_path}: {problem}")
    return PeftkitError(f"Could not load model {name_or_path}: {error}\nFor a hub id this needs network access (or a "
                        "cached copy); only safetensors weights are accepted.")


def _no_weights(directory: Path) -> str | None:
    """What a model directory without safetensors weights holds instead, said; None where it has some."""
    if any(directory.glob("*.safetensors")):
        return None
    others = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".gguf"))
    return (f"{directory} holds no .safetensors weights" + (f" (only {', '.join(others)})" if others else "")
            + "; peftkit reads safetensors weights only (loading never unpickles). Use a copy of the model in "
            "safetensors, or save one with transformers' save_pretrained.")


def _hub_problem(name_or_path: str, revision: str | None) -> str | None:
    """Why a hub id could not be loaded, as the local Hugging Face cache tells: a snapshot without safetensors
    weights; offline, a repository or revision the cache does not hold. None where it cannot tell (online, the
    hub's own error says)."""
    from huggingface_hub import constants

    snapshot = model_directory(name_or_path, revision)
    if snapshot is not None:
        return _no_weights(snapshot)
    if not constants.HF_HUB_OFFLINE:
        return None
    from peftkit.hub import cache_miss

    return cache_miss(name_or_path, revision)


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files of a local model directory: the shards its index names, or model.safetensors."""
    index = path / "model.safetensors.index.json"
    if not index.exists():
        return [path / "model.safetensors"] if (path / "model.safetensors").exists() else []
    try:
        shards = sorted(set(json.loads(index.read_bytes())["weight_map"].values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise PeftkitError(f"{index} is not a valid weights index ({type(e).__name__}: {e}). Restore it from where "
                           "the model came from.") from None
    return [path / shard for shard in shards if (path / shard).exists()]  # a missing shard: transformers says so


def _check_weight_files(cfg: ModelConfig) -> None:
    """Read the header of every local weights file, so a truncated or overwritten one is named (the error
    safetensors raises mid-load names no file)."""
    from safetensors import SafetensorError, safe_open

    from peftkit.peft_format import unreadable_safetensors

    path = Path(cfg.name_or_path)
    if not path.is_dir():
        return
    for file in _weight_files(path):
        try:
            with safe_open(file, "pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise unreadable_safetensors(file, e, "Copy or download the model again") from None


def import_bitsandbytes():
    """bitsandbytes, imported without its hub kernel. On a CPU with AVX512-BF16, bitsandbytes 0.50's import asks the
    hub for `kernels-community/quantization-bitsandbytes` (through the `kernels` package, which transformers 5.25
    requires): seconds of waiting on every start where the hub cannot be reached (4.5 s measured here), and where it
    can, code nobody asked for, run by an eval-time layout peftkit turns off anyway (`load_model`). Refused its
    import, bitsandbytes falls back to its own kernels, as without `kernels` installed."""
    import sys

    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    missing = object()
    kernels = sys.modules.get("kernels", missing)
    sys.modules["kernels"] = None  # `from kernels import get_kernel` raises ImportError, which bitsandbytes catches
    quiet = logging.getLogger("bitsandbytes")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # (its note that the kernel did not load)
    try:
        import bitsandbytes
    finally:
        quiet.setLevel(level)
        if kernels is missing:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = kernels
    return bitsandbytes


def kept_modules(q: QuantizationConfig, task: str = "causal_lm") -> list[str]:
    """The modules bitsandbytes leaves in full precision: quantization.skip_modules, and a classifier's head (trained in
    full beside the adapter; transformers keeps the last module out of quantization only where no skip list is given,
    and a 4-bit head can neither train nor take a one-row output: bitsandbytes asserts on it)."""
    from peftkit.classify import HEAD_NAMES

    heads = [h for h in HEAD_NAMES if h not in q.skip_modules] if task == "sequence_classification" else []
    return [*q.skip_modules, *heads]


def bnb_config(q: QuantizationConfig, task: str = "causal_lm"):
    from transformers import BitsAndBytesConfig

    import_bitsandbytes()  # before transformers imports it

    if q.method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=kept_modules(q, task))
    # Spelled out, not left to defaults: bitsandbytes' Linear4bit alone means FP4, blocksize 64.
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.method,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=DTYPES[q.compute_dtype],
        bnb_4bit_quant_storage={"uint8": torch.uint8, **DTYPES}[q.quant_storage],
        llm_int8_skip_modules=kept_modules(q, task),
    )


def check_prequantized(config, quant: QuantizationConfig, name_or_path: str) -> None:
    """A checkpoint saved quantized (its config.json has a quantization_config: `peftkit merge --requantize`'s
    OUTPUT-nf4, a hub "-bnb-4bit" model) loads with its own settings: transformers ignores every setting of the
    quantization section (it only warns, in a log peftkit silences), so a recipe asking int8 or fp4 trained on nf4
    and recorded int8 in the adapter. A section that says otherwise of the stored weights (method, double_quant,
    quant_storage) is refused, naming the key; its compute_dtype, a setting of the layers, `load_model` applies."""
    saved = saved_quantization(config)
    if saved is None:
        return
    if saved.get("quant_method") != "bitsandbytes":
        raise PeftkitError(f"{name_or_path} is already quantized ({saved.get('quant_method')}, in its config.json's "
                           "quantization_config), and the quantization section quantizes through bitsandbytes: remove "
                           "the quantization section.")
    checkpoint = _stored_settings(saved, quant.method == "int8")
    differ = [f"quantization.{key}: {value}" for key, value in checkpoint.items() if getattr(quant, key) != value]
    if differ:
        raise PeftkitError(f"{name_or_path} is already quantized by bitsandbytes (its config.json's "
                           f"quantization_config): its weights load as they were stored, whatever the quantization section "
                           f"says. Set {', '.join(differ)} as the checkpoint has it, or quantize the unquantized model "
                           "instead.")


def saved_quantization(config) -> dict | None:
    """The quantization_config of a checkpoint saved quantized (its config.json's), as a dict; None for one that is
    not."""
    saved = getattr(config, "quantization_config", None)
    return None if saved is None else saved if isinstance(saved, dict) else saved.to_dict()


def _stored_settings(saved: dict, int8: bool) -> dict:
    """The quantization section's settings a bitsandbytes checkpoint's `saved` quantization_config stores (`int8`: the
    section asks int8, whose weights have no double_quant or quant_storage)."""
    four_bit = not saved.get("load_in_8bit")
    settings = {"method": saved.get("bnb_4bit_quant_type", "fp4") if four_bit else "int8"}
    if four_bit and not int8:
        settings |= {"double_quant": bool(saved.get("bnb_4bit_use_double_quant")),
                     "quant_storage": str(saved.get("bnb_4bit_quant_storage") or "uint8").removeprefix("torch.")}
    return settings


def check_quantization_section(config, cfg: ModelConfig, quant: QuantizationConfig | None,
                               resume: bool = False) -> None:
    """A run over a checkpoint saved by bitsandbytes needs the quantization section that says so: without it the
    weights loaded 4-bit all the same, and the adapter recorded an unquantized base, which a merge then loaded.
    `resume`: a run started so (before this was refused) cannot go on, since the section makes it another recipe."""
    saved = saved_quantization(config)
    if quant is not None or saved is None or saved.get("quant_method") != "bitsandbytes":
        return
    settings = ", ".join(f"{key}: {value}".replace("True", "true").replace("False", "false")
                         for key, value in _stored_settings(saved, False).items())
    said = (f"{cfg.name_or_path} is already quantized by bitsandbytes (its config.json's quantization_config), and "
            "the recipe has no quantization section.")
    if resume:
        raise PeftkitError(f"{said} This run was started without one, so it cannot be resumed: adding the section "
                           f"makes it another recipe. Train it again with the one the checkpoint has (quantization: "
                           f"{{{settings}}}), with --overwrite or in another export.output_dir, so that the adapter "
                           "records the quantized base it is trained against.")
    raise PeftkitError(f"{said} Add the one the checkpoint has (quantization: {{{settings}}}), so that the adapter "
                       "records the quantized base it is trained against, and merges and evaluations load it as "
                       "trained.")


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


def check_attention(cfg: ModelConfig, device: torch.device) -> None:
    """model.attn_implementation: flash_attention_2 runs on CUDA devices, with the flash-attn package, on 16-bit
    weights: flash-attn computes in fp16/bf16 only, and transformers casts fp32 queries to the weights' dtype
    wherever no autocast runs (mixed_precision: no, `peftkit eval`/`generate` without a recipe), which flash-attn
    then refuses."""
    if cfg.attn_implementation != "flash_attention_2":
        return
    if cfg.dtype == "float32" or (cfg.dtype == "auto" and _checkpoint_dtype(cfg) == "float32"):
        said = "float32" if cfg.dtype == "float32" else "auto, the checkpoint's float32"
        raise PeftkitError("model.attn_implementation: flash_attention_2 computes in float16 or bfloat16 only, and "
                           f"model.dtype is {said}. Set model.dtype: bfloat16 (the adapter still trains in float32), "
                           "or use sdpa.")
    if need := flash_attention_missing(device):
        raise PeftkitError(f"model.attn_implementation: flash_attention_2 needs {need}; use sdpa (or leave the key "
                           "out) here.")


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
               labels: LabelSet | None = None) -> nn.Module:
    """AutoModelForCausalLM (model.task: sequence_classification: AutoModelForSequenceClassification) from a local
    directory or hub id, in the recipe dtype, on `device`.

    Only safetensors weights are read (`use_safetensors=True`): loading never unpickles. A config.json or
    weights file that is corrupt, or weights that do not fit the config, raise a PeftkitError.

    Args:
        labels: a classifier's classes (its head's size, and the config's id2label/label2id); default
            model.num_labels classes named by their ids, else those of the checkpoint's config.json.
    """
    config = load_config(cfg)
    saved = saved_quantization(config)  # a checkpoint saved quantized: its config.json's quantization_config
    _check_weight_files(cfg)
    device = device or resolve_device(cfg.device)
    check_attention(cfg, device)
    kwargs: dict = dict(
        revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
        use_safetensors=True,
        dtype="auto" if cfg.dtype == "auto" else DTYPES[cfg.dtype],
        # Weights whose shape differs from the config are then listed in the loading info (and refused
        # below, in our words) instead of raising an error whose details went to a log we silence.
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
    quiet_transformers()
    model, loading_info = _from_pretrained(cfg.name_or_path, kwargs, device, cfg.task)
    if cfg.task == "sequence_classification":
        loading_info = _expected_for_new_head(model, loading_info, cfg)
    _check_weights_fit(model, loading_info, cfg.name_or_path)
    if quant is not None:
        refuse_quantized_tied_head(model, quant)
    if cfg.add_tokens:  # the embeddings hold the new tokens' rows (before any adapter wraps them)
        from peftkit.new_tokens import resize

        resize(model, len(load_tokenizer(cfg)))
    if quant is not None and quant.method != "int8" and saved is not None:
        # A checkpoint saved 4-bit loads with the compute dtype its config.json records: the recipe's is set here.
        from peftkit.methods.base import is_quantized

        for module in model.modules():
            if is_quantized(module) and hasattr(module, "compute_dtype"):
                module.compute_dtype, module.compute_type_is_set = DTYPES[quant.compute_dtype], True
    if quant is None and device.type != "cuda" and "device_map" not in kwargs:
        model.to(device)
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            # On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a Linear4bit's weight in place on its
            # first no-grad eval forward (our base eval) and from then on runs the layer in bf16 whatever
            # compute_dtype says, through a kernel without autograd: measured here, LoRA gradients off by
            # 112%, eval loss after 30 steps 3.46 instead of 1.97, absmax rounded to bf16 (so merges drift),
            # and a crash for layers narrower than 64. We keep the weights as quantized, on every CPU.
            module.support_avx512bf16_for_cpu = False
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    model.peftkit_revision = cfg.revision  # what else reads the base's files (a tokenizer) reads them at
    return model


def _from_pretrained(name_or_path: str, kwargs: dict, device: torch.device, task: str = "causal_lm") -> tuple[nn.Module, dict]:
    """AutoModelForCausalLM.from_pretrained (AutoModelForSequenceClassification for `task`
    sequence_classification), with the errors a user can cause said in our words."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if task == "sequence_classification" else AutoModelForCausalLM
    try:
        return auto.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as e:
        raise _not_loadable(name_or_path, e, kwargs.get("revision")) from None
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


def _expected_for_new_head(model: nn.Module, loading_info: dict, cfg: ModelConfig) -> dict:
    """The loading info without what a classifier is expected to lack: its new head (missing, or of another
    size when the base was a classifier with other classes) and the base's own output head (lm_head, BERT's
    `cls`), which the classifier does not use (unexpected). The decoder's pad token is set here too: the head
    reads the last token that is not padding, and transformers refuses batches of several rows without it. It is the
    tokenizer's, which pads the batches: a checkpoint's other pad id made the head read padding (figures that changed
    with the batch size)."""
    from peftkit.classify import head_names

    heads = tuple(f"{name}." for name in head_names(model))
    model.config.pad_token_id = load_tokenizer(cfg).pad_token_id
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
    mismatched = sorted(mismatched + _quantized_shape_mismatches(model))
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


def refuse_quantized_tied_head(model: nn.Module, quant: QuantizationConfig) -> None:
    """An output head that shares its weight with the embeddings (Qwen2's small models, Gemma, GPT-2) cannot be
    quantized: transformers swaps in a bitsandbytes layer that still holds the embeddings' float matrix, and its
    first forward fails inside bitsandbytes (a bare AssertionError for 4-bit, an AttributeError for int8)."""
    from peftkit.methods.base import is_quantized

    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embedding is None or not is_quantized(head) or head.weight is not embedding.weight:
        return
    name = next(n for n, m in model.named_modules() if m is head)
    raise PeftkitError(f"quantization.skip_modules {quant.skip_modules} leaves out {name}, the output head, and this "
                       f"model ties it to its input embeddings, which bitsandbytes cannot quantize. Add {name!r} to "
                       "quantization.skip_modules (its default, [lm_head], keeps it).")


def _quantized_shape_mismatches(model: nn.Module) -> list[tuple[str, tuple, tuple]]:
    """bitsandbytes layers whose quantized weight has another shape than the layer's config.

    transformers skips its shape check for weights it quantizes: a 64x32 checkpoint weight loads into a
    layer configured as 100x32 and only fails (or worse, not) at the first matmul.
    """
    from peftkit.methods.base import is_quantized

    found = []
    for name, module in model.named_modules():
        if is_quantized(module) and hasattr(module, "in_features"):
            quant_state = getattr(module.weight, "quant_state", None)
            saved = tuple(quant_state.shape) if quant_state is not None else tuple(module.weight.shape)
            expected = (module.out_features, module.in_features)
            if saved != expected:
                found.append((f"{name}.weight", saved, expected))
    return found


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
