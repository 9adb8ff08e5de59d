"""``koopman.operator``: a Koopman auxiliary loss on a model's per-layer hidden states.

For each source layer l the term trains φ_l, K_l, ψ_l (see :mod:`stagewise_koopman.operator`)
on pairs of states one step apart, along ``axis``:

- ``"depth"``: h_l -> h_{l+k} at the same position (the seed's dynamics across layers);
- ``"time"``: h_l[t] -> h_l[t+k] within layer l (positions only move forward: it predicts the
  future from the past and changes nothing in the model's forward pass).

Its parts (Lusch, Kutz & Brunton 2018), each with a weight, for k = 1..``steps``:

- ``lifted``: ‖K^k φ(h) − φ(h')‖, relative to the spread of φ(h') so a shrinking lift cannot
  fake a small error;
- ``reconstruction``: ‖ψ(φ(h)) − ĥ‖ (ψ is trained: the seed never trained it);
- ``state``: ‖ψ(K^k φ(h)) − ĥ'‖, what Koopman forward mode relies on;
- ``spectral`` (optional): singular values of K above 1, pulling its eigenvalues into the unit disc
  (a penalty, not a projection: a trained K can stay a little outside).

The engine owns the weight schedule and the fallback (``weight``, ``start_epoch``,
``ramp_epochs``, ``cap``, ``fallback_threshold``, ``fallback_factor`` of the loss term).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed
import torch.nn.functional as F

import stagewise
from stagewise.data.splits import size_of
from stagewise.engine.distributed import DistInfo, all_reduce_sums
from stagewise.engine.resumable import kind, tensors_problems
from stagewise.nn.transformer import memory_problem
from stagewise.schema import as_table, build_dataclass
from stagewise.specs import weight_limit_check
from stagewise_koopman.dmd import blend, dmd_operator
from stagewise_koopman.operator import EPS, KoopmanModules, normalize_state

ARTIFACT = "koopman.operators"  # state.artifacts key: term name -> KoopmanOperator.artifact()
AXES = ("depth", "time")
DISTANCES = ("mse", "smooth_l1")
DETACH = ("none", "source", "target")


@dataclass
class KoopmanOptions:
    """Recipe keys of ``koopman.operator`` (next to the engine's weight and fallback keys)."""

    koopman_dim: int = 64  # D: width of each lifted space (the seed used 256)
    axis: str = "depth"  # "depth": layer l -> l+1 at each position; "time": position t -> t+1 in layer l
    layers: list[int] = field(default_factory=list)  # source layers (hidden index, 0 = embedding); []: all
    steps: int = 1  # multi-step prediction: K^k for k = 1..steps (forward mode over 2 layers wants 2)
    distance: str = "mse"  # "mse" or "smooth_l1" (the seed's), for every part
    lifted_weight: float = 1.0  # ‖K^k φ(h) − φ(h')‖, relative
    reconstruction_weight: float = 1.0  # ‖ψ(φ(h)) − ĥ‖
    state_weight: float = 1.0  # ‖ψ(K^k φ(h)) − ĥ'‖
    spectral_weight: float = 0.0  # penalty on singular values of K above 1; 0: off
    dmd_every: int = 0  # blend a DMD fit into K every this many optimizer steps; 0: off
    dmd_rate: float = 0.1  # K <- (1 - rate) K + rate K_dmd
    dmd_buffer: int = 512  # token pairs per layer in the DMD fit (refilled between refreshes)
    detach: str = "none"  # backbone states the term does not train through: "source" (h), "target" (h'), "none"

    def __post_init__(self) -> None:
        weights = {f"{part}_weight": w for part, w in self.part_weights().items()}
        weights_ok = {key: math.isfinite(w) and w >= 0 for key, w in weights.items()}  # NaN passes min() >= 0
        stagewise.check_options([
            (self.koopman_dim > 0, "koopman_dim", f"must be a positive integer, got {self.koopman_dim}"),
            (self.axis in AXES, "axis", f"must be one of {', '.join(map(repr, AXES))}, got {self.axis!r}"),
            (self.distance in DISTANCES, "distance",
             f"must be one of {', '.join(map(repr, DISTANCES))}, got {self.distance!r}"),
            (self.detach in DETACH, "detach", f"must be one of {', '.join(map(repr, DETACH))}, got {self.detach!r}"),
            (self.steps >= 1, "steps", f"must be >= 1, got {self.steps}"),
            *((weights_ok[key], key, f"must be >= 0 and finite, got {w}") for key, w in weights.items()),
            *(weight_limit_check(w, key) for key, w in weights.items()),
            (max(weights.values()) > 0 or not all(weights_ok.values()), tuple(weights),
             "at least one of lifted_weight, reconstruction_weight, state_weight and spectral_weight must be "
             "> 0 (with all four 0 the term has nothing to compute)"),
            (self.dmd_every >= 0, "dmd_every", f"must be >= 0 (0: no DMD refresh), got {self.dmd_every}"),
            (0 < self.dmd_rate <= 1, "dmd_rate", f"must be in (0, 1], got {self.dmd_rate}"),
            (self.dmd_buffer >= 1, "dmd_buffer", f"must be >= 1, got {self.dmd_buffer}"),
            # fewer pairs than dimensions leave X rank-deficient: the fit would be low-rank
            (not self.dmd_every or self.dmd_buffer >= self.koopman_dim, ("dmd_buffer", "koopman_dim", "dmd_every"),
             f"dmd_buffer ({self.dmd_buffer}) must be >= koopman_dim ({self.koopman_dim}) when dmd_every > 0, "
             f"or the DMD fit of K is low-rank"),
            (all(layer >= 0 for layer in self.layers), "layers", f"must be >= 0, got {self.layers}"),
        ])

    def part_weights(self) -> dict[str, float]:
        return {"lifted": self.lifted_weight, "reconstruction": self.reconstruction_weight,
                "state": self.state_weight, "spectral": self.spectral_weight}


def _top_layer(options: KoopmanOptions, n_hidden: int) -> int:
    return n_hidden - 2 if options.axis == "depth" else n_hidden - 1  # depth needs a layer above


def source_layers(options: KoopmanOptions, n_hidden: int) -> list[int]:
    """The source layers for a model with hidden states h_0..h_{n_hidden-1} (unchecked: see
    :func:`shape_problems`)."""
    first = 0 if options.axis == "depth" else 1
    return sorted(set(options.layers)) or list(range(first, _top_layer(options, n_hidden) + 1))


def model_hidden(model_options: Any) -> int | None:
    """How many hidden states (h_0..h_n_layer) a model with these options returns, known before
    it is built for models with ``n_layer`` (as ``stagewise.transformer``); ``None`` for others."""
    n_layer = getattr(model_options, "n_layer", None)
    return None if n_layer is None else n_layer + 1


def model_width(model_options: Any) -> int | None:
    """The width of a model's hidden states, known before it is built for models with ``n_embd``."""
    return getattr(model_options, "n_embd", None)


def shape_problems(options: KoopmanOptions, n_hidden: int | None, seq_len: int | None = None,
                   width: int | None = None) -> list[str]:
    """What keeps ``options`` from fitting a model with ``n_hidden`` hidden states of ``width`` and
    sequences of ``seq_len`` tokens (``None``: not known, not checked)."""
    problems = []
    if n_hidden is not None:
        top, layers = _top_layer(options, n_hidden), source_layers(options, n_hidden)
        bad = [layer for layer in layers if layer > top]
        if bad:
            problems.append(f"layers {bad} are out of range for axis {options.axis!r}: the model has hidden "
                            f"states h_0..h_{n_hidden - 1}, so source layers go up to {top}")
        elif options.axis == "depth" and min(layers) + options.steps > n_hidden - 1:
            # no pair k = steps apart exists: its error would be a mean over nothing (NaN)
            problems.append(f"steps {options.steps} reaches past the last hidden state h_{n_hidden - 1} from "
                            f"every source layer (the lowest is {min(layers)}): with these layers, steps must "
                            f"be <= {n_hidden - 1 - min(layers)} for axis 'depth'")
    if seq_len is not None and options.axis == "time" and options.steps >= seq_len:
        problems.append(f"steps {options.steps} must be below the sequence length {seq_len} for axis 'time'")
    if not problems and n_hidden is not None and width is not None:
        problems += _memory_problems(options, len(source_layers(options, n_hidden)), width)
    return problems


def _memory_problems(options: KoopmanOptions, n: int, width: int) -> list[str]:
    """φ, K, ψ (and K's reference copy, the DMD buffers) of ``n`` source layers that alone would not fit the
    machine's memory: refused before any stage runs, not as a failed allocation once the stages before it ran."""
    D = options.koopman_dim
    floats = n * (2 * width * D + 2 * D * D + D + width) + (2 * n * options.dmd_buffer * D if options.dmd_every else 0)
    dmd = f" and dmd_buffer = {options.dmd_buffer}" if options.dmd_every else ""
    problem = memory_problem(floats, f"koopman_dim = {D}{dmd}", f"the operators of {n} source layers of width {width}")
    return [problem] if problem else []


def gather_pairs(hidden: list[torch.Tensor], sources: list[int], options: KoopmanOptions
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """States k = 0..steps apart along the axis, (n, steps+1, M, C), and which exist, (n, steps+1).

    Depth: h_{l+k} at every position (a k past the last layer is masked out). Time: h_l at
    positions t + k for source positions t < T - steps, so every k shares the same sources.
    """
    s = options.steps
    stacked = torch.stack(hidden)  # (L+1, B, T, C)
    src = torch.tensor(sources, device=stacked.device)
    if options.axis == "depth":
        index = src[:, None] + torch.arange(s + 1, device=stacked.device)  # (n, s+1)
        mask = index < len(hidden)
        states = stacked[index.clamp(max=len(hidden) - 1)]  # (n, s+1, B, T, C)
    else:
        T = stacked.shape[2]
        layer = stacked[src]  # (n, B, T, C)
        states = torch.stack([layer[:, :, k:T - s + k] for k in range(s + 1)], 1)  # (n, s+1, B, T-s, C)
        mask = torch.ones(len(sources), s + 1, dtype=torch.bool, device=stacked.device)
    return states.flatten(2, 3), mask


def koopman_parts(modules: KoopmanModules, states: torch.Tensor, mask: torch.Tensor, options: KoopmanOptions,
                  dist: DistInfo | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Unweighted errors (``lifted``, ``one_step``, ``reconstruction``, ``state``, ``spectral``)
    for states (n, s+1, M, C); also returns the lifted states (n, s+1, M, D). Under torchrun
    (``dist``) each process holds a share of the batch's tokens: the lifted errors' spread is then
    the whole batch's, as in one process."""
    n, s1, M, C = states.shape
    if options.detach == "source":  # the backbone is pulled only at h': its next state moves towards K φ(h)
        states = torch.cat([states[:, :1].detach(), states[:, 1:]], 1)
    elif options.detach == "target":
        states = torch.cat([states[:, :1], states[:, 1:].detach()], 1)
    targets = normalize_state(states)  # ĥ: what φ lifts and ψ decodes back to, normalised once for both
    lifted = modules.lift_normalized(targets.reshape(n, s1 * M, C)).view(n, s1, M, -1)  # every state in one bmm
    x = lifted[:, 0]
    errors = {"reconstruction": _masked_mean(_distance(modules.decode(x), targets[:, 0], options), mask[:, 0])}
    lifted_k, state_k, pred = [], [], x
    for k in range(1, s1):
        pred = modules.advance(pred, 1)  # K^k φ(h)
        lifted_k.append(_masked_mean(relative_distance(pred, lifted[:, k], options, dist), mask[:, k]))
        state_k.append(_masked_mean(_distance(modules.decode(pred), targets[:, k], options), mask[:, k]))
    errors.update(lifted=torch.stack(lifted_k).mean(), one_step=lifted_k[0], state=torch.stack(state_k).mean())
    if options.spectral_weight:
        errors["spectral"] = modules.spectral_excess()
    return errors, lifted


def _distance(pred: torch.Tensor, target: torch.Tensor, options: KoopmanOptions) -> torch.Tensor:
    """Per-layer mean distance, (n,)."""
    fn = F.mse_loss if options.distance == "mse" else F.smooth_l1_loss
    return fn(pred, target, reduction="none").mean(dim=(1, 2))


def relative_distance(pred: torch.Tensor, target: torch.Tensor, options: KoopmanOptions,
                      dist: DistInfo | None = None) -> torch.Tensor:
    """Distance in units of the target's spread over tokens (per layer, not trained through), the
    tokens of every process under torchrun (``dist``).

    The spread is the unbiased variance, except for a single token, whose (biased) spread is 0:
    the unbiased one would divide by 0 tokens.
    """
    target_ = target.detach()
    if dist is not None and dist.enabled:
        variance = _global_variance(target_)
    else:
        variance = target_.var(dim=1, keepdim=True, correction=1 if target.shape[1] > 1 else 0)
    scale = variance.mean(-1, keepdim=True).add(EPS).sqrt()
    return _distance(pred / scale, target / scale, options)


def _global_variance(target: torch.Tensor) -> torch.Tensor:
    """``target.var(dim=1, keepdim=True)`` (n, 1, D) over the tokens of every process (two passes:
    the mean, then the squared deviations, as torch.var does). A collective: every rank calls it."""
    count = torch.tensor(float(target.shape[1]), dtype=target.dtype, device=target.device)
    total = target.sum(1, keepdim=True)
    for tensor in (count, total):
        torch.distributed.all_reduce(tensor)
    squares = (target - total / count).square().sum(1, keepdim=True)
    torch.distributed.all_reduce(squares)
    return squares / (count - 1 if count > 1 else count)


def evaluation_problems(state: stagewise.State) -> list[str]:
    """Under torchrun: the split the stage evaluates the term on, when one of its batches would leave a
    process without a share. The term's evaluation is a collective per batch (:func:`_global_variance`),
    so such a process would skip one the others wait in, and the job would hang."""
    options, world = state.recipe.stages[state.stage_index].options, state.dist.world_size
    # stagewise.train (and its subclasses) evaluate eval_split, stagewise.evaluate its split
    split = getattr(options, "eval_split", getattr(options, "split", ""))
    if not state.dist.enabled or not isinstance(split, str) or split not in state.data.names():
        return []
    spec = state.recipe.data
    n, size = size_of(state.data[split]), spec.eval_batch_size or spec.batch_size
    if size >= world and not 0 < n % size < world:
        return []
    # the batch size nearest to the recipe's that gives every process a share of every batch (n itself does)
    fits = sorted((s for s in range(world, n + 1) if not 0 < n % s < world), key=lambda s: (abs(s - size), s))
    fix = (f"set data.eval_batch_size to {fits[0]}" if fits else f"give split {split!r} at least {world} examples")
    return [f"under torchrun each of the {world} processes takes a share of every batch, and this term's evaluation "
            f"waits for every process at each batch, but split {split!r} ({n} examples in batches of {size}) "
            f"leaves a process with no share of {'every' if size < world else 'its last'} batch, so the job would "
            f"hang; {fix}, or launch fewer processes"]


def _dist(state: stagewise.State | None) -> DistInfo | None:
    """The run's processes; None outside a run (fit_post_hoc, which reads its split whole on every rank)."""
    return state.dist if state is not None else None


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 when autocast made it bfloat16 (or float16); float32 and float64 as they are."""
    return x.float() if x.dtype.itemsize < 4 else x


def _masked_mean(per_layer: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (per_layer * mask).sum() / mask.sum()


def probe_hidden(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[int, int, int]:
    """(number of hidden states, width, sequence length) of ``model``, from one batch."""
    with stagewise.eval_mode(model), torch.no_grad():  # no dropout: the probe draws no random numbers
        outputs = stagewise.forward_batch(model, batch, stagewise.Needs(hidden=True))
    hidden = outputs.get("hidden") if isinstance(outputs, dict) else None
    if not hidden or len(hidden) < 2 or hidden[0].dim() != 3:
        keys = sorted(outputs) if isinstance(outputs, dict) else "-"
        raise ValueError(f"koopman.operator needs a model whose outputs hold 'hidden': [h_0, ..., h_L], each "
                         f"(B, T, C), when asked with Needs(hidden=True) (e.g. stagewise.transformer); "
                         f"{type(model).__name__} returned keys {keys}")
    return len(hidden), hidden[0].shape[-1], hidden[0].shape[1]


class KoopmanOperator(stagewise.Loss):
    """``{ use = "koopman.operator", name = "koopman", weight = 0.05, koopman_dim = 64 }``.

    Reads ``outputs["hidden"]``. Parts are logged as ``train/<term>/<part>`` (weighted);
    evaluation reports each unweighted error and ``one_step`` (the relative lifted one-step
    error). With ``dmd_every``, an event hook after each optimizer step calls
    :meth:`refresh_operator`.
    """

    name = "koopman.operator"
    Options = KoopmanOptions

    def check(self, model_options: Any) -> list[str]:
        """Before anything runs: ``layers`` and ``steps`` against a model with ``n_layer`` blocks, the
        operators' memory against its ``n_embd``; other models are checked when the stage starts."""
        return super().check(model_options) + shape_problems(self.options, model_hidden(model_options),
                                                             width=model_width(model_options))

    def setup(self, state: stagewise.State) -> None:
        # the train split's first batch whole on every process, as one process reads it: under torchrun a
        # process's share of it may be empty (a train split smaller than the processes, in an evaluation-only run)
        n_hidden, width, seq_len = probe_hidden(state.model, next(iter(state.batches("train", shard=False))))
        problems = shape_problems(self.options, n_hidden, seq_len, width) + evaluation_problems(state)
        if problems:
            raise stagewise.ConfigError(problems)  # the engine names the term and the recipe file
        self.build(n_hidden, width)

    def build(self, n_hidden: int, width: int, training: bool = True) -> KoopmanOperator:
        """Create φ, K, ψ for a model with ``n_hidden`` hidden states of width ``width`` (and, when
        ``training`` with ``dmd_every``, the DMD buffers: an evaluated term needs none)."""
        o = self.options
        problems = shape_problems(o, n_hidden)
        if problems:
            raise ValueError("; ".join(problems))
        self.sources = source_layers(o, n_hidden)
        self.n_hidden, self.width = n_hidden, width
        n, D = len(self.sources), o.koopman_dim
        self.koopman = KoopmanModules(n, width, D)
        # buffers, declared for type checkers (nn.Module types them Tensor | Module); the dmd_* ones only with DMD
        self.operator_ref: torch.Tensor
        self.dmd_x: torch.Tensor
        self.dmd_y: torch.Tensor
        self.dmd_seen: torch.Tensor
        self.dmd_fresh: torch.Tensor
        self.register_buffer("operator_ref", self.koopman.operator.detach().clone())  # K at the last epoch end
        if o.dmd_every and training:
            self.register_buffer("dmd_x", torch.zeros(n, o.dmd_buffer, D))
            self.register_buffer("dmd_y", torch.zeros(n, o.dmd_buffer, D))
            self.register_buffer("dmd_seen", torch.zeros((), dtype=torch.long))  # pairs ever recorded
            self.register_buffer("dmd_fresh", torch.zeros((), dtype=torch.long))  # since the last refresh
        # this step's pairs (n, M, D), from the tokens of its examples, and how many examples, until the step ends
        self.pending: tuple[torch.Tensor, torch.Tensor, int] | None = None
        return self

    def needs(self) -> stagewise.Needs:
        return stagewise.Needs(hidden=True)

    def errors(self, hidden: list[torch.Tensor],
               dist: DistInfo | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The term's parts on ``hidden`` (see :func:`koopman_parts`); ``dist``: the processes under torchrun.
        In float32 also in a bf16 run (``run.precision``): K is applied ``steps`` times and the errors are divided
        by the targets' spread, which bfloat16's 8-bit mantissa would blur; the DMD fit reads the lifted states
        into float32 buffers. Float32 (and float64) states pass unchanged."""
        with torch.autocast(hidden[0].device.type, enabled=False):
            states, mask = gather_pairs([_at_least_float32(h) for h in hidden], self.sources, self.options)
            return koopman_parts(self.koopman, states, mask, self.options, dist)

    def forward(self, outputs, batch, state):
        errors, lifted = self.errors(outputs["hidden"], _dist(state))
        if self.options.dmd_every and torch.is_grad_enabled() and self.pending is None:  # a step's first pass
            self.pending = (lifted[:, 0].detach(), lifted[:, 1].detach(), outputs["hidden"][0].shape[0])
        return self._weighted(errors)

    def eval_sums(self, outputs, batch, state):
        errors, _ = self.errors(outputs["hidden"], _dist(state))
        weighted = sum(self._weighted(errors).values())
        n = float(batch["input"].shape[0])
        return {name: (float(value) * n, n) for name, value in {"loss": weighted, **errors}.items()}

    def _weighted(self, errors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The parts with a weight, each times its weight: what the loss sums."""
        return {part: w * errors[part] for part, w in self.options.part_weights().items() if w}

    # --- operator refresh and change -----------------------------------------------------

    def end_step(self, trained: bool, dist: DistInfo | None = None) -> None:
        """Record the step's pairs (from its first forward pass) for the DMD refresh if the step
        ``trained`` the term; drop them otherwise, so a skipped non-finite batch never reaches K.
        Under torchrun (``dist``) every rank records the pairs one process would keep of the
        global batch: a collective, every rank calls it at the same step."""
        if self.pending is not None and trained:
            x, y, examples = self.pending
            if dist is not None and dist.enabled:
                self._store(*self._global_pairs(x, y, examples, dist))
            else:
                self._record(x, y)
        self.pending = None

    def _take(self, tokens: int, device: torch.device) -> torch.Tensor:
        """Which of a step's ``tokens`` pairs the buffer keeps: ``ceil(dmd_buffer / dmd_every)``, evenly spaced."""
        o = self.options
        per_step = min(math.ceil(o.dmd_buffer / o.dmd_every), tokens)
        return torch.linspace(0, tokens - 1, per_step, device=device).long()

    def _record(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Keep the evenly spaced token pairs (n, ·, D) of this step (see :meth:`_take`)."""
        take = self._take(x.shape[1], x.device)
        self._store(x[:, take], y[:, take])

    def _store(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Put pairs (n, k, D) into the ring buffer."""
        k = x.shape[1]
        slots = (self.dmd_seen + torch.arange(k, device=x.device)) % self.options.dmd_buffer
        self.dmd_x[:, slots] = x
        self.dmd_y[:, slots] = y
        self.dmd_seen += k
        self.dmd_fresh += k

    def _global_pairs(self, x: torch.Tensor, y: torch.Tensor, examples: int,
                      dist: DistInfo) -> tuple[torch.Tensor, torch.Tensor]:
        """The pairs :meth:`_record` keeps of the global batch, in its order, on every rank.

        Rank r holds examples r, r + world, ... of the global batch (``stagewise.engine.batches``),
        each of the same number of tokens. Every rank works out which of its tokens the one-process
        selection takes and sends those alone (one all_gather, padded to the largest rank's share),
        then puts every rank's pairs in the global order."""
        world, per_example = dist.world_size, x.shape[1] // examples
        (total,) = all_reduce_sums([float(examples)], dist)
        take = self._take(int(total) * per_example, x.device)
        example, position = take // per_example, take % per_example
        owner, local = example % world, (example // world) * per_example + position
        ranks = F.one_hot(owner, world)  # (kept, world)
        mine = torch.cat([x, y], -1)[:, local[owner == dist.rank]]  # (n, ·, 2D): x and y in one message
        sent = F.pad(mine, (0, 0, 0, int(ranks.sum(0).max()) - mine.shape[1]))  # all_gather wants equal sizes
        shares = [torch.empty_like(sent) for _ in range(world)]
        torch.distributed.all_gather(shares, sent)
        # the global selection's i-th pair is the k-th its owner sent: owners keep the token order
        k = (ranks.cumsum(0) * ranks).sum(1) - 1
        pairs = torch.stack(shares)[owner, :, k].transpose(0, 1)  # (n, kept, 2D)
        return pairs.split(x.shape[2], -1)

    @torch.no_grad()
    def refresh_operator(self) -> bool:
        """Blend the DMD fit of the buffer into K once the buffer holds only fresh pairs."""
        if not self.options.dmd_every or int(self.dmd_fresh) < self.options.dmd_buffer:
            return False
        fitted = dmd_operator(self.dmd_x, self.dmd_y)
        self.koopman.operator.copy_(blend(self.koopman.operator, fitted, self.options.dmd_rate))
        self.dmd_fresh.zero_()
        return True

    @torch.no_grad()
    def operator_change(self) -> dict[str, float]:
        """Per layer: mean |ΔK| and ‖ΔK‖ / ‖K‖ in % since the last call (or the start)."""
        now = self.koopman.operator.detach()
        delta = now - self.operator_ref
        mean_abs = delta.abs().mean(dim=(1, 2))
        relative = 100 * torch.linalg.matrix_norm(delta) / torch.linalg.matrix_norm(self.operator_ref).clamp_min(EPS)
        self.operator_ref.copy_(now)
        changes = {}
        for i, layer in enumerate(self.sources):
            changes[f"K{layer}/change"] = float(mean_abs[i])
            changes[f"K{layer}/change_pct"] = float(relative[i])
        return changes

    # --- handing the trained operator on ----------------------------------------------------

    def artifact(self) -> dict[str, Any]:
        """What later stages need to rebuild the trained φ, K, ψ: tensors and primitives only."""
        return {"options": as_table(self.options), "n_hidden": self.n_hidden, "width": self.width,
                "sources": list(self.sources),
                "state": {k: v.detach().clone() for k, v in self.koopman.state_dict().items()}}

    @classmethod
    def from_artifact(cls, saved: dict[str, Any]) -> KoopmanOperator:
        """The term :meth:`artifact` wrote ``saved`` from, for evaluation (unchecked: see :func:`artifact_problems`)."""
        term = cls(KoopmanOptions(**saved["options"])).build(saved["n_hidden"], saved["width"], training=False)
        term.koopman.load_state_dict(saved["state"])
        return term


def artifact_problems(saved: Any, where: str) -> list[str]:
    """What keeps :meth:`KoopmanOperator.from_artifact` from rebuilding a trained term from ``saved`` (read
    from a checkpoint, which may hold anything), each as ``KEY.PATH: what``: the keys :meth:`artifact`
    writes, options a recipe could give, φ, K, ψ in the shapes those options and the model give, finite."""
    keys = ("options", "n_hidden", "width", "sources", "state")
    if not isinstance(saved, dict) or saved.keys() != set(keys):
        return [f"{where}: {kind(saved)}, expected a table of {', '.join(keys)}"]
    problems: list[str] = []
    options = build_dataclass(KoopmanOptions, saved["options"], f"{where}.options", problems)
    problems += [f"{where}.{key}: {saved[key]!r}, expected a whole number >= 1" for key in ("n_hidden", "width")
                 if not (type(saved[key]) is int and saved[key] >= 1)]
    if problems:
        return problems
    saved_sources, n_hidden = saved["sources"], saved["n_hidden"]
    if not (isinstance(saved_sources, list) and all(type(layer) is int for layer in saved_sources)):
        return [f"{where}.sources: {kind(saved_sources)}, expected a list of layer numbers"]
    if not options.layers and n_hidden != len(saved_sources) + 1:  # all layers: one per hidden state but the last
        return [f"{where}.n_hidden: {n_hidden}, but sources lists {len(saved_sources)} layers (expected "
                f"{len(saved_sources) + 1})"]
    problems = [f"{where}.options: {p}" for p in shape_problems(options, n_hidden)]
    sources = source_layers(options, n_hidden)
    if problems or saved_sources != sources:
        return problems or [f"{where}.sources: {saved_sources!r}, expected {sources} (the options' source layers)"]
    n, C, D = len(sources), saved["width"], options.koopman_dim
    shapes = KoopmanModules.shapes(n, C, D)
    fresh = {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}
    problems = tensors_problems(saved["state"], fresh, f"{where}.state")
    return problems or [f"{where}.state.{k}: holds values that are not finite" for k in shapes
                        if not bool(torch.isfinite(saved["state"][k]).all())]
