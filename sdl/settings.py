"""``SDL_*`` environment settings, in one pydantic-settings class, read when asked for.

Why one class: every ``SDL_*`` variable the framework honours is a field here with its meaning,
so ``sdl run``, ``sdl status`` and ``sdl export`` can never disagree about where the data are and a
user finds every knob in one place. Settings are read from the environment at each call of
:func:`settings` (tests and CLIs change the environment at run time). This module never imports
torch or prefect.

* ``SDL_DATABASE_URL``: the knowledge repository (after ``--db``, before the YAML's ``repository.url``).
* ``SDL_STATE_DIR``: journals, plots, logs and the ephemeral Prefect home (default ``sdl-runs/`` beside
  a SQLite database, else in the working directory).
* ``SDL_EMBEDDING_CACHE``: the crystal-embedding cache file (default beside a SQLite database, else
  ``~/.cache/sdl/embeddings.sqlite``).
* ``SDL_DASK_ADDRESS``: a Dask scheduler (``tcp://host:8786``) or ``local`` that featurises and
  scores large candidate pools (``sdl run --dask`` sets it; wins over the YAML's ``compute.dask``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from sdl.config import CampaignConfig

__all__ = ["DASK_ADDRESS_ENV", "DATABASE_URL_ENV", "DEFAULT_DATABASE_URL", "SDLSettings", "resolve_database_url",
           "settings"]

logger = logging.getLogger(__name__)

DATABASE_URL_ENV = "SDL_DATABASE_URL"
DASK_ADDRESS_ENV = "SDL_DASK_ADDRESS"
DEFAULT_DATABASE_URL = "sqlite:///sdl.db"


class SDLSettings(BaseSettings):
    """The ``SDL_*`` environment variables (empty strings count as unset)."""

    model_config = SettingsConfigDict(env_prefix="SDL_", extra="ignore")

    database_url: str | None = None
    state_dir: Path | None = None
    embedding_cache: Path | None = None
    dask_address: str | None = None

    @field_validator("database_url", "state_dir", "embedding_cache", "dask_address", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value


def settings() -> SDLSettings:
    """The settings as the environment says now."""
    return SDLSettings()


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
        (DATABASE_URL_ENV, settings().database_url),
        ("campaign repository.url", campaign.repository.url if campaign is not None else None),
    )
    for source, url in candidates:
        if url and url.strip():
            logger.debug("database URL from %s", source)
            return url.strip()
    logger.debug("database URL: default %s", DEFAULT_DATABASE_URL)
    return DEFAULT_DATABASE_URL
