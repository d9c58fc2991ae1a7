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
//! `begin` reserves a pending block of the target tier and returns the only capability to
//! settle it ([`PendingTransition`], not `Clone`): whoever began a transition (the transfer
//! engine, or a caller driving the table by hand) is the only one who can complete or
//! abort it, so nobody can publish a block whose copy is still running. Nothing a reader
//! can see changes until `complete` publishes the new version (one atomic store).
//!
//! ## Loading
//! Published blocks get their first bytes before any reader exists: `load_initial` (host
//! arenas) or the transfer engine's upload (`upload_initial`, once per table) write them
//! while the table is *unsealed*; the first lease seals the table (under the writer lock,
//! so it waits for a load in progress), and after that no published block is ever
//! written again. The old block is then
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
use std::ops::Deref;
use std::sync::atomic::Ordering;

use crate::errors::{Error, Result};
pub use crate::fence::{ManualFence, SyncUses, UseFence};
use crate::pool::{Block, ClassId, ExpertPool, SlotBoard};
use crate::sync::{fence, lock, Arc, AtomicBool, AtomicU64, Mutex};

/// Distinguishes tables, so a capability of one cannot settle another's transition.
static NEXT_TABLE_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

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

/// What an admitted transition is: the target tier's bytes go into `block` (pending, seen
/// by no reader), then its owner completes or aborts it. Plain data: settling needs the
/// [`PendingTransition`] that `begin` returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    pub ticket: Ticket,
    pub layer: u32,
    pub expert: u32,
    pub from: u8,
    pub to: u8,
    pub block: Block,
}

/// The capability to settle one transition (returned by [`ExpertTable::begin`], consumed
/// by [`ExpertTable::complete`] or [`ExpertTable::abort`]). Dropping it unsettled leaves
/// the entry transitioning and its block reserved: memory-safe, but a leak.
#[must_use = "a transition must be completed or aborted by its owner"]
#[derive(Debug, PartialEq, Eq)]
pub struct PendingTransition {
    info: Transition,
    table: u64,
}

impl PendingTransition {
    pub fn info(&self) -> Transition {
        self.info
    }
    pub fn ticket(&self) -> Ticket {
        self.info.ticket
    }
    pub fn block(&self) -> Block {
        self.info.block
    }
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
    /// Whether the table is sealed (a lease was taken or an engine uploaded).
    pub sealed: bool,
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
    /// A transfer engine uploaded the published versions and owns the migrations.
    engine: bool,
    stats: TableStats,
}

/// One entry per (layer, expert) over a shared pool.
pub struct ExpertTable {
    id: u64,
    sealed: AtomicBool,
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
            id: NEXT_TABLE_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            sealed: AtomicBool::new(false),
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
                engine: false,
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

    /// The published tier of every entry, in entry order (lock-free; a snapshot that may
    /// be stale as soon as it returns).
    pub fn published_tiers(&self) -> Vec<u8> {
        self.published
            .iter()
            .map(|w| tier_of(w.load(Ordering::Acquire)))
            .collect()
    }

