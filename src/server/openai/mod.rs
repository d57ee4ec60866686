//! The wire format of the HTTP API (OpenAI's, with vLLM's /tokenize and /detokenize): request
//! bodies as parsed (request.rs) and response bodies as sent (response.rs). Their `ToSchema`
//! derives make the OpenAPI document (openapi.rs), so it describes what is really accepted and
//! sent.

pub mod request;
pub mod response;
#[cfg(test)]
mod tests;

pub use request::*;
pub use response::*;
