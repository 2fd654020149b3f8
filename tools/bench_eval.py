"""Images per second of raypd's chunked evaluation against a bare loop of the same work, in the same run.

raypd's path is the one a run's evaluation takes in one process: the point cut into chunks of fixed noise
(``raypd.eval.chunks``), each sampled by DDIM, turned into uint8 and passed through the feature extractor,
folded in by ``collect``, and scored (FID and KID against cached reference statistics) by the run's FID
set-up. The floor does the same work written out: the same network and step count in a plain DDIM loop over
batches, torch-fidelity's feature extractor on the uint8 images, and FID and KID from the features. The
reference statistics are computed before either is timed. Goal: raypd within 1.10x of the floor.

    python tools/bench_eval.py [--extractor inception|classifier] [--n 512] [--steps 4] [--batch 256]
        [--inception-weights PATH] [--device cpu|cuda] [--precision fp32|bf16] [--repeats 2]

Inception costs about 0.15 s per image on a CPU. On a GPU pass --device cuda and --precision bf16 (the
network's forward under bf16 autocast, as eval.precision=auto does there; the extractor stays fp32).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from raypd.config import load_config
from raypd.data.prepare import training_shards
from raypd.data.shards import read_manifest
from raypd.eval.chunks import chunks_for, collect, run_here
from raypd.eval.fid import Extractor, extract_features, to_uint8
from raypd.eval.samples import fixed_noise
from raypd.eval.setup import fid_setup
from raypd.models import build_denoiser

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO.parent / "shared" / "assets" / "inception-2015-12-05-fid2048-nofc.pth"


def floor(model, cfg, n: int, steps: int, batch: int, extractor: Extractor, reference, spec, device, dtype):
    """The same samples, features and scores, written out with nothing of raypd's evaluation in the way."""
    from torch_fidelity.metric_fid import fid_featuresdict_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import kid_featuresdict_to_metric

    from torch_fidelity.utils import create_feature_extractor, resolve_feature_extractor

    from raypd.eval.fid import _fidelity_kwargs, _layers, _reference_features

    d = cfg.data
    z_all, y_all = fixed_noise(n, d.channels, d.resolution, seed=spec.seed, num_classes=d.num_classes)
    logsnr = cfg.diffusion.logsnr_fn()
    kwargs = _fidelity_kwargs(extractor, kid=True, prc=False, n=min(n, len(reference)))
    layers = _layers(kwargs)
    names = sorted(set(layers.values()))
    net = create_feature_extractor(resolve_feature_extractor(**kwargs), names, **kwargs).eval()
    feats = {k: [] for k in names}
    for start in range(0, n, batch):
        z = z_all[start:start + batch].to(device)
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            for i in range(steps, 0, -1):
                t, s = torch.tensor(i / steps), torch.tensor((i - 1) / steps)
                lt, ls = logsnr(t), logsnr(s)
                a_t, s_t, a_s, s_s = lt.sigmoid().sqrt(), (-lt).sigmoid().sqrt(), ls.sigmoid().sqrt(), (-ls).sigmoid().sqrt()
                x = model(z, lt.expand(z.shape[0]).to(device)).float().clamp(-1, 1)
                z = x if i == 1 else a_s * x + s_s * (z - a_t * x) / s_t
        images = to_uint8(z.cpu())
        if extractor.kind == "inception" and images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        with torch.inference_mode():
            for lo in range(0, images.shape[0], kwargs["batch_size"]):
                for key, value in zip(names, net(images[lo:lo + kwargs["batch_size"]].to(device))):
                    feats[key].append(value.cpu())
    features = {k: torch.cat(v) for k, v in feats.items()}
    ref = _reference_features(reference, kwargs, Path(spec.cache_root), spec.cache_name)
    fid = fid_statistics_to_metric(fid_featuresdict_to_statistics(features, layers["fid"]),
                                   fid_featuresdict_to_statistics(ref, layers["fid"]), False)["frechet_inception_distance"]
    kid_featuresdict_to_metric(features, ref, layers["kid"], **kwargs)
    return float(fid)


def raypd_path(model, cfg, n: int, steps: int, batch: int, spec, reference, device, precision: str):
    d = cfg.data
    chunk = max(256, -(-batch // 256) * 256)
    chunks = chunks_for(n, "ddim", steps, data=d, seed=spec.seed, precision=precision, extractor=spec.extractor,
                        kid=True, prc=False, chunk_size=chunk)
    point = collect(run_here(model, chunks, logsnr_fn=cfg.diffusion.logsnr_fn(), device=device), n=n,
                    shape=(d.channels, d.resolution, d.resolution), grid_size=0, full=None)
    return spec.score(features=point.features, reference=reference)["fid"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extractor", choices=("inception", "classifier"), default="inception")
    parser.add_argument("--inception-weights", default=str(WEIGHTS) if WEIGHTS.is_file() else "")
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=256, help="images per forward (raypd: the chunk size)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="config overrides (the network; default: configs/local.yaml's)")
    args = parser.parse_args()
    device = torch.device(args.device)
    overrides = [f"eval.extractor={args.extractor}", f"eval.num_samples={args.n}", "eval.classifier_updates=200",
                 *([f"eval.inception_weights={args.inception_weights}"] if args.inception_weights else []),
                 *args.overrides]
    cfg = load_config(REPO / "configs" / "local.yaml", overrides)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        urls = training_shards(cfg.data, run / "data", seed=0)
        spec = fid_setup(cfg, urls, read_manifest(urls), run)
        reference = spec.reference()
        torch.manual_seed(0)
        model = build_denoiser(cfg.model, cfg.data).to(device).eval()
        spec.score(features=extract_features(torch.zeros(2, *model_shape(cfg), dtype=torch.uint8), spec.extractor),
                   reference=reference)  # the reference statistics, cached before anything is timed
        dtype = torch.bfloat16 if args.precision == "bf16" else None
        times = {"floor": [], "raypd": []}
        fids = {}
        for _ in range(args.repeats):
            for name in ("floor", "raypd"):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                began = time.perf_counter()
                if name == "floor":
                    fids[name] = floor(model, cfg, args.n, args.steps, args.batch, spec.extractor, reference, spec,
                                       device, dtype)
                else:
                    fids[name] = raypd_path(model, cfg, args.n, args.steps, args.batch, spec, reference, device,
                                            args.precision)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - began)
    f, r = statistics.median(times["floor"]), statistics.median(times["raypd"])
    print(f"device {device}, {args.extractor} features, {args.n} samples at {args.steps} DDIM steps, batch {args.batch}, "
          f"{args.precision} network, median of {args.repeats}", file=sys.stderr)
    print(f"floor (plain DDIM loop + torch-fidelity extractor + FID/KID): {args.n / f:8.1f} images/s ({f:.1f} s)")
    print(f"raypd chunked evaluation:                                  {args.n / r:8.1f} images/s ({r:.1f} s)")
    print(f"ratio raypd / floor (time): {r / f:.3f}   (FID {fids['raypd']:.3f} vs the floor's {fids['floor']:.3f})")


def model_shape(cfg) -> tuple[int, int, int]:
    d = cfg.data
    return d.channels, d.resolution, d.resolution


if __name__ == "__main__":
    main()
