"""Per-token hard-example mining and the cache of exit-layer hidden states.

Mining is per token, never per sequence: the seed's central lesson (mining whole sequences
that hold one hard token marked ~100% of the data hard and undid Phase 2). The cache holds the
exit-layer hidden states of a whole split once, so Phase 2 never recomputes the frozen lower
layers: ``context = "full"`` trains on cached full sequences (loss on hard tokens only),
``context = "token"`` on the hard tokens alone as length-1 sequences (the seed's way).

Also the two artifacts later stages read (``CACHE``, ``ROUTER``) and what ``lego_ashem.mine`` and
``lego_ashem.train_exit_probe`` both do with the router they calibrate: :func:`calibrate_router`
(the model's threshold, the router ``stagewise export`` writes) and :func:`router_record` (the
``ROUTER`` artifact).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, get_args

import torch
from torch.utils.data import Dataset

import stagewise
from stagewise.data import Batch
from stagewise.data.splits import size_of
from stagewise.engine.resumable import kind, tensors_problems
from stagewise.engine.resume import refuse_damaged
from stagewise.loss import token_nll
from stagewise_lego_ashem.model import DeepSupervisionTransformer, deep_supervision
from stagewise_lego_ashem.router import Confidence, Measure
from stagewise_lego_ashem.rows import collect_rows

CACHE = "lego_ashem.cache"  # artifact: {"split", "exit_layer", "hidden", "target", "hard"}
ROUTER = "lego_ashem.router"  # artifact: {"measure", "hard_ratio", "threshold", "calib_split", "quantiles"}


@torch.no_grad()
def exit_scores(model: DeepSupervisionTransformer, batches: Iterable[dict[str, Any]], router: Confidence, *,
                windows: int) -> torch.Tensor:
    """Exit-layer confidences (N, T) of the ``windows`` windows of ``batches``: all that calibration reads."""
    with stagewise.eval_mode(model):
        scores = ({"scores": router.score(model, model.exit_hidden(batch["input"]))[0].cpu()} for batch in batches)
        return collect_rows(scores, windows)["scores"]


@torch.no_grad()
def exit_states(model: DeepSupervisionTransformer, batches: Iterable[dict[str, Any]], router: Confidence, *,
                windows: int) -> dict[str, torch.Tensor]:
    """Exit-layer hidden states, confidences and targets of the ``windows`` windows of ``batches``.

    Returns ``{"hidden": (N, T, C), "scores": (N, T), "target": (N, T), "nll": (N, T)}``; ``nll``
    is the exit layer's per-token loss (NaN with the probe, which computes no exit logits).
    """
    with stagewise.eval_mode(model):
        return collect_rows((_exit_state(model, batch, router) for batch in batches), windows)


def _exit_state(model: DeepSupervisionTransformer, batch: dict[str, Any],
                router: Confidence) -> dict[str, torch.Tensor]:
    h = model.exit_hidden(batch["input"])  # (B, T, C)
    scores, logits = router.score(model, h)
    target = batch["target"]
    nll = torch.full(target.shape, float("nan")) if logits is None else token_nll(logits, target)
    return {"hidden": h.cpu(), "scores": scores.cpu(), "target": target.cpu(), "nll": nll.cpu()}


CURVE_QUANTILES = 21  # calibration quantiles kept with the router: the curve picks its points among them


def score_quantiles(scores: torch.Tensor, points: int = CURVE_QUANTILES) -> list[float]:
    """Evenly spaced quantiles (0, 1/(points-1), ..., 1) of the calibration confidences: the
    thresholds of the accuracy-compute curve, kept with the router so evaluation needs no rerun."""
    qs = torch.linspace(0, 1, points, dtype=torch.float64, device=scores.device)
    return [float(v) for v in torch.quantile(scores.flatten().double(), qs)]


def calibrate_router(state: stagewise.State, router: Confidence, scores: torch.Tensor) -> None:
    """Calibrate ``router`` on ``scores``, then hand it on: the threshold to the model's
    ``routing_threshold`` (checkpointed with the weights), the router to ``stagewise export``."""
    threshold = router.calibrate(scores)["threshold"]  # also router.threshold
    deep_supervision(state.model).set_threshold(threshold)
    state.keep_router(ROUTER, router)  # a later calibration (train_exit_probe) replaces mine's


def router_record(settings: dict[str, Any], router: Confidence, calib_split: str,
                  scores: torch.Tensor) -> dict[str, Any]:
    """The ``ROUTER`` artifact: the router's ``settings`` (measure, hard_ratio), then what its
    calibration on ``calib_split`` gave: the threshold and the ``scores``' quantiles for the curve."""
    return {**settings, "threshold": router.threshold, "calib_split": calib_split,
            "quantiles": score_quantiles(scores)}


def read_artifact(state: stagewise.State, name: str) -> Any:
    """The artifact ``name`` (``CACHE`` or ``ROUTER``) as a later stage reads it. In a resumed run it
    came from last.pt, which may hold anything there: refused naming its key path unless it is what
    ``mine`` writes (a run that was not resumed wrote it itself)."""
    if state.resumed_from is None:
        return state.artifacts[name]
    if name not in state.artifacts:
        problems = [f"artifacts: lacks {name}, which an earlier lego_ashem.mine stage writes"]
    else:
        check = _cache_problems if name == CACHE else _router_problems
        problems = check(state.artifacts[name], state, f"artifacts.{name}")
    refuse_damaged(problems, state.resumed_from, state.recipe)
    return state.artifacts[name]


