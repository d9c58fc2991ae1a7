//! All PyO3 glue for the `dynaexq._core` extension module.
//!
//! Errors become Python exceptions (never panics across the FFI boundary). Pool and table
//! calls hold their locks only for a few hundred nanoseconds and never need the GIL
//! inside, so they run with the GIL held; when a lock is contended the call releases the
//! GIL (`Python::detach`) while it waits. The lease path is lock-free.

use std::collections::HashMap;
use std::os::raw::{c_int, c_void};
use std::sync::{Arc, Mutex, TryLockError};

use pyo3::create_exception;
use pyo3::exceptions::{PyBufferError, PyException, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyMemoryView, PyString};

use crate::controller::{
    knapsack_exact, knapsack_greedy, plan as plan_controller, Capacity, ControllerError,
    HotnessTracker, PlanInput, PlannerConfig, Signal,
};
use crate::errors::Error;
use crate::layout::{plan_layout as plan, HotSlots, LayerShape, Layout, LayoutRequest};
use crate::pool::{self, Arena, ClassId, ClassSpec, PoolConfig};
use crate::store::HostStore;
use crate::table::{
    self, EntryState, LayerTiers, ManualFence, OwnedLease, SyncUses, Transition as RTransition,
    UseFence,
};
use crate::transfer::cpu::{CpuBackend, ManualBackend};
use crate::transfer::{
    Completion, CopyBackend, EngineConfig, Fault, Priority, TransferEngine, TransferStatus,
};

create_exception!(
    dynaexq._core,
    PoolError,
    PyException,
    "Base class of every error raised by the expert pool and the expert table."
);
create_exception!(
    dynaexq._core,
    PoolExhausted,
    PoolError,
    "No free slot in the class, or the byte budget would be exceeded."
);
create_exception!(
    dynaexq._core,
    DoubleFree,
    PoolError,
    "The block was already freed (or freed and handed out again since)."
);
create_exception!(
    dynaexq._core,
    ForeignBlock,
    PoolError,
    "The block does not belong to this pool."
);
create_exception!(
    dynaexq._core,
    BlockInUse,
    PoolError,
    "The block is leased by readers or owned by the expert table."
);
create_exception!(
    dynaexq._core,
    IllegalTransition,
    PoolError,
    "The state machine does not allow this transition (or the ticket is unknown)."
);
create_exception!(
    dynaexq._core,
    LayoutError,
    PoolError,
    "The byte budget cannot hold the requested layout; the message says how many bytes are missing."
);

create_exception!(
    dynaexq._core,
    QueueFull,
    PoolError,
    "The transfer queue is at capacity; the request was not queued."
);
create_exception!(
    dynaexq._core,
    BackendError,
    PoolError,
    "The copy backend failed (e.g. no CUDA driver library)."
);

fn to_py(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::InvalidConfig(_) | Error::UnknownClass { .. } | Error::OutOfRange(_) => {
            PyValueError::new_err(msg)
        }
        Error::Exhausted { .. } | Error::BudgetExceeded { .. } => PoolExhausted::new_err(msg),
        Error::DoubleFree { .. } => DoubleFree::new_err(msg),
        Error::ForeignBlock(_) => ForeignBlock::new_err(msg),
        Error::BlockLeased { .. } | Error::OwnedByTable { .. } => BlockInUse::new_err(msg),
        Error::IllegalTransition { .. } | Error::UnknownTicket(_) => {
            IllegalTransition::new_err(msg)
        }
        Error::BudgetTooSmall { .. } => LayoutError::new_err(msg),
        Error::NotPending { .. } => PoolError::new_err(msg),
        Error::QueueFull { .. } => QueueFull::new_err(msg),
        Error::UnknownTransfer(_) => PyValueError::new_err(msg),
        Error::Backend(_) => BackendError::new_err(msg),
    }
}

/// Run `f` under the mutex; if it is contended, wait with the GIL released.
fn with_locked<T: Send, R: Send>(
    py: Python<'_>,
    m: &Mutex<T>,
    f: impl FnOnce(&mut T) -> R + Send,
) -> R {
    match m.try_lock() {
        Ok(mut g) => f(&mut g),
        Err(TryLockError::Poisoned(p)) => f(&mut p.into_inner()),
        Err(TryLockError::WouldBlock) => py.detach(|| f(&mut crate::sync::lock(m))),
    }
}

/// The CUDA context of a device pool (feature "cuda"); a unit type otherwise.
#[cfg(feature = "cuda")]
#[derive(Clone)]
struct DeviceCtx(Arc<cudarc::driver::CudaContext>);
#[cfg(not(feature = "cuda"))]
#[derive(Clone)]
struct DeviceCtx;

#[cfg(feature = "cuda")]
fn open_device(py: Python<'_>, ordinal: i64) -> PyResult<DeviceCtx> {
    let ordinal = usize::try_from(ordinal)
        .map_err(|_| PyValueError::new_err(format!("device must be >= 0, got {ordinal}")))?;
    py.detach(|| crate::transfer::cuda::context(ordinal))
        .map(DeviceCtx)
        .map_err(to_py)
}

#[cfg(not(feature = "cuda"))]
fn open_device(_py: Python<'_>, _ordinal: i64) -> PyResult<DeviceCtx> {
    Err(BackendError::new_err(
        "this build has no CUDA support (build the extension with the 'cuda' feature)",
    ))
}

fn positive(what: &str, v: i64) -> PyResult<u64> {
    if v <= 0 {
        return Err(PyValueError::new_err(format!(
            "{what} must be > 0, got {v}"
        )));
    }
    Ok(v as u64)
}

// ---------------------------------------------------------------------------------------

/// A live slot of an `ExpertPool`: `offset` and `nbytes` locate it in the pool's arena.
#[pyclass(frozen, eq, hash, name = "Block", module = "dynaexq._core")]
pub struct PyBlock {
    inner: pool::Block,
    cls: Py<PyString>,
}

impl PartialEq for PyBlock {
    fn eq(&self, other: &Self) -> bool {
        self.inner == other.inner
    }
}
impl std::hash::Hash for PyBlock {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.inner.hash(state)
    }
}

#[pymethods]
impl PyBlock {
    /// Byte offset of the block from the start of the pool's arena.
    #[getter]
    fn offset(&self) -> u64 {
        self.inner.offset
    }
    /// Size of the block in bytes (the class's aligned slot size).
    #[getter]
    fn nbytes(&self) -> u64 {
        self.inner.nbytes
    }
    /// Name of the slot class.
    #[getter]
    fn cls(&self, py: Python<'_>) -> Py<PyString> {
        self.cls.clone_ref(py)
    }
    /// Slot index inside the class.
    #[getter]
    fn index(&self) -> u32 {
        self.inner.index
    }
    /// Allocation count of the slot (distinguishes a stale handle from the live one).
    #[getter]
    fn generation(&self) -> u32 {
        self.inner.generation
    }
    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "Block(cls={:?}, index={}, offset={}, nbytes={})",
            self.cls.bind(py).to_string(),
            self.inner.index,
            self.inner.offset,
            self.inner.nbytes
        )
    }
}

/// Zero-copy bytes of one block (exported through the buffer protocol).
#[pyclass(frozen, name = "BlockView", module = "dynaexq._core")]
pub struct BlockView {
    arena: Arc<dyn Arena>,
    offset: u64,
    len: u64,
    readonly: bool,
    /// A lease pinning the block while a view of a published version exists.
    _lease: Option<OwnedLease>,
}

#[pymethods]
impl BlockView {
    /// # Safety
    /// Called by CPython with a valid `view`; the buffer stays valid while this object
    /// (which owns the arena, and a lease for published versions) is alive, and
    /// `PyBuffer_FillInfo` takes a reference to it for the view's lifetime.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let me = slf.get();
        let base = me
            .arena
            .host_ptr()
            .ok_or_else(|| PyBufferError::new_err("the pool's arena is not host memory"))?;
        // SAFETY: offset + len lies inside the arena (checked when the view was made).
        let ptr = unsafe { base.as_ptr().add(me.offset as usize) };
        // SAFETY: `view` is the caller's buffer struct; ptr/len describe live memory.
        let r = unsafe {
            ffi::PyBuffer_FillInfo(
                view,
                slf.as_ptr(),
                ptr as *mut c_void,
                me.len as ffi::Py_ssize_t,
                c_int::from(me.readonly),
                flags,
            )
        };
        if r == -1 {
            return Err(PyErr::fetch(slf.py()));
        }
        Ok(())
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}

    fn __len__(&self) -> usize {
        self.len as usize
    }
}

