//! The speech front end and scoring: the FFT power spectrum against a direct DFT, the log-mel
//! features against Whisper's own (transformers' `WhisperFeatureExtractor`, stored in
//! tests/data/speech/whisper_log_mel.json), the mel filterbank's shape, and WER/CER on hand-made
//! cases. (The fixture is read with serde_json, a dependency of the `candle` feature.)

#![cfg(all(feature = "speech", feature = "candle"))]

use molora::speech::mel::{self, LogMel, HOP, N_FFT, N_FREQS, N_MELS};
use molora::speech::wer::{self, align, char_edits, word_edits, Edits};

fn signal(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let t = i as f64;
            (0.5 * (2.0 * std::f64::consts::PI * 440.0 * t / 16000.0).sin()
                + 0.25 * (2.0 * std::f64::consts::PI * 3000.0 * t / 16000.0 + 0.3).sin()
                + 0.1 * (((i * 7919) % 1000) as f64 / 1000.0 - 0.5)) as f32
        })
        .collect()
}

#[test]
fn the_fft_power_spectrum_equals_a_direct_dft() {
    let lm = LogMel::new();
    for n in [201usize, 400, 401, 1000, 1601] {
        let x = signal(n);
        let spectra = lm.power_spectra(&x).unwrap();
        assert_eq!(spectra.len(), (n / HOP) * N_FREQS, "n = {n}");
        let w = mel::hann(N_FFT);
        for f in 0..n / HOP {
            // The same centred, reflect-padded, windowed frame, transformed directly.
            let frame: Vec<f32> = (0..N_FFT)
                .map(|i| {
                    let j = (f * HOP + i) as isize - (N_FFT / 2) as isize;
                    let j = if j < 0 {
                        -j
                    } else if j >= n as isize {
                        2 * (n as isize - 1) - j
                    } else {
                        j
                    };
                    x[j as usize] * w[i]
                })
                .collect();
            let want = mel::power_spectrum_dft(&frame);
            let peak = want.iter().copied().fold(0.0f64, f64::max);
            for (k, (&got, &w)) in spectra[f * N_FREQS..(f + 1) * N_FREQS]
                .iter()
                .zip(&want)
                .enumerate()
            {
                assert!(
                    (f64::from(got) - w).abs() <= 1e-4 * peak + 1e-6,
                    "n {n} frame {f} bin {k}: FFT {got} vs DFT {w} (peak {peak})"
                );
            }
        }
    }
}

