"""The WebDataset shard reader: exact pixels, rank/worker splitting, resampling, bad data, checks."""

from __future__ import annotations

import io
import itertools
import json
import logging
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from raypd.data.shards import DataError, ShardLoader, check_shards, expand_urls, read_manifest

RES, PER_SHARD, N_SHARDS = 8, 10, 8


def _image(index: int, channels: int = 3) -> np.ndarray:
    """A random image whose first two pixel values spell out its index."""
    arr = np.random.default_rng(index).integers(0, 256, size=(RES, RES, channels), dtype=np.uint8)
    arr[0, 0, 0], arr[0, 1, 0] = index % 256, index // 256
    return arr if channels == 3 else arr[:, :, 0]


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _write_shards(root: Path, n_shards: int = N_SHARDS, per_shard: int = PER_SHARD, *,
                  split: str = "train", manifest: dict | None = None, bad: dict | None = None) -> list[str]:
    """train-NNNNNN.tar shards plus manifest.json; ``bad`` maps index -> replacement sample fields."""
    root.mkdir(parents=True, exist_ok=True)
    urls, shards = [], []
    for s in range(n_shards):
        name = f"{split}-{s:06d}.tar"
        with wds.TarWriter(str(root / name)) as sink:
            for i in range(s * per_shard, (s + 1) * per_shard):
                sample = {"__key__": f"{i:08d}", "png": _png(_image(i)), "cls": str(i % 10).encode()}
                for field, value in (bad or {}).get(i, {}).items():
                    if value is None:
                        del sample[field]
                    else:
                        sample[field] = value
                sink.write(sample)
        urls.append(str(root / name))
        shards.append({"name": name, "count": per_shard})
    doc = {"format": "raypd-shards", "version": 1, "resolution": RES, "channels": 3, "num_classes": 10,
           "classes": None, "image_format": "png", "source": {"kind": "test"}, "seed": 0,
           "splits": {split: {"count": n_shards * per_shard, "shards": shards}}}
    doc.update(manifest or {})
    (root / "manifest.json").write_text(json.dumps(doc))
    return urls


def _indices(x: torch.Tensor) -> list[int]:
    px = torch.round((x[:, 0, 0, :2] + 1) * 127.5).long()
    return (px[:, 0] + 256 * px[:, 1]).tolist()


def _read_all(loader: ShardLoader) -> list[int]:
    return [i for batch in loader for i in _indices(batch.x)]


def _loader(urls, **kw) -> ShardLoader:
    opts = dict(batch_size=5, channels=3, num_classes=10, resampled=False, shuffle_buffer=0)
    return ShardLoader(urls, **{**opts, **kw})


def test_pixels_and_labels_read_back_exactly(tmp_path):
    urls = _write_shards(tmp_path)
    batches = list(_loader(urls, batch_size=4))
    assert len(batches) == N_SHARDS * PER_SHARD // 4
    for batch in batches:
        assert batch.x.dtype == torch.float32 and batch.x.shape == (4, 3, RES, RES)
        assert batch.y.dtype == torch.int64
        for x, y, i in zip(batch.x, batch.y, _indices(batch.x)):
            want = torch.from_numpy(_image(i)).permute(2, 0, 1).float() / 127.5 - 1
            assert torch.equal(x, want)
            assert int(y) == i % 10


def test_grey_images_become_rgb_and_unlabelled_reads_give_no_labels(tmp_path):
    grey = {i: {"png": _png(_image(i, channels=1))} for i in range(PER_SHARD)}
    urls = _write_shards(tmp_path, n_shards=1, bad=grey)
    batch = next(iter(_loader(urls, num_classes=0, batch_size=PER_SHARD)))
    assert batch.y is None
    assert torch.equal(batch.x[:, 0], batch.x[:, 1]) and torch.equal(batch.x[:, 1], batch.x[:, 2])