fn memoryview<'py>(py: Python<'py>, v: BlockView) -> PyResult<Bound<'py, PyMemoryView>> {
    if v.arena.host_ptr().is_none() {
        return Err(PyBufferError::new_err(
            "the pool's arena is not host memory",
        ));
    }
    let obj = Bound::new(py, v)?;
    PyMemoryView::from(obj.as_any())
}

#[cfg(feature = "cuda")]
fn device_pool(py: Python<'_>, cfg: &PoolConfig, ctx: &DeviceCtx) -> PyResult<pool::ExpertPool> {
    let ctx = ctx.0.clone();
    py.detach(|| {
        pool::ExpertPool::with_arena(cfg, |len, align| {
            Ok(
                Arc::new(crate::transfer::cuda::DeviceArena::new(&ctx, len, align)?)
                    as Arc<dyn Arena>,
            )
        })
    })
    .map_err(to_py)
}

#[cfg(not(feature = "cuda"))]
fn device_pool(_py: Python<'_>, _cfg: &PoolConfig, _ctx: &DeviceCtx) -> PyResult<pool::ExpertPool> {
    Err(BackendError::new_err("this build has no CUDA support"))
}

/// The fragmentation-free expert pool: one arena reserved at construction, one fixed
/// region of equal-size slots per class, O(1) deterministic alloc/free.
#[pyclass(frozen, name = "ExpertPool", module = "dynaexq._core")]
pub struct PyExpertPool {
    inner: Arc<Mutex<pool::ExpertPool>>,
    names: Vec<Py<PyString>>,
    ids: HashMap<String, ClassId>,
    arena: Arc<dyn Arena>,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    device: Option<DeviceCtx>,
}

impl PyExpertPool {
    fn class(&self, cls: &str) -> PyResult<ClassId> {
        self.ids.get(cls).copied().ok_or_else(|| {
            let known: Vec<_> = self.ids.keys().cloned().collect();
            to_py(Error::UnknownClass {
                name: cls.to_string(),
                known: known.join(", "),
            })
        })
    }
    fn block(&self, py: Python<'_>, b: pool::Block) -> PyBlock {
        PyBlock {
            inner: b,
            cls: self.names[b.class.0 as usize].clone_ref(py),
        }
    }
    fn with<R: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut pool::ExpertPool) -> R + Send,
    ) -> R {
        with_locked(py, &self.inner, f)
    }
}

#[pymethods]
impl PyExpertPool {
    #[new]
    #[pyo3(signature = (slot_bytes, slots, alignment = 256, budget = None, device = None))]
    fn new(
        py: Python<'_>,
        slot_bytes: &Bound<'_, PyDict>,
        slots: &Bound<'_, PyDict>,
        alignment: i64,
        budget: Option<i64>,
        device: Option<i64>,
    ) -> PyResult<Self> {
        let mut classes = Vec::new();
        for (k, v) in slot_bytes.iter() {
            let name: String = k.extract()?;
            let size = positive(&format!("slot_bytes[{name:?}]"), v.extract()?)?;
            let count = slots.get_item(&name)?.ok_or_else(|| {
                PyValueError::new_err(format!("class {name:?} has a slot size but no slot count"))
            })?;
            let count = positive(&format!("slots[{name:?}]"), count.extract()?)?;
            let count = u32::try_from(count)
                .map_err(|_| PyValueError::new_err(format!("slots[{name:?}] is too large")))?;
            classes.push(ClassSpec::new(name, size, count));
        }
        for k in slots.keys() {
            let name: String = k.extract()?;
            if slot_bytes.get_item(&name)?.is_none() {
                return Err(PyValueError::new_err(format!(
                    "class {name:?} has a slot count but no slot size"
                )));
            }
        }
        let alignment = positive("alignment", alignment)?;
        let budget = budget.map(|b| positive("budget", b)).transpose()?;
        let cfg = PoolConfig::new(classes).alignment(alignment).budget(budget);
        let device = device.map(|d| open_device(py, d)).transpose()?;
        let p = match &device {
            None => py.detach(|| pool::ExpertPool::new(&cfg)).map_err(to_py)?,
            Some(ctx) => device_pool(py, &cfg, ctx)?,
        };
        let names = p
            .class_names()
            .iter()
            .map(|n| PyString::new(py, n).unbind())
            .collect();
        let ids = p
            .class_names()
            .into_iter()
            .enumerate()
            .map(|(i, n)| (n, ClassId(i as u16)))
            .collect();
        Ok(Self {
            arena: p.arena().clone(),
            inner: Arc::new(Mutex::new(p)),
            names,
            ids,
            device,
        })
    }

    /// A copy of the block's bytes (host or device arena; for checks, not serving).
    fn read<'py>(&self, py: Python<'py>, block: &PyBlock) -> PyResult<Bound<'py, PyBytes>> {
        let b = block.inner;
        self.with(py, |p| p.check_live(&b).map(|_| ()))
            .map_err(to_py)?;
        let mut buf = vec![0u8; b.nbytes as usize];
        let arena = self.arena.clone();
        py.detach(|| arena.read(b.offset, &mut buf))
            .map_err(to_py)?;
        Ok(PyBytes::new(py, &buf))
    }

    /// Allocate a committed block of class `cls` (the lowest free slot).
    fn alloc(&self, py: Python<'_>, cls: &str) -> PyResult<PyBlock> {
        let c = self.class(cls)?;
        let b = self.with(py, |p| p.alloc(c)).map_err(to_py)?;
        Ok(self.block(py, b))
    }

    /// Reserve a block for a copy in flight (counted as pending until `commit`).
    fn reserve(&self, py: Python<'_>, cls: &str) -> PyResult<PyBlock> {
        let c = self.class(cls)?;
        let b = self.with(py, |p| p.try_reserve(c)).map_err(to_py)?;
        Ok(self.block(py, b))
    }

    /// Mark a reserved block as committed.
    fn commit(&self, py: Python<'_>, block: &PyBlock) -> PyResult<()> {
        let b = block.inner;
        self.with(py, |p| p.commit(&b)).map_err(to_py)
    }

    /// Return a block to its class.
    fn free(&self, py: Python<'_>, block: &PyBlock) -> PyResult<()> {
        let b = block.inner;
        self.with(py, |p| p.free(b)).map_err(to_py)
    }

    /// Whether `block` is live (handed out and not freed since).
    fn is_live(&self, py: Python<'_>, block: &PyBlock) -> bool {
        let b = block.inner;
        self.with(py, |p| p.is_live(&b))
    }

    /// Number of leases currently held on `block`.
    fn readers(&self, py: Python<'_>, block: &PyBlock) -> PyResult<u32> {
        let b = block.inner;
        self.with(py, |p| p.readers(&b)).map_err(to_py)
    }

    fn capacity(&self, py: Python<'_>, cls: &str) -> PyResult<u32> {
        let c = self.class(cls)?;
        self.with(py, |p| p.capacity(c)).map_err(to_py)
    }

    fn free_count(&self, py: Python<'_>, cls: &str) -> PyResult<u32> {
        let c = self.class(cls)?;
        self.with(py, |p| p.free_count(c)).map_err(to_py)
    }

    fn live_count(&self, py: Python<'_>, cls: &str) -> PyResult<u32> {
        let c = self.class(cls)?;
        self.with(py, |p| p.class_stats(c).map(|s| s.live))
            .map_err(to_py)
    }

    /// The aligned slot size of class `cls`.
    fn slot_bytes(&self, py: Python<'_>, cls: &str) -> PyResult<u64> {
        let c = self.class(cls)?;
        self.with(py, |p| p.slot_bytes(c)).map_err(to_py)
    }

    /// `(offset, nbytes)` of the class region inside the arena.
    fn region(&self, py: Python<'_>, cls: &str) -> PyResult<(u64, u64)> {
        let c = self.class(cls)?;
        self.with(py, |p| p.region(c)).map_err(to_py)
    }

    /// A writable zero-copy view of the block's bytes (valid while the pool lives; the
    /// caller owns what it writes, e.g. `torch.frombuffer(pool.view(b), dtype=...)`).
    fn view<'py>(&self, py: Python<'py>, block: &PyBlock) -> PyResult<Bound<'py, PyMemoryView>> {
        let b = block.inner;
        self.with(py, |p| p.check_live(&b).map(|_| ()))
            .map_err(to_py)?;
        memoryview(
            py,
            BlockView {
                arena: self.arena.clone(),
                offset: b.offset,
                len: b.nbytes,
                readonly: false,
                _lease: None,
            },
        )
    }

    /// Address of the block's first byte (host or device pointer value).
    fn address(&self, py: Python<'_>, block: &PyBlock) -> PyResult<u64> {
        let b = block.inner;
        self.with(py, |p| p.check_live(&b).map(|_| ()))
            .map_err(to_py)?;
        Ok(self.arena.base_address() + b.offset)
    }

    #[getter]
    fn classes(&self, py: Python<'_>) -> Vec<Py<PyString>> {
        self.names.iter().map(|n| n.clone_ref(py)).collect()
    }
    #[getter]
    fn total_bytes(&self, py: Python<'_>) -> u64 {
        self.with(py, |p| p.total_bytes())
    }
    #[getter]
    fn budget(&self, py: Python<'_>) -> u64 {
        self.with(py, |p| p.budget())
    }
    #[getter]
    fn alignment(&self, py: Python<'_>) -> u64 {
        self.with(py, |p| p.alignment())
    }
    #[getter]
    fn reserved_bytes(&self, py: Python<'_>) -> u64 {
        self.with(py, |p| p.reserved_bytes())
    }
    #[getter]
    fn pending_bytes(&self, py: Python<'_>) -> u64 {
        self.with(py, |p| p.stats().pending_bytes)
    }
    #[getter]
    fn high_water_bytes(&self, py: Python<'_>) -> u64 {
        self.with(py, |p| p.stats().high_water_bytes)
    }
    /// "host", "device" or "virtual".
    #[getter]
    fn arena_kind(&self) -> &'static str {
        match self.arena.kind() {
            pool::ArenaKind::Host => "host",
            pool::ArenaKind::Device => "device",
            pool::ArenaKind::Virtual => "virtual",
        }
    }

    /// Totals and per-class statistics.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.with(py, |p| p.stats());
        let d = PyDict::new(py);
        d.set_item("total_bytes", s.total_bytes)?;
        d.set_item("budget", s.budget)?;
        d.set_item("reserved_bytes", s.reserved_bytes)?;
        d.set_item("pending_bytes", s.pending_bytes)?;
        d.set_item("committed_bytes", s.committed_bytes)?;
        d.set_item("high_water_bytes", s.high_water_bytes)?;
        let classes = PyDict::new(py);
        for c in s.classes {
            let cd = PyDict::new(py);
            cd.set_item("slot_bytes", c.slot_bytes)?;
            cd.set_item("capacity", c.capacity)?;
            cd.set_item("free", c.free)?;
            cd.set_item("live", c.live)?;
            cd.set_item("pending", c.pending)?;
            cd.set_item("committed", c.committed)?;
            cd.set_item("high_water", c.high_water)?;
            cd.set_item("region_offset", c.region_offset)?;
            cd.set_item("region_bytes", c.region_bytes)?;
            classes.set_item(c.name, cd)?;
        }
        d.set_item("classes", classes)?;
        Ok(d)
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let (total, names) = self.with(py, |p| (p.total_bytes(), p.class_names()));
        format!("ExpertPool(classes={names:?}, total_bytes={total})")
    }
}

