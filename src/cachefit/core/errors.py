"""Errors typed by who must act on them; each carries the exit code the CLI ends with (DESIGN.md, "CLI").

- :class:`InputError` (exit 2): the user's input is wrong; the message names the parameter, the value and the
  fix. A ``ValueError``, so the API contract ("bad input raises ValueError") holds. Library messages speak of
  parameters by their Python names; ``parameters`` lists the ones a message names, so the CLI can say flags.
- :class:`RunError` (exit 1): a run failed on its own terms (a rank raised or died, ``check`` found a
  difference); the message says which rank and how. Not a bug of cachefit.
- Anything else that escapes is a bug (exit 1, "internal error").
"""

from __future__ import annotations

__all__ = ["EXIT_BUG", "EXIT_FAILED", "EXIT_INFEASIBLE", "EXIT_OK", "EXIT_USAGE", "InputError", "RunError"]

EXIT_OK, EXIT_BUG, EXIT_USAGE, EXIT_INFEASIBLE = 0, 1, 2, 3
EXIT_FAILED = EXIT_BUG      # a failed run or check (a rank died, --check or --verify found a difference)


class InputError(ValueError):
    """Bad input: one line naming the problem and the fix."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, *, parameters: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.parameters = parameters


class RunError(RuntimeError):
    """A run that failed: which rank, and how."""

    exit_code = EXIT_FAILED
