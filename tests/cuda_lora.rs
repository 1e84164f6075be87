//! Grouped LoRA kernels against the CPU reference: shrink/expand over expert segments (fused
//! gather/scatter), over sequence segments (SGMV), and weight-space mixing, for every dtype, odd
//! shapes (tails of every tile), skewed/empty/all-to-one routings and `-1` slots (exactly zero).

#[cfg(feature = "cuda")]
mod gpu {
    use molora::cpu;
    use molora::cuda::cudarc::driver::DeviceRepr;
    use molora::cuda::{
        add_lora, dispatch, expand_experts, expand_experts_on, expand_segments, expand_segments_on,
        lora_dense_gated, lora_dense_gated_on, mix_experts, shrink_experts, shrink_experts_on,
        shrink_segments, shrink_segments_on, staged_expand_max_columns, AddLoraWorkspace, Buffer,
        CudaElement, DenseGatedConfig, DenseGatedWorkspace, Device, DevicePlan, DeviceSegments,
        KernelPath, DENSE_GATED_MAX_COLUMNS,
    };
    use molora::testing::{compare, test_device, Tolerance};
    use molora::Rng;
    use molora::{AdapterSegments, Element, LoraShape, Routing, Segments, SeqRouting};
    use proptest::prelude::*;

    /// Uploads exactly `v` (empty when T = 0): a kernel touching one element past a buffer is then
    /// outside its allocation, where the emulator and compute-sanitizer catch it.
    fn up<T: DeviceRepr>(dev: &Device, v: &[T]) -> Buffer<T> {
        dev.upload(v).expect("upload")
    }

    /// The first `n` elements of `d` (h is allocated for every slot; only the pairs' rows hold
    /// results).
    fn down<T: DeviceRepr>(dev: &Device, d: &Buffer<T>, n: usize) -> Vec<T> {
        let mut v = dev.download(d).expect("download");
        assert!(n <= v.len(), "downloading {n} of {} elements", v.len());
        v.truncate(n);
        v
    }

    fn f32s<T: Element>(v: &[T]) -> Vec<f32> {
        v.iter().map(|x| x.to_f32()).collect()
    }

    #[derive(Debug, Clone)]
    struct Case {
        t: usize,
        k_max: usize,
        e: usize,
        r: usize,
        d_in: usize,
        d_out: usize,
        seed: u64,
        skew: f64,
        empty: f64,
    }

    fn case() -> impl Strategy<Value = Case> {
        (
            prop_oneof![Just(0usize), Just(1), Just(7), Just(133), 0usize..300],
            1usize..=4,
            1usize..=64,
            prop_oneof![1usize..=8, Just(16), Just(64), Just(65), 1usize..=256],
            prop_oneof![1usize..=40, Just(64), 100usize..=300],
            prop_oneof![1usize..=40, Just(257), 100usize..=300],
            any::<u64>(),
            prop_oneof![Just(0.0f64), Just(0.9), Just(1.0)],
            prop_oneof![Just(0.0f64), Just(0.3), Just(1.0)],
        )
            .prop_map(|(t, k_max, e, r, d_in, d_out, seed, skew, empty)| Case {
                t,
                k_max,
                e,
                r,
                d_in,
                d_out,
                seed,
                skew,
                empty,
            })
    }

    fn routing(c: &Case, rng: &mut Rng) -> Routing {
        let n = c.t * c.k_max;
        let mut ids = Vec::with_capacity(n);
        let mut w = Vec::with_capacity(n);
        for _ in 0..n {
            if rng.uniform() < c.empty {
                ids.push(-1);
                w.push(f32::NAN); // an empty slot's weight must not matter
            } else {
                let e = if rng.uniform() < c.skew {
                    0
                } else {
                    (rng.uniform() * c.e as f64) as i32 % c.e as i32
                };
                ids.push(e);
                w.push(rng.uniform() as f32);
            }
        }
        Routing::new(c.t, c.k_max, c.e, ids, w).expect("valid routing")
    }

    /// The expert-segment shrink + expand on the GPU equals the CPU's, and equals it bit for bit on
    /// the rows of tokens whose slots are all empty.
    fn experts_case<T: CudaElement>(dev: &Device, c: &Case) -> Result<(), String> {
        let mut rng = Rng::new(c.seed);
        let shape = LoraShape::new(c.e, c.r, c.d_in, c.d_out).map_err(|e| e.to_string())?;
        let x: Vec<T> = rng.values(c.t * c.d_in, 1.0);
        let a: Vec<T> = rng.values(shape.a_len(), 0.3);
        let b: Vec<T> = rng.values(shape.b_len(), 0.3);
        let y0: Vec<T> = rng.values(c.t * c.d_out, 1.0);
        let r = routing(c, &mut rng);
        let scale = 1.7f32;

        let plan = cpu::dispatch(&r).map_err(|e| e.to_string())?;
        let h_want = cpu::shrink_experts(&x, &a, &shape, &plan).map_err(|e| e.to_string())?;
        let mut y_want = y0.clone();
        cpu::expand_experts(&h_want, &b, &shape, &plan, &r, scale, &mut y_want)
            .map_err(|e| e.to_string())?;

        let slots = c.t * c.k_max;
        let (dx, da, db) = (up(dev, &x), up(dev, &a), up(dev, &b));
        let dids = up(dev, r.ids());
        let dw = up(dev, r.weights());
        let mut dy = up(dev, &y0);
        let mut dh = up(dev, &vec![0.0f32; slots * c.r]);
        let mut dplan = DevicePlan::new(dev, c.t, c.k_max, c.e).map_err(|e| e.to_string())?;
        dispatch(dev, &dids, &mut dplan).map_err(|e| e.to_string())?;
        shrink_experts(dev, &dx, &da, &shape, &dplan, &mut dh).map_err(|e| e.to_string())?;
        expand_experts(dev, &dh, &db, &shape, &dplan, &dids, &dw, scale, &mut dy)
            .map_err(|e| e.to_string())?;
        let pairs = plan.num_pairs();
        let h_got = down(dev, &dh, pairs * c.r);
        let y_got = down(dev, &dy, y0.len());
        let tol = Tolerance::for_dtype(T::DTYPE).scaled(((c.d_in.max(c.r)) as f32).sqrt());
        compare("h (sorted rows)", &h_got, &h_want, tol)?;
        compare("y", &f32s(&y_got), &f32s(&y_want), tol)?;
        // The dense-gated path (no dispatch) gives the same y, when E·r fits it.
        if c.e * c.r <= DENSE_GATED_MAX_COLUMNS {
            let mut dy2 = up(dev, &y0);
            let mut ws = DenseGatedWorkspace::new(dev, c.t, &shape).map_err(|e| e.to_string())?;
            lora_dense_gated(
                dev, &dx, &da, &db, &shape, &dids, &dw, c.k_max, scale, &mut ws, &mut dy2,
            )
            .map_err(|e| e.to_string())?;
            compare(
                "y (dense-gated)",
                &f32s(&down(dev, &dy2, y0.len())),
                &f32s(&y_want),
                tol,
            )?;
        }
        for t in 0..c.t {
            if (0..c.k_max).all(|s| r.id(t, s) < 0) {
                let row = t * c.d_out..(t + 1) * c.d_out;
                if y_got[row.clone()] != y0[row] {
                    return Err(format!(
                        "token {t} has only empty slots but its row changed"
                    ));
                }
            }
        }
        Ok(())
    }

