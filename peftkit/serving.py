"""What serving engines make of a PEFT-format adapter, read from its config and tensor names (`peftkit inspect`).

What vLLM accepts is read from its LoRA loader's source (vLLM is not run here): PEFTHelper (vllm/lora/peft_helper.py)
reads r, lora_alpha, target_modules, use_rslora (alpha / sqrt(r)), use_dora, bias and modules_to_save from
adapter_config.json, ignores every other field (peft_type, ...; rank_pattern and alpha_pattern up to the versions
whose PEFTHelper has get_rank_and_scaling) and refuses `modules_to_save` (a classifier's head aside, since
vllm-project/vllm#53555), `use_dora`, `bias` other than "none" and r above --max-lora-rank (default 16); the newest
stored PEFTHelper also refuses lora_bias, aLoRA, layer_replication, BD-LoRA and residual inits by name. LoRAModel
(vllm/lora/lora_model.py) reads the tensors, whose names parse_fine_tuned_lora_name (vllm/lora/utils.py) must end in
`.lora_A.weight`, `.lora_B.weight`, `lora_embedding_A` or `lora_embedding_B` (peft's copies of embed_tokens' and
lm_head's base weights skipped), and gives every layer the same scale. What depends on the vLLM version or the model
class is a caveat, not a verdict. What llama.cpp's convert_lora_to_gguf.py does is read from it (`llama_cpp_verdict`).
"""

from __future__ import annotations

from peftkit.methods.token_rows import TOKEN_ROWS

