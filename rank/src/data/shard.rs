//! Shard files: a fixed 64-byte header followed by an rkyv archive of [`ShardPayload`].
//!
//! Header (all little-endian):
//!
//! | bytes  | field                                                    |
//! |--------|----------------------------------------------------------|
//! | 0..8   | magic `TSRASHRD`                                         |
//! | 8..12  | format version ([`SHARD_FORMAT_VERSION`])                |
//! | 12..16 | header length (64)                                       |
//! | 16..24 | payload length in bytes (file length = 64 + this)        |
//! | 24..32 | checksum of the payload ([`checksum64`])                 |
//! | 32..64 | reserved, zero                                           |
//!
//! The payload starts at offset 64, so it keeps the 16-byte alignment rkyv wants inside a
//! page-aligned mapping. Opening checks the header, the length, the checksum, then validates
//! the archive with bytecheck, then checks the contents (lengths match rows x dims, labels below
//! the class count, features finite), so a damaged file is an error, never a panic or UB.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use rkyv::{Archive, Serialize};

use super::{DataError, Dataset, DatasetKind};

pub const SHARD_MAGIC: &[u8; 8] = b"TSRASHRD";
pub const SHARD_FORMAT_VERSION: u32 = 1;
pub const SHARD_HEADER_LEN: usize = 64;

const KIND_PAIRED: u8 = 0;
const KIND_LABELED: u8 = 1;

/// Descriptive metadata stored in a shard.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShardMeta {
    /// Short name, e.g. `digits-train`.
    pub name: String,
    /// Where the data came from and how it was made (source, license, command, seed).
    pub provenance: String,
}

impl ShardMeta {
    /// The name and provenance a data set carries.
    pub fn of(data: &Dataset) -> ShardMeta {
        ShardMeta { name: data.name().to_string(), provenance: data.provenance().to_string() }
    }
}

/// What is archived after the header.
#[derive(Archive, Serialize)]
struct ShardPayload {
    kind: u8,
    rows: u64,
    dim_a: u64,
    dim_b: u64,
    num_classes: u64,
    name: String,
    provenance: String,
    features_a: Vec<f32>,
    features_b: Vec<f32>,
    labels: Vec<u32>,
}

/// The payload checksum: 64-bit words (little-endian, the tail zero-padded) folded with
/// `h = rotl((h ^ w) * K, 29)`, then the length mixed in. Each step is a bijection of `h`, so
/// any change confined to one word always changes the result.
pub fn checksum64(bytes: &[u8]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        h = (h ^ u64::from_le_bytes(w)).wrapping_mul(K).rotate_left(29);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut w = [0u8; 8];
        w[..rest.len()].copy_from_slice(rest);
        h = (h ^ u64::from_le_bytes(w)).wrapping_mul(K).rotate_left(29);
    }
    h ^= bytes.len() as u64;
    h ^= h >> 33;
    h = h.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    h ^ (h >> 33)
}

fn header(payload: &[u8]) -> [u8; SHARD_HEADER_LEN] {
    let mut h = [0u8; SHARD_HEADER_LEN];
    h[0..8].copy_from_slice(SHARD_MAGIC);
    h[8..12].copy_from_slice(&SHARD_FORMAT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(SHARD_HEADER_LEN as u32).to_le_bytes());
    h[16..24].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    h[24..32].copy_from_slice(&checksum64(payload).to_le_bytes());
    h
}

/// The complete bytes of a shard file for `data` (header + archive).
pub(crate) fn shard_bytes(data: &Dataset, meta: &ShardMeta) -> Result<Vec<u8>, DataError> {
    let kind = data.kind();
    let (kind_tag, num_classes) = match kind {
        DatasetKind::Paired { .. } => (KIND_PAIRED, 0),
        DatasetKind::Labeled { num_classes, .. } => (KIND_LABELED, num_classes as u64),
    };
    let payload = ShardPayload {
        kind: kind_tag,
        rows: data.len() as u64,
        dim_a: kind.dim_a() as u64,
        dim_b: kind.dim_b() as u64,
        num_classes,
        name: meta.name.clone(),
        provenance: meta.provenance.clone(),
        features_a: data.features_a().to_vec(),
        features_b: data.features_b().to_vec(),
        labels: data.labels().to_vec(),
    };
    let archive = rkyv::to_bytes::<rkyv::rancor::Error>(&payload)
        .map_err(|e| DataError::Shape(format!("cannot serialize {}: {e}", data.display_name())))?;
    let mut out = Vec::with_capacity(SHARD_HEADER_LEN + archive.len());
    out.extend_from_slice(&header(&archive));
    out.extend_from_slice(&archive);
    Ok(out)
}

