"""Keeping the ranks of a ring group in step while they generate.

Every rank runs the same stock mlx-lm generation loop, and every step holds collectives (the
pipeline's send/recv/all_gather, tensor parallelism's all_sums) that complete only when every
rank issues the same ones in the same order. So whatever ends or skips work must be decided
identically on every rank at the same step. Rank 0 decides, and its decisions travel inside
collectives the ranks perform anyway:

- Before each task, `agree_on_task` all-gathers (task fingerprint, prepared, cancel) from every
  rank. All ranks must be on the same task (otherwise the group is out of step: fatal); a task
  that some rank could not prepare fails everywhere; rank 0's cancel (a Cancel that arrived while
  the task was queued, or a shutdown) skips it everywhere.
- Each sampled token is all-summed with only rank 0 contributing: every rank continues with rank
  0's token (so unseeded sampling, or float differences between unlike machines, cannot split
  the group), and the same all_sum carries rank 0's stop flag. A Cancel that reaches the ranks at
  different tokens is therefore applied everywhere at the one token whose sample carried it.

A dead peer makes the next collective raise, but a stalled peer blocks it forever, and another
collective after a failure may hang (DESIGN §7). So any failure ends the runner
(GroupBrokenError), and a watchdog ends it when a step makes no progress for step_timeout_s.
MLX's eval and `item()` release the GIL while they wait, so the watchdog thread usually runs
and reports a clear reason; but some MLX calls wait holding the GIL (`mx.clear_cache()`, which
mlx-lm calls after the first token, blocks behind a stalled collective), so the watchdog also
keeps `faulthandler`'s native timer (a C thread) armed a little later: it dumps the stacks and
exits with code 1 when no Python thread can run any more.
"""

from __future__ import annotations

import contextlib
import faulthandler
import threading
import time
import zlib
from collections.abc import Callable, Generator
from typing import Final, Literal, cast, final

import mlx.core as mx

from shoal_worker.runner.mlx_bindings import GENERATION_STREAM, Sampler, evaluate

_WATCH_INTERVAL_S: Final = 0.25
# The native backstop fires this long after the Python watchdog would have, and is re-armed
# only when the deadline moved by more than _REARM_S (re-arming starts a C thread).
_NATIVE_GRACE_S: Final = 3.0
_REARM_S: Final = 1.0
_AGREEMENT_FIELDS: Final = 3

TaskAgreement = Literal["run", "cancelled", "failed"]


class GroupBrokenError(Exception):
    """The ring group can no longer be trusted to be in step: the runner must exit."""


