"""`shoal models pull`: start a download on a node and follow its record in state to the end,
with a live progress bar on a terminal."""

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Final, Literal, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
)
from rich.table import Column
from shoal_shared.download_commands import requested_layers
from shoal_shared.downloads import (
    Download,
    DownloadCompleted,
    DownloadFailed,
    DownloadOngoing,
    DownloadPending,
)

from shoal.node_client import CliError, ModelView, NodeClient, NodeRefusedError

POLL_SECONDS: Final = 0.5
# A start the node accepted shows up as a record within a second or two; none after this
# long means the worker lost it (it restarted, say), and waiting on would hang.
RECORD_WAIT_SECONDS: Final = 30.0
# A failed record identical to the one before the start may be that earlier failure, not
# this try's; it counts as this try's once it has stood this long.
STALE_FAILURE_SECONDS: Final = 5.0
# A worker reports progress at least every few seconds while bytes move; a record that has
# not changed for this long belongs to a download that is stuck (or a worker that is gone),
# and the pull gives up rather than wait forever (the node itself may go on trying).
STALL_SECONDS: Final = 300.0
EXIT_INTERRUPTED: Final = 130
HTTP_NOT_FOUND: Final = 404
BAR_WIDTH: Final = 16
# What the spinner, the bar, the bytes, the speed and the ETA take of a line; the label gets
# the rest (but never less than this), so that on 80 columns the numbers still show.
OTHER_COLUMNS_WIDTH: Final = 52
MINIMUM_LABEL_WIDTH: Final = 20

PullOutcome = Literal["waiting", "done", "failed", "missing", "stalled"]


@dataclass(frozen=True)
class ProgressUpdate:
    """What the progress bar shows for one record (rich's `Progress.update` arguments)."""

    description: str
    completed: float
    # None: not known yet (pending); rich then shows a pulsing bar.
    total: float | None
    speed: str
    eta: str


def gigabytes(count: int) -> str:
    return f"{count / 1e9:.2f} GB"


def _rate(bytes_per_second: float) -> str:
    if bytes_per_second <= 0:
        return ""
    for unit, size in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if bytes_per_second >= size:
            return f"{bytes_per_second / size:.1f} {unit}"
    return f"{bytes_per_second:.0f} B/s"


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"ETA {timedelta(seconds=round(seconds))}"


def progress_update(download: Download, label: str) -> ProgressUpdate:
    status = download.status
    match status:
        case DownloadPending():
            total = float(status.bytes_total) if status.bytes_total else None
            return ProgressUpdate(f"{label}: waiting to start", 0.0, total, "", "")
        case DownloadOngoing():
            total = float(status.bytes_total) if status.bytes_total else None
            return ProgressUpdate(
                label,
                float(min(status.bytes_done, status.bytes_total or status.bytes_done)),
                total,
                _rate(status.bytes_per_second),
                _eta(status.eta_seconds),
            )
        case DownloadCompleted():
            total = float(status.bytes_total)
            return ProgressUpdate(f"{label}: done", total, total, "", "")
        case DownloadFailed():
            return ProgressUpdate(f"{label}: failed", 0.0, None, "", "")


def pull_outcome(
    record: Download | None,
    before: Download | None,
    fresh: bool,
    elapsed: float,
    quiet: float,
    layers: tuple[int | None, int | None],
) -> PullOutcome:
    """Where a pull stands, from the node's record of the model. `before` is the record
    from before the start; `fresh` says a record of this try has been seen; `elapsed` is the
    time since the start and `quiet` the time since the record last changed."""
    if quiet > STALL_SECONDS:
        return "stalled"
    if record is None:
        return "missing" if elapsed > RECORD_WAIT_SECONDS else "waiting"
    start_layer, end_layer = requested_layers(*layers, record.layer_count)
    match record.status:
        case DownloadCompleted():
            # A copy of other layers is no answer: this try's pending record follows.
            return "done" if record.covers(start_layer, end_layer) else "waiting"
        case DownloadFailed():
            stale = not fresh and record == before and elapsed < STALE_FAILURE_SECONDS
            return "waiting" if stale else "failed"
        case _:
            return "waiting"


def _find(records: list[Download], node_id: str, model_id: str) -> Download | None:
    return next(
        (r for r in records if r.node_id == node_id and r.model_id == model_id),
        None,
    )


