"""The checks a sharded runner makes before it loads anything: fast, no model, no MLX group."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest
from shoal_shared.ids import RunnerId
from shoal_worker.runner.distributed import RingFormationError, join_ring, spec_problem
from shoal_worker.runner.pipeline import pipeline_problem
from shoal_worker.runner.protocol import RunnerSpec
from shoal_worker.runner.tensor import tensor_problem

SMOLLM2_CONFIG: dict[str, object] = {
    "model_type": "llama",
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "intermediate_size": 1536,
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def spec(**overrides: Any) -> RunnerSpec:
    fields: dict[str, Any] = {
        "runner_id": RunnerId("runner-check"),
        "model_dir": "/nonexistent",
        "rank": 0,
        "world_size": 2,
        "start_layer": 0,
        "end_layer": 15,
        "layer_count": 30,
        "ring_hosts": ("127.0.0.1:5001", "127.0.0.1:5002"),
    }
    fields.update(overrides)
    return RunnerSpec.model_validate(fields)


def test_a_valid_pipeline_spec_has_no_problem() -> None:
    assert spec_problem(spec()) is None
    assert spec_problem(spec(rank=1, start_layer=15, end_layer=30)) is None
    assert spec_problem(spec(world_size=1, end_layer=30, ring_hosts=())) is None


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"ring_hosts": ()}, "not supported without one ring address per rank"),
        ({"ring_hosts": ("127.0.0.1:5001", "no-port")}, "not of the form ip:port"),
        ({"rank": 2}, "out of range"),
        ({"end_layer": 31}, "does not fit"),
        ({"world_size": 1, "ring_hosts": ()}, "must hold every layer"),
        ({"sharding": "tensor"}, "partial range"),
    ],
)
def test_spec_problems_are_named(overrides: dict[str, Any], expected: str) -> None:
    problem = spec_problem(spec(**overrides))
    assert problem is not None
    assert expected in problem


def test_tensor_parallelism_needs_head_counts_that_divide() -> None:
    assert tensor_problem(SMOLLM2_CONFIG, 3) is None
    problem = tensor_problem(SMOLLM2_CONFIG, 2)
    assert problem is not None
    assert "attention heads 9, key/value heads 3" in problem
    assert "intermediate size" not in problem


def test_pipeline_parallelism_is_for_llama_models() -> None:
    assert pipeline_problem(SMOLLM2_CONFIG) is None
    problem = pipeline_problem({**SMOLLM2_CONFIG, "model_type": "qwen2"})
    assert problem is not None
    assert "qwen2" in problem


def join_both(first: RunnerSpec, second: RunnerSpec) -> list[str]:
    """Both ranks' rendezvous on threads; each must fail (before MLX is ever called)."""
    failures: list[str] = []

    def join(rank_spec: RunnerSpec) -> None:
        try:
            join_ring(rank_spec)
        except RingFormationError as error:
            failures.append(str(error))

    threads = [threading.Thread(target=join, args=(rank_spec,)) for rank_spec in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(failures) == 2
    return failures


def test_rendezvous_refuses_pipeline_ranges_that_do_not_tile_the_layers() -> None:
    hosts = (f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}")
    rank_zero = spec(ring_hosts=hosts, end_layer=15, connect_timeout_s=2.0)
    # Rank 1 starts at 16: layer 15 would be on no rank.
    rank_one = spec(ring_hosts=hosts, rank=1, start_layer=16, end_layer=30, connect_timeout_s=2.0)
    started = time.monotonic()
    failures = join_both(rank_zero, rank_one)
    assert all("not contiguous" in failure for failure in failures)
    assert time.monotonic() - started < 10


def test_rendezvous_refuses_a_peer_of_another_group() -> None:
    hosts = (f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}")
    rank_zero = spec(ring_hosts=hosts, connect_timeout_s=2.0)
    # A rank 1 whose model has another layer count belongs to some other group.
    stranger = spec(
        ring_hosts=hosts,
        rank=1,
        start_layer=15,
        end_layer=31,
        layer_count=31,
        connect_timeout_s=2.0,
    )
    failures = join_both(rank_zero, stranger)
    assert all("another group" in failure for failure in failures)
