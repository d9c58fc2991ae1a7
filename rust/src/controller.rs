//! The hotness-aware precision controller: routing observations become hotness scores,
//! scores become a tier plan (which expert holds which precision), and the plan becomes a
//! bounded list of transitions for the transfer engine.
//!
//! Tiers are indices `0..T`, 0 being the lowest precision. The planner never allocates; it
//! only decides. Everything here is deterministic: ties are broken by expert index.

use std::cmp::Ordering;
use std::fmt;

/// Errors from building a tracker or planning with inconsistent inputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControllerError {
    /// A size, count or parameter is out of its domain; the message says which.
    Invalid(String),
    /// The work or memory the request implies is too large to attempt.
    TooLarge(String),
}

/// Tiers are numbered with a `u8`.
pub const MAX_TIERS: usize = u8::MAX as usize;

/// The largest table `knapsack_exact` builds (f64 values + u8 picks per cell: ~0.6 GB).
pub const KNAPSACK_EXACT_CELLS: u64 = 64 << 20;

impl fmt::Display for ControllerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ControllerError::Invalid(msg) | ControllerError::TooLarge(msg) => write!(f, "{msg}"),
        }
    }
}

impl std::error::Error for ControllerError {}

fn invalid<T>(msg: impl Into<String>) -> Result<T, ControllerError> {
    Err(ControllerError::Invalid(msg.into()))
}

/// How per-step routing mass becomes a hotness score.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Signal {
    /// Long horizon (the paper's): `S <- alpha * S + (1 - alpha) * c` once per step.
    Ema { alpha: f32 },
    /// Short horizon: the sum of `c` over the last `steps` steps.
    Window { steps: usize },
}

/// The most (layer, expert) entries a tracker follows (real models have ~25k).
pub const MAX_TRACKED: usize = 1 << 24;

/// Per (layer, expert) hotness from the router of every forward step.
///
/// The signal of one step is `c = (1/N) * sum_t 1[e in topk(t)] * p_t,e`: the routed
/// probability mass an expert received, averaged over the step's N tokens.
pub struct HotnessTracker {
    layers: usize,
    experts: usize,
    signal: Signal,
    /// Mass accumulated during the current step, `layers * experts`.
    pending: Vec<f32>,
    /// Tokens observed per layer during the current step.
    pending_tokens: Vec<u64>,
    /// The smoothed score, `layers * experts`.
    score: Vec<f64>,
    /// Window signal only: the last `steps` per-step vectors, oldest overwritten first.
    ring: Vec<f32>,
    ring_next: usize,
    ring_filled: usize,
    steps: u64,
}

impl HotnessTracker {
    pub fn new(layers: usize, experts: usize, signal: Signal) -> Result<Self, ControllerError> {
        if layers == 0 || experts == 0 {
            return invalid("a tracker needs at least one layer and one expert");
        }
        let n = layers
            .checked_mul(experts)
            .filter(|&n| n <= MAX_TRACKED)
            .ok_or_else(|| {
                ControllerError::TooLarge(format!(
                    "{layers} layers x {experts} experts: more than {MAX_TRACKED} tracked experts"
                ))
            })?;
        let ring_len = match signal {
            Signal::Ema { alpha } => {
                if !(0.0..1.0).contains(&alpha) {
                    return invalid(format!("EMA alpha must be in [0, 1), got {alpha}"));
                }
                0
            }
            Signal::Window { steps } => {
                if steps == 0 {
                    return invalid("a window signal needs at least one step");
                }
                steps
                    .checked_mul(n)
                    .filter(|&r| r <= MAX_TRACKED * 64)
                    .ok_or_else(|| {
                        ControllerError::TooLarge(format!(
                            "a window of {steps} steps over {n} experts is too large"
                        ))
                    })?
            }
        };
        Ok(Self {
            layers,
            experts,
            signal,
            pending: vec![0.0; n],
            pending_tokens: vec![0; layers],
            score: vec![0.0; n],
            ring: vec![0.0; ring_len],
            ring_next: 0,
            ring_filled: 0,
            steps: 0,
        })
    }

    pub fn layers(&self) -> usize {
        self.layers
    }

    pub fn experts(&self) -> usize {
        self.experts
    }

    pub fn signal(&self) -> Signal {
        self.signal
    }