/// Writes `data` as a shard at `path` atomically: a temporary file beside it, fsync, rename,
/// fsync of the directory. Returns the number of bytes written.
pub fn write_shard(path: &Path, data: &Dataset, meta: &ShardMeta) -> Result<u64, DataError> {
    let bytes = shard_bytes(data, meta)?;
    crate::atomic_file::write_atomic(path, &bytes)
        .map_err(|e| DataError::io(e.op, e.path, e.source))?;
    Ok(bytes.len() as u64)
}

fn invalid(path: &Path, reason: impl Into<String>) -> DataError {
    DataError::Invalid { path: path.to_path_buf(), reason: reason.into() }
}

/// Checks the header of a shard whose file is `file_len` bytes; returns the payload length.
fn check_header(path: &Path, head: &[u8], file_len: u64) -> Result<u64, DataError> {
    if head.len() < 8 || &head[0..8] != SHARD_MAGIC {
        let n = head.len().min(8);
        return Err(DataError::BadMagic {
            path: path.to_path_buf(),
            found: String::from_utf8_lossy(&head[..n]).into(),
        });
    }
    if head.len() < SHARD_HEADER_LEN {
        return Err(invalid(
            path,
            format!(
                "the file is {file_len} bytes, shorter than the {SHARD_HEADER_LEN}-byte header (truncated)"
            ),
        ));
    }
    let u32_at = |o: usize| u32::from_le_bytes([head[o], head[o + 1], head[o + 2], head[o + 3]]);
    let u64_at = |o: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&head[o..o + 8]);
        u64::from_le_bytes(w)
    };
    let version = u32_at(8);
    if version != SHARD_FORMAT_VERSION {
        return Err(DataError::UnsupportedVersion {
            path: path.to_path_buf(),
            found: version,
            supported: SHARD_FORMAT_VERSION,
        });
    }
    let header_len = u32_at(12);
    if header_len as usize != SHARD_HEADER_LEN || head[32..64].iter().any(|&b| b != 0) {
        return Err(invalid(path, "corrupt header (bad header length or non-zero reserved bytes)"));
    }
    let payload_len = u64_at(16);
    let expected = (SHARD_HEADER_LEN as u64).saturating_add(payload_len);
    if expected != file_len {
        return Err(DataError::Length { path: path.to_path_buf(), expected, actual: file_len });
    }
    Ok(payload_len)
}

/// A shard whose bytes passed every check, ready to be turned into a [`Dataset`].
struct Checked<'a> {
    archived: &'a ArchivedShardPayload,
    kind: DatasetKind,
    rows: usize,
    meta: ShardMeta,
}

