"""Recipes: TOML files validated into dataclasses before anything runs.

``load_recipe(path_or_name, overrides)`` reads the file (or a recipe a plugin registered),
applies ``--set key.path=value`` overrides, and validates everything, reporting every problem
at once with the file, the key path and the valid choices. Nothing is written on failure.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from stagewise import plugins
from stagewise.errors import ConfigError, StagewiseError, UnknownNameError
from stagewise.install import install_command
from stagewise.names import alike, how_alike, windows_problem
from stagewise.schema import NoOptions, as_table, build_dataclass, check_options, named_paths, unknown_key_message
from stagewise.specs import MAX_NAME_BYTES, DataSpec, LossSpec, ModelSpec, StageSpec
from stagewise.tomlwrite import dumps

SEED_LIMIT = 2**40  # batches.epoch_order seeds torch with seed * 1_000_003 + ...: it must stay within 64 bits
MAX_THREADS = 1024  # torch starts as many threads as asked: 10**6 of them crash the process


@dataclass
class RunOptions:
    """The ``[run]`` table."""

    name: str = "run"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    out: str = "runs"  # parent folder of the run directory (``--out`` names the folder itself)
    deterministic: bool = True  # torch.use_deterministic_algorithms (bit-identical CPU runs)
    log_every_n_steps: int = 10  # step records in metrics.jsonl
    checkpoint_every_n_steps: int = 0  # extra mid-epoch checkpoints; 0 = at epoch ends only
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    tensorboard: bool = False  # also write TensorBoard scalars to RUN_DIR/tensorboard (extra [tensorboard])
    # forward passes and loss terms under bfloat16 autocast ("bf16"); fp16 is not offered: it needs loss scaling
    precision: Literal["fp32", "bf16"] = "fp32"

    def __post_init__(self) -> None:
        one_name = bool(self.name) and self.name not in (".", "..") and not any(c in self.name for c in "/\\\0")
        check_options([
            (one_name, "name",
             f"{self.name!r}: the run directory's name under `out`; use a non-empty name without '/', '\\' or NUL"),
            (len(self.name.encode("utf-8")) <= MAX_NAME_BYTES, "name",
             f"{len(self.name.encode('utf-8'))} bytes long (in UTF-8); the run directory's name holds at most "
             f"{MAX_NAME_BYTES}: use a shorter name"),
            # a run directory is copied whole to other machines: its folder's name must be one Windows can hold
            (not one_name or windows_problem(self.name) is None, "name",
             f"{self.name!r} names the run directory: {windows_problem(self.name)}"),
            ("\0" not in self.out, "out", f"{self.out!r}: a path holds no NUL character"),
            (-SEED_LIMIT < self.seed < SEED_LIMIT, "seed", f"must be between -2**40 and 2**40 (the engine derives "
             f"torch's 64-bit seeds of each stage and epoch from it), got {self.seed}"),
            (self.log_every_n_steps >= 1, "log_every_n_steps", f"must be >= 1, got {self.log_every_n_steps}"),
            (self.checkpoint_every_n_steps >= 0, "checkpoint_every_n_steps",
             f"must be >= 0 (0 = at epoch ends only), got {self.checkpoint_every_n_steps}"),
            (self.threads >= 0, "threads", f"must be >= 0 (0 = torch's default), got {self.threads}"),
            (self.threads <= MAX_THREADS, "threads", f"must be at most {MAX_THREADS}, got {self.threads}"),
            (not self.tensorboard or importlib.util.find_spec("tensorboard") is not None, "tensorboard",
             f"true needs TensorBoard, which is not installed; {install_command('stagewise', 'tensorboard')} "
             f"or set tensorboard = false"),
        ])
        self.out = os.path.expanduser(self.out)  # "~/runs": no shell expands ~ inside a TOML string


@dataclass
class Recipe:
    """A validated recipe."""

    run: RunOptions
    data: DataSpec
    model: ModelSpec
    stages: list[StageSpec]
    source: str = "<recipe>"
    table: dict[str, Any] = field(default_factory=dict, repr=False)  # resolved, as TOML data
    overrides: dict[str, str] = field(default_factory=dict, repr=False)  # key path -> the --set that gave it

    def to_toml(self) -> str:
        return dumps(self.table)

    def error(self, problems: list[str]) -> ConfigError:
        """A ConfigError naming the recipe file, each problem marked if ``--set`` gave its value."""
        return ConfigError(problems, self.source, self.overrides)

    def stage_path(self, index: int) -> str:
        """How a problem names stage ``index``: ``stages.NAME``, as ``--set`` addresses it (see
        :func:`~stagewise.schema.named_paths`)."""
        return named_paths("stages", [stage.name for stage in self.stages])[index]

    def fitted_on(self, index: int, split: str) -> list[str]:
        """What the stages before ``index`` fitted on ``split`` by their ``fits_on``, one entry per
        stage, e.g. ``["stage 'mine' calibrated the threshold and mined the phase-2 cache"]``;
        empty when ``split`` is held-out from them."""
        found = []
        for spec in self.stages[:index]:
            roles = [role for fitted, role in spec.build().fits_on() if fitted == split]
            if roles:
                found.append(f"stage {spec.name!r} {' and '.join(roles)}")
        return found

    def model_options_at(self, index: int) -> Any:
        """The model's options while stage ``index`` runs (after every ``grow`` up to it)."""
        changes = {k: v for stage in self.stages[: index + 1] for k, v in stage.grow.items()}
        return dataclasses.replace(self.model.options, **changes)


