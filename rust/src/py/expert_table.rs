//! Glue for the precision state machine: versions, transitions, leases and `ExpertTable`.

use std::sync::{Arc, Mutex};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyMemoryView};

use crate::table::{
    self, LayerTiers, ManualFence, OwnedLease, PendingTransition, SyncUses,
    Transition as RTransition, UseFence,
};

use super::*;

// ---------------------------------------------------------------------------------------

/// A published version of one expert: tier, version number and block.
#[pyclass(frozen, eq, name = "Version", module = "dynaexq._core")]
pub struct PyVersion {
    #[pyo3(get)]
    pub(super) tier: u8,
    #[pyo3(get)]
    pub(super) version: u32,
    #[pyo3(get)]
    pub(super) block: Py<PyBlock>,
    pub(super) raw: table::Version,
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

/// An admitted transition. The one `table.begin` returned owns it: `write` the target
/// tier's bytes into its pending block, then `table.complete(t)` or `table.abort(t)`; one
/// dropped unsettled is aborted. One from `table.transition_of` only describes (the
/// transfer engine's transitions are settled by the engine alone).
#[pyclass(frozen, name = "Transition", module = "dynaexq._core")]
pub struct PyTransition {
    #[pyo3(get)]
    pub(super) ticket: u64,
    #[pyo3(get)]
    pub(super) layer: u32,
    #[pyo3(get)]
    pub(super) expert: u32,
    #[pyo3(get)]
    pub(super) from_tier: u8,
    #[pyo3(get)]
    pub(super) to_tier: u8,
    #[pyo3(get)]
    pub(super) block: Py<PyBlock>,
    /// The capability to settle it (None: a description, or already settled).
    pub(super) pending: Mutex<Option<PendingTransition>>,
    pub(super) table: Arc<table::ExpertTable>,
}

impl PyTransition {
    fn take(&self) -> PyResult<PendingTransition> {
        crate::sync::lock(&self.pending).take().ok_or_else(|| {
            IllegalTransition::new_err(format!(
                "transition {} of expert ({}, {}) cannot be settled here: it was already \
                 settled, or it belongs to whoever began it (a transfer engine settles its own)",
                self.ticket, self.layer, self.expert
            ))
        })
    }
}

impl Drop for PyTransition {
    fn drop(&mut self) {
        if let Some(p) = crate::sync::lock(&self.pending).take() {
            let _ = self.table.abort(p);
        }
    }
}

#[pymethods]
impl PyTransition {
    /// Copy `data` (any bytes-like buffer) into the pending block at `offset` (host pools).
    #[pyo3(signature = (data, offset = 0))]
    fn write(&self, data: &Bound<'_, PyAny>, offset: u64) -> PyResult<()> {
        let buf = pyo3::buffer::PyBuffer::<u8>::get(data)?;
        let bytes = buf.to_vec(data.py())?;
        let g = crate::sync::lock(&self.pending);
        let p = g.as_ref().ok_or_else(|| {
            IllegalTransition::new_err("only the owner of an unsettled transition writes its block")
        })?;
        self.table.write_pending(p, offset, &bytes).map_err(to_py)
    }
    /// Whether this object can still settle the transition.
    #[getter]
    fn owned(&self) -> bool {
        crate::sync::lock(&self.pending).is_some()
    }
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
    pub(super) inner: Option<OwnedLease>,
    pub(super) pool: Py<PyExpertPool>,
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
                _keep: Keep::Lease(lease.duplicate()),
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

pub(super) fn version_py(
    py: Python<'_>,
    pool: &PyExpertPool,
    v: table::Version,
) -> PyResult<PyVersion> {
    Ok(PyVersion {
        tier: v.tier,
        version: v.version,
        block: Py::new(py, pool.block(py, v.block))?,
        raw: v,
    })
}

pub(super) fn tier_list(item: &Bound<'_, PyAny>) -> PyResult<Vec<String>> {
    if let Ok(s) = item.extract::<String>() {
        return Ok(vec![s]);
    }
    item.extract::<Vec<String>>()
}

/// The compute stream the CUDA fence records on: a stream object with `.cuda_stream`
/// (e.g. `torch.cuda.current_stream()`), which the fence keeps alive, or 0 (the legacy
/// default stream, never destroyed). A bare nonzero handle is refused: nothing would keep
/// its stream alive.
fn compute_stream_of(obj: &Bound<'_, PyAny>) -> PyResult<(u64, Option<Py<PyAny>>)> {
    if let Ok(raw) = obj.extract::<u64>() {
        if raw == 0 {
            return Ok((0, None));
        }
        return Err(PyValueError::new_err(
            "pass the stream object (e.g. torch.cuda.current_stream()), not its raw handle: \
             the fence keeps the object alive while it records on the stream",
        ));
    }
    let raw: u64 = obj.getattr("cuda_stream")?.extract()?;
    Ok((raw, Some(obj.clone().unbind())))
}

#[cfg(feature = "cuda")]
pub(super) fn stream_fence(
    pool: &PyExpertPool,
    slots: u32,
    stream: &Bound<'_, PyAny>,
) -> PyResult<Arc<dyn UseFence>> {
    let (raw, owner) = compute_stream_of(stream)?;
    let ctx = pool.device.as_ref().ok_or_else(|| {
        PyValueError::new_err("compute_stream needs a device pool (ExpertPool(..., device=N))")
    })?;
    let owner = owner.map(|o| Box::new(o) as Box<dyn Send + Sync>);
    // SAFETY: `raw` is the handle of the stream object `owner`, which the fence keeps
    // alive (torch destroys a stream only when its object is collected), or 0.
    let stream = unsafe { crate::transfer::cuda::BorrowedStream::new(&ctx.0, raw, owner) };
    Ok(Arc::new(crate::transfer::cuda::CudaUseFence::new(
        slots,
        stream,
        crate::transfer::cuda::DROP_WAIT,
    )))
}

#[cfg(not(feature = "cuda"))]
pub(super) fn stream_fence(
    _pool: &PyExpertPool,
    _slots: u32,
    stream: &Bound<'_, PyAny>,
) -> PyResult<Arc<dyn UseFence>> {
    compute_stream_of(stream)?;
    Err(BackendError::new_err("this build has no CUDA support"))
}

/// The per-expert precision state machine over a pool.
#[pyclass(frozen, name = "ExpertTable", module = "dynaexq._core")]
pub struct PyExpertTable {
    pub(super) inner: Arc<table::ExpertTable>,
    pub(super) pool: Py<PyExpertPool>,
    pub(super) manual: Option<Arc<ManualFence>>,
}

impl PyExpertTable {
    fn transition_py(
        &self,
        py: Python<'_>,
        t: RTransition,
        pending: Option<PendingTransition>,
    ) -> PyResult<PyTransition> {
        Ok(PyTransition {
            ticket: t.ticket,
            layer: t.layer,
            expert: t.expert,
            from_tier: t.from,
            to_tier: t.to,
            block: Py::new(py, self.pool.get().block(py, t.block))?,
            pending: Mutex::new(pending),
            table: self.inner.clone(),
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
        compute_stream: Option<Bound<'_, PyAny>>,
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
            (None, Some(stream)) => stream_fence(p, slots, &stream)?,
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

    /// Lease every published version for one step of a device executor and read the
    /// table image its kernels take (see `StepPin`).
    fn pin_step(&self, py: Python<'_>) -> PyStepPin {
        let arena = self.pool.get().arena.clone();
        py.detach(|| PyStepPin::new(&self.inner, &arena))
    }

    /// The published tier of every expert, layer-major, as bytes (one call for telemetry
    /// instead of one per expert).
    fn tiers<'py>(&self, py: Python<'py>) -> Bound<'py, pyo3::types::PyBytes> {
        pyo3::types::PyBytes::new(py, &self.inner.published_tiers())
    }

    /// The current tier of (layer, expert).
    fn tier(&self, layer: u32, expert: u32) -> PyResult<u8> {
        Ok(self.inner.published(layer, expert).map_err(to_py)?.tier)
    }

    /// The in-flight transition of (layer, expert), or None when it is resident. A
    /// description only: it cannot settle the transition.
    fn transition_of(
        &self,
        py: Python<'_>,
        layer: u32,
        expert: u32,
    ) -> PyResult<Option<PyTransition>> {
        let inner = self.inner.clone();
        let t = py
            .detach(|| inner.transition_of(layer, expert))
            .map_err(to_py)?;
        t.map(|t| self.transition_py(py, t, None)).transpose()
    }

    /// Admit a transition of (layer, expert) to `tier`: reserves the target block. The
    /// returned Transition is the only object that can settle it.
    fn begin(&self, py: Python<'_>, layer: u32, expert: u32, tier: u8) -> PyResult<PyTransition> {
        let inner = self.inner.clone();
        let p = py
            .detach(|| inner.begin(layer, expert, tier))
            .map_err(to_py)?;
        self.transition_py(py, p.info(), Some(p))
    }

    /// The copy finished: publish the new version (old block retired). Returns it. Only
    /// with the Transition `begin` returned.
    fn complete(&self, py: Python<'_>, transition: &PyTransition) -> PyResult<PyVersion> {
        let p = transition.take()?;
        let inner = self.inner.clone();
        let v = py.detach(|| inner.complete(p)).map_err(to_py)?;
        version_py(py, self.pool.get(), v)
    }

    /// The transition failed or was cancelled: keep the old version, free the reservation.
    /// Only with the Transition `begin` returned.
    fn abort(&self, py: Python<'_>, transition: &PyTransition) -> PyResult<()> {
        let p = transition.take()?;
        let inner = self.inner.clone();
        py.detach(|| inner.abort(p)).map_err(to_py)
    }

    /// Write the first bytes of (layer, expert)'s published block (host pools), before the
    /// first lease seals the table.
    fn load(&self, layer: u32, expert: u32, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let buf = pyo3::buffer::PyBuffer::<u8>::get(data)?;
        let bytes = buf.to_vec(data.py())?;
        let inner = self.inner.clone();
        data.py()
            .detach(|| inner.load_initial(layer, expert, &bytes))
            .map_err(to_py)
    }

    /// End the loading phase now (the first lease does it otherwise).
    fn seal(&self, py: Python<'_>) {
        let inner = self.inner.clone();
        py.detach(|| inner.seal());
    }

    /// Whether the loading phase is over.
    #[getter]
    fn sealed(&self) -> bool {
        self.inner.is_sealed()
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
        d.set_item("sealed", s.sealed)?;
        d.set_item("per_tier", s.per_tier)?;
        Ok(d)
    }
}
