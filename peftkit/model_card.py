"""adapter/README.md: the model card a run writes beside its adapter, as peft's `save_pretrained` does, so that a
pushed adapter shows on the Hugging Face Hub what it is, what it was trained on and from, how it scored and how to
load it.

The card holds only what the recipe and the run's evaluations decide (never a time, a run directory or a machine's
path but the base's and the data's, which the recipe names), so a re-run of the recipe (`peftkit verify`) writes the
same bytes. Its front matter is the Hub's: `base_model` (with the `base_model:adapter:` tag the Hub links adapters
by) only for a base named by a hub id, since the Hub refuses a `base_model` that is no model id.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from peftkit import __version__
from peftkit.recipe import Recipe, is_hub_dataset
from peftkit.report import metrics_rows
from peftkit.start_eval import START, prefix, shown, title

CARD_NAME = "README.md"
PEFTKIT_ONLY = {"BOTTLENECK", "ADAPTER_FUSION"}
"""peft_types peft does not read: their cards show peftkit's way of loading them only."""
PEFT_LOADS_WITH = {"XLORA": (["from peft import PeftConfig"], [
    "base.config.use_cache = False  # (peft's X-LoRA refuses a model that caches)",
    "config = PeftConfig.from_pretrained(\"ADAPTER_DIR\")",
    "# the LoRA experts, copied beside the adapter (peft 0.21.2 reads them from config.adapters: its `adapters=`",
    "# argument is overridden by the file's)",
    "config.adapters = {name: f\"ADAPTER_DIR/{name}\" for name in config.adapters}",
    "model = PeftModel.from_pretrained(base, \"ADAPTER_DIR\", config=config)"])}
"""peft_types whose peft loading takes more: lines before the imports' end, and the lines that load it."""


