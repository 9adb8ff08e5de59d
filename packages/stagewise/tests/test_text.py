"""The text pipeline: vocabulary, tokenisation, sources, windows and errors."""

import gzip
import json
import re
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from stagewise.data.splits import DataError, deal, split_bounds
from stagewise.data.text import LMWindows, TextCorpus, TextOptions, WordIndex, load_streams, tokenize
from stagewise.data.vocab import Vocabulary


def test_vocabulary_order_ties_and_specials():
    vocab = Vocabulary.build("b a c b a d <unk> b <eos>".split())
    assert vocab.itos == ["<unk>", "<eos>", "b", "a", "c", "d"]  # 3x b, 2x a, then c < d
    assert vocab.encode(["a", "zzz", "<eos>"]) == [3, 0, 1]
    assert vocab.decode([2, 3, 1]) == "b a <eos>"
    assert len(Vocabulary.build("b a c b a d".split(), min_freq=2)) == 4
    assert Vocabulary.build("b a c b a d".split(), max_size=3).itos == ["<unk>", "<eos>", "a"]  # a = b
    assert Vocabulary.build("b a".split(), max_size=2).itos == ["<unk>", "<eos>"]
    with pytest.raises(ValueError, match="max_size must be at least 2"):
        Vocabulary.build("b a".split(), max_size=1)  # a negative slice would keep words, not drop them


def test_a_vocabulary_saved_as_text_reads_back_with_the_same_ids(tmp_path):
    vocab = Vocabulary.build(tokenize("Été ¿qué?\tnaïve\u00a0word 東京 <b>\n", lowercase=False))
    (tmp_path / "vocab.txt").write_text(vocab.to_text(), encoding="utf-8")
    assert Vocabulary.from_file(tmp_path / "vocab.txt").itos == vocab.itos
    assert vocab.to_text().splitlines() == vocab.itos  # line i holds id i


def test_tokenize_is_wikitext_style():
    assert tokenize(" The cat\n\n  sat .\r\n", lowercase=True) == ["the", "cat", "<eos>", "sat", ".", "<eos>"]
    assert tokenize("The", lowercase=False) == ["The", "<eos>"]


def test_vocabulary_from_counts_ranks_as_build_and_leaves_out_unseen_words():
    words = "b a c b a d <unk> b <eos>".split()
    counts = {**{word: words.count(word) for word in words}, "zzz": 0}  # zzz: seen in valid only
    for min_freq, max_size in ((1, None), (2, None), (1, 3)):
        assert (Vocabulary.from_counts(counts, min_freq, max_size).itos
                == Vocabulary.build(words, min_freq, max_size).itos)
    # min_freq 0 (the API allows it) must not let in a word counted 0 times
    assert Vocabulary.from_counts(counts, 0).itos == Vocabulary.build(words).itos


TRICKY = "ΟΔΟΣ Σ\nİstanbul  ΣΑΣ\r\n\n  <unk> the The THE\n\t\n<eos> naïve\u00a0word\nthe a b the"


@pytest.mark.parametrize("options", [{}, {"lowercase": False}, {"min_freq": 2}, {"max_vocab": 4}, {"max_tokens": 5}])
def test_the_corpus_is_held_as_ids_that_equal_the_token_strings_path(tmp_path, options):
    # was: every token was a string object (a 100 MB text: 18M strings, 1.8 GB of memory), counted and
    # encoded in three more passes; the ids must be the same as that path's
    texts = {"train": TRICKY * 3 + "\nrare", "valid": TRICKY + " unseen", "test": "Σ the\nοδος"}
    for split, text in texts.items():
        (tmp_path / f"{split}.txt").write_text(text, encoding="utf-8")
    opts = TextOptions(path=str(tmp_path), seq_len=2, **options)
    streams = load_streams(opts, WordIndex())
    assert all(ids.dtype == np.int32 for ids in streams.values())  # no list of strings
    data = TextCorpus.from_recipe(opts, seed=0)
    tokens = {split: tokenize(text, opts.lowercase)[: opts.max_tokens] for split, text in texts.items()}
    vocab = Vocabulary.build(tokens["train"], opts.min_freq, opts.max_vocab)
    assert data.info["vocab"].itos == vocab.itos
    for split, words in tokens.items():
        assert data[split].tokens.dtype == torch.int32 and data[split].tokens.tolist() == vocab.encode(words)


def _one_file_corpus(path, lines):
    """A file of ``lines`` lines of 10 two-letter words (11 tokens a line with <eos>, 2.7 bytes a token)."""
    words = [a + b for a in "abcdefghijklmnopqrstuvwxyz" for b in "abcdefghijklmnopqrstuvwxyz"]
    picks = np.random.default_rng(0).integers(0, len(words), (lines, 10)).tolist()
    path.write_text("".join(" ".join(words[i] for i in row) + "\n" for row in picks), encoding="utf-8")
    return 11 * lines


