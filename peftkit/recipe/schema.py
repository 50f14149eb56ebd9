"""The recipe schema: pydantic models holding every setting and its default (the single source of truth;
the rest of peftkit reads typed fields, never `dict.get(key, default)`). `Recipe` here, with its checks across
sections (combinations.py holds most); each section in its own module:

    model_section.py     model (and its long_context, rope_scaling), quantization
    data_section.py      data
    training_section.py  training (and its early_stopping)
    export_section.py    export
    eval_section.py      eval
    (adapter: the adapter methods' configs, `peftkit.methods`)
"""

from __future__ import annotations

import hashlib

import yaml
from pydantic import Field, model_validator

from peftkit.errors import did_you_mean
from peftkit.methods import AdapterConfig, default_adapter, method_of
from peftkit.metrics import (CLASSIFICATION_METRICS, GENERATION_METRICS, KTO_METRICS, LOSS_METRICS,
                             PREFERENCE_METRICS, REWARDS)
from peftkit.recipe.combinations import check_long_context, check_objective, check_task
from peftkit.recipe.data_section import (  # noqa: F401  (DataSource, is_hub_dataset, ...: re-exported)
    DATA_EXTENSIONS, DataConfig, DataSource, _own_format, is_hub_dataset, is_local_dataset, is_saved_dataset)
from peftkit.recipe.eval_section import EvalConfig
from peftkit.recipe.export_section import ExportConfig
from peftkit.recipe.model_section import (  # noqa: F401  (re-exported)
    DType, LongContextConfig, ModelConfig, QuantizationConfig, RopeScalingConfig)
from peftkit.recipe.training_section import (  # noqa: F401  (re-exported)
    TRANSFORMERS_SCHEDULERS, EarlyStoppingConfig, TrainingConfig)
from peftkit.section import Section, TargetRegex  # noqa: F401  (re-exported by peftkit.recipe)

