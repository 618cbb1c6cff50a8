//! holdfast
#![forbid(unsafe_code)]
pub mod keys;
pub mod proto;
