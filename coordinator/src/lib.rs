//! Tessera's control plane: rendezvous, key-value store, barriers, heartbeats and abort
//! fan-out, as a tonic gRPC service ([`server`]) with a blocking client for rank processes
//! ([`client`]). The decisions are a pure state machine ([`state`]) tested with injected time.

pub mod client;
pub mod error;
pub mod relay;
pub mod server;
pub mod state;
pub mod types;

pub use client::{CoordinatorClient, HeartbeatRoute, MonitorHandle, ProgressCell};
pub use error::{CoordinatorError, Result};
pub use server::{
    BlockingCoordinator, CoordinatorConfig, CoordinatorHandle, generate_token, run_standalone,
    serve, serve_until_done,
};
pub use state::{CoordinatorState, Decision, Phase, Refusal, RefusalKind, StateConfig};
pub use tessera_proto::TOKEN_METADATA_KEY;
pub use types::{AbortInfo, JoinInfo, Membership, Progress, RankProgress};