    /// SGMV shrink/expand and weight-space mixing against the CPU.
    fn segments_case<T: CudaElement>(dev: &Device, c: &Case) -> Result<(), String> {
        let mut rng = Rng::new(c.seed ^ 0x5eed);
        let shape = LoraShape::new(c.e, c.r, c.d_in, c.d_out).map_err(|e| e.to_string())?;
        // Up to 5 sequences, some empty, one with no adapter.
        let mut lens = vec![];
        let mut left = c.t;
        while left > 0 && lens.len() < 4 {
            let l = ((rng.uniform() * (left + 1) as f64) as usize).min(left);
            lens.push(l);
            left -= l;
        }
        lens.push(left);
        let segs = Segments::from_lengths(&lens).map_err(|e| e.to_string())?;
        let adapter_ids: Vec<i32> = (0..lens.len())
            .map(|i| {
                if i == 1 {
                    -1
                } else {
                    (rng.uniform() * c.e as f64) as i32 % c.e as i32
                }
            })
            .collect();
        let asegs =
            AdapterSegments::new(segs.clone(), c.e, adapter_ids).map_err(|e| e.to_string())?;
        let x: Vec<T> = rng.values(c.t * c.d_in, 1.0);
        let a: Vec<T> = rng.values(shape.a_len(), 0.3);
        let b: Vec<T> = rng.values(shape.b_len(), 0.3);
        let y0: Vec<T> = rng.values(c.t * c.d_out, 1.0);
        let h_want = cpu::shrink_segments(&x, &a, &shape, &asegs).map_err(|e| e.to_string())?;
        let mut y_want = y0.clone();
        cpu::expand_segments(&h_want, &b, &shape, &asegs, 0.5, &mut y_want)
            .map_err(|e| e.to_string())?;

        let (dx, da, db) = (up(dev, &x), up(dev, &a), up(dev, &b));
        let mut dy = up(dev, &y0);
        let mut dh = up(dev, &vec![0.0f32; c.t * c.r]);
        let dsegs = DeviceSegments::new(dev, &asegs).map_err(|e| e.to_string())?;
        shrink_segments(dev, &dx, &da, &shape, &dsegs, &mut dh).map_err(|e| e.to_string())?;
        expand_segments(dev, &dh, &db, &shape, &dsegs, 0.5, &mut dy).map_err(|e| e.to_string())?;
        let tol = Tolerance::for_dtype(T::DTYPE).scaled(((c.d_in.max(c.r)) as f32).sqrt());
        compare("h (segments)", &down(dev, &dh, c.t * c.r), &h_want, tol)?;
        let y_got = down(dev, &dy, y0.len());
        compare("y (segments)", &f32s(&y_got), &f32s(&y_want), tol)?;
        // Sequence 1 (where there is one: T = 0 gives a single empty sequence) has no adapter.
        if segs.num_segments() > 1 {
            let no_adapter = segs.range(1);
            let rows = no_adapter.start * c.d_out..no_adapter.end * c.d_out;
            if y_got[rows.clone()] != y0[rows] {
                return Err("rows of the segment without adapter changed".into());
            }
        }

        // Weight-space mixing with these sequences.
        let s = lens.len();
        let probs: Vec<f32> = (0..s * c.e).map(|_| rng.uniform() as f32).collect();
        let seq = SeqRouting::new(segs, c.e, probs.clone()).map_err(|e| e.to_string())?;
        let (am_want, bm_want) =
            cpu::mix_experts(&a, &b, &shape, &seq).map_err(|e| e.to_string())?;
        let dp = up(dev, &probs);
        let mut dam = up(dev, &vec![T::default(); s * c.r * c.d_in]);
        let mut dbm = up(dev, &vec![T::default(); s * c.d_out * c.r]);
        mix_experts(dev, &da, &db, &shape, &dp, s, &mut dam, &mut dbm)
            .map_err(|e| e.to_string())?;
        let tol = Tolerance::for_dtype(T::DTYPE).scaled((c.e as f32).sqrt());
        compare(
            "mixed A",
            &f32s(&down(dev, &dam, am_want.len())),
            &f32s(&am_want),
            tol,
        )?;
        compare(
            "mixed B",
            &f32s(&down(dev, &dbm, bm_want.len())),
            &f32s(&bm_want),
            tol,
        )
    }

    /// Uploads `v` after `offset` padding elements, so its view starts `offset·sizeof(T)` bytes past
    /// the (256-byte aligned) allocation: 0 keeps it 16-byte aligned, 1 misaligns it. The one
    /// deliberate view into a larger buffer in these tests (the padding is in front, so the view
    /// still ends where the allocation does).
    fn up_at<T: DeviceRepr + Default + Clone>(dev: &Device, v: &[T], offset: usize) -> Buffer<T> {
        let mut p = vec![T::default(); offset];
        p.extend_from_slice(v);
        dev.upload(&p).expect("upload")
    }

    /// Whether the call must be refused: the variant's element-type, shape or alignment condition.
    fn refused<T: CudaElement>(
        path: KernelPath,
        shrink: bool,
        dim: usize,
        columns: usize,
        misaligned: bool,
    ) -> bool {
        match path {
            KernelPath::Auto | KernelPath::Plain => false,
            KernelPath::Vectorized => dim % (16 / std::mem::size_of::<T>()) != 0 || misaligned,
            KernelPath::TensorCore => !shrink || T::DTYPE == molora::DType::F32,
            KernelPath::Rows => !shrink,
            KernelPath::Staged => {
                shrink || columns > staged_expand_max_columns(std::mem::size_of::<T>())
            }
        }
    }

