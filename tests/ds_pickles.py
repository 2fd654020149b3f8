"""Run by tests: DeepSpeed checkpoints saved and loaded back without unpickling anything but tensors, containers
and the few DeepSpeed types on the allowlist; doctored files refused unrun.

``python -m tests.ds_pickles DIR`` prints one JSON line. Its own process: DeepSpeed needs a process group.
"""

import json
import sys
from pathlib import Path

import torch

from raypd.checkpoint import CheckpointError
from raypd.config import load_config
from raypd.distributed.deepspeed import (TAG, build_deepspeed_engine, check_pickles, deepspeed_types, ds_config,
                                         init_single_process, weights_only_engine)
from raypd.models import build_denoiser
from raypd.train import linear_decay
from tests.planted import planted_torch_file

SETTINGS = [(0, "fp32", False, False), (0, "bf16", False, False), (1, "fp32", True, False), (1, "bf16", False, False),
            (2, "bf16", True, False), (2, "fp32", False, False), (3, "fp32", False, True), (3, "bf16", True, True)]
"""(ZeRO stage, precision, optimizer offload, parameter offload): every stage, both CPU precisions, each offload."""


def engine(cfg, zero: int, precision: str, offload_optimizer: bool, offload_params: bool):
    torch.manual_seed(0)
    config = ds_config(global_batch=4, world_size=1, zero_stage=zero, precision=precision, grad_clip=1.0,
                       offload_optimizer=offload_optimizer, offload_params=offload_params)
    return build_deepspeed_engine(build_denoiser(cfg.model, cfg.data), lr=1e-3, betas=(0.9, 0.99),
                                  schedule=linear_decay(10), config=config, ema_decay=0.9)


def step(wrapped, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    z, logsnr = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, generator=g)
    loss = (wrapped.model(z, logsnr) - z).square().mean()
    wrapped.backward(loss)
    wrapped.step()
    return float(loss)


def refused(wrapped, directory: Path) -> str | None:
    try:
        wrapped.load(directory)
    except CheckpointError as err:
        return str(err)
    return None


def main(root: Path) -> None:
    init_single_process()
    cfg = load_config(None, ["data.resolution=8", "model.attn_resolutions=[4]", "model.ch=32", "model.ch_mult=[1,2]",
                             "data.channels=1", "model.dropout=0"])
    out = {}
    for zero, precision, oo, op in SETTINGS:
        key = f"zero{zero}-{precision}{'-offload_optimizer' if oo else ''}{'-offload_params' if op else ''}"
        a = engine(cfg, zero, precision, oo, op)
        step(a, 0)
        saved = root / key
        a.save(saved, {"updates": 1, "rollbacks": 0, "seconds": 0.5})
        files = sorted(saved.joinpath(TAG).glob("*.pt"))
        # what the files hold beyond torch's own allowlist: only DeepSpeed's few types
        found = sorted({g for f in files for g in torch.serialization.get_unsafe_globals_in_checkpoint(str(f))})
        b = engine(cfg, zero, precision, oo, op)
        client = b.load(saved)  # through the weights-only engine
        same = all(torch.equal(x, y) for x, y in zip(a.master_state_dict().values(), b.master_state_dict().values()))
        next_a, next_b = step(a, 1), step(b, 1)
        # each file in turn replaced by a planted pickle, written by torch.save as DeepSpeed's are
        doctored = {}
        for f in files:
            original = f.read_bytes()
            f.write_bytes(planted_torch_file(root / f"planted-{key}-{f.stem}"))
            doctored[f.name] = refused(b, saved)
            # past the static check (as a type built at unpickling time would be): the weights-only load refuses
            try:
                weights_only_engine(b.engine._config).load(str(f))
                doctored[f.name + ":load"] = None
            except Exception as err:  # noqa: BLE001 - whatever it is, it must not have run the pickle
                doctored[f.name + ":load"] = type(err).__name__
            f.write_bytes(original)
        out[key] = {"files": [f.name for f in files], "globals": found, "client": client.get("updates"),
                    "same_weights": same, "next_losses": [next_a, next_b], "doctored": doctored,
                    "planted": sorted(p.name for p in root.glob("planted-*"))}
    # fp16 (GPUs only) keeps a dynamic loss scaler in its files: on the allowlist, read back weights-only
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    scaler = DynamicLossScaler(init_scale=2.0**12, scale_window=100, min_scale=1, delayed_shift=2,
                               consecutive_hysteresis=False, dtype=torch.float16)
    torch.save({"loss_scaler": scaler, "cur_scale": 1.0}, root / "fp16.pt")
    check_pickles(root)
    back = weights_only_engine(None).load(str(root / "fp16.pt"))["loss_scaler"]
    out["fp16_scaler"] = [type(back).__name__, back.cur_scale, back.scale_window]
    out["allowlist"] = sorted(f"{t.__module__}.{t.__qualname__}" for t in deepspeed_types())
    print(json.dumps(out))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
