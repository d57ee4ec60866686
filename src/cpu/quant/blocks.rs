//! The block layouts every quantized kernel here shares (the plain ones in `mod.rs` and
//! `kquants.rs`, `avx2.rs`, `vnni.rs`, `vnni_k.rs`): GGML's weight blocks (Q4_0, Q4_1, Q5_0,
//! Q8_0 of 32 values; Q4_K, Q5_K, Q6_K super-blocks of 256), braid's blocks of quantized
//! activations (Q8_0-like for the first, Q8_K for the second), and what a weight block type must
//! provide. The kernels import these and not each other.

use half::f16;

pub const QK: usize = 32;
/// Values in a K-quant super-block.
pub const QK_K: usize = 256;

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

/// Q5_0: 5-bit values `q - 16`; bit `e` of `qh` is the fifth bit of element `e`.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ5_0 {
    pub d: f16,
    pub qh: u32,
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

/// Q4_K: 8 sub-blocks of 32 4-bit values, each with a 6-bit scale and minimum (value
/// `d * scale * q - dmin * min`). GGUF packs the scales and minimums in 12 bytes; they are
/// unpacked here at load.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ4K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 8],
    pub mins: [u8; 8],
    /// Bytes `32j..32j + 32`: low nibbles are values `64j..64j + 32`, high nibbles the next 32.
    pub qs: [u8; QK_K / 2],
}

/// Q5_K: Q4_K with a fifth bit per value, bit `s` of `qh[l]` for value `32s + l`.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ5K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 8],
    pub mins: [u8; 8],
    pub qh: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 2],
}

/// Q6_K: 16 sub-blocks of 16 6-bit values `q - 32`, each with a signed 8-bit scale.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ6K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [i8; QK_K / 16],
    pub d: f16,
}

/// One super-block of activations quantized as llama.cpp's Q8_K: scale, quants, and the sums
/// of each 16 quants (for the minimums of Q4_K and Q5_K).
#[derive(Clone, Copy, Debug)]
pub struct ActBlockK {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}

impl Default for ActBlockK {
    fn default() -> Self {
        Self { d: 0.0, qs: [0; QK_K], bsums: [0; QK_K / 16] }
    }
}

/// A block of quantized activations: how many values it holds and how a row is quantized.
pub trait ActQuant: Copy + Default + Send + Sync {
    const SIZE: usize;
    /// Quantizes `x` (a whole number of blocks) into `out`.
    fn quantize(x: &[f32], out: &mut [Self]);
}

/// A weight block type with a dot product against quantized activations.
pub trait WeightBlock: Sync + Sized {
    /// The activation blocks it meets (as llama.cpp pairs them: Q8_0 or Q8_1 for 32-value
    /// blocks, Q8_K for super-blocks), of as many values as a weight block.
    type Act: ActQuant;
    fn dot(w: &[Self], a: &[Self::Act]) -> f32;
    /// The same with AVX2, for `R` activation rows at once.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn dot_avx2<const R: usize>(w: &[Self], a: [&[Self::Act]; R]) -> [f32; R];
}

/// Element `e` of a 4-bit block: low nibbles are elements 0..16, high nibbles 16..32.
#[inline(always)]
pub(super) fn nibble(qs: &[u8; QK / 2], e: usize) -> u8 {
    if e < QK / 2 { qs[e] & 0x0F } else { qs[e - QK / 2] >> 4 }
}

/// Element `e` of a Q5_0 block as stored: 0..32 (the value plus 16).
#[inline(always)]
pub(super) fn five_bits(b: &BlockQ5_0, e: usize) -> u8 {
    nibble(&b.qs, e) | (((b.qh >> e) & 1) as u8) << 4
}

/// Value `e` (0..256) of a Q4_K or Q5_K super-block's 4 low bits.
#[inline(always)]
pub(super) fn k_nibble(qs: &[u8; QK_K / 2], e: usize) -> u8 {
    let byte = qs[(e / 64) * 32 + e % 32];
    if e % 64 < 32 { byte & 0x0F } else { byte >> 4 }
}

/// Value `e` of a Q5_K super-block: 0..32 (no offset: its minimum is subtracted).
#[inline(always)]
pub(super) fn q5k_value(b: &BlockQ5K, e: usize) -> u8 {
    k_nibble(&b.qs, e) | ((b.qh[e % 32] >> (e / 32)) & 1) << 4
}

/// Value `e` of a Q6_K super-block as stored: 0..64 (the value plus 32).
#[inline(always)]
pub(super) fn q6k_stored(b: &BlockQ6K, e: usize) -> u8 {
    let (half, t) = (e / 128, e % 128);
    let (quarter, l) = (t / 32, t % 32);
    let byte = b.ql[64 * half + 32 * (quarter % 2) + l];
    let low = if quarter < 2 { byte & 0x0F } else { byte >> 4 };
    low | ((b.qh[32 * half + l] >> (2 * quarter)) & 3) << 4
}
