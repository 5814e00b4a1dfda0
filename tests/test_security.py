"""Security: no pickles anywhere (checkpoints, caches and stage outputs are safetensors + JSON; a `torch.load`, if
any, has `weights_only=True`); no hub code runs unless asked (`trust_remote_code` is off by default and passed only
when on); and the paths a run writes to stay inside its output folder, whatever the config says."""
import argparse
import ast
import json
import os
from pathlib import Path

import pytest
from safetensors import safe_open

from tpad import cli, experiment, mllm
from tpad.experiment import PRESETS, RunConfig, make_config

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for p in (ROOT / 'tpad').glob('*.py') if p.name != '_modidx.py')

PICKLING_MODULES = {'pickle', 'cPickle', '_pickle', 'dill', 'cloudpickle', 'joblib', 'shelve', 'marshal'}
PICKLING_CALLS = {'torch.save', 'pd.read_pickle', 'pandas.read_pickle', 'np.save', 'numpy.save'}


def _name(node) -> str:
    "'torch.load' for the expression `torch.load`, '' for anything not a dotted name."
    if isinstance(node, ast.Name): return node.id
    if isinstance(node, ast.Attribute):
        base = _name(node.value)
        return f'{base}.{node.attr}' if base else ''
    return ''


def _true(node) -> bool: return isinstance(node, ast.Constant) and node.value is True


def unsafe_uses(source: str, filename: str = '<source>') -> list[str]:
    "Every place in `source` that could unpickle or run foreign code: 'file:line: what'."
    tree = ast.parse(source, filename)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def guarded(node) -> bool:  # inside `if <something about trust_remote_code>:`
        while node in parents:
            node = parents[node]
            if isinstance(node, ast.If) and 'trust_remote_code' in ast.unparse(node.test): return True
        return False

    found = []
    def bad(node, what): found.append(f'{filename}:{node.lineno}: {what}')
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split('.')[0] in PICKLING_MODULES: bad(node, f'import {a.name}')
        elif isinstance(node, ast.ImportFrom) and (node.module or '').split('.')[0] in PICKLING_MODULES:
            bad(node, f'from {node.module} import ...')
        elif isinstance(node, ast.ImportFrom) and node.module == 'torch' and any(a.name in ('load', 'save') for a in node.names):
            bad(node, 'from torch import load/save (unchecked use)')
        elif isinstance(node, ast.Call):
            name, kw = _name(node.func), {k.arg: k.value for k in node.keywords if k.arg}
            if name == 'torch.load' and not _true(kw.get('weights_only')): bad(node, 'torch.load without weights_only=True')
            if name in PICKLING_CALLS or name.endswith(('.to_pickle', '.read_pickle')): bad(node, f'{name} writes/reads a pickle')
            if _true(kw.get('allow_pickle')): bad(node, f'{name}(allow_pickle=True)')
            if name in ('eval', 'exec'): bad(node, f'{name}()')
            if 'trust_remote_code' in kw and not (_true(kw['trust_remote_code']) and guarded(node)):
                bad(node, f"{name}(trust_remote_code={ast.unparse(kw['trust_remote_code'])}) not under `if ...trust_remote_code`")
        elif isinstance(node, ast.Assign):  # kwargs['trust_remote_code'] = True
            for t in node.targets:
                if isinstance(t, ast.Subscript) and isinstance(t.slice, ast.Constant) and t.slice.value == 'trust_remote_code':
                    if not (_true(node.value) and guarded(node)): bad(node, "['trust_remote_code'] set outside `if ...trust_remote_code`")
        elif isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values):
                if isinstance(k, ast.Constant) and k.value == 'trust_remote_code' and not (_true(v) and guarded(node)):
                    bad(node, "{'trust_remote_code': ...} outside `if ...trust_remote_code`")
        elif isinstance(node, ast.AnnAssign) and _name(node.target) == 'trust_remote_code' and node.value is not None:
            v = node.value
            default = next((k.value for k in v.keywords if k.arg == 'default'), None) if isinstance(v, ast.Call) else v
            if not (isinstance(default, ast.Constant) and default.value is False):
                bad(node, f'a trust_remote_code field whose default is not False: {ast.unparse(v)[:60]}')
    return found


