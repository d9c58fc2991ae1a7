//! The host tier store: the packed bytes of every tier of every expert, which the copy
//! engine reads asynchronously. Two backings:
//!
//! - **resident** ([`HostStore::new`], [`HostStore::with_arena`]): one arena holding every
//!   (expert, tier), ordinary aligned memory on the CPU backend or pinned memory that the
//!   CUDA backend copies from directly. Filled once at load time, then frozen: read-only for
//!   the rest of its life, which is what lets copies read it without locks.
//! - **mapped** ([`HostStore::mapped`]): the tiered checkpoint's files memory-mapped
//!   read-only, so host memory holds only the pages the page cache keeps (the hot part),
//!   plus a bounded [`StagingRing`] of pinned (or plain) slots. A copy first fills a
//!   staging slot from the mapping ([`HostStore::stage`]) and the backend reads the slot;
//!   the slot returns to the ring when its guard drops, which the engine does only once the
//!   copy has ended. Born frozen.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::errors::{Error, Result};
use crate::pool::{Arena, ArenaKind, HostArena};

// ---------------------------------------------------------------------------------------
// Memory-mapped files

/// A file mapped read-only, seen as a host arena (the store only ever reads it).
pub struct MappedArena {
    map: memmap2::Mmap,
    path: PathBuf,
}

impl MappedArena {
    /// Map `path` read-only.
    ///
    /// The file must not be modified or truncated while mapped (a tiered checkpoint's
    /// files are written to a temporary name and renamed into place complete, and nothing
    /// rewrites them afterwards).
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path)
            .map_err(|e| Error::InvalidConfig(format!("{}: cannot open: {e}", path.display())))?;
        let len = file
            .metadata()
            .map_err(|e| Error::InvalidConfig(format!("{}: {e}", path.display())))?
            .len();
        if len == 0 {
            return Err(Error::InvalidConfig(format!(
                "{}: empty file, nothing to map",
                path.display()
            )));
        }
        // SAFETY: the mapping is read-only and private to this process; its bytes are
        // only read (through `bytes` / `stage` and read-only views). Soundness needs the
        // file to stay unchanged while mapped, which the tiered checkpoint guarantees
        // (files are renamed into place complete and never rewritten; documented above).
        let map = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| Error::InvalidConfig(format!("{}: cannot map: {e}", path.display())))?;
        Ok(Self {
            map,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl std::fmt::Debug for MappedArena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "MappedArena({}, {} B)",
            self.path.display(),
            self.map.len()
        )
    }
}

impl Arena for MappedArena {
    fn kind(&self) -> ArenaKind {
        ArenaKind::Host
    }
    fn len(&self) -> u64 {
        self.map.len() as u64
    }
    fn base_address(&self) -> u64 {
        self.map.as_ptr() as u64
    }
    fn host_ptr(&self) -> Option<NonNull<u8>> {
        // The pointer is mutable only by type: the store never writes a mapped arena
        // (a mapped store is born frozen, so `write` refuses, and its views are read-only).
        NonNull::new(self.map.as_ptr() as *mut u8)
    }
}

// ---------------------------------------------------------------------------------------
// The staging ring

struct RingInner {
    arena: Arc<dyn Arena>,
    slot_bytes: u64,
    in_use: Mutex<Vec<bool>>,
    acquired: AtomicU64,
    peak: AtomicU64,
}

/// A bounded set of equal staging slots (pinned memory on the CUDA backend) that copies
/// from a mapped store pass through. `acquire` hands out the lowest free slot, exclusively,
/// until its [`StagingSlot`] guard drops; a full ring refuses (never blocks).
#[derive(Clone)]
pub struct StagingRing {
    inner: Arc<RingInner>,
}

impl std::fmt::Debug for StagingRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagingRing")
            .field("slots", &self.slots())
            .field("slot_bytes", &self.inner.slot_bytes)
            .finish()
    }
}

