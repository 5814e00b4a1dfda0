"""A Stage 2a training run killed with SIGKILL mid-training resumes from its last checkpoint and ends bit-identical
to an uninterrupted run at the same seed (tiny MLLM, toyshop, CPU). The runs are `tests/_train_job.py` processes."""
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tests'))
from _jobs import TIMEOUT, finish, start, tail  # noqa: E402
JOB = ROOT / 'tests' / '_train_job.py'
TOTAL = 12  # optimiser steps of the job (96 samples, batch 8, one epoch); a checkpoint every 2 steps


def job(out_dir, *args):
    "Start `_train_job.py out_dir *args` from the repo root, its output going to `out_dir`.log."
    return start(JOB.name, out_dir, *args, log=f'{out_dir}.log')


def history(path) -> list:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def complete_checkpoints(out_dir) -> list:
    return sorted(int(p.name.split('-')[1]) for p in Path(out_dir).glob('checkpoint-*') if (p / 'trainer_state.json').is_file())


@pytest.fixture(scope='module')
def runs(tmp_path_factory, request):
    "A: uninterrupted; B: SIGKILLed after checkpoint-4, a fake half-written checkpoint planted, then resumed."
    failed = request.session.testsfailed
    root = tmp_path_factory.mktemp('resume')
    a, b = root / 'A', root / 'B'
    finish(job(a))

    proc = job(b, '--sleep', '0.4')  # ~0.7 s per step: the run is far from done when checkpoint-4 appears
    deadline = time.time() + TIMEOUT
    while not (b / 'checkpoint-4' / 'trainer_state.json').is_file():
        if proc.poll() is not None: pytest.fail(f'job B ended before checkpoint-4:\n{tail(proc)}')
        if time.time() > deadline: proc.kill(); pytest.fail('job B wrote no checkpoint-4 in time')
        time.sleep(0.05)
    time.sleep(0.3)  # into step 5: work done after the checkpoint is lost
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=TIMEOUT)
    killed = dict(returncode=proc.returncode, checkpoints=complete_checkpoints(b),
                  final=(b / 'final.safetensors').exists(), history=history(b / 'history.jsonl'))

    # a save that was killed half-way leaves `.tmp-checkpoint-<step>`, whose trainer_state.json may already be written:
    # plant one for the next step, with weights that would wreck the run, and check resume ignores it
    last = killed['checkpoints'][-1]
    fake = b / f'.tmp-checkpoint-{last + 2}'
    if fake.exists(): shutil.rmtree(fake)  # the kill may have landed in that very save
    shutil.copytree(b / f'checkpoint-{last}', fake)
    state = json.loads((fake / 'trainer_state.json').read_text())
    (fake / 'trainer_state.json').write_text(json.dumps(dict(state, step=last + 2)))
    save_file({n: torch.zeros_like(w) for n, w in load_file(fake / 'weights.safetensors').items()},
              fake / 'weights.safetensors')

    finish(job(b, '--resume'))
    yield dict(a=a, b=b, killed=killed, last=last)
    if request.session.testsfailed == failed: shutil.rmtree(root)  # ~110 MB of checkpoints; kept when a test failed


def test_kill_interrupts_training(runs):
    k = runs['killed']
    assert k['returncode'] == -signal.SIGKILL
    assert not k['final']  # the job never reached its end
    assert 4 <= runs['last'] < TOTAL and k['checkpoints'] == list(range(2, runs['last'] + 1, 2))
    assert k['history'] and k['history'][-1]['step'] < TOTAL


def test_resumes_from_last_checkpoint_not_tmp(runs):
    a, b = (json.loads((runs[x] / 'final.json').read_text()) for x in ('a', 'b'))
    assert a['resumed_from'] is None
    assert b['resumed_from'] == f"checkpoint-{runs['last']}"  # the newest complete one, not the .tmp- folder
    assert a['step'] == b['step'] == a['total_steps'] == TOTAL
    assert not list(runs['b'].glob('.tmp-*'))  # the half-written folder was replaced by the real save of that step
    assert complete_checkpoints(runs['b']) == complete_checkpoints(runs['a']) == list(range(2, TOTAL + 1, 2))


def test_resumed_run_equals_uninterrupted_run(runs):
    wa, wb = load_file(runs['a'] / 'final.safetensors'), load_file(runs['b'] / 'final.safetensors')
    assert len(wa) > 0 and wa.keys() == wb.keys()
    different = [n for n in wa if not torch.equal(wa[n], wb[n])]
    assert not different, f'{len(different)} of {len(wa)} weights differ, e.g. {different[:3]}'
    # the steps after the resume did train: the final weights moved away from the checkpoint resumed from
    resumed = load_file(runs['b'] / f"checkpoint-{runs['last']}" / 'weights.safetensors')
    assert any(not torch.equal(resumed[n], wb[n]) for n in wb)


def test_resumed_history_equals_uninterrupted_history(runs):
    fa, fb = (json.loads((runs[x] / 'final.json').read_text())['history'] for x in ('a', 'b'))
    assert [r['step'] for r in fa] == list(range(1, TOTAL + 1))  # log_every=1: one row per optimiser step
    assert fb == fa  # losses, loss terms, lr, grad norm: exactly equal
    # history.jsonl on disk: the killed run's rows past its checkpoint were dropped, not duplicated
    assert history(runs['b'] / 'history.jsonl') == history(runs['a'] / 'history.jsonl') == fa


def test_checkpoints_match_step_by_step(runs):
    "Every checkpoint of the resumed run holds the same weights as the uninterrupted run's at that step."
    for step in range(2, TOTAL + 1, 2):
        wa = load_file(runs['a'] / f'checkpoint-{step}' / 'weights.safetensors')
        wb = load_file(runs['b'] / f'checkpoint-{step}' / 'weights.safetensors')
        assert all(torch.equal(wa[n], wb[n]) for n in wa), f'checkpoint-{step} differs'