    /// Completed steps so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Record one layer's routing for some tokens of the current step: `expert_ids` and
    /// `probs` are `[tokens, top_k]` row-major, `probs` the router's softmax probabilities.
    pub fn observe(
        &mut self,
        layer: usize,
        expert_ids: &[u32],
        probs: &[f32],
        top_k: usize,
    ) -> Result<(), ControllerError> {
        if layer >= self.layers {
            return invalid(format!("layer {layer} out of range (0..{})", self.layers));
        }
        if top_k == 0 || expert_ids.len() != probs.len() || expert_ids.len() % top_k != 0 {
            return invalid(format!(
                "routing shapes disagree: {} expert ids, {} probabilities, top_k {top_k}",
                expert_ids.len(),
                probs.len()
            ));
        }
        let row = &mut self.pending[layer * self.experts..(layer + 1) * self.experts];
        for (&e, &p) in expert_ids.iter().zip(probs) {
            let Some(slot) = row.get_mut(e as usize) else {
                return invalid(format!("expert {e} out of range (0..{})", self.experts));
            };
            *slot += p;
        }
        self.pending_tokens[layer] += (expert_ids.len() / top_k) as u64;
        Ok(())
    }

    /// Record a layer's routed mass already summed per expert (`mass[e]`, over `tokens`
    /// tokens): what a device executor accumulates on the device between controller
    /// steps and hands over in one copy. Equal to `observe` of the same picks.
    pub fn observe_mass(
        &mut self,
        layer: usize,
        mass: &[f32],
        tokens: u64,
    ) -> Result<(), ControllerError> {
        if layer >= self.layers {
            return invalid(format!("layer {layer} out of range (0..{})", self.layers));
        }
        if mass.len() != self.experts {
            return invalid(format!(
                "{} masses for a layer of {} experts",
                mass.len(),
                self.experts
            ));
        }
        if mass.iter().any(|m| !m.is_finite() || *m < 0.0) {
            return invalid("routed mass must be finite and >= 0".to_string());
        }
        let row = &mut self.pending[layer * self.experts..(layer + 1) * self.experts];
        for (slot, &m) in row.iter_mut().zip(mass) {
            *slot += m;
        }
        self.pending_tokens[layer] += tokens;
        Ok(())
    }

    /// Close the current step: fold its averaged mass into the score.
    pub fn end_step(&mut self) {
        let e = self.experts;
        for l in 0..self.layers {
            let n = self.pending_tokens[l].max(1) as f32;
            for c in &mut self.pending[l * e..(l + 1) * e] {
                *c /= n;
            }
        }
        match self.signal {
            Signal::Ema { alpha } => {
                let a = alpha as f64;
                for (s, &c) in self.score.iter_mut().zip(&self.pending) {
                    *s = a * *s + (1.0 - a) * c as f64;
                }
            }
            Signal::Window { steps } => {
                let n = self.pending.len();
                let slot = &mut self.ring[self.ring_next * n..(self.ring_next + 1) * n];
                for ((s, old), &c) in self
                    .score
                    .iter_mut()
                    .zip(slot.iter_mut())
                    .zip(&self.pending)
                {
                    *s += c as f64 - *old as f64;
                    *old = c;
                }
                self.ring_next = (self.ring_next + 1) % steps;
                self.ring_filled = (self.ring_filled + 1).min(steps);
                // Running sums drift; recompute exactly once per full turn of the ring.
                if self.ring_next == 0 {
                    self.recompute_window();
                }
            }
        }
        self.pending.iter_mut().for_each(|c| *c = 0.0);
        self.pending_tokens.iter_mut().for_each(|t| *t = 0);
        self.steps += 1;
    }

    fn recompute_window(&mut self) {
        let n = self.score.len();
        self.score.iter_mut().for_each(|s| *s = 0.0);
        for step in self.ring.chunks_exact(n).take(self.ring_filled) {
            for (s, &c) in self.score.iter_mut().zip(step) {
                *s += c as f64;
            }
        }
    }

    /// Scores, `layers * experts` row-major.
    pub fn scores(&self) -> Vec<f32> {
        self.score.iter().map(|&s| s as f32).collect()
    }

