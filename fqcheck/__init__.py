"""fqcheck: validate and repair quantized Hugging Face checkpoints before serving.

    import fqcheck
    report = fqcheck.lint("./export")   # -> fqcheck.Report; report.ok, report.findings, report.to_json()
"""
__version__ = "0.1.0"

from .api import Finding, Report, lint  # noqa: E402  (after __version__, which submodules read)

__all__ = ["Finding", "Report", "lint", "__version__"]
