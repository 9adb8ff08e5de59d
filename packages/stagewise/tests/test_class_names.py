"""Class labels given by name in CSV and JSONL targets: read as each name's index among the sorted names."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stagewise.data.loaders import CSVDataset, CSVOptions, JSONLDataset, JSONLOptions
from stagewise.data.splits import DataError

SPECIES = ["versicolor", "setosa", "virginica", "setosa", "virginica", "versicolor"]
ONE = {"train": 1.0}


def csv_labels(tmp_path, rows: list[str], header: bool = True, target: str | int = "species", **options):
    path = tmp_path / "t.csv"
    path.write_text(("x,species\n" if header else "") + "".join(f"{i},{name}\n" for i, name in enumerate(rows)))
    data = CSVDataset.from_recipe(CSVOptions(path=str(path), target=[target], target_dtype="long", header=header,
                                             splits=ONE, **options), seed=0)
    by_x = {int(item["input"][0]): int(item["target"]) for item in data["train"]}
    return [by_x[i] for i in range(len(rows))], data.info


def test_csv_class_names_are_labelled_by_their_sorted_order_and_kept_in_info(tmp_path):
    labels, info = csv_labels(tmp_path, SPECIES)
    assert labels == [1, 0, 2, 0, 2, 1]
    assert info["classes"] == {"species": ["setosa", "versicolor", "virginica"]} and info["n_outputs"] == 3
    assert csv_labels(tmp_path, SPECIES[::-1])[0] == labels[::-1]  # the order of the rows does not matter


def test_csv_class_names_without_header_are_named_by_column_index_and_spaces_are_trimmed(tmp_path):
    labels, info = csv_labels(tmp_path, [" b", "a ", "b"], header=False, target=1)
    assert labels == [1, 0, 1] and info["classes"] == {"1": ["a", "b"]}


def test_csv_numeric_labels_read_as_before_and_give_no_classes(tmp_path):
    labels, info = csv_labels(tmp_path, ["2", "0", "1"])
    assert labels == [2, 0, 1] and "classes" not in info


@pytest.mark.parametrize("rows, message", [
    (["cat", "3"], r"line 3, column 1 \('species'\): the label '3' is a number, but line 2 gives 'cat', a class "
                   r"name; a target's labels must all be numbers or all be class names \(fill in missing labels\)$"),
    (["cat", ""], r"line 3, column 1 \('species'\): the label '' is empty, but line 2 gives 'cat', a class name"),
    (["cat", "nan"], r"line 3, column 1 \('species'\): the label 'nan' is not a finite number, but line 2 gives"),
    (["3", "cat"], r"line 3, column 1 \('species'\): the label 'cat' is a class name, but line 2 gives '3', a number"),
])
def test_csv_labels_that_mix_names_and_numbers_are_refused_naming_both_lines(tmp_path, rows, message):
    with pytest.raises(DataError, match=r"t\.csv, " + message):
        csv_labels(tmp_path, rows)


def test_a_csv_header_read_as_names_says_to_set_header(tmp_path):
    (tmp_path / "t.csv").write_text("1,species\n2,1\n")
    with pytest.raises(DataError, match=r"line 2, column 1: the label '1' is a number, but line 1 gives 'species', a "
                                        r"class name; .* labels\); if that line names the columns, set data.header = "
                                        r"true$"):
        CSVDataset.from_recipe(CSVOptions(path=str(tmp_path / "t.csv"), target=[1], target_dtype="long",
                                          header=False), seed=0)


def test_class_names_need_target_dtype_long_and_feature_names_stay_refused(tmp_path):
    (tmp_path / "t.csv").write_text("x,species\n1,cat\n")
    with pytest.raises(DataError, match=r"column 1 \('species'\): 'cat' is not a number"):
        CSVDataset.from_recipe(CSVOptions(path=str(tmp_path / "t.csv"), target=["species"]), seed=0)
    (tmp_path / "t.csv").write_text("colour,species\nred,cat\n")
    with pytest.raises(DataError, match=r"column 0 \('colour'\): 'red' is not a number"):
        CSVDataset.from_recipe(CSVOptions(path=str(tmp_path / "t.csv"), target=["species"], target_dtype="long"),
                               seed=0)


def jsonl(tmp_path, records: list[dict], target_keys: list[str], **options):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"x": i, **record}) + "\n" for i, record in enumerate(records)))
    return JSONLDataset.from_recipe(JSONLOptions(path=str(path), input_keys=["x"], target_keys=target_keys,
                                                 splits=ONE, **options), seed=0)


def test_jsonl_class_names_beside_a_list_of_numbers_label_their_own_column(tmp_path):
    # the key of names comes after a key of two numbers: its labels are the targets' third column
    records = [{"box": [i, i + 1], "kind": kind, "size": i % 2} for i, kind in enumerate(["dog", "cat", "emu", "cat"])]
    data = jsonl(tmp_path, records, ["box", "kind", "size"], target_dtype="long")
    targets = {int(item["input"][0]): item["target"].tolist() for item in data["train"]}
    assert [targets[i] for i in range(4)] == [[0, 1, 1, 0], [1, 2, 0, 1], [2, 3, 2, 0], [3, 4, 0, 1]]
    assert data.info["classes"] == {"kind": ["cat", "dog", "emu"]}


@pytest.mark.parametrize("kinds, message", [
    (["cat", 3], r"line 2, 'y': the label 3 is a number, but line 1 gives 'cat', a class name"),
    (["cat", [1]], r"line 2, 'y': the label \[1\] is neither a number nor a class name, but line 1 gives 'cat'"),
    ([3, "cat"], r"line 2, 'y': the label 'cat' is a class name, but line 1 gives 3, a number"),
])
def test_jsonl_labels_that_mix_names_and_numbers_are_refused(tmp_path, kinds, message):
    with pytest.raises(DataError, match=r"d\.jsonl, " + message):
        jsonl(tmp_path, [{"y": kind} for kind in kinds], ["y"], target_dtype="long")


def test_class_names_train_and_the_checkpoint_keeps_them(tmp_path):
    from stagewise.engine.runner import run_recipe
    from stagewise.recipe import load_recipe

    rng = np.random.default_rng(0)
    rows = "".join(f"{a:.3f},{b:.3f},{SPECIES[i % 6]}\n" for i, (a, b) in enumerate(rng.random((60, 2))))
    (tmp_path / "iris.csv").write_text("a,b,species\n" + rows)
    (tmp_path / "r.toml").write_text('[data]\nuse = "stagewise.csv"\npath = "iris.csv"\ntarget = ["species"]\n'
                                     'target_dtype = "long"\n[model]\nuse = "stagewise.mlp"\nhidden = [4]\n'
                                     '[[stages]]\nname = "s"\nmax_epochs = 1\n')
    run = run_recipe(load_recipe(tmp_path / "r.toml"), out=tmp_path / "run", quiet=True)
    saved = torch.load(run / "checkpoints" / "s.pt", weights_only=True)
    assert saved["data_info"]["classes"] == {"species": ["setosa", "versicolor", "virginica"]}
    assert saved["data_info"]["n_outputs"] == 3


def test_a_jsonl_key_of_names_given_twice_is_labelled_alike_in_both_columns(tmp_path):
    data = jsonl(tmp_path, [{"y": "b"}, {"y": "a"}], ["y", "y"], target_dtype="long")
    targets = {int(item["input"][0]): item["target"].tolist() for item in data["train"]}
    assert targets == {0: [1, 1], 1: [0, 0]} and data.info["classes"] == {"y": ["a", "b"]}


def test_a_jsonl_key_both_input_and_target_is_refused_as_a_csv_column_is():
    # was: read twice, a class name's label handed to the model as an input
    with pytest.raises(DataError, match=r"target_keys: key 'y' is in input_keys too, which would hand the model its "
                                        r"answer; a target key must not be an input"):
        JSONLOptions(path="d.jsonl", input_keys=["x", "y"], target_keys=["y"])


def test_a_nan_feature_after_a_class_name_is_named_not_the_name(tmp_path):
    # the row is read again for the message: its first cell that is no number is the class name
    (tmp_path / "t.csv").write_text("species,x\ncat,1\ndog,nan\n")
    with pytest.raises(DataError, match=r"t\.csv, line 3, column 1 \('x'\): 'nan' is not a finite number"):
        CSVDataset.from_recipe(CSVOptions(path=str(tmp_path / "t.csv"), target=["species"], target_dtype="long"),
                               seed=0)
