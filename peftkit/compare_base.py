"""The base row of `peftkit eval --adapter a=DIR --adapter b=DIR [--merged m=DIR]` given without --model or a recipe:
the base its candidates record, taken as `peftkit eval --adapter DIR` of one adapter takes it (adapter_config.json's
base_model_name_or_path and revision; peftkit.json's quantization, the dtype it quantized from, RoPE scaling), where
they all record one base; a merged model's peftkit.json `merged_from` (name and revision) counts too, and one without
it is taken as given. A comparison has one base row, so candidates that record different bases are refused, each
named with its base: the user names the base (--model) where two names are one model."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from peftkit.errors import PeftkitError
from peftkit.inference import ModelSource
from peftkit.recipe import ModelConfig, QuantizationConfig, RopeScalingConfig


@dataclass(frozen=True)
class Record:
    """What a candidate records of its base: the model, its revision (None: none recorded, which agrees with any, as
    `peftkit.adapters.named` takes it) and, for an adapter, how the base loads under it (`adapter`)."""

    name: str
    where: str
    """The file (and key) recording `name`, for the message of a base that is not there."""
    revision: str | None = None
    adapter: bool = True
    """An adapter's record: its loading settings below count. A merged model records none (it is not re-quantized)."""
    quantization: QuantizationConfig | None = None
    quantized_from: str = "float32"
    rope_scaling: RopeScalingConfig | None = None

    def agrees(self, other: Record) -> bool:
        from peftkit.merge import same_base

        same_load = not (self.adapter and other.adapter) or (
            (self.quantization, self.rope_scaling) == (other.quantization, other.rope_scaling)
            and (self.quantization is None or self.quantized_from == other.quantized_from))
        same_revision = None in (self.revision, other.revision) or self.revision == other.revision
        return same_base(self.name, other.name) and same_load and same_revision

    def describe(self) -> str:
        from peftkit.adapter_meta import describe_rope

        said = self.name + (f" at revision {self.revision}" if self.revision else "")
        if self.quantization is not None:
            said += f", {self.quantization.method} (bitsandbytes) quantized from {self.quantized_from}"
        return said + (f", RoPE scaling {describe_rope(self.rope_scaling)}" if self.rope_scaling else "")


def comparison_base(adapters: list[tuple[str, str]], merged: list[tuple[str, str]],
                  trust_remote_code: bool = False) -> ModelSource:
    """The comparison's base row, as its candidates record it ((name, directory) of each --adapter and --merged):
    the model, its revision and, as its adapters were trained, its quantization and RoPE scaling."""
    records = {f"adapter {name!r} ({path})": adapter_record(path, name) for name, path in adapters}
    records |= {f"--merged {name} ({path})": record for name, path in merged if (record := merged_record(path))}
    if not records:
        raise PeftkitError("peftkit eval of a comparison (--adapter NAME=DIR, --merged) needs the base the candidates "
                           "are compared on, its base row, and none of them records one (a merged model records it "
                           "in its peftkit.json merged_from, which `peftkit merge` writes): give --model M, or a "
                           "RECIPE (or a run directory) whose model it is.")
    base = next(iter(records.values()))
    for record in records.values():
        if not record.agrees(base):
            said = "; ".join(f"{who}: {each.describe()}" for who, each in records.items())
            raise PeftkitError(f"The compared candidates record different bases, and a comparison has one base row "
                               f"(taken from them without --model): {said}. If they were trained on one model under "
                               "two names, name it with --model M; else compare the candidates of each base apart.")
        if base.revision is None:
            base = replace(base, revision=record.revision)
    _check_there(base)
    dtype = base.quantized_from if base.quantization is not None else "auto"
    model = ModelConfig(name_or_path=base.name, dtype=dtype, revision=base.revision,
                        trust_remote_code=trust_remote_code, rope_scaling=base.rope_scaling)
    return ModelSource(model, base.quantization, trust_remote_code=trust_remote_code)


def adapter_record(path: str, name: str) -> Record:
    """What the adapter at `path` records of its base; its own errors first (a missing or broken adapter), as
    `ModelSource.tokenizer` says them where the adapter names the base."""
    from peftkit.adapter_meta import read_meta
    from peftkit.peft_format import CONFIG_NAME, check_adapter_dir, read_peft_config, recorded_base

    check_adapter_dir(Path(path))
    read_peft_config(Path(path))
    config = Path(path) / CONFIG_NAME
    if (base := recorded_base(path)) is None:
        raise PeftkitError(f"Adapter {name!r}: {config} records no base model (base_model_name_or_path), so the "
                           "comparison's base row is unknown: name it with --model M.")
    meta = read_meta(path)
    return Record(base, f"base_model_name_or_path of {config}", recorded_base(path, "revision"),
                  quantization=meta.quantization, quantized_from=meta.quantized_from, rope_scaling=meta.rope_scaling)


def merged_record(path: str) -> Record | None:
    """What a merged model's peftkit.json records of its base (a hub model's read from the hub, or its cache
    offline); None without the record (not merged by peftkit)."""
    from peftkit.merge import MERGED_FROM_NAME, merged_base

    if (made := merged_base(path)) is None:
        return None
    where = Path(path) / MERGED_FROM_NAME if Path(path).is_dir() else f"{MERGED_FROM_NAME} of hub model {path}"
    return Record(made[0], f"merged_from of {where}", made[1], adapter=False)


def _check_there(base: Record) -> None:
    """A base recorded as a local path that is gone (a moved project) is said with the file recording it."""
    from peftkit.inference import base_gone, local_path

    if local_path(base.name) and not Path(base.name).exists():
        raise base_gone(base.name, base.where)
