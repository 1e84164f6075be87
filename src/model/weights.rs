//! Weights on disk: safetensors files of experts and routers, PEFT LoRA adapters.
//!
//! Three things live here:
//!
//! - **PEFT adapters.** [`load_peft_adapter`] reads what PEFT's `save_pretrained` writes for a LoRA
//!   (`adapter_config.json` and `adapter_model.safetensors`) into one [`LoraPair`] per adapted module;
//!   [`save_peft_adapter`] writes the same layout back, so that PEFT's `PeftModel.from_pretrained` takes
//!   it. Options that change what the weights mean (DoRA, LoRA biases, trained base biases, modules saved
//!   whole, ...) are rejected with an error naming the option: an adapter is either imported exactly or
//!   not at all.
//! - **Experts.** [`stack_experts`] stacks one LoRA per expert into the `A [E, r, d_in]`,
//!   `B [E, d_out, r]` layout of the MoLE operations, padding smaller ranks with zeros and folding each
//!   expert's own scale into its `B`.
//! - **Our own files.** [`save_tensors`] / [`load_tensors`] write and read safetensors with string
//!   metadata (the routing config as JSON under the key `"molora"`), and [`inspect`] describes any
//!   safetensors file for `molora inspect`.
//!
//! Layouts are PyTorch's: a PEFT `lora_A` is stored `[r, d_in]`, a `lora_B` `[d_out, r]`, and the update
//! of a module is `ΔW = scale · B · A` (`[d_out, d_in]`), `y = x·W0ᵀ + scale · (x·Aᵀ)·Bᵀ`.
//!
//! Every error is an [`Error::Io`] (the file could not be read or written) or an [`Error::Weights`]
//! naming the file, the key or config field, and what was expected.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorView, View};
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// `inspect` lives in [`crate::model::inspect`]; it stays reachable here, where it used to be.
pub use super::inspect::inspect;

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
/// The metadata key under which our own files keep their configuration (JSON).
pub const MOLORA_METADATA_KEY: &str = "molora";

/// PEFT's default rank when `adapter_config.json` has no `r` (as `LoraConfig` does).
const PEFT_DEFAULT_R: usize = 8;
/// PEFT's default `lora_alpha` when `adapter_config.json` has none (as `LoraConfig` does).
const PEFT_DEFAULT_ALPHA: f32 = 8.0;

