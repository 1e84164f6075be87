//! The framework ops on the device (`molora::cuda::ops`, what candle's CUDA path and the PyTorch
//! package call) against their CPU twins (`molora::cpu::ops`): forward and backward of the gates, the
//! dense-weight and slot LoRA ops, the routed op and the weight-space op, for every dtype, odd
//! shapes, `-1` slots and T = 0.

#[cfg(feature = "cuda")]
mod gpu {
    use molora::cpu::ops as host;
    use molora::cuda::cudarc::driver::DeviceRepr;
    use molora::cuda::ops::{self, DeviceOpGrads};
    use molora::cuda::{Buffer, CudaElement, Device};
    use molora::gate::RoutedGate;
    use molora::testing::{compare, test_device, Tolerance};
    use molora::{Element, LoraShape, Rng, Segments};
    use proptest::prelude::*;

    fn up<T: DeviceRepr>(dev: &Device, v: &[T]) -> Buffer<T> {
        dev.upload(v).expect("upload")
    }

    fn down<T: DeviceRepr>(dev: &Device, d: &Buffer<T>) -> Vec<T> {
        dev.download(d).expect("download")
    }

    fn f32s<T: Element>(v: &[T]) -> Vec<f32> {
        v.iter().map(|x| x.to_f32()).collect()
    }

    #[derive(Debug, Clone)]
    struct Case {
        t: usize,
        e: usize,
        r: usize,
        d_in: usize,
        d_out: usize,
        seed: u64,
    }

    fn case() -> impl Strategy<Value = Case> {
        (
            prop_oneof![Just(0usize), Just(1), Just(7), 1usize..70],
            prop_oneof![Just(1usize), 2usize..=9, Just(40)],
            prop_oneof![1usize..=5, Just(8), Just(16)],
            prop_oneof![1usize..=20, Just(64)],
            prop_oneof![1usize..=20, Just(33)],
            any::<u64>(),
        )
            .prop_map(|(t, e, r, d_in, d_out, seed)| Case {
                t,
                e,
                r,
                d_in,
                d_out,
                seed,
            })
    }

    /// Row-stochastic probabilities `[T, E]`.
    fn probs(rng: &mut Rng, t: usize, e: usize) -> Vec<f32> {
        let mut p: Vec<f32> = (0..t * e).map(|_| rng.uniform() as f32 + 0.01).collect();
        for row in p.chunks_mut(e.max(1)) {
            let s: f32 = row.iter().sum();
            row.iter_mut().for_each(|v| *v /= s);
        }
        p
    }

    struct Grads {
        dx: Buffer<f32>,
        da: Buffer<f32>,
        db: Buffer<f32>,
        dw: Buffer<f32>,
    }

