"""``raypd <command>``: the pipeline and its tools under one name.

    raypd distill [--config FILE] [section.key=value ...]   the whole pipeline (= python -m raypd.distill)
    raypd shards KIND PATH --out DIR [...]                  write WebDataset shards from a data set
    raypd sample --checkpoint C --steps N --n 64 --out P    a sample grid from a checkpoint
    raypd fid --checkpoint C --steps N --n 10000            FID/KID of a checkpoint's samples
    raypd export --checkpoint C --out DIR                   a student as a diffusers pipeline directory
    raypd compare RUN RUN... [--out DIR]                    distillation methods' runs on one table and plot
"""

from __future__ import annotations

import sys


def _distill(argv: list[str]) -> int:
    from raypd.distill import main as distill_main

    return distill_main(argv)


def _shards(argv: list[str]) -> int:
    from raypd.data.writer import main as writer_main

    return writer_main(argv)


def _sample(argv: list[str]) -> int:
    from raypd.sample import sample_main

    return sample_main(argv)


def _fid(argv: list[str]) -> int:
    from raypd.score import fid_main

    return fid_main(argv)


def _export(argv: list[str]) -> int:
    from raypd.hf.export import main as export_main

    return export_main(argv)


def _compare(argv: list[str]) -> int:
    from raypd.compare import compare_main

    return compare_main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"distill": _distill, "shards": _shards, "sample": _sample, "fid": _fid, "export": _export,
                "compare": _compare}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(__doc__.strip(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown command {argv[0]!r}; expected one of {', '.join(commands)}", file=sys.stderr)
            return 2
        return 0
    from raypd.distill import RESUMES, interruptible

    return interruptible(commands[argv[0]], argv[1:], after=RESUMES if argv[0] == "distill" else "")


if __name__ == "__main__":
    sys.exit(main())
