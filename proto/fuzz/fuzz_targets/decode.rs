//! Every wire decoder, and verification of whatever decodes, on arbitrary bytes.
#![no_main]

use beacon_proto::*;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = InferRequest::decode(data);
    let _ = AuditRequest::decode(data);
    let _ = AuditResult::decode(data);
    let _ = ProviderAdvert::decode(data);
    if let Ok(signed) = Signed::<InferResult>::decode(data) {
        let _ = signed.verify();
    }
    if let Ok(signed) = Signed::<ProviderAdvert>::decode(data) {
        let _ = validate_advert(&signed, &signed.signer_peer_id(), 0, None, AdvertPolicy::default());
    }
});
