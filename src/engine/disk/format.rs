//! One KV block on disk: a fixed header (what produced it and what it is named), the block's
//! K and V bytes, and a checksum of everything before it.
//!
//! ```text
//! magic "BRAIDKV\0" | format u32 | kv dtype u32 (1 = f16) | identity (40 bytes) | block hash u64
//! | payload length u64 | model name (64 bytes, informational) | payload | xxh3-64 of all before
//! ```
//!
//! All integers are little-endian. The payload is, layer by layer, the block's K then its V
//! (`block_size × n_kv_head × head_dim` f16 values each), exactly as they sit in memory.

use xxhash_rust::xxh3::xxh3_64;

const MAGIC: &[u8; 8] = b"BRAIDKV\0";
/// Bumped whenever the layout above, or how K/V are computed, changes incompatibly.
const FORMAT_VERSION: u32 = 1;
const DTYPE_F16: u32 = 1;
const IDENTITY_LEN: usize = 40;
const NAME_LEN: usize = 64;
pub const HEADER_LEN: usize = 8 + 4 + 4 + IDENTITY_LEN + 8 + 8 + NAME_LEN;
const CHECKSUM_LEN: usize = 8;

/// Everything that decides whether a stored block can stand in for a computed one: the model
/// (a fingerprint of its GGUF file: metadata, tensor names, types and shapes, and a sample of
/// the weights, so another quantization or fine-tune differs), the KV layout, and the
/// attention window (K/V computed under a window differ from those computed without).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub fingerprint: u128,
    pub block_size: u32,
    pub n_layer: u32,
    pub n_kv_head: u32,
    pub head_dim: u32,
    /// `--max-kv-size`, 0 for none.
    pub window: u32,
}

impl Identity {
    fn encode(&self) -> [u8; IDENTITY_LEN] {
        let mut out = [0u8; IDENTITY_LEN];
        out[..16].copy_from_slice(&self.fingerprint.to_le_bytes());
        for (i, v) in [self.block_size, self.n_layer, self.n_kv_head, self.head_dim, self.window].iter().enumerate() {
            out[16 + 4 * i..20 + 4 * i].copy_from_slice(&v.to_le_bytes());
        }
        out
    }

    fn decode(bytes: &[u8]) -> Self {
        let u = |i: usize| u32::from_le_bytes(bytes[16 + 4 * i..20 + 4 * i].try_into().expect("4 bytes"));
        Self {
            fingerprint: u128::from_le_bytes(bytes[..16].try_into().expect("16 bytes")),
            block_size: u(0),
            n_layer: u(1),
            n_kv_head: u(2),
            head_dim: u(3),
            window: u(4),
        }
    }

    /// The name of the folder holding this identity's blocks.
    pub fn folder_name(&self) -> String {
        format!("{:016x}", xxh3_64(&self.encode()))
    }

    /// Bytes of one block's K and V across all layers.
    pub fn payload_len(&self) -> usize {
        2 * self.n_layer as usize * self.block_size as usize * self.n_kv_head as usize * self.head_dim as usize * 2
    }

    /// Bytes of one block's file.
    pub fn file_len(&self) -> usize {
        HEADER_LEN + self.payload_len() + CHECKSUM_LEN
    }
}

/// What the header of a block file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub identity: Identity,
    pub hash: u64,
    pub payload_len: u64,
    pub model_name: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("not a braid KV block file")]
    BadMagic,
    #[error("block file format {0}, this braid reads {FORMAT_VERSION}")]
    Version(u32),
    #[error("KV dtype {0} is not f16")]
    Dtype(u32),
    #[error("written by another model, quantization, block size or attention window")]
    OtherModel,
    #[error("holds block {found:016x}, not {expected:016x}")]
    OtherBlock { expected: u64, found: u64 },
    #[error("truncated: {actual} bytes, expected {expected}")]
    Truncated { expected: usize, actual: usize },
    #[error("checksum mismatch")]
    Checksum,
}

