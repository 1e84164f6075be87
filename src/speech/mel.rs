//! Log-mel features as Whisper computes them: 16 kHz audio, a 25 ms periodic Hann window (400
//! samples), a 10 ms hop (160), the power spectrum of a 400-point FFT (201 bins), 80 mel filters
//! (Slaney's mel scale and area normalisation, 0–8 kHz, as librosa and Whisper build them), then
//! `log10(max(m, 1e-10))`, clamped to 8 below the maximum, and `(x + 4) / 4`.
//!
//! The FFT is `realfft`'s; [`power_spectrum_dft`] is the direct `O(N²)` transform the tests hold it
//! to.

use std::sync::Arc;

use realfft::{RealFftPlanner, RealToComplex};

use crate::error::{Error, Result};

/// Sample rate the features are defined for.
pub const SAMPLE_RATE: u32 = 16_000;
/// FFT size and window length (25 ms).
pub const N_FFT: usize = 400;
/// Hop between frames (10 ms).
pub const HOP: usize = 160;
/// Mel bins.
pub const N_MELS: usize = 80;
/// Frequency bins of the one-sided spectrum.
pub const N_FREQS: usize = N_FFT / 2 + 1;

/// The periodic Hann window of length `n`: `w[i] = 0.5 − 0.5·cos(2πi/n)`.
pub fn hann(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / n as f64).cos()) as f32)
        .collect()
}

fn hz_to_mel(f: f64) -> f64 {
    // Slaney: linear below 1 kHz (3 mels per 200 Hz), logarithmic above.
    let (f_sp, min_log_hz) = (200.0 / 3.0, 1000.0);
    let min_log_mel = min_log_hz / f_sp;
    let logstep = (6.4f64).ln() / 27.0;
    if f >= min_log_hz {
        min_log_mel + (f / min_log_hz).ln() / logstep
    } else {
        f / f_sp
    }
}

fn mel_to_hz(m: f64) -> f64 {
    let (f_sp, min_log_hz) = (200.0 / 3.0, 1000.0);
    let min_log_mel = min_log_hz / f_sp;
    let logstep = (6.4f64).ln() / 27.0;
    if m >= min_log_mel {
        min_log_hz * (logstep * (m - min_log_mel)).exp()
    } else {
        f_sp * m
    }
}

/// The mel filterbank `[n_mels, n_fft/2 + 1]` (row-major): triangles between `n_mels + 2` points
/// equally spaced on Slaney's mel scale from `f_min` to `f_max`, each scaled by `2/(f_{i+2} − f_i)`
/// (equal area), as `librosa.filters.mel(norm="slaney")` builds them.
pub fn mel_filters(
    sample_rate: u32,
    n_fft: usize,
    n_mels: usize,
    f_min: f64,
    f_max: f64,
) -> Vec<f32> {
    let n_freqs = n_fft / 2 + 1;
    let fft_freqs: Vec<f64> = (0..n_freqs)
        .map(|i| i as f64 * f64::from(sample_rate) / n_fft as f64)
        .collect();
    let (m_min, m_max) = (hz_to_mel(f_min), hz_to_mel(f_max));
    let pts: Vec<f64> = (0..n_mels + 2)
        .map(|i| mel_to_hz(m_min + (m_max - m_min) * i as f64 / (n_mels + 1) as f64))
        .collect();
    let mut w = vec![0.0f32; n_mels * n_freqs];
    for m in 0..n_mels {
        let (lo, mid, hi) = (pts[m], pts[m + 1], pts[m + 2]);
        let enorm = 2.0 / (hi - lo);
        for (k, &f) in fft_freqs.iter().enumerate() {
            let lower = (f - lo) / (mid - lo);
            let upper = (hi - f) / (hi - mid);
            w[m * n_freqs + k] = (enorm * lower.min(upper).max(0.0)) as f32;
        }
    }
    w
}

/// The direct DFT power spectrum of one windowed frame: `|Σ_n x[n]·e^{−2πikn/N}|²` for
/// `k ≤ N/2`, in f64. The reference the FFT path is tested against.
pub fn power_spectrum_dft(frame: &[f32]) -> Vec<f64> {
    let n = frame.len();
    (0..=n / 2)
        .map(|k| {
            let (mut re, mut im) = (0.0f64, 0.0f64);
            for (t, &v) in frame.iter().enumerate() {
                let ang = -2.0 * std::f64::consts::PI * (k * t % n) as f64 / n as f64;
                re += f64::from(v) * ang.cos();
                im += f64::from(v) * ang.sin();
            }
            re * re + im * im
        })
        .collect()
}

