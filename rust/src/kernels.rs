//! The fused dequantize-GEMV/GEMM kernels (`kernels/*.cu`, compiled to PTX by
//! `scripts/compile_kernels.py`), loaded and launched from Rust.
//!
//! Everything that can be decided without a GPU is plain code here, compiled and unit
//! tested on every build: kernel names, which PTX file a device of a given compute
//! capability loads, the launch geometry and the validation of a launch's arguments
//! (docs/packed-layout.md, "CUDA kernels"; the same rules as
//! `dynaexq.quant.cuda.prepare_launch`). The loader and the launcher ([`cuda`], feature
//! "cuda") only add the driver calls: cudarc, with the driver library loaded at run time,
//! so the crate builds and these tests run on machines without CUDA.
//!
//! A launch takes raw device pointers (a pool slot's base + section offset, torch tensors'
//! `data_ptr()`) and a raw `CUstream` that the caller owns (e.g. torch's current stream);
//! the stream is borrowed for the launch, never destroyed.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::errors::{Error, Result};

/// Architectures the PTX is compiled for (`compute_<arch>`), ascending.
pub const PTX_ARCHES: [u32; 5] = [80, 86, 89, 90, 120];
/// The GEMV kernels take at most this many tokens; more use the GEMM.
pub const GEMV_MAX_T: u32 = 8;
/// Group sizes of the packed layout (the kernels need a multiple of 32).
pub const GROUP_SIZES: [i32; 3] = [32, 64, 128];
/// Rows of the GEMM's grid are 32 tokens each; CUDA limits gridDim.y to 65535.
const GEMM_TOKENS_PER_BLOCK: u32 = 32;
const GEMM_COLS_PER_BLOCK: u32 = 64;
const GEMV_COLS_PER_BLOCK: u32 = 4;
const MAX_GRID_Y: u32 = 65_535;

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidConfig(format!("kernels: {}", msg.into()))
}

/// GEMV (decode, 1..=8 tokens) or GEMM (prefill, any number of tokens); one PTX module each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Gemv,
    Gemm,
}

impl Op {
    pub const ALL: [Op; 2] = [Op::Gemv, Op::Gemm];

    /// Module name: "gemv" or "gemm" (also the PTX file stem).
    pub fn name(self) -> &'static str {
        match self {
            Op::Gemv => "gemv",
            Op::Gemm => "gemm",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "gemv" => Ok(Op::Gemv),
            "gemm" => Ok(Op::Gemm),
            other => Err(invalid(format!(
                "op must be 'gemv' or 'gemm', got {other:?}"
            ))),
        }
    }

    /// The kernel `prepare_launch` picks for `t` tokens: GEMV up to [`GEMV_MAX_T`].
    pub fn for_tokens(t: u32) -> Self {
        if t <= GEMV_MAX_T {
            Op::Gemv
        } else {
            Op::Gemm
        }
    }
}

/// How the weights are stored: an integer tier (codes + FP16 scales [+ zeros]) or 16 bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightKind {
    Int8,
    Int4,
    Int3,
    Int2,
    Bf16,
    Fp16,
}

impl WeightKind {
    pub const ALL: [WeightKind; 6] = [
        WeightKind::Int8,
        WeightKind::Int4,
        WeightKind::Int3,
        WeightKind::Int2,
        WeightKind::Bf16,
        WeightKind::Fp16,
    ];

    pub fn name(self) -> &'static str {
        match self {
            WeightKind::Int8 => "int8",
            WeightKind::Int4 => "int4",
            WeightKind::Int3 => "int3",
            WeightKind::Int2 => "int2",
            WeightKind::Bf16 => "bf16",
            WeightKind::Fp16 => "fp16",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|w| w.name() == s)
            .ok_or_else(|| {
                invalid(format!(
                    "weight kind must be one of int8, int4, int3, int2, bf16, fp16, got {s:?}"
                ))
            })
    }

    pub fn bits(self) -> u32 {
        match self {
            WeightKind::Int8 => 8,
            WeightKind::Int4 => 4,
            WeightKind::Int3 => 3,
            WeightKind::Int2 => 2,
            WeightKind::Bf16 | WeightKind::Fp16 => 16,
        }
    }

    pub fn is_quantized(self) -> bool {
        self.bits() < 16
    }
}

/// Activation (x and y) dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ActKind {
    F32,
    Bf16,
    F16,
}

impl ActKind {
    pub const ALL: [ActKind; 3] = [ActKind::F32, ActKind::Bf16, ActKind::F16];

    pub fn name(self) -> &'static str {
        match self {
            ActKind::F32 => "f32",
            ActKind::Bf16 => "bf16",
            ActKind::F16 => "f16",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| {
                invalid(format!(
                    "activation kind must be one of f32, bf16, f16, got {s:?}"
                ))
            })
    }

    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            ActKind::F32 => 4,
            ActKind::Bf16 | ActKind::F16 => 2,
        }
    }
}

/// One kernel: `dq_{op}_{weight}_{act}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelId {
    pub op: Op,
    pub weight: WeightKind,
    pub act: ActKind,
}

