//! The KV cache's page pool: fixed-size pages of `page_tokens` tokens, one block table per
//! sequence, and prefix pages shared between sequences by reference count.
//!
//! Pages are numbered 0..capacity inside one arena the caller owns (a torch tensor of
//! `[capacity, ...]` per layer); the pool only decides which page holds what. Like the
//! expert pool it never fragments (every page has the same size) and it is deterministic:
//! free pages live in a [`FreeBitmap`] and a reservation always takes the lowest free
//! indices, so the same calls give the same block tables.
//!
//! Every page in use holds `page_bytes` of the [`DeviceBudget`] it shares with the expert
//! pool: a reservation first takes its bytes from the tracker (all pages of one call at
//! once, or nothing), and freeing a page gives them back. A shared prefix page is counted
//! once however many sequences hold it.
//!
//! Prefix sharing: after a sequence's keys and values for a prefix are computed, `publish`
//! enters each of its full pages under a chain key (a hash of the page's tokens and of the
//! key of the page before it, [`page_keys`]). A new sequence's `share_prefix` walks its
//! prompt's chain keys and takes every page it finds, stopping at the first miss; a hit is
//! verified against the stored tokens and the parent page, so a hash collision can never
//! hand out another prompt's keys and values. The page holding a prompt's last token is
//! never shared (the model must compute that token's logits, and so write its page).
//! Pages are published only while the chain from page 0 is published, so one prefix maps
//! to one page.
//!
//! Cached prefix pages: when the last holder of a published page lets it go, the page
//! stays in the prefix map, cached: it holds no budget (its bytes are free for experts
//! and pages alike) and counts as available, and a later prompt with the same prefix
//! takes it back (reserving its bytes again) instead of computing it. A reservation that
//! finds no free page evicts the least recently released cached page (the deepest page
//! of a sequence is released first, so chains are evicted from their tails).
//!
//! Online pages: page numbers may name memory that is not always the pool's (a page
//! number is a row of the one arena the expert pool and the pages share; rows inside an
//! expert slot lent to the KV cache exist only while it is lent). Offline pages are never
//! handed out; `add_pages` brings a range online and `remove_pages` takes a range back,
//! all-or-nothing, only while no sequence holds any of its pages (cached ones are
//! evicted).

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::Arc;

use crate::budget::{BudgetUse, DeviceBudget};
use crate::errors::{Error, Result};
use crate::pool::FreeBitmap;

/// Caller-chosen id of one sequence's KV.
pub type SeqId = u64;

/// Page pool construction parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvPageConfig {
    /// Tokens per page.
    pub page_tokens: u32,
    /// Device bytes of one page over all layers (keys and values).
    pub page_bytes: u64,
    /// Pages in the arena (the most the pool can hand out, budget permitting).
    pub pages: u32,
}

/// Statistics of the page pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvPageStats {
    pub page_tokens: u32,
    pub page_bytes: u64,
    pub capacity: u32,
    /// Pages held by at least one sequence.
    pub used: u32,
    /// Pages a reservation could take now (arena and budget permitting).
    pub available: u32,
    /// Pages that may be handed out (the rest are offline).
    pub online: u32,
    /// Published pages no sequence holds (kept for reuse until evicted).
    pub cached: u32,
    /// Cached pages evicted for a reservation, since construction.
    pub evicted: u64,
    /// Pages held by more than one sequence.
    pub shared: u32,
    /// Pages in the prefix map.
    pub published: u32,
    pub sequences: u32,
    /// Pages taken from the prefix map instead of computed, since construction.
    pub prefix_hit_pages: u64,
    pub high_water: u32,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// The chain key of every full page of `tokens`: key(i) = FNV-1a(key(i-1), tokens of page
/// i), key(-1) = the FNV offset basis. Stable across runs and platforms.
pub fn page_keys(tokens: &[u32], page_tokens: u32) -> Vec<u64> {
    let pt = page_tokens.max(1) as usize;
    let mut key = FNV_OFFSET;
    tokens
        .chunks_exact(pt)
        .map(|page| {
            key = fnv(FNV_OFFSET, &key.to_le_bytes());
            for t in page {
                key = fnv(key, &t.to_le_bytes());
            }
            key
        })
        .collect()
}

