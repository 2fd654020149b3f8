"""FID, KID (and precision/recall, Inception Score) through torch-fidelity, with cached reference statistics.

Every result carries the name of its feature extractor and its sample count: numbers from
different extractors, or from different sample counts, are not comparable and are never mixed.
Reference features of the training data are computed once per (data set, resolution, extractor,
sample count) and kept in the run's storage by torch-fidelity's own cache.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

ExtractorKind = Literal["classifier", "inception"]


@dataclass(frozen=True)
class Extractor:
    kind: ExtractorKind
    weights: str | None
    """The classifier's directory, or Inception weights in torch-fidelity's format (None: its download)."""
    tag: str = ""
    """What the features were trained on (the classifier's data set key); part of every reported name."""

    @property
    def name(self) -> str:
        return f"classifier-{self.tag}" if self.kind == "classifier" else "inception-v3-compat"

    def fidelity_kwargs(self) -> dict:
        if self.kind == "classifier":
            from raypd.eval.classifier import register_with_torch_fidelity

            return {"feature_extractor": register_with_torch_fidelity(), "feature_extractor_weights_path": self.weights}
        kwargs = {"feature_extractor": "inception-v3-compat"}
        if self.weights:
            if not Path(self.weights).is_file():
                raise FileNotFoundError(f"eval.inception_weights: {self.weights} does not exist")
            _check_plain_weights(self.weights)
            kwargs["feature_extractor_weights_path"] = self.weights
        return kwargs


@functools.lru_cache(maxsize=4)
def _check_plain_weights(path: str) -> None:
    """torch-fidelity unpickles weight files in full; refuse any file that holds more than tensors first."""
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any refusal means the file is not plain weights
        raise ValueError(f"eval.inception_weights: {path} is not a plain state dict of tensors ({err})") from None


def to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] floats -> uint8 pixels, the form torch-fidelity and image files use."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class ImageSet(Dataset):
    """uint8 images [N, C, H, W] for torch-fidelity, made on first use (a cache hit never loads them).

    Inception expects RGB, so grey images are repeated to 3 channels for it.
    """

    def __init__(self, count: int, load: Callable[[], Tensor], rgb: bool):
        self.count, self._load, self.rgb = count, load, rgb
        self._images: Tensor | None = None

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> Tensor:
        if self._images is None:
            images = self._load()
            if images.shape[0] < self.count:
                raise ValueError(f"expected {self.count} images, got {images.shape[0]}")
            self._images = images[: self.count]
        img = self._images[i]
        return img.expand(3, -1, -1) if self.rgb and img.shape[0] == 1 else img


def reference_name(data_key: str, resolution: int, extractor: Extractor, count: int) -> str:
    return f"ref-{data_key}-{resolution}px-{extractor.name}-{count}"


def data_key(manifest: dict | None, urls: list[str]) -> str:
    """A short stable name for a data set: its manifest when there is one, else its shard URLs."""
    blob = json.dumps(manifest if manifest else urls, sort_keys=True).encode()
    return hashlib.sha1(blob).hexdigest()[:10]


def fidelity(generated: Tensor, reference: ImageSet, extractor: Extractor, *, cache_root: Path, cache_name: str,
             kid: bool = True, prc: bool = False, isc: bool = False) -> dict:
    """Metrics of generated images ([-1, 1], [N, C, H, W]) against the reference set."""
    import torch_fidelity

    gen = to_uint8(generated)
    rgb = extractor.kind == "inception"
    n = min(gen.shape[0], len(reference))
    cache_root.mkdir(parents=True, exist_ok=True)
    out = torch_fidelity.calculate_metrics(
        input1=ImageSet(gen.shape[0], lambda: gen, rgb), input2=reference, cache=True, cache_root=str(cache_root),
        input2_cache_name=cache_name, **_fidelity_kwargs(extractor, kid=kid, prc=prc, n=n,
                                                         isc=isc and extractor.kind == "inception"))
    result = {"fid": float(out["frechet_inception_distance"])}
    if kid:
        result["kid"] = float(out["kernel_inception_distance_mean"])
        result["kid_std"] = float(out["kernel_inception_distance_std"])
    if prc:
        result["precision"], result["recall"] = float(out["precision"]), float(out["recall"])
    if "inception_score_mean" in out:
        result["isc"] = float(out["inception_score_mean"])
    return {**result, "extractor": extractor.name, "n_samples": int(gen.shape[0])}


# ---- features computed elsewhere (spread over Ray workers), metrics here ---------------------


def _fidelity_kwargs(extractor: Extractor, *, kid: bool, prc: bool, n: int, isc: bool = False) -> dict:
    """torch-fidelity's settings, the same whether it extracts the features or the workers did."""
    # save_cpu_ram: the images are already in memory, loader worker processes only add start-up cost
    return dict(fid=True, kid=kid, prc=prc, isc=isc, cuda=torch.cuda.is_available(), verbose=False,
                kid_subset_size=min(1000, n), batch_size=64, save_cpu_ram=True, **extractor.fidelity_kwargs())


