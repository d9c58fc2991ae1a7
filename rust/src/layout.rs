//! Sizing a pool from a byte budget (method.md, "Budget"):
//!
//! ```text
//! M_resident = sum_l [ n_hi(l) * m_hi(l) + (E_l - n_hi(l)) * m_lo(l) ]
//! M_transit  = K * max_l m_hi(l)          (K staging slots, transitions in flight)
//! M_resident + M_transit <= budget
//! ```
//!
//! Layers with the same slot size share a class per tier ("lo/<bytes>", "hi/<bytes>"),
//! and the K staging slots form one class ("staging") sized for the largest high tier, so
//! a staging slot can hold any version of any layer. Each tier of a layer lists its own
//! class first and "staging" second: with n_hi hot and E - n_hi cold slots a replacement
//! pair always finds room, because live versions plus transitions in flight never exceed
//! E + K slots.

use std::collections::BTreeMap;

use crate::errors::{Error, Result};
use crate::pool::{ClassSpec, ExpertPool, PoolConfig};
use crate::table::LayerTiers;

/// One MoE layer: expert count and packed slot size per tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerShape {
    pub experts: u32,
    pub lo_bytes: u64,
    pub hi_bytes: u64,
}

/// How many high-precision slots each layer gets.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum HotSlots {
    /// The same count in every layer (capped at the layer's expert count).
    PerLayer(u32),
    /// floor(fraction * E_l) in layer l.
    Fraction(f64),
}

/// What to size.
#[derive(Clone, Debug, PartialEq)]
pub struct LayoutRequest {
    pub budget: u64,
    pub layers: Vec<LayerShape>,
    pub hot: HotSlots,
    /// Transitions allowed in flight (staging slots).
    pub staging: u32,
    pub alignment: u64,
}

/// Where one layer's experts live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerPlan {
    pub experts: u32,
    pub hot: u32,
    /// Class names per tier (tier 0 = low, tier 1 = high), in preference order.
    pub tiers: Vec<Vec<String>>,
}

/// A pool layout that fits the budget.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub classes: Vec<ClassSpec>,
    pub layers: Vec<LayerPlan>,
    pub alignment: u64,
    pub total_bytes: u64,
    pub budget: u64,
}

fn round_up(x: u64, align: u64) -> Result<u64> {
    x.checked_add(align - 1)
        .map(|v| v & !(align - 1))
        .ok_or_else(|| Error::InvalidConfig(format!("slot size {x} B overflows")))
}

/// Size a pool from a byte budget, or say how many bytes are missing.
pub fn plan_layout(req: &LayoutRequest) -> Result<Layout> {
    let align = req.alignment;
    if align == 0 || !align.is_power_of_two() {
        return Err(Error::InvalidConfig(format!(
            "alignment must be a power of two, got {align}"
        )));
    }
    if req.layers.is_empty() {
        return Err(Error::InvalidConfig("at least one layer is needed".into()));
    }
    if req.budget == 0 {
        return Err(Error::InvalidConfig("budget must be > 0".into()));
    }
    if let HotSlots::Fraction(f) = req.hot {
        if !(0.0..=1.0).contains(&f) {
            return Err(Error::InvalidConfig(format!(
                "hot fraction must be in [0, 1], got {f}"
            )));
        }
    }
    let mut sizes = Vec::with_capacity(req.layers.len());
    for (l, s) in req.layers.iter().enumerate() {
        if s.experts == 0 || s.lo_bytes == 0 || s.hi_bytes == 0 {
            return Err(Error::InvalidConfig(format!(
                "layer {l}: experts, lo_bytes and hi_bytes must be > 0 (got {}, {}, {})",
                s.experts, s.lo_bytes, s.hi_bytes
            )));
        }
        let hot = match req.hot {
            HotSlots::PerLayer(n) => n.min(s.experts),
            HotSlots::Fraction(f) => ((f * s.experts as f64).floor() as u32).min(s.experts),
        };
        sizes.push((
            round_up(s.lo_bytes, align)?,
            round_up(s.hi_bytes, align)?,
            hot,
        ));
    }
    let mut minimum = 0u128;
    let mut resident = 0u128;
    for (s, &(lo_b, hi_b, hot)) in req.layers.iter().zip(&sizes) {
        minimum += s.experts as u128 * lo_b as u128;
        resident += hot as u128 * hi_b as u128 + (s.experts - hot) as u128 * lo_b as u128;
    }
    let clamp = |v: u128| u64::try_from(v).unwrap_or(u64::MAX);
    if minimum > req.budget as u128 {
        return Err(Error::BudgetTooSmall {
            what: "one low-tier slot per expert".into(),
            needed: clamp(minimum),
            budget: req.budget,
            missing: clamp(minimum - req.budget as u128),
        });
    }
    let max_hi = sizes.iter().map(|z| z.1).max().unwrap_or(0);
    let needed = resident + req.staging as u128 * max_hi as u128;
    if needed > req.budget as u128 {
        let hot: u64 = sizes.iter().map(|z| z.2 as u64).sum();
        return Err(Error::BudgetTooSmall {
            what: format!(
                "{hot} high-precision slots in total and {} staging slots",
                req.staging
            ),
            needed: clamp(needed),
            budget: req.budget,
            missing: clamp(needed - req.budget as u128),
        });
    }
    // Group layers by slot size per tier: one class per (tier, shape).
    let mut lo: BTreeMap<u64, u64> = BTreeMap::new();
    let mut hi: BTreeMap<u64, u64> = BTreeMap::new();
    for (s, &(lo_b, hi_b, hot)) in req.layers.iter().zip(&sizes) {
        *lo.entry(lo_b).or_default() += (s.experts - hot) as u64;
        *hi.entry(hi_b).or_default() += hot as u64;
    }
    let mut classes = Vec::new();
    let too_many = || Error::InvalidConfig("more than 2^32 slots in one class".into());
    for (tier, map) in [("lo", &lo), ("hi", &hi)] {
        for (&bytes, &count) in map {
            if count > 0 {
                let slots = u32::try_from(count).map_err(|_| too_many())?;
                classes.push(ClassSpec::new(format!("{tier}/{bytes}"), bytes, slots));
            }
        }
    }
    if req.staging > 0 {
        classes.push(ClassSpec::new("staging", max_hi, req.staging));
    }
    let staging = (req.staging > 0).then(|| "staging".to_string());
    let layers = req
        .layers
        .iter()
        .zip(&sizes)
        .map(|(s, &(lo_b, hi_b, hot))| {
            let tier = |name: String, own: bool| {
                let mut v = Vec::new();
                if own {
                    v.push(name);
                }
                v.extend(staging.clone());
                v
            };
            LayerPlan {
                experts: s.experts,
                hot,
                tiers: vec![
                    tier(format!("lo/{lo_b}"), lo.get(&lo_b) > Some(&0)),
                    tier(format!("hi/{hi_b}"), hi.get(&hi_b) > Some(&0)),
                ],
            }
        })
        .collect();
    Ok(Layout {
        classes,
        layers,
        alignment: align,
        total_bytes: clamp(needed),
        budget: req.budget,
    })
}

