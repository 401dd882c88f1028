//! Hand-written bindings to the part of c-toxcore's `tox.h` (0.2.x) that the fabric uses, and a
//! safe owner type, [`Instance`], around a `Tox*`.
//!
//! This is the only module of the crate allowed to use `unsafe`. Every `unsafe` block states the
//! contract it relies on in a `// SAFETY:` comment. Everything outside sees safe methods only.
//!
//! Notes on the C ABI used here:
//! - C enums (`Tox_Connection`, `Tox_Err_*`, …) are passed as `u32`: on the platforms c-toxcore
//!   supports they are `int`-sized, and reading them as integers (never as Rust enums) means an
//!   unexpected value from a newer library cannot be undefined behaviour.
//! - `Tox` and `Tox_Options` are opaque; we only hold pointers to them.
//! - `Instance` holds a raw pointer, so it is neither `Send` nor `Sync`: one thread creates it,
//!   uses it and kills it, which is what c-toxcore requires without its experimental locking.

#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_char, c_void};
use std::marker::PhantomData;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr::NonNull;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::socket::Watched;
use crate::id::{PUBLIC_KEY_SIZE, PublicKey, TOX_ID_SIZE, ToxId};

/// Largest custom packet c-toxcore sends, id byte included (`TOX_MAX_CUSTOM_PACKET_SIZE`).
pub const MAX_CUSTOM_PACKET: usize = 1373;
/// Longest friend request message (`TOX_MAX_FRIEND_REQUEST_LENGTH`).
pub const MAX_FRIEND_REQUEST: usize = 1016;

/// Opaque `struct Tox`.
#[repr(C)]
struct Tox {
    _data: [u8; 0],
    _marker: PhantomData<(*mut u8, std::marker::PhantomPinned)>,
}

/// Opaque `struct Tox_Options`.
#[repr(C)]
struct ToxOptions {
    _data: [u8; 0],
    _marker: PhantomData<(*mut u8, std::marker::PhantomPinned)>,
}

type LogCb = unsafe extern "C" fn(
    tox: *mut Tox,
    level: u32,
    file: *const c_char,
    line: u32,
    func: *const c_char,
    message: *const c_char,
    user_data: *mut c_void,
);
type SelfConnectionCb = unsafe extern "C" fn(tox: *mut Tox, status: u32, user_data: *mut c_void);
type FriendConnectionCb =
    unsafe extern "C" fn(tox: *mut Tox, friend: u32, status: u32, user_data: *mut c_void);
type FriendRequestCb = unsafe extern "C" fn(
    tox: *mut Tox,
    public_key: *const u8,
    message: *const u8,
    length: usize,
    user_data: *mut c_void,
);
type FriendPacketCb = unsafe extern "C" fn(
    tox: *mut Tox,
    friend: u32,
    data: *const u8,
    length: usize,
    user_data: *mut c_void,
);

// `Tox_Savedata_Type`
const SAVEDATA_TYPE_NONE: u32 = 0;
const SAVEDATA_TYPE_TOX_SAVE: u32 = 1;
// `Tox_Proxy_Type`
const PROXY_TYPE_NONE: u32 = 0;

// Linked by build.rs (pkg-config toxcore), which explains a missing library clearly.
unsafe extern "C" {
    fn tox_options_new(error: *mut u32) -> *mut ToxOptions;
    fn tox_options_free(options: *mut ToxOptions);
    fn tox_options_set_ipv6_enabled(options: *mut ToxOptions, enabled: bool);
    fn tox_options_set_udp_enabled(options: *mut ToxOptions, enabled: bool);
    fn tox_options_set_local_discovery_enabled(options: *mut ToxOptions, enabled: bool);
    fn tox_options_set_proxy_type(options: *mut ToxOptions, kind: u32);
    fn tox_options_set_start_port(options: *mut ToxOptions, port: u16);
    fn tox_options_set_end_port(options: *mut ToxOptions, port: u16);
    fn tox_options_set_tcp_port(options: *mut ToxOptions, port: u16);
    fn tox_options_set_savedata_type(options: *mut ToxOptions, kind: u32);
    fn tox_options_set_savedata_data(options: *mut ToxOptions, data: *const u8, length: usize);
    fn tox_options_set_log_callback(options: *mut ToxOptions, callback: Option<LogCb>);

    fn tox_new(options: *const ToxOptions, error: *mut u32) -> *mut Tox;
    fn tox_kill(tox: *mut Tox);
    fn tox_get_savedata_size(tox: *const Tox) -> usize;
    fn tox_get_savedata(tox: *const Tox, savedata: *mut u8);

    fn tox_bootstrap(
        tox: *mut Tox,
        host: *const c_char,
        port: u16,
        public_key: *const u8,
        error: *mut u32,
    ) -> bool;
    fn tox_add_tcp_relay(
        tox: *mut Tox,
        host: *const c_char,
        port: u16,
        public_key: *const u8,
        error: *mut u32,
    ) -> bool;
    fn tox_iteration_interval(tox: *const Tox) -> u32;
    fn tox_iterate(tox: *mut Tox, user_data: *mut c_void);

    fn tox_self_get_address(tox: *const Tox, address: *mut u8);
    fn tox_self_get_public_key(tox: *const Tox, public_key: *mut u8);
    fn tox_self_get_secret_key(tox: *const Tox, secret_key: *mut u8);
    fn tox_self_get_connection_status(tox: *const Tox) -> u32;
    fn tox_self_get_udp_port(tox: *const Tox, error: *mut u32) -> u16;
    fn tox_self_set_name(tox: *mut Tox, name: *const u8, length: usize, error: *mut u32) -> bool;

    fn tox_friend_add(
        tox: *mut Tox,
        address: *const u8,
        message: *const u8,
        length: usize,
        error: *mut u32,
    ) -> u32;
    fn tox_friend_add_norequest(tox: *mut Tox, public_key: *const u8, error: *mut u32) -> u32;
    fn tox_friend_delete(tox: *mut Tox, friend: u32, error: *mut u32) -> bool;
    fn tox_friend_by_public_key(tox: *const Tox, public_key: *const u8, error: *mut u32) -> u32;
    fn tox_friend_get_public_key(
        tox: *const Tox,
        friend: u32,
        public_key: *mut u8,
        error: *mut u32,
    ) -> bool;
    fn tox_friend_get_connection_status(tox: *const Tox, friend: u32, error: *mut u32) -> u32;
    fn tox_self_get_friend_list_size(tox: *const Tox) -> usize;
    fn tox_self_get_friend_list(tox: *const Tox, list: *mut u32);
    fn tox_friend_send_lossy_packet(
        tox: *mut Tox,
        friend: u32,
        data: *const u8,
        length: usize,
        error: *mut u32,
    ) -> bool;
    fn tox_friend_send_lossless_packet(
        tox: *mut Tox,
        friend: u32,
        data: *const u8,
        length: usize,
        error: *mut u32,
    ) -> bool;

    fn tox_callback_self_connection_status(tox: *mut Tox, cb: Option<SelfConnectionCb>);
    fn tox_callback_friend_connection_status(tox: *mut Tox, cb: Option<FriendConnectionCb>);
    fn tox_callback_friend_request(tox: *mut Tox, cb: Option<FriendRequestCb>);
    fn tox_callback_friend_lossy_packet(tox: *mut Tox, cb: Option<FriendPacketCb>);
    fn tox_callback_friend_lossless_packet(tox: *mut Tox, cb: Option<FriendPacketCb>);
}

