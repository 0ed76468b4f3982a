"""Stop strings on a text stream: release text as soon as it cannot be part of a stop."""

from collections.abc import Sequence
from typing import final


@final
class StopSequenceFilter:
    """Holds back the tail of the stream that could still grow into a stop sequence.

    Whatever `feed` returns is safe to show the client: a stop sequence can only begin
    inside the held-back tail, because every suffix of released text that was a prefix of a
    stop sequence was held back instead of released.
    """

    def __init__(self, stop_sequences: Sequence[str]) -> None:
        # An empty stop string would match everywhere; ignore it rather than stop at once.
        self._stop_sequences = tuple(stop for stop in stop_sequences if stop)
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add generated text; return the text now safe to release and whether a stop hit."""
        if not self._stop_sequences:
            # The common case costs one branch per token.
            return text, False
        pending = self._held + text
        stop_at = min(
            (index for stop in self._stop_sequences if (index := pending.find(stop)) >= 0),
            default=-1,
        )
        if stop_at >= 0:
            self._held = ""
            return pending[:stop_at], True
        held_length = self._longest_stop_prefix_suffix(pending)
        release_length = len(pending) - held_length
        self._held = pending[release_length:]
        return pending[:release_length], False

    def flush(self) -> str:
        """The held-back tail, released when generation ends without a stop."""
        held, self._held = self._held, ""
        return held

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        longest = 0
        for stop in self._stop_sequences:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest
