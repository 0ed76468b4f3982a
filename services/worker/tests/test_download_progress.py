"""Progress figures and the retry policy around hub calls (no network)."""

import httpx2
import pytest
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from shoal_worker.downloads.hub import MAX_ATTEMPTS, MAX_BACKOFF_SECONDS, retry_delay, with_retries
from shoal_worker.downloads.progress import DownloadProgress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def http_error(status: int, retry_after: str | None = None) -> HfHubHTTPError:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    request = httpx2.Request("GET", "http://hub.invalid/x")
    return HfHubHTTPError(
        f"{status}", response=httpx2.Response(status, headers=headers, request=request)
    )


def test_progress_counts_resumed_bytes_as_done_but_not_as_fetched() -> None:
    clock = Clock()
    progress = DownloadProgress(clock)
    progress.plan({"a.safetensors": 1000, "b.safetensors": 3000}, {"a.safetensors": 1000})
    progress.file_started("b.safetensors", initial=500, total=3000)
    first = progress.snapshot()
    assert (first.bytes_done, first.bytes_total) == (1500, 4000)
    assert first.eta_seconds is None
    clock.now += 2
    progress.add("b.safetensors", 1000)
    second = progress.snapshot()
    assert second.bytes_done == 2500
    assert second.bytes_per_second == pytest.approx(500.0)
    assert second.eta_seconds == pytest.approx(3.0)
    assert progress.fetched_bytes == 1000
    assert [(file.path, file.bytes_done) for file in second.files] == [
        ("a.safetensors", 1000),
        ("b.safetensors", 1500),
    ]


def test_a_restarted_file_goes_back_to_zero_and_done_files_to_their_size() -> None:
    progress = DownloadProgress(Clock())
    progress.plan({"a": 10}, {})
    progress.add("a", 10)
    progress.file_restarted("a")
    assert progress.snapshot().bytes_done == 0
    progress.file_done("a")
    assert progress.snapshot().bytes_done == 10


def test_retry_after_is_honoured_else_backoff_doubles_up_to_a_cap() -> None:
    assert retry_delay(1, "7") == 7.0
    assert [retry_delay(attempt, None) for attempt in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert retry_delay(20, None) == MAX_BACKOFF_SECONDS
    # An HTTP date is not a number of seconds: fall back to backoff.
    assert retry_delay(2, "Wed, 21 Oct 2015 07:28:00 GMT") == 2.0


def test_429_and_5xx_are_retried_with_the_servers_delay() -> None:
    failures = [http_error(429, "3"), http_error(503)]
    slept: list[float] = []

    def call() -> str:
        if failures:
            raise failures.pop(0)
        return "done"

    assert with_retries(call, sleep=slept.append) == "done"
    assert slept == [3.0, 2.0]


def test_a_failed_metadata_call_is_seen_through_its_wrapper() -> None:
    attempts: list[int] = []

    def call() -> str:
        attempts.append(1)
        if len(attempts) == 1:
            wrapper = LocalEntryNotFoundError("cannot reach the hub")
            wrapper.__cause__ = http_error(502)
            raise wrapper
        return "done"

    assert with_retries(call, sleep=lambda _seconds: None) == "done"
    assert len(attempts) == 2


def test_other_errors_and_exhausted_retries_are_raised() -> None:
    def unauthorized() -> str:
        raise http_error(401)

    with pytest.raises(HfHubHTTPError):
        with_retries(unauthorized, sleep=lambda _seconds: None)
    calls: list[int] = []

    def always_busy() -> str:
        calls.append(1)
        raise http_error(500)

    with pytest.raises(HfHubHTTPError):
        with_retries(always_busy, sleep=lambda _seconds: None)
    assert len(calls) == MAX_ATTEMPTS
