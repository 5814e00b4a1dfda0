"""Stage 1, h^K extraction, Stage 2a and Stage 2b of the tiny MLLM (toyshop, CPU) under `accelerate launch` with 2
processes equal the same job in one process: per-step losses, weights and the feature caches; Stage 1 checkpoints
resume on another number of processes (2 -> 1 and 1 -> 2); and `tpad run` itself runs under the launcher. The runs
are `tests/_accelerate_job.py` processes and one `tpad run`.

What must agree. Two processes with a micro-batch of 8 each make one step out of 2 x 8 samples, and DDP averages the
two processes' gradients. The one-process run with the same global batch is therefore *not* batch_size=16 but
batch_size=8 with grad_accum_steps=2: process r reads the micro-batches r, r+2, ... of the epoch's order, exactly the
micro-batches of one process's accumulation windows, and both average the two micro-batch losses. (With a batch of
16 the losses would differ: the generation loss is a mean over the target tokens of a micro-batch and Stage 2a's
InfoNCE takes its negatives inside the micro-batch.) The tiny model has no dropout, so nothing random differs.
For two processes the agreement is exact in floating point: halving is exact, so (g0 + g1) / 2 from the all-reduce
equals g0 / 2 + g1 / 2 from the accumulation. The tests still allow a relative difference of TOL = 1e-6 (a float32
rounding is ~6e-8); measured: 0. The nearest wrong reference, one process with batch_size=16 (the same 16 samples per
step, grouped into one micro-batch instead of two), differs from it by 8e-6 to 1.3e-4 (relative) in the first four
Stage 1 losses, so TOL tells them apart.

Stage 2b has batch-level statistics too (InfoNCE negatives, MMD, the noisy channel's standardisation, CLUB), all
taken over a process's micro-batch, as over a micro-batch of the one-process run. Two more things could differ and
are made not to (see "Several processes" in nbs/06_alignment.ipynb): CLUB's q is fitted outside the optimiser, so each
process fits it on the gathered codes of every micro-batch of the step, in order, as one process does; and the
channel noise is drawn, in every process, for every micro-batch of the step in that order, so the random streams
match too. Measured: 0 difference in every logged term, the weights (q included, the same hash in both processes)
and e^LLM; the same TOL applies.

The cache is compared with torch.equal: every batch of the two-process extraction holds the same items, in the same
order and with the same padding, as the batch of the one-process plan, so the features are the same bits.

The launch: `ACCELERATE_USE_CPU=1 python -m accelerate.commands.launch --config_file
configs/accelerate/one_node_8gpu.yaml --num_processes 2 --num_machines 1 --mixed_precision no ...`, i.e. the
documented 8-GPU DDP config (distributed_type MULTI_GPU) cut to 2 processes, which ACCELERATE_USE_CPU=1 runs on the
CPU with the gloo backend. Not `accelerate launch --cpu --num_processes 2`: with accelerate 1.15 that goes through
the "simple" launcher and starts the script once (its multi-CPU mode needs mpirun).
"""
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / 'tests' / '_accelerate_job.py'
CONFIGS = ROOT / 'configs' / 'accelerate'
sys.path.insert(0, str(ROOT / 'tests'))
from _jobs import assert_same_history, cut_back, free_port, history, rank_info, run_launched  # noqa: E402
TOL = 1e-6  # relative; see the module docstring
STAGE1_STEPS, STAGE2_STEPS, ALIGN_STEPS, ALIGN_ITEMS, BATCH, N_ITEMS = 4, 3, 3, 64, 8, 600
TIMEOUT = 300


def run_job(out_dir, *args, processes: int = 1) -> float:
    "Run `_accelerate_job.py out_dir *args` in one process or under the documented one-node DDP config, cut to `processes`."
    return run_launched(JOB, out_dir, args, processes, CONFIGS / 'one_node_8gpu.yaml')


