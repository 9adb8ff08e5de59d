"""Exceptions raised by stagewise. The CLI turns each into a one-paragraph message and exit 1."""

from __future__ import annotations

from pathlib import Path


class StagewiseError(Exception):
    """Base class: every error stagewise raises on purpose. Users see its message."""


class ConfigError(StagewiseError):
    """A recipe (or ``--set`` override) is invalid; the message lists every problem found.

    ``problems`` read ``KEY.PATH: message`` (or ``KEY, KEY: message``). ``overrides`` maps the key
    paths ``--set`` gave to its argument: the message marks each key set so, or inside a table set
    so, as ``data.path (from --set data.path=x)``, as ``source`` (the recipe file) did not hold it."""

    def __init__(self, problems: list[str], source: str = "recipe", overrides: dict[str, str] | None = None):
        self.problems = list(problems)
        self.source = source
        lines = "\n".join(f"  - {_mark_overrides(p, overrides or {})}" for p in self.problems)
        n = len(self.problems)
        super().__init__(f"{source}: {n} problem{'s' if n != 1 else ''}:\n{lines}")


def _mark_overrides(problem: str, overrides: dict[str, str]) -> str:
    keys, sep, message = problem.partition(": ")
    return ", ".join(_from_set(key, overrides) for key in keys.split(", ")) + sep + message if sep else problem


def _from_set(path: str, overrides: dict[str, str]) -> str:
    """``path``, marked with the override that set it or a table holding it (the longest such key)."""
    keys = [key for key in overrides if path == key or path.startswith(f"{key}.")]
    return f"{path} (from --set {overrides[max(keys, key=len)]})" if keys else path


class OptionError(StagewiseError, ValueError):
    """An Options dataclass's ``__post_init__`` refuses values, naming the key of each problem; raise it
    through :func:`stagewise.check_options`. A recipe reports each as ``TABLE.KEY: message``.

    ``problems`` maps a key, or a tuple of the key a problem names and the other keys its check read,
    to what is wrong with its value; a problem whose check read a key with a type problem is not reported.
    """

    def __init__(self, problems: dict[str | tuple[str, ...], str]):
        self.problems = {(key,) if isinstance(key, str) else tuple(key): message for key, message in problems.items()}
        super().__init__("; ".join(f"{keys[0]}: {message}" for keys, message in self.problems.items()))


class UnknownNameError(StagewiseError):
    """A recipe names a stage, router, loss, model, dataset or recipe that no plugin registered."""


class PluginError(StagewiseError):
    """A plugin failed to load or registered something invalid (raised in strict mode or on collisions),
    or one of its components broke its contract in a run: a Loss returned no scalar tensor, a stage
    or hook gave a value metrics.jsonl or a checkpoint cannot hold."""


class CheckpointError(StagewiseError):
    """A checkpoint or run directory is missing, corrupt, truncated or from another recipe."""


class TrainingError(StagewiseError):
    """Training cannot go on, e.g. too many non-finite losses in a row."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run whose directory holds its recipe.toml (from the moment the folder's
    making wrote it): ``run_dir`` is where ``--resume`` continues it.

    A KeyboardInterrupt still, so code that stops on Ctrl-C keeps stopping."""

    def __init__(self, run_dir: Path):
        super().__init__(str(run_dir))
        self.run_dir = run_dir


class RunStopped(RunInterrupted):
    """A signal (SIGTERM: a cluster's preemption) stopped a run whose directory holds its recipe.toml.
    ``where`` the run wrote the checkpoint it stopped at (e.g. "after step 7 of stage 'phase1'"); None
    when a second signal stopped it at once, so that it goes on from its last checkpoint. ``signal``: the
    signal's name, None when another process of a torchrun job got it. The CLI exits 143 (128 + 15)."""

    def __init__(self, run_dir: Path, signal: str | None, where: str | None):
        super().__init__(run_dir)
        self.signal, self.where = signal, where

    def __str__(self) -> str:
        if self.where is None:
            return f"stopped at once by a second {self.signal}; it goes on from its last checkpoint"
        by = self.signal or "a signal to another process of the job"
        return f"stopped by {by} {self.where}, checkpointed there"
