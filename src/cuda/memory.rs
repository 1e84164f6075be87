//! Device memory: [`Buffer`] (owned by molora) and its views [`BufferView`] / [`BufferViewMut`], on
//! a GPU through cudarc or, with the `emu` feature, in the emulated device's memory; and the two
//! traits every op takes its buffers through, [`DeviceRead`] and [`DeviceWrite`], implemented for
//! these and for cudarc's `CudaSlice`, `CudaView` and `CudaViewMut` (so a framework's GPU buffers,
//! candle's among them, go straight in).
//!
//! The traits are sealed: only these types implement them, so an op can trust a buffer's length and
//! device address. A buffer of the other kind than the device an op runs on (an emulated buffer on a
//! GPU device, or GPU memory on the emulated device) is an [`Error::DeviceMismatch`] naming the
//! argument, never a bad pointer.

use std::fmt;
#[cfg(feature = "emu")]
use std::marker::PhantomData;
use std::ops::{Bound, RangeBounds};

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DeviceSlice, SyncOnDrop};

use super::device::{Backend, Device};
#[cfg(feature = "emu")]
use super::emu::EmuAlloc;
use crate::{Error, Result};

/// Which memory a buffer lives in, or a device runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Memory {
    Gpu,
    #[cfg(feature = "emu")]
    Emulated,
}

impl Memory {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Memory::Gpu => "GPU",
            #[cfg(feature = "emu")]
            Memory::Emulated => "emulated",
        }
    }
}

pub(crate) mod sealed {
    use super::Memory;
    use cudarc::driver::{CudaView, CudaViewMut};

    /// What the ops need of a readable buffer; outside the crate it cannot be named, so no other
    /// type can claim to be device memory.
    pub trait Read<T> {
        fn memory(&self) -> Memory;
        /// The cudarc view of GPU memory; `None` for emulated memory.
        fn gpu_view(&self) -> Option<CudaView<'_, T>>;
        /// The address of emulated memory; `None` for GPU memory.
        #[cfg(feature = "emu")]
        fn emu_addr(&self) -> Option<u64>;
    }

    /// What the ops need of a writable buffer.
    pub trait Write<T>: Read<T> {
        /// The mutable cudarc view of GPU memory; `None` for emulated memory.
        fn gpu_view_mut(&mut self) -> Option<CudaViewMut<'_, T>>;
    }
}

