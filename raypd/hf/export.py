"""Export a distilled student as a diffusers ``DDIMPipeline`` directory that samples as raypd does.

    raypd export --checkpoint runs/x/round-02-1steps --out student-1step/

The directory holds model_index.json, unet/ (config.json + diffusion_pytorch_model.safetensors),
scheduler/ (scheduler_config.json) and a README.md model card. The scheduler is a DDIMScheduler that
reproduces raypd's N-step DDIM sampler step for step:

* raypd's student steps are t_i = i / N on the teacher's discrete schedule, t = (k + 1) / T, i.e. the
  integer timesteps k_i = i T / N - 1: exactly DDIMScheduler's ``timestep_spacing="trailing"`` (with
  ``steps_offset`` 0), provided N divides T;
* ``trained_betas`` are the teacher's own float32 betas, so alphas_cumprod at those timesteps is raypd's
  alpha^2(t_i) to the last bit, and the UNet gets the integer timestep it saw in distillation;
* ``set_alpha_to_one``: the last step lands on alpha = 1, i.e. returns x_hat, as raypd's last step does;
* ``prediction_type`` is the student's parameterization (eps -> epsilon, v -> v_prediction, x -> sample);
* ``clip_sample`` false: the default call (eta 0, ``num_inference_steps=N``) is raypd's ``ddim_sample``
  with ``clip=False``. With ``clip_sample=True`` and ``use_clipped_model_output=True`` it is raypd's
  clipped sampler (``clip=True``), which derives eps from the clipped x_hat.

Only students whose network is a diffusers UNet2DModel (distilled from an imported diffusers teacher)
can be exported: raypd's native UNet is not a UNet2DModel and diffusers cannot load it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from raypd.checkpoint import CheckpointError, CheckpointMeta, load_checkpoint
from raypd.diffusion.discrete import alphas_cumprod
from raypd.diffusion.schedule import make_logsnr_fn
from raypd.hf.scheduler import PREDICTION_TYPE_OF
from raypd.models.hf import require_diffusers


class ExportError(CheckpointError):
    """A checkpoint that cannot be written as a diffusers pipeline, with the reason."""


def check_exportable(meta: CheckpointMeta, steps: int, path: str | Path) -> None:
    """Refuse, naming why, what a stock DDIMPipeline could not sample exactly as raypd does."""
    if meta.model.backbone != "diffusers":
        raise ExportError(f"{path}: the network is raypd's native UNet, which is not a diffusers UNet2DModel, so no "
                          "diffusers pipeline can load it; only students distilled from an imported diffusers "
                          "teacher (teacher.source: diffusers) can be exported")
    if meta.schedule != "discrete" or tuple(meta.discrete_betas) != tuple(meta.model.diffusers_betas):
        raise ExportError(f"{path}: the run's noise schedule is not the network's own discrete schedule, so a "
                          "diffusers scheduler would feed it timesteps it never saw in distillation")
    if meta.model.parameterization not in PREDICTION_TYPE_OF:
        raise ExportError(f"{path}: parameterization {meta.model.parameterization!r} has no diffusers prediction_type")
    if meta.data.num_classes:
        raise ExportError(f"{path}: the student is class-conditional, and DDIMPipeline cannot pass class labels")
    total = len(meta.discrete_betas)
    if steps < 1 or total % steps:
        raise ExportError(f"{path}: {steps} steps do not divide the {total} training timesteps, so the step grid "
                          "t = i/N falls between the integer timesteps a diffusers scheduler uses")


def ddim_scheduler(meta: CheckpointMeta, *, clip_sample: bool = False):
    """The DDIMScheduler whose N-step grid is raypd's (see the module docstring)."""
    diffusers = require_diffusers()
    return diffusers.DDIMScheduler(
        num_train_timesteps=len(meta.discrete_betas), trained_betas=list(meta.discrete_betas),
        prediction_type=PREDICTION_TYPE_OF[meta.model.parameterization], clip_sample=clip_sample,
        set_alpha_to_one=True, steps_offset=0, timestep_spacing="trailing")