/// How a Tox instance (or a friend) is connected (`Tox_Connection`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Connection {
    /// Not connected.
    #[default]
    None,
    /// Connected through a TCP relay only.
    Tcp,
    /// Connected with direct UDP.
    Udp,
}

impl Connection {
    /// Whether this is any kind of connection.
    pub fn is_online(self) -> bool {
        self != Self::None
    }

    fn from_raw(raw: u32) -> Self {
        match raw {
            1 => Self::Tcp,
            2 => Self::Udp,
            // 0, or a value a future library might add: treat as not connected.
            _ => Self::None,
        }
    }
}

/// Options for [`Instance::new`]: the subset of `Tox_Options` the fabric sets.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Create an IPv6 socket (dual stack) instead of IPv4 only.
    pub ipv6_enabled: bool,
    /// Use UDP at all (false: TCP relays only).
    pub udp_enabled: bool,
    /// LAN discovery broadcasts.
    pub local_discovery_enabled: bool,
    /// First UDP port to try binding (0 and 0: c-toxcore's default range 33445..=33545).
    pub start_port: u16,
    /// Last UDP port to try binding.
    pub end_port: u16,
    /// Serve as a TCP relay on this port (0: off).
    pub tcp_port: u16,
    /// Savedata from a previous [`Instance::savedata`], if any.
    pub savedata: Option<Vec<u8>>,
}

/// Why `tox_new` failed (`Tox_Err_New`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NewError {
    /// Out of memory.
    #[error("c-toxcore could not allocate memory")]
    Malloc,
    /// No UDP port in the range could be bound.
    #[error("could not bind a udp port in the configured range")]
    PortAlloc,
    /// The savedata is encrypted (we never write encrypted saves).
    #[error("the tox save file is encrypted")]
    LoadEncrypted,
    /// The savedata is corrupt.
    #[error("the tox save file is corrupt")]
    LoadBadFormat,
    /// Any other `Tox_Err_New` code.
    #[error("tox_new failed with code {0}")]
    Other(u32),
}

/// Why adding a friend failed (`Tox_Err_Friend_Add`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FriendAddError {
    /// The message is longer than [`MAX_FRIEND_REQUEST`] bytes.
    #[error("friend request message too long")]
    TooLong,
    /// The message is empty (a request needs at least one byte).
    #[error("friend request message empty")]
    NoMessage,
    /// The ID is our own.
    #[error("cannot add our own tox id as a friend")]
    OwnKey,
    /// Already a friend, or a request is already pending.
    #[error("already a friend or request already sent")]
    AlreadySent,
    /// The ID's checksum is wrong.
    #[error("bad tox id checksum")]
    BadChecksum,
    /// Already a friend with a different nospam; the nospam was updated.
    #[error("friend already known with another nospam")]
    SetNewNospam,
    /// Out of memory.
    #[error("c-toxcore could not allocate memory")]
    Malloc,
    /// Any other code.
    #[error("tox_friend_add failed with code {0}")]
    Other(u32),
}

impl FriendAddError {
    fn from_raw(code: u32) -> Self {
        match code {
            2 => Self::TooLong,
            3 => Self::NoMessage,
            4 => Self::OwnKey,
            5 => Self::AlreadySent,
            6 => Self::BadChecksum,
            7 => Self::SetNewNospam,
            8 => Self::Malloc,
            c => Self::Other(c),
        }
    }
}

