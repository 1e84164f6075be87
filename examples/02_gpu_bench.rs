//! GPU benchmark of the LoRA part of a MoLE layer: prints the Markdown tables of
//! `benches/tables/cuda.rs`'s `run` (ours on both paths, GB/s, fraction of the memory floor, the cuBLAS
//! per-expert loop (a) and the dense all-experts cuBLAS version (b), the base GEMM, our backward
//! with the memory it works in, and the graph replay; the kernel variants; the dense-gated sweep)
//! for the shapes of its `issue_cases`.
//!
//! `cargo run --release --no-default-features --features cuda --example 02_gpu_bench [-- f16|bf16|f32 [ITERS [T]]]`
//! (bf16 and 100 iterations by default, every case or only those with `T` tokens; the memory floor's
//! bandwidth is measured in the run unless `MOLORA_BW_GBPS` gives it; `MOLORA_BENCH_NO_BACKWARD=1`
//! skips the backward columns).

#[path = "../benches/tables/cuda.rs"]
mod tables;

use molora::DType;
use tables::{run, BenchOptions};

fn main() {
    if let Err(err) = main_inner() {
        eprintln!("error: {err}");
        std::process::exit(1);
    }
}

fn main_inner() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dtype = match args.next().as_deref() {
        None | Some("bf16") => DType::BF16,
        Some("f16") => DType::F16,
        Some("f32") => DType::F32,
        Some(other) => return Err(format!("unknown dtype {other:?}: use bf16, f16 or f32").into()),
    };
    let mut opts = BenchOptions::new(dtype);
    opts.progress = true;
    if let Some(iters) = args.next() {
        opts.iters = iters.parse()?;
    }
    if let Some(tokens) = args.next() {
        let tokens: usize = tokens.parse()?;
        opts.cases.retain(|c| c.tokens == tokens);
        if opts.cases.is_empty() {
            return Err(format!("no benchmark case has T = {tokens}").into());
        }
    }
    if let Ok(bw) = std::env::var("MOLORA_BW_GBPS") {
        opts.bandwidth_gbps = Some(bw.parse()?);
    }
    opts.backward = std::env::var("MOLORA_BENCH_NO_BACKWARD").map_or(true, |v| v != "1");
    print!("{}", run(&opts)?);
    Ok(())
}
