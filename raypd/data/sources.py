"""Random-access readers for the image data-set layouts the shard writer accepts.

Every reader returns a :class:`Source`: ``source[i]`` is ``(image, label)`` with ``image`` a uint8
array H x W x C (C = 1 or 3) and ``label`` an int or None, plus the class names and where the data
came from. Random access (rather than a stream) lets the writer shuffle before it decodes anything.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

Sample = tuple[np.ndarray, int | None]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
KINDS = ("folder", "cifar", "npz", "mnist", "lsun")
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


@dataclass(frozen=True)
class Source:
    """A data set as ``len(source)`` samples, ``source[i] -> (image uint8 HxWxC, label | None)``."""

    kind: str
    path: str
    length: int
    read: Callable[[int], Sample] = field(repr=False)
    classes: tuple[str, ...] | None = None
    num_classes: int = 0  # 0 means unlabelled
    extra: dict = field(default_factory=dict)  # more provenance for the manifest (e.g. a labels file)
    noise: Callable[[int], np.ndarray] | None = field(default=None, repr=False)
    """Pair data sets: sample i's noise (float32 [C, H, W]), from which the image was sampled."""

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.length:
            raise IndexError(f"sample {index} out of range for {self.length} samples")
        return self.read(index)

    def __iter__(self) -> Iterator[Sample]:
        return (self.read(i) for i in range(self.length))

    @property
    def description(self) -> dict:
        return {"kind": self.kind, "path": self.path, **self.extra}


