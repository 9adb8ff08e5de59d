"""Routed evaluation: exact metric sums over a split, the accuracy-compute curve, speedups.

The core is :func:`evaluate_routed` (the run's state, batches and a router in, numbers out); the
stages in :mod:`.stages` call it. Perplexities are exp(sum of token NLL / tokens), accumulated
in float64, so the numbers do not depend on batch boundaries' rounding. The speedups are those
of routed inference (:func:`eval_speedup`, for ``lego_ashem.evaluate_routed``) and of phase-2
training from the cache (:func:`phase2_speedups`, for ``lego_ashem.train_upper_layers``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
import torch.nn.functional as F

import stagewise
from stagewise.data.splits import size_of
from stagewise.engine.distributed import all_reduce_sums
from stagewise.loss import perplexity, token_nll
from stagewise_lego_ashem import metrics, mining, timing
from stagewise_lego_ashem.model import DeepSupervisionTransformer, deep_supervision
from stagewise_lego_ashem.routed import routed_forward, upper_forward
from stagewise_lego_ashem.router import (
    SCORE_ROWS,
    SOFTMAX_MEASURES,
    Confidence,
    ConfidenceOptions,
    Measure,
    confidence_from_logits,
)


def router_of(state: stagewise.State, measure: Measure | None = None) -> Confidence:
    """The router the run calibrated (measure, hard_ratio from the artifact; threshold from the model)."""
    # a run with no mine stage routes by [model] routing_threshold, with the router's defaults
    mined = mining.ROUTER in state.artifacts or mining.mined_before(state)  # then it must be there
    settings = mining.read_artifact(state, mining.ROUTER) if mined else {}
    defaults = ConfidenceOptions()
    router = Confidence(ConfidenceOptions(measure=measure or settings.get("measure", defaults.measure),
                                          hard_ratio=settings.get("hard_ratio", defaults.hard_ratio)))
    router.threshold = deep_supervision(state.model).threshold
    return router


@torch.no_grad()
def evaluate_routed(state: stagewise.State, batches: Iterable[dict[str, Any]], router: Confidence,
                    threshold: float | None = None, full: bool = False) -> dict[str, float]:
    """Routed metrics over ``batches``: ``routed_loss``, ``routed_ppl``, ``acc``, ``shallow_ratio``,
    ``compute_cost``, ``compute_cost_flops``; with ``full`` also the full-depth and exit-layer
    metrics and the hard tokens' perplexity before (exit layer) and after (routed)."""
    model = deep_supervision(state.model)
    threshold = router.threshold if threshold is None else threshold
    shape = metrics.Shape.of(model)
    sums: dict[str, float] = {}
    # evaluation at the run's precision; routed_forward scores the tokens in float32 (see Confidence.score)
    with stagewise.eval_mode(model), stagewise.autocast(state):
        for batch in batches:
            idx, target = batch["input"], batch["target"]
            out = routed_forward(model, idx, router, threshold, keep_exit_logits=full)
            easy = out["easy"]
            routed_nll = token_nll(out["logits"], target)
            _add(sums, n=target.numel(), easy=float(easy.sum()), nll=float(routed_nll.double().sum()),
                 correct=float((out["logits"].argmax(-1) == target).sum()),
                 flops=metrics.routed_flops(shape, easy, router.options.measure),
                 full_flops=metrics.full_depth_flops(shape, torch.ones_like(easy)))
            if full:
                _add(sums, **_full_depth_sums(model, idx, target, out, routed_nll))
    keys = _SUMS + (_FULL_SUMS if full else ())  # every rank sends every key, even with no batch of its own
    sums = dict(zip(keys, all_reduce_sums([sums.get(k, 0.0) for k in keys], state.dist), strict=True))
    return _summarize(sums, model.exit_layer, model.config.n_layer)


_SUMS = ("n", "easy", "nll", "correct", "flops", "full_flops")
_FULL_SUMS = ("full_nll", "full_correct", "exit_nll", "hard", "hard_before", "hard_after")