def _traced(load):
    """``load()`` and the peak (bytes) and end (bytes still held) of the memory Python and numpy took meanwhile."""
    tracemalloc.start()
    try:
        result = load()
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak, held


def test_a_text_file_s_ids_are_held_once_while_they_are_read_and_mapped(tmp_path, monkeypatch):
    # was: a list of the ids (8 bytes a token and more) and its int64 copy, then a copy concatenating the one
    # file, then the stream mapped to vocabulary ids beside itself: 16-22 bytes a token at the peak, and a
    # 300 MB file (56M tokens) peaked at 1.6 GB over Python's own; now the ids (8) and the text (2.7 here)
    monkeypatch.setattr("stagewise.data.text.CHUNK", 1 << 12)  # the text's pieces small beside the ids
    tokens = _one_file_corpus(tmp_path / "corpus.txt", 100_000)
    data, peak, _ = _traced(lambda: TextCorpus.from_recipe(TextOptions(path=str(tmp_path / "corpus.txt")), seed=0))
    assert sum(data.info["tokens"].values()) == tokens
    assert peak / tokens < 13.5


def test_a_text_file_s_ids_are_held_at_4_bytes_a_token(tmp_path, monkeypatch):
    # was: one int64 per token (8 bytes) from tokenising to the last batch; here 8.6 bytes a token held after
    # the load and 11.3 at its peak (ids and text), then 4.4 and 7.1 (ids and the whole text: 2.7 bytes a
    # token), now 4.4 and 4.8 (ids and a block of the text, read a block at a time)
    monkeypatch.setattr("stagewise.data.text.CHUNK", 1 << 12)
    monkeypatch.setattr("stagewise.data.files.BLOCK", 1 << 12)  # blocks small beside the ids, as real files' are
    tokens = _one_file_corpus(tmp_path / "corpus.txt", 100_000)
    options = TextOptions(path=str(tmp_path / "corpus.txt"), cache=False)
    data, peak, held = _traced(lambda: TextCorpus.from_recipe(options, seed=0))
    assert data["train"].tokens.dtype == torch.int32
    assert held / tokens < 4.7 and peak / tokens < 5.3


def test_a_stream_max_tokens_cuts_holds_only_the_tokens_kept(tmp_path):
    # the ids are mapped to the vocabulary's in place: a cut stream is copied, or it would keep all of them
    _one_file_corpus(tmp_path / "corpus.txt", 20_000)
    opts = TextOptions(path=str(tmp_path / "corpus.txt"), max_tokens=1000)
    data, _, held = _traced(lambda: TextCorpus.from_recipe(opts, seed=0))
    assert data.info["tokens"] == {"train": 1000, "valid": 1000, "test": 1000}
    assert held < 600_000  # 3 x 1000 int64, the vocabulary (and what a first load imports), not 220k ids (1.8 MB)


# 3 tokens a line: max_tokens 3 is reached exactly at the end of the first line, 4 within the second
@pytest.mark.parametrize("max_tokens, kept, words", [(4, 6, ["w0", "w1"]), (3, 3, ["w0"])])
def test_max_tokens_tokenises_only_the_start_of_split_files(tmp_path, max_tokens, kept, words):
    # was: a quick run (max_tokens) on a big corpus tokenised every file whole, then kept a few tokens
    for split in ("train", "valid", "test"):
        (tmp_path / f"{split}.txt").write_text("".join(f"{split} w{i}\n" for i in range(1000)))
    index = WordIndex()
    streams = load_streams(TextOptions(path=str(tmp_path), seq_len=2, max_tokens=max_tokens), index)
    assert [len(ids) for ids in streams.values()] == [kept] * 3  # whole lines, up to the first reaching max_tokens
    assert list(index) == ["<eos>", "train", *words, "valid", "test"]  # no later line was split


@pytest.mark.parametrize("chunk", [1, 3, 7, 1 << 20])
def test_text_read_chunk_by_chunk_gives_each_line_s_words(monkeypatch, chunk):
    # chunks of whole lines are lowercased at once (no copy of a whole big text): as each line alone
    monkeypatch.setattr("stagewise.data.text.CHUNK", chunk)
    text = "ΟΔΟΣ\nΣ\nΑΣ \n\nΣΑ\r\nİ\nﬁ ẞ\n"  # final sigmas at line ends, characters that lower to two
    for lowercase in (True, False):
        assert tokenize(text, lowercase) == [w for line in text.split("\n") for w in (
            (line.lower() if lowercase else line).split() + ["<eos>"] if line.split() else [])]


def test_wikitext_directory_layout(tmp_path):
    (tmp_path / "wiki.train.tokens").write_text("a b c d\n" * 5)
    (tmp_path / "wiki.valid.tokens").write_text("a b e\n" * 3)
    (tmp_path / "wiki.test.tokens").write_text("d c b a\n" * 2)
    (tmp_path / "notes.txt").write_text("ignored when split files exist")
    data = TextCorpus.from_recipe(TextOptions(path=str(tmp_path), seq_len=4), seed=0)
    assert data.names() == ["train", "valid", "test"]
    assert data.info["tokens"] == {"train": 25, "valid": 12, "test": 10}
    assert data.info["vocab_size"] == 6 and "e" not in data.info["vocab"].stoi  # from train only
    assert len(data["train"]) == 5 and len(data["test"]) == 2


