"""`tpad.train.train` under FSDP2 (full shard) on 2 CPU processes equals the same Stage 1 job in one process: the
parameters are really sharded while it trains, the logged losses and the checkpoints (trainable weights, optimizer
state) are those of the one-process run, a checkpoint written under FSDP finishes in one process and one written by
one process finishes under FSDP, and after `train` returns the model is whole again in every process, so that the
sharded item-feature extraction and adapter switching run on it (and a second `train` shards it again). The runs are
`tests/_fsdp_job.py` processes.

How FSDP runs on a CPU. `accelerate launch` with the shipped `configs/accelerate/fsdp_8gpu.yaml` (cut to 2 processes,
`--mixed_precision no`, ACCELERATE_USE_CPU=1: gloo) starts the 2 processes, but accelerate maps a CPU job to MULTI_CPU,
i.e. DDP. So the job script (not the library) switches the shared accelerate state to FSDP2 before `train` runs,
with a `FullyShardedDataParallelPlugin` built from the settings the launcher read from the config file (FSDP2,
reshard_after_forward, transformer-based wrap, FULL_STATE_DICT, cpu_ram_efficient_loading, no offload), with the tiny
LLaVA's layer classes (LlamaDecoderLayer, CLIPEncoderLayer) to wrap instead of Qwen2-VL's. Everything after that is
the library's own code path under FSDP2.

The model: the kit's tiny LLaVA with the two LoRA adapters (r=8 on the language model's q/k/v/o, dropout 0 so that
nothing random differs), Stage 1 (`train_knowledge`) on the toyshop: 4 steps, a checkpoint and a validation every 2.

What must agree, and how closely. As in tests/test_accelerate.py, 2 processes x 1 micro-batch of 8 are compared with
1 process x 2 micro-batches of 8 (the same 16 samples a step, grouped the same way). FSDP2 reduce-scatters the
gradients and divides by 2, which is exact, so the weights, the optimizer state and the losses are the same bits;
only the logged gradient norm is summed from the two shards' parts and differs in the last bits (measured, relative:
7.8e-8; every loss, validation loss and learning rate: 0). The tests allow a relative TOL = 1e-6, as
tests/test_accelerate.py does. (The nearest wrong run seen while writing this test, FSDP with each process's own
random LoRA init, differed by 0.4-0.6 % in the losses from step 2 on.) The checkpoint written under FSDP and the
weights the processes hold after `train` are compared with torch.equal: both are the same all-gather of the same
shards, with no arithmetic in between. The features are compared with torch.equal too: the model is then an ordinary
module with the same weights as the one-process model, and each extraction batch holds the same items, in the same
order and padding, as in one process.

The second `train` accumulates: 2 micro-batches per process and step under FSDP (the first without gradient sync),
4 in one process. The gradient is then summed in another order ((g0 + g2) + (g1 + g3) against ((g0 + g1) + g2) + g3),
so it agrees to float32 rounding only, and AdamW, which divides by the root of the second moment, carries that into
the update: measured, the weights differ by up to 6.7e-8 (6e-7 of the largest weight), the losses by 1.8e-8
(relative). That comparison allows ACCUM_TOL = 1e-5 relative to each tensor's largest value; the losses keep TOL.

Time: the three jobs take about 10 s (1 process), 20 s (FSDP, 2 processes) and 9 s (1 process) on 2 loaded CPU cores.
"""
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tpad.train import load_tree

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / 'tests' / '_fsdp_job.py'
CONFIG = ROOT / 'configs' / 'accelerate' / 'fsdp_8gpu.yaml'
sys.path.insert(0, str(ROOT / 'tests'))
from _jobs import assert_same_history, cut_back, history, rank_info, run_launched  # noqa: E402
TOL = 1e-6  # relative; see the module docstring
ACCUM_TOL = 1e-5  # relative to each tensor's largest value, for the run that accumulates under FSDP (docstring)
STEPS, AGAIN_STEPS, BATCH, N_FEATURES, LORA_WEIGHTS = 4, 2, 8, 40, 16  # LORA_WEIGHTS: the knowledge adapter's A and B of 8 layers


