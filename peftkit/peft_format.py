"""Reading and writing adapters in the Hugging Face PEFT checkpoint format.

A directory holds `adapter_model.safetensors` (keys `base_model.model.<path>.lora_A.weight`, ...) and
`adapter_config.json` (written and read by the adapter's method: `to_peft` / `from_peft`, `peft_type`
picking the method on reading), so `peft.PeftModel.from_pretrained(base, dir)` and vLLM load it unchanged. peftkit
adds `peftkit.json` with what the PEFT format has no field for (the quantization the adapter was trained
against, so that a merge dequantizes the same 4-bit weights; the base's RoPE scaling); PEFT tools ignore that file.

What is not the adapter directory itself lives beside this module: peftkit.json's fields in `peftkit.adapter_meta`,
which of peft's config fields peftkit implements in `peftkit.peft_fields`, the JSON settings-file reading in
`peftkit.settings_json`, and a recipe's `adapter.init_from` in `peftkit.init_from`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from peftkit import __version__
from peftkit.adapter_meta import META_NAME, read_meta
from peftkit.errors import PeftkitError
from peftkit.fileio import atomic_write_bytes, atomic_write_json
from peftkit.methods import METHODS, Method, method_for_peft_type, method_of
from peftkit.methods.base import REEXPORT, PeftConfigBase
from peftkit.methods.monteclora import without_sampler
from peftkit.peft_fields import check_peft_fields
from peftkit.recipe import AdapterConfig, QuantizationConfig, RopeScalingConfig
from peftkit.settings_json import read_json_object, show_value, validated

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
TASK_TYPES = {"causal_lm": "CAUSAL_LM", "sequence_classification": "SEQ_CLS"}
"""model.task -> PEFT's task_type."""


def peft_config(cfg: AdapterConfig, targets: list[str], base_name: str, fan_in_fan_out: bool,
                model_type: str | None = None, revision: str | None = None, task: str = "causal_lm",
                model_config=None) -> dict:
    """adapter_config.json of an adapter on the modules `targets`, as its method writes it.

    Args:
        model_type: the base's architecture (transformers' `config.model_type`), for the settings a method
            leaves to it (IA3's feed-forward modules).
        revision: the hub revision the base was loaded at (`model.revision`), in PEFT's own `revision` field:
            peft's `AutoPeftModelForCausalLM` and peftkit's merge/eval load the base at it, not at the branch head.
        task: model.task, as PEFT's `task_type` (`CAUSAL_LM`, `SEQ_CLS`): which peft model class, and which
            transformers Auto class, loads the adapter.
        model_config: the base's transformers config, for the fields a method reads from it (the prompt family's
            `token_dim`, `num_layers`, `num_attention_heads`: `Method.model_facts`).
    """
    method = method_of(cfg)
    cfg = method.resolve(cfg, model_type)
    config = method.to_peft(cfg, targets, base_name, fan_in_fan_out)
    if model_config is not None:
        config |= method.model_facts(cfg, model_config)
    config["revision"] = revision
    config["task_type"] = TASK_TYPES[task]
    return config


def saved_module_paths(names: list[str], state: dict[str, torch.Tensor]) -> list[str]:
    """The full paths of the `modules_to_save` modules `names` picks (by dotted suffix, as peftkit does), from
    the state dict's keys. adapter_config.json lists these, not the names: peft matches by *string* suffix, so
    `norm` would also catch `input_layernorm` there, which the file does not hold. A name found in no key stays."""
    paths = {key.removeprefix("base_model.model.").rsplit(".", 1)[0] for key in state}
    out: set[str] = set()
    for name in names:
        hits = {p for p in paths if p == name or p.endswith(f".{name}")}
        out |= hits or {name}
    return sorted(out)


