//! GPU benchmark of the LoRA part of a MoLE layer (everything but the base GEMM), as a Markdown table,
//! for a CLI or an example to print: [`run`] with [`BenchOptions`].
//!
//! Per shape, timed with CUDA events in the same run (mean over the iterations, after warm-up):
//!
//! * **ours**: router logits → gating → the LoRA path [`LoraPath::for_shape`] picks (the segmented
//!   path, dispatch + grouped shrink/expand, and the dense-gated path are both timed); for SAML
//!   routing, weight-space mixing + the segmented (SGMV) shrink/expand;
//! * **GB/s** and the fraction of the **memory floor** (DESIGN.md):
//!   `(T·d_in + 2·T·d_out + E·r·(d_in + d_out))·bytes / bandwidth`;
//! * **baseline (a)**, the same layer composed from cuBLAS calls through cudarc, as a framework user
//!   writes it today: the same routing (router logits, gating, dispatch), the expert sizes read back to
//!   the host (one host sync), one gather of the rows into expert order, then per expert with tokens a
//!   cuBLAS GEMM `X_e·A_eᵀ` (shrink) and a cuBLAS GEMM `H_e·B_eᵀ` (expand), and one weighted
//!   scatter-combine into `y`. The gather and scatter are hoisted out of the expert loop (one launch
//!   each instead of one per expert), which makes this baseline faster, not slower, than the
//!   per-expert version; for SAML routing, cuBLAS mixing (`Ā = p·A_all` as one GEMM per sequence
//!   stack) and per-sequence GEMMs;
//! * **baseline (b)**, the dense all-experts cuBLAS version: `H = X·A_allᵀ` (`[T, E·r]`), then
//!   `Y += H·B_allᵀ`, two GEMMs; the gate weights are left out, so it is a lower bound of that
//!   baseline;
//! * the **base GEMM** `X·W0ᵀ` for scale (a whole layer is base + LoRA part);
//! * **graph replay**, for rows of at most [`GRAPH_MAX_TOKENS`] tokens with experts (not SAML): the
//!   forward of "ours" as [`MoleLoraForward::run`] enqueues it (router logits → gating → the LoRA
//!   part on the path "ours" took), captured once into a CUDA graph, then the graph replayed; "—"
//!   for larger `T`, SAML rows, or where the capture fails (the reason goes to stderr, once);
//! * with [`BenchOptions::backward`], **our backward** of the LoRA part on the path of "ours"
//!   ([`MoleLoraForward::backward`] after one forward: the grouped LoRA backward on the segmented
//!   plan or the dense-gated backward, then the gating and router backward, on tensor cores where
//!   their conditions hold; for SAML the mixed adapters' backward and
//!   the mixing backward), its ratio to our forward, and the device memory it works in. The backward
//!   allocates nothing per call: its buffers are allocated once per shape (the column gives their size).
//!
//! A second table times each kernel variant ([`KernelPath`]) of the grouped shrink and expand alone
//! on the segmented plan, the measurements that the `Auto` rule is to be tuned by.

use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::sys::{CUevent_flags, CUgraphInstantiate_flags, CUstreamCaptureMode};
use half::{bf16, f16};

use molora::cuda::Device;
use molora::cuda::{dispatch, gather_rows, scatter_combine, DevicePlan};
use molora::cuda::{
    expand_experts, expand_experts_on, lora_dense_gated_on, shrink_experts, shrink_experts_on,
    CudaElement, DenseGatedConfig, DenseGatedWorkspace, KernelPath, LoraPath,
    DENSE_GATED_MAX_COLUMNS,
};
use molora::cuda::{gating, router_logits, DeviceGate};
use molora::cuda::{gpu_view, gpu_view_mut, Buffer, BufferView, DeviceRead, DeviceWrite};
use molora::cuda::{DeviceRouter, MoleLoraForward, WeightSpaceLora};
use molora::gate::{Activation, Gate, ThresholdSpec};
use molora::Rng;
use molora::{DType, Error, LoraShape, Result};

/// How the tokens of a [`BenchCase`] are routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchRouting {
    /// Softmax router, top-k renormalised.
    TopK,
    /// Softmax router, HDMoLE's learned threshold at `θ = 0` (`τ = σ(0)/E`); `k_max = E`.
    Threshold,
    /// SAML: one mixing vector per sequence of `seq_len` tokens (the last may be shorter),
    /// weight-space mixing, then the segmented LoRA.
    PerSequence { seq_len: usize },
}

/// One row of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BenchCase {
    pub tokens: usize,
    pub d_in: usize,
    pub d_out: usize,
    pub experts: usize,
    pub rank: usize,
    /// Slots per token of a top-k routing (ignored by the other routings).
    pub k: usize,
    pub routing: BenchRouting,
    /// `x`, `A` and `B` start one element past a 16-byte boundary (the views a framework hands over
    /// when it slices a tensor), so that kernels needing aligned 16-byte loads must fall back.
    pub misaligned: bool,
}

impl BenchCase {
    pub const fn new(
        tokens: usize,
        d_in: usize,
        d_out: usize,
        experts: usize,
        rank: usize,
        k: usize,
        routing: BenchRouting,
    ) -> Self {
        BenchCase {
            tokens,
            d_in,
            d_out,
            experts,
            rank,
            k,
            routing,
            misaligned: false,
        }
    }

