"""Throughput and peak memory of tpad's streaming full-catalogue evaluation, against the full score matrix.

    python bench/bench_metrics.py                 # N = 1,000,000 items, d = 64, 4,000 sessions
    python bench/bench_metrics.py --quick         # N = 100,000, 500 sessions: a smoke run
    python bench/bench_metrics.py --help

Two ways of evaluating n sessions against N items are timed, each after a small warm-up:

  stream  `tpad.metrics.evaluate_streaming`: dot-product scores computed `batch_size` sessions x `item_chunk` items at
          a time into one reused buffer; the [n, N] matrix never exists.
  rows    `tpad.metrics.StreamingEvaluator.update` fed with full-catalogue score rows, `--rows-batch` sessions at a
          time (scores = session_batch @ items.T, the shape a model's logits usually come in). Runs on
          `--rows-sessions` sessions, since each batch holds a [rows_batch, N] matrix.

Throughput: sessions/s and item-scores/s (n * N / wall time), the wall time being the median of `--repeats` runs.

Memory: the *peak resident memory added* by one evaluation, i.e. peak RSS during the run minus RSS just before it
(the inputs, about N * d * 4 bytes of item vectors, are already resident and not counted). On Linux the kernel's
peak-RSS mark (VmHWM) is reset before each run by writing "5" to /proc/self/clear_refs and read back from
/proc/self/status afterwards. Where that is not possible the script falls back to `resource.getrusage` ru_maxrss,
which only ever grows: it then reports the growth above the earlier peak, a lower bound that can read 0 (the JSON
says which method was used). tracemalloc is not used: torch allocates tensor memory outside Python's allocator, so
tracemalloc does not see it. The peak is compared with the bytes a full [n, N] float32 score matrix would take
(plus the [n, N] boolean mask a naive `scores >= target_score` adds), and with the buffer the streaming evaluator
is designed to need (batch_size * item_chunk * 4 bytes).

Numbers are printed and written to bench/results/bench_metrics.json (gitignored); nothing is asserted.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from tpad.metrics import StreamingEvaluator, evaluate_streaming  # noqa: E402

MB = 2 ** 20


def _status_kb(field: str) -> int | None:
    "A `VmRSS`/`VmHWM` line of /proc/self/status, in kB (None off Linux)."
    try:
        for line in Path('/proc/self/status').read_text().splitlines():
            if line.startswith(field + ':'): return int(line.split()[1])
    except OSError: pass
    return None


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == 'darwin' else r * 1024  # bytes on macOS, kB on Linux


class PeakMemory:
    "Peak RSS added by the code inside `with PeakMemory() as m:`, in bytes (`m.added`), and how it was measured."
    def __enter__(self):
        gc.collect()
        self.rss0 = (_status_kb('VmRSS') or 0) * 1024
        try:
            Path('/proc/self/clear_refs').write_text('5')  # reset VmHWM to the current RSS
            self.method = 'VmHWM reset via /proc/self/clear_refs'
        except OSError:
            self.method = 'getrusage ru_maxrss growth (lower bound)'
            self.maxrss0 = _maxrss_bytes()
        return self

    def __exit__(self, *exc):
        if self.method.startswith('VmHWM'):
            self.added = max(0, (_status_kb('VmHWM') or 0) * 1024 - self.rss0)
        else:
            self.added = max(0, _maxrss_bytes() - max(self.maxrss0, self.rss0))
        return False


def timed(fn, repeats: int):
    "Median wall time of `repeats` calls, the peak memory of the first, and its result."
    times, peak, result = [], None, None
    for i in range(repeats):
        with PeakMemory() as m:
            t0 = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - t0)
        if i == 0: peak = m
    return statistics.median(times), peak, result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--items', type=int, default=1_000_000, help='catalogue size N')
    p.add_argument('--dim', type=int, default=64, help='vector dimension d')
    p.add_argument('--sessions', type=int, default=4000, help='test sessions n for the streaming evaluator')
    p.add_argument('--batch-size', type=int, default=512, help='sessions per block (evaluate_streaming)')
    p.add_argument('--item-chunk', type=int, default=8192, help='items per block (evaluate_streaming)')
    p.add_argument('--rows-sessions', type=int, default=1024, help='sessions for the full-row mode; 0 skips it')
    p.add_argument('--rows-batch', type=int, default=32, help='sessions per [batch, N] score matrix (full-row mode)')
    p.add_argument('--repeats', type=int, default=1, help='timed runs per mode (median reported)')
    p.add_argument('--threads', type=int, default=0, help='torch CPU threads (0: torch default)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--quick', action='store_true', help='smoke run: N = 100,000, 500 sessions, 128 full-row sessions')
    p.add_argument('--out', default=str(Path(__file__).resolve().parent / 'results' / 'bench_metrics.json'))
    a = p.parse_args(argv)
    if a.quick: a.items, a.sessions, a.rows_sessions = 100_000, 500, 128
    if a.threads: torch.set_num_threads(a.threads)
    ks = (5, 10, 20)

    # inputs: random item vectors; each session vector is its target's vector plus noise, so the metrics are not 0
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(a.seed)
    items = torch.randn(a.items, a.dim, generator=g)
    n = max(a.sessions, a.rows_sessions)
    targets = torch.randint(1, a.items, (n,), generator=g)
    sessions = items[targets] + 1.5 * torch.randn(n, a.dim, generator=g)
    setup_s = time.perf_counter() - t0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); N={a.items:,} items, d={a.dim}; "
          f"inputs made in {setup_s:.1f} s (item vectors: {items.numel() * 4 / MB:.0f} MB)")

    # warm-up on a slice, so one-time costs are not timed
    evaluate_streaming(sessions[:8], items[:2 * a.item_chunk], targets[:8] % min(a.items, 2 * a.item_chunk), ks,
                       a.batch_size, a.item_chunk)

    report = dict(config=vars(a), torch=torch.__version__, threads=torch.get_num_threads(),
                  machine=platform.machine(), processor=platform.processor() or None, python=platform.python_version(),
                  cpu_count=os.cpu_count(), setup_s=round(setup_s, 3), ks=ks)

    # mode 1: evaluate_streaming
    ns = a.sessions
    wall, mem, res = timed(lambda: evaluate_streaming(sessions[:ns], items, targets[:ns], ks, a.batch_size,
                                                      a.item_chunk, exclude=[0]), a.repeats)
    full_bytes = ns * a.items * 4
    buffer_bytes = min(a.batch_size, ns) * min(a.item_chunk, a.items) * 4
    stream = dict(sessions=ns, wall_s=round(wall, 3), sessions_per_s=round(ns / wall, 1),
                  item_scores_per_s=round(ns * a.items / wall), peak_added_bytes=mem.added,
                  memory_method=mem.method, design_buffer_bytes=buffer_bytes, full_matrix_bytes=full_bytes,
                  naive_full_bytes=full_bytes + ns * a.items, full_over_peak=round(full_bytes / max(mem.added, 1), 1),
                  metrics={k: round(v, 5) for k, v in res.items()})
    report['stream'] = stream
    print(f"\nstream (evaluate_streaming, batch_size={a.batch_size}, item_chunk={a.item_chunk}):")
    print(f"  {ns:,} sessions x {a.items:,} items in {wall:.2f} s: {ns / wall:,.0f} sessions/s, "
          f"{ns * a.items / wall / 1e6:,.0f} M item-scores/s")
    print(f"  peak memory added: {mem.added / MB:,.1f} MB ({mem.method}); designed buffer {buffer_bytes / MB:,.1f} MB")
    print(f"  a full [{ns:,}, {a.items:,}] float32 score matrix: {full_bytes / MB:,.0f} MB "
          f"(+ {ns * a.items / MB:,.0f} MB boolean mask naively) = {full_bytes / max(mem.added, 1):,.0f}x the peak")
    print(f"  HR@20={res['HR@20']:.4f} MRR@20={res['MRR@20']:.4f} NDCG@20={res['NDCG@20']:.4f}")

    # mode 2: StreamingEvaluator fed with [rows_batch, N] score rows
    if a.rows_sessions:
        nr, b = a.rows_sessions, a.rows_batch

        def rows():
            ev = StreamingEvaluator(ks, exclude=[0])
            for r0 in range(0, nr, b): ev.update(sessions[r0:r0 + b] @ items.T, targets[r0:r0 + b])
            return ev.compute()

        wall, mem, res = timed(rows, a.repeats)
        batch_bytes = min(b, nr) * a.items * 4
        report['rows'] = dict(sessions=nr, rows_batch=b, wall_s=round(wall, 3), sessions_per_s=round(nr / wall, 1),
                              item_scores_per_s=round(nr * a.items / wall), peak_added_bytes=mem.added,
                              memory_method=mem.method, score_batch_bytes=batch_bytes,
                              full_matrix_bytes=nr * a.items * 4, metrics={k: round(v, 5) for k, v in res.items()})
        print(f"\nrows (StreamingEvaluator.update on [{b}, {a.items:,}] score batches incl. the matmul):")
        print(f"  {nr:,} sessions in {wall:.2f} s: {nr / wall:,.0f} sessions/s, "
              f"{nr * a.items / wall / 1e6:,.0f} M item-scores/s")
        print(f"  peak memory added: {mem.added / MB:,.1f} MB; one score batch is {batch_bytes / MB:,.0f} MB; "
              f"the full [{nr:,}, {a.items:,}] matrix {nr * a.items * 4 / MB:,.0f} MB")
        print(f"  stream vs rows throughput: {stream['item_scores_per_s'] / report['rows']['item_scores_per_s']:.2f}x")

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")
    return report


if __name__ == '__main__':
    main()
