"""What a resume checks before it puts a checkpoint's state back: that each value it will use has the
type and shape the engine wrote there. ``load_checkpoint`` checks the top-level keys; an edited or
crafted ``last.pt`` can hold junk deeper down (a weight of another shape, an optimizer group without
``eps``, an RNG state numpy would read out of bounds), which is refused here naming its key path,
not met as a traceback (or a segfault) steps into the run.

Each function returns problems as ``KEY.PATH: what is wrong``; the caller raises them at once.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from stagewise.engine.checkpoint import python_rng_state

_NUMBER = (int, float)
_MT_WORDS = 624  # numpy's MT19937 key words; its position runs 0..624


def tensors_problems(saved: Any, fresh: dict[str, torch.Tensor], where: str) -> list[str]:
    """``saved`` must hold ``fresh``'s keys, each a tensor of the same shape and dtype (a state dict)."""
    if not isinstance(saved, dict):
        return [f"{where}: {kind(saved)}, not the state dict a run writes"]
    missing, extra = [k for k in fresh if k not in saved], [k for k in saved if k not in fresh]
    problems = [f"{where}: lacks {', '.join(map(str, missing[:3]))}"] if missing else []
    if extra:
        problems.append(f"{where}: holds {', '.join(map(repr, extra[:3]))}, which this run builds no tensor for")
    return problems + [f"{where}.{k}: {kind(saved[k])}, expected {kind(v)}" for k, v in fresh.items()
                       if k in saved and not _same_tensor(saved[k], v)]


def rng_problems(rng: dict[str, Any]) -> list[str]:
    """Each RNG state that :func:`~stagewise.engine.checkpoint.set_rng_state` could not put back, or
    would put back broken, tried on fresh generators so that no RNG of the run is touched."""
    problems = [f"rng: lacks {key}" for key in ("torch", "numpy", "python", "cuda") if key not in rng]
    if problems:
        return problems
    trials = {"torch": lambda: torch.Generator().set_state(rng["torch"]),
              "python": lambda: random.Random().setstate(python_rng_state(rng["python"]))}
    problems = [f"rng.{key}: {problem}" for key, trial in trials.items() if (problem := _refusal(trial))]
    if not _numpy_state_ok(rng["numpy"]):  # checked here, not tried: numpy itself checks little of it
        problems.append("rng.numpy: not numpy's MT19937 state a run writes (kind, 624 keys, pos 0..624, has_gauss, "
                        "gauss)")
    if not _python_gauss_ok(rng["python"]):  # setstate takes any value here; random.gauss would return it
        problems.append("rng.python: its last item (the next gauss value) must be None or a float")
    if not (isinstance(rng["cuda"], list) and all(_byte_tensor(t) for t in rng["cuda"])):
        problems.append("rng.cuda: must be a list of CUDA RNG states (uint8 tensors)")
    return problems


def same_types(saved: Any, fresh: Any, where: str) -> list[str]:
    """Where ``saved`` differs in structure from ``fresh``, what this run built (an optimizer's param
    groups, a scheduler's state): the same dict keys, sequence lengths and value types; values may differ."""
    if isinstance(fresh, dict):
        if not isinstance(saved, dict) or saved.keys() != fresh.keys():
            return [f"{where}: {kind(saved)}, expected a table of {', '.join(map(str, fresh))}"]
        return [p for k in fresh for p in same_types(saved[k], fresh[k], f"{where}.{k}")]
    if isinstance(fresh, list | tuple):
        if not isinstance(saved, list | tuple) or len(saved) != len(fresh):
            return [f"{where}: {kind(saved)}, expected a list of {len(fresh)}"]
        return [p for i, (s, f) in enumerate(zip(saved, fresh, strict=True)) for p in same_types(s, f, f"{where}[{i}]")]
    if isinstance(fresh, torch.Tensor):
        return [] if _same_tensor(saved, fresh) else [f"{where}: {kind(saved)}, expected {kind(fresh)}"]
    same = type(saved) is type(fresh) or (type(fresh) is float and type(saved) is int)
    # torch's optional optimizer flags (foreach, fused, ...) are None or a bool: None is "torch chooses", as
    # in the checkpoints of runs from before the engine asked for foreach=True
    same = same or {type(saved), type(fresh)} == {type(None), bool}
    return [] if same else [f"{where}: {kind(saved)}, expected {kind(fresh)}"]


