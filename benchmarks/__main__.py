"""`make bench`: run every `benchmarks/bench_*.py` in turn, each in its own process.

Each module prints its own table (ours beside the raw baseline measured in the same run).
`python -m benchmarks nats_path` runs only the named ones.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    here = Path(__file__).parent
    names = argv or sorted(p.stem.removeprefix("bench_") for p in here.glob("bench_*.py"))
    failed = 0
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        code = subprocess.call([sys.executable, "-m", f"benchmarks.bench_{name}"])
        failed += code != 0
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
