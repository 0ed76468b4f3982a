"""`shoal models pull` of a hub model onto a real node, on a terminal (a pseudo-terminal): the
model is added from the (stand-in) hub, the progress bar moves while the bytes arrive, and
`shoal models list` then shows the files on the node, until `shoal models rm` deletes them."""

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Generator
from typing import Final

import pytest

from .hf_standin import HubStandIn, StandardRepos
from .node_harness import RunningNode, started_node

# Slow enough that the pull spans several of the worker's progress events (~1 per second).
HUB_BYTES_PER_SECOND: Final = 8 * 1024 * 1024
PULL_TIMEOUT_SECONDS: Final = 180.0
# rich's DownloadColumn: "12.3/45.6 MB" (the same unit on both sides below 1 GB).
DOWNLOADED: Final = re.compile(r"(\d+(?:\.\d+)?)/(\d+(?:\.\d+)?) MB")
ANSI_ESCAPE: Final = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def hub(standin_repos: StandardRepos) -> Generator[HubStandIn]:
    with HubStandIn(standin_repos.root, bytes_per_second=HUB_BYTES_PER_SECOND) as running:
        yield running


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, hub: HubStandIn) -> Generator[RunningNode]:
    home = tmp_path_factory.mktemp("models-pull-node")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_ENDPOINT", hub.url)
        patch.delenv("HF_HUB_OFFLINE", raising=False)
        with started_node(
            home,
            "--no-default-model",
            until=lambda running: running.wait_until(
                "the API", 60, lambda started: started.get("/healthz").status_code == 200
            ),
        ) as running:
            yield running


def cli_environment() -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("SHOAL_")}
    environment["TERM"] = "xterm-256color"
    return environment


def models_on_a_terminal(*arguments: str) -> tuple[int, str, str]:
    """Run `shoal models ...` with its stderr on a pseudo-terminal of 160 columns; returns the
    exit status, stdout, and everything the terminal received."""
    terminal, child_end = pty.openpty()
    fcntl.ioctl(child_end, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "shoal", "models", *arguments],
        stdout=subprocess.PIPE,
        stderr=child_end,
        stdin=subprocess.DEVNULL,
        env=cli_environment(),
    )
    os.close(child_end)
    received = bytearray()
    deadline = time.monotonic() + PULL_TIMEOUT_SECONDS
    try:
        while time.monotonic() < deadline:
            readable, _, _ = select.select([terminal], [], [], 0.5)
            if not readable:
                if process.poll() is not None:
                    break
                continue
            try:
                data = os.read(terminal, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not data:
                break
            received += data
        stdout_bytes, _ = process.communicate(timeout=30)
        returncode = process.returncode
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(terminal)
    return returncode, stdout_bytes.decode(), received.decode(errors="replace")


def models_on_a_pipe(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shoal", "models", *arguments],
        capture_output=True,
        text=True,
        env=cli_environment(),
        timeout=60,
        check=False,
    )


def test_pull_adds_the_model_shows_live_progress_and_list_shows_it(
    node: RunningNode, standin_repos: StandardRepos
) -> None:
    repo = standin_repos.split
    node_id = node.get("/node_id").json()["node_id"]

    returncode, stdout, terminal = models_on_a_terminal("pull", repo, "--api", node.base_url)

    assert returncode == 0, terminal
    added, done = stdout.splitlines()
    assert added.startswith(f"{repo}: added from the hub (30 layers, ")
    assert done.startswith(f"{repo}: on {node_id} (")
    directory = node.home / "models" / "hub" / repo
    assert done.endswith(f" at {directory}")
    assert len(list(directory.glob("*.safetensors"))) >= 2
    # A live bar: the terminal saw the bytes grow, frame after frame, to the whole model.
    frames = ANSI_ESCAPE.sub("", terminal)
    assert f"{repo} on {node_id}" in frames
    progress = [(float(done), float(total)) for done, total in DOWNLOADED.findall(frames)]
    assert progress, frames
    done_values = [value for value, _total in progress]
    assert len(set(done_values)) >= 3, progress
    assert done_values == sorted(done_values), progress
    assert progress[-1][0] == progress[-1][1], progress
    assert "MB/s" in frames

    listed = models_on_a_pipe("list", "--api", node.base_url)
    assert listed.returncode == 0, listed.stderr
    row = next(line.split() for line in listed.stdout.splitlines() if line.startswith(repo))
    assert row[2:] == [node_id, "completed", "—"], listed.stdout

    # Again: the files are there, nothing is fetched twice.
    again = models_on_a_pipe("pull", repo, "--api", node.base_url)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == [done]

    removed = models_on_a_pipe("rm", repo, "--api", node.base_url)
    assert removed.returncode == 0, removed.stderr
    assert not directory.exists()
    listed = models_on_a_pipe("list", "--api", node.base_url)
    row = next(line.split() for line in listed.stdout.splitlines() if line.startswith(repo))
    assert row[2:] == ["—", "—"], listed.stdout


def test_pull_of_a_repo_the_hub_lacks_is_one_line(node: RunningNode, hub: HubStandIn) -> None:
    result = models_on_a_pipe("pull", "org/no-such-model", "--api", node.base_url)
    assert result.returncode == 1, result
    assert result.stderr.splitlines() == [
        "shoal: org/no-such-model is not in the catalogue and could not be added from the hub: "
        f"no model repository org/no-such-model on {hub.url}"
    ]


def test_pull_of_an_unsupported_architecture_is_one_line(
    node: RunningNode, standin_repos: StandardRepos
) -> None:
    result = models_on_a_pipe("pull", standin_repos.unsupported, "--api", node.base_url)
    assert result.returncode == 1, result
    [line] = result.stderr.splitlines()
    assert line.startswith(f"shoal: {standin_repos.unsupported} is not in the catalogue")
    assert "is not supported by mlx-lm" in line
