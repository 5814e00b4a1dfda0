"""Catalogues with titles only, images only or text only (issue 15, section 2), and every saved row of a run loads.

Each catalogue is the bundled toyshop with only some item columns kept, written as a `csv` dataset (`items.csv` +
`interactions.csv`) in `tmp_path`, and run end to end by `tpad.experiment.run` (preset `toyshop-smoke`, the TPAD row
only): about 10-20 s each on 2 CPU cores. The generation target of Stage 1 and Stage 2b is chosen from what the
catalogue has (`tpad.stage1.knowledge_target`): the text, else the category, else the brand, else title completion,
else none (images only: no generation training, Stage 2b's generation weight 0). A target with nothing to train on
stops before any training with one line naming the option to set (`tpad.stage1.check_knowledge_target`).

`test_msbr_plain_loads` runs the plain-features row (about 45 s: the encoders read 600 items once) and loads it back
with `tpad.cases.load_run_models`, from the run's cache; it skips without the plain encoders.
"""
import dataclasses
import math
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from tpad import baselines
from tpad.align import AlignData, generation_target
from tpad.cases import load_run_models
from tpad.data import load
from tpad.experiment import make_config, run
from tpad.mllm import corpus_texts, load_mllm
from tpad.msbr import evaluate_model
from tpad.preprocess import preprocess
from tpad.stage1 import KnowledgeData, check_knowledge_target, holdout_split, knowledge_target

TITLE_ADVICE = ("stage1.target_field 'text': no item has text; the items have title; "
                "use --stage1.target_field auto or title")


@pytest.fixture(scope='module')
def shop():
    return load('toyshop')


def write_catalogue(folder: Path, shop, columns) -> Path:
    "The toyshop as a csv dataset whose items.csv has `item_id` and only `columns`."
    folder.mkdir(parents=True, exist_ok=True)
    shop.items[['item_id', *columns]].to_csv(folder / 'items.csv', index=False)
    shop.interactions[['session_id', 'item_id', 'timestamp']].to_csv(folder / 'interactions.csv', index=False)
    return folder


def smoke_config(folder: Path, out: Path, **overrides):
    return make_config('toyshop-smoke', dataset='csv', path=str(folder), out=str(out), models='tpad', figures='none',
                       jobs=1, seeds=1, **overrides)


def stage_config(config):
    "Stage 1's settings and the run's MLLM, as `tpad run` passes them."
    return config.stage1, config.mllm


def run_logged(config, capsys) -> tuple[dict, str]:
    "Run `config`; (its summary, everything it logged or printed)."
    summary = run(config, log=print)
    return summary, capsys.readouterr().out


def assert_tpad_row(out: Path):
    results = pd.read_csv(out / 'results.csv')
    assert results.model.tolist() == ['tpad'], results.model.tolist()
    assert results['HR@20'].between(0, 1).all() and (out / 'models' / 'tpad-seed0' / 'model.json').is_file()
    assert '| TPAD |' in (out / 'results.md').read_text()


def test_titles_only(tmp_path, shop, capsys):
    folder = write_catalogue(tmp_path / 'data', shop, ['title'])
    config = smoke_config(folder, tmp_path / 'run')
    items = load('csv', folder).items
    target = knowledge_target(items, 'auto', *stage_config(config))
    assert (target.field, target.task, target.n_items_with_target) == ('title', 'completion', len(items))
    summary, logged = run_logged(config, capsys)
    assert f'[stage1] {target.note}' in logged and f'[align] {target.note}' in logged
    assert target.note.startswith('target: title completion (auto: no item has text, category or brand;')
    train_items, _ = holdout_split(items, config.stage1.holdout_share, config.stage1.seed)
    n_train = knowledge_target(train_items, 'title', *stage_config(config)).n_items_with_target
    assert n_train == len(train_items) > 0
    steps = summary['stages']['stage1']['seed0']['steps']
    assert steps == math.ceil(n_train / config.stage1.train.batch_size) * config.stage1.train.epochs, steps
    assert_tpad_row(tmp_path / 'run')


def test_images_only(tmp_path, shop, capsys):
    folder = write_catalogue(tmp_path / 'data', shop, ['image'])
    config = smoke_config(folder, tmp_path / 'run')
    summary, logged = run_logged(config, capsys)
    out = tmp_path / 'run'
    # the caption-free setting: Stage 1 trains nothing, h^K is the MLLM reading each picture ...
    assert re.search(r"^\[stage1\] target: none \(auto: no item has text, category, brand or title; no generation "
                     r"training: .*Stage 2b's generation weight is 0\); 600 items$", logged, re.M), logged[:2000]
    assert summary['stages']['stage1']['seed0']['steps'] == 0 and not (out / 'train' / 'stage1').exists()
    h_K = load_file(str(out / 'stages' / 'stage1' / 'outputs.safetensors'))['features']
    pictures = shop.items.image.map(lambda p: Path(p).read_bytes()).nunique()  # a few toyshop items share a picture
    assert len(torch.unique(h_K, dim=0)) == pictures  # one h^K per picture: the items are told apart
    # ... and Stage 2b trains without its generation term
    assert "[align] target: none" in logged
    assert summary['stages']['align-full']['seed0']['steps'] > 0
    losses = pd.read_csv(out / 'train' / 'align-full' / 'losses.csv')
    assert 'gen' not in losses.columns and {'mi', 'mmd', 'rec'} <= set(losses.columns)
    assert_tpad_row(out)