def _full_depth_sums(model: DeepSupervisionTransformer, idx: torch.Tensor, target: torch.Tensor, out: dict[str, Any],
                     routed_nll: torch.Tensor) -> dict[str, float]:
    """The ``_FULL_SUMS`` of one batch: the full-depth forward, the exit layer alone, and the
    tokens ``out`` routed hard before (exit layer) and after (routed, ``routed_nll``)."""
    exit_logits = out["exit_logits"]  # None with the probe: the full forward makes them
    deep = model(idx, exit_layers=[model.exit_layer] if exit_logits is None else [])
    logits = deep["logits"]
    if exit_logits is None:
        exit_logits = deep["exit_logits"][model.exit_layer]
    exit_nll, hard = token_nll(exit_logits, target), ~out["easy"]
    return {"full_nll": float(token_nll(logits, target).double().sum()),
            "full_correct": float((logits.argmax(-1) == target).sum()),
            "exit_nll": float(exit_nll.double().sum()), "hard": float(hard.sum()),
            "hard_before": float(exit_nll[hard].double().sum()),
            "hard_after": float(routed_nll[hard].double().sum())}


def _add(sums: dict[str, float], **values: float) -> None:
    for key, value in values.items():
        sums[key] = sums.get(key, 0.0) + value


def _summarize(s: dict[str, float], exit_layer: int, n_layer: int) -> dict[str, float]:
    n = s["n"]
    out = {"routed_loss": s["nll"] / n, "routed_ppl": perplexity(s["nll"] / n), "acc": s["correct"] / n,
           "shallow_ratio": s["easy"] / n,
           "compute_cost": metrics.seed_compute_cost(int(s["easy"]), int(n), exit_layer, n_layer),
           "compute_cost_flops": s["flops"] / s["full_flops"]}
    if "full_nll" in s:
        hard = s["hard"]
        out.update({"full_depth_ppl": perplexity(s["full_nll"] / n), "full_depth_acc": s["full_correct"] / n,
                    "exit_ppl": perplexity(s["exit_nll"] / n),
                    "hard_ppl_before": perplexity(s["hard_before"] / hard) if hard else math.nan,
                    "hard_ppl_after": perplexity(s["hard_after"] / hard) if hard else math.nan})
    return out


def routed_report(state: stagewise.State, options: Any) -> dict[str, Any]:
    """Everything ``lego_ashem.evaluate_routed`` reports (see its docstring)."""
    router = router_of(state)
    result = evaluate_routed(state, state.batches(options.split, desc=f"evaluate {options.split}"), router, full=True)
    # loss, ppl, acc: the names stagewise.evaluate reports, so a compare table lines them up with a baseline's
    report = {"loss": result["routed_loss"], "acc": result["acc"], "ppl": result["routed_ppl"],
              "threshold": router.threshold, **result}
    if options.measure_speed:
        dataset = state.data[options.split]
        idx = _inputs(dataset, range(min(options.speed_batch_size, size_of(dataset))), state.device)
        with stagewise.autocast(state):  # timed at the run's precision: what its routed inference costs
            report.update(eval_speedup(deep_supervision(state.model), router, idx, options.speed_repeats,
                                       rounds=lambda rounds: state.progress(rounds, desc="time full depth vs routed")))
    if options.curve_points:
        accuracy_compute_curve(state, options.split, router, options.curve_points)
    return report


def eval_speedup(model: DeepSupervisionTransformer, router: Confidence, idx: torch.Tensor, repeats: int,
                 rounds: timing.Rounds = timing.every_round) -> dict[str, float]:
    """Wall-clock full-depth forward over routed forward on the same batch idx (B, T), timed in
    interleaved rounds (median of ``repeats``; ``rounds`` wraps them, e.g. in a progress bar).
    With a softmax measure, also the confidence alone (``confidence_ms``) beside its share of the
    routed forward's counted FLOPs (``confidence_flops_share``): the exit softmax's exponentials
    cost far more time than FLOPs."""
    with stagewise.eval_mode(model), torch.no_grad():
        fns = {"full": lambda: model(idx)["logits"],
               "routed": lambda: routed_forward(model, idx, router, router.threshold)}
        if router.options.measure in SOFTMAX_MEASURES:
            fns["confidence"] = _confidence_alone(model, idx, router)
        seconds = timing.interleaved_seconds(fns, repeats, rounds)
        full, routed = seconds["full"], seconds["routed"]
        report = {"speedup_measured": full / routed, "batch_size": idx.size(0),
                  "full_depth_ms": 1e3 * full, "routed_ms": 1e3 * routed}
        if "confidence" in seconds:
            report.update(confidence_ms=1e3 * seconds["confidence"],
                          confidence_flops_share=_confidence_flops_share(model, idx, router))
    return report


