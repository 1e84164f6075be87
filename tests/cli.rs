//! The `molora` command-line tool: help on every command, usage errors (exit 2) and failures (exit 1)
//! as one `error: ` message on stderr, every value checked before any work, `--out` written whole or
//! not at all, `inspect` reading only the header and flagging what the PEFT loader rejects, a closed
//! or full stdout ending in an error rather than a panic, `bench --quick` on the CPU.
#![cfg(feature = "candle")]

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn molora_cmd<S: AsRef<OsStr>>(args: &[S]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_molora"));
    cmd.args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null());
    cmd
}

fn molora<S: AsRef<OsStr>>(args: &[S]) -> Output {
    molora_cmd(args).output().expect("the molora binary runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The run ended with `code`, nothing on stdout, and an `error: ` line on stderr holding every one
/// of `needles`; returns stderr.
fn assert_error<S: AsRef<OsStr> + std::fmt::Debug>(
    args: &[S],
    out: &Output,
    code: i32,
    needles: &[&str],
) -> String {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
    assert!(
        err.lines().any(|l| l.starts_with("error: ")),
        "{args:?}: no `error: ` line in {err}"
    );
    for needle in needles {
        assert!(
            err.contains(needle),
            "{args:?}: missing {needle:?} in {err}"
        );
    }
    assert!(text(&out.stdout).is_empty(), "{args:?} wrote to stdout");
    err
}

/// The names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("readable dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A safetensors file with these F32 tensors (zeros) and string metadata.
fn safetensors(tensors: &[(&str, &[usize])], metadata: &[(&str, &str)]) -> Vec<u8> {
    let (header, data_len) = safetensors_header(tensors, metadata);
    let mut bytes = header;
    bytes.resize(bytes.len() + data_len, 0);
    bytes
}

/// The 8-byte length and JSON header of [`safetensors`], and the bytes of data it describes.
fn safetensors_header(tensors: &[(&str, &[usize])], metadata: &[(&str, &str)]) -> (Vec<u8>, usize) {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in tensors {
        let n = 4 * shape.iter().product::<usize>();
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    if !metadata.is_empty() {
        let m: serde_json::Map<String, serde_json::Value> = metadata
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
            .collect();
        header.insert("__metadata__".into(), serde_json::Value::Object(m));
    }
    let json = serde_json::Value::Object(header).to_string().into_bytes();
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&json);
    (bytes, offset)
}

const A: &str = ".lora_A.weight";
const B: &str = ".lora_B.weight";

fn peft_key(module: &str, suffix: &str) -> String {
    format!("base_model.model.{module}{suffix}")
}

/// A PEFT adapter directory: these tensors as adapter_model.safetensors, and an adapter_config.json
/// with r = 4 and target modules q_proj, v_proj.
fn peft_dir(tensors: &[(&str, &[usize])]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("adapter_model.safetensors");
    std::fs::write(&file, safetensors(tensors, &[("format", "pt")])).expect("write adapter");
    std::fs::write(
        dir.path().join("adapter_config.json"),
        r#"{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}"#,
    )
    .expect("write config");
    (dir, file)
}

/// Waits for `child` at most `limit`; kills it and fails the test past that.
fn wait_at_most(mut child: std::process::Child, limit: Duration) -> Output {
    let start = Instant::now();
    loop {
        match child.try_wait().expect("try_wait") {
            Some(_) => return child.wait_with_output().expect("output"),
            None if start.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("molora still running after {limit:?}");
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The smallest HDMoLE run (well under a second): the synthetic task.
const QUICK_HDMOLE: [&str; 9] = [
    "demo",
    "hdmole",
    "--data",
    "synthetic",
    "--small",
    "--steps",
    "2",
    "--pretrain-steps",
    "2",
];

fn quick_hdmole(extra: &[&OsStr]) -> Output {
    let mut args: Vec<&OsStr> = QUICK_HDMOLE.iter().map(OsStr::new).collect();
    args.extend_from_slice(extra);
    molora(&args)
}

const HDMOLE_OUTPUTS: [&str; 5] = [
    "hdmole.safetensors",
    "lora.safetensors",
    "mole_topk.safetensors",
    "report.json",
    "report.md",
];

#[test]
fn help_on_every_command() {
    for args in [
        vec!["--help"],
        vec!["-h"],
        vec!["help"],
        vec![],
        vec!["help", "demo"],
        vec!["demo", "--help"],
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
    let s = text(&molora(&["demo", "hdmole", "--help"]).stdout);
    for flag in [
        "--seed",
        "--steps",
        "--pretrain-steps",
        "--targets",
        "--rank",
        "--beam",
        "--data",
        "--no-expert-init",
        "--small",
        "--out",
        "--force",
        "--dtype",
        "--device",
    ] {
        assert!(s.contains(flag), "hdmole help lacks {flag}:\n{s}");
    }
    let s = text(&molora(&["demo", "saml", "--help"]).stdout);
    for flag in [
        "--epochs",
        "--lr-router",
        "--lr-experts",
        "--data",
        "--out",
        "--dtype",
    ] {
        assert!(s.contains(flag), "saml help lacks {flag}:\n{s}");
    }
    let s = text(&molora(&["demo", "lorb", "--help"]).stdout);
    for flag in [
        "--data", "--nbest", "--seed", "--out", "--dtype", "--device",
    ] {
        assert!(s.contains(flag), "lorb help lacks {flag}:\n{s}");
    }
}

#[test]
fn demo_without_a_demo_lists_all_three() {
    let args = ["demo"];
    let out = molora(&args);
    assert_error(&args, &out, 2, &["hdmole", "saml", "lorb", "which demo"]);
}

#[test]
fn bad_usage_is_an_error_on_stderr() {
    for (args, code, needle) in [
        (
            vec!["frobnicate"],
            2,
            "unrecognized subcommand 'frobnicate'",
        ),
        (vec!["demo", "nope"], 2, "unrecognized subcommand 'nope'"),
        (
            vec!["demo", "hdmole", "--bogus"],
            2,
            "unexpected argument '--bogus'",
        ),
        (
            vec!["demo", "hdmole", "--steps", "many"],
            2,
            "invalid value 'many' for '--steps <N>'",
        ),
        (
            vec!["demo", "hdmole", "--device", "tpu"],
            2,
            "invalid value 'tpu' for '--device <DEVICE>'",
        ),
        (
            vec!["demo", "hdmole", "--targets", "nowhere"],
            2,
            "no layer matches \"nowhere\"",
        ),
        (vec!["demo", "lorb", "--force"], 2, "--out <DIR>"),
        (vec!["inspect"], 2, "<FILE>"),
        (vec!["inspect", "a", "b"], 2, "unexpected argument 'b'"),
        (
            vec!["inspect", "no/such/file.safetensors"],
            1,
            "no/such/file.safetensors",
        ),
        (
            vec!["inspect", "/dev/zero"],
            1,
            "not a valid safetensors file",
        ),
        (vec!["inspect", "/dev/null"], 1, "shorter than the 8 bytes"),
    ] {
        let out = molora(&args);
        assert_error(&args, &out, code, &[needle]);
    }
}

#[test]
fn every_value_is_checked_before_any_work() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let out_dir = scratch.path().join("out");
    let out_flag = out_dir.to_str().expect("utf-8 temp path").to_string();
    let encoder_reason = "global accent posterior comes from the encoder";
    for (demo, args, needles) in [
        (
            "hdmole",
            vec!["--targets", "all"],
            vec![
                "'all' for '--targets <LIST>'",
                "encoder.sub.0, encoder.sub.1, encoder.0.q",
                encoder_reason,
            ],
        ),
        (
            "hdmole",
            vec!["--targets", "encoder"],
            vec!["'encoder' for '--targets <LIST>'", encoder_reason],
        ),
        (
            "hdmole",
            vec!["--targets", "decoder.q,encoder.1"],
            vec!["--targets", "encoder.1", encoder_reason],
        ),
        (
            "hdmole",
            vec!["--targets", ""],
            vec!["'' for '--targets <LIST>'", "empty"],
        ),
        (
            "hdmole",
            vec!["--steps", "0"],
            vec!["'0' for '--steps <N>'"],
        ),
        (
            "hdmole",
            vec!["--pretrain-steps", "0"],
            vec!["'0' for '--pretrain-steps <N>'"],
        ),
        ("hdmole", vec!["--rank", "0"], vec!["'0' for '--rank <N>'"]),
        (
            "hdmole",
            vec!["--rank", "9999"],
            vec!["'9999' for '--rank <N>'"],
        ),
        (
            "hdmole",
            vec!["--seed", "-1"],
            vec!["'-1' for '--seed <N>'"],
        ),
        (
            "hdmole",
            vec!["--steps", "-5"],
            vec!["'-5' for '--steps <N>'"],
        ),
        (
            "hdmole",
            vec!["--dtype", "f64"],
            vec!["'f64' for '--dtype <DTYPE>'"],
        ),
        (
            "saml",
            vec!["--epochs", "0"],
            vec!["'0' for '--epochs <N>'"],
        ),
        (
            "saml",
            vec!["--lr-router", "NaN"],
            vec!["'NaN' for '--lr-router <X>'", "finite"],
        ),
        (
            "saml",
            vec!["--lr-router", "inf"],
            vec!["'inf' for '--lr-router <X>'"],
        ),
        (
            "saml",
            vec!["--lr-experts", "0"],
            vec!["'0' for '--lr-experts <X>'", "greater than 0"],
        ),
        (
            "saml",
            vec!["--lr-experts", "-3e-4"],
            vec!["'-3e-4' for '--lr-experts <X>'"],
        ),
        ("lorb", vec!["--device", "gpu"], vec!["'gpu' for '--device"]),
        (
            "lorb",
            vec!["--data", "text"],
            vec!["'text' for '--data <DATA>'"],
        ),
        ("lorb", vec!["--nbest", "0"], vec!["'0' for '--nbest <N>'"]),
        (
            "hdmole",
            vec!["--data", "audio"],
            vec!["'audio' for '--data <DATA>'", "speech", "synthetic"],
        ),
        ("hdmole", vec!["--beam", "0"], vec!["'0' for '--beam <N>'"]),
        (
            "hdmole",
            vec!["--data", "synthetic", "--beam", "3"],
            vec!["--beam decodes speech"],
        ),
        (
            "hdmole",
            vec!["--data", "synthetic", "--targets", "decoder.0.q"],
            vec!["no layer matches \"decoder.0.q\""],
        ),
        (
            "hdmole",
            vec!["--targets", "decoder.k,decoder.q", "--rank", "300"],
            vec!["'300' for '--rank <N>'"],
        ),
    ] {
        let mut full = vec!["demo", demo, "--small", "--out", &out_flag];
        full.extend(args);
        let out = molora(&full);
        let err = assert_error(&full, &out, 2, &needles);
        assert!(!err.contains("step 1/"), "{full:?} started work: {err}");
        assert!(!out_dir.exists(), "{full:?} created --out");
    }
    assert!(listing(scratch.path()).is_empty());
}

/// Without espeak-ng the speech demo fails before any work, saying how to get it, and creates no
/// output.
#[test]
fn the_speech_demo_without_espeak_says_how_to_get_it() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let out_dir = scratch.path().join("out");
    let args = [
        OsStr::new("demo"),
        OsStr::new("hdmole"),
        OsStr::new("--small"),
        OsStr::new("--out"),
        out_dir.as_os_str(),
    ];
    let out = molora_cmd(&args)
        .env("MOLORA_ESPEAK", scratch.path().join("no-espeak-here"))
        .output()
        .expect("the molora binary runs");
    assert_error(
        &args,
        &out,
        1,
        &[
            "espeak-ng is needed",
            "scripts/speech-deps.sh",
            "--data synthetic",
        ],
    );
    assert!(!out_dir.exists(), "created --out");
}

#[test]
fn an_out_that_cannot_be_written_fails_before_training() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let file = scratch.path().join("a-file");
    std::fs::write(&file, "not a directory").expect("write");
    for (out, needle) in [
        (file.join("out"), "is not a directory"),
        (
            scratch.path().join("missing/out"),
            "No such file or directory",
        ),
        (file.clone(), "exists and is not a directory"),
    ] {
        let out_os = out.as_os_str();
        let o = quick_hdmole(&[OsStr::new("--out"), out_os]);
        let err = assert_error(
            &["--out", &out.display().to_string()],
            &o,
            1,
            &["--out", needle],
        );
        assert!(err.contains(&out.display().to_string()), "{err}");
        assert!(!err.contains("pretrain"), "trained before failing: {err}");
        assert_eq!(listing(scratch.path()), vec!["a-file"], "left files behind");
        assert_eq!(
            std::fs::read_to_string(&file).ok().as_deref(),
            Some("not a directory")
        );
    }
}

#[test]
fn out_is_written_whole_and_never_clobbered_without_force() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let dir = scratch.path().join("run");

    // A fresh directory: every output, nothing else, no staging left beside it.
    let o = quick_hdmole(&[OsStr::new("--out"), dir.as_os_str()]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(listing(&dir), HDMOLE_OUTPUTS);
    assert_eq!(listing(scratch.path()), vec!["run"]);
    let report = std::fs::read_to_string(dir.join("report.json")).expect("report.json");
    assert!(serde_json::from_str::<serde_json::Value>(&report).is_ok());
    assert!(std::fs::read_to_string(dir.join("report.md"))
        .expect("report.md")
        .contains("HDMoLE"));
    let inspected = molora(&[
        OsStr::new("inspect"),
        dir.join("hdmole.safetensors").as_os_str(),
    ]);
    assert!(text(&inspected.stdout).contains("molora file"));

    // An existing output without --force: an error naming it, before any work; nothing changed.
    std::fs::write(dir.join("report.json"), "old").expect("write");
    let o = quick_hdmole(&[OsStr::new("--out"), dir.as_os_str()]);
    let err = assert_error(
        &["--out"],
        &o,
        1,
        &["report.json", "already exists", "--force"],
    );
    assert!(!err.contains("pretrain"), "trained before refusing: {err}");
    assert_eq!(
        std::fs::read_to_string(dir.join("report.json"))
            .ok()
            .as_deref(),
        Some("old")
    );
    assert_eq!(listing(&dir), HDMOLE_OUTPUTS);

    // With --force: replaced, and an unrelated file in the directory kept.
    std::fs::write(dir.join("notes.txt"), "mine").expect("write");
    let o = quick_hdmole(&[OsStr::new("--out"), dir.as_os_str(), OsStr::new("--force")]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let report = std::fs::read_to_string(dir.join("report.json")).expect("report.json");
    assert_ne!(report, "old");
    assert!(serde_json::from_str::<serde_json::Value>(&report).is_ok());
    let mut expected: Vec<&str> = HDMOLE_OUTPUTS.to_vec();
    expected.push("notes.txt");
    expected.sort();
    assert_eq!(listing(&dir), expected);
    assert_eq!(listing(scratch.path()), vec!["run"]);
}

#[cfg(not(feature = "candle-cuda"))]
#[test]
fn a_run_that_fails_leaves_no_out_dir() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let dir = scratch.path().join("run");
    let o = quick_hdmole(&[
        OsStr::new("--out"),
        dir.as_os_str(),
        OsStr::new("--device"),
        OsStr::new("cuda"),
        OsStr::new("--dtype"),
        OsStr::new("bf16"),
    ]);
    assert_error(&["--device", "cuda"], &o, 1, &["--features candle-cuda"]);
    assert!(listing(scratch.path()).is_empty(), "left files behind");
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
    assert!(!s.contains("warning") && !s.contains("rejected"), "{s}");
}

#[test]
fn inspect_a_file_whose_name_is_not_utf8() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let name = OsStr::from_bytes(b"weights-\xff\xfe.safetensors");
    let path = dir.path().join(name);
    std::fs::write(&path, safetensors(&[("w", &[2, 3])], &[])).expect("write");
    let out = molora(&[OsStr::new("inspect"), path.as_os_str()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    assert!(
        s.contains("w: F32 [2, 3]") && s.contains("totals: 1 tensors"),
        "{s}"
    );
}

#[test]
fn inspect_flags_what_the_peft_loader_rejects() {
    let (q_a, q_b) = (peft_key("m.q_proj", A), peft_key("m.q_proj", B));
    let (v_a, v_b) = (peft_key("m.v_proj", A), peft_key("m.v_proj", B));
    for (tensors, needles) in [
        (
            vec![
                (q_a.as_str(), &[4usize, 8, 1][..]),
                (q_b.as_str(), &[8, 4][..]),
            ],
            vec![q_a.as_str(), "expected a 2-D lora_A", "[4, 8, 1]"],
        ),
        (
            vec![(q_a.as_str(), &[4, 8][..]), (q_b.as_str(), &[8, 2][..])],
            vec![q_b.as_str(), "ranks disagree"],
        ),
        (
            vec![(v_a.as_str(), &[2, 8][..]), (v_b.as_str(), &[8, 2][..])],
            vec![v_a.as_str(), "rank 2", "r = 4"],
        ),
        (
            vec![(q_a.as_str(), &[4, 8][..])],
            vec!["m.q_proj: missing lora_B"],
        ),
        (
            vec![(q_a.as_str(), &[4][..]), (q_b.as_str(), &[8, 4][..])],
            vec!["expected a 2-D lora_A", "[4]"],
        ),
    ] {
        let (_dir, file) = peft_dir(&tensors);
        let out = molora(&[OsStr::new("inspect"), file.as_os_str()]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let s = text(&out.stdout);
        assert!(
            s.contains("warning: load_peft_adapter would reject this adapter"),
            "{s}"
        );
        let rejected: Vec<&str> = s.lines().filter(|l| l.contains("rejected: ")).collect();
        assert!(!rejected.is_empty(), "{s}");
        for needle in needles {
            assert!(
                rejected.iter().any(|l| l.contains(needle)),
                "no rejected line with {needle:?} in\n{s}"
            );
        }
    }
    // The same adapter made valid: no warning.
    let (_dir, file) = peft_dir(&[(q_a.as_str(), &[4, 8]), (q_b.as_str(), &[8, 4])]);
    let s = text(&molora(&[OsStr::new("inspect"), file.as_os_str()]).stdout);
    assert!(
        s.contains("m.q_proj: r = 4, 8 -> 8") && !s.contains("warning"),
        "{s}"
    );
}

#[test]
fn inspect_escapes_control_characters() {
    let evil = "x\u{1b}[2J\u{1b}]0;pwned\u{7}";
    let key = peft_key(&format!("m.{evil}.q_proj"), A);
    let bytes = safetensors(
        &[(key.as_str(), &[4, 8]), ("plain\u{1b}[31m", &[2])],
        &[("note\u{1b}[2J", "line\nbreak\u{202e}")],
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("evil\u{1b}[2J.safetensors");
    std::fs::write(&file, bytes).expect("write");
    let out = molora(&[OsStr::new("inspect"), file.as_os_str()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    assert!(
        !s.chars()
            .any(|c| (c.is_control() && c != '\n') || c == '\u{202e}'),
        "a control character reached stdout:\n{s:?}"
    );
    for needle in [
        "x\\u{1b}[2J\\u{1b}]0;pwned\\u{7}",
        "plain\\u{1b}[31m",
        "note\\u{1b}[2J = line\\nbreak\\u{202e}",
        "evil\\u{1b}[2J.safetensors",
    ] {
        assert!(s.contains(needle), "missing {needle:?} in\n{s}");
    }
}

#[test]
fn inspect_reads_only_the_header() {
    let dir = tempfile::tempdir().expect("tempdir");

    // 4 GiB of (sparse) data after the header: read in no time, and no warning.
    let (header, data_len) = safetensors_header(&[("huge", &[1 << 30])], &[]);
    let huge = dir.path().join("huge.safetensors");
    let mut f = std::fs::File::create(&huge).expect("create");
    f.write_all(&header).expect("write");
    f.set_len((header.len() + data_len) as u64)
        .expect("set_len");
    drop(f);
    let start = Instant::now();
    let out = molora(&[OsStr::new("inspect"), huge.as_os_str()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(start.elapsed() < Duration::from_secs(10));
    let s = text(&out.stdout);
    assert!(
        s.contains("huge: F32 [1073741824]") && !s.contains("warning"),
        "{s}"
    );

    // The same header on a truncated file: described, with a warning.
    let short = dir.path().join("short.safetensors");
    std::fs::write(&short, &header).expect("write");
    let s = text(&molora(&[OsStr::new("inspect"), short.as_os_str()]).stdout);
    assert!(
        s.contains("warning: the header describes") && s.contains("truncated"),
        "{s}"
    );

    // A header length larger than the file, and one larger than the format allows.
    for (len, needle) in [
        (1000u64, "larger than the 4 bytes after its length"),
        (u64::MAX, "larger than the 100000000 bytes"),
    ] {
        let bad = dir.path().join("bad.safetensors");
        let mut bytes = len.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}  ");
        std::fs::write(&bad, bytes).expect("write");
        let args = [OsStr::new("inspect"), bad.as_os_str()];
        assert_error(&args, &molora(&args), 1, &[needle]);
    }
}

#[test]
fn inspect_stops_reading_a_fifo_after_the_header() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("endless.safetensors");
    let made = Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo runs");
    assert!(made.success());
    let child = molora_cmd(&[OsStr::new("inspect"), fifo.as_os_str()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let (header, _) = safetensors_header(&[("w", &[4])], &[]);
    let path = fifo.clone();
    // Writes the header, then zeros until the reader goes away (EPIPE).
    std::thread::spawn(move || {
        if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open(&path) {
            if f.write_all(&header).is_ok() {
                let zeros = vec![0u8; 1 << 16];
                while f.write_all(&zeros).is_ok() {}
            }
        }
    });
    let out = wait_at_most(child, Duration::from_secs(60));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("w: F32 [4]"));
}

#[test]
fn a_closed_stdout_is_an_error_not_a_panic() {
    let mut child = molora_cmd(&["bench", "--quick"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    drop(child.stdout.take());
    let out = wait_at_most(child, Duration::from_secs(120));
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("error: writing to standard output") && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn a_full_stdout_is_an_error_not_a_panic() {
    for args in [vec!["--help"], vec!["demo", "hdmole", "--help"], vec![]] {
        let full = std::fs::File::create("/dev/full").expect("/dev/full");
        let out = molora_cmd(&args)
            .stdout(full)
            .stderr(Stdio::piped())
            .output()
            .expect("runs");
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.starts_with("error: writing to standard output") && !err.contains("panicked"),
            "{args:?}: {err}"
        );
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
    let args = ["bench", "--device", "cuda"];
    let out = molora(&args);
    assert_error(&args, &out, 1, &["--features cuda"]);
}

#[cfg(not(feature = "candle-cuda"))]
#[test]
fn demos_on_cuda_without_candle_cuda_say_which_feature() {
    for demo in ["hdmole", "saml", "lorb"] {
        let args = [
            "demo", demo, "--device", "cuda", "--small", "--dtype", "f16",
        ];
        let out = molora(&args);
        assert_error(&args, &out, 1, &["--features candle-cuda"]);
    }
}