TOP_LEVEL = ("run", "data", "model", "stages")


def load_recipe(recipe: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load, override and validate a recipe file or a registered recipe name."""
    raw, path = read_recipe_table(recipe)
    return recipe_from_table(raw, str(path), overrides or [])


def read_recipe_table(recipe: str | Path) -> tuple[dict[str, Any], Path]:
    """The recipe's TOML table as written (data paths made absolute), not yet validated, and its file."""
    path = resolve_recipe_path(recipe)
    source = str(path)
    try:
        data = Path(path).read_bytes()
        raw = tomllib.loads(data.decode("utf-8-sig"))  # a BOM, as Notepad writes, is not TOML's
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"not valid TOML: {exc}"], source) from exc
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError([f"not UTF-8 text: byte 0x{data[exc.start]:02x} at line {line} cannot be read "
                           f"(TOML files are UTF-8); save the file as UTF-8"], source) from None
    except RecursionError:
        raise ConfigError(["not valid TOML: arrays or tables nested too deeply to read"], source) from None
    except OSError as exc:
        raise ConfigError([f"cannot read the file: {exc}"], source) from exc
    anchor_data_paths(raw, path.parent)
    return raw, path


def anchor_data_paths(raw: dict[str, Any], base: Path, keys: set[str] | None = None) -> None:
    """Make the relative file paths of the ``[data]`` table absolute from ``base`` (``~`` is
    expanded): from the recipe file's folder for the paths written in it, wherever the command
    runs, and from the working directory for those ``--set`` gives (``keys``, applied later), so
    the run directory's recipe.toml runs again from anywhere. Path keys: ``path``, and the dataset
    options marked ``field(metadata={"path": True})``, e.g. stagewise.idx's images and labels."""
    data = raw.get("data")
    if not isinstance(data, dict):
        return
    for key in data_path_keys(data) & (set(data) if keys is None else keys):
        if isinstance(data.get(key), str):
            data[key] = os.path.normpath(base.resolve() / Path(data[key]).expanduser())  # absolute: kept


def resolve_recipe_path(recipe: str | Path) -> Path:
    candidate = Path(recipe)
    if candidate.suffix == ".toml" or candidate.is_file():  # a folder named "demo" is not the recipe
        if not candidate.exists():
            raise ConfigError(["file not found"], str(candidate))
        return candidate
    name = str(recipe)
    if "." not in name and f"stagewise.{name}" in plugins.registries()["recipes"].entries:
        name = f"stagewise.{name}"  # core's own recipes answer to their short name
    try:
        return Path(str(plugins.get("recipes", name)))
    except UnknownNameError as exc:
        if candidate.is_dir():
            raise ConfigError(["a directory, not a recipe file: give the recipe's .toml file (or a registered "
                               "recipe name, see 'stagewise recipes')"], str(recipe)) from None
        raise ConfigError([f"not a file and not a registered recipe: {exc}"], str(recipe)) from exc


