//! When the last *use* of a pool slot has completed.
//!
//! Reclaiming a retired block needs two things: no lease on it (a lease covers "handle
//! read, work not issued yet") and every recorded use completed (a use covers "work
//! issued, maybe still running", e.g. a kernel on a CUDA stream). This module owns the
//! second rule. [`OrderedUses`] is the one implementation for asynchronous executors: every
//! use gets the next number of one monotonic sequence and a completion mark placed on the
//! executor's in-order stream, all under one lock, so a slot's newest use can never be
//! hidden behind an older one and switching streams cannot drop earlier uses. A use
//! counts as completed only when it *and every use before it* have completed (a prefix), which is
//! conservative across streams and exact on one.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::sync::{lock, Arc, AtomicU64, Mutex};

/// Decides when the last use of a block has completed.
pub trait UseFence: Send + Sync {
    /// Work reading `slot` was issued and may still be running (called before the lease
    /// that covered the issue is released).
    fn record_use(&self, slot: u32);
    /// Every use recorded for `slot` has completed.
    fn uses_completed(&self, slot: u32) -> bool;
    /// Work reading all of `slots` was issued (one step of a device executor that reads
    /// every expert through a table image): one mark covers them all.
    fn record_uses(&self, slots: &[u32]) {
        for &s in slots {
            self.record_use(s);
        }
    }
    /// How long dropping the table may wait for outstanding uses. Blocks whose uses are
    /// still outstanding after that stay reserved (never reused) rather than freed.
    fn drop_wait(&self) -> Duration {
        Duration::ZERO
    }
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

/// An in-order executor that can place completion marks: a CUDA stream and its events,
/// or [`ManualStream`] in tests.
pub trait StreamMarks: Send + Sync {
    type Mark: CompletionMark;
    /// A mark placed after all work issued so far.
    fn mark(&self) -> Result<Self::Mark, String>;
    /// Block until all issued work has completed (the fallback when `mark` fails).
    fn wait_all(&self) -> Result<(), String>;
}

/// A mark answers for itself, whatever stream the fence records on later.
pub trait CompletionMark: Send {
    /// The work before the mark has completed (an error counts as not completed: memory
    /// a failed kernel may still touch is never freed).
    fn reached(&self) -> bool;
}

enum Pending<M> {
    Mark(M),
    /// Marking failed and waiting for the stream failed too: never completes.
    Never,
}

struct Ordered<S: StreamMarks> {
    stream: S,
    next: u64,
    completed: u64,
    outstanding: VecDeque<(u64, Pending<S::Mark>)>,
    last: Vec<u64>,
}

impl<S: StreamMarks> Ordered<S> {
    fn advance(&mut self) {
        while let Some((seq, p)) = self.outstanding.front() {
            let done = match p {
                Pending::Mark(m) => m.reached(),
                Pending::Never => false,
            };
            if !done {
                return;
            }
            self.completed = *seq;
            self.outstanding.pop_front();
        }
        self.completed = self.next;
    }
}

/// Every outstanding use, in one sequence (see the module docs).
pub struct OrderedUses<S: StreamMarks> {
    inner: Mutex<Ordered<S>>,
    drop_wait: Duration,
}

impl<S: StreamMarks> OrderedUses<S> {
    pub fn new(slots: u32, stream: S, drop_wait: Duration) -> Self {
        Self {
            inner: Mutex::new(Ordered {
                stream,
                next: 0,
                completed: 0,
                outstanding: VecDeque::new(),
                last: vec![0; slots as usize],
            }),
            drop_wait,
        }
    }

    /// Record later uses on another stream; uses recorded so far stay outstanding until
    /// their own marks are reached.
    pub fn set_stream(&self, stream: S) {
        lock(&self.inner).stream = stream;
    }

    /// Run `f` on the current stream (e.g. to signal a manual one).
    pub fn with_stream<R>(&self, f: impl FnOnce(&S) -> R) -> R {
        f(&lock(&self.inner).stream)
    }

