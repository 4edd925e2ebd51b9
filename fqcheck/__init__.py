"""fqcheck: validate and repair quantized Hugging Face checkpoints before serving.

    import fqcheck
    report = fqcheck.lint("./export")   # -> fqcheck.Report; report.ok, report.findings, report.to_json()
    result = fqcheck.fix("./export")    # -> fqcheck.fix.FixResult
"""
__version__ = "0.1.0"

from .api import Finding, Report, lint  # noqa: E402  (after __version__, which submodules read)
from . import fix  # noqa: E402 - a callable package, cheap to import: fqcheck.fix(path, ...) -> FixResult

__all__ = ["Finding", "Report", "lint", "fix", "__version__"]
