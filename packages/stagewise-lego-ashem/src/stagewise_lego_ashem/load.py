"""A finished run's calibrated router back in Python, beside ``stagewise.load_model``'s model."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from stagewise.engine.checkpoint import load_checkpoint
from stagewise.engine.resumable import kind
from stagewise.errors import CheckpointError
from stagewise.load import checkpoint_of
from stagewise.schema import build_dataclass
from stagewise_lego_ashem.mining import ROUTER
from stagewise_lego_ashem.router import Confidence, ConfidenceOptions


def load_router(source: str | Path) -> Confidence:
    """The calibrated router a run kept, from ``source`` (a run directory: its last checkpoint; or a
    checkpoint file written after the ``lego_ashem.mine`` stage): its options (measure, hard_ratio)
    and ``threshold``, ready for ``routed_forward(model, idx, router, router.threshold)`` and
    ``generate_routed`` with ``stagewise.load_model(source)``. With ``measure = "probe"`` the router
    scores with the model's ``exit_probe``, so it routes only with the model loaded from the same
    checkpoint (``load_model``); a checkpoint whose model has no probe is refused."""
    checkpoint = checkpoint_of(source)
    saved = load_checkpoint(checkpoint, ("recipe", "model"))
    if "routers" not in saved:  # not a checkpoint of the wrong stage: naming the stages after mine would mislead
        raise CheckpointError(f"{checkpoint}: written by an earlier stagewise, which kept no routers in checkpoints; "
                              f"run the recipe again to load its router")
    routers = saved["routers"]
    if not isinstance(routers, dict) or ROUTER not in routers:
        raise CheckpointError(f"{checkpoint}: holds no calibrated router ({ROUTER}, which a lego_ashem.mine stage "
                              f"keeps); {_with_router(saved['recipe'])}")
    problems: list[str] = []
    router = _kept_router(routers[ROUTER], f"routers.{ROUTER}", problems)
    if router is not None and router.options.measure == "probe" and "exit_probe.weight" not in saved["model"]:
        problems.append(f"routers.{ROUTER}.options.measure: 'probe', but the checkpoint's model has no exit_probe")
    if problems or router is None:  # None comes with a problem: _kept_router appends one
        raise CheckpointError(f"{checkpoint}: not the router a run keeps: {'; '.join(problems)}; use a checkpoint "
                              f"the run wrote, untouched (or run the recipe again)")
    return router


def _with_router(recipe: dict[str, Any]) -> str:
    """What to load instead: the checkpoints of ``recipe``'s first lego_ashem.mine stage and the stages after it."""
    stages = [s for s in recipe.get("stages", []) if isinstance(s, dict)]
    mine = next((i for i, s in enumerate(stages) if s.get("use") == "lego_ashem.mine"), None)
    if mine is None:
        return "its recipe has no lego_ashem.mine stage, which calibrates the router: add one and run it again"
    names = ", ".join(f"{s.get('checkpoint', s.get('name'))}.pt" for s in stages[mine:])
    return f"use a checkpoint written after the mine stage: {names} (in the run's checkpoints/)"


def _kept_router(record: Any, where: str, problems: list[str]) -> Confidence | None:
    """The router ``record`` (as ``state.keep_router`` writes it: use, options, state) describes;
    None, each problem appended under its key path, when it is not what a run keeps."""
    if not isinstance(record, dict) or record.keys() != {"use", "options", "state"}:
        problems.append(f"{where}: {kind(record)}, expected a table of use, options, state")
        return None
    if record["use"] != Confidence.name:
        problems.append(f"{where}.use: {record['use']!r}, expected {Confidence.name!r}")
    options = build_dataclass(ConfidenceOptions, record["options"], f"{where}.options", problems)
    state = record["state"]
    if not (isinstance(state, dict) and state.keys() == {"threshold"}):
        found = f"keys {sorted(map(str, state))}" if isinstance(state, dict) else kind(state)
        problems.append(f"{where}.state: {found}, expected a table of threshold alone")
    elif not (type(state["threshold"]) in (int, float) and math.isfinite(state["threshold"])):
        problems.append(f"{where}.state.threshold: {state['threshold']!r}, expected a finite number (the "
                        f"calibrated confidence)")
    if problems:
        return None
    router = Confidence(options)
    router.load_state_dict(state)
    return router
