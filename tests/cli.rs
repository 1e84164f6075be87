//! The `molora` command-line tool: help on every command, errors to stderr with a non-zero exit,
//! `inspect` on a real PEFT adapter, `bench --quick` on the CPU.
#![cfg(feature = "candle")]

use std::process::{Command, Output};

fn molora(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_molora"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("the molora binary runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn help_on_every_command() {
    for args in [
        vec!["--help"],
        vec!["help"],
        vec!["demo", "hdmole", "--help"],
        vec!["demo", "saml", "--help"],
        vec!["demo", "lorb", "--help"],
        vec!["bench", "--help"],
        vec!["inspect", "--help"],
    ] {
        let out = molora(&args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        assert!(text(&out.stdout).contains("Usage: molora"), "{args:?}");
    }
}

#[test]
fn bad_usage_is_an_error_on_stderr() {
    for (args, code, needle) in [
        (vec!["frobnicate"], 2, "unknown command `frobnicate`"),
        (vec!["demo", "nope"], 2, "unknown demo `nope`"),
        (
            vec!["demo", "hdmole", "--steps", "many"],
            2,
            "`many` is not a valid number",
        ),
        (
            vec!["demo", "hdmole", "--device", "tpu"],
            2,
            "`tpu` is not a device",
        ),
        (
            vec!["demo", "hdmole", "--targets", "nowhere"],
            1,
            "no layer matches \"nowhere\"",
        ),
        (vec!["inspect"], 2, "which file"),
        (
            vec!["inspect", "no/such/file.safetensors"],
            1,
            "no/such/file.safetensors",
        ),
    ] {
        let out = molora(&args);
        assert_eq!(
            out.status.code(),
            Some(code),
            "{args:?}: {}",
            text(&out.stderr)
        );
        let err = text(&out.stderr);
        let last = err.lines().last().unwrap_or("");
        assert!(
            last.starts_with("error: ") && last.contains(needle),
            "{args:?}: {err}"
        );
        assert!(text(&out.stdout).is_empty(), "{args:?} wrote to stdout");
    }
}

#[test]
fn inspect_a_peft_adapter() {
    let out = molora(&[
        "inspect",
        "tests/data/peft/whisper-tiny-lora-accent0/adapter_model.safetensors",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    for needle in ["q_proj", "encoder_attn", "r = 4"] {
        assert!(s.contains(needle), "missing {needle:?} in\n{s}");
    }
}

#[test]
fn bench_quick_prints_the_cpu_table() {
    let out = molora(&["bench", "--quick"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    assert!(s.contains("| T | d_in→d_out |"), "{s}");
    assert_eq!(
        s.lines()
            .filter(|l| l.starts_with("| 1") || l.starts_with("| 16"))
            .count(),
        4,
        "{s}"
    );
}

#[cfg(not(feature = "cuda"))]
#[test]
fn bench_on_cuda_without_the_feature_says_so() {
    let out = molora(&["bench", "--device", "cuda"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("--features cuda"),
        "{}",
        text(&out.stderr)
    );
}

#[cfg(not(feature = "candle-cuda"))]
#[test]
fn demos_on_cuda_without_candle_cuda_say_which_feature() {
    for demo in ["hdmole", "saml", "lorb"] {
        let out = molora(&["demo", demo, "--device", "cuda", "--small"]);
        assert_eq!(out.status.code(), Some(1), "{demo}");
        let err = text(&out.stderr);
        assert!(err.contains("--features candle-cuda"), "{demo}: {err}");
    }
}
