//! Word and character error rates: the Levenshtein distance between a hypothesis and a reference
//! (substitutions, deletions and insertions each cost 1) over words or characters, divided by the
//! reference's length, summed over a corpus before dividing (as NIST's sclite and `jiwer` do).

/// The edit counts of one alignment: substitutions, deletions (reference tokens the hypothesis
/// misses), insertions (hypothesis tokens the reference lacks), and the reference length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Edits {
    pub substitutions: usize,
    pub deletions: usize,
    pub insertions: usize,
    pub reference_len: usize,
}

impl Edits {
    /// `S + D + I`.
    pub fn errors(&self) -> usize {
        self.substitutions + self.deletions + self.insertions
    }

    /// `(S + D + I) / N`; 0 for an empty reference with no insertions, `I` (as a rate over one
    /// token) when the reference is empty and the hypothesis is not.
    pub fn rate(&self) -> f64 {
        if self.reference_len == 0 {
            self.insertions as f64
        } else {
            self.errors() as f64 / self.reference_len as f64
        }
    }
}

impl std::ops::Add for Edits {
    type Output = Edits;
    fn add(self, o: Edits) -> Edits {
        Edits {
            substitutions: self.substitutions + o.substitutions,
            deletions: self.deletions + o.deletions,
            insertions: self.insertions + o.insertions,
            reference_len: self.reference_len + o.reference_len,
        }
    }
}

impl std::iter::Sum for Edits {
    fn sum<I: Iterator<Item = Edits>>(iter: I) -> Edits {
        iter.fold(Edits::default(), |a, b| a + b)
    }
}

/// The minimum-cost alignment of `hyp` to `reference` (each edit costs 1; among alignments of equal
/// cost, the one found first when tracing back substitutions, then deletions, then insertions).
pub fn align<T: PartialEq>(reference: &[T], hyp: &[T]) -> Edits {
    let (n, m) = (reference.len(), hyp.len());
    // d[i][j]: distance between reference[..i] and hyp[..j], one row at a time, with the counts.
    let mut prev: Vec<(usize, Edits)> = (0..=m)
        .map(|j| {
            (
                j,
                Edits {
                    insertions: j,
                    ..Edits::default()
                },
            )
        })
        .collect();
    for i in 1..=n {
        let mut cur = Vec::with_capacity(m + 1);
        cur.push((
            i,
            Edits {
                deletions: i,
                ..Edits::default()
            },
        ));
        for j in 1..=m {
            let same = reference[i - 1] == hyp[j - 1];
            let (dd, de) = prev[j - 1];
            let diag = (
                dd + usize::from(!same),
                Edits {
                    substitutions: de.substitutions + usize::from(!same),
                    ..de
                },
            );
            let (ud, ue) = prev[j];
            let up = (
                ud + 1,
                Edits {
                    deletions: ue.deletions + 1,
                    ..ue
                },
            );
            let (ld, le): (usize, Edits) = cur[j - 1];
            let left = (
                ld + 1,
                Edits {
                    insertions: le.insertions + 1,
                    ..le
                },
            );
            let best = if diag.0 <= up.0 && diag.0 <= left.0 {
                diag
            } else if up.0 <= left.0 {
                up
            } else {
                left
            };
            cur.push(best);
        }
        prev = cur;
    }
    Edits {
        reference_len: n,
        ..prev[m].1
    }
}

/// Word edits of `hyp` against `reference` (split on whitespace).
pub fn word_edits(reference: &str, hyp: &str) -> Edits {
    let r: Vec<&str> = reference.split_whitespace().collect();
    let h: Vec<&str> = hyp.split_whitespace().collect();
    align(&r, &h)
}

/// Character edits (spaces included between words, runs of whitespace as one space).
pub fn char_edits(reference: &str, hyp: &str) -> Edits {
    let norm = |s: &str| {
        s.split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .chars()
            .collect::<Vec<char>>()
    };
    align(&norm(reference), &norm(hyp))
}

/// Corpus word error rate of `(reference, hypothesis)` pairs.
pub fn wer<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> f64 {
    pairs
        .into_iter()
        .map(|(r, h)| word_edits(r, h))
        .sum::<Edits>()
        .rate()
}

/// Corpus character error rate of `(reference, hypothesis)` pairs.
pub fn cer<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> f64 {
    pairs
        .into_iter()
        .map(|(r, h)| char_edits(r, h))
        .sum::<Edits>()
        .rate()
}