impl StagingRing {
    /// `slots` slots of `slot_bytes` each (rounded up to `alignment`), in memory made by
    /// `make(len, align)`.
    pub fn new(
        slots: u32,
        slot_bytes: u64,
        alignment: u64,
        make: impl FnOnce(u64, u64) -> Result<Arc<dyn Arena>>,
    ) -> Result<Self> {
        if slots == 0 || slot_bytes == 0 {
            return Err(Error::InvalidConfig(
                "a staging ring needs at least one slot of at least one byte".into(),
            ));
        }
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(Error::InvalidConfig(format!(
                "alignment must be a power of two, got {alignment}"
            )));
        }
        let slot_bytes = slot_bytes.div_ceil(alignment) * alignment;
        let len = slot_bytes
            .checked_mul(u64::from(slots))
            .ok_or_else(|| Error::InvalidConfig("staging ring size overflows".into()))?;
        let arena = make(len, alignment.max(64))?;
        if arena.host_ptr().is_none() || arena.len() < len {
            return Err(Error::InvalidConfig(
                "the staging ring needs host memory of its size".into(),
            ));
        }
        Ok(Self {
            inner: Arc::new(RingInner {
                arena,
                slot_bytes,
                in_use: Mutex::new(vec![false; slots as usize]),
                acquired: AtomicU64::new(0),
                peak: AtomicU64::new(0),
            }),
        })
    }

    /// A ring in ordinary aligned host memory.
    pub fn host(slots: u32, slot_bytes: u64, alignment: u64) -> Result<Self> {
        Self::new(slots, slot_bytes, alignment, |len, align| {
            Ok(Arc::new(HostArena::new(len, align)?) as Arc<dyn Arena>)
        })
    }

    pub fn slots(&self) -> u32 {
        crate::sync::lock(&self.inner.in_use).len() as u32
    }
    pub fn slot_bytes(&self) -> u64 {
        self.inner.slot_bytes
    }
    /// Bytes of memory the ring holds (slots x slot bytes).
    pub fn total_bytes(&self) -> u64 {
        self.inner.arena.len()
    }
    pub fn arena(&self) -> &Arc<dyn Arena> {
        &self.inner.arena
    }
    /// Slots handed out now.
    pub fn in_use(&self) -> u32 {
        crate::sync::lock(&self.inner.in_use)
            .iter()
            .filter(|&&u| u)
            .count() as u32
    }
    /// Most slots ever handed out at once.
    pub fn peak_in_use(&self) -> u32 {
        self.inner.peak.load(Ordering::Relaxed) as u32
    }
    /// Slots handed out so far, in total.
    pub fn acquisitions(&self) -> u64 {
        self.inner.acquired.load(Ordering::Relaxed)
    }

    /// The lowest free slot, or `Error::Exhausted` when every slot is handed out.
    pub fn acquire(&self) -> Result<StagingSlot> {
        let mut in_use = crate::sync::lock(&self.inner.in_use);
        let Some(index) = in_use.iter().position(|&u| !u) else {
            return Err(Error::Exhausted {
                class: "host staging ring".into(),
                capacity: in_use.len() as u32,
            });
        };
        in_use[index] = true;
        let now = in_use.iter().filter(|&&u| u).count() as u64;
        self.inner.peak.fetch_max(now, Ordering::Relaxed);
        self.inner.acquired.fetch_add(1, Ordering::Relaxed);
        Ok(StagingSlot {
            ring: self.inner.clone(),
            index: index as u32,
            len: 0,
        })
    }
}

/// Exclusive use of one staging slot until dropped. It holds `len` valid bytes (set by
/// `fill`); the engine keeps the guard until the copy reading it has ended.
pub struct StagingSlot {
    ring: Arc<RingInner>,
    index: u32,
    len: usize,
}

impl std::fmt::Debug for StagingSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StagingSlot({}, {} B)", self.index, self.len)
    }
}

