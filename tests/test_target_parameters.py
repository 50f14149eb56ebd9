"""LoRA on parameters (`target_parameters`, peftkit.methods.param_lora): the fused expert weights of a mixture of
experts (a tiny Mixtral, as transformers 5 holds it: 3-D `experts.gate_up_proj` and `experts.down_proj`) and a 2-D
parameter outside any Linear (its router's weight). Checked against peft 0.21 both ways (logits, gradients, keys),
against the merged weights (in place, `merged_model` and `peftkit merge`), and the memory estimate against what
autograd keeps. What peft refuses beside it, and what cannot carry it, is refused saying why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig as PeftLora
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from peftkit.adapters import inject_adapters
from peftkit.errors import PeftkitError
from peftkit.methods.lora import LoraConfig
from peftkit.adapter_base import load_adapted_model
from peftkit.tiny import build_tiny_model
from tests.conftest import (check_loads_and_merges_as_peft, cli_user_error, load_fp32, make_recipe,
                            peft_and_our_gradients, save_random_adapter)

IDS = torch.tensor([[3, 4, 5, 9, 7, 8, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47]])
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("moe") / "mixtral"
    build_tiny_model(path, arch="mixtral", hidden_size=32, num_layers=2, seed=0)
    return path


def _peft_adapter(base: Path, out: Path, **settings) -> Path:
    torch.manual_seed(0)
    model = get_peft_model(load_fp32(base), PeftLora(r=2, lora_alpha=8, init_lora_weights=False, **settings))
    model.save_pretrained(out)
    return out


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("settings", [
    {"target_modules": ["q_proj"], "target_parameters": EXPERTS},  # two on one module: nested wrappers
    {"target_modules": [], "target_parameters": ["down_proj"]},  # parameters alone
    {"target_modules": [], "target_parameters": ["mlp.gate.weight"]},  # a 2-D parameter (the router's)
], ids=["experts-and-q", "down-only", "router-2d"])
def test_peft_s_adapter_loads_with_peft_s_logits_and_merges_to_them(settings, mixtral, tmp_path):
    """peft's adapter, far from identity: peftkit's logits are peft's; merged in place (and back), by `merged_model`
    and by `peftkit merge`, the plain model gives them too."""
    adapter = _peft_adapter(mixtral, tmp_path / "peft", **settings)
    check_loads_and_merges_as_peft(mixtral, adapter, IDS, tmp_path / "merged")


def test_peft_loads_our_export_with_its_keys_and_our_logits(mixtral, tmp_path):
    """The nesting is peft's (the module's later parameter outside: `experts.lora_A` is down_proj's, `experts.
    base_layer.lora_A` gate_up_proj's), so the keys are; peft loads the export with peftkit's logits."""
    cfg = LoraConfig(r=2, alpha=8, target_modules=["q_proj"], target_parameters=EXPERTS)
    ours = save_random_adapter(mixtral, cfg, tmp_path / "ours", seed=3)
    peft_keys = set(load_file(_peft_adapter(mixtral, tmp_path / "peft", target_modules=["q_proj"],
                                            target_parameters=EXPERTS) / "adapter_model.safetensors"))
    saved = load_file(ours / "adapter_model.safetensors")
    assert set(saved) == peft_keys
    assert saved["base_model.model.model.layers.0.mlp.experts.lora_A.weight"].shape == (2 * 4, 64)  # down: in 64
    assert saved["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"].shape == (2 * 4, 32)
    assert json.loads((ours / "adapter_config.json").read_text())["target_parameters"] == EXPERTS
    ours_logits = _logits(load_adapted_model(str(mixtral), str(ours), torch.device("cpu"))[0])
    assert (ours_logits - _logits(PeftModel.from_pretrained(load_fp32(mixtral), ours).eval())).abs().max() <= 1e-5


def test_gradients_equal_peft_s(mixtral, tmp_path):
    adapter = _peft_adapter(mixtral, tmp_path / "peft", target_modules=["q_proj"], target_parameters=EXPERTS)
    difference, expected, grads = peft_and_our_gradients(mixtral, adapter, IDS)
    assert difference <= 1e-6 and grads.keys() == expected.keys()
    assert max((grads[n] - expected[n]).abs().max() for n in grads) <= 1e-6
    assert min(g.abs().max() for g in grads.values()) > 0


class _Ops(TorchDispatchMode):
    """The aten operators a block runs (observed, not replaced)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def threads():
    """Set torch's thread count for one test, restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("implementation", ["grouped_mm", "eager", "batched_mm"])
def test_each_experts_implementation_gives_peft_s_step_through_the_factors(implementation, mixtral, tmp_path, threads):
    """transformers 5 runs the experts by `config._experts_implementation`: grouped_mm (its default), eager (a loop
    over the experts, F.linear on each one's slice) or batched_mm (each token's experts' weights gathered). On each, a
    training step's loss and gradients are peft's (which computes with W + s B A made whole). On the first two no
    adapted stack is made (no baddbmm: each expert's update is applied to its routed tokens through the factors,
    `FactoredWeight`); batched_mm's gather is a use the factors do not serve, and gets W + s B A whole, as peft's.
    On CPU's fast path (up to MAX_THREADS threads) each expert call runs as one node, grouped_mm's as
    `lowrank.grouped_lora`, eager's F.linear as LoRA on a Linear layer does (`lowrank.linear_lora`: q_proj's two and
    one an expert a layer); the separate products of more threads are checked on each product below."""
    from peft import PeftModel

    from peftkit.adapter_base import load_adapted_model
    from peftkit.methods.lowrank import MAX_THREADS
    from tests.test_lowrank import _graph_nodes

    threads(MAX_THREADS)
    adapter = _peft_adapter(mixtral, tmp_path / "peft", target_modules=["q_proj"], target_parameters=EXPERTS)
    theirs = PeftModel.from_pretrained(load_fp32(mixtral), adapter, is_trainable=True).train()
    theirs.base_model.model.set_experts_implementation(implementation)
    loss = theirs(input_ids=IDS, labels=IDS).loss
    loss.backward()
    expected = {n.replace("base_model.model.", "").replace(".default", ""): p.grad
                for n, p in theirs.named_parameters() if p.requires_grad}
    ours = load_adapted_model(str(mixtral), str(adapter), torch.device("cpu"))[0].train()
    ours.set_experts_implementation(implementation)
    for p in (p for n, p in ours.named_parameters() if "lora_" in n):
        p.requires_grad_(True)
    with _Ops() as ops:
        our_loss = ours(input_ids=IDS, labels=IDS).loss
    our_loss.backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert abs(float(our_loss - loss)) <= 1e-6 and grads.keys() == expected.keys() and len(grads) == 12
    assert max((grads[n] - expected[n]).abs().max() for n in grads) <= 1e-6
    assert ("baddbmm" in ops.names) == (implementation == "batched_mm")
    assert ("_GroupedLoraBackward" in _graph_nodes(our_loss)) == (implementation == "grouped_mm")
    assert (_fused_nodes(our_loss) > 2) == (implementation == "eager")


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "separate"])
def test_each_product_of_a_factored_weight_is_the_dense_one_s(fused, threads):
    """The products transformers' experts make of their weight, through the factors (`FactoredWeight`), on an
    is_transposed model's (E, in, out) layout and Mixtral's (E, out, in): values and the gradients of x and both
    factors equal those of the same product with W + s lhs @ rhs made whole (<= 1e-6 relative): `x @ W[e]` and
    F.grouped_mm(x, W) (is_transposed), `F.linear(x, W[e])` and F.grouped_mm(x, W.transpose(-2, -1)) (Mixtral), on
    CPU's fast path (one node a call) and off it (separate products)."""
    import torch.nn.functional as F

    from peftkit.methods.factored_weight import FactoredWeight
    from peftkit.methods.lowrank import MAX_THREADS
    from tests.test_lowrank import _graph_nodes

    threads(MAX_THREADS if fused else MAX_THREADS + 1)
    torch.manual_seed(0)
    w, lhs, rhs = torch.randn(3, 12, 20), torch.randn(3, 12, 4), torch.randn(3, 4, 20)  # (E, in, out), E 3, r 4
    offs = torch.tensor([4, 4, 9], dtype=torch.int32)  # (groups of 4, 0 and 5 rows)
    uses = {False: [lambda v, x: x @ v[2], lambda v, x: F.grouped_mm(x, v, offs=offs)],
            True: [lambda v, x: F.linear(x, v[1]), lambda v, x: F.grouped_mm(x, v.transpose(-2, -1), offs=offs)]}
    for mixtral, products in uses.items():
        layout = [t.transpose(-2, -1).contiguous() for t in (w, rhs, lhs)] if mixtral else [w, lhs, rhs]
        for use in products:
            results = []
            for factored in (True, False):
                x, a, b = (t.clone().requires_grad_() for t in (torch.linspace(-2, 2, 9 * 12).reshape(9, 12),
                                                               *layout[1:]))
                out = use(FactoredWeight(layout[0], a, b, 0.5) if factored else layout[0] + 0.5 * a @ b, x)
                (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
                results.append([out, x.grad, a.grad, b.grad])
                nodes = _graph_nodes(out)
                assert len(nodes & {"_FusedLoraBackward", "_GroupedLoraBackward"}) == (factored and fused)
                assert not factored or not nodes & {"AddmmBackward0", "BaddbmmBackward0"}  # (W + s lhs rhs not made)
            for got, want in zip(*results):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * float(want.detach().abs().max()))


def _fused_nodes(tensor: torch.Tensor) -> int:
    """The `_FusedLoraBackward` nodes of `tensor`'s graph, each counted once."""
    seen, todo = set(), [tensor.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo += [next_node for next_node, _ in node.next_functions]
    return sum(type(node).__name__ == "_FusedLoraBackward" for node in seen)


def test_a_run_trains_the_experts_and_exports_what_peft_loads(mixtral, number_data, tmp_path):
    """`peftkit train` with target_parameters: the loss falls, the experts' factors move, and the adapter peft
    loads and the merged export give the trained model's logits."""
    from peftkit.recipe import load_recipe
    from peftkit.train import train

    recipe = make_recipe(tmp_path, mixtral, number_data, training={"max_steps": 8}, export={"merged": True})
    raw = yaml.safe_load(recipe.read_text())
    raw["adapter"] |= {"target_modules": ["q_proj"], "target_parameters": EXPERTS}
    recipe.write_text(yaml.safe_dump(raw))
    cfg = load_recipe(recipe)
    train(cfg)
    run = Path(cfg.export.output_dir)
    state = load_file(run / "adapter" / "adapter_model.safetensors")
    assert state["base_model.model.model.layers.1.mlp.experts.lora_B.weight"].abs().max() > 0
    ours = _logits(load_adapted_model(str(mixtral), str(run / "adapter"), torch.device("cpu"))[0])
    assert (ours - _logits(PeftModel.from_pretrained(load_fp32(mixtral), run / "adapter").eval())).abs().max() <= 1e-5
    assert (ours - _logits(load_fp32(run / "merged"))).abs().max() <= 1e-5
    assert (ours - _logits(load_fp32(mixtral))).abs().max() > 1e-3


def test_the_memory_estimate_bounds_what_autograd_keeps(mixtral, threads):
    """Each wrapper keeps each routed token's input and its r values, and grouped_mm's separate products the factors as
    they take them (r padded to 16 bytes): measured with saved_tensors_hooks, the estimate bounds that within 5 %. The
    one node of CPU's fast path (`lowrank.grouped_lora`) keeps exactly each routed row's input and r values (and the
    groups' ends, which grouped_mm's backward keeps too): less. Not the adapted weight W + s B A, which the old forward
    made whole (and peft's does), and kept until backward: less than the expert stacks' size is kept."""
    from peftkit.methods.lowrank import MAX_THREADS
    from tests.test_memory import saved_and_estimated

    for fused in (False, True):
        threads(MAX_THREADS if fused else MAX_THREADS + 1)
        (saved, estimated), (plain_saved, plain_estimated) = (
            saved_and_estimated(mixtral, LoraConfig(r=2, target_modules=["q_proj"], target_parameters=parameters))
            for parameters in (EXPERTS, None))
        extra, bound = saved - plain_saved, estimated - plain_estimated
        rows = 2 * 16 * 2  # (2 x 16 tokens, 2 experts each) a layer; gate_up_proj's input 32 wide, down_proj's 64
        assert extra == 4 * 2 * rows * ((32 + 2) + (64 + 2)) if fused else 0.95 * bound <= extra <= bound
        stacks = sum(p.numel() for n, p in load_fp32(mixtral).named_parameters() if "experts" in n)
        assert extra <= bound and extra < 4 * stacks


@pytest.mark.parametrize(("adapter", "message"), [
    ({"target_parameters": ["experts.gate_up_projj"]}, "'experts.gate_up_projj' names no parameter of this model. "
                                                      "Did you mean"),
    ({"target_parameters": EXPERTS, "dropout": 0.1}, "adapter.target_parameters with dropout is not supported"),
    ({"target_parameters": EXPERTS, "use_dora": True}, "adapter.target_parameters with use_dora is not supported"),
    ({"target_parameters": []}, "'adapter.target_parameters' = list: is empty"),
    ({"target_modules": []}, "'adapter.target_modules' = list: is an empty list"),
])
def test_recipe_mistakes_are_refused(adapter, message, mixtral, number_data, tmp_path, monkeypatch, capsys):
    recipe = make_recipe(tmp_path, mixtral, number_data)
    raw = yaml.safe_load(recipe.read_text())
    raw["adapter"] |= {"target_modules": ["q_proj"]} | adapter
    recipe.write_text(yaml.safe_dump(raw))
    assert message in cli_user_error(monkeypatch, capsys, "train", str(recipe))


def test_what_cannot_carry_it_refuses_it(mixtral, tmp_path):
    from peftkit.adapters.named import NamedAdapters
    from peftkit.inspect import inspect_adapter
    from peftkit.inspect_text import describe
    from peftkit.peft_format import load_adapter

    adapter = _peft_adapter(mixtral, tmp_path / "peft", target_modules=["q_proj"], target_parameters=EXPERTS)
    with pytest.raises(PeftkitError, match="'moe' adapts parameters \\(target_parameters\\)"):
        NamedAdapters(load_fp32(mixtral)).load("moe", adapter)
    info = inspect_adapter(adapter)
    assert sorted(info["target_parameters"]) == sorted(EXPERTS)  # (peft writes them in a set's order)
    assert info["targets"]["modules"] == {"experts": 4, "q_proj": 2}
    assert set(info["ranks"].values()) == {2}
    # convert_lora_to_gguf.py converts peft's fused-expert LoRA from 2026 (_convert_peft_moe_lora_tensor); older ones
    # stop at it: a caveat naming both (inspect refused it for every version)
    assert info["llama_cpp"]["accepts"] and info["llama_cpp"]["caveats"] == [
        "target_parameters (LoRA on fused expert weights): a convert_lora_to_gguf.py with PEFT MoE LoRA conversion "
        "(_convert_peft_moe_lora_tensor, 2026) converts it for a base whose config gives its expert count; an older "
        "one stops at those tensors with an error (llama.cpp's runtime not verified here)"]
    assert f"on parameters  {', '.join(info['target_parameters'])} (target_parameters)" in "\n".join(describe(info))
    config = json.loads((adapter / "adapter_config.json").read_text())  # another method's file that sets it
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"peft_type": "LOHA"}))
    with pytest.raises(PeftkitError, match="'target_parameters' is .*: LoRA on parameters"):
        load_adapter(adapter)


def test_all_linear_on_fused_experts_says_what_it_leaves_out(mixtral):
    """all-linear adapts Linear layers: on a transformers 5 mixture of experts, not the experts. A recipe is told so,
    with the key that adapts them (peft's all-linear adds them, as transformers 4's took them)."""
    from peftkit.errors import PeftkitWarning

    with pytest.warns(PeftkitWarning, match=r"add adapter.target_parameters: \[experts.down_proj, experts.gate_up_proj\]"):
        inject_adapters(load_fp32(mixtral), LoraConfig(target_modules="all-linear"))


def test_peft_files_load_as_peft_loads_them(mixtral, tmp_path):
    """An entry naming no parameter of this model (a list written for several architectures) passes, as in peft;
    `target_modules: null` with a dot-less entry takes the attention modules from the weights, not the experts' module
    whose wrapper's keys look alike; on a bf16 base the logits are within bf16's rounding of the fp32 computation on
    the same weights, as peft's (not bit for bit: peft rounds W + s B A to bf16, ours rounds x A, its product with B and
    their sum with x W, as a LoRA on a Linear layer does); inspect
    leaves out the ranks a rank_pattern on parameters makes unreadable from the shapes."""
    from peftkit.adapters.state_dicts import load_adapter_state_dict
    from peftkit.inspect import inspect_adapter
    from peftkit.peft_format import load_adapter

    extra = _peft_adapter(mixtral, tmp_path / "extra", target_modules=["q_proj"], rank_pattern={"experts.down_proj": 4},
                          target_parameters=[*EXPERTS, "experts.up_proj"])
    theirs = _logits(PeftModel.from_pretrained(load_fp32(mixtral), extra).eval())
    assert (_logits(load_adapted_model(str(mixtral), str(extra), torch.device("cpu"))[0]) - theirs).abs().max() <= 1e-5
    assert set(inspect_adapter(extra)["ranks"]) == {f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)}

    bare = _peft_adapter(mixtral, tmp_path / "bare", target_modules=["q_proj"], target_parameters=["down_proj"])
    theirs = _logits(PeftModel.from_pretrained(load_fp32(mixtral), bare).eval())
    config = json.loads((bare / "adapter_config.json").read_text())  # (peft reads null as its Mixtral defaults)
    (bare / "adapter_config.json").write_text(json.dumps(config | {"target_modules": None}))
    assert (_logits(load_adapted_model(str(mixtral), str(bare), torch.device("cpu"))[0]) - theirs).abs().max() <= 1e-5

    cfg, state = load_adapter(extra)[:2]
    ours = AutoModelForCausalLM.from_pretrained(mixtral, dtype=torch.bfloat16).eval()
    inject_adapters(ours, cfg, every_entry=False, state=state)
    load_adapter_state_dict(ours, state)
    peft_bf16 = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(mixtral, dtype=torch.bfloat16), extra)
    base_bf16_in_fp32 = AutoModelForCausalLM.from_pretrained(mixtral, dtype=torch.bfloat16).float()
    reference = _logits(PeftModel.from_pretrained(base_bf16_in_fp32, extra).eval())  # the same weights, in fp32
    ours_off, peft_off = ((_logits(m).float() - reference).abs().max() for m in (ours, peft_bf16.eval()))
    assert ours_off <= 0.05 and peft_off <= 0.05 and ours_off <= 1.5 * peft_off  # (0.032 and 0.022 here)


def test_a_parameter_of_a_layer_target_modules_adapts_is_said_so(mixtral):
    """target_parameters naming the weight of a layer target_modules wraps ([q_proj.weight] beside q_proj) was said to
    name no parameter, suggesting another one ("Did you mean 'lm_head.weight'?"): the wrapped weight's path is
    q_proj.base_layer.weight. It is refused as what it is: the layer is adapted twice (peft refuses both)."""
    cfg = LoraConfig(r=2, target_modules=["q_proj", "k_proj"], target_parameters=["experts.down_proj", "q_proj.weight"])
    with pytest.raises(PeftkitError) as refused:
        inject_adapters(load_fp32(mixtral), cfg)
    assert str(refused.value) == (
        "adapter.target_parameters: 'q_proj.weight' names 'model.layers.0.self_attn.q_proj.weight', a parameter of "
        "'model.layers.0.self_attn.q_proj', which adapter.target_modules adapts already (peft refuses both); leave it "
        "out of one of them.")
    typo = LoraConfig(r=2, target_modules=["q_proj"], target_parameters=["q_prj.weight"])
    with pytest.raises(PeftkitError, match="'q_prj.weight' names no parameter of this model"):
        inject_adapters(load_fp32(mixtral), typo)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_peft_s_plain_lora_on_a_moe_model_loads(arch, tmp_path):
    """peft 0.21 saves `"target_parameters": []` for a LoRA on attention layers alone of Mixtral and Qwen3-MoE (its
    expert conversion's default); it loads it as none. peftkit refused the file ('is empty; name the parameters')."""
    base = tmp_path / arch
    build_tiny_model(base, arch=arch, hidden_size=32, num_layers=2, seed=0)
    adapter = _peft_adapter(base, tmp_path / "peft", target_modules=["q_proj", "v_proj"])
    assert json.loads((adapter / "adapter_config.json").read_text())["target_parameters"] == []
    theirs = _logits(PeftModel.from_pretrained(load_fp32(base), adapter).eval())
    assert (theirs - _logits(load_fp32(base))).abs().max() > 1e-3
    assert (_logits(load_adapted_model(str(base), str(adapter), torch.device("cpu"))[0]) - theirs).abs().max() <= 1e-5
