"""Loaders for users' files: CSV, JSON Lines (+gzip), IDX (MNIST) and NPZ."""

import gzip
import json
import struct

import numpy as np
import pytest
import torch

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
    with pytest.raises(DataError, match=r"CSV file .*missing\.csv does not exist"):
        CSVDataset.from_recipe(CSVOptions(path=str(tmp_path / "missing.csv"), target=["b"]), seed=0)
    with pytest.raises(DataError, match="target must be a non-empty list"):
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


def test_idx_other_types_are_big_endian(tmp_path):
    values = np.array([[1.5, -2.0], [3.25, 1e6]], dtype=np.float32)
    (tmp_path / "f.idx").write_bytes(idx_bytes(values, 0x0D))
    assert np.array_equal(read_idx(tmp_path / "f.idx"), values)


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
