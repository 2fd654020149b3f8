"""Run by tests: the same seeded distillation round through the plain engine and DeepSpeed ZeRO-2.

Prints one JSON line: the two loss curves. Runs as its own process because DeepSpeed needs a
process group, which would otherwise outlive the test.
"""

import json
import sys

import torch

from raypd.config import load_config
from raypd.data import Batch
from raypd.diffusion import logsnr_schedule
from raypd.distributed.deepspeed import build_deepspeed_engine, ds_config, init_single_process
from raypd.models import build_denoiser
from raypd.methods.progressive import HalvingRound
from raypd.methods.regression import regression_loss
from raypd.train import build_plain_engine, freeze, linear_decay, make_student, train_step


def curve(engine, teacher, updates: int) -> list[float]:
    data, noise = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    losses = []
    for _ in range(updates):
        x = torch.rand(8, 1, 8, 8, generator=data) * 2 - 1
        loss = regression_loss(HalvingRound, {"student": engine.model, "teacher": teacher}, Batch(x),
                               student_steps=4, weighting="snr_trunc", logsnr_fn=logsnr_schedule, generator=noise)
        stats = train_step(engine, loss)
        losses.append(stats.loss)
    return losses


def main(stage: int, updates: int) -> None:
    torch.manual_seed(0)
    cfg = load_config(None, ["data.resolution=8", "model.attn_resolutions=[4]", "model.dropout=0"])
    teacher = freeze(build_denoiser(cfg.model, cfg.data))
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.02 * torch.randn_like(p))
    kw = dict(lr=1e-3, betas=(0.9, 0.999), schedule=linear_decay(updates))
    plain = curve(build_plain_engine(make_student(teacher), grad_clip=1.0, **kw), teacher, updates)
    init_single_process()
    config = ds_config(global_batch=8, world_size=1, zero_stage=stage, precision="fp32", grad_clip=1.0)
    deep = curve(build_deepspeed_engine(make_student(teacher), config=config, **kw), teacher, updates)
    print(json.dumps({"plain": plain, "deepspeed": deep}))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