def test_single_file_split_contiguously(tmp_path):
    file = tmp_path / "book.txt"
    file.write_bytes("".join(f"w{i}\n" for i in range(50)).encode() + b"caf\xe9\n")  # Latin-1 byte
    opts = TextOptions(path=str(file), seq_len=3, splits={"train": 0.6, "valid": 0.2, "test": 0.2},
                       encoding="latin-1")
    data = TextCorpus.from_recipe(opts, seed=0)
    assert data.info["tokens"] == {"train": 61, "valid": 21, "test": 20}  # 102 tokens
    vocab = data.info["vocab"]
    assert vocab.decode(data["valid"][0]["input"].tolist()) == "<eos> <unk> <eos>"  # w31: not in train
    assert vocab.decode(data["train"][0]["input"].tolist()) == "w0 <eos> w1"


def test_directory_of_text_files_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.txt").write_text("two two\n")
    (tmp_path / "a.txt").write_text("one\n")
    opts = TextOptions(path=str(tmp_path), seq_len=1, splits={"train": 1.0})
    data = TextCorpus.from_recipe(opts, seed=0)
    stream = data["train"].tokens.tolist()
    assert data.info["vocab"].decode(stream) == "one <eos> two two <eos>"


def test_builtin_corpus_splits_are_disjoint_and_deterministic():
    opts = TextOptions(seq_len=8, max_tokens=2000)
    a, b = TextCorpus.from_recipe(opts, seed=0), TextCorpus.from_recipe(opts, seed=1)
    assert a.names() == ["train", "valid", "test"]
    assert a.info["vocab"].itos == b.info["vocab"].itos
    assert all(torch.equal(a[s].tokens, b[s].tokens) for s in a.names())
    docs = deal(79, opts.splits)
    assert sorted(i for ids in docs.values() for i in ids) == list(range(79))
    assert docs["valid"][:3] == [3, 13, 23] and len(docs["test"]) == 8


def test_a_python_without_pydoc_data_is_told_to_set_a_path(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydoc_data.topics", None)  # as in a Python built without it
    with pytest.raises(DataError, match=r"pydoc_data.topics, which this Python \(.*\) lacks; set path to a directory"):
        TextCorpus.from_recipe(TextOptions(seq_len=8), seed=0)


def test_windows_shift_input_and_target():
    windows = LMWindows(torch.arange(11), seq_len=4)
    assert len(windows) == 2
    assert windows[1]["input"].tolist() == [5, 6, 7, 8] and windows[1]["target"].tolist() == [6, 7, 8, 9]
    with pytest.raises(IndexError):
        windows[2]


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'nope'} does not exist"):
        TextCorpus.from_recipe(TextOptions(path=str(tmp_path / "nope")), seed=0)


def test_directory_without_text(tmp_path):
    with pytest.raises(DataError, match="no .txt or .jsonl files under"):
        TextCorpus.from_recipe(TextOptions(path=str(tmp_path)), seed=0)


def test_split_too_small_for_one_window(tmp_path):
    (tmp_path / "train.txt").write_text("a b c d e f\n")
    (tmp_path / "valid.txt").write_text("a\n")
    with pytest.raises(DataError, match=r"split 'valid' .* has 2 tokens, .* seq_len \+ 1 = 5"):
        TextCorpus.from_recipe(TextOptions(path=str(tmp_path), seq_len=4), seed=0)


@pytest.mark.parametrize("splits, message", [
    ({"train": 0.8, "valid": 0.1}, "sum to 0.9"),
    ({"train": 0.9, "valid": 0.1, "test": 0.0}, "must be a number > 0"),
    ({"valid": 0.5, "test": 0.5}, "must include 'train'"),
])
def test_bad_fractions(splits, message):
    with pytest.raises(DataError, match=message):
        TextOptions(splits=splits)


def test_split_bounds_refuses_empty_splits():
    assert split_bounds(10, {"train": 0.8, "valid": 0.1, "test": 0.1}) == {
        "train": (0, 8), "valid": (8, 9), "test": (9, 10)}
    with pytest.raises(DataError, match="split 'valid' would be empty: 0.1 of 3 examples"):
        split_bounds(3, {"train": 0.5, "valid": 0.1, "test": 0.4})


