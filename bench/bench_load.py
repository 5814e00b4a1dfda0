"""Load: MSBR evaluation and feature extraction/caching over a synthetic catalogue of 1,000,000 items, with peak memory.

    python bench/bench_load.py                    # every row below (~4-5 min on 2 busy CPU cores)
    python bench/bench_load.py --part eval        # the MSBR evaluation rows only
    python bench/bench_load.py --part extract     # item_features throughput and the 1M-item feature cache only
    python bench/bench_load.py --items 200000     # a smaller catalogue (eval and cache rows)
    python bench/bench_load.py --help

Every row runs in a fresh Python process (this script with --row), so one row's peak cannot hide in another's. Memory
is the *peak resident memory added* by the measured call: the kernel's peak-RSS mark (VmHWM) is reset right before it
by writing "5" to /proc/self/clear_refs and read from /proc/self/status after it, minus the RSS just before (what
the row had built: model, samples, features). Where clear_refs cannot be written the row falls back to getrusage
ru_maxrss growth, a lower bound (the JSON says which). `bench/bench_metrics.py`'s `PeakMemory` does the measuring.

MSBR evaluation (`eval` rows). A synthetic test split: `--sessions` prefixes of 1..10 items drawn uniformly from N
items, targets too, and 10 % more as the cold-start split (sessions/s counts both). `tpad.msbr.evaluate_model`
(overall + cold) scores an untrained `MSBR(N, MSBRConfig(dim=100, encoder='srgnn'))` (the paper's SR-GNN; ID
embeddings, and in some rows frozen item features [N, 128] fused by 'sum', as TPAD's are). Per batch of b prefixes
it builds the item table [N + 1, 100] (features projected anew each batch), the full score matrix [b, N], and counts
each target's rank (`tpad.metrics.target_ranks`, 16 MB blocks). So memory is bounded by the batch, b x N x 4 bytes
(measured: twice that from the second batch on, as score_samples still holds the previous batch's scores while the
next are computed) plus a few N x dim tables, and does not grow with the number of sessions: the rows with
`--sessions` and 3 x as many show it. The `stream` row is the alternative defined here (`stream_evaluate`): the item
table once, session vectors per batch, ranks by `tpad.metrics.streaming_target_ranks` (b x item_chunk scores at a
time), so the b x N term goes. The `check` row compares its ranks with the full score matrix's on the same model and
batches (mismatches).

Feature extraction (`extract` rows). `tpad.mllm.item_features` with the tiny demo MLLM (d = 128, CPU) on `--extract`
toyshop items (cycled past 600, new ids): with their images and text-only. A million items would take hours here: the
`hours (extrapolated)` column is N / (items/s). The cache rows measure what extraction does at the end
for N items: `gather` (the per-batch [16, d] outputs written into a preallocated [N, d], as item_features does), `save`
(`tpad.stage1.save_features`: safetensors + a JSON sidecar with the N item ids) and `load` (`load_features`, in a
fresh process), with d = 128 at N and d = 1536 (Qwen2-VL-2B's hidden size) at N / 4, extrapolated x 4 to N
(marked `extrapolated`: memory and time of these steps are linear in N x d). The load row reads every value
(a sum), since safetensors maps the file and its pages only count once they are read.

Numbers are printed and written to bench/results/bench_load.json (gitignored); nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (ROOT, HERE):
    if str(p) not in sys.path: sys.path.insert(0, str(p))

MB = 2 ** 20


# --- one row, in its own process -----------------------------------------------------------------------------------

def synthetic_samples(n_items: int, sessions: int, seed: int = 0, max_len: int = 10):
    "A `Samples` of `sessions` prefixes (1..max_len uniform items of 1..n_items) each followed by its target."
    import numpy as np
    from tpad.preprocess import Samples
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len + 1, sessions)
    starts = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]]).astype(np.int64)
    clicks = rng.integers(1, n_items + 1, int((lengths + 1).sum())).astype(np.int64)
    return Samples(clicks=clicks, starts=starts, ends=starts + lengths, session_ids=np.arange(sessions).astype(str))


def stream_evaluate(model, samples, ks=(5, 10, 20), batch_size: int = 500, item_chunk: int = 65536) -> dict:
    "HR/MRR/NDCG@K of an MSBR with the item table built once and ranks counted b x item_chunk scores at a time."
    import torch
    from tpad.metrics import StreamingEvaluator, streaming_target_ranks
    from tpad.preprocess import prefix_loader
    ev = StreamingEvaluator(ks)
    model.eval()
    with torch.no_grad():
        table = model.embeddings()  # [N + 1, dim], once: the model is frozen while it is evaluated
        for batch in prefix_loader(samples, batch_size=batch_size):
            s = model._encode(batch, table)  # the session vectors MSBR.forward multiplies with table[1:]
            ev.update_ranks(streaming_target_ranks(s, table[1:], batch['targets'] - 1, batch_size=len(s), item_chunk=item_chunk))
    return ev.compute()


def eval_row(r: dict) -> dict:
    import torch
    from bench_metrics import PeakMemory
    from tpad.metrics import streaming_target_ranks, target_ranks
    from tpad.msbr import MSBR, MSBRConfig, evaluate_model
    from tpad.preprocess import Samples, prefix_loader
    torch.manual_seed(0)
    n, s = r['items'], r['sessions']
    k = s // 10  # cold-start prefixes on top of the `s` standard ones
    samples = synthetic_samples(n, s + k)
    cut = lambda a, b: Samples(samples.clicks, samples.starts[a:b], samples.ends[a:b], samples.session_ids[a:b])
    prepared = SimpleNamespace(name='synthetic', samples={'test': cut(0, s)}, cold={'test': cut(s, s + k)}, n_items=n)
    feats = torch.randn(n, r['features']) if r['features'] else None
    model = MSBR(n, MSBRConfig(dim=r['dim'], encoder=r['encoder']), features=feats).eval()
    del feats  # the model keeps its own copy
    out = {}
    if r['mode'] == 'check':  # the stream path's ranks against the full score matrix's, on the first batches
        with torch.no_grad():
            table = model.embeddings()
            bad = total = 0
            for batch in prefix_loader(prepared.samples['test'], batch_size=r['batch']):
                full = target_ranks(model(batch), batch['targets'] - 1)
                part = streaming_target_ranks(model._encode(batch, table), table[1:], batch['targets'] - 1,
                                              batch_size=len(full), item_chunk=r['item_chunk'])
                bad += int((full != part).sum()); total += len(full)
        return dict(mismatched_ranks=bad, checked=total)
    with PeakMemory() as m:
        t0 = time.perf_counter()
        if r['mode'] == 'evaluate_model': result = evaluate_model(model, prepared, 'test', batch_size=r['batch'])
        else: result = {split: stream_evaluate(model, group['test'], batch_size=r['batch'], item_chunk=r['item_chunk'])
                        for split, group in (('overall', prepared.samples), ('cold', prepared.cold))}
        seconds = time.perf_counter() - t0
    out.update(seconds=seconds, sessions_per_s=(s + k) / seconds, peak_added_mb=m.added / MB, memory_method=m.method,
               HR20=result['overall']['HR@20'])
    return out


def extract_row(r: dict) -> dict:
    import pandas as pd
    import torch
    from bench_metrics import PeakMemory
    from tpad.data import load
    from tpad.mllm import MLLMConfig, corpus_texts, item_features, load_mllm
    items = load('toyshop').items
    many = pd.concat([items] * (r['n'] // len(items) + 1), ignore_index=True).iloc[:r['n']].copy()
    many['item_id'] = [f'synthetic-{i}' for i in range(len(many))]
    if not r['images']: many['image'] = None
    cfg = MLLMConfig(model='')
    model, processor = load_mllm(cfg, texts=corpus_texts(items))
    item_features(model, processor, many.iloc[:32], cfg, batch_size=r['batch'])  # warm-up
    with PeakMemory() as m:
        t0 = time.perf_counter()
        f = item_features(model, processor, many, cfg, batch_size=r['batch'])
        seconds = time.perf_counter() - t0
    return dict(seconds=seconds, items_per_s=len(many) / seconds, d=f.shape[1], peak_added_mb=m.added / MB,
                memory_method=m.method, threads=torch.get_num_threads())


def cache_row(r: dict) -> dict:
    import torch
    from bench_metrics import PeakMemory
    from tpad.stage1 import load_features, save_features
    n, d, path = r['n'], r['d'], Path(r['path'])
    key = dict(bench='load', n=n, d=d)
    if r['step'] == 'load':
        with PeakMemory() as m:
            t0 = time.perf_counter()
            f = load_features(path, key)
            total = float(f.sum())  # touch every value: safetensors maps the file, pages come in when read
            seconds = time.perf_counter() - t0
        assert f is not None and tuple(f.shape) == (n, d), 'the cache written by the save row did not load'
        return dict(seconds=seconds, peak_added_mb=m.added / MB, memory_method=m.method, checksum=total)
    ids = [f'item-{i}' for i in range(n)]
    with PeakMemory() as gather:  # what item_features does with its per-batch outputs (one process)
        t0 = time.perf_counter()
        f = torch.empty(n, d)  # preallocated, each batch written into its rows as it comes
        for i in range(0, n, 16): f[i:i + 16] = torch.randn(min(16, n - i), d)
        gather_s = time.perf_counter() - t0
    with PeakMemory() as m:
        t0 = time.perf_counter()
        save_features(path, f, key, ids)
        seconds = time.perf_counter() - t0
    return dict(seconds=seconds, peak_added_mb=m.added / MB, memory_method=m.method, gather_s=gather_s,
                gather_peak_added_mb=gather.added / MB, tensor_mb=f.numel() * 4 / MB,
                file_mb=path.stat().st_size / MB, sidecar_mb=path.with_suffix('.json').stat().st_size / MB)


def one_row(spec: str):
    r = json.loads(spec)
    import torch
    if r.get('threads'): torch.set_num_threads(r['threads'])
    fn = dict(eval=eval_row, extract=extract_row, cache=cache_row)[r['kind']]
    print('ROW ' + json.dumps(dict(r, **fn(r))), flush=True)


# --- the driver ----------------------------------------------------------------------------------------------------

def run_row(r: dict) -> dict:
    "Run row `r` in a fresh process; its result, or the error it ended with."
    t0 = time.time()
    proc = subprocess.run([sys.executable, __file__, '--row', json.dumps(r)], capture_output=True, text=True, cwd=ROOT)
    rows = [l[4:] for l in proc.stdout.splitlines() if l.startswith('ROW ')]
    if proc.returncode or not rows:
        return dict(r, error=(proc.stderr or proc.stdout)[-1500:], wall_s=time.time() - t0)
    return dict(json.loads(rows[-1]), wall_s=time.time() - t0)


def eval_rows(a) -> list[dict]:
    base = dict(kind='eval', items=a.items, dim=100, encoder='srgnn', features=0, item_chunk=65536, threads=a.threads)
    few, many = a.sessions, 3 * a.sessions
    return [dict(base, mode='evaluate_model', batch=100, sessions=few),
            dict(base, mode='evaluate_model', batch=500, sessions=few),
            dict(base, mode='evaluate_model', batch=500, sessions=many),
            dict(base, mode='evaluate_model', batch=500, sessions=few, features=128),
            dict(base, mode='stream', batch=500, sessions=many, features=128),
            dict(base, mode='check', batch=500, sessions=500, features=128)]


def extract_rows(a, tmp: Path) -> list[dict]:
    rows = [dict(kind='extract', n=a.extract, images=True, batch=32, threads=a.threads),
            dict(kind='extract', n=a.extract, images=False, batch=32, threads=a.threads)]
    for n, d in ((a.items, 128), (a.items // 4, 1536)):
        path = str(tmp / f'h_{n}_{d}.safetensors')
        rows += [dict(kind='cache', step='save', n=n, d=d, path=path, threads=a.threads),
                 dict(kind='cache', step='load', n=n, d=d, path=path, threads=a.threads)]
    return rows


def table(rows: list[dict], n_items: int):
    "The rows as printable tables (evaluation; extraction; cache), with the extrapolations labelled."
    import pandas as pd
    ev, ex, ca = [], [], []
    for r in rows:
        if 'error' in r: print(f"row failed: {r}", file=sys.stderr); continue
        if r['kind'] == 'eval' and r['mode'] == 'check':
            ev.append({'mode': 'check stream = full', 'batch': r['batch'], 'sessions': r['checked'],
                       'features': r['features'], 'note': f"{r['mismatched_ranks']} of {r['checked']} ranks differ"})
        elif r['kind'] == 'eval':
            scores_mb = r['batch'] * r['items'] * 4 / MB if r['mode'] == 'evaluate_model' else r['batch'] * r['item_chunk'] * 4 / MB
            ev.append({'mode': r['mode'], 'batch': r['batch'], 'sessions': r['sessions'], 'features': r['features'],
                       'sessions/s': round(r['sessions_per_s'], 1), 'peak added MB': round(r['peak_added_mb']),
                       'scores MB (b x N or b x chunk)': round(scores_mb), 'table MB (N x dim)': round(r['items'] * r['dim'] * 4 / MB)})
        elif r['kind'] == 'extract':
            ex.append({'items': r['n'], 'images': r['images'], 'd': r['d'], 'items/s': round(r['items_per_s'], 1),
                       'peak added MB': round(r['peak_added_mb']),
                       f'{n_items:,} items: hours (extrapolated)': round(n_items / r['items_per_s'] / 3600, 1)})
        else:
            scale = n_items / r['n']
            note = '' if scale == 1 else f'extrapolated x{scale:g} from {r["n"]:,}'
            line = {'step': r['step'], 'N': r['n'], 'd': r['d'], 'seconds': round(r['seconds'], 2),
                    'peak added MB': round(r['peak_added_mb'])}
            if r['step'] == 'save':
                line.update({'tensor MB': round(r['tensor_mb']), 'file MB': round(r['file_mb']),
                             'sidecar MB': round(r['sidecar_mb'], 1), 'gather peak MB': round(r['gather_peak_added_mb'])})
            if scale != 1:
                line[f'at N={n_items:,}: peak MB'] = round(r['peak_added_mb'] * scale)
                line[f'at N={n_items:,}: s'] = round(r['seconds'] * scale, 1)
                if r['step'] == 'save': line[f'at N={n_items:,}: gather peak MB'] = round(r['gather_peak_added_mb'] * scale)
                line['note'] = note
            ca.append(line)
    return [pd.DataFrame(x) for x in (ev, ex, ca)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--part', choices=('all', 'eval', 'extract'), default='all')
    ap.add_argument('--items', type=int, default=1_000_000, help='catalogue size N')
    ap.add_argument('--sessions', type=int, default=1000, help='test prefixes of the small eval rows (the large: 3x; +10%% cold)')
    ap.add_argument('--extract', type=int, default=600, help='items to extract features of with the tiny MLLM')
    ap.add_argument('--threads', type=int, default=0, help='torch threads per row (0 = torch default)')
    ap.add_argument('--out', default=str(HERE / 'results' / 'bench_load.json'))
    ap.add_argument('--row', help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.row: return one_row(a.row)
    rows, t_all = [], time.time()
    with tempfile.TemporaryDirectory(prefix='tpad-bench-load-') as tmp:
        todo = (eval_rows(a) if a.part in ('all', 'eval') else []) + (extract_rows(a, Path(tmp)) if a.part in ('all', 'extract') else [])
        for r in todo:
            rows.append(run_row(r))
            shown = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in rows[-1].items() if k not in ('path', 'error')}
            print(('FAILED ' if 'error' in rows[-1] else '') + json.dumps(shown), flush=True)
    ev, ex, ca = table(rows, a.items)
    for title, df in ((f'MSBR evaluation, N = {a.items:,} items, dim 100, SR-GNN', ev),
                      ('item_features, tiny MLLM (CPU)', ex), ('feature cache (gather, save_features, load_features)', ca)):
        if len(df): print(f'\n{title}\n{df.to_string(index=False)}')
    load = os.getloadavg()
    print(f"\n{os.cpu_count()} CPU cores, load average {load[0]:.1f} at the end; {time.time() - t_all:.0f} s in all")
    out = Path(a.out); out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(args=vars(a), machine=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                                   load_average=load, rows=rows), indent=1, default=str))
    print('->', out)


if __name__ == '__main__':
    main()
