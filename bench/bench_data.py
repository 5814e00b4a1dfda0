"""Time `load('yoochoose', .../yoochoose_100k)` and `preprocess` on it: best and median of a few repeats.

usage: python bench/bench_data.py [--data DIR] [--preset yoochoose] [--repeats 5] [--out bench/results]
Prints a table and writes bench/results/bench_data-<time>.json (the folder is gitignored)."""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path


def timed(f):
    "Run `f()` and return (its value, the seconds it took)."
    t0 = time.perf_counter()
    value = f()
    return value, time.perf_counter() - t0


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--data', type=Path, default=None,
                   help='the yoochoose_100k folder (default: <shared/data>/yoochoose_100k, found by tpad.data.shared_data_dir)')
    p.add_argument('--preset', default='yoochoose', help='preprocessing preset (tpad.preprocess.PREPROCESS_PRESETS)')
    p.add_argument('--repeats', type=int, default=5, help='timed repeats of load + preprocess')
    p.add_argument('--out', type=Path, default=Path(__file__).resolve().parent / 'results', help='folder for the JSON')
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    import numpy as np, pandas as pd
    from tpad.data import load, shared_data_dir
    from tpad.preprocess import preprocess
    import_s = time.perf_counter() - t0

    data_dir = args.data
    if data_dir is None:
        shared = shared_data_dir()
        if shared is None: sys.exit('no shared/data folder found: pass --data <yoochoose_100k folder>')
        data_dir = shared / 'yoochoose_100k'

    times = {'load': [], 'preprocess': [], 'total': []}
    for _ in range(args.repeats):
        data, t_load = timed(lambda: load('yoochoose', data_dir))
        prep, t_prep = timed(lambda: preprocess(data, args.preset))
        times['load'].append(t_load); times['preprocess'].append(t_prep); times['total'].append(t_load + t_prep)

    summary = {k: dict(best=min(v), median=statistics.median(v), runs=v) for k, v in times.items()}
    result = dict(
        bench='bench_data', data=str(data_dir), preset=args.preset, repeats=args.repeats, import_s=import_s,
        seconds=summary, clicks=len(data.interactions), items=prep.n_items,
        samples={s: len(v) for s, v in prep.samples.items()}, cold={s: len(v) for s, v in prep.cold.items()},
        machine=dict(python=platform.python_version(), platform=platform.platform(), cpus=os.cpu_count(),
                     numpy=np.__version__, pandas=pd.__version__),
        when=time.strftime('%Y-%m-%dT%H:%M:%S'))

    print(f"yoochoose_100k: {result['clicks']} clicks -> {result['items']} items, samples {result['samples']}, "
          f"cold {result['cold']}  (import tpad: {import_s:.2f} s, not timed below)")
    print(f"{'step':<11}{'best s':>9}{'median s':>10}   runs ({args.repeats})")
    for k, v in summary.items():
        print(f"{k:<11}{v['best']:>9.3f}{v['median']:>10.3f}   " + ' '.join(f'{t:.3f}' for t in v['runs']))
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"bench_data-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=1))
    print('wrote', out)
    return result


if __name__ == '__main__':
    main()
