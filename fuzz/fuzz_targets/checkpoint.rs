//! The checkpoint reader on arbitrary bytes: an error or a checkpoint that re-encodes to
//! itself, never a panic, an abort or an allocation the input does not pay for.
//!
//! Each input is read twice: as it is, and with a header rewritten to be valid for its payload
//! (length, SHA-256), so that mutations reach the archive validation and the content checks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};
use tessera_rank::checkpoint::{
    CHECKPOINT_FORMAT_VERSION, CHECKPOINT_HEADER_LEN, CHECKPOINT_MAGIC, encode, read_checkpoint,
};

fn check(bytes: &[u8]) {
    let Ok(ck) = read_checkpoint(bytes) else {
        return;
    };
    // Whatever is accepted survives a round trip.
    let again = encode(&ck).expect("an accepted checkpoint encodes");
    let back = read_checkpoint(&again).expect("a re-encoded checkpoint reads");
    assert_eq!(encode(&back).expect("encodes"), again);
}

fuzz_target!(|bytes: &[u8]| {
    check(bytes);
    if bytes.len() < CHECKPOINT_HEADER_LEN {
        return;
    }
    let mut fixed = bytes.to_vec();
    let payload = &bytes[CHECKPOINT_HEADER_LEN..];
    fixed[0..8].copy_from_slice(CHECKPOINT_MAGIC);
    fixed[8..12].copy_from_slice(&CHECKPOINT_FORMAT_VERSION.to_le_bytes());
    fixed[12..16].copy_from_slice(&(CHECKPOINT_HEADER_LEN as u32).to_le_bytes());
    fixed[16..24].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    fixed[24..56].copy_from_slice(&Sha256::digest(payload));
    fixed[56..CHECKPOINT_HEADER_LEN].fill(0);
    check(&fixed);
});