def save_adapter(
    path: str | Path,
    state: dict[str, torch.Tensor],
    config: dict,
    quantization: QuantizationConfig | None = None,
    quantized_on: str | None = None,
    trust_remote_code: bool = False,
    labels: list[str] | None = None,
    rope_scaling: RopeScalingConfig | None = None,
    base_dtype: str | None = None,
    added_tokens: list[str] | None = None,
    reward_center: float | None = None,
    sources: dict | None = None,
) -> None:
    """Write the three files, each atomically; the weights last-but-one so a reader never sees new config
    with old weights for long. Callers that need the whole directory atomic wrap it in atomic_directory.

    Args:
        quantization: the bitsandbytes settings of the base the adapter was trained against, if any.
        quantized_on: 'cpu' or 'cuda', where that base was quantized: a merge re-quantizes there, because
            bitsandbytes' CPU and CUDA kernels can round a few weights differently.
        trust_remote_code: the base ran its own modelling code (`model.trust_remote_code`). Recorded as a
            fact only: a merge or eval of this adapter needs the user's own `--trust-remote-code`.
        labels: a classifier's class names by id (model.task: sequence_classification), so that eval maps a row's
            label to the id training used.
        rope_scaling: the base's model.rope_scaling, so that eval, generate and merge load the base scaled alike.
        base_dtype: the model.dtype a quantized base loaded in before it was quantized (recorded with
            `quantization` only): quantizing from bfloat16 and from float32 weights gives different 4-bit codes.
        added_tokens: model.add_tokens, the special tokens added to the base's tokenizer (and rows to its embeddings)
            in training, which the adapter's users add again (`peftkit.new_tokens`).
        reward_center: a reward model's training.reward_center, where not 0: `peftkit eval` of the adapter without
            its recipe scores its loss with the same centring term, as the run did.
        sources: the peftkit.json fields naming what the method copied into the directory (`Method.save_sources`:
            X-LoRA's `experts`).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if config.get("modules_to_save"):
        config = config | {"modules_to_save": saved_module_paths(config["modules_to_save"], state)}
    atomic_write_json(path / CONFIG_NAME, config)
    state = with_shared_copies(state, config.get("peft_type"))
    if method := next((m for m in METHODS.values() if m.peft_type == config.get("peft_type")), None):
        state = method.to_peft_file(state, config)
    atomic_write_bytes(path / WEIGHTS_NAME, save(state, metadata={"format": "pt"}))
    meta = {"peftkit_version": __version__, "quantization": quantization.model_dump() if quantization else None,
            "quantized_on": quantized_on if quantization else None, "trust_remote_code": trust_remote_code}
    if quantization and base_dtype is not None:
        meta["base_dtype"] = base_dtype
    if labels is not None:
        meta["labels"] = labels
    if rope_scaling is not None:
        meta["rope_scaling"] = rope_scaling.model_dump()
    if added_tokens:
        meta["added_tokens"] = list(added_tokens)
    if reward_center:
        meta["reward_center"] = reward_center
    atomic_write_json(path / META_NAME, meta | (sources or {}))


_REEXPORT = REEXPORT


def with_shared_copies(state: dict[str, torch.Tensor], peft_type: str | None) -> dict[str, torch.Tensor]:
    """`state` with each saved shared tensor (`base_model.<name>`) also under every adapted layer, where peft's file
    of `peft_type` repeats it there (`Method.shared_copies_per_layer`: peft loads a file without them, but warns of
    missing keys)."""
    method = next((m for m in METHODS.values() if m.peft_type == peft_type and m.shared_copies_per_layer), None)
    if method is None:
        return state
    from peftkit.adapters import PEFT_PREFIX, SHARED_PREFIX, modules_adapted_by

    shared = {n: state[f"{SHARED_PREFIX}{n}"] for n in method.shared_names if f"{SHARED_PREFIX}{n}" in state}
    copies = {f"{PEFT_PREFIX}{m}.{n}": t.clone() for m in sorted(modules_adapted_by(state, method))
              for n, t in shared.items()}
    return state | copies


def without_shared_copies(method: type[Method], state: dict[str, torch.Tensor], file: Path) -> dict[str, torch.Tensor]:
    """`state` without peft's per-layer copies of the shared tensors (`with_shared_copies`), each checked equal to
    the shared one: a file whose copies differ holds two adapters' bases, of which peft would use one at random."""
    if not method.shared_copies_per_layer:
        return state
    from peftkit.adapters import SHARED_PREFIX

    kept = dict(state)
    for name in method.shared_names:
        copies = [k for k in state if k.endswith(f".{name}") and not k.startswith(SHARED_PREFIX + name)]
        shared = state.get(f"{SHARED_PREFIX}{name}", state[copies[0]] if copies else None)
        for key in copies:
            if not torch.equal(state[key], shared):
                raise PeftkitError(f"{file}: {key} differs from {SHARED_PREFIX}{name}, the tensor every layer shares: "
                                   "the file is damaged or mixes two adapters. Export the adapter again.")
            del kept[key]
        if shared is not None:
            kept[f"{SHARED_PREFIX}{name}"] = shared
    return kept


