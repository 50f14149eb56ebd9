"""`peftkit merge`: an adapter folded into its base (`peftkit.merge_weights`) and saved as a plain model with its
tokenizer and a record of its base; the checks of --output and the merge's device, and --requantize.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.fileio import atomic_directories
from peftkit.merge_weights import MergeWarning, base_tensors, merged_model
from peftkit.merge_weights import dequantize_weight as dequantize_weight  # re-exported: peftkit.methods.lora_layers
from peftkit.methods.layer import refuse_unmergeable


MERGED_FROM_NAME = "peftkit.json"
SHARD_SIZE = "5GB"
"""Largest file of a saved model: transformers 5 writes up to 50 GB in one file (an 8B model whole), where the hub's
checkpoints, S3's single uploads and most tools expect shards of at most 5 GB (transformers 4's default)."""


def base_provenance(name_or_path: str, revision: str | None, trust_remote_code: bool,
                    reward_center: float | None = None) -> dict:
    """What a merged model was made from: saved beside it, since config.json has no field for a base's hub
    revision (a merged model is a local directory, so nothing reloads at a revision; this is the record). With a
    reward model's centring weight (training.reward_center), which `peftkit eval --model DIR` scores its loss with."""
    made = {"merged_from": {"base_model_name_or_path": name_or_path, "revision": revision,
                            "trust_remote_code": trust_remote_code}}
    return made | ({"reward_center": reward_center} if reward_center else {})


