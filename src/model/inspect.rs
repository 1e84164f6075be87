//! What a safetensors file holds, for `molora inspect FILE`, read from its header alone.
//!
//! A safetensors file is 8 bytes of header length `N` (little-endian), `N` bytes of JSON (each
//! tensor's dtype, shape and data offsets, and string metadata under `__metadata__`), then the tensor
//! data. [`inspect`] reads the 8 bytes and the `N` (at most [`MAX_HEADER_BYTES`], and no more than the
//! file has), never the data, so the size of the file costs nothing and a file that never ends (a
//! FIFO, `/dev/zero`) is read no further than its header says.
//!
//! For a PEFT adapter it also says what [`load_peft_adapter`](super::weights::load_peft_adapter)
//! would reject, one `rejected:` line per problem. Every name and metadata string is shown with its
//! control characters escaped, so that a tensor name cannot rewrite the terminal.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Read;
use std::path::Path;

use safetensors::tensor::{Dtype as StDtype, Metadata};
use serde_json::{Map, Value};

use super::weights::{
    PeftConfig, ADAPTER_CONFIG_FILE, MOLORA_METADATA_KEY, PEFT_A_SUFFIX, PEFT_B_SUFFIX,
    PEFT_KEY_PREFIX,
};
use crate::error::{Error, Result};

/// The largest header [`inspect`] reads (the limit of the safetensors format itself).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

fn header_err(source: &str, detail: impl Into<String>) -> Error {
    Error::Weights {
        source_name: source.to_string(),
        key: "(header)".to_string(),
        detail: detail.into(),
    }
}

/// `s` with its control characters (and the bidirectional-text controls, which reorder what a
/// terminal shows) escaped as Rust writes them (`\u{1b}`, `\n`, `\u{202e}`); other text unchanged.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else if matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

/// The parts of a safetensors header that [`inspect`] reports.
struct Header {
    metadata: BTreeMap<String, String>,
    tensors: BTreeMap<String, Info>,
    /// `N`, the bytes of JSON.
    header_len: u64,
    /// Bytes of tensor data the header describes.
    data_len: u64,
    /// The file's length, when it is a regular file.
    file_len: Option<u64>,
}

/// Reads the header of the safetensors file at `path`: the 8-byte length, then that many bytes of
/// JSON, checked as the safetensors crate checks it (dtypes, shapes, contiguous offsets).
fn read_header(path: &Path, source: &str) -> Result<Header> {
    let io = |e: std::io::Error| Error::Io {
        path: source.to_string(),
        message: e.to_string(),
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let file_len = file
        .metadata()
        .map_err(io)?
        .is_file()
        .then(|| file.metadata().map(|m| m.len()))
        .transpose()
        .map_err(io)?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            header_err(
                source,
                "not a safetensors file: shorter than the 8 bytes of header length",
            )
        } else {
            io(e)
        }
    })?;
    let header_len = u64::from_le_bytes(len);
    if header_len > MAX_HEADER_BYTES {
        return Err(header_err(
            source,
            format!(
                "not a safetensors file: a header of {header_len} bytes is larger than the \
                 {MAX_HEADER_BYTES} bytes safetensors allows"
            ),
        ));
    }
    if let Some(file_len) = file_len {
        let rest = file_len.saturating_sub(8);
        if header_len > rest {
            return Err(header_err(
                source,
                format!(
                    "not a safetensors file: a header of {header_len} bytes is larger than the \
                     {rest} bytes after its length"
                ),
            ));
        }
    }
    let mut json = Vec::new();
    file.take(header_len).read_to_end(&mut json).map_err(io)?;
    if (json.len() as u64) < header_len {
        return Err(header_err(
            source,
            format!(
                "not a safetensors file: the header is {header_len} bytes but the file ends after {}",
                json.len()
            ),
        ));
    }
    let parsed: Metadata = serde_json::from_slice(&json).map_err(|e| {
        header_err(
            source,
            format!("not a valid safetensors file: {}", escape(&e.to_string())),
        )
    })?;
    let metadata = parsed
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let tensors = parsed
        .tensors()
        .into_iter()
        .map(|(name, info)| {
            (
                name,
                Info {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                },
            )
        })
        .collect();
    Ok(Header {
        metadata,
        tensors,
        header_len,
        data_len: parsed.data_len() as u64,
        file_len,
    })
}