VLLM_DEFAULT_MAX_LORA_RANK = 16  # vLLM's `--max-lora-rank` default; larger ranks need the flag
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM's --max-lora-rank takes (MaxLoRARanks, vllm/config/lora.py); PEFTHelper.validate_legal
(vllm/lora/peft_helper.py) refuses an adapter whose r is larger than the one it was started with."""


STACKED = ("layer_replication: {who} does not stack the base's layers again, so the stacked layers' tensors have no "
           "layer to go to; merge it (peftkit merge) and serve the merged model")


def vllm_verdict(peft_type: str, raw: dict, ranks: dict[str, int] | None,
                  targets: dict[str, dict[str, tuple[int, ...]]], saved: dict[str, int], base_copies: list[str]) -> dict:
    """vLLM's verdict on a PEFT adapter, {accepts, reasons, caveats}: what stops or misleads every version is a
    reason, what depends on the version or the served model class a caveat naming both sides."""
    reasons, caveats = [], []
    if peft_type != "LORA":
        reasons.append(f"vLLM serves LoRA adapters only; this is {peft_type}")
        return {"accepts": False, "reasons": reasons, "caveats": caveats}
    whole = [n for n in saved if not n.endswith("." + TOKEN_ROWS)]
    if raw.get("modules_to_save"):
        _saved_modules(raw["modules_to_save"], reasons, caveats)
    elif whole:  # tensors saved whole with no modules_to_save: parse_fine_tuned_lora_name (vllm/lora/utils.py) refuses
        reasons.append(f"tensors saved whole ({', '.join(sorted(whole))}) stop vLLM's loader ('... is unsupported LoRA "
                       "weight')")
    if raw.get("trainable_token_indices"):
        # parse_fine_tuned_lora_name (vllm/lora/utils.py) takes no `token_adapter.trainable_tokens_delta` (issue
        # #36501 quotes the error); vllm-project/vllm#36648 was closed, #55796 (--max-lora-trainable-tokens, whose
        # PEFTHelper reads trainable_token_indices) was open in September 2026: no release reads the rows.
        reasons.append(f"trainable_token_indices: vLLM's loader stops at its trained rows ('...{TOKEN_ROWS} is "
                       "unsupported LoRA weight'); vllm-project/vllm#55796, open in September 2026, would read them")
    if raw.get("layer_replication"):
        reasons.append(STACKED.format(who="vLLM"))
    if raw.get("use_dora"):
        reasons.append("use_dora: vLLM does not support DoRA")
    if raw.get("fan_in_fan_out"):
        # peft sets it for Conv1D layers: GPT-2's. vLLM's GPT2LMHeadModel implements no SupportsLoRA
        # (vllm/model_executor/models/gpt2.py), and the LoRA model runner refuses such a class
        # (vllm/v1/worker/lora_model_runner_mixin.py: "... does not support LoRA yet.").
        reasons.append("fan_in_fan_out (GPT-2's Conv1D layers): vLLM serves no LoRA on GPT-2 ('GPT2LMHeadModel does "
                       "not support LoRA yet.')")
    reasons.extend(_biases(raw))
    reasons.extend(_base_copies(base_copies, caveats))
    caveats.extend(_embedding_caveats(targets))
    _ranks(raw, ranks, reasons, caveats)
    if raw.get("alpha_pattern"):
        caveats.append(f"alpha_pattern: {PATTERNS}")
    # layers_to_transform only leaves layers out of the file: vLLM adapts the layers the file's tensors name
    # (LoRAModel.from_local_checkpoint, vllm/lora/lora_model.py), so it needs no word.
    reasons.extend(_training_tensors(raw))
    reasons.extend(_variants(raw))
    _experts(raw, targets, caveats)
    caveats.append("vLLM serves LoRA only for model classes that support it (Llama, Qwen2, Mistral, ... ); every target "
                   "module must be one the class lists as LoRA-capable")
    return {"accepts": not reasons, "reasons": reasons, "caveats": caveats}


def rope_caveat(rope: dict) -> str:
    """What vLLM must be told of the RoPE scaling an adapter trained under (peftkit.json's {type, factor}): vLLM
    reads the base's config.json alone, so it serves the adapter over the unscaled RoPE (linear: every position
    rotated otherwise) unless started with the scaling, as its context-extension example does (`--hf-overrides`
    with `rope_parameters`; its `--rope-scaling` is gone). Its `dynamic` rotary embedding scales every length as
    transformers does a sequence of max_position_embeddings x factor tokens, where transformers (and peftkit) leave
    a sequence within max_position_embeddings unscaled and scale a longer one by its own length."""
    kind, factor = rope["type"], float(rope["factor"])
    original = ', "original_max_position_embeddings": ORIGINAL' if kind == "yarn" else ""
    text = (f"RoPE scaling ({kind}, factor {factor:g}, in peftkit.json): vLLM reads the base's config.json only, so "
            f"it serves the adapter over the unscaled RoPE unless started with --hf-overrides '{{\"rope_parameters\": "
            f"{{\"rope_type\": \"{kind}\", \"factor\": {factor}, \"rope_theta\": THETA{original}}}}}' "
            "(THETA the base's rope_theta" + (", ORIGINAL its max_position_embeddings" if original else "")
            + f") and --max-model-len up to {factor:g} x its max_position_embeddings")
    if kind == "dynamic":
        text += ("; even so, vLLM's dynamic scaling scales every sequence as transformers does one of that length, "
                 "not by each sequence's own length past max_position_embeddings: other numbers than peftkit's")
    return text


def _variants(raw: dict) -> list[str]:
    """vLLM's reasons for the LoRA variants it serves no version of: aLoRA, KaSA and BD-LoRA."""
    reasons = []
    if raw.get("alora_invocation_tokens"):
        # vllm-project/vllm#19710 (Activated LoRA, --enable-activated-lora; its vllm/lora/layers/activated_linear.py
        # is in the stored history) was closed unmerged: no vLLM applies an aLoRA from its invocation on. PEFTHelper
        # (vllm/lora/peft_helper.py) of 0.10 ignores the field, so the adapter acts on every token; the newest stored
        # one refuses it in _validate_features.
        reasons.append("alora_invocation_tokens (aLoRA): vLLM serves no activated LoRA (vllm-project/vllm#19710 was "
                       "closed unmerged): versions that read the field refuse it ('vLLM does not support Activated "
                       "LoRA (aLoRA).'), older ones apply the adapter to every token, the prompt before the invocation "
                       "too (different outputs, without an error)")
    if raw.get("kasa_config"):
        # lora_diag is no name parse_fine_tuned_lora_name (vllm/lora/utils.py) takes: the load stops there
        reasons.append("kasa_config (KaSA): its lora_diag tensors stop vLLM's loader ('... is unsupported LoRA "
                       "weight'); vLLM would neither scale the rank by them nor take the base's r smallest singular "
                       "components out first: merge it")
    if raw.get("use_bdlora"):
        # vllm-project/vllm#28136 (BD-LoRA; its vllm/lora/layers/block_diagonal_layers.py is in the stored history)
        # was open; the newest stored PEFTHelper (vllm/lora/peft_helper.py) refuses the field in _validate_features.
        reasons.append("use_bdlora: vLLM serves no BD-LoRA (vllm-project/vllm#28136 was open): versions that read the "
                       "field refuse it ('vLLM does not support block-diagonal LoRA (BD-LoRA).'), older ones misread "
                       "its factors, saved as their blocks stacked (A (r, in / N), B (out, r / N)), as plain LoRA "
                       "factors: merge it")
    return reasons


