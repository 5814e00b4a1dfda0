"The toyshop table of README.md and of the docs home page is rendered from the committed evidence files, never typed."
import json
import re
from pathlib import Path

import pandas as pd

from tpad.experiment import EVIDENCE_FILES, evidence_link, evidence_markdown

ROOT = Path(__file__).resolve().parents[1]
EVIDENCE = ROOT / 'evidence' / 'toyshop-tiny'
SECTION = '## The toyshop table'


def section(markdown: str, header: str = SECTION) -> str:
    "The text under `header`, up to the next '## ' header."
    assert header in markdown, f'no {header!r} section'
    return markdown.split(header, 1)[1].split('\n## ', 1)[0].strip()


def index_cells() -> list[dict]:
    return json.loads((ROOT / 'nbs' / 'index.ipynb').read_text(encoding='utf-8'))['cells']


def test_evidence_is_complete():
    "One documented command made it: at least 3 pipeline seeds, its time, machine and load, every results file."
    for name in EVIDENCE_FILES + ('evidence.json',): assert (EVIDENCE / name).is_file(), name
    info = json.loads((EVIDENCE / 'evidence.json').read_text())
    assert info['command'].startswith('tpad run --preset toyshop-tiny --seeds ') and info['seconds'] > 0
    assert info['machine']['cores'] >= 1 and len(info['load_average_before']) == 3 and info['peak_memory_mb'] > 0
    summary = json.loads((EVIDENCE / 'summary.json').read_text())
    assert len(summary['seeds']) >= 3
    rows = pd.read_csv(EVIDENCE / 'results.csv')
    assert rows.groupby('model')['seed'].nunique().min() == len(summary['seeds'])
    assert (EVIDENCE / 'stages.csv').is_file() and pd.read_csv(EVIDENCE / 'stages.csv')['seed'].nunique() == len(summary['seeds'])


def test_readme_table_is_the_evidence():
    "README.md's toyshop section is exactly what the evidence files render to (bench/evidence.py writes it)."
    readme = (ROOT / 'README.md').read_text(encoding='utf-8')
    assert section(readme) == evidence_markdown(EVIDENCE, link=evidence_link('toyshop-tiny')).strip()


def test_index_renders_the_evidence():
    "The home page renders the same files; its own prose in that section types no number, and a stored output is the evidence."
    cells = index_cells()
    start = next(i for i, c in enumerate(cells) if ''.join(c['source']).startswith(SECTION))
    end = next(i for i in range(start + 1, len(cells)) if ''.join(cells[i]['source']).startswith('## '))
    code = [c for c in cells[start:end] if c['cell_type'] == 'code']
    assert any("evidence_markdown(" in ''.join(c['source']) for c in code), 'no cell renders the evidence'
    prose = '\n'.join(''.join(c['source']) for c in cells[start:end] if c['cell_type'] == 'markdown')
    words = re.sub(r'\]\([^)]*\)|`[^`]*`', ' ', prose)  # link targets and code are names, not numbers
    assert not re.findall(r'\d+\.\d+|\d{2,}', words), 'typed numbers in the toyshop section'
    expected = evidence_markdown(EVIDENCE, link=evidence_link('toyshop-tiny')).strip()
    for c in code:
        for o in c.get('outputs', []):
            shown = ''.join(o.get('data', {}).get('text/markdown', ''))
            if shown: assert shown.strip() == expected


TOYS = ROOT / 'evidence' / 'amazon-toys-ids'
TOYS_SECTION = '## The Amazon Toys table (ID-only, leave-one-out)'


def test_toys_evidence_is_complete():
    "The ID-only Toys table: one command, at least 3 seeds, every ID-only row, the published numbers it is set beside."
    from tpad.experiment import ID_ONLY_KEYS
    for name in ('results.csv', 'results.md', 'summary.json', 'evidence.json', 'published.json'): assert (TOYS / name).is_file(), name
    info = json.loads((TOYS / 'evidence.json').read_text())
    assert info['command'].startswith('tpad run --preset amazon-toys-ids --seeds ') and info['seconds'] > 0
    rows = pd.read_csv(TOYS / 'results.csv')
    assert set(rows['model']) == set(ID_ONLY_KEYS) and rows.groupby('model')['seed'].nunique().min() >= 3
    published = json.loads((TOYS / 'published.json').read_text())
    assert all(n['source'] and n['model'] in ID_ONLY_KEYS and n['metrics'] for n in published['numbers'])


def test_readme_toys_table_is_the_evidence():
    from tpad.experiment import benchmark_markdown
    readme = (ROOT / 'README.md').read_text(encoding='utf-8')
    assert section(readme, TOYS_SECTION) == benchmark_markdown(TOYS, link=evidence_link('amazon-toys-ids')).strip()


def test_index_renders_the_toys_evidence():
    from tpad.experiment import benchmark_markdown
    cells = index_cells()
    start = next(i for i, c in enumerate(cells) if ''.join(c['source']).startswith(TOYS_SECTION))
    end = next(i for i in range(start + 1, len(cells)) if ''.join(cells[i]['source']).startswith('## '))
    code = [c for c in cells[start:end] if c['cell_type'] == 'code']
    assert any('benchmark_markdown(' in ''.join(c['source']) for c in code), 'no cell renders the evidence'
    expected = benchmark_markdown(TOYS, link=evidence_link('amazon-toys-ids')).strip()
    shown = [''.join(o.get('data', {}).get('text/markdown', '')) for c in code for o in c.get('outputs', [])]
    assert expected in [s.strip() for s in shown], 'the stored output is not the evidence'
