//! The fragmentation-free expert pool.
//!
//! One arena is reserved once at construction and cut into fixed regions, one per slot
//! class (a tier and expert shape). Inside a region every slot has the same size, so any
//! free slot serves any request of its class: there is no external fragmentation by
//! construction, and nothing is allocated from the system after construction.
//!
//! Free lists are hierarchical bitmaps ([`FreeBitmap`]): `alloc` always returns the lowest
//! free index of the class, so the same sequence of calls yields the same offsets. Both
//! `alloc` and `free` touch one word per level (at most 4 levels for 16M slots), i.e.
//! O(1) for any pool that fits the 24-bit slot numbering.
//!
//! The pool counts committed bytes (copy finished or plain allocation) and pending bytes
//! (reserved for a copy in flight), and reserves every slot's bytes from a
//! [`DeviceBudget`] first: its own (the pool's budget) or one shared with the KV page pool
//! (`kv_pages.rs`), so a reservation that would push the budget's bytes over its limit
//! fails cleanly.

use std::alloc::{alloc_zeroed, dealloc, Layout as AllocLayout};
use std::collections::HashMap;
use std::fmt;
use std::ptr::NonNull;
use std::sync::atomic::Ordering;

use crate::budget::{BudgetUse, DeviceBudget};
use crate::errors::{Error, Result};
use crate::sync::{Arc, AtomicU32};

/// Slot numbers are packed into 24 bits of a published version word (see `table.rs`).
pub const MAX_SLOTS: u32 = 1 << 24;

// ---------------------------------------------------------------------------------------
// Arena

/// Where the pool's bytes live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArenaKind {
    /// Ordinary host memory owned by the pool (CPU backend).
    Host,
    /// Device memory (CUDA backend); not dereferenceable from the host.
    Device,
    /// Accounting only: offsets without memory (planning, huge property-test pools).
    Virtual,
}

/// The memory behind a pool. A block is always `(class, index, offset, nbytes)` relative
/// to `base_address`, so a device arena only has to say where byte 0 is.
pub trait Arena: Send + Sync + fmt::Debug {
    fn kind(&self) -> ArenaKind;
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Address of byte 0: a host pointer, a device pointer, or 0 for a virtual arena.
    fn base_address(&self) -> u64;
    /// Host-dereferenceable pointer to byte 0, when the arena is host memory.
    fn host_ptr(&self) -> Option<NonNull<u8>> {
        None
    }
    /// Address of the byte at `offset`: `base_address() + offset`, except in an arena
    /// whose tail is separate host memory the device reads (the CUDA split arena), where
    /// the tail's bytes are at that memory's device address.
    fn address(&self, offset: u64) -> u64 {
        self.base_address() + offset
    }
    /// Copy `buf.len()` bytes at `offset` out (works for device arenas too; tests and
    /// checks, not the serving path).
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let base = self
            .host_ptr()
            .ok_or_else(|| Error::InvalidConfig("this arena holds no readable memory".into()))?;
        if offset + buf.len() as u64 > self.len() {
            return Err(Error::OutOfRange(format!(
                "read of {} B at {offset} in a {} B arena",
                buf.len(),
                self.len()
            )));
        }
        // SAFETY: the range lies inside the arena (checked above).
        unsafe {
            std::ptr::copy_nonoverlapping(
                base.as_ptr().add(offset as usize),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        Ok(())
    }
}

/// Aligned, zeroed host memory reserved once and freed when the last owner drops it.
pub struct HostArena {
    ptr: NonNull<u8>,
    layout: AllocLayout,
}

// SAFETY: the arena is a plain owned allocation; it hands out raw pointers only, and the
// pool's ownership rules (one owner per live block, published blocks read-only) decide
// who may write where. Nothing in the struct itself is thread-affine.
unsafe impl Send for HostArena {}
// SAFETY: as above; `&HostArena` only exposes the pointer value and length.
unsafe impl Sync for HostArena {}

impl HostArena {
    pub fn new(len: u64, align: u64) -> Result<Self> {
        if len == 0 {
            return Err(Error::InvalidConfig("arena length must be > 0".into()));
        }
        let size = usize::try_from(len).map_err(|_| {
            Error::InvalidConfig(format!("arena of {len} B exceeds the address space"))
        })?;
        let layout = AllocLayout::from_size_align(size, align as usize).map_err(|e| {
            Error::InvalidConfig(format!("arena layout ({len} B, align {align}): {e}"))
        })?;
        // SAFETY: `layout` has a non-zero size (checked above).
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or_else(|| {
            Error::InvalidConfig(format!(
                "could not reserve {len} B of host memory for the arena"
            ))
        })?;
        Ok(Self { ptr, layout })
    }
}

impl Drop for HostArena {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `alloc_zeroed(self.layout)` and is freed exactly once.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl fmt::Debug for HostArena {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "HostArena({:#x}, {} B)",
            self.ptr.as_ptr() as usize,
            self.layout.size()
        )
    }
}

impl Arena for HostArena {
    fn kind(&self) -> ArenaKind {
        ArenaKind::Host
    }
    fn len(&self) -> u64 {
        self.layout.size() as u64
    }
    fn base_address(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }
    fn host_ptr(&self) -> Option<NonNull<u8>> {
        Some(self.ptr)
    }
}

/// An arena without memory: offsets and accounting only.
#[derive(Debug)]
pub struct VirtualArena {
    len: u64,
}

impl VirtualArena {
    pub fn new(len: u64) -> Self {
        Self { len }
    }
}

impl Arena for VirtualArena {
    fn kind(&self) -> ArenaKind {
        ArenaKind::Virtual
    }
    fn len(&self) -> u64 {
        self.len
    }
    fn base_address(&self) -> u64 {
        0
    }
}

// ---------------------------------------------------------------------------------------
// Free list

/// A hierarchical bitmap of free slots: level 0 has one bit per slot (1 = free), and bit j
/// of level k+1 is set iff word j of level k is non-zero. `alloc` descends from the single
/// top word taking the lowest set bit at each level, so it returns the lowest free index
/// in `levels` word reads; `free` sets one bit per level at most.
#[derive(Clone, Debug)]
pub struct FreeBitmap {
    levels: Vec<Vec<u64>>,
    len: u32,
    free: u32,
}

impl FreeBitmap {
    /// All `len` slots free.
    pub fn new(len: u32) -> Self {
        let mut levels = Vec::new();
        let mut bits = len as usize;
        loop {
            let words = bits.div_ceil(64).max(1);
            let mut level = vec![u64::MAX; words];
            let tail = bits % 64;
            if tail != 0 {
                level[words - 1] = (1u64 << tail) - 1;
            }
            if bits == 0 {
                level[0] = 0;
            }
            levels.push(level);
            if words == 1 {
                break;
            }
            bits = words;
        }
        Self {
            levels,
            len,
            free: len,
        }
    }

