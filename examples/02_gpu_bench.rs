//! GPU benchmark of the LoRA part of a MoLE layer (everything but the base GEMM), printed as a
//! Markdown table: time per forward on the segmented path (dispatch + grouped shrink/expand) and on
//! the dense-gated path (no dispatch), GB/s and the fraction of the memory floor (segmented path),
//! and in the same run two
//! cuBLAS references: the dense all-experts version (`H = X·A_allᵀ`, `Y += H·B_all`, two GEMMs, the
//! gating scale left out, so a lower bound of that baseline) and the base GEMM `X·W0ᵀ` for scale.
//!
//! Memory floor (DESIGN.md): `(T·d_in + 2·T·d_out + E·r·(d_in + d_out))·bytes / bandwidth`, with
//! the bandwidth from `MOLORA_BW_GBPS` (default 3000, the H100's copy bandwidth).
//!
//! `cargo run --release --features cuda --example 02_gpu_bench [-- f16]` (bf16 by default)

use std::error::Error;

use half::{bf16, f16};
use molora::cpu::ThresholdSpec;
use molora::cuda::cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use molora::cuda::cudarc::driver::sys::CUevent_flags;
use molora::cuda::cudarc::driver::CudaSlice;
use molora::cuda::{
    dispatch, expand_experts, expand_segments, gating, lora_dense_gated, mix_experts,
    router_logits, shrink_experts, shrink_segments, CudaElement, DenseGatedWorkspace, Device,
    DeviceGate, DevicePlan, DeviceSegments, DENSE_GATED_MAX_COLUMNS,
};
use molora::testing::Rng;
use molora::{AdapterSegments, Element, LoraShape, Segments};

type Res<T> = Result<T, Box<dyn Error>>;

#[derive(Clone, Copy)]
struct Shape {
    t: usize,
    d_in: usize,
    d_out: usize,
    e: usize,
    r: usize,
    k: usize,
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    TopK,
    Threshold,
    /// SAML: one mixing vector per sequence of 256 tokens, weight-space mixing + SGMV.
    PerSequence,
}

const fn s(t: usize, d_in: usize, d_out: usize, e: usize, r: usize, k: usize) -> Shape {
    Shape {
        t,
        d_in,
        d_out,
        e,
        r,
        k,
    }
}

const CASES: &[(Shape, Mode)] = &[
    (s(1, 4096, 4096, 8, 16, 2), Mode::TopK),
    (s(16, 4096, 4096, 8, 16, 2), Mode::TopK),
    (s(256, 4096, 4096, 8, 16, 2), Mode::TopK),
    (s(4096, 4096, 4096, 8, 16, 2), Mode::TopK),
    (s(16384, 4096, 4096, 8, 16, 2), Mode::TopK),
    (s(4096, 1280, 1280, 4, 8, 1), Mode::TopK),
    (s(4096, 1280, 5120, 4, 32, 2), Mode::TopK),
    (s(8192, 3584, 3584, 8, 64, 2), Mode::TopK),
    (s(4096, 4096, 4096, 32, 16, 4), Mode::TopK),
    (s(4096, 4096, 4096, 8, 16, 2), Mode::Threshold),
    (s(4096, 4096, 4096, 8, 16, 2), Mode::PerSequence),
];

fn values<T: Element>(n: usize, seed: u64, scale: f32) -> Vec<T> {
    Rng::new(seed).values(n, scale)
}

/// Mean time of `f` in microseconds over `iters` runs after 3 warm-up runs, by CUDA events.
fn time_us(dev: &Device, iters: usize, mut f: impl FnMut() -> Res<()>) -> Res<f64> {
    for _ in 0..3 {
        f()?;
    }
    let ctx = dev.context();
    let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    let end = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    start.record(dev.stream())?;
    for _ in 0..iters {
        f()?;
    }
    end.record(dev.stream())?;
    end.synchronize()?;
    Ok(start.elapsed_ms(&end)? as f64 * 1000.0 / iters as f64)
}