def read_peft_config(path: Path) -> tuple[type[Method], PeftConfigBase]:
    """The method and typed adapter_config.json of `path`; its `peft_type` picks the method."""
    config_file = path / CONFIG_NAME
    raw = read_json_object(config_file, _REEXPORT)
    method = method_for_peft_type(raw.get("peft_type"), config_file)
    peft = validated(method.peft_config, config_file, raw, _REEXPORT)
    check_peft_fields(method, raw, config_file)
    if not method.targets_in_config:
        return method, peft
    if method.layer_targets and peft.target_modules is None and (found := _targets_in_weights(path, method)):
        if parameters := getattr(peft, "target_parameters", None):  # (their modules' wrappers are not targets)
            holders = {"base_layer"} | {p.rpartition(".")[0].rsplit(".", 1)[-1] for p in parameters if "." in p}
            found = [name for name in found if name not in holders]
        peft.target_modules = found  # peft takes the architecture's default targets; the weights say which
    if method.layer_targets and not peft.target_modules and not getattr(peft, "target_parameters", None):
        raise PeftkitError(f'{config_file}: "target_modules" is {show_value(peft.target_modules)}; it should name the '
                           f"adapted modules (a list of names, or a regular expression string). {_REEXPORT}")
    return method, peft


def _targets_in_weights(path: Path, method: type[Method]) -> list[str]:
    """The names of the modules an adapter's weights adapt (`q_proj`), from its file's header; [] where unreadable."""
    from safetensors import safe_open

    from peftkit.adapters import modules_adapted_by

    weights_file = path / WEIGHTS_NAME
    try:
        with safe_open(weights_file, "pt") as f:
            keys = list(f.keys())  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError) as e:  # (said here: "target_modules is null" would blame the config)
        raise unreadable_safetensors(weights_file, e, "Export the adapter again, or copy it again") from None
    keys = without_adapter_name(keys, method, weights_file).values()
    return sorted({module.rsplit(".", 1)[-1] for module in modules_adapted_by(dict.fromkeys(keys), method)})


def unreadable_safetensors(file: Path, error: Exception, fix: str) -> PeftkitError:
    """The error for a safetensors file that cannot be read: truncated by an interrupted copy, or overwritten; or
    one this user may not read (safetensors says "No such file or directory" of it too)."""
    try:
        with open(file, "rb"):
            pass
    except PermissionError:
        return PeftkitError(f"{file} is not readable (permission denied). Ask for read access to it, or copy it "
                            "somewhere you can read.")
    except FileNotFoundError:
        return PeftkitError(f"{file} is missing (a link to a file that is gone?). {fix}.")
    size = file.stat().st_size
    return PeftkitError(f"{file} is truncated or corrupt ({size:,} bytes; safetensors says: {error}). {fix}.")


def run_adapter(path: str) -> str:
    """A training run's directory (no adapter_config.json; its exported adapter/ holding one) as its adapter/, which
    `--adapter RUN_DIR` and a recipe's adapter directories (adapter.init_from, X-LoRA's experts, AdapterFusion's
    fuse) mean, as `eval RUN_DIR`, `generate RUN_DIR` and `push RUN_DIR` read it; else `path`."""
    run = Path(path)
    if run.is_dir() and not (run / CONFIG_NAME).exists() and (run / "adapter" / CONFIG_NAME).is_file():
        return str(run / "adapter")
    return path


def _not_an_adapter(path: Path) -> str:
    """What the directory `path`, which holds no adapter_config.json, is instead (a run, a model, peft's save of
    several adapters), and what to give; '' where nothing is known."""
    run = (path / "recipe.yaml").is_file()
    if (path / "adapter" / CONFIG_NAME).exists():
        return f" It is a training run's directory: its adapter is {path / 'adapter'}."
    if (path / "config.json").exists():
        return " It holds a full model (config.json); pass it as --model/--base instead."
    if run and (path / "merged" / "config.json").is_file():
        return (" It is a training run's directory holding no adapter/ (export.adapter: false); its model with the "
                f"adapter merged in is {path / 'merged'} (eval, generate and chat take it as --model).")
    if run:
        return (" It is a training run's directory holding no adapter/ (export.adapter: false, or the run has not "
                "finished: `peftkit train RECIPE --resume` finishes it).")
    # peft's save_pretrained of a model with several adapters writes each but `default` to a subfolder of its name
    if named := sorted(d.name for d in path.iterdir() if (d / CONFIG_NAME).is_file()):
        return (f" Its subdirectories {', '.join(named[:5])}{', ...' * (len(named) > 5)} hold adapters (peft saves "
                f"each adapter of a model but 'default' in one named after it): give one of those, e.g. "
                f"{path / named[0]}.")
    return ""


