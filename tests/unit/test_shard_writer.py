"""The WebDataset shard writer: sources -> preprocessed, shuffled shards + manifest, read back independently."""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import os
import pickle
import runpy
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from raypd.data.sources import open_source
from raypd.data.writer import main, write_shards
from tests.assets import asset

REPO = Path(__file__).resolve().parents[2]


def _read_tar(path: Path) -> list[dict]:
    """Samples of one shard in stored order, grouped by key, without webdataset."""
    samples: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
    return list(samples.values())


def _read_split(out: Path, manifest: dict, split: str) -> list[dict]:
    """All samples of a split, checking each shard holds the count the manifest gives it."""
    samples = []
    for shard in manifest["splits"][split]["shards"]:
        got = _read_tar(out / shard["name"])
        assert len(got) == shard["count"], shard
        samples += got
    assert len(samples) == manifest["splits"][split]["count"]
    return samples


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def _npz(tmp_path: Path, n: int = 50, shape=(8, 8, 3), labelled: bool = True) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    y = rng.integers(0, 5, n)
    path = tmp_path / "data.npz"
    arrays = {"x": x, "y": y, "classes": np.array(list("abcde"))} if labelled else {"x": x}
    np.savez(path, **arrays)
    return path, x, y


def _write(source, out: Path, **kw) -> dict:
    return write_shards(source, out, progress=False, **kw)


def test_npz_round_trip_pixels_labels_keys_and_manifest(tmp_path):
    path, x, y = _npz(tmp_path)
    out = tmp_path / "shards"
    manifest = _write(open_source("npz", path), out, shard_size=16, heldout=10)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert (manifest["format"], manifest["version"], manifest["resolution"], manifest["channels"]) == \
        ("raypd-shards", 1, 8, 3)
    assert manifest["num_classes"] == 5 and manifest["classes"] == list("abcde")
    assert manifest["source"] == {"kind": "npz", "path": str(path.resolve())}
    assert [s["count"] for s in manifest["splits"]["train"]["shards"]] == [16, 16, 8]
    train, held = _read_split(out, manifest, "train"), _read_split(out, manifest, "heldout")
    keys = [s["__key__"] for s in train + held]
    assert len(set(keys)) == len(keys) == 50 and all("." not in k and len(k) == 8 for k in keys)
    assert {int(k) for k in keys} == set(range(50))  # disjoint and together complete
    for s in train + held:
        i = int(s["__key__"])
        np.testing.assert_array_equal(_pixels(s["png"]), x[i])
        assert s["cls"] == str(y[i]).encode("ascii")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", "heldout-000000.tar", "train-000000.tar", "train-000001.tar", "train-000002.tar"])


def test_shards_read_with_plain_webdataset(tmp_path):
    path, x, y = _npz(tmp_path, n=20)
    out = tmp_path / "shards"
    manifest = _write(open_source("npz", path), out, shard_size=8)
    urls = [str(out / s["name"]) for s in manifest["splits"]["train"]["shards"]]
    got = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8"))
    assert len(got) == 20
    for s in got:
        i = int(s["__key__"])
        np.testing.assert_array_equal(s["png"], x[i])
        assert s["cls"] == y[i]


def test_shuffle_is_seeded_and_shards_reproducible(tmp_path):
    path, _, _ = _npz(tmp_path, n=40)
    source = open_source("npz", path)

    def order(seed: int, name: str) -> list[str]:
        _write(source, tmp_path / name, seed=seed)
        return [s["__key__"] for s in _read_tar(tmp_path / name / "train-000000.tar")]

    assert order(0, "a") == order(0, "b")
    assert order(0, "a") != order(1, "c")
    assert order(0, "a") != sorted(order(0, "a"))
    assert (tmp_path / "a/train-000000.tar").read_bytes() == (tmp_path / "b/train-000000.tar").read_bytes()


def test_heldout_fraction_limit_and_unlabelled(tmp_path):
    path, x, _ = _npz(tmp_path, n=300, shape=(4, 4), labelled=False)
    out = tmp_path / "shards"
    manifest = _write(open_source("npz", path), out, heldout=0.05, limit=200)
    assert manifest["splits"]["heldout"]["count"] == 10 and manifest["splits"]["train"]["count"] == 190
    assert (manifest["num_classes"], manifest["classes"], manifest["channels"]) == (0, None, 1)
    samples = _read_split(out, manifest, "train") + _read_split(out, manifest, "heldout")
    assert len({s["__key__"] for s in samples}) == 200
    assert all("cls" not in s for s in samples)
    s = samples[0]
    np.testing.assert_array_equal(_pixels(s["png"]), x[int(s["__key__"])])
    assert "heldout" not in _write(open_source("npz", path), tmp_path / "no_heldout", limit=5)["splits"]