def model_record(name_or_path: str | Path, revision: str | None = None) -> dict | None:
    """The peftkit.json beside a merged model (or an adapter), read from its directory or, for a hub id, from the hub
    (or its cache offline: `peftkit push --merged` publishes it with the model, and transformers never fetches it);
    None where there is none or it cannot be read."""
    path = Path(name_or_path)
    if not path.is_dir():
        from peftkit.hub import hub_file

        path = hub_file(str(name_or_path), MERGED_FROM_NAME, revision)
        if path is None:
            return None
        path = path.parent
    try:
        record = json.loads((path / MERGED_FROM_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def recorded_reward_center(path: str | Path, revision: str | None = None) -> float:
    """The centring weight an adapter's or a merged model's peftkit.json records (0: none recorded); a hub model's at
    `revision` (`model_record`)."""
    record = model_record(path, revision) or {}
    center = record.get("reward_center")
    return float(center) if isinstance(center, (int, float)) and not isinstance(center, bool) else 0.0


def merged_from(model_dir: str | Path, revision: str | None = None) -> str | None:
    """The base a merged model was made from (its peftkit.json `merged_from`, `base_provenance`'s record; a hub
    model's read from the hub at `revision`, the one its weights load at, `model_record`); None for a model without
    one (not merged by peftkit) or whose record cannot be read."""
    return (merged_base(model_dir, revision) or (None, None))[0]


def merged_base(model_dir: str | Path, revision: str | None = None) -> tuple[str, str | None] | None:
    """(base, its revision) a merged model (a directory, or a hub id at `revision`: `model_record`) was made from, as
    `merged_from` reads them; None as there."""
    try:
        record = (model_record(model_dir, revision) or {})["merged_from"]
        name, revision = str(record["base_model_name_or_path"] or ""), record.get("revision")
    except (KeyError, TypeError, AttributeError):
        return None
    return (name, revision if isinstance(revision, str) else None) if name else None


def same_base(a: str, b: str) -> bool:
    """Whether two names of a base model name one model: the same name, or the same local directory (a hub id by its
    snapshot in the local cache, `peftkit.manifest.model_directory`)."""
    from peftkit.manifest import model_directory

    if a == b:
        return True
    where = [model_directory(n) for n in (a, b)]
    return None not in where and where[0].resolve() == where[1].resolve()


def save_merged(model: nn.Module, tokenizer, output_dir: str | Path, provenance: dict | None = None,
                replace: bool = True, requantized: tuple[Path, str] | None = None,
                base: dict[str, Callable[[], torch.Tensor]] | None = None) -> None:
    """save_pretrained of the model and tokenizer into `output_dir`, atomically as a directory.

    Args:
        provenance: `base_provenance(...)`, written to peftkit.json beside the model.
        replace: replace an `output_dir` that is there by then (`peftkit merge --overwrite`); else one that another
            process wrote meanwhile is an error.
        requantized: (directory, method) of `--requantize`: the merged model re-quantized there, the two written as a
            pair (`atomic_directories`): a failure, Ctrl-C or kill at any moment leaves the earlier pair, never a new
            `output_dir` beside an old re-quantized one, or the other way round.
        base: with `requantized`, the weights the merge started from (`merge_weights.base_tensors` of the adapted
            model): the re-quantized model's peftkit.json then records how much of the update it keeps
            (`peftkit.requantized.update_kept`).
    """
    if tokenizer is not None:
        stop_at_turn_end(model, tokenizer)
    paths = [Path(output_dir), *([requantized[0]] if requantized else [])]
    with atomic_directories(paths, replace) as tmps:
        write_model(model, tokenizer, tmps[0], provenance)
        if requantized is not None:
            requantize_into(tmps[0], tmps[1], requantized[1], (model, base) if base is not None else None)


def write_model(model: nn.Module, tokenizer, directory: Path, provenance: dict | None = None) -> None:
    """The files of a saved model in `directory` (a temporary one, put in place by the caller)."""
    model.save_pretrained(directory, max_shard_size=SHARD_SIZE)
    if tokenizer is not None:
        base = (provenance or {}).get("merged_from", {})
        save_tokenizer(tokenizer, Path(directory), base.get("base_model_name_or_path") or tokenizer.name_or_path,
                       base.get("revision"))
    if provenance is not None:  # a plain write: atomic_directories syncs every file before the rename
        (Path(directory) / MERGED_FROM_NAME).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")


def stop_at_turn_end(model: nn.Module, tokenizer) -> None:
    """Add the chat template's end-of-turn token (`<|im_end|>` of ChatML given to a base model, by data.chat_template
    or model.add_tokens) to the merged model's generation_config.json `eos_token_id` where it is not there, so that
    transformers' `generate` and vLLM stop at the end of an answer, as peftkit's generate does (and as a chat model's
    own config has it: Qwen2's lists `<|im_end|>` beside `<|endoftext|>`)."""
    from peftkit.data.conversations import turn_end_token

    config = getattr(model, "generation_config", None)
    if config is None or (turn_end := turn_end_token(tokenizer)) is None:
        return
    eos = config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if turn_end not in eos:
        config.eos_token_id = [*eos, turn_end] if eos else turn_end


def save_tokenizer(tokenizer, out: Path, name_or_path: str, revision: str | None = None) -> None:
    """The base's own tokenizer files, copied byte for byte, where its directory has them and they load to the same
    tokenizer; else `tokenizer.save_pretrained`. save_pretrained writes transformers 5's layout (tokenizer_class
    `TokenizersBackend`, the chat template in chat_template.jinja only), which transformers 4 cannot read (llama.cpp's
    GGUF converter pins it; TGI reads the template from tokenizer_config.json), and the pad token peftkit pads with
    where the base has none (EOS: a collator that masks padding out of the labels then never trains EOS). A tokenizer
    given another chat template (data.chat_template) keeps the base's files with that template written in
    (`_with_template`)."""
    import shutil

    from peftkit.manifest import TOKENIZER_FILES, model_directory

    source = model_directory(name_or_path, revision) if name_or_path else None
    files = [source / name for name in TOKENIZER_FILES if (source / name).is_file()] if source else []
    for file in files:
        shutil.copyfile(file, out / file.name)
    if files and _same_tokenizer(out, tokenizer):
        return
    if files and _with_template(out, tokenizer.chat_template) and _same_tokenizer(out, tokenizer):
        return
    for file in files:
        (out / file.name).unlink()
    tokenizer.save_pretrained(out)


def _with_template(directory: Path, template) -> bool:
    """Write `template` into the copied tokenizer files in `directory`: tokenizer_config.json's `chat_template`, where
    transformers 4, TGI and llama.cpp's converter read it, and a chat_template.jinja the base has (which transformers
    5 reads first). False where there is no tokenizer_config.json, or no single template, to write."""
    config = directory / "tokenizer_config.json"
    if not isinstance(template, str) or not config.is_file():
        return False
    try:
        settings = json.loads(config.read_text(encoding="utf-8"))
    except ValueError:
        return False
    if not isinstance(settings, dict):
        return False
    settings["chat_template"] = template
    config.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if (directory / "chat_template.jinja").is_file():
        (directory / "chat_template.jinja").write_text(template, encoding="utf-8")
    return True


def _same_tokenizer(directory: Path, tokenizer) -> bool:
    """Whether `directory` loads to a tokenizer that encodes as `tokenizer` does (its pad token aside)."""
    from transformers import AutoTokenizer

    probe = "Hello, world! 342 → «ünïcödé» 你好\n\t  end</s>"
    try:
        copied = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)  # never a prompt, never code
    except Exception:  # noqa: BLE001 - files that do not load alone (a tokenizer of remote code): saved instead
        return False
    return (copied.get_vocab() == tokenizer.get_vocab() and copied(probe)["input_ids"] == tokenizer(probe)["input_ids"]
            and copied.eos_token == tokenizer.eos_token and copied.bos_token == tokenizer.bos_token
            and getattr(copied, "chat_template", None) == getattr(tokenizer, "chat_template", None))


def merge_device(adapter_dir: str) -> torch.device:
    """CPU, except for an adapter trained against a base quantized on CUDA, when CUDA is here.

    The merge re-quantizes the base and adds the delta to dequant(quant(W)). bitsandbytes' CUDA and CPU
    kernels can round a few weights to neighbouring 4-bit codes, so quantizing on the training device is
    what gives back the exact weights the adapter was trained against.
    """
    from peftkit.adapter_meta import quantized_on, requantized_note

    if quantized_on(adapter_dir) == "cuda" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if note := requantized_note(adapter_dir, "cpu", "the merged model may differ slightly from the trained one",
                                "Merge on a GPU machine for an exact merge."):
        warnings.warn(note, MergeWarning, stacklevel=3)
    return torch.device("cpu")


def check_merge_output(output: Path, protected: dict[str, str | None], overwrite: bool) -> Path:
    """Refuse an --output whose replacement would delete something peftkit did not write; the output resolved (a
    symbolic link's target: what is checked is what is written).

    `output` is replaced as a whole, so it must not be (or contain) the current directory, the base model or
    the adapter, even with --overwrite; an existing file, model or adapter directory needs --overwrite; any other
    non-empty directory (a run, the user's own files) is refused even with it. A pair write into `output` (`merge
    --requantize`) that a kill stopped while it was put in place, whose record is still there and names `output` (as
    its OUTPUT or its OUTPUT-nf4), is first rolled back to the earlier pair (`fileio.recorded_pair`).

    Args:
        protected: {'base model': path, 'adapter': path}; values that are not local paths are ignored.
    """
    from peftkit.fileio import names_locked, resolved
    from peftkit.rundir import make_writable_dir

    output = resolved(output, "--output")
    cwd = Path.cwd().resolve()
    if output == cwd or output in cwd.parents:
        raise PeftkitError(f"--output {output} is the current directory or one above it; the merged model replaces "
                           "its output directory as a whole. Name a new directory, e.g. --output merged-model.")
    for label, path in protected.items():
        if path and Path(path).exists():
            held = Path(path).resolve()
            if output == held or output in held.parents:
                raise PeftkitError(f"--output {output} is the {label} ({held}){' or holds it' if output != held else ''};"
                                   " writing the merged model there would delete it. Choose another --output.")
            if held in output.parents:  # inside an adapter (or, below, a run): verify would find it added
                raise PeftkitError(f"--output {output} is inside the {label} ({held}); a directory added there changes "
                                   "what it holds. Choose an --output outside it.")
    if run := next((p for p in output.parents if (p / "manifest.json").is_file() and (p / "recipe.yaml").is_file()),
                   None):
        raise PeftkitError(f"--output {output} is inside the run directory {run}, whose files its manifest.json lists "
                           "(verify would find the merged model added after the run). Choose an --output outside it, "
                           "e.g. beside it.")
    make_writable_dir(output.parent, "--output's parent")
    with names_locked(output.parent):  # (not in the midst of another merge's swap: its `.OUTPUT.old` is no leftover)
        _tidy_output(output)
    if not output.exists() or (output.is_dir() and not any(output.iterdir())):
        return output
    kind = ("a file" if not output.is_dir() else "a peftkit run directory" if (output / "recipe.yaml").exists()
            else "a model directory" if (output / "config.json").exists()
            else "an adapter directory" if (output / "adapter_config.json").exists() else "a directory that is not empty")
    if kind in ("a peftkit run directory", "a directory that is not empty"):
        # --overwrite replaces the whole directory: only one a merge writes (a model, a combined adapter), never a
        # run (its checkpoints, metrics) or a folder of the user's own files, which it deleted without a word.
        held = sorted((e.name for e in output.iterdir()), key=lambda n: (n.startswith("."), n))  # its dotfiles last
        raise PeftkitError(f"--output {output} is {kind} ({', '.join(held[:3])}{' ...' * (len(held) > 3)}), not a "
                           "model or adapter a merge wrote; the merged output replaces its directory as a whole, so "
                           "even --overwrite does not write there. Choose a new directory, e.g. "
                           f"--output {output.with_name(output.name + '-merged')}.")
    if not overwrite:
        raise PeftkitError(f"--output {output} is {kind}. Choose a new directory, or pass --overwrite to replace it.")
    return output


def _tidy_output(output: Path) -> None:
    """`check_merge_output`'s refusal of an --output another merge is writing now, and its tidy of what a killed earlier
    merge into it left; under the lock of the names there (`fileio.names_locked`), which a merge's swap holds too."""
    from peftkit.fileio import being_written, recorded_pair, roll_back_interrupted
    from peftkit.rundir import is_temp_name, tidy_leftovers

    ours = lambda entry: entry == output.name  # noqa: E731
    if live := next((e.name for e in output.parent.iterdir() if is_temp_name(e.name, ours) and being_written(e)), None):
        raise PeftkitError(f"--output {output} is being written by another process now ({live} beside it). Wait for "
                           "it to finish, or choose another --output.")
    # A pair a kill stopped while it was put in place (the pair a record naming OUTPUT names, whatever this merge writes
    # beside OUTPUT: nothing, OUTPUT-fp4 after a killed --requantize nf4; or OUTPUT is that pair's OUTPUT-nf4): the
    # earlier pair back.
    if pair := recorded_pair(output):
        roll_back_interrupted(pair)
    tidy_leftovers(output.parent, ours)


def merge_adapter(adapter_dir: str, output_dir: str, base: str | None = None, dtype: str | None = None,
                  requantize: str | None = None, overwrite: bool = False, trust_remote_code: bool = False,
                  task: int | None = None) -> Path:
    """`peftkit merge`: fold an adapter into its base and save a plain model (+ tokenizer).

    Args:
        adapter_dir: a PEFT adapter directory (any method peftkit reads).
        output_dir: where the merged model goes.
        base: base model; default the adapter's base_model_name_or_path.
        dtype: float32 | bfloat16 | float16; default the base checkpoint's own dtype.
        requantize: 'nf4' to also write `<output_dir>-nf4`, the merged model re-quantized (lossy).
        overwrite: replace an existing --output (never the base, the adapter or the current directory).
        trust_remote_code: the user's `--trust-remote-code`; needed for an adapter whose base runs its own code.
        task: `--task`: the task whose update a Poly adapter folds in (`merge_task`); its other tasks are dropped.
    """
    from peftkit.adapter_base import load_adapted_model
    from peftkit.data.chat_templates import adapter_template
    from peftkit.inference import local_path, relative_to_cwd
    from peftkit.modeling import DTYPES
    from peftkit.peft_format import check_adapter_dir, read_peft_config, recorded_base

    check_adapter_dir(Path(adapter_dir))
    method, peft = read_peft_config(Path(adapter_dir))
    settings = peft if task is None else _for_task(method, peft, Path(adapter_dir), task)
    refuse_unmergeable(method, settings)  # before minutes of loading the base
    outputs = [Path(output_dir)] + ([requantized_dir(output_dir, requantize)] if requantize else [])
    recorded = recorded_base(adapter_dir)
    if base is None and recorded and local_path(recorded) and not Path(recorded).exists():
        config = Path(adapter_dir) / "adapter_config.json"
        raise PeftkitError(f"The base model {recorded} (base_model_name_or_path of {config}{relative_to_cwd(recorded)}) "
                           "is not there: moved or deleted since? Give it with --base DIR.")
    if requantize:
        check_side_by_side(outputs, requantize)
    protected = {"base model": base or recorded, "adapter": adapter_dir}
    targets = [check_merge_output(out, protected, overwrite) for out in outputs]  # (OUTPUT's rolls back a pair first)
    given = base
    model, cfg, tok, base, _ = load_adapted_model(base, adapter_dir, merge_device(adapter_dir), trust_remote_code,
                                                  warn_requantized=False)  # merge_device said it
    if given is not None and recorded and not same_base(given, recorded):  # (a base of other shapes stopped the load)
        warnings.warn(f"--base {given} is not the base the adapter records (base_model_name_or_path: {recorded}); "
                      "the merge is right only if it holds the weights the adapter was trained on (a copy, a move).",
                      MergeWarning, stacklevel=2)
    if (template := adapter_template(adapter_dir)) is not None:  # the run's data.chat_template: the merged model's
        tok.chat_template = template
    merged = merged_model(model, cfg if task is None else cfg.model_copy(update={"merge_task": task}),
                          DTYPES[dtype or checkpoint_dtype(base.name_or_path, base.revision)])
    # The re-quantized model is made from the merged one's temporary directory, and the two are put in place as a
    # pair: with --overwrite, a failure, Ctrl-C or a kill had left the new OUTPUT beside the old OUTPUT-nf4 (or the
    # new OUTPUT-nf4 beside the old OUTPUT), both complete-looking and of different merges.
    save_merged(merged, tok, targets[0], base_provenance(base.name_or_path, base.revision, base.trust_remote_code,
                                                         recorded_reward_center(adapter_dir)),
                replace=overwrite, requantized=(targets[1], requantize) if requantize else None,
                base=base_tensors(model) if requantize else None)
    return Path(output_dir)


def _for_task(method, peft, adapter_dir: Path, task: int):
    """The adapter's settings merging task `task` (`merge_task`: Poly's); a PeftkitError for an adapter whose merge
    takes no task, or a task it does not have."""
    if "merge_task" not in method.config.model_fields:
        raise PeftkitError(f"--task {task}: only a Poly adapter is merged for one task, and {adapter_dir} is "
                           f"{method.title}; drop --task.")
    cfg = method.from_peft(peft, adapter_dir / "adapter_config.json")
    if task >= (count := getattr(cfg, method.tasks_key)):
        raise PeftkitError(f"--task {task}: {adapter_dir} has {count} task(s); give a task id in 0 .. {count - 1}.")
    return cfg.model_copy(update={"merge_task": task})


def check_side_by_side(outputs: list[Path], method: str) -> None:
    """Refuse --requantize's pair (OUTPUT, OUTPUT-nf4) where, symbolic links resolved, the two lie in different
    directories (OUTPUT a link to a directory elsewhere): the pair's record and the roll-back after a kill name them
    side by side, so a kill there left the old OUTPUT restored beside the new OUTPUT-nf4, and the roll-back deleted
    the OUTPUT-nf4 that lies beside the link's target (an earlier merge's)."""
    from peftkit.fileio import resolved

    targets = [resolved(out, "--output") for out in outputs]
    if len({target.parent for target in targets}) > 1:
        links = ", ".join(f"{out} -> {target}" for out, target in zip(outputs, targets, strict=True) if out.is_symlink())
        raise PeftkitError(f"--requantize writes {outputs[0]} and {outputs[1]} as a pair, side by side in one directory "
                           f"(a kill is rolled back as one there), and a symbolic link ({links}) puts them in "
                           f"{targets[0].parent} and {targets[1].parent}. Give --output {targets[0]} (its re-quantized "
                           f"copy then goes to {requantized_dir(targets[0], method)}), or "
                           "merge without --requantize.")


def requantized_dir(output_dir: str | Path, method: str) -> Path:
    """Where `merge_adapter(..., requantize=method)` writes the re-quantized model: beside OUTPUT, `OUTPUT-nf4`."""
    return Path(f"{str(output_dir).rstrip('/')}-{method}")


def checkpoint_dtype(name_or_path: str, revision: str | None = None) -> str:
    """The dtype the base checkpoint's config.json records: a merge's default. The loaded model's config cannot say
    (a 4-bit base loads to compute in float32). float32 when the file records none of DTYPES."""
    from transformers import PretrainedConfig

    from peftkit.modeling import dtype_name

    raw = PretrainedConfig.get_config_dict(name_or_path, revision=revision)[0]
    return dtype_name(raw.get("dtype") or raw.get("torch_dtype"))


def requantize_model(merged_dir: str | Path, output_dir: str | Path, method: str, replace: bool = True) -> None:
    """Load a merged model quantized (nf4, double quant) and save it 4-bit, atomically as a directory, with the merged
    model's peftkit.json (what it was merged from, a reward model's centring weight, which `peftkit eval --model
    OUTPUT-nf4` scores with: it was left behind, and the loss scored without it). Rounding the merged weights to
    4 bits again rounds away an update below half a 4-bit step, most of a LoRA's: the result may be close to
    the base's own 4-bit model (`merge --requantize`, which has the base at hand, records how close:
    `peftkit.requantized`)."""
    with atomic_directories([Path(output_dir)], replace) as (tmp,):
        requantize_into(merged_dir, tmp, method)


def requantize_into(merged_dir: str | Path, directory: Path, method: str,
                    measured: tuple[nn.Module, dict] | None = None) -> None:
    """The files of `requantize_model` in `directory` (a temporary one, put in place by the caller); with `measured`,
    (the merged model, the weights it was merged from: `base_tensors`), peftkit.json's `requantized` records how much
    of the update the 4-bit weights keep (`peftkit.requantized.update_kept`)."""
    from peftkit.modeling import load_config, load_model, load_tokenizer
    from peftkit.recipe import ModelConfig, QuantizationConfig
    from peftkit.requantized import update_kept

    cfg = ModelConfig(name_or_path=str(merged_dir), dtype="auto")
    # A merged classifier (a reward model) loads as the classifier it is, its head kept in full precision
    # (`kept_modules`): as a causal LM it was refused, its score head where lm_head was expected.
    classes = getattr(load_config(cfg), "architectures", None) or []
    if classes and all(str(c).endswith("ForSequenceClassification") for c in classes):
        cfg = cfg.model_copy(update={"task": "sequence_classification"})
    model = load_model(cfg, QuantizationConfig(method=method, compute_dtype="float32"), torch.device("cpu"))
    tokenizer = load_tokenizer(cfg)
    stop_at_turn_end(model, tokenizer)
    write_model(model, tokenizer, directory)
    record = model_record(merged_dir) or {}
    if measured is not None:
        record["requantized"] = {"method": method, **update_kept(model, *measured)}
    if record:
        (directory / MERGED_FROM_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