    /// The same case with `x`, `A` and `B` misaligned by one element.
    pub const fn misaligned(self) -> Self {
        BenchCase {
            misaligned: true,
            ..self
        }
    }
}

/// The shapes of the CUDA-kernel issue: `T ∈ {1, 16, 256, 4096, 16384}` at 4096→4096, E 8, r 16,
/// k 2; (4096, 1280→1280, E 4, r 8, k 1); (4096, 1280→5120, E 4, r 32, k 2); (8192, 3584→3584, E 8,
/// r 64, k 2); (4096, 4096→4096, E 32, r 16, k 4); threshold and SAML (sequences of 256) routing on
/// the first shape at T = 4096; and the first shape at T = 4096 off the fast paths' conditions:
/// `d` not a multiple of 8 (4100→4100), an odd rank (15), and misaligned `x`, `A`, `B`.
pub fn issue_cases() -> Vec<BenchCase> {
    use BenchRouting::*;
    let mut cases: Vec<BenchCase> = [1, 16, 256, 4096, 16384]
        .iter()
        .map(|&t| BenchCase::new(t, 4096, 4096, 8, 16, 2, TopK))
        .collect();
    cases.extend([
        BenchCase::new(4096, 1280, 1280, 4, 8, 1, TopK),
        BenchCase::new(4096, 1280, 5120, 4, 32, 2, TopK),
        BenchCase::new(8192, 3584, 3584, 8, 64, 2, TopK),
        BenchCase::new(4096, 4096, 4096, 32, 16, 4, TopK),
        BenchCase::new(4096, 4096, 4096, 8, 16, 2, Threshold),
        BenchCase::new(4096, 4096, 4096, 8, 16, 2, PerSequence { seq_len: 256 }),
        BenchCase::new(4096, 4100, 4100, 8, 16, 2, TopK),
        BenchCase::new(4096, 4096, 4096, 8, 15, 2, TopK),
        BenchCase::new(4096, 4096, 4096, 8, 16, 2, TopK).misaligned(),
    ]);
    cases
}

/// What [`run`] measures.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Element type of `x`, `y` and the experts (f32, f16 or bf16).
    pub dtype: DType,
    pub cases: Vec<BenchCase>,
    /// Timed iterations per measurement for `T < 4096`; a fifth of them (at least 1) from 4096 on.
    pub iters: usize,
    /// Bandwidth of the memory floor in GB/s; `None`: measured in the same run, as a device-to-device
    /// copy of 512 MiB (bytes read + written over its time).
    pub bandwidth_gbps: Option<f64>,
    /// Also time our backward of the LoRA part.
    pub backward: bool,
    /// CUDA device ordinal.
    pub device: usize,
    /// Also write each main-table row to stderr as soon as it is measured, so a long run that is
    /// stopped part-way still leaves the rows it finished.
    pub progress: bool,
}

impl BenchOptions {
    /// The issue's shapes ([`issue_cases`]) in `dtype`, 100 iterations, the bandwidth measured, with
    /// backward.
    pub fn new(dtype: DType) -> Self {
        BenchOptions {
            dtype,
            cases: issue_cases(),
            iters: 100,
            bandwidth_gbps: None,
            backward: true,
            device: 0,
            progress: false,
        }
    }
}

