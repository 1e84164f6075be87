//! Model assembly on candle (feature `candle`): [`MoleLinear`](linear::MoleLinear), the HDMoLE model
//! and its demo, and weights in safetensors (our expert files and PEFT LoRA adapters).

pub mod demo;
pub mod hdmole;
pub mod inspect;
pub mod linear;
pub mod lorb;
pub mod nn;
pub mod saml;
pub mod saml_demo;
pub mod weights;

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
