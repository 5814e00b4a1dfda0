"""Seed spread of the trained / estimated numbers that nbs/04_mi.ipynb asserts, so its tolerances can be derived from it.

    python bench/mi_spread.py                  # 16 seeds, writes bench/results/mi_spread.json
    python bench/mi_spread.py --seeds 4        # a quicker look
    python bench/mi_spread.py --fixture        # also (re)write the committed nbs/fixtures/mi_seed_spread.json
    python bench/mi_spread.py --parts losses --fixture   # rerun some parts only, merged into the existing files

Seeded training is bit-identical on one machine but not across CPUs (a different x86 CPU takes other SIMD paths,
rounds differently, and the trajectory drifts), so a test may only rely on what holds over *seeds*. Seed s reruns
each experiment of the notebook exactly as the notebook runs it, with the torch seed (critic / q initialisation) and
the data generator's seed both shifted by s; s = 0 is the notebook's own run. Recorded per quantity: the mean, the
standard deviation over seeds (n - 1 in the denominator), min, max and the seed-0 value (which must equal the
notebook's output on the machine that wrote the file: a check that this script and the notebook still agree).

  sweep    the ground-truth sweep: InfoNCE (bilinear / separable critic), NWJ, MINE, CLUB, vCLUB at d = 3,
           rho in {0, .3, .5, .7, .8, .9}, 400 Adam steps at lr 3e-3 on fresh batches of 128, then the mean estimate
           over 20 fresh batches. Notebook: torch.manual_seed(0), data generator seed 1 for every rho.
  channel  CLUB on a known noisy channel: x, y correlated Gaussians (d = 16), each standardised per dimension over
           its batch, plus N(0, 1) noise; rho in {0, .5, .9, .99}; same training. Plus CLUB's q over-fitted on one
           batch of 32 independent pairs (rho = 0) for 300 steps, and its value on that same batch.
           Notebook: torch.manual_seed(0), data generator seed 1 per rho; the over-fit run seeds 2 and 3.
  mmd      biased and unbiased MMD of 256 vs 256 rows, d = 4, mean shifts {0, .5, 1, 2}. Notebook: generator seed 3.
  losses   the 'usable as losses' cell: InfoNCE before/after 150 steps of training a map to maximise it, CLUB
           before/after 150 steps of training a map to minimise it. Notebook: torch.manual_seed(5).

Everything runs on one thread (as under nbdev_test). Prints a table and writes JSON; nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from tpad.mi import CLUB, MINE, MMD, NWJ, InfoNCE, correlated_gaussians, fit_estimator, gaussian_mi, mean_estimate

ROOT = Path(__file__).resolve().parent.parent
SWEEP = dict(d=3, n=128, rhos=[0.0, 0.3, 0.5, 0.7, 0.8, 0.9], steps=400, lr=3e-3, n_batches=20)
CHANNEL = dict(d=16, noise=1.0, n=128, rhos=[0.0, 0.5, 0.9, 0.99], steps=400, lr=3e-3, n_batches=20,
               overfit_n=32, overfit_steps=300)


def makers(d):
    return {'InfoNCE (bilinear)': lambda: InfoNCE(d, critic='bilinear'),
            'InfoNCE (separable)': lambda: InfoNCE(d, critic='separable'),
            'NWJ': lambda: NWJ(d), 'MINE': lambda: MINE(d),
            'CLUB': lambda: CLUB(d), 'vCLUB': lambda: CLUB(d, sampled=True)}


def run_sweep(seed: int) -> dict:
    c = SWEEP
    torch.manual_seed(seed)
    out = {name: [] for name in makers(c['d'])}
    for rho in c['rhos']:
        g = torch.Generator().manual_seed(1 + seed)
        sample = lambda n: correlated_gaussians(n, c['d'], rho, g)
        for name, make in makers(c['d']).items():
            est = make(); fit_estimator(est, sample, c['steps'], c['lr'], c['n'])
            out[name].append(mean_estimate(est, sample, c['n'], c['n_batches']))
    return out


def noisy_channel_sampler(d, rho, noise, g):
    "Fresh batches of (x~, y~): correlated Gaussians standardised per dimension over the batch, plus N(0, noise^2)."
    std = lambda z: (z - z.mean(0)) / z.std(0, unbiased=False)
    def sample(n):
        x, y = correlated_gaussians(n, d, rho, g)
        return std(x) + noise * torch.randn(n, d, generator=g), std(y) + noise * torch.randn(n, d, generator=g)
    return sample


def run_channel(seed: int) -> dict:
    c = CHANNEL
    torch.manual_seed(seed)
    club = []
    for rho in c['rhos']:
        g = torch.Generator().manual_seed(1 + seed)
        sample = noisy_channel_sampler(c['d'], rho, c['noise'], g)
        est = CLUB(c['d']); fit_estimator(est, sample, c['steps'], c['lr'], c['n'])
        club.append(mean_estimate(est, sample, c['n'], c['n_batches']))
    torch.manual_seed(2 + seed)
    g = torch.Generator().manual_seed(3 + seed)
    sample = noisy_channel_sampler(c['d'], 0.0, c['noise'], g)
    xs, ys = sample(c['overfit_n'])
    est = CLUB(c['d']); fit_estimator(est, lambda n: (xs, ys), c['overfit_steps'], c['lr'], c['overfit_n'])
    with torch.no_grad(): in_batch = float(est(xs, ys))
    return {'CLUB': club, 'overfit in-batch': in_batch}


def run_mmd(seed: int) -> dict:
    g = torch.Generator().manual_seed(3 + seed)
    shifts = [0.0, 0.5, 1.0, 2.0]
    a = torch.randn(256, 4, generator=g)
    mmds = [float(MMD()(a, torch.randn(256, 4, generator=g) + s)) for s in shifts]
    mmds_u = [float(MMD(unbiased=True)(a, torch.randn(256, 4, generator=g) + s)) for s in shifts]
    return {'MMD': mmds, 'MMD unbiased': mmds_u}


def run_losses(seed: int) -> dict:
    torch.manual_seed(5 + seed)
    W = torch.randn(3, 6)
    sample = lambda n: (lambda x: (x, x @ W + 0.3 * torch.randn(n, 6)))(torch.randn(n, 3))
    A = nn.Linear(3, 6)
    nce = InfoNCE(6, temperature=0.2)
    opt = torch.optim.Adam(A.parameters(), lr=1e-2)
    xs, ys = sample(256)
    before = float(nce(A(xs), ys).detach())
    for _ in range(150):
        x, y = sample(128)
        loss = -nce(A(x), y); opt.zero_grad(); loss.backward(); opt.step()
    after = float(nce(A(xs), ys).detach())
    B = nn.Linear(3, 3)
    club = CLUB(3, 3)
    opt_b, opt_q = torch.optim.Adam(B.parameters(), lr=1e-2), torch.optim.Adam(club.parameters(), lr=3e-3)
    xs3 = torch.randn(256, 3)
    for _ in range(100):
        x = torch.randn(128, 3); l = club.learning_loss(x, B(x).detach()); opt_q.zero_grad(); l.backward(); opt_q.step()
    club_before = float(club(xs3, B(xs3)))
    for _ in range(150):
        x = torch.randn(128, 3); z = B(x)
        opt_b.zero_grad(); club(x, z).backward(); opt_b.step()
        l = club.learning_loss(x, z.detach()); opt_q.zero_grad(); l.backward(); opt_q.step()
    club_after = float(club(xs3, B(xs3)))
    return {'InfoNCE after': after, 'InfoNCE gain': after - before, 'CLUB after / before': club_after / club_before}


def summarise(runs: list) -> dict:
    "Per key (scalar or list): mean, std (n-1), min, max over seeds and the seed-0 value."
    out = {}
    for key, v0 in runs[0].items():
        cols = list(zip(*[r[key] for r in runs])) if isinstance(v0, list) else [[r[key] for r in runs]]
        stats = {'mean': [statistics.fmean(c) for c in cols], 'std': [statistics.stdev(c) for c in cols],
                 'min': [min(c) for c in cols], 'max': [max(c) for c in cols], 'seed0': [c[0] for c in cols]}
        out[key] = stats if isinstance(v0, list) else {k: s[0] for k, s in stats.items()}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--seeds', type=int, default=16, help='number of seeds (0 .. seeds-1; 0 = the notebook run)')
    p.add_argument('--out', default=str(ROOT / 'bench/results/mi_spread.json'))
    p.add_argument('--parts', nargs='+', choices=['sweep', 'channel', 'mmd', 'losses'],
                   help='run only these parts and merge them into the existing output file(s)')
    p.add_argument('--fixture', action='store_true', help='also write nbs/fixtures/mi_seed_spread.json (committed)')
    a = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    parts = {'sweep': run_sweep, 'channel': run_channel, 'mmd': run_mmd, 'losses': run_losses}
    if a.parts: parts = {k: f for k, f in parts.items() if k in a.parts}
    runs = {k: [] for k in parts}
    for s in range(a.seeds):
        for k, f in parts.items(): runs[k].append(f(s))
        print(f'seed {s} done, {time.perf_counter() - t0:.0f} s', flush=True)
    new = {'about': 'seed spread of nbs/04_mi.ipynb; written by bench/mi_spread.py', 'n_seeds': a.seeds,
           'machine': platform.processor() or platform.machine(), 'torch': torch.__version__,
           'config': {'sweep': SWEEP, 'channel': CHANNEL},
           **{k: summarise(v) for k, v in runs.items()}}
    paths = [a.out] + ([str(ROOT / 'nbs/fixtures/mi_seed_spread.json')] if a.fixture else [])
    res = json.loads(Path(paths[-1]).read_text()) if a.parts else {}
    if a.parts and res.get('n_seeds') != a.seeds: raise SystemExit(f"{paths[-1]} has {res.get('n_seeds')} seeds, not {a.seeds}")
    res.update(new)
    if 'sweep' not in runs: return write(res, paths)
    true = [gaussian_mi(SWEEP['d'], r) for r in SWEEP['rhos']]
    print(f"\nsweep, {a.seeds} seeds: mean ± std (true MI first)")
    print('rho   true ' + ''.join(f'{k:>22}' for k in res['sweep']))
    for i, r in enumerate(SWEEP['rhos']):
        print(f'{r:.2f} {true[i]:6.3f}' + ''.join(f"{v['mean'][i]:14.3f} ± {v['std'][i]:5.3f}" for v in res['sweep'].values()))
    print('\nchannel CLUB:', [f'{m:.3f} ± {s:.3f}' for m, s in zip(res['channel']['CLUB']['mean'], res['channel']['CLUB']['std'])])
    for k in ('overfit in-batch',): print(k, f"{res['channel'][k]['mean']:.2f} ± {res['channel'][k]['std']:.2f}")
    write(res, paths)


def write(res, paths):
    for k, v in {**res['mmd'], **res['losses']}.items(): print(k, v['mean'], v['std'])
    for path in paths:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(res, indent=1) + '\n')
        print('wrote', path)


if __name__ == '__main__':
    main()
