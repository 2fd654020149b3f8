"""A cheap FID feature extractor: a small classifier trained on the run's own data.

Inception costs ~0.15 s per image on a 2-core CPU; this network costs well under 1 ms, so local
runs and CI can score every round. It is trained once per data set (cached as safetensors) and
its 128-d penultimate activations serve as features. Its numbers are comparable only with other
numbers from the same classifier on the same data set: every result names its extractor.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from raypd.data.batch import Batch

FEATURES = 128


class Classifier(nn.Module):
    """conv stack -> global average pool -> 128-d features -> class logits."""

    def __init__(self, channels: int, num_classes: int, resolution: int):
        super().__init__()
        self.channels, self.num_classes, self.resolution = channels, num_classes, resolution
        widths = (32, 64, 128)
        layers, c = [], channels
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU(),
                       nn.Conv2d(w, w, 3, stride=2, padding=1), nn.SiLU()]
            c = w
        self.body = nn.Sequential(*layers)
        self.features = nn.Linear(c, FEATURES)
        self.head = nn.Linear(FEATURES, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        """x in [-1, 1], [B, C, R, R] -> features [B, 128]."""
        return F.silu(self.features(self.body(x).mean(dim=(2, 3))))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embed(x))


def train_classifier(batches: Iterator[Batch], *, channels: int, num_classes: int, resolution: int,
                     updates: int, seed: int = 0, log_every: int = 100) -> tuple[Classifier, float]:
    """Adam on cross-entropy; returns the network and its accuracy on the last 20 training batches."""
    if num_classes < 2:
        raise ValueError("the classifier feature extractor needs labelled data (at least 2 classes); "
                         "use eval.extractor=inception for unlabelled data")
    torch.manual_seed(seed)
    net = Classifier(channels, num_classes, resolution)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    correct = seen = 0
    for k in range(1, updates + 1):
        batch = next(batches)
        if batch.y is None:
            raise ValueError("the classifier feature extractor needs class labels in the data")
        logits = net(batch.x)
        loss = F.cross_entropy(logits, batch.y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if k > updates - 20:
            correct += (logits.argmax(1) == batch.y).sum().item()
            seen += batch.y.numel()
        if k % log_every == 0 or k == updates:
            print(f"[classifier] {k}/{updates} loss {loss.item():.3f}", file=sys.stderr, flush=True)
    return net.eval().requires_grad_(False), correct / max(seen, 1)


def save_classifier(net: Classifier, path: Path, info: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path / "model.safetensors"))
    meta = {"channels": net.channels, "num_classes": net.num_classes, "resolution": net.resolution, **info}
    (path / "meta.json").write_text(json.dumps(meta, indent=2))


def load_classifier(path: str | Path) -> Classifier:
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    net = Classifier(meta["channels"], meta["num_classes"], meta["resolution"])
    net.load_state_dict(load_file(str(path / "model.safetensors")))
    return net.eval().requires_grad_(False)


def register_with_torch_fidelity() -> str:
    """Register the classifier as a torch-fidelity feature extractor; returns its name.

    torch-fidelity hands extractors uint8 [B, C, H, W] images and its ``feature_extractor_weights_path``
    argument; here that path is the classifier's directory.
    """
    import torch_fidelity
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    name = "raypd-classifier"
    if name in FEATURE_EXTRACTORS_REGISTRY:
        return name

    class ClassifierFeatures(FeatureExtractorBase):
        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            if feature_extractor_weights_path is None:
                raise ValueError("the classifier extractor needs feature_extractor_weights_path (its directory)")
            self.net = load_classifier(feature_extractor_weights_path)

        @staticmethod
        def get_provided_features_list():
            return ("features",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "features"

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return None

        def forward(self, x):
            return (self.net.embed(x.float() / 127.5 - 1.0),)

    torch_fidelity.register_feature_extractor(name, ClassifierFeatures)
    return name
