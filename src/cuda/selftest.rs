//! The self-test kernels of `cuda/selftest.cu` (`cuda/include/molora_selftest.h`): small kernels
//! whose answers the CUDA documentation and the PTX ISA fix (shuffles and votes, wmma, mma.sync,
//! ldmatrix, cp.async groups), so that the emulated device and a GPU are held to the same answer, and
//! kernels with one planted bug each, which the emulated device must report. They are not product
//! kernels; `tests/emu_selftest.rs` runs them.

use super::device::Device;
use super::ffi;
use super::launch::Launch;
use crate::{Error, Result};

/// One self-test kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelfTest {
    /// 64 threads: per thread 13 values, `__shfl_xor_sync` (5), `__shfl_up_sync` (3),
    /// `__shfl_down_sync` (7), `__shfl_sync` (lane `(7·lane + 3) % 32`), the same with width 8
    /// (xor 3, up 2, lane 5), `__ballot_sync(v > 0.5)` (low and high 16 bits), `__any_sync(v > 0.9)`,
    /// `__all_sync(v > 0.05)`, `__match_any_sync((int)(4v))` (low and high 16 bits).
    Shuffles,
    /// wmma 16×16×16: `D = A·B`, A `[16][16]` row-major, B `[16][16]` (`B[k][n]`) loaded column-major,
    /// f16 inputs (rounded from the f32 input), f32 output `[16][16]` row-major.
    Wmma,
    /// One `mma.sync.m16n8k16` (f16, f32 accumulators) with every lane's fragments built from global
    /// memory by the PTX ISA's layout: `D [16][8] = A [16][16] · B [16][8]`.
    Mma,
    /// Four 8×8 f16 matrices loaded by `ldmatrix.x4` and `ldmatrix.x4.trans`; per lane 16 values.
    Ldmatrix,
    /// Two `cp.async` groups per lane (the second zero-filled on odd lanes): `wait_group 1` lands the
    /// first, `wait_group 0` the second; the output is both copies.
    CpAsync,
    /// Planted bug: a store one element past the end of the output.
    BugOobGlobalWrite,
    /// Planted bug: a load one element past a 32-element shared array.
    BugOobSharedRead,
    /// Planted bug: a shared-memory write read by another warp's thread with no `__syncthreads()`.
    BugMissingSyncthreads,
    /// Planted bug: `__syncthreads()` in a branch that half of the block skips.
    BugDivergentBarrier,
    /// Planted bug: a full-mask `__shfl_xor_sync` that lane 31 never reaches.
    BugShuffleMask,
    /// Planted bug: the [`SelfTest::Mma`] kernel with rows `g` and `g + 8` of A swapped (a wrong answer).
    BugMmaFragment,
    /// Planted bug: the [`SelfTest::Wmma`] kernel storing D column-major (a wrong answer).
    BugWmmaLayout,
    /// Planted bug: a launch with 100 KiB of dynamic shared memory and no opt-in (refused, also on a GPU).
    BugSmemLimit,
    /// Planted bug: a kernel reading device memory that nothing wrote (emulated device only).
    BugUninitRead,
}

impl SelfTest {
    /// The primitive checks, which run on every device.
    pub const PRIMITIVES: [SelfTest; 5] = [
        SelfTest::Shuffles,
        SelfTest::Wmma,
        SelfTest::Mma,
        SelfTest::Ldmatrix,
        SelfTest::CpAsync,
    ];

    /// The planted bugs.
    pub const PLANTED_BUGS: [SelfTest; 9] = [
        SelfTest::BugOobGlobalWrite,
        SelfTest::BugOobSharedRead,
        SelfTest::BugMissingSyncthreads,
        SelfTest::BugDivergentBarrier,
        SelfTest::BugShuffleMask,
        SelfTest::BugMmaFragment,
        SelfTest::BugWmmaLayout,
        SelfTest::BugSmemLimit,
        SelfTest::BugUninitRead,
    ];

