"""Datasets: every loader turns a source into :class:`DataSplits` of dict-of-tensor items."""

from stagewise.data.arrays import ArrayDataset, NpzArrays, NpzOptions, array_splits
from stagewise.data.idx import IdxImages, IdxOptions, read_idx
from stagewise.data.splits import DataError, DataSplits, deal, split_bounds, split_indices
from stagewise.data.tabular import CsvOptions, CsvTable, JsonLines, JsonlOptions
from stagewise.data.text import LMWindows, TextCorpus, TextOptions, tokenize
from stagewise.data.vocab import Vocabulary

__all__ = [
    "ArrayDataset", "CsvOptions", "CsvTable", "DataError", "DataSplits", "IdxImages",
    "IdxOptions", "JsonLines", "JsonlOptions", "LMWindows", "NpzArrays", "NpzOptions",
    "TextCorpus", "TextOptions", "Vocabulary", "array_splits", "deal", "read_idx",
    "split_bounds", "split_indices", "tokenize",
]