class Recipe(Section):
    model: ModelConfig
    quantization: QuantizationConfig | None = None
    adapter: AdapterConfig = Field(default_factory=default_adapter)
    data: DataConfig
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    export: ExportConfig
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _combinations(self) -> Recipe:
        q = self.quantization
        if q is not None and q.method != "int8" and self.training.mixed_precision == "fp16":
            raise ValueError(
                "training.mixed_precision: fp16 with a 4-bit base overflows easily; use bf16 or auto"
            )
        if self.training.mixed_precision == "fp16" and self.model.dtype == "float16" and (
                getattr(self.adapter, "modules_to_save", None) or self.classifier):
            raise ValueError(
                "training.mixed_precision: fp16 unscales fp32 gradients only, and with model.dtype: float16 the "
                "modules trained in full (adapter.modules_to_save, a classifier's head) would have fp16 ones "
                "(torch: 'Attempting to unscale FP16 gradients'); set model.dtype: float32 (the matmuls still run "
                "in fp16 under autocast), or use mixed_precision: bf16 where the GPU has it"
            )
        if self.eval.generation_metrics and (text := [k for k, e in self.data.eval_sources().items()
                                                      if e.format == "text"]) and self.data.format != "text":
            raise ValueError(
                f"eval.metrics: {', '.join(self.eval.generation_metrics)} score generated answers against each "
                f"row's reference, and data.eval.{text[0]} is format text, which has no prompt or reference; remove "
                "eval.metrics or give that set another format"
            )
        if self.eval.generation_metrics and self.data.format == "text":
            raise ValueError(
                f"eval.metrics: {', '.join(self.eval.generation_metrics)} score generated answers against each "
                "row's reference, and data.format 'text' has no prompt or reference (every token is target); "
                "remove eval.metrics or use the alpaca, completion or chat format"
                + (f". {self.data._eval_format_note}" if self.data._eval_format_note else "")
            )
        hub = {source for _, source, _ in self.data.sources() if is_hub_dataset(source)}
        if self.data.revision and not hub:
            raise ValueError("data.revision: a revision of a hub dataset, and data.train and data.eval are local "
                             "files; remove data.revision")
        if self.data.revision and len(hub) > 1:
            raise ValueError(f"data.revision: one revision for two hub datasets ({', '.join(sorted(hub))}), which "
                             "have commits of their own; remove data.revision, or use one dataset's two splits "
                             "(data.train_split, data.eval_split)")
        check_task(self)
        check_objective(self)
        if self.training.objective == "reward" and self.model.num_labels is None:
            self.model.num_labels = 1  # (a reward model's head: one score, whatever the checkpoint's config says)
        check_long_context(self)
        self._check_selection()
        method = method_of(self.adapter)
        if self.export.best and method.trainer_reshapes:
            raise ValueError(
                f"export.best: adapter.method {method.name} changes the adapter's layout while it trains (its rank "
                "allocation), so an earlier evaluation's weights do not fit the final layout; remove export.best"
            )
        if conflict := method.recipe_conflict(self):
            raise ValueError(conflict)
        method.with_recipe(self.adapter, self)  # (a manifest's recipe too, which load_recipe never saw)
        if self.training.loraplus_lr_ratio is not None and "B" not in method.loraplus_roles.values():
            raise ValueError(
                f"training.loraplus_lr_ratio: LoRA+ gives lora_B its own learning rate, for adapter.method: lora "
                f"(with DoRA, LoRA-FA or PiSSA) only, not {method.name}; remove training.loraplus_lr_ratio or use "
                "adapter.method: lora"
            )
        if self.export.merged and (refusal := method.merge_refusal(self.adapter)):
            key = self._unmergeable_key(method)
            raise ValueError(f"export.merged: {refusal.rstrip('.')} (adapter.{key}: {getattr(self.adapter, key)}).")
        return self

    def _unmergeable_key(self, method) -> str:
        """The adapter key that makes it unmergeable (`alora_invocation_tokens`), else `method`: named in the
        error, so that a --set that gave it is named too (a refusal naming neither was put on export.merged alone)."""
        for key in sorted(self.adapter.model_fields_set - {"method"}):
            default = type(self.adapter).model_fields[key].get_default(call_default_factory=True)
            if method.merge_refusal(self.adapter.model_copy(update={key: default})) is None:
                return key
        return "method"

    def _check_selection(self) -> None:
        """training.early_stopping and export.best need evaluations during training, of a metric computed: the
        primary set's (`loss`) or, dotted, another set's of data.eval (`general.loss`)."""
        for key, metric in (("training.early_stopping", getattr(self.training.early_stopping, "metric", None)),
                            ("export.best", self.best_metric)):
            if metric is None:
                continue
            if not self.data.eval or not self.training.eval_steps:
                raise ValueError(f"{key} chooses among the evaluations during training, and this recipe has none; "
                                 "set data.eval and training.eval_steps")
            name, _, figure = metric.rpartition(".")
            key = key if key == "export.best" else f"{key}.metric"  # said at the line of the metric's name
            if "." in metric and not (name and figure):  # `.loss` read as `loss`, logged as eval__loss
                raise ValueError(f"{key}: {metric!r} has no {'set name before' if not name else 'metric after'} its "
                                 "dot; write NAME.METRIC for a set of data.eval (general.loss), or the metric "
                                 "alone for the primary set's (loss)")
            if name:
                self._check_eval_set(key, metric, name)
            # a classifier computes its loss, accuracy and macro_f1 (no perplexity), whatever eval.metrics lists
            computed = (("loss", *CLASSIFICATION_METRICS) if self.classification else
                        ("loss", *KTO_METRICS, *REWARDS) if self.training.objective == "kto" else
                        ("loss", *PREFERENCE_METRICS, *REWARDS) if self.training.pairs else
                        (*LOSS_METRICS, *self.eval.metrics))
            if figure not in computed:
                # eval.metrics can add a generation metric to a language model's evaluations, nothing else
                addable = figure in GENERATION_METRICS and not self.classification
                raise ValueError(f"{key}: metric {metric!r} is not computed during training (computed: "
                                 f"{', '.join(f'{name}.{c}' if name else c for c in computed)}); use one of those"
                                 + (f", or add {figure!r} to eval.metrics" if addable else ""))

    def _check_eval_set(self, key: str, metric: str, name: str) -> None:
        """`metric`, dotted (`general.loss`), names a set of data.eval, a mapping of sets by name."""
        if not isinstance(self.data.eval, dict):
            raise ValueError(f"{key}: {metric!r} is a metric of data.eval's set {name!r}, and data.eval is one "
                             f"dataset, whose figures are eval_loss, ...; write {metric.rpartition('.')[2]!r}, or "
                             "give data.eval several sets by name: `eval: {NAME: path, ...}`")
        if name not in self.data.eval:
            raise ValueError(f"{key}: {metric!r} is a metric of data.eval's set {name!r}, and data.eval has no set of "
                             f"that name.{did_you_mean(name, self.data.eval)} Its sets: {', '.join(self.data.eval)}")

    @property
    def best_metric(self) -> str | None:
        """The metric export.best picks by, or None when export.best is off."""
        best = self.export.best
        if best is False:
            return None
        if best is True:
            return self.training.early_stopping.metric if self.training.early_stopping else "loss"
        return best

    @property
    def classifier(self) -> bool:
        """model.task is sequence_classification: the model is a classifier, one of classes (`classification`) or a
        reward model (training.objective: reward)."""
        return self.model.task == "sequence_classification"

    @property
    def classification(self) -> bool:
        """A classifier of classes, on data.format: classification (not a reward model, which scores pairs)."""
        return self.classifier and self.training.objective != "reward"

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def sha256(self) -> str:
        return hashlib.sha256(self.to_yaml().encode()).hexdigest()