impl KernelId {
    pub fn name(&self) -> String {
        format!(
            "dq_{}_{}_{}",
            self.op.name(),
            self.weight.name(),
            self.act.name()
        )
    }

    /// Inverse of [`KernelId::name`].
    pub fn parse(name: &str) -> Result<Self> {
        let parts: Vec<&str> = name.split('_').collect();
        match parts.as_slice() {
            ["dq", op, w, a] => Ok(Self {
                op: Op::parse(op)?,
                weight: WeightKind::parse(w)?,
                act: ActKind::parse(a)?,
            }),
            _ => Err(invalid(format!(
                "kernel names look like dq_gemv_int4_bf16, got {name:?}"
            ))),
        }
    }

    /// Every kernel one module exports (18 per module).
    pub fn all(op: Op) -> impl Iterator<Item = KernelId> {
        WeightKind::ALL.into_iter().flat_map(move |weight| {
            ActKind::ALL
                .into_iter()
                .map(move |act| KernelId { op, weight, act })
        })
    }
}

impl fmt::Display for KernelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

// ---------------------------------------------------------------------------------------
// Which PTX a device loads

/// The PTX architecture a device of compute capability `(major, minor)` loads: the newest
/// of `available` that is not newer than the device (PTX for compute_X is JIT-compiled by
/// the driver for any device of capability >= X), or None if all are newer.
pub fn select_ptx(capability: (u32, u32), available: &[u32]) -> Option<u32> {
    let (major, minor) = capability;
    // Minor versions are single digits (8.6, 12.0); 10 * major + minor is "sm_XY".
    let device = major.checked_mul(10)?.checked_add(minor)?;
    available.iter().copied().filter(|&a| a <= device).max()
}

/// File name `scripts/compile_kernels.py` writes for a module and architecture.
pub fn ptx_file_name(op: Op, arch: u32) -> String {
    format!("{}.sm_{arch}.ptx", op.name())
}

/// Architectures of [`PTX_ARCHES`] for which `dir` holds the PTX of every module.
pub fn available_arches(dir: &Path) -> Vec<u32> {
    PTX_ARCHES
        .into_iter()
        .filter(|&a| {
            Op::ALL
                .iter()
                .all(|&op| dir.join(ptx_file_name(op, a)).is_file())
        })
        .collect()
}

/// The architecture and the PTX file of every module ([`Op::ALL`] order) that a device of
/// `capability` loads from `dir`, with an error saying what is missing otherwise.
pub fn resolve_ptx(dir: &Path, capability: (u32, u32)) -> Result<(u32, Vec<PathBuf>)> {
    let available = available_arches(dir);
    if available.is_empty() {
        return Err(invalid(format!(
            "no PTX in {} (expected gemv.sm_<arch>.ptx and gemm.sm_<arch>.ptx for arch in \
             {PTX_ARCHES:?}; run scripts/compile_kernels.py --out {})",
            dir.display(),
            dir.display()
        )));
    }
    let arch = select_ptx(capability, &available).ok_or_else(|| {
        invalid(format!(
            "a device of compute capability {}.{} cannot load the PTX in {} (compiled for \
             sm_{available:?}; the kernels need sm_80 or newer)",
            capability.0,
            capability.1,
            dir.display()
        ))
    })?;
    let files = Op::ALL
        .iter()
        .map(|&op| dir.join(ptx_file_name(op, arch)))
        .collect();
    Ok((arch, files))
}

/// What the PTX declares for one `.entry`: the byte size of each parameter and the
/// `.maxntid` (from `__launch_bounds__`), if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PtxEntry {
    pub param_bytes: Vec<u32>,
    pub maxntid: Option<(u32, u32, u32)>,
}

fn ptx_type_bytes(ty: &str) -> Option<u32> {
    // .u64/.s64/.b64/.f64 -> 8, .u32 -> 4, ...
    let bits: u32 = ty.trim_start_matches('.').get(1..)?.parse().ok()?;
    (bits % 8 == 0).then_some(bits / 8)
}

/// Every `.entry` of a PTX module, with its parameters and `.maxntid`.
pub fn ptx_entries(ptx: &str) -> Vec<(String, PtxEntry)> {
    let mut out = Vec::new();
    let mut lines = ptx.lines().map(str::trim);
    while let Some(line) = lines.next() {
        let Some(pos) = line.find(".entry ") else {
            continue;
        };
        let rest = line[pos + ".entry ".len()..].trim();
        let name = rest.split(['(', ' ']).next().unwrap_or("").to_string();
        let mut entry = PtxEntry {
            param_bytes: Vec::new(),
            maxntid: None,
        };
        // Parameters: one `.param .<type> <name>` per line up to ')'; then directives
        // such as `.maxntid x, y, z` up to the body's '{'.
        let mut in_params = rest.contains('(') && !rest.contains(')');
        for l in lines.by_ref() {
            if in_params {
                if l.starts_with(')') {
                    in_params = false;
                    continue;
                }
                let mut w = l.split_whitespace();
                if w.next() == Some(".param") {
                    let bytes = w.next().and_then(ptx_type_bytes).unwrap_or(0);
                    entry.param_bytes.push(bytes);
                }
                continue;
            }
            if l.starts_with('{') {
                break;
            }
            if let Some(dims) = l.strip_prefix(".maxntid") {
                let v: Vec<u32> = dims
                    .split(',')
                    .filter_map(|d| d.trim().parse().ok())
                    .collect();
                entry.maxntid = Some((
                    v.first().copied().unwrap_or(1),
                    v.get(1).copied().unwrap_or(1),
                    v.get(2).copied().unwrap_or(1),
                ));
            }
        }
        out.push((name, entry));
    }
    out
}

