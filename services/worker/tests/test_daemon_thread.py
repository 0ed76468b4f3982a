import asyncio
import subprocess
import sys
import textwrap
import threading

import pytest
from shoal_worker.downloads.daemon_thread import in_daemon_thread


def _divide(numerator: int, denominator: int = 1) -> float:
    return numerator / denominator


async def test_the_result_comes_back() -> None:
    assert await in_daemon_thread(_divide, 6, denominator=3) == 2.0


async def test_an_exception_comes_back_as_itself() -> None:
    with pytest.raises(ZeroDivisionError):
        await in_daemon_thread(_divide, 1, 0)


async def test_the_call_runs_on_a_daemon_thread() -> None:
    def describe() -> tuple[bool, bool]:
        current = threading.current_thread()
        return current.daemon, current is threading.main_thread()

    assert await in_daemon_thread(describe) == (True, False)


async def test_a_cancelled_wait_leaves_the_thread_to_finish_as_told() -> None:
    release = threading.Event()
    finished = threading.Event()

    def wait_for_release() -> None:
        release.wait()
        finished.set()

    waiting = asyncio.create_task(in_daemon_thread(wait_for_release))
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    release.set()
    assert await asyncio.to_thread(finished.wait, 10)


def test_a_process_exits_without_waiting_for_a_hung_call() -> None:
    """What `asyncio.to_thread` cannot do: its executor is joined at exit."""
    program = textwrap.dedent(
        """
        import asyncio, threading
        from shoal_worker.downloads.daemon_thread import in_daemon_thread

        async def main():
            hung = asyncio.create_task(in_daemon_thread(threading.Event().wait))
            await asyncio.sleep(0.1)
            hung.cancel()
            print("leaving", flush=True)

        asyncio.run(main())
        """
    )
    finished = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
    )
    assert (finished.returncode, finished.stdout, finished.stderr) == (0, "leaving\n", "")
