//! The asynchronous transfer engine: a bounded, prioritised migration queue that moves
//! experts between tiers without ever blocking a reader.
//!
//! `submit` queues (layer, expert, target tier); at most `max_in_flight` transfers are
//! admitted at a time. Admission runs the state machine's `begin` (reserve a pending block
//! of the target tier) and starts an asynchronous copy of the host store's packed bytes
//! into it on a [`CopyBackend`]. Completion is discovered by [`TransferEngine::poll`]
//! (never blocks), [`TransferEngine::wait`] (blocks, woken by the backend), or a driver
//! thread; it publishes the new version (`complete`) and reclaims old blocks under the
//! lease + last-use rule. A failed copy rolls the expert back (`abort`), returns the
//! reserved block and is reported. A full queue rejects (`Error::QueueFull`) instead of
//! blocking; an admission that finds no slot or budget is dropped (`Rejected`) so the
//! controller can re-plan.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::completion::{settle, Settled};
use crate::errors::{Error, Result};
use crate::pool::{Arena, ArenaKind};
use crate::store::{HostStore, StagingSlot};
use crate::sync::lock;
use crate::table::{ExpertTable, PendingTransition, Version};

/// Identifies one submitted transfer, unique in the process (engines sharing a backend
/// never collide; 0 is the load-time upload).
pub type TransferId = u64;

static NEXT_TRANSFER_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// How soon the controller wants a transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Priority {
    /// Wanted soon (e.g. an expert the current batch routes to): admitted first.
    Urgent,
    /// Merely planned (background re-balancing).
    Planned,
}

/// Fault injection for tests: what a chosen transfer's copy does instead of succeeding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The copy reports failure.
    Fail,
    /// The copy starts only after this delay (later transfers overtake it).
    Delay(Duration),
    /// The copy does not start until [`CopyBackend::release_hung`].
    Hang,
}

/// Where a transfer is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TransferStatus {
    Queued,
    InFlight,
    /// Published as this version.
    Completed {
        version: u32,
    },
    /// The copy failed; the expert stayed at its old version.
    Failed(String),
    /// Cancelled before its copy finished; the expert stayed at its old version.
    Cancelled,
    /// Not admitted (no slot or budget, or the expert is already at that tier).
    Rejected(String),
}

impl TransferStatus {
    pub fn is_final(&self) -> bool {
        !matches!(self, TransferStatus::Queued | TransferStatus::InFlight)
    }
    /// Short name: queued, in_flight, completed, failed, cancelled, rejected.
    pub fn name(&self) -> &'static str {
        match self {
            TransferStatus::Queued => "queued",
            TransferStatus::InFlight => "in_flight",
            TransferStatus::Completed { .. } => "completed",
            TransferStatus::Failed(_) => "failed",
            TransferStatus::Cancelled => "cancelled",
            TransferStatus::Rejected(_) => "rejected",
        }
    }
}

/// A finished transfer, as reported by `poll`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    pub id: TransferId,
    pub layer: u32,
    pub expert: u32,
    pub to: u8,
    pub status: TransferStatus,
}

/// One copy for a backend: `len` bytes from the host store to the pool arena.
pub struct CopyJob {
    pub id: TransferId,
    /// Host address of the source bytes (inside `store`).
    pub src: *const u8,
    /// Destination address in the pool arena (host pointer or device pointer value).
    pub dst: u64,
    pub len: usize,
    pub fault: Option<Fault>,
    /// Keep source and destination memory alive while the copy may run.
    pub store: Arc<HostStore>,
    pub arena: Arc<dyn Arena>,
}

// SAFETY: the raw source pointer points into `store`, which the job keeps alive and which
// is frozen (read-only); the destination is a pending block owned by this transfer.
unsafe impl Send for CopyJob {}

pub use crate::completion::{CopyHandle, CopyState};

/// Wakes waiters when a backend finishes something (no lost wake-ups: waiters compare an
/// epoch under the same lock).
#[derive(Default)]
pub struct Notifier {
    epoch: Mutex<u64>,
    cv: Condvar,
}

