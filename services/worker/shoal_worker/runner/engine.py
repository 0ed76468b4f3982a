"""The generation engine: loads one model and serves chat generations one at a time.

It knows nothing of processes or sockets: it reports everything through an `emit` callback,
so tests drive it in-process. Requests are queued FIFO and served one at a time on the thread
that calls `serve_forever`; `submit`, `cancel` and `request_shutdown` may come from any thread.
Continuous batching of concurrent requests with mlx-lm's `BatchGenerator` is the planned next
step; it will replace `_generate` without changing this class's interface.

In a ring group (world_size > 1) every rank runs this engine on the same requests, and a
`RingLockstep` keeps them in step (see `lockstep`): rank 0 decides cancellations, every rank
emits the same tokens (the worker forwards rank 0's), and any failure is fatal to the runner
(`GroupBrokenError` leaves `serve_forever`), because a rank that falls out of step would leave
its peers waiting in a collective.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Final, final

from shoal_shared.chunks import FinishReason, Usage
from shoal_shared.ids import TaskId
from shoal_shared.runner_status import (
    RunnerLoaded,
    RunnerLoading,
    RunnerReady,
    RunnerRunning,
    RunnerStatus,
    RunnerWarmingUp,
)
from shoal_shared.tasks import ChatMessage

from shoal_worker.runner.lockstep import GroupBrokenError, RingLockstep, StepConsensus
from shoal_worker.runner.mlx_bindings import (
    LoadedModel,
    chat_prompt_tokens,
    load_lazily,
    materialize,
    seed_random,
    stream_tokens,
)
from shoal_worker.runner.protocol import (
    Generate,
    RunnerMessage,
    StatusUpdate,
    TaskDone,
    TaskFailed,
    TokenOutput,
)
from shoal_worker.runner.stop_sequences import StopSequenceFilter

logger = logging.getLogger(__name__)

RunnerMessageSink = Callable[[RunnerMessage], None]

# Without an explicit max_tokens a request may fill the context window, but a runaway
# generation should not hold the runner for tens of thousands of tokens.
DEFAULT_MAX_TOKENS_CAP: Final = 4096
_WARM_UP_MESSAGES: Final = (ChatMessage(role="user", content="Hi"),)


class LoadInterruptedError(Exception):
    """The runner was asked to stop (or its worker vanished) while loading the model."""


@final
class GenerationEngine:
    def __init__(
        self,
        emit: RunnerMessageSink,
        *,
        max_tokens_cap: int = DEFAULT_MAX_TOKENS_CAP,
        lockstep: RingLockstep | None = None,
    ) -> None:
        self._emit = emit
        self._max_tokens_cap = max_tokens_cap
        self._lockstep = lockstep
        self._lock = threading.Lock()
        self._work_available = threading.Condition(self._lock)
        self._model: LoadedModel | None = None
        self._queue: deque[Generate] = deque()
        self._current_task_id: TaskId | None = None
        # Read without the lock on every token: a set lookup is atomic under the GIL.
        self._cancelled: set[TaskId] = set()
        self._shutting_down = False
        # Set when the ring group broke: the runner is about to report failed, never ready.
        self._group_broken = False
        self._last_status: RunnerStatus | None = None

    def join_group(self, lockstep: RingLockstep) -> None:
        """Run in step with the other ranks of a ring group; call before `load`."""
        with self._lock:
            if self._model is not None:
                raise RuntimeError("a loaded engine cannot join a ring group")
            self._lockstep = lockstep

    def load(self, model_dir: Path, loader: Callable[[Path], LoadedModel] = load_lazily) -> None:
        """Load layer by layer (reporting progress), warm up, then report ready.

        `loader` builds the model lazily; a sharded one returns only this rank's layers.
        """
        loaded = loader(model_dir)
        layers_total = len(loaded.layers)
        self._set_status(RunnerLoading(layers_loaded=0, layers_total=layers_total))
        for layers_loaded, layer in enumerate(loaded.layers, start=1):
            if self._shutting_down:
                raise LoadInterruptedError
            materialize(layer)
            self._set_status(RunnerLoading(layers_loaded=layers_loaded, layers_total=layers_total))
        # The embedding and final norm live outside the layers; evaluated layers cost nothing.
        materialize(loaded.model)
        self._set_status(RunnerLoaded())
        self._set_status(RunnerWarmingUp())
        if self._lockstep is None:
            self._warm_up(loaded, None)
        else:
            self._lockstep.wait_for_peers()
            with self._lockstep.guard("warming up"):
                self._warm_up(loaded, self._lockstep.step_consensus(lambda: False))
        with self._lock:
            self._model = loaded
            self._publish_activity_locked()

    def submit(self, request: Generate) -> None:
        with self._lock:
            if self._shutting_down:
                self._emit(TaskFailed(task_id=request.task_id, message="the runner is stopping"))
                return
            if request.task_id == self._current_task_id or any(
                queued.task_id == request.task_id for queued in self._queue
            ):
                message = f"task {request.task_id} is already queued or running on this runner"
                self._emit(TaskFailed(task_id=request.task_id, message=message))
                return
            self._queue.append(request)
            self._publish_activity_locked()
            self._work_available.notify()

    def cancel(self, task_id: TaskId) -> None:
        """End a queued task at once, or the running one before its next token.

        In a ring group a queued task stays queued, marked: it must reach `agree_on_task` on
        every rank, where rank 0's mark skips it everywhere.
        """
        with self._lock:
            if task_id == self._current_task_id:
                self._cancelled.add(task_id)
                return
            for queued in self._queue:
                if queued.task_id == task_id and self._lockstep is not None:
                    self._cancelled.add(task_id)
                    return
                if queued.task_id == task_id:
                    self._queue.remove(queued)
                    no_usage = Usage(prompt_tokens=0, completion_tokens=0)
                    self._emit(TaskDone(task_id=task_id, finish_reason="cancelled", usage=no_usage))
                    self._publish_activity_locked()
                    return
        # Unknown ids are tasks that already finished: the cancel crossed their TaskDone.

    def request_shutdown(self) -> None:
        """Stop after the current token; queued tasks fail, `serve_forever` returns."""
        with self._lock:
            self._shutting_down = True
            self._work_available.notify_all()

    def serve_forever(self) -> None:
        """Serve queued requests until `request_shutdown` (or a GroupBrokenError)."""
        try:
            while (request := self._next_request(wait=True)) is not None:
                self._serve(request)
        finally:
            with self._lock:
                # Also refuses what arrives from now on, when a broken group ends the runner.
                self._shutting_down = True
                abandoned = list(self._queue)
                self._queue.clear()
            for request in abandoned:
                self._emit(TaskFailed(task_id=request.task_id, message="the runner is stopping"))

    def serve_pending(self) -> None:
        """Serve what is queued now and return: for tests and tools driving it in-process."""
        while (request := self._next_request(wait=False)) is not None:
            self._serve(request)

    def _next_request(self, *, wait: bool) -> Generate | None:
        with self._work_available:
            while wait and not self._queue and not self._shutting_down:
                self._work_available.wait()
            if self._shutting_down or not self._queue or self._model is None:
                return None
            request = self._queue.popleft()
            # The active count is unchanged (queued -> running), so there is no status to send.
            self._current_task_id = request.task_id
            return request

    def _serve(self, request: Generate) -> None:
        lockstep = self._lockstep
        try:
            if lockstep is None:
                self._generate(request, None)
            else:
                with lockstep.guard(f"generating task {request.task_id}"):
                    self._generate(request, lockstep)
        except GroupBrokenError as error:
            self._group_broken = True
            self._emit(TaskFailed(task_id=request.task_id, message=str(error)))
            raise
        except Exception as error:
            if lockstep is not None:
                # The peers may be inside a collective this rank will never join.
                self._group_broken = True
                message = f"generation of task {request.task_id} failed on rank {lockstep.rank}"
                self._emit(TaskFailed(task_id=request.task_id, message=f"{message}: {error}"))
                raise GroupBrokenError(f"{message}, so the ring group is out of step") from error
            # A bad request or an MLX error fails that task; the runner keeps serving.
            logger.exception("generation of task %s failed", request.task_id)
            self._emit(TaskFailed(task_id=request.task_id, message=f"generation failed: {error}"))
        finally:
            with self._lock:
                self._current_task_id = None
                self._cancelled.discard(request.task_id)
                self._publish_activity_locked()

    def _stop_requested(self, task_id: TaskId) -> bool:
        return task_id in self._cancelled or self._shutting_down

    def _generate(self, request: Generate, lockstep: RingLockstep | None) -> None:
        loaded = self._model
        assert loaded is not None, "requests are only taken once the model is loaded"
        task_id = request.task_id
        sampling = request.sampling
        prepared = self._prompt_and_token_limit(loaded, request)
        consensus: StepConsensus | None = None
        if lockstep is not None:
            agreement = lockstep.agree_on_task(
                task_id,
                prepared=not isinstance(prepared, str),
                cancel=self._stop_requested(task_id),
            )
            if agreement == "cancelled":
                no_usage = Usage(prompt_tokens=0, completion_tokens=0)
                self._emit(TaskDone(task_id=task_id, finish_reason="cancelled", usage=no_usage))
                return
            if agreement == "failed" and not isinstance(prepared, str):
                prepared = "the task could not be prepared on another rank of the group"
            consensus = lockstep.step_consensus(lambda: self._stop_requested(task_id))
        if isinstance(prepared, str):
            self._emit(TaskFailed(task_id=task_id, message=prepared))
            return
        prompt, max_tokens = prepared
        if sampling.seed is not None:
            seed_random(sampling.seed)
        stop_filter = StopSequenceFilter(sampling.stop)
        emit = self._emit
        cancelled = self._cancelled
        unreleased_token_ids: list[int] = []
        completion_tokens = 0
        finish_reason: FinishReason = "length"
        responses = stream_tokens(
            loaded,
            prompt,
            max_tokens=max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            wrap_sampler=None if consensus is None else consensus.wrap,
            on_prompt_progress=None if lockstep is None else _progress_callback(lockstep),
        )
        try:
            # The hot loop: keep it to a few attribute reads and one message per token.
            for index, response in enumerate(responses):
                if (
                    consensus.stop_decided(index)
                    if consensus is not None
                    else task_id in cancelled or self._shutting_down
                ):
                    finish_reason = "cancelled"
                    break
                if response.finish_reason == "stop":
                    # mlx-lm's last response for an end-of-sequence token: the token is not
                    # output, but its text may hold the detokenizer's final bytes.
                    finish_reason = "stop"
                else:
                    completion_tokens += 1
                    unreleased_token_ids.append(response.token)
                released, stopped = stop_filter.feed(response.text)
                if released:
                    emit(
                        TokenOutput(
                            task_id=task_id, text=released, token_ids=(*unreleased_token_ids,)
                        )
                    )
                    unreleased_token_ids.clear()
                if stopped:
                    finish_reason = "stop"
                    break
            else:
                held_tail = stop_filter.flush()
                if held_tail or unreleased_token_ids:
                    emit(
                        TokenOutput(
                            task_id=task_id, text=held_tail, token_ids=(*unreleased_token_ids,)
                        )
                    )
        finally:
            # Ends mlx-lm's generator now rather than at garbage collection.
            responses.close()
        usage = Usage(prompt_tokens=len(prompt), completion_tokens=completion_tokens)
        emit(TaskDone(task_id=task_id, finish_reason=finish_reason, usage=usage))

    def _prompt_and_token_limit(
        self, loaded: LoadedModel, request: Generate
    ) -> tuple[list[int], int] | str:
        """The prompt's token ids and how many tokens may follow, or why the request fails."""
        try:
            prompt = chat_prompt_tokens(loaded.tokenizer, request.messages)
        except Exception as error:
            return f"could not apply the model's chat template: {error}"
        room = loaded.context_length - len(prompt)
        if room < 1:
            return (
                f"the prompt is {len(prompt)} tokens long but the model's context window"
                f" holds {loaded.context_length} tokens"
            )
        return prompt, min(request.sampling.max_tokens or self._max_tokens_cap, room)

    def _warm_up(self, loaded: LoadedModel, consensus: StepConsensus | None) -> None:
        """A two-token generation, so the first client request does not pay for first use.

        In a ring group the tokens are shared too: ranks that stopped at different tokens
        would have issued different numbers of collectives.
        """
        prompt = chat_prompt_tokens(loaded.tokenizer, _WARM_UP_MESSAGES)
        wrap_sampler = None if consensus is None else consensus.wrap
        responses = stream_tokens(
            loaded, prompt, max_tokens=2, temperature=0.0, top_p=1.0, wrap_sampler=wrap_sampler
        )
        for _ in responses:
            pass

    def _publish_activity_locked(self) -> None:
        if self._model is None or self._group_broken:
            return
        active_tasks = len(self._queue) + (self._current_task_id is not None)
        status = RunnerRunning(active_tasks=active_tasks) if active_tasks else RunnerReady()
        self._set_status_locked(status)

    def _set_status(self, status: RunnerStatus) -> None:
        with self._lock:
            self._set_status_locked(status)

    def _set_status_locked(self, status: RunnerStatus) -> None:
        # Emitting under the engine lock keeps status updates in the order they happened.
        if status != self._last_status:
            self._last_status = status
            self._emit(StatusUpdate(status=status))


def _progress_callback(lockstep: RingLockstep) -> Callable[[int, int], None]:
    """Each prefill chunk counts as progress for the watchdog."""

    def on_prompt_progress(_processed: int, _total: int) -> None:
        lockstep.progress()

    return on_prompt_progress
