"""Training and evaluation speed of the kit's neural recommenders on the YOOCHOOSE 100k sample (SR-GNN protocol).

    python bench/bench_yoochoose.py                 # SR-GNN, MSBR (gate fusion, random features), GRU4Rec, SASRec
    python bench/bench_yoochoose.py --epochs 3 --models srgnn

Data: `../shared/data/yoochoose_100k` (or $TPAD_SHARED_DATA), preprocessed like the `yoochoose` preset (sessions of
at least 2 clicks, items with at least 5, last day test, the day before validation). Each model is trained by
`tpad.msbr.fit` for `--epochs` epochs (no early stop: patience = epochs) and the test split scored once by
`tpad.msbr.evaluate_model` (full ranking over the catalogue). Reported: seconds per epoch (the mean over epochs;
one epoch = a pass over the training prefixes + one validation pass), evaluation throughput in test prefixes (sessions) per second, test HR@20 / MRR@20.
The MSBR row gets random 128-d features: on ID-only data it measures the cost of the feature path, not its value.
Numbers go to stdout and bench/results/bench_yoochoose.json (gitignored); nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from tpad import baselines
from tpad.data import load, shared_data_dir
from tpad.msbr import MSBR, FitConfig, MSBRConfig, evaluate_model, fit
from tpad.preprocess import preprocess


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--epochs', type=int, default=3)
    ap.add_argument('--models', default='srgnn,msbr,gru4rec,sasrec')
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--batch-size', type=int, default=100)
    ap.add_argument('--out', default=str(Path(__file__).parent / 'results' / 'bench_yoochoose.json'))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shared = shared_data_dir()
    if shared is None: raise SystemExit('the shared data folder is absent: nothing to measure')
    prepared = preprocess(load('yoochoose', str(shared / 'yoochoose_100k')), min_item_support=5, test_days=1, valid_days=1)
    print(prepared)
    rows = []
    for name in args.models.split(','):
        torch.manual_seed(0)
        if name == 'msbr':
            model = MSBR(prepared.n_items, MSBRConfig(fusion='gate'), features=torch.randn(prepared.n_items, 128))
        else: model = getattr(baselines, name)(prepared.n_items)
        result = fit(model, prepared, FitConfig(epochs=args.epochs, patience=args.epochs, batch_size=args.batch_size))
        t0 = time.perf_counter()
        scores = evaluate_model(model, prepared, 'test')
        eval_s = time.perf_counter() - t0
        n_test = scores['n']['overall'] + scores['n']['cold']
        h = result.history
        row = dict(model=name, train_prefixes=len(prepared.samples['train']), epochs=len(h),
                   s_per_epoch=round(float(h['seconds'].mean()), 2),
                   eval_s=round(eval_s, 2), eval_sessions_per_s=round(n_test / eval_s, 1),
                   test_HR20=round(scores['overall']['HR@20'], 4), test_MRR20=round(scores['overall']['MRR@20'], 4))
        rows.append(row)
        print(row, flush=True)
    out = Path(args.out); out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(args=vars(args), machine=platform.machine(), torch=torch.__version__,
                                   items=prepared.n_items, rows=rows), indent=1))
    print(f'wrote {out}')


if __name__ == '__main__':
    main()
