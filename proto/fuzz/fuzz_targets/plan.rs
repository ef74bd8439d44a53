//! The MinionS plan parser on arbitrary text: a supervisor model's output is untrusted.
#![no_main]

use beacon_proto::plan::{self, Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let limits = Limits::default();
    let _ = plan::extract_json_object(text);
    if let Ok(mut p) = plan::parse(text, &limits) {
        // A plan that parsed is normalised and valid: normalising again changes nothing.
        let before = p.clone();
        plan::normalize(&mut p);
        assert_eq!(p, before);
        assert!(plan::validate(&p, &limits).is_ok());
    }
});
