"""Accuracy and speed of tpad's MSBR on the toyshop: each encoder, ID only and ID + one-hot content features.

    python bench/bench_msbr.py                        # dim 100, up to 20 epochs, early stopping, 1 thread
    python bench/bench_msbr.py --dim 32 --epochs 3    # a quick run
    python bench/bench_msbr.py --help

Data: `preprocess(load('toyshop'), min_item_support=2)` (train / valid / test by time; 600 items). Every model is
trained by `tpad.msbr.fit` with early stopping on validation MRR@20 (the test split is scored once, after
training) and scored by `tpad.msbr.evaluate_model` over the full catalogue: the standard protocol ('test') and the
cold-start samples apart ('cold': test targets without a training click). The features are a stand-in for TPAD's:
the one-hot encoding of each item's category, colour, pattern and brand (the real ones come from Stage 2b).

Learning rate: SR-GNN's 1e-3, but constant (`--lr-step 0`): its decay every 3 epochs suits datasets with thousands
of steps per epoch, and the toyshop has about 150. (1e-2 learns faster at small `--dim` but hurts SASRec at dim 100.)
Seconds per epoch are the mean over the epochs run (training + one validation pass), on `--threads` CPU threads.

Numbers are printed and written to bench/results/bench_msbr.json (gitignored); nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import pandas as pd
import torch

from tpad.data import load
from tpad.msbr import ENCODERS, MSBR, FitConfig, MSBRConfig, evaluate_model, fit
from tpad.preprocess import preprocess


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--dim', type=int, default=100)
    ap.add_argument('--epochs', type=int, default=20)
    ap.add_argument('--patience', type=int, default=3)
    ap.add_argument('--lr', type=float, default=1e-3)
    ap.add_argument('--lr-step', type=int, default=0)
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--encoders', default=','.join(ENCODERS))
    ap.add_argument('--out', default=str(Path(__file__).parent / 'results' / 'bench_msbr.json'))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    prepared = preprocess(load('toyshop'), min_item_support=2)
    items = prepared.items
    feats = torch.tensor(pd.get_dummies(items[['category', 'colour', 'pattern', 'brand']].astype(str)).to_numpy(dtype='float32'))
    fc = FitConfig(lr=a.lr, lr_step=a.lr_step, epochs=a.epochs, patience=a.patience)
    rows = []
    for enc in a.encoders.split(','):
        for name, f in (('ID only', None), ('ID + one-hot (sum)', feats)):
            torch.manual_seed(a.seed)
            model = MSBR(prepared.n_items, MSBRConfig(dim=a.dim, encoder=enc), f)
            t0 = time.perf_counter()
            r = fit(model, prepared, fc, seed=a.seed)
            test = evaluate_model(model, prepared, 'test')
            rows.append({'encoder': enc, 'items': name, 'epochs': len(r.history), 'best_epoch': r.best_epoch,
                         's/epoch': round(float(r.history.seconds.mean()), 2), 'fit_s': round(time.perf_counter() - t0, 1),
                         'valid MRR@20': r.best['MRR@20'], 'valid HR@20': r.best['HR@20'],
                         'test MRR@20': test['overall']['MRR@20'], 'test HR@20': test['overall']['HR@20'],
                         'cold MRR@20': test['cold']['MRR@20'], 'cold HR@20': test['cold']['HR@20']})
            print(pd.DataFrame(rows[-1:]).round(4).to_string(index=False, header=len(rows) == 1), flush=True)
    table = pd.DataFrame(rows)
    print(f"\ntoyshop: {prepared.n_items} items; samples train {len(prepared.samples['train'])}, valid "
          f"{len(prepared.samples['valid'])}, test {len(prepared.samples['test'])} (+{len(prepared.cold['test'])} cold); "
          f"dim {a.dim}, lr {a.lr}, lr_step {a.lr_step}, <= {a.epochs} epochs, patience {a.patience}, {a.threads} thread(s)")
    print(table.round(4).to_string(index=False))
    out = Path(a.out); out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(args=vars(a), machine=platform.processor() or platform.machine(),
                                   torch=torch.__version__, rows=rows), indent=1))
    print('->', out)


if __name__ == '__main__':
    main()
