"""The generation engine in-process, on the bundled SmolLM2 model (CPU, small max_tokens)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import final

import pytest
from shoal_shared.chunks import Usage
from shoal_shared.ids import TaskId
from shoal_shared.runner_status import (
    RunnerLoaded,
    RunnerLoading,
    RunnerReady,
    RunnerRunning,
    RunnerStatus,
    RunnerWarmingUp,
)
from shoal_shared.tasks import ChatMessage, SamplingParameters
from shoal_worker.models.default_model import ensure_default_model
from shoal_worker.runner.engine import GenerationEngine
from shoal_worker.runner.protocol import (
    Generate,
    RunnerMessage,
    StatusUpdate,
    TaskDone,
    TaskFailed,
    TokenOutput,
)

CAPITAL_QUESTION = (ChatMessage(role="user", content="What is the capital of France?"),)
# Short prompts (an empty system message replaces the template's default one): without
# OpenBLAS preloaded into the test process, CPU prefill runs at only ~13 tokens/s.
STORY_REQUEST = (
    ChatMessage(role="system", content=""),
    ChatMessage(role="user", content="Tell a story."),
)


@final
@dataclass
class RecordingSink:
    """Collects what the engine emits; `on_message` lets a test react mid-generation."""

    messages: list[RunnerMessage] = field(default_factory=lambda: [])
    on_message: Callable[[RunnerMessage], None] | None = None

    def __call__(self, message: RunnerMessage) -> None:
        self.messages.append(message)
        if self.on_message is not None:
            self.on_message(message)

    def statuses(self) -> list[RunnerStatus]:
        return [m.status for m in self.messages if isinstance(m, StatusUpdate)]


@final
@dataclass(frozen=True)
class TaskResult:
    text: str
    token_ids: tuple[int, ...]
    outcome: TaskDone | TaskFailed


@final
@dataclass(frozen=True)
class LoadedEngine:
    engine: GenerationEngine
    sink: RecordingSink
    load_statuses: tuple[RunnerStatus, ...]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One directory for both runner test modules: the conversion is idempotent, so whichever
    # module runs second reuses the first one's output instead of converting again.
    return ensure_default_model(tmp_path_factory.getbasetemp() / "runner-models")


@pytest.fixture(scope="module")
def loaded(model_dir: Path) -> LoadedEngine:
    sink = RecordingSink()
    engine = GenerationEngine(sink)
    engine.load(model_dir)
    return LoadedEngine(engine, sink, tuple(sink.statuses()))


@pytest.fixture
def engine(loaded: LoadedEngine) -> Iterator[GenerationEngine]:
    loaded.sink.messages.clear()
    yield loaded.engine
    loaded.sink.on_message = None


_task_numbers = iter(range(1_000_000))


def generate(
    loaded: LoadedEngine,
    sampling: SamplingParameters,
    messages: tuple[ChatMessage, ...] = CAPITAL_QUESTION,
) -> TaskResult:
    task_id = TaskId(f"task-{next(_task_numbers)}")
    loaded.engine.submit(Generate(task_id=task_id, messages=messages, sampling=sampling))
    loaded.engine.serve_pending()
    return result_of(loaded.sink, task_id)


def result_of(sink: RecordingSink, task_id: TaskId) -> TaskResult:
    tokens = [m for m in sink.messages if isinstance(m, TokenOutput) and m.task_id == task_id]
    outcomes = [
        m for m in sink.messages if isinstance(m, TaskDone | TaskFailed) and m.task_id == task_id
    ]
    assert len(outcomes) == 1, f"expected one outcome for {task_id}, got {outcomes}"
    return TaskResult(
        text="".join(token.text for token in tokens),
        token_ids=tuple(token_id for token in tokens for token_id in token.token_ids),
        outcome=outcomes[0],
    )


def finished(result: TaskResult) -> TaskDone:
    assert isinstance(result.outcome, TaskDone), result.outcome
    return result.outcome


def test_loading_reports_every_layer_then_loaded_warming_up_ready(loaded: LoadedEngine) -> None:
    statuses = loaded.load_statuses
    layers_total = 30  # SmolLM2-135M
    expected_loading = [
        RunnerLoading(layers_loaded=k, layers_total=layers_total) for k in range(layers_total + 1)
    ]
    assert list(statuses[: layers_total + 1]) == expected_loading
    assert list(statuses[layers_total + 1 :]) == [RunnerLoaded(), RunnerWarmingUp(), RunnerReady()]


@pytest.fixture(scope="module")
def greedy_capital(loaded: LoadedEngine) -> TaskResult:
    return generate(loaded, SamplingParameters(temperature=0.0, max_tokens=16))


def test_greedy_answer_names_paris(greedy_capital: TaskResult) -> None:
    result = greedy_capital
    assert "Paris" in result.text
    done = finished(result)
    assert done.finish_reason == "stop"
    assert done.usage.prompt_tokens > 0
    assert done.usage.completion_tokens == len(result.token_ids)


def test_status_is_running_while_working_and_ready_after(
    engine: GenerationEngine, loaded: LoadedEngine
) -> None:
    generate(loaded, SamplingParameters(temperature=0.0, max_tokens=1), STORY_REQUEST)
    assert loaded.sink.statuses() == [RunnerRunning(active_tasks=1), RunnerReady()]


def test_same_seed_same_text_and_different_seeds_differ(
    engine: GenerationEngine, loaded: LoadedEngine
) -> None:
    def sampled(seed: int) -> str:
        sampling = SamplingParameters(temperature=1.0, max_tokens=8, seed=seed)
        return generate(loaded, sampling, STORY_REQUEST).text

    first = sampled(7)
    assert sampled(7) == first
    # Seeded sampling is deterministic, so "usually differ" is checked once, for good.
    assert sampled(8) != first


def test_stop_sequence_spanning_tokens_never_appears(
    engine: GenerationEngine, loaded: LoadedEngine, greedy_capital: TaskResult
) -> None:
    greedy = greedy_capital.text
    stop = "France is"  # " France" and " is" are separate tokens
    assert stop in greedy
    result = generate(loaded, SamplingParameters(temperature=0.0, max_tokens=16, stop=(stop,)))
    assert result.text == greedy[: greedy.index(stop)]
    assert stop not in result.text
    assert finished(result).finish_reason == "stop"


def test_max_tokens_finishes_with_length_and_exact_count(
    engine: GenerationEngine, loaded: LoadedEngine
) -> None:
    result = generate(loaded, SamplingParameters(temperature=0.0, max_tokens=3), STORY_REQUEST)
    done = finished(result)
    assert done.finish_reason == "length"
    assert done.usage.completion_tokens == 3
    assert len(result.token_ids) == 3


def test_cancel_mid_generation_ends_with_cancelled(
    engine: GenerationEngine, loaded: LoadedEngine
) -> None:
    task_id = TaskId("task-cancel-running")

    def cancel_after_second_token(message: RunnerMessage) -> None:
        tokens = [m for m in loaded.sink.messages if isinstance(m, TokenOutput)]
        if isinstance(message, TokenOutput) and len(tokens) == 2:
            # From another thread, as the runner's reader thread would.
            canceller = threading.Thread(target=engine.cancel, args=(task_id,))
            canceller.start()
            canceller.join()

    loaded.sink.on_message = cancel_after_second_token
    sampling = SamplingParameters(temperature=0.0, max_tokens=12)
    engine.submit(Generate(task_id=task_id, messages=STORY_REQUEST, sampling=sampling))
    engine.serve_pending()
    result = result_of(loaded.sink, task_id)
    done = finished(result)
    assert done.finish_reason == "cancelled"
    assert done.usage.completion_tokens == 2


def test_cancel_of_a_queued_task_ends_it_at_once(
    engine: GenerationEngine, loaded: LoadedEngine
) -> None:
    task_id = TaskId("task-cancel-queued")
    sampling = SamplingParameters(temperature=0.0, max_tokens=4)
    engine.submit(Generate(task_id=task_id, messages=STORY_REQUEST, sampling=sampling))
    engine.cancel(task_id)
    result = result_of(loaded.sink, task_id)
    assert result.outcome == TaskDone(
        task_id=task_id,
        finish_reason="cancelled",
        usage=Usage(prompt_tokens=0, completion_tokens=0),
    )
    assert loaded.sink.statuses() == [RunnerRunning(active_tasks=1), RunnerReady()]
    engine.serve_pending()  # nothing left to serve
    assert not any(isinstance(m, TokenOutput) for m in loaded.sink.messages)


def test_prompt_longer_than_the_context_fails_the_task_not_the_engine(
    engine: GenerationEngine, loaded: LoadedEngine
) -> None:
    huge = (ChatMessage(role="user", content="word " * 9000),)
    failed = generate(loaded, SamplingParameters(temperature=0.0, max_tokens=4), huge)
    assert isinstance(failed.outcome, TaskFailed)
    assert "context window" in failed.outcome.message
    after = generate(loaded, SamplingParameters(temperature=0.0, max_tokens=2), STORY_REQUEST)
    assert finished(after).usage.completion_tokens == 2


def test_duplicate_task_id_is_refused(engine: GenerationEngine, loaded: LoadedEngine) -> None:
    task_id = TaskId("task-duplicate")
    request = Generate(
        task_id=task_id,
        messages=STORY_REQUEST,
        sampling=SamplingParameters(temperature=0.0, max_tokens=1),
    )
    engine.submit(request)
    engine.submit(request)
    failures = [m for m in loaded.sink.messages if isinstance(m, TaskFailed)]
    assert len(failures) == 1
    assert "already queued" in failures[0].message
    engine.serve_pending()
    done = [m for m in loaded.sink.messages if isinstance(m, TaskDone)]
    assert [m.task_id for m in done] == [task_id]