def _confidence_alone(model: DeepSupervisionTransformer, idx: torch.Tensor, router: Confidence) -> Callable[[], Any]:
    """Softmax and max over the exit logits of idx (B, T), ``SCORE_ROWS`` tokens at a time as the
    routed forward scores them; the logits are computed once, outside the timed call, as the routed
    forward computes them (float32, whatever the run's precision)."""
    _, logits = router.score(model, model.exit_hidden(idx))
    exit_logits, measure = cast(torch.Tensor, logits).flatten(0, 1), router.options.measure  # (B*T, V)
    return lambda: [confidence_from_logits(exit_logits[start:start + SCORE_ROWS], measure)
                    for start in range(0, exit_logits.size(0), SCORE_ROWS)]


def _confidence_flops_share(model: DeepSupervisionTransformer, idx: torch.Tensor, router: Confidence) -> float:
    """Counted FLOPs of the confidence over all counted FLOPs of the routed forward on idx."""
    easy = routed_forward(model, idx, router, router.threshold)["easy"]
    shape = metrics.Shape.of(model)
    return easy.numel() * shape.confidence(router.options.measure) / metrics.routed_flops(
        shape, easy, router.options.measure)


def accuracy_compute_curve(state: stagewise.State, split: str, router: Confidence, points: int) -> list[dict]:
    """Routed accuracy, perplexity and cost at thresholds spread over the calibration quantiles;
    printed as a table, logged as a ``lego_ashem.curve`` record and drawn with ``[plots]``."""
    quantiles = mining.read_artifact(state, mining.ROUTER)["quantiles"]
    picks = sorted({round(i * (len(quantiles) - 1) / max(points - 1, 1)) for i in range(points)})
    rows = []
    for point, i in enumerate(picks, start=1):
        threshold = quantiles[i] if i < len(quantiles) - 1 else math.inf  # the top quantile: nobody exits
        r = evaluate_routed(state, state.batches(split, desc=f"curve point {point}/{len(picks)}"), router,
                            threshold=threshold)
        rows.append({"threshold": threshold, **{k: r[k] for k in
                     ("shallow_ratio", "acc", "routed_ppl", "compute_cost", "compute_cost_flops")}})
    state.log("lego_ashem.curve", split=split, points=rows)
    state.print(f"{state.stage_name}: accuracy vs compute on {split}, routed by {router.options.measure}\n"
                f"{_curve_table(rows)}")  # titled: a run may print the curves of several stages
    _plot_curve(state, split, router.options.measure, rows)
    return rows


def _plot_curve(state: stagewise.State, split: str, measure: str, rows: list[dict]) -> None:
    """Draw the curve's ``rows`` to ``plots/accuracy_compute_<checkpoint>.png``, the stage's checkpoint name."""
    if state.run_dir is None:  # a run without a directory keeps no plots
        return
    from stagewise.plots import line_plot

    # one file per stage: a second evaluation (e.g. routed by the probe) would overwrite the first's curve;
    # named by checkpoint, a safe file name everywhere (a stage's name need not be: "test: probe")
    checkpoint = state.recipe.stages[state.stage_index].checkpoint
    line_plot(state.run_dir.plot_path(f"accuracy_compute_{checkpoint}.png"),
              {f"routed by {measure}, threshold sweep":
               ([r["compute_cost_flops"] for r in rows], [r["acc"] for r in rows])},
              title=f"{state.recipe.run.name}: accuracy vs compute on {split} (stage {state.stage_name})",
              ylabel="accuracy",
              vlines=[(1.0, "full depth")],
              xlabel="compute_cost_flops: counted FLOPs relative to full depth (>1: routing costs more)")


def _curve_table(rows: list[dict]) -> str:
    head = f"{'threshold':>10}{'shallow':>9}{'acc':>8}{'ppl':>10}{'cost':>7}{'flops':>7}"
    lines = [head] + [f"{r['threshold']:>10.4g}{r['shallow_ratio']:>9.3f}{r['acc']:>8.4f}{r['routed_ppl']:>10.2f}"
                      f"{r['compute_cost']:>7.3f}{r['compute_cost_flops']:>7.3f}" for r in rows]
    return "\n".join(lines)


