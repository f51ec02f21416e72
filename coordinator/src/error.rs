//! The coordinator crate's error type.

use crate::types::AbortInfo;

/// Everything that can go wrong talking to, or running, the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The coordinator could not be reached within the connect timeout.
    #[error(
        "cannot reach the coordinator at {addr}: {detail}; check that it is running and that \
         --coordinator / TESSERA_COORDINATOR names its address"
    )]
    Connect { addr: String, detail: String },

    /// An address that is not "host:port".
    #[error(
        "invalid coordinator address {addr:?}: {detail}; expected host:port, e.g. 127.0.0.1:29500"
    )]
    InvalidAddress { addr: String, detail: String },

    /// A job token that cannot travel in gRPC metadata.
    #[error(
        "invalid job token: it must be non-empty visible ASCII (set TESSERA_TOKEN to the token \
         printed by the coordinator)"
    )]
    InvalidToken,

    /// A coordinator call was refused or failed; `message` is the coordinator's explanation.
    #[error("coordinator {call} at {addr} failed ({code:?}): {message}")]
    Rpc { call: &'static str, addr: String, code: tonic::Code, message: String },

    /// The job was aborted because a rank failed.
    #[error("job aborted: {0}")]
    Aborted(AbortInfo),

    /// Invalid coordinator settings.
    #[error("invalid coordinator configuration: {0}")]
    InvalidConfig(String),

    /// The server could not start or stopped with an error.
    #[error("coordinator server on {addr} failed: {detail}")]
    Serve { addr: String, detail: String },

    /// The client's internal runtime could not be created.
    #[error("cannot create the coordinator client's runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

impl CoordinatorError {
    /// The gRPC status code, for [`CoordinatorError::Rpc`].
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            CoordinatorError::Rpc { code, .. } => Some(*code),
            _ => None,
        }
    }

    pub(crate) fn rpc(call: &'static str, addr: &str, status: tonic::Status) -> Self {
        CoordinatorError::Rpc {
            call,
            addr: addr.to_owned(),
            code: status.code(),
            message: status.message().to_owned(),
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = CoordinatorError> = std::result::Result<T, E>;
