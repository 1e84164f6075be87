//! The speech demos' data: sentences from a small grammar (commands, numbers, names), split into
//! training and held-out sentences, spoken by espeak-ng voices grouped into domains (HDMoLE's accents,
//! SAML's speakers), turned into log-mel features, and cached on disk under a name derived from the
//! whole recipe and espeak-ng's version, so a changed recipe is regenerated and an unchanged one is
//! read back.
//!
//! Everything is deterministic: the same recipe (seed included) gives the same utterances, the same
//! samples and the same feature bytes.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::Rng;

use super::mel::{LogMel, N_MELS};
use super::synth::{espeak_version, synthesize, Voice};

const VERBS: [&str; 6] = ["turn on", "turn off", "check", "open", "close", "clean"];
const DEVICES: [&str; 12] = [
    "light", "fan", "heater", "window", "door", "radio", "oven", "lamp", "shower", "fridge",
    "kettle", "speaker",
];
const ROOMS: [&str; 12] = [
    "kitchen", "bedroom", "garage", "office", "hallway", "garden", "bathroom", "attic", "cellar",
    "library", "studio", "basement",
];
const SETTINGS: [&str; 8] = [
    "timer",
    "alarm",
    "volume",
    "temperature",
    "brightness",
    "thermostat",
    "speed",
    "channel",
];
const NUMBERS: [&str; 24] = [
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
    "thirty",
    "forty",
    "fifty",
    "sixty",
];
const NAMES: [&str; 20] = [
    "anna", "peter", "maria", "david", "sofia", "james", "laura", "thomas", "emma", "oliver",
    "george", "helen", "robert", "julia", "michael", "sarah", "daniel", "rachel", "simon", "grace",
];
const WHEN: [&str; 7] = [
    "now",
    "today",
    "tomorrow",
    "tonight",
    "later",
    "at noon",
    "this evening",
];
const GENRES: [&str; 10] = [
    "jazz",
    "rock",
    "classical",
    "folk",
    "blues",
    "pop",
    "country",
    "reggae",
    "soul",
    "gospel",
];

/// Every sentence of the grammar, in a fixed order (1316 sentences over 109 words):
/// `VERB the DEVICE in the ROOM`, `set the SETTING to NUMBER`, `call NAME WHEN`,
/// `play GENRE music in the ROOM`.
pub fn grammar() -> Vec<String> {
    let mut out = Vec::new();
    for v in VERBS {
        for d in DEVICES {
            for r in ROOMS {
                out.push(format!("{v} the {d} in the {r}"));
            }
        }
    }
    for s in SETTINGS {
        for n in NUMBERS {
            out.push(format!("set the {s} to {n}"));
        }
    }
    for n in NAMES {
        for w in WHEN {
            out.push(format!("call {n} {w}"));
        }
    }
    for g in GENRES {
        for r in ROOMS {
            out.push(format!("play {g} music in the {r}"));
        }
    }
    out
}

/// The words of the grammar, sorted.
pub fn vocabulary() -> Vec<String> {
    let words: BTreeSet<String> = grammar()
        .iter()
        .flat_map(|s| s.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .collect();
    words.into_iter().collect()
}

/// The grammar's sentences split by `seed` into training sentences and held-out sentences (a
/// `held_out` fraction, never in training).
pub fn split_sentences(seed: u64, held_out: f64) -> Result<(Vec<String>, Vec<String>)> {
    if !(0.0..1.0).contains(&held_out) {
        return Err(Error::InvalidParameter {
            what: "held-out fraction",
            value: held_out as f32,
            reason: "must be in [0, 1)",
        });
    }
    let mut all = grammar();
    let mut rng = Rng::new(seed ^ 0x5e47);
    // Fisher–Yates with the crate's generator.
    for i in (1..all.len()).rev() {
        let j = (rng.uniform() * (i + 1) as f64) as usize % (i + 1);
        all.swap(i, j);
    }
    let n_test = ((all.len() as f64) * held_out).round() as usize;
    let test = all.split_off(all.len() - n_test);
    Ok((all, test))
}

/// A domain: a name and the voices that speak it (an accent's variants, or one speaker).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Domain {
    pub name: String,
    pub voices: Vec<Voice>,
}