#[derive(Clone, Debug)]
struct Published {
    key: u64,
    /// The page before it and that page's publication (a page number is reused once its
    /// page is freed or evicted; the publication number is not).
    parent: Option<(u32, u64)>,
    publication: u64,
    tokens: Box<[u32]>,
}

#[derive(Clone, Debug, Default)]
struct SeqPages {
    pages: Vec<u32>,
    tokens: u64,
}

/// The page pool. Mutating calls take `&mut self`; share it behind a mutex.
pub struct KvPagePool {
    config: KvPageConfig,
    free: FreeBitmap,
    refs: Vec<u32>,
    published: Vec<Option<Published>>,
    prefix: HashMap<u64, u32>,
    seqs: BTreeMap<SeqId, SeqPages>,
    budget: Arc<DeviceBudget>,
    used: u32,
    high_water: u32,
    prefix_hit_pages: u64,
    online: Vec<bool>,
    online_count: u32,
    /// Cached pages by release order (oldest first), and each cached page's tick.
    cached: BTreeMap<u64, u32>,
    cached_at: Vec<Option<u64>>,
    tick: u64,
    evicted: u64,
    publications: u64,
    /// Published pages whose parent is the page (to unpublish a chain's tail with it).
    children: Vec<Vec<u32>>,
}

impl std::fmt::Debug for KvPagePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvPagePool")
            .field("config", &self.config)
            .field("used", &self.used)
            .field("sequences", &self.seqs.len())
            .finish()
    }
}

impl KvPagePool {
    /// A pool of `config.pages` pages, all online, whose bytes come from `budget`.
    pub fn new(config: KvPageConfig, budget: Arc<DeviceBudget>) -> Result<Self> {
        Self::with_online(config, budget, 0..config.pages)
    }

    /// A pool whose pages `online` are online (the rest wait for `add_pages`).
    pub fn with_online(
        config: KvPageConfig,
        budget: Arc<DeviceBudget>,
        online: Range<u32>,
    ) -> Result<Self> {
        if config.page_tokens == 0 {
            return Err(Error::InvalidConfig("page_tokens must be > 0".into()));
        }
        if config.page_bytes == 0 {
            return Err(Error::InvalidConfig("page_bytes must be > 0".into()));
        }
        if config.pages == 0 {
            return Err(Error::InvalidConfig(
                "a page pool needs at least one page".into(),
            ));
        }
        if online.end > config.pages {
            return Err(Error::InvalidConfig(format!(
                "online pages {online:?} exceed the {} pages",
                config.pages
            )));
        }
        let n = config.pages as usize;
        let mut free = FreeBitmap::new(config.pages);
        let is_online: Vec<bool> = (0..config.pages).map(|p| online.contains(&p)).collect();
        for p in (0..config.pages).filter(|&p| !online.contains(&p)) {
            free.take(p);
        }
        Ok(Self {
            config,
            free,
            refs: vec![0; n],
            published: vec![None; n],
            prefix: HashMap::new(),
            seqs: BTreeMap::new(),
            budget,
            used: 0,
            high_water: 0,
            prefix_hit_pages: 0,
            online_count: online.len() as u32,
            online: is_online,
            cached: BTreeMap::new(),
            cached_at: vec![None; n],
            tick: 0,
            evicted: 0,
            publications: 0,
            children: vec![Vec::new(); n],
        })
    }

    fn check_range(&self, pages: &Range<u32>) -> Result<()> {
        if pages.end > self.config.pages || pages.start > pages.end {
            return Err(Error::OutOfRange(format!(
                "pages {pages:?} of {}",
                self.config.pages
            )));
        }
        Ok(())
    }

    /// Bring offline pages online (memory that became the KV cache's). All or nothing.
    pub fn add_pages(&mut self, pages: Range<u32>) -> Result<()> {
        self.check_range(&pages)?;
        if let Some(p) = pages.clone().find(|&p| self.online[p as usize]) {
            return Err(Error::IllegalLend(format!("page {p} is online already")));
        }
        for p in pages {
            self.online[p as usize] = true;
            let ok = self.free.free(p);
            debug_assert!(ok, "an offline page is not in the free list");
            self.online_count += 1;
        }
        Ok(())
    }

