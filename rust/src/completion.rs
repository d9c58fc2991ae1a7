//! Where a transfer completes: the completion flag of one copy ([`JobState`], set by
//! whoever did the copy, read by the engine) and [`settle`], which turns a finished copy
//! into a published version or a rollback. The transfer engine calls nothing else to
//! finish a transition, and the loom model (`rust/tests/loom_table.rs`) drives these same
//! two pieces against concurrent readers.

use std::sync::atomic::Ordering;

use crate::sync::{lock, AtomicU32, Mutex};
use crate::table::{ExpertTable, PendingTransition, Version};

/// The state of one copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CopyState {
    Pending,
    Done,
    Failed(String),
}

/// Polls one started copy.
pub trait CopyHandle: Send + Sync {
    fn state(&self) -> CopyState;
}

const PENDING: u32 = 0;
const DONE: u32 = 1;
const FAILED: u32 = 2;

/// Completion flag of one host-side copy.
#[derive(Default)]
pub struct JobState {
    code: AtomicU32,
    message: Mutex<Option<String>>,
}

impl JobState {
    /// The copy's bytes are all written (release: visible to whoever sees `Done`).
    pub fn set_done(&self) {
        self.code.store(DONE, Ordering::Release);
    }
    /// The copy did not happen (or not wholly); nothing writes the destination anymore.
    pub fn set_failed(&self, msg: String) {
        *lock(&self.message) = Some(msg);
        self.code.store(FAILED, Ordering::Release);
    }
}

impl CopyHandle for JobState {
    fn state(&self) -> CopyState {
        // Acquire pairs with the copier's release: the copied bytes are visible to
        // whoever sees Done (and then publishes the version).
        match self.code.load(Ordering::Acquire) {
            PENDING => CopyState::Pending,
            DONE => CopyState::Done,
            _ => CopyState::Failed(lock(&self.message).clone().unwrap_or_default()),
        }
    }
}

/// How a transition ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Settled {
    Published(Version),
    Failed(String),
    Cancelled,
}

/// Settle `pending` once its copy has ended (`state` is not `Pending`): publish it when
/// the copy is done and nobody cancelled it, otherwise roll the expert back.
pub fn settle(
    table: &ExpertTable,
    pending: PendingTransition,
    state: CopyState,
    cancelled: bool,
) -> Settled {
    match state {
        CopyState::Done if !cancelled => match table.complete(pending) {
            Ok(v) => Settled::Published(v),
            Err(e) => Settled::Failed(e.to_string()),
        },
        CopyState::Done => {
            let _ = table.abort(pending);
            Settled::Cancelled
        }
        CopyState::Failed(m) => {
            let _ = table.abort(pending);
            if cancelled {
                Settled::Cancelled
            } else {
                Settled::Failed(m)
            }
        }
        CopyState::Pending => unreachable!("settle is called only after the copy ended"),
    }
}
