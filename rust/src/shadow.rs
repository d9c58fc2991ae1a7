//! The operation language and shadow model shared by the fuzz target
//! (`fuzz/fuzz_targets/pool_ops.rs`), the saved-corpus replay (`rust/tests/fuzz_corpus.rs`)
//! and the proptest (`rust/tests/props.rs`). Always compiled (no feature) so the stable
//! `cargo test` replays the corpus with no extra flags.
//!
//! [`run`] reads a configuration from the first bytes, then one operation per byte group,
//! executes it on a real [`ExpertPool`] + [`ExpertTable`] and on a plain model (sets and
//! vectors), and panics as soon as the two disagree or an invariant breaks:
//! no two live blocks overlap, every block lies in its class region, free + live =
//! capacity, reserved bytes <= budget, the lowest free index is handed out, every entry
//! has exactly one published version equal to the model's, no leased or still-used block
//! is reclaimed. It returns the trace of handed-out offsets (replaying the same bytes must
//! give the same trace).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use crate::errors::Error;
use crate::pool::{Block, ClassId, ClassSpec, ExpertPool, PoolConfig};
use crate::table::{
    EntryState, ExpertTable, LayerTiers, Lease, ManualFence, PendingTransition, Ticket, UseFence,
};

struct Bytes<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Bytes<'_> {
    fn byte(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    fn more(&self) -> bool {
        self.pos < self.data.len()
    }
}

fn same_kind(a: &Error, b: &Error) -> bool {
    std::mem::discriminant(a) == std::mem::discriminant(b)
}

struct ClassModel {
    slot_bytes: u64,
    region: (u64, u64),
    free: BTreeSet<u32>,
    /// Host memory: reserves no budget, and its region lies in the arena's tail.
    host: bool,
}

struct EntryModel {
    tier: u8,
    version: u32,
    block: Block,
    transition: Option<(Ticket, u8, Block)>,
}

struct Model {
    classes: Vec<ClassModel>,
    budget: u64,
    reserved: u64,
    /// Live blocks the user owns, with "pending" flag.
    user: Vec<(Block, bool)>,
    stale: Vec<Block>,
    entries: Vec<EntryModel>,
    /// Writable views alive per user block.
    views: HashMap<(ClassId, u32), u32>,
    /// Retired blocks waiting for reclamation.
    retired: Vec<Block>,
    readers: HashMap<(ClassId, u32), u32>,
    /// Per slot: sequence number of the last recorded use.
    last_use: HashMap<(ClassId, u32), u64>,
    next_use: u64,
    done_use: u64,
}

impl Model {
    fn expect_alloc(&self, c: ClassId) -> Result<u32, Error> {
        let cm = &self.classes[c.0 as usize];
        match cm.free.first() {
            None => Err(Error::Exhausted {
                class: String::new(),
                capacity: 0,
            }),
            Some(_) if !cm.host && self.reserved + cm.slot_bytes > self.budget => {
                Err(Error::BudgetExceeded {
                    class: String::new(),
                    need: 0,
                    reserved: 0,
                    budget: 0,
                })
            }
            Some(&i) => Ok(i),
        }
    }
    fn took(&mut self, b: &Block) {
        let c = &mut self.classes[b.class.0 as usize];
        assert!(c.free.remove(&b.index));
        if !c.host {
            self.reserved += b.nbytes;
        }
    }
    fn gave(&mut self, b: &Block) {
        let c = &mut self.classes[b.class.0 as usize];
        assert!(c.free.insert(b.index));
        if !c.host {
            self.reserved -= b.nbytes;
        }
    }
    fn idle(&self, b: &Block) -> bool {
        let key = (b.class, b.index);
        self.readers.get(&key).copied().unwrap_or(0) == 0
            && self.last_use.get(&key).copied().unwrap_or(0) <= self.done_use
    }
    /// Reclaim every idle retired block; returns them sorted.
    fn reclaim(&mut self) -> Vec<(ClassId, u32)> {
        let (idle, busy): (Vec<Block>, Vec<Block>) =
            self.retired.iter().partition(|b| self.idle(b));
        self.retired = busy;
        for b in &idle {
            self.gave(b);
        }
        let mut v: Vec<_> = idle.iter().map(|b| (b.class, b.index)).collect();
        v.sort();
        v
    }
}

