"""The spread of TPAD's cold-start HR@20 over PIPELINE seeds on toyshop-tiny (Stages 1, 2a, 2b and the recommender).

A pipeline seed s sets stage1.seed, stage1.train.seed, stage2.seed, stage2.train.seed, align.seed, align.train.seed and
the recommender's fit seed to s; the base tiny MLLM's own random weights (mllm.seed) stay fixed (they stand in for
pretrained weights). Per seed and row: test HR@20 / cold HR@20, the validation metrics of the epoch the recommender kept (the
toyshop's validation split has no cold-start targets), that epoch, the Stage 2b before/after numbers and the mean of
each logged Stage 2b term over its last epoch.

    OMP_NUM_THREADS=1 python bench/stage2b_spread.py --seeds 0 1 2 3 4 --out bench/results/spread
    # two processes sharing the seeds (each writes its own per-seed JSON; the last one to finish, or --summarise,
    # writes the table of every seed found under --out):
    OMP_NUM_THREADS=1 python bench/stage2b_spread.py --seeds 0 2 4 --out bench/results/spread &
    OMP_NUM_THREADS=1 python bench/stage2b_spread.py --seeds 1 3 --out bench/results/spread
    python bench/stage2b_spread.py --summarise --out bench/results/spread

The stage cache (<out>/seed<s>/stages/<name>) is keyed by the config, not by the code: after changing tpad/align.py
pass --fresh-align (deletes the align-* stage folders first) or use another --out.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault('OMP_NUM_THREADS', '1')
import numpy as np
import pandas as pd
import torch

from tpad.data import load
from tpad.experiment import MODELS, _data_path, _load_options, fit_and_score, make_config, run_stages
from tpad.preprocess import preprocess
from tpad.preprocess import rows_in_index_order

ROWS = 'tpad,tpad_no_mi,tpad_no_disentangle,tpad_no_gen'


STAGES = ('stage1', 'stage2', 'align', 'fit')


def seed_config(s: int, out: Path, models: str, align: dict | None = None, vary=STAGES, negatives: str = 'seen'):
    "The toyshop-tiny RunConfig of pipeline seed `s`, writing into `out`; `align`: extra Stage 2b overrides; stages not in `vary` keep seed 0."
    at = {k: (s if k in vary else 0) for k in STAGES}
    align = dict(align or {})
    return make_config('toyshop-tiny', out=str(out), figures='none', progress=False, models=models, fit=dict(negatives=negatives),
                       stage1=dict(seed=at['stage1'], train=dict(seed=at['stage1'])),
                       stage2=dict(seed=at['stage2'], train=dict(seed=at['stage2'])),
                       align=dict(align, seed=at['align'], train=dict(align.pop('train', {}), seed=at['align'])))


def _last_epoch_terms(folder: Path) -> dict:
    "Mean of every logged Stage 2b term over the last epoch of `folder`/losses.csv (empty when missing)."
    path = folder / 'losses.csv'
    if not path.exists(): return {}
    frame = pd.read_csv(path)
    if 'epoch' in frame:  # fractional epochs: the steps after the last whole epoch but one
        frame = frame[frame['epoch'] > frame['epoch'].max() - 1]
    skip = {'step', 'epoch', 'lr', 'grad_norm', 'seconds', 'time'}
    return {f'2b {c}': float(frame[c].mean()) for c in frame.columns
            if c not in skip and pd.api.types.is_numeric_dtype(frame[c])}


def run_seed(s: int, out: Path, models: str, fit_seed: int | None, fresh_align: bool, align: dict | None,
             vary=STAGES, negatives: str = 'seen') -> list[dict]:
    "Stages 1-2b and the recommender rows of pipeline seed `s`: one dict per row."
    folder = out / f'seed{s}'
    if fresh_align:
        for old in (folder / 'stages').glob('align-*'): shutil.rmtree(old)
    config = seed_config(s, folder, models, align, vary, negatives)
    folder.mkdir(parents=True, exist_ok=True)
    data = load(config.dataset, _data_path(config), **_load_options(config))
    prepared = preprocess(data, config.preprocess)
    keys = [k.strip() for k in models.split(',')]
    t0 = time.perf_counter()
    feats, info = run_stages(config, data, prepared, {MODELS[k][1] for k in keys} - {None, 'plain'}, folder,
                             log=lambda *a, **k: None)
    stage_seconds = round(time.perf_counter() - t0, 1)
    aligned = {k: rows_in_index_order(v, data.items, prepared) for k, v in feats.items()}
    rows, fs = [], (s if 'fit' in vary else 0) if fit_seed is None else fit_seed
    for key in keys:
        variant = MODELS[key][1]
        row = fit_and_score(key, prepared, config, aligned.get(variant), seed=fs, out=folder)
        # the validation metrics of the epoch the recommender kept (its checkpoint's sidecar); the toyshop's
        # validation split has no cold-start targets, so there is no validation cold HR to report
        saved = json.loads((folder / 'models' / f'{key}-seed{fs}' / 'model.json').read_text())
        row.update({f'valid {k}': v for k, v in saved['valid'].items()})
        row['pipeline_seed'], row['stage_seconds'] = s, stage_seconds
        stage = info.get(f'align-{variant}', {})
        for when in ('before', 'after'):
            row.update({f'2b {when} {k}': v for k, v in (stage.get(when) or {}).items() if k != 'items'})
        row.update({f'2b {k}': v for k, v in stage.items() if k.startswith('select') or k in ('selected_epoch',)})
        row.update(_last_epoch_terms(folder / 'train' / f'align-{variant}'))
        rows.append(row)
        print(f"seed {s} {key:22s} cold HR@20 {100 * row.get('cold HR@20', float('nan')):6.2f}  HR@20 "
              f"{100 * row['HR@20']:6.2f}  valid HR@20 {100 * row['valid HR@20']:6.2f}  epoch {row['best_epoch']}", flush=True)
    return rows


SHOW = ('cold HR@20', 'HR@20', 'valid HR@20', 'best_epoch')


def summarise(out: Path, tag: str) -> pd.DataFrame:
    "Every per-seed JSON under `out` as one frame (written to CSV and JSON) and a printed mean ± std table."
    rows = []
    for p in sorted(out.glob('rows-seed*.json')): rows += json.loads(p.read_text())
    if not rows: sys.exit(f'no rows-seed*.json under {out}')
    frame = pd.DataFrame(rows)
    frame.to_csv(out / f'{tag}.csv', index=False)
    (out / f'{tag}.json').write_text(frame.to_json(orient='records', indent=1))
    wide = frame.pivot_table(index='pipeline_seed', columns='model', values='cold HR@20') * 100
    print('\ncold HR@20 (test) per pipeline seed, percent:')
    print(wide.round(2).to_string())
    lines = []
    for key, r in frame.groupby('model', sort=False):
        line = {'model': key, 'seeds': len(r)}
        for m in SHOW:
            if m in r:
                v = r[m].astype(float) * (1 if m == 'best_epoch' else 100)
                line[m] = f'{v.mean():.2f} ± {v.std(ddof=1):.2f}' if len(r) > 1 else f'{v.mean():.2f}'
        lines.append(line)
    table = pd.DataFrame(lines)
    print('\nmean ± std over pipeline seeds (sample std), percent (best_epoch: epochs):')
    print(table.to_string(index=False))
    print(f'\nwrote {out / (tag + ".csv")} and {out / (tag + ".json")}')
    return table


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--seeds', type=int, nargs='*', default=[0, 1, 2, 3, 4], help='pipeline seeds this process runs')
    p.add_argument('--out', default='bench/results/stage2b_spread', help='folder of the runs and the results')
    p.add_argument('--models', default=ROWS, help='comma-separated MODELS keys (rows)')
    p.add_argument('--fit-seed', type=int, default=None, help='fix the recommender seed (default: the pipeline seed)')
    p.add_argument('--fresh-align', action='store_true', help='delete the cached align-* stages first (after a code change)')
    p.add_argument('--align', default='{}', help='JSON of extra Stage 2b overrides, e.g. \'{"train": {"epochs": 3}}\'')
    p.add_argument('--vary', default=','.join(STAGES),
                   help='which stages take the pipeline seed (the others keep seed 0): a subset of ' + ','.join(STAGES))
    p.add_argument('--train-negatives', choices=('all', 'seen'), default='seen',
                   help="the recommender's training softmax (FitConfig.negatives): over 'all' items, or only the items "
                        "clicked in training ('seen', tpad run's default)")
    p.add_argument('--summarise', action='store_true', help='only write and print the table of the rows under --out')
    p.add_argument('--tag', default='spread', help='name of the CSV/JSON table under --out')
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if not a.summarise:
        align, vary = json.loads(a.align), tuple(v.strip() for v in a.vary.split(',') if v.strip())
        if set(vary) - set(STAGES): sys.exit(f'--vary: unknown stage(s) {sorted(set(vary) - set(STAGES))}; known: {STAGES}')
        for s in a.seeds:
            t0 = time.perf_counter()
            rows = run_seed(s, out, a.models, a.fit_seed, a.fresh_align, align, vary, a.train_negatives)
            (out / f'rows-seed{s}.json').write_text(json.dumps(rows, indent=1, default=float))
            print(f'seed {s}: {time.perf_counter() - t0:.0f} s', flush=True)
    summarise(out, a.tag)


if __name__ == '__main__':
    main()
