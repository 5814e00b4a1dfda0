"""The evidence behind the README's tables: one `tpad run` with several seeds, timed, its results committed.

    python bench/evidence.py                      # toyshop-tiny, 3 pipeline seeds -> evidence/toyshop-tiny/
    python bench/evidence.py --seeds 5 -- --fit.epochs 20    # anything after -- goes to `tpad run`
    python bench/evidence.py --preset amazon-toys-ids -- --path PATH/TO/amazon_toys_sequences   # the ID-only Toys table

It runs `tpad run --preset PRESET --seeds N --out runs/evidence/PRESET --progress false` in a child process and
measures its wall time and peak memory (the child's maximum resident set size), then copies the small results files
of the run (results.md/.csv, significance.csv, claims.csv, stages.csv, summary.json) into `evidence/PRESET/`
with `evidence.json`: the command, the commit, the date, the seconds, the peak memory, the machine (CPU model, cores,
memory) and the load average before and after (a time taken beside other jobs says so). Last, it rewrites the
preset's section of README.md from these files (`tpad.experiment.evidence_markdown` for the toyshop,
`benchmark_markdown` for the ID-only benchmarks, with the published numbers of `published.json` beside the evidence),
the same text the docs home page renders, so that no number in it is typed by hand (tests/test_evidence.py checks it).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tpad.artifacts import atomic_write
from tpad.experiment import EVIDENCE_FILES, benchmark_markdown, evidence_link, evidence_markdown

ROOT = Path(__file__).resolve().parents[1]
# the README section each preset's evidence renders into, and how
SECTIONS = {'toyshop-tiny': ('## The toyshop table', evidence_markdown),
            'amazon-toys-ids': ('## The Amazon Toys table (ID-only, leave-one-out)', benchmark_markdown)}
NEXT_SECTION = '## Where to go next'  # a new section goes before it


def machine() -> dict:
    "CPU model, cores and memory of this machine."
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(':', 1)[1].strip() for l in Path('/proc/cpuinfo').read_text().splitlines() if l.startswith('model name'))
    except (OSError, StopIteration): pass
    try: mem_gb = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30
    except (ValueError, OSError, AttributeError): mem_gb = None
    return dict(cpu=cpu, cores=os.cpu_count(), memory_gb=round(mem_gb, 1) if mem_gb else None,
                python=platform.python_version(), system=platform.system())


def commit() -> str:
    "The commit of the working tree, with '+dirty' when it has uncommitted changes to tracked files."
    try:
        head = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(['git', 'diff', '--quiet', 'HEAD', '--', 'tpad', 'nbs', 'setup.py', 'settings.ini'], cwd=ROOT).returncode
        return head + ('+dirty' if dirty else '')
    except OSError: return 'unknown'


def replace_section(text: str, header: str, body: str) -> str:
    "`text` with the markdown section under `header` (up to the next '## ') replaced by `body`."
    if header not in text:
        if NEXT_SECTION not in text: raise ValueError(f'README.md has no {header!r} section and no {NEXT_SECTION!r}')
        return text.replace(NEXT_SECTION, f"{header}\n\n{body.strip()}\n\n{NEXT_SECTION}", 1)
    before, rest = text.split(header, 1)
    after = rest.split('\n## ', 1)[1] if '\n## ' in rest else ''
    return f"{before}{header}\n\n{body.strip()}\n\n" + (f'## {after}' if after else '')


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--preset', default='toyshop-tiny', help='the tpad run preset')
    ap.add_argument('--seeds', type=int, default=3, help='pipeline seeds (at least 3 for the README table)')
    ap.add_argument('--out', default='', help='the run folder (default runs/evidence/PRESET)')
    ap.add_argument('--dest', default='', help='where the evidence files go (default evidence/PRESET)')
    ap.add_argument('--readme', action=argparse.BooleanOptionalAction, default=True, help="rewrite the preset's README.md section")
    ap.add_argument('extra', nargs='*', help='more `tpad run` options, after --')
    args = ap.parse_args(argv)
    out = Path(args.out or ROOT / 'runs' / 'evidence' / args.preset)
    dest = Path(args.dest or ROOT / 'evidence' / args.preset)
    tpad = Path(sys.executable).parent / 'tpad'
    cmd = [str(tpad) if tpad.exists() else 'tpad', 'run', '--preset', args.preset, '--seeds', str(args.seeds),
           '--out', str(out), '--progress', 'false', *args.extra]
    shown = ' '.join(['tpad', *cmd[1:]]).replace(str(ROOT) + '/', '')
    print(f'[evidence] {shown}', flush=True)
    code = commit()  # the code the run starts from (a commit made while it runs must not be credited with it)
    load_before, t0 = os.getloadavg(), time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f'{args.preset}.log', 'w') as log:  # the run's whole log, beside the run folder
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    seconds, load_after = time.perf_counter() - t0, os.getloadavg()
    if proc.returncode: sys.exit(f'[evidence] tpad run failed ({proc.returncode}); its log: {out.parent / (args.preset + ".log")}')
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: kilobytes
    dest.mkdir(parents=True, exist_ok=True)
    for name in EVIDENCE_FILES:
        if (out / name).exists(): shutil.copyfile(out / name, dest / name)
    info = dict(command=shown, commit=code, date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
                seconds=round(seconds, 1), peak_memory_mb=round(peak_kb / 1024), machine=machine(),
                load_average_before=[round(x, 2) for x in load_before], load_average_after=[round(x, 2) for x in load_after])
    atomic_write(lambda p: p.write_text(json.dumps(info, indent=1)), dest / 'evidence.json')
    print(f"[evidence] {info['seconds']} s, peak {info['peak_memory_mb']} MB, load {info['load_average_before']} -> "
          f"{info['load_average_after']}; wrote {dest}")
    if args.readme and args.preset in SECTIONS:
        readme, (header, render) = ROOT / 'README.md', SECTIONS[args.preset]
        body = render(dest, link=evidence_link(args.preset))
        atomic_write(lambda p: p.write_text(replace_section(readme.read_text(encoding='utf-8'), header, body),
                                            encoding='utf-8'), readme)
        print(f'[evidence] README.md: {header!r} rewritten from {dest}')


if __name__ == '__main__':
    main()
