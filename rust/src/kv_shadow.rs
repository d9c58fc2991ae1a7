//! The operation language and shadow model of the KV page pool on a budget shared with
//! the expert pool, run by the fuzz target (`fuzz/fuzz_targets/kv_pages_ops.rs`), the
//! saved-corpus replay (`rust/tests/fuzz_corpus.rs`) and the proptest
//! (`rust/tests/kv_pages.rs`). Always compiled, like `shadow.rs`.
//!
//! [`run_kv`] reads a configuration from the first bytes (page size, page count, expert
//! classes, budget, KV floor and ceiling), then one operation per byte pair: open, share a
//! prefix, reserve, publish, truncate, close a sequence; allocate, reserve, commit, free an
//! expert slot; move the KV bounds and the experts' floor. Each runs on the real pools and
//! on a plain model, and after every operation it checks: the tracker's expert bytes equal
//! the expert pool's, its KV bytes equal the pages in use x page bytes, max(experts,
//! expert floor) + max(KV, KV floor) <= limit, every page's refcount equals the sequences
//! holding it, free pages are exactly those with none, new pages are the lowest free
//! ones, and block tables and prefix hits equal the model's (which keys prefixes by their
//! full token list, not by hash). It returns the trace of handed-out pages and offsets
//! (replaying the same bytes gives the same) and how often each outcome happened (so
//! tests can show the inputs are not vacuous).

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use crate::budget::DeviceBudget;
use crate::errors::Error;
use crate::kv_pages::{KvPageConfig, KvPagePool, SeqId};
use crate::pool::{Block, ClassId, ClassSpec, ExpertPool, PoolConfig};

struct Bytes<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Bytes<'_> {
    fn byte(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    fn more(&self) -> bool {
        self.pos < self.data.len()
    }
}

struct SeqModel {
    pages: Vec<u32>,
    tokens: u64,
    /// Which token family the sequence's prompt follows, and where it leaves it.
    family: u32,
    diverge: u64,
}

impl SeqModel {
    /// The token at `position`: shared by every sequence of the family up to `diverge`,
    /// then the sequence's own.
    fn token(&self, id: SeqId, position: u64) -> u32 {
        if position < self.diverge {
            self.family * 1000 + (position % 5) as u32
        } else {
            100_000 + id as u32 * 1000 + position as u32
        }
    }
    fn token_ids(&self, id: SeqId, n: u64) -> Vec<u32> {
        (0..n).map(|p| self.token(id, p)).collect()
    }
}

struct Model {
    page_tokens: u64,
    page_bytes: u64,
    free: BTreeSet<u32>,
    seqs: BTreeMap<SeqId, SeqModel>,
    /// Published pages by the full token prefix they end.
    prefix: HashMap<Vec<u32>, u32>,
    /// The prefix each published page ends.
    published: HashMap<u32, Vec<u32>>,
    limit: u64,
    floor: u64,
    ceiling: u64,
    expert_floor: u64,
    expert_bytes: u64,
    /// Expert blocks the interpreter owns, with their "pending" flag.
    experts: Vec<(Block, bool)>,
    expert_free: Vec<BTreeSet<u32>>,
    expert_slot_bytes: Vec<u64>,
}

impl Model {
    fn kv_bytes(&self, capacity: u32) -> u64 {
        (capacity as u64 - self.free.len() as u64) * self.page_bytes
    }
    fn refs(&self, page: u32) -> u32 {
        self.seqs
            .values()
            .filter(|s| s.pages.contains(&page))
            .count() as u32
    }
    fn release(&mut self, pages: &[u32]) {
        for &page in pages {
            if self.refs(page) == 0 {
                if let Some(prefix) = self.published.remove(&page) {
                    self.prefix.remove(&prefix);
                }
                assert!(self.free.insert(page));
            }
        }
    }
}

/// What one run did: its trace and how often each outcome happened.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KvRun {
    pub trace: Vec<u64>,
    pub pages_reserved: u64,
    pub kv_budget_refusals: u64,
    pub pages_exhausted: u64,
    pub prefix_hit_pages: u64,
    pub expert_budget_refusals: u64,
    pub expert_slots_taken: u64,
    pub shared_truncate_refusals: u64,
}

fn kind(e: &Error) -> std::mem::Discriminant<Error> {
    std::mem::discriminant(e)
}