def run_job(out_dir, *args, processes: int = 1, launch: tuple = ()) -> float:
    "Run `_fsdp_job.py out_dir *args` in one process, or under the shipped FSDP config on `processes` with FSDP2 forced."
    return run_launched(JOB, out_dir, args, processes, CONFIG, launch=launch, flags=('--fsdp',), env=dict(OMP_NUM_THREADS='1'))


@pytest.fixture(scope='module')
def runs(tmp_path_factory, request):
    """one: 1 process x 2 micro-batches. fsdp: FSDP2 on 2 processes x 1 (after resuming a copy of one's Stage 1 from
    checkpoint-2). back: 1 process x 2 resuming a copy of fsdp's Stage 1 from checkpoint-2."""
    failed = request.session.testsfailed
    root = tmp_path_factory.mktemp('fsdp')
    one, fsdp, back = root / 'one', root / 'fsdp', root / 'back'
    seconds = dict(one=run_job(one, '--accum', 2))
    seconds['fsdp'] = run_job(fsdp, '--accum', 1, '--resume', cut_back(one / 'stage1', root / 'one-cut', STEPS), processes=2)
    seconds['back'] = run_job(back, '--accum', 2, '--stages', '', '--resume', cut_back(fsdp / 'stage1', root / 'fsdp-cut', STEPS))
    print(f'job seconds: {seconds}')
    yield dict(one=one, fsdp=fsdp, back=back, one_cut=root / 'one-cut', fsdp_cut=root / 'fsdp-cut')
    if request.session.testsfailed == failed: shutil.rmtree(root)  # kept when a test failed


def assert_same_tensors(a: dict, b: dict, tol: float = TOL) -> float:
    """The same names, every tensor within `tol` of b's, relative to the element or to the tensor's largest |value|;
    the largest difference, relative to the tensor's largest |value| (0: the same bits)."""
    assert len(a) > 0 and a.keys() == b.keys(), (sorted(a)[:3], sorted(b)[:3])
    worst = 0.0
    for n in a:
        scale = max(b[n].abs().max().item(), 1e-30)
        torch.testing.assert_close(a[n], b[n], rtol=tol, atol=tol * scale, msg=lambda m: f'{n}: {m}')
        worst = max(worst, (a[n] - b[n]).abs().max().item() / scale)
    return worst


def assert_same_checkpoint(a, b, tol: float = TOL) -> float:
    "Two checkpoint folders: weights and optimizer state within `tol`, the same optimizer layout and schedule."
    a, b = Path(a), Path(b)
    worst = max(assert_same_tensors(load_file(a / f), load_file(b / f), tol)
                for f in ('weights.safetensors', 'optimizer.safetensors'))
    assert json.loads((a / 'optimizer.json').read_text()) == json.loads((b / 'optimizer.json').read_text())
    assert json.loads((a / 'scheduler.json').read_text()) == json.loads((b / 'scheduler.json').read_text())
    return worst


def test_params_sharded_while_training(runs):
    "Under FSDP the model in the loss function is FSDP2's: every trainable parameter a DTensor, each process half of it."
    one, fsdp = rank_info(runs['one']), rank_info(runs['fsdp'])
    assert [(r['rank'], r['world']) for r in one] == [(0, 1)]
    assert [(r['rank'], r['world']) for r in fsdp] == [(0, 2), (1, 2)]
    for r in fsdp:  # the FSDP settings of configs/accelerate/fsdp_8gpu.yaml, as the launcher passed them on
        assert r['fsdp_plugin'] == dict(version=2, reshard_after_forward=True, state_dict_type='StateDictType.FULL_STATE_DICT',
                                        cpu_ram_efficient_loading=True, offload_params=False,
                                        wrap=['LlamaDecoderLayer', 'CLIPEncoderLayer']), r['fsdp_plugin']
        assert r['in_loss'].keys() == {'resume', 'stage1', 'again'}  # three `train` calls, all under FSDP
        for phase, seen in r['in_loss'].items():
            assert seen['distributed_type'] == 'DistributedType.FSDP' and seen['cls'] == 'FSDPPeftModel', (phase, seen)
            assert seen['trainable'] == seen['dtensor'] == LORA_WEIGHTS, (phase, seen)
            assert 0 < seen['local_numel'] == seen['full_numel'] // 2, (phase, seen)  # a shard, not the whole
            units = seen['fsdp_units']  # the wrap policy: the decoder layers and vision layers are units of their own
            assert units.count('FSDPLlamaDecoderLayer') == 2 and units.count('FSDPCLIPEncoderLayer') == 2, units
    seen = one[0]['in_loss']['stage1']
    assert (seen['cls'], seen['dtensor'], seen['trainable']) == ('PeftModel', 0, LORA_WEIGHTS)
    # each process ran half of every step's samples
    assert one[0]['rows']['stage1'] == STEPS * 2 * BATCH
    assert [r['rows']['stage1'] for r in fsdp] == [STEPS * BATCH] * 2
    assert [r['rows']['resume'] for r in fsdp] == [(STEPS - 2) * BATCH] * 2  # the 2 steps after checkpoint-2