def test_scanner_catches_unsafe_code():
    "The checker below is only as good as this: each line here is unsafe and must be flagged."
    unsafe = ['import pickle', 'from joblib import load', 'from torch import load', 'torch.load(p)', 'torch.load(p, weights_only=False)',
              'torch.save(m, p)', 'np.load(p, allow_pickle=True)', 'df.to_pickle(p)', 'eval(s)',
              'AutoModel.from_pretrained(n, trust_remote_code=True)',
              'AutoModel.from_pretrained(n, trust_remote_code=cfg.trust_remote_code)', "kw['trust_remote_code'] = True",
              'kw = dict(trust_remote_code=True)', "kw = {'trust_remote_code': True}",
              'class C:\n    trust_remote_code: bool = field(default=True)']
    for line in unsafe: assert unsafe_uses(line), f'not flagged: {line!r}'
    safe = ['torch.load(p, map_location="cpu", weights_only=True)', 'np.load(p)', 'ast.literal_eval(s)', 'model.eval()',
            "if config.trust_remote_code: kwargs['trust_remote_code'] = True",
            'class C:\n    trust_remote_code: bool = field(default=False, metadata={"help": "only when True"})']
    for line in safe: assert not unsafe_uses(line), f'flagged: {line!r}: {unsafe_uses(line)}'


def test_no_pickle_no_unsafe_load_no_remote_code_in_the_package():
    assert len(SOURCES) > 10
    found = [hit for p in SOURCES for hit in unsafe_uses(p.read_text(), str(p.relative_to(ROOT)))]
    assert not found, '\n'.join(found)


def test_trust_remote_code_is_off_by_default():
    assert mllm.MLLMConfig().trust_remote_code is False
    assert RunConfig().mllm.trust_remote_code is False
    for preset in PRESETS: assert make_config(preset).mllm.trust_remote_code is False, preset


class _Stop(OSError): "Raised by the fake from_pretrained once it has seen its arguments."


@pytest.mark.parametrize('on', [False, True])
def test_trust_remote_code_reaches_from_pretrained_only_when_on(monkeypatch, on):
    seen = []
    class Fake:
        @staticmethod
        def from_pretrained(source, **kwargs):
            seen.append(kwargs)
            raise _Stop('stop here: no model is loaded')
    monkeypatch.setattr(mllm, 'AutoModelForImageTextToText', Fake)
    with pytest.raises(mllm.MLLMLoadError):
        mllm.load_mllm(mllm.MLLMConfig(model='some-org/some-model', trust_remote_code=on, local_files_only=True))
    assert len(seen) == 1
    assert seen[0].get('trust_remote_code', False) is on
    if not on: assert 'trust_remote_code' not in seen[0]  # not even as False: the library's own default applies


# --- what a run writes, and where ---------------------------------------------------------------------------------

def cli_options() -> set:
    "Every `tpad run` option, without its dashes."
    sub = next(a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction))
    run = sub.choices['run']
    return {opt[2:] for a in run._actions for opt in a.option_strings if opt.startswith('--') and opt != '--help'}


# the string options that name a place on disk: each was checked to be read, never written
READ_ONLY_PATHS = {'path': 'the dataset', 'mllm.model': 'a hub name or a local model folder',
                   'stage1.train.resume': 'a checkpoint to resume from', 'stage2.train.resume': 'ditto',
                   'align.train.resume': 'ditto'}


def test_cli_cannot_set_the_folders_a_run_writes_to():
    options = cli_options()
    assert 'out' in options and 'fit.patience' in options  # the parser was read right
    # folders, caches, per-stage models and seeds are passed by `run` (from --out, --mllm, --seeds), not configured
    stages = [o.split('.') for o in options if o.split('.')[0] in ('stage1', 'stage2', 'align', 'fit')]
    assert not {parts[-1] for parts in stages} & {'out_dir', 'cache_dir', 'progress'}
    assert not [p for p in stages if p[1] == 'mllm'] and 'fit.seed' not in options
    for stage in ('stage1', 'stage2', 'align', 'fit'):
        for name in ('out_dir', 'cache_dir', 'mllm'):
            with pytest.raises(ValueError, match=f"config.{stage} has no field '{name}'"): make_config(**{stage: {name: '/x'}})
    strings = {name for name, f, tp in experiment._flatten(RunConfig) if experiment._base_type(tp) is str}
    assert strings <= options
    words = {'dir', 'path', 'file', 'folder', 'cache', 'resume', 'out', 'model'}  # a string option named like a place
    placey = {o for o in strings if words & set(o.split('.')[-1].split('_'))} - {'cases.model'}  # a display name
    assert placey == {'out'} | set(READ_ONLY_PATHS), f'review what these read or write: {placey ^ ({"out"} | set(READ_ONLY_PATHS))}'


