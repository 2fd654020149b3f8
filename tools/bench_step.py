"""Time one distillation train_step against its bare-PyTorch floor, measured in the same run.

The floor: 2 teacher forwards (inference mode) + 1 student forward/backward + Adam step, of the
same model on the same batch, with no raypd code in the way. raypd's step adds the schedule
arithmetic, the target inversion, loss weighting, grad-norm clipping, the non-finite guard and
the LR schedule. Prints both times per update and their ratio (goal: <= 1.05).

    python tools/bench_step.py [--device cpu|cuda] [--batch 32] [--resolution 16] [--ch 32] [--iters 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from raypd.config import load_config
from raypd.data import Batch
from raypd.diffusion import logsnr_schedule
from raypd.models import build_denoiser
from raypd.methods.progressive import HalvingRound
from raypd.methods.regression import bare
from raypd.train import build_plain_engine, freeze, linear_decay, make_student, train_step


def floor_step(student, teacher, optimizer, x, n_steps: int, gen: torch.Generator) -> None:
    """One distillation update written out inline: no validation, no weighting, no clipping, no guards."""
    b = x.shape[0]
    t = (torch.randint(0, n_steps, (b,), generator=gen, device=x.device) + 1).float() / n_steps
    lam, lam_mid, lam_end = (logsnr_schedule(t - d / n_steps).view(-1, 1, 1, 1) for d in (0.0, 0.5, 1.0))
    (a, s), (a_mid, s_mid), (a_end, s_end) = ((l.sigmoid().sqrt(), (-l).sigmoid().sqrt()) for l in (lam, lam_mid, lam_end))
    z = a * x + s * torch.randn(x.shape, generator=gen, device=x.device)
    with torch.inference_mode():
        x1 = teacher(z, lam.flatten())
        z_mid = a_mid * x1 + s_mid * (z - a * x1) / s
        x2 = teacher(z_mid, lam_mid.flatten())
        z_end = a_end * x2 + s_end * (z_mid - a_mid * x2) / s_mid
        target = (z_end - s_end / s * z) / (a_end - s_end / s * a)
    loss = (student(z, lam.flatten()) - target.clone()).square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--ch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    cfg = load_config(None, [f"data.resolution={args.resolution}", f"model.ch={args.ch}", "model.parameterization=x",
                             f"model.attn_resolutions=[{args.resolution // 2}]"])
    torch.manual_seed(0)
    teacher = freeze(build_denoiser(cfg.model, cfg.data).to(device))
    student = make_student(teacher)
    floor_student = make_student(teacher)
    floor_opt = torch.optim.Adam(floor_student.parameters(), lr=1e-4)
    engine = build_plain_engine(student, lr=1e-4, betas=(0.9, 0.999), grad_clip=1.0, schedule=linear_decay(10**9))
    x = torch.rand(args.batch, cfg.data.channels, args.resolution, args.resolution, device=device) * 2 - 1
    gen = torch.Generator(device).manual_seed(0)
    n_steps = 8

    objective, nets = bare(HalvingRound, student_steps=n_steps, logsnr_fn=logsnr_schedule), {"student": engine.model,
                                                                                             "teacher": teacher}

    def raypd_step():  # what the stage loop does per update: the method's loss, then the engine's update
        train_step(engine, objective.loss("student", nets, Batch(x), gen, 1))

    def bare_step():
        floor_step(floor_student, teacher, floor_opt, x, n_steps, gen)

    for _ in range(args.warmup):
        raypd_step()
        bare_step()
    times: dict[str, list[float]] = {"floor": [], "raypd": []}
    for _ in range(args.iters):  # interleaved, so drift in machine load hits both alike
        for name, fn in (("floor", bare_step), ("raypd", raypd_step)):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    floor, ours = statistics.median(times["floor"]), statistics.median(times["raypd"])
    params = sum(p.numel() for p in student.parameters())
    print(f"device {device}, UNet {params / 1e6:.2f}M params, batch {args.batch} at {args.resolution}px, "
          f"{args.iters} timed updates each (median)")
    print(f"floor (bare PyTorch: 2 teacher fwd + student fwd/bwd + Adam): {floor * 1e3:.1f} ms/update")
    print(f"raypd train_step:                                          {ours * 1e3:.1f} ms/update")
    print(f"ratio raypd / floor: {ours / floor:.3f}")


if __name__ == "__main__":
    main()
