//! Decoding an autoregressive model's output: greedy search and beam search (with its N-best list,
//! what a second-pass rescorer takes) over any step function that gives the next token's
//! log-probabilities after a prefix.

use crate::error::{Error, Result};

/// One decoded sequence: its tokens (without the start token; with the end token when it ended)
/// and its score, the sum of its tokens' log-probabilities.
#[derive(Debug, Clone, PartialEq)]
pub struct Hypothesis {
    pub tokens: Vec<u32>,
    pub score: f64,
    /// Whether it ended with the end token (else it reached the length limit).
    pub finished: bool,
}

/// Checks one step's output: `vocab` finite-or-−∞ log-probabilities.
fn check_step(lp: &[f32], vocab: usize) -> Result<()> {
    if lp.len() != vocab {
        return Err(Error::len_mismatch(
            "step log-probabilities [V]",
            vocab,
            lp.len(),
        ));
    }
    if let Some(i) = lp.iter().position(|v| v.is_nan() || *v == f32::INFINITY) {
        return Err(Error::NonFinite {
            what: "step log-probabilities",
            index: i,
            value: lp[i],
        });
    }
    Ok(())
}

fn check_token(what: &'static str, t: u32, vocab: usize) -> Result<()> {
    if (t as usize) < vocab {
        Ok(())
    } else {
        Err(Error::InvalidDim {
            what,
            value: t as usize,
            reason: "must be a token id below the vocabulary size",
        })
    }
}

/// The most probable next token at every step (ties to the lower id), from `bos` until `eos` or
/// `max_len` tokens. `step(prefix)` gives the `vocab` log-probabilities of the token after
/// `prefix` (which starts with `bos`).
pub fn greedy(
    vocab: usize,
    bos: u32,
    eos: u32,
    max_len: usize,
    mut step: impl FnMut(&[u32]) -> Result<Vec<f32>>,
) -> Result<Hypothesis> {
    check_token("bos", bos, vocab)?;
    check_token("eos", eos, vocab)?;
    let mut prefix = vec![bos];
    let mut score = 0.0f64;
    for _ in 0..max_len {
        let lp = step(&prefix)?;
        check_step(&lp, vocab)?;
        let (best, &v) =
            lp.iter().enumerate().fold(
                (0, &lp[0]),
                |acc, (i, v)| if *v > *acc.1 { (i, v) } else { acc },
            );
        score += f64::from(v);
        prefix.push(best as u32);
        if best as u32 == eos {
            return Ok(Hypothesis {
                tokens: prefix[1..].to_vec(),
                score,
                finished: true,
            });
        }
    }
    Ok(Hypothesis {
        tokens: prefix[1..].to_vec(),
        score,
        finished: false,
    })
}

/// Beam search of width `beam`: at each step every live hypothesis is extended by each token, the
/// `beam` best extensions (by total log-probability; ties to the earlier hypothesis, then the lower
/// token) are kept, and those that end with `eos` are set aside; it stops when the best finished
/// hypothesis is better than every live one, or after `max_len` tokens. Returns the N-best list
/// (finished hypotheses first when there are any, best first, at most `beam`), ranked by score
/// divided by `length^alpha` (`alpha = 0`: the plain sum).
pub fn beam_search(
    vocab: usize,
    bos: u32,
    eos: u32,
    beam: usize,
    max_len: usize,
    alpha: f64,
    mut step: impl FnMut(&[u32]) -> Result<Vec<f32>>,
) -> Result<Vec<Hypothesis>> {
    beam_search_batch(vocab, bos, eos, beam, max_len, alpha, |prefixes| {
        prefixes.iter().map(|p| step(p)).collect()
    })
}

/// [`beam_search`] with a step function that scores every live hypothesis of a step at once:
/// `step(prefixes)` gives one `vocab`-long row of log-probabilities per prefix (all prefixes of a
/// step have the same length), so a model can run them as one batch.
pub fn beam_search_batch(
    vocab: usize,
    bos: u32,
    eos: u32,
    beam: usize,
    max_len: usize,
    alpha: f64,
    mut step: impl FnMut(&[Vec<u32>]) -> Result<Vec<Vec<f32>>>,
) -> Result<Vec<Hypothesis>> {
    check_token("bos", bos, vocab)?;
    check_token("eos", eos, vocab)?;
    if beam == 0 {
        return Err(Error::InvalidDim {
            what: "beam size",
            value: 0,
            reason: "must be at least 1",
        });
    }
    if !alpha.is_finite() || alpha < 0.0 {
        return Err(Error::InvalidParameter {
            what: "length penalty alpha",
            value: alpha as f32,
            reason: "must be finite and ≥ 0",
        });
    }
    let rank = |h: &Hypothesis| {
        let n = h.tokens.len().max(1) as f64;
        h.score / n.powf(alpha)
    };
    let mut live = vec![(vec![bos], 0.0f64)];
    let mut done: Vec<Hypothesis> = Vec::new();
    for _ in 0..max_len {
        let mut ext: Vec<(usize, u32, f64)> = Vec::with_capacity(live.len() * vocab);
        let prefixes: Vec<Vec<u32>> = live.iter().map(|(p, _)| p.clone()).collect();
        let rows = step(&prefixes)?;
        if rows.len() != live.len() {
            return Err(Error::len_mismatch(
                "step rows (one per live hypothesis)",
                live.len(),
                rows.len(),
            ));
        }
        for (hi, ((_, score), lp)) in live.iter().zip(&rows).enumerate() {
            check_step(lp, vocab)?;
            for (t, &v) in lp.iter().enumerate() {
                if v > f32::NEG_INFINITY {
                    ext.push((hi, t as u32, score + f64::from(v)));
                }
            }
        }
        // Stable sort: ties keep the earlier hypothesis, then the lower token.
        ext.sort_by(|a, b| b.2.total_cmp(&a.2));
        let mut next = Vec::with_capacity(beam);
        for (hi, t, s) in ext {
            if next.len() == beam {
                break;
            }
            let mut tokens = live[hi].0.clone();
            tokens.push(t);
            if t == eos {
                done.push(Hypothesis {
                    tokens: tokens[1..].to_vec(),
                    score: s,
                    finished: true,
                });
            } else {
                next.push((tokens, s));
            }
        }
        live = next;
        // Scores only fall as hypotheses grow, so a finished one beating every live one (by the
        // raw sum) cannot be overtaken when alpha = 0.
        let best_done = done
            .iter()
            .map(|h| h.score)
            .fold(f64::NEG_INFINITY, f64::max);
        if live.is_empty()
            || (alpha == 0.0 && done.len() >= beam && live.iter().all(|(_, s)| *s < best_done))
        {
            break;
        }
    }
    let mut out = done;
    if out.is_empty() {
        out = live
            .into_iter()
            .map(|(tokens, score)| Hypothesis {
                tokens: tokens[1..].to_vec(),
                score,
                finished: false,
            })
            .collect();
    }
    out.sort_by(|a, b| rank(b).total_cmp(&rank(a)));
    out.truncate(beam);
    Ok(out)
}