/// Why a custom packet was not sent (`Tox_Err_Friend_Custom_Packet`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PacketError {
    /// No such friend number.
    #[error("no such friend")]
    FriendNotFound,
    /// The friend is not online with us right now.
    #[error("friend not connected")]
    FriendNotConnected,
    /// The first byte is outside the range for the packet kind.
    #[error("packet id byte outside the allowed range")]
    Invalid,
    /// Empty packet.
    #[error("empty packet")]
    Empty,
    /// Longer than [`MAX_CUSTOM_PACKET`].
    #[error("packet longer than {MAX_CUSTOM_PACKET} bytes")]
    TooLong,
    /// c-toxcore's send queue for this friend is full (lossless only).
    #[error("send queue full")]
    SendQueueFull,
    /// Any other code.
    #[error("custom packet send failed with code {0}")]
    Other(u32),
}

impl PacketError {
    fn from_raw(code: u32) -> Self {
        match code {
            2 => Self::FriendNotFound,
            3 => Self::FriendNotConnected,
            4 => Self::Invalid,
            5 => Self::Empty,
            6 => Self::TooLong,
            7 => Self::SendQueueFull,
            c => Self::Other(c),
        }
    }
}

/// Receiver of the events `tox_iterate` reports. Implementations must not block; they run on
/// the Tox thread inside `tox_iterate`.
pub trait Callbacks {
    /// Our own DHT connection changed.
    fn self_connection(&mut self, status: Connection);
    /// A friend came online, went offline or changed transport.
    fn friend_connection(&mut self, friend: u32, status: Connection);
    /// Someone sent us a friend request.
    fn friend_request(&mut self, pk: PublicKey, message: &[u8]);
    /// A custom lossy packet (first byte 192..=254) arrived.
    fn lossy_packet(&mut self, friend: u32, data: &[u8]);
    /// A custom lossless packet (first byte 160..=191) arrived.
    fn lossless_packet(&mut self, friend: u32, data: &[u8]);
}

/// An owned c-toxcore instance. Killed on drop.
#[derive(Debug)]
pub struct Instance {
    tox: NonNull<Tox>,
    /// Its UDP socket registered for readiness ([`Instance::watch_udp`]); deregistered before
    /// the instance (and with it the socket) goes.
    udp_watch: Option<AsyncFd<Watched>>,
}

impl Instance {
    /// Creates an instance (`tox_new`), loading `opts.savedata` if given. Proxies are off and
    /// c-toxcore's log goes to `tracing` under the target `toxcore`.
    pub fn new(opts: &Options) -> Result<Self, NewError> {
        let mut err = 0u32;
        // SAFETY: tox_options_new has no preconditions; it returns NULL (with err set) on
        // allocation failure, which we check.
        let raw = unsafe { tox_options_new(&mut err) };
        let Some(raw) = NonNull::new(raw) else {
            return Err(NewError::Malloc);
        };
        let o = raw.as_ptr();
        // SAFETY: `o` is a valid options object until tox_options_free below; the setters only
        // store plain values. The savedata pointer is borrowed from `opts`, which outlives both
        // the options object and tox_new (tox_new copies what it loads). The log callback is a
        // `'static` function that tolerates any arguments c-toxcore passes.
        let tox = unsafe {
            tox_options_set_ipv6_enabled(o, opts.ipv6_enabled);
            tox_options_set_udp_enabled(o, opts.udp_enabled);
            tox_options_set_local_discovery_enabled(o, opts.local_discovery_enabled);
            tox_options_set_proxy_type(o, PROXY_TYPE_NONE);
            tox_options_set_start_port(o, opts.start_port);
            tox_options_set_end_port(o, opts.end_port);
            tox_options_set_tcp_port(o, opts.tcp_port);
            match &opts.savedata {
                Some(data) => {
                    tox_options_set_savedata_type(o, SAVEDATA_TYPE_TOX_SAVE);
                    tox_options_set_savedata_data(o, data.as_ptr(), data.len());
                }
                None => {
                    tox_options_set_savedata_type(o, SAVEDATA_TYPE_NONE);
                }
            }
            tox_options_set_log_callback(o, Some(log_trampoline));
            let tox = tox_new(o, &mut err);
            tox_options_free(o);
            tox
        };
        let Some(tox) = NonNull::new(tox) else {
            return Err(match err {
                2 => NewError::Malloc,
                3 => NewError::PortAlloc,
                8 => NewError::LoadEncrypted,
                9 => NewError::LoadBadFormat,
                c => NewError::Other(c),
            });
        };
        let instance = Self {
            tox,
            udp_watch: None,
        };
        if err != 0 {
            // A partial load still returns an instance: refuse it rather than silently run
            // with a different identity than the one saved.
            return Err(match err {
                8 => NewError::LoadEncrypted,
                9 => NewError::LoadBadFormat,
                c => NewError::Other(c),
            });
        }
        Ok(instance)
    }

    fn ptr(&self) -> *mut Tox {
        self.tox.as_ptr()
    }

    /// The state to persist (`tox_get_savedata`): secret key, nospam, friends, DHT nodes.
    pub fn savedata(&self) -> Vec<u8> {
        // SAFETY: `self.tox` is a live instance (killed only in Drop).
        let size = unsafe { tox_get_savedata_size(self.ptr()) };
        let mut buf = vec![0u8; size];
        // SAFETY: `buf` has exactly the size c-toxcore asked for just before, on this thread,
        // with no call in between that could change the state.
        unsafe { tox_get_savedata(self.ptr(), buf.as_mut_ptr()) };
        buf
    }