/// Runs the benchmark on device `opts.device` and returns the Markdown table (a title line, the
/// header and one row per case).
///
/// Errors: an empty case list, `iters == 0` or a non-positive bandwidth ([`Error::InvalidParameter`]
/// / [`Error::InvalidDim`]); a case whose shape an op refuses (its error, e.g. more than 65535
/// tokens for the backward); device, driver and cuBLAS failures ([`Error::NoDevice`],
/// [`Error::Driver`], [`Error::Cuda`]).
pub fn run(opts: &BenchOptions) -> Result<String> {
    if opts.cases.is_empty() || opts.iters == 0 {
        return Err(Error::InvalidDim {
            what: if opts.iters == 0 {
                "iters"
            } else {
                "number of cases"
            },
            value: 0,
            reason: "the benchmark needs at least one case and one iteration",
        });
    }
    if let Some(bw) = opts
        .bandwidth_gbps
        .filter(|bw| !(bw.is_finite() && *bw > 0.0))
    {
        return Err(Error::InvalidParameter {
            what: "bandwidth_gbps",
            value: bw as f32,
            reason: "must be finite and > 0",
        });
    }
    let dev = Device::new(opts.device)?;
    let (ctx, stream) = dev.gpu(BENCH)?;
    // SAFETY: every buffer of the benchmark is made after this call, on the device's one stream, and
    // used only on it (cuBLAS is bound to it too), so none needs cudarc's cross-stream events. Without
    // them a buffer's use records and waits on no event: a graph capture cannot wait on events
    // recorded before it began, and the eager timings carry no event calls.
    unsafe { ctx.disable_event_tracking() };
    let blas = CudaBlas::new(stream.clone()).map_err(blas_err)?;
    let (bandwidth, bw_source) = match opts.bandwidth_gbps {
        Some(bw) => (bw, "given"),
        None => (
            copy_bandwidth_gbps(&dev)?,
            "measured: a 512 MiB device-to-device copy",
        ),
    };
    let opts = &BenchOptions {
        bandwidth_gbps: Some(bandwidth),
        ..opts.clone()
    };
    let mut out = format!(
        "LoRA part of a MoLE layer, {:?}, memory floor at {:.0} GB/s ({bw_source}); times in µs (CUDA events, mean of {} \
         iterations, {} from T = 4096); ours = the path LoraPath::for_shape picks (seg = segmented, \
         dg = dense-gated on CUDA cores, dg-tc = dense-gated on tensor cores, dg-fused = its fused \
         decode for T ≤ 16: router, gate and shrink in one kernel, the expand in a second); (a) = cuBLAS per-expert loop, (b) = dense all-experts cuBLAS; graph replay \
         = the forward of ours (MoleLoraForward::run) captured once in a CUDA graph, per replay, for \
         T ≤ {GRAPH_MAX_TOKENS}\n\n",
        opts.dtype,
        bandwidth,
        opts.iters,
        opts.iters.div_ceil(5),
    );
    out.push_str(
        "| T | d_in→d_out | E | r | routing | segmented | dense-gated | ours | GB/s | floor | ours / floor \
         | (a) cuBLAS loop | (a) / ours | (b) dense cuBLAS | (b) / ours | base GEMM | backward | bwd / fwd \
         | bwd buffers MiB | graph replay |\n",
    );
    out.push_str(
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut variant_rows = Vec::new();
    let mut sweep_rows = Vec::new();
    // The reasons a capture failed, each written to stderr the first time it comes.
    let mut capture_failures = Vec::new();
    for case in &opts.cases {
        let (row, variants, sweep) = match opts.dtype {
            DType::F32 => bench_case::<f32>(&dev, &blas, case, opts, &mut capture_failures)?,
            DType::F16 => bench_case::<f16>(&dev, &blas, case, opts, &mut capture_failures)?,
            DType::BF16 => bench_case::<bf16>(&dev, &blas, case, opts, &mut capture_failures)?,
        };
        if opts.progress {
            eprintln!("{row}");
        }
        out.push_str(&row);
        out.push('\n');
        variant_rows.extend(variants);
        sweep_rows.extend(sweep);
    }
    if !variant_rows.is_empty() {
        out.push_str(
            "\nKernel variants of the grouped shrink and expand alone, on the segmented plan (µs; — where \
             the variant cannot take the shape, alignment or dtype); KernelPath::Auto picks among them\n\n\
             | T | d_in→d_out | E | r | routing | shrink plain | shrink vectorised | shrink tensor cores \
             | shrink rows | expand plain | expand vectorised | expand staged |\n\
             |---|---|---|---|---|---|---|---|---|---|---|---|\n",
        );
        for row in variant_rows {
            out.push_str(&row);
            out.push('\n');
        }
    }
    if !sweep_rows.is_empty() {
        out.push_str(
            "\nThe dense-gated LoRA part (routing excluded: the same ids and weights for every column; µs) on \
             CUDA cores (the shrink, then the expand its rule picks) and on tensor cores with every split-K \
             factor of the shrink, g⊙h in one term, and in two terms at the default split; default = the split \
             DenseGatedConfig::for_shape picks, best = the fastest tensor-core configuration\n\n\
             | T | d_in→d_out | E | r | routing | CUDA cores | tc split 1 | tc split 2 | tc split 4 | tc split 8 \
             | tc split 16 | tc two-term | default split | best |\n\
             |---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        );
        for row in sweep_rows {
            out.push_str(&row);
            out.push('\n');
        }
    }
    Ok(out)
}

/// What the benchmark's errors name: it times GPU kernels against cuBLAS with CUDA events, so on the
/// emulated device its GPU-only steps are an [`Error::Unsupported`] naming it.
const BENCH: &str = "cuda::bench (GPU only: cuBLAS baselines and CUDA-event timing)";

fn drv(e: cudarc::driver::DriverError) -> Error {
    Error::Driver(e.to_string())
}

fn blas_err(e: cudarc::cublas::result::CublasError) -> Error {
    Error::Driver(format!("cuBLAS: {e}"))
}

/// Mean time of `f` in microseconds over `iters` runs after 3 warm-up runs, by CUDA events.
fn time_us(dev: &Device, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    let (ctx, stream) = dev.gpu(BENCH)?;
    let start = ctx
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(drv)?;
    let end = ctx
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(drv)?;
    start.record(stream).map_err(drv)?;
    for _ in 0..iters {
        f()?;
    }
    end.record(stream).map_err(drv)?;
    end.synchronize().map_err(drv)?;
    Ok(start.elapsed_ms(&end).map_err(drv)? as f64 * 1000.0 / iters as f64)
}

/// The device's copy bandwidth in GB/s: a 512 MiB device-to-device copy, bytes read + written over
/// its mean time (10 copies after warm-up).
fn copy_bandwidth_gbps(dev: &Device) -> Result<f64> {
    const BYTES: usize = 512 << 20;
    let src = dev.zeros::<u32>(BYTES / 4)?;
    let mut dst = dev.zeros::<u32>(BYTES / 4)?;
    let us = time_us(dev, 10, || dev.copy(&src, &mut dst))?;
    Ok(2.0 * BYTES as f64 / (us * 1e-6) / 1e9)
}

/// Rows of at most this many tokens also time the forward replayed from a CUDA graph (where launch
/// overhead, which a graph removes, is a large part of the time).
pub const GRAPH_MAX_TOKENS: usize = 256;

/// The forward of "ours" ([`MoleLoraForward::run`] on `path`: router logits, gating and the LoRA
/// part into `y`) captured once into a CUDA graph, as `tests/cuda_graph.rs` captures one, then the
/// mean time of a replay in µs by [`time_us`]. `Ok(Err(reason))` where the capture fails (the row
/// shows "—"); `Err` for a failure outside the capture (making the workspace, the eager run before
/// it, timing the replays).
#[allow(clippy::too_many_arguments)]
fn graph_replay_us<T: CudaElement>(
    dev: &Device,
    iters: usize,
    path: LoraPath,
    shape: &LoraShape,
    t: usize,
    x: &impl DeviceRead<T>,
    router: &DeviceRouter<'_, T>,
    gate: &DeviceGate<'_>,
    a: &impl DeviceRead<T>,
    b: &impl DeviceRead<T>,
    scale: f32,
    y: &mut Buffer<T>,
) -> Result<std::result::Result<f64, String>> {
    let mut fwd = MoleLoraForward::new(dev, t, shape, gate.k_max(shape.num_experts), path)?;
    // One eager run, so that whatever a first launch does (loading a kernel, setting its shared
    // memory) happens outside the capture, and the captured work is known to run.
    fwd.run(dev, x, router, gate, a, b, scale, y)?;
    dev.synchronize()?;
    let (_, stream) = dev.gpu(BENCH)?;
    if let Err(e) = stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL) {
        return Ok(Err(format!("beginning the capture failed: {e}")));
    }
    let ran = fwd.run(dev, x, router, gate, a, b, scale, y);
    // The capture ends whatever the run gave, so that the stream leaves capture mode.
    let ended = stream
        .end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
    let graph = match (ran, ended) {
        (Err(e), _) => return Ok(Err(format!("the forward failed while capturing: {e}"))),
        (Ok(()), Err(e)) => return Ok(Err(format!("ending the capture failed: {e}"))),
        (Ok(()), Ok(None)) => return Ok(Err("the capture recorded no work".into())),
        (Ok(()), Ok(Some(graph))) => graph,
    };
    // The graph holds the addresses of fwd's, x's, the weights' and y's memory: it is dropped at
    // the end of this function, before fwd, and after time_us has waited for the last replay.
    time_us(dev, iters, || graph.launch().map_err(drv)).map(Ok)
}

/// Row-major `C[M, N] = A[M, K]·B[N, K]ᵀ + beta·C` through column-major cuBLAS (`Cᵀ = B·Aᵀ`).
/// `M`, `N`, `K` >= 1.
#[allow(clippy::too_many_arguments)]
fn gemm_abt<T: CudaElement>(
    blas: &CudaBlas,
    m: usize,
    n: usize,
    k: usize,
    a: &impl DeviceRead<T>,
    b: &impl DeviceRead<T>,
    c: &mut impl DeviceWrite<T>,
    beta: f32,
) -> Result<()>
where
    CudaBlas: Gemm<T>,
{
    molora::error::check_len("GEMM A [M, K]", m * k, a.len())?;
    molora::error::check_len("GEMM B [N, K]", n * k, b.len())?;
    molora::error::check_len("GEMM C [M, N]", m * n, c.len())?;
    let dim = |what: &'static str, v: usize| {
        i32::try_from(v).map_err(|_| Error::InvalidDim {
            what,
            value: v,
            reason: "must fit in an i32 (cuBLAS)",
        })
    };
    let cfg = GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_T,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: dim("GEMM N", n)?,
        n: dim("GEMM M", m)?,
        k: dim("GEMM K", k)?,
        alpha: T::from_f32(1.0),
        lda: dim("GEMM K", k)?,
        ldb: dim("GEMM K", k)?,
        beta: T::from_f32(beta),
        ldc: dim("GEMM N", n)?,
    };
    let (a, b) = (gpu_view("GEMM A", a)?, gpu_view("GEMM B", b)?);
    let mut c = gpu_view_mut("GEMM C", c)?;
    // SAFETY: column-major Cᵀ [N, M] = B [K, N]ᵀ · Aᵀ [K, M] with lda = ldb = K and ldc = N reads
    // N·K elements of b, M·K of a and writes M·N of c, the lengths checked above (GPU memory:
    // checked by gpu_view).
    unsafe { blas.gemm(cfg, &b, &a, &mut c) }.map_err(blas_err)
}

