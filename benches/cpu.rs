//! Criterion benches of the CPU reference, one per operation, named `cpu/<op>/<shape>`, with
//! `Throughput::Bytes` set to the bytes the operation must read and write at least (so criterion
//! prints GB/s). The CPU path is the oracle, not the fast path: these numbers are a baseline and a
//! guard against accidental quadratic work, not a performance target.
//!
//! Run: `cargo bench --bench cpu` (add a filter such as `cpu/top_k` to run one group).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::bf16;
use molora::cpu::{self, Activation, DenseBase, Experts, Gate, ThresholdSpec};
use molora::Rng;
use molora::{AdapterSegments, Element, LoraShape, Segments, SeqRouting};
use std::hint::black_box;

/// Deterministic pseudo-random values in [-1, 1), so every run benches the same data.
fn values(n: usize, seed: u64) -> Vec<f32> {
    Rng::new(seed).values(n, 1.0)
}

fn typed<T: Element>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x)).collect()
}

/// The bench shapes: (tokens, d_in, d_out, experts, rank, k). Small enough for the CPU reference.
const SHAPES: &[(usize, usize, usize, usize, usize, usize)] =
    &[(64, 1024, 1024, 8, 16, 2), (256, 512, 512, 4, 8, 1)];

fn name(t: usize, d_in: usize, d_out: usize, e: usize, r: usize, k: usize) -> String {
    format!("T{t}_d{d_in}x{d_out}_E{e}_r{r}_k{k}")
}

fn bench_gating(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu/gating");
    for &(t, d_in, _, e, _, k) in SHAPES {
        let id = format!("T{t}_d{d_in}_E{e}_k{k}");
        let x: Vec<bf16> = typed(&values(t * d_in, 1));
        let w_g: Vec<bf16> = typed(&values(e * d_in, 2));
        g.throughput(Throughput::Bytes(
            ((t * d_in + e * d_in) * 2 + t * e * 4) as u64,
        ));
        g.bench_function(BenchmarkId::new("router_logits", &id), |b| {
            b.iter(|| cpu::router_logits(black_box(&x), t, d_in, &w_g, None, e).unwrap())
        });
        let logits = cpu::router_logits(&x, t, d_in, &w_g, None, e).unwrap();
        let probs = cpu::activate(&logits, t, e, Activation::Softmax, 1.0).unwrap();
        g.throughput(Throughput::Bytes((t * e * 4 * 2) as u64));
        g.bench_function(BenchmarkId::new("softmax", &id), |b| {
            b.iter(|| cpu::activate(black_box(&logits), t, e, Activation::Softmax, 1.0).unwrap())
        });
        g.throughput(Throughput::Bytes((t * e * 4 + t * k * 8) as u64));
        g.bench_function(BenchmarkId::new("top_k", &id), |b| {
            b.iter(|| cpu::top_k(black_box(&probs), t, e, k, true).unwrap())
        });
        let taus = vec![0.5 / e as f32; t];
        g.throughput(Throughput::Bytes((t * e * 4 + t * e * 8) as u64));
        g.bench_function(BenchmarkId::new("threshold", &id), |b| {
            b.iter(|| cpu::threshold_gate(black_box(&probs), t, e, &taus).unwrap())
        });
        let global = SeqRouting::new(
            Segments::from_lengths(&[t / 2, t - t / 2]).unwrap(),
            e,
            cpu::activate(&values(2 * e, 3), 2, e, Activation::Softmax, 1.0).unwrap(),
        )
        .unwrap();
        g.throughput(Throughput::Bytes((t * e * 8) as u64));
        g.throughput(Throughput::Bytes((t * e * 4 + t * e * 8) as u64));
        g.bench_function(BenchmarkId::new("dense", &id), |b| {
            b.iter(|| cpu::dense(black_box(&probs), t, e).unwrap())
        });
        g.throughput(Throughput::Bytes((t * e * 8) as u64));
        g.bench_function(BenchmarkId::new("hierarchical", &id), |b| {
            b.iter(|| {
                cpu::hierarchical(
                    black_box(&probs),
                    t,
                    e,
                    &global,
                    cpu::HierarchicalCombine::Mix { lambda: 0.5 },
                )
                .unwrap()
            })
        });
    }
    g.finish();
}

