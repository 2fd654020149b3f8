"""``python -m raypd.distill [--config FILE] [section.key=value ...]``: the whole pipeline.

With no arguments it runs local single-node test mode: a small UNet on scikit-learn's bundled
handwritten digits, on CPU, teacher training and every halving round in minutes.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m raypd.distill",
        description="Progressive distillation of a diffusion model: teacher, halving rounds, evaluation, report.",
    )
    parser.add_argument("--config", help="YAML config file (default: local test mode)")
    parser.add_argument("--help-config", action="store_true", help="list every setting with its default and meaning")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="settings that override the config")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from raypd.config import ConfigError, field_docs, load_config

    if args.help_config:
        for key, default, doc in field_docs():
            print(f"{key} = {default}\n    {doc}")
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    from raypd.checkpoint import CheckpointError
    from raypd.data.shards import DataError
    from raypd.dist.trainer import ClusterError
    from raypd.pipeline import run_pipeline

    try:
        summary = run_pipeline(cfg)
    except CheckpointError as err:
        print(f"checkpoint error: {err}", file=sys.stderr)
        return 2
    except (DataError, FileNotFoundError) as err:
        print(f"data error: {err}", file=sys.stderr)
        return 2
    except ClusterError as err:
        print(f"cluster error: {err}", file=sys.stderr)
        return 2
    print(f"report: {summary['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