impl StagingSlot {
    pub fn index(&self) -> u32 {
        self.index
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    fn base(&self) -> NonNull<u8> {
        let base = self.ring.arena.host_ptr().expect("checked at construction");
        // SAFETY: index < slots and the arena holds slots x slot_bytes bytes (checked at
        // construction), so the slot's first byte lies inside the arena.
        unsafe {
            NonNull::new_unchecked(
                base.as_ptr()
                    .add((u64::from(self.index) * self.ring.slot_bytes) as usize),
            )
        }
    }
    /// Address of the slot's first byte (what a copy backend reads).
    pub fn as_ptr(&self) -> *const u8 {
        self.base().as_ptr()
    }
    /// Copy `src` into the slot (it must fit); the slot then holds `src.len()` bytes.
    pub fn fill(&mut self, src: &[u8]) -> Result<()> {
        if src.len() as u64 > self.ring.slot_bytes {
            return Err(Error::InvalidConfig(format!(
                "{} B do not fit a {} B staging slot",
                src.len(),
                self.ring.slot_bytes
            )));
        }
        // SAFETY: this guard is the slot's only owner (the ring hands an index to one
        // guard at a time, under its lock) and `&mut self` excludes readers through this
        // guard, so nothing reads or writes the slot's bytes meanwhile; the slot has
        // `slot_bytes >= src.len()` bytes at `base()`; `src` is another allocation.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.base().as_ptr(), src.len()) };
        self.len = src.len();
        Ok(())
    }
    /// The slot's valid bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the slot's first `len <= slot_bytes` bytes were written by `fill`; only
        // this guard writes them, and not while this shared borrow lives.
        unsafe { std::slice::from_raw_parts(self.base().as_ptr(), self.len) }
    }
}

impl Drop for StagingSlot {
    fn drop(&mut self) {
        crate::sync::lock(&self.ring.in_use)[self.index as usize] = false;
    }
}

// ---------------------------------------------------------------------------------------
// The store

/// Where one layer's tier lives in a mapped store: expert e's bytes start at
/// `offset + e * stride` in file `file`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MappedTier {
    pub file: u32,
    pub offset: u64,
    pub stride: u64,
}

/// Packed bytes of every (layer, expert, tier).
pub struct HostStore {
    /// Resident: one arena. Mapped: one mapped file each.
    arenas: Vec<Arc<dyn Arena>>,
    /// First entry of each layer, plus the total.
    layer_base: Vec<u32>,
    /// Packed size of each tier, per layer.
    tier_bytes: Vec<Vec<u64>>,
    /// (arena, offset) of (entry, tier): `loc[entry][tier]`.
    loc: Vec<Vec<(u32, u64)>>,
    /// Which (entry, tier) has been written.
    written: Mutex<Vec<Vec<bool>>>,
    frozen: AtomicBool,
    /// Mapped stores only: what every copy passes through.
    staging: Option<StagingRing>,
}

impl std::fmt::Debug for HostStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostStore")
            .field("entries", &(self.layer_base.last().copied().unwrap_or(0)))
            .field("mapped", &self.is_mapped())
            .field("bytes", &self.total_bytes())
            .finish()
    }
}

fn check_shape(experts: &[u32], tier_bytes: &[Vec<u64>]) -> Result<Vec<u32>> {
    if experts.is_empty() || experts.len() != tier_bytes.len() {
        return Err(Error::InvalidConfig(format!(
            "the store needs one tier-size list per layer ({} layers, {} lists)",
            experts.len(),
            tier_bytes.len()
        )));
    }
    let mut layer_base = Vec::with_capacity(experts.len() + 1);
    let mut entries = 0u32;
    for (l, (&n, sizes)) in experts.iter().zip(tier_bytes).enumerate() {
        if n == 0 || sizes.is_empty() || sizes.contains(&0) {
            return Err(Error::InvalidConfig(format!(
                "layer {l}: experts and every tier size must be > 0"
            )));
        }
        layer_base.push(entries);
        entries = entries
            .checked_add(n)
            .ok_or_else(|| Error::InvalidConfig("too many experts".into()))?;
    }
    layer_base.push(entries);
    Ok(layer_base)
}

impl HostStore {
    /// `experts[l]` experts in layer l, each with `tier_bytes[l][t]` packed bytes per tier.
    /// Every (entry, tier) starts at a multiple of `alignment`.
    pub fn new(experts: &[u32], tier_bytes: &[Vec<u64>], alignment: u64) -> Result<Self> {
        Self::with_arena(experts, tier_bytes, alignment, |len, align| {
            Ok(Arc::new(HostArena::new(len, align)?) as Arc<dyn Arena>)
        })
    }

