//! The CPU benchmark table of `molora bench`: the LoRA part of a MoLE layer on the CPU path, two ways
//! over the same routing — the fused per-token loop ([`cpu::lora_delta`]) and the segmented path a
//! GPU runs (dispatch, grouped shrink, grouped expand with the scatter fused: [`cpu::dispatch()`],
//! [`cpu::shrink_experts`], [`cpu::expand_experts`]) — with the bytes the layer must move at least
//! (DESIGN.md: `x`, `y` read and written, every expert read once) turned into GB/s.
//!
//! The CPU path is the reference, not a fast path: the table is a baseline and a guard against
//! accidental extra work. The GPU table is [`molora::cuda`]'s bench (feature `cuda`).

use std::hint::black_box;
use std::time::{Duration, Instant};

use half::bf16;

use molora::cpu::{self, Experts};
use molora::error::Result;
use molora::Rng;
use molora::{Element, LoraShape, Routing};

/// One bench shape: tokens, d_in, d_out, experts, rank, k.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BenchShape {
    pub tokens: usize,
    pub d_in: usize,
    pub d_out: usize,
    pub experts: usize,
    pub rank: usize,
    pub k: usize,
}

impl BenchShape {
    /// Bytes the LoRA part must move at least for element size `elem`:
    /// `(T·d_in + 2·T·d_out + E·r·(d_in + d_out))·elem`.
    pub fn floor_bytes(&self, elem: usize) -> usize {
        (self.tokens * self.d_in
            + 2 * self.tokens * self.d_out
            + self.experts * self.rank * (self.d_in + self.d_out))
            * elem
    }
}

/// The CPU shapes: the first shape of the GPU table (d = 4096 scaled to 1024 for the CPU) at
/// T = 1, 16, 256, and the Whisper-sized (1280 → 1280, E 4, r 8, k 1) one.
pub fn cpu_shapes(quick: bool) -> Vec<BenchShape> {
    let s = |tokens, d_in, d_out, experts, rank, k| BenchShape {
        tokens,
        d_in,
        d_out,
        experts,
        rank,
        k,
    };
    if quick {
        vec![s(1, 256, 256, 8, 16, 2), s(16, 256, 256, 8, 16, 2)]
    } else {
        vec![
            s(1, 1024, 1024, 8, 16, 2),
            s(16, 1024, 1024, 8, 16, 2),
            s(256, 1024, 1024, 8, 16, 2),
            s(256, 1280, 1280, 4, 8, 1),
        ]
    }
}

/// Mean time per call over at least `min_iters` calls and `min_time`.
fn time<F: FnMut()>(mut f: F, min_iters: usize, min_time: Duration) -> Duration {
    f(); // warm-up
    let start = Instant::now();
    let mut n = 0u32;
    while (n as usize) < min_iters || start.elapsed() < min_time {
        f();
        n += 1;
    }
    start.elapsed() / n
}

/// A top-k routing for `shape` (softmax of random logits).
fn routing(shape: &BenchShape, rng: &mut Rng) -> Result<Routing> {
    let logits: Vec<f32> = rng.values(shape.tokens * shape.experts, 2.0);
    let p = cpu::activate(
        &logits,
        shape.tokens,
        shape.experts,
        cpu::Activation::Softmax,
        1.0,
    )?;
    cpu::top_k(&p, shape.tokens, shape.experts, shape.k, true)
}

struct Row {
    fused: Duration,
    segmented: Duration,
}

fn bench_one<T: Element>(shape: &BenchShape, quick: bool) -> Result<Row> {
    let mut rng = Rng::new(1);
    let ls = LoraShape::new(shape.experts, shape.rank, shape.d_in, shape.d_out)?;
    let x: Vec<T> = rng.values(shape.tokens * shape.d_in, 1.0);
    let a: Vec<T> = rng.values(ls.a_len(), 0.05);
    let b: Vec<T> = rng.values(ls.b_len(), 0.05);
    let r = routing(shape, &mut rng)?;
    let experts = Experts::new(&a, &b, ls, 2.0)?;
    let min_time = Duration::from_millis(if quick { 20 } else { 200 });
    // Run each once outside the timer so errors surface as errors, not panics.
    cpu::lora_delta(&x, shape.tokens, &experts, &r)?;
    let plan = cpu::dispatch(&r)?;
    let h = cpu::shrink_experts(&x, &a, &ls, &plan)?;
    let mut y = vec![T::from_f32(0.0); shape.tokens * shape.d_out];
    cpu::expand_experts(&h, &b, &ls, &plan, &r, 2.0, &mut y)?;

    let fused = time(
        || {
            let _ = black_box(cpu::lora_delta(black_box(&x), shape.tokens, &experts, &r));
        },
        3,
        min_time,
    );
    let segmented = time(
        || {
            if let Ok(plan) = cpu::dispatch(&r) {
                if let Ok(h) = cpu::shrink_experts(black_box(&x), &a, &ls, &plan) {
                    let _ = cpu::expand_experts(&h, &b, &ls, &plan, &r, 2.0, &mut y);
                }
            }
            black_box(&y);
        },
        3,
        min_time,
    );
    Ok(Row { fused, segmented })
}

/// Runs the CPU table (f32 and bf16 per shape) and returns it as Markdown.
pub fn cpu_table(quick: bool) -> Result<String> {
    let mut s = String::from(
        "| T | d_in→d_out | E | r | k | dtype | fused per-token µs | GB/s | segmented µs | GB/s |\n\
         |---:|---|---:|---:|---:|---|---:|---:|---:|---:|\n",
    );
    for shape in cpu_shapes(quick) {
        for (name, elem) in [("f32", 4usize), ("bf16", 2)] {
            let row = if elem == 4 {
                bench_one::<f32>(&shape, quick)?
            } else {
                bench_one::<bf16>(&shape, quick)?
            };
            let bytes = shape.floor_bytes(elem) as f64;
            let gbs = |d: Duration| bytes / d.as_secs_f64() / 1e9;
            s.push_str(&format!(
                "| {} | {}→{} | {} | {} | {} | {name} | {:.1} | {:.2} | {:.1} | {:.2} |\n",
                shape.tokens,
                shape.d_in,
                shape.d_out,
                shape.experts,
                shape.rank,
                shape.k,
                row.fused.as_secs_f64() * 1e6,
                gbs(row.fused),
                row.segmented.as_secs_f64() * 1e6,
                gbs(row.segmented),
            ));
        }
    }
    Ok(s)
}
