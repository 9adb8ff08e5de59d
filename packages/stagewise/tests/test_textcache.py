"""The cache of tokenised text files, and the int32 token streams: the same ids and batches as without."""

import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
import pytest
import torch

from stagewise.cli.cache import size_text
from stagewise.cli.main import main
from stagewise.data import textcache
from stagewise.data.text import LMWindows, TextCorpus, TextOptions, WordIndex, load_streams, read_ids
from stagewise.engine.batches import in_process_batches
from stagewise.engine.progress import loading_bar

# words in three scripts, a line end of each kind, <unk>/<eos> in the text, a JSON lone surrogate below
TEXT = "ΟΔΟΣ Σ\nİstanbul  ΣΑΣ\r\n\n  <unk> the The THE\r\t\n<eos> naïve\u00a0word\nthe a b the\n" * 20
RECORDS = "".join(json.dumps({"text": f"rec {i} \ud800x the"}) + "\n" for i in range(30))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The cache folder of this test, with every file big enough to be cached."""
    monkeypatch.setenv("STAGEWISE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(textcache, "MIN_BYTES", 0)
    return tmp_path / "cache" / "text"


@pytest.fixture
def tokenised(monkeypatch):
    """The files tokenised so far (read_ids calls), by name."""
    names = []
    monkeypatch.setattr("stagewise.data.text.read_ids",
                        lambda path, *a, **k: names.append(path.name) or read_ids(path, *a, **k))
    return names


def _sources(tmp_path):
    """Three sources: split files (one of them JSONL), a directory of files, one file."""
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "train.txt").write_text(TEXT + "rare once\n", encoding="utf-8")
    (tmp_path / "splits" / "valid.jsonl").write_text(RECORDS, encoding="utf-8")
    (tmp_path / "splits" / "test.txt").write_text("Σ the unseen\nοδος\n", encoding="utf-8")
    (tmp_path / "dir" / "b").mkdir(parents=True)
    (tmp_path / "dir" / "a.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "dir" / "b" / "c.jsonl").write_text(RECORDS, encoding="utf-8")
    return [tmp_path / "splits", tmp_path / "dir", tmp_path / "dir" / "a.txt"]


def _load(path, seq_len=3, **options):
    return TextCorpus.from_recipe(TextOptions(path=str(path), seq_len=seq_len, **options), seed=0)


def _assert_same(a, b):
    assert a.info["vocab"].itos == b.info["vocab"].itos and a.info["tokens"] == b.info["tokens"]
    for split in a.names():
        assert a[split].tokens.dtype == b[split].tokens.dtype == torch.int32
        assert torch.equal(a[split].tokens, b[split].tokens)


@pytest.mark.parametrize("options", [{}, {"lowercase": False}, {"max_tokens": 50}, {"min_freq": 2, "max_vocab": 6}])
def test_ids_read_from_the_cache_are_those_tokenised(tmp_path, cache, tokenised, options):
    for source in _sources(tmp_path):
        entries = sorted(cache.glob("*"))
        uncached = _load(source, cache=False, **options)
        assert sorted(cache.glob("*")) == entries  # cache = false writes nothing
        first = _load(source, **options)  # tokenised and cached
        tokenised.clear()
        second = _load(source, **options)  # read from the cache
        assert tokenised == []
        _assert_same(first, uncached)
        _assert_same(second, uncached)
    # the provisional ids too: the words join the index in the order tokenising gives them
    plain, hit = WordIndex(), WordIndex()
    streams = load_streams(TextOptions(path=str(tmp_path / "dir"), cache=False), plain)
    for split, ids in load_streams(TextOptions(path=str(tmp_path / "dir")), hit).items():
        assert ids.dtype == np.int32 and np.array_equal(ids, streams[split])
    assert list(hit) == list(plain)
    assert "\ud800x" in plain  # a lone surrogate from JSON, kept through the cache


def test_an_entry_serves_every_option_that_leaves_the_tokens_alone(tmp_path, cache, tokenised):
    source = _sources(tmp_path)[0]
    _load(source)
    tokenised.clear()
    _load(source, min_freq=3, max_vocab=5, splits={"train": 0.5, "valid": 0.5})
    _load(source, seq_len=5)
    assert tokenised == []
    assert len(list(cache.iterdir())) == 3  # one entry a file


@pytest.mark.parametrize("change", [{"lowercase": False}, {"encoding": "latin-1"}, {"text_field": "body"},
                                    {"max_tokens": 40}])
def test_an_option_that_changes_the_tokens_has_its_own_entries(tmp_path, cache, tokenised, change):
    (tmp_path / "train.txt").write_text("Café the\n" * 30, encoding="utf-8")
    (tmp_path / "valid.jsonl").write_text("".join(json.dumps({"text": "a", "body": "b"}) + "\n" for _ in range(9)))
    (tmp_path / "test.txt").write_text("the the\n" * 3)
    _load(tmp_path)
    tokenised.clear()
    data = _load(tmp_path, **change)
    assert sorted(tokenised) == ["test.txt", "train.txt", "valid.jsonl"]
    _assert_same(data, _load(tmp_path, cache=False, **change))
    assert len(list(cache.iterdir())) == 6


@pytest.mark.parametrize("how", ["rewritten", "same size and mtime", "replaced by a copy"])
def test_a_changed_file_is_tokenised_again(tmp_path, cache, tokenised, how):
    file = tmp_path / "book.txt"
    file.write_text("one two three\n" * 40)
    before = _load(file)
    stat = file.stat()
    time.sleep(0.03)  # the kernel's file clock ticks every few ms: a change within one tick looks like none
    if how == "replaced by a copy":  # rsync's way: a new file renamed over the old one, times kept
        (tmp_path / "new").write_text("one two there\n" * 40)
        os.utime(tmp_path / "new", ns=(stat.st_atime_ns, stat.st_mtime_ns))
        os.replace(tmp_path / "new", file)
    else:
        file.write_text("one two three four\n" * 40 if how == "rewritten" else "one two there\n" * 40)
        if how == "same size and mtime":  # cp -p's way: written in place, the times set back
            os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    tokenised.clear()
    after = _load(file)
    assert tokenised == ["book.txt"]
    _assert_same(after, _load(file, cache=False))
    assert after.info["vocab"].itos != before.info["vocab"].itos
    assert len(list(cache.iterdir())) == 1  # the file's entry replaced, not joined by another


def test_another_stagewise_version_s_entry_is_not_used(tmp_path, cache, tokenised, monkeypatch):
    (tmp_path / "book.txt").write_text("one two three\n" * 40)
    _load(tmp_path / "book.txt")
    monkeypatch.setattr(textcache, "__version__", "99.0")
    tokenised.clear()
    _load(tmp_path / "book.txt")
    assert tokenised == ["book.txt"]


def _flip_id_byte(path):
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # inside the last id
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, why", [
    (lambda p: p.write_bytes(p.read_bytes()[:-6]), "ValueError: Failed to read all data"),
    (lambda p: p.write_bytes(b""), "EOFError: No data left in file"),
    (lambda p: p.write_bytes(b"garbage" * 50), "ValueError"),
    (lambda p: p.write_bytes(b"\x93NUMPY\x01\x00" + p.read_bytes()[8:100]), "Error"),
    (_flip_id_byte, "its contents do not match their checksum"),
])
def test_a_damaged_entry_is_a_warning_and_the_file_is_tokenised_again(tmp_path, cache, tokenised, damage, why):
    file = tmp_path / "book.txt"
    file.write_text(TEXT)
    expected = _load(file, cache=False)
    _load(file)
    [entry] = cache.iterdir()
    damage(entry)
    tokenised.clear()
    with pytest.warns(UserWarning, match=r"the cached token ids of .*book.txt \(.*\) are damaged \(.*") as caught:
        _assert_same(_load(file), expected)
    assert why in str(caught[0].message)
    assert tokenised == ["book.txt"]
    tokenised.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_same(_load(file), expected)  # the entry was written again
    assert tokenised == []


def test_an_unwritable_cache_is_one_warning_and_the_same_ids(tmp_path, cache):
    for name in ("a.txt", "b.txt"):
        (tmp_path / "dir").mkdir(exist_ok=True)
        (tmp_path / "dir" / name).write_text(TEXT)
    cache.parent.write_text("a file where the cache folder should be")
    with pytest.warns(UserWarning, match=r"not caching the token ids of .*a.txt in .*; each run tokenises it "
                                         r"again. Set STAGEWISE_CACHE_DIR") as caught:
        _assert_same(_load(tmp_path / "dir"), _load(tmp_path / "dir", cache=False))
    assert len(caught) == 1  # not one a file


def test_an_entry_must_leave_room_on_its_disk(tmp_path, cache, monkeypatch):
    (tmp_path / "book.txt").write_text(TEXT)
    monkeypatch.setattr(textcache.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1 << 30}))
    with pytest.warns(UserWarning, match=r"\(1.0 GiB free; an entry must leave 2 GiB\)"):
        _load(tmp_path / "book.txt")
    assert list(cache.iterdir()) == []


def test_under_torchrun_one_process_a_machine_writes(tmp_path, cache, tokenised, monkeypatch):
    (tmp_path / "book.txt").write_text(TEXT)
    monkeypatch.setenv("LOCAL_RANK", "1")
    _load(tmp_path / "book.txt")
    assert not cache.exists()
    monkeypatch.setenv("LOCAL_RANK", "0")
    _load(tmp_path / "book.txt")
    tokenised.clear()
    monkeypatch.setenv("LOCAL_RANK", "1")
    _load(tmp_path / "book.txt")  # and every process reads
    assert tokenised == []


def test_small_files_and_the_built_in_corpus_are_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("STAGEWISE_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "book.txt").write_text("one two\n" * 1000)  # 8 kB
    _load(tmp_path / "book.txt")
    TextCorpus.from_recipe(TextOptions(seq_len=8, max_tokens=2000), seed=0)
    assert not (tmp_path / "cache").exists()


def test_the_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("STAGEWISE_CACHE_DIR", "~/mine")
    assert textcache.cache_folder() == textcache.Path.home() / "mine"
    monkeypatch.delenv("STAGEWISE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert textcache.cache_folder() == tmp_path / "stagewise"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert textcache.cache_folder() == tmp_path / "home" / ".cache" / "stagewise"


def test_without_a_home_folder_the_load_goes_on_uncached(tmp_path, monkeypatch, tokenised):
    monkeypatch.delenv("STAGEWISE_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(textcache.Path, "home", lambda: (_ for _ in ()).throw(RuntimeError("no home")))
    monkeypatch.setattr(textcache, "MIN_BYTES", 0)
    (tmp_path / "book.txt").write_text(TEXT)
    with pytest.warns(UserWarning, match=r"not caching token ids \(no home\); set STAGEWISE_CACHE_DIR"):
        _assert_same(_load(tmp_path / "book.txt"), _load(tmp_path / "book.txt", cache=False))
    assert tokenised == ["book.txt", "book.txt"]


def test_a_cache_read_shows_no_tokenising_bar(tmp_path, cache, monkeypatch):
    totals = []
    monkeypatch.setattr("stagewise.data.text.loading_bar",
                        lambda desc, total: totals.append(total) or loading_bar(desc, total))
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "a.txt").write_text(TEXT)
    _load(tmp_path / "dir")
    (tmp_path / "dir" / "b.txt").write_text("new file\n" * 10)
    _load(tmp_path / "dir")
    assert totals == [len(TEXT.encode()), 90]  # then only the new file's bytes


# --- int32 streams, int64 batches -----------------------------------------------------------------


def test_an_int32_stream_gives_the_int64_items_and_batches_of_an_int64_one():
    stream = torch.randint(0, 50_000, (1000,))
    wide, narrow = LMWindows(stream, seq_len=7), LMWindows(stream.to(torch.int32), seq_len=7)
    for i in (0, 5, len(wide) - 1):
        for key in ("input", "target"):
            assert narrow[i][key].dtype == torch.long and torch.equal(narrow[i][key], wide[i][key])
    batches = [[3, 1, 4, 1, 5], [9, 2, 6], [len(wide) - 1]]
    for a, b in zip(in_process_batches(wide, batches), in_process_batches(narrow, batches), strict=True):
        assert a["input"].dtype == b["input"].dtype == torch.long
        assert torch.equal(a["input"], b["input"]) and torch.equal(a["target"], b["target"])


def test_a_corpus_is_held_as_int32_and_batched_as_int64(tmp_path):
    (tmp_path / "book.txt").write_text(TEXT)
    data = _load(tmp_path / "book.txt")
    assert data["train"].tokens.dtype == torch.int32
    assert data["train"][0]["input"].dtype == torch.long
    [batch] = in_process_batches(data["train"], [[0, 2]])
    assert batch["input"].dtype == batch["target"].dtype == torch.long
    assert batch["input"].tolist() == [data["train"].tokens[0:3].tolist(), data["train"].tokens[8:11].tolist()]


def test_cached_and_uncached_files_mix_in_one_source(tmp_path, cache, tokenised, monkeypatch):
    (tmp_path / "dir").mkdir()
    for name, text in (("a.txt", "small Words\n"), ("b.txt", TEXT), ("c.jsonl", RECORDS), ("d.txt", "ΣΑΣ new\n")):
        (tmp_path / "dir" / name).write_text(text, encoding="utf-8")
    monkeypatch.setattr(textcache, "MIN_BYTES", 500)  # b and c are cached, a and d are not
    plain = WordIndex()
    expected = load_streams(TextOptions(path=str(tmp_path / "dir"), cache=False), plain)
    for _ in ("miss", "hit"):
        tokenised.clear()
        index = WordIndex()
        streams = load_streams(TextOptions(path=str(tmp_path / "dir")), index)
        assert list(index) == list(plain)
        assert all(np.array_equal(streams[split], ids) for split, ids in expected.items())
    assert tokenised == ["a.txt", "d.txt"] and len(list(cache.iterdir())) == 2


def test_a_cache_hit_reads_each_entry_s_header_once(tmp_path, cache, monkeypatch):
    source = _sources(tmp_path)[1]  # two files: two entries
    expected = _load(source, cache=False)
    _load(source)
    loads = []
    monkeypatch.setattr(textcache, "_load", lambda f: loads.append(f) or np.load(f, allow_pickle=False))
    _assert_same(_load(source), expected)
    assert len(loads) == 2 * 3  # each entry's header, words and ids, once


# --- stagewise cache ------------------------------------------------------------------------------


def _cached(tmp_path, cache, name, text=TEXT):
    """The entry of a new file ``name`` holding ``text``, which a load has just cached."""
    before = set(cache.glob("*"))
    (tmp_path / name).write_text(text, encoding="utf-8")
    _load(tmp_path / name)
    [entry] = set(cache.glob("*")) - before
    return entry


def _tokens(file):
    return sum(map(len, load_streams(TextOptions(path=str(file), cache=False), WordIndex()).values()))


def _run(capsys, *args):
    """``stagewise *args``: its exit code and its output (it writes nothing on stderr)."""
    code = main(list(args))
    out, err = capsys.readouterr()
    assert err == ""
    return code, out


def test_the_cache_commands_run_without_importing_torch(tmp_path, cache):
    # was: the token cache's module imported the data package and the checkpoint module, and so torch:
    # `stagewise cache` took 2.3 s here, 0.5 s now
    _cached(tmp_path, cache, "a.txt")
    script = ("import sys; from stagewise.cli.main import main; codes = [main(['cache']), main(['cache', 'list'])]; "
              "print(codes, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=os.environ, check=True)
    assert done.stdout.splitlines()[-1] == "[0, 0] False" and "entries: 1" in done.stdout


def test_cache_says_where_it_is_and_how_much_it_holds(tmp_path, cache, capsys):
    entries = [_cached(tmp_path, cache, "a.txt"), _cached(tmp_path, cache, "b.txt", TEXT * 2)]
    (tmp_path / "b.txt").unlink()
    total = sum(entry.stat().st_size for entry in entries)
    assert _run(capsys, "cache") == (0, f"folder:  {cache}\nentries: 2, {size_text(total)}\nstale:   1, "
                                        f"{size_text(entries[1].stat().st_size)} (to remove: stagewise cache clear "
                                        f"--stale)\n")


def test_cache_list_says_of_each_entry_its_file_tokens_size_and_whether_a_load_uses_it(tmp_path, cache, capsys,
                                                                                         monkeypatch, tokenised):
    entries = {name: _cached(tmp_path, cache, name) for name in ("usable.txt", "changed.txt", "gone.txt")}
    for name, key, value in (("old.txt", "__version__", "0.0.1"), ("other.txt", "FORMAT", "stagewise-text-ids-0")):
        with monkeypatch.context() as patch:
            patch.setattr(textcache, key, value)
            entries[name] = _cached(tmp_path, cache, name)
    entries["unreadable"] = cache / f"{'0' * 32}.ids"
    entries["unreadable"].write_bytes(b"garbage" * 9)
    time.sleep(0.03)  # the kernel's file clock ticks every few ms
    (tmp_path / "changed.txt").write_text(TEXT + "more\n")
    (tmp_path / "gone.txt").unlink()
    loads = []
    monkeypatch.setattr(textcache, "_load", lambda f: loads.append(f) or np.load(f, allow_pickle=False))
    code, out = _run(capsys, "cache", "list")
    assert code == 0 and len(loads) == len(entries)  # the headers alone are read
    lines = {name: [line for line in out.splitlines() if name in line] for name in entries}
    options = "(lowercase=true, encoding=utf-8, text_field=text)"
    tokens = f"{_tokens(tmp_path / 'usable.txt'):,} tokens"
    for name, state in [("usable.txt", "usable"), ("changed.txt", "stale"), ("gone.txt", "stale"),
                        ("old.txt", "stale"), ("other.txt", "stale")]:
        [line] = lines[name]
        assert line.split()[:3] == [state, *size_text(entries[name].stat().st_size).split()]
        assert f"  {tokens}  {tmp_path.resolve() / name} {options}" in line  # the path as a load resolves it
    assert lines["usable.txt"][0].endswith(options)
    assert lines["changed.txt"][0].endswith(": the file changed")
    assert lines["gone.txt"][0].endswith(": the file is gone")
    assert lines["old.txt"][0].endswith(": made by stagewise 0.0.1")
    assert lines["other.txt"][0].endswith(": made in another format (stagewise-text-ids-0)")
    [line] = lines["unreadable"]
    assert line.startswith("stale   63 bytes") and f"? tokens  {entries['unreadable']}: unreadable header (" in line
    assert len(out.splitlines()) == len(entries)
    tokenised.clear()
    for name in ("usable.txt", "changed.txt", "old.txt", "other.txt"):
        _load(tmp_path / name)
    assert tokenised == ["changed.txt", "old.txt", "other.txt"]  # as the list says: loads use the usable one alone


@pytest.mark.parametrize("stale", [False, True])
def test_cache_clear_removes_the_entries_and_nothing_else(tmp_path, cache, capsys, stale):
    usable, gone = _cached(tmp_path, cache, "usable.txt"), _cached(tmp_path, cache, "gone.txt")
    (tmp_path / "gone.txt").unlink()
    damaged = cache / f"{'f' * 32}.ids"
    damaged.write_bytes(b"garbage")
    others = [cache.parent / "mine.ids", cache / "notes.txt", cache / f"{'a' * 32}.ids.bak", cache / f"{'b' * 31}.ids",
              cache / f".{usable.name}.x1.tmp"]
    for other in others:
        other.write_bytes(usable.read_bytes())  # the header of an entry, yet not an entry by its name or folder
    (cache / f"{'c' * 32}.ids").mkdir()
    removed = [gone, damaged] if stale else [usable, gone, damaged]
    freed = sum(entry.stat().st_size for entry in removed)
    code, out = _run(capsys, "cache", "clear", *["--stale"] * stale)
    assert code == 0
    assert [entry.exists() for entry in (usable, gone, damaged)] == [stale, False, False]
    assert all(other.exists() for other in others) and (cache / f"{'c' * 32}.ids").is_dir()
    lines = out.splitlines()
    assert [line.split()[0] for line in lines[:-1]] == ["removed"] * len(removed)
    assert [line for line in lines if "gone.txt" in line][0].endswith(": the file is gone")
    assert lines[-1] == f"freed {size_text(freed)}: removed {len(removed)} entries from {cache}" + (
        "; kept 1 usable entry" if stale else "")
    assert _run(capsys, "cache", "list")[1].startswith("usable" if stale else "no cached token ids")


def test_a_write_a_killed_process_left_is_a_stale_entry_once_unchanged_for_an_hour(tmp_path, cache, capsys,
                                                                                   monkeypatch):
    # was: SIGKILL during an entry's write left its temp file, GBs for a big corpus, which nothing removed
    temps, mkstemp = [], tempfile.mkstemp
    with monkeypatch.context() as patch:  # the temp file the entry's write made: the name a killed one leaves
        patch.setattr(tempfile, "mkstemp", lambda **kw: temps.append(mkstemp(**kw)) or temps[-1])
        entry = _cached(tmp_path, cache, "book.txt")
    assert [textcache.ENTRY_TEMP.fullmatch(os.path.basename(name)) is not None for _, name in temps] == [True]
    left, going = cache / f".{entry.name}.k3j_9xab.tmp", cache / f".{entry.name}.p0q1r2s3.tmp"
    left.write_bytes(entry.read_bytes()[:1000])
    going.write_bytes(b"a write in progress")
    now = time.time()
    os.utime(left, (now - 7300, now - 7300))
    os.utime(going, (now - 3500, now - 3500))  # a slow disk's write, 58 minutes unchanged: not yet
    assert _run(capsys, "cache")[1].splitlines()[1:] == [
        f"entries: 2, {size_text(entry.stat().st_size + 1000)}",
        f"stale:   1, {size_text(1000)} (to remove: stagewise cache clear --stale)"]
    listed = _run(capsys, "cache", "list")[1].splitlines()
    assert listed[0].startswith("usable") and len(listed) == 2
    assert listed[1].startswith(f"stale   {size_text(1000)}  ") and listed[1].endswith(  # tokens in their column
        f" ? tokens  {left}: an unfinished write that a killed process left (unchanged for 2.0 h)")
    removed, freed = _run(capsys, "cache", "clear", "--stale")[1].splitlines()
    assert removed.startswith("removed stale") and removed.endswith(f"{left}: an unfinished write that a killed "
                                                                    f"process left (unchanged for 2.0 h)")
    assert freed == f"freed {size_text(1000)}: removed 1 entry from {cache}; kept 1 usable entry"
    assert not left.exists() and going.exists() and entry.exists()


@pytest.mark.parametrize("args", [["cache"], ["cache", "list"], ["cache", "clear"], ["cache", "clear", "--stale"]])
def test_an_empty_or_missing_cache_is_a_plain_message(tmp_path, cache, capsys, args):
    assert _run(capsys, *args) == (0, f"no cached token ids in {cache}\n")  # no folder
    cache.mkdir(parents=True)
    (cache / "notes.txt").write_text("not an entry")
    assert _run(capsys, *args) == (0, f"no cached token ids in {cache}\n")
    assert (cache / "notes.txt").exists()


def test_cache_clear_stale_of_usable_entries_removes_nothing(tmp_path, cache, capsys):
    entry = _cached(tmp_path, cache, "book.txt")
    assert _run(capsys, "cache", "clear", "--stale") == (0, f"no stale entries in {cache}; kept 1 usable entry\n")
    assert entry.exists()


def test_cache_without_a_home_folder_says_what_to_set(monkeypatch, capsys):
    monkeypatch.delenv("STAGEWISE_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(textcache.Path, "home", lambda: (_ for _ in ()).throw(RuntimeError("no home")))
    assert main(["cache"]) == 1
    assert capsys.readouterr().err == ("stagewise: error: cannot find the cache folder (no home); set "
                                       "STAGEWISE_CACHE_DIR to the folder that holds it\n")


def test_sizes_are_shown_in_decimal_units():
    assert [size_text(n) for n in (0, 999, 1000, 12_345, 999_940, 999_960, 1_500_000_000, 3 * 10**12)] == [
        "0 bytes", "999 bytes", "1.0 kB", "12.3 kB", "999.9 kB", "1.0 MB", "1.5 GB", "3000.0 GB"]