/// Interpret `data`; panics on any disagreement. Returns the offset trace.
pub fn run(data: &[u8]) -> Vec<u64> {
    let mut bytes = Bytes { data, pos: 0 };
    let nclasses = 1 + bytes.byte() % 3;
    let alignment = 1u64 << (bytes.byte() % 9);
    let specs: Vec<ClassSpec> = (0..nclasses)
        .map(|i| {
            let size = 1 + bytes.byte() as u64 * 13;
            let draw = bytes.byte();
            let slots = 1 + (draw % 12) as u32;
            let spec = ClassSpec::new(format!("c{i}"), size, slots);
            // The third class is host memory (a staging class) on odd draws.
            if i == 2 && draw % 2 == 1 {
                spec.in_host_memory()
            } else {
                spec
            }
        })
        .collect();
    let budget_byte = bytes.byte();
    let full = ExpertPool::new_virtual(&PoolConfig::new(specs.clone()).alignment(alignment))
        .expect("valid config")
        .total_bytes();
    let budget = if budget_byte < 128 {
        full
    } else {
        (full * (budget_byte as u64 - 127) / 128).max(1)
    };
    let config = PoolConfig::new(specs)
        .alignment(alignment)
        .budget(Some(budget));
    let pool = ExpertPool::new(&config).expect("valid config");
    let mut other = ExpertPool::new(&config).expect("valid config");
    let slots = pool.num_slots();
    let mut model = Model {
        classes: (0..nclasses)
            .map(|c| {
                let id = ClassId(c as u16);
                ClassModel {
                    slot_bytes: pool.slot_bytes(id).unwrap(),
                    region: pool.region(id).unwrap(),
                    free: (0..pool.capacity(id).unwrap()).collect(),
                    host: pool.stats().classes[c as usize].host_memory,
                }
            })
            .collect(),
        budget,
        reserved: 0,
        user: Vec::new(),
        stale: Vec::new(),
        entries: Vec::new(),
        views: HashMap::new(),
        retired: Vec::new(),
        readers: HashMap::new(),
        last_use: HashMap::new(),
        next_use: 0,
        done_use: 0,
    };
    let total_bytes = pool.total_bytes();
    let pool = Arc::new(Mutex::new(pool));

    // The table: 1-2 layers of 1-4 experts, tier 0 = [c0], tier 1 = [c1 or c0, c2?].
    let layers_n = 1 + bytes.byte() % 2;
    let experts: Vec<u32> = (0..layers_n)
        .map(|_| 1 + (bytes.byte() % 4) as u32)
        .collect();
    let tier1: Vec<ClassId> = match nclasses {
        1 => vec![ClassId(0)],
        2 => vec![ClassId(1)],
        _ => vec![ClassId(1), ClassId(2)],
    };
    let tiers = vec![vec![ClassId(0)], tier1];
    let fence = Arc::new(ManualFence::new(slots));
    let layer_tiers: Vec<LayerTiers> = experts
        .iter()
        .map(|&n| LayerTiers {
            experts: n,
            tiers: tiers.clone(),
        })
        .collect();
    let total_experts: u32 = experts.iter().sum();
    let c0 = &model.classes[0];
    let fits =
        total_experts as usize <= c0.free.len() && total_experts as u64 * c0.slot_bytes <= budget;
    let table = ExpertTable::new(
        pool.clone(),
        layer_tiers,
        None,
        fence.clone() as Arc<dyn UseFence>,
    );
    let table = match table {
        Ok(t) => {
            assert!(fits, "table built although the model says it cannot fit");
            Some(t)
        }
        Err(e) => {
            assert!(!fits, "table failed although it fits: {e}");
            assert!(matches!(
                e,
                Error::Exhausted { .. } | Error::BudgetExceeded { .. }
            ));
            assert_eq!(
                pool.lock().unwrap().reserved_bytes(),
                0,
                "a failed table leaked"
            );
            None
        }
    };
    if let Some(t) = &table {
        for l in 0..layers_n as u32 {
            for e in 0..experts[l as usize] {
                let v = t.published(l, e).unwrap();
                model.took(&v.block);
                model.entries.push(EntryModel {
                    tier: 0,
                    version: 1,
                    block: v.block,
                    transition: None,
                });
            }
        }
    }
    let entry_of = |sel: u8| -> (u32, u32, usize) {
        let mut i = sel as usize % total_experts as usize;
        let idx = i;
        for (l, &n) in experts.iter().enumerate() {
            if i < n as usize {
                return (l as u32, i as u32, idx);
            }
            i -= n as usize;
        }
        unreachable!()
    };

    let mut trace = Vec::new();
    // The capabilities of the transitions this caller began (only they can settle them).
    let mut pending: Vec<PendingTransition> = Vec::new();
    // Leases borrow the table: declared after it, dropped before it.
    let mut leases: Vec<(Lease<'_>, usize, u32)> = Vec::new();
    let mut steps = 0;
    while bytes.more() && steps < 2000 {
        steps += 1;
        let op = bytes.byte() % 16;
        let arg = bytes.byte();
        match op {
            0 | 1 => {
                let c = ClassId((arg % nclasses) as u16);
                let expect = model.expect_alloc(c);
                let got = {
                    let mut p = pool.lock().unwrap();
                    if op == 0 {
                        p.alloc(c)
                    } else {
                        p.try_reserve(c)
                    }
                };
                match (expect, got) {
                    (Ok(i), Ok(b)) => {
                        assert_eq!(b.index, i, "not the lowest free index");
                        model.took(&b);
                        model.user.push((b, op == 1));
                        trace.push(b.offset);
                    }
                    (Err(e), Err(g)) => assert!(same_kind(&e, &g), "{e:?} vs {g:?}"),
                    (e, g) => panic!("alloc: model {e:?}, pool {g:?}"),
                }
            }
            2 => {
                if model.user.is_empty() {
                    continue;
                }
                let k = arg as usize % model.user.len();
                let (b, pending) = model.user[k];
                let r = pool.lock().unwrap().commit(&b);
                if pending {
                    r.expect("commit of a pending block");
                    model.user[k].1 = false;
                } else {
                    assert!(matches!(r, Err(Error::NotPending { .. })), "{r:?}");
                }
            }
            3 => {
                if model.user.is_empty() {
                    continue;
                }
                let k = arg as usize % model.user.len();
                let b = model.user[k].0;
                let r = pool.lock().unwrap().free(b);
                if model.views.get(&(b.class, b.index)).copied().unwrap_or(0) > 0 {
                    // A view outlives nothing: the block stays until the view is gone.
                    assert!(matches!(r, Err(Error::BlockLeased { .. })), "{r:?}");
                    continue;
                }
                r.expect("free of a live user block");
                model.user.swap_remove(k);
                model.gave(&b);
                model.stale.push(b);
            }
            4 => {
                if model.stale.is_empty() {
                    continue;
                }
                let b = model.stale[arg as usize % model.stale.len()];
                let r = pool.lock().unwrap().free(b);
                assert!(matches!(r, Err(Error::DoubleFree { .. })), "{r:?}");
            }
            5 => {
                let c = ClassId((arg % nclasses) as u16);
                if let Ok(b) = other.alloc(c) {
                    let r = pool.lock().unwrap().free(b);
                    assert!(matches!(r, Err(Error::ForeignBlock(_))), "{r:?}");
                    other.free(b).unwrap();
                }
            }
            6 => {
                let Some(t) = &table else { continue };
                let (l, e, idx) = entry_of(arg);
                let to = bytes.byte() % 3; // 2 is out of range
                let r = t.begin(l, e, to);
                let m = &model.entries[idx];
                if to >= 2 {
                    assert!(matches!(r, Err(Error::OutOfRange(_))), "{r:?}");
                } else if m.transition.is_some() || m.tier == to {
                    assert!(matches!(r, Err(Error::IllegalTransition { .. })), "{r:?}");
                } else {
                    let mut expect = Err(Error::UnknownTicket(0));
                    for &c in &tiers[to as usize] {
                        expect = model.expect_alloc(c).map(|i| (c, i));
                        if expect.is_ok() {
                            break;
                        }
                    }
                    match (expect, r) {
                        (Ok((c, i)), Ok(p)) => {
                            let tr = p.info();
                            assert_eq!((tr.block.class, tr.block.index), (c, i));
                            assert_eq!((tr.from, tr.to), (m.tier, to));
                            model.took(&tr.block);
                            model.entries[idx].transition = Some((tr.ticket, to, tr.block));
                            pending.push(p);
                            trace.push(tr.block.offset);
                        }
                        (Err(x), Err(g)) => assert!(same_kind(&x, &g), "{x:?} vs {g:?}"),
                        (x, g) => panic!("begin: model {x:?}, table {g:?}"),
                    }
                }
            }
            7 | 8 => {
                let Some(t) = &table else { continue };
                if pending.is_empty() {
                    continue;
                }
                let p = pending.swap_remove(arg as usize % pending.len());
                let ticket = p.ticket();
                let idx = model
                    .entries
                    .iter()
                    .position(|m| m.transition.map(|x| x.0) == Some(ticket))
                    .expect("ticket belongs to an entry");
                let (_, to, block) = model.entries[idx].transition.take().unwrap();
                if op == 7 {
                    let v = t.complete(p).expect("complete by the capability's owner");
                    let m = &mut model.entries[idx];
                    let old = m.block;
                    m.tier = to;
                    m.version += 1;
                    m.block = block;
                    assert_eq!((v.tier, v.version, v.block), (m.tier, m.version, m.block));
                    model.retired.push(old);
                    model.reclaim();
                } else {
                    t.abort(p).expect("abort by the capability's owner");
                    model.gave(&block);
                }
            }
            9 => {
                // Views: a caller-owned block may be viewed (and is then not freed until
                // the view is gone); a table-owned block never hands out a writable view.
                if arg & 1 == 1 {
                    if let Some(m) = model
                        .entries
                        .get(arg as usize / 2 % total_experts.max(1) as usize)
                    {
                        let r = pool.lock().unwrap().pin_view(&m.block);
                        assert!(matches!(r, Err(Error::OwnedByTable { .. })), "{r:?}");
                    }
                    continue;
                }
                if model.user.is_empty() {
                    continue;
                }
                let (b, _) = model.user[arg as usize / 2 % model.user.len()];
                pool.lock()
                    .unwrap()
                    .pin_view(&b)
                    .expect("view of a live user block");
                *model.views.entry((b.class, b.index)).or_default() += 1;
            }
            10 => {
                let Some(t) = &table else { continue };
                let (l, e, idx) = entry_of(arg);
                let lease = t.lease(l, e).unwrap();
                let v = lease.version();
                let m = &model.entries[idx];
                assert_eq!((v.tier, v.version, v.block), (m.tier, m.version, m.block));
                *model
                    .readers
                    .entry((v.block.class, v.block.index))
                    .or_default() += 1;
                leases.push((lease, idx, v.version));
            }
            11 => {
                if leases.is_empty() {
                    continue;
                }
                let (lease, _, _) = leases.swap_remove(arg as usize % leases.len());
                let b = lease.version().block;
                drop(lease);
                *model.readers.get_mut(&(b.class, b.index)).unwrap() -= 1;
            }
            12 => {
                if leases.is_empty() {
                    continue;
                }
                let (lease, _, _) = &leases[arg as usize % leases.len()];
                lease.record_use();
                let b = lease.version().block;
                model.next_use += 1;
                model.last_use.insert((b.class, b.index), model.next_use);
            }
            13 => {
                fence.signal();
                model.done_use = model.next_use;
            }
            14 => {
                let Some(t) = &table else { continue };
                let mut got: Vec<_> = t.reclaim().iter().map(|b| (b.class, b.index)).collect();
                got.sort();
                assert_eq!(got, model.reclaim(), "reclaimed set");
            }
            _ => {
                let viewed: Vec<Block> = model
                    .user
                    .iter()
                    .map(|u| u.0)
                    .filter(|b| model.views.get(&(b.class, b.index)).copied().unwrap_or(0) > 0)
                    .collect();
                if arg & 1 == 1 && !viewed.is_empty() {
                    let b = viewed[arg as usize / 2 % viewed.len()];
                    pool.lock().unwrap().unpin_view(&b);
                    *model.views.get_mut(&(b.class, b.index)).unwrap() -= 1;
                    continue;
                }
                if leases.is_empty() {
                    continue;
                }
                let (lease, _, _) = &leases[arg as usize % leases.len()];
                let r = pool.lock().unwrap().free(lease.version().block);
                assert!(matches!(r, Err(Error::OwnedByTable { .. })), "{r:?}");
            }
        }
        check(
            &pool.lock().unwrap(),
            &model,
            table.as_ref(),
            &leases,
            total_bytes,
        );
    }
    drop(leases);
    drop(pending);
    drop(table);
    // No block lost: after dropping the table only user blocks remain live, and the
    // table's blocks whose recorded uses were never signalled (still running, as far as
    // the fence knows: never freed under them).
    let in_use = model
        .entries
        .iter()
        .map(|m| m.block)
        .chain(model.retired.iter().copied())
        .filter(|b| {
            model
                .last_use
                .get(&(b.class, b.index))
                .copied()
                .unwrap_or(0)
                > model.done_use
        })
        .count();
    let p = pool.lock().unwrap();
    let live: u32 = p.stats().classes.iter().map(|c| c.live).sum();
    assert_eq!(
        live as usize,
        model.user.len() + in_use,
        "blocks lost or freed in use"
    );
    trace
}

fn check(
    pool: &ExpertPool,
    m: &Model,
    table: Option<&ExpertTable>,
    leases: &[(Lease<'_>, usize, u32)],
    total_bytes: u64,
) {
    let stats = pool.stats();
    assert!(stats.reserved_bytes <= stats.budget, "over budget");
    assert_eq!(stats.reserved_bytes, m.reserved, "reserved bytes");
    for (c, cs) in stats.classes.iter().enumerate() {
        let cm = &m.classes[c];
        assert_eq!(cs.free + cs.live, cs.capacity);
        assert_eq!(cs.free as usize, cm.free.len(), "free count of class {c}");
        assert!(cs.region_offset + cs.region_bytes <= total_bytes);
        // Device regions before the host tail, host ones inside it.
        if cm.host {
            assert!(
                cs.region_offset >= stats.host_from,
                "host class {c} before the tail"
            );
        } else {
            assert!(cs.region_offset + cs.region_bytes <= stats.host_from);
        }
    }
    let host_live: u64 = stats
        .classes
        .iter()
        .filter(|c| c.host_memory)
        .map(|c| c.live as u64 * c.slot_bytes)
        .sum();
    assert_eq!(stats.host_bytes, host_live, "host bytes");
    // Every live block: inside its region, no overlaps, and live in the pool.
    let mut live: Vec<Block> = m.user.iter().map(|u| u.0).collect();
    for e in &m.entries {
        live.push(e.block);
        if let Some((_, _, b)) = e.transition {
            live.push(b);
        }
    }
    live.extend(m.retired.iter().copied());
    let live_count: u32 = stats.classes.iter().map(|c| c.live).sum();
    assert_eq!(
        live.len(),
        live_count as usize,
        "live blocks: model vs pool"
    );
    for b in &live {
        assert!(
            pool.is_live(b),
            "model-live block is not live in the pool: {b:?}"
        );
        let (start, len) = m.classes[b.class.0 as usize].region;
        assert!(
            b.offset >= start && b.offset + b.nbytes <= start + len,
            "outside region"
        );
        assert_eq!(b.offset % pool.alignment(), 0);
    }
    live.sort_by_key(|b| b.offset);
    for w in live.windows(2) {
        assert!(w[0].offset + w[0].nbytes <= w[1].offset, "overlap {w:?}");
    }
    let Some(t) = table else { return };
    let mut idx = 0;
    for l in 0..t.num_layers() {
        for e in 0..t.experts(l).unwrap() {
            let me = &m.entries[idx];
            let v = t.published(l, e).unwrap();
            assert_eq!(
                (v.tier, v.version, v.block),
                (me.tier, me.version, me.block)
            );
            let st = t.state(l, e).unwrap();
            match (st, me.transition) {
                (EntryState::Resident { tier }, None) => assert_eq!(tier, me.tier),
                (EntryState::Transitioning { from, to, ticket }, Some((mt, mto, _))) => {
                    assert_eq!((from, to, ticket), (me.tier, mto, mt))
                }
                (s, x) => panic!("state {s:?} vs model {x:?}"),
            }
            idx += 1;
        }
    }
    let mut retired: Vec<_> = t.retired().iter().map(|b| (b.class, b.index)).collect();
    retired.sort();
    let mut mr: Vec<_> = m.retired.iter().map(|b| (b.class, b.index)).collect();
    mr.sort();
    assert_eq!(retired, mr, "retired blocks");
    for (lease, _, version) in leases {
        let v = lease.version();
        assert_eq!(v.version, *version);
        assert!(pool.is_live(&v.block), "a leased block was reclaimed");
        assert!(pool.readers(&v.block).unwrap() > 0);
    }
}

// ---------------------------------------------------------------------------------------
// Transfer engine operation language (fuzz target `transfer_ops`, proptest, corpus replay)

/// Interpret `data` as a transfer-engine scenario on the deterministic [`ManualBackend`]:
/// submit / finish (ok or fail) / cancel / poll / lease / release / reclaim. Checks after
/// every step that every expert has exactly one published version whose bytes equal the
/// host store's bytes for its tier, that completions move versions exactly as reported,
/// that the pool stays consistent, and at the end (after draining) that no block is lost.
pub fn run_transfer(data: &[u8]) -> crate::transfer::EngineStats {
    use crate::layout::{plan_layout, HotSlots, LayerShape, LayoutRequest};
    use crate::store::HostStore;
    use crate::table::{OwnedLease, SyncUses};
    use crate::transfer::cpu::ManualBackend;
    use crate::transfer::{
        CopyBackend, EngineConfig, Priority, TransferEngine, TransferId, TransferStatus,
    };

    let mut bytes = Bytes { data, pos: 0 };
    let layers = 1 + (bytes.byte() % 2) as usize;
    let experts: Vec<u32> = (0..layers).map(|_| 2 + (bytes.byte() % 4) as u32).collect();
    let lo = 1 + bytes.byte() as u64;
    let hi = lo + 1 + bytes.byte() as u64 * 3;
    let hot = 1 + (bytes.byte() % 2) as u32;
    let staging = 1 + (bytes.byte() % 3) as u32;
    let config = EngineConfig {
        max_in_flight: 1 + (bytes.byte() % 3) as usize,
        queue_capacity: 1 + (bytes.byte() % 6) as usize,
        history: 1 + (bytes.byte() % 8) as usize,
    };
    let layout = plan_layout(&LayoutRequest {
        budget: u64::MAX / 4,
        layers: experts
            .iter()
            .map(|&e| LayerShape {
                experts: e,
                lo_bytes: lo,
                hi_bytes: hi,
            })
            .collect(),
        hot: HotSlots::PerLayer(hot),
        staging,
        alignment: 64,
    })
    .expect("layout fits");
    let pool = ExpertPool::new(&layout.pool_config()).unwrap();
    let tiers = layout.layer_tiers(&pool).unwrap();
    let pool = Arc::new(Mutex::new(pool));
    let table = Arc::new(
        ExpertTable::new(
            pool.clone(),
            tiers,
            Some(layout.initial_tiers()),
            Arc::new(SyncUses) as Arc<dyn UseFence>,
        )
        .unwrap(),
    );
    let sizes: Vec<Vec<u64>> = experts.iter().map(|_| vec![lo, hi]).collect();
    let store = Arc::new(HostStore::new(&experts, &sizes, 64).unwrap());
    let mut seed = 0x9e37_79b9u32 ^ data.len() as u32;
    for (l, &n) in experts.iter().enumerate() {
        for e in 0..n {
            for (t, &len) in [lo, hi].iter().enumerate() {
                let v: Vec<u8> = (0..len)
                    .map(|_| {
                        seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                        (seed >> 24) as u8
                    })
                    .collect();
                store.write(l as u32, e, t as u8, &v).unwrap();
            }
        }
    }
    let backend = Arc::new(ManualBackend::new());
    let engine = TransferEngine::new(
        table.clone(),
        store.clone(),
        backend.clone() as Arc<dyn CopyBackend>,
        config,
    )
    .unwrap();
    let entries: Vec<(u32, u32)> = experts
        .iter()
        .enumerate()
        .flat_map(|(l, &n)| (0..n).map(move |e| (l as u32, e)))
        .collect();
    let mut model: Vec<(u8, u32)> = entries
        .iter()
        .map(|&(l, e)| {
            let v = table.published(l, e).unwrap();
            (v.tier, v.version)
        })
        .collect();
    let mut ids: Vec<TransferId> = Vec::new();
    let mut leases: Vec<(OwnedLease, u32, u32)> = Vec::new();

    let check_contents = |lease: &OwnedLease, l: u32, e: u32| {
        let v = lease.version();
        let want = store.bytes(l, e, v.tier).unwrap();
        let got = lease.bytes().unwrap();
        assert_eq!(
            &got[..want.len()],
            want,
            "published bytes differ from the store"
        );
    };
    let apply = |model: &mut Vec<(u8, u32)>, done: Vec<crate::transfer::Completion>| {
        for c in done {
            let i = entries
                .iter()
                .position(|&x| x == (c.layer, c.expert))
                .unwrap();
            if let TransferStatus::Completed { version } = c.status {
                // Exactly the next version, unless completions fell out of the history
                // (then the model was resynchronised to a version at most this one).
                assert!(version > model[i].1, "a completion went backwards");
                assert!(
                    version == model[i].1 + 1 || engine.stats().completions_dropped > 0,
                    "a completion skipped a version"
                );
                model[i] = (c.to, version);
            }
        }
    };

    let mut seen_dropped = 0;
    let mut steps = 0;
    while bytes.more() && steps < 1000 {
        steps += 1;
        let op = bytes.byte() % 11;
        let arg = bytes.byte();
        match op {
            8 => {
                // A second engine on the same table: refused (two engines could land two
                // copies in one slot), and the table is left as it was.
                let r = TransferEngine::new(
                    table.clone(),
                    store.clone(),
                    Arc::new(ManualBackend::new()) as Arc<dyn CopyBackend>,
                    config,
                );
                assert!(matches!(r, Err(Error::Sealed(_))), "{:?}", r.err());
            }
            9 => {
                // Writing a published block by hand once the engine uploaded: refused.
                let (l, e) = entries[arg as usize % entries.len()];
                let r = table.load_initial(l, e, &[arg; 4]);
                assert!(matches!(r, Err(Error::Sealed(_))), "{r:?}");
            }
            10 if arg < 16 => {
                // Drop the engine mid-flight (rarely: it ends the scenario): every transfer
                // still queued or copying is rolled back, nothing stays reserved, and
                // published bytes are untouched.
                apply(&mut model, engine.poll());
                if engine.stats().completions_dropped > seen_dropped {
                    for (i, &(l, e)) in entries.iter().enumerate() {
                        let v = table.published(l, e).unwrap();
                        model[i] = (v.tier, v.version);
                    }
                }
                let stats = engine.stats();
                drop(engine);
                drop(leases);
                table.reclaim();
                let st = table.stats();
                assert_eq!(st.in_flight, 0, "a transition outlived its engine");
                let live: u32 = pool
                    .lock()
                    .unwrap()
                    .stats()
                    .classes
                    .iter()
                    .map(|c| c.live)
                    .sum();
                assert_eq!(
                    live as usize,
                    entries.len(),
                    "blocks lost or leaked by the drop"
                );
                for (i, &(l, e)) in entries.iter().enumerate() {
                    let lease = table.lease_owned(l, e).unwrap();
                    assert_eq!((lease.version().tier, lease.version().version), model[i]);
                    check_contents(&lease, l, e);
                }
                return stats;
            }
            10 => {}
            0 | 1 => {
                let (l, e) = entries[arg as usize % entries.len()];
                let to = bytes.byte() % 2;
                let prio = if op == 0 {
                    Priority::Urgent
                } else {
                    Priority::Planned
                };
                let before = engine.stats();
                match engine.submit(l, e, to, prio, None) {
                    Ok(id) => ids.push(id),
                    Err(Error::QueueFull { .. }) => {
                        assert!(before.queue_depth >= config.queue_capacity)
                    }
                    Err(Error::IllegalTransition { .. }) => {}
                    Err(x) => panic!("submit: {x}"),
                }
            }
            2 | 3 => {
                let pending = backend.pending();
                if !pending.is_empty() {
                    assert!(backend.finish(pending[arg as usize % pending.len()], op == 2));
                }
            }
            4 => {
                if !ids.is_empty() {
                    let id = ids[arg as usize % ids.len()];
                    // Finished ids beyond the history bound are forgotten.
                    if let Ok(before) = engine.status(id) {
                        let r = engine.cancel(id).unwrap();
                        assert_eq!(r, !before.is_final(), "cancel of {before:?}");
                    } else {
                        assert!(matches!(engine.cancel(id), Err(Error::UnknownTransfer(_))));
                    }
                }
            }
            5 => {
                let (l, e) = entries[arg as usize % entries.len()];
                let lease = table.lease_owned(l, e).unwrap();
                check_contents(&lease, l, e);
                leases.push((lease, l, e));
            }
            6 => {
                if !leases.is_empty() {
                    leases.swap_remove(arg as usize % leases.len());
                }
            }
            _ => {
                apply(&mut model, engine.poll());
                let dropped = engine.stats().completions_dropped;
                if dropped > seen_dropped {
                    // Completions nobody polled fell out of the bounded history: the
                    // versions only moved forward; take them from the table.
                    seen_dropped = dropped;
                    for (i, &(l, e)) in entries.iter().enumerate() {
                        let v = table.published(l, e).unwrap();
                        assert!(v.version >= model[i].1, "a version went backwards");
                        model[i] = (v.tier, v.version);
                    }
                }
                for (i, &(l, e)) in entries.iter().enumerate() {
                    let v = table.published(l, e).unwrap();
                    assert_eq!((v.tier, v.version), model[i], "published vs completions");
                }
            }
        }
        // Every expert: one published version with the store's bytes.
        for &(l, e) in &entries {
            let lease = table.lease_owned(l, e).unwrap();
            check_contents(&lease, l, e);
        }
        // Old leases keep their version's bytes until released, even after newer
        // versions were published (the block is neither reclaimed nor reused).
        for (lease, l, e) in &leases {
            assert!(pool.lock().unwrap().is_live(&lease.version().block));
            check_contents(lease, *l, *e);
        }
        let s = pool.lock().unwrap().stats();
        for c in &s.classes {
            assert_eq!(c.free + c.live, c.capacity);
        }
        assert!(s.reserved_bytes <= s.budget);
        let es = engine.stats();
        assert!(es.in_flight <= config.max_in_flight && es.queue_depth <= config.queue_capacity);
    }
    // Drain: finish everything, release leases, reclaim; no block lost.
    loop {
        let pending = backend.pending();
        if pending.is_empty() && engine.drain(Some(std::time::Duration::ZERO)) {
            break;
        }
        for id in pending {
            backend.finish(id, true);
        }
    }
    apply(&mut model, engine.poll());
    if engine.stats().completions_dropped > seen_dropped {
        for (i, &(l, e)) in entries.iter().enumerate() {
            let v = table.published(l, e).unwrap();
            assert!(v.version >= model[i].1, "a version went backwards");
            model[i] = (v.tier, v.version);
        }
    }
    drop(leases);
    table.reclaim();
    let p = pool.lock().unwrap();
    let live: u32 = p.stats().classes.iter().map(|c| c.live).sum();
    assert_eq!(
        live as usize,
        entries.len(),
        "blocks lost or leaked after draining"
    );
    for (i, &(l, e)) in entries.iter().enumerate() {
        let v = table.published(l, e).unwrap();
        assert_eq!((v.tier, v.version), model[i]);
    }
    drop(p);
    engine.stats()
}
