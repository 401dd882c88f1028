//! Userspace TCP/IP for `proxy --tun`: packets read from a TUN device go through a smoltcp
//! interface that accepts any destination; each TCP or UDP flow is handed to the application
//! with its original destination.
//!
//! ```text
//!  apps ─► kernel ─► TUN (virtio_net_hdr, ≤64 KiB TSO segments)
//!                     │ ▲
//!            driver ──┘ └── partial checksums, GSO size = MTU − headers
//!              │
//!              ▼
//!            Stack (sans-IO) ── TCP: SYN held ─► Incoming::Tcp(TcpRequest)
//!              │                     accept() ─► smoltcp socket ◄─► TcpStream (AsyncRead/Write)
//!              │                     reject() ─► RST
//!              └──────────────── UDP: FlowTable by source ─► Incoming::Udp(UdpFlow)
//!                                                   UdpReply::send ─► IP/UDP packet to the TUN
//! ```
//!
//! [`stack::Stack`] and [`udp::FlowTable`] never read the clock or do I/O; [`driver`] owns
//! the device and the timers. [`offload`] is the `virtio_net_hdr` format and its checksums.
//! [`fake_ip`] and [`dns`] are fake-IP mode's table of names and the DNS it answers with.

#![forbid(unsafe_code)]
#![deny(clippy::print_stdout, clippy::print_stderr)]

#[cfg(target_os = "linux")]
pub mod device;
pub mod dns;
#[cfg(target_os = "linux")]
pub mod driver;
pub mod fake_ip;
pub mod offload;
pub mod stack;
#[cfg(target_os = "linux")]
pub mod tcp;
pub mod udp;

#[cfg(target_os = "linux")]
pub use device::{TunConfig, TunDevice};
#[cfg(target_os = "linux")]
pub use driver::{Echo, Incoming, NetStack, UdpFlow, UdpReply};
pub use stack::{FlowKey, StackConfig};
#[cfg(target_os = "linux")]
pub use tcp::{TcpRequest, TcpStream};