def _biases(raw: dict) -> list[str]:
    """vLLM's reasons for trained biases: the base's own (peft's `bias`) and lora_B's (`lora_bias`)."""
    reasons = []
    if raw.get("bias", "none") != "none":
        # PEFTHelper.validate_legal (vllm/lora/peft_helper.py): "Adapter bias is not supported." in current vLLM;
        # 0.6-0.10 took it with --enable-lora-bias, but their parser gave a `<module>.bias` (the base's own bias,
        # which this field trains) to the module's parent, no LoRA target, so the load stopped there too.
        reasons.append(f"bias={raw['bias']!r}: vLLM refuses the base's trained biases ('Adapter bias is not "
                       "supported.'; --enable-lora-bias of older versions read lora_B's bias, not these)")
    if raw.get("lora_bias"):
        # vllm/lora/utils.py parse_fine_tuned_lora_name takes `.lora_A.weight`, `.lora_B.weight` and
        # `lora_embedding_A/B` alone, so `<module>.lora_B.bias` ends the load ("... is unsupported LoRA weight");
        # only 0.6-0.10, started with --enable-lora-bias, read it (their LoRA bias was removed in late 2025). The
        # newest stored PEFTHelper (vllm/lora/peft_helper.py) refuses the field itself, before any tensor is read.
        reasons.append("lora_bias: vLLM stops at lora_B's bias tensors ('... is unsupported LoRA weight'; versions "
                       "that read the field refuse it first: 'vLLM does not support LoRA bias (lora_bias).'); only "
                       "vLLM 0.6-0.10 started with --enable-lora-bias read them")
    return reasons


# PEFTHelper._validate_features (vllm/lora/peft_helper.py) refused any modules_to_save ("vLLM only supports
# modules_to_save being None."); vllm-project/vllm#53555 (merged by September 2026) lets a sequence classifier's head
# through, `score` or `classifier` by name (the newest stored PEFTHelper's check), loads it whole beside the LoRA
# tensors (LoRAModel.modules_to_save) and checks its shape against the served model's head; #57766 (open) would lift
# the same-num_labels condition.
CLASSIFIER_HEADS = ("classifier", "score")


def _saved_modules(names: list[str], reasons: list[str], caveats: list[str]) -> None:
    """vLLM's word on modules_to_save: a classifier's head alone is a version question (a caveat), others a reason."""
    if set(names) <= set(CLASSIFIER_HEADS):
        caveats.append(f"modules_to_save ({', '.join(names)}): a sequence classifier's trained head, which vLLM serves "
                       "since vllm-project/vllm#53555 (2026), with the served model's num_labels; older versions refuse "
                       "it ('vLLM only supports modules_to_save being None.')")
    else:
        reasons.append(f"modules_to_save ({', '.join(names)}): vLLM's loader requires it to be null (versions since "
                       "vllm-project/vllm#53555 take a classifier's score or classifier head alone)")


def _ranks(raw: dict, ranks: dict[str, int] | None, reasons: list[str], caveats: list[str]) -> None:
    """vLLM's word on the ranks, read from the tensors: --max-lora-rank, and per-layer ranks (version-dependent)."""
    if not ranks:
        return
    top = max(ranks.values())
    if top > VLLM_MAX_LORA_RANKS[-1]:
        reasons.append(f"rank {top} > {VLLM_MAX_LORA_RANKS[-1]}, the largest --max-lora-rank vLLM takes")
    elif top > VLLM_DEFAULT_MAX_LORA_RANK:
        caveats.append(f"rank {top} > {VLLM_DEFAULT_MAX_LORA_RANK}: start vLLM with --max-lora-rank {_vllm_rank(top)}")
    if other := sorted({rank for rank in ranks.values() if rank != raw.get("r", rank)}):
        caveats.append(f"per-layer ranks (rank_pattern: {', '.join(map(str, other))} beside r={raw['r']}): "
                       f"{PATTERNS}")


