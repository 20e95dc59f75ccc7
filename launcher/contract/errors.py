"""Errors a user can cause: one line (what, where, how to fix), exit status 2, no traceback."""

from __future__ import annotations

# A key path from a document's root: keys (YAML allows numbers too) and list indices, e.g.
# ("stages", "pt", "params", "lr").
KeyPath = tuple[str | int | float, ...]


class ChlaError(Exception):
    """A mistake in the user's input. The CLI prints `chla: <message>` and exits with status 2."""

    exit_code = 2


class RecipeError(ChlaError):
    """A recipe problem located by file, key path and (where YAML knows it) line."""

    def __init__(
        self, message: str, *, file: str | None = None, key: str | None = None, line: int | None = None
    ) -> None:
        self.file, self.key, self.line, self.problem = file, key, line, message
        where = ""
        if file:
            where = f"{file}:{line}: " if line else f"{file}: "
        if key:
            where += f"{key}: "
        super().__init__(f"{where}{message}")
