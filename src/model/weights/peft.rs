//! PEFT LoRA adapters: [`load_peft_adapter`] reads what PEFT's `save_pretrained` writes into one
//! [`LoraPair`] per adapted module, [`save_peft_adapter`] writes the same layout back.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::Dtype as StDtype;
use serde_json::Value;

use super::files::{deserialize, save_tensors, view_to_tensor};
use super::{io_err, read_file, weights_err};
use crate::error::Result;
use crate::peft::{pattern_conflict, PeftConfig, TargetsGiven};

/// A PEFT key without its prefix as `(module, is_a)` (`…lora_A.weight` or `…lora_B.weight`), or why
/// it is not a LoRA weight molora reads.
pub(crate) fn split_lora_key(key: &str) -> std::result::Result<(&str, bool), &'static str> {
    if let Some(m) = key.strip_suffix(PEFT_A_SUFFIX) {
        Ok((m, true))
    } else if let Some(m) = key.strip_suffix(PEFT_B_SUFFIX) {
        Ok((m, false))
    } else if key.contains("lora_embedding_") {
        Err("LoRA on an embedding layer is not supported")
    } else if key.contains("lora_magnitude_vector") {
        Err("a DoRA magnitude vector is not supported")
    } else {
        Err("unexpected key")
    }
}

/// The file name of a PEFT adapter's configuration inside its directory.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
/// The file name of a PEFT adapter's weights inside its directory.
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The prefix PEFT puts before every module name in `adapter_model.safetensors`.
pub const PEFT_KEY_PREFIX: &str = "base_model.model.";
/// The suffix of a module's `A` matrix in a PEFT adapter.
pub const PEFT_A_SUFFIX: &str = ".lora_A.weight";
/// The suffix of a module's `B` matrix in a PEFT adapter.
pub const PEFT_B_SUFFIX: &str = ".lora_B.weight";

/// One module's LoRA: the update is `ΔW = scale · B · A` (`[d_out, d_in]`).
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// `A`, `[r, d_in]`, f32.
    pub a: Tensor,
    /// `B`, `[d_out, r]`, f32.
    pub b: Tensor,
    /// The scale applied to `B·A` (`alpha / r` for PEFT's plain LoRA).
    pub scale: f32,
}

impl LoraPair {
    /// A pair from `A [r, d_in]` and `B [d_out, r]` (any float dtype, converted to f32), checking the
    /// shapes and that the scale is finite.
    pub fn new(a: Tensor, b: Tensor, scale: f32) -> Result<Self> {
        let pair = LoraPair {
            a: a.to_dtype(DType::F32)?,
            b: b.to_dtype(DType::F32)?,
            scale,
        };
        pair.check("LoraPair", "(pair)")?;
        Ok(pair)
    }

    /// The rank `r` (rows of `A`; 0 if `A` is not 2-D).
    pub fn rank(&self) -> usize {
        match self.a.dims() {
            [r, _] => *r,
            _ => 0,
        }
    }

    /// The input width `d_in` (columns of `A`; 0 if `A` is not 2-D).
    pub fn d_in(&self) -> usize {
        match self.a.dims() {
            [_, d_in] => *d_in,
            _ => 0,
        }
    }

    /// The output width `d_out` (rows of `B`; 0 if `B` is not 2-D).
    pub fn d_out(&self) -> usize {
        match self.b.dims() {
            [d_out, _] => *d_out,
            _ => 0,
        }
    }

    /// Checks `A [r, d_in]`, `B [d_out, r]` with `r ≥ 1` and a finite scale, naming `key` in errors.
    pub(super) fn check(&self, source: &str, key: &str) -> Result<()> {
        let (a, b) = (self.a.dims(), self.b.dims());
        let err = |detail: String| weights_err(source, key, detail);
        let [r, d_in] = *a else {
            return Err(err(format!("A must be 2-D [r, d_in], got shape {a:?}")));
        };
        let [d_out, rb] = *b else {
            return Err(err(format!("B must be 2-D [d_out, r], got shape {b:?}")));
        };
        if r == 0 || d_in == 0 || d_out == 0 {
            return Err(err(format!(
                "A {a:?} and B {b:?} must have r, d_in and d_out of at least 1"
            )));
        }
        if rb != r {
            return Err(err(format!(
                "ranks disagree: A {a:?} has rank {r} but B {b:?} has rank {rb} (expected B [{d_out}, {r}])"
            )));
        }
        if !self.scale.is_finite() {
            return Err(err(format!("scale must be finite, got {}", self.scale)));
        }
        Ok(())
    }
}

