//! The host tier store: every tier of every expert, packed, in host memory the copy engine
//! reads asynchronously (ordinary aligned memory on the CPU backend; the CUDA backend
//! registers it as pinned memory). Filled once at load time, then frozen: read-only for
//! the rest of its life, which is what lets copies read it without locks.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::errors::{Error, Result};
use crate::pool::{Arena, HostArena};

/// Packed bytes of every (layer, expert, tier).
pub struct HostStore {
    arena: Arc<dyn Arena>,
    /// First entry of each layer, plus the total.
    layer_base: Vec<u32>,
    /// Packed size of each tier, per layer.
    tier_bytes: Vec<Vec<u64>>,
    /// Offset of (entry, tier) in the arena: `offsets[entry][tier]`.
    offsets: Vec<Vec<u64>>,
    /// Which (entry, tier) has been written.
    written: Mutex<Vec<Vec<bool>>>,
    frozen: AtomicBool,
}

impl std::fmt::Debug for HostStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostStore")
            .field("entries", &(self.layer_base.last().copied().unwrap_or(0)))
            .field("bytes", &self.arena.len())
            .finish()
    }
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
        if experts.is_empty() || experts.len() != tier_bytes.len() {
            return Err(Error::InvalidConfig(format!(
                "the store needs one tier-size list per layer ({} layers, {} lists)",
                experts.len(),
                tier_bytes.len()
            )));
        }
        let mut layer_base = Vec::new();
        let mut offsets = Vec::new();
        let mut total = 0u64;
        let mut entries = 0u32;
        for (l, (&n, sizes)) in experts.iter().zip(tier_bytes).enumerate() {
            if n == 0 || sizes.is_empty() || sizes.contains(&0) {
                return Err(Error::InvalidConfig(format!(
                    "layer {l}: experts and every tier size must be > 0"
                )));
            }
            layer_base.push(entries);
            for _ in 0..n {
                let mut row = Vec::with_capacity(sizes.len());
                for &s in sizes {
                    row.push(total);
                    total = total
                        .checked_add(s.div_ceil(alignment) * alignment)
                        .ok_or_else(|| Error::InvalidConfig("store size overflows".into()))?;
                }
                offsets.push(row);
            }
            entries += n;
        }
        layer_base.push(entries);
        let arena = make(total, alignment.max(64))?;
        if arena.host_ptr().is_none() || arena.len() < total {
            return Err(Error::InvalidConfig(
                "the host store needs host memory of the layout's size".into(),
            ));
        }
        let written = offsets.iter().map(|r| vec![false; r.len()]).collect();
        Ok(Self {
            arena,
            layer_base,
            tier_bytes: tier_bytes.to_vec(),
            offsets,
            written: Mutex::new(written),
            frozen: AtomicBool::new(false),
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
    pub fn total_bytes(&self) -> u64 {
        self.arena.len()
    }
    pub fn arena(&self) -> &Arc<dyn Arena> {
        &self.arena
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
                "the host store is frozen (read-only once an engine uses it)".into(),
            ));
        }
        let dst = self.ptr(e, tier as usize);
        // SAFETY: (entry, tier) owns `want` bytes at `dst` inside the arena; the store is
        // not frozen, so no copy engine reads it, and the lock serialises writers.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst.as_ptr(), data.len()) };
        written[e][tier as usize] = true;
        Ok(())
    }

    fn ptr(&self, entry: usize, tier: usize) -> NonNull<u8> {
        let base = self.arena.host_ptr().expect("checked at construction");
        // SAFETY: offsets lie inside the arena (computed from its layout).
        unsafe { NonNull::new_unchecked(base.as_ptr().add(self.offsets[entry][tier] as usize)) }
    }

    /// `(offset, len)` of (layer, expert, tier) inside the store's arena.
    pub fn locate(&self, layer: u32, expert: u32, tier: u8) -> Result<(u64, u64)> {
        let e = self.entry(layer, expert, tier)?;
        Ok((
            self.offsets[e][tier as usize],
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
    pub fn bytes(&self, layer: u32, expert: u32, tier: u8) -> Result<&[u8]> {
        let e = self.entry(layer, expert, tier)?;
        if !self.is_frozen() {
            return Err(Error::InvalidConfig(
                "freeze the host store before reading it".into(),
            ));
        }
        let len = self.tier_bytes[layer as usize][tier as usize] as usize;
        // SAFETY: frozen, so nothing writes these bytes any more; they live as long as
        // `self` (the arena is owned).
        Ok(unsafe { std::slice::from_raw_parts(self.ptr(e, tier as usize).as_ptr(), len) })
    }
}
