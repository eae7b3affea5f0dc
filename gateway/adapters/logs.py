"""structlog set-up: JSON lines when stderr is not a terminal, readable lines when it is."""

from __future__ import annotations

import sys
from typing import Any

import structlog
from structlog.typing import FilteringBoundLogger


def configure(json: bool | None = None) -> FilteringBoundLogger:
    """Configure structlog for the process and return a logger for snatgw."""
    if json is None:
        json = not sys.stderr.isatty()
    renderer: Any = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    log: FilteringBoundLogger = structlog.get_logger("snatgw")
    return log
