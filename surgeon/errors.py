"""One error type for bad input: the message names the thing and what was expected."""
from __future__ import annotations


class SurgeonError(Exception):
    """Bad input or an unmet precondition. The CLI prints ``error: <message>`` and exits with ``exit_code``."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message
