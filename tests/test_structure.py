"""The library's shape: short functions and export cells, no private names crossing modules, one copy of each table,
and stored `show_doc` signatures that match the code."""
import ast
import importlib
import json
import pkgutil
import re
from pathlib import Path

import pytest

import tpad

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(p for p in (ROOT / 'tpad').glob('*.py') if p.name not in ('_modidx.py',))
NOTEBOOKS = sorted((ROOT / 'nbs').rglob('*.ipynb'))
MAX_LINES = 60


def _tree(path: Path) -> ast.Module: return ast.parse(path.read_text(encoding='utf-8'))


def _cells(path: Path) -> list[dict]: return json.loads(path.read_text(encoding='utf-8'))['cells']


def _source(cell: dict) -> str: return ''.join(cell['source'])


def test_no_function_over_60_lines():
    long = [f'{p.name}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)'
            for p in MODULES for n in ast.walk(_tree(p))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_LINES]
    assert not long, f'functions over {MAX_LINES} lines: {long}'


def test_no_export_cell_over_60_lines():
    long = [f'{p.relative_to(ROOT)} cell {i} ({len(_source(c).splitlines())} lines)'
            for p in NOTEBOOKS for i, c in enumerate(_cells(p))
            if c['cell_type'] == 'code' and _source(c).startswith('#| export') and len(_source(c).splitlines()) > MAX_LINES]
    assert not long, f'export cells over {MAX_LINES} lines: {long}'


def _tpad_imports(path: Path):
    "(line, module, name, inside a function) of every `from tpad... import name` / `from .x import name` in `path`."
    tree, out = _tree(path), []
    inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f) if isinstance(n, ast.ImportFrom)}
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and (n.level > 0 or (n.module or '').split('.')[0] == 'tpad'):
            out += [(n.lineno, n.module, a.name, id(n) in inside) for a in n.names]
    return out


def test_no_private_name_crosses_modules():
    private = [f'{p.name}:{line} from {mod} import {name}' for p in MODULES
               for line, mod, name, _ in _tpad_imports(p) if name.startswith('_')]
    assert not private, f'private names imported from another tpad module: {private}'


def test_no_lazy_imports_between_layers():
    "Modules import each other at the top; only the command line defers imports (it starts without torch)."
    lazy = [f'{p.name}:{line} from {mod} import {name}' for p in MODULES if p.name not in ('cli.py', '__init__.py')
            for line, mod, name, inside in _tpad_imports(p) if inside]
    assert not lazy, f'tpad imports inside functions: {lazy}'


def _literal_tables(path: Path) -> dict[str, frozenset]:
    "Module-level dict literals of >= 4 string keys: {name: its (key, value source) pairs}."
    out = {}
    for n in _tree(path).body:
        target = n.targets[0] if isinstance(n, ast.Assign) else n.target if isinstance(n, ast.AnnAssign) else None
        if isinstance(target, ast.Name) and isinstance(getattr(n, 'value', None), ast.Dict):
            pairs = [(k.value, ast.dump(v)) for k, v in zip(n.value.keys, n.value.values)
                     if isinstance(k, ast.Constant) and isinstance(k.value, str)]
            if len(pairs) >= 4: out[target.id] = frozenset(pairs)
    return out


def test_no_table_is_restated():
    seen, twice = {}, []
    for p in MODULES:
        for name, keys in _literal_tables(p).items():
            if keys in seen: twice.append(f'{p.name}.{name} restates {seen[keys]}')
            seen.setdefault(keys, f'{p.name}.{name}')
    assert not twice, twice
    rows = [f'{p.name}.{name}' for p in MODULES if p.name != 'artifacts.py'
            for name, pairs in _literal_tables(p).items() if {'tpad', 'msbr_plain'} <= {k for k, _ in pairs}]
    assert not rows, f'tables of the run rows outside tpad.artifacts: {rows}'
    from tpad import artifacts, cases, experiment
    assert experiment.MODELS is artifacts.MODELS
    assert not hasattr(cases, 'RUN_MODELS')


def _default_exp(cells) -> str | None:
    for c in cells:
        m = re.search(r'^#\|\s*default_exp\s+(\S+)', _source(c), flags=re.M)
        if m: return m.group(1)
    return None


def _namespace(module: str | None) -> dict:
    "Every public name of every tpad module, then every name of the notebook's own module."
    ns = {}
    for info in pkgutil.iter_modules(tpad.__path__):
        if info.name.startswith('_'): continue
        mod = importlib.import_module(f'tpad.{info.name}')
        ns.update({k: v for k, v in vars(mod).items() if not k.startswith('_')})
    if module: ns.update(vars(importlib.import_module(f'tpad.{module}')))
    return ns


def _signature_block(markdown: str) -> str | None:
    "The signature in a show_doc rendering, without the parameters' comments and layout."
    m = re.search(r'```python\n(.*?)\n```', markdown, flags=re.S)
    if not m: return None
    text = re.sub(r'#[^\n]*', '', m.group(1))
    text = re.sub(r':VAR_(KEYWORD|POSITIONAL)|\*', '', text)  # show_doc writes *args either way
    return re.sub(r'\s*([(),])\s*', r'\1', re.sub(r'\s+', ' ', text)).replace(',)', ')').strip()


def _stored_show_docs():
    for p in NOTEBOOKS:
        cells = _cells(p)
        for i, c in enumerate(cells):
            src = _source(c).strip()
            if c['cell_type'] != 'code' or not re.fullmatch(r'show_doc\(.*\)', src, flags=re.S): continue
            for out in c.get('outputs', []):
                md = out.get('data', {}).get('text/markdown')
                if md: yield p, i, src, _default_exp(cells), ''.join(md)


SHOW_DOCS = list(_stored_show_docs())


def test_there_are_stored_show_docs():
    assert len(SHOW_DOCS) > 50


@pytest.mark.parametrize('nb,cell,call,module,stored', SHOW_DOCS,
                         ids=[f'{p.stem}-{i}' for p, i, *_ in SHOW_DOCS])
def test_stored_show_doc_signature_matches_the_code(nb, cell, call, module, stored):
    from nbdev.showdoc import show_doc
    ns = {**_namespace(module), 'show_doc': show_doc}
    fresh = eval(call, ns)._repr_markdown_()
    assert _signature_block(stored) == _signature_block(fresh), \
        f'{nb.relative_to(ROOT)} cell {cell}: the stored {call} is stale; re-run the notebook'