def recipe_from_table(raw: dict[str, Any], source: str, overrides: list[str]) -> Recipe:
    problems: list[str] = []
    raw = copy.deepcopy(raw)
    set_by = {key: item for item in overrides if (key := apply_override(raw, item, problems)) is not None}
    anchor_data_paths(raw, Path.cwd(), None if "data" in set_by else
                      {k.removeprefix("data.") for k in set_by if k.startswith("data.")})
    problems.extend(unknown_key_message(k, "", list(TOP_LEVEL)) for k in raw if k not in TOP_LEVEL)
    run = build_dataclass(RunOptions, raw.get("run", {}), "run", problems)
    data = DataSpec.from_table(raw.get("data", {}), "data", problems)
    model = ModelSpec.from_table(raw.get("model"), "model", problems) if "model" in raw else None
    if "model" not in raw:
        problems.append("model: required table is missing (e.g. [model] use = \"stagewise.transformer\")")
    paths, stages = _stages(raw.get("stages"), problems)
    if model is not None:
        _check_grow(paths, stages, model, problems)
    if problems or model is None:  # model: None only beside its problem
        raise ConfigError(problems, source, set_by)
    recipe = Recipe(run=run, data=data, model=model, stages=stages, source=source, overrides=set_by)
    recipe.table = {"run": as_table(run), "data": data.to_table(), "model": model.to_table(),
                    "stages": [s.to_table() for s in stages]}
    return recipe


def _stages(raw: Any, problems: list[str]) -> tuple[list[str], list[StageSpec]]:
    """The valid stages, and how problems name each of them."""
    if not isinstance(raw, list) or not raw:
        problems.append("stages: at least one [[stages]] table is required")
        return [], []
    paths = named_paths("stages", [StageSpec.item_name(t) for t in raw])
    specs = [(path, StageSpec.from_table(t, path, problems)) for path, t in zip(paths, raw, strict=True)]
    paths, named = [p for p, s in specs if s is not None], [s for _, s in specs if s is not None]
    names = [s.name for s in named]
    # a shared checkpoint file would be overwritten by the later stage; a shared name is reported once
    checkpoints = [s.checkpoint for s in named if names.count(s.name) == 1]
    for key, values in (("name", names), ("checkpoint", checkpoints)):
        for value in sorted({v for v in values if values.count(v) > 1}):
            problems.append(f"stages: the {key} {value!r} is used by more than one stage; {key}s must be unique")
    problems.extend(f"stages: the checkpoint names {' and '.join(map(repr, spellings))} {how_alike(spellings)}; "
                    f"rename one" for spellings in alike(checkpoints))
    return paths, named


def _check_grow(paths: list[str], stages: list[StageSpec], model: ModelSpec, problems: list[str]) -> None:
    """A stage's ``grow`` table changes model options: check them against the model's Options."""
    options_cls = type(model.options)
    current = as_table(model.options)
    for path, stage in zip(paths, stages, strict=True):
        if stage.grow:
            grown, found = {**current, **stage.grow}, len(problems)
            build_dataclass(options_cls, grown, f"{path}.grow", problems, written=stage.grow)
            if len(problems) == found:  # a bad growth is reported once, not again by every later grow
                current = grown


