"""ShardWatch: what happened to a tables cluster's shard actors since the last look.

`engram serve` holds a cluster for as long as it runs; before this it waited on a signal only, and
went on saying it served after a shard had died. A watch asks every shard actor for its process id
each interval (an actor call: it answers from the process Ray runs now):

- a new process id means Ray restarted the shard after a crash; its recovery counters (records of
  the write-ahead log replayed) go into the log, and serving goes on;
- `ActorDiedError` means the shard died for good: Ray gave up restarting it (`max_restarts`) or it
  is one that is never restarted (all-DRAM, or a hot shard keeping rows on a GPU). The cluster
  cannot serve its rows any more, and `poll` returns it;
- no answer within the interval (a restart in progress: Ray queues the call until the new process
  serves, or the process is busy) is asked again at the next look, without sending a second call.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import ray

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardEvent:
    """Shard (`role`, `shard_id`) restarted (`died` False) or died for good; `detail` says how."""

    role: str
    shard_id: int
    died: bool
    detail: str

    def __str__(self) -> str:
        return f"shard {self.role} {self.shard_id} {'died for good' if self.died else 'restarted'}: {self.detail}"


class ShardWatch:
    """Watches the shard actors {(role, shard_id): actor}: `poll` for one look, `run` until a shard
    died for good or `stop` is set."""

    def __init__(self, actors: dict[tuple[str, int], object], timeout_s: float = 60.0) -> None:
        self.actors = dict(actors)
        refs = {key: actor.pid.remote() for key, actor in self.actors.items()}
        self.pids: dict[tuple[str, int], int | None] = {}
        for key, ref in refs.items():  # a shard dead already is found by the first poll
            try:
                self.pids[key] = ray.get(ref, timeout=timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                self.pids[key] = None
        self._asking: dict[tuple[str, int], ray.ObjectRef] = {}
        self.dead: set[tuple[str, int]] = set()

    def poll(self, wait_s: float = 1.0) -> list[ShardEvent]:
        """One look, waiting at most `wait_s` for the answers: the restarts and deaths seen since
        the last one (each logged), in shard order."""
        for key, actor in self.actors.items():
            if key not in self.dead and key not in self._asking:
                self._asking[key] = actor.pid.remote()
        if self._asking:
            ray.wait(list(self._asking.values()), num_returns=len(self._asking), timeout=wait_s)
        events = []
        for key in sorted(self._asking):
            ref = self._asking[key]
            if not ray.wait([ref], timeout=0)[0]:
                continue  # restarting or busy: asked again next time, by the same call
            del self._asking[key]
            event = self._answer(key, ref)
            if event is not None:
                (log.error if event.died else log.warning)("%s", event)
                events.append(event)
        return events

    def _answer(self, key: tuple[str, int], ref) -> ShardEvent | None:
        role, shard_id = key
        try:
            pid = ray.get(ref)
        except ray.exceptions.ActorUnavailableError:
            return None  # restarting: the next look sees the new process
        except ray.exceptions.RayActorError as err:
            self.dead.add(key)
            cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            return ShardEvent(role, shard_id, True, f"{type(err).__name__}: {cause}")
        before, self.pids[key] = self.pids[key], pid
        if before is None or pid == before:
            return None
        try:
            replayed = ray.get(self.actors[key].recovery.remote(), timeout=30)["wal_replayed"]
            recovered = f"{replayed} write-ahead log records replayed"
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as err:
            recovered = f"recovery counters unknown ({type(err).__name__})"
        return ShardEvent(role, shard_id, False, f"pid {before} -> {pid}, {recovered}")

    def run(self, stop: threading.Event, interval_s: float = 1.0) -> list[ShardEvent]:
        """Polls every `interval_s` until a shard died for good (returns the deaths of that look)
        or `stop` is set (returns [])."""
        while not stop.is_set():
            died = [event for event in self.poll(interval_s) if event.died]
            if died:
                return died
            stop.wait(interval_s)
        return []
