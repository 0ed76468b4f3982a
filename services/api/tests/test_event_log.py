"""Reading events by index from a global stream of snapshots and events."""

from typing import final

from shoal_api.event_log import read_events
from shoal_shared.events import IndexedEvent, MasterElected
from shoal_shared.global_log import GlobalLogEntry, LoggedEvent, LoggedSnapshot
from shoal_shared.ids import NodeId
from shoal_shared.state import State


def event(index: int, term: int = 1) -> LoggedEvent:
    return LoggedEvent(
        event=IndexedEvent(
            index=index, term=term, event=MasterElected(master_node_id=NodeId("n"), term=term)
        )
    )


def snapshot(last_index: int, term: int = 1) -> LoggedSnapshot:
    return LoggedSnapshot(term=term, state=State(last_index=last_index, term=term))


@final
class MemoryLog:
    """Stream sequences start at `first`; None marks a deleted message."""

    def __init__(self, entries: list[GlobalLogEntry | None], first: int = 1) -> None:
        self._entries = entries
        self._first = first
        self.reads = 0

    async def bounds(self) -> tuple[int, int]:
        return self._first, self._first + len(self._entries) - 1

    async def entry(self, sequence: int) -> GlobalLogEntry | None:
        self.reads += 1
        return self._entries[sequence - self._first]


def indexes(entries: tuple[IndexedEvent, ...]) -> list[int]:
    return [indexed.index for indexed in entries]


def long_log() -> list[GlobalLogEntry | None]:
    entries: list[GlobalLogEntry | None] = [snapshot(-1)]
    for index in range(600):
        entries.append(event(index))
        if index % 100 == 99:
            entries.append(snapshot(index))
    return entries


async def test_reads_a_page_from_an_index() -> None:
    log = MemoryLog(long_log())
    page = await read_events(log, since=250, limit=5)
    assert indexes(page.events) == [250, 251, 252, 253, 254]
    assert page.next_index == 255
    assert page.last_index == 599
    # Bisection, not a replay of the 600 entries before it.
    assert log.reads < 40


async def test_a_page_skips_snapshots_and_deleted_messages() -> None:
    entries = long_log()
    entries[5] = None  # event 4
    page = await read_events(MemoryLog(entries), since=0, limit=6)
    assert indexes(page.events) == [0, 1, 2, 3, 5, 6]
    page = await read_events(MemoryLog(long_log()), since=98, limit=4)
    assert indexes(page.events) == [98, 99, 100, 101]


async def test_past_the_end_is_empty() -> None:
    page = await read_events(MemoryLog(long_log()), since=600, limit=10)
    assert page.events == ()
    assert page.next_index == 600


async def test_a_log_that_starts_at_a_later_snapshot() -> None:
    # A new master's stream opens with a snapshot of the state it took over.
    log = MemoryLog([snapshot(41, term=2), event(42, term=2), event(43, term=2)], first=7)
    page = await read_events(log, since=0, limit=10)
    assert indexes(page.events) == [42, 43]
    assert page.last_index == 43


async def test_an_empty_stream() -> None:
    page = await read_events(MemoryLog([]), since=0, limit=10)
    assert (page.events, page.next_index, page.last_index) == ((), 0, -1)
