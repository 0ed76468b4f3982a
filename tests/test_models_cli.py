"""`shoal models`: run as a subprocess against one real node (offline, no model placed), and
its pure pieces (the progress bar's values, where a pull stands) directly."""

import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Generator
from pathlib import Path
from typing import Final

import pytest
from rich.console import Console
from shoal_shared.downloads import (
    Download,
    DownloadCompleted,
    DownloadFailed,
    DownloadOngoing,
    DownloadPending,
    DownloadStatus,
)
from shoal_shared.ids import ModelId, NodeId
from shoal_worker.downloads.local_models import CARD_FILE
from shoal_worker.models.default_model import bundled_gguf_path

from shoal.model_pull import (
    RECORD_WAIT_SECONDS,
    STALE_FAILURE_SECONDS,
    STALL_SECONDS,
    ProgressUpdate,
    progress_bar,
    progress_update,
    pull_outcome,
    show_update,
)

from .node_harness import RunningNode, free_port, started_node

BUNDLED: Final = "smollm2-135m"
# In the catalogue; the node is offline and has no files of it.
CATALOGUED: Final = "mlx-community/Qwen3-0.6B-4bit"
CLI_TIMEOUT_SECONDS: Final = 60


def until_api_answers(node: RunningNode) -> None:
    node.wait_until("the API", 60, lambda running: running.get("/healthz").status_code == 200)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Generator[RunningNode]:
    home = tmp_path_factory.mktemp("models-cli-node")
    with started_node(home, "--no-default-model", "--offline", until=until_api_answers) as running:
        yield running


def shoal_models(
    *arguments: str, api: str | None = None, shoal_home: Path | None = None
) -> subprocess.CompletedProcess[str]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("SHOAL_")}
    if shoal_home is not None:
        environment["SHOAL_HOME"] = str(shoal_home)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "shoal",
            "models",
            *arguments,
            *(("--api", api) if api is not None else ()),
        ],
        capture_output=True,
        text=True,
        env=environment,
        timeout=CLI_TIMEOUT_SECONDS,
        check=False,
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("shoal: ")
    return lines[0]


def test_list_shows_the_catalogue(node: RunningNode) -> None:
    result = shoal_models("list", api=node.base_url)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines() if line}
    assert rows[BUNDLED][:2] == ["0.54", "bundled"]
    assert rows[CATALOGUED] == ["0.34", "—", "—"]
    assert len(rows) > 30


def test_list_json_is_the_apis(node: RunningNode) -> None:
    result = shoal_models("list", "--json", api=node.base_url)
    assert result.returncode == 0, result.stderr
    models = {model["id"]: model for model in json.loads(result.stdout)["data"]}
    assert models[BUNDLED]["downloaded"] is True
    assert models[CATALOGUED]["downloads"] == []


def test_pull_of_the_bundled_model_is_at_once(node: RunningNode) -> None:
    result = shoal_models("pull", BUNDLED, api=node.base_url)
    assert result.returncode == 0, result.stderr
    node_id = node.get("/node_id").json()["node_id"]
    assert result.stdout.splitlines() == [f"{BUNDLED}: bundled with Shoal, on {node_id} (0.54 GB)"]


def test_pull_of_an_unknown_model_is_one_line(node: RunningNode) -> None:
    line = one_error_line(shoal_models("pull", "no-such-model", api=node.base_url))
    assert line == "shoal: the model 'no-such-model' does not exist"
    # A hub id beyond the catalogue is looked up on the hub, which an offline node cannot do.
    line = one_error_line(shoal_models("pull", "org/no-such-model", api=node.base_url))
    assert line.startswith(
        "shoal: org/no-such-model is not in the catalogue and could not be added from the hub: "
    )
    assert "offline" in line


def test_a_failed_pull_says_why(node: RunningNode) -> None:
    line = one_error_line(shoal_models("pull", CATALOGUED, api=node.base_url))
    assert line.startswith(f"shoal: {CATALOGUED} on ")
    assert "offline" in line
    # Again: this try's failure, not taken for the last one's (and not waited on either).
    assert "offline" in one_error_line(shoal_models("pull", CATALOGUED, api=node.base_url))


