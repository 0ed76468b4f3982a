"""A local Hugging Face Hub stand-in for tests, with fault injection.

server      `HubStandIn`: the stand-in, served from a thread of this process
process     `StandInProcess` (`python -m tests.hf_standin` as a child), `HubControl`
hub_api     the Hub endpoints it serves, and what they answer
handler     the HTTP server and handler; how errors are answered; the control endpoints
faults      the faults it can inject, and what `huggingface_hub` does with them
state       what the handlers share: repo snapshots, faults, the request log
snapshots   repos on disk as the Hub describes them (commit sha, LFS, private repos)
repos       building the repos it serves
"""

from .faults import Fault, FaultKind
from .handler import INVALID_CREDENTIALS
from .process import HubControl, StandInProcess
from .repos import (
    INDEX_FILE,
    PRIVATE_REPO,
    PRIVATE_TOKEN,
    SPLIT_REPO,
    UNSUPPORTED_MODEL_TYPE,
    UNSUPPORTED_REPO,
    StandardRepos,
    build_repo,
    build_split_repo,
    build_standard_repos,
    build_unsupported_repo,
    clone_repo,
    mark_private,
    repo_dir,
    shard_name,
)
from .server import HubStandIn
from .snapshots import SETTINGS_FILE, RepoFileInfo, RepoSnapshot
from .state import RequestRecord

__all__ = [
    "INDEX_FILE",
    "INVALID_CREDENTIALS",
    "PRIVATE_REPO",
    "PRIVATE_TOKEN",
    "SETTINGS_FILE",
    "SPLIT_REPO",
    "UNSUPPORTED_MODEL_TYPE",
    "UNSUPPORTED_REPO",
    "Fault",
    "FaultKind",
    "HubControl",
    "HubStandIn",
    "RepoFileInfo",
    "RepoSnapshot",
    "RequestRecord",
    "StandInProcess",
    "StandardRepos",
    "build_repo",
    "build_split_repo",
    "build_standard_repos",
    "build_unsupported_repo",
    "clone_repo",
    "mark_private",
    "repo_dir",
    "shard_name",
]
