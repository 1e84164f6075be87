//! The `molora demo` programs (feature `candle`): each trains the models of [`crate::model`] on a
//! deterministic synthetic task and reports what it measured.
//!
//! - [`hdmole`]: HDMoLE against full fine-tuning, one LoRA and top-k MoLE on a multi-accent task;
//! - [`saml`]: SAML on an NF4-quantised Whisper-shaped model, adapted per target speaker;
//! - [`lorb`]: LoRB (LoRA for a second-pass rescorer) adapted to a new domain of N-best lists;
//! - [`domains`]: the synthetic accent/speaker task the HDMoLE and SAML demos share.
//!
//! Every demo trains on a [`DemoDevice`] and draws its data and initialisation from one seeded
//! [`Rng`](crate::Rng), so a configuration reproduces its report.

pub mod domains;
pub mod hdmole;
pub mod lorb;
pub mod saml;

/// Where a demo trains: candle's CPU backend, or a CUDA device through candle's CUDA backend with
/// molora's kernels behind the custom ops (feature `candle-cuda`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DemoDevice {
    #[default]
    Cpu,
    /// The CUDA device of this ordinal.
    Cuda(usize),
}

impl DemoDevice {
    /// The candle device. Errors: [`Error::Unsupported`](crate::Error::Unsupported) for `Cuda` in a
    /// build without `candle-cuda`, [`Error::NoDevice`](crate::Error::NoDevice) with candle's reason
    /// when the device cannot be opened.
    pub fn candle(&self) -> crate::Result<candle_core::Device> {
        match self {
            DemoDevice::Cpu => Ok(candle_core::Device::Cpu),
            DemoDevice::Cuda(ordinal) => {
                if !cfg!(feature = "candle-cuda") {
                    return Err(crate::Error::Unsupported {
                        op: "demo device",
                        what: format!(
                            "CUDA device {ordinal}: this build has no candle CUDA backend \
                             (build with `--features candle-cuda`)"
                        ),
                    });
                }
                candle_core::Device::new_cuda(*ordinal).map_err(|e| crate::Error::NoDevice {
                    reason: format!("candle could not open CUDA device {ordinal}: {e}"),
                })
            }
        }
    }
}

/// Every count of a demo's settings is at least 1, else [`Error::InvalidDim`](crate::Error) naming
/// the first that is 0.
pub(crate) fn check_counts(counts: &[(&'static str, usize)]) -> crate::Result<()> {
    match counts.iter().find(|(_, v)| *v == 0) {
        Some(&(what, _)) => Err(crate::Error::InvalidDim {
            what,
            value: 0,
            reason: "the demo needs at least 1",
        }),
        None => Ok(()),
    }
}

/// Every learning rate is finite and greater than 0, else
/// [`Error::InvalidParameter`](crate::Error) naming the first that is not.
pub(crate) fn check_learning_rates(rates: &[(&'static str, f64)]) -> crate::Result<()> {
    match rates.iter().find(|(_, v)| !(v.is_finite() && *v > 0.0)) {
        Some(&(what, v)) => Err(crate::Error::InvalidParameter {
            what,
            value: v as f32,
            reason: "a learning rate must be finite and greater than 0",
        }),
        None => Ok(()),
    }
}