// ---------------------------------------------------------------------------------------

/// A published version of one expert: tier, version number and block.
#[pyclass(frozen, eq, name = "Version", module = "dynaexq._core")]
pub struct PyVersion {
    #[pyo3(get)]
    tier: u8,
    #[pyo3(get)]
    version: u32,
    #[pyo3(get)]
    block: Py<PyBlock>,
    raw: table::Version,
}

impl PartialEq for PyVersion {
    fn eq(&self, other: &Self) -> bool {
        self.raw == other.raw
    }
}

#[pymethods]
impl PyVersion {
    fn __repr__(&self) -> String {
        format!(
            "Version(tier={}, version={}, offset={})",
            self.tier, self.version, self.raw.block.offset
        )
    }
}

/// An admitted transition: copy the target tier's bytes into `block`, then
/// `table.complete(ticket)` (or `table.abort(ticket)`).
#[pyclass(frozen, name = "Transition", module = "dynaexq._core")]
pub struct PyTransition {
    #[pyo3(get)]
    ticket: u64,
    #[pyo3(get)]
    layer: u32,
    #[pyo3(get)]
    expert: u32,
    #[pyo3(get)]
    from_tier: u8,
    #[pyo3(get)]
    to_tier: u8,
    #[pyo3(get)]
    block: Py<PyBlock>,
}

#[pymethods]
impl PyTransition {
    fn __repr__(&self) -> String {
        format!(
            "Transition(ticket={}, layer={}, expert={}, {} -> {})",
            self.ticket, self.layer, self.expert, self.from_tier, self.to_tier
        )
    }
}

/// A read lease on a published version; use as a context manager. The block is not
/// reclaimed while the lease (or a view made from it) lives.
#[pyclass(name = "Lease", module = "dynaexq._core")]
pub struct PyLease {
    inner: Option<OwnedLease>,
    pool: Py<PyExpertPool>,
}

impl PyLease {
    fn get(&self) -> PyResult<&OwnedLease> {
        self.inner
            .as_ref()
            .ok_or_else(|| PoolError::new_err("the lease was released"))
    }
}

#[pymethods]
impl PyLease {
    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }
    #[pyo3(signature = (*_args))]
    fn __exit__(&mut self, _args: &Bound<'_, pyo3::types::PyTuple>) {
        self.inner = None;
    }
    /// Release the lease now (idempotent).
    fn release(&mut self) {
        self.inner = None;
    }
    #[getter]
    fn released(&self) -> bool {
        self.inner.is_none()
    }
    #[getter]
    fn version(&self, py: Python<'_>) -> PyResult<PyVersion> {
        let v = self.get()?.version();
        version_py(py, self.pool.get(), v)
    }
    #[getter]
    fn tier(&self) -> PyResult<u8> {
        Ok(self.get()?.version().tier)
    }
    #[getter]
    fn block(&self, py: Python<'_>) -> PyResult<PyBlock> {
        Ok(self.pool.get().block(py, self.get()?.version().block))
    }
    /// Work reading the block was issued and may outlive this lease (the block is then
    /// reclaimed only after the fence signals it).
    fn record_use(&self) -> PyResult<()> {
        self.get()?.record_use();
        Ok(())
    }
    /// A read-only zero-copy view of the leased block; it keeps its own lease.
    fn view<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyMemoryView>> {
        let lease = self.get()?;
        let v = lease.version();
        memoryview(
            py,
            BlockView {
                arena: self.pool.get().arena.clone(),
                offset: v.block.offset,
                len: v.block.nbytes,
                readonly: true,
                _lease: Some(lease.duplicate()),
            },
        )
    }
    fn __repr__(&self) -> String {
        match &self.inner {
            None => "Lease(released)".into(),
            Some(l) => {
                let v = l.version();
                format!(
                    "Lease(tier={}, version={}, offset={})",
                    v.tier, v.version, v.block.offset
                )
            }
        }
    }
}

fn version_py(py: Python<'_>, pool: &PyExpertPool, v: table::Version) -> PyResult<PyVersion> {
    Ok(PyVersion {
        tier: v.tier,
        version: v.version,
        block: Py::new(py, pool.block(py, v.block))?,
        raw: v,
    })
}

fn tier_list(item: &Bound<'_, PyAny>) -> PyResult<Vec<String>> {
    if let Ok(s) = item.extract::<String>() {
        return Ok(vec![s]);
    }
    item.extract::<Vec<String>>()
}

#[cfg(feature = "cuda")]
fn stream_fence(pool: &PyExpertPool, slots: u32, stream: u64) -> PyResult<Arc<dyn UseFence>> {
    let ctx = pool.device.as_ref().ok_or_else(|| {
        PyValueError::new_err("compute_stream needs a device pool (ExpertPool(..., device=N))")
    })?;
    // SAFETY: the caller passes a live CUstream of this device (e.g.
    // torch.cuda.current_stream().cuda_stream) that outlives the table's use of it.
    Ok(Arc::new(unsafe {
        crate::transfer::cuda::CudaUseFence::new(&ctx.0, slots, stream)
    }))
}

#[cfg(not(feature = "cuda"))]
fn stream_fence(_pool: &PyExpertPool, _slots: u32, _stream: u64) -> PyResult<Arc<dyn UseFence>> {
    Err(BackendError::new_err("this build has no CUDA support"))
}