def test_losses_match_one_process(runs):
    worst = assert_same_history(history(runs['fsdp'] / 'stage1'), history(runs['one'] / 'stage1'), STEPS)
    rows = history(runs['one'] / 'stage1')
    assert {'loss', 'grad_norm', 'lr'} <= rows[0].keys() and 'val_loss' in rows[1]  # validation every 2 steps
    assert rows[-1]['loss'] < rows[0]['loss']  # it trained
    print(f'Stage 1 under FSDP, largest relative difference to 1 process: {worst}')


def test_checkpoint_is_the_gathered_model(runs):
    """The FSDP checkpoint holds the whole trainable weights (not a shard), exactly what the processes hold after
    `train`, and the optimizer state in the one-process format (integer ids, whole tensors)."""
    ckpt = runs['fsdp'] / 'stage1' / f'checkpoint-{STEPS}'
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ['optimizer.json', 'optimizer.safetensors', 'rng-0.json', 'rng-0.safetensors', 'rng-1.json',
                     'rng-1.safetensors', 'scheduler.json', 'scheduler.safetensors', 'trainer_state.json',
                     'weights.safetensors'], names
    weights = load_file(ckpt / 'weights.safetensors')
    assert len(weights) == LORA_WEIGHTS and all('.lora_' in n and '.knowledge.' in n for n in weights)
    shapes = sorted({tuple(w.shape) for w in weights.values()})
    assert shapes == [(8, 128), (128, 8)], shapes  # whole LoRA matrices, not the (4, 128) / (64, 8) shards
    for rank in (0, 1):
        held = load_file(runs['fsdp'] / f'gathered-{rank}.safetensors')
        assert held.keys() == weights.keys() and all(torch.equal(held[n], weights[n]) for n in weights), rank
    state = json.loads((ckpt / 'trainer_state.json').read_text())
    assert (state['num_processes'], state['step'], sorted(state['trainable'])) == (2, STEPS, sorted(weights))
    optimizer = load_tree(ckpt / 'optimizer')
    order = [n for group in state['optimizer_params'] for n in group]
    assert sorted(order) == sorted(weights) and sorted(optimizer['state']) == list(range(len(order)))
    assert [p for g in optimizer['param_groups'] for p in g['params']] == list(range(len(order)))
    for i, name in enumerate(order):
        s = optimizer['state'][i]
        assert s['exp_avg'].shape == s['exp_avg_sq'].shape == weights[name].shape and float(s['step']) == STEPS, name
        assert s['exp_avg_sq'].abs().sum() > 0, name  # trained: the moments are not the zeros of a fresh state


def test_weights_match_one_process(runs):
    worst = [assert_same_checkpoint(runs['fsdp'] / 'stage1' / f'checkpoint-{s}', runs['one'] / 'stage1' / f'checkpoint-{s}')
             for s in (2, STEPS)]
    print(f'FSDP vs 1 process, checkpoints 2 and {STEPS}: largest difference (relative to the tensor): {worst}')


