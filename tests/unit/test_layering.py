"""The package's import layering (see the design notes): lower layers never import higher ones."""

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "raypd"

# what each part of the package may import from raypd (by top-level module under raypd)
ALLOWED = {
    "diffusion": set(),
    "config": {"diffusion", "config"},
    "models": {"diffusion", "config", "models"},
    "data": {"config", "data"},
    "train": {"diffusion", "config", "models", "data", "checkpoint", "train"},
    "eval": {"diffusion", "config", "models", "data", "eval", "storage"},  # storage: the machine's cache
    "checkpoint": {"diffusion", "config", "models"},
    "hf": {"diffusion", "config", "models", "checkpoint", "eval", "hf"},
    "runs": {"config", "storage"},
    "storage": {"config"},
    # the Ray/DeepSpeed layer: everything below the driver, nothing of it
    # distillation methods: one file each, on the training logic
    "methods": {"diffusion", "config", "models", "data", "train", "checkpoint", "methods"},
    "distributed": {"diffusion", "config", "models", "data", "train", "eval", "checkpoint", "distributed", "storage",
                    "methods"},
    # the driver's modules and the command line, on top
    "plan": {"config", "train", "models", "data", "checkpoint", "hf", "runs", "distributed", "storage", "memory",
             "methods", "eval"},
    "memory": {"config", "models"},
    "sample": {"config", "data", "eval", "checkpoint"},
    "score": {"config", "data", "eval", "checkpoint", "sample", "distributed"},  # --workers: evaluation's Ray tasks
    "pairs": {"config", "data", "eval", "models"},
    "pipeline": {"diffusion", "config", "models", "data", "train", "eval", "checkpoint", "hf", "runs", "distributed",
                 "pairs", "methods"},
    "distill": {"config", "data", "checkpoint", "runs", "plan", "pipeline", "distributed", "storage", "methods"},
    "compare": {"eval", "checkpoint", "methods"},
    "cli": {"distill", "data", "sample", "score", "hf", "compare"},
    "__init__": set(),
}
HEAVY_ONLY_IN = {"ray": {"distributed"}, "deepspeed": {"distributed"}, "torch_fidelity": {"eval"},
                 "diffusers": {"models", "hf", "tools"}}


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def _part(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def test_no_forbidden_imports():
    problems = []
    for path in PKG.rglob("*.py"):
        part = _part(path)
        for name in _imports(path):
            top = name.split(".")
            if top[0] == "raypd" and part in ALLOWED and len(top) > 1 and top[1] not in ALLOWED[part]:
                problems.append(f"{path.relative_to(PKG)} imports {name}")
            if top[0] in HEAVY_ONLY_IN and part not in HEAVY_ONLY_IN[top[0]]:
                problems.append(f"{path.relative_to(PKG)} imports {name}, allowed only in {HEAVY_ONLY_IN[top[0]]}")
    assert not problems, "\n".join(problems)


def test_every_part_of_the_package_has_a_rule():
    parts = {_part(path) for path in PKG.rglob("*.py")}
    assert parts <= set(ALLOWED), f"no layering rule for {sorted(parts - set(ALLOWED))}"


def test_diffusion_uses_torch_and_stdlib_only():
    stdlib = set(sys.stdlib_module_names)
    for path in (PKG / "diffusion").rglob("*.py"):
        for name in _imports(path):
            assert name.split(".")[0] in stdlib | {"torch", "__future__"}, f"{path.name} imports {name}"


def test_import_and_help_stay_light():
    code = ("import sys, raypd.distill, raypd.pipeline; "
            "heavy = [m for m in ('ray', 'deepspeed', 'torch_fidelity', 'diffusers', 'sklearn') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_training_loop_driver_and_cluster_code_name_no_method():
    """A method is one file in raypd/methods/: the code that trains, drives and distributes stages knows none of
    them by name, nor their particular arguments (a self-teacher, a batch of pairs)."""
    import re

    from raypd.methods import METHODS

    words = [name for name in METHODS if name != "critic_test"] + ["self_teacher", "batch.z", "tract", "pairs_loss"]
    pattern = re.compile("|".join(rf"\b{re.escape(w)}\b" for w in words), re.IGNORECASE)
    places = [*(PKG / "train").rglob("*.py"), PKG / "pipeline.py", *(PKG / "distributed").rglob("*.py")]
    found = [f"{path.relative_to(PKG)}:{i}: {line.strip()}" for path in places
             for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, "\n".join(found)
