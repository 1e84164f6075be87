//! The self-test kernels of `cuda/selftest.cu`: every primitive the kernels rely on (shuffles and
//! votes, wmma, mma.sync, ldmatrix, cp.async groups) against the answer the CUDA documentation and the
//! PTX ISA define, on whichever device runs the suite (the emulated device in CI, a GPU where there is
//! one), and the planted bugs, each of which the emulated device must report by name.

#[cfg(feature = "cuda")]
mod selftest {
    use molora::cuda::{run_selftest, Device, SelfTest};
    use molora::testing::test_device;

    fn input(test: SelfTest) -> Vec<f32> {
        let n = test.input_len();
        match test {
            // Warp 0 all above 0.05, warp 1 with zeros: `__all_sync` is true in one warp only.
            SelfTest::Shuffles => (0..n)
                .map(|i| {
                    let k = (i * 37 % 17) as f32;
                    if i < 32 {
                        (k + 1.0) / 18.0
                    } else {
                        k / 18.0
                    }
                })
                .collect(),
            // Small multiples of 1/4 and 1/2: exact in f16, and every product sum exact in f32.
            SelfTest::Wmma | SelfTest::BugWmmaLayout => (0..n)
                .map(|i| {
                    if i < 256 {
                        let (m, k) = (i / 16, i % 16);
                        ((m * 3 + k * 5) % 7) as f32 / 4.0 - 0.75
                    } else {
                        let (k, c) = ((i - 256) / 16, (i - 256) % 16);
                        ((k * 2 + c * 3) % 5) as f32 / 2.0 - 1.0
                    }
                })
                .collect(),
            SelfTest::Mma | SelfTest::BugMmaFragment => (0..n)
                .map(|i| {
                    if i < 256 {
                        let (m, k) = (i / 16, i % 16);
                        ((m * 3 + k * 5) % 7) as f32 / 4.0 - 0.75
                    } else {
                        let (k, c) = ((i - 256) / 8, (i - 256) % 8);
                        ((k * 2 + c * 3) % 5) as f32 / 2.0 - 1.0
                    }
                })
                .collect(),
            // Integers below 2048: exact in f16.
            SelfTest::Ldmatrix => (0..n).map(|i| i as f32).collect(),
            _ => (0..n).map(|i| i as f32 * 0.5 + 1.0).collect(),
        }
    }

    /// What the CUDA programming guide says each shuffle and vote returns.
    fn shuffles_want(v: &[f32]) -> Vec<f32> {
        let mut out = Vec::with_capacity(64 * 13);
        for t in 0..64usize {
            let (w, lane) = (t - t % 32, t % 32);
            let at = |l: usize| v[w + l];
            let (seg, inn) = (lane & !7, lane & 7);
            let ballot = (0..32)
                .filter(|&l| at(l) > 0.5)
                .fold(0u32, |b, l| b | 1 << l);
            let key = |l: usize| (at(l) * 4.0) as i32;
            let peers = (0..32)
                .filter(|&l| key(l) == key(lane))
                .fold(0u32, |b, l| b | 1 << l);
            out.extend([
                at(lane ^ 5),
                if lane >= 3 { at(lane - 3) } else { at(lane) },
                if lane + 7 < 32 {
                    at(lane + 7)
                } else {
                    at(lane)
                },
                at((lane * 7 + 3) % 32),
                at(seg + (inn ^ 3)),
                if inn >= 2 { at(lane - 2) } else { at(lane) },
                at(seg + 5),
                (ballot & 0xffff) as f32,
                (ballot >> 16) as f32,
                if (0..32).any(|l| at(l) > 0.9) {
                    1.0
                } else {
                    0.0
                },
                if (0..32).all(|l| at(l) > 0.05) {
                    1.0
                } else {
                    0.0
                },
                (peers & 0xffff) as f32,
                (peers >> 16) as f32,
            ]);
        }
        out
    }

    fn matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut d = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                d[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        d
    }

