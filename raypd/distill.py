"""``python -m raypd.distill [--config FILE] [section.key=value ...]``: the whole pipeline.

With no arguments it runs local single-node test mode: a small UNet on scikit-learn's bundled
handwritten digits, on CPU, teacher training and every halving round in minutes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m raypd.distill",
        description="Progressive distillation of a diffusion model: teacher, halving rounds, evaluation, report.",
    )
    parser.add_argument("--config", help="YAML config file (default: local test mode)")
    parser.add_argument("--storage", help="directory of the run's files, same as run.storage_path (default: ./raypd_runs)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the config, data and teacher checkpoint and print the plan; start nothing")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue the run in the storage path, failing when there is none (the default "
                           "continues one when there is one and starts one otherwise)")
    mode.add_argument("--restart", action="store_true",
                      help="move an existing run aside (renamed with a date; nothing is deleted) and start over")
    parser.add_argument("--help-config", action="store_true", help="list every setting with its default and meaning")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="settings that override the config")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from raypd.config import ConfigError, field_docs, load_config
    from raypd.methods import method_for, option_docs

    if args.help_config:
        for key, default, doc in field_docs() + option_docs():
            print(f"{key} = {default}\n    {doc}")
        return 0
    try:
        overrides = list(args.overrides) + ([f"run.storage_path={args.storage}"] if args.storage else [])
        cfg = load_config(args.config, overrides)
        method_for(cfg)  # the method's own settings, checked before anything starts
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        from raypd.plan import dry_run

        return dry_run(cfg)
    from raypd.checkpoint import CheckpointError
    from raypd.data.shards import DataError
    from raypd.distributed.sweep import SweepError
    from raypd.distributed.trainer import ClusterError, NumericalError, StageError
    from raypd.pipeline import run_pipeline
    from raypd.runs import RunStateError
    from raypd.storage import StorageError

    try:
        summary = run_pipeline(cfg, mode="resume" if args.resume else "restart" if args.restart else "auto")
    except RunStateError as err:
        print(f"run error: {err}", file=sys.stderr)
        return 2
    except StorageError as err:
        print(f"storage error: {err}", file=sys.stderr)
        return 2
    except CheckpointError as err:
        print(f"checkpoint error: {err}", file=sys.stderr)
        return 2
    except (DataError, FileNotFoundError) as err:
        print(f"data error: {err}", file=sys.stderr)
        return 2
    except ClusterError as err:
        print(f"cluster error: {err}", file=sys.stderr)
        return 2
    except (NumericalError, SweepError) as err:
        print(f"training error: {err}", file=sys.stderr)
        return 2
    except StageError as err:
        print(f"{err.category} error: {err}", file=sys.stderr)
        return 2
    run = Path(summary["report"]).parent
    print(f"final student ({summary['rounds'][-1]['student_steps']} steps): {run / summary['final_checkpoint']}")
    print(f"report: {summary['report']}")
    return 0


def interruptible(command, argv: list[str] | None = None, *, after: str = "") -> int:
    """``command(argv)``, with Ctrl-C answered by a line and exit status 130 rather than a traceback."""
    try:
        return command(argv)
    except KeyboardInterrupt:
        print(f"\ninterrupted (Ctrl-C){after}", file=sys.stderr)
        return 130


RESUMES = ": the run's checkpoints are kept, and the same command continues it from the last one"


if __name__ == "__main__":
    sys.exit(interruptible(main, after=RESUMES))
