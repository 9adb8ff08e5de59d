"""Compare a run's final metrics with a golden record.

A golden file is JSON: ``{"metrics": {name: value}, "tolerance": {name: abs_tol}}``. Every
golden metric must match exactly unless the file gives it an explicit absolute tolerance. The
run's wall-clock measurements (each stage's ``"measured"`` in summary.json) are compared only
where the golden file gives them a tolerance: no two runs take the same time, so another run's summary.json still
verifies a rerun.

CPU numbers are bit-identical on the same kind of CPU only (:mod:`stagewise.engine.cpu`), so a golden
file may keep the same metrics as made on other kinds: ``"cpu"`` names the kind of ``metrics``,
``"by_cpu"`` maps other kinds to theirs, and a run matches when it matches one of them. A run on a kind
none of them names matches within ``"cpu_tolerance"`` (relative) where the file gives one. A run on a GPU
(its summary's ``"device"``) is of that GPU's kind, as if it were another CPU's.
"""

from __future__ import annotations

import json
import math
import stat
import warnings
from pathlib import Path
from typing import Any, NamedTuple

from stagewise.engine.rundir import read_number, write_json_atomic
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
    """One line per golden metric the run misses or differs in (measured ones aside), then, if any,
    the note on the CPU kind the golden file has no record for."""
    report = verify_report(run_dir, golden_path)
    return report.differences + [report.cpu_note] if report.differences and report.cpu_note else report.differences


class Report(NamedTuple):
    differences: list[str]  # one line per golden metric the run misses or differs in
    skipped: list[str]  # the run's measured metrics left out of the comparison
    names: tuple[str, Any] | None  # (the golden record's run name, the run's) where they differ (a summary.json)
    cpu_note: str | None = None  # the golden file has no record for the run's kind of CPU: what was done instead


def read_summary(run_dir: Path) -> dict[str, Any]:
    """A finished run's ``summary.json``; CheckpointError, saying why, for a folder without one."""
    path = Path(run_dir) / "summary.json"
    if not path.exists() and (Path(run_dir) / "recipe.toml").is_file():  # started, then stopped or still running
        raise CheckpointError(f"{path} not found: the run has not finished; if it was stopped, "
                              f"'stagewise run {Path(run_dir) / 'recipe.toml'} --resume {run_dir}' continues it")
    summary = load_json(path, "summary.json (did the run finish?)")
    if not isinstance(summary, dict) or not isinstance(summary.get("metrics"), dict):
        raise CheckpointError(f"{path} has no 'metrics' object: is {run_dir} a stagewise run directory?")
    return summary


def verify_report(run_dir: Path, golden_path: Path) -> Report:
    summary = read_summary(run_dir)
    golden = load_json(golden_path, "golden file")
    metrics, tolerance = golden_tables(golden, golden_path)
    skipped = [key for key in measured_metrics(summary) if key in metrics and key not in tolerance]
    records = {kind: {key: value for key, value in record.items() if key not in skipped}
               for kind, record in cpu_records(golden, golden_path).items()}
    differences, note = _against_records(summary["metrics"], records, tolerance, numbers_kind(summary),
                                         cpu_tolerance(golden, golden_path), golden_path)
    golden_name, run_name = golden.get("recipe"), summary.get("recipe")
    names = (golden_name, run_name) if isinstance(golden_name, str) and golden_name != run_name else None
    return Report(differences, skipped, names, note)


def _against_records(actual: dict[str, Any], records: dict[str | None, dict[str, Any]], tolerance: dict[str, float],
                     run: tuple[str | None, str], loose: float | None, path: Path) -> tuple[list[str], str | None]:
    """The differences from the record of the run's kind of CPU, or, without one, from the file's first
    record; nothing where the run matches any record. Where the file has no record for the run's known
    kind (``run``: the kind and "CPU" or "GPU"), the note says so and how to add one, and ``loose``
    (relative) may still let the run match."""
    tried = {kind: compare(actual, record, tolerance) for kind, record in records.items()}
    if not all(tried.values()):
        return [], None
    cpu, processor = run
    if cpu is None or cpu in records:  # this kind's own record: exact, as ever (or nothing known of kinds)
        return tried.get(cpu) or next(iter(tried.values())), None
    kinds = ", ".join(repr(kind) if kind else "one whose kind is not said" for kind in records)
    note = (f"{path} has no record made on this run's kind of {processor}, {cpu!r} (its records: {kinds}); "
            f"{processor} numbers are bit-identical on the same kind only: 'stagewise verify RUN_DIR {path} "
            f"--add-cpu-record' adds one")
    if loose is not None and any(not compare(actual, record, _loosened(tolerance, record, loose))
                                 for record in records.values()):
        warnings.warn(f"matched within cpu_tolerance {loose}: {note}", stacklevel=2)
        return [], f"matched within the file's cpu_tolerance {loose}, not exactly: {note}"
    return next(iter(tried.values())), note


def _loosened(tolerance: dict[str, float], record: dict[str, Any], loose: float) -> dict[str, float]:
    """Each number's tolerance widened to ``loose`` of its golden value (other kinds of CPU sum in another order)."""
    numbers = {key: _number(value) for key, value in record.items()}  # "inf" and Infinity alike stay exact
    return {key: max(tolerance.get(key, 0.0), loose * abs(value)) if _numbers(value, 0) and math.isfinite(value)
            else tolerance.get(key, 0.0) for key, value in numbers.items()}