    /// Every kernel variant of the shrink and the expand (over expert segments and over sequence
    /// segments) against the CPU reference, or refused with `Error::Unsupported` exactly when the
    /// variant cannot take the call. With `misalign`, x, A and B start 1 element past an aligned
    /// address.
    fn paths_case<T: CudaElement>(dev: &Device, c: &Case, misalign: bool) -> Result<(), String> {
        let s = |e: molora::Error| e.to_string();
        let mut rng = Rng::new(c.seed ^ 0xa7);
        let shape = LoraShape::new(c.e, c.r, c.d_in, c.d_out).map_err(s)?;
        let x: Vec<T> = rng.values(c.t * c.d_in, 1.0);
        let a: Vec<T> = rng.values(shape.a_len(), 0.3);
        let b: Vec<T> = rng.values(shape.b_len(), 0.3);
        let y0: Vec<T> = rng.values(c.t * c.d_out, 1.0);
        let r = routing(c, &mut rng);
        let plan = cpu::dispatch(&r).map_err(s)?;
        let h_want = cpu::shrink_experts(&x, &a, &shape, &plan).map_err(s)?;
        let mut y_want = y0.clone();
        cpu::expand_experts(&h_want, &b, &shape, &plan, &r, 1.3, &mut y_want).map_err(s)?;
        let asegs = AdapterSegments::new(
            Segments::from_lengths(&[c.t / 3, c.t - c.t / 3]).map_err(s)?,
            c.e,
            vec![(c.e - 1) as i32, 0],
        )
        .map_err(s)?;
        let hs_want = cpu::shrink_segments(&x, &a, &shape, &asegs).map_err(s)?;
        let mut ys_want = y0.clone();
        cpu::expand_segments(&hs_want, &b, &shape, &asegs, 0.7, &mut ys_want).map_err(s)?;

        let off = usize::from(misalign);
        // An empty call reads no buffer, so only the element-type and shape conditions apply.
        let misaligned = misalign && c.t > 0;
        let (dx, da, db) = (
            up_at(dev, &x, off),
            up_at(dev, &a, off),
            up_at(dev, &b, off),
        );
        let (xv, av, bv) = (
            dx.slice(off..off + x.len()).unwrap(),
            da.slice(off..off + a.len()).unwrap(),
            db.slice(off..off + b.len()).unwrap(),
        );
        let slots = c.t * c.k_max;
        let (dids, dw) = (up(dev, r.ids()), up(dev, r.weights()));
        let mut dplan = DevicePlan::new(dev, c.t, c.k_max, c.e).map_err(s)?;
        dispatch(dev, &dids, &mut dplan).map_err(s)?;
        let dsegs = DeviceSegments::new(dev, &asegs).map_err(s)?;
        let tol = Tolerance::for_dtype(T::DTYPE).scaled(((c.d_in.max(c.r)) as f32).sqrt());
        let check = |what: &str, res: molora::Result<()>, refuse: bool| -> Result<bool, String> {
            match (res, refuse) {
                (Ok(()), false) => Ok(true),
                (Err(molora::Error::Unsupported { .. }), true) => Ok(false),
                (Ok(()), true) => Err(format!("{what}: ran a variant that must be refused")),
                (Err(e), _) => Err(format!("{what}: {e}")),
            }
        };
        for path in KernelPath::ALL {
            let what = format!("{path:?}");
            // Shrink over expert segments (h compared on the pairs) and over sequence segments.
            let mut dh = up(dev, &vec![0.0f32; slots * c.r]);
            let refuse = refused::<T>(path, true, c.d_in, c.e * c.r, misaligned);
            if check(
                &format!("shrink_experts {what}"),
                shrink_experts_on(dev, &xv, &av, &shape, &dplan, &mut dh, path),
                refuse,
            )? {
                compare(
                    &format!("h ({what})"),
                    &down(dev, &dh, plan.num_pairs() * c.r),
                    &h_want,
                    tol,
                )?;
            }
            let mut dhs = up(dev, &vec![0.0f32; c.t * c.r]);
            if check(
                &format!("shrink_segments {what}"),
                shrink_segments_on(dev, &xv, &av, &shape, &dsegs, &mut dhs, path),
                refuse,
            )? {
                compare(
                    &format!("h segments ({what})"),
                    &down(dev, &dhs, c.t * c.r),
                    &hs_want,
                    tol,
                )?;
            }
            // Expand from the CPU's h, so each variant is checked on its own.
            let refuse = refused::<T>(path, false, c.r, c.e * c.r, misaligned);
            let mut h_full = h_want.clone();
            h_full.resize(slots * c.r, f32::NAN); // rows past the pairs must not be read
            let dh = up(dev, &h_full);
            let mut dy = up(dev, &y0);
            if check(
                &format!("expand_experts {what}"),
                expand_experts_on(
                    dev, &dh, &bv, &shape, &dplan, &dids, &dw, 1.3, &mut dy, path,
                ),
                refuse,
            )? {
                compare(
                    &format!("y ({what})"),
                    &f32s(&down(dev, &dy, y0.len())),
                    &f32s(&y_want),
                    tol,
                )?;
            }
            let dhs = up(dev, &hs_want);
            let mut dys = up(dev, &y0);
            if check(
                &format!("expand_segments {what}"),
                expand_segments_on(dev, &dhs, &bv, &shape, &dsegs, 0.7, &mut dys, path),
                refuse,
            )? {
                compare(
                    &format!("y segments ({what})"),
                    &f32s(&down(dev, &dys, y0.len())),
                    &f32s(&ys_want),
                    tol,
                )?;
            }
        }
        Ok(())
    }

    fn paths_cases() -> impl Strategy<Value = (Case, bool)> {
        // d_in and r multiples of 8 (every dtype's vector width) as often as odd ones, so both the
        // vectorised kernels and their refusal are covered; T with tails of the 32-row tiles.
        (
            case(),
            prop_oneof![
                Just(8usize),
                Just(16),
                Just(64),
                Just(72),
                Just(264),
                1usize..=300
            ],
            prop_oneof![
                Just(8usize),
                Just(16),
                Just(24),
                Just(64),
                Just(128),
                Just(256),
                1usize..=70
            ],
            any::<bool>(),
        )
            .prop_map(|(mut c, d_in, r, misalign)| {
                c.d_in = d_in;
                c.r = r;
                c.e = c.e.min(8);
                c.t = c.t.min(200);
                (c, misalign)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(molora::testing::cases(24)))]
        #[test]
        fn every_kernel_path_matches_cpu((c, misalign) in paths_cases()) {
            let Some(dev) = test_device("every_kernel_path_matches_cpu") else { return Ok(()) };
            for (dtype, result) in [
                ("f32", paths_case::<f32>(&dev, &c, misalign)),
                ("f16", paths_case::<half::f16>(&dev, &c, misalign)),
                ("bf16", paths_case::<half::bf16>(&dev, &c, misalign)),
            ] {
                if let Err(msg) = result {
                    prop_assert!(false, "{dtype}, misaligned {misalign}: {msg} ({c:?})");
                }
            }
        }
    }

