//! GGUF header parsing on arbitrary bytes.
#![no_main]

use beacon_proto::gguf::GgufHeader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = GgufHeader::parse(data) {
        let _ = h.metadata_strings();
        let _ = h.parameter_count();
    }
});
