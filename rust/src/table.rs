//! The per-expert precision state machine with stable handles.
//!
//! Every (layer, expert) entry always has exactly one *published* version: a tier, a
//! block of the pool, and a version number. A transition moves an entry through
//!
//! ```text
//! Resident(from) --begin--> Transitioning(from, to, ticket) --complete--> Resident(to)
//!                                     \--abort (failed / cancelled)--> Resident(from)
//! ```
//!
//! `begin` reserves a pending block of the target tier; nothing a reader can see changes
//! until `complete` publishes the new version (one atomic store). The old block is then
//! *retired* and reclaimed only when (a) no lease on it remains and (b) the [`UseFence`]
//! says every recorded use of it has completed (a GPU backend records a stream event per
//! use; the CPU implementation is synchronous, or manually signalled in tests).
//!
//! ## The lease protocol (lock-free read path)
//! Each entry's published version is one `AtomicU64` word `version:32 | tier:8 | slot:24`;
//! each pool slot has a reader counter. A reader loads the word, increments the counter of
//! its slot, issues a `SeqCst` fence, then re-loads the word: if it changed, the reader
//! backs off and retries. A writer stores the new word (release), issues a `SeqCst` fence,
//! and later reclaims the old slot only if its counter reads zero (acquire, after another
//! fence). The two fences order the store-load pairs on both sides (Dekker), so either the
//! reader's re-load sees the new word (and it never uses the old block) or the writer's
//! counter load sees the reader (and it defers reclamation). Fences rather than `SeqCst`
//! accesses, because the C11 guarantee lives in the fences and loom models fences
//! exactly (it weakens `SeqCst` accesses to acquire/release). Version numbers only grow, so a reused slot cannot be mistaken for
//! the version a reader looked up (no ABA). The loom model in `rust/tests/loom_table.rs`
//! checks exactly this.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::Ordering;

use crate::errors::{Error, Result};
use crate::pool::{Block, ClassId, ExpertPool, SlotBoard};
use crate::sync::{fence, lock, Arc, AtomicU64, Mutex};

/// Identifies one in-flight transition.
pub type Ticket = u64;

const SLOT_MASK: u64 = (1 << 24) - 1;

fn pack(version: u32, tier: u8, slot: u32) -> u64 {
    ((version as u64) << 32) | ((tier as u64) << 24) | (slot as u64 & SLOT_MASK)
}
fn slot_of(word: u64) -> u32 {
    (word & SLOT_MASK) as u32
}
fn tier_of(word: u64) -> u8 {
    (word >> 24) as u8
}
fn version_of(word: u64) -> u32 {
    (word >> 32) as u32
}

// ---------------------------------------------------------------------------------------
// Last-use hook

/// Decides when the last use of a block has completed. Reclamation needs this *and* a
/// zero lease count: a lease covers "handle read, kernel not launched yet", the fence
/// covers "kernel launched, still running".
pub trait UseFence: Send + Sync {
    /// Work reading `slot` was issued and may still be running (called before the lease
    /// that covered the launch is released).
    fn record_use(&self, slot: u32);
    /// Every use recorded for `slot` has completed.
    fn uses_completed(&self, slot: u32) -> bool;
}

/// CPU compute is synchronous: a use is over when its lease is released.
#[derive(Debug, Default, Clone, Copy)]
pub struct SyncUses;

impl UseFence for SyncUses {
    fn record_use(&self, _slot: u32) {}
    fn uses_completed(&self, _slot: u32) -> bool {
        true
    }
}

/// A fence completed explicitly, like a stream executing in order: every recorded use
/// gets the next sequence number; `signal` marks all uses issued so far as completed.
pub struct ManualFence {
    next: AtomicU64,
    done: AtomicU64,
    last: Box<[AtomicU64]>,
}

