//! Glue for the expert pool: blocks, zero-copy views and `ExpertPool`.

use std::collections::HashMap;
use std::os::raw::{c_int, c_void};
use std::sync::{Arc, Mutex};

use pyo3::exceptions::{PyBufferError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyMemoryView, PyString};

use crate::errors::Error;
use crate::pool::{self, Arena, ClassId, ClassSpec, PoolConfig};
use crate::table::OwnedLease;

use super::*;

// ---------------------------------------------------------------------------------------

/// A live slot of an `ExpertPool`: `offset` and `nbytes` locate it in the pool's arena.
#[pyclass(frozen, eq, hash, name = "Block", module = "dynaexq._core")]
pub struct PyBlock {
    pub(super) inner: pool::Block,
    pub(super) cls: Py<PyString>,
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
    pub(super) arena: Arc<dyn Arena>,
    pub(super) offset: u64,
    pub(super) len: u64,
    pub(super) readonly: bool,
    /// What keeps the bytes from being reused while the view exists: a lease (read-only
    /// views of published versions) or a view pin (writable views of caller-owned
    /// blocks; `pool.free` refuses the block until the view is gone).
    pub(super) _keep: Keep,
}

/// What a [`BlockView`] holds on to (held only for its `Drop`).
#[allow(dead_code)]
pub(super) enum Keep {
    /// Frozen host-store memory: never rewritten.
    Frozen,
    /// The KV cache's view of a whole pool arena (`ExpertPool.arena_view`): written only
    /// at the page rows its page pool hands out (the KV head and lent slots' pages).
    Arena,
    Lease(OwnedLease),
    Pin(ViewPin),
}

/// A registered writable view of a caller-owned block (see `ExpertPool::pin_view`).
pub(super) struct ViewPin {
    pool: Arc<Mutex<pool::ExpertPool>>,
    block: pool::Block,
}

impl Drop for ViewPin {
    fn drop(&mut self) {
        crate::sync::lock(&self.pool).unpin_view(&self.block);
    }
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

pub(super) fn memoryview<'py>(py: Python<'py>, v: BlockView) -> PyResult<Bound<'py, PyMemoryView>> {
    if v.arena.host_ptr().is_none() {
        return Err(PyBufferError::new_err(
            "the pool's arena is not host memory",
        ));
    }
    let obj = Bound::new(py, v)?;
    PyMemoryView::from(obj.as_any())
}

#[cfg(feature = "cuda")]
pub(super) fn device_pool(
    py: Python<'_>,
    cfg: &PoolConfig,
    ctx: &DeviceCtx,
    shared: Option<Arc<crate::budget::DeviceBudget>>,
) -> PyResult<pool::ExpertPool> {
    let ctx = ctx.0.clone();
    py.detach(|| {
        pool::ExpertPool::with_arena_and_budget(
            cfg,
            |len, align, host_from| {
                Ok(Arc::new(crate::transfer::cuda::SplitArena::new(
                    &ctx, len, align, host_from,
                )?) as Arc<dyn Arena>)
            },
            shared,
        )
    })
    .map_err(to_py)
}

#[cfg(not(feature = "cuda"))]
pub(super) fn device_pool(
    _py: Python<'_>,
    _cfg: &PoolConfig,
    _ctx: &DeviceCtx,
    _shared: Option<Arc<crate::budget::DeviceBudget>>,
) -> PyResult<pool::ExpertPool> {
    Err(BackendError::new_err("this build has no CUDA support"))
}

/// The fragmentation-free expert pool: one arena reserved at construction, one fixed
/// region of equal-size slots per class, O(1) deterministic alloc/free.
#[pyclass(frozen, name = "ExpertPool", module = "dynaexq._core")]
pub struct PyExpertPool {
    pub(super) inner: Arc<Mutex<pool::ExpertPool>>,
    pub(super) names: Vec<Py<PyString>>,
    pub(super) ids: HashMap<String, ClassId>,
    pub(super) arena: Arc<dyn Arena>,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(super) device: Option<DeviceCtx>,
}

