//! Speech front end, synthesis and scoring (feature `speech`, on with `candle`): Whisper's log-mel
//! features ([`mel`]), accented and per-speaker speech from espeak-ng ([`synth`]) and the demos' data
//! recipe over it ([`data`]), the grammar's word tokens ([`text`]), word / character error rates by edit distance ([`wer`]), greedy and beam-search decoding ([`decode`]).

pub mod data;
pub mod decode;
pub mod mel;
pub mod synth;
pub mod text;
pub mod wer;