    /// Asks a DHT node for peers (`tox_bootstrap`). Returns false if the host does not resolve.
    pub fn bootstrap(&mut self, host: &str, port: u16, pk: &PublicKey) -> bool {
        let Ok(host) = CString::new(host) else {
            return false;
        };
        let mut err = 0u32;
        // SAFETY: `host` is a NUL-terminated string and `pk` is 32 bytes, both alive for the
        // call; c-toxcore does not keep the pointers.
        unsafe { tox_bootstrap(self.ptr(), host.as_ptr(), port, pk.0.as_ptr(), &mut err) }
    }

    /// Adds a TCP relay (`tox_add_tcp_relay`). Returns false if the host does not resolve.
    pub fn add_tcp_relay(&mut self, host: &str, port: u16, pk: &PublicKey) -> bool {
        let Ok(host) = CString::new(host) else {
            return false;
        };
        let mut err = 0u32;
        // SAFETY: as in `bootstrap`.
        unsafe { tox_add_tcp_relay(self.ptr(), host.as_ptr(), port, pk.0.as_ptr(), &mut err) }
    }

    /// Milliseconds until `iterate` should run again.
    pub fn iteration_interval(&self) -> u32 {
        // SAFETY: live instance.
        unsafe { tox_iteration_interval(self.ptr()) }
    }

    /// Runs one round of the event loop (`tox_iterate`), reporting events to `cb`.
    pub fn iterate<C: Callbacks>(&mut self, cb: &mut C) {
        // SAFETY: the trampolines registered here are instantiated for `C` and the user data
        // passed to tox_iterate in the same call is a `*mut C`, exclusively borrowed for the
        // whole call. c-toxcore calls the user callbacks only from inside tox_iterate, handing
        // them the user data given to that call (tox.c wraps it in the per-call
        // `Tox_Userdata`), so the pointer never outlives the borrow; the trampolines also
        // ignore NULL. Re-registering on every call (five pointer stores) keeps the
        // trampolines and the user data type in step.
        unsafe {
            tox_callback_self_connection_status(self.ptr(), Some(self_connection_trampoline::<C>));
            tox_callback_friend_connection_status(
                self.ptr(),
                Some(friend_connection_trampoline::<C>),
            );
            tox_callback_friend_request(self.ptr(), Some(friend_request_trampoline::<C>));
            tox_callback_friend_lossy_packet(self.ptr(), Some(lossy_trampoline::<C>));
            tox_callback_friend_lossless_packet(self.ptr(), Some(lossless_trampoline::<C>));
            tox_iterate(self.ptr(), (cb as *mut C).cast());
        }
    }

    /// Our Tox ID (key, current nospam, checksum).
    pub fn address(&self) -> ToxId {
        let mut buf = [0u8; TOX_ID_SIZE];
        // SAFETY: `buf` is TOX_ADDRESS_SIZE (38) bytes.
        unsafe { tox_self_get_address(self.ptr(), buf.as_mut_ptr()) };
        // c-toxcore computes the checksum itself; recomputing keeps one code path.
        let mut pk = [0u8; PUBLIC_KEY_SIZE];
        pk.copy_from_slice(&buf[..PUBLIC_KEY_SIZE]);
        let mut nospam = [0u8; 4];
        nospam.copy_from_slice(&buf[PUBLIC_KEY_SIZE..PUBLIC_KEY_SIZE + 4]);
        ToxId::new(PublicKey(pk), nospam)
    }

    /// The raw 38 address bytes as c-toxcore writes them (used to check our checksum code).
    pub fn address_bytes(&self) -> [u8; TOX_ID_SIZE] {
        let mut buf = [0u8; TOX_ID_SIZE];
        // SAFETY: `buf` is TOX_ADDRESS_SIZE (38) bytes.
        unsafe { tox_self_get_address(self.ptr(), buf.as_mut_ptr()) };
        buf
    }

    /// Our long-term public key.
    pub fn public_key(&self) -> PublicKey {
        let mut pk = [0u8; PUBLIC_KEY_SIZE];
        // SAFETY: `pk` is TOX_PUBLIC_KEY_SIZE (32) bytes.
        unsafe { tox_self_get_public_key(self.ptr(), pk.as_mut_ptr()) };
        PublicKey(pk)
    }

    /// Our long-term secret key: the X25519 half of the identity, which lets a direct
    /// handshake authenticate us to a peer that knows only our public key.
    pub fn secret_key(&self) -> [u8; PUBLIC_KEY_SIZE] {
        let mut sk = [0u8; PUBLIC_KEY_SIZE];
        // SAFETY: `sk` is TOX_SECRET_KEY_SIZE (32) bytes.
        unsafe { tox_self_get_secret_key(self.ptr(), sk.as_mut_ptr()) };
        sk
    }

    /// Our DHT connection as of the last iterate.
    pub fn connection(&self) -> Connection {
        // SAFETY: live instance.
        Connection::from_raw(unsafe { tox_self_get_connection_status(self.ptr()) })
    }

    /// The UDP port we are bound to, if any.
    pub fn udp_port(&self) -> Option<u16> {
        let mut err = 0u32;
        // SAFETY: live instance; `err` is a valid out pointer.
        let port = unsafe { tox_self_get_udp_port(self.ptr(), &mut err) };
        (err == 0).then_some(port)
    }

