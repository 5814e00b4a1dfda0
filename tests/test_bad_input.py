"""Bad inputs, one test per row of the docs page `nbs/bad_input.qmd`.

Every bad input is built in `tmp_path` as a `load('csv', folder)` dataset (items.csv + interactions.csv + image
files) with one thing broken (or the toyshop with one broken picture), and pushed through the real path: load ->
preprocess -> for pictures and texts, `ItemImages` and the MLLM's item prompts and features (the tiny model of the
`toyshop-smoke` preset) -> where cheap, `tpad.experiment.run` end to end. Each test asserts a clear error (naming the
file, line or item) or a counted handling in the `Report`, with the counts before and after adding up.

`TPAD_BAD_INPUT_LOG=out.json pytest tests/test_bad_input.py` also writes the messages each test saw (the docs table
quotes them).
"""
import json
import os
import re
import shutil
import struct
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from tpad.data import DataFormatError, Report, SessionData, load
from tpad.preprocess import PLACEHOLDER_RGB, ItemImages, load_image, preprocess

DAY = 86400
T0 = 1_700_000_000  # 2023-11-14
PP = dict(min_item_support=1, test_days=1, valid_days=1)  # a tiny shop: every item counts, one-day valid/test periods
COLOURS = {'a': (200, 0, 0), 'b': (0, 0, 200), 'c': (0, 200, 0), 'd': (0, 0, 0)}

SEEN: dict = {}


@pytest.fixture(scope='module', autouse=True)
def _write_seen():
    "With TPAD_BAD_INPUT_LOG set, write what every test saw (the docs table quotes it)."
    yield
    if os.environ.get('TPAD_BAD_INPUT_LOG'):
        Path(os.environ['TPAD_BAD_INPUT_LOG']).write_text(json.dumps(SEEN, indent=1, ensure_ascii=False))


@pytest.fixture
def seen(request):
    "`seen(text)` records a message or report line under the running test's id."
    return lambda text: SEEN.setdefault(request.node.name, []).append(str(text))


def raised(f, exc=DataFormatError) -> str:
    "The message of the `exc` that `f()` raises."
    with pytest.raises(exc) as e: f()
    return str(e.value)


def report_line(report: Report, step: str) -> str:
    s = report[step]
    return f"{step}: {s['n_in']} in, {s['n_out']} out, {s['changed']} changed" + (f"; {s['note']}" if s['note'] else '')


# ---------------------------------------------------------------------------------------------------------------------
# a small healthy shop to break: 4 items with pictures, 24 sessions of 3 clicks over 6 days
# ---------------------------------------------------------------------------------------------------------------------
def base_items() -> pd.DataFrame:
    return pd.DataFrame({'item_id': list('abcd'), 'title': ['Red lens', 'Blue camera', 'Green tripod', 'Black bag'],
                         'text': '', 'category': ['lens', 'camera', 'tripod', 'bag'],
                         'image': [f'{i}.png' for i in 'abcd'], 'price': ['10.50', '200', '30', '15']})


def base_clicks() -> pd.DataFrame:
    rows = []
    for day in range(6):
        for k in range(4):
            seq = ['abcd'[(day + k + j) % 4] for j in range(3)]
            rows += [(f's{day}{k}', item, T0 + day * DAY + k * 100 + j) for j, item in enumerate(seq)]
    return pd.DataFrame(rows, columns=['session_id', 'item_id', 'timestamp'])


def make_shop(folder: Path, items=None, clicks=None, images=True) -> Path:
    "Write items.csv, interactions.csv (frames, or raw bytes as they are) and one 16x16 PNG per base item."
    folder.mkdir(parents=True, exist_ok=True)
    for name, table in (('items.csv', base_items() if items is None else items),
                        ('interactions.csv', base_clicks() if clicks is None else clicks)):
        if isinstance(table, bytes): (folder / name).write_bytes(table)
        else: table.to_csv(folder / name, index=False)
    if images:
        for i, rgb in COLOURS.items(): Image.new('RGB', (16, 16), rgb).save(folder / f'{i}.png')
    return folder


@pytest.fixture(scope='module')
def mllm():
    "The MLLM settings of the toyshop-smoke run (the tiny demo model, 32 px pictures) and its model and processor."
    from tpad.experiment import make_config
    from tpad.mllm import load_mllm
    cfg = make_config('toyshop-smoke').mllm
    model, processor = load_mllm(cfg)
    return SimpleNamespace(model=model, processor=processor, cfg=cfg)


