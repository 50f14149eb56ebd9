"""`peftkit inspect`'s serving verdicts checked against the engines' source: what vLLM's LoRA loader (PEFTHelper in
vllm/lora/peft_helper.py, LoRAModel in vllm/lora/lora_model.py, parse_fine_tuned_lora_name in vllm/lora/utils.py)
and llama.cpp's convert_lora_to_gguf.py make of adapters peftkit and peft write."""

from transformers import AutoModelForCausalLM

from peftkit.inspect import inspect_adapter
from peftkit.inspect_text import describe
from peftkit.methods import LoraConfig
from tests.test_inspect import _ours, _peft


def test_vllm_stops_at_lora_b_s_bias(tiny_llama, tmp_path):
    """vLLM's parse_fine_tuned_lora_name (vllm/lora/utils.py) takes lora_A/lora_B weights and lora_embedding_A/B
    alone: `q_proj.lora_B.bias` ends the load; the newest stored PEFTHelper refuses the field before that, in its own
    words. inspect said it accepts the adapter, with a caveat."""
    info = inspect_adapter(_ours(tiny_llama, LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True), tmp_path / "b"))
    assert not info["vllm"]["accepts"]
    assert info["vllm"]["reasons"] == [
        "lora_bias: vLLM stops at lora_B's bias tensors ('... is unsupported LoRA weight'; versions that read the field "
        "refuse it first: 'vLLM does not support LoRA bias (lora_bias).'); only vLLM 0.6-0.10 started with "
        "--enable-lora-bias read them"]
    assert not any("lora_bias" in c for c in info["vllm"]["caveats"])


def test_vllm_skips_peft_s_copies_of_embed_tokens_and_lm_head_alone(tiny_llama, tiny_gpt2, tmp_path):
    """vLLM's loader skips `*.embed_tokens.base_layer.weight` and `*.lm_head.base_layer.weight`
    (is_base_embedding_weights, vllm/lora/utils.py); GPT-2's `transformer.wte.base_layer.weight` reaches
    parse_fine_tuned_lora_name, which refuses it. inspect said 'accepts' with a 'not verified' caveat for both."""
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model

    def saved(base, targets, out):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), PeftLora(r=2, target_modules=targets))
        model.save_pretrained(out, save_embedding_layers=True)
        return inspect_adapter(out)

    gpt2 = saved(tiny_gpt2, ["wte", "c_attn"], tmp_path / "g")
    assert gpt2["base_copies"] == ["transformer.wte.base_layer.weight"] and not gpt2["vllm"]["accepts"]
    # peft also saves the tied head's weight whole, `lm_head.weight`, with no modules_to_save: the loader stops at it
    # as at any tensor it does not parse (it was said to be modules_to_save, which vLLM 'requires to be null')
    assert "tensors saved whole (lm_head.weight) stop vLLM's loader ('... is unsupported LoRA weight')" in gpt2["vllm"][
        "reasons"] and not any(r.startswith("modules_to_save") for r in gpt2["vllm"]["reasons"])
    assert ("the file holds base weights (transformer.wte.base_layer.weight) that vLLM stops at ('... is unsupported "
            "LoRA weight'): it skips peft's copies of embed_tokens and lm_head alone") in gpt2["vllm"]["reasons"]
    llama = saved(tiny_llama, ["embed_tokens", "q_proj"], tmp_path / "l")
    assert llama["vllm"]["accepts"] and "vLLM skips them and uses the served base's own" in llama["vllm"]["caveats"][0]


