//! The PyO3 glue for the `dynaexq._core` extension module: errors and helpers here, one
//! submodule per core concept (pool, table, layout, transfer engine, controller, kernels).
//!
//! Errors become Python exceptions (never panics across the FFI boundary). Pool and table
//! calls hold their locks only for a few hundred nanoseconds and never need the GIL
//! inside, so they run with the GIL held; when a lock is contended the call releases the
//! GIL (`Python::detach`) while it waits. The lease path is lock-free.

use std::sync::{Arc, Mutex, TryLockError};

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;

use crate::errors::Error;

create_exception!(
    dynaexq._core,
    PoolError,
    PyException,
    "Base class of every error raised by the expert pool and the expert table."
);
create_exception!(
    dynaexq._core,
    PoolExhausted,
    PoolError,
    "No free slot in the class, or the byte budget would be exceeded."
);
create_exception!(
    dynaexq._core,
    DoubleFree,
    PoolError,
    "The block was already freed (or freed and handed out again since)."
);
create_exception!(
    dynaexq._core,
    ForeignBlock,
    PoolError,
    "The block does not belong to this pool."
);
create_exception!(
    dynaexq._core,
    BlockInUse,
    PoolError,
    "The block is leased by readers or owned by the expert table."
);
create_exception!(
    dynaexq._core,
    IllegalTransition,
    PoolError,
    "The state machine does not allow this transition (or the ticket is unknown)."
);
create_exception!(
    dynaexq._core,
    LayoutError,
    PoolError,
    "The byte budget cannot hold the requested layout; the message says how many bytes are missing."
);

create_exception!(
    dynaexq._core,
    QueueFull,
    PoolError,
    "The transfer queue is at capacity; the request was not queued."
);
create_exception!(
    dynaexq._core,
    BackendError,
    PoolError,
    "The copy backend failed (e.g. no CUDA driver library)."
);

fn to_py(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::InvalidConfig(_) | Error::UnknownClass { .. } | Error::OutOfRange(_) => {
            PyValueError::new_err(msg)
        }
        Error::Exhausted { .. } | Error::BudgetExceeded { .. } | Error::PagesExhausted { .. } => {
            PoolExhausted::new_err(msg)
        }
        Error::UnknownSequence(_)
        | Error::SequenceExists(_)
        | Error::IllegalPageOp { .. }
        | Error::IllegalLend(_) => PyValueError::new_err(msg),
        Error::DoubleFree { .. } => DoubleFree::new_err(msg),
        Error::ForeignBlock(_) => ForeignBlock::new_err(msg),
        Error::BlockLeased { .. } | Error::OwnedByTable { .. } => BlockInUse::new_err(msg),
        Error::IllegalTransition { .. } | Error::UnknownTicket(_) | Error::Sealed(_) => {
            IllegalTransition::new_err(msg)
        }
        Error::BudgetTooSmall { .. } => LayoutError::new_err(msg),
        Error::TooLarge(_) => PyValueError::new_err(msg),
        Error::NotPending { .. } => PoolError::new_err(msg),
        Error::QueueFull { .. } => QueueFull::new_err(msg),
        Error::UnknownTransfer(_) => PyValueError::new_err(msg),
        Error::Backend(_) => BackendError::new_err(msg),
    }
}

/// Run `f` under the mutex; if it is contended, wait with the GIL released.
fn with_locked<T: Send, R: Send>(
    py: Python<'_>,
    m: &Mutex<T>,
    f: impl FnOnce(&mut T) -> R + Send,
) -> R {
    match m.try_lock() {
        Ok(mut g) => f(&mut g),
        Err(TryLockError::Poisoned(p)) => f(&mut p.into_inner()),
        Err(TryLockError::WouldBlock) => py.detach(|| f(&mut crate::sync::lock(m))),
    }
}

