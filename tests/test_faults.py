"""Faults: a training run SIGKILLed at random points resumes to the uninterrupted result; a feature-cache write killed
at random moments leaves the old cache or the new one (or none, recomputed), never a torn or mislabelled one; an
output folder that cannot be written, or a full disk, stops `tpad run` with a clear message before any work.

The kill points are drawn from `random.Random(TPAD_FAULT_SEED)` (default 0): set the environment variable to try
other points, e.g. `TPAD_FAULT_SEED=7 pytest tests/test_faults.py`. The training runs are `tests/_train_job.py`
processes (tiny MLLM, toyshop, CPU, 12 steps, a checkpoint every 2, attention dropout on), as in test_resume.py; the
cache writers are `tests/_cache_job.py` processes. Jobs run side by side where they can.
"""
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from tpad import experiment, stage1

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tests'))
import _cache_job  # noqa: E402  (features/key/item_ids of the cache writer, to check what it wrote)
from _jobs import TIMEOUT, finish, start, tail  # noqa: E402

SEED = int(os.environ.get('TPAD_FAULT_SEED', '0'))
TOTAL = 12        # optimiser steps of _train_job.py; a checkpoint every 2
SLEEP = 0.3       # seconds the killed jobs sleep before each training step, so a kill lands before the run ends
N_TRAIN_KILLS = 3
N_CACHE_KILLS = 4
ROWS, DIM = 200_000, 64  # a 51 MB cache (+ a 3 MB sidecar): ~0.3 s per write here
PAUSE = 0.3      # seconds a cache writer waits between writes

def history_rows(path) -> list:
    "The complete lines of a history.jsonl (a kill may leave half a line at the end)."
    if not Path(path).exists(): return []
    return [json.loads(l) for l in Path(path).read_text().split('\n')[:-1] if l.strip()]


def complete_checkpoints(out_dir) -> list:
    return sorted(int(p.name.split('-')[1]) for p in Path(out_dir).glob('checkpoint-*') if (p / 'trainer_state.json').is_file())


def kill_when(procs: dict, ready, delays: dict, on_kill) -> dict:
    """SIGKILL each of `procs` ({name: Popen}) `delays[name]` seconds after `ready(name)` first returns true, then call
    `on_kill(name)`; return the exit codes. A job that ends before its kill fails the test."""
    seen, done, deadline = {}, {}, time.time() + TIMEOUT
    while len(done) < len(procs):
        for name, proc in procs.items():
            if name in done: continue
            if proc.poll() is not None: pytest.fail(f'job {name} ended before it was killed:\n{tail(proc)}')
            if name not in seen and ready(name): seen[name] = time.time()
            if name in seen and time.time() >= seen[name] + delays[name]:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=TIMEOUT)
                done[name] = proc.returncode
                on_kill(name)
        if time.time() > deadline:
            for proc in procs.values(): proc.kill()
            pytest.fail('the jobs did not reach their kill points in time')
        time.sleep(0.01)
    return done


# --- SIGKILL during training -------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def train_kills(tmp_path_factory, request):
    """A: uninterrupted. K0..K2: killed at seeded random points (after k logged steps plus a random fraction of a
    step, so sometimes inside a checkpoint save), then resumed. All four first runs go side by side."""
    failed = request.session.testsfailed
    rng = random.Random(SEED)
    points = sorted(rng.sample(range(1, TOTAL - 1), N_TRAIN_KILLS))  # kill once this many steps are logged (1..10)
    delays = {f'K{i}': rng.uniform(0, 0.2) for i in range(N_TRAIN_KILLS)}  # < SLEEP: before the next step ends
    root = tmp_path_factory.mktemp('faults-train')
    a = start('_train_job.py', root / 'A', log=root / 'A.log')
    dirs = {f'K{i}': root / f'K{i}' for i in range(N_TRAIN_KILLS)}
    procs = {n: start('_train_job.py', d, '--sleep', SLEEP, log=f'{d}.log') for n, d in dirs.items()}
    after, killed, resumed = dict(zip(dirs, points)), {}, {}

    def resume(n):  # note what the kill left, then resume at once (the other jobs may still be running)
        d = dirs[n]
        killed[n] = dict(point=after[n], delay=delays[n], checkpoints=complete_checkpoints(d),
                         final=(d / 'final.safetensors').exists(), rows=len(history_rows(d / 'history.jsonl')))
        resumed[n] = start('_train_job.py', d, '--resume', log=f'{d}.log')

    codes = kill_when(procs, lambda n: len(history_rows(dirs[n] / 'history.jsonl')) >= after[n], delays, resume)
    for n, code in codes.items(): killed[n]['returncode'] = code
    finish(a)
    for proc in resumed.values(): finish(proc)
    print('kill points (steps logged, extra delay s, checkpoints on disk):',
          {n: (k['point'], round(k['delay'], 3), k['checkpoints']) for n, k in killed.items()})
    yield dict(a=root / 'A', dirs=dirs, killed=killed)
    if request.session.testsfailed == failed: shutil.rmtree(root)  # ~220 MB of checkpoints; kept when a test failed


