"""Type stub for the compiled extension `dynaexq._core` (checked by mypy stubtest).

The expert pool (fixed-size slot classes in one arena reserved at construction), the
per-expert precision state machine (`ExpertTable`) with leases, layout sizing, and the
KV cache's page pool on a device budget shared with the expert pool.
"""

import os
from collections.abc import Sequence
from typing import Any, final

__version__: str

class PoolError(Exception):
    """Base class of every error raised by the expert pool and the expert table."""

class PoolExhausted(PoolError):
    """No free slot in the class, or the byte budget would be exceeded."""

class DoubleFree(PoolError):
    """The block was already freed (or freed and handed out again since)."""

class ForeignBlock(PoolError):
    """The block does not belong to this pool."""

class BlockInUse(PoolError):
    """The block is leased by readers or owned by the expert table."""

class IllegalTransition(PoolError):
    """The state machine does not allow this transition (or the ticket is unknown)."""

class LayoutError(PoolError):
    """The byte budget cannot hold the layout; the message says how many bytes are missing."""

class QueueFull(PoolError):
    """The transfer queue is at capacity; the request was not queued."""

class BackendError(PoolError):
    """The copy backend failed (e.g. no CUDA driver library)."""

@final
class Block:
    """A live slot of an `ExpertPool`: `offset`/`nbytes` locate it in the arena."""

    @property
    def offset(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def cls(self) -> str: ...
    @property
    def index(self) -> int: ...
    @property
    def generation(self) -> int: ...
    def __eq__(self, value: object, /) -> bool: ...
    def __hash__(self) -> int: ...

@final
class BlockView:
    """Zero-copy bytes of one block (buffer protocol); wrap with `memoryview`."""

    def __len__(self) -> int: ...

@final
class ExpertPool:
    """Fixed-size slot classes in one arena; O(1) deterministic alloc/free.

    Raises ValueError for invalid sizes/counts/alignment or an unknown class name.
    """

    def __new__(
        cls,
        slot_bytes: dict[str, int],
        slots: dict[str, int],
        alignment: int = 256,
        budget: int | None = None,
        device: int | None = None,
        shared_budget: DeviceBudget | None = None,
        kv_head_bytes: int = 0,
        lending: tuple[str, str] | None = None,
        host_classes: list[str] | None = None,
    ) -> ExpertPool:
        """`device=N` reserves the arena on CUDA device N (BackendError without CUDA).
        `shared_budget`: reserve every slot from a `DeviceBudget` shared with a
        `KvPagePool` (then `budget` must be None). `kv_head_bytes`: bytes at the arena's
        head for the KV floor pages. `lending=(host, guest)`: slots of class `host` may
        be lent to the KV pages, each hosting one slot of class `guest` at its head.
        `host_classes`: classes whose slots live in host memory the device reads (the
        arena's tail, from `host_from`; on CUDA page-locked and mapped): they reserve no
        budget and count in `stats()["host_bytes"]`."""
    def alloc(self, cls: str) -> Block:
        """Allocate a committed block (lowest free slot); PoolExhausted when full."""
    def reserve(self, cls: str) -> Block:
        """Reserve a block for a copy in flight (pending until `commit`)."""
    def commit(self, block: Block) -> None: ...
    def free(self, block: Block) -> None:
        """Return a block; DoubleFree, ForeignBlock or BlockInUse on misuse."""
    def is_live(self, block: Block) -> bool: ...
    def readers(self, block: Block) -> int: ...
    def capacity(self, cls: str) -> int: ...
    def free_count(self, cls: str) -> int: ...
    def live_count(self, cls: str) -> int: ...
    def slot_bytes(self, cls: str) -> int: ...
    def region(self, cls: str) -> tuple[int, int]: ...
    def view(self, block: Block) -> memoryview:
        """A writable zero-copy view of a block this caller allocated (e.g. for
        `torch.frombuffer`); `free` raises BlockInUse while the view lives. The table's
        blocks are read through `Lease.view()` and written through `Transition.write()`."""
    def address(self, block: Block) -> int: ...
    def arena_view(self) -> memoryview:
        """A writable view of the whole host arena for the KV cache's page rows."""
    @property
    def arena_address(self) -> int: ...
    @property
    def kv_head_bytes(self) -> int: ...
    def lend(self, cls: str) -> tuple[int, int, int]:
        """Lend the lowest free slot of the lending class: (index, offset, nbytes) of the
        arena bytes the KV pages may use. PoolExhausted when none is free."""
    def unlend(self, cls: str, index: int) -> None:
        """Take a lent slot back (its pages offline already); ValueError while its
        hosted guest slot is live."""
    def can_unlend(self, cls: str, index: int) -> bool: ...
    def lent(self, cls: str) -> list[int]: ...
    def lent_range(self, cls: str, index: int) -> tuple[int, int] | None: ...
    def read(self, block: Block) -> bytes:
        """A copy of the block's bytes (host or device arena; for checks). BlockInUse for
        a block a transition is still filling."""
    @property
    def classes(self) -> list[str]: ...
    @property
    def total_bytes(self) -> int: ...
    @property
    def host_from(self) -> int:
        """Where the host-memory classes' tail starts (`total_bytes` when there is none)."""
    @property
    def budget(self) -> int: ...
    @property
    def alignment(self) -> int: ...
    @property
    def reserved_bytes(self) -> int: ...
    @property
    def pending_bytes(self) -> int: ...
    @property
    def high_water_bytes(self) -> int: ...
    @property
    def arena_kind(self) -> str: ...
    def stats(self) -> dict[str, Any]: ...

@final
class DeviceBudget:
    """One byte budget for expert slots and KV pages: experts + KV pages <= limit.
    `kv_floor` bytes stay reserved for KV pages, which hold at most `kv_ceiling`;
    `expert_floor` bytes stay reserved for experts."""

    def __new__(
        cls, limit: int, kv_floor: int = 0, kv_ceiling: int | None = None, expert_floor: int = 0
    ) -> DeviceBudget: ...
    @property
    def limit(self) -> int: ...
    def snapshot(self) -> dict[str, int]:
        """limit, expert_bytes, kv_bytes, kv_floor, kv_ceiling, expert_floor, charged_bytes,
        expert_headroom, kv_headroom, high_water_bytes, moved_to_kv_bytes,
        moved_to_experts_bytes, read at one instant."""
    def fits(self, use: str, nbytes: int) -> bool:
        """Whether `nbytes` more for `use` ("experts" or "kv") would fit now."""
    def set_expert_floor(self, floor: int) -> None:
        """Keep `floor` bytes for experts (KV pages cannot take them)."""
    def set_kv_bounds(self, kv_floor: int, kv_ceiling: int) -> None:
        """PoolExhausted when the floor does not fit beside the experts' bytes."""

@final
class KvPagePool:
    """Fixed-size KV pages from a `DeviceBudget`: per-sequence block tables (lowest free
    pages first), growth, truncation, refcounted prefix pages keyed by a hash of their
    tokens and their prefix. The pages' memory belongs to the caller."""

    def __new__(
        cls,
        page_tokens: int,
        page_bytes: int,
        pages: int,
        budget: DeviceBudget,
        online: tuple[int, int] | None = None,
    ) -> KvPagePool:
        """`online=(start, stop)`: only those pages may be handed out at first (default:
        all); `add_pages` / `remove_pages` move ranges online and offline."""
    def add_pages(self, start: int, stop: int) -> None: ...
    def remove_pages(self, start: int, stop: int) -> None:
        """Take pages offline (cached ones evicted); ValueError while one is held."""
    def range_unheld(self, start: int, stop: int) -> bool: ...
    def is_online(self, page: int) -> bool: ...
    def is_cached(self, page: int) -> bool:
        """A published page no sequence holds, kept for reuse until evicted."""
    @property
    def page_tokens(self) -> int: ...
    @property
    def page_bytes(self) -> int: ...
    @property
    def capacity(self) -> int: ...
    @property
    def budget(self) -> DeviceBudget: ...
    @property
    def available(self) -> int:
        """Pages a reservation could take now (arena and budget permitting)."""
    def pages_for(self, tokens: int) -> int: ...
    def pages_short(self, seq: int, tokens: int) -> int: ...
    def open(self, seq: int) -> None: ...
    def share_prefix(self, seq: int, prompt: Sequence[int]) -> int:
        """Take the published pages of the prompt's longest shared prefix; returns the
        tokens they cover (never the prompt's last token)."""
    def reserve(self, seq: int, tokens: int) -> list[int]:
        """Grow to `tokens` tokens: every new page or none (PoolExhausted)."""
    def publish(self, seq: int, tokens: Sequence[int]) -> int: ...
    def truncate(self, seq: int, tokens: int) -> int: ...
    def close(self, seq: int) -> int: ...
    def block_table(self, seq: int) -> list[int]: ...
    def tokens(self, seq: int) -> int: ...
    def refcount(self, page: int) -> int: ...
    def __contains__(self, seq: object, /) -> bool: ...
    def __len__(self) -> int: ...
    def stats(self) -> dict[str, int]: ...

@final
class Version:
    """A published version of one expert."""

    @property
    def tier(self) -> int: ...
    @property
    def version(self) -> int: ...
    @property
    def block(self) -> Block: ...
    def __eq__(self, value: object, /) -> bool: ...
    __hash__: None  # type: ignore[assignment]

@final
class Transition:
    """An admitted transition. The object `ExpertTable.begin` returned owns it: `write`
    the target tier's bytes, then `table.complete(t)` or `table.abort(t)` (dropped
    unsettled, it is aborted). One from `transition_of` only describes it."""

    def write(self, data: Any, offset: int = 0) -> None: ...
    @property
    def owned(self) -> bool: ...
    @property
    def ticket(self) -> int: ...
    @property
    def layer(self) -> int: ...
    @property
    def expert(self) -> int: ...
    @property
    def from_tier(self) -> int: ...
    @property
    def to_tier(self) -> int: ...
    @property
    def block(self) -> Block: ...

@final
class Lease:
    """A read lease on a published version; a context manager."""

    def __enter__(self) -> Lease: ...
    def __exit__(self, *_args: object) -> None: ...
    def release(self) -> None: ...
    @property
    def released(self) -> bool: ...
    @property
    def version(self) -> Version: ...
    @property
    def tier(self) -> int: ...
    @property
    def block(self) -> Block: ...
    def record_use(self) -> None: ...
    def view(self) -> memoryview:
        """A read-only zero-copy view of the block; it holds its own lease."""

@final
class ExpertTable:
    """One entry per (layer, expert), each with exactly one published version.

    `tier_classes[layer][tier]` is a class name or a list of names in preference order;
    give one layer to share it across all layers. Tier 0 is the lowest precision.
    """

    def __new__(
        cls,
        pool: ExpertPool,
        experts: Sequence[int],
        tier_classes: Sequence[Sequence[str | Sequence[str]]],
        initial_tiers: Sequence[Sequence[int]] | None = None,
        manual_fence: bool = False,
        compute_stream: Any = None,
    ) -> ExpertTable:
        """`compute_stream`: the stream object (e.g. `torch.cuda.current_stream()`, kept
        alive by the table) or 0, on which `Lease.record_use` records each use of a block
        (device pools only)."""
    def lease(self, layer: int, expert: int) -> Lease: ...
    def published(self, layer: int, expert: int) -> Version: ...
    def tier(self, layer: int, expert: int) -> int: ...
    def pin_step(self) -> StepPin:
        """Lease every published version for one step of a device executor and read the
        table image its kernels take."""
    def tiers(self) -> bytes:
        """The published tier of every expert, layer-major (one byte each)."""
    def transition_of(self, layer: int, expert: int) -> Transition | None: ...
    def begin(self, layer: int, expert: int, tier: int) -> Transition: ...
    def complete(self, transition: Transition) -> Version: ...
    def abort(self, transition: Transition) -> None: ...
    def load(self, layer: int, expert: int, data: Any) -> None:
        """Write a published block's first bytes, before the first lease seals the table."""
    def seal(self) -> None: ...
    @property
    def sealed(self) -> bool: ...
    def reclaim(self) -> list[Block]: ...
    def retired(self) -> list[Block]: ...
    def signal_uses(self) -> None: ...
    @property
    def outstanding_uses(self) -> int: ...
    @property
    def pool(self) -> ExpertPool: ...
    @property
    def num_layers(self) -> int: ...
    def experts(self, layer: int) -> int: ...
    def num_tiers(self, layer: int) -> int: ...
    def stats(self) -> dict[str, Any]: ...

@final
class Layout:
    """A two-tier pool layout sized from a byte budget."""

    @property
    def slot_bytes(self) -> dict[str, int]: ...
    @property
    def slots(self) -> dict[str, int]: ...
    @property
    def alignment(self) -> int: ...
    @property
    def total_bytes(self) -> int: ...
    @property
    def budget(self) -> int: ...
    @property
    def experts(self) -> list[int]: ...
    @property
    def hot(self) -> list[int]: ...
    @property
    def tier_classes(self) -> list[list[list[str]]]: ...
    def initial_tiers(self) -> list[list[int]]: ...

def plan_layout(
    budget: int,
    experts: Sequence[int],
    lo_bytes: Sequence[int],
    hi_bytes: Sequence[int],
    hot: int | float,
    staging: int = 0,
    alignment: int = 256,
) -> Layout: ...

# --- the precision controller ----------------------------------------------------------

@final
class HotnessTracker:
    """Per (layer, expert) hotness from the router of every forward step: an EMA over
    steps (`signal="ema"`, `alpha`) or the sum over the last `window` steps."""

    def __new__(
        cls,
        layers: int,
        experts: int,
        signal: str = "ema",
        alpha: float = 0.9,
        window: int = 256,
    ) -> HotnessTracker: ...
    def observe(
        self, layer: int, expert_ids: Sequence[int], probs: Sequence[float], top_k: int
    ) -> None: ...
    def observe_mass(self, layer: int, mass: Sequence[float], tokens: int) -> None: ...
    def end_step(self) -> None: ...
    def scores(self) -> list[float]: ...
    def seed(self, scores: Sequence[float]) -> None: ...
    @property
    def steps(self) -> int: ...
    @property
    def layers(self) -> int: ...
    @property
    def experts(self) -> int: ...

def plan_transitions(
    layers: int,
    experts: int,
    scores: Sequence[float],
    current: Sequence[int],
    busy: Sequence[bool],
    tier_bytes: Sequence[int],
    capacity: Sequence[int],
    split: str = "per-layer",
    gain: Sequence[float] | None = None,
    delta: float = 0.01,
    max_transitions: int = ...,
    max_bytes: int = ...,
    max_in_flight: int = 4,
    in_flight: int = 0,
    min_gain_per_byte: float = 0.0,
    sequential: bool = False,
    score_std: Sequence[float] | None = None,
    z: float = 0.0,
    gain_std: Sequence[float] | None = None,
) -> tuple[list[int], list[tuple[int, int, int, int, int]], int]:
    """One planning round: (target tier per expert, transitions as (layer, expert, from,
    to, bytes), number of wanted moves deferred by the limits); move groups whose gain
    is at most `min_gain_per_byte` x the bytes they copy are dropped. `sequential`:
    demote first through free slots only (a displaced expert goes to tier 0 when its
    wanted tier is full), promote into the freed slot at a later plan. `score_std`: the
    standard error of every score; a group's gain less `z` standard errors of it must
    then pay (and be positive). `gain_std` (with `score_std`; experts x tiers): the
    standard error of each expert's loss at each tier per unit of score, added to the
    uncertainty of every move between tiers."""

def knapsack(
    values: Sequence[float], tier_bytes: Sequence[int], budget: int, exact: bool = False
) -> list[int] | None:
    """Multiple-choice knapsack: the tier of each item maximising total value in budget."""

@final
class HostStore:
    """Every tier of every expert, packed, in host memory; filled once, then frozen."""

    def __new__(
        cls,
        experts: Sequence[int],
        tier_bytes: Sequence[Sequence[int]],
        alignment: int = 256,
        device: int | None = None,
    ) -> HostStore:
        """`device=N` allocates pinned (page-locked) memory for device N's copies."""
    @staticmethod
    def mapped(
        files: Sequence[str | os.PathLike[str]],
        experts: Sequence[int],
        tier_bytes: Sequence[Sequence[int]],
        locations: Sequence[Sequence[tuple[int, int, int]]],
        staging_slots: int = 8,
        alignment: int = 256,
        device: int | None = None,
    ) -> HostStore:
        """Over memory-mapped files: locations[l][t] = (file, offset of expert 0, stride);
        copies pass through a ring of `staging_slots` slots (pinned with `device=N`)."""
    @property
    def mapped_files(self) -> bool: ...
    @property
    def resident_bytes(self) -> int: ...
    def staging_stats(self) -> dict[str, int] | None: ...
    def write(self, layer: int, expert: int, tier: int, data: Any) -> None:
        """Copy the packed bytes in (any buffer); only before `freeze`."""
    def freeze(self) -> None: ...
    @property
    def frozen(self) -> bool: ...
    @property
    def total_bytes(self) -> int: ...
    def tier_bytes(self, layer: int, tier: int) -> int: ...
    def view(self, layer: int, expert: int, tier: int) -> memoryview: ...

@final
class Completion:
    """A finished transfer: status is completed, failed, cancelled or rejected."""

    @property
    def id(self) -> int: ...
    @property
    def layer(self) -> int: ...
    @property
    def expert(self) -> int: ...
    @property
    def tier(self) -> int: ...
    @property
    def status(self) -> str: ...
    @property
    def version(self) -> int | None: ...
    @property
    def message(self) -> str | None: ...

@final
class TransferEngine:
    """Asynchronous migration queue over a table and a host store.

    backend: "cpu" (worker threads), "manual" (copies finish via `finish_copy`, for
    tests) or "cuda". Statuses: queued, in_flight, completed, failed, cancelled, rejected.
    """

    def __new__(
        cls,
        table: ExpertTable,
        store: HostStore,
        max_in_flight: int = 4,
        queue_capacity: int = 64,
        backend: str = "cpu",
        workers: int = 1,
        driver: bool = True,
        history: int = 4096,
    ) -> TransferEngine:
        """Uploads every published version, so the table must not be leased yet; one
        engine per table, and it alone settles its transitions."""
    def submit(
        self,
        layer: int,
        expert: int,
        tier: int,
        urgent: bool = False,
        fault: str | float | None = None,
    ) -> int:
        """Queue a transfer; QueueFull when full, IllegalTransition when already queued."""
    def cancel(self, id: int) -> bool: ...
    def poll(self) -> list[Completion]: ...
    def status(self, id: int) -> str: ...
    def wait(self, id: int, timeout: float | None = None) -> str: ...
    def drain(self, timeout: float | None = None) -> bool: ...
    def release_hung(self) -> None: ...
    def pending_copies(self) -> list[int]: ...
    def finish_copy(self, id: int, ok: bool = True) -> bool: ...
    @property
    def table(self) -> ExpertTable: ...
    @property
    def backend(self) -> str: ...
    def stats(self) -> dict[str, int]: ...

# ------------------------------------------------------------ the CPU expert executor

@final
class CpuExperts:
    """One MoE layer per call on the CPU, straight from the packed bytes of the table's
    published versions (every hit expert leased for the call), parallel over experts and
    output rows on `threads` threads, with the GIL released. `tiers[t]` names table tier
    t ("bf16", "fp16", "int4g128", "int2g64a", ...). `activations`: "int8" (integer tiers
    take their inputs quantized to int8 per weight group, integer dot products) or "float"
    (exact float32 inputs)."""

    def __new__(
        cls,
        table: ExpertTable,
        tiers: Sequence[str],
        hidden_size: int,
        intermediate_size: int,
        alignment: int = 256,
        threads: int = 1,
        activations: str = "int8",
    ) -> CpuExperts: ...
    def forward(
        self, layer: int, x: Any, expert_ids: Any, weights: Any, out: Any
    ) -> tuple[list[int], list[float]]:
        """x float32 [T, H], expert_ids int64 [T, k], weights float32 [T, k] -> `out`
        float32 [T, H]; returns (pairs, routing weight) served per table tier."""
    @property
    def threads(self) -> int: ...
    @property
    def activations(self) -> str: ...

@final
class StepPin:
    """Every published version leased for one device step, with the image its kernels
    read: per entry (layer-major) the tier and the byte offset of the block in the arena.
    `record()` once the step's kernels are enqueued (use marks, then the leases go);
    `release()`, leaving a `with` block or dropping it gives them back without marks."""

    @property
    def tiers(self) -> bytes: ...
    @property
    def offsets(self) -> bytes:
        """Little-endian int64 per entry."""
    @property
    def base_address(self) -> int: ...
    @property
    def held(self) -> bool: ...
    def record(self) -> None: ...
    def release(self) -> None: ...
    def __enter__(self) -> StepPin: ...
    def __exit__(self, *args: object) -> None: ...

# ------------------------------------------------------------ dequantize kernels

def kernel_launch_plan(
    weight: str,
    act: str,
    qweight: int,
    scales: int,
    zeros: int,
    x: int,
    y: int,
    t: int,
    n: int,
    k: int,
    group_size: int,
    swiglu: bool,
    op: str | None = None,
) -> tuple[str, tuple[int, int, int], tuple[int, int, int], list[int], list[int]]:
    """(kernel name, grid, block, pointers, ints) of one launch after the launcher's checks
    (ValueError); pointers and ints as the launcher passes them to the kernel."""

def select_ptx_arch(major: int, minor: int, available: Sequence[int] | None = None) -> int | None:
    """PTX arch a device of compute capability major.minor loads; None if too old."""

def resolve_ptx(ptx_dir: str | os.PathLike[str], major: int, minor: int) -> tuple[int, list[str]]:
    """(arch, [gemv file, gemm file]) a device of major.minor loads from ptx_dir."""

def check_ptx(module: str, ptx: str) -> None:
    """ValueError unless the PTX of module "gemv"/"gemm" exports every dq_* kernel."""

@final
class DequantKernels:
    """The dq_* kernels in a device's primary context; launches on a caller-given raw
    CUDA stream. BackendError without CUDA support, driver or device."""

    def __new__(cls, ptx_dir: str | os.PathLike[str], device: int = 0) -> DequantKernels: ...
    @staticmethod
    def from_ptx(gemv: str, gemm: str, arch: int, device: int = 0) -> DequantKernels: ...
    @property
    def arch(self) -> int: ...
    @property
    def device(self) -> int: ...
    def launch(
        self,
        weight: str,
        act: str,
        qweight: int,
        scales: int,
        zeros: int,
        x: int,
        y: int,
        t: int,
        n: int,
        k: int,
        group_size: int,
        swiglu: bool,
        stream: int = 0,
        op: str | None = None,
    ) -> str:
        """Enqueue one matrix on `stream` (raw pointers, 0 = NULL); returns the kernel name."""
    def expert_forward(
        self,
        weight: str,
        act: str,
        gate_up: tuple[int, int, int],
        down: tuple[int, int, int],
        x: int,
        workspace: int,
        y: int,
        t: int,
        hidden: int,
        intermediate: int,
        group_size: int,
        stream: int = 0,
        op: str | None = None,
    ) -> None:
        """gate_up (SwiGLU) into workspace [T, I], then down into y [T, H], on `stream`."""
