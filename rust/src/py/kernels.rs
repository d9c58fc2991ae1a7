//! Glue for the dequantize kernels.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use super::*;
use crate::kernels;

// ---------------------------------------------------------------------------------------
// The dequantize kernels (crate::kernels): launch plans on every build; loading and
// launching with the "cuda" feature (a clear BackendError without it or without a driver).

pub(super) fn kernel_i32(what: &str, v: i64) -> PyResult<i32> {
    i32::try_from(v).map_err(|_| PyValueError::new_err(format!("{what}={v} does not fit an int32")))
}

pub(super) fn kernel_op(op: Option<&str>) -> PyResult<Option<kernels::Op>> {
    op.map(kernels::Op::parse).transpose().map_err(to_py)
}

/// Parse and validate one launch (the launcher runs exactly this check).
#[allow(clippy::too_many_arguments)]
pub(super) fn kernel_plan(
    weight: &str,
    act: &str,
    qweight: u64,
    scales: u64,
    zeros: u64,
    x: u64,
    y: u64,
    t: i64,
    n: i64,
    k: i64,
    group_size: i64,
    swiglu: bool,
    op: Option<&str>,
) -> PyResult<kernels::LaunchPlan> {
    let args = kernels::MatmulArgs {
        qweight,
        scales,
        zeros,
        x,
        y,
        t: kernel_i32("T", t)?,
        n: kernel_i32("N", n)?,
        k: kernel_i32("K", k)?,
        group_size: kernel_i32("group_size", group_size)?,
        swiglu,
    };
    kernels::plan_launch(
        kernels::WeightKind::parse(weight).map_err(to_py)?,
        kernels::ActKind::parse(act).map_err(to_py)?,
        args,
        kernel_op(op)?,
    )
    .map_err(to_py)
}

type Dim3 = (u32, u32, u32);
type KernelPlanTuple = (String, Dim3, Dim3, [u64; 5], [i32; 5]);

/// Kernel name, grid and block of one launch, after the launcher's argument checks
/// (ValueError naming the bad argument), and the pointer and int parameters exactly as the
/// launcher pushes them. `op` forces "gemv" or "gemm".
#[pyfunction]
#[pyo3(signature = (weight, act, qweight, scales, zeros, x, y, t, n, k, group_size, swiglu, op = None))]
#[allow(clippy::too_many_arguments)]
pub(super) fn kernel_launch_plan(
    weight: &str,
    act: &str,
    qweight: u64,
    scales: u64,
    zeros: u64,
    x: u64,
    y: u64,
    t: i64,
    n: i64,
    k: i64,
    group_size: i64,
    swiglu: bool,
    op: Option<&str>,
) -> PyResult<KernelPlanTuple> {
    let p = kernel_plan(
        weight, act, qweight, scales, zeros, x, y, t, n, k, group_size, swiglu, op,
    )?;
    Ok((
        p.kernel.name(),
        p.geometry.grid,
        p.geometry.block,
        p.args.pointers(),
        p.args.ints(),
    ))
}

/// The PTX architecture a device of compute capability (major, minor) loads among
/// `available` (default: every compiled one); None if the device is older than all.
#[pyfunction]
#[pyo3(signature = (major, minor, available = None))]
pub(super) fn select_ptx_arch(major: u32, minor: u32, available: Option<Vec<u32>>) -> Option<u32> {
    let available = available.unwrap_or_else(|| kernels::PTX_ARCHES.to_vec());
    kernels::select_ptx((major, minor), &available)
}

/// (arch, [gemv file, gemm file]) a device of (major, minor) loads from `ptx_dir`.
#[pyfunction]
pub(super) fn resolve_ptx(
    ptx_dir: std::path::PathBuf,
    major: u32,
    minor: u32,
) -> PyResult<(u32, Vec<String>)> {
    let (arch, files) = kernels::resolve_ptx(&ptx_dir, (major, minor)).map_err(to_py)?;
    Ok((
        arch,
        files.iter().map(|f| f.display().to_string()).collect(),
    ))
}

/// Check that PTX text of module "gemv" or "gemm" exports every kernel (ValueError if not).
#[pyfunction]
pub(super) fn check_ptx(module: &str, ptx: &str) -> PyResult<()> {
    let op = kernels::Op::parse(module).map_err(to_py)?;
    kernels::check_ptx(op, ptx).map_err(to_py)
}

/// The dq_* kernels loaded into a device's primary context (torch's), launched on a
/// caller-given raw CUDA stream (e.g. `torch.cuda.current_stream().cuda_stream`).
#[pyclass(frozen, name = "DequantKernels", module = "dynaexq._core")]
pub struct PyDequantKernels {
    #[cfg(feature = "cuda")]
    pub(super) inner: kernels::cuda::DqKernels,
}

#[cfg(not(feature = "cuda"))]
pub(super) fn no_cuda_kernels() -> PyErr {
    BackendError::new_err(
        "this build has no CUDA support: DequantKernels needs the extension built with the 'cuda' feature",
    )
}

