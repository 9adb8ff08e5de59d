"""Word-level language-modelling data: text files (or a built-in corpus) to token windows.

Tokenisation is WikiText's: each line is split on whitespace (lowercased by default) and
every non-empty line ends with ``<eos>``. Sources, by the ``path`` option:

- a directory with ``train.txt`` / ``valid.txt`` / ``test.txt`` (or ``train.jsonl`` / ..., or
  WikiText's ``wiki.train.tokens`` / ...): those files are the splits;
- a directory of ``.txt`` and ``.jsonl`` files (searched recursively, read in sorted order) or
  one file: the token stream is cut into contiguous splits by the ``splits`` fractions;
- unset: the built-in offline corpus, the English documentation that ships with Python
  (``pydoc_data.topics``, ~79 topics, ~465k characters); each topic is a document and whole
  documents are dealt to the splits, so no document is in two splits.

A ``.jsonl`` file is JSON Lines: one object per line, whose ``text_field`` (``"text"``) is one
record's text, read as lines of text like a ``.txt`` file's.

The vocabulary is built from the training split only; nothing depends on the seed. A corpus is
held as one int32 per token. A file of 1 MB or more is tokenised once: its ids are cached
(:mod:`stagewise.data.textcache`) and read back by the next load that reads it with the same options.
"""

from __future__ import annotations

import json
import random
import re
import sys
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset

from stagewise.data.batch import Batch
from stagewise.data.files import encoding_problem, read_text, recut, stream_text, text_lines
from stagewise.data.splits import (
    DataError,
    DataSplits,
    check_data_options,
    deal,
    default_splits,
    fractions_problem,
    split_bounds,
)
from stagewise.data.tabular import json_object
from stagewise.data.textcache import FileTokens, TextCache
from stagewise.data.vocab import EOS, Vocabulary
from stagewise.engine.progress import loading_bar
from stagewise.engine.rundir import write_text_atomic

if TYPE_CHECKING:
    from tqdm import tqdm

# split -> file names that hold it, in order of preference
SPLIT_FILES = {
    "train": ("train.txt", "train.jsonl", "wiki.train.tokens"),
    "valid": ("valid.txt", "valid.jsonl", "wiki.valid.tokens"),
    "test": ("test.txt", "test.jsonl", "wiki.test.tokens"),
}
BUILTIN = "the built-in corpus"
LAYOUTS = ("a directory with train.txt, valid.txt and test.txt (or train.jsonl, ..., or wiki.train.tokens, ...), "
           "a directory of .txt and .jsonl files, or a single text or .jsonl file")


@dataclass
class TextOptions:
    """The recipe's ``[data]`` keys for ``stagewise.text``."""

    path: str | None = None  # text source (see the module docs); unset: the built-in corpus
    seq_len: int = 32  # tokens each window predicts; a window holds seq_len + 1 tokens
    lowercase: bool = True  # lowercase the text before splitting it into words
    min_freq: int = 1  # training-split words seen fewer times than this become <unk>
    max_vocab: int | None = None  # cap on the vocabulary size, <unk> and <eos> included
    max_tokens: int | None = None  # keep only each split's first max_tokens tokens (tiny tests)
    encoding: str = "utf-8"  # of the text files, e.g. "latin-1" or "cp1252"; a UTF-8 BOM is dropped
    text_field: str = "text"  # the field of a .jsonl file's objects that holds each record's text
    cache: bool = True  # keep the token ids of files of 1 MB or more between runs (stagewise.data.textcache)
    # split name -> fraction; only for sources without train/valid/test files
    splits: dict[str, float] = field(default_factory=default_splits)

    def __post_init__(self) -> None:
        sizes = {name: getattr(self, name) for name in ("seq_len", "min_freq", "max_tokens")}
        check_data_options(
            **{name: f"must be a positive integer, got {value}" for name, value in sizes.items()
               if value is not None and value < 1},
            max_vocab=None if self.max_vocab is None or self.max_vocab >= 3
            else f"must be at least 3 (<unk>, <eos> and one word), got {self.max_vocab}",
            splits=fractions_problem(self.splits) or _train_problem(self.splits),
            encoding=encoding_problem(self.encoding),
            text_field=None if self.text_field else "must name the field that holds the text, e.g. \"text\"")


