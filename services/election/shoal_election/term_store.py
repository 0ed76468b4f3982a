"""The election term, persisted so that it strictly increases across restarts."""

import os
from pathlib import Path
from typing import Final, final

TERM_FILE: Final = "term"


@final
class TermStore:
    def __init__(self, home: Path) -> None:
        self._path = home / TERM_FILE

    def load(self) -> int:
        if not self._path.exists():
            return 0
        text = self._path.read_text().strip()
        return int(text) if text.isdigit() else 0

    def save(self, term: int) -> None:
        if term < self.load():
            raise ValueError(f"term {term} would go back from {self.load()}")
        draft = self._path.with_suffix(".tmp")
        draft.write_text(f"{term}\n")
        with draft.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(draft, self._path)

    def next_term(self, at_least: int = 0) -> int:
        term = max(self.load(), at_least) + 1
        self.save(term)
        return term