    pub fn len(&self) -> u32 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn free_count(&self) -> u32 {
        self.free
    }

    pub fn is_free(&self, i: u32) -> bool {
        i < self.len && self.levels[0][(i / 64) as usize] & (1u64 << (i % 64)) != 0
    }

    /// Take the lowest free index.
    pub fn alloc(&mut self) -> Option<u32> {
        let top = self.levels.len() - 1;
        if self.levels[top][0] == 0 {
            return None;
        }
        let mut idx = 0usize;
        for level in (0..=top).rev() {
            let word = self.levels[level][idx];
            idx = idx * 64 + word.trailing_zeros() as usize;
        }
        self.clear(idx);
        Some(idx as u32)
    }

    /// Take the free index `i` out (a slot going offline); false if it is not free.
    pub fn take(&mut self, i: u32) -> bool {
        if !self.is_free(i) {
            return false;
        }
        self.clear(i as usize);
        true
    }

    /// Clear the leaf bit of free index `idx`, then parents whose child word became empty.
    fn clear(&mut self, idx: usize) {
        let mut i = idx;
        for level in 0..self.levels.len() {
            let w = &mut self.levels[level][i / 64];
            *w &= !(1u64 << (i % 64));
            if *w != 0 {
                break;
            }
            i /= 64;
        }
        self.free -= 1;
    }

    /// Return `i`; false if it was already free (double free) or out of range.
    pub fn free(&mut self, i: u32) -> bool {
        if i >= self.len || self.is_free(i) {
            return false;
        }
        let mut i = i as usize;
        for level in 0..self.levels.len() {
            let w = &mut self.levels[level][i / 64];
            let was_empty = *w == 0;
            *w |= 1u64 << (i % 64);
            if !was_empty {
                break;
            }
            i /= 64;
        }
        self.free += 1;
        true
    }
}

// ---------------------------------------------------------------------------------------
// Classes, blocks, configuration

/// Index of a slot class inside its pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClassId(pub u16);

/// What the caller asks for: one slot class.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassSpec {
    pub name: String,
    /// Bytes one expert of this class needs (packed weights + scales + zeros); rounded up
    /// to the pool alignment.
    pub slot_bytes: u64,
    pub slots: u32,
    /// The class's slots live in host memory the device can read (a staging slot): they
    /// are reserved from no device budget, and their region is the arena's tail.
    pub host_memory: bool,
}

impl ClassSpec {
    pub fn new(name: impl Into<String>, slot_bytes: u64, slots: u32) -> Self {
        Self {
            name: name.into(),
            slot_bytes,
            slots,
            host_memory: false,
        }
    }
    /// The same class, its slots in host memory (see `host_memory`).
    pub fn in_host_memory(mut self) -> Self {
        self.host_memory = true;
        self
    }
}

/// Pool construction parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    pub classes: Vec<ClassSpec>,
    /// Slot sizes and region offsets are multiples of this (a power of two).
    pub alignment: u64,
    /// Upper bound on committed + pending bytes; `None` means the whole arena.
    pub budget: Option<u64>,
    /// Bytes at the head of the arena that are no slot's: the KV cache's floor pages
    /// (handed out by the KV page pool). Slot regions start after them.
    pub kv_head_bytes: u64,
    /// Which class's slots may be lent to the KV pages, and which class a lent slot hosts.
    pub lending: Option<Lending>,
}

/// Slots of class `host` may be lent to the KV cache: a lent slot is no expert's, its
/// bytes past the head become KV pages, and its head hosts one slot of class `guest`
/// (the lowest tier, where the expert demoted to free it went). The guest class has one
/// such hosted slot per host slot beside its own region; a hosted slot can be handed out
/// only while its host is lent, and the host comes back only while its guest is free.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lending {
    pub host: String,
    pub guest: String,
}

impl PoolConfig {
    pub fn new(classes: Vec<ClassSpec>) -> Self {
        Self {
            classes,
            alignment: 256,
            budget: None,
            kv_head_bytes: 0,
            lending: None,
        }
    }
    pub fn kv_head_bytes(mut self, bytes: u64) -> Self {
        self.kv_head_bytes = bytes;
        self
    }
    pub fn lending(mut self, host: impl Into<String>, guest: impl Into<String>) -> Self {
        self.lending = Some(Lending {
            host: host.into(),
            guest: guest.into(),
        });
        self
    }
    pub fn alignment(mut self, alignment: u64) -> Self {
        self.alignment = alignment;
        self
    }
    pub fn budget(mut self, budget: Option<u64>) -> Self {
        self.budget = budget;
        self
    }
}

/// A live slot handed out by a pool: the unit of ownership.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Block {
    /// Id of the owning pool (detects foreign blocks).
    pub pool: u32,
    pub class: ClassId,
    pub index: u32,
    /// Incremented on every allocation of the slot (detects stale handles).
    pub generation: u32,
    /// Byte offset from the arena base.
    pub offset: u64,
    /// Slot size (already aligned).
    pub nbytes: u64,
}

/// Static facts about one slot, readable without the pool lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotInfo {
    pub class: ClassId,
    pub index: u32,
    pub offset: u64,
    pub nbytes: u64,
}

/// Per-slot atomics shared with the expert table's lock-free lease path.
pub(crate) struct SlotBoard {
    pub(crate) pool: u32,
    pub(crate) readers: Box<[AtomicU32]>,
    pub(crate) generation: Box<[AtomicU32]>,
    pub(crate) info: Box<[SlotInfo]>,
}

