//! The data-plane frame decoder on arbitrary bytes, as a rank reads them from r-1: a header,
//! then for an abort frame its payload. Never a panic; whatever decodes re-encodes to the same
//! bytes; lengths are bounded before anything would be allocated.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_collectives::tcp::{
    FRAME_HEADER_LEN, FrameKind, MAX_ABORT_PAYLOAD, decode_abort_payload, decode_frame_header,
};

fuzz_target!(|bytes: &[u8]| {
    let Ok(h) = decode_frame_header(bytes) else {
        return;
    };
    assert_eq!(h.encode()[..], bytes[..FRAME_HEADER_LEN]);
    if h.kind != FrameKind::Abort {
        return;
    }
    let Ok(len) = h.abort_payload_len() else {
        return;
    };
    assert!((9..=MAX_ABORT_PAYLOAD).contains(&len));
    let rest = &bytes[FRAME_HEADER_LEN..];
    let payload = &rest[..len.min(rest.len())];
    // The world size is not on the wire; take it from the input too.
    let world = usize::from(bytes[4]) + 1;
    if let Ok(a) = decode_abort_payload(payload, world) {
        assert!(a.culprit < world);
        assert!(a.detail.len() <= 3 * MAX_ABORT_PAYLOAD);
    }
});