impl Notifier {
    pub fn notify(&self) {
        *lock(&self.epoch) += 1;
        self.cv.notify_all();
    }
    pub fn epoch(&self) -> u64 {
        *lock(&self.epoch)
    }
    /// Wait until the epoch moves past `seen` or `timeout` passes.
    pub fn wait(&self, seen: u64, timeout: Duration) {
        let g = lock(&self.epoch);
        if *g == seen {
            let _ = self.cv.wait_timeout(g, timeout);
        }
    }
}

/// A copy engine: CPU worker threads, a test-driven manual backend, or a CUDA stream.
pub trait CopyBackend: Send + Sync {
    fn name(&self) -> &'static str;
    /// The kind of pool arena this backend writes into.
    fn arena_kind(&self) -> ArenaKind;
    /// Start copying asynchronously. An `Err` means no copy is running (nothing writes the
    /// destination any more); a copy that started and then failed is reported through
    /// its handle instead.
    ///
    /// # Safety
    /// `job.src` must be readable for `job.len` bytes and `job.dst` writable for `job.len`
    /// bytes, and nobody else may access the destination until the copy has completed.
    unsafe fn start(&self, job: CopyJob) -> Result<Arc<dyn CopyHandle>>;
    /// Let copies held by [`Fault::Hang`] proceed.
    fn release_hung(&self) {}
    /// The engine is going away: fail every copy that would otherwise wait for an outside
    /// event (the manual backend's), so that dropping the engine cannot hang.
    fn abandon(&self) {}
    /// Woken when a copy finishes (backends without completion callbacks may never call it;
    /// waiters then poll).
    fn notifier(&self) -> Arc<Notifier>;
}

/// Engine limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineConfig {
    /// Transfers admitted at once (K).
    pub max_in_flight: usize,
    /// Requests that may wait in the queue.
    pub queue_capacity: usize,
    /// Finished transfers remembered (for `status` and `poll`); older ones are forgotten,
    /// so a server that only waits or runs the driver keeps bounded bookkeeping.
    pub history: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_in_flight: 4,
            queue_capacity: 64,
            history: 4096,
        }
    }
}

/// Engine counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub submitted: u64,
    pub completed: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub rejected: u64,
    pub bytes_moved: u64,
    pub in_flight: usize,
    pub queue_depth: usize,
    /// Completions nobody polled before the history bound dropped them.
    pub completions_dropped: u64,
}

struct Request {
    id: TransferId,
    layer: u32,
    expert: u32,
    to: u8,
    fault: Option<Fault>,
}

struct Flight {
    req: Request,
    pending: PendingTransition,
    handle: Arc<dyn CopyHandle>,
    cancel: bool,
    len: u64,
    /// The staging slot the copy reads (mapped stores): released when the flight is
    /// dropped, which is only after its copy has ended.
    _staging: Option<StagingSlot>,
}

#[derive(Default)]
struct State {
    urgent: VecDeque<Request>,
    planned: VecDeque<Request>,
    flights: Vec<Flight>,
    status: HashMap<TransferId, TransferStatus>,
    /// Finished ids, oldest first (bounded by `history`).
    finished: VecDeque<TransferId>,
    busy: HashSet<(u32, u32)>,
    done: VecDeque<Completion>,
    stats: EngineStats,
}

/// The migration queue over a table, a host store and a backend.
pub struct TransferEngine {
    table: Arc<ExpertTable>,
    store: Arc<HostStore>,
    backend: Arc<dyn CopyBackend>,
    notifier: Arc<Notifier>,
    arena: Arc<dyn Arena>,
    config: EngineConfig,
    state: Mutex<State>,
    driver: Mutex<Option<(Arc<std::sync::atomic::AtomicBool>, JoinHandle<()>)>>,
}

impl std::fmt::Debug for TransferEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransferEngine")
            .field("backend", &self.backend.name())
            .field("config", &self.config)
            .finish()
    }
}

