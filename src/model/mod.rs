//! Model assembly on candle (feature `candle`): [`MoleLinear`](linear::MoleLinear), the HDMoLE model
//! and its demo, and weights in safetensors (our expert files and PEFT LoRA adapters).

pub mod demo;
pub mod hdmole;
pub mod linear;
pub mod lorb;
pub mod saml;
pub mod saml_demo;
pub mod weights;
