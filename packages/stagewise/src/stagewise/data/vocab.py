"""Word-level vocabulary, built from the training split's tokens only.

Ids: ``<unk>`` is 0, ``<eos>`` is 1, then words by frequency (most frequent first), ties in
alphabetical order, so the same tokens always give the same ids.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

UNK, EOS = "<unk>", "<eos>"
SPECIALS = (UNK, EOS)


class Vocabulary:
    """Token <-> id mapping; unknown tokens encode to ``<unk>``."""

    def __init__(self, itos: list[str]):
        if list(itos[:2]) != list(SPECIALS):
            raise ValueError(f"a vocabulary must start with {list(SPECIALS)}, got {list(itos[:2])}")
        self.itos = list(itos)  # id -> token
        self.stoi = {token: i for i, token in enumerate(self.itos)}  # token -> id
        if len(self.stoi) != len(self.itos):
            raise ValueError("a vocabulary must not list a token twice")

    @classmethod
    def build(cls, tokens: Iterable[str], min_freq: int = 1, max_size: int | None = None) -> Vocabulary:
        """The vocabulary of ``tokens``: words seen at least ``min_freq`` times, the most
        frequent first, at most ``max_size`` entries in all (the two specials included)."""
        return cls.from_counts(Counter(tokens), min_freq, max_size)

    @classmethod
    def from_counts(cls, counts: Mapping[str, int], min_freq: int = 1, max_size: int | None = None) -> Vocabulary:
        """:meth:`build` from each word's count (words counted 0 times are left out)."""
        if max_size is not None and max_size < len(SPECIALS):
            raise ValueError(f"max_size must be at least {len(SPECIALS)} (the specials "
                             f"{list(SPECIALS)}), got {max_size}")
        # the specials are not ranked, e.g. WikiText writes <unk> in its text
        ranked = sorted(((word, count) for word, count in counts.items() if word not in SPECIALS),
                        key=lambda item: (-item[1], item[0]))
        words = [word for word, count in ranked if count >= max(min_freq, 1)]
        if max_size is not None:
            words = words[: max_size - len(SPECIALS)]
        return cls([*SPECIALS, *words])

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, tokens: Iterable[str]) -> list[int]:
        return [self.stoi.get(token, 0) for token in tokens]

    def decode(self, ids: Iterable[int]) -> str:
        """The tokens of ``ids`` joined by single spaces."""
        return " ".join(self.itos[i] for i in ids)

    def to_text(self) -> str:
        """One token per line, line i (from 0) holding id i: a run directory's ``vocab.txt``."""
        return "".join(f"{token}\n" for token in self.itos)  # tokens hold no whitespace

    @classmethod
    def from_file(cls, path: str | Path) -> Vocabulary:
        """The vocabulary a run saved as ``RUN_DIR/vocab.txt``, to decode its model's ids."""
        return cls(Path(path).read_text(encoding="utf-8").splitlines())