def _train_problem(splits: dict[str, float]) -> str | None:
    if "train" in splits:
        return None
    return f"must include 'train' (the vocabulary is built from it); got {', '.join(splits)}"


CHUNK = 1 << 20  # characters lowercased and split at a time: a big text (or one long line) is never copied whole
_SPACE = re.compile(r"\s")
_LAST_SPACE = re.compile(r"\s\S*\Z")  # a text's last whitespace character (linear: no word is scanned twice)


def _chunks(text: str) -> Iterator[str]:
    """``text`` in pieces of about CHUNK characters, each cut just after a whitespace character: no word
    is cut, and lowercasing each piece gives what lowercasing the whole text gives (whitespace is
    neither a letter nor skipped by the case rules, so even a final sigma reads the same)."""
    start = 0
    while start < len(text):
        cut = _SPACE.search(text, start + CHUNK)
        end = len(text) if cut is None else cut.end()
        yield text[start:end]
        start = end


def line_words(pieces: Iterable[str], lowercase: bool) -> Iterator[list[str]]:
    """The tokens of the text ``pieces`` make up, each piece cut just after a whitespace character (or at the
    text's end), a list at a time: each line's words (a long line's in pieces), with ``<eos>`` after the last
    word of each non-empty line. A line ends at LF, CR LF or a lone CR (old Mac files), as Python reads text
    files. A change to the tokens must bump ``textcache.FORMAT``: cached ids would keep the old ones."""
    open_line = False  # the line a chunk ends in has words so far
    for chunk in (chunk for piece in pieces for chunk in _chunks(piece)):
        # a CR is a line end too: CR LF reads as a line end and an empty line, which adds no token
        *ended, rest = (chunk.lower() if lowercase else chunk).replace("\r", "\n").split("\n")
        for line in ended:
            words = line.split()
            if words or open_line:
                words.append(EOS)
                yield words
            open_line = False
        words = rest.split()
        if words:
            yield words
            open_line = True
    if open_line:  # the text's last line has no line end
        yield [EOS]


def tokenize(text: str, lowercase: bool) -> list[str]:
    """WikiText-style tokens: each non-empty line's words, then ``<eos>``."""
    return [token for tokens in line_words([text], lowercase) for token in tokens]


class WordIndex(dict):
    """Word -> provisional id in order of first sighting (a new word gets the next id), so a
    corpus is held as one int32 per token, not one string object per token."""

    def __missing__(self, word: str) -> int:
        self[word] = n = len(self)
        return n


def token_ids(pieces: Iterable[str], lowercase: bool, index: WordIndex, limit: int | None = None) -> np.ndarray:
    """The tokens of the text ``pieces`` make up (as :func:`line_words` takes them) as ids of ``index``, (N,)
    int32; with ``limit``, at least its first ``limit`` tokens (whole lines, or pieces of a long line), no
    further piece taken."""
    index[EOS]  # <eos> takes provisional id 0 in every index, whatever the text starts with
    # 4 bytes a token (C int), the array's own buffer (no copy): a list would take 8 more (its pointers) until
    # copied. An id past int32 would raise OverflowError, never wrap, but 2**31 distinct words would need
    # some 100 GB for the index alone
    ids = array("i")
    for tokens in line_words(pieces, lowercase):
        ids.extend(map(index.__getitem__, tokens))  # C-speed lookups; only new words call __missing__
        if limit is not None and len(ids) >= limit:
            break
    return np.frombuffer(ids, dtype=np.intc)


def read_ids(path: Path, options: TextOptions, index: WordIndex, bar: tqdm, limit: int | None = None) -> np.ndarray:
    """The tokens of a ``.txt`` file, or of a ``.jsonl`` file's records' texts, as ids of ``index``, read a block
    at a time and only as far as ``limit`` needs; ``bar`` counts the file's bytes as they are read."""
    return token_ids(source_pieces(path, options, read=bar.update), options.lowercase, index, limit)


