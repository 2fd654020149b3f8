"""A diffusers pipeline that samples a raypd student exactly as raypd's DDIM sampler does.

This file is copied into every exported pipeline directory that a stock ``DDIMPipeline`` cannot
sample exactly: class-conditional students (``DDIMPipeline`` passes no labels) and students with
the paper's combined x/eps output (``both``) at more than one step. diffusers loads it from that
directory (``DiffusionPipeline.from_pretrained(path, trust_remote_code=True)``); it imports nothing
but torch and diffusers.

A guided distillation's student (it takes the classifier-free guidance weight as an input) comes with a
``guidance`` component (``guidance/raypd_guidance.py``) that embeds the labels and the weight; the pipeline
then takes ``guidance_scale`` in diffusers' convention, 1 + w: 1 is the plain conditional model.

Each step turns the network's output into x_hat with the student's own parameterization, then
lets the stock ``DDIMScheduler`` (``prediction_type="sample"``) take the DDIM step from x_hat,
clipping x_hat and re-deriving eps from it when ``clip`` is on, as raypd does. (No ``from __future__
import annotations``: diffusers reads the constructor's annotations as types when it loads the class.)
"""

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

PARAMETERIZATIONS = ("eps", "x", "v", "both")


def x_from_output(output: torch.Tensor, z: torch.Tensor, alpha_sq: torch.Tensor, parameterization: str) -> torch.Tensor:
    """x_hat from the raw network output at a noise level with alpha^2 = ``alpha_sq`` (raypd's definitions)."""
    alpha, sigma = alpha_sq.sqrt(), (1 - alpha_sq).sqrt()
    if parameterization == "both":  # x_hat = sigma^2 x_out + alpha (z - sigma eps_out)
        x_out, eps_out = output.chunk(2, dim=1)
        return sigma**2 * x_out + alpha * (z - sigma * eps_out)
    if parameterization == "eps":
        return (z - sigma * output) / alpha
    if parameterization == "v":
        return alpha * z - sigma * output
    return output


class RaypdDDIMPipeline(DiffusionPipeline):
    """Deterministic DDIM sampling of a progressively distilled student, with optional class labels."""

    model_cpu_offload_seq = "unet"
    _optional_components = ["guidance"]

    def __init__(self, unet, scheduler, parameterization: str = "x", sampling_steps: int = 1, guidance=None):
        super().__init__()
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")
        if scheduler.config.prediction_type != "sample":
            raise ValueError("the scheduler must take x_hat (prediction_type 'sample'); this pipeline computes it")
        self.register_modules(unet=unet, scheduler=scheduler, guidance=guidance)
        self.register_to_config(parameterization=parameterization, sampling_steps=sampling_steps)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, class_labels=None, generator=None, num_inference_steps: int | None = None,
                 output_type: str = "pil", return_dict: bool = True, guidance_scale: float | None = None):
        """Sample ``batch_size`` images (or one per label in ``class_labels``) in the student's steps.

        ``guidance_scale`` (a guided distillation's student only): 1 + w, the classifier-free guidance weight the
        student samples at, within the range it was distilled over. ``output_type``: "pil" or "np" (images in
        [0, 1], as DDIMPipeline) or "pt" (the samples in [-1, 1] as raypd returns them, not clamped).
        """
        unet, scheduler, guidance = self.unet, self.scheduler, self.guidance
        if guidance is not None and guidance_scale is None:
            raise ValueError("this student takes the guidance weight as an input: pass guidance_scale (1 + w)")
        if guidance is None and guidance_scale is not None:
            raise ValueError("this student was not distilled with guidance: guidance_scale cannot be used")
        if guidance is not None and guidance_scale < 1:
            raise ValueError(f"guidance_scale is 1 + w with w >= 0, got {guidance_scale}")
        classes = guidance.config.num_classes if guidance is not None else unet.config.num_class_embeds
        if classes:
            if class_labels is None:
                raise ValueError(f"this student is class-conditional ({classes} classes): pass class_labels")
            labels = torch.as_tensor(class_labels, device=self._execution_device).long().reshape(-1)
            if labels.numel() == 1 and batch_size > 1:
                labels = labels.expand(batch_size)
            batch_size = labels.numel()
            if labels.min() < 0 or labels.max() >= classes:
                raise ValueError(f"class_labels must lie in [0, {classes}), got {labels.tolist()}")
        elif class_labels is not None:
            raise ValueError("this student is unconditional: class_labels cannot be used")
        else:
            labels = None
        size = unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch_size, unet.config.in_channels, *size)
        z = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=unet.dtype)
        scheduler.set_timesteps(num_inference_steps or self.config.sampling_steps)
        alphas = scheduler.alphas_cumprod.to(z.device)
        if guidance is not None:  # the UNet adds the embedded (label, w) to its time embedding
            w = torch.full((batch_size,), float(guidance_scale) - 1.0, device=z.device)
            labels = guidance(labels, w)
        for t in self.progress_bar(scheduler.timesteps):
            output = unet(z, t, class_labels=labels, return_dict=False)[0]
            x_hat = x_from_output(output.to(z.dtype), z, alphas[t], self.config.parameterization)
            z = scheduler.step(x_hat, t, z, eta=0.0, use_clipped_model_output=True).prev_sample
        if output_type == "pt":
            images = z
        else:
            images = (z / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