    /// Registers c-toxcore's UDP socket with the current tokio runtime, so that
    /// [`Instance::udp_readable`] can tell when a packet waits in it (see
    /// `tox::socket`). `false` when the socket cannot be found or registered. Must be
    /// called inside a runtime with I/O enabled.
    pub fn watch_udp(&mut self) -> bool {
        if self.udp_watch.is_some() {
            return true;
        }
        let Some(fd) = self.udp_port().and_then(super::socket::udp_socket) else {
            return false;
        };
        // SAFETY: `fd` is this instance's own UDP socket (the one on its port), which c-toxcore
        // keeps open until tox_kill; the registration lives in `self` and is dropped before
        // tox_kill (see Drop), and `Watched` always returns the same descriptor.
        match unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) } {
            Ok(watch) => {
                self.udp_watch = Some(watch);
                true
            }
            Err(error) => {
                tracing::debug!(error = %error, "cannot watch c-toxcore's udp socket");
                false
            }
        }
    }

    /// Stops watching the UDP socket.
    pub fn unwatch_udp(&mut self) {
        self.udp_watch = None;
    }

    /// Waits until a packet waits in the UDP socket (pending forever when it is not watched).
    /// The readiness is cleared before this returns, so a packet that arrives while the
    /// following `tox_iterate` runs is reported again rather than missed (at worst an
    /// iteration then finds nothing).
    pub async fn udp_readable(&self) -> std::io::Result<()> {
        let Some(watch) = &self.udp_watch else {
            return std::future::pending().await;
        };
        watch.readable().await?.clear_ready();
        Ok(())
    }

    /// Sets the display name other clients show (truncated to 128 bytes).
    pub fn set_name(&mut self, name: &str) {
        let bytes = &name.as_bytes()[..name.len().min(128)];
        let mut err = 0u32;
        // SAFETY: `bytes` is valid for `len` bytes during the call; c-toxcore copies it.
        unsafe { tox_self_set_name(self.ptr(), bytes.as_ptr(), bytes.len(), &mut err) };
    }

    /// Adds a friend by Tox ID and sends a friend request with `message` (1..=1016 bytes).
    pub fn friend_add(&mut self, id: &ToxId, message: &[u8]) -> Result<u32, FriendAddError> {
        let mut err = 0u32;
        // SAFETY: the ID is 38 bytes; `message` is valid for its length; both are copied.
        let n = unsafe {
            tox_friend_add(
                self.ptr(),
                id.as_bytes().as_ptr(),
                message.as_ptr(),
                message.len(),
                &mut err,
            )
        };
        if err == 0 {
            Ok(n)
        } else {
            Err(FriendAddError::from_raw(err))
        }
    }

    /// Adds a friend by key without a request (accepting one, or pre-authorising a peer).
    pub fn friend_add_norequest(&mut self, pk: &PublicKey) -> Result<u32, FriendAddError> {
        let mut err = 0u32;
        // SAFETY: the key is 32 bytes and copied by c-toxcore.
        let n = unsafe { tox_friend_add_norequest(self.ptr(), pk.0.as_ptr(), &mut err) };
        if err == 0 {
            Ok(n)
        } else {
            Err(FriendAddError::from_raw(err))
        }
    }

    /// Removes a friend. Returns false if there was no such friend number.
    pub fn friend_delete(&mut self, friend: u32) -> bool {
        let mut err = 0u32;
        // SAFETY: live instance; any friend number is accepted (unknown ones set `err`).
        unsafe { tox_friend_delete(self.ptr(), friend, &mut err) }
    }

    /// The friend number of a key, if it is a friend.
    pub fn friend_by_public_key(&self, pk: &PublicKey) -> Option<u32> {
        let mut err = 0u32;
        // SAFETY: the key is 32 bytes, read during the call only.
        let n = unsafe { tox_friend_by_public_key(self.ptr(), pk.0.as_ptr(), &mut err) };
        (err == 0).then_some(n)
    }

    /// The key of a friend number, if it exists.
    pub fn friend_public_key(&self, friend: u32) -> Option<PublicKey> {
        let mut pk = [0u8; PUBLIC_KEY_SIZE];
        let mut err = 0u32;
        // SAFETY: `pk` is 32 bytes; unknown friend numbers set `err` and leave it untouched.
        let ok =
            unsafe { tox_friend_get_public_key(self.ptr(), friend, pk.as_mut_ptr(), &mut err) };
        ok.then_some(PublicKey(pk))
    }

    /// A friend's connection as of the last iterate.
    pub fn friend_connection(&self, friend: u32) -> Connection {
        let mut err = 0u32;
        // SAFETY: live instance; unknown friend numbers set `err`.
        let raw = unsafe { tox_friend_get_connection_status(self.ptr(), friend, &mut err) };
        if err == 0 {
            Connection::from_raw(raw)
        } else {
            Connection::None
        }
    }

    /// All friend numbers.
    pub fn friends(&self) -> Vec<u32> {
        // SAFETY: live instance.
        let n = unsafe { tox_self_get_friend_list_size(self.ptr()) };
        let mut list = vec![0u32; n];
        // SAFETY: `list` has room for exactly the count c-toxcore reported just before.
        unsafe { tox_self_get_friend_list(self.ptr(), list.as_mut_ptr()) };
        list
    }

    /// Sends a custom lossy packet (first byte 192..=254, at most [`MAX_CUSTOM_PACKET`]).
    /// c-toxcore encrypts and hands it to the socket before returning.
    pub fn send_lossy(&mut self, friend: u32, data: &[u8]) -> Result<(), PacketError> {
        let mut err = 0u32;
        // SAFETY: `data` is valid for its length during the call; c-toxcore copies it.
        let ok = unsafe {
            tox_friend_send_lossy_packet(self.ptr(), friend, data.as_ptr(), data.len(), &mut err)
        };
        if ok {
            Ok(())
        } else {
            Err(PacketError::from_raw(err))
        }
    }

    /// Sends a custom lossless packet (first byte 160..=191, at most [`MAX_CUSTOM_PACKET`]).
    pub fn send_lossless(&mut self, friend: u32, data: &[u8]) -> Result<(), PacketError> {
        let mut err = 0u32;
        // SAFETY: as in `send_lossy`.
        let ok = unsafe {
            tox_friend_send_lossless_packet(self.ptr(), friend, data.as_ptr(), data.len(), &mut err)
        };
        if ok {
            Ok(())
        } else {
            Err(PacketError::from_raw(err))
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        // The socket closes with the instance: deregister it first.
        self.udp_watch = None;
        // SAFETY: `self.tox` came from tox_new and is killed exactly once, here; nothing uses
        // it afterwards because `self` is gone.
        unsafe { tox_kill(self.ptr()) };
    }
}