impl TransferEngine {
    /// Check that the store matches the table, freeze the store, and upload every expert's
    /// published version from it (synchronously: this is load time).
    pub fn new(
        table: Arc<ExpertTable>,
        store: Arc<HostStore>,
        backend: Arc<dyn CopyBackend>,
        config: EngineConfig,
    ) -> Result<Self> {
        if config.max_in_flight == 0 || config.queue_capacity == 0 || config.history == 0 {
            return Err(Error::InvalidConfig(
                "max_in_flight, queue_capacity and history must be > 0".into(),
            ));
        }
        let arena = {
            let pool = lock(table.pool());
            for l in 0..table.num_layers() {
                if l >= store.num_layers() {
                    return Err(Error::InvalidConfig(format!(
                        "the host store has {} layers, the table {}",
                        store.num_layers(),
                        table.num_layers()
                    )));
                }
                for t in 0..table.num_tiers(l)? {
                    let need = store.tier_bytes(l, t)?;
                    for &c in table.tier_classes(l, t)? {
                        let have = pool.slot_bytes(c)?;
                        if have < need {
                            return Err(Error::InvalidConfig(format!(
                                "layer {l} tier {t}: slot class {:?} holds {have} B, the packed expert needs {need} B",
                                pool.class_name(c)?
                            )));
                        }
                    }
                }
            }
            pool.arena().clone()
        };
        if store.num_layers() != table.num_layers() {
            return Err(Error::InvalidConfig(format!(
                "the host store has {} layers, the table {}",
                store.num_layers(),
                table.num_layers()
            )));
        }
        if let Some(ring) = store.staging() {
            // Every flight holds at most one staging slot, so admission never finds the
            // ring full.
            if (ring.slots() as usize) < config.max_in_flight {
                return Err(Error::InvalidConfig(format!(
                    "the store's staging ring has {} slots, fewer than max_in_flight = {}",
                    ring.slots(),
                    config.max_in_flight
                )));
            }
        }
        if arena.kind() != backend.arena_kind() {
            return Err(Error::InvalidConfig(format!(
                "the {} backend needs a {:?} pool arena, the pool has {:?}",
                backend.name(),
                backend.arena_kind(),
                arena.kind()
            )));
        }
        store.freeze()?;
        // Upload before any reader can exist, and claim the table: one engine per table.
        table.upload_initial(|versions| upload(&store, &*backend, &arena, versions))?;
        Ok(Self {
            notifier: backend.notifier(),
            table,
            store,
            backend,
            arena,
            config,
            state: Mutex::new(State::default()),
            driver: Mutex::new(None),
        })
    }

    pub fn table(&self) -> &Arc<ExpertTable> {
        &self.table
    }
    pub fn store(&self) -> &Arc<HostStore> {
        &self.store
    }
    pub fn backend(&self) -> &Arc<dyn CopyBackend> {
        &self.backend
    }
    pub fn config(&self) -> EngineConfig {
        self.config
    }

    /// Queue a transfer of (layer, expert) to tier `to`. Never blocks: a full queue is
    /// `Error::QueueFull`; an expert with a transfer already queued or in flight is
    /// `Error::IllegalTransition`.
    pub fn submit(
        &self,
        layer: u32,
        expert: u32,
        to: u8,
        priority: Priority,
        fault: Option<Fault>,
    ) -> Result<TransferId> {
        self.table.entry_index(layer, expert)?;
        let tiers = self.table.num_tiers(layer)?;
        if to >= tiers {
            return Err(Error::OutOfRange(format!(
                "tier {to} (layer {layer} has {tiers} tiers)"
            )));
        }
        let mut st = lock(&self.state);
        if st.busy.contains(&(layer, expert)) {
            return Err(Error::IllegalTransition {
                layer,
                expert,
                reason: "a transfer of this expert is already queued or in flight".into(),
            });
        }
        if st.urgent.len() + st.planned.len() >= self.config.queue_capacity {
            return Err(Error::QueueFull {
                capacity: self.config.queue_capacity,
            });
        }
        let id = NEXT_TRANSFER_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let req = Request {
            id,
            layer,
            expert,
            to,
            fault,
        };
        match priority {
            Priority::Urgent => st.urgent.push_back(req),
            Priority::Planned => st.planned.push_back(req),
        }
        st.busy.insert((layer, expert));
        st.status.insert(id, TransferStatus::Queued);
        st.stats.submitted += 1;
        // Admission only: completions are processed by poll / wait / drain, so what a
        // batch of submissions admits does not depend on how fast earlier copies ran.
        self.admit_queued(&mut st);
        Ok(id)
    }