def check_adapter_dir(path: Path) -> Path:
    """The weights file of the adapter directory `path`; a PeftkitError saying what is missing otherwise (no
    directory, a full model's directory, no safetensors weights)."""
    if path.exists() and not path.is_dir():
        raise PeftkitError(f"{path} is a file, not an adapter directory: an adapter is a directory holding "
                           f"{CONFIG_NAME} and {WEIGHTS_NAME}. Give that directory.")
    if not path.is_dir():
        from peftkit.hub import hub_shaped

        hub = not path.is_absolute() and len(path.parts) == 2 and hub_shaped(str(path)) and not Path(path.parts[0]).is_dir()
        raise PeftkitError(f"Adapter directory not found: {path}" + (
            ". An adapter is read from a local directory; for one on the Hugging Face hub, the peftkit commands take "
            f"its id (--adapter {path}), and `peftkit.hub.hub_adapter('{path}')` gives its directory." if hub else ""))
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not config_file.exists():
        raise PeftkitError(f"{path} is not a PEFT adapter directory: it has no {CONFIG_NAME}.{_not_an_adapter(path)}")
    if not weights_file.exists():
        legacy = (" Only adapter_model.bin is there; peftkit loads safetensors only (it never unpickles). If you trust "
                  "the file, convert it: peft's PeftModel.from_pretrained(base, DIR).save_pretrained(NEW_DIR) writes "
                  f"{WEIGHTS_NAME}." if (path / "adapter_model.bin").exists() else "")
        raise PeftkitError(f"{path} has no {WEIGHTS_NAME}.{legacy}")
    if not weights_file.is_file():  # opening a FIFO would wait for ever, deaf to Ctrl-C (the JSON files: read_json_object)
        raise PeftkitError(f"{weights_file} is not a regular file (a device, a FIFO or a directory). Copy the adapter "
                           "again from where it came from.")
    return weights_file


