"""fqcheck: validate and repair quantized Hugging Face checkpoints before serving.

    import fqcheck
    report = fqcheck.lint("./export")   # -> fqcheck.Report; report.ok, report.findings, report.to_json()
    result = fqcheck.fix("./export")    # -> FixResult: .applied, .remaining, .backup
"""
__version__ = "0.1.0"

__all__ = ["FixError", "FixRefused", "FixResult", "Finding", "Options", "Report", "UsageError", "fix", "lint",
           "__version__"]


def __getattr__(name: str):
    # Loaded on first use: `import fqcheck` stays cheap (no engine, catalog or checks).
    if name in ("Finding", "Options", "Report", "UsageError", "lint", "fix"):
        from . import api
        return getattr(api, name)
    if name in ("FixError", "FixRefused", "FixResult"):
        from .fixer import runner
        return getattr(runner, name)
    raise AttributeError(f"module 'fqcheck' has no attribute {name!r}")