# PEFTHelper (vllm/lora/peft_helper.py) of vLLM 0.10 (its API page on docs.vllm.ai) reads neither rank_pattern nor
# alpha_pattern: LoRALayerWeights.from_config (vllm/lora/lora_weights.py) gives every layer the config's
# lora_alpha / r, so a layer of another rank or alpha is scaled r_layer / r (or alpha / alpha_layer) times off,
# silently. The newest stored PEFTHelper (2026, with tests/lora/test_peft_helper.py's cases; the index it was read
# from records no commit or release, and the from_config that calls it was not among its stored versions) reads both:
# get_rank_and_scaling matches a module's checkpoint name by peft's get_pattern_key rule, `(.*\.)?(key)$`, the first
# key winning, and validate_legal checks the largest of r and rank_pattern's ranks against --max-lora-rank (the
# tensors' largest rank, which _ranks advises). Which one a user runs decides, so it is a caveat naming the test.
PATTERNS = ("a vLLM whose PEFTHelper has get_rank_and_scaling (vllm/lora/peft_helper.py; not 0.10's) scales each "
            "layer by its own rank and alpha, as peft does; an older one scales every layer by lora_alpha / r, those "
            "layers silently wrong: there, merge it (peftkit merge)")


def _experts(raw: dict, targets: dict, caveats: list[str]) -> None:
    """vLLM's word on LoRA on a mixture's experts: fused (target_parameters) or one by one (transformers 4's)."""
    if raw.get("target_parameters"):
        caveats.append("target_parameters (LoRA on fused expert weights): only vLLM versions with LoRA for fused "
                       "mixture-of-experts layers load it; not verified against vLLM")
    if experts := _per_expert(targets):
        caveats.append(f"{PER_EXPERT.format(example=experts[0])}; whether vLLM serves LoRA on a mixture's experts "
                       "depends on its version: not verified against vLLM")
        if raw.get("use_rslora"):
            # LoRAModelManager._create_merged_loras_inplace packs per-expert LoRAs with PackedLoRALayerWeights.pack_moe
            # (vllm/lora/lora_weights.py), which scaled them by lora_alpha / rank, not PEFTHelper's rsLoRA factor,
            # until vllm-project/vllm#55548 (merged September 2026, fixing #55545) made pack_moe and
            # pack_moe_stacked keep the stored factor: a version question, so a caveat.
            caveats.append("use_rslora on a mixture's experts one by one: vLLM before its fix of September 2026 "
                           "(vllm-project/vllm#55548) packs them scaled by lora_alpha / r, not lora_alpha / sqrt(r) "
                           "(sqrt(r) times too small, silently; there, merge it); later versions keep the rsLoRA scale")


def _embedding_caveats(targets: dict) -> list[str]:
    """LoRA on the embeddings and the output head: vLLM serves them where the model class lists them in its
    embedding_modules (get_supported_lora_modules, vllm/lora/utils.py; Llama's, Mistral's and Qwen3's do, Qwen2's and
    Gemma2's list none in the newest stored models/*.py, so there such a tensor is an 'expected target modules' error),
    and LoRAModel.from_lora_tensors
    (vllm/lora/lora_model.py) refuses an embedding LoRA whose vocabulary (lora_embedding_A's columns) is not the
    served model's."""
    vocab = sorted({parts["lora_embedding_A"][1] for parts in targets.values() if "lora_embedding_A" in parts})
    tokens = " or ".join(map(str, vocab))
    said = [f"LoRA on an embedding: vLLM serves it only for model classes that list the embedding as LoRA-capable "
            f"(Llama, Mistral, Qwen3; not Qwen2, Gemma), on a served model of {tokens} tokens (the adapter's vocabulary; "
            "another is refused)"] if vocab else []
    if any(p.rsplit(".", 1)[-1] == "lm_head" for p in targets):
        said.append("LoRA on lm_head: vLLM serves it only for model classes that list lm_head as LoRA-capable (Llama, "
                    "Mistral, Qwen3; not Qwen2, Gemma)")
    return said