/// Runs `f` on the `C` behind `user_data`, swallowing panics: unwinding into C is undefined
/// behaviour (and an abort in Rust), and a lost event is better than a dead process.
///
/// # Safety
/// `user_data` must be NULL or the `*mut C` passed to the running `tox_iterate`.
unsafe fn with_callbacks<C: Callbacks>(user_data: *mut c_void, f: impl FnOnce(&mut C)) {
    if user_data.is_null() {
        return;
    }
    // SAFETY: per this function's contract the pointer is the exclusive `&mut C` that
    // `Instance::iterate` lent to tox_iterate; no other reference to it exists meanwhile.
    let cb = unsafe { &mut *user_data.cast::<C>() };
    if catch_unwind(AssertUnwindSafe(|| f(cb))).is_err() {
        tracing::error!("panic in a tox callback; event dropped");
    }
}

/// Borrows `(data, length)` from c-toxcore as a slice (empty for NULL).
///
/// # Safety
/// If non-NULL, `data` must be valid for reads of `length` bytes for the returned lifetime.
unsafe fn bytes<'a>(data: *const u8, length: usize) -> &'a [u8] {
    if data.is_null() || length == 0 {
        &[]
    } else {
        // SAFETY: guaranteed by the caller.
        unsafe { std::slice::from_raw_parts(data, length) }
    }
}

unsafe extern "C" fn self_connection_trampoline<C: Callbacks>(
    _tox: *mut Tox,
    status: u32,
    user_data: *mut c_void,
) {
    // SAFETY: registered by `Instance::iterate::<C>`, which passes a `*mut C` (or NULL).
    unsafe {
        with_callbacks::<C>(user_data, |c| {
            c.self_connection(Connection::from_raw(status))
        })
    }
}

unsafe extern "C" fn friend_connection_trampoline<C: Callbacks>(
    _tox: *mut Tox,
    friend: u32,
    status: u32,
    user_data: *mut c_void,
) {
    // SAFETY: as in `self_connection_trampoline`.
    unsafe {
        with_callbacks::<C>(user_data, |c| {
            c.friend_connection(friend, Connection::from_raw(status))
        })
    }
}

unsafe extern "C" fn friend_request_trampoline<C: Callbacks>(
    _tox: *mut Tox,
    public_key: *const u8,
    message: *const u8,
    length: usize,
    user_data: *mut c_void,
) {
    if public_key.is_null() {
        return;
    }
    let mut pk = [0u8; PUBLIC_KEY_SIZE];
    // SAFETY: c-toxcore passes a 32-byte key and a message valid for `length` bytes, both for
    // the duration of the callback.
    unsafe {
        pk.copy_from_slice(bytes(public_key, PUBLIC_KEY_SIZE));
        let msg = bytes(message, length);
        with_callbacks::<C>(user_data, |c| c.friend_request(PublicKey(pk), msg));
    }
}

unsafe extern "C" fn lossy_trampoline<C: Callbacks>(
    _tox: *mut Tox,
    friend: u32,
    data: *const u8,
    length: usize,
    user_data: *mut c_void,
) {
    // SAFETY: c-toxcore passes packet data valid for `length` bytes during the callback; the
    // user data is as in `self_connection_trampoline`.
    unsafe {
        let data = bytes(data, length);
        with_callbacks::<C>(user_data, |c| c.lossy_packet(friend, data));
    }
}

unsafe extern "C" fn lossless_trampoline<C: Callbacks>(
    _tox: *mut Tox,
    friend: u32,
    data: *const u8,
    length: usize,
    user_data: *mut c_void,
) {
    // SAFETY: as in `lossy_trampoline`.
    unsafe {
        let data = bytes(data, length);
        with_callbacks::<C>(user_data, |c| c.lossless_packet(friend, data));
    }
}

