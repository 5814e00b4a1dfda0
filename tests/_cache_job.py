"""Writes feature caches over and over with `tpad.stage1.save_features`, for `tests/test_faults.py`; not a test.

    python tests/_cache_job.py DIR ROWS DIM [--copies K] [--pause P] [--max-seconds S]

Imports tpad once, then forks K writers (one import instead of K: it is the slow part). Writer i writes the cache
DIR/C<i>/h_K.safetensors again and again: version v (0, 1, 2, ...) is `features(ROWS, DIM, v)` (a fixed random
matrix plus v) under the key `key(ROWS, DIM, v)`. Its log DIR/C<i>/h_K.safetensors.log starts with `pid <pid> 0`;
before each write it appends `start v <time>`, after it `done v <time>`, so a test that SIGKILLs the writer knows
which versions can be on disk: the last one done and the one started after it. A writer sleeps P seconds
after each write (the cache sits sealed, as between runs). The job waits for its writers
(killed, or stopped after S seconds) and prints how each ended.
"""
import argparse
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, so `tpad` imports from the checkout

import torch

from tpad.stage1 import save_features


def features(rows: int, dim: int, version: int) -> torch.Tensor:
    "Version `version` of the cached matrix: the same random [rows, dim] matrix every time, plus `version`."
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(0)) + version


def key(rows: int, dim: int, version: int) -> dict: return dict(test='cache-kill', rows=rows, dim=dim, version=version)


def item_ids(rows: int) -> list: return [f'item-{i}' for i in range(rows)]


def cache_path(folder, i: int) -> Path: return Path(folder) / f'C{i}' / 'h_K.safetensors'


def write_forever(path: Path, rows: int, dim: int, seconds: float, pause: float = 0.0):
    "Write versions 0, 1, 2, ... of the cache at `path` until killed or `seconds` have passed."
    path.parent.mkdir(parents=True, exist_ok=True)
    base, ids = features(rows, dim, 0), item_ids(rows)
    t_end = time.time() + seconds
    with open(f'{path}.log', 'a', buffering=1) as log:  # line-buffered: each line is out before the next step
        log.write(f'pid {os.getpid()} 0\n')
        v = 0
        while time.time() < t_end:
            log.write(f'start {v} {time.time():.6f}\n')
            save_features(path, base + v, key(rows, dim, v), ids)
            log.write(f'done {v} {time.time():.6f}\n')
            v += 1
            time.sleep(pause)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('folder')
    ap.add_argument('rows', type=int)
    ap.add_argument('dim', type=int)
    ap.add_argument('--copies', type=int, default=1, help='writers, each with its own cache')
    ap.add_argument('--pause', type=float, default=0.0, help='seconds to sleep after each write')
    ap.add_argument('--max-seconds', type=float, default=120, help='stop after this long if nobody killed them')
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # before forking: no thread pool is carried into the children
    children = {}
    for i in range(args.copies):
        pid = os.fork()
        if pid == 0:
            try: write_forever(cache_path(args.folder, i), args.rows, args.dim, args.max_seconds, args.pause)
            except BaseException:
                traceback.print_exc()
                sys.stderr.flush()
                os._exit(1)
            os._exit(0)
        children[pid] = i
    while children:
        pid, status = os.wait()
        i = children.pop(pid)
        how = f'signal {os.WTERMSIG(status)}' if os.WIFSIGNALED(status) else f'exit {os.WEXITSTATUS(status)}'
        print(f'writer C{i} (pid {pid}): {how}', flush=True)


if __name__ == '__main__': main()
