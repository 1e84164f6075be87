//! The candle integration (feature `candle`): conversions between candle tensors and the crate's
//! slices, and the MoLE operations as candle custom ops.
//!
//! Errors keep their type through candle: a [`molora::Error`](crate::Error) raised inside an op
//! travels in `candle_core::Error::WrappedContext` (candle's variant for a typed error), and
//! [`Error::from_candle`] or the `From<candle_core::Error>` conversion gives it back unchanged, so
//! a caller can `match` on it after `Tensor::apply_op*`, `MoleLinear::forward` or `backward`.

use crate::error::Error;

/// The context candle prints under a wrapped molora error.
const CONTEXT: &str = "raised by molora";

/// The molora error as candle carries it: its `Debug` is the error's message, because candle shows
/// a wrapped error with `{:?}`.
struct Wrapped(Error);

impl std::fmt::Debug for Wrapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl std::fmt::Display for Wrapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for Wrapped {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

impl Error {
    /// The molora error inside a candle error, if it carries one: looks through candle's backtrace,
    /// context and path wrappers to the wrapped error.
    pub fn from_candle(e: &candle_core::Error) -> Option<&Error> {
        match e {
            candle_core::Error::WrappedContext { wrapped, .. } => {
                let inner: &(dyn std::error::Error + 'static) = wrapped.as_ref();
                match inner.downcast_ref::<Wrapped>() {
                    Some(w) => Some(&w.0),
                    None => inner.downcast_ref::<Error>(),
                }
            }
            candle_core::Error::WithBacktrace { inner, .. }
            | candle_core::Error::Context { inner, .. }
            | candle_core::Error::WithPath { inner, .. } => Error::from_candle(inner),
            _ => None,
        }
    }
}

/// A candle error as a molora error: the molora error it carries (unchanged), else
/// [`Error::Candle`] with candle's message.
impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        match Error::from_candle(&e) {
            Some(inner) => inner.clone(),
            None => Error::Candle(e.to_string()),
        }
    }
}

/// A molora error as a candle error that keeps its type ([`Error::from_candle`] recovers it).
impl From<Error> for candle_core::Error {
    fn from(e: Error) -> Self {
        candle_core::Error::WrappedContext {
            wrapped: Box::new(Wrapped(e)),
            context: CONTEXT.to_string(),
        }
        .bt()
    }
}

#[cfg(feature = "candle-cuda")]
mod cuda_ops;
pub mod ops;
