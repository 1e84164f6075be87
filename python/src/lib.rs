#![allow(non_snake_case)]
// the module is `molora._C`, so the crate is `_C`
// Each function takes an op's tensors and dimensions one by one, as the Python layer passes them.
#![allow(clippy::too_many_arguments)]
//! `molora._C`: the extension module behind the torch ops of `python/molora`.
//!
//! Every function takes its tensors as `(address, element count)` pairs of contiguous CPU tensors
//! that the Python layer (`molora/_ops.py`) checked for dtype, device and contiguity and keeps alive
//! for the call; outputs are tensors it allocated. Each function runs the crate's host op
//! ([`molora::cpu::ops`], the same composition candle's CPU path runs), so every length, id and
//! parameter is validated by the crate before anything is written; an invalid input raises
//! `ValueError` with the crate's message.

use molora::cpu::{self, ops, ops::RoutedGate};
use molora::gate::{Activation, Gate, HierarchicalCombine, RouterWeights, ThresholdSpec};
use molora::half::{bf16, f16};
use molora::peft::PeftConfig;
use molora::{Error, LoraShape, Routing, Segments, SeqRouting};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// Runs `$body` with `$t` bound to the element type named by `$dtype` (`"f32"`, `"f16"`, `"bf16"`).
macro_rules! with_dtype {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            "f32" => {
                type $t = f32;
                $body
            }
            "f16" => {
                type $t = f16;
                $body
            }
            "bf16" => {
                type $t = bf16;
                $body
            }
            other => Err(value_err(format!(
                "dtype {other:?} is not supported (float32, float16, bfloat16)"
            ))),
        }
    };
}

// After `with_dtype!`, which it uses.
#[cfg(feature = "cuda")]
mod gpu;

type Buf = (usize, usize);

fn py_err(e: Error) -> PyErr {
    PyValueError::new_err(e.to_string())
}

fn value_err(msg: String) -> PyErr {
    PyValueError::new_err(msg)
}

/// Checks the address of a buffer of `T` (host or device memory, named by `kind` in errors):
/// non-null and aligned unless empty, and its byte length within `isize`.
fn check_addr<T>((ptr, len): Buf, what: &str, kind: &str) -> PyResult<()> {
    if len > 0 && (ptr == 0 || ptr % std::mem::align_of::<T>() != 0) {
        return Err(value_err(format!(
            "{what}: {kind} {ptr:#x} is null or not aligned to {} bytes",
            std::mem::align_of::<T>()
        )));
    }
    if len
        .checked_mul(std::mem::size_of::<T>())
        .is_none_or(|n| n > isize::MAX as usize)
    {
        return Err(value_err(format!(
            "{what}: {len} elements overflow the address space"
        )));
    }
    Ok(())
}

/// The checked host address of a buffer of `T` (dangling when empty, as a slice needs).
fn check_ptr<T>(b: Buf, what: &str) -> PyResult<*mut T> {
    check_addr::<T>(b, what, "address")?;
    if b.1 == 0 {
        return Ok(std::ptr::NonNull::<T>::dangling().as_ptr());
    }
    Ok(b.0 as *mut T)
}

/// A read-only view of a tensor the Python layer handed over.
fn view<'a, T>(b: Buf, what: &str) -> PyResult<&'a [T]> {
    let p = check_ptr::<T>(b, what)?;
    // SAFETY: `b` is `(data_ptr(), numel())` of a live, contiguous CPU tensor of element type `T`
    // (molora/_ops.py checks dtype, device and contiguity before the call and holds the tensor for
    // its duration); the address was checked non-null and aligned above and its byte length fits
    // `isize`. Nothing writes to it during the call (outputs are distinct, freshly allocated
    // tensors; add_lora checks that `y` overlaps none of its inputs).
    Ok(unsafe { std::slice::from_raw_parts(p as *const T, b.1) })
}

/// A writable view of an output tensor the Python layer allocated for this call.
fn view_mut<'a, T>(b: Buf, what: &str) -> PyResult<&'a mut [T]> {
    let p = check_ptr::<T>(b, what)?;
    // SAFETY: as in `view`; in addition `b` is an output tensor that no other view of this call
    // aliases (allocated by the Python layer for the call, or add_lora's `y`, checked for overlap).
    Ok(unsafe { std::slice::from_raw_parts_mut(p, b.1) })
}