def item_side(folder: Path, mllm, **pp) -> SimpleNamespace:
    "load -> preprocess -> the catalogue's pictures (`ItemImages`) and MLLM item features, all counted in one report."
    from tpad.mllm import item_features, item_prompt
    data = load('csv', folder)
    prep = preprocess(data, **{**PP, **pp})
    images = ItemImages(prep.items['image'], size=mllm.cfg.image_size, report=prep.report)
    pictures = {prep.items.loc[i, 'item_id']: images[i] for i in prep.items.index}
    prompts = {r['item_id']: item_prompt(r, mllm.processor, mllm.cfg) for r in prep.items.to_dict('records')}
    feats = item_features(mllm.model, mllm.processor, prep.items, mllm.cfg, report=prep.report)
    assert feats.shape[0] == prep.n_items == len(pictures) and torch.isfinite(feats).all()  # every item got a feature
    return SimpleNamespace(data=data, prep=prep, images=images, pictures=pictures, prompts=prompts, feats=feats,
                           report=prep.report)


def run_pipeline(folder: Path, out: Path, models: str = 'pop,srgnn', **pp) -> dict:
    "`tpad run` on the folder: the toyshop-smoke preset, ID-only rows, no figures."
    from tpad.experiment import make_config, run
    cfg = make_config('toyshop-smoke', dataset='csv', path=str(folder), models=models, out=str(out), figures='none',
                      preprocess={**PP, **pp})
    summary = run(cfg, log=lambda *a: None)
    assert (out / 'results.md').exists()
    return summary


PROMPT_BAD = 'item prompts: unreadable image -> grey placeholder [items]'


# ---------------------------------------------------------------------------------------------------------------------
# pictures
# ---------------------------------------------------------------------------------------------------------------------
def test_corrupt_image(tmp_path, mllm, seen):
    "The toyshop with one picture overwritten by random bytes: a counted grey placeholder, every other item intact."
    from tpad.toyshop import toyshop_path
    shop = tmp_path / 'toyshop'
    shutil.copytree(toyshop_path(), shop)
    (shop / 'images' / 'i0007.png').write_bytes(np.random.default_rng(0).bytes(4000))
    data = load('csv', shop)
    prep = preprocess(data, min_item_support=2)
    images = ItemImages(prep.items['image'], size=32, report=prep.report)
    pics = [images[i] for i in prep.items.index]
    test_counts = images.counts
    assert test_counts == {'ok': prep.n_items - 1, 'no_path': 0, 'missing': 0, 'corrupt': 1}
    row = prep.report['load item images [items]']
    assert (row['n_in'], row['changed']) == (prep.n_items, 1) and 'i0007.png (UnidentifiedImageError' in row['note']
    bad = prep.item_index['i0007']
    assert pics[bad - 1].getpixel((5, 5)) == PLACEHOLDER_RGB
    seen(report_line(prep.report, 'load item images [items]'))
    from tpad.mllm import item_features
    rep = Report()
    few = prep.items.loc[[bad] + [i for i in (1, 2, 3) if i != bad][:2]]
    feats = item_features(mllm.model, mllm.processor, few, mllm.cfg, report=rep)
    assert feats.shape[0] == 3 and torch.isfinite(feats).all()
    assert rep[PROMPT_BAD]['changed'] == 1 and 'i0007: corrupt' in rep[PROMPT_BAD]['note']
    seen(report_line(rep, PROMPT_BAD))