/// Computes Whisper's log-mel features; holds the FFT plan, window and filterbank.
pub struct LogMel {
    fft: Arc<dyn RealToComplex<f32>>,
    window: Vec<f32>,
    filters: Vec<f32>,
}

impl std::fmt::Debug for LogMel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogMel")
            .field("n_fft", &N_FFT)
            .field("n_mels", &N_MELS)
            .finish()
    }
}

impl Default for LogMel {
    fn default() -> Self {
        Self::new()
    }
}

impl LogMel {
    /// Whisper's parameters (16 kHz, 400-point FFT, hop 160, 80 mels, 0–8 kHz).
    pub fn new() -> Self {
        LogMel {
            fft: RealFftPlanner::<f32>::new().plan_fft_forward(N_FFT),
            window: hann(N_FFT),
            filters: mel_filters(SAMPLE_RATE, N_FFT, N_MELS, 0.0, 8000.0),
        }
    }

    /// Frames of `n` samples: `n / HOP` (Whisper's centred STFT has `1 + n/HOP` and drops the last).
    pub fn num_frames(n: usize) -> usize {
        n / HOP
    }

    /// The power spectra `[frames, N_FREQS]` of the centred STFT (the signal reflect-padded by
    /// `N_FFT/2` on both sides), the last frame dropped as Whisper does.
    pub fn power_spectra(&self, samples: &[f32]) -> Result<Vec<f32>> {
        let n = samples.len();
        if n <= N_FFT / 2 {
            return Err(Error::InvalidDim {
                what: "audio samples",
                value: n,
                reason: "the centred STFT reflects N_FFT/2 = 200 samples at each end, so it needs more than 200",
            });
        }
        let pad = N_FFT / 2;
        // Reflect padding (no edge repeat), as numpy's / torch's "reflect".
        let at = |i: isize| -> f32 {
            let n = n as isize;
            let j = if i < 0 {
                -i
            } else if i >= n {
                2 * (n - 1) - i
            } else {
                i
            };
            samples[j as usize]
        };
        let frames = Self::num_frames(n);
        let mut out = vec![0.0f32; frames * N_FREQS];
        let mut input = self.fft.make_input_vec();
        let mut spec = self.fft.make_output_vec();
        for f in 0..frames {
            let start = (f * HOP) as isize - pad as isize;
            for (i, v) in input.iter_mut().enumerate() {
                *v = at(start + i as isize) * self.window[i];
            }
            self.fft
                .process(&mut input, &mut spec)
                .map_err(|e| Error::Unsupported {
                    op: "LogMel",
                    what: format!("FFT: {e}"),
                })?;
            for (o, c) in out[f * N_FREQS..(f + 1) * N_FREQS].iter_mut().zip(&spec) {
                *o = c.re * c.re + c.im * c.im;
            }
        }
        Ok(out)
    }

    /// The log-mel features `[N_MELS, frames]` (row-major, Whisper's layout) of 16 kHz `samples`.
    pub fn features(&self, samples: &[f32]) -> Result<Vec<f32>> {
        if let Some(i) = samples.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite {
                what: "audio samples",
                index: i,
                value: samples[i],
            });
        }
        let power = self.power_spectra(samples)?;
        let frames = power.len() / N_FREQS;
        let mut mel = vec![0.0f32; N_MELS * frames];
        for f in 0..frames {
            let p = &power[f * N_FREQS..(f + 1) * N_FREQS];
            for m in 0..N_MELS {
                let w = &self.filters[m * N_FREQS..(m + 1) * N_FREQS];
                let e: f32 = w.iter().zip(p).map(|(a, b)| a * b).sum();
                mel[m * frames + f] = e.max(1e-10).log10();
            }
        }
        let top = mel.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for v in mel.iter_mut() {
            *v = (v.max(top - 8.0) + 4.0) / 4.0;
        }
        Ok(mel)
    }
}
