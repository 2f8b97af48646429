//! Frame headers as read off the wire: `FrameHeader::decode` on 45 bytes.
//!
//! Properties: nothing panics; a header that decodes obeys the rules of its
//! kind and encodes back to the same 45 bytes; only `S`, `C`, `E` and `A`
//! decode.

#![no_main]

use ftpx::protocol::{FRAME_HEADER_LEN, FrameHeader, FrameKind, MAX_CHUNK};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Exactly one header: shorter inputs are padded with zeros, longer ones cut.
    let mut bytes = [0u8; FRAME_HEADER_LEN];
    let n = data.len().min(FRAME_HEADER_LEN);
    bytes[..n].copy_from_slice(&data[..n]);
    let Ok(header) = FrameHeader::decode(&bytes) else {
        return;
    };
    assert!(matches!(bytes[0], b'S' | b'C' | b'E' | b'A'));
    match header.kind {
        FrameKind::Chunk => assert!((1..=MAX_CHUNK).contains(&header.len)),
        _ => assert_eq!(header.len, 0, "a {:?} frame with a payload", header.kind),
    }
    assert_eq!(
        header.encode(),
        bytes,
        "{header:?} does not encode to its bytes"
    );
});