/// Copies a result into its output buffer, whose length must match.
fn write<T: Copy>(out: Buf, what: &str, values: &[T]) -> PyResult<()> {
    if out.1 != values.len() {
        return Err(py_err(Error::len_mismatch("output", values.len(), out.1)));
    }
    view_mut::<T>(out, what)?.copy_from_slice(values);
    Ok(())
}

fn shape((e, r, d_in, d_out): (usize, usize, usize, usize)) -> PyResult<LoraShape> {
    LoraShape::new(e, r, d_in, d_out).map_err(py_err)
}

fn routed_gate(kind: &str, k: usize, renormalize: bool) -> PyResult<RoutedGate> {
    match kind {
        "top_k" => Ok(RoutedGate::TopK { k, renormalize }),
        "threshold" => Ok(RoutedGate::Threshold),
        "dense" => Ok(RoutedGate::Dense),
        other => Err(value_err(format!(
            "gate {other:?} is not one of \"top_k\", \"threshold\", \"dense\""
        ))),
    }
}

/// `Δy = s·Σ_e w_te·(x_t·A_eᵀ)·B_eᵀ` for dense f32 weights `w` `[T, E]`.
#[pyfunction]
fn mole_lora(
    dtype: &str,
    x: Buf,
    a: Buf,
    b: Buf,
    w: Buf,
    out: Buf,
    dims: (usize, usize, usize, usize),
    scale: f32,
) -> PyResult<()> {
    let s = shape(dims)?;
    let w = view::<f32>(w, "w")?;
    with_dtype!(dtype, T => {
        let y = ops::mole_lora_forward::<T>(view(x, "x")?, view(a, "a")?, view(b, "b")?, w, &s, scale)
            .map_err(py_err)?;
        write::<T>(out, "out", &y)
    })
}

/// The backward of `mole_lora` in f32: `dx`, `dA`, `dB`, `dw` `[T, E]`.
#[pyfunction]
fn mole_lora_backward(
    x: Buf,
    a: Buf,
    b: Buf,
    w: Buf,
    dy: Buf,
    dx: Buf,
    da: Buf,
    db: Buf,
    dw: Buf,
    dims: (usize, usize, usize, usize),
    scale: f32,
) -> PyResult<()> {
    let s = shape(dims)?;
    let g = ops::mole_lora_backward(
        view(x, "x")?,
        view(a, "a")?,
        view(b, "b")?,
        view(w, "w")?,
        &s,
        scale,
        view(dy, "grad")?,
    )
    .map_err(py_err)?;
    write(dx, "dx", &g.dx)?;
    write(da, "da", &g.da)?;
    write(db, "db", &g.db)?;
    write(dw, "dw", &g.dw)
}

/// `Δy = s·Σ_slots w_ts·(x_t·A_eᵀ)·B_eᵀ` for slots `ids`/`weights` `[T, k]` (`-1` = empty).
#[pyfunction]
fn mole_lora_routed(
    dtype: &str,
    x: Buf,
    a: Buf,
    b: Buf,
    ids: Buf,
    weights: Buf,
    k: usize,
    out: Buf,
    dims: (usize, usize, usize, usize),
    scale: f32,
) -> PyResult<()> {
    let s = shape(dims)?;
    let (ids, weights) = (view::<i32>(ids, "ids")?, view::<f32>(weights, "weights")?);
    with_dtype!(dtype, T => {
        let y = ops::slot_lora_forward::<T>(view(x, "x")?, view(a, "a")?, view(b, "b")?, ids, weights, k, &s, scale)
            .map_err(py_err)?;
        write::<T>(out, "out", &y)
    })
}

