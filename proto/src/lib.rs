//! The Tessera coordinator's gRPC schema (package `tessera.v1`) and its generated Rust types.
//!
//! Only small control-plane messages live here; tensors never travel over gRPC.

/// Generated messages, the `coordinator_client` and the `coordinator_server` modules.
pub mod v1 {
    tonic::include_proto!("tessera.v1");
}

/// Metadata key that carries the job token on every call.
pub const TOKEN_METADATA_KEY: &str = "x-tessera-token";