/// The per-expert precision state machine over a pool.
#[pyclass(frozen, name = "ExpertTable", module = "dynaexq._core")]
pub struct PyExpertTable {
    inner: Arc<table::ExpertTable>,
    pool: Py<PyExpertPool>,
    manual: Option<Arc<ManualFence>>,
}

impl PyExpertTable {
    fn transition_py(&self, py: Python<'_>, t: RTransition) -> PyResult<PyTransition> {
        Ok(PyTransition {
            ticket: t.ticket,
            layer: t.layer,
            expert: t.expert,
            from_tier: t.from,
            to_tier: t.to,
            block: Py::new(py, self.pool.get().block(py, t.block))?,
        })
    }
}

#[pymethods]
impl PyExpertTable {
    #[new]
    #[pyo3(signature = (pool, experts, tier_classes, initial_tiers = None, manual_fence = false, compute_stream = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        pool: Py<PyExpertPool>,
        experts: Vec<i64>,
        tier_classes: Vec<Vec<Bound<'_, PyAny>>>,
        initial_tiers: Option<Vec<Vec<u8>>>,
        manual_fence: bool,
        compute_stream: Option<u64>,
    ) -> PyResult<Self> {
        let p = pool.get();
        if tier_classes.len() != 1 && tier_classes.len() != experts.len() {
            return Err(PyValueError::new_err(format!(
                "tier_classes must list one layer (shared) or {} layers, got {}",
                experts.len(),
                tier_classes.len()
            )));
        }
        let mut layers = Vec::with_capacity(experts.len());
        for (l, &n) in experts.iter().enumerate() {
            let n = positive(&format!("experts[{l}]"), n)?;
            let spec = &tier_classes[if tier_classes.len() == 1 { 0 } else { l }];
            let mut tiers = Vec::new();
            for item in spec {
                tiers.push(
                    tier_list(item)?
                        .iter()
                        .map(|name| p.class(name))
                        .collect::<PyResult<Vec<_>>>()?,
                );
            }
            layers.push(LayerTiers {
                experts: u32::try_from(n).map_err(|_| PyValueError::new_err("too many experts"))?,
                tiers,
            });
        }
        let slots = with_locked(py, &p.inner, |p| p.num_slots());
        let manual = manual_fence.then(|| Arc::new(ManualFence::new(slots)));
        let fence: Arc<dyn UseFence> = match (&manual, compute_stream) {
            (Some(_), Some(_)) => {
                return Err(PyValueError::new_err(
                    "give either manual_fence or compute_stream, not both",
                ))
            }
            (Some(m), None) => m.clone(),
            (None, Some(stream)) => stream_fence(p, slots, stream)?,
            (None, None) => Arc::new(SyncUses),
        };
        let shared = p.inner.clone();
        let t = py
            .detach(|| table::ExpertTable::new(shared, layers, initial_tiers, fence))
            .map_err(to_py)?;
        Ok(Self {
            inner: Arc::new(t),
            pool,
            manual,
        })
    }

    /// Lease the published version of (layer, expert).
    fn lease(&self, py: Python<'_>, layer: u32, expert: u32) -> PyResult<PyLease> {
        let l = self.inner.lease_owned(layer, expert).map_err(to_py)?;
        Ok(PyLease {
            inner: Some(l),
            pool: self.pool.clone_ref(py),
        })
    }

    /// The published version right now (take a lease to use its block).
    fn published(&self, py: Python<'_>, layer: u32, expert: u32) -> PyResult<PyVersion> {
        let v = self.inner.published(layer, expert).map_err(to_py)?;
        version_py(py, self.pool.get(), v)
    }

    /// The current tier of (layer, expert).
    fn tier(&self, layer: u32, expert: u32) -> PyResult<u8> {
        Ok(self.inner.published(layer, expert).map_err(to_py)?.tier)
    }

    /// The in-flight transition of (layer, expert), or None when it is resident.
    fn transition_of(
        &self,
        py: Python<'_>,
        layer: u32,
        expert: u32,
    ) -> PyResult<Option<PyTransition>> {
        let inner = self.inner.clone();
        let st = py.detach(|| inner.state(layer, expert)).map_err(to_py)?;
        match st {
            EntryState::Resident { .. } => Ok(None),
            EntryState::Transitioning { ticket, .. } => {
                let t = self.inner.transition(ticket).map_err(to_py)?;
                Ok(Some(self.transition_py(py, t)?))
            }
        }
    }

    /// Admit a transition of (layer, expert) to `tier`: reserves the target block.
    fn begin(&self, py: Python<'_>, layer: u32, expert: u32, tier: u8) -> PyResult<PyTransition> {
        let inner = self.inner.clone();
        let t = py
            .detach(|| inner.begin(layer, expert, tier))
            .map_err(to_py)?;
        self.transition_py(py, t)
    }

    /// The copy finished: publish the new version (old block retired). Returns it.
    fn complete(&self, py: Python<'_>, ticket: u64) -> PyResult<PyVersion> {
        let inner = self.inner.clone();
        let v = py.detach(|| inner.complete(ticket)).map_err(to_py)?;
        version_py(py, self.pool.get(), v)
    }

    /// The transition failed or was cancelled: keep the old version, free the reservation.
    fn abort(&self, py: Python<'_>, ticket: u64) -> PyResult<()> {
        let inner = self.inner.clone();
        py.detach(|| inner.abort(ticket)).map_err(to_py)
    }

    /// Free every retired block with no lease and no outstanding use; returns them.
    fn reclaim(&self, py: Python<'_>) -> PyResult<Vec<PyBlock>> {
        let inner = self.inner.clone();
        let freed = py.detach(|| inner.reclaim());
        Ok(freed
            .into_iter()
            .map(|b| self.pool.get().block(py, b))
            .collect())
    }

    /// Old versions waiting for their leases or uses to end.
    fn retired(&self, py: Python<'_>) -> Vec<PyBlock> {
        let inner = self.inner.clone();
        let r = py.detach(|| inner.retired());
        r.into_iter()
            .map(|b| self.pool.get().block(py, b))
            .collect()
    }

    /// Manual fence only: mark every recorded use as completed.
    fn signal_uses(&self) -> PyResult<()> {
        match &self.manual {
            Some(f) => {
                f.signal();
                Ok(())
            }
            None => Err(PoolError::new_err(
                "this table completes uses synchronously (create it with manual_fence=True)",
            )),
        }
    }

    /// Recorded uses not yet signalled (0 without a manual fence).
    #[getter]
    fn outstanding_uses(&self) -> u64 {
        self.manual.as_ref().map_or(0, |f| f.outstanding())
    }

    #[getter]
    fn pool(&self, py: Python<'_>) -> Py<PyExpertPool> {
        self.pool.clone_ref(py)
    }
    #[getter]
    fn num_layers(&self) -> u32 {
        self.inner.num_layers()
    }
    fn experts(&self, layer: u32) -> PyResult<u32> {
        self.inner.experts(layer).map_err(to_py)
    }
    fn num_tiers(&self, layer: u32) -> PyResult<u8> {
        self.inner.num_tiers(layer).map_err(to_py)
    }

    /// Counters of the state machine.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let inner = self.inner.clone();
        let s = py.detach(|| inner.stats());
        let d = PyDict::new(py);
        d.set_item("entries", s.entries)?;
        d.set_item("begun", s.begun)?;
        d.set_item("completed", s.completed)?;
        d.set_item("aborted", s.aborted)?;
        d.set_item("reclaimed", s.reclaimed)?;
        d.set_item("in_flight", s.in_flight)?;
        d.set_item("retired_waiting", s.retired_waiting)?;
        d.set_item("per_tier", s.per_tier)?;
        Ok(d)
    }
}

// ---------------------------------------------------------------------------------------

/// A pool layout sized from a byte budget (see `plan_layout`).
#[pyclass(frozen, name = "Layout", module = "dynaexq._core")]
pub struct PyLayout {
    inner: Layout,
}