/// Row-major `C[M, N] (+)= A[M, K]·B[N, K]ᵀ` through column-major cuBLAS (`Cᵀ = B·Aᵀ`).
#[allow(clippy::too_many_arguments)]
fn gemm_abt<T: CudaElement>(
    blas: &CudaBlas,
    m: usize,
    n: usize,
    k: usize,
    a: &CudaSlice<T>,
    b: &CudaSlice<T>,
    c: &mut CudaSlice<T>,
    beta: f32,
) -> Res<()>
where
    CudaBlas: Gemm<T>,
{
    let cfg = GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_T,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: n as i32,
        n: m as i32,
        k: k as i32,
        alpha: T::from_f32(1.0),
        lda: k as i32,
        ldb: k as i32,
        beta: T::from_f32(beta),
        ldc: n as i32,
    };
    // SAFETY: a holds M·K, b N·K and c M·N elements (allocated by the caller for this shape).
    unsafe { blas.gemm(cfg, b, a, c) }?;
    Ok(())
}

fn bench<T: CudaElement>(
    dev: &Device,
    blas: &CudaBlas,
    sh: Shape,
    mode: Mode,
    bw: f64,
) -> Res<String>
where
    CudaBlas: Gemm<T>,
{
    let Shape {
        t,
        d_in,
        d_out,
        e,
        r,
        k,
    } = sh;
    let shape = LoraShape::new(e, r, d_in, d_out)?;
    let x = dev.upload(&values::<T>(t * d_in, 1, 1.0))?;
    let a = dev.upload(&values::<T>(shape.a_len(), 2, 0.02))?;
    let b = dev.upload(&values::<T>(shape.b_len(), 3, 0.02))?;
    let w_g = dev.upload(&values::<T>(e * d_in, 4, 0.02))?;
    let mut y = dev.upload(&values::<T>(t * d_out, 5, 1.0))?;
    let k_max = if mode == Mode::Threshold { e } else { k };
    let mut logits = dev.zeros::<f32>(t * e)?;
    let mut ids = dev.zeros::<i32>(t * k_max)?;
    let mut w = dev.zeros::<f32>(t * k_max)?;
    let mut plan = DevicePlan::new(dev, t, k_max, e)?;
    let mut h = dev.zeros::<f32>(t * k_max * r)?;
    let gate = match mode {
        Mode::Threshold => DeviceGate::from_gate(
            &molora::cpu::Gate::Threshold(ThresholdSpec::Learned { theta: 0.0 }),
            e,
        )?,
        _ => DeviceGate::TopK {
            k,
            renormalize: true,
        },
    };
    // SAML: sequences of 256 tokens, one mixing vector each.
    let seq_len = 256.min(t);
    let lens: Vec<usize> = (0..t.div_ceil(seq_len))
        .map(|i| seq_len.min(t - i * seq_len))
        .collect();
    let nseq = lens.len();
    let segs = DeviceSegments::new(
        dev,
        &AdapterSegments::identity(Segments::from_lengths(&lens)?)?,
    )?;
    let mixed_shape = LoraShape::new(nseq, r, d_in, d_out)?;
    let probs = dev.upload(&vec![1.0f32 / e as f32; nseq * e])?;
    let mut am = dev.zeros::<T>(mixed_shape.a_len())?;
    let mut bm = dev.zeros::<T>(mixed_shape.b_len())?;
    let mut hs = dev.zeros::<f32>(t * r)?;

    let iters = if t >= 4096 { 20 } else { 100 };
    let ours = time_us(dev, iters, || {
        if mode == Mode::PerSequence {
            mix_experts(dev, &a, &b, &shape, &probs, nseq, &mut am, &mut bm)?;
            shrink_segments(dev, &x, &am, &mixed_shape, &segs, &mut hs)?;
            expand_segments(dev, &hs, &bm, &mixed_shape, &segs, 2.0, &mut y)?;
        } else {
            router_logits(dev, &x, t, d_in, &w_g, None, e, &mut logits, None)?;
            gating(
                dev,
                &logits,
                t,
                e,
                molora::cpu::Activation::Softmax,
                1.0,
                None,
                &gate,
                &mut ids,
                &mut w,
            )?;
            dispatch(dev, &ids, &mut plan)?;
            shrink_experts(dev, &x, &a, &shape, &plan, &mut h)?;
            expand_experts(dev, &h, &b, &shape, &plan, &ids, &w, 2.0, &mut y)?;
        }
        Ok(())
    })?;

    // The dense-gated path (no dispatch) on the same routing, where E·r fits it.
    let fused = if mode != Mode::PerSequence && e * r <= DENSE_GATED_MAX_COLUMNS {
        let mut ws = DenseGatedWorkspace::new(dev, t, &shape)?;
        let us = time_us(dev, iters, || {
            router_logits(dev, &x, t, d_in, &w_g, None, e, &mut logits, None)?;
            gating(
                dev,
                &logits,
                t,
                e,
                molora::cpu::Activation::Softmax,
                1.0,
                None,
                &gate,
                &mut ids,
                &mut w,
            )?;
            lora_dense_gated(
                dev, &x, &a, &b, &shape, &ids, &w, k_max, 2.0, &mut ws, &mut y,
            )?;
            Ok(())
        })?;
        format!("{us:.1}")
    } else {
        "—".to_string()
    };

    // cuBLAS references.
    let a_all = dev.upload(&values::<T>(e * r * d_in, 6, 0.02))?; // [E·r, d_in]
    let b_all = dev.upload(&values::<T>(d_out * e * r, 7, 0.02))?; // [d_out, E·r]
    let mut h_all = dev.zeros::<T>(t * e * r)?;
    let dense = time_us(dev, iters, || {
        gemm_abt(blas, t, e * r, d_in, &x, &a_all, &mut h_all, 0.0)?;
        gemm_abt(blas, t, d_out, e * r, &h_all, &b_all, &mut y, 1.0)?;
        Ok(())
    })?;
    let w0 = dev.upload(&values::<T>(d_out * d_in, 8, 0.02))?;
    let mut y0 = dev.zeros::<T>(t * d_out)?;
    let base = time_us(dev, iters, || {
        gemm_abt(blas, t, d_out, d_in, &x, &w0, &mut y0, 0.0)
    })?;

    let elt = std::mem::size_of::<T>() as f64;
    let bytes = (t * d_in + 2 * t * d_out + e * r * (d_in + d_out)) as f64 * elt;
    let floor_us = bytes / (bw * 1e9) * 1e6;
    let mode_name = match mode {
        Mode::TopK => format!("top-{k}"),
        Mode::Threshold => "threshold σ(0)/E".into(),
        Mode::PerSequence => format!("SAML, {nseq} seqs"),
    };
    Ok(format!(
        "| {t} | {d_in}→{d_out} | {e} | {r} | {mode_name} | {ours:.1} | {fused} | {:.0} | {floor_us:.1} | {:.2}× | {dense:.1} | {:.2}× | {base:.1} |",
        bytes / (ours * 1e-6) / 1e9,
        ours / floor_us,
        dense / ours,
    ))
}

fn main() {
    if let Err(err) = run() {
        eprintln!("error: {err}");
        std::process::exit(1);
    }
}

fn run() -> Res<()> {
    let dtype = std::env::args().nth(1).unwrap_or_else(|| "bf16".into());
    let bw: f64 = match std::env::var("MOLORA_BW_GBPS") {
        Ok(v) => v.parse()?,
        Err(_) => 3000.0,
    };
    let dev = Device::new(0)?;
    let blas = CudaBlas::new(dev.stream().clone())?;
    println!(
        "LoRA part of a MoLE layer, {dtype}, memory floor at {bw} GB/s (times in µs, CUDA events)\n"
    );
    println!("| T | d_in→d_out | E | r | routing | segmented µs | dense-gated µs | GB/s | floor µs | ours / floor | dense cuBLAS µs | dense / ours | base GEMM µs |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for &(shape, mode) in CASES {
        let row = match dtype.as_str() {
            "f16" => bench::<f16>(&dev, &blas, shape, mode, bw)?,
            "bf16" => bench::<bf16>(&dev, &blas, shape, mode, bw)?,
            other => return Err(format!("unknown dtype {other:?}: use bf16 or f16").into()),
        };
        println!("{row}");
    }
    Ok(())
}
