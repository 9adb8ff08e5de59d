"""Every Python example in the docs runs, so none goes stale when an API changes.

The rule: every ```python block of the pages below runs, unless it quotes a file (a block under
``<!-- include: PATH -->``: that file's own tests run it) or the line just above it is
``<!-- not run: REASON -->`` with a reason. A page's blocks run in order in one namespace, as a
reader would paste them, so a later block may use an earlier one's imports. They run from a
folder outside the repository; a block that names a run directory in ``RUN_DIRS`` finds it
there, made once with the recipe the block names and ``--set`` overrides that make it tiny.
A block that defines hook implementations must match stagewise's hook specs, and the event hooks
of all blocks run together in one tiny run.
"""

from __future__ import annotations

import builtins
import dis
import functools
import re
import sys
import types
from pathlib import Path

import pluggy
import pytest

import stagewise
from stagewise import hookspecs, plugins
from stagewise.events import Event

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted(ROOT.glob("packages/*/README.md")),
         ROOT / "tests_integration" / "stagewise-example-plugin" / "README.md"]
PYTHON = re.compile(r"^(?P<above>[^\n]*)\n```python\n(?P<code>.*?)^```$", re.M | re.S)
NOT_RUN = re.compile(r"<!-- not run:(?P<reason>[^>]*)-->")

TINY_TEXT = ["data.max_tokens=600", "data.max_vocab=200", "data.seq_len=8", "data.batch_size=4",
             "model.n_embd=16", "model.n_head=2", "model.ffn_hidden=32"]
# run directory an example reads -> (the recipe it names, overrides that make that recipe take a second)
RUN_DIRS = {
    "runs/koopman_hybrid": ("koopman.hybrid", [
        *TINY_TEXT, "stages.warmup.max_epochs=1", "stages.warmup.max_steps_per_epoch=2", "stages.main.max_epochs=1",
        "stages.main.max_steps_per_epoch=2", "stages.main.losses.koopman.koopman_dim=8",
        "stages.linearity.fit.koopman_dim=8", "stages.linearity.fit_steps=2"]),
    "runs/ashem": ("lego_ashem.ashem", [
        *TINY_TEXT, "stages.phase1.max_epochs=1", "stages.phase1.max_steps_per_epoch=2", "stages.phase2.max_epochs=1",
        "stages.phase2.max_steps_per_epoch=2", "stages.phase2.measure_speed=false",
        "stages.test.measure_speed=false", "stages.test.curve_points=3"]),
}
EVENT_HOOKS = {event.hook_name for event in Event}


def examples(page: Path) -> list[tuple[int, str]]:
    """(line, code) of each block of a page that runs, by the rule above."""
    text, found = page.read_text(encoding="utf-8"), []
    for m in PYTHON.finditer(text):
        above, line = m["above"], text.count("\n", 0, m.start("code"))  # the fence's line
        if above.startswith("<!-- include:"):
            continue
        if (skip := NOT_RUN.fullmatch(above)) is not None:
            assert skip["reason"].strip(), f"{_id(page, line)}: say why after <!-- not run: (e.g. it downloads data)"
            continue
        found.append((line, m["code"]))
    return found


EXAMPLES = [(page, line) for page in PAGES for line, _ in examples(page)]