    /// Take online pages offline (memory going back to the experts), evicting the cached
    /// ones. All or nothing: refused while a sequence holds one of them.
    pub fn remove_pages(&mut self, pages: Range<u32>) -> Result<()> {
        self.check_range(&pages)?;
        for p in pages.clone() {
            if !self.online[p as usize] {
                return Err(Error::IllegalLend(format!("page {p} is offline")));
            }
            if self.refs[p as usize] > 0 {
                return Err(Error::IllegalLend(format!(
                    "page {p} is held by {} sequences",
                    self.refs[p as usize]
                )));
            }
        }
        // Evict the cached pages first (their chains' cached tails become free), then
        // every page of the range is free.
        for p in pages.clone() {
            if self.cached_at[p as usize].is_some() {
                self.unpublish(p);
            }
        }
        for p in pages {
            let ok = self.free.take(p);
            debug_assert!(ok, "an unheld, uncached online page is free");
            self.online[p as usize] = false;
            self.online_count -= 1;
        }
        Ok(())
    }

    /// Whether no sequence holds any page of `pages` (they could go offline now).
    pub fn range_unheld(&self, pages: Range<u32>) -> bool {
        pages.end <= self.config.pages && pages.into_iter().all(|p| self.refs[p as usize] == 0)
    }
    pub fn is_online(&self, page: u32) -> bool {
        self.online.get(page as usize).copied().unwrap_or(false)
    }
    pub fn is_cached(&self, page: u32) -> bool {
        self.cached_at
            .get(page as usize)
            .is_some_and(|t| t.is_some())
    }
    fn unheld(&self) -> u32 {
        self.free.free_count() + self.cached.len() as u32
    }

    pub fn config(&self) -> KvPageConfig {
        self.config
    }
    pub fn page_tokens(&self) -> u32 {
        self.config.page_tokens
    }
    pub fn page_bytes(&self) -> u64 {
        self.config.page_bytes
    }
    pub fn capacity(&self) -> u32 {
        self.config.pages
    }
    pub fn budget_tracker(&self) -> &Arc<DeviceBudget> {
        &self.budget
    }
    /// Pages needed to hold `tokens` tokens.
    pub fn pages_for(&self, tokens: u64) -> u64 {
        tokens.div_ceil(self.config.page_tokens as u64)
    }

    /// Pages a reservation could take now: free or cached, and covered by the budget.
    pub fn available(&self) -> u32 {
        let by_budget = self.budget.snapshot().kv_headroom() / self.config.page_bytes;
        (self.unheld() as u64).min(by_budget) as u32
    }

    /// Pages `seq` still needs to hold `tokens` tokens (0 when it already does).
    pub fn pages_short(&self, seq: SeqId, tokens: u64) -> Result<u32> {
        let s = self.seq(seq)?;
        Ok(self.pages_for(tokens).saturating_sub(s.pages.len() as u64) as u32)
    }

    fn seq(&self, seq: SeqId) -> Result<&SeqPages> {
        self.seqs.get(&seq).ok_or(Error::UnknownSequence(seq))
    }

    pub fn contains(&self, seq: SeqId) -> bool {
        self.seqs.contains_key(&seq)
    }
    pub fn num_sequences(&self) -> usize {
        self.seqs.len()
    }
    pub fn sequence_ids(&self) -> Vec<SeqId> {
        self.seqs.keys().copied().collect()
    }

    /// The sequence's pages in token order: token t lives in page `table[t / page_tokens]`
    /// at row `t % page_tokens`.
    pub fn block_table(&self, seq: SeqId) -> Result<&[u32]> {
        Ok(&self.seq(seq)?.pages)
    }
    /// Tokens the sequence's pages are reserved for.
    pub fn tokens(&self, seq: SeqId) -> Result<u64> {
        Ok(self.seq(seq)?.tokens)
    }
    /// How many sequences hold `page` (0 = free).
    pub fn refcount(&self, page: u32) -> Result<u32> {
        self.refs
            .get(page as usize)
            .copied()
            .ok_or_else(|| Error::OutOfRange(format!("page {page} of {}", self.config.pages)))
    }
    pub fn is_published(&self, page: u32) -> bool {
        self.published
            .get(page as usize)
            .is_some_and(|p| p.is_some())
    }

