"""One halving round as a Ray Tune sweep: every trial a full Ray Train run of that round.

The search covers the round's learning rate (log-uniform), its update budget (a choice) and any
other setting given as ``dotted.key=v1|v2``; with ``sweep.lrs`` it is a grid over all three. Every
trial reports the distillation loss on one fixed held-out set of (x, noise, t), so trials compare
fairly, and ASHA stops the poor ones early. A finished trial's student is scored by FID (the run's
extractor and reference statistics) when ``sweep.fid`` is on, from ``sweep.fid_seeds`` noise seeds:
the same noise for every trial, so the trials compare paired, and the mean over seeds keeps one draw
from deciding. The chosen trial (lowest FID, else lowest held-out loss, among the trials that
finished their budget) is promoted to the round's checkpoint; without a grid, its learning rate
centres the next round's search, and its budget and choices are the next round's first point. A guided distillation's
first stage sweeps its own rate (``distill.guidance_lr``) and centres nothing: the rounds after it
search around ``distill.lr``.

Ray 2.60 no longer takes a Trainer inside a Tuner: the trainable is a function that fits a
``TorchTrainer`` whose reports reach Tune through ``TuneReportCallback``.

Resuming reads raypd's own records, never Tune's pickled experiment state (``Tuner.restore`` would
unpickle whatever the run's storage holds, on the driver). The trials are drawn before Tune starts
and kept in ``plan.json``; each trial keeps, in ``trials/<trial>/``, its held-out curve
(``history.json``), its outcome (``final.json``), ASHA's decision to stop it (``stopped.json``) or
an error a rerun would meet again (``error.json``; a trial lost with its node is retried instead). A sweep started again runs a fresh Tune experiment over the same trials:
a finished, stopped or failed trial replays its record and is not rerun, an unfinished one replays
its curve (so ASHA sees where it stood) and continues its Train run, named after the trial, from
that run's last checkpoint.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raypd.checkpoint import publish_checkpoint, read_meta
from raypd.config import Config, config_from_dict
from raypd.eval.setup import EvalSpec
from raypd.methods import method_for
from raypd.train.rounds import Round
from raypd.train.stage import Stage

DIVERGED = 1e30
PLAN = "plan.json"
"""The round's trials and their settings, drawn once: a sweep started again runs the same trials."""
STARTS = "sweep-starts.log"
"""One line per start of the round's sweep; each start is a Tune experiment of its own (``tune``, ``tune-2``, ...)."""
SWEEP_NOISE = 10_000
"""Offset of the noise seeds trials are scored from, away from the evaluation's own (``eval.seed``): the run
reports the chosen student's FID from noise the choice was not made on."""


class SweepError(RuntimeError):
    """A sweep that produced no usable student (every trial failed or was stopped)."""