impl ManualFence {
    pub fn new(slots: u32) -> Self {
        Self {
            next: AtomicU64::new(0),
            done: AtomicU64::new(0),
            last: (0..slots).map(|_| AtomicU64::new(0)).collect(),
        }
    }
    /// Complete every use recorded so far.
    pub fn signal(&self) {
        self.done
            .store(self.next.load(Ordering::SeqCst), Ordering::SeqCst);
    }
    /// Uses recorded but not yet signalled.
    pub fn outstanding(&self) -> u64 {
        self.next.load(Ordering::SeqCst) - self.done.load(Ordering::SeqCst)
    }
}

impl UseFence for ManualFence {
    fn record_use(&self, slot: u32) {
        let seq = self.next.fetch_add(1, Ordering::SeqCst) + 1;
        self.last[slot as usize].fetch_max(seq, Ordering::SeqCst);
    }
    fn uses_completed(&self, slot: u32) -> bool {
        self.last[slot as usize].load(Ordering::SeqCst) <= self.done.load(Ordering::SeqCst)
    }
}

// ---------------------------------------------------------------------------------------
// Configuration and state

/// The slot classes an entry of one layer may use for each tier, in preference order
/// (e.g. the tier's own class, then a shared staging class).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerTiers {
    pub experts: u32,
    /// `tiers[t]` = classes for tier `t`; tier 0 is the lowest precision.
    pub tiers: Vec<Vec<ClassId>>,
}

/// An immutable published version of one expert.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Version {
    pub tier: u8,
    pub version: u32,
    pub block: Block,
}

/// Where an entry is in the state machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryState {
    Resident { tier: u8 },
    Transitioning { from: u8, to: u8, ticket: Ticket },
}

/// A transition that has been admitted: the caller copies the target tier's bytes into
/// `block`, then calls `complete(ticket)` (or `abort(ticket)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    pub ticket: Ticket,
    pub layer: u32,
    pub expert: u32,
    pub from: u8,
    pub to: u8,
    pub block: Block,
}

/// Counters of the state machine.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableStats {
    pub entries: u32,
    pub begun: u64,
    pub completed: u64,
    pub aborted: u64,
    pub reclaimed: u64,
    pub in_flight: u32,
    /// Old versions waiting for leases to drain or uses to complete.
    pub retired_waiting: u32,
    /// Published entries per tier.
    pub per_tier: Vec<u32>,
}

struct Entry {
    current: Version,
    transition: Option<Ticket>,
}

struct Writer {
    entries: Vec<Entry>,
    tickets: HashMap<Ticket, Transition>,
    next_ticket: Ticket,
    retired: Vec<(u32, Block)>,
    stats: TableStats,
}

/// One entry per (layer, expert) over a shared pool.
pub struct ExpertTable {
    pool: Arc<Mutex<ExpertPool>>,
    board: Arc<SlotBoard>,
    arena: std::sync::Arc<dyn crate::pool::Arena>,
    published: Box<[AtomicU64]>,
    layer_base: Vec<u32>,
    tiers: Vec<Vec<Vec<ClassId>>>,
    fence: std::sync::Arc<dyn UseFence>,
    writer: Mutex<Writer>,
}

impl fmt::Debug for ExpertTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExpertTable")
            .field("layers", &self.num_layers())
            .field("entries", &self.published.len())
            .finish()
    }
}