    /// Start a sequence with no pages.
    pub fn open(&mut self, seq: SeqId) -> Result<()> {
        if self.seqs.contains_key(&seq) {
            return Err(Error::SequenceExists(seq));
        }
        self.seqs.insert(seq, SeqPages::default());
        Ok(())
    }

    /// Take the published pages of `prompt`'s longest shared prefix into the new (empty)
    /// sequence `seq`; returns the tokens covered (a multiple of `page_tokens`, always
    /// less than the prompt's length). Costs no budget: the pages are already counted.
    pub fn share_prefix(&mut self, seq: SeqId, prompt: &[u32]) -> Result<u64> {
        let s = self.seq(seq)?;
        if !s.pages.is_empty() || s.tokens != 0 {
            return Err(Error::IllegalPageOp {
                seq,
                reason: "share_prefix needs a sequence that holds no pages yet".into(),
            });
        }
        let pt = self.config.page_tokens as usize;
        // The page of the last prompt token stays private (its logits are computed).
        let usable = prompt.len().saturating_sub(1) / pt;
        let keys = page_keys(&prompt[..usable * pt], self.config.page_tokens);
        let mut taken = Vec::new();
        let mut parent = None;
        for (i, key) in keys.iter().enumerate() {
            let Some(&page) = self.prefix.get(key) else {
                break;
            };
            let p = self.published[page as usize]
                .as_ref()
                .expect("the prefix map only names published pages");
            if p.parent != parent || *p.tokens != prompt[i * pt..(i + 1) * pt] {
                break; // a hash collision: not this prefix
            }
            let publication = p.publication;
            if self.cached_at[page as usize].is_some()
                && self
                    .budget
                    .try_take(BudgetUse::KvPages, self.config.page_bytes)
                    .is_err()
            {
                break; // a cached page needs its bytes back, and the budget has none
            }
            if let Some(t) = self.cached_at[page as usize].take() {
                self.cached.remove(&t);
                self.used += 1;
            }
            self.refs[page as usize] += 1;
            taken.push(page);
            parent = Some((page, publication));
        }
        self.high_water = self.high_water.max(self.used);
        self.prefix_hit_pages += taken.len() as u64;
        let tokens = (taken.len() * pt) as u64;
        let s = self.seqs.get_mut(&seq).expect("checked above");
        s.pages = taken;
        s.tokens = tokens;
        Ok(tokens)
    }

    /// Grow `seq` to hold `tokens` tokens: all pages it needs are taken (lowest free
    /// indices, bytes from the budget) or none is. Returns the new pages. Asking for no
    /// more than it holds changes nothing.
    pub fn reserve(&mut self, seq: SeqId, tokens: u64) -> Result<Vec<u32>> {
        let s = self.seq(seq)?;
        if tokens <= s.tokens {
            return Ok(Vec::new());
        }
        let need_pages = self.pages_for(tokens) - s.pages.len() as u64;
        let need = u32::try_from(need_pages).map_err(|_| Error::PagesExhausted {
            need: u32::MAX,
            free: self.free.free_count(),
            capacity: self.config.pages,
        })?;
        if need > self.unheld() {
            return Err(Error::PagesExhausted {
                need,
                free: self.unheld(),
                capacity: self.online_count,
            });
        }
        let nbytes = need as u64 * self.config.page_bytes;
        if let Err(snap) = self.budget.try_take(BudgetUse::KvPages, nbytes) {
            return Err(Error::BudgetExceeded {
                class: BudgetUse::KvPages.name().into(),
                need: nbytes,
                reserved: snap.used(),
                budget: snap.limit,
            });
        }
        // Free pages first (lowest indices), then the oldest cached ones.
        let new: Vec<u32> = (0..need)
            .map(|_| match self.free.alloc() {
                Some(page) => page,
                None => self.evict_oldest(),
            })
            .collect();
        for &page in &new {
            self.refs[page as usize] = 1;
        }
        self.used += need;
        self.high_water = self.high_water.max(self.used);
        let s = self.seqs.get_mut(&seq).expect("checked above");
        s.pages.extend_from_slice(&new);
        s.tokens = tokens;
        Ok(new)
    }

