//! Glue for the precision controller (hotness tracker, planner, knapsack).

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::controller::{
    knapsack_exact, knapsack_greedy, plan_with_uncertainty, Capacity, ControllerError,
    HotnessTracker, PlanInput, PlannerConfig, Signal, Uncertainty,
};

// ---------------------------------------------------------------------------------------
// The precision controller (crate::controller)

pub(super) fn controller_err(e: ControllerError) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// Per (layer, expert) hotness from the router of every forward step.
#[pyclass(name = "HotnessTracker", module = "dynaexq._core")]
pub struct PyHotnessTracker {
    pub(super) inner: HotnessTracker,
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

    /// Record a layer's routed mass summed per expert over `tokens` tokens (one call per
    /// layer per controller step, from a device-side accumulator).
    fn observe_mass(&mut self, layer: usize, mass: Vec<f32>, tokens: u64) -> PyResult<()> {
        self.inner
            .observe_mass(layer, &mass, tokens)
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
    max_in_flight = 4, in_flight = 0, min_gain_per_byte = 0.0, sequential = false,
    score_std = None, z = 0.0, gain_std = None
))]
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub(super) fn plan_transitions(
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
    min_gain_per_byte: f32,
    sequential: bool,
    score_std: Option<Vec<f32>>,
    z: f32,
    gain_std: Option<Vec<f32>>,
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
        min_gain_per_byte,
        sequential,
    };
    if gain_std.is_some() && score_std.is_none() {
        return Err(PyValueError::new_err(
            "gain_std needs score_std (the routing's uncertainty) as well",
        ));
    }
    let uncertainty = score_std.as_deref().map(|score_std| Uncertainty {
        score_std,
        gain_std: gain_std.as_deref(),
        z,
    });
    let p = py
        .detach(|| plan_with_uncertainty(&input, &cfg, uncertainty))
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
pub(super) fn knapsack(
    py: Python<'_>,
    values: Vec<f32>,
    tier_bytes: Vec<u64>,
    budget: u64,
    exact: bool,
) -> PyResult<Option<Vec<u8>>> {
    if tier_bytes.is_empty()
        || tier_bytes.len() > crate::controller::MAX_TIERS
        || values.len() % tier_bytes.len() != 0
    {
        return Err(PyValueError::new_err(
            "values must hold items x tiers entries for 1 to 255 tiers",
        ));
    }
    py.detach(|| {
        if exact {
            knapsack_exact(&values, &tier_bytes, budget).map(|r| r.map(|(c, _)| c))
        } else {
            Ok(knapsack_greedy(&values, &tier_bytes, budget))
        }
    })
    .map_err(controller_err)
}
