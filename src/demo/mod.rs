//! The `molora demo` programs (feature `candle`): each trains the models of [`crate::model`] and
//! reports what it measured.
//!
//! - [`hdmole_speech`]: HDMoLE against full fine-tuning, one LoRA and top-k MoLE on accented speech
//!   (espeak-ng), scored by WER of the decoded held-out sentences (`molora demo hdmole`);
//! - [`lorb_speech`]: LoRB (LoRA for a second-pass rescorer) on the N-best lists of that speech
//!   recogniser's beam (`molora demo lorb`);
//! - [`speech_asr`]: what the two speech demos share (the recogniser, its data, training, scoring);
//! - [`hdmole`], [`lorb`]: the same methods on synthetic tasks (`--data synthetic`);
//! - [`saml`]: SAML on an NF4-quantised Whisper-shaped model, adapted per target speaker (synthetic
//!   speakers);
//! - [`domains`]: the synthetic accent/speaker task the synthetic HDMoLE and SAML demos share.
//!
//! Every demo trains on a [`DemoDevice`] and draws its data and initialisation from one seeded
//! [`Rng`], so a configuration reproduces its report.

pub mod domains;
pub mod hdmole;
pub mod hdmole_speech;
pub mod lorb;
pub mod lorb_speech;
pub mod saml;
pub mod saml_speech;
pub mod speech_asr;

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::model::linear::MoleLinear;
use crate::Rng;
use candle_nn::Optimizer;

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
    /// The candle device. Errors: [`Error::Unsupported`] for `Cuda` in a
    /// build without `candle-cuda`, [`Error::NoDevice`] with candle's reason
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

/// Adam: candle's AdamW without weight decay, at learning rate `lr` (the other settings candle's
/// defaults), the optimiser every demo trains with.
pub(crate) fn adam(vars: Vec<candle_core::Var>, lr: f64) -> Result<candle_nn::AdamW> {
    Ok(candle_nn::AdamW::new(
        vars,
        candle_nn::ParamsAdamW {
            lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?)
}

/// The number of values in `vars`.
pub(crate) fn param_count(vars: &[candle_core::Var]) -> usize {
    vars.iter().map(|v| v.as_tensor().elem_count()).sum()
}

/// A permutation of `0..n` (Fisher–Yates with our generator).
pub(crate) fn shuffled(n: usize, rng: &mut Rng) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        v.swap(i, rng.below(i + 1));
    }
    v
}

/// The learning-rate factor of step `step` of `steps`: linear warm-up over the first tenth, then
/// cosine decay to a tenth.
pub(crate) fn warmup_cosine(step: usize, steps: usize) -> f64 {
    let warmup = (steps / 10).max(1);
    if step < warmup {
        (step + 1) as f64 / warmup as f64
    } else {
        let p = (step - warmup) as f64 / (steps - warmup).max(1) as f64;
        0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
    }
}

/// A learning-rate decay per epoch in (0, 1], else [`Error::InvalidParameter`] naming `lr_decay`.
pub(crate) fn check_decay(lr_decay: f64) -> Result<()> {
    if lr_decay > 0.0 && lr_decay <= 1.0 {
        Ok(())
    } else {
        Err(Error::InvalidParameter {
            what: "lr_decay",
            value: lr_decay as f32,
            reason: "must be in (0, 1]",
        })
    }
}

/// Every count of a demo's settings is at least 1, else [`Error::InvalidDim`] naming
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
/// [`Error::InvalidParameter`] naming the first that is not.
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

/// Writes `report` as `report.json` and each method's adapters (the experts of its `layers`) as
/// `<method>.safetensors` into `dir` (created if missing). Each file is
/// written under a temporary name in `dir` and renamed into place, so a file of that name is always
/// whole: the old one or the new one.
pub(crate) fn write_outputs(
    dir: &Path,
    report: &serde_json::Value,
    saved: &[(&str, &[MoleLinear])],
) -> Result<()> {
    let io = |path: &Path, e: std::io::Error| Error::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    // The temporary name of `file` in `dir` (hidden, and unique to this process).
    let temp = |file: &str| dir.join(format!(".{file}.tmp-{}", std::process::id()));
    let commit = |tmp: &Path, path: &Path| -> Result<()> {
        std::fs::rename(tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(tmp);
            io(path, e)
        })
    };
    let path = dir.join("report.json");
    let text = serde_json::to_string_pretty(report).map_err(|e| Error::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    let tmp = temp("report.json");
    if let Err(e) = std::fs::write(&tmp, text) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(&path, e));
    }
    commit(&tmp, &path)?;
    for (name, model_layers) in saved {
        let mut tensors = BTreeMap::new();
        let mut layers = serde_json::Map::new();
        for l in model_layers.iter() {
            l.save_experts(&mut tensors, &mut layers)?;
        }
        let meta = serde_json::json!({"format": "molora", "version": 1, "layers": layers});
        let mut metadata = BTreeMap::new();
        metadata.insert("molora".to_string(), meta.to_string());
        let file = format!("{name}.safetensors");
        let tmp = temp(&file);
        if let Err(e) = crate::model::weights::save_tensors(&tmp, &tensors, &metadata) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        commit(&tmp, &dir.join(file))?;
    }
    Ok(())
}