def test_rm_of_a_model_without_files(node: RunningNode) -> None:
    line = one_error_line(shoal_models("rm", CATALOGUED, api=node.base_url))
    assert line == f"shoal: {CATALOGUED} has no files on this node"
    nowhere = one_error_line(shoal_models("rm", CATALOGUED, "--node", "node-x", api=node.base_url))
    assert nowhere == "shoal: no node 'node-x' in the cluster"


@pytest.fixture
def silent_hub() -> Generator[socket.socket]:
    """A hub that takes connections and never answers: a download stays pending."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener


def test_ctrl_c_cancels_the_pull_and_a_hung_hub_does_not_hold_the_node(
    tmp_path: Path, silent_hub: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent_hub.getsockname()[1]}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with started_node(tmp_path / "home", "--no-default-model", until=until_api_answers) as hung:
        node_id = hung.get("/node_id").json()["node_id"]
        pulling = subprocess.Popen(
            [sys.executable, "-m", "shoal", "models", "pull", CATALOGUED, "--api", hung.base_url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={key: value for key, value in os.environ.items() if not key.startswith("SHOAL_")},
        )
        try:
            hung.wait_until(
                "the pull to start",
                30,
                lambda running: any(
                    record["model_id"] == CATALOGUED for record in running.get("/downloads").json()
                ),
            )
            pulling.send_signal(signal.SIGINT)
            out, err = pulling.communicate(timeout=CLI_TIMEOUT_SECONDS)
        finally:
            pulling.kill()
            pulling.wait()
        # Asked to stop while a hub request still hangs, every service exits on its own.
        assert hung.stop() == 0, hung.tail()
        assert "killing it" not in hung.output(), hung.tail()
    assert pulling.returncode == 130, err
    assert out == ""
    assert err.strip().splitlines() == [
        f"shoal: interrupted; cancelled the download of {CATALOGUED} on {node_id}"
    ]


def test_no_node_is_one_line() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for arguments in (("list",), ("pull", BUNDLED), ("rm", BUNDLED)):
        line = one_error_line(shoal_models(*arguments, api=url))
        assert line == f"shoal: no node answers at {url} (is `shoal run` running?)"


def test_bad_command_lines_are_one_line() -> None:
    for arguments in ((), ("fetch",), ("pull",)):
        result = shoal_models(*arguments)
        assert result.returncode == 2
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_import_refuses_what_is_not_a_gguf(tmp_path: Path) -> None:
    missing = tmp_path / "missing.gguf"
    home = ("--home", str(tmp_path / "home"))
    assert one_error_line(shoal_models("import", str(missing), *home)) == (
        f"shoal: no file at {missing}"
    )
    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    assert one_error_line(shoal_models("import", str(text), *home)) == (
        f"shoal: {text} is not a GGUF file"
    )


def gguf_of_architecture(architecture: str) -> bytes:
    """A GGUF (version 3) header with one metadata entry and no tensors."""
    key = b"general.architecture"
    value = architecture.encode()
    string_type = 8
    return (
        b"GGUF"
        + struct.pack("<IQQ", 3, 0, 1)
        + struct.pack("<Q", len(key))
        + key
        + struct.pack("<I", string_type)
        + struct.pack("<Q", len(value))
        + value
    )


def test_import_refuses_an_unsupported_architecture(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.gguf"
    foreign.write_bytes(gguf_of_architecture("not_a_real_arch"))
    line = one_error_line(shoal_models("import", str(foreign), shoal_home=tmp_path / "home"))
    assert line.startswith(
        f"shoal: cannot import {foreign}: unsupported model architecture 'not_a_real_arch'"
    )


def test_import_converts_a_gguf_into_the_home(tmp_path: Path) -> None:
    # Through SHOAL_HOME, as `shoal run` would find it.
    home = tmp_path / "home"
    result = shoal_models("import", str(bundled_gguf_path()), "--id", "my-smollm", shoal_home=home)
    assert result.returncode == 0, result.stderr
    directory = home / "models" / "local" / "my-smollm"
    [line] = result.stdout.splitlines()
    assert line.startswith("imported my-smollm: 30 layers, ")
    assert line.endswith(f" GB at {directory}")
    assert (directory / CARD_FILE).is_file()


def record(status: DownloadStatus, start_layer: int = 0, end_layer: int = 28) -> Download:
    return Download(
        node_id=NodeId("node-a"),
        model_id=ModelId(CATALOGUED),
        start_layer=start_layer,
        end_layer=end_layer,
        layer_count=28,
        status=status,
    )


def test_progress_follows_the_record() -> None:
    label = "m on n"
    assert progress_update(record(DownloadPending()), label) == ProgressUpdate(
        "m on n: waiting to start", 0.0, None, "", ""
    )
    ongoing = DownloadOngoing(
        bytes_done=250_000_000,
        bytes_total=1_000_000_000,
        bytes_per_second=12_500_000.0,
        eta_seconds=60.4,
    )
    assert progress_update(record(ongoing), label) == ProgressUpdate(
        "m on n", 250_000_000.0, 1_000_000_000.0, "12.5 MB/s", "ETA 0:01:00"
    )
    # Speed not known yet: no speed, no ETA.
    starting = DownloadOngoing(bytes_done=0, bytes_total=10, bytes_per_second=0.0)
    assert progress_update(record(starting), label) == ProgressUpdate("m on n", 0.0, 10.0, "", "")
    done = DownloadCompleted(bytes_total=5, path="/models/m")
    assert progress_update(record(done), label) == ProgressUpdate("m on n: done", 5.0, 5.0, "", "")
    assert progress_update(record(DownloadFailed(reason="x")), label).description == (
        "m on n: failed"
    )


def test_the_bar_keeps_its_numbers_on_80_columns() -> None:
    out = io.StringIO()
    console = Console(file=out, width=80, force_terminal=True, color_system=None)
    bar = progress_bar(console)
    ongoing = DownloadOngoing(
        bytes_done=31_900_000,
        bytes_total=102_000_000,
        bytes_per_second=21_300_000.0,
        eta_seconds=3.3,
    )
    update = progress_update(record(ongoing), f"{CATALOGUED} on node-3bc9fcadd34f3640")
    task = bar.add_task("", speed="", eta="")
    show_update(bar, task, update)
    console.print(bar.make_tasks_table(bar.tasks))
    [line] = out.getvalue().splitlines()
    assert len(line.rstrip()) <= 80
    # The long label is what gives way.
    assert f"{CATALOGUED} on" not in line
    for shown in ("31.9/102.0 MB", "21.3 MB/s", "ETA 0:00:03"):
        assert shown in line, line


def stands(
    current: Download | None,
    *,
    before: Download | None = None,
    fresh: bool = True,
    elapsed: float = 1.0,
    quiet: float = 0.0,
    layers: tuple[int | None, int | None] = (None, None),
) -> str:
    return pull_outcome(current, before, fresh, elapsed, quiet, layers)


def test_where_a_pull_stands() -> None:
    failed = record(DownloadFailed(reason="offline"))
    completed = record(DownloadCompleted(bytes_total=5, path="/m"))
    assert stands(None, fresh=False) == "waiting"
    assert stands(None, fresh=False, elapsed=RECORD_WAIT_SECONDS + 1) == "missing"
    assert stands(record(DownloadPending())) == "waiting"
    assert stands(completed) == "done"
    # A copy of the first half answers a pull of the first half only.
    half = record(DownloadCompleted(bytes_total=5, path="/m"), end_layer=14)
    assert stands(half) == "waiting"
    assert stands(half, layers=(0, 14)) == "done"
    # The last try's failure is not this one's, until it has stood for a while.
    assert stands(failed, before=failed, fresh=False) == "waiting"
    assert stands(failed, before=failed, fresh=False, elapsed=STALE_FAILURE_SECONDS + 1) == (
        "failed"
    )
    assert stands(failed, before=failed) == "failed"
    assert stands(failed, fresh=False) == "failed"
    # A download that stopped moving is given up on, not waited for forever.
    assert stands(record(DownloadPending()), quiet=STALL_SECONDS + 1) == "stalled"
