//! The block layouts every quantized kernel here shares (the plain ones in `mod.rs`, `avx2.rs`,
//! `vnni.rs`): GGML's weight blocks (Q4_0, Q4_1, Q8_0), braid's block of quantized activations,
//! and what a weight block type must provide. The kernels import these and not each other.

use half::f16;

pub const QK: usize = 32;

#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ4_0 {
    pub d: f16,
    pub qs: [u8; QK / 2],
}

#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; QK / 2],
}

#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; QK],
}

/// One quantized block of activations: scale, scale * sum of quants (for Q4_1's offset), quants.
#[derive(Clone, Copy, Debug)]
pub struct ActBlock {
    pub d: f32,
    pub s: f32,
    pub qs: [i8; QK],
}

impl Default for ActBlock {
    fn default() -> Self {
        Self { d: 0.0, s: 0.0, qs: [0; QK] }
    }
}

/// A weight block type with a dot product against quantized activations.
pub trait WeightBlock: Sync + Sized {
    fn dot(w: &[Self], a: &[ActBlock]) -> f32;
    /// The same with AVX2, for `R` activation rows at once.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn dot_avx2<const R: usize>(w: &[Self], a: [&[ActBlock]; R]) -> [f32; R];
}

/// Element `e` of a 4-bit block: low nibbles are elements 0..16, high nibbles 16..32.
#[inline(always)]
pub(super) fn nibble(qs: &[u8; QK / 2], e: usize) -> u8 {
    if e < QK / 2 { qs[e] & 0x0F } else { qs[e - QK / 2] >> 4 }
}
