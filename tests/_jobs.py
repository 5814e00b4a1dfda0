"Subprocess jobs of the tests (faults, accelerate, FSDP): start or launch a script from tests/, wait for it, read and compare what it wrote."
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300


def start(script, *args, log):
    "Start `python tests/<script> *args` from the repo root, its output going to `log` (a pipe could fill up)."
    with open(log, 'a') as f:
        proc = subprocess.Popen([sys.executable, str(ROOT / 'tests' / script), *map(str, args)], cwd=ROOT,
                                stdout=f, stderr=subprocess.STDOUT)
    proc.log = Path(log)
    return proc


def tail(proc) -> str: return proc.log.read_text()[-3000:]


def finish(proc):
    "Wait for `proc`; fail with the end of its output if it did not exit cleanly."
    proc.wait(timeout=TIMEOUT)
    assert proc.returncode == 0, f'job exited with {proc.returncode}:\n{tail(proc)}'


def free_port() -> int:
    "A TCP port nobody listens on now (for `accelerate launch --main_process_port`)."
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_launched(job: Path, out_dir, args, processes: int = 1, config: Path | None = None, launch=(), flags=(),
                 env=None) -> float:
    """Run `python job out_dir *args` in one plain process, or under `accelerate launch --config_file config` on
    `processes` CPU processes (gloo, fp32; `launch`: more launcher options, `flags`: the job's options under the
    launcher only); fail with its output, which goes to out_dir/job.log; the seconds it took."""
    import os, time
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM='false', **(env or {}))
    if processes == 1: cmd = [sys.executable, str(job), str(out_dir), *map(str, args)]
    else:
        env['ACCELERATE_USE_CPU'] = '1'
        cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--config_file', str(config),
               '--num_processes', str(processes), '--num_machines', '1', '--mixed_precision', 'no',
               '--main_process_port', str(free_port()), *launch, str(job), str(out_dir), *map(str, args), *flags]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    (out_dir / 'job.log').write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, f'job exited with {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}'
    return time.time() - t0


def cut_back(run_dir, to, last_step: int) -> Path:
    "A copy of the training run folder `run_dir` as if stopped before its last checkpoint: checkpoint-<last_step> removed."
    import shutil
    shutil.copytree(run_dir, to)
    shutil.rmtree(Path(to) / f'checkpoint-{last_step}')
    return Path(to)


def rank_info(out_dir) -> list[dict]:
    "The `rank-<index>.json` that each process of a job wrote, in process order."
    return [json.loads(p.read_text()) for p in sorted(Path(out_dir).glob('rank-*.json'))]


def history(run_dir) -> list[dict]:
    "The rows of a training run's `history.jsonl`."
    return [json.loads(line) for line in (Path(run_dir) / 'history.jsonl').read_text().splitlines() if line.strip()]


def assert_same_history(a: list, b: list, steps: int, tol: float = 1e-6) -> str:
    "Rows of steps 1..`steps` with the same logged names, every number within `tol` (relative); the largest difference per name."
    assert [r['step'] for r in a] == [r['step'] for r in b] == list(range(1, steps + 1))
    worst = {}
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys(), (ra.keys(), rb.keys())
        for k in ra:
            assert math.isclose(ra[k], rb[k], rel_tol=tol, abs_tol=1e-12), f"step {ra['step']} {k}: {ra[k]} vs {rb[k]}"
            worst[k] = max(worst.get(k, 0.0), abs(ra[k] - rb[k]) / max(abs(ra[k]), 1e-12))
    return ', '.join(f'{k} {v:.2g}' for k, v in worst.items() if k not in ('step', 'epoch'))
