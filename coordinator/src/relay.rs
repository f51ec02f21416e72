//! Per-node heartbeat relay: the node's leader (local rank 0) takes the heartbeat streams of
//! the other ranks of its node and forwards what it received, with its own beat, as one
//! [`pb::HeartbeatBatch`] per interval on a single stream to the coordinator. The coordinator
//! then handles one message per node and interval instead of one per rank (Slurm fans its
//! node messages out and in through a tree for the same reason; torchelastic runs one agent
//! per node). A rank whose beats stop is still seen individually: it drops out of its relay's
//! batches and its own silence is what the coordinator reports. A silent relay silences its
//! whole node, and the coordinator then names the relay.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tessera_proto::v1 as pb;
use tessera_proto::v1::heartbeat_relay_server::{HeartbeatRelay, HeartbeatRelayServer};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

use crate::server::TokenCheck;

/// The store key under which the leader of node `node_rank` publishes its relay's address
/// (an empty value: no relay, send heartbeats straight to the coordinator).
pub fn relay_store_key(generation: u64, node_rank: u32) -> String {
    format!("tessera/heartbeat-relay/{generation}/{node_rank}")
}

/// The beats a relay received since its last batch: the latest one of each rank.
#[derive(Debug, Default)]
pub struct PendingBeats {
    latest: Mutex<HashMap<u32, pb::HeartbeatRequest>>,
}

impl PendingBeats {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Records a beat received from a rank of the node (a later one replaces an earlier one).
    pub fn put(&self, beat: pb::HeartbeatRequest) {
        self.lock().insert(beat.rank, beat);
    }

    /// The batch to forward now: `own` (the relay's beat) first, then every beat received
    /// since the last batch, in rank order; the pending set is emptied.
    pub fn take_batch(&self, relay: u32, own: pb::HeartbeatRequest) -> pb::HeartbeatBatch {
        let mut beats = vec![own];
        let mut rest: Vec<pb::HeartbeatRequest> = self.lock().drain().map(|(_, b)| b).collect();
        rest.sort_by_key(|b| b.rank);
        beats.extend(rest.into_iter().filter(|b| b.rank != relay));
        pb::HeartbeatBatch { relay, beats }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, pb::HeartbeatRequest>> {
        // A panic while holding this lock leaves a plain map behind: still usable.
        self.latest.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct RelayService {
    pending: Arc<PendingBeats>,
}

#[tonic::async_trait]
impl HeartbeatRelay for RelayService {
    async fn heartbeats(
        &self,
        req: Request<tonic::Streaming<pb::HeartbeatRequest>>,
    ) -> Result<Response<pb::HeartbeatReply>, Status> {
        let mut beats = req.into_inner();
        while let Some(beat) = beats.message().await? {
            self.pending.put(beat);
        }
        Ok(Response::new(pb::HeartbeatReply {}))
    }
}

/// Serves the relay on `listener` (calls carry the job's `token`) until `shutdown` resolves;
/// received beats land in `pending`. Must run inside a tokio runtime.
pub async fn serve_relay(
    listener: TcpListener,
    token: &str,
    pending: Arc<PendingBeats>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let service = HeartbeatRelayServer::with_interceptor(
        RelayService { pending },
        TokenCheck { token: Arc::from(token) },
    );
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(service)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(rank: u32, step: u64) -> pb::HeartbeatRequest {
        pb::HeartbeatRequest { rank, step: Some(step), ..Default::default() }
    }

    #[test]
    fn a_batch_carries_the_relay_first_then_the_latest_beat_of_each_rank() {
        let p = PendingBeats::new();
        p.put(beat(7, 1));
        p.put(beat(5, 1));
        p.put(beat(7, 2));
        let b = p.take_batch(4, beat(4, 9));
        assert_eq!(b.relay, 4);
        let got: Vec<(u32, Option<u64>)> = b.beats.iter().map(|b| (b.rank, b.step)).collect();
        assert_eq!(got, vec![(4, Some(9)), (5, Some(1)), (7, Some(2))]);
        // Emptied: the next batch holds only what arrived since.
        let b = p.take_batch(4, beat(4, 10));
        assert_eq!(b.beats.len(), 1);
    }

    #[test]
    fn a_beat_claiming_the_relays_rank_is_not_forwarded_twice() {
        let p = PendingBeats::new();
        p.put(beat(4, 3));
        let b = p.take_batch(4, beat(4, 9));
        assert_eq!(b.beats.iter().map(|b| (b.rank, b.step)).collect::<Vec<_>>(), [(4, Some(9))]);
    }
}
