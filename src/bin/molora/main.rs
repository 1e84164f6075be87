//! `molora`: the command-line tool. `molora --help` lists the commands.
//!
//! Exit codes: 0 on success, 2 for a usage error (an unknown command or flag, a bad value), 1 for a
//! failure (a file that cannot be read or written, a demo that fails, standard output closed or
//! full). Every error is one message on stderr starting with `error: `.

mod args;
mod output;
mod progress;

/// The benchmark tables: programs over the library, shared with the example and the tests.
#[path = "../../../benches/tables/cpu.rs"]
mod cpu_tables;
#[cfg(feature = "cuda")]
#[path = "../../../benches/tables/cuda.rs"]
mod cuda_tables;

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;

use clap::{CommandFactory, Parser};

use args::{
    BenchArgs, Cli, Command, DataArg, Demo, DemoCommon, DeviceArg, HdmoleArgs, LorbArgs, SamlArgs,
};
use molora::model::inspect::escape;
use output::OutDir;
use progress::Progress;

/// A command-line error: the message, printed to stderr with exit code 2 (usage) or 1 (failure).
pub struct Fail {
    code: u8,
    msg: String,
}

impl Fail {
    pub fn usage(msg: impl Into<String>) -> Self {
        Fail {
            code: 2,
            msg: msg.into(),
        }
    }

    pub fn failure(msg: impl Into<String>) -> Self {
        Fail {
            code: 1,
            msg: msg.into(),
        }
    }
}

impl From<molora::Error> for Fail {
    fn from(e: molora::Error) -> Self {
        Fail::failure(e.to_string())
    }
}

/// Writes `text` to standard output; a closed or full stdout is a failure, not a panic.
fn print(text: &str) -> Result<(), Fail> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| Fail::failure(format!("writing to standard output: {e}")))
}