def _truncated(kind: str) -> bytes:
    buf = __import__('io').BytesIO()
    Image.effect_noise((200, 200), 60).convert('RGB').save(buf, kind)
    return buf.getvalue()[:len(buf.getvalue()) // 2]


@pytest.mark.parametrize('kind', ['JPEG', 'PNG'])
def test_truncated_image(tmp_path, mllm, seen, kind):
    "A download cut halfway: 'corrupt', a grey placeholder, counted; the run goes on."
    shop = make_shop(tmp_path / 'shop')
    (shop / 'b.png').write_bytes(_truncated(kind))
    r = item_side(shop, mllm)
    assert r.images.counts == {'ok': 3, 'no_path': 0, 'missing': 0, 'corrupt': 1}
    assert 'image file is truncated' in r.report['load item images [items]']['note']
    assert r.pictures['b'].getpixel((5, 5)) == PLACEHOLDER_RGB and r.pictures['a'].getpixel((16, 16)) == COLOURS['a']
    assert r.report[PROMPT_BAD]['changed'] == 1 and 'b: corrupt' in r.report[PROMPT_BAD]['note']
    assert len(r.prompts['b'].images) == 1  # the placeholder stands in: the prompt keeps its image slot
    seen(report_line(r.report, 'load item images [items]'))


def flat_png(path: Path, width: int, height: int, rgba=(10, 200, 30)) -> Path:
    "A flat-colour PNG written row by row (the picture is never in memory): 50 MP in under 1 MB."
    def chunk(tag, data): return struct.pack('>I', len(data)) + tag + data + struct.pack('>I', zlib.crc32(tag + data))
    comp = zlib.compressobj(1)
    rows = [comp.compress(b'\x00' + bytes(rgba) * width)]
    up = b'\x02' + bytes(width * len(rgba))  # filter 'up' with zero differences: the row above again
    rows += [comp.compress(up) for _ in range(height - 1)] + [comp.flush()]
    header = struct.pack('>IIBBBBB', width, height, 8, {3: 2, 4: 6}[len(rgba)], 0, 0, 0)
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', b''.join(rows)) + chunk(b'IEND', b''))
    return path


def _peak_mb() -> int:
    return int(re.search(r'VmHWM:\s+(\d+)', Path('/proc/self/status').read_text())[1]) // 1024


def _reset_peak() -> bool:
    "Reset this process's peak RSS (Linux); False where that is not possible."
    try: Path('/proc/self/clear_refs').write_text('5')
    except OSError: return False
    return True


@pytest.mark.parametrize('kind,budget_mb', [('png-rgb', 300), ('png-rgba', 600), ('jpeg', 100)])
def test_huge_image_50mp(tmp_path, mllm, seen, kind, budget_mb):
    "A 7072 x 7072 (50 MP) picture: opens (Pillow's bomb limit is 89 MP), reduced early, bounded time and memory."
    shop = make_shop(tmp_path / 'shop')
    side = 7072
    if kind == 'jpeg': Image.new('RGB', (side, side), (10, 200, 30)).save(shop / 'b.png', 'JPEG', quality=50)
    else: flat_png(shop / 'b.png', side, side, (10, 200, 30) if kind == 'png-rgb' else (10, 200, 30, 128))
    expect = (10, 200, 30) if kind != 'png-rgba' else (132, 227, 142)  # half-transparent green on white
    measured = _reset_peak()
    base, t0 = _peak_mb(), time.perf_counter()
    image, status, error = load_image(shop / 'b.png', 224)
    seconds, grew = time.perf_counter() - t0, _peak_mb() - base
    assert (status, error, image.size) == ('ok', '', (224, 224))
    assert all(abs(a - b) <= 2 for a, b in zip(image.getpixel((112, 112)), expect))
    assert seconds < 15, seconds
    if measured: assert grew < budget_mb, f'{kind}: peak memory grew by {grew} MB'
    seen(f'{kind}: ok, {seconds:.1f} s, peak memory +{grew} MB' if measured else f'{kind}: ok, {seconds:.1f} s')
    if kind == 'jpeg':  # through the pipeline (a PNG would be decoded four more times: same code, seconds each)
        r = item_side(shop, mllm)
        assert r.images.counts['ok'] == 4 and r.report[PROMPT_BAD]['changed'] == 0


def test_decompression_bomb_image(tmp_path, seen):
    "A PNG header claiming 14000 x 14000 (196 MP, over Pillow's 179 MP hard limit): refused before decoding, counted."
    def chunk(tag, data): return struct.pack('>I', len(data)) + tag + data + struct.pack('>I', zlib.crc32(tag + data))
    shop = make_shop(tmp_path / 'shop')
    (shop / 'b.png').write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', 14000, 14000, 8, 2, 0, 0, 0))
                                 + chunk(b'IDAT', zlib.compress(b'\x00' * 100)) + chunk(b'IEND', b''))
    data = load('csv', shop)
    prep = preprocess(data, **PP)
    images = ItemImages(prep.items['image'], size=32, report=prep.report)
    t0 = time.perf_counter()
    _ = [images[i] for i in prep.items.index]
    assert time.perf_counter() - t0 < 2
    assert images.counts['corrupt'] == 1 and 'DecompressionBombError' in prep.report['load item images [items]']['note']
    seen(report_line(prep.report, 'load item images [items]'))