    /// The tensor-core dense-gated kernels (K1 shrink with the gate in its epilogue, split over
    /// `d_in` `splits` ways; K2 expand on mma) against the CPU: `h` (f32, ungated) and `y`; two runs
    /// on one workspace give the same bits (the split-K tickets reset themselves); tokens with only
    /// empty slots keep their row bit for bit.
    fn dense_gated_tc_case<T: CudaElement>(
        dev: &Device,
        c: &Case,
        splits: usize,
        two_term_h: bool,
    ) -> Result<(), String> {
        let mut rng = Rng::new(c.seed ^ 0x7c);
        let shape = LoraShape::new(c.e, c.r, c.d_in, c.d_out).map_err(|e| e.to_string())?;
        let x: Vec<T> = rng.values(c.t * c.d_in, 1.0);
        let a: Vec<T> = rng.values(shape.a_len(), 0.3);
        let b: Vec<T> = rng.values(shape.b_len(), 0.3);
        let y0: Vec<T> = rng.values(c.t * c.d_out, 1.0);
        let r = routing(c, &mut rng);
        let scale = 0.9f32;
        let plan = cpu::dispatch(&r).map_err(|e| e.to_string())?;
        let h_sorted = cpu::shrink_experts(&x, &a, &shape, &plan).map_err(|e| e.to_string())?;
        let mut y_want = y0.clone();
        cpu::expand_experts(&h_sorted, &b, &shape, &plan, &r, scale, &mut y_want)
            .map_err(|e| e.to_string())?;
        // Every expert's shrink of every token: h[t, e·r + j] = Σ_i x[t, i]·A[e, j, i].
        let n = c.e * c.r;
        let mut h_want = vec![0.0f32; c.t * n];
        for t in 0..c.t {
            for col in 0..n {
                h_want[t * n + col] = (0..c.d_in)
                    .map(|i| x[t * c.d_in + i].to_f32() * a[col * c.d_in + i].to_f32())
                    .sum();
            }
        }
        let (dx, da, db) = (up(dev, &x), up(dev, &a), up(dev, &b));
        let dids = up(dev, r.ids());
        let dw = up(dev, r.weights());
        let config = DenseGatedConfig { splits, two_term_h };
        let mut ws = DenseGatedWorkspace::with_config(dev, c.t, &shape, config)
            .map_err(|e| e.to_string())?;
        let mut runs = vec![];
        for _ in 0..2 {
            let mut dy = up(dev, &y0);
            lora_dense_gated_on(
                dev,
                &dx,
                &da,
                &db,
                &shape,
                &dids,
                &dw,
                c.k_max,
                scale,
                &mut ws,
                &mut dy,
                KernelPath::TensorCore,
            )
            .map_err(|e| e.to_string())?;
            runs.push(down(dev, &dy, y0.len()));
        }
        if f32s(&runs[0]) != f32s(&runs[1]) {
            return Err("two runs on one workspace differ".into());
        }
        let h_got = dev
            .download(&ws.h().map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
        let tol = Tolerance::for_dtype(T::DTYPE).scaled(((c.d_in.max(c.r)) as f32).sqrt());
        compare("h (every expert)", &h_got, &h_want, tol)?;
        compare(
            "y (tensor-core dense-gated)",
            &f32s(&runs[0]),
            &f32s(&y_want),
            tol,
        )?;
        for t in 0..c.t {
            if (0..c.k_max).all(|s| r.id(t, s) < 0) {
                let row = t * c.d_out..(t + 1) * c.d_out;
                if f32s(&runs[0][row.clone()]) != f32s(&y0[row]) {
                    return Err(format!(
                        "token {t} has only empty slots but its row changed"
                    ));
                }
            }
        }
        Ok(())
    }

    fn dense_gated_tc_cases() -> impl Strategy<Value = (Case, usize, bool)> {
        // d_in and r multiples of 8 (the kernels' contract), T and d_out with tails of the 64- and
        // 128-row tiles, E·r up to 512 (both shrink tile widths, several column tiles), split-K
        // from none to one k-step per split.
        (
            case(),
            prop_oneof![Just(8usize), Just(40), Just(64), Just(136), Just(264)],
            prop_oneof![Just(8usize), Just(16), Just(24), Just(64)],
            prop_oneof![
                Just(1usize),
                Just(63),
                Just(64),
                Just(65),
                Just(129),
                0usize..=200
            ],
            prop_oneof![Just(1usize), Just(2), Just(3), Just(64)],
            any::<bool>(),
        )
            .prop_map(|(mut c, d_in, r, t, splits, two_term_h)| {
                c.d_in = d_in;
                c.r = r;
                c.e = c.e.min(512 / r);
                c.t = t;
                (c, splits.min(d_in.div_ceil(32)), two_term_h)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(molora::testing::cases(24)))]
        #[test]
        fn dense_gated_tensor_core_matches_cpu((c, splits, two) in dense_gated_tc_cases()) {
            let Some(dev) = test_device("dense_gated_tensor_core_matches_cpu") else { return Ok(()) };
            for (dtype, result) in [
                ("f16", dense_gated_tc_case::<half::f16>(&dev, &c, splits, two)),
                ("bf16", dense_gated_tc_case::<half::bf16>(&dev, &c, splits, two)),
            ] {
                if let Err(msg) = result {
                    prop_assert!(false, "{dtype}, splits {splits}, two-term h {two}: {msg} ({c:?})");
                }
            }
        }
    }

    /// Precision of the tensor-core dense-gated path, whose expand multiplies `hg = g ⊙ h` rounded
    /// once to the element type, against the CUDA-core path (f32 `h` between shrink and expand),
    /// both measured against an f64 reference on the same inputs, at the output (rounded to the
    /// element type as every path rounds it). Printed with `--nocapture`; the tensor-core error must
    /// stay within twice the CUDA-core path's plus the output rounding's.
    fn precision_drift<T: CudaElement>(dev: &Device) -> Result<String, String> {
        let (t, e, r, d_in, d_out, k) = (96usize, 8usize, 16usize, 1024usize, 256usize, 2usize);
        let mut rng = Rng::new(0xd41f7);
        let shape = LoraShape::new(e, r, d_in, d_out).map_err(|e| e.to_string())?;
        let x: Vec<T> = rng.values(t * d_in, 1.0);
        let a: Vec<T> = rng.values(shape.a_len(), 0.05);
        let b: Vec<T> = rng.values(shape.b_len(), 0.05);
        let mut ids = vec![];
        let mut w = vec![];
        for _ in 0..t {
            let e0 = rng.below(e);
            ids.extend([e0 as i32, ((e0 + 1 + rng.below(e - 1)) % e) as i32]);
            let p = rng.uniform() as f32;
            w.extend([p, 1.0 - p]);
        }
        let scale = 2.0f32;
        // f64 reference of the delta (y starts at zero).
        let mut want = vec![0.0f64; t * d_out];
        for tok in 0..t {
            for s in 0..k {
                let ex = ids[tok * k + s] as usize;
                let h: Vec<f64> = (0..r)
                    .map(|j| {
                        (0..d_in)
                            .map(|i| {
                                x[tok * d_in + i].to_f32() as f64
                                    * a[(ex * r + j) * d_in + i].to_f32() as f64
                            })
                            .sum()
                    })
                    .collect();
                for o in 0..d_out {
                    let d: f64 = (0..r)
                        .map(|j| h[j] * b[(ex * d_out + o) * r + j].to_f32() as f64)
                        .sum();
                    want[tok * d_out + o] += scale as f64 * w[tok * k + s] as f64 * d;
                }
            }
        }
        let rms = |got: &[f64]| -> f64 {
            let num: f64 = got.iter().zip(&want).map(|(g, w)| (g - w) * (g - w)).sum();
            let den: f64 = want.iter().map(|w| w * w).sum();
            (num / den).sqrt()
        };
        let rounded: Vec<f64> = want
            .iter()
            .map(|&v| T::from_f32(v as f32).to_f32() as f64)
            .collect();
        let (dx, da, db) = (up(dev, &x), up(dev, &a), up(dev, &b));
        let (dids, dw) = (up(dev, &ids), up(dev, &w));
        let mut errs = vec![];
        for (path, two_term_h) in [
            (KernelPath::TensorCore, false),
            (KernelPath::TensorCore, true),
            (KernelPath::Staged, false),
        ] {
            let config = DenseGatedConfig {
                two_term_h,
                ..DenseGatedConfig::for_shape(dev, t, &shape)
            };
            let mut ws = DenseGatedWorkspace::with_config(dev, t, &shape, config)
                .map_err(|e| e.to_string())?;
            let mut dy = up(dev, &vec![T::from_f32(0.0); t * d_out]);
            lora_dense_gated_on(
                dev, &dx, &da, &db, &shape, &dids, &dw, k, scale, &mut ws, &mut dy, path,
            )
            .map_err(|e| e.to_string())?;
            let got: Vec<f64> = down(dev, &dy, t * d_out)
                .iter()
                .map(|v| v.to_f32() as f64)
                .collect();
            errs.push(rms(&got));
        }
        let out = rms(&rounded);
        let line = format!(
            "{:?}: relative RMS error against f64 — tensor-core, g⊙h rounded once {:.3e}; tensor-core, g⊙h in two terms {:.3e}; CUDA-core (f32 h) {:.3e}; output rounding alone {:.3e}",
            T::DTYPE, errs[0], errs[1], errs[2], out
        );
        if errs[0] > 2.0 * errs[2] + out || errs[1] > 1.05 * errs[2] + 0.05 * out {
            return Err(line);
        }
        Ok(line)
    }

    #[test]
    fn dense_gated_tensor_core_precision() {
        let Some(dev) = test_device("dense_gated_tensor_core_precision") else {
            return;
        };
        for r in [
            precision_drift::<half::bf16>(&dev),
            precision_drift::<half::f16>(&dev),
        ] {
            match r {
                Ok(line) => println!("{line}"),
                Err(line) => panic!("drift over the bound: {line}"),
            }
        }
    }

    /// The tensor-core dense-gated path refuses what it cannot take, naming it, before any launch.
    #[test]
    fn dense_gated_tensor_core_refusals() {
        let Some(dev) = test_device("dense_gated_tensor_core_refusals") else {
            return;
        };
        let run = |e: usize, r: usize, d_in: usize, f32_inputs: bool| -> String {
            let shape = LoraShape::new(e, r, d_in, 16).expect("shape");
            let mut ws = DenseGatedWorkspace::new(&dev, 4, &shape).expect("workspace");
            let ids = up(&dev, &[0i32; 4]);
            let w = up(&dev, &[1.0f32; 4]);
            let res = if f32_inputs {
                let x = up(&dev, &vec![0.0f32; 4 * d_in]);
                let a = up(&dev, &vec![0.0f32; shape.a_len()]);
                let b = up(&dev, &vec![0.0f32; shape.b_len()]);
                let mut y = up(&dev, &[0.0f32; 64]);
                lora_dense_gated_on(
                    &dev,
                    &x,
                    &a,
                    &b,
                    &shape,
                    &ids,
                    &w,
                    1,
                    1.0,
                    &mut ws,
                    &mut y,
                    KernelPath::TensorCore,
                )
            } else {
                let x = up(&dev, &vec![half::bf16::ZERO; 4 * d_in]);
                let a = up(&dev, &vec![half::bf16::ZERO; shape.a_len()]);
                let b = up(&dev, &vec![half::bf16::ZERO; shape.b_len()]);
                let mut y = up(&dev, &[half::bf16::ZERO; 64]);
                lora_dense_gated_on(
                    &dev,
                    &x,
                    &a,
                    &b,
                    &shape,
                    &ids,
                    &w,
                    1,
                    1.0,
                    &mut ws,
                    &mut y,
                    KernelPath::TensorCore,
                )
            };
            match res {
                Ok(()) => "ok".into(),
                Err(e) => e.to_string(),
            }
        };
        let msg = run(2, 8, 16, true);
        assert!(msg.contains("F32"), "{msg}");
        let msg = run(2, 8, 12, false);
        assert!(msg.contains("d_in = 12"), "{msg}");
        let msg = run(2, 6, 16, false);
        assert!(msg.contains("r = 6"), "{msg}");
        assert_eq!(run(2, 8, 16, false), "ok");
        let shape = LoraShape::new(2, 8, 64, 16).expect("shape");
        let config = DenseGatedConfig {
            splits: 3,
            two_term_h: false,
        };
        let err = DenseGatedWorkspace::with_config(&dev, 4, &shape, config)
            .expect_err("3 splits of 2 k-steps");
        assert!(err.to_string().contains("splits"), "{err}");
    }

    /// punica's add_lora on the device (one adapter per token, `-1` adds nothing, into a
    /// column slice of a wider `y`) equals `cpu::ops::add_lora`, and leaves every other column and
    /// every row without an adapter bit for bit unchanged.
    fn add_lora_case<T: CudaElement>(dev: &Device, c: &Case) -> Result<(), String> {
        let mut rng = Rng::new(c.seed ^ 0xadd);
        let shape = LoraShape::new(c.e, c.r, c.d_in, c.d_out).map_err(|e| e.to_string())?;
        let x: Vec<T> = rng.values(c.t * c.d_in, 1.0);
        let a: Vec<T> = rng.values(shape.a_len(), 0.3);
        let b: Vec<T> = rng.values(shape.b_len(), 0.3);
        // y is a packed output: d_out columns at an odd offset inside rows of d_out + 5 + offset.
        let y_offset = 1 + c.seed as usize % 3;
        let y_stride = c.d_out + y_offset + 5;
        let y0: Vec<T> = rng.values(c.t * y_stride, 1.0);
        let indices: Vec<i32> = (0..c.t)
            .map(|_| {
                if rng.uniform() < c.empty {
                    -1
                } else if rng.uniform() < c.skew {
                    0
                } else {
                    (rng.uniform() * c.e as f64) as i32 % c.e as i32
                }
            })
            .collect();
        let mut y_want = y0.clone();
        cpu::ops::add_lora(
            &mut y_want,
            y_stride,
            y_offset,
            &x,
            &a,
            &b,
            &indices,
            &shape,
            0.75,
        )
        .map_err(|e| e.to_string())?;
        let mut dy = up(dev, &y0);
        if c.t > 0 {
            let mut ws = AddLoraWorkspace::new(dev, c.t, &shape).map_err(|e| e.to_string())?;
            let (dx, da, db, di) = (up(dev, &x), up(dev, &a), up(dev, &b), up(dev, &indices));
            add_lora(
                dev, &dx, &da, &db, &di, &shape, 0.75, &mut ws, &mut dy, y_stride, y_offset,
            )
            .map_err(|e| e.to_string())?;
        }
        let y_got = down(dev, &dy, y0.len());
        let tol = Tolerance::for_dtype(T::DTYPE).scaled(((c.d_in.max(c.r)) as f32).sqrt());
        compare("y (add_lora)", &f32s(&y_got), &f32s(&y_want), tol)?;
        for (t, &index) in indices.iter().enumerate() {
            for col in 0..y_stride {
                let i = t * y_stride + col;
                let inside = (y_offset..y_offset + c.d_out).contains(&col) && index >= 0;
                if !inside && y_got[i] != y0[i] {
                    return Err(format!(
                        "y[{t}, {col}] outside the adapter's columns changed"
                    ));
                }
            }
        }
        Ok(())
    }

    #[test]
    fn add_lora_rejects_bad_input() {
        let Some(dev) = test_device("add_lora_rejects_bad_input") else {
            return;
        };
        let shape = LoraShape::new(3, 2, 4, 5).unwrap();
        let mut ws = AddLoraWorkspace::new(&dev, 2, &shape).unwrap();
        let (x, a, b) = (
            dev.zeros::<f32>(8).unwrap(),
            dev.zeros::<f32>(shape.a_len()).unwrap(),
            dev.zeros::<f32>(shape.b_len()).unwrap(),
        );
        let idx = dev.zeros::<i32>(2).unwrap();
        let mut y = dev.zeros::<f32>(2 * 7).unwrap();
        let e = add_lora(&dev, &x, &a, &b, &idx, &shape, 1.0, &mut ws, &mut y, 7, 3).unwrap_err();
        assert!(e.to_string().contains("columns 3..3+5"), "{e}");
        let e = add_lora(&dev, &x, &a, &b, &idx, &shape, 1.0, &mut ws, &mut y, 6, 0).unwrap_err();
        assert!(
            matches!(
                e,
                molora::Error::LengthMismatch {
                    expected: 12,
                    got: 14,
                    ..
                }
            ),
            "{e}"
        );
        let short = dev.zeros::<i32>(1).unwrap();
        let e = add_lora(&dev, &x, &a, &b, &short, &shape, 1.0, &mut ws, &mut y, 7, 2).unwrap_err();
        assert!(
            matches!(
                e,
                molora::Error::LengthMismatch {
                    expected: 2,
                    got: 1,
                    ..
                }
            ),
            "{e}"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(molora::testing::cases(24)))]
        #[test]
        fn grouped_lora_matches_cpu(c in case()) {
            let Some(dev) = test_device("grouped_lora_matches_cpu") else { return Ok(()) };
            for (dtype, result) in [
                ("f32", experts_case::<f32>(&dev, &c)),
                ("f16", experts_case::<half::f16>(&dev, &c)),
                ("bf16", experts_case::<half::bf16>(&dev, &c)),
            ] {
                if let Err(msg) = result {
                    prop_assert!(false, "{dtype}: {msg} ({c:?})");
                }
            }
        }

        #[test]
        fn add_lora_matches_cpu(c in case()) {
            let Some(dev) = test_device("add_lora_matches_cpu") else { return Ok(()) };
            for (dtype, result) in [
                ("f32", add_lora_case::<f32>(&dev, &c)),
                ("f16", add_lora_case::<half::f16>(&dev, &c)),
                ("bf16", add_lora_case::<half::bf16>(&dev, &c)),
            ] {
                if let Err(msg) = result {
                    prop_assert!(false, "{dtype}: {msg} ({c:?})");
                }
            }
        }

        #[test]
        fn segmented_lora_and_mixing_match_cpu(c in case()) {
            let Some(dev) = test_device("segmented_lora_and_mixing_match_cpu") else { return Ok(()) };
            for (dtype, result) in [
                ("f32", segments_case::<f32>(&dev, &c)),
                ("f16", segments_case::<half::f16>(&dev, &c)),
                ("bf16", segments_case::<half::bf16>(&dev, &c)),
            ] {
                if let Err(msg) = result {
                    prop_assert!(false, "{dtype}: {msg} ({c:?})");
                }
            }
        }
    }

