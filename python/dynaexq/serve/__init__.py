"""OpenAI-compatible HTTP serving with continuous batching (`dynaexq serve`)."""

from dynaexq.serve.runtime import (
    POLICIES,
    FullPrecisionStats,
    PolicyUnavailableError,
    RuntimeSnapshot,
    RuntimeSpec,
    RuntimeStats,
    build_runtime,
    parse_bytes,
    register_policy,
)

__all__ = [
    "POLICIES",
    "FullPrecisionStats",
    "PolicyUnavailableError",
    "RuntimeSnapshot",
    "RuntimeSpec",
    "RuntimeStats",
    "ServerConfig",
    "build_runtime",
    "create_app",
    "parse_bytes",
    "register_policy",
]


def __getattr__(name: str) -> object:
    # The app pulls in torch and FastAPI; import it only when asked for.
    if name in ("create_app", "ServerConfig"):
        from dynaexq.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'dynaexq.serve' has no attribute {name!r}")
