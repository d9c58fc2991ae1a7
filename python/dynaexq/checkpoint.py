"""Hugging Face checkpoints: config.json + safetensors, read lazily.

A checkpoint directory holds `config.json` and either `model.safetensors` or shards listed
in `model.safetensors.index.json`. Tensors are read through `safetensors.safe_open`, which
memory-maps each file and copies out only the tensor (or slice of a tensor) asked for, so
a checkpoint larger than RAM can be walked expert by expert: the mapped pages are clean
file pages the kernel may drop at any time, and at most `max_open_files` files are mapped
at once.

Expert weights come in two layouts, both handled by `Checkpoint.expert`:
- per expert, as `transformers` (5.24 included) and the released Qwen checkpoints save them:
  `model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight` ([I, H], [I, H], [H, I]);
- fused, as `transformers` 5.x holds them in memory: `model.layers.N.mlp.experts.gate_up_proj`
  [E, 2I, H] (gate rows first) and `model.layers.N.mlp.experts.down_proj` [E, H, I].
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open

if TYPE_CHECKING:
    from dynaexq.model.config import ModelConfig


class CheckpointError(Exception):
    """A checkpoint cannot be loaded; the message names the file or tensor at fault."""


class CheckpointFileNotFoundError(CheckpointError, FileNotFoundError):
    """A file the checkpoint needs (config.json, a weight shard) does not exist."""

    def __str__(self) -> str:  # OSError's str would add errno decorations
        return str(self.args[0]) if self.args else ""


class EmbeddedModelMissingError(CheckpointFileNotFoundError):
    """The embedded default model is not present in this installation."""


class MissingTensorError(CheckpointError, LookupError):
    """A tensor the architecture needs is not in the checkpoint."""

    def __str__(self) -> str:  # LookupError/KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class TensorShapeError(CheckpointError, ValueError):
    """A tensor's shape disagrees with config.json."""


class UnsupportedArchitectureError(CheckpointError, ValueError):
    """config.json describes a model this runtime does not implement."""


class UnsupportedDtypeError(CheckpointError, TypeError):
    """A tensor's dtype (or a requested compute dtype) cannot be run here."""


class NonFiniteTensorError(CheckpointError, ValueError):
    """A weight holds inf or NaN (only checked where asked: it costs a pass over the data)."""


# safetensors dtype names we can read and convert to a compute dtype.
_READABLE_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F64": torch.float64,
}
# Bytes per element of every safetensors dtype, for sizes read from the header alone.
_DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
}


@dataclass(frozen=True)
class ExpertTensors:
    """One routed expert's weights in `nn.Linear` layout (out_features, in_features)."""

    gate: torch.Tensor  # [I, H]
    up: torch.Tensor  # [I, H]
    down: torch.Tensor  # [H, I]