def progress_bar(console: Console) -> Progress:
    label_width = max(MINIMUM_LABEL_WIDTH, console.width - OTHER_COLUMNS_WIDTH)
    return Progress(
        SpinnerColumn(),
        # Hub ids and node ids are long: cut the label, not the numbers, on a narrow terminal.
        TextColumn(
            "{task.description}",
            table_column=Column(max_width=label_width, no_wrap=True, overflow="ellipsis"),
        ),
        BarColumn(bar_width=BAR_WIDTH),
        DownloadColumn(table_column=Column(no_wrap=True)),
        TextColumn("{task.fields[speed]}", table_column=Column(no_wrap=True)),
        TextColumn("{task.fields[eta]}", table_column=Column(no_wrap=True)),
        console=console,
        # The bar goes at the end; the one line that says where the files are stays.
        transient=True,
        # Not on a pipe or in a log: there, only the last line is wanted.
        disable=not console.is_terminal,
    )


def show_update(progress: Progress, task: TaskID, update: ProgressUpdate) -> None:
    progress.update(
        task,
        description=update.description,
        completed=update.completed,
        total=update.total,
        speed=update.speed,
        eta=update.eta,
    )


@dataclass(frozen=True)
class PullRequest:
    model_id: str
    node_id: str | None
    start_layer: int | None
    end_layer: int | None


def _known_or_added(client: NodeClient, model_id: str, out: TextIO) -> ModelView:
    """The model as the node knows it; a Hugging Face id (`org/name`) beyond the catalogue
    is added from the hub first, as `ollama pull` takes any model of its library."""
    try:
        return client.model(model_id)
    except NodeRefusedError as error:
        if error.status_code != HTTP_NOT_FOUND or "/" not in model_id:
            raise
    try:
        added = client.add_model(model_id)
    except NodeRefusedError as error:
        raise CliError(
            f"{model_id} is not in the catalogue and could not be added from the hub: {error}"
        ) from None
    size = gigabytes(added.storage_bytes)
    print(f"{added.model_id}: added from the hub ({added.layers} layers, {size})", file=out)
    return client.model(added.model_id)


def pull(
    client: NodeClient,
    request: PullRequest,
    out: TextIO = sys.stdout,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    model = _known_or_added(client, request.model_id, out)
    node_id = request.node_id or client.node_id()
    before = _find(client.downloads(), node_id, model.id)
    try:
        answer = client.start_download(model.id, node_id, request.start_layer, request.end_layer)
        if model.source == "bundled":
            size = gigabytes(model.storage_bytes)
            print(f"{model.id}: bundled with Shoal, on {answer.node_id} ({size})", file=out)
            return 0
        return _follow(client, model, answer.node_id, before, answer.download, request, out, clock)
    except KeyboardInterrupt:
        # Also while the start itself was under way: the node may have begun all the same.
        _cancel(client, model.id, node_id)
        return EXIT_INTERRUPTED


def _follow(
    client: NodeClient,
    model: ModelView,
    node_id: str,
    before: Download | None,
    first: Download | None,
    request: PullRequest,
    out: TextIO,
    clock: Callable[[], float],
) -> int:
    started = changed = clock()
    fresh = first is not None and first != before
    last = first
    label = f"{model.id} on {node_id}"
    layers = (request.start_layer, request.end_layer)
    with progress_bar(Console(stderr=True)) as progress:
        task = progress.add_task(f"{label}: waiting to start", total=None, speed="", eta="")
        while True:
            record = _find(client.downloads(), node_id, model.id)
            now = clock()
            if record != last:
                last, changed = record, now
            fresh = fresh or (record is not None and record != before)
            outcome = pull_outcome(record, before, fresh, now - started, now - changed, layers)
            if record is not None:
                show_update(progress, task, progress_update(record, label))
            status = record.status if record is not None else None
            if outcome == "done" and isinstance(status, DownloadCompleted):
                size = gigabytes(status.bytes_total)
                print(f"{model.id}: on {node_id} ({size}) at {status.path}", file=out)
                return 0
            if outcome == "failed" and isinstance(status, DownloadFailed):
                raise CliError(f"{model.id} on {node_id}: {status.reason}")
            if outcome == "missing":
                raise CliError(
                    f"no download of {model.id} showed up on node {node_id} within "
                    f"{RECORD_WAIT_SECONDS:g} s"
                )
            if outcome == "stalled":
                raise CliError(
                    f"no news of {model.id} on {node_id} for {STALL_SECONDS:g} s; the node "
                    "may still be at it (`shoal models list` shows where it stands)"
                )
            time.sleep(POLL_SECONDS)


def _cancel(client: NodeClient, model_id: str, node_id: str) -> None:
    try:
        client.cancel_download(model_id, node_id)
    except CliError as error:
        # Finished (or failed) before the cancel arrived: nothing is left to stop.
        print(f"shoal: interrupted; the download was not cancelled: {error}", file=sys.stderr)
        return
    print(f"shoal: interrupted; cancelled the download of {model_id} on {node_id}", file=sys.stderr)
