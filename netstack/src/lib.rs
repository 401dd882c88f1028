//! Userspace TCP/IP for `proxy --tun`: packets read from a TUN device go through a smoltcp
//! interface that accepts any destination; each TCP or UDP flow is handed to the application
//! with its original destination.

#![forbid(unsafe_code)]
#![deny(clippy::print_stdout, clippy::print_stderr)]
