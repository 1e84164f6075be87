//! The command line: subcommands and flags, each value checked as it is parsed, so that a bad value
//! is a usage error naming the flag and the value before any work starts.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "molora",
    about = "molora: mixtures of LoRA experts — kernels, models and demos",
    after_help = "`molora <command> --help` describes a command's options."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// A demo: hdmole, saml or lorb (`molora demo <demo> --help`)
    Demo {
        #[command(subcommand)]
        demo: Demo,
    },
    /// The benchmark table (the CPU path here; --device cuda for the GPU kernels)
    #[command(long_about = "\
molora bench: the LoRA part of a MoLE layer timed per shape, as a Markdown table with GB/s.")]
    Bench(BenchArgs),
    /// Experts, ranks, shapes and routing config of a .safetensors file (a molora expert file or a
    /// PEFT adapter_model.safetensors)
    #[command(long_about = "\
molora inspect FILE: what a .safetensors file holds — for a molora expert file one line per MoLE
layer (experts, rank, d_in → d_out, alpha, routing); for a PEFT adapter its r, alpha, target modules,
one line per module and what molora's PEFT loader would reject; otherwise every tensor. Always the
totals. Only the file's header is read.")]
    Inspect(InspectArgs),
}

#[derive(Debug, Subcommand)]
pub enum Demo {
    /// HDMoLE against full fine-tuning, one LoRA and top-k MoLE on accented speech (espeak-ng), or a
    /// synthetic multi-accent task; prints the results table
    #[command(long_about = "\
molora demo hdmole: pretrain a small LLM-ASR model (speech encoder, projector, autoregressive word
decoder) on general-domain speech (espeak-ng en-us), then fine-tune it on four English accents
four ways (full fine-tuning, one LoRA, MoLE top-k, HDMoLE) and print each model's word error rate
per domain from decoding held-out sentences, the trainable parameters, the model bytes, the wall
time, HDMoLE's domain × expert routing table and its learned thresholds. The speech is synthesised
once into a cache ($MOLORA_SPEECH_CACHE, else ~/.cache/molora/speech); espeak-ng must be installed
(scripts/speech-deps.sh). --data synthetic runs the frame-level synthetic accent task instead.")]
    Hdmole(HdmoleArgs),
    /// SAML on an NF4-quantised Whisper-shaped model adapted per target speaker (espeak-ng speakers,
    /// or synthetic ones), against the full-precision and quantised models and one LoRA
    #[command(long_about = "\
molora demo saml: pretrain a Whisper-shaped encoder-decoder on a pool of espeak-ng speakers (en-us
voice variants at a pitch and a rate), quantise it to NF4, train one rank-1 LoRA per training
speaker, then adapt to each unseen target speaker from 40 of its utterances with one LoRA and with
SAML (experts from the speaker LoRAs, per-utterance routers, two Adam optimisers taking turns), and
print the WER of decoding each target speaker's held-out sentences. --data synthetic runs the
synthetic speakers instead (token error, teacher-forced).")]
    Saml(SamlArgs),
    /// LoRB: a BERT-style N-best rescorer adapted with LoRA and MWER (+ L_cor) on a speech
    /// recogniser's N-best lists (or synthetic lists), against the first pass and full fine-tuning
    #[command(long_about = "\
molora demo lorb: pretrain the HDMoLE demo's speech recogniser on en-us speech (espeak-ng), decode
accented speech with its beam search into N-best lists, pretrain a small BERT-style rescorer on two
accents' lists, adapt it to the other two accents' lists with MWER (full fine-tuning, LoRA on q and
v, LoRA + the correlation regulariser) and print the WER of the first pass and of each rescorer on
held-out lists, trainable parameters and training time. --data synthetic runs the synthetic
rescoring task instead.")]
    Lorb(LorbArgs),
}

/// Where to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    /// The CPU
    Cpu,
    /// CUDA device 0
    Cuda,
}

/// The dtype the demo's models run in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    F32,
    F16,
    Bf16,
}

impl DtypeArg {
    pub fn candle(self) -> candle_core::DType {
        match self {
            DtypeArg::F32 => candle_core::DType::F32,
            DtypeArg::F16 => candle_core::DType::F16,
            DtypeArg::Bf16 => candle_core::DType::BF16,
        }
    }
}

/// The options every demo has.
#[derive(Debug, Args)]
pub struct DemoCommon {
    /// The test suite's small, fast configuration (explicit options still win)
    #[arg(long)]
    pub small: bool,
    /// Write the outputs into DIR (made if missing; its parent must exist): report.json, report.md
    /// and, for hdmole, each method's adapters (<method>.safetensors). All are written, or none
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Replace outputs that already exist in --out DIR
    #[arg(long, requires = "out")]
    pub force: bool,
    /// The dtype the models run in
    #[arg(long, value_enum, value_name = "DTYPE", default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
    /// Where to train (cuda: GPU 0, a build with --features candle-cuda)
    #[arg(long, value_enum, value_name = "DEVICE", default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
}

/// What a demo trains and scores on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DataArg {
    /// Speech synthesised by espeak-ng, decoded and scored by WER
    Speech,
    /// The synthetic task (frames or tokens from a generator), scored by token error
    Synthetic,
}

