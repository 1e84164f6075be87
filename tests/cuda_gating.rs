//! The fused top-k gating kernel against the CPU reference (`cpu::activate` + `cpu::top_k`).
//!
//! Every CUDA test runs on the device `molora::testing::test_device` picks: a GPU, else the emulated
//! device (feature `emu`); with neither it prints a skip line (and fails instead when
//! `MOLORA_REQUIRE_GPU=1`). Built without the `cuda` feature, the devices cannot be opened and say so.

use molora::testing::test_device;

#[cfg(not(feature = "cuda"))]
#[test]
fn device_reports_that_cuda_is_not_compiled() {
    assert!(!molora::cuda::device_available());
    match molora::cuda::Device::new(0) {
        Err(molora::Error::CudaNotCompiled { op }) => assert_eq!(op, "Device::new"),
        other => panic!("expected CudaNotCompiled, got {other:?}"),
    }
    match molora::cuda::Device::emulated() {
        Err(molora::Error::EmuNotCompiled { op }) => assert_eq!(op, "Device::emulated"),
        other => panic!("expected EmuNotCompiled, got {other:?}"),
    }
    // The shared device chooser skips (or, under MOLORA_REQUIRE_GPU=1 or MOLORA_DEVICE=emu, fails)
    // on such a build.
    let forced = std::env::var("MOLORA_REQUIRE_GPU").as_deref() == Ok("1")
        || std::env::var("MOLORA_DEVICE").as_deref() == Ok("emu");
    if !forced {
        assert!(test_device("device_reports_that_cuda_is_not_compiled").is_none());
    }
}