def test_write_file_split_keeps_files_whole(tmp_path):
    from stagewise.data.text import write_file_split

    source = tmp_path / "books"
    source.mkdir()
    for i in range(14):
        (source / f"{i:02d}.txt").write_text(f"book {i}")
    counts = write_file_split(source, tmp_path / "out", valid=3, test=7)
    assert counts == {"train": 11, "valid": 2, "test": 1}
    assert (tmp_path / "out" / "valid.txt").read_text() == "book 3\nbook 13"
    assert (tmp_path / "out" / "test.txt").read_text() == "book 7"
    assert "book 0\nbook 1\nbook 2\nbook 4" in (tmp_path / "out" / "train.txt").read_text()


def test_write_file_split_refuses_a_folder_inside_the_source_and_replaces_links(tmp_path):
    # was: split files written into the source folder were dealt again by the next split, test text into
    # train; and a train.txt that was a link had the split written through it into the file it named
    from stagewise.data.text import write_file_split

    source = tmp_path / "books"
    source.mkdir()
    for i in range(4):
        (source / f"{i}.txt").write_text(f"book {i}")
    for inside in (source, source / "split"):
        with pytest.raises(DataError, match=rf"^{re.escape(str(inside))}: inside {re.escape(str(source))}, whose "
                                            r"\.txt files are the text dealt"):
            write_file_split(source, inside, every=4, valid=1, test=2)
    assert sorted(p.name for p in source.iterdir()) == ["0.txt", "1.txt", "2.txt", "3.txt"]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "train.txt").symlink_to(source / "0.txt")
    write_file_split(source, tmp_path / "out", every=4, valid=1, test=2)
    assert (source / "0.txt").read_text() == "book 0"
    assert not (tmp_path / "out" / "train.txt").is_symlink()
    assert (tmp_path / "out" / "train.txt").read_text() == "book 0\nbook 3"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["test.txt", "train.txt", "valid.txt"]


def test_write_file_split_refuses_a_folder_inside_the_source_however_the_paths_are_written(tmp_path, monkeypatch):
    from stagewise.data.text import write_file_split

    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "0.txt").write_text("book 0")
    monkeypatch.chdir(tmp_path)
    for source, out in ((Path("books"), tmp_path / "books" / "split"), (tmp_path / "books", Path("books/./split")),
                        (tmp_path / "books", tmp_path / "other" / ".." / "books")):
        with pytest.raises(DataError, match=rf"^{re.escape(str(out))}: inside {re.escape(str(source))}, whose "):
            write_file_split(source, out, every=4, valid=1, test=2)
    assert sorted(p.name for p in (tmp_path / "books").iterdir()) == ["0.txt"]


def test_write_file_split_chunks_lines_where_the_loader_ends_them(tmp_path):
    # str.splitlines broke at the form feed and U+2028 too: a line end the text never had
    from stagewise.data.text import tokenize, write_file_split

    source = tmp_path / "books"
    source.mkdir()
    (source / "book.txt").write_text("a\x0cb\nc\u2028d\re\r\nf\n", encoding="utf-8", newline="")
    counts = write_file_split(source, tmp_path / "out", every=4, valid=1, test=2, chunk_lines=1)
    assert counts == {"train": 2, "valid": 1, "test": 1}  # 4 lines, as the loader reads them
    valid = (tmp_path / "out" / "valid.txt").read_bytes().decode()
    assert valid == "c\u2028d" and tokenize(valid, lowercase=False) == ["c", "d", "<eos>"]  # one line, kept whole


def test_write_file_split_drops_each_source_file_s_bom(tmp_path):
    from stagewise.data.text import TextCorpus, TextOptions, write_file_split

    source = tmp_path / "books"
    source.mkdir()
    for i in range(4):  # as Notepad and Excel save UTF-8
        (source / f"{i}.txt").write_bytes("\ufeffHello world\n".encode())
    write_file_split(source, tmp_path / "out", every=4, valid=1, test=2)
    assert "\ufeff" not in (tmp_path / "out" / "train.txt").read_text(encoding="utf-8")
    vocab = TextCorpus.from_recipe(TextOptions(path=str(tmp_path / "out"), seq_len=1), seed=0).info["vocab"]
    assert sorted(vocab.itos[2:]) == ["hello", "world"]  # no second, BOM-prefixed "hello"


def test_write_file_split_refuses_bytes_its_encoding_cannot_read_unless_told_to_replace_them(tmp_path):
    from stagewise.data.text import write_file_split

    source = tmp_path / "books"
    source.mkdir()
    for i in range(4):
        (source / f"{i}.txt").write_bytes(b"caf\xe9\n" if i == 2 else b"tea\n")  # one Latin-1 file
    with pytest.raises(DataError, match=r"2\.txt, line 1: byte 0xe9 at offset 3 is not utf-8 text"):
        write_file_split(source, tmp_path / "out", every=4, valid=1, test=2)
    write_file_split(source, tmp_path / "latin", every=4, valid=1, test=2, encoding="latin-1")
    assert (tmp_path / "latin" / "test.txt").read_text(encoding="utf-8") == "café\n"
    write_file_split(source, tmp_path / "mixed", every=4, valid=1, test=2, errors="replace")  # a mixed corpus
    assert (tmp_path / "mixed" / "test.txt").read_text(encoding="utf-8") == "caf\ufffd\n"


