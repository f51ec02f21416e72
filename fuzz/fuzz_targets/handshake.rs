//! The data-plane handshake decoder on arbitrary bytes, as a rank reads them from whoever
//! connects to its port. Never a panic; an accepted hello re-encodes to the same bytes (bar the
//! reserved ones) and passes the check only for the job it names.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_collectives::tcp::{decode_hello, encode_hello};

fuzz_target!(|bytes: &[u8]| {
    let Ok(h) = decode_hello(bytes) else {
        return;
    };
    if let (Ok(world), Ok(rank)) = (usize::try_from(h.world), usize::try_from(h.rank)) {
        let again = encode_hello(h.session, world, rank);
        assert_eq!(again[..12], bytes[..12]);
        assert_eq!(again[16..40], bytes[16..40]);
        assert!(h.check(h.session, world, rank).is_ok());
        assert!(h.check(h.session ^ 1, world, rank).is_err());
        assert!(h.check(h.session, world, rank.wrapping_add(1)).is_err());
    }
});