    /// Start from an offline calibration ranking (cold start): scores become `scores`.
    pub fn seed(&mut self, scores: &[f32]) -> Result<(), ControllerError> {
        if scores.len() != self.score.len() {
            return invalid(format!(
                "seed has {} scores, the tracker {}",
                scores.len(),
                self.score.len()
            ));
        }
        for (s, &v) in self.score.iter_mut().zip(scores) {
            *s = v as f64;
        }
        if let Signal::Window { steps } = self.signal {
            // A seed stands for one full window of evidence spread evenly over it.
            let n = self.score.len();
            for step in self.ring.chunks_exact_mut(n) {
                for (c, &v) in step.iter_mut().zip(scores) {
                    *c = v / steps as f32;
                }
            }
            self.ring_filled = steps;
            self.ring_next = 0;
            self.recompute_window();
        }
        Ok(())
    }
}

/// How many slots of each tier exist, and over which experts they are shared.
#[derive(Clone, Debug, PartialEq)]
pub enum Capacity {
    /// `slots[t]` slots of tier t in every layer (the paper: n_hi per layer).
    PerLayer(Vec<usize>),
    /// `slots[layer][t]`: a different count per layer.
    ByLayer(Vec<Vec<usize>>),
    /// `slots[t]` slots of tier t shared by all layers (same expert shape everywhere).
    Global(Vec<usize>),
}

/// Limits on one plan.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PlannerConfig {
    /// An outsider replaces an incumbent only if its value is higher by more than this.
    pub delta: f32,
    /// At most this many transitions per plan (rate limit per period).
    pub max_transitions: usize,
    /// At most this many bytes copied per plan (churn cap).
    pub max_bytes: u64,
    /// At most this many transitions in flight at once (K).
    pub max_in_flight: usize,
    /// Moves only when they pay: a move group (a promotion, or a demote+promote pair) is
    /// made only if its gain in value exceeds this much per byte it copies; the groups
    /// that do not pay are dropped (not deferred). 0 takes every group.
    pub min_gain_per_byte: f32,
    /// Demote before promoting, through free slots only (staging of the lowest tier): a
    /// displaced incumbent goes to its wanted tier if that tier has a free slot now, else
    /// to tier 0 (whose spare slots are the staging), and a promotion into a full tier
    /// waits for the next plan, when the demotion has freed its slot. Without it a pair is
    /// taken as capacity-neutral (the demoted expert takes the promoted one's old slot),
    /// which needs staging slots in every tier.
    pub sequential: bool,
}

impl Default for PlannerConfig {
    fn default() -> Self {
        Self {
            delta: 0.01,
            max_transitions: usize::MAX,
            max_bytes: u64::MAX,
            max_in_flight: 4,
            min_gain_per_byte: 0.0,
            sequential: false,
        }
    }
}

/// What the planner sees of the world.
pub struct PlanInput<'a> {
    pub layers: usize,
    pub experts: usize,
    /// Hotness, `layers * experts`.
    pub scores: &'a [f32],
    /// The tier each expert holds (for a busy expert: the tier it is moving to).
    pub current: &'a [u8],
    /// Experts with a transition in flight; they neither move nor get displaced.
    pub busy: &'a [bool],
    /// Bytes one copy into tier t moves (its slot size), per tier.
    pub tier_bytes: &'a [u64],
    /// Optional error reduction of each expert at each tier relative to tier 0,
    /// `layers * experts * tiers` (0 at tier 0, non-decreasing in t). `None` means every
    /// tier step is worth the same: tier t is worth `t`.
    pub gain: Option<&'a [f32]>,
    pub capacity: &'a Capacity,
    /// Transitions already in flight.
    pub in_flight: usize,
}

/// One precision change for the transfer engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    pub layer: u32,
    pub expert: u32,
    pub from: u8,
    pub to: u8,
    /// Bytes the copy moves (the target tier's slot size).
    pub bytes: u64,
}

impl Transition {
    pub fn is_promotion(&self) -> bool {
        self.to > self.from
    }
}

/// The outcome of one planning round.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// The assignment the planner would like, `layers * experts`.
    pub target: Vec<u8>,
    /// The transitions to submit now, demotions of a replacement pair before promotions.
    pub transitions: Vec<Transition>,
    /// Wanted moves left for a later plan by the rate, byte or in-flight limits.
    pub deferred: usize,
}

