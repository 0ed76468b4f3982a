"""Reading indexed events out of a master's global stream, by event index.

The stream holds snapshots and events; stream sequences grow with event indexes, so the first
entry at or after an index is found by bisection over sequences instead of a replay.
"""

from typing import Protocol

from pydantic import Field
from shoal_shared.events import IndexedEvent
from shoal_shared.frozen import FrozenModel
from shoal_shared.global_log import GlobalLogEntry, LoggedEvent, LoggedSnapshot

MAX_EVENTS_PER_PAGE = 1000


class EventPage(FrozenModel):
    events: tuple[IndexedEvent, ...]
    # The index to ask for next (`since=next_index`) to continue where this page ended.
    next_index: int = Field(ge=0)
    # Index of the master's newest event; -1 when its log holds none.
    last_index: int


class LogReader(Protocol):
    async def bounds(self) -> tuple[int, int]:
        """(first, last) stream sequence; last < first when the stream is empty."""
        ...

    async def entry(self, sequence: int) -> GlobalLogEntry | None:
        """The entry at `sequence`, or None if it was deleted."""
        ...


def _position(entry: GlobalLogEntry) -> int:
    """A key that never decreases along the stream: an event's index; for a snapshot, the
    index of the first event that can follow it."""
    match entry:
        case LoggedEvent():
            return entry.event.index
        case LoggedSnapshot():
            return entry.state.last_index + 1


async def _entry_from(
    reader: LogReader, sequence: int, end: int
) -> tuple[int, GlobalLogEntry] | None:
    """The first entry at a sequence in [sequence, end), skipping deleted ones."""
    for candidate in range(sequence, end):
        entry = await reader.entry(candidate)
        if entry is not None:
            return candidate, entry
    return None


async def _last_index(reader: LogReader, first: int, last: int) -> int:
    for sequence in range(last, first - 1, -1):
        entry = await reader.entry(sequence)
        if entry is not None:
            return _position(entry) - 1 if isinstance(entry, LoggedSnapshot) else _position(entry)
    return -1


async def read_events(reader: LogReader, since: int, limit: int) -> EventPage:
    since = max(since, 0)
    limit = max(1, min(limit, MAX_EVENTS_PER_PAGE))
    first, last = await reader.bounds()
    end = last + 1
    if end <= first:
        return EventPage(events=(), next_index=since, last_index=-1)
    # Bisect for the first sequence whose entry is at or past `since`.
    low, high = first, end
    while low < high:
        middle = (low + high) // 2
        found = await _entry_from(reader, middle, high)
        if found is None or _position(found[1]) >= since:
            high = middle
        else:
            low = found[0] + 1
    events: list[IndexedEvent] = []
    sequence = low
    while sequence < end and len(events) < limit:
        entry = await reader.entry(sequence)
        sequence += 1
        if isinstance(entry, LoggedEvent) and entry.event.index >= since:
            events.append(entry.event)
    next_index = events[-1].index + 1 if events else since
    return EventPage(
        events=tuple(events),
        next_index=next_index,
        last_index=await _last_index(reader, first, last),
    )