    /// Like `new`, over host memory made by `make(len, align)` (e.g. pinned memory).
    pub fn with_arena(
        experts: &[u32],
        tier_bytes: &[Vec<u64>],
        alignment: u64,
        make: impl FnOnce(u64, u64) -> Result<Arc<dyn Arena>>,
    ) -> Result<Self> {
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(Error::InvalidConfig(format!(
                "alignment must be a power of two, got {alignment}"
            )));
        }
        let layer_base = check_shape(experts, tier_bytes)?;
        let mut loc = Vec::new();
        let mut total = 0u64;
        for (&n, sizes) in experts.iter().zip(tier_bytes) {
            for _ in 0..n {
                let mut row = Vec::with_capacity(sizes.len());
                for &s in sizes {
                    row.push((0, total));
                    total = total
                        .checked_add(s.div_ceil(alignment) * alignment)
                        .ok_or_else(|| Error::InvalidConfig("store size overflows".into()))?;
                }
                loc.push(row);
            }
        }
        let arena = make(total, alignment.max(64))?;
        if arena.host_ptr().is_none() || arena.len() < total {
            return Err(Error::InvalidConfig(
                "the host store needs host memory of the layout's size".into(),
            ));
        }
        let written = loc.iter().map(|r| vec![false; r.len()]).collect();
        Ok(Self {
            arenas: vec![arena],
            layer_base,
            tier_bytes: tier_bytes.to_vec(),
            loc,
            written: Mutex::new(written),
            frozen: AtomicBool::new(false),
            staging: None,
        })
    }

    /// A store over memory-mapped files: `tiers[l][t]` says where layer l's tier t lives
    /// in `files`; every copy passes through `staging`. Every location is checked to lie
    /// inside its file. The store is frozen from the start (files are read-only).
    pub fn mapped(
        experts: &[u32],
        tier_bytes: &[Vec<u64>],
        files: &[PathBuf],
        tiers: &[Vec<MappedTier>],
        staging: StagingRing,
    ) -> Result<Self> {
        let layer_base = check_shape(experts, tier_bytes)?;
        if tiers.len() != experts.len() {
            return Err(Error::InvalidConfig(format!(
                "one location list per layer: {} layers, {} lists",
                experts.len(),
                tiers.len()
            )));
        }
        if files.is_empty() {
            return Err(Error::InvalidConfig("a mapped store needs files".into()));
        }
        let arenas = files
            .iter()
            .map(|p| Ok(Arc::new(MappedArena::open(p)?) as Arc<dyn Arena>))
            .collect::<Result<Vec<_>>>()?;
        let mut loc: Vec<Vec<(u32, u64)>> = Vec::new();
        for (l, ((&n, sizes), places)) in experts.iter().zip(tier_bytes).zip(tiers).enumerate() {
            if places.len() != sizes.len() {
                return Err(Error::InvalidConfig(format!(
                    "layer {l}: {} tiers but {} locations",
                    sizes.len(),
                    places.len()
                )));
            }
            for (t, (&size, p)) in sizes.iter().zip(places).enumerate() {
                let arena = arenas.get(p.file as usize).ok_or_else(|| {
                    Error::InvalidConfig(format!(
                        "layer {l} tier {t}: file {} of {}",
                        p.file,
                        files.len()
                    ))
                })?;
                if p.stride < size {
                    return Err(Error::InvalidConfig(format!(
                        "layer {l} tier {t}: stride {} < {size} B per expert",
                        p.stride
                    )));
                }
                let end = u64::from(n - 1)
                    .checked_mul(p.stride)
                    .and_then(|x| x.checked_add(p.offset))
                    .and_then(|x| x.checked_add(size));
                let fits = matches!(end, Some(e) if e <= arena.len());
                if !fits {
                    return Err(Error::InvalidConfig(format!(
                        "layer {l} tier {t}: {n} experts of {size} B at offset {} stride {} \
                         run past the end of {} ({} B)",
                        p.offset,
                        p.stride,
                        files[p.file as usize].display(),
                        arena.len()
                    )));
                }
            }
            for e in 0..u64::from(n) {
                loc.push(
                    places
                        .iter()
                        .map(|p| (p.file, p.offset + e * p.stride))
                        .collect(),
                );
            }
        }
        let max_tier = tier_bytes.iter().flatten().copied().max().unwrap_or(0);
        if staging.slot_bytes() < max_tier {
            return Err(Error::InvalidConfig(format!(
                "staging slots of {} B cannot hold the largest tier ({max_tier} B)",
                staging.slot_bytes()
            )));
        }
        let written = loc.iter().map(|r| vec![true; r.len()]).collect();
        Ok(Self {
            arenas,
            layer_base,
            tier_bytes: tier_bytes.to_vec(),
            loc,
            written: Mutex::new(written),
            frozen: AtomicBool::new(true),
            staging: Some(staging),
        })
    }

    fn entry(&self, layer: u32, expert: u32, tier: u8) -> Result<usize> {
        let layers = self.layer_base.len() - 1;
        if layer as usize >= layers {
            return Err(Error::OutOfRange(format!(
                "layer {layer} (the store has {layers} layers)"
            )));
        }
        let n = self.layer_base[layer as usize + 1] - self.layer_base[layer as usize];
        if expert >= n {
            return Err(Error::OutOfRange(format!(
                "expert {expert} of layer {layer} (the layer has {n} experts)"
            )));
        }
        let tiers = self.tier_bytes[layer as usize].len();
        if tier as usize >= tiers {
            return Err(Error::OutOfRange(format!(
                "tier {tier} (layer {layer} has {tiers} tiers)"
            )));
        }
        Ok((self.layer_base[layer as usize] + expert) as usize)
    }

    pub fn num_layers(&self) -> u32 {
        (self.layer_base.len() - 1) as u32
    }
    /// Bytes of the store's backing: resident memory, or the mapped files' sizes.
    pub fn total_bytes(&self) -> u64 {
        self.arenas.iter().map(|a| a.len()).sum()
    }
    /// True for a store over memory-mapped files.
    pub fn is_mapped(&self) -> bool {
        self.staging.is_some()
    }
    /// Bytes held in host memory by the store itself (resident arena or staging ring).
    pub fn resident_bytes(&self) -> u64 {
        match &self.staging {
            Some(r) => r.total_bytes(),
            None => self.total_bytes(),
        }
    }
    pub fn staging(&self) -> Option<&StagingRing> {
        self.staging.as_ref()
    }
    /// The resident store's arena (the first mapped file for a mapped store).
    pub fn arena(&self) -> &Arc<dyn Arena> {
        &self.arenas[0]
    }
    /// Packed size of `tier` in `layer`.
    pub fn tier_bytes(&self, layer: u32, tier: u8) -> Result<u64> {
        self.entry(layer, 0, tier)?;
        Ok(self.tier_bytes[layer as usize][tier as usize])
    }

    /// Copy the packed bytes of (layer, expert, tier) in; only before `freeze`.
    pub fn write(&self, layer: u32, expert: u32, tier: u8, data: &[u8]) -> Result<()> {
        let e = self.entry(layer, expert, tier)?;
        let want = self.tier_bytes[layer as usize][tier as usize];
        if data.len() as u64 != want {
            return Err(Error::InvalidConfig(format!(
                "layer {layer} tier {tier} holds {want} B per expert, got {} B",
                data.len()
            )));
        }
        // The lock orders writes before `freeze`, after which only reads happen.
        let mut written = crate::sync::lock(&self.written);
        if self.frozen.load(Ordering::Acquire) {
            return Err(Error::InvalidConfig(
                "the host store is frozen (read-only once an engine uses it; a mapped \
                 store always is)"
                    .into(),
            ));
        }
        let dst = self.ptr(e, tier as usize);
        // SAFETY: (entry, tier) owns `want` bytes at `dst` inside the (resident: a mapped
        // store is born frozen and never gets here) arena; the store is not frozen, so no
        // copy engine reads it, and the lock serialises writers.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst.as_ptr(), data.len()) };
        written[e][tier as usize] = true;
        Ok(())
    }

    fn ptr(&self, entry: usize, tier: usize) -> NonNull<u8> {
        let (arena, offset) = self.loc[entry][tier];
        let base = self.arenas[arena as usize]
            .host_ptr()
            .expect("checked at construction");
        // SAFETY: locations lie inside their arena (computed from the resident layout, or
        // checked against the mapped file's length at construction).
        unsafe { NonNull::new_unchecked(base.as_ptr().add(offset as usize)) }
    }

    /// `(offset, len)` of (layer, expert, tier) inside its arena (see `locate_arena`).
    pub fn locate(&self, layer: u32, expert: u32, tier: u8) -> Result<(u64, u64)> {
        let (_, offset, len) = self.locate_arena(layer, expert, tier)?;
        Ok((offset, len))
    }

    /// `(arena, offset, len)` of (layer, expert, tier).
    pub fn locate_arena(
        &self,
        layer: u32,
        expert: u32,
        tier: u8,
    ) -> Result<(Arc<dyn Arena>, u64, u64)> {
        let e = self.entry(layer, expert, tier)?;
        let (arena, offset) = self.loc[e][tier as usize];
        Ok((
            self.arenas[arena as usize].clone(),
            offset,
            self.tier_bytes[layer as usize][tier as usize],
        ))
    }

    /// Make the store read-only. Fails if some (expert, tier) was never written.
    pub fn freeze(&self) -> Result<()> {
        let written = crate::sync::lock(&self.written);
        if let Some((e, row)) = written.iter().enumerate().find(|(_, r)| r.contains(&false)) {
            let layer = self.layer_base.partition_point(|&b| b as usize <= e) - 1;
            let expert = e - self.layer_base[layer] as usize;
            let tier = row.iter().position(|w| !w).unwrap_or(0);
            return Err(Error::InvalidConfig(format!(
                "the host store misses layer {layer} expert {expert} tier {tier}"
            )));
        }
        self.frozen.store(true, Ordering::Release);
        Ok(())
    }

    pub fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::Acquire)
    }

    /// The packed bytes of (layer, expert, tier); only once frozen (read-only from then).
    /// For a mapped store these are the file's pages (read on first touch).
    pub fn bytes(&self, layer: u32, expert: u32, tier: u8) -> Result<&[u8]> {
        let e = self.entry(layer, expert, tier)?;
        if !self.is_frozen() {
            return Err(Error::InvalidConfig(
                "freeze the host store before reading it".into(),
            ));
        }
        let len = self.tier_bytes[layer as usize][tier as usize] as usize;
        // SAFETY: frozen, so nothing writes these bytes any more (mapped files are never
        // written); they live as long as `self` (the arenas are owned).
        Ok(unsafe { std::slice::from_raw_parts(self.ptr(e, tier as usize).as_ptr(), len) })
    }

    /// What a copy of (layer, expert, tier) reads from: `None` for a resident store (read
    /// `bytes` directly), or a staging slot filled with the bytes from the mapping. The
    /// caller keeps the slot until the copy reading it has ended. A ring with every slot
    /// handed out is `Error::Exhausted` (never blocks).
    pub fn stage(&self, layer: u32, expert: u32, tier: u8) -> Result<Option<StagingSlot>> {
        let Some(ring) = &self.staging else {
            self.entry(layer, expert, tier)?;
            return Ok(None);
        };
        let src = self.bytes(layer, expert, tier)?;
        let mut slot = ring.acquire()?;
        slot.fill(src)?;
        Ok(Some(slot))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_hands_out_lowest_free_slot_exclusively() {
        let ring = StagingRing::host(3, 100, 64).unwrap();
        assert_eq!(ring.slot_bytes(), 128);
        assert_eq!(ring.total_bytes(), 384);
        let a = ring.acquire().unwrap();
        let b = ring.acquire().unwrap();
        let c = ring.acquire().unwrap();
        assert_eq!((a.index(), b.index(), c.index()), (0, 1, 2));
        assert!(matches!(ring.acquire(), Err(Error::Exhausted { .. })));
        drop(b);
        assert_eq!(ring.in_use(), 2);
        let d = ring.acquire().unwrap();
        assert_eq!(d.index(), 1);
        assert_eq!(ring.peak_in_use(), 3);
        assert_eq!(ring.acquisitions(), 4);
        drop((a, c, d));
        assert_eq!(ring.in_use(), 0);
    }

    #[test]
    fn slot_fill_checks_size_and_keeps_bytes_apart() {
        let ring = StagingRing::host(2, 64, 64).unwrap();
        let mut a = ring.acquire().unwrap();
        let mut b = ring.acquire().unwrap();
        a.fill(&[1u8; 64]).unwrap();
        b.fill(&[2u8; 10]).unwrap();
        assert_eq!(a.as_slice(), &[1u8; 64]);
        assert_eq!(b.as_slice(), &[2u8; 10]);
        assert!(a.fill(&[0u8; 65]).is_err());
        assert_eq!(a.as_slice(), &[1u8; 64]); // a refused fill leaves the slot as it was
    }
}
