//! `molora`: the command-line tool. `molora --help` lists the commands.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use molora::model::demo::{run_hdmole_demo, HdmoleDemoConfig};

const HELP: &str = "\
molora: mixtures of LoRA experts — kernels, models and demos

Usage: molora <command> [options]

Commands:
  demo hdmole     HDMoLE against full fine-tuning, one LoRA and top-k MoLE on a synthetic
                  multi-accent task; prints the results table
  demo saml       SAML on an NF4-quantised Whisper-shaped model adapted per target speaker,
                  against the full-precision and quantised models and one LoRA
  demo lorb       LoRB: a BERT-style N-best rescorer adapted with LoRA and MWER (+ L_cor),
                  against the first pass and full fine-tuning
  bench           the benchmark table (the CPU path here; --device cuda for the GPU kernels)
  inspect FILE    experts, ranks, shapes and routing config of a .safetensors file
                  (a molora expert file or a PEFT adapter_model.safetensors)
  help            this text

`molora <command> --help` describes a command's options.
";

const DEMO_HELP: &str = "\
molora demo hdmole: pretrain a small LLM-ASR-shaped model on a general domain, then fine-tune it on
three synthetic accent domains four ways (full fine-tuning, one LoRA, MoLE top-k, HDMoLE) and print
the error per domain, the trainable parameters, the wall time, HDMoLE's domain × expert routing
table and its learned thresholds.

Usage: molora demo hdmole [options]

Options:
  --seed N            data and initialisation seed (default 7)
  --steps N           optimiser steps per fine-tuning method (default 300)
  --pretrain-steps N  optimiser steps of the general-domain pretraining (default 600)
  --targets LIST      comma-separated layers that get adapters (default
                      projector,decoder.q,decoder.v,decoder.o; `all` for every layer)
  --rank N            LoRA rank (default 8)
  --no-expert-init    do not initialise HDMoLE's experts from per-accent LoRAs
  --small             a small, fast configuration (the test suite's)
  --out DIR           write report.json and each method's adapters (<method>.safetensors)
  --device cpu|cuda   where to train (default cpu; cuda: GPU 0, a build with --features candle-cuda)
  -h, --help          this text
";

const SAML_HELP: &str = "\
molora demo saml: pretrain a Whisper-shaped encoder-decoder on a pool of synthetic speakers, quantise
it to NF4, train one rank-1 LoRA per training speaker, then adapt to each target speaker from 60 of
its utterances with one LoRA and with SAML (experts from the speaker LoRAs, per-utterance routers,
two Adam optimisers taking turns), and print the token error per target speaker and overall.

Usage: molora demo saml [options]

Options:
  --seed N            data and initialisation seed (default 11)
  --epochs N          adaptation epochs (default 10)
  --lr-router X       SAML router learning rate (default 1e-3, PAPERS.md)
  --lr-experts X      SAML experts learning rate (default 3e-4, PAPERS.md)
  --small             the test suite's small configuration
  --device cpu|cuda   where to train (default cpu; cuda: GPU 0, a build with --features candle-cuda)
  -h, --help          this text
";

const LORB_HELP: &str = "\
molora demo lorb: pretrain a small BERT-style rescorer on a general domain, then adapt it to a target
domain's N-best lists with MWER (full fine-tuning, LoRA on q and v, LoRA + the correlation
regulariser) and print the WER of the first pass and of each rescorer, trainable parameters and
training time.

Usage: molora demo lorb [options]

Options:
  --seed N            data and initialisation seed
  --small             the test suite's small configuration
  --device cpu|cuda   where to train (default cpu; cuda: GPU 0, a build with --features candle-cuda)
  -h, --help          this text
";

const BENCH_HELP: &str = "\
molora bench: the LoRA part of a MoLE layer timed per shape, as a Markdown table with GB/s.

Usage: molora bench [options]

Options:
  --device cpu|cuda   the CPU path (default), or the CUDA kernels against cuBLAS baselines
                      (needs a build with --features cuda and a GPU)
  --quick             fewer shapes, shorter timing
  -h, --help          this text
";

const INSPECT_HELP: &str = "\
molora inspect FILE: what a .safetensors file holds — for a molora expert file one line per MoLE
layer (experts, rank, d_in → d_out, alpha, routing); for a PEFT adapter its r, alpha, target modules
and one line per module; otherwise every tensor. Always the totals.

Usage: molora inspect FILE
";

/// A command-line error: the message, printed to stderr with exit code 2 (usage) or 1 (failure).
struct Fail {
    code: u8,
    msg: String,
}

fn usage(msg: impl Into<String>) -> Fail {
    Fail {
        code: 2,
        msg: msg.into(),
    }
}

fn failure(e: molora::Error) -> Fail {
    Fail {
        code: 1,
        msg: e.to_string(),
    }
}

fn value<'a>(args: &'a [String], i: &mut usize, flag: &str) -> Result<&'a str, Fail> {
    *i += 1;
    args.get(*i)
        .map(String::as_str)
        .ok_or_else(|| usage(format!("{flag} needs a value")))
}