def model_card(cfg: Recipe, peft_type: str, metrics: dict, labels: list[str] | None = None,
               pad_token_id: int | None = None) -> str:
    """The card's text. `metrics`: the run's evaluations as the manifest names them (`base_eval_loss`, `eval_loss`,
    `eval_perplexity`, `eval_<metric>`...), those of the exported adapter. `labels`: a classifier's classes as the
    run found them (the model's, or read from data.train), in the order of its head's outputs. `pad_token_id`: a
    classifier's, which the snippet sets, where the base's config.json says another (`export._card_pad_id`)."""
    base = cfg.model.name_or_path
    hub_base = not Path(base).is_dir()
    task = "text-classification" if cfg.classifier else "text-generation"
    meta = {"library_name": "peft", "pipeline_tag": task,
            "tags": ["peftkit", cfg.adapter.method] + ([f"base_model:adapter:{base}"] if hub_base else [])}
    if hub_base:
        meta = {"base_model": base} | meta
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
             f"# {cfg.adapter.method} adapter for `{_shown(base, hub_base)}`", "",
             f"Trained with peftkit {__version__} on {_data(cfg)}, {_length(cfg)}.{_objective(cfg)}", ""]
    lines += _results(metrics, cfg.classification, list(cfg.data.eval) if isinstance(cfg.data.eval, dict) else [],
                      cfg.adapter.init_from)
    lines += _usage(cfg, peft_type, base, hub_base, labels, pad_token_id)
    sections = {"adapter": _named(cfg.adapter.model_dump(mode="json", exclude_none=True)),
                "training": cfg.training.model_dump(mode="json", exclude_defaults=True)}
    lines += ["## Training settings", "", "The recipe's adapter keys, and its training keys that differ from peftkit's "
              "defaults:",
              "", "```yaml", yaml.safe_dump(sections, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def _shown(name: str, hub: bool) -> str:
    """A hub id as it is; a local directory by its name (its full path says nothing on the Hub)."""
    return name if hub else Path(name).name


def _named(adapter: dict) -> dict:
    """The adapter keys with the directories it started from (init_from, fuse, source_adapter, X-LoRA's experts,
    `adapters`) by their names (`shown`): a local path says nothing on the Hub (a hub id stays as it is)."""
    return {key: ([shown(v) for v in value] if key == "fuse" and isinstance(value, list) else
                  {name: shown(v) for name, v in value.items()} if key == "adapters" and isinstance(value, dict) else
                  shown(value) if key in ("init_from", "source_adapter") and isinstance(value, str) else value)
            for key, value in adapter.items()}


def _objective(cfg: Recipe) -> str:
    """What a DPO run trained for, said after the data (nothing for the next-token loss)."""
    t = cfg.training
    if not t.pairs:
        return ""
    if t.objective == "reward":
        center = f", centred with weight {t.reward_center:g}" if t.reward_center else ""
        return (" Objective: a reward model (Bradley-Terry loss, -log sigmoid(score(chosen) - score(rejected))"
                f"{center}) on pairs of a chosen and a rejected answer; the rewards are its scores of the prompt with "
                "each answer, and the reward accuracy the share of pairs whose chosen answer scores higher.")
    if t.objective not in ("dpo", "kto"):  # no reference
        weight = f"lambda {t.orpo_lambda:g}" if t.objective == "orpo" else f"beta {t.simpo_beta:g}, gamma {t.simpo_gamma:g}"
        return (f" Objective: {t.objective.upper()} ({weight}) on pairs of a chosen and a rejected answer, without a "
                "reference model; the evaluation's loss is its loss and its rewards the scaled mean log-probability "
                "per answer token.")
    reference = ("the adapter training started from (adapter.init_from)" if cfg.adapter.init_from else
                 "the base model, its layers stacked (adapter.layer_replication)"
                 if getattr(cfg.adapter, "layer_replication", None) else "the base model")
    if t.objective == "kto":
        weights = (f", desirable weight {t.kto_desirable_weight:g}, undesirable {t.kto_undesirable_weight:g}"
                   if (t.kto_desirable_weight, t.kto_undesirable_weight) != (1.0, 1.0) else "")
        return (f" Objective: KTO (beta {t.kto_beta:g}{weights}) on answers labelled desirable or undesirable, the "
                f"reference {reference}; the evaluation's loss is the KTO loss, its rewards beta × the log-likelihood "
                "ratios to the reference, and `kl` the KL estimate on mismatched prompts and answers.")
    return (f" Objective: DPO (`{t.dpo_loss}` loss, beta {t.dpo_beta:g}) on pairs of a chosen and a rejected answer, "
            f"the reference {reference}; the evaluation's loss is the DPO loss and its rewards beta × the "
            "log-likelihood ratios to the reference.")


def _data(cfg: Recipe) -> str:
    """data.train's datasets: a hub id as it is, a file by its name; each with its format where they differ (a
    data.train entry's own)."""
    sources = cfg.data.train_sources()
    mixed = any(s.format != cfg.data.format for s in sources)
    shown = [(f"`{s.path}`" if is_hub_dataset(s.path) else f"`{Path(s.path).name}`")
             + (f" (`{s.format}` format)" if mixed else "") for s in sources]
    each = f"up to {cfg.data.max_length} tokens an example"
    return f"{' + '.join(shown)} ({each})" if mixed else f"{' + '.join(shown)} (`{cfg.data.format}` format, {each})"


def _length(cfg: Recipe) -> str:
    t = cfg.training
    steps = f"{t.max_steps} optimizer steps" if t.max_steps else f"{t.epochs} epoch{'s' * (t.epochs > 1)}"
    return f"{steps} of batch {t.batch_size} × {t.grad_accum}, lr {t.lr:g} ({t.scheduler})"


def _results(metrics: dict, classifier: bool, sets: list[str], init_from: str | None = None) -> list[str]:
    """The evaluation table. `sets`: data.eval's names where it is a mapping; the first set's figures are the rows
    without a name (eval_loss, ...), each other's loss a row named by it (eval_NAME_loss, base_eval_NAME_loss). The
    column before training is the base model's, or an adapter.init_from run's start's (`init_from`, the adapter it
    started from: `start_eval_loss`, ..., `peftkit.start_eval`)."""
    def fmt(key: str) -> str:
        return "" if metrics.get(key) is None else f"{metrics[key]:.4f}"

    before = prefix(metrics)
    others = [(f"eval loss, {name}", fmt(f"{before}{name}_loss"), fmt(f"eval_{name}_loss")) for name in sets[1:]]
    rows = [row for row in metrics_rows(metrics, classifier) + others if row[1] or row[2]]
    if not rows:
        return []
    if not any(base for _, base, _ in rows):  # eval.base_model: false: the fine-tuned model's only
        table = ["| | fine-tuned |", "| --- | --- |"] + [f"| {a} | {c} |" for a, _, c in rows]
    else:
        table = [f"| | {title(before == START, init_from)} | fine-tuned |", "| --- | --- | --- |"] + [
            f"| {a} | {b} | {c} |" for a, b, c in rows]
    where = "`data.eval`"  # one set's card is as it was: verify compares a run's card bytes
    if len(sets) > 1:
        named = [f"`{sets[0]}` (the first: the rows without a set's name)", *(f"`{name}`" for name in sets[1:])]
        where = f"`data.eval` sets, {', '.join(named[:-1])} and {named[-1]}"
    return ["## Evaluation", "", f"On the recipe's {where}:", "", *table, ""]


def _classes(cfg: Recipe, names: list[str] | None) -> tuple[list[str], str]:
    """A classifier's snippet lines naming its classes, and the arguments that make its head: their names as the
    config's id2label and label2id (a head of the right size alone printed LABEL_0, LABEL_1 in pipelines), or their
    count where they are only numbered (model.num_labels without names; a reward model's one score)."""
    if not cfg.classifier:
        return [], ""
    if not names or all(name in (str(i), f"LABEL_{i}") for i, name in enumerate(names)):
        count = len(names) if names else cfg.model.num_labels
        return [], f", num_labels={count}" if count else ""
    return [f"labels = {json.dumps(names, ensure_ascii=False)}  # its classes, in the order of its head's outputs"], (
        ", num_labels=len(labels), id2label=dict(enumerate(labels)),\n"
        "    label2id={name: i for i, name in enumerate(labels)}")


def _usage(cfg: Recipe, peft_type: str, base: str, hub_base: bool, labels: list[str] | None,
           pad_token_id: int | None = None) -> list[str]:
    shown = base if hub_base else "PATH/TO/" + Path(base).name
    peftkit = ["```bash", "peftkit generate ADAPTER_DIR --prompt \"...\"    # also: peftkit chat, eval, merge", "```", ""]
    if cfg.classifier:  # a classifier (a reward model) generates nothing: it is scored
        fmt = "classification" if cfg.classification else "preference"
        peftkit = ["```bash", f"peftkit eval --adapter ADAPTER_DIR --data FILE --format {fmt}    # also: peftkit merge",
                   "```", ""]
    if peft_type in PEFTKIT_ONLY:
        return ["## Use", "", "This method has no peft equivalent: load it with peftkit.", "", *peftkit]
    auto = "AutoModelForSequenceClassification" if cfg.classifier else "AutoModelForCausalLM"
    classes, labels = _classes(cfg, labels)
    labels += "" if pad_token_id is None else f", pad_token_id={pad_token_id}"  # (the one peftkit padded with)
    # A hub base at the commit the run loaded (the recipe's revision, resolved at export): main may have moved on.
    revision = f", revision=\"{cfg.model.revision}\"" if hub_base and cfg.model.revision else ""
    template = [] if cfg.data.chat_template is None else [
        "It was trained with the chat template in `chat_template.jinja` beside it (`data.chat_template`), which the "
        "base's tokenizer lacks or differs from: give it to the tokenizer (`tokenizer.chat_template = "
        "open(\"chat_template.jinja\").read()`; vLLM: `--chat-template chat_template.jinja`).", ""]
    rope = cfg.model.rope_scaling
    scaled = [] if rope is None else [
        f"It was trained with the base's RoPE scaled (`model.rope_scaling`: {rope.type}, factor {rope.factor:g}); "
        "load the base so (in its config's `rope_parameters`) for its longer context and the numbers above "
        "(`peftkit generate`, `eval` and `merge` do).", ""]
    q = cfg.quantization
    quantized = [] if q is None else [
        f"It was trained over the base quantized by bitsandbytes ({q.method}"
        + (", double quantization" if q.double_quant and q.method != "int8" else "")
        + "); load the base so for the numbers above (`peftkit generate`, `eval` and `merge` do).", ""]
    added = cfg.model.add_tokens
    tokens = [] if not added else [
        f"It adds tokens to the base's tokenizer (`model.add_tokens`: {', '.join(f'`{t}`' for t in added)}), whose "
        "rows it trained: take the tokenizer beside it, and resize the base's embeddings to it before loading.", ""]
    resize = [] if not added else [
        "tokenizer = AutoTokenizer.from_pretrained(\"ADAPTER_DIR\")  # the base's, with the new tokens",
        "if len(tokenizer) > base.get_input_embeddings().num_embeddings:  # (a base with spare rows keeps them)",
        "    base.resize_token_embeddings(len(tokenizer))"]
    imports = f"from transformers import {auto}" + (", AutoTokenizer" if added else "")
    header, load = PEFT_LOADS_WITH.get(peft_type, ([], [
        "model = PeftModel.from_pretrained(base, \"ADAPTER_DIR\")  # this directory, or its hub id"]))
    return ["## Use", "", *quantized, *scaled, *template, *tokens, "```python", *header, "from peft import PeftModel",
            imports, "", *classes, f"base = {auto}.from_pretrained(\"{shown}\"{revision}{labels})", *resize, *load,
            "```", "",
            "or with peftkit:", "", *peftkit]
