"""The update codec: what is sent plus what is kept equals the update; int8 error bounded."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, RecordDict

from tinyfleet.common import codec
from tinyfleet.common.flower_adapter import message_from_bytes, message_to_bytes, new_instruction


def _update(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "0.weight": rng.standard_normal((64, 1)).astype(np.float32),
        "0.bias": (rng.standard_normal(64) * 0.01).astype(np.float32),
        "2.weight": (rng.standard_normal((64, 64)) * 3).astype(np.float32),
        "4.bias": np.zeros(1, np.float32),
    }


def _over_the_wire(record: ArrayRecord) -> ArrayRecord:
    message = new_instruction(RecordDict({"update": record}), "train", 7, run_id=1)
    return message_from_bytes(message_to_bytes(message)).content.array_records["update"]


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_transmitted_plus_residual_equals_full_update(quantize: str) -> None:
    update, residual = _update(0), _update(1)
    record, transmitted, new_residual = codec.compress(update, residual, top_p=0.1, quantize=quantize)
    layout = codec.Layout.of(update)
    received = codec.decode(_over_the_wire(record), layout)
    for name in update:
        full = update[name] + residual[name]
        np.testing.assert_array_equal(received[name], transmitted[name])
        np.testing.assert_allclose(transmitted[name] + new_residual[name], full, rtol=0, atol=1e-6)
    if quantize == "none":  # without quantisation the split is exact, value for value
        for name in update:
            np.testing.assert_array_equal(
                transmitted[name] + new_residual[name], update[name] + residual[name]
            )


def test_top_p_sends_the_largest_magnitudes_only() -> None:
    update = _update(2)
    layout = codec.Layout.of(update)
    flat = layout.flatten(update)
    received = layout.flatten(codec.decode(codec.encode(update, top_p=0.1), layout))
    sent = received != 0
    assert sent.sum() == int(np.ceil(0.1 * flat.size))
    assert np.abs(flat[sent]).min() >= np.abs(flat[~sent]).max()
    np.testing.assert_array_equal(received[sent], flat[sent])


@pytest.mark.parametrize("top_p", [1.0, 0.25])
def test_int8_round_trip_error_bounded_by_half_the_tensor_scale(top_p: float) -> None:
    update = _update(3)
    layout = codec.Layout.of(update)
    received = codec.decode(_over_the_wire(codec.encode(update, top_p=top_p, quantize="int8")), layout)
    sent_mask = codec.decode(codec.encode(update, top_p=top_p), layout)
    for name in update:
        sent = sent_mask[name] != 0
        if not sent.any():
            continue
        scale = np.abs(update[name][sent]).max() / 127
        error = np.abs(received[name][sent] - update[name][sent])
        assert error.max() <= scale / 2 + 1e-7 * scale, name
        assert (received[name][~sent] == 0).all()


def test_dense_is_a_plain_flower_array_record() -> None:
    update = _update(4)
    record = codec.encode(update)
    assert codec.payload_kind(record) == codec.DENSE
    assert sorted(record.keys()) == sorted(update)
    decoded = codec.decode(_over_the_wire(record), codec.Layout.of(update))
    for name in update:
        np.testing.assert_array_equal(decoded[name], update[name])


def test_sparse_int8_is_more_than_twenty_times_smaller_than_dense_on_the_wire() -> None:
    rng = np.random.default_rng(5)
    update = {"w": rng.standard_normal((300, 300)).astype(np.float32)}
    dense = len(
        message_to_bytes(new_instruction(RecordDict({"u": codec.encode(update)}), "train", 7, run_id=1))
    )
    packed = codec.encode(update, top_p=0.1, quantize="int8")
    small = len(message_to_bytes(new_instruction(RecordDict({"u": packed}), "train", 7, run_id=1)))
    assert codec.payload_kind(packed) == codec.SPARSE_INT8
    assert dense / small > 20


def test_wide_gaps_between_sent_values_survive() -> None:
    flat = np.zeros(1_000_000, np.float32)
    flat[[3, 200_000, 999_999]] = [1.0, -2.0, 3.0]
    update = {"w": flat}
    decoded = codec.decode(codec.encode(update, top_p=3 / flat.size), codec.Layout.of(update))
    np.testing.assert_array_equal(decoded["w"], flat)


def test_payload_for_another_layout_is_refused_naming_the_mismatch() -> None:
    update = _update(6)
    record = codec.encode(update, top_p=0.5, quantize="int8")
    other = codec.Layout.of({**update, "extra": np.zeros(3, np.float32)})
    with pytest.raises(codec.CodecError, match="another model layout"):
        codec.decode(record, other)


@pytest.mark.parametrize("cut", [3, 25, -1])
def test_truncated_or_corrupt_payloads_raise_codec_error(cut: int) -> None:
    update = _update(7)
    raw = codec.encode(update, top_p=0.2)[codec.PAYLOAD_KEY].numpy()
    broken = ArrayRecord({codec.PAYLOAD_KEY: Array(raw[:cut].copy())})
    with pytest.raises(codec.CodecError):
        codec.decode(broken, codec.Layout.of(update))


def test_bad_options_and_non_finite_updates_are_refused() -> None:
    with pytest.raises(ValueError, match="top_p"):
        codec.encode(_update(), top_p=10)
    with pytest.raises(ValueError, match="quantize"):
        codec.encode(_update(), quantize="int4")
    bad = _update()
    bad["0.bias"][3] = np.nan
    with pytest.raises(codec.CodecError, match="NaN"):
        codec.encode(bad, top_p=0.5)