def pil_to_array(im: Image.Image) -> np.ndarray:
    """Pillow image -> uint8 HxWx1 (grey) or HxWx3; alpha, palettes and CMYK become RGB."""
    if im.mode in _GREY_MODES:
        return np.asarray(im.convert("L"), dtype=np.uint8)[..., None]
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def decode_image(data: bytes, what: str) -> np.ndarray:
    """Encoded image bytes -> array; ``what`` names the sample in the error."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return pil_to_array(im)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot decode image {what}: {e}") from e


def _array_source(kind: str, path: Path, x: np.ndarray, y: np.ndarray | None,
                  classes: tuple[str, ...] | None, extra: dict | None = None) -> Source:
    """A source over images already in memory as uint8 (N,H,W) or (N,H,W,C)."""
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3) or x.dtype != np.uint8:
        raise ValueError(f"{path}: images must be uint8 (N,H,W) or (N,H,W,1|3), got {x.dtype} {x.shape}")
    if y is not None:
        y = np.asarray(y).reshape(-1).astype(np.int64)
        if len(y) != len(x):
            raise ValueError(f"{path}: {len(x)} images but {len(y)} labels")
        if len(y) and y.min() < 0:
            raise ValueError(f"{path}: negative labels")
    num_classes = len(classes) if classes else (int(y.max()) + 1 if y is not None and len(y) else 0)
    return Source(kind, str(path.resolve()), len(x),
                  lambda i: (x[i], None if y is None else int(y[i])),
                  classes, num_classes, extra or {})


def _folder_source(path: Path) -> Source:
    """Flat folder (unlabelled) or one sub-folder per class (labels = sorted folder index)."""
    if not path.is_dir():
        raise ValueError(f"folder source must be a directory: {path}")

    def visible(p: Path) -> bool:
        return not p.name.startswith(".")

    def is_image(p: Path) -> bool:
        return p.is_file() and visible(p) and p.suffix.lower() in IMAGE_EXTENSIONS

    class_dirs = sorted((d for d in path.iterdir() if d.is_dir() and visible(d)), key=lambda d: d.name)
    loose = sorted(p for p in path.iterdir() if is_image(p))
    if class_dirs and loose:
        raise ValueError(f"{path} holds both loose images and sub-folders: use one layout")
    if class_dirs:
        files, labels = [], []
        for label, d in enumerate(class_dirs):
            found = sorted(p for p in d.rglob("*") if is_image(p) and
                           not any(part.startswith(".") for part in p.relative_to(d).parts))
            files += found
            labels += [label] * len(found)
        classes: tuple[str, ...] | None = tuple(d.name for d in class_dirs)
    else:
        files, labels, classes = loose, [], None
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {path}")

    def read(i: int) -> Sample:
        return decode_image(files[i].read_bytes(), str(files[i])), (labels[i] if classes else None)

    return Source("folder", str(path.resolve()), len(files), read, classes, len(classes or ()))


class _ArraysOnly(pickle.Unpickler):
    """An unpickler that rebuilds dicts, lists, strings and numpy arrays and refuses anything else.

    CIFAR ships only as Python pickles. A plain ``pickle.load`` would run whatever code a doctored
    file names; this one only resolves the few numpy constructors an array needs.
    """

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR batch holds only arrays and lists")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return _ArraysOnly(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError) as e:
        raise ValueError(f"{path} is not a CIFAR pickle: {e}") from e


def _cifar_source(path: Path) -> Source:
    """CIFAR-10 (``batches.meta``, data_batch_N / test_batch) or CIFAR-100 (``meta``, train / test).

    A directory reads the training batches; a batch file reads just that file (e.g. the test set).
    """
    folder = path if path.is_dir() else path.parent
    if (folder / "batches.meta").exists():
        meta, names_key, labels_key, train = "batches.meta", b"label_names", b"labels", "data_batch_*"
    elif (folder / "meta").exists():
        meta, names_key, labels_key, train = "meta", b"fine_label_names", b"fine_labels", "train"
    else:
        raise ValueError(f"{folder} is not a CIFAR python directory (no batches.meta or meta file)")
    files = sorted(folder.glob(train), key=lambda p: (len(p.name), p.name)) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"no CIFAR training batches ({train}) in {folder}")
    xs, ys = [], []
    for f in files:
        batch = _unpickle(f)
        if b"data" not in batch or labels_key not in batch:
            raise ValueError(f"{f} is not a CIFAR batch (needs b'data' and {labels_key!r})")
        xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(batch[labels_key], dtype=np.int64))
    names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in _unpickle(folder / meta)[names_key])
    return _array_source("cifar", path, np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys), names)


def _npz_source(path: Path) -> Source:
    """``.npz`` with ``x`` (N,H,W[,C]) uint8, optional ``y`` and optional ``classes`` (strings)."""
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path} as npz: {e}") from e
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is a single .npy array, not an .npz archive with 'x'")
    with data:
        if "x" not in data.files:
            raise ValueError(f"{path} has no 'x' array (found {data.files})")
        try:
            x = data["x"]
            y = data["y"] if "y" in data.files else None
            classes = tuple(str(c) for c in data["classes"]) if "classes" in data.files else None
        except ValueError as e:  # object arrays refuse to load without pickle, which stays off
            raise ValueError(f"{path}: {e} (store classes as a fixed-width string array)") from e
    return _array_source("npz", path, x, y, classes)


_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (the MNIST format), gzip-compressed or not."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # sniff gzip rather than trust the file name
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic {raw[:4]!r})")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    need = int(np.prod(dims)) * dtype.itemsize
    body = raw[4 + 4 * ndim:]
    if len(body) != need:
        raise ValueError(f"{path}: header says {dims} ({need} bytes) but holds {len(body)} bytes")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def _mnist_source(path: Path, labels_path: Path | None) -> Source:
    """MNIST-style IDX images; labels from ``labels_path`` or the sibling ``*labels-idx1*`` file."""
    if labels_path is None and "images-idx3" in path.name:
        # the canonical file pairs differ only in this part of the name; picking it up avoids
        # silently writing unlabelled MNIST when --labels is forgotten
        sibling = path.with_name(path.name.replace("images-idx3", "labels-idx1"))
        labels_path = sibling if sibling.exists() else None
    if labels_path is not None and not labels_path.exists():
        raise FileNotFoundError(f"mnist labels file not found: {labels_path}")
    x = read_idx(path)
    if x.dtype != np.uint8 or x.ndim != 3:
        raise ValueError(f"{path}: expected uint8 images (N,H,W), got {x.dtype} {x.shape}")
    y = read_idx(labels_path) if labels_path is not None else None
    extra = {"labels": str(labels_path.resolve())} if labels_path is not None else {}
    return _array_source("mnist", path, x, y, None, extra)


def _lsun_source(path: Path) -> Source:
    """An LSUN lmdb export: keys are sample ids, values encoded images (webp or jpeg)."""
    try:
        import lmdb
    except ImportError as e:
        raise ImportError("reading LSUN lmdb exports needs the optional 'lmdb' package: "
                          "pip install lmdb") from e
    env = lmdb.open(str(path), subdir=path.is_dir(), readonly=True, lock=False,
                    readahead=False, meminit=False)
    with env.begin(write=False) as txn:
        keys = list(txn.cursor().iternext(keys=True, values=False))
    if not keys:
        raise ValueError(f"no samples in lmdb {path}")

    def read(i: int) -> Sample:
        with env.begin(write=False) as txn:
            data = txn.get(keys[i])
        return decode_image(data, f"{path}:{keys[i].decode(errors='replace')}"), None

    return Source("lsun", str(path.resolve()), len(keys), read)


def open_source(kind: str, path: str | os.PathLike, labels_path: str | os.PathLike | None = None) -> Source:
    """Open a data set of the given ``kind`` (one of :data:`KINDS`) at ``path``.

    ``labels_path`` is used by ``mnist`` only (the IDX labels file).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown source kind {kind!r}; expected one of {', '.join(KINDS)}")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{kind} source not found: {p}")
    if labels_path is not None and kind != "mnist":
        raise ValueError(f"a separate labels file is only used for mnist, not {kind}")
    if kind == "folder":
        return _folder_source(p)
    if kind == "cifar":
        return _cifar_source(p)
    if kind == "npz":
        return _npz_source(p)
    if kind == "mnist":
        return _mnist_source(p, Path(labels_path) if labels_path is not None else None)
    return _lsun_source(p)