#[pymethods]
impl PyLayout {
    /// Slot size per class, for `ExpertPool(layout.slot_bytes, layout.slots, ...)`.
    #[getter]
    fn slot_bytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for c in &self.inner.classes {
            d.set_item(&c.name, c.slot_bytes)?;
        }
        Ok(d)
    }
    #[getter]
    fn slots<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for c in &self.inner.classes {
            d.set_item(&c.name, c.slots)?;
        }
        Ok(d)
    }
    #[getter]
    fn alignment(&self) -> u64 {
        self.inner.alignment
    }
    #[getter]
    fn total_bytes(&self) -> u64 {
        self.inner.total_bytes
    }
    #[getter]
    fn budget(&self) -> u64 {
        self.inner.budget
    }
    #[getter]
    fn experts(&self) -> Vec<u32> {
        self.inner.layers.iter().map(|l| l.experts).collect()
    }
    /// High-precision slots per layer.
    #[getter]
    fn hot(&self) -> Vec<u32> {
        self.inner.layers.iter().map(|l| l.hot).collect()
    }
    /// Per layer, per tier: class names in preference order (for `ExpertTable`).
    #[getter]
    fn tier_classes(&self) -> Vec<Vec<Vec<String>>> {
        self.inner.layers.iter().map(|l| l.tiers.clone()).collect()
    }
    /// The first `hot[l]` experts of each layer at tier 1, the rest at tier 0.
    fn initial_tiers(&self) -> Vec<Vec<u32>> {
        let tiers = self.inner.initial_tiers();
        tiers
            .iter()
            .map(|l| l.iter().map(|&t| t as u32).collect())
            .collect()
    }
    fn __repr__(&self) -> String {
        format!(
            "Layout(total_bytes={}, budget={}, classes={:?})",
            self.inner.total_bytes,
            self.inner.budget,
            self.inner
                .classes
                .iter()
                .map(|c| format!("{}x{}", c.name, c.slots))
                .collect::<Vec<_>>()
        )
    }
}

/// Size a two-tier pool from a byte budget. `hot` is a per-layer count (int) or a
/// fraction of each layer's experts (float); `staging` is the number of transitions
/// allowed in flight. Raises LayoutError saying how many bytes are missing.
#[pyfunction]
#[pyo3(signature = (budget, experts, lo_bytes, hi_bytes, hot, staging = 0, alignment = 256))]
fn plan_layout(
    budget: i64,
    experts: Vec<i64>,
    lo_bytes: Vec<i64>,
    hi_bytes: Vec<i64>,
    hot: &Bound<'_, PyAny>,
    staging: u32,
    alignment: i64,
) -> PyResult<PyLayout> {
    if experts.len() != lo_bytes.len() || experts.len() != hi_bytes.len() {
        return Err(PyValueError::new_err(
            "experts, lo_bytes and hi_bytes must have one entry per layer",
        ));
    }
    let mut layers = Vec::new();
    for l in 0..experts.len() {
        layers.push(LayerShape {
            experts: u32::try_from(positive(&format!("experts[{l}]"), experts[l])?)
                .map_err(|_| PyValueError::new_err("too many experts"))?,
            lo_bytes: positive(&format!("lo_bytes[{l}]"), lo_bytes[l])?,
            hi_bytes: positive(&format!("hi_bytes[{l}]"), hi_bytes[l])?,
        });
    }
    let hot = if hot.is_instance_of::<pyo3::types::PyInt>() {
        let n: i64 = hot.extract()?;
        if n < 0 {
            return Err(PyValueError::new_err(format!("hot must be >= 0, got {n}")));
        }
        HotSlots::PerLayer(u32::try_from(n).unwrap_or(u32::MAX))
    } else {
        HotSlots::Fraction(hot.extract()?)
    };
    let req = LayoutRequest {
        budget: positive("budget", budget)?,
        layers,
        hot,
        staging,
        alignment: positive("alignment", alignment)?,
    };
    Ok(PyLayout {
        inner: plan(&req).map_err(to_py)?,
    })
}

// ---------------------------------------------------------------------------------------

#[cfg(feature = "cuda")]
fn pinned_store(
    experts: &[u32],
    sizes: &[Vec<u64>],
    align: u64,
    ctx: &DeviceCtx,
) -> PyResult<HostStore> {
    let ctx = ctx.0.clone();
    HostStore::with_arena(experts, sizes, align, |len, a| {
        Ok(Arc::new(crate::transfer::cuda::PinnedArena::new(&ctx, len, a)?) as Arc<dyn Arena>)
    })
    .map_err(to_py)
}

#[cfg(not(feature = "cuda"))]
fn pinned_store(_e: &[u32], _s: &[Vec<u64>], _a: u64, _ctx: &DeviceCtx) -> PyResult<HostStore> {
    Err(BackendError::new_err("this build has no CUDA support"))
}

/// Every tier of every expert, packed, in host memory; filled once, then frozen.
#[pyclass(frozen, name = "HostStore", module = "dynaexq._core")]
pub struct PyHostStore {
    inner: Arc<HostStore>,
}

#[pymethods]
impl PyHostStore {
    #[new]
    #[pyo3(signature = (experts, tier_bytes, alignment = 256, device = None))]
    fn new(
        py: Python<'_>,
        experts: Vec<i64>,
        tier_bytes: Vec<Vec<i64>>,
        alignment: i64,
        device: Option<i64>,
    ) -> PyResult<Self> {
        let experts = experts
            .iter()
            .enumerate()
            .map(|(l, &n)| {
                positive(&format!("experts[{l}]"), n).and_then(|n| {
                    u32::try_from(n).map_err(|_| PyValueError::new_err("too many experts"))
                })
            })
            .collect::<PyResult<Vec<_>>>()?;
        let sizes = tier_bytes
            .iter()
            .enumerate()
            .map(|(l, row)| {
                row.iter()
                    .enumerate()
                    .map(|(t, &b)| positive(&format!("tier_bytes[{l}][{t}]"), b))
                    .collect::<PyResult<Vec<_>>>()
            })
            .collect::<PyResult<Vec<_>>>()?;
        let alignment = positive("alignment", alignment)?;
        let store = match device {
            None => HostStore::new(&experts, &sizes, alignment).map_err(to_py)?,
            Some(d) => pinned_store(&experts, &sizes, alignment, &open_device(py, d)?)?,
        };
        Ok(Self {
            inner: Arc::new(store),
        })
    }

    /// Copy the packed bytes of (layer, expert, tier) in (any buffer: bytes, numpy,
    /// a CPU tensor's `.numpy()`...). Only before the store is frozen.
    fn write(
        &self,
        py: Python<'_>,
        layer: u32,
        expert: u32,
        tier: u8,
        data: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let buf = pyo3::buffer::PyBuffer::<u8>::get(data)?;
        if buf.is_c_contiguous() {
            // SAFETY: a C-contiguous u8 buffer of `len_bytes()` bytes at `buf_ptr()`,
            // held (and so kept alive and unmoved) by `buf` for this call.
            let bytes =
                unsafe { std::slice::from_raw_parts(buf.buf_ptr() as *const u8, buf.len_bytes()) };
            self.inner.write(layer, expert, tier, bytes).map_err(to_py)
        } else {
            let v = buf.to_vec(py)?;
            self.inner.write(layer, expert, tier, &v).map_err(to_py)
        }
    }

    /// Make the store read-only (an engine freezes it too); fails if an entry is missing.
    fn freeze(&self) -> PyResult<()> {
        self.inner.freeze().map_err(to_py)
    }

    #[getter]
    fn frozen(&self) -> bool {
        self.inner.is_frozen()
    }

    #[getter]
    fn total_bytes(&self) -> u64 {
        self.inner.total_bytes()
    }

    fn tier_bytes(&self, layer: u32, tier: u8) -> PyResult<u64> {
        self.inner.tier_bytes(layer, tier).map_err(to_py)
    }

    /// Read-only zero-copy view of (layer, expert, tier); only once frozen.
    fn view<'py>(
        &self,
        py: Python<'py>,
        layer: u32,
        expert: u32,
        tier: u8,
    ) -> PyResult<Bound<'py, PyMemoryView>> {
        if !self.inner.is_frozen() {
            return Err(PoolError::new_err(
                "freeze the host store before viewing it",
            ));
        }
        let (offset, len) = self.inner.locate(layer, expert, tier).map_err(to_py)?;
        memoryview(
            py,
            BlockView {
                arena: self.inner.arena().clone(),
                offset,
                len,
                readonly: true,
                _lease: None,
            },
        )
    }
}

/// A finished transfer reported by `TransferEngine.poll`.
#[pyclass(frozen, name = "Completion", module = "dynaexq._core")]
pub struct PyCompletion {
    #[pyo3(get)]
    id: u64,
    #[pyo3(get)]
    layer: u32,
    #[pyo3(get)]
    expert: u32,
    #[pyo3(get)]
    tier: u8,
    /// "completed", "failed", "cancelled" or "rejected".
    #[pyo3(get)]
    status: &'static str,
    /// The published version (completed only).
    #[pyo3(get)]
    version: Option<u32>,
    /// Why it failed or was rejected.
    #[pyo3(get)]
    message: Option<String>,
}