def _cmyk(path):
    Image.new('CMYK', (20, 20), (255, 0, 0, 0)).save(path, 'JPEG')  # pure cyan ink
    return (0, 255, 255)


def _palette(path):
    im = Image.new('P', (20, 20), 0)
    im.putpalette([0, 0, 255, 0, 255, 0] + [0, 0, 0] * 254)
    im.paste(1, (0, 0, 10, 20))  # left half: colour 1, transparent
    im.save(path, 'PNG', transparency=1)
    return (0, 0, 255)  # the centre of the right half; the left half is white


def _alpha(path):
    im = Image.new('RGBA', (20, 20), (0, 0, 0, 0))
    im.paste((0, 0, 255, 255), (10, 0, 20, 20))  # left half fully transparent
    im.save(path, 'PNG')
    return (0, 0, 255)


def _grey16(path):
    Image.fromarray(np.full((20, 20), 30000, dtype=np.uint16)).save(path, 'PNG')  # mode I;16
    return (116, 116, 116)  # 30000 / 257: not clipped to white


@pytest.mark.parametrize('make', [_cmyk, _palette, _alpha, _grey16], ids=['cmyk', 'palette', 'alpha', 'grey16'])
def test_image_modes(tmp_path, mllm, seen, make):
    "CMYK, palette with a transparent colour, RGBA, 16-bit grey: converted to RGB with the right colours, nothing counted as bad."
    shop = make_shop(tmp_path / 'shop')
    centre = make(shop / 'b.png')
    with Image.open(shop / 'b.png') as im: mode = im.mode
    r = item_side(shop, mllm)
    pic = r.pictures['b']
    assert pic.mode == 'RGB' and r.images.counts['ok'] == 4 and r.report[PROMPT_BAD]['changed'] == 0
    assert all(abs(a - b) <= 3 for a, b in zip(pic.getpixel((24, 16)), centre)), pic.getpixel((24, 16))
    if make in (_palette, _alpha): assert pic.getpixel((6, 16)) == (255, 255, 255)  # transparency laid on white
    seen(f'file mode {mode}: loaded as RGB, pixel {pic.getpixel((24, 16))}')


def test_missing_image_file(tmp_path, mllm, seen):
    "An image path to a file that is not there: reported at load, a counted grey placeholder when loaded."
    shop = make_shop(tmp_path / 'shop')
    (shop / 'c.png').unlink()
    r = item_side(shop, mllm)
    assert r.data.report['resolve image paths']['changed'] == 1 and len(r.data.items) == 4
    assert r.images.counts == {'ok': 3, 'no_path': 0, 'missing': 1, 'corrupt': 0}
    assert r.report[PROMPT_BAD]['changed'] == 1 and 'c: missing' in r.report[PROMPT_BAD]['note']
    seen(report_line(r.data.report, 'resolve image paths'))
    seen(report_line(r.report, 'load item images [items]'))


# ---------------------------------------------------------------------------------------------------------------------
# texts
# ---------------------------------------------------------------------------------------------------------------------
def test_empty_title(tmp_path, mllm, seen):
    "Empty titles: kept, the prompt shows what there is (the picture); an item with nothing at all is still a prompt."
    items = base_items()
    items.loc[1, ['title', 'category']] = ''  # b: no text, a picture
    items.loc[2, ['title', 'category', 'image']] = ''  # c: nothing at all
    r = item_side(make_shop(tmp_path / 'shop', items=items), mllm)
    assert r.data.items.title.tolist() == ['Red lens', '', '', 'Black bag']
    s = r.data.stats().iloc[0]
    assert (s.items_with_text, s.items_with_image) == (0.5, 0.75)
    assert r.prompts['b'].text.endswith(mllm.cfg.readout_instruction) and len(r.prompts['b'].images) == 1
    assert r.prompts['c'].text == mllm.cfg.readout_instruction and not r.prompts['c'].images
    assert r.report['item prompts: no image -> text only [items]']['changed'] == 1
    bare = r.report['item prompts: no text, no readable image -> instruction only [items]']
    assert (bare['n_in'], bare['changed']) == (4, 1) and 'e.g. c' in bare['note']  # counted, named
    seen(f"report: item prompts: no text, no readable image: {bare['changed']} of {bare['n_in']} ({bare['note']})")
    seen(f'stats: items_with_text {s.items_with_text}, items_with_image {s.items_with_image}')
    seen(f"prompt of the item with nothing: {r.prompts['c'].text!r}")


