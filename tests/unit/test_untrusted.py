"""Bad and hostile input: fuzzed configs, pickle-bombed checkpoints, credentials kept out of files."""

import json
import os
import pickle

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raypd.checkpoint import CheckpointError, load_checkpoint, meta_for, save_checkpoint
from raypd.config import Config, ConfigError, config_from_dict, field_docs, load_config

KEYS = [k for k, _, _ in field_docs()]
SECTIONS = sorted({k.split(".")[0] for k in KEYS})
values = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True)
                      | st.text(max_size=12), lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


def _nested(pairs):
    out = {}
    for key, value in pairs:
        section, _, name = key.partition(".")
        out.setdefault(section, {})[name] = value
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(KEYS), values), max_size=5))
def test_fuzzed_settings_give_validation_errors_only(pairs):
    try:
        config_from_dict(_nested(pairs))
    except ConfigError as err:
        assert err.key and str(err)  # names the key and the reason
        assert err.key.split(".")[0] in SECTIONS or err.key == ""


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.dictionaries(st.text(max_size=8), values, max_size=4), values))
def test_fuzzed_documents_give_validation_errors_only(doc):
    try:
        config_from_dict(doc if isinstance(doc, dict) else {"data": doc})
    except ConfigError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=30), max_size=3))
def test_fuzzed_overrides_give_validation_errors_only(overrides):
    try:
        config_from_dict({}, overrides)
    except ConfigError:
        pass


def test_a_pickle_bomb_in_place_of_the_weights_is_refused_unrun(tmp_path):
    from raypd.models import build_denoiser

    cfg = load_config(None, ["data.resolution=8", "model.attn_resolutions=[4]"])
    path = save_checkpoint(tmp_path / "ck", build_denoiser(cfg.model, cfg.data),
                           meta_for(cfg, kind="student", sampling_steps=1, round=0))

    class Bomb:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    (path / "model.safetensors").write_bytes(pickle.dumps({"w": Bomb()}))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_credentials_in_urls_never_reach_saved_configs(tmp_path):
    from raypd.runs import check_and_save_config

    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCY"
    cfg = load_config(None, ["data.source=shards", f"data.shards=https://user:{secret}@data.example/train-0.tar",
                             f"run.storage_path={tmp_path}"])
    check_and_save_config(cfg, tmp_path / "local")
    saved = (tmp_path / "local" / "config.json").read_text()
    assert secret not in saved and "https://user:***@data.example/train-0.tar" in saved
    # and the saved config still loads
    assert isinstance(config_from_dict(json.loads(saved)), Config)


@pytest.mark.parametrize("name", ["..", ".", "a/../../b", "a\\b"])
def test_run_names_cannot_leave_the_storage_root(name):
    with pytest.raises(ConfigError, match="run.name: must be a plain directory name"):
        load_config(None, [f"run.name={name}"])


def test_a_summary_pointing_outside_the_run_is_not_taken_as_finished(tmp_path):
    from raypd.runs import finished_summary

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "meta.json").write_text("{}")
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.md").write_text("x")
    (run / "summary.json").write_text(json.dumps({"final_checkpoint": "../elsewhere"}))
    assert finished_summary(run) is None
