//! The shard reader on arbitrary bytes: an error or a consistent data set, never a panic, an
//! abort or an allocation the input does not pay for.
//!
//! Each input is read twice: as it is (header, length and checksum checks), and with a header
//! rewritten to be valid for its payload, so that mutations reach the archive validation and
//! the content checks behind the checksum.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tessera_rank::data::{
    Dataset, DatasetKind, SHARD_FORMAT_VERSION, SHARD_HEADER_LEN, SHARD_MAGIC, checksum64,
    read_shard_bytes,
};

fn check_consistent(data: &Dataset) {
    let rows = data.len();
    match data.kind() {
        DatasetKind::Paired { dim_a, dim_b } => {
            assert_eq!(data.features_a().len(), rows * dim_a);
            assert_eq!(data.features_b().len(), rows * dim_b);
        }
        DatasetKind::Labeled { dim, num_classes } => {
            assert_eq!(data.features_a().len(), rows * dim);
            assert_eq!(data.labels().len(), rows);
            assert!(data.labels().iter().all(|&l| (l as usize) < num_classes));
        }
    }
    for r in 0..rows {
        assert!(data.row_a(r).iter().all(|v| v.is_finite()));
    }
}

fuzz_target!(|bytes: &[u8]| {
    let path = Path::new("fuzz.shard");
    if let Ok(data) = read_shard_bytes(path, bytes) {
        check_consistent(&data);
    }
    if bytes.len() < SHARD_HEADER_LEN {
        return;
    }
    let mut fixed = bytes.to_vec();
    let payload_len = (bytes.len() - SHARD_HEADER_LEN) as u64;
    let sum = checksum64(&bytes[SHARD_HEADER_LEN..]);
    fixed[0..8].copy_from_slice(SHARD_MAGIC);
    fixed[8..12].copy_from_slice(&SHARD_FORMAT_VERSION.to_le_bytes());
    fixed[12..16].copy_from_slice(&(SHARD_HEADER_LEN as u32).to_le_bytes());
    fixed[16..24].copy_from_slice(&payload_len.to_le_bytes());
    fixed[24..32].copy_from_slice(&sum.to_le_bytes());
    fixed[32..SHARD_HEADER_LEN].fill(0);
    if let Ok(data) = read_shard_bytes(path, &fixed) {
        check_consistent(&data);
    }
});