impl PlanInput<'_> {
    fn tiers(&self) -> usize {
        self.tier_bytes.len()
    }

    fn validate(&self) -> Result<(), ControllerError> {
        let n = self.layers * self.experts;
        let t = self.tiers();
        if t < 2 || t > u8::MAX as usize {
            return invalid(format!("need between 2 and 255 tiers, got {t}"));
        }
        if self.scores.len() != n || self.current.len() != n || self.busy.len() != n {
            return invalid(format!(
                "expected {n} scores, tiers and busy flags, got {}, {}, {}",
                self.scores.len(),
                self.current.len(),
                self.busy.len()
            ));
        }
        if let Some(&bad) = self.current.iter().find(|&&c| c as usize >= t) {
            return invalid(format!("current tier {bad} out of range (0..{t})"));
        }
        if let Some(g) = self.gain {
            if g.len() != n * t {
                return invalid(format!("expected {} gains, got {}", n * t, g.len()));
            }
        }
        let check = |slots: &Vec<usize>| {
            if slots.len() != t {
                return invalid(format!(
                    "capacity lists {} tiers, tier_bytes {t}",
                    slots.len()
                ));
            }
            Ok(())
        };
        match self.capacity {
            Capacity::PerLayer(s) | Capacity::Global(s) => check(s)?,
            Capacity::ByLayer(per) => {
                if per.len() != self.layers {
                    return invalid(format!(
                        "capacity lists {} layers, the model has {}",
                        per.len(),
                        self.layers
                    ));
                }
                per.iter().try_for_each(check)?;
            }
        }
        Ok(())
    }

    /// Value of holding expert `i` (flat index) at tier `t`.
    fn value(&self, i: usize, t: usize) -> f32 {
        let g = match self.gain {
            Some(g) => g[i * self.tiers() + t],
            None => t as f32,
        };
        self.scores[i] * g
    }

    /// Marginal worth of tier `t` over tier `t - 1` per unit of score (for hysteresis).
    fn step_gain(&self, i: usize, t: usize) -> f32 {
        match self.gain {
            Some(g) => g[i * self.tiers() + t] - g[i * self.tiers() + t - 1],
            None => 1.0,
        }
    }
}

/// Plan one round: the target assignment under the slot capacities (with hysteresis in
/// favour of incumbents), then the transitions that move toward it within the limits.
pub fn plan(input: &PlanInput<'_>, cfg: &PlannerConfig) -> Result<Plan, ControllerError> {
    plan_with_uncertainty(input, cfg, None)
}

/// How sure the planner is of its scores: a move is made only when its gain, less `z`
/// standard errors of that gain, still pays (exceeds `min_gain_per_byte` x its bytes).
#[derive(Clone, Copy, Debug)]
pub struct Uncertainty<'a> {
    /// Standard error of every score, `layers * experts`, in the scores' units.
    pub score_std: &'a [f32],
    /// Standard error of every expert's loss at each tier per unit of score
    /// (`layers * experts * tiers`, 0 at the top tier), when the tier values are
    /// measured rather than known: a move from tier a to b adds
    /// `score * sqrt(std[a]^2 + std[b]^2)` to its gain's uncertainty.
    pub gain_std: Option<&'a [f32]>,
    /// Standard errors a gain must clear.
    pub z: f32,
}

