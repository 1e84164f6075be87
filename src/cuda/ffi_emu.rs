//! The raw C ABI of the emulated CUDA device (`cuda/include/molora_emu.h`, feature `emu`), generated
//! by bindgen at build time: a twin `molora_emu_X` of every launcher `molora_X` of
//! [`super::ffi`] (same argument structs, the stream ignored, the launch run to completion on the
//! calling thread) and the emulator's memory API. Prefer the safe wrappers of [`crate::cuda`] on
//! [`Device::emulated`](crate::cuda::Device::emulated).
#![allow(
    non_camel_case_types,
    non_upper_case_globals,
    non_snake_case,
    dead_code
)]
#![allow(clippy::all)]

#[allow(unused_imports)]
use super::ffi::*;

include!(concat!(env!("OUT_DIR"), "/molora_emu_ffi.rs"));