    fn want(test: SelfTest, v: &[f32]) -> Vec<f32> {
        match test {
            SelfTest::Shuffles => shuffles_want(v),
            SelfTest::Wmma | SelfTest::BugWmmaLayout => matmul(&v[..256], &v[256..], 16, 16, 16),
            SelfTest::Mma | SelfTest::BugMmaFragment => matmul(&v[..256], &v[256..], 16, 16, 8),
            SelfTest::Ldmatrix => {
                let m = |q: usize, r: usize, c: usize| v[q * 64 + r * 8 + c];
                let mut out = vec![0.0; 512];
                for l in 0..32 {
                    for q in 0..4 {
                        for h in 0..2 {
                            out[l * 16 + q * 2 + h] = m(q, l / 4, 2 * (l % 4) + h);
                            out[l * 16 + 8 + q * 2 + h] = m(q, 2 * (l % 4) + h, l / 4);
                        }
                    }
                }
                out
            }
            SelfTest::CpAsync => (0..256)
                .map(|i| {
                    if i < 128 || ((i - 128) / 4) % 2 == 0 {
                        v[i]
                    } else {
                        0.0
                    }
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    fn first_difference(got: &[f32], want: &[f32]) -> Option<(usize, f32, f32)> {
        if got.len() != want.len() {
            return Some((got.len().min(want.len()), f32::NAN, f32::NAN));
        }
        got.iter()
            .zip(want)
            .enumerate()
            .find(|(_, (g, w))| g.to_bits() != w.to_bits())
            .map(|(i, (g, w))| (i, *g, *w))
    }

    /// A skip line on the stderr handle itself (not captured by the harness; scripts count them).
    fn skip(test: &str, why: &str) {
        use std::io::Write;
        // One write of the whole line, so that it is not split by the harness's own output.
        let _ = std::io::stderr().write_all(format!("skipping {test}: {why}\n").as_bytes());
    }

    fn device(test: &str) -> Option<Device> {
        test_device(test)
    }

    /// Every primitive gives the documented answer, exactly (the inputs make every result exact).
    #[test]
    fn primitives_give_the_documented_answers() {
        let Some(dev) = device("primitives_give_the_documented_answers") else {
            return;
        };
        for test in SelfTest::PRIMITIVES {
            let v = input(test);
            let got = run_selftest(&dev, test, &v).unwrap_or_else(|e| panic!("{test:?}: {e}"));
            if let Some((i, g, w)) = first_difference(&got, &want(test, &v)) {
                panic!("{test:?}: output[{i}] = {g}, the documented answer is {w}");
            }
        }
    }

    /// A wrong fragment index or store layout is a wrong answer on every device.
    #[test]
    fn wrong_fragment_indices_give_wrong_answers() {
        let Some(dev) = device("wrong_fragment_indices_give_wrong_answers") else {
            return;
        };
        for test in [SelfTest::BugMmaFragment, SelfTest::BugWmmaLayout] {
            let v = input(test);
            let got = run_selftest(&dev, test, &v).unwrap_or_else(|e| panic!("{test:?}: {e}"));
            let diff = first_difference(&got, &want(test, &v));
            assert!(
                diff.is_some(),
                "{test:?}: the planted fragment bug went unnoticed (the output equals the right answer)"
            );
        }
    }

    /// A launch over the shared-memory limit is refused, naming the limit, on every device.
    #[test]
    fn a_launch_over_the_shared_memory_limit_is_refused() {
        let Some(dev) = device("a_launch_over_the_shared_memory_limit_is_refused") else {
            return;
        };
        let test = SelfTest::BugSmemLimit;
        let err = run_selftest(&dev, test, &input(test))
            .expect_err("100 KiB of dynamic shared memory without the opt-in");
        let msg = err.to_string();
        assert!(
            msg.contains("cudaErrorInvalidValue") || msg.contains("dynamic shared memory"),
            "{msg}"
        );
    }

    /// Each planted bug fails its launch with a report that names the check and what went wrong.
    #[test]
    fn the_emulator_reports_every_planted_bug() {
        // The planted bugs need the emulator, also on a machine with a GPU.
        let dev = match Device::emulated() {
            Ok(dev) => dev,
            Err(err) => {
                skip("the_emulator_reports_every_planted_bug", &err.to_string());
                return;
            }
        };
        let cases: [(SelfTest, &[&str]); 7] = [
            (
                SelfTest::BugOobGlobalWrite,
                &[
                    "memcheck",
                    "invalid write",
                    "past the end",
                    "device buffer",
                    "cuda/selftest.cu:",
                ],
            ),
            (
                SelfTest::BugOobSharedRead,
                &[
                    "memcheck",
                    "invalid read",
                    "shared array 's'",
                    "thread (31,0,0)",
                ],
            ),
            (
                SelfTest::BugMissingSyncthreads,
                &["racecheck", "hazard on shared memory", "no __syncthreads()"],
            ),
            (
                SelfTest::BugDivergentBarrier,
                &["synccheck", "__syncthreads()", "has exited"],
            ),
            (
                SelfTest::BugShuffleMask,
                &["synccheck", "__shfl_xor_sync", "lane 31", "has exited"],
            ),
            (
                SelfTest::BugSmemLimit,
                &["dynamic shared memory", "cudaFuncSetAttribute"],
            ),
            (
                SelfTest::BugUninitRead,
                &["initcheck", "nothing has written", "copy_kernel"],
            ),
        ];
        for (test, needles) in cases {
            let err = match run_selftest(&dev, test, &input(test)) {
                Ok(_) => panic!("{test:?}: the emulator did not catch the planted bug"),
                Err(e) => e.to_string(),
            };
            for n in needles {
                assert!(
                    err.contains(n),
                    "{test:?}: the report does not say {n:?}:\n{err}"
                );
            }
        }
        // The device works on after a caught bug.
        let v = input(SelfTest::CpAsync);
        let got = run_selftest(&dev, SelfTest::CpAsync, &v)
            .expect("a good kernel after the planted bugs");
        assert!(first_difference(&got, &want(SelfTest::CpAsync, &v)).is_none());
    }

    /// The emulated device refuses a planted bug that would corrupt a GPU's memory.
    #[test]
    fn planted_bugs_are_refused_on_a_gpu() {
        let Some(dev) = device("planted_bugs_are_refused_on_a_gpu") else {
            return;
        };
        if dev.is_emulated() {
            skip(
                "planted_bugs_are_refused_on_a_gpu",
                "GPU-only (the emulated device runs the planted bugs)",
            );
            return;
        }
        let err = run_selftest(
            &dev,
            SelfTest::BugOobGlobalWrite,
            &input(SelfTest::BugOobGlobalWrite),
        )
        .expect_err("a planted bug on a GPU");
        assert!(err.to_string().contains("emulated device only"), "{err}");
    }
}