    /// Uses recorded whose completion has not been observed yet.
    pub fn outstanding(&self) -> u64 {
        let mut g = lock(&self.inner);
        g.advance();
        g.next - g.completed
    }
}

impl<S: StreamMarks> UseFence for OrderedUses<S> {
    fn record_use(&self, slot: u32) {
        self.record_uses(&[slot]);
    }
    fn record_uses(&self, slots: &[u32]) {
        let mut g = lock(&self.inner);
        g.next += 1;
        let seq = g.next;
        let pending = match g.stream.mark() {
            Ok(m) => Some(Pending::Mark(m)),
            // No mark: wait for the stream instead, after which this use is complete.
            Err(_) => match g.stream.wait_all() {
                Ok(()) => None,
                Err(_) => Some(Pending::Never),
            },
        };
        if let Some(p) = pending {
            g.outstanding.push_back((seq, p));
        }
        for &slot in slots {
            let last = &mut g.last[slot as usize];
            *last = (*last).max(seq);
        }
    }
    fn uses_completed(&self, slot: u32) -> bool {
        let mut g = lock(&self.inner);
        g.advance();
        g.last[slot as usize] <= g.completed
    }
    fn drop_wait(&self) -> Duration {
        self.drop_wait
    }
}

/// A stream completed by hand, like a device executing in order: `signal` completes every
/// mark placed so far.
#[derive(Default)]
pub struct ManualStream {
    placed: AtomicU64,
    reached: Arc<AtomicU64>,
}

impl ManualStream {
    /// Complete all work issued so far.
    pub fn signal(&self) {
        let placed = self.placed.load(Ordering::Acquire);
        self.reached.fetch_max(placed, Ordering::AcqRel);
    }
    /// Every mark placed so far is reached.
    pub fn idle(&self) -> bool {
        self.reached.load(Ordering::Acquire) >= self.placed.load(Ordering::Acquire)
    }
}

/// A mark of a [`ManualStream`]: its position, and the stream's progress counter.
pub struct ManualMark {
    at: u64,
    reached: Arc<AtomicU64>,
}

impl CompletionMark for ManualMark {
    fn reached(&self) -> bool {
        self.reached.load(Ordering::Acquire) >= self.at
    }
}

impl StreamMarks for ManualStream {
    type Mark = ManualMark;
    fn mark(&self) -> Result<ManualMark, String> {
        Ok(ManualMark {
            at: self.placed.fetch_add(1, Ordering::AcqRel) + 1,
            reached: self.reached.clone(),
        })
    }
    fn wait_all(&self) -> Result<(), String> {
        Err("a manual stream completes only when signalled".into())
    }
}

/// The fence of tests and the demo: [`OrderedUses`] over a [`ManualStream`], so the
/// property tests and fuzz targets drive the same code as the CUDA fence.
pub struct ManualFence(OrderedUses<ManualStream>);

impl ManualFence {
    pub fn new(slots: u32) -> Self {
        Self(OrderedUses::new(
            slots,
            ManualStream::default(),
            Duration::ZERO,
        ))
    }
    /// Complete every use recorded so far.
    pub fn signal(&self) {
        self.0.with_stream(ManualStream::signal);
    }
    /// Uses recorded but not yet signalled.
    pub fn outstanding(&self) -> u64 {
        self.0.outstanding()
    }
}

impl UseFence for ManualFence {
    fn record_use(&self, slot: u32) {
        self.0.record_use(slot)
    }
    fn record_uses(&self, slots: &[u32]) {
        self.0.record_uses(slots)
    }
    fn uses_completed(&self, slot: u32) -> bool {
        self.0.uses_completed(slot)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    /// A stream whose marks complete one by one, in any order the test picks.
    #[derive(Default)]
    struct Steps {
        placed: AtomicU64,
        done: Mutex<Vec<bool>>,
        fail_marks: AtomicBool,
    }
    struct StepMark(std::sync::Arc<Steps>, u64);
    impl CompletionMark for StepMark {
        fn reached(&self) -> bool {
            lock(&self.0.done)[self.1 as usize]
        }
    }
    impl StreamMarks for std::sync::Arc<Steps> {
        type Mark = StepMark;
        fn mark(&self) -> Result<StepMark, String> {
            if self.fail_marks.load(Ordering::SeqCst) {
                return Err("no event".into());
            }
            lock(&self.done).push(false);
            Ok(StepMark(
                self.clone(),
                self.placed.fetch_add(1, Ordering::SeqCst),
            ))
        }
        fn wait_all(&self) -> Result<(), String> {
            lock(&self.done).iter_mut().for_each(|d| *d = true);
            Ok(())
        }
    }

    #[test]
    fn a_later_use_of_a_slot_is_never_hidden_by_an_earlier_one() {
        let s = std::sync::Arc::new(Steps::default());
        let f = OrderedUses::new(2, s.clone(), Duration::ZERO);
        f.record_use(0); // mark 0
        f.record_use(1); // mark 1
        f.record_use(0); // mark 2
        lock(&s.done)[0] = true;
        lock(&s.done)[1] = true;
        assert!(f.uses_completed(1));
        assert!(!f.uses_completed(0), "slot 0's second use is still running");
        lock(&s.done)[2] = true;
        assert!(f.uses_completed(0));
    }

    #[test]
    fn uses_complete_in_prefix_order_across_streams() {
        let a = std::sync::Arc::new(Steps::default());
        let f = OrderedUses::new(2, a.clone(), Duration::ZERO);
        f.record_use(0);
        let b = std::sync::Arc::new(Steps::default());
        f.set_stream(b.clone());
        f.record_use(1);
        // The use on the new stream finished, the earlier one on the old stream did not:
        // switching streams must not lose it.
        lock(&b.done)[0] = true;
        assert!(!f.uses_completed(0));
        assert_eq!(f.outstanding(), 2);
    }

    #[test]
    fn a_failed_mark_waits_for_the_stream() {
        let s = std::sync::Arc::new(Steps::default());
        let f = OrderedUses::new(1, s.clone(), Duration::ZERO);
        f.record_use(0);
        s.fail_marks.store(true, Ordering::SeqCst);
        f.record_use(0); // falls back to wait_all: everything before is complete
        assert!(f.uses_completed(0));
    }

    #[test]
    fn manual_fence_signals_what_was_recorded() {
        let f = ManualFence::new(3);
        f.record_use(2);
        assert_eq!(f.outstanding(), 1);
        assert!(!f.uses_completed(2) && f.uses_completed(1));
        f.signal();
        f.record_use(1);
        assert!(f.uses_completed(2) && !f.uses_completed(1));
        assert_eq!(f.outstanding(), 1);
    }
}
