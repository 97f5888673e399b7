"""Built-in tasks (every entry of refimpl.tasks.TASKS) and the data-set helpers."""
import numpy as np
import pytest

from refimpl.model import ModelConfig
from refimpl.tasks import TASKS, load_data, make_task


@pytest.mark.parametrize("name", list(TASKS))
def test_task_layout_dtypes_and_labels(name):
    d = make_task(name, n=50, L=16, seed=0)
    assert d["name"] == name
    assert len(d["x_train"]) + len(d["x_test"]) == 50 and len(d["x_test"]) > 0
    for split in ("train", "test"):
        x, y = d[f"x_{split}"], d[f"y_{split}"]
        assert y.dtype == np.int64 and y.shape == (len(x),)
        assert y.min() >= 0 and y.max() < d["n_classes"]
        if d["vocab"]:
            assert x.dtype == np.int64 and x.ndim == 2 and x.shape[1] == 16
            assert x.min() >= 0 and x.max() < d["vocab"]
        else:
            assert x.dtype == np.float64 and x.ndim == 3 and x.shape[1] == 16
            assert np.all(np.isfinite(x))
    labels = np.concatenate([d["y_train"], d["y_test"]])
    assert len(np.unique(labels)) >= 2, "a task whose labels are constant teaches nothing"


@pytest.mark.parametrize("name", list(TASKS))
def test_task_is_deterministic_for_a_seed(name):
    a, b, c = (make_task(name, n=40, L=12, seed=s) for s in (3, 3, 4))
    for k in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["x_train"], c["x_train"])


@pytest.mark.parametrize("name", list(TASKS))
def test_model_config_sizes_itself_from_the_task(name):
    d = make_task(name, n=20, L=8, seed=0)
    cfg = ModelConfig.for_data(d, d_model=4, d_state=2)
    assert cfg.n_classes == d["n_classes"] and cfg.vocab == d["vocab"]
    assert cfg.d_input == (1 if d["vocab"] else d["x_train"].shape[2])


def test_load_data_takes_exactly_one_source(tmp_path):
    with pytest.raises(ValueError, match="give exactly one of task"):
        load_data()
    with pytest.raises(ValueError, match="give exactly one of task"):
        load_data("adding", tmp_path / "d.npz")
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        load_data("nope")
    assert load_data("parity", n=10, L=4)["name"] == "parity"