#[pymethods]
impl PyCompletion {
    fn __repr__(&self) -> String {
        format!(
            "Completion(id={}, layer={}, expert={}, tier={}, status={:?})",
            self.id, self.layer, self.expert, self.tier, self.status
        )
    }
}

fn completion_py(c: Completion) -> PyCompletion {
    let (version, message) = match &c.status {
        TransferStatus::Completed { version } => (Some(*version), None),
        TransferStatus::Failed(m) | TransferStatus::Rejected(m) => (None, Some(m.clone())),
        _ => (None, None),
    };
    PyCompletion {
        id: c.id,
        layer: c.layer,
        expert: c.expert,
        tier: c.to,
        status: c.status.name(),
        version,
        message,
    }
}

fn parse_fault(fault: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Fault>> {
    let Some(f) = fault else { return Ok(None) };
    if f.is_none() {
        return Ok(None);
    }
    if let Ok(s) = f.extract::<String>() {
        return match s.as_str() {
            "fail" => Ok(Some(Fault::Fail)),
            "hang" => Ok(Some(Fault::Hang)),
            _ => Err(PyValueError::new_err(format!(
                "fault must be 'fail', 'hang' or a delay in seconds, got {s:?}"
            ))),
        };
    }
    let secs: f64 = f.extract()?;
    if !(0.0..=3600.0).contains(&secs) {
        return Err(PyValueError::new_err(format!(
            "delay must be in [0, 3600] s, got {secs}"
        )));
    }
    Ok(Some(Fault::Delay(std::time::Duration::from_secs_f64(secs))))
}

/// The asynchronous migration queue: promotes and demotes experts by copying the host
/// store's packed bytes into pool blocks on a backend ("cpu" worker threads, "manual"
/// test-driven copies, or "cuda"), publishing each version only when its copy is done.
#[pyclass(frozen, name = "TransferEngine", module = "dynaexq._core")]
pub struct PyTransferEngine {
    inner: Arc<TransferEngine>,
    table: Py<PyExpertTable>,
    manual: Option<Arc<ManualBackend>>,
}

#[pymethods]
impl PyTransferEngine {
    #[new]
    #[pyo3(signature = (table, store, max_in_flight = 4, queue_capacity = 64, backend = "cpu", workers = 1, driver = true))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        table: Py<PyExpertTable>,
        store: &PyHostStore,
        max_in_flight: i64,
        queue_capacity: i64,
        backend: &str,
        workers: i64,
        driver: bool,
    ) -> PyResult<Self> {
        let config = EngineConfig {
            max_in_flight: positive("max_in_flight", max_in_flight)? as usize,
            queue_capacity: positive("queue_capacity", queue_capacity)? as usize,
        };
        let mut manual = None;
        let b: Arc<dyn CopyBackend> = match backend {
            "cpu" => {
                Arc::new(CpuBackend::new(positive("workers", workers)? as usize).map_err(to_py)?)
            }
            "manual" => {
                let m = Arc::new(ManualBackend::new());
                manual = Some(m.clone());
                m
            }
            "cuda" => cuda_backend(table.get().pool.get())?,
            other => {
                return Err(PyValueError::new_err(format!(
                    "backend must be 'cpu', 'manual' or 'cuda', got {other:?}"
                )))
            }
        };
        let t = table.get().inner.clone();
        let s = store.inner.clone();
        let engine = py
            .detach(|| TransferEngine::new(t, s, b, config))
            .map_err(to_py)?;
        let engine = Arc::new(engine);
        if driver && manual.is_none() {
            engine.start_driver();
        }
        Ok(Self {
            inner: engine,
            table,
            manual,
        })
    }

    /// Queue a transfer of (layer, expert) to `tier`; returns its id. Raises QueueFull
    /// when the queue is at capacity and IllegalTransition when the expert already has a
    /// transfer queued or in flight. `fault` ("fail", "hang" or a delay in seconds)
    /// injects a fault into this transfer's copy (tests).
    #[pyo3(signature = (layer, expert, tier, urgent = false, fault = None))]
    fn submit(
        &self,
        py: Python<'_>,
        layer: u32,
        expert: u32,
        tier: u8,
        urgent: bool,
        fault: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<u64> {
        let fault = parse_fault(fault)?;
        let prio = if urgent {
            Priority::Urgent
        } else {
            Priority::Planned
        };
        let e = self.inner.clone();
        py.detach(|| e.submit(layer, expert, tier, prio, fault))
            .map_err(to_py)
    }

    /// Cancel a queued or in-flight transfer; False if it had already finished.
    fn cancel(&self, py: Python<'_>, id: u64) -> PyResult<bool> {
        let e = self.inner.clone();
        py.detach(|| e.cancel(id)).map_err(to_py)
    }

    /// Publish finished copies, admit queued ones; returns what finished (never waits).
    fn poll(&self, py: Python<'_>) -> Vec<PyCompletion> {
        let e = self.inner.clone();
        py.detach(|| e.poll())
            .into_iter()
            .map(completion_py)
            .collect()
    }

    /// "queued", "in_flight", "completed", "failed", "cancelled" or "rejected".
    fn status(&self, py: Python<'_>, id: u64) -> PyResult<&'static str> {
        let e = self.inner.clone();
        Ok(py.detach(|| e.status(id)).map_err(to_py)?.name())
    }

    /// Wait (GIL released) until transfer `id` is final or `timeout` seconds pass.
    #[pyo3(signature = (id, timeout = None))]
    fn wait(&self, py: Python<'_>, id: u64, timeout: Option<f64>) -> PyResult<&'static str> {
        let e = self.inner.clone();
        let t = timeout.map(|s| std::time::Duration::from_secs_f64(s.max(0.0)));
        Ok(py.detach(|| e.wait(id, t)).map_err(to_py)?.name())
    }

    /// Wait (GIL released) until nothing is queued or in flight; False on timeout.
    #[pyo3(signature = (timeout = None))]
    fn drain(&self, py: Python<'_>, timeout: Option<f64>) -> bool {
        let e = self.inner.clone();
        let t = timeout.map(|s| std::time::Duration::from_secs_f64(s.max(0.0)));
        py.detach(|| e.drain(t))
    }

    /// Let copies held by the "hang" fault proceed.
    fn release_hung(&self) {
        self.inner.backend().release_hung();
    }

    /// Manual backend only: copy ids started and not finished.
    fn pending_copies(&self) -> PyResult<Vec<u64>> {
        Ok(self.manual_backend()?.pending())
    }

    /// Manual backend only: finish copy `id` (copy the bytes, or fail). False if unknown.
    #[pyo3(signature = (id, ok = true))]
    fn finish_copy(&self, id: u64, ok: bool) -> PyResult<bool> {
        Ok(self.manual_backend()?.finish(id, ok))
    }

    #[getter]
    fn table(&self, py: Python<'_>) -> Py<PyExpertTable> {
        self.table.clone_ref(py)
    }

    #[getter]
    fn backend(&self) -> &'static str {
        self.inner.backend().name()
    }

    /// submitted, completed, failed, cancelled, rejected, bytes_moved, in_flight,
    /// queue_depth.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let d = PyDict::new(py);
        d.set_item("submitted", s.submitted)?;
        d.set_item("completed", s.completed)?;
        d.set_item("failed", s.failed)?;
        d.set_item("cancelled", s.cancelled)?;
        d.set_item("rejected", s.rejected)?;
        d.set_item("bytes_moved", s.bytes_moved)?;
        d.set_item("in_flight", s.in_flight)?;
        d.set_item("queue_depth", s.queue_depth)?;
        Ok(d)
    }
}

impl PyTransferEngine {
    fn manual_backend(&self) -> PyResult<&ManualBackend> {
        self.manual
            .as_deref()
            .ok_or_else(|| PoolError::new_err("only the 'manual' backend has test-driven copies"))
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_backend(_pool: &PyExpertPool) -> PyResult<Arc<dyn CopyBackend>> {
    Err(BackendError::new_err(
        "this build has no CUDA backend (build the extension with the 'cuda' feature)",
    ))
}

#[cfg(feature = "cuda")]
fn cuda_backend(pool: &PyExpertPool) -> PyResult<Arc<dyn CopyBackend>> {
    let ctx = pool.device.as_ref().ok_or_else(|| {
        BackendError::new_err("the CUDA backend needs a device pool (ExpertPool(..., device=N))")
    })?;
    Ok(Arc::new(
        crate::transfer::cuda::CudaBackend::new(&ctx.0).map_err(to_py)?,
    ))
}

#[pymodule(name = "_core")]
fn core_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("PoolError", py.get_type::<PoolError>())?;
    m.add("PoolExhausted", py.get_type::<PoolExhausted>())?;
    m.add("DoubleFree", py.get_type::<DoubleFree>())?;
    m.add("ForeignBlock", py.get_type::<ForeignBlock>())?;
    m.add("BlockInUse", py.get_type::<BlockInUse>())?;
    m.add("IllegalTransition", py.get_type::<IllegalTransition>())?;
    m.add("LayoutError", py.get_type::<LayoutError>())?;
    m.add("QueueFull", py.get_type::<QueueFull>())?;
    m.add("BackendError", py.get_type::<BackendError>())?;
    m.add_class::<PyBlock>()?;
    m.add_class::<BlockView>()?;
    m.add_class::<PyExpertPool>()?;
    m.add_class::<PyVersion>()?;
    m.add_class::<PyTransition>()?;
    m.add_class::<PyLease>()?;
    m.add_class::<PyExpertTable>()?;
    m.add_class::<PyLayout>()?;
    m.add_class::<PyHostStore>()?;
    m.add_class::<PyCompletion>()?;
    m.add_class::<PyTransferEngine>()?;
    m.add_function(wrap_pyfunction!(plan_layout, m)?)?;
    m.add_class::<PyHotnessTracker>()?;
    m.add_function(wrap_pyfunction!(plan_transitions, m)?)?;
    m.add_function(wrap_pyfunction!(knapsack, m)?)?;
    // The dequantize kernels (crate::kernels).
    m.add_function(wrap_pyfunction!(kernel_launch_plan, m)?)?;
    m.add_function(wrap_pyfunction!(select_ptx_arch, m)?)?;
    m.add_function(wrap_pyfunction!(resolve_ptx, m)?)?;
    m.add_function(wrap_pyfunction!(check_ptx, m)?)?;
    m.add_class::<PyDequantKernels>()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The precision controller (crate::controller)

fn controller_err(e: ControllerError) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// Per (layer, expert) hotness from the router of every forward step.
#[pyclass(name = "HotnessTracker", module = "dynaexq._core")]
pub struct PyHotnessTracker {
    inner: HotnessTracker,
}

#[pymethods]
impl PyHotnessTracker {
    /// signal "ema" (long horizon, `alpha`) or "window" (the last `window` steps).
    #[new]
    #[pyo3(signature = (layers, experts, signal = "ema", alpha = 0.9, window = 256))]
    fn new(
        layers: usize,
        experts: usize,
        signal: &str,
        alpha: f32,
        window: usize,
    ) -> PyResult<Self> {
        let s = match signal {
            "ema" => Signal::Ema { alpha },
            "window" => Signal::Window { steps: window },
            other => {
                return Err(PyValueError::new_err(format!(
                    "signal must be 'ema' or 'window', got {other:?}"
                )))
            }
        };
        Ok(Self {
            inner: HotnessTracker::new(layers, experts, s).map_err(controller_err)?,
        })
    }

    /// Record routing of some tokens of the current step for one layer: `expert_ids` and
    /// `probs` are the flattened [tokens, top_k] picks and their router probabilities.
    fn observe(
        &mut self,
        layer: usize,
        expert_ids: Vec<u32>,
        probs: Vec<f32>,
        top_k: usize,
    ) -> PyResult<()> {
        self.inner
            .observe(layer, &expert_ids, &probs, top_k)
            .map_err(controller_err)
    }

    /// Close the step: fold its averaged routed mass into the scores.
    fn end_step(&mut self) {
        self.inner.end_step();
    }

    /// Scores, layers * experts, row-major.
    fn scores(&self) -> Vec<f32> {
        self.inner.scores()
    }

    /// Start from a calibration ranking.
    fn seed(&mut self, scores: Vec<f32>) -> PyResult<()> {
        self.inner.seed(&scores).map_err(controller_err)
    }

    #[getter]
    fn steps(&self) -> u64 {
        self.inner.steps()
    }
    #[getter]
    fn layers(&self) -> usize {
        self.inner.layers()
    }
    #[getter]
    fn experts(&self) -> usize {
        self.inner.experts()
    }
}

/// One planning round of the controller. Returns (target tiers, transitions as
/// (layer, expert, from, to, bytes) tuples, deferred count).
#[pyfunction]
#[pyo3(signature = (
    layers, experts, scores, current, busy, tier_bytes, capacity, split = "per-layer",
    gain = None, delta = 0.01, max_transitions = usize::MAX, max_bytes = u64::MAX,
    max_in_flight = 4, in_flight = 0
))]
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn plan_transitions(
    py: Python<'_>,
    layers: usize,
    experts: usize,
    scores: Vec<f32>,
    current: Vec<u8>,
    busy: Vec<bool>,
    tier_bytes: Vec<u64>,
    capacity: Vec<usize>,
    split: &str,
    gain: Option<Vec<f32>>,
    delta: f32,
    max_transitions: usize,
    max_bytes: u64,
    max_in_flight: usize,
    in_flight: usize,
) -> PyResult<(Vec<u8>, Vec<(u32, u32, u8, u8, u64)>, usize)> {
    let capacity = match split {
        "per-layer" => Capacity::PerLayer(capacity),
        "global" => Capacity::Global(capacity),
        other => {
            return Err(PyValueError::new_err(format!(
                "split must be 'per-layer' or 'global', got {other:?}"
            )))
        }
    };
    let input = PlanInput {
        layers,
        experts,
        scores: &scores,
        current: &current,
        busy: &busy,
        tier_bytes: &tier_bytes,
        gain: gain.as_deref(),
        capacity: &capacity,
        in_flight,
    };
    let cfg = PlannerConfig {
        delta,
        max_transitions,
        max_bytes,
        max_in_flight,
    };
    let p = py
        .detach(|| plan_controller(&input, &cfg))
        .map_err(controller_err)?;
    let moves = p
        .transitions
        .iter()
        .map(|t| (t.layer, t.expert, t.from, t.to, t.bytes))
        .collect();
    Ok((p.target, moves, p.deferred))
}