def apply_override(raw: dict[str, Any], item: str, problems: list[str]) -> str | None:
    """Apply ``a.b.c=value`` to the raw table. Stages are addressed by name (``stages.NAME.key``),
    and so are a stage's loss terms (``stages.NAME.losses.TERM.key``, TERM as in metrics).
    Returns the key path it set (as problems name it): the first table it had to make, when it made
    one, as all of that came from ``--set``; None when it reported a problem instead. ``~a.b.c``
    removes instead (see :func:`_remove`)."""
    if item.startswith("~"):
        return _remove(raw, item, problems)
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        problems.append(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. stages.phase1.max_epochs=3")
        return None
    value = _parse_value(text.strip())
    node: Any = raw
    kind = "recipe"  # what node is: the recipe, a stage, a loss term or another table
    made = 0  # how many of parts name the first table this override made, if it made one
    path = iter(enumerate(parts[:-1], start=1))
    for depth, part in path:
        named = _NAMED_LISTS.get((kind, part))
        if named and isinstance(node.get(part, []), list):
            if depth == len(parts) - 1:  # the element itself, not one of its keys: --set gives no whole table
                whole = key.strip()
                problems.append(f"--set {item!r}: {whole} names a {named[0]}, not a key; set its keys as "
                                f"{named[2]}, or remove it with ~{whole}")
                return None
            name = next(path)[1]
            node, kind = _element_named(node.get(part) or [], part, named, name, item, problems), named[0]
            if node is None:
                return None
            continue
        made = made or (depth if part not in node else 0)
        node, kind = node.setdefault(part, {}), "table"
        if not isinstance(node, dict):
            problems.append(f"--set {item!r}: {part!r} is not a table")
            return None
    node[parts[-1]] = value
    return ".".join(parts[:made or len(parts)])


def _remove(raw: dict[str, Any], item: str, problems: list[str]) -> str | None:
    """Apply ``~a.b.c``: delete that key, so its default applies, or a whole stage (``~stages.NAME``)
    or loss term (``~stages.NAME.losses.TERM``). Returns the key path, or None after a problem."""
    key = item.removeprefix("~").strip()
    parts = key.split(".")
    if "=" in key or not all(parts):
        problems.append(f"--set {item!r}: expected ~KEY.PATH, which removes that key, e.g. ~stages.forward")
        return None
    node: Any = raw
    kind, i = "recipe", 0  # what node is (as in apply_override), and how many parts led to it
    while i < len(parts) - 1:
        part = parts[i]
        named = _NAMED_LISTS.get((kind, part))
        if named and isinstance(node.get(part), list):
            element = _element_named(node[part], part, named, parts[i + 1], item, problems)
            if element is None:
                return None
            if i + 2 == len(parts):  # the stage or loss term itself
                node[part] = [t for t in node[part] if t is not element]
                return key
            node, kind, i = element, named[0], i + 2
            continue
        if not isinstance(node.get(part), dict):
            break
        node, kind, i = node[part], "table", i + 1
    if i != len(parts) - 1 or parts[-1] not in node:
        problems.append(f"--set {item!r}: nothing to remove: the recipe has no {'.'.join(parts[:i + 1])}")
        return None
    del node[parts[-1]]
    return key


# the lists of tables whose elements --set addresses by name (the name problems use too, see named_paths):
# (what holds the list, its key) -> (an element's kind, its name, how to address its keys)
_NAMED_LISTS: dict[tuple[str, str], tuple[str, Callable[[dict], Any], str]] = {
    ("recipe", "stages"): ("stage", StageSpec.item_name, "stages.NAME.KEY=VALUE"),
    ("stage", "losses"): ("loss term", LossSpec.item_name, "stages.NAME.losses.TERM.KEY=VALUE"),
}


def _element_named(items: list, key: str, named: tuple, name: str, item: str, problems: list[str]) -> dict | None:
    kind, name_of, form = named
    tables = [t for t in items if isinstance(t, dict)]
    for table in tables:
        if name_of(table) == name:
            return table
    if tables:
        hint = f"{key}: {', '.join(str(name_of(t)) for t in tables)} (address a {kind}'s key as {form})"
    else:
        hint = f"the recipe lists no {key} there" + ("" if key == "stages" else
                                                     " (the stage's default applies: set the whole list)")
    problems.append(f"--set {item!r}: no {kind} named {name!r}; {hint}")
    return None


def _parse_value(text: str) -> Any:
    """A TOML value (``3``, ``1e-3``, ``true``, ``[1, 2]``, ``"x"``); anything else is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):  # RecursionError: arrays nested thousands deep
        return text


def data_path_keys(data: dict[str, Any]) -> set[str]:
    """The ``[data]`` keys that hold file paths, for the dataset the table names."""
    use = data.get("use", DataSpec.use)
    try:
        options = getattr(plugins.get("datasets", use), "Options", NoOptions) if isinstance(use, str) else NoOptions
    except StagewiseError:  # an unknown dataset: validation reports it
        options = NoOptions
    return {"path"} | {f.name for f in dataclasses.fields(options) if f.metadata.get("path")}
