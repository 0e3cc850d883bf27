"""`python -m microtransformer.study --worker SPEC`: one run's subprocess (internal)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from microtransformer.study.worker import worker_main


def _main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m microtransformer.study")
    p.add_argument("--worker", required=True, help="spec.json of one run (internal)")
    args = p.parse_args(argv)
    return worker_main(args.worker)


if __name__ == "__main__":
    sys.exit(_main())
