//! The speech demos' tokens: one per word of the grammar's vocabulary, after the end token (0) and
//! the start token (1).

use crate::error::{Error, Result};

use super::data::vocabulary;

/// Words ↔ token ids over a fixed vocabulary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Words {
    words: Vec<String>,
}

impl Words {
    /// The end-of-transcript token.
    pub const EOS: u32 = 0;
    /// The start token the decoder reads first.
    pub const BOS: u32 = 1;

    /// The tokens of the grammar's vocabulary ([`vocabulary`]).
    pub fn grammar() -> Self {
        Words {
            words: vocabulary(),
        }
    }

    /// Tokens in all: the words and the two special tokens.
    pub fn len(&self) -> usize {
        self.words.len() + 2
    }

    /// Never: there are always the two special tokens.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The token ids of `text`'s words (split on whitespace). Errors: a word outside the
    /// vocabulary, named.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        text.split_whitespace()
            .map(
                |w| match self.words.binary_search_by(|v| v.as_str().cmp(w)) {
                    Ok(i) => Ok(i as u32 + 2),
                    Err(_) => Err(Error::Unsupported {
                        op: "speech::text::Words::encode",
                        what: format!("the word {w:?} is not in the vocabulary"),
                    }),
                },
            )
            .collect()
    }

    /// The words of `ids`, space-separated; the special tokens and unknown ids are left out.
    pub fn decode(&self, ids: &[u32]) -> String {
        ids.iter()
            .filter_map(|&t| (t as usize).checked_sub(2).and_then(|i| self.words.get(i)))
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(" ")
    }
}
