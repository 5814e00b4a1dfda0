"Every loader that has a real public sample reads it completely (numbers from each sample's SOURCE.md)."
import pandas as pd

from tpad.data import load


def test_diginetica_sample(shared):
    data = load('diginetica', shared / 'diginetica_sample')
    s = data.stats().iloc[0]
    assert (s.interactions, s.sessions, s['items']) == (12391, 2986, 7139)
    assert data.interactions.groupby('session_id').size().ge(2).sum() == 2053
    # eventdate 2016-01-03 .. 2016-06-01 (+ the in-session offset, at most a day)
    days = pd.to_datetime(data.interactions.timestamp, unit='s')
    assert days.min() >= pd.Timestamp('2016-01-03') and days.max() < pd.Timestamp('2016-06-03')


def test_yoochoose_prepared_sample(shared):
    data = load('yoochoose', shared / 'yoochoose_100k')
    inter = data.interactions
    assert len(inter) == 70278 + 13568  # train_full + test; train_tr/train_valid are not read twice
    counts = inter.groupby('split').session_id.nunique()
    assert (counts['train'], counts['test']) == (17794, 3416)
    test_items = set(inter.loc[inter.split == 'test', 'item_id'])
    assert test_items <= set(inter.loc[inter.split == 'train', 'item_id'])  # as SOURCE.md says


def test_yoochoose_explicit_files(shared):
    data = load('yoochoose', shared / 'yoochoose_100k',
                files=['yoochoose-clicks-100k_train_tr.txt', 'yoochoose-clicks-100k_train_valid.txt'])
    assert len(data.interactions) == 53254 + 16539


def test_hm_sample_with_real_photos(shared):
    data = load('hm', shared / 'hm_fashion_images_sample')
    assert len(data.items) == 1000 and len(data.interactions) == 5000
    with_image = data.items.dropna(subset=['image'])
    assert len(with_image) == 100
    from PIL import Image
    for path in with_image.image.head(3):
        with Image.open(path) as im: assert im.size[1] == 1750
    assert data.items.item_id.str.len().eq(10).all()  # zero-padded article ids survive
