//! Errors of the mux, one enum per failure domain.

use std::sync::Arc;

use super::frame::{Cmd, StreamId};

/// The peer broke the protocol. Fatal: the mux fails and every stream reports it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// A command byte that names no command.
    #[error("unknown frame command {0:#04x}")]
    UnknownCommand(u8),
    /// A stream frame for the reserved id 0.
    #[error("{0:?} frame for reserved stream id 0")]
    ReservedId(Cmd),
    /// A frame for a stream that is not open (never opened, or released).
    #[error("{cmd:?} frame for unknown stream {id}")]
    UnknownStream {
        /// The command of the frame.
        cmd: Cmd,
        /// The stream it named.
        id: StreamId,
    },
    /// A PSH payload larger than we accept.
    #[error("data frame of {len} bytes exceeds the maximum of {max}")]
    FrameTooLarge {
        /// The announced payload length.
        len: u32,
        /// [`Config::max_input_frame`](super::Config::max_input_frame).
        max: usize,
    },
    /// The peer sent more than the credit we gave it.
    #[error(
        "peer sent {len} bytes on stream {id} with {outstanding} of its {window}-byte credit \
         already used"
    )]
    CreditExceeded {
        /// The stream.
        id: StreamId,
        /// The payload length of the offending frame.
        len: u32,
        /// Unconfirmed bytes before it.
        outstanding: u32,
        /// The window.
        window: u32,
    },
    /// Data after the peer's FIN.
    #[error("data on stream {0} after its fin")]
    DataAfterFin(StreamId),
    /// A second FIN.
    #[error("duplicate fin on stream {0}")]
    DuplicateFin(StreamId),
    /// SYN for an id of the space this end opens from ([`Config::stream_ids`]).
    ///
    /// [`Config::stream_ids`]: super::Config::stream_ids
    #[error("syn for stream {0}, an id of this end's own space")]
    OpenInOurIdSpace(StreamId),
    /// SYN for an id that is in use and cannot be a simultaneous open.
    #[error("syn for stream {0}, which is in use")]
    DuplicateSyn(StreamId),
    /// The peer confirmed more than we had sent unconfirmed.
    #[error("peer confirmed {amount} bytes on stream {id} but only {unconfirmed} were unconfirmed")]
    BogusConfirm {
        /// The stream.
        id: StreamId,
        /// The confirmed amount.
        amount: u32,
        /// What was unconfirmed.
        unconfirmed: u32,
    },
    /// The peer grew our credit on a stream beyond the window.
    #[error(
        "peer grew the credit of stream {id} by {grown} bytes from {credit}, beyond the {window}-byte window"
    )]
    CreditBeyondWindow {
        /// The stream.
        id: StreamId,
        /// The growth it announced.
        grown: u32,
        /// Our credit before it.
        credit: u32,
        /// The window.
        window: u32,
    },
    /// A VRM reply without an outstanding challenge.
    #[error("verification reply without a challenge")]
    UnexpectedVerifyReply,
    /// A wrong VRM reply: the peer does not speak this protocol.
    #[error("wrong verification reply: the peer does not speak this protocol")]
    VerifyMismatch,
    /// The peer sends VRM requests faster than we answer them.
    #[error("peer floods verification requests")]
    VerifyFlood,
    /// Input after the mux failed for another reason (the link died).
    #[error("mux already failed")]
    Failed,
}

/// Why a mux stopped working.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Failure {
    /// The peer broke the protocol.
    #[error("protocol violation: {0}")]
    Protocol(ProtocolError),
    /// The link under the mux failed or was shut down.
    #[error("link failed: {0}")]
    Link(Arc<str>),
}

impl Failure {
    /// A link failure with this reason.
    pub fn link(reason: impl std::fmt::Display) -> Self {
        Self::Link(reason.to_string().into())
    }
}

/// Opening a stream failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// All 65,535 stream ids are in use.
    #[error("all stream ids are in use")]
    IdsExhausted,
    /// The mux failed.
    #[error("mux failed: {0}")]
    MuxFailed(Failure),
}

/// A stream operation failed or cannot proceed yet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// Nothing to read yet (not an error of the stream: retry after `Readable`).
    #[error("stream would block")]
    WouldBlock,
    /// The id names no stream the application holds.
    #[error("stream {0} is not open")]
    UnknownStream(StreamId),
    /// Write after `finish`.
    #[error("stream {0} was finished for writing")]
    Finished(StreamId),
    /// The mux failed.
    #[error("mux failed: {0}")]
    MuxFailed(Failure),
}

/// A verification challenge could not be sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// [`Config::max_verify_outstanding`](super::Config::max_verify_outstanding) challenges
    /// await answers.
    #[error("too many verification challenges outstanding")]
    TooManyOutstanding,
    /// The mux failed.
    #[error("mux failed: {0}")]
    MuxFailed(Failure),
}

impl From<StreamError> for std::io::Error {
    fn from(error: StreamError) -> Self {
        use std::io::ErrorKind;
        let kind = match &error {
            StreamError::WouldBlock => ErrorKind::WouldBlock,
            StreamError::UnknownStream(_) => ErrorKind::NotConnected,
            StreamError::Finished(_) => ErrorKind::BrokenPipe,
            StreamError::MuxFailed(Failure::Protocol(_)) => ErrorKind::InvalidData,
            StreamError::MuxFailed(_) => ErrorKind::ConnectionAborted,
        };
        Self::new(kind, error)
    }
}

impl From<OpenError> for std::io::Error {
    fn from(error: OpenError) -> Self {
        let kind = match &error {
            OpenError::IdsExhausted => std::io::ErrorKind::OutOfMemory,
            OpenError::MuxFailed(_) => std::io::ErrorKind::ConnectionAborted,
        };
        Self::new(kind, error)
    }
}