@dataclass
class SweepOutcome:
    chosen: dict[str, Any]
    """The chosen trial's row."""
    reason: str
    rows: list[dict[str, Any]]
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    report: Path | None = None


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def search_space(cfg: Config, planned_updates: int, centre: dict[str, Any] | None, stage_lr: float | None = None):
    """Tune's param space and the first point to evaluate (the centre: configured or previously chosen; else the
    stage's own learning rate ``stage_lr``, default ``distill.lr``)."""
    from ray import tune

    s = cfg.sweep
    lo, hi = s.lr_min, s.lr_max
    if centre is not None:  # keep the span, move it to the learning rate chosen last round
        span = math.sqrt(hi / lo)
        lo, hi = centre["lr"] / span, centre["lr"] * span
    budgets = round_budgets(cfg, planned_updates)
    extra = {key: [yaml.safe_load(v) for v in values] for key, values in s.choice_items()}
    batch_key, examples = "distill.batch_size", s.examples
    if examples:  # the budget follows the trial's batch size: a value of its own, not a dimension of the search
        def budget(config: dict[str, Any]) -> int:
            from ray.tune.search.sample import Domain
            from ray.tune.search.variant_generator import RecursiveDependencyError

            if isinstance(config[batch_key], Domain):  # not drawn yet: Tune comes back once it is
                raise RecursiveDependencyError(f"{batch_key} is not drawn yet")
            return examples // int(config[batch_key])

        updates: Any = tune.sample_from(budget) if batch_key in extra else budgets[0]
    if s.lrs:  # an explicit grid: one trial per learning rate, budget and choice together, no centre point
        return {"lr": tune.grid_search(list(s.lrs)), "updates": updates if examples else tune.grid_search(budgets),
                **{key: tune.grid_search(options) for key, options in extra.items()}}, None
    space: dict[str, Any] = {"lr": tune.loguniform(lo, hi), "updates": updates if examples else tune.choice(budgets),
                             **{key: tune.choice(options) for key, options in extra.items()}}
    centre = centre or {}
    own = cfg.distill.lr if stage_lr is None else stage_lr
    first: dict[str, Any] = {"lr": centre["lr"] if centre else min(max(own, lo), hi),
                             "updates": centre["updates"] if centre.get("updates") in budgets else budgets[-1],
                             **{key: centre[key] if key in centre and centre[key] in options else options[0]
                                for key, options in extra.items()}}
    if examples and batch_key in extra:
        del first["updates"]  # Tune works it out from the first point's batch size (and refuses one given with it)
    elif examples:
        first["updates"] = budgets[0]
    return space, first