#[derive(Debug, Args)]
pub struct HdmoleArgs {
    /// What to train and score on
    #[arg(long, value_enum, value_name = "DATA", default_value_t = DataArg::Speech)]
    pub data: DataArg,
    /// Data and initialisation seed [default: 1; synthetic 7]
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub seed: Option<u64>,
    /// Optimiser steps per fine-tuning method [default: 300]
    #[arg(long, value_name = "N", value_parser = at_least_one, allow_negative_numbers = true)]
    pub steps: Option<usize>,
    /// Optimiser steps of the general-domain pretraining [default: 1500; synthetic 600]
    #[arg(long, value_name = "N", value_parser = at_least_one, allow_negative_numbers = true)]
    pub pretrain_steps: Option<usize>,
    /// Comma-separated layers that get adapters [default: projector,decoder; synthetic
    /// projector,decoder.q,decoder.v,decoder.o]. Speech model layers: projector.0, projector.1,
    /// decoder.<i>.{q,k,v,o,up,down}, a projection of every decoder layer (`decoder.q`) or a
    /// prefix (`projector`, `decoder`, `decoder.1`). Synthetic model: projector.0, projector.1,
    /// decoder.{q,k,v,o,up,down} or a prefix. Never the encoder, whose output gives HDMoLE's
    /// global accent posterior
    #[arg(long, value_name = "LIST", value_parser = targets)]
    pub targets: Option<Targets>,
    /// LoRA rank [default: 8]
    #[arg(long, value_name = "N", value_parser = rank, allow_negative_numbers = true)]
    pub rank: Option<usize>,
    /// Beam width of the speech decoding (1: greedy) [default: 1]
    #[arg(long, value_name = "N", value_parser = at_least_one, allow_negative_numbers = true)]
    pub beam: Option<usize>,
    /// Do not initialise HDMoLE's experts from per-accent LoRAs
    #[arg(long)]
    pub no_expert_init: bool,
    #[command(flatten)]
    pub common: DemoCommon,
}

#[derive(Debug, Args)]
pub struct SamlArgs {
    /// What to train and score on
    #[arg(long, value_enum, value_name = "DATA", default_value_t = DataArg::Speech)]
    pub data: DataArg,
    /// Data and initialisation seed [default: 1; synthetic 11]
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub seed: Option<u64>,
    /// Adaptation epochs [default: 10]
    #[arg(long, value_name = "N", value_parser = at_least_one, allow_negative_numbers = true)]
    pub epochs: Option<usize>,
    /// SAML router learning rate [default: 1e-3, PAPERS.md]
    #[arg(long, value_name = "X", value_parser = learning_rate, allow_hyphen_values = true)]
    pub lr_router: Option<f64>,
    /// SAML experts learning rate [default: 3e-4, PAPERS.md]
    #[arg(long, value_name = "X", value_parser = learning_rate, allow_hyphen_values = true)]
    pub lr_experts: Option<f64>,
    #[command(flatten)]
    pub common: DemoCommon,
}

#[derive(Debug, Args)]
pub struct LorbArgs {
    /// What to train and score on
    #[arg(long, value_enum, value_name = "DATA", default_value_t = DataArg::Speech)]
    pub data: DataArg,
    /// Data and initialisation seed [default: 1; synthetic 11]
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub seed: Option<u64>,
    /// Hypotheses per N-best list (the recogniser's beam width on speech) [default: 8]
    #[arg(long, value_name = "N", value_parser = at_least_one, allow_negative_numbers = true)]
    pub nbest: Option<usize>,
    #[command(flatten)]
    pub common: DemoCommon,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The CPU path, or the CUDA kernels against cuBLAS baselines (needs a build with --features
    /// cuda and a GPU)
    #[arg(long, value_enum, value_name = "DEVICE", default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
    /// Fewer shapes, shorter timing
    #[arg(long)]
    pub quick: bool,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The .safetensors file
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

/// The layers of `--targets`, checked.
#[derive(Debug, Clone)]
pub struct Targets(pub Vec<String>);

fn at_least_one(s: &str) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|e| format!("not a whole number ({e})"))?;
    if n == 0 {
        return Err("must be at least 1".into());
    }
    Ok(n)
}

fn rank(s: &str) -> Result<usize, String> {
    let n = at_least_one(s)?;
    if n > molora::MAX_RANK {
        return Err(format!("a LoRA rank must be at most {}", molora::MAX_RANK));
    }
    Ok(n)
}

fn learning_rate(s: &str) -> Result<f64, String> {
    let x: f64 = s.parse().map_err(|e| format!("not a number ({e})"))?;
    if !(x.is_finite() && x > 0.0) {
        return Err("a learning rate must be a finite number greater than 0".into());
    }
    Ok(x)
}

fn targets(s: &str) -> Result<Targets, String> {
    let list: Vec<String> = s
        .split(',')
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect();
    if list.is_empty() {
        return Err("the list is empty: name at least one layer".into());
    }
    // The layers of either model are accepted here; the chosen model checks its own before any
    // work (`--data`). A list neither model takes is refused with the speech model's reason.
    let speech = molora::demo::hdmole_speech::SpeechHdmoleConfig::default().model();
    let Err(e) = molora::demo::hdmole_speech::check_targets(&speech, &list) else {
        return Ok(Targets(list));
    };
    if molora::demo::hdmole::check_targets(&list).is_ok() {
        return Ok(Targets(list));
    }
    match e {
        molora::Error::Unsupported { what, .. } => Err(what),
        e => Err(e.to_string()),
    }
}