/// HDMoLE's domains: the general domain in `en-us`, then four espeak-ng English accents, each
/// spoken by `variants` voice variants.
pub fn accent_domains(variants: usize) -> Vec<Domain> {
    const VARIANTS: [&str; 6] = ["m1", "f1", "m3", "f2", "m5", "f4"];
    let take = variants.clamp(1, VARIANTS.len());
    [
        ("general (en-us)", "en-us"),
        ("scottish", "en-gb-scotland"),
        ("caribbean", "en-029"),
        ("lancastrian", "en-gb-x-gbclan"),
        ("west midlands", "en-gb-x-gbcwmd"),
    ]
    .iter()
    .map(|(name, lang)| Domain {
        name: name.to_string(),
        voices: VARIANTS[..take]
            .iter()
            .map(|v| Voice::new(lang, Some(v)))
            .collect(),
    })
    .collect()
}

/// SAML's speakers: one domain per (variant, pitch, rate) speaker of a language.
pub fn speaker_domains(language: &str, speakers: &[(&str, u32, u32)]) -> Vec<Domain> {
    speakers
        .iter()
        .map(|(variant, pitch, rate)| Domain {
            name: format!("{language}+{variant} p{pitch} r{rate}"),
            voices: vec![Voice::new(language, Some(variant)).with(*pitch, *rate)],
        })
        .collect()
}

/// What to generate: the domains, how many training and held-out utterances each gets, and the
/// seed that picks sentences and voices.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Recipe {
    pub domains: Vec<Domain>,
    pub train_per_domain: usize,
    pub test_per_domain: usize,
    pub seed: u64,
    /// Held-out fraction of the grammar's sentences, in thousandths (kept integral so the recipe
    /// hashes exactly).
    pub held_out_permille: u32,
}

/// One utterance: its domain, voice, text and features.
#[derive(Debug, Clone, PartialEq)]
pub struct Utterance {
    pub domain: usize,
    pub voice: Voice,
    pub text: String,
    /// Log-mel features `[frames, N_MELS]` (frame-major, as a model reads them).
    pub features: Vec<f32>,
    pub frames: usize,
}

/// A generated (or cached) corpus.
#[derive(Debug, Clone)]
pub struct Corpus {
    pub train: Vec<Utterance>,
    pub test: Vec<Utterance>,
    /// Where it is cached.
    pub dir: PathBuf,
    /// Whether it was read from the cache rather than synthesised now.
    pub cached: bool,
}

impl Recipe {
    /// The utterances to make: `(domain, voice, text, held_out)`, deterministic in the recipe.
    pub fn plan(&self) -> Result<Vec<(usize, Voice, String, bool)>> {
        if self.domains.is_empty() || self.domains.iter().any(|d| d.voices.is_empty()) {
            return Err(Error::InvalidDim {
                what: "recipe domains (each with at least one voice)",
                value: self.domains.len(),
                reason: "a recipe needs at least one domain, each with a voice",
            });
        }
        let (train, test) = split_sentences(self.seed, f64::from(self.held_out_permille) / 1000.0)?;
        let mut rng = Rng::new(self.seed);
        let mut out = Vec::new();
        for (di, d) in self.domains.iter().enumerate() {
            for (count, pool, held) in [
                (self.train_per_domain, &train, false),
                (self.test_per_domain, &test, true),
            ] {
                if count > 0 && pool.is_empty() {
                    return Err(Error::InvalidDim {
                        what: "sentences to draw from",
                        value: 0,
                        reason: "the held-out fraction leaves no sentences for this split",
                    });
                }
                for _ in 0..count {
                    let s = (rng.uniform() * pool.len() as f64) as usize % pool.len();
                    let v = (rng.uniform() * d.voices.len() as f64) as usize % d.voices.len();
                    out.push((di, d.voices[v].clone(), pool[s].clone(), held));
                }
            }
        }
        Ok(out)
    }