def test_resume_fsdp_in_one_process(runs):
    "A checkpoint written under FSDP loads in one process and finishes as the uninterrupted FSDP run did."
    back = rank_info(runs['back'])
    assert [(r['rank'], r['world'], r['resumed_from']) for r in back] == [(0, 1, 'checkpoint-2')]
    assert back[0]['rows']['resume'] == (STEPS - 2) * 2 * BATCH
    assert any('the same micro-batches in the same order' in w for w in back[0]['warnings']), back[0]['warnings']
    worst = assert_same_history(history(runs['fsdp_cut']), history(runs['fsdp'] / 'stage1'), STEPS)
    final = assert_same_checkpoint(runs['fsdp_cut'] / f'checkpoint-{STEPS}', runs['fsdp'] / 'stage1' / f'checkpoint-{STEPS}')
    print(f'FSDP checkpoint resumed in 1 process: history within {worst}; final checkpoint within {final:.2g}')


def test_resume_one_process_under_fsdp(runs):
    "A checkpoint written by one process loads under FSDP (each process its shard) and finishes as the uninterrupted run."
    fsdp = rank_info(runs['fsdp'])
    assert [r['resumed_from'] for r in fsdp] == ['checkpoint-2'] * 2
    assert any('no RNG state for process 1' in w for w in fsdp[1]['warnings'])  # the saved run had one process
    worst = assert_same_history(history(runs['one_cut']), history(runs['one'] / 'stage1'), STEPS)
    final = assert_same_checkpoint(runs['one_cut'] / f'checkpoint-{STEPS}', runs['one'] / 'stage1' / f'checkpoint-{STEPS}')
    print(f'1-process checkpoint resumed under FSDP: history within {worst}; final checkpoint within {final:.2g}')


def test_model_whole_after_train(runs):
    """After `train` the processes hold the ordinary, whole model (the caller's object), and the item-feature extraction,
    sharded over the 2 processes, with either adapter active, equals the one-process features."""
    fsdp, one = rank_info(runs['fsdp']), rank_info(runs['one'])
    for r in fsdp:
        assert r['after'] == dict(same_object=True, cls='PeftModel', dtensor=0, fsdp_modules=0, devices=['cpu']), r['after']
    shards = [r['rows']['extract'] for r in fsdp]  # 2 adapters x N_FEATURES items, split over the processes
    assert one[0]['rows']['extract'] == sum(shards) == 2 * N_FEATURES and min(shards) > 0.3 * 2 * N_FEATURES, shards
    f1 = load_file(runs['one'] / 'features-0.safetensors')
    for rank in (0, 1):
        f2 = load_file(runs['fsdp'] / f'features-{rank}.safetensors')
        assert f2.keys() == f1.keys() == {'knowledge', 'transfer'}
        for name in f1: assert f2[name].shape == (N_FEATURES, 128) and torch.equal(f1[name], f2[name]), (rank, name)
    assert not torch.allclose(f1['knowledge'], f1['transfer'])  # the trained adapter changes the features


def test_train_again_after_fsdp(runs):
    """A second `train` of the same model object (sharded again, then whole again), now with 2 micro-batches per
    process and step accumulated without gradient sync, equals the one-process run with 4, within ACCUM_TOL."""
    worst = assert_same_history(history(runs['fsdp'] / 'again'), history(runs['one'] / 'again'), AGAIN_STEPS)
    final = assert_same_checkpoint(runs['fsdp'] / 'again' / f'checkpoint-{AGAIN_STEPS}',
                                   runs['one'] / 'again' / f'checkpoint-{AGAIN_STEPS}', ACCUM_TOL)
    first = load_file(runs['one'] / 'stage1' / f'checkpoint-{STEPS}' / 'weights.safetensors')
    later = load_file(runs['fsdp'] / 'again' / f'checkpoint-{AGAIN_STEPS}' / 'weights.safetensors')
    assert not all(torch.equal(first[n], later[n]) for n in first)  # it trained on from Stage 1's weights
    fsdp = rank_info(runs['fsdp'])
    assert [r['rows']['again'] for r in fsdp] == [AGAIN_STEPS * 2 * BATCH] * 2
    print(f'second train: history within {worst}; checkpoint within {final:.2g} of the tensors\' largest values')


