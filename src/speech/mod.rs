//! Speech front end, synthesis and scoring (feature `speech`, on with `candle`): Whisper's log-mel
//! features ([`mel`]), accented and per-speaker speech from espeak-ng ([`synth`]), and word /
//! character error rates by edit distance ([`wer`]).

pub mod data;
pub mod mel;
pub mod synth;
pub mod wer;
