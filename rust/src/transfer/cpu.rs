//! CPU copy backends: worker threads copying into a host arena ([`CpuBackend`]) and a
//! test-driven backend whose copies complete exactly when the test says
//! ([`ManualBackend`], for deterministic interleavings in property tests and fuzzing).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use super::{CopyBackend, CopyHandle, CopyJob, Fault, Notifier, TransferId};
use crate::completion::JobState;
use crate::errors::{Error, Result};
use crate::pool::ArenaKind;
use crate::sync::lock;

/// Do the copy of `job` (host to host).
///
/// # Safety
/// As [`CopyBackend::start`]: `src`/`dst` valid for `len` bytes, destination unshared.
unsafe fn host_copy(job: &CopyJob) {
    // SAFETY: guaranteed by the caller (see `CopyBackend::start`); the regions cannot
    // overlap because one is in the host store and the other in the pool arena.
    unsafe { std::ptr::copy_nonoverlapping(job.src, job.dst as *mut u8, job.len) };
}

struct Queued {
    job: CopyJob,
    state: Arc<JobState>,
}

#[derive(Default)]
struct Queue {
    ready: VecDeque<Queued>,
    delayed: Vec<(Instant, Queued)>,
    hung: Vec<Queued>,
    shutdown: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    cv: Condvar,
    notifier: Arc<Notifier>,
}

/// Worker threads doing `memcpy` from the host store into a host pool arena.
pub struct CpuBackend {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl CpuBackend {
    pub fn new(workers: usize) -> Result<Self> {
        if workers == 0 {
            return Err(Error::InvalidConfig(
                "the CPU backend needs at least one worker".into(),
            ));
        }
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            cv: Condvar::new(),
            notifier: Arc::new(Notifier::default()),
        });
        let workers = (0..workers)
            .map(|i| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("dynaexq-copy-{i}"))
                    .spawn(move || worker(&s))
                    .map_err(|e| Error::Backend(format!("spawn a copy worker: {e}")))
            })
            .collect::<Result<_>>()?;
        Ok(Self { shared, workers })
    }
}

fn worker(s: &Shared) {
    loop {
        let item = {
            let mut q = lock(&s.queue);
            loop {
                let now = Instant::now();
                // Delayed copies whose time has come (or all of them at shutdown).
                let mut i = 0;
                while i < q.delayed.len() {
                    if q.delayed[i].0 <= now || q.shutdown {
                        let (_, item) = q.delayed.swap_remove(i);
                        q.ready.push_back(item);
                    } else {
                        i += 1;
                    }
                }
                if let Some(item) = q.ready.pop_front() {
                    break item;
                }
                if q.shutdown {
                    return;
                }
                let next = q.delayed.iter().map(|(t, _)| *t).min();
                q = match next {
                    Some(t) => {
                        let d = t.saturating_duration_since(now);
                        s.cv.wait_timeout(q, d).unwrap_or_else(|e| e.into_inner()).0
                    }
                    None => s.cv.wait(q).unwrap_or_else(|e| e.into_inner()),
                };
            }
        };
        match item.job.fault {
            Some(Fault::Fail) => item
                .state
                .set_failed(format!("injected failure of transfer {}", item.job.id)),
            _ => {
                // SAFETY: the engine's contract for `start` (see `CopyBackend::start`).
                unsafe { host_copy(&item.job) };
                item.state.set_done();
            }
        }
        s.notifier.notify();
    }
}

