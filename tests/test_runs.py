"Runs named after their data, kept when killed, and rerun without redoing finished rows (issue 15)."
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tpad.data import load
from tpad.experiment import make_config, run_dir, run_name
from tpad.cli import parser

ROWS = ['pop', 'item_knn', 'sknn', 'gru4rec', 'srgnn']


def tpad_cmd(*args) -> list[str]:
    return [sys.executable, '-c', 'from tpad.cli import main; main()', *map(str, args)]


def write_csv_shop(folder: Path, n_sessions: int = 1500) -> Path:
    "A csv copy of the first sessions of the toyshop: items.csv (item_id, title, text, category, image) and interactions.csv."
    shop = load('toyshop')
    folder.mkdir(parents=True)
    inter = shop.interactions[shop.interactions.session_id.isin(shop.interactions.session_id.unique()[:n_sessions])]
    shop.items.to_csv(folder / 'items.csv', index=False)
    inter[['session_id', 'item_id', 'timestamp']].to_csv(folder / 'interactions.csv', index=False)
    return folder


def test_dataset_alone_gets_a_generic_run_named_after_its_data():
    args = parser().parse_args(['run', '--dataset', 'csv', '--path', '/data/my shop/'])
    from tpad.experiment import config_from_args
    cfg = config_from_args(args)
    assert cfg.preset == 'generic' and run_name(cfg) == 'my-shop' and run_dir(cfg) == Path('runs/my-shop')
    assert cfg.preprocess.min_item_support == 5 and cfg.fit.epochs == make_config('generic').fit.epochs  # not the toyshop's
    assert make_config().preset == 'toyshop-tiny' and run_dir(make_config()) == Path('runs/toyshop-tiny')
    assert run_dir(make_config('amazon-toys-ids', path='x')) == Path('runs/amazon-toys-ids')
    assert run_dir(make_config('large-catalogue', dataset='csv', path='/d/bigshop')) == Path('runs/bigshop-large-catalogue')


def test_csv_run_is_named_and_headed_after_its_data(tmp_path):
    data = write_csv_shop(tmp_path / 'myshop')
    r = subprocess.run(tpad_cmd('run', '--dataset', 'csv', '--path', data, '--models', 'pop', '--figures', 'none',
                                '--preprocess.min_item_support', '2'), cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / 'runs' / 'myshop'
    assert (out / 'results.md').read_text().startswith('# Results: myshop\n')
    assert json.loads((out / 'config.json').read_text())['preset'] == 'generic'
    assert not (tmp_path / 'runs' / 'toyshop-tiny').exists()


def test_killed_run_keeps_its_rows_and_a_rerun_skips_them(tmp_path):
    out = tmp_path / 'run'
    args = ['run', '--preset', 'toyshop-smoke', '--models', ','.join(ROWS), '--out', out, '--figures', 'none',
            '--fit.max_train_samples', '0', '--fit.epochs', '3']  # slow neural rows: the kill lands before them
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.Popen(tpad_cmd(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    progress, deadline = out / 'progress.json', time.time() + 600
    while not (progress.exists() and json.loads(progress.read_text())['rows']):
        if proc.poll() is not None: pytest.fail(f'the run ended before it could be killed: {proc.stderr.read()[-2000:]}')
        if time.time() > deadline: proc.kill(); pytest.fail('no row finished in 10 minutes')
        time.sleep(0.1)
    proc.kill(); proc.wait()
    done = json.loads(progress.read_text())['rows']
    assert 1 <= len(done) < len(ROWS), done
    before = pd.read_csv(out / 'results.csv')  # written just before progress.json: a kill between them leaves it a row ahead
    before = before[[(m, s) in {(m, s) for m, s in done} for m, s in zip(before.model, before.seed)]]
    assert before.model.tolist() == [m for m, _ in done] and (out / 'results.md').exists()

    r = subprocess.run(tpad_cmd(*args), capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    kept = f"[resume] {len(done)} row(s) finished by an earlier run in {out} with the same settings are kept, not refitted: " \
           + ', '.join(f'{m} seed {s}' for m, s in done)
    assert kept in r.stdout, r.stdout[:3000]
    for m, _ in done: assert f'[{m}] ' not in r.stdout  # not fitted again
    after = pd.read_csv(out / 'results.csv')
    assert after.model.tolist() == ROWS
    pd.testing.assert_frame_equal(after.iloc[:len(done)].reset_index(drop=True), before.reset_index(drop=True), check_dtype=False)


def test_other_settings_start_afresh(tmp_path):
    out = tmp_path / 'run'
    first = subprocess.run(tpad_cmd('run', '--preset', 'toyshop-smoke', '--models', 'pop', '--out', out, '--figures', 'none'),
                           capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    again = subprocess.run(tpad_cmd('run', '--preset', 'toyshop-smoke', '--models', 'pop', '--out', out, '--figures', 'none',
                                    '--preprocess.min_item_support', '3'), capture_output=True, text=True)
    assert again.returncode == 0 and '[resume]' not in again.stdout and '[pop] Pop (seed 0)' in again.stdout


def test_titles_only_with_a_text_target_gets_one_line_of_advice(tmp_path):
    data = write_csv_shop(tmp_path / 'titles')
    items = pd.read_csv(data / 'items.csv')[['item_id', 'title']]
    items.to_csv(data / 'items.csv', index=False)
    r = subprocess.run(tpad_cmd('run', '--dataset', 'csv', '--path', data, '--models', 'tpad', '--out', tmp_path / 'run',
                                '--stage1.target_field', 'text', '--preprocess.min_item_support', '1'),
                       capture_output=True, text=True)
    assert r.returncode != 0 and 'Traceback' not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines() == ["tpad run: stage1.target_field 'text': no item has text; the items have title; "
                                             "use --stage1.target_field auto or title"], r.stderr[-3000:]
    assert not (tmp_path / 'run' / 'stages').exists()  # nothing trained


def test_id_only_rows_of_every_seed_queued_at_once_give_the_same_table(tmp_path):
    "With no MLLM stage to wait for, every seed's rows go to the row processes at once; the table is the one-by-one table."
    common = ['run', '--preset', 'toyshop-smoke', '--models', 'pop,gru4rec,srgnn', '--seeds', '2', '--figures', 'none']
    side = subprocess.run(tpad_cmd(*common, '--jobs', '2', '--out', tmp_path / 'side'), capture_output=True, text=True)
    alone = subprocess.run(tpad_cmd(*common, '--jobs', '1', '--threads', '1', '--out', tmp_path / 'alone'), capture_output=True, text=True)
    assert side.returncode == 0 and alone.returncode == 0, side.stderr[-2000:] + alone.stderr[-2000:]
    a, b = (pd.read_csv(tmp_path / d / 'results.csv') for d in ('side', 'alone'))
    metrics = [c for c in a.columns if '@' in c]
    assert a[['model', 'seed']].equals(b[['model', 'seed']])
    pd.testing.assert_frame_equal(a[metrics], b[metrics])