/// Device memory an op reads: [`Buffer`], [`BufferView`], [`BufferViewMut`], and cudarc's
/// `CudaSlice`, `CudaView` and `CudaViewMut` (GPU memory). Sealed.
pub trait DeviceRead<T>: sealed::Read<T> {
    /// Number of elements.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Device memory an op writes: [`Buffer`], [`BufferViewMut`], and cudarc's `CudaSlice` and
/// `CudaViewMut`. Sealed.
pub trait DeviceWrite<T>: DeviceRead<T> + sealed::Write<T> {}

fn mismatch(what: &'static str, buffer: Memory, device: Memory) -> Error {
    Error::DeviceMismatch {
        what,
        buffer: buffer.name(),
        device: device.name(),
    }
}

/// [`Error::DeviceMismatch`] naming `what` unless `buf` is memory of `dev`'s kind; no side effect.
pub(crate) fn check_memory<T, B: DeviceRead<T> + ?Sized>(
    dev: &Device,
    what: &'static str,
    buf: &B,
) -> Result<()> {
    if buf.memory() == dev.memory() {
        Ok(())
    } else {
        Err(mismatch(what, buf.memory(), dev.memory()))
    }
}

/// `buf`'s device address on `dev`, with the guard that orders it on a GPU stream (drop it after the
/// work reading the buffer is enqueued), or [`Error::DeviceMismatch`] naming `what`.
pub(crate) fn read_addr<'a, T: 'a, B: DeviceRead<T> + ?Sized>(
    dev: &'a Device,
    what: &'static str,
    buf: &'a B,
) -> Result<(u64, Option<SyncOnDrop<'a>>)> {
    let memory = buf.memory();
    match dev.backend() {
        Backend::Gpu { stream, .. } => match buf.gpu_view() {
            Some(view) => {
                let (addr, guard) = view.view_ptr(stream);
                Ok((addr, Some(guard)))
            }
            None => Err(mismatch(what, memory, Memory::Gpu)),
        },
        #[cfg(feature = "emu")]
        Backend::Emulated => match buf.emu_addr() {
            Some(addr) => Ok((addr, None)),
            None => Err(mismatch(what, memory, Memory::Emulated)),
        },
    }
}

/// As [`read_addr`], for a buffer the work writes.
pub(crate) fn write_addr<'a, T: 'a, B: DeviceWrite<T> + ?Sized>(
    dev: &'a Device,
    what: &'static str,
    buf: &'a mut B,
) -> Result<(u64, Option<SyncOnDrop<'a>>)> {
    let memory = buf.memory();
    match dev.backend() {
        Backend::Gpu { stream, .. } => match buf.gpu_view_mut() {
            Some(view) => {
                let (addr, guard) = view.view_ptr_mut(stream);
                Ok((addr, Some(guard)))
            }
            None => Err(mismatch(what, memory, Memory::Gpu)),
        },
        #[cfg(feature = "emu")]
        Backend::Emulated => match buf.emu_addr() {
            Some(addr) => Ok((addr, None)),
            None => Err(mismatch(what, memory, Memory::Emulated)),
        },
    }
}

/// The cudarc view of a buffer an op on a GPU device reads (for cuBLAS or other cudarc calls), or
/// [`Error::DeviceMismatch`] naming `what` for emulated memory.
pub fn gpu_view<'a, T, B: DeviceRead<T> + ?Sized>(
    what: &'static str,
    buf: &'a B,
) -> Result<CudaView<'a, T>> {
    let memory = buf.memory();
    buf.gpu_view().ok_or(mismatch(what, memory, Memory::Gpu))
}

/// The mutable cudarc view of a buffer an op on a GPU device writes, or [`Error::DeviceMismatch`]
/// naming `what` for emulated memory.
pub fn gpu_view_mut<'a, T, B: DeviceWrite<T> + ?Sized>(
    what: &'static str,
    buf: &'a mut B,
) -> Result<CudaViewMut<'a, T>> {
    let memory = buf.memory();
    buf.gpu_view_mut()
        .ok_or(mismatch(what, memory, Memory::Gpu))
}

/// The address of a buffer an op on the emulated device uses, or [`Error::DeviceMismatch`].
#[cfg(feature = "emu")]
pub(crate) fn emu_addr<T, B: DeviceRead<T> + ?Sized>(what: &'static str, buf: &B) -> Result<u64> {
    buf.emu_addr()
        .ok_or(mismatch(what, buf.memory(), Memory::Emulated))
}

/// `start..end` of a range over `len` elements, or [`Error::OutOfBounds`].
fn bounds(range: impl RangeBounds<usize>, len: usize) -> Result<(usize, usize)> {
    let start = match range.start_bound() {
        Bound::Included(&s) => Some(s),
        Bound::Excluded(&s) => s.checked_add(1),
        Bound::Unbounded => Some(0),
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e.checked_add(1),
        Bound::Excluded(&e) => Some(e),
        Bound::Unbounded => Some(len),
    };
    match (start, end) {
        (Some(s), Some(e)) if s <= e && e <= len => Ok((s, e)),
        _ => Err(Error::OutOfBounds {
            start: start.unwrap_or(usize::MAX),
            end: end.unwrap_or(usize::MAX),
            len,
        }),
    }
}

/// The emulated address `start` elements past `addr`, for a `start` within the allocation (so the
/// offset fits, as the allocation's size did).
#[cfg(feature = "emu")]
fn offset<T>(addr: u64, start: usize) -> u64 {
    addr + (start * std::mem::size_of::<T>()) as u64
}

// ---------------------------------------------------------------------------------------------
// Buffer