/// PTX text the driver can take and the launcher can call: no NUL byte (it is passed as a
/// C string), and for every kernel of the module an `.entry` whose parameters have the
/// sizes the launcher pushes ([`MatmulArgs::PARAM_BYTES`]) and whose `.maxntid`, if
/// declared, admits the launch's block.
pub fn check_ptx(op: Op, ptx: &str) -> Result<()> {
    if ptx.contains('\0') {
        return Err(invalid(format!("{} PTX contains a NUL byte", op.name())));
    }
    let entries = ptx_entries(ptx);
    let block = launch_geometry(op, 1, 1)?.block;
    let mut missing = Vec::new();
    for id in KernelId::all(op) {
        let name = id.name();
        let Some((_, e)) = entries.iter().find(|(n, _)| *n == name) else {
            missing.push(name);
            continue;
        };
        if e.param_bytes != MatmulArgs::PARAM_BYTES {
            return Err(invalid(format!(
                "{name} takes parameters of {:?} bytes in the PTX, the launcher passes {:?}",
                e.param_bytes,
                MatmulArgs::PARAM_BYTES
            )));
        }
        if let Some(m) = e.maxntid {
            if block.0 * block.1 * block.2 > m.0 * m.1 * m.2 {
                return Err(invalid(format!(
                    "{name} is compiled for at most {m:?} threads, the launch uses {block:?}"
                )));
            }
        }
    }
    if !missing.is_empty() {
        return Err(invalid(format!(
            "{} PTX lacks the kernels {missing:?}",
            op.name()
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Launch geometry and arguments

/// Grid and block of one launch (no dynamic shared memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_mem_bytes: u32,
}

/// GEMV: block (128,1,1), grid (ceil(N/4),1,1), 1 <= T <= 8. GEMM: block (256,1,1), grid
/// (ceil(N/64), ceil(T/32), 1).
pub fn launch_geometry(op: Op, t: u32, n: u32) -> Result<Geometry> {
    if t == 0 || n == 0 {
        return Err(invalid(format!("T and N must be >= 1, got T={t}, N={n}")));
    }
    match op {
        Op::Gemv => {
            if t > GEMV_MAX_T {
                return Err(invalid(format!(
                    "gemv takes 1..{GEMV_MAX_T} tokens, got {t}"
                )));
            }
            Ok(Geometry {
                grid: (n.div_ceil(GEMV_COLS_PER_BLOCK), 1, 1),
                block: (128, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        Op::Gemm => {
            let rows = t.div_ceil(GEMM_TOKENS_PER_BLOCK);
            if rows > MAX_GRID_Y {
                return Err(invalid(format!(
                    "gemm takes at most {} tokens per launch, got {t}",
                    MAX_GRID_Y * GEMM_TOKENS_PER_BLOCK
                )));
            }
            Ok(Geometry {
                grid: (n.div_ceil(GEMM_COLS_PER_BLOCK), rows, 1),
                block: (256, 1, 1),
                shared_mem_bytes: 0,
            })
        }
    }
}

/// The arguments of every kernel, in order: pointers (0 = NULL), then the ints.
///
/// `qweight`: the "<m>.qweight" section (16-bit tiers: "<m>.weight"); `scales`,
/// `zeros`: FP16 "<m>.scales" / "<m>.zeros" (zeros 0 = symmetric; both 0 for 16-bit);
/// `x` [T, K] and `y` [T, N] row-major in the activation dtype. With `swiglu` the matrix
/// has 2N rows (gate, then up) and `y = silu(x W_gate^T) * (x W_up^T)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatmulArgs {
    pub qweight: u64,
    pub scales: u64,
    pub zeros: u64,
    pub x: u64,
    pub y: u64,
    pub t: i32,
    pub n: i32,
    pub k: i32,
    pub group_size: i32,
    pub swiglu: bool,
}

impl MatmulArgs {
    /// Byte sizes of the kernel parameters in the order the launcher pushes them: the five
    /// pointers (`qweight`, `scales`, `zeros`, `x`, `y` as 64-bit device addresses), then
    /// `T`, `N`, `K`, `group_size` and `swiglu` (passed as a 32-bit int).
    pub const PARAM_BYTES: [u32; 10] = {
        const P: u32 = std::mem::size_of::<u64>() as u32;
        const I: u32 = std::mem::size_of::<i32>() as u32;
        [P, P, P, P, P, I, I, I, I, I]
    };

    /// The pointer parameters, in kernel order.
    pub fn pointers(&self) -> [u64; 5] {
        [self.qweight, self.scales, self.zeros, self.x, self.y]
    }

    /// The int parameters, in kernel order.
    pub fn ints(&self) -> [i32; 5] {
        [
            self.t,
            self.n,
            self.k,
            self.group_size,
            i32::from(self.swiglu),
        ]
    }
}

/// A validated launch: kernel, geometry and arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchPlan {
    pub kernel: KernelId,
    pub geometry: Geometry,
    pub args: MatmulArgs,
}

fn aligned(what: &str, ptr: u64, align: u64) -> Result<()> {
    if ptr % align != 0 {
        return Err(invalid(format!(
            "{what} pointer {ptr:#x} is not {align}-byte aligned"
        )));
    }
    Ok(())
}

/// Check `args` for a kernel of `weight`/`act` and pick the kernel (`op`: forced, or by
/// token count as `prepare_launch` does) and its geometry. Catches what would make a
/// kernel read out of bounds or misaligned: NULL or misaligned pointers, non-positive
/// sizes, a group size the layout does not have, scales passed to a 16-bit tier, x == y.
pub fn plan_launch(
    weight: WeightKind,
    act: ActKind,
    args: MatmulArgs,
    op: Option<Op>,
) -> Result<LaunchPlan> {
    let MatmulArgs { t, n, k, .. } = args;
    if t < 1 || n < 1 || k < 1 {
        return Err(invalid(format!(
            "T, N and K must be >= 1, got T={t}, N={n}, K={k}"
        )));
    }
    if args.swiglu && n > i32::MAX / 2 {
        return Err(invalid(format!("N={n} is too large for swiglu (2N rows)")));
    }
    for (what, p) in [("qweight", args.qweight), ("x", args.x), ("y", args.y)] {
        if p == 0 {
            return Err(invalid(format!("{what} must not be NULL")));
        }
    }
    if args.x == args.y {
        return Err(invalid("x and y must not be the same buffer"));
    }
    if weight.is_quantized() {
        if args.scales == 0 {
            return Err(invalid(format!(
                "{} weights need scales (got NULL)",
                weight.name()
            )));
        }
        if !GROUP_SIZES.contains(&args.group_size) {
            return Err(invalid(format!(
                "group_size must be one of {GROUP_SIZES:?} for {} weights, got {}",
                weight.name(),
                args.group_size
            )));
        }
        // Packed rows are read as 32-bit words; scales and zeros as FP16.
        aligned("qweight", args.qweight, 4)?;
        aligned("scales", args.scales, 2)?;
        aligned("zeros", args.zeros, 2)?;
    } else {
        if args.scales != 0 || args.zeros != 0 {
            return Err(invalid(format!(
                "{} weights take no scales or zeros (pass NULL)",
                weight.name()
            )));
        }
        if args.group_size != 0 {
            return Err(invalid(format!(
                "{} weights have no groups: group_size must be 0, got {}",
                weight.name(),
                args.group_size
            )));
        }
        aligned("qweight", args.qweight, 2)?;
    }
    aligned("x", args.x, act.size())?;
    aligned("y", args.y, act.size())?;
    let op = op.unwrap_or(Op::for_tokens(t as u32));
    let geometry = launch_geometry(op, t as u32, n as u32)?;
    Ok(LaunchPlan {
        kernel: KernelId { op, weight, act },
        geometry,
        args,
    })
}

/// The two matrices of one expert: pointers of the "gate_up" and "down" sections
/// (`(qweight, scales, zeros)`, 0 = NULL).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpertPointers {
    pub gate_up: (u64, u64, u64),
    pub down: (u64, u64, u64),
}

/// One expert = two launches: `gate_up` with swiglu (N = I, K = H) from `x` [T, H] into
/// `workspace` [T, I], then `down` (N = H, K = I) from `workspace` into `y` [T, H].
#[allow(clippy::too_many_arguments)]
pub fn plan_expert(
    weight: WeightKind,
    act: ActKind,
    sections: ExpertPointers,
    x: u64,
    workspace: u64,
    y: u64,
    t: i32,
    hidden: i32,
    intermediate: i32,
    group_size: i32,
    op: Option<Op>,
) -> Result<[LaunchPlan; 2]> {
    if workspace == y {
        return Err(invalid("workspace and y must not be the same buffer"));
    }
    let gate_up = plan_launch(
        weight,
        act,
        MatmulArgs {
            qweight: sections.gate_up.0,
            scales: sections.gate_up.1,
            zeros: sections.gate_up.2,
            x,
            y: workspace,
            t,
            n: intermediate,
            k: hidden,
            group_size,
            swiglu: true,
        },
        op,
    )?;
    let down = plan_launch(
        weight,
        act,
        MatmulArgs {
            qweight: sections.down.0,
            scales: sections.down.1,
            zeros: sections.down.2,
            x: workspace,
            y,
            t,
            n: hidden,
            k: intermediate,
            group_size,
            swiglu: false,
        },
        op,
    )?;
    Ok([gate_up, down])
}

// ---------------------------------------------------------------------------------------
// Loading and launching (feature "cuda")

#[cfg(feature = "cuda")]
pub mod cuda {
    //! The PTX modules loaded into a CUDA context with cudarc, and launches on a borrowed
    //! stream.

    use std::collections::HashMap;
    use std::path::Path;
    use std::sync::Arc;

    use cudarc::driver::{CudaContext, CudaFunction, CudaModule, LaunchConfig, PushKernelArg};
    use cudarc::nvrtc::Ptx;

    use super::{check_ptx, resolve_ptx, select_ptx, KernelId, LaunchPlan, Op, PTX_ARCHES};
    use crate::errors::{Error, Result};

    fn backend_err(what: &str, e: impl std::fmt::Debug) -> Error {
        Error::Backend(format!("kernels: {what}: {e:?}"))
    }

    /// Every `dq_*` kernel of both modules, loaded into one context.
    pub struct DqKernels {
        ctx: Arc<CudaContext>,
        arch: u32,
        functions: HashMap<KernelId, CudaFunction>,
        // The functions keep their module alive; held too so `Drop` order is obvious.
        _modules: Vec<Arc<CudaModule>>,
    }

    impl std::fmt::Debug for DqKernels {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(
                f,
                "DqKernels(device {}, sm_{}, {} kernels)",
                self.ctx.ordinal(),
                self.arch,
                self.functions.len()
            )
        }
    }

    /// Compute capability of the context's device.
    pub fn capability(ctx: &Arc<CudaContext>) -> Result<(u32, u32)> {
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| backend_err("compute capability", e))?;
        Ok((major.max(0) as u32, minor.max(0) as u32))
    }

    impl DqKernels {
        /// Load `<dir>/{gemv,gemm}.sm_<arch>.ptx` for the newest arch the device can run.
        pub fn load_dir(ctx: &Arc<CudaContext>, dir: &Path) -> Result<Self> {
            let cap = capability(ctx)?;
            let (arch, files) = resolve_ptx(dir, cap)?;
            let mut sources = Vec::with_capacity(files.len());
            for f in &files {
                sources.push(std::fs::read_to_string(f).map_err(|e| {
                    Error::InvalidConfig(format!("kernels: cannot read {}: {e}", f.display()))
                })?);
            }
            Self::from_ptx(ctx, arch, &sources[0], &sources[1])
        }

        /// Load PTX text compiled for `compute_<arch>` (checked against the device).
        pub fn from_ptx(ctx: &Arc<CudaContext>, arch: u32, gemv: &str, gemm: &str) -> Result<Self> {
            let cap = capability(ctx)?;
            if select_ptx(cap, &[arch]).is_none() {
                return Err(Error::InvalidConfig(format!(
                    "kernels: PTX for sm_{arch} cannot run on a device of compute capability \
                     {}.{} (compiled for {PTX_ARCHES:?})",
                    cap.0, cap.1
                )));
            }
            let mut functions = HashMap::new();
            let mut modules = Vec::new();
            for (op, src) in [(Op::Gemv, gemv), (Op::Gemm, gemm)] {
                // Checked first: cudarc turns the text into a C string (a NUL would panic).
                check_ptx(op, src)?;
                let module = ctx.load_module(Ptx::from_src(src)).map_err(|e| {
                    backend_err(&format!("load the {} PTX (sm_{arch})", op.name()), e)
                })?;
                for id in KernelId::all(op) {
                    let f = module
                        .load_function(&id.name())
                        .map_err(|e| backend_err(&format!("get function {id}"), e))?;
                    functions.insert(id, f);
                }
                modules.push(module);
            }
            Ok(Self {
                ctx: ctx.clone(),
                arch,
                functions,
                _modules: modules,
            })
        }

        /// The PTX architecture that was loaded.
        pub fn arch(&self) -> u32 {
            self.arch
        }

        pub fn context(&self) -> &Arc<CudaContext> {
            &self.ctx
        }

        /// Enqueue one validated launch on `stream` (a raw `CUstream`, 0 = the legacy
        /// default stream), borrowed: it is not synchronised or destroyed.
        ///
        /// # Safety
        /// The pointers of `plan.args` must be device memory of this context (or
        /// accessible to it) holding what the kernel reads: `qweight`/`scales`/`zeros` the
        /// matrix sections for (N or 2N with swiglu) rows of K columns, `x` T*K and `y`
        /// T*N activations, all alive until the kernel has finished on `stream`; `y` must
        /// not overlap the inputs. `stream` must belong to this context and outlive the
        /// call.
        pub unsafe fn launch(&self, plan: &LaunchPlan, stream: u64) -> Result<()> {
            let f = self.functions.get(&plan.kernel).ok_or_else(|| {
                Error::InvalidConfig(format!("kernels: no kernel {}", plan.kernel))
            })?;
            // SAFETY: the caller owns the stream and keeps it alive (documented above);
            // a borrowed stream is not destroyed when the wrapper drops.
            let stream = unsafe {
                self.ctx
                    .wrap_borrowed_stream(stream as cudarc::driver::sys::CUstream)
            };
            let ptrs = plan.args.pointers();
            let ints = plan.args.ints();
            let g = &plan.geometry;
            let cfg = LaunchConfig {
                grid_dim: g.grid,
                block_dim: g.block,
                shared_mem_bytes: g.shared_mem_bytes,
            };
            let mut b = stream.launch_builder(f);
            // The layout `MatmulArgs::PARAM_BYTES` describes (checked against the PTX's
            // `.param` list when it was loaded): 5 x u64 device addresses, 5 x i32.
            for p in &ptrs {
                b.arg(p);
            }
            for i in &ints {
                b.arg(i);
            }
            // SAFETY: arguments match the kernel's signature (above) and the plan was
            // validated (geometry, sizes, alignment); memory validity is the caller's
            // contract.
            unsafe { b.launch(cfg) }
                .map_err(|e| backend_err(&format!("launch {}", plan.kernel), e))?;
            Ok(())
        }

        /// Both launches of one expert, in order on `stream`.
        ///
        /// # Safety
        /// As [`DqKernels::launch`] for each plan.
        pub unsafe fn launch_all(&self, plans: &[LaunchPlan], stream: u64) -> Result<()> {
            for p in plans {
                // SAFETY: forwarded contract.
                unsafe { self.launch(p, stream)? };
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(t: i32, n: i32, k: i32) -> MatmulArgs {
        MatmulArgs {
            qweight: 0x1000,
            scales: 0x2000,
            zeros: 0,
            x: 0x3000,
            y: 0x4000,
            t,
            n,
            k,
            group_size: 128,
            swiglu: false,
        }
    }

    #[test]
    fn names_round_trip_and_cover_every_kernel() {
        for op in Op::ALL {
            let all: Vec<KernelId> = KernelId::all(op).collect();
            assert_eq!(all.len(), 18);
            for id in all {
                assert_eq!(KernelId::parse(&id.name()).unwrap(), id);
            }
        }
        assert_eq!(
            KernelId {
                op: Op::Gemv,
                weight: WeightKind::Int4,
                act: ActKind::Bf16
            }
            .name(),
            "dq_gemv_int4_bf16"
        );
        for bad in ["dq_gemv_int5_f32", "dq_gemv_int4", "xx_gemm_int4_f32", ""] {
            assert!(KernelId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ptx_selection_by_capability() {
        let all = PTX_ARCHES;
        assert_eq!(select_ptx((8, 0), &all), Some(80));
        assert_eq!(select_ptx((8, 6), &all), Some(86));
        assert_eq!(select_ptx((8, 7), &all), Some(86)); // Orin: newest not newer
        assert_eq!(select_ptx((8, 9), &all), Some(89));
        assert_eq!(select_ptx((9, 0), &all), Some(90)); // H100/H200
        assert_eq!(select_ptx((10, 0), &all), Some(90)); // B200: PTX JIT from compute_90
        assert_eq!(select_ptx((12, 0), &all), Some(120));
        assert_eq!(select_ptx((12, 1), &all), Some(120));
        assert_eq!(select_ptx((7, 5), &all), None); // Turing: too old
        assert_eq!(select_ptx((9, 0), &[80, 120]), Some(80));
        assert_eq!(select_ptx((9, 0), &[]), None);
        assert_eq!(select_ptx((u32::MAX, 0), &all), None); // no overflow panic
    }

    #[test]
    fn ptx_files_in_a_directory() {
        let dir = std::env::temp_dir().join(format!("dynaexq-ptx-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let e = resolve_ptx(&dir, (9, 0)).unwrap_err().to_string();
        assert!(e.contains("no PTX"), "{e}");
        for a in [80, 90] {
            for op in Op::ALL {
                std::fs::write(dir.join(ptx_file_name(op, a)), "x").unwrap();
            }
        }
        // sm_86 has only one module: not usable.
        std::fs::write(dir.join(ptx_file_name(Op::Gemv, 86)), "x").unwrap();
        assert_eq!(available_arches(&dir), vec![80, 90]);
        let (arch, files) = resolve_ptx(&dir, (8, 9)).unwrap();
        assert_eq!(arch, 80);
        assert_eq!(
            files,
            vec![dir.join("gemv.sm_80.ptx"), dir.join("gemm.sm_80.ptx")]
        );
        assert_eq!(resolve_ptx(&dir, (12, 0)).unwrap().0, 90);
        let e = resolve_ptx(&dir, (7, 0)).unwrap_err().to_string();
        assert!(e.contains("7.0") && e.contains("sm_80"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A PTX entry as NVRTC writes it (5 x .u64 then 5 x .u32 parameters).
    fn fake_entry(name: &str, types: &[&str], maxntid: &str) -> String {
        let params: Vec<String> = types
            .iter()
            .enumerate()
            .map(|(i, t)| format!("\t.param {t} {name}_param_{i}"))
            .collect();
        format!(
            "// .globl\t{name}\n.visible .entry {name}(\n{}\n)\n{maxntid}\n{{\n\tret;\n}}\n",
            params.join(",\n")
        )
    }

    const TYPES: [&str; 10] = [
        ".u64", ".u64", ".u64", ".u64", ".u64", ".u32", ".u32", ".u32", ".u32", ".u32",
    ];

    #[test]
    fn argument_packing_order() {
        let a = MatmulArgs {
            swiglu: true,
            zeros: 0x2800,
            ..args(3, 64, 256)
        };
        assert_eq!(a.pointers(), [0x1000, 0x2000, 0x2800, 0x3000, 0x4000]);
        assert_eq!(a.ints(), [3, 64, 256, 128, 1]);
        assert_eq!(MatmulArgs { swiglu: false, ..a }.ints()[4], 0);
        assert_eq!(
            MatmulArgs::PARAM_BYTES.to_vec(),
            TYPES
                .iter()
                .map(|t| ptx_type_bytes(t).unwrap())
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn ptx_entry_parsing() {
        let text = fake_entry("k1", &TYPES, ".maxntid 128, 1, 1") + &fake_entry("k2", &[], "");
        let e = ptx_entries(&text);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].0, "k1");
        assert_eq!(e[0].1.param_bytes, MatmulArgs::PARAM_BYTES.to_vec());
        assert_eq!(e[0].1.maxntid, Some((128, 1, 1)));
        assert_eq!(e[1].0, "k2");
        assert!(e[1].1.param_bytes.is_empty() && e[1].1.maxntid.is_none());
    }

    #[test]
    fn ptx_text_checks() {
        let full: String = KernelId::all(Op::Gemv)
            .map(|k| fake_entry(&k.name(), &TYPES, ".maxntid 128, 1, 1"))
            .collect();
        check_ptx(Op::Gemv, &full).unwrap();
        // Without __launch_bounds__ there is no .maxntid: fine.
        check_ptx(Op::Gemv, &full.replace(".maxntid 128, 1, 1", "")).unwrap();
        // Compiled for fewer threads than the launch uses.
        let e = check_ptx(
            Op::Gemv,
            &full.replace(".maxntid 128, 1, 1", ".maxntid 64, 1, 1"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("at most"), "{e}");
        // A parameter of another size than the launcher pushes (int T as 64-bit).
        let wrong = full.replace(
            ".u32 dq_gemv_int2_f16_param_5",
            ".u64 dq_gemv_int2_f16_param_5",
        );
        let e = check_ptx(Op::Gemv, &wrong).unwrap_err().to_string();
        assert!(e.contains("dq_gemv_int2_f16") && e.contains("bytes"), "{e}");
        // One parameter missing.
        let fewer = full.replace(",\n\t.param .u32 dq_gemv_int8_f32_param_9", "");
        assert!(check_ptx(Op::Gemv, &fewer).is_err());
        // The gemm module's kernels are not in it.
        assert!(check_ptx(Op::Gemm, &full).is_err());
        // A prefix of a name is not the name.
        let short = full.replace("dq_gemv_fp16_f16(", "dq_gemv_fp16_f1(");
        let e = check_ptx(Op::Gemv, &short).unwrap_err().to_string();
        assert!(e.contains("dq_gemv_fp16_f16"), "{e}");
        assert!(check_ptx(Op::Gemv, &format!("{full}\0")).is_err());
    }

    #[test]
    fn geometry_matches_the_documented_rules() {
        for n in [1u32, 3, 4, 5, 48, 128, 768, 2048, 4097] {
            for t in 1..=GEMV_MAX_T {
                let g = launch_geometry(Op::Gemv, t, n).unwrap();
                assert_eq!(g.block, (128, 1, 1));
                assert_eq!(g.grid, (n.div_ceil(4), 1, 1));
                // Every output column is covered by exactly one warp's block.
                assert!(g.grid.0 * 4 >= n && (g.grid.0 - 1) * 4 < n);
            }
            for t in [1u32, 8, 9, 31, 32, 33, 64, 1000] {
                let g = launch_geometry(Op::Gemm, t, n).unwrap();
                assert_eq!(g.block, (256, 1, 1));
                assert_eq!(g.grid, (n.div_ceil(64), t.div_ceil(32), 1));
                assert!(g.grid.1 * 32 >= t && (g.grid.1 - 1) * 32 < t);
                assert_eq!(g.shared_mem_bytes, 0);
            }
        }
        assert!(launch_geometry(Op::Gemv, 9, 4).is_err());
        assert!(launch_geometry(Op::Gemv, 0, 4).is_err());
        assert!(launch_geometry(Op::Gemm, 4, 0).is_err());
        assert!(launch_geometry(Op::Gemm, 65_535 * 32, 1).is_ok());
        assert!(launch_geometry(Op::Gemm, 65_535 * 32 + 1, 1).is_err());
    }

    #[test]
    fn plan_picks_gemv_up_to_8_tokens() {
        let w = WeightKind::Int4;
        for t in 1..=20 {
            let p = plan_launch(w, ActKind::Bf16, args(t, 64, 256), None).unwrap();
            let want = if t <= 8 { Op::Gemv } else { Op::Gemm };
            assert_eq!(p.kernel.op, want, "T={t}");
            assert_eq!(p.geometry, launch_geometry(want, t as u32, 64).unwrap());
            // Forcing the GEMM is allowed for any T, the GEMV only up to 8.
            assert!(plan_launch(w, ActKind::Bf16, args(t, 64, 256), Some(Op::Gemm)).is_ok());
            assert_eq!(
                plan_launch(w, ActKind::Bf16, args(t, 64, 256), Some(Op::Gemv)).is_ok(),
                t <= 8
            );
        }
    }

    #[test]
    fn plan_rejects_bad_arguments() {
        let q = WeightKind::Int2;
        let f = ActKind::F32;
        let ok = args(4, 64, 256);
        plan_launch(q, f, ok, None).unwrap();
        let bad: Vec<(&str, MatmulArgs)> = vec![
            ("T", MatmulArgs { t: 0, ..ok }),
            ("N", MatmulArgs { n: -1, ..ok }),
            ("K", MatmulArgs { k: 0, ..ok }),
            ("qweight", MatmulArgs { qweight: 0, ..ok }),
            ("x", MatmulArgs { x: 0, ..ok }),
            ("y", MatmulArgs { y: 0, ..ok }),
            ("same buffer", MatmulArgs { y: ok.x, ..ok }),
            ("scales", MatmulArgs { scales: 0, ..ok }),
            (
                "group_size",
                MatmulArgs {
                    group_size: 96,
                    ..ok
                },
            ),
            (
                "group_size",
                MatmulArgs {
                    group_size: 0,
                    ..ok
                },
            ),
            (
                "qweight",
                MatmulArgs {
                    qweight: 0x1002,
                    ..ok
                },
            ),
            (
                "scales",
                MatmulArgs {
                    scales: 0x2001,
                    ..ok
                },
            ),
            (
                "zeros",
                MatmulArgs {
                    zeros: 0x2001,
                    ..ok
                },
            ),
            ("x", MatmulArgs { x: 0x3002, ..ok }), // f32 needs 4-byte alignment
            ("y", MatmulArgs { y: 0x4001, ..ok }),
            (
                "swiglu",
                MatmulArgs {
                    n: i32::MAX,
                    swiglu: true,
                    ..ok
                },
            ),
        ];
        for (what, a) in bad {
            let e = plan_launch(q, f, a, None).unwrap_err();
            assert!(matches!(e, Error::InvalidConfig(_)), "{e:?}");
            assert!(e.to_string().contains(what), "{what}: {e}");
        }
        // 2-byte activations only need 2-byte alignment.
        plan_launch(q, ActKind::Bf16, MatmulArgs { x: 0x3002, ..ok }, None).unwrap();
        // Asymmetric: zeros present.
        plan_launch(
            q,
            f,
            MatmulArgs {
                zeros: 0x5000,
                ..ok
            },
            None,
        )
        .unwrap();
    }

    #[test]
    fn sixteen_bit_tiers_take_no_scales() {
        let dense = MatmulArgs {
            scales: 0,
            zeros: 0,
            group_size: 0,
            qweight: 0x1002,
            ..args(3, 10, 20)
        };
        for w in [WeightKind::Bf16, WeightKind::Fp16] {
            plan_launch(w, ActKind::F16, dense, None).unwrap();
            for bad in [
                MatmulArgs {
                    scales: 0x2000,
                    ..dense
                },
                MatmulArgs {
                    zeros: 0x2000,
                    ..dense
                },
                MatmulArgs {
                    group_size: 128,
                    ..dense
                },
                MatmulArgs {
                    qweight: 0x1001,
                    ..dense
                },
            ] {
                assert!(plan_launch(w, ActKind::F16, bad, None).is_err(), "{bad:?}");
            }
        }
    }

    #[test]
    fn expert_is_gate_up_then_down() {
        let s = ExpertPointers {
            gate_up: (0x10_000, 0x20_000, 0),
            down: (0x30_000, 0x40_000, 0),
        };
        let (h, i) = (128, 48);
        for t in [1, 8, 9, 100] {
            let [gu, dn] = plan_expert(
                WeightKind::Int4,
                ActKind::Bf16,
                s,
                0x50_000,
                0x60_000,
                0x70_000,
                t,
                h,
                i,
                128,
                None,
            )
            .unwrap();
            assert!(gu.args.swiglu && !dn.args.swiglu);
            assert_eq!((gu.args.n, gu.args.k), (i, h));
            assert_eq!((dn.args.n, dn.args.k), (h, i));
            assert_eq!((gu.args.x, gu.args.y), (0x50_000, 0x60_000));
            assert_eq!((dn.args.x, dn.args.y), (0x60_000, 0x70_000));
            assert_eq!(gu.args.qweight, 0x10_000);
            assert_eq!(dn.args.scales, 0x40_000);
            assert_eq!(gu.kernel.op, dn.kernel.op);
            assert_eq!(gu.kernel.op, Op::for_tokens(t as u32));
        }
        let e = plan_expert(
            WeightKind::Int4,
            ActKind::Bf16,
            s,
            0x50_000,
            0x60_000,
            0x60_000,
            1,
            h,
            i,
            128,
            None,
        );
        assert!(e.is_err());
    }

    /// Without a driver (CI, this machine) the CUDA path reports an error, never panics.
    #[cfg(feature = "cuda")]
    #[test]
    fn no_driver_is_a_clear_error() {
        if crate::transfer::cuda::driver_available() {
            return; // a real driver: the GPU tests cover loading
        }
        let e = crate::transfer::cuda::context(0).unwrap_err();
        assert!(matches!(e, Error::Backend(_)), "{e:?}");
    }
}
