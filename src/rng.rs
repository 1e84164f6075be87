//! The deterministic random number generator of the crate: the initialisation of the model layers
//! (they take `&mut Rng`), their dropout, and the demos' synthetic data all draw from it, so a seed
//! reproduces a run exactly on every machine. The tests, benches and examples use it for their inputs.

use crate::dtype::Element;

/// A small deterministic generator (xorshift64): a seed gives the same values on every machine, with
/// no dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from any seed (0 included).
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15 | 1)
    }
    /// The next 64 bits of the xorshift64 sequence.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.uniform() * n as f64) as usize).min(n.saturating_sub(1))
    }
    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform().max(1e-300), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
    /// `n` values uniform in `[-scale, scale)`, rounded to `T`.
    pub fn values<T: Element>(&mut self, n: usize, scale: f32) -> Vec<T> {
        (0..n)
            .map(|_| T::from_f32((self.uniform() as f32 * 2.0 - 1.0) * scale))
            .collect()
    }
    /// `n` normal values with standard deviation `scale`.
    pub fn normals(&mut self, n: usize, scale: f64) -> Vec<f64> {
        (0..n).map(|_| self.normal() * scale).collect()
    }
    /// `n` f64 values uniform in `[-scale, scale)`.
    pub fn values_f64(&mut self, n: usize, scale: f64) -> Vec<f64> {
        (0..n)
            .map(|_| (self.uniform() * 2.0 - 1.0) * scale)
            .collect()
    }
}
