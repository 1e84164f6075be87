//! A whole MoLE forward (router logits → fused top-k gating → dispatch → grouped shrink → fused
//! expand) captured once in a CUDA graph and replayed on new inputs: no launch depends on the
//! routing and no op synchronises with the host, so the replay must equal the CPU reference for
//! every input it is given.

#[cfg(feature = "cuda")]
mod gpu {
    use half::bf16;
    use molora::cpu::{self, Activation, BaseWeight, DenseBase, Experts};
    use molora::cuda::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    use molora::cuda::{
        dispatch, expand_experts, gating, router_logits, shrink_experts, Device, DeviceGate,
        DevicePlan,
    };
    use molora::testing::{compare, gpu_only, Tolerance};
    use molora::Rng;
    use molora::{DType, LoraShape};

    fn vals(n: usize, seed: u64, scale: f32) -> Vec<bf16> {
        Rng::new(seed).values(n, scale)
    }

    #[test]
    fn captured_forward_replays_on_new_inputs() {
        let Some(dev0) = gpu_only(
            "captured_forward_replays_on_new_inputs",
            "CUDA graph capture on a stream",
        ) else {
            return;
        };
        // Graph capture needs a stream other than the legacy default stream, and cudarc's
        // cross-stream event tracking must be off while capturing.
        let ctx = dev0.context().unwrap().clone();
        // SAFETY: every buffer of this test lives on the one stream created below, so no
        // cross-stream synchronisation is needed.
        unsafe { ctx.disable_event_tracking() };
        let dev = Device::from_stream(ctx.new_stream().expect("stream"));

        let (t, d_in, d_out, e, r, k) = (133usize, 257usize, 129usize, 8usize, 16usize, 2usize);
        let shape = LoraShape::new(e, r, d_in, d_out).unwrap();
        let a = vals(shape.a_len(), 1, 0.2);
        let b = vals(shape.b_len(), 2, 0.2);
        let w_g = vals(e * d_in, 3, 0.3);
        let scale = 2.0f32;

        let dx = dev.zeros::<bf16>(t * d_in).unwrap();
        let da = dev.upload(&a).unwrap();
        let db = dev.upload(&b).unwrap();
        let dwg = dev.upload(&w_g).unwrap();
        let mut logits = dev.zeros::<f32>(t * e).unwrap();
        let mut ids = dev.zeros::<i32>(t * k).unwrap();
        let mut w = dev.zeros::<f32>(t * k).unwrap();
        let mut plan = DevicePlan::new(&dev, t, k, e).unwrap();
        let mut h = dev.zeros::<f32>(t * k * r).unwrap();
        let mut y = dev.zeros::<bf16>(t * d_out).unwrap();
        let gate = DeviceGate::TopK {
            k,
            renormalize: true,
        };
        dev.synchronize().unwrap();

        let stream = dev.stream().unwrap().clone();
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .unwrap();
        router_logits(&dev, &dx, t, d_in, &dwg, None, e, &mut logits, None).unwrap();
        gating(
            &dev,
            &logits,
            t,
            e,
            Activation::Softmax,
            1.0,
            None,
            &gate,
            &mut ids,
            &mut w,
        )
        .unwrap();
        dispatch(&dev, &ids, &mut plan).unwrap();
        shrink_experts(&dev, &dx, &da, &shape, &plan, &mut h).unwrap();
        expand_experts(&dev, &h, &db, &shape, &plan, &ids, &w, scale, &mut y).unwrap();
        let graph = stream
            .end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH)
            .unwrap()
            .expect("a captured graph");

        let mut dx = dx;
        for round in 0..3u64 {
            let x = vals(t * d_in, 100 + round, 1.0);
            let y0 = vals(t * d_out, 200 + round, 1.0);
            dev.upload_into(&x, &mut dx).unwrap();
            dev.upload_into(&y0, &mut y).unwrap();
            graph.launch().unwrap();
            let got: Vec<f32> = dev
                .download(&y)
                .unwrap()
                .iter()
                .map(|v| v.to_f32())
                .collect();

            // The routing equals the CPU's, but where two probabilities tie within f32 rounding
            // (the logits are summed in another order); the expected y uses the kernel's routing,
            // so such a tie cannot make the comparison flaky.
            let logits_cpu = cpu::router_logits(&x, t, d_in, &w_g, None, e).unwrap();
            let probs = cpu::activate(&logits_cpu, t, e, Activation::Softmax, 1.0).unwrap();
            let want_routing = cpu::top_k(&probs, t, e, k, true).unwrap();
            let got_ids = dev.download(&ids).unwrap();
            let got_w = dev.download(&w).unwrap();
            for (i, (&g, &c)) in got_ids.iter().zip(want_routing.ids()).enumerate() {
                let row = &probs[(i / k) * e..(i / k + 1) * e];
                assert!(
                    g == c || (g >= 0 && (row[g as usize] - row[c as usize]).abs() <= 1e-5),
                    "replay {round}: slot {i}: kernel chose {g}, reference {c}"
                );
            }
            let routing = molora::Routing::new(t, k, e, got_ids, got_w).unwrap();
            let experts = Experts::new(&a, &b, shape, scale).unwrap();
            let zero = vec![bf16::ZERO; d_out * d_in];
            let base: BaseWeight<bf16> = DenseBase {
                weight: &zero,
                bias: None,
            }
            .into();
            let delta = cpu::mole_forward(&x, t, &base, &experts, &routing).unwrap();
            let want: Vec<f32> = y0
                .iter()
                .zip(&delta)
                .map(|(a, b)| a.to_f32() + b.to_f32())
                .collect();
            let tol = Tolerance::for_dtype(DType::BF16).scaled(2.0);
            if let Err(m) = compare(&format!("replay {round}"), &got, &want, tol) {
                panic!("{m}");
            }
        }
    }
}