def test_huge_title_100kb(tmp_path, mllm, seen):
    "A 100 kB title: read intact, cut to max_text_tokens in prompts (counted), in bounded time."
    from tpad.mllm import session_prompt
    items = base_items()
    items.loc[1, 'title'] = ('Blue camera ' * 9000)[:100_000]
    r = item_side(make_shop(tmp_path / 'shop', items=items), mllm)
    assert len(r.data.items.title[1]) == 100_000
    step = f'item prompts: text cut to {mllm.cfg.max_text_tokens} tokens [items]'
    assert r.report[step]['changed'] == 1 and r.report[step]['note'].endswith('e.g. b')
    assert len(r.prompts['b'].text) < 1000
    rep = Report()
    t0 = time.perf_counter()
    session_prompt(r.prep.items.loc[[1, 2, 3, 4]], mllm.processor, mllm.cfg, rep)
    assert time.perf_counter() - t0 < 5
    assert rep[f'session prompts: title cut to {mllm.cfg.max_text_tokens} tokens [items]']['changed'] == 1
    seen(report_line(r.report, step))


def _latin1(shop):
    (shop / 'items.csv').write_bytes('item_id,title,image\na,Caf\xe9 cr\xe8me lens,a.png\nb,Blue camera,b.png\n'
                                     'c,Green tripod,c.png\nd,Black bag,d.png\n'.encode('latin-1'))


def _utf16(shop):
    (shop / 'items.csv').write_bytes(base_items().to_csv(index=False).encode('utf-16'))


def _colliding_ids(shop):
    "Two ids that differ only in a non-UTF-8 byte: after U+FFFD replacement they are one id."
    (shop / 'items.csv').write_bytes('item_id,title\na,A\nb,B\nc,C\nd,D\ncaf\xe9,E\ncaf\xe8,F\n'.encode('latin-1'))


@pytest.mark.parametrize('make', [_latin1, _utf16, _colliding_ids], ids=['latin1', 'utf16', 'colliding_ids'])
def test_non_utf8_text(tmp_path, mllm, seen, make):
    "Latin-1 bytes: replaced with U+FFFD and counted per line; a UTF-16 file, or ids merged by the replacement: an error."
    shop = make_shop(tmp_path / 'shop')
    make(shop)
    if make is _latin1:
        r = item_side(shop, mllm)
        assert r.data.report['decode items.csv']['changed'] == 1 and r.data.report['decode items.csv']['n_in'] == 5
        assert r.data.items.title[0] == 'Caf\ufffd cr\ufffdme lens' and len(r.data.items) == 4
        assert '\ufffd' in r.prompts['a'].text
        seen(report_line(r.data.report, 'decode items.csv'))
    elif make is _utf16:
        seen(msg := raised(lambda: load('csv', shop)))
        assert 'items.csv: the file is UTF-16' in msg and 'save it as UTF-8' in msg
    else:
        seen(msg := raised(lambda: load('csv', shop)))
        assert "items.csv, lines 6 and 7: item_id 'caf\ufffd' appears more than once" in msg


def test_rtl_text(tmp_path, mllm, seen):
    "Hebrew, Arabic and a right-to-left override: kept byte for byte, through the tokenizer and into the features."
    items = base_items()
    titles = ['מצלמה כחולה', 'عدسة حمراء 50mm', 'tripod \u202eedoc\u202c green']
    items.loc[[0, 1, 2], 'title'] = titles
    r = item_side(make_shop(tmp_path / 'shop', items=items), mllm)
    assert r.data.items.title[:3].tolist() == titles
    tok = mllm.processor.tokenizer
    for item, title in zip('abc', titles):
        assert title in r.prompts[item].text
        assert tok.decode(tok(title, add_special_tokens=False)['input_ids']) == title  # nothing lost in tokenization
    assert r.data.report.steps[0]['step'] == 'read items.csv'  # no decode step: nothing was replaced
    seen(f"titles read back unchanged: {titles}")


# ---------------------------------------------------------------------------------------------------------------------
# ids and sessions
# ---------------------------------------------------------------------------------------------------------------------
def test_duplicate_item_ids(tmp_path, seen):
    "An item id twice in items.csv: an error naming the file, both lines and the id (not 'keep the first')."
    items = pd.concat([base_items(), base_items().iloc[[1]].assign(title='Blue camera, again')], ignore_index=True)
    shop = make_shop(tmp_path / 'shop', items=items)
    msg = raised(lambda: load('csv', shop))
    assert f"{shop / 'items.csv'}, lines 3 and 6: item_id 'b' appears more than once (1 repeated id(s), e.g. ['b'])" in msg
    seen(msg.replace(str(tmp_path), '...'))
    msg = raised(lambda: SessionData(items, base_clicks(), name='built in code'))  # the net behind the loaders
    assert "built in code: duplicate item ids in the item table, e.g. ['b']" in msg


