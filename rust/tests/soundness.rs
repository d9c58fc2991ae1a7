//! The memory-manager review's findings, one test each (issue 18): every one of these
//! reproduced corruption, a leak or an abort before the fix. Findings that only Python can
//! express (settling an engine's ticket from outside, views after free, garbage-collected
//! streams) are in `tests/test_soundness.py`.
#![cfg(not(loom))]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dynaexq::controller::{
    knapsack_exact, plan, Capacity, ControllerError, HotnessTracker, PlanInput, PlannerConfig,
    Signal,
};
use dynaexq::transfer::{CopyHandle, CopyJob, Notifier};
use dynaexq::{
    ArenaKind, ClassSpec, CopyBackend, CpuBackend, EngineConfig, Error, ExpertPool, ExpertTable,
    Fault, HostStore, LayerTiers, ManualBackend, ManualFence, PoolConfig, Priority, SyncUses,
    TransferEngine, TransferStatus, UseFence,
};

const LO: u64 = 64;
const HI: u64 = 256;

/// One layer of `experts` experts, tier 0 in "lo" (one slot each plus one spare), tier 1
/// in "hi" (two slots).
fn table(experts: u32, fence: Arc<dyn UseFence>) -> (Arc<Mutex<ExpertPool>>, Arc<ExpertTable>) {
    let pool = ExpertPool::new(&PoolConfig::new(vec![
        ClassSpec::new("lo", LO, experts + 1),
        ClassSpec::new("hi", HI, 2),
    ]))
    .unwrap();
    let (lo, hi) = (pool.class_id("lo").unwrap(), pool.class_id("hi").unwrap());
    let pool = Arc::new(Mutex::new(pool));
    let t = ExpertTable::new(
        pool.clone(),
        vec![LayerTiers {
            experts,
            tiers: vec![vec![lo], vec![hi]],
        }],
        None,
        fence,
    )
    .unwrap();
    (pool, Arc::new(t))
}

fn store(experts: u32, lo_byte: u8, hi_byte: u8) -> Arc<HostStore> {
    let s = HostStore::new(&[experts], &[vec![LO, HI]], 64).unwrap();
    for e in 0..experts {
        s.write(0, e, 0, &vec![lo_byte; LO as usize]).unwrap();
        s.write(0, e, 1, &vec![hi_byte; HI as usize]).unwrap();
    }
    Arc::new(s)
}

fn live(pool: &Arc<Mutex<ExpertPool>>) -> u32 {
    pool.lock()
        .unwrap()
        .stats()
        .classes
        .iter()
        .map(|c| c.live)
        .sum()
}

/// Finding 2: the engine's upload wrote into published blocks under live leases, and a
/// second engine on the same table could land two copies in one slot. Now an engine
/// uploads only into an unsealed table (before the first lease) and claims it.
#[test]
fn an_engine_uploads_only_before_the_first_lease_and_only_once() {
    let (_, t) = table(2, Arc::new(SyncUses));
    let lease = t.lease(0, 0).unwrap();
    let before = lease.bytes().unwrap().to_vec();
    let backend = Arc::new(CpuBackend::new(1).unwrap()) as Arc<dyn CopyBackend>;
    let r = TransferEngine::new(
        t.clone(),
        store(2, 55, 55),
        backend.clone(),
        EngineConfig::default(),
    );
    assert!(matches!(r, Err(Error::Sealed(_))), "{:?}", r.err());
    assert_eq!(
        lease.bytes().unwrap(),
        &before[..],
        "bytes changed under a lease"
    );
    drop(lease);

    let (_, t) = table(2, Arc::new(SyncUses));
    let s = store(2, 7, 100);
    let _first = TransferEngine::new(
        t.clone(),
        s.clone(),
        backend.clone(),
        EngineConfig::default(),
    )
    .unwrap();
    let second = TransferEngine::new(t.clone(), s, backend, EngineConfig::default());
    assert!(
        matches!(second, Err(Error::Sealed(_))),
        "{:?}",
        second.err()
    );
    assert!(t.load_initial(0, 0, &[1, 2, 3]).is_err());
}

/// Finding 4: the CUDA fence kept one event per slot, recorded and stored in two steps,
/// so an earlier event could end up as "last" and a block be reclaimed under a later
/// kernel. The ordered fence (shared by CUDA and this manual stream) keeps every use.
#[test]
fn a_block_is_not_reclaimed_while_a_later_use_runs() {
    let fence = Arc::new(ManualFence::new(8));
    let (pool, t) = table(2, fence.clone());
    let lease = t.lease(0, 0).unwrap();
    lease.record_use(); // kernel A
    fence.signal(); // A done
    lease.record_use(); // kernel B, still running
    let old = lease.version().block;
    let p = t.begin(0, 0, 1).unwrap();
    t.complete(p).unwrap();
    drop(lease);
    assert!(t.reclaim().is_empty(), "reclaimed under kernel B");
    assert!(pool.lock().unwrap().is_live(&old));
    fence.signal();
    assert_eq!(t.reclaim(), vec![old]);
}

