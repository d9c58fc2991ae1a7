//! Glue for the CPU expert executor (`crate::cpu_experts`).

use std::sync::Arc;

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::cpu_experts::{
    moe_layer, runs_inline, Activations, ExpertLayout, ExpertShape, Half, Routed, TierFormat,
};
use crate::table::ExpertTable;

use super::*;

/// Parse a canonical tier name ("bf16", "fp16", "int4g128", "int2g64a", "int3g64-rtn").
pub(super) fn tier_format(name: &str) -> PyResult<TierFormat> {
    let bad = || PyValueError::new_err(format!("cannot read tier {name:?}"));
    let t = name.split('-').next().unwrap_or(name);
    match t {
        "bf16" => return Ok(TierFormat::Dense(Half::Bf16)),
        "fp16" => return Ok(TierFormat::Dense(Half::Fp16)),
        _ => {}
    }
    let rest = t.strip_prefix("int").ok_or_else(bad)?;
    let (bits, rest) = rest.split_once('g').ok_or_else(bad)?;
    let (group, symmetric) = match rest.strip_suffix('a') {
        Some(g) => (g, false),
        None => (rest, true),
    };
    Ok(TierFormat::Quantized {
        bits: bits.parse().map_err(|_| bad())?,
        group: group.parse().map_err(|_| bad())?,
        symmetric,
    })
}

fn threads_pool(threads: usize) -> PyResult<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("dynaexq-experts-{i}"))
        .build()
        .map_err(|e| BackendError::new_err(format!("start the expert threads: {e}")))
}

/// Runs MoE layers on the CPU straight from the packed bytes of an `ExpertTable`'s
/// published versions: per call one layer, every hit expert leased for the call, parallel
/// over experts and output rows on `threads` threads, with the GIL released.
#[pyclass(frozen, name = "CpuExperts", module = "dynaexq._core")]
pub struct PyCpuExperts {
    table: Arc<ExpertTable>,
    formats: Vec<TierFormat>,
    shape: ExpertShape,
    pool: rayon::ThreadPool,
    threads: usize,
    activations: Activations,
}

#[pymethods]
impl PyCpuExperts {
    /// `tiers[t]`: the tier name of table tier t (e.g. ["int2g64", "bf16"]).
    /// `activations`: "int8" (integer tiers take their inputs quantized to int8 per
    /// weight group: integer dot products, the default) or "float" (exact float32 inputs).
    #[new]
    #[pyo3(signature = (table, tiers, hidden_size, intermediate_size, alignment = 256, threads = 1, activations = "int8"))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        table: &PyExpertTable,
        tiers: Vec<String>,
        hidden_size: usize,
        intermediate_size: usize,
        alignment: usize,
        threads: usize,
        activations: &str,
    ) -> PyResult<Self> {
        let activations = match activations {
            "int8" => Activations::Int8,
            "float" => Activations::Float,
            other => {
                return Err(PyValueError::new_err(format!(
                    "activations must be \"int8\" or \"float\", not {other:?}"
                )))
            }
        };
        let formats = tiers
            .iter()
            .map(|t| tier_format(t))
            .collect::<PyResult<Vec<_>>>()?;
        let shape = ExpertShape {
            hidden: hidden_size,
            intermediate: intermediate_size,
            alignment,
        };
        let pool = table.pool.get();
        for (t, &f) in formats.iter().enumerate() {
            let layout = ExpertLayout::new(f, shape).map_err(to_py)?;
            for l in 0..table.inner.num_layers() {
                if t >= table.inner.num_tiers(l).map_err(to_py)? as usize {
                    return Err(PyValueError::new_err(format!(
                        "{} tiers given, layer {l} has fewer",
                        formats.len()
                    )));
                }
                for &c in table.inner.tier_classes(l, t as u8).map_err(to_py)? {
                    let have = with_locked_pool(pool, |p| p.slot_bytes(c)).map_err(to_py)?;
                    if (have as usize) < layout.nbytes {
                        return Err(PyValueError::new_err(format!(
                            "tier {} needs {} B per expert, its slots hold {have} B",
                            tiers[t], layout.nbytes
                        )));
                    }
                }
            }
        }
        if threads == 0 {
            return Err(PyValueError::new_err("threads must be >= 1"));
        }
        Ok(Self {
            table: table.inner.clone(),
            formats,
            shape,
            pool: threads_pool(threads)?,
            threads,
            activations,
        })
    }

    /// One MoE layer: `x` float32 [T, H], `expert_ids` int64 [T, k], `weights` float32
    /// [T, k], written into `out` float32 [T, H] (sum over picks of weight x expert(x)).
    /// Returns (pairs served per tier, routing weight served per tier).
    fn forward(
        &self,
        py: Python<'_>,
        layer: u32,
        x: &Bound<'_, PyAny>,
        expert_ids: &Bound<'_, PyAny>,
        weights: &Bound<'_, PyAny>,
        out: &Bound<'_, PyAny>,
    ) -> PyResult<(Vec<u64>, Vec<f64>)> {
        // Inputs are copied while the GIL is held (nobody can change them under us), the
        // layer runs with the GIL released, the result is written back with it held.
        let xb = PyBuffer::<f32>::get(x)?;
        let ib = PyBuffer::<i64>::get(expert_ids)?;
        let wb = PyBuffer::<f32>::get(weights)?;
        let ob = PyBuffer::<f32>::get(out)?;
        if ib.dimensions() != 2 {
            return Err(PyValueError::new_err("expert_ids must be [tokens, k]"));
        }
        let k = ib.shape()[1];
        let xs = xb.to_vec(py)?;
        let ids = ib
            .to_vec(py)?
            .into_iter()
            .map(|e| u32::try_from(e).map_err(|_| PyValueError::new_err(format!("expert id {e}"))))
            .collect::<PyResult<Vec<_>>>()?;
        let ws = wb.to_vec(py)?;
        if ob.readonly() || ob.item_count() != xs.len() {
            return Err(PyValueError::new_err(
                "out must be a writable float32 buffer shaped like x",
            ));
        }
        let table = self.table.clone();
        let (formats, shape, act) = (&self.formats, self.shape, self.activations);
        let (y, served) = py
            .detach(|| {
                let routed = Routed {
                    x: &xs,
                    ids: &ids,
                    weights: &ws,
                    k,
                };
                // (One thread, or a small call: on this thread, see `runs_inline`.)
                if self.threads == 1 || runs_inline(ids.len(), shape) {
                    moe_layer(&table, layer, formats, shape, routed, act)
                } else {
                    self.pool
                        .install(|| moe_layer(&table, layer, formats, shape, routed, act))
                }
            })
            .map_err(to_py)?;
        ob.copy_from_slice(py, &y)?;
        Ok((served.pairs, served.mass))
    }

    #[getter]
    fn threads(&self) -> usize {
        self.threads
    }

    /// "int8" or "float" (see the constructor).
    #[getter]
    fn activations(&self) -> &'static str {
        match self.activations {
            Activations::Int8 => "int8",
            Activations::Float => "float",
        }
    }
}

fn with_locked_pool<R>(pool: &PyExpertPool, f: impl FnOnce(&crate::pool::ExpertPool) -> R) -> R {
    f(&crate::sync::lock(&pool.inner))
}
