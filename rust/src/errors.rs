//! Every error the core can report. The Python glue maps each variant to an exception
//! (see `py.rs`); nothing in the core panics on bad input.

use thiserror::Error;

/// Result alias used across the core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, with enough detail to act on the message alone.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Error {
    /// A constructor argument is invalid (zero size, bad alignment, empty class list...).
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// A slot class name that the pool does not have.
    #[error("unknown slot class {name:?} (known: {known})")]
    UnknownClass { name: String, known: String },
    /// Every slot of the class is live.
    #[error("slot class {class:?} is exhausted ({capacity} of {capacity} slots live)")]
    Exhausted { class: String, capacity: u32 },
    /// Reserving one more slot would exceed the pool's byte budget.
    #[error(
        "reserving {need} B in class {class:?} would exceed the budget: {reserved} B of {budget} B already reserved"
    )]
    BudgetExceeded {
        class: String,
        need: u64,
        reserved: u64,
        budget: u64,
    },
    /// The block was already freed (or freed and handed out again since).
    #[error("double free of block {index} in class {class:?}")]
    DoubleFree { class: String, index: u32 },
    /// The block belongs to another pool, or its coordinates do not exist in this one.
    #[error("block does not belong to this pool: {0}")]
    ForeignBlock(String),
    /// A view of the block is alive, so it cannot be freed.
    #[error("block {index} in class {class:?} has {readers} live view(s); release them first")]
    BlockLeased {
        class: String,
        index: u32,
        readers: u32,
    },
    /// The block is owned by the expert table (a published or in-flight version).
    #[error("block {index} in class {class:?} is owned by the expert table; it is freed by the table's retire rule")]
    OwnedByTable { class: String, index: u32 },
    /// `commit` on a block that is not pending.
    #[error("block {index} in class {class:?} is not pending (already committed)")]
    NotPending { class: String, index: u32 },
    /// A transition the state machine does not allow from the entry's current state.
    #[error("illegal transition for expert (layer {layer}, expert {expert}): {reason}")]
    IllegalTransition {
        layer: u32,
        expert: u32,
        reason: String,
    },
    /// The table's loading phase is over (or an engine owns it): published bytes are
    /// written only before the first lease.
    #[error("{0}")]
    Sealed(String),
    /// A ticket that is not (or no longer) in flight.
    #[error("unknown transition ticket {0} (already completed, aborted, or never issued)")]
    UnknownTicket(u64),
    /// (layer, expert) or tier outside the table.
    #[error("out of range: {0}")]
    OutOfRange(String),
    /// The transfer queue is at capacity; the request was not queued.
    #[error("the transfer queue is full ({capacity} requests queued); retry after completions")]
    QueueFull { capacity: usize },
    /// A transfer id the engine never issued.
    #[error("unknown transfer id {0}")]
    UnknownTransfer(u64),
    /// The copy backend failed (driver missing, CUDA error, worker gone...).
    #[error("copy backend: {0}")]
    Backend(String),
    /// The computation would need more memory than can reasonably be allocated.
    #[error("too large: {0}")]
    TooLarge(String),
    /// A KV-cache sequence id the page pool does not hold.
    #[error("unknown KV sequence {0} (never opened, or closed already)")]
    UnknownSequence(u64),
    /// `open` of a sequence id that is already open.
    #[error("KV sequence {0} is already open")]
    SequenceExists(u64),
    /// The page arena has fewer free pages than a reservation needs.
    #[error("the KV page pool has {free} of {capacity} pages free; {need} are needed")]
    PagesExhausted { need: u32, free: u32, capacity: u32 },
    /// A KV page operation the sequence's state does not allow.
    #[error("KV sequence {seq}: {reason}")]
    IllegalPageOp { seq: u64, reason: String },
    /// A lending operation the slot's state does not allow (see `pool::Lending`).
    #[error("lending: {0}")]
    IllegalLend(String),
    /// The byte budget cannot hold the requested layout.
    #[error("{what}: needs {needed} B but the budget is {budget} B ({missing} B missing)")]
    BudgetTooSmall {
        what: String,
        needed: u64,
        budget: u64,
        missing: u64,
    },
}
