"""Data sources: where an agent's samples come from, named by a spec string.

`--data sine:seed=3` opens a SineStream; other kinds register with
`@register_source("kind")`. A source is an endless stream (`next`) plus a
fixed held-back set (`holdout`) for evaluation, both as torch tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Protocol

import torch


class DataSource(Protocol):
    kind: str

    def next(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next n samples of the stream (x, y)."""
        ...

    def holdout(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n samples never returned by `next`, the same on every call."""
        ...


class DataSpecError(ValueError):
    """A `--data` spec that names an unknown kind or carries bad parameters."""


_SOURCES: dict[str, Callable[..., DataSource]] = {}


def register_source(kind: str) -> Callable[[Callable[..., DataSource]], Callable[..., DataSource]]:
    def wrap(factory: Callable[..., DataSource]) -> Callable[..., DataSource]:
        _SOURCES[kind] = factory
        return factory

    return wrap


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """'sine:seed=3,amplitude=2' -> ('sine', {'seed': '3', 'amplitude': '2'})."""
    kind, _, rest = spec.strip().partition(":")
    if not kind:
        raise DataSpecError(f"data spec {spec!r} has no kind; expected KIND[:key=value,...]")
    params: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DataSpecError(f"data spec {spec!r}: {item!r} is not key=value")
        params[key.strip()] = value.strip()
    return kind, params


def open_source(spec: str) -> DataSource:
    kind, params = parse_spec(spec)
    if kind not in _SOURCES:
        raise DataSpecError(f"unknown data kind {kind!r} in {spec!r}; known: {', '.join(sorted(_SOURCES))}")
    try:
        return _SOURCES[kind](**params)
    except TypeError as exc:
        raise DataSpecError(f"data spec {spec!r}: {exc}") from exc


_OPEN: dict[str, DataSource] = {}


def shared_source(spec: str) -> DataSource:
    """One source per spec per process, so successive messages continue the same stream."""
    if spec not in _OPEN:
        _OPEN[spec] = open_source(spec)
    return _OPEN[spec]


def shared_sources(specs: Collection[str] | None = None) -> dict[str, DataSource]:
    """The shared sources open now (of `specs`, if given), by spec: a simulation checkpoint keeps
    their stream positions."""
    return {spec: s for spec, s in _OPEN.items() if specs is None or spec in specs}


def restore_shared_sources(sources: dict[str, DataSource]) -> None:
    """Continue exactly the streams `shared_sources` returned (from a checkpoint)."""
    _OPEN.clear()
    _OPEN.update(sources)


def close_shared_sources() -> None:
    """Forget every shared source, so a simulation that runs again starts every stream afresh."""
    _OPEN.clear()


@dataclass(frozen=True)
class SineTask:
    amplitude: float
    phase: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.amplitude * torch.sin(x + self.phase)

    @classmethod
    def sample(cls, generator: torch.Generator) -> SineTask:
        u = torch.rand(2, generator=generator, dtype=torch.float64)
        return cls(amplitude=0.1 + 4.9 * float(u[0]), phase=math.pi * float(u[1]))


@register_source("sine")
class SineStream:
    """One sine task (amplitude U(0.1,5), phase U(0,π)) observed at x ~ U(-5,5), seeded."""

    kind = "sine"

    def __init__(self, seed: str | int = 0, amplitude: str | float | None = None,
                 phase: str | float | None = None) -> None:
        try:
            self.seed = int(seed)
        except ValueError:
            raise DataSpecError(f"sine: seed must be an integer, got {seed!r}") from None
        gen = torch.Generator().manual_seed(self.seed)
        task = SineTask.sample(gen)
        self.task = SineTask(
            amplitude=float(amplitude) if amplitude is not None else task.amplitude,
            phase=float(phase) if phase is not None else task.phase,
        )
        self._stream = torch.Generator().manual_seed(self.seed * 7919 + 1)
        self._holdout_seed = self.seed * 7919 + 2

    def _draw(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.rand(n, 1, generator=generator) * 10.0 - 5.0
        return x, self.task(x)

    def next(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._draw(n, self._stream)

    def holdout(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._draw(n, torch.Generator().manual_seed(self._holdout_seed))


@register_source("omniglot")
def omniglot_source(**params: str) -> DataSource:
    """`omniglot:device=D,devices=N,ways=5,seed=S[,dir=DATA][,split=alphabets|characters]`: one device
    of a non-IID Omniglot fleet."""
    from tinyfleet.client.omniglot import OmniglotDeviceStream

    return OmniglotDeviceStream.from_spec(**params)


@register_source("occupancy")
def occupancy_source(**params: str) -> DataSource:
    """`occupancy:room=N,rooms=R[,time_of_day=1][,dir=DATA]`: one room's sensor rows in time order."""
    from tinyfleet.client.occupancy import OccupancyRoomStream

    return OccupancyRoomStream.from_spec(**params)


@register_source("keywords")
def keywords_source(**params: str) -> DataSource:
    """`keywords:words=yes+no+up,seed=S[,holdout=3][,dir=DATA]`: spoken words as log-mel clips."""
    from tinyfleet.client.keywords import KeywordStream

    return KeywordStream.from_spec(**params)


@register_source("replay")
def replay_source(**params: str) -> DataSource:
    """`replay:path=FILE,rate_hz=R[,label=COLUMN][,features=A+B][,holdout=N]`: a CSV or NPZ replayed
    at R samples per second, its last rows held out."""
    from tinyfleet.client.replay_source import ReplaySource

    return ReplaySource.from_spec(**params)
