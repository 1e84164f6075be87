//! PEFT's adapter configuration (feature `peft`, on with `candle`): [`PeftConfig`], the part of a PEFT `adapter_config.json` that decides what a LoRA adapter's
//! weights mean, read (with every option molora does not implement rejected by name), validated and
//! written back; PEFT's module-name matching of `target_modules`, `rank_pattern` and `alpha_pattern`.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// [`Error::weights`], as the weight readers (here and in `model::weights`) spell it.
pub(crate) fn weights_err(
    source: impl Into<String>,
    key: impl Into<String>,
    detail: impl Into<String>,
) -> Error {
    Error::weights(source, key, detail)
}

/// PEFT's default rank when `adapter_config.json` has no `r` (as `LoraConfig` does).
const PEFT_DEFAULT_R: usize = 8;
/// PEFT's default `lora_alpha` when `adapter_config.json` has none (as `LoraConfig` does).
const PEFT_DEFAULT_ALPHA: f32 = 8.0;

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
    ///
    /// [`load_peft_adapter`]: crate::model::weights::load_peft_adapter
    pub target_modules: Vec<String>,
    /// Dropout on the LoRA input during training (no effect on inference).
    pub lora_dropout: f32,
    /// Rank-stabilised LoRA: the scale is `alpha / √r` instead of `alpha / r`.
    pub use_rslora: bool,
    /// The base layer stores its weight `[d_in, d_out]` (GPT-2's `Conv1D`). PEFT stores `lora_A` and
    /// `lora_B` in the same `[r, d_in]` / `[d_out, r]` layout either way (only its merged `ΔW` is
    /// transposed), so the imported [`LoraPair`]s are unaffected; a caller that loads the *base* weights
    /// of such a model must transpose them to `[d_out, d_in]`.
    ///
    /// [`LoraPair`]: crate::model::weights::LoraPair
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
#[cfg_attr(not(feature = "candle"), allow(dead_code))]
pub(crate) fn pattern_conflict<V: PartialEq + std::fmt::Display>(
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
pub(crate) enum TargetsGiven {
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

    pub(crate) fn from_value(value: &Value, source: &str) -> Result<(Self, TargetsGiven)> {
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
