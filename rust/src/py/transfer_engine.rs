//! Glue for the host store and the transfer engine.

use std::sync::Arc;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyMemoryView};

use crate::pool::Arena;
use crate::store::{HostStore, MappedTier, StagingRing};
use crate::transfer::cpu::{CpuBackend, ManualBackend};
use crate::transfer::{
    Completion, CopyBackend, EngineConfig, Fault, Priority, TransferEngine, TransferStatus,
};

use super::*;

// ---------------------------------------------------------------------------------------

#[cfg(feature = "cuda")]
pub(super) fn pinned_store(
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

#[cfg(feature = "cuda")]
fn pinned_ring(slots: u32, slot_bytes: u64, align: u64, ctx: &DeviceCtx) -> PyResult<StagingRing> {
    let ctx = ctx.0.clone();
    StagingRing::new(slots, slot_bytes, align, |len, a| {
        Ok(Arc::new(crate::transfer::cuda::PinnedArena::new(&ctx, len, a)?) as Arc<dyn Arena>)
    })
    .map_err(to_py)
}

#[cfg(not(feature = "cuda"))]
fn pinned_ring(_n: u32, _b: u64, _a: u64, _ctx: &DeviceCtx) -> PyResult<StagingRing> {
    Err(BackendError::new_err("this build has no CUDA support"))
}

fn store_shape(experts: &[i64], tier_bytes: &[Vec<i64>]) -> PyResult<(Vec<u32>, Vec<Vec<u64>>)> {
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
    Ok((experts, sizes))
}

#[cfg(not(feature = "cuda"))]
pub(super) fn pinned_store(
    _e: &[u32],
    _s: &[Vec<u64>],
    _a: u64,
    _ctx: &DeviceCtx,
) -> PyResult<HostStore> {
    Err(BackendError::new_err("this build has no CUDA support"))
}

/// Every tier of every expert, packed, in host memory; filled once, then frozen.
#[pyclass(frozen, name = "HostStore", module = "dynaexq._core")]
pub struct PyHostStore {
    pub(super) inner: Arc<HostStore>,
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
        let (experts, sizes) = store_shape(&experts, &tier_bytes)?;
        let alignment = positive("alignment", alignment)?;
        let store = match device {
            None => HostStore::new(&experts, &sizes, alignment).map_err(to_py)?,
            Some(d) => pinned_store(&experts, &sizes, alignment, &open_device(py, d)?)?,
        };
        Ok(Self {
            inner: Arc::new(store),
        })
    }

    /// A store over memory-mapped files (a tiered checkpoint): `locations[l][t]` is
    /// `(file index, offset of expert 0, stride)` of layer l's tier t in `files`. Copies
    /// pass through a ring of `staging_slots` slots sized for the largest tier (pinned
    /// memory with `device=N`). Born frozen; host memory holds only the ring and the
    /// mapped pages the page cache keeps.
    #[staticmethod]
    #[pyo3(signature = (files, experts, tier_bytes, locations, staging_slots = 8, alignment = 256, device = None))]
    #[allow(clippy::too_many_arguments)]
    fn mapped(
        py: Python<'_>,
        files: Vec<std::path::PathBuf>,
        experts: Vec<i64>,
        tier_bytes: Vec<Vec<i64>>,
        locations: Vec<Vec<(u32, u64, u64)>>,
        staging_slots: i64,
        alignment: i64,
        device: Option<i64>,
    ) -> PyResult<Self> {
        let (experts, sizes) = store_shape(&experts, &tier_bytes)?;
        let alignment = positive("alignment", alignment)?;
        let slots = u32::try_from(positive("staging_slots", staging_slots)?)
            .map_err(|_| PyValueError::new_err("too many staging slots"))?;
        let slot_bytes = sizes.iter().flatten().copied().max().unwrap_or(1);
        let ring = match device {
            None => StagingRing::host(slots, slot_bytes, alignment).map_err(to_py)?,
            Some(d) => pinned_ring(slots, slot_bytes, alignment, &open_device(py, d)?)?,
        };
        let tiers = locations
            .iter()
            .map(|row| {
                row.iter()
                    .map(|&(file, offset, stride)| MappedTier {
                        file,
                        offset,
                        stride,
                    })
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>();
        let store = py
            .detach(|| HostStore::mapped(&experts, &sizes, &files, &tiers, ring))
            .map_err(to_py)?;
        Ok(Self {
            inner: Arc::new(store),
        })
    }

    /// True for a store over memory-mapped files.
    #[getter]
    fn mapped_files(&self) -> bool {
        self.inner.is_mapped()
    }

    /// Bytes the store itself holds in host memory: the whole arena (resident) or the
    /// staging ring (mapped; the mapped pages are the page cache's).
    #[getter]
    fn resident_bytes(&self) -> u64 {
        self.inner.resident_bytes()
    }

    /// slots, slot_bytes, total_bytes, in_use, peak_in_use, acquisitions of the staging
    /// ring; None for a resident store.
    fn staging_stats<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let Some(r) = self.inner.staging() else {
            return Ok(None);
        };
        let d = PyDict::new(py);
        d.set_item("slots", r.slots())?;
        d.set_item("slot_bytes", r.slot_bytes())?;
        d.set_item("total_bytes", r.total_bytes())?;
        d.set_item("in_use", r.in_use())?;
        d.set_item("peak_in_use", r.peak_in_use())?;
        d.set_item("acquisitions", r.acquisitions())?;
        Ok(Some(d))
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
        let (arena, offset, len) = self
            .inner
            .locate_arena(layer, expert, tier)
            .map_err(to_py)?;
        memoryview(
            py,
            BlockView {
                arena,
                offset,
                len,
                readonly: true,
                _keep: Keep::Frozen,
            },
        )
    }
}

/// A finished transfer reported by `TransferEngine.poll`.
#[pyclass(frozen, name = "Completion", module = "dynaexq._core")]
pub struct PyCompletion {
    #[pyo3(get)]
    pub(super) id: u64,
    #[pyo3(get)]
    pub(super) layer: u32,
    #[pyo3(get)]
    pub(super) expert: u32,
    #[pyo3(get)]
    pub(super) tier: u8,
    /// "completed", "failed", "cancelled" or "rejected".
    #[pyo3(get)]
    pub(super) status: &'static str,
    /// The published version (completed only).
    #[pyo3(get)]
    pub(super) version: Option<u32>,
    /// Why it failed or was rejected.
    #[pyo3(get)]
    pub(super) message: Option<String>,
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

pub(super) fn completion_py(c: Completion) -> PyCompletion {
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

pub(super) fn parse_fault(fault: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Fault>> {
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
/// It uploads every published version when created, so it needs a table that nobody has
/// leased yet, and it is the table's only engine; it alone settles its transitions.
#[pyclass(frozen, name = "TransferEngine", module = "dynaexq._core")]
pub struct PyTransferEngine {
    pub(super) inner: Arc<TransferEngine>,
    pub(super) table: Py<PyExpertTable>,
    pub(super) manual: Option<Arc<ManualBackend>>,
}

#[pymethods]
impl PyTransferEngine {
    #[new]
    #[pyo3(signature = (table, store, max_in_flight = 4, queue_capacity = 64, backend = "cpu", workers = 1, driver = true, history = 4096))]
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
        history: i64,
    ) -> PyResult<Self> {
        let config = EngineConfig {
            max_in_flight: positive("max_in_flight", max_in_flight)? as usize,
            queue_capacity: positive("queue_capacity", queue_capacity)? as usize,
            history: positive("history", history)? as usize,
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
        d.set_item("completions_dropped", s.completions_dropped)?;
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
pub(super) fn cuda_backend(_pool: &PyExpertPool) -> PyResult<Arc<dyn CopyBackend>> {
    Err(BackendError::new_err(
        "this build has no CUDA backend (build the extension with the 'cuda' feature)",
    ))
}

#[cfg(feature = "cuda")]
pub(super) fn cuda_backend(pool: &PyExpertPool) -> PyResult<Arc<dyn CopyBackend>> {
    let ctx = pool.device.as_ref().ok_or_else(|| {
        BackendError::new_err("the CUDA backend needs a device pool (ExpertPool(..., device=N))")
    })?;
    Ok(Arc::new(
        crate::transfer::cuda::CudaBackend::new(&ctx.0).map_err(to_py)?,
    ))
}
