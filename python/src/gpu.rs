//! The CUDA half of `molora._C` (feature `cuda`): the framework ops of [`molora::cuda::ops`] on
//! PyTorch's CUDA tensors, zero-copy, on `torch.cuda.current_stream()`.
//!
//! Each function takes the device ordinal, the raw `cudaStream_t` PyTorch is using, and the tensors
//! as `(data_ptr(), numel())` of contiguous CUDA tensors on that device (checked by
//! `molora/_ops.py`). The stream is wrapped (not owned) by cudarc on the device's primary context,
//! the one PyTorch uses, so our kernels order with PyTorch's work; the tensors' memory is borrowed
//! for the call and never freed here. Workspaces are allocated stream-ordered on the same stream.
//! Nothing waits for the device.

use std::mem::ManuallyDrop;
use std::sync::{Arc, Mutex, OnceLock};

use molora::cuda::cudarc::driver::{sys, CudaContext, CudaSlice, CudaStream, DeviceRepr};
use molora::cuda::ops::{self, DeviceOpGrads};
use molora::cuda::{self, BufferView, CudaElement};
use molora::half::{bf16, f16};
use molora::{Error, LoraShape};
use pyo3::prelude::*;

use super::{check_addr, offsets_segments, py_err, routed_gate, shape, value_err, Buf};

/// The primary contexts cudarc holds, one per device ordinal, made once.
fn context(ordinal: usize) -> PyResult<Arc<CudaContext>> {
    static CONTEXTS: OnceLock<Mutex<Vec<Option<Arc<CudaContext>>>>> = OnceLock::new();
    let lock = CONTEXTS.get_or_init(|| Mutex::new(Vec::new()));
    let mut all = lock
        .lock()
        .map_err(|_| value_err("the CUDA context table was poisoned by an earlier panic".into()))?;
    if let Some(Some(ctx)) = all.get(ordinal) {
        return Ok(ctx.clone());
    }
    let ctx = CudaContext::new(ordinal).map_err(|e| py_err(Error::Driver(e.to_string())))?;
    // SAFETY: molora orders its work by the stream it is handed (PyTorch's), not by cudarc's
    // per-buffer events; with tracking off, the borrowed tensors carry no events to record or wait
    // on. Nothing else in this process relies on cudarc's tracking of this context's buffers.
    unsafe { ctx.disable_event_tracking() };
    if all.len() <= ordinal {
        all.resize(ordinal + 1, None);
    }
    all[ordinal] = Some(ctx.clone());
    Ok(ctx)
}

/// molora's device on PyTorch's stream `stream` of device `ordinal`.
fn device(ordinal: usize, stream: usize) -> PyResult<(cuda::Device, Arc<CudaStream>)> {
    let ctx = context(ordinal)?;
    // SAFETY: `stream` is `torch.cuda.current_stream(device).cuda_stream` (0 for the legacy default
    // stream): a stream of device `ordinal`'s primary context, which PyTorch keeps alive for the
    // duration of the call; the wrapper does not destroy it, and our work is ordered on it.
    let s = unsafe { ctx.wrap_borrowed_stream(stream as sys::CUstream) };
    Ok((cuda::Device::from_stream(s.clone()), s))
}

/// A PyTorch tensor's device memory as a cudarc slice, borrowed for one call: leaked (not freed)
/// when dropped.
struct Borrowed<T: DeviceRepr> {
    slice: ManuallyDrop<CudaSlice<T>>,
}

impl<T: DeviceRepr> Borrowed<T> {
    fn new(stream: &Arc<CudaStream>, (ptr, len): Buf, what: &str) -> PyResult<Self> {
        check_addr::<T>((ptr, len), what, "device address")?;
        // SAFETY: `(ptr, len)` is `(data_ptr(), numel())` of a live, contiguous CUDA tensor of
        // element type `T` on this stream's device (molora/_ops.py checks dtype, device and
        // contiguity, and holds the tensor for the call); the slice is leaked on drop, so PyTorch's
        // allocator keeps the memory.
        let slice = unsafe { stream.upgrade_device_ptr::<T>(ptr as sys::CUdeviceptr, len) };
        Ok(Borrowed {
            slice: ManuallyDrop::new(slice),
        })
    }
}

impl Borrowed<f32> {
    /// The whole tensor as a view (a gate's thresholds).
    fn view(&self) -> BufferView<'_, f32> {
        self.slice.slice(0..self.slice.len()).into()
    }
}

impl<T: DeviceRepr> Drop for Borrowed<T> {
    fn drop(&mut self) {
        // SAFETY: the slice is taken once, here, and not used after.
        let slice = unsafe { ManuallyDrop::take(&mut self.slice) };
        // The memory is PyTorch's: give the pointer back without freeing it.
        let _ = slice.leak();
    }
}