fn weights_err(
    source: impl Into<String>,
    key: impl Into<String>,
    detail: impl Into<String>,
) -> Error {
    Error::Weights {
        source_name: source.into(),
        key: key.into(),
        detail: detail.into(),
    }
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

// ------------------------------------------------------------------------------------------------
// PeftConfig
// ------------------------------------------------------------------------------------------------

/// The part of a PEFT `LoraConfig` (`adapter_config.json`) that decides what a LoRA adapter's weights
/// mean.
///
/// Fields PEFT writes that do not change the numbers (`task_type`, `inference_mode`, `revision`, ...)
/// are ignored on reading. Fields that would change them and that molora does not implement are
/// rejected by [`PeftConfig::from_json`] with an error naming the field.
#[derive(Debug, Clone, PartialEq)]
pub struct PeftConfig {
    /// The default rank `r` of every adapted module (`rank_pattern` overrides it per module).
    pub r: usize,
    /// The default `lora_alpha`; the scale of a module is `alpha / r` (or `alpha / √r`, see
    /// [`use_rslora`](Self::use_rslora)). `alpha_pattern` overrides it per module.
    pub lora_alpha: f32,
    /// The module names (or name suffixes, PEFT's matching: a module `m` is targeted by `t` when
    /// `m == t` or `m` ends with `"." + t`) that carry a LoRA, e.g. `["q_proj", "v_proj"]`.
    ///
    /// PEFT also allows one string (a regular expression, or `"all-linear"`) or `null` (the model
    /// type's defaults). [`PeftConfig::from_json`] keeps such a string as a one-element list and `null`
    /// as an empty list; [`load_peft_adapter`] then replaces either by the last name components of the
    /// modules found in the weights, which is what the adapter actually targets.
    pub target_modules: Vec<String>,
    /// Dropout on the LoRA input during training (no effect on inference).
    pub lora_dropout: f32,
    /// Rank-stabilised LoRA: the scale is `alpha / √r` instead of `alpha / r`.
    pub use_rslora: bool,
    /// The base layer stores its weight `[d_in, d_out]` (GPT-2's `Conv1D`). PEFT stores `lora_A` and
    /// `lora_B` in the same `[r, d_in]` / `[d_out, r]` layout either way (only its merged `ΔW` is
    /// transposed), so the imported [`LoraPair`]s are unaffected; a caller that loads the *base* weights
    /// of such a model must transpose them to `[d_out, d_in]`.
    pub fan_in_fan_out: bool,
    /// Per-module ranks. A key matches a module as in [`target_modules`](Self::target_modules) (the
    /// module's name or a name suffix), or, written `^name` (PEFT's documented anchored form), only the
    /// module of exactly that name. The key naming the module in full wins, else the longest matching
    /// suffix. Other regular expressions are rejected when reading.
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module `lora_alpha`, matched like [`rank_pattern`](Self::rank_pattern).
    pub alpha_pattern: BTreeMap<String, f32>,
}

/// Characters that make a PEFT pattern key a regular expression rather than a plain module name.
/// (`.` is allowed: it separates name components and a literal `.` matches it; a leading `^` and a
/// trailing `$` are anchors, see [`pattern_core`].)
const REGEX_METACHARACTERS: &[char] = &[
    '\\', '^', '$', '*', '+', '?', '{', '}', '[', ']', '(', ')', '|',
];

/// The initialisations that only set starting values of `A` and `B` (so a saved adapter applies to the
/// unmodified base). Other string values (PiSSA, OLoRA, CorDA, LoftQ, ...) also change the base weights.
const PLAIN_INITS: &[&str] = &["gaussian", "eva", "orthogonal"];

/// Whether module `module` is targeted by `target`, by PEFT's rule (`module == target` or `module` ends
/// with `"." + target`).
fn name_matches(module: &str, target: &str) -> bool {
    module == target
        || (module.len() > target.len()
            && module.ends_with(target)
            && module.as_bytes()[module.len() - target.len() - 1] == b'.')
}

/// A pattern key without its anchors, and whether it was anchored at the start. PEFT matches a key `k`
/// with the regular expression `(.*\.)?(k)$`, so `^name` matches only the module `name` itself and a
/// trailing `$` changes nothing. `None` for an empty key or one with any other regular-expression syntax.
fn pattern_core(key: &str) -> Option<(&str, bool)> {
    let (core, anchored) = match key.strip_prefix('^') {
        Some(rest) => (rest, true),
        None => (key, false),
    };
    let core = core.strip_suffix('$').unwrap_or(core);
    (!core.is_empty() && !core.contains(REGEX_METACHARACTERS)).then_some((core, anchored))
}

/// How well pattern `key` matches `module`: `None` when it does not; otherwise (names the module in
/// full, length of the name part), so that larger is more specific.
fn pattern_match(module: &str, key: &str) -> Option<(bool, usize)> {
    let (core, anchored) = pattern_core(key)?;
    let hit = if anchored {
        module == core
    } else {
        name_matches(module, core)
    };
    hit.then_some((module == core, core.len()))
}

/// The pattern entry for `module`: the most specific matching key (the full name, else the longest
/// matching suffix).
fn pattern_lookup<'a, V>(
    patterns: &'a BTreeMap<String, V>,
    module: &str,
) -> Option<(&'a str, &'a V)> {
    patterns
        .iter()
        .filter_map(|(k, v)| pattern_match(module, k).map(|m| (m, k, v)))
        .max_by_key(|(m, _, _)| *m)
        .map(|(_, k, v)| (k.as_str(), v))
}

/// When no key names `module` in full but several suffix keys with different values match it (or
/// several full-name keys disagree), the value PEFT picks depends on the keys' order in the JSON file
/// (lost here), so the choice is ambiguous. Returns the conflicting keys and values, if any.
fn pattern_conflict<V: PartialEq + std::fmt::Display>(
    patterns: &BTreeMap<String, V>,
    module: &str,
) -> Option<String> {
    let matching: Vec<(bool, &String, &V)> = patterns
        .iter()
        .filter_map(|(k, v)| pattern_match(module, k).map(|(full, _)| (full, k, v)))
        .collect();
    let any_full = matching.iter().any(|(full, _, _)| *full);
    let candidates: Vec<(&String, &V)> = matching
        .into_iter()
        .filter(|(full, _, _)| *full || !any_full)
        .map(|(_, k, v)| (k, v))
        .collect();
    let first = candidates.first()?.1;
    if candidates.iter().all(|(_, v)| *v == first) {
        return None;
    }
    Some(
        candidates
            .iter()
            .map(|(k, v)| format!("{k:?}: {v}"))
            .collect::<Vec<_>>()
            .join(", "),
    )
}

/// A JSON number for an f32: an integer when the value is integral (as PEFT writes `lora_alpha`),
/// otherwise the shortest decimal that reads back as the same f32 (`0.05`, not `0.05000000074505806`).
fn f32_json(v: f32) -> Value {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 16_777_216.0 {
        Value::from(v as i64)
    } else {
        format!("{v}")
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map_or(Value::Null, Value::Number)
    }
}

/// Whether a JSON value turns an option on: `null`, `false`, `0`, `""`, `[]` and `{}` do not.
fn is_set(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// Typed access to the fields of a JSON object, with errors that name the source and the field.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    source: &'a str,
}