/// Finding 6: dropping the table freed every block without consulting the use fence.
/// Now a block whose use is still outstanding stays reserved (never reused).
#[test]
fn dropping_the_table_does_not_free_blocks_in_use() {
    let fence = Arc::new(ManualFence::new(8));
    let (pool, t) = table(3, fence.clone());
    t.lease(0, 1).unwrap().record_use();
    assert_eq!(live(&pool), 3);
    drop(t);
    assert_eq!(live(&pool), 1, "the block in use must stay reserved");
    let (pool, t) = table(3, fence.clone());
    t.lease(0, 1).unwrap().record_use();
    fence.signal();
    drop(t);
    assert_eq!(live(&pool), 0);
}

/// Finding 7: with three tiers the planner ignored tier 0's capacity.
#[test]
fn the_planner_respects_tier_zeros_capacity() {
    let caps = Capacity::PerLayer(vec![2, 1, 1]);
    let current = [2u8, 1, 0, 0];
    let input = PlanInput {
        layers: 1,
        experts: 4,
        scores: &[0.1, 1.0, 0.5, 0.0],
        current: &current,
        busy: &[false; 4],
        tier_bytes: &[10, 20, 40],
        gain: None,
        capacity: &caps,
        in_flight: 0,
    };
    let cfg = PlannerConfig {
        delta: 0.01,
        max_transitions: 16,
        max_bytes: u64::MAX,
        max_in_flight: 16,
        min_gain_per_byte: 0.0,
        sequential: false,
    };
    let p = plan(&input, &cfg).unwrap();
    let mut next = current.to_vec();
    for m in &p.transitions {
        next[m.expert as usize] = m.to;
    }
    for (tier, cap) in [2usize, 1, 1].into_iter().enumerate() {
        let used = next.iter().filter(|&&t| t as usize == tier).count();
        assert!(
            used <= cap,
            "tier {tier}: {used} experts in {cap} slots ({p:?})"
        );
    }
}

/// Finding 8: the engine's status map and completion list grew without bound when the
/// caller only waited (or relied on the driver thread).
#[test]
fn engine_bookkeeping_is_bounded() {
    let (_, t) = table(2, Arc::new(SyncUses));
    let backend = Arc::new(CpuBackend::new(1).unwrap()) as Arc<dyn CopyBackend>;
    let config = EngineConfig {
        history: 8,
        ..EngineConfig::default()
    };
    let engine = TransferEngine::new(t.clone(), store(2, 7, 100), backend, config).unwrap();
    let mut ids = Vec::new();
    for k in 0..40u32 {
        let to = 1 - t.published(0, 0).unwrap().tier;
        let id = engine.submit(0, 0, to, Priority::Planned, None).unwrap();
        assert_eq!(
            engine.wait(id, Some(Duration::from_secs(10))).unwrap(),
            TransferStatus::Completed { version: k + 2 }
        );
        ids.push(id);
    }
    assert!(matches!(
        engine.status(ids[0]),
        Err(Error::UnknownTransfer(_))
    ));
    assert!(engine.status(*ids.last().unwrap()).is_ok());
    assert_eq!(engine.stats().completions_dropped, 32);
    assert_eq!(engine.poll().len(), 8);
}

/// A backend that starts `ok` copies (each finishing after `delay`) and then refuses.
struct Refusing {
    inner: CpuBackend,
    ok: Mutex<usize>,
    started: Mutex<Vec<Arc<dyn CopyHandle>>>,
}

impl CopyBackend for Refusing {
    fn name(&self) -> &'static str {
        "refusing"
    }
    fn arena_kind(&self) -> ArenaKind {
        ArenaKind::Host
    }
    unsafe fn start(&self, mut job: CopyJob) -> dynaexq::Result<Arc<dyn CopyHandle>> {
        let mut ok = self.ok.lock().unwrap();
        if *ok == 0 {
            return Err(Error::Backend("refused".into()));
        }
        *ok -= 1;
        job.fault = Some(Fault::Delay(Duration::from_millis(200)));
        // SAFETY: forwarded from the caller.
        let h = unsafe { self.inner.start(job) }?;
        self.started.lock().unwrap().push(h.clone());
        Ok(h)
    }
    fn notifier(&self) -> Arc<Notifier> {
        self.inner.notifier()
    }
}

/// Finding 9: an upload that failed midway returned while earlier copies still wrote
/// into blocks (which the failed table then freed). Now it waits for every copy started.
#[test]
fn a_failed_upload_waits_for_the_copies_it_started() {
    let (pool, t) = table(4, Arc::new(SyncUses));
    let backend = Arc::new(Refusing {
        inner: CpuBackend::new(1).unwrap(),
        ok: Mutex::new(2),
        started: Mutex::new(Vec::new()),
    });
    let r = TransferEngine::new(
        t.clone(),
        store(4, 7, 100),
        backend.clone() as Arc<dyn CopyBackend>,
        EngineConfig::default(),
    );
    assert!(matches!(r, Err(Error::Backend(_))), "{:?}", r.err());
    let started = backend.started.lock().unwrap();
    assert_eq!(started.len(), 2);
    for h in started.iter() {
        assert_ne!(
            h.state(),
            dynaexq::transfer::CopyState::Pending,
            "a copy outlived new()"
        );
    }
    assert!(!t.is_sealed(), "a failed upload leaves the table loadable");
    drop(started);
    drop(t);
    assert_eq!(live(&pool), 0);
}

