//! The on-disk layout of one object: a body file (a short header, then the body as received) and
//! a meta file (the primary key, pingora's serialized meta, and a CRC-32 per body block). The two
//! are bound by an id that both carry, so a meta never describes another fill's body, and a meta
//! can be replaced on its own (a revalidation) with one rename.
//!
//! Every field of the meta file is covered by its own checksum; each body block is checked
//! against its CRC when it is read, before any of it is sent.

pub use crate::reason::Corrupt;

/// The unit of body checksums and of disk reads.
pub const BLOCK: usize = 128 << 10;
/// Bytes before the body in a body file.
pub const BODY_HEADER: usize = 32;

const BODY_MAGIC: &[u8; 8] = b"MEDGBDY1";
const META_MAGIC: &[u8; 8] = b"MEDGMET1";

/// Identifies one fill: the process, the time and a counter, unique across processes sharing a
/// directory.
pub type FillId = [u8; 16];

/// The body file's header.
pub fn body_header(id: &FillId) -> [u8; BODY_HEADER] {
    let mut h = [0u8; BODY_HEADER];
    h[..8].copy_from_slice(BODY_MAGIC);
    h[8..24].copy_from_slice(id);
    h
}

/// The id in a body file's header.
pub fn body_id(header: &[u8]) -> Result<FillId, Corrupt> {
    if header.len() < BODY_HEADER {
        return Err(Corrupt::Truncated);
    }
    if &header[..8] != BODY_MAGIC {
        return Err(Corrupt::Magic);
    }
    let mut id = [0u8; 16];
    id.copy_from_slice(&header[8..24]);
    Ok(id)
}

/// What a meta file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub id: FillId,
    pub body_len: u64,
    /// The primary key as text, for purges by URL and prefix.
    pub primary: String,
    /// `CacheMeta::serialize`'s two parts.
    pub internal: Vec<u8>,
    pub header: Vec<u8>,
    /// One CRC-32 per `BLOCK` of the body, the last one over what is left.
    pub crcs: Vec<u32>,
}

/// How many blocks a body of `len` bytes has.
pub fn blocks(len: u64) -> usize {
    len.div_ceil(BLOCK as u64) as usize
}

impl Meta {
    pub fn encode(&self) -> Vec<u8> {
        let mut b =
            Vec::with_capacity(64 + self.primary.len() + self.internal.len() + self.header.len() + 4 * self.crcs.len());
        b.extend_from_slice(META_MAGIC);
        b.extend_from_slice(&[0; 4]); // the checksum, filled in below
        b.extend_from_slice(&self.id);
        b.extend_from_slice(&self.body_len.to_le_bytes());
        for part in [self.primary.as_bytes(), &self.internal, &self.header] {
            b.extend_from_slice(&(part.len() as u32).to_le_bytes());
            b.extend_from_slice(part);
        }
        b.extend_from_slice(&(self.crcs.len() as u32).to_le_bytes());
        for c in &self.crcs {
            b.extend_from_slice(&c.to_le_bytes());
        }
        let crc = crc32fast::hash(&b[12..]);
        b[8..12].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Meta, Corrupt> {
        if b.len() < 12 {
            return Err(Corrupt::Truncated);
        }
        if &b[..8] != META_MAGIC {
            return Err(Corrupt::Magic);
        }
        if crc32fast::hash(&b[12..]).to_le_bytes() != b[8..12] {
            return Err(Corrupt::Checksum);
        }
        let mut r = Reader(&b[12..]);
        let id: FillId = r.take(16)?.try_into().map_err(|_| Corrupt::Truncated)?;
        let body_len = u64::from_le_bytes(r.take(8)?.try_into().map_err(|_| Corrupt::Truncated)?);
        let primary = String::from_utf8(r.part()?.to_vec()).map_err(|_| Corrupt::Fields)?;
        let internal = r.part()?.to_vec();
        let header = r.part()?.to_vec();
        let n = r.u32()? as usize;
        if n != blocks(body_len) {
            return Err(Corrupt::Fields);
        }
        let crcs = (0..n).map(|_| r.u32()).collect::<Result<Vec<_>, _>>()?;
        if !r.0.is_empty() {
            return Err(Corrupt::Fields);
        }
        Ok(Meta {
            id,
            body_len,
            primary,
            internal,
            header,
            crcs,
        })
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Corrupt> {
        if self.0.len() < n {
            return Err(Corrupt::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32, Corrupt> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().map_err(|_| Corrupt::Truncated)?,
        ))
    }

    fn part(&mut self) -> Result<&'a [u8], Corrupt> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

/// CRC-32s of a body as it streams in, one per `BLOCK`, whatever the sizes of the pieces.
#[derive(Default)]
pub struct BlockSums {
    hasher: crc32fast::Hasher,
    in_block: usize,
    pub crcs: Vec<u32>,
}

impl BlockSums {
    pub fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let n = (BLOCK - self.in_block).min(data.len());
            self.hasher.update(&data[..n]);
            self.in_block += n;
            data = &data[n..];
            if self.in_block == BLOCK {
                let done = std::mem::take(&mut self.hasher);
                self.crcs.push(done.finalize());
                self.in_block = 0;
            }
        }
    }

    /// The sums, the last partial block included.
    pub fn finish(mut self) -> Vec<u32> {
        if self.in_block > 0 {
            self.crcs.push(self.hasher.finalize());
        }
        self.crcs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(body_len: u64) -> Meta {
        Meta {
            id: *b"0123456789abcdef",
            body_len,
            primary: "fw.example/a.bin".into(),
            internal: vec![1, 2, 3],
            header: vec![4, 5],
            crcs: vec![7; blocks(body_len)],
        }
    }

    #[test]
    fn meta_round_trips_and_any_flipped_byte_is_caught() {
        let m = meta(3 * BLOCK as u64 + 1);
        let b = m.encode();
        assert_eq!(Meta::decode(&b), Ok(m));
        for i in 0..b.len() {
            let mut bad = b.clone();
            bad[i] ^= 0x40;
            assert!(Meta::decode(&bad).is_err(), "byte {i} flipped was accepted");
        }
        for n in 0..b.len() {
            assert!(Meta::decode(&b[..n]).is_err(), "truncated to {n} was accepted");
        }
    }

    #[test]
    fn block_sums_do_not_depend_on_how_the_body_was_cut() {
        let body: Vec<u8> = (0..(2 * BLOCK + 77)).map(|i| (i * 7) as u8).collect();
        let mut whole = BlockSums::default();
        whole.update(&body);
        let mut pieces = BlockSums::default();
        for piece in body.chunks(1000) {
            pieces.update(piece);
        }
        let want: Vec<u32> = body.chunks(BLOCK).map(crc32fast::hash).collect();
        assert_eq!(whole.finish(), want);
        assert_eq!(pieces.finish(), want);
    }

    #[test]
    fn body_headers_carry_the_id() {
        let id = *b"fedcba9876543210";
        assert_eq!(body_id(&body_header(&id)), Ok(id));
        assert_eq!(body_id(&[0u8; BODY_HEADER]), Err(Corrupt::Magic));
        assert_eq!(body_id(&body_header(&id)[..10]), Err(Corrupt::Truncated));
    }
}
