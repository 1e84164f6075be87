//! Test support, not API: the comparison helpers of the property tests (CPU invariants, and CUDA
//! against the CPU reference), the case count and the choice of test device. The GPU test suite and
//! the bench programs use them, so they live in the library; they are hidden from its documentation
//! and may change without notice.
//!
//! A value passes when `|got − want| ≤ atol + rtol·|want|`; the tolerance depends on the element type
//! the result was rounded to (see [`Tolerance::for_dtype`]).

use crate::dtype::DType;

/// Absolute and relative tolerance of a comparison.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    pub atol: f32,
    pub rtol: f32,
}

impl Tolerance {
    /// The per-dtype table. f32 allows for a different summation order over a few thousand terms;
    /// f16 (10-bit mantissa) and bf16 (7-bit mantissa) allow for one output rounding plus an
    /// intermediate rounding (e.g. of the base GEMM) and the order of the f32 accumulation.
    ///
    /// | dtype | atol | rtol |
    /// |---|---|---|
    /// | f32 | 1e-4 | 1e-4 |
    /// | f16 | 2e-3 | 4e-3 |
    /// | bf16 | 1.6e-2 | 1.6e-2 |
    pub const fn for_dtype(dtype: DType) -> Self {
        match dtype {
            DType::F32 => Tolerance {
                atol: 1e-4,
                rtol: 1e-4,
            },
            DType::F16 => Tolerance {
                atol: 2e-3,
                rtol: 4e-3,
            },
            DType::BF16 => Tolerance {
                atol: 1.6e-2,
                rtol: 1.6e-2,
            },
        }
    }

    /// Scales both bounds (e.g. by `sqrt(K)` for a reduction over `K` terms of unit size).
    pub fn scaled(self, factor: f32) -> Self {
        Tolerance {
            atol: self.atol * factor,
            rtol: self.rtol * factor,
        }
    }

    /// Whether `got` is within tolerance of `want`. NaN never is; equal infinities are.
    pub fn accepts(&self, got: f32, want: f32) -> bool {
        if got == want {
            return true;
        }
        (got - want).abs() <= self.atol + self.rtol * want.abs()
    }
}

/// Compares two equally long slices and returns a message naming the first mismatching index,
/// both values, their difference and the bound, with the number of mismatches; `Ok(())` if all pass.
pub fn compare(what: &str, got: &[f32], want: &[f32], tol: Tolerance) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!(
            "{what}: length {} differs from the reference's {}",
            got.len(),
            want.len()
        ));
    }
    let mut first = None;
    let mut count = 0usize;
    let mut worst = 0.0f32;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if !tol.accepts(g, w) {
            count += 1;
            let excess = (g - w).abs() - (tol.atol + tol.rtol * w.abs());
            if first.is_none() {
                first = Some(i);
            }
            if excess.is_nan() || excess > worst {
                worst = excess;
            }
        }
    }
    match first {
        None => Ok(()),
        Some(i) => Err(format!(
            "{what}: {count} of {} values out of tolerance (atol {}, rtol {}); first at index {i}: \
             got {}, want {}, |diff| {}, bound {}",
            got.len(),
            tol.atol,
            tol.rtol,
            got[i],
            want[i],
            (got[i] - want[i]).abs(),
            tol.atol + tol.rtol * want[i].abs()
        )),
    }
}

/// Panics with [`compare`]'s message when the slices differ beyond `tol`. For tests.
#[track_caller]
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: Tolerance) {
    if let Err(msg) = compare(what, got, want, tol) {
        panic!("{msg}");
    }
}

/// Property-test case count: `n`, or `MOLORA_TEST_CASES` where that is set to a positive number (the
/// compute-sanitizer run uses a few cases per property, since memcheck slows every launch).
pub fn cases(n: u32) -> u32 {
    std::env::var("MOLORA_TEST_CASES")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|&c| c > 0)
        .unwrap_or(n)
}

/// Writes a skip line to the stderr handle itself, which the test harness does not capture, so the
/// skip shows in every run's log (scripts count the lines starting with `skipping `).
fn skip(test: &str, why: &str) {
    use std::io::Write;
    // One write of the whole line, so that it is not split by the harness's own output.
    let _ = std::io::stderr().write_all(format!("skipping {test}: {why}\n").as_bytes());
}