    #[test]
    fn grouped_lora_rejects_bad_input() {
        let Some(dev) = test_device("grouped_lora_rejects_bad_input") else {
            return;
        };
        let shape = LoraShape::new(4, 8, 16, 12).unwrap();
        let plan = DevicePlan::new(&dev, 3, 2, 4).unwrap();
        let x = dev.zeros::<f32>(3 * 16).unwrap();
        let a = dev.zeros::<f32>(shape.a_len()).unwrap();
        let mut h = dev.zeros::<f32>(3 * 2 * 8).unwrap();
        let wrong = LoraShape::new(5, 8, 16, 12).unwrap();
        assert!(matches!(
            shrink_experts(&dev, &x, &a, &wrong, &plan, &mut h),
            Err(molora::Error::LengthMismatch {
                expected: 5,
                got: 4,
                ..
            })
        ));
        let short = dev.zeros::<f32>(3 * 16 - 1).unwrap();
        assert!(matches!(
            shrink_experts(&dev, &short, &a, &shape, &plan, &mut h),
            Err(molora::Error::LengthMismatch {
                what: "x [T, d_in]",
                ..
            })
        ));
        let b = dev.zeros::<f32>(shape.b_len()).unwrap();
        let ids = dev.zeros::<i32>(6).unwrap();
        let w = dev.zeros::<f32>(6).unwrap();
        let mut y = dev.zeros::<f32>(3 * 12).unwrap();
        assert!(matches!(
            expand_experts(&dev, &h, &b, &shape, &plan, &ids, &w, f32::NAN, &mut y),
            Err(molora::Error::InvalidParameter { what: "scale", .. })
        ));
    }
}

