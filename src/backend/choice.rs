//! How one row's token is chosen where the logits are: the contract between the engine's
//! sampler and a backend that can pick tokens itself (the CUDA runner), and the parameters of
//! a random draw (`cpu::draw` computes it; the GPU's `sample_rows` kernel computes the same).

/// Temperatures below this are greedy (vLLM's `_SAMPLING_EPS`). Below it `1 / T` grows without
/// bound: at 1e-40 it overflows f32, `0 * inf` makes the best token's weight NaN, and nothing
/// could be drawn; at the floor the next token is already 1e5 x its logit gap less likely.
pub const MIN_TEMPERATURE: f32 = 1e-5;

/// Whether this temperature takes the first maximum: below the floor, or not a number.
pub fn is_greedy(temperature: f32) -> bool {
    temperature.is_nan() || temperature < MIN_TEMPERATURE
}

/// What a random draw needs of a request's sampling parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DrawParams {
    /// At least `MIN_TEMPERATURE` (below it, greedy: the draw takes the first maximum).
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1 disables.
    pub top_p: f32,
    /// 0 disables.
    pub min_p: f32,
}

/// Who chooses one row's token when the backend can choose on its device.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RowChoice {
    /// The device: the first maximum.
    Greedy,
    /// The device: `cpu::draw::draw(row, params, uniform)`.
    Random { params: DrawParams, uniform: f32 },
    /// The host's sampler (penalties, bias or alternatives): the row's logits come back.
    Host,
}