impl ExpertTable {
    /// Build the table and publish version 1 of every expert at `initial[layer][expert]`
    /// (tier 0 when `None`), allocating its block from the pool.
    pub fn new(
        pool: Arc<Mutex<ExpertPool>>,
        layers: Vec<LayerTiers>,
        initial: Option<Vec<Vec<u8>>>,
        fence: std::sync::Arc<dyn UseFence>,
    ) -> Result<Self> {
        if layers.is_empty() {
            return Err(Error::InvalidConfig(
                "the table needs at least one layer".into(),
            ));
        }
        if let Some(init) = &initial {
            if init.len() != layers.len() {
                return Err(Error::InvalidConfig(format!(
                    "initial tiers given for {} layers, the table has {}",
                    init.len(),
                    layers.len()
                )));
            }
        }
        let mut p = lock(&pool);
        for (l, layer) in layers.iter().enumerate() {
            if layer.experts == 0 {
                return Err(Error::InvalidConfig(format!("layer {l} has no experts")));
            }
            if layer.tiers.is_empty() || layer.tiers.len() > 255 {
                return Err(Error::InvalidConfig(format!(
                    "layer {l} needs between 1 and 255 tiers"
                )));
            }
            for (t, classes) in layer.tiers.iter().enumerate() {
                if classes.is_empty() {
                    return Err(Error::InvalidConfig(format!(
                        "layer {l} tier {t} has no slot class"
                    )));
                }
                for &c in classes {
                    p.class_name(c)?;
                }
            }
            if let Some(init) = &initial {
                if init[l].len() != layer.experts as usize {
                    return Err(Error::InvalidConfig(format!(
                        "initial tiers for layer {l} list {} experts, the layer has {}",
                        init[l].len(),
                        layer.experts
                    )));
                }
                if let Some(&t) = init[l].iter().find(|&&t| t as usize >= layer.tiers.len()) {
                    return Err(Error::OutOfRange(format!(
                        "initial tier {t} in layer {l} (the layer has {} tiers)",
                        layer.tiers.len()
                    )));
                }
            }
        }
        let mut layer_base = Vec::with_capacity(layers.len() + 1);
        let mut entries: Vec<Version> = Vec::new();
        let mut words = Vec::new();
        let mut total = 0u32;
        for (l, layer) in layers.iter().enumerate() {
            layer_base.push(total);
            for e in 0..layer.experts {
                let tier = initial.as_ref().map_or(0, |i| i[l][e as usize]);
                let block = match alloc_from(&mut p, &layer.tiers[tier as usize], false) {
                    Ok(b) => b,
                    Err(err) => {
                        for v in &entries {
                            let _ = p.free_owned(&v.block);
                        }
                        return Err(err);
                    }
                };
                let v = Version {
                    tier,
                    version: 1,
                    block,
                };
                let slot = p.check_live(&block)?;
                words.push(AtomicU64::new(pack(1, tier, slot)));
                entries.push(v);
            }
            total += layer.experts;
        }
        layer_base.push(total);
        let board = p.board().clone();
        let arena = p.arena().clone();
        drop(p);
        let mut stats = TableStats {
            entries: total,
            per_tier: vec![0; layers.iter().map(|l| l.tiers.len()).max().unwrap_or(1)],
            ..TableStats::default()
        };
        for v in &entries {
            stats.per_tier[v.tier as usize] += 1;
        }
        Ok(Self {
            pool,
            board,
            arena,
            published: words.into_boxed_slice(),
            layer_base,
            tiers: layers.into_iter().map(|l| l.tiers).collect(),
            fence,
            writer: Mutex::new(Writer {
                entries: entries
                    .into_iter()
                    .map(|current| Entry {
                        current,
                        transition: None,
                    })
                    .collect(),
                tickets: HashMap::new(),
                next_ticket: 1,
                retired: Vec::new(),
                stats,
            }),
        })
    }

    pub fn pool(&self) -> &Arc<Mutex<ExpertPool>> {
        &self.pool
    }
    pub fn fence(&self) -> &std::sync::Arc<dyn UseFence> {
        &self.fence
    }
    pub fn num_layers(&self) -> u32 {
        (self.layer_base.len() - 1) as u32
    }
    pub fn num_entries(&self) -> u32 {
        self.published.len() as u32
    }
    pub fn experts(&self, layer: u32) -> Result<u32> {
        self.check_layer(layer)?;
        Ok(self.layer_base[layer as usize + 1] - self.layer_base[layer as usize])
    }
    pub fn num_tiers(&self, layer: u32) -> Result<u8> {
        self.check_layer(layer)?;
        Ok(self.tiers[layer as usize].len() as u8)
    }

    /// Slot classes tier `tier` of `layer` allocates from, in preference order.
    pub fn tier_classes(&self, layer: u32, tier: u8) -> Result<&[ClassId]> {
        self.check_layer(layer)?;
        self.tiers[layer as usize]
            .get(tier as usize)
            .map(|v| v.as_slice())
            .ok_or_else(|| Error::OutOfRange(format!("tier {tier} of layer {layer}")))
    }