/// The backward of `mole_lora_routed` in f32: `dx`, `dA`, `dB`, `dw` `[T, k]` (0 on empty slots).
#[pyfunction]
fn mole_lora_routed_backward(
    x: Buf,
    a: Buf,
    b: Buf,
    ids: Buf,
    weights: Buf,
    k: usize,
    dy: Buf,
    dx: Buf,
    da: Buf,
    db: Buf,
    dw: Buf,
    dims: (usize, usize, usize, usize),
    scale: f32,
) -> PyResult<()> {
    let s = shape(dims)?;
    let x = view::<f32>(x, "x")?;
    let t = x.len() / s.d_in;
    // The slots are validated (ids in -1..E, finite weights) before the backward reads them.
    let r = Routing::new(
        t,
        k,
        s.num_experts,
        view::<i32>(ids, "ids")?.to_vec(),
        view::<f32>(weights, "weights")?.to_vec(),
    )
    .map_err(py_err)?;
    let g = cpu::backward::lora_backward(
        x,
        view(a, "a")?,
        view(b, "b")?,
        &s,
        r.ids(),
        r.weights(),
        k,
        scale,
        view(dy, "grad")?,
    )
    .map_err(py_err)?;
    write(dx, "dx", &g.dx)?;
    write(da, "da", &g.da)?;
    write(db, "db", &g.db)?;
    write(dw, "dw", &g.dw)
}

/// The dense weights `[T, E]` of a gate over probabilities `p` (and thresholds `tau` `[T]`).
#[pyfunction]
fn gate(
    kind: &str,
    k: usize,
    renormalize: bool,
    p: Buf,
    tau: Option<Buf>,
    out: Buf,
    t: usize,
    e: usize,
) -> PyResult<()> {
    let g = routed_gate(kind, k, renormalize)?;
    let tau = tau.map(|b| view::<f32>(b, "tau")).transpose()?;
    let w = ops::gate_forward(&g, view(p, "p")?, tau, t, e).map_err(py_err)?;
    write(out, "out", &w)
}

/// The backward of `gate`: `dp` `[T, E]` and `dtau` `[T]` from `dw` `[T, E]`.
#[pyfunction]
fn gate_backward(
    kind: &str,
    k: usize,
    renormalize: bool,
    p: Buf,
    tau: Option<Buf>,
    dw: Buf,
    dp: Buf,
    dtau: Buf,
    t: usize,
    e: usize,
) -> PyResult<()> {
    let g = routed_gate(kind, k, renormalize)?;
    let tau = tau.map(|b| view::<f32>(b, "tau")).transpose()?;
    let (gp, gt) =
        ops::gate_backward(&g, view(p, "p")?, tau, t, e, view(dw, "grad")?).map_err(py_err)?;
    write(dp, "dp", &gp)?;
    write(dtau, "dtau", &gt)
}