impl Fields<'_> {
    /// The field's value; `null` counts as absent.
    fn get(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn err(&self, key: &str, detail: impl Into<String>) -> Error {
        weights_err(self.source, key, detail)
    }

    fn positive_int(&self, key: &str, v: &Value) -> Result<usize> {
        v.as_u64()
            .filter(|&n| n >= 1)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| self.err(key, format!("expected a positive integer, got {v}")))
    }

    fn finite(&self, key: &str, v: &Value) -> Result<f32> {
        v.as_f64()
            .map(|x| x as f32)
            .filter(|x| x.is_finite())
            .ok_or_else(|| self.err(key, format!("expected a finite number, got {v}")))
    }

    fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        self.get(key)
            .map_or(Ok(default), |v| self.positive_int(key, v))
    }

    fn f32_or(&self, key: &str, default: f32) -> Result<f32> {
        self.get(key).map_or(Ok(default), |v| self.finite(key, v))
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.err(key, format!("expected true or false, got {v}"))),
        }
    }

    fn pattern<V>(
        &self,
        key: &str,
        parse: impl Fn(&str, &Value) -> Result<V>,
    ) -> Result<BTreeMap<String, V>> {
        let Some(v) = self.get(key) else {
            return Ok(BTreeMap::new());
        };
        let Value::Object(map) = v else {
            return Err(self.err(
                key,
                format!("expected an object of module name -> value, got {v}"),
            ));
        };
        let mut out = BTreeMap::new();
        for (name, value) in map {
            if pattern_core(name).is_none() {
                return Err(self.err(
                    &format!("{key}.{name}"),
                    "pattern keys must be plain module names or name suffixes \
                     (e.g. \"q_proj\" or \"model.layers.0.self_attn.q_proj\"), optionally \
                     anchored as \"^model.layers.0.self_attn.q_proj\"; other regular expressions \
                     are not supported",
                ));
            }
            out.insert(name.clone(), parse(&format!("{key}.{name}"), value)?);
        }
        Ok(out)
    }
}

/// How `target_modules` was given in `adapter_config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TargetsGiven {
    /// A list of names: kept, and checked against the weights.
    List,
    /// A regular expression, `"all-linear"` or `null`: replaced by the modules found in the weights.
    Derived,
}

impl PeftConfig {
    /// A plain LoRA config: rank `r`, `lora_alpha`, the target modules; no dropout, no rsLoRA, no
    /// patterns.
    pub fn new(r: usize, lora_alpha: f32, target_modules: &[&str]) -> Self {
        PeftConfig {
            r,
            lora_alpha,
            target_modules: target_modules.iter().map(|s| s.to_string()).collect(),
            lora_dropout: 0.0,
            use_rslora: false,
            fan_in_fan_out: false,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
        }
    }