    fn check_layer(&self, layer: u32) -> Result<()> {
        if layer >= self.num_layers() {
            return Err(Error::OutOfRange(format!(
                "layer {layer} (the table has {} layers)",
                self.num_layers()
            )));
        }
        Ok(())
    }

    /// Entry index of (layer, expert).
    pub fn entry_index(&self, layer: u32, expert: u32) -> Result<usize> {
        let n = self.experts(layer)?;
        if expert >= n {
            return Err(Error::OutOfRange(format!(
                "expert {expert} of layer {layer} (the layer has {n} experts)"
            )));
        }
        Ok((self.layer_base[layer as usize] + expert) as usize)
    }

    fn version_from_word(&self, word: u64) -> Version {
        Version {
            tier: tier_of(word),
            version: version_of(word),
            block: self.board.block(slot_of(word)),
        }
    }

    /// The published version right now (lock-free; may be stale as soon as it returns —
    /// take a lease to use the block).
    pub fn published(&self, layer: u32, expert: u32) -> Result<Version> {
        let e = self.entry_index(layer, expert)?;
        Ok(self.version_from_word(self.published[e].load(Ordering::Acquire)))
    }

    /// Pin the published version of entry `e`: the lock-free read path.
    fn acquire(&self, e: usize) -> u64 {
        let cell = &self.published[e];
        let mut word = cell.load(Ordering::Acquire);
        loop {
            let readers = &self.board.readers[slot_of(word) as usize];
            readers.fetch_add(1, Ordering::Relaxed);
            // Pairs with the fence after the writer's publish (see the module docs).
            fence(Ordering::SeqCst);
            let now = cell.load(Ordering::Acquire);
            if now == word {
                return word;
            }
            // A newer version was published meanwhile: the old block may already be
            // reclaimed, so never use it; retry on the new word.
            readers.fetch_sub(1, Ordering::Release);
            word = now;
        }
    }

    fn release_word(&self, word: u64) {
        self.board.readers[slot_of(word) as usize].fetch_sub(1, Ordering::Release);
    }

