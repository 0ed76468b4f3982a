"""Time to first token and decode speed: a running node's HTTP API against raw mlx-lm.

    uv run python bench/chat_latency.py               # starts a node in a temporary home
    uv run python bench/chat_latency.py --url http://localhost:52415 --model-dir DIR

Both sides generate greedily from the same converted model with the same chat prompt, so
they produce the same tokens; the raw side runs `mlx_lm.stream_generate` in a subprocess
with the runner's environment (OpenBLAS preloaded on a Linux CPU), so the ratio measures what
Shoal's processes, NATS and HTTP cost on top of the engine.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import httpx

PROMPT: Final = (
    "Write a detailed story about a lighthouse keeper who finds a message in a bottle. "
    "Describe the sea, the weather, the keeper's daily routine and what the message says."
)
MODEL_ID: Final = "smollm2-135m"


def measure_http(base_url: str, max_tokens: int) -> dict[str, float]:
    body = {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": PROMPT}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first: float | None = None
    last = started
    completion_tokens = 0
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=600) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk: dict[str, Any] = json.loads(line.removeprefix("data: "))
            if "error" in chunk:
                raise RuntimeError(f"the node reported an error: {chunk['error']}")
            if chunk.get("usage"):
                completion_tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                if choice["delta"].get("content"):
                    now = time.perf_counter()
                    first = first if first is not None else now
                    last = now
    assert first is not None, "no content arrived"
    return {
        "ttft_s": first - started,
        "decode_tokens_per_s": (completion_tokens - 1) / (last - first),
        "completion_tokens": completion_tokens,
    }


def measure_raw(model_dir: str, max_tokens: int) -> dict[str, float]:
    """Runs in a subprocess with the runner's environment (see main)."""
    # mlx-lm's own `load` and `stream_generate`, behind the runner's typed wrappers.
    from shoal_shared.tasks import ChatMessage
    from shoal_worker.runner.mlx_bindings import (
        chat_prompt_tokens,
        load_lazily,
        materialize,
        stream_tokens,
    )

    loaded = load_lazily(Path(model_dir))
    materialize(loaded.model)
    prompt = chat_prompt_tokens(loaded.tokenizer, [ChatMessage(role="user", content=PROMPT)])

    def generate(limit: int) -> Iterator[object]:
        return stream_tokens(loaded, prompt, max_tokens=limit, temperature=0.0, top_p=1.0)

    for _ in generate(4):
        pass  # warm-up, as the runner warms up before it reports ready
    started = time.perf_counter()
    first: float | None = None
    last = started
    tokens = 0
    for _ in generate(max_tokens):
        now = time.perf_counter()
        first = first if first is not None else now
        last = now
        tokens += 1
    assert first is not None
    return {
        "ttft_s": first - started,
        "decode_tokens_per_s": (tokens - 1) / (last - first),
        "completion_tokens": tokens,
    }


def raw_in_subprocess(model_dir: str, max_tokens: int, runs: int) -> list[dict[str, float]]:
    from shoal_worker.runner.process import runner_environment

    output = subprocess.run(
        [
            sys.executable,
            __file__,
            "--raw",
            model_dir,
            "--max-tokens",
            str(max_tokens),
            "--runs",
            str(runs),
        ],
        env=runner_environment(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    results: list[dict[str, float]] = json.loads(output.strip().splitlines()[-1])
    return results


def start_node(home: Path, port: int) -> subprocess.Popen[bytes]:
    node = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shoal",
            "run",
            "--home",
            str(home),
            "--api-host",
            "127.0.0.1",
            "--api-port",
            str(port),
            "--nats-port",
            str(port + 1),
            "--leaf-port",
            str(port + 2),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            runners = httpx.get(f"http://127.0.0.1:{port}/state", timeout=5).json()["runners"]
            if any(runner["status"]["status"] == "ready" for runner in runners.values()):
                return node
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(0.5)
    node.terminate()
    raise RuntimeError("the node did not become ready in 180 s")


def median(results: list[dict[str, float]], key: str) -> float:
    return statistics.median(result[key] for result in results)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="a running node's API; default: start one")
    parser.add_argument("--model-dir", help="the converted model (default: the node's)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--port", type=int, default=53415)
    parser.add_argument("--raw", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.raw:
        print(
            json.dumps(
                [measure_raw(arguments.raw, arguments.max_tokens) for _ in range(arguments.runs)]
            )
        )
        return

    node: subprocess.Popen[bytes] | None = None
    with tempfile.TemporaryDirectory(prefix="shoal-bench-") as scratch:
        url = arguments.url
        model_dir = arguments.model_dir
        if url is None:
            home = Path(scratch) / "home"
            node = start_node(home, arguments.port)
            url = f"http://127.0.0.1:{arguments.port}"
            model_dir = model_dir or str(next((home / "models" / MODEL_ID).iterdir()))
        if model_dir is None:
            parser.error("--model-dir is needed with --url")
        try:
            measure_http(url, 8)  # warm-up
            node_results = [measure_http(url, arguments.max_tokens) for _ in range(arguments.runs)]
        finally:
            if node is not None:
                node.terminate()
                node.wait(timeout=60)
        raw_results = raw_in_subprocess(model_dir, arguments.max_tokens, arguments.runs)

    node_summary = {key: median(node_results, key) for key in node_results[0]}
    raw_summary = {key: median(raw_results, key) for key in raw_results[0]}
    ratio_decode = node_summary["decode_tokens_per_s"] / raw_summary["decode_tokens_per_s"]
    ratio_ttft = node_summary["ttft_s"] / raw_summary["ttft_s"]
    print(f"{'':12} {'TTFT (s)':>10} {'decode tok/s':>14} {'tokens':>8}")
    for label, row in (("node (HTTP)", node_summary), ("raw mlx-lm", raw_summary)):
        ttft, speed, tokens = row["ttft_s"], row["decode_tokens_per_s"], row["completion_tokens"]
        print(f"{label:12} {ttft:>10.3f} {speed:>14.2f} {tokens:>8.0f}")
    print(f"decode ratio node/raw: {ratio_decode:.3f} (target >= 0.9)")
    print(f"TTFT ratio node/raw: {ratio_ttft:.2f}")
    summary = {
        "prompt": PROMPT,
        "max_tokens": arguments.max_tokens,
        "runs": arguments.runs,
        "node": node_summary,
        "raw_mlx_lm": raw_summary,
        "decode_ratio": ratio_decode,
        "ttft_ratio": ratio_ttft,
    }
    results_dir = Path(__file__).parent / "results"
    results_dir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (results_dir / f"chat_latency-{stamp}.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
