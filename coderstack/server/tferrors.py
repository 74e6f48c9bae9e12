"""How a terraform run fails: the errors a build or a template check reports."""

from __future__ import annotations


class BuildError(Exception):
    """A terraform command failed.  ``message`` is terraform's error text (its stderr, or the
    tail of its output); ``command`` is the subcommand that failed (init/apply/validate)."""

    def __init__(self, command: str, message: str, exit_code: int | None = None):
        super().__init__(f"terraform {command} failed: {message}")
        self.command = command
        self.message = message
        self.exit_code = exit_code


class TemplateError(BuildError):
    """``terraform validate`` (or the init before it) rejected a template."""
