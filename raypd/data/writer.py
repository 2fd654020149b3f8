"""Turn an image data set into WebDataset tar shards plus a ``manifest.json`` (the paper's preprocessing).

Each sample is centre-cropped to a square and resized with an antialiasing filter (bicubic, or box
for ImageNet-64 style downsampling), shuffled with a fixed seed, optionally split into train and
held-out sets, and written as ``{split}-{n:06d}.tar`` shards. The manifest is written last and
atomically: it is the commit point, so an interrupted run never leaves one that names missing shards.

Command line: ``python -m raypd.data.writer KIND PATH --out DIR [...]`` (or ``tools/make_shards.py``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from raypd.data.decode import NOISE_KEY
from raypd.data.sources import KINDS, Source, open_source

MANIFEST = "manifest.json"
FORMAT, VERSION = "raypd-shards", 1
IMAGE_FORMATS = ("png", "jpg")
_SHARD_NAME = re.compile(r"^(train|heldout)-\d{6}\.tar$")
_MTIME = 0.0  # fixed tar timestamps: the same input and seed give byte-identical shards


def preprocess(image: np.ndarray, resolution: int | None = None, channels: int | None = None,
               box: bool = False) -> np.ndarray:
    """Centre square crop, antialiased resize to ``resolution`` and grey<->RGB conversion.

    ``image`` is uint8 HxW or HxWxC (C = 1 or 3); returns uint8 RxRxC'. Without ``resolution``
    the image keeps its size and is not cropped.
    """
    if image.ndim == 2:
        image = image[..., None]
    if channels == 1 and image.shape[-1] == 3:  # convert before resizing: a third of the work
        image = np.asarray(Image.fromarray(image).convert("L"))[..., None]
    if resolution is not None:
        h, w = image.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        image = image[top:top + side, left:left + side]
        if side != resolution:
            # box averaging only makes sense when shrinking; enlarging always uses bicubic
            resample = Image.BOX if box and side > resolution else Image.BICUBIC
            grey = image.shape[-1] == 1
            im = Image.fromarray(image[..., 0] if grey else image)
            im = im.resize((resolution, resolution), resample, reducing_gap=None)
            image = np.asarray(im)[..., None] if grey else np.asarray(im)
    if channels == 3 and image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return np.ascontiguousarray(image)


def encode_image(image: np.ndarray, image_format: str = "png", quality: int = 95) -> bytes:
    """uint8 HxWx1|3 -> PNG (lossless) or JPEG bytes."""
    im = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    buf = io.BytesIO()
    if image_format == "png":
        im.save(buf, format="PNG")
    else:
        # no chroma subsampling: at 32-64 px, 4:2:0 visibly smears colour edges
        im.save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def split_order(n: int, seed: int = 0, heldout: float = 0, limit: int | None = None) -> dict[str, np.ndarray]:
    """Seeded permutation of ``range(n)``, cut to ``limit``, then split into train / heldout indices.

    ``heldout`` is a count (an integer >= 1) or a fraction in (0, 1) of the samples kept.
    """
    order = np.random.default_rng(seed).permutation(n)[:limit]
    if heldout < 0 or (heldout >= 1 and heldout != int(heldout)):
        raise ValueError(f"heldout must be a count or a fraction in (0, 1), got {heldout}")
    n_held = max(1, round(heldout * len(order))) if 0 < heldout < 1 else int(heldout)
    if n_held >= len(order):
        raise ValueError(f"heldout {n_held} leaves no training samples out of {len(order)}")
    splits = {"train": order[n_held:]}
    if n_held:
        splits["heldout"] = order[:n_held]
    return splits


@dataclass
class _SampleEncoder:
    """Reads, preprocesses and encodes one sample; checks every image comes out the same shape."""

    source: Source
    resolution: int | None
    channels: int | None
    image_format: str
    quality: int
    box: bool
    shape: tuple[int, ...] | None = None

    def __call__(self, index: int) -> dict:
        image, label = self.source[index]
        out = preprocess(image, self.resolution, self.channels, self.box)
        if self.shape is None:
            if out.shape[0] != out.shape[1]:
                raise ValueError(f"sample {index} is {out.shape[0]}x{out.shape[1]}, not square: "
                                 "pass a resolution (--resolution) to centre-crop and resize")
            self.shape = out.shape
        elif out.shape != self.shape:
            what = "sizes" if out.shape[:2] != self.shape[:2] else "channel counts"
            fix = "a resolution (--resolution)" if what == "sizes" else "channels (--channels)"
            raise ValueError(f"mixed image {what}: sample {index} is {'x'.join(map(str, out.shape))}, "
                             f"earlier ones {'x'.join(map(str, self.shape))}; pass {fix}")
        sample = {"__key__": f"{index:08d}", self.image_format: encode_image(out, self.image_format, self.quality)}
        if label is not None:
            sample["cls"] = str(int(label)).encode("ascii")
        if self.source.noise is not None:
            buffer = io.BytesIO()
            np.save(buffer, np.ascontiguousarray(self.source.noise(index), dtype=np.float32), allow_pickle=False)
            sample[NOISE_KEY] = buffer.getvalue()
        return sample


def _write_split(out: Path, split: str, indices: np.ndarray, encode: _SampleEncoder, shard_size: int,
                 bar: tqdm, written: list[Path]) -> dict:
    shards = []
    for number, start in enumerate(range(0, len(indices), shard_size)):
        chunk = indices[start:start + shard_size]
        path = out / f"{split}-{number:06d}.tar"
        written.append(path)
        with open(path, "wb") as f:
            with wds.TarWriter(f, encoder=False, mtime=_MTIME) as sink:
                for index in chunk:
                    sink.write(encode(int(index)))
                    bar.update(1)
            f.flush()
            os.fsync(f.fileno())  # the shard must be on disk before a manifest can name it
        shards.append({"name": path.name, "count": len(chunk)})
    return {"count": len(indices), "shards": shards}


def _write_manifest(out: Path, manifest: dict) -> None:
    tmp = out / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / MANIFEST)


def _check_options(resolution: int | None, channels: int | None, image_format: str, quality: int,
                   shard_size: int, limit: int | None) -> None:
    if resolution is not None and resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image format must be one of {', '.join(IMAGE_FORMATS)}, got {image_format!r}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    if shard_size < 1:
        raise ValueError(f"shard size must be positive, got {shard_size}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")


def write_shards(source: Source, out_dir: str | os.PathLike, *, resolution: int | None = None,
                 channels: int | None = None, image_format: str = "png", quality: int = 95,
                 shard_size: int = 5000, seed: int = 0, heldout: float = 0, box: bool = False,
                 limit: int | None = None, progress: bool = True) -> dict:
    """Write ``source`` as shuffled WebDataset shards and ``manifest.json`` in ``out_dir``; return the manifest.

    Shards of an earlier run in ``out_dir`` (``train-*.tar`` / ``heldout-*.tar``) that this run does
    not overwrite are deleted once the new manifest is in place.
    """
    _check_options(resolution, channels, image_format, quality, shard_size, limit)
    if len(source) == 0:
        raise ValueError(f"{source.path} has no samples")
    splits = split_order(len(source), seed, heldout, limit)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the old manifest would name shards about to be replaced
    encode = _SampleEncoder(source, resolution, channels, image_format, quality, box)
    written: list[Path] = []
    try:
        with tqdm(total=sum(map(len, splits.values())), desc=f"shards -> {out}", unit="img",
                  file=sys.stderr, disable=not progress) as bar:
            split_info = {name: _write_split(out, name, idx, encode, shard_size, bar, written)
                          for name, idx in splits.items()}
    except BaseException:
        for path in written:  # unreferenced without a manifest; don't leave half a data set behind
            path.unlink(missing_ok=True)
        raise
    assert encode.shape is not None
    manifest = {
        "format": FORMAT, "version": VERSION, "resolution": encode.shape[0], "channels": encode.shape[2],
        "num_classes": source.num_classes, "classes": list(source.classes) if source.classes else None,
        "image_format": image_format, "source": source.description, "seed": seed, "splits": split_info,
        "preprocess": {"crop": "center" if resolution else None,
                       "resize": ("box" if box else "bicubic") if resolution else None,
                       "quality": quality if image_format == "jpg" else None},
    }
    if source.noise is not None:  # only pair shards say so: an image data set's manifest (and key) is unchanged
        manifest["pairs"] = {"noise": NOISE_KEY}
    _write_manifest(out, manifest)
    keep = {path.name for path in written}
    for stale in out.iterdir():
        if _SHARD_NAME.match(stale.name) and stale.name not in keep:
            stale.unlink()
    return manifest


class _UsageError(ValueError):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # report bad arguments like any other bad input: one line, rc 2
        raise _UsageError(message)


def _count_or_fraction(text: str) -> float:
    value = float(text)
    return int(value) if value >= 1 and value == int(value) else value


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="make_shards", description="Write an image data set as WebDataset shards.")
    p.add_argument("kind", help=f"source layout: {', '.join(KINDS)}")
    p.add_argument("path", help="data set file or directory")
    p.add_argument("--out", required=True, help="output directory for the shards and manifest.json")
    p.add_argument("--labels", help="labels file (mnist IDX labels)")
    p.add_argument("--resolution", type=int, help="centre-crop and resize to R x R (default: keep native size)")
    p.add_argument("--channels", type=int, choices=(1, 3), help="convert to grey (1) or RGB (3)")
    p.add_argument("--format", dest="image_format", choices=IMAGE_FORMATS, default="png")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality (jpg only)")
    p.add_argument("--shard-size", type=int, default=5000, help="samples per shard")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed")
    p.add_argument("--heldout", type=_count_or_fraction, default=0,
                   help="held-out samples: a count, or a fraction such as 0.05")
    p.add_argument("--box", action="store_true", help="box-filter downsampling (ImageNet 64 style)")
    p.add_argument("--limit", type=int, help="keep only the first N samples after shuffling")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns 0 on success, 2 on bad input (one ``error:`` line on stderr)."""
    parser = _parser()
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help
            return int(e.code or 0)
        source = open_source(args.kind, args.path, args.labels)
        manifest = write_shards(source, args.out, resolution=args.resolution, channels=args.channels,
                                image_format=args.image_format, quality=args.quality,
                                shard_size=args.shard_size, seed=args.seed, heldout=args.heldout,
                                box=args.box, limit=args.limit)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    counts = ", ".join(f"{info['count']} {name}" for name, info in manifest["splits"].items())
    print(f"wrote {counts} samples ({manifest['resolution']}px, {manifest['channels']} ch) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