    /// Enter `seq`'s full pages into the prefix map. `tokens` are the sequence's token ids
    /// from position 0 whose keys and values are already written (at most its tokens).
    /// Returns the pages newly published.
    pub fn publish(&mut self, seq: SeqId, tokens: &[u32]) -> Result<u32> {
        let s = self.seq(seq)?;
        if tokens.len() as u64 > s.tokens {
            return Err(Error::IllegalPageOp {
                seq,
                reason: format!(
                    "cannot publish {} tokens: the sequence holds {}",
                    tokens.len(),
                    s.tokens
                ),
            });
        }
        let pt = self.config.page_tokens as usize;
        let keys = page_keys(tokens, self.config.page_tokens);
        let pages = s.pages.clone();
        let mut count = 0;
        let mut parent = None;
        for (i, &key) in keys.iter().enumerate() {
            let page = pages[i];
            if self.published[page as usize].is_none() {
                if self.prefix.contains_key(&key) {
                    // Another page holds this prefix (or a colliding one): the chain of
                    // this sequence stops being shareable here.
                    break;
                }
                self.publications += 1;
                self.published[page as usize] = Some(Published {
                    key,
                    parent,
                    publication: self.publications,
                    tokens: tokens[i * pt..(i + 1) * pt].into(),
                });
                self.prefix.insert(key, page);
                if let Some((parent, _)) = parent {
                    self.children[parent as usize].push(page);
                }
                count += 1;
            }
            let publication = self.published[page as usize]
                .as_ref()
                .expect("published above or before")
                .publication;
            parent = Some((page, publication));
        }
        Ok(count)
    }

    /// Drop the sequence's pages past `tokens` (undo a reservation that was not used, or
    /// roll back). Refused when it would leave the sequence writing into a page another
    /// sequence holds. Returns the pages freed.
    pub fn truncate(&mut self, seq: SeqId, tokens: u64) -> Result<u32> {
        let s = self.seq(seq)?;
        if tokens >= s.tokens {
            return Ok(0);
        }
        let keep = self.pages_for(tokens) as usize;
        let pt = self.config.page_tokens as u64;
        if tokens % pt != 0 {
            let last = s.pages[keep - 1];
            if self.refs[last as usize] > 1 {
                return Err(Error::IllegalPageOp {
                    seq,
                    reason: format!(
                        "truncating to {tokens} tokens would write into page {last}, which \
                         {} sequences share",
                        self.refs[last as usize]
                    ),
                });
            }
        }
        let s = self.seqs.get_mut(&seq).expect("checked above");
        let dropped: Vec<u32> = s.pages.split_off(keep);
        s.tokens = tokens;
        let last_partial = (tokens % pt != 0).then(|| s.pages[keep - 1]);
        let freed = self.release(&dropped);
        if let Some(page) = last_partial {
            // Its tail will be rewritten with other tokens: it is no prefix page any more
            // (nor are the dropped pages after it, cached just now).
            self.unpublish(page);
        }
        Ok(freed)
    }

    /// End the sequence (finished, cancelled or preempted): every page it held loses a
    /// holder; pages with none left are freed. Returns the pages freed.
    pub fn close(&mut self, seq: SeqId) -> Result<u32> {
        let s = self.seqs.remove(&seq).ok_or(Error::UnknownSequence(seq))?;
        Ok(self.release(&s.pages))
    }

    /// Evict the oldest cached page (and its chain's cached tail) and take it.
    fn evict_oldest(&mut self) -> u32 {
        let (_, page) = self
            .cached
            .first_key_value()
            .expect("unheld pages were counted");
        let page = *page;
        self.unpublish(page);
        self.evicted += 1;
        let ok = self.free.take(page);
        debug_assert!(ok, "an evicted page is free");
        page
    }