fn bench_lora(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu/lora");
    for &(t, d_in, d_out, e, r, k) in SHAPES {
        let id = name(t, d_in, d_out, e, r, k);
        let shape = LoraShape::new(e, r, d_in, d_out).unwrap();
        let x: Vec<bf16> = typed(&values(t * d_in, 4));
        let a: Vec<bf16> = typed(&values(shape.a_len(), 5));
        let bw: Vec<bf16> = typed(&values(shape.b_len(), 6));
        let w_g: Vec<bf16> = typed(&values(e * d_in, 7));
        let router = cpu::RouterWeights {
            w_g: &w_g,
            b_g: None,
            activation: Activation::Softmax,
            temperature: 1.0,
        };
        let gate = Gate::TopK {
            k,
            renormalize: true,
        };
        let routing = cpu::route(&x, t, d_in, e, &router, None, &gate).unwrap();
        let plan = cpu::dispatch(&routing).unwrap();
        let pairs = plan.num_pairs();
        let expert_bytes = (shape.a_len() + shape.b_len()) * 2;

        g.throughput(Throughput::Bytes(
            (t * k * 8 + (e + 1 + 2 * pairs) * 4) as u64,
        ));
        g.bench_function(BenchmarkId::new("dispatch", &id), |b| {
            b.iter(|| cpu::dispatch(black_box(&routing)).unwrap())
        });
        g.throughput(Throughput::Bytes((t * d_in * 2 + pairs * d_in * 2) as u64));
        g.bench_function(BenchmarkId::new("gather_rows", &id), |b| {
            b.iter(|| cpu::gather_rows(black_box(&x), t, d_in, &plan).unwrap())
        });
        let rows = values(pairs * d_out, 13);
        let y_init: Vec<bf16> = typed(&values(t * d_out, 14));
        g.throughput(Throughput::Bytes(
            (pairs * d_out * 4 + 2 * t * d_out * 2) as u64,
        ));
        g.bench_function(BenchmarkId::new("scatter_combine", &id), |b| {
            b.iter(|| {
                let mut y = y_init.clone();
                cpu::scatter_combine(black_box(&rows), d_out, &plan, &routing, 2.0, &mut y)
                    .unwrap();
                y
            })
        });
        g.throughput(Throughput::Bytes(
            (t * d_in * 2 + pairs * r * 4 + expert_bytes / 2) as u64,
        ));
        g.bench_function(BenchmarkId::new("shrink_experts", &id), |b| {
            b.iter(|| cpu::shrink_experts(black_box(&x), &a, &shape, &plan).unwrap())
        });
        let h = cpu::shrink_experts(&x, &a, &shape, &plan).unwrap();
        let y0: Vec<bf16> = typed(&values(t * d_out, 8));
        g.throughput(Throughput::Bytes(
            (pairs * r * 4 + 2 * t * d_out * 2) as u64,
        ));
        g.bench_function(BenchmarkId::new("expand_experts", &id), |b| {
            b.iter(|| {
                let mut y = y0.clone();
                cpu::expand_experts(black_box(&h), &bw, &shape, &plan, &routing, 2.0, &mut y)
                    .unwrap();
                y
            })
        });

        let seqs = Segments::from_lengths(&[t / 4, t / 4, t - t / 2]).unwrap();
        let probs = cpu::activate(&values(3 * e, 9), 3, e, Activation::Softmax, 1.0).unwrap();
        let seq_routing = SeqRouting::new(seqs.clone(), e, probs).unwrap();
        g.throughput(Throughput::Bytes(
            (expert_bytes + 3 * (r * (d_in + d_out)) * 2) as u64,
        ));
        g.bench_function(BenchmarkId::new("mix_experts", &id), |b| {
            b.iter(|| cpu::mix_experts(black_box(&a), &bw, &shape, &seq_routing).unwrap())
        });
        let adapters = AdapterSegments::new(seqs, e, vec![0, (e - 1) as i32, -1]).unwrap();
        g.throughput(Throughput::Bytes(
            (t * d_in * 2 + t * r * 4 + expert_bytes / 2) as u64,
        ));
        g.bench_function(BenchmarkId::new("shrink_segments", &id), |b| {
            b.iter(|| cpu::shrink_segments(black_box(&x), &a, &shape, &adapters).unwrap())
        });

        let hs = cpu::shrink_segments(&x, &a, &shape, &adapters).unwrap();
        g.throughput(Throughput::Bytes(
            (t * r * 4 + 2 * t * d_out * 2 + expert_bytes / 2) as u64,
        ));
        g.bench_function(BenchmarkId::new("expand_segments", &id), |b| {
            b.iter(|| {
                let mut y = y_init.clone();
                cpu::expand_segments(black_box(&hs), &bw, &shape, &adapters, 2.0, &mut y).unwrap();
                y
            })
        });

        let w0: Vec<bf16> = typed(&values(d_out * d_in, 10));
        let base = DenseBase {
            weight: &w0,
            bias: None,
        };
        let experts = Experts::new(&a, &bw, shape, 2.0).unwrap();
        g.throughput(Throughput::Bytes(
            ((t * d_in + t * d_out + d_in * d_out) * 2 + expert_bytes) as u64,
        ));
        g.bench_function(BenchmarkId::new("mole_forward", &id), |b| {
            b.iter(|| {
                cpu::mole_forward(black_box(&x), t, &base.into(), &experts, &routing).unwrap()
            })
        });
        let th = cpu::route(
            &x,
            t,
            d_in,
            e,
            &router,
            None,
            &Gate::Threshold(ThresholdSpec::Learned { theta: 0.0 }),
        )
        .unwrap();
        g.bench_function(BenchmarkId::new("mole_forward_threshold", &id), |b| {
            b.iter(|| cpu::mole_forward(black_box(&x), t, &base.into(), &experts, &th).unwrap())
        });
        g.bench_function(BenchmarkId::new("mole_forward_weight_space", &id), |b| {
            b.iter(|| {
                cpu::mole_forward_weight_space(
                    black_box(&x),
                    t,
                    &base.into(),
                    &experts,
                    &seq_routing,
                )
                .unwrap()
            })
        });
    }
    g.finish();
}