/// Runs every check of the module docs on the complete bytes of a shard (`path` names it in
/// errors). The payload must be 16-byte aligned in memory (a mapping is; see
/// [`read_shard_bytes`] for arbitrary slices), or the archive fails validation.
fn check_shard<'a>(path: &Path, bytes: &'a [u8]) -> Result<Checked<'a>, DataError> {
    let file_len = bytes.len() as u64;
    check_header(path, &bytes[..bytes.len().min(SHARD_HEADER_LEN)], file_len)?;
    if bytes.len() < SHARD_HEADER_LEN {
        return Err(invalid(path, "truncated header"));
    }
    let payload = &bytes[SHARD_HEADER_LEN..];
    let stored = u64::from_le_bytes(bytes[24..32].try_into().unwrap_or([0; 8]));
    let computed = checksum64(payload);
    if stored != computed {
        return Err(DataError::Checksum { path: path.to_path_buf(), stored, computed });
    }
    let archived = rkyv::access::<ArchivedShardPayload, rkyv::rancor::Error>(payload)
        .map_err(|e| invalid(path, format!("archive failed validation: {e}")))?;

    let rows = archived.rows.to_native();
    let (dim_a, dim_b, num_classes) =
        (archived.dim_a.to_native(), archived.dim_b.to_native(), archived.num_classes.to_native());
    let as_usize = |v: u64, what: &str| {
        usize::try_from(v).map_err(|_| invalid(path, format!("{what} {v} is too large")))
    };
    let (rows, dim_a, dim_b, num_classes) = (
        as_usize(rows, "row count")?,
        as_usize(dim_a, "dim_a")?,
        as_usize(dim_b, "dim_b")?,
        as_usize(num_classes, "num_classes")?,
    );
    let kind = match archived.kind {
        KIND_PAIRED if dim_a > 0 && dim_b > 0 => DatasetKind::Paired { dim_a, dim_b },
        KIND_LABELED if dim_a > 0 && dim_b == 0 && num_classes > 0 => {
            DatasetKind::Labeled { dim: dim_a, num_classes }
        }
        k => {
            return Err(invalid(
                path,
                format!(
                    "bad kind/dims (kind {k}, dim_a {dim_a}, dim_b {dim_b}, num_classes {num_classes})"
                ),
            ));
        }
    };
    let want = |what: &str, found: usize, dim: usize| -> Result<(), DataError> {
        match rows.checked_mul(dim) {
            Some(n) if n == found => Ok(()),
            _ => {
                Err(invalid(path, format!("{what} holds {found} values, not {rows} rows x {dim}")))
            }
        }
    };
    want("view a", archived.features_a.len(), dim_a)?;
    want("view b", archived.features_b.len(), dim_b)?;
    want("labels", archived.labels.len(), usize::from(!kind.is_paired()))?;
    if let Some(i) = archived
        .features_a
        .iter()
        .chain(archived.features_b.iter())
        .position(|v| !v.to_native().is_finite())
    {
        return Err(invalid(path, format!("non-finite feature value at flat index {i}")));
    }
    if let Some(i) = archived.labels.iter().position(|l| l.to_native() as usize >= num_classes) {
        return Err(invalid(
            path,
            format!("label at row {i} is not below num_classes {num_classes}"),
        ));
    }
    let meta = ShardMeta {
        name: archived.name.as_str().to_string(),
        provenance: archived.provenance.as_str().to_string(),
    };
    Ok(Checked { archived, kind, rows, meta })
}

/// Decodes a checked shard into owned vectors.
fn owned_dataset(path: &Path, c: Checked<'_>) -> Result<Dataset, DataError> {
    let archived = c.archived;
    let a: Vec<f32> = archived.features_a.iter().map(|v| v.to_native()).collect();
    let b: Vec<f32> = archived.features_b.iter().map(|v| v.to_native()).collect();
    let labels: Vec<u32> = archived.labels.iter().map(|v| v.to_native()).collect();
    let data = match c.kind {
        DatasetKind::Paired { dim_a, dim_b } => Dataset::paired(dim_a, dim_b, a, b)?,
        DatasetKind::Labeled { dim, num_classes } => Dataset::labeled(dim, num_classes, a, labels)?,
    };
    Ok(data.with_name(c.meta.name).with_provenance(c.meta.provenance).with_path(path))
}

/// Validates the complete bytes of a shard file, as [`open_shard`] does, and decodes them into
/// an owned [`Dataset`]; `path` names the source in errors. Any alignment of `bytes` is fine.
/// Never panics: damaged or hostile bytes are a [`DataError`].
pub fn read_shard_bytes(path: &Path, bytes: &[u8]) -> Result<Dataset, DataError> {
    // The archive needs 16-byte alignment: copy into an aligned buffer (the header is 64 bytes,
    // so the payload stays aligned).
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
    aligned.extend_from_slice(bytes);
    let checked = check_shard(path, &aligned)?;
    owned_dataset(path, checked)
}

