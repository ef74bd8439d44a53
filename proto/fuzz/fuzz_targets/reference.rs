//! Model reference parsing on arbitrary strings; whatever parses must reparse to itself.
#![no_main]

use beacon_proto::ModelRef;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data)
        && let Ok(r) = ModelRef::parse(s)
    {
        let again = ModelRef::parse(&r.to_string()).expect("normalised reference reparses");
        assert_eq!(again, r);
    }
});