def test_rerun_replaces_manifest_and_removes_stale_shards(tmp_path):
    path, _, _ = _npz(tmp_path, n=30)
    out = tmp_path / "shards"
    _write(open_source("npz", path), out, shard_size=10, heldout=5)
    manifest = _write(open_source("npz", path), out, shard_size=100)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train-000000.tar"]
    assert manifest["splits"]["train"]["count"] == 30


def test_cifar10_npz_asset_round_trip(tmp_path):
    path = asset("cifar10_test_jpeg75.npz")
    with np.load(path, allow_pickle=False) as d:
        x, y, classes = d["x"], d["y"], [str(c) for c in d["classes"]]
    out = tmp_path / "cifar"
    manifest = _write(open_source("npz", path), out, limit=200, heldout=20, shard_size=64)
    assert (manifest["resolution"], manifest["channels"], manifest["num_classes"]) == (32, 3, 10)
    assert manifest["classes"] == classes
    samples = _read_split(out, manifest, "train") + _read_split(out, manifest, "heldout")
    assert len({s["__key__"] for s in samples}) == 200
    for s in samples:
        i = int(s["__key__"])
        np.testing.assert_array_equal(_pixels(s["png"]), x[i])
        assert int(s["cls"]) == y[i]
    assert len({int(s["cls"]) for s in samples}) == 10  # shuffled before the limit (the file is sorted by class)


def test_mnist_idx_asset_round_trip_and_rgb_conversion(tmp_path):
    images, labels = asset("t10k-images-idx3-ubyte.gz"), asset("t10k-labels-idx1-ubyte.gz")
    x = np.frombuffer(gzip.decompress(images.read_bytes())[16:], np.uint8).reshape(-1, 28, 28)
    y = np.frombuffer(gzip.decompress(labels.read_bytes())[8:], np.uint8)
    out = tmp_path / "mnist"
    manifest = _write(open_source("mnist", images, labels), out, limit=200)
    assert (manifest["resolution"], manifest["channels"], manifest["num_classes"]) == (28, 1, 10)
    for s in _read_split(out, manifest, "train"):
        i = int(s["__key__"])
        np.testing.assert_array_equal(_pixels(s["png"]), x[i])
        assert int(s["cls"]) == y[i]
    rgb = _write(open_source("mnist", images), tmp_path / "rgb", limit=3, channels=3)  # sibling labels found
    assert rgb["channels"] == 3 and rgb["source"]["labels"] == str(labels.resolve())
    s = _read_split(tmp_path / "rgb", rgb, "train")[0]
    np.testing.assert_array_equal(_pixels(s["png"]), np.repeat(x[int(s["__key__"])][..., None], 3, axis=-1))


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder_centre_crop_resize_and_labels(tmp_path):
    root = tmp_path / "imgs"
    wide = np.zeros((16, 32, 3), np.uint8)
    wide[:, :8] = (255, 0, 0)
    wide[:, 8:24] = (0, 200, 0)  # the centre square
    wide[:, 24:] = (0, 0, 255)
    _save(root / "dog" / "a.png", wide)
    _save(root / "cat" / "b.png", np.full((40, 24, 3), 90, np.uint8))
    _save(root / "cat" / "c.PNG", np.full((20, 20), 30, np.uint8))  # grey, upper-case extension
    (root / "cat" / "notes.txt").write_text("not an image")
    source = open_source("folder", root)
    assert source.classes == ("cat", "dog") and len(source) == 3
    out = tmp_path / "shards"
    manifest = _write(source, out, resolution=16, channels=3)
    assert (manifest["resolution"], manifest["channels"], manifest["classes"]) == (16, 3, ["cat", "dog"])
    by_label = {}
    for s in _read_split(out, manifest, "train"):
        image = _pixels(s["png"])
        assert image.shape == (16, 16, 3)
        by_label.setdefault(int(s["cls"]), []).append(image)
    assert len(by_label[0]) == 2 and len(by_label[1]) == 1
    np.testing.assert_array_equal(by_label[1][0], np.broadcast_to(np.uint8([0, 200, 0]), (16, 16, 3)))


