"""A node's id lives in a file in its home directory: the same id on every start."""

import os
import tempfile
from pathlib import Path

from shoal_shared.ids import NodeId, is_subject_token, new_node_id

NODE_ID_FILE = "node_id"


class InvalidNodeIdError(ValueError):
    pass


def load_or_create_node_id(home: Path) -> NodeId:
    """Return the node id stored in `home`, creating it once; safe when processes race."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / NODE_ID_FILE
    if not path.exists():
        # Link a fully written temp file into place: exactly one racing process wins and
        # nobody ever reads a half-written id.
        with tempfile.NamedTemporaryFile("w", dir=home, delete=False) as draft:
            draft.write(new_node_id())
        try:
            os.link(draft.name, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(draft.name)
    value = path.read_text().strip()
    if not is_subject_token(value):
        raise InvalidNodeIdError(f"{path} holds {value!r}, which is not a valid node id")
    return NodeId(value)