impl SlotBoard {
    pub(crate) fn block(&self, slot: u32) -> Block {
        let info = self.info[slot as usize];
        Block {
            pool: self.pool,
            class: info.class,
            index: info.index,
            generation: self.generation[slot as usize].load(Ordering::Relaxed),
            offset: info.offset,
            nbytes: info.nbytes,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotState {
    Free,
    Pending,
    Committed,
    /// A host slot lent to the KV pages (no expert's).
    Lent,
    /// A hosted guest slot whose host is not lent (its bytes are the host's).
    Offline,
}

#[derive(Clone, Copy, Debug)]
struct SlotMeta {
    state: SlotState,
    /// Owned by the expert table: `free` refuses it, the retire rule frees it.
    table: bool,
    /// Live writable views of a caller-owned block: `free` refuses it while any exists.
    views: u32,
}

#[derive(Clone, Debug)]
struct SlotClass {
    name: String,
    slot_bytes: u64,
    region_offset: u64,
    /// Slots in the class's own region; a guest class's hosted slots follow them.
    regular: u32,
    first_slot: u32,
    free: FreeBitmap,
    pending: u32,
    high_water: u32,
    /// Host slots lent to the KV pages / hosted guest slots offline.
    lent: u32,
    offline: u32,
    /// In host memory: reserves no device budget (`ClassSpec::host_memory`).
    host_memory: bool,
}

/// A host slot lent to the KV pages: `[offset, offset + nbytes)` of the arena, of which
/// the first `guest_bytes` host a guest slot and the rest are the pages'.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LentSlot {
    pub index: u32,
    pub offset: u64,
    pub nbytes: u64,
    pub guest_bytes: u64,
}

impl LentSlot {
    /// The bytes the KV pages may use: `(offset, len)`.
    pub fn kv_range(&self) -> (u64, u64) {
        (
            self.offset + self.guest_bytes,
            self.nbytes - self.guest_bytes,
        )
    }
}

/// Statistics of one slot class.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassStats {
    pub name: String,
    pub slot_bytes: u64,
    /// Slots that can be live now (lent host slots and offline guest slots excluded).
    pub capacity: u32,
    /// Host slots lent to the KV pages.
    pub lent: u32,
    pub free: u32,
    pub live: u32,
    pub pending: u32,
    pub committed: u32,
    pub high_water: u32,
    pub region_offset: u64,
    pub region_bytes: u64,
    pub host_memory: bool,
}

/// Statistics of the whole pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolStats {
    pub total_bytes: u64,
    /// Where the host-memory tail starts (`total_bytes` when there is none): the bytes
    /// before it are device memory.
    pub host_from: u64,
    pub budget: u64,
    pub reserved_bytes: u64,
    pub pending_bytes: u64,
    pub committed_bytes: u64,
    pub high_water_bytes: u64,
    /// Bytes of live host-memory slots (in none of the counters above).
    pub host_bytes: u64,
    pub classes: Vec<ClassStats>,
}

static NEXT_POOL_ID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

/// The pool. Mutating calls take `&mut self`; share it behind a mutex (the expert table
/// does) — only the lease path needs concurrency, and it never touches the pool.
pub struct ExpertPool {
    id: u32,
    alignment: u64,
    classes: Vec<SlotClass>,
    by_name: HashMap<String, ClassId>,
    meta: Vec<SlotMeta>,
    board: Arc<SlotBoard>,
    arena: std::sync::Arc<dyn Arena>,
    total_bytes: u64,
    /// Offset where the host-memory classes' regions start (`total_bytes`: none).
    host_from: u64,
    /// Where every slot's bytes are reserved: private, or shared with the KV page pool.
    budget: std::sync::Arc<DeviceBudget>,
    kv_head_bytes: u64,
    /// (host, guest) classes of the lending configuration.
    lending: Option<(ClassId, ClassId)>,
    pending_bytes: u64,
    committed_bytes: u64,
    high_water_bytes: u64,
    /// Bytes of live host-memory slots (reserved from no budget).
    host_bytes: u64,
}

impl fmt::Debug for ExpertPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExpertPool")
            .field("id", &self.id)
            .field("classes", &self.class_names())
            .field("total_bytes", &self.total_bytes)
            .field("arena", &self.arena)
            .finish()
    }
}

impl Drop for ExpertPool {
    /// A shared tracker outlives the pool: give back whatever the pool still holds.
    fn drop(&mut self) {
        self.budget.give(
            BudgetUse::Experts,
            self.pending_bytes + self.committed_bytes,
        );
    }
}

fn round_up(x: u64, align: u64) -> Option<u64> {
    x.checked_add(align - 1).map(|v| v & !(align - 1))
}

impl ExpertPool {
    /// A pool over freshly reserved host memory.
    pub fn new(config: &PoolConfig) -> Result<Self> {
        Self::with_arena(config, |len, align, _| {
            Ok(std::sync::Arc::new(HostArena::new(len, align)?) as std::sync::Arc<dyn Arena>)
        })
    }

    /// A pool with offsets and accounting but no memory.
    pub fn new_virtual(config: &PoolConfig) -> Result<Self> {
        Self::with_arena(config, |len, _, _| {
            Ok(std::sync::Arc::new(VirtualArena::new(len)) as std::sync::Arc<dyn Arena>)
        })
    }

    /// A pool over an arena made by `make(len, align, host_from)` (e.g. a device
    /// allocation whose bytes from `host_from` on are host memory the device can read).
    pub fn with_arena(
        config: &PoolConfig,
        make: impl FnOnce(u64, u64, u64) -> Result<std::sync::Arc<dyn Arena>>,
    ) -> Result<Self> {
        Self::with_arena_and_budget(config, make, None)
    }

    /// A pool over host memory whose slots are reserved from `budget`, a tracker shared
    /// with other users of the device budget (the KV page pool).
    pub fn new_shared(config: &PoolConfig, budget: std::sync::Arc<DeviceBudget>) -> Result<Self> {
        Self::with_arena_and_budget(
            config,
            |len, align, _| {
                Ok(std::sync::Arc::new(HostArena::new(len, align)?) as std::sync::Arc<dyn Arena>)
            },
            Some(budget),
        )
    }

    /// As [`ExpertPool::new_shared`], with accounting but no memory.
    pub fn new_virtual_shared(
        config: &PoolConfig,
        budget: std::sync::Arc<DeviceBudget>,
    ) -> Result<Self> {
        Self::with_arena_and_budget(
            config,
            |len, _, _| Ok(std::sync::Arc::new(VirtualArena::new(len)) as std::sync::Arc<dyn Arena>),
            Some(budget),
        )
    }

