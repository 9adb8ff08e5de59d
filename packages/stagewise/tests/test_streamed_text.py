"""Text files read a block at a time: the same text, lines, tokens and errors as a read of the whole file."""

import gzip
import io
import json
import random

import pytest

from stagewise.data.files import read_text, stream_text, text_lines
from stagewise.data.splits import DataError
from stagewise.data.text import TextCorpus, TextOptions, WordIndex, read_ids, token_ids

# pieces of text that blocks cut badly: line ends (CR LF), multi-byte characters, bytes UTF-8 cannot read
FRAGMENTS = [b"a", b"Bc", b" ", b"\t", b"\r", b"\n", b"\r\n", "\u00e9".encode(), "\u20ac".encode(),
             "\U0001d11e".encode(), "\u03a3".encode(), b"\xff", b"\xe2\x82", b"\x81"]
BLOCKS = [1, 2, 3, 5, 64]


def random_bytes(seed: int, n: int = 60) -> bytes:
    rng = random.Random(seed)
    raw = b"".join(rng.choice(FRAGMENTS) for _ in range(n))
    return (b"\xef\xbb\xbf" if seed % 3 == 0 else b"") + raw  # a UTF-8 BOM on every third


class NoBar:
    """A progress bar that shows nothing."""

    def update(self, n):
        pass


def is_text(raw: bytes) -> bool:
    """Whether ``raw`` is UTF-8 text without a NUL byte."""
    try:
        return "\0" not in raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return False


def whole_error(path, encoding="utf-8") -> str:
    """The DataError a file gives when it is read in one block."""
    with pytest.raises(DataError) as error:
        read_text(path, "text file", encoding)
    return str(error.value)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("encoding", ["utf-8", "latin-1", "cp1252"])
def test_text_read_a_block_at_a_time_is_the_text_decoded_whole(tmp_path, monkeypatch, block, encoding):
    monkeypatch.setattr("stagewise.data.files.BLOCK", block)
    for seed in range(40):
        raw = random_bytes(seed)
        (tmp_path / "t.txt").write_bytes(raw)
        expected = raw.decode("utf-8-sig" if encoding == "utf-8" else encoding, "replace")
        assert "".join(stream_text(tmp_path / "t.txt", "text file", encoding, "replace")) == expected


@pytest.mark.parametrize("block", BLOCKS)
def test_an_unreadable_byte_is_named_at_the_same_line_and_offset_whatever_the_blocks(tmp_path, monkeypatch, block):
    files = [random_bytes(seed) for seed in range(40)]
    files += [b"a\r", b"a\r\n\r\n\xe2\x82", b"\r\n\r\n\x00", b"ab\r\ncd\n\r\xff", b"\xef\xbb\xbf\r\n\xe2\x82"]
    expected = []
    for i, raw in enumerate(files):  # read whole first: BLOCK is larger than every file
        (tmp_path / f"{i}.txt").write_bytes(raw)
        expected.append(None if is_text(raw) else whole_error(tmp_path / f"{i}.txt"))
    monkeypatch.setattr("stagewise.data.files.BLOCK", block)
    for i, message in enumerate(expected):
        if message is None:
            assert read_text(tmp_path / f"{i}.txt", "text file") == files[i].decode("utf-8-sig")
        else:
            assert whole_error(tmp_path / f"{i}.txt") == message
    assert expected[-5] is None and "line 3: a NUL byte" in expected[-3]
    assert "line 4: byte 0xff at offset 8" in expected[-2]
    assert "line 2: byte 0xe2 at offset 5" in expected[-1]  # a character cut by the file's end


@pytest.mark.parametrize("block", BLOCKS)
def test_lines_read_a_block_at_a_time_are_the_lines_of_the_whole_text(tmp_path, monkeypatch, block):
    monkeypatch.setattr("stagewise.data.files.BLOCK", block)
    for seed in range(40):
        text = random_bytes(seed).decode("utf-8-sig", "replace")
        (tmp_path / "t.csv").write_text(text, encoding="utf-8", newline="")
        assert list(text_lines(tmp_path / "t.csv", "CSV file", "utf-8")) == list(io.StringIO(text, newline=""))


@pytest.mark.parametrize("block, chunk", [(1, 1), (3, 1 << 20), (7, 4), (1 << 20, 1 << 20)])
def test_tokens_read_a_block_at_a_time_are_those_of_the_whole_text(tmp_path, monkeypatch, block, chunk):
    monkeypatch.setattr("stagewise.data.files.BLOCK", block)
    monkeypatch.setattr("stagewise.data.text.CHUNK", chunk)
    options, bar, records = TextOptions(), NoBar(), []
    for seed in range(20):
        text = random_bytes(seed).decode("utf-8-sig", "replace")
        records.append(text)
        (tmp_path / "t.txt").write_text(text, encoding="utf-8", newline="")
        expected = token_ids([text], True, WordIndex())  # the whole text in one piece
        assert read_ids(tmp_path / "t.txt", options, WordIndex(), bar).tolist() == expected.tolist()
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in records))
    expected = token_ids(["\n".join(records)], True, WordIndex())
    assert read_ids(tmp_path / "t.jsonl", options, WordIndex(), bar).tolist() == expected.tolist()


def test_max_tokens_reads_a_split_file_only_as_far_as_it_needs(tmp_path, monkeypatch):
    # was: each split file was read and decoded whole, then tokenised only as far as max_tokens
    monkeypatch.setattr("stagewise.data.files.BLOCK", 1 << 10)
    for split in ("train", "valid", "test"):
        (tmp_path / f"{split}.txt").write_bytes(b"".join(b"w%d %s\n" % (i, split.encode()) for i in range(5000))
                                                + b"caf\xe9\n")  # a Latin-1 byte 60 kB in: not read
    quick = TextCorpus.from_recipe(TextOptions(path=str(tmp_path), seq_len=4, max_tokens=300, cache=False), seed=0)
    assert quick.info["tokens"] == {"train": 300, "valid": 300, "test": 300}
    with pytest.raises(DataError, match=r"train\.txt, line 5001: byte 0xe9 at offset \d+ is not utf-8 text"):
        TextCorpus.from_recipe(TextOptions(path=str(tmp_path), seq_len=4, cache=False), seed=0)
    read = []
    pieces = stream_text(tmp_path / "train.txt", "text file", read=read.append)
    assert [len(next(pieces)) for _ in range(3)] == [1 << 10] * 3 and sum(read) == 3 << 10  # 3 blocks of 60 kB
    pieces.close()


@pytest.mark.parametrize("gzipped", [False, True])
def test_the_bytes_read_add_up_to_the_file_s_size_on_disk(tmp_path, monkeypatch, gzipped):
    monkeypatch.setattr("stagewise.data.files.BLOCK", 1 << 10)
    raw = "".join(f"line {i} \u00e9\n" for i in range(20_000)).encode()
    (tmp_path / "t.txt").write_bytes(gzip.compress(raw) if gzipped else raw)
    read = []
    assert "".join(stream_text(tmp_path / "t.txt", "text file", read=read.append)).encode() == raw
    assert sum(read) == (tmp_path / "t.txt").stat().st_size and len(read) > 10
