"""tools/gpu_check.py, the GPU rehearsal, runs its code end to end on CPU (--tiny): DeepSpeed ZeRO-2 bf16 against
the bare floor, images/s, the attention kernel. On a GPU node it runs the paper's networks instead."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_rehearsal_runs_its_code_on_cpu():
    out = subprocess.run([sys.executable, "tools/gpu_check.py", "--tiny", "--device", "cpu", "--updates", "1",
                          "--warmup", "1"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "raypd (ZeRO-2 bf16):" in out.stdout and "floor (bare bf16):" in out.stdout
    assert "ratio raypd / floor" in out.stdout and "attention kernel: " in out.stdout
    assert "attention kernel: math" not in out.stdout  # a fused kernel, even on CPU


def test_the_paper_networks_are_not_run_on_cpu():
    out = subprocess.run([sys.executable, "tools/gpu_check.py", "--device", "cpu"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "--tiny" in out.stderr
