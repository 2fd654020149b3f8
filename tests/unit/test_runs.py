"""The run directory: driver lock, config guard, restart without loss, dry run."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from raypd.config import load_config
from raypd.distill import main
from raypd.runs import DriverLock, RunStateError, archive_run, changed_keys, check_and_save_config, lock_holder


def test_second_driver_is_refused_and_released_lock_is_free(tmp_path):
    with DriverLock(tmp_path):
        with pytest.raises(RunStateError, match=f"another driver is running on {tmp_path}: pid {os.getpid()}"):
            DriverLock(tmp_path).acquire()
    assert lock_holder(tmp_path) is None and not (tmp_path / "driver.lock").exists()
    DriverLock(tmp_path).acquire().release()


def test_lock_of_a_dead_driver_is_taken_over(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "driver.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "x"}))
    assert lock_holder(tmp_path) is None
    lock = DriverLock(tmp_path).acquire()
    assert json.loads((tmp_path / "driver.lock").read_text())["pid"] == os.getpid()
    assert "stale lock" in capsys.readouterr().err
    lock.release()


def test_lock_from_another_host_is_stale_only_when_its_heartbeat_stopped(tmp_path):
    path = tmp_path / "driver.lock"
    path.write_text(json.dumps({"pid": 1, "host": "some-other-node", "started": "x"}))
    assert lock_holder(tmp_path)["host"] == "some-other-node"
    old = time.time() - 600
    os.utime(path, (old, old))
    assert lock_holder(tmp_path) is None


def test_second_driver_process_is_refused(tmp_path, capsys):
    with DriverLock(tmp_path / "local"):
        assert main([f"run.storage_path={tmp_path}"]) == 2
    assert "another driver is running" in capsys.readouterr().err


def test_config_guard_names_what_changed(tmp_path):
    cfg = load_config(None, [f"run.storage_path={tmp_path}"])
    with pytest.raises(RunStateError, match="no run to resume"):
        check_and_save_config(cfg, tmp_path / "local", resume=True)
    check_and_save_config(cfg, tmp_path / "local")
    check_and_save_config(load_config(None, [f"run.storage_path={tmp_path}", "eval.num_samples=8", "dist.workers=2"]),
                          tmp_path / "local", resume=True)
    with pytest.raises(RunStateError, match=r"distill.lr \(0.0003 -> 0.001\)"):
        check_and_save_config(load_config(None, [f"run.storage_path={tmp_path}", "distill.lr=1e-3"]), tmp_path / "local")
    assert changed_keys({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}}) == ["a.c"]
    # a run saved before a setting existed continues at that setting's default, and only there
    older = json.loads((tmp_path / "local" / "config.json").read_text())
    del older["distill"]["method"]
    (tmp_path / "local" / "config.json").write_text(json.dumps(older))
    check_and_save_config(cfg, tmp_path / "local")
    (tmp_path / "local" / "config.json").write_text(json.dumps(older))
    with pytest.raises(RunStateError, match=r"distill.method \(None -> 'tract'\)"):
        check_and_save_config(load_config(None, [f"run.storage_path={tmp_path}", "distill.method=tract",
                                                 "distill.tract.phases=[8,1]"]), tmp_path / "local")


def test_restart_moves_the_run_aside(tmp_path):
    run = tmp_path / "r"
    (run / "round-00-1steps").mkdir(parents=True)
    archived = archive_run(run)
    assert not run.exists() and (archived / "round-00-1steps").is_dir()
    with DriverLock(tmp_path / "busy"):
        with pytest.raises(RunStateError, match="another driver"):
            archive_run(tmp_path / "busy")


def test_dry_run_prints_the_plan_and_flags_problems(tmp_path, capsys):
    assert main(["--dry-run", "--storage", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "826,626 parameters" in out and "round 4" in out and "2->1" in out and "nothing was started" in out
    assert not (tmp_path / "local").exists()
    assert main(["--dry-run", "data.source=shards", f"data.shards={tmp_path}/train-{{000..003}}.tar",
                 f"teacher.checkpoint={tmp_path}/none"]) == 2
    out = capsys.readouterr().out
    assert "error    data.shards: 4 of 4 shards do not exist" in out
    assert "error    teacher.checkpoint:" in out and "problems found" in out
    assert main(["--dry-run", "data.source=shards", "data.shards=s3://YOUR-BUCKET/x/train-{000..009}.tar"]) == 0
    assert "warning  data.shards is still a placeholder" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["cifar10", "imagenet64", "lsun_bedroom128", "lsun_church128"])
def test_every_paper_config_dry_runs_without_a_cluster(name, capsys):
    from pathlib import Path

    config = Path(__file__).resolve().parents[2] / "configs" / f"{name}.yaml"
    assert main(["--dry-run", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "round 0" in out and "->1" in out and "A100-hours" in out and "per worker" in out
    assert "warning  data.shards is still a placeholder" in out


def test_a_given_teacher_is_copied_into_a_run_once_and_again_when_it_changes(tmp_path, capsys):
    from raypd.checkpoint import meta_for, save_checkpoint, weights_digest
    from raypd.pipeline import copy_given_teacher
    from tests.teachers import perturbed_denoiser

    cfg = load_config(None, ["data.resolution=8", "model.attn_resolutions=[4]"])
    source = tmp_path / "given"
    save_checkpoint(source, perturbed_denoiser(cfg), meta_for(cfg, kind="teacher", sampling_steps=2, round=None))
    target = copy_given_teacher(source, tmp_path / "run" / "given-teacher")
    assert weights_digest(target) == weights_digest(source) and "copied the given teacher" in capsys.readouterr().err
    assert copy_given_teacher(source, target) == target and "copied" not in capsys.readouterr().err
    save_checkpoint(source, perturbed_denoiser(cfg, scale=0.05), meta_for(cfg, kind="teacher", sampling_steps=2,
                                                                         round=None))
    copy_given_teacher(source, target)
    assert weights_digest(target) == weights_digest(source) and "copied" in capsys.readouterr().err


def test_a_run_saved_before_settings_moved_into_their_methods_section_continues(tmp_path):
    """An earlier raypd saved distill.phases, self_teacher_ema and pairs at the top of distill: read back, a TRACT
    run's go to distill.tract, the others' are dropped (they did nothing there), so rerunning the same run goes on."""
    from raypd.methods import method_for

    run = tmp_path / "local"
    for method, overrides in (("progressive", []), ("tract", ["distill.method=tract", "distill.tract.phases=[8,1]"])):
        cfg = method_for(load_config(None, [f"run.storage_path={tmp_path}", *overrides])).complete()
        check_and_save_config(cfg, run)
        older = json.loads((run / "config.json").read_text())
        section = older["distill"].pop("tract", {})
        older["distill"].update(phases=section.get("phases", []), self_teacher_ema=section.get("self_teacher_ema", 0.5),
                                pairs=8192)
        (run / "config.json").write_text(json.dumps(older))
        check_and_save_config(cfg, run)  # the same run: no settings changed
        (run / "config.json").unlink()
    # a method's section written out in full: stating a default or leaving it out is the same run
    stated = method_for(load_config(None, ["distill.method=tract", "distill.tract.phases=[8,1]",
                                           "distill.tract.self_teacher_ema=0.5"])).complete()
    left_out = method_for(load_config(None, ["distill.method=tract", "distill.tract.phases=[8,1]"])).complete()
    assert stated.to_dict() == left_out.to_dict()


def test_the_record_of_interruptions_counts_starts_lost_tasks_and_each_stages_resumes(tmp_path):
    from raypd.eval.report import interruption_lines
    from raypd.runs import EVENTS, interruptions, record_event

    out = tmp_path / "run"
    for name, metrics in (("teacher", {"resumed_at": [6, 12], "worker_restarts": 1, "nodes_lost": 1}),
                          ("round-00-1steps", {}),
                          ("sweeps/round-00/trials/t01/student", {"resumed_at": [3], "nodes_preempted": 1})):
        (out / name).mkdir(parents=True)
        (out / name / "meta.json").write_text(json.dumps({"metrics": metrics}))
    record_event(out, "start")
    record_event(out, "task lost", what="pairs 0:64")
    record_event(out, "start")
    with open(out / EVENTS, "a") as f:
        f.write('{"event": "task lo')  # the line a killed driver was writing
    record = interruptions(out, [out / "teacher", out / "round-00-1steps"])
    assert record == {"driver_starts": 2, "tasks_lost": 1, "lost_tasks": ["pairs 0:64"], "stages": [
        {"stage": "teacher", "resumed_at": [6, 12], "worker_restarts": 1, "nodes_lost": 1, "nodes_preempted": 0},
        {"stage": "sweeps/round-00/trials/t01/student", "resumed_at": [3], "worker_restarts": 0, "nodes_lost": 0,
         "nodes_preempted": 1}]}
    text = "\n".join(interruption_lines(record))
    assert "The driver started 2 time(s): 1 interruption(s)" in text and "(pairs 0:64)" in text
    assert "| teacher | 6, 12 | 1 | 1 | 0 |" in text
    assert interruption_lines({"driver_starts": 1, "tasks_lost": 0, "lost_tasks": [], "stages": []}) == []