/// Name, dtype and shape of one tensor in a file.
struct Info {
    dtype: StDtype,
    shape: Vec<usize>,
}

impl Info {
    fn describe(&self) -> String {
        format!("{:?} {:?}", self.dtype, self.shape)
    }
}

/// The tensors of a molora layer `L`, as suffixes after `L.`.
const LAYER_SUFFIXES: &[&str] = &[
    "lora_A",
    "lora_B",
    "router.weight",
    "router.bias",
    "threshold",
    "threshold.weight",
    "threshold.bias",
    "lambda",
];

/// A JSON value as a short string: strings without quotes, others compact; escaped.
fn json_short(v: &Value) -> String {
    match v {
        Value::String(s) => escape(s),
        other => escape(&other.to_string()),
    }
}

/// A human-readable report of a safetensors file, for `molora inspect FILE`.
///
/// - A **molora file** (metadata key `"molora"` holding JSON such as
///   `{"format":"molora","version":1,"layers":{"L":{"experts":4,"rank":8,"d_in":64,"d_out":64,"alpha":16,"routing":"threshold(learned)"}}}`,
///   or tensors `L.lora_A` of 3 dimensions): one line per MoLE layer `L` with its experts `E`, rank
///   `r`, `d_in -> d_out`, alpha and routing (from the JSON; `E`, `r`, `d_in`, `d_out` are inferred from
///   `L.lora_A [E, r, d_in]` and `L.lora_B [E, d_out, r]` where the JSON lacks them, and a disagreement
///   is shown), and which of `L.router.weight` / `L.router.bias` (router), `L.threshold` (learned
///   threshold θ) and `L.threshold.weight` / `L.threshold.bias` (input-dependent threshold) are present.
/// - A **PEFT adapter** (keys with `lora_A` / `lora_B`; `adapter_config.json` beside the file is read
///   when present): r, alpha and target modules, one line per module with its rank and shapes, and a
///   `warning:` line followed by one `rejected:` line per problem that
///   [`load_peft_adapter`](super::weights::load_peft_adapter) would refuse the adapter for (a
///   module without its partner, a tensor that is not 2-D or not f32/f16/bf16, ranks of `lora_A` and
///   `lora_B` that disagree, a rank other than the config's `r` / `rank_pattern`, a module
///   `target_modules` does not name, a key that is not a LoRA weight, a config it rejects).
/// - Otherwise every tensor's name, dtype and shape.
///
/// Tensors not covered by the above are listed by name, dtype and shape; other metadata is shown. The
/// report always ends with the totals: tensors, parameters, bytes of tensor data. Only the header is
/// read (see the module docs); a regular file whose length is not what the header describes gets a
/// `warning:` line. Names and metadata have their control characters escaped ([`escape`]).
///
/// Errors: [`Error::Io`] when the file cannot be opened or read, [`Error::Weights`] when its header is
/// not a safetensors header.
pub fn inspect(path: &Path) -> Result<String> {
    let source = path.display().to_string();
    let header = read_header(path, &source)?;
    let Header {
        metadata, tensors, ..
    } = &header;

    let mut out = String::new();
    let _ = writeln!(out, "{}", escape(&source));
    let is_molora = metadata.contains_key(MOLORA_METADATA_KEY)
        || tensors
            .iter()
            .any(|(n, i)| n.ends_with(".lora_A") && i.shape.len() == 3);
    let is_peft = !is_molora
        && tensors
            .keys()
            .any(|n| n.ends_with(PEFT_A_SUFFIX) || n.ends_with(PEFT_B_SUFFIX));
    let mut covered: BTreeSet<String> = BTreeSet::new();
    let mut problems = Vec::new();
    if is_molora {
        inspect_molora(&mut out, metadata, tensors, &mut covered);
    } else if is_peft {
        problems = inspect_peft(&mut out, path, tensors, &mut covered);
    } else {
        let _ = writeln!(out, "safetensors file, {} tensors:", tensors.len());
    }

    let rest: Vec<(&String, &Info)> = tensors
        .iter()
        .filter(|(n, _)| !covered.contains(*n))
        .collect();
    if !rest.is_empty() {
        if is_molora || is_peft {
            let _ = writeln!(out, "other tensors:");
        }
        for (name, info) in rest {
            let _ = writeln!(out, "  {}: {}", escape(name), info.describe());
        }
    }
    let other_meta: Vec<String> = metadata
        .iter()
        .filter(|(k, _)| k.as_str() != MOLORA_METADATA_KEY)
        .map(|(k, v)| format!("{} = {}", escape(k), escape(v)))
        .collect();
    if !other_meta.is_empty() {
        let _ = writeln!(out, "metadata: {}", other_meta.join(", "));
    }
    if !problems.is_empty() {
        let _ = writeln!(
            out,
            "warning: load_peft_adapter would reject this adapter ({} problem{}):",
            problems.len(),
            if problems.len() == 1 { "" } else { "s" }
        );
        for p in &problems {
            let _ = writeln!(out, "  rejected: {p}");
        }
    }
    if let Some(file_len) = header.file_len {
        let expected = 8 + header.header_len + header.data_len;
        if file_len != expected {
            let _ = writeln!(
                out,
                "warning: the header describes {expected} bytes (8 + {} of header + {} of data) but \
                 the file has {file_len}: the file is {}, and the loaders reject it",
                header.header_len,
                header.data_len,
                if file_len < expected {
                    "truncated"
                } else {
                    "followed by extra bytes"
                }
            );
        }
    }
    let params: u128 = tensors
        .values()
        .map(|i| i.shape.iter().map(|&d| d as u128).product::<u128>())
        .sum();
    let data_bytes: u128 = tensors
        .values()
        .map(|i| {
            i.shape.iter().map(|&d| d as u128).product::<u128>() * i.dtype.bitsize() as u128 / 8
        })
        .sum();
    let _ = writeln!(
        out,
        "totals: {} tensors, {params} parameters, {data_bytes} bytes",
        tensors.len()
    );
    // Every string was escaped where it was written; this keeps any other control character (none
    // is expected) off the terminal too.
    Ok(out.split('\n').map(escape).collect::<Vec<_>>().join("\n"))
}

