"""The network's step time against raypd's former hand-written UNet at the same size, measured in one run.

The former implementation is read from the repository's history (``git show REV:raypd/models/unet.py``,
the last commit that had it by default), loaded as a throwaway module, and timed interleaved with
today's UNet2DModel backbone on the same inputs: forward + backward (a training step's network
cost) and forward alone (sampling). Prints milliseconds per call and the ratio new / old.

    python tools/bench_backbone.py [--rev e2c56d3] [--threads 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from raypd.config import DataConfig, ModelConfig
from raypd.models.unet import build_unet

ROOT = Path(__file__).resolve().parents[1]
SIZES = [  # (label, ModelConfig kwargs, resolution, channels, batch, timed calls)
    ("local default", dict(ch=32, ch_mult=(1, 2), attn_resolutions=(8,), num_res_blocks=1, head_channels=32), 16, 1, 32, 20),
    ("local_cifar10", dict(ch=64, ch_mult=(1, 2, 2), attn_resolutions=(16,), num_res_blocks=2, head_channels=64), 32, 3, 16, 8),
]


def former_unet(rev: str):
    source = subprocess.run(["git", "show", f"{rev}:raypd/models/unet.py"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout
    path = Path(tempfile.mkdtemp()) / "former_unet.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("former_unet", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.UNet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default="e2c56d3", help="a commit that has the former raypd/models/unet.py")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    Former = former_unet(args.rev)
    print(f"device cpu, {args.threads} threads; median ms per call, interleaved")
    for label, kw, res, channels, batch, iters in SIZES:
        model, data = ModelConfig(parameterization="x", dropout=0.0, **kw), DataConfig(resolution=res, channels=channels)
        torch.manual_seed(0)
        old = Former(in_channels=channels, out_channels=channels, resolution=res, ch=model.ch, ch_mult=model.ch_mult,
                     num_res_blocks=model.num_res_blocks, attn_resolutions=model.attn_resolutions, dropout=0.0,
                     head_channels=model.head_channels, resblock_updown=True)
        new = build_unet(model, data)
        assert sum(p.numel() for p in old.parameters()) == sum(p.numel() for p in new.parameters())
        z, logsnr = torch.randn(batch, channels, res, res), torch.randn(batch)

        def train(net):
            net(z, logsnr).square().mean().backward()

        def sample(net):
            with torch.inference_mode():
                net(z, logsnr)

        for kind, call in (("fwd+bwd", train), ("fwd", sample)):
            for _ in range(2):
                call(old), call(new)
            times: dict[str, list[float]] = {"old": [], "new": []}
            for _ in range(iters):
                for name, net in (("old", old), ("new", new)):
                    start = time.perf_counter()
                    call(net)
                    times[name].append(time.perf_counter() - start)
            o, n = statistics.median(times["old"]), statistics.median(times["new"])
            print(f"{label:>14} ({sum(p.numel() for p in new.parameters()) / 1e6:.2f}M params, batch {batch} at {res}px) "
                  f"{kind:>7}: former {o * 1e3:7.1f}  UNet2DModel {n * 1e3:7.1f}  ratio {n / o:.3f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
