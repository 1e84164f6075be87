//! Runs one MoLE layer on the CPU reference path in every routing mode and prints, per mode, how
//! many experts each token used and how far the LoRA part moved the output from the base.
//!
//! `cargo run --release --example 01_mole_layer [-- TOKENS D_IN D_OUT EXPERTS RANK]`

use half::bf16;
use molora::cpu::{
    self, Activation, BaseWeight, DenseBase, Experts, Gate, HierarchicalCombine, RouterWeights,
    ThresholdSpec,
};
use molora::Rng;
use molora::{Element, LoraShape, Result, Routing, Segments, SeqRouting};

/// Deterministic pseudo-random values in [-scale, scale).
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    Rng::new(seed).values(n, scale)
}

fn typed<T: Element>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x)).collect()
}

fn rms(v: &[f32]) -> f32 {
    if v.is_empty() {
        return 0.0;
    }
    (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt()
}

fn arg(args: &[String], i: usize, default: usize) -> std::result::Result<usize, String> {
    match args.get(i) {
        None => Ok(default),
        Some(s) => s
            .parse()
            .map_err(|_| format!("argument {i} ({s:?}) is not a non-negative integer")),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = (|| -> std::result::Result<_, String> {
        Ok((
            arg(&args, 0, 48)?,
            arg(&args, 1, 96)?,
            arg(&args, 2, 80)?,
            arg(&args, 3, 4)?,
            arg(&args, 4, 8)?,
        ))
    })();
    let (t, d_in, d_out, e, r) = match parsed {
        Ok(v) => v,
        Err(msg) => {
            eprintln!("error: {msg}\nusage: 01_mole_layer [TOKENS D_IN D_OUT EXPERTS RANK]");
            std::process::exit(2);
        }
    };
    if let Err(err) = run(t, d_in, d_out, e, r) {
        eprintln!("error: {err}");
        std::process::exit(1);
    }
}

fn run(t: usize, d_in: usize, d_out: usize, e: usize, r: usize) -> Result<()> {
    let shape = LoraShape::new(e, r, d_in, d_out)?;
    let x: Vec<bf16> = typed(&values(t * d_in, 1, 1.0));
    let w0: Vec<bf16> = typed(&values(d_out * d_in, 2, 1.0 / (d_in as f32).sqrt()));
    let bias: Vec<bf16> = typed(&values(d_out, 3, 0.1));
    let a: Vec<bf16> = typed(&values(shape.a_len(), 4, 1.0 / (d_in as f32).sqrt()));
    let b: Vec<bf16> = typed(&values(shape.b_len(), 5, 0.5));
    let w_g: Vec<bf16> = typed(&values(e * d_in, 6, 2.0 / (d_in as f32).sqrt()));
    let alpha = 2.0 * r as f32;
    let experts = Experts::new(&a, &b, shape, alpha / r as f32)?;
    let base = DenseBase {
        weight: &w0,
        bias: Some(&bias),
    };
    let router = RouterWeights {
        w_g: &w_g,
        b_g: None,
        activation: Activation::Softmax,
        temperature: 1.0,
    };
    // Two utterances; the global (utterance-level) posterior prefers expert 0, then the last expert.
    let seqs = Segments::from_lengths(&[t / 2, t - t / 2])?;
    let mut global = vec![0.1 / e.max(2) as f32; 2 * e];
    global[0] += 0.9;
    global[2 * e - 1] += 0.9;
    let global = SeqRouting::new(seqs.clone(), e, global)?;

    let base_out = cpu::base_forward(&x, t, &base, d_in, d_out)?;
    println!("MoLE layer on the CPU: T = {t}, d_in = {d_in}, d_out = {d_out}, E = {e}, r = {r}, alpha = {alpha}, bf16");
    println!("base output rms {:.4}\n", rms(&base_out));
    println!("| routing | active experts / token (min..max, mean) | LoRA rms | y[0, ..4] |");
    println!("|---|---|---|---|");

    let k = 2.min(e);
    type Hierarchy<'a> = Option<(&'a SeqRouting, HierarchicalCombine)>;
    let modes: Vec<(String, Hierarchy, Gate)> = vec![
        (
            format!("top-{k}, renormalised"),
            None,
            Gate::TopK {
                k,
                renormalize: true,
            },
        ),
        (
            "dynamic threshold τ = σ(0)/E".into(),
            None,
            Gate::Threshold(ThresholdSpec::Learned { theta: 0.0 }),
        ),
        (
            "hierarchical λ = 0.5, threshold".into(),
            Some((&global, HierarchicalCombine::Mix { lambda: 0.5 })),
            Gate::Threshold(ThresholdSpec::Learned { theta: 0.0 }),
        ),
        (
            "hierarchical product, top-1".into(),
            Some((&global, HierarchicalCombine::Product)),
            Gate::TopK {
                k: 1,
                renormalize: true,
            },
        ),
        ("dense (soft)".into(), None, Gate::Dense),
    ];
    for (label, hierarchy, gate) in modes {
        let routing = cpu::route(&x, t, d_in, e, &router, hierarchy, &gate)?;
        let y = cpu::mole_forward(&x, t, &base.into(), &experts, &routing)?;
        print_row(&label, Some(&routing), &y, &base_out, d_out);
    }

    // SAML: one mixing vector per utterance, experts mixed in weight space, on an NF4 base.
    let per_seq = SeqRouting::new(seqs, e, global.probs().to_vec())?;
    let y = cpu::mole_forward_weight_space(&x, t, &base.into(), &experts, &per_seq)?;
    print_row(
        "per-utterance weight-space (SAML)",
        None,
        &y,
        &base_out,
        d_out,
    );
    let nf4 = cpu::quantize_nf4(&w0, d_out, d_in)?;
    let y = cpu::mole_forward_weight_space(
        &x,
        t,
        &BaseWeight::Nf4(&nf4, Some(&bias)),
        &experts,
        &per_seq,
    )?;
    print_row(
        "same, NF4 base (vs the bf16 base's output)",
        None,
        &y,
        &base_out,
        d_out,
    );
    println!(
        "\nNF4 base: {} bytes against {} in bf16 ({:.1}x smaller)",
        nf4.bytes(),
        w0.len() * 2,
        (w0.len() * 2) as f32 / nf4.bytes() as f32
    );
    Ok(())
}

/// One table row; `routing` is `None` for weight-space mixing (every token uses its utterance's
/// mixture of all experts).
fn print_row(label: &str, routing: Option<&Routing>, y: &[bf16], base: &[f32], d_out: usize) {
    let active = match routing {
        None => "all (one mixed adapter per utterance)".to_string(),
        Some(routing) => {
            let t = routing.num_tokens();
            let per_token: Vec<usize> = (0..t)
                .map(|i| {
                    (0..routing.k_max())
                        .filter(|&s| routing.id(i, s) >= 0)
                        .count()
                })
                .collect();
            format!(
                "{}..{}, {:.2}",
                per_token.iter().min().unwrap_or(&0),
                per_token.iter().max().unwrap_or(&0),
                per_token.iter().sum::<usize>() as f32 / t.max(1) as f32
            )
        }
    };
    let delta: Vec<f32> = y.iter().zip(base).map(|(a, b)| a.to_f32() - b).collect();
    let head: Vec<String> = y
        .iter()
        .take(4.min(d_out))
        .map(|v| format!("{:+.3}", v.to_f32()))
        .collect();
    println!(
        "| {label} | {active} | {:.4} | {} |",
        rms(&delta),
        head.join(" ")
    );
}