def _inputs(dataset: Any, windows: Iterable[int], device: torch.device) -> torch.Tensor:
    """The token ids (n, T) of the ``windows`` of ``dataset``, stacked on ``device``."""
    return torch.stack([dataset[i]["input"] for i in windows]).to(device)


def phase2_speedups(state: stagewise.State, cache: dict[str, Any], dataset: Any, repeats: int) -> dict[str, float]:
    """Measured and counted speedups of phase-2 training from the cache, on the first batch;
    ``dataset`` is the cached split's windows (``state.data[cache["split"]]``), whose token ids a
    full-forward step starts from.

    ``phase2_cache_speedup``: a full-forward step (embedding and frozen lower layers recomputed,
    then the same routed upper-layer step) over a step from the cache. With full context the
    upper layers still run for every position, so the saving is the lower layers' forward.
    ``phase2_token_mode_speedup``: a full-forward epoch over a token-mode epoch (the hard tokens
    alone, length 1), each estimated as its step time × its number of steps; those epoch times
    are ``phase2_cache_epoch_s``, ``phase2_full_forward_epoch_s`` and ``phase2_token_epoch_s``.
    """
    model, B = deep_supervision(state.model), state.recipe.data.batch_size
    windows, tokens = mining.SequenceCache(cache), mining.TokenCache(cache)  # what phase 2 trains on
    seconds = timing.train_step_seconds(model, _phase2_steps(model, dataset, windows, tokens, B, state.device),
                                        repeats, precision=lambda: stagewise.autocast(state))  # as phase 2 ran
    t_cache, t_full, t_token = seconds["cache"], seconds["full"], seconds["token"]
    shape = metrics.Shape.of(model)
    counted = metrics.phase2_step_flops(shape, cache["hard"][windows.windows[:B]])  # the timed batch's
    seq_steps, token_steps = math.ceil(len(windows) / B), math.ceil(len(tokens) / B)
    full_epoch = seq_steps * (counted["lower"] + counted["cache"])
    epoch_s = {"cache": t_cache * seq_steps, "full_forward": t_full * seq_steps, "token": t_token * token_steps}
    return {"phase2_cache_speedup": t_full / t_cache,
            "phase2_cache_speedup_flops": (counted["lower"] + counted["cache"]) / counted["cache"],
            "phase2_token_mode_speedup": epoch_s["full_forward"] / epoch_s["token"],
            "phase2_token_mode_speedup_flops": full_epoch / (token_steps * metrics.token_step_flops(shape, B)),
            "phase2_cache_step_ms": 1e3 * t_cache, "phase2_full_forward_step_ms": 1e3 * t_full,
            "phase2_token_step_ms": 1e3 * t_token, **{f"phase2_{k}_epoch_s": v for k, v in epoch_s.items()}}


def _phase2_steps(model: DeepSupervisionTransformer, dataset: Any, windows: mining.SequenceCache,
                  tokens: mining.TokenCache, B: int, device: torch.device) -> dict[str, Callable[[], torch.Tensor]]:
    """The losses of the phase-2 steps :func:`phase2_speedups` times, each on the first batch of its
    dataset: the cached windows from the cache (``"cache"``) or with their exit states recomputed
    from ``dataset`` (``"full"``), and the hard tokens alone (``"token"``)."""
    first, rows = windows.windows[:B], tokens.rows[:B]
    cache = windows.cache
    hidden, hard = cache["hidden"][first].to(device), cache["hard"][first].to(device)
    target = cache["target"][first].to(device)[hard]
    idx = _inputs(dataset, first.tolist(), device)  # (B, T)
    token_h, token_target = tokens.hidden[rows].unsqueeze(1).to(device), tokens.target[rows].to(device)  # (B, 1, C)
    forward, token_forward = upper_forward(model, "full"), upper_forward(model, "token")

    def from_cache() -> torch.Tensor:
        return F.cross_entropy(forward({"hidden": hidden, "hard": hard})["logits"], target)

    def full_forward() -> torch.Tensor:
        with torch.no_grad():
            h = model.exit_hidden(idx)  # what the cache saves
        return F.cross_entropy(forward({"hidden": h, "hard": hard})["logits"], target)

    def token_step() -> torch.Tensor:
        return F.cross_entropy(token_forward({"hidden": token_h})["logits"], token_target)

    return {"cache": from_cache, "full": full_forward, "token": token_step}
