//! The candle integration (feature `candle`): conversions between candle tensors and the crate's
//! slices, and the MoLE operations as candle custom ops.

use crate::error::Error;

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(e.to_string())
    }
}

impl From<Error> for candle_core::Error {
    fn from(e: Error) -> Self {
        candle_core::Error::Msg(e.to_string())
    }
}

#[cfg(feature = "candle-cuda")]
mod cuda_ops;
pub mod ops;
