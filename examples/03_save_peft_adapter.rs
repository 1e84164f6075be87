//! Writes a PEFT LoRA adapter with the crate's `save_peft_adapter`, for the tiny Whisper of
//! `tests/data/peft/whisper-tiny-config.json` (d_model 64, 2 encoder and 2 decoder layers): rank 4,
//! `lora_alpha` 8, the four projections of every attention block (24 modules), `A` and `B` drawn from molora's
//! generator (seed 7), so `B` is non-zero and the adapter changes the model. The Python package's
//! tests load it with `PeftModel.from_pretrained` and compare PEFT's outputs with molora's.
//!
//!     cargo run --example 03_save_peft_adapter -- OUT_DIR

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use molora::model::weights::{save_peft_adapter, LoraPair, PeftConfig};
use molora::Rng;

const D_MODEL: usize = 64;
const RANK: usize = 4;
const ALPHA: f32 = 8.0;
const PROJECTIONS: [&str; 4] = ["q_proj", "k_proj", "v_proj", "out_proj"];

fn random(rng: &mut Rng, rows: usize, cols: usize) -> molora::Result<Tensor> {
    let v: Vec<f32> = (0..rows * cols)
        .map(|_| 0.2 * rng.normal() as f32)
        .collect();
    Ok(Tensor::from_vec(v, (rows, cols), &Device::Cpu)?)
}

fn main() -> std::process::ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        eprintln!("usage: 03_save_peft_adapter OUT_DIR");
        return std::process::ExitCode::from(2);
    };
    match run(PathBuf::from(out)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(out: PathBuf) -> molora::Result<()> {
    let mut rng = Rng::new(7);
    let mut modules = BTreeMap::new();
    // Every attention projection PEFT's `target_modules` matches in the model: self-attention in
    // both stacks, and the decoder's cross-attention.
    let blocks = [
        ("encoder", "self_attn"),
        ("decoder", "self_attn"),
        ("decoder", "encoder_attn"),
    ];
    for (part, attn) in blocks {
        for layer in 0..2 {
            for proj in PROJECTIONS {
                let name = format!("model.{part}.layers.{layer}.{attn}.{proj}");
                let a = random(&mut rng, RANK, D_MODEL)?;
                let b = random(&mut rng, D_MODEL, RANK)?;
                modules.insert(name, LoraPair::new(a, b, ALPHA / RANK as f32)?);
            }
        }
    }
    let config = PeftConfig::new(RANK, ALPHA, &PROJECTIONS);
    save_peft_adapter(&out, &config, &modules)?;
    println!("{}: {} modules", out.display(), modules.len());
    Ok(())
}