/// Multiple-choice knapsack: one tier per item, `values` items x tiers, `tier_bytes` per
/// tier, within `budget`. Greedy (convex-hull order) or exact (dynamic programming over
/// the budget in units of the tier sizes' gcd; small instances only). None if even the
/// cheapest tier for every item does not fit.
#[pyfunction]
#[pyo3(signature = (values, tier_bytes, budget, exact = false))]
fn knapsack(
    py: Python<'_>,
    values: Vec<f32>,
    tier_bytes: Vec<u64>,
    budget: u64,
    exact: bool,
) -> PyResult<Option<Vec<u8>>> {
    if tier_bytes.is_empty() || values.len() % tier_bytes.len() != 0 {
        return Err(PyValueError::new_err(
            "values must hold items x tiers entries for a non-empty tier_bytes",
        ));
    }
    Ok(py.detach(|| {
        if exact {
            knapsack_exact(&values, &tier_bytes, budget).map(|(c, _)| c)
        } else {
            knapsack_greedy(&values, &tier_bytes, budget)
        }
    }))
}

// ---------------------------------------------------------------------------------------
// The dequantize kernels (crate::kernels): launch plans on every build; loading and
// launching with the "cuda" feature (a clear BackendError without it or without a driver).

use crate::kernels;

fn kernel_i32(what: &str, v: i64) -> PyResult<i32> {
    i32::try_from(v).map_err(|_| PyValueError::new_err(format!("{what}={v} does not fit an int32")))
}

fn kernel_op(op: Option<&str>) -> PyResult<Option<kernels::Op>> {
    op.map(kernels::Op::parse).transpose().map_err(to_py)
}

/// Parse and validate one launch (the launcher runs exactly this check).
#[allow(clippy::too_many_arguments)]
fn kernel_plan(
    weight: &str,
    act: &str,
    qweight: u64,
    scales: u64,
    zeros: u64,
    x: u64,
    y: u64,
    t: i64,
    n: i64,
    k: i64,
    group_size: i64,
    swiglu: bool,
    op: Option<&str>,
) -> PyResult<kernels::LaunchPlan> {
    let args = kernels::MatmulArgs {
        qweight,
        scales,
        zeros,
        x,
        y,
        t: kernel_i32("T", t)?,
        n: kernel_i32("N", n)?,
        k: kernel_i32("K", k)?,
        group_size: kernel_i32("group_size", group_size)?,
        swiglu,
    };
    kernels::plan_launch(
        kernels::WeightKind::parse(weight).map_err(to_py)?,
        kernels::ActKind::parse(act).map_err(to_py)?,
        args,
        kernel_op(op)?,
    )
    .map_err(to_py)
}

