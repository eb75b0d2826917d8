"""Occupancy loading, rooms' time-ordered streams, test sets and standardisation, on tiny made-up files."""

from __future__ import annotations

import math
import pickle
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import torch

from tinyfleet.client import occupancy
from tinyfleet.client.data_sources import DataSpecError, open_source
from tinyfleet.client.omniglot import data_root

HEADER = '"date","Temperature","Humidity","Light","CO2","HumidityRatio","Occupancy"\n'
EPOCH = datetime(2015, 2, 1)


def write_occupancy(
    path: Path, start: datetime, rows: int, first_id: int = 1, shuffle: bool = False, quoted_date: bool = True
) -> None:
    """Rows in the real layout: quoted row id, date, five readings, label. Row i has Light = 100 + i and
    CO2 = minutes since EPOCH, so rows of different times never coincide."""
    lines = []
    for i in range(rows):
        when = start + timedelta(minutes=i)
        date = f'"{when.isoformat(sep=" ")}"' if quoted_date else when.isoformat(sep=" ")
        co2 = (when - EPOCH) // timedelta(minutes=1)
        readings = f"{20 + i / 100},{27 + (i % 4) / 4},{100 + i},{co2},0.0048"
        lines.append(f'"{first_id + i}",{date},{readings},{int(i % 3 == 0)}\n')
    if shuffle:
        lines = lines[1::2] + lines[::2]
    path.write_text(HEADER + "".join(lines), encoding="utf-8")


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "occupancy"
    folder.mkdir()
    write_occupancy(folder / "datatraining.txt", datetime(2015, 2, 4, 17, 51), 40, shuffle=True)
    write_occupancy(folder / "datatest.txt", datetime(2015, 2, 2, 14, 19), 20, first_id=140)
    write_occupancy(folder / "datatest2.txt", datetime(2015, 2, 11, 14, 48), 30, quoted_date=False)
    occupancy.load_table.cache_clear()
    yield tmp_path
    occupancy.load_table.cache_clear()


def test_rows_parse_with_their_row_id_and_come_back_in_time_order(data_dir: Path) -> None:
    table = occupancy.load_table(str(data_dir / "occupancy" / "datatraining.txt"))
    assert len(table) == 40
    assert table.row_ids.tolist() == list(range(1, 41))  # the file holds them shuffled
    assert bool((table.seconds.diff() == 60).all())
    assert table.readings.shape == (40, 5)
    co2 = 3 * 1440 + 17 * 60 + 51 + 3  # row 3: 2015-02-04 17:54
    assert table.readings[3].tolist() == pytest.approx([20.03, 27.75, 103.0, co2, 0.0048])
    assert table.occupied.tolist() == [int(i % 3 == 0) for i in range(40)]


def test_time_of_day_adds_a_cyclic_clock(data_dir: Path) -> None:
    table = occupancy.load_table(str(data_dir / "occupancy" / "datatraining.txt"))
    x = table.features(time_of_day=True)
    assert x.shape == (40, 7)
    assert torch.allclose(x[:, 5] ** 2 + x[:, 6] ** 2, torch.ones(40))
    angle = (17 * 60 + 51) / 1440 * 2 * math.pi  # 17:51, the first row
    assert float(x[0, 5]) == pytest.approx(math.sin(angle), abs=1e-6)