def _training_tensors(raw: dict) -> list[str]:
    """vLLM's reasons for the tensors of a variant that is plain LoRA outside training but saves training state beside
    it: parse_fine_tuned_lora_name (vllm/lora/utils.py) refuses any tensor but lora_A/lora_B weights and
    lora_embedding_A/B, so the load stops at them (merge it, or serve it with an engine that drops them)."""
    said = {"monteclora_config": "monteclora_config (MonteCLoRA): its sampler's tensors (lora_monteclora_sampler.*)",
            "velora_config": "velora_config (VeLoRA): its lora_velora_embed tensors"}
    return [f"{what} stop vLLM's loader ('... is unsupported LoRA weight'); outside training it is plain LoRA: merge it"
            for key, what in said.items() if raw.get(key)]


# vllm/lora/utils.py is_base_embedding_weights: the loader skips peft's copies of these two alone (from_lora_tensors,
# vllm/lora/lora_model.py); any other `base_layer.weight` reaches parse_fine_tuned_lora_name, which refuses it.
SKIPPED_COPIES = (".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight")


def _base_copies(base_copies: list[str], caveats: list[str]) -> list[str]:
    """vLLM's reasons for the base weights peft saves beside an adapted embedding (save_embedding_layers); the
    copies it skips are a caveat (appended to `caveats`), since the base vLLM serves must hold the same rows."""
    skipped = [n for n in base_copies if n.endswith(SKIPPED_COPIES)]
    if skipped:
        caveats.append(f"the file holds base weights ({', '.join(skipped)}), which peft saves beside an adapted "
                       "embedding: vLLM skips them and uses the served base's own (older versions stop at them)")
    if stopping := [n for n in base_copies if n not in skipped]:
        return [f"the file holds base weights ({', '.join(stopping)}) that vLLM stops at ('... is unsupported LoRA "
                "weight'): it skips peft's copies of embed_tokens and lm_head alone"]
    return []