    /// Lease the published version of (layer, expert); its block is not reclaimed while
    /// the lease lives.
    pub fn lease(&self, layer: u32, expert: u32) -> Result<Lease<'_>> {
        let e = self.entry_index(layer, expert)?;
        Ok(Lease {
            table: self,
            word: self.acquire(e),
        })
    }

    /// A lease that keeps the table alive (for holders without a borrow, e.g. Python).
    #[cfg(not(loom))]
    pub fn lease_owned(self: &Arc<Self>, layer: u32, expert: u32) -> Result<OwnedLease> {
        let e = self.entry_index(layer, expert)?;
        Ok(OwnedLease {
            word: self.acquire(e),
            table: self.clone(),
        })
    }

    pub fn state(&self, layer: u32, expert: u32) -> Result<EntryState> {
        let e = self.entry_index(layer, expert)?;
        let w = lock(&self.writer);
        let entry = &w.entries[e];
        Ok(match entry.transition {
            None => EntryState::Resident {
                tier: entry.current.tier,
            },
            Some(ticket) => EntryState::Transitioning {
                from: entry.current.tier,
                to: w.tickets[&ticket].to,
                ticket,
            },
        })
    }

    /// Admit a transition of (layer, expert) to tier `to`: reserve a pending block of the
    /// target tier. Fails if the entry is already transitioning or already at `to`, or if
    /// no slot / budget is available (the pool's error).
    pub fn begin(&self, layer: u32, expert: u32, to: u8) -> Result<Transition> {
        let e = self.entry_index(layer, expert)?;
        let tiers = &self.tiers[layer as usize];
        if to as usize >= tiers.len() {
            return Err(Error::OutOfRange(format!(
                "tier {to} (layer {layer} has {} tiers)",
                tiers.len()
            )));
        }
        let mut w = lock(&self.writer);
        let entry = &w.entries[e];
        let illegal = |reason: String| Error::IllegalTransition {
            layer,
            expert,
            reason,
        };
        if let Some(t) = entry.transition {
            let to_now = w.tickets[&t].to;
            return Err(illegal(format!(
                "already transitioning to tier {to_now} (ticket {t})"
            )));
        }
        let from = entry.current.tier;
        if from == to {
            return Err(illegal(format!("already resident at tier {to}")));
        }
        let block = alloc_from(&mut lock(&self.pool), &tiers[to as usize], true)?;
        let ticket = w.next_ticket;
        w.next_ticket += 1;
        let t = Transition {
            ticket,
            layer,
            expert,
            from,
            to,
            block,
        };
        w.tickets.insert(ticket, t);
        w.entries[e].transition = Some(ticket);
        w.stats.begun += 1;
        w.stats.in_flight += 1;
        Ok(t)
    }

    /// The in-flight transition `ticket`.
    pub fn transition(&self, ticket: Ticket) -> Result<Transition> {
        lock(&self.writer)
            .tickets
            .get(&ticket)
            .copied()
            .ok_or(Error::UnknownTicket(ticket))
    }

    /// The copy for `ticket` finished: publish the new version, retire the old block and
    /// reclaim whatever retired blocks are now unused. Returns the new version.
    pub fn complete(&self, ticket: Ticket) -> Result<Version> {
        let mut w = lock(&self.writer);
        let t = *w.tickets.get(&ticket).ok_or(Error::UnknownTicket(ticket))?;
        let mut pool = lock(&self.pool);
        pool.commit(&t.block)?;
        let slot = pool.check_live(&t.block)?;
        w.tickets.remove(&ticket);
        let e = (self.layer_base[t.layer as usize] + t.expert) as usize;
        let old = w.entries[e].current;
        let new = Version {
            tier: t.to,
            version: old.version.wrapping_add(1),
            block: t.block,
        };
        // The single point where a version becomes visible to readers.
        self.published[e].store(pack(new.version, new.tier, slot), Ordering::Release);
        // Pairs with the readers' fence: from here on, a reader that pinned the old word
        // either is visible in the old slot's counter or will see the new word.
        fence(Ordering::SeqCst);
        w.entries[e] = Entry {
            current: new,
            transition: None,
        };
        let old_slot = pool.check_live(&old.block)?;
        w.retired.push((old_slot, old.block));
        w.stats.completed += 1;
        w.stats.in_flight -= 1;
        w.stats.per_tier[old.tier as usize] -= 1;
        w.stats.per_tier[new.tier as usize] += 1;
        self.reclaim_locked(&mut w, &mut pool);
        Ok(new)
    }

    /// The transition failed or was cancelled: the entry stays at its published version
    /// and the reserved block goes back to the pool.
    pub fn abort(&self, ticket: Ticket) -> Result<()> {
        let mut w = lock(&self.writer);
        let t = w
            .tickets
            .remove(&ticket)
            .ok_or(Error::UnknownTicket(ticket))?;
        let e = (self.layer_base[t.layer as usize] + t.expert) as usize;
        w.entries[e].transition = None;
        w.stats.aborted += 1;
        w.stats.in_flight -= 1;
        // Readers never saw the pending block, so it needs no retire step.
        lock(&self.pool).free_owned(&t.block)
    }

    /// Free every retired block with no lease and no outstanding use; returns them.
    pub fn reclaim(&self) -> Vec<Block> {
        let mut w = lock(&self.writer);
        let mut pool = lock(&self.pool);
        self.reclaim_locked(&mut w, &mut pool)
    }

    fn reclaim_locked(&self, w: &mut Writer, pool: &mut ExpertPool) -> Vec<Block> {
        let mut freed = Vec::new();
        let board = &self.board;
        let use_fence = &self.fence;
        fence(Ordering::SeqCst);
        w.retired.retain(|&(slot, block)| {
            // Acquire pairs with the readers' releasing decrement: their reads of the
            // block happen before it is reused.
            let idle = board.readers[slot as usize].load(Ordering::Acquire) == 0
                && use_fence.uses_completed(slot);
            if idle {
                pool.free_owned(&block)
                    .expect("a retired block stays live until reclaimed");
                freed.push(block);
            }
            !idle
        });
        w.stats.reclaimed += freed.len() as u64;
        freed
    }

    /// Old versions still waiting to be reclaimed.
    pub fn retired(&self) -> Vec<Block> {
        lock(&self.writer).retired.iter().map(|&(_, b)| b).collect()
    }

    pub fn stats(&self) -> TableStats {
        let w = lock(&self.writer);
        let mut s = w.stats.clone();
        s.retired_waiting = w.retired.len() as u32;
        s
    }

    fn lease_bytes(&self, word: u64) -> Option<&[u8]> {
        let info = self.board.info[slot_of(word) as usize];
        let base = self.arena.host_ptr()?;
        // SAFETY: the slot lies inside the arena (checked when the pool was built), the
        // arena lives as long as `self`, and a leased published block is never written:
        // copies only target pending blocks, and the block is not reclaimed (so not
        // reused) while the lease that borrows this slice lives.
        Some(unsafe {
            std::slice::from_raw_parts(
                base.as_ptr().add(info.offset as usize),
                info.nbytes as usize,
            )
        })
    }
}

