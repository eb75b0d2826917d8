"""The update codec: what is sent plus what is kept equals the update; int8 error bounded;
the packed format as documented; malformed payloads refused with the problem named."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, RecordDict

from tinyfleet.common import codec
from tinyfleet.common.flower_adapter import (
    RAW_STYPE,
    message_from_bytes,
    message_to_bytes,
    new_instruction,
    raw_array,
)


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


def test_packed_payload_is_one_raw_byte_array_without_npy_header() -> None:
    update = _update(8)
    record = codec.encode(update, top_p=0.1, quantize="int8")
    assert list(record.keys()) == [codec.PAYLOAD_KEY]
    array = record[codec.PAYLOAD_KEY]
    assert (array.stype, array.dtype, array.shape) == (RAW_STYPE, "uint8", (len(array.data),))
    assert array.data.startswith(b"TFC2")  # the codec's own header, no .npy header before it
    wire = _over_the_wire(record)[codec.PAYLOAD_KEY]
    assert (wire.stype, wire.data) == (RAW_STYPE, array.data)


@pytest.mark.parametrize("quantize", ["none", "int8"])
@pytest.mark.parametrize("top_p", [1.0, 0.3, 0.01])
def test_every_packed_kind_round_trips_over_the_wire(top_p: float, quantize: str) -> None:
    update = _update(9)
    layout = codec.Layout.of(update)
    record = codec.encode(update, top_p=top_p, quantize=quantize)
    decoded = layout.flatten(codec.decode(_over_the_wire(record), layout))
    flat = layout.flatten(update)
    sent = codec.top_p_indices(flat, top_p)
    unsent = np.ones(flat.size, bool)
    unsent[sent] = False
    assert not decoded[unsent].any()
    if quantize == "none":
        np.testing.assert_array_equal(decoded[sent], flat[sent])
    else:  # every tensor's scale is at most the largest magnitude / 127; the error at most half of it
        assert np.abs(decoded[sent] - flat[sent]).max() <= np.abs(flat).max() / 254 * (1 + 1e-6)


# -- the packed format, written by hand from the module docstring ------------------------------

LAYOUT = codec.Layout.of({"a": (2, 3), "b": (4,)})  # 10 values: a = 0..5, b = 6..9
SPARSE, SPARSE_INT8 = 2, 3  # kind codes


_uvarint = codec._uvarint


def _block(data: bytes, deflate: bool = False) -> bytes:
    if not deflate:
        return _uvarint(len(data) << 1) + data
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    packed = compressor.compress(data) + compressor.flush()
    return _uvarint(len(packed) << 1 | 1) + packed


def _packed(kind: int, nnz: int, body: bytes, *, fingerprint: int | None = None) -> ArrayRecord:
    header = struct.pack("<4sBI", b"TFC2", kind, LAYOUT.fingerprint if fingerprint is None else fingerprint)
    data = header + _uvarint(len(LAYOUT.names)) + _uvarint(LAYOUT.numel) + _uvarint(nnz) + body
    return ArrayRecord({codec.PAYLOAD_KEY: raw_array(np.frombuffer(data, dtype=np.uint8))})


def _gaps(indices: list[int]) -> bytes:
    return b"".join(_uvarint(i - p - 1) for p, i in zip([-1, *indices], indices, strict=False))


def _sparse(indices: list[int], values: list[float], **kwargs: int) -> ArrayRecord:
    body = _block(_gaps(indices), deflate=True) + _block(np.array(values, np.float32).tobytes())
    return _packed(SPARSE, len(indices), body, **kwargs)


def _sparse_int8(
    indices: list[int], levels: list[int], scales: list[float], floors: list[int], shift: int
) -> ArrayRecord:
    magnitudes = [abs(v) - floors[int(LAYOUT.tensor_ids()[i])] for i, v in zip(indices, levels, strict=True)]
    high = bytes((m >> shift) << 1 | (v < 0) for m, v in zip(magnitudes, levels, strict=True))
    bits = "".join(format(m & ((1 << shift) - 1), f"0{shift}b") if shift else "" for m in magnitudes)
    low = int(bits.ljust(-(-len(bits) // 8) * 8, "0") or "0", 2).to_bytes(-(-len(bits) // 8), "big")
    body = (
        np.array(scales, np.float32).tobytes()
        + _block(_gaps(indices))
        + bytes(floors)
        + bytes([shift])
        + _block(high)
        + (low if bits else b"")
    )
    return _packed(SPARSE_INT8, len(indices), body)


def test_hand_written_packed_payloads_decode_as_documented() -> None:
    flat = LAYOUT.flatten(codec.decode(_sparse([1, 2, 9], [0.5, -1.0, 2.0]), LAYOUT))
    np.testing.assert_array_equal(flat, [0, 0.5, -1.0, 0, 0, 0, 0, 0, 0, 2.0])
    record = _sparse_int8([0, 4, 7, 8], [-100, 127, 90, -93], [0.5, 0.25], floors=[100, 90], shift=2)
    flat = LAYOUT.flatten(codec.decode(record, LAYOUT))
    np.testing.assert_array_equal(flat, [-50.0, 0, 0, 0, 63.5, 0, 0, 22.5, -23.25, 0])


def _bytes_of(record: ArrayRecord) -> bytes:
    return record[codec.PAYLOAD_KEY].data


def _raw(data: bytes) -> ArrayRecord:
    return ArrayRecord({codec.PAYLOAD_KEY: raw_array(np.frombuffer(data, dtype=np.uint8))})


def _splice(record: ArrayRecord, at: int, replacement: bytes) -> ArrayRecord:
    data = _bytes_of(record)
    return _raw(data[:at] + replacement + data[at + len(replacement) :])


INDICES, VALUES = [1, 2, 9], [0.5, -1.0, 2.0]
GOOD = _sparse(INDICES, VALUES)
GOOD_INT8 = _sparse_int8([0, 4, 7, 8], [-100, 127, 90, -93], [0.5, 0.25], floors=[100, 90], shift=2)
#: where GOOD_INT8's floors start: header (9) + 3 one-byte counts, 2 scales, the raw gap block
FLOORS_AT = 12 + 8 + len(_block(_gaps([0, 4, 7, 8])))
MALFORMED = {
    "wrong magic": (_splice(GOOD, 0, b"TFC1"), r"does not start with b'TFC2'"),
    "unknown kind": (_splice(GOOD, 4, b"\x09"), "kind code 9 is unknown"),
    "truncated header": (_raw(_bytes_of(GOOD)[:5]), "shorter than its header"),
    "truncated values": (_raw(_bytes_of(GOOD)[:-3]), "truncated inside the values"),
    "trailing bytes": (_raw(_bytes_of(GOOD) + b"\x00"), "1 unexpected byte"),
    "more values than indices": (_sparse(INDICES, [*VALUES, 1.0]), "values hold 16 bytes, at most 12"),
    "fewer values than indices": (_sparse(INDICES, VALUES[:2]), "values hold 8 bytes, expected 12"),
    "index outside the layout": (_sparse([1, 2, 10], VALUES), "index 10 is outside the 10-value layout"),
    "indices short of nnz": (
        _packed(SPARSE, 3, _block(_gaps([1, 2])) + _block(np.ones(3, np.float32).tobytes())),
        "indices decode to 2 values, expected 3",
    ),
    "block that does not inflate": (
        _packed(SPARSE, 3, _uvarint(4 << 1 | 1) + b"\xff\xff\xff\xff"),
        "indices do not inflate",
    ),
    "NaN value": (_sparse(INDICES, [np.nan, -1.0, 2.0]), "NaN/Inf"),
    "NaN scale": (
        _sparse_int8([0, 4], [-100, 127], [np.nan, 0.25], floors=[100, 127], shift=0),
        "invalid int8 scales",
    ),
    "int8 level over 127": (_splice(GOOD_INT8, FLOORS_AT, bytes([200])), r"outside \[-127, 127\]"),
    "low-bit width over 7": (_splice(GOOD_INT8, FLOORS_AT + 2, bytes([9])), "low-bit width 9 is over 7"),
    "dense int8 short of values": (_packed(1, 3, b""), "claims 3 values for a 10-value layout"),
    "other model's layout": (_sparse(INDICES, VALUES, fingerprint=123), "another model layout"),
    "npy array instead of raw bytes": (
        ArrayRecord({codec.PAYLOAD_KEY: Array(np.frombuffer(_bytes_of(GOOD), dtype=np.uint8))}),
        "stype 'raw', got uint8",
    ),
    "raw bytes shorter than the shape": (
        ArrayRecord(
            {codec.PAYLOAD_KEY: Array(dtype="uint8", shape=(99,), stype=RAW_STYPE, data=_bytes_of(GOOD))}
        ),
        "needs 99 bytes",
    ),
    "extra key": (ArrayRecord({**GOOD, "more": raw_array(np.zeros(1, np.uint8))}), "has only the key"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_packed_payloads_are_refused_naming_the_problem(case: str) -> None:
    record, message = MALFORMED[case]
    with pytest.raises(codec.CodecError, match=message):
        codec.decode(_over_the_wire(record), LAYOUT)


@pytest.mark.parametrize("cut", [3, 25, -1])
def test_encoded_payloads_cut_short_raise_codec_error(cut: int) -> None:
    update = _update(7)
    data = _bytes_of(codec.encode(update, top_p=0.2, quantize="int8"))
    with pytest.raises(codec.CodecError):
        codec.decode(_raw(data[:cut]), codec.Layout.of(update))


def test_bad_options_and_non_finite_updates_are_refused() -> None:
    with pytest.raises(ValueError, match="top_p"):
        codec.encode(_update(), top_p=10)
    with pytest.raises(ValueError, match="quantize"):
        codec.encode(_update(), quantize="int4")
    bad = _update()
    bad["0.bias"][3] = np.nan
    with pytest.raises(codec.CodecError, match="NaN"):
        codec.encode(bad, top_p=0.5)
