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


def test_gpu_check_tiny_on_cpu(tmp_path):
    import tempfile
    temp = lambda: set(Path(tempfile.gettempdir()).glob('tpad-gpu-check-*'))
    before = temp()
    out = run(BENCH / 'gpu_check.py', '--shapes', 'tiny', '--device', 'cpu', '--out', tmp_path)
    [path] = tmp_path.glob('gpu_check-cpu-*.json')
    r = json.loads(path.read_text())
    assert r['ok'] and r['failures'] == [] and list(r['models']) == ['qwen2vl-tiny', 'llava-tiny']
    for key, m in r['models'].items():
        assert m['status'] == 'ok' and set(m['phases']) == {'stage1', 'stage2', 'extract'}, (key, m['status'], m['tail'])
        assert m['built']['lora_trainable'] > 0 and m['built']['parameters'] > 1e6
        s1, s2, ex = (m['phases'][p] for p in ('stage1', 'stage2', 'extract'))
        assert (s1['steps'], len(s1['losses']), s2['steps'], len(s2['losses'])) == (30, 30, 10, 10)
        for s in (s1, s2):  # the toy batch repeated: the loss falls
            assert s['loss_decreased'] and s['loss_last'] < s['loss_first'] - 0.1, (key, s['losses'])
            assert s['samples_per_s'] > 0 and s['tokens_per_s'] > 0 and s['step_s_median'] > 0
        assert s2['nce_last'] is not None and s2['session_tokens_per_row'] > 4 * s2['item_tokens_per_row']  # 5 images
        assert ex['items'] == 32 and ex['items_per_s'] > 0 and ex['features_finite'] and ex['feature_dim'] == 128
    assert (tmp_path / path.name.replace('.json', '.md')).exists()
    assert '| llava-tiny | stage2 | 4 | 10 |' in out and 'all checks passed' in out
    assert temp() <= before  # the temporary image folders are gone


def test_gpu_check_big_shapes_refuse_a_cpu():
    for shapes in (['gpu'], ['llava-7b'], ['tiny', 'qwen2vl-2b']):
        r = subprocess.run([sys.executable, BENCH / 'gpu_check.py', *[a for s in shapes for a in ('--shapes', s)],
                            '--device', 'cpu'], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and 'only --shapes tiny runs on a CPU' in r.stderr, (shapes, r.stderr)


def test_gpu_check_time_limit_keeps_going(tmp_path):
    "A model that runs out of its share of the budget is reported as such; the run still writes its JSON and fails."
    r = subprocess.run([sys.executable, BENCH / 'gpu_check.py', '--shapes', 'tiny', '--device', 'cpu', '--budget', '4',
                        '--out', tmp_path], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(next(tmp_path.glob('gpu_check-cpu-*.json')).read_text())
    assert all(m['status'].startswith('time limit') for m in res['models'].values()), res['models']
    assert not res['ok'] and any('missing' in f for f in res['failures'])
    assert res['plan']['scale'] < 1 and res['plan']['models']['llava-tiny']['sizes']['stage1'] == 10  # the floor


def test_gpu_check_plan_fits_eight_minutes():
    from gpu_check import DEFAULT_BUDGET, MODELS, main
    p = main(['--plan'])
    assert p['scale'] == 1.0 and p['fits'] and p['est_total_s'] <= DEFAULT_BUDGET <= 8 * 60
    assert {k: m['sizes'] for k, m in p['models'].items()} == {
        k: dict(stage1=30, stage2=10, extract=MODELS[k]['extract']['items']) for k in ('qwen2vl-2b', 'llava-7b')}
    small = main(['--plan', '--budget', '200'])
    assert 0 < small['scale'] < 1 and small['est_total_s'] <= 200
    for k, m in small['models'].items():
        assert 10 <= m['sizes']['stage1'] < 30 and 4 <= m['sizes']['stage2'] < 10, m['sizes']
        assert m['sizes']['extract'] < MODELS[k]['extract']['items']
    import gpu_check
    rows = {l.split()[0]: l.split() for l in gpu_check.__doc__.splitlines() if l.startswith(('  qwen2vl-2b', '  llava-7b'))}
    for k, m in p['models'].items(): assert int(rows[k][-1]) == round(m['est_s']), (k, m['est_s'])  # the docstring's table
    assert f"both models   {round(p['est_total_s'])}" in gpu_check.__doc__
    kept = main(['--plan', '--budget', '200', '--stage2-steps', '10'])  # a step count given is kept
    assert all(m['sizes']['stage2'] == 10 for m in kept['models'].values())


def test_gpu_check_shapes():
    "Weights of every model (meta device) and LLaVA-1.5-7B against transformers' LlavaConfig defaults and 576 image tokens."
    from PIL import Image
    from transformers import LlavaConfig
    from gpu_check import MODELS, llava_config, parameter_count, processor_for
    from tpad.mllm import tiny_tokenizer
    for key, spec in MODELS.items(): assert parameter_count(key) == spec['parameters'], key
    assert MODELS['llava-7b']['parameters'] == 7_063_427_072
    tok = tiny_tokenizer('llava')
    ours, default = llava_config('7b', tok), LlavaConfig()
    vision = ('hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads', 'image_size',
              'patch_size', 'projection_dim', 'hidden_act', 'layer_norm_eps')
    assert all(getattr(ours.vision_config, k) == getattr(default.vision_config, k) for k in vision)
    text = ('hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads', 'num_key_value_heads',
            'hidden_act', 'vocab_size', 'max_position_embeddings', 'rms_norm_eps', 'tie_word_embeddings')
    differ = {k for k in text if getattr(ours.text_config, k) != getattr(default.text_config, k)}
    assert differ == {'vocab_size', 'max_position_embeddings', 'rms_norm_eps'}  # as llava-hf/llava-1.5-7b-hf sets them
    assert (ours.text_config.vocab_size, ours.text_config.max_position_embeddings) == (32064, 4096)
    same = ('projector_hidden_act', 'vision_feature_layer', 'vision_feature_select_strategy', 'image_seq_length')
    assert all(getattr(ours, k) == getattr(default, k) for k in same)
    processor = processor_for('llava-7b', tok)
    enc = processor(text=['<image> x'], images=[Image.new('RGB', (336, 336))], return_tensors='pt')
    assert int((enc['input_ids'] == ours.image_token_id).sum()) == 576 and enc['pixel_values'].shape[-1] == 336
