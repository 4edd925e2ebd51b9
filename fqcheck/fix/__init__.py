"""Fixing: findings carry edits; the planner merges them per file; the writer applies them crash-safely.

`fqcheck.fix` is both this package and the API function: the package is callable, so
`fqcheck.fix(path, ...)` works whichever of the two an import left on the `fqcheck` module.
Importing it stays cheap: the runner (and everything it needs) loads on the first call.
"""
import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, path, **kwargs):
        """Repair a checkpoint crash-safely; see fqcheck.fix.runner.fix."""
        from ..api import fix
        return fix(path, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage


def __getattr__(name):
    if name in ("FixResult", "FixRefused", "FixError", "restore"):
        from . import runner
        return getattr(runner, name)
    raise AttributeError(name)