def test_write_file_split_deals_a_jsonl_file_s_texts_as_the_loader_reads_them(tmp_path):
    # was: a .jsonl file under the source (which the loader reads as its records' texts) was dealt as raw
    # JSON, so the split files trained on '{"text":' as a word
    from stagewise.data.text import TextCorpus, TextOptions, write_file_split

    source = tmp_path / "books"
    source.mkdir()
    for i in range(4):
        (source / f"{i}.jsonl").write_text(f'{{"text": "book {i}\\nends"}}\n{{"text": "more"}}\n')
    write_file_split(source, tmp_path / "out", every=4, valid=1, test=2)
    assert (tmp_path / "out" / "valid.txt").read_text() == "book 1\nends\nmore"
    assert (tmp_path / "out" / "train.txt").read_text() == "book 0\nends\nmore\nbook 3\nends\nmore"
    vocab = TextCorpus.from_recipe(TextOptions(path=str(tmp_path / "out"), seq_len=1), seed=0).info["vocab"]
    assert sorted(vocab.itos[2:]) == ["0", "3", "book", "ends", "more"]
    notes = tmp_path / "notes"  # records whose text is in another field, as data.text_field names it
    notes.mkdir()
    for i in range(4):
        (notes / f"{i}.jsonl").write_text(f'{{"body": "note {i}"}}\n')
    write_file_split(notes, tmp_path / "body", every=4, valid=1, test=2, text_field="body")
    assert (tmp_path / "body" / "test.txt").read_text() == "note 2"


def test_write_file_split_refuses_too_few_files(tmp_path):
    from stagewise.data.splits import DataError
    from stagewise.data.text import write_file_split

    source = tmp_path / "books"  # out beside it: a folder inside it is refused
    source.mkdir()
    with pytest.raises(DataError, match="0 .txt files leave train, valid, test empty"):
        write_file_split(source, tmp_path / "out")
    (source / "a.txt").write_text("one\ntwo\nthree")
    with pytest.raises(DataError, match="3 chunks of 1 lines leave valid empty"):
        write_file_split(source, tmp_path / "out", valid=3, test=1, chunk_lines=1)
    assert not (tmp_path / "out").exists()  # nothing written


def test_write_file_split_by_chunk_deals_every_line_once_in_a_seeded_order(tmp_path):
    from stagewise.data.text import write_file_split

    source = tmp_path / "books"
    source.mkdir()
    for b in range(2):
        (source / f"{b}.txt").write_text("\n".join(f"book {b} line {i}" for i in range(50)))
    counts = write_file_split(source, tmp_path / "a", valid=2, test=6, chunk_lines=5, seed=1)
    assert counts == {"train": 16, "valid": 2, "test": 2}  # 20 chunks: 2, 12 -> valid; 6, 16 -> test
    split = {name: (tmp_path / "a" / f"{name}.txt").read_text().splitlines() for name in counts}
    assert sorted(line for lines in split.values() for line in lines) == sorted(
        f"book {b} line {i}" for b in range(2) for i in range(50))
    assert sorted(split["valid"]) == sorted([f"book 0 line {i}" for i in range(10, 15)]
                                            + [f"book 1 line {i}" for i in range(10, 15)])
    # the order seed 1 gives, pinned (one generator shuffles train, valid, test in turn): another
    # draw, such as a fresh generator per split, would reorder every file split written so far
    assert split["train"][:20:5] == ["book 0 line 15", "book 1 line 15", "book 0 line 0", "book 1 line 40"]
    assert split["valid"][::5] + split["test"][::5] == ["book 1 line 10", "book 0 line 10", "book 0 line 30",
                                                        "book 1 line 30"]
    write_file_split(source, tmp_path / "b", valid=2, test=6, chunk_lines=5, seed=1)
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in
               ("train.txt", "valid.txt", "test.txt"))
    write_file_split(source, tmp_path / "c", valid=2, test=6, chunk_lines=5, seed=2)
    assert (tmp_path / "c" / "train.txt").read_bytes() != (tmp_path / "a" / "train.txt").read_bytes()


def test_an_empty_split_names_the_source_and_counts_its_units(tmp_path):
    (tmp_path / "one.txt").write_text("a b c\n")
    with pytest.raises(DataError, match=rf"{tmp_path / 'one.txt'}: split 'test' would be empty: 0\.1 of 4 tokens"):
        TextCorpus.from_recipe(TextOptions(path=str(tmp_path / "one.txt"), seq_len=1), seed=0)
    with pytest.raises(DataError, match=r"the built-in corpus: split 'valid' would be empty: 0\.001 of \d+ documents"):
        TextCorpus.from_recipe(TextOptions(splits={"train": 0.998, "valid": 0.001, "test": 0.001}), seed=0)


