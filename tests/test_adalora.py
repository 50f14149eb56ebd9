"""AdaLoRA beyond the conformance suite (tests/test_methods.py): the rank allocator and the regulariser, run in
lockstep with peft's on the same weights and batches; adapters with per-layer ranks (rank_pattern) both ways;
resume; user errors."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from peft import AdaLoraConfig as PeftAdaLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from peftkit.adapters import adapter_layers, inject_adapters, trainable_parameters
from peftkit.adapters.state_dicts import adapter_state_dict
from peftkit.errors import PeftkitError
from peftkit.inspect import inspect_adapter
from peftkit.merge import merge_adapter
from peftkit.methods.adalora import AdaLora, AdaLoraConfig
from peftkit.adapter_base import load_adapted_model
from peftkit.peft_format import peft_config, save_adapter
from peftkit.recipe import load_recipe
from peftkit.tiny import build_tiny_model
from peftkit.train import train
from tests.conftest import make_recipe, random_adapters, signal_after_step
from tests.conftest import load_fp32 as _load  # (float32, eval mode)
from tests.test_methods import _diff, _logits

INIT_R, TARGET_R, TINIT, TFINAL, TOTAL = 6, 3, 2, 3, 10
LAYERS = 4  # q_proj and v_proj of 2 layers (peft's default targets for Llama)
SETTINGS = {"init_r": INIT_R, "target_r": TARGET_R, "tinit": TINIT, "tfinal": TFINAL, "deltaT": 1, "orth_reg_weight": 0.5}


def budget(step: int) -> int:
    """Triplets kept after optimizer step `step`, from the paper's cubic schedule (eq. 10, peft's constants):
    b(t) = b0 for t <= tinit, b_T for t > T - tfinal, else b_T + (b0 - b_T) (1 - (t - tinit) / (T - tfinal -
    tinit))^3, rounded down."""
    b0, bt = INIT_R * LAYERS, TARGET_R * LAYERS
    if step <= TINIT:
        return b0
    if step > TOTAL - TFINAL:
        return bt
    return bt + int((b0 - bt) * (1 - (step - TINIT) / (TOTAL - TFINAL - TINIT)) ** 3)


@pytest.fixture(scope="module")
def lockstep(tmp_path_factory):
    """peft's AdaLoRA and ours from the same weights, trained TOTAL SGD steps on the same batches, each with its
    own regulariser and allocator; per step: (our loss, peft's loss, our kept counts, peft's and our rank pattern,
    the largest difference between our E and peft's). Then both get the same weights far from the base."""
    root = tmp_path_factory.mktemp("adalora")
    base = root / "llama"
    build_tiny_model(base, arch="llama", hidden_size=32, num_layers=2, seed=0)
    cfg = AdaLoraConfig(method="adalora", **SETTINGS)
    torch.manual_seed(0)
    theirs = get_peft_model(_load(base).train(), PeftAdaLoraConfig(
        task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], lora_alpha=8, total_step=TOTAL, **SETTINGS))
    # (task_type matters: a bare PeftModel's forward skips AdaLoraModel.forward, and with it the regulariser)
    ours = _load(base).train()
    targets = inject_adapters(ours, cfg)
    layers = adapter_layers(ours)
    peft_layers = {path: theirs.base_model.model.get_submodule(path) for path in layers}
    with torch.no_grad():
        for path, layer in layers.items():
            for part in ("lora_A", "lora_B", "lora_E"):
                getattr(layer, part).copy_(getattr(peft_layers[path], part)["default"])
    trainer = AdaLora.trainer(ours, cfg, TOTAL)
    opts = [torch.optim.SGD(trainable_parameters(m), lr=0.2) for m in (ours, theirs)]
    gen, history = torch.Generator().manual_seed(0), []
    for step in range(1, TOTAL + 1):
        ids = torch.randint(3, 90, (4, 12), generator=gen)
        mine = ours(input_ids=ids, labels=ids).loss + trainer.regularizer()
        peft_loss = theirs(input_ids=ids, labels=ids).loss  # peft adds its regulariser inside forward
        (mine + 0).backward()
        peft_loss.backward()
        for opt in opts:
            opt.step()
        trainer.after_step(step)
        theirs.base_model.update_and_allocate(step)
        for opt in opts:
            opt.zero_grad()
        kept = {p: int((layer.lora_E != 0).sum()) for p, layer in layers.items()}
        e_diff = max(_diff(layer.lora_E, peft_layers[p].lora_E["default"]) for p, layer in layers.items())
        pattern = theirs.peft_config["default"].rank_pattern
        history.append((mine.item(), peft_loss.item(), kept, dict(pattern) if pattern else None,
                        dict(trainer.rank_pattern) if trainer.rank_pattern else None, e_diff))
    with torch.no_grad():  # ten small steps barely move the logits: new values (the pruned E stay 0), in both
        for path, layer in layers.items():
            kept = layer.lora_E != 0
            AdaLora.randomize(layer, gen, 0.1)
            layer.lora_E.mul_(kept)
            for part in ("lora_A", "lora_B", "lora_E"):
                getattr(peft_layers[path], part)["default"].copy_(getattr(layer, part))
    return dict(base=base, cfg=cfg, ours=ours.eval(), theirs=theirs.eval(), trainer=trainer, targets=targets,
                history=history, layers=layers)