fn number<T: std::str::FromStr>(s: &str, flag: &str) -> Result<T, Fail> {
    s.parse()
        .map_err(|_| usage(format!("{flag}: `{s}` is not a valid number")))
}

fn device(s: &str) -> Result<String, Fail> {
    match s {
        "cpu" | "cuda" => Ok(s.to_string()),
        other => Err(usage(format!(
            "--device: `{other}` is not a device (cpu, cuda)"
        ))),
    }
}

/// Status lines: rewritten in place on a terminal, every tenth one otherwise.
struct Progress {
    tty: bool,
    count: usize,
    start: Instant,
}

impl Progress {
    fn new() -> Self {
        Progress {
            tty: std::io::stderr().is_terminal(),
            count: 0,
            start: Instant::now(),
        }
    }

    fn line(&mut self, s: &str) {
        let elapsed = self.start.elapsed().as_secs_f32();
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K[{elapsed:6.1}s] {s}");
            let _ = err.flush();
        } else if self.count % 10 == 0 {
            let _ = writeln!(err, "[{elapsed:6.1}s] {s}");
        }
        self.count += 1;
    }

    fn done(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

fn demo(args: &[String]) -> Result<(), Fail> {
    match args.first().map(String::as_str) {
        Some("-h" | "--help") | None => {
            print!("{DEMO_HELP}");
            return if args.is_empty() {
                Err(usage("molora demo: which demo? (hdmole)"))
            } else {
                Ok(())
            };
        }
        Some("hdmole") => {}
        Some("saml") => return demo_saml(&args[1..]),
        Some("lorb") => return demo_lorb(&args[1..]),
        Some(other) => {
            return Err(usage(format!(
                "molora demo: unknown demo `{other}` (available: hdmole, saml, lorb)"
            )))
        }
    }
    let mut cfg = HdmoleDemoConfig::default();
    let mut out: Option<PathBuf> = None;
    let mut dev = "cpu".to_string();
    let mut explicit = Vec::new();
    let mut i = 1;
    while i < args.len() {
        let a = args[i].as_str();
        match a {
            "-h" | "--help" => {
                print!("{DEMO_HELP}");
                return Ok(());
            }
            "--seed" => {
                explicit.push(("seed", number::<u64>(value(args, &mut i, a)?, a)? as usize))
            }
            "--steps" => explicit.push(("steps", number(value(args, &mut i, a)?, a)?)),
            "--pretrain-steps" => explicit.push(("pretrain", number(value(args, &mut i, a)?, a)?)),
            "--rank" => explicit.push(("rank", number(value(args, &mut i, a)?, a)?)),
            "--targets" => {
                cfg.targets = value(args, &mut i, a)?
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect();
            }
            "--no-expert-init" => explicit.push(("no-init", 0)),
            "--small" => {
                let targets = cfg.targets.clone();
                cfg = HdmoleDemoConfig {
                    targets,
                    ..HdmoleDemoConfig::small()
                };
            }
            "--out" => out = Some(PathBuf::from(value(args, &mut i, a)?)),
            "--device" => dev = device(value(args, &mut i, a)?)?,
            other => {
                return Err(usage(format!(
                    "molora demo hdmole: unknown option `{other}` (see --help)"
                )))
            }
        }
        i += 1;
    }
    // Explicit values win over --small, whatever the order.
    for (k, v) in explicit {
        match k {
            "seed" => cfg.seed = v as u64,
            "steps" => cfg.steps = v,
            "pretrain" => cfg.pretrain_steps = v,
            "rank" => cfg.rank = v,
            _ => cfg.init_from_domain_lora = false,
        }
    }
    cfg.device = demo_device(&dev);
    let mut progress = Progress::new();
    eprintln!(
        "molora demo hdmole: seed {}, {} pretraining steps, {} steps per method, targets {}",
        cfg.seed,
        cfg.pretrain_steps,
        cfg.steps,
        cfg.targets.join(",")
    );
    let report =
        run_hdmole_demo(&cfg, out.as_deref(), &mut |s| progress.line(s)).map_err(failure)?;
    progress.done();
    println!("{}", report.to_markdown());
    if let Some(dir) = out {
        eprintln!(
            "wrote {}/report.json and the adapters as {}/{{lora,mole_topk,hdmole}}.safetensors",
            dir.display(),
            dir.display()
        );
    }
    Ok(())
}

/// The demo's device for `--device`: CUDA device 0 for `cuda` (a build without `candle-cuda` says
/// so when the demo starts).
fn demo_device(dev: &str) -> molora::model::DemoDevice {
    if dev == "cuda" {
        molora::model::DemoDevice::Cuda(0)
    } else {
        molora::model::DemoDevice::Cpu
    }
}

fn demo_saml(args: &[String]) -> Result<(), Fail> {
    use molora::model::saml_demo::{run_saml_demo, SamlDemoConfig};
    let mut cfg = SamlDemoConfig::default();
    let (mut seed, mut epochs, mut lr_router, mut lr_experts) = (None, None, None, None);
    let mut dev = "cpu".to_string();
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        match a {
            "-h" | "--help" => {
                print!("{SAML_HELP}");
                return Ok(());
            }
            "--seed" => seed = Some(number::<u64>(value(args, &mut i, a)?, a)?),
            "--epochs" => epochs = Some(number::<usize>(value(args, &mut i, a)?, a)?),
            "--lr-router" => lr_router = Some(number::<f64>(value(args, &mut i, a)?, a)?),
            "--lr-experts" => lr_experts = Some(number::<f64>(value(args, &mut i, a)?, a)?),
            "--small" => cfg = SamlDemoConfig::tiny(),
            "--device" => dev = device(value(args, &mut i, a)?)?,
            other => {
                return Err(usage(format!(
                    "molora demo saml: unknown option `{other}` (see --help)"
                )))
            }
        }
        i += 1;
    }
    if let Some(s) = seed {
        cfg.seed = s;
    }
    if let Some(e) = epochs {
        cfg.epochs = e;
    }
    if let Some(v) = lr_router {
        cfg.lr_router = v;
    }
    if let Some(v) = lr_experts {
        cfg.lr_experts = v;
    }
    cfg.device = demo_device(&dev);
    let mut progress = Progress::new();
    let report = run_saml_demo(&cfg, &mut |s| progress.line(s)).map_err(failure)?;
    progress.done();
    println!("{}", report.to_markdown());
    Ok(())
}