/// Device memory owned by molora: a cudarc `CudaSlice` on a GPU device, or an allocation of the
/// emulated device (feature `emu`), freed on drop. Made by [`Device::upload`], [`Device::zeros`], or
/// from a `CudaSlice`; every element is initialised.
///
/// A buffer may be empty on both kinds of device. A GPU cannot allocate zero bytes, so an empty GPU
/// buffer holds a one-element allocation behind the scenes; its length, its views and the addresses
/// the ops take all have length 0 (only [`Buffer::as_cuda_slice`] and its siblings hand out that
/// allocation itself).
pub struct Buffer<T> {
    inner: BufferInner<T>,
}

enum BufferInner<T> {
    /// GPU memory of `len` elements: all of `slice`, or none of it for an empty buffer (whose slice
    /// is the one element a GPU must allocate). `len <= slice.len()` always.
    Gpu { slice: CudaSlice<T>, len: usize },
    #[cfg(feature = "emu")]
    Emu(EmuAlloc<T>),
}

impl<T> Buffer<T> {
    #[cfg(feature = "emu")]
    pub(crate) fn from_emu(alloc: EmuAlloc<T>) -> Self {
        Buffer {
            inner: BufferInner::Emu(alloc),
        }
    }

    /// An empty buffer over `placeholder`, the one element a GPU allocates for it.
    pub(crate) fn empty_gpu(placeholder: CudaSlice<T>) -> Self {
        Buffer {
            inner: BufferInner::Gpu {
                slice: placeholder,
                len: 0,
            },
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match &self.inner {
            BufferInner::Gpu { len, .. } => *len,
            #[cfg(feature = "emu")]
            BufferInner::Emu(a) => a.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether this is memory of the emulated device.
    pub fn is_emulated(&self) -> bool {
        self.memory() != Memory::Gpu
    }

    fn memory(&self) -> Memory {
        match &self.inner {
            BufferInner::Gpu { .. } => Memory::Gpu,
            #[cfg(feature = "emu")]
            BufferInner::Emu(_) => Memory::Emulated,
        }
    }

    /// A view of the whole buffer.
    pub fn view(&self) -> BufferView<'_, T> {
        BufferView {
            inner: match &self.inner {
                BufferInner::Gpu { slice, len } => ViewInner::Gpu(whole(slice, *len)),
                #[cfg(feature = "emu")]
                BufferInner::Emu(a) => ViewInner::Emu {
                    addr: a.addr(),
                    len: a.len(),
                    _marker: PhantomData,
                },
            },
        }
    }

    /// A mutable view of the whole buffer.
    pub fn view_mut(&mut self) -> BufferViewMut<'_, T> {
        BufferViewMut {
            inner: match &mut self.inner {
                BufferInner::Gpu { slice, len } => ViewMutInner::Gpu(whole_mut(slice, *len)),
                #[cfg(feature = "emu")]
                BufferInner::Emu(a) => ViewMutInner::Emu {
                    addr: a.addr(),
                    len: a.len(),
                    _marker: PhantomData,
                },
            },
        }
    }

    /// The elements `range`, or [`Error::OutOfBounds`].
    pub fn slice(&self, range: impl RangeBounds<usize>) -> Result<BufferView<'_, T>> {
        self.view().into_slice(range)
    }