/// The whole routing pipeline of `cpu::route`: router logits, activation, optional hierarchy, gate.
/// Writes the slots `ids`/`weights` `[T, K]` (`K` = the caller's width, ≥ the routing's `k_max`;
/// empty slots `-1` with weight 0).
#[pyfunction]
#[pyo3(signature = (dtype, x, w_g, b_g, t, d_in, e, activation, temperature, gate, k, renormalize, threshold, global_probs, seq_offsets, combine, lam, ids_out, weights_out, width))]
fn route(
    dtype: &str,
    x: Buf,
    w_g: Buf,
    b_g: Option<Buf>,
    t: usize,
    d_in: usize,
    e: usize,
    activation: &str,
    temperature: f32,
    gate: &str,
    k: usize,
    renormalize: bool,
    threshold: Option<(String, f32, Option<Buf>)>,
    global_probs: Option<Buf>,
    seq_offsets: Option<Buf>,
    combine: &str,
    lam: f32,
    ids_out: Buf,
    weights_out: Buf,
    width: usize,
) -> PyResult<()> {
    let activation = match activation {
        "softmax" => Activation::Softmax,
        "sigmoid" => Activation::Sigmoid,
        other => {
            return Err(value_err(format!(
                "activation {other:?} is not \"softmax\" or \"sigmoid\""
            )))
        }
    };
    let threshold = threshold
        .as_ref()
        .map(|(kind, v, w)| (kind.as_str(), *v, *w));
    let gate = match (gate, threshold) {
        ("top_k", _) => Gate::TopK { k, renormalize },
        ("dense", _) => Gate::Dense,
        ("threshold", Some(("fixed", tau, _))) => Gate::Threshold(ThresholdSpec::Fixed(tau)),
        ("threshold", Some(("learned", theta, _))) => Gate::Threshold(ThresholdSpec::Learned { theta }),
        ("threshold", Some(("input", b, Some(w)))) => Gate::Threshold(ThresholdSpec::InputDependent {
            w: view::<f32>(w, "threshold w")?.to_vec(),
            b,
        }),
        ("threshold", other) => {
            return Err(value_err(format!(
                "threshold gate: expected a fixed tau, a learned theta or an input-dependent (w, b), got {:?}",
                other.map(|(kind, ..)| kind)
            )))
        }
        (other, _) => return Err(value_err(format!("gate {other:?} is not one of \"top_k\", \"threshold\", \"dense\""))),
    };
    let hierarchy = match (global_probs, seq_offsets) {
        (Some(g), Some(o)) => {
            let segments = segments(o, t)?;
            let combine = match combine {
                "mix" => HierarchicalCombine::Mix { lambda: lam },
                "product" => HierarchicalCombine::Product,
                other => {
                    return Err(value_err(format!(
                        "combine {other:?} is not \"mix\" or \"product\""
                    )))
                }
            };
            Some((
                SeqRouting::new(segments, e, view::<f32>(g, "global_probs")?.to_vec())
                    .map_err(py_err)?,
                combine,
            ))
        }
        (None, None) => None,
        _ => return Err(value_err("global_probs and seq_offsets go together".into())),
    };
    let r = with_dtype!(dtype, T => {
        let router = RouterWeights::<T> {
            w_g: view(w_g, "w_g")?,
            b_g: b_g.map(|b| view(b, "b_g")).transpose()?,
            activation,
            temperature,
        };
        cpu::route::<T>(view(x, "x")?, t, d_in, e, &router, hierarchy.as_ref().map(|(g, c)| (g, *c)), &gate)
            .map_err(py_err)
    })?;
    if r.k_max() > width {
        return Err(value_err(format!(
            "route: {} slots per token do not fit a width of {width}",
            r.k_max()
        )));
    }
    let mut ids = vec![-1i32; t * width];
    let mut weights = vec![0.0f32; t * width];
    for tok in 0..t {
        for s in 0..r.k_max() {
            ids[tok * width + s] = r.id(tok, s);
            weights[tok * width + s] = r.weight(tok, s);
        }
    }
    write(ids_out, "ids", &ids)?;
    write(weights_out, "weights", &weights)
}

/// The sequences of `offsets` (int64 `[S+1]`, from 0 to `T`, non-decreasing).
fn offsets_segments(offsets: &[i64], t: usize) -> PyResult<Segments> {
    let v: Vec<usize> = offsets
        .iter()
        .map(|&o| {
            usize::try_from(o).map_err(|_| value_err(format!("seq_offsets: {o} is negative")))
        })
        .collect::<PyResult<_>>()?;
    Segments::new(v, t).map_err(py_err)
}

/// [`offsets_segments`] of an offsets tensor.
fn segments(offsets: Buf, t: usize) -> PyResult<Segments> {
    offsets_segments(view::<i64>(offsets, "seq_offsets")?, t)
}

/// SAML's weight-space mixture per sequence: `y_t = s·(x_t·Ā_qᵀ)·B̄_qᵀ`.
#[pyfunction]
fn weight_space_lora(
    dtype: &str,
    x: Buf,
    a: Buf,
    b: Buf,
    p: Buf,
    seq_offsets: Buf,
    out: Buf,
    dims: (usize, usize, usize, usize),
    scale: f32,
) -> PyResult<()> {
    let s = shape(dims)?;
    let seq = segments(seq_offsets, x.1 / s.d_in)?;
    let p = view::<f32>(p, "p")?;
    with_dtype!(dtype, T => {
        let y = ops::weight_space_forward::<T>(view(x, "x")?, view(a, "a")?, view(b, "b")?, p, &seq, &s, scale)
            .map_err(py_err)?;
        write::<T>(out, "out", &y)
    })
}

