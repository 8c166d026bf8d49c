//! Fuzzes the PROXY protocol parser: any input must parse, ask for more, or be refused —
//! never panic — and a parsed header never claims more bytes than it was given.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((header, used))) = gatehouse::proxy_protocol::parse(data) {
        assert!(used <= data.len());
        if let Some((source, destination)) = header.addresses {
            let encoded = gatehouse::proxy_protocol::encode_v2(source, destination);
            assert!(gatehouse::proxy_protocol::parse(&encoded).is_ok());
        }
    }
});