def load_adapter(path: str | Path) -> tuple[AdapterConfig, dict[str, torch.Tensor], PeftConfigBase, QuantizationConfig | None]:
    """Read a PEFT adapter directory of any registered method: (adapter settings, PEFT-keyed tensors, PEFT
    config, quantization or None).

    Raises a PeftkitError naming the file and the field for anything malformed, and for weights holding
    NaN or inf (an adapter saved after training diverged).
    """
    from peftkit.adapters.state_dicts import nonfinite_tensors

    path = Path(path)
    weights_file = check_adapter_dir(path)
    config_file = path / CONFIG_NAME
    method, peft = read_peft_config(path)
    cfg = method.from_peft(peft, config_file)
    quant = read_meta(path).quantization
    try:
        state = load_file(weights_file)
    except (SafetensorError, OSError) as e:
        raise unreadable_safetensors(weights_file, e, "Export the adapter again, or copy it again") from None
    if method.layer_targets and state and not any(key.startswith("base_model.") for key in state):  # (peft: KeyError)
        example = next((k for k in state if any(k.endswith(f".{p}") for p in method.param_names)), next(iter(state)))
        raise PeftkitError(f"{weights_file}: its keys lack peft's 'base_model.model.' prefix (e.g. {example}): "
                           "it holds a model's state_dict, not an adapter as peft's save_pretrained writes it. Load it "
                           "into the peft model it came from and save that with save_pretrained, or add the prefix to "
                           "every key.")
    # peft's save_embedding_layers (the vocabulary resized: new tokens) adds a saved module's wrapper copies beside its
    # weights (embed_tokens.modules_to_save.weight, .original_module.weight, with embed_tokens.weight): the plain key
    # is the trained module, as peft loads it.
    def unwrapped(key: str) -> str:
        return key.replace(".modules_to_save.", ".").replace(".original_module.", ".")

    state = {key: tensor for key, tensor in state.items() if unwrapped(key) == key or unwrapped(key) not in state}
    if copies := [key for key in state if ".modules_to_save." in key or ".original_module." in key]:  # (peft: KeyError)
        raise PeftkitError(f"{weights_file} holds peft's in-memory modules_to_save wrapper ({copies[0]}): it is a peft "
                           "model's state_dict, not an adapter as peft's save_pretrained writes it. Save that peft model "
                           "with save_pretrained.")
    state = {new: state[key] for key, new in without_adapter_name(state, method, weights_file).items()}
    state = without_sampler(state, peft)  # (MonteCLoRA's training state)
    state = without_shared_copies(method, state, weights_file)
    check_weights_are_of(method, state, weights_file)
    check_adapter_tensors(method, state, weights_file)
    if getattr(cfg, "modules_to_save", None) and "modules_to_save" in type(cfg).model_fields:
        cfg = cfg.model_copy(update={"modules_to_save": peft_saved_modules(cfg.modules_to_save, state, method)})
    if bad := nonfinite_tensors(state):
        raise PeftkitError(
            f"{weights_file}: {len(bad)} of its {len(state)} tensors hold NaN or inf values (e.g. {bad[0]}): training "
            "diverged before this adapter was saved. Train again with a lower training.lr (or a training.max_grad_norm), "
            "or use an earlier checkpoint."
        )
    state = method.from_peft_file(state, peft, weights_file)  # (after the checks: VB-LoRA's top-k logits are -inf)
    # A rank past every width in the file is refused before r x width is allocated per layer (r: 10**9 was a 128 GB
    # allocation); a plausible one that does not match is said, layer by layer, when the weights are loaded.
    ranks = {t.shape[0] for k, t in state.items() if ".lora_A." in k and t.dim() == 2}
    widest = max((max(t.shape) for t in state.values() if t.dim()), default=0)
    if ranks and isinstance(r := getattr(cfg, "r", None), int) and r > max(ranks) and r > widest:
        raise PeftkitError(f"The adapter's weights do not match its {CONFIG_NAME}: it says r: {r}, and its lora_A "
                           f"weights have rank {max(ranks)} at most. Fix the file, or export the adapter again.")
    return cfg, state, peft, quant


def check_weights_are_of(method: type[Method], state: dict[str, torch.Tensor], weights_file: Path) -> None:
    """Refuse weights of none of `method`'s tensors that are another method's (LoRA's lora_A under a peft_type IA3):
    an adapter_config.json from another adapter, which loading said as weights "for modules this model lacks"."""
    from peftkit.adapters import modules_adapted_by
    from peftkit.methods import METHODS

    if not method.layer_targets or not method.param_names or not state or modules_adapted_by(state, method):
        return
    for other in METHODS.values():  # (not trainable tokens: LoRA's trainable_token_indices save their tensor too)
        if other.layer_targets and other.name != "trainable_tokens" and (adapted := modules_adapted_by(state, other)):
            raise PeftkitError(
                f"{weights_file} holds {other.title} tensors (e.g. on '{min(adapted)}'), and its {CONFIG_NAME} says "
                f"peft_type {method.peft_type} ({method.title}): the two files come from different adapters. Put back "
                f"the {CONFIG_NAME} saved with these weights, or export the adapter again.")


def check_adapter_tensors(method: type[Method], state: dict[str, torch.Tensor], weights_file: Path) -> None:
    """Refuse an adapter tensor (`lora_A.weight`, ...) that is not floating-point, or that lacks the dimension its rank
    is on (a 0-d lora_A): every command that loads the file (a merge of several adapters cast an int32 lora_B into
    its sums without a word, and indexed past a 0-d lora_A's shape)."""
    for key, tensor in state.items():
        kind = next((p for p in method.param_names if key.endswith(f".{p}")), None)
        if kind is None:
            continue
        if not tensor.is_floating_point() and kind not in method.integer_names:  # (SHiRA's indices: int32)
            raise PeftkitError(f"{weights_file}: {key} is {str(tensor.dtype).removeprefix('torch.')}, where adapter "
                               "weights are floating-point: cast, it would give other numbers than were saved. The file "
                               "is damaged, or not a PEFT adapter's; export the adapter again.")
        dim = method.rank_dims.get(kind.removesuffix(".weight"))
        if dim is not None and dim >= tensor.dim():
            raise PeftkitError(f"{weights_file}: {key} has shape {tuple(tensor.shape)}, with no dimension {dim} (its "
                               "rank): the file is damaged, or not a PEFT adapter's. Export the adapter again, or copy "
                               "it again.")