def to_index_ids(tokens: FileTokens, index: WordIndex) -> np.ndarray:
    """A file's ids of its own words as ids of ``index``, mapped in place: the file's new words join
    ``index`` in the file's order of first sighting, so the ids are those :func:`read_ids` gives with
    ``index``, whether the file's own ids were just tokenised or read from the cache."""
    return _map_in_place(tokens.ids, np.array([index[word] for word in tokens.words], dtype=np.int32))


def source_text(file: Path, options: TextOptions, errors: str = "strict") -> str:
    """A source file's text: a ``.jsonl`` (or ``.jsonl.gz``) file's records' texts (not its JSON), one after
    another, each ending its last line; any other file whole. ``errors`` as :func:`read_text`'s."""
    if file.name.endswith((".jsonl", ".jsonl.gz")):
        return "\n".join(jsonl_texts(file, options, errors))
    return read_text(file, "text file", options.encoding, errors)


def source_pieces(file: Path, options: TextOptions, read: Callable[[int], object] | None = None) -> Iterator[str]:
    """:func:`source_text` in pieces, each cut just after a whitespace character, read a block at a time
    (``read`` as :func:`stream_text`'s): a record's text ends with a line end, which adds no token."""
    if file.name.endswith((".jsonl", ".jsonl.gz")):
        return _joined(text + "\n" for text in jsonl_texts(file, options, read=read))
    return recut(stream_text(file, "text file", options.encoding, read=read), _after_last_space)


def _joined(texts: Iterable[str]) -> Iterator[str]:
    """``texts`` joined into pieces of about :data:`CHUNK` characters: tokenising each record's short text on its
    own would take half again as long."""
    batch: list[str] = []
    size = 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= CHUNK:
            yield "".join(batch)
            batch, size = [], 0
    if batch:
        yield "".join(batch)


def _after_last_space(text: str) -> int:
    """A cut of ``text`` just after a whitespace character, near its end: after its last ASCII space, tab or line
    end (found from the end, so a piece's last word alone is scanned), else after its last whitespace of any kind;
    0 if it has none."""
    end = max(text.rfind(" "), text.rfind("\n"), text.rfind("\t"), text.rfind("\r")) + 1
    if end:
        return end
    found = _LAST_SPACE.search(text)
    return 0 if found is None else found.start() + 1


def jsonl_texts(path: Path, options: TextOptions, errors: str = "strict",
                read: Callable[[int], object] | None = None) -> Iterator[str]:
    """The records' texts of a JSON Lines file (``options.text_field`` of each object), in order; blank lines
    are skipped. ``errors`` as :func:`read_text`'s, ``read`` as :func:`stream_text`'s."""
    field = options.text_field
    for line, text in enumerate(text_lines(path, "JSONL file", options.encoding, errors, read), start=1):
        if not text.strip():
            continue
        record = json_object(text, path, line)
        value = record.get(field)
        if not isinstance(value, str):
            found = f"is {json.dumps(value)[:40]}, not a string" if field in record else (
                f"is missing (fields: {', '.join(map(repr, list(record)[:8])) or 'none'})")
            raise DataError(f"{path}, line {line}: the text field {field!r} {found}; set data.text_field to the "
                            f"field that holds each record's text")
        yield value


def text_files(root: Path) -> list[Path]:
    """The ``.txt`` and ``.jsonl`` files under ``root``, sorted (a folder named ``x.txt`` is not one); a
    DataError naming a gzip-compressed one, which would otherwise be left out unsaid."""
    found = sorted(path for pattern in ("*.txt", "*.jsonl", "*.txt.gz", "*.jsonl.gz") for path in root.rglob(pattern)
                   if path.is_file())
    compressed = [path for path in found if path.suffix == ".gz"]
    if compressed:
        more = f" (and {len(compressed) - 1} more)" if len(compressed) > 1 else ""
        raise DataError(f"{compressed[0]}{more} is gzip-compressed: in a directory only .txt and .jsonl files are "
                        f"read; decompress them (gunzip), or set path to one .gz file")
    return found