    /// The elements `range`, mutably, or [`Error::OutOfBounds`].
    pub fn slice_mut(&mut self, range: impl RangeBounds<usize>) -> Result<BufferViewMut<'_, T>> {
        let len = self.len();
        let (start, end) = bounds(range, len)?;
        Ok(BufferViewMut {
            inner: match &mut self.inner {
                // `end <= len <= slice.len()`: within the logical length, so never the placeholder.
                BufferInner::Gpu { slice, .. } => ViewMutInner::Gpu(
                    slice.try_slice_mut(start..end).ok_or(Error::OutOfBounds {
                        start,
                        end,
                        len,
                    })?,
                ),
                #[cfg(feature = "emu")]
                BufferInner::Emu(a) => ViewMutInner::Emu {
                    addr: offset::<T>(a.addr(), start),
                    len: end - start,
                    _marker: PhantomData,
                },
            },
        })
    }

    /// The first `n` elements (all of them when `n` is at least the length): for buffers allocated
    /// one element longer than their contents.
    pub(crate) fn prefix(&self, n: usize) -> BufferView<'_, T> {
        let len = self.len();
        self.view()
            .into_slice(..n.min(len))
            .unwrap_or_else(|_| self.view())
    }

    /// The cudarc buffer of GPU memory; `None` for emulated memory. For an empty buffer it is the
    /// one-element allocation behind it (a GPU cannot allocate zero bytes), longer than the buffer.
    pub fn as_cuda_slice(&self) -> Option<&CudaSlice<T>> {
        match &self.inner {
            BufferInner::Gpu { slice, .. } => Some(slice),
            #[cfg(feature = "emu")]
            BufferInner::Emu(_) => None,
        }
    }

    /// The cudarc buffer of GPU memory, mutably; `None` for emulated memory. For an empty buffer it
    /// is the one-element allocation behind it, as for [`Buffer::as_cuda_slice`].
    pub fn as_cuda_slice_mut(&mut self) -> Option<&mut CudaSlice<T>> {
        match &mut self.inner {
            BufferInner::Gpu { slice, .. } => Some(slice),
            #[cfg(feature = "emu")]
            BufferInner::Emu(_) => None,
        }
    }

    /// The cudarc buffer of GPU memory, or [`Error::DeviceMismatch`] for emulated memory. For an
    /// empty buffer it is the one-element allocation behind it, as for [`Buffer::as_cuda_slice`].
    pub fn into_cuda_slice(self) -> Result<CudaSlice<T>> {
        match self.inner {
            BufferInner::Gpu { slice, .. } => Ok(slice),
            #[cfg(feature = "emu")]
            BufferInner::Emu(_) => Err(mismatch(
                "Buffer::into_cuda_slice",
                Memory::Emulated,
                Memory::Gpu,
            )),
        }
    }
}

impl<T> From<CudaSlice<T>> for Buffer<T> {
    /// A buffer of all of `slice`'s elements.
    fn from(slice: CudaSlice<T>) -> Self {
        let len = DeviceSlice::len(&slice);
        Buffer {
            inner: BufferInner::Gpu { slice, len },
        }
    }
}

/// The first `len` elements of `slice` (all but an empty buffer's placeholder), for `len <=
/// slice.len()`.
fn whole<T>(slice: &CudaSlice<T>, len: usize) -> CudaView<'_, T> {
    if len == DeviceSlice::len(slice) {
        slice.as_view()
    } else {
        slice.slice(..len)
    }
}

/// As [`whole`], mutably.
fn whole_mut<T>(slice: &mut CudaSlice<T>, len: usize) -> CudaViewMut<'_, T> {
    if len == DeviceSlice::len(slice) {
        slice.as_view_mut()
    } else {
        slice.slice_mut(..len)
    }
}

impl<T> fmt::Debug for Buffer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Buffer")
            .field("memory", &self.memory().name())
            .field("len", &self.len())
            .finish()
    }
}

impl<T> sealed::Read<T> for Buffer<T> {
    fn memory(&self) -> Memory {
        Buffer::memory(self)
    }
    fn gpu_view(&self) -> Option<CudaView<'_, T>> {
        match &self.inner {
            BufferInner::Gpu { slice, len } => Some(whole(slice, *len)),
            #[cfg(feature = "emu")]
            BufferInner::Emu(_) => None,
        }
    }
    #[cfg(feature = "emu")]
    fn emu_addr(&self) -> Option<u64> {
        match &self.inner {
            BufferInner::Gpu { .. } => None,
            BufferInner::Emu(a) => Some(a.addr()),
        }
    }
}
impl<T> sealed::Write<T> for Buffer<T> {
    fn gpu_view_mut(&mut self) -> Option<CudaViewMut<'_, T>> {
        match &mut self.inner {
            BufferInner::Gpu { slice, len } => Some(whole_mut(slice, *len)),
            #[cfg(feature = "emu")]
            BufferInner::Emu(_) => None,
        }
    }
}
impl<T> DeviceRead<T> for Buffer<T> {
    fn len(&self) -> usize {
        Buffer::len(self)
    }
}
impl<T> DeviceWrite<T> for Buffer<T> {}