impl PyExpertPool {
    pub(super) fn class(&self, cls: &str) -> PyResult<ClassId> {
        self.ids.get(cls).copied().ok_or_else(|| {
            let known: Vec<_> = self.ids.keys().cloned().collect();
            to_py(Error::UnknownClass {
                name: cls.to_string(),
                known: known.join(", "),
            })
        })
    }
    pub(super) fn block(&self, py: Python<'_>, b: pool::Block) -> PyBlock {
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
    #[pyo3(signature = (slot_bytes, slots, alignment = 256, budget = None, device = None, shared_budget = None, kv_head_bytes = 0, lending = None, host_classes = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        slot_bytes: &Bound<'_, PyDict>,
        slots: &Bound<'_, PyDict>,
        alignment: i64,
        budget: Option<i64>,
        device: Option<i64>,
        shared_budget: Option<Bound<'_, PyDeviceBudget>>,
        kv_head_bytes: i64,
        lending: Option<(String, String)>,
        host_classes: Option<Vec<String>>,
    ) -> PyResult<Self> {
        let host_classes = host_classes.unwrap_or_default();
        for name in &host_classes {
            if slot_bytes.get_item(name)?.is_none() {
                return Err(PyValueError::new_err(format!(
                    "host class {name:?} is not one of the pool's classes"
                )));
            }
        }
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
            let spec = ClassSpec::new(name.clone(), size, count);
            classes.push(if host_classes.contains(&name) {
                spec.in_host_memory()
            } else {
                spec
            });
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
        let head = u64::try_from(kv_head_bytes).map_err(|_| {
            PyValueError::new_err(format!("kv_head_bytes must be >= 0, got {kv_head_bytes}"))
        })?;
        let mut cfg = PoolConfig::new(classes)
            .alignment(alignment)
            .budget(budget)
            .kv_head_bytes(head);
        if let Some((host, guest)) = lending {
            cfg = cfg.lending(host, guest);
        }
        let device = device.map(|d| open_device(py, d)).transpose()?;
        let shared = shared_budget.map(|b| b.get().inner.clone());
        let p = match &device {
            None => py
                .detach(|| {
                    pool::ExpertPool::with_arena_and_budget(
                        &cfg,
                        |len, align, _| {
                            Ok(Arc::new(pool::HostArena::new(len, align)?) as Arc<dyn Arena>)
                        },
                        shared,
                    )
                })
                .map_err(to_py)?,
            Some(ctx) => device_pool(py, &cfg, ctx, shared)?,
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
    /// Refused for a block the table is still filling (its copy may be running).
    fn read<'py>(&self, py: Python<'py>, block: &PyBlock) -> PyResult<Bound<'py, PyBytes>> {
        let b = block.inner;
        let filling = self
            .with(py, |p| p.check_live(&b).map(|_| p.is_table_pending(&b)))
            .map_err(to_py)?;
        if filling {
            return Err(BlockInUse::new_err(
                "the block is being filled by a transition in progress",
            ));
        }
        let mut buf = vec![0u8; b.nbytes as usize];
        let arena = self.arena.clone();
        if arena.host_ptr().is_some() {
            // Host memory: copy with the GIL held, so no Python thread writes the block
            // through a view meanwhile.
            arena.read(b.offset, &mut buf).map_err(to_py)?;
        } else {
            py.detach(|| arena.read(b.offset, &mut buf))
                .map_err(to_py)?;
        }
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

    /// A writable zero-copy view of a block this caller allocated (e.g.
    /// `torch.frombuffer(pool.view(b), dtype=...)`). While the view (or anything made
    /// from it) is alive, `free(b)` raises BlockInUse, so the view never writes into a
    /// reused slot. Blocks of the expert table are viewed through `Lease.view()`
    /// (read-only) and written through `Transition.write()`.
    fn view<'py>(&self, py: Python<'py>, block: &PyBlock) -> PyResult<Bound<'py, PyMemoryView>> {
        let b = block.inner;
        if self.arena.host_ptr().is_none() {
            return Err(PyBufferError::new_err(
                "the pool's arena is not host memory",
            ));
        }
        self.with(py, |p| p.pin_view(&b)).map_err(to_py)?;
        let pin = ViewPin {
            pool: self.inner.clone(),
            block: b,
        };
        memoryview(
            py,
            BlockView {
                arena: self.arena.clone(),
                offset: b.offset,
                len: b.nbytes,
                readonly: false,
                _keep: Keep::Pin(pin),
            },
        )
    }

    /// A writable view of the whole arena for the KV cache's pages (host arenas only):
    /// the cache writes only the page rows its page pool hands out, which lie in the
    /// KV head and in lent slots, never in an expert's block.
    fn arena_view<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyMemoryView>> {
        let len = self.with(py, |p| p.total_bytes());
        memoryview(
            py,
            BlockView {
                arena: self.arena.clone(),
                offset: 0,
                len,
                readonly: false,
                _keep: Keep::Arena,
            },
        )
    }

    /// Address of the arena's first byte (host or device pointer value).
    #[getter]
    fn arena_address(&self) -> u64 {
        self.arena.base_address()
    }
    /// Bytes at the arena's head kept for the KV pages (no slot's).
    #[getter]
    fn kv_head_bytes(&self, py: Python<'_>) -> u64 {
        self.with(py, |p| p.kv_head_bytes())
    }
    /// Lend the lowest free slot of the lending class to the KV pages; returns (index,
    /// offset, nbytes) of the bytes the pages may use (past the hosted guest slot).
    /// PoolExhausted when no slot of the class is free.
    fn lend(&self, py: Python<'_>, cls: &str) -> PyResult<(u32, u64, u64)> {
        let c = self.class(cls)?;
        let l = self.with(py, |p| p.lend(c)).map_err(to_py)?;
        let (offset, nbytes) = l.kv_range();
        Ok((l.index, offset, nbytes))
    }
    /// Take the lent slot back (its pages must be offline already); ValueError while
    /// its hosted guest slot is live.
    fn unlend(&self, py: Python<'_>, cls: &str, index: u32) -> PyResult<()> {
        let c = self.class(cls)?;
        self.with(py, |p| p.unlend(c, index)).map_err(to_py)
    }
    /// Whether the lent slot could come back now (its guest slot is free).
    fn can_unlend(&self, py: Python<'_>, cls: &str, index: u32) -> PyResult<bool> {
        let c = self.class(cls)?;
        Ok(self.with(py, |p| p.can_unlend(c, index)))
    }
    /// Indices of the class's lent slots.
    fn lent(&self, py: Python<'_>, cls: &str) -> PyResult<Vec<u32>> {
        let c = self.class(cls)?;
        Ok(self.with(py, |p| p.lent(c)))
    }
    /// (offset, nbytes) of the KV bytes of lent slot `index`; None if it is not lent.
    fn lent_range(&self, py: Python<'_>, cls: &str, index: u32) -> PyResult<Option<(u64, u64)>> {
        let c = self.class(cls)?;
        Ok(self.with(py, |p| p.lent_slot(c, index).map(|l| l.kv_range())))
    }

    /// Address of the block's first byte (host or device pointer value).
    fn address(&self, py: Python<'_>, block: &PyBlock) -> PyResult<u64> {
        let b = block.inner;
        self.with(py, |p| p.check_live(&b).map(|_| ()))
            .map_err(to_py)?;
        Ok(self.arena.address(b.offset))
    }

    #[getter]
    fn classes(&self, py: Python<'_>) -> Vec<Py<PyString>> {
        self.names.iter().map(|n| n.clone_ref(py)).collect()
    }
    #[getter]
    fn total_bytes(&self, py: Python<'_>) -> u64 {
        self.with(py, |p| p.total_bytes())
    }
    /// Where the host-memory classes' tail starts: the arena's bytes before it are device
    /// memory (`total_bytes` when no class is in host memory).
    #[getter]
    fn host_from(&self, py: Python<'_>) -> u64 {
        self.with(py, |p| p.host_from())
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
        d.set_item("host_from", s.host_from)?;
        d.set_item("host_bytes", s.host_bytes)?;
        let classes = PyDict::new(py);
        for c in s.classes {
            let cd = PyDict::new(py);
            cd.set_item("slot_bytes", c.slot_bytes)?;
            cd.set_item("capacity", c.capacity)?;
            cd.set_item("lent", c.lent)?;
            cd.set_item("free", c.free)?;
            cd.set_item("live", c.live)?;
            cd.set_item("pending", c.pending)?;
            cd.set_item("committed", c.committed)?;
            cd.set_item("high_water", c.high_water)?;
            cd.set_item("region_offset", c.region_offset)?;
            cd.set_item("region_bytes", c.region_bytes)?;
            cd.set_item("host_memory", c.host_memory)?;
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
