use std::time::Duration;

/// What went wrong in a collective, naming the operation, its sequence number and the peer.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    #[error("{op} #{seq}: rank {peer} disconnected ({detail})")]
    PeerDisconnected { op: &'static str, seq: u64, peer: usize, detail: String },
    #[error("{op} #{seq}: rank {peer} sent nothing for {after:?} (timeout); it is stalled or dead")]
    Timeout { op: &'static str, seq: u64, peer: usize, after: Duration },
    #[error("{op} #{seq}: protocol error with rank {peer}: {detail}")]
    Protocol { op: &'static str, seq: u64, peer: usize, detail: String },
    #[error("{op}: invalid argument: {detail}")]
    InvalidArgument { op: &'static str, detail: String },
    #[error(
        "collective #{call}: ranks diverge (rank {first} is the first that differs): {detail}; \
         every rank must call the same collectives in the same order with the same sizes"
    )]
    Diverged { call: u64, first: usize, detail: String },
    #[error("setting up the data plane: {0}")]
    Setup(String),
    #[error(
        "the communicator is unusable after an earlier error ({0}); restart the job or build a \
         new communicator"
    )]
    Poisoned(String),
}
