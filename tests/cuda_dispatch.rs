//! The GPU dispatch (counting sort by expert) against the CPU reference: the same offsets, the same
//! stable order, the same inverse, for skewed, empty and all-to-one routings with `-1` slots; and the
//! GPU gather into sorted order (bit for bit) and scatter-combine back into token order (f32 rows and
//! rows of the element type, per-dtype tolerance; `-1` slots with NaN weights and NaN rows past the
//! pairs must not change anything).

#[cfg(feature = "cuda")]
mod gpu {
    use half::{bf16, f16};
    use molora::cpu;
    use molora::cuda::{
        dispatch, gather_rows, scatter_combine, CudaElement, Device, DevicePlan,
        MAX_DISPATCH_EXPERTS,
    };
    use molora::testing::{compare, test_device, Tolerance};
    use molora::Rng;
    use molora::{Error, Routing};
    use proptest::prelude::*;

    /// A routing of `t` tokens, `k_max` slots, `e` experts: `skew` in [0, 1] sends that share of
    /// slots to expert 0; `empty` is the share of `-1` slots.
    fn routing(t: usize, k_max: usize, e: usize, seed: u64, skew: f64, empty: f64) -> Routing {
        let mut s = seed | 1;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut ids = Vec::with_capacity(t * k_max);
        for _ in 0..t * k_max {
            let u = next();
            ids.push(if u < empty {
                -1
            } else if next() < skew {
                0
            } else {
                (next() * e as f64) as i32 % e as i32
            });
        }
        let w = vec![0.5; t * k_max];
        Routing::new(t, k_max, e, ids, w).expect("valid routing")
    }

    fn check(dev: &Device, r: &Routing) -> Result<(), String> {
        let want = cpu::dispatch(r).map_err(|e| e.to_string())?;
        let ids = dev.upload(r.ids()).map_err(|e| e.to_string())?;
        let mut plan = DevicePlan::new(dev, r.num_tokens(), r.k_max(), r.num_experts())
            .map_err(|e| e.to_string())?;
        dispatch(dev, &ids, &mut plan).map_err(|e| e.to_string())?;
        let got = plan.to_host(dev).map_err(|e| e.to_string())?;
        if got == want {
            Ok(())
        } else {
            Err(format!(
                "plans differ for T = {}, k_max = {}, E = {}:\n offsets got {:?}\n want {:?}\n sorted got {:?}\n want {:?}",
                r.num_tokens(),
                r.k_max(),
                r.num_experts(),
                got.expert_offsets(),
                want.expert_offsets(),
                got.sorted_slots(),
                want.sorted_slots()
            ))
        }
    }

