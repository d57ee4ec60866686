//! The wire format of the HTTP API (OpenAI's): request bodies as parsed (request.rs).

pub mod request;

pub use request::*;