@pytest.fixture(scope='module')
def runs(tmp_path_factory, request):
    """one: 1 process x 2 micro-batches. two: 2 processes x 1 (after resuming a copy of one's Stage 1 from
    checkpoint-2). back: 1 process x 2 resuming a copy of two's Stage 1 from checkpoint-2."""
    failed = request.session.testsfailed
    root = tmp_path_factory.mktemp('accelerate')
    one, two, back = root / 'one', root / 'two', root / 'back'
    seconds = dict(one=run_job(one, '--accum', 2))  # first: also builds the tiny model, if it is not cached yet
    seconds['two'] = run_job(two, '--accum', 1, '--resume', cut_back(one / 'stage1', root / 'one-cut', STAGE1_STEPS), processes=2)
    seconds['back'] = run_job(back, '--accum', 2, '--stages', '', '--resume', cut_back(two / 'stage1', root / 'two-cut', STAGE1_STEPS))
    print(f'job seconds: {seconds}')
    yield dict(one=one, two=two, back=back, one_cut=root / 'one-cut', two_cut=root / 'two-cut')
    if request.session.testsfailed == failed: shutil.rmtree(root)  # kept when a test failed


def assert_same_weights(a, b):
    wa, wb = load_file(a), load_file(b)
    assert len(wa) > 0 and wa.keys() == wb.keys()
    for n in wa: torch.testing.assert_close(wa[n], wb[n], rtol=TOL, atol=1e-9, msg=lambda m: f'{n}: {m}')


def test_both_processes_took_part(runs):
    one, two = rank_info(runs['one']), rank_info(runs['two'])
    assert [(r['rank'], r['world']) for r in one] == [(0, 1)]
    assert [(r['rank'], r['world']) for r in two] == [(0, 2), (1, 2)]
    # training: each of the 2 processes ran half of every step's samples
    assert one[0]['rows']['stage1'] == STAGE1_STEPS * 2 * BATCH
    assert [r['rows']['stage1'] for r in two] == [STAGE1_STEPS * BATCH] * 2
    assert [r['rows']['resume'] for r in two] == [(STAGE1_STEPS - 2) * BATCH] * 2  # the 2 steps after checkpoint-2
    assert all(r['rows']['stage2'] > 0 for r in two) and two[0]['rows']['stage2'] == two[1]['rows']['stage2']
    assert one[0]['rows']['stage2b'] == ALIGN_STEPS * 2 * BATCH
    assert [r['rows']['stage2b'] for r in two] == [ALIGN_STEPS * BATCH] * 2
    # extraction: two disjoint shards of similar size that together are the catalogue (disjoint: the gather checks
    # that every item came back exactly once, and the cache equals the one-process cache below)
    shards = [r['rows']['extract'] for r in two]
    assert one[0]['rows']['extract'] == sum(shards) == N_ITEMS and min(shards) > 0.4 * N_ITEMS, shards


def test_stage1_losses_match_one_process(runs):
    worst = assert_same_history(history(runs['two'] / 'stage1'), history(runs['one'] / 'stage1'), STAGE1_STEPS)
    rows = history(runs['one'] / 'stage1')
    assert {'loss', 'grad_norm', 'lr'} <= rows[0].keys() and 'val_loss' in rows[1]  # validation every 2 steps
    assert rows[-1]['loss'] < rows[0]['loss']  # it trained
    print(f'Stage 1: largest relative difference 2 processes vs 1: {worst}')


def test_stage2_losses_match_one_process(runs):
    worst = assert_same_history(history(runs['two'] / 'stage2'), history(runs['one'] / 'stage2'), STAGE2_STEPS)
    assert {'loss', 'gen', 'nce', 'val_loss', 'val_nce'} <= history(runs['one'] / 'stage2')[-1].keys()
    print(f'Stage 2a: largest relative difference 2 processes vs 1: {worst}')