def test_deal_gives_each_split_the_size_split_bounds_gives():
    # halves of 5: split_bounds gives round(2.5) = 2 and 3; dealing in turn would give a 3 and b 2
    assert deal(5, {"a": 0.5, "b": 0.5}) == {"a": [0, 2], "b": [1, 3, 4]}
    for fractions in ({"train": 0.8, "valid": 0.1, "test": 0.1}, {"train": 0.7, "valid": 0.2, "test": 0.1},
                      {"train": 0.6, "valid": 0.2, "test": 0.2}):
        for n in range(10, 30):
            dealt = deal(n, fractions)
            sizes = {name: end - start for name, (start, end) in split_bounds(n, fractions).items()}
            assert {name: len(ids) for name, ids in dealt.items()} == sizes, (n, fractions)
            assert sorted(i for ids in dealt.values() for i in ids) == list(range(n))


def test_split_files_without_a_training_file(tmp_path):
    (tmp_path / "valid.txt").write_text("a b\n")
    (tmp_path / "test.txt").write_text("a b\n")
    with pytest.raises(DataError, match="has valid.txt, test.txt but no training file; add train.txt"):
        TextCorpus.from_recipe(TextOptions(path=str(tmp_path), seq_len=1), seed=0)


def test_a_split_needs_seq_len_plus_one_tokens(tmp_path):
    (tmp_path / "train.txt").write_text("a b c d e f\n")
    (tmp_path / "valid.txt").write_text("a b c\n")  # 4 tokens with <eos>: no window of 5
    with pytest.raises(DataError, match=r"split 'valid' .* has 4 tokens, too few for one window of seq_len \+ 1 = 5"):
        TextCorpus.from_recipe(TextOptions(path=str(tmp_path), seq_len=4), seed=0)
    (tmp_path / "valid.txt").write_text("a b c d\n")  # 5 tokens: exactly one window
    assert len(TextCorpus.from_recipe(TextOptions(path=str(tmp_path), seq_len=4), seed=0)["valid"]) == 1


def test_a_utf8_bom_is_not_part_of_the_first_word(tmp_path):
    (tmp_path / "notes.txt").write_bytes(b"\xef\xbb\xbfHello world\n")  # as Windows Notepad saves
    data = TextCorpus.from_recipe(TextOptions(path=str(tmp_path / "notes.txt"), seq_len=1,
                                              splits={"train": 1.0}), seed=0)
    assert data.info["vocab"].decode(data["train"].tokens.tolist()) == "hello world <eos>"


def test_train_txt_is_preferred_to_wikitext_names(tmp_path):
    (tmp_path / "train.txt").write_text("mine mine\n")
    (tmp_path / "wiki.train.tokens").write_text("wiki wiki\n")
    data = TextCorpus.from_recipe(TextOptions(path=str(tmp_path), seq_len=1), seed=0)
    assert data.names() == ["train"]
    assert data.info["vocab"].decode(data["train"].tokens.tolist()) == "mine mine <eos>"


def _jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({"id": i, field: text}) + "\n" for i, text in enumerate(texts)) + "\n")


def test_jsonl_split_files_read_each_record_s_text_field_as_lines_of_text(tmp_path):
    # was: a .jsonl file was no source, and one named as data.path was read as text: '{"text":' a word
    records = {"train": ["The cat\nsat .", "the dog"], "valid": ["a cat"], "test": ["the end\n"]}
    for split, texts in records.items():
        _jsonl(tmp_path / f"{split}.jsonl", texts)
    data = TextCorpus.from_recipe(TextOptions(path=str(tmp_path), seq_len=1), seed=0)
    vocab = data.info["vocab"]
    assert vocab.decode(data["train"].tokens.tolist()) == "the cat <eos> sat . <eos> the dog <eos>"
    assert vocab.decode(data["test"].tokens.tolist()) == "the <unk> <eos>"
    (tmp_path / "as.txt").write_text("The cat\nsat .\nthe dog\n")  # the same text as a .txt file: the same ids
    assert (TextCorpus.from_recipe(TextOptions(path=str(tmp_path / "as.txt"), seq_len=1, splits={"train": 1.0}),
                                   seed=0)["train"].tokens.tolist() == data["train"].tokens.tolist())


def test_a_directory_of_txt_and_jsonl_files_and_another_text_field(tmp_path):
    _jsonl(tmp_path / "b.jsonl", ["two two"], field="body")
    (tmp_path / "a.txt").write_text("one\n")
    opts = TextOptions(path=str(tmp_path), seq_len=1, splits={"train": 1.0}, text_field="body")
    data = TextCorpus.from_recipe(opts, seed=0)
    assert data.info["vocab"].decode(data["train"].tokens.tolist()) == "one <eos> two two <eos>"


