//! The whole LoRA forward (`MoleLoraForward`) on both paths against the CPU reference: the routing
//! equals `cpu::route` (up to f32 near-ties) and `y` equals `y0 + cpu::lora_delta` on that routing.

#[cfg(feature = "cuda")]
mod gpu {
    use half::bf16;
    use molora::cpu::{self, Activation, Gate, RouterWeights, ThresholdSpec};
    use molora::cuda::{DeviceGate, DeviceRouter, LoraPath, MoleLoraForward};
    use molora::testing::{compare, gpu_or_skip, Rng, Tolerance};
    use molora::{DType, LoraShape, Routing};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]
        #[test]
        fn forward_paths_match_cpu(t in 1usize..300, e in 1usize..=16, r in 1usize..=16,
                                   d_in in 1usize..=300, d_out in 1usize..=300, seed in any::<u64>(),
                                   threshold in any::<bool>()) {
            let Some(dev) = gpu_or_skip("forward_paths_match_cpu") else { return Ok(()) };
            let mut rng = Rng::new(seed);
            let shape = LoraShape::new(e, r, d_in, d_out).unwrap();
            let x: Vec<bf16> = rng.values(t * d_in, 1.0);
            let a: Vec<bf16> = rng.values(shape.a_len(), 0.2);
            let b: Vec<bf16> = rng.values(shape.b_len(), 0.2);
            let w_g: Vec<bf16> = rng.values(e * d_in, 0.3);
            let y0: Vec<bf16> = rng.values(t * d_out, 1.0);
            let gate = if threshold {
                Gate::Threshold(ThresholdSpec::Learned { theta: 0.0 })
            } else {
                Gate::TopK { k: 2.min(e), renormalize: true }
            };
            let dgate = DeviceGate::from_gate(&gate, e).unwrap();
            let (dx, da, db, dwg) = (dev.upload(&x).unwrap(), dev.upload(&a).unwrap(), dev.upload(&b).unwrap(), dev.upload(&w_g).unwrap());
            let router = DeviceRouter { w_g: dwg.slice(..), b_g: None, activation: Activation::Softmax, temperature: 1.0 };
            let cpu_router = RouterWeights { w_g: &w_g, b_g: None, activation: Activation::Softmax, temperature: 1.0 };
            let want_routing = cpu::route(&x, t, d_in, e, &cpu_router, None, &gate).unwrap();
            let probs = cpu::activate(&cpu::router_logits(&x, t, d_in, &w_g, None, e).unwrap(), t, e, Activation::Softmax, 1.0).unwrap();
            for path in [LoraPath::Segmented, LoraPath::DenseGated] {
                if path == LoraPath::DenseGated && e * r > molora::cuda::DENSE_GATED_MAX_COLUMNS {
                    continue;
                }
                let k_max = dgate.k_max(e);
                let mut fwd = MoleLoraForward::new(&dev, t, &shape, k_max, path).unwrap();
                let mut y = dev.upload(&y0).unwrap();
                fwd.run(&dev, &dx, &router, &dgate, &da, &db, 2.0, &mut y).unwrap();
                let ids = dev.download(fwd.ids()).unwrap();
                let w = dev.download(fwd.weights()).unwrap();
                for (i, (&g, &c)) in ids.iter().zip(want_routing.ids()).enumerate() {
                    let row = &probs[(i / k_max) * e..(i / k_max + 1) * e];
                    let p = |id: i32| if id >= 0 { row[id as usize] } else { f32::NAN };
                    prop_assert!(g == c || (p(g) - p(c)).abs() <= 1e-5,
                        "{:?}: slot {}: kernel chose {} (p {}), reference {} (p {})", path, i, g, p(g), c, p(c));
                }
                let routing = Routing::new(t, k_max, e, ids, w).unwrap();
                let experts = cpu::Experts::new(&a, &b, shape, 2.0).unwrap();
                let delta = cpu::lora_delta(&x, t, &experts, &routing).unwrap();
                let want: Vec<f32> = y0.iter().zip(&delta).map(|(y, d)| bf16::from_f32(y.to_f32() + d).to_f32()).collect();
                let got: Vec<f32> = dev.download(&y).unwrap().iter().map(|v| v.to_f32()).collect();
                let tol = Tolerance::for_dtype(DType::BF16).scaled(2.0);
                if let Err(m) = compare(&format!("{path:?}"), &got, &want, tol) {
                    prop_assert!(false, "{}", m);
                }
            }
        }
    }
}