impl<T: DeviceRepr> std::ops::Deref for Borrowed<T> {
    type Target = CudaSlice<T>;
    fn deref(&self) -> &CudaSlice<T> {
        &self.slice
    }
}

impl<T: DeviceRepr> std::ops::DerefMut for Borrowed<T> {
    fn deref_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.slice
    }
}

fn rows(len: usize, cols: usize, what: &str) -> PyResult<usize> {
    if cols == 0 || !len.is_multiple_of(cols) {
        return Err(value_err(format!(
            "{what}: {len} elements are not rows of {cols}"
        )));
    }
    Ok(len / cols)
}

/// The four gradient outputs of a LoRA op's backward.
struct GradBufs {
    dx: Borrowed<f32>,
    da: Borrowed<f32>,
    db: Borrowed<f32>,
    dw: Borrowed<f32>,
}

impl GradBufs {
    fn new(s: &Arc<CudaStream>, g: [Buf; 4]) -> PyResult<Self> {
        Ok(GradBufs {
            dx: Borrowed::new(s, g[0], "dx")?,
            da: Borrowed::new(s, g[1], "da")?,
            db: Borrowed::new(s, g[2], "db")?,
            dw: Borrowed::new(s, g[3], "dw")?,
        })
    }

    fn out(&mut self) -> DeviceOpGrads<'_, CudaSlice<f32>> {
        DeviceOpGrads {
            dx: &mut self.dx,
            da: &mut self.da,
            db: &mut self.db,
            dw: &mut self.dw,
        }
    }
}

/// The inputs of a LoRA op: `x`, `a`, `b` of the element type.
struct Lora<T: DeviceRepr> {
    x: Borrowed<T>,
    a: Borrowed<T>,
    b: Borrowed<T>,
    t: usize,
}

impl<T: DeviceRepr> Lora<T> {
    fn new(st: &Arc<CudaStream>, x: Buf, a: Buf, b: Buf, s: &LoraShape) -> PyResult<Self> {
        Ok(Lora {
            t: rows(x.1, s.d_in, "x [T, d_in]")?,
            x: Borrowed::new(st, x, "x")?,
            a: Borrowed::new(st, a, "a")?,
            b: Borrowed::new(st, b, "b")?,
        })
    }
}

fn mole_lora_t<T: CudaElement>(
    d: &cuda::Device,
    st: &Arc<CudaStream>,
    io: [Buf; 5],
    s: &LoraShape,
    scale: f32,
) -> PyResult<()> {
    let l = Lora::<T>::new(st, io[0], io[1], io[2], s)?;
    let w = Borrowed::<f32>::new(st, io[3], "w")?;
    let mut y = Borrowed::<T>::new(st, io[4], "out")?;
    ops::mole_lora_forward(d, &*l.x, &*l.a, &*l.b, &*w, l.t, s, scale, &mut *y).map_err(py_err)
}

/// `mole_lora` on CUDA tensors: `out += Δy` (`out` zeroed by the caller).
#[pyfunction]
pub fn cuda_mole_lora(
    dtype: &str,
    ordinal: usize,
    stream: usize,
    x: Buf,
    a: Buf,
    b: Buf,
    w: Buf,
    out: Buf,
    dims: (usize, usize, usize, usize),
    scale: f32,
) -> PyResult<()> {
    let s = shape(dims)?;
    let (d, st) = device(ordinal, stream)?;
    with_dtype!(dtype, T => mole_lora_t::<T>(&d, &st, [x, a, b, w, out], &s, scale))
}

fn mole_lora_backward_t<T: CudaElement>(
    d: &cuda::Device,
    st: &Arc<CudaStream>,
    io: [Buf; 5],
    g: [Buf; 4],
    s: &LoraShape,
    scale: f32,
) -> PyResult<()> {
    let l = Lora::<T>::new(st, io[0], io[1], io[2], s)?;
    let w = Borrowed::<f32>::new(st, io[3], "w")?;
    let dy = Borrowed::<T>::new(st, io[4], "grad")?;
    let mut gb = GradBufs::new(st, g)?;
    ops::mole_lora_backward(
        d,
        &*l.x,
        &*l.a,
        &*l.b,
        &*w,
        l.t,
        s,
        scale,
        &*dy,
        &mut gb.out(),
    )
    .map_err(py_err)
}

/// The backward of `mole_lora` on CUDA tensors (`x`, `a`, `b`, `grad` of the dtype; f32 gradients).
#[pyfunction]
pub fn cuda_mole_lora_backward(
    dtype: &str,
    ordinal: usize,
    stream: usize,
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
    let (d, st) = device(ordinal, stream)?;
    with_dtype!(dtype, T => mole_lora_backward_t::<T>(&d, &st, [x, a, b, w, dy], [dx, da, db, dw], &s, scale))
}