/// A PEFT LoRA adapter read by [`load_peft_adapter`].
#[derive(Debug, Clone)]
pub struct PeftAdapter {
    /// Its `adapter_config.json`.
    pub config: PeftConfig,
    /// One pair per adapted module, by module name (e.g. `model.encoder.layers.0.self_attn.q_proj`).
    pub modules: BTreeMap<String, LoraPair>,
    /// The directory it was read from.
    pub source: PathBuf,
}

/// Reads a PEFT LoRA adapter from `dir/adapter_config.json` and `dir/adapter_model.safetensors`.
///
/// Module names are the PEFT keys with the `base_model.model.` prefix and the `.lora_A.weight` /
/// `.lora_B.weight` suffix removed (e.g. `model.encoder.layers.0.self_attn.q_proj`). Tensors in
/// f32/f16/bf16 are converted to f32. Each pair's scale is [`PeftConfig::scale_for`] its module.
///
/// Errors ([`Error::Weights`], naming the file and the key or field): the config errors of
/// [`PeftConfig::from_json`]; a key without the `base_model.model.` prefix or that is not a `lora_A` /
/// `lora_B` weight (embedding LoRA, DoRA magnitudes, saved modules, ...); a module with only one of
/// `lora_A` / `lora_B`; a tensor that is not 2-D, or of another dtype; ranks of `lora_A` and `lora_B`
/// that disagree; a rank that is not the config's `r` / `rank_pattern` for that module (PEFT would fail
/// to load it too); a module that `target_modules` does not name (PEFT would ignore its weights);
/// `rank_pattern`/`alpha_pattern` entries that match a module ambiguously; an adapter without weights.
/// [`Error::Io`] when a file cannot be read (`adapter_model.bin`, a pickle, is not read).
///
/// [`Error::Weights`]: crate::Error::Weights
/// [`Error::Io`]: crate::Error::Io
pub fn load_peft_adapter(dir: &Path, device: &Device) -> Result<PeftAdapter> {
    let config_path = dir.join(ADAPTER_CONFIG_FILE);
    let config_source = config_path.display().to_string();
    let text = std::fs::read_to_string(&config_path).map_err(|e| io_err(&config_path, e))?;
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| weights_err(&config_source, "(json)", format!("not valid JSON: {e}")))?;
    let (mut config, targets_given) = PeftConfig::from_value(&value, &config_source)?;

    let weights_path = dir.join(ADAPTER_WEIGHTS_FILE);
    if !weights_path.exists() && dir.join("adapter_model.bin").exists() {
        return Err(io_err(
            &weights_path,
            "not found; the adapter has only adapter_model.bin (a pickle), which molora does not \
             read: re-save it with save_pretrained(..., safe_serialization=True)",
        ));
    }
    let bytes = read_file(&weights_path)?;
    let source = weights_path.display().to_string();
    let st = deserialize(&bytes, &source)?;

    // Group the keys by module: (lora_A, lora_B).
    let mut found: BTreeMap<String, (Option<String>, Option<String>)> = BTreeMap::new();
    for name in st.names() {
        let module_key = name.strip_prefix(PEFT_KEY_PREFIX).ok_or_else(|| {
            weights_err(
                &source,
                name,
                format!(
                    "unexpected key: expected keys of the form \
                     {PEFT_KEY_PREFIX}<module>{PEFT_A_SUFFIX} or {PEFT_KEY_PREFIX}<module>{PEFT_B_SUFFIX}"
                ),
            )
        })?;
        let (module, is_a) = match split_lora_key(module_key) {
            Ok(split) => split,
            Err(what) => return Err(weights_err(
                &source,
                name,
                format!(
                    "{what}: expected only <module>{PEFT_A_SUFFIX} and <module>{PEFT_B_SUFFIX} weights"
                ),
            )),
        };
        if module.is_empty() {
            return Err(weights_err(&source, name, "empty module name"));
        }
        let entry = found.entry(module.to_string()).or_default();
        if is_a {
            entry.0 = Some(name.to_string());
        } else {
            entry.1 = Some(name.to_string());
        }
    }
    if found.is_empty() {
        return Err(weights_err(
            &source,
            "(tensors)",
            format!("no LoRA weights: expected keys like {PEFT_KEY_PREFIX}<module>{PEFT_A_SUFFIX}"),
        ));
    }

    let mut modules = BTreeMap::new();
    for (module, (a_key, b_key)) in &found {
        let full = |suffix: &str| format!("{PEFT_KEY_PREFIX}{module}{suffix}");
        let (a_key, b_key) = match (a_key, b_key) {
            (Some(a), Some(b)) => (a, b),
            (Some(a), None) => {
                return Err(weights_err(
                    &source,
                    full(PEFT_B_SUFFIX),
                    format!("missing: {a} is present but its lora_B is not"),
                ))
            }
            (None, Some(b)) => {
                return Err(weights_err(
                    &source,
                    full(PEFT_A_SUFFIX),
                    format!("missing: {b} is present but its lora_A is not"),
                ))
            }
            (None, None) => continue,
        };
        let load = |key: &str, what: &str| -> Result<Tensor> {
            let view = st
                .tensor(key)
                .map_err(|e| weights_err(&source, key, e.to_string()))?;
            if !matches!(view.dtype(), StDtype::F32 | StDtype::F16 | StDtype::BF16) {
                return Err(weights_err(
                    &source,
                    key,
                    format!(
                        "dtype {:?} is not supported: expected F32, F16 or BF16",
                        view.dtype()
                    ),
                ));
            }
            if view.shape().len() != 2 {
                return Err(weights_err(
                    &source,
                    key,
                    format!(
                        "expected a 2-D {what}, got shape {:?} (LoRA on convolutions is not supported)",
                        view.shape()
                    ),
                ));
            }
            Ok(view_to_tensor(&view, device, &source, key)?.to_dtype(DType::F32)?)
        };
        let a = load(a_key, "lora_A [r, d_in]")?;
        let b = load(b_key, "lora_B [d_out, r]")?;
        let (r, d_out) = (a.dims()[0], b.dims()[0]);
        if b.dims()[1] != r {
            return Err(weights_err(
                &source,
                b_key.as_str(),
                format!(
                    "shape {:?} does not fit lora_A {:?}: ranks disagree, expected [{d_out}, {r}]",
                    b.dims(),
                    a.dims()
                ),
            ));
        }
        let expected_r = config.rank_for(module);
        if r != expected_r {
            return Err(weights_err(
                &source,
                a_key.as_str(),
                format!(
                    "rank {r} (shape {:?}) does not match {ADAPTER_CONFIG_FILE}, which gives r = {expected_r} \
                     for this module (r / rank_pattern)",
                    a.dims()
                ),
            ));
        }
        if targets_given == TargetsGiven::List && !config.targets(module) {
            return Err(weights_err(
                &source,
                a_key.as_str(),
                format!(
                    "module {module} is not named by target_modules {:?}, so PEFT would not load its weights",
                    config.target_modules
                ),
            ));
        }
        // (An ambiguous `rank_pattern` needs no check: the rank PEFT picked is the tensors' rank,
        // which was just compared with ours.)
        if let Some(keys) = pattern_conflict(&config.alpha_pattern, module) {
            return Err(weights_err(
                &config_source,
                "alpha_pattern",
                format!(
                    "several keys with different values match module {module} ({keys}), and which \
                     one PEFT applies depends on their order; use the module's full name as the key"
                ),
            ));
        }
        let pair = LoraPair {
            a,
            b,
            scale: config.scale_for(module),
        };
        pair.check(&source, a_key)?;
        modules.insert(module.clone(), pair);
    }

    if targets_given == TargetsGiven::Derived {
        let names: BTreeSet<&str> = modules
            .keys()
            .map(|m| m.rsplit('.').next().unwrap_or(m))
            .collect();
        config.target_modules = names.into_iter().map(str::to_string).collect();
    }

    Ok(PeftAdapter {
        config,
        modules,
        source: dir.to_path_buf(),
    })
}