    /// A name for the recipe and synthesiser: FNV-1a of the recipe's description and espeak-ng's
    /// version, so any change to either gives another cache directory.
    pub fn cache_key(&self, espeak: &str) -> String {
        let text = format!("{self:?}|{espeak}|mel v1");
        let mut h: u64 = 0xcbf29ce484222325;
        for b in text.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100000001b3);
        }
        format!("{h:016x}")
    }

    /// The corpus: read from `cache_root/<key>/` when it is there and complete, else synthesised,
    /// featurised and written there (whole: to a temporary directory, then renamed).
    pub fn build(&self, cache_root: &Path) -> Result<Corpus> {
        let espeak = espeak_version()?;
        let dir = cache_root.join(self.cache_key(&espeak));
        let plan = self.plan()?;
        if let Some(c) = read_corpus(&dir, &plan)? {
            return Ok(c);
        }
        let io = |p: &Path, e: std::io::Error| Error::Io {
            path: p.display().to_string(),
            message: e.to_string(),
        };
        std::fs::create_dir_all(cache_root).map_err(|e| io(cache_root, e))?;
        let tmp = cache_root.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            self.cache_key(&espeak)
        ));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
        let lm = LogMel::new();
        let mut features = Vec::new();
        let mut index = String::new();
        let mut utts = Vec::with_capacity(plan.len());
        for (di, voice, text, held) in &plan {
            let audio = synthesize(voice, text, &tmp)?;
            let mel = lm.features(&audio)?;
            let frames = mel.len() / N_MELS;
            // [N_MELS, frames] → [frames, N_MELS].
            let mut fm = vec![0.0f32; mel.len()];
            for m in 0..N_MELS {
                for f in 0..frames {
                    fm[f * N_MELS + m] = mel[m * frames + f];
                }
            }
            for v in &fm {
                features.extend_from_slice(&v.to_le_bytes());
            }
            index.push_str(&format!("{frames}\n"));
            utts.push((
                Utterance {
                    domain: *di,
                    voice: voice.clone(),
                    text: text.clone(),
                    features: fm,
                    frames,
                },
                *held,
            ));
        }
        let write = |name: &str, bytes: &[u8]| -> Result<()> {
            let p = tmp.join(name);
            std::fs::write(&p, bytes).map_err(|e| io(&p, e))
        };
        write("features.f32le", &features)?;
        write("frames.txt", index.as_bytes())?;
        write("recipe.txt", format!("{self:#?}\n{espeak}\n").as_bytes())?;
        match std::fs::rename(&tmp, &dir) {
            Ok(()) => {}
            // Another process finished the same recipe first: its files are the same bytes.
            Err(_) if dir.exists() => {
                let _ = std::fs::remove_dir_all(&tmp);
            }
            Err(e) => return Err(io(&dir, e)),
        }
        let (train, test) = partition(utts);
        Ok(Corpus {
            train,
            test,
            dir,
            cached: false,
        })
    }
}

fn partition(utts: Vec<(Utterance, bool)>) -> (Vec<Utterance>, Vec<Utterance>) {
    let (test, train): (Vec<_>, Vec<_>) = utts.into_iter().partition(|(_, held)| *held);
    (
        train.into_iter().map(|(u, _)| u).collect(),
        test.into_iter().map(|(u, _)| u).collect(),
    )
}

/// The cached corpus of `plan` in `dir`, if it is there and matches the plan.
fn read_corpus(dir: &Path, plan: &[(usize, Voice, String, bool)]) -> Result<Option<Corpus>> {
    let (Ok(frames), Ok(bytes)) = (
        std::fs::read_to_string(dir.join("frames.txt")),
        std::fs::read(dir.join("features.f32le")),
    ) else {
        return Ok(None);
    };
    let frames: Vec<usize> = frames
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    if frames.len() != plan.len() || frames.iter().sum::<usize>() * N_MELS * 4 != bytes.len() {
        return Ok(None);
    }
    let mut at = 0;
    let mut utts = Vec::with_capacity(plan.len());
    for ((di, voice, text, held), &n) in plan.iter().zip(&frames) {
        let len = n * N_MELS * 4;
        let features = bytes[at..at + len]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        at += len;
        utts.push((
            Utterance {
                domain: *di,
                voice: voice.clone(),
                text: text.clone(),
                features,
                frames: n,
            },
            *held,
        ));
    }
    let (train, test) = partition(utts);
    Ok(Some(Corpus {
        train,
        test,
        dir: dir.to_path_buf(),
        cached: true,
    }))
}

/// The default cache root: `$MOLORA_SPEECH_CACHE`, else `$XDG_CACHE_HOME/molora/speech`, else
/// `~/.cache/molora/speech`.
pub fn default_cache_root() -> PathBuf {
    if let Some(p) = std::env::var_os("MOLORA_SPEECH_CACHE") {
        return PathBuf::from(p);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("molora").join("speech")
}