    /// Take `page` out of the prefix map, and every page published after it in its
    /// chain (their prefix is gone): cached ones become free, held ones stay private. So
    /// a published page's parent is always published, as the chain check assumes.
    fn unpublish(&mut self, page: u32) {
        let mut stack = vec![page];
        while let Some(page) = stack.pop() {
            let Some(p) = self.published[page as usize].take() else {
                continue;
            };
            if self.prefix.get(&p.key) == Some(&page) {
                self.prefix.remove(&p.key);
            }
            if let Some((parent, _)) = p.parent {
                self.children[parent as usize].retain(|&c| c != page);
            }
            if let Some(t) = self.cached_at[page as usize].take() {
                self.cached.remove(&t);
                let ok = self.free.free(page);
                debug_assert!(ok, "a cached page is not in the free list");
            }
            stack.append(&mut self.children[page as usize]);
        }
    }

    /// Drop one holder of each page, deepest first; a page left without holders is
    /// cached if published, free otherwise. Returns the pages no sequence holds now.
    fn release(&mut self, pages: &[u32]) -> u32 {
        let mut freed = 0u32;
        for &page in pages.iter().rev() {
            let r = &mut self.refs[page as usize];
            debug_assert!(*r > 0, "a held page has a holder");
            *r -= 1;
            if *r == 0 {
                if self.published[page as usize].is_some() {
                    self.tick += 1;
                    self.cached.insert(self.tick, page);
                    self.cached_at[page as usize] = Some(self.tick);
                } else {
                    let ok = self.free.free(page);
                    debug_assert!(ok, "refcounts and bitmap disagree");
                }
                freed += 1;
            }
        }
        self.used -= freed;
        self.budget
            .give(BudgetUse::KvPages, freed as u64 * self.config.page_bytes);
        freed
    }

    pub fn stats(&self) -> KvPageStats {
        KvPageStats {
            page_tokens: self.config.page_tokens,
            page_bytes: self.config.page_bytes,
            capacity: self.config.pages,
            used: self.used,
            available: self.available(),
            online: self.online_count,
            cached: self.cached.len() as u32,
            evicted: self.evicted,
            shared: self.refs.iter().filter(|&&r| r > 1).count() as u32,
            published: self.prefix.len() as u32,
            sequences: self.seqs.len() as u32,
            prefix_hit_pages: self.prefix_hit_pages,
            high_water: self.high_water,
        }
    }
}