    impl Grads {
        fn new(dev: &Device, c: &Case, shape: &LoraShape, dw: usize) -> Grads {
            let z = |n: usize| dev.zeros::<f32>(n).expect("zeros");
            Grads {
                dx: z(c.t * c.d_in),
                da: z(shape.a_len()),
                db: z(shape.b_len()),
                dw: z(dw),
            }
        }
        fn out(&mut self) -> DeviceOpGrads<'_, Buffer<f32>> {
            DeviceOpGrads {
                dx: &mut self.dx,
                da: &mut self.da,
                db: &mut self.db,
                dw: &mut self.dw,
            }
        }
        fn check(&self, dev: &Device, want: [&[f32]; 4], tol: Tolerance) -> Result<(), String> {
            compare("dx", &down(dev, &self.dx), want[0], tol)?;
            compare("dA", &down(dev, &self.da), want[1], tol)?;
            compare("dB", &down(dev, &self.db), want[2], tol)?;
            compare("dw", &down(dev, &self.dw), want[3], tol)
        }
    }

    fn one<T: CudaElement>(dev: &Device, c: &Case) -> Result<(), String> {
        let err = |e: molora::Error| e.to_string();
        let mut rng = Rng::new(c.seed);
        let shape = LoraShape::new(c.e, c.r, c.d_in, c.d_out).map_err(err)?;
        let x: Vec<T> = rng.values(c.t * c.d_in, 1.0);
        let a: Vec<T> = rng.values(shape.a_len(), 0.3);
        let b: Vec<T> = rng.values(shape.b_len(), 0.3);
        let dy: Vec<T> = rng.values(c.t * c.d_out, 1.0);
        let (xf, af, bf, dyf) = (f32s(&x), f32s(&a), f32s(&b), f32s(&dy));
        let p = probs(&mut rng, c.t, c.e);
        let tau: Vec<f32> = (0..c.t)
            .map(|_| 0.5 / c.e as f32 + 0.1 * rng.uniform() as f32)
            .collect();
        let (dx_, da_, db_) = (up(dev, &x), up(dev, &a), up(dev, &b));
        let (ddy, dp, dtau) = (up(dev, &dy), up(dev, &p), up(dev, &tau));
        let tol = Tolerance::for_dtype(T::DTYPE).scaled(((c.d_in.max(c.r).max(c.e)) as f32).sqrt());
        let gtol = Tolerance::for_dtype(molora::DType::F32)
            .scaled(((c.d_in.max(c.r).max(c.e)) as f32).sqrt() * 4.0);
        let k = 2.min(c.e);
        let topk = RoutedGate::TopK {
            k,
            renormalize: true,
        };

        // The gates: dense weights and their backward.
        for (name, gate, tv) in [
            ("top-k", topk, None),
            ("threshold", RoutedGate::Threshold, Some(&tau)),
        ] {
            let want =
                host::gate_forward(&gate, &p, tv.map(|v| v.as_slice()), c.t, c.e).map_err(err)?;
            let mut w = dev.zeros::<f32>(c.t * c.e).map_err(err)?;
            let tview = || tv.map(|_| dtau.view());
            ops::gate_forward(dev, &gate, &dp, tview(), c.t, c.e, &mut w).map_err(err)?;
            compare(&format!("{name} w"), &down(dev, &w), &want, gtol)?;
            let gw: Vec<f32> = (0..c.t * c.e).map(|_| rng.normal() as f32).collect();
            let (dp_want, dtau_want) =
                host::gate_backward(&gate, &p, tv.map(|v| v.as_slice()), c.t, c.e, &gw)
                    .map_err(err)?;
            let (mut gp, mut gt) = (
                dev.zeros::<f32>(c.t * c.e).map_err(err)?,
                dev.zeros::<f32>(c.t).map_err(err)?,
            );
            ops::gate_backward(
                dev,
                &gate,
                &dp,
                tview(),
                c.t,
                c.e,
                &up(dev, &gw),
                &mut gp,
                &mut gt,
            )
            .map_err(err)?;
            compare(&format!("{name} dp"), &down(dev, &gp), &dp_want, gtol)?;
            compare(&format!("{name} dtau"), &down(dev, &gt), &dtau_want, gtol)?;
        }

        // The dense-weight LoRA op, with the top-k gate's weights (zeros where not kept).
        let w = host::gate_forward(&topk, &p, None, c.t, c.e).map_err(err)?;
        let dw_ = up(dev, &w);
        let want = host::mole_lora_forward(&x, &a, &b, &w, &shape, 0.8).map_err(err)?;
        let mut y = dev.zeros::<T>(c.t * c.d_out).map_err(err)?;
        ops::mole_lora_forward(dev, &dx_, &da_, &db_, &dw_, c.t, &shape, 0.8, &mut y)
            .map_err(err)?;
        compare("mole_lora y", &f32s(&down(dev, &y)), &f32s(&want), tol)?;
        let g = host::mole_lora_backward(&xf, &af, &bf, &w, &shape, 0.8, &dyf).map_err(err)?;
        let mut gr = Grads::new(dev, c, &shape, c.t * c.e);
        ops::mole_lora_backward(
            dev,
            &dx_,
            &da_,
            &db_,
            &dw_,
            c.t,
            &shape,
            0.8,
            &ddy,
            &mut gr.out(),
        )
        .map_err(err)?;
        gr.check(dev, [&g.dx, &g.da, &g.db, &g.dw], tol)
            .map_err(|m| format!("mole_lora: {m}"))?;

        // The slot op, with empty slots.
        let ids: Vec<i32> = (0..c.t * k)
            .map(|i| {
                if i % 5 == 3 {
                    -1
                } else {
                    (rng.uniform() * c.e as f64) as i32 % c.e as i32
                }
            })
            .collect();
        let sw: Vec<f32> = ids
            .iter()
            .map(|&i| if i < 0 { 0.0 } else { rng.uniform() as f32 })
            .collect();
        let (dids, dsw) = (up(dev, &ids), up(dev, &sw));
        let want = host::slot_lora_forward(&x, &a, &b, &ids, &sw, k, &shape, 1.3).map_err(err)?;
        let mut y = dev.zeros::<T>(c.t * c.d_out).map_err(err)?;
        ops::slot_lora_forward(
            dev, &dx_, &da_, &db_, &dids, &dsw, c.t, k, &shape, 1.3, &mut y,
        )
        .map_err(err)?;
        compare("slot y", &f32s(&down(dev, &y)), &f32s(&want), tol)?;
        let g =
            molora::cpu::backward::lora_backward(&xf, &af, &bf, &shape, &ids, &sw, k, 1.3, &dyf)
                .map_err(err)?;
        let mut gr = Grads::new(dev, c, &shape, c.t * k);
        ops::slot_lora_backward(
            dev,
            &dx_,
            &da_,
            &db_,
            &dids,
            &dsw,
            c.t,
            k,
            &shape,
            1.3,
            &ddy,
            &mut gr.out(),
        )
        .map_err(err)?;
        gr.check(dev, [&g.dx, &g.da, &g.db, &g.dw], tol)
            .map_err(|m| format!("slots: {m}"))?;

        // The routed op, top-k and threshold.
        for (name, gate, tv) in [
            ("top-k", topk, None),
            ("threshold", RoutedGate::Threshold, Some(&tau)),
        ] {
            let tvs = tv.map(|v| v.as_slice());
            let want =
                host::routed_lora_forward(&x, &a, &b, &p, tvs, &gate, &shape, 0.6).map_err(err)?;
            let mut y = dev.zeros::<T>(c.t * c.d_out).map_err(err)?;
            let tview = || tv.map(|_| dtau.view());
            ops::routed_lora_forward(
                dev,
                &dx_,
                &da_,
                &db_,
                &dp,
                tview(),
                &gate,
                c.t,
                &shape,
                0.6,
                &mut y,
            )
            .map_err(err)?;
            compare(
                &format!("routed {name} y"),
                &f32s(&down(dev, &y)),
                &f32s(&want),
                tol,
            )?;
            let g = host::routed_lora_backward(&xf, &af, &bf, &p, tvs, &gate, &shape, 0.6, &dyf)
                .map_err(err)?;
            let mut gr = Grads::new(dev, c, &shape, c.t * c.e);
            let mut gt = dev.zeros::<f32>(c.t).map_err(err)?;
            ops::routed_lora_backward(
                dev,
                &dx_,
                &da_,
                &db_,
                &dp,
                tview(),
                &gate,
                c.t,
                &shape,
                0.6,
                &ddy,
                &mut gr.out(),
                &mut gt,
            )
            .map_err(err)?;
            gr.check(dev, [&g.dx, &g.da, &g.db, &g.dp], tol)
                .map_err(|m| format!("routed {name}: {m}"))?;
            compare(
                &format!("routed {name} dtau"),
                &down(dev, &gt),
                &g.dtau,
                tol,
            )?;
        }

        // The weight-space op over three sequences (each at least one row).
        if c.t >= 3 {
            let lengths = [1, c.t / 2, c.t - 1 - c.t / 2];
            let seq = Segments::from_lengths(&lengths).map_err(err)?;
            let pm: Vec<f32> = (0..3 * c.e).map(|_| rng.uniform() as f32).collect();
            let dpm = up(dev, &pm);
            let want =
                host::weight_space_forward(&x, &a, &b, &pm, &seq, &shape, 0.5).map_err(err)?;
            let mut y = dev.zeros::<T>(c.t * c.d_out).map_err(err)?;
            ops::weight_space_forward(dev, &dx_, &da_, &db_, &dpm, &lengths, &shape, 0.5, &mut y)
                .map_err(err)?;
            compare("weight-space y", &f32s(&down(dev, &y)), &f32s(&want), tol)?;
            let g = host::weight_space_backward(&xf, &af, &bf, &pm, &seq, &shape, 0.5, &dyf)
                .map_err(err)?;
            let mut gr = Grads::new(dev, c, &shape, 3 * c.e);
            ops::weight_space_backward(
                dev,
                &dx_,
                &da_,
                &db_,
                &dpm,
                &lengths,
                &shape,
                0.5,
                &ddy,
                &mut gr.out(),
            )
            .map_err(err)?;
            gr.check(dev, [&g.dx, &g.da, &g.db, &g.dp], tol.scaled(2.0))
                .map_err(|m| format!("weight space: {m}"))?;
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(molora::testing::cases(12)))]
        #[test]
        fn device_ops_match_their_cpu_twins(c in case()) {
            let Some(dev) = test_device("device_ops_match_their_cpu_twins") else { return Ok(()) };
            for (dtype, result) in [
                ("f32", one::<f32>(&dev, &c)),
                ("f16", one::<half::f16>(&dev, &c)),
                ("bf16", one::<half::bf16>(&dev, &c)),
            ] {
                if let Err(msg) = result {
                    prop_assert!(false, "{dtype}: {msg} ({c:?})");
                }
            }
        }
    }

    #[test]
    fn device_ops_reject_bad_input() {
        let Some(dev) = test_device("device_ops_reject_bad_input") else {
            return;
        };
        let shape = LoraShape::new(3, 2, 4, 5).unwrap();
        let z = |n: usize| dev.zeros::<f32>(n).unwrap();
        let (x, a, b) = (z(2 * 4), z(shape.a_len()), z(shape.b_len()));
        let mut y = z(2 * 5);
        let e =
            ops::mole_lora_forward(&dev, &x, &a, &b, &z(5), 2, &shape, 1.0, &mut y).unwrap_err();
        assert!(
            matches!(
                e,
                molora::Error::LengthMismatch {
                    expected: 6,
                    got: 5,
                    ..
                }
            ),
            "{e}"
        );
        let e = ops::routed_lora_forward(
            &dev,
            &x,
            &a,
            &b,
            &z(6),
            None,
            &RoutedGate::Threshold,
            2,
            &shape,
            1.0,
            &mut y,
        )
        .unwrap_err();
        assert!(e.to_string().contains("tau"), "{e}");
        let e = ops::weight_space_forward(&dev, &x, &a, &b, &z(6), &[2, 0], &shape, 1.0, &mut y)
            .unwrap_err();
        assert!(e.to_string().contains("sequence"), "{e}");
        let mut gr = [z(8), z(shape.a_len()), z(shape.b_len()), z(5)];
        let [dx, da, db, dw] = &mut gr;
        let e = ops::slot_lora_backward(
            &dev,
            &x,
            &a,
            &b,
            &dev.zeros::<i32>(6).unwrap(),
            &z(6),
            2,
            3,
            &shape,
            1.0,
            &z(10),
            &mut DeviceOpGrads { dx, da, db, dw },
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                molora::Error::LengthMismatch {
                    what: "dw",
                    expected: 6,
                    got: 5
                }
            ),
            "{e}"
        );
    }
}
