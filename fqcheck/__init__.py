"""fqcheck: validate and repair quantized Hugging Face checkpoints before serving."""
__version__ = "0.1.0"


def lint(path, **kwargs):
    """Lint a checkpoint; see fqcheck.api.lint."""
    from .api import lint as _lint
    return _lint(path, **kwargs)


from . import fix  # noqa: E402 - a callable package, cheap to import: fqcheck.fix(path, ...) -> FixResult


__all__ = ["lint", "fix", "__version__"]