def test_fresh_start_takes_process_0s_weights(runs, tmp_path):
    """A fresh FSDP run whose processes draw different LoRA weights (the job draws one more random number per rank
    before `add_adapters`) and whose config does not load the base model in process 0 only
    (`--fsdp_cpu_ram_efficient_loading false`: then accelerate leaves the weights as each process made them): `train`
    starts every process from process 0's weights, as DDP does, so the run equals the fresh 1-process run."""
    run_job(tmp_path, '--accum', 1, '--stages', 'stage1', processes=2,
            launch=('--fsdp_cpu_ram_efficient_loading', 'false', '--fsdp_sync_module_states', 'false'))
    info = rank_info(tmp_path)
    assert [r['fsdp_plugin']['cpu_ram_efficient_loading'] for r in info] == [False, False]
    assert all(r['in_loss']['stage1']['dtensor'] == LORA_WEIGHTS for r in info)  # trained sharded
    print('fresh FSDP vs fresh 1 process:', assert_same_history(history(runs['one'] / 'stage1'), history(tmp_path / 'stage1'), STEPS))
    assert_same_checkpoint(runs['one'] / 'stage1' / f'checkpoint-{STEPS}', tmp_path / 'stage1' / f'checkpoint-{STEPS}')


ACC_JOB = ROOT / 'tests' / '_accelerate_job.py'
FULL_TOL, ALIGN_TOL = 1e-5, 2e-2


def test_every_stage_fully_fine_tuned_under_fsdp(tmp_path):
    """Stage 1, the h^K extraction, Stage 2a and Stage 2b of `tests/_accelerate_job.py` with the tiny model fully
    fine-tuned (every weight sharded, as for a model too big for one GPU), fresh, under the shipped FSDP config on 2
    processes, against one process with 2 micro-batches. Fully sharded gradients are reduce-scattered, not summed in
    the one-process order, so the runs agree to float rounding (FULL_TOL) rather than bit for bit; Stage 2b's CLUB q,
    refitted at every step on codes that carry that rounding, spreads it to ALIGN_TOL. q is left whole by FSDP and
    fitted alike in both processes; before that, FSDP reset it at every step and Stage 2b's loss at step 2 was 8% off."""
    one, fsdp = tmp_path / 'one', tmp_path / 'fsdp'
    run_launched(ACC_JOB, one, ('--accum', 2), env=dict(OMP_NUM_THREADS='1'))
    run_launched(ACC_JOB, fsdp, ('--accum', 1), 2, CONFIG, flags=('--fsdp',), env=dict(OMP_NUM_THREADS='1'))
    info = rank_info(fsdp)
    assert [(r['rank'], r['world']) for r in info] == [(0, 2), (1, 2)]
    for r in info: assert r['sharded'] == dict(stage1=True, stage2=True, stage2b=True), r['sharded']
    assert rank_info(one)[0]['sharded'] == dict(stage1=False, stage2=False, stage2b=False)
    worst = {stage: assert_same_history(history(fsdp / stage), history(one / stage), steps, tol)
             for stage, steps, tol in (('stage1', 4, FULL_TOL), ('stage2', 3, FULL_TOL), ('stage2b', 3, ALIGN_TOL))}
    a, b = (load_file(d / 'cache' / 'h_K.safetensors')['features'] for d in (one, fsdp))
    torch.testing.assert_close(b, a, rtol=FULL_TOL, atol=FULL_TOL * a.abs().max().item())
    assert info[0]['stage2b']['q'] == info[1]['stage2b']['q']  # the same q in both processes
    for k in ('mmd', 'infonce', 'club'):
        assert math.isclose(info[0]['stage2b']['after'][k], rank_info(one)[0]['stage2b']['after'][k], rel_tol=ALIGN_TOL, abs_tol=5e-3), k
    print('full fine-tuning under FSDP vs 1 process:', worst, f'h_K {((a - b).abs().max() / a.abs().max()).item():.2g}')