/// Whether `MOLORA_REQUIRE_GPU=1`: a GPU run, which must not pass by skipping or by emulating.
fn gpu_required() -> bool {
    std::env::var("MOLORA_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

/// The device the CUDA tests run on, chosen by the environment variable `MOLORA_DEVICE`:
///
/// * `gpu`: GPU 0; when there is none, `None` after printing a `skipping {test}: ...` line (a panic
///   instead under `MOLORA_REQUIRE_GPU=1`);
/// * `emu`: the emulated device ([`crate::cuda::Device::emulated`]); a panic when molora was built
///   without the `emu` feature, or under `MOLORA_REQUIRE_GPU=1`;
/// * unset (or empty): GPU 0 when there is one, else the emulated device when built with `emu`,
///   else `None` after printing the skip line. Under `MOLORA_REQUIRE_GPU=1` a missing GPU panics.
///
/// So the same test runs unchanged on a GPU and, in CI without one, on the emulator.
pub fn test_device(test: &str) -> Option<crate::cuda::Device> {
    use crate::cuda::Device;
    let choice = std::env::var("MOLORA_DEVICE").unwrap_or_default();
    match choice.as_str() {
        "gpu" => gpu(test, None),
        "emu" => {
            if gpu_required() {
                panic!("{test}: MOLORA_REQUIRE_GPU=1 asks for a GPU, but MOLORA_DEVICE=emu for the emulated device");
            }
            match Device::emulated() {
                Ok(dev) => Some(dev),
                Err(err) => panic!("{test}: MOLORA_DEVICE=emu, but {err}"),
            }
        }
        "" => {
            match Device::new(0) {
                Ok(dev) => Some(dev),
                Err(gpu_err) => {
                    if gpu_required() {
                        panic!("{test}: MOLORA_REQUIRE_GPU=1 but no usable GPU: {gpu_err}");
                    }
                    match Device::emulated() {
                        Ok(dev) => Some(dev),
                        Err(emu_err) => {
                            skip(
                            test,
                            &format!("{gpu_err}; {emu_err} (set MOLORA_REQUIRE_GPU=1 to fail instead)"),
                        );
                            None
                        }
                    }
                }
            }
        }
        other => panic!("{test}: MOLORA_DEVICE={other:?}: use gpu, emu, or leave it unset"),
    }
}

/// GPU 0 for a test that only a GPU can run (`why`: what it needs that the emulated device does not
/// have, e.g. CUDA graphs or cuBLAS), or `None` after printing `skipping {test}: GPU-only ({why})...`
/// when there is no GPU or `MOLORA_DEVICE=emu` asks for the emulated device. Under
/// `MOLORA_REQUIRE_GPU=1` a missing GPU panics instead.
pub fn gpu_only(test: &str, why: &str) -> Option<crate::cuda::Device> {
    if std::env::var("MOLORA_DEVICE").is_ok_and(|v| v == "emu") && !gpu_required() {
        skip(test, &format!("GPU-only ({why}); MOLORA_DEVICE=emu"));
        return None;
    }
    gpu(test, Some(why))
}

/// GPU 0, or `None` after the skip line (a panic under `MOLORA_REQUIRE_GPU=1`).
fn gpu(test: &str, gpu_only: Option<&str>) -> Option<crate::cuda::Device> {
    match crate::cuda::Device::new(0) {
        Ok(dev) => Some(dev),
        Err(err) => {
            if gpu_required() {
                panic!("{test}: MOLORA_REQUIRE_GPU=1 but no usable GPU: {err}");
            }
            let why = match gpu_only {
                Some(why) => format!("GPU-only ({why}): {err}"),
                None => err.to_string(),
            };
            skip(
                test,
                &format!("{why} (set MOLORA_REQUIRE_GPU=1 to fail instead)"),
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_reports_first_index_and_values() {
        let tol = Tolerance::for_dtype(DType::F32);
        assert!(compare("ok", &[1.0, 2.0], &[1.0, 2.00001], tol).is_ok());
        let err = compare("bad", &[1.0, 2.5, 3.0], &[1.0, 2.0, 3.5], tol).unwrap_err();
        assert!(err.contains("2 of 3"), "{err}");
        assert!(err.contains("index 1"), "{err}");
        assert!(err.contains("got 2.5"), "{err}");
        assert!(compare("nan", &[f32::NAN], &[1.0], tol).is_err());
        assert!(compare("len", &[1.0], &[1.0, 2.0], tol).is_err());
    }
}
