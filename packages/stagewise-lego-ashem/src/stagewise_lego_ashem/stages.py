"""The ASHEM stages: mine hard tokens, train the upper block from the cache, evaluate routed.

``lego_ashem.mine`` calibrates the router and caches exit-layer hidden states; it hands two
artifacts to later stages (``lego_ashem.router``, ``lego_ashem.cache``, see :mod:`.mining`).
``lego_ashem.train_upper_layers`` is ``stagewise.train`` fed from that cache.
``lego_ashem.train_exit_probe`` fits the learned exit classifier; ``lego_ashem.evaluate_routed``
reports routed metrics on a held-out split. Every stage checks the recipe before anything runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, Literal, cast

import torch

import stagewise
from stagewise.builtins.train import TrainOptions, lr_limit_check
from stagewise.data.splits import size_of
from stagewise.engine.batches import count_batches
from stagewise.engine.params import parameter_names_at
from stagewise.loss import perplexity, token_nll
from stagewise.schema import as_table
from stagewise.specs import RouterSpec, term_paths
from stagewise.stage import leak_problems, warn_not_held_out
from stagewise_lego_ashem import mining, probe
from stagewise_lego_ashem.evaluation import evaluate_routed, phase2_speedups, routed_report, router_of
from stagewise_lego_ashem.model import DeepSupervisionOptions, DeepSupervisionTransformer, deep_supervision
from stagewise_lego_ashem.routed import upper_forward
from stagewise_lego_ashem.router import Confidence
from stagewise_lego_ashem.rows import collect_rows
from stagewise_lego_ashem.timing import TIMING_METRICS

if TYPE_CHECKING:
    from stagewise.data.splits import DataSplits
    from stagewise.recipe import Recipe

MODEL = DeepSupervisionTransformer.name


# --- lego_ashem.mine -------------------------------------------------------------------------


@dataclass
class MineOptions:
    router: RouterSpec  # e.g. { use = "lego_ashem.confidence", hard_ratio = 0.5 }
    calib_split: str = "valid"  # the threshold is the hard_ratio quantile of this split's confidences
    split: str = "train"  # mined per token and cached; phase 2 trains on it. Evaluate elsewhere


class Mine(stagewise.Stage):
    """Calibrate the router on ``calib_split``, set the model's ``routing_threshold``, and cache
    the exit-layer hidden states of ``split`` with a per-token hard mask. Trains nothing.

    Reports ``<stage>/threshold``, ``calib_hard_ratio``, ``hard_ratio`` (on ``split``),
    ``hard_tokens``, ``tokens``, ``hard_ppl`` (the exit layer's perplexity on the mined hard
    tokens: the seed's "Phase 1 Hard PPL") and ``mean_hard_confidence``.
    """

    name = "lego_ashem.mine"
    Options = MineOptions

    def fits_on(self) -> list[tuple[str, str]]:
        o = self.options
        return [(o.calib_split, "calibrated the threshold"), (o.split, "mined the phase-2 cache")]

    def check(self, recipe: Recipe, index: int, data: DataSplits) -> list[str]:
        problems = super().check(recipe, index, data) + _model_problems(recipe, index, self.name)
        where = recipe.stage_path(index)
        problems += _calib_split_problems(self.options.calib_split, where)
        if self.options.router.use != Confidence.name:
            problems.append(f"{where}.router.use: {self.name} calibrates a lego_ashem.confidence "
                            f"router, got {self.options.router.use!r}")
        elif self.options.router.options.measure == "probe":
            problems.append(f"{where}.router.measure: mine with a softmax measure; the probe is "
                            f"trained later by lego_ashem.train_exit_probe")
        return problems

    def run(self, state: stagewise.State) -> dict[str, Any]:
        o, model = self.options, deep_supervision(state.model)
        router = o.router.component()(o.router.options)
        # every process reads the whole splits: the threshold and the cache must be alike on all ranks.
        # The exit states at the run's precision, as routing and phase 2's full forward compute them (the
        # confidences are float32 whatever it is: Confidence.score), so a token routes as it was calibrated
        with stagewise.autocast(state):
            calib = mining.exit_scores(model, state.batches(o.calib_split, shard=False,
                                                            desc=f"calibrate on {o.calib_split}"), router,
                                       windows=size_of(state.data[o.calib_split]))
            mined = mining.exit_states(model, state.batches(o.split, shard=False, desc=f"cache {o.split}"), router,
                                       windows=size_of(state.data[o.split]))
        mining.calibrate_router(state, router, calib)
        calib_hard = router.route(calib).ratio("hard")
        hard = router.route(mined["scores"]).masks["hard"]  # (N, T): per token, never per sequence
        state.artifacts[mining.CACHE] = {"split": o.split, "exit_layer": model.exit_layer,
                                         "hidden": mined["hidden"], "target": mined["target"], "hard": hard}
        state.artifacts[mining.ROUTER] = mining.router_record(as_table(o.router.options), router, o.calib_split, calib)
        n_hard = int(hard.sum())
        return {f"{self.label}/{k}": v for k, v in {
            "threshold": router.threshold, "calib_hard_ratio": calib_hard,
            "hard_ratio": n_hard / hard.numel(), "hard_tokens": n_hard, "tokens": hard.numel(),
            "hard_ppl": _ppl(mined["nll"][hard]),
            "mean_hard_confidence": float(mined["scores"][hard].double().mean()),
        }.items()}


def _ppl(nll: torch.Tensor) -> float:
    """Perplexity of per-token losses (exp of their float64 mean)."""
    return perplexity(float(nll.double().mean()))


# --- lego_ashem.train_upper_layers -----------------------------------------------------------


@dataclass
class TrainUpperOptions(TrainOptions):
    """Every key of ``stagewise.train``, plus:"""

    # full: cached windows, upper layers see the whole context (easy positions as keys/values
    # from their exit state, as in routed inference), loss on hard tokens only.
    # token: the hard tokens alone as length-1 sequences (the seed's train_upper_layers)
    context: Literal["full", "token"] = "full"
    measure_speed: bool = True  # time cached vs full-forward phase-2 steps (wall clock) at the end
    speed_repeats: int = 5  # timed steps per variant (median of interleaved rounds)

    def checks(self) -> list[tuple[bool, str | tuple[str, ...], str]]:
        return [*super().checks(),
                (self.speed_repeats >= 1, "speed_repeats", f"must be >= 1, got {self.speed_repeats}")]


class TrainUpperLayers(stagewise.TrainStage):
    """Train the blocks above the exit layer from the hidden states ``lego_ashem.mine`` cached:
    the frozen lower layers are never recomputed. Evaluates the routed model on ``eval_split``
    each epoch (``val/loss``, ``val/ppl``, ``val/acc``, ``val/shallow_ratio``); in token mode also
    ``val/mined_hard_ppl``, the perplexity on the cached training tokens (the seed's "Hard PPL").

    With ``measure_speed``: ``<stage>/phase2_cache_speedup`` (a full-forward step over the
    time of a step from the cache, same windows), ``<stage>/phase2_token_mode_speedup`` (a
    full-forward epoch over a token-mode epoch), each with its ``..._flops`` count, and the step
    times ``phase2_cache_step_ms``, ``phase2_full_forward_step_ms``, ``phase2_token_step_ms``.
    Raises ConfigError before the run when no ``lego_ashem.mine`` stage comes first, no layer
    lies above the exit, the exit layer moved since ``mine`` or a loss term needs more than the
    final logits; at run time when the cache holds no hard token.
    """

    name = "lego_ashem.train_upper_layers"
    Options = TrainUpperOptions
    measured = TIMING_METRICS  # wall clock: summary.json marks them, verify leaves them out

    def __init__(self, options: TrainUpperOptions | None = None, label: str | None = None):
        super().__init__(options, label)
        self._data: mining.SequenceCache | mining.TokenCache | None = None  # the cache as a dataset, built on first use

    def check(self, recipe: Recipe, index: int, data: DataSplits) -> list[str]:
        problems = super().check(recipe, index, data) + _model_problems(recipe, index, self.name)
        mine, where = _last_earlier(recipe, index, Mine.name), recipe.stage_path(index)
        if mine is None:
            problems.append(f"{where}: {self.name} trains from the cache of hidden "
                            f"states that lego_ashem.mine writes; add a lego_ashem.mine stage before it")
        if mine is None or recipe.model.use != MODEL:
            return problems
        options, mined = recipe.model_options_at(index), recipe.model_options_at(mine)
        if options.exit_layer >= options.n_layer:
            problems.append(f"{where}: no layer above exit_layer {options.exit_layer} "
                            f"(n_layer {options.n_layer}); grow the model first, e.g. grow = {{ n_layer = "
                            f"{2 * options.exit_layer} }}")
        if options.exit_layer != mined.exit_layer:
            problems.append(f"{where}: the model exits at layer {options.exit_layer} here but "
                            f"{recipe.stage_path(mine)} (lego_ashem.mine) cached layer {mined.exit_layer}'s "
                            f"states; keep exit_layer the same in every grow between them")
        elif options.exit_layer < options.n_layer:
            problems += self._train_problems(parameter_names_at(recipe, index, data), options.exit_layer, where)
        return problems + self._loss_problems(where)

    def _train_problems(self, names: list[str] | None, exit_layer: int, where: str) -> list[str]:
        """train/freeze that select only parameters a step from the cache never runs: backward would
        find nothing to differentiate (core reports globs that match nothing)."""
        o = self.options
        trained = [n for n in names or [] if any(fnmatchcase(n, g) for g in o.train)
                   and not any(fnmatchcase(n, g) for g in o.freeze)]
        if not trained or not all(_below_exit(n, exit_layer) for n in trained):
            return []
        return [f"{where}.train: train = {o.train}, freeze = {o.freeze} train only the embedding, the exit probe or "
                f"layers below exit_layer {exit_layer}, which {self.name} never runs (the cache holds their "
                f"output); train the layers above the exit, e.g. train = [\"layers.{exit_layer}.*\"]"]

    def _loss_problems(self, where: str) -> list[str]:
        """Terms that need what the cached forward does not make (exit logits, hidden states)."""
        problems = []
        for path, spec in zip(term_paths(self.options.losses, where), self.options.losses, strict=True):
            needs = spec.component()(spec.options).needs()
            if needs.exit_layers or needs.hidden:
                problems.append(f"{path}: {spec.use} needs exit-layer logits or hidden "
                                f"states; {self.name} gives the loss only the hard tokens' final logits "
                                f"(use e.g. stagewise.cross_entropy without at_layer)")
        return problems

    def run(self, state: stagewise.State) -> dict[str, Any]:
        cache = self._cache(state)
        if len(self._dataset(state)) == 0:
            raise _no_hard_token(state, cache["split"])
        metrics = super().run(state)
        if self.options.measure_speed:
            split = state.data[cache["split"]]
            metrics.update({f"{self.label}/{k}": v for k, v in phase2_speedups(
                state, cache, split, self.options.speed_repeats).items()})
        if not _trains_from_cache_later(state.recipe, state.stage_index):  # it would fill every later checkpoint
            del state.artifacts[mining.CACHE]
            self._data = None
        return metrics

    def train_batches(self, state: stagewise.State, epoch: int, start: int) -> Iterator[dict[str, Any]]:
        for batch in state.batches(self._dataset(state), train=True, epoch=epoch, start=start):
            yield cache_batch(batch)

    def batches_per_epoch(self, state: stagewise.State) -> int:
        return count_batches(state, self._dataset(state), train=True)

    def forward_fn(self, objective: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
        return upper_forward(objective.model, self.options.context)

    def evaluate(self, state: stagewise.State, objective: Any) -> dict[str, float]:
        if not self.has_eval():
            return {}
        routed = evaluate_routed(state, state.batches(self.options.eval_split), router_of(state))
        metrics = {"val/loss": routed["routed_loss"], "val/ppl": routed["routed_ppl"],
                   "val/acc": routed["acc"], "val/shallow_ratio": routed["shallow_ratio"]}
        if self.options.context == "token":  # _dataset makes a TokenCache in this context
            metrics["val/mined_hard_ppl"] = mined_hard_ppl(state, cast(mining.TokenCache, self._dataset(state)))
        return metrics

    def _cache(self, state: stagewise.State) -> dict[str, Any]:
        return mining.read_artifact(state, mining.CACHE)

    def _dataset(self, state: stagewise.State) -> mining.SequenceCache | mining.TokenCache:
        if self._data is None:
            cache = self._cache(state)
            self._data = mining.SequenceCache(cache) if self.options.context == "full" else mining.TokenCache(cache)
        return self._data


def _no_hard_token(state: stagewise.State, split: str) -> stagewise.ConfigError:
    """The recipe's error for an empty cache, naming the key to raise: the mine stage's hard_ratio."""
    recipe, index = state.recipe, state.stage_index
    mine_index = _last_earlier(recipe, index, Mine.name)  # check() saw to one
    mine = "the lego_ashem.mine stage" if mine_index is None else recipe.stage_path(mine_index)
    return recipe.error([f"{recipe.stage_path(index)}: the cache of {split!r} holds no hard token, so there is "
                         f"nothing to train; raise the router's hard_ratio ({mine}.router.hard_ratio)"])


def cache_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch of the cache as the loss sees it: ``target`` holds the hard tokens' targets only. It comes
    first: under torchrun the engine weighs each process's share of a batch by its first tensor's length
    (stagewise.loss.batch_size), and the loss is a mean over the hard tokens, not over the windows."""
    if "hard" in batch:
        return {"target": batch["target"][batch["hard"]], "hidden": batch["hidden"], "hard": batch["hard"]}
    return batch


@torch.no_grad()
def mined_hard_ppl(state: stagewise.State, tokens: mining.TokenCache) -> float:
    """Perplexity of the upper layers on the cached hard tokens, each alone (the seed's Hard PPL)."""
    model = deep_supervision(state.model)
    forward = upper_forward(model, "token")
    with stagewise.eval_mode(model), stagewise.autocast(state):  # an evaluation: at the run's precision
        parts = ({"nll": token_nll(forward(b)["logits"], b["target"])} for b in state.batches(tokens, shard=False))
        nll = collect_rows(parts, len(tokens))["nll"]
    return _ppl(nll)


# --- lego_ashem.train_exit_probe ----------------------------------------------------------------


@dataclass
class TrainExitProbeOptions:
    split: str = "train"  # the probe learns on this split's exit states
    calib_split: str = "valid"  # its threshold is calibrated here, at the router's hard_ratio
    epochs: int = 3  # full passes over the split's exit states
    lr: float = 1e-2  # AdamW on the probe only
    batch_size: int = 1024  # tokens per probe step

    def __post_init__(self) -> None:
        stagewise.check_options([(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}"),
                                 (self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}"),
                                 (0 < self.lr < math.inf, "lr", f"must be a finite number > 0, got {self.lr}"),
                                 lr_limit_check(self.lr)])


class TrainExitProbe(stagewise.Stage):
    """Fit the model's ``exit_probe`` to predict "exit-layer argmax == last-layer argmax" (CALM,
    LayerSkip), then switch the router to ``measure = "probe"`` with a threshold calibrated on
    ``calib_split``: tokens that continue then never pay for an exit softmax. Only the probe
    trains. Reports ``<stage>/threshold``, ``<stage>/agreement`` (how often the labels are 1),
    ``<stage>/probe_loss`` (its binary cross-entropy on ``split``, mean over the last epoch) and
    ``<stage>/probe_acc`` on ``calib_split``.
    """

    name = "lego_ashem.train_exit_probe"
    Options = TrainExitProbeOptions

    def fits_on(self) -> list[tuple[str, str]]:
        o = self.options
        return [(o.split, "fitted the exit probe"), (o.calib_split, "calibrated the probe's threshold")]

    def check(self, recipe: Recipe, index: int, data: DataSplits) -> list[str]:
        problems = super().check(recipe, index, data) + _model_problems(recipe, index, self.name)
        options, where = recipe.model_options_at(index), recipe.stage_path(index)
        problems += _calib_split_problems(self.options.calib_split, where)
        if isinstance(options, DeepSupervisionOptions) and not options.exit_probe:
            problems.append(f"{where}: set [model] exit_probe = true to train a probe")
        if _last_earlier(recipe, index, Mine.name) is None:
            problems.append(f"{where}: needs the router of an earlier lego_ashem.mine stage")
        return problems

    def run(self, state: stagewise.State) -> dict[str, Any]:
        o, model = self.options, deep_supervision(state.model)
        exit_probe = model.exit_probe
        if exit_probe is None:  # check() refuses it, but a model built outside the recipe may lack the probe
            raise ValueError(f"stages.{self.label}: the model has no exit probe; set [model] exit_probe = true "
                             f"to train one")
        # every process reads the whole splits, so every rank fits the same probe and threshold; the exit states
        # at the run's precision, as routing computes them (see Mine.run), the probe fitted in float32 on them
        with stagewise.autocast(state):
            train = probe.probe_data(model, state.batches(o.split, shard=False, desc=f"exit states of {o.split}"),
                                     windows=size_of(state.data[o.split]))
            calib = probe.probe_data(model, state.batches(o.calib_split, shard=False,
                                                          desc=f"calibrate on {o.calib_split}"),
                                     windows=size_of(state.data[o.calib_split]))
        loss = probe.fit_probe(exit_probe, train, epochs=o.epochs, lr=o.lr, batch_size=o.batch_size,
                               seed=state.seed + state.stage_index)
        scores = probe.probe_scores(exit_probe, calib["hidden"])
        router = router_of(state, measure="probe")
        mining.calibrate_router(state, router, scores)
        settings = {**mining.read_artifact(state, mining.ROUTER), "measure": "probe"}
        state.artifacts[mining.ROUTER] = mining.router_record(settings, router, o.calib_split, scores)
        return {f"{self.label}/threshold": router.threshold,
                f"{self.label}/agreement": float(train["label"].float().mean()),
                f"{self.label}/probe_loss": loss,
                f"{self.label}/probe_acc": float(((scores >= 0.5) == calib["label"]).float().mean())}


# --- lego_ashem.evaluate_routed ------------------------------------------------------------------


@dataclass
class EvaluateRoutedOptions:
    split: str = "test"  # held out: used for no training, calibration or mining
    allow_leak: bool = False  # true lets split be a mined or calibration split (only to reproduce the seed)
    measure_speed: bool = True  # wall-clock full-depth vs routed forward, same batch
    speed_batch_size: int = 32  # windows per timed forward
    speed_repeats: int = 5  # timed rounds, full depth and routed interleaved (median)
    curve_points: int = 11  # thresholds of the accuracy-compute curve (calibration quantiles, at most 21); 0: none

    def __post_init__(self) -> None:
        stagewise.check_options([
            (self.speed_batch_size >= 1, "speed_batch_size", f"must be >= 1, got {self.speed_batch_size}"),
            (self.speed_repeats >= 1, "speed_repeats", f"must be >= 1, got {self.speed_repeats}"),
            (0 <= self.curve_points <= mining.CURVE_QUANTILES, "curve_points",
             f"must be >= 0 (0: no curve) and <= {mining.CURVE_QUANTILES} (the calibration quantiles kept), "
             f"got {self.curve_points}"),
        ])


class EvaluateRouted(stagewise.Stage):
    """Routed evaluation on ``split``: every token runs to the exit layer; easy tokens exit,
    hard tokens continue, and the exited tokens' upper-layer work is really skipped.

    Reports ``<stage>/<metric>`` for ``loss``, ``acc``, ``ppl`` (routed, as ``stagewise.evaluate`` names them),
    ``routed_ppl``, ``routed_loss``, ``full_depth_ppl``,
    ``full_depth_acc``, ``exit_ppl``, ``shallow_ratio``, ``compute_cost`` (the seed's layer
    count), ``compute_cost_flops`` (counted), ``hard_ppl_before`` (exit layer) and
    ``hard_ppl_after`` (routed) on the tokens routed hard, ``threshold``; with ``measure_speed``
    also ``speedup_measured``, ``batch_size``, ``routed_ms`` and ``full_depth_ms`` (and with a softmax
    measure ``confidence_ms`` and ``confidence_flops_share``). The curve is printed, logged as
    ``lego_ashem.curve`` records and drawn to ``plots/accuracy_compute_<checkpoint>.png`` (the
    stage's checkpoint name: its name by default).
    """

    name = "lego_ashem.evaluate_routed"
    Options = EvaluateRoutedOptions
    measured = TIMING_METRICS  # wall clock: summary.json marks them, verify leaves them out

    def check(self, recipe: Recipe, index: int, data: DataSplits) -> list[str]:
        problems = super().check(recipe, index, data) + _model_problems(recipe, index, self.name)
        problems += leak_problems(recipe, index, self.options.split, self.options.allow_leak)
        where = recipe.stage_path(index)
        if _last_earlier(recipe, index, Mine.name) is None:
            options = recipe.model_options_at(index)
            if isinstance(options, DeepSupervisionOptions) and options.routing_threshold is None:
                problems.append(f"{where}: no routing threshold: add a lego_ashem.mine "
                                f"stage before it or set [model] routing_threshold")
            if self.options.curve_points:
                problems.append(f"{where}.curve_points: the accuracy-compute curve's thresholds are the "
                                f"calibration quantiles that lego_ashem.mine keeps; add a mine stage before "
                                f"it or set curve_points = 0")
        return problems

    def run(self, state: stagewise.State) -> dict[str, Any]:
        warn_not_held_out(state, self.label, self.options.split)  # only with allow_leak: check() refuses it
        return {f"{self.label}/{k}": v for k, v in routed_report(state, self.options).items()}


# --- reading the recipe --------------------------------------------------------------------------


def _trains_from_cache_later(recipe: Recipe, index: int) -> bool:
    """Whether a stage after ``index`` trains from this cache (before a later mine replaces it)."""
    for spec in recipe.stages[index + 1:]:
        if spec.use in (Mine.name, TrainUpperLayers.name):
            return spec.use == TrainUpperLayers.name
    return False


def _below_exit(name: str, exit_layer: int) -> bool:
    """A parameter that runs before the exit (or only for the probe): a step from the cache skips it."""
    top, _, rest = name.partition(".")
    return top in ("embedding", "exit_probe") or (top == "layers" and int(rest.split(".")[0]) < exit_layer)


def _last_earlier(recipe: Recipe, index: int, use: str) -> int | None:
    """The index of the last stage before ``index`` that uses ``use``, or None."""
    return max((i for i, s in enumerate(recipe.stages[:index]) if s.use == use), default=None)


def _calib_split_problems(calib_split: str, where: str) -> list[str]:
    """Core lets a ``*_split`` be "" (none); the threshold is calibrated on this one, so it must name a split."""
    if calib_split:
        return []
    return [f"{where}.calib_split: must name the split the threshold is calibrated on (e.g. \"valid\"), got \"\""]


def _model_problems(recipe: Recipe, index: int, stage: str) -> list[str]:
    if recipe.model.use != MODEL:
        return [f"{recipe.stage_path(index)}: {stage} needs [model] use = \"{MODEL}\", got {recipe.model.use!r}"]
    return []