/// The backward of `weight_space_lora` in f32: `dx`, `dA`, `dB`, `dp` `[S, E]`.
#[pyfunction]
fn weight_space_lora_backward(
    x: Buf,
    a: Buf,
    b: Buf,
    p: Buf,
    seq_offsets: Buf,
    dy: Buf,
    dx: Buf,
    da: Buf,
    db: Buf,
    dp: Buf,
    dims: (usize, usize, usize, usize),
    scale: f32,
) -> PyResult<()> {
    let s = shape(dims)?;
    let seq = segments(seq_offsets, x.1 / s.d_in)?;
    let g = ops::weight_space_backward(
        view(x, "x")?,
        view(a, "a")?,
        view(b, "b")?,
        view(p, "p")?,
        &seq,
        &s,
        scale,
        view(dy, "grad")?,
    )
    .map_err(py_err)?;
    write(dx, "dx", &g.dx)?;
    write(da, "da", &g.da)?;
    write(db, "db", &g.db)?;
    write(dp, "dp", &g.dp)
}

/// The sizes of a quantised `[rows, cols]` weight: `(data elements, scale elements)`.
#[pyfunction]
fn quant_sizes(format: &str, rows: usize, cols: usize) -> PyResult<(usize, usize)> {
    let n = molora::error::checked_elems("quantised weight [rows, cols]", rows, cols, 1)
        .map_err(py_err)?;
    match format {
        "nf4" => Ok((n.div_ceil(2), n.div_ceil(molora::quant::NF4_BLOCK))),
        "int8" => Ok((n, rows)),
        other => Err(value_err(format!(
            "format {other:?} is not \"nf4\" or \"int8\""
        ))),
    }
}

/// Quantises an f32 `[rows, cols]` weight into `data` (uint8 NF4 codes or int8) and f32 `scales`.
#[pyfunction]
fn quantize(
    format: &str,
    w: Buf,
    rows: usize,
    cols: usize,
    data: Buf,
    scales: Buf,
) -> PyResult<()> {
    let w = view::<f32>(w, "w")?;
    match format {
        "nf4" => {
            let q = cpu::quantize_nf4(w, rows, cols).map_err(py_err)?;
            write(data, "data", q.packed())?;
            write(scales, "absmax", q.absmax())
        }
        "int8" => {
            let q = cpu::quantize_int8(w, rows, cols).map_err(py_err)?;
            write(data, "data", q.q())?;
            write(scales, "scales", q.scales())
        }
        other => Err(value_err(format!(
            "format {other:?} is not \"nf4\" or \"int8\""
        ))),
    }
}

enum Quant {
    Nf4(molora::quant::Nf4Weight),
    Int8(molora::quant::Int8Weight),
}

fn quant_weight(format: &str, data: Buf, scales: Buf, rows: usize, cols: usize) -> PyResult<Quant> {
    match format {
        "nf4" => molora::quant::Nf4Weight::from_parts(
            rows,
            cols,
            view::<u8>(data, "data")?.to_vec(),
            view::<f32>(scales, "absmax")?.to_vec(),
        )
        .map(Quant::Nf4)
        .map_err(py_err),
        "int8" => molora::quant::Int8Weight::from_parts(
            rows,
            cols,
            view::<i8>(data, "data")?.to_vec(),
            view::<f32>(scales, "scales")?.to_vec(),
        )
        .map(Quant::Int8)
        .map_err(py_err),
        other => Err(value_err(format!(
            "format {other:?} is not \"nf4\" or \"int8\""
        ))),
    }
}

/// `y = x·deq(W)ᵀ` over a quantised weight.
#[pyfunction]
fn quant_linear(
    dtype: &str,
    x: Buf,
    format: &str,
    data: Buf,
    scales: Buf,
    rows: usize,
    cols: usize,
    out: Buf,
) -> PyResult<()> {
    let q = quant_weight(format, data, scales, rows, cols)?;
    if cols == 0 || !x.1.is_multiple_of(cols) {
        return Err(py_err(Error::len_mismatch(
            "x [T, d_in]",
            x.1.div_ceil(cols.max(1)) * cols,
            x.1,
        )));
    }
    let t = x.1 / cols;
    with_dtype!(dtype, T => {
        let x = view::<T>(x, "x")?;
        let y = match &q {
            Quant::Nf4(w) => cpu::nf4_matmul(x, t, w, None),
            Quant::Int8(w) => cpu::int8_matmul(x, t, w, None),
        }
        .map_err(py_err)?;
        write::<T>(out, "out", &molora::dtype::from_f32_slice::<T>(&y))
    })
}