def test_stage2b_matches_one_process(runs):
    "Stage 2b: every logged term of every step, the weights (q included), e^LLM and the before/after numbers."
    worst = assert_same_history(history(runs['two'] / 'stage2b'), history(runs['one'] / 'stage2b'), ALIGN_STEPS)
    rows = history(runs['one'] / 'stage2b')
    assert {'loss', 'gen', 'mi', 'club', 'club_fit', 'mmd', 'rec', 'grad_norm'} <= rows[-1].keys()
    checkpoint = f'checkpoint-{ALIGN_STEPS}/weights.safetensors'
    assert_same_weights(runs['two'] / 'stage2b' / checkpoint, runs['one'] / 'stage2b' / checkpoint)
    assert any(n.startswith('club.') for n in load_file(runs['two'] / 'stage2b' / checkpoint))  # q is in the checkpoint
    one, two = rank_info(runs['one']), rank_info(runs['two'])
    assert two[0]['stage2b']['q'] == two[1]['stage2b']['q'] == one[0]['stage2b']['q']  # the processes' q agree
    assert two[0]['stage2b']['before'] == two[1]['stage2b']['before'] == one[0]['stage2b']['before']
    for r in two: assert r['stage2b']['after'].keys() == one[0]['stage2b']['after'].keys()
    for k, v in one[0]['stage2b']['after'].items():
        assert all(math.isclose(r['stage2b']['after'][k], v, rel_tol=TOL) for r in two), (k, v, two)
    assert sorted(p.name for p in (runs['two'] / 'cache2b').iterdir()) == [  # one writer, no leftovers
        'e_LLM.h_K.json', 'e_LLM.h_K.safetensors', 'e_LLM.json', 'e_LLM.safetensors', 'h_T.json', 'h_T.safetensors']
    e1, e2 = (load_file(r / 'cache2b' / 'e_LLM.safetensors')['features'] for r in (runs['one'], runs['two']))
    assert e2.shape == (ALIGN_ITEMS, 128) and torch.equal(e1, e2)
    assert len((runs['two'] / 'stage2b' / 'losses.csv').read_text().splitlines()) == 1 + ALIGN_STEPS
    print(f'Stage 2b: largest relative difference 2 processes vs 1: {worst}')


def test_weights_match_one_process(runs):
    assert_same_weights(runs['two'] / 'stage1' / f'checkpoint-{STAGE1_STEPS}' / 'weights.safetensors',
                        runs['one'] / 'stage1' / f'checkpoint-{STAGE1_STEPS}' / 'weights.safetensors')
    assert_same_weights(runs['two'] / 'stage2' / f'checkpoint-{STAGE2_STEPS}' / 'weights.safetensors',
                        runs['one'] / 'stage2' / f'checkpoint-{STAGE2_STEPS}' / 'weights.safetensors')
    state = json.loads((runs['two'] / 'stage1' / f'checkpoint-{STAGE1_STEPS}' / 'trainer_state.json').read_text())
    assert (state['num_processes'], state['grad_accum_steps']) == (2, 1)
    assert sorted(p.name for p in (runs['two'] / 'stage1' / 'checkpoint-2').glob('rng-*.json')) == ['rng-0.json', 'rng-1.json']


def test_feature_cache_equals_one_process(runs):
    cache_one, cache_two = runs['one'] / 'cache', runs['two'] / 'cache'
    assert sorted(p.name for p in cache_two.iterdir()) == ['h_K.json', 'h_K.safetensors']  # one writer, no leftovers
    f1, f2 = load_file(cache_one / 'h_K.safetensors')['features'], load_file(cache_two / 'h_K.safetensors')['features']
    assert f2.shape == (N_ITEMS, 128) and torch.equal(f1, f2)
    assert f2.abs().sum(1).gt(0).all() and not torch.equal(f2[0], f2[1])  # every row filled, rows differ
    m1, m2 = (json.loads((c / 'h_K.json').read_text()) for c in (cache_one, cache_two))
    assert m1['key'] == m2['key'] and m1['item_ids'] == m2['item_ids'] and len(m2['item_ids']) == N_ITEMS


def test_resume_two_processes_in_one(runs):
    back = rank_info(runs['back'])
    assert [(r['rank'], r['world'], r['resumed_from']) for r in back] == [(0, 1, 'checkpoint-2')]
    assert any('the same micro-batches in the same order' in w for w in back[0]['warnings']), back[0]['warnings']
    assert_same_history(history(runs['two_cut']), history(runs['two'] / 'stage1'), STAGE1_STEPS)
    assert_same_weights(runs['two_cut'] / f'checkpoint-{STAGE1_STEPS}' / 'weights.safetensors',
                        runs['two'] / 'stage1' / f'checkpoint-{STAGE1_STEPS}' / 'weights.safetensors')