@pytest.mark.parametrize('models', ['../../etc', 'pop,../x', 'pop/..', '/tmp/x'])
def test_model_names_are_not_paths(models):
    with pytest.raises(ValueError, match='unknown model'): experiment.model_keys(make_config(models=models))


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    """A run (Stage 1 for 2 steps, its h^K cache, MSBR on it, Pop), started from another working folder: it must write
    under `out/` only."""
    root = tmp_path_factory.mktemp('security-run')
    out, outside, cwd = root / 'out', root / 'outside', root / 'cwd'
    outside.mkdir(); cwd.mkdir()
    config = make_config('toyshop-smoke', out=str(out), models='msbr_knowledge,pop', figures='none',
                         stage1=dict(train=dict(max_steps=2)), fit=dict(max_train_samples=200))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)  # a relative path would land here
        experiment.run(config, log=lambda *a, **k: None)
    files = sorted(p for p in root.rglob('*') if p.is_file())
    yield dict(root=root, out=out, outside=outside, cwd=cwd, files=files)


def test_run_writes_only_inside_its_out_dir(tiny_run):
    outside = [str(p.relative_to(tiny_run['root'])) for p in tiny_run['files'] if tiny_run['out'] not in p.parents]
    assert not outside, f'written outside the run folder: {outside}'
    assert (tiny_run['out'] / 'stages' / 'stage1' / 'stage.json').is_file()  # the run did write its artifacts
    assert list((tiny_run['out'] / 'models').glob('msbr_knowledge-seed0/model.safetensors'))


ARTIFACTS = {'.safetensors', '.json', '.jsonl'}  # checkpoints, caches, stage outputs, models
REPORTS = {'.csv', '.md', '.png'}                 # tables and figures, at the top and in figures/


def test_run_artifacts_are_safetensors_and_json_only(tiny_run):
    out = tiny_run['out']
    files = [p for p in tiny_run['files'] if out in p.parents]
    kinds = {}
    for p in files:
        rel = p.relative_to(out)
        top = rel.parts[0] if len(rel.parts) > 1 else ''
        allowed = REPORTS | ARTIFACTS if top in ('', 'figures') else ARTIFACTS
        assert p.suffix in allowed, f'{rel}: a {p.suffix or "suffix-less"} file in {top or "the run folder"}'
        head = p.read_bytes()[:4]
        assert head[:1] != b'\x80' and head != b'PK\x03\x04', f'{rel} looks like a pickle or a torch.save zip'
        if p.suffix == '.safetensors':
            with safe_open(str(p), 'pt') as f: assert f.keys() is not None
        elif p.suffix == '.json': json.loads(p.read_text())
        elif p.suffix == '.jsonl': [json.loads(l) for l in p.read_text().splitlines() if l.strip()]
        kinds.setdefault(top, set()).add(p.suffix)
    for folder in ('stages', 'train', 'cache', 'models'):  # each kind of artifact was there to be checked
        assert '.safetensors' in kinds.get(folder, set()) and '.json' in kinds[folder], (folder, kinds)


def test_run_files_have_the_umasks_permissions(tiny_run):
    """Every file of the run is readable as the umask allows (0666 less the umask), like any file the user writes:
    safetensors creates its files 0600, which `tpad.artifacts.atomic_write` and the checkpoint writer correct."""
    mask = os.umask(0o022); os.umask(mask)
    files = [p for p in tiny_run['files'] if tiny_run['out'] in p.parents]
    wrong = {str(p.relative_to(tiny_run['out'])): oct(p.stat().st_mode & 0o777) for p in files
             if p.stat().st_mode & 0o777 != 0o666 & ~mask}
    assert not wrong, f'files whose permissions are not {oct(0o666 & ~mask)}: {dict(list(wrong.items())[:8])} ({len(wrong)} in all)'
    assert any(p.suffix == '.safetensors' and 'checkpoint-' in str(p) for p in files)  # checkpoints were among them