/// [`plan`] with the gain of every move group discounted by its uncertainty: a group's
/// gain `sum_i s_i * (g_i[to] - g_i[from])` is linear in the scores, so with independent
/// score errors its standard error is `sqrt(sum_i (std_i * (g_i[to] - g_i[from]))^2)`;
/// the group is made only if `gain - z * std > min_gain_per_byte * bytes` (and, without
/// a byte price, only if `gain - z * std > 0`).
pub fn plan_with_uncertainty(
    input: &PlanInput<'_>,
    cfg: &PlannerConfig,
    uncertainty: Option<Uncertainty<'_>>,
) -> Result<Plan, ControllerError> {
    input.validate()?;
    if let Some(u) = uncertainty {
        if u.score_std.len() != input.scores.len() {
            return invalid(format!(
                "expected {} score standard errors, got {}",
                input.scores.len(),
                u.score_std.len()
            ));
        }
        let ok = |x: f32| x.is_finite() && x >= 0.0;
        if !ok(u.z) || !u.score_std.iter().all(|&s| ok(s)) {
            return invalid("z and the score standard errors must be finite and >= 0");
        }
        if let Some(g) = u.gain_std {
            if g.len() != input.scores.len() * input.tiers() {
                return invalid(format!(
                    "expected {} gain standard errors, got {}",
                    input.scores.len() * input.tiers(),
                    g.len()
                ));
            }
            if !g.iter().all(|&s| ok(s)) {
                return invalid("the gain standard errors must be finite and >= 0");
            }
        }
    }
    let (l_count, e_count) = (input.layers, input.experts);
    let mut target = input.current.to_vec();
    let mut transitions = Vec::new();
    let mut deferred = 0;
    let mut budget = Limits {
        transitions: cfg.max_transitions,
        bytes: cfg.max_bytes,
        in_flight: cfg.max_in_flight.saturating_sub(input.in_flight),
    };
    let scopes: Vec<(Vec<usize>, Vec<usize>)> = match input.capacity {
        Capacity::Global(slots) => vec![((0..l_count * e_count).collect(), slots.clone())],
        Capacity::PerLayer(slots) => (0..l_count)
            .map(|l| ((l * e_count..(l + 1) * e_count).collect(), slots.clone()))
            .collect(),
        Capacity::ByLayer(per) => (0..l_count)
            .map(|l| ((l * e_count..(l + 1) * e_count).collect(), per[l].clone()))
            .collect(),
    };
    // Moves of every scope compete for one rate limit: order them by gain across scopes.
    let mut all_pairs = Vec::new();
    let mut taken = vec![false; l_count * e_count];
    for (members, slots) in &scopes {
        let wanted = assign_scope(input, cfg.delta, members, slots, &mut taken);
        for &(i, t) in &wanted {
            target[i] = t;
        }
        all_pairs.extend(pair_moves(
            input,
            members,
            slots,
            &wanted,
            cfg.sequential,
            uncertainty,
        ));
    }
    all_pairs.sort_by(|a, b| {
        b.gain
            .partial_cmp(&a.gain)
            .unwrap_or(Ordering::Equal)
            .then(a.order.cmp(&b.order))
    });
    for group in all_pairs {
        let cost = group.moves.len();
        let bytes: u64 = group
            .moves
            .iter()
            .map(|&(_, to)| input.tier_bytes[to as usize])
            .sum();
        let sure = match uncertainty {
            Some(u) => group.gain - u.z * group.std,
            None => group.gain,
        };
        if cfg.min_gain_per_byte > 0.0 && sure <= cfg.min_gain_per_byte * group.bytes as f32 {
            continue;
        }
        if uncertainty.is_some() && sure <= 0.0 {
            continue;
        }
        if cost > budget.transitions || cost > budget.in_flight || bytes > budget.bytes {
            deferred += cost;
            continue;
        }
        budget.transitions -= cost;
        budget.in_flight -= cost;
        budget.bytes -= bytes;
        for (i, to) in group.moves {
            transitions.push(Transition {
                layer: (i / e_count) as u32,
                expert: (i % e_count) as u32,
                from: input.current[i],
                to,
                bytes: input.tier_bytes[to as usize],
            });
        }
    }
    Ok(Plan {
        target,
        transitions,
        deferred,
    })
}

struct Limits {
    transitions: usize,
    bytes: u64,
    in_flight: usize,
}