type Dim3 = (u32, u32, u32);
type KernelPlanTuple = (String, Dim3, Dim3, [u64; 5], [i32; 5]);

/// Kernel name, grid and block of one launch, after the launcher's argument checks
/// (ValueError naming the bad argument), and the pointer and int parameters exactly as the
/// launcher pushes them. `op` forces "gemv" or "gemm".
#[pyfunction]
#[pyo3(signature = (weight, act, qweight, scales, zeros, x, y, t, n, k, group_size, swiglu, op = None))]
#[allow(clippy::too_many_arguments)]
fn kernel_launch_plan(
    weight: &str,
    act: &str,
    qweight: u64,
    scales: u64,
    zeros: u64,
    x: u64,
    y: u64,
    t: i64,
    n: i64,
    k: i64,
    group_size: i64,
    swiglu: bool,
    op: Option<&str>,
) -> PyResult<KernelPlanTuple> {
    let p = kernel_plan(
        weight, act, qweight, scales, zeros, x, y, t, n, k, group_size, swiglu, op,
    )?;
    Ok((
        p.kernel.name(),
        p.geometry.grid,
        p.geometry.block,
        p.args.pointers(),
        p.args.ints(),
    ))
}

/// The PTX architecture a device of compute capability (major, minor) loads among
/// `available` (default: every compiled one); None if the device is older than all.
#[pyfunction]
#[pyo3(signature = (major, minor, available = None))]
fn select_ptx_arch(major: u32, minor: u32, available: Option<Vec<u32>>) -> Option<u32> {
    let available = available.unwrap_or_else(|| kernels::PTX_ARCHES.to_vec());
    kernels::select_ptx((major, minor), &available)
}

/// (arch, [gemv file, gemm file]) a device of (major, minor) loads from `ptx_dir`.
#[pyfunction]
fn resolve_ptx(
    ptx_dir: std::path::PathBuf,
    major: u32,
    minor: u32,
) -> PyResult<(u32, Vec<String>)> {
    let (arch, files) = kernels::resolve_ptx(&ptx_dir, (major, minor)).map_err(to_py)?;
    Ok((
        arch,
        files.iter().map(|f| f.display().to_string()).collect(),
    ))
}

/// Check that PTX text of module "gemv" or "gemm" exports every kernel (ValueError if not).
#[pyfunction]
fn check_ptx(module: &str, ptx: &str) -> PyResult<()> {
    let op = kernels::Op::parse(module).map_err(to_py)?;
    kernels::check_ptx(op, ptx).map_err(to_py)
}

/// The dq_* kernels loaded into a device's primary context (torch's), launched on a
/// caller-given raw CUDA stream (e.g. `torch.cuda.current_stream().cuda_stream`).
#[pyclass(frozen, name = "DequantKernels", module = "dynaexq._core")]
pub struct PyDequantKernels {
    #[cfg(feature = "cuda")]
    inner: kernels::cuda::DqKernels,
}

#[cfg(not(feature = "cuda"))]
fn no_cuda_kernels() -> PyErr {
    BackendError::new_err(
        "this build has no CUDA support: DequantKernels needs the extension built with the 'cuda' feature",
    )
}

#[cfg(not(feature = "cuda"))]
#[pymethods]
impl PyDequantKernels {
    #[new]
    #[pyo3(signature = (ptx_dir, device = 0))]
    fn new(ptx_dir: std::path::PathBuf, device: i64) -> PyResult<Self> {
        let _ = (ptx_dir, device);
        Err(no_cuda_kernels())
    }

    #[staticmethod]
    #[pyo3(signature = (gemv, gemm, arch, device = 0))]
    fn from_ptx(gemv: &str, gemm: &str, arch: u32, device: i64) -> PyResult<Self> {
        let _ = (gemv, gemm, arch, device);
        Err(no_cuda_kernels())
    }
}

#[cfg(feature = "cuda")]
#[pymethods]
impl PyDequantKernels {
    /// Load `ptx_dir/{gemv,gemm}.sm_<arch>.ptx` (scripts/compile_kernels.py) for the
    /// newest arch the device runs. BackendError without a CUDA driver or device.
    #[new]
    #[pyo3(signature = (ptx_dir, device = 0))]
    fn new(py: Python<'_>, ptx_dir: std::path::PathBuf, device: i64) -> PyResult<Self> {
        let ctx = open_device(py, device)?;
        // Loading JIT-compiles the PTX for the device: seconds, without the GIL.
        let inner = py
            .detach(|| kernels::cuda::DqKernels::load_dir(&ctx.0, &ptx_dir))
            .map_err(to_py)?;
        Ok(Self { inner })
    }

    /// Load PTX text of both modules compiled for compute_<arch>.
    #[staticmethod]
    #[pyo3(signature = (gemv, gemm, arch, device = 0))]
    fn from_ptx(py: Python<'_>, gemv: &str, gemm: &str, arch: u32, device: i64) -> PyResult<Self> {
        let ctx = open_device(py, device)?;
        let inner = py
            .detach(|| kernels::cuda::DqKernels::from_ptx(&ctx.0, arch, gemv, gemm))
            .map_err(to_py)?;
        Ok(Self { inner })
    }

    /// The PTX architecture that was loaded (e.g. 90).
    #[getter]
    fn arch(&self) -> u32 {
        self.inner.arch()
    }

    #[getter]
    fn device(&self) -> usize {
        self.inner.context().ordinal()
    }

    /// Enqueue y = x W^T (or SwiGLU of the gate/up halves) for one matrix on `stream` and
    /// return the kernel's name. Arguments are raw device pointers (0 = NULL); the caller
    /// keeps the memory alive until the stream has run the kernel. Checked as
    /// `kernel_launch_plan`.
    #[pyo3(signature = (weight, act, qweight, scales, zeros, x, y, t, n, k, group_size, swiglu, stream = 0, op = None))]
    #[allow(clippy::too_many_arguments)]
    fn launch(
        &self,
        weight: &str,
        act: &str,
        qweight: u64,
        scales: u64,
        zeros: u64,
        x: u64,
        y: u64,
        t: i64,
        n: i64,
        k: i64,
        group_size: i64,
        swiglu: bool,
        stream: u64,
        op: Option<&str>,
    ) -> PyResult<String> {
        let p = kernel_plan(
            weight, act, qweight, scales, zeros, x, y, t, n, k, group_size, swiglu, op,
        )?;
        // SAFETY: the pointers and the stream come from the caller (torch tensors and
        // torch's stream in practice); the documented contract is that they are live
        // device memory of this device sized for the validated shapes.
        unsafe { self.inner.launch(&p, stream) }.map_err(to_py)?;
        Ok(p.kernel.name())
    }

    /// One expert: gate_up (swiglu, N = intermediate, K = hidden) from `x` into
    /// `workspace` [T, intermediate], then down into `y` [T, hidden]. `gate_up` and `down`
    /// are (qweight, scales, zeros) pointers of the blob's sections.
    #[pyo3(signature = (weight, act, gate_up, down, x, workspace, y, t, hidden, intermediate, group_size, stream = 0, op = None))]
    #[allow(clippy::too_many_arguments)]
    fn expert_forward(
        &self,
        weight: &str,
        act: &str,
        gate_up: (u64, u64, u64),
        down: (u64, u64, u64),
        x: u64,
        workspace: u64,
        y: u64,
        t: i64,
        hidden: i64,
        intermediate: i64,
        group_size: i64,
        stream: u64,
        op: Option<&str>,
    ) -> PyResult<()> {
        let plans = kernels::plan_expert(
            kernels::WeightKind::parse(weight).map_err(to_py)?,
            kernels::ActKind::parse(act).map_err(to_py)?,
            kernels::ExpertPointers { gate_up, down },
            x,
            workspace,
            y,
            kernel_i32("T", t)?,
            kernel_i32("hidden", hidden)?,
            kernel_i32("intermediate", intermediate)?,
            kernel_i32("group_size", group_size)?,
            kernel_op(op)?,
        )
        .map_err(to_py)?;
        // SAFETY: as `launch`, for both matrices and the workspace.
        unsafe { self.inner.launch_all(&plans, stream) }.map_err(to_py)
    }

    fn __repr__(&self) -> String {
        format!("{:?}", self.inner)
    }
}
