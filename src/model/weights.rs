//! Weights on disk: safetensors files of experts and routers, PEFT LoRA adapters.