    /// The general constructor: `shared` is a tracker shared with other users of the
    /// budget (then `config.budget` must be unset: the tracker's limit is the budget);
    /// without it the pool gets its own tracker of `config.budget` (or the whole arena).
    pub fn with_arena_and_budget(
        config: &PoolConfig,
        make: impl FnOnce(u64, u64, u64) -> Result<std::sync::Arc<dyn Arena>>,
        shared: Option<std::sync::Arc<DeviceBudget>>,
    ) -> Result<Self> {
        if shared.is_some() && config.budget.is_some() {
            return Err(Error::InvalidConfig(
                "a pool on a shared budget takes its limit from the shared tracker; leave the \
                 pool's own budget unset"
                    .into(),
            ));
        }
        let align = config.alignment;
        if align == 0 || !align.is_power_of_two() || align > (1 << 30) {
            return Err(Error::InvalidConfig(format!(
                "alignment must be a power of two between 1 and 2^30, got {align}"
            )));
        }
        if config.classes.is_empty() {
            return Err(Error::InvalidConfig(
                "a pool needs at least one slot class".into(),
            ));
        }
        if config.classes.len() > u16::MAX as usize {
            return Err(Error::InvalidConfig("too many slot classes".into()));
        }
        let mut by_name = HashMap::new();
        // First the regions: the KV head, then every class's slots in order.
        let mut offset = round_up(config.kv_head_bytes, align)
            .ok_or_else(|| Error::InvalidConfig("the KV head is too large".into()))?;
        let mut sized = vec![(0u64, 0u64); config.classes.len()];
        // Device classes first, then the host-memory ones: those form the arena's tail.
        let order: Vec<usize> = (0..config.classes.len())
            .filter(|&i| !config.classes[i].host_memory)
            .chain((0..config.classes.len()).filter(|&i| config.classes[i].host_memory))
            .collect();
        let mut host_from = None;
        for (i, spec) in order.iter().map(|&i| (i, &config.classes[i])) {
            if spec.host_memory && host_from.is_none() {
                host_from = Some(offset);
            }
            if spec.name.is_empty() {
                return Err(Error::InvalidConfig(
                    "slot class names must be non-empty".into(),
                ));
            }
            if spec.slot_bytes == 0 {
                return Err(Error::InvalidConfig(format!(
                    "slot class {:?}: slot_bytes must be > 0",
                    spec.name
                )));
            }
            if spec.slots == 0 {
                return Err(Error::InvalidConfig(format!(
                    "slot class {:?}: slots must be > 0",
                    spec.name
                )));
            }
            if by_name
                .insert(spec.name.clone(), ClassId(i as u16))
                .is_some()
            {
                return Err(Error::InvalidConfig(format!(
                    "slot class {:?} is given twice",
                    spec.name
                )));
            }
            let too_big =
                || Error::InvalidConfig(format!("slot class {:?} is too large", spec.name));
            let slot_bytes = round_up(spec.slot_bytes, align).ok_or_else(too_big)?;
            let region = slot_bytes
                .checked_mul(spec.slots as u64)
                .ok_or_else(too_big)?;
            sized[i] = (slot_bytes, offset);
            offset = offset.checked_add(region).ok_or_else(too_big)?;
        }
        let total_bytes = offset;
        let host_from = host_from.unwrap_or(total_bytes);
        let lending = match &config.lending {
            None => None,
            Some(l) => {
                let find = |name: &str| {
                    by_name.get(name).copied().ok_or_else(|| {
                        Error::InvalidConfig(format!("the lending class {name:?} does not exist"))
                    })
                };
                let (host, guest) = (find(&l.host)?, find(&l.guest)?);
                if config.classes[host.0 as usize].host_memory
                    || config.classes[guest.0 as usize].host_memory
                {
                    return Err(Error::InvalidConfig(format!(
                        "the lending classes {:?} and {:?} must be device memory",
                        l.host, l.guest
                    )));
                }
                if host == guest || sized[guest.0 as usize].0 > sized[host.0 as usize].0 {
                    return Err(Error::InvalidConfig(format!(
                        "a lent {:?} slot cannot host a {:?} slot",
                        l.host, l.guest
                    )));
                }
                Some((host, guest))
            }
        };
        // Then the slots: a guest class's hosted slots follow its own, each at the head
        // of the host slot of the same index (offline until that host is lent).
        let mut classes = Vec::with_capacity(config.classes.len());
        let mut first_slot = 0u32;
        let mut info = Vec::new();
        for (i, spec) in config.classes.iter().enumerate() {
            let id = ClassId(i as u16);
            let (slot_bytes, region_offset) = sized[i];
            let hosted = match lending {
                Some((host, guest)) if guest == id => Some(host),
                _ => None,
            };
            let extra = hosted.map_or(0, |h| config.classes[h.0 as usize].slots);
            let count = spec.slots as u64 + extra as u64;
            if first_slot as u64 + count > MAX_SLOTS as u64 {
                return Err(Error::InvalidConfig(format!(
                    "a pool holds at most {MAX_SLOTS} slots in total"
                )));
            }
            for index in 0..spec.slots {
                info.push(SlotInfo {
                    class: id,
                    index,
                    offset: region_offset + index as u64 * slot_bytes,
                    nbytes: slot_bytes,
                });
            }
            let mut free = FreeBitmap::new(count as u32);
            if let Some(h) = hosted {
                let (host_bytes, host_offset) = sized[h.0 as usize];
                for j in 0..extra {
                    info.push(SlotInfo {
                        class: id,
                        index: spec.slots + j,
                        offset: host_offset + j as u64 * host_bytes,
                        nbytes: slot_bytes,
                    });
                    free.take(spec.slots + j);
                }
            }
            classes.push(SlotClass {
                name: spec.name.clone(),
                slot_bytes,
                region_offset,
                regular: spec.slots,
                first_slot,
                free,
                pending: 0,
                high_water: 0,
                lent: 0,
                offline: extra,
                host_memory: spec.host_memory,
            });
            first_slot += count as u32;
        }
        let budget = match (shared, config.budget) {
            (Some(tracker), _) => tracker,
            (None, Some(0)) => return Err(Error::InvalidConfig("budget must be > 0".into())),
            (None, Some(b)) => std::sync::Arc::new(DeviceBudget::new(b.min(total_bytes))?),
            (None, None) => std::sync::Arc::new(DeviceBudget::new(total_bytes)?),
        };
        let arena = make(total_bytes, align.max(64), host_from)?;
        if arena.len() < total_bytes {
            return Err(Error::InvalidConfig(format!(
                "arena of {} B is smaller than the layout ({total_bytes} B)",
                arena.len()
            )));
        }
        let id = NEXT_POOL_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let n = first_slot as usize;
        let board = SlotBoard {
            pool: id,
            readers: (0..n).map(|_| AtomicU32::new(0)).collect(),
            generation: (0..n).map(|_| AtomicU32::new(0)).collect(),
            info: info.into_boxed_slice(),
        };
        let mut meta = vec![
            SlotMeta {
                state: SlotState::Free,
                table: false,
                views: 0,
            };
            n
        ];
        for c in &classes {
            for j in c.regular..c.free.len() {
                meta[(c.first_slot + j) as usize].state = SlotState::Offline;
            }
        }
        Ok(Self {
            id,
            alignment: align,
            classes,
            by_name,
            meta,
            board: Arc::new(board),
            arena,
            total_bytes,
            host_from,
            budget,
            kv_head_bytes: config.kv_head_bytes,
            lending,
            pending_bytes: 0,
            committed_bytes: 0,
            high_water_bytes: 0,
            host_bytes: 0,
        })
    }