def split_files(root: Path) -> dict[str, Path]:
    """The predefined split files in directory ``root``, by split; empty if there are none."""
    found = {}
    for split, names in SPLIT_FILES.items():
        for name in names:
            if (root / name).is_file():
                found[split] = root / name
                break
    _check_split_file_case(root, found)
    if found and "train" not in found:
        raise DataError(f"{root} has {', '.join(p.name for p in found.values())} but no training "
                        f"file; add train.txt (or wiki.train.tokens)")
    return found


def _check_split_file_case(root: Path, found: dict[str, Path]) -> None:
    """DataError for a split file named in other letter case (``Train.txt``): a case-sensitive file system
    would not take it for a split, and would cut the directory by ``splits`` instead, unsaid."""
    for split, names in SPLIT_FILES.items():
        if split in found:
            continue
        miscased = sorted(path for path in root.iterdir()
                          if path.name.lower() in names and path.name not in names and path.is_file())
        if miscased:
            name = next(name for name in names if name == miscased[0].name.lower())
            raise DataError(f"{miscased[0]}: split file names are lower case; rename it to {name} (as written it "
                            f"would not be read as the {split} split, and the directory would be cut by data.splits)")


def builtin_streams(options: TextOptions, index: WordIndex) -> dict[str, np.ndarray]:
    """Token streams (ids of ``index``) of the built-in corpus: Python's topic docs, dealt to splits by document."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some minimal Python builds leave pydoc_data out
        raise DataError(f"{BUILTIN} is Python's pydoc_data.topics, which this Python ({sys.executable}) lacks; "
                        f"set path to {LAYOUTS}") from exc

    documents = [token_ids([topics[key]], options.lowercase, index) for key in sorted(topics)]  # one per topic
    return {split: np.concatenate([documents[i] for i in ids])
            for split, ids in deal(len(documents), options.splits, source=BUILTIN, unit="documents").items()}


def load_streams(options: TextOptions, index: WordIndex) -> dict[str, np.ndarray]:
    """Token streams (ids of ``index``), by split, of the source that ``options.path`` names."""
    if options.path is None:
        return builtin_streams(options, index)
    root = Path(options.path).expanduser()
    if not root.exists():
        raise DataError(f"text data path {root} does not exist; set path to {LAYOUTS}, "
                        f"or leave it unset for the built-in corpus")
    predefined = split_files(root) if root.is_dir() else {}
    files = list(predefined.values()) or (text_files(root) if root.is_dir() else [root])
    if not files:
        raise DataError(f"no .txt or .jsonl files under {root}; expected {LAYOUTS}")
    # a split file's first max_tokens tokens are all that is kept: a quick run skips the rest
    limit = options.max_tokens if predefined else None
    streams = list(_file_streams(files, options, index, limit))
    if predefined:
        return dict(zip(predefined, streams, strict=True))
    tokens = streams[0] if len(streams) == 1 else np.concatenate(streams)  # one file: not copied
    if not len(tokens):
        raise DataError(f"{root} contains no text (0 tokens); expected {LAYOUTS}")
    return {split: tokens[start:end]
            for split, (start, end) in split_bounds(len(tokens), options.splits, source=str(root),
                                                    unit="tokens").items()}


def _file_streams(files: list[Path], options: TextOptions, index: WordIndex, limit: int | None) -> Iterator[np.ndarray]:
    """Each file's tokens as ids of ``index``, in order: read from the cache where it holds them, else tokenised
    (and cached, if big enough); the tokenising bar counts the bytes of the files the cache does not hold."""
    cache = TextCache({"lowercase": options.lowercase, "encoding": options.encoding,
                       "text_field": options.text_field, "max_tokens": limit}) if options.cache else None
    entries = [cache.entry(file) if cache else None for file in files]
    held = [entry is not None and entry.holds() for entry in entries]
    with loading_bar("tokenising", total=sum(file.stat().st_size for file, hit in zip(files, held, strict=True)
                                             if not hit)) as bar:
        for file, entry, hit in zip(files, entries, held, strict=True):
            if entry is None:  # not cached: tokenised straight into the source's index
                yield read_ids(file, options, index, bar, limit)
                continue
            tokens = entry.read() if hit else None
            if tokens is None:  # a file's entry holds ids of its own words, to serve any source it is part of
                own = WordIndex()
                tokens = FileTokens(read_ids(file, options, own, bar, limit), list(own))
                entry.write(tokens)
            yield to_index_ids(tokens, index)  # one file at a time: its words are dropped before the next's


PIECE = 1 << 16  # tokens mapped (or counted) at a time


def to_vocabulary_ids(tokens: np.ndarray, to_vocab: np.ndarray) -> torch.Tensor:
    """Provisional ids as vocabulary ids, ``to_vocab[token]``, (N,) int32: mapped in place."""
    return torch.from_numpy(_map_in_place(tokens, to_vocab))


def _map_in_place(ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    """``ids`` replaced by ``table[ids]`` a piece at a time, since a mapped copy would hold the corpus twice."""
    for start in range(0, len(ids), PIECE):
        piece = ids[start:start + PIECE]
        piece[:] = table[piece]
    return ids


def _counts(ids: np.ndarray, n: int) -> np.ndarray:
    """How often each of ids 0..n-1 occurs, counted a piece at a time: ``np.bincount`` would copy int32 ids
    whole into intp ones (8 bytes a token)."""
    counts = np.zeros(n, dtype=np.int64)
    for start in range(0, len(ids), PIECE):
        counts += np.bincount(ids[start:start + PIECE], minlength=n)
    return counts


class LMWindows(Dataset):
    """A token stream (1-D integer tensor, held as given: int32 takes half of int64's memory) cut into
    non-overlapping windows of ``seq_len + 1`` tokens; item i is ``{"input": w[:-1], "target": w[1:]}``
    for the i-th window w, as int64 (embedding indices). Tokens after the last whole window are left out."""

    def __init__(self, tokens: torch.Tensor, seq_len: int):
        if tokens.dim() != 1:
            raise ValueError(f"LMWindows needs a 1-D token stream, got shape {tuple(tokens.shape)}")
        self.tokens = tokens  # (N,)
        self.seq_len = seq_len
        # every whole window (a view of the stream), cut once into its input and target views: an item is
        # then two row selections, not a slice of the stream and two of the window (a third of the time)
        windows = tokens[: len(self) * (seq_len + 1)].reshape(-1, seq_len + 1)  # (len, seq_len + 1)
        self.inputs, self.targets = windows[:, :-1], windows[:, 1:]  # (len, seq_len) each

    def __len__(self) -> int:
        return len(self.tokens) // (self.seq_len + 1)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range: there are {len(self)} windows")
        return {"input": self.inputs[i].long(), "target": self.targets[i].long()}  # (seq_len,) each

    def __getitems__(self, indices: list[int]) -> Batch:
        """The batch of these items, collated, from one gather and one conversion to int64 per tensor
        (converting row by row would double a batch's loading time)."""
        rows = torch.tensor(indices)
        return Batch(input=self.inputs[rows].long(), target=self.targets[rows].long())


class TextCorpus:
    """``stagewise.text``: word-level language modelling on a text source."""

    name = "stagewise.text"
    Options = TextOptions

    @classmethod
    def from_recipe(cls, options: TextOptions, *, seed: int) -> DataSplits:
        """Windows of every split, and info: vocab_size, vocab, seq_len and tokens (per split).

        ``seed`` is unused: the text splits are fixed by the source and the options.
        """
        index = WordIndex()
        streams = load_streams(options, index)
        if options.max_tokens is not None:  # a cut stream copied: as a view it would keep all the ids read alive
            streams = {split: tokens[: options.max_tokens].copy() if len(tokens) > options.max_tokens else tokens
                       for split, tokens in streams.items()}
        counts = _counts(streams["train"], len(index)).tolist()  # index's words are in id order
        vocab = Vocabulary.from_counts(dict(zip(index, counts, strict=True)), options.min_freq, options.max_vocab)
        to_vocab = np.array(vocab.encode(index), dtype=np.int32)  # provisional id -> id (index iterates in id order)
        source = options.path or BUILTIN
        splits = {}
        for split, tokens in streams.items():
            if len(tokens) < options.seq_len + 1:
                raise DataError(f"split {split!r} of {source} has {len(tokens)} tokens, too few for "
                                f"one window of seq_len + 1 = {options.seq_len + 1}; use more text "
                                f"or a smaller seq_len")
            splits[split] = LMWindows(to_vocabulary_ids(tokens, to_vocab), options.seq_len)
        info = {"vocab_size": len(vocab), "vocab": vocab, "seq_len": options.seq_len,
                "tokens": {split: len(tokens) for split, tokens in streams.items()}}
        return DataSplits(splits, info)


def write_file_split(source: Path, out: Path, *, every: int = 10, valid: int = 0, test: int = 1,
                     chunk_lines: int | None = None, seed: int = 0, encoding: str = "utf-8",
                     errors: str = "strict", text_field: str = "text") -> dict[str, int]:
    """Write ``train.txt``/``valid.txt``/``test.txt`` (UTF-8) in ``out`` from the ``.txt`` and ``.jsonl``
    files under ``source`` (sorted order, read in ``encoding``; a ``.jsonl`` file's records' ``text_field``,
    as ``stagewise.text`` reads them), so that no text is in two splits. A byte the encoding cannot
    read is an error naming the file; ``errors="replace"`` reads it as U+FFFD instead (a corpus of
    mixed encodings).

    The units dealt are whole files, or with ``chunk_lines`` chunks of that many consecutive
    lines of a file (its last chunk may be shorter), numbered over all files: unit i goes to
    valid when ``i % every == valid``, to test when ``i % every == test``, else to train. Chunks
    are then put in one seeded random order per split, so that a prefix of a split (what
    ``data.max_tokens`` keeps) samples every file alike, and valid and test are drawn like train;
    whole files keep their order (a file split of a few files puts whole kinds of text in valid
    or test). Returns the units per split.

    Each file is written whole or not at all (a temp file renamed into place, which replaces a
    link there rather than writing through it). ``out`` must lie outside ``source``.
    """
    if Path(out).resolve().is_relative_to(Path(source).resolve()):  # a next split would read them as source text
        raise DataError(f"{out}: inside {source}, whose .txt files are the text dealt, so the split files would "
                        f"be read back as source text by the next split; give a folder outside {source}")
    options = TextOptions(encoding=encoding, text_field=text_field)  # read as stagewise.text reads them
    units = [unit for file in text_files(Path(source)) for unit in _units(source_text(file, options, errors),
                                                                          chunk_lines)]
    parts: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    for i, text in enumerate(units):
        parts["valid" if i % every == valid else "test" if i % every == test else "train"].append(text)
    empty = [split for split, texts in parts.items() if not texts]
    if empty or valid == test:
        unit = f"chunks of {chunk_lines} lines" if chunk_lines else ".txt files"
        raise DataError(f"{source}: {len(units)} {unit} leave {', '.join(empty) or 'no split'} empty "
                        f"(valid/test offsets {valid}, {test} of every {every}); they must differ, and "
                        f"there must be at least {max(valid, test) + 1} units, a few more for train")
    if chunk_lines:
        rng = random.Random(seed)
        for texts in parts.values():
            rng.shuffle(texts)
    for split, texts in parts.items():  # each whole or not at all: a cut-short train.txt would load without a word
        write_text_atomic(Path(out) / f"{split}.txt", "\n".join(texts))
    return {split: len(texts) for split, texts in parts.items()}


def _units(text: str, chunk_lines: int | None) -> list[str]:
    """A file's text whole, or its chunks of ``chunk_lines`` lines, lines ending where the loader
    ends them (LF, CR LF, a lone CR): ``str.splitlines`` also breaks at a form feed or U+2028,
    which would turn a character inside a line into a line end in the written split."""
    if not chunk_lines:
        return [text]
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines[-1] == "":  # the last line's end, not an empty line after it
        lines.pop()
    return ["\n".join(lines[start:start + chunk_lines]) for start in range(0, len(lines), chunk_lines)]
