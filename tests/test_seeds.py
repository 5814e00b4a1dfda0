"Pipeline seeds: `tpad run --seeds N` reruns every stage per seed, reuses nothing from another seed or config, and a seed gives the same run twice."
import json
import shutil

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from test_cli import tpad

FEATURE_ROWS = 'pop,srgnn,msbr_knowledge,tpad,tpad_no_gen'


def run_ok(*args):
    r = tpad('run', '--preset', 'toyshop-smoke', '--figures', 'none', *args)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.fixture(scope='module')
def three_seeds(tmp_path_factory):
    out = tmp_path_factory.mktemp('seeds') / 'run'
    log = run_ok('--models', FEATURE_ROWS, '--seeds', '3', '--out', str(out))
    return out, log


def test_every_seed_reruns_every_stage(three_seeds):
    out, log = three_seeds
    rows = pd.read_csv(out / 'results.csv')
    assert rows.groupby('model')['seed'].apply(sorted).apply(list).to_dict() == {k: [0, 1, 2] for k in FEATURE_ROWS.split(',')}
    stages = pd.read_csv(out / 'stages.csv')
    assert sorted(zip(stages['stage'], stages['seed'])) == sorted((s, i) for s in ('stage1', 'stage2', 'align-full', 'align-no_gen') for i in range(3))
    assert not stages['reused'].any()
    assert (stages.loc[stages['stage'] == 'align-full', 'club ceiling'] > 0).all()  # CLUB's numbers beside their ceiling
    for name in ('stage1', 'align-full'):  # each seed trained its own stage: different features
        f = [load_file(str(out / 'stages' / (name if s == 0 else f'{name}-seed{s}') / 'outputs.safetensors'))['features'] for s in range(3)]
        assert not torch.equal(f[0], f[1]) and not torch.equal(f[1], f[2])
    md = (out / 'results.md').read_text()
    assert 'Mean ± std over 3 pipeline seed(s) (0, 1, 2): each seed reran Stages 1, 2a and 2b' in md
    table = [l for l in md.split('\n\n')[2].splitlines() if l.startswith('| ') and not l.startswith('| model')]
    assert [l.split('|')[1].strip() for l in table] == ['Pop', 'SR-GNN', 'MSBR + Knowledge-MLLM features (Stage 1)', 'TPAD', 'TPAD w/o generation task']
    assert all(any(m in l for m in '▲▼=') for l in table if not l.startswith('| TPAD |'))
    assert '## Claims' in md and '**the generation task matters**' in md and '95 % intervals' in md
    sig = pd.read_csv(out / 'significance.csv')
    assert set(sig['model']) == {'pop', 'srgnn', 'msbr_knowledge', 'tpad_no_gen'} and sig['p_holm'].between(0, 1).all()
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['seeds'] == [0, 1, 2] and set(summary['stages']['stage1']) == {'seed0', 'seed1', 'seed2'}
    ranks = load_file(str(out / 'ranks.safetensors'))
    assert len(ranks['tpad/seed2/overall']) == summary['splits']['test']['samples']


def test_same_seed_twice_is_bit_identical(tmp_path):
    """The same command and seed twice on one machine: the same stage tensors, ranks and table. The rows train in worker
    processes of one torch thread each (`--jobs 2`, the default on two cores or more): in one process of several
    threads, a row's ranks were seen to differ on a rare sample between reruns, while the stage tensors stayed equal."""
    runs = [tmp_path / 'first', tmp_path / 'again']
    for out in runs: run_ok('--models', FEATURE_ROWS, '--seed_list', '1', '--jobs', '2', '--out', str(out))
    for name in ('stage1', 'stage2', 'align-full', 'align-no_gen'):
        a, b = (load_file(str(out / 'stages' / f'{name}-seed1' / 'outputs.safetensors')) for out in runs)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    ra, rb = (load_file(str(out / 'ranks.safetensors')) for out in runs)
    assert ra.keys() == rb.keys() and all(torch.equal(ra[k], rb[k]) for k in ra), [k for k in ra if not torch.equal(ra[k], rb[k])]
    metrics = [c for c in pd.read_csv(runs[0] / 'results.csv').columns if '@' in c]
    pd.testing.assert_frame_equal(*(pd.read_csv(out / 'results.csv')[metrics] for out in runs))


def test_no_stage_of_another_seed_or_config_is_reused(three_seeds, tmp_path):
    out, _ = three_seeds
    run = tmp_path / 'run'
    shutil.copytree(out / 'stages', run / 'stages')
    # seed 1's Stage 1 folder now holds seed 0's outputs and seal: a run of seed 1 must not take them
    shutil.rmtree(run / 'stages' / 'stage1-seed1')
    shutil.copytree(run / 'stages' / 'stage1', run / 'stages' / 'stage1-seed1')
    log = run_ok('--models', 'msbr_knowledge', '--seed_list', '1', '--out', str(run))
    assert '[stage1] done' in log and '[stage1] reused' not in log
    seed1 = load_file(str(out / 'stages' / 'stage1-seed1' / 'outputs.safetensors'))['features']
    assert torch.equal(load_file(str(run / 'stages' / 'stage1-seed1' / 'outputs.safetensors'))['features'], seed1)
    (run / 'progress.json').unlink()  # else the finished row itself is kept and no stage is even opened
    log = run_ok('--models', 'msbr_knowledge', '--seed_list', '1', '--out', str(run))
    assert '[stage1] reused' in log  # its own outputs are reused
    log = run_ok('--models', 'msbr_knowledge', '--seed_list', '1', '--stage1.train.lr', '0.01', '--out', str(run))
    assert '[stage1] done' in log and '[stage1] reused' not in log  # another config


@pytest.mark.parametrize('args,says', [(('--seeds', '0'), 'config.seeds must be >= 1'),
                                       (('--seeds', '-2'), 'config.seeds must be >= 1'),
                                       (('--seed_list', '0,1,1'), 'repeats seed(s) [1]'),
                                       (('--seed_list', '2,-1'), 'seeds must be >= 0')])
def test_bad_seeds_are_named(tmp_path, args, says):
    r = tpad('run', *args, '--out', str(tmp_path / 'x'))
    assert r.returncode != 0 and says in r.stderr, r.stderr
    assert not (tmp_path / 'x' / 'config.json').exists()  # refused before any work


def test_fixed_stages_vary_only_the_recommenders(three_seeds, tmp_path):
    out, _ = three_seeds
    run = tmp_path / 'fixed'
    shutil.copytree(out / 'stages', run / 'stages')
    log = run_ok('--models', 'msbr_knowledge', '--seeds', '2', '--fixed_stages', 'true', '--out', str(run))
    assert log.count('[stage1] reused') == 1 and '[stage1] done' not in log  # seed 0's Stage 1, run once, serves both seeds
    assert sorted(pd.read_csv(run / 'results.csv')['seed']) == [0, 1]
    assert pd.read_csv(run / 'stages.csv')['seed'].unique().tolist() == [0]
    assert 'the MLLM stages ran once (seed 0), only the recommenders varied' in (run / 'results.md').read_text()