// ---------------------------------------------------------------------------------------------
// Views

/// A borrowed range of device memory (of a [`Buffer`], or a cudarc `CudaView`).
pub struct BufferView<'a, T> {
    inner: ViewInner<'a, T>,
}

enum ViewInner<'a, T> {
    Gpu(CudaView<'a, T>),
    #[cfg(feature = "emu")]
    Emu {
        addr: u64,
        len: usize,
        _marker: PhantomData<&'a [T]>,
    },
}

impl<'a, T> BufferView<'a, T> {
    pub fn len(&self) -> usize {
        match &self.inner {
            ViewInner::Gpu(v) => v.len(),
            #[cfg(feature = "emu")]
            ViewInner::Emu { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether this is memory of the emulated device.
    pub fn is_emulated(&self) -> bool {
        !matches!(self.inner, ViewInner::Gpu(_))
    }

    /// The elements `range` of this view, or [`Error::OutOfBounds`].
    pub fn slice(&self, range: impl RangeBounds<usize>) -> Result<BufferView<'a, T>> {
        let (start, end) = bounds(range, self.len())?;
        let out_of_bounds = Error::OutOfBounds {
            start,
            end,
            len: self.len(),
        };
        Ok(BufferView {
            inner: match &self.inner {
                ViewInner::Gpu(v) => ViewInner::Gpu(v.try_slice(start..end).ok_or(out_of_bounds)?),
                #[cfg(feature = "emu")]
                ViewInner::Emu { addr, .. } => ViewInner::Emu {
                    addr: offset::<T>(*addr, start),
                    len: end - start,
                    _marker: PhantomData,
                },
            },
        })
    }

    fn into_slice(self, range: impl RangeBounds<usize>) -> Result<BufferView<'a, T>> {
        self.slice(range)
    }

    /// The cudarc view of GPU memory; `None` for emulated memory.
    pub fn as_cuda_view(&self) -> Option<&CudaView<'a, T>> {
        match &self.inner {
            ViewInner::Gpu(v) => Some(v),
            #[cfg(feature = "emu")]
            ViewInner::Emu { .. } => None,
        }
    }
}

impl<'a, T> From<CudaView<'a, T>> for BufferView<'a, T> {
    fn from(view: CudaView<'a, T>) -> Self {
        BufferView {
            inner: ViewInner::Gpu(view),
        }
    }
}

impl<T> fmt::Debug for BufferView<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufferView")
            .field("emulated", &self.is_emulated())
            .field("len", &self.len())
            .finish()
    }
}

impl<T> sealed::Read<T> for BufferView<'_, T> {
    fn memory(&self) -> Memory {
        match &self.inner {
            ViewInner::Gpu(_) => Memory::Gpu,
            #[cfg(feature = "emu")]
            ViewInner::Emu { .. } => Memory::Emulated,
        }
    }
    fn gpu_view(&self) -> Option<CudaView<'_, T>> {
        match &self.inner {
            ViewInner::Gpu(v) => v.try_slice(..),
            #[cfg(feature = "emu")]
            ViewInner::Emu { .. } => None,
        }
    }
    #[cfg(feature = "emu")]
    fn emu_addr(&self) -> Option<u64> {
        match &self.inner {
            ViewInner::Gpu(_) => None,
            ViewInner::Emu { addr, .. } => Some(*addr),
        }
    }
}
impl<T> DeviceRead<T> for BufferView<'_, T> {
    fn len(&self) -> usize {
        BufferView::len(self)
    }
}