    /// Cancel a transfer: a queued one is dropped, an in-flight one is rolled back when
    /// its copy ends. Returns false if it had already finished.
    pub fn cancel(&self, id: TransferId) -> Result<bool> {
        let mut st = lock(&self.state);
        let status = st
            .status
            .get(&id)
            .cloned()
            .ok_or(Error::UnknownTransfer(id))?;
        let cancelled = match status {
            TransferStatus::Queued => {
                let st_ref = &mut *st;
                let req = [&mut st_ref.urgent, &mut st_ref.planned]
                    .into_iter()
                    .find_map(|q| q.iter().position(|r| r.id == id).and_then(|i| q.remove(i)));
                let req = req.expect("a queued status has a queued request");
                st.busy.remove(&(req.layer, req.expert));
                self.finish(&mut st, &req, TransferStatus::Cancelled);
                true
            }
            TransferStatus::InFlight => {
                if let Some(f) = st.flights.iter_mut().find(|f| f.req.id == id) {
                    f.cancel = true;
                }
                true
            }
            _ => false,
        };
        Ok(cancelled)
    }

    /// Process finished copies and admit queued requests; returns what finished since the
    /// last call. Never blocks on a copy.
    pub fn poll(&self) -> Vec<Completion> {
        let mut st = lock(&self.state);
        self.pump(&mut st);
        st.done.drain(..).collect()
    }

    pub fn status(&self, id: TransferId) -> Result<TransferStatus> {
        let mut st = lock(&self.state);
        self.pump(&mut st);
        st.status
            .get(&id)
            .cloned()
            .ok_or(Error::UnknownTransfer(id))
    }

