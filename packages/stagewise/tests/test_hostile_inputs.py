"""Files and settings a user could be handed: each is refused in one line naming the file or key, nothing
written before is lost, and nothing in a crafted file runs or reaches a traceback."""

from __future__ import annotations

import errno
import json
import os
import stat

import numpy as np
import pytest
import torch

from stagewise.cli.main import main
from stagewise.engine.checkpoint import FORMAT, atomic_write_bytes
from stagewise.errors import CheckpointError, ConfigError
from stagewise.export import load_npz


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