impl Drop for KvPagePool {
    /// The tracker outlives the pool: give back the pages still held.
    fn drop(&mut self) {
        self.budget.give(
            BudgetUse::KvPages,
            self.used as u64 * self.config.page_bytes,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(pages: u32, limit: u64) -> KvPagePool {
        let cfg = KvPageConfig {
            page_tokens: 4,
            page_bytes: 100,
            pages,
        };
        KvPagePool::new(cfg, Arc::new(DeviceBudget::new(limit).unwrap())).unwrap()
    }

    #[test]
    fn reserve_takes_lowest_pages_all_or_nothing() {
        let mut p = pool(8, 10_000);
        p.open(1).unwrap();
        p.open(2).unwrap();
        assert_eq!(p.reserve(1, 5).unwrap(), vec![0, 1]);
        assert_eq!(p.reserve(2, 4).unwrap(), vec![2]);
        assert_eq!(p.reserve(1, 8).unwrap(), Vec::<u32>::new());
        assert_eq!(p.reserve(1, 9).unwrap(), vec![3]);
        assert_eq!(p.close(2).unwrap(), 1);
        assert_eq!(p.reserve(1, 20).unwrap(), vec![2, 4]);
        assert_eq!(p.block_table(1).unwrap(), &[0, 1, 3, 2, 4]);
        // 4 more pages would fit the budget but only 3 are free: nothing is taken.
        p.open(3).unwrap();
        assert!(matches!(
            p.reserve(3, 16),
            Err(Error::PagesExhausted {
                need: 4,
                free: 3,
                ..
            })
        ));
        assert_eq!(p.stats().used, 5);
        assert!(matches!(p.open(3), Err(Error::SequenceExists(3))));
        assert!(matches!(p.close(9), Err(Error::UnknownSequence(9))));
    }

    #[test]
    fn budget_bounds_pages_and_drop_returns_bytes() {
        let budget = Arc::new(DeviceBudget::new(250).unwrap());
        let cfg = KvPageConfig {
            page_tokens: 4,
            page_bytes: 100,
            pages: 8,
        };
        let mut p = KvPagePool::new(cfg, budget.clone()).unwrap();
        p.open(1).unwrap();
        assert_eq!(p.available(), 2);
        assert!(matches!(
            p.reserve(1, 12),
            Err(Error::BudgetExceeded { .. })
        ));
        assert_eq!(budget.snapshot().kv_bytes, 0);
        p.reserve(1, 8).unwrap();
        assert_eq!(budget.snapshot().kv_bytes, 200);
        drop(p);
        assert_eq!(budget.snapshot().kv_bytes, 0);
    }

    #[test]
    fn prefix_pages_are_shared_and_counted_once() {
        let mut p = pool(16, 10_000);
        let prompt: Vec<u32> = (0..10).collect();
        p.open(1).unwrap();
        p.reserve(1, 10).unwrap();
        assert_eq!(p.publish(1, &prompt).unwrap(), 2);
        // Same 10 tokens: pages 0 and 1 are shared, the third (last token) is private.
        p.open(2).unwrap();
        assert_eq!(p.share_prefix(2, &prompt).unwrap(), 8);
        p.reserve(2, 10).unwrap();
        assert_eq!(p.block_table(2).unwrap(), &[0, 1, 3]);
        assert_eq!((p.refcount(0).unwrap(), p.refcount(2).unwrap()), (2, 1));
        // A prompt that diverges in its second page shares only the first.
        let mut other = prompt.clone();
        other[5] = 99;
        p.open(3).unwrap();
        assert_eq!(p.share_prefix(3, &other).unwrap(), 4);
        // A prompt of exactly 8 tokens keeps its second page private.
        p.open(4).unwrap();
        assert_eq!(p.share_prefix(4, &prompt[..8]).unwrap(), 4);
        assert_eq!(p.stats().used, 4);
        assert_eq!(p.budget_tracker().snapshot().kv_bytes, 400);
        assert!(p.truncate(2, 6).is_err(), "page 1 is shared");
        p.close(1).unwrap();
        p.close(2).unwrap();
        // Page 0 is still held by 3 and 4; page 1 is held by none, cached for reuse.
        assert!(p.is_published(0) && p.is_cached(1) && !p.is_cached(0));
        assert_eq!(p.stats().used, 1);
        p.open(5).unwrap();
        assert_eq!(p.share_prefix(5, &prompt).unwrap(), 8);
        assert!(!p.is_cached(1));
        assert_eq!(p.budget_tracker().snapshot().kv_bytes, 200);
        assert!(matches!(
            p.share_prefix(5, &prompt),
            Err(Error::IllegalPageOp { .. })
        ));
    }

    #[test]
    fn truncate_frees_the_tail_and_unpublishes_a_rewritten_page() {
        let mut p = pool(8, 10_000);
        let prompt: Vec<u32> = (0..12).collect();
        p.open(1).unwrap();
        p.reserve(1, 12).unwrap();
        p.publish(1, &prompt).unwrap();
        assert_eq!(p.truncate(1, 6).unwrap(), 1);
        // Page 1 will be rewritten: unpublished, and page 2 after it in its chain with
        // it (its prefix is gone), so it is free rather than cached.
        assert!(p.is_published(0) && !p.is_published(1));
        assert!(!p.is_published(2) && !p.is_cached(2));
        assert_eq!(p.stats().available, 6);
        assert_eq!(p.tokens(1).unwrap(), 6);
        assert!(p.publish(1, &prompt).is_err(), "more tokens than held");
    }

    #[test]
    fn bad_configs_are_refused() {
        let b = Arc::new(DeviceBudget::new(10).unwrap());
        for (t, bytes, n) in [(0, 1, 1), (1, 0, 1), (1, 1, 0)] {
            let cfg = KvPageConfig {
                page_tokens: t,
                page_bytes: bytes,
                pages: n,
            };
            assert!(matches!(
                KvPagePool::new(cfg, b.clone()),
                Err(Error::InvalidConfig(_))
            ));
        }
    }

    #[test]
    fn chain_keys_depend_on_the_whole_prefix() {
        let a = page_keys(&[1, 2, 3, 4, 5, 6], 2);
        let b = page_keys(&[9, 2, 3, 4, 5, 6], 2);
        assert_eq!(a.len(), 3);
        assert!(a.iter().zip(&b).all(|(x, y)| x != y));
        assert_eq!(page_keys(&[1, 2, 3], 2).len(), 1);
        assert_eq!(a, page_keys(&[1, 2, 3, 4, 5, 6], 2));
    }

    #[test]
    fn cached_pages_are_reused_then_evicted_oldest_first() {
        let mut p = pool(4, 10_000);
        let prompt: Vec<u32> = (0..13).collect();
        p.open(1).unwrap();
        p.reserve(1, 13).unwrap();
        assert_eq!(p.publish(1, &prompt).unwrap(), 3);
        assert_eq!(p.close(1).unwrap(), 4);
        // Three published pages stay cached (no budget held), the fourth is free.
        let st = p.stats();
        assert_eq!((st.used, st.cached, st.available), (0, 3, 4));
        assert_eq!(p.budget_tracker().snapshot().kv_bytes, 0);
        // The same prompt takes them back: its bytes are reserved again.
        p.open(2).unwrap();
        assert_eq!(p.share_prefix(2, &prompt).unwrap(), 12);
        assert_eq!(p.block_table(2).unwrap(), &[0, 1, 2]);
        assert_eq!(p.budget_tracker().snapshot().kv_bytes, 300);
        p.close(2).unwrap();
        // Pressure: the free page first, then cached pages, deepest (released first) first.
        p.open(3).unwrap();
        assert_eq!(p.reserve(3, 8).unwrap(), vec![3, 2]);
        assert!(!p.is_published(2) && p.is_cached(1));
        assert_eq!(p.stats().evicted, 1);
        // A prompt whose chain lost its tail shares what is left.
        p.open(4).unwrap();
        assert_eq!(p.share_prefix(4, &prompt).unwrap(), 8);
        assert!(matches!(
            p.reserve(4, 13),
            Err(Error::PagesExhausted {
                need: 2,
                free: 0,
                ..
            })
        ));
    }

    #[test]
    fn offline_pages_are_never_handed_out() {
        let cfg = KvPageConfig {
            page_tokens: 4,
            page_bytes: 100,
            pages: 10,
        };
        let budget = Arc::new(DeviceBudget::new(10_000).unwrap());
        let mut p = KvPagePool::with_online(cfg, budget, 0..2).unwrap();
        assert_eq!(p.stats().online, 2);
        p.open(1).unwrap();
        assert!(matches!(
            p.reserve(1, 12),
            Err(Error::PagesExhausted { .. })
        ));
        p.add_pages(6..9).unwrap();
        assert!(matches!(p.add_pages(8..10), Err(Error::IllegalLend(_))));
        assert_eq!(p.reserve(1, 12).unwrap(), vec![0, 1, 6]);
        assert!(matches!(p.remove_pages(6..9), Err(Error::IllegalLend(_))));
        assert!(!p.range_unheld(6..9) && p.range_unheld(7..9));
        p.publish(1, &(0..12).collect::<Vec<_>>()).unwrap();
        p.close(1).unwrap();
        // A cached page in the range is evicted when the range goes offline.
        assert!(p.is_cached(6));
        p.remove_pages(6..9).unwrap();
        assert!(!p.is_published(6) && !p.is_online(6));
        assert!(matches!(p.remove_pages(6..7), Err(Error::IllegalLend(_))));
        assert!(matches!(p.add_pages(9..11), Err(Error::OutOfRange(_))));
        p.open(2).unwrap();
        assert!(p
            .reserve(2, 12)
            .unwrap_err()
            .to_string()
            .contains("2 of 2 pages free; 3 are needed"));
    }
}