@pytest.mark.parametrize("line, problem", [
    ('{"body": "x"}', r"line 2: the text field 'text' is missing \(fields: 'body'\); set data.text_field"),
    ('{"text": 3}', "line 2: the text field 'text' is 3, not a string"),
    ('{"text": "x"', "line 2: not valid JSON"),
    ('["x"]', r"line 2: expected a JSON object \{...\}"),
])
def test_a_jsonl_record_without_its_text_is_refused_naming_file_and_line(tmp_path, line, problem):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(DataError, match=f"{path}, {problem}"):
        TextCorpus.from_recipe(TextOptions(path=str(path), seq_len=1), seed=0)


@pytest.mark.parametrize("change, message", [
    (dict(text_field=""), 'text_field: must name the field that holds the text, e.g. "text"'),
    (dict(seq_len=0), "seq_len: must be a positive integer, got 0"),
    (dict(min_freq=0), "min_freq: must be a positive integer, got 0"),
    (dict(max_tokens=0), "max_tokens: must be a positive integer, got 0"),
    (dict(max_vocab=2), r"max_vocab: must be at least 3 \(<unk>, <eos> and one word\), got 2"),
])
def test_bad_text_options(change, message):
    with pytest.raises(DataError, match=message):
        TextOptions(**change)


def test_write_file_split_by_chunk_keeps_a_short_last_chunk(tmp_path):
    from stagewise.data.text import write_file_split

    source = tmp_path / "books"
    source.mkdir()
    (source / "a.txt").write_text("\n".join(f"line {i}" for i in range(23)))  # chunks of 5: 5, 5, 5, 5, 3
    counts = write_file_split(source, tmp_path / "out", chunk_lines=5)
    assert counts == {"train": 3, "valid": 1, "test": 1}  # chunk 0 -> valid, 1 -> test (of every 10)
    lines = [line for name in counts for line in (tmp_path / "out" / f"{name}.txt").read_text().splitlines()]
    assert sorted(lines) == sorted(f"line {i}" for i in range(23))


# --- fuzzing findings: text files that are not UTF-8 text --------------------------------------------


@pytest.mark.parametrize("raw, message", [
    # were read "successfully" as garbage words ("h\0e\0l\0l\0o\0") and trained on
    ("hello world\n".encode("utf-16"), r"text file .*c\.txt is UTF-16 text \(it starts with a UTF-16 byte-order "
                                       r"mark\); save it as UTF-8"),
    ("hello world\n".encode("utf-32"), r"c\.txt is UTF-32 text"),
    (b"hello world\nsecond\0line\n", r"text file .*c\.txt, line 2: a NUL byte, so this is not UTF-8 text \(UTF-16 "
                                     r"text without a byte-order mark, or binary data\); save it as UTF-8 text"),
], ids=["utf16", "utf32", "nul"])
def test_text_that_is_not_utf8_is_refused_naming_the_file(tmp_path, raw, message):
    (tmp_path / "c.txt").write_bytes(raw)
    with pytest.raises(DataError, match=message):
        TextCorpus.from_recipe(TextOptions(path=str(tmp_path / "c.txt"), seq_len=1, splits={"train": 1.0}), seed=0)


def test_text_is_read_through_gzip_and_a_folder_named_txt_is_not_a_file(tmp_path):
    import gzip

    (tmp_path / "a.txt").write_bytes(gzip.compress(b"one two\n"))  # gzip told by content, as the other loaders
    (tmp_path / "b.txt").mkdir()  # was an IsADirectoryError traceback
    (tmp_path / "b.txt" / "c.txt").write_text("three\n")
    data = TextCorpus.from_recipe(TextOptions(path=str(tmp_path), seq_len=1, splits={"train": 1.0}), seed=0)
    assert data.info["vocab"].decode(data["train"].tokens.tolist()) == "one two <eos> three <eos>"


def test_an_undecodable_byte_s_offset_counts_a_leading_bom(tmp_path):
    from stagewise.data.files import read_text

    (tmp_path / "t.txt").write_bytes(b"\xef\xbb\xbfab\n\xff")
    with pytest.raises(DataError, match=r"t\.txt, line 2: byte 0xff at offset 6 is not utf-8 text"):
        read_text(tmp_path / "t.txt", "text file")
    (tmp_path / "t.txt").write_bytes(b"a\r\nb\rc\n\xff")  # CR LF is one line end, as a lone CR or LF is
    with pytest.raises(DataError, match=r"t\.txt, line 4: byte 0xff at offset 7 is not utf-8 text"):
        read_text(tmp_path / "t.txt", "text file")


def test_a_lone_cr_ends_a_line_as_python_reads_text(tmp_path):
    # was: an old Mac file (lines ending in CR only) was one line with one <eos>, and an error in it said line 1
    text = "A b\rc\r\n\rd\r"
    assert tokenize(text, lowercase=True) == ["a", "b", "<eos>", "c", "<eos>", "d", "<eos>"]
    assert tokenize(text, lowercase=True) == tokenize(open_text(tmp_path, text), lowercase=True)
    (tmp_path / "mac.txt").write_bytes(b"one\rtwo\rcaf\xe9\r")
    with pytest.raises(DataError, match=r"mac\.txt, line 3: byte 0xe9 at offset 11 is not utf-8 text"):
        TextCorpus.from_recipe(TextOptions(path=str(tmp_path / "mac.txt")), seed=0)


