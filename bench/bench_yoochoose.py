"""Training and evaluation speed of the kit's neural recommenders on the YOOCHOOSE 100k sample, beside the official SR-GNN.

    python bench/bench_yoochoose.py                                  # the kit's SR-GNN and the official code, 6 epochs
    python bench/bench_yoochoose.py --epochs 3 --models srgnn,official,msbr,gru4rec,sasrec --threads 1

Data: `../shared/data/yoochoose_100k` (or $TPAD_SHARED_DATA), preprocessed like the `yoochoose` preset (sessions of
at least 2 clicks, items with at least 5, last day test, the day before validation). Every row trains on the same
training prefixes, validates on the same validation prefixes after each epoch, and is scored once on the same test
prefixes (full ranking over the catalogue), with the same number of torch threads (`--threads`).

Rows (`--models`, comma-separated):
- `srgnn`, `gru4rec`, `sasrec`: `tpad.baselines.<name>` (ID only, dim 100), trained by `tpad.msbr.fit` for `--epochs`
  epochs (no early stop: patience = epochs; SR-GNN's lr 1e-3, L2 1e-5, x0.1 every 3 epochs, batch 100); the weights
  of the best validation epoch (MRR@20) are scored on test by `tpad.msbr.evaluate_model`.
- `msbr`: an MSBR with gate fusion and random 128-d features: on ID-only data it measures the cost of the feature path.
- `official`: the authors' PyTorch SR-GNN (`bench/official_srgnn/`, CRIPAC-DIG/SR-GNN at cf724b1, CPU only, see the
  headers) on the kit's split, given as the (prefixes, targets) lists of their own preprocessing: `train_test` per
  epoch (their training pass + their prediction pass, here on the validation prefixes), the best validation epoch
  (MRR@20) restored, then the test prefixes scored through their `forward` and ranked by `tpad.metrics.target_ranks`
  (the kit's ranking, so both rows use one metric). Their own numbers per epoch are kept in the JSON (percent).
  Their StepLR is stepped at the start of each epoch, so their lr drops after epochs 2, 5, ... (the kit's after 3, 6).

Reported: seconds per epoch (the mean over epochs; one epoch = a pass over the training prefixes + one validation
pass), the validation pass alone, evaluation throughput in test prefixes per second, test HR@20 / MRR@20, and for the
kit's SR-GNN its epoch time as a fraction of the official code's. Numbers go to stdout and
bench/results/bench_yoochoose.json (gitignored) with the load average before and after each row; nothing is asserted.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import io
import json
import os
import platform
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from tpad import baselines
from tpad.data import load, shared_data_dir
from tpad.metrics import metrics_from_ranks, target_ranks
from tpad.msbr import MSBR, FitConfig, MSBRConfig, evaluate_model, fit, score_samples
from tpad.preprocess import preprocess

OFFICIAL = Path(__file__).parent / 'official_srgnn'


def _module(name: str):
    "A module of the vendored official code, under a name that cannot clash with anything else called `model`/`utils`."
    spec = importlib.util.spec_from_file_location(f'official_srgnn_{name}', OFFICIAL / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def as_lists(samples) -> tuple[list, list]:
    "The samples as the authors' preprocess.py writes them: a list of prefixes (lists of item indices) and the targets."
    return [samples.clicks[s:e].tolist() for s, e in zip(samples.starts, samples.ends)], samples.targets.tolist()


def run_kit(name: str, prepared, epochs: int, batch_size: int) -> dict:
    torch.manual_seed(0)
    if name == 'msbr': model = MSBR(prepared.n_items, MSBRConfig(fusion='gate'), features=torch.randn(prepared.n_items, 128))
    else: model = getattr(baselines, name)(prepared.n_items)
    result = fit(model, prepared, FitConfig(epochs=epochs, patience=epochs, batch_size=batch_size))
    t0 = time.perf_counter()
    score_samples(model, prepared.samples['valid'], (20,), 500, prepared.n_items)  # a validation pass alone
    valid_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = evaluate_model(model, prepared, 'test')
    eval_s = time.perf_counter() - t0
    n_test = scores['n']['overall'] + scores['n']['cold']
    h = result.history
    return dict(model=name, code='tpad', epochs=len(h), best_epoch=result.best_epoch,
                s_per_epoch=round(float(h['seconds'].mean()), 2), valid_pass_s=round(valid_s, 2),
                eval_s=round(eval_s, 2), eval_sessions_per_s=round(n_test / eval_s, 1),
                test_HR20=round(scores['overall']['HR@20'], 4), test_MRR20=round(scores['overall']['MRR@20'], 4),
                valid_MRR20_per_epoch=[round(v, 4) for v in h['valid MRR@20']])


def _official_ranks(om, model, data, batch_size: int) -> torch.Tensor:
    "Target ranks of the official model on a `Data` (their forward, the kit's full ranking)."
    ranks = []
    with torch.no_grad():
        for i in data.generate_batch(batch_size):
            targets, scores = om.forward(model, i, data)
            ranks.append(target_ranks(scores, torch.as_tensor(np.asarray(targets), dtype=torch.long) - 1))
    return torch.cat(ranks)


def run_official(prepared, epochs: int, batch_size: int) -> dict:
    om, ou = _module('model'), _module('utils')
    opt = SimpleNamespace(hiddenSize=100, batchSize=batch_size, nonhybrid=False, lr=1e-3, l2=1e-5, lr_dc_step=3,
                          lr_dc=0.1, step=1)  # their main.py's defaults
    np.random.seed(0); torch.manual_seed(0)
    train = ou.Data(as_lists(prepared.samples['train']), shuffle=True)
    valid = ou.Data(as_lists(prepared.samples['valid']), shuffle=False)
    test = ou.Data(as_lists(prepared.samples['test']), shuffle=False)
    model = om.SessionGraph(opt, prepared.n_items + 1)
    seconds, theirs, best, best_state, best_epoch = [], [], -1.0, None, 0
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()): hit, mrr = om.train_test(model, train, valid)
        seconds.append(time.perf_counter() - t0)
        theirs.append(dict(epoch=epoch, valid_HR20_pct=round(float(hit), 2), valid_MRR20_pct=round(float(mrr), 2)))
        if mrr > best: best, best_epoch, best_state = mrr, epoch, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.eval()
    t0 = time.perf_counter()
    _official_ranks(om, model, valid, batch_size)  # a validation pass alone (their prediction pass, without topk)
    valid_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    test_metrics = metrics_from_ranks(_official_ranks(om, model, test, batch_size), (20,))
    eval_s = time.perf_counter() - t0
    return dict(model='srgnn', code='official CRIPAC-DIG/SR-GNN@cf724b1 (CPU)', epochs=epochs, best_epoch=best_epoch,
                s_per_epoch=round(float(np.mean(seconds)), 2), valid_pass_s=round(valid_s, 2), eval_s=round(eval_s, 2),
                eval_sessions_per_s=round(len(prepared.samples['test']) / eval_s, 1),
                test_HR20=round(test_metrics['HR@20'], 4), test_MRR20=round(test_metrics['MRR@20'], 4),
                valid_MRR20_per_epoch=[round(t['valid_MRR20_pct'] / 100, 4) for t in theirs], their_log=theirs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--epochs', type=int, default=6)
    ap.add_argument('--models', default='srgnn,official')
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--batch-size', type=int, default=100)
    ap.add_argument('--out', default=str(Path(__file__).parent / 'results' / 'bench_yoochoose.json'))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shared = shared_data_dir()
    if shared is None: raise SystemExit('the shared data folder is absent: nothing to measure')
    prepared = preprocess(load('yoochoose', str(shared / 'yoochoose_100k')), min_item_support=5, test_days=1, valid_days=1)
    print(prepared, f'| {args.threads} thread(s), {args.epochs} epochs, batch {args.batch_size}', flush=True)
    rows, names = [], args.models.split(',')
    if 'official' in names and not all((OFFICIAL / f).is_file() for f in ('model.py', 'utils.py')):
        print(f"[official] skipped: the authors' code is not in {OFFICIAL}. It is not redistributed with the kit (its repository "
              f"states no licence): fetch pytorch_code/model.py and utils.py of https://github.com/CRIPAC-DIG/SR-GNN (commit "
              f"cf724b1) into that folder; they run unchanged on a machine without a GPU.", flush=True)
        names.remove('official')
    for name in names:
        load_before = os.getloadavg()[0]
        row = run_official(prepared, args.epochs, args.batch_size) if name == 'official' else \
            run_kit(name, prepared, args.epochs, args.batch_size)
        row.update(load_before=round(load_before, 2), load_after=round(os.getloadavg()[0], 2))
        rows.append(row)
        print({k: v for k, v in row.items() if k != 'their_log'}, flush=True)
    by = {(r['model'], r['code']): r for r in rows}
    kit, official = by.get(('srgnn', 'tpad')), next((r for r in rows if r['code'] != 'tpad'), None)
    ratio = round(kit['s_per_epoch'] / official['s_per_epoch'], 3) if kit and official else None
    if ratio is not None:
        print(f"\nSR-GNN s/epoch: tpad {kit['s_per_epoch']}, official {official['s_per_epoch']} -> tpad / official = {ratio}; "
              f"test HR@20 {kit['test_HR20']:.4f} vs {official['test_HR20']:.4f}, MRR@20 {kit['test_MRR20']:.4f} vs "
              f"{official['test_MRR20']:.4f} after {args.epochs} epochs; {args.threads} thread(s)")
    out = Path(args.out); out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(args=vars(args), machine=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                                   torch=torch.__version__, items=prepared.n_items,
                                   samples={k: len(v) for k, v in prepared.samples.items()},
                                   srgnn_epoch_ratio_tpad_over_official=ratio, rows=rows), indent=1))
    print(f'wrote {out}')


if __name__ == '__main__':
    main()