def mined_before(state: stagewise.State) -> bool:
    """Whether a ``lego_ashem.mine`` stage comes before the current one (so the ``ROUTER`` artifact must exist)."""
    return any(spec.use == "lego_ashem.mine" for spec in state.recipe.stages[:state.stage_index])


def _cache_problems(cache: Any, state: stagewise.State, where: str) -> list[str]:
    """The cache must be as ``mine`` writes it for this run: the hidden states (N, T, C) of a split's
    windows at this model's exit layer, in its dtype and finite; targets in the vocabulary; a bool hard mask."""
    tensors = ("hidden", "target", "hard")
    if not isinstance(cache, dict) or cache.keys() != {"split", "exit_layer", *tensors}:
        return [f"{where}: {kind(cache)}, expected a table of split, exit_layer, {', '.join(tensors)}"]
    model, split = deep_supervision(state.model), cache["split"]
    if not (isinstance(split, str) and split in state.data.names()):
        return [f"{where}.split: {split!r} is no split of this run's data ({', '.join(state.data.names())})"]
    problems = [] if type(cache["exit_layer"]) is int and cache["exit_layer"] == model.exit_layer else [
        f"{where}.exit_layer: {cache['exit_layer']!r}, expected the model's exit layer {model.exit_layer}"]
    example = state.data.example(split)  # None for an empty split: mine cached no window of it
    windows = (size_of(state.data[split]), len(example["input"]) if example else 0)
    dtype = next(model.parameters()).dtype
    expected = {"hidden": torch.empty(*windows, model.config.n_embd, dtype=dtype, device="meta"),
                "target": torch.empty(windows, dtype=torch.int64, device="meta"),
                "hard": torch.empty(windows, dtype=torch.bool, device="meta")}
    problems += tensors_problems({k: cache[k] for k in tensors}, expected, where)
    if problems:
        return problems
    if not bool(torch.isfinite(cache["hidden"]).all()):
        problems.append(f"{where}.hidden: holds values that are not finite")
    target, vocab = cache["target"], model.config.vocab_size
    if target.numel() and not 0 <= int(target.min()) <= int(target.max()) < vocab:
        problems.append(f"{where}.target: holds ids outside the vocabulary 0..{vocab - 1}")
    return problems


def _router_problems(record: Any, state: stagewise.State, where: str) -> list[str]:
    """What later stages read of the ``ROUTER`` record: measure, hard_ratio and the calibration quantiles."""
    if not isinstance(record, dict) or not all(k in record for k in ("measure", "hard_ratio", "quantiles")):
        return [f"{where}: {kind(record)}, expected a table of measure, hard_ratio, threshold, calib_split, "
                f"quantiles"]
    problems = []
    if record["measure"] not in get_args(Measure):
        problems.append(f"{where}.measure: {record['measure']!r}, expected one of {', '.join(get_args(Measure))}")
    ratio = record["hard_ratio"]
    if not (type(ratio) in (int, float) and 0 < ratio < 1):
        problems.append(f"{where}.hard_ratio: {ratio!r}, expected a number strictly between 0 and 1")
    quantiles = record["quantiles"]
    if not (isinstance(quantiles, list) and len(quantiles) == CURVE_QUANTILES
            and all(type(q) is float and math.isfinite(q) for q in quantiles) and quantiles == sorted(quantiles)):
        problems.append(f"{where}.quantiles: expected {CURVE_QUANTILES} finite numbers in ascending order (the "
                        f"calibration confidences' quantiles)")
    if deep_supervision(state.model).threshold is None:  # NaN: never calibrated, yet the record says mine calibrated it
        problems.append("model.routing_threshold: not set (NaN), but the lego_ashem.mine stage before this one "
                        "calibrated it")
    return problems


class SequenceCache(Dataset):
    """Cached full windows that hold a hard token (the others carry no loss): item i is
    ``{"hidden": (T, C), "target": (T,), "hard": (T,) bool}``; ``windows`` are their indices
    into the cached split. Items are views of the cache: phase 2 holds the hidden states once."""

    def __init__(self, cache: dict[str, Any]):
        self.cache = cache
        self.windows = cache["hard"].any(1).nonzero().squeeze(1)  # (n,): the windows holding a hard token

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        window = int(self.windows[i])
        return {k: self.cache[k][window] for k in ("hidden", "target", "hard")}

    def __getitems__(self, indices: list[int]) -> Batch:
        """The batch of these items, collated, from one gather per tensor."""
        windows = self.windows[indices]
        return Batch({k: self.cache[k][windows] for k in ("hidden", "target", "hard")})


class TokenCache(Dataset):
    """The hard tokens alone: item j is ``{"hidden": (1, C), "target": ()}`` (the seed's loader),
    in row-major order of (window, position). Items are views of the cache, as in :class:`SequenceCache`."""

    def __init__(self, cache: dict[str, Any]):
        self.hidden = cache["hidden"].flatten(0, 1)  # (N*T, C): a view of the contiguous cache
        self.target = cache["target"].flatten()  # (N*T,)
        self.rows = cache["hard"].flatten().nonzero().squeeze(1)  # (n_hard,): the hard rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, j: int) -> dict[str, torch.Tensor]:
        row = int(self.rows[j])
        return {"hidden": self.hidden[row].unsqueeze(0), "target": self.target[row]}

    def __getitems__(self, indices: list[int]) -> Batch:
        """The batch of these items, collated, from one gather per tensor: a batch's loading (the phase-2
        token mode's 32 rows) costs a few tensor operations, not a few per row."""
        rows = self.rows[indices]
        return Batch(hidden=self.hidden[rows].unsqueeze(1), target=self.target[rows])