fn inspect_molora(
    out: &mut String,
    metadata: &BTreeMap<String, String>,
    tensors: &BTreeMap<String, Info>,
    covered: &mut BTreeSet<String>,
) {
    let mut config = Map::new();
    match metadata
        .get(MOLORA_METADATA_KEY)
        .map(|s| serde_json::from_str::<Value>(s))
    {
        Some(Ok(Value::Object(m))) => config = m,
        Some(Ok(other)) => {
            let _ = writeln!(
                out,
                "note: metadata \"{MOLORA_METADATA_KEY}\" is not a JSON object ({}); layers inferred from the tensors",
                escape(&other.to_string())
            );
        }
        Some(Err(e)) => {
            let _ = writeln!(
                out,
                "note: metadata \"{MOLORA_METADATA_KEY}\" is not valid JSON ({}); layers inferred from the tensors",
                escape(&e.to_string())
            );
        }
        None => {}
    }
    let layers_json = match config.get("layers") {
        Some(Value::Object(m)) => m.clone(),
        _ => Map::new(),
    };
    let mut header = String::from("molora file");
    let fmt = config.get("format").map(json_short);
    let version = config.get("version").map(json_short);
    if fmt.is_some() || version.is_some() {
        let _ = write!(
            header,
            " (format {}, version {})",
            fmt.as_deref().unwrap_or("-"),
            version.as_deref().unwrap_or("-")
        );
    }
    let extra: Vec<String> = config
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "format" | "version" | "layers"))
        .map(|(k, v)| format!("{} = {}", escape(k), json_short(v)))
        .collect();

    let mut names: BTreeSet<String> = layers_json.keys().cloned().collect();
    for name in tensors.keys() {
        if let Some(layer) = name.strip_suffix(".lora_A") {
            names.insert(layer.to_string());
        }
    }
    let _ = writeln!(out, "{header}, {} MoLE layers", names.len());
    for e in extra {
        let _ = writeln!(out, "  {e}");
    }
    for layer in &names {
        let empty = Map::new();
        let json = match layers_json.get(layer) {
            Some(Value::Object(m)) => m,
            _ => &empty,
        };
        let get = |s: &str| tensors.get(&format!("{layer}.{s}"));
        for s in LAYER_SUFFIXES {
            let key = format!("{layer}.{s}");
            if tensors.contains_key(&key) {
                covered.insert(key);
            }
        }
        let a = get("lora_A").map(|i| i.shape.as_slice());
        let b = get("lora_B").map(|i| i.shape.as_slice());
        let from_a = |k: usize| a.filter(|s| s.len() == 3).map(|s| s[k]);
        let from_b = |k: usize| b.filter(|s| s.len() == 3).map(|s| s[k]);
        // One dimension: the JSON's value, else the tensors'; a disagreement is shown.
        let dim = |key: &str, from_tensor: Option<usize>| -> String {
            let from_json = json.get(key).and_then(Value::as_u64);
            match (from_json, from_tensor) {
                (Some(j), Some(t)) if j != t as u64 => format!("{j} (tensors: {t})"),
                (Some(j), _) => j.to_string(),
                (None, Some(t)) => t.to_string(),
                (None, None) => "?".to_string(),
            }
        };
        let experts = dim("experts", from_a(0));
        let rank = dim("rank", from_a(1));
        let d_in = dim("d_in", from_a(2));
        let d_out = dim("d_out", from_b(1));
        let alpha = json.get("alpha").map_or("-".to_string(), json_short);
        let routing = json.get("routing").map_or("-".to_string(), json_short);
        let router = match (get("router.weight"), get("router.bias")) {
            (Some(w), Some(b)) => format!("weight {:?} + bias {:?}", w.shape, b.shape),
            (Some(w), None) => format!("weight {:?}", w.shape),
            (None, Some(b)) => format!("bias {:?} only", b.shape),
            (None, None) => "none".to_string(),
        };
        let mut threshold = Vec::new();
        if let Some(t) = get("threshold") {
            threshold.push(format!("learned θ {:?}", t.shape));
        }
        match (get("threshold.weight"), get("threshold.bias")) {
            (Some(w), Some(b)) => threshold.push(format!(
                "input-dependent, weight {:?} + bias {:?}",
                w.shape, b.shape
            )),
            (Some(w), None) => threshold.push(format!("input-dependent, weight {:?}", w.shape)),
            (None, Some(b)) => threshold.push(format!("input-dependent, bias {:?} only", b.shape)),
            (None, None) => {}
        }
        let threshold = if threshold.is_empty() {
            "none".to_string()
        } else {
            threshold.join("; ")
        };
        let layer = escape(layer);
        let _ = writeln!(
            out,
            "  {layer}: E = {experts}, r = {rank}, {d_in} -> {d_out}, alpha = {alpha}, routing = {routing}; \
             router: {router}; threshold: {threshold}"
        );
        let mut missing = Vec::new();
        if a.is_none() {
            missing.push("lora_A");
        }
        if b.is_none() {
            missing.push("lora_B");
        }
        if !missing.is_empty() {
            let _ = writeln!(out, "    missing tensors: {}", missing.join(", "));
        }
        for (s, shape) in [("lora_A", a), ("lora_B", b)] {
            if let Some(shape) = shape.filter(|s| s.len() != 3) {
                let _ = writeln!(
                    out,
                    "    {layer}.{s} has shape {shape:?}, expected 3 dimensions"
                );
            }
        }
    }
}