#[cfg(not(feature = "cuda"))]
#[pymethods]
impl PyDequantKernels {
    #[new]
    #[pyo3(signature = (ptx_dir, device = 0))]
    fn new(ptx_dir: std::path::PathBuf, device: i64) -> PyResult<Self> {
        let _ = (ptx_dir, device);
        Err(no_cuda_kernels())
    }

    #[staticmethod]
    #[pyo3(signature = (gemv, gemm, arch, device = 0))]
    fn from_ptx(gemv: &str, gemm: &str, arch: u32, device: i64) -> PyResult<Self> {
        let _ = (gemv, gemm, arch, device);
        Err(no_cuda_kernels())
    }
}

#[cfg(feature = "cuda")]
#[pymethods]
impl PyDequantKernels {
    /// Load `ptx_dir/{gemv,gemm}.sm_<arch>.ptx` (scripts/compile_kernels.py) for the
    /// newest arch the device runs. BackendError without a CUDA driver or device.
    #[new]
    #[pyo3(signature = (ptx_dir, device = 0))]
    fn new(py: Python<'_>, ptx_dir: std::path::PathBuf, device: i64) -> PyResult<Self> {
        let ctx = open_device(py, device)?;
        // Loading JIT-compiles the PTX for the device: seconds, without the GIL.
        let inner = py
            .detach(|| kernels::cuda::DqKernels::load_dir(&ctx.0, &ptx_dir))
            .map_err(to_py)?;
        Ok(Self { inner })
    }

    /// Load PTX text of both modules compiled for compute_<arch>.
    #[staticmethod]
    #[pyo3(signature = (gemv, gemm, arch, device = 0))]
    fn from_ptx(py: Python<'_>, gemv: &str, gemm: &str, arch: u32, device: i64) -> PyResult<Self> {
        let ctx = open_device(py, device)?;
        let inner = py
            .detach(|| kernels::cuda::DqKernels::from_ptx(&ctx.0, arch, gemv, gemm))
            .map_err(to_py)?;
        Ok(Self { inner })
    }

    /// The PTX architecture that was loaded (e.g. 90).
    #[getter]
    fn arch(&self) -> u32 {
        self.inner.arch()
    }

    #[getter]
    fn device(&self) -> usize {
        self.inner.context().ordinal()
    }

    /// Enqueue y = x W^T (or SwiGLU of the gate/up halves) for one matrix on `stream` and
    /// return the kernel's name. Arguments are raw device pointers (0 = NULL); the caller
    /// keeps the memory alive until the stream has run the kernel. Checked as
    /// `kernel_launch_plan`.
    #[pyo3(signature = (weight, act, qweight, scales, zeros, x, y, t, n, k, group_size, swiglu, stream = 0, op = None))]
    #[allow(clippy::too_many_arguments)]
    fn launch(
        &self,
        weight: &str,
        act: &str,
        qweight: u64,
        scales: u64,
        zeros: u64,
        x: u64,
        y: u64,
        t: i64,
        n: i64,
        k: i64,
        group_size: i64,
        swiglu: bool,
        stream: u64,
        op: Option<&str>,
    ) -> PyResult<String> {
        let p = kernel_plan(
            weight, act, qweight, scales, zeros, x, y, t, n, k, group_size, swiglu, op,
        )?;
        // SAFETY: the pointers and the stream come from the caller (torch tensors and
        // torch's stream in practice); the documented contract is that they are live
        // device memory of this device sized for the validated shapes.
        unsafe { self.inner.launch(&p, stream) }.map_err(to_py)?;
        Ok(p.kernel.name())
    }

    /// One expert: gate_up (swiglu, N = intermediate, K = hidden) from `x` into
    /// `workspace` [T, intermediate], then down into `y` [T, hidden]. `gate_up` and `down`
    /// are (qweight, scales, zeros) pointers of the blob's sections.
    #[pyo3(signature = (weight, act, gate_up, down, x, workspace, y, t, hidden, intermediate, group_size, stream = 0, op = None))]
    #[allow(clippy::too_many_arguments)]
    fn expert_forward(
        &self,
        weight: &str,
        act: &str,
        gate_up: (u64, u64, u64),
        down: (u64, u64, u64),
        x: u64,
        workspace: u64,
        y: u64,
        t: i64,
        hidden: i64,
        intermediate: i64,
        group_size: i64,
        stream: u64,
        op: Option<&str>,
    ) -> PyResult<()> {
        let plans = kernels::plan_expert(
            kernels::WeightKind::parse(weight).map_err(to_py)?,
            kernels::ActKind::parse(act).map_err(to_py)?,
            kernels::ExpertPointers { gate_up, down },
            x,
            workspace,
            y,
            kernel_i32("T", t)?,
            kernel_i32("hidden", hidden)?,
            kernel_i32("intermediate", intermediate)?,
            kernel_i32("group_size", group_size)?,
            kernel_op(op)?,
        )
        .map_err(to_py)?;
        // SAFETY: as `launch`, for both matrices and the workspace.
        unsafe { self.inner.launch_all(&plans, stream) }.map_err(to_py)
    }

    fn __repr__(&self) -> String {
        format!("{:?}", self.inner)
    }
}
