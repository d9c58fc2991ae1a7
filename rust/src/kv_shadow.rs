//! The operation language and shadow model of the KV page pool on a budget shared with
//! the expert pool, run by the fuzz target (`fuzz/fuzz_targets/kv_pages_ops.rs`), the
//! saved-corpus replay (`rust/tests/fuzz_corpus.rs`) and the proptest
//! (`rust/tests/kv_pages.rs`). Always compiled, like `shadow.rs`.
//!
//! [`run_kv`] reads a configuration from the first bytes (page size, page count, expert
//! classes, budget, KV floor and ceiling), then one operation per byte pair: open, share a
//! prefix, reserve, publish, truncate, close a sequence; allocate, reserve, commit, free an
//! expert slot; move the KV bounds and the experts' floor; lend an expert slot to the
//! pages (its page rows come online, its head hosts a slot of the smaller class) and
//! take one back (its pages offline, then the slot). Pages are rows of the expert pool's
//! one arena: the first `pages` rows are its KV head, the others lie inside lent slots.
//! Each runs on the real pools and
//! on a plain model, and after every operation it checks: the tracker's expert bytes equal
//! the expert pool's, its KV bytes equal the pages in use x page bytes, max(experts,
//! expert floor) + max(KV, KV floor) <= limit, every page's refcount equals the sequences
//! holding it, free pages are exactly those with none, new pages are the lowest free
//! ones (then the oldest cached), cached pages are exactly the model's in release order,
//! online pages lie in the head or in a lent slot and never in a live expert block, and
//! block tables and prefix hits equal the model's (which keys prefixes by their full token
//! list, not by hash). It returns the trace of handed-out pages and offsets
//! (replaying the same bytes gives the same) and how often each outcome happened (so
//! tests can show the inputs are not vacuous).

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range;
use std::sync::Arc;

use crate::budget::DeviceBudget;
use crate::errors::Error;
use crate::kv_pages::{KvPageConfig, KvPagePool, SeqId};
use crate::pool::{Block, ClassId, ClassSpec, ExpertPool, LentSlot, PoolConfig};

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
    /// Online pages no sequence holds that are not cached.
    free: BTreeSet<u32>,
    /// Published pages no sequence holds, oldest release first.
    cached: Vec<u32>,
    online: BTreeSet<u32>,
    /// Lent host slots and the page rows each brought online.
    lent: BTreeMap<u32, Range<u32>>,
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
    fn kv_bytes(&self) -> u64 {
        let held: BTreeSet<u32> = self.seqs.values().flat_map(|s| s.pages.clone()).collect();
        held.len() as u64 * self.page_bytes
    }
    fn kv_headroom(&self, kv_now: u64) -> u64 {
        self.limit
            .saturating_sub(self.expert_bytes.max(self.expert_floor) + kv_now)
            .min(self.ceiling.saturating_sub(kv_now))
    }
    /// Unpublish `page` and every published page whose prefix extends its own; the
    /// cached ones among them become free.
    fn unpublish(&mut self, page: u32) {
        let Some(prefix) = self.published.get(&page).cloned() else {
            return;
        };
        let gone: Vec<u32> = self
            .published
            .iter()
            .filter(|(_, p)| p.starts_with(&prefix))
            .map(|(&q, _)| q)
            .collect();
        for q in gone {
            let p = self.published.remove(&q).unwrap();
            self.prefix.remove(&p);
            if let Some(at) = self.cached.iter().position(|&c| c == q) {
                self.cached.remove(at);
                self.free.insert(q);
            }
        }
    }
    fn refs(&self, page: u32) -> u32 {
        self.seqs
            .values()
            .filter(|s| s.pages.contains(&page))
            .count() as u32
    }
    /// Pages the sequence let go (deepest first): unheld ones are cached if published.
    fn release(&mut self, pages: &[u32]) -> u32 {
        let mut freed = 0;
        for &page in pages.iter().rev() {
            if self.refs(page) == 0 {
                if self.published.contains_key(&page) {
                    self.cached.push(page);
                } else {
                    assert!(self.free.insert(page));
                }
                freed += 1;
            }
        }
        freed
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
    pub cached_hit_pages: u64,
    pub evictions: u64,
    pub slots_lent: u64,
    pub slots_taken_back: u64,
    pub take_back_refusals: u64,
}

