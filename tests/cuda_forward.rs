//! The whole LoRA forward (`MoleLoraForward`) on both paths against the CPU reference: the routing
//! equals `cpu::route` (up to f32 near-ties) and `y` equals `y0 + cpu::lora_delta` on that routing;
//! and its backward on both paths against the CPU backward chain (LoRA part, gate, activation,
//! router) on the routing the GPU chose.

#[cfg(feature = "cuda")]
mod gpu {
    use half::bf16;
    use molora::cpu::{self, backward, Activation, Gate, RouterWeights, ThresholdSpec};
    use molora::cuda::{DeviceGate, DeviceRouter, LoraPath, MoleLoraForward};
    use molora::testing::{compare, test_device, Tolerance};
    use molora::Rng;
    use molora::{DType, LoraShape, Routing};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(molora::testing::cases(16)))]
        #[test]
        fn forward_paths_match_cpu(t in 1usize..300, e in 1usize..=16, r in 1usize..=16,
                                   d_in in 1usize..=300, d_out in 1usize..=300, seed in any::<u64>(),
                                   threshold in any::<bool>()) {
            let Some(dev) = test_device("forward_paths_match_cpu") else { return Ok(()) };
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
            let router = DeviceRouter { w_g: dwg.slice(..).unwrap(), b_g: None, activation: Activation::Softmax, temperature: 1.0 };
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

    /// The fused decode (T ≤ 16, dense-gated, f16/bf16, dims multiples of 8: router logits, gate and
    /// shrink in one kernel, then the expand) against the CPU: the routing equals `cpu::route` up
    /// to f32 near-ties, `y` equals `y0 + cpu::lora_delta` on the chosen routing, and the run must
    /// have taken the fused decode. Every gate, both activations, a temperature, with and without a
    /// router bias, E up to 40 (D1's two column tiles), d_in from one k-step to many splits.
    #[allow(clippy::too_many_arguments)]
    fn decode_case<T: molora::cuda::CudaElement>(
        dev: &molora::cuda::Device,
        t: usize,
        e: usize,
        r: usize,
        d_in: usize,
        d_out: usize,
        seed: u64,
        which: usize,
        sigmoid: bool,
        bias: bool,
    ) -> Result<(), String> {
        let s = |e: molora::Error| e.to_string();
        let mut rng = Rng::new(seed);
        let shape = LoraShape::new(e, r, d_in, d_out).map_err(s)?;
        let x: Vec<T> = rng.values(t * d_in, 1.0);
        let a: Vec<T> = rng.values(shape.a_len(), 0.2);
        let b: Vec<T> = rng.values(shape.b_len(), 0.2);
        let w_g: Vec<T> = rng.values(e * d_in, 0.3);
        let b_g: Vec<T> = rng.values(e, 0.5);
        let y0: Vec<T> = rng.values(t * d_out, 1.0);
        let taus: Vec<f32> = (0..t)
            .map(|_| 0.5 * rng.uniform() as f32 / e as f32)
            .collect();
        let act = if sigmoid {
            Activation::Sigmoid
        } else {
            Activation::Softmax
        };
        let temperature = 0.8f32;
        let (gate, dgate_taus) = match which {
            0 => (
                Gate::TopK {
                    k: 2.min(e),
                    renormalize: true,
                },
                None,
            ),
            1 => (
                Gate::TopK {
                    k: 3.min(e),
                    renormalize: false,
                },
                None,
            ),
            2 => (Gate::Threshold(ThresholdSpec::Learned { theta: 0.0 }), None),
            3 => (Gate::Dense, None),
            _ => (
                Gate::Threshold(ThresholdSpec::Learned { theta: 0.0 }),
                Some(taus.clone()),
            ),
        };
        let dtaus = match &dgate_taus {
            Some(v) => Some(dev.upload(v).map_err(s)?),
            None => None,
        };
        let dgate = match &dtaus {
            Some(v) => DeviceGate::ThresholdPerToken(v.slice(..).map_err(s)?),
            None => DeviceGate::from_gate(&gate, e).map_err(s)?,
        };
        let (dx, da, db, dwg, dbg) = (
            dev.upload(&x).map_err(s)?,
            dev.upload(&a).map_err(s)?,
            dev.upload(&b).map_err(s)?,
            dev.upload(&w_g).map_err(s)?,
            dev.upload(&b_g).map_err(s)?,
        );
        let router = DeviceRouter {
            w_g: dwg.slice(..).map_err(s)?,
            b_g: if bias {
                Some(dbg.slice(..).map_err(s)?)
            } else {
                None
            },
            activation: act,
            temperature,
        };
        let cpu_router = RouterWeights {
            w_g: &w_g,
            b_g: if bias { Some(&b_g) } else { None },
            activation: act,
            temperature,
        };
        let logits = cpu::router_logits(&x, t, d_in, &w_g, if bias { Some(&b_g) } else { None }, e)
            .map_err(s)?;
        let probs = cpu::activate(&logits, t, e, act, temperature).map_err(s)?;
        let want_routing = match &dgate_taus {
            Some(tv) => cpu::threshold_gate(&probs, t, e, tv).map_err(s)?,
            None => cpu::route(&x, t, d_in, e, &cpu_router, None, &gate).map_err(s)?,
        };
        let k_max = dgate.k_max(e);
        let mut fwd =
            MoleLoraForward::new(dev, t, &shape, k_max, LoraPath::DenseGated).map_err(s)?;
        let mut y = dev.upload(&y0).map_err(s)?;
        fwd.run(dev, &dx, &router, &dgate, &da, &db, 2.0, &mut y)
            .map_err(s)?;
        if !fwd.fused_decode() {
            return Err("the run did not take the fused decode".into());
        }
        let ids = dev.download(fwd.ids()).map_err(s)?;
        let w = dev.download(fwd.weights()).map_err(s)?;
        for (i, (&g, &c)) in ids.iter().zip(want_routing.ids()).enumerate() {
            let row = &probs[(i / k_max) * e..(i / k_max + 1) * e];
            let p = |id: i32| if id >= 0 { row[id as usize] } else { f32::NAN };
            if !(g == c || (p(g) - p(c)).abs() <= 1e-5) {
                return Err(format!(
                    "slot {i}: kernel chose {g} (p {}), reference {c} (p {})",
                    p(g),
                    p(c)
                ));
            }
        }
        let want_w = want_routing.weights();
        let w_tol = Tolerance {
            atol: 1e-5,
            rtol: 1e-4,
        };
        compare("routing weights", &w, want_w, w_tol)?;
        let routing = Routing::new(t, k_max, e, ids, w).map_err(s)?;
        let experts = cpu::Experts::new(&a, &b, shape, 2.0).map_err(s)?;
        let delta = cpu::lora_delta(&x, t, &experts, &routing).map_err(s)?;
        let want: Vec<f32> = y0
            .iter()
            .zip(&delta)
            .map(|(y, d)| T::from_f32(y.to_f32() + d).to_f32())
            .collect();
        let got: Vec<f32> = dev
            .download(&y)
            .map_err(s)?
            .iter()
            .map(|v| v.to_f32())
            .collect();
        compare("y", &got, &want, Tolerance::for_dtype(T::DTYPE).scaled(2.0))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(molora::testing::cases(24)))]
        #[test]
        fn fused_decode_matches_cpu(t in 1usize..=16, e in 1usize..=40, r in prop_oneof![Just(8usize), Just(16), Just(24)],
                                    d_in in prop_oneof![Just(8usize), Just(64), Just(200), Just(1024)],
                                    d_out in prop_oneof![Just(1usize), Just(72), 1usize..300], seed in any::<u64>(),
                                    which in 0usize..5, sigmoid in any::<bool>(), bias in any::<bool>(), bf in any::<bool>()) {
            prop_assume!(e * r <= molora::cuda::DENSE_GATED_MAX_COLUMNS);
            let Some(dev) = test_device("fused_decode_matches_cpu") else { return Ok(()) };
            let res = if bf {
                decode_case::<bf16>(&dev, t, e, r, d_in, d_out, seed, which, sigmoid, bias)
            } else {
                decode_case::<half::f16>(&dev, t, e, r, d_in, d_out, seed, which, sigmoid, bias)
            };
            if let Err(m) = res {
                prop_assert!(false, "T {} E {} r {} {}→{}, gate {}, sigmoid {}, bias {}, bf16 {}: {}", t, e, r, d_in, d_out, which, sigmoid, bias, bf, m);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(molora::testing::cases(16)))]
        #[test]
        fn forward_backward_paths_match_cpu(t in 1usize..120, e in 1usize..=12, r in 1usize..=16,
                                            d_in in 1usize..=100, d_out in 1usize..=100, seed in any::<u64>(),
                                            which in 0usize..3) {
            let Some(dev) = test_device("forward_backward_paths_match_cpu") else { return Ok(()) };
            let mut rng = Rng::new(seed);
            let shape = LoraShape::new(e, r, d_in, d_out).unwrap();
            let x: Vec<f32> = rng.values(t * d_in, 1.0);
            let a: Vec<f32> = rng.values(shape.a_len(), 0.2);
            let b: Vec<f32> = rng.values(shape.b_len(), 0.2);
            let w_g: Vec<f32> = rng.values(e * d_in, 0.3);
            let dy: Vec<f32> = rng.values(t * d_out, 1.0);
            let (gate, renorm) = match which {
                0 => (Gate::Threshold(ThresholdSpec::Learned { theta: 0.0 }), true),
                1 => (Gate::TopK { k: 2.min(e), renormalize: true }, true),
                _ => (Gate::TopK { k: 2.min(e), renormalize: false }, false),
            };
            let dgate = DeviceGate::from_gate(&gate, e).unwrap();
            let k_max = dgate.k_max(e);
            let (dx, da, db, dwg, ddy) = (dev.upload(&x).unwrap(), dev.upload(&a).unwrap(), dev.upload(&b).unwrap(), dev.upload(&w_g).unwrap(), dev.upload(&dy).unwrap());
            let router = DeviceRouter { w_g: dwg.slice(..).unwrap(), b_g: None, activation: Activation::Softmax, temperature: 1.3 };
            let logits = cpu::router_logits(&x, t, d_in, &w_g, None, e).unwrap();
            let p = cpu::activate(&logits, t, e, Activation::Softmax, 1.3).unwrap();
            let taus = match &gate {
                Gate::Threshold(spec) => Some(cpu::threshold_values::<f32>(spec, None, t, 1, e).unwrap()),
                _ => None,
            };
            for path in [LoraPath::Segmented, LoraPath::DenseGated] {
                if path == LoraPath::DenseGated && e * r > molora::cuda::DENSE_GATED_MAX_COLUMNS {
                    continue;
                }
                let mut fwd = MoleLoraForward::new(&dev, t, &shape, k_max, path).unwrap();
                let mut y = dev.zeros::<f32>(t * d_out).unwrap();
                fwd.run(&dev, &dx, &router, &dgate, &da, &db, 2.0, &mut y).unwrap();
                let mut grads = fwd.new_grads(&dev).unwrap();
                fwd.backward(&dev, &dx, &router, &dgate, &da, &db, &ddy, 2.0, &mut grads).unwrap();
                // The CPU chain on the routing the GPU chose.
                let ids = dev.download(fwd.ids()).unwrap();
                let w: Vec<f32> = dev.download(fwd.weights()).unwrap();
                let lora = backward::lora_backward(&x, &a, &b, &shape, &ids, &w, k_max, 2.0f32, &dy).unwrap();
                let (dp, dtau_want) = backward::gate_backward(&p, e, &ids, k_max, taus.as_deref(), renorm, &lora.dw).unwrap();
                let dz_want = backward::softmax_backward(&p, &dp, e, 1.3).unwrap();
                let (dwg_want, dbg_want, dxr_want) = backward::router_backward(&x, &w_g, &dz_want, d_in, e).unwrap();
                let got = grads.lora().to_host(&dev).unwrap();
                let tol = Tolerance::for_dtype(DType::F32).scaled((t.max(d_in).max(d_out) as f32).sqrt() * 4.0);
                // dz and what follows from it pass through the gate's 1/Σ(p − τ): a wider bound.
                let tol_gate = tol.scaled(10.0);
                let down = |v: molora::cuda::BufferView<'_, f32>| dev.download(&v).unwrap();
                let dtau_got = down(grads.dtau());
                let dtau_want = if taus.is_some() { dtau_want } else { vec![0.0; t] };
                for (what, g, w, tl) in [
                    ("dA", got.da, lora.da, tol), ("dB", got.db, lora.db, tol), ("dx (experts)", got.dx, lora.dx, tol),
                    ("dw", got.dw, lora.dw, tol), ("dz", down(grads.dz()), dz_want, tol_gate),
                    ("dτ", dtau_got, dtau_want, tol_gate), ("dW_g", down(grads.dw_g()), dwg_want, tol_gate),
                    ("db_g", down(grads.db_g()), dbg_want, tol_gate), ("dx (router)", down(grads.dx_router()), dxr_want, tol_gate),
                ] {
                    if let Err(m) = compare(what, &g, &w, tl) {
                        prop_assert!(false, "{:?} {:?}: {}", path, gate, m);
                    }
                }
            }
        }
    }

    /// The backward of `MoleLoraForward` on tensor cores (f16/bf16, d_in, d_out and r multiples of 8:
    /// the dense-gated backward's GEMMs and the router's dW_g and dx on mma.sync, dz rounded to the
    /// element type) against the CPU chain on the routing the GPU chose, within the dtype's
    /// tolerance.
    fn tc_backward_case<T: molora::cuda::CudaElement>(
        dev: &molora::cuda::Device,
        t: usize,
        shape: &LoraShape,
        seed: u64,
        renorm: bool,
    ) -> Result<(), String> {
        let s = |e: molora::Error| e.to_string();
        let (e, d_in, d_out) = (shape.num_experts, shape.d_in, shape.d_out);
        let mut rng = Rng::new(seed);
        let x: Vec<T> = rng.values(t * d_in, 1.0);
        let a: Vec<T> = rng.values(shape.a_len(), 0.2);
        let b: Vec<T> = rng.values(shape.b_len(), 0.2);
        let w_g: Vec<T> = rng.values(e * d_in, 0.3);
        let dy: Vec<T> = rng.values(t * d_out, 1.0);
        let f = |v: &[T]| v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
        let gate = Gate::TopK {
            k: 2.min(e),
            renormalize: renorm,
        };
        let dgate = DeviceGate::from_gate(&gate, e).map_err(s)?;
        let k_max = dgate.k_max(e);
        let (dx, da, db, dwg, ddy) = (
            dev.upload(&x).map_err(s)?,
            dev.upload(&a).map_err(s)?,
            dev.upload(&b).map_err(s)?,
            dev.upload(&w_g).map_err(s)?,
            dev.upload(&dy).map_err(s)?,
        );
        let router = DeviceRouter {
            w_g: dwg.slice(..).map_err(s)?,
            b_g: None,
            activation: Activation::Softmax,
            temperature: 1.3,
        };
        let mut fwd =
            MoleLoraForward::new(dev, t, shape, k_max, LoraPath::DenseGated).map_err(s)?;
        let mut y = dev.zeros::<T>(t * d_out).map_err(s)?;
        fwd.run(dev, &dx, &router, &dgate, &da, &db, 2.0, &mut y)
            .map_err(s)?;
        let mut grads = fwd.new_grads(dev).map_err(s)?;
        fwd.backward(dev, &dx, &router, &dgate, &da, &db, &ddy, 2.0, &mut grads)
            .map_err(s)?;
        let (xf, af, bf, wf, dyf) = (f(&x), f(&a), f(&b), f(&w_g), f(&dy));
        let ids = dev.download(fwd.ids()).map_err(s)?;
        let w: Vec<f32> = dev.download(fwd.weights()).map_err(s)?;
        // The CPU chain from the logits the GPU computed (its f32 sums of the same products).
        let logits = cpu::router_logits(&xf, t, d_in, &wf, None, e).map_err(s)?;
        let p = cpu::activate(&logits, t, e, Activation::Softmax, 1.3).map_err(s)?;
        let lora = backward::lora_backward(&xf, &af, &bf, shape, &ids, &w, k_max, 2.0f32, &dyf)
            .map_err(s)?;
        let (dp, _) =
            backward::gate_backward(&p, e, &ids, k_max, None, renorm, &lora.dw).map_err(s)?;
        let dz_want = backward::softmax_backward(&p, &dp, e, 1.3).map_err(s)?;
        let (dwg_want, dbg_want, dxr_want) =
            backward::router_backward(&xf, &wf, &dz_want, d_in, e).map_err(s)?;
        let got = grads.lora().to_host(dev).map_err(s)?;
        // The dtype's tolerance with its absolute part relative to each gradient's largest value (the
        // operands are rounded to the element type before f32 sums over up to 300 terms).
        let base = Tolerance::for_dtype(T::DTYPE);
        let down = |v: molora::cuda::BufferView<'_, f32>| dev.download(&v).map_err(s);
        for (what, g, w) in [
            ("dA", got.da, lora.da),
            ("dB", got.db, lora.db),
            ("dx (experts)", got.dx, lora.dx),
            ("dw", got.dw, lora.dw),
            ("dz", down(grads.dz())?, dz_want),
            ("dW_g", down(grads.dw_g())?, dwg_want),
            ("db_g", down(grads.db_g())?, dbg_want),
            ("dx (router)", down(grads.dx_router())?, dxr_want),
        ] {
            let m = w.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-3);
            let tol = Tolerance {
                atol: base.atol * m,
                rtol: base.rtol,
            };
            compare(what, &g, &w, tol)?;
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(molora::testing::cases(16)))]
        #[test]
        fn forward_backward_tensor_cores_match_cpu(t in prop_oneof![Just(1usize), Just(40), Just(300), 1usize..200],
                                                   e in 1usize..=12, r in prop_oneof![Just(8usize), Just(16)],
                                                   d_in in prop_oneof![Just(8usize), Just(64), Just(136)],
                                                   d_out in prop_oneof![Just(8usize), Just(72)], seed in any::<u64>(),
                                                   renorm in any::<bool>(), bf in any::<bool>()) {
            let Some(dev) = test_device("forward_backward_tensor_cores_match_cpu") else { return Ok(()) };
            let shape = LoraShape::new(e, r, d_in, d_out).unwrap();
            let res = if bf {
                tc_backward_case::<bf16>(&dev, t, &shape, seed, renorm)
            } else {
                tc_backward_case::<half::f16>(&dev, t, &shape, seed, renorm)
            };
            if let Err(m) = res {
                prop_assert!(false, "T {} {:?} renorm {} bf16 {}: {}", t, shape, renorm, bf, m);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(molora::testing::cases(16)))]
        /// `MoleLoraForward::run_probs` / `backward_probs` (the road of the candle op `routed_lora`:
        /// probabilities a framework computed, the gate's slots straight to the LoRA part) on both
        /// paths against the CPU: the routing equals the CPU gate's on the same probabilities, `y`
        /// equals `y0 + cpu::lora_delta`, and `dA`, `dB`, `dx`, `dp`, `dτ` equal
        /// `lora_backward` + `gate_backward`. Top-k with and without renormalisation, a per-token
        /// threshold, the dense gate.
        #[test]
        fn forward_backward_from_probabilities_match_cpu(t in 1usize..120, e in 1usize..=12, r in 1usize..=16,
                                                         d_in in 1usize..=100, d_out in 1usize..=100,
                                                         seed in any::<u64>(), which in 0usize..4) {
            let Some(dev) = test_device("forward_backward_from_probabilities_match_cpu") else { return Ok(()) };
            let mut rng = Rng::new(seed);
            let shape = LoraShape::new(e, r, d_in, d_out).unwrap();
            let x: Vec<f32> = rng.values(t * d_in, 1.0);
            let a: Vec<f32> = rng.values(shape.a_len(), 0.2);
            let b: Vec<f32> = rng.values(shape.b_len(), 0.2);
            let y0: Vec<f32> = rng.values(t * d_out, 1.0);
            let dy: Vec<f32> = rng.values(t * d_out, 1.0);
            let logits: Vec<f32> = rng.values(t * e, 3.0);
            let p = cpu::activate(&logits, t, e, Activation::Softmax, 1.0).unwrap();
            let taus: Vec<f32> = (0..t).map(|_| rng.uniform() as f32 / e as f32).collect();
            let d_taus = dev.upload(&taus).unwrap();
            let (dgate, routing, tau_in, renorm) = match which {
                0 => (DeviceGate::TopK { k: 2.min(e), renormalize: true }, cpu::top_k(&p, t, e, 2.min(e), true).unwrap(), None, true),
                1 => (DeviceGate::TopK { k: 1, renormalize: false }, cpu::top_k(&p, t, e, 1, false).unwrap(), None, false),
                2 => (DeviceGate::ThresholdPerToken(d_taus.slice(..).unwrap()), cpu::threshold_gate(&p, t, e, &taus).unwrap(), Some(taus.as_slice()), false),
                _ => (DeviceGate::Dense, cpu::dense(&p, t, e).unwrap(), None, false),
            };
            let k_max = dgate.k_max(e);
            let (dx, da, db, dp_in, ddy) = (dev.upload(&x).unwrap(), dev.upload(&a).unwrap(), dev.upload(&b).unwrap(), dev.upload(&p).unwrap(), dev.upload(&dy).unwrap());
            let experts = cpu::Experts::new(&a, &b, shape, 2.0).unwrap();
            let delta = cpu::lora_delta(&x, t, &experts, &routing).unwrap();
            let y_want: Vec<f32> = y0.iter().zip(&delta).map(|(y, d)| y + d).collect();
            let lora = backward::lora_backward(&x, &a, &b, &shape, routing.ids(), routing.weights(), k_max, 2.0f32, &dy).unwrap();
            let (dp_want, dtau_want) = backward::gate_backward(&p, e, routing.ids(), k_max, tau_in, renorm, &lora.dw).unwrap();
            let dtau_want = if tau_in.is_some() { dtau_want } else { vec![0.0; t] };
            for path in [LoraPath::Segmented, LoraPath::DenseGated] {
                if path == LoraPath::DenseGated && e * r > molora::cuda::DENSE_GATED_MAX_COLUMNS {
                    continue;
                }
                let mut fwd = MoleLoraForward::new(&dev, t, &shape, k_max, path).unwrap();
                let mut y = dev.upload(&y0).unwrap();
                fwd.run_probs(&dev, &dx, &dp_in, &dgate, &da, &db, 2.0, &mut y).unwrap();
                prop_assert_eq!(dev.download(fwd.ids()).unwrap(), routing.ids().to_vec(), "{:?}: routing ids", path);
                let mut grads = fwd.new_grads(&dev).unwrap();
                fwd.backward_probs(&dev, &dx, &dp_in, &dgate, &da, &db, &ddy, 2.0, &mut grads).unwrap();
                let got = grads.lora().to_host(&dev).unwrap();
                let tol = Tolerance::for_dtype(DType::F32).scaled((t.max(d_in).max(d_out) as f32).sqrt() * 4.0);
                let down = |v: molora::cuda::BufferView<'_, f32>| dev.download(&v).unwrap();
                for (what, g, w, tl) in [
                    ("y", dev.download(&y).unwrap(), y_want.clone(), tol),
                    ("dA", got.da, lora.da.clone(), tol), ("dB", got.db, lora.db.clone(), tol),
                    ("dx", got.dx, lora.dx.clone(), tol), ("dp", down(grads.dp()), dp_want.clone(), tol.scaled(10.0)),
                    ("dτ", down(grads.dtau()), dtau_want.clone(), tol.scaled(10.0)),
                ] {
                    if let Err(m) = compare(what, &g, &w, tl) {
                        prop_assert!(false, "{:?} gate {}: {}", path, which, m);
                    }
                }
            }
        }
    }
}
