"""Tier specifications: the precision an expert is stored at.

A tier is a small immutable value. Its string form is what the CLI and the manifest use:

    bf16, fp16            pass-through 16-bit weights
    int8, int4, int3, int2    integer tiers with the defaults below
    int4g128, int2g64a    explicit group size; a trailing "a" means asymmetric (FP16 zero point)
    int2g64-als, int4-rtn explicit method ("rtn" round-to-nearest, "als" error-minimising)

Defaults follow the paper (INT4 group 128, INT2 group 64, symmetric); INT8 and INT3 use
group 128 and 64. The default method is "als" (see methods.py): it never measures worse
than RTN and is much better at 2 and 3 bits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SUPPORTED_BITS = (16, 8, 4, 3, 2)
SUPPORTED_GROUPS = (32, 64, 128)
METHODS = ("rtn", "als")
DEFAULT_METHOD = "als"
DEFAULT_GROUP = {8: 128, 4: 128, 3: 64, 2: 64}

_INT_RE = re.compile(r"^int(?P<bits>\d+)(?:g(?P<group>\d+))?(?P<asym>a)?(?:-(?P<method>[a-z]+))?$")


class TierError(ValueError):
    """A tier string or tier parameters are not supported."""


@dataclass(frozen=True)
class TierSpec:
    """One storage precision for an expert.

    bits: 16 (pass-through, `dtype` "bf16" or "fp16") or 8/4/3/2 (integer codes).
    group_size: columns (input dimension) sharing one FP16 scale (and zero); 0 for 16-bit.
    symmetric: integer tiers only; symmetric tiers store no zeros (implicit zero 2**(bits-1)).
    method: "rtn" or "als" for integer tiers, "none" for 16-bit.
    """

    bits: int
    group_size: int = 0
    symmetric: bool = True
    method: str = "none"
    dtype: str = "bf16"

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise TierError(f"unsupported bit width {self.bits}; expected one of {SUPPORTED_BITS}")
        if self.bits == 16:
            if self.dtype not in ("bf16", "fp16"):
                raise TierError(f"16-bit tier dtype must be bf16 or fp16, got {self.dtype!r}")
            if self.group_size != 0 or not self.symmetric or self.method != "none":
                raise TierError("16-bit tiers take no group size, zero point or method")
        else:
            if self.group_size not in SUPPORTED_GROUPS:
                raise TierError(
                    f"unsupported group size {self.group_size}; expected one of {SUPPORTED_GROUPS}"
                )
            if self.method not in METHODS:
                raise TierError(f"unsupported method {self.method!r}; expected one of {METHODS}")

    @property
    def is_quantized(self) -> bool:
        return self.bits != 16

    @property
    def name(self) -> str:
        """Canonical string form; `parse_tier(t.name) == t`."""
        if self.bits == 16:
            return self.dtype
        s = f"int{self.bits}g{self.group_size}{'' if self.symmetric else 'a'}"
        return s if self.method == DEFAULT_METHOD else f"{s}-{self.method}"

    def __str__(self) -> str:
        return self.name

    @staticmethod
    def parse(text: str) -> TierSpec:
        return parse_tier(text)


def parse_tier(text: str) -> TierSpec:
    """Parse "bf16", "fp16", "int4", "int4g128", "int2g64a", "int3g32-rtn", ..."""
    t = text.strip().lower()
    if t in ("bf16", "fp16"):
        return TierSpec(bits=16, dtype=t)
    if t == "f16":
        return TierSpec(bits=16, dtype="fp16")
    m = _INT_RE.match(t)
    if m is None:
        raise TierError(
            f"cannot parse tier {text!r}; expected e.g. bf16, fp16, int4, int4g128, int2g64a, "
            "int2g64-rtn"
        )
    bits = int(m["bits"])
    if bits not in DEFAULT_GROUP:
        raise TierError(f"unsupported bit width in {text!r}; integer tiers are int8/int4/int3/int2")
    group = int(m["group"]) if m["group"] else DEFAULT_GROUP[bits]
    method = m["method"] or DEFAULT_METHOD
    return TierSpec(bits=bits, group_size=group, symmetric=m["asym"] is None, method=method)


def parse_tiers(text: str) -> list[TierSpec]:
    """Parse a comma-separated list ("bf16,int4,int2"); rejects duplicates."""
    tiers = [parse_tier(p) for p in text.split(",") if p.strip()]
    if not tiers:
        raise TierError("no tiers given")
    names = [t.name for t in tiers]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise TierError(f"duplicate tiers: {sorted(dup)}")
    return tiers