impl Drop for ExpertTable {
    fn drop(&mut self) {
        // Give every block back so the pool can be reused: leases borrow (or own) the
        // table, so none is alive here.
        let w = lock(&self.writer);
        let mut pool = lock(&self.pool);
        for entry in &w.entries {
            let _ = pool.free_owned(&entry.current.block);
        }
        for t in w.tickets.values() {
            let _ = pool.free_owned(&t.block);
        }
        for (_, b) in &w.retired {
            let _ = pool.free_owned(b);
        }
    }
}

fn alloc_from(pool: &mut ExpertPool, classes: &[ClassId], pending: bool) -> Result<Block> {
    let mut last = None;
    for &c in classes {
        let r = if pending {
            pool.try_reserve(c)
        } else {
            pool.alloc(c)
        };
        match r {
            Ok(b) => {
                pool.set_table_owned(&b, true)?;
                return Ok(b);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("tiers have at least one class"))
}

/// A read lease on a published version (scoped guard).
pub struct Lease<'a> {
    table: &'a ExpertTable,
    word: u64,
}

impl Lease<'_> {
    pub fn version(&self) -> Version {
        self.table.version_from_word(self.word)
    }
    pub fn tier(&self) -> u8 {
        tier_of(self.word)
    }
    pub fn version_number(&self) -> u32 {
        version_of(self.word)
    }
    /// The block's global slot number in the pool.
    pub fn slot(&self) -> u32 {
        slot_of(self.word)
    }
    /// Work reading the block was issued and may outlive this lease.
    pub fn record_use(&self) {
        self.table.fence.record_use(slot_of(self.word));
    }
    /// The block's bytes, when the pool is host memory.
    pub fn bytes(&self) -> Option<&[u8]> {
        self.table.lease_bytes(self.word)
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        self.table.release_word(self.word);
    }
}

/// A lease holding a reference to its table.
#[cfg(not(loom))]
pub struct OwnedLease {
    table: Arc<ExpertTable>,
    word: u64,
}

#[cfg(not(loom))]
impl OwnedLease {
    pub fn version(&self) -> Version {
        self.table.version_from_word(self.word)
    }
    pub fn slot(&self) -> u32 {
        slot_of(self.word)
    }
    pub fn record_use(&self) {
        self.table.fence.record_use(slot_of(self.word));
    }
    pub fn bytes(&self) -> Option<&[u8]> {
        self.table.lease_bytes(self.word)
    }
    pub fn table(&self) -> &Arc<ExpertTable> {
        &self.table
    }
    /// A second lease on the same version (it cannot be reclaimed meanwhile: this one
    /// already pins it).
    pub fn duplicate(&self) -> OwnedLease {
        self.table.board.readers[slot_of(self.word) as usize].fetch_add(1, Ordering::Relaxed);
        OwnedLease {
            table: self.table.clone(),
            word: self.word,
        }
    }
}

#[cfg(not(loom))]
impl Drop for OwnedLease {
    fn drop(&mut self) {
        self.table.release_word(self.word);
    }
}
