//! The memory-mapped host store and its bounded staging ring: bytes read back from the
//! files, location checks, the ring's exclusive slots, and the transfer engine copying
//! through the ring (initial upload with fewer slots than experts, promotions, slots held
//! exactly while copies run, faults).
#![cfg(not(loom))]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dynaexq::store::{MappedTier, StagingRing};
use dynaexq::{
    plan_layout, CopyBackend, CpuBackend, EngineConfig, Error, ExpertPool, ExpertTable, Fault,
    HostStore, HotSlots, LayerShape, LayoutRequest, ManualBackend, Priority, SyncUses,
    TransferEngine, TransferStatus, UseFence,
};

const LO: u64 = 1000;
const HI: u64 = 5000;
const HEADER: u64 = 123; // bytes before the first tensor, as a safetensors header would be

fn pattern(l: u32, e: u32, t: u8, len: u64) -> Vec<u8> {
    let mut x = (l * 7919 + e * 131 + t as u32 * 17 + 1).wrapping_mul(2654435761);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// One file per layer: a header, then tier 0 of every expert, then tier 1 (the tiered
/// checkpoint's [E, bytes] tensors). Returns the files and each layer's locations.
fn write_files(
    dir: &std::path::Path,
    layers: u32,
    experts: u32,
) -> (Vec<PathBuf>, Vec<Vec<MappedTier>>) {
    let mut files = Vec::new();
    let mut locs = Vec::new();
    for l in 0..layers {
        let mut data = vec![0xAAu8; HEADER as usize];
        for (t, len) in [(0u8, LO), (1, HI)] {
            for e in 0..experts {
                data.extend(pattern(l, e, t, len));
            }
        }
        let p = dir.join(format!("layer{l}.bin"));
        std::fs::write(&p, &data).unwrap();
        files.push(p);
        locs.push(vec![
            MappedTier {
                file: l,
                offset: HEADER,
                stride: LO,
            },
            MappedTier {
                file: l,
                offset: HEADER + u64::from(experts) * LO,
                stride: HI,
            },
        ]);
    }
    (files, locs)
}

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "dynaexq-store-mapped-{name}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn mapped(dir: &std::path::Path, layers: u32, experts: u32, slots: u32) -> Arc<HostStore> {
    let (files, locs) = write_files(dir, layers, experts);
    let ring = StagingRing::host(slots, HI, 256).unwrap();
    Arc::new(
        HostStore::mapped(
            &vec![experts; layers as usize],
            &vec![vec![LO, HI]; layers as usize],
            &files,
            &locs,
            ring,
        )
        .unwrap(),
    )
}