def test_allocator_follows_the_budget_and_peft(lockstep):
    theirs = lockstep["theirs"].base_model.rankallocator
    for step, (mine, peft_loss, kept, pattern, our_pattern, e_diff) in enumerate(lockstep["history"], start=1):
        assert e_diff <= 1e-6, step
        assert mine == pytest.approx(peft_loss, abs=1e-5), step  # cross-entropy + orthogonality term, as peft's
        assert sum(kept.values()) == budget(step) == theirs.budget_schedule(step)[0], step
        if step > TINIT:  # peft's kept triplets (its keys carry the adapter name) are ours
            assert {k.replace(".default", ""): v for k, v in pattern.items()} == our_pattern, step
    # Around tinit and tfinal: full rank through step tinit, pruning from tinit + 1, the target from T - tfinal on.
    counts = [sum(entry[2].values()) for entry in lockstep["history"]]
    assert counts[TINIT - 1] == INIT_R * LAYERS > counts[TINIT] > TARGET_R * LAYERS
    assert counts[TOTAL - TFINAL - 1:] == [TARGET_R * LAYERS] * (TFINAL + 1)
    assert len(set(kept.values())) > 1  # ranks really were reallocated unevenly


def test_orthogonality_regulariser_by_hand():
    cfg = AdaLoraConfig(method="adalora", init_r=3, target_r=1, orth_reg_weight=0.3)
    model = torch.nn.ModuleDict({"a": AdaLora.wrap(torch.nn.Linear(5, 4), cfg, "a"),
                                 "b": AdaLora.wrap(torch.nn.Linear(4, 6), cfg, "b")})
    for layer in model.values():
        AdaLora.randomize(layer, torch.Generator().manual_seed(1), 0.2)
    norms = []
    for layer in model.values():
        for m in (layer.lora_A.detach().tolist(), list(zip(*layer.lora_B.detach().tolist()))):  # A, B^T: r rows
            sq = sum((sum(x * y for x, y in zip(m[i], m[j])) - (i == j)) ** 2 for i in range(3) for j in range(3))
            norms.append(sq ** 0.5)  # peft's term: the Frobenius norm, not its square
    expected = 0.3 * sum(norms) / len(norms)
    assert AdaLora.trainer(model, cfg, 10).regularizer().item() == pytest.approx(expected, rel=1e-6)


def test_peft_trained_adapter_with_rank_pattern_loads_merges_and_inspects(lockstep, tmp_path):
    theirs, base = lockstep["theirs"], lockstep["base"]
    theirs.save_pretrained(tmp_path / "peft")
    expected = _logits(theirs)
    assert _diff(expected, _logits(_load(base))) > 1e-3
    ours, *_ = load_adapted_model(str(base), str(tmp_path / "peft"))
    assert _diff(_logits(ours), expected) <= 1e-4
    merged = merge_adapter(str(tmp_path / "peft"), str(tmp_path / "merged"), base=str(base))
    assert _diff(_logits(_load(merged)), expected) <= 1e-4
    pattern = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["rank_pattern"]
    ranks = inspect_adapter(tmp_path / "peft")["ranks"]
    assert ranks == {k.removesuffix(".lora_E"): sum(v) for k, v in pattern.items()} and len(set(ranks.values())) > 1


