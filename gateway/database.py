"""Which PostgreSQL a command uses: GATEWAY_DATABASE_URL, or the embedded one under
GATEWAY_DATA_DIR (development and the demo), waited for until it answers."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from .db import DatabaseUnavailable, wait_for_database
from .embedded import EmbeddedPostgres
from .settings import Settings

log = logging.getLogger("gateway")


def database_url(settings: Settings, stack: contextlib.ExitStack) -> str:
    """GATEWAY_DATABASE_URL, or an embedded PostgreSQL stopped when the stack closes; either
    answers by the time this returns (DatabaseUnavailable after GATEWAY_DB_CONNECT_TIMEOUT_S)."""
    if settings.database_url:
        dsn = settings.database_url
    else:
        embedded = EmbeddedPostgres(settings.data_dir)
        stack.callback(embedded.stop)
        try:
            dsn = embedded.start()
        except ImportError as e:     # an installation without pgserver (the container image)
            raise DatabaseUnavailable(f"GATEWAY_DATABASE_URL is not set and this installation "
                                      f"has no embedded PostgreSQL ({e}): set "
                                      "GATEWAY_DATABASE_URL") from None
        log.info("embedded PostgreSQL under %s", embedded.pgdata)
    asyncio.run(wait_for_database(dsn, settings.db_connect_timeout_s))
    return dsn


def with_database(settings: Settings, job) -> int:
    with contextlib.ExitStack() as stack:
        dsn = database_url(settings, stack)
        return asyncio.run(job(dsn))