def open_text(tmp_path, text):
    """``text`` as Python's open() reads it back from a file (universal newlines)."""
    (tmp_path / "t.txt").write_bytes(text.encode())
    with open(tmp_path / "t.txt", encoding="utf-8") as f:
        return f.read()


@pytest.mark.parametrize("chunk", [1, 4, 1 << 20])
def test_one_long_line_is_tokenised_piece_by_piece(tmp_path, monkeypatch, chunk):
    # was: a file of one 50 MB line was split into 8M word strings at once (1 GB), max_tokens or not
    monkeypatch.setattr("stagewise.data.text.CHUNK", chunk)
    words = [f"W{i}\u03a3" for i in range(200)]  # a capital sigma at each word's end: final once lowercased
    for split in ("train", "valid", "test"):
        (tmp_path / f"{split}.txt").write_text(" ".join(words))
    assert tokenize(" ".join(words), lowercase=True) == [w.lower() for w in words] + ["<eos>"]
    index = WordIndex()
    streams = load_streams(TextOptions(path=str(tmp_path), seq_len=2, max_tokens=5), index)
    whole = chunk > len(words[0]) * 200  # one chunk holds the line: it is read whole
    assert all(len(ids) == 200 if whole else 5 <= len(ids) < 10 for ids in streams.values())
    assert len(index) == 201 if whole else len(index) < 10  # <eos> and the words read


def test_chunks_lowercase_as_the_whole_text_does(monkeypatch):
    # pieces are cut after whitespace, even inside a line: final sigma, İ and ẞ read as in text.lower()
    text = "ΟΔΟΣ Σ ΑΣ\tΣΑ İ ﬁ ẞ\u00a0ΣΣ \u2029Σ\u0345 x\r\nΣ'Σ\rΣ\n\nΣ."
    expected = [w for line in text.lower().replace("\r", "\n").split("\n") for w in line.split() + ["<eos>"]
                if line.split()]
    for chunk in range(1, len(text) + 1):
        monkeypatch.setattr("stagewise.data.text.CHUNK", chunk)
        assert tokenize(text, lowercase=True) == expected, chunk


def test_split_files_named_in_other_case_are_refused(tmp_path):
    # was: Train.txt, Valid.txt, Test.txt were read as three plain files cut by data.splits, unsaid (on Linux)
    for name in ("Train.txt", "Valid.txt", "Test.txt"):
        (tmp_path / name).write_text("a b c d\n")
    with pytest.raises(DataError, match=r"Train\.txt: split file names are lower case; rename it to train\.txt"):
        TextCorpus.from_recipe(TextOptions(path=str(tmp_path), seq_len=1), seed=0)


def test_gzip_files_in_a_directory_are_named_not_left_out(tmp_path):
    # was: a directory's .txt.gz files were skipped unsaid (or "no .txt or .jsonl files" if all were)
    (tmp_path / "a.txt").write_text("a b c d\n")
    (tmp_path / "b.txt.gz").write_bytes(gzip.compress(b"e f g h\n"))
    with pytest.raises(DataError, match=r"b\.txt\.gz is gzip-compressed: in a directory only \.txt and \.jsonl files "
                                        r"are read; decompress them \(gunzip\), or set path to one \.gz file"):
        TextCorpus.from_recipe(TextOptions(path=str(tmp_path), seq_len=1), seed=0)


def test_one_gzip_compressed_jsonl_file_is_read_as_its_records_texts(tmp_path):
    # was: read as plain text, so '{"text":' and 'world"}' were words
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "hello world"}\n{"text": "hello"}\n'))
    data = TextCorpus.from_recipe(TextOptions(path=str(path), seq_len=1, splits={"train": 1.0}), seed=0)
    assert data.info["vocab"].decode(data["train"].tokens.tolist()) == "hello world <eos> hello <eos>"


@pytest.mark.parametrize(("itos", "problem"), [
    (["a", "<eos>"], r"a vocabulary must start with \['<unk>', '<eos>'\], got \['a', '<eos>'\]"),
    (["<unk>", "<eos>", "a", "a"], "a vocabulary must not list a token twice"),
])
def test_a_bad_vocabulary_is_refused(itos, problem):
    with pytest.raises(ValueError, match=problem):
        Vocabulary(itos)


def test_a_corpus_of_no_tokens_is_a_data_error(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.txt contains no text \(0 tokens\)"):
        load_streams(TextOptions(path=str(tmp_path / "empty.txt"), seq_len=2), WordIndex())


def test_lm_windows_refuse_a_stream_that_is_not_1d():
    with pytest.raises(ValueError, match=r"LMWindows needs a 1-D token stream, got shape \(2, 3\)"):
        LMWindows(torch.zeros(2, 3, dtype=torch.long), seq_len=2)
