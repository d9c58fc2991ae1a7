"""Expert quantization tiers: formats, packing, RTN and ALS, reference dequant, CPU execution.

The packed layout is documented in docs/packed-layout.md.
"""

from dynaexq.quant.expert import (
    DEFAULT_ALIGNMENT,
    LAYOUT_VERSION,
    ExpertScratch,
    PackedExpertError,
    PackedExpertView,
    QuantizedExpert,
    Section,
    dequantize_expert,
    expert_forward,
    expert_layout,
    expert_nbytes,
    pack_expert,
    pack_quantized_expert,
    quantize_expert,
    reference_expert_forward,
    swiglu_reference,
)
from dynaexq.quant.methods import (
    QuantizationError,
    QuantizedMatrix,
    dequantize_matrix,
    quantize_matrix,
    relative_error,
)
from dynaexq.quant.packing import MatrixGeometry, pack_codes, unpack_codes
from dynaexq.quant.tiers import TierError, TierSpec, parse_tier, parse_tiers

__all__ = [
    "DEFAULT_ALIGNMENT",
    "LAYOUT_VERSION",
    "ExpertScratch",
    "MatrixGeometry",
    "PackedExpertError",
    "PackedExpertView",
    "QuantizationError",
    "QuantizedExpert",
    "QuantizedMatrix",
    "Section",
    "TierError",
    "TierSpec",
    "dequantize_expert",
    "dequantize_matrix",
    "expert_forward",
    "expert_layout",
    "expert_nbytes",
    "pack_codes",
    "pack_expert",
    "pack_quantized_expert",
    "parse_tier",
    "parse_tiers",
    "quantize_expert",
    "quantize_matrix",
    "reference_expert_forward",
    "relative_error",
    "swiglu_reference",
    "unpack_codes",
]
