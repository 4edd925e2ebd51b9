"""The fixer's exceptions, in a module of their own: the CLI's error handling imports them on every
command, lint too, without loading the fixer."""
from __future__ import annotations


class FixError(Exception):
    """A fix could not be carried out; the directory was left (or put back) as it was."""


class StateError(FixError):
    """fqcheck's state in `.fqcheck/` is not what fqcheck writes: nothing was touched."""


class FixRefused(Exception):
    """The checkpoint has problems fix must not touch; nothing was changed."""

    def __init__(self, message: str, findings=()):
        super().__init__(message)
        self.findings = list(findings)