/// `adapter_config.json` beside a PEFT adapter, as [`load_peft_adapter`](super::weights::load_peft_adapter)
/// reads it, and whether its `target_modules` is a list (which the loader then checks every module
/// against) rather than a pattern or `null`.
fn read_peft_config(path: &Path) -> Option<std::result::Result<(PeftConfig, bool), String>> {
    let config_path = path.with_file_name(ADAPTER_CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path).ok()?;
    let source = config_path.display().to_string();
    Some(
        PeftConfig::from_json(&text, &source)
            .map(|c| {
                let listed = serde_json::from_str::<Value>(&text)
                    .ok()
                    .is_some_and(|v| v.get("target_modules").is_some_and(Value::is_array));
                (c, listed)
            })
            .map_err(|e| e.to_string()),
    )
}

/// A tensor's key and its info.
type Named<'a> = (&'a String, &'a Info);

/// Describes a PEFT adapter; returns what `load_peft_adapter` would reject it for (escaped).
fn inspect_peft(
    out: &mut String,
    path: &Path,
    tensors: &BTreeMap<String, Info>,
    covered: &mut BTreeSet<String>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let config = read_peft_config(path);
    let mut modules: BTreeMap<String, (Option<Named<'_>>, Option<Named<'_>>)> = BTreeMap::new();
    for (name, info) in tensors {
        let bare = name.strip_prefix(PEFT_KEY_PREFIX);
        let key = bare.unwrap_or(name);
        let (module, is_a) = match super::weights::split_lora_key(key) {
            Ok(split) => split,
            Err(what) => {
                problems.push(format!(
                    "{}: {what}: expected only <module>{PEFT_A_SUFFIX} and <module>{PEFT_B_SUFFIX} weights",
                    escape(name)
                ));
                continue;
            }
        };
        covered.insert(name.clone());
        if bare.is_none() {
            problems.push(format!(
                "{}: unexpected key: PEFT keys start with {PEFT_KEY_PREFIX}",
                escape(name)
            ));
        }
        if module.is_empty() {
            problems.push(format!("{}: empty module name", escape(name)));
        }
        let entry = modules.entry(module.to_string()).or_default();
        if is_a {
            entry.0 = Some((name, info));
        } else {
            entry.1 = Some((name, info));
        }
    }
    let _ = writeln!(out, "PEFT LoRA adapter, {} modules", modules.len());
    let config = match config {
        Some(Ok((c, listed))) => {
            let targets: Vec<String> = c.target_modules.iter().map(|t| escape(t)).collect();
            let _ = writeln!(
                out,
                "  r = {}, lora_alpha = {}, scale = {}{}, target modules: {}",
                c.r,
                c.lora_alpha,
                c.scale_for(""),
                if c.use_rslora { " (rsLoRA)" } else { "" },
                targets.join(", ")
            );
            if !c.rank_pattern.is_empty() || !c.alpha_pattern.is_empty() {
                let _ = writeln!(
                    out,
                    "  rank_pattern: {:?}, alpha_pattern: {:?}",
                    c.rank_pattern, c.alpha_pattern
                );
            }
            Some((c, listed))
        }
        Some(Err(e)) => {
            let _ = writeln!(out, "  {ADAPTER_CONFIG_FILE}: {}", escape(&e));
            problems.push(format!("{ADAPTER_CONFIG_FILE}: {}", escape(&e)));
            None
        }
        None => {
            let _ = writeln!(out, "  (no {ADAPTER_CONFIG_FILE} beside the file)");
            problems.push(format!(
                "{ADAPTER_CONFIG_FILE}: not found beside the file, and the loader reads it"
            ));
            None
        }
    };
    for (module, (a, b)) in &modules {
        let shape =
            |i: Option<(&String, &Info)>| i.map_or("missing".to_string(), |i| i.1.describe());
        let a_shape = a.map(|(_, i)| i.shape.as_slice());
        let b_shape = b.map(|(_, i)| i.shape.as_slice());
        let rank = a_shape
            .and_then(|s| s.first())
            .map_or("?".to_string(), |r| r.to_string());
        let d_in = a_shape
            .and_then(|s| s.get(1))
            .map_or("?".to_string(), |d| d.to_string());
        let d_out = b_shape
            .and_then(|s| s.first())
            .map_or("?".to_string(), |d| d.to_string());
        let scale = config.as_ref().map_or(String::new(), |(c, _)| {
            format!(", scale {}", c.scale_for(module))
        });
        let shown = escape(module);
        let _ = writeln!(
            out,
            "  {shown}: r = {rank}, {d_in} -> {d_out}, A {}, B {}{scale}",
            shape(*a),
            shape(*b)
        );
        problems.extend(peft_module_problems(module, *a, *b, config.as_ref()));
    }
    problems
}

