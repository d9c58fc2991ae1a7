//! Glue for the device budget shared by the expert pool and the KV page pool.

use std::sync::Arc;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::budget::{BudgetSnapshot, BudgetUse, DeviceBudget};

use super::*;

// ---------------------------------------------------------------------------------------

/// One byte budget for expert slots and KV pages: `ExpertPool(..., shared_budget=b)` and
/// `KvPagePool(..., budget=b)` reserve from it, so experts + KV pages never exceed
/// `limit`. `kv_floor` bytes stay reserved for KV pages; they may hold at most
/// `kv_ceiling` (default: the whole limit); `expert_floor` bytes stay reserved for experts.
#[pyclass(frozen, name = "DeviceBudget", module = "dynaexq._core")]
pub struct PyDeviceBudget {
    pub(super) inner: Arc<DeviceBudget>,
}

pub(super) fn parse_use(what: &str) -> PyResult<BudgetUse> {
    match what {
        "experts" => Ok(BudgetUse::Experts),
        "kv" => Ok(BudgetUse::KvPages),
        _ => Err(PyValueError::new_err(format!(
            "a budget use is 'experts' or 'kv', got {what:?}"
        ))),
    }
}

fn non_negative(what: &str, v: i64) -> PyResult<u64> {
    u64::try_from(v).map_err(|_| PyValueError::new_err(format!("{what} must be >= 0, got {v}")))
}

pub(super) fn snapshot_dict<'py>(
    py: Python<'py>,
    s: &BudgetSnapshot,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("limit", s.limit)?;
    d.set_item("expert_bytes", s.expert_bytes)?;
    d.set_item("kv_bytes", s.kv_bytes)?;
    d.set_item("kv_floor", s.kv_floor)?;
    d.set_item("kv_ceiling", s.kv_ceiling)?;
    d.set_item("expert_floor", s.expert_floor)?;
    d.set_item("charged_bytes", s.charged())?;
    d.set_item("expert_headroom", s.expert_headroom())?;
    d.set_item("kv_headroom", s.kv_headroom())?;
    d.set_item("high_water_bytes", s.high_water)?;
    d.set_item("moved_to_kv_bytes", s.moved_to_kv)?;
    d.set_item("moved_to_experts_bytes", s.moved_to_experts)?;
    Ok(d)
}

#[pymethods]
impl PyDeviceBudget {
    #[new]
    #[pyo3(signature = (limit, kv_floor = 0, kv_ceiling = None, expert_floor = 0))]
    fn new(
        limit: i64,
        kv_floor: i64,
        kv_ceiling: Option<i64>,
        expert_floor: i64,
    ) -> PyResult<Self> {
        let limit = positive("limit", limit)?;
        let floor = non_negative("kv_floor", kv_floor)?;
        let ceiling = kv_ceiling
            .map(|c| non_negative("kv_ceiling", c))
            .transpose()?
            .unwrap_or(limit);
        let inner = DeviceBudget::with_kv_bounds(limit, floor, ceiling).map_err(to_py)?;
        let expert_floor = non_negative("expert_floor", expert_floor)?;
        inner.set_expert_floor(expert_floor).map_err(|_| {
            PyValueError::new_err(format!(
                "the expert floor ({expert_floor} B) and the KV floor ({floor} B) exceed the \
                 budget ({limit} B)"
            ))
        })?;
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    #[getter]
    fn limit(&self) -> u64 {
        self.inner.limit()
    }

    /// Every counter, read at one instant: limit, expert_bytes, kv_bytes, kv_floor,
    /// kv_ceiling, expert_floor, charged_bytes, expert_headroom, kv_headroom, high_water_bytes,
    /// moved_to_kv_bytes, moved_to_experts_bytes.
    fn snapshot<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        snapshot_dict(py, &self.inner.snapshot())
    }

    /// Whether `nbytes` more for `use` ("experts" or "kv") would fit now.
    #[pyo3(signature = (r#use, nbytes))]
    fn fits(&self, r#use: &str, nbytes: i64) -> PyResult<bool> {
        Ok(self
            .inner
            .fits(parse_use(r#use)?, non_negative("nbytes", nbytes)?))
    }

    /// Keep `floor` bytes for experts; PoolExhausted when it does not fit beside the pages.
    fn set_expert_floor(&self, floor: i64) -> PyResult<()> {
        let floor = non_negative("floor", floor)?;
        self.inner.set_expert_floor(floor).map_err(to_py)
    }

    /// Move the KV bounds; PoolExhausted when the floor does not fit beside the experts.
    fn set_kv_bounds(&self, kv_floor: i64, kv_ceiling: i64) -> PyResult<()> {
        let floor = non_negative("kv_floor", kv_floor)?;
        let ceiling = non_negative("kv_ceiling", kv_ceiling)?;
        self.inner.set_kv_bounds(floor, ceiling).map_err(to_py)
    }

    fn __repr__(&self) -> String {
        let s = self.inner.snapshot();
        format!(
            "DeviceBudget(limit={}, expert_bytes={}, kv_bytes={})",
            s.limit, s.expert_bytes, s.kv_bytes
        )
    }
}