/// The backward of `quant_linear` in f32: `dx = dy·deq(W)` (the weight is frozen).
#[pyfunction]
fn quant_linear_backward(
    dy: Buf,
    format: &str,
    data: Buf,
    scales: Buf,
    rows: usize,
    cols: usize,
    dx: Buf,
) -> PyResult<()> {
    let q = quant_weight(format, data, scales, rows, cols)?;
    let dy = view::<f32>(dy, "grad")?;
    let t = dy.len() / rows.max(1);
    let w = match &q {
        Quant::Nf4(w) => molora::quant::QuantWeightRef::Nf4(w),
        Quant::Int8(w) => molora::quant::QuantWeightRef::Int8(w),
    };
    let g = cpu::quant_matmul_dx(dy, t, &w).map_err(py_err)?;
    write(dx, "dx", &g)
}

/// Whether two buffers of `T` overlap in memory.
fn overlaps<T>(a: Buf, b: Buf) -> bool {
    let size = std::mem::size_of::<T>();
    let (a0, a1) = (a.0, a.0.saturating_add(a.1.saturating_mul(size)));
    let (b0, b1) = (b.0, b.0.saturating_add(b.1.saturating_mul(size)));
    a.1 > 0 && b.1 > 0 && a0 < b1 && b0 < a1
}

/// punica's `add_lora`: `y[t, y_offset..y_offset + d_out] += s·(x_t·A_eᵀ)·B_eᵀ`, `e = indices[t]`.
#[pyfunction]
fn add_lora(
    dtype: &str,
    y: Buf,
    y_stride: usize,
    y_offset: usize,
    x: Buf,
    a: Buf,
    b: Buf,
    indices: Buf,
    dims: (usize, usize, usize, usize),
    scale: f32,
) -> PyResult<()> {
    let s = shape(dims)?;
    with_dtype!(dtype, T => {
        for (other, what) in [(x, "x"), (a, "a"), (b, "b")] {
            if overlaps::<T>(y, other) {
                return Err(value_err(format!("add_lora: y overlaps {what} in memory (y is written in place)")));
            }
        }
        let (xv, av, bv) = (view::<T>(x, "x")?, view::<T>(a, "a")?, view::<T>(b, "b")?);
        let ids = view::<i32>(indices, "indices")?;
        ops::add_lora::<T>(view_mut(y, "y")?, y_stride, y_offset, xv, av, bv, ids, &s, scale).map_err(py_err)
    })
}

/// PEFT's rules for one module of an `adapter_config.json`: `(r, lora_alpha, scale)` when the config
/// targets `module`, `None` when it does not; an option molora does not implement (DoRA, ...) raises
/// `ValueError` naming it.
#[pyfunction]
fn peft_module(
    config_json: &str,
    source: &str,
    module: &str,
) -> PyResult<Option<(usize, f32, f32)>> {
    let c = PeftConfig::from_json(config_json, source).map_err(py_err)?;
    Ok(c.targets(module)
        .then(|| (c.rank_for(module), c.alpha_for(module), c.scale_for(module))))
}

#[pymodule]
#[pyo3(name = "_C")]
fn molora_c(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(mole_lora, m)?)?;
    m.add_function(wrap_pyfunction!(mole_lora_backward, m)?)?;
    m.add_function(wrap_pyfunction!(mole_lora_routed, m)?)?;
    m.add_function(wrap_pyfunction!(mole_lora_routed_backward, m)?)?;
    m.add_function(wrap_pyfunction!(gate, m)?)?;
    m.add_function(wrap_pyfunction!(gate_backward, m)?)?;
    m.add_function(wrap_pyfunction!(route, m)?)?;
    m.add_function(wrap_pyfunction!(weight_space_lora, m)?)?;
    m.add_function(wrap_pyfunction!(weight_space_lora_backward, m)?)?;
    m.add_function(wrap_pyfunction!(quant_sizes, m)?)?;
    m.add_function(wrap_pyfunction!(quantize, m)?)?;
    m.add_function(wrap_pyfunction!(quant_linear, m)?)?;
    m.add_function(wrap_pyfunction!(quant_linear_backward, m)?)?;
    m.add_function(wrap_pyfunction!(add_lora, m)?)?;
    m.add_function(wrap_pyfunction!(peft_module, m)?)?;
    #[cfg(feature = "cuda")]
    gpu::register(m)?;
    m.add("has_cuda", cfg!(feature = "cuda"))?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
