"""Fit and scoring time of tpad's non-neural baselines at YOOCHOOSE 1/64 scale, and the cost of the plain features.

    python bench/bench_baselines.py                # a synthetic log the size of YOOCHOOSE 1/64
    python bench/bench_baselines.py --quick        # a tenth of it: a smoke run
    python bench/bench_baselines.py --plain        # also: plain pre-trained features of the 600 toyshop items
    python bench/bench_baselines.py --help

The log is synthetic but shaped like YOOCHOOSE 1/64 as SR-GNN reports it (16,766 items; 369,859 training prefixes;
55,898 test prefixes): --train-sessions sessions over 28 days, then one validation day and one test day, session
lengths 2 + a geometric number of extra clicks (mean --mean-length), items drawn from a power law
(P(rank r) ~ r^-zipf) so that popular items sit in thousands of sessions, as in the real log. It goes through
`tpad.preprocess.preprocess` (preset 'yoochoose', min_item_support=1) like real data.

For MostPopular, ItemKNN and SKNN (default settings): `fit` seconds, and the seconds to score every test prefix
in batches of --batch (scores only), and the full `tpad.msbr.evaluate_model(..., 'test')` (scores + ranking).
With --plain: `tpad.baselines.plain_features` on the 600 toyshop items (no cache) at image sizes 224 and 128,
with the image and text parts timed apart; needs the extra `pip install -e ".[plain]"`.

Numbers are printed and written to bench/results/bench_baselines.json; nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from tpad.baselines import (ItemKNN, MostPopular, PlainFeatureConfig, SKNN, encode_texts, item_texts,  # noqa: E402
                            load_minilm, plain_available, plain_features)
from tpad.data import SessionData, load  # noqa: E402
from tpad.preprocess import prefix_loader, preprocess  # noqa: E402


def synthetic_log(n_items: int, train_sessions: int, valid_sessions: int, test_sessions: int, mean_length: float,
                  zipf: float, seed: int = 0) -> SessionData:
    "A click log with power-law item popularity: train sessions over days 0..27, then a validation and a test day."
    rng = np.random.default_rng(seed)
    n = train_sessions + valid_sessions + test_sessions
    lengths = 2 + rng.geometric(1 / (mean_length - 1), n) - 1
    p = 1.0 / np.arange(1, n_items + 1) ** zipf
    items = rng.choice(n_items, int(lengths.sum()), p=p / p.sum())
    day = np.r_[rng.uniform(0, 28, train_sessions), rng.uniform(28, 29, valid_sessions), rng.uniform(29, 30, test_sessions)]
    session = np.repeat(np.arange(n), lengths)
    offset = np.arange(len(items)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    inter = pd.DataFrame({'session_id': session.astype(str), 'item_id': items.astype(str),
                          'timestamp': 1.4e9 + day[session] * 86400 + offset * 60.0})
    ids = np.unique(items).astype(str)
    table = pd.DataFrame({'item_id': ids, 'title': ids, 'text': '', 'category': '', 'image': None})
    return SessionData(table, inter, name='synthetic-yoochoose-1/64')


def time_knn(prepared, batch: int) -> dict:
    from tpad.msbr import evaluate_model
    out = {}
    test = prepared.samples['test']
    for name, make in [('MostPopular', MostPopular), ('ItemKNN', ItemKNN), ('SKNN', SKNN)]:
        t0 = time.perf_counter(); model = make().fit(prepared); fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for b in prefix_loader(test, batch_size=batch): model(b)
        score_s = time.perf_counter() - t0
        t0 = time.perf_counter(); metrics = evaluate_model(model, prepared, 'test', batch_size=batch)['overall']
        eval_s = time.perf_counter() - t0
        out[name] = dict(fit_s=fit_s, score_s=score_s, score_prefixes_per_s=len(test) / score_s, evaluate_s=eval_s,
                         test_MRR20=metrics['MRR@20'], test_HR20=metrics['HR@20'])
        print(f"{name:12s} fit {fit_s:7.2f} s | score {len(test):,} test prefixes {score_s:7.2f} s "
              f"({len(test) / score_s:,.0f}/s) | evaluate_model {eval_s:7.2f} s | MRR@20 {metrics['MRR@20']:.4f}", flush=True)
    return out


def time_plain() -> dict:
    if not plain_available(): raise SystemExit('--plain needs the plain-feature packages: pip install -e ".[plain]"')
    items = load('toyshop').items
    out = {}
    for size in (224, 128):
        cfg = PlainFeatureConfig(image_size=size)
        t0 = time.perf_counter(); plain_features(items, cfg, cache_dir=None, log=lambda m: None)
        total = time.perf_counter() - t0
        t0 = time.perf_counter(); plain_features(items, PlainFeatureConfig(image_size=size, text=False), log=lambda m: None)
        image = time.perf_counter() - t0
        out[f'image_size_{size}'] = dict(total_s=total, image_part_s=image, items=len(items), items_per_s=len(items) / total)
        print(f'plain features, {len(items)} toyshop items, image {size} px: {total:.1f} s in all '
              f'(image part {image:.1f} s, the rest text + model loading)', flush=True)
    tok, model = load_minilm()
    t0 = time.perf_counter(); encode_texts(item_texts(items, PlainFeatureConfig()), tok, model); text = time.perf_counter() - t0
    out['text_only_encode_s'] = text
    print(f'MiniLM encoding alone (model loaded): {text:.1f} s', flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--items', type=int, default=16_766)
    ap.add_argument('--train-sessions', type=int, default=130_000)
    ap.add_argument('--valid-sessions', type=int, default=10_000)
    ap.add_argument('--test-sessions', type=int, default=19_500)
    ap.add_argument('--mean-length', type=float, default=3.85)
    ap.add_argument('--zipf', type=float, default=0.8)
    ap.add_argument('--batch', type=int, default=500)
    ap.add_argument('--threads', type=int, default=0, help='torch threads (0 = torch default)')
    ap.add_argument('--quick', action='store_true', help='a tenth of the sessions')
    ap.add_argument('--plain', action='store_true', help='also time the plain features of the toyshop items')
    ap.add_argument('--no-knn', action='store_true', help='skip the kNN part')
    ap.add_argument('--out', default=str(Path(__file__).resolve().parent / 'results' / 'bench_baselines.json'))
    a = ap.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    scale = 0.1 if a.quick else 1.0
    result = dict(machine=dict(python=platform.python_version(), torch=torch.__version__, threads=torch.get_num_threads(),
                               processor=platform.processor() or platform.machine()), args=vars(a))
    if not a.no_knn:
        t0 = time.perf_counter()
        data = synthetic_log(a.items, int(a.train_sessions * scale), int(a.valid_sessions * scale),
                             int(a.test_sessions * scale), a.mean_length, a.zipf)
        prepared = preprocess(data, 'yoochoose', min_item_support=1)
        sizes = dict(items=prepared.n_items, train_sessions=int(prepared.splits['train'].session_id.nunique()),
                     train_clicks=len(prepared.splits['train']), train_prefixes=len(prepared.samples['train']),
                     test_prefixes=len(prepared.samples['test']))
        print(f'synthetic log prepared in {time.perf_counter() - t0:.1f} s: {sizes}', flush=True)
        result['data'] = sizes
        result['knn'] = time_knn(prepared, a.batch)
    if a.plain: result['plain'] = time_plain()
    out = Path(a.out); out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print('wrote', out)


if __name__ == '__main__':
    main()