    /// Parses the text of an `adapter_config.json`. `source_name` (usually the file's path) names the
    /// source in errors.
    ///
    /// Missing fields take PEFT's defaults (`r` = 8, `lora_alpha` = 8, no dropout, ...). Errors, each
    /// naming the field: text that is not a JSON object; `peft_type` other than `"LORA"`; a field of the
    /// wrong type or out of range (`r` and `rank_pattern` values must be positive integers, `lora_alpha`
    /// finite, `lora_dropout` in `[0, 1]`); a regular expression as a `rank_pattern`/`alpha_pattern`
    /// key (other than PEFT's anchored `^name`); and every option that changes what the weights mean
    /// but is not implemented: `use_dora`, `lora_bias`, `bias` other than `"none"`, `modules_to_save`,
    /// `layer_replication`, `trainable_token_indices`, `target_parameters`, `alora_invocation_tokens`,
    /// `use_qalora`, `use_bdlora`, `arrow_config`, `kasa_config`, `monteclora_config`, `velora_config`,
    /// and an `init_lora_weights` (PiSSA, OLoRA, CorDA, LoftQ, ...) that also rewrites the base weights.
    pub fn from_json(text: &str, source_name: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| weights_err(source_name, "(json)", format!("not valid JSON: {e}")))?;
        Self::from_value(&value, source_name).map(|(config, _)| config)
    }

    fn from_value(value: &Value, source: &str) -> Result<(Self, TargetsGiven)> {
        let Value::Object(obj) = value else {
            return Err(weights_err(
                source,
                "(root)",
                "expected a JSON object (a PEFT LoraConfig)",
            ));
        };
        let f = Fields { obj, source };

        if let Some(t) = f.get("peft_type") {
            if t.as_str() != Some("LORA") {
                return Err(f.err(
                    "peft_type",
                    format!("peft_type = {t} is not supported: expected \"LORA\", only LoRA adapters can be imported"),
                ));
            }
        }
        check_unsupported(&f)?;

        let r = f.usize_or("r", PEFT_DEFAULT_R)?;
        let lora_alpha = f.f32_or("lora_alpha", PEFT_DEFAULT_ALPHA)?;
        let lora_dropout = f.f32_or("lora_dropout", 0.0)?;
        if !(0.0..=1.0).contains(&lora_dropout) {
            return Err(f.err(
                "lora_dropout",
                format!("expected a probability in [0, 1], got {lora_dropout}"),
            ));
        }
        let (target_modules, given) = match f.get("target_modules") {
            None => (Vec::new(), TargetsGiven::Derived),
            Some(Value::String(s)) => (vec![s.clone()], TargetsGiven::Derived),
            Some(Value::Array(items)) => {
                let mut names = Vec::with_capacity(items.len());
                for item in items {
                    match item.as_str() {
                        Some(s) if !s.is_empty() => names.push(s.to_string()),
                        _ => {
                            return Err(f.err(
                                "target_modules",
                                format!("expected a list of module names, got an entry {item}"),
                            ))
                        }
                    }
                }
                (names, TargetsGiven::List)
            }
            Some(v) => {
                return Err(f.err(
                    "target_modules",
                    format!("expected a list of module names, a string or null, got {v}"),
                ))
            }
        };
        let rank_pattern = f.pattern("rank_pattern", |k, v| f.positive_int(k, v))?;
        let alpha_pattern = f.pattern("alpha_pattern", |k, v| f.finite(k, v))?;
        let config = PeftConfig {
            r,
            lora_alpha,
            target_modules,
            lora_dropout,
            use_rslora: f.bool_or("use_rslora", false)?,
            fan_in_fan_out: f.bool_or("fan_in_fan_out", false)?,
            rank_pattern,
            alpha_pattern,
        };
        Ok((config, given))
    }

    /// Checks the fields a hand-built config could get wrong: `r` ≥ 1, finite `lora_alpha`, dropout in
    /// `[0, 1]`, positive pattern ranks, finite pattern alphas, plain pattern keys.
    pub fn validate(&self, source_name: &str) -> Result<()> {
        let err = |key: &str, detail: String| weights_err(source_name, key, detail);
        if self.r == 0 {
            return Err(err("r", "expected a positive integer, got 0".into()));
        }
        if !self.lora_alpha.is_finite() {
            return Err(err(
                "lora_alpha",
                format!("expected a finite number, got {}", self.lora_alpha),
            ));
        }
        if !(0.0..=1.0).contains(&self.lora_dropout) {
            return Err(err(
                "lora_dropout",
                format!(
                    "expected a probability in [0, 1], got {}",
                    self.lora_dropout
                ),
            ));
        }
        for (k, &r) in &self.rank_pattern {
            if r == 0 || pattern_core(k).is_none() {
                return Err(err(
                    &format!("rank_pattern.{k}"),
                    format!("expected a plain module name and a positive rank, got {k:?}: {r}"),
                ));
            }
        }
        for (k, &a) in &self.alpha_pattern {
            if !a.is_finite() || pattern_core(k).is_none() {
                return Err(err(
                    &format!("alpha_pattern.{k}"),
                    format!("expected a plain module name and a finite alpha, got {k:?}: {a}"),
                ));
            }
        }
        Ok(())
    }

    /// The text of an `adapter_config.json` for this config, as PEFT writes it (`peft_type` `"LORA"`,
    /// `bias` `"none"`, no DoRA, no modules saved whole, inference mode), with only fields that every
    /// PEFT version since DoRA (0.9) knows, so `PeftModel.from_pretrained` reads it.
    pub fn to_json(&self) -> String {
        let pattern = |m: &BTreeMap<String, Value>| Value::Object(m.clone().into_iter().collect());
        let ranks: BTreeMap<String, Value> = self
            .rank_pattern
            .iter()
            .map(|(k, &r)| (k.clone(), Value::from(r)))
            .collect();
        let alphas: BTreeMap<String, Value> = self
            .alpha_pattern
            .iter()
            .map(|(k, &a)| (k.clone(), f32_json(a)))
            .collect();
        let mut m = Map::new();
        m.insert("alpha_pattern".into(), pattern(&alphas));
        m.insert("base_model_name_or_path".into(), Value::Null);
        m.insert("bias".into(), "none".into());
        m.insert("fan_in_fan_out".into(), self.fan_in_fan_out.into());
        m.insert("inference_mode".into(), true.into());
        m.insert("init_lora_weights".into(), true.into());
        m.insert("layers_pattern".into(), Value::Null);
        m.insert("layers_to_transform".into(), Value::Null);
        m.insert("lora_alpha".into(), f32_json(self.lora_alpha));
        m.insert("lora_dropout".into(), f32_json(self.lora_dropout));
        m.insert("modules_to_save".into(), Value::Null);
        m.insert("peft_type".into(), "LORA".into());
        m.insert("r".into(), self.r.into());
        m.insert("rank_pattern".into(), pattern(&ranks));
        m.insert("revision".into(), Value::Null);
        m.insert(
            "target_modules".into(),
            Value::Array(
                self.target_modules
                    .iter()
                    .map(|s| Value::from(s.as_str()))
                    .collect(),
            ),
        );
        m.insert("task_type".into(), Value::Null);
        m.insert("use_dora".into(), false.into());
        m.insert("use_rslora".into(), self.use_rslora.into());
        let value = Value::Object(m);
        // A `Value` built from strings, numbers and booleans always serialises.
        serde_json::to_string_pretty(&value).unwrap_or_else(|_| value.to_string())
    }

    /// The rank of `module`: its `rank_pattern` entry (exact name, else the longest matching suffix),
    /// else `r`.
    pub fn rank_for(&self, module: &str) -> usize {
        pattern_lookup(&self.rank_pattern, module).map_or(self.r, |(_, &r)| r)
    }

    /// The `lora_alpha` of `module`: its `alpha_pattern` entry, else `lora_alpha`.
    pub fn alpha_for(&self, module: &str) -> f32 {
        pattern_lookup(&self.alpha_pattern, module).map_or(self.lora_alpha, |(_, &a)| a)
    }

    /// The scale PEFT applies to `module`'s `B·A`: `alpha / r`, or `alpha / √r` with
    /// [`use_rslora`](Self::use_rslora), with `alpha` and `r` from the patterns where they match.
    pub fn scale_for(&self, module: &str) -> f32 {
        let r = self.rank_for(module) as f32;
        let alpha = self.alpha_for(module);
        if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }

    /// Whether `module` is targeted by [`target_modules`](Self::target_modules) (PEFT's suffix rule).
    pub fn targets(&self, module: &str) -> bool {
        self.target_modules.iter().any(|t| name_matches(module, t))
    }
}