struct Row {
    /// µs of the dense-gated part alone: CUDA cores, tensor cores at splits 1, 2, 4, 8, 16, two-term
    /// at the default split; the default split.
    sweep: Option<([Option<f64>; 7], usize)>,
    seg: Option<f64>,
    dense_gated: Option<f64>,
    ours: f64,
    ours_path: &'static str,
    base_a: f64,
    base_b: Option<f64>,
    base_gemm: f64,
    bwd: Option<(f64, usize)>,
    /// µs per replay of the forward of "ours" captured in a CUDA graph (None: not measured).
    graph: Option<f64>,
    /// Shrink plain / vectorised / tensor cores, expand plain / vectorised (None where refused).
    variants: Option<[Option<f64>; 7]>,
}

fn bench_case<T: CudaElement>(
    dev: &Device,
    blas: &CudaBlas,
    case: &BenchCase,
    opts: &BenchOptions,
    capture_failures: &mut Vec<String>,
) -> Result<(String, Option<String>, Option<String>)>
where
    CudaBlas: Gemm<T>,
{
    let BenchCase {
        tokens: t,
        d_in,
        d_out,
        experts: e,
        rank: r,
        k,
        routing,
        misaligned,
    } = *case;
    if t == 0 {
        return Err(Error::InvalidDim {
            what: "bench tokens",
            value: 0,
            reason: "a benchmark case needs at least one token",
        });
    }
    let shape = LoraShape::new(e, r, d_in, d_out)?;
    let iters = if t >= 4096 {
        opts.iters.div_ceil(5)
    } else {
        opts.iters
    };
    let values = |n: usize, seed: u64, scale: f32| -> Vec<T> { Rng::new(seed).values(n, scale) };
    // Misaligned cases read x, A and B from one element into their allocations.
    let off = usize::from(misaligned);
    let (xb, ab, bb) = (
        dev.upload(&values(t * d_in + off, 1, 1.0))?,
        dev.upload(&values(shape.a_len() + off, 2, 0.02))?,
        dev.upload(&values(shape.b_len() + off, 3, 0.02))?,
    );
    let (x, a, b) = (xb.slice(off..)?, ab.slice(off..)?, bb.slice(off..)?);
    let mut y = dev.upload(&values(t * d_out, 5, 1.0))?;
    let scale = 2.0f32;

    let row = match routing {
        BenchRouting::PerSequence { seq_len } => bench_saml(
            dev, blas, &shape, t, seq_len, iters, &x, &a, &b, &mut y, opts,
        )?,
        BenchRouting::TopK | BenchRouting::Threshold => {
            let gate = match routing {
                BenchRouting::Threshold => DeviceGate::from_gate(
                    &Gate::Threshold(ThresholdSpec::Learned { theta: 0.0 }),
                    e,
                )?,
                _ => DeviceGate::TopK {
                    k,
                    renormalize: true,
                },
            };
            let k_max = gate.k_max(e);
            let w_g = dev.upload(&values(e * d_in, 4, 0.02))?;
            let mut logits = dev.zeros::<f32>(t * e)?;
            let mut ids = dev.zeros::<i32>(t * k_max)?;
            let mut w = dev.zeros::<f32>(t * k_max)?;
            let mut plan = DevicePlan::new(dev, t, k_max, e)?;
            let mut h = dev.zeros::<f32>(t * k_max * r)?;
            let act = Activation::Softmax;
            let route = |logits: &mut Buffer<f32>,
                         ids: &mut Buffer<i32>,
                         w: &mut Buffer<f32>|
             -> Result<()> {
                router_logits(dev, &x, t, d_in, &w_g, None, e, logits, None)?;
                gating(dev, logits, t, e, act, 1.0, None, &gate, ids, w)
            };

            let seg = time_us(dev, iters, || {
                route(&mut logits, &mut ids, &mut w)?;
                dispatch(dev, &ids, &mut plan)?;
                shrink_experts(dev, &x, &a, &shape, &plan, &mut h)?;
                expand_experts(dev, &h, &b, &shape, &plan, &ids, &w, scale, &mut y)
            })?;
            let router = DeviceRouter {
                w_g: w_g.slice(..)?,
                b_g: None,
                activation: act,
                temperature: 1.0,
            };
            // The dense-gated forward as MoleLoraForward runs it (the fused decode for T ≤ 16).
            let mut fused = false;
            let dense_gated = if e * r <= DENSE_GATED_MAX_COLUMNS {
                let mut fwd = MoleLoraForward::new(dev, t, &shape, k_max, LoraPath::DenseGated)?;
                let us = time_us(dev, iters, || {
                    fwd.run(dev, &x, &router, &gate, &a, &b, scale, &mut y)
                })?;
                fused = fwd.fused_decode();
                Some(us)
            } else {
                None
            };
            let tc = T::DENSE_GATED_TC.is_some() && d_in % 8 == 0 && r % 8 == 0 && !misaligned;
            let (ours, ours_path, path) = match (LoraPath::for_shape(&shape, T::DTYPE), dense_gated)
            {
                (LoraPath::DenseGated, Some(us)) => (
                    us,
                    if fused {
                        "dg-fused"
                    } else if tc {
                        "dg-tc"
                    } else {
                        "dg"
                    },
                    LoraPath::DenseGated,
                ),
                _ => (seg, "seg", LoraPath::Segmented),
            };
            // The dense-gated configurations on this routing (the sweep that sets the rules).
            route(&mut logits, &mut ids, &mut w)?;
            let sweep = if tc && e * r <= DENSE_GATED_MAX_COLUMNS {
                Some(dense_gated_sweep(
                    dev, iters, &shape, t, &x, &a, &b, &ids, &w, k_max, scale, &mut y,
                )?)
            } else {
                None
            };

            // The same forward on that path, replayed from a CUDA graph.
            let graph = if t <= GRAPH_MAX_TOKENS {
                match graph_replay_us(
                    dev, iters, path, &shape, t, &x, &router, &gate, &a, &b, scale, &mut y,
                )? {
                    Ok(us) => Some(us),
                    Err(reason) => {
                        if !capture_failures.contains(&reason) {
                            eprintln!(
                                "cuda::bench: graph replay not measured (\"—\") where the capture \
                                 fails, first at T = {t}, {d_in}→{d_out}, E {e}, r {r}: {reason}"
                            );
                            capture_failures.push(reason);
                        }
                        None
                    }
                }
            } else {
                None
            };

            // Each kernel variant of the grouped shrink and expand alone on this routing's plan.
            route(&mut logits, &mut ids, &mut w)?;
            dispatch(dev, &ids, &mut plan)?;
            let mut variants = [None; 7];
            for (slot, path) in [
                (0, KernelPath::Plain),
                (1, KernelPath::Vectorized),
                (2, KernelPath::TensorCore),
                (3, KernelPath::Rows),
            ] {
                variants[slot] = match shrink_experts_on(dev, &x, &a, &shape, &plan, &mut h, path) {
                    Err(Error::Unsupported { .. }) => None,
                    Err(e) => return Err(e),
                    Ok(()) => Some(time_us(dev, iters, || {
                        shrink_experts_on(dev, &x, &a, &shape, &plan, &mut h, path)
                    })?),
                };
            }
            for (slot, path) in [
                (4, KernelPath::Plain),
                (5, KernelPath::Vectorized),
                (6, KernelPath::Staged),
            ] {
                let mut expand =
                    || expand_experts_on(dev, &h, &b, &shape, &plan, &ids, &w, scale, &mut y, path);
                variants[slot] = match expand() {
                    Err(Error::Unsupported { .. }) => None,
                    Err(e) => return Err(e),
                    Ok(()) => Some(time_us(dev, iters, expand)?),
                };
            }

            // Baseline (a): the same routing, one host sync for the expert sizes, one gather, per
            // expert two cuBLAS GEMMs, one scatter-combine.
            let slots = t * k_max;
            let mut xs = dev.zeros::<T>(slots * d_in)?;
            let mut hs = dev.zeros::<T>(slots * r)?;
            let mut ys = dev.zeros::<T>(slots * d_out)?;
            let mut offsets = vec![0i32; e + 1];
            let base_a = time_us(dev, iters, || {
                route(&mut logits, &mut ids, &mut w)?;
                dispatch(dev, &ids, &mut plan)?;
                plan.expert_offsets_to_host(dev, &mut offsets)?;
                gather_rows(dev, &x, d_in, &plan, &mut xs)?;
                for ex in 0..e {
                    let (lo, hi) = (offsets[ex].max(0) as usize, offsets[ex + 1].max(0) as usize);
                    if hi <= lo || hi > slots {
                        continue;
                    }
                    let n = hi - lo;
                    gemm_abt(
                        blas,
                        n,
                        r,
                        d_in,
                        &xs.slice(lo * d_in..hi * d_in)?,
                        &a.slice(ex * r * d_in..(ex + 1) * r * d_in)?,
                        &mut hs.slice_mut(lo * r..hi * r)?,
                        0.0,
                    )?;
                    gemm_abt(
                        blas,
                        n,
                        d_out,
                        r,
                        &hs.slice(lo * r..hi * r)?,
                        &b.slice(ex * d_out * r..(ex + 1) * d_out * r)?,
                        &mut ys.slice_mut(lo * d_out..hi * d_out)?,
                        0.0,
                    )?;
                }
                scatter_combine(dev, &ys, d_out, &plan, &ids, &w, scale, &mut y)
            })?;
            drop((xs, hs, ys));

            let bwd = if opts.backward {
                // MoleLoraForward's backward on our path after one forward (the routing and the
                // intermediates a training step keeps): LoRA part, gate, router, each on tensor
                // cores where its conditions hold.
                let mut fwd = MoleLoraForward::new(dev, t, &shape, k_max, path)?;
                fwd.run(dev, &x, &router, &gate, &a, &b, scale, &mut y)?;
                let dy = dev.upload(&values(t * d_out, 9, 1.0))?;
                let mut grads = fwd.new_grads(dev)?;
                let us = time_us(dev, iters, || {
                    fwd.backward(dev, &x, &router, &gate, &a, &b, &dy, scale, &mut grads)
                })?;
                Some((us, grads.device_bytes()))
            } else {
                None
            };
            let base_b = Some(dense_baseline(dev, blas, &shape, t, iters, &x, &mut y)?);
            Row {
                sweep,
                seg: Some(seg),
                dense_gated,
                ours,
                ours_path,
                base_a,
                base_b,
                base_gemm: 0.0,
                bwd,
                graph,
                variants: Some(variants),
            }
        }
    };

    let w0 = dev.upload(&values(d_out * d_in, 8, 0.02))?;
    let mut y0 = dev.zeros::<T>(t * d_out)?;
    let base_gemm = time_us(dev, iters, || {
        gemm_abt(blas, t, d_out, d_in, &x, &w0, &mut y0, 0.0)
    })?;
    let row = Row { base_gemm, ..row };

    let elt = std::mem::size_of::<T>() as f64;
    let bytes = (t * d_in + 2 * t * d_out + e * r * (d_in + d_out)) as f64 * elt;
    // `run` always passes the bandwidth in (given or measured).
    let floor_us = bytes / (opts.bandwidth_gbps.unwrap_or(f64::NAN) * 1e9) * 1e6;
    let routing_name = match routing {
        BenchRouting::TopK => format!("top-{k}"),
        BenchRouting::Threshold => "threshold σ(0)/E".into(),
        BenchRouting::PerSequence { seq_len } => {
            format!("SAML, {} seqs", t.div_ceil(seq_len.clamp(1, t)))
        }
    };
    let opt = |v: Option<f64>| v.map_or_else(|| "—".to_string(), |v| format!("{v:.1}"));
    let (bwd, bwd_ratio, bwd_mib) = match row.bwd {
        Some((us, b)) => (
            format!("{us:.1}"),
            format!("{:.2}×", us / row.ours),
            format!("{:.1}", b as f64 / (1 << 20) as f64),
        ),
        None => ("—".into(), "—".into(), "—".into()),
    };
    let (b_us, b_ratio) = match row.base_b {
        Some(us) => (format!("{us:.1}"), format!("{:.2}×", us / row.ours)),
        None => ("—".into(), "—".into()),
    };
    let sweep = row.sweep.map(|(v, default_split)| {
        let cells: Vec<String> = v.iter().map(|&u| opt(u)).collect();
        let best = [1usize, 2, 4, 8, 16]
            .iter()
            .zip(&v[1..6])
            .filter_map(|(&sp, &u)| u.map(|u| (sp, u)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map_or_else(|| "—".to_string(), |(sp, u)| format!("{u:.1} (split {sp})"));
        format!(
            "| {t} | {d_in}→{d_out} | {e} | {r} | {routing_name} | {} | {default_split} | {best} |",
            cells.join(" | ")
        )
    });
    let main = format!(
        "| {t} | {d_in}→{d_out} | {e} | {r} | {routing_name} | {} | {} | {:.1} ({}) | {:.0} | {floor_us:.1} | {:.2}× | {:.1} | {:.2}× | {b_us} | {b_ratio} | {:.1} | {bwd} | {bwd_ratio} | {bwd_mib} | {} |",
        opt(row.seg),
        opt(row.dense_gated),
        row.ours,
        row.ours_path,
        bytes / (row.ours * 1e-6) / 1e9,
        row.ours / floor_us,
        row.base_a,
        row.base_a / row.ours,
        row.base_gemm,
        opt(row.graph),
    );
    let variants = row.variants.map(|v| {
        let cells: Vec<String> = v.iter().map(|&u| opt(u)).collect();
        format!(
            "| {t} | {d_in}→{d_out} | {e} | {r} | {routing_name} | {} |",
            cells.join(" | ")
        )
    });
    Ok((main, variants, sweep))
}

/// The dense-gated LoRA part alone on a fixed routing: on CUDA cores, and on tensor cores with each
/// split-K factor the shape takes and with g⊙h in two terms; plus the default split.
#[allow(clippy::too_many_arguments)]
fn dense_gated_sweep<T: CudaElement>(
    dev: &Device,
    iters: usize,
    shape: &LoraShape,
    t: usize,
    x: &impl DeviceRead<T>,
    a: &impl DeviceRead<T>,
    b: &impl DeviceRead<T>,
    ids: &Buffer<i32>,
    w: &Buffer<f32>,
    k_max: usize,
    scale: f32,
    y: &mut Buffer<T>,
) -> Result<([Option<f64>; 7], usize)> {
    let default = DenseGatedConfig::for_shape(dev, t, shape);
    let mut out = [None; 7];
    // CUDA cores: the fastest expand variant that takes the shape (staged where B fits).
    let mut ws = DenseGatedWorkspace::new(dev, t, shape)?;
    for path in [
        KernelPath::Staged,
        KernelPath::Vectorized,
        KernelPath::Plain,
    ] {
        let mut run =
            || lora_dense_gated_on(dev, x, a, b, shape, ids, w, k_max, scale, &mut ws, y, path);
        match run() {
            Err(Error::Unsupported { .. }) => continue,
            Err(e) => return Err(e),
            Ok(()) => {}
        }
        let us = time_us(dev, iters, run)?;
        out[0] = Some(out[0].map_or(us, |p: f64| p.min(us)));
    }
    let configs = [1usize, 2, 4, 8, 16]
        .iter()
        .map(|&splits| DenseGatedConfig {
            splits,
            two_term_h: false,
        })
        .chain([DenseGatedConfig {
            two_term_h: true,
            ..default
        }]);
    for (slot, config) in (1..).zip(configs) {
        let mut ws = match DenseGatedWorkspace::with_config(dev, t, shape, config) {
            Ok(ws) => ws,
            Err(Error::InvalidDim { .. }) => continue,
            Err(e) => return Err(e),
        };
        out[slot] = Some(time_us(dev, iters, || {
            lora_dense_gated_on(
                dev,
                x,
                a,
                b,
                shape,
                ids,
                w,
                k_max,
                scale,
                &mut ws,
                y,
                KernelPath::TensorCore,
            )
        })?);
    }
    Ok((out, default.splits))
}

/// Baseline (b): `H = X·A_allᵀ` `[T, E·r]`, `Y += H·B_allᵀ` (`B_all` `[d_out, E·r]`), two GEMMs.
#[allow(clippy::too_many_arguments)]
fn dense_baseline<T: CudaElement>(
    dev: &Device,
    blas: &CudaBlas,
    shape: &LoraShape,
    t: usize,
    iters: usize,
    x: &impl DeviceRead<T>,
    y: &mut Buffer<T>,
) -> Result<f64>
where
    CudaBlas: Gemm<T>,
{
    let (er, d_in, d_out) = (shape.num_experts * shape.rank, shape.d_in, shape.d_out);
    let a_all = dev.upload(&Rng::new(6).values::<T>(er * d_in, 0.02))?;
    let b_all = dev.upload(&Rng::new(7).values::<T>(d_out * er, 0.02))?;
    let mut h_all = dev.zeros::<T>(t * er)?;
    time_us(dev, iters, || {
        gemm_abt(blas, t, er, d_in, x, &a_all, &mut h_all, 0.0)?;
        gemm_abt(blas, t, d_out, er, &h_all, &b_all, y, 1.0)
    })
}

/// SAML routing: ours = mixing + SGMV shrink/expand; baseline (a) = mixing as one cuBLAS GEMM per
/// stack (`[S, E]·[E, r·d_in]`) + per-sequence cuBLAS GEMMs; no baseline (b).
#[allow(clippy::too_many_arguments)]
fn bench_saml<T: CudaElement>(
    dev: &Device,
    blas: &CudaBlas,
    shape: &LoraShape,
    t: usize,
    seq_len: usize,
    iters: usize,
    x: &BufferView<'_, T>,
    a: &BufferView<'_, T>,
    b: &BufferView<'_, T>,
    y: &mut Buffer<T>,
    opts: &BenchOptions,
) -> Result<Row>
where
    CudaBlas: Gemm<T>,
{
    let (e, r, d_in, d_out) = (shape.num_experts, shape.rank, shape.d_in, shape.d_out);
    let seq_len = seq_len.clamp(1, t);
    let lens: Vec<usize> = (0..t.div_ceil(seq_len))
        .map(|i| seq_len.min(t - i * seq_len))
        .collect();
    let nseq = lens.len();
    let mixed = LoraShape::new(nseq, r, d_in, d_out)?;
    let probs_host: Vec<f32> = Rng::new(10)
        .values::<f32>(nseq * e, 1.0)
        .iter()
        .map(|v| v.abs() + 0.01)
        .collect();
    let probs = dev.upload(&probs_host)?;
    let scale = 2.0f32;
    let mut ws = WeightSpaceLora::<T>::new(dev, &lens, shape)?;
    let ours = time_us(dev, iters, || ws.forward(dev, x, a, b, &probs, scale, y))?;

    // Baseline (a): Ā = P·A_all as a GEMM ([S, E]·[E, r·d_in]: C = P·(A_allᵀ)ᵀ needs A_all as
    // [r·d_in, E], so the stacks are transposed once outside the timing), then per sequence
    // H_s = X_s·Ā_sᵀ and Y_s += s·H_s·B̄_sᵀ (the scale folded into P).
    let p_t: Vec<T> = probs_host.iter().map(|&v| T::from_f32(v * scale)).collect();
    let p_one: Vec<T> = probs_host.iter().map(|&v| T::from_f32(v)).collect();
    let (a_host, b_host) = (dev.download(a)?, dev.download(b)?);
    let transpose = |w: &[T], per: usize| -> Vec<T> {
        let mut out = vec![T::from_f32(0.0); w.len()];
        for ex in 0..e {
            for i in 0..per {
                out[i * e + ex] = w[ex * per + i];
            }
        }
        out
    };
    let a_t = dev.upload(&transpose(&a_host, r * d_in))?;
    let b_t = dev.upload(&transpose(&b_host, d_out * r))?;
    let p_a = dev.upload(&p_one)?;
    let p_b = dev.upload(&p_t)?;
    let mut am_c = dev.zeros::<T>(mixed.a_len())?;
    let mut bm_c = dev.zeros::<T>(mixed.b_len())?;
    let mut h_c = dev.zeros::<T>(t * r)?;
    let base_a = time_us(dev, iters, || {
        gemm_abt(blas, nseq, r * d_in, e, &p_a, &a_t, &mut am_c, 0.0)?;
        gemm_abt(blas, nseq, d_out * r, e, &p_b, &b_t, &mut bm_c, 0.0)?;
        let mut lo = 0usize;
        for (s, &n) in lens.iter().enumerate() {
            let hi = lo + n;
            gemm_abt(
                blas,
                n,
                r,
                d_in,
                &x.slice(lo * d_in..hi * d_in)?,
                &am_c.slice(s * r * d_in..(s + 1) * r * d_in)?,
                &mut h_c.slice_mut(lo * r..hi * r)?,
                0.0,
            )?;
            gemm_abt(
                blas,
                n,
                d_out,
                r,
                &h_c.slice(lo * r..hi * r)?,
                &bm_c.slice(s * d_out * r..(s + 1) * d_out * r)?,
                &mut y.slice_mut(lo * d_out..hi * d_out)?,
                1.0,
            )?;
            lo = hi;
        }
        Ok(())
    })?;

    let bwd = if opts.backward {
        // The mixed adapters' backward (on a plan with one slot per token holding its sequence),
        // then the mixing backward, after the forward timed above.
        let dy = dev.upload(&Rng::new(9).values::<T>(t * d_out, 1.0))?;
        let bytes = ws.backward_bytes();
        let us = time_us(dev, iters, || ws.backward(dev, x, a, b, &probs, &dy, scale))?;
        Some((us, bytes))
    } else {
        None
    };
    Ok(Row {
        sweep: None,
        seg: Some(ours),
        dense_gated: None,
        ours,
        ours_path: "seg",
        base_a,
        base_b: None,
        base_gemm: 0.0,
        bwd,
        graph: None,
        variants: None,
    })
}
