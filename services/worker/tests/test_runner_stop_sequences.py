"""Stop strings: text is released as soon as it cannot start a stop sequence, never after."""

from __future__ import annotations

from collections.abc import Sequence

from shoal_worker.runner.stop_sequences import StopSequenceFilter


def feed_all(stops: Sequence[str], pieces: Sequence[str]) -> tuple[list[str], bool, str]:
    stop_filter = StopSequenceFilter(stops)
    released: list[str] = []
    for piece in pieces:
        text, stopped = stop_filter.feed(piece)
        released.append(text)
        if stopped:
            return released, True, ""
    return released, False, stop_filter.flush()


def test_without_stop_sequences_text_passes_straight_through() -> None:
    assert feed_all((), ["Hel", "lo"]) == (["Hel", "lo"], False, "")


def test_possible_start_of_a_stop_is_held_back_then_released() -> None:
    released, stopped, tail = feed_all(("END",), ["The E", "N", "x is near"])
    assert released == ["The ", "", "ENx is near"]
    assert (stopped, tail) == (False, "")


def test_stop_spanning_pieces_is_cut_and_never_released() -> None:
    released, stopped, _ = feed_all(("\nUser:",), ["Hi there", "\nUs", "er: more"])
    assert "".join(released) == "Hi there"
    assert stopped


def test_earliest_of_several_stops_wins() -> None:
    released, stopped, _ = feed_all(("cat", "a c"), ["I saw a cat"])
    assert released == ["I saw "]
    assert stopped


def test_held_tail_is_flushed_when_generation_ends() -> None:
    released, stopped, tail = feed_all(("###",), ["answer #", "#"])
    assert released == ["answer ", ""]
    assert (stopped, tail) == (False, "##")


def test_empty_stop_string_is_ignored() -> None:
    assert feed_all(("",), ["abc"]) == (["abc"], False, "")