def test_a_pruned_adapter_as_init_from_is_a_recipe_error(lockstep, number_data, tmp_path):
    """Every AdaLoRA export is pruned (rank_pattern); as `adapter.init_from` it was accepted by validate and refused
    by train after the model loaded, blaming adapter.rank_pattern, a key the recipe does not have."""
    lockstep["theirs"].save_pretrained(tmp_path / "peft")
    recipe = _recipe(tmp_path, lockstep["base"], number_data, {"init_from": str(tmp_path / "peft")})
    with pytest.raises(PeftkitError) as e:
        load_recipe(recipe)
    message = " ".join(str(e.value).split())
    assert message.startswith(f"{recipe}:")
    assert f"adapter.init_from: {tmp_path / 'peft'} is an AdaLoRA adapter pruned by its run's rank allocation" in message


@pytest.mark.parametrize("command", ["validate", "train"])
def test_a_recipe_s_rank_pattern_is_refused_in_adalora_s_words(command, tiny_llama, number_data, tmp_path,
                                                               monkeypatch, capsys):
    """AdaLoRA's rank_pattern is a pruned adapter's masks, not per-module ranks: check_patterns (304ef4e) read it
    with LoRA's rank_and_alpha, which AdaLoRA's config lacks, and validate and train ended in an AttributeError
    traceback before the trainer's refusal."""
    from tests.conftest import cli_user_error

    masks = {f"model.layers.{i}.self_attn.q_proj.lora_E": [True, True, False, False] for i in range(2)}
    recipe = _recipe(tmp_path, tiny_llama, number_data, {"method": "adalora", "init_r": 4, "target_r": 2, "tinit": 1,
                                                         "tfinal": 1, "target_modules": ["q_proj"],
                                                         "rank_pattern": masks})
    said = " ".join(cli_user_error(monkeypatch, capsys, command, str(recipe)).split())
    assert "adapter.rank_pattern is set (the adapter was pruned by an earlier AdaLoRA run, e.g. through init_from): " \
        "peftkit does not continue AdaLoRA's rank allocation from a pruned adapter." in said


def test_our_adapter_with_rank_pattern_loads_in_peft(lockstep, tmp_path):
    ours, base, trainer = lockstep["ours"], lockstep["base"], lockstep["trainer"]
    cfg, state = trainer.export(lockstep["cfg"], adapter_state_dict(ours, []))
    save_adapter(tmp_path, state, peft_config(cfg, lockstep["targets"], str(base), False, "llama"))
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["total_step"] == TOTAL and sum(map(sum, written["rank_pattern"].values())) == TARGET_R * LAYERS
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert {k: v.shape[0] for k, v in saved.items() if k.endswith("lora_E")} == {
        f"base_model.model.{k}": sum(v) for k, v in written["rank_pattern"].items()}
    reference = PeftModel.from_pretrained(_load(base), tmp_path).eval()
    assert _diff(_logits(reference), _logits(ours)) <= 1e-4


def _recipe(tmp_path, model, data, adapter: dict, **sections):
    """make_recipe's recipe with `adapter` as the whole adapter section (none of LoRA's keys)."""
    import yaml

    path = make_recipe(tmp_path, model, data, **sections)
    path.write_text(yaml.safe_dump(yaml.safe_load(path.read_text()) | {"adapter": adapter}, sort_keys=False))
    return path