/// Finding 10: dropping an engine waited out injected delays (up to an hour).
#[test]
fn dropping_an_engine_does_not_wait_out_delays() {
    let (pool, t) = table(2, Arc::new(SyncUses));
    let backend = Arc::new(CpuBackend::new(1).unwrap()) as Arc<dyn CopyBackend>;
    let engine = TransferEngine::new(
        t.clone(),
        store(2, 7, 100),
        backend,
        EngineConfig::default(),
    )
    .unwrap();
    let id = engine
        .submit(
            0,
            0,
            1,
            Priority::Planned,
            Some(Fault::Delay(Duration::from_secs(3600))),
        )
        .unwrap();
    assert_eq!(engine.status(id).unwrap(), TransferStatus::InFlight);
    let start = Instant::now();
    drop(engine);
    assert!(start.elapsed() < Duration::from_secs(60));
    assert_eq!(t.stats().in_flight, 0);
    assert_eq!(live(&pool), 2);
}

/// Finding 10: two engines sharing a manual backend collided on transfer ids.
#[test]
fn engines_sharing_a_backend_have_distinct_transfer_ids() {
    let backend = Arc::new(ManualBackend::new());
    let (_, t1) = table(2, Arc::new(SyncUses));
    let (_, t2) = table(2, Arc::new(SyncUses));
    let b = backend.clone() as Arc<dyn CopyBackend>;
    let e1 = TransferEngine::new(
        t1.clone(),
        store(2, 1, 2),
        b.clone(),
        EngineConfig::default(),
    )
    .unwrap();
    let e2 = TransferEngine::new(t2.clone(), store(2, 3, 4), b, EngineConfig::default()).unwrap();
    let a = e1.submit(0, 0, 1, Priority::Planned, None).unwrap();
    let c = e2.submit(0, 0, 1, Priority::Planned, None).unwrap();
    assert_ne!(a, c);
    assert_eq!(backend.pending().len(), 2);
    assert!(backend.finish(c, true));
    e2.drain(Some(Duration::from_secs(5)));
    assert_eq!(
        e2.status(c).unwrap(),
        TransferStatus::Completed { version: 2 }
    );
    assert_eq!(e1.status(a).unwrap(), TransferStatus::InFlight);
    let lease = t2.lease(0, 0).unwrap();
    assert!(lease.bytes().unwrap()[..HI as usize]
        .iter()
        .all(|&b| b == 4));
}

/// Finding 10: `knapsack(exact=True)` sized its table from budget / gcd (a huge budget
/// aborted the process) and the tracker multiplied sizes unchecked.
#[test]
fn oversized_requests_are_errors_not_aborts() {
    let r = knapsack_exact(&[1.0, 2.0], &[3, 5], 1 << 62);
    assert!(matches!(r, Err(ControllerError::TooLarge(_))), "{r:?}");
    let r = HotnessTracker::new(1 << 33, 1 << 33, Signal::Window { steps: 2 });
    assert!(matches!(r, Err(ControllerError::TooLarge(_))));
    let r = HotnessTracker::new(usize::MAX, 3, Signal::Ema { alpha: 0.5 });
    assert!(matches!(r, Err(ControllerError::TooLarge(_))));
}

/// Finding 10: a reader backing off a stale word bumps the old slot's counter for an
/// instant; `free` of a caller's block must not report it as leased. Caller-owned blocks
/// are guarded by view pins instead.
#[test]
fn free_consults_view_pins_not_lease_counters() {
    let mut pool = ExpertPool::new(&PoolConfig::new(vec![ClassSpec::new("a", 64, 2)])).unwrap();
    let b = pool.alloc(pool.class_id("a").unwrap()).unwrap();
    pool.pin_view(&b).unwrap();
    assert!(matches!(pool.free(b), Err(Error::BlockLeased { .. })));
    pool.unpin_view(&b);
    pool.free(b).unwrap();
}

/// Finding 1 in Rust: only the capability `begin` returned settles a transition, and a
/// capability of one table cannot settle another's.
#[test]
fn a_transition_is_settled_only_by_its_capability() {
    let (_, t1) = table(2, Arc::new(SyncUses));
    let (_, t2) = table(2, Arc::new(SyncUses));
    let p = t1.begin(0, 0, 1).unwrap();
    let info = t1.transition_of(0, 0).unwrap().unwrap();
    assert_eq!(info, p.info());
    let _other = t2.begin(0, 0, 1).unwrap();
    assert!(matches!(
        t2.complete(p),
        Err(Error::IllegalTransition { .. })
    ));
    // t1's entry is still transitioning (its capability was spent on the wrong table).
    assert!(t1.transition_of(0, 0).unwrap().is_some());
}
