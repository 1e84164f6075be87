//! Quantised base on the GPU against the CPU reference: NF4 and int8 codes and scales bit for bit,
//! and the dequantising matmul (GEMV and tiled GEMM kernels) within the f32 tolerance, for every
//! input dtype and odd shapes (tails of the 64 × 64 tiles).

#[cfg(feature = "cuda")]
mod gpu {
    use molora::cpu;
    use molora::cuda::{
        quant_matmul, quant_matmul_dx, quant_matmul_on, quantize_int8, quantize_nf4, CudaElement,
        DeviceQuantWeight, QuantKernel,
    };
    use molora::testing::{compare, test_device, Tolerance};
    use molora::Rng;
    use molora::{DType, Element, Error};
    use proptest::prelude::*;

    /// Values in [-1, 1) with every 37th zero, so some blocks / rows are all zero at small sizes.
    fn vals<T: Element>(n: usize, seed: u64) -> Vec<T> {
        let mut v: Vec<T> = Rng::new(seed).values(n, 1.0);
        v.iter_mut()
            .skip(5)
            .step_by(37)
            .for_each(|x| *x = T::from_f32(0.0));
        v
    }

    fn case<T: CudaElement>(rows: usize, cols: usize, t: usize, seed: u64) -> Result<(), String> {
        let dev = match test_device("quantised_base_matches_cpu") {
            Some(d) => d,
            None => return Ok(()),
        };
        let s = |e: Error| e.to_string();
        let w: Vec<T> = vals(rows * cols, seed);
        let x: Vec<T> = vals(t * cols, seed ^ 99);
        let bias: Vec<T> = vals(rows, seed ^ 7);
        let dw = dev.upload(&w).map_err(s)?;
        let dx = dev.upload(&x).map_err(s)?;
        let db = dev.upload(&bias).map_err(s)?;
        let nf4_cpu = cpu::quantize_nf4(&w, rows, cols).map_err(s)?;
        let int8_cpu = cpu::quantize_int8(&w, rows, cols).map_err(s)?;
        let nf4 = quantize_nf4(&dev, &dw, rows, cols).map_err(s)?;
        let int8 = quantize_int8(&dev, &dw, rows, cols).map_err(s)?;
        if nf4.to_nf4(&dev).map_err(s)? != nf4_cpu {
            return Err(format!(
                "NF4 codes or absmax differ from the CPU ({rows}x{cols})"
            ));
        }
        if int8.to_int8(&dev).map_err(s)? != int8_cpu {
            return Err(format!(
                "int8 codes or scales differ from the CPU ({rows}x{cols})"
            ));
        }
        let xs = &x;
        for (w_dev, want) in [
            (
                &nf4,
                cpu::nf4_matmul(xs, t, &nf4_cpu, Some(&bias)).map_err(s)?,
            ),
            (
                &int8,
                cpu::int8_matmul(xs, t, &int8_cpu, Some(&bias)).map_err(s)?,
            ),
        ] {
            for kernel in [QuantKernel::Auto, QuantKernel::Gemv, QuantKernel::Gemm] {
                // NaN where nothing is written must not survive: every output is written. y is
                // exactly [T, rows] (empty when T = 0), so an access past it is outside its
                // allocation (caught by the emulator and compute-sanitizer).
                let mut y = dev.upload(&vec![f32::NAN; t * rows]).map_err(s)?;
                quant_matmul_on(&dev, &dx, t, w_dev, Some(&db), &mut y, kernel).map_err(s)?;
                let got = dev.download(&y).map_err(s)?;
                // The one deliberate exception: the same call into a view of the first T·rows
                // elements of a buffer one NaN longer, so that a write past y also shows on a GPU
                // run without compute-sanitizer (on the emulator the exact y above catches it).
                let mut y_tail = dev.upload(&vec![f32::NAN; t * rows + 1]).map_err(s)?;
                quant_matmul_on(
                    &dev,
                    &dx,
                    t,
                    w_dev,
                    Some(&db),
                    &mut y_tail.slice_mut(0..t * rows).map_err(s)?,
                    kernel,
                )
                .map_err(s)?;
                if !dev.download(&y_tail).map_err(s)?[t * rows].is_nan() {
                    return Err(format!("{kernel:?}: wrote past y"));
                }
                let tol = Tolerance::for_dtype(DType::F32).scaled((cols as f32).sqrt());
                compare(&format!("quantised matmul ({kernel:?})"), &got, &want, tol)?;
            }
        }
        // The backward to the input, dx = dy·deq(W), on the packed weight: against the CPU, every
        // output written (NaN-filled), nothing written past dx.
        let dy: Vec<T> = vals(t * rows, seed ^ 5);
        let ddy = dev.upload(&dy).map_err(s)?;
        for (w_dev, w_ref) in [
            (&nf4, cpu::QuantWeightRef::Nf4(&nf4_cpu)),
            (&int8, cpu::QuantWeightRef::Int8(&int8_cpu)),
        ] {
            let want = cpu::quant_matmul_dx(&dy, t, &w_ref).map_err(s)?;
            let mut dx_tail = dev.upload(&vec![f32::NAN; t * cols + 1]).map_err(s)?;
            quant_matmul_dx(
                &dev,
                &ddy,
                t,
                w_dev,
                &mut dx_tail.slice_mut(0..t * cols).map_err(s)?,
            )
            .map_err(s)?;
            let got = dev.download(&dx_tail).map_err(s)?;
            if !got[t * cols].is_nan() {
                return Err("quant_matmul_dx wrote past dx".into());
            }
            let tol = Tolerance::for_dtype(DType::F32).scaled((rows as f32).sqrt());
            compare("quantised matmul dx", &got[..t * cols], &want, tol)?;
        }
        // Uploading the CPU weight gives the same matmul as quantising on the GPU.
        let up = DeviceQuantWeight::from_nf4(&dev, &nf4_cpu).map_err(s)?;
        if up.to_nf4(&dev).map_err(s)? != nf4_cpu {
            return Err("NF4 upload round trip differs".into());
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(molora::testing::cases(24)))]
        #[test]
        fn quantised_base_matches_cpu(
            rows in prop_oneof![1usize..=40, Just(64), Just(65), 100usize..=150],
            cols in prop_oneof![1usize..=200, Just(64), Just(3424)],
            t in prop_oneof![Just(0usize), Just(1), Just(7), Just(16), Just(33), Just(64), Just(65), 100usize..=200],
            seed in any::<u64>(),
        ) {
            // Keeps the CPU reference quick in debug builds.
            prop_assume!(rows * cols * t <= 3_000_000);
            for (dtype, r) in [
                ("f32", case::<f32>(rows, cols, t, seed)),
                ("f16", case::<half::f16>(rows, cols, t, seed)),
                ("bf16", case::<half::bf16>(rows, cols, t, seed)),
            ] {
                if let Err(m) = r {
                    prop_assert!(false, "{dtype}: {m}");
                }
            }
        }
    }

    #[test]
    fn quantised_base_rejects_bad_input() {
        let Some(dev) = test_device("quantised_base_rejects_bad_input") else {
            return;
        };
        let w = dev.zeros::<f32>(12).unwrap();
        assert!(matches!(
            quantize_nf4(&dev, &w, 0, 12),
            Err(Error::InvalidDim { what: "rows", .. })
        ));
        assert_eq!(
            quantize_int8(&dev, &w, 5, 3).err(),
            Some(Error::LengthMismatch {
                what: "weight [rows, cols]",
                expected: 15,
                got: 12
            })
        );
        let q = quantize_int8(&dev, &w, 3, 4).unwrap();
        let x = dev.zeros::<f32>(2 * 4).unwrap();
        // Deliberately one element too long: the op must refuse it.
        let mut y = dev.zeros::<f32>(2 * 3 + 1).unwrap();
        assert_eq!(
            quant_matmul(&dev, &x, 2, &q, None, &mut y),
            Err(Error::LengthMismatch {
                what: "y [T, d_out]",
                expected: 6,
                got: 7
            })
        );
    }
}