fn routed_t<T: CudaElement>(
    d: &cuda::Device,
    st: &Arc<CudaStream>,
    io: [Buf; 6],
    k: usize,
    s: &LoraShape,
    scale: f32,
) -> PyResult<()> {
    let l = Lora::<T>::new(st, io[0], io[1], io[2], s)?;
    let ids = Borrowed::<i32>::new(st, io[3], "ids")?;
    let w = Borrowed::<f32>::new(st, io[4], "weights")?;
    let mut y = Borrowed::<T>::new(st, io[5], "out")?;
    ops::slot_lora_forward(
        d, &*l.x, &*l.a, &*l.b, &*ids, &*w, l.t, k, s, scale, &mut *y,
    )
    .map_err(py_err)
}

/// `mole_lora_routed` on CUDA tensors: `out += Δy` over the slots (`out` zeroed by the caller).
#[pyfunction]
pub fn cuda_mole_lora_routed(
    dtype: &str,
    ordinal: usize,
    stream: usize,
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
    let (d, st) = device(ordinal, stream)?;
    with_dtype!(dtype, T => routed_t::<T>(&d, &st, [x, a, b, ids, weights, out], k, &s, scale))
}

fn routed_backward_t<T: CudaElement>(
    d: &cuda::Device,
    st: &Arc<CudaStream>,
    io: [Buf; 6],
    g: [Buf; 4],
    k: usize,
    s: &LoraShape,
    scale: f32,
) -> PyResult<()> {
    let l = Lora::<T>::new(st, io[0], io[1], io[2], s)?;
    let ids = Borrowed::<i32>::new(st, io[3], "ids")?;
    let w = Borrowed::<f32>::new(st, io[4], "weights")?;
    let dy = Borrowed::<T>::new(st, io[5], "grad")?;
    let mut gb = GradBufs::new(st, g)?;
    ops::slot_lora_backward(
        d,
        &*l.x,
        &*l.a,
        &*l.b,
        &*ids,
        &*w,
        l.t,
        k,
        s,
        scale,
        &*dy,
        &mut gb.out(),
    )
    .map_err(py_err)
}

/// The backward of `mole_lora_routed` on CUDA tensors.
#[pyfunction]
pub fn cuda_mole_lora_routed_backward(
    dtype: &str,
    ordinal: usize,
    stream: usize,
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
    let (d, st) = device(ordinal, stream)?;
    with_dtype!(dtype, T => routed_backward_t::<T>(&d, &st, [x, a, b, ids, weights, dy], [dx, da, db, dw], k, &s, scale))
}

/// The dense weights of a gate on CUDA tensors.
#[pyfunction]
pub fn cuda_gate(
    ordinal: usize,
    stream: usize,
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
    let (d, st) = device(ordinal, stream)?;
    let p = Borrowed::<f32>::new(&st, p, "p")?;
    let tau = tau
        .map(|b| Borrowed::<f32>::new(&st, b, "tau"))
        .transpose()?;
    let mut w = Borrowed::<f32>::new(&st, out, "out")?;
    ops::gate_forward(&d, &g, &*p, tau.as_ref().map(|b| b.view()), t, e, &mut *w).map_err(py_err)
}

/// The backward of a gate on CUDA tensors: `dp` and `dtau` from `dw`.
#[pyfunction]
pub fn cuda_gate_backward(
    ordinal: usize,
    stream: usize,
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
    let (d, st) = device(ordinal, stream)?;
    let p = Borrowed::<f32>::new(&st, p, "p")?;
    let tau = tau
        .map(|b| Borrowed::<f32>::new(&st, b, "tau"))
        .transpose()?;
    let dw = Borrowed::<f32>::new(&st, dw, "grad")?;
    let mut dp = Borrowed::<f32>::new(&st, dp, "dp")?;
    let mut dtau = Borrowed::<f32>::new(&st, dtau, "dtau")?;
    ops::gate_backward(
        &d,
        &g,
        &*p,
        tau.as_ref().map(|b| b.view()),
        t,
        e,
        &*dw,
        &mut *dp,
        &mut *dtau,
    )
    .map_err(py_err)
}

/// Sequence lengths from host offsets `[S + 1]` (0 to T, non-decreasing).
fn lengths(offsets: &[i64], t: usize) -> PyResult<Vec<usize>> {
    let segs = offsets_segments(offsets, t)?;
    Ok((0..segs.num_segments())
        .map(|q| segs.range(q).len())
        .collect())
}