def test_empty_ids(tmp_path, seen):
    "An empty session id (it would merge unrelated clicks) or item id: an error naming the file and line."
    clicks = base_clicks()
    clicks.loc[4, 'session_id'] = ''
    shop = make_shop(tmp_path / 'shop', clicks=clicks)
    msg = raised(lambda: load('csv', shop))
    assert "interactions.csv, line 6: column 'session_id' is empty (1 empty value(s) in the column)" in msg
    seen(msg.replace(str(tmp_path), '...'))
    items = base_items()
    items.loc[3, 'item_id'] = ''
    msg = raised(lambda: load('csv', make_shop(tmp_path / 'shop2', items=items)))
    assert "items.csv, line 5: column 'item_id' is empty" in msg


def test_unknown_items(tmp_path, seen):
    "Clicks on items items.csv lacks: an error naming examples, or (on_unknown='drop') dropped and counted, the rest intact."
    clicks = base_clicks()
    clicks.loc[[5, 40], 'item_id'] = ['ghost', 'phantom']
    shop = make_shop(tmp_path / 'shop', clicks=clicks)
    msg = raised(lambda: load('csv', shop))
    assert "interactions.csv: 2 interaction(s) refer to items not in the item table, e.g. ['ghost', 'phantom']" in msg
    assert "on_unknown='drop'" in msg
    seen(msg.replace(str(tmp_path), '...'))
    data = load('csv', shop, on_unknown='drop')
    row = data.report['drop clicks on unknown items']
    assert (row['n_in'], row['n_out']) == (len(clicks), len(clicks) - 2) == (72, len(data.interactions))
    prep = preprocess(data, **PP)
    assert sum(len(f) for f in prep.splits.values()) == 70  # nothing else lost
    seen(report_line(data.report, 'drop clicks on unknown items'))


def test_unknown_items_run_drop(tmp_path):
    "`tpad run --preprocess.on_unknown drop` on a folder with unknown items should drop and count them."
    clicks = base_clicks()
    clicks.loc[5, 'item_id'] = 'ghost'
    summary = run_pipeline(make_shop(tmp_path / 'shop', clicks=clicks), tmp_path / 'run', models='pop', on_unknown='drop')
    assert sum(s['clicks'] for s in summary['splits'].values()) == 71


def test_session_length_1(tmp_path, seen):
    "Single-click sessions: dropped by the length filter and counted; if that leaves nothing, an error that says so."
    extra = pd.DataFrame([(f'one{k}', 'abcd'[k], T0 + k * DAY + 5000) for k in range(4)],
                         columns=['session_id', 'item_id', 'timestamp'])
    shop = make_shop(tmp_path / 'shop', clicks=pd.concat([base_clicks(), extra]))
    prep = preprocess(load('csv', shop), **PP)
    sessions, clicks = (prep.report[f'round 1: drop sessions with < 2 clicks [{u}]'] for u in ('sessions', 'clicks'))
    assert (sessions['n_in'], sessions['removed'], clicks['n_in'], clicks['removed']) == (28, 4, 76, 4)
    assert sum(len(f) for f in prep.splits.values()) == 72
    seen(report_line(prep.report, 'round 1: drop sessions with < 2 clicks [sessions]'))
    singles = make_shop(tmp_path / 'singles', clicks=extra)
    msg = raised(lambda: preprocess(load('csv', singles), **PP))
    assert ('no clicks survive the filters (min_session_length=2, min_item_support=1): '
            'round 1: drop sessions with < 2 clicks removed 4 of 4 clicks') in msg
    seen(msg)
    summary = run_pipeline(shop, tmp_path / 'run')
    assert summary['splits']['train']['sessions'] == 16