def options_problems(saved: dict[str, Any], expected: dict[str, Any], where: str) -> list[str]:
    """Each option whose value in ``saved`` is not the one the recipe gives (``expected``)."""
    return [f"{where}.{key}: {saved.get(key)!r}, but the recipe gives {expected.get(key)!r}"
            for key in dict.fromkeys([*expected, *saved]) if saved.get(key) != expected.get(key)]


def counts_problems(saved: Any, where: str) -> list[str]:
    """``saved`` must be a table of counts by name (warnings by kind, ...)."""
    if isinstance(saved, dict) and all(isinstance(k, str) and type(v) is int and v >= 0 for k, v in saved.items()):
        return []
    return [f"{where}: {kind(saved)}, expected a table of counts (names to whole numbers >= 0)"]


def number_problems(saved: Any, where: str) -> list[str]:
    return [] if type(saved) in _NUMBER else [f"{where}: {kind(saved)}, expected a number"]


def optimizer_problems(saved: Any, optimizer: torch.optim.Optimizer, where: str = "optimizer") -> list[str]:
    """The optimizer state must be this stage's optimizer's: its param groups (same parameters, same
    settings' types) and, for AdamW and SGD, each parameter's moments in the parameter's shape."""
    fresh = optimizer.state_dict()
    if not isinstance(saved, dict) or saved.keys() != fresh.keys():
        return [f"{where}: {kind(saved)}, expected a table of state, param_groups"]
    problems = same_types(saved["param_groups"], fresh["param_groups"], f"{where}.param_groups")
    if problems or [g["params"] for g in saved["param_groups"]] != [g["params"] for g in fresh["param_groups"]]:
        return problems or [f"{where}.param_groups: holds other parameters than this stage trains"]
    problems = _settings_problems(saved["param_groups"], fresh["param_groups"], f"{where}.param_groups")
    if problems:
        return problems
    params = dict(zip((i for g in fresh["param_groups"] for i in g["params"]),
                      (p for g in optimizer.param_groups for p in g["params"]), strict=True))
    state = saved["state"]
    if not isinstance(state, dict) or not all(k in params and isinstance(v, dict) for k, v in state.items()):
        return [f"{where}.state: not a table of this stage's parameters' states"]
    expected = _PER_PARAMETER.get(type(optimizer), {})  # L-BFGS keeps one state of its own: not checked deeper
    return [f"{where}.state.{i}.{key}: {kind(value.get(key))}, expected {kind(_expected(shape, params[i]))}"
            for i, value in state.items() for key, shape in expected.items()
            if not _same_tensor(value.get(key), _expected(shape, params[i]))
            and not (shape == "buffer" and value.get(key) is None)]


def _settings_problems(saved: list[dict[str, Any]], fresh: list[dict[str, Any]], where: str) -> list[str]:
    """Each param group's setting that is not the one this stage's options give (betas, weight_decay,
    initial_lr, ...): of the right type, it would silently change every step after the resume. The lr
    moves with the schedule (:func:`schedule_problems` checks it); torch's flags may be None: "torch chooses"."""
    return [f"{where}[{i}].{key}: {s[key]!r}, but the recipe gives {f[key]!r}"
            for i, (s, f) in enumerate(zip(saved, fresh, strict=True)) for key in f
            if key not in ("params", "lr") and None not in (s[key], f[key]) and s[key] != f[key]]


