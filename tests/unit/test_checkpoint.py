import json

import pytest
import torch

from raypd.checkpoint import CheckpointError, check_compatible, load_checkpoint, meta_for, read_meta, save_checkpoint
from raypd.config import load_config
from raypd.models import build_denoiser

SMALL = ["model.ch=32", "model.ch_mult=[1,2]", "data.resolution=8", "model.attn_resolutions=[4]"]


def _model(cfg):
    torch.manual_seed(0)
    model = build_denoiser(cfg.model, cfg.data)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # leave the zero-initialised layers non-zero
    return model


def test_round_trip_gives_identical_outputs(tmp_path):
    cfg = load_config(None, SMALL + ["model.parameterization=both"])
    model = _model(cfg).eval()
    path = save_checkpoint(tmp_path / "ckpt", model, meta_for(cfg, kind="student", sampling_steps=4, round=2,
                                                             metrics={"loss": 0.5}))
    loaded, meta = load_checkpoint(path)
    assert (meta.kind, meta.sampling_steps, meta.round, meta.model.parameterization) == ("student", 4, 2, "both")
    assert meta.metrics == {"loss": 0.5} and meta.config == cfg.to_dict()
    z, lam = torch.randn(2, 1, 8, 8), torch.tensor([-3.0, 2.0])
    torch.testing.assert_close(loaded.eval()(z, lam), model(z, lam), rtol=0, atol=0)


def test_files_are_safetensors_and_json_only(tmp_path):
    cfg = load_config(None, SMALL)
    path = save_checkpoint(tmp_path / "c", _model(cfg), meta_for(cfg, kind="teacher", sampling_steps=128, round=None))
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "model.safetensors"]
    meta = json.loads((path / "meta.json").read_text())
    assert meta["format"] == "raypd-checkpoint" and meta["schedule"] == {"logsnr_min": -20.0, "logsnr_max": 20.0}
    # weights_only-free loading: a pickle smuggled in as the weights file is refused, not executed
    torch.save({"x": torch.zeros(1)}, path / "model.safetensors")
    with pytest.raises(Exception):
        load_checkpoint(path)


def test_overwrite_is_atomic_and_leaves_no_temporaries(tmp_path):
    cfg = load_config(None, SMALL)
    meta = meta_for(cfg, kind="teacher", sampling_steps=128, round=None)
    save_checkpoint(tmp_path / "c", _model(cfg), meta)
    save_checkpoint(tmp_path / "c", _model(cfg), meta)
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="is not a raypd checkpoint"):
        read_meta(tmp_path)
    cfg = load_config(None, SMALL)
    path = save_checkpoint(tmp_path / "c", _model(cfg), meta_for(cfg, kind="teacher", sampling_steps=128, round=None))
    other = load_config(None, SMALL + ["model.parameterization=v", "data.channels=3"])
    with pytest.raises(CheckpointError, match=r"data.channels is 1 in the checkpoint, 3 in the config.*model.parameterization"):
        check_compatible(read_meta(path), other, path)
    check_compatible(read_meta(path), load_config(None, SMALL + ["model.dropout=0.3"]), path)  # dropout is not architecture
    raw = json.loads((path / "meta.json").read_text())
    raw["model"]["ch"] = "wide"
    (path / "meta.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="model.ch: must be an integer"):
        read_meta(path)
    raw["version"] = 99
    (path / "meta.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="version 99"):
        read_meta(path)
