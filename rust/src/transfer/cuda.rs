//! The CUDA copy backend (feature "cuda"): cudarc's driver API, loaded at run time, so the
//! crate builds and its CPU tests run on machines without CUDA.
//!
//! - [`driver_available`] checks for the driver library before the first CUDA call (a
//!   missing library is an `Error::Backend`, never a panic inside cudarc).
//! - [`DeviceArena`]: the pool's arena in device memory (reserved once, `cuMemAlloc`).
//! - [`PinnedArena`]: page-locked host memory for the host tier store, so host-to-device
//!   copies are truly asynchronous.
//! - [`CudaBackend`]: a dedicated non-blocking migration stream; each transfer is one
//!   `cuMemcpyHtoDAsync` followed by an event; completion is `cuEventQuery` (polling).
//! - [`CudaUseFence`]: every use of a block is an event on the compute stream (borrowed
//!   from e.g. torch, whose stream object the fence keeps alive), in one ordered sequence,
//!   so an old block is reclaimed only after every kernel that read it has finished.

use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use cudarc::driver::{result, sys, CudaContext, CudaEvent, CudaStream};

use super::{CopyBackend, CopyHandle, CopyJob, CopyState, Fault, Notifier};
use crate::errors::{Error, Result};
use crate::fence::{CompletionMark, OrderedUses, StreamMarks};
use crate::pool::{Arena, ArenaKind};

fn backend_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Backend(format!("{what}: {e:?}"))
}

/// Whether the CUDA driver library can be loaded (checked before any CUDA call).
pub fn driver_available() -> bool {
    // SAFETY: only tries to dlopen the driver library by its usual names.
    unsafe { sys::is_culib_present() }
}

/// The context of device `ordinal`, or a clear error when there is no driver or device.
pub fn context(ordinal: usize) -> Result<Arc<CudaContext>> {
    if !driver_available() {
        return Err(Error::Backend(
            "the CUDA driver library (libcuda.so) is not available on this machine".into(),
        ));
    }
    CudaContext::new(ordinal).map_err(|e| backend_err(&format!("CUDA device {ordinal}"), e))
}

/// Device memory reserved once for a pool.
pub struct DeviceArena {
    ctx: Arc<CudaContext>,
    raw: sys::CUdeviceptr,
    base: u64,
    len: u64,
}

impl DeviceArena {
    pub fn new(ctx: &Arc<CudaContext>, len: u64, align: u64) -> Result<Self> {
        ctx.bind_to_thread()
            .map_err(|e| backend_err("bind context", e))?;
        // cuMemAlloc aligns to at least 256 B; over-allocate for larger alignments.
        let extra = if align > 256 { align } else { 0 };
        let bytes = usize::try_from(len + extra)
            .map_err(|_| Error::InvalidConfig("device arena too large".into()))?;
        // SAFETY: plain allocation on the bound context; freed once in Drop.
        let raw = unsafe { result::malloc_sync(bytes) }
            .map_err(|e| backend_err(&format!("cuMemAlloc({bytes} B)"), e))?;
        let base = if extra == 0 {
            raw
        } else {
            raw.div_ceil(align) * align
        };
        Ok(Self {
            ctx: ctx.clone(),
            raw,
            base,
            len,
        })
    }
}

impl Drop for DeviceArena {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: `raw` came from `malloc_sync` and is freed once.
            let _ = unsafe { result::free_sync(self.raw) };
        }
    }
}

impl std::fmt::Debug for DeviceArena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceArena({:#x}, {} B)", self.base, self.len)
    }
}

impl Arena for DeviceArena {
    fn kind(&self) -> ArenaKind {
        ArenaKind::Device
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if offset + buf.len() as u64 > self.len {
            return Err(Error::OutOfRange(format!(
                "read of {} B at {offset} in a {} B arena",
                buf.len(),
                self.len
            )));
        }
        self.ctx
            .bind_to_thread()
            .map_err(|e| backend_err("bind context", e))?;
        // SAFETY: the range lies inside this allocation (checked above); synchronous copy.
        unsafe { result::memcpy_dtoh_sync(buf, self.base + offset) }
            .map_err(|e| backend_err("cuMemcpyDtoH", e))
    }
    fn len(&self) -> u64 {
        self.len
    }
    fn base_address(&self) -> u64 {
        self.base
    }
}

/// Page-locked host memory (for the host tier store, and mapped into the device's address
/// space for the split arena's tail).
pub struct PinnedArena {
    ctx: Arc<CudaContext>,
    ptr: NonNull<u8>,
    len: u64,
    /// The device address of byte 0 when the memory is mapped (`PinnedArena::mapped`).
    device: Option<u64>,
}

// SAFETY: an owned allocation; access rules are the store's (written before freezing,
// read-only afterwards).
unsafe impl Send for PinnedArena {}
// SAFETY: as above.
unsafe impl Sync for PinnedArena {}

impl PinnedArena {
    pub fn new(ctx: &Arc<CudaContext>, len: u64, align: u64) -> Result<Self> {
        Self::with_flags(ctx, len, align, 0)
    }