def llama_cpp_verdict(peft_type: str, raw: dict, saved: dict[str, int], targets: dict) -> dict:
    """What llama.cpp's convert_lora_to_gguf.py makes of the adapter: it reads `lora_alpha` and the lora_A/lora_B
    tensors alone (exiting on any other tensor but peft's base copies), and llama.cpp scales each layer by alpha / its
    rank; a config field it does not read but the numbers depend on makes a GGUF that is silently wrong."""
    reasons = []
    if peft_type != "LORA":
        return {"accepts": False, "reasons": [f"convert_lora_to_gguf.py converts LoRA adapters only; this is {peft_type}"],
                "caveats": []}
    # It carries norm weights whole (mergekit's adapters hold them); any other tensor but lora_A/lora_B stops it: saved
    # modules, and the biases of bias: all / lora_only.
    if stopping := sorted(n for n in saved if "_layernorm" not in n and ".norm" not in n):
        reasons.append(f"tensors other than lora_A/lora_B ({', '.join(stopping[:3])}{' ...' * (len(stopping) > 3)}: "
                       "saved modules or biases) stop convert_lora_to_gguf.py, which carries norm weights only")
    if raw.get("use_dora"):
        reasons.append("use_dora: its magnitude vectors stop convert_lora_to_gguf.py")
    if raw.get("layer_replication"):
        reasons.append(STACKED.format(who="llama.cpp"))
    if raw.get("lora_bias"):
        reasons.append("lora_bias: convert_lora_to_gguf.py reads lora_A/lora_B weights alone and stops at lora_B's "
                       "bias tensors (llama.cpp applies no LoRA bias)")
    if raw.get("use_rslora"):
        reasons.append("use_rslora: not read, so each layer would be scaled by alpha/r, not alpha/sqrt(r) (sqrt(r) "
                       "times too small, silently)")
    if raw.get("fan_in_fan_out"):
        # convert_hf_to_gguf.py's GPT2Model.modify_tensors transposes c_attn/c_proj/c_fc, stored (in, out) by Conv1D;
        # the converter's LoraModel inherits it and transposes B A too, which peft saves as Linear's (out, in). Its
        # lora_a then has `out` columns: llama-adapter.cpp refuses it ("has incorrect shape") unless in == out.
        reasons.append("fan_in_fan_out (GPT-2's Conv1D layers): convert_lora_to_gguf.py transposes the update as it "
                       "transposes GPT-2's weights, but peft saves it untransposed: llama.cpp refuses the layers whose "
                       "input and output sizes differ ('has incorrect shape') and applies the square ones transposed")
    if raw.get("alpha_pattern"):
        reasons.append("alpha_pattern: not read, so those layers would be scaled by lora_alpha (silently wrong)")
    caveats = ["LoRA on lm_head: refused for a base whose output head is its embeddings (tied)"] if any(
        p.rsplit(".", 1)[-1] == "lm_head" for p in targets) else []
    if raw.get("alora_invocation_tokens"):
        caveats.append(ACTIVATED.format(who="llama.cpp (its converter and server)"))
    if raw.get("monteclora_config"):
        reasons.append("monteclora_config: its sampler's tensors (lora_monteclora_sampler.*) stop "
                       "convert_lora_to_gguf.py; outside training it is plain LoRA: merge it")
    if raw.get("velora_config"):
        reasons.append("velora_config: its lora_velora_embed tensors (training's projections) stop "
                       "convert_lora_to_gguf.py; outside training it is plain LoRA: merge it")
    if raw.get("kasa_config"):
        reasons.append("kasa_config (KaSA): convert_lora_to_gguf.py reads neither its lora_diag tensors nor the "
                       "truncation of the base it applies to: merge it")
    if raw.get("use_bdlora"):
        reasons.append("use_bdlora: its block-diagonal factors are saved as their blocks stacked, which "
                       "convert_lora_to_gguf.py would read as plain LoRA factors of the wrong shape")
    if raw.get("target_parameters"):
        caveats.append(FUSED_EXPERTS)
    if experts := _per_expert(targets):
        caveats.append(f"{PER_EXPERT.format(example=experts[0])}; not verified against convert_lora_to_gguf.py")
    if reasons and not raw.get("alora_invocation_tokens"):
        caveats.append("merge it (peftkit merge) and convert the merged model with convert_hf_to_gguf.py instead")
    return {"accepts": not reasons, "reasons": reasons, "caveats": caveats}


# convert_lora_to_gguf.py's LoraModel._convert_peft_moe_lora_tensor (the newest stored version, 2026) takes peft's
# LoRA on fused experts: `experts.base_layer.lora_A/B` (gate_up_proj) and `experts.lora_A/B` (down_proj), lora_A
# (experts x r, in) and lora_B (out, r x experts) reshaped to per-expert pairs as peft's ParamWrapper.get_delta_weight
# reshapes them, for a base whose config gives num_local_experts, num_experts or n_routed_experts. An older one maps
# `...experts.base_layer.weight` to no GGUF tensor and stops (an error, not a wrong GGUF): a version question.
FUSED_EXPERTS = ("target_parameters (LoRA on fused expert weights): a convert_lora_to_gguf.py with PEFT MoE LoRA "
                 "conversion (_convert_peft_moe_lora_tensor, 2026) converts it for a base whose config gives its expert "
                 "count; an older one stops at those tensors with an error (llama.cpp's runtime not verified here)")


PER_EXPERT = ("it adapts a mixture of experts' experts one by one (transformers 4's layout, e.g. '{example}'), which "
              "transformers 5 fuses: peftkit converts it to LoRA on the fused experts when it loads it")


def _per_expert(targets: dict) -> list[str]:
    from peftkit.adapters import MOE_V4

    return sorted(p for p in targets if MOE_V4.search(f".{p}.") and ".experts." in f".{p}.")


ACTIVATED = ("alora_invocation_tokens (aLoRA): only a {who} with activated-LoRA support honours it; one without applies "
             "the adapter to every token, the prompt before the invocation too (different outputs, without an error)")


def _vllm_rank(r: int) -> int:
    """The smallest of vLLM's allowed --max-lora-rank values that holds r (r <= 512)."""
    return next(v for v in VLLM_MAX_LORA_RANKS if v >= r)