fn bench_quant(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu/quant");
    for &(t, d_in, d_out) in &[(1usize, 1024usize, 1024usize), (16, 1024, 1024)] {
        let id = format!("T{t}_d{d_in}x{d_out}");
        let w: Vec<bf16> = typed(&values(d_out * d_in, 11));
        let x: Vec<bf16> = typed(&values(t * d_in, 12));
        g.throughput(Throughput::Bytes(
            (d_out * d_in * 2 + d_out * d_in / 2) as u64,
        ));
        g.bench_function(BenchmarkId::new("quantize_nf4", &id), |b| {
            b.iter(|| cpu::quantize_nf4(black_box(&w), d_out, d_in).unwrap())
        });
        g.throughput(Throughput::Bytes((d_out * d_in * 3 + d_out * 4) as u64));
        g.bench_function(BenchmarkId::new("quantize_int8", &id), |b| {
            b.iter(|| cpu::quantize_int8(black_box(&w), d_out, d_in).unwrap())
        });
        let nf4 = cpu::quantize_nf4(&w, d_out, d_in).unwrap();
        let int8 = cpu::quantize_int8(&w, d_out, d_in).unwrap();
        g.throughput(Throughput::Bytes((nf4.bytes() + d_out * d_in * 4) as u64));
        g.bench_function(BenchmarkId::new("dequantize_nf4", &id), |b| {
            b.iter(|| black_box(&nf4).dequantize())
        });
        g.throughput(Throughput::Bytes(
            (nf4.bytes() + t * d_in * 2 + t * d_out * 4) as u64,
        ));
        g.bench_function(BenchmarkId::new("nf4_matmul", &id), |b| {
            b.iter(|| cpu::nf4_matmul(black_box(&x), t, &nf4, None).unwrap())
        });
        g.throughput(Throughput::Bytes(
            (int8.bytes() + t * d_in * 2 + t * d_out * 4) as u64,
        ));
        g.bench_function(BenchmarkId::new("int8_matmul", &id), |b| {
            b.iter(|| cpu::int8_matmul(black_box(&x), t, &int8, None).unwrap())
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(std::time::Duration::from_millis(300))
        .measurement_time(std::time::Duration::from_secs(1));
    targets = bench_gating, bench_lora, bench_quant
}
criterion_main!(benches);
