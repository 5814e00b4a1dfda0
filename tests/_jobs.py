"Subprocess jobs of the fault tests: start a script from tests/ with its output in a log, wait for it, show its end."
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
