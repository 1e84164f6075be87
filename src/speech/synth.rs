//! Speech synthesised by espeak-ng (a Debian package; `scripts/speech-deps.sh` installs it), in its
//! English accents and voice variants, at a pitch and rate, resampled to the 16 kHz the log-mel
//! front end takes.
//!
//! espeak-ng writes 22 050 Hz 16-bit mono WAV; [`hound`] reads it and [`rubato`]'s FFT resampler
//! converts it to 16 kHz. The same voice, text and espeak-ng version give the same samples (the tests
//! check it), so a data recipe of voices and sentences is reproducible.

use std::path::{Path, PathBuf};
use std::process::Command;

use rubato::audioadapter_buffers::direct::InterleavedSlice;
use rubato::{Fft, FixedSync, Resampler};

use crate::error::{Error, Result};

use super::mel::SAMPLE_RATE;

/// One synthetic speaker: an espeak-ng voice (`en-us`, `en-gb-scotland`, `en-029`, ...), a voice
/// variant (`m1`..`m7`, `f1`..`f5`, or none), pitch (0–99, espeak's default 50) and rate (words per
/// minute, 80–450, default 175).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Voice {
    pub language: String,
    pub variant: Option<String>,
    pub pitch: u32,
    pub rate: u32,
}

impl Voice {
    /// A voice with espeak-ng's default pitch and rate.
    pub fn new(language: &str, variant: Option<&str>) -> Self {
        Voice {
            language: language.to_string(),
            variant: variant.map(str::to_string),
            pitch: 50,
            rate: 175,
        }
    }

    /// The same voice at another pitch and rate.
    pub fn with(mut self, pitch: u32, rate: u32) -> Self {
        self.pitch = pitch;
        self.rate = rate;
        self
    }

    /// espeak-ng's `-v` argument (`language+variant`).
    pub fn espeak_name(&self) -> String {
        match &self.variant {
            Some(v) => format!("{}+{v}", self.language),
            None => self.language.clone(),
        }
    }

    /// Checks the fields espeak-ng would otherwise reject or silently clamp.
    pub fn check(&self) -> Result<()> {
        let ok_name =
            |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        if !ok_name(&self.language) || self.variant.as_deref().is_some_and(|v| !ok_name(v)) {
            return Err(Error::Unsupported {
                op: "espeak-ng voice",
                what: format!(
                    "voice {:?} (letters, digits and '-' only)",
                    self.espeak_name()
                ),
            });
        }
        if self.pitch > 99 {
            return Err(Error::InvalidDim {
                what: "espeak-ng pitch",
                value: self.pitch as usize,
                reason: "must be in 0..=99",
            });
        }
        if !(80..=450).contains(&self.rate) {
            return Err(Error::InvalidDim {
                what: "espeak-ng rate (words per minute)",
                value: self.rate as usize,
                reason: "must be in 80..=450",
            });
        }
        Ok(())
    }
}

/// The espeak-ng program: `$MOLORA_ESPEAK` or `espeak-ng` on the `PATH`.
pub fn espeak_program() -> PathBuf {
    std::env::var_os("MOLORA_ESPEAK")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("espeak-ng"))
}

