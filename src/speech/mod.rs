//! Speech front end and scoring (feature `speech`, on with `candle`): Whisper's log-mel features
//! ([`mel`]) and word / character error rates by edit distance ([`wer`]).

pub mod mel;
pub mod wer;