/// The desired tier of every movable member of one scope, top tier first: tier t's slots
/// go to the members with the largest marginal value of t over t-1, incumbents of t (and
/// above) counted `delta` higher so that an outsider must beat them by more than delta.
fn assign_scope(
    input: &PlanInput<'_>,
    delta: f32,
    members: &[usize],
    slots: &[usize],
    taken: &mut [bool],
) -> Vec<(usize, u8)> {
    let tiers = input.tiers();
    // Busy experts hold their slot; the rest compete.
    let mut free = slots.to_vec();
    for &i in members {
        if input.busy[i] {
            let c = input.current[i] as usize;
            free[c] = free[c].saturating_sub(1);
        }
    }
    let mut assigned: Vec<(usize, u8)> = Vec::with_capacity(members.len());
    let mut open: Vec<usize> = members
        .iter()
        .copied()
        .filter(|&i| !input.busy[i])
        .collect();
    for t in (1..tiers).rev() {
        let mut keyed: Vec<(f32, usize)> = open
            .iter()
            .map(|&i| {
                let mut key = input.value(i, t) - input.value(i, t - 1);
                if input.current[i] as usize >= t {
                    key += delta * input.step_gain(i, t);
                }
                (key, i)
            })
            .collect();
        let take = free[t].min(keyed.len());
        // Only the set of the best `take` matters: a selection, not a full sort. The order
        // is total (key, then index), so the set is deterministic.
        if take > 0 && take < keyed.len() {
            keyed.select_nth_unstable_by(take - 1, |a, b| {
                b.0.partial_cmp(&a.0)
                    .unwrap_or(Ordering::Equal)
                    .then(a.1.cmp(&b.1))
            });
        }
        // Without value there is no reason to hold a precious slot: only positive keys.
        let chosen: Vec<usize> = keyed[..take]
            .iter()
            .filter(|(k, i)| *k > 0.0 || input.current[*i] as usize >= t)
            .map(|&(_, i)| i)
            .collect();
        for &i in &chosen {
            assigned.push((i, t as u8));
            taken[i] = true;
        }
        open.retain(|&i| !taken[i]);
    }
    assigned.extend(open.into_iter().map(|i| (i, 0u8)));
    assigned
}

/// A unit of work that must be taken whole: a promotion into a free slot, or a
/// replacement (demote the incumbent, then promote the outsider into its slot).
struct MoveGroup {
    gain: f32,
    order: usize,
    moves: Vec<(usize, u8)>,
    /// Bytes the whole group copies (a sequential pair's later promotion included): what
    /// its gain must pay for.
    bytes: u64,
    /// Standard error of `gain` (0 without an uncertainty).
    std: f32,
}

fn pair_moves(
    input: &PlanInput<'_>,
    members: &[usize],
    slots: &[usize],
    wanted: &[(usize, u8)],
    sequential: bool,
    uncertainty: Option<Uncertainty<'_>>,
) -> Vec<MoveGroup> {
    let tiers = input.tiers();
    // The standard error of one expert's change of value from tier a to tier b.
    let var = |i: usize, a: usize, b: usize| -> f32 {
        match uncertainty {
            Some(u) => {
                let (lo, hi) = (a.min(b), a.max(b));
                let mut dg = 0.0;
                for t in lo + 1..=hi {
                    dg += input.step_gain(i, t);
                }
                let s = u.score_std[i] * dg;
                // The tiers' own values are measured too: the loss at each end of the
                // move is known to its standard error (independent of the routing's).
                let v = u.gain_std.map_or(0.0, |g| {
                    let (ga, gb) = (g[i * tiers + a], g[i * tiers + b]);
                    input.scores[i] * input.scores[i] * (ga * ga + gb * gb)
                });
                s * s + v
            }
            None => 0.0,
        }
    };
    let mut used = vec![0usize; tiers];
    for &i in members {
        used[input.current[i] as usize] += 1;
    }
    let mut free: Vec<isize> = (0..tiers)
        .map(|t| slots[t] as isize - used[t] as isize)
        .collect();
    let mut promotions: Vec<(usize, u8)> = Vec::new();
    // Demotions out of each tier, weakest first.
    let mut demotions: Vec<Vec<(usize, u8)>> = vec![Vec::new(); tiers];
    for &(i, t) in wanted {
        let c = input.current[i];
        match t.cmp(&c) {
            Ordering::Greater => promotions.push((i, t)),
            Ordering::Less => demotions[c as usize].push((i, t)),
            Ordering::Equal => {}
        }
    }
    promotions.sort_by(|a, b| {
        let va = input.value(a.0, a.1 as usize) - input.value(a.0, input.current[a.0] as usize);
        let vb = input.value(b.0, b.1 as usize) - input.value(b.0, input.current[b.0] as usize);
        vb.partial_cmp(&va)
            .unwrap_or(Ordering::Equal)
            .then(a.0.cmp(&b.0))
    });
    for d in &mut demotions {
        d.sort_by(|a, b| {
            let va = input.value(a.0, input.current[a.0] as usize);
            let vb = input.value(b.0, input.current[b.0] as usize);
            va.partial_cmp(&vb)
                .unwrap_or(Ordering::Equal)
                .then(a.0.cmp(&b.0))
        });
        d.reverse(); // pop() takes the weakest
    }
    let mut groups = Vec::new();
    for (order, (i, t)) in promotions.into_iter().enumerate() {
        let from = input.current[i] as usize;
        let gain = input.value(i, t as usize) - input.value(i, from);
        let tu = t as usize;
        // A slot that a move of this plan vacates is not reused before the next plan: the
        // rate limit may defer the move that vacates it, and capacity must hold whatever
        // subset of groups is taken.
        if free[tu] > 0 {
            free[tu] -= 1;
            groups.push(MoveGroup {
                gain,
                order,
                moves: vec![(i, t)],
                bytes: input.tier_bytes[tu],
                std: var(i, from, tu).sqrt(),
            });
            continue;
        }
        // Displace the weakest incumbent that the target assignment moves down, if the
        // tier it goes to has room once the pair is done: the promoted expert vacates a
        // slot of its old tier, which the demoted one may take (the pair is taken whole).
        // Every tier's capacity counts, tier 0's too.
        let Some(&(d, dt)) = demotions[tu].last() else {
            continue;
        };
        let mut dtu = dt as usize;
        if sequential {
            if free[dtu] <= 0 {
                if free[0] <= 0 {
                    continue;
                }
                dtu = 0;
            }
        } else if dtu != from && free[dtu] <= 0 {
            continue;
        }
        demotions[tu].pop();
        if sequential || dtu != from {
            free[dtu] -= 1;
        }
        let loss = input.value(d, tu) - input.value(d, dtu);
        // Sequential: only the demotion now (its slot frees at the next plan, which then
        // promotes into it); the group is still worth, and paid for, as the pair.
        let moves = if sequential {
            vec![(d, dtu as u8)]
        } else {
            vec![(d, dtu as u8), (i, t)]
        };
        groups.push(MoveGroup {
            gain: gain - loss,
            order,
            moves,
            bytes: input.tier_bytes[tu] + input.tier_bytes[dtu],
            std: (var(i, from, tu) + var(d, dtu, tu)).sqrt(),
        });
    }
    groups
}

