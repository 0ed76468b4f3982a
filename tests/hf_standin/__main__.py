"""`python -m tests.hf_standin --root DIR [--host H] [--port P]`: the Hub stand-in, own process.

Prints one JSON line `{"url": "http://H:P"}` to stdout once it listens, then serves until
SIGTERM (or SIGINT). Faults and the request log are reached over HTTP: see `process.HubControl`.
"""

import argparse
import json
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from .server import HubStandIn


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.hf_standin", description=__doc__)
    parser.add_argument("--root", type=Path, required=True, help="directory of <org>/<name>/ repos")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    parser.add_argument("--bytes-per-second", type=int, help="cap the speed of file bodies")
    arguments = parser.parse_args(argv)

    stopping = threading.Event()

    def stop(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    root: Path = arguments.root
    with HubStandIn(
        root.resolve(),
        arguments.host,
        arguments.port,
        verbose=arguments.verbose,
        bytes_per_second=arguments.bytes_per_second,
    ) as hub:
        sys.stdout.write(json.dumps({"url": hub.url}) + "\n")
        sys.stdout.flush()
        while not stopping.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
