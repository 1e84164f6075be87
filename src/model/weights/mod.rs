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
//!
//! The parts: [`PeftConfig`] and its parsing and validation (`crate::peft`), PEFT adapters and
//! [`LoraPair`] (`peft.rs`), [`stack_experts`] (`stack.rs`), our safetensors files and the tensor
//! conversions (`files.rs`); [`inspect`] is in [`crate::model::inspect`].

use std::path::Path;

use crate::error::{Error, Result};

mod files;
mod peft;
mod stack;

pub use crate::peft::PeftConfig;
pub use files::{load_tensors, save_tensors, MOLORA_METADATA_KEY};
pub(crate) use peft::split_lora_key;
pub use peft::{
    load_peft_adapter, save_peft_adapter, LoraPair, PeftAdapter, ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE, PEFT_A_SUFFIX, PEFT_B_SUFFIX, PEFT_KEY_PREFIX,
};
pub use stack::stack_experts;

/// `inspect` lives in [`crate::model::inspect`]; it stays reachable here, where it used to be.
pub use super::inspect::inspect;

use crate::peft::weights_err;

fn io_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| io_err(path, e))
}
