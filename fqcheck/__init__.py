"""fqcheck: validate and repair quantized Hugging Face checkpoints before serving."""
__version__ = "0.1.0"


def lint(path, **kwargs):
    """Lint a checkpoint; see fqcheck.api.lint."""
    from .api import lint as _lint
    return _lint(path, **kwargs)


__all__ = ["lint", "__version__"]
