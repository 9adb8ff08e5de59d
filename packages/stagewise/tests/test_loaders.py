"""Loaders for users' files: CSV, JSON Lines (+gzip), IDX (MNIST) and NPZ."""

import gzip
import io
import json
import os
import struct

import numpy as np
import pytest
import torch
from conftest import read_records

from stagewise.data import tabular
from stagewise.data.arrays import array_splits
from stagewise.data.files import text_lines
from stagewise.data.idx import read_idx
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
from stagewise.data.splits import DataError, DataSplits, split_indices
from stagewise.data.text import TextCorpus, TextOptions

HALVES = {"train": 0.5, "valid": 0.5}


def all_items(data: DataSplits) -> list[tuple]:
    """Every (input, target) pair over all splits, as plain lists, sorted."""
    return sorted((item["input"].tolist(), item["target"].tolist())
                  for name in data.names() for item in data[name])


def test_split_indices_is_seeded_and_covers_everything():
    a = split_indices(10, {"train": 0.8, "valid": 0.2}, seed=3)
    b = split_indices(10, {"train": 0.8, "valid": 0.2}, seed=3)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert sorted(np.concatenate(list(a.values())).tolist()) == list(range(10))
    c = split_indices(10, {"train": 0.8, "valid": 0.2}, seed=4)
    assert not np.array_equal(a["train"], c["train"])


# --- CSV ------------------------------------------------------------------------------------


