//! Builds the speech corpus of HDMoLE's accent domains (espeak-ng: the general domain in `en-us` and
//! four English accents, three voice variants each) into the speech cache, then reads it back, and
//! prints what it holds and how long each part took.
//!
//!     cargo run --release --example 04_speech_corpus [-- TRAIN_PER_DOMAIN TEST_PER_DOMAIN]

use std::time::Instant;

use molora::speech::data::{accent_domains, default_cache_root, Recipe};

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn count(arg: Option<std::ffi::OsString>, default: usize, what: &str) -> Result<usize, String> {
    match arg {
        None => Ok(default),
        Some(a) => a
            .to_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("{what}: expected a count, got {a:?}")),
    }
}

fn run() -> Result<(), String> {
    let mut args = std::env::args_os().skip(1);
    let train = count(args.next(), 200, "TRAIN_PER_DOMAIN")?;
    let test = count(args.next(), 40, "TEST_PER_DOMAIN")?;
    let recipe = Recipe {
        domains: accent_domains(3),
        train_per_domain: train,
        test_per_domain: test,
        seed: 1,
        held_out_permille: 150,
    };
    let root = default_cache_root();
    let t0 = Instant::now();
    let corpus = recipe.build(&root).map_err(|e| e.to_string())?;
    let built = t0.elapsed();
    let t1 = Instant::now();
    let again = recipe.build(&root).map_err(|e| e.to_string())?;
    let reread = t1.elapsed();
    let frames: usize = corpus
        .train
        .iter()
        .chain(&corpus.test)
        .map(|u| u.frames)
        .sum();
    println!(
        "{}: {} training and {} held-out utterances, {:.1} s of speech ({} frames)",
        corpus.dir.display(),
        corpus.train.len(),
        corpus.test.len(),
        frames as f64 / 100.0,
        frames
    );
    println!(
        "{} in {:.1} s; read back from the cache (cached = {}) in {:.2} s",
        if corpus.cached {
            "read from the cache"
        } else {
            "synthesised and featurised"
        },
        built.as_secs_f64(),
        again.cached,
        reread.as_secs_f64()
    );
    Ok(())
}
