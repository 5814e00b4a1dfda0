"The GPU benchmarks in bench/ run on a CPU in their tiny mode, and the numbers in their docstrings hold."
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / 'bench'
sys.path.insert(0, str(BENCH))


def run(*args, timeout=300):
    r = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_gpu_extract_tiny_on_cpu(tmp_path):
    import tempfile
    temp = lambda: set(Path(tempfile.gettempdir()).glob('tpad-gpu-extract-tiny-*'))
    before = temp()
    out = run(BENCH / 'gpu_extract.py', '--shapes', 'tiny', '--device', 'cpu', '--items', '24', '--batch', '8',
              '--repeats', '1', '--out', tmp_path)
    [path] = tmp_path.glob('gpu_extract-tiny-*.json')
    r = json.loads(path.read_text())
    assert r['image_tokens_per_item'] == 64  # 224 px -> 16 x 16 patches -> 2 x 2 merged
    assert r['plain']['items_per_s_median'] > 0 and r['kit']['items_per_s_median'] > 0
    assert r['padded_share']['kit_estimated'] < r['padded_share']['plain']  # length buckets pad less
    assert '| tiny |' in out
    assert temp() <= before  # the temporary model folder is gone


def test_big_shapes_refuse_a_cpu():
    r = subprocess.run([sys.executable, BENCH / 'gpu_extract.py', '--shapes', '7b', '--device', 'cpu'],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and 'only --shapes tiny runs on a CPU' in r.stderr


def test_parameter_counts_match_the_docstring():
    from gpu_extract import parameter_count
    from stage1_memory import PARAMETERS
    for shape, n in PARAMETERS.items(): assert parameter_count(shape)['total'] == n, shape
    assert parameter_count('2b')['language'] == 1_543_714_304  # Qwen2-1.5B with tied embeddings


def test_memory_formula_matches_saved_tensors():
    out = run(BENCH / 'stage1_memory.py', '--check-formula')
    ratio = float(out.rsplit('ratio ', 1)[1].rstrip(')\n'))
    assert 0.98 < ratio < 1.02, out


def test_memory_rows_on_cpu(tmp_path):
    out = run(BENCH / 'stage1_memory.py', '--device', 'cpu', '--batches', '4', '--out', tmp_path)
    [path] = tmp_path.glob('stage1_memory-cpu-*.json')
    rows = json.loads(path.read_text())['rows']
    assert [(r['batch'], r['checkpointing']) for r in rows] == [(4, False), (4, True)]
    assert all('error' not in r and r['peak_gb'] > 0 and r['seq'] > 64 for r in rows), rows
    assert '| tiny | 4 | on |' in out


def test_gpu_stage2_tiny_on_cpu(tmp_path):
    out = run(BENCH / 'gpu_stage2.py', '--shapes', 'tiny', '--device', 'cpu', '--batches', '2', '--steps', '1',
              '--warmup', '1', '--items', '40', '--out', tmp_path)
    r = json.loads((tmp_path / 'gpu_stage2-tiny-cpu.json').read_text())
    rows = {(x['loop'], x['variant']): x for x in r['rows']}
    assert set(rows) == {(l, v) for l in ('plain', 'kit') for v in ('gen', 'full')}
    assert all(x['sessions_per_s'] > 0 and len(x['losses']) == 3 for x in rows.values()), rows
    assert r['loops']['kit']['trainable'] == r['loops']['plain']['trainable']  # the same LoRA on both sides
    assert r['loops']['kit']['session_tokens']['mean'] > 5 * 64  # five images of 64 tokens each, plus titles
    assert '| tiny | 2 | full |' in out
