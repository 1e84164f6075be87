//! The synthetic task of the HDMoLE and SAML demos: frame classification, the shape of ASR without
//! alignment.
//!
//! An utterance is `L` tokens from a vocabulary of `V`, each rendered as one frame
//! `x = M_d·(μ_tok + ε) + c_d` (`μ` a fixed prototype per token, `ε` Gaussian noise of `σ`). The
//! general domain (0) has `M = I, c = 0`; each distorted domain `d` (an accent, a speaker) has its
//! own `M_d = I + β·G_d/√d_feat` and offset `c_d`: a different transformation of the general
//! domain's inputs.

use candle_core::{Device, Tensor};

use crate::error::Result;
use crate::Rng;

/// The parameters of [`Domains`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DomainsConfig {
    /// Features per frame.
    pub d_feat: usize,
    /// Tokens in the vocabulary.
    pub vocab: usize,
    /// Noise `σ` of every frame.
    pub noise: f32,
    /// Distorted domains after the general one.
    pub count: usize,
    /// Distortion strength `β`.
    pub strength: f32,
}

/// The synthetic domains: token prototypes and one affine distortion per domain (domain 0 is the
/// general domain, `1..=count` the distorted ones: the HDMoLE demo's accents, the SAML demo's
/// speakers).
#[derive(Debug, Clone)]
pub struct Domains {
    d_feat: usize,
    vocab: usize,
    noise: f32,
    protos: Vec<f32>,
    /// Per domain: `M` `[d_feat, d_feat]` (row-major, `x = M·z + c`) and `c` `[d_feat]`.
    maps: Vec<(Vec<f32>, Vec<f32>)>,
}

impl Domains {
    /// Prototypes `N(0, I)` per token; distorted domain `d`: `M_d = I + β·G_d/√d_feat` (`G` standard
    /// normal), `c_d ~ N(0, I)`.
    pub fn from_config(cfg: &DomainsConfig, rng: &mut Rng) -> Self {
        let &DomainsConfig {
            d_feat,
            vocab,
            noise,
            count,
            strength,
        } = cfg;
        let d = d_feat;
        let protos = (0..vocab * d).map(|_| rng.normal() as f32).collect();
        let mut maps = Vec::with_capacity(count + 1);
        let identity: Vec<f32> = (0..d * d)
            .map(|i| f32::from(u8::from(i / d == i % d)))
            .collect();
        maps.push((identity.clone(), vec![0.0; d]));
        let s = strength / (d as f32).sqrt();
        for _ in 0..count {
            let m = identity
                .iter()
                .map(|&v| v + s * rng.normal() as f32)
                .collect();
            let c = (0..d).map(|_| rng.normal() as f32).collect();
            maps.push((m, c));
        }
        Domains {
            d_feat: d,
            vocab,
            noise,
            protos,
            maps,
        }
    }

    /// `d_feat` features, `vocab` tokens, frame noise `σ`, and `count` distorted domains of strength
    /// `β` after the general one ([`Domains::from_config`] with these fields).
    pub fn with_params(
        d_feat: usize,
        vocab: usize,
        noise: f32,
        count: usize,
        strength: f32,
        rng: &mut Rng,
    ) -> Self {
        Self::from_config(
            &DomainsConfig {
                d_feat,
                vocab,
                noise,
                count,
                strength,
            },
            rng,
        )
    }

    /// The number of domains (general + accents).
    pub fn len(&self) -> usize {
        self.maps.len()
    }

    /// Always false: there is at least the general domain.
    pub fn is_empty(&self) -> bool {
        self.maps.is_empty()
    }

    /// `n` utterances of `frames` frames from `domain`: frames `[n, frames, d_feat]` f32 and labels
    /// `[n, frames]` u32.
    pub fn sample(
        &self,
        domain: usize,
        n: usize,
        frames: usize,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let d = self.d_feat;
        let (m, c) = &self.maps[domain.min(self.maps.len() - 1)];
        let mut x = Vec::with_capacity(n * frames * d);
        let mut y = Vec::with_capacity(n * frames);
        let mut z = vec![0.0f32; d];
        for _ in 0..n * frames {
            let tok = rng.below(self.vocab);
            y.push(tok as u32);
            for (i, zi) in z.iter_mut().enumerate() {
                *zi = self.protos[tok * d + i] + self.noise * rng.normal() as f32;
            }
            for o in 0..d {
                let row = &m[o * d..(o + 1) * d];
                x.push(row.iter().zip(&z).map(|(a, b)| a * b).sum::<f32>() + c[o]);
            }
        }
        Ok((
            Tensor::from_vec(x, (n, frames, d), device)?,
            Tensor::from_vec(y, (n, frames), device)?,
        ))
    }

    /// A batch mixing the given domains evenly (utterance `i` from `domains[i % len]`), with the
    /// domain index of each utterance.
    pub fn sample_mix(
        &self,
        domains: &[usize],
        n: usize,
        frames: usize,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<(Tensor, Tensor, Vec<usize>)> {
        let mut xs = Vec::with_capacity(n);
        let mut ys = Vec::with_capacity(n);
        let mut ds = Vec::with_capacity(n);
        for i in 0..n {
            let dom = domains[i % domains.len()];
            let (x, y) = self.sample(dom, 1, frames, rng, device)?;
            xs.push(x);
            ys.push(y);
            ds.push(dom);
        }
        Ok((Tensor::cat(&xs, 0)?, Tensor::cat(&ys, 0)?, ds))
    }
}
