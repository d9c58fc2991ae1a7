//! Glue for `StepPin`: the expert-table image a device executor's step reads.

use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::pool::Arena;
use crate::table::{ExpertTable, StepPin};

use super::*;

/// Every published version of the table leased for one step of a device executor, with
/// the image the step's kernels read: per entry (layer-major) the tier and the byte offset
/// of the block in the pool's arena. Call `record()` once the step's kernels are enqueued
/// (one use mark for every block, then the leases go); `release()` (or dropping the pin,
/// or leaving a `with` block) gives the leases back without a mark, for a step that
/// enqueued nothing.
#[pyclass(name = "StepPin", module = "dynaexq._core")]
pub struct PyStepPin {
    pin: Option<StepPin<Arc<ExpertTable>>>,
    tiers: Vec<u8>,
    offsets: Vec<u8>,
    base: u64,
}

impl PyStepPin {
    pub(super) fn new(table: &Arc<ExpertTable>, arena: &Arc<dyn Arena>) -> Self {
        let pin = table.pin_step_shared();
        let versions = pin.versions();
        let tiers = versions.iter().map(|v| v.tier).collect();
        // The kernels read `base + offset`: a block in the arena's host-memory tail (the
        // CUDA split arena) lies outside the device allocation, at a signed distance.
        let base = arena.base_address();
        let offsets = versions
            .iter()
            .flat_map(|v| (arena.address(v.block.offset).wrapping_sub(base) as i64).to_le_bytes())
            .collect();
        Self {
            pin: Some(pin),
            tiers,
            offsets,
            base,
        }
    }
}

#[pymethods]
impl PyStepPin {
    /// The published tier of every entry, layer-major, one byte each.
    #[getter]
    fn tiers<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.tiers)
    }
    /// The byte offset of every entry's block from the arena's byte 0, little-endian int64
    /// each (negative or past the arena for a block in separate host memory)
    /// (`numpy.frombuffer(pin.offsets, "<i8")`).
    #[getter]
    fn offsets<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.offsets)
    }
    /// The address of the arena's byte 0 (a host or a device pointer).
    #[getter]
    fn base_address(&self) -> u64 {
        self.base
    }
    /// Whether the leases are still held (neither `record` nor `release` yet).
    #[getter]
    fn held(&self) -> bool {
        self.pin.is_some()
    }
    /// The step's kernels are enqueued: mark every block of the image used (on the
    /// table's fence), then release the leases.
    fn record(&mut self) -> PyResult<()> {
        let pin = self
            .pin
            .take()
            .ok_or_else(|| PoolError::new_err("the step pin was already recorded or released"))?;
        pin.record();
        Ok(())
    }
    /// Give the leases back without a use mark (idempotent).
    fn release(&mut self) {
        self.pin = None;
    }
    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }
    #[pyo3(signature = (*_args))]
    fn __exit__(&mut self, _args: &Bound<'_, pyo3::types::PyTuple>) {
        self.pin = None;
    }
}
