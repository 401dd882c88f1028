//! Pairing tickets and join requests: any text is a ticket, a request, or an error, never a
//! panic; what parses encodes to a text that parses to the same.

#![no_main]

use fabric::pairing::{JoinRequest, Ticket};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(ticket) = Ticket::parse(text) {
        assert_eq!(Ticket::parse(&ticket.encode()), Ok(ticket));
    }
    // Also as the body of a ticket, so the fuzzer need not find the prefix first.
    if let Ok(ticket) = Ticket::parse(&format!("{}{text}", fabric::pairing::TICKET_PREFIX)) {
        assert_eq!(Ticket::parse(&ticket.encode()), Ok(ticket));
    }
    for text in [
        text.to_owned(),
        format!("{}{text}", fabric::pairing::REQUEST_PREFIX),
    ] {
        if let Some(request) = JoinRequest::parse(&text) {
            assert_eq!(JoinRequest::parse(&request.encode()), Some(request));
        }
    }
});
