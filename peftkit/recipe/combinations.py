"""The recipe's checks of keys that only make sense together, across its sections (`Recipe._combinations` runs
them): LongLoRA's attention, the training objective and its data (DPO, ORPO, SimPO, reward models, KTO), and the
model's task. Each raises a ValueError whose message names the key and says the fix."""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftkit.methods import method_of
from peftkit.metrics import CLASSIFICATION_METRICS, KTO_METRICS, REWARDS

if TYPE_CHECKING:
    from peftkit.recipe.schema import Recipe


def check_long_context(recipe: Recipe) -> None:
    """model.long_context: a causal LM, and a whole group size that fits data.max_length."""
    lc = recipe.model.long_context
    if lc is None or not lc.s2_attention:
        return
    if recipe.classifier:
        raise ValueError("model.long_context.s2_attention: shifted sparse attention is for causal LMs; "
                         "model.task is sequence_classification, so remove model.long_context")
    if recipe.data.packing:
        raise ValueError("data.packing: shifted sparse attention (model.long_context.s2_attention) groups tokens from "
                         "the start of each row, not of each packed example, so a packed example would train "
                         "unlike itself alone; set data.packing: false (long examples fill their rows anyway)")
    size, max_length = lc.group_size_ratio * recipe.data.max_length, recipe.data.max_length
    if abs(size - round(size)) > 1e-9 or size < 2:
        raise ValueError(f"model.long_context.group_size_ratio: {lc.group_size_ratio} × data.max_length {max_length} "
                         f"= {size:g} tokens per group; it must be a whole number of at least 2 (data.max_length a "
                         f"multiple of 1/group_size_ratio), e.g. group_size_ratio: 0.25 with data.max_length: "
                         f"{max(8, -(-max_length // 4) * 4)}")


_OBJECTIVE_KEYS = {"dpo_beta": "dpo", "dpo_loss": "dpo", "orpo_lambda": "orpo", "simpo_beta": "simpo",
                   "simpo_gamma": "simpo", "reward_center": "reward", "kto_beta": "kto", "kto_desirable_weight": "kto",
                   "kto_undesirable_weight": "kto"}
"""training's keys of one preference objective."""


def check_objective(recipe: Recipe) -> None:
    """training.objective dpo, orpo, simpo or reward and data.format: preference go together, kto and unpaired, with
    what their loss allows; reward with a classifier of one output."""
    data, tcfg = recipe.data, recipe.training
    if (tcfg.objective == "kto") != (data.format == "unpaired"):
        raise ValueError(
            f"training.objective is {tcfg.objective} and data.format is {data.format}: KTO trains on unpaired answers "
            "(data.format: unpaired: prompt, completion and a true/false label) and that format is for it; set "
            "training.objective: kto with data.format: unpaired, or neither")
    if (tcfg.pairs and tcfg.objective != "kto") != (data.format == "preference"):
        raise ValueError(
            f"training.objective is {tcfg.objective} and data.format is {data.format}: DPO, ORPO, SimPO and reward "
            "models train on pairs of answers (data.format: preference: prompt, chosen, rejected) and that format is "
            "for them; set training.objective: dpo (orpo, simpo, reward) with data.format: preference, or neither")
    for key, objective in _OBJECTIVE_KEYS.items():  # (by value: a run's recipe.yaml writes every key)
        if objective != tcfg.objective and getattr(tcfg, key) != type(tcfg).model_fields[key].default:
            raise ValueError(f"training.{key} is a setting of training.objective: {objective}, and the objective is "
                             f"{tcfg.objective}; remove it, or set training.objective: {objective}")
    if not tcfg.pairs:
        return
    if tcfg.objective == "reward" and not recipe.classifier:
        raise ValueError("training.objective: reward trains a reward model, a sequence classifier with one output (the "
                         "score of a prompt and its answer); set model.task: sequence_classification")
    if tcfg.objective != "reward" and recipe.classifier:
        raise ValueError(f"training.objective: {tcfg.objective} trains a language model's answers; model.task is "
                         "sequence_classification, so use model.task: causal_lm (or training.objective: reward, "
                         "a reward model)")
    if data.packing:
        held = "each answer and its mismatched example" if tcfg.objective == "kto" else "each pair's two answers"
        raise ValueError(f"data.packing: a {tcfg.objective} batch holds {held} side by side, one a row; set "
                         "data.packing: false")
    if tcfg.objective == "kto" and tcfg.batch_size < 2:
        raise ValueError("training.batch_size: 1: KTO estimates the KL term from each answer's prompt with another row's "
                         "answer of the same batch, and a batch of one has none (the estimate would be the answer's own "
                         "reward, as TRL says); use a batch_size of at least 2")
    if tcfg.objective == "kto" and data.eval and recipe.eval.batch_size < 2:
        raise ValueError("eval.batch_size: 1: KTO's evaluation estimates the KL term from each answer's prompt with "
                         "another answer of its evaluation batch, and a batch of one has none (the estimate would be "
                         "the answer's own reward); use an eval.batch_size of at least 2")
    if tcfg.objective in ("dpo", "kto") and recipe.model.long_context is not None and \
            recipe.model.long_context.s2_attention:
        raise ValueError(f"model.long_context.s2_attention: {tcfg.objective.upper()} compares the adapted model's "
                         "log-probabilities with the reference's, computed with full attention as the evaluations are, and S²-Attn would "
                         "compute the adapted model's in training with another attention: the rewards would measure "
                         "the difference; remove model.long_context (or set s2_attention: false)")
    _check_pair_data(recipe)