def schedule_problems(optimizer: dict[str, Any], scheduler: dict[str, Any], fresh: dict[str, Any]) -> list[str]:
    """The saved lr schedule (``scheduler``, of the right types) must start from this stage's lrs, as
    ``fresh`` (the one this stage built) does, and each saved param group's lr must be the one it set last."""
    problems = []
    if "base_lrs" in fresh and scheduler["base_lrs"] != fresh["base_lrs"]:
        problems.append(f"scheduler.base_lrs: {scheduler['base_lrs']!r}, but the recipe gives {fresh['base_lrs']!r}")
    last = scheduler.get("_last_lr", [group["lr"] for group in optimizer["param_groups"]])
    return problems + [f"optimizer.param_groups[{i}].lr: {group['lr']!r}, but the schedule set {lr!r}"
                       for i, (group, lr) in enumerate(zip(optimizer["param_groups"], last, strict=True))
                       if group["lr"] != lr]


# the per-parameter state each optimizer's step reads: "step" a 0-dim float tensor, "moment" the
# parameter's shape and dtype, "buffer" the same or None (SGD keeps none without momentum)
_PER_PARAMETER = {torch.optim.AdamW: {"step": "step", "exp_avg": "moment", "exp_avg_sq": "moment"},
                  torch.optim.SGD: {"momentum_buffer": "buffer"}}


def _expected(shape: str, param: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=torch.float32) if shape == "step" else param.detach()


def plain_problems(value: Any, where: str) -> list[str]:
    """``value`` must be what metrics.jsonl and summary.json hold: numbers, strings, booleans, None,
    lists and tables of them (a stage's metrics and results)."""
    if value is None or isinstance(value, str | bool | int | float):
        return []
    if isinstance(value, list | tuple):
        return [p for i, v in enumerate(value) for p in plain_problems(v, f"{where}[{i}]")]
    if isinstance(value, dict):
        return [p for k, v in value.items()
                for p in ([] if isinstance(k, str) else [f"{where}: key {k!r} is not a string"]) +
                plain_problems(v, f"{where}.{k}")]
    return [f"{where}: {kind(value)}, not a number, string, list or table"]


def _same_tensor(saved: Any, fresh: torch.Tensor) -> bool:
    return isinstance(saved, torch.Tensor) and saved.shape == fresh.shape and saved.dtype == fresh.dtype


def _byte_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1


def _numpy_state_ok(numpy: Any) -> bool:
    """numpy checks none of pos's range (out of it, a draw reads out of bounds: a segfault) nor the keys'
    values (all zero: MT19937 draws nothing but zeros)."""
    if not isinstance(numpy, dict) or numpy.keys() != {"kind", "keys", "pos", "has_gauss", "gauss"}:
        return False
    keys, pos = numpy["keys"], numpy["pos"]
    return (numpy["kind"] == "MT19937" and isinstance(keys, torch.Tensor) and keys.dtype == torch.int64
            and keys.shape == (_MT_WORDS,) and bool(((keys >= 0) & (keys < 2**32)).all()) and bool(keys.any())
            and type(pos) is int and 0 <= pos <= _MT_WORDS and numpy["has_gauss"] in (0, 1)
            and type(numpy["has_gauss"]) is int and type(numpy["gauss"]) is float)


def _python_gauss_ok(state: Any) -> bool:
    return isinstance(state, list | tuple) and len(state) == 3 and (state[2] is None or type(state[2]) is float)


def _refusal(trial: Any) -> str | None:
    """What a generator said refusing a state (its own words), or None if it took it."""
    try:
        trial()
    except (TypeError, ValueError, OverflowError, RuntimeError, KeyError, IndexError, AttributeError) as exc:
        return " ".join(str(exc).split()) or type(exc).__name__
    return None


def kind(value: Any) -> str:
    """How a problem names what it found: "a torch.float32 tensor of shape (3,)", "an int", "nothing"."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    name = type(value).__name__
    return "nothing" if value is None else f"{'an' if name[0] in 'aeiou' else 'a'} {name}"