def _id(page: Path, line: int) -> str:
    return f"{page.relative_to(ROOT)}:{line}"


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder outside the repository the examples run in; it holds their runs/."""
    return tmp_path_factory.mktemp("examples")


def _make_run_dirs(code: str, workdir: Path) -> None:
    for run_dir, (recipe, overrides) in RUN_DIRS.items():
        if run_dir in code and not (workdir / run_dir / "summary.json").is_file():
            stagewise.run_recipe(stagewise.load_recipe(recipe, overrides), out=workdir / run_dir, quiet=True)


def run_page(page: Path, upto: int, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, dict]:
    """Run a page's examples in order up to the one at line ``upto``; each one's new names."""
    module = types.ModuleType(f"docs_example_{page.stem}")
    monkeypatch.setitem(sys.modules, module.__name__, module)  # a dataclass looks its module up
    namespace, defined = vars(module), {}
    for line, code in examples(page):
        _make_run_dirs(code, workdir)
        before = dict(namespace)
        # dont_inherit: the example gets none of this file's __future__ imports
        exec(compile(code, f"{_id(page, line)} (the example's lines)", "exec", dont_inherit=True), namespace)
        defined[_id(page, line)] = {k: v for k, v in namespace.items() if before.get(k) is not v}
        if line == upto:
            return defined
    raise AssertionError(f"{_id(page, upto)}: no runnable example there")


def hook_impls(names: dict) -> dict:
    return {k: v for k, v in names.items() if k.startswith("stagewise_") and hasattr(v, "stagewise_impl")}


@pytest.mark.parametrize(("page", "line"), EXAMPLES, ids=[_id(p, n) for p, n in EXAMPLES])
def test_example_runs(page, line, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    impls = hook_impls(run_page(page, line, workdir, monkeypatch)[_id(page, line)])
    if impls:  # a wrong hook name or argument is an error here, as when a plugin loads
        manager = pluggy.PluginManager("stagewise")
        manager.add_hookspecs(hookspecs)
        manager.register(types.SimpleNamespace(**impls))


def global_names(code: types.CodeType) -> set[str]:
    """The global names ``code`` reads, its nested functions' and lambdas' included."""
    names = {i.argval for i in dis.get_instructions(code) if i.opname == "LOAD_GLOBAL"}
    return names.union(*(global_names(c) for c in code.co_consts if isinstance(c, types.CodeType)))


TEST_EXAMPLES = [(page, line) for page in PAGES for line, code in examples(page) if "def test_" in code]


@pytest.mark.parametrize(("page", "line"), TEST_EXAMPLES, ids=[_id(p, n) for p, n in TEST_EXAMPLES])
def test_example_tests_import_what_they_use(page, line, workdir, monkeypatch):
    """An example's ``test_*`` function is only defined, not run: each name it reads must be imported
    by the page's examples so far, as a reader who pastes them into a test file needs."""
    monkeypatch.chdir(workdir)
    defined = run_page(page, line, workdir, monkeypatch)[_id(page, line)]
    for name, test in [(k, v) for k, v in defined.items() if k.startswith("test_") and callable(v)]:
        missing = sorted(n for n in global_names(test.__code__)
                         if n not in test.__globals__ and not hasattr(builtins, n))
        assert missing == [], f"{_id(page, line)}: {name} uses {missing}, which no example above imports"


def counted(hook, calls: dict[str, int], key: str):
    """``hook`` (its arguments and hookimpl marker kept) counting its calls in ``calls[key]``."""
    calls[key] = 0

    @functools.wraps(hook)
    def counting(**kwargs):
        calls[key] += 1
        return hook(**kwargs)

    return counting


def test_event_hook_examples_work_in_a_run(workdir, monkeypatch):
    """Each example's event hooks, registered as a plugin of its own, in one tiny demo run: each is called."""
    monkeypatch.chdir(workdir)
    names, calls = [], {}
    try:
        for page in [p for p in PAGES if any("@stagewise.hookimpl" in code for _, code in examples(p))]:
            for example, defined in run_page(page, examples(page)[-1][0], workdir, monkeypatch).items():
                events = {k: counted(v, calls, f"{example} {k}") for k, v in hook_impls(defined).items()
                          if k in EVENT_HOOKS}
                if events:
                    names.append(f"docs:{example}")
                    plugins.register_plugin(types.SimpleNamespace(**events), names[-1])
        assert names, "no example implements an event hook"
        tiny = [*TINY_TEXT, "stages.base.max_steps_per_epoch=2", "stages.grow.max_steps_per_epoch=2",
                "stages.grow.max_epochs=1"]
        stagewise.run_recipe(stagewise.load_recipe("demo", tiny), out=workdir / "runs" / "event-hooks", quiet=True)
    finally:
        for name in names:
            plugins.unregister_plugin(name)
    assert [key for key, n in calls.items() if n == 0] == [], calls  # was: a hook never called passed too