def _check_pair_data(recipe: Recipe) -> None:
    """What a preference (or KTO) run's data may not ask for, said in its objective's terms: KTO's rows are unpaired
    answers, one each, the others' pairs of a chosen and a rejected answer."""
    data, tcfg = recipe.data, recipe.training
    kto = tcfg.objective == "kto"
    rows, fmt = ("unpaired answers", "unpaired") if kto else ("pairs", "preference")
    if data.train_on != "answers":
        compared = ("compares each answer's likelihood with the reference's (the prompt's tokens are not its)" if kto
                    else "compares the likelihoods of the two answers alone (a prompt's tokens are the same in both)")
        raise ValueError(f"data.train_on: {data.train_on}: {tcfg.objective} {compared}; remove data.train_on")
    if recipe.eval.generation_metrics:
        has, figures = (("which unpaired answers do not have (each is labelled desirable or not)",
                         ", ".join(("loss", *KTO_METRICS, *REWARDS))) if kto else
                        ("which preference data does not have (it has two)", "the loss, reward_accuracy and "
                                                                              "reward_margin"))
        raise ValueError(f"eval.metrics: {', '.join(recipe.eval.generation_metrics)} score generated answers "
                         f"against a reference, {has}; remove them: a {tcfg.objective} run's evaluations report "
                         f"{figures}")
    if isinstance(data.train, list) and (own := next((i for i, s in enumerate(data.train)
                                                      if not isinstance(s, str) and s.format), None)) is not None:
        raise ValueError(f"data.train[{own}].format: a {tcfg.objective} run trains on {rows}, every dataset read as "
                         f"data.format {fmt}; remove it")
    if isinstance(data.eval, dict) and (own := next((n for n, s in data.eval.items()
                                                     if not isinstance(s, str) and s.format), None)):
        raise ValueError(f"data.eval.{own}.format: a {tcfg.objective} run evaluates {rows}, every set read as "
                         f"data.format {fmt}; remove it")


def check_task(recipe: Recipe) -> None:
    """model.task and the settings that only make sense for one task."""
    classify, data = recipe.classifier, recipe.data
    reward = recipe.training.objective == "reward"
    if recipe.model.num_labels == 1 and not reward and classify:
        raise ValueError("model.num_labels: 1 is a reward model's one score (training.objective: reward); a classifier "
                         "of classes has at least 2: set model.num_labels to their number, or remove it (data.train's "
                         "labels say)")
    if reward and recipe.model.num_labels not in (None, 1):
        raise ValueError(f"model.num_labels: {recipe.model.num_labels}: a reward model (training.objective: reward) "
                         "has one output, the score; remove model.num_labels")
    # (a classifier on pairs is a reward model: check_objective says what else it needs)
    if classify != (data.format == "classification") and not (classify and data.format == "preference"):
        raise ValueError(
            f"model.task is {recipe.model.task!r} and data.format is {data.format!r}: a sequence_classification model "
            "trains on data.format: classification (text, label, optional text_pair) and that format needs it; set "
            "both, or neither"
        )
    if recipe.model.num_labels is not None and not classify:
        raise ValueError("model.num_labels is set, but model.task is causal_lm; remove model.num_labels or set "
                         "model.task: sequence_classification")
    if not classify:
        if wrong := [m for m in recipe.eval.metrics if m in CLASSIFICATION_METRICS]:
            raise ValueError(f"eval.metrics: {', '.join(wrong)} score a classifier's predicted labels; model.task is "
                             "causal_lm, so remove them (or use model.task: sequence_classification)")
        return
    if recipe.eval.generation_metrics:
        raise ValueError(
            f"eval.metrics: {', '.join(recipe.eval.generation_metrics)} score generated text, and a "
            "sequence_classification model generates none; remove them (accuracy and macro_f1 are always computed "
            "for classification)"
        )
    if data.packing:
        raise ValueError("data.packing: a classification row is one example with one label; set data.packing: false")
    if data.train_on != "answers":
        raise ValueError(f"data.train_on: {data.train_on} chooses the tokens a language model's loss covers, and a "
                         "classifier's loss is one label per row; remove data.train_on")
    method = method_of(recipe.adapter)
    if not method.layer_targets or "modules_to_save" not in type(recipe.adapter).model_fields:
        raise ValueError(
            f"adapter.method: {method.name} cannot train a classifier: the new head must train in full beside the "
            "adapter, which the prompt family, Llama-Adapter, AdapterFusion and X-LoRA do not do here; use a weight method "
            "(lora, ia3, loha, lokr, vera, fourierft, randlora, vblora, adalora, oft, hra, boft, ln_tuning, miss, delora, road, hira, c3a, shira, beft, supertuning, gralora, deft, peanut, pvera, tinylora, psoft, glora, unilora, lily, osf, frod, waveft, poly, adamss) or bottleneck"
        )