def test_vllm_stops_at_the_training_tensors_of_velora_and_monteclora(tiny_llama, tmp_path):
    """VeLoRA's lora_velora_embed and MonteCLoRA's lora_monteclora_sampler.* tensors are neither lora_A/lora_B weights
    nor lora_embedding_A/B, which parse_fine_tuned_lora_name (vllm/lora/utils.py) refuses. inspect said vLLM accepts
    them, with a 'not verified' caveat."""
    from peft import LoraConfig as PeftLora

    from tests.conftest import save_peft_lora

    velora = inspect_adapter(_ours(tiny_llama, LoraConfig(r=4, target_modules=["q_proj"], velora_config={
        "num_groups": 4}), tmp_path / "v"))
    assert velora["vllm"]["reasons"] == ["velora_config (VeLoRA): its lora_velora_embed tensors stop vLLM's loader "
                                         "('... is unsupported LoRA weight'); outside training it is plain LoRA: merge it"]
    monte = inspect_adapter(save_peft_lora(tiny_llama, tmp_path / "m", PeftLora(
        r=4, target_modules=["q_proj"], monteclora_config={"num_samples": 4, "buffer_size": 3})))
    assert not monte["vllm"]["accepts"] and monte["vllm"]["reasons"][0].startswith(
        "monteclora_config (MonteCLoRA): its sampler's tensors (lora_monteclora_sampler.*) stop vLLM's loader")
    assert not any("velora" in c or "monteclora" in c for c in velora["vllm"]["caveats"] + monte["vllm"]["caveats"])


def test_a_rank_above_vllm_s_largest_max_lora_rank_is_a_reason(tiny_llama, tmp_path):
    """vLLM's --max-lora-rank takes 1, 8, ..., 320, 512 (MaxLoRARanks, vllm/config/lora.py): a rank-520 adapter cannot
    be served. inspect advised '--max-lora-rank 520', a value vLLM refuses."""
    info = inspect_adapter(_peft(tiny_llama, tmp_path / "p", r=520, target_modules=["q_proj"]))
    assert info["vllm"]["reasons"] == ["rank 520 > 512, the largest --max-lora-rank vLLM takes"]
    assert not any("--max-lora-rank" in c for c in info["vllm"]["caveats"])
    fits = inspect_adapter(_peft(tiny_llama, tmp_path / "f", r=300, target_modules=["q_proj"]))
    assert fits["vllm"]["accepts"] and "rank 300 > 16: start vLLM with --max-lora-rank 320" in fits["vllm"]["caveats"]


def test_vllm_refuses_peft_s_bias_whatever_its_flags(tiny_llama, tmp_path):
    """peft's `bias: all` saves the base's own biases; vLLM's PEFTHelper.validate_legal refuses any bias but "none"
    ('Adapter bias is not supported.'). inspect said --enable-lora-bias would serve it."""
    info = inspect_adapter(_peft(tiny_llama, tmp_path / "p", r=4, target_modules=["q_proj"], bias="all"))
    assert info["vllm"]["reasons"] == ["bias='all': vLLM refuses the base's trained biases ('Adapter bias is not "
                                       "supported.'; --enable-lora-bias of older versions read lora_B's bias, not "
                                       "these)"]


def test_embedding_lora_s_vllm_caveat_names_the_vocabulary_it_needs(tiny_llama, tmp_path):
    """Current vLLM still serves LoRA on embed_tokens and lm_head where the model class lists them (Llama's and
    Qwen3's embedding_modules; Qwen2's and Gemma2's list none), and refuses an
    embedding LoRA whose lora_embedding_A width is not the served model's vocabulary (vllm/lora/lora_model.py).
    inspect said recent versions dropped it."""
    info = inspect_adapter(_ours(tiny_llama, LoraConfig(r=4, target_modules=["embed_tokens", "lm_head"]), tmp_path / "e"))
    vocab = AutoModelForCausalLM.from_pretrained(tiny_llama).config.vocab_size
    assert info["vllm"]["accepts"] and info["vllm"]["caveats"][:2] == [
        "LoRA on an embedding: vLLM serves it only for model classes that list the embedding as LoRA-capable (Llama, "
        f"Mistral, Qwen3; not Qwen2, Gemma), on a served model of {vocab} tokens (the adapter's vocabulary; another is "
        "refused)",
        "LoRA on lm_head: vLLM serves it only for model classes that list lm_head as LoRA-capable (Llama, Mistral, Qwen3; "
        "not Qwen2, Gemma)"]