def cpu_records(golden: dict[str, Any], path: Path) -> dict[str | None, dict[str, Any]]:
    """The golden metrics by kind of CPU: ``metrics`` (its kind ``cpu``, or None where not said) first,
    then ``by_cpu``'s, each with the same metric names."""
    if not isinstance(golden.get("cpu", ""), str):
        raise ConfigError([f"'cpu' must be a string, the kind of CPU 'metrics' was made on (a run's summary.json "
                           f"says it), not {json.dumps(golden['cpu'])}"], str(path))
    records: dict[str | None, dict[str, Any]] = {golden.get("cpu"): golden["metrics"]}
    others = golden.get("by_cpu", {})
    if not isinstance(others, dict) or not all(isinstance(r, dict) for r in others.values()):
        raise ConfigError(["'by_cpu' must be an object of CPU kinds and objects of metric names and values, "
                           "the same metrics as 'metrics' as made on that kind of CPU"], str(path))
    if golden.get("cpu") in others:  # its record would silently take the place of 'metrics'
        raise ConfigError([f"by_cpu names {golden['cpu']!r}, the kind of CPU 'metrics' was made on ('cpu'): a kind "
                           f"has one record"], str(path))
    for kind, record in others.items():
        if set(record) != set(golden["metrics"]):
            raise ConfigError([f"by_cpu[{kind!r}] must hold the metrics 'metrics' holds: "
                               f"{', '.join(sorted(set(record) ^ set(golden['metrics'])))} differ"], str(path))
        records[kind] = record
    return records


def add_cpu_record(run_dir: Path, golden_path: Path) -> tuple[str, float, bool]:
    """Write the run's values of the golden metrics into ``golden_path`` as the record for the run's kind of
    CPU; the kind, the largest relative difference from the file's other records, and whether the run matched
    the record whose kind was not said exactly, which is then named the run's kind instead."""
    summary = read_summary(run_dir)
    golden = load_json(golden_path, "golden file")
    metrics, tolerance = golden_tables(golden, golden_path)
    records, (kind, _) = cpu_records(golden, golden_path), numbers_kind(summary)
    if kind is None:
        raise CheckpointError(f"{Path(run_dir) / 'summary.json'} does not say which kind of CPU the run was made on "
                              f"(a run from before runs kept it): run the recipe again")
    if kind in records:  # a run that differs from its own kind's record is a behaviour change, not a new record
        raise ConfigError([f"it has a record for {kind!r} already; a change of it is a behaviour change: make it "
                           f"by hand, saying why"], str(golden_path))
    missing = sorted(set(metrics) - set(summary["metrics"]))
    if missing:
        raise CheckpointError(f"{run_dir} lacks golden metrics {', '.join(missing)}: is it a run of the same recipe?")
    if not Path(golden_path).stat().st_mode & stat.S_IWUSR:  # the atomic rename would replace it all the same
        raise CheckpointError(f"{golden_path} is read-only: make it writable to add the record for {kind!r}")
    record = {key: summary["metrics"][key] for key in metrics}
    compared = set(metrics) - (set(measured_metrics(summary)) - set(tolerance))  # as verify compares them
    unnamed = records.get(None)
    if unnamed is not None and not compare(summary["metrics"], {k: unnamed[k] for k in compared}, tolerance):
        write_json_atomic(golden_path, {"cpu": kind, **golden})  # made on this kind: exact here from now on
        return kind, 0.0, True
    spreads = [max((_relative(read_number(record[k]), _number(r[k])) for k in compared), default=0.0)
               for r in records.values()]
    loose = cpu_tolerance(golden, golden_path)
    if loose is not None and min(spreads) > loose:  # e.g. the kind that made an unnamed record, after a change
        raise ConfigError([f"{run_dir} differs from each of its records by more than its cpu_tolerance {loose} "
                           f"(from the nearest by {min(spreads):.3g}): a behaviour change, not another kind of "
                           f"CPU's last digits; add a record only from a run of the code that made the others"],
                          str(golden_path))
    golden.setdefault("by_cpu", {})[kind] = record
    write_json_atomic(golden_path, golden)
    return kind, max(spreads), False


def numbers_kind(summary: dict[str, Any]) -> tuple[str | None, str]:
    """The kind of processor a run's numbers were made on, and "CPU" or "GPU": its GPU's (``"device"``) where it
    ran on one, else its CPU's (None for a run from before runs kept it)."""
    if isinstance(summary.get("device"), str):
        return summary["device"], "GPU"
    return (summary["cpu"] if isinstance(summary.get("cpu"), str) else None), "CPU"


def _relative(value: Any, expected: Any) -> float:
    """How far ``value`` is from ``expected``, relative to it; inf for values that are not numbers and differ."""
    if not _numbers(value, expected):
        return 0.0 if value == expected else math.inf
    if value == expected or math.isnan(value) and math.isnan(expected):
        return 0.0
    finite = math.isfinite(value) and math.isfinite(expected)  # NaN or an infinity against another number
    return abs(value - expected) / abs(expected) if expected and finite else math.inf


def cpu_tolerance(golden: dict[str, Any], path: Path) -> float | None:
    loose = golden.get("cpu_tolerance")
    if loose is not None and not (_numbers(loose, 0) and loose >= 0):
        raise ConfigError([f"'cpu_tolerance' must be a number >= 0 (relative), not {json.dumps(loose)}"], str(path))
    return loose


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
