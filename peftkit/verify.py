"""`peftkit verify RUN_DIR`: re-run a recorded run and check that it gives the same bits.

The recipe, seed and expected hashes come from RUN_DIR/manifest.json. The rerun goes to a temporary
directory; the report names what differs: the environment (package versions, device), the data or
base-model hashes, the first step whose loss diverges, and each exported file whose bytes differ.
With a tolerance, losses and adapter weights are compared numerically instead (for runs on another
machine, where bit equality is not expected).
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from peftkit.errors import PeftkitError
from peftkit.manifest import environment, file_hashes, model_weight_hashes
from peftkit.recipe import Recipe


@dataclass
class VerifyReport:
    ok: bool
    differences: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def read_manifest(run_dir: Path) -> dict:
    path = run_dir / "manifest.json"
    if not path.exists():
        raise PeftkitError(f"{run_dir} has no manifest.json; it is not a finished peftkit run directory.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PeftkitError(f"{path} is not valid JSON ({e}).") from None


def _env_differences(recorded: dict, current: dict) -> list[str]:
    out = []
    for name, version in recorded.get("versions", {}).items():
        now = current["versions"].get(name)
        if now != version:
            out.append(f"environment: {name} {version} recorded, {now} now")
    for key in ("device", "machine", "torch_threads", "gpu"):
        if recorded.get(key) != current.get(key):
            out.append(f"environment: {key} {recorded.get(key)} recorded, {current.get(key)} now")
    return out


def _first_divergence(expected: list[float], actual: list[float], tolerance: float) -> str | None:
    for i, (a, b) in enumerate(zip(expected, actual)):
        if not (a == b or (tolerance > 0 and math.isclose(a, b, rel_tol=0, abs_tol=tolerance))):
            return f"loss diverges first at step {i + 1}: {a!r} recorded, {b!r} now"
    if len(expected) != len(actual):
        return f"{len(expected)} steps recorded, {len(actual)} now"
    return None


def _weights_close(a: Path, b: Path, tolerance: float) -> str | None:
    from safetensors.torch import load_file

    x, y = load_file(a), load_file(b)
    if x.keys() != y.keys():
        return f"{a.name}: different tensors"
    worst = max(((x[k].float() - y[k].float()).abs().max().item(), k) for k in x)
    return None if worst[0] <= tolerance else f"{a.parent.name}/{a.name}: max abs diff {worst[0]:.3g} at {worst[1]} > {tolerance}"


def verify(run_dir: str | Path, tolerance: float = 0.0, console: Console | None = None) -> VerifyReport:
    """Re-run RUN_DIR's recipe in a temporary directory and compare.

    Args:
        run_dir: a finished run directory (with manifest.json).
        tolerance: 0 demands identical bits; > 0 compares losses and adapter weights with this absolute
            tolerance (exported files may then differ in their bytes).
    """
    from peftkit.modeling import resolve_device
    from peftkit.train import train

    console = console or Console()
    run_dir = Path(run_dir).resolve()
    manifest = read_manifest(run_dir)
    recipe = Recipe.model_validate(manifest["recipe"])
    report = VerifyReport(ok=True)
    report.notes += _env_differences(manifest["environment"], environment(resolve_device(recipe.model.device)))

    data_now = {"train": file_hashes(recipe.data.train)}
    if recipe.data.eval:
        data_now["eval"] = file_hashes(recipe.data.eval)
    if data_now != manifest["data_sha256"]:
        report.differences.append(f"data: content hash differs from the recorded one ({recipe.data.train})")
    if model_weight_hashes(recipe.model.name_or_path) != manifest["base_model_sha256"]:
        report.differences.append(f"base model: weight files differ from the recorded ones ({recipe.model.name_or_path})")

    with tempfile.TemporaryDirectory(prefix="peftkit-verify-") as tmp:
        recipe.export.output_dir = tmp
        console.print(f"Re-running {run_dir.name} in {tmp} ...")
        train(recipe, console=console)
        rerun = json.loads((Path(tmp) / "manifest.json").read_text())
        divergence = _first_divergence(manifest["losses"], rerun["losses"], tolerance)
        if divergence:
            report.differences.append(divergence)
        for name, digest in manifest["outputs_sha256"].items():
            now = rerun["outputs_sha256"].get(name)
            if now == digest:
                continue
            if tolerance > 0 and name.endswith(".safetensors") and now is not None:
                problem = _weights_close(run_dir / name, Path(tmp) / name, tolerance)
                if problem:
                    report.differences.append(problem)
            elif tolerance == 0 or now is None:
                report.differences.append(f"output {name}: sha256 {digest[:12]}… recorded, {(now or 'missing')[:12]}… now")
    report.ok = not report.differences
    return report