KILLS = [f'K{i}' for i in range(N_TRAIN_KILLS)]


@pytest.mark.parametrize('name', KILLS)
def test_training_was_killed_mid_run(train_kills, name):
    k = train_kills['killed'][name]
    assert k['returncode'] == -signal.SIGKILL and not k['final']
    assert k['point'] <= k['rows'] < TOTAL  # killed after its kill point, before the last step
    assert k['checkpoints'] == list(range(2, max(k['checkpoints'], default=0) + 1, 2))


@pytest.mark.parametrize('name', KILLS)
def test_killed_training_resumes_to_the_uninterrupted_result(train_kills, name):
    a, b, k = train_kills['a'], train_kills['dirs'][name], train_kills['killed'][name]
    fa, fb = (json.loads((d / 'final.json').read_text()) for d in (a, b))
    newest = max(k['checkpoints'], default=None)
    assert fb['resumed_from'] == (None if newest is None else f'checkpoint-{newest}')  # None: killed before the first
    assert fa['step'] == fb['step'] == TOTAL
    wa, wb = load_file(a / 'final.safetensors'), load_file(b / 'final.safetensors')
    assert len(wa) > 0 and wa.keys() == wb.keys()
    different = [n for n in wa if not torch.equal(wa[n], wb[n])]
    assert not different, f'{len(different)} of {len(wa)} final weights differ after the kill at {k}: {different[:3]}'
    assert fb['history'] == fa['history']  # every logged loss, lr and gradient norm, bit for bit
    assert history_rows(b / 'history.jsonl') == history_rows(a / 'history.jsonl')  # no row lost or repeated
    assert complete_checkpoints(b) == complete_checkpoints(a) == list(range(2, TOTAL + 1, 2))
    for step in complete_checkpoints(a):
        ca, cb = (load_file(d / f'checkpoint-{step}' / 'weights.safetensors') for d in (a, b))
        assert all(torch.equal(ca[n], cb[n]) for n in ca), f'checkpoint-{step} differs'
    assert not list(b.glob('.tmp-*')) and not list(b.glob('.old-*'))  # no half-written folder left behind


# --- SIGKILL during a feature-cache write --------------------------------------------------------------------------

def log_events(path) -> list:
    "(kind, version, time) of every complete line of a cache writer's log."
    p = Path(f'{path}.log')
    lines = p.read_text().split('\n')[:-1] if p.exists() else []
    return [(k, int(v), float(t)) for k, v, t in (l.split() for l in lines)]


def cache_state(path) -> dict:
    "What a cache folder holds after a kill, checked against every version the writer could have written."
    path = Path(path)
    events = log_events(path)
    done = max((v for k, v, _ in events if k == 'done'), default=None)
    started = max(v for k, v, _ in events if k == 'start')
    candidates = sorted({done, started} - {None})  # the last complete write and the one in flight (if any)
    expected = {v: _cache_job.features(ROWS, DIM, v) for v in candidates}
    sidecar = path.with_suffix('.json')
    on_disk = load_file(str(path))['features']  # the tensor file itself always loads: replaced whole, never torn
    tensor_version = next((v for v in candidates if torch.equal(on_disk, expected[v])), None)
    sealed = json.loads(sidecar.read_text())['key']['version'] if sidecar.exists() else None
    loaded = {v: stage1.load_features(path, _cache_job.key(ROWS, DIM, v)) for v in candidates}
    return dict(done=done, started=started, candidates=candidates, tensor_version=tensor_version, sealed=sealed,
                loaded={v: None if t is None else tuple(t.shape) for v, t in loaded.items()},
                correct={v: t is None or torch.equal(t, expected[v]) for v, t in loaded.items()},
                temp_files=sorted(p.name for p in path.parent.iterdir()
                                  if p.name not in (path.name, sidecar.name, f'{path.name}.log')))


