"""Messages of the align commands: to a rich console when one is given (the CLI), else to the log (library use)."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("ns_extreme.align")


def say(console: Any, message: str) -> None:
    """Print ``message`` verbatim (no markup, no highlighting) on ``console``, or log it at INFO level."""
    if console is not None:
        console.print(message, highlight=False, markup=False)
    else:
        log.info(message)
