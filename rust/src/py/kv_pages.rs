//! Glue for the KV cache's page pool (`KvPagePool`).

use std::sync::Mutex;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::kv_pages::{KvPageConfig, KvPagePool, SeqId};

use super::*;

// ---------------------------------------------------------------------------------------

/// Fixed-size KV pages from a `DeviceBudget`: block tables per sequence (lowest free
/// pages first), growth, truncation, and refcounted prefix pages keyed by a hash of their
/// tokens and of the prefix before them. The pages' memory is the caller's (one tensor
/// of `pages` pages per layer); this object decides which page holds what.
#[pyclass(frozen, name = "KvPagePool", module = "dynaexq._core")]
pub struct PyKvPagePool {
    inner: Mutex<KvPagePool>,
    budget: Py<PyDeviceBudget>,
}

fn seq_id(seq: i64) -> PyResult<SeqId> {
    u64::try_from(seq)
        .map_err(|_| PyValueError::new_err(format!("a sequence id must be >= 0, got {seq}")))
}

fn token_ids(tokens: Vec<i64>) -> PyResult<Vec<u32>> {
    tokens
        .into_iter()
        .map(|t| {
            u32::try_from(t)
                .map_err(|_| PyValueError::new_err(format!("token id {t} is not in 0..2^32")))
        })
        .collect()
}

fn token_count(tokens: i64) -> PyResult<u64> {
    u64::try_from(tokens)
        .map_err(|_| PyValueError::new_err(format!("a token count must be >= 0, got {tokens}")))
}

impl PyKvPagePool {
    fn with<R: Send>(&self, py: Python<'_>, f: impl FnOnce(&mut KvPagePool) -> R + Send) -> R {
        with_locked(py, &self.inner, f)
    }
}

#[pymethods]
impl PyKvPagePool {
    #[new]
    #[pyo3(signature = (page_tokens, page_bytes, pages, budget, online = None))]
    fn new(
        page_tokens: i64,
        page_bytes: i64,
        pages: i64,
        budget: Bound<'_, PyDeviceBudget>,
        online: Option<(u32, u32)>,
    ) -> PyResult<Self> {
        let page_tokens = u32::try_from(positive("page_tokens", page_tokens)?)
            .map_err(|_| PyValueError::new_err("page_tokens is too large"))?;
        let pages = u32::try_from(positive("pages", pages)?)
            .map_err(|_| PyValueError::new_err("pages is too large"))?;
        let config = KvPageConfig {
            page_tokens,
            page_bytes: positive("page_bytes", page_bytes)?,
            pages,
        };
        let online = online.map_or(0..pages, |(a, b)| a..b);
        let pool =
            KvPagePool::with_online(config, budget.get().inner.clone(), online).map_err(to_py)?;
        Ok(Self {
            inner: Mutex::new(pool),
            budget: budget.unbind(),
        })
    }

    #[getter]
    fn page_tokens(&self, py: Python<'_>) -> u32 {
        self.with(py, |p| p.page_tokens())
    }
    #[getter]
    fn page_bytes(&self, py: Python<'_>) -> u64 {
        self.with(py, |p| p.page_bytes())
    }
    #[getter]
    fn capacity(&self, py: Python<'_>) -> u32 {
        self.with(py, |p| p.capacity())
    }
    /// The budget the pages are reserved from.
    #[getter]
    fn budget(&self, py: Python<'_>) -> Py<PyDeviceBudget> {
        self.budget.clone_ref(py)
    }
    /// Pages a reservation could take now (free in the arena and covered by the budget).
    #[getter]
    fn available(&self, py: Python<'_>) -> u32 {
        self.with(py, |p| p.available())
    }
    /// Pages needed to hold `tokens` tokens.
    fn pages_for(&self, py: Python<'_>, tokens: i64) -> PyResult<u64> {
        let t = token_count(tokens)?;
        Ok(self.with(py, |p| p.pages_for(t)))
    }
    /// Pages `seq` still needs to hold `tokens` tokens.
    fn pages_short(&self, py: Python<'_>, seq: i64, tokens: i64) -> PyResult<u32> {
        let (s, t) = (seq_id(seq)?, token_count(tokens)?);
        self.with(py, |p| p.pages_short(s, t)).map_err(to_py)
    }

    /// Bring pages start..stop online (memory lent to the KV cache); all or nothing.
    fn add_pages(&self, py: Python<'_>, start: u32, stop: u32) -> PyResult<()> {
        self.with(py, |p| p.add_pages(start..stop)).map_err(to_py)
    }
    /// Take pages start..stop offline (cached ones are evicted); ValueError while a
    /// sequence holds one of them.
    fn remove_pages(&self, py: Python<'_>, start: u32, stop: u32) -> PyResult<()> {
        self.with(py, |p| p.remove_pages(start..stop))
            .map_err(to_py)
    }
    /// Whether no sequence holds any of pages start..stop.
    fn range_unheld(&self, py: Python<'_>, start: u32, stop: u32) -> bool {
        self.with(py, |p| p.range_unheld(start..stop))
    }
    fn is_online(&self, py: Python<'_>, page: u32) -> bool {
        self.with(py, |p| p.is_online(page))
    }
    /// Whether the page is a published page no sequence holds (kept for reuse).
    fn is_cached(&self, py: Python<'_>, page: u32) -> bool {
        self.with(py, |p| p.is_cached(page))
    }