def write_csv(path, rows):
    path.write_text("x1,label,x2\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows))


def test_csv_by_name_and_index(tmp_path):
    write_csv(tmp_path / "t.csv", [(i, i % 2, 10 * i) for i in range(4)])
    opts = CSVOptions(path=str(tmp_path / "t.csv"), target=["label"], target_dtype="long", splits=HALVES)
    data = CSVDataset.from_recipe(opts, seed=0)
    assert all_items(data) == [([0.0, 0.0], 0), ([1.0, 10.0], 1), ([2.0, 20.0], 0), ([3.0, 30.0], 1)]
    item = data["train"][0]
    assert item["input"].dtype == torch.float32 and item["target"].dtype == torch.int64
    assert data.info == {"input_shape": [2], "target_shape": [], "n_features": 2, "n_outputs": 2,
                         "examples": {"train": 2, "valid": 2}}
    by_index = CSVDataset.from_recipe(CSVOptions(path=str(tmp_path / "t.csv"), target=[0, 2], features=[1],
                                               splits={"train": 1.0}), seed=0)
    assert all_items(by_index)[2] == ([1.0], [1.0, 10.0])


def test_csv_without_header(tmp_path):
    (tmp_path / "t.csv").write_text("1,2\n3,4\n")
    data = CSVDataset.from_recipe(CSVOptions(path=str(tmp_path / "t.csv"), target=[1], header=False,
                                           splits=HALVES), seed=0)
    assert all_items(data) == [([1.0], 2.0), ([3.0], 4.0)]


def test_csv_split_depends_on_seed_only(tmp_path):
    write_csv(tmp_path / "t.csv", [(i, 0, i) for i in range(20)])
    opts = CSVOptions(path=str(tmp_path / "t.csv"), target=["label"])
    first = [CSVDataset.from_recipe(opts, seed=s)["train"].inputs for s in (5, 5, 6)]
    assert torch.equal(first[0], first[1]) and not torch.equal(first[0], first[2])


def test_csv_non_numeric_cell_names_file_line_and_column(tmp_path):
    (tmp_path / "t.csv").write_text("x1,label\n1,0\n2,cat\n")
    opts = CSVOptions(path=str(tmp_path / "t.csv"), target=["label"])
    with pytest.raises(DataError, match=r"t\.csv, line 3, column 1 \('label'\): 'cat' is not a number"):
        CSVDataset.from_recipe(opts, seed=0)


def test_a_class_label_too_large_for_int64_is_refused_naming_its_line(tmp_path):
    # was: 1e20 became -9223372036854775808 as int64, refused only at the first batch that held it
    (tmp_path / "t.csv").write_text("a,b\n1,0\n2,1e20\n")
    with pytest.raises(DataError, match=r"t\.csv, line 3: target \[1e\+20\] is too large for a class label"):
        CSVDataset.from_recipe(CSVOptions(path=str(tmp_path / "t.csv"), target=["b"], target_dtype="long",
                                          splits={"train": 1.0}), seed=0)


def test_csv_errors(tmp_path):
    (tmp_path / "t.csv").write_text("a,b\n1,2\n3\n")
    with pytest.raises(DataError, match=r"t\.csv, line 3: 1 cells, but the header has 2"):
        CSVDataset.from_recipe(CSVOptions(path=str(tmp_path / "t.csv"), target=["b"]), seed=0)
    (tmp_path / "t.csv").write_text("a,b\n1,2.5\n")
    with pytest.raises(DataError, match=r"t\.csv, line 2: target \[2\.5\] is not a whole number"):
        CSVDataset.from_recipe(CSVOptions(path=str(tmp_path / "t.csv"), target=["b"], target_dtype="long",
                                        splits={"train": 1.0}), seed=0)
    with pytest.raises(DataError, match=r"no column 'c' \(target\); its columns are: a, b"):
        CSVDataset.from_recipe(CSVOptions(path=str(tmp_path / "t.csv"), target=["c"]), seed=0)
    (tmp_path / "t.csv").write_text("a, b\n1, 2\n")  # as people type it: the name is " b"
    with pytest.raises(DataError, match=r"no column 'b' \(target\); its columns are: a,  b; the header writes it "
                                        r"' b': remove the spaces around the names after the commas$"):
        CSVDataset.from_recipe(CSVOptions(path=str(tmp_path / "t.csv"), target=["b"]), seed=0)
    (tmp_path / "t.csv").write_text("a;b\n1;2\n")  # as a spreadsheet in a comma-decimal locale saves it
    with pytest.raises(DataError, match=r"line 2, column 0 \('a;b'\): '1;2' is not a number; .*; the row is one cell "
                                        r"holding ';': stagewise reads comma-separated files with '\.' decimals, "
                                        r"so replace ';' by ','"):
        CSVDataset.from_recipe(CSVOptions(path=str(tmp_path / "t.csv"), target=["b"]), seed=0)
    (tmp_path / "t.csv").write_text("a\tb\n1\t2\n")  # tab-separated
    with pytest.raises(DataError, match=r"'1\\t2' is not a number; .*; the row is one cell holding '\\t'"):
        CSVDataset.from_recipe(CSVOptions(path=str(tmp_path / "t.csv"), target=["b"]), seed=0)
    with pytest.raises(DataError, match=r"CSV file .*missing\.csv does not exist"):
        CSVDataset.from_recipe(CSVOptions(path=str(tmp_path / "missing.csv"), target=["b"]), seed=0)
    with pytest.raises(DataError, match="target: must be a non-empty list"):
        CSVOptions(path="t.csv", target="b")


# --- JSON Lines -----------------------------------------------------------------------------


def jsonl_records():
    return [{"pos": [i, i + 1], "vel": i / 2, "next": [[i], [-i]]} for i in range(4)]


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz"])
def test_jsonl_flattens_and_concatenates(tmp_path, name):
    text = "\n".join(json.dumps(r) for r in jsonl_records()) + "\n\n"
    path = tmp_path / name
    path.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    opts = JSONLOptions(path=str(path), input_keys=["pos", "vel"], target_keys=["next"], splits=HALVES)
    data = JSONLDataset.from_recipe(opts, seed=0)
    assert all_items(data) == [([float(i), i + 1.0, i / 2], [float(i), -float(i)]) for i in range(4)]
    assert data.info["n_features"] == 3 and data.info["n_outputs"] == 2 and data.info["target_shape"] == [2]


def test_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    opts = JSONLOptions(path=str(path), input_keys=["x"], target_keys=["y"])
    for body, message in [
        ('{"x": 1, "y": 2}\n{"x": 1, "y": 2\n', r"d\.jsonl, line 2: not valid JSON"),
        ('{"x": 1, "y": 2}\n\n{"x": 1}\n', r"d\.jsonl, line 3: key 'y' is missing; the line has keys x"),
        ('{"x": "one", "y": 2}\n', r"d\.jsonl, line 1: 'x' is \"one\", but it must be a number"),
        ('{"x": 1, "y": 2}\n{"x": [1, 2], "y": 2}\n', r"d\.jsonl, line 2: 2 input and 1 target numbers"),
        ('[1, 2]\n', r"d\.jsonl, line 1: expected a JSON object"),
    ]:
        path.write_text(body)
        with pytest.raises(DataError, match=message):
            JSONLDataset.from_recipe(opts, seed=0)


# --- big files: one copy of the text, numbers held as numbers ---------------------------------


def test_text_lines_are_the_lines_a_file_opened_with_newline_empty_gives(tmp_path):
    # was: the whole text was copied into a StringIO, 4 bytes a character (a 69 MB CSV: 276 MB more)
    text = "a,b\r\n1,2\r3,4\n\n\r\n5,\"6\n7\"\x0c,8\u2028\n\x1c9"
    (tmp_path / "t.csv").write_text(text, encoding="utf-8", newline="")
    assert list(text_lines(tmp_path / "t.csv", "CSV file", "utf-8")) == list(io.StringIO(text, newline=""))


def test_big_tables_read_the_same_numbers(tmp_path):
    # the values are gathered in flat float64 buffers (8 bytes a number, not a list of float objects per row)
    rows = np.random.default_rng(0).standard_normal((50, 3))
    lines = [",".join(map(repr, row)) for row in rows.tolist()]
    (tmp_path / "t.csv").write_text("a,b,c\r\n" + "\r\n\n".join(lines) + "\r\n", encoding="utf-8")
    names, values, at = tabular.read_csv(str(tmp_path / "t.csv"), True, "utf-8")
    assert np.array_equal(values, rows) and values.dtype == np.float64 and at == list(range(2, 101, 2))
    records = [json.dumps({"x": row[:2], "y": [[row[2]], 1]}) for row in rows.tolist()]
    (tmp_path / "t.jsonl").write_text("\n".join(records))
    inputs, targets, at = tabular.read_jsonl(str(tmp_path / "t.jsonl"), ["x"], ["y"], "utf-8")
    assert np.array_equal(inputs, rows[:, :2]) and np.array_equal(targets[:, 0], rows[:, 2])
    assert (targets[:, 1] == 1).all() and at == list(range(1, 51))


def test_a_list_of_floats_is_flattened_without_a_call_per_number(monkeypatch):
    # was: one recursive call per number, the hot loop of a big JSONL file
    calls = []
    flatten = tabular.flatten
    monkeypatch.setattr(tabular, "flatten", lambda value: calls.append(value) or flatten(value))
    assert tabular.flatten([0.5, -1.25, 3.0]) == [0.5, -1.25, 3.0] and len(calls) == 1
    assert tabular.flatten([1, [2.5, 3], 4.0]) == [1.0, 2.5, 3.0, 4.0]  # ints and nesting: number by number
    with pytest.raises(TypeError, match="not a number: True"):
        tabular.flatten([0.5, True])


# --- IDX ------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray, code: int) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def test_idx_images_and_labels(tmp_path):
    images = np.arange(6 * 2 * 3, dtype=np.uint8).reshape(6, 2, 3)
    (tmp_path / "images.idx.gz").write_bytes(gzip.compress(idx_bytes(images, 0x08)))
    (tmp_path / "labels.idx").write_bytes(idx_bytes(np.array([0, 1, 2, 0, 1, 2], dtype=np.uint8), 0x08))
    opts = IDXOptions(images=str(tmp_path / "images.idx.gz"), labels=str(tmp_path / "labels.idx"),
                      scale=0.5, splits=HALVES)
    data = IDXDataset.from_recipe(opts, seed=0)
    item = data["train"][0]
    assert item["input"].shape == (2, 3) and item["input"].dtype == torch.float32
    assert item["target"].dtype == torch.int64
    assert torch.equal(item["input"], torch.from_numpy(images[item["input"][0, 0].long() // 3] * 0.5).float())
    assert data.info["n_outputs"] == 3 and data.info["examples"] == {"train": 3, "valid": 3}
    assert data.info["input_shape"] == [2, 3] and data.info["n_features"] == 6


def test_idx_images_are_held_as_bytes_and_scaled_batch_by_batch_to_the_same_values(tmp_path):
    # was: each split converted to float32 as it was loaded, 4 x the file's bytes (a 470 MB file held 1.98 GB);
    # now the pixels are held as read and a batch is converted as it is drawn, to the same values bit for bit
    images = np.random.default_rng(0).integers(0, 256, (10, 2, 3), dtype=np.uint8)
    (tmp_path / "images").write_bytes(idx_bytes(images, 0x08))
    (tmp_path / "labels").write_bytes(idx_bytes(np.arange(10, dtype=np.uint8), 0x08))
    opts = IDXOptions(images=str(tmp_path / "images"), labels=str(tmp_path / "labels"), scale=0.3)
    data = IDXDataset.from_recipe(opts, seed=5)
    converted = torch.from_numpy(images.astype(np.float32) * np.float32(0.3))  # the whole file, as numpy scales it
    for split, idx in split_indices(10, opts.splits, 5).items():
        held = data[split].inputs
        assert held.dtype == torch.uint8 and torch.equal(held, torch.from_numpy(images[idx]))
        backwards = idx[::-1].copy()  # a batch of the split's examples, last first
        batch = data[split].__getitems__(list(range(len(idx)))[::-1])
        assert batch["input"].dtype == torch.float32 and torch.equal(batch["input"], converted[backwards])
        assert torch.equal(batch["target"], torch.from_numpy(backwards.astype(np.int64)))
        assert torch.equal(data[split][0]["input"], converted[idx[0]])


def test_a_run_on_idx_images_scaled_per_batch_trains_as_on_the_images_scaled_when_loaded(tmp_path):
    # the same images as float32 in a .npz (scaled by numpy, as the IDX loader did before it held bytes) give
    # bit-identical metrics, through the engine's batches, with and without DataLoader workers
    from stagewise.engine.runner import run_recipe
    from stagewise.recipe import load_recipe

    rng = np.random.default_rng(3)
    images, labels = rng.integers(0, 256, (200, 8, 8), dtype=np.uint8), rng.integers(0, 3, 200, dtype=np.uint8)
    (tmp_path / "images").write_bytes(idx_bytes(images, 0x08))
    (tmp_path / "labels").write_bytes(idx_bytes(labels, 0x08))
    np.savez(tmp_path / "scaled.npz", input=images.astype(np.float32) * np.float32(0.37), target=labels)
    (tmp_path / "r.toml").write_text('[data]\nuse = "stagewise.idx"\nimages = "images"\nlabels = "labels"\n'
                                     'scale = 0.37\nbatch_size = 8\n[model]\nuse = "stagewise.mlp"\nhidden = [8]\n'
                                     '[[stages]]\nname = "s"\nmax_epochs = 2\nlr = 0.01\n')
    npz = [f'data={{use="stagewise.npz", path="{tmp_path / "scaled.npz"}", batch_size=8}}']
    epochs = []
    for name, sets in (("idx", []), ("npz", npz), ("workers", ["data.num_workers=1"])):
        run_recipe(load_recipe(tmp_path / "r.toml", sets), out=tmp_path / name, quiet=True)
        epochs.append([{k: v for k, v in r.items() if k != "seconds"} for r in read_records(tmp_path / name, "epoch")])
    assert len(epochs[0]) == 2 and epochs[0][1]["val/loss"] > 0 and epochs[0] == epochs[1] == epochs[2]


@pytest.mark.parametrize("code, dtype, held", [
    (0x09, np.int8, torch.int8), (0x0B, np.int16, torch.int16), (0x0C, np.int32, torch.int32),
    (0x0D, np.float32, torch.float32), (0x0E, np.float64, torch.float32)])
def test_idx_images_of_every_type_are_held_compact_and_scaled_as_numpy_scales_them(tmp_path, code, dtype, held):
    # big-endian in the file, native when held; float64 is held as float32, which it is scaled in; float32 inputs
    # are not scaled in place, so drawing an item twice gives the same values
    images = (np.random.default_rng(1).standard_normal((6, 4)) * 1000).astype(dtype)
    (tmp_path / "images").write_bytes(idx_bytes(images, code))
    (tmp_path / "labels").write_bytes(idx_bytes(np.arange(6, dtype=np.uint8), 0x08))
    opts = IDXOptions(images=str(tmp_path / "images"), labels=str(tmp_path / "labels"), scale=0.37,
                      splits={"train": 1.0})
    data = IDXDataset.from_recipe(opts, seed=0)["train"]
    idx = split_indices(6, {"train": 1.0}, 0)["train"]
    assert data.inputs.dtype == held
    expected = torch.from_numpy(images.astype(np.float32) * np.float32(0.37))[idx]
    for _ in range(2):
        assert torch.equal(torch.stack([data[i]["input"] for i in range(6)]), expected)
        assert torch.equal(data.__getitems__(list(range(6)))["input"], expected)


def test_idx_images_that_overflow_float32_when_scaled_are_refused(tmp_path):
    # still refused now that the scaled splits are checked, not the whole converted file
    (tmp_path / "images").write_bytes(idx_bytes(np.full((10, 2), 1e300), 0x0E))
    (tmp_path / "labels").write_bytes(idx_bytes(np.arange(10, dtype=np.uint8), 0x08))
    with pytest.raises(DataError, match=r"images: images \* scale \(1\) is not finite; use a scale such as 1/255"):
        IDXDataset.from_recipe(IDXOptions(images=str(tmp_path / "images"), labels=str(tmp_path / "labels"),
                                          scale=1), seed=0)


def test_idx_other_types_are_big_endian(tmp_path):
    values = np.array([[1.5, -2.0], [3.25, 1e6]], dtype=np.float32)
    (tmp_path / "f.idx").write_bytes(idx_bytes(values, 0x0D))
    assert np.array_equal(read_idx(tmp_path / "f.idx"), values)


def test_idx_sizes_written_little_endian_are_named_not_called_a_broken_download(tmp_path):
    images = np.arange(6 * 5, dtype=np.uint8).reshape(6, 5)
    (tmp_path / "le.idx").write_bytes(b"\0\0\x08\x02" + struct.pack("<2I", 6, 5) + images.tobytes())
    with pytest.raises(DataError, match=r"le\.idx: its sizes read big-endian, as IDX stores them, say that an array "
                                        r"of shape \(100663296, 83886080\) .* read little-endian, \(6, 5\), they "
                                        r"would fit, so write them with struct\.pack\('>I', size\)"):
        read_idx(tmp_path / "le.idx")


def test_idx_bad_magic_and_truncation(tmp_path):
    (tmp_path / "bad.idx").write_bytes(b"PK\x03\x04rest")
    with pytest.raises(DataError, match=r"bad\.idx is not an IDX file: it starts with bytes 50 4b 03 04"):
        read_idx(tmp_path / "bad.idx")
    whole = idx_bytes(np.zeros((4, 5), dtype=np.uint8), 0x08)
    (tmp_path / "short.idx").write_bytes(whole[:-3])
    with pytest.raises(DataError, match=r"short\.idx is truncated: .* needs 32 bytes, the file has 29"):
        read_idx(tmp_path / "short.idx")
    (tmp_path / "short.idx.gz").write_bytes(gzip.compress(whole)[:-10])
    with pytest.raises(DataError, match=r"short\.idx\.gz: broken gzip data"):
        read_idx(tmp_path / "short.idx.gz")


def test_an_idx_file_of_no_values_is_refused_by_name(tmp_path):
    # found by fuzzing: sizes (0, 2**32 - 1, ...) were numpy's ValueError "array is too big" from reshape
    (tmp_path / "empty.idx").write_bytes(b"\0\0\x08\x04" + struct.pack(">4I", 0, *[2**32 - 1] * 3))
    with pytest.raises(DataError, match=r"empty\.idx holds no values: its sizes are \(0, 4294967295, 4294967295, "):
        read_idx(tmp_path / "empty.idx")


@pytest.mark.parametrize("name", ["t.csv.gz", "t.jsonl.gz"])
def test_a_truncated_gzip_csv_or_jsonl_names_the_file(tmp_path, name):
    rows = [(i, i % 2) for i in range(1000)]  # long enough that the cut lands mid-stream
    csv = name.endswith(".csv.gz")
    text = ("x,y\n" + "".join(f"{x},{y}\n" for x, y in rows) if csv
            else "".join(json.dumps({"x": x, "y": y}) + "\n" for x, y in rows))
    (tmp_path / name).write_bytes(gzip.compress(text.encode())[:-20])
    path = str(tmp_path / name)
    with pytest.raises(DataError, match=rf"{name.replace('.', '[.]')}: broken gzip data .*fetch the file again"):
        if csv:
            CSVDataset.from_recipe(CSVOptions(path=path, target=["y"]), seed=0)
        else:
            JSONLDataset.from_recipe(JSONLOptions(path=path, input_keys=["x"], target_keys=["y"]), seed=0)


# --- NPZ ------------------------------------------------------------------------------------


def test_npz_arrays(tmp_path):
    states = np.arange(5 * 3 * 2, dtype=np.float64).reshape(5, 3, 2)
    actions = np.arange(5, dtype=np.int32)
    np.savez(tmp_path / "traj.npz", states=states, actions=actions)
    opts = NPZOptions(path=str(tmp_path / "traj.npz"), input_key="states", target_key="actions",
                      splits={"train": 0.6, "valid": 0.4})
    data = NPZDataset.from_recipe(opts, seed=1)
    assert [len(data[s]) for s in data.names()] == [3, 2]
    item = data["valid"][0]
    assert item["input"].dtype == torch.float32 and item["target"].dtype == torch.int64
    assert torch.equal(item["input"], torch.from_numpy(states[item["target"].item()]).float())
    assert data.info["input_shape"] == [3, 2]


def test_npz_pixels_with_a_scale_are_held_as_bytes_and_scaled_batch_by_batch(tmp_path):
    # without a scale integer inputs are int64 (token ids): 8 bytes a uint8 pixel, which an MLP cannot take as
    # they are; with one they are held as stored and scaled as IDX images are
    pixels = np.random.default_rng(2).integers(0, 256, (6, 2, 2), dtype=np.uint8)
    np.savez(tmp_path / "img.npz", input=pixels, target=np.arange(6))
    opts = NPZOptions(path=str(tmp_path / "img.npz"), splits={"train": 1.0})
    assert NPZDataset.from_recipe(opts, seed=0)["train"].inputs.dtype == torch.int64
    data = NPZDataset.from_recipe(NPZOptions(path=opts.path, splits=opts.splits, scale=0.37), seed=0)["train"]
    assert data.inputs.dtype == torch.uint8
    batch = data.__getitems__(list(range(6)))
    assert torch.equal(batch["input"], torch.from_numpy(pixels.astype(np.float32) * np.float32(0.37))[batch["target"]])
    with pytest.raises(DataError, match=r"img\.npz: 'input' \* scale \(1e\+40\) is not finite; use a scale such as"):
        NPZDataset.from_recipe(NPZOptions(path=opts.path, scale=1e40), seed=0)
    np.savez(tmp_path / "img.npz", input=np.zeros((4, 0), dtype=np.uint8), target=np.arange(4))
    with pytest.raises(DataError, match=r"img\.npz: the inputs have shape \(4, 0\), no values per example"):
        NPZDataset.from_recipe(NPZOptions(path=opts.path, scale=0.5), seed=0)  # not numpy's "zero-size array"


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.zeros((4, 2)), y=np.zeros(3))
    with pytest.raises(DataError, match=r"a\.npz has no array 'input' \(input_key\); its arrays are: x, y"):
        NPZDataset.from_recipe(NPZOptions(path=str(tmp_path / "a.npz")), seed=0)
    with pytest.raises(DataError, match=r"'x' has 4 examples \(axis 0\) but 'y' has 3"):
        NPZDataset.from_recipe(NPZOptions(path=str(tmp_path / "a.npz"), input_key="x", target_key="y"), seed=0)
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(DataError, match="holds a single array"):
        NPZDataset.from_recipe(NPZOptions(path=str(tmp_path / "one.npy")), seed=0)


# --- bad data is refused before training, naming the file -----------------------------------


def test_inputs_need_a_feature_axis(tmp_path):
    np.savez(tmp_path / "a.npz", input=np.zeros(4), target=np.zeros(4))
    with pytest.raises(DataError, match=r"a\.npz: the inputs have shape \(4,\), a single number per example"):
        NPZDataset.from_recipe(NPZOptions(path=str(tmp_path / "a.npz")), seed=0)


def test_an_object_array_names_the_file_and_the_array(tmp_path):
    np.savez(tmp_path / "a.npz", input=np.array([[1], "x"], dtype=object), target=np.zeros(2))
    with pytest.raises(DataError, match=r"a\.npz: array 'input' \(input_key\) cannot be read: Object arrays"):
        NPZDataset.from_recipe(NPZOptions(path=str(tmp_path / "a.npz")), seed=0)


def test_csv_features_must_not_include_the_target(tmp_path):
    write_csv(tmp_path / "t.csv", [(i, i % 2, i) for i in range(4)])
    opts = CSVOptions(path=str(tmp_path / "t.csv"), target=["label"], features=["x1", "label"])
    with pytest.raises(DataError, match=r"t\.csv: column 'label' is in both data\.features and data\.target"):
        CSVDataset.from_recipe(opts, seed=0)


@pytest.mark.parametrize("cell", ["nan", "inf", "-Infinity"])
def test_non_finite_csv_cells_name_file_line_and_column(tmp_path, cell):
    (tmp_path / "t.csv").write_text(f"x1,label\n1,0\n{cell},1\n")
    with pytest.raises(DataError, match=rf"t\.csv, line 3, column 0 \('x1'\): '{cell}' is not a finite number"):
        CSVDataset.from_recipe(CSVOptions(path=str(tmp_path / "t.csv"), target=["label"]), seed=0)


@pytest.mark.parametrize("value", ["NaN", "[1, Infinity]"])
def test_non_finite_jsonl_values_name_file_line_and_key(tmp_path, value):
    (tmp_path / "d.jsonl").write_text(f'{{"x": 1, "y": 2}}\n{{"x": {value}, "y": 2}}\n')
    with pytest.raises(DataError, match=r"d\.jsonl, line 2: 'x' is .*, but its numbers must be finite"):
        JSONLDataset.from_recipe(JSONLOptions(path=str(tmp_path / "d.jsonl"), input_keys=["x"],
                                              target_keys=["y"]), seed=0)


def test_a_utf8_bom_is_ignored(tmp_path):
    (tmp_path / "t.csv").write_bytes(b"\xef\xbb\xbfx1,label\n1,0\n2,1\n")
    data = CSVDataset.from_recipe(CSVOptions(path=str(tmp_path / "t.csv"), target=["label"],
                                             splits={"train": 1.0}), seed=0)
    assert all_items(data) == [([1.0], 0.0), ([2.0], 1.0)]
    (tmp_path / "d.jsonl").write_bytes(b'\xef\xbb\xbf{"x": 1, "y": 2}\n')
    data = JSONLDataset.from_recipe(JSONLOptions(path=str(tmp_path / "d.jsonl"), input_keys=["x"],
                                                 target_keys=["y"], splits={"train": 1.0}), seed=0)
    assert all_items(data) == [([1.0], 2.0)]


def test_messages_name_the_file_and_the_key(tmp_path):
    write_csv(tmp_path / "t.csv", [(i, 0, i) for i in range(4)])
    with pytest.raises(DataError, match=r"t\.csv: split 'test' would be empty: 0\.1 of 4 examples"):
        CSVDataset.from_recipe(CSVOptions(path=str(tmp_path / "t.csv"), target=["label"]), seed=0)
    with pytest.raises(DataError, match=r"t\.csv: data\.target names column 5, which is neither a column "
                                        r"name nor a column index; its columns are x1, label, x2, or 0-based "
                                        r"indices 0\.\.2"):
        CSVDataset.from_recipe(CSVOptions(path=str(tmp_path / "t.csv"), target=[5]), seed=0)


def test_a_missing_absolute_path_has_no_working_directory_hint(tmp_path):
    with pytest.raises(DataError) as info:
        CSVDataset.from_recipe(CSVOptions(path=str(tmp_path / "missing.csv"), target=["b"]), seed=0)
    assert str(info.value) == f"CSV file {tmp_path / 'missing.csv'} does not exist; check the path"


def test_csv_column_indices_stop_before_the_width_and_blank_lines_are_skipped(tmp_path):
    (tmp_path / "t.csv").write_text("1,2,3\n\n4,5,6\n\n")
    data = CSVDataset.from_recipe(CSVOptions(path=str(tmp_path / "t.csv"), target=[2], header=False,
                                             splits={"train": 1.0}), seed=0)
    assert all_items(data) == [([1.0, 2.0], 3.0), ([4.0, 5.0], 6.0)]
    with pytest.raises(DataError, match=r"names column 3, which is neither .* 0-based indices 0\.\.2"):
        CSVDataset.from_recipe(CSVOptions(path=str(tmp_path / "t.csv"), target=[3], header=False), seed=0)


# --- what a mutation audit found unpinned ----------------------------------------------------


def test_bool_targets_are_int64_class_labels(tmp_path):
    np.savez(tmp_path / "a.npz", input=np.arange(8.0).reshape(4, 2), target=np.array([True, False, True, True]))
    data = NPZDataset.from_recipe(NPZOptions(path=str(tmp_path / "a.npz"), splits={"train": 1.0}), seed=0)
    assert data["train"][0]["target"].dtype == torch.int64
    assert data.info["n_outputs"] == 2  # classes False and True: largest label 1, plus 1


@pytest.mark.parametrize("arrays, message", [
    (dict(input=np.zeros((4, 2)), target=np.array(1.0)), r"array 'target' has shape \(\) and dtype float64"),
    (dict(input=np.array([["a"], ["b"]]), target=np.zeros(2)), r"array 'input' has shape \(2, 1\) and dtype <U1"),
])
def test_npz_arrays_must_be_numeric_with_an_example_axis(tmp_path, arrays, message):
    np.savez(tmp_path / "a.npz", **arrays)
    with pytest.raises(DataError, match=rf"a\.npz: {message}; it must be numeric with the examples on axis 0"):
        NPZDataset.from_recipe(NPZOptions(path=str(tmp_path / "a.npz")), seed=0)


def test_a_truncated_npz_is_a_data_error(tmp_path):
    np.savez(tmp_path / "whole.npz", input=np.zeros((4, 2)), target=np.zeros(4))
    raw = (tmp_path / "whole.npz").read_bytes()
    (tmp_path / "a.npz").write_bytes(raw[: len(raw) // 2])  # a zip without its central directory
    with pytest.raises(DataError, match=r"a\.npz is not a readable \.npz file .*; write it with numpy\.savez"):
        NPZDataset.from_recipe(NPZOptions(path=str(tmp_path / "a.npz")), seed=0)


def test_idx_pixels_are_unsigned_and_scaled_to_one_by_default(tmp_path):
    # MNIST's layout: magic 00 00 08 03 (unsigned bytes, 3 dimensions), then N, rows, columns
    pixels = bytes([0, 128, 255, 1, 255, 0, 64, 32])
    (tmp_path / "images").write_bytes(b"\0\0\x08\x03" + struct.pack(">III", 2, 2, 2) + pixels)
    (tmp_path / "labels").write_bytes(b"\0\0\x08\x01" + struct.pack(">I", 2) + bytes([7, 3]))
    data = IDXDataset.from_recipe(IDXOptions(images=str(tmp_path / "images"), labels=str(tmp_path / "labels"),
                                             splits={"train": 1.0}), seed=0)
    by_label = {item["target"].item(): item["input"] for item in data["train"]}
    assert by_label[7].flatten().tolist() == pytest.approx([0.0, 128 / 255, 1.0, 1 / 255])
    assert by_label[3].flatten().tolist() == pytest.approx([1.0, 0.0, 64 / 255, 32 / 255])
    assert data.info["n_outputs"] == 8


@pytest.mark.parametrize("code, body, expected", [
    (0x09, bytes([0x7F, 0x80]), [127, -128]),
    (0x0B, bytes([0x01, 0x02, 0xFF, 0xFE]), [258, -2]),
    (0x0C, bytes([0, 0, 1, 0, 0xFF, 0xFF, 0xFF, 0xFF]), [256, -1]),
    (0x0E, struct.pack(">dd", 0.1, -3.5), [0.1, -3.5]),
])
def test_idx_values_are_big_endian_for_every_type(tmp_path, code, body, expected):
    (tmp_path / "v.idx").write_bytes(bytes([0, 0, code, 1]) + struct.pack(">I", 2) + body)
    assert read_idx(tmp_path / "v.idx").tolist() == expected


def test_idx_int32_labels_are_read_big_endian(tmp_path):
    (tmp_path / "images.idx").write_bytes(idx_bytes(np.zeros((2, 1, 1), dtype=np.uint8), 0x08))
    (tmp_path / "labels.idx").write_bytes(b"\0\0\x0c\x01" + struct.pack(">I", 2) + bytes([0, 0, 0, 1, 0, 0, 0, 2]))
    data = IDXDataset.from_recipe(IDXOptions(images=str(tmp_path / "images.idx"), labels=str(tmp_path / "labels.idx"),
                                             splits={"train": 1.0}), seed=0)
    assert sorted(item["target"].item() for item in data["train"]) == [1, 2]


@pytest.mark.parametrize("raw, message", [
    (b"\x01\x00\x08\x01\x00\x00\x00\x01\x05", r"is not an IDX file: it starts with bytes 01 00 08 01"),
    (b"\0\0\x08\x00\x05", r"is not an IDX file: .* number of dimensions >= 1"),
    (b"\0\0\x08\x01\x00\x00\x00\x02\x05\x06\x07", r"is longer than its header says: .* shape \(2,\) .* needs 10 "
                                                  r"bytes, the file has 11"),
])
def test_idx_header_problems(tmp_path, raw, message):
    (tmp_path / "x.idx").write_bytes(raw)
    with pytest.raises(DataError, match=rf"x\.idx {message}"):
        read_idx(tmp_path / "x.idx")


@pytest.mark.parametrize("labels, message", [
    (np.zeros((3, 1), dtype=np.uint8), r"labels\.idx holds an array of shape \(3, 1\) and type uint8, but labels "
                                       r"must be one integer per image"),
    (np.zeros(3, dtype=np.float32), r"labels\.idx holds an array of shape \(3,\) and type float32"),
    (np.zeros(2, dtype=np.uint8), r"images\.idx has 3 images but .*labels\.idx has 2 labels; they must match"),
])
def test_idx_labels_must_be_one_integer_per_image(tmp_path, labels, message):
    (tmp_path / "images.idx").write_bytes(idx_bytes(np.zeros((3, 2, 2), dtype=np.uint8), 0x08))
    (tmp_path / "labels.idx").write_bytes(idx_bytes(labels, 0x08 if labels.dtype == np.uint8 else 0x0D))
    with pytest.raises(DataError, match=message):
        IDXDataset.from_recipe(IDXOptions(images=str(tmp_path / "images.idx"), labels=str(tmp_path / "labels.idx")),
                               seed=0)


def test_gzip_is_told_by_content_not_by_name(tmp_path):
    (tmp_path / "t.csv").write_bytes(gzip.compress(b"x,y\n1,2\n"))  # compressed, without .gz
    (tmp_path / "d.jsonl.gz").write_text('{"x": 3, "y": 4}\n')  # plain text, with .gz
    csv_data = CSVDataset.from_recipe(CSVOptions(path=str(tmp_path / "t.csv"), target=["y"],
                                                 splits={"train": 1.0}), seed=0)
    assert all_items(csv_data) == [([1.0], 2.0)]
    jsonl_data = JSONLDataset.from_recipe(JSONLOptions(path=str(tmp_path / "d.jsonl.gz"), input_keys=["x"],
                                                       target_keys=["y"], splits={"train": 1.0}), seed=0)
    assert all_items(jsonl_data) == [([3.0], 4.0)]


def test_a_directory_or_a_missing_relative_path_is_named_with_a_hint(tmp_path, monkeypatch):
    with pytest.raises(DataError) as info:
        CSVDataset.from_recipe(CSVOptions(path=str(tmp_path), target=["y"]), seed=0)
    assert str(info.value) == f"CSV file {tmp_path} is a directory; check the path"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as info:
        CSVDataset.from_recipe(CSVOptions(path="missing.csv", target=["y"]), seed=0)
    assert str(info.value) == (f"CSV file missing.csv does not exist; check the path (relative paths start "
                               f"from the current directory {tmp_path})")


def test_a_pipe_is_not_taken_for_a_missing_file(tmp_path):
    os.mkfifo(tmp_path / "t.csv")  # was "does not exist; check the path", though it does
    with pytest.raises(DataError) as info:
        CSVDataset.from_recipe(CSVOptions(path=str(tmp_path / "t.csv"), target=["y"]), seed=0)
    assert str(info.value) == (f"CSV file {tmp_path / 't.csv'} is not a regular file (a pipe, socket or device); "
                               f"save the data to a file and give its path")


def test_a_data_path_may_start_with_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "t.csv").write_text("x,y\n1,2\n")
    data = CSVDataset.from_recipe(CSVOptions(path="~/t.csv", target=["y"], splits={"train": 1.0}), seed=0)
    assert all_items(data) == [([1.0], 2.0)]


# one Latin-1 file per text reader, é in the word, column or key "café" (so it loads only if read right)
LATIN1 = {"txt": b"one two\ncaf\xe9 three\n", "csv": b"caf\xe9,y\n1,2\n",
          "jsonl": b'{"caf\xe9": 1, "y": 2}\n{"caf\xe9": 3, "y": 4}\n'}
WHAT = {"txt": "text file", "csv": "CSV file", "jsonl": "JSONL file"}


def _read_text_data(kind: str, path, **options) -> DataSplits:
    """Load ``path`` with the text-reading dataset of ``kind``: the input column or key is "café", the target y."""
    if kind == "txt":
        return TextCorpus.from_recipe(TextOptions(path=str(path), seq_len=1, splits={"train": 1.0}, **options), seed=0)
    if kind == "csv":
        return CSVDataset.from_recipe(CSVOptions(path=str(path), target=["y"], features=["café"],
                                                 splits={"train": 1.0}, **options), seed=0)
    return JSONLDataset.from_recipe(JSONLOptions(path=str(path), input_keys=["café"], target_keys=["y"],
                                                 splits={"train": 1.0}, **options), seed=0)


@pytest.mark.parametrize("kind", ["txt", "csv", "jsonl"])
def test_a_byte_the_encoding_cannot_read_names_the_file_its_offset_and_the_fix(tmp_path, kind):
    # was: read as U+FFFD, so a Latin-1 file trained on garbled words (or failed as a "bad cell")
    path = tmp_path / f"t.{kind}"
    path.write_bytes(LATIN1[kind])
    offset = LATIN1[kind].index(b"\xe9")
    line = LATIN1[kind].count(b"\n", 0, offset) + 1
    with pytest.raises(DataError) as info:
        _read_text_data(kind, path)
    assert str(info.value) == (f"{WHAT[kind]} {path}, line {line}: byte 0xe9 "
                               f"at offset {offset} is not utf-8 text; give the file's encoding (data.encoding, e.g. "
                               f'"latin-1" or "cp1252") or save the file as UTF-8')


@pytest.mark.parametrize("kind", ["txt", "csv", "jsonl"])
def test_data_encoding_reads_a_latin1_file(tmp_path, kind):
    path = tmp_path / f"t.{kind}.gz"  # gzip as well
    path.write_bytes(gzip.compress(LATIN1[kind]))
    data = _read_text_data(kind, path, encoding="latin-1")
    if kind == "txt":
        assert data.info["vocab"].decode(data["train"].tokens.tolist()) == "one two <eos> café three <eos>"
    else:
        assert all_items(data) == ([([1.0], 2.0)] if kind == "csv" else [([1.0], 2.0), ([3.0], 4.0)])


def test_data_encoding_reads_utf16_text(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes("café,y\n1,2\n".encode("utf-16"))
    with pytest.raises(DataError, match=r'is UTF-16 text .*; save it as UTF-8 and run again \(or set data.encoding '
                                        r'= "utf-16"\)'):
        _read_text_data("csv", path)
    assert all_items(_read_text_data("csv", path, encoding="utf-16")) == [([1.0], 2.0)]


@pytest.mark.parametrize("encoding", ["latin-9x", "base64"])
def test_an_unknown_encoding_names_the_key_and_the_recipe(tiny, tiny_recipe_path, encoding):
    from stagewise.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        tiny(f'data.encoding="{encoding}"')
    assert str(info.value).startswith(f"{tiny_recipe_path}: 1 problem")
    assert info.value.problems == [f'data.encoding: {encoding!r} is not a text encoding Python knows; use e.g. '
                                   f'"utf-8" (the default), "latin-1" or "cp1252"']


def test_csv_quoted_fields_and_windows_line_endings(tmp_path):
    # as spreadsheets and pandas write them: quoted names (with a comma), quoted numbers, CRLF
    (tmp_path / "t.csv").write_bytes(b'"size, cm","label"\r\n"1.5","0"\r\n\r\n2,"1"\r\n3,x\r\n')
    with pytest.raises(DataError, match=r"t\.csv, line 5, column 1 \('label'\): 'x' is not a number"):
        CSVDataset.from_recipe(CSVOptions(path=str(tmp_path / "t.csv"), target=["label"]), seed=0)
    (tmp_path / "t.csv").write_bytes(b'"size, cm","label"\r\n"1.5","0"\r\n\r\n2,"1"\r\n')
    data = CSVDataset.from_recipe(CSVOptions(path=str(tmp_path / "t.csv"), target=["label"], features=["size, cm"],
                                             target_dtype="long", splits={"train": 1.0}), seed=0)
    assert all_items(data) == [([1.5], 0), ([2.0], 1)]


def test_long_targets_check_every_target_column(tmp_path):
    (tmp_path / "t.csv").write_text("x,a,b\n1,0,1\n2,1,2.5\n")
    with pytest.raises(DataError, match=r"t\.csv, line 3: target \[1\.0, 2\.5\] is not a whole number"):
        CSVDataset.from_recipe(CSVOptions(path=str(tmp_path / "t.csv"), target=["a", "b"], target_dtype="long",
                                          splits={"train": 1.0}), seed=0)


@pytest.mark.parametrize("column", [-1, True])
def test_csv_column_indices_are_not_negative_or_bool(tmp_path, column):
    # -1 would take the last column from the end, and it would stay a feature: the model would see its answer
    write_csv(tmp_path / "t.csv", [(i, i % 2, i) for i in range(4)])
    with pytest.raises(DataError, match=rf"names column {column}, which is neither a column name nor a column index"):
        CSVDataset.from_recipe(CSVOptions(path=str(tmp_path / "t.csv"), target=[column]), seed=0)


def test_csv_without_header_has_no_column_names(tmp_path):
    (tmp_path / "t.csv").write_text("1,2\n3\n")
    with pytest.raises(DataError, match=r"t\.csv, line 2: 1 cells, but the first row has 2"):
        CSVDataset.from_recipe(CSVOptions(path=str(tmp_path / "t.csv"), target=[1], header=False), seed=0)
    (tmp_path / "t.csv").write_text("1,2\n3,4\n")
    with pytest.raises(DataError, match=r"t\.csv: data\.target names column 'y', but data\.header = false"):
        CSVDataset.from_recipe(CSVOptions(path=str(tmp_path / "t.csv"), target=["y"], header=False), seed=0)


@pytest.mark.parametrize("text, message", [
    ("x,y\n", r"t\.csv has no data rows"),
    ("y\n1\n2\n", r"t\.csv: no feature columns are left besides the target"),
])
def test_csv_without_examples_or_features(tmp_path, text, message):
    (tmp_path / "t.csv").write_text(text)
    with pytest.raises(DataError, match=message):
        CSVDataset.from_recipe(CSVOptions(path=str(tmp_path / "t.csv"), target=["y"]), seed=0)


def test_target_dtype_is_checked_when_the_options_are_made():
    with pytest.raises(DataError, match=r'target_dtype: must be "float" \(regression\) or "long" .*got \'int\''):
        CSVOptions(path="t.csv", target=["y"], target_dtype="int")
    with pytest.raises(DataError, match=r'target_dtype: must be "float"'):
        JSONLOptions(path="d.jsonl", input_keys=["x"], target_keys=["y"], target_dtype="int")


@pytest.mark.parametrize("body, message", [
    ('{"x": true, "y": 2}\n', r"line 1: 'x' is true, but it must be a number or a list of numbers$"),
    ('{"x": "the cat", "y": 2}\n', r"line 1: 'x' is \"the cat\", but it must be a number or a list of numbers; "
                                   r"for text, use = \"stagewise.text\" with text_field = \"x\""),  # was: no hint
    ('{"x": 1, "y": "cat"}\n', r"line 1: 'y' is \"cat\", but it must be a number or a list of numbers; class names "
                                r"are read as labels with target_dtype = \"long\"$"),  # was: told to read the label as
    # text with stagewise.text; then to map each class name to an integer, before class names were read
    ('{"x": 1, "y": 2}\n{"x": 1, "y": [2, 3]}\n', r"line 2: 1 input and 2 target numbers, but line 1 has 1 and 1"),
    ("\n\n", r"d\.jsonl has no data lines"),
])
def test_more_jsonl_errors(tmp_path, body, message):
    (tmp_path / "d.jsonl").write_text(body)
    with pytest.raises(DataError, match=message):
        JSONLDataset.from_recipe(JSONLOptions(path=str(tmp_path / "d.jsonl"), input_keys=["x"], target_keys=["y"]),
                                 seed=0)


# --- fuzzing findings: malformed files are one message naming the file, never a traceback ----------


def _load(kind: str, path):
    """Load ``path`` with the loader of ``kind`` (one feature/target column or key named x / y)."""
    if kind == "csv":
        return CSVDataset.from_recipe(CSVOptions(path=str(path), target=["y"]), seed=0)
    if kind == "jsonl":
        return JSONLDataset.from_recipe(JSONLOptions(path=str(path), input_keys=["x"], target_keys=["y"]), seed=0)
    if kind == "npz":
        return NPZDataset.from_recipe(NPZOptions(path=str(path)), seed=0)
    return IDXDataset.from_recipe(IDXOptions(images=str(path), labels=str(path)), seed=0)


@pytest.mark.parametrize("body, message", [
    ('{"x": 1' + "0" * 400 + ', "y": 2}\n', r"d\.jsonl, line 1: 'x' is 1000.*, but its numbers must be finite"),
    ('{"x": 1, "y": 2}\n{"x": ' + "1" * 5000 + ', "y": 2}\n',
     r"d\.jsonl, line 2: a number is too long to read \(Exceeds the limit \(4300 digits\).*\); values must be "
     r"numbers of float range"),
    ('{"x": ' + "[" * 100_000 + "]" * 100_000 + ', "y": 2}\n', r"d\.jsonl, line 1: lists nested too deeply to read"),
    ('{"x": ' + "[" * 990 + "1" + "]" * 990 + ', "y": 2}\n', r"d\.jsonl, line 1: lists nested too deeply to read"),
], ids=["int-beyond-float", "int-of-5000-digits", "nested-100000-deep", "nested-990-deep"])
def test_jsonl_numbers_python_cannot_read_name_the_line(tmp_path, body, message):
    (tmp_path / "d.jsonl").write_text(body)  # were OverflowError, ValueError and RecursionError tracebacks
    with pytest.raises(DataError, match=message):
        _load("jsonl", tmp_path / "d.jsonl")


CSV_TEXT = "x,y\n" + "".join(f"{i},{i % 2}\n" for i in range(10))
JSONL_TEXT = "".join(json.dumps({"x": i, "y": i % 2}) + "\n" for i in range(10))


@pytest.mark.parametrize("kind, raw, message", [
    # UTF-16 (as Excel's "Unicode text" and PowerShell write) was read as garbage cells, with advice about numbers
    ("csv", CSV_TEXT.encode("utf-16"), r"CSV file .*t\.csv is UTF-16 text \(it starts with a UTF-16 byte-order "
                                       r"mark\); save it as UTF-8"),
    ("jsonl", JSONL_TEXT.encode("utf-16"), r"JSONL file .*t\.jsonl is UTF-16 text"),
    ("csv", CSV_TEXT.encode("utf-16-le"), r"CSV file .*t\.csv, line 1: a NUL byte, so this is not UTF-8 text "
                                          r"\(UTF-16 text without a byte-order mark, or binary data\); save it as "
                                          r"UTF-8"),
    ("jsonl", JSONL_TEXT.encode() + b'{"x": 1,\0 "y": 1}\n', r"JSONL file .*t\.jsonl, line 11: a NUL byte"),
], ids=["csv-utf16", "jsonl-utf16", "csv-utf16-without-bom", "jsonl-nul"])
def test_text_that_is_not_utf8_names_the_file_and_the_encoding(tmp_path, kind, raw, message):
    path = tmp_path / f"t.{kind}"
    path.write_bytes(raw)
    with pytest.raises(DataError, match=message):
        _load(kind, path)


@pytest.mark.parametrize("kind", ["csv", "jsonl", "npz", "idx"])
def test_an_unreadable_data_file_names_it_and_the_fix(tmp_path, monkeypatch, kind):
    import os
    from pathlib import Path

    path = tmp_path / f"t.{kind}"
    path.write_bytes(b"x")
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anything: refuse the open as the file system would
        opened = Path.open

        def refuse(self, *args, **kwargs):
            if self == path:
                raise PermissionError(13, "Permission denied", str(self))
            return opened(self, *args, **kwargs)

        monkeypatch.setattr(Path, "open", refuse)
    with pytest.raises(DataError, match=rf"file {path} cannot be read \(Permission denied\); check its permissions"):
        _load(kind, path)  # was a PermissionError traceback (an .npz: "write it with numpy.savez")


@pytest.mark.parametrize("header, option, name, columns", [
    ("x,y,y", "target", "y", "1, 2"),  # the second "y" was kept as a feature: the model was handed its answer
    ("x,x,y", "features", "x", "0, 1"),  # the first "x" was taken, silently
])
def test_a_column_name_the_header_repeats_is_refused(tmp_path, header, option, name, columns):
    (tmp_path / "t.csv").write_text(header + "\n" + "".join(f"{i},{i % 2},{i % 2}\n" for i in range(10)))
    opts = CSVOptions(path=str(tmp_path / "t.csv"), target=["y"], features=["x"] if option == "features" else None)
    with pytest.raises(DataError, match=rf"t\.csv: the header names 2 columns '{name}' \(0-based columns {columns}\), "
                                        rf"which data\.{option} cannot tell apart; give every column its own name"):
        CSVDataset.from_recipe(opts, seed=0)


def test_a_csv_cell_beyond_the_csv_module_s_limit_names_the_line(tmp_path):
    (tmp_path / "t.csv").write_text(CSV_TEXT + "1," + "9" * 200_000 + "\n")  # was a _csv.Error traceback
    with pytest.raises(DataError, match=r"t\.csv, line 12: cannot be read as CSV \(field larger than field limit "
                                        r"\(131072\)\); every cell must be a number"):
        _load("csv", tmp_path / "t.csv")


@pytest.mark.parametrize("arrays, message", [
    # NaN/inf in .npz and IDX float arrays was trained on (batches skipped, val/loss NaN), unlike CSV/JSONL's
    (dict(input=np.array([[1.0], [np.nan], [2.0], [3.0]]), target=np.zeros(4)),
     r"a\.npz: example 1 \(0-based, axis 0\) of the inputs holds NaN or infinity; fill in or drop missing values"),
    (dict(input=np.zeros((4, 2)), target=np.array([0.0, 1.0, 2.0, -np.inf], dtype=np.float32)),
     r"a\.npz: example 3 \(0-based, axis 0\) of the targets holds NaN or infinity"),
    # an input or target of no values trained a model of zero-width layers
    (dict(input=np.zeros((4, 0)), target=np.zeros(4)), r"a\.npz: the inputs have shape \(4, 0\), no values per "
                                                       r"example; every example needs at least one input value"),
], ids=["nan-input", "inf-target", "no-input-values"])
def test_arrays_without_usable_values_name_the_file_and_the_example(tmp_path, arrays, message):
    np.savez(tmp_path / "a.npz", **arrays)
    with pytest.raises(DataError, match=message):
        NPZDataset.from_recipe(NPZOptions(path=str(tmp_path / "a.npz")), seed=0)


@pytest.mark.parametrize("kind, what", [("csv", "inputs"), ("jsonl", "inputs"), ("npz", "inputs"), ("npz", "targets")])
def test_a_number_beyond_float32_s_range_is_refused_naming_the_example(tmp_path, kind, what):
    # was: a finite float64 such as 1e39 passed the finiteness checks and became infinity in the float32 tensors
    x, y = [float(i) for i in range(10)], [float(i % 2) for i in range(10)]
    (x if what == "inputs" else y)[2] = -1e39
    if kind == "csv":
        (tmp_path / "d").write_text("x,y\n" + "".join(f"{a!r},{b!r}\n" for a, b in zip(x, y, strict=True)))
    elif kind == "jsonl":
        (tmp_path / "d").write_text("".join(json.dumps({"x": a, "y": b}) + "\n" for a, b in zip(x, y, strict=True)))
    else:
        np.savez(tmp_path / "d.npz", input=np.array(x)[:, None], target=np.array(y))
    with pytest.raises(DataError, match=rf"d(\.npz)?: example 2 \(0-based, axis 0\) of the {what} holds a number "
                                        r"beyond float32's range \(about ±3\.4e38\), which would train as infinity"):
        _load(kind, tmp_path / ("d.npz" if kind == "npz" else "d"))


@pytest.mark.parametrize("piece_bytes", [1, 24, 1 << 22])
def test_splits_are_converted_a_piece_at_a_time_to_the_same_tensors(tmp_path, monkeypatch, piece_bytes):
    # one example a piece, a few, all at once: the tensors of converting each split whole
    monkeypatch.setattr("stagewise.data.arrays.PIECE_BYTES", piece_bytes)
    rng = np.random.default_rng(0)
    inputs, targets = rng.standard_normal((11, 3)) * 1e5, rng.integers(0, 5, 11).astype(np.uint8)
    data = array_splits(inputs, targets, {"train": 0.7, "valid": 0.3}, seed=1, source="s")
    for split, idx in split_indices(11, {"train": 0.7, "valid": 0.3}, 1).items():
        assert torch.equal(data[split].inputs, torch.from_numpy(inputs[idx].astype(np.float32)))
        assert torch.equal(data[split].targets, torch.from_numpy(targets[idx].astype(np.int64)))


def test_float64_examples_are_not_held_as_a_float64_split_as_well(monkeypatch):
    # was: each split gathered whole in float64 (twice its float32 tensor), then converted: a CSV of 2M rows of
    # 10 numbers held 128 MB more at its peak
    import tracemalloc

    monkeypatch.setattr("stagewise.data.arrays.PIECE_BYTES", 1 << 12)
    inputs, targets = np.ones((200_000, 20)), np.zeros(200_000, dtype=np.int64)
    tracemalloc.start()
    try:
        data = array_splits(inputs, targets, {"train": 0.8, "valid": 0.2}, seed=0, source="s")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    tensors = sum(data[split].inputs.nbytes + data[split].targets.nbytes for split in data.names())
    assert peak < 1.5 * tensors  # the float32 inputs and int64 targets (and the order drawn); was 2.3 x


def test_consecutive_csv_feature_columns_are_not_copied_before_the_split(tmp_path, monkeypatch):
    # was: values[:, features] copied every feature column (float64) before each split was gathered
    import stagewise.data.loaders as loaders

    seen = {}
    read_csv, array_splits = loaders.read_csv, loaders.array_splits

    def read_spy(*args):
        seen["read"] = read_csv(*args)
        return seen["read"]

    def splits_spy(inputs, *args, **options):
        seen["inputs"] = inputs
        return array_splits(inputs, *args, **options)

    monkeypatch.setattr(loaders, "read_csv", read_spy)
    monkeypatch.setattr(loaders, "array_splits", splits_spy)
    write_csv(tmp_path / "t.csv", [(i, i % 2, 10 * i) for i in range(4)])
    for target, shared in ((["x1"], True), (["x2"], True), (["label"], False)):  # label: x1 and x2 are not consecutive
        CSVDataset.from_recipe(CSVOptions(path=str(tmp_path / "t.csv"), target=target, splits=HALVES), seed=0)
        assert np.shares_memory(seen["inputs"], seen["read"][1]) == shared  # the values read


def test_idx_float_images_with_nan_and_jsonl_without_values_are_refused(tmp_path):
    images = np.ones((4, 2, 2), dtype=np.float32)
    images[2, 1, 0] = np.nan
    (tmp_path / "images.idx").write_bytes(idx_bytes(images, 0x0D))
    (tmp_path / "labels.idx").write_bytes(idx_bytes(np.zeros(4, dtype=np.uint8), 0x08))
    with pytest.raises(DataError, match=r"images\.idx: example 2 \(0-based, axis 0\) of the inputs holds NaN"):
        IDXDataset.from_recipe(IDXOptions(images=str(tmp_path / "images.idx"), labels=str(tmp_path / "labels.idx")),
                               seed=0)
    (tmp_path / "d.jsonl").write_text('{"x": [], "y": 1}\n' * 4)
    with pytest.raises(DataError, match=r"d\.jsonl: the inputs have shape \(4, 0\), no values per example"):
        _load("jsonl", tmp_path / "d.jsonl")


def _corrupt_member(path):
    np.savez(path, input=np.ones((50, 20)), target=np.ones(50))
    raw = bytearray(path.read_bytes())
    raw[1000] ^= 0xFF  # inside input.npy's data: its CRC no longer matches
    path.write_bytes(bytes(raw))


def _not_npy_members(path):
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        z.writestr("input.npy", b"hello")
        z.writestr("target.npy", b"world")


def _flagged_member(bit):
    """A .npz whose 'target.npy' member's zip flags say ``bit``: 0x20 compressed patched data, 0x01 encrypted
    (found by fuzzing: zipfile's NotImplementedError and RuntimeError tracebacks)."""
    def write(path):
        np.savez(path, input=np.zeros((4, 2), np.float32), target=np.zeros(4))
        raw = bytearray(path.read_bytes())
        for signature, flags in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # local header, central directory
            raw[raw.rfind(signature) + flags] |= bit  # the archive's last of each: target.npy's
        path.write_bytes(bytes(raw))
    return write


def _zip_version_255(path):
    """A .npz whose central directory says it needs zip version 25.5 to extract (zipfile: NotImplementedError)."""
    np.savez(path, input=np.zeros((4, 2), np.float32), target=np.zeros(4))
    raw = bytearray(path.read_bytes())
    raw[raw.find(b"PK\x01\x02") + 6] = 255  # "version needed to extract" of the first member
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("write, message", [
    (lambda p: p.write_bytes(b""), r"a\.npz is not a readable \.npz file \(.*\); write it with numpy\.savez"),
    (_corrupt_member, r"a\.npz: array 'input' \(input_key\) is corrupt \(Bad CRC-32 for file 'input\.npy'\); the "
                      r"file may be truncated or damaged, write it again with numpy\.savez"),
    (_not_npy_members, r"a\.npz: 'input' \(input_key\) is not a numpy array \(\.npy\) inside the file"),
    (lambda p: np.savez(p), r"a\.npz has no array 'input' \(input_key\); its arrays are: \(none\)"),
    (_flagged_member(0x20), r"a\.npz: array 'target' \(target_key\) is stored in a way numpy cannot read \(compressed "
                            r"patched data \(flag bit 5\)\); write the file with numpy\.savez or "
                            r"numpy\.savez_compressed"),
    (_flagged_member(0x01), r"a\.npz: array 'target' \(target_key\) is stored in a way numpy cannot read \(File "
                            r"'target\.npy' is encrypted, password required for extraction\)"),
    (_zip_version_255, r"a\.npz is not a readable \.npz file \(zip file version 25\.5\); write it with numpy\.savez"),
], ids=["empty-file", "bad-crc", "member-not-npy", "no-arrays", "zip-patched-data", "zip-encrypted", "zip-version"])
def test_a_damaged_npz_is_a_data_error(tmp_path, write, message):
    write(tmp_path / "a.npz")  # were EOFError, zipfile.BadZipFile and AttributeError tracebacks
    with pytest.raises(DataError, match=message):
        NPZDataset.from_recipe(NPZOptions(path=str(tmp_path / "a.npz")), seed=0)


# --- files as users bring them ---------------------------------------------------------------


def test_csv_blank_lines_of_spaces_hold_no_example(tmp_path):
    # was: a line of spaces (as editors leave) before the header or between rows was a row of 1 cell
    (tmp_path / "t.csv").write_text("\n  \na,y\n1,2\n   \n3,4\n")
    names, values, lines = tabular.read_csv(str(tmp_path / "t.csv"), header=True, encoding="utf-8")
    assert names == ["a", "y"] and values.tolist() == [[1, 2], [3, 4]] and lines == [4, 6]


def test_csv_semicolons_and_decimal_commas_are_named_in_a_row_count_error(tmp_path):
    # was: "line 2: 3 cells, but the header has 1", nothing said about the separator or what to do
    (tmp_path / "t.csv").write_text("a;y\n1,5;2,5\n")  # a spreadsheet in a comma-decimal locale
    with pytest.raises(DataError, match=r"t\.csv, line 2: 3 cells, but the header has 1; give every row one number "
                                        r"per column; the header is one cell holding ';': .* decimal comma such as "
                                        r"1,5 by 1\.5\), or save the file as CSV with commas$"):
        tabular.read_csv(str(tmp_path / "t.csv"), header=True, encoding="utf-8")


def test_jsonl_error_at_a_line_end_says_objects_must_fit_on_one_line(tmp_path):
    # was: "line 1: not valid JSON (... at column 1)": json counts the line end as a new line of its own
    (tmp_path / "d.json").write_text('{\n  "x": 1,\n  "y": 2\n}\n')  # pretty-printed JSON
    with pytest.raises(DataError, match=r"d\.json, line 1: not valid JSON \(Expecting property name enclosed in "
                                        r"double quotes at the end of the line: an object must not go on to the "
                                        r"next line, as in a pretty-printed \.json file\)"):
        tabular.read_jsonl(str(tmp_path / "d.json"), ["x"], ["y"], "utf-8")
    (tmp_path / "d.json").write_text('{"x": 1, "y": 2}\r\n{"x": 1,, "y": 2}\r\n')
    with pytest.raises(DataError, match=r"line 2: not valid JSON \(Expecting property name enclosed in double "
                                        r"quotes at column 9\)"):
        tabular.read_jsonl(str(tmp_path / "d.json"), ["x"], ["y"], "utf-8")


@pytest.mark.parametrize(("content", "message"), [
    (b"\x1f\x8b", r"d\.npz is gzip-compressed; decompress it \(gunzip\)"),
    (b"a,b\n1,2\n", r"d\.npz is not a \.npz file: it starts with bytes 61 2c 62 0a, not a zip archive's 50 4b 03 04"),
])
def test_npz_that_is_no_zip_is_not_called_pickled_data(tmp_path, content, message):
    # was: numpy reads any other file as a pickle: "contains pickled (object) data ... allow_pickle="
    np.savez(tmp_path / "d.npz", input=np.zeros((2, 1)), target=np.zeros(2))
    if content.startswith(b"\x1f\x8b"):
        content = gzip.compress((tmp_path / "d.npz").read_bytes())
    (tmp_path / "d.npz").write_bytes(content)
    with pytest.raises(DataError, match=message):
        NPZDataset.from_recipe(NPZOptions(path=str(tmp_path / "d.npz")), seed=0)


@pytest.mark.parametrize("text, header, message", [
    ('a,b\n"1,5",2\n', True, r"line 2, column 0 \('a'\): '1,5' is not a number; .*; write the decimal comma of '1,5' "
                             r"as a point, 1\.5$"),  # was: no hint at a quoted decimal comma
    ("a,b\n1,2\n", False, r"line 1, column 0: 'a' is not a number; .*; if this row names the columns, set "
                          r"data\.header = true$"),  # was: no hint that the file has a header
])
def test_csv_cell_hints(tmp_path, text, header, message):
    (tmp_path / "t.csv").write_text(text)
    with pytest.raises(DataError, match=message):
        CSVDataset.from_recipe(CSVOptions(path=str(tmp_path / "t.csv"), target=[1], header=header), seed=0)


def test_an_unknown_split_lists_the_data_s_splits():
    data = DataSplits({"train": [1], "valid": [2]})
    with pytest.raises(KeyError, match="no split named 'test'; the data has splits: train, valid"):
        data["test"]


def test_to_device_keeps_lists_and_tuples_of_a_collated_batch():
    from stagewise.engine.batches import to_device

    t = torch.ones(2)
    moved = to_device({"x": [t, (t, "label")]}, torch.device("cpu"))
    assert type(moved["x"]) is list and type(moved["x"][1]) is tuple
    assert torch.equal(moved["x"][0], t) and moved["x"][1][1] == "label"


def test_an_idx_header_cut_short_names_the_bytes_it_needs(tmp_path):
    (tmp_path / "head.idx").write_bytes(b"\0\0\x08\x05" + struct.pack(">I", 2))  # 5 dimensions, one size given
    with pytest.raises(DataError, match=r"head\.idx is truncated: its header needs 24 bytes, the file has 8"):
        read_idx(tmp_path / "head.idx")
