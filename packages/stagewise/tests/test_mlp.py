"""The MLP: layers as the options say, inputs flattened, widths from the data or the options."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from stagewise.data.splits import DataSplits
from stagewise.nn.mlp import MLP, MLPOptions
from stagewise.schema import build_dataclass

IMAGES = DataSplits({}, {"n_features": 6, "n_outputs": 3, "input_shape": [2, 3]})


def layer_types(model: MLP) -> list[type]:
    return [type(layer) for layer in model.net]


def test_layers_follow_the_options():
    model = MLP.from_recipe(MLPOptions(hidden=[5, 4], activation="gelu", dropout=0.25), IMAGES)
    assert layer_types(model) == [nn.Linear, nn.GELU, nn.Dropout, nn.Linear, nn.GELU, nn.Dropout, nn.Linear]
    assert [(m.in_features, m.out_features) for m in model.net if isinstance(m, nn.Linear)] == [(6, 5), (5, 4), (4, 3)]
    assert model.net[2].p == 0.25
    assert layer_types(MLP.from_recipe(MLPOptions(hidden=[5], activation="tanh"), IMAGES)) == [
        nn.Linear, nn.Tanh, nn.Linear]  # no dropout layer at dropout = 0


def test_image_inputs_are_flattened():
    model = MLP.from_recipe(MLPOptions(hidden=[4]), IMAGES)
    x = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(x), model(x.reshape(5, 6)))
    assert model(x).shape == (5, 3)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_integer_inputs_are_taken_as_the_numbers_they_hold(dtype):
    # was: torch's "mat1 and mat2 must have the same dtype" from inside the training loop, e.g. for a .npz of
    # uint8 pixels read without a scale
    model = MLP.from_recipe(MLPOptions(hidden=[4]), IMAGES)
    x = torch.randint(0, 2 if dtype == torch.bool else 256, (5, 2, 3), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(x.to(dtype)), model(x.float()))


def test_n_outputs_option_widens_the_output():
    model = MLP.from_recipe(MLPOptions(hidden=[4], n_outputs=10), IMAGES)
    assert model(torch.zeros(2, 6)).shape == (2, 10)


@pytest.mark.parametrize(("key", "value"), [("dropout", -0.1), ("dropout", 1.0), ("dropout", math.inf),
                                            ("hidden", [4, 0]), ("n_outputs", 0)])
def test_out_of_range_options_are_refused_when_the_recipe_loads(key, value):
    # as the transformer's: not at the model build, after the data has loaded (torch refuses dropout 1.5 there)
    problems = []
    assert build_dataclass(MLPOptions, {key: value}, "model", problems) is None
    assert [p.split(":")[0] for p in problems] == [f"model.{key}"]


def test_the_edges_of_the_ranges_are_accepted():
    assert MLPOptions(hidden=[1], dropout=0.0, n_outputs=1) and MLPOptions(dropout=0.999)


@pytest.mark.parametrize(("n_outputs", "missing"), [(None, "['n_features', 'n_outputs']"), (3, "['n_features']")])
def test_data_without_the_mlp_s_sizes_says_which_are_missing(n_outputs, missing):
    with pytest.raises(ValueError, match=rf"^model stagewise\.mlp needs data\.info {re.escape(missing)}; this "
                                         r"dataset does not provide them"):
        MLP.from_recipe(MLPOptions(n_outputs=n_outputs), DataSplits({}))
