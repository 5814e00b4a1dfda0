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
    r = tpad('run', '--out', str(tmp_path / 'run'), '--preprocess.min_item_support', '2')
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / 'run' / 'config.json').read_text())
    assert cfg['preprocess']['min_item_support'] == 2
    summary = json.loads((tmp_path / 'run' / 'summary.json').read_text())
    assert summary['stats']['dataset'] == 'toyshop' and summary['splits']['test']['samples'] > 0
