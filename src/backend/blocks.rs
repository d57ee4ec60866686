//! KV-cache blocks as the engine names them and the disk tier moves them.

use half::f16;

/// A KV-cache block: an index into the backend's pool of blocks.
pub type BlockId = u32;

/// Where a backend keeps its KV blocks, as the disk tier reads and fills them. A block's bytes
/// are its K and V, layer by layer, K then V, f16 little-endian, whatever holds them.
pub trait BlockStore {
    fn block_bytes(&self, id: BlockId) -> Result<Vec<u8>, String>;
    /// Fills a block from bytes laid out as `block_bytes` makes them.
    fn fill_block(&mut self, id: BlockId, bytes: &[u8]) -> Result<(), String>;
}

/// Appends `values` to `out` as a block's bytes hold them: f16 little-endian.
pub fn push_f16_bytes(values: &[f16], out: &mut Vec<u8>) {
    out.extend(values.iter().flat_map(|x| x.to_bits().to_le_bytes()));
}

/// Fills `values` from bytes as `push_f16_bytes` writes them (twice as many).
pub fn read_f16_bytes(bytes: &[u8], values: &mut [f16]) {
    assert_eq!(bytes.len(), 2 * values.len());
    for (dst, b) in values.iter_mut().zip(bytes.chunks_exact(2)) {
        *dst = f16::from_bits(u16::from_le_bytes([b[0], b[1]]));
    }
}
