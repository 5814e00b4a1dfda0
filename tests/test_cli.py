"The `tpad` console script works as the README says."
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def tpad(*args):
    "Run the installed `tpad` console script (the one next to this Python, else on PATH)."
    exe = Path(sys.executable).parent / 'tpad'
    exe = str(exe) if exe.exists() else shutil.which('tpad')
    if exe is None: pytest.fail('the tpad console script is not installed (pip install -e .)')
    return subprocess.run([exe, *args], capture_output=True, text=True)


def test_data_stats_toyshop():
    r = tpad('data', 'stats')
    assert r.returncode == 0, r.stderr
    assert 'toyshop' in r.stdout and 'sessions' in r.stdout


def test_data_stats_real_sample(shared):
    r = tpad('data', 'stats', '--dataset', 'diginetica', '--path', str(shared / 'diginetica_sample'), '--report')
    assert r.returncode == 0, r.stderr
    assert '12391' in r.stdout and 'read sample_train-item-views.csv' in r.stdout


def test_unknown_option_is_rejected():
    r = tpad('run', '--min_item_support', '3')
    assert r.returncode != 0 and 'unrecognized arguments' in r.stderr


def test_run_writes_outputs(tmp_path):
    r = tpad('run', '--preset', 'toyshop-smoke', '--models', 'pop,srgnn', '--out', str(tmp_path / 'run'),
             '--preprocess.min_item_support', '2')
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / 'run' / 'config.json').read_text())
    assert cfg['preprocess']['min_item_support'] == 2 and cfg['models'] == 'pop,srgnn'
    summary = json.loads((tmp_path / 'run' / 'summary.json').read_text())
    assert summary['stats']['dataset'] == 'toyshop' and summary['splits']['test']['samples'] > 0
    assert summary['stages'] == {}  # ID-only rows: no MLLM stage ran
    assert any(s.startswith('alignment-full.png') for s in summary['figures_skipped'])  # and says why no map
    md = (tmp_path / 'run' / 'results.md').read_text()
    assert '**Protocol.**' in md and '| Pop |' in md and '| SR-GNN |' in md


def test_wrong_type_and_unknown_model_are_named(tmp_path):
    r = tpad('run', '--fit.patience', 'three', '--out', str(tmp_path / 'a'))
    assert r.returncode != 0 and '--fit.patience' in r.stderr and "invalid int value: 'three'" in r.stderr
    r = tpad('run', '--models', 'pop,gru4recc', '--out', str(tmp_path / 'b'))
    assert r.returncode != 0 and "unknown model(s) ['gru4recc']" in r.stderr


def test_missing_data_path_says_how_to_get_it(tmp_path):
    r = tpad('run', '--preset', 'yoochoose', '--out', str(tmp_path / 'y'))
    assert r.returncode != 0 and 'needs its data: pass --path FOLDER' in r.stderr and 'recsys.acm.org' in r.stderr


def test_run_every_row_end_to_end(tmp_path):
    "The whole pipeline on the smoke preset: every stage, every row of the table (plain features when installed)."
    r = tpad('run', '--preset', 'toyshop-smoke', '--out', str(tmp_path / 'all'))
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / 'all' / 'summary.json').read_text())
    assert {'stage1', 'stage2', 'align-full', 'align-no_mi', 'align-no_disentangle', 'align-no_gen'} <= set(summary['stages'])
    md = (tmp_path / 'all' / 'results.md').read_text()
    table = md.split('\n\n')[2]  # the title, the protocol, then the table
    rows = [l.split('|')[1].strip() for l in table.splitlines() if l.startswith('| ') and not l.startswith('| model')]
    expected = ['Pop', 'item-kNN', 'S-kNN', 'GRU4Rec', 'SR-GNN', 'SASRec', 'MSBR + plain pre-trained features',
                'MSBR + Knowledge-MLLM features (Stage 1)', 'MSBR + Transfer-MLLM features (Stage 2a)', 'TPAD',
                'TPAD w/o MI alignment', 'TPAD w/o disentanglement', 'TPAD w/o generation task']
    if 'msbr_plain' in summary['skipped']: expected.remove('MSBR + plain pre-trained features')
    assert rows == expected, rows
    assert 'stage1' in summary['seconds'] and summary['seconds']['total'] > 0
    figures = set(summary['figures'])  # the visualisation notebooks' figures, drawn by the run
    assert {'data-items.png', 'data-session-lengths.png', 'data-transitions.png', 'alignment-full.png',
            'alignment-full.json', 'cases.json'} <= figures, figures
    assert all((tmp_path / 'all' / 'figures' / f).stat().st_size > 500 for f in figures)
    assert 'mmd' in summary['alignment']['full']['discrepancy']['after: z^sh vs t']
