"""Recipe tables that name a component: ``{ use = "plugin.thing", <engine keys>, <its options> }``.

A spec splits such a table into the keys the engine owns (its dataclass fields) and the
component's own options, validated against the component's ``Options`` dataclass. Unknown
names and keys are reported with the valid choices.
"""

from __future__ import annotations

import dataclasses
import math
import unicodedata
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

from stagewise import plugins
from stagewise.errors import PluginError, UnknownNameError
from stagewise.names import windows_problem
from stagewise.registry import singular
from stagewise.schema import (
    NoOptions,
    as_table,
    build_dataclass,
    check_options,
    coerce_keys,
    construct,
    field_types,
    keys_of,
    named_paths,
)

# of a file or folder name a run makes from the recipe (most file systems allow 255; a temp file adds 17)
MAX_NAME_BYTES = 200


def _finite_non_negative(x: float) -> bool:
    return math.isfinite(x) and x >= 0


# The largest weight of a loss term or part: losses are float32 tensors, and a weight past float32's range makes
# every weighted loss inf, so each batch is skipped until max_nonfinite stops the run.
MAX_WEIGHT = 3.4028234663852886e38  # torch.finfo(torch.float32).max


def weight_limit_check(weight: float, key: str) -> tuple[bool, str, str]:
    """The :func:`~stagewise.check_options` check that ``weight`` is at most :data:`MAX_WEIGHT`; a NaN or infinite
    weight passes it, for the option's own finiteness check to report."""
    return (not MAX_WEIGHT < weight < math.inf, key,
            f"must be at most {MAX_WEIGHT:.4g} (the largest float32; losses are float32), got {weight:g}")


class Spec:
    """Mixin for dataclasses that name a component; subclasses set KIND and ``options``."""

    KIND: ClassVar[str]
    # what every subclass, a dataclass, has: declared for type checkers
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]
    use: str
    options: Any

    @classmethod
    def from_table(cls, value: Any, path: str, problems: list[str]) -> Any:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a table with a 'use' key, got {type(value).__name__}")
            return None
        use = value.get("use", getattr(cls, "use", None))  # class attribute = field default
        if not isinstance(use, str):
            problems.append(f"{path}.use: required: the name of a registered {singular(cls.KIND)}")
            return None
        try:
            component = plugins.get(cls.KIND, use)
        except (UnknownNameError, PluginError) as exc:  # PluginError: its lazy import failed
            if isinstance(exc, PluginError) and plugins.strict():
                raise  # strict mode is for finding the bug: the CLI shows its traceback
            problems.append(f"{path}.use: {exc}")
            return None
        engine_keys = frozenset(keys_of(cls)) - {"options"}
        before = len(problems)
        options = build_dataclass(getattr(component, "Options", NoOptions), value, path, problems,
                                  extra_ok=engine_keys)
        engine, bad = coerce_keys({k: v for k, v in value.items() if k in engine_keys}, field_types(cls), path,
                                  problems)
        engine["use"] = use
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in engine and f.name != "options"
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        problems.extend(f"{path}.{k}: required key is missing" for k in missing)
        # the engine's keys are checked even when the component's options had problems
        return construct(cls, {**engine, "options": options}, path, problems, bad, failed=len(problems) > before)

    @classmethod
    def keys_for(cls, value: Any) -> list[str]:
        """The keys a table that names ``value["use"]`` takes: the engine's and the component's options
        (the engine's alone when it names no registered component)."""
        use = value.get("use", getattr(cls, "use", None)) if isinstance(value, dict) else getattr(cls, "use", None)
        try:
            options = getattr(plugins.get(cls.KIND, use), "Options", NoOptions) if isinstance(use, str) else NoOptions
        except (UnknownNameError, PluginError):  # validating the table itself reports these
            options = NoOptions
        return [k for k in keys_of(cls) if k != "options"] + keys_of(options)

    def to_table(self) -> dict[str, Any]:
        table = {f.name: as_table(getattr(self, f.name)) for f in dataclasses.fields(self)
                 if f.name != "options" and getattr(self, f.name) is not None}
        return {**table, **as_table(self.options)}

    def component(self) -> Any:
        return plugins.get(self.KIND, self.use)


def default_term_name(use: str) -> str:
    """A loss term's name when the recipe gives none: the part of ``use`` after the first dot."""
    return use.split(".", 1)[-1]


def term_paths(specs: list[LossSpec], where: str) -> list[str]:
    """How problems name each of a stage's loss terms, ``where`` naming the stage: ``WHERE.losses.TERM``
    as ``--set`` addresses it, or ``WHERE.losses[i]`` (see :func:`~stagewise.schema.named_paths`)."""
    return named_paths(f"{where}.losses", [spec.name for spec in specs])


