//! What a stranger can send the status responder and the HTTP listener's own pages: the
//! request head (`proxy::status::parse_head`), the `Host` check
//! (`proxy::guard::is_own_host_header`) and `Basic` credentials
//! (`proxy::http::basic_credentials`). No panic; what parses is a slice of the input.

#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy::status::{HeadError, parse_head};

fuzz_target!(|data: &[u8]| {
    let _ = proxy::http::basic_credentials(data);
    match parse_head(data) {
        Ok(head) => {
            let text = String::from_utf8_lossy(data);
            assert!(text.starts_with(head.method));
            assert!(!head.method.is_empty() && !head.path.is_empty());
            if let Some(host) = head.host {
                assert!(text.contains(host));
                let _ = proxy::guard::is_own_host_header(host);
            }
        }
        Err(HeadError::Incomplete) => assert!(data.len() <= 8192 + 3),
        Err(_) => {}
    }
});