/// The bytes of a block file.
pub fn encode(identity: &Identity, hash: u64, model_name: &str, payload: &[u8]) -> Vec<u8> {
    debug_assert_eq!(payload.len(), identity.payload_len());
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + CHECKSUM_LEN);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&DTYPE_F16.to_le_bytes());
    out.extend_from_slice(&identity.encode());
    out.extend_from_slice(&hash.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    let mut name = [0u8; NAME_LEN];
    // Cut at a character boundary, so the stored name stays valid UTF-8.
    let mut end = model_name.len().min(NAME_LEN);
    while !model_name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].copy_from_slice(&model_name.as_bytes()[..end]);
    out.extend_from_slice(&name);
    out.extend_from_slice(payload);
    let sum = xxh3_64(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

/// Parses a header (the first `HEADER_LEN` bytes of a file; fewer is truncation).
pub fn read_header(bytes: &[u8]) -> Result<Header, FormatError> {
    if bytes.len() < HEADER_LEN {
        return Err(FormatError::Truncated { expected: HEADER_LEN, actual: bytes.len() });
    }
    if &bytes[..8] != MAGIC {
        return Err(FormatError::BadMagic);
    }
    let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
    let version = u32_at(8);
    if version != FORMAT_VERSION {
        return Err(FormatError::Version(version));
    }
    let dtype = u32_at(12);
    if dtype != DTYPE_F16 {
        return Err(FormatError::Dtype(dtype));
    }
    let identity = Identity::decode(&bytes[16..16 + IDENTITY_LEN]);
    let at = 16 + IDENTITY_LEN;
    let name = &bytes[at + 16..at + 16 + NAME_LEN];
    let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(NAME_LEN)];
    Ok(Header {
        identity,
        hash: u64_at(at),
        payload_len: u64_at(at + 8),
        model_name: String::from_utf8_lossy(name).into_owned(),
    })
}

/// Checks a header against what the reader expects, given the file's length: the same
/// identity, the named block, and the length that identity implies.
pub fn check_header(header: &Header, identity: &Identity, hash: u64, file_len: usize) -> Result<(), FormatError> {
    if header.identity != *identity || header.payload_len != identity.payload_len() as u64 {
        return Err(FormatError::OtherModel);
    }
    if header.hash != hash {
        return Err(FormatError::OtherBlock { expected: hash, found: header.hash });
    }
    if file_len != identity.file_len() {
        return Err(FormatError::Truncated { expected: identity.file_len(), actual: file_len });
    }
    Ok(())
}

/// Verifies a whole block file and returns its payload.
pub fn decode<'a>(bytes: &'a [u8], identity: &Identity, hash: u64) -> Result<&'a [u8], FormatError> {
    let header = read_header(bytes)?;
    check_header(&header, identity, hash, bytes.len())?;
    let (body, sum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
    if xxh3_64(body).to_le_bytes() != sum {
        return Err(FormatError::Checksum);
    }
    Ok(&body[HEADER_LEN..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        Identity {
            fingerprint: 0x1234_5678_9abc_def0_1122_3344_5566_7788,
            block_size: 4,
            n_layer: 2,
            n_kv_head: 1,
            head_dim: 2,
            window: 0,
        }
    }

    fn payload(id: &Identity) -> Vec<u8> {
        (0..id.payload_len()).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn a_block_round_trips() {
        let id = identity();
        let bytes = encode(&id, 42, "SmolLM2 135M", &payload(&id));
        assert_eq!(bytes.len(), id.file_len());
        assert_eq!(decode(&bytes, &id, 42), Ok(&payload(&id)[..]));
        let header = read_header(&bytes).unwrap();
        assert_eq!((header.hash, header.model_name.as_str()), (42, "SmolLM2 135M"));
    }

    #[test]
    fn a_flipped_bit_fails_the_checksum() {
        let id = identity();
        for at in [HEADER_LEN + 3, HEADER_LEN - 10, id.file_len() - 1] {
            let mut bytes = encode(&id, 42, "m", &payload(&id));
            bytes[at] ^= 0x10;
            assert_eq!(decode(&bytes, &id, 42), Err(FormatError::Checksum), "byte {at}");
        }
    }

    #[test]
    fn truncated_files_are_refused() {
        let id = identity();
        let bytes = encode(&id, 42, "m", &payload(&id));
        for len in [0, 5, HEADER_LEN, bytes.len() - 1] {
            assert!(matches!(decode(&bytes[..len], &id, 42), Err(FormatError::Truncated { .. })), "{len} bytes");
        }
    }

    #[test]
    fn other_models_block_sizes_and_windows_are_refused() {
        let id = identity();
        let bytes = encode(&id, 42, "m", &payload(&id));
        for other in [
            Identity { fingerprint: id.fingerprint ^ 1, ..id },
            Identity { block_size: 8, ..id },
            Identity { window: 64, ..id },
            Identity { n_kv_head: 2, ..id },
        ] {
            assert_eq!(decode(&bytes, &other, 42), Err(FormatError::OtherModel));
            assert_ne!(other.folder_name(), id.folder_name());
        }
        assert_eq!(decode(&bytes, &id, 43), Err(FormatError::OtherBlock { expected: 43, found: 42 }));
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert_eq!(decode(&bad, &id, 42), Err(FormatError::BadMagic));
    }

    #[test]
    fn long_model_names_are_cut_at_a_character_boundary() {
        let id = identity();
        let name = "é".repeat(40);
        let header = read_header(&encode(&id, 1, &name, &payload(&id))).unwrap();
        assert_eq!(header.model_name, "é".repeat(32));
    }
}