/// Rejects the `adapter_config.json` options that change what the weights mean and that molora does not
/// implement, naming the option.
fn check_unsupported(f: &Fields<'_>) -> Result<()> {
    let reject = |key: &str, why: &str| -> Result<()> {
        match f.get(key) {
            Some(v) if is_set(v) => Err(f.err(
                key,
                format!(
                    "{key} = {v} is not supported: {why}; molora imports plain LoRA adapters only"
                ),
            )),
            _ => Ok(()),
        }
    };
    reject(
        "use_dora",
        "DoRA rescales the base weight by a learned magnitude vector",
    )?;
    reject("lora_bias", "the adapter trains a bias on lora_B")?;
    reject(
        "modules_to_save",
        "the adapter carries whole copies of these modules",
    )?;
    reject(
        "layer_replication",
        "the adapter duplicates layers of the base model",
    )?;
    reject(
        "trainable_token_indices",
        "the adapter trains rows of the token embeddings",
    )?;
    reject(
        "target_parameters",
        "the adapter puts LoRA on raw parameters, not on linear modules",
    )?;
    reject(
        "alora_invocation_tokens",
        "activated LoRA applies the adapter only after its invocation tokens",
    )?;
    reject("use_qalora", "QALoRA pools the LoRA input by groups")?;
    reject(
        "use_bdlora",
        "block-diagonal LoRA changes the layout of A and B",
    )?;
    for key in [
        "arrow_config",
        "kasa_config",
        "monteclora_config",
        "velora_config",
    ] {
        reject(key, "this LoRA variant changes the forward pass")?;
    }
    if let Some(v) = f.get("bias") {
        if v.as_str() != Some("none") {
            return Err(f.err(
                "bias",
                format!(
                    "bias = {v} is not supported: the adapter also trains the base model's biases; \
                     expected \"none\""
                ),
            ));
        }
    }
    match f.get("init_lora_weights") {
        None | Some(Value::Bool(_)) => {}
        Some(Value::String(s)) if PLAIN_INITS.contains(&s.as_str()) => {}
        Some(v) => {
            return Err(f.err(
                "init_lora_weights",
                format!(
                    "init_lora_weights = {v} is not supported: this initialisation also rewrites the \
                     base weights, so the saved A and B only apply to that modified base; convert the \
                     adapter to plain LoRA first (PEFT's `path_initial_model_for_weight_conversion`); \
                     accepted: true, false, {PLAIN_INITS:?}"
                ),
            ))
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// LoraPair and PEFT adapters
// ------------------------------------------------------------------------------------------------

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
    fn check(&self, source: &str, key: &str) -> Result<()> {
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

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| io_err(path, e))
}

fn deserialize<'a>(bytes: &'a [u8], source: &str) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes).map_err(|e| {
        weights_err(
            source,
            "(header)",
            format!("not a valid safetensors file: {e}"),
        )
    })
}