@pytest.fixture(scope='module')
def cache_kills(tmp_path_factory):
    """N_CACHE_KILLS cache writers side by side (forked by one `_cache_job.py`), each SIGKILLed at a seeded random
    moment: once it has started version m in {2, 3, 4}, after a random fraction of (its mean write time + PAUSE): in
    the write (unsealed: the tensor, then the sidecar) or in the pause after it (sealed)."""
    rng = random.Random(SEED + 1)
    root = tmp_path_factory.mktemp('faults-cache')
    paths = {i: _cache_job.cache_path(root, i) for i in range(N_CACHE_KILLS)}
    plan = {i: (rng.choice([2, 3, 4]), rng.uniform(0, 1)) for i in paths}
    job = start('_cache_job.py', root, ROWS, DIM, '--copies', N_CACHE_KILLS, '--pause', PAUSE, '--max-seconds', 120, log=root / 'job.log')
    pids, killed_at, write_time, deadline = {}, {}, {}, time.time() + TIMEOUT
    while len(killed_at) < len(paths):
        if job.poll() is not None: pytest.fail(f'the cache writers ended before they were killed:\n{tail(job)}')
        if time.time() > deadline: job.kill(); pytest.fail('the cache writers did not reach their kill points in time')
        for i, path in paths.items():
            if i in killed_at: continue
            events = log_events(path)
            if i not in pids and Path(f'{path}.log').exists():
                first = Path(f'{path}.log').read_text().split('\n')[0].split()
                if len(first) == 3: pids[i] = int(first[1])
            starts = {v: t for k, v, t in events if k == 'start'}
            if plan[i][0] not in starts: continue
            spans = [t - starts[v] for k, v, t in events if k == 'done']
            write_time[i] = sum(spans) / len(spans)
            if time.time() >= starts[plan[i][0]] + plan[i][1] * (write_time[i] + PAUSE):
                os.kill(pids[i], signal.SIGKILL)
                killed_at[i] = time.time()
        time.sleep(0.005)
    finish(job)
    ended = job.log.read_text()
    states = {i: dict(cache_state(p), write_time=write_time[i], plan=plan[i],
                      signalled=f'writer C{i} (pid {pids[i]}): signal {signal.SIGKILL.value}' in ended)
              for i, p in paths.items()}
    print('cache kills (versions possible, tensor on disk, sealed, temp files left):',
          {i: (s['candidates'], s['tensor_version'], s['sealed'], len(s['temp_files'])) for i, s in states.items()})
    yield dict(paths=paths, states=states)
    shutil.rmtree(root)


CACHES = list(range(N_CACHE_KILLS))


@pytest.mark.parametrize('name', CACHES)
def test_killed_cache_write_leaves_old_or_new_never_torn(cache_kills, name):
    s = cache_kills['states'][name]
    assert s['signalled'] and s['done'] is not None and s['done'] >= 1
    assert s['tensor_version'] is not None, f"the tensor file on disk is neither version of {s['candidates']}: {s}"
    assert all(s['correct'].values()), f'a key loaded features that are not its own: {s}'
    if s['sealed'] is None:  # killed between unsealing and sealing: a cache miss, the features are recomputed
        assert all(shape is None for shape in s['loaded'].values()), s
    else:  # sealed: exactly the sealed version loads, whole, and it is the one whose tensor is on disk
        assert s['sealed'] in s['candidates'] and s['sealed'] == s['tensor_version'], s
        assert s['loaded'][s['sealed']] == (ROWS, DIM), s
        assert all(shape is None for v, shape in s['loaded'].items() if v != s['sealed']), s


