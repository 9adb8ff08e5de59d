"""Deterministic batches: the order of an epoch depends only on (seed, stage, epoch).

That makes a resumed run draw exactly the batches an uninterrupted one would: a run resumed
at batch ``start`` of an epoch skips the first ``start`` index lists without loading them.
Under ``torchrun`` each global batch is split across processes by rank, so the global batch
(and the averaged gradient) is the same as in one process.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from stagewise.data.batch import collate
from stagewise.data.splits import size_of

if TYPE_CHECKING:
    from stagewise.engine.state import State


def epoch_order(n: int, seed: int, stage_index: int, epoch: int) -> list[int]:
    """A permutation of range(n) fixed by the run seed, the stage and the epoch."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + stage_index * 10_007 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def batch_indices(n: int, batch_size: int, *, order: list[int] | None = None,
                  drop_last: bool = False, rank: int = 0, world: int = 1,
                  every_rank: bool = False) -> list[list[int]]:
    """Index lists of global batches, each cut to this rank's share.

    ``every_rank`` (training): a last global batch with fewer examples than processes is
    dropped, so every rank takes the same number of steps (DDP's all-reduce waits for all).
    In evaluation a rank may have no share of the last batch.
    """
    order = order if order is not None else list(range(n))
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if batches and len(batches[-1]) < _smallest_last_batch(batch_size, drop_last, world, every_rank):
        batches.pop()
    return [b[rank::world] for b in batches if b[rank::world]]


def _smallest_last_batch(batch_size: int, drop_last: bool, world: int, every_rank: bool) -> int:
    """The fewest examples a last, short global batch must hold to be kept; :func:`batch_indices`
    and :func:`count_batches` share it, so a stage's step count always matches its batches."""
    return batch_size if drop_last else world if every_rank else 1


def _batch_size(state: State, train: bool) -> int:
    spec = state.recipe.data
    return spec.batch_size if train else (spec.eval_batch_size or spec.batch_size)


def dataset_of(state: State, source: str | Dataset, indices: list[int] | None = None) -> Dataset:
    """A split by name, or any map-style dataset (e.g. a cache), cut to ``indices`` if given."""
    dataset = state.data[source] if isinstance(source, str) else source
    return Subset(dataset, indices) if indices is not None else dataset


def iterate_batches(state: State, source: str | Dataset, *, train: bool, epoch: int = 0, start: int = 0,
                    indices: list[int] | None = None, shard: bool = True) -> Iterator[dict[str, Any]]:
    """The batches of :meth:`State.batches <stagewise.State.batches>`, whose docstring says what each
    argument does; a resumed epoch starts at batch ``start`` without loading the ones before it."""
    spec = state.recipe.data
    dataset = dataset_of(state, source, indices)
    size = _batch_size(state, train)
    order = epoch_order(size_of(dataset), state.seed, state.stage_index, epoch) if train and spec.shuffle else None
    rank, world = (state.dist.rank, state.dist.world_size) if shard else (0, 1)
    index_lists = batch_indices(size_of(dataset), size, order=order, drop_last=train and spec.drop_last,
                                rank=rank, world=world, every_rank=train)
    batches: Iterable[Any]
    if spec.num_workers:
        batches = DataLoader(dataset, batch_sampler=index_lists[start:], collate_fn=collate,
                             num_workers=spec.num_workers)
    else:
        batches = in_process_batches(dataset, index_lists[start:])
    for batch in batches:
        yield to_device(batch, state.device)


def in_process_batches(dataset: Dataset, index_lists: list[list[int]]) -> Iterator[Any]:
    """What a ``DataLoader`` without workers yields for these index lists, bit for bit, without
    its per-batch bookkeeping (profiler record, sampler and fetcher calls): a fixed cost that a
    small model's step pays at every step. Like the DataLoader's iterator it draws one number
    from torch's global RNG as it starts (its workers' seed), so the draws after it (dropout, a
    stage's own sampling) stay those of a run that loads through a DataLoader."""
    torch.empty((), dtype=torch.int64).random_()
    getitems = getattr(dataset, "__getitems__", None)  # e.g. Subset's: the DataLoader prefers it too
    for indices in index_lists:
        yield collate(getitems(indices) if getitems else [dataset[i] for i in indices])


def count_batches(state: State, source: str | Dataset, *, train: bool, indices: list[int] | None = None,
                  shard: bool = True) -> int:
    """How many batches :func:`iterate_batches` yields on the main process with these arguments
    (and ``start = 0``)."""
    world = state.dist.world_size if shard else 1
    return batch_count(size_of(dataset_of(state, source, indices)), _batch_size(state, train),
                       drop_last=train and state.recipe.data.drop_last, world=world, every_rank=train)


def batch_count(n: int, batch_size: int, *, drop_last: bool = False, world: int = 1, every_rank: bool = False) -> int:
    """How many batches :func:`batch_indices` makes of ``n`` examples with these arguments."""
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= _smallest_last_batch(batch_size, drop_last, world, every_rank) else 0)


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
