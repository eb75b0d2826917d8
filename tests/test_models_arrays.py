from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from tinyfleet.common.arrays import (
    InvalidUpdateError,
    check_compatible,
    check_finite,
    from_numpy_dict,
    load_array_record,
    to_array_record,
    to_numpy_dict,
)
from tinyfleet.common.flower_adapter import RAW_STYPE, raw_array
from tinyfleet.common.models import OmniglotConv4, build_model, get_model_spec, parameter_count


def test_zoo_models_build_reproducibly() -> None:
    a, b = build_model("sine-mlp", seed=3), build_model("sine-mlp", seed=3)
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    assert all(torch.equal(x, y) for x, y in pairs)
    assert parameter_count(a) == 1 * 64 + 64 + 64 * 64 + 64 + 64 + 1
    conv4 = build_model("omniglot-conv4", seed=0, ways=5)
    assert isinstance(conv4, OmniglotConv4)
    assert conv4(torch.zeros(2, 1, 28, 28)).shape == (2, 5)
    assert conv4.features(torch.zeros(2, 1, 28, 28)).shape == (2, 256)  # the 64 x 2 x 2 embedding
    with pytest.raises(KeyError, match="unknown model 'x'"):
        get_model_spec("x")


def test_array_record_round_trip_and_checks() -> None:
    model = build_model("sine-mlp", seed=0)
    record = to_array_record(model)
    other = build_model("sine-mlp", seed=1)
    load_array_record(other, record)
    assert torch.equal(other.state_dict()["0.weight"], model.state_dict()["0.weight"])
    arrays = to_numpy_dict(record)
    check_finite(from_numpy_dict(arrays))
    check_compatible(from_numpy_dict(arrays), record)
    arrays["2.bias"] = arrays["2.bias"].copy()
    arrays["2.bias"][3] = np.nan
    with pytest.raises(InvalidUpdateError, match=r"'2\.bias' holds 1 NaN/Inf"):
        check_finite(from_numpy_dict(arrays))
    arrays["2.bias"] = np.zeros(5, dtype=np.float32)
    with pytest.raises(InvalidUpdateError, match=r"'2\.bias' has shape"):
        check_compatible(from_numpy_dict(arrays), record)
    del arrays["0.bias"]
    with pytest.raises(InvalidUpdateError, match="missing"):
        check_compatible(from_numpy_dict(arrays), record)


def test_reply_checks_read_raw_arrays_and_refuse_those_that_do_not_load() -> None:
    check_finite(ArrayRecord({"payload": raw_array(np.frombuffer(b"packed update", dtype=np.uint8))}))
    with pytest.raises(InvalidUpdateError, match=r"'w' holds 1 NaN/Inf"):
        check_finite(ArrayRecord({"w": raw_array(np.array([1.0, np.inf], dtype=np.float32))}))
    short = Array(dtype="uint8", shape=(10,), stype=RAW_STYPE, data=b"\x00" * 3)
    with pytest.raises(InvalidUpdateError, match=r"'payload' does not load: .*needs 10 bytes, holds 3"):
        check_finite(ArrayRecord({"payload": short}))