@dataclass
class LossSpec(Spec):
    """One loss term of a stage, with its weight schedule and fallback."""

    KIND: ClassVar[str] = "losses"
    use: str
    options: Any = None
    name: str | None = None  # term name in metrics; default: the part of `use` after the dot
    weight: float = 1.0  # full weight, reached after the ramp
    start_epoch: int = 0  # epochs (0-based) before this one use weight 0
    ramp_epochs: int = 0  # linear ramp over this many epochs from start_epoch; 0 = no ramp
    cap: float | None = None  # the weight never exceeds this
    fallback_threshold: float | None = None  # a batch whose term exceeds this ...
    fallback_factor: float = 0.01  # ... uses weight * fallback_factor for that batch

    def __post_init__(self) -> None:
        if self.name is None:
            self.name = default_term_name(self.use)
        check_options([
            # it keys metrics (train/<name>/<part>) and parameters
            (bool(self.name) and "." not in self.name, ("name", "use"),
             f"term name {self.name!r}: use a non-empty name without '.'"),
            (_finite_non_negative(self.weight), "weight", f"must be >= 0 and finite, got {self.weight}"),
            weight_limit_check(self.weight, "weight"),
            (self.cap is None or _finite_non_negative(self.cap), "cap", f"must be >= 0 and finite, got {self.cap}"),
            (self.start_epoch >= 0, "start_epoch", f"must be >= 0, got {self.start_epoch}"),
            (self.ramp_epochs >= 0, "ramp_epochs", f"must be >= 0, got {self.ramp_epochs}"),
            # no term value is <= nan: every batch would be cut
            (self.fallback_threshold is None or not math.isnan(self.fallback_threshold), "fallback_threshold",
             f"must be a number (leave it out for no fallback), got {self.fallback_threshold}"),
            (0 <= self.fallback_factor <= 1, "fallback_factor", f"must be in [0, 1], got {self.fallback_factor}"),
        ])

    @property
    def term_name(self) -> str:
        """``name``, which ``__post_init__`` sets: a term built without one has its default."""
        return cast(str, self.name)

    @classmethod
    def item_name(cls, value: Any) -> Any:
        """The name ``--set`` addresses this term's table by (``stages.NAME.losses.TERM``) and problems
        name it by (see :func:`~stagewise.schema.named_paths`): its ``name``, default from its ``use``."""
        if not isinstance(value, dict):
            return None
        return value.get("name") or default_term_name(str(value.get("use", "")))

    def weight_at(self, epoch: int) -> float:
        """The scheduled weight at a 0-based epoch."""
        if epoch < self.start_epoch:
            return 0.0
        ramp = 1.0 if self.ramp_epochs == 0 else min(1.0, (epoch - self.start_epoch + 1) / self.ramp_epochs)
        weight = self.weight * ramp
        return weight if self.cap is None else min(weight, self.cap)


@dataclass
class RouterSpec(Spec):
    """The router a stage uses."""

    KIND: ClassVar[str] = "routers"
    use: str
    options: Any = None


@dataclass
class ModelSpec(Spec):
    """The recipe's ``[model]`` table."""

    KIND: ClassVar[str] = "models"
    use: str
    options: Any = None


@dataclass
class DataSpec(Spec):
    """The recipe's ``[data]`` table: the dataset and how batches are drawn."""

    KIND: ClassVar[str] = "datasets"
    use: str = "stagewise.text"
    options: Any = None
    batch_size: int = 32  # global batch size (split across processes under torchrun)
    eval_batch_size: int | None = None  # default: batch_size
    shuffle: bool = True  # shuffle the training split each epoch (seeded)
    drop_last: bool = False  # drop a last, smaller training batch
    num_workers: int = 0  # DataLoader worker processes

    def __post_init__(self) -> None:
        check_options([
            (self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}"),
            (self.eval_batch_size is None or self.eval_batch_size >= 1, "eval_batch_size",
             f"must be >= 1 (leave it unset for batch_size), got {self.eval_batch_size}"),
            (self.num_workers >= 0, "num_workers",
             f"must be >= 0 (0 = load in the main process), got {self.num_workers}"),
        ])


@dataclass
class StageSpec(Spec):
    """One ``[[stages]]`` table."""

    KIND: ClassVar[str] = "stages"
    name: str
    use: str = "stagewise.train"
    options: Any = None
    checkpoint: str | None = None  # file name of this stage's checkpoint; default: its name
    grow: dict[str, Any] = field(default_factory=dict)  # model options changed before it runs

    @classmethod
    def item_name(cls, value: Any) -> Any:
        """The name ``--set`` addresses this stage's table by (``stages.NAME``) and problems name it by."""
        return value.get("name") if isinstance(value, dict) else None

    def __post_init__(self) -> None:
        if self.checkpoint is None:
            self.checkpoint = self.name
        key = "checkpoint" if self.checkpoint != self.name else ("name", "checkpoint")  # it defaults to the name
        in_letters = _in_letters(self.checkpoint)
        composed = unicodedata.normalize("NFC", self.checkpoint)
        nfd = (f" (its accents are separate marks, NFD, as some macOS tools write them: write it composed, NFC, "
               f"{composed!r})" if not in_letters and _in_letters(composed) else "")
        check_options([
            (in_letters, key, f"checkpoint name {self.checkpoint!r}: use letters, digits, '-' and '_'{nfd}"),
            # letters and digits leave Windows' device names (CON, NUL, COM1, ...): no nul.pt can be written there
            (not in_letters or windows_problem(self.checkpoint) is None, key,
             f"checkpoint name {self.checkpoint!r} (checkpoints/{self.checkpoint}.pt): "
             f"{windows_problem(self.checkpoint)}"),
            # checked now: the stage would train, then fail to write its checkpoint (and tensorboard/NAME)
            (len(self.checkpoint.encode("utf-8")) <= MAX_NAME_BYTES, key,
             f"checkpoint name of {len(self.checkpoint.encode('utf-8'))} bytes (in UTF-8): at most {MAX_NAME_BYTES} "
             f"fit a file name; set a shorter checkpoint = \"...\""),
            # checkpoints/last.pt is the resume point, rewritten by every stage
            # case too: where the file system ignores it (macOS, Windows) LAST.pt is last.pt
            (self.checkpoint.casefold() != "last", key, f"checkpoint name {self.checkpoint!r}: 'last' is reserved "
                                                        f"for the resume checkpoint; choose another"),
        ])

    def build(self) -> Any:
        """The stage this table names, with its options and the recipe's name for it."""
        return self.component()(self.options, label=self.name)


def _in_letters(checkpoint: str) -> bool:
    return checkpoint.replace("-", "").replace("_", "").isalnum()
