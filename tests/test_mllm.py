"`tpad.mllm` behaviour that needs fresh processes: offline mode set before import, and two builders racing for one cache folder."
import os
import subprocess
import sys
from pathlib import Path


def run_python(code: str, **env):
    "Run `code` in a fresh Python with extra environment variables; return the finished process."
    return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_unknown_model_offline_fails_fast_with_advice(tmp_path):
    code = ("import time\nfrom tpad.mllm import MLLMConfig, MLLMLoadError, load_mllm\nt = time.perf_counter()\n"
            "try: load_mllm(MLLMConfig(model='no-such-org/no-such-mllm'))\n"
            "except MLLMLoadError as e: print(f'{time.perf_counter() - t:.2f}'); print(e)\n")
    r = run_python(code, HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'hf'))  # set before huggingface_hub is imported
    assert r.returncode == 0, r.stderr
    seconds, message = r.stdout.split('\n', 1)
    assert float(seconds) < 5
    assert 'offline' in message and 'HF_HUB_OFFLINE=1' in message and "model='/path/to/folder'" in message


def test_two_processes_build_one_tiny_model(tmp_path):
    code = ("from tpad.mllm import TinyMLLMConfig, tiny_mllm_path\n"
            "print(tiny_mllm_path(TinyMLLMConfig(family='qwen2_vl', seed=3), ['a lens', 'a camera'] * 10))\n")
    env = {**os.environ, 'TPAD_CACHE': str(tmp_path / 'cache')}
    procs = [subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    folders = {out.strip() for out, _ in outs}
    assert len(folders) == 1
    folder = Path(folders.pop())
    assert (folder / 'model.safetensors').exists() and (folder / 'tpad_tiny.json').exists()
    assert [p.name for p in (tmp_path / 'cache').iterdir()] == [folder.name]  # no temporary folder left behind
    r = run_python("import sys\nfrom tpad.mllm import MLLMConfig, load_mllm\n"
                   f"m, p = load_mllm(MLLMConfig(model={str(folder)!r}, local_files_only=True))\n"
                   "print(type(m).__name__, type(p).__name__)\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ['Qwen2VLForConditionalGeneration', 'Qwen2VLImageOnlyProcessor'] or \
        r.stdout.split() == ['Qwen2VLForConditionalGeneration', 'Qwen2VLProcessor']