    /// Page-locked memory the device's kernels and copies can address directly.
    pub fn mapped(ctx: &Arc<CudaContext>, len: u64, align: u64) -> Result<Self> {
        let mut arena = Self::with_flags(ctx, len, align, sys::CU_MEMHOSTALLOC_DEVICEMAP)?;
        let mut dptr: sys::CUdeviceptr = 0;
        // SAFETY: `ptr` came from cuMemHostAlloc with DEVICEMAP on the bound context;
        // `dptr` is a valid out-pointer.
        unsafe {
            sys::cuMemHostGetDevicePointer_v2(&mut dptr, arena.ptr.as_ptr().cast(), 0)
                .result()
                .map_err(|e| backend_err("cuMemHostGetDevicePointer", e))?
        };
        arena.device = Some(dptr);
        Ok(arena)
    }

    fn with_flags(ctx: &Arc<CudaContext>, len: u64, align: u64, flags: u32) -> Result<Self> {
        if align > 4096 {
            return Err(Error::InvalidConfig(
                "pinned host memory is page aligned (alignment <= 4096)".into(),
            ));
        }
        ctx.bind_to_thread()
            .map_err(|e| backend_err("bind context", e))?;
        let bytes = usize::try_from(len.max(1))
            .map_err(|_| Error::InvalidConfig("pinned arena too large".into()))?;
        // SAFETY: plain allocation; freed once in Drop.
        let p = unsafe { result::malloc_host(bytes, flags) }
            .map_err(|e| backend_err(&format!("cuMemHostAlloc({bytes} B)"), e))?;
        let ptr = NonNull::new(p as *mut u8)
            .ok_or_else(|| Error::Backend("cuMemHostAlloc returned null".into()))?;
        Ok(Self {
            ctx: ctx.clone(),
            ptr,
            len,
            device: None,
        })
    }
}

impl Drop for PinnedArena {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: `ptr` came from `malloc_host` and is freed once.
            let _ = unsafe { result::free_host(self.ptr.as_ptr() as *mut std::ffi::c_void) };
        }
    }
}

impl std::fmt::Debug for PinnedArena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PinnedArena({:#x}, {} B)",
            self.ptr.as_ptr() as usize,
            self.len
        )
    }
}

impl Arena for PinnedArena {
    fn kind(&self) -> ArenaKind {
        ArenaKind::Host
    }
    fn len(&self) -> u64 {
        self.len
    }
    fn base_address(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }
    fn host_ptr(&self) -> Option<NonNull<u8>> {
        Some(self.ptr)
    }
}

/// A pool arena in two parts: device memory for `[0, host_from)`, and page-locked host
/// memory mapped into the device's address space for `[host_from, len)`: the pool's
/// host-memory classes (a staging slot), which cost no device memory and which kernels
/// read over the link for the few steps an expert stays there. `address` says where a
/// byte is; `base_address` is the device part's byte 0.
pub struct SplitArena {
    device: DeviceArena,
    host: Option<PinnedArena>,
    host_from: u64,
    len: u64,
}

impl SplitArena {
    pub fn new(ctx: &Arc<CudaContext>, len: u64, align: u64, host_from: u64) -> Result<Self> {
        if host_from > len {
            return Err(Error::InvalidConfig(format!(
                "the host tail starts at {host_from} B, past the arena's {len} B"
            )));
        }
        let device = DeviceArena::new(ctx, host_from.max(1), align)?;
        let host = if host_from < len {
            Some(PinnedArena::mapped(ctx, len - host_from, align.min(4096))?)
        } else {
            None
        };
        Ok(Self {
            device,
            host,
            host_from,
            len,
        })
    }
}

impl std::fmt::Debug for SplitArena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SplitArena({:?}, host tail {:?} from {} B)",
            self.device, self.host, self.host_from
        )
    }
}

impl Arena for SplitArena {
    fn kind(&self) -> ArenaKind {
        ArenaKind::Device
    }
    fn len(&self) -> u64 {
        self.len
    }
    fn base_address(&self) -> u64 {
        self.device.base_address()
    }
    fn address(&self, offset: u64) -> u64 {
        match &self.host {
            Some(h) if offset >= self.host_from => {
                h.device.expect("mapped at construction") + (offset - self.host_from)
            }
            _ => self.device.base_address() + offset,
        }
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset + buf.len() as u64;
        if end > self.len {
            return Err(Error::OutOfRange(format!(
                "read of {} B at {offset} in a {} B arena",
                buf.len(),
                self.len
            )));
        }
        match &self.host {
            Some(h) if offset >= self.host_from => h.read(offset - self.host_from, buf),
            Some(_) if end > self.host_from => Err(Error::OutOfRange(format!(
                "a read of {} B at {offset} crosses the host tail at {} B",
                buf.len(),
                self.host_from
            ))),
            _ => self.device.read(offset, buf),
        }
    }
}

/// One transfer in flight: its event, and the job (which keeps source and destination
/// memory alive until the copy is done).
struct CudaHandle {
    event: Option<CudaEvent>,
    failed: Option<String>,
    _job: Mutex<Option<CopyJob>>,
}