class Checkpoint:
    """Lazy access to the tensors of one Hugging Face checkpoint directory."""

    def __init__(self, path: str | Path, max_open_files: int = 2) -> None:
        from dynaexq.model.config import ModelConfig

        path = Path(path)
        if path.is_file() and path.name == "config.json":
            path = path.parent
        if not path.exists():
            hint = ""
            if len(path.parts) == 2 and not path.is_absolute():
                hint = " (dynaexq does not download models: pass a local directory)"
            raise CheckpointFileNotFoundError(f"{path}: checkpoint directory does not exist{hint}")
        if not path.is_dir():
            raise CheckpointError(f"{path}: expected a checkpoint directory")
        self.path = path
        config_path = path / "config.json"
        if not config_path.is_file():
            raise CheckpointFileNotFoundError(f"{config_path}: config.json not found")
        self.config: ModelConfig = ModelConfig.from_file(config_path)
        self._max_open = max(1, max_open_files)
        self._handles: OrderedDict[Path, Any] = OrderedDict()
        self._file_of: dict[str, Path] = self._discover_files()

    # -- files ------------------------------------------------------------------------
    def _discover_files(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
            mapped = {name: self.path / fname for name, fname in weight_map.items()}
            for f in sorted(set(mapped.values())):
                if not f.is_file():
                    raise CheckpointFileNotFoundError(
                        f"{f}: shard listed in {index.name} does not exist"
                    )
            return mapped
        candidates = [single] if single.is_file() else sorted(self.path.glob("*.safetensors"))
        if not candidates:
            other = [p.name for p in self.path.iterdir() if p.suffix in (".bin", ".pt", ".gguf")]
            hint = f" (found {', '.join(other)}: only safetensors is supported)" if other else ""
            raise CheckpointFileNotFoundError(
                f"{self.path}: no model.safetensors or model.safetensors.index.json{hint}"
            )
        files: dict[str, Path] = {}
        for f in candidates:
            for name in self._handle(f).keys():  # noqa: SIM118 (safe_open is not a dict)
                files[name] = f
        return files

    def _handle(self, file: Path) -> Any:
        """An open safe_open handle; the least recently used one is closed beyond the cap."""
        h = self._handles.get(file)
        if h is not None:
            self._handles.move_to_end(file)
            return h
        try:
            h = safe_open(str(file), framework="pt", device="cpu")
        except Exception as e:
            raise CheckpointError(f"{file}: cannot read safetensors file ({e})") from None
        self._handles[file] = h
        while len(self._handles) > self._max_open:
            self._handles.popitem(last=False)  # dropping the handle unmaps the file
        return h

    def close(self) -> None:
        """Unmap every file; later reads reopen them."""
        self._handles.clear()

    @property
    def files(self) -> list[Path]:
        return sorted(set(self._file_of.values()))

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    # -- tensors ------------------------------------------------------------------------
    def __contains__(self, name: object) -> bool:
        return name in self._file_of

    def names(self) -> Iterable[str]:
        return self._file_of.keys()

    def _slice(self, name: str, expected: tuple[int, ...] | None) -> Any:
        file = self._file_of.get(name)
        if file is None:
            shape = f" (expected shape {list(expected)})" if expected is not None else ""
            raise MissingTensorError(f"{self.path}: tensor {name!r} is missing{shape}")
        return self._handle(file).get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name, None).get_shape())

    def dtype_name(self, name: str) -> str:
        return str(self._slice(name, None).get_dtype())

    def nbytes(self, name: str) -> int:
        """Bytes `name` occupies in its file, from the header alone (no data is read)."""
        sl = self._slice(name, None)
        dt = sl.get_dtype()
        if dt not in _DTYPE_SIZES:
            raise UnsupportedDtypeError(f"{self.path}: tensor {name!r} has unknown dtype {dt}")
        return math.prod(sl.get_shape()) * _DTYPE_SIZES[dt]

    def check_tensor(self, name: str, shape: tuple[int, ...] | None = None) -> None:
        """Raise as `tensor(name, shape)` would (missing, wrong shape, unreadable dtype)
        without reading any data: validates a whole checkpoint before a long job."""
        self._check(name, self._slice(name, shape), shape)

    def _check(self, name: str, sl: Any, expected: tuple[int, ...] | None) -> None:
        dt = sl.get_dtype()
        if dt not in _READABLE_DTYPES:
            raise UnsupportedDtypeError(
                f"{self.path}: tensor {name!r} has dtype {dt}, which this runtime cannot run "
                f"(supported: {', '.join(_READABLE_DTYPES)})"
            )
        shape = tuple(sl.get_shape())
        if expected is not None and shape != tuple(expected):
            raise TensorShapeError(
                f"{self.path}: tensor {name!r} has shape {list(shape)}, expected "
                f"{list(expected)} from config.json"
            )

    def tensor(
        self,
        name: str,
        shape: tuple[int, ...] | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Read one tensor, checking its shape against `shape` and converting to `dtype`."""
        sl = self._slice(name, shape)
        self._check(name, sl, shape)
        t = sl[:]
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def tensor_as_stored(self, name: str) -> torch.Tensor:
        """Read one tensor unchecked and unconverted, any dtype: for copying it through."""
        return self._slice(name, None)[:]

    def _row(self, name: str, index: int, shape: tuple[int, ...], dtype: torch.dtype | None):
        """Read `tensor[index]` of a stacked tensor without touching the other rows."""
        sl = self._slice(name, shape)
        self._check(name, sl, shape)
        t = sl[index : index + 1][0]
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    # -- experts ------------------------------------------------------------------------
    def expert_layout(self, layer: int) -> str:
        """'per_expert' or 'fused' for a MoE layer's routed experts."""
        p = f"model.layers.{layer}.mlp.experts"
        if f"{p}.0.gate_proj.weight" in self:
            return "per_expert"
        if f"{p}.gate_up_proj" in self:
            return "fused"
        raise MissingTensorError(
            f"{self.path}: layer {layer} has no routed experts: neither {p}.0.gate_proj.weight "
            f"(per-expert layout) nor {p}.gate_up_proj (fused layout) is present"
        )

    def expert_tensors(self, layer: int) -> dict[str, tuple[int, ...]]:
        """Name -> expected shape of every routed-expert tensor of `layer`, in its layout."""
        c = self.config
        n, h, i = c.num_experts, c.hidden_size, c.moe_intermediate_size
        p = f"model.layers.{layer}.mlp.experts"
        if self.expert_layout(layer) == "fused":
            return {f"{p}.gate_up_proj": (n, 2 * i, h), f"{p}.down_proj": (n, h, i)}
        want = {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
        return {f"{p}.{e}.{proj}.weight": s for e in range(n) for proj, s in want.items()}

    def expert(
        self,
        layer: int,
        expert: int,
        dtype: torch.dtype | None = None,
        *,
        check_finite: bool = False,
    ) -> ExpertTensors:
        """The weights of routed expert `expert` of layer `layer`, read on demand.

        `check_finite` raises NonFiniteTensorError, naming the tensor, if any weight is inf
        or NaN (one extra pass over the expert's data).
        """
        c = self.config
        n, h, i = c.num_experts, c.hidden_size, c.moe_intermediate_size
        if not 0 <= expert < n:
            raise IndexError(f"expert {expert} out of range (num_experts={n})")
        p = f"model.layers.{layer}.mlp.experts"
        if self.expert_layout(layer) == "per_expert":
            q = f"{p}.{expert}"
            names = [f"{q}.{proj}.weight" for proj in ("gate_proj", "up_proj", "down_proj")]
            parts = ["", "", ""]
            gate = self.tensor(names[0], (i, h), dtype)
            up = self.tensor(names[1], (i, h), dtype)
            down = self.tensor(names[2], (h, i), dtype)
        else:
            names = [f"{p}.gate_up_proj", f"{p}.gate_up_proj", f"{p}.down_proj"]
            parts = [f" (expert {expert}, {x})" for x in ("gate rows", "up rows", "all rows")]
            gate_up = self._row(f"{p}.gate_up_proj", expert, (n, 2 * i, h), dtype)
            gate, up = gate_up[:i], gate_up[i:]
            down = self._row(f"{p}.down_proj", expert, (n, h, i), dtype)
        if check_finite:
            for name, part, t in zip(names, parts, (gate, up, down), strict=True):
                if not _all_finite(t):
                    raise NonFiniteTensorError(
                        f"{self.path}: tensor {name!r}{part} has inf or NaN values"
                    )
        return ExpertTensors(gate=gate, up=up, down=down)


def _all_finite(t: torch.Tensor) -> bool:
    if t.dtype == torch.float64:  # a float64 sum of large finite float64s may overflow
        return bool(torch.isfinite(t).all())
    # The float64 sum of finite float32/16 values cannot overflow, so it is non-finite iff
    # some element is; far cheaper than isfinite().all() on bf16.
    return math.isfinite(float(t.sum(dtype=torch.float64)))
