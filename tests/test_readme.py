"The README and the docs home (nbs/index.ipynb) give the same quick start, and CI runs its test command."
import json
import os
import subprocess
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands(markdown: str) -> list[str]:
    "The shell commands of the '## Quick start' section."
    assert '## Quick start' in markdown, 'no "## Quick start" section'
    section = markdown.split('## Quick start', 1)[1].split('\n## ', 1)[0]
    return re.findall(r'```sh\n(.*?)\n```', section, flags=re.S)


def index_markdown() -> str:
    nb = json.loads((ROOT / 'nbs' / 'index.ipynb').read_text(encoding='utf-8'))
    return '\n\n'.join(''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'markdown')


def test_quick_start_is_two_commands():
    cmds = quick_start_commands((ROOT / 'README.md').read_text(encoding='utf-8'))
    assert len(cmds) == 2, cmds
    main, tests = cmds
    assert 'tpad run' in main and 'pip install' in main
    assert 'nbdev_test' in tests and 'pytest' in tests and '.[dev' in tests
    for cmd in cmds:  # an unpinned torch would pull a multi-GB CUDA build on a CPU machine
        assert 'torch==' in cmd, cmd


def test_readme_and_index_agree():
    assert quick_start_commands((ROOT / 'README.md').read_text(encoding='utf-8')) == \
        quick_start_commands(index_markdown())


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / '.ci' / 'run').read_text(encoding='utf-8')
    assert "README.md" in ci and "nbdev_test" in ci and 'bash -c "$test_cmd"' in ci


def test_settings_requirements_match_the_design_card():
    from configparser import ConfigParser
    cfg = ConfigParser(delimiters=['='])
    cfg.read(ROOT / 'settings.ini')
    reqs = cfg['DEFAULT']['requirements']
    for pkg in ['nbdev', 'torch>=2.3', 'transformers', 'peft', 'pillow', 'pandas', 'matplotlib', 'umap-learn',
                'ipywidgets']:
        assert pkg in reqs, pkg
    assert 'pytest' in cfg['DEFAULT']['dev_requirements']
    import ast
    tree = ast.parse((ROOT / 'setup.py').read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert 'pkg_resources' not in imported  # gone from current setuptools


@pytest.mark.parametrize('notebooks_rc,pytest_rc', [(1, 0), (0, 1), (0, 0)])
def test_test_command_runs_every_part_and_fails_if_any_fails(tmp_path, notebooks_rc, pytest_rc):
    "A failing notebook must not hide the pytest results, and any failure fails the command."
    cmd = quick_start_commands((ROOT / 'README.md').read_text(encoding='utf-8'))[1]
    after_install = cmd.split('&&', 1)[1]
    for tool, rc in (('nbdev_test', notebooks_rc), ('pytest', pytest_rc)):  # stand-ins that log their call
        (tmp_path / tool).write_text(f'#!/bin/sh\necho {tool} >> "{tmp_path}/called"\nexit {rc}\n')
        (tmp_path / tool).chmod(0o755)
    r = subprocess.run(['bash', '-c', after_install], env=dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}"))
    assert (tmp_path / 'called').read_text().split() == ['nbdev_test', 'pytest']
    assert (r.returncode == 0) == (notebooks_rc == pytest_rc == 0), r.returncode
