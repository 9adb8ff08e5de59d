"""Datasets: every loader turns a source into :class:`DataSplits` of dict-of-tensor items."""

from stagewise.data.arrays import ArrayDataset, array_splits
from stagewise.data.loaders import (
    CSVDataset,
    CSVOptions,
    IDXDataset,
    IDXOptions,
    JSONLDataset,
    JSONLOptions,
    NPZDataset,
    NPZOptions,
)
from stagewise.data.splits import DataError, DataSplits, deal, split_bounds, split_indices
from stagewise.data.text import LMWindows, TextCorpus, TextOptions, tokenize
from stagewise.data.vocab import Vocabulary

__all__ = [
    "ArrayDataset", "CSVDataset", "CSVOptions", "DataError", "DataSplits", "IDXDataset",
    "IDXOptions", "JSONLDataset", "JSONLOptions", "LMWindows", "NPZDataset", "NPZOptions",
    "TextCorpus", "TextOptions", "Vocabulary", "array_splits", "deal", "split_bounds",
    "split_indices", "tokenize",
]