def test_a_row_with_the_wrong_field_count_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_text(HEADER + '"1","2015-02-04 17:51:00",23.18,27.272,426,721.25,0.0047,1\n'
                    '"2015-02-04 17:52:00",23.18,27.272,426,721.25,0.0047,1\n', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{path}:3: 7 fields"):
        occupancy.load_table(str(path))


def test_rooms_are_contiguous_blocks_that_cover_the_training_rows(data_dir: Path) -> None:
    rooms = [occupancy.OccupancyRoomStream.from_spec(str(r), "3", dir=str(data_dir)) for r in range(3)]
    assert [len(room.y) for room in rooms] == [13, 13, 14]
    seconds = torch.cat([room.seconds for room in rooms])
    assert bool((seconds.diff() == 60).all())  # each room its own stretch of time, together all of it
    x, _ = rooms[1].next(13)
    assert x[:, 2].tolist() == [100.0 + i for i in range(13, 26)]


def test_the_stream_wraps_to_the_room_start_and_counts_passes(data_dir: Path) -> None:
    room = open_source(f"occupancy:room=0,rooms=4,dir={data_dir}")
    assert isinstance(room, occupancy.OccupancyRoomStream)
    room.next(7)
    second, y = room.next(7)
    assert second[:, 2].tolist() == [107.0, 108.0, 109.0, 100.0, 101.0, 102.0, 103.0]  # 10 rows, then row 0
    assert y.tolist() == [0, 0, 1, 1, 0, 0, 1]
    assert room.passes == 1


def test_seen_statistics_cover_distinct_streamed_rows_only(data_dir: Path) -> None:
    room = occupancy.OccupancyRoomStream.from_spec(room="0", rooms="4", dir=str(data_dir))
    x, _ = room.next(6)
    assert room.seen.count == 6
    assert torch.allclose(room.seen.mean, x.double().mean(dim=0))
    room.next(20)  # past the end: the 4 remaining rows count, the repeats do not
    assert room.seen.count == 10
    assert torch.allclose(room.seen.mean, room.x.double().mean(dim=0))


def test_rooms_statistics_merge_into_the_training_statistics(data_dir: Path) -> None:
    rooms = [occupancy.OccupancyRoomStream(r, 3, data_dir) for r in range(3)]
    merged = occupancy.FeatureStats.of(torch.empty(0, 5))
    for room in reversed(rooms):
        room.next(len(room.y))
        merged = merged.merged(room.seen)
    central = occupancy.training_stats(data_dir)
    assert merged.count == central.count == 40
    assert torch.allclose(merged.mean, central.mean) and torch.allclose(merged.std, central.std)
    z = central.standardize(occupancy.load_table(str(data_dir / "occupancy" / "datatraining.txt")).readings)
    assert torch.allclose(z[:, :4].mean(dim=0), torch.zeros(4), atol=1e-5)
    assert torch.allclose(z[:, :4].std(dim=0, unbiased=False), torch.ones(4), atol=1e-5)
    assert bool((z[:, 4] == 0).all())  # a constant feature is centred, not divided by zero


def test_holdout_is_fixed_spread_over_datatest_and_disjoint_from_the_stream(data_dir: Path) -> None:
    room = open_source(f"occupancy:room=1,rooms=2,dir={data_dir}")
    x, y = room.holdout(5)
    again, _ = room.holdout(5)
    assert torch.equal(x, again)
    test = occupancy.load_table(str(data_dir / "occupancy" / "datatest.txt"))
    assert x[:, 2].tolist() == [100.0, 104.0, 108.0, 112.0, 116.0]  # every 4th of 20 rows
    assert torch.equal(y, test.occupied[[0, 4, 8, 12, 16]])
    streamed = {tuple(r) for r in room.next(100)[0].tolist()}
    assert streamed.isdisjoint({tuple(r) for r in x.tolist()})  # the test rows are from other days
    with pytest.raises(ValueError, match=r"1 to 20 rows of datatest\.txt"):
        room.holdout(21)


def test_test_sets_load_both_files_as_tensors(data_dir: Path) -> None:
    sets = occupancy.load_test_sets(data_dir, time_of_day=True)
    assert list(sets) == ["datatest.txt", "datatest2.txt"]
    assert sets["datatest.txt"][0].shape == (20, 7) and sets["datatest2.txt"][1].shape == (30,)


def test_a_stream_survives_pickling_at_its_position(data_dir: Path) -> None:
    room = occupancy.OccupancyRoomStream(0, 2, data_dir)
    room.next(3)
    copy = pickle.loads(pickle.dumps(room))
    assert torch.equal(copy.next(4)[0], room.next(4)[0])


def test_missing_file_names_the_path_and_how_to_pass_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'occupancy' / 'datatraining.txt'}.*dir=DIR"):
        open_source(f"occupancy:room=0,rooms=2,dir={tmp_path}")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("occupancy:room=2,rooms=2", "need 0 <= room < rooms"),
        ("occupancy:room=x,rooms=2", "room and rooms must be integers"),
        ("occupancy:room=0,time_of_day=yes", "time_of_day must be 0 or 1"),
        ("occupancy:floor=1", "unexpected keyword argument 'floor'"),
    ],
)
def test_bad_specs_say_what_is_wrong(data_dir: Path, spec: str, message: str) -> None:
    with pytest.raises(DataSpecError, match=message):
        open_source(f"{spec},dir={data_dir}")


REAL = data_root() / "occupancy"


@pytest.mark.skipif(not REAL.is_dir(), reason=f"real occupancy data not at {REAL} (set TINYFLEET_DATA)")
def test_the_real_files() -> None:
    counts = {n: len(occupancy.load_table(str(REAL / n))) for n in ("datatraining.txt", *occupancy.TEST_SETS)}
    assert counts == {"datatraining.txt": 8143, "datatest.txt": 2665, "datatest2.txt": 9752}
    training = occupancy.load_table(str(REAL / "datatraining.txt"))
    assert float(training.occupied.float().mean()) == pytest.approx(0.212, abs=1e-3)
    test = occupancy.load_table(str(REAL / "datatest.txt"))
    assert int(test.seconds.max()) < int(training.seconds.min())  # datatest.txt precedes the training week