    /// Block until transfer `id` is final or `timeout` passes; returns its status.
    pub fn wait(&self, id: TransferId, timeout: Option<Duration>) -> Result<TransferStatus> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let seen = self.notifier.epoch();
            let status = self.status(id)?;
            if status.is_final() {
                return Ok(status);
            }
            let now = Instant::now();
            let slice = match deadline {
                Some(d) if now >= d => return Ok(status),
                Some(d) => (d - now).min(Duration::from_millis(1)),
                None => Duration::from_millis(1),
            };
            self.notifier.wait(seen, slice);
        }
    }

    /// Block until nothing is queued or in flight (or `timeout`); true when drained.
    ///
    /// Deterministic: it works in waves, completing every in-flight transfer (in
    /// submission order) before admitting the next ones, so the outcome of a batch of
    /// submissions followed by `drain` does not depend on copy timing.
    pub fn drain(&self, timeout: Option<Duration>) -> bool {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let seen = self.notifier.epoch();
            {
                let mut st = lock(&self.state);
                let wave_done = st
                    .flights
                    .iter()
                    .all(|f| f.handle.state() != CopyState::Pending);
                if wave_done {
                    self.pump(&mut st);
                    if st.flights.is_empty() && st.urgent.is_empty() && st.planned.is_empty() {
                        return true;
                    }
                    continue;
                }
            }
            let now = Instant::now();
            let slice = match deadline {
                Some(d) if now >= d => return false,
                Some(d) => (d - now).min(Duration::from_millis(1)),
                None => Duration::from_millis(1),
            };
            self.notifier.wait(seen, slice);
        }
    }

    pub fn stats(&self) -> EngineStats {
        let st = lock(&self.state);
        let mut s = st.stats.clone();
        s.in_flight = st.flights.len();
        s.queue_depth = st.urgent.len() + st.planned.len();
        s
    }

    /// Run a thread that publishes completions as they happen (without anyone polling).
    /// It holds only a weak reference and stops when the engine is dropped.
    pub fn start_driver(self: &Arc<Self>) {
        let mut d = lock(&self.driver);
        if d.is_some() {
            return;
        }
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let weak: Weak<Self> = Arc::downgrade(self);
        let notifier = self.notifier.clone();
        let flag = stop.clone();
        let h = std::thread::Builder::new()
            .name("dynaexq-transfer-driver".into())
            .spawn(move || loop {
                let seen = notifier.epoch();
                if flag.load(std::sync::atomic::Ordering::Acquire) {
                    return;
                }
                match weak.upgrade() {
                    Some(e) => e.poll_keep(),
                    None => return,
                }
                notifier.wait(seen, Duration::from_millis(2));
            })
            .expect("spawn the transfer driver thread");
        *d = Some((stop, h));
    }

    /// Pump without draining the completion list (the driver's step).
    fn poll_keep(&self) {
        let mut st = lock(&self.state);
        self.pump(&mut st);
    }

    fn finish(&self, st: &mut State, req: &Request, status: TransferStatus) {
        match &status {
            TransferStatus::Completed { .. } => st.stats.completed += 1,
            TransferStatus::Failed(_) => st.stats.failed += 1,
            TransferStatus::Cancelled => st.stats.cancelled += 1,
            TransferStatus::Rejected(_) => st.stats.rejected += 1,
            _ => {}
        }
        st.status.insert(req.id, status.clone());
        st.finished.push_back(req.id);
        if st.finished.len() > self.config.history {
            if let Some(old) = st.finished.pop_front() {
                st.status.remove(&old);
            }
        }
        st.done.push_back(Completion {
            id: req.id,
            layer: req.layer,
            expert: req.expert,
            to: req.to,
            status,
        });
        if st.done.len() > self.config.history {
            st.done.pop_front();
            st.stats.completions_dropped += 1;
        }
    }

    fn pump(&self, st: &mut State) {
        // Completions, in submission order.
        let mut finished = Vec::new();
        let mut i = 0;
        while i < st.flights.len() {
            match st.flights[i].handle.state() {
                CopyState::Pending => i += 1,
                s => finished.push((st.flights.swap_remove(i), s)),
            }
        }
        finished.sort_by_key(|(f, _)| f.req.id);
        for (f, s) in finished {
            let bytes = f.len;
            let status = match settle(&self.table, f.pending, s, f.cancel) {
                Settled::Published(v) => {
                    st.stats.bytes_moved += bytes;
                    TransferStatus::Completed { version: v.version }
                }
                Settled::Failed(m) => TransferStatus::Failed(m),
                Settled::Cancelled => TransferStatus::Cancelled,
            };
            st.busy.remove(&(f.req.layer, f.req.expert));
            self.finish(st, &f.req, status);
        }
        // Reclaim on every pump, not only after completions: retired blocks wait for
        // readers' leases to drain, and admissions below may need their slots.
        self.table.reclaim();
        self.admit_queued(st);
    }

    /// Admission: urgent first, up to K in flight.
    fn admit_queued(&self, st: &mut State) {
        while st.flights.len() < self.config.max_in_flight {
            let Some(req) = st.urgent.pop_front().or_else(|| st.planned.pop_front()) else {
                break;
            };
            match self.admit(&req) {
                Ok((pending, handle, len, staging)) => {
                    st.status.insert(req.id, TransferStatus::InFlight);
                    st.flights.push(Flight {
                        req,
                        pending,
                        handle,
                        cancel: false,
                        len,
                        _staging: staging,
                    });
                }
                Err(status) => {
                    st.busy.remove(&(req.layer, req.expert));
                    self.finish(st, &req, status);
                }
            }
        }
    }

    fn admit(&self, req: &Request) -> std::result::Result<Admitted, TransferStatus> {
        let t = self
            .table
            .begin(req.layer, req.expert, req.to)
            .map_err(|e| TransferStatus::Rejected(e.to_string()))?;
        let (src, len, staging) = match source(&self.store, req.layer, req.expert, req.to) {
            Ok(s) => s,
            Err(e) => {
                let _ = self.table.abort(t);
                return Err(TransferStatus::Failed(e.to_string()));
            }
        };
        let job = CopyJob {
            id: req.id,
            src,
            dst: self.arena.address(t.block().offset),
            len,
            fault: req.fault.clone(),
            store: self.store.clone(),
            arena: self.arena.clone(),
        };
        // SAFETY: the source is frozen store memory kept alive by the job, or a staging
        // slot this flight owns until its copy has ended; the destination
        // is the pending block `begin` just reserved for this transfer only (no reader can
        // lease it before `complete`, and only this engine holds the capability to
        // complete it), at least `len` bytes long (checked against the slot classes in
        // `new`). A backend whose `start` fails guarantees no copy is left running.
        match unsafe { self.backend.start(job) } {
            Ok(h) => Ok((t, h, len as u64, staging)),
            Err(e) => {
                let _ = self.table.abort(t);
                Err(TransferStatus::Failed(e.to_string()))
            }
        }
    }
}