impl CopyBackend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }
    fn arena_kind(&self) -> ArenaKind {
        ArenaKind::Host
    }
    unsafe fn start(&self, job: CopyJob) -> Result<Arc<dyn CopyHandle>> {
        let state = Arc::new(JobState::default());
        let mut q = lock(&self.shared.queue);
        if q.shutdown {
            return Err(Error::Backend("the CPU backend is shutting down".into()));
        }
        let fault = job.fault.clone();
        let item = Queued {
            job,
            state: state.clone(),
        };
        match fault {
            Some(Fault::Delay(d)) => q.delayed.push((Instant::now() + d, item)),
            Some(Fault::Hang) => q.hung.push(item),
            _ => q.ready.push_back(item),
        }
        drop(q);
        self.shared.cv.notify_one();
        Ok(state)
    }
    fn release_hung(&self) {
        let mut q = lock(&self.shared.queue);
        let hung = std::mem::take(&mut q.hung);
        q.ready.extend(hung);
        drop(q);
        self.shared.cv.notify_all();
    }
    /// Fail the copies that have not started (delayed or hung) instead of running them:
    /// dropping an engine then never waits out an injected delay (up to an hour).
    fn abandon(&self) {
        let mut q = lock(&self.shared.queue);
        let mut waiting: Vec<Queued> = std::mem::take(&mut q.hung);
        waiting.extend(q.delayed.drain(..).map(|(_, item)| item));
        drop(q);
        for item in waiting {
            item.state.set_failed(format!(
                "copy of transfer {} abandoned: the engine was dropped",
                item.job.id
            ));
        }
        self.shared.notifier.notify();
    }
    fn notifier(&self) -> Arc<Notifier> {
        self.shared.notifier.clone()
    }
}

impl Drop for CpuBackend {
    fn drop(&mut self) {
        {
            let mut q = lock(&self.shared.queue);
            q.shutdown = true;
            let hung = std::mem::take(&mut q.hung);
            q.ready.extend(hung);
        }
        self.shared.cv.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Copies that complete (or fail) exactly when the test calls [`ManualBackend::finish`]:
/// the copy itself happens at that moment, so a test controls every interleaving.
#[derive(Default)]
pub struct ManualBackend {
    jobs: Mutex<HashMap<TransferId, Queued>>,
    notifier: Arc<Notifier>,
}

impl ManualBackend {
    pub fn new() -> Self {
        Self::default()
    }
    /// Ids of copies started and not finished, ascending.
    pub fn pending(&self) -> Vec<TransferId> {
        let mut v: Vec<_> = lock(&self.jobs).keys().copied().collect();
        v.sort_unstable();
        v
    }
    /// Finish copy `id`: copy the bytes and report success, or report failure. Returns
    /// false if no such copy is pending.
    pub fn finish(&self, id: TransferId, ok: bool) -> bool {
        let Some(item) = lock(&self.jobs).remove(&id) else {
            return false;
        };
        if ok && item.job.fault != Some(Fault::Fail) {
            // SAFETY: the engine's contract for `start`; the job keeps both ends alive.
            unsafe { host_copy(&item.job) };
            item.state.set_done();
        } else {
            item.state
                .set_failed(format!("copy of transfer {id} failed"));
        }
        self.notifier.notify();
        true
    }
}

impl CopyBackend for ManualBackend {
    fn name(&self) -> &'static str {
        "manual"
    }
    fn arena_kind(&self) -> ArenaKind {
        ArenaKind::Host
    }
    unsafe fn start(&self, job: CopyJob) -> Result<Arc<dyn CopyHandle>> {
        let state = Arc::new(JobState::default());
        if job.id == 0 {
            // Load-time uploads are not part of the tested interleavings: copy now.
            // SAFETY: the caller's contract for `start`.
            unsafe { host_copy(&job) };
            state.set_done();
            return Ok(state);
        }
        lock(&self.jobs).insert(
            job.id,
            Queued {
                job,
                state: state.clone(),
            },
        );
        Ok(state)
    }
    fn abandon(&self) {
        let jobs: Vec<_> = lock(&self.jobs).drain().collect();
        for (id, item) in jobs {
            item.state.set_failed(format!(
                "copy of transfer {id} abandoned: the engine was dropped"
            ));
        }
        self.notifier.notify();
    }
    fn notifier(&self) -> Arc<Notifier> {
        self.notifier.clone()
    }
}
