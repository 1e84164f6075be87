//! Our own safetensors files: [`save_tensors`] / [`load_tensors`] with string metadata (the routing
//! config as JSON under [`MOLORA_METADATA_KEY`]), and the conversions between candle tensors and
//! safetensors views that the PEFT reader shares.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorView, View};

use super::{io_err, read_file, weights_err};
use crate::error::Result;

/// The metadata key under which our own files keep their configuration (JSON).
pub const MOLORA_METADATA_KEY: &str = "molora";

pub(super) fn deserialize<'a>(bytes: &'a [u8], source: &str) -> Result<SafeTensors<'a>> {
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
pub(super) fn view_to_tensor(
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
/// JSON under the metadata key [`MOLORA_METADATA_KEY`] (see [`inspect`](super::inspect)).
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
