"""``SDL_*`` environment settings, resolved in one place.

The database URL is the one setting every command needs; its precedence is fixed here so that
``sdl run``, ``sdl status`` and ``sdl export`` can never disagree about where the data are.
This module never imports torch or prefect.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sdl.config import CampaignConfig

__all__ = ["DATABASE_URL_ENV", "DEFAULT_DATABASE_URL", "resolve_database_url"]

logger = logging.getLogger(__name__)

DATABASE_URL_ENV = "SDL_DATABASE_URL"
DEFAULT_DATABASE_URL = "sqlite:///sdl.db"


def resolve_database_url(cli_url: str | None, campaign: CampaignConfig | None = None) -> str:
    """Pick the knowledge repository's URL.

    Precedence: ``--db`` on the command line, then the ``SDL_DATABASE_URL`` environment variable,
    then the campaign's ``repository.url``, then the embedded SQLite file ``sqlite:///sdl.db``
    (relative to the working directory). Empty strings count as unset.

    Args:
        cli_url: The ``--db`` option, if given.
        campaign: The campaign whose YAML may name a repository.

    Returns:
        A SQLAlchemy URL.
    """
    candidates = (
        ("--db", cli_url),
        (DATABASE_URL_ENV, os.environ.get(DATABASE_URL_ENV)),
        ("campaign repository.url", campaign.repository.url if campaign is not None else None),
    )
    for source, url in candidates:
        if url and url.strip():
            logger.debug("database URL from %s", source)
            return url.strip()
    logger.debug("database URL: default %s", DEFAULT_DATABASE_URL)
    return DEFAULT_DATABASE_URL