def test_resume_restores_the_allocator_bit_identically(tiny_llama, number_data, tmp_path, monkeypatch):
    """Stopped (SIGINT) at step 5, in the middle of the pruning phase (steps 3-7), and resumed: the same adapter
    bits as an uninterrupted run. The importance averages travel in the checkpoint (without them the later
    pruning decisions differ)."""
    sections = dict(adapter={"method": "adalora", "init_r": 4, "target_r": 2, "tinit": 2, "tfinal": 3, "deltaT": 2,
                             "dropout": 0.1},
                    training={"max_steps": 10, "batch_size": 2, "grad_accum": 2}, eval={"base_model": False})
    straight = _recipe(tmp_path / "a", tiny_llama, number_data, **sections)
    train(load_recipe(straight))

    signal_after_step(monkeypatch, torch.optim.AdamW, 5, signal.SIGINT)
    stopped = _recipe(tmp_path / "b", tiny_llama, number_data, **sections)
    with pytest.raises(PeftkitError, match="at step 5"):
        train(load_recipe(stopped))
    monkeypatch.undo()
    blob = torch.load(next((tmp_path / "b" / "run" / "checkpoints").iterdir()) / "training_state.pt", weights_only=True)
    assert blob["method_trainer"]["exp_avg_ipt"] and blob["method_trainer"]["rank_pattern"]
    train(load_recipe(stopped), resume=True)
    runs = [tmp_path / x / "run" for x in "ab"]
    assert (runs[0] / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (runs[1] / "adapter" / "adapter_model.safetensors").read_bytes()
    config = json.loads((runs[1] / "adapter" / "adapter_config.json").read_text())
    assert config["total_step"] == 10 and sum(map(sum, config["rank_pattern"].values())) == 2 * LAYERS
    rows = [json.loads(line) for line in (runs[1] / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [r["step"] for r in rows] == list(range(1, 11)) and all(r["regularizer"] > 0 for r in rows)


def test_user_errors_name_the_key_and_the_fix(tmp_path):
    cfg = AdaLoraConfig(method="adalora", init_r=4, target_r=2, tinit=3, tfinal=2)
    with pytest.raises(PeftkitError, match=r"adapter.tinit \(3\) \+ adapter.tfinal \(2\) leave no step of this run's 5 "
                                           r"optimizer steps.*train longer"):
        AdaLora.trainer(torch.nn.Module(), cfg, 5)
    # The final allocation at step 1 found no importance score (none taken yet) and pruned every rank: the run
    # exported an empty adapter (peft's allocator fails with a KeyError there).
    for tfinal, steps in ((0, 1), (4, 5)):
        cfg = AdaLoraConfig(method="adalora", init_r=4, target_r=2, tfinal=tfinal)
        with pytest.raises(PeftkitError, match=rf"adapter.tfinal \({tfinal}\) puts AdaLoRA's final rank allocation at "
                                               rf"step 1 of this run's {steps} optimizer steps.*every rank would be pruned"):
            AdaLora.trainer(torch.nn.Module(), cfg, steps)
    (tmp_path / "r.yaml").write_text("model: {name_or_path: m}\ndata: {train: t.jsonl}\nexport: {output_dir: o}\n"
                                     "adapter:\n  method: adalora\n  init_r: 8\n  target_r: 12\n")
    with pytest.raises(PeftkitError, match=r"r.yaml:7: 'adapter.target_r' = 12: must be below init_r \(8\).*Lower target_r"):
        load_recipe(tmp_path / "r.yaml")


def test_an_infinite_gradient_leaves_the_importance_scores_as_they_were(tiny_llama):
    """fp16's loss scaler skips a step whose gradients hold inf (often its first ones), and the loop counts it: the
    entries with a non-finite gradient keep their averages (one inf made an uncertainty |inf - inf| = NaN for good,
    and its triplet pruned whatever its importance); the others, and every entry of a finite step, update as before."""
    model = _load(tiny_llama).train()
    cfg = AdaLoraConfig(method="adalora", **SETTINGS)
    torch.manual_seed(0)
    inject_adapters(model, cfg)
    random_adapters(model)  # E starts at zero, and with it A's and B's gradients
    trainer = AdaLora.trainer(model, cfg, TOTAL)
    ids = torch.randint(3, 90, (2, 10), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    trainer.after_step(1)
    before = {k: (v.clone(), trainer.exp_avg_unc[k].clone()) for k, v in trainer.exp_avg_ipt.items()}
    name, param = next((n, p) for n, p in trainer._params() if n.endswith("lora_A"))
    param.grad[0, 0] = float("inf")
    trainer.after_step(2)
    for key, (avg, unc) in before.items():
        assert torch.isfinite(trainer.exp_avg_ipt[key]).all() and torch.isfinite(trainer.exp_avg_unc[key]).all()
    (p_avg, p_unc) = before[name]
    assert trainer.exp_avg_ipt[name][0, 0] == p_avg[0, 0] and trainer.exp_avg_unc[name][0, 0] == p_unc[0, 0]
    ipt = (param * param.grad).abs()  # the finite entries: the plain moving averages, to the bit
    beta1, beta2 = cfg.beta1, cfg.beta2
    avg = beta1 * p_avg + (1 - beta1) * ipt
    unc = beta2 * p_unc + (1 - beta2) * (ipt - avg).abs()
    finite = torch.isfinite(ipt)
    assert torch.equal(trainer.exp_avg_ipt[name], torch.where(finite, avg, p_avg))
    assert torch.equal(trainer.exp_avg_unc[name], torch.where(finite, unc, p_unc))
    assert not torch.equal(trainer.exp_avg_ipt[name], p_avg)
