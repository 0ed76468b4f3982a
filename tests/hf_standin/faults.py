"""Faults the Hub stand-in can inject.

Faults (`HubStandIn.inject`, or `POST /_standin/faults` with the same fields as JSON):

    drop          filename, after_bytes, reset=False   the body of a GET stops after `after_bytes`
                                                       bytes and the connection is closed (FIN;
                                                       with reset, an RST)
    corrupt       filename, offset=None                one byte of a GET body (at file offset
                                                       `offset`, default the middle) is flipped;
                                                       ETag and sha256 stay the real ones
    rate_limit    retry_after=1, filename/method opt.  429 with Retry-After
    unauthorized  token                                the repo (or every repo) needs
                                                       `Authorization: Bearer <token>`

Every fault takes `repo` (None: any repo) and `times` (how many times it fires; None: until it
is removed). drop/corrupt fire only on GETs whose body they actually cut or change.

What `huggingface_hub` 2.4 does with them (see tests/test_hf_standin.py):

    drop (FIN)    http_get resumes with `Range: bytes=N-`, where N is what it had written: it
                  writes in 10 MiB chunks (DOWNLOAD_CHUNK_SIZE), so a cut inside the first chunk
                  starts the file again (a second 200), and at most 10 MiB are sent twice
    drop (reset)  not retried: httpx2.ReadError (connection reset) comes out of hf_hub_download
    corrupt       not detected: the file is written with the wrong bytes
    rate_limit    a GET of a file, the tree listing: retried after Retry-After + 1 s. A HEAD:
                  the first 429 is not retried, then hf_hub_download asks again with retries.
                  model_info: not retried (HfHubHTTPError 429)

Where they fire: `state.HubState` (which fault applies to a request) and `handler` (what it does
to the answer).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, Self, get_args

FaultKind = Literal["drop", "corrupt", "rate_limit", "unauthorized"]
FAULT_KINDS: Final[tuple[str, ...]] = get_args(FaultKind)


@dataclass
class Fault:
    """One injected fault. See the module docstring for what each kind does."""

    kind: FaultKind
    repo: str | None = None
    filename: str | None = None
    method: str | None = None
    times: int | None = 1
    after_bytes: int = 0
    reset: bool = False
    offset: int | None = None
    retry_after: int = 1
    token: str | None = None
    id: int = 0
    fired: int = 0

    def validate(self) -> Self:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {FAULT_KINDS}")
        if self.kind in ("drop", "corrupt") and self.filename is None:
            raise ValueError(f"a {self.kind} fault needs a filename")
        if self.kind == "unauthorized" and not self.token:
            raise ValueError("an unauthorized fault needs the token to accept")
        if self.times is not None and self.times < 1:
            raise ValueError("times must be at least 1 (or None: until removed)")
        if self.after_bytes < 0 or self.retry_after < 0 or (self.offset or 0) < 0:
            raise ValueError("after_bytes, retry_after and offset cannot be negative")
        if self.method is not None:
            self.method = self.method.upper()
        return self

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Fault:
        """A fault from its JSON fields (`id` and `fired` are kept but reassigned on injection)."""
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown fault fields {sorted(unknown)}")
        if "kind" not in data:
            raise ValueError("a fault needs a kind")
        return cls(**dict(data)).validate()

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def matches(self, repo: str | None, filename: str | None, method: str) -> bool:
        return (
            (self.repo is None or self.repo == repo)
            and (self.filename is None or self.filename == filename)
            and (self.method is None or self.method == method)
        )