/// Forwards c-toxcore's log to `tracing`. It may run inside any tox_* call, including tox_new,
/// so it touches no state: it only reads the strings it is given.
unsafe extern "C" fn log_trampoline(
    _tox: *mut Tox,
    level: u32,
    file: *const c_char,
    line: u32,
    func: *const c_char,
    message: *const c_char,
    _user_data: *mut c_void,
) {
    let text = |p: *const c_char| {
        if p.is_null() {
            std::borrow::Cow::Borrowed("")
        } else {
            // SAFETY: c-toxcore passes NUL-terminated strings valid during the callback.
            unsafe { CStr::from_ptr(p) }.to_string_lossy()
        }
    };
    let _ = catch_unwind(AssertUnwindSafe(|| {
        let (file, func, message) = (text(file), text(func), text(message));
        match level {
            0 | 1 => tracing::trace!(target: "toxcore", %file, line, %func, "{message}"),
            2 | 3 => tracing::debug!(target: "toxcore", %file, line, %func, "{message}"),
            _ => tracing::warn!(target: "toxcore", %file, line, %func, "{message}"),
        }
    }));
}

/// How far into its current second c-toxcore's clock is.
///
/// c-toxcore (0.2.x, `mono_time.c`) counts time in whole seconds of `CLOCK_MONOTONIC`, and
/// most of its timers (onion announces, DHT rounds, friend lookups) run once per such second,
/// all of them in the same iteration. `None` where the clock cannot be read here.
pub(crate) fn toxcore_subsec() -> Option<std::time::Duration> {
    #[cfg(target_os = "linux")]
    {
        // `struct timespec` on Linux: `time_t` and `long`, both `long` on the 64-bit targets
        // and on 32-bit ones without 64-bit time (c-toxcore's clock then has the same width).
        #[repr(C)]
        struct Timespec {
            tv_sec: std::ffi::c_long,
            tv_nsec: std::ffi::c_long,
        }
        unsafe extern "C" {
            fn clock_gettime(clock: i32, tp: *mut Timespec) -> i32;
        }
        const CLOCK_MONOTONIC: i32 = 1;
        let mut ts = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable `struct timespec`.
        if unsafe { clock_gettime(CLOCK_MONOTONIC, &mut ts) } != 0 {
            return None;
        }
        let nanos = u64::try_from(ts.tv_nsec).ok()?.min(999_999_999);
        // c-toxcore keeps milliseconds, then divides by 1000.
        Some(std::time::Duration::from_millis(nanos / 1_000_000))
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// Makes `mlock`, `mlock2` and `munlock` fail at once on the calling thread (Linux on x86-64
/// and AArch64; elsewhere it does nothing and says so).
///
/// c-toxcore locks every temporary buffer it encrypts or decrypts a packet in (`crypto_malloc`
/// in `crypto_core.c`) and unlocks it afterwards, ignoring failures. On Linux each call splits
/// and re-merges the heap mapping: measured here, those two syscalls took about 40 % of the
/// Tox thread's time during a bulk transfer, and the Tox thread is what limits throughput. A
/// seccomp filter on this one thread answers the calls with `EPERM` without entering the
/// kernel's memory code. The cost: c-toxcore's buffers (and its long-term keys, allocated the
/// same way on this thread) may be swapped out like the rest of the process's memory.
pub(crate) fn refuse_memory_locks() -> Result<(), std::io::Error> {
    #[cfg(all(
        target_os = "linux",
        any(target_arch = "x86_64", target_arch = "aarch64")
    ))]
    {
        #[repr(C)]
        struct SockFilter {
            code: u16,
            jt: u8,
            jf: u8,
            k: u32,
        }
        #[repr(C)]
        struct SockFprog {
            len: u16,
            filter: *const SockFilter,
        }
        unsafe extern "C" {
            fn prctl(option: i32, ...) -> i32;
        }
        const PR_SET_NO_NEW_PRIVS: i32 = 38;
        const PR_SET_SECCOMP: i32 = 22;
        const SECCOMP_MODE_FILTER: u64 = 2;
        const LD_ABS_W: u16 = 0x20;
        const JEQ_K: u16 = 0x15;
        const RET_K: u16 = 0x06;
        const RET_ALLOW: u32 = 0x7fff_0000;
        const RET_EPERM: u32 = 0x0005_0000 | 1;
        // `struct seccomp_data`: the syscall number at offset 0, the audit arch at 4.
        #[cfg(target_arch = "x86_64")]
        const ARCH_AND_CALLS: (u32, [u32; 3]) = (0xC000_003E, [149, 150, 325]);
        #[cfg(target_arch = "aarch64")]
        const ARCH_AND_CALLS: (u32, [u32; 3]) = (0xC000_00B7, [228, 229, 284]);
        let (arch, [mlock, munlock, mlock2]) = ARCH_AND_CALLS;
        let op = |code, jt, jf, k| SockFilter { code, jt, jf, k };
        let program = [
            op(LD_ABS_W, 0, 0, 4),
            op(JEQ_K, 0, 5, arch), // another ABI: allow
            op(LD_ABS_W, 0, 0, 0),
            op(JEQ_K, 2, 0, mlock),
            op(JEQ_K, 1, 0, munlock),
            op(JEQ_K, 0, 1, mlock2),
            op(RET_K, 0, 0, RET_EPERM),
            op(RET_K, 0, 0, RET_ALLOW),
        ];
        let fprog = SockFprog {
            len: program.len() as u16,
            filter: program.as_ptr(),
        };
        // SAFETY: prctl(2) with PR_SET_NO_NEW_PRIVS takes integer arguments only; it affects
        // the calling thread (and threads it would create), which is the Tox thread and
        // never executes programs.
        if unsafe { prctl(PR_SET_NO_NEW_PRIVS, 1u64, 0u64, 0u64, 0u64) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fprog` points at `program`, both alive for the call; the kernel copies the
        // filter. Without SECCOMP_FILTER_FLAG_TSYNC the filter binds this thread only.
        let fprog_ptr: *const SockFprog = &fprog;
        if unsafe { prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, fprog_ptr) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
    #[cfg(not(all(
        target_os = "linux",
        any(target_arch = "x86_64", target_arch = "aarch64")
    )))]
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "refusing memory locks is implemented for Linux on x86-64 and AArch64 only",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(all(
        target_os = "linux",
        any(target_arch = "x86_64", target_arch = "aarch64")
    ))]
    #[test]
    fn refused_memory_locks_fail_on_that_thread_only() {
        unsafe extern "C" {
            fn mlock(addr: *const c_void, len: usize) -> i32;
            fn munlock(addr: *const c_void, len: usize) -> i32;
        }
        let try_lock = || {
            let buf = vec![0u8; 4096];
            // SAFETY: `buf` is a live allocation of `len` bytes; locking and unlocking it
            // changes no memory contents.
            let locked = unsafe { mlock(buf.as_ptr().cast(), buf.len()) } == 0;
            let error = std::io::Error::last_os_error();
            if locked {
                // SAFETY: as above.
                unsafe { munlock(buf.as_ptr().cast(), buf.len()) };
            }
            (locked, error.raw_os_error())
        };
        let before = std::thread::spawn(try_lock).join().unwrap();
        let filtered = std::thread::spawn(move || {
            refuse_memory_locks().expect("seccomp filter installed");
            // Everything else still works on the thread.
            let other = std::fs::metadata("/").is_ok();
            (try_lock(), other)
        })
        .join()
        .unwrap();
        assert_eq!(
            filtered,
            ((false, Some(1)), true),
            "EPERM on the filtered thread"
        );
        // Other threads are untouched: whether they may lock is up to the system's limits,
        // the same before and after the filter went onto another thread.
        assert_eq!(
            std::thread::spawn(try_lock).join().unwrap().0,
            before.0,
            "{before:?}"
        );
    }

    #[derive(Default)]
    struct Nothing;

    impl Callbacks for Nothing {
        fn self_connection(&mut self, _: Connection) {}
        fn friend_connection(&mut self, _: u32, _: Connection) {}
        fn friend_request(&mut self, _: PublicKey, _: &[u8]) {}
        fn lossy_packet(&mut self, _: u32, _: &[u8]) {}
        fn lossless_packet(&mut self, _: u32, _: &[u8]) {}
    }

    fn offline_options() -> Options {
        // No bootstrap is ever called in these tests, so nothing leaves the host.
        Options {
            udp_enabled: true,
            start_port: 0,
            end_port: 0,
            ..Options::default()
        }
    }

    #[test]
    fn address_checksum_matches_ours() {
        let tox = Instance::new(&offline_options()).unwrap();
        let raw = tox.address_bytes();
        let id = ToxId::from_bytes(raw).expect("c-toxcore's checksum equals ours");
        assert_eq!(id, tox.address());
        assert_eq!(id.public_key(), tox.public_key());
    }

    #[test]
    fn savedata_restores_identity() {
        let a = Instance::new(&offline_options()).unwrap();
        let save = a.savedata();
        let id = a.address();
        drop(a);
        let b = Instance::new(&Options {
            savedata: Some(save),
            ..offline_options()
        })
        .unwrap();
        assert_eq!(b.address(), id);
    }

    #[test]
    fn corrupt_savedata_is_refused() {
        let err = Instance::new(&Options {
            savedata: Some(vec![0xAB; 100]),
            ..offline_options()
        })
        .unwrap_err();
        assert_eq!(err, NewError::LoadBadFormat);
    }

    #[test]
    fn friend_bookkeeping_and_send_errors() {
        let mut a = Instance::new(&offline_options()).unwrap();
        let b = Instance::new(&offline_options()).unwrap();
        let n = a.friend_add(&b.address(), b"hi").unwrap();
        assert_eq!(a.friend_by_public_key(&b.public_key()), Some(n));
        assert_eq!(a.friend_public_key(n), Some(b.public_key()));
        assert_eq!(a.friends(), vec![n]);
        assert_eq!(a.friend_connection(n), Connection::None);
        assert_eq!(
            a.friend_add(&b.address(), b"again").unwrap_err(),
            FriendAddError::AlreadySent
        );
        assert_eq!(
            a.friend_add(&a.address(), b"me").unwrap_err(),
            FriendAddError::OwnKey
        );
        assert_eq!(
            a.send_lossless(n, &[160, 1, 2]).unwrap_err(),
            PacketError::FriendNotConnected
        );
        assert_eq!(
            a.send_lossy(n, &[100, 1]).unwrap_err(),
            PacketError::Invalid
        );
        assert_eq!(
            a.send_lossy(n + 7, &[200]).unwrap_err(),
            PacketError::FriendNotFound
        );
        a.iterate(&mut Nothing);
        assert!(a.iteration_interval() > 0);
        assert!(a.udp_port().is_some());
        assert!(a.friend_delete(n));
        assert!(a.friends().is_empty());
        assert!(!a.friend_delete(n));
    }
}
