//! dynaexq core: the fragmentation-free hybrid-precision expert pool, the per-expert
//! precision state machine with stable handles, the transfer engine, and the paged KV
//! cache's page pool, which shares one device budget with the expert pool.
//!
//! This file only re-exports; each concept lives in its own module.

pub mod budget;
pub mod completion;
pub mod controller;
#[cfg(not(loom))]
pub mod cpu_experts;
pub mod errors;
pub mod fence;
pub mod kernels;
pub mod kv_pages;
#[cfg(not(loom))]
#[doc(hidden)]
pub mod kv_shadow;
pub mod layout;
pub mod pool;
#[cfg(not(loom))]
#[doc(hidden)]
pub mod shadow;
#[cfg(not(loom))]
pub mod store;
mod sync;
pub mod table;
#[cfg(not(loom))]
pub mod transfer;

pub use budget::{BudgetSnapshot, BudgetUse, DeviceBudget};
pub use errors::{Error, Result};
pub use fence::{
    CompletionMark, ManualFence, ManualMark, ManualStream, OrderedUses, StreamMarks, SyncUses,
    UseFence,
};
pub use kv_pages::{page_keys, KvPageConfig, KvPagePool, KvPageStats, SeqId};
pub use layout::{plan_layout, HotSlots, LayerPlan, LayerShape, Layout, LayoutRequest};
pub use pool::{
    Arena, ArenaKind, Block, ClassId, ClassSpec, ClassStats, ExpertPool, FreeBitmap, HostArena,
    Lending, LentSlot, PoolConfig, PoolStats, VirtualArena,
};
#[cfg(not(loom))]
pub use table::OwnedLease;
pub use table::{
    EntryState, ExpertTable, LayerTiers, Lease, PendingTransition, StepPin, TableStats, Ticket,
    Transition, Version,
};

#[cfg(not(loom))]
pub use store::HostStore;
#[cfg(not(loom))]
pub use transfer::cpu::{CpuBackend, ManualBackend};
#[cfg(not(loom))]
pub use transfer::{
    Completion, CopyBackend, EngineConfig, EngineStats, Fault, Priority, TransferEngine,
    TransferId, TransferStatus,
};

#[cfg(feature = "python")]
mod py;
