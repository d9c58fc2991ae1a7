"""dynaexq: serve Mixture-of-Experts models with expert precision as a managed resource."""

from dynaexq._core import (
    BackendError,
    Block,
    BlockInUse,
    Completion,
    DeviceBudget,
    DoubleFree,
    ExpertPool,
    ExpertTable,
    ForeignBlock,
    HostStore,
    IllegalTransition,
    KvPagePool,
    Layout,
    LayoutError,
    Lease,
    PoolError,
    PoolExhausted,
    QueueFull,
    TransferEngine,
    Transition,
    Version,
    __version__,
    plan_layout,
)

__all__ = [
    "__version__",
    "BackendError",
    "Block",
    "BlockInUse",
    "Completion",
    "DeviceBudget",
    "DoubleFree",
    "ExpertPool",
    "ExpertTable",
    "ForeignBlock",
    "HostStore",
    "IllegalTransition",
    "KvPagePool",
    "Layout",
    "LayoutError",
    "Lease",
    "PoolError",
    "PoolExhausted",
    "QueueFull",
    "TransferEngine",
    "Transition",
    "Version",
    "plan_layout",
]

# The model runtime (issue 5). Imported lazily: it pulls in torch, and `dynaexq --help`
# should stay fast.
_LAZY = {
    "load": "dynaexq.runtime.load",
    "Policy": "dynaexq.runtime.policy",
    "ControllerSettings": "dynaexq.runtime.policy",
    "BudgetError": "dynaexq.runtime.budget",
    "Engine": "dynaexq.engine",
    "GenerationResult": "dynaexq.engine",
    "CheckpointError": "dynaexq.checkpoint",
    "CheckpointFileNotFoundError": "dynaexq.checkpoint",
    "EmbeddedModelMissingError": "dynaexq.checkpoint",
    "MissingTensorError": "dynaexq.checkpoint",
    "TensorShapeError": "dynaexq.checkpoint",
    "UnsupportedArchitectureError": "dynaexq.checkpoint",
    "UnsupportedDtypeError": "dynaexq.checkpoint",
    "NonFiniteTensorError": "dynaexq.checkpoint",
    # Expert quantization tiers and packed experts (issue 4; docs/packed-layout.md).
    "TierSpec": "dynaexq.quant",
    "parse_tier": "dynaexq.quant",
    "expert_nbytes": "dynaexq.quant",
    "pack_expert": "dynaexq.quant",
    "PackedExpertView": "dynaexq.quant",
    "expert_forward": "dynaexq.quant",
}
__all__ += list(_LAZY)


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dynaexq' has no attribute {name!r}")
