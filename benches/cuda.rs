//! Criterion benches of the GPU path, named `cuda/<op>/<shape>`, with `Throughput::Bytes` set to the
//! LoRA part's memory floor bytes `(T·d_in + 2·T·d_out + E·r·(d_in + d_out))·2` (so criterion prints
//! GB/s against the floor), bf16, top-2 of 8 experts, rank 16, 4096→4096:
//!
//! * `cuda/lora/dense_gated_tc`, `cuda/lora/dense_gated_cuda_cores`: the dense-gated LoRA part alone
//!   on a fixed routing, on tensor cores and on CUDA cores;
//! * `cuda/forward/dense_gated`, `cuda/forward/segmented`: the whole LoRA forward with its routing
//!   (`MoleLoraForward::run`: router logits → gating → the path);
//! * `cuda/backward/dense_gated`: `MoleLoraForward::backward` on the dense-gated path.
//!
//! Each iteration enqueues the op and waits for the stream, so a sample includes the launch and the
//! synchronisation (the `molora bench --device cuda` tables time back-to-back launches with CUDA events
//! instead). Without a GPU the bench prints why and exits.
//!
//! Run: `cargo bench --no-default-features --features cuda --bench cuda` (add a filter such as
//! `cuda/forward` to run one group).

use criterion::{Criterion, Throughput};
use half::bf16;
use molora::cpu::Activation;
use molora::cuda::{
    lora_dense_gated_on, Buffer, DenseGatedWorkspace, Device, DeviceGate, DeviceRouter, KernelPath,
    LoraPath, MoleLoraForward,
};
use molora::LoraShape;
use molora::Rng;

const D: usize = 4096;
const E: usize = 8;
const R: usize = 16;
const K: usize = 2;
const TOKENS: [usize; 3] = [1, 256, 4096];

fn floor_bytes(t: usize) -> u64 {
    ((t * D + 2 * t * D + E * R * (D + D)) * 2) as u64
}

struct Inputs {
    shape: LoraShape,
    x: Buffer<bf16>,
    a: Buffer<bf16>,
    b: Buffer<bf16>,
    w_g: Buffer<bf16>,
    y: Buffer<bf16>,
    ids: Buffer<i32>,
    weights: Buffer<f32>,
}

fn inputs(dev: &Device, t: usize) -> molora::Result<Inputs> {
    let shape = LoraShape::new(E, R, D, D)?;
    let mut rng = Rng::new(t as u64);
    let mut ids = Vec::with_capacity(t * K);
    let mut weights = Vec::with_capacity(t * K);
    for _ in 0..t {
        let e0 = rng.below(E);
        ids.extend([e0 as i32, ((e0 + 1 + rng.below(E - 1)) % E) as i32]);
        let p = rng.uniform() as f32;
        weights.extend([p, 1.0 - p]);
    }
    Ok(Inputs {
        shape,
        x: dev.upload(&rng.values::<bf16>(t * D, 1.0))?,
        a: dev.upload(&rng.values::<bf16>(shape.a_len(), 0.02))?,
        b: dev.upload(&rng.values::<bf16>(shape.b_len(), 0.02))?,
        w_g: dev.upload(&rng.values::<bf16>(E * D, 0.02))?,
        y: dev.upload(&rng.values::<bf16>(t * D, 1.0))?,
        ids: dev.upload(&ids)?,
        weights: dev.upload(&weights)?,
    })
}

/// Runs `f` once (so a refusal shows as a message, not a panic inside criterion), then benches it.
fn bench(
    c: &mut Criterion,
    group: &str,
    name: &str,
    t: usize,
    dev: &Device,
    mut f: impl FnMut() -> molora::Result<()>,
) {
    if let Err(e) = f().and_then(|()| dev.synchronize()) {
        eprintln!("{group}/{name}/T{t}: not benched: {e}");
        return;
    }
    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Bytes(floor_bytes(t)));
    g.bench_function(format!("{name}/T{t}_d{D}x{D}_E{E}_r{R}_k{K}"), |bch| {
        bch.iter(|| {
            if let Err(e) = f().and_then(|()| dev.synchronize()) {
                eprintln!("{group}/{name}/T{t}: {e}");
            }
        })
    });
    g.finish();
}

fn run_all(c: &mut Criterion, dev: &Device) -> molora::Result<()> {
    let gate = DeviceGate::TopK {
        k: K,
        renormalize: true,
    };
    for t in TOKENS {
        let mut inp = inputs(dev, t)?;
        let Inputs {
            shape,
            x,
            a,
            b,
            w_g,
            y,
            ids,
            weights,
        } = &mut inp;
        let shape = *shape;
        for (name, path) in [
            ("dense_gated_tc", KernelPath::TensorCore),
            ("dense_gated_cuda_cores", KernelPath::Staged),
        ] {
            let mut ws = DenseGatedWorkspace::new(dev, t, &shape)?;
            bench(c, "cuda/lora", name, t, dev, || {
                lora_dense_gated_on(dev, x, a, b, &shape, ids, weights, K, 2.0, &mut ws, y, path)
            });
        }
        let router = DeviceRouter {
            w_g: w_g.view(),
            b_g: None,
            activation: Activation::Softmax,
            temperature: 1.0,
        };
        for (name, path) in [
            ("dense_gated", LoraPath::DenseGated),
            ("segmented", LoraPath::Segmented),
        ] {
            let mut fwd = MoleLoraForward::new(dev, t, &shape, K, path)?;
            bench(c, "cuda/forward", name, t, dev, || {
                fwd.run(dev, x, &router, &gate, a, b, 2.0, y)
            });
            if path == LoraPath::DenseGated {
                let dy = dev.upload(&Rng::new(9).values::<bf16>(t * D, 1.0))?;
                let mut grads = fwd.new_grads(dev)?;
                fwd.run(dev, x, &router, &gate, a, b, 2.0, y)?;
                bench(c, "cuda/backward", name, t, dev, || {
                    fwd.backward(dev, x, &router, &gate, a, b, &dy, 2.0, &mut grads)
                });
            }
        }
    }
    Ok(())
}

fn main() {
    let dev = match Device::new(0) {
        Ok(dev) => dev,
        Err(e) => {
            eprintln!("benches/cuda.rs: no GPU to bench ({e})");
            return;
        }
    };
    let mut c = Criterion::default().configure_from_args();
    if let Err(e) = run_all(&mut c, &dev) {
        eprintln!("benches/cuda.rs: {e}");
        std::process::exit(1);
    }
    c.final_summary();
}
