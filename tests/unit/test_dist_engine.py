import json
import subprocess
import sys
from pathlib import Path

import pytest

from raypd.distributed.deepspeed import ds_config

ROOT = Path(__file__).resolve().parents[2]


def test_ds_config_is_generated_and_checked():
    cfg = ds_config(global_batch=128, world_size=4, zero_stage=3, precision="bf16", grad_clip=1.0,
                    offload_optimizer=True, offload_params=True)
    assert cfg["train_micro_batch_size_per_gpu"] == 32 and cfg["gradient_accumulation_steps"] == 1
    assert cfg["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"},
                                        "reduce_bucket_size": 50_000_000, "allgather_bucket_size": 50_000_000,
                                        "overlap_comm": True, "memory_efficient_linear": False}
    serial = ds_config(global_batch=8, world_size=1, zero_stage=2, precision="fp32", grad_clip=1.0,
                       bucket_elements=2_000_000, overlap_comm=False)["zero_optimization"]
    assert (serial["reduce_bucket_size"], serial["allgather_bucket_size"], serial["overlap_comm"]) == (2_000_000, 2_000_000, False)
    assert ds_config(global_batch=8, world_size=1, zero_stage=0, precision="fp32", grad_clip=1.0)["zero_optimization"] == {"stage": 0}
    assert cfg["bf16"] == {"enabled": True} and cfg["gradient_clipping"] == 1.0
    with pytest.raises(ValueError, match="does not split evenly over 3 workers"):
        ds_config(global_batch=128, world_size=3, zero_stage=2, precision="fp32", grad_clip=1.0)
    with pytest.raises(ValueError, match="parameter offload needs ZeRO stage 3"):
        ds_config(global_batch=8, world_size=1, zero_stage=2, precision="fp32", grad_clip=1.0, offload_params=True)


def test_zero2_matches_plain_pytorch_loss_curve():
    """Same seed, same batches: DeepSpeed ZeRO-2 (fp32, one gloo rank) and the plain engine agree.

    Both run Adam on the same fp32 weights with the same clipping, so the curves agree to float
    rounding (ZeRO flattens the weights into one buffer, which reorders sums): 1e-4 relative.
    """
    out = subprocess.run([sys.executable, "-m", "tests.dist_equivalence", "2", "12"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    curves = json.loads(out.stdout.strip().splitlines()[-1])
    assert curves["deepspeed"] == pytest.approx(curves["plain"], rel=1e-4)
    assert curves["plain"][-1] != curves["plain"][0]


def test_deepspeed_checkpoints_load_weights_only_and_doctored_files_are_refused_unrun(tmp_path):
    """Every ZeRO stage, fp32 and bf16, each offload: DeepSpeed's files hold nothing but tensors, containers and the
    allowlisted DeepSpeed types, load back exactly through the weights-only engine, and a file replaced by a pickle
    that would create a file is refused with a message naming it, by the check and by the load itself."""
    out = subprocess.run([sys.executable, "-m", "tests.ds_pickles", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    allowed = set(found.pop("allowlist"))
    assert found.pop("fp16_scaler") == ["DynamicLossScaler", 2.0**12, 100]
    assert len(found) == 8
    for key, r in found.items():
        assert set(r["globals"]) <= allowed, key
        assert r["client"] == 1 and r["same_weights"], key
        assert r["next_losses"][0] == r["next_losses"][1], key  # resumed exactly: the same next loss
        assert len(r["doctored"]) == 2 * len(r["files"]) and len(r["files"]) == (1 if key.startswith("zero0") else 2)
        for name in r["files"]:
            assert name in r["doctored"][name] and "holds pickled io.open" in r["doctored"][name], (key, r["doctored"])
            assert "refuses to unpickle" in r["doctored"][name]
            assert r["doctored"][f"{name}:load"] == "UnpicklingError", (key, name)
        assert r["planted"] == [], key
    assert not list(tmp_path.glob("planted-*"))