def peft_saved_modules(names: list[str], state: dict[str, torch.Tensor], method: type[Method]) -> list[str]:
    """adapter_config.json's modules_to_save `names` as the module paths the file holds, where peft's *string* suffix
    match picked modules that peftkit's dotted one misses (peft's `layernorm` saves every `input_layernorm`, which
    matched no module here and was refused; its `norm` saves those beside `model.norm`, which a run from it with
    adapter.init_from then froze, and left out of its adapter): those paths, so that what peft saved is what loads,
    trains and is saved again. Every other name stays (the counterpart of `saved_module_paths`)."""
    paths = {key.removeprefix("base_model.model.").rsplit(".", 1)[0] for key in state
             if not any(key.endswith(f".{p}") for p in method.param_names)}  # (not the adapter's own tensors)
    out: list[str] = []
    for name in names:
        dotted = {p for p in paths if p == name or p.endswith(f".{name}")}
        caught = {p for p in paths if p.endswith(name)}
        out += sorted(caught) if caught - dotted else [name]
    return list(dict.fromkeys(out))


def without_adapter_name(keys: Iterable[str], method: type[Method], file: Path) -> dict[str, str]:
    """{saved key: PEFT key} for a file whose keys carry peft's in-memory adapter name, as `model.state_dict()`
    has them (`q_proj.lora_A.default.weight`, DoRA's `lora_magnitude_vector.default.weight` or
    `lora_magnitude_vector.weight`), where save_pretrained writes `q_proj.lora_A.weight`; peft loads both, and so
    does peftkit. Every key maps to itself where none carries a name; a file of several names is refused."""
    params = {p.removesuffix(".weight"): p for p in method.param_names}
    if not params:
        return {key: key for key in keys}
    alternatives = "|".join(map(re.escape, sorted(params, key=len, reverse=True)))  # the longest first
    pattern = re.compile(rf"^(.*\.)({alternatives})\.([^.]+)(\.weight)?$")
    renamed, names = {}, set()
    for key in keys:
        match = pattern.match(key)
        # (a model-level key, `base_model.<name>...`, carries no adapter name: TinyLoRA's `base_model.tinylora_v.0`)
        if match is None or any(key.endswith(f".{p}") for p in method.param_names) or \
                not key.startswith("base_model.model."):
            renamed[key] = key
            continue
        head, param, name, weight = match.groups()
        if name != "weight" or weight:  # (`lora_magnitude_vector.weight`: a module's weight, no name)
            names.add(name)
        renamed[key] = head + params[param]
    if len(names) > 1:
        raise PeftkitError(f"{file} holds the tensors of {len(names)} adapters ({', '.join(sorted(names))}, the names "
                           "in its keys): save each with peft's save_pretrained, one directory per adapter.")
    if len(set(renamed.values())) < len(renamed):
        return {key: key for key in renamed}  # the plain keys are there too: loading says what does not fit
    return renamed


def recorded_base(adapter_dir: str | Path, field: str = "base_model_name_or_path") -> str | None:
    """The adapter's base_model_name_or_path (or another string `field`, e.g. `revision`), best effort and
    without reading its weights (a broken config is `load_adapter`'s to report)."""
    config = Path(adapter_dir) / CONFIG_NAME
    if not config.is_file():  # a FIFO would block the read for ever (loading then says what the file is)
        return None
    try:
        base = json.loads(config.read_text(encoding="utf-8")).get(field)
    except (OSError, ValueError, AttributeError):
        return None
    return base if isinstance(base, str) else None


def trained_base_biases(cfg, state: dict[str, torch.Tensor]) -> list[str]:
    """The base's biases an adapter's file holds (peft's `bias: all` / `lora_only`), not its method's own tensors
    (lora_B.bias of `lora_bias`), as module paths."""
    from peftkit.adapters import PEFT_PREFIX
    from peftkit.methods import method_of

    own = method_of(cfg).param_names
    return sorted(key.removeprefix(PEFT_PREFIX).removesuffix(".bias").replace(".base_layer", "") for key in state
                  if key.endswith(".bias") and not any(key.endswith("." + n) for n in own))
