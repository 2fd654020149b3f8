"""python -m raypd.distill end to end on a tiny budget: files, report, resume, errors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raypd.distill import main

TINY = ["data.resolution=8", "model.attn_resolutions=[4]", "teacher.updates=30", "teacher.sampling_steps=4",
        "distill.start_steps=4", "distill.updates_per_round=5", "eval.num_samples=16", "eval.grid_size=16",
        "eval.reference_samples=64", "eval.classifier_updates=20", "run.log_every=10", "run.device=cpu",
        "distill.batch_size=32", "distill.late_rounds_factor=2.0"]  # the round shapes the assertions below count


def test_pipeline_runs_resumes_and_reports(tmp_path, capsys):
    args = TINY + [f"run.storage_path={tmp_path}", "run.name=t"]
    assert main(args) == 0
    run = tmp_path / "t"
    summary = json.loads((run / "summary.json").read_text())
    assert [(r["teacher_steps"], r["student_steps"], r["updates"]) for r in summary["rounds"]] == [(4, 2, 10), (2, 1, 10)]
    assert [(r["sampler"], r["steps"]) for r in summary["eval"]] == [
        ("teacher_ddim", 4), ("teacher_ddim", 2), ("teacher_ddim", 1), ("distilled", 2), ("distilled", 1)]
    for row in summary["eval"]:
        assert set(row) >= {"sampler", "steps", "fid", "kid", "extractor", "n_samples", "seed", "rmse_to_full"}
        assert row["fid"] > 0 and row["n_samples"] == 16 and row["extractor"].startswith("classifier-")
    for r in summary["rounds"]:
        assert set(r) >= {"student_steps", "updates", "lr", "wall_seconds", "final_loss"}
    # compute in forward-equivalents: 3 per teacher training example, 5 per distillation example, cumulative
    assert summary["teacher"]["compute"] == 3 * 30 * 64
    assert summary["teacher"]["checkpoint"] == "teacher"  # trained by the run: inside it
    assert [r["compute"] for r in summary["rounds"]] == [5 * 10 * 32, 2 * 5 * 10 * 32]
    assert summary["final_checkpoint"] == "round-01-1steps"
    assert (run / summary["final_checkpoint"] / "model.safetensors").is_file()
    png = (run / "fid_vs_steps.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    report = (run / "report.md").read_text()
    assert "![FID vs steps](fid_vs_steps.png)" in report and "| 1 |" in report
    assert f"training the teacher cost {3 * 30 * 64:,}" in report and "| 3,200 | 0.56 |" in report
    for name in ("report.md", "config.json", "teacher/model.safetensors",
                 "round-00-2steps/meta.json", "round-01-1steps/model.safetensors",
                 "grids/distilled-0001steps.png", "grids/teacher_ddim-0004steps.png"):
        assert (run / name).is_file(), name
    err = capsys.readouterr().err
    assert "[teacher] 30/30 loss" in err and "[eval] distilled at 1 steps: FID" in err

    # a rerun of the finished run does nothing and says so
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "has finished already" in err and "[teacher]" not in err and "[eval]" not in err

    # a driver that died after the last round, before the report: the rerun loads every stage, trains nothing
    (run / "report.md").unlink()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "[teacher] loading" in err and "already done" in err and "loss" not in err.split("[teacher] loading")[1].split("[round 0]")[0]
    again = json.loads((run / "summary.json").read_text())
    assert again["eval"] == summary["eval"]
    # nothing was sampled or scored again: every point came from the run's evaluation record
    assert err.count("(scored before; from") == len(summary["eval"]) and "RMSE to the full sampler" not in err
    record = json.loads((run / "eval" / "record.json").read_text())
    assert len(record["rows"]) == len(summary["eval"]) and len(list((run / "eval").glob("teacher-full-*.npy"))) == 1

    # the final student through the CLI: a grid, and FID with the run's own extractor and reference cache
    from raypd.cli import main as cli

    final = run / summary["final_checkpoint"]
    assert cli(["sample", "--checkpoint", str(final), "--n", "9", "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert cli(["fid", "--checkpoint", str(final), "--n", "16"]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ours = next(r for r in summary["eval"] if r["sampler"] == "distilled" and r["steps"] == 1)
    assert scored["steps"] == 1 and scored["extractor"] == ours["extractor"]
    assert scored["fid"] == pytest.approx(ours["fid"], rel=1e-4)  # same noise seed, same reference
    assert scored["protocol"] == ours["protocol"]  # and it says so: the same pinned protocol
    protocol = ours["protocol"]
    assert protocol["samples"] == 16 and protocol["noise"] == {"seed": 1234, "scheme": "blocks-256"}
    assert protocol["reference"]["count"] == 64 and protocol["reference"]["split"] == "train"
    assert protocol["reference"]["source"].startswith("digits") and len(protocol["reference"]["sha256"]) == 64
    assert len(protocol["extractor"]["weights_sha256"]) == 64
    assert "FID protocol: classifier-" in report
    assert cli(["fid", "--checkpoint", str(tmp_path)]) == 2
    # every checkpoint of the run at two step counts in one call, as one table; a second call scores nothing again
    capsys.readouterr()
    table = tmp_path / "fid" / "table.md"
    assert cli(["fid", "--run", str(run), "--steps", "2", "1", "--n", "16", "--table", str(table)]) == 0
    out = capsys.readouterr()
    points = [json.loads(line) for line in out.out.strip().splitlines()]
    assert [(Path(r["checkpoint"]).name, r["steps"]) for r in points] == [
        (name, steps) for name in ("teacher", "round-00-2steps", "round-01-1steps") for steps in (2, 1)]
    assert next(r for r in points if r["checkpoint"].endswith("round-01-1steps") and r["steps"] == 1)["fid"] == \
        pytest.approx(scored["fid"], rel=1e-4)
    assert next(r for r in points if r["kind"] == "teacher" and r["steps"] == 1)["fid"] == pytest.approx(
        next(r["fid"] for r in summary["eval"] if r["sampler"] == "teacher_ddim" and r["steps"] == 1), rel=1e-4)
    assert (table.read_text().count("| teacher |"), table.read_text().count("| 16 | classifier-")) == (2, 6)
    assert cli(["fid", "--run", str(run), "--steps", "2", "1", "--n", "16", "--table", str(table)]) == 0
    assert capsys.readouterr().err.count("(scored before)") == 6

    # every student of the run exports as a diffusers pipeline that samples as raypd does, with the run's FID
    assert cli(["export", "--checkpoint", str(final), "--out", str(tmp_path / "one")]) == 0
    assert cli(["export", "--checkpoint", str(run / "round-00-2steps"), "--out", str(tmp_path / "two")]) == 0
    assert capsys.readouterr().err.count("checked: the pipeline's samples are within") == 2
    assert json.loads((tmp_path / "one" / "model_index.json").read_text())["_class_name"] == "DDIMPipeline"
    assert "raypd_pipeline.py" in {p.name for p in (tmp_path / "two").iterdir()}  # 'both' at 2 steps
    assert f"{ours['fid']:.3f}" in (tmp_path / "one" / "README.md").read_text()
    from diffusers import DDIMPipeline

    from raypd.checkpoint import load_checkpoint
    from raypd.diffusion import ddim_sample

    pipe = DDIMPipeline.from_pretrained(str(tmp_path / "one"), local_files_only=True)
    student, meta = load_checkpoint(final)
    images = pipe(batch_size=4, generator=torch.Generator().manual_seed(5), num_inference_steps=1,
                  output_type="np").images
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    x = ddim_sample(student.eval().bind(None), z, 1, logsnr_fn=meta.logsnr_fn()).detach()
    assert abs(images.transpose(0, 3, 1, 2) - (x.numpy() / 2 + 0.5)).max() <= 1e-4

    # TRACT from the same teacher: one phase, 4 teacher steps into 1, evaluated and reported the same way
    capsys.readouterr()
    assert main(TINY + [f"run.storage_path={tmp_path}", "run.name=tract", f"teacher.checkpoint={run / 'teacher'}",
                        "distill.method=tract", "distill.tract.phases=[1]"]) == 0
    tract = json.loads((tmp_path / "tract" / "summary.json").read_text())
    assert tract["method"] == "tract" and summary["method"] == "progressive"
    assert tract["teacher"]["checkpoint"] == str((run / "teacher").resolve())  # given: where it lies
    assert [(r["teacher_steps"], r["student_steps"], r["updates"]) for r in tract["rounds"]] == [(4, 1, 10)]
    assert [(r["sampler"], r["steps"]) for r in tract["eval"]] == [
        ("teacher_ddim", 4), ("teacher_ddim", 1), ("distilled", 1)]
    ddim_1 = next(r["fid"] for r in tract["eval"] if r["sampler"] == "teacher_ddim" and r["steps"] == 1)
    # the teacher's points came from this machine's cache of that teacher's scores, not sampled again
    err = capsys.readouterr().err
    assert err.count("(scored before; from") == 2 and "teacher-eval" in err
    assert [r for r in tract["eval"] if r["sampler"] == "teacher_ddim"] == [
        r for r in summary["eval"] if r["sampler"] == "teacher_ddim" and r["steps"] in (4, 1)]
    assert (tmp_path / "tract" / "grids" / "teacher_ddim-0001steps.png").is_file()
    assert any((tmp_path / "tract" / "eval" / "fid-cache").iterdir())  # its sweep trials read the statistics there
    assert "Distilled with TRACT" in (tmp_path / "tract" / "report.md").read_text()
    assert (tmp_path / "tract" / "round-00-1steps" / "model.safetensors").is_file()

    # the Denoising Student from the same teacher: 64 pairs of its 4-step DDIM, then a one-step regression
    ds_args = TINY + [f"run.storage_path={tmp_path}", "run.name=ds", f"teacher.checkpoint={run / 'teacher'}",
                      "distill.method=denoising_student", "distill.denoising_student.pairs=64"]
    assert main(ds_args) == 0
    ds = json.loads((tmp_path / "ds" / "summary.json").read_text())
    assert ds["method"] == "denoising_student" and ds["pairs"]["count"] == 64 and ds["pairs"]["compute"] == 64 * 4
    assert [(r["teacher_steps"], r["student_steps"], r["updates"]) for r in ds["rounds"]] == [(4, 1, 10)]
    assert ds["rounds"][0]["compute"] == 64 * 4 + 3 * 10 * 32  # the pairs' sampling, then plain updates
    assert "A Denoising Student" in (tmp_path / "ds" / "report.md").read_text()
    assert "[pairs] wrote 64 pairs" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "ds" / "round-00-1steps")  # a run that stopped in its round: the pairs are kept
    (tmp_path / "ds" / "report.md").unlink()
    assert main(ds_args) == 0
    assert "[pairs] reusing the 64 pairs" in capsys.readouterr().err

    # a consistency model from the same teacher: one segment, sampled in 2 steps by the multistep consistency
    # sampler (fresh noise at the second step), its teacher's grid doubling from 2 to 4 steps
    assert main(TINY + [f"run.storage_path={tmp_path}", "run.name=cm", f"teacher.checkpoint={run / 'teacher'}",
                        "distill.method=consistency", "distill.end_steps=2",
                        "distill.consistency.initial_steps=2", "eval.max_standard_steps=1",
                        "eval.many_step_samples=8"]) == 0
    cm = json.loads((tmp_path / "cm" / "summary.json").read_text())
    assert cm["method"] == "consistency"
    # above eval.max_standard_steps, points get eval.many_step_samples; the full sampler the standard count
    assert [(r["sampler"], r["steps"], r["n_samples"]) for r in cm["eval"]] == [
        ("teacher_ddim", 4, 16), ("teacher_ddim", 2, 8), ("distilled", 2, 8)]
    assert "| 2 | " in (tmp_path / "cm" / "report.md").read_text() and "(n=8)" in (tmp_path / "cm" / "report.md").read_text()
    assert [(r["teacher_steps"], r["student_steps"]) for r in cm["rounds"]] == [(4, 2)]
    assert ("distilled", 2) in [(r["sampler"], r["steps"]) for r in cm["eval"]]
    assert "Distilled to a consistency model" in (tmp_path / "cm" / "report.md").read_text()
    cm_student = tmp_path / "cm" / "round-00-2steps"
    assert json.loads((cm_student / "meta.json").read_text())["metrics"]["sampler"] == "consistency"
    assert cli(["export", "--checkpoint", str(cm_student), "--out", str(tmp_path / "cm-two")]) == 2
    assert "multistep consistency sampler" in capsys.readouterr().err
    assert cli(["export", "--checkpoint", str(cm_student), "--steps", "1", "--out", str(tmp_path / "cm-one")]) == 0

    # the three methods on one table and one plot
    from raypd.cli import main as raypd_main

    assert raypd_main(["compare", str(run), str(tmp_path / "tract"), str(tmp_path / "ds"),
                       "--out", str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert ("| steps | teacher DDIM FID | progressive distillation (t) | TRACT (tract) | Denoising Student (ds) |"
            in table)
    pd_1, tract_1, ds_1 = (next(r["fid"] for r in s["eval"] if r["sampler"] == "distilled" and r["steps"] == 1)
                           for s in (summary, tract, json.loads((tmp_path / "ds" / "summary.json").read_text())))
    assert (f"| 1 | {ddim_1:.2f} | {pd_1:.2f} at 3,200 (0.56x) | {tract_1:.2f} at 1,600 (0.28x) | "
            f"{ds_1:.2f} at 1,216 (0.21x) |") in table
    assert (tmp_path / "cmp" / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    other = tmp_path / "other"
    other.mkdir()
    (other / "summary.json").write_text(json.dumps({**tract, "teacher": {**tract["teacher"], "digest": "0" * 64}}))
    assert raypd_main(["compare", str(run), str(other)]) == 2
    err = capsys.readouterr().err
    assert "cannot be compared" in err and "teacher weights" in err

    # a given teacher checkpoint that does not fit the config is refused before any training
    assert main(TINY + [f"run.storage_path={tmp_path}", "run.name=u", f"teacher.checkpoint={run / 'teacher'}",
                        "model.parameterization=v"]) == 2
    assert "does not fit this config" in capsys.readouterr().err


def test_ctrl_c_stops_the_run_with_a_line_not_a_traceback_and_the_same_command_continues_it(tmp_path):
    import signal
    import time

    args = [sys.executable, "-m", "raypd.distill", *TINY, "teacher.updates=2000", "run.log_every=1",
            f"run.storage_path={tmp_path}", "run.name=c"]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    seen = []
    for line in proc.stderr:  # interrupted once teacher training is under way
        seen.append(line)
        if line.startswith("[teacher] 1/2000"):
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 130, rest
    assert "Traceback" not in rest and "interrupted (Ctrl-C): the run's checkpoints are kept" in rest
    assert not (tmp_path / "c" / "driver.lock").exists()  # the run's lock went with it: the command can run again


def test_bad_config_fails_fast_with_the_key():
    out = subprocess.run([sys.executable, "-m", "raypd.distill", "distill.start_steps=3"],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 2
    assert "config error: distill.start_steps: must be a power of two, got 3" in out.stderr


def test_help_config_lists_documented_settings(capsys):
    assert main(["--help-config"]) == 0
    out = capsys.readouterr().out
    assert "distill.updates_per_round = 400" in out or "distill.updates_per_round =" in out
    assert "model.parameterization" in out


@pytest.mark.parametrize("argv", [["--config", "/nonexistent.yaml"]])
def test_missing_config_file(argv, capsys):
    assert main(argv) == 2
    assert "does not exist" in capsys.readouterr().err


def _folder_of_images(root: Path) -> Path:
    from PIL import Image
    import numpy as np

    g = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (root / cls).mkdir(parents=True)
        for i in range(20):
            Image.fromarray(g.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


@pytest.mark.parametrize("source", ["mnist", "cifar10-npz", "folder"])
def test_real_layouts_train_through_the_same_reader(source, tmp_path, capsys):
    from tests.assets import asset

    if source == "mnist":
        data = ["data.source=mnist", f"data.path={asset('t10k-images-idx3-ubyte.gz')}",
                f"data.labels_path={asset('t10k-labels-idx1-ubyte.gz')}", "data.num_classes=10"]
    elif source == "cifar10-npz":
        data = ["data.source=npz", f"data.path={asset('cifar10_test_jpeg75.npz')}", "data.channels=3",
                "data.random_flip=true", "data.num_classes=10"]
    else:
        data = ["data.source=folder", f"data.path={_folder_of_images(tmp_path / 'imgs')}", "data.channels=3",
                "eval.reference_samples=32"]
    args = TINY + data + ["teacher.updates=3", "distill.start_steps=2", "distill.updates_per_round=2",
                          "eval.classifier_updates=5",
                          f"run.storage_path={tmp_path}", "run.name=r"]
    assert main(args) == 0, capsys.readouterr().err
    manifest = json.loads(next((tmp_path / "r" / "data").glob("*/manifest.json")).read_text())
    assert manifest["resolution"] == 8
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["rounds"][0]["skipped_samples"] == 0


def test_missing_shards_fail_at_start_up(tmp_path, capsys):
    assert main(TINY + ["data.source=shards", f"data.shards={tmp_path}/train-{{000000..000003}}.tar",
                        f"run.storage_path={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "data error" in err and "train-000000.tar" in err


def test_run_directory_guards(tmp_path, capsys):
    args = TINY + [f"run.storage_path={tmp_path}", "run.name=g", "teacher.updates=2", "distill.start_steps=2",
                   "teacher.sampling_steps=2", "distill.updates_per_round=2", "eval.reference_samples=16",
                   "eval.classifier_updates=2"]
    assert main(["--resume", *args]) == 2
    assert "holds no run to resume" in capsys.readouterr().err
    assert main(args) == 0
    run = tmp_path / "g"
    capsys.readouterr()
    # settings that change what was trained cannot continue the run; evaluation settings can change
    assert main([*args, "model.ch=64", "model.head_channels=64"]) == 2
    err = capsys.readouterr().err
    assert "model.ch (32 -> 64)" in err and "--restart" in err
    assert main(["--resume", *args, "eval.grid_size=4"]) == 0
    assert "has finished already" in capsys.readouterr().err
    # --restart moves the finished run aside and starts a new one in its place
    assert main(["--restart", *args]) == 0
    archived = [p for p in tmp_path.iterdir() if p.name.startswith("g.")]
    assert len(archived) == 1 and (archived[0] / "round-00-1steps" / "model.safetensors").is_file()
    assert (run / "round-00-1steps" / "model.safetensors").is_file()
    # a checkpoint cut short after it was written is recognised, kept aside and redone, never loaded
    weights = run / "round-00-1steps" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (run / "report.md").unlink()
    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "round-00-1steps is damaged" in err and "redoing the round 0" in err
    assert any(p.name.startswith("round-00-1steps.damaged-") for p in run.iterdir())
    from raypd.checkpoint import load_checkpoint

    load_checkpoint(run / "round-00-1steps")
    assert main(["--dry-run", *args]) == 0
    out = capsys.readouterr().out
    assert "round 0" in out and "2->1" in out and "exists: the run would continue there" in out


GUIDED = ["data.num_classes=10", "model.class_dropout=0.2", "distill.guidance_max=2", "distill.guidance_updates=6",
          "eval.guidance=[0,2]", "dist.checkpoint_every=3",
          "eval.max_standard_steps=2", "eval.many_step_samples=0"]  # the first stage's 4-step student is not scored


def test_guided_pipeline_runs_to_a_one_step_w_student_resumes_after_a_kill_and_reports_against_w(
        tmp_path, monkeypatch, capsys):
    from raypd.checkpoint import read_meta
    from raypd.cli import main as cli
    from raypd.train.stage_loop import StageLoop

    args = TINY + GUIDED + [f"run.storage_path={tmp_path}", "run.name=guided"]
    original = StageLoop._update

    def killed(self, k, batches):  # the driver dies inside the first stage, after its checkpoint at update 3
        if self.stage.phase == "guidance" and k == 5:
            raise KeyboardInterrupt("killed")
        return original(self, k, batches)

    with monkeypatch.context() as patch:
        patch.setattr(StageLoop, "_update", killed)
        with pytest.raises(KeyboardInterrupt):
            main(args)
    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "[teacher] loading" in err and "[round 0] resumed from the checkpoint at update 3 of 6" in err
    run = tmp_path / "guided"
    summary = json.loads((run / "summary.json").read_text())
    assert [(r["teacher_steps"], r["student_steps"], r["updates"], r.get("phase", ""))
            for r in summary["rounds"]] == [(4, 4, 6, "guidance"), (4, 2, 10, ""), (2, 1, 10, "")]
    assert [r["compute"] for r in summary["rounds"]] == [5 * 6 * 32, 5 * 16 * 32, 5 * 26 * 32]
    points = [(r["sampler"], r["steps"], r["guidance"]) for r in summary["eval"]]
    assert points == [(s, n, w) for w in (0.0, 2.0) for s, n in (("teacher_ddim", 4), ("teacher_ddim", 2),
                                                                 ("teacher_ddim", 1))] + \
        [("distilled", n, w) for n in (2, 1) for w in (0.0, 2.0)]
    for row in summary["eval"]:
        assert 0.0 <= row["label_accuracy"] <= 1.0 and row["fid"] > 0
    # guidance changes the samples: the teacher's full sampler at w = 2 is not its w = 0 sampler
    full = {r["guidance"]: r for r in summary["eval"] if r["sampler"] == "teacher_ddim" and r["steps"] == 4}
    assert full[0.0]["fid"] != full[2.0]["fid"]
    assert not read_meta(run / "teacher").guidance_input
    assert all(read_meta(run / r["checkpoint"]).guidance_input for r in summary["rounds"])
    assert len(list((run / "eval").glob("teacher-full-*-w*.npy"))) == 2
    report = (run / "report.md").read_text()
    assert "### w = 2" in report and "![FID vs guidance weight](fid_vs_guidance.png)" in report
    assert "4 -> 4 (guidance)" in report and "label acc." in report
    assert "| 0 | 4 -> 4 (guidance) |" in report and report.split("| 0 | 4 -> 4 (guidance) |")[1].split("\n")[0].endswith("| - |")
    assert "its 4-step student is not scored (eval.many_step_samples=0)" in err
    assert (run / "fid_vs_guidance.png").read_bytes()[:4] == b"\x89PNG"
    assert (run / "grids" / "distilled-0001steps-w2.png").is_file()

    final = run / summary["final_checkpoint"]
    assert cli(["sample", "--checkpoint", str(final), "--n", "4", "--out", str(tmp_path / "g.png")]) == 2
    assert "pass --guidance W" in capsys.readouterr().err
    assert cli(["sample", "--checkpoint", str(final), "--n", "4", "--guidance", "2", "--out",
                str(tmp_path / "g.png")]) == 0
    capsys.readouterr()
    assert cli(["fid", "--checkpoint", str(final), "--n", "16", "--guidance", "2"]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ours = next(r for r in summary["eval"] if r["sampler"] == "distilled" and r["steps"] == 1 and r["guidance"] == 2)
    assert scored["fid"] == pytest.approx(ours["fid"], rel=1e-4)
    assert scored["label_accuracy"] == ours["label_accuracy"]