impl CopyHandle for CudaHandle {
    fn state(&self) -> CopyState {
        if let Some(m) = &self.failed {
            return CopyState::Failed(m.clone());
        }
        match self.event.as_ref().map(|e| e.try_is_complete()) {
            None | Some(Ok(true)) => CopyState::Done,
            Some(Ok(false)) => CopyState::Pending,
            Some(Err(e)) => CopyState::Failed(format!("CUDA copy failed: {e:?}")),
        }
    }
}

/// Host-to-device copies on a dedicated non-blocking stream.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    notifier: Arc<Notifier>,
}

impl CudaBackend {
    pub fn new(ctx: &Arc<CudaContext>) -> Result<Self> {
        let stream = ctx
            .new_stream()
            .map_err(|e| backend_err("create the migration stream", e))?;
        Ok(Self {
            ctx: ctx.clone(),
            stream,
            notifier: Arc::new(Notifier::default()),
        })
    }
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
}

impl CopyBackend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }
    fn arena_kind(&self) -> ArenaKind {
        ArenaKind::Device
    }
    unsafe fn start(&self, job: CopyJob) -> Result<Arc<dyn CopyHandle>> {
        match job.fault {
            None => {}
            Some(Fault::Fail) => {
                return Ok(Arc::new(CudaHandle {
                    event: None,
                    failed: Some(format!("injected failure of transfer {}", job.id)),
                    _job: Mutex::new(Some(job)),
                }))
            }
            Some(_) => {
                return Err(Error::Backend(
                    "the CUDA backend injects only 'fail' faults".into(),
                ))
            }
        }
        self.ctx
            .bind_to_thread()
            .map_err(|e| backend_err("bind context", e))?;
        // SAFETY: the caller guarantees `src` readable and `dst` (a device address inside
        // the pool's device arena) writable for `len` bytes and unshared until the copy
        // completes; the handle keeps the job (and so both memories) alive until then.
        let src = unsafe { std::slice::from_raw_parts(job.src, job.len) };
        unsafe { result::memcpy_htod_async(job.dst, src, self.stream.cu_stream()) }
            .map_err(|e| backend_err("cuMemcpyHtoDAsync", e))?;
        let event = match self.stream.record_event(None) {
            Ok(ev) => ev,
            Err(e) => {
                // The copy is queued but has no event: wait for the stream before saying
                // Err, which tells the engine that nothing writes the block any more (a
                // failed synchronize leaves the context in a sticky error state, where
                // the device runs no further work).
                let _ = self.stream.synchronize();
                return Err(backend_err("record the copy event", e));
            }
        };
        Ok(Arc::new(CudaHandle {
            event: Some(event),
            failed: None,
            _job: Mutex::new(Some(job)),
        }))
    }
    fn notifier(&self) -> Arc<Notifier> {
        // Copies finish on the device without a host callback: waiters poll events.
        self.notifier.clone()
    }
}

/// A compute stream that the fence records its marks on, with whatever keeps it alive
/// (e.g. the Python `torch.cuda.Stream` object): the fence holds the owner for as long as
/// it may record on the stream, so the handle cannot be destroyed under it.
pub struct BorrowedStream {
    stream: Arc<CudaStream>,
    _owner: Option<Box<dyn Send + Sync>>,
}

impl BorrowedStream {
    /// Borrow the raw `CUstream` `raw` of `ctx` (0: the legacy default stream, which is
    /// never destroyed), kept alive by `owner`.
    ///
    /// # Safety
    /// `raw` must be a stream of `ctx` that stays valid while `owner` is alive (`None`
    /// only for streams that are never destroyed, like 0).
    pub unsafe fn new(
        ctx: &Arc<CudaContext>,
        raw: u64,
        owner: Option<Box<dyn Send + Sync>>,
    ) -> Self {
        // SAFETY: as documented; a borrowed stream is not destroyed on drop.
        let stream = unsafe { ctx.wrap_borrowed_stream(raw as sys::CUstream) };
        Self {
            stream,
            _owner: owner,
        }
    }
}

/// An event recorded on the compute stream (queried on its own: it stays valid whatever
/// happens to the stream it was recorded on).
pub struct UseEvent(CudaEvent);

impl CompletionMark for UseEvent {
    fn reached(&self) -> bool {
        // An error (e.g. a failed kernel) must not free memory still in use: not reached.
        self.0.try_is_complete().unwrap_or(false)
    }
}

impl StreamMarks for BorrowedStream {
    type Mark = UseEvent;
    fn mark(&self) -> std::result::Result<UseEvent, String> {
        self.stream
            .record_event(None)
            .map(UseEvent)
            .map_err(|e| format!("{e:?}"))
    }
    fn wait_all(&self) -> std::result::Result<(), String> {
        self.stream.synchronize().map_err(|e| format!("{e:?}"))
    }
}

/// The compute stream's use fence: every use is an event in one ordered sequence (see
/// `crate::fence`), so a block is reclaimed only after every kernel that read it ended.
pub type CudaUseFence = OrderedUses<BorrowedStream>;

/// How long dropping a table waits for the compute stream before leaving blocks reserved.
pub const DROP_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
