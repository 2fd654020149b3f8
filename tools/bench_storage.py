"""The same local run with its files in a bucket against the same run in a directory (the floor).

Runs ``python -m raypd.distill`` on a small budget twice in one session: once with ``--storage`` a
temporary directory, once with ``--storage s3://...`` on a local S3-compatible server (moto's, on
loopback; the mirror, the pushes and the lease are what is measured, not a network). Prints each
wall time, the bucket run's ratio to the directory run, and how many objects and bytes the bucket holds.

    python tools/bench_storage.py [--teacher-updates 200] [--round-updates 100] [--checkpoint-every 20]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], env: dict) -> float:
    began = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "raypd.distill", *args], env=env, cwd=ROOT, capture_output=True,
                         text=True)
    if out.returncode != 0:
        sys.exit(f"run failed:\n{(out.stdout + out.stderr)[-3000:]}")
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-updates", type=int, default=200)
    parser.add_argument("--round-updates", type=int, default=100)
    parser.add_argument("--checkpoint-every", type=int, default=20)
    a = parser.parse_args()
    from moto.server import ThreadedMotoServer
    from pyarrow import fs

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"}
    s3 = fs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], access_key="bench", secret_key="bench",
                         region="us-east-1", allow_bucket_creation=True)
    s3.create_dir("bench")
    run = ["data.resolution=8", "model.attn_resolutions=[4]", f"teacher.updates={a.teacher_updates}",
           "teacher.sampling_steps=8", "distill.start_steps=8", f"distill.updates_per_round={a.round_updates}",
           f"dist.checkpoint_every={a.checkpoint_every}", "eval.num_samples=64", "eval.reference_samples=256",
           "eval.classifier_updates=50", "run.device=cpu", "run.log_every=1000"]
    try:
        with tempfile.TemporaryDirectory() as directory:
            floor = _run([*run, "--storage", directory], env)
        bucket = _run([*run, "--storage", "s3://bench/runs"], env)
        objects = [i for i in s3.get_file_info(fs.FileSelector("bench/runs", recursive=True))
                   if i.type == fs.FileType.File]
    finally:
        server.stop()
    print(f"run in a directory (floor): {floor:.1f} s")
    print(f"run in a bucket (moto S3 on loopback): {bucket:.1f} s = {bucket / floor:.2f}x the floor; "
          f"{len(objects)} objects, {sum(i.size for i in objects) / 2**20:.1f} MiB in the bucket")


if __name__ == "__main__":
    main()
