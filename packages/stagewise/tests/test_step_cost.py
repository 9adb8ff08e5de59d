"""A training step's fixed costs: what is worked out once instead of at every step, and the
per-call wrappers a step goes without, each giving the same numbers (the golden records hold
those; the equivalences are checked here)."""

from __future__ import annotations

import sys

import pytest
import torch
from torch.utils.data import DataLoader, Subset, default_collate

import stagewise
from stagewise import plugins
from stagewise.engine import batches
from stagewise.engine.runner import run_recipe
from stagewise.engine.state import event_hookimpls
from stagewise.events import Event

OPTIMIZERS = {"adamw": {"betas": [0.9, 0.999], "weight_decay": 0.01},
              "sgd": {"momentum": 0.9, "weight_decay": 0.01}}


def _options(optimizer):
    from types import SimpleNamespace

    return SimpleNamespace(optimizer=optimizer, lr=0.1, **OPTIMIZERS[optimizer])


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_adamw_and_sgd_take_the_multi_tensor_path(optimizer):
    from stagewise.engine.optim import build_optimizer

    group = build_optimizer([torch.nn.Parameter(torch.zeros(2))], _options(optimizer)).param_groups[0]
    assert group["foreach"] is True


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_the_multi_tensor_path_steps_bit_for_bit_as_the_per_parameter_one(optimizer):
    # what makes taking it a speed-up only: a torch whose two paths part ways fails here
    from stagewise.engine.optim import build_optimizer

    torch.manual_seed(0)
    start = [torch.randn(3, 5), torch.randn(5), torch.randn(7, 3)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(6)]
    stepped = []
    for foreach in (True, False):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = build_optimizer(params, _options(optimizer))
        opt.param_groups[0]["foreach"] = foreach
        for step in grads:
            for p, g in zip(params, step, strict=True):
                p.grad = g.clone()
            opt.step()
        stepped.append(params)
    assert all(torch.equal(a, b) for a, b in zip(*stepped, strict=True))


@pytest.mark.parametrize("optimizer", ["adamw", "lbfgs"])
def test_a_step_clears_the_gradients_without_the_optimizers_zero_grad(tiny, tmp_path, monkeypatch, optimizer):
    # zero_grad's dynamo guard and profiler record cost a small model's step ~15 µs for setting .grad = None
    calls = []
    zero_grad = torch.optim.Optimizer.zero_grad
    monkeypatch.setattr(torch.optim.Optimizer, "zero_grad",
                        lambda self, *a, **k: calls.append(1) or zero_grad(self, *a, **k))
    recipe = tiny("stages.phase1.max_epochs=1", "stages.phase2.max_epochs=1",
                  f'stages.phase2.optimizer="{optimizer}"')  # phase2: phase1 clips gradients, which L-BFGS refuses
    run_recipe(recipe, out=tmp_path / "run", quiet=True)
    assert calls == []


class AfterStep:
    @stagewise.hookimpl
    def stagewise_after_step(self, state, loss):
        pass


def test_event_hooks_are_put_in_order_once_not_at_every_step(tiny, tmp_path, monkeypatch):
    pm = plugins.plugin_manager()
    orderings = []
    list_name_plugin = pm.list_name_plugin
    monkeypatch.setattr(pm, "list_name_plugin", lambda: orderings.append(1) or list_name_plugin())
    plugins.register_plugin(AfterStep(), "after-step")
    try:
        run_recipe(tiny("stages.phase1.max_epochs=1", "stages.phase2.max_epochs=1"), out=tmp_path / "run",
                   quiet=True)
    finally:
        plugins.unregister_plugin("after-step")
    # 10 steps fire AFTER_STEP; each event's hook with implementations is ordered once
    assert 0 < len(orderings) <= len(Event)


def test_the_call_order_follows_a_plugin_registered_later():
    before = [i.plugin_name for i in event_hookimpls(Event.AFTER_STEP)]
    plugins.register_plugin(AfterStep(), "after-step")
    try:
        during = [i.plugin_name for i in event_hookimpls(Event.AFTER_STEP)]
    finally:
        plugins.unregister_plugin("after-step")
    assert during == ["after-step", *before]  # "after" hooks: the last registered first
    assert [i.plugin_name for i in event_hookimpls(Event.AFTER_STEP)] == before


