"""Combining adapters (`peftkit merge --adapter A --adapter B --weights ... --method ...`) against peft's
`add_weighted_adapter`, with non-trivial random LoRA adapters on tiny models, and the deliberate differences
(rsLoRA scaling, negative weights in TIES, DoRA magnitudes) against independent dense computations."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.utils import merge_utils
from torch import nn
from transformers import AutoModelForCausalLM

from peftkit.adapters import inject_adapters
from peftkit.adapters.state_dicts import adapter_state_dict
from peftkit.combine import combine_tensors
from peftkit.combine_adapters import adapter_files, combine_adapters, combine_layers
from peftkit.combine_inputs import Combination, output_rank, read_sources, skeleton
from peftkit.errors import PeftkitError, PeftkitWarning
from peftkit.merge_weights import conv1d_modules
from peftkit.methods.bottleneck import BottleneckConfig
from peftkit.methods.ia3 import IA3Config
from peftkit.methods.lora import LoraConfig
from peftkit.peft_format import peft_config, save_adapter
from tests.conftest import INFINITE_KEY, base_with_infinities, cli_user_error, random_adapters
from tests.conftest import load_fp32 as _load  # (float32, eval mode)

IDS = torch.tensor([[1, 40, 41, 42, 7, 60, 61, 62], [1, 55, 12, 80, 81, 3, 47, 2]])
TOL = 1e-4  # max abs logit difference, fp32
LLAMA_TARGETS = ["embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The non-DARE type that injects the same adapter as each DARE type: run first, it leaves torch's RNG where
# peft's DARE draws start (peft's injection draws the new adapter's init from the same RNG).
TWIN = {"dare_linear": "linear", "dare_ties": "ties", "dare_linear_svd": "svd", "dare_ties_svd": "ties_svd"}


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def make_adapter(base: Path, cfg, seed: int, out: Path, std: float = 0.2) -> str:
    """A saved adapter far from identity: A drawn from `seed`, B (and an embedding's A) random."""
    model = _load(base)
    torch.manual_seed(seed)
    targets = inject_adapters(model, cfg)
    random_adapters(model, seed=seed + 100, std=std)
    config = peft_config(cfg, targets, str(base), bool(conv1d_modules(model)), model.config.model_type)
    save_adapter(out, adapter_state_dict(model, []), config)
    return str(out)


@pytest.fixture(scope="module")
def llama_adapters(tiny_llama, tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("combine-llama")
    return [make_adapter(tiny_llama, LoraConfig(r=4, alpha=8, target_modules=LLAMA_TARGETS), seed, root / f"a{seed}")
            for seed in (1, 2)]


def peft_combination(base: Path, dirs: list[str], weights: list[float], method: str, seed: int = 0,
                     **options) -> tuple[PeftModel, torch.Tensor | None]:
    """peft's add_weighted_adapter as 'combo' (active), and for DARE the RNG state its draws started from."""
    model = PeftModel.from_pretrained(_load(base), dirs[0], adapter_name="a0")
    for i, d in enumerate(dirs[1:], 1):
        model.load_adapter(d, adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(dirs))]
    state = None
    if method in TWIN:
        torch.manual_seed(seed)
        model.add_weighted_adapter(names, weights, "probe", combination_type=TWIN[method], **options)
        state = torch.get_rng_state()
        model.delete_adapter("probe")
    torch.manual_seed(seed)
    model.add_weighted_adapter(names, weights, "combo", combination_type=method, **options)
    model.set_adapter("combo")
    return model.eval(), state


def _peft_options(c: Combination) -> dict:
    return {"density": c.density, "svd_rank": c.svd_rank, "svd_clamp": c.svd_clamp,
            "majority_sign_method": c.majority_sign}


def ours_with_state(dirs: list[str], c: Combination, base: Path, out: Path, state: torch.Tensor) -> Path:
    """Our combined adapter, DARE drawing from the generator state peft's draws started from."""
    sources = read_sources(dirs, trust_remote_code=False)
    model = skeleton(str(base), None, False)
    generator = torch.Generator()
    generator.set_state(state)
    layers = combine_layers(c, sources, model, None, generator)
    files = adapter_files(layers, output_rank(c, sources), str(base), None, conv1d_modules(model))
    save_adapter(out, *files)
    return out


CASES = [
    Combination("linear", (0.7, 0.3)),
    Combination("cat", (0.7, 0.3)),
    Combination("svd", (0.7, 0.3)),
    Combination("svd", (0.7, 0.3), svd_rank=6, svd_clamp=0.95),
    Combination("ties", (0.7, 0.3), density=0.5),
    Combination("ties", (0.7, 0.3), density=0.5, majority_sign="frequency"),
    Combination("ties_svd", (0.7, 0.3), density=0.5),
    Combination("dare_linear", (0.7, 0.3), density=0.5, seed=3),
    Combination("dare_ties", (0.7, 0.3), density=0.5, seed=3),
    Combination("dare_linear_svd", (0.7, 0.3), density=0.7, seed=4),
    Combination("dare_ties_svd", (0.7, 0.3), density=0.7, seed=4),
    Combination("magnitude_prune", (0.7, 0.3), density=0.5),
    Combination("magnitude_prune_svd", (0.7, 0.3), density=0.5),
    # A negative weight subtracts: exact in cat and svd; linear keeps peft's placement of the sign (on A).
    Combination("linear", (1.0, -0.5)),
    Combination("cat", (1.0, -1.0)),
    Combination("svd", (1.0, -1.0)),
]
MEASURED: dict[str, float] = {}


@pytest.mark.parametrize("c", CASES, ids=lambda c: f"{c.method}-{c.weights}-{c.density}-{c.majority_sign}-{c.svd_clamp}")
def test_equals_peft(c, llama_adapters, tiny_llama, tmp_path):
    reference, state = peft_combination(tiny_llama, llama_adapters, list(c.weights), c.method, c.seed, **_peft_options(c))
    theirs = _logits(reference)
    base = _logits(_load(tiny_llama))
    assert _diff(theirs, base) > 1e-2  # the combination really changes the output
    if state is None:
        out = combine_adapters(llama_adapters, c, str(tmp_path / "combined"))
    else:
        out = ours_with_state(llama_adapters, c, tiny_llama, tmp_path / "combined", state)
    ours = _logits(PeftModel.from_pretrained(_load(tiny_llama), out).eval())  # peft loads our adapter
    diff = _diff(ours, theirs)
    MEASURED[f"{c.method} {c.weights}"] = max(diff, MEASURED.get(f"{c.method} {c.weights}", 0.0))
    print(f"\nmax abs logit diff vs peft, {c.method} {c.weights}: {diff:.2e}")
    assert diff <= TOL
    config = json.loads((Path(out) / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (reference.peft_config["combo"].r,) * 2 + (False,)


@pytest.mark.parametrize("method", ["linear", "cat", "svd"])
def test_conv1d_equals_peft(method, tiny_gpt2, tmp_path):
    """GPT-2's Conv1D layers (weights stored (in, out)): the SVD factors the transposed delta, as peft."""
    dirs = [make_adapter(tiny_gpt2, LoraConfig(r=4, alpha=8), seed, tmp_path / f"a{seed}") for seed in (1, 2)]
    reference, _ = peft_combination(tiny_gpt2, dirs, [0.6, 0.4], method)
    out = combine_adapters(dirs, Combination(method, (0.6, 0.4)), str(tmp_path / "combined"))
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    diff = _diff(_logits(PeftModel.from_pretrained(_load(tiny_gpt2), out)), _logits(reference))
    print(f"\nmax abs logit diff vs peft, gpt2 {method}: {diff:.2e}")
    assert diff <= TOL


@pytest.mark.parametrize("c", [Combination("linear", (0.7, 0.3)), Combination("svd", (1.0, -0.5)),
                               Combination("dare_ties", (0.7, 0.3), density=0.5, seed=5)], ids=lambda c: c.method)
def test_into_base_equals_the_combined_adapter(c, llama_adapters, tiny_llama, tmp_path):
    adapter = combine_adapters(llama_adapters, c, str(tmp_path / "combined"))
    merged = combine_adapters(llama_adapters, c, str(tmp_path / "merged"), into_base=True)
    assert (merged / "config.json").exists() and not (merged / "adapter_config.json").exists()
    live = _logits(PeftModel.from_pretrained(_load(tiny_llama), adapter))
    assert _diff(_logits(_load(merged)), live) <= TOL


def test_adapters_trained_with_one_chat_template_combine_into_an_output_that_has_it(llama_adapters, tmp_path):
    """Adapters of runs with data.chat_template carry it (chat_template.jinja): the combined adapter, and the merged
    model's tokenizer, must too, else `peftkit generate`/`chat` prompt them with the base tokenizer's (or none)."""
    import shutil

    from transformers import AutoTokenizer

    from peftkit.data.chat_templates import CHATML

    dirs = [str(shutil.copytree(d, tmp_path / Path(d).name)) for d in llama_adapters]
    for d in dirs:
        (Path(d) / "chat_template.jinja").write_text(CHATML)
    c = Combination("linear", (0.7, 0.3))
    adapter = combine_adapters(dirs, c, str(tmp_path / "combined"))
    assert (adapter / "chat_template.jinja").read_text() == CHATML
    merged = combine_adapters(dirs, c, str(tmp_path / "merged"), into_base=True)
    assert AutoTokenizer.from_pretrained(merged).chat_template == CHATML
    (Path(dirs[1]) / "chat_template.jinja").unlink()  # trained with another template: none is the output's
    with pytest.warns(PeftkitWarning, match=r"chat_template.jinja.*not all the same"):
        adapter = combine_adapters(dirs, c, str(tmp_path / "mixed"))
    assert not (adapter / "chat_template.jinja").exists()


def test_dare_draws_keep_density_and_rescale():
    """DARE keeps each value with probability `density` and divides it by `density`; the seed decides which."""
    task = torch.randn(200, 300)
    gen = torch.Generator().manual_seed(0)
    kept = combine_tensors("dare_linear", [task], [1.0], density=0.3, generator=gen)
    nonzero = kept != 0
    assert abs(nonzero.float().mean().item() - 0.3) < 0.01
    torch.testing.assert_close(kept[nonzero], task[nonzero] / 0.3)
    again = combine_tensors("dare_linear", [task], [1.0], density=0.3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(kept, again, rtol=0, atol=0)
    # The same draws as peft's torch.bernoulli from torch's global RNG at the same state.
    torch.manual_seed(0)
    torch.testing.assert_close(kept, merge_utils.dare_linear([task], torch.tensor([1.0]), 0.3), rtol=0, atol=0)


def test_ties_equals_peft_for_positive_weights():
    tasks = [torch.randn(20, 30) for _ in range(3)]
    weights = [0.5, 1.5, 0.25]
    for sign in ("total", "frequency"):
        ours = combine_tensors("ties", tasks, weights, density=0.4, majority_sign=sign)
        torch.testing.assert_close(ours, merge_utils.ties(tasks, torch.tensor(weights), 0.4, sign), rtol=0, atol=0)


def test_ties_elects_signs_as_the_weights_apply_them():
    """Deliberate difference from peft: a task given a negative weight votes with the sign it is applied with.

    One entry, task 1 = +1 (weight 1), task 2 = +3 (weight -1, to be removed): applied, they are +1 and -3. The
    total signed mass is -2, so TIES keeps -3 only (the sign conflict resolved). peft elects from the unweighted
    +1 and +3 (positive), keeps both and averages +1 and -3 to -1: the conflict TIES exists to remove."""
    tasks = [torch.tensor([1.0]), torch.tensor([3.0])]
    ours = combine_tensors("ties", tasks, [1.0, -1.0], density=1.0)
    peft_ties = merge_utils.ties(tasks, torch.tensor([1.0, -1.0]), 1.0, "total")
    assert ours.item() == -3.0 and peft_ties.item() == -1.0


@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_a_ties_task_of_weight_0_is_no_vote(sign):
    """Deliberate difference from peft: a task of weight 0 applies nothing, so it neither votes nor counts among the
    entries averaged. peft's votes +: here it outvotes the applied tasks' -1 and halves what is kept."""
    tasks = [torch.tensor([-1.0, 2.0]), torch.tensor([5.0, 2.0]), torch.tensor([5.0, 2.0])]
    ours = combine_tensors("ties", tasks, [1.0, 0.0, 0.0], density=1.0, majority_sign=sign)
    torch.testing.assert_close(ours, combine_tensors("ties", tasks[:1], [1.0], density=1.0, majority_sign=sign))
    assert ours.tolist() == [-1.0, 2.0]
    peft_ties = merge_utils.ties(tasks, torch.tensor([1.0, 0.0, 0.0]), 1.0, sign)
    assert peft_ties.tolist() == pytest.approx([0.0, 2.0 / 3])


def _dense_expectation(base: Path, deltas: dict[str, torch.Tensor]) -> nn.Module:
    """The base with `deltas` ({parameter name: delta}) added: the independent reference."""
    model = _load(base)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, delta in deltas.items():
            params[name].add_(delta)
    return model


def _merged_deltas(base: Path, adapter: str, weight: float) -> dict[str, torch.Tensor]:
    """weight * (peft's merge of `adapter` - the base), per weight: an adapter's full update as peft applies it."""
    plain = dict(_load(base).named_parameters())
    merged = PeftModel.from_pretrained(_load(base), adapter).merge_and_unload()
    return {n: weight * (p.detach() - plain[n].detach()) for n, p in merged.named_parameters()
            if not torch.equal(p, plain[n])}


def _add(*deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for d in deltas:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


@pytest.mark.parametrize("method", ["cat", "svd", "linear"])
def test_rslora_combination_keeps_its_scaling(method, tiny_llama, tmp_path):
    """Deliberate difference from peft: the combined adapter has scaling 1 (alpha = r, use_rslora false). peft
    copies use_rslora: true from the first adapter with alpha = r, scaling the result by sqrt(r) too much."""
    cfg = LoraConfig(r=4, alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"])
    dirs = [make_adapter(tiny_llama, cfg, seed, tmp_path / f"a{seed}") for seed in (1, 2)]
    weights = (0.7, 0.3) if method != "cat" else (0.7, -0.3)
    svd_rank = 8 if method == "svd" else None  # rank 8 holds the sum of two rank-4 updates exactly
    expected = _logits(_dense_expectation(tiny_llama, _add(*(_merged_deltas(tiny_llama, d, w)
                                                              for d, w in zip(dirs, weights, strict=True)))))
    out = combine_adapters(dirs, Combination(method, weights, svd_rank=svd_rank), str(tmp_path / "combined"))
    ours = _logits(PeftModel.from_pretrained(_load(tiny_llama), out))
    reference, _ = peft_combination(tiny_llama, dirs, list(weights), method, svd_rank=svd_rank)
    theirs = _logits(reference)
    if method == "linear":  # an approximation (cross terms): compare with peft's own factors at scaling 1
        from peft.tuners.lora import LoraLayer

        scalings = {m.scaling["combo"] for m in reference.modules() if isinstance(m, LoraLayer)}
        assert scalings and all(x == pytest.approx(2.0) for x in scalings)  # alpha = r = 4, rsLoRA: 4 / sqrt(4), not 1
        for module in reference.modules():
            if isinstance(module, LoraLayer):
                module.scaling["combo"] = 1.0
        assert _diff(ours, _logits(reference)) <= TOL
    else:
        assert _diff(ours, expected) <= TOL
        print(f"\nrsLoRA {method}: ours vs dense {_diff(ours, expected):.2e}, peft vs dense {_diff(theirs, expected):.2e}")
    assert _diff(theirs, ours) > 1e-2  # peft's is off by sqrt(r)


def test_dora_combination_keeps_the_magnitudes(tiny_llama, tmp_path):
    """Deliberate difference from peft (its issue 3608): a DoRA adapter's update is m (W + s B A) / ||.||_c - W,
    magnitude included; peft's combination keeps use_dora with a magnitude started at ||W||_c, dropping theirs."""
    cfg = LoraConfig(r=4, alpha=8, use_dora=True, target_modules=["q_proj", "up_proj"])
    dirs = [make_adapter(tiny_llama, cfg, seed, tmp_path / f"a{seed}", std=0.3) for seed in (1, 2)]
    for d in dirs:  # move the magnitudes off ||W + s B A||_c, as training does
        _scale_magnitudes(Path(d), 1.3)
    weights = (0.6, 0.4)
    expected = _logits(_dense_expectation(tiny_llama, _add(*(_merged_deltas(tiny_llama, d, w)
                                                              for d, w in zip(dirs, weights, strict=True)))))
    # Rank 32 = the layers' smaller side: the SVD keeps the whole combined update, so the result is exact.
    ours_adapter = combine_adapters(dirs, Combination("svd", weights, svd_rank=32), str(tmp_path / "combined"))
    ours = _logits(PeftModel.from_pretrained(_load(tiny_llama), ours_adapter))
    merged = combine_adapters(dirs, Combination("svd", weights, svd_rank=32), str(tmp_path / "merged"), into_base=True)
    assert _diff(ours, expected) <= TOL and _diff(_logits(_load(merged)), expected) <= TOL
    reference, _ = peft_combination(tiny_llama, dirs, list(weights), "svd", svd_rank=32)
    print(f"\nDoRA svd: ours vs dense {_diff(ours, expected):.2e}, peft vs dense {_diff(_logits(reference), expected):.2e}")
    assert _diff(_logits(reference), expected) > 1e-2


def _peft_dora_on_the_embeddings(base: Path, out: Path, use_dora: bool = True) -> Path:
    """peft's DoRA adapter (a LoRA with `use_dora` False) on embed_tokens and q_proj, every trained tensor moved off
    its init, saved by peft: its file holds `embed_tokens.base_layer.weight` too (save_embedding_layers, on by default
    with an embedding target)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(_load(base), PeftLoraConfig(r=4, lora_alpha=8, use_dora=use_dora,
                                                       target_modules=["embed_tokens", "q_proj"]))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.2)
    model.save_pretrained(out)
    return out


EMBEDDING_COPY = "base_model.model.model.embed_tokens.base_layer.weight"
"""The copy of the embeddings' weight peft saves beside an adapted embedding's factors."""


def _beside_a_lora(base: Path, adapter: Path, out: Path) -> tuple[str, tuple[float, float], torch.Tensor]:
    """(a LoRA on q/v at `out`, the weights (0.6, -0.4), the dense expectation's logits of `adapter` and that LoRA so
    weighed): what a combination of peft's adapter on the embeddings (which holds EMBEDDING_COPY) with another
    adapter must give, far from the base's."""
    from safetensors.torch import load_file

    assert EMBEDDING_COPY in load_file(adapter / "adapter_model.safetensors")
    lora = make_adapter(base, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), 2, out)
    weights = (0.6, -0.4)
    expected = _logits(_dense_expectation(base, _add(_merged_deltas(base, str(adapter), weights[0]),
                                                      _merged_deltas(base, lora, weights[1]))))
    assert _diff(expected, _logits(_load(base))) > 1e-2
    return lora, weights, expected


def test_a_peft_dora_adapter_on_the_embeddings_combines_through_its_full_update(tiny_llama, tmp_path):
    """peft saves an adapted embedding's weight beside its factors (`embed_tokens.base_layer.weight`). A DoRA
    adapter's full update read that copy as a saved module the base lacks, so `--method svd` and `--into-base` refused
    it ("has no counterpart in the base model"). A copy equal to the base's weight is the base; one that differs (the
    adapter was saved on other embeddings) is refused, naming it."""
    from safetensors.torch import load_file, save_file

    dora = _peft_dora_on_the_embeddings(tiny_llama, tmp_path / "dora")
    lora, weights, expected = _beside_a_lora(tiny_llama, dora, tmp_path / "lora")
    out = combine_adapters([str(dora), lora], Combination("svd", weights, svd_rank=32), str(tmp_path / "svd"))
    assert _diff(_logits(PeftModel.from_pretrained(_load(tiny_llama), out)), expected) <= TOL
    merged = combine_adapters([str(dora), lora], Combination("cat", weights), str(tmp_path / "cat"), into_base=True)
    assert _diff(_logits(_load(merged)), expected) <= TOL
    state = load_file(dora / "adapter_model.safetensors")
    state[EMBEDDING_COPY] = state[EMBEDDING_COPY] + 0.1
    save_file(state, dora / "adapter_model.safetensors")
    with pytest.raises(PeftkitError, match=r"copy of 'model.embed_tokens'.*differs from the base's"):
        combine_adapters([str(dora), lora], Combination("svd", weights, svd_rank=32), str(tmp_path / "other"))


def test_a_peft_lora_whose_embedding_copy_differs_from_the_base_is_refused(tiny_llama, tmp_path, monkeypatch):
    """A plain LoRA combines through its factors, so the copy of the embeddings' weight peft saves beside them
    (`embed_tokens.base_layer.weight`) was never read: one that differs from the base's (the adapter was saved on
    other embeddings, and its update is to those) combined silently into an adapter for another base. It is compared
    with the base's weight, read alone from its safetensors (the base is not loaded for a combined adapter): an
    equal copy combines, a differing one is refused, naming the adapter and the tensor."""
    import peftkit.combine_adapters
    from safetensors.torch import load_file, save_file

    lora = _peft_dora_on_the_embeddings(tiny_llama, tmp_path / "peft_lora", use_dora=False)
    other, weights, expected = _beside_a_lora(tiny_llama, lora, tmp_path / "o")
    load_base = peftkit.combine_adapters._load_base
    monkeypatch.setattr(peftkit.combine_adapters, "_load_base", lambda *a: pytest.fail("the base was loaded"))
    out = combine_adapters([str(lora), other], Combination("cat", weights), str(tmp_path / "cat"))
    assert _diff(_logits(PeftModel.from_pretrained(_load(tiny_llama), out)), expected) <= TOL
    state = load_file(lora / "adapter_model.safetensors")
    state[EMBEDDING_COPY] = state[EMBEDDING_COPY] + 0.1
    save_file(state, lora / "adapter_model.safetensors")
    refused = rf"{lora} saves a copy of 'model.embed_tokens''s weight \({EMBEDDING_COPY}, .*differs from the base's"
    for method in ("cat", "svd"):
        with pytest.raises(PeftkitError, match=refused):
            combine_adapters([str(lora), other], Combination(method, weights), str(tmp_path / method / "other"))
    monkeypatch.setattr(peftkit.combine_adapters, "_load_base", load_base)
    with pytest.raises(PeftkitError, match=refused):  # the loaded base's weight, where --into-base loads it
        combine_adapters([str(lora), other], Combination("cat", weights), str(tmp_path / "merged"), into_base=True)


def _scale_magnitudes(adapter: Path, factor: float) -> None:
    from safetensors.torch import load_file, save_file

    file = adapter / "adapter_model.safetensors"
    state = load_file(file)
    save_file({k: v * factor if k.endswith("lora_magnitude_vector") else v for k, v in state.items()}, file)


def test_ia3_combines_through_its_full_update(tiny_llama, tmp_path):
    """Another method (IA3) with a LoRA: each adapter's full per-layer update, SVD of rank 32 (exact here)."""
    lora = make_adapter(tiny_llama, LoraConfig(r=4, alpha=8, target_modules=["k_proj", "down_proj"]), 1, tmp_path / "lora")
    ia3 = make_adapter(tiny_llama, IA3Config(method="ia3"), 2, tmp_path / "ia3")  # k, v, down on Llama
    weights = (0.5, -0.5)
    expected = _logits(_dense_expectation(tiny_llama, _add(_merged_deltas(tiny_llama, lora, weights[0]),
                                                            _merged_deltas(tiny_llama, ia3, weights[1]))))
    out = combine_adapters([lora, ia3], Combination("svd", weights, svd_rank=32), str(tmp_path / "combined"))
    assert _diff(_logits(PeftModel.from_pretrained(_load(tiny_llama), out)), expected) <= TOL
    assert _diff(expected, _logits(_load(tiny_llama))) > 1e-2
    # Into the base, the factor types combine the full updates too: linear and cat are then the exact sum.
    for method in ("linear", "cat"):
        merged = combine_adapters([lora, ia3], Combination(method, weights), str(tmp_path / method), into_base=True)
        assert _diff(_logits(_load(merged)), expected) <= TOL
    with pytest.raises(PeftkitError, match="combines LoRA factors"):  # not as an adapter: it has no factors
        combine_adapters([lora, ia3], Combination("linear", weights), str(tmp_path / "adapter"))
    pruned = combine_adapters([lora, ia3], Combination("ties", weights, density=0.5), str(tmp_path / "ties"),
                              into_base=True)
    assert 1e-3 < _diff(_logits(_load(pruned)), expected) and torch.isfinite(_logits(_load(pruned))).all()


def test_into_base_refuses_a_float16_output_its_weights_overflow(llama_adapters, tmp_path):
    """`--into-base --dtype float16` of weights past float16's 65504 wrote them as inf without a word (the combined
    update was checked finite in fp32, before the cast); as the single-adapter merge, it is an error naming the layer,
    and nothing is written. bfloat16 holds them."""
    import shutil

    from safetensors.torch import load_file, save_file

    big = tmp_path / "big"
    shutil.copytree(llama_adapters[0], big)
    state = load_file(big / "adapter_model.safetensors")
    save_file({k: v * 2e6 if k.endswith("lora_B.weight") else v for k, v in state.items()},
              big / "adapter_model.safetensors")
    dirs = [str(big), llama_adapters[1]]
    with pytest.raises(PeftkitError, match=r"Merging 'model\.layers\.0\.self_attn\.q_proj' gives weights beyond what "
                                           r"float16 holds .*--dtype"):
        combine_adapters(dirs, Combination("cat", (1.0, 0.5)), str(tmp_path / "fp16"), into_base=True, dtype="float16")
    assert not (tmp_path / "fp16").exists()
    merged = combine_adapters(dirs, Combination("cat", (1.0, 0.5)), str(tmp_path / "bf16"), into_base=True,
                              dtype="bfloat16")
    weights = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16).state_dict().values()
    assert all(torch.isfinite(w).all() for w in weights) and max(float(w.abs().max()) for w in weights) > 65504


def test_subtracting_an_adapter_from_itself_gives_the_base(llama_adapters, tiny_llama, tmp_path):
    a = llama_adapters[0]
    out = combine_adapters([a, a], Combination("cat", (1.0, -1.0)), str(tmp_path / "zero"), into_base=True)
    assert _diff(_logits(_load(out)), _logits(_load(tiny_llama))) <= 1e-5


def test_into_base_of_a_4bit_base_adds_to_the_dequantized_weights(tmp_path):
    """QLoRA adapters are combined into the NF4 weights they were trained against, dequantized, not into the
    original fp32 weights (the classic QLoRA merge bug)."""
    import bitsandbytes.functional as bnbF
    from safetensors.torch import load_file

    from peftkit.adapters import adapter_layers
    from peftkit.modeling import load_model
    from peftkit.recipe import ModelConfig, QuantizationConfig
    from peftkit.tiny import build_tiny_model

    base = tmp_path / "qllama"  # hidden 64: bitsandbytes' CPU kernel wants 32-row multiples (k_proj: 32 rows)
    build_tiny_model(base, arch="llama", hidden_size=64, num_layers=2, seed=0)
    quant = QuantizationConfig(method="nf4", double_quant=True, compute_dtype="float32")
    cfg = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"])
    dirs, dequantized, deltas = [], {}, {}
    for seed, weight in ((1, 0.5), (2, -0.5)):
        model = load_model(ModelConfig(name_or_path=str(base), dtype="float32"), quant, torch.device("cpu"))
        torch.manual_seed(seed)
        targets = inject_adapters(model, cfg)
        random_adapters(model, seed=seed + 100, std=0.1)
        for name, layer in adapter_layers(model).items():
            w = layer.base_layer.weight
            dequantized[name] = bnbF.dequantize_4bit(w.data, w.quant_state).float()
            deltas[name] = deltas.get(name, 0) + weight * layer.delta_weight()
        config = peft_config(cfg, targets, str(base), False)
        save_adapter(tmp_path / f"a{seed}", adapter_state_dict(model, []), config, quant, "cpu")
        dirs.append(str(tmp_path / f"a{seed}"))
    out = combine_adapters(dirs, Combination("cat", (0.5, -0.5)), str(tmp_path / "merged"), into_base=True)
    state, original = load_file(out / "model.safetensors"), _load(base).state_dict()
    for name, delta in deltas.items():
        assert _diff(state[f"{name}.weight"], dequantized[name] + delta) <= 1e-6, name
        assert _diff(state[f"{name}.weight"], original[f"{name}.weight"] + delta) > 1e-3, name


# ------------------------------------------------------------------------------------ CLI and user errors


def test_cli_combines_and_merges(llama_adapters, tiny_llama, tmp_path, monkeypatch, capsys):
    import sys

    from peftkit.cli import main

    a, b = llama_adapters
    out = tmp_path / "cli-combined"
    monkeypatch.setattr(sys, "argv", ["peftkit", "merge", "--adapter", a, "--adapter", b, "--weights=1,-0.5",
                                      "--method", "cat", "--output", str(out)])
    main()
    assert "Combined adapter (cat) written to" in capsys.readouterr().out
    reference, _ = peft_combination(tiny_llama, llama_adapters, [1.0, -0.5], "cat")
    assert _diff(_logits(PeftModel.from_pretrained(_load(tiny_llama), out)), _logits(reference)) <= TOL
    monkeypatch.setattr(sys, "argv", ["peftkit", "merge", "--adapter", a, "--adapter", b, "--weights", "0.5,0.5",
                                      "--method", "dare_linear", "--density", "0.5", "--seed", "1", "--into-base",
                                      "--output", str(tmp_path / "cli-merged")])
    main()
    assert "Merged model written to" in capsys.readouterr().out
    # The flags reach the combination: the API's merge with the same seed, density and weights, not with seed 0.
    merged = _logits(_load(tmp_path / "cli-merged"))
    for seed, same in ((1, True), (0, False)):
        api = combine_adapters([a, b], Combination("dare_linear", (0.5, 0.5), density=0.5, seed=seed),
                               str(tmp_path / f"api-merged-{seed}"), into_base=True)
        assert (_diff(merged, _logits(_load(api))) <= 1e-6) == same, seed


@pytest.mark.parametrize(("extra", "message"), [
    (["--weights", "0.5", "--method", "linear"], "--weights gives 1 weight for 2 --adapters"),
    (["--weights", "0.5,0.5", "--method", "lineer"], "Did you mean 'linear'?"),
    (["--weights", "0.5,0.5", "--method", "ties", "--density", "1.5"], "--density 1.5: the fraction of values kept must be in (0, 1]"),
    (["--weights", "0.5,0.5", "--method", "ties", "--density", "0"], "must be in (0, 1]"),
    (["--weights", "0.5,0.5", "--method", "ties"], "give the fraction to keep, e.g. --density 0.5"),
    (["--weights", "0.5,x", "--method", "cat"], "give numbers separated by commas"),
    (["--method", "cat"], "Combining adapters needs --weights: --weights one per adapter (e.g. 0.5,0.5)"),
    # were: a traceback (torch's generator, built for every method); a written adapter full of inf; r=20000 of zeros
    (["--weights", "0.5,0.5", "--method", "cat", "--seed", "99999999999999999999999"],
     "--seed 99999999999999999999999: use an integer from 0 to 2**64 - 1."),
    (["--weights", "1e39,1", "--method", "cat"], "--weights: 1e+39 is beyond float32's range"),
    (["--weights", "3e38,1", "--method", "cat"], "The combined adapter has NaN/inf values; nothing was written."),
    # were: accepted and ignored, where --density with linear was refused
    (["--weights", "0.5,0.5", "--method", "linear", "--majority-sign", "frequency"],
     "--majority-sign is for the TIES methods (ties, ties_svd, dare_ties, dare_ties_svd); --method linear elects no "
     "sign. Remove --majority-sign."),
    (["--weights", "0.5,0.5", "--method", "linear", "--seed", "7"],
     "--seed is for the DARE methods (dare_linear, dare_ties, dare_linear_svd, dare_ties_svd), which prune at "
     "random; --method linear draws nothing. Remove --seed."),
    (["--weights", "0.5,0.5", "--method", "svd", "--svd-rank", "20000"],
     "--svd-rank 20000: no adapted layer holds more than rank 32 (the smaller side of its weight)"),
])
def test_cli_refuses_bad_combinations(extra, message, llama_adapters, tmp_path, monkeypatch, capsys):
    a, b = llama_adapters
    err = cli_user_error(monkeypatch, capsys, "merge", "--adapter", a, "--adapter", b, "--output",
                         str(tmp_path / "out"), *extra)
    assert message in " ".join(err.split())
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage, said", [
    (lambda t: (t * 100).to(torch.int32), ("is int32, where adapter weights are floating-point: cast, it would give "
                                           "other numbers than were saved")),  # (it was merged, cast, without a word)
    (lambda t: torch.tensor(1.0), "has shape (), with no dimension 0 (its rank): the file is damaged"),  # (IndexError)
])
def test_cli_refuses_a_damaged_adapter_tensor(damage, said, llama_adapters, tmp_path, monkeypatch, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    a, b = llama_adapters
    broken = Path(shutil.copytree(b, tmp_path / "b"))
    weights = broken / "adapter_model.safetensors"
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    save_file(load_file(weights) | {key: damage(load_file(weights)[key])}, weights)
    err = " ".join(cli_user_error(monkeypatch, capsys, "merge", "--adapter", a, "--adapter", str(broken), "--weights",
                                  "0.5,0.5", "--method", "cat", "--output", str(tmp_path / "out")).split())
    assert f"error: {weights}: {key} {said}" in err
    assert not (tmp_path / "out").exists()


def _cat_with_edited_config(adapters, tmp_path, monkeypatch, capsys, edit) -> tuple[Path, str]:
    """(the second adapter's copy with `edit` applied to its adapter_config.json, the error of `merge --method cat`
    of the first and that copy, on one line)."""
    import shutil

    broken = Path(shutil.copytree(adapters[1], tmp_path / "b"))
    config = edit(json.loads((broken / "adapter_config.json").read_text()))
    (broken / "adapter_config.json").write_text(json.dumps(config))
    err = cli_user_error(monkeypatch, capsys, "merge", "--adapter", adapters[0], "--adapter", str(broken), "--weights",
                         "0.5,0.5", "--method", "cat", "--output", str(tmp_path / "out"))
    return broken, " ".join(err.split())


def test_cli_refuses_an_adapter_whose_config_gives_another_rank_than_its_weights(llama_adapters, tmp_path, monkeypatch,
                                                                                capsys):
    """adapter_config.json's r: 8 beside rank-4 weights (another run's config): loaded alone it is refused, as in peft;
    `--method cat` combined it, its update scaled by alpha / 8, without a word."""
    broken, err = _cat_with_edited_config(llama_adapters, tmp_path, monkeypatch, capsys, lambda config: config | {"r": 8})
    assert (f"error: {broken}: its adapter_config.json says r: 8, and base_model.model.model.embed_tokens."
            "lora_embedding_A has rank 4: the two files come from different runs.") in err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_an_adapter_whose_weights_adapt_modules_its_config_does_not_target(llama_adapters, tmp_path,
                                                                                      monkeypatch, capsys):
    """k_proj's LoRA under a target_modules without k_proj: loaded alone it is refused (peft drops those weights);
    combining merged them without a word."""
    broken, err = _cat_with_edited_config(llama_adapters, tmp_path, monkeypatch, capsys, lambda config: config | {
        "target_modules": [t for t in config["target_modules"] if not t.endswith("k_proj")]})
    assert (f"error: {broken}: its weights adapt 2 modules that its adapter_config.json's target_modules do not name "
            "(e.g. 'model.layers.0.self_attn.k_proj'): the config says less than the weights") in err
    assert not (tmp_path / "out").exists()


def test_one_adapter_with_weights_but_no_method_says_what_is_missing(llama_adapters, tmp_path, monkeypatch, capsys):
    """It said "Combining 1 adapters needs --weights ..." to a command that gave --weights."""
    err = cli_user_error(monkeypatch, capsys, "merge", "--adapter", llama_adapters[0], "--output",
                         str(tmp_path / "out"), "--weights", "1")
    assert "Combining adapters needs --method: " in " ".join(err.split())
    assert "drop --weights and --method to merge the one adapter into its base" in " ".join(err.split())


@pytest.mark.parametrize("flag", [["--into-base"], ["--density", "0.5"], ["--svd-rank", "3"], ["--svd-clamp", "0.9"],
                                  ["--majority-sign", "frequency"], ["--seed", "3"]])
def test_one_adapter_with_a_combining_flag_is_refused(flag, llama_adapters, tmp_path, monkeypatch, capsys):
    """A single-adapter merge ignored the combining flags (`--into-base`, `--density 0.5` ...) and exited 0."""
    err = cli_user_error(monkeypatch, capsys, "merge", "--adapter", llama_adapters[0], "--output",
                         str(tmp_path / "out"), *flag)
    assert " ".join(err.split()) == (f"error: {flag[0]} is for combining several adapters (--adapter repeated, with "
                                     f"--weights and --method); one --adapter is merged into its base as it is. "
                                     f"Remove {flag[0]}.")
    assert not (tmp_path / "out").exists()


def test_refuses_unequal_ranks_different_targets_and_bases(tiny_llama, tiny_gpt2, llama_adapters, tmp_path,
                                                           monkeypatch, capsys):
    r8 = make_adapter(tiny_llama, LoraConfig(r=8, alpha=8, target_modules=LLAMA_TARGETS), 3, tmp_path / "r8")
    qv = make_adapter(tiny_llama, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), 4, tmp_path / "qv")
    gpt2 = make_adapter(tiny_gpt2, LoraConfig(r=4, alpha=8), 5, tmp_path / "gpt2")
    ia3 = make_adapter(tiny_llama, IA3Config(method="ia3"), 6, tmp_path / "ia3")
    bottleneck = make_adapter(tiny_llama, BottleneckConfig(method="bottleneck"), 7, tmp_path / "bottleneck")
    a = llama_adapters[0]
    for other, method, message in [
        (bottleneck, "linear", "Bottleneck adapters (method: bottleneck) add computation of their own"),
        (r8, "linear", "needs adapters of equal rank, and these have r=4"),
        (qv, "linear", "needs adapters on the same modules"),
        (gpt2, "svd", "The adapters were trained on different bases"),
        (ia3, "linear", "combines LoRA factors (A and B)"),
    ]:
        err = cli_user_error(monkeypatch, capsys, "merge", "--adapter", a, "--adapter", other, "--weights", "0.5,0.5",
                             "--method", method, "--output", str(tmp_path / "out"))
        assert message in " ".join(err.split()), err
    # An adapter of another base recorded as this one: an IA3 (no factors to check up front) names its directory.
    from peftkit.tiny import build_tiny_model

    build_tiny_model(tmp_path / "wide", arch="llama", hidden_size=64, num_layers=2, seed=0)
    wide = make_adapter(tmp_path / "wide", IA3Config(method="ia3"), 8, tmp_path / "wide-ia3")
    config = json.loads((Path(wide) / "adapter_config.json").read_text()) | {"base_model_name_or_path": str(tiny_llama)}
    (Path(wide) / "adapter_config.json").write_text(json.dumps(config))
    err = cli_user_error(monkeypatch, capsys, "merge", "--adapter", a, "--adapter", wide, "--weights", "0.5,0.5",
                         "--method", "svd", "--output", str(tmp_path / "out"))
    assert f"{wide}: The adapter does not fit this model" in " ".join(err.split()), err
    # Different modules and ranks are what cat and svd are for.
    combine_adapters([a, r8], Combination("cat", (0.5, 0.5)), str(tmp_path / "cat"))
    combine_adapters([a, qv], Combination("svd", (0.5, 0.5)), str(tmp_path / "svd"))
    assert json.loads((tmp_path / "cat" / "adapter_config.json").read_text())["r"] == 12


def test_refuses_adapters_trained_with_other_rope_scaling(llama_adapters, tmp_path, monkeypatch, capsys):
    """One adapter trained on the base RoPE-scaled (its peftkit.json): combined without a word before, the result
    recording the first input's scaling, so the order of --adapter decided the base every command loads."""
    import shutil

    scaled = tmp_path / "scaled"
    shutil.copytree(llama_adapters[1], scaled)
    meta = json.loads((scaled / "peftkit.json").read_text()) | {"rope_scaling": {"type": "linear", "factor": 2.0}}
    (scaled / "peftkit.json").write_text(json.dumps(meta))
    err = cli_user_error(monkeypatch, capsys, "merge", "--adapter", llama_adapters[0], "--adapter", str(scaled),
                         "--weights", "0.5,0.5", "--method", "cat", "--output", str(tmp_path / "out"))
    assert (f"{llama_adapters[0]} was trained with RoPE scaling none, {scaled} with linear x2.0 (their peftkit.json): "
            "their updates were trained against a base scaled two ways") in " ".join(err.split()), err
    assert not (tmp_path / "out").exists()


def test_refuses_adapters_of_a_4bit_base_quantized_from_other_dtypes(llama_adapters, tmp_path, monkeypatch, capsys):
    """Two adapters of one NF4 base, one quantized from bf16 weights, one from fp32 (peftkit.json base_dtype): other
    4-bit codes, combined before on the first's without a word. Refused before any base loads."""
    import shutil

    from peftkit.recipe import QuantizationConfig

    dirs = []
    for i, (adapter, dtype) in enumerate(zip(llama_adapters, ["bfloat16", None], strict=True)):
        shutil.copytree(adapter, tmp_path / f"q{i}")
        meta = json.loads((tmp_path / f"q{i}" / "peftkit.json").read_text())
        meta |= {"quantization": QuantizationConfig().model_dump(), "quantized_on": "cpu", "base_dtype": dtype}
        (tmp_path / f"q{i}" / "peftkit.json").write_text(json.dumps(meta))
        dirs.append(str(tmp_path / f"q{i}"))
    err = cli_user_error(monkeypatch, capsys, "merge", "--adapter", dirs[0], "--adapter", dirs[1], "--weights",
                         "0.5,0.5", "--method", "cat", "--output", str(tmp_path / "out"))
    assert (f"{dirs[0]} was trained against a base quantized from bfloat16, {dirs[1]} from float32 (their peftkit.json "
            "base_dtype)") in " ".join(err.split()), err


@pytest.mark.parametrize("kind", ["magnitude_prune", "ties"])
def test_a_density_that_keeps_no_value_of_a_tensor_is_said(kind):
    """int(density x numel) = 0 gave a zero tensor without a word (as in peft)."""
    tensors = [torch.randn(2, 3, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with pytest.warns(PeftkitWarning, match=r"--density 0.1 keeps no value of a tensor of 6 \(\(2, 3\): int\(0.1 x 6\) "
                                            r"= 0\), so its part of the combined adapter is zero; raise --density to at "
                                            r"least 0.167"):
        assert not combine_tensors(kind, tensors, [1.0, 1.0], density=0.1).any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert combine_tensors(kind, tensors, [1.0, 1.0], density=0.2).count_nonzero() > 0


def test_the_density_the_warning_gives_keeps_a_value():
    """The warning rounded 1 / numel to nearest: for a LoRA A of 8 x 4096 it said 3.05e-05, which keeps none either."""
    tensor = torch.randn(8, 4096, generator=torch.Generator().manual_seed(0))
    with pytest.warns(PeftkitWarning, match=r"raise --density to at least 3\.06e-05\.") as caught:
        combine_tensors("magnitude_prune", [tensor], [1.0], density=1e-5)
    advised = float(str(caught[0].message).rsplit(" ", 1)[-1].rstrip("."))
    assert combine_tensors("magnitude_prune", [tensor], [1.0], density=advised).count_nonzero() == 1


def test_warns_of_adapters_of_a_4bit_base_quantized_on_other_devices(llama_adapters, tmp_path):
    """One NF4 base quantized on CUDA for one adapter, on the CPU for the other (peftkit.json quantized_on): a few
    other 4-bit codes, combined on the first's device without a word."""
    import shutil

    from peftkit.combine_inputs import check_same_base
    from peftkit.recipe import QuantizationConfig

    dirs = []
    for i, (adapter, where) in enumerate(zip(llama_adapters, ["cuda", "cpu"], strict=True)):
        shutil.copytree(adapter, tmp_path / f"q{i}")
        meta = json.loads((tmp_path / f"q{i}" / "peftkit.json").read_text())
        meta |= {"quantization": QuantizationConfig().model_dump(), "quantized_on": where}
        (tmp_path / f"q{i}" / "peftkit.json").write_text(json.dumps(meta))
        dirs.append(str(tmp_path / f"q{i}"))
    with pytest.warns(PeftkitWarning, match=rf"{dirs[0]} was trained against a base quantized on cuda, {dirs[1]} on "
                                            r"cpu \(their peftkit.json quantized_on\)"):
        check_same_base(read_sources(dirs, False), None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_same_base(read_sources(dirs[:1] * 2, False), None)
    # A base saved quantized (merge --requantize's OUTPUT-nf4) loads its saved 4-bit codes on either device: no warning.
    saved = tmp_path / "nf4"
    shutil.copytree(read_sources(dirs[:1], False)[0].base, saved)
    config = json.loads((saved / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (saved / "config.json").write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_same_base(read_sources(dirs, False), str(saved))
    # An adapter saved before peftkit recorded the device (quantized_on null): unknown, not another device.
    meta = json.loads((Path(dirs[1]) / "peftkit.json").read_text()) | {"quantized_on": None}
    (Path(dirs[1]) / "peftkit.json").write_text(json.dumps(meta))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_same_base(read_sources(dirs, False), None)


def test_refuses_an_update_of_biases(tmp_path):
    """IA3 on Qwen2's biased q and v scales their biases too: a combined LoRA cannot carry that."""
    from peftkit.tiny import build_tiny_model

    base = tmp_path / "qwen2"
    model, tok = build_tiny_model(arch="qwen2", hidden_size=32, num_layers=2, seed=0)
    with torch.no_grad():  # transformers starts biases at zero, which any scaling leaves alone
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    model.save_pretrained(base)
    tok.save_pretrained(base)
    ia3 = make_adapter(base, IA3Config(method="ia3"), 1, tmp_path / "ia3")
    with pytest.raises(PeftkitError, match="also changes the bias of 'model.layers.0.self_attn.q_proj'"):
        combine_adapters([ia3, ia3], Combination("svd", (0.5, 0.5), svd_rank=8), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_requantized_merge_says_where_it_wrote_both_models(llama_adapters, tmp_path, monkeypatch, capsys):
    """`merge --requantize nf4 --output mq` printed only "Merged model written to mq", not the mq-nf4 it wrote too."""
    import sys

    import peftkit.merge
    from peftkit.cli import main

    monkeypatch.setattr(peftkit.merge, "merge_adapter", lambda adapter, output, *args: Path(output))
    monkeypatch.setattr(sys, "argv", ["peftkit", "merge", "--adapter", llama_adapters[0], "--output",
                                      str(tmp_path / "mq"), "--requantize", "nf4"])
    main()
    printed = capsys.readouterr()
    assert printed.out.splitlines() == [f"Merged model written to {tmp_path / 'mq'}",
                                        f"Re-quantized (nf4) model written to {tmp_path / 'mq-nf4'}"]
    assert "rounds away an update smaller than half a 4-bit step" in " ".join(printed.err.split())


def test_nf4_rounds_a_qlora_sized_update_away():
    """What that warning says (it said the outputs 'differ slightly'): NF4 of W0 + dW, W0 = dequant(NF4(W)) and dW a
    hundredth of W's spread (a short QLoRA run's size), gives W0's codes back (all of them here)."""
    import bitsandbytes.functional as F

    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 256, generator=g)
    codes, state = F.quantize_4bit(w, quant_type="nf4")
    w0 = F.dequantize_4bit(codes, state)
    again, _ = F.quantize_4bit(w0 + 0.01 * torch.randn(256, 256, generator=g), quant_type="nf4")
    assert (again == codes).float().mean() > 0.99


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_refuses_an_adapter_that_trains_the_base_biases(bias, tmp_path, monkeypatch, capsys):
    """peft's `bias: all` / `lora_only` saves Qwen2's trained q/k biases in the adapter: combining read lora_A/lora_B
    alone and wrote an adapter (and with --into-base a model) without them, silently far from the inputs."""
    from peft import LoraConfig as PeftLoraConfig

    from peftkit.tiny import build_tiny_model
    from tests.conftest import peft_lora

    base = tmp_path / "qwen2"
    build_tiny_model(base, arch="qwen2", hidden_size=32, num_layers=2, seed=0)
    model = peft_lora(base, PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"], bias=bias), seed=1)
    with torch.no_grad():  # trained biases, as a run with bias: all would leave them
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.add_(0.5)
    model.save_pretrained(tmp_path / "biased")
    plain = make_adapter(base, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj"]), 2, tmp_path / "plain")
    for into_base in ([], ["--into-base"]):
        err = cli_user_error(monkeypatch, capsys, "merge", "--adapter", plain, "--adapter", str(tmp_path / "biased"),
                             "--weights", "0.5,0.5", "--method", "cat", *into_base, "--output", str(tmp_path / "out"))
        assert f"also trains the base's biases (bias: {bias} in adapter_config.json" in " ".join(err.split()), err
        assert "model.layers.0.self_attn.k_proj" in err
        assert not (tmp_path / "out").exists()


def test_overwrite_never_deletes_a_directory_of_the_users_own_files(llama_adapters, tmp_path, monkeypatch, capsys):
    """`--output ~/work --overwrite` replaced a folder of the user's files by the combined adapter, deleting them (and
    the refusal without --overwrite advised just that)."""
    work = tmp_path / "work"
    (work / "thesis").mkdir(parents=True)
    (work / "thesis" / "ch1.tex").write_text("years of work")
    for overwrite in ([], ["--overwrite"]):
        err = cli_user_error(monkeypatch, capsys, "merge", "--adapter", llama_adapters[0], "--adapter",
                             llama_adapters[1], "--weights", "0.5,0.5", "--method", "cat", "--output", str(work),
                             *overwrite)
        assert f"--output {work} is a directory that is not empty (thesis), not a model or adapter a merge wrote" in (
            " ".join(err.split())), err
        assert (work / "thesis" / "ch1.tex").read_text() == "years of work"
    combine_adapters(llama_adapters, Combination("cat", (0.5, 0.5)), str(tmp_path / "combined"))
    combine_adapters(llama_adapters, Combination("cat", (1.0, 0.5)), str(tmp_path / "combined"), overwrite=True)
    assert json.loads((tmp_path / "combined" / "adapter_config.json").read_text())["r"] == 8  # an adapter: replaced


def test_into_base_keeps_what_the_base_holds_as_infinite(tiny_llama, tmp_path):
    """An infinity the base holds itself (a -inf mask or +-inf clamp bound in a persistent buffer, which no adapter
    touches) was refused as "The combined update has NaN/inf values": every merged tensor was checked finite, the
    base's included. It is written as it is, in float16 as in float32, as `peftkit merge` of one adapter writes it;
    the combined layers equal base + 1.0 update_0 + 0.5 update_1 (each adapter's own merge less the base)."""
    from safetensors.torch import load_file

    from peftkit.merge import merge_adapter

    base, key = base_with_infinities(tiny_llama, tmp_path / "base"), INFINITE_KEY
    weights = load_file(base / "model.safetensors")
    dirs = [make_adapter(base, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), seed, tmp_path / f"a{seed}")
            for seed in (1, 2)]
    alone = [load_file(Path(merge_adapter(d, str(tmp_path / f"alone{i}"), dtype="float32")) / "model.safetensors")
             for i, d in enumerate(dirs)]
    q = "model.layers.0.self_attn.q_proj.weight"
    for dtype in ("float32", "float16"):
        out = combine_adapters(dirs, Combination("cat", (1.0, 0.5)), str(tmp_path / dtype), into_base=True, dtype=dtype)
        state = load_file(Path(out) / "model.safetensors")
        assert state[key][0, 0].item() == -float("inf") and state[key][0, 1].item() == float("inf")
        assert torch.equal(state[key], weights[key].to(state[key].dtype))
        expected = weights[q] + 1.0 * (alone[0][q] - weights[q]) + 0.5 * (alone[1][q] - weights[q])
        assert (state[q].float() - expected).abs().max() <= (1e-5 if dtype == "float32" else 2e-3)


def test_full_updates_into_the_base_are_each_update_plus_its_weight_bit_for_bit():
    """`added_to_base` sums each update into its own tensor (no second fp32 copy of the adapted layers): the sums are
    W.float() + update bit for bit, for a bf16 base as for an fp32 one, and the updates are let go as they are added."""
    from peftkit.combine_adapters import added_to_base

    gen = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(64, 48, generator=gen).bfloat16(), "b.weight": torch.randn(32, 64, generator=gen),
            "b.bias": torch.randn(32, generator=gen)}
    updates = {"a": torch.randn(64, 48, generator=gen) * 1e-3, "b": torch.randn(32, 64, generator=gen)}
    expected = {f"{m}.weight": base[f"{m}.weight"].float() + d for m, d in updates.items()}
    merged = added_to_base(base, updates)
    assert updates == {} and merged["b.bias"] is base["b.bias"] and merged.keys() == base.keys()
    for key, value in expected.items():
        assert value.dtype == merged[key].dtype == torch.float32 and torch.equal(merged[key], value)


def test_combined_full_updates_are_the_weighted_sum_of_each_adapter_s_update(tiny_llama, tmp_path):
    """`combined_updates` (a LoRA's update made from its factors as its layer is combined): linear's update is
    w1 * s B A of the LoRA plus w2 * the IA3's full update, layer by layer, against a dense computation."""
    from peftkit.combine_adapters import combined_updates, full_deltas
    from peftkit.merge_weights import base_state_dict

    cfg = LoraConfig(r=4, alpha=8, target_modules=["k_proj", "down_proj"])
    lora = make_adapter(tiny_llama, cfg, 1, tmp_path / "lora")
    ia3 = make_adapter(tiny_llama, IA3Config(method="ia3"), 2, tmp_path / "ia3")
    sources, model = read_sources([lora, ia3], False), _load(tiny_llama)
    base = base_state_dict(model)
    got = combined_updates(Combination("linear", (0.5, -0.25)), sources, model, base)
    factors = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]: v for k, v in sources[0].state.items()}
    ia3_updates = full_deltas(sources[1], base, conv1d_modules(model))
    assert got.keys() == ia3_updates.keys() | factors.keys() and len(got) > 2
    for m, update in got.items():
        expected = torch.zeros_like(update)
        if m in ia3_updates:
            expected -= 0.25 * ia3_updates[m]
        a = sources[0].state.get(f"base_model.model.{m}.lora_A.weight")
        if a is not None:
            expected += 0.5 * (8 / 4) * (sources[0].state[f"base_model.model.{m}.lora_B.weight"].float() @ a.float())
        torch.testing.assert_close(update, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_into_base_in_a_narrower_dtype_is_the_float32_merge_cast_once(llama_adapters, tmp_path, dtype):
    """A LoRA combination merged into the base in bf16 or fp16 (each layer cast to it as it is merged, not the whole
    merged model held in fp32 and cast after) is the float32 merge's weights cast once, bit for bit."""
    from safetensors.torch import load_file

    c = Combination("cat", (0.7, -0.4))
    wide = load_file(combine_adapters(llama_adapters, c, str(tmp_path / "f32"), into_base=True, dtype="float32")
                     / "model.safetensors")
    narrow = load_file(combine_adapters(llama_adapters, c, str(tmp_path / dtype), into_base=True, dtype=dtype)
                       / "model.safetensors")
    assert narrow.keys() == wide.keys()
    for key, tensor in wide.items():
        assert narrow[key].dtype == getattr(torch, dtype) and torch.equal(narrow[key], tensor.to(narrow[key].dtype)), key


def test_the_made_non_finite_check_reads_the_base_only_beside_a_tensor_that_is_not_finite():
    """`_made_non_finite` compares with the base only where the merged tensor holds a NaN or inf: read beside every
    tensor, the check of a 512 MiB float32 state took 4 to 6.7 s where one isfinite pass takes 2. The base's own
    infinities pass, one the combination made is found."""
    from peftkit.combine_adapters import _made_non_finite

    class Unread(dict):
        def __getitem__(self, key):
            raise AssertionError(f"the base's {key} was read")

    finite = {"a.weight": torch.ones(3, 2), "b.weight": torch.arange(4.0)}
    assert not _made_non_finite(finite, Unread(finite))
    base = {"a.weight": torch.tensor([[1.0, -float("inf")], [2.0, 3.0]])}
    assert not _made_non_finite({"a.weight": base["a.weight"] * 2}, base)
    made = base["a.weight"].clone()
    made[1, 0] = float("nan")
    assert _made_non_finite({"a.weight": made}, base)


@pytest.mark.parametrize("method", ["cat", "svd"])
def test_per_module_ranks_and_alphas_combine_as_in_peft(method, tiny_gpt2, tmp_path):
    """peft's adapters with rank_pattern and alpha_pattern (each layer its own rank and scaling): cat and the SVD
    types combine each layer with its own, as peft's add_weighted_adapter does (both exact here: the SVD keeps
    every rank), on GPT-2's Conv1D layers; the types that need one rank and scaling per adapter refuse them. All
    of them were refused, though peft combines them."""
    from peft import LoraConfig as PeftLora

    from tests.conftest import save_peft_lora

    settings = dict(r=4, target_modules=["c_attn", "c_fc", "c_proj"], rank_pattern={"c_proj": 2},
                    alpha_pattern={"c_fc": 16})
    dirs = [str(save_peft_lora(tiny_gpt2, tmp_path / f"p{i}", PeftLora(lora_alpha=4 * i, **settings), seed=i))
            for i in (1, 2)]
    c = Combination(method, (0.7, -0.3), svd_rank=32 if method == "svd" else None)
    reference, _ = peft_combination(tiny_gpt2, dirs, list(c.weights), method, **_peft_options(c))
    out = combine_adapters(dirs, c, str(tmp_path / "combined"))
    theirs = _logits(reference)
    assert _diff(theirs, _logits(_load(tiny_gpt2))) > 1e-2
    assert _diff(_logits(PeftModel.from_pretrained(_load(tiny_gpt2), out)), theirs) <= TOL
    merged = combine_adapters(dirs, c, str(tmp_path / "merged"), into_base=True)
    assert _diff(_logits(_load(merged)), theirs) <= TOL
    with pytest.raises(PeftkitError, match="--method ties combines factors of one rank and scaling per adapter"):
        combine_adapters(dirs, Combination("ties", (0.7, 0.3), density=0.5), str(tmp_path / "ties"))