/// Multiple-choice knapsack: every item picks exactly one tier; tier t of every item costs
/// `bytes[t]` and item i at tier t is worth `values[i * T + t]`. Maximise the total value
/// within `budget`. Greedy over the upper convex hull of each item's options (the LP
/// relaxation's order), skipping increments that no longer fit.
///
/// Returns `None` when even every item at its cheapest tier does not fit.
pub fn knapsack_greedy(values: &[f32], bytes: &[u64], budget: u64) -> Option<Vec<u8>> {
    assert!(
        bytes.len() <= MAX_TIERS,
        "at most {MAX_TIERS} tiers (tiers are u8)"
    );
    let tiers = bytes.len();
    assert!(
        tiers > 0 && values.len() % tiers == 0,
        "values must be items x tiers"
    );
    let items = values.len() / tiers;
    let cheapest = (0..tiers).min_by_key(|&t| (bytes[t], t))?;
    let base = bytes[cheapest].checked_mul(items as u64)?;
    if base > budget {
        return None;
    }
    let mut left = budget - base;
    let mut choice = vec![cheapest as u8; items];
    // Every item's hull of (bytes, value) points, as increments from its cheapest option.
    struct Step {
        item: usize,
        rank: usize,
        to: u8,
        dbytes: u64,
        dvalue: f32,
    }
    let mut steps: Vec<Step> = Vec::new();
    let mut order: Vec<usize> = (0..tiers).collect();
    order.sort_by_key(|&t| (bytes[t], t));
    for item in 0..items {
        let v = |t: usize| values[item * tiers + t];
        let mut hull: Vec<usize> = vec![cheapest];
        for &t in &order {
            if t == cheapest || v(t) <= v(*hull.last().unwrap()) {
                continue; // dominated: costs at least as much, worth no more
            }
            // Keep the hull concave: drop points whose efficiency is not decreasing.
            while hull.len() >= 2 {
                let (a, b) = (hull[hull.len() - 2], hull[hull.len() - 1]);
                let e_ab = (v(b) - v(a)) as f64 / (bytes[b] - bytes[a]).max(1) as f64;
                let e_bt = (v(t) - v(b)) as f64 / (bytes[t] - bytes[b]).max(1) as f64;
                if e_bt >= e_ab {
                    hull.pop();
                } else {
                    break;
                }
            }
            hull.push(t);
        }
        for (rank, w) in hull.windows(2).enumerate() {
            steps.push(Step {
                item,
                rank,
                to: w[1] as u8,
                dbytes: bytes[w[1]] - bytes[w[0]],
                dvalue: v(w[1]) - v(w[0]),
            });
        }
    }
    steps.sort_by(|a, b| {
        let ea = a.dvalue as f64 / a.dbytes.max(1) as f64;
        let eb = b.dvalue as f64 / b.dbytes.max(1) as f64;
        eb.partial_cmp(&ea)
            .unwrap_or(Ordering::Equal)
            .then(a.item.cmp(&b.item))
            .then(a.rank.cmp(&b.rank))
    });
    let mut next_rank = vec![0usize; items];
    for s in steps {
        // An item's increments apply in hull order; once one is skipped the rest are too.
        if next_rank[s.item] != s.rank || s.dbytes > left {
            next_rank[s.item] = usize::MAX;
            continue;
        }
        left -= s.dbytes;
        choice[s.item] = s.to;
        next_rank[s.item] += 1;
    }
    Some(choice)
}

