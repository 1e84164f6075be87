//! Gating and router backward on the GPU against the CPU backward (f32), for top-k (renormalised
//! or not), dense and threshold gates with softmax or sigmoid routers.

#[cfg(feature = "cuda")]
mod gpu {
    use molora::cpu::{self, backward, Activation, Gate, ThresholdSpec};
    use molora::cuda::{gating, gating_backward, router_backward, DeviceGate};
    use molora::testing::{compare, gpu_or_skip, Rng, Tolerance};
    use molora::DType;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn gating_and_router_backward_match_cpu(t in 1usize..200, e in 1usize..=64, kf in 0.0f64..1.0,
                                                d_in in 1usize..=90, seed in any::<u64>(),
                                                sigmoid in any::<bool>(), which in 0usize..4) {
            let Some(dev) = gpu_or_skip("gating_and_router_backward_match_cpu") else { return Ok(()) };
            let s = |err: molora::Error| err.to_string();
            let mut rng = Rng::new(seed);
            let k = 1 + ((e - 1) as f64 * kf) as usize;
            let act = if sigmoid { Activation::Sigmoid } else { Activation::Softmax };
            let temp = 1.3f32;
            let logits: Vec<f32> = rng.values(t * e, 3.0);
            let gate = match which {
                0 => Gate::TopK { k, renormalize: true },
                1 => Gate::TopK { k, renormalize: false },
                2 => Gate::Dense,
                _ => Gate::Threshold(ThresholdSpec::Learned { theta: 0.3 }),
            };
            let dgate = DeviceGate::from_gate(&gate, e).map_err(s).unwrap();
            let k_max = dgate.k_max(e);
            // The forward on the GPU; its routing is the one differentiated on both paths.
            let dl = dev.upload(&logits).unwrap();
            let mut ids = dev.zeros::<i32>(t * k_max).unwrap();
            let mut w = dev.zeros::<f32>(t * k_max).unwrap();
            gating(&dev, &dl, t, e, act, temp, None, &dgate, &mut ids, &mut w).unwrap();
            let ids_h = dev.download(&ids).unwrap();
            let dw: Vec<f32> = rng.values(t * k_max, 1.0);
            let ddw = dev.upload(&dw).unwrap();
            let mut dz = dev.zeros::<f32>(t * e).unwrap();
            let mut dtau = dev.zeros::<f32>(t).unwrap();
            gating_backward(&dev, &dl, t, e, act, temp, &dgate, &ids, &ddw, &mut dz, Some(&mut dtau)).unwrap();

            let p = cpu::activate(&logits, t, e, act, temp).unwrap();
            let (taus, renorm) = match &gate {
                Gate::Threshold(spec) => (Some(cpu::threshold_values::<f32>(spec, None, t, 1, e).unwrap()), true),
                Gate::TopK { renormalize, .. } => (None, *renormalize),
                Gate::Dense => (None, false),
            };
            let (dp, dtau_want) = backward::gate_backward(&p, e, &ids_h, k_max, taus.as_deref(), renorm, &dw).unwrap();
            let dz_want = match act {
                Activation::Softmax => backward::softmax_backward(&p, &dp, e, temp).unwrap(),
                Activation::Sigmoid => backward::sigmoid_backward(&p, &dp, temp).unwrap(),
            };
            let tol = Tolerance::for_dtype(DType::F32).scaled(10.0);
            if let Err(m) = compare("dz", &dev.download(&dz).unwrap(), &dz_want, tol) {
                prop_assert!(false, "{:?}: {}", gate, m);
            }
            if taus.is_some() {
                if let Err(m) = compare("dτ", &dev.download(&dtau).unwrap(), &dtau_want, tol) {
                    prop_assert!(false, "{}", m);
                }
            }

            // Router backward with these dz.
            let x: Vec<f32> = rng.values(t * d_in, 1.0);
            let wg: Vec<f32> = rng.values(e * d_in, 0.5);
            let (dwg_want, db_want, dx_want) = backward::router_backward(&x, &wg, &dz_want, d_in, e).unwrap();
            let (dx_, dwg_) = (dev.upload(&x).unwrap(), dev.upload(&wg).unwrap());
            let ddz = dev.upload(&dz_want).unwrap();
            let mut dwg = dev.zeros::<f32>(e * d_in).unwrap();
            let mut db = dev.zeros::<f32>(e).unwrap();
            let mut dx = dev.zeros::<f32>(t * d_in).unwrap();
            router_backward(&dev, &dx_, t, d_in, &dwg_, e, &ddz, &mut dwg, &mut db, Some(&mut dx)).unwrap();
            let tol = Tolerance::for_dtype(DType::F32).scaled((t.max(e) as f32).sqrt());
            for (what, got, want) in [("dW_g", dev.download(&dwg).unwrap(), dwg_want), ("db", dev.download(&db).unwrap(), db_want), ("dx", dev.download(&dx).unwrap(), dx_want)] {
                if let Err(m) = compare(what, &got, &want, tol) {
                    prop_assert!(false, "{}", m);
                }
            }
        }
    }
}