/// A mutably borrowed range of device memory (of a [`Buffer`], or a cudarc `CudaViewMut`).
pub struct BufferViewMut<'a, T> {
    inner: ViewMutInner<'a, T>,
}

enum ViewMutInner<'a, T> {
    Gpu(CudaViewMut<'a, T>),
    #[cfg(feature = "emu")]
    Emu {
        addr: u64,
        len: usize,
        _marker: PhantomData<&'a mut [T]>,
    },
}

impl<'a, T> BufferViewMut<'a, T> {
    pub fn len(&self) -> usize {
        match &self.inner {
            ViewMutInner::Gpu(v) => v.len(),
            #[cfg(feature = "emu")]
            ViewMutInner::Emu { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether this is memory of the emulated device.
    pub fn is_emulated(&self) -> bool {
        !matches!(self.inner, ViewMutInner::Gpu(_))
    }

    /// The elements `range`, read-only, or [`Error::OutOfBounds`].
    pub fn slice(&self, range: impl RangeBounds<usize>) -> Result<BufferView<'_, T>> {
        self.as_view().into_slice(range)
    }

    /// The elements `range`, mutably, or [`Error::OutOfBounds`].
    pub fn slice_mut(&mut self, range: impl RangeBounds<usize>) -> Result<BufferViewMut<'_, T>> {
        let (start, end) = bounds(range, self.len())?;
        let out_of_bounds = Error::OutOfBounds {
            start,
            end,
            len: self.len(),
        };
        Ok(BufferViewMut {
            inner: match &mut self.inner {
                ViewMutInner::Gpu(v) => {
                    ViewMutInner::Gpu(v.try_slice_mut(start..end).ok_or(out_of_bounds)?)
                }
                #[cfg(feature = "emu")]
                ViewMutInner::Emu { addr, .. } => ViewMutInner::Emu {
                    addr: offset::<T>(*addr, start),
                    len: end - start,
                    _marker: PhantomData,
                },
            },
        })
    }

    /// A read-only view of the same memory.
    pub fn as_view(&self) -> BufferView<'_, T> {
        BufferView {
            inner: match &self.inner {
                ViewMutInner::Gpu(v) => ViewInner::Gpu(v.as_view()),
                #[cfg(feature = "emu")]
                ViewMutInner::Emu { addr, len, .. } => ViewInner::Emu {
                    addr: *addr,
                    len: *len,
                    _marker: PhantomData,
                },
            },
        }
    }
}

impl<'a, T> From<CudaViewMut<'a, T>> for BufferViewMut<'a, T> {
    fn from(view: CudaViewMut<'a, T>) -> Self {
        BufferViewMut {
            inner: ViewMutInner::Gpu(view),
        }
    }
}

impl<T> fmt::Debug for BufferViewMut<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufferViewMut")
            .field("emulated", &self.is_emulated())
            .field("len", &self.len())
            .finish()
    }
}

impl<T> sealed::Read<T> for BufferViewMut<'_, T> {
    fn memory(&self) -> Memory {
        match &self.inner {
            ViewMutInner::Gpu(_) => Memory::Gpu,
            #[cfg(feature = "emu")]
            ViewMutInner::Emu { .. } => Memory::Emulated,
        }
    }
    fn gpu_view(&self) -> Option<CudaView<'_, T>> {
        match &self.inner {
            ViewMutInner::Gpu(v) => Some(v.as_view()),
            #[cfg(feature = "emu")]
            ViewMutInner::Emu { .. } => None,
        }
    }
    #[cfg(feature = "emu")]
    fn emu_addr(&self) -> Option<u64> {
        match &self.inner {
            ViewMutInner::Gpu(_) => None,
            ViewMutInner::Emu { addr, .. } => Some(*addr),
        }
    }
}
impl<T> sealed::Write<T> for BufferViewMut<'_, T> {
    fn gpu_view_mut(&mut self) -> Option<CudaViewMut<'_, T>> {
        match &mut self.inner {
            ViewMutInner::Gpu(v) => v.try_slice_mut(..),
            #[cfg(feature = "emu")]
            ViewMutInner::Emu { .. } => None,
        }
    }
}
impl<T> DeviceRead<T> for BufferViewMut<'_, T> {
    fn len(&self) -> usize {
        BufferViewMut::len(self)
    }
}
impl<T> DeviceWrite<T> for BufferViewMut<'_, T> {}

