"""Prototype merge math: order independence, the global mean, late and partial classes,
int8 within its stated bound, nearest-prototype classification, and refusals by name."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tinyfleet.common.prototypes import (
    PrototypeError,
    PrototypeSet,
    decode,
    encode,
    merge_all,
    wire_bytes,
)

DIM = 16


def fleet(seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[PrototypeSet]]:
    """Five devices, each with its own subset of 8 classes and its own amount of data."""
    rng = np.random.default_rng(seed)
    xs, ys, sets = [], [], []
    for device in range(5):
        classes = rng.choice(8, size=rng.integers(2, 6), replace=False)
        n = int(rng.integers(5, 60))
        y = rng.choice(classes, size=n)
        x = rng.normal(size=(n, DIM)) * 3 + y[:, None]
        xs.append(x)
        ys.append(y)
        sets.append(PrototypeSet.from_embeddings(x, y))
        assert device == len(sets) - 1
    return np.concatenate(xs), np.concatenate(ys), sets


def global_means(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    return {str(c): x[y == c].mean(axis=0) for c in np.unique(y)}


def test_merge_in_any_order_is_the_mean_of_every_embedding() -> None:
    x, y, sets = fleet()
    expected = global_means(x, y)
    for order in itertools.islice(itertools.permutations(sets), 0, 120, 7):
        merged = merge_all(order, DIM)
        assert merged.labels == sorted(expected)
        for label, mean in expected.items():
            np.testing.assert_allclose(merged.means[label], mean, rtol=0, atol=1e-12)
            assert merged.counts[label] == int((y == int(label)).sum())


def test_classes_only_some_devices_saw_and_classes_that_come_later_are_kept() -> None:
    first = PrototypeSet.from_embeddings(np.ones((3, DIM)), ["a", "a", "b"])
    later = PrototypeSet.from_embeddings(np.full((2, DIM), 5.0), ["c", "c"])
    merged = merge_all([first], DIM)
    merged.merge(later)
    assert merged.labels == ["a", "b", "c"]
    assert merged.counts == {"a": 2, "b": 1, "c": 2}
    np.testing.assert_array_equal(merged.means["c"], np.full(DIM, 5.0))


def test_online_updates_equal_one_batch_and_a_set_merged_twice_counts_twice() -> None:
    x, y, _ = fleet(1)
    online = PrototypeSet(DIM)
    for start in range(0, len(x), 7):
        online.add(x[start : start + 7], y[start : start + 7])
    batch = PrototypeSet.from_embeddings(x, y)
    for label in batch.labels:
        np.testing.assert_allclose(online.means[label], batch.means[label], atol=1e-12)
    assert online.counts == batch.counts
    # Why devices send only what is new: the merge cannot tell a repeat from new data.
    twice = batch.copy()
    twice.merge(batch)
    assert all(twice.counts[c] == 2 * batch.counts[c] for c in batch.labels)


def test_int8_prototypes_merge_within_half_a_quantization_step() -> None:
    x, y, sets = fleet(2)
    expected = global_means(x, y)
    received = [decode(s.labels, encode(s, "int8")) for s in sets]
    merged = merge_all(received, DIM)
    # Each decoded mean is within scale/2 of its true value per element; a count-weighted mean of
    # those stays within the largest of them.
    bound = max(float(np.abs(s.means[c]).max()) / 127 / 2 for s in sets for c in s.labels)
    for label, mean in expected.items():
        assert np.abs(merged.means[label] - mean).max() <= bound + 1e-9
    assert merged.counts == merge_all(sets, DIM).counts


def test_wire_bytes_are_what_encode_produces_per_class() -> None:
    _, _, sets = fleet(3)
    s = sets[0]
    fp32, int8 = encode(s, "fp32"), encode(s, "int8")
    assert fp32["values"].nbytes == len(s) * wire_bytes(DIM, "fp32") == len(s) * DIM * 4
    assert int8["values"].nbytes + int8["scales"].nbytes == len(s) * wire_bytes(DIM, "int8")
    restored = decode(s.labels, fp32)
    for label in s.labels:
        np.testing.assert_allclose(restored.means[label], s.means[label], rtol=1e-6)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_nearest_prototype_separates_synthetic_clusters(metric: str) -> None:
    rng = np.random.default_rng(4)
    centres = rng.normal(size=(10, DIM)) * 5
    y = rng.integers(10, size=2000)
    x = centres[y] + rng.normal(size=(2000, DIM))
    protos = PrototypeSet.from_embeddings(x[:1000], y[:1000])
    predicted = protos.classify(x[1000:], metric)  # type: ignore[arg-type]
    accuracy = np.mean([p == str(t) for p, t in zip(predicted, y[1000:], strict=True)])
    assert accuracy > 0.97
    # Chance would be 0.1; the same prototypes with shuffled labels do not classify.
    rolled = np.roll(protos.matrix()[1], 1, axis=0)
    shuffled = PrototypeSet(DIM, dict(zip(protos.labels, rolled, strict=True)), protos.counts)
    mislabelled = shuffled.classify(x[1000:], metric)  # type: ignore[arg-type]
    wrong = np.mean([p == str(t) for p, t in zip(mislabelled, y[1000:], strict=True)])
    assert wrong < 0.2


def test_bad_prototypes_are_refused_by_name() -> None:
    s = PrototypeSet(DIM)
    with pytest.raises(PrototypeError, match="NaN"):
        s.add(np.full((1, DIM), np.nan), ["x"])
    with pytest.raises(PrototypeError, match=r"\[N, 16\]"):
        s.add(np.ones((2, 3)), ["x", "y"])
    with pytest.raises(PrototypeError, match="dimension 4 into 16"):
        s.merge(PrototypeSet(4))
    with pytest.raises(PrototypeError, match="'scales'"):
        decode(["a"], {"values": np.ones((1, DIM), np.int8), "counts": np.ones(1, np.int64)})
    with pytest.raises(PrototypeError, match="'counts'"):
        decode(["a"], {"values": np.ones((1, DIM), np.float32)})
    with pytest.raises(PrototypeError, match="twice"):
        decode(["a", "a"], {"values": np.ones((2, DIM), np.float32), "counts": np.ones(2, np.int64)})
    with pytest.raises(PrototypeError, match="class 'a': count"):
        PrototypeSet(DIM, {"a": np.zeros(DIM)}, {"a": -1})
    with pytest.raises(PrototypeError, match="no class has been learned"):
        PrototypeSet(DIM).classify(np.ones((1, DIM)))


def test_prototypical_loss_prefers_embeddings_near_their_class_mean() -> None:
    import torch

    from tinyfleet.common.learning import prototypical_loss
    from tinyfleet.common.models import build_model

    support_y = torch.tensor([0, 0, 1, 1, 2, 2])
    query_y = torch.tensor([0, 1, 2])
    centres = torch.eye(3) * 4
    support = centres[support_y] + 0.1
    good, good_acc = prototypical_loss(support, support_y, centres[query_y], query_y)
    bad, bad_acc = prototypical_loss(support, support_y, centres[torch.tensor([1, 2, 0])], query_y)
    assert good_acc == 1.0 and bad_acc == 0.0 and float(good) < 0.01 < float(bad)
    with pytest.raises(ValueError, match=r"missing: \[1\]"):
        prototypical_loss(support[:2], torch.tensor([0, 2]), support[:1], torch.tensor([0]))
    embedding = build_model("omniglot-protonet", seed=0).eval()
    assert embedding(torch.zeros(1, 1, 28, 28)).shape == (1, 64)  # one sample at a time, as on a device