def test_session_length_1000(tmp_path, mllm, seen):
    "A 1,000-click session: 999 samples; max_session_length cuts prefixes (counted); session prompts keep the last items (counted)."
    from tpad.mllm import session_prompt
    rng = np.random.default_rng(0)
    long = pd.DataFrame({'session_id': 'long', 'item_id': rng.choice(list('abcd'), 1000),
                         'timestamp': T0 - 5000 + np.arange(1000)})
    shop = make_shop(tmp_path / 'shop', clicks=pd.concat([long, base_clicks()]))
    prep = preprocess(load('csv', shop), **PP)
    train = prep.samples['train']
    assert (train.session_ids == 'long').sum() == 999 and train.lengths.max() == 999
    capped = preprocess(load('csv', shop), max_session_length=50, **PP)
    step = capped.report['prefix samples: train [samples]']
    assert (step['n_out'], step['changed']) == (len(train), 949) and capped.samples['train'].lengths.max() == 50
    seen(report_line(capped.report, 'prefix samples: train [samples]'))
    rep = Report()
    items = prep.items.set_index('item_id').loc[long.item_id].reset_index()
    prompt = session_prompt(items, mllm.processor, mllm.cfg, rep)
    step = f'session prompts: cut to the last {mllm.cfg.max_session_items} items [samples]'
    assert rep[step]['changed'] == 1 and len(prompt.images) == mllm.cfg.max_session_items
    seen(report_line(rep, step))
    t0 = time.perf_counter()
    summary = run_pipeline(shop, tmp_path / 'run', max_session_length=50)
    assert summary['splits']['train']['samples'] == len(train) and time.perf_counter() - t0 < 30


def test_timestamps_out_of_order(tmp_path, seen):
    "Clicks shuffled in the file: sorted by time inside each session (counted); the same samples as the ordered file."
    clicks = base_clicks()
    ordered = preprocess(load('csv', make_shop(tmp_path / 'ordered', clicks=clicks)), **PP)
    shop = make_shop(tmp_path / 'shuffled', clicks=clicks.sample(frac=1, random_state=0))
    prep = preprocess(load('csv', shop), **PP)
    assert prep.report['sort clicks by time [clicks]']['changed'] > 0
    for s in ('train', 'valid', 'test'):
        assert prep.splits[s][['session_id', 'item_id', 'timestamp']].equals(
            ordered.splits[s][['session_id', 'item_id', 'timestamp']])
    assert ordered.report['sort clicks by time [clicks]']['changed'] == 0
    seen(report_line(prep.report, 'sort clicks by time [sessions]'))
    summary = run_pipeline(shop, tmp_path / 'run')
    assert summary['splits']['test']['samples'] == len(ordered.samples['test'])


def test_timestamp_not_a_number(tmp_path, seen):
    "A timestamp 'NaN' or empty: an error naming the file, line and value."
    clicks = base_clicks().astype({'timestamp': str})
    clicks.loc[[7, 9], 'timestamp'] = ['NaN', '']
    msg = raised(lambda: load('csv', make_shop(tmp_path / 'shop', clicks=clicks)))
    assert "interactions.csv, line 9: column 'timestamp' is not a time (number or ISO date): 'NaN' (2 bad value(s)" in msg
    seen(msg.replace(str(tmp_path), '...'))


def _amazon_2023(folder: Path, prices) -> Path:
    folder.mkdir()
    reviews = [dict(rating=5.0, title='ok', text='ok', asin=f'B{i}', parent_asin=f'B{i}', user_id='U1',
                    timestamp=1588687728923 + i * 1000) for i in range(len(prices))]
    meta = [dict(main_category='All Beauty', title=f'Product {i}', features=[], description=[], price=p, images=[],
                 store='', categories=[], details={}, parent_asin=f'B{i}') for i, p in enumerate(prices)]
    for name, records in (('All_Beauty.jsonl', reviews), ('meta_All_Beauty.jsonl', meta)):
        (folder / name).write_text(''.join(json.dumps(r) + '\n' for r in records))
    return folder


def _hm(folder: Path, prices) -> Path:
    folder.mkdir()
    (folder / 'articles.csv').write_text('article_id,prod_name,product_type_name\n0108775015,Strap top,Vest top\n')
    (folder / 'transactions_train.csv').write_text('t_dat,customer_id,article_id,price,sales_channel_id\n' + ''.join(
        f'2018-09-2{i},c1,0108775015,{p},2\n' for i, p in enumerate(prices)))
    return folder


