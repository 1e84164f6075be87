//! The CUDA path (in progress).
