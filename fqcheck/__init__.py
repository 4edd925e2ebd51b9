"""fqcheck: validate and repair quantized Hugging Face checkpoints before serving.

    import fqcheck
    report = fqcheck.lint("./export")   # -> fqcheck.Report; report.ok, report.findings, report.to_json()
    result = fqcheck.fix("./export")    # -> fqcheck.fix.FixResult
"""
__version__ = "0.1.0"

__all__ = ["Finding", "Report", "lint", "fix", "__version__"]


def __getattr__(name: str):
    # Loaded on first use, so that `fqcheck lint` can start reading shard headers
    # (fqcheck.checkpoint) before it imports the engine, the catalog and the checks.
    if name in ("Finding", "Report", "lint"):
        from . import api
        return getattr(api, name)
    if name == "fix":  # a callable package: fqcheck.fix(path, ...) -> FixResult
        import importlib
        return importlib.import_module(f"{__name__}.fix")  # binds fqcheck.fix to the package
    raise AttributeError(f"module 'fqcheck' has no attribute {name!r}")
