"""How often a two-process gloo + DDP job fails at exit, with and without `end_worker`.

A torchrun worker of this torch build sometimes aborts in the interpreter's teardown after its
work is done and its process group destroyed ("terminate called without an active exception",
SIGABRT, no Python frame), and torchrun then reports the whole job failed. It shows on a loaded
machine, so this script keeps memory-bound busy loops running beside the launches. Each launch
runs a few DDP steps on a small linear layer, a barrier and `destroy_process_group`; the
"teardown" variant then returns normally, the "end_worker" variant ends through
`microtransformer.distributed.end_worker` (what the CLI does). Launches alternate between the
two, so both see the same load:

    python benchmarks/gloo_exit.py --launches 30 --out benchmarks/results/gloo_exit.json

Prints, per variant, how many launches exited non-zero and how many of those were the abort.
docs/DISTRIBUTED.md, "Exit codes".
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("teardown", "end_worker")
ABORT = "terminate called without an active exception"
LOAD = "import numpy as np\na = np.ones(4_000_000)\nwhile True: a = a * 1.0000001"


def worker(variant: str) -> None:
    """One rank: a few DDP steps, a barrier, the group destroyed, then exit as `variant` says."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from microtransformer import distributed

    dist.init_process_group("gloo")
    distributed._GROUP_USED.set()  # what distributed.init_process_group records
    model = DistributedDataParallel(torch.nn.Linear(256, 256))
    for _ in range(3):
        model(torch.randn(8, 256)).sum().backward()  # (8, 256) -> scalar; buckets all-reduced
    del model
    dist.barrier()
    dist.destroy_process_group()
    if variant == "end_worker":
        distributed.end_worker(0)


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(variant: str) -> tuple[int, bool]:
    """One two-process torchrun launch of `worker`; (exit code, whether the abort was printed)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node",
           "2", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}",
           "--local_addr", "127.0.0.1", __file__, "--worker", variant]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    return proc.returncode, ABORT in proc.stdout + proc.stderr


def main() -> None:
    """Alternate launches of both variants beside busy loops; print and write the counts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=int, default=30, help="launches per variant")
    parser.add_argument("--load", type=int, default=6, help="busy-loop processes beside them")
    parser.add_argument("--out", type=Path, help="write the counts here as JSON")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return

    import torch

    from microtransformer.device import cpu_model

    counts = {v: {"launches": 0, "failed": 0, "aborted": 0} for v in VARIANTS}
    load = [subprocess.Popen([sys.executable, "-c", LOAD]) for _ in range(args.load)]
    start = time.perf_counter()
    try:
        for i in range(args.launches * len(VARIANTS)):
            variant = VARIANTS[i % len(VARIANTS)]
            code, aborted = launch(variant)
            c = counts[variant]
            c["launches"] += 1
            c["failed"] += code != 0
            c["aborted"] += aborted
            print(f"{i + 1:3d} {variant:10s} exit {code}{'  (abort)' if aborted else ''}",
                  flush=True)
    finally:
        for p in load:
            p.kill()
            p.wait()
    for v, c in counts.items():
        print(f"{v}: {c['failed']} of {c['launches']} launches failed ({c['aborted']} aborts)")
    if args.out:
        record = {"counts": counts, "busy_loops": args.load,
                  "cpu": cpu_model(), "cores": os.cpu_count(),
                  "torch": torch.__version__, "seconds": round(time.perf_counter() - start, 1)}
        args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
