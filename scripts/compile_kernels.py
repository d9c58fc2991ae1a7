#!/usr/bin/env python3
"""Compile kernels/*.cu to PTX with NVRTC for every supported architecture.

    python scripts/compile_kernels.py [--out DIR] [--arch 80,86,89,90,120]

Writes DIR/<module>.sm_<arch>.ptx and DIR/kernels.json (modules, architectures, kernel
names, NVRTC version). Each PTX is also assembled to SASS with nvJitLink (ptxas), so
errors that NVRTC lets through are caught too. Exits non-zero, printing the log, if any
compile or assembly fails or a module lacks an expected kernel; CI runs it
(scripts/test.sh). Needs no GPU (NVRTC and nvJitLink come with PyTorch's CUDA wheels,
reached through cuda-bindings).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

root = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(root / "python"))

from dynaexq.quant.cuda import (  # noqa: E402
    ARCHES,
    MODULES,
    KernelCompileError,
    kernel_dir,
    kernel_names,
    nvrtc_compile,
    nvrtc_version,
    ptx_entries,
    ptxas_check,
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(root / "kernels" / "build"), help="output directory")
    ap.add_argument("--arch", default=",".join(ARCHES), help="comma-separated SM versions")
    ap.add_argument(
        "--no-ptxas", action="store_true", help="skip assembling the PTX with nvJitLink (ptxas)"
    )
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arches = [a.strip().removeprefix("sm_") for a in args.arch.split(",") if a.strip()]
    index = {"nvrtc": ".".join(map(str, nvrtc_version())), "modules": {}}
    failed = False
    for mod in MODULES:
        want = set(kernel_names(mod))
        index["modules"][mod] = {"kernels": sorted(want), "ptx": {}}
        for arch in arches:
            t0 = time.perf_counter()
            try:
                ptx = nvrtc_compile(kernel_dir() / f"{mod}.cu", arch)
            except KernelCompileError as e:
                print(f"FAILED {e}", file=sys.stderr)
                failed = True
                continue
            missing = want - set(ptx_entries(ptx))
            if missing:
                print(f"FAILED {mod} sm_{arch}: missing kernels {sorted(missing)}", file=sys.stderr)
                failed = True
                continue
            spilled = {}
            if not args.no_ptxas:
                try:
                    spilled = {k: v for k, v in ptxas_check(ptx, arch, mod).items() if v}
                except KernelCompileError as e:
                    print(f"FAILED {e}", file=sys.stderr)
                    failed = True
                    continue
            if spilled:
                print(f"warning: {mod} sm_{arch}: register spills {spilled}", file=sys.stderr)
            fname = f"{mod}.sm_{arch}.ptx"
            (out / fname).write_text(ptx)
            index["modules"][mod]["ptx"][f"sm_{arch}"] = fname
            print(
                f"ok {fname}: {len(want)} kernels, {len(ptx) // 1024} KiB, "
                f"{time.perf_counter() - t0:.1f} s"
            )
    (out / "kernels.json").write_text(json.dumps(index, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