@pytest.mark.parametrize("shown", [False, True])
def test_the_progress_bar_gets_the_loss_only_when_it_is_shown(tiny, tmp_path, monkeypatch, shown):
    from tqdm import tqdm

    postfixes = []
    set_postfix = tqdm.set_postfix
    monkeypatch.setattr(tqdm, "set_postfix", lambda self, *a, **k: postfixes.append(k) or set_postfix(self, *a, **k))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: shown)
    run_recipe(tiny("stages.phase1.max_epochs=1", "stages.phase2.max_epochs=1"), out=tmp_path / "run", quiet=False)
    assert len(postfixes) == (10 if shown else 0)
    assert all(set(k) == {"loss", "refresh"} for k in postfixes)


class Items(torch.utils.data.Dataset):
    """Map-style items of two tensors; ``__getitems__`` only on request (a DataLoader prefers it)."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"input": torch.tensor([i, i + 1]), "target": torch.tensor(float(i))}


@pytest.mark.parametrize("dataset", [Items(11), Subset(Items(20), list(range(3, 14))),
                                     [{"input": torch.tensor([i])} for i in range(11)]],
                         ids=["getitem", "getitems", "list"])
def test_batches_without_workers_are_the_dataloaders_bit_for_bit(dataset):
    index_lists = [[3, 1, 4], [0, 10, 9], [2, 6]]
    torch.manual_seed(5)
    expected = list(DataLoader(dataset, batch_sampler=index_lists, collate_fn=default_collate, num_workers=0))
    expected_rng = torch.get_rng_state()
    torch.manual_seed(5)
    got = list(batches.in_process_batches(dataset, index_lists))
    assert torch.equal(torch.get_rng_state(), expected_rng)  # later draws (dropout) stay where they were
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_batches_without_workers_build_no_dataloader(monkeypatch):
    from types import SimpleNamespace

    from stagewise.engine.distributed import DistInfo

    def refused(*args, **kwargs):
        raise AssertionError("a DataLoader was built for num_workers = 0")

    monkeypatch.setattr(batches, "DataLoader", refused)
    data = SimpleNamespace(batch_size=4, eval_batch_size=None, shuffle=True, drop_last=False, num_workers=0)
    state = SimpleNamespace(recipe=SimpleNamespace(data=data), data={"train": Items(10)}, seed=0, stage_index=0,
                            dist=DistInfo(0, 1, 0), device=torch.device("cpu"))
    assert len(list(batches.iterate_batches(state, "train", train=True))) == 3


def _tensor_datasets():
    from stagewise.data import ArrayDataset, LMWindows

    g = torch.Generator().manual_seed(0)
    pixels, labels = torch.randint(0, 256, (12, 2, 3), dtype=torch.uint8, generator=g), torch.arange(12)
    return {"arrays": ArrayDataset(torch.randn(12, 3, generator=g), labels),
            "scaled": ArrayDataset(pixels, labels, scale=0.37),
            "windows": LMWindows(torch.randint(0, 50, (40,), dtype=torch.int32, generator=g), 3),
            "subset": Subset(ArrayDataset(pixels, labels, scale=0.37), [5, 0, 7, 2, 9, 11, 3, 1, 4, 10])}


@pytest.mark.parametrize("name", ["arrays", "scaled", "windows", "subset"])
@pytest.mark.parametrize("workers", [0, 1])
def test_a_batch_a_dataset_collates_itself_is_the_one_its_items_make(name, workers):
    # was: the batch was gathered, cut into items and stacked again: about 0.9 ms a batch of 256, as long as a
    # small MLP's step; the engine now takes it as it is
    dataset = _tensor_datasets()[name]
    index_lists = [[3, 1, 4], [0, 9, 8], [2, 6]]
    if workers:
        got = list(DataLoader(dataset, batch_sampler=index_lists, collate_fn=stagewise.data.collate, num_workers=1))
    else:
        got = list(batches.in_process_batches(dataset, index_lists))
    for batch, indices in zip(got, index_lists, strict=True):
        expected = default_collate([dataset[i] for i in indices])
        assert batch.keys() == expected.keys()
        assert all(torch.equal(batch[k], expected[k]) and batch[k].dtype == expected[k].dtype
                   and batch[k].is_contiguous() for k in batch)