def test_two_ranks_by_two_workers_cover_every_sample_once(tmp_path):
    urls = _write_shards(tmp_path)
    seen = []
    for rank in range(2):
        loader = _loader(urls, rank=rank, world_size=2, num_workers=2, shuffle_buffer=16, seed=3)
        got = _read_all(loader)
        shards = {i // PER_SHARD for i in got}
        assert all(s % 2 == rank for s in shards), "each rank reads only its own shards"
        seen += got
    assert sorted(seen) == list(range(N_SHARDS * PER_SHARD))


def test_resampled_stream_is_endless_deterministic_and_split_by_rank(tmp_path):
    urls = _write_shards(tmp_path)
    n = 3 * N_SHARDS * PER_SHARD // 2 // 5  # 1.5x the rank's samples: must wrap around

    def draw(rank: int, seed: int = 7, workers: int = 0) -> list[int]:
        loader = _loader(urls, rank=rank, world_size=2, resampled=True, seed=seed, shuffle_buffer=20,
                         num_workers=workers, random_flip=False)
        return [i for b in itertools.islice(loader, n) for i in _indices(b.x)]

    a, b = draw(0), draw(0)
    assert len(a) == n * 5 and a == b
    assert draw(0, seed=8) != a
    assert draw(0, workers=2) == draw(0, workers=2)
    shards0, shards1 = {i // PER_SHARD for i in a}, {i // PER_SHARD for i in draw(1)}
    assert shards0 <= {0, 2, 4, 6} and shards1 <= {1, 3, 5, 7}


def test_random_flip_is_seeded(tmp_path):
    urls = _write_shards(tmp_path, n_shards=1)
    runs = [torch.cat([b.x for b in _loader(urls, random_flip=True, seed=s)]) for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    plain = torch.cat([b.x for b in _loader(urls)])
    flipped = [not torch.equal(f, p) for f, p in zip(runs[0], plain)]
    assert 0 < sum(flipped) < len(flipped)
    assert all(torch.equal(f, p.flip(-1)) for f, p, fl in zip(runs[0], plain, flipped) if fl)


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_samples_and_truncated_tar_are_skipped_and_counted(tmp_path, caplog, workers):
    bad = {3: {"png": b"not a png at all"}, 14: {"cls": b"seven"}, 25: {"png": None}}
    urls = _write_shards(tmp_path, bad=bad)
    data = Path(urls[5]).read_bytes()
    Path(urls[5]).write_bytes(data[: len(data) // 2 + 100])
    loader = _loader(urls, batch_size=1, num_workers=workers, world_size=1)
    with caplog.at_level(logging.WARNING, logger="raypd.data"):
        got = _read_all(loader)
    assert not {3, 14, 25} & set(got)
    assert set(range(N_SHARDS * PER_SHARD)) - set(range(50, 60)) - {3, 14, 25} <= set(got)
    assert loader.skipped_samples > 3
    assert len(got) + loader.skipped_samples == N_SHARDS * PER_SHARD  # the manifest makes it exact
    if workers == 0:  # worker processes log to their own stderr
        assert any(urls[0] in r.getMessage() and "00000003" in r.getMessage() for r in caplog.records)
        assert any(urls[5] in r.getMessage() for r in caplog.records)


def test_truncated_tar_without_manifest_is_still_counted(tmp_path):
    urls = _write_shards(tmp_path, n_shards=2)
    (tmp_path / "manifest.json").unlink()
    data = Path(urls[1]).read_bytes()
    Path(urls[1]).write_bytes(data[: len(data) // 3 + 7])
    loader = _loader(urls, batch_size=1)
    got = _read_all(loader)
    assert set(range(PER_SHARD)) <= set(got) and len(got) < 2 * PER_SHARD
    assert loader.skipped_samples > 0


def test_tar_cut_at_a_header_is_counted_from_the_manifest(tmp_path):
    # tarfile treats a missing header as a clean end of archive: only the manifest's count tells
    urls = _write_shards(tmp_path, n_shards=1)
    with tarfile.open(urls[0]) as tar:
        cut = tar.getmembers()[8].offset  # header of sample 4's first file
    Path(urls[0]).write_bytes(Path(urls[0]).read_bytes()[:cut])
    loader = _loader(urls, batch_size=1)
    assert sorted(_read_all(loader)) == [0, 1, 2, 3]
    assert loader.skipped_samples == PER_SHARD - 4


def test_each_pass_is_the_next_epoch_and_pickles_for_spawned_workers(tmp_path):
    urls = _write_shards(tmp_path, n_shards=4)
    loader = _loader(urls, num_workers=2, shuffle_buffer=16, seed=1)
    first, second = _read_all(loader), _read_all(loader)
    assert sorted(first) == sorted(second) == list(range(4 * PER_SHARD)) and first != second
    assert _read_all(_loader(urls, num_workers=2, shuffle_buffer=16, seed=1, epoch=1)) == second
    assert pickle.loads(pickle.dumps(loader._stream)).urls == urls


def test_resampled_reader_with_only_unreadable_shards_fails_instead_of_hanging(tmp_path):
    urls = _write_shards(tmp_path, n_shards=2)
    Path(urls[1]).write_bytes(b"\0" * 100)
    loader = _loader(urls, rank=1, world_size=2, resampled=True)
    with pytest.raises(RuntimeError, match="gave no samples"):
        next(iter(loader))


def _check(urls, **kw):
    opts = dict(resolution=RES, channels=3, num_classes=10, world_size=1, num_workers=0)
    return check_shards(urls, **{**opts, **kw})


def test_startup_checks(tmp_path):
    urls = _write_shards(tmp_path, n_shards=3)
    assert _check(urls)["resolution"] == RES
    with pytest.raises(DataError, match="empty"):
        _check([])
    gone = str(tmp_path / "train-000099.tar")
    with pytest.raises(DataError, match=gone):
        _check(urls + [gone])
    with pytest.raises(DataError, match=r"3 shards for 2 ranks x 2 loader workers"):
        _check(urls, world_size=2, num_workers=2)
    with pytest.raises(DataError, match="3 shards"):
        _loader(urls, world_size=2, num_workers=2)
    for name, value, have in (("resolution", 16, RES), ("channels", 1, 3), ("num_classes", 100, 10)):
        with pytest.raises(DataError, match=rf"{name} {have}\b.*{name} {value}\b"):
            _check(urls, **{name: value})
    assert _check(urls, num_classes=0) is not None  # an unconditional model may ignore labels
    (tmp_path / "manifest.json").unlink()
    assert _check(urls, resolution=16) is None and read_manifest(urls) is None


def test_remote_urls_through_fsspec(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    urls = _write_shards(tmp_path / "local", n_shards=2)
    fs = fsspec.filesystem("memory")
    remote = []
    for path in urls + [str(tmp_path / "local" / "manifest.json")]:
        fs.pipe(f"/raypd-test/{Path(path).name}", Path(path).read_bytes())
        remote.append(f"memory://raypd-test/{Path(path).name}")
    remote = remote[:-1]
    try:
        assert _check(remote)["num_classes"] == 10
        with pytest.raises(DataError, match="train-000002"):
            _check(remote + ["memory://raypd-test/train-000002.tar"])
        assert sorted(_read_all(_loader(remote))) == list(range(2 * PER_SHARD))
        with pytest.raises(DataError, match="s3fs"):
            try:
                import s3fs  # noqa: F401
                pytest.skip("s3fs is installed")
            except ImportError:
                _loader(["s3://bucket/train-000000.tar"])
    finally:
        fs.rm("/raypd-test", recursive=True)


def test_brace_list_and_directory_expansion(tmp_path):
    urls = _write_shards(tmp_path, n_shards=3)
    _write_shards(tmp_path, n_shards=1, split="heldout")
    assert expand_urls(str(tmp_path / "train-{000000..000002}.tar")) == urls
    assert expand_urls(str(tmp_path)) == urls
    assert expand_urls([str(tmp_path / "train-{000000..000001}.tar"), urls[2]]) == urls
    assert expand_urls(f"{urls[0]},{tmp_path}/train-{{000001,000002}}.tar") == urls
    assert expand_urls("s3://b/d/train-{000000..000001}.tar") == ["s3://b/d/train-000000.tar",
                                                                  "s3://b/d/train-000001.tar"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no train"):
        expand_urls(str(tmp_path / "empty"))


def test_too_much_bad_data_stops_the_run(tmp_path):
    bad = {i: {"png": b"garbage"} for i in range(0, N_SHARDS * PER_SHARD, 4)}  # a quarter of the samples
    urls = _write_shards(tmp_path, bad=bad)
    lenient = _loader(urls, batch_size=1, max_skipped_fraction=0.5, judge_after=20)
    assert len(_read_all(lenient)) == N_SHARDS * PER_SHARD - len(bad)
    strict = _loader(urls, batch_size=1, max_skipped_fraction=0.05, judge_after=20)
    with pytest.raises(DataError, match=r"were corrupt or unreadable, more than data.max_skipped_fraction=0.05"):
        _read_all(strict)
