import dataclasses
from pathlib import Path

import pytest

from raypd.config import Config, ConfigError, config_from_dict, field_docs, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_local_mode_and_valid():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.data.source == "digits" and cfg.run.device == "auto"


def test_local_yaml_matches_the_defaults():
    assert load_config(ROOT / "configs" / "local.yaml") == Config()


def test_dotted_overrides_parse_yaml_values():
    cfg = load_config(None, ["distill.lr=1e-4", "model.ch_mult=[1,2,2]", "data.resolution=32",
                             "model.attn_resolutions=[8,16]", "run.name=try"])
    assert cfg.distill.lr == 1e-4 and cfg.model.ch_mult == (1, 2, 2) and cfg.run.name == "try"


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().distill.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("overrides, key, reason", [
    (["distill.lrr=1"], "distill.lrr", "unknown key; valid keys here: start_steps"),
    (["eval.chunk_size=100"], "eval.chunk_size", "multiple of 256"),
    (["eval.chunk_size=0"], "eval.chunk_size", "multiple of 256"),
    (["eval.precision=fp16"], "eval.precision", "must be one of"),
    (["dist.checkpoint_upload=later"], "dist.checkpoint_upload", "must be one of"),
    (["dist.staging_dir=scratch"], "dist.staging_dir", "absolute path"),
    (["dist.staging_dir=s3://b/x"], "dist.staging_dir", "absolute path"),
    (["optim.lr=1"], "optim", "unknown key"),
    (["distill.lr=fast"], "distill.lr", "must be a number"),
    (["distill.lr=-1"], "distill.lr", "must be positive"),
    (["distill.start_steps=100"], "distill.start_steps", "power of two"),
    (["distill.end_steps=256"], "distill.end_steps", "must be below start_steps"),
    (["model.parameterization=mu"], "model.parameterization", "must be one of 'eps', 'x', 'v', 'both'"),
    (["diffusion.weighting=l1"], "diffusion.weighting", "must be one of"),
    (["teacher.adam_betas=[0.9]"], "teacher.adam_betas", "list of 2 values"),
    (["model.ch_mult=[1, two]"], "model.ch_mult[1]", "must be an integer"),
    (["data.random_flip=1"], "data.random_flip", "true or false"),
    (["model.attn_resolutions=[3]"], "model.attn_resolutions", "3 is never reached"),
    (["data.resolution=18", "model.ch_mult=[1,2,2]"], "model.ch_mult", "not divisible by 4"),
    (["teacher.sampling_steps=16"], "distill.start_steps", "must not exceed teacher.sampling_steps"),
    (["distill=3"], "distill", "must be a mapping"),
    (["distill.lr.x=3"], "distill.lr", "is a value, not a section"),
    (["sweep.fid_seeds=0"], "sweep.fid_seeds", "must be >= 1"),
    (["sweep.enabled=true", "sweep.choices=[distill.batch_sise=16|32]"], "sweep.choices[0]",
     "distill.batch_sise: unknown key"),
    (["sweep.enabled=true", "sweep.choices=[distill.lr=1e-3, distill.batch_size=16|0]"], "sweep.choices[1]",
     "distill.batch_size=0: distill.batch_size"),
    (["sweep.examples=-1"], "sweep.examples", "must be >= 0"),
    (["sweep.examples=64", "sweep.updates=[4]"], "sweep.examples", "drop sweep.updates ([4])"),
    (["sweep.enabled=true", "sweep.examples=24", "sweep.choices=[distill.batch_size=16|32]"], "sweep.examples",
     "24 examples is less than one update at a batch of 32 (sweep.choices[0])"),
    (["sweep.enabled=true", "sweep.examples=24", "distill.batch_size=32"], "sweep.examples",
     "at a batch of 32 (distill.batch_size)"),
])
def test_bad_values_name_the_key(overrides, key, reason):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert info.value.key == key
    assert reason in str(info.value)
    assert str(info.value).startswith(key)


def test_yaml_file_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("distill:\n  updates_per_round: many\n")
    with pytest.raises(ConfigError, match=r"distill.updates_per_round: must be an integer.*bad.yaml"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(path)


def test_round_trip_through_plain_data():
    cfg = load_config(None, ["model.ch_mult=[1,2,2]", "data.resolution=32"])
    assert config_from_dict(cfg.to_dict()) == cfg


def test_every_field_is_documented():
    rows = field_docs()
    assert len(rows) > 30
    undocumented = [key for key, _, doc in rows if len(doc) < 10]
    assert not undocumented, undocumented


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.distill.start_steps <= cfg.teacher.sampling_steps
