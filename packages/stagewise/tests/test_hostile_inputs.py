"""Files and settings a user could be handed: each is refused in one line naming the file or key, nothing
written before is lost, and nothing in a crafted file runs or reaches a traceback."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TINY

from stagewise.cli.main import main
from stagewise.engine.checkpoint import FORMAT, atomic_write_bytes, load_checkpoint
from stagewise.engine.resume import check_resumable
from stagewise.engine.runner import run_recipe
from stagewise.errors import CheckpointError, ConfigError
from stagewise.export import load_npz
from stagewise.recipe import load_recipe
from stagewise.testing import damaged_copy, run_stopped


def _full_disk(f):
    f.write(b"half")
    raise OSError(errno.ENOSPC, "No space left on device")  # as a write says it: no file named


def _full_disk_in_torch_save(f):
    try:
        _full_disk(f)
    except OSError:  # torch.save's zip writer reports a failed write so (the OSError as its context)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 63232 vs 63120") from None


@pytest.mark.parametrize("write", [_full_disk, _full_disk_in_torch_save], ids=["write", "torch.save"])
def test_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, write):
    path = tmp_path / "last.pt"
    path.write_bytes(b"old")
    with pytest.raises(OSError) as info:  # was: no file named, or torch's RuntimeError (a traceback)
        atomic_write_bytes(path, write)
    assert (info.value.errno, info.value.filename) == (errno.ENOSPC, str(path))
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_an_atomic_write_syncs_the_file_then_after_the_rename_its_folder(tmp_path, monkeypatch):
    synced, fsync = [], os.fsync

    def recorded(fd):
        synced.append((stat.S_ISDIR(os.fstat(fd).st_mode), (tmp_path / "f").exists()))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recorded)
    atomic_write_bytes(tmp_path / "f", lambda f: f.write(b"x"))
    # was the file's bytes only: a power cut after the rename could lose the new name (the folder entry)
    assert synced == [(False, False), (True, True)]


def test_a_folder_the_file_system_cannot_sync_does_not_fail_a_finished_write(tmp_path, monkeypatch):
    fsync = os.fsync

    def no_folders(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")  # as some file systems answer for a folder
        fsync(fd)

    monkeypatch.setattr(os, "fsync", no_folders)
    atomic_write_bytes(tmp_path / "f", lambda f: f.write(b"x"))  # was: EINVAL after the file was in place
    assert (tmp_path / "f").read_bytes() == b"x"


def test_export_on_a_full_disk_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    checkpoint = _checkpoint(tmp_path / "c.pt", model={"w": torch.zeros(2)})
    out = tmp_path / "m.npz"
    assert main(["export", str(checkpoint), str(out)]) == 0
    before = out.read_bytes()
    capsys.readouterr()
    monkeypatch.setattr(np, "savez", lambda f, **arrays: _full_disk(f))
    assert main(["export", str(checkpoint), str(out)]) == 1
    assert capsys.readouterr().err == (f"stagewise: error: {out}: No space left on device; free some disk space and "
                                       f"run again\n")
    assert out.read_bytes() == before


def _checkpoint(path, **payload):
    torch.save({"format": FORMAT, "model": {"w": torch.zeros(1)}, "recipe": {"model": {"use": "x.net"}},
                "model_options": {}, "stage_name": "s", **payload}, path)
    return path


@pytest.mark.parametrize("payload, keys", [
    ({"model": [1, 2], "model_options": 5}, "model, model_options"),
    ({"model": {"w": "not a tensor"}}, "model"),
    ({"recipe": {"model": "x.net"}}, "recipe"),
    ({"stage_name": None}, "stage_name"),
], ids=["list-model", "str-weight", "recipe-without-model-table", "stage-name-none"])
def test_a_checkpoint_of_the_right_format_with_other_contents_is_refused_by_name(tmp_path, capsys, payload, keys):
    checkpoint = _checkpoint(tmp_path / "c.pt", **payload)
    assert main(["export", str(checkpoint), str(tmp_path / "m.npz")]) == 1  # was an AttributeError traceback
    assert capsys.readouterr().err == (f"stagewise: error: {checkpoint}: a damaged stagewise checkpoint: what it holds "
                                       f"under {keys} is not what a run writes there; use a checkpoint a stagewise "
                                       f"run wrote\n")
    assert not (tmp_path / "m.npz").exists()


def test_export_of_a_run_whose_vocab_txt_was_damaged_names_the_file(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    checkpoint = _checkpoint(run / "checkpoints" / "last.pt")
    (run / "vocab.txt").write_bytes(b"the\n\xff\xfe\n")
    assert main(["export", str(run), str(tmp_path / "m.npz")]) == 1  # was a UnicodeDecodeError traceback
    err = capsys.readouterr().err
    assert err.startswith(f"stagewise: error: {run / 'vocab.txt'}: not the UTF-8 text the run wrote (")
    assert err.endswith("so the export cannot hold the run's vocabulary; put back the file the run wrote\n")
    assert checkpoint.is_file() and not (tmp_path / "m.npz").exists()


def test_verify_reads_a_summary_whose_measured_is_not_a_list(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"metrics": {"a": 1}, "stages": {"s": {"measured": 5}}}))
    (tmp_path / "g.json").write_text(json.dumps({"metrics": {"a": 1}}))
    assert main(["verify", str(run), str(tmp_path / "g.json")]) == 0  # was: TypeError: 'int' object is not iterable
    assert capsys.readouterr().out == "verify: OK\n"


@pytest.mark.parametrize("damage, problem", [
    (b"\xff\xfe[[", "'utf-8' codec can't decode byte 0xff in position 0: invalid start byte"),
    (b"x = [", "Invalid value (at end of document)"),
], ids=["not-utf-8", "not-toml"])
@pytest.mark.parametrize("command", ["run", "compare"])
def test_resume_with_a_damaged_recipe_toml_is_one_line_naming_it(tiny_recipe_path, tmp_path, capsys, damage,
                                                                   problem, command):
    out = tmp_path / "out"
    run = out / "tiny" if command == "compare" else out  # compare's --resume is the runs' parent folder
    (run / "checkpoints").mkdir(parents=True)
    (run / "recipe.toml").write_bytes(damage)
    assert main([command, str(tiny_recipe_path), "--resume", str(out), "--quiet"]) == 1  # was a traceback
    assert capsys.readouterr().err == (f"stagewise: error: {run / 'recipe.toml'}: the recipe this run started with "
                                       f"cannot be read ({problem}), so the run cannot be continued; run the recipe "
                                       f"again with --out and a new folder\n")
    assert (run / "recipe.toml").read_bytes() == damage


@pytest.mark.parametrize("override, problem", [
    ("run.seed=100000000000000000000", "run.seed (from --set run.seed=100000000000000000000): must be between"),
    ("run.threads=100000000000000000000", "run.threads (from --set run.threads=100000000000000000000): must be at "
                                          "most 1024"),
    ('run.name="a\\u0000b"', "use a non-empty name without '/', '\\' or NUL"),
    (f'run.name="{"n" * 201}"', "run.name (from --set run.name=\"nnn"),
    ('run.out="runs\\u0000x"', "run.out (from --set run.out=\"runs\\u0000x\"): 'runs\\x00x': a path holds no NUL"),
    (f'stages.phase1.checkpoint="{"c" * 201}"', "checkpoint name of 201 bytes (in UTF-8): at most 200 fit a file name"),
    # were accepted on Linux, and their run directory could not be copied to Windows (nor the recipe run there)
    ('run.name="12:30 a|b?"', "run.name (from --set run.name=\"12:30 a|b?\"): '12:30 a|b?' names the run directory: "
                              "':' '?' '|' cannot be in a file name on Windows; write e.g. '12-30 a-b-'"),
    ('run.name="a\tb"', "'a\\tb' names the run directory: '\\t' cannot be in a file name on Windows; write e.g. 'a-b'"),
    ('run.name="v1. "', "'v1. ' names the run directory: Windows drops a trailing dot or space from a file name; "
                        "write e.g. 'v1'"),
    ('run.name="aux.old"', "'aux.old' names the run directory: 'aux' is a device name on Windows (CON, PRN, AUX, NUL, "
                           "COM0-9, LPT0-9), with any extension and in any case; write e.g. 'aux_.old'"),
    ('stages.phase1.checkpoint="lpt1"', "checkpoint name 'lpt1' (checkpoints/lpt1.pt): 'lpt1' is a device name on "
                                        "Windows"),
    # was refused without saying why: "é" is a letter, its NFD spelling "e" and a combining accent is not
    ('stages.phase1.checkpoint="cafe\u0301"', "checkpoint name 'cafe\u0301': use letters, digits, '-' and '_' (its "
                                              "accents are separate marks, NFD, as some macOS tools write them: "
                                              "write it composed, NFC, 'caf\u00e9')"),
], ids=["seed-beyond-int64", "threads-beyond-int64", "name-nul", "name-too-long", "out-nul", "checkpoint-too-long",
        "name-windows-characters", "name-control-character", "name-trailing-dot", "name-windows-device",
        "checkpoint-windows-device", "checkpoint-nfd"])
def test_settings_no_run_could_use_are_refused_before_anything_runs(tiny, override, problem):
    with pytest.raises(ConfigError) as info:  # were tracebacks, or a stage trained before its checkpoint failed
        tiny(override)
    assert problem in str(info.value)


@pytest.mark.parametrize("name", ["exp 1, lr=1e-3 (b)", "caf\u00e9", "cafe\u0301", "Console", "Nul_", ".hidden"])
def test_run_names_every_file_system_holds_still_load(tiny, name):
    assert tiny(f"run.name={json.dumps(name)}").run.name == name  # NFD too: one name alone is one folder anywhere


@pytest.mark.parametrize("make, problem", [
    (lambda p: p.write_bytes(b""), "not a file stagewise export wrote (EOFError"),
    (lambda p: np.savez(p, a=np.zeros(1)), "not a file stagewise export wrote (KeyError"),
    (lambda p: np.savez(p, __meta__=np.array("{not json")), "not a file stagewise export wrote (JSONDecodeError"),
    (lambda p: np.savez(p, __meta__=np.array("[1]")), "its __meta__ is not what stagewise export writes"),
    (lambda p: None, "export not found"),
], ids=["empty", "no-meta", "meta-not-json", "meta-a-list", "missing"])
def test_load_npz_names_a_file_that_is_no_export(tmp_path, make, problem):
    path = tmp_path / "m.npz"
    make(path)
    with pytest.raises(CheckpointError) as info:  # were KeyError, EOFError, ... not naming the file
        load_npz(path)
    assert str(info.value).startswith(f"{path}: {problem}")


# (command, the summary that cannot be written, the advice, the file the continued command writes)
_FULL_DISK = [("run", "summary.json", "the run goes on from its last checkpoint", "summary.json"),
              ("compare", "tiny/summary.json", "its runs go on from their last checkpoints", "compare.json")]


@pytest.mark.parametrize("command, summary, advice, written", _FULL_DISK, ids=["run", "compare"])
def test_work_stopped_by_a_full_disk_says_how_to_continue_it(tiny_recipe_path, tmp_path, capsys, monkeypatch,
                                                              command, summary, advice, written):
    from stagewise.engine.rundir import RunDir

    out = tmp_path / "out"
    write_summary = RunDir.write_summary

    def full(run_dir, summary):
        raise OSError(errno.ENOSPC, "No space left on device", str(run_dir.path / "summary.json"))

    monkeypatch.setattr(RunDir, "write_summary", full)
    assert main([command, str(tiny_recipe_path), "--out", str(out), "--quiet", "--set", "run.seed=8"]) == 1
    again = f"stagewise {command} {tiny_recipe_path} --resume {out} --set run.seed=8"
    # was "... free some disk space and run again": new work, not the work whose checkpoints are kept
    assert capsys.readouterr().err == (f"stagewise: error: {out / summary}: No space left on device; free some "
                                       f"disk space; {advice} with: {again}\n")
    monkeypatch.setattr(RunDir, "write_summary", write_summary)
    assert main(again.split()[1:]) == 0 and (out / written).is_file()


# --- resume of a last.pt whose top-level keys are right and whose contents deeper down are not ------------


@pytest.fixture(scope="module")
def stopped_mid_stage(tmp_path_factory):
    """The tiny recipe stopped after phase1's step 7: its last.pt is phase1's step 6 (mid-epoch)."""
    folder = tmp_path_factory.mktemp("stopped")
    (folder / "tiny.toml").write_text(TINY)
    recipe = load_recipe(folder / "tiny.toml", ["run.checkpoint_every_n_steps=3"])
    return recipe, run_stopped(recipe, folder / "run", "phase1", 7)


def _python_state(saved):
    version, words, gauss = saved["python"]
    return version, (*words[:-1], 625), gauss  # the index past the 624 words: "invalid state"


# each found by fuzzing (values deep inside a real last.pt changed); each was a traceback, or was taken silently
# (numpy's pos out of range: a later draw reads out of bounds, a segfault; its keys all zero: draws of zeros)
_DEEP_DAMAGE = [
    ("model", lambda c: c["model"].pop("head.weight"), "model: lacks head.weight"),  # load_state_dict's RuntimeError
    ("weight-shape", lambda c: c["model"].update({"head.weight": torch.zeros(3)}),
     "model.head.weight: a torch.float32 tensor of shape (3,), expected a torch.float32 tensor of shape (196, 16)"),
    ("rng-torch", lambda c: c["rng"].pop("torch"), "rng: lacks torch"),  # KeyError
    ("rng-numpy-kind", lambda c: c["rng"]["numpy"].update(kind=None), "rng.numpy: not numpy's MT19937 state"),
    ("rng-numpy-pos", lambda c: c["rng"]["numpy"].update(pos=10**6), "rng.numpy: not numpy's MT19937 state"),  # segv
    ("rng-numpy-zero-keys", lambda c: c["rng"]["numpy"]["keys"].zero_(), "rng.numpy: not numpy's MT19937 state"),
    ("rng-torch-dtype", lambda c: c["rng"].update(torch=c["rng"]["torch"].float()),
     "rng.torch: RNG state must be a torch.ByteTensor"),
    ("rng-python", lambda c: c["rng"].update(python=_python_state(c["rng"])), "rng.python: invalid state"),
    ("rng-python-gauss", lambda c: c["rng"].update(python=(*c["rng"]["python"][:2], "x")),
     "rng.python: its last item (the next gauss value) must be None or a float"),  # silently returned by gauss()
    ("recipe-tensor", lambda c: c["recipe"]["stages"][1].update(lr=torch.zeros(2, 2)), None),  # ambiguous bool
    ("stage-results", lambda c: c["stage_results"].update(phase0=[]),
     "stage_results.phase0: expected a table of metrics, epochs, seconds, measured"),  # final_table TypeError
    ("stage-seconds", lambda c: c.update(stage_seconds=None), "stage_seconds: nothing, expected a number"),
    ("loop-key", lambda c: c["loop"].update(junk=1), "loop: expected a table of epoch, batch, best, "),
    ("loop-sums", lambda c: c["loop"]["sums"].update(n=()), "loop.sums: expected a table of numbers"),
    ("step", lambda c: c.pop("step"), "step: nothing, expected an int"),  # KeyError in the "resuming ..." line
    # options that keep the weights' shapes: taken silently, the resumed run built another model and diverged
    ("model-options-n-head", lambda c: c["model_options"].update(n_head=1),
     "model_options.n_head: 1, but the recipe gives 2"),
    ("stage-index-past", lambda c: c.update(stage_index=3),  # was named by the model options it differs in
     "stage_index, stage_name: 3, 'phase1' is no stage of this recipe"),
    ("model-options-dropout", lambda c: c["model_options"].update(dropout=0.5),
     "model_options.dropout: 0.5, but the recipe gives 0.0"),
    ("rng-cuda", lambda c: c["rng"].update(cuda=[1]), "rng.cuda: must be a list of CUDA RNG states (uint8 tensors)"),
    ("rng-numpy-list", lambda c: c["rng"].update(numpy=[]), "rng.numpy: not numpy's MT19937 state"),
    ("routers", lambda c: c.update(routers=[]), "routers: a list, expected a table of routers by name"),
    # was "the checkpoint's model options no longer validate: [...]", naming no file and saying nothing to do
    ("model-options-type", lambda c: c["model_options"].update(n_layer="x"),
     "model_options.n_layer: expected int, got str 'x'"),
]
_LOOP_DAMAGE = [  # the training stage's own state, checked against what it built: after the metrics are cut back
    ("loop-batch", lambda c: c["loop"].update(batch=5), "loop.batch: 5, expected 0..4"),  # islice's ValueError
    ("optimizer-eps", lambda c: c["optimizer"]["param_groups"][0].pop("eps"),
     "optimizer.param_groups[0]: a dict, expected a table of "),  # KeyError at the next step
    ("optimizer-betas", lambda c: c["optimizer"]["param_groups"][0].update(betas=(0.9, ())),
     "optimizer.param_groups[0].betas[1]: a tuple, expected a float"),
    ("optimizer-moment", lambda c: c["optimizer"]["state"][0].update(exp_avg=torch.zeros(2)),
     "optimizer.state.0.exp_avg: a torch.float32 tensor of shape (2,), expected a torch.float32 tensor of shape "),
    ("optimizer-step", lambda c: c["optimizer"]["state"][0].update(step=torch.zeros(0)),
     "optimizer.state.0.step: a torch.float32 tensor of shape (0,), expected a torch.float32 tensor of shape ()"),
    ("scheduler", lambda c: c["scheduler"].update(lr_lambdas=None), "scheduler.lr_lambdas: nothing, expected a list"),
    ("fallbacks", lambda c: c["fallbacks"].update(junk=[]), "fallbacks: a dict, expected a table of cross_entropy"),
    ("terms", lambda c: c.update(terms={"junk": torch.zeros(1)}), "terms: holds 'junk', "),
    ("best-state", lambda c: c.update(best_state={"model.x": torch.zeros(1)}), "best_state: lacks model."),
    ("ema-target", lambda c: c.update(target={"x": torch.zeros(1)}),
     "target: an EMA model, but this stage keeps none (ema_momentum)"),
    ("epoch-seconds", lambda c: c.update(epoch_seconds="z"), "epoch_seconds: a str, expected a number"),
    ("scheduler-missing", lambda c: c.pop("scheduler"), "scheduler: missing from a training stage's checkpoint"),
    ("terms-list", lambda c: c.update(terms=[]), "terms: a list, not the state dict a run writes"),
    ("optimizer-list", lambda c: c.update(optimizer=[]), "optimizer: a list, expected a table of state, param_groups"),
    ("optimizer-state", lambda c: c["optimizer"].update(state={99: {}}),
     "optimizer.state: not a table of this stage's parameters' states"),
    ("optimizer-step-float", lambda c: c["optimizer"]["state"][0].update(step=1.0),
     "optimizer.state.0.step: a float, expected a torch.float32 tensor of shape ()"),
    ("warnings", lambda c: c.update(warnings={"x": -1}),
     "warnings: a dict, expected a table of counts (names to whole numbers >= 0)"),
    # settings of the right type but not the recipe's: taken silently, every step after the resume differed
    ("optimizer-weight-decay", lambda c: c["optimizer"]["param_groups"][0].update(weight_decay=0.5),
     "optimizer.param_groups[0].weight_decay: 0.5, but the recipe gives 0.01"),
    ("optimizer-lr", lambda c: c["optimizer"]["param_groups"][0].update(lr=1.0),
     "optimizer.param_groups[0].lr: 1.0, but the schedule set 0.01"),
    ("scheduler-base-lrs", lambda c: c["scheduler"].update(base_lrs=[1.0]),
     "scheduler.base_lrs: [1.0], but the recipe gives [0.01]"),
]


def test_resume_refuses_a_stage_index_one_past_the_recipe_s_stages(stopped_mid_stage):
    # checked on its own: in a whole resume the model options of a stage past the last (grown) differ first
    recipe, stopped = stopped_mid_stage
    saved = load_checkpoint(stopped / "checkpoints" / "last.pt")
    saved["stage_index"] = len(recipe.stages)
    model = SimpleNamespace(state_dict=lambda: saved["model"])  # weights that fit: only the stage is wrong
    with pytest.raises(CheckpointError, match="stage_index, stage_name: 3, 'phase1' is no stage of this recipe"):
        check_resumable(saved, model, stopped, recipe)  # a bound of <= len(stages) met an IndexError instead


@pytest.mark.parametrize("damage, problem", [d[1:] for d in _DEEP_DAMAGE + _LOOP_DAMAGE],
                         ids=[d[0] for d in _DEEP_DAMAGE + _LOOP_DAMAGE])
def test_resume_refuses_a_last_pt_damaged_deep_inside_by_key(stopped_mid_stage, tmp_path, damage, problem):
    recipe, stopped = stopped_mid_stage
    run = damaged_copy(stopped, tmp_path / "run", damage)
    last = run / "checkpoints" / "last.pt"
    records = (run / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError) as info:  # was a traceback mid-run (or a segfault: rng-numpy-pos)
        run_recipe(recipe, resume=run, quiet=True)
    message = str(info.value)
    if problem is None:  # the recipe: refused as load_checkpoint refuses a malformed key
        assert message.startswith(f"{last}: a damaged stagewise checkpoint: what it holds under recipe is not ")
        return
    assert message.startswith(f"{last}: a damaged stagewise checkpoint: what it holds is not what a run writes "
                              f"there: {problem}") and "\n" not in message
    assert message.endswith("No stage of this run has finished, so no other checkpoint can continue it: run the "
                            f"recipe again with --out and a new folder (or delete {run} first)")
    if damage in [d[1] for d in _DEEP_DAMAGE]:  # refused before the run directory was touched
        assert (run / "metrics.jsonl").read_text() == records


def test_a_resume_of_an_untouched_last_pt_passes_the_checks(stopped_mid_stage, tmp_path):
    recipe, stopped = stopped_mid_stage
    run = shutil.copytree(stopped, tmp_path / "run")
    run_recipe(recipe, resume=run, quiet=True)
    assert (run / "summary.json").exists()


def test_a_last_pt_from_before_the_foreach_optimizer_resumes_to_the_same_numbers(stopped_mid_stage, tmp_path):
    """Runs stopped under an earlier stagewise saved ``foreach=None`` (torch's per-parameter loop):
    the resume takes it, on that path, and ends with the numbers of a resume on the multi-tensor one."""
    recipe, stopped = stopped_mid_stage
    finals = []
    for flag in (True, None):
        def written_by(saved, flag=flag):
            group = saved["optimizer"]["param_groups"][0]
            assert group["foreach"] is True  # written by this stagewise
            group["foreach"] = flag

        run = damaged_copy(stopped, tmp_path / f"run-{flag}", written_by)
        run_recipe(recipe, resume=run, quiet=True)
        finals.append(json.loads((run / "summary.json").read_text())["metrics"])
    assert finals[0] == finals[1] and finals[0]


# --- two runs at once, and a disk that fills up under metrics.jsonl ----------------------------------------------


def _no_hard_links(source, target):
    raise OSError(errno.EPERM, "Operation not permitted", source, None, target)  # as link(2) on FAT says it


def _no_hard_links_on_windows(source, target):
    exc = OSError(errno.EINVAL, "Incorrect function", source, None, target)
    exc.winerror = 1  # ERROR_INVALID_FUNCTION, as CreateHardLink on FAT says it (POSIX's OSError drops the argument)
    raise exc


@pytest.mark.parametrize(("code", "winerror", "none"), [
    (errno.EPERM, None, True), (errno.EINVAL, 1, True), (errno.EINVAL, 50, True),  # FAT; a Windows share
    (errno.EINVAL, None, False), (errno.EINVAL, 5, False), (errno.EACCES, None, False)])
def test_only_a_file_system_without_hard_links_falls_back_to_a_rename(code, winerror, none):
    from stagewise.engine.atomic import _no_hard_links as no_hard_links

    exc = OSError(code, os.strerror(code))
    exc.winerror = winerror  # POSIX's OSError has none
    assert no_hard_links(exc) is none


@pytest.mark.parametrize("link", [os.link, _no_hard_links, _no_hard_links_on_windows],
                         ids=["hard-links", "no-hard-links", "no-hard-links-on-windows"])
def test_a_run_started_at_once_in_the_same_folder_leaves_the_other_runs_files(tmp_path, monkeypatch, link):
    from stagewise.engine import rundir

    monkeypatch.setattr(os, "link", link)  # was, on Windows without hard links: the run failed, "Incorrect function"
    fresh = rundir.RunDir.create(tmp_path / "fresh", "# a run alone\n", {})  # a folder no other run took: written
    assert (fresh.path / "recipe.toml").read_text() == "# a run alone\n" and not list(fresh.path.glob(".*"))
    check = rundir.empty_folder

    def other_run_first(path, advice):  # the other process's recipe.toml lands between this one's check and write
        path = check(path, advice)
        path.mkdir()
        (path / "recipe.toml").write_text("# the other run's\n")
        return path

    monkeypatch.setattr(rundir, "empty_folder", other_run_first)
    with pytest.raises(CheckpointError, match="was taken by another run started at the same time; pass --out"):
        rundir.RunDir.create(tmp_path / "tiny", "# this run's\n", {})  # was: wrote over the other run's files
    assert [p.name for p in (tmp_path / "tiny").iterdir()] == ["recipe.toml"]
    assert (tmp_path / "tiny" / "recipe.toml").read_text() == "# the other run's\n"


def test_a_run_that_lost_the_folder_to_another_leaves_the_files_that_run_is_writing(tmp_path, monkeypatch):
    # was: each run first deleted the temp files in the folder, as a killed run's leftovers, so the one that
    # lost the race could delete the winner's env.json mid-write (and the winner failed, not the loser)
    from stagewise.engine import rundir

    check = rundir.empty_folder

    def other_run_first(path, advice):
        path = check(path, advice)
        path.mkdir()
        (path / "recipe.toml").write_text("# the other run's\n")
        (path / ".env.json.k2x9.tmp").write_text("{")  # the other run writing its env.json
        return path

    monkeypatch.setattr(rundir, "empty_folder", other_run_first)
    with pytest.raises(CheckpointError, match="was taken by another run started at the same time"):
        rundir.RunDir.create(tmp_path / "tiny", "# this run's\n", {})
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == [".env.json.k2x9.tmp", "recipe.toml"]


def test_a_run_whose_recipe_temp_file_the_winner_removed_says_the_folder_was_taken(tmp_path, monkeypatch):
    # the winner clears the folder's temp files once its recipe.toml is in place: the loser's, between its
    # write and its link, goes too, and the link finds no file (was: FileNotFoundError naming the temp file)
    link = os.link

    def winner_between(source, target):
        Path(target).write_text("# the other run's\n")
        Path(source).unlink()
        link(source, target)

    monkeypatch.setattr(os, "link", winner_between)
    from stagewise.engine.rundir import RunDir

    with pytest.raises(CheckpointError, match="was taken by another run started at the same time"):
        RunDir.create(tmp_path / "tiny", "# this run's\n", {})
    assert [p.name for p in (tmp_path / "tiny").iterdir()] == ["recipe.toml"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full, a device that is always full")
def test_a_full_disk_under_metrics_jsonl_names_it_and_the_run_closes_cleanly(tmp_path):
    from stagewise.engine.rundir import RunDir

    run = RunDir.create(tmp_path / "run", "", {})
    (run.path / "metrics.jsonl").unlink()
    (run.path / "metrics.jsonl").symlink_to("/dev/full")
    with pytest.raises(OSError) as info:  # was: no file named
        run.log({"event": "step"})
    assert (info.value.errno, info.value.filename) == (errno.ENOSPC, str(run.path / "metrics.jsonl"))
    run.close()  # was: the refused line was flushed again at close, whose error hid the first (no file named)


def test_a_run_started_over_in_a_folder_whose_metrics_jsonl_links_elsewhere_leaves_that_file(tmp_path):
    from stagewise.engine.rundir import RunDir

    outside = tmp_path / "notes.txt"
    outside.write_text("mine\n")
    run_dir = tmp_path / "run"  # a handed-over folder of a run stopped before its first checkpoint
    run_dir.mkdir()
    (run_dir / "recipe.toml").write_text("# the run's\n")
    (run_dir / "metrics.jsonl").symlink_to(outside)
    run = RunDir.create(run_dir, "# the run's\n", {}, again=True)  # what --resume of that folder does
    run.log({"event": "step"})
    run.close()
    assert outside.read_text() == "mine\n"  # was: emptied, then the run's records appended to it
    metrics = run_dir / "metrics.jsonl"
    assert not metrics.is_symlink() and metrics.read_text() == '{"event": "step"}\n'