def test_flat_folder_and_box_downsampling(tmp_path):
    blocks = np.kron(np.arange(64, dtype=np.uint8).reshape(8, 8) * 3, np.ones((2, 2), np.uint8))
    _save(tmp_path / "flat" / "x.png", blocks)
    source = open_source("folder", tmp_path / "flat")
    assert source.classes is None and source.num_classes == 0
    manifest = _write(source, tmp_path / "out", resolution=8, box=True)
    s = _read_split(tmp_path / "out", manifest, "train")[0]
    assert "cls" not in s
    np.testing.assert_array_equal(_pixels(s["png"]), np.arange(64, dtype=np.uint8).reshape(8, 8) * 3)


def _cifar_dir(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)
    data = rng.integers(0, 256, (12, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, 12).tolist()
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for name, rows in (("data_batch_1", slice(0, 8)), ("data_batch_2", slice(8, 12))):
        batch = {b"batch_label": name.encode(), b"data": data[rows], b"labels": labels[rows],
                 b"filenames": [b"f.png"] * len(labels[rows])}
        (root / name).write_bytes(pickle.dumps(batch))
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    return root, data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.array(labels)


def test_cifar_pickle_dir_round_trip(tmp_path):
    root, x, y = _cifar_dir(tmp_path)
    out = tmp_path / "shards"
    manifest = _write(open_source("cifar", root), out, shard_size=5)
    assert manifest["classes"] == [f"c{i}" for i in range(10)] and manifest["splits"]["train"]["count"] == 12
    for s in _read_split(out, manifest, "train"):
        i = int(s["__key__"])
        np.testing.assert_array_equal(_pixels(s["png"]), x[i])
        assert int(s["cls"]) == y[i]
    assert len(open_source("cifar", root / "data_batch_2")) == 4  # a single batch file (e.g. test_batch)


def test_jpg_output_is_close(tmp_path):
    x = np.tile(np.linspace(0, 255, 16, dtype=np.uint8)[None, :, None], (16, 1, 3))[None].repeat(3, 0)
    np.savez(tmp_path / "smooth.npz", x=x)
    manifest = _write(open_source("npz", tmp_path / "smooth.npz"), tmp_path / "out", image_format="jpg")
    s = _read_split(tmp_path / "out", manifest, "train")[0]
    assert "jpg" in s and manifest["image_format"] == "jpg"
    assert np.abs(_pixels(s["jpg"]).astype(int) - x[0]).mean() < 3


def test_errors_name_the_problem(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown source kind 'tfrecord'"):
        open_source("tfrecord", tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        open_source("npz", tmp_path / "missing.npz")
    assert main(["bogus", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert main(["npz", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "o")]) == 2
    assert main(["npz", str(tmp_path), "--out", str(tmp_path / "o"), "--shard-size", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert "bogus" in err[0] and "missing.npz" in err[1]


@pytest.mark.skipif(importlib.util.find_spec("lmdb") is not None, reason="lmdb is installed here")
def test_lsun_without_lmdb_names_the_package(tmp_path):
    with pytest.raises(ImportError, match="pip install lmdb"):
        open_source("lsun", tmp_path)


def test_mixed_sizes_need_a_resolution(tmp_path, capsys):
    _save(tmp_path / "mixed" / "a.png", np.zeros((8, 8, 3), np.uint8))
    _save(tmp_path / "mixed" / "b.png", np.zeros((10, 10, 3), np.uint8))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="mixed image sizes"):
        _write(open_source("folder", tmp_path / "mixed"), out)
    assert list(out.iterdir()) == []  # no manifest, no partial shards
    assert main(["folder", str(tmp_path / "mixed"), "--out", str(out)]) == 2
    assert "--resolution" in capsys.readouterr().err
    assert main(["folder", str(tmp_path / "mixed"), "--out", str(out), "--resolution", "8"]) == 0


def test_make_shards_script(tmp_path, monkeypatch):
    path, _, _ = _npz(tmp_path, n=10)
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["make_shards.py", "npz", str(path), "--out", str(out), "--heldout", "2"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "tools" / "make_shards.py"), run_name="__main__")
    assert exit_info.value.code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["splits"]["train"]["count"], manifest["splits"]["heldout"]["count"]) == (8, 2)


def test_a_cifar_pickle_that_names_code_is_refused(tmp_path):
    from raypd.data.sources import open_source

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a"]}))
    (root / "data_batch_1").write_bytes(pickle.dumps({b"data": Boom(), b"labels": [0]}))
    with pytest.raises(ValueError, match="refusing to load posix.system|refusing to load os.system"):
        open_source("cifar", root)
    assert not (tmp_path / "pwned").exists()