@pytest.mark.parametrize('fmt', ['csv', 'amazon', 'hm'])
def test_nan_prices(tmp_path, seen, fmt):
    "Missing prices: kept as missing (NaN, or the text as written in a generic CSV), counted where parsed, no row lost."
    if fmt == 'csv':
        items = base_items().assign(price=['NaN', '', 'nan', '3.50'])
        data = load('csv', make_shop(tmp_path / 'shop', items=items))
        assert data.items.price.tolist() == ['NaN', '', 'nan', '3.50'] and len(data.items) == 4  # extra column: as written
        assert len(preprocess(data, **PP).items) == 4
        seen(f"items.price kept as written: {data.items.price.tolist()}")
    elif fmt == 'amazon':
        data = load('amazon', _amazon_2023(tmp_path / 'amazon', [None, '', float('nan'), 12.95]))
        assert len(data.items) == 4 and data.items.price.isna().sum() == 3
        assert data.report['parse prices']['note'] == '1 of 4 item(s) have a price'
        seen(report_line(data.report, 'parse prices'))
    else:
        data = load('hm', _hm(tmp_path / 'hm', ['0.05', '', 'NaN', '0.03']))
        assert len(data.interactions) == 4 and data.interactions.price.isna().sum() == 2
        assert data.report['missing price in transactions_train.csv']['changed'] == 2
        seen(report_line(data.report, 'missing price in transactions_train.csv'))
        bad = _hm(tmp_path / 'hm_bad', ['0.05', 'free'])
        assert "transactions_train.csv, line 3: column 'price' is not a number: 'free'" in raised(lambda: load('hm', bad))


@pytest.mark.parametrize('kind', ['zero_bytes', 'header_only'])
def test_empty_dataset(tmp_path, seen, kind):
    "Empty files: an error naming the file; header-only files load as 0 items, and the pipeline stops at once saying why."
    if kind == 'zero_bytes':
        shop = make_shop(tmp_path / 'shop', items=b'', clicks=b'', images=False)
        msg = raised(lambda: load('csv', shop))
        assert msg == f"{shop / 'items.csv'}: the file is empty"
        seen(msg.replace(str(tmp_path), '...'))
        return
    shop = make_shop(tmp_path / 'shop', items=b'item_id,title,image\n', clicks=b'session_id,item_id,timestamp\n',
                     images=False)
    data = load('csv', shop)
    s = data.stats().iloc[0]
    assert (s.sessions, s['items'], s.interactions) == (0, 0, 0)
    msg = raised(lambda: preprocess(data, **PP))
    assert msg == 'shop: no interactions to preprocess'
    seen(msg)
    out = tmp_path / 'run'
    assert raised(lambda: run_pipeline(shop, out)) == msg
    assert not (out / 'results.csv').exists() and not (out / 'stats.csv').exists()  # stopped before writing results


def test_one_item_catalogue(tmp_path, mllm, seen):
    "A catalogue of one item (every session clicks it again): preprocesses and runs end to end; every metric is 100 %."
    from tpad.mllm import item_features
    items = base_items().iloc[[0]]
    clicks = pd.DataFrame([(f's{d}{k}', 'a', T0 + d * DAY + k * 10 + j) for d in range(6) for k in range(3) for j in range(2)],
                          columns=['session_id', 'item_id', 'timestamp'])
    shop = make_shop(tmp_path / 'shop', items=items, clicks=clicks)
    prep = preprocess(load('csv', shop), **PP)
    assert prep.n_items == 1 and {s: len(v) for s, v in prep.samples.items()} == {'train': 12, 'valid': 3, 'test': 3}
    feats = item_features(mllm.model, mllm.processor, prep.items, mllm.cfg)
    assert feats.shape[0] == 1
    summary = run_pipeline(shop, tmp_path / 'run')
    results = pd.read_csv(tmp_path / 'run' / 'results.csv')
    assert results['HR@20'].tolist() == [1.0, 1.0] and results['MRR@20'].tolist() == [1.0, 1.0]
    seen(f"runs; test HR@20 = MRR@20 = 1.0 for {results.model.tolist()} (one item to rank)")
    assert summary['splits']['test']['samples'] == 3


def test_docs_table_lists_every_test():
    "nbs/bad_input.qmd has a row for every test in this file (and no row for a test that is gone)."
    page = (Path(__file__).resolve().parents[1] / 'nbs' / 'bad_input.qmd').read_text(encoding='utf-8')
    here = {n for n in globals() if n.startswith('test_')}
    named = set(re.findall(r'`(test_\w+)', page))
    missing = here - named - {'test_docs_table_lists_every_test'}
    assert not missing, f'tests without a row in nbs/bad_input.qmd: {sorted(missing)}'
    assert named <= here, f'rows naming tests that do not exist: {sorted(named - here)}'
