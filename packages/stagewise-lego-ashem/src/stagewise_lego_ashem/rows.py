"""Per-batch results of a pass over a whole split, written into tensors allocated once.

Every batch of a pass over a split (mining, the probe's exit states) computes full-vocabulary
logits: a (B, T, V) buffer and its softmax temporaries, tens of MB allocated and freed per batch.
Holding each batch's small results until a final ``torch.cat`` pins glibc's heap between those
buffers: once one is freed, the dynamic mmap threshold rises, later buffers come from the heap
and their holes are never reused (the embedded default's 14 MB cache grew RSS by up to ~1.6 GB).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def collect_rows(parts: Iterable[dict[str, torch.Tensor]], n: int) -> dict[str, torch.Tensor]:
    """``{key: torch.cat(pieces)}`` of per-batch tensors (B_i, ...), bit for bit, but each batch is
    copied into an (n, ...) tensor allocated at the first batch (on its device) and then let go.

    ``n`` is the number of rows all batches hold together, e.g. ``len(state.data[split])``
    windows for ``state.batches(split, shard=False)``; ValueError when they hold another number.
    """
    out: dict[str, torch.Tensor] = {}
    start = 0
    for part in parts:
        if not out:
            out = {key: value.new_empty((n, *value.shape[1:])) for key, value in part.items()}
        stop = start + len(next(iter(part.values())))
        if stop > n:
            raise ValueError(f"the batches hold more than the {n} rows expected")
        for key, value in part.items():
            out[key][start:stop] = value
        start = stop
    if start != n:
        raise ValueError(f"the batches hold {start} rows, expected {n}")
    return out