fn candle_dtype(dtype: StDtype) -> Option<DType> {
    Some(match dtype {
        StDtype::U8 => DType::U8,
        StDtype::U32 => DType::U32,
        StDtype::I16 => DType::I16,
        StDtype::I32 => DType::I32,
        StDtype::I64 => DType::I64,
        StDtype::BF16 => DType::BF16,
        StDtype::F16 => DType::F16,
        StDtype::F32 => DType::F32,
        StDtype::F64 => DType::F64,
        _ => return None,
    })
}

/// A candle tensor from a safetensors view, in its own dtype.
fn view_to_tensor(
    view: &TensorView<'_>,
    device: &Device,
    source: &str,
    key: &str,
) -> Result<Tensor> {
    let dtype = candle_dtype(view.dtype()).ok_or_else(|| {
        weights_err(
            source,
            key,
            format!(
                "dtype {:?} is not supported (expected one of F32, F16, BF16, F64, U8, U32, I16, I32, I64)",
                view.dtype()
            ),
        )
    })?;
    Ok(Tensor::from_raw_buffer(
        view.data(),
        dtype,
        view.shape(),
        device,
    )?)
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
        let (module, is_a) = if let Some(m) = module_key.strip_suffix(PEFT_A_SUFFIX) {
            (m, true)
        } else if let Some(m) = module_key.strip_suffix(PEFT_B_SUFFIX) {
            (m, false)
        } else {
            let what = if name.contains("lora_embedding_") {
                "LoRA on an embedding layer is not supported"
            } else if name.contains("lora_magnitude_vector") {
                "a DoRA magnitude vector is not supported"
            } else {
                "unexpected key"
            };
            return Err(weights_err(
                &source,
                name,
                format!(
                    "{what}: expected only <module>{PEFT_A_SUFFIX} and <module>{PEFT_B_SUFFIX} weights"
                ),
            ));
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

// ------------------------------------------------------------------------------------------------
// Experts
// ------------------------------------------------------------------------------------------------

/// Stacks one LoRA per expert into `A [E, r_max, d_in]` and `B [E, d_out, r_max]` (f32, on the first
/// pair's device), the layout of the MoLE operations.
///
/// Smaller ranks are zero-padded (exact: a padded row of `A` and the matching zero column of `B`
/// contribute nothing), and each expert's own scale is folded into its `B` as `scale_e / target_scale`,
/// so that `target_scale · B_e A_e` equals the adapter's `scale_e · B_e A_e` (up to one f32 rounding of
/// each element of `B`). With `target_scale` equal to every `scale_e`, `B` is copied unchanged.
///
/// Errors ([`Error::Weights`], source `stack_experts`): no pairs; `target_scale` zero or not finite; a
/// pair whose shapes are not `A [r, d_in]`, `B [d_out, r]`; experts whose `d_in` or `d_out` differ from
/// expert 0's.
pub fn stack_experts(pairs: &[&LoraPair], target_scale: f32) -> Result<(Tensor, Tensor)> {
    const SOURCE: &str = "stack_experts";
    let Some(first) = pairs.first() else {
        return Err(weights_err(
            SOURCE,
            "(pairs)",
            "expected at least one expert",
        ));
    };
    if !target_scale.is_finite() || target_scale == 0.0 {
        return Err(weights_err(
            SOURCE,
            "target_scale",
            format!("expected a finite, non-zero scale, got {target_scale}"),
        ));
    }
    for (e, pair) in pairs.iter().enumerate() {
        pair.check(SOURCE, &format!("expert {e}"))?;
        if (pair.d_in(), pair.d_out()) != (first.d_in(), first.d_out()) {
            return Err(weights_err(
                SOURCE,
                format!("expert {e}"),
                format!(
                    "d_in -> d_out is {} -> {}, expected {} -> {} as for expert 0 (A {:?}, B {:?})",
                    pair.d_in(),
                    pair.d_out(),
                    first.d_in(),
                    first.d_out(),
                    pair.a.dims(),
                    pair.b.dims()
                ),
            ));
        }
    }
    let r_max = pairs.iter().map(|p| p.rank()).max().unwrap_or(0);
    let (d_in, d_out) = (first.d_in(), first.d_out());
    let device = first.a.device();
    let mut a_all = Vec::with_capacity(pairs.len());
    let mut b_all = Vec::with_capacity(pairs.len());
    for pair in pairs {
        let r = pair.rank();
        let a = pair.a.to_device(device)?.to_dtype(DType::F32)?;
        let mut b = pair.b.to_device(device)?.to_dtype(DType::F32)?;
        let fold = pair.scale / target_scale;
        if fold != 1.0 {
            b = (b * f64::from(fold))?;
        }
        let (a, b) = if r < r_max {
            let a_pad = Tensor::zeros((r_max - r, d_in), DType::F32, device)?;
            let b_pad = Tensor::zeros((d_out, r_max - r), DType::F32, device)?;
            (
                Tensor::cat(&[&a, &a_pad], 0)?,
                Tensor::cat(&[&b, &b_pad], 1)?,
            )
        } else {
            (a, b)
        };
        a_all.push(a);
        b_all.push(b);
    }
    Ok((Tensor::stack(&a_all, 0)?, Tensor::stack(&b_all, 0)?))
}

// ------------------------------------------------------------------------------------------------
// Safetensors with metadata
// ------------------------------------------------------------------------------------------------

/// A tensor's bytes, ready for the safetensors writer (so no conversion can fail inside it).
struct Bytes {
    dtype: StDtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &Bytes {
    fn dtype(&self) -> StDtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn le_bytes<T: candle_core::WithDType, const N: usize>(
    t: &Tensor,
    to: fn(T) -> [u8; N],
) -> Result<Vec<u8>> {
    Ok(t.flatten_all()?
        .to_vec1::<T>()?
        .into_iter()
        .flat_map(to)
        .collect())
}

fn tensor_bytes(t: &Tensor, source: &str, key: &str) -> Result<Bytes> {
    let (dtype, data) = match t.dtype() {
        DType::U8 => (StDtype::U8, le_bytes::<u8, 1>(t, u8::to_le_bytes)?),
        DType::U32 => (StDtype::U32, le_bytes::<u32, 4>(t, u32::to_le_bytes)?),
        DType::I16 => (StDtype::I16, le_bytes::<i16, 2>(t, i16::to_le_bytes)?),
        DType::I32 => (StDtype::I32, le_bytes::<i32, 4>(t, i32::to_le_bytes)?),
        DType::I64 => (StDtype::I64, le_bytes::<i64, 8>(t, i64::to_le_bytes)?),
        DType::BF16 => (StDtype::BF16, le_bytes::<half::bf16, 2>(t, half::bf16::to_le_bytes)?),
        DType::F16 => (StDtype::F16, le_bytes::<half::f16, 2>(t, half::f16::to_le_bytes)?),
        DType::F32 => (StDtype::F32, le_bytes::<f32, 4>(t, f32::to_le_bytes)?),
        DType::F64 => (StDtype::F64, le_bytes::<f64, 8>(t, f64::to_le_bytes)?),
        other => {
            return Err(weights_err(
                source,
                key,
                format!(
                    "dtype {other:?} cannot be saved (expected one of f32, f16, bf16, f64, u8, u32, i16, i32, i64)"
                ),
            ))
        }
    };
    Ok(Bytes {
        dtype,
        shape: t.dims().to_vec(),
        data,
    })
}

/// Writes `tensors` (any of f32, f16, bf16, f64, u8, u32, i16, i32, i64; on any device) and the string
/// `metadata` to a safetensors file at `path`. Our expert and router files keep the routing config as
/// JSON under the metadata key [`MOLORA_METADATA_KEY`] (see [`inspect`]).
pub fn save_tensors(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let source = path.display().to_string();
    let mut bytes = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        bytes.push((name.as_str(), tensor_bytes(t, &source, name)?));
    }
    let info: HashMap<String, String> = metadata.clone().into_iter().collect();
    let info = (!info.is_empty()).then_some(info);
    let buffer = safetensors::tensor::serialize(bytes.iter().map(|(n, b)| (*n, b)), info)
        .map_err(|e| weights_err(&source, "(file)", format!("could not serialise: {e}")))?;
    std::fs::write(path, buffer).map_err(|e| io_err(path, e))
}

/// Reads every tensor of a safetensors file (in its stored dtype) onto `device`, with the file's string
/// metadata (empty when it has none).
pub fn load_tensors(
    path: &Path,
    device: &Device,
) -> Result<(BTreeMap<String, Tensor>, BTreeMap<String, String>)> {
    let bytes = read_file(path)?;
    let source = path.display().to_string();
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| {
        weights_err(
            &source,
            "(header)",
            format!("not a valid safetensors file: {e}"),
        )
    })?;
    let metadata: BTreeMap<String, String> = header
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let st = deserialize(&bytes, &source)?;
    let mut tensors = BTreeMap::new();
    for (name, view) in st.iter() {
        tensors.insert(
            name.to_string(),
            view_to_tensor(&view, device, &source, name)?,
        );
    }
    Ok((tensors, metadata))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_by_whole_components() {
        assert!(name_matches("model.layers.0.q_proj", "q_proj"));
        assert!(name_matches("q_proj", "q_proj"));
        assert!(name_matches("model.layers.0.q_proj", "layers.0.q_proj"));
        assert!(!name_matches("model.layers.0.xq_proj", "q_proj"));
        assert!(!name_matches("model.layers.0.q_proj.x", "q_proj"));
    }

    #[test]
    fn pattern_prefers_exact_then_longest_suffix() {
        let p = BTreeMap::from([
            ("q_proj".to_string(), 2usize),
            ("layers.1.q_proj".to_string(), 3),
            ("model.layers.1.q_proj".to_string(), 5),
        ]);
        assert_eq!(
            pattern_lookup(&p, "model.layers.0.q_proj").map(|x| *x.1),
            Some(2)
        );
        assert_eq!(
            pattern_lookup(&p, "x.layers.1.q_proj").map(|x| *x.1),
            Some(3)
        );
        assert_eq!(
            pattern_lookup(&p, "model.layers.1.q_proj").map(|x| *x.1),
            Some(5)
        );
        assert_eq!(pattern_lookup(&p, "model.layers.1.k_proj"), None);
        assert!(pattern_conflict(&p, "x.layers.1.q_proj").is_some());
        assert!(pattern_conflict(&p, "model.layers.1.q_proj").is_none());
        assert!(pattern_conflict(&p, "model.layers.0.q_proj").is_none());
    }

    #[test]
    fn anchored_pattern_keys_match_the_full_name_only() {
        let p = BTreeMap::from([
            ("^model.layers.0.q_proj".to_string(), 16usize),
            ("q_proj$".to_string(), 2),
        ]);
        assert_eq!(
            pattern_lookup(&p, "model.layers.0.q_proj").map(|x| *x.1),
            Some(16)
        );
        assert_eq!(
            pattern_lookup(&p, "x.model.layers.0.q_proj").map(|x| *x.1),
            Some(2)
        );
        assert!(pattern_conflict(&p, "model.layers.0.q_proj").is_none());
        let c = PeftConfig::from_json(r#"{"rank_pattern": {"^a.q": 2}}"#, "t").unwrap();
        assert_eq!((c.rank_for("a.q"), c.rank_for("b.a.q")), (2, 8));
        assert!(PeftConfig::from_json(r#"{"rank_pattern": {"a^b": 2}}"#, "t").is_err());
        assert!(PeftConfig::from_json(r#"{"alpha_pattern": {"": 2}}"#, "t").is_err());
    }

    #[test]
    fn f32_json_is_short() {
        assert_eq!(f32_json(8.0).to_string(), "8");
        assert_eq!(f32_json(0.05).to_string(), "0.05");
        assert_eq!(f32_json(0.05).as_f64().map(|x| x as f32), Some(0.05f32));
    }

    #[test]
    fn config_defaults_and_errors_name_the_field() {
        let c = PeftConfig::from_json("{}", "t").unwrap();
        assert_eq!((c.r, c.lora_alpha), (8, 8.0));
        let e = PeftConfig::from_json(r#"{"r": 0}"#, "t").unwrap_err();
        assert!(
            matches!(&e, Error::Weights { key, .. } if key == "r"),
            "{e}"
        );
        let e = PeftConfig::from_json(r#"{"rank_pattern": {"layers.*q": 2}}"#, "t").unwrap_err();
        assert!(e.to_string().contains("rank_pattern.layers.*q"), "{e}");
        let e = PeftConfig::from_json(r#"{"bias": "all"}"#, "t").unwrap_err();
        assert!(
            matches!(&e, Error::Weights { key, .. } if key == "bias"),
            "{e}"
        );
        let e = PeftConfig::from_json(r#"{"init_lora_weights": "pissa"}"#, "t").unwrap_err();
        assert!(
            matches!(&e, Error::Weights { key, .. } if key == "init_lora_weights"),
            "{e}"
        );
        let e = PeftConfig::from_json(r#"{"peft_type": "IA3"}"#, "t").unwrap_err();
        assert!(
            matches!(&e, Error::Weights { key, .. } if key == "peft_type"),
            "{e}"
        );
        assert!(PeftConfig::from_json(r#"{"loftq_config": {}, "use_dora": false}"#, "t").is_ok());
    }

    #[test]
    fn config_round_trips_through_json() {
        let mut c = PeftConfig::new(4, 8.0, &["q_proj", "v_proj"]);
        c.lora_dropout = 0.05;
        c.use_rslora = true;
        c.rank_pattern.insert("model.layers.0.q_proj".into(), 2);
        c.alpha_pattern.insert("v_proj".into(), 3.5);
        let back = PeftConfig::from_json(&c.to_json(), "t").unwrap();
        assert_eq!(back, c);
        assert_eq!(c.rank_for("model.layers.0.q_proj"), 2);
        assert_eq!(c.scale_for("model.layers.0.q_proj"), 8.0 / 2f32.sqrt());
        assert_eq!(c.scale_for("model.layers.3.v_proj"), 3.5 / 2.0);
    }
}