    /// Gather and scatter-combine of `r` with rows of width `d` in element type `T` against the CPU.
    fn check_gather_scatter<T: CudaElement>(
        dev: &Device,
        r: &Routing,
        d: usize,
        seed: u64,
        rows_f32: bool,
    ) -> Result<(), String> {
        let s = |e: Error| e.to_string();
        let (t, k_max) = (r.num_tokens(), r.k_max());
        let slots = t * k_max;
        let plan_cpu = cpu::dispatch(r).map_err(s)?;
        let pairs = plan_cpu.num_pairs();
        let mut rng = Rng::new(seed);
        // Every buffer below is exactly its size (empty when T = 0).
        // Weights of empty slots are NaN: they must never be read.
        let w: Vec<f32> = r
            .ids()
            .iter()
            .map(|&id| {
                if id < 0 {
                    f32::NAN
                } else {
                    rng.values::<f32>(1, 1.0)[0]
                }
            })
            .collect();
        let routing =
            Routing::new(t, k_max, r.num_experts(), r.ids().to_vec(), w.clone()).map_err(s)?;
        let d_ids = dev.upload(r.ids()).map_err(s)?;
        let d_w = dev.upload(&w).map_err(s)?;
        let mut plan = DevicePlan::new(dev, t, k_max, r.num_experts()).map_err(s)?;
        dispatch(dev, &d_ids, &mut plan).map_err(s)?;

        // Gather: a copy, bit for bit.
        let x: Vec<T> = rng.values(t * d, 1.0);
        let want = cpu::gather_rows(&x, t, d, &plan_cpu).map_err(s)?;
        let d_x = dev.upload(&x).map_err(s)?;
        let mut out = dev.upload(&vec![T::from_f32(0.0); slots * d]).map_err(s)?;
        gather_rows(dev, &d_x, d, &plan, &mut out).map_err(s)?;
        let got = dev.download(&out).map_err(s)?;
        for (i, (g, w)) in got[..pairs * d].iter().zip(&want).enumerate() {
            if g.to_f32().to_bits() != w.to_f32().to_bits() {
                return Err(format!(
                    "gather_rows: row {} col {}: got {:?}, want {:?}",
                    i / d,
                    i % d,
                    g,
                    w
                ));
            }
        }

        // Scatter-combine: rows past the pairs are NaN and must not be read.
        let rows: Vec<f32> = rng.values(pairs * d, 1.0);
        let rows_t: Vec<T> = rows.iter().map(|&v| T::from_f32(v)).collect();
        let rows_ref: Vec<f32> = if rows_f32 {
            rows.clone()
        } else {
            rows_t.iter().map(|v| v.to_f32()).collect()
        };
        let y0: Vec<T> = rng.values(t * d, 1.0);
        let mut y_want = y0.clone();
        cpu::scatter_combine(&rows_ref, d, &plan_cpu, &routing, 0.75, &mut y_want).map_err(s)?;
        let mut d_y = dev.upload(&y0).map_err(s)?;
        if rows_f32 {
            let mut padded = rows.clone();
            padded.resize(slots * d, f32::NAN);
            let d_rows = dev.upload(&padded).map_err(s)?;
            scatter_combine(dev, &d_rows, d, &plan, &d_ids, &d_w, 0.75, &mut d_y).map_err(s)?;
        } else {
            let mut padded = rows_t.clone();
            padded.resize(slots * d, T::from_f32(f32::NAN));
            let d_rows = dev.upload(&padded).map_err(s)?;
            scatter_combine(dev, &d_rows, d, &plan, &d_ids, &d_w, 0.75, &mut d_y).map_err(s)?;
        }
        let got: Vec<f32> = dev
            .download(&d_y)
            .map_err(s)?
            .iter()
            .map(|v| v.to_f32())
            .collect();
        let want: Vec<f32> = y_want.iter().map(|v| v.to_f32()).collect();
        // Tokens without an active slot keep their row bit for bit.
        for tok in 0..t {
            if r.ids()[tok * k_max..(tok + 1) * k_max]
                .iter()
                .all(|&id| id < 0)
            {
                for o in 0..d {
                    let i = tok * d + o;
                    if got[i].to_bits() != y0[i].to_f32().to_bits() {
                        return Err(format!("scatter_combine touched token {tok} without slots at column {o}: got {}, was {}", got[i], y0[i].to_f32()));
                    }
                }
            }
        }
        let tol = Tolerance::for_dtype(T::DTYPE).scaled((k_max as f32).sqrt());
        compare("scatter_combine y", &got, &want, tol)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(molora::testing::cases(32)))]
        #[test]
        fn gather_and_scatter_match_cpu(
            t in prop_oneof![Just(0usize), Just(1), Just(7), Just(133), 0usize..600],
            k_max in 1usize..=4,
            e in 1usize..=16,
            d in prop_oneof![Just(1usize), Just(3), Just(255), Just(257), 1usize..700],
            seed in any::<u64>(),
            skew in prop_oneof![Just(0.0f64), Just(1.0)],
            empty in prop_oneof![Just(0.0f64), Just(0.3), Just(1.0)],
            dtype in 0usize..3,
            rows_f32 in any::<bool>(),
        ) {
            let Some(dev) = test_device("gather_and_scatter_match_cpu") else { return Ok(()) };
            let r = routing(t, k_max, e, seed, skew, empty);
            let res = match dtype {
                0 => check_gather_scatter::<f32>(&dev, &r, d, seed, rows_f32),
                1 => check_gather_scatter::<f16>(&dev, &r, d, seed, rows_f32),
                _ => check_gather_scatter::<bf16>(&dev, &r, d, seed, rows_f32),
            };
            if let Err(msg) = res {
                prop_assert!(false, "T = {}, k_max = {}, E = {}, d = {}: {}", t, k_max, e, d, msg);
            }
        }
    }

    #[test]
    fn scatter_rejects_mixed_dtypes() {
        let Some(dev) = test_device("scatter_rejects_mixed_dtypes") else {
            return;
        };
        let mut plan = DevicePlan::new(&dev, 2, 1, 2).unwrap();
        let ids = dev.upload(&[0i32, 1]).unwrap();
        dispatch(&dev, &ids, &mut plan).unwrap();
        let w = dev.upload(&[1.0f32, 1.0]).unwrap();
        let rows = dev.upload(&[f16::from_f32(1.0); 4]).unwrap();
        let mut y = dev.upload(&[bf16::from_f32(0.0); 4]).unwrap();
        assert!(matches!(
            scatter_combine(&dev, &rows, 2, &plan, &ids, &w, 1.0, &mut y),
            Err(Error::Unsupported {
                op: "scatter_combine",
                ..
            })
        ));
        let mut out = dev.upload(&[f16::from_f32(0.0); 4]).unwrap();
        assert!(matches!(
            gather_rows(&dev, &rows, 0, &plan, &mut out),
            Err(Error::InvalidDim { what: "d", .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(molora::testing::cases(48)))]
        #[test]
        fn dispatch_matches_cpu(
            t in prop_oneof![Just(0usize), Just(1), Just(7), Just(133), 0usize..2000],
            k_max in 1usize..=8,
            e in prop_oneof![1usize..=8, 1usize..=64, Just(MAX_DISPATCH_EXPERTS)],
            seed in any::<u64>(),
            skew in prop_oneof![Just(0.0f64), Just(0.9), Just(1.0)],
            empty in prop_oneof![Just(0.0f64), Just(0.3), Just(1.0)],
        ) {
            let Some(dev) = test_device("dispatch_matches_cpu") else { return Ok(()) };
            let r = routing(t, k_max, e, seed, skew, empty);
            if let Err(msg) = check(&dev, &r) {
                prop_assert!(false, "{}", msg);
            }
        }
    }

    #[test]
    fn dispatch_rejects_bad_input() {
        let Some(dev) = test_device("dispatch_rejects_bad_input") else {
            return;
        };
        assert!(matches!(
            DevicePlan::new(&dev, 4, 2, MAX_DISPATCH_EXPERTS + 1),
            Err(Error::Unsupported { op: "dispatch", .. })
        ));
        assert!(matches!(
            DevicePlan::new(&dev, 4, 0, 8),
            Err(Error::InvalidDim { what: "k_max", .. })
        ));
        let mut plan = DevicePlan::new(&dev, 4, 2, 8).unwrap();
        let ids = dev.upload(&[0i32; 7]).unwrap();
        assert_eq!(
            dispatch(&dev, &ids, &mut plan),
            Err(Error::LengthMismatch {
                what: "routing ids [T, k_max]",
                expected: 8,
                got: 7
            })
        );
    }
}