/// The page rows lying wholly inside a lent slot's KV bytes (below `capacity`).
fn lent_rows(lent: &LentSlot, page_bytes: u64, capacity: u32) -> Range<u32> {
    let (offset, len) = lent.kv_range();
    let first = offset.div_ceil(page_bytes).min(capacity as u64) as u32;
    let end = ((offset + len) / page_bytes).min(capacity as u64) as u32;
    first..end.max(first)
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
    // The larger class lends its slots; a lent slot hosts one of the smaller.
    let plain = ExpertPool::new_virtual(&config).expect("valid config");
    let (s0, s1) = (
        plain.slot_bytes(ClassId(0)).unwrap(),
        plain.slot_bytes(ClassId(1)).unwrap(),
    );
    let (host, guest) = if s1 >= s0 { (1usize, 0usize) } else { (0, 1) };
    let guest_regular = plain.capacity(ClassId(guest as u16)).unwrap();
    let kv_total = pages as u64 * page_bytes;
    let config = config
        .kv_head_bytes(kv_total)
        .lending(format!("c{host}"), format!("c{guest}"));
    let expert_total = ExpertPool::new_virtual(&config)
        .expect("valid config")
        .total_bytes();
    // A limit between a tenth and all of what both pools could hold.
    let limit = ((expert_total + kv_total) * (1 + bytes.byte() as u64 % 10) / 10).max(1);
    let floor = (limit * (bytes.byte() % 4) as u64 / 8).min(kv_total);
    let ceiling = floor.max(limit * (4 + (bytes.byte() % 5) as u64) / 8);
    let budget =
        Arc::new(DeviceBudget::with_kv_bounds(limit, floor, ceiling).expect("valid bounds"));
    let mut experts =
        ExpertPool::new_virtual_shared(&config, budget.clone()).expect("valid config");
    // Page numbers are the arena's rows (at most 96 past the head, to keep checks cheap).
    let rows = ((expert_total / page_bytes) as u32).min(pages + 96);
    let kv_config = KvPageConfig {
        page_tokens,
        page_bytes,
        pages: rows,
    };
    let mut kv = KvPagePool::with_online(kv_config, budget.clone(), 0..pages).expect("valid");
    let host_id = ClassId(host as u16);
    let mut model = Model {
        page_tokens: page_tokens as u64,
        page_bytes,
        free: (0..pages).collect(),
        cached: Vec::new(),
        online: (0..pages).collect(),
        lent: BTreeMap::new(),
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
        let op = bytes.byte() % 14;
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
                let mut kv_now = model.kv_bytes();
                for i in 0..usable {
                    let end = ((i + 1) * model.page_tokens) as usize;
                    let Some(&page) = model.prefix.get(&prompt[..end]) else {
                        break;
                    };
                    if let Some(at) = model.cached.iter().position(|&c| c == page) {
                        // A cached page takes its bytes back, if the budget has them.
                        if model.page_bytes > model.kv_headroom(kv_now) {
                            break;
                        }
                        kv_now += model.page_bytes;
                        model.cached.remove(at);
                        out.cached_hit_pages += 1;
                    }
                    hit.push(page);
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
                let headroom = model.kv_headroom(model.kv_bytes());
                let r = kv.reserve(id, tokens);
                if grow == 0 {
                    assert_eq!(r.expect("no growth"), Vec::<u32>::new());
                } else if need > (model.free.len() + model.cached.len()) as u64 {
                    assert!(matches!(r, Err(Error::PagesExhausted { .. })), "{r:?}");
                    out.pages_exhausted += 1;
                } else if nbytes > headroom {
                    assert!(matches!(r, Err(Error::BudgetExceeded { .. })), "{r:?}");
                    out.kv_budget_refusals += 1;
                } else {
                    out.pages_reserved += need;
                    let new = r.expect("reserve that fits");
                    // The lowest free page, else the oldest cached one (evicted, with the
                    // cached tail of its chain, which becomes free), page by page.
                    let mut expect: Vec<u32> = Vec::new();
                    while expect.len() < need as usize {
                        if model.free.is_empty() {
                            let page = model.cached[0];
                            model.unpublish(page);
                            out.evictions += 1;
                            assert!(model.free.remove(&page));
                            expect.push(page);
                        } else {
                            expect.push(model.free.pop_first().unwrap());
                        }
                    }
                    assert_eq!(new, expect, "not the lowest free pages");
                    trace.extend(new.iter().map(|&p| p as u64));
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
                assert_eq!(freed, model.release(&dropped), "pages freed");
                if partial {
                    let last = model.seqs[&id].pages[keep - 1];
                    model.unpublish(last);
                }
            }
            5 => {
                let r = kv.close(id);
                match model.seqs.remove(&id) {
                    None => assert!(matches!(r, Err(Error::UnknownSequence(_))), "{r:?}"),
                    Some(s) => {
                        assert_eq!(r.expect("close"), model.release(&s.pages));
                    }
                }
            }
            6 | 7 => {
                // Acquire an expert slot (committed, or pending as for a copy in flight).
                let c = (arg % 2) as usize;
                let need = model.expert_slot_bytes[c];
                let charged = model.expert_bytes + model.kv_bytes().max(model.floor);
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
                let kv_now = model.kv_bytes();
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
            12 => {
                // Lend the lowest free slot of the host class: its rows come online.
                let r = experts.lend(host_id);
                let Some(&i) = model.expert_free[host].first() else {
                    assert!(matches!(r, Err(Error::Exhausted { .. })), "{r:?}");
                    continue;
                };
                let lent = r.expect("lend of a free slot");
                assert_eq!(lent.index, i, "not the lowest free slot lent");
                model.expert_free[host].remove(&i);
                model.expert_free[guest].insert(guest_regular + i);
                let rows = lent_rows(&lent, page_bytes, kv.capacity());
                kv.add_pages(rows.clone())
                    .expect("the rows of a lent slot are offline");
                model.online.extend(rows.clone());
                model.free.extend(rows.clone());
                model.lent.insert(i, rows);
                out.slots_lent += 1;
                trace.push(lent.offset);
            }
            13 => {
                // Take a lent slot back: its pages first (refused while held), then the
                // slot (refused while its guest slot is live; the pages come back).
                if model.lent.is_empty() {
                    assert!(experts.unlend(host_id, u32::MAX).is_err());
                    continue;
                }
                let (&i, rows) = model
                    .lent
                    .iter()
                    .nth(arg as usize % model.lent.len())
                    .unwrap();
                let rows = rows.clone();
                let held = rows.clone().any(|p| model.refs(p) > 0);
                let r = kv.remove_pages(rows.clone());
                if held {
                    assert!(matches!(r, Err(Error::IllegalLend(_))), "{r:?}");
                    out.take_back_refusals += 1;
                    continue;
                }
                r.expect("remove of unheld pages");
                for p in rows.clone() {
                    if model.cached.contains(&p) {
                        model.unpublish(p);
                    }
                }
                for p in rows.clone() {
                    model.online.remove(&p);
                    assert!(model.free.remove(&p));
                }
                let guest_free = model.expert_free[guest].contains(&(guest_regular + i));
                let r = experts.unlend(host_id, i);
                if !guest_free {
                    assert!(matches!(r, Err(Error::IllegalLend(_))), "{r:?}");
                    kv.add_pages(rows.clone())
                        .expect("the pages taken back are offline");
                    model.online.extend(rows.clone());
                    model.free.extend(rows);
                    out.take_back_refusals += 1;
                    continue;
                }
                r.expect("unlend of a slot whose guest is free");
                model.expert_free[guest].remove(&(guest_regular + i));
                model.expert_free[host].insert(i);
                model.lent.remove(&i);
                out.slots_taken_back += 1;
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
    for (&i, rows) in &model.lent {
        assert_eq!(
            experts
                .lent_slot(host_id, i)
                .map(|l| lent_rows(&l, page_bytes, kv.capacity())),
            Some(rows.clone())
        );
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

fn check(model: &Model, kv: &KvPagePool, experts: &ExpertPool, budget: &DeviceBudget, head: u32) {
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
    assert_eq!(snap.kv_bytes, model.kv_bytes(), "tracker vs model pages");
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
    for page in 0..kv.capacity() {
        let refs = model.refs(page);
        assert_eq!(kv.refcount(page).unwrap(), refs, "refcount of page {page}");
        let online = model.online.contains(&page);
        assert_eq!(kv.is_online(page), online, "page {page} online");
        let cached = model.cached.contains(&page);
        assert_eq!(kv.is_cached(page), cached, "page {page} cached");
        assert_eq!(
            model.free.contains(&page),
            online && refs == 0 && !cached,
            "page {page} free iff online, unheld and not cached"
        );
        assert!(online || refs == 0, "an offline page {page} is held");
        assert!(!cached || model.published.contains_key(&page));
        assert_eq!(kv.is_published(page), model.published.contains_key(&page));
        // Physically: an online page is a row of the KV head or of a lent slot, and no
        // live expert block overlaps it.
        if online {
            assert!(
                page < head || model.lent.values().any(|r| r.contains(&page)),
                "online page {page} is neither the head's nor a lent slot's"
            );
            let (lo, hi) = (
                page as u64 * model.page_bytes,
                (page as u64 + 1) * model.page_bytes,
            );
            for (b, _) in &model.experts {
                assert!(
                    b.offset + b.nbytes <= lo || hi <= b.offset,
                    "page {page} overlaps a live expert block {b:?}"
                );
            }
        }
    }
    let st = kv.stats();
    assert_eq!(st.published as usize, model.prefix.len());
    assert_eq!(st.cached as usize, model.cached.len());
    assert_eq!(st.online as usize, model.online.len());
    assert_eq!(
        experts.lent(ClassId(0)).len() + experts.lent(ClassId(1)).len(),
        model.lent.len()
    );
}