/// The GPU LoRA backward against the CPU backward (in f32 on the same inputs).
#[cfg(feature = "cuda")]
mod gpu_backward {
    use half::{bf16, f16};
    use molora::cpu::{self, backward};
    use molora::cuda::{
        dispatch, lora_backward_dense_gated, lora_backward_experts, lora_dense_gated,
        shrink_experts, CudaElement, DenseGatedWorkspace, Device, DeviceLoraGrads, DevicePlan,
    };
    use molora::testing::{compare, test_device, Tolerance};
    use molora::Rng;
    use molora::{DType, LoraShape, Routing};
    use proptest::prelude::*;

    /// The dense-gated forward then its backward on the GPU, against the CPU backward, for one case
    /// in element type `T`. Slot 3 of every 5 is empty with a NaN weight; with `dup`, the last slot
    /// of each token repeats its first expert (duplicates add up).
    #[allow(clippy::too_many_arguments)]
    fn check_dense_gated_backward<T: CudaElement>(
        dev: &Device,
        t: usize,
        k: usize,
        shape: &LoraShape,
        seed: u64,
        dup: bool,
    ) -> Result<(), String> {
        let s = |e: molora::Error| e.to_string();
        let (e, r, d_in, d_out) = (shape.num_experts, shape.rank, shape.d_in, shape.d_out);
        let mut rng = Rng::new(seed);
        let x: Vec<T> = rng.values(t * d_in, 1.0);
        let a: Vec<T> = rng.values(shape.a_len(), 1.0);
        let b: Vec<T> = rng.values(shape.b_len(), 1.0);
        let dy: Vec<T> = rng.values(t * d_out, 1.0);
        let mut ids: Vec<i32> = (0..t * k)
            .map(|i| if i % 5 == 3 { -1 } else { rng.below(e) as i32 })
            .collect();
        if dup && k > 1 {
            for tok in 0..t {
                ids[tok * k + k - 1] = ids[tok * k];
            }
        }
        let w: Vec<f32> = ids
            .iter()
            .map(|&id| {
                if id < 0 {
                    f32::NAN
                } else {
                    0.25 + rng.uniform() as f32
                }
            })
            .collect();
        let f = |v: &[T]| v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
        let w_cpu: Vec<f32> = w
            .iter()
            .map(|&v| if v.is_nan() { 0.0 } else { v })
            .collect();
        let want = backward::lora_backward(
            &f(&x),
            &f(&a),
            &f(&b),
            shape,
            &ids,
            &w_cpu,
            k,
            1.5f32,
            &f(&dy),
        )
        .map_err(s)?;
        // Every buffer exactly its size (empty when T = 0).
        let (xv, da, db, dyv) = (
            dev.upload(&x).map_err(s)?,
            dev.upload(&a).map_err(s)?,
            dev.upload(&b).map_err(s)?,
            dev.upload(&dy).map_err(s)?,
        );
        let (idv, wv) = (dev.upload(&ids).map_err(s)?, dev.upload(&w).map_err(s)?);
        let mut ws = DenseGatedWorkspace::new(dev, t, shape).map_err(s)?;
        let mut y = dev.zeros::<T>(t * d_out).map_err(s)?;
        lora_dense_gated(
            dev, &xv, &da, &db, shape, &idv, &wv, k, 1.5, &mut ws, &mut y,
        )
        .map_err(s)?;
        let mut grads = DeviceLoraGrads::new_dense_gated(dev, t, k, shape).map_err(s)?;
        lora_backward_dense_gated(
            dev, &xv, &da, &db, shape, &idv, &wv, k, &ws, &dyv, 1.5, &mut grads,
        )
        .map_err(s)?;
        let got = grads.to_host(dev).map_err(s)?;
        // On tensor cores (f16/bf16, d_in, d_out and r multiples of 8) G⊙U and G⊙H are rounded to
        // the element type before their GEMMs: that dtype's tolerance; f32 sums elsewhere.
        // (Tensor cores: the dtype's tolerance with its absolute part relative to each gradient's
        // largest value, as the rounded operands make the error scale with the sums' terms.)
        let tc = T::DTYPE != DType::F32 && d_in % 8 == 0 && d_out % 8 == 0 && r % 8 == 0;
        for (what, g, w) in [
            ("dA", &got.da, &want.da),
            ("dB", &got.db, &want.db),
            ("dx", &got.dx, &want.dx),
            ("dw", &got.dw, &want.dw),
        ] {
            let tol = if tc {
                let base = Tolerance::for_dtype(T::DTYPE);
                let m = w.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-3);
                Tolerance {
                    atol: base.atol * m,
                    rtol: base.rtol,
                }
            } else {
                Tolerance::for_dtype(DType::F32)
                    .scaled((t.max(d_in).max(d_out).max(r) as f32).sqrt() * 4.0)
            };
            compare(what, g, w, tol)?;
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(molora::testing::cases(32)))]
        #[test]
        fn lora_backward_dense_gated_matches_cpu(t in prop_oneof![Just(0usize), Just(1), Just(7), 1usize..150], k in 1usize..=4,
                                                 e in 1usize..=32, r in prop_oneof![1usize..=8, Just(16), Just(32)],
                                                 d_in in 1usize..=70, d_out in prop_oneof![1usize..=70, Just(513), Just(1100)],
                                                 seed in any::<u64>(), dup in any::<bool>(), dtype in 0usize..3) {
            prop_assume!(e * r <= molora::cuda::DENSE_GATED_MAX_COLUMNS);
            let Some(dev) = test_device("lora_backward_dense_gated_matches_cpu") else { return Ok(()) };
            let shape = LoraShape::new(e, r, d_in, d_out).unwrap();
            let res = match dtype {
                0 => check_dense_gated_backward::<f32>(&dev, t, k, &shape, seed, dup),
                1 => check_dense_gated_backward::<f16>(&dev, t, k, &shape, seed, dup),
                _ => check_dense_gated_backward::<bf16>(&dev, t, k, &shape, seed, dup),
            };
            if let Err(m) = res {
                prop_assert!(false, "T = {}, k = {}, {:?}: {}", t, k, shape, m);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(molora::testing::cases(24)))]
        /// The tensor-core dense-gated backward: shapes it takes, T from none to past the
        /// tensor-core u's 256 rows, splits of the sums over T, tails of every tile.
        #[test]
        fn lora_backward_dense_gated_tensor_cores_match_cpu(
            t in prop_oneof![Just(0usize), Just(1), Just(33), Just(300), 1usize..200], k in 1usize..=4,
            e in 1usize..=16, r in prop_oneof![Just(8usize), Just(16), Just(32)],
            d_in in prop_oneof![Just(8usize), Just(64), Just(136)], d_out in prop_oneof![Just(8usize), Just(72), Just(264)],
            seed in any::<u64>(), dup in any::<bool>(), bf in any::<bool>()) {
            prop_assume!(e * r <= molora::cuda::DENSE_GATED_MAX_COLUMNS);
            let Some(dev) = test_device("lora_backward_dense_gated_tensor_cores_match_cpu") else { return Ok(()) };
            let shape = LoraShape::new(e, r, d_in, d_out).unwrap();
            let res = if bf {
                check_dense_gated_backward::<bf16>(&dev, t, k, &shape, seed, dup)
            } else {
                check_dense_gated_backward::<f16>(&dev, t, k, &shape, seed, dup)
            };
            if let Err(m) = res {
                prop_assert!(false, "T = {}, k = {}, {:?}, bf16 {}: {}", t, k, shape, bf, m);
            }
        }
    }

    #[test]
    fn dense_gated_backward_rejects_segmented_buffers() {
        let Some(dev) = test_device("dense_gated_backward_rejects_segmented_buffers") else {
            return;
        };
        let shape = LoraShape::new(2, 2, 3, 3).unwrap();
        let (t, k) = (2usize, 1usize);
        let x = dev.zeros::<f32>(t * 3).unwrap();
        let a = dev.zeros::<f32>(shape.a_len()).unwrap();
        let b = dev.zeros::<f32>(shape.b_len()).unwrap();
        let ids = dev.upload(&[0i32, 1]).unwrap();
        let w = dev.upload(&[1.0f32, 1.0]).unwrap();
        let ws = DenseGatedWorkspace::new(&dev, t, &shape).unwrap();
        let dy = dev.zeros::<f32>(t * 3).unwrap();
        let mut grads = DeviceLoraGrads::new(&dev, t, k, &shape).unwrap();
        let err = lora_backward_dense_gated(
            &dev, &x, &a, &b, &shape, &ids, &w, k, &ws, &dy, 1.0, &mut grads,
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                molora::Error::Unsupported {
                    op: "lora_backward_dense_gated",
                    ..
                }
            ),
            "{err}"
        );
        let big = LoraShape::new(33, 16, 3, 3).unwrap();
        assert!(matches!(
            DeviceLoraGrads::new_dense_gated(&dev, t, k, &big),
            Err(molora::Error::Unsupported { .. })
        ));
    }

    /// The segmented LoRA backward of bf16 inputs against the CPU backward in f32.
    #[allow(clippy::too_many_arguments)]
    fn check_experts_backward(
        dev: &Device,
        t: usize,
        k: usize,
        e: usize,
        r: usize,
        d_in: usize,
        d_out: usize,
        seed: u64,
    ) -> Result<(), String> {
        let shape = LoraShape::new(e, r, d_in, d_out).unwrap();
        let mut rng = Rng::new(seed);
        let x: Vec<bf16> = rng.values(t * d_in, 1.0);
        let a: Vec<bf16> = rng.values(shape.a_len(), 1.0);
        let b: Vec<bf16> = rng.values(shape.b_len(), 1.0);
        let dy: Vec<bf16> = rng.values(t * d_out, 1.0);
        let ids: Vec<i32> = (0..t * k)
            .map(|i| {
                if i % 5 == 3 {
                    -1
                } else {
                    ((i * 7 + seed as usize) % e) as i32
                }
            })
            .collect();
        let w: Vec<f32> = (0..t * k).map(|i| 0.25 + (i % 3) as f32 * 0.25).collect();
        let routing = Routing::new(t, k, e, ids.clone(), w.clone()).unwrap();
        let f = |v: &[bf16]| v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
        let want =
            backward::lora_backward(&f(&x), &f(&a), &f(&b), &shape, &ids, &w, k, 1.5f32, &f(&dy))
                .unwrap();

        let (dx_, da, db, ddy) = (
            dev.upload(&x).unwrap(),
            dev.upload(&a).unwrap(),
            dev.upload(&b).unwrap(),
            dev.upload(&dy).unwrap(),
        );
        let dids = dev.upload(routing.ids()).unwrap();
        let dw = dev.upload(routing.weights()).unwrap();
        let mut plan = DevicePlan::new(dev, t, k, e).unwrap();
        let mut h = dev.zeros::<f32>(t * k * r).unwrap();
        dispatch(dev, &dids, &mut plan).unwrap();
        shrink_experts(dev, &dx_, &da, &shape, &plan, &mut h).unwrap();
        let mut grads = DeviceLoraGrads::new(dev, t, k, &shape).unwrap();
        lora_backward_experts(
            dev, &dx_, &da, &db, &shape, &plan, &dids, &dw, &h, &ddy, 1.5, &mut grads,
        )
        .unwrap();
        let got = grads.to_host(dev).unwrap();
        let tol =
            Tolerance::for_dtype(DType::F32).scaled((t.max(d_in).max(d_out) as f32).sqrt() * 4.0);
        for (what, g, w) in [
            ("dA", &got.da, &want.da),
            ("dB", &got.db, &want.db),
            ("dx", &got.dx, &want.dx),
            ("dw", &got.dw, &want.dw),
        ] {
            compare(what, g, w, tol)?;
        }
        // The CPU forward plan agrees (sanity of the inputs).
        if plan.to_host(dev).map_err(|e| e.to_string())?
            != cpu::dispatch(&routing).map_err(|e| e.to_string())?
        {
            return Err("the GPU plan differs from the CPU's".into());
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(molora::testing::cases(24)))]
        #[test]
        fn lora_backward_matches_cpu(t in prop_oneof![1 => Just(0usize), 7 => 1usize..150], k in 1usize..=3, e in 1usize..=16,
                                     r in prop_oneof![1usize..=8, Just(16), Just(64)],
                                     d_in in 1usize..=70, d_out in 1usize..=70, seed in any::<u64>()) {
            let Some(dev) = test_device("lora_backward_matches_cpu") else { return Ok(()) };
            if let Err(m) = check_experts_backward(&dev, t, k, e, r, d_in, d_out, seed) {
                prop_assert!(false, "T = {}, k = {}, E = {}, r = {}, {}→{}: {}", t, k, e, r, d_in, d_out, m);
            }
        }
    }

    /// Both backward paths with more than 256 rows, d_out and r multiples of 8 and 16-bit inputs:
    /// the shapes where u = dy·B runs on the tensor-core shrink (B read transposed).
    #[test]
    fn backward_with_tensor_core_u_matches_cpu() {
        let Some(dev) = test_device("backward_with_tensor_core_u_matches_cpu") else {
            return;
        };
        for (t, k, e, r, d_in, d_out) in [
            (300usize, 2usize, 5usize, 16usize, 72usize, 136usize),
            (261, 1, 8, 8, 40, 64),
            (520, 3, 4, 32, 33, 200),
        ] {
            if let Err(m) = check_experts_backward(&dev, t, k, e, r, d_in, d_out, 11) {
                panic!("segmented, T = {t}, k = {k}, E = {e}, r = {r}, {d_in}→{d_out}: {m}");
            }
            let shape = LoraShape::new(e, r, d_in, d_out).unwrap();
            for dup in [false, true] {
                for res in [
                    check_dense_gated_backward::<bf16>(&dev, t, k, &shape, 5, dup),
                    check_dense_gated_backward::<f16>(&dev, t, k, &shape, 5, dup),
                ] {
                    if let Err(m) = res {
                        panic!("dense-gated, T = {t}, k = {k}, {shape:?}, dup {dup}: {m}");
                    }
                }
            }
        }
    }
}
