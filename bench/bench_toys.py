"""Speed of the kit on a real catalogue: Amazon Toys & Games 5-core (19,412 users, 11,924 items), leave-one-out.

    python bench/bench_toys.py                                  # every row, 1 epoch, 2 threads
    python bench/bench_toys.py --models srgnn --epochs 2 --threads 1
    python bench/bench_toys.py --models plain,plain_bf16,stage1  # feature extraction only

Data: `../shared/data/amazon_toys_sequences/user_sequence.txt` (or $TPAD_SHARED_DATA): one line per user,
`userID item1 item2 ...` in time order, split by the kit: `preprocess(load('sequences', path), split='leave_one_out',
min_item_support=1, min_session_length=3)`. Per user the last item is the test target, the second-to-last the
validation target, the rest is training; the training samples are every prefix of the training part (~109k), and
every item of the catalogue is ranked.

Rows (`--models`, comma-separated):
- `gru4rec`, `srgnn`, `sasrec`: `tpad.baselines.<name>(n_items)` (ID only, dim 100), trained by `tpad.msbr.fit`
  (batch 100, full-catalogue softmax, constant lr 1e-3) for `--epochs` epochs (no early stop). Reported: seconds
  per epoch (training pass + one validation pass, the mean over epochs), and apart: the validation pass (timed once
  more after training) and the training pass (the difference), training prefixes per second, validation HR@20 /
  MRR@20 after the last epoch.
- `plain`, `plain_bf16`: items per second of `tpad.baselines.plain_features` (model loading included) with MiniLM
  in float32 / bfloat16. Toys has no titles or pictures, so the texts are real product texts of the same kind: the
  H&M sample's articles (`prod_name. detail_desc`, ~40 tokens), `--text-items` of them, without pictures (the image
  part is left out: no item has one).
- `stage1`: items per second of `tpad.stage1.knowledge_features` with the tiny MLLM of
  `tpad.stage1.tiny_mllm_config()` (random weights: its speed, not its knowledge) on the same articles' titles.

Numbers go to stdout and bench/results/bench_toys.json (gitignored) with the load average before and after each row;
nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

MODELS = ('gru4rec', 'srgnn', 'sasrec', 'plain', 'plain_bf16', 'stage1')


def leave_one_out(path):
    "The kit's leave-one-out `Prepared` of a `user item1 item2 ...` file (every user with at least 3 items)."
    from tpad.data import load
    from tpad.preprocess import preprocess
    return preprocess(load('sequences', str(path)), split='leave_one_out', min_item_support=1, min_session_length=3)


def hm_items(shared: Path, n: int) -> pd.DataFrame:
    "Up to `n` real product texts: the H&M sample's articles (title = prod_name, text = detail_desc), no pictures."
    a = pd.read_parquet(shared / 'hm_fashion_images_sample' / 'articles_sample.parquet').head(n)
    return pd.DataFrame({'item_id': a['article_id'].astype(str), 'title': a['prod_name'].astype(str),
                         'text': a['detail_desc'].fillna('').astype(str), 'image': None})


def bench_recommender(name: str, prepared, epochs: int, batch_size: int) -> dict:
    from tpad import baselines
    from tpad.msbr import FitConfig, fit, score_samples
    torch.manual_seed(0)
    model = getattr(baselines, name)(prepared.n_items)
    valid = prepared.samples['valid']
    t0 = time.perf_counter()
    result = fit(model, prepared, FitConfig(epochs=epochs, patience=epochs, batch_size=batch_size, lr_step=0))
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    score_samples(model, valid, (20,), 500, prepared.n_items)  # one validation pass alone
    valid_s = time.perf_counter() - t0
    h = result.history
    epoch_s = float(h['seconds'].mean())
    n_train = len(prepared.samples['train'])
    return dict(model=name, epochs=len(h), s_per_epoch=round(epoch_s, 2), train_s=round(epoch_s - valid_s, 2),
                valid_s=round(valid_s, 2), train_prefixes_per_s=round(n_train / max(epoch_s - valid_s, 1e-9), 1),
                valid_prefixes_per_s=round(len(valid) / valid_s, 1), fit_s=round(fit_s, 2),
                loss=round(float(h['loss'].iloc[-1]), 4), valid_HR20=round(float(h['valid HR@20'].iloc[-1]), 4),
                valid_MRR20=round(float(h['valid MRR@20'].iloc[-1]), 4))


def bench_plain(items: pd.DataFrame, precision: str) -> dict:
    from tpad.baselines import PlainFeatureConfig, plain_available, plain_features
    name = 'plain' if precision == 'float32' else 'plain_bf16'
    if not plain_available(): return dict(model=name, skipped='plain feature packages not installed')
    logs = []
    t0 = time.perf_counter()
    f = plain_features(items, PlainFeatureConfig(device='cpu', text_precision=precision), log=logs.append)
    s = time.perf_counter() - t0
    return dict(model=name, items=len(items), width=int(f.shape[1]), seconds=round(s, 2), items_per_s=round(len(items) / s, 1),
                text='H&M sample articles: prod_name. detail_desc (no pictures), MiniLM loading included', log=' | '.join(logs))


def bench_stage1(items: pd.DataFrame) -> dict:
    from tpad.mllm import add_adapters, corpus_texts, load_mllm
    from tpad.stage1 import knowledge_features, tiny_mllm_config
    with tempfile.TemporaryDirectory() as tmp:
        cfg = tiny_mllm_config()
        torch.manual_seed(0)
        model, processor = load_mllm(cfg, texts=corpus_texts(items))
        model = add_adapters(model, cfg)
        t0 = time.perf_counter()
        f = knowledge_features(model, processor, items, cfg, Path(tmp) / 'cache', log=lambda *a, **k: None)
        s = time.perf_counter() - t0
    return dict(model='stage1', items=len(items), width=int(f.shape[1]), seconds=round(s, 2),
                items_per_s=round(len(items) / s, 1), batch=cfg.extract_batch_size,
                text="H&M sample articles' titles (the tiny config reads the title), no pictures; untrained tiny MLLM")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--models', default=','.join(MODELS))
    ap.add_argument('--epochs', type=int, default=1)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--batch-size', type=int, default=100)
    ap.add_argument('--text-items', type=int, default=1000, help='H&M articles for the feature rows (the sample has 1,000)')
    ap.add_argument('--data', default='')
    ap.add_argument('--out', default=str(Path(__file__).parent / 'results' / 'bench_toys.json'))
    a = ap.parse_args()
    unknown = [m for m in a.models.split(',') if m not in MODELS]
    if unknown: raise SystemExit(f'unknown model(s) {unknown}; known: {MODELS}')
    torch.set_num_threads(a.threads)
    from tpad.data import shared_data_dir
    shared = shared_data_dir() or Path('/nonexistent')
    path = Path(a.data) if a.data else shared / 'amazon_toys_sequences' / 'user_sequence.txt'
    if not path.is_file(): raise SystemExit(f'{path}: not found; nothing to measure')
    t0 = time.perf_counter()
    prepared = leave_one_out(path)
    print(f'{prepared} ({time.perf_counter() - t0:.1f} s)', flush=True)
    lengths = prepared.samples['train'].lengths
    rng = np.random.default_rng(0)
    padding = dict(mean_prefix=round(float(lengths.mean()), 2), max_prefix=int(lengths.max()),
                   mean_longest_in_random_batch=round(float(np.mean([lengths[rng.choice(len(lengths), a.batch_size, replace=False)].max()
                                                                    for _ in range(1000)])), 1))
    print(f"training prefixes: mean length {padding['mean_prefix']}, longest {padding['max_prefix']}; the longest of a random "
          f"batch of {a.batch_size}: {padding['mean_longest_in_random_batch']} on average (what a padded batch is padded to)", flush=True)
    rows = []
    for name in a.models.split(','):
        load0 = os.getloadavg()[0]
        if name.startswith('plain'): row = bench_plain(hm_items(shared, a.text_items), 'bfloat16' if name == 'plain_bf16' else 'float32')
        elif name == 'stage1': row = bench_stage1(hm_items(shared, a.text_items))
        else: row = bench_recommender(name, prepared, a.epochs, a.batch_size)
        row['load_before'], row['load_after'] = round(load0, 2), round(os.getloadavg()[0], 2)
        rows.append(row)
        print(row, flush=True)
    print(f"\n{prepared.n_items} items; samples train {len(prepared.samples['train'])}, valid "
          f"{len(prepared.samples['valid'])}, test {len(prepared.samples['test'])}; {a.threads} thread(s); "
          f"load average {os.getloadavg()[0]:.2f}")
    cols = ['model', 'epochs', 's_per_epoch', 'train_s', 'valid_s', 'train_prefixes_per_s', 'valid_HR20', 'valid_MRR20',
            'items', 'width', 'items_per_s', 'load_before', 'load_after']
    table = pd.DataFrame(rows)
    print(table[[c for c in cols if c in table.columns]].to_string(index=False))
    out = Path(a.out); out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(args=vars(a), split='tpad.preprocess.preprocess(split=leave_one_out)', machine=platform.processor() or platform.machine(),
                                   cpus=os.cpu_count(), torch=torch.__version__, items=prepared.n_items,
                                   samples={k: len(v) for k, v in prepared.samples.items()}, train_prefix_lengths=padding, rows=rows), indent=1))
    print('->', out)


if __name__ == '__main__':
    main()
