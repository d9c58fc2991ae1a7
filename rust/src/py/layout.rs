//! Glue for sizing a pool from a byte budget (`plan_layout`, `Layout`).

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::layout::{plan_layout as plan, HotSlots, LayerShape, Layout, LayoutRequest};

use super::*;

// ---------------------------------------------------------------------------------------

/// A pool layout sized from a byte budget (see `plan_layout`).
#[pyclass(frozen, name = "Layout", module = "dynaexq._core")]
pub struct PyLayout {
    pub(super) inner: Layout,
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
pub(super) fn plan_layout(
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