def test_vllm_stops_at_kasa_s_singular_values(tiny_llama, tmp_path):
    """KaSA's lora_diag is no tensor name vLLM's parse_fine_tuned_lora_name takes: the load stops with an error. The
    reason said a plain LoRA loader would serve it silently wrong."""
    info = inspect_adapter(_ours(tiny_llama, LoraConfig(r=4, target_modules=["q_proj"], kasa_config={}), tmp_path / "k"))
    assert info["vllm"]["reasons"] == [
        "kasa_config (KaSA): its lora_diag tensors stop vLLM's loader ('... is unsupported LoRA weight'); vLLM would "
        "neither scale the rank by them nor take the base's r smallest singular components out first: merge it"]


def test_llama_cpp_transposes_a_conv1d_update(tiny_gpt2, tmp_path):
    """convert_lora_to_gguf.py's GPT-2 transposes c_attn/c_proj/c_fc as it does the base's Conv1D weights, which are
    (in, out); peft saves the LoRA factors in Linear's layout, so the converted lora_a has `out` columns: llama.cpp
    refuses c_attn's (96 outputs, 32 inputs) and applies attn.c_proj's (32 x 32) transposed. It said 'would convert'."""
    info = inspect_adapter(_peft(tiny_gpt2, tmp_path / "g", r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True))
    assert not info["llama_cpp"]["accepts"] and info["llama_cpp"]["reasons"] == [
        "fan_in_fan_out (GPT-2's Conv1D layers): convert_lora_to_gguf.py transposes the update as it transposes "
        "GPT-2's weights, but peft saves it untransposed: llama.cpp refuses the layers whose input and output sizes "
        "differ ('has incorrect shape') and applies the square ones transposed"]


def test_layers_to_transform_needs_no_vllm_caveat(tiny_llama, tmp_path):
    """vLLM adapts the layers the file's tensors name (LoRAModel.from_local_checkpoint reads the safetensors keys), so
    an adapter of some layers only is served as it is; inspect added 'layers_to_transform: not verified'."""
    info = inspect_adapter(_peft(tiny_llama, tmp_path / "p", r=4, target_modules=["q_proj"], layers_to_transform=[0]))
    assert [p.split(".")[2] for p in info["ranks"]] == ["0"]
    assert info["vllm"]["accepts"] and not any("layers_to_transform" in c for c in info["vllm"]["caveats"])


def test_vllm_serves_no_lora_on_gpt2(tiny_gpt2, tmp_path):
    """peft's fan_in_fan_out marks Conv1D layers, GPT-2's; vLLM's GPT2LMHeadModel implements no SupportsLoRA, so vLLM
    refuses LoRA on it ('GPT2LMHeadModel does not support LoRA yet.'). inspect said vLLM would serve it."""
    info = inspect_adapter(_peft(tiny_gpt2, tmp_path / "g", r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    assert info["vllm"]["reasons"] == ["fan_in_fan_out (GPT-2's Conv1D layers): vLLM serves no LoRA on GPT-2 "
                                       "('GPT2LMHeadModel does not support LoRA yet.')"]


def test_vllm_s_word_on_a_classifier_s_saved_head_names_the_version(tiny_llama, tmp_path):
    """vLLM refused any modules_to_save until vllm-project/vllm#53555 (2026), which serves a sequence classifier's
    trained head, `score` or `classifier` by name (PEFTHelper._validate_features, vllm/lora/peft_helper.py); any other
    saved module is still refused. inspect refused the classifier's adapter for every vLLM."""
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=3)
    get_peft_model(model, PeftLora(task_type="SEQ_CLS", r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "c")
    info = inspect_adapter(tmp_path / "c")
    said = ("modules_to_save (classifier, score): a sequence classifier's trained head, which vLLM serves since "
            "vllm-project/vllm#53555 (2026), with the served model's num_labels; older versions refuse it ('vLLM only "
            "supports modules_to_save being None.')")
    assert info["vllm"]["accepts"] and said in info["vllm"]["caveats"] and f"               note: {said}" in describe(info)
    head = inspect_adapter(_peft(tiny_llama, tmp_path / "h", r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert head["vllm"]["reasons"] == ["modules_to_save (lm_head): vLLM's loader requires it to be null (versions since "
                                       "vllm-project/vllm#53555 take a classifier's score or classifier head alone)"]
