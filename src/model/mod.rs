//! Model assembly on candle (feature `candle`): [`MoleLinear`](linear::MoleLinear), the models built
//! from it (HDMoLE's [`LlmAsr`](llm_asr::LlmAsr) speech recogniser and frame-level
//! [`AsrModel`](hdmole::AsrModel), SAML's [`SamlModel`](saml::SamlModel), LoRB's
//! [`Rescorer`](lorb::Rescorer)), and weights in safetensors (our expert files and PEFT LoRA
//! adapters). The demos that train them are in [`crate::demo`].

pub mod hdmole;
pub mod inspect;
pub mod linear;
pub mod llm_asr;
pub mod lorb;
pub mod nn;
pub mod saml;
pub mod weights;