def test_text_only(tmp_path, shop, capsys):
    folder = write_catalogue(tmp_path / 'data', shop, ['text'])
    # the demo prompt shows the title: no item would show anything, every h^K would be the same -> one line of advice
    with pytest.raises(ValueError) as e:
        run(smoke_config(folder, tmp_path / 'bare'), log=print)
    assert str(e.value).startswith("stage1.target_field 'auto': no item prompt would show anything of its item")
    assert str(e.value).endswith('use --mllm.item_fields text') and '\n' not in str(e.value)
    assert not (tmp_path / 'bare' / 'train').exists()  # nothing trained
    capsys.readouterr()
    # as advised: the prompt shows the text, the task is its completion
    config = smoke_config(folder, tmp_path / 'run', mllm=dict(item_fields='text'))
    target = check_knowledge_target(load('csv', folder).items, *stage_config(config))
    assert (target.field, target.task, target.n_items_with_target) == ('text', 'completion', len(shop.items))
    summary, logged = run_logged(config, capsys)
    assert f'[stage1] {target.note}' in logged
    assert summary['stages']['stage1']['seed0']['steps'] > 0
    assert_tpad_row(tmp_path / 'run')


def test_explicit_text_on_titles_is_one_line_of_advice(tmp_path, shop):
    folder = write_catalogue(tmp_path / 'data', shop, ['title'])
    config = smoke_config(folder, tmp_path / 'run', stage1=dict(target_field='text'))
    with pytest.raises(ValueError) as e: check_knowledge_target(load('csv', folder).items, *stage_config(config))
    assert str(e.value) == TITLE_ADVICE
    with pytest.raises(ValueError) as e: run(config, log=lambda *a: None)
    assert str(e.value) == TITLE_ADVICE
    assert not (tmp_path / 'run' / 'train').exists()  # it stopped before any training
    # Stage 2b continues Stage 1's task: its target check is the same one, naming the same option
    with pytest.raises(ValueError, match=r"^stage1\.target_field 'text': no item has text; the items have title; "
                                         r"use --stage1\.target_field auto or title$"):
        generation_target(load('csv', folder).items, config.align, config.stage1, config.mllm)


@pytest.mark.parametrize('columns', [['title'], ['title', 'image']])
def test_title_prompt_never_contains_the_title(shop, columns):
    config = make_config('toyshop-smoke')
    s1, mllm = stage_config(config)
    items = shop.items[['item_id', *columns]].assign(**{c: '' for c in ('text', 'category') if c not in columns})
    if 'image' not in columns: items['image'] = None
    _, processor = load_mllm(mllm, texts=corpus_texts(items))
    data = KnowledgeData(items, processor, s1, mllm)
    assert data.config.target_field == 'title' and len(data) == len(items)
    for (prompt, target), row in zip(data, data.rows):
        title = row['title']
        assert title not in prompt.text, (title, prompt.text)
        assert target and title.endswith(' ' + target) and not prompt.text.startswith(target)
        assert (len(prompt.images) == 1) == ('image' in columns)
    # Stage 2b's generation term makes the same examples
    align = AlignData(items, processor, s1, mllm)
    assert [p.text for p, _, _ in (align[i] for i in range(len(align)))] == [p.text for p, _ in data]
    # a one-word title with no picture has nothing left to show: counted and reported, not dropped silently
    short = items.head(4).assign(title=['Kite', 'Red kite', 'Big red kite', 'Blue kite'])
    from tpad.data import Report
    report = Report()
    few = KnowledgeData(short, processor, s1, mllm, report)
    step = report['knowledge targets: skip items with an empty target']
    assert (step['n_in'], step['n_out'], len(few)) == ((4, 3, 3) if 'image' not in columns else (4, 4, 4))
    note = knowledge_target(short, 'auto', s1, mllm).note
    assert note.endswith('3 of 4 items, skipped: 1 whose prompt would show nothing (one-word title, no image)') \
        if 'image' not in columns else note.endswith('4 of 4 items'), note


@pytest.mark.skipif(not baselines.plain_available(), reason=f'the plain encoders are not installed: {baselines.PLAIN_EXTRA}')
def test_msbr_plain_loads(tmp_path, shop, monkeypatch):
    out = tmp_path / 'run'
    config = make_config('toyshop-smoke', out=str(out), models='msbr_plain', figures='none', jobs=1, seeds=1)
    run(config, log=lambda *a: None)
    assert (out / 'models' / 'msbr_plain-seed0' / 'model.json').is_file()

    def never(*a, **k): raise AssertionError('the plain features were computed again instead of read from the cache')
    monkeypatch.setattr(baselines, '_image_features', never)
    monkeypatch.setattr(baselines, 'load_minilm', never)
    prepared = preprocess(shop, config.preprocess)
    models = load_run_models(out, prepared, shop.items, ['msbr_plain'])
    assert list(models) == ['MSBR + plain pre-trained features']
    model = models['MSBR + plain pre-trained features']
    assert model.features.shape[0] == prepared.n_items
    scores = evaluate_model(model, prepared, 'test')
    saved = pd.read_csv(out / 'results.csv').set_index('model').loc['msbr_plain']
    assert abs(scores['overall']['HR@20'] - saved['HR@20']) < 1e-9 and abs(scores['overall']['MRR@20'] - saved['MRR@20']) < 1e-9
