"""Library functions that must be repeatable seed their own random state: calling them leaves the caller's torch RNG
exactly where it was (and gives the same result every time)."""
import pytest
import torch

from tpad.artifacts import isolated_rng


def leaves_rng_alone(call):
    "Run `call()` between two snapshots of torch's global RNG; True if the state is unchanged. Returns (unchanged, result)."
    torch.manual_seed(123)
    before = torch.get_rng_state().clone()
    result = call()
    return torch.equal(before, torch.get_rng_state()), result


def test_isolated_rng_restores_the_callers_state():
    def draw():
        with isolated_rng(7): return torch.rand(4)
    unchanged, inside = leaves_rng_alone(draw)
    assert unchanged
    torch.manual_seed(7)
    assert torch.equal(inside, torch.rand(4))


@pytest.fixture(scope='module')
def tiny_mllm():
    from tpad.mllm import MLLMConfig, add_adapters, load_mllm
    config = MLLMConfig()
    model, processor = load_mllm(config, texts=['a tiny corpus for the tokenizer'])
    return add_adapters(model, config), processor


def test_building_the_tiny_mllm_leaves_the_rng_alone(tmp_path, monkeypatch):
    from tpad.mllm import MLLMConfig, load_mllm
    monkeypatch.setenv('TPAD_CACHE', str(tmp_path))  # a fresh cache: the model is built from its config, not read back
    unchanged, (model, _) = leaves_rng_alone(lambda: load_mllm(MLLMConfig(), texts=['a corpus']))
    assert unchanged
    again, _ = load_mllm(MLLMConfig(), texts=['another corpus'])
    assert next(model.parameters()).shape == next(again.parameters()).shape


def test_alignment_heads_and_metrics_leave_the_rng_alone(tiny_mllm):
    from tpad.align import AlignModel, alignment_metrics, tiny_align_config
    from tpad.mllm import hidden_size
    model, _ = tiny_mllm
    h_T = torch.randn(12, hidden_size(model))
    config = tiny_align_config()
    unchanged, aligner = leaves_rng_alone(lambda: AlignModel(model, h_T, config))
    assert unchanged
    assert torch.equal(AlignModel(model, h_T, config).f_sh[1].weight, aligner.f_sh[1].weight)  # seeded: the same heads
    z_sh, t, z_sp = torch.randn(40, 8), torch.randn(40, 8), torch.randn(40, 8)
    unchanged, first = leaves_rng_alone(lambda: alignment_metrics(z_sh, t, z_sp, cap=30, club_steps=3))
    assert unchanged
    assert first == alignment_metrics(z_sh, t, z_sp, cap=30, club_steps=3)


def test_the_recommender_and_its_training_leave_the_rng_alone(tmp_path):
    from tpad.data import load
    from tpad.msbr import MSBR, FitConfig, MSBRConfig, fit
    from tpad.preprocess import preprocess
    from tpad.toyshop import toyshop_path
    prepared = preprocess(load('csv', toyshop_path()), min_item_support=2)
    model = MSBR(prepared.n_items, MSBRConfig())  # an nn.Module: its initial weights come from the caller's RNG, as in torch
    config = FitConfig(epochs=1, max_train_samples=300)
    unchanged, result = leaves_rng_alone(lambda: fit(model, prepared, config))
    assert unchanged
    assert result is not None


def test_train_leaves_the_global_rng_alone():
    import random
    import numpy as np
    from torch import nn
    from torch.utils.data import TensorDataset
    from tpad.train import TrainConfig, train
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    data = TensorDataset(x, x.sum(1))
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 1))  # dropout: draws inside train
    loss_fn = lambda m, b: nn.functional.mse_loss(m(b[0]).squeeze(-1), b[1])
    random.seed(5); np.random.seed(5)
    py_before, np_before = random.getstate(), np.random.get_state()
    call = lambda: train(model, data, None, loss_fn, TrainConfig(batch_size=8, max_steps=3, seed=1), out_dir='',
                         progress=False)  # out_dir='': nothing written
    unchanged, result = leaves_rng_alone(call)
    assert unchanged
    assert random.getstate() == py_before
    np_after = np.random.get_state()
    assert np_after[0] == np_before[0] and np.array_equal(np_after[1], np_before[1]) and np_after[2:] == np_before[2:]
    assert result.step == 3


def test_the_run_plan_probe_leaves_the_rng_alone():
    from tpad.data import load
    from tpad.experiment import make_config, plan_rows
    from tpad.preprocess import preprocess
    from tpad.toyshop import toyshop_path
    config = make_config('toyshop-smoke')
    prepared = preprocess(load('csv', toyshop_path()), config.preprocess)
    unchanged, plan = leaves_rng_alone(lambda: plan_rows(config, prepared, ['srgnn', 'msbr_knowledge'], n_seeds=1))
    assert unchanged
    assert list(plan.row) == ['srgnn', 'msbr_knowledge'] and (plan.seconds_per_seed > 0).all()