@final
class Watchdog:
    """Ends the process when a guarded phase stops progressing.

    Twice over: its thread calls `on_expiry` (which reports why, then exits) after the
    phase's timeout, and `faulthandler`'s native timer, kept a grace period later, exits
    even when no Python thread can run. The guard itself arms the native timer, so a phase
    that blocks holding the GIL from its first instant is covered too.
    """

    def __init__(self, on_expiry: Callable[[str], None]) -> None:
        self._on_expiry = on_expiry
        self._lock = threading.Lock()
        self._phase: str | None = None
        self._timeout_s = 0.0
        self._last_progress = time.monotonic()
        self._native_deadline: float | None = None
        self._thread = threading.Thread(target=self._watch, name="ring-watchdog", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def guard(self, phase: str, timeout_s: float) -> Generator[None, None, None]:
        """Guard a phase; guards nest, and leaving one re-arms the enclosing one afresh."""
        with self._lock:
            enclosing = (self._phase, self._timeout_s)
            self._arm_locked(phase, timeout_s)
        try:
            yield
        finally:
            with self._lock:
                self._arm_locked(*enclosing)

    def progress(self) -> None:
        # Called once per token: a float store is atomic under the GIL, no lock needed.
        self._last_progress = time.monotonic()

    def _arm_locked(self, phase: str | None, timeout_s: float) -> None:
        self._phase = phase
        self._timeout_s = timeout_s
        self._last_progress = time.monotonic()
        if phase is None:
            faulthandler.cancel_dump_traceback_later()
            self._native_deadline = None
        else:
            self._arm_native_locked(self._last_progress + timeout_s + _NATIVE_GRACE_S)

    def _arm_native_locked(self, deadline: float) -> None:
        faulthandler.dump_traceback_later(max(0.0, deadline - time.monotonic()), exit=True)
        self._native_deadline = deadline

    def _watch(self) -> None:
        while True:
            time.sleep(_WATCH_INTERVAL_S)
            with self._lock:
                phase = self._phase
                timeout_s = self._timeout_s
                last_progress = self._last_progress
                if phase is None:
                    continue
                if time.monotonic() - last_progress <= timeout_s:
                    # Progress moves the native deadline on (re-arming starts a C thread,
                    # so only once it moved by more than _REARM_S).
                    deadline = last_progress + timeout_s + _NATIVE_GRACE_S
                    if abs(deadline - (self._native_deadline or 0.0)) > _REARM_S:
                        self._arm_native_locked(deadline)
                    continue
            self._on_expiry(
                f"no progress for {timeout_s:g} s while {phase}: a rank of the ring group"
                " has stalled or died"
            )
            return


@final
class StepConsensus:
    """Rank 0's token and stop flag, shared through one all_sum per generated token."""

    def __init__(
        self,
        group: mx.distributed.Group,
        stop_requested: Callable[[], bool],
        progress: Callable[[], None],
    ) -> None:
        self._group = group
        self._is_leader = group.rank() == 0
        self._stop_requested = stop_requested
        self._progress = progress
        # One entry per sampler call: [token, stop flag] as every rank received it. mlx-lm
        # calls the sampler once for the prompt and once per following token, so entry i
        # belongs to the i-th response of `stream_generate`.
        self._shared_steps: list[mx.array] = []

    def wrap(self, sampler: Sampler) -> Sampler:
        def shared_sampler(logprobs: mx.array) -> mx.array:
            # One token id per sequence: shape (1,) for the one sequence generated here.
            token = sampler(logprobs).astype(mx.int32)
            stop = int(self._is_leader and self._stop_requested())
            contribution = mx.concatenate([token, mx.array([stop], dtype=mx.int32)])
            if not self._is_leader:
                # Zero, but still computed from the logits: every rank must evaluate the
                # same collectives (the pipeline's all_gather feeds the logits).
                contribution = contribution * 0
            shared = mx.distributed.all_sum(contribution, group=self._group)
            self._shared_steps.append(shared)
            return shared[:-1]

        return shared_sampler

    def stop_decided(self, response_index: int) -> bool:
        """Whether rank 0 flagged a stop with the token of this response (same on all ranks)."""
        self._progress()
        if response_index >= len(self._shared_steps):
            return False
        # Already computed: the response's token was read from this very array.
        shared = cast("list[int]", self._shared_steps[response_index].tolist())
        return shared[-1] != 0


@final
class RingLockstep:
    """What the generation engine needs to keep its rank in step with the others."""

    def __init__(
        self,
        group: mx.distributed.Group,
        watchdog: Watchdog,
        *,
        step_timeout_s: float,
        peer_load_timeout_s: float,
    ) -> None:
        self._group = group
        self._watchdog = watchdog
        self._step_timeout_s = step_timeout_s
        self._peer_load_timeout_s = peer_load_timeout_s

    @property
    def rank(self) -> int:
        return self._group.rank()

    @property
    def is_leader(self) -> bool:
        return self._group.rank() == 0

    def guard(self, phase: str) -> contextlib.AbstractContextManager[None]:
        """Collectives inside must keep making progress, or the watchdog ends the runner."""
        return self._watchdog.guard(phase, self._step_timeout_s)

    def progress(self) -> None:
        self._watchdog.progress()

    def wait_for_peers(self) -> None:
        """A barrier after loading: ranks load at different speeds, then run in step."""
        with self._watchdog.guard("waiting for the other ranks to load", self._peer_load_timeout_s):
            barrier = mx.distributed.all_sum(
                mx.array([1], dtype=mx.int32), group=self._group, stream=GENERATION_STREAM
            )
            _evaluate_collective(barrier, "the post-load barrier")

    def agree_on_task(self, task_id: str, *, prepared: bool, cancel: bool) -> TaskAgreement:
        """Whether every rank runs, skips (rank 0 cancelled) or fails this task."""
        fingerprint = zlib.crc32(task_id.encode()) & 0x7FFFFFFF
        mine = mx.array([fingerprint, int(prepared), int(cancel)], dtype=mx.int32)
        with self.guard(f"agreeing to start task {task_id}"):
            gathered = mx.distributed.all_gather(mine, group=self._group, stream=GENERATION_STREAM)
            _evaluate_collective(gathered, f"agreeing to start task {task_id}")
        values = cast("list[int]", gathered.tolist())
        rows = [
            values[index : index + _AGREEMENT_FIELDS]
            for index in range(0, len(values), _AGREEMENT_FIELDS)
        ]
        for rank, (other_fingerprint, _, _) in enumerate(rows):
            if other_fingerprint != fingerprint:
                raise GroupBrokenError(
                    f"rank {rank} is on another task than task {task_id} on rank"
                    f" {self.rank}: the ring group is out of step"
                )
        if rows[0][2]:
            return "cancelled"
        return "run" if all(row[1] for row in rows) else "failed"

    def step_consensus(self, stop_requested: Callable[[], bool]) -> StepConsensus:
        return StepConsensus(self._group, stop_requested, self._watchdog.progress)


def _evaluate_collective(array: mx.array, what: str) -> None:
    try:
        evaluate(array)
    except RuntimeError as error:
        raise GroupBrokenError(f"the ring group broke while {what}: {error}") from error
