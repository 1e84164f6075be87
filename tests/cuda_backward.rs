//! Gating and router backward on the GPU against the CPU backward (f32), for top-k (renormalised
//! or not), dense and threshold gates with softmax or sigmoid routers, also for routings that
//! repeat an expert within a token (the gate alone too); the same through HDMoLE's
//! hierarchical combination (λ-mix with dλ, product-and-renormalise including rows whose product is
//! zero); and SAML's weight-space mixing backward (dA, dB, dp) for every dtype.

#[cfg(feature = "cuda")]
mod gpu {
    use half::{bf16, f16};
    use molora::cpu::{self, backward, Activation, Gate, HierarchicalCombine, ThresholdSpec};
    use molora::cuda::{
        dispatch, gate_probabilities_backward, gating, gating_backward,
        gating_backward_hierarchical, lora_backward_experts, mix_backward, mix_experts,
        router_backward, shrink_segments, CudaElement, Device, DeviceGate, DeviceLoraGrads,
        DevicePlan, DeviceSegments, DeviceSeqRouting, DlambdaOut,
    };
    use molora::testing::{compare, test_device, Tolerance};
    use molora::Rng;
    use molora::{AdapterSegments, DType, LoraShape, Segments, SeqRouting};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(molora::testing::cases(24)))]
        #[test]
        fn gating_and_router_backward_match_cpu(t in prop_oneof![1 => Just(0usize), 7 => 1usize..200], e in 1usize..=64, kf in 0.0f64..1.0,
                                                d_in in 1usize..=90, seed in any::<u64>(),
                                                sigmoid in any::<bool>(), which in 0usize..4) {
            let Some(dev) = test_device("gating_and_router_backward_match_cpu") else { return Ok(()) };
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

    /// A routing that repeats an expert within a token (callers may pass one to the gating backward):
    /// every slot of an expert adds to its `dp`, in slot order on the CPU, and the device must agree,
    /// with no two lanes updating one expert (racecheck on the emulated device) and the same bits on a
    /// second run. Dense and top-k gates (renormalised or not, `k` below and above a warp) and a
    /// threshold gate; E = 40, so experts 3 and 35 share a lane of the warp and slots go past 32.
    #[test]
    fn gating_backward_with_repeated_ids_matches_cpu() {
        let Some(dev) = test_device("gating_backward_with_repeated_ids_matches_cpu") else {
            return;
        };
        let (t, e) = (6usize, 40usize);
        let temp = 1.3f32;
        let mut rng = Rng::new(0x05EE_D1D5);
        let logits: Vec<f32> = rng.values(t * e, 3.0);
        let p = cpu::activate(&logits, t, e, Activation::Softmax, temp).unwrap();
        let (dl, dprobs) = (dev.upload(&logits).unwrap(), dev.upload(&p).unwrap());
        let tau = 0.01f32;
        let gates = [
            DeviceGate::Dense,
            DeviceGate::TopK {
                k: 5,
                renormalize: false,
            },
            DeviceGate::TopK {
                k: 37,
                renormalize: false,
            },
            DeviceGate::TopK {
                k: 5,
                renormalize: true,
            },
            DeviceGate::TopK {
                k: 37,
                renormalize: true,
            },
            DeviceGate::Threshold(tau),
        ];
        for gate in &gates {
            let k_max = gate.k_max(e);
            let mut ids_h = Vec::with_capacity(t * k_max);
            for tok in 0..t {
                let row: Vec<i32> = (0..k_max)
                    .map(|s| match tok {
                        0 => 3,
                        1 => [3, 35, 3, -1, 35, 7][s % 6],
                        2 => [39, 7][s % 2],
                        _ if s == 0 => rng.below(e) as i32,
                        _ => rng.below(e + 1) as i32 - 1,
                    })
                    .collect();
                ids_h.extend_from_slice(&row);
                // The last slot repeats the first, so every token holds a repeat.
                if let (Some(&first), Some(last)) = (row.first(), ids_h.last_mut()) {
                    *last = first;
                }
            }
            let dw: Vec<f32> = rng.values(t * k_max, 1.0);
            let (ids, ddw) = (dev.upload(&ids_h).unwrap(), dev.upload(&dw).unwrap());

            let (taus, renorm) = match gate {
                DeviceGate::Threshold(tau) => (Some(vec![*tau; t]), true),
                DeviceGate::TopK { renormalize, .. } => (None, *renormalize),
                _ => (None, false),
            };
            let (dp_want, dtau_want) =
                backward::gate_backward(&p, e, &ids_h, k_max, taus.as_deref(), renorm, &dw)
                    .unwrap();
            let dz_want = backward::softmax_backward(&p, &dp_want, e, temp).unwrap();
            let tol = Tolerance::for_dtype(DType::F32).scaled(10.0);

            let mut runs = Vec::new();
            for _ in 0..2 {
                let mut dz = dev.zeros::<f32>(t * e).unwrap();
                let mut dtau = dev.zeros::<f32>(t).unwrap();
                gating_backward(
                    &dev,
                    &dl,
                    t,
                    e,
                    Activation::Softmax,
                    temp,
                    gate,
                    &ids,
                    &ddw,
                    &mut dz,
                    Some(&mut dtau),
                )
                .unwrap_or_else(|err| panic!("{gate:?}: {err}"));
                runs.push((dev.download(&dz).unwrap(), dev.download(&dtau).unwrap()));
            }
            let (dz, dtau) = &runs[0];
            if let Err(m) = compare("dz", dz, &dz_want, tol) {
                panic!("{gate:?}: {m}");
            }
            if taus.is_some() {
                if let Err(m) = compare("dτ", dtau, &dtau_want, tol) {
                    panic!("{gate:?}: {m}");
                }
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
            assert_eq!(
                bits(dz),
                bits(&runs[1].0),
                "{gate:?}: dz differs between runs"
            );
            assert_eq!(
                bits(dtau),
                bits(&runs[1].1),
                "{gate:?}: dτ differs between runs"
            );

            // The same through the gate alone: dp straight from the probabilities.
            let mut dp = dev.zeros::<f32>(t * e).unwrap();
            gate_probabilities_backward(&dev, &dprobs, t, e, gate, &ids, &ddw, &mut dp, None)
                .unwrap_or_else(|err| panic!("{gate:?}: {err}"));
            if let Err(m) = compare("dp", &dev.download(&dp).unwrap(), &dp_want, tol) {
                panic!("{gate:?}: {m}");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(molora::testing::cases(32)))]
        #[test]
        fn hierarchical_gating_backward_matches_cpu(t in prop_oneof![1 => Just(0usize), 7 => 1usize..160], e in 1usize..=40, kf in 0.0f64..1.0,
                                                    nseq in 1usize..=5, seed in any::<u64>(),
                                                    sigmoid in any::<bool>(), which in 0usize..4,
                                                    product in any::<bool>(), lambda in 0.0f32..=1.0,
                                                    zero_seq in any::<bool>()) {
            let Some(dev) = test_device("hierarchical_gating_backward_matches_cpu") else { return Ok(()) };
            let s = |err: molora::Error| err.to_string();
            let mut rng = Rng::new(seed);
            let k = 1 + ((e - 1) as f64 * kf) as usize;
            let act = if sigmoid { Activation::Sigmoid } else { Activation::Softmax };
            let temp = 0.8f32;
            let logits: Vec<f32> = rng.values(t * e, 3.0);
            // Sequence lengths summing to T (some may be empty); the global posterior of each is
            // positive, except that with `zero_seq` the first is all zero (the product falls back to l).
            let mut lens = vec![0usize; nseq];
            for _ in 0..t {
                lens[rng.below(nseq)] += 1;
            }
            let mut g: Vec<f32> = (0..nseq * e).map(|_| 0.05 + rng.uniform() as f32).collect();
            for row in g.chunks_mut(e) {
                let sum: f32 = row.iter().sum();
                row.iter_mut().for_each(|v| *v /= sum);
            }
            if zero_seq {
                g[..e].iter_mut().for_each(|v| *v = 0.0);
            }
            let seqs = SeqRouting::new(Segments::from_lengths(&lens).map_err(s).unwrap(), e, g.clone()).map_err(s).unwrap();
            let combine = if product { HierarchicalCombine::Product } else { HierarchicalCombine::Mix { lambda } };
            let gate = match which {
                0 => Gate::TopK { k, renormalize: true },
                1 => Gate::TopK { k, renormalize: false },
                2 => Gate::Dense,
                _ => Gate::Threshold(ThresholdSpec::Learned { theta: 0.3 }),
            };
            let dgate = DeviceGate::from_gate(&gate, e).map_err(s).unwrap();
            let k_max = dgate.k_max(e);
            let dseq = DeviceSeqRouting::new(&dev, &seqs).unwrap();
            let dl = dev.upload(&logits).unwrap();
            let mut ids = dev.zeros::<i32>(t * k_max).unwrap();
            let mut w = dev.zeros::<f32>(t * k_max).unwrap();
            gating(&dev, &dl, t, e, act, temp, Some((&dseq, combine)), &dgate, &mut ids, &mut w).unwrap();
            let ids_h = dev.download(&ids).unwrap();
            let dw: Vec<f32> = rng.values(t * k_max, 1.0);
            let ddw = dev.upload(&dw).unwrap();
            let mut dz = dev.zeros::<f32>(t * e).unwrap();
            let mut dtau = dev.zeros::<f32>(t).unwrap();
            let mut dlam_tok = dev.zeros::<f32>(t).unwrap();
            let mut dlam = dev.upload(&[f32::NAN]).unwrap();
            gating_backward_hierarchical(&dev, &dl, t, e, act, temp, (&dseq, combine), &dgate, &ids, &ddw,
                &mut dz, Some(&mut dtau), Some(DlambdaOut { per_token: &mut dlam_tok, total: &mut dlam })).unwrap();

            // The CPU chain: activation → combination → gate, and back.
            let l = cpu::activate(&logits, t, e, act, temp).unwrap();
            let p = cpu::hierarchical(&l, t, e, &seqs, combine).unwrap();
            let (taus, renorm) = match &gate {
                Gate::Threshold(spec) => (Some(cpu::threshold_values::<f32>(spec, None, t, 1, e).unwrap()), true),
                Gate::TopK { renormalize, .. } => (None, *renormalize),
                Gate::Dense => (None, false),
            };
            let (dp, dtau_want) = backward::gate_backward(&p, e, &ids_h, k_max, taus.as_deref(), renorm, &dw).unwrap();
            let g_tok: Vec<f32> = (0..nseq).flat_map(|q| std::iter::repeat_n(seqs.probs_of(q).to_vec(), lens[q])).flatten().collect();
            let (dl_want, dlam_tok_want) = match combine {
                HierarchicalCombine::Mix { lambda } => {
                    let dl = backward::mix_combine_backward(&g_tok, &l, lambda, &dp).unwrap().0;
                    // dλ of each token on its own (the CPU returns the sum over the rows it is given).
                    let per_tok: Vec<f32> = (0..t)
                        .map(|i| {
                            let r = i * e..(i + 1) * e;
                            backward::mix_combine_backward(&g_tok[r.clone()], &l[r.clone()], lambda, &dp[r]).unwrap().1
                        })
                        .collect();
                    (dl, per_tok)
                }
                HierarchicalCombine::Product => (backward::product_combine_backward(&g_tok, &l, e, &dp).unwrap(), vec![0.0; t]),
            };
            let dz_want = match act {
                Activation::Softmax => backward::softmax_backward(&l, &dl_want, e, temp).unwrap(),
                Activation::Sigmoid => backward::sigmoid_backward(&l, &dl_want, temp).unwrap(),
            };
            let tol = Tolerance::for_dtype(DType::F32).scaled(10.0);
            if let Err(m) = compare("dz", &dev.download(&dz).unwrap(), &dz_want, tol) {
                prop_assert!(false, "{:?} {:?}: {}", gate, combine, m);
            }
            if taus.is_some() {
                if let Err(m) = compare("dτ", &dev.download(&dtau).unwrap(), &dtau_want, tol) {
                    prop_assert!(false, "{:?}: {}", combine, m);
                }
            }
            let got_tok = dev.download(&dlam_tok).unwrap();
            if let Err(m) = compare("dλ per token", &got_tok, &dlam_tok_want, tol) {
                prop_assert!(false, "{:?} {:?}: {}", gate, combine, m);
            }
            // The total is the ordered sum of the per-token values (formed in f64 on the device).
            let sum = got_tok.iter().map(|&v| f64::from(v)).sum::<f64>() as f32;
            if let Err(m) = compare("dλ", &dev.download(&dlam).unwrap(), &[sum], Tolerance::for_dtype(DType::F32)) {
                prop_assert!(false, "{:?} {:?}: {}", gate, combine, m);
            }
        }
    }

    /// SAML mixing backward of one random case in element type `T` against the CPU, per sequence.
    fn check_mix_backward<T: CudaElement>(
        dev: &Device,
        shape: &LoraShape,
        nseq: usize,
        seed: u64,
    ) -> Result<(), String> {
        let s = |err: molora::Error| err.to_string();
        let mut rng = Rng::new(seed);
        let (e, per_a, per_b) = (
            shape.num_experts,
            shape.rank * shape.d_in,
            shape.d_out * shape.rank,
        );
        let a: Vec<T> = rng.values(shape.a_len(), 1.0);
        let b: Vec<T> = rng.values(shape.b_len(), 1.0);
        let p: Vec<f32> = rng.values(nseq * e, 1.0);
        let dam: Vec<f32> = rng.values(nseq * per_a, 1.0);
        let dbm: Vec<f32> = rng.values(nseq * per_b, 1.0);
        let a32: Vec<f32> = a.iter().map(|v| v.to_f32()).collect();
        let b32: Vec<f32> = b.iter().map(|v| v.to_f32()).collect();
        let mut da_want = vec![0.0f32; shape.a_len()];
        let mut db_want = vec![0.0f32; shape.b_len()];
        let mut dp_want = Vec::with_capacity(nseq * e);
        for q in 0..nseq {
            let (da, db, dp) = backward::mix_backward(
                &a32,
                &b32,
                shape,
                &p[q * e..(q + 1) * e],
                &dam[q * per_a..(q + 1) * per_a],
                &dbm[q * per_b..(q + 1) * per_b],
            )
            .map_err(s)?;
            da_want.iter_mut().zip(&da).for_each(|(acc, v)| *acc += v);
            db_want.iter_mut().zip(&db).for_each(|(acc, v)| *acc += v);
            dp_want.extend(dp);
        }
        // Every buffer exactly its size (p, dAm, dBm and dp are empty when S = 0).
        let (da_, db_) = (dev.upload(&a).map_err(s)?, dev.upload(&b).map_err(s)?);
        let (p_, dam_, dbm_) = (
            dev.upload(&p).map_err(s)?,
            dev.upload(&dam).map_err(s)?,
            dev.upload(&dbm).map_err(s)?,
        );
        // Outputs start as NaN: every element must be written.
        let mut da = dev.upload(&vec![f32::NAN; shape.a_len()]).map_err(s)?;
        let mut db = dev.upload(&vec![f32::NAN; shape.b_len()]).map_err(s)?;
        let mut dp = dev.upload(&vec![f32::NAN; nseq * e]).map_err(s)?;
        mix_backward(
            dev, &da_, &db_, shape, &p_, nseq, &dam_, &dbm_, &mut da, &mut db, &mut dp,
        )
        .map_err(s)?;
        let tol = Tolerance::for_dtype(DType::F32);
        compare(
            "dA",
            &dev.download(&da).map_err(s)?,
            &da_want,
            tol.scaled((nseq.max(1) as f32).sqrt()),
        )?;
        compare(
            "dB",
            &dev.download(&db).map_err(s)?,
            &db_want,
            tol.scaled((nseq.max(1) as f32).sqrt()),
        )?;
        let got_dp = dev.download(&dp).map_err(s)?;
        compare(
            "dp",
            &got_dp,
            &dp_want,
            tol.scaled(((per_a + per_b) as f32).sqrt()),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(molora::testing::cases(32)))]
        #[test]
        fn mix_backward_matches_cpu(e in 1usize..=10, r in 1usize..=8, d_in in 1usize..=300, d_out in 1usize..=300,
                                    nseq in 0usize..=5, seed in any::<u64>(), dtype in 0usize..3) {
            let Some(dev) = test_device("mix_backward_matches_cpu") else { return Ok(()) };
            let shape = LoraShape::new(e, r, d_in, d_out).unwrap();
            let res = match dtype {
                0 => check_mix_backward::<f32>(&dev, &shape, nseq, seed),
                1 => check_mix_backward::<f16>(&dev, &shape, nseq, seed),
                _ => check_mix_backward::<bf16>(&dev, &shape, nseq, seed),
            };
            if let Err(m) = res {
                prop_assert!(false, "{:?}, S = {}: {}", shape, nseq, m);
            }
        }
    }

    #[test]
    fn hierarchical_backward_rejects_bad_input() {
        let Some(dev) = test_device("hierarchical_backward_rejects_bad_input") else {
            return;
        };
        let (t, e) = (4usize, 3usize);
        let seqs = SeqRouting::new(
            Segments::from_lengths(&[2, 1]).unwrap(),
            e,
            vec![0.3; 2 * e],
        )
        .unwrap();
        let dseq = DeviceSeqRouting::new(&dev, &seqs).unwrap();
        let logits = dev.zeros::<f32>(t * e).unwrap();
        let ids = dev.zeros::<i32>(t * e).unwrap();
        let dw = dev.zeros::<f32>(t * e).unwrap();
        let mut dz = dev.zeros::<f32>(t * e).unwrap();
        // The segments cover 3 rows, not 4.
        let err = gating_backward_hierarchical(
            &dev,
            &logits,
            t,
            e,
            Activation::Softmax,
            1.0,
            (&dseq, HierarchicalCombine::Product),
            &DeviceGate::Dense,
            &ids,
            &dw,
            &mut dz,
            None,
            None,
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                molora::Error::LengthMismatch {
                    what: "global posterior segment rows",
                    expected: 4,
                    got: 3
                }
            ),
            "{err}"
        );
        let seqs = SeqRouting::new(
            Segments::from_lengths(&[2, 2]).unwrap(),
            e,
            vec![0.3; 2 * e],
        )
        .unwrap();
        let dseq = DeviceSeqRouting::new(&dev, &seqs).unwrap();
        let err = gating_backward_hierarchical(
            &dev,
            &logits,
            t,
            e,
            Activation::Softmax,
            1.0,
            (&dseq, HierarchicalCombine::Mix { lambda: 1.5 }),
            &DeviceGate::Dense,
            &ids,
            &dw,
            &mut dz,
            None,
            None,
        )
        .unwrap_err();
        assert!(
            matches!(err, molora::Error::InvalidParameter { .. }),
            "{err}"
        );
        let mut tok = dev.zeros::<f32>(t - 1).unwrap();
        let mut total = dev.zeros::<f32>(1).unwrap();
        let err = gating_backward_hierarchical(
            &dev,
            &logits,
            t,
            e,
            Activation::Softmax,
            1.0,
            (&dseq, HierarchicalCombine::Mix { lambda: 0.5 }),
            &DeviceGate::Dense,
            &ids,
            &dw,
            &mut dz,
            None,
            Some(DlambdaOut {
                per_token: &mut tok,
                total: &mut total,
            }),
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                molora::Error::LengthMismatch {
                    expected: 4,
                    got: 3,
                    ..
                }
            ),
            "{err}"
        );
        // Mixing backward: dp of the wrong length.
        let shape = LoraShape::new(2, 1, 3, 3).unwrap();
        let a = dev.zeros::<f32>(shape.a_len()).unwrap();
        let b = dev.zeros::<f32>(shape.b_len()).unwrap();
        let p = dev.zeros::<f32>(2).unwrap();
        let dam = dev.zeros::<f32>(3).unwrap();
        let dbm = dev.zeros::<f32>(3).unwrap();
        let mut da = dev.zeros::<f32>(shape.a_len()).unwrap();
        let mut db = dev.zeros::<f32>(shape.b_len()).unwrap();
        let mut dp = dev.zeros::<f32>(3).unwrap();
        let err = mix_backward(
            &dev, &a, &b, &shape, &p, 1, &dam, &dbm, &mut da, &mut db, &mut dp,
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                molora::Error::LengthMismatch {
                    what: "dp [S, E]",
                    expected: 2,
                    got: 3
                }
            ),
            "{err}"
        );
    }

    /// The whole SAML backward on the GPU, as the bench runs it: mix the experts per sequence, SGMV
    /// shrink, the grouped LoRA backward of the mixed adapters on a plan with one slot per token
    /// holding its sequence (whose sorted order is the token order, so the SGMV `h` is already
    /// sorted), then the mixing backward; against the CPU chain (mix, LoRA backward, mixing backward
    /// per sequence).
    fn check_saml_chain<T: CudaElement>(
        dev: &Device,
        shape: &LoraShape,
        lens: &[usize],
        seed: u64,
    ) -> Result<(), String> {
        let s = |err: molora::Error| err.to_string();
        let mut rng = Rng::new(seed);
        let (e, r, d_in, d_out) = (shape.num_experts, shape.rank, shape.d_in, shape.d_out);
        let t: usize = lens.iter().sum();
        let nseq = lens.len();
        let mixed = LoraShape::new(nseq, r, d_in, d_out).map_err(s)?;
        let x: Vec<T> = rng.values(t * d_in, 1.0);
        let a: Vec<T> = rng.values(shape.a_len(), 0.5);
        let b: Vec<T> = rng.values(shape.b_len(), 0.5);
        let dy: Vec<T> = rng.values(t * d_out, 1.0);
        let p: Vec<f32> = (0..nseq * e).map(|_| rng.uniform() as f32).collect();
        let segs = Segments::from_lengths(lens).map_err(s)?;
        let seq = SeqRouting::new(segs.clone(), e, p.clone()).map_err(s)?;
        let ids: Vec<i32> = lens
            .iter()
            .enumerate()
            .flat_map(|(q, &n)| std::iter::repeat_n(q as i32, n))
            .collect();
        let ones = vec![1.0f32; t];

        // CPU chain.
        let (am, bm) = molora::cpu::mix_experts(&a, &b, shape, &seq).map_err(s)?;
        let f = |v: &[T]| v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
        let g = backward::lora_backward(
            &f(&x),
            &f(&am),
            &f(&bm),
            &mixed,
            &ids,
            &ones,
            1,
            0.75f32,
            &f(&dy),
        )
        .map_err(s)?;
        let (per_a, per_b) = (r * d_in, d_out * r);
        let mut da_want = vec![0.0f32; shape.a_len()];
        let mut db_want = vec![0.0f32; shape.b_len()];
        let mut dp_want = Vec::new();
        for q in 0..nseq {
            let (da, db, dp) = backward::mix_backward(
                &f(&a),
                &f(&b),
                shape,
                &p[q * e..(q + 1) * e],
                &g.da[q * per_a..(q + 1) * per_a],
                &g.db[q * per_b..(q + 1) * per_b],
            )
            .map_err(s)?;
            da_want.iter_mut().zip(&da).for_each(|(acc, v)| *acc += v);
            db_want.iter_mut().zip(&db).for_each(|(acc, v)| *acc += v);
            dp_want.extend(dp);
        }

        // GPU chain.
        let (dx, da_, db_, ddy) = (
            dev.upload(&x).map_err(s)?,
            dev.upload(&a).map_err(s)?,
            dev.upload(&b).map_err(s)?,
            dev.upload(&dy).map_err(s)?,
        );
        let dp_ = dev.upload(&p).map_err(s)?;
        let mut dam = dev.zeros::<T>(mixed.a_len()).map_err(s)?;
        let mut dbm = dev.zeros::<T>(mixed.b_len()).map_err(s)?;
        mix_experts(dev, &da_, &db_, shape, &dp_, nseq, &mut dam, &mut dbm).map_err(s)?;
        let dsegs =
            DeviceSegments::new(dev, &AdapterSegments::identity(segs).map_err(s)?).map_err(s)?;
        let mut h = dev.zeros::<f32>(t * r).map_err(s)?;
        shrink_segments(dev, &dx, &dam, &mixed, &dsegs, &mut h).map_err(s)?;
        let dids = dev.upload(&ids).map_err(s)?;
        let dones = dev.upload(&ones).map_err(s)?;
        let mut plan = DevicePlan::new(dev, t, 1, nseq).map_err(s)?;
        dispatch(dev, &dids, &mut plan).map_err(s)?;
        let mut grads = DeviceLoraGrads::new(dev, t, 1, &mixed).map_err(s)?;
        lora_backward_experts(
            dev, &dx, &dam, &dbm, &mixed, &plan, &dids, &dones, &h, &ddy, 0.75, &mut grads,
        )
        .map_err(s)?;
        let mut da = dev.zeros::<f32>(shape.a_len()).map_err(s)?;
        let mut db = dev.zeros::<f32>(shape.b_len()).map_err(s)?;
        let mut dp = dev.zeros::<f32>(nseq * e).map_err(s)?;
        mix_backward(
            dev,
            &da_,
            &db_,
            shape,
            &dp_,
            nseq,
            &grads.da(),
            &grads.db(),
            &mut da,
            &mut db,
            &mut dp,
        )
        .map_err(s)?;
        let tol =
            Tolerance::for_dtype(DType::F32).scaled((t.max(d_in).max(d_out) as f32).sqrt() * 4.0);
        compare("dA", &dev.download(&da).map_err(s)?, &da_want, tol)?;
        compare("dB", &dev.download(&db).map_err(s)?, &db_want, tol)?;
        compare(
            "dp",
            &dev.download(&dp).map_err(s)?,
            &dp_want,
            tol.scaled(((per_a + per_b) as f32).sqrt()),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(molora::testing::cases(16)))]
        #[test]
        fn saml_backward_chain_matches_cpu(e in 1usize..=6, r in 1usize..=4, d_in in 1usize..=80, d_out in 1usize..=80,
                                           lens in proptest::collection::vec(prop_oneof![1 => Just(0usize), 7 => 1usize..=40], 1..=4),
                                           seed in any::<u64>(), dtype in 0usize..3) {
            let Some(dev) = test_device("saml_backward_chain_matches_cpu") else { return Ok(()) };
            let shape = LoraShape::new(e, r, d_in, d_out).unwrap();
            let res = match dtype {
                0 => check_saml_chain::<f32>(&dev, &shape, &lens, seed),
                1 => check_saml_chain::<f16>(&dev, &shape, &lens, seed),
                _ => check_saml_chain::<bf16>(&dev, &shape, &lens, seed),
            };
            if let Err(m) = res {
                prop_assert!(false, "{:?}, sequences {:?}: {}", shape, lens, m);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(molora::testing::cases(16)))]
        /// `WeightSpaceLora` (SAML's weight-space LoRA with its backward, the road of the candle op
        /// `weight_space_lora` on CUDA) against the CPU: `y = y0 + s·(x·Ā_qᵀ)·B̄_qᵀ` per sequence, and
        /// `dx`, `dA`, `dB`, `dp` of the per-sequence single-adapter LoRA backward followed by the
        /// mixing backward. Odd sequence lengths, one sequence of one row included.
        #[test]
        fn weight_space_forward_backward_match_cpu(lens in proptest::collection::vec(1usize..40, 1..6),
                                                   e in 1usize..=6, r in 1usize..=8, d_in in 1usize..=70,
                                                   d_out in 1usize..=70, seed in any::<u64>()) {
            let Some(dev) = test_device("weight_space_forward_backward_match_cpu") else { return Ok(()) };
            let mut rng = Rng::new(seed);
            let (nseq, t) = (lens.len(), lens.iter().sum::<usize>());
            let shape = LoraShape::new(e, r, d_in, d_out).unwrap();
            let x: Vec<f32> = rng.values(t * d_in, 1.0);
            let a: Vec<f32> = rng.values(shape.a_len(), 0.3);
            let b: Vec<f32> = rng.values(shape.b_len(), 0.3);
            let y0: Vec<f32> = rng.values(t * d_out, 1.0);
            let dy: Vec<f32> = rng.values(t * d_out, 1.0);
            let p: Vec<f32> = (0..nseq * e).map(|_| rng.uniform() as f32).collect();
            // The CPU: mixed adapters, the segmented LoRA, and per sequence the LoRA backward of its
            // mixed adapter (one expert, weight 1), then the mixing backward.
            let routing = SeqRouting::new(Segments::from_lengths(&lens).unwrap(), e, p.clone()).unwrap();
            let (am, bm) = cpu::mix_experts(&a, &b, &shape, &routing).unwrap();
            let one = LoraShape::new(1, r, d_in, d_out).unwrap();
            let (mut y_want, mut dx_want) = (y0.clone(), Vec::new());
            let (mut da_want, mut db_want, mut dp_want) = (vec![0.0f32; shape.a_len()], vec![0.0f32; shape.b_len()], Vec::new());
            let mut lo = 0;
            for (q, &n) in lens.iter().enumerate() {
                let (aq, bq) = (&am[q * r * d_in..(q + 1) * r * d_in], &bm[q * d_out * r..(q + 1) * d_out * r]);
                let xq = &x[lo * d_in..(lo + n) * d_in];
                let ex = cpu::Experts::new(aq, bq, one, 1.5).unwrap();
                let dense = cpu::dense(&vec![1.0; n], n, 1).unwrap();
                let delta = cpu::lora_delta(xq, n, &ex, &dense).unwrap();
                for (yv, d) in y_want[lo * d_out..(lo + n) * d_out].iter_mut().zip(delta) {
                    *yv += d;
                }
                let g = backward::lora_backward(xq, aq, bq, &one, &vec![0; n], &vec![1.0; n], 1, 1.5f32, &dy[lo * d_out..(lo + n) * d_out]).unwrap();
                dx_want.extend_from_slice(&g.dx);
                let (dae, dbe, dpq) = backward::mix_backward(&a, &b, &shape, &p[q * e..(q + 1) * e], &g.da, &g.db).unwrap();
                da_want.iter_mut().zip(dae).for_each(|(acc, v)| *acc += v);
                db_want.iter_mut().zip(dbe).for_each(|(acc, v)| *acc += v);
                dp_want.extend(dpq);
                lo += n;
            }
            let (dx, da, db, dp, ddy) = (dev.upload(&x).unwrap(), dev.upload(&a).unwrap(), dev.upload(&b).unwrap(), dev.upload(&p).unwrap(), dev.upload(&dy).unwrap());
            let mut ws = molora::cuda::WeightSpaceLora::<f32>::new(&dev, &lens, &shape).unwrap();
            let mut y = dev.upload(&y0).unwrap();
            ws.forward(&dev, &dx, &da, &db, &dp, 1.5, &mut y).unwrap();
            ws.backward(&dev, &dx, &da, &db, &dp, &ddy, 1.5).unwrap();
            let tol = Tolerance::for_dtype(DType::F32).scaled((t.max(d_in).max(d_out) as f32).sqrt() * 4.0);
            let down = |v: molora::cuda::BufferView<'_, f32>| dev.download(&v).unwrap();
            for (what, g, w) in [
                ("y", dev.download(&y).unwrap(), y_want), ("dx", down(ws.dx()), dx_want),
                ("dA", down(ws.da()), da_want), ("dB", down(ws.db()), db_want), ("dp", down(ws.dp()), dp_want),
            ] {
                if let Err(m) = compare(what, &g, &w, tol) {
                    prop_assert!(false, "lens {:?}: {}", lens, m);
                }
            }
        }
    }
}