impl Layout {
    /// The pool configuration (budget = the layout's total).
    pub fn pool_config(&self) -> PoolConfig {
        PoolConfig::new(self.classes.clone()).alignment(self.alignment)
    }

    /// Per-layer tier classes resolved against `pool`, for [`crate::ExpertTable::new`].
    pub fn layer_tiers(&self, pool: &ExpertPool) -> Result<Vec<LayerTiers>> {
        self.layers
            .iter()
            .map(|l| {
                Ok(LayerTiers {
                    experts: l.experts,
                    tiers: l
                        .tiers
                        .iter()
                        .map(|names| names.iter().map(|n| pool.class_id(n)).collect())
                        .collect::<Result<_>>()?,
                })
            })
            .collect()
    }

    /// The initial assignment: the first `hot` experts of each layer at the high tier
    /// (replace with a calibration ranking when one exists).
    pub fn initial_tiers(&self) -> Vec<Vec<u8>> {
        self.layers
            .iter()
            .map(|l| (0..l.experts).map(|e| u8::from(e < l.hot)).collect())
            .collect()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn req(budget: u64, hot: HotSlots, staging: u32) -> LayoutRequest {
        LayoutRequest {
            budget,
            layers: vec![
                LayerShape {
                    experts: 8,
                    lo_bytes: 1000,
                    hi_bytes: 4000,
                },
                LayerShape {
                    experts: 4,
                    lo_bytes: 1000,
                    hi_bytes: 4000,
                },
            ],
            hot,
            staging,
            alignment: 256,
        }
    }

    #[test]
    fn exact_budget_fits_and_one_byte_less_reports_one_missing() {
        // lo 1024, hi 4096: resident = (2*4096 + 6*1024) + (1*4096 + 3*1024), staging 2*4096.
        let need = 2 * 4096 + 6 * 1024 + 4096 + 3 * 1024 + 2 * 4096;
        let l = plan_layout(&req(need, HotSlots::Fraction(0.25), 2)).unwrap();
        assert_eq!(l.total_bytes, need);
        assert_eq!(l.layers[0].hot, 2);
        assert_eq!(l.layers[1].hot, 1);
        let pool = ExpertPool::new(&l.pool_config()).unwrap();
        assert_eq!(pool.total_bytes(), need);
        match plan_layout(&req(need - 1, HotSlots::Fraction(0.25), 2)) {
            Err(Error::BudgetTooSmall { missing, .. }) => assert_eq!(missing, 1),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn too_small_for_one_low_slot_per_expert() {
        match plan_layout(&req(12 * 1024 - 100, HotSlots::PerLayer(0), 0)) {
            Err(e @ Error::BudgetTooSmall { missing: 100, .. }) => {
                assert!(
                    e.to_string().contains("one low-tier slot per expert"),
                    "{e}"
                );
                assert!(e.to_string().contains("100 B missing"), "{e}");
            }
            other => panic!("{other:?}"),
        }
    }
}