/// espeak-ng's version line, or an error that says how to install it.
pub fn espeak_version() -> Result<String> {
    let out = Command::new(espeak_program())
        .arg("--version")
        .output()
        .map_err(|e| missing(&e.to_string()))?;
    if !out.status.success() {
        return Err(missing(&format!(
            "`espeak-ng --version` exited with {}",
            out.status
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn missing(why: &str) -> Error {
    Error::Unsupported {
        op: "speech synthesis",
        what: format!(
            "espeak-ng is needed ({why}): install it with scripts/speech-deps.sh (Debian/Ubuntu: \
             apt-get install espeak-ng), or point MOLORA_ESPEAK at it; `--data synthetic` runs \
             the demos without audio"
        ),
    }
}

/// Text espeak-ng reads as words: letters, digits, spaces and basic punctuation only (no SSML, no
/// option-looking text).
fn check_text(text: &str) -> Result<()> {
    let ok = !text.trim().is_empty()
        && !text.starts_with('-')
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || " ',.?!".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::Unsupported {
            op: "speech synthesis",
            what: format!("text {text:?} (ASCII letters, digits, spaces and ',.?! only)"),
        })
    }
}

/// `text` spoken by `voice`, as 16 kHz mono samples in `[-1, 1]`. `scratch` is a directory for
/// espeak-ng's WAV file (removed after reading).
pub fn synthesize(voice: &Voice, text: &str, scratch: &Path) -> Result<Vec<f32>> {
    voice.check()?;
    check_text(text)?;
    // One file per call (process id and a counter), so concurrent calls never share one.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let wav = scratch.join(format!("espeak-{}-{n}.wav", std::process::id()));
    let status = Command::new(espeak_program())
        .arg("-v")
        .arg(voice.espeak_name())
        .arg("-p")
        .arg(voice.pitch.to_string())
        .arg("-s")
        .arg(voice.rate.to_string())
        .arg("-w")
        .arg(&wav)
        .arg("--")
        .arg(text)
        .status()
        .map_err(|e| missing(&e.to_string()))?;
    if !status.success() {
        return Err(Error::Unsupported {
            op: "speech synthesis",
            what: format!(
                "espeak-ng -v {} exited with {status} on {text:?}",
                voice.espeak_name()
            ),
        });
    }
    let read = read_wav(&wav);
    // The file is ours and temporary; a failure to remove it does not change the samples.
    let _ = std::fs::remove_file(&wav);
    let (samples, rate) = read?;
    resample(&samples, rate, SAMPLE_RATE)
}

/// A mono 16-bit PCM WAV file's samples in `[-1, 1]` and its sample rate.
pub fn read_wav(path: &Path) -> Result<(Vec<f32>, u32)> {
    let io = |e: hound::Error| Error::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let mut reader = hound::WavReader::open(path).map_err(io)?;
    let spec = reader.spec();
    if spec.channels != 1
        || spec.bits_per_sample != 16
        || spec.sample_format != hound::SampleFormat::Int
    {
        return Err(Error::Unsupported {
            op: "read_wav",
            what: format!(
                "{}: {} channels of {}-bit {:?} (mono 16-bit PCM is read)",
                path.display(),
                spec.channels,
                spec.bits_per_sample,
                spec.sample_format
            ),
        });
    }
    let samples = reader
        .samples::<i16>()
        .map(|s| s.map(|v| f32::from(v) / 32768.0))
        .collect::<std::result::Result<Vec<f32>, _>>()
        .map_err(io)?;
    Ok((samples, spec.sample_rate))
}

/// `samples` at `from` Hz resampled to `to` Hz by rubato's FFT resampler (its start-up delay
/// trimmed), `ceil(n·to/from)` samples.
pub fn resample(samples: &[f32], from: u32, to: u32) -> Result<Vec<f32>> {
    if from == to || samples.is_empty() {
        return Ok(samples.to_vec());
    }
    let err = |what: String| Error::Unsupported {
        op: "resample",
        what,
    };
    let mut r = Fft::<f32>::new(from as usize, to as usize, 1024, 1, FixedSync::Input)
        .map_err(|e| err(format!("{from} Hz to {to} Hz: {e}")))?;
    let input = InterleavedSlice::new(samples, 1, samples.len()).map_err(|e| err(e.to_string()))?;
    let mut out = vec![0.0f32; r.process_all_needed_output_len(samples.len())];
    let frames = out.len();
    let mut output =
        InterleavedSlice::new_mut(&mut out, 1, frames).map_err(|e| err(e.to_string()))?;
    let (_, n) = r
        .process_all_into_buffer(&input, &mut output, samples.len(), None)
        .map_err(|e| err(e.to_string()))?;
    out.truncate(n);
    Ok(out)
}
