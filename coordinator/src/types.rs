//! Plain data types shared by the state machine, the server and the client.

use std::time::Duration;

/// What a rank tells the coordinator when it joins.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JoinInfo {
    /// Host name of the rank's machine (ranks on the same host share a node).
    pub host: String,
    /// Local rank given by the launcher, if any (only a sort key; the coordinator recomputes it).
    pub local_rank: Option<u32>,
    /// Process id of the rank.
    pub pid: u32,
    /// Rank given by the launcher (`tessera run`, mpirun, slurm), if any.
    pub launcher_rank: Option<u32>,
    /// World size according to the launcher, if any.
    pub launcher_world: Option<u32>,
    /// Hash of the training configuration; every rank must agree.
    pub config_hash: String,
    /// Build version; every rank must agree.
    pub version: String,
    /// "ip:port" of the rank's data-plane listener.
    pub data_addr: String,
    /// The restart generation the rank was started for, if its launcher restarts jobs.
    pub generation: Option<u64>,
}

/// The rank's place in the world, as decided by the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    pub rank: u32,
    pub world: u32,
    pub local_rank: u32,
    pub local_size: u32,
    pub node_rank: u32,
    pub num_nodes: u32,
    pub generation: u64,
    /// Data-plane address of rank `(rank + 1) % world`, the only peer a ring connects to.
    pub next_data_addr: String,
    /// The rank of local rank 0 on this rank's node: the node's heartbeat relay.
    pub node_leader: u32,
    /// How often the rank should send heartbeats.
    pub heartbeat_interval: Duration,
}

/// Training progress a rank reports with its heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Progress {
    pub step: u64,
    pub loss: Option<f32>,
    pub samples: u64,
    /// The latest smoothed gradient noise scale, when measured.
    pub b_simple: Option<f64>,
}

/// The latest progress of one rank, as the coordinator knows it (for the launcher's bar).
#[derive(Debug, Clone, PartialEq)]
pub struct RankProgress {
    pub rank: u32,
    pub launcher_rank: Option<u32>,
    pub host: String,
    /// `None` until the rank sent its first heartbeat with progress.
    pub progress: Option<Progress>,
    /// Time since the rank's last heartbeat (or since the world formed).
    pub since_heartbeat: Duration,
    pub finished: bool,
}

/// Why the job was aborted: the failed rank (when one is to blame) and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbortInfo {
    pub rank: Option<u32>,
    pub reason: String,
}

impl std::fmt::Display for AbortInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.rank {
            Some(rank) => write!(f, "rank {rank} failed: {}", self.reason),
            None => write!(f, "{}", self.reason),
        }
    }
}

/// Formats a duration compactly for messages: "850ms", "5s", "1.5s".
pub fn fmt_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}
