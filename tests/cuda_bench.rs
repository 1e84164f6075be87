//! The GPU benchmark's library entry point: bad options are refused before any device work, and on a
//! GPU a run over small odd shapes (every routing, every dtype, with backward) completes and gives one
//! table row per case with every measured column filled, and one kernel-variant row per expert case
//! (the tensor-core shrink timed exactly for f16 and bf16).

#[cfg(feature = "cuda")]
#[allow(dead_code)]
#[path = "../benches/tables/cuda.rs"]
mod tables;

#[cfg(feature = "cuda")]
mod gpu {
    use super::tables::{run, BenchCase, BenchOptions, BenchRouting};
    use molora::cuda::staged_expand_max_columns;
    use molora::testing::gpu_only;
    use molora::{DType, Error};

    #[test]
    fn bench_rejects_bad_options() {
        let mut opts = BenchOptions::new(DType::BF16);
        opts.iters = 0;
        assert!(matches!(
            run(&opts),
            Err(Error::InvalidDim { what: "iters", .. })
        ));
        let mut opts = BenchOptions::new(DType::BF16);
        opts.cases.clear();
        assert!(matches!(run(&opts), Err(Error::InvalidDim { .. })));
        let mut opts = BenchOptions::new(DType::BF16);
        opts.bandwidth_gbps = Some(0.0);
        assert!(matches!(
            run(&opts),
            Err(Error::InvalidParameter {
                what: "bandwidth_gbps",
                ..
            })
        ));
    }

    #[test]
    fn bench_runs_small_cases() {
        let Some(_dev) = gpu_only(
            "bench_runs_small_cases",
            "cuBLAS baselines and CUDA-event timing",
        ) else {
            return;
        };
        use BenchRouting::*;
        let cases = vec![
            BenchCase::new(1, 33, 17, 3, 5, 2, TopK),
            BenchCase::new(131, 65, 130, 4, 8, 1, TopK),
            BenchCase::new(70, 64, 64, 40, 16, 3, TopK), // E·r = 640: segmented only
            BenchCase::new(97, 48, 80, 5, 4, 2, Threshold),
            BenchCase::new(300, 40, 56, 3, 2, 1, PerSequence { seq_len: 64 }),
            // The tensor-core dense-gated path (f16/bf16), and the same shape misaligned (off it).
            BenchCase::new(200, 64, 72, 4, 8, 2, TopK),
            BenchCase::new(50, 64, 72, 4, 8, 2, TopK).misaligned(),
            // The fused decode (T ≤ 16).
            BenchCase::new(9, 64, 72, 4, 8, 2, TopK),
        ];
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let opts = BenchOptions {
                cases: cases.clone(),
                iters: 2,
                ..BenchOptions::new(dtype)
            };
            let table = run(&opts).unwrap_or_else(|e| panic!("{dtype:?}: {e}"));
            // Title, main table, title of the kernel-variant table, that table; for f16/bf16 the
            // title and rows of the dense-gated sweep (the one aligned tensor-core case).
            let parts: Vec<&str> = table.split("\n\n").collect();
            let tc = dtype != DType::F32;
            assert_eq!(parts.len(), if tc { 6 } else { 4 }, "{dtype:?}:\n{table}");
            let rows_of = |part: &str| -> Vec<String> {
                part.lines()
                    .filter(|l| l.starts_with("| ") && !l.starts_with("| T "))
                    .map(str::to_string)
                    .collect()
            };
            let rows = rows_of(parts[1]);
            assert_eq!(rows.len(), cases.len(), "{dtype:?}:\n{table}");
            for (row, case) in rows.iter().zip(&cases) {
                let cols: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
                assert_eq!(cols.len(), 20, "{dtype:?}: {row}");
                let tc_row = tc && case.d_in == 64 && !case.misaligned;
                let want_path = match (tc_row, case.tokens <= 16) {
                    (true, true) => "(dg-fused)",
                    (true, false) => "(dg-tc)",
                    _ => "",
                };
                if !want_path.is_empty() {
                    assert!(cols[7].ends_with(want_path), "{dtype:?}: the path of {row}");
                } else {
                    assert!(!cols[7].contains("dg-"), "{dtype:?}: the path of {row}");
                }
                // The graph replay is measured for every case with experts (all have T ≤ 256).
                if !matches!(case.routing, PerSequence { .. }) {
                    assert!(
                        cols[19].parse::<f64>().is_ok_and(|v| v > 0.0),
                        "{dtype:?}: graph replay of {row}"
                    );
                }
                assert_eq!(cols[0], case.tokens.to_string(), "{row}");
                // Our time, baseline (a), the base GEMM and the backward are always measured.
                for i in [7, 11, 15, 16] {
                    let v: f64 = cols[i]
                        .split_whitespace()
                        .next()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or_else(|| panic!("{dtype:?}: column {i} of {row}"));
                    assert!(v.is_finite() && v > 0.0, "{dtype:?}: column {i} of {row}");
                }
            }
            // One variant row per case with experts (not SAML): plain shrink and expand always
            // run, the tensor-core shrink exactly for f16 and bf16, the row-parallel shrink always.
            let variants = rows_of(parts[3]);
            let expert_cases: Vec<&BenchCase> = cases
                .iter()
                .filter(|c| !matches!(c.routing, PerSequence { .. }))
                .collect();
            assert_eq!(variants.len(), expert_cases.len(), "{dtype:?}:\n{table}");
            for row in &variants {
                let cols: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
                assert_eq!(cols.len(), 12, "{dtype:?}: {row}");
                for i in [5, 8, 9] {
                    assert!(
                        cols[i].parse::<f64>().is_ok_and(|v| v > 0.0),
                        "{dtype:?}: column {i} of {row}"
                    );
                }
                assert_eq!(
                    cols[7] == "—",
                    dtype == DType::F32,
                    "{dtype:?}: tensor-core column of {row}"
                );
                // The staged expand runs exactly when E·r fits its shared memory.
                let e_r = cols[2].parse::<usize>().unwrap() * cols[3].parse::<usize>().unwrap();
                assert_eq!(
                    cols[11] == "—",
                    e_r > staged_expand_max_columns(dtype.size_in_bytes()),
                    "{dtype:?}: staged column of {row}"
                );
            }
            if tc {
                // The two aligned tensor-core cases (T = 200 and T = 9).
                let sweep = rows_of(parts[5]);
                assert_eq!(sweep.len(), 2, "{dtype:?}:\n{table}");
                let cols: Vec<&str> = sweep[0]
                    .trim_matches('|')
                    .split('|')
                    .map(str::trim)
                    .collect();
                assert_eq!(cols.len(), 14, "{dtype:?}: {}", sweep[0]);
                // CUDA cores, splits 1 and 2 (d_in = 64 has two k-steps), two-term: measured;
                // splits 4, 8, 16: refused.
                for i in [5, 6, 7, 11] {
                    assert!(
                        cols[i].parse::<f64>().is_ok_and(|v| v > 0.0),
                        "{dtype:?}: column {i} of {}",
                        sweep[0]
                    );
                }
                for i in [8, 9, 10] {
                    assert_eq!(cols[i], "—", "{dtype:?}: column {i} of {}", sweep[0]);
                }
            }
        }
    }
}