    /// Pin the published version of entry `e`: the lock-free read path.
    fn acquire(&self, e: usize) -> u64 {
        if !self.sealed.load(Ordering::Acquire) {
            self.seal();
        }
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

    /// The in-flight transition of (layer, expert), if any (one look under the lock).
    pub fn transition_of(&self, layer: u32, expert: u32) -> Result<Option<Transition>> {
        let e = self.entry_index(layer, expert)?;
        let w = lock(&self.writer);
        Ok(w.entries[e].transition.map(|t| w.tickets[&t]))
    }

    /// Close the loading phase: from now on no published block is written. The first
    /// lease seals the table by itself; sealing waits for a load in progress.
    pub fn seal(&self) {
        let _w = lock(&self.writer);
        self.sealed.store(true, Ordering::Release);
    }

    pub fn is_sealed(&self) -> bool {
        self.sealed.load(Ordering::Acquire)
    }

    fn check_loading(&self, w: &Writer) -> Result<()> {
        if self.sealed.load(Ordering::Acquire) {
            return Err(Error::Sealed(
                "the table is sealed (a lease was taken or an engine uploaded): initial bytes \
                 are written before the first lease"
                    .into(),
            ));
        }
        if w.engine {
            return Err(Error::Sealed(
                "a transfer engine owns this table's published bytes".into(),
            ));
        }
        Ok(())
    }

    /// Write the first bytes of (layer, expert)'s published block (host arenas), before
    /// the first lease.
    pub fn load_initial(&self, layer: u32, expert: u32, data: &[u8]) -> Result<()> {
        let e = self.entry_index(layer, expert)?;
        let w = lock(&self.writer);
        self.check_loading(&w)?;
        let block = w.entries[e].current.block;
        // SAFETY (of the write below): the table is unsealed and we hold the writer lock,
        // which sealing needs, so no lease exists or can be taken meanwhile; the block is
        // the entry's published block, owned by the table.
        self.write_block(&block, 0, data)
    }

    /// The transfer engine's load-time upload: claims the table for one engine, runs
    /// `upload` over every published version (layer, expert, version) with the writer
    /// lock held (so no reader can exist until it returns), then seals the table. On
    /// error the table stays unclaimed and unsealed; `upload` must not return before every
    /// copy it started has ended.
    pub fn upload_initial(
        &self,
        upload: impl FnOnce(&[(u32, u32, Version)]) -> Result<()>,
    ) -> Result<()> {
        let mut w = lock(&self.writer);
        if w.engine {
            return Err(Error::Sealed(
                "the table already has a transfer engine (one engine per table)".into(),
            ));
        }
        self.check_loading(&w)?;
        let mut versions = Vec::with_capacity(w.entries.len());
        for l in 0..self.num_layers() {
            let base = self.layer_base[l as usize];
            for e in 0..self.layer_base[l as usize + 1] - base {
                versions.push((l, e, w.entries[(base + e) as usize].current));
            }
        }
        upload(&versions)?;
        w.engine = true;
        self.sealed.store(true, Ordering::Release);
        Ok(())
    }

    /// Copy `data` into `block` at `offset` (host arenas only). Callers guarantee that no
    /// reader can see the block (pending, or unsealed and locked).
    fn write_block(&self, block: &Block, offset: u64, data: &[u8]) -> Result<()> {
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&end| end <= block.nbytes)
            .ok_or_else(|| {
                Error::OutOfRange(format!(
                    "{} B at offset {offset} into a {} B block",
                    data.len(),
                    block.nbytes
                ))
            })?;
        let _ = end;
        let base = self.arena.host_ptr().ok_or_else(|| {
            Error::InvalidConfig("the pool's arena is not host memory: copy with an engine".into())
        })?;
        // SAFETY: the block lies inside the arena (checked when the pool was built) and
        // `offset + len <= nbytes` (checked above); the caller guarantees exclusive access
        // (see the callers' comments); source and destination do not overlap (the source
        // is a caller's buffer, not pool memory handed out as writable).
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                base.as_ptr().add((block.offset + offset) as usize),
                data.len(),
            )
        };
        Ok(())
    }

    /// Admit a transition of (layer, expert) to tier `to`: reserve a pending block of the
    /// target tier. Fails if the entry is already transitioning or already at `to`, or if
    /// no slot / budget is available (the pool's error). The returned capability is the
    /// only way to settle it.
    pub fn begin(&self, layer: u32, expert: u32, to: u8) -> Result<PendingTransition> {
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
        Ok(PendingTransition {
            info: t,
            table: self.id,
        })
    }

    /// The in-flight transition `ticket` (a description; settling needs its capability).
    pub fn transition(&self, ticket: Ticket) -> Result<Transition> {
        lock(&self.writer)
            .tickets
            .get(&ticket)
            .copied()
            .ok_or(Error::UnknownTicket(ticket))
    }

    fn check_owner(&self, p: &PendingTransition) -> Result<()> {
        if p.table != self.id {
            return Err(Error::IllegalTransition {
                layer: p.info.layer,
                expert: p.info.expert,
                reason: "the transition was begun on another table".into(),
            });
        }
        Ok(())
    }

    /// Write bytes into the pending block of `p` (host arenas; for callers that copy by
    /// hand rather than through an engine).
    pub fn write_pending(&self, p: &PendingTransition, offset: u64, data: &[u8]) -> Result<()> {
        self.check_owner(p)?;
        // SAFETY (of the write): the block is pending, so no reader can lease it, and only
        // the holder of `p` (borrowed here, so it cannot be settled meanwhile) writes it.
        self.write_block(&p.info.block, offset, data)
    }

    /// The copy for `p` finished: publish the new version, retire the old block and
    /// reclaim whatever retired blocks are now unused. Returns the new version.
    pub fn complete(&self, p: PendingTransition) -> Result<Version> {
        self.check_owner(&p)?;
        let ticket = p.info.ticket;
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
    /// and the reserved block goes back to the pool. Its owner calls this only once no
    /// copy into the block can still be running.
    pub fn abort(&self, p: PendingTransition) -> Result<()> {
        self.check_owner(&p)?;
        let ticket = p.info.ticket;
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
        s.sealed = self.is_sealed();
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
        // Give every block back so the pool can be reused. Leases borrow (or own) the
        // table, so none is alive here, but work issued under earlier leases may still be
        // running (a kernel on a stream): free a block only once the use fence says its
        // uses completed, waiting at most the fence's `drop_wait`; a block still in use
        // after that stays reserved in the pool (never handed out again) rather than freed
        // under the kernel.
        let w = lock(&self.writer);
        let mut blocks: Vec<Block> = w.entries.iter().map(|e| e.current.block).collect();
        blocks.extend(w.retired.iter().map(|&(_, b)| b));
        let deadline = std::time::Instant::now() + self.fence.drop_wait();
        let mut pool = lock(&self.pool);
        loop {
            blocks.retain(|b| match pool.check_live(b) {
                Ok(slot) if self.fence.uses_completed(slot) => {
                    let _ = pool.free_owned(b);
                    false
                }
                Ok(_) => true,
                Err(_) => false,
            });
            if blocks.is_empty() || std::time::Instant::now() >= deadline {
                break;
            }
            drop(pool);
            std::thread::sleep(std::time::Duration::from_millis(1));
            pool = lock(&self.pool);
        }
        // Pending blocks: nobody reads them, and their owners (the engine settles its
        // flights before it lets go of the table) have no copy running into them.
        for t in w.tickets.values() {
            let _ = pool.free_owned(&t.block);
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

/// One step of a device executor that reads experts through a table image (a
/// [layers, experts] -> (tier, slot) array copied to the device, which the kernels read
/// instead of leasing per expert). `pin_step` leases every published version and reads the
/// image from the leased words; the executor uploads the image and enqueues the step's
/// kernels, then `record` places one use mark for every slot of the image and releases the
/// leases. So a block retired while the step was being prepared is pinned by a lease, and
/// once the step is enqueued by the mark: it is reclaimed only after the compute stream
/// passed the last step whose image still pointed at it.
pub struct StepPin<T: Deref<Target = ExpertTable>> {
    table: T,
    words: Vec<u64>,
}

impl<T: Deref<Target = ExpertTable>> StepPin<T> {
    /// (tier, global slot) of every entry, in entry order (layer-major).
    pub fn image(&self) -> impl Iterator<Item = (u8, u32)> + '_ {
        self.words.iter().map(|&w| (tier_of(w), slot_of(w)))
    }
    /// The published versions the image holds.
    pub fn versions(&self) -> Vec<Version> {
        self.words
            .iter()
            .map(|&w| self.table.version_from_word(w))
            .collect()
    }
    /// The step's kernels are enqueued: mark every slot of the image used, then release.
    pub fn record(self) {
        let slots: Vec<u32> = self.words.iter().map(|&w| slot_of(w)).collect();
        self.table.fence.record_uses(&slots);
    }
}

impl<T: Deref<Target = ExpertTable>> Drop for StepPin<T> {
    fn drop(&mut self) {
        for &w in &self.words {
            self.table.release_word(w);
        }
    }
}

impl ExpertTable {
    /// Lease every published version for one device step (see [`StepPin`]).
    pub fn pin_step(&self) -> StepPin<&ExpertTable> {
        let words = (0..self.published.len()).map(|e| self.acquire(e)).collect();
        StepPin { table: self, words }
    }

    /// The same, holding the table by `Arc` (for owners that outlive a borrow, such as
    /// the Python binding).
    pub fn pin_step_shared(self: &std::sync::Arc<Self>) -> StepPin<std::sync::Arc<ExpertTable>> {
        let words = (0..self.published.len()).map(|e| self.acquire(e)).collect();
        StepPin {
            table: self.clone(),
            words,
        }
    }
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
