"""fqcheck: validate and repair quantized Hugging Face checkpoints before serving.

    import fqcheck
    report = fqcheck.lint("./export")   # -> fqcheck.Report; report.ok, report.findings, report.to_json()
    result = fqcheck.fix("./export")    # -> FixResult: .applied, .remaining, .backup
"""
__version__ = "0.1.0"

__all__ = ["Finding", "Options", "Report", "lint", "fix", "__version__"]


def __getattr__(name: str):
    # Loaded on first use: `import fqcheck` stays cheap (no engine, catalog or checks).
    if name in ("Finding", "Options", "Report", "lint"):
        from . import api
        return getattr(api, name)
    if name == "fix":  # a callable package: fqcheck.fix(path, ...) is fqcheck.api.fix
        import importlib
        return importlib.import_module(f"{__name__}.fix")  # binds fqcheck.fix to the package
    raise AttributeError(f"module 'fqcheck' has no attribute {name!r}")