@pytest.mark.parametrize('name', CACHES)
def test_cache_rewrite_after_kill(cache_kills, name):
    """The next run writes over whatever the kill left: the new cache is sealed and loads, and the temporary files
    of the killed writer are gone (`tpad.artifacts.atomic_write` removes those of processes that no longer run)."""
    path = cache_kills['paths'][name]
    sidecar = path.with_suffix('.json')
    v = cache_kills['states'][name]['started'] + 1
    stage1.save_features(path, _cache_job.features(ROWS, DIM, v), _cache_job.key(ROWS, DIM, v), _cache_job.item_ids(ROWS))
    assert torch.equal(stage1.load_features(path, _cache_job.key(ROWS, DIM, v)), _cache_job.features(ROWS, DIM, v))
    assert json.loads(path.with_suffix('.json').read_text())['item_ids'][-1] == f'item-{ROWS - 1}'
    assert not [p.name for p in path.parent.iterdir() if p.name.startswith((f'.{path.name}.tmp', f'.{sidecar.name}.tmp'))]


class Crash(Exception): "The simulated death of the writing process."


def enospc() -> SafetensorError:
    "What safetensors raises when the disk fills up during save_file (0.8: no file name, not an OSError)."
    return SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')


def partial_then(exc):
    "A stand-in for safetensors' save_file that writes the first half of the real file, then raises `exc`."
    real = safetensors.torch.save_file
    def write(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[:len(data) // 2])
        raise exc
    return write


CRASH_POINTS = ('tensor-write', 'tensor-rename', 'sidecar-write', 'sidecar-rename')


@pytest.mark.parametrize('where', CRASH_POINTS)
def test_cache_write_interrupted_at_each_step(tmp_path, monkeypatch, where):
    """Each step of `save_features` interrupted in turn (a crash, or a full disk while writing the tensor): the old
    cache or no cache loads (a miss: recomputed), never the half-written one and never features under a wrong key."""
    path = tmp_path / 'h_K.safetensors'
    old, new = torch.arange(12.).reshape(4, 3), torch.arange(12.).reshape(4, 3) + 100
    stage1.save_features(path, old, dict(v='old'), list('abcd'))
    renames, real_replace, real_write_text = [], os.replace, Path.write_text
    if where == 'tensor-write':
        monkeypatch.setattr(safetensors.torch, 'save_file', partial_then(enospc()))  # tpad.artifacts writes with it
    if where in ('tensor-rename', 'sidecar-rename'):
        def replace(src, dst):
            renames.append(dst)
            if len(renames) == (1 if where == 'tensor-rename' else 2): raise Crash(where)
            return real_replace(src, dst)
        monkeypatch.setattr(os, 'replace', replace)
    if where == 'sidecar-write':
        def write_text(self, data, *a, **k):
            real_write_text(self, data[:len(data) // 2], *a, **k)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(Path, 'write_text', write_text)
    with pytest.raises((Crash, OSError, SafetensorError)):
        stage1.save_features(path, new, dict(v='new'), list('abcd'))
    monkeypatch.undo()
    got_old, got_new = stage1.load_features(path, dict(v='old')), stage1.load_features(path, dict(v='new'))
    assert got_old is None or torch.equal(got_old, old)
    assert got_new is None or torch.equal(got_new, new)
    assert got_old is None and got_new is None  # every step above runs after the old seal was removed: a miss
    on_disk = load_file(str(path))['features']  # the file at the cache's name is whole: the old or the new one
    assert torch.equal(on_disk, new if where.startswith('sidecar') else old)
    stage1.save_features(path, new, dict(v='new'), list('abcd'))  # the rerun
    assert torch.equal(stage1.load_features(path, dict(v='new')), new)


# --- an output folder that cannot be written; a full disk ---------------------------------------------------------

def tpad_run(*args, cwd=ROOT):
    "`tpad run ARGS` with the checkout's tpad (the console script's entry point, run from the repo root)."
    return subprocess.run([sys.executable, '-c', 'from tpad.cli import main; main()', 'run', *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)


def is_writable(folder) -> bool:
    "Whether this process can create a file in `folder` (root can, whatever its mode says)."
    probe = Path(folder) / '.probe'
    try: probe.write_text('x')
    except OSError: return False
    probe.unlink()
    return True


@pytest.fixture(params=['under-a-file', 'read-only-folder'])
def unwritable_out(request, tmp_path):
    "An output folder `tpad run` cannot write: one below a regular file (fails for root too), or in a mode 0o500 folder."
    if request.param == 'under-a-file':
        (tmp_path / 'a-file').write_text('not a folder')
        yield tmp_path / 'a-file' / 'run'
        return
    locked = tmp_path / 'locked'
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if is_writable(locked): pytest.skip('running as root: mode 0o500 does not stop root from writing')
        yield locked / 'run'
    finally: locked.chmod(0o700)


def test_unwritable_out_dir_fails_before_any_work(unwritable_out):
    r = tpad_run('--preset', 'toyshop-smoke', '--models', 'pop', '--figures', 'none', '--out', unwritable_out)
    assert r.returncode != 0
    assert 'Traceback' not in r.stderr, r.stderr[-2000:]  # one clear line, not a stack
    assert r.stderr.startswith('tpad run:') and str(unwritable_out) in r.stderr, r.stderr
    assert '[data]' not in r.stdout and '[preprocess]' not in r.stdout  # nothing was loaded or trained


def test_full_disk_is_refused_before_any_work(tmp_path, monkeypatch):
    "A disk with (almost) no space left: `run` stops before loading data, naming the folder and the free space."
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, 'disk_usage', lambda p: usage._replace(free=4096))
    def log(*a, **k): raise AssertionError(f'work started: {a}')
    config = experiment.make_config('toyshop-smoke', models='pop', figures='none', out=str(tmp_path / 'run'))
    with pytest.raises(OSError) as e: experiment.run(config, log=log)
    assert e.value.errno == errno.ENOSPC and str(tmp_path / 'run') in str(e.value)
    with pytest.raises(OSError): experiment.check_out_dir(tmp_path / 'run')  # the check `run` calls, on its own
    monkeypatch.undo()
    assert experiment.check_out_dir(tmp_path / 'run2') == tmp_path / 'run2' and (tmp_path / 'run2').is_dir()


def test_disk_full_while_saving_a_stage_leaves_it_unsealed(tmp_path, monkeypatch):
    "A stage whose tensors cannot be written (disk full half-way) is not sealed: the next run recomputes it."
    folder = tmp_path / 'stages' / 'stage1'
    experiment.save_stage(folder, 'key-1', dict(features=torch.ones(3, 2)), seconds=1.0)
    monkeypatch.setattr(safetensors.torch, 'save_file', partial_then(enospc()))  # tpad.artifacts writes with it
    with pytest.raises((OSError, SafetensorError)) as e:
        experiment.save_stage(folder, 'key-2', dict(features=torch.zeros(3, 2)), seconds=2.0)
    assert 'No space left on device' in str(e.value)
    monkeypatch.undo()
    assert experiment.load_stage(folder, 'key-1') is None and experiment.load_stage(folder, 'key-2') is None
    assert not (folder / 'stage.json').exists()
    assert torch.equal(load_file(folder / 'outputs.safetensors')['features'], torch.ones(3, 2))  # whole, not torn


@pytest.mark.parametrize('writer', [
    'save_stage',
    'save_features'])
def test_disk_full_message_names_the_file(tmp_path, monkeypatch, writer):
    "safetensors says only 'No space left on device (os error 28)': the error should say which file, and clean up."
    monkeypatch.setattr(safetensors.torch, 'save_file', partial_then(enospc()))  # both write through tpad.artifacts
    with pytest.raises(OSError) as e:
        if writer == 'save_stage': experiment.save_stage(tmp_path / 's', 'k', dict(x=torch.ones(2)))
        else: stage1.save_features(tmp_path / 's' / 'h_K.safetensors', torch.ones(2, 2), dict(k=1), ['a', 'b'])
    target = tmp_path / 's' / ('outputs.safetensors' if writer == 'save_stage' else 'h_K.safetensors')
    assert str(target) in str(e.value) and 'No space left on device' in str(e.value)
    assert not [p.name for p in target.parent.iterdir() if '.tmp' in p.name]  # no half-written temp file left
