"""Type stub for the compiled extension `dynaexq._core` (checked by mypy stubtest)."""

__version__: str