fn demo_lorb(args: &[String]) -> Result<(), Fail> {
    use molora::model::lorb::{run_lorb_demo, LorbDemoConfig};
    let mut cfg = LorbDemoConfig::default();
    let mut seed = None;
    let mut dev = "cpu".to_string();
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        match a {
            "-h" | "--help" => {
                print!("{LORB_HELP}");
                return Ok(());
            }
            "--seed" => seed = Some(number::<u64>(value(args, &mut i, a)?, a)?),
            "--small" => cfg = LorbDemoConfig::tiny(),
            "--device" => dev = device(value(args, &mut i, a)?)?,
            other => {
                return Err(usage(format!(
                    "molora demo lorb: unknown option `{other}` (see --help)"
                )))
            }
        }
        i += 1;
    }
    if let Some(s) = seed {
        cfg.seed = s;
    }
    cfg.device = demo_device(&dev);
    let mut progress = Progress::new();
    let report = run_lorb_demo(&cfg, &mut |s| progress.line(s)).map_err(failure)?;
    progress.done();
    println!("{}", report.to_markdown());
    Ok(())
}

fn bench(args: &[String]) -> Result<(), Fail> {
    let mut dev = "cpu".to_string();
    let mut quick = false;
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        match a {
            "-h" | "--help" => {
                print!("{BENCH_HELP}");
                return Ok(());
            }
            "--device" => dev = device(value(args, &mut i, a)?)?,
            "--quick" => quick = true,
            other => {
                return Err(usage(format!(
                    "molora bench: unknown option `{other}` (see --help)"
                )))
            }
        }
        i += 1;
    }
    let table = if dev == "cuda" {
        gpu_table(quick)?
    } else {
        eprintln!("molora bench: the CPU path (the reference), LoRA part only");
        molora::bench::cpu_table(quick).map_err(failure)?
    };
    println!("{table}");
    Ok(())
}

#[cfg(feature = "cuda")]
fn gpu_table(quick: bool) -> Result<String, Fail> {
    use molora::cuda::bench::{run, BenchOptions};
    let mut out = String::new();
    for dtype in [molora::DType::BF16, molora::DType::F16] {
        let mut opts = BenchOptions::new(dtype);
        if quick {
            opts.iters = 10;
        }
        out.push_str(&run(&opts).map_err(failure)?);
        out.push('\n');
    }
    Ok(out)
}

#[cfg(not(feature = "cuda"))]
fn gpu_table(_quick: bool) -> Result<String, Fail> {
    Err(failure(molora::Error::CudaNotCompiled {
        op: "molora bench --device cuda",
    }))
}

fn inspect(args: &[String]) -> Result<(), Fail> {
    match args {
        [a] if a == "-h" || a == "--help" => {
            print!("{INSPECT_HELP}");
            Ok(())
        }
        [file] => {
            let report =
                molora::model::weights::inspect(std::path::Path::new(file)).map_err(failure)?;
            print!("{report}");
            Ok(())
        }
        [] => Err(usage("molora inspect: which file? (molora inspect FILE)")),
        _ => Err(usage("molora inspect takes one file")),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        None | Some("help" | "-h" | "--help") => {
            print!("{HELP}");
            Ok(())
        }
        Some("demo") => demo(&args[1..]),
        Some("bench") => bench(&args[1..]),
        Some("inspect") => inspect(&args[1..]),
        Some(other) => Err(usage(format!(
            "molora: unknown command `{other}` (see molora --help)"
        ))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("error: {}", f.msg);
            ExitCode::from(f.code)
        }
    }
}