/// Writes a PEFT-layout LoRA adapter into `dir` (created if missing): `adapter_config.json`
/// ([`PeftConfig::to_json`]) and `adapter_model.safetensors` (keys
/// `base_model.model.<module>.lora_A.weight` `[r, d_in]` and `.lora_B.weight` `[d_out, r]`, f32,
/// metadata `format: pt`), which PEFT's `PeftModel.from_pretrained` accepts.
///
/// PEFT recomputes each module's scale from the config, so every pair's `scale` must equal
/// `config.scale_for(module)` (to a relative 1e-6) and its rank `config.rank_for(module)`; and every
/// module must be named by `config.target_modules`. Otherwise an [`Error::Weights`] names the module:
/// the file would load into different numbers.
///
/// [`Error::Weights`]: crate::Error::Weights
pub fn save_peft_adapter(
    dir: &Path,
    config: &PeftConfig,
    modules: &BTreeMap<String, LoraPair>,
) -> Result<()> {
    let source = dir.display().to_string();
    config.validate(&source)?;
    if modules.is_empty() {
        return Err(weights_err(&source, "(modules)", "no modules to save"));
    }
    let mut tensors = BTreeMap::new();
    for (module, pair) in modules {
        pair.check(&source, module)?;
        if module.is_empty() || module.starts_with(PEFT_KEY_PREFIX) {
            return Err(weights_err(
                &source,
                module,
                format!("expected a module name without the {PEFT_KEY_PREFIX:?} prefix"),
            ));
        }
        if !config.targets(module) {
            return Err(weights_err(
                &source,
                module,
                format!(
                    "not named by target_modules {:?}: PEFT would not load this module's weights",
                    config.target_modules
                ),
            ));
        }
        if let Some(keys) = pattern_conflict(&config.alpha_pattern, module) {
            return Err(weights_err(
                &source,
                module,
                format!(
                    "several alpha_pattern keys with different values match this module ({keys}), and \
                     which one PEFT applies depends on their order; use the module's full name as the key"
                ),
            ));
        }
        let (r, want_r) = (pair.rank(), config.rank_for(module));
        if r != want_r {
            return Err(weights_err(
                &source,
                module,
                format!("rank {r} does not match the config's r = {want_r} for this module (r / rank_pattern)"),
            ));
        }
        let want_scale = config.scale_for(module);
        if (pair.scale - want_scale).abs() > 1e-6 * want_scale.abs().max(f32::MIN_POSITIVE) {
            return Err(weights_err(
                &source,
                module,
                format!(
                    "scale {} differs from the config's {} for this module (alpha / r{}); PEFT would apply \
                     the config's: set lora_alpha / alpha_pattern, or fold the scale into B",
                    pair.scale,
                    want_scale,
                    if config.use_rslora { ", rsLoRA: alpha / √r" } else { "" }
                ),
            ));
        }
        tensors.insert(
            format!("{PEFT_KEY_PREFIX}{module}{PEFT_A_SUFFIX}"),
            pair.a.to_dtype(DType::F32)?,
        );
        tensors.insert(
            format!("{PEFT_KEY_PREFIX}{module}{PEFT_B_SUFFIX}"),
            pair.b.to_dtype(DType::F32)?,
        );
    }
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    save_tensors(&dir.join(ADAPTER_WEIGHTS_FILE), &tensors, &metadata)?;
    let config_path = dir.join(ADAPTER_CONFIG_FILE);
    std::fs::write(&config_path, config.to_json()).map_err(|e| io_err(&config_path, e))
}