/// Interpret `data`; panics on any disagreement. Returns the trace.
pub fn run_kv(data: &[u8]) -> KvRun {
    let mut bytes = Bytes { data, pos: 0 };
    let page_tokens = 1 + (bytes.byte() % 6) as u32;
    let pages = 1 + (bytes.byte() % 24) as u32;
    let page_bytes = 1 + bytes.byte() as u64 * 7;
    let specs: Vec<ClassSpec> = (0..2)
        .map(|i| {
            ClassSpec::new(
                format!("c{i}"),
                1 + bytes.byte() as u64 * 11,
                1 + (bytes.byte() % 6) as u32,
            )
        })
        .collect();
    let config = PoolConfig::new(specs).alignment(1 << (bytes.byte() % 5));
    let expert_total = ExpertPool::new_virtual(&config)
        .expect("valid config")
        .total_bytes();
    let kv_total = pages as u64 * page_bytes;
    // A limit between a tenth and all of what both pools could hold.
    let limit = ((expert_total + kv_total) * (1 + bytes.byte() as u64 % 10) / 10).max(1);
    let floor = (limit * (bytes.byte() % 4) as u64 / 8).min(kv_total);
    let ceiling = floor.max(limit * (4 + (bytes.byte() % 5) as u64) / 8);
    let budget =
        Arc::new(DeviceBudget::with_kv_bounds(limit, floor, ceiling).expect("valid bounds"));
    let mut experts =
        ExpertPool::new_virtual_shared(&config, budget.clone()).expect("valid config");
    let kv_config = KvPageConfig {
        page_tokens,
        page_bytes,
        pages,
    };
    let mut kv = KvPagePool::new(kv_config, budget.clone()).expect("valid config");
    let mut model = Model {
        page_tokens: page_tokens as u64,
        page_bytes,
        free: (0..pages).collect(),
        seqs: BTreeMap::new(),
        prefix: HashMap::new(),
        published: HashMap::new(),
        limit,
        floor,
        ceiling: ceiling.min(limit),
        expert_floor: 0,
        expert_bytes: 0,
        experts: Vec::new(),
        expert_free: (0..2)
            .map(|c| (0..experts.capacity(ClassId(c)).unwrap()).collect())
            .collect(),
        expert_slot_bytes: (0..2)
            .map(|c| experts.slot_bytes(ClassId(c)).unwrap())
            .collect(),
    };
    let mut out = KvRun::default();
    let trace = &mut out.trace;
    let mut steps = 0;
    while bytes.more() && steps < 2000 {
        steps += 1;
        let op = bytes.byte() % 12;
        let arg = bytes.byte();
        let id = (arg % 6) as SeqId;
        match op {
            0 => {
                let r = kv.open(id);
                match model.seqs.entry(id) {
                    Entry::Occupied(_) => {
                        assert!(matches!(r, Err(Error::SequenceExists(_))), "{r:?}")
                    }
                    Entry::Vacant(slot) => {
                        r.expect("open of a new id");
                        let family = (arg / 6 % 3) as u32;
                        let diverge = (bytes.byte() % 40) as u64;
                        slot.insert(SeqModel {
                            pages: Vec::new(),
                            tokens: 0,
                            family,
                            diverge,
                        });
                    }
                }
            }
            1 => {
                // Share the prefix of a prompt of `len` tokens.
                let len = (arg / 6) as u64;
                let Some(s) = model.seqs.get(&id) else {
                    assert!(matches!(
                        kv.share_prefix(id, &[]),
                        Err(Error::UnknownSequence(_))
                    ));
                    continue;
                };
                let prompt = s.token_ids(id, len);
                let r = kv.share_prefix(id, &prompt);
                if !s.pages.is_empty() || s.tokens != 0 {
                    assert!(matches!(r, Err(Error::IllegalPageOp { .. })), "{r:?}");
                    continue;
                }
                let usable = len.saturating_sub(1) / model.page_tokens;
                let mut hit = Vec::new();
                for i in 0..usable {
                    let end = ((i + 1) * model.page_tokens) as usize;
                    match model.prefix.get(&prompt[..end]) {
                        Some(&page) => hit.push(page),
                        None => break,
                    }
                }
                let got = r.expect("share_prefix of an empty sequence");
                assert_eq!(
                    got,
                    hit.len() as u64 * model.page_tokens,
                    "prefix hit length"
                );
                assert_eq!(kv.block_table(id).unwrap(), &hit[..], "shared pages");
                out.prefix_hit_pages += hit.len() as u64;
                let s = model.seqs.get_mut(&id).unwrap();
                s.tokens = got;
                s.pages = hit;
            }
            2 => {
                let grow = (arg / 6 % 32) as u64;
                let Some(s) = model.seqs.get(&id) else {
                    assert!(matches!(
                        kv.reserve(id, grow),
                        Err(Error::UnknownSequence(_))
                    ));
                    continue;
                };
                let tokens = s.tokens + grow;
                let need = tokens.div_ceil(model.page_tokens) - s.pages.len() as u64;
                let nbytes = need * model.page_bytes;
                let kv_now = model.kv_bytes(pages);
                let headroom = model
                    .limit
                    .saturating_sub(model.expert_bytes.max(model.expert_floor) + kv_now)
                    .min(model.ceiling.saturating_sub(kv_now));
                let r = kv.reserve(id, tokens);
                if grow == 0 {
                    assert_eq!(r.expect("no growth"), Vec::<u32>::new());
                } else if need > model.free.len() as u64 {
                    assert!(matches!(r, Err(Error::PagesExhausted { .. })), "{r:?}");
                    out.pages_exhausted += 1;
                } else if nbytes > headroom {
                    assert!(matches!(r, Err(Error::BudgetExceeded { .. })), "{r:?}");
                    out.kv_budget_refusals += 1;
                } else {
                    out.pages_reserved += need;
                    let new = r.expect("reserve that fits");
                    let lowest: Vec<u32> = model.free.iter().take(need as usize).copied().collect();
                    assert_eq!(new, lowest, "not the lowest free pages");
                    for p in &new {
                        model.free.remove(p);
                        trace.push(*p as u64);
                    }
                    let s = model.seqs.get_mut(&id).unwrap();
                    s.pages.extend(new);
                    s.tokens = tokens;
                }
            }
            3 => {
                let Some(s) = model.seqs.get(&id) else {
                    continue;
                };
                // Publish all held tokens, or (odd arg) one token more than held.
                let n = s.tokens + (arg / 6 % 2) as u64;
                let tokens = s.token_ids(id, n);
                let r = kv.publish(id, &tokens);
                if n > s.tokens {
                    assert!(matches!(r, Err(Error::IllegalPageOp { .. })), "{r:?}");
                    continue;
                }
                let mut expect = 0;
                for i in 0..(n / model.page_tokens) as usize {
                    let page = s.pages[i];
                    let prefix = tokens[..(i + 1) * model.page_tokens as usize].to_vec();
                    if !model.published.contains_key(&page) {
                        if model.prefix.contains_key(&prefix) {
                            break;
                        }
                        model.prefix.insert(prefix.clone(), page);
                        model.published.insert(page, prefix);
                        expect += 1;
                    }
                }
                assert_eq!(
                    r.expect("publish of held tokens"),
                    expect,
                    "pages published"
                );
            }
            4 => {
                let Some(s) = model.seqs.get(&id) else {
                    assert!(matches!(kv.truncate(id, 0), Err(Error::UnknownSequence(_))));
                    continue;
                };
                let tokens = s.tokens * (arg / 6 % 5) as u64 / 4;
                let r = kv.truncate(id, tokens);
                if tokens >= s.tokens {
                    assert_eq!(r.expect("no-op truncate"), 0);
                    continue;
                }
                let keep = tokens.div_ceil(model.page_tokens) as usize;
                let partial = tokens % model.page_tokens != 0;
                if partial && model.refs(s.pages[keep - 1]) > 1 {
                    assert!(matches!(r, Err(Error::IllegalPageOp { .. })), "{r:?}");
                    out.shared_truncate_refusals += 1;
                    continue;
                }
                let freed = r.expect("truncate of private pages");
                let s = model.seqs.get_mut(&id).unwrap();
                let dropped = s.pages.split_off(keep);
                s.tokens = tokens;
                if partial {
                    let last = s.pages[keep - 1];
                    if let Some(prefix) = model.published.remove(&last) {
                        model.prefix.remove(&prefix);
                    }
                }
                let before = model.free.len();
                model.release(&dropped);
                assert_eq!(freed as usize, model.free.len() - before, "pages freed");
            }
            5 => {
                let r = kv.close(id);
                match model.seqs.remove(&id) {
                    None => assert!(matches!(r, Err(Error::UnknownSequence(_))), "{r:?}"),
                    Some(s) => {
                        let before = model.free.len();
                        model.release(&s.pages);
                        assert_eq!(r.expect("close") as usize, model.free.len() - before);
                    }
                }
            }
            6 | 7 => {
                // Acquire an expert slot (committed, or pending as for a copy in flight).
                let c = (arg % 2) as usize;
                let need = model.expert_slot_bytes[c];
                let charged = model.expert_bytes + model.kv_bytes(pages).max(model.floor);
                let r = if op == 6 {
                    experts.alloc(ClassId(c as u16))
                } else {
                    experts.try_reserve(ClassId(c as u16))
                };
                match model.expert_free[c].first().copied() {
                    None => assert!(matches!(r, Err(Error::Exhausted { .. })), "{r:?}"),
                    Some(_) if charged + need > model.limit => {
                        assert!(matches!(r, Err(Error::BudgetExceeded { .. })), "{r:?}");
                        out.expert_budget_refusals += 1;
                    }
                    Some(i) => {
                        out.expert_slots_taken += 1;
                        let b = r.expect("expert slot that fits");
                        assert_eq!(b.index, i, "not the lowest free slot");
                        model.expert_free[c].remove(&i);
                        model.expert_bytes += need;
                        model.experts.push((b, op == 7));
                        trace.push(b.offset);
                    }
                }
            }
            8 | 9 => {
                // Release an expert slot (a demotion's old block reclaimed), or commit one.
                if model.experts.is_empty() {
                    continue;
                }
                let k = arg as usize % model.experts.len();
                let (b, pending) = model.experts[k];
                if op == 9 && pending {
                    experts.commit(&b).expect("commit of a pending slot");
                    model.experts[k].1 = false;
                    continue;
                }
                experts.free(b).expect("free of an owned slot");
                model.experts.swap_remove(k);
                model.expert_free[b.class.0 as usize].insert(b.index);
                model.expert_bytes -= b.nbytes;
            }
            10 => {
                // Move the KV bounds.
                let new_floor = (limit * (arg % 5) as u64 / 8).min(kv_total);
                let new_ceiling = new_floor.max(limit * (1 + (arg / 5 % 8) as u64) / 8);
                let r = budget.set_kv_bounds(new_floor, new_ceiling);
                let kv_now = model.kv_bytes(pages);
                let experts = model.expert_bytes.max(model.expert_floor);
                if experts + kv_now.max(new_floor) > model.limit {
                    assert!(matches!(r, Err(Error::BudgetExceeded { .. })), "{r:?}");
                } else {
                    r.expect("bounds that fit");
                    model.floor = new_floor;
                    model.ceiling = new_ceiling.min(model.limit);
                }
                // Every third time, the experts' floor moves too.
                if arg % 3 == 0 {
                    let expert_floor = limit * (arg / 3 % 5) as u64 / 8;
                    let r = budget.set_expert_floor(expert_floor);
                    if expert_floor + kv_now.max(model.floor) > model.limit {
                        assert!(matches!(r, Err(Error::BudgetExceeded { .. })), "{r:?}");
                    } else {
                        r.expect("an expert floor that fits");
                        model.expert_floor = expert_floor;
                    }
                }
            }
            _ => {
                // Errors for unknown sequences are the same whatever the call.
                let missing = 1000 + arg as SeqId;
                for r in [
                    kv.close(missing).map(|_| ()),
                    kv.reserve(missing, 1).map(|_| ()),
                ] {
                    assert!(matches!(r, Err(Error::UnknownSequence(_))));
                }
                let e = kv.block_table(missing).unwrap_err();
                assert_eq!(kind(&e), kind(&Error::UnknownSequence(0)));
            }
        }
        check(&model, &kv, &experts, &budget, pages);
    }
    drop(kv);
    assert_eq!(
        budget.snapshot().kv_bytes,
        0,
        "a dropped page pool keeps bytes"
    );
    drop(experts);
    assert_eq!(
        budget.snapshot().used(),
        0,
        "a dropped expert pool keeps bytes"
    );
    out
}