def test_resume_one_process_in_two(runs):
    two = rank_info(runs['two'])
    assert [r['resumed_from'] for r in two] == ['checkpoint-2'] * 2
    assert any('the same micro-batches in the same order' in w for w in two[0]['warnings'])
    assert any('no RNG state for process 1' in w for w in two[1]['warnings'])  # the saved run had one process
    assert_same_history(history(runs['one_cut']), history(runs['one'] / 'stage1'), STAGE1_STEPS)
    assert_same_weights(runs['one_cut'] / f'checkpoint-{STAGE1_STEPS}' / 'weights.safetensors',
                        runs['one'] / 'stage1' / f'checkpoint-{STAGE1_STEPS}' / 'weights.safetensors')


def test_tpad_run_two_processes(tmp_path):
    """`tpad run` under `accelerate launch` (the console script is the launched file): the MLLM stages on both
    processes, the rows and the results written once, by process 0. Every stage is cut to 2 steps, one small epoch
    for the recommenders and no figures, to keep it cheap."""
    tpad = shutil.which('tpad') or str(Path(sys.executable).with_name('tpad'))
    if not Path(tpad).is_file(): pytest.skip('no `tpad` console script next to this Python')
    out = tmp_path / 'smoke'
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM='false', ACCELERATE_USE_CPU='1', OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--config_file', str(CONFIGS / 'one_node_8gpu.yaml'),
           '--num_processes', '2', '--num_machines', '1', '--mixed_precision', 'no', '--main_process_port',
           str(free_port()), tpad, 'run', '--preset', 'toyshop-smoke', '--models', 'srgnn,tpad', '--out', str(out),
           '--figures', 'none', '--stage1.train.max_steps', '2', '--stage2.train.max_steps', '2',
           '--align.train.max_steps', '2', '--fit.max_train_samples', '300']
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f'tpad run exited with {proc.returncode}:\n{log[-4000:]}'
    print(f'tpad run on 2 processes: {time.time() - t0:.1f} s')
    # both processes trained the MLLM stages: the checkpoints hold 2 processes' random states
    for stage in ('stage1', 'stage2', 'align-full'):
        ckpt = sorted((out / 'train' / stage).glob('checkpoint-*'))[-1]
        assert json.loads((ckpt / 'trainer_state.json').read_text())['num_processes'] == 2, stage
        assert sorted(p.name for p in ckpt.glob('rng-*.json')) == ['rng-0.json', 'rng-1.json'], stage
        assert (out / 'stages' / stage / 'stage.json').is_file(), stage
    # one voice, one table: process 1 logs nothing and stops after the stages
    assert log.count('[stage1] done in') == log.count('wrote ') == 1, log[-3000:]
    assert '[run] 2 processes' in log
    assert sorted(p.name for p in out.glob('results*')) == ['results.csv', 'results.md']
    md = (out / 'results.md').read_text()
    assert md.startswith('# Results: toyshop-smoke') and '| SR-GNN' in md and '| TPAD' in md
    assert not list(out.rglob('.*.tmp*'))  # no half-written file left


def test_configs_parse():
    "The documented accelerate configs load with accelerate's own reader and say what their names say."
    from accelerate.commands.config.config_args import load_config_from_file
    found = {p.stem: load_config_from_file(str(p)) for p in sorted(CONFIGS.glob('*.yaml'))}
    assert set(found) == {'one_gpu', 'one_node_8gpu', 'multi_node', 'fsdp_8gpu'}
    layout = {k: (c.distributed_type.value, c.num_machines, c.num_processes, str(c.mixed_precision)) for k, c in found.items()}
    assert layout == {'one_gpu': ('NO', 1, 1, 'bf16'), 'one_node_8gpu': ('MULTI_GPU', 1, 8, 'bf16'),
                      'multi_node': ('MULTI_GPU', 2, 16, 'bf16'), 'fsdp_8gpu': ('FSDP', 1, 8, 'bf16')}, layout
    fsdp = found['fsdp_8gpu'].fsdp_config
    assert fsdp['fsdp_version'] == 2 and fsdp['fsdp_reshard_after_forward'] is True
    assert found['multi_node'].main_process_ip and found['multi_node'].main_process_port