/// Exact multiple-choice knapsack by dynamic programming over the budget in units of the
/// greatest common divisor of the tier sizes. Meant for small instances (tests and
/// checking the greedy); cost is `items * tiers * budget / gcd`.
///
/// Refuses (`TooLarge`) instances whose table would exceed [`KNAPSACK_EXACT_CELLS`] cells
/// rather than trying to allocate it.
pub fn knapsack_exact(
    values: &[f32],
    bytes: &[u64],
    budget: u64,
) -> Result<Option<(Vec<u8>, f64)>, ControllerError> {
    let tiers = bytes.len();
    if tiers == 0 || tiers > MAX_TIERS || values.len() % tiers != 0 {
        return invalid(format!(
            "values must be items x tiers with 1 to {MAX_TIERS} tiers"
        ));
    }
    let items = values.len() / tiers;
    let unit = bytes.iter().fold(0u64, |g, &b| gcd(g, b)).max(1);
    let cap = budget / unit;
    let cells = (cap + 1).checked_mul(items as u64 + 1);
    if !matches!(cells, Some(c) if c <= KNAPSACK_EXACT_CELLS) {
        return Err(ControllerError::TooLarge(format!(
            "the exact knapsack needs ({cap} + 1) x {items} table cells (budget / gcd of the \
             tier sizes x items), more than {KNAPSACK_EXACT_CELLS}; use the greedy one"
        )));
    }
    let cap = cap as usize;
    let w: Vec<usize> = bytes.iter().map(|&b| (b / unit) as usize).collect();
    const NONE: f64 = f64::NEG_INFINITY;
    // best[c] = best value using exactly the items so far with total weight <= c.
    let mut best = vec![0f64; cap + 1];
    let mut pick = vec![0u8; items * (cap + 1)];
    for item in 0..items {
        let mut next = vec![NONE; cap + 1];
        for c in 0..=cap {
            for t in 0..tiers {
                if w[t] <= c && best[c - w[t]] != NONE {
                    let v = best[c - w[t]] + values[item * tiers + t] as f64;
                    if v > next[c] {
                        next[c] = v;
                        pick[item * (cap + 1) + c] = t as u8;
                    }
                }
            }
        }
        best = next;
    }
    if best[cap] == NONE {
        return Ok(None);
    }
    let mut choice = vec![0u8; items];
    let mut c = cap;
    for item in (0..items).rev() {
        let t = pick[item * (cap + 1) + c];
        choice[item] = t;
        c -= w[t as usize];
    }
    Ok(Some((choice, best[cap])))
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Total value and bytes of an assignment (for reports and tests).
pub fn assignment_value(values: &[f32], bytes: &[u64], choice: &[u8]) -> (f64, u64) {
    let tiers = bytes.len();
    choice.iter().enumerate().fold((0.0, 0), |(v, b), (i, &t)| {
        (
            v + values[i * tiers + t as usize] as f64,
            b + bytes[t as usize],
        )
    })
}