/// Opens, memory-maps and validates a shard (see the module docs for the checks). The features
/// are then read zero-copy from the mapping.
pub fn open_shard(path: &Path) -> Result<Dataset, DataError> {
    let file = File::open(path).map_err(|e| DataError::io("open shard", path, e))?;
    let file_len = file.metadata().map_err(|e| DataError::io("stat shard", path, e))?.len();
    if file_len < SHARD_HEADER_LEN as u64 {
        let head = std::fs::read(path).map_err(|e| DataError::io("read shard", path, e))?;
        check_header(path, &head, file_len)?;
        return Err(invalid(path, "truncated header"));
    }
    // SAFETY: the mapping is read-only. Shards are never modified in place (writers replace them
    // by rename), which is the condition for a file mapping to stay valid while in use.
    let map = unsafe { memmap2::Mmap::map(&file) }
        .map_err(|e| DataError::io("memory-map shard", path, e))?;
    if map.len() as u64 != file_len {
        return Err(DataError::Length {
            path: path.to_path_buf(),
            expected: file_len,
            actual: map.len() as u64,
        });
    }
    let Checked { archived, kind, rows, meta } = check_shard(path, &map)?;

    let base = map.as_ptr() as usize;
    // Byte offset and element count of each array inside the mapping; an empty array is (0, 0).
    let range = |ptr: *const u8, len: usize| -> Option<(usize, usize)> {
        if len == 0 {
            return Some((0, 0));
        }
        let off = (ptr as usize).checked_sub(base)?;
        let end = off.checked_add(len.checked_mul(4)?)?;
        (off % 4 == 0 && end <= map.len()).then_some((off, len))
    };
    let ranges = [
        range(archived.features_a.as_ptr().cast(), archived.features_a.len()),
        range(archived.features_b.as_ptr().cast(), archived.features_b.len()),
        range(archived.labels.as_ptr().cast(), archived.labels.len()),
    ];
    let zero_copy = cfg!(target_endian = "little")
        && size_of::<rkyv::Archived<f32>>() == 4
        && size_of::<rkyv::Archived<u32>>() == 4;
    if let ([Some(a), Some(b), Some(l)], true) = (ranges, zero_copy) {
        let map = Arc::new(map);
        return Ok(Dataset::from_mapped(kind, rows, &meta, path, map, [a, b, l]));
    }
    // Big-endian or unaligned archives: decode into owned vectors instead.
    owned_dataset(path, Checked { archived, kind, rows, meta })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn sample_paired() -> Dataset {
        let a: Vec<f32> = (0..12).map(|x| x as f32 * 0.5).collect();
        let b: Vec<f32> = (0..8).map(|x| -(x as f32)).collect();
        Dataset::paired(3, 2, a, b).unwrap().with_name("toy").with_provenance("unit test")
    }

    fn write_tmp(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn round_trip_paired_and_labeled() {
        let dir = tempfile::tempdir().unwrap();
        let d = sample_paired();
        let p = dir.path().join("p.shard");
        let n = write_shard(&p, &d, &ShardMeta::of(&d)).unwrap();
        assert_eq!(n, std::fs::metadata(&p).unwrap().len());
        let o = open_shard(&p).unwrap();
        assert!(o.is_mapped());
        assert_eq!(o.kind(), DatasetKind::Paired { dim_a: 3, dim_b: 2 });
        assert_eq!(o.len(), 4);
        assert_eq!(o.features_a(), d.features_a());
        assert_eq!(o.features_b(), d.features_b());
        assert_eq!(o.row_b(3), &[-6.0, -7.0]);
        assert_eq!(o.name(), "toy");
        assert_eq!(o.provenance(), "unit test");
        assert_eq!(o.path(), Some(p.as_path()));

        let l = Dataset::labeled(2, 3, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], vec![2, 0, 1]).unwrap();
        let q = dir.path().join("l.shard");
        write_shard(&q, &l, &ShardMeta { name: "lab".into(), provenance: String::new() }).unwrap();
        let o = open_shard(&q).unwrap();
        assert_eq!(o.kind(), DatasetKind::Labeled { dim: 2, num_classes: 3 });
        assert_eq!(o.labels(), &[2, 0, 1]);
        assert_eq!(o.row_a(2), &[5.0, 6.0]);
        assert_eq!(o.name(), "lab");
        // A mapped set clones cheaply and survives the file being replaced.
        let c = o.clone();
        write_shard(&q, &sample_paired(), &ShardMeta::default()).unwrap();
        assert_eq!(c.labels(), &[2, 0, 1]);
        // No temporary files are left behind.
        let names: Vec<_> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn shard_bytes_are_deterministic() {
        let d = sample_paired();
        assert_eq!(
            shard_bytes(&d, &ShardMeta::of(&d)).unwrap(),
            shard_bytes(&d, &ShardMeta::of(&d)).unwrap()
        );
    }

    #[test]
    fn damaged_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let d = sample_paired();
        let good = shard_bytes(&d, &ShardMeta::of(&d)).unwrap();

        // Truncated anywhere: header promises more bytes than the file has.
        for cut in [good.len() - 1, good.len() / 2, SHARD_HEADER_LEN] {
            let p = write_tmp(dir.path(), "cut.shard", &good[..cut]);
            let e = open_shard(&p).unwrap_err();
            assert!(matches!(e, DataError::Length { .. }), "{e}");
            let msg = e.to_string();
            assert!(msg.contains("cut.shard") && msg.contains("truncated"), "{msg}");
        }
        let p = write_tmp(dir.path(), "tiny.shard", &good[..20]);
        let msg = open_shard(&p).unwrap_err().to_string();
        assert!(
            msg.contains("tiny.shard") && msg.contains("shorter than the 64-byte header"),
            "{msg}"
        );
        let p = write_tmp(dir.path(), "empty.shard", &[]);
        assert!(matches!(open_shard(&p).unwrap_err(), DataError::BadMagic { .. }));

        // Extra bytes appended.
        let mut long = good.clone();
        long.extend_from_slice(&[0; 16]);
        let p = write_tmp(dir.path(), "long.shard", &long);
        assert!(matches!(open_shard(&p).unwrap_err(), DataError::Length { .. }));

        // Every single flipped byte of the payload is caught by the checksum.
        for i in (SHARD_HEADER_LEN..good.len()).step_by(7) {
            let mut bad = good.clone();
            bad[i] ^= 0x5A;
            let p = write_tmp(dir.path(), "flip.shard", &bad);
            let e = open_shard(&p).unwrap_err();
            assert!(matches!(e, DataError::Checksum { .. }), "byte {i}: {e}");
            assert!(e.to_string().contains("flip.shard") && e.to_string().contains("corrupt"));
        }

        // Any damaged header byte is an error too.
        for i in 0..SHARD_HEADER_LEN {
            let mut bad = good.clone();
            bad[i] ^= 0x01;
            let p = write_tmp(dir.path(), "hdr.shard", &bad);
            assert!(open_shard(&p).is_err(), "header byte {i} flipped but the shard opened");
        }

        // Wrong magic.
        let mut bad = good.clone();
        bad[0..8].copy_from_slice(b"NOTASHRD");
        let p = write_tmp(dir.path(), "magic.shard", &bad);
        let msg = open_shard(&p).unwrap_err().to_string();
        assert!(
            msg.contains("magic.shard")
                && msg.contains("not a Tessera shard")
                && msg.contains("NOTASHRD"),
            "{msg}"
        );

        // Wrong version.
        let mut bad = good.clone();
        bad[8..12].copy_from_slice(&7u32.to_le_bytes());
        let p = write_tmp(dir.path(), "ver.shard", &bad);
        let e = open_shard(&p).unwrap_err();
        assert!(matches!(e, DataError::UnsupportedVersion { found: 7, supported: 1, .. }), "{e}");
        assert!(e.to_string().contains("ver.shard"));

        // Reserved header bytes must be zero.
        let mut bad = good.clone();
        bad[40] = 1;
        let p = write_tmp(dir.path(), "res.shard", &bad);
        assert!(matches!(open_shard(&p).unwrap_err(), DataError::Invalid { .. }));

        // Missing file.
        let e = open_shard(&dir.path().join("missing.shard")).unwrap_err().to_string();
        assert!(e.contains("missing.shard"), "{e}");
    }

    #[test]
    fn garbage_with_valid_header_and_checksum_fails_validation() {
        // A payload that passes the checksum (it is computed over the garbage) but is not a
        // valid archive: bytecheck must reject it without reading out of bounds.
        let dir = tempfile::tempdir().unwrap();
        for len in [0usize, 3, 16, 64, 200] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 37 % 251) as u8 | 0x80).collect();
            let mut bytes = header(&payload).to_vec();
            bytes.extend_from_slice(&payload);
            let p = write_tmp(dir.path(), "garbage.shard", &bytes);
            let e = open_shard(&p).unwrap_err();
            assert!(matches!(e, DataError::Invalid { .. }), "len {len}: {e}");
        }
        // A valid archive with inconsistent contents (3 values for 2 rows x 2 dims).
        let payload = ShardPayload {
            kind: KIND_PAIRED,
            rows: 2,
            dim_a: 2,
            dim_b: 1,
            num_classes: 0,
            name: String::new(),
            provenance: String::new(),
            features_a: vec![0.0; 3],
            features_b: vec![0.0; 2],
            labels: vec![],
        };
        let archive = rkyv::to_bytes::<rkyv::rancor::Error>(&payload).unwrap();
        let mut bytes = header(&archive).to_vec();
        bytes.extend_from_slice(&archive);
        let p = write_tmp(dir.path(), "incons.shard", &bytes);
        let msg = open_shard(&p).unwrap_err().to_string();
        assert!(msg.contains("view a holds 3 values, not 2 rows x 2"), "{msg}");
    }

    #[test]
    fn bytes_entry_point_agrees_with_open_shard_at_any_alignment() {
        let dir = tempfile::tempdir().unwrap();
        let d = sample_paired();
        let good = shard_bytes(&d, &ShardMeta::of(&d)).unwrap();
        let name = Path::new("mem.shard");
        // Shifted by 1..15 bytes in memory: still decodes (rkyv wants 16-byte alignment).
        for shift in 0..16 {
            let mut buf = vec![0u8; shift];
            buf.extend_from_slice(&good);
            let o = read_shard_bytes(name, &buf[shift..]).unwrap();
            assert!(!o.is_mapped());
            assert_eq!(o.features_a(), d.features_a());
            assert_eq!(o.features_b(), d.features_b());
            assert_eq!((o.name(), o.path()), ("toy", Some(name)));
        }
        // Damaged bytes: the same error as opening them from a file.
        let mut variants: Vec<Vec<u8>> = vec![Vec::new(), good[..20].to_vec(), good[..64].to_vec()];
        variants.push(good[..good.len() - 1].to_vec());
        for i in (0..good.len()).step_by(5) {
            let mut bad = good.clone();
            bad[i] ^= 0x21;
            variants.push(bad);
        }
        for bytes in variants {
            let p = write_tmp(dir.path(), "mem.shard", &bytes);
            let from_file = open_shard(&p).unwrap_err();
            let from_bytes = read_shard_bytes(name, &bytes).unwrap_err();
            assert_eq!(
                std::mem::discriminant(&from_file),
                std::mem::discriminant(&from_bytes),
                "{from_file} vs {from_bytes}"
            );
            assert!(from_bytes.to_string().contains("mem.shard"), "{from_bytes}");
        }
    }

    #[test]
    fn checksum_sees_single_word_changes() {
        let base: Vec<u8> = (0..101u32).map(|i| i as u8).collect();
        let h = checksum64(&base);
        for i in 0..base.len() {
            let mut b = base.clone();
            b[i] ^= 1;
            assert_ne!(checksum64(&b), h);
        }
        assert_ne!(checksum64(&base[..100]), h);
        assert_ne!(checksum64(&[]), checksum64(&[0]));
    }
}