#[test]
fn log_mel_equals_whisper_s_feature_extractor() {
    let text = std::fs::read_to_string("tests/data/speech/whisper_log_mel.json").unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let shape: Vec<usize> = v["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect();
    let want: Vec<f32> = v["log_mel"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_f64().unwrap() as f32)
        .collect();
    let got = LogMel::new().features(&signal(4000)).unwrap();
    assert_eq!(shape, vec![N_MELS, 25]);
    assert_eq!(got.len(), want.len());
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    println!(
        "log-mel: max |ours − Whisper's| = {worst:.2e} over {} values",
        got.len()
    );
    assert!(worst < 2e-4, "max |ours − Whisper's| = {worst}");
    // Each mel filter's sum over the frequency bins matches the extractor's filters.
    let sums: Vec<f32> = v["mel_filters_sum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(sums.len(), N_MELS);
    let filters = mel::mel_filters(16000, N_FFT, N_MELS, 0.0, 8000.0);
    for (m, &s) in sums.iter().enumerate() {
        let ours: f32 = filters[m * N_FREQS..(m + 1) * N_FREQS].iter().sum();
        assert!(
            (ours - s).abs() <= 1e-6 + 1e-4 * s.abs(),
            "mel {m}: {ours} vs {s}"
        );
    }
}

#[test]
fn log_mel_rejects_what_it_cannot_frame() {
    let lm = LogMel::new();
    assert!(matches!(
        lm.features(&[0.0; 200]),
        Err(molora::Error::InvalidDim { value: 200, .. })
    ));
    let mut x = signal(800);
    x[17] = f32::NAN;
    assert!(matches!(
        lm.features(&x),
        Err(molora::Error::NonFinite { index: 17, .. })
    ));
}

#[test]
fn edit_distances_on_hand_made_cases() {
    let e = word_edits("the cat sat on the mat", "the cat sat on mat");
    assert_eq!(
        e,
        Edits {
            substitutions: 0,
            deletions: 1,
            insertions: 0,
            reference_len: 6
        }
    );
    let e = word_edits("turn on the light", "turn off the lights now");
    assert_eq!((e.substitutions, e.deletions, e.insertions), (2, 0, 1));
    assert!((e.rate() - 0.75).abs() < 1e-12);
    assert_eq!(word_edits("a b c", "a b c").errors(), 0);
    assert_eq!(word_edits("", "").rate(), 0.0);
    assert_eq!(word_edits("", "x y").insertions, 2);
    assert_eq!(word_edits("x y", "").deletions, 2);
    let c = char_edits("kitten", "sitting");
    assert_eq!((c.substitutions, c.deletions, c.insertions), (2, 0, 1));
    assert_eq!(
        char_edits("a  b", "a b").errors(),
        0,
        "runs of whitespace are one space"
    );
    // Corpus rates sum the edits before dividing.
    let w = wer::wer([
        ("one two", "one"),
        ("three four five six", "three four five six"),
    ]);
    assert!((w - 1.0 / 6.0).abs() < 1e-12, "{w}");
    let c = wer::cer([("ab", "ax")]);
    assert!((c - 0.5).abs() < 1e-12);
    // The distance is symmetric and bounded by the longer length.
    let (r, h) = (["a", "b", "c", "d"], ["b", "x", "d", "e", "f"]);
    let (e1, e2) = (align(&r, &h), align(&h, &r));
    assert_eq!(e1.errors(), e2.errors());
    assert!(e1.errors() <= 5);
}

/// espeak-ng present, or `None` after saying why the test is skipped (a failure under
/// `MOLORA_REQUIRE_ESPEAK=1`, which scripts/test.sh sets after installing it).
fn espeak(test: &str) -> Option<String> {
    match molora::speech::synth::espeak_version() {
        Ok(v) => Some(v),
        Err(e) if std::env::var("MOLORA_REQUIRE_ESPEAK").as_deref() == Ok("1") => {
            panic!("{test}: MOLORA_REQUIRE_ESPEAK=1, but {e}")
        }
        Err(e) => {
            println!("skipping {test}: {e}");
            None
        }
    }
}

#[test]
fn resampling_keeps_a_tone_s_frequency() {
    use molora::speech::synth::resample;
    let n = 22050;
    let x: Vec<f32> = (0..n)
        .map(|i| (2.0 * std::f64::consts::PI * 1000.0 * i as f64 / 22050.0).sin() as f32)
        .collect();
    let y = resample(&x, 22050, 16000).unwrap();
    assert!((y.len() as i64 - 16000).abs() <= 1, "{} samples", y.len());
    // The 1 kHz tone at 16 kHz: its DFT over 1600 samples peaks at bin 100.
    let frame = &y[4000..5600];
    let p = mel::power_spectrum_dft(frame);
    let peak = (0..p.len()).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap();
    assert_eq!(peak, 100, "peak bin {peak}");
    // Amplitude kept (a unit sine has mean square 1/2).
    let ms: f32 = frame.iter().map(|v| v * v).sum::<f32>() / frame.len() as f32;
    assert!((ms - 0.5).abs() < 0.02, "mean square {ms}");
}

#[test]
fn espeak_speech_is_deterministic_and_voices_differ() {
    use molora::speech::synth::{synthesize, Voice};
    let Some(version) = espeak("espeak_speech_is_deterministic_and_voices_differ") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let us = Voice::new("en-us", None);
    let scot = Voice::new("en-gb-scotland", Some("m3")).with(40, 160);
    let text = "turn on the kitchen light";
    let a = synthesize(&us, text, dir.path()).unwrap();
    let b = synthesize(&us, text, dir.path()).unwrap();
    assert_eq!(
        a, b,
        "{version}: the same voice and text give the same samples"
    );
    let c = synthesize(&scot, text, dir.path()).unwrap();
    assert_ne!(a, c, "another accent, pitch and rate sound different");
    // About a second and a half of 16 kHz speech, with energy, that the front end takes.
    assert!(a.len() > 8000 && a.len() < 64000, "{} samples", a.len());
    assert!(a.iter().map(|v| v * v).sum::<f32>() > 1.0);
    let f = LogMel::new().features(&a).unwrap();
    assert_eq!(f.len(), N_MELS * (a.len() / HOP));
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "scratch WAV removed"
    );
    // Bad input is refused before espeak-ng runs.
    assert!(synthesize(&us, "--help", dir.path()).is_err());
    assert!(synthesize(&us.clone().with(120, 175), text, dir.path()).is_err());
    assert!(synthesize(&Voice::new("en-us; rm", None), text, dir.path()).is_err());
}

#[test]
fn the_grammar_and_its_held_out_split() {
    use molora::speech::data::{grammar, split_sentences, vocabulary};
    let g = grammar();
    assert_eq!(g.len(), 1316);
    assert_eq!(
        g.iter().collect::<std::collections::BTreeSet<_>>().len(),
        1316,
        "no duplicates"
    );
    let v = vocabulary();
    println!("grammar: {} sentences over {} words", g.len(), v.len());
    assert!(v.len() > 80 && v.len() < 150, "{} words", v.len());
    let (train, test) = split_sentences(3, 0.15).unwrap();
    assert_eq!(train.len() + test.len(), 1316);
    assert_eq!(test.len(), 197);
    let held: std::collections::BTreeSet<_> = test.iter().collect();
    assert!(
        train.iter().all(|s| !held.contains(s)),
        "held-out sentences never train"
    );
    assert_eq!(
        split_sentences(3, 0.15).unwrap(),
        (train.clone(), test.clone())
    );
    assert_ne!(
        split_sentences(4, 0.15).unwrap().1,
        test,
        "another seed, another split"
    );
    assert!(split_sentences(3, 1.0).is_err());
}

#[test]
fn a_recipe_is_deterministic_and_cached() {
    use molora::speech::data::{accent_domains, Recipe};
    let Some(_) = espeak("a_recipe_is_deterministic_and_cached") else {
        return;
    };
    let recipe = Recipe {
        domains: accent_domains(2)[..2].to_vec(),
        train_per_domain: 3,
        test_per_domain: 2,
        seed: 11,
        held_out_permille: 150,
    };
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = recipe.build(d1.path()).unwrap();
    let b = recipe.build(d2.path()).unwrap();
    assert!(!a.cached && !b.cached);
    assert_eq!((a.train.len(), a.test.len()), (6, 4));
    let bytes =
        |c: &molora::speech::data::Corpus| std::fs::read(c.dir.join("features.f32le")).unwrap();
    assert_eq!(bytes(&a), bytes(&b), "the same recipe gives the same bytes");
    // Read back from the cache: the same utterances, nothing synthesised.
    let c = recipe.build(d1.path()).unwrap();
    assert!(c.cached);
    assert_eq!(c.train, a.train);
    assert_eq!(c.test, a.test);
    // Held-out utterances use held-out sentences only.
    let train_texts: std::collections::BTreeSet<_> = a.train.iter().map(|u| &u.text).collect();
    assert!(a.test.iter().all(|u| !train_texts.contains(&u.text)));
    // A changed recipe is another cache entry.
    let other = Recipe {
        seed: 12,
        ..recipe.clone()
    };
    assert_ne!(other.cache_key("v"), recipe.cache_key("v"));
    assert_ne!(
        recipe.cache_key("v1"),
        recipe.cache_key("v2"),
        "a new espeak-ng regenerates"
    );
    assert!(a
        .train
        .iter()
        .all(|u| u.features.len() == u.frames * N_MELS && u.frames > 50));
}

/// A hand-made model over {0: bos, 1: eos, 2: "a", 3: "b"} where the greedy choice ("a", 0.6) leads
/// to a worse sentence than the second choice ("b" then eos at 0.9).
fn toy(prefix: &[u32]) -> molora::Result<Vec<f32>> {
    let p: [f32; 4] = match prefix {
        [0] => [0.0, 0.0, 0.6, 0.4],
        [0, 2] => [0.0, 0.3, 0.35, 0.35],
        [0, 3] => [0.0, 0.9, 0.05, 0.05],
        _ => [0.0, 1.0, 0.0, 0.0],
    };
    Ok(p.iter().map(|v| v.ln()).collect())
}

#[test]
fn greedy_and_beam_search_on_a_hand_made_model() {
    use molora::speech::decode::{beam_search, greedy};
    let g = greedy(4, 0, 1, 10, toy).unwrap();
    assert_eq!(
        g.tokens,
        vec![2, 2, 1],
        "greedy takes a, then a (ties to the lower id)"
    );
    assert!(g.finished);
    assert!((g.score - (0.6f64.ln() + 0.35f64.ln())).abs() < 1e-6);
    let nbest = beam_search(4, 0, 1, 2, 10, 0.0, toy).unwrap();
    assert_eq!(nbest[0].tokens, vec![3, 1], "the beam finds b, eos");
    assert!((nbest[0].score - (0.4f64.ln() + 0.9f64.ln())).abs() < 1e-6);
    assert!(
        nbest.windows(2).all(|w| w[0].score >= w[1].score),
        "best first"
    );
    assert!(nbest.len() <= 2 && nbest.iter().all(|h| h.finished));
    let one = beam_search(4, 0, 1, 1, 10, 0.0, toy).unwrap();
    assert_eq!(one[0].tokens, g.tokens, "a beam of one is greedy");
    // The length limit: unfinished hypotheses come back marked so.
    let cut = greedy(4, 0, 1, 1, toy).unwrap();
    assert_eq!((cut.tokens.clone(), cut.finished), (vec![2], false));
    // Bad steps and parameters are errors.
    assert!(beam_search(4, 0, 1, 0, 10, 0.0, toy).is_err());
    assert!(greedy(4, 0, 9, 10, toy).is_err());
    assert!(greedy(4, 0, 1, 10, |_| Ok(vec![0.0; 3])).is_err());
    assert!(greedy(4, 0, 1, 10, |_| Ok(vec![f32::NAN; 4])).is_err());
    // Decoded words score by WER against their reference.
    let words = ["<s>", "</s>", "a", "b"];
    let text = |t: &[u32]| {
        t.iter()
            .filter(|&&i| i > 1)
            .map(|&i| words[i as usize])
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert!((wer::wer([("b", text(&nbest[0].tokens).as_str())]) - 0.0).abs() < 1e-12);
    assert!((wer::wer([("b", text(&g.tokens).as_str())]) - 2.0).abs() < 1e-12);
}