/// A note on stderr (nothing to do if stderr itself cannot be written).
fn note(text: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

fn shown(p: &Path) -> String {
    escape(&p.display().to_string())
}

/// The demo's device for `--device`: CUDA device 0 for `cuda`.
fn demo_device(dev: DeviceArg) -> molora::demo::DemoDevice {
    match dev {
        DeviceArg::Cuda => molora::demo::DemoDevice::Cuda(0),
        DeviceArg::Cpu => molora::demo::DemoDevice::Cpu,
    }
}

/// What every demo does before its work: the settings checked (a usage error: they came from the
/// flags), the device opened, the output directory checked and staged.
fn prepare(
    check: molora::Result<()>,
    device: molora::demo::DemoDevice,
    common: &DemoCommon,
    files: &[&str],
) -> Result<Option<OutDir>, Fail> {
    check.map_err(|e| Fail::usage(format!("these options do not fit together: {e}")))?;
    device.candle()?;
    common
        .out
        .as_deref()
        .map(|dir| OutDir::prepare(dir, files, common.force))
        .transpose()
}

/// [`prepare`] for a speech demo: after the settings and before the device and the output
/// directory, the synthesiser (its error says how to install it).
fn prepare_speech(
    check: molora::Result<()>,
    device: molora::demo::DemoDevice,
    common: &DemoCommon,
    files: &[&str],
) -> Result<Option<OutDir>, Fail> {
    if check.is_ok() {
        molora::speech::synth::espeak_version()?;
    }
    prepare(check, device, common, files)
}

/// Writes `report.md` (and `report.json` when given) into the staging directory, moves every output
/// into place, prints the table and says where the files went.
fn finish(
    out: Option<OutDir>,
    markdown: &str,
    json: Option<serde_json::Value>,
) -> Result<(), Fail> {
    let dir = match out {
        Some(out) => {
            out.write("report.md", markdown.as_bytes())?;
            if let Some(json) = json {
                let text = serde_json::to_string_pretty(&json)
                    .map_err(|e| Fail::failure(format!("report.json: {e}")))?;
                out.write("report.json", text.as_bytes())?;
            }
            Some(out)
        }
        None => None,
    };
    let written = dir.as_ref().map(|d| d.target().to_path_buf());
    if let Some(d) = dir {
        d.commit()?;
    }
    print(&format!("{markdown}\n"))?;
    if let Some(d) = written {
        note(&format!("wrote the outputs into {}", shown(&d)));
    }
    Ok(())
}

/// The files `molora demo hdmole --out` writes.
const HDMOLE_FILES: [&str; 5] = [
    "report.json",
    "report.md",
    "lora.safetensors",
    "mole_topk.safetensors",
    "hdmole.safetensors",
];

fn demo_hdmole(a: HdmoleArgs) -> Result<(), Fail> {
    match a.data {
        DataArg::Speech => demo_hdmole_speech(a),
        DataArg::Synthetic => demo_hdmole_synthetic(a),
    }
}

fn demo_hdmole_speech(a: HdmoleArgs) -> Result<(), Fail> {
    use molora::demo::hdmole_speech::{run_speech_hdmole_demo, SpeechHdmoleConfig};
    let mut cfg = if a.common.small {
        SpeechHdmoleConfig::small()
    } else {
        SpeechHdmoleConfig::default()
    };
    if let Some(v) = a.seed {
        cfg.seed = v;
    }
    if let Some(v) = a.steps {
        cfg.steps = v;
    }
    if let Some(v) = a.pretrain_steps {
        cfg.pretrain_steps = v;
    }
    if let Some(v) = a.rank {
        cfg.rank = v;
    }
    if let Some(v) = a.beam {
        cfg.beam = v;
    }
    if let Some(t) = a.targets {
        cfg.targets = t.0;
    }
    if a.no_expert_init {
        cfg.init_from_domain_lora = false;
    }
    cfg.device = demo_device(a.common.device);
    cfg.dtype = a.common.dtype.candle();
    let out = prepare_speech(cfg.check(), cfg.device, &a.common, &HDMOLE_FILES)?;
    note(&format!(
        "molora demo hdmole (speech): seed {}, {} pretraining steps, {} steps per method, targets {}, beam {}",
        cfg.seed,
        cfg.pretrain_steps,
        cfg.steps,
        escape(&cfg.targets.join(",")),
        cfg.beam
    ));
    let report = {
        let mut progress = Progress::new();
        run_speech_hdmole_demo(&cfg, out.as_ref().map(OutDir::staging), &mut |s| {
            progress.line(s)
        })?
    };
    finish(out, &report.to_markdown(), None)
}

fn demo_hdmole_synthetic(a: HdmoleArgs) -> Result<(), Fail> {
    use molora::demo::hdmole::{run_hdmole_demo, HdmoleDemoConfig};
    if a.beam.is_some() {
        return Err(Fail::usage(
            "--beam decodes speech: it does not apply to --data synthetic (frame classification)",
        ));
    }
    let mut cfg = if a.common.small {
        HdmoleDemoConfig::small()
    } else {
        HdmoleDemoConfig::default()
    };
    if let Some(v) = a.seed {
        cfg.seed = v;
    }
    if let Some(v) = a.steps {
        cfg.steps = v;
    }
    if let Some(v) = a.pretrain_steps {
        cfg.pretrain_steps = v;
    }
    if let Some(v) = a.rank {
        cfg.rank = v;
    }
    if let Some(t) = a.targets {
        cfg.targets = t.0;
    }
    if a.no_expert_init {
        cfg.init_from_domain_lora = false;
    }
    cfg.device = demo_device(a.common.device);
    cfg.dtype = a.common.dtype.candle();
    let out = prepare(cfg.check(), cfg.device, &a.common, &HDMOLE_FILES)?;
    note(&format!(
        "molora demo hdmole (synthetic): seed {}, {} pretraining steps, {} steps per method, targets {}",
        cfg.seed,
        cfg.pretrain_steps,
        cfg.steps,
        escape(&cfg.targets.join(","))
    ));
    let report = {
        let mut progress = Progress::new();
        run_hdmole_demo(&cfg, out.as_ref().map(OutDir::staging), &mut |s| {
            progress.line(s)
        })?
    };
    // run_hdmole_demo wrote report.json and the adapters; report.md is ours.
    finish(out, &report.to_markdown(), None)
}

fn demo_saml(a: SamlArgs) -> Result<(), Fail> {
    if a.data == DataArg::Speech {
        return demo_saml_speech(a);
    }
    use molora::demo::saml::{run_saml_demo, SamlDemoConfig};
    let mut cfg = if a.common.small {
        SamlDemoConfig::tiny()
    } else {
        SamlDemoConfig::default()
    };
    if let Some(v) = a.seed {
        cfg.seed = v;
    }
    if let Some(v) = a.epochs {
        cfg.epochs = v;
    }
    if let Some(v) = a.lr_router {
        cfg.lr_router = v;
    }
    if let Some(v) = a.lr_experts {
        cfg.lr_experts = v;
    }
    cfg.device = demo_device(a.common.device);
    cfg.dtype = a.common.dtype.candle();
    let out = prepare(
        cfg.check(),
        cfg.device,
        &a.common,
        &["report.json", "report.md"],
    )?;
    let report = {
        let mut progress = Progress::new();
        run_saml_demo(&cfg, &mut |s| progress.line(s))?
    };
    finish(out, &report.to_markdown(), Some(report.to_json()))
}

fn demo_saml_speech(a: SamlArgs) -> Result<(), Fail> {
    use molora::demo::saml_speech::{run_speech_saml_demo, SpeechSamlConfig};
    let mut cfg = if a.common.small {
        SpeechSamlConfig::small()
    } else {
        SpeechSamlConfig::default()
    };
    if let Some(v) = a.seed {
        cfg.seed = v;
    }
    if let Some(v) = a.epochs {
        cfg.epochs = v;
    }
    if let Some(v) = a.lr_router {
        cfg.lr_router = v;
    }
    if let Some(v) = a.lr_experts {
        cfg.lr_experts = v;
    }
    cfg.device = demo_device(a.common.device);
    cfg.dtype = a.common.dtype.candle();
    let out = prepare_speech(
        cfg.check(),
        cfg.device,
        &a.common,
        &["report.json", "report.md"],
    )?;
    note(&format!(
        "molora demo saml (speech): seed {}, {} target speakers, {} epochs",
        cfg.seed, cfg.target_speakers, cfg.epochs
    ));
    let report = {
        let mut progress = Progress::new();
        run_speech_saml_demo(&cfg, &mut |s| progress.line(s))?
    };
    finish(out, &report.to_markdown(), Some(report.to_json()))
}

fn demo_lorb(a: LorbArgs) -> Result<(), Fail> {
    if a.data == DataArg::Speech {
        return demo_lorb_speech(a);
    }
    use molora::demo::lorb::{run_lorb_demo, LorbDemoConfig};
    let mut cfg = if a.common.small {
        LorbDemoConfig::tiny()
    } else {
        LorbDemoConfig::default()
    };
    if let Some(v) = a.seed {
        cfg.seed = v;
    }
    if let Some(v) = a.nbest {
        cfg.nbest = v;
    }
    cfg.device = demo_device(a.common.device);
    cfg.dtype = a.common.dtype.candle();
    let out = prepare(
        cfg.check(),
        cfg.device,
        &a.common,
        &["report.json", "report.md"],
    )?;
    let report = {
        let mut progress = Progress::new();
        run_lorb_demo(&cfg, &mut |s| progress.line(s))?
    };
    finish(out, &report.to_markdown(), Some(report.to_json()))
}

fn demo_lorb_speech(a: LorbArgs) -> Result<(), Fail> {
    use molora::demo::lorb_speech::{run_speech_lorb_demo, SpeechLorbConfig};
    let mut cfg = if a.common.small {
        SpeechLorbConfig::small()
    } else {
        SpeechLorbConfig::default()
    };
    if let Some(v) = a.seed {
        cfg.seed = v;
    }
    if let Some(v) = a.nbest {
        cfg.nbest = v;
    }
    cfg.device = demo_device(a.common.device);
    cfg.training.dtype = a.common.dtype.candle();
    let out = prepare_speech(
        cfg.check(),
        cfg.device,
        &a.common,
        &["report.json", "report.md"],
    )?;
    note(&format!(
        "molora demo lorb (speech): seed {}, N-best lists of {} from the recogniser's beam",
        cfg.seed, cfg.nbest
    ));
    let report = {
        let mut progress = Progress::new();
        run_speech_lorb_demo(&cfg, &mut |s| progress.line(s))?
    };
    finish(out, &report.to_markdown(), Some(report.to_json()))
}

fn bench(a: BenchArgs) -> Result<(), Fail> {
    let table = match a.device {
        DeviceArg::Cuda => gpu_table(a.quick)?,
        DeviceArg::Cpu => {
            note("molora bench: the CPU path (the reference), LoRA part only");
            cpu_tables::cpu_table(a.quick)?
        }
    };
    print(&format!("{table}\n"))
}

#[cfg(feature = "cuda")]
fn gpu_table(quick: bool) -> Result<String, Fail> {
    use cuda_tables::{run, BenchOptions};
    let mut out = String::new();
    for dtype in [molora::DType::BF16, molora::DType::F16] {
        let mut opts = BenchOptions::new(dtype);
        if quick {
            opts.iters = 10;
        }
        out.push_str(&run(&opts)?);
        out.push('\n');
    }
    Ok(out)
}

#[cfg(not(feature = "cuda"))]
fn gpu_table(_quick: bool) -> Result<String, Fail> {
    Err(molora::Error::CudaNotCompiled {
        op: "molora bench --device cuda",
    }
    .into())
}

fn inspect(file: &Path) -> Result<(), Fail> {
    let report = molora::model::inspect::inspect(file)?;
    print(&report)
}

fn run(cli: Cli) -> Result<(), Fail> {
    match cli.command {
        None => {
            let help = Cli::command().render_long_help();
            let help = if std::io::stdout().is_terminal() {
                help.ansi().to_string()
            } else {
                help.to_string()
            };
            print(&help)
        }
        Some(Command::Demo { demo }) => match demo {
            Demo::Hdmole(a) => demo_hdmole(a),
            Demo::Saml(a) => demo_saml(a),
            Demo::Lorb(a) => demo_lorb(a),
        },
        Some(Command::Bench(a)) => bench(a),
        Some(Command::Inspect(a)) => inspect(&a.file),
    }
}

/// Help, and clap's usage errors: help on stdout (exit 0), errors on stderr (clap's exit code, 2).
fn clap_exit(e: clap::Error) -> ExitCode {
    let code = u8::try_from(e.exit_code()).unwrap_or(2);
    if e.use_stderr() {
        let rendered = e.render();
        let text = if std::io::stderr().is_terminal() {
            rendered.ansi().to_string()
        } else {
            rendered
                .to_string()
                .lines()
                .map(escape)
                .collect::<Vec<_>>()
                .join("\n")
                + "\n"
        };
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(text.as_bytes());
        if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
            // Only `molora demo` has a required subcommand: its help above lists the demos.
            let _ = writeln!(err, "error: molora demo: which demo? (hdmole, saml, lorb)");
        }
        return ExitCode::from(code);
    }
    let rendered = e.render();
    let text = if std::io::stdout().is_terminal() {
        rendered.ansi().to_string()
    } else {
        rendered.to_string()
    };
    match print(&text) {
        Ok(()) => ExitCode::from(code),
        Err(f) => report(f),
    }
}

fn report(f: Fail) -> ExitCode {
    note(&format!("error: {}", escape(&f.msg)));
    ExitCode::from(f.code)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse_from(std::env::args_os()) {
        Ok(cli) => cli,
        Err(e) => return clap_exit(e),
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => report(f),
    }
}