def _layers(kwargs: dict) -> dict[str, str]:
    from torch_fidelity.utils import resolve_feature_layer_for_metric

    return {m: resolve_feature_layer_for_metric(m, **kwargs) for m in ("fid", "kid", "prc") if kwargs[m]}


def extract_features(generated: Tensor, extractor: Extractor, *, kid: bool = True, prc: bool = False) -> dict[str, Tensor]:
    """The features torch-fidelity's metrics need, for images in [-1, 1] or uint8 (one chunk of a set).

    The extractor runs in fp32: FID's protocol is defined on fp32 Inception features, and its numbers are
    compared across runs and papers."""
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset, resolve_feature_extractor

    gen = generated if generated.dtype == torch.uint8 else to_uint8(generated)
    kwargs = _fidelity_kwargs(extractor, kid=kid, prc=prc, n=gen.shape[0])
    net = create_feature_extractor(resolve_feature_extractor(**kwargs), sorted(set(_layers(kwargs).values())), **kwargs)
    data = ImageSet(gen.shape[0], lambda: gen, extractor.kind == "inception")
    return get_featuresdict_from_dataset(data, net, kwargs["batch_size"], kwargs["cuda"], True, False)


def _reference_features(reference: ImageSet, kwargs: dict, cache_root: Path, cache_name: str) -> dict[str, Tensor]:
    """The reference set's features (torch-fidelity's cache, filled on first use)."""
    from torch_fidelity.utils import (create_feature_extractor, extract_featuresdict_from_input_id_cached,
                                      resolve_feature_extractor)

    net = create_feature_extractor(resolve_feature_extractor(**kwargs), sorted(set(_layers(kwargs).values())), **kwargs)
    cache_root.mkdir(parents=True, exist_ok=True)
    return extract_featuresdict_from_input_id_cached(2, net, input2=reference, cache=True, cache_root=str(cache_root),
                                                     input2_cache_name=cache_name, **kwargs)


def fid_features(images: Tensor, extractor: Extractor) -> Tensor:
    """The features FID is computed on, [N, D], for images in [-1, 1] or uint8."""
    kwargs = _fidelity_kwargs(extractor, kid=False, prc=False, n=images.shape[0])
    return extract_features(images, extractor, kid=False)[_layers(kwargs)["fid"]]


def precision_recall(features: Tensor, reference: Tensor, extractor: Extractor) -> tuple[float, float]:
    """torch-fidelity's precision (the share of samples inside the reference's k-NN manifold: fidelity) and recall
    (the share of reference images inside the samples': diversity), from FID features [N, D] and [M, D]."""
    from torch_fidelity.metric_prc import prc_featuresdict_to_metric

    kwargs = _fidelity_kwargs(extractor, kid=False, prc=True, n=min(len(features), len(reference)))
    layers = _layers(kwargs)
    if layers["prc"] != layers["fid"]:
        raise ValueError(f"{extractor.name}: precision/recall read layer {layers['prc']}, not FID's {layers['fid']}")
    pr = prc_featuresdict_to_metric({layers["prc"]: features}, {layers["prc"]: reference}, layers["prc"], **kwargs)
    return float(pr["precision"]), float(pr["recall"])


def reference_fid_features(reference: ImageSet, extractor: Extractor, *, cache_root: Path, cache_name: str) -> Tensor:
    """The reference set's FID features, [M, D], through the same cache the run's scores use."""
    kwargs = _fidelity_kwargs(extractor, kid=False, prc=False, n=len(reference))
    return _reference_features(reference, kwargs, cache_root, cache_name)[_layers(kwargs)["fid"]]


def fidelity_from_features(features: dict[str, Tensor], reference: ImageSet, extractor: Extractor, *,
                           cache_root: Path, cache_name: str, kid: bool = True, prc: bool = False) -> dict:
    """The same metrics as :func:`fidelity`, from the generated set's features gathered from workers."""
    from torch_fidelity.metric_fid import fid_featuresdict_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import kid_featuresdict_to_metric
    from torch_fidelity.metric_prc import prc_featuresdict_to_metric

    n = next(iter(features.values())).shape[0]
    kwargs = _fidelity_kwargs(extractor, kid=kid, prc=prc, n=min(n, len(reference)))
    layers = _layers(kwargs)
    ref = _reference_features(reference, kwargs, cache_root, cache_name)
    out = fid_statistics_to_metric(fid_featuresdict_to_statistics(features, layers["fid"]),
                                   fid_featuresdict_to_statistics(ref, layers["fid"]), False)
    result = {"fid": float(out["frechet_inception_distance"])}
    if kid:
        k = kid_featuresdict_to_metric(features, ref, layers["kid"], **kwargs)
        result["kid"] = float(k["kernel_inception_distance_mean"])
        result["kid_std"] = float(k["kernel_inception_distance_std"])
    if prc:
        pr = prc_featuresdict_to_metric(features, ref, layers["prc"], **kwargs)
        result["precision"], result["recall"] = float(pr["precision"]), float(pr["recall"])
    return {**result, "extractor": extractor.name, "n_samples": int(n)}