fn weight_space_t<T: CudaElement>(
    d: &cuda::Device,
    st: &Arc<CudaStream>,
    io: [Buf; 5],
    offsets: &[i64],
    s: &LoraShape,
    scale: f32,
) -> PyResult<()> {
    let l = Lora::<T>::new(st, io[0], io[1], io[2], s)?;
    let p = Borrowed::<f32>::new(st, io[3], "p")?;
    let mut y = Borrowed::<T>::new(st, io[4], "out")?;
    let lens = lengths(offsets, l.t)?;
    ops::weight_space_forward(d, &*l.x, &*l.a, &*l.b, &*p, &lens, s, scale, &mut *y).map_err(py_err)
}

/// `weight_space_lora` on CUDA tensors (the offsets are a host list: they size the launch).
#[pyfunction]
pub fn cuda_weight_space_lora(
    dtype: &str,
    ordinal: usize,
    stream: usize,
    x: Buf,
    a: Buf,
    b: Buf,
    p: Buf,
    seq_offsets: Vec<i64>,
    out: Buf,
    dims: (usize, usize, usize, usize),
    scale: f32,
) -> PyResult<()> {
    let s = shape(dims)?;
    let (d, st) = device(ordinal, stream)?;
    with_dtype!(dtype, T => weight_space_t::<T>(&d, &st, [x, a, b, p, out], &seq_offsets, &s, scale))
}

fn weight_space_backward_t<T: CudaElement>(
    d: &cuda::Device,
    st: &Arc<CudaStream>,
    io: [Buf; 5],
    g: [Buf; 4],
    offsets: &[i64],
    s: &LoraShape,
    scale: f32,
) -> PyResult<()> {
    let l = Lora::<T>::new(st, io[0], io[1], io[2], s)?;
    let p = Borrowed::<f32>::new(st, io[3], "p")?;
    let dy = Borrowed::<T>::new(st, io[4], "grad")?;
    let mut gb = GradBufs::new(st, g)?;
    let lens = lengths(offsets, l.t)?;
    ops::weight_space_backward(
        d,
        &*l.x,
        &*l.a,
        &*l.b,
        &*p,
        &lens,
        s,
        scale,
        &*dy,
        &mut gb.out(),
    )
    .map_err(py_err)
}

/// The backward of `weight_space_lora` on CUDA tensors.
#[pyfunction]
pub fn cuda_weight_space_lora_backward(
    dtype: &str,
    ordinal: usize,
    stream: usize,
    x: Buf,
    a: Buf,
    b: Buf,
    p: Buf,
    seq_offsets: Vec<i64>,
    dy: Buf,
    dx: Buf,
    da: Buf,
    db: Buf,
    dp: Buf,
    dims: (usize, usize, usize, usize),
    scale: f32,
) -> PyResult<()> {
    let s = shape(dims)?;
    let (d, st) = device(ordinal, stream)?;
    with_dtype!(dtype, T => weight_space_backward_t::<T>(&d, &st, [x, a, b, p, dy], [dx, da, db, dp], &seq_offsets, &s, scale))
}

fn add_lora_t<T: CudaElement>(
    d: &cuda::Device,
    st: &Arc<CudaStream>,
    io: [Buf; 5],
    y_stride: usize,
    y_offset: usize,
    s: &LoraShape,
    scale: f32,
) -> PyResult<()> {
    let l = Lora::<T>::new(st, io[1], io[2], io[3], s)?;
    let idx = Borrowed::<i32>::new(st, io[4], "indices")?;
    let mut y = Borrowed::<T>::new(st, io[0], "y")?;
    if l.t == 0 {
        return Ok(());
    }
    let mut ws = cuda::AddLoraWorkspace::new(d, l.t, s).map_err(py_err)?;
    cuda::add_lora(
        d, &*l.x, &*l.a, &*l.b, &*idx, s, scale, &mut ws, &mut *y, y_stride, y_offset,
    )
    .map_err(py_err)
}

/// `add_lora` on CUDA tensors, in place into `y`'s columns `y_offset..y_offset + d_out`.
#[pyfunction]
pub fn cuda_add_lora(
    dtype: &str,
    ordinal: usize,
    stream: usize,
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
    let (d, st) = device(ordinal, stream)?;
    with_dtype!(dtype, T => add_lora_t::<T>(&d, &st, [y, x, a, b, indices], y_stride, y_offset, &s, scale))
}

/// Registers the CUDA functions.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cuda_mole_lora, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_mole_lora_backward, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_mole_lora_routed, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_mole_lora_routed_backward, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_gate, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_gate_backward, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_weight_space_lora, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_weight_space_lora_backward, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_add_lora, m)?)?;
    Ok(())
}
