//! The TUN device: created through tun-rs, with Linux offload (`IFF_VNET_HDR`, TSO both ways)
//! when asked for. Other platforms get the same type without offload once their backends are
//! wired in (tun-rs already covers macOS utun and Windows wintun); only Linux is built today.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};

use tracing::debug;

/// How to create the device.
#[derive(Debug, Clone)]
pub struct TunConfig {
    /// Interface name (`None`: the kernel picks `tunN`).
    pub name: Option<String>,
    /// MTU of the interface.
    pub mtu: u16,
    /// IPv4 address and prefix length of the interface (the kernel side).
    pub ipv4: Option<(Ipv4Addr, u8)>,
    /// IPv6 address and prefix length of the interface.
    pub ipv6: Option<(Ipv6Addr, u8)>,
    /// Linux offload: `IFF_VNET_HDR` with TSO, 64 KiB segments both ways.
    pub offload: bool,
}

impl Default for TunConfig {
    fn default() -> Self {
        Self {
            name: None,
            mtu: 1500,
            ipv4: None,
            ipv6: None,
            offload: true,
        }
    }
}

/// An open TUN device, up and addressed.
pub struct TunDevice {
    dev: tun_rs::AsyncDevice,
    name: String,
    offload: bool,
    mtu: u16,
}

impl std::fmt::Debug for TunDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunDevice")
            .field("name", &self.name)
            .field("offload", &self.offload)
            .field("mtu", &self.mtu)
            .finish()
    }
}

impl TunDevice {
    /// Creates the device, sets its addresses and MTU, and brings it up. Must run inside a
    /// tokio runtime.
    pub fn create(config: &TunConfig) -> io::Result<Self> {
        let mut builder = tun_rs::DeviceBuilder::new()
            .mtu(config.mtu)
            .offload(config.offload)
            .enable(true);
        if let Some(name) = &config.name {
            builder = builder.name(name.clone());
        }
        if let Some((addr, prefix)) = config.ipv4 {
            builder = builder.ipv4(addr, prefix, None);
        }
        if let Some((addr, prefix)) = config.ipv6 {
            builder = builder.ipv6(addr, prefix);
        }
        let dev = builder.build_async()?;
        let name = dev.name()?;
        debug!(%name, offload = config.offload, "tun device created");
        Ok(Self {
            dev,
            name,
            offload: config.offload,
            mtu: config.mtu,
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether packets carry a `virtio_net_hdr`.
    pub fn offload(&self) -> bool {
        self.offload
    }

    /// The MTU the device was created with.
    pub fn mtu(&self) -> u16 {
        self.mtu
    }

    /// Waits until a packet can be read.
    pub async fn readable(&self) -> io::Result<()> {
        self.dev.readable().await
    }

    /// Reads one packet if one is ready (`WouldBlock` otherwise).
    pub fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.dev.try_recv(buf)
    }

    /// Writes one packet.
    pub async fn send(&self, buf: &[u8]) -> io::Result<usize> {
        self.dev.send(buf).await
    }
}