    /// Start a sequence with no pages; ValueError if the id is open already.
    fn open(&self, py: Python<'_>, seq: i64) -> PyResult<()> {
        let s = seq_id(seq)?;
        self.with(py, |p| p.open(s)).map_err(to_py)
    }
    /// Take the published pages of the prompt's longest shared prefix into the new
    /// sequence; returns the tokens they cover (never the prompt's last token).
    fn share_prefix(&self, py: Python<'_>, seq: i64, prompt: Vec<i64>) -> PyResult<u64> {
        let (s, prompt) = (seq_id(seq)?, token_ids(prompt)?);
        self.with(py, |p| p.share_prefix(s, &prompt)).map_err(to_py)
    }
    /// Grow the sequence to hold `tokens` tokens: all new pages (lowest free first) or
    /// none; PoolExhausted when the arena or the budget cannot cover them.
    fn reserve(&self, py: Python<'_>, seq: i64, tokens: i64) -> PyResult<Vec<u32>> {
        let (s, t) = (seq_id(seq)?, token_count(tokens)?);
        self.with(py, |p| p.reserve(s, t)).map_err(to_py)
    }
    /// Enter the sequence's full pages holding `tokens` (ids from position 0, already
    /// written) into the prefix map; returns the pages newly published.
    fn publish(&self, py: Python<'_>, seq: i64, tokens: Vec<i64>) -> PyResult<u32> {
        let (s, tokens) = (seq_id(seq)?, token_ids(tokens)?);
        self.with(py, |p| p.publish(s, &tokens)).map_err(to_py)
    }
    /// Drop the pages past `tokens`; returns the pages freed.
    fn truncate(&self, py: Python<'_>, seq: i64, tokens: i64) -> PyResult<u32> {
        let (s, t) = (seq_id(seq)?, token_count(tokens)?);
        self.with(py, |p| p.truncate(s, t)).map_err(to_py)
    }
    /// End the sequence; returns the pages freed (shared pages stay while held).
    fn close(&self, py: Python<'_>, seq: i64) -> PyResult<u32> {
        let s = seq_id(seq)?;
        self.with(py, |p| p.close(s)).map_err(to_py)
    }
    /// The sequence's pages in token order.
    fn block_table(&self, py: Python<'_>, seq: i64) -> PyResult<Vec<u32>> {
        let s = seq_id(seq)?;
        self.with(py, |p| p.block_table(s).map(|t| t.to_vec()))
            .map_err(to_py)
    }
    /// Tokens the sequence's pages are reserved for.
    fn tokens(&self, py: Python<'_>, seq: i64) -> PyResult<u64> {
        let s = seq_id(seq)?;
        self.with(py, |p| p.tokens(s)).map_err(to_py)
    }
    /// How many sequences hold `page` (0: free).
    fn refcount(&self, py: Python<'_>, page: i64) -> PyResult<u32> {
        let page =
            u32::try_from(page).map_err(|_| PyValueError::new_err(format!("no page {page}")))?;
        self.with(py, |p| p.refcount(page)).map_err(to_py)
    }
    fn __contains__(&self, py: Python<'_>, seq: i64) -> bool {
        seq_id(seq).is_ok_and(|s| self.with(py, |p| p.contains(s)))
    }
    fn __len__(&self, py: Python<'_>) -> usize {
        self.with(py, |p| p.num_sequences())
    }

    /// page_tokens, page_bytes, capacity, used, available, online, cached, evicted,
    /// shared, published, sequences, prefix_hit_pages, high_water.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.with(py, |p| p.stats());
        let d = PyDict::new(py);
        d.set_item("page_tokens", s.page_tokens)?;
        d.set_item("page_bytes", s.page_bytes)?;
        d.set_item("capacity", s.capacity)?;
        d.set_item("used", s.used)?;
        d.set_item("available", s.available)?;
        d.set_item("online", s.online)?;
        d.set_item("cached", s.cached)?;
        d.set_item("evicted", s.evicted)?;
        d.set_item("shared", s.shared)?;
        d.set_item("published", s.published)?;
        d.set_item("sequences", s.sequences)?;
        d.set_item("prefix_hit_pages", s.prefix_hit_pages)?;
        d.set_item("high_water", s.high_water)?;
        Ok(d)
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let s = self.with(py, |p| p.stats());
        format!(
            "KvPagePool(page_tokens={}, capacity={}, used={}, sequences={})",
            s.page_tokens, s.capacity, s.used, s.sequences
        )
    }
}