// ---------------------------------------------------------------------------------------------
// cudarc's buffers (GPU memory)

impl<T> sealed::Read<T> for CudaSlice<T> {
    fn memory(&self) -> Memory {
        Memory::Gpu
    }
    fn gpu_view(&self) -> Option<CudaView<'_, T>> {
        Some(self.as_view())
    }
    #[cfg(feature = "emu")]
    fn emu_addr(&self) -> Option<u64> {
        None
    }
}
impl<T> sealed::Write<T> for CudaSlice<T> {
    fn gpu_view_mut(&mut self) -> Option<CudaViewMut<'_, T>> {
        Some(self.as_view_mut())
    }
}
impl<T> DeviceRead<T> for CudaSlice<T> {
    fn len(&self) -> usize {
        DeviceSlice::len(self)
    }
}
impl<T> DeviceWrite<T> for CudaSlice<T> {}

impl<T> sealed::Read<T> for CudaView<'_, T> {
    fn memory(&self) -> Memory {
        Memory::Gpu
    }
    fn gpu_view(&self) -> Option<CudaView<'_, T>> {
        self.try_slice(..)
    }
    #[cfg(feature = "emu")]
    fn emu_addr(&self) -> Option<u64> {
        None
    }
}
impl<T> DeviceRead<T> for CudaView<'_, T> {
    fn len(&self) -> usize {
        CudaView::len(self)
    }
}

impl<T> sealed::Read<T> for CudaViewMut<'_, T> {
    fn memory(&self) -> Memory {
        Memory::Gpu
    }
    fn gpu_view(&self) -> Option<CudaView<'_, T>> {
        Some(self.as_view())
    }
    #[cfg(feature = "emu")]
    fn emu_addr(&self) -> Option<u64> {
        None
    }
}
impl<T> sealed::Write<T> for CudaViewMut<'_, T> {
    fn gpu_view_mut(&mut self) -> Option<CudaViewMut<'_, T>> {
        self.try_slice_mut(..)
    }
}
impl<T> DeviceRead<T> for CudaViewMut<'_, T> {
    fn len(&self) -> usize {
        CudaViewMut::len(self)
    }
}
impl<T> DeviceWrite<T> for CudaViewMut<'_, T> {}

#[cfg(test)]
mod tests {
    use super::bounds;
    use crate::Error;

    #[test]
    fn ranges_resolve_or_name_the_bad_range() {
        assert_eq!(bounds(.., 5), Ok((0, 5)));
        assert_eq!(bounds(1..=3, 5), Ok((1, 4)));
        assert_eq!(bounds(5.., 5), Ok((5, 5)));
        assert_eq!(bounds(..0, 0), Ok((0, 0)));
        assert_eq!(
            bounds(2..6, 5),
            Err(Error::OutOfBounds {
                start: 2,
                end: 6,
                len: 5
            })
        );
        let (start, end) = (3, 1);
        assert_eq!(
            bounds(start..end, 5),
            Err(Error::OutOfBounds {
                start: 3,
                end: 1,
                len: 5
            })
        );
        assert_eq!(
            bounds(..=usize::MAX, 5),
            Err(Error::OutOfBounds {
                start: 0,
                end: usize::MAX,
                len: 5
            })
        );
        let excluded = (
            std::ops::Bound::Excluded(usize::MAX),
            std::ops::Bound::Unbounded,
        );
        assert!(matches!(
            bounds(excluded, 5),
            Err(Error::OutOfBounds {
                start: usize::MAX,
                ..
            })
        ));
    }
}