    pub fn id(&self) -> u32 {
        self.id
    }
    pub fn alignment(&self) -> u64 {
        self.alignment
    }
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }
    /// Where the host-memory classes' regions start (`total_bytes` when there are none):
    /// the arena's bytes before it are device memory.
    pub fn host_from(&self) -> u64 {
        self.host_from
    }
    /// The limit of the budget the pool reserves from (shared or its own).
    pub fn budget(&self) -> u64 {
        self.budget.limit()
    }
    /// The tracker the pool reserves its bytes from.
    pub fn budget_tracker(&self) -> &std::sync::Arc<DeviceBudget> {
        &self.budget
    }
    pub fn arena(&self) -> &std::sync::Arc<dyn Arena> {
        &self.arena
    }
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }
    pub fn num_slots(&self) -> u32 {
        self.meta.len() as u32
    }
    pub fn class_names(&self) -> Vec<String> {
        self.classes.iter().map(|c| c.name.clone()).collect()
    }
    pub(crate) fn board(&self) -> &Arc<SlotBoard> {
        &self.board
    }

    /// The class called `name`.
    pub fn class_id(&self, name: &str) -> Result<ClassId> {
        self.by_name
            .get(name)
            .copied()
            .ok_or_else(|| Error::UnknownClass {
                name: name.to_string(),
                known: self.class_names().join(", "),
            })
    }

    fn class(&self, id: ClassId) -> Result<&SlotClass> {
        self.classes
            .get(id.0 as usize)
            .ok_or_else(|| Error::UnknownClass {
                name: format!("#{}", id.0),
                known: self.class_names().join(", "),
            })
    }

    pub fn class_name(&self, id: ClassId) -> Result<&str> {
        Ok(&self.class(id)?.name)
    }
    pub fn slot_bytes(&self, id: ClassId) -> Result<u64> {
        Ok(self.class(id)?.slot_bytes)
    }
    /// Slots that can be live now: lent host slots and offline guest slots excluded.
    pub fn capacity(&self, id: ClassId) -> Result<u32> {
        let c = self.class(id)?;
        Ok(c.free.len() - c.lent - c.offline)
    }
    pub fn free_count(&self, id: ClassId) -> Result<u32> {
        Ok(self.class(id)?.free.free_count())
    }
    /// `(offset, bytes)` of the class region inside the arena.
    pub fn region(&self, id: ClassId) -> Result<(u64, u64)> {
        let c = self.class(id)?;
        Ok((c.region_offset, c.slot_bytes * c.regular as u64))
    }
    /// Bytes at the arena's head kept for the KV pages (no slot's).
    pub fn kv_head_bytes(&self) -> u64 {
        self.kv_head_bytes
    }
    /// The (host, guest) classes of the lending configuration, if any.
    pub fn lending(&self) -> Option<(ClassId, ClassId)> {
        self.lending
    }

    fn lending_of(&self, host: ClassId) -> Result<ClassId> {
        match self.lending {
            Some((h, guest)) if h == host => Ok(guest),
            _ => Err(Error::IllegalLend(format!(
                "class {:?} is not the pool's lending class",
                self.class(host).map_or("?", |c| c.name.as_str())
            ))),
        }
    }

    /// Lend the lowest free slot of the host class to the KV pages: it stops being an
    /// expert slot and its hosted guest slot can be handed out. Costs no budget (the
    /// pages and the guest reserve their bytes as they are used).
    pub fn lend(&mut self, host: ClassId) -> Result<LentSlot> {
        let guest = self.lending_of(host)?;
        let c = &mut self.classes[host.0 as usize];
        let Some(index) = c.free.alloc() else {
            return Err(Error::Exhausted {
                class: c.name.clone(),
                capacity: c.free.len() - c.lent,
            });
        };
        c.lent += 1;
        let host_slot = (c.first_slot + index) as usize;
        self.meta[host_slot].state = SlotState::Lent;
        let g = &mut self.classes[guest.0 as usize];
        let hosted = g.regular + index;
        self.meta[(g.first_slot + hosted) as usize].state = SlotState::Free;
        let ok = g.free.free(hosted);
        debug_assert!(ok, "a hosted slot of an unlent host is offline");
        g.offline -= 1;
        Ok(self.lent_slot(host, index).expect("just lent"))
    }

    /// The lent slot `index` of the host class, if it is lent.
    pub fn lent_slot(&self, host: ClassId, index: u32) -> Option<LentSlot> {
        let guest = self.lending_of(host).ok()?;
        let c = &self.classes[host.0 as usize];
        let slot = c.first_slot.checked_add(index)?;
        if index >= c.free.len() || self.meta[slot as usize].state != SlotState::Lent {
            return None;
        }
        Some(LentSlot {
            index,
            offset: self.board.info[slot as usize].offset,
            nbytes: c.slot_bytes,
            guest_bytes: self.classes[guest.0 as usize].slot_bytes,
        })
    }

    /// Indices of the host class's lent slots, ascending.
    pub fn lent(&self, host: ClassId) -> Vec<u32> {
        let Ok(c) = self.class(host) else {
            return Vec::new();
        };
        (0..c.free.len())
            .filter(|&i| self.meta[(c.first_slot + i) as usize].state == SlotState::Lent)
            .collect()
    }

    /// Whether the lent slot `index` could come back now (its guest slot is free).
    pub fn can_unlend(&self, host: ClassId, index: u32) -> bool {
        self.lent_slot(host, index).is_some_and(|_| {
            let g = &self.classes[self.lending.expect("lent").1 .0 as usize];
            g.free.is_free(g.regular + index)
        })
    }

    /// Take a lent slot back as a free expert slot of the host class. The caller has
    /// taken its pages back from the KV pool; refused while its guest slot is held.
    pub fn unlend(&mut self, host: ClassId, index: u32) -> Result<()> {
        let guest = self.lending_of(host)?;
        if self.lent_slot(host, index).is_none() {
            return Err(Error::IllegalLend(format!("slot {index} is not lent")));
        }
        let g = &mut self.classes[guest.0 as usize];
        let hosted = g.regular + index;
        if !g.free.take(hosted) {
            return Err(Error::IllegalLend(format!(
                "slot {index} hosts a live {:?} slot",
                g.name
            )));
        }
        g.offline += 1;
        self.meta[(g.first_slot + hosted) as usize].state = SlotState::Offline;
        let c = &mut self.classes[host.0 as usize];
        c.lent -= 1;
        self.meta[(c.first_slot + index) as usize].state = SlotState::Free;
        let ok = c.free.free(index);
        debug_assert!(ok, "a lent slot is not in the free list");
        Ok(())
    }
    /// Device bytes reserved (pending + committed); host-memory slots are not counted.
    pub fn reserved_bytes(&self) -> u64 {
        self.pending_bytes + self.committed_bytes
    }

    fn budget_take(
        &self,
        charged: bool,
        need: u64,
    ) -> std::result::Result<(), crate::budget::BudgetSnapshot> {
        if charged {
            self.budget.try_take(BudgetUse::Experts, need)
        } else {
            Ok(())
        }
    }

    /// Allocate a committed block (lowest free index of the class).
    pub fn alloc(&mut self, class: ClassId) -> Result<Block> {
        self.take(class, SlotState::Committed)
    }

    /// Reserve a block for a copy in flight: counted as pending until `commit`.
    pub fn try_reserve(&mut self, class: ClassId) -> Result<Block> {
        self.take(class, SlotState::Pending)
    }

    fn take(&mut self, class: ClassId, state: SlotState) -> Result<Block> {
        let c = self.class(class)?;
        if c.free.free_count() == 0 {
            return Err(Error::Exhausted {
                class: c.name.clone(),
                capacity: c.free.len() - c.lent - c.offline,
            });
        }
        let need = c.slot_bytes;
        let charged = !c.host_memory;
        if let Err(snap) = self.budget_take(charged, need) {
            return Err(Error::BudgetExceeded {
                class: c.name.clone(),
                need,
                reserved: snap.charged(),
                budget: snap.limit,
            });
        }
        let c = &mut self.classes[class.0 as usize];
        let index = c.free.alloc().expect("free_count > 0 implies a free index");
        let slot = (c.first_slot + index) as usize;
        let live = c.free.len() - c.lent - c.offline - c.free.free_count();
        c.high_water = c.high_water.max(live);
        let (offset, nbytes) = (self.board.info[slot].offset, c.slot_bytes);
        // The byte counters are the device budget's: host-memory slots count apart.
        let device = if c.host_memory {
            self.host_bytes += nbytes;
            0
        } else {
            nbytes
        };
        if state == SlotState::Pending {
            c.pending += 1;
            self.pending_bytes += device;
        } else {
            self.committed_bytes += device;
        }
        self.high_water_bytes = self.high_water_bytes.max(self.reserved_bytes());
        self.meta[slot] = SlotMeta {
            state,
            table: false,
            views: 0,
        };
        let generation = self.board.generation[slot]
            .load(Ordering::Relaxed)
            .wrapping_add(1);
        self.board.generation[slot].store(generation, Ordering::Relaxed);
        Ok(Block {
            pool: self.id,
            class,
            index,
            generation,
            offset,
            nbytes,
        })
    }

    /// Global slot number of a live block, after checking that `b` is exactly the block
    /// this pool handed out last for that slot.
    pub(crate) fn check_live(&self, b: &Block) -> Result<u32> {
        if b.pool != self.id {
            return Err(Error::ForeignBlock(format!(
                "the block was handed out by pool #{}, this is pool #{}",
                b.pool, self.id
            )));
        }
        let c = self
            .classes
            .get(b.class.0 as usize)
            .ok_or_else(|| Error::ForeignBlock(format!("no slot class #{}", b.class.0)))?;
        let slot = c.first_slot + b.index;
        if b.index >= c.free.len()
            || b.offset != self.board.info[slot as usize].offset
            || b.nbytes != c.slot_bytes
        {
            return Err(Error::ForeignBlock(format!(
                "slot {} (offset {}, {} B) does not exist in class {:?}",
                b.index, b.offset, b.nbytes, c.name
            )));
        }
        let current = self.board.generation[slot as usize].load(Ordering::Relaxed);
        let held = matches!(
            self.meta[slot as usize].state,
            SlotState::Pending | SlotState::Committed
        );
        if !held || current != b.generation {
            return Err(Error::DoubleFree {
                class: c.name.clone(),
                index: b.index,
            });
        }
        Ok(slot)
    }

    /// Mark a pending block as committed (its copy finished).
    pub fn commit(&mut self, b: &Block) -> Result<()> {
        let slot = self.check_live(b)? as usize;
        if self.meta[slot].state != SlotState::Pending {
            return Err(Error::NotPending {
                class: self.classes[b.class.0 as usize].name.clone(),
                index: b.index,
            });
        }
        self.meta[slot].state = SlotState::Committed;
        let c = &mut self.classes[b.class.0 as usize];
        c.pending -= 1;
        if !c.host_memory {
            self.pending_bytes -= b.nbytes;
            self.committed_bytes += b.nbytes;
        }
        Ok(())
    }

    /// Return a block the caller owns. Refuses double frees, foreign blocks, blocks with a
    /// live view and blocks owned by the expert table. (Lease counters are not consulted:
    /// leases only ever pin table-owned blocks, and a reader backing off a stale word may
    /// bump a reused slot's counter for an instant.)
    pub fn free(&mut self, b: Block) -> Result<()> {
        let slot = self.check_live(&b)?;
        let name = || self.classes[b.class.0 as usize].name.clone();
        let meta = self.meta[slot as usize];
        if meta.table {
            return Err(Error::OwnedByTable {
                class: name(),
                index: b.index,
            });
        }
        if meta.views > 0 {
            return Err(Error::BlockLeased {
                class: name(),
                index: b.index,
                readers: meta.views,
            });
        }
        self.release(slot, &b);
        Ok(())
    }

    /// Register a writable view of a caller-owned block (the table's blocks are viewed
    /// only through leases, read-only): `free` refuses the block until `unpin_view`.
    pub fn pin_view(&mut self, b: &Block) -> Result<()> {
        let slot = self.check_live(b)? as usize;
        if self.meta[slot].table {
            return Err(Error::OwnedByTable {
                class: self.classes[b.class.0 as usize].name.clone(),
                index: b.index,
            });
        }
        self.meta[slot].views += 1;
        Ok(())
    }

    /// The view registered by `pin_view` is gone.
    pub fn unpin_view(&mut self, b: &Block) {
        if let Ok(slot) = self.check_live(b) {
            let v = &mut self.meta[slot as usize].views;
            *v = v.saturating_sub(1);
        }
    }

    /// Whether the table owns `b` and it is still being filled (pending): its bytes are
    /// being written by a copy.
    pub fn is_table_pending(&self, b: &Block) -> bool {
        self.check_live(b).is_ok_and(|slot| {
            let m = self.meta[slot as usize];
            m.table && m.state == SlotState::Pending
        })
    }

    /// Free on behalf of the table (its retire rule already checked the leases).
    pub(crate) fn free_owned(&mut self, b: &Block) -> Result<()> {
        let slot = self.check_live(b)?;
        self.release(slot, b);
        Ok(())
    }

    pub(crate) fn set_table_owned(&mut self, b: &Block, owned: bool) -> Result<()> {
        let slot = self.check_live(b)?;
        self.meta[slot as usize].table = owned;
        Ok(())
    }

    fn release(&mut self, slot: u32, b: &Block) {
        let m = &mut self.meta[slot as usize];
        let c = &mut self.classes[b.class.0 as usize];
        let device = if c.host_memory {
            self.host_bytes -= b.nbytes;
            0
        } else {
            b.nbytes
        };
        match m.state {
            SlotState::Pending => {
                c.pending -= 1;
                self.pending_bytes -= device;
            }
            SlotState::Committed => self.committed_bytes -= device,
            SlotState::Free | SlotState::Lent | SlotState::Offline => {
                unreachable!("check_live rejects slots that are not held")
            }
        }
        if device > 0 {
            self.budget.give(BudgetUse::Experts, device);
        }
        *m = SlotMeta {
            state: SlotState::Free,
            table: false,
            views: 0,
        };
        let ok = c.free.free(b.index);
        debug_assert!(ok, "slot state and bitmap disagree");
    }

    /// Whether `b` is live (handed out and not freed since).
    pub fn is_live(&self, b: &Block) -> bool {
        self.check_live(b).is_ok()
    }

    /// Host pointer to the first byte of `b`, if the arena is host memory and `b` is live.
    pub fn host_ptr(&self, b: &Block) -> Result<Option<NonNull<u8>>> {
        self.check_live(b)?;
        Ok(self.arena.host_ptr().map(|p| {
            // SAFETY: `check_live` proved offset + nbytes lies inside the layout, and the
            // arena is at least `total_bytes` long (checked at construction).
            unsafe { NonNull::new_unchecked(p.as_ptr().add(b.offset as usize)) }
        }))
    }

    /// Number of leases currently held on `b`'s slot.
    pub fn readers(&self, b: &Block) -> Result<u32> {
        let slot = self.check_live(b)?;
        Ok(self.board.readers[slot as usize].load(Ordering::SeqCst))
    }

    pub fn class_stats(&self, id: ClassId) -> Result<ClassStats> {
        let c = self.class(id)?;
        let capacity = c.free.len() - c.lent - c.offline;
        let free = c.free.free_count();
        Ok(ClassStats {
            name: c.name.clone(),
            slot_bytes: c.slot_bytes,
            capacity,
            lent: c.lent,
            free,
            live: capacity - free,
            pending: c.pending,
            committed: capacity - free - c.pending,
            high_water: c.high_water,
            region_offset: c.region_offset,
            region_bytes: c.slot_bytes * c.regular as u64,
            host_memory: c.host_memory,
        })
    }

    pub fn stats(&self) -> PoolStats {
        PoolStats {
            total_bytes: self.total_bytes,
            budget: self.budget.limit(),
            reserved_bytes: self.reserved_bytes(),
            pending_bytes: self.pending_bytes,
            committed_bytes: self.committed_bytes,
            high_water_bytes: self.high_water_bytes,
            host_bytes: self.host_bytes,
            host_from: self.host_from,
            classes: (0..self.classes.len())
                .map(|i| self.class_stats(ClassId(i as u16)).expect("valid id"))
                .collect(),
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn pool(slots: u32) -> ExpertPool {
        ExpertPool::new(&PoolConfig::new(vec![
            ClassSpec::new("hi", 1000, slots),
            ClassSpec::new("lo", 300, slots),
        ]))
        .unwrap()
    }

    #[test]
    fn bitmap_lowest_first_and_double_free() {
        for n in [1u32, 63, 64, 65, 4096, 4097, 300_000] {
            let mut b = FreeBitmap::new(n);
            for i in 0..n.min(5000) {
                assert_eq!(b.alloc(), Some(i));
            }
            if n <= 5000 {
                assert_eq!(b.alloc(), None);
            }
            assert!(b.free(n.min(5000) / 2));
            assert!(!b.free(n.min(5000) / 2));
            assert!(!b.free(n));
            assert_eq!(b.alloc(), Some(n.min(5000) / 2));
        }
    }

    #[test]
    fn sizes_round_up_and_regions_are_disjoint() {
        let p = pool(3);
        let hi = p.class_id("hi").unwrap();
        let lo = p.class_id("lo").unwrap();
        assert_eq!(p.slot_bytes(hi).unwrap(), 1024);
        assert_eq!(p.slot_bytes(lo).unwrap(), 512);
        assert_eq!(p.region(hi).unwrap(), (0, 3072));
        assert_eq!(p.region(lo).unwrap(), (3072, 1536));
        assert_eq!(p.total_bytes(), 4608);
        assert_eq!(p.arena().base_address() % 256, 0);
    }

    #[test]
    fn errors_are_reported() {
        let mut p = pool(1);
        let hi = p.class_id("hi").unwrap();
        assert!(matches!(p.class_id("mid"), Err(Error::UnknownClass { .. })));
        let b = p.alloc(hi).unwrap();
        assert!(matches!(p.alloc(hi), Err(Error::Exhausted { .. })));
        p.free(b).unwrap();
        assert!(matches!(p.free(b), Err(Error::DoubleFree { .. })));
        let b2 = p.alloc(hi).unwrap();
        assert_eq!(b2.offset, b.offset);
        // A stale handle to a reallocated slot is a double free, not a free of b2.
        assert!(matches!(p.free(b), Err(Error::DoubleFree { .. })));
        let mut other = pool(1);
        let ob = other.alloc(hi).unwrap();
        assert!(matches!(p.free(ob), Err(Error::ForeignBlock(_))));
        for bad in [
            PoolConfig::new(vec![]),
            PoolConfig::new(vec![ClassSpec::new("a", 0, 1)]),
            PoolConfig::new(vec![ClassSpec::new("a", 1, 0)]),
            PoolConfig::new(vec![ClassSpec::new("a", 1, 1), ClassSpec::new("a", 1, 1)]),
            PoolConfig::new(vec![ClassSpec::new("a", 1, 1)]).alignment(3),
        ] {
            assert!(
                matches!(ExpertPool::new(&bad), Err(Error::InvalidConfig(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn budget_tracker_counts_pending_and_committed() {
        let cfg = PoolConfig::new(vec![ClassSpec::new("a", 256, 4)]).budget(Some(600));
        let mut p = ExpertPool::new(&cfg).unwrap();
        let a = p.class_id("a").unwrap();
        let r = p.try_reserve(a).unwrap();
        assert_eq!(p.stats().pending_bytes, 256);
        let c = p.alloc(a).unwrap();
        assert_eq!(p.reserved_bytes(), 512);
        assert!(matches!(
            p.try_reserve(a),
            Err(Error::BudgetExceeded { .. })
        ));
        p.commit(&r).unwrap();
        assert!(matches!(p.commit(&r), Err(Error::NotPending { .. })));
        assert_eq!(p.stats().committed_bytes, 512);
        p.free(c).unwrap();
        p.free(r).unwrap();
        assert_eq!(p.reserved_bytes(), 0);
        assert_eq!(p.stats().high_water_bytes, 512);
    }
    #[test]
    fn host_memory_classes_form_the_tail_and_reserve_no_budget() {
        // The host class is given first; its region still comes after the device ones.
        let cfg = PoolConfig::new(vec![
            ClassSpec::new("lo_s", 256, 1).in_host_memory(),
            ClassSpec::new("lo", 256, 2),
            ClassSpec::new("hi", 1024, 1),
        ])
        .budget(Some(2 * 256 + 1024));
        let mut p = ExpertPool::new(&cfg).unwrap();
        let (s, lo, hi) = (
            p.class_id("lo_s").unwrap(),
            p.class_id("lo").unwrap(),
            p.class_id("hi").unwrap(),
        );
        assert_eq!(p.host_from(), 2 * 256 + 1024);
        assert_eq!(p.total_bytes(), p.host_from() + 256);
        assert_eq!(p.region(s).unwrap(), (p.host_from(), 256));
        assert_eq!(p.region(lo).unwrap().0, 0);
        // The device classes fill the budget; the host slot still fits beside them.
        let held = [
            p.alloc(lo).unwrap(),
            p.alloc(lo).unwrap(),
            p.alloc(hi).unwrap(),
        ];
        assert_eq!(p.reserved_bytes(), 2 * 256 + 1024);
        let b = p.try_reserve(s).unwrap();
        assert_eq!(b.offset, p.host_from());
        assert_eq!(
            (p.reserved_bytes(), p.stats().host_bytes),
            (2 * 256 + 1024, 256)
        );
        assert_eq!(p.budget_tracker().snapshot().charged(), 2 * 256 + 1024);
        p.commit(&b).unwrap();
        assert_eq!(p.stats().pending_bytes, 0);
        assert!(p.stats().classes[s.0 as usize].host_memory);
        // Freeing a device block gives its bytes back; the host block gives none.
        p.free(held[0]).unwrap();
        assert_eq!(p.reserved_bytes(), 256 + 1024);
        p.free(b).unwrap();
        assert_eq!((p.reserved_bytes(), p.stats().host_bytes), (256 + 1024, 0));
        assert_eq!(p.budget_tracker().snapshot().charged(), 256 + 1024);
        // Without host classes the tail is empty.
        let plain = ExpertPool::new(&PoolConfig::new(vec![ClassSpec::new("a", 256, 2)])).unwrap();
        assert_eq!(plain.host_from(), plain.total_bytes());
    }
    #[test]
    fn a_host_memory_class_cannot_be_lent_or_host_a_lent_slot() {
        for (host, guest) in [("hi", "lo_s"), ("hi_s", "lo")] {
            let cfg = PoolConfig::new(vec![
                ClassSpec::new("lo", 256, 2),
                ClassSpec::new("lo_s", 256, 1).in_host_memory(),
                ClassSpec::new("hi", 1024, 2),
                ClassSpec::new("hi_s", 1024, 1).in_host_memory(),
            ])
            .lending(host, guest);
            let err = ExpertPool::new(&cfg).unwrap_err().to_string();
            assert!(err.contains("must be device memory"), "{err}");
        }
    }
    #[test]
    fn lent_slots_host_a_guest_and_come_back_only_when_it_is_free() {
        let cfg = PoolConfig::new(vec![
            ClassSpec::new("lo", 256, 2),
            ClassSpec::new("hi", 1024, 3),
        ])
        .kv_head_bytes(600)
        .lending("hi", "lo");
        let mut p = ExpertPool::new(&cfg).unwrap();
        let (lo, hi) = (p.class_id("lo").unwrap(), p.class_id("hi").unwrap());
        // The KV head comes first (rounded to the alignment), then the regions.
        assert_eq!(p.region(lo).unwrap(), (768, 512));
        assert_eq!(p.region(hi).unwrap(), (1280, 3072));
        assert_eq!(p.total_bytes(), 768 + 512 + 3072);
        assert_eq!(p.capacity(lo).unwrap(), 2);
        let a = p.alloc(lo).unwrap();
        let b = p.alloc(lo).unwrap();
        assert!(matches!(p.alloc(lo), Err(Error::Exhausted { .. })));
        let h0 = p.alloc(hi).unwrap();
        // Lending takes the lowest free host slot; its head becomes a guest slot.
        let lent = p.lend(hi).unwrap();
        assert_eq!((lent.index, lent.offset), (1, 1280 + 1024));
        assert_eq!(lent.kv_range(), (1280 + 1024 + 256, 768));
        assert_eq!(p.capacity(hi).unwrap(), 2);
        assert_eq!(p.lent(hi), vec![1]);
        let g = p.alloc(lo).unwrap();
        assert_eq!((g.index, g.offset), (3, lent.offset));
        assert!(p.host_ptr(&g).unwrap().is_some());
        assert!(!p.can_unlend(hi, 1));
        assert!(matches!(p.unlend(hi, 1), Err(Error::IllegalLend(_))));
        assert!(matches!(p.unlend(hi, 0), Err(Error::IllegalLend(_))));
        assert!(matches!(p.lend(lo), Err(Error::IllegalLend(_))));
        // The next host slot is taken by an expert: slot 1 stays lent, 2 is free.
        let h2 = p.alloc(hi).unwrap();
        assert_eq!(h2.index, 2);
        assert!(matches!(p.lend(hi), Err(Error::Exhausted { .. })));
        p.free(g).unwrap();
        assert!(p.can_unlend(hi, 1));
        p.unlend(hi, 1).unwrap();
        assert!(p.lent(hi).is_empty());
        // The guest went offline with its host: the guest class is full again.
        assert!(matches!(p.alloc(lo), Err(Error::Exhausted { .. })));
        assert_eq!(p.alloc(hi).unwrap().index, 1);
        let st = p.class_stats(lo).unwrap();
        assert_eq!((st.capacity, st.live, st.free), (2, 2, 0));
        for x in [a, b, h0, h2] {
            p.free(x).unwrap();
        }
        for bad in [
            PoolConfig::new(vec![ClassSpec::new("a", 1, 1)]).lending("a", "b"),
            PoolConfig::new(vec![ClassSpec::new("a", 1, 1)]).lending("a", "a"),
            PoolConfig::new(vec![
                ClassSpec::new("a", 512, 1),
                ClassSpec::new("b", 256, 1),
            ])
            .lending("b", "a"),
        ] {
            assert!(matches!(
                ExpertPool::new(&bad),
                Err(Error::InvalidConfig(_))
            ));
        }
    }
}