    fn code(self) -> i32 {
        (match self {
            SelfTest::Shuffles => ffi::MOLORA_SELFTEST_SHUFFLES,
            SelfTest::Wmma => ffi::MOLORA_SELFTEST_WMMA,
            SelfTest::Mma => ffi::MOLORA_SELFTEST_MMA,
            SelfTest::Ldmatrix => ffi::MOLORA_SELFTEST_LDMATRIX,
            SelfTest::CpAsync => ffi::MOLORA_SELFTEST_CP_ASYNC,
            SelfTest::BugOobGlobalWrite => ffi::MOLORA_SELFTEST_BUG_OOB_GLOBAL_WRITE,
            SelfTest::BugOobSharedRead => ffi::MOLORA_SELFTEST_BUG_OOB_SHARED_READ,
            SelfTest::BugMissingSyncthreads => ffi::MOLORA_SELFTEST_BUG_MISSING_SYNCTHREADS,
            SelfTest::BugDivergentBarrier => ffi::MOLORA_SELFTEST_BUG_DIVERGENT_BARRIER,
            SelfTest::BugShuffleMask => ffi::MOLORA_SELFTEST_BUG_SHUFFLE_MASK,
            SelfTest::BugMmaFragment => ffi::MOLORA_SELFTEST_BUG_MMA_FRAGMENT,
            SelfTest::BugWmmaLayout => ffi::MOLORA_SELFTEST_BUG_WMMA_LAYOUT,
            SelfTest::BugSmemLimit => ffi::MOLORA_SELFTEST_BUG_SMEM_LIMIT,
            SelfTest::BugUninitRead => ffi::MOLORA_SELFTEST_BUG_UNINIT_READ,
        }) as i32
    }

    /// Floats of input the kernel reads.
    pub fn input_len(self) -> usize {
        // SAFETY: a pure function of an integer.
        let n = unsafe { ffi::molora_selftest_in_len(self.code()) };
        usize::try_from(n).unwrap_or(0)
    }

    /// Floats of output the kernel writes.
    pub fn output_len(self) -> usize {
        // SAFETY: a pure function of an integer.
        let n = unsafe { ffi::molora_selftest_out_len(self.code()) };
        usize::try_from(n).unwrap_or(0)
    }

    /// Whether the kernel would corrupt memory or hang on a GPU (every planted bug but the refused
    /// launch, and the wrong-answer ones, which are harmless).
    pub fn unsafe_on_gpu(self) -> bool {
        matches!(
            self,
            SelfTest::BugOobGlobalWrite
                | SelfTest::BugOobSharedRead
                | SelfTest::BugMissingSyncthreads
                | SelfTest::BugDivergentBarrier
                | SelfTest::BugShuffleMask
                | SelfTest::BugUninitRead
        )
    }
}

/// Runs a self-test kernel on `input` (of [`SelfTest::input_len`] floats; ignored, and the input left
/// unwritten, for [`SelfTest::BugUninitRead`]) and returns its output. The kernels of
/// [`SelfTest::unsafe_on_gpu`] run on the emulated device only ([`Error::Unsupported`] on a GPU); a bug
/// the emulator catches is an [`Error::Cuda`] whose message is its report.
pub fn run_selftest(dev: &Device, test: SelfTest, input: &[f32]) -> Result<Vec<f32>> {
    const OP: &str = "run_selftest";
    if test.unsafe_on_gpu() && !dev.is_emulated() {
        return Err(Error::Unsupported {
            op: OP,
            what: format!(
                "the planted bug {test:?} on a GPU (it runs on the emulated device only)"
            ),
        });
    }
    let (in_len, out_len) = (test.input_len(), test.output_len());
    let input_buf = if test == SelfTest::BugUninitRead {
        dev.alloc_unwritten::<f32>(in_len)?
    } else {
        crate::error::check_len("self-test input", in_len, input.len())?;
        dev.upload(input)?
    };
    let mut out = dev.zeros::<f32>(out_len)?;
    {
        let mut l = Launch::new(dev, OP);
        let args = ffi::molora_selftest_args {
            kind: test.code(),
            in_: l.input("self-test input", &input_buf, in_len)?,
            in_len: in_len as i64,
            out: l.output("self-test output", &mut out, out_len)?,
            out_len: out_len as i64,
        };
        // SAFETY: both buffers are this device's and hold exactly the lengths the kind needs (checked
        // by the launch and again by the launcher). Only the emulated device runs the kinds that
        // access memory out of bounds or hang (refused above on a GPU).
        unsafe { l.run(&kernel!(molora_selftest, molora_emu_selftest), &args)? };
    }
    dev.download(&out)
}