/// What `load_peft_adapter` would reject one module for, in its order of checks.
fn peft_module_problems(
    module: &str,
    a: Option<Named<'_>>,
    b: Option<Named<'_>>,
    config: Option<&(PeftConfig, bool)>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let (a, b) = match (a, b) {
        (Some(a), Some(b)) => (a, b),
        (Some((a, _)), None) => {
            return vec![format!(
                "{}: missing lora_B: {} is present but its lora_B is not",
                escape(module),
                escape(a)
            )]
        }
        (None, Some((b, _))) => {
            return vec![format!(
                "{}: missing lora_A: {} is present but its lora_A is not",
                escape(module),
                escape(b)
            )]
        }
        (None, None) => return problems,
    };
    let mut two_d = true;
    for ((key, info), what) in [(a, "lora_A [r, d_in]"), (b, "lora_B [d_out, r]")] {
        if !matches!(info.dtype, StDtype::F32 | StDtype::F16 | StDtype::BF16) {
            problems.push(format!(
                "{}: dtype {:?} is not supported: expected F32, F16 or BF16",
                escape(key),
                info.dtype
            ));
        }
        if info.shape.len() != 2 {
            two_d = false;
            problems.push(format!(
                "{}: expected a 2-D {what}, got shape {:?} (LoRA on convolutions is not supported)",
                escape(key),
                info.shape
            ));
        }
    }
    if !two_d {
        return problems;
    }
    let (a_key, a_shape) = (a.0, &a.1.shape);
    let (b_key, b_shape) = (b.0, &b.1.shape);
    let (r, d_in, d_out) = (a_shape[0], a_shape[1], b_shape[0]);
    if b_shape[1] != r {
        problems.push(format!(
            "{}: shape {b_shape:?} does not fit lora_A {a_shape:?}: ranks disagree, expected \
             [{d_out}, {r}]",
            escape(b_key)
        ));
    }
    if let Some((c, listed)) = config {
        let expected = c.rank_for(module);
        if r != expected {
            problems.push(format!(
                "{}: rank {r} (shape {a_shape:?}) does not match {ADAPTER_CONFIG_FILE}, which gives \
                 r = {expected} for this module (r / rank_pattern)",
                escape(a_key)
            ));
        }
        if *listed && !c.targets(module) {
            problems.push(format!(
                "{}: module {} is not named by target_modules, so PEFT would not load its weights",
                escape(a_key),
                escape(module)
            ));
        }
    }
    if r == 0 || d_in == 0 || d_out == 0 {
        problems.push(format!(
            "{}: A {a_shape:?} and B {b_shape:?} must have r, d_in and d_out of at least 1",
            escape(a_key)
        ));
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn escape_keeps_text_and_escapes_controls() {
        assert_eq!(escape("q_proj θ"), "q_proj θ");
        assert_eq!(escape("a\u{1b}[2Jb"), "a\\u{1b}[2Jb");
        assert_eq!(escape("a\nb\tc"), "a\\nb\\tc");
        assert_eq!(escape("x\u{202e}y"), "x\\u{202e}y");
    }
}
