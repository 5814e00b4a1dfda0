"""Start-up time of the `tpad` command: how long each command takes before (and including) its first output.

    python bench/bench_startup.py              # 5 repeats of each command, median and max
    python bench/bench_startup.py --repeats 9

Each command runs in a fresh process (`sys.executable -m tpad.cli ...`, the console script's entry point), so the
times include the Python start and every import the command needs. Goals (issue 15): `tpad --help` under 1.5 s,
`tpad data stats` under 3 s. Numbers go to stdout and bench/results/bench_startup.json (gitignored); nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = {'tpad --help': ['--help'], 'tpad data stats': ['data', 'stats'], 'tpad run --help': ['run', '--help']}
GOALS = {'tpad --help': 1.5, 'tpad data stats': 3.0}


def cpu() -> str:
    try: return next(l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name'))
    except (OSError, StopIteration): return platform.processor() or platform.machine()


def timed(args: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, '-c', 'from tpad.cli import main; main()', *args], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--repeats', type=int, default=5)
    ap.add_argument('--out', default=str(Path(__file__).parent / 'results' / 'bench_startup.json'))
    args = ap.parse_args()
    load_before = os.getloadavg()
    results = {}
    for name, argv in COMMANDS.items():
        timed(argv)  # warm the file cache once
        times = [timed(argv) for _ in range(args.repeats)]
        results[name] = dict(median_s=round(statistics.median(times), 3), max_s=round(max(times), 3),
                             goal_s=GOALS.get(name), meets_goal=None if name not in GOALS else statistics.median(times) < GOALS[name])
        print(f"{name:18s} median {results[name]['median_s']:.3f} s, max {results[name]['max_s']:.3f} s"
              + (f" (goal < {GOALS[name]} s)" if name in GOALS else ''))
    info = dict(results=results, repeats=args.repeats, cpu=cpu(), cores=os.cpu_count(), python=platform.python_version(),
                load_average_before=load_before, load_average_after=os.getloadavg())
    print(f"load average before {load_before[0]:.2f}, after {info['load_average_after'][0]:.2f}; {info['cpu']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(info, indent=1))


if __name__ == '__main__':
    main()