/// The CUDA context of a device pool (feature "cuda"); a unit type otherwise.
#[cfg(feature = "cuda")]
#[derive(Clone)]
struct DeviceCtx(Arc<cudarc::driver::CudaContext>);
#[cfg(not(feature = "cuda"))]
#[derive(Clone)]
struct DeviceCtx;

#[cfg(feature = "cuda")]
fn open_device(py: Python<'_>, ordinal: i64) -> PyResult<DeviceCtx> {
    let ordinal = usize::try_from(ordinal)
        .map_err(|_| PyValueError::new_err(format!("device must be >= 0, got {ordinal}")))?;
    py.detach(|| crate::transfer::cuda::context(ordinal))
        .map(DeviceCtx)
        .map_err(to_py)
}

#[cfg(not(feature = "cuda"))]
fn open_device(_py: Python<'_>, _ordinal: i64) -> PyResult<DeviceCtx> {
    Err(BackendError::new_err(
        "this build has no CUDA support (build the extension with the 'cuda' feature)",
    ))
}

fn positive(what: &str, v: i64) -> PyResult<u64> {
    if v <= 0 {
        return Err(PyValueError::new_err(format!(
            "{what} must be > 0, got {v}"
        )));
    }
    Ok(v as u64)
}

mod budget;
mod controller;
mod cpu_experts;
mod expert_pool;
mod expert_table;
mod kernels;
mod kv_pages;
mod layout;
mod step_pin;
mod transfer_engine;
use budget::*;
use controller::*;
use cpu_experts::*;
use expert_pool::*;
use expert_table::*;
use kernels::*;
use kv_pages::*;
use layout::*;
use step_pin::*;
use transfer_engine::*;

#[pymodule(name = "_core")]
fn core_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("PoolError", py.get_type::<PoolError>())?;
    m.add("PoolExhausted", py.get_type::<PoolExhausted>())?;
    m.add("DoubleFree", py.get_type::<DoubleFree>())?;
    m.add("ForeignBlock", py.get_type::<ForeignBlock>())?;
    m.add("BlockInUse", py.get_type::<BlockInUse>())?;
    m.add("IllegalTransition", py.get_type::<IllegalTransition>())?;
    m.add("LayoutError", py.get_type::<LayoutError>())?;
    m.add("QueueFull", py.get_type::<QueueFull>())?;
    m.add("BackendError", py.get_type::<BackendError>())?;
    m.add_class::<PyBlock>()?;
    m.add_class::<BlockView>()?;
    m.add_class::<PyExpertPool>()?;
    // One device budget for expert slots and KV pages (crate::budget, crate::kv_pages).
    m.add_class::<PyDeviceBudget>()?;
    m.add_class::<PyKvPagePool>()?;
    m.add_class::<PyVersion>()?;
    m.add_class::<PyTransition>()?;
    m.add_class::<PyLease>()?;
    m.add_class::<PyExpertTable>()?;
    m.add_class::<PyStepPin>()?;
    m.add_class::<PyLayout>()?;
    m.add_class::<PyHostStore>()?;
    m.add_class::<PyCompletion>()?;
    m.add_class::<PyTransferEngine>()?;
    m.add_function(wrap_pyfunction!(plan_layout, m)?)?;
    m.add_class::<PyHotnessTracker>()?;
    m.add_function(wrap_pyfunction!(plan_transitions, m)?)?;
    m.add_function(wrap_pyfunction!(knapsack, m)?)?;
    // The dequantize kernels (crate::kernels).
    m.add_function(wrap_pyfunction!(kernel_launch_plan, m)?)?;
    m.add_function(wrap_pyfunction!(select_ptx_arch, m)?)?;
    m.add_function(wrap_pyfunction!(resolve_ptx, m)?)?;
    m.add_function(wrap_pyfunction!(check_ptx, m)?)?;
    m.add_class::<PyDequantKernels>()?;
    m.add_class::<PyCpuExperts>()?;
    Ok(())
}
