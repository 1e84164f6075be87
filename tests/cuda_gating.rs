//! The fused top-k gating kernel against the CPU reference (`cpu::activate` + `cpu::top_k`).
//!
//! On a machine without a GPU every test here prints a skip line (and fails instead when
//! `MOLORA_REQUIRE_GPU=1`); built without the `cuda` feature, the device cannot be opened and says so.

use molora::testing::gpu_or_skip;

#[cfg(not(feature = "cuda"))]
#[test]
fn device_reports_that_cuda_is_not_compiled() {
    assert!(!molora::cuda::device_available());
    match molora::cuda::Device::new(0) {
        Err(molora::Error::CudaNotCompiled { op }) => assert_eq!(op, "Device::new"),
        other => panic!("expected CudaNotCompiled, got {other:?}"),
    }
    // The shared GPU-test helper skips (or, under MOLORA_REQUIRE_GPU=1, fails) on such a build.
    if std::env::var("MOLORA_REQUIRE_GPU").as_deref() != Ok("1") {
        assert!(gpu_or_skip("device_reports_that_cuda_is_not_compiled").is_none());
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::gpu_or_skip;
    use molora::cpu::{self, Activation};
    use molora::cuda::cudarc::driver::CudaSlice;
    use molora::cuda::{top_k_gating, Device, MAX_GATING_EXPERTS};
    use molora::testing::{compare, Tolerance};
    use molora::{DType, Error};
    use proptest::prelude::*;

    /// Logits with deliberate exact ties: values drawn from a small set when `tie_levels > 0`.
    fn logits(n: usize, seed: u64, tie_levels: u32, scale: f32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (s >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
                if tie_levels > 0 {
                    (u * tie_levels as f32).floor() * scale / tie_levels as f32
                } else {
                    (u * 2.0 - 1.0) * scale
                }
            })
            .collect()
    }

    #[derive(Debug)]
    struct Case {
        t: usize,
        e: usize,
        k: usize,
        act: Activation,
        temperature: f32,
        renormalize: bool,
        z: Vec<f32>,
    }

    /// Runs the kernel and the reference; ids must agree exactly except where the two chosen
    /// experts' probabilities tie within f32 rounding (then either order is a valid top-k), and
    /// weights within the f32 tolerance.
    fn check(dev: &Device, c: &Case) -> Result<(), String> {
        let probs =
            cpu::activate(&c.z, c.t, c.e, c.act, c.temperature).map_err(|e| e.to_string())?;
        let want = cpu::top_k(&probs, c.t, c.e, c.k, c.renormalize).map_err(|e| e.to_string())?;
        // The driver cannot allocate zero bytes: pad every buffer by one element and pass views of
        // the exact length.
        let n = c.t * c.k;
        let mut padded = c.z.clone();
        padded.push(0.0);
        let logits = dev.upload(&padded).map_err(|e| e.to_string())?;
        let mut ids = dev.zeros::<i32>(n + 1).map_err(|e| e.to_string())?;
        let mut w = dev.zeros::<f32>(n + 1).map_err(|e| e.to_string())?;
        top_k_gating(
            dev,
            &logits.slice(0..c.z.len()),
            c.t,
            c.e,
            c.act,
            c.temperature,
            c.k,
            c.renormalize,
            &mut ids.slice_mut(0..n),
            &mut w.slice_mut(0..n),
        )
        .map_err(|e| e.to_string())?;
        let mut got_ids = dev.download(&ids).map_err(|e| e.to_string())?;
        let mut got_w = dev.download(&w).map_err(|e| e.to_string())?;
        got_ids.truncate(n);
        got_w.truncate(n);
        for (i, (&g, &r)) in got_ids.iter().zip(want.ids()).enumerate() {
            if g == r {
                continue;
            }
            let t = i / c.k;
            let row = &probs[t * c.e..(t + 1) * c.e];
            let (pg, pr) = (
                row.get(g as usize).copied().unwrap_or(f32::NAN),
                row[r as usize],
            );
            if !(g >= 0 && Tolerance::for_dtype(DType::F32).accepts(pg, pr)) {
                return Err(format!(
                    "token {t} slot {}: kernel chose expert {g} (p = {pg}), reference {r} (p = {pr}); \
                     T = {}, E = {}, k = {}, {:?}, temperature {}",
                    i % c.k,
                    c.t,
                    c.e,
                    c.k,
                    c.act,
                    c.temperature
                ));
            }
        }
        compare(
            "top-k weights",
            &got_w,
            want.weights(),
            Tolerance::for_dtype(DType::F32),
        )
    }

    fn case_strategy() -> impl Strategy<Value = Case> {
        (
            prop_oneof![Just(0usize), Just(1), Just(7), Just(133), 0usize..300],
            prop_oneof![1usize..=8, 1usize..=64, 1usize..=256],
            any::<u64>(),
            prop_oneof![Just(0u32), Just(3), Just(17)],
            prop_oneof![Just(Activation::Softmax), Just(Activation::Sigmoid)],
            prop_oneof![Just(1.0f32), Just(0.5), Just(2.7)],
            any::<bool>(),
            0.0f64..1.0,
        )
            .prop_map(|(t, e, seed, ties, act, temperature, renormalize, kf)| {
                let k = 1 + ((e - 1) as f64 * kf) as usize;
                Case {
                    t,
                    e,
                    k,
                    act,
                    temperature,
                    renormalize,
                    z: logits(t * e, seed, ties, 6.0),
                }
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn top_k_gating_matches_cpu(c in case_strategy()) {
            let Some(dev) = gpu_or_skip("top_k_gating_matches_cpu") else { return Ok(()) };
            if let Err(msg) = check(&dev, &c) {
                prop_assert!(false, "{}", msg);
            }
        }
    }

    /// The general fused gate (threshold, dense, hierarchical) and the router-logits kernel against
    /// the CPU pipeline.
    fn check_general(dev: &Device, c: &Case, seed: u64) -> Result<(), String> {
        use molora::cuda::{gating, router_logits, DeviceGate, DeviceSeqRouting};
        use molora::{Segments, SeqRouting};
        let s = |e: molora::Error| e.to_string();
        // Two sequences (one may be empty) with a global posterior each.
        let split = (seed as usize) % (c.t + 1);
        let segs = Segments::from_lengths(&[split, c.t - split]).map_err(s)?;
        let mut g = logits(2 * c.e, seed ^ 7, 0, 1.0);
        for v in &mut g {
            *v = v.abs();
        }
        let global = SeqRouting::new(segs, c.e, g).map_err(s)?;
        let dglobal = DeviceSeqRouting::new(dev, &global).map_err(s)?;
        let combines = [
            None,
            Some(cpu::HierarchicalCombine::Mix { lambda: 0.3 }),
            Some(cpu::HierarchicalCombine::Product),
        ];
        let gates = [
            cpu::Gate::Dense,
            cpu::Gate::Threshold(cpu::ThresholdSpec::Learned { theta: 0.4 }),
            cpu::Gate::Threshold(cpu::ThresholdSpec::Fixed(2.0)), // above every p: arg-max fallback
            cpu::Gate::TopK {
                k: c.k,
                renormalize: c.renormalize,
            },
        ];
        let mut padded = c.z.clone();
        padded.push(0.0);
        let dl = dev.upload(&padded).map_err(s)?;
        for combine in combines {
            let mut probs = cpu::activate(&c.z, c.t, c.e, c.act, c.temperature).map_err(s)?;
            if let Some(cb) = combine {
                probs = cpu::hierarchical(&probs, c.t, c.e, &global, cb).map_err(s)?;
            }
            for gate in &gates {
                let want = match gate {
                    cpu::Gate::Dense => cpu::dense(&probs, c.t, c.e),
                    cpu::Gate::TopK { k, renormalize } => {
                        cpu::top_k(&probs, c.t, c.e, *k, *renormalize)
                    }
                    cpu::Gate::Threshold(spec) => {
                        let taus =
                            cpu::threshold_values::<f32>(spec, None, c.t, 1, c.e).map_err(s)?;
                        cpu::threshold_gate(&probs, c.t, c.e, &taus)
                    }
                }
                .map_err(s)?;
                let dgate = DeviceGate::from_gate(gate, c.e).map_err(s)?;
                let n = c.t * dgate.k_max(c.e);
                let mut ids = dev.zeros::<i32>(n + 1).map_err(s)?;
                let mut w = dev.zeros::<f32>(n + 1).map_err(s)?;
                gating(
                    dev,
                    &dl.slice(0..c.z.len()),
                    c.t,
                    c.e,
                    c.act,
                    c.temperature,
                    combine.map(|cb| (&dglobal, cb)),
                    &dgate,
                    &mut ids.slice_mut(0..n),
                    &mut w.slice_mut(0..n),
                )
                .map_err(s)?;
                let mut got_ids = dev.download(&ids).map_err(s)?;
                let mut got_w = dev.download(&w).map_err(s)?;
                got_ids.truncate(n);
                got_w.truncate(n);
                let what = format!("{gate:?} with {combine:?}");
                compare_ids(&what, &got_ids, want.ids(), &probs, c.e, want.k_max())?;
                compare(
                    &what,
                    &got_w,
                    want.weights(),
                    Tolerance::for_dtype(DType::F32),
                )?;
            }
        }
        // Router logits (bf16 inputs) and the input-dependent threshold.
        let d_in = 1 + (seed as usize % 97);
        let x: Vec<half::bf16> = logits(c.t * d_in + 1, seed ^ 11, 0, 1.0)
            .iter()
            .map(|&v| half::bf16::from_f32(v))
            .collect();
        let wg: Vec<half::bf16> = logits(c.e * d_in, seed ^ 13, 0, 0.5)
            .iter()
            .map(|&v| half::bf16::from_f32(v))
            .collect();
        let w_tau = logits(d_in, seed ^ 17, 0, 0.5);
        let want_logits =
            cpu::router_logits(&x[..c.t * d_in], c.t, d_in, &wg, None, c.e).map_err(s)?;
        let spec = cpu::ThresholdSpec::InputDependent {
            w: w_tau.clone(),
            b: 0.25,
        };
        let want_taus =
            cpu::threshold_values(&spec, Some(&x[..c.t * d_in]), c.t, d_in, c.e).map_err(s)?;
        if c.t > 0 {
            let dx = dev.upload(&x).map_err(s)?;
            let dwg = dev.upload(&wg).map_err(s)?;
            let dwt = dev.upload(&w_tau).map_err(s)?;
            let mut dlog = dev.zeros::<f32>(c.t * c.e).map_err(s)?;
            let mut dtaus = dev.zeros::<f32>(c.t).map_err(s)?;
            router_logits(
                dev,
                &dx.slice(0..c.t * d_in),
                c.t,
                d_in,
                &dwg,
                None,
                c.e,
                &mut dlog,
                Some((&dwt.slice(0..d_in), 0.25, &mut dtaus)),
            )
            .map_err(s)?;
            let got = dev.download(&dlog).map_err(s)?;
            let tol = Tolerance::for_dtype(DType::F32).scaled((d_in as f32).sqrt());
            compare("router logits", &got, &want_logits, tol)?;
            compare(
                "input-dependent taus",
                &dev.download(&dtaus).map_err(s)?,
                &want_taus,
                tol,
            )?;
        }
        Ok(())
    }

    /// Ids equal, except where the two experts' probabilities tie within f32 rounding (either
    /// order is then a valid answer).
    fn compare_ids(
        what: &str,
        got: &[i32],
        want: &[i32],
        probs: &[f32],
        e: usize,
        k_max: usize,
    ) -> Result<(), String> {
        for (i, (&g, &r)) in got.iter().zip(want).enumerate() {
            if g == r {
                continue;
            }
            let row = &probs[(i / k_max) * e..(i / k_max + 1) * e];
            let p = |id: i32| {
                if id >= 0 {
                    row[id as usize]
                } else {
                    f32::NAN
                }
            };
            if !Tolerance::for_dtype(DType::F32).accepts(p(g), p(r)) {
                return Err(format!(
                    "{what}: token {} slot {}: kernel chose {g} (p = {}), reference {r} (p = {})",
                    i / k_max,
                    i % k_max,
                    p(g),
                    p(r)
                ));
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn general_gating_matches_cpu(c in case_strategy(), seed in any::<u64>()) {
            let Some(dev) = gpu_or_skip("general_gating_matches_cpu") else { return Ok(()) };
            if let Err(msg) = check_general(&dev, &c, seed) {
                prop_assert!(false, "{}", msg);
            }
        }
    }

    #[test]
    fn top_k_gating_edges() {
        let Some(dev) = gpu_or_skip("top_k_gating_edges") else {
            return;
        };
        // All tokens on one expert, all-equal rows (ties everywhere), k = E, E = MAX.
        let mut cases = vec![];
        for (t, e, k) in [
            (5usize, 8usize, 8usize),
            (33, 1, 1),
            (3, MAX_GATING_EXPERTS, 7),
        ] {
            let mut z = vec![0.0f32; t * e];
            for row in z.chunks_mut(e) {
                row[e / 2] = 30.0;
            }
            cases.push(Case {
                t,
                e,
                k,
                act: Activation::Softmax,
                temperature: 1.0,
                renormalize: true,
                z,
            });
            cases.push(Case {
                t,
                e,
                k,
                act: Activation::Sigmoid,
                temperature: 1.0,
                renormalize: false,
                z: vec![0.25; t * e],
            });
        }
        for c in &cases {
            check(&dev, c).unwrap_or_else(|m| panic!("{m}"));
        }
    }

    #[test]
    fn top_k_gating_rejects_bad_input() {
        let Some(dev) = gpu_or_skip("top_k_gating_rejects_bad_input") else {
            return;
        };
        let (t, e) = (4usize, 6usize);
        let z = dev.zeros::<f32>(t * e).unwrap();
        let mut ids = dev.zeros::<i32>(t * 2).unwrap();
        let mut w = dev.zeros::<f32>(t * 2).unwrap();
        let run = |z: &CudaSlice<f32>,
                   t,
                   e,
                   k,
                   temp,
                   ids: &mut CudaSlice<i32>,
                   w: &mut CudaSlice<f32>| {
            top_k_gating(&dev, z, t, e, Activation::Softmax, temp, k, true, ids, w)
        };
        assert_eq!(
            run(&z, t, e, 0, 1.0, &mut ids, &mut w),
            Err(Error::InvalidK {
                k: 0,
                num_experts: e
            })
        );
        assert_eq!(
            run(&z, t, e, 7, 1.0, &mut ids, &mut w),
            Err(Error::InvalidK {
                k: 7,
                num_experts: e
            })
        );
        assert!(matches!(
            run(&z, t, e, 2, 0.0, &mut ids, &mut w),
            Err(Error::InvalidParameter {
                what: "temperature",
                ..
            })
        ));
        assert!(matches!(
            run(&z, t, e, 2, f32::NAN, &mut ids, &mut w),
            Err(Error::InvalidParameter {
                what: "temperature",
                ..
            })
        ));
        assert_eq!(
            run(&z, t + 1, e, 2, 1.0, &mut ids, &mut w),
            Err(Error::LengthMismatch {
                what: "logits [T, E]",
                expected: (t + 1) * e,
                got: t * e
            })
        );
        assert_eq!(
            run(&z, t, e, 3, 1.0, &mut ids, &mut w),
            Err(Error::LengthMismatch {
                what: "ids [T, k]",
                expected: t * 3,
                got: t * 2
            })
        );
        let big = MAX_GATING_EXPERTS + 1;
        let zb = dev.zeros::<f32>(big).unwrap();
        assert!(matches!(
            run(&zb, 1, big, 2, 1.0, &mut ids, &mut w),
            Err(Error::Unsupported {
                op: "top_k_gating",
                ..
            })
        ));
        // T = 0 is a valid no-op.
        // T = 0 is a valid no-op (zero-length views: the driver cannot allocate zero bytes).
        let z0 = z.slice(0..0);
        let mut i0 = ids.slice_mut(0..0);
        let mut w0 = w.slice_mut(0..0);
        assert_eq!(
            top_k_gating(
                &dev,
                &z0,
                0,
                e,
                Activation::Softmax,
                1.0,
                2,
                true,
                &mut i0,
                &mut w0
            ),
            Ok(())
        );
    }
}