#[test]
fn mapped_bytes_and_staged_copies_are_the_files_bytes() {
    let dir = tempdir("bytes");
    let s = mapped(&dir, 2, 5, 2);
    assert!(s.is_frozen() && s.is_mapped());
    assert_eq!(s.resident_bytes(), 2 * 5120); // the ring only: 2 slots of HI rounded to 256
    assert_eq!(s.total_bytes(), 2 * (HEADER + 5 * (LO + HI)));
    for l in 0..2 {
        for e in 0..5 {
            for (t, len) in [(0u8, LO), (1, HI)] {
                assert_eq!(s.bytes(l, e, t).unwrap(), &pattern(l, e, t, len)[..]);
                let slot = s.stage(l, e, t).unwrap().expect("mapped stores stage");
                assert_eq!(slot.as_slice(), &pattern(l, e, t, len)[..]);
            }
        }
    }
    // A mapped store is read-only.
    assert!(matches!(
        s.write(0, 0, 0, &[0; LO as usize]),
        Err(Error::InvalidConfig(_))
    ));
    // Two slots: a third concurrent stage is refused, not blocked.
    let a = s.stage(0, 0, 1).unwrap().unwrap();
    let b = s.stage(0, 1, 1).unwrap().unwrap();
    assert!(matches!(s.stage(0, 2, 1), Err(Error::Exhausted { .. })));
    assert_eq!(a.as_slice(), &pattern(0, 0, 1, HI)[..]); // b did not overwrite a
    drop(b);
    assert!(s.stage(0, 2, 1).is_ok());
    assert!(matches!(s.stage(2, 0, 0), Err(Error::OutOfRange(_))));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn locations_outside_the_file_and_small_slots_are_refused() {
    let dir = tempdir("checks");
    let (files, mut locs) = write_files(&dir, 1, 4);
    let ring = || StagingRing::host(2, HI, 256).unwrap();
    // One byte past the end of the file.
    locs[0][1].offset += 1;
    let err = HostStore::mapped(&[4], &[vec![LO, HI]], &files, &locs, ring()).unwrap_err();
    assert!(err.to_string().contains("run past the end"), "{err}");
    locs[0][1].offset -= 1;
    // Stride below the tier size, unknown file, slot smaller than a tier.
    locs[0][0].stride = LO - 1;
    assert!(HostStore::mapped(&[4], &[vec![LO, HI]], &files, &locs, ring()).is_err());
    locs[0][0].stride = LO;
    locs[0][0].file = 3;
    assert!(HostStore::mapped(&[4], &[vec![LO, HI]], &files, &locs, ring()).is_err());
    locs[0][0].file = 0;
    let small = StagingRing::host(2, LO, 256).unwrap();
    let err = HostStore::mapped(&[4], &[vec![LO, HI]], &files, &locs, small).unwrap_err();
    assert!(err.to_string().contains("largest tier"), "{err}");
    let missing = vec![dir.join("nope.bin")];
    assert!(HostStore::mapped(&[4], &[vec![LO, HI]], &missing, &locs, ring()).is_err());
    assert!(HostStore::mapped(&[4], &[vec![LO, HI]], &files, &locs, ring()).is_ok());
    let _ = std::fs::remove_dir_all(dir);
}

struct Rig {
    table: Arc<ExpertTable>,
    store: Arc<HostStore>,
    engine: TransferEngine,
}

fn rig(
    dir: &std::path::Path,
    experts: u32,
    slots: u32,
    k: usize,
    backend: Arc<dyn CopyBackend>,
) -> Result<Rig, Error> {
    let layout = plan_layout(&LayoutRequest {
        budget: 1 << 30,
        layers: (0..2)
            .map(|_| LayerShape {
                experts,
                lo_bytes: LO,
                hi_bytes: HI,
            })
            .collect(),
        hot: HotSlots::PerLayer(2),
        staging: 4,
        alignment: 256,
    })
    .unwrap();
    let pool = ExpertPool::new(&layout.pool_config()).unwrap();
    let tiers = layout.layer_tiers(&pool).unwrap();
    let pool = Arc::new(Mutex::new(pool));
    let table = Arc::new(
        ExpertTable::new(
            pool,
            tiers,
            Some(layout.initial_tiers()),
            Arc::new(SyncUses) as Arc<dyn UseFence>,
        )
        .unwrap(),
    );
    let store = mapped(dir, 2, experts, slots);
    let config = EngineConfig {
        max_in_flight: k,
        queue_capacity: 64,
        ..EngineConfig::default()
    };
    let engine = TransferEngine::new(table.clone(), store.clone(), backend, config)?;
    Ok(Rig {
        table,
        store,
        engine,
    })
}

fn assert_published_bytes(r: &Rig, l: u32, e: u32) {
    let lease = r.table.lease(l, e).unwrap();
    let v = lease.version();
    let want = r.store.bytes(l, e, v.tier).unwrap();
    assert_eq!(
        &lease.bytes().unwrap()[..want.len()],
        want,
        "layer {l} expert {e}"
    );
}

#[test]
fn engine_uploads_and_promotes_through_a_ring_smaller_than_the_model() {
    let dir = tempdir("engine");
    // 2 x 16 experts uploaded through 2 staging slots.
    let r = rig(&dir, 16, 2, 2, Arc::new(CpuBackend::new(2).unwrap())).unwrap();
    for l in 0..2 {
        for e in 0..16 {
            assert_published_bytes(&r, l, e);
        }
    }
    let ring = r.store.staging().unwrap();
    assert!(ring.acquisitions() >= 32);
    assert!(ring.peak_in_use() <= 2);
    assert_eq!(ring.in_use(), 0, "every slot is back after the upload");
    // Promote and demote a few, with a failure in between: bytes match the files and the
    // ring never grows past its slots.
    let mut moved = Vec::new();
    for (l, e) in [(0u32, 5u32), (1, 9), (0, 11)] {
        let to = 1 - r.table.published(l, e).unwrap().tier;
        let id = r.engine.submit(l, e, to, Priority::Urgent, None).unwrap();
        moved.push((id, l, e));
    }
    let bad = r
        .engine
        .submit(1, 3, 1, Priority::Planned, Some(Fault::Fail))
        .unwrap();
    for &(id, l, e) in &moved {
        let st = r.engine.wait(id, Some(Duration::from_secs(10))).unwrap();
        assert!(
            matches!(
                st,
                TransferStatus::Completed { .. } | TransferStatus::Rejected(_)
            ),
            "{st:?}"
        );
        assert_published_bytes(&r, l, e);
    }
    let st = r.engine.wait(bad, Some(Duration::from_secs(10))).unwrap();
    assert!(
        matches!(st, TransferStatus::Failed(_) | TransferStatus::Rejected(_)),
        "{st:?}"
    );
    assert!(r.engine.drain(Some(Duration::from_secs(10))));
    r.engine.poll();
    assert_eq!(ring.in_use(), 0);
    assert!(ring.peak_in_use() <= 2);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_slot_is_held_exactly_while_its_copy_runs() {
    let dir = tempdir("manual");
    let manual = Arc::new(ManualBackend::new());
    // Upload needs the manual copies finished: run it on a thread that finishes them.
    let m = manual.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s2 = stop.clone();
    let finisher = std::thread::spawn(move || {
        while !s2.load(std::sync::atomic::Ordering::Acquire) {
            for id in m.pending() {
                m.finish(id, true);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    let r = rig(&dir, 8, 3, 3, manual.clone() as Arc<dyn CopyBackend>).unwrap();
    stop.store(true, std::sync::atomic::Ordering::Release);
    finisher.join().unwrap();
    let ring = r.store.staging().unwrap().clone();
    assert_eq!(ring.in_use(), 0);
    let hot: Vec<u32> = (0..8)
        .filter(|&e| r.table.published(0, e).unwrap().tier == 1)
        .collect();
    let cold: Vec<u32> = (0..8)
        .filter(|&e| r.table.published(0, e).unwrap().tier == 0)
        .collect();
    // Demote two hot experts of layer 0 and one of layer 1: three copies.
    let hot1: Vec<u32> = (0..8)
        .filter(|&e| r.table.published(1, e).unwrap().tier == 1)
        .collect();
    let ids = [
        r.engine
            .submit(0, hot[0], 0, Priority::Urgent, None)
            .unwrap(),
        r.engine
            .submit(0, hot[1], 0, Priority::Urgent, None)
            .unwrap(),
        r.engine
            .submit(1, hot1[0], 0, Priority::Urgent, None)
            .unwrap(),
    ];
    for id in ids {
        assert_eq!(r.engine.status(id).unwrap(), TransferStatus::InFlight);
    }
    assert_eq!(ring.in_use(), 3, "each copy in flight holds one slot");
    assert_eq!(manual.pending().len(), 3);
    manual.finish(ids[0], true);
    assert_eq!(
        ring.in_use(),
        3,
        "a finished copy keeps its slot until the engine settles it"
    );
    r.engine.poll();
    assert_eq!(ring.in_use(), 2);
    manual.finish(ids[1], false); // a failed copy gives its slot back too
    manual.finish(ids[2], true);
    r.engine.poll();
    assert_eq!(ring.in_use(), 0);
    assert_published_bytes(&r, 0, hot[0]);
    assert_published_bytes(&r, 1, hot1[0]);
    assert_eq!(
        r.table.published(0, hot[1]).unwrap().tier,
        1,
        "the failed copy kept it"
    );
    assert!(!cold.is_empty());
    drop(r);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_ring_smaller_than_max_in_flight_is_refused() {
    let dir = tempdir("small");
    let Err(err) = rig(&dir, 4, 2, 3, Arc::new(CpuBackend::new(1).unwrap())) else {
        panic!("a 2-slot ring with max_in_flight = 3 was accepted");
    };
    assert!(
        err.to_string().contains("fewer than max_in_flight"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