/// Built with the kernels but without the emulator, the emulated device says which feature it needs.
#[cfg(all(feature = "cuda", not(feature = "emu")))]
#[test]
fn emulated_device_reports_that_emu_is_not_compiled() {
    match molora::cuda::Device::emulated() {
        Err(err @ molora::Error::EmuNotCompiled { .. }) => {
            assert!(err.to_string().contains("--features emu"), "{err}")
        }
        other => panic!("expected EmuNotCompiled, got {other:?}"),
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::test_device;
    use molora::cpu::{self, Activation};
    use molora::cuda::{top_k_gating, Buffer, BufferViewMut, Device, MAX_GATING_EXPERTS};
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

    /// Runs the kernel and the reference: ids must agree slot by slot (up to the near-tie rule of
    /// [`compare_ids`]), the routing must satisfy the top-k invariants, weights agree within the
    /// f32 tolerance, and nothing past the `[T, k]` outputs is written.
    fn check(dev: &Device, c: &Case) -> Result<(), String> {
        let s = |e: Error| e.to_string();
        let probs = cpu::activate(&c.z, c.t, c.e, c.act, c.temperature).map_err(s)?;
        let want = cpu::top_k(&probs, c.t, c.e, c.k, c.renormalize).map_err(s)?;
        // Every buffer exactly its size (empty when T = 0), so any access past one is outside its
        // allocation (caught by the emulator and compute-sanitizer). Outputs start as sentinels, so
        // an unwritten slot shows.
        let n = c.t * c.k;
        let logits = dev.upload(&c.z).map_err(s)?;
        let mut ids = dev.upload(&vec![-7i32; n]).map_err(s)?;
        let mut w = dev.upload(&vec![f32::NAN; n]).map_err(s)?;
        let run = |ids: &mut BufferViewMut<'_, i32>, w: &mut BufferViewMut<'_, f32>| {
            top_k_gating(
                dev,
                &logits,
                c.t,
                c.e,
                c.act,
                c.temperature,
                c.k,
                c.renormalize,
                ids,
                w,
            )
            .map_err(s)
        };
        run(&mut ids.view_mut(), &mut w.view_mut())?;
        let got_ids = dev.download(&ids).map_err(s)?;
        let got_w = dev.download(&w).map_err(s)?;
        // The one deliberate exception: the same call into views of the first n elements of
        // buffers one sentinel longer, so that a write past the outputs also shows on a GPU run
        // without compute-sanitizer (on the emulator the exact buffers above already catch it).
        let mut ids_tail = dev.upload(&vec![-7i32; n + 1]).map_err(s)?;
        let mut w_tail = dev.upload(&vec![f32::NAN; n + 1]).map_err(s)?;
        run(
            &mut ids_tail.slice_mut(0..n).map_err(s)?,
            &mut w_tail.slice_mut(0..n).map_err(s)?,
        )?;
        let (tail_ids, tail_w) = (
            dev.download(&ids_tail).map_err(s)?,
            dev.download(&w_tail).map_err(s)?,
        );
        if tail_ids[n] != -7 || !tail_w[n].is_nan() {
            return Err(format!(
                "written past the [T, k] outputs: id {}, weight {}",
                tail_ids[n], tail_w[n]
            ));
        }
        let what = format!(
            "top-k ids (T = {}, E = {}, k = {}, {:?}, temperature {}, renormalize {})",
            c.t, c.e, c.k, c.act, c.temperature, c.renormalize
        );
        compare_ids(&what, &got_ids, want.ids(), &probs, Some(&c.z), c.e, c.k)?;
        check_top_k_invariants(&got_ids, &got_w, c)?;
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
        #![proptest_config(ProptestConfig::with_cases(molora::testing::cases(48)))]
        #[test]
        fn top_k_gating_matches_cpu(c in case_strategy()) {
            let Some(dev) = test_device("top_k_gating_matches_cpu") else { return Ok(()) };
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
        let dl = dev.upload(&c.z).map_err(s)?;
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
                let mut ids = dev.zeros::<i32>(n).map_err(s)?;
                let mut w = dev.zeros::<f32>(n).map_err(s)?;
                gating(
                    dev,
                    &dl,
                    c.t,
                    c.e,
                    c.act,
                    c.temperature,
                    combine.map(|cb| (&dglobal, cb)),
                    &dgate,
                    &mut ids,
                    &mut w,
                )
                .map_err(s)?;
                let got_ids = dev.download(&ids).map_err(s)?;
                let got_w = dev.download(&w).map_err(s)?;
                let what = format!("{gate:?} with {combine:?}");
                compare_ids(
                    &what,
                    &got_ids,
                    want.ids(),
                    &probs,
                    combine.is_none().then_some(c.z.as_slice()),
                    c.e,
                    want.k_max(),
                )?;
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
        let x: Vec<half::bf16> = logits(c.t * d_in, seed ^ 11, 0, 1.0)
            .iter()
            .map(|&v| half::bf16::from_f32(v))
            .collect();
        let wg: Vec<half::bf16> = logits(c.e * d_in, seed ^ 13, 0, 0.5)
            .iter()
            .map(|&v| half::bf16::from_f32(v))
            .collect();
        let w_tau = logits(d_in, seed ^ 17, 0, 0.5);
        let want_logits = cpu::router_logits(&x, c.t, d_in, &wg, None, c.e).map_err(s)?;
        let spec = cpu::ThresholdSpec::InputDependent {
            w: w_tau.clone(),
            b: 0.25,
        };
        let want_taus = cpu::threshold_values(&spec, Some(&x), c.t, d_in, c.e).map_err(s)?;
        // T = 0 too: x, the logits and the taus are then empty buffers.
        let dx = dev.upload(&x).map_err(s)?;
        let dwg = dev.upload(&wg).map_err(s)?;
        let dwt = dev.upload(&w_tau).map_err(s)?;
        let mut dlog = dev.zeros::<f32>(c.t * c.e).map_err(s)?;
        let mut dtaus = dev.zeros::<f32>(c.t).map_err(s)?;
        router_logits(
            dev,
            &dx,
            c.t,
            d_in,
            &dwg,
            None,
            c.e,
            &mut dlog,
            Some((&dwt, 0.25, &mut dtaus)),
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
        Ok(())
    }

    /// Ids equal slot by slot. The one allowed difference: two experts whose reference
    /// probabilities differ by a few f32 ulps (the device's `expf` may round differently from the
    /// host's), in either order. Experts with bitwise-equal logits (when `logits` is given) have
    /// bitwise-equal probabilities on both sides, so there the lower id must win exactly.
    fn compare_ids(
        what: &str,
        got: &[i32],
        want: &[i32],
        probs: &[f32],
        logits: Option<&[f32]>,
        e: usize,
        k_max: usize,
    ) -> Result<(), String> {
        if got.len() != want.len() {
            return Err(format!(
                "{what}: {} ids, reference {}",
                got.len(),
                want.len()
            ));
        }
        for (i, (&g, &r)) in got.iter().zip(want).enumerate() {
            if g == r {
                continue;
            }
            let t = i / k_max;
            let row = &probs[t * e..(t + 1) * e];
            let p = |id: i32| usize::try_from(id).ok().and_then(|j| row.get(j).copied());
            let z = |id: i32| {
                let row = &logits?[t * e..(t + 1) * e];
                usize::try_from(id).ok().and_then(|j| row.get(j).copied())
            };
            let exact_tie = logits.is_some() && z(g).is_some() && z(g) == z(r);
            let ok = match (p(g), p(r)) {
                (Some(a), Some(b)) => !exact_tie && near_tie(a, b),
                _ => false,
            };
            if !ok {
                return Err(format!(
                    "{what}: token {t} slot {}: kernel chose {g} (p = {:?}, z = {:?}), reference \
                     {r} (p = {:?}, z = {:?})",
                    i % k_max,
                    p(g),
                    z(g),
                    p(r),
                    z(r)
                ));
            }
        }
        Ok(())
    }

    /// Within 16 f32 ulps of each other (relative), or both below the normal range.
    fn near_tie(a: f32, b: f32) -> bool {
        (a - b).abs() <= 16.0 * f32::EPSILON * a.abs().max(b.abs()) + f32::MIN_POSITIVE
    }

    /// What a top-k routing must satisfy on its own: every slot filled with an id in `[0, E)`, no id
    /// twice in a token, weights in `[0, 1]` and non-increasing along the slots, summing to 1 per
    /// token when renormalised.
    fn check_top_k_invariants(ids: &[i32], w: &[f32], c: &Case) -> Result<(), String> {
        let tol = Tolerance::for_dtype(DType::F32);
        for t in 0..c.t {
            let ids_t = &ids[t * c.k..(t + 1) * c.k];
            let w_t = &w[t * c.k..(t + 1) * c.k];
            let mut seen = vec![false; c.e];
            for (s, &id) in ids_t.iter().enumerate() {
                let Some(flag) = usize::try_from(id).ok().and_then(|j| seen.get_mut(j)) else {
                    return Err(format!("token {t} slot {s}: id {id} outside [0, {})", c.e));
                };
                if std::mem::replace(flag, true) {
                    return Err(format!("token {t}: expert {id} appears twice in {ids_t:?}"));
                }
            }
            if w_t.iter().any(|&x| !(0.0..=1.0).contains(&x)) {
                return Err(format!("token {t}: a weight outside [0, 1] in {w_t:?}"));
            }
            // Non-increasing up to a near-tie swap (see compare_ids).
            if w_t.windows(2).any(|p| p[1] > p[0] && !near_tie(p[0], p[1])) {
                return Err(format!("token {t}: weights not descending: {w_t:?}"));
            }
            if c.renormalize {
                let sum: f64 = w_t.iter().map(|&x| f64::from(x)).sum();
                if !tol.accepts(sum as f32, 1.0) {
                    return Err(format!("token {t}: renormalised weights sum to {sum}"));
                }
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(molora::testing::cases(24)))]
        #[test]
        fn general_gating_matches_cpu(c in case_strategy(), seed in any::<u64>()) {
            let Some(dev) = test_device("general_gating_matches_cpu") else { return Ok(()) };
            if let Err(msg) = check_general(&dev, &c, seed) {
                prop_assert!(false, "{}", msg);
            }
        }
    }

    #[test]
    fn top_k_gating_edges() {
        let Some(dev) = test_device("top_k_gating_edges") else {
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

    /// Buffers for the bad-input tests: logits `[4, 6]`, ids and weights `[4, 2]` pre-filled with
    /// sentinels, so a test can show that a refused call enqueued nothing.
    struct Bad {
        dev: Device,
        z: Buffer<f32>,
        ids: Buffer<i32>,
        w: Buffer<f32>,
    }

    const BT: usize = 4;
    const BE: usize = 6;
    const BK: usize = 2;

    impl Bad {
        fn new(test: &str) -> Option<Bad> {
            let dev = test_device(test)?;
            let z = dev.upload(&logits(BT * BE, 5, 0, 3.0)).unwrap();
            let ids = dev.upload(&[77i32; BT * BK]).unwrap();
            let w = dev.upload(&[-5.0f32; BT * BK]).unwrap();
            Some(Bad { dev, z, ids, w })
        }

        fn run(&mut self, t: usize, e: usize, k: usize, temperature: f32) -> molora::Result<()> {
            top_k_gating(
                &self.dev,
                &self.z,
                t,
                e,
                Activation::Softmax,
                temperature,
                k,
                true,
                &mut self.ids,
                &mut self.w,
            )
        }

        /// The outputs still hold the sentinels.
        fn untouched(&self) {
            assert_eq!(self.dev.download(&self.ids).unwrap(), vec![77; BT * BK]);
            assert_eq!(self.dev.download(&self.w).unwrap(), vec![-5.0; BT * BK]);
        }
    }

    #[test]
    fn top_k_gating_rejects_k_zero() {
        let Some(mut b) = Bad::new("top_k_gating_rejects_k_zero") else {
            return;
        };
        assert_eq!(
            b.run(BT, BE, 0, 1.0),
            Err(Error::InvalidK {
                k: 0,
                num_experts: BE
            })
        );
        b.untouched();
    }

    #[test]
    fn top_k_gating_rejects_k_above_experts() {
        let Some(mut b) = Bad::new("top_k_gating_rejects_k_above_experts") else {
            return;
        };
        assert_eq!(
            b.run(BT, BE, BE + 1, 1.0),
            Err(Error::InvalidK {
                k: BE + 1,
                num_experts: BE
            })
        );
        b.untouched();
    }

    #[test]
    fn top_k_gating_rejects_bad_temperature() {
        let Some(mut b) = Bad::new("top_k_gating_rejects_bad_temperature") else {
            return;
        };
        for temp in [0.0, -0.0, -1.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            match b.run(BT, BE, BK, temp) {
                Err(Error::InvalidParameter {
                    what: "temperature",
                    value,
                    ..
                }) => assert!(value.to_bits() == temp.to_bits(), "{value} vs {temp}"),
                other => panic!("temperature {temp}: expected InvalidParameter, got {other:?}"),
            }
        }
        b.untouched();
    }

    #[test]
    fn top_k_gating_rejects_wrong_logits_length() {
        let Some(mut b) = Bad::new("top_k_gating_rejects_wrong_logits_length") else {
            return;
        };
        // E = 5 against logits [4, 6]; ids and weights [4, 2] fit.
        assert_eq!(
            b.run(BT, BE - 1, BK, 1.0),
            Err(Error::LengthMismatch {
                what: "logits [T, E]",
                expected: BT * (BE - 1),
                got: BT * BE
            })
        );
        b.untouched();
    }

    #[test]
    fn top_k_gating_rejects_wrong_ids_length() {
        let Some(mut b) = Bad::new("top_k_gating_rejects_wrong_ids_length") else {
            return;
        };
        assert_eq!(
            b.run(BT, BE, BK + 1, 1.0),
            Err(Error::LengthMismatch {
                what: "ids [T, k]",
                expected: BT * (BK + 1),
                got: BT * BK
            })
        );
        b.untouched();
    }

    #[test]
    fn top_k_gating_rejects_wrong_weights_length() {
        let Some(mut b) = Bad::new("top_k_gating_rejects_wrong_weights_length") else {
            return;
        };
        let Bad { dev, z, ids, w } = &mut b;
        let mut short = w.slice_mut(0..BT * BK - 1).unwrap();
        let r = top_k_gating(
            dev,
            z,
            BT,
            BE,
            Activation::Sigmoid,
            1.0,
            BK,
            false,
            ids,
            &mut short,
        );
        assert_eq!(
            r,
            Err(Error::LengthMismatch {
                what: "weights [T, k]",
                expected: BT * BK,
                got: BT * BK - 1
            })
        );
        b.untouched();
    }

    #[test]
    fn top_k_gating_rejects_zero_experts() {
        let Some(mut b) = Bad::new("top_k_gating_rejects_zero_experts") else {
            return;
        };
        assert!(matches!(
            b.run(BT, 0, 1, 1.0),
            Err(Error::InvalidDim {
                what: "num_experts",
                value: 0,
                ..
            })
        ));
        b.untouched();
    }

    #[test]
    fn top_k_gating_refuses_more_experts_than_the_kernel_handles() {
        let Some(mut b) = Bad::new("top_k_gating_refuses_more_experts_than_the_kernel_handles")
        else {
            return;
        };
        let big = MAX_GATING_EXPERTS + 1;
        b.z = b.dev.zeros::<f32>(big).unwrap();
        match b.run(1, big, BK, 1.0) {
            Err(Error::Unsupported { op, what }) => {
                assert_eq!(op, "top_k_gating");
                assert!(what.contains(&big.to_string()), "{what}");
                assert!(what.contains(&MAX_GATING_EXPERTS.to_string()), "{what}");
            }
            other => panic!("expected Unsupported, got {other:?}"),
        }
        b.untouched();
    }

    #[test]
    fn top_k_gating_with_no_tokens_is_a_no_op() {
        let Some(mut b) = Bad::new("top_k_gating_with_no_tokens_is_a_no_op") else {
            return;
        };
        // Deliberately zero-length views of the sentinel-filled buffers, so that `untouched` shows
        // the call wrote nothing (empty buffers of their own are covered by the property tests).
        let Bad { dev, z, ids, w } = &mut b;
        let r = top_k_gating(
            dev,
            &z.slice(0..0).unwrap(),
            0,
            BE,
            Activation::Softmax,
            1.0,
            BK,
            true,
            &mut ids.slice_mut(0..0).unwrap(),
            &mut w.slice_mut(0..0).unwrap(),
        );
        assert_eq!(r, Ok(()));
        b.untouched();
    }

    /// The gate over given probabilities (`gate_probabilities`, the candle ops' CUDA path), the
    /// slot/dense conversions and `gate_probabilities_backward`, against `cpu::top_k`,
    /// `cpu::threshold_gate` and `cpu::backward::gate_backward` on the same probabilities.
    fn check_probability_gates(dev: &Device, c: &Case, seed: u64) -> Result<(), String> {
        use molora::cpu::backward::gate_backward;
        use molora::cuda::{
            dense_to_slots, gate_probabilities, gate_probabilities_backward, slots_to_dense,
            DeviceGate,
        };
        let s = |e: molora::Error| e.to_string();
        let (t, e) = (c.t, c.e);
        let probs = cpu::activate(&c.z, t, e, c.act, c.temperature).map_err(s)?;
        // Per-token thresholds around 1/E, so some tokens keep several experts and some fall back.
        let taus: Vec<f32> = logits(t, seed ^ 3, 0, 1.0)
            .iter()
            .map(|v| (0.5 + 0.4 * v) / e as f32)
            .collect();
        let grad = logits(t * e, seed ^ 5, 0, 1.0);
        // Every buffer exactly its size (empty when T = 0).
        let p_view = dev.upload(&probs).map_err(s)?;
        let dtaus = dev.upload(&taus).map_err(s)?;
        let dgrad = dev.upload(&grad).map_err(s)?;
        let gates = [
            (
                DeviceGate::TopK {
                    k: c.k,
                    renormalize: c.renormalize,
                },
                cpu::top_k(&probs, t, e, c.k, c.renormalize).map_err(s)?,
                None,
                c.renormalize,
            ),
            (
                DeviceGate::ThresholdPerToken(dtaus.view()),
                cpu::threshold_gate(&probs, t, e, &taus).map_err(s)?,
                Some(taus.as_slice()),
                true,
            ),
        ];
        for (gate, want, want_taus, renormalize) in gates {
            let k_max = gate.k_max(e);
            let n = t * k_max;
            let mut ids = dev.upload(&vec![-7i32; n]).map_err(s)?;
            let mut w = dev.upload(&vec![f32::NAN; n]).map_err(s)?;
            gate_probabilities(dev, &p_view, t, e, &gate, &mut ids, &mut w).map_err(s)?;
            let what = format!("{gate:?} over probabilities (T = {t}, E = {e})");
            let got_ids = dev.download(&ids).map_err(s)?;
            // The same f32 probabilities on both sides: the ids agree exactly, ties included.
            if got_ids != *want.ids() {
                return Err(format!("{what}: ids {:?} vs CPU {:?}", got_ids, want.ids()));
            }
            let got_w = dev.download(&w).map_err(s)?;
            compare(
                &what,
                &got_w,
                want.weights(),
                Tolerance::for_dtype(DType::F32),
            )?;

            // Slots → dense and back.
            let mut dense = dev.upload(&vec![f32::NAN; t * e]).map_err(s)?;
            slots_to_dense(dev, &ids, &w, t, k_max, e, &mut dense).map_err(s)?;
            let mut want_dense = vec![0.0f32; t * e];
            for tok in 0..t {
                for slot in 0..k_max {
                    let id = want.id(tok, slot);
                    if id >= 0 {
                        want_dense[tok * e + id as usize] += want.weight(tok, slot);
                    }
                }
            }
            let got_dense = dev.download(&dense).map_err(s)?;
            compare(
                "slots_to_dense",
                &got_dense,
                &want_dense,
                Tolerance::for_dtype(DType::F32),
            )?;
            let mut dw = dev.upload(&vec![f32::NAN; n]).map_err(s)?;
            dense_to_slots(dev, &ids, &dgrad, t, k_max, e, &mut dw).map_err(s)?;
            let want_dw: Vec<f32> = (0..n)
                .map(|i| {
                    let id = want.ids()[i];
                    if id >= 0 {
                        grad[(i / k_max) * e + id as usize]
                    } else {
                        0.0
                    }
                })
                .collect();
            let got_dw = dev.download(&dw).map_err(s)?;
            if got_dw != want_dw {
                return Err(format!("dense_to_slots: {got_dw:?} vs {want_dw:?}"));
            }

            // Backward.
            let (want_dp, want_dtau) = gate_backward(
                &probs,
                e,
                want.ids(),
                k_max,
                want_taus,
                renormalize,
                &want_dw,
            )
            .map_err(s)?;
            let mut dp = dev.upload(&vec![f32::NAN; t * e]).map_err(s)?;
            // The op takes dτ [T] (empty when T = 0).
            let mut dtau = dev.zeros::<f32>(t).map_err(s)?;
            let threshold = want_taus.is_some();
            gate_probabilities_backward(
                dev,
                &p_view,
                t,
                e,
                &gate,
                &ids,
                &dw,
                &mut dp,
                threshold.then_some(&mut dtau),
            )
            .map_err(s)?;
            let tol = Tolerance::for_dtype(DType::F32).scaled(4.0);
            compare(
                &format!("{what}: dp"),
                &dev.download(&dp).map_err(s)?,
                &want_dp,
                tol,
            )?;
            if threshold {
                compare(
                    &format!("{what}: dτ"),
                    &dev.download(&dtau).map_err(s)?,
                    &want_dtau,
                    tol,
                )?;
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(molora::testing::cases(32)))]
        #[test]
        fn gates_over_probabilities_match_cpu(c in case_strategy(), seed in any::<u64>()) {
            let Some(dev) = test_device("gates_over_probabilities_match_cpu") else { return Ok(()) };
            if let Err(msg) = check_probability_gates(&dev, &c, seed) {
                prop_assert!(false, "{}", msg);
            }
        }
    }
}