def round_budgets(cfg: Config, planned_updates: int) -> list[int]:
    """The update budgets a swept round's trials can have: ``sweep.updates``, or one per batch size at
    ``sweep.examples`` examples, or the round's planned budget."""
    from raypd.config.load import sweep_batches

    if cfg.sweep.examples:
        return [cfg.sweep.examples // b for _, b in sweep_batches(cfg)]
    return list(cfg.sweep.updates) or [planned_updates]


def trial_config(base: dict[str, Any], params: dict[str, Any], lr_key: str = "distill.lr") -> Config:
    """The run's config with one trial's settings applied (and at least one Train worker); ``lr_key``: the setting
    the stage's learning rate comes from (``raypd.methods.Method.lr_key``)."""
    overrides = [f"{lr_key}={params['lr']!r}"] + [f"{k}={json.dumps(v)}" for k, v in params.items()
                                                  if k not in ("lr", "updates")]
    cfg = config_from_dict(base, overrides)
    if cfg.dist.workers == 0:
        cfg = config_from_dict(cfg.to_dict(), ["dist.workers=1"])
    return cfg


def _trial(params: dict[str, Any], static: dict[str, Any]) -> None:
    """The Tune trainable: one Ray Train run of the round with this trial's settings, then its score."""
    from ray import tune

    from raypd.distributed.trainer import StageError, run_stage

    from raypd.storage import child, is_uri, upload_dir, write_text

    began = time.perf_counter()
    name = params["trial"]
    settings = static["trials"][name]
    stage = Stage.from_dict(static["stage"])
    cfg = trial_config(static["config"], settings, lr_key=static["lr_key"])
    sweep_dir = static["sweep_dir"]  # a directory every node shares, or the run's bucket
    trial_dir = child(sweep_dir, "trials", name)
    rec = _records(sweep_dir, name)
    history = {int(u): v for u, v in (rec["history"] or {}).items()}
    for update in sorted(history):  # where the trial stood before this start, for ASHA to judge
        tune.report({"update": update, "heldout_loss": history[update], "replayed": 1})
    if rec["final"] is not None:  # finished before the sweep's driver died: report, never retrain
        tune.report(rec["final"])
        return
    if rec["stopped"] is not None:  # stopped early by ASHA before the driver died: stays stopped
        return
    if rec["error"] is not None:
        raise TrialFailed(rec["error"]["error"])
    _log_start(child(trial_dir, "starts.log"))  # one line per time this trial's driver started
    updates = int(settings["updates"])
    stage = stage.with_(name=f"trial-{name}", updates=updates)
    remote = is_uri(sweep_dir)
    output = Path(tempfile.mkdtemp(prefix="raypd-trial-")) / "student" if remote else Path(trial_dir) / "student"
    try:
        last = run_stage(cfg, stage, storage=child(sweep_dir, "train"), output=output,
                         callbacks=[report_and_record(child(trial_dir, "history.json"), history)])
    except StageError as err:  # one a rerun would meet again: recorded, so that a later start does not rerun it
        write_text(child(trial_dir, "error.json"), json.dumps({"error": f"{type(err).__name__}: {err}"}))
        raise
    if remote:
        upload_dir(output, child(trial_dir, "student"))
        shutil.rmtree(output.parent, ignore_errors=True)
    final = {"update": updates, "heldout_loss": float(last.get("heldout_loss", DIVERGED)), "finished": 1}
    if static.get("eval") and final["heldout_loss"] < DIVERGED:
        import ray

        from raypd.distributed.cluster import task_options, worker_bundle

        # scored where a worker of the trial ran: a task holding one worker's bundle (its GPU with use_gpu),
        # outside the trial's own placement group (which holds memory only)
        score = ray.remote(_score).options(**task_options(worker_bundle(cfg)), max_retries=2,
                                           scheduling_strategy="DEFAULT")
        fids = ray.get(score.remote(child(trial_dir, "student"), static["eval"], cfg.sweep.fid_seeds))
        final["fid"] = sum(fids) / len(fids)
        if len(fids) > 1:
            final["fid_by_seed"] = fids
    final["wall_seconds"] = round(time.perf_counter() - began, 1)
    write_text(child(trial_dir, "final.json"), json.dumps(final))
    tune.report(final)


def _log_start(location: str) -> int:
    """Append this start's time to the start log at ``location``; returns the starts logged, this one included."""
    from raypd.storage import read_text, write_text

    text = (read_text(location) or "") + f"{time.time():.0f}\n"
    write_text(location, text)
    return text.count("\n")


class TrialFailed(RuntimeError):
    """A trial that failed before the sweep's driver last started: it fails again without running."""


def report_and_record(path: str, history: dict[int, float]):
    """A ``TuneReportCallback`` that also keeps the trial's held-out curve (``history``: the points so far) in its
    ``history.json`` at ``path``. Ray Train's callbacks run in the Train run's controller; the point is recorded
    before Tune hears of it, so that a trial stopped on it has it recorded."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from raypd.storage import write_text

    class Recorded(TuneReportCallback):
        def __init__(self, path: str, history: dict[int, float]):
            super().__init__()
            self.path, self.history = path, dict(history)

        def after_report(self, run_context, metrics, checkpoint):
            point = metrics[0]
            if "update" in point and "heldout_loss" in point:
                self.history[int(point["update"])] = float(point["heldout_loss"])
                write_text(self.path, json.dumps({str(u): v for u, v in sorted(self.history.items())}))
            super().after_report(run_context, metrics, checkpoint)

    return Recorded(path, history)


def _score(student_dir: str, spec: dict, seeds: int = 1) -> list[float]:
    """FIDs of the trial's student at its steps from ``seeds`` noise seeds (``SWEEP_NOISE`` past the
    evaluation's, +1, ...), against the run's cached reference statistics (on the GPU the task holds, when it
    holds one); a guided distillation's at the middle of its scored guidance weights."""
    import torch

    from raypd.checkpoint import load_checkpoint
    from raypd.config import config_from_dict
    from raypd.eval.chunks import chunks_for, collect, run_here

    from raypd.storage import fetch

    spec = EvalSpec.from_dict(spec).with_locations(fetch)
    model, meta = load_checkpoint(Path(fetch(student_dir)))
    d = meta.data
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    guidance = config_from_dict(meta.config).middle_guidance_weight() if meta.guidance_input else None
    fids = []
    for seed in range(spec.seed + SWEEP_NOISE, spec.seed + SWEEP_NOISE + seeds):
        chunks = chunks_for(spec.num_samples, "ddim", meta.sampling_steps, data=d, seed=seed,
                            precision=meta.config.get("eval", {}).get("precision", "auto"), extractor=spec.extractor,
                            kid=False, prc=False, chunk_size=meta.config.get("eval", {}).get("chunk_size", 2048),
                            guidance=guidance)
        point = collect(run_here(model, chunks, logsnr_fn=meta.logsnr_fn(), device=device),
                        n=spec.num_samples, shape=(d.channels, d.resolution, d.resolution), grid_size=0, full=None)
        fids.append(float(spec.score(features=point.features, kid=False, prc=False)["fid"]))
    return fids


def draw_trials(cfg: Config, space: dict[str, Any], first: dict[str, Any] | None, seed: int) -> dict[str, dict]:
    """The round's trials, named ``t00``, ``t01``, ...: the first point (when there is one), then Tune's own draws
    from ``space`` (a grid's every combination, else ``sweep.trials`` in all), seeded."""
    import numpy as np
    from ray.tune.search.variant_generator import generate_variants

    rng = np.random.RandomState(seed)
    drawn = [v for _, v in generate_variants({**space, **first}, random_state=rng)] if first is not None else []
    if cfg.sweep.lrs:
        drawn += [v for _, v in generate_variants(space, random_state=rng)]
    while len(drawn) < (1 if cfg.sweep.lrs else cfg.sweep.trials):
        drawn += [v for _, v in generate_variants(space, random_state=rng)]
    plain = json.loads(json.dumps(drawn, default=lambda v: v.item()))  # numpy scalars as JSON numbers
    return {f"t{i:02d}": trial for i, trial in enumerate(plain)}


def plan_trials(cfg: Config, store: str, space: dict[str, Any], first: dict[str, Any] | None,
                seed: int) -> dict[str, dict]:
    """The round's trials: drawn and written to ``plan.json`` on the sweep's first start, read back after."""
    from raypd.storage import child, read_text, write_text

    saved = read_text(child(store, PLAN))
    if saved is not None:
        return json.loads(saved)["trials"]
    trials = draw_trials(cfg, space, first, seed)
    write_text(child(store, PLAN), json.dumps({"seed": seed, "trials": trials}, indent=2))
    return trials


def _records(store: str, name: str) -> dict[str, Any]:
    """A trial's records, each None where absent: final, stopped, error, history, starts."""
    from raypd.storage import child, read_text

    where = child(store, "trials", name)
    found = {key: read_text(child(where, f"{key}.json")) for key in ("final", "stopped", "error", "history")}
    records: dict[str, Any] = {key: json.loads(text) if text is not None else None for key, text in found.items()}
    records["starts"] = (read_text(child(where, "starts.log")) or "").count("\n")
    return records


def _rows(trials: dict[str, dict], grid, store: str) -> tuple[list[dict[str, Any]], dict[str, list[tuple[int, float]]]]:
    """One row per trial (settings, outcome, metric, updates, wall time) and each trial's held-out curve, from the
    trials' own records (``store``: where the trials keep their files, a directory or the run's bucket); ``grid``,
    Tune's results of this start, adds the time of trials that ran in it and errors nothing recorded."""
    results = {}
    for result in grid:
        name = (result.config or {}).get("trial")
        if name is not None:
            results[name] = result
    rows, curves = [], {}
    for name, params in trials.items():
        rec, result = _records(store, name), results.get(name)
        final = rec["final"] or {}
        points = {int(u): float(v) for u, v in (rec["history"] or {}).items() if math.isfinite(float(v))}
        curves[name] = sorted(points.items())
        error = (rec["error"] or {}).get("error") or (str(result.error) if result is not None and result.error else None)
        if final.get("finished"):
            status = "diverged" if final["heldout_loss"] >= DIVERGED else "finished"
        elif rec["stopped"] is None and error is not None:
            status = "failed"
        else:  # stopped by ASHA (a trial being stopped may see its Train run end in an error)
            status, error = "stopped early", None
        seconds = final.get("wall_seconds") or (rec["stopped"] or {}).get("wall_seconds")
        if seconds is None and result is not None:
            seconds = float((result.metrics or {}).get("time_total_s", 0.0))
        rows.append({
            "trial": name, "lr": params.get("lr"), "updates": params.get("updates"),
            **{k: v for k, v in params.items() if k not in ("lr", "updates")},
            "status": status, "updates_done": int(final.get("update", max(points, default=0))),
            "heldout_loss": final.get("heldout_loss", curves[name][-1][1] if points else None),
            "fid": final.get("fid"), **({"fid_by_seed": final["fid_by_seed"]} if "fid_by_seed" in final else {}),
            "starts": rec["starts"], "wall_seconds": round(float(seconds or 0.0), 1),
            "error": None if error is None else error.strip().splitlines()[-1][:300]})
    return rows, curves


def recording_asha(store: str, **kw):
    """Tune's ASHA scheduler that records each stop it decides in the trial's ``stopped.json``: a sweep started
    again keeps that trial stopped (its own Tune state, which would say so, is never read back)."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from raypd.storage import child, write_text

    class Recording(ASHAScheduler):
        def on_trial_result(self, tune_controller, trial, result):
            action = super().on_trial_result(tune_controller, trial, result)
            if action == TrialScheduler.STOP and not result.get("finished") and not result.get("replayed"):
                write_text(child(store, "trials", trial.config["trial"], "stopped.json"),
                           json.dumps({"update": int(result["update"]),
                                       "wall_seconds": round(float(result.get("time_total_s", 0.0)), 1)}))
            return action

    return Recording(**kw)


def choose(rows: list[dict[str, Any]], by_fid: bool) -> tuple[dict[str, Any], str]:
    """The best finished trial and why it was chosen."""
    done = [r for r in rows if r["status"] == "finished"]
    if not done:
        summary = ", ".join(f"{r['trial']}: {r['status']}" + (f" ({r['error']})" if r["error"] else "") for r in rows)
        raise SweepError(f"no trial finished its budget ({summary}); widen or lower sweep.lr_min/lr_max, "
                         "or raise sweep.grace_updates")
    if by_fid and all(r.get("fid") is not None for r in done):
        best = min(done, key=lambda r: r["fid"])
        seeds = len(best.get("fid_by_seed") or [0])
        what = f"lowest mean FID over {seeds} noise seeds" if seeds > 1 else "lowest FID"
        return best, f"{what} ({best['fid']:.3f}) among {len(done)} finished trials"
    best = min(done, key=lambda r: r["heldout_loss"])
    return best, f"lowest held-out loss ({best['heldout_loss']:.5f}) among {len(done)} finished trials"


def sweep_round(cfg: Config, *, rnd: Round, stage: Stage, sweep_dir: Path, eval_spec: EvalSpec | None,
                centre: dict[str, Any] | None, concurrency: int = 1, store: str | None = None) -> SweepOutcome:
    """Sweep one round (``stage``: its trials' common description, ``concurrency`` trials at once); returns the
    trials and the chosen one. The reports go to ``sweep_dir``; Tune, the trials' Train runs and their files to
    ``store`` (default: ``sweep_dir``; the run's bucket for a run kept in one)."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from raypd.eval.sweep_report import write_round_report

    s = cfg.sweep
    from raypd.storage import child

    sweep_dir = sweep_dir.resolve()
    store = store or str(sweep_dir)
    method = method_for(cfg)
    space, first = search_space(cfg, rnd.updates, centre, stage_lr=method.stage_lr(stage.phase))
    trials = plan_trials(cfg, store, space, first, seed=s.seed + rnd.index)
    static = {"config": cfg.to_dict(), "stage": stage.to_dict(), "sweep_dir": store, "trials": trials,
              "lr_key": method.lr_key(stage.phase),
              "eval": eval_spec.to_dict() if s.fid and eval_spec is not None else None}
    # a trial's own process only waits for its Train run: it asks for memory, no CPU or GPU, so the
    # workers get all of those (Tune refuses an empty request)
    trainable = tune.with_resources(tune.with_parameters(_trial, static=static), {"memory": 256 * 1024**2})
    starts = _log_start(child(store, STARTS))
    budgets = round_budgets(cfg, rnd.updates)
    if starts > 1:
        records = [_records(store, name) for name in trials]
        ended = sum(r["final"] is not None or r["stopped"] is not None or r["error"] is not None for r in records)
        log(f"[round {rnd.index}] resuming the interrupted sweep from its records in {store}: {ended} of "
            f"{len(trials)} trials ended, the others continue from their last checkpoints")
    else:
        lrs = list(s.lrs) or f"[{space['lr'].lower:.2e}, {space['lr'].upper:.2e}]"
        log(f"[round {rnd.index}] Tune sweep: {s.trials_per_round()} trials, lr in {lrs}, updates in {budgets}, "
            f"{''.join(f'{c}, ' for c in s.choices)}ASHA grace {s.grace_updates} updates")
    # max_t one past the largest budget: ASHA stops a trial that reaches max_t, and a trial still
    # has its student to hand over and score after its last Train report; a grace of max_t stops none
    top = max(budgets) + 1
    scheduler = recording_asha(store, time_attr="update", metric="heldout_loss", mode="min", max_t=top,
                               grace_period=min(s.grace_updates, top), reduction_factor=s.reduction_factor)
    # each start is a fresh Tune experiment over the planned trials, in their order, ``concurrency`` at once
    tuner = tune.Tuner(
        trainable, param_space={"trial": tune.grid_search(list(trials))},
        tune_config=tune.TuneConfig(num_samples=1, scheduler=scheduler,
                                    # the limit goes to the generator itself: Tune ignores max_concurrent_trials
                                    # (with a warning) when given a generator rather than a Searcher
                                    search_alg=BasicVariantGenerator(max_concurrent=concurrency)),
        run_config=tune.RunConfig(name="tune" if starts == 1 else f"tune-{starts}", storage_path=store, verbose=0))
    grid = tuner.fit()
    rows, curves = _rows(trials, grid, store)
    chosen, reason = choose(rows, by_fid=s.fid and eval_spec is not None)
    outcome = SweepOutcome(chosen, reason, rows, curves)
    outcome.report = write_round_report(sweep_dir, rnd=rnd, rows=rows, curves=curves, chosen=chosen, reason=reason)
    log(f"[round {rnd.index}] chose trial {chosen['trial']} (lr {chosen['lr']:.3g}, {chosen['updates']} updates): {reason}")
    return outcome


class SweepRunner:
    """Every round as a Tune sweep of Ray Train trials; other stages (the teacher) through ``base``.

    The chosen trial's student becomes the round's checkpoint, and its learning rate, budget and choices
    centre the next round's search (a random one: a grid has no centre; not after a guided first stage,
    whose rate is a setting of its own).
    """

    mode = "tune"

    def __init__(self, cfg: Config, out: Path, base, eval_spec: EvalSpec | None, concurrency: int = 1, mirror=None):
        """``mirror``: the run's bucket mirror; the trials then keep their files in the bucket."""
        self.cfg, self.out, self.base, self.eval_spec = cfg, Path(out), base, eval_spec
        self.concurrency, self.mirror = concurrency, mirror
        self.centre: dict[str, Any] | None = None
        self.choices: list[dict[str, Any]] = []
        self.searched = [key for key, _ in cfg.sweep.choice_items()]

    def heldout(self, stage: Stage, sweep_dir: Path) -> Path:
        """The round's fixed held-out set (the same images, noise and times for every trial), made once."""
        from raypd.data.shards import training_loader
        from raypd.train.heldout import save_heldout

        path = sweep_dir / "heldout.safetensors"
        if not path.is_file():
            cfg, objective = self.cfg, method_for(self.cfg).objective(stage)
            loader = training_loader(list(stage.shards), cfg.data, batch_size=cfg.sweep.heldout_samples,
                                     seed=cfg.run.seed, stream=10_000 + stage.round, pairs=objective.reads_pairs)
            save_heldout(objective.make_heldout(next(iter(loader)), seed=cfg.sweep.seed + stage.round), path)
        return path.resolve()

    def run(self, stage: Stage, output: Path) -> dict:
        if not stage.distills:
            return self.base.run(stage, output)
        rnd = Round(stage.round, stage.steps_of_teacher, stage.student_steps, stage.updates, stage.phase)
        sweep_dir = self.out / "sweeps" / f"round-{rnd.index:02d}"
        trials = stage.with_(kind="trial", heldout=str(self.heldout(stage, sweep_dir)),
                             report_every=self.cfg.sweep.report_every)
        spec, store = self.eval_spec, str(sweep_dir.resolve())
        if self.mirror is not None:  # trials elsewhere read the teacher, shards, held-out set and FID files there
            self.mirror.sync()
            locate = self.mirror.locate
            trials = trials.with_locations(locate)
            spec, store = spec and spec.with_locations(locate), locate(str(sweep_dir))
        start = time.perf_counter()
        outcome = sweep_round(self.cfg, rnd=rnd, stage=trials, sweep_dir=sweep_dir, eval_spec=spec,
                              centre=self.centre, concurrency=self.concurrency, store=store)
        chosen = outcome.chosen
        report = str(outcome.report.relative_to(self.out))
        from raypd.storage import child, fetch

        student = fetch(child(store, "trials", chosen["trial"], "student"))
        publish_checkpoint(Path(student), output, {
            "wall_seconds": time.perf_counter() - start, "updates": chosen["updates"], "lr": chosen["lr"],
            "heldout_loss": chosen["heldout_loss"], "sweep_trials": len(outcome.rows),
            "examples": sum(int(r["updates_done"]) * int(r.get("distill.batch_size") or self.cfg.distill.batch_size)
                            for r in outcome.rows),
            "sweep_reason": outcome.reason, "sweep_report": report,
            "sweep_settings": {k: chosen[k] for k in chosen if k in self.searched}})
        return dict(read_meta(output).metrics)

    def chose(self, round_index: int, teacher_steps: int, student_steps: int, metrics: dict,
              phase: str = "") -> None:
        """Record a round's choice (also for a round finished before this driver started). The next round's
        search is centred on it, unless it was a stage of a phase of its own (a guided first stage), whose
        settings are its own."""
        if "sweep_report" not in metrics:
            return
        settings = metrics.get("sweep_settings") or {}
        if not phase:
            self.centre = {"lr": metrics["lr"], "updates": int(metrics["updates"]), **settings}
        self.choices.append({"round": round_index, "teacher_steps": teacher_steps, "student_steps": student_steps,
                             "lr": metrics["lr"], "updates": int(metrics["updates"]), "settings": settings,
                             "trials": int(metrics["sweep_trials"]), "reason": metrics["sweep_reason"],
                             "report": metrics["sweep_report"]})

    def finish(self) -> str | None:
        """The summary across rounds, relative to the run directory (None when no round was swept)."""
        if not self.choices:
            return None
        from raypd.eval.sweep_report import write_sweeps_summary

        return str(write_sweeps_summary(self.out / "sweeps", self.choices).relative_to(self.out))