def verify_grid(scheduler, meta: CheckpointMeta, steps: int) -> None:
    """Fail unless the scheduler's N-step timesteps and alphas_cumprod are raypd's own."""
    total = len(meta.discrete_betas)
    scheduler.set_timesteps(steps)
    want = [i * total // steps - 1 for i in range(steps, 0, -1)]
    if scheduler.timesteps.tolist() != want:
        raise ExportError(f"the scheduler's {steps}-step timesteps {scheduler.timesteps.tolist()} are not raypd's {want}")
    logsnr_fn = make_logsnr_fn(meta.schedule, logsnr_min=meta.logsnr_min, logsnr_max=meta.logsnr_max,
                               betas=meta.discrete_betas)
    t = torch.arange(steps, 0, -1, dtype=torch.float64) / steps
    ours = torch.sigmoid(logsnr_fn(t))
    theirs = scheduler.alphas_cumprod[scheduler.timesteps].double()
    if not torch.equal(theirs, alphas_cumprod(meta.discrete_betas)[want].double()) or \
            not torch.allclose(ours, theirs, rtol=1e-6, atol=0):
        raise ExportError("the scheduler's alphas_cumprod at the student's steps differ from raypd's alpha^2")


def _find_fid(checkpoint: Path, meta: CheckpointMeta, steps: int) -> float | None:
    """FID of this student: from its metrics, else from its run's summary.json."""
    if "fid" in meta.metrics:
        return float(meta.metrics["fid"])
    summary = checkpoint.resolve().parent / "summary.json"
    try:
        rows = json.loads(summary.read_text()).get("eval", [])
    except (OSError, ValueError):
        return None
    for row in rows:
        if row.get("sampler") == "distilled" and row.get("steps") == steps and row.get("fid") is not None:
            return float(row["fid"])
    return None


def model_card(checkpoint: Path, meta: CheckpointMeta, steps: int, *, clip_sample: bool) -> str:
    """README.md: what the student is, where it came from, how to sample it as raypd does."""
    cfg = meta.config
    teacher, data, distill = cfg.get("teacher", {}), cfg.get("data", {}), cfg.get("distill", {})
    fid = _find_fid(checkpoint, meta, steps)
    extractor = "" if fid is None else f" ({cfg.get('eval', {}).get('extractor', '?')} features, " \
                                       f"{cfg.get('eval', {}).get('num_samples', '?')} samples)"
    source = teacher.get("diffusers_path") or teacher.get("checkpoint") or "trained by raypd"
    dataset = " ".join(str(v) for v in (data.get("source"), data.get("path")) if v)
    call = (f"pipe(batch_size=16, num_inference_steps={steps}, eta=0.0"
            + (", use_clipped_model_output=True" if clip_sample else "") + ")")
    return f"""---
library_name: diffusers
pipeline_tag: unconditional-image-generation
tags: [progressive-distillation, ddim, raypd]
---

# {steps}-step progressively distilled student

A diffusion model distilled with progressive distillation (Salimans & Ho, ICLR 2022) by raypd, to
sample in **{steps} DDIM step{'s' if steps != 1 else ''}**.

| | |
|---|---|
| sampling steps | {steps} (eta 0) |
| teacher | `{source}` ({len(meta.discrete_betas)} training timesteps, its own noise schedule) |
| distillation | {distill.get('start_steps', '?')} -> {steps} steps, halving each round{f", round {meta.round}" if meta.round is not None else ""} |
| output | `{PREDICTION_TYPE_OF[meta.model.parameterization]}` |
| data | {dataset or '?'} at {meta.data.channels}x{meta.data.resolution}x{meta.data.resolution} |
| FID | {'not measured' if fid is None else f'{fid:.3f}{extractor}'} |

```python
from diffusers import DDIMPipeline

pipe = DDIMPipeline.from_pretrained("path/to/this/directory")
images = {call}.images
```

`num_inference_steps` must be {steps}: the scheduler (DDIM, trailing timestep spacing, the teacher's
betas, final alpha 1) then lands on exactly the noise levels the student was distilled for, and the
samples equal raypd's own `ddim_sample` for the same initial noise ({'clipped, as raypd evaluates' if clip_sample
else 'unclipped; raypd evaluates with x_hat clipped to [-1, 1] at every step, which this scheduler does when exported with clip_sample and called with use_clipped_model_output=True'}).
Other step counts run the network on a grid it was not trained for.
"""


def export_student(checkpoint: str | Path, out: str | Path, *, steps: int | None = None,
                   clip_sample: bool = False, overwrite: bool = False) -> Path:
    """Write the student at ``checkpoint`` as a DDIMPipeline directory at ``out`` (atomically)."""
    checkpoint, out = Path(checkpoint), Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists (pass overwrite to replace it)")
    model, meta = load_checkpoint(checkpoint)
    steps = steps or meta.sampling_steps
    check_exportable(meta, steps, checkpoint)
    scheduler = ddim_scheduler(meta, clip_sample=clip_sample)
    verify_grid(scheduler, meta, steps)
    diffusers = require_diffusers()
    pipe = diffusers.DDIMPipeline(unet=model.backbone.unet, scheduler=scheduler)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / "README.md").write_text(model_card(checkpoint, meta, steps, clip_sample=clip_sample))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raypd export", description="Write a student as a diffusers DDIMPipeline.")
    parser.add_argument("--checkpoint", required=True, help="a raypd student checkpoint directory")
    parser.add_argument("--out", required=True, help="the pipeline directory to write")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the checkpoint's own)")
    parser.add_argument("--clip-sample", action="store_true",
                        help="write clip_sample=true (raypd's clipped sampler, with use_clipped_model_output=True)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    args = parser.parse_args(argv)
    try:
        out = export_student(args.checkpoint, args.out, steps=args.steps, clip_sample=args.clip_sample,
                             overwrite=args.overwrite)
    except CheckpointError as err:
        print(f"export error: {err}", file=sys.stderr)
        return 2
    except ImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0
