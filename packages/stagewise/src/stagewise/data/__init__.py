"""Datasets: every loader turns a source into :class:`DataSplits` of dict-of-tensor items.

The names below are imported on first use (PEP 562): the loaders need torch, and a module of this package
that does not (the token cache's, for ``stagewise cache``) should not wait for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stagewise.lazy import lazy_attributes

__all__ = [
    "ArrayDataset", "Batch", "CSVDataset", "CSVOptions", "DataError", "DataSplits", "IDXDataset",
    "IDXOptions", "JSONLDataset", "JSONLOptions", "LMWindows", "NPZDataset", "NPZOptions",
    "TextCorpus", "TextOptions", "Vocabulary", "array_splits", "collate", "deal", "split_bounds",
    "split_indices", "tokenize",
]

# name -> module that defines it
_LAZY = {
    **dict.fromkeys(["ArrayDataset", "array_splits"], "stagewise.data.arrays"),
    **dict.fromkeys(["Batch", "collate"], "stagewise.data.batch"),
    **dict.fromkeys(["CSVDataset", "CSVOptions", "IDXDataset", "IDXOptions", "JSONLDataset", "JSONLOptions",
                     "NPZDataset", "NPZOptions"], "stagewise.data.loaders"),
    **dict.fromkeys(["DataError", "DataSplits", "deal", "split_bounds", "split_indices"], "stagewise.data.splits"),
    **dict.fromkeys(["LMWindows", "TextCorpus", "TextOptions", "tokenize"], "stagewise.data.text"),
    "Vocabulary": "stagewise.data.vocab",
}

if TYPE_CHECKING:  # what the lazy names are, for type checkers (imported for real on first access)
    from stagewise.data.arrays import ArrayDataset, array_splits
    from stagewise.data.batch import Batch, collate
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

__getattr__ = lazy_attributes(__name__, _LAZY)
