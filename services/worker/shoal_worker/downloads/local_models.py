"""Models imported from GGUF files on this node (`shoal models import`): each directory under
`<models>/local/` holds the converted model and its card."""

import logging
from pathlib import Path
from typing import Final

from shoal_shared.ids import ModelId
from shoal_shared.model_card import ModelCard, ModelCardError, parse_card

logger = logging.getLogger(__name__)

CARD_FILE: Final = "shoal-card.toml"


def imported_cards(models_dir: Path) -> dict[ModelId, tuple[ModelCard, Path]]:
    found: dict[ModelId, tuple[ModelCard, Path]] = {}
    root = models_dir / "local"
    if not root.is_dir():
        return found
    for card_path in sorted(root.rglob(CARD_FILE)):
        try:
            card = parse_card(card_path.read_text(), str(card_path))
        except ModelCardError as error:
            logger.warning("ignoring an imported model: %s", error)
            continue
        found[card.model_id] = (card, card_path.parent)
    return found
