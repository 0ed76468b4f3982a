"""Progress of one download, fed from the transfer threads and read by the event loop."""

import threading
import time
from collections.abc import Callable, Mapping
from typing import Final, final

from shoal_shared.downloads import DownloadOngoing, FileProgress

# Speed is averaged over roughly this window, so one slow chunk does not swing the ETA.
SPEED_WINDOW_SECONDS: Final = 5.0


@final
class DownloadProgress:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._files: dict[str, tuple[int, int]] = {}
        self._samples: list[tuple[float, int]] = []
        self.fetched_bytes = 0

    def plan(self, sizes: Mapping[str, int], present: Mapping[str, int]) -> None:
        """The files of this download and the bytes of each already on disk."""
        with self._lock:
            self._files = {path: (present.get(path, 0), size) for path, size in sizes.items()}

    def file_started(self, path: str, initial: int, total: int) -> None:
        with self._lock:
            _, planned = self._files.get(path, (0, total))
            self._files[path] = (initial, total or planned)

    def add(self, path: str, count: int) -> None:
        with self._lock:
            done, total = self._files.get(path, (0, 0))
            self._files[path] = (max(0, done + count), total)
            self.fetched_bytes += max(0, count)

    def file_done(self, path: str) -> None:
        with self._lock:
            _, total = self._files.get(path, (0, 0))
            self._files[path] = (total, total)

    def file_restarted(self, path: str) -> None:
        with self._lock:
            _, total = self._files.get(path, (0, 0))
            self._files[path] = (0, total)

    @property
    def bytes_total(self) -> int:
        with self._lock:
            return sum(total for _, total in self._files.values())

    def snapshot(self) -> DownloadOngoing:
        now = self._clock()
        with self._lock:
            done = sum(min(done, total) for done, total in self._files.values())
            total = sum(total for _, total in self._files.values())
            self._samples.append((now, self.fetched_bytes))
            while len(self._samples) > 2 and now - self._samples[1][0] >= SPEED_WINDOW_SECONDS:
                self._samples.pop(0)
            files = tuple(
                FileProgress(
                    path=path, bytes_done=min(file_done, file_total), bytes_total=file_total
                )
                for path, (file_done, file_total) in sorted(self._files.items())
            )
        first_time, first_bytes = self._samples[0]
        elapsed = now - first_time
        speed = (self.fetched_bytes - first_bytes) / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / speed if speed > 0 else None
        return DownloadOngoing(
            bytes_done=done,
            bytes_total=total,
            bytes_per_second=max(0.0, speed),
            eta_seconds=eta,
            files=files,
        )
