//! The GPU dispatch (counting sort by expert) against the CPU reference: the same offsets, the same
//! stable order, the same inverse, for skewed, empty and all-to-one routings with `-1` slots.

#[cfg(feature = "cuda")]
mod gpu {
    use molora::cpu;
    use molora::cuda::{dispatch, Device, DevicePlan, MAX_DISPATCH_EXPERTS};
    use molora::testing::gpu_or_skip;
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
        let mut padded = r.ids().to_vec();
        padded.push(-1);
        let ids = dev.upload(&padded).map_err(|e| e.to_string())?;
        let mut plan = DevicePlan::new(dev, r.num_tokens(), r.k_max(), r.num_experts())
            .map_err(|e| e.to_string())?;
        dispatch(dev, &ids.slice(0..r.ids().len()), &mut plan).map_err(|e| e.to_string())?;
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

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn dispatch_matches_cpu(
            t in prop_oneof![Just(0usize), Just(1), Just(7), Just(133), 0usize..2000],
            k_max in 1usize..=8,
            e in prop_oneof![1usize..=8, 1usize..=64, Just(MAX_DISPATCH_EXPERTS)],
            seed in any::<u64>(),
            skew in prop_oneof![Just(0.0f64), Just(0.9), Just(1.0)],
            empty in prop_oneof![Just(0.0f64), Just(0.3), Just(1.0)],
        ) {
            let Some(dev) = gpu_or_skip("dispatch_matches_cpu") else { return Ok(()) };
            let r = routing(t, k_max, e, seed, skew, empty);
            if let Err(msg) = check(&dev, &r) {
                prop_assert!(false, "{}", msg);
            }
        }
    }

    #[test]
    fn dispatch_rejects_bad_input() {
        let Some(dev) = gpu_or_skip("dispatch_rejects_bad_input") else {
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
