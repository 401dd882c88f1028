//! Arbitrary bytes as a DNS query captured by `proxy --tun --fake-ip`
//! (`netstack::dns::Query`), and the names that parse fed to a small `FakeIpTable`.

#![no_main]

use std::net::IpAddr;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use netstack::dns::Query;
use netstack::fake_ip::{FakeIpTable, Instant};

fuzz_target!(|data: &[u8]| {
    let Ok(query) = Query::parse(data) else {
        return;
    };
    let mut table = FakeIpTable::new(4, Duration::from_secs(10), Duration::from_secs(5));
    let now = Instant::from_secs(i64::from(data.len() as u32));
    let addrs = table
        .assign(now, &query.name)
        .expect("an empty table has room");
    assert_eq!(
        table.name_of(now, IpAddr::V4(addrs.v4)).as_deref(),
        Some(query.name.as_str())
    );
    let answer = query.answer(data, &[addrs.v4.into(), addrs.v6.into()], 60);
    // The answer carries the same question: turned back into a query it parses the same.
    let mut back = answer.clone();
    back[2] &= 0x7f;
    let again = Query::parse(&back).expect("the answer's question parses");
    assert_eq!(again.name, query.name);
    assert_eq!(again.qtype, query.qtype);
    assert_eq!(again.id, query.id);
    let failure = query.server_failure(data);
    assert_eq!(failure[3] & 0x0f, 2, "SERVFAIL");
});
