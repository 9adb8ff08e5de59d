"""Compare a run's final metrics with a golden record.

A golden file is JSON: ``{"metrics": {name: value}, "tolerance": {name: abs_tol}}``. Every
golden metric must match exactly unless the file gives it an explicit absolute tolerance. The
run's wall-clock measurements (each stage's ``"measured"`` in summary.json) are compared only
where the golden file gives them a tolerance: no two runs take the same time, so another run's summary.json still
verifies a rerun.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple

from stagewise.engine.rundir import read_number
from stagewise.errors import CheckpointError, ConfigError


def load_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: {what} not found") from exc
    except OSError as exc:  # a folder, no permission
        raise CheckpointError(f"{path}: cannot read the {what}: {exc.strerror}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError([f"not valid JSON: {exc}"], str(path)) from exc
    except (RecursionError, ValueError) as exc:  # nested too deeply; an integer of too many digits
        problem = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).split(";")[0]
        raise ConfigError([f"cannot be read as JSON: {problem}"], str(path)) from None


def compare(actual: dict[str, Any], golden: dict[str, Any], tolerance: dict[str, float]) -> list[str]:
    """One line per golden metric that is missing or differs beyond its tolerance."""
    differences = []
    for key, expected in golden.items():
        if key not in actual:
            differences.append(f"{key}: missing from the run (golden {expected!r})")
            continue
        value, expected = _number(actual[key]), _number(expected)
        tol = tolerance.get(key, 0.0)
        if not _close(value, expected, tol):
            delta = f" (diff {value - expected:+.3g}, tolerance {tol})" if _numbers(value, expected) else ""
            differences.append(f"{key}: run {value!r} != golden {expected!r}{delta}")
    return differences


def verify_run(run_dir: Path, golden_path: Path) -> list[str]:
    """One line per golden metric the run misses or differs in (measured ones aside)."""
    return verify_report(run_dir, golden_path).differences


class Report(NamedTuple):
    differences: list[str]  # one line per golden metric the run misses or differs in
    skipped: list[str]  # the run's measured metrics left out of the comparison
    names: tuple[str, str] | None  # (the golden record's run name, the run's) where they differ (a summary.json)


def verify_report(run_dir: Path, golden_path: Path) -> Report:
    path = Path(run_dir) / "summary.json"
    summary = load_json(path, "summary.json (did the run finish?)")
    if not isinstance(summary, dict) or not isinstance(summary.get("metrics"), dict):
        raise CheckpointError(f"{path} has no 'metrics' object: is {run_dir} a stagewise run directory?")
    golden = load_json(golden_path, "golden file")
    metrics, tolerance = golden_tables(golden, golden_path)
    skipped = [key for key in measured_metrics(summary) if key in metrics and key not in tolerance]
    compared = {key: value for key, value in metrics.items() if key not in skipped}
    names = (golden.get("recipe"), summary.get("recipe"))
    differ = isinstance(names[0], str) and names[0] != names[1]
    return Report(compare(summary["metrics"], compared, tolerance), skipped, names if differ else None)


def measured_metrics(summary: dict[str, Any]) -> list[str]:
    """The run's metrics that are wall-clock measurements: each stage's ``measured`` list."""
    stages = summary.get("stages")
    results = stages.values() if isinstance(stages, dict) else ()
    lists = [result.get("measured") for result in results if isinstance(result, dict)]
    return sorted({key for keys in lists if isinstance(keys, list) for key in keys if isinstance(key, str)})


def golden_tables(golden: Any, path: Path) -> tuple[dict[str, Any], dict[str, float]]:
    """The golden file's metrics and tolerances, or a ConfigError saying what its form must be."""
    form = '(expected {"metrics": {name: value}, "tolerance": {name: abs_tol}})'
    if not isinstance(golden, dict) or not isinstance(golden.get("metrics"), dict):
        raise ConfigError([f"'metrics' must be an object of metric names and values {form}"], str(path))
    tolerance = golden.get("tolerance", {})
    if not isinstance(tolerance, dict):
        raise ConfigError([f"'tolerance' must be an object of metric names and numbers >= 0 {form}"], str(path))
    bad = [f"{name!r} is {json.dumps(t)}" for name, t in tolerance.items() if not (_numbers(t, 0) and t >= 0)]
    if bad:  # a negative or NaN tolerance would match nothing
        raise ConfigError([f"'tolerance' must be an object of metric names and numbers >= 0 {form}: "
                           f"{', '.join(bad)}"], str(path))
    unknown = sorted(set(tolerance) - set(golden["metrics"]))
    if unknown:  # a misspelt name would leave its metric compared exactly, unsaid
        raise ConfigError([f"'tolerance' names {', '.join(map(repr, unknown))}, which 'metrics' lacks; a tolerance "
                           f"applies to a golden metric: correct the name or add the metric"], str(path))
    return golden["metrics"], tolerance


def _numbers(a: Any, b: Any) -> bool:
    return all(isinstance(x, int | float) and not isinstance(x, bool) for x in (a, b))


def _number(value: Any) -> Any:
    """summary.json writes NaN/Inf as the strings "nan"/"inf"/"-inf" (strict JSON); a golden file
    may hold them either so or as Python's json writes them: compare them as numbers."""
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            float(value)
        except OverflowError:  # an integer beyond float's range: compare it as infinite
            return math.inf if value > 0 else -math.inf
    return read_number(value)


def _close(value: Any, expected: Any, tol: float) -> bool:
    if _numbers(value, expected):
        if math.isnan(value) and math.isnan(expected):
            return True
        return value == expected or abs(value - expected) <= tol  # == first: inf - inf is nan
    return value == expected
