"""dynaexq: serve Mixture-of-Experts models with expert precision as a managed resource."""

from dynaexq._core import __version__

__all__ = ["__version__"]