type Admitted = (
    PendingTransition,
    Arc<dyn CopyHandle>,
    u64,
    Option<StagingSlot>,
);

/// Where a copy of (layer, expert, tier) reads from, as (address, length): the resident
/// store's memory, or a staging slot filled from a mapped store, returned too: the
/// caller keeps it (unchanged) until the copy reading it has ended.
fn source(
    store: &HostStore,
    layer: u32,
    expert: u32,
    tier: u8,
) -> Result<(*const u8, usize, Option<StagingSlot>)> {
    let staged = store.stage(layer, expert, tier)?;
    let (ptr, len) = match &staged {
        Some(slot) => (slot.as_ptr(), slot.len()),
        None => {
            let b = store.bytes(layer, expert, tier)?;
            (b.as_ptr(), b.len())
        }
    };
    Ok((ptr, len, staged))
}

/// Copy the store's bytes of every published version into its block (load time). Waits
/// for every copy it started, also when one fails or cannot start, so that no copy is
/// still writing a block when this returns.
fn upload(
    store: &Arc<HostStore>,
    backend: &dyn CopyBackend,
    arena: &Arc<dyn Arena>,
    versions: &[(u32, u32, Version)],
) -> Result<()> {
    let notifier = backend.notifier();
    let wait_for = |h: &Arc<dyn CopyHandle>| -> Result<()> {
        loop {
            let seen = notifier.epoch();
            match h.state() {
                CopyState::Pending => notifier.wait(seen, Duration::from_millis(1)),
                CopyState::Done => return Ok(()),
                CopyState::Failed(m) => return Err(Error::Backend(m)),
            }
        }
    };
    // Copies in flight, oldest first, each with the staging slot it reads (if any).
    let mut handles: VecDeque<(Arc<dyn CopyHandle>, Option<StagingSlot>)> = VecDeque::new();
    let mut failure = None;
    for &(l, e, v) in versions {
        let got = loop {
            match source(store, l, e, v.tier) {
                // A full staging ring: let the oldest copy end and free its slot.
                Err(Error::Exhausted { .. }) if !handles.is_empty() => {
                    let (h, _slot) = handles.pop_front().expect("not empty");
                    if let Err(err) = wait_for(&h) {
                        failure.get_or_insert(err);
                    }
                }
                other => break other,
            }
        };
        if failure.is_some() {
            break;
        }
        let (src, len, staging) = match got {
            Ok(s) => s,
            Err(err) => {
                failure = Some(err);
                break;
            }
        };
        let job = CopyJob {
            id: 0,
            src,
            dst: arena.address(v.block.offset),
            len,
            fault: None,
            store: store.clone(),
            arena: arena.clone(),
        };
        // SAFETY: the source is frozen store memory kept alive by the job, or a staging
        // slot kept in `handles` until the copy has ended; the destination
        // is a published block of a table that is not sealed and whose writer lock the
        // caller (`ExpertTable::upload_initial`) holds, so no reader exists; each block is
        // written by exactly one job.
        match unsafe { backend.start(job) } {
            Ok(h) => handles.push_back((h, staging)),
            Err(err) => {
                failure = Some(err);
                break;
            }
        }
    }
    // Each slot is dropped only after its copy has ended.
    for (h, _slot) in handles {
        if let Err(err) = wait_for(&h) {
            failure.get_or_insert(err);
        }
    }
    failure.map_or(Ok(()), Err)
}

impl Drop for TransferEngine {
    fn drop(&mut self) {
        if let Some((stop, h)) = lock(&self.driver).take() {
            stop.store(true, std::sync::atomic::Ordering::Release);
            self.notifier.notify();
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
        // Fail the copies that have not started (nobody will finish them), then settle
        // every flight once its copy has ended, so no block stays reserved and none is
        // freed under a running copy.
        self.backend.abandon();
        self.backend.release_hung();
        let mut st = lock(&self.state);
        for f in std::mem::take(&mut st.flights) {
            while f.handle.state() == CopyState::Pending {
                let seen = self.notifier.epoch();
                self.notifier.wait(seen, Duration::from_millis(1));
            }
            let _ = self.table.abort(f.pending);
        }
    }
}