fn check(model: &Model, kv: &KvPagePool, experts: &ExpertPool, budget: &DeviceBudget, pages: u32) {
    let snap = budget.snapshot();
    assert_eq!(
        snap.expert_bytes,
        experts.reserved_bytes(),
        "tracker vs expert pool"
    );
    assert_eq!(
        snap.expert_bytes, model.expert_bytes,
        "tracker vs model experts"
    );
    assert_eq!(
        snap.kv_bytes,
        model.kv_bytes(pages),
        "tracker vs model pages"
    );
    assert_eq!(
        snap.kv_bytes,
        kv.stats().used as u64 * kv.page_bytes(),
        "tracker vs pages"
    );
    assert!(snap.charged() <= snap.limit, "budget exceeded: {snap:?}");
    assert!(
        snap.high_water <= snap.limit,
        "high water above the limit: {snap:?}"
    );
    assert_eq!(
        (snap.kv_floor, snap.kv_ceiling),
        (model.floor, model.ceiling)
    );
    assert_eq!(kv.num_sequences(), model.seqs.len());
    for (&id, s) in &model.seqs {
        assert_eq!(
            kv.block_table(id).unwrap(),
            &s.pages[..],
            "block table of {id}"
        );
        assert_eq!(kv.tokens(id).unwrap(), s.tokens);
        assert_eq!(s.pages.len() as u64, s.tokens.div_ceil(model.page_tokens));
        let distinct: BTreeSet<_> = s.pages.iter().collect();
        assert_eq!(distinct.len(), s.pages.len(), "a page twice in one table");
    }
    for page in 0..pages {
        let refs = model.refs(page);
        assert_eq!(kv.refcount(page).unwrap(), refs, "refcount of page {page}");
        assert_eq!(
            model.free.contains(&page),
            refs == 0,
            "page {page} free iff unheld"
        );
        assert_eq!(kv.is_published(page), model.published.contains_key(&page));
    }
    assert_eq!(kv.stats().published as usize, model.prefix.len());
}
