//! The coordinator's decision logic as a pure state machine.
//!
//! No tokio, no clocks: every event carries `now`, so membership, liveness and abort decisions
//! are a function of (state, now) and are unit-tested with injected time. The gRPC server in
//! [`crate::server`] wraps this type in a mutex and calls [`CoordinatorState::tick`] periodically.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use crate::types::{AbortInfo, JoinInfo, Membership, Progress, RankProgress, fmt_duration};

/// The knobs the decision logic needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateConfig {
    /// Number of ranks the world waits for.
    pub world: usize,
    /// A running rank without a heartbeat for longer than this is declared failed.
    pub heartbeat_timeout: Duration,
    /// The world must have formed within this time of the coordinator's start.
    pub join_timeout: Duration,
    /// Interval ranks are told to send heartbeats at.
    pub heartbeat_interval: Duration,
    /// The restart generation of this coordinator's world (1 for a first start; a launcher
    /// that restarts a failed job starts a coordinator of the next generation).
    pub generation: u64,
}

/// The class of a refused request; the server maps it to a gRPC status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// The request itself is malformed (unknown rank, empty key, ...).
    InvalidArgument,
    /// The job is not in a state that allows this (config mismatch, world not formed).
    FailedPrecondition,
    /// A deadline passed (join timeout).
    DeadlineExceeded,
    /// The world is already full.
    ResourceExhausted,
    /// The job was aborted because a rank failed.
    Aborted,
}

/// A refused request: its class and a message that says what was wrong and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub kind: RefusalKind,
    pub message: String,
}

impl Refusal {
    fn new(kind: RefusalKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }
}

/// What the server must do after an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Abort every rank (sent on every Watch stream).
    Abort(AbortInfo),
    /// Every rank finished normally.
    Done,
}

/// Where the job stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the world to join.
    Joining,
    /// The world formed; ranks are training.
    Running,
    /// The job failed; every request is refused with this refusal.
    Failed { refusal: Refusal, abort: AbortInfo },
    /// Every rank finished normally.
    Done,
}

/// Handle a joining rank keeps to collect its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JoinTicket(usize);

/// Handle a rank keeps while it waits in a barrier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BarrierTicket {
    name: String,
    rank: u32,
    round: u64,
}

#[derive(Debug)]
struct Member {
    info: JoinInfo,
    membership: Membership,
    last_heartbeat: Instant,
    /// The relay that forwarded the last heartbeat (`None`: the rank sent it itself, or none
    /// arrived yet).
    relayed_by: Option<u32>,
    /// Whether any heartbeat of this rank arrived yet.
    heard: bool,
    /// Whether this rank forwards its node's heartbeats (it sent a batch).
    relays: bool,
    progress: Option<Progress>,
    finished: bool,
}

#[derive(Debug, Default)]
struct BarrierState {
    round: u64,
    arrived: BTreeSet<u32>,
}

/// The coordinator's whole state.
#[derive(Debug)]
pub struct CoordinatorState {
    cfg: StateConfig,
    started: Instant,
    joiners: Vec<JoinInfo>,
    /// Join ticket -> rank, once the world formed.
    assignment: Vec<u32>,
    /// Indexed by rank, once the world formed.
    members: Vec<Member>,
    phase: Phase,
    store: HashMap<String, Vec<u8>>,
    barriers: HashMap<String, BarrierState>,
}

/// Names at most this many ranks in a message, then "and K more".
const MAX_NAMED: usize = 8;

fn describe_joiner(info: &JoinInfo) -> String {
    match info.launcher_rank {
        Some(r) => format!("launcher rank {r} (host {}, pid {})", info.host, info.pid),
        None => format!("host {} pid {}", info.host, info.pid),
    }
}

fn join_names(names: &[String]) -> String {
    if names.len() <= MAX_NAMED {
        names.join(", ")
    } else {
        format!("{} and {} more", names[..MAX_NAMED].join(", "), names.len() - MAX_NAMED)
    }
}

fn ranks_word(n: usize) -> &'static str {
    if n == 1 { "rank" } else { "ranks" }
}

impl CoordinatorState {
    /// A fresh coordinator started at `now`.
    pub fn new(cfg: StateConfig, now: Instant) -> Result<Self, Refusal> {
        if cfg.world == 0 || cfg.world > u32::MAX as usize {
            return Err(Refusal::new(
                RefusalKind::InvalidArgument,
                format!(
                    "world size {} is invalid: it must be between 1 and {}",
                    cfg.world,
                    u32::MAX
                ),
            ));
        }
        if cfg.heartbeat_timeout.is_zero() || cfg.join_timeout.is_zero() {
            return Err(Refusal::new(
                RefusalKind::InvalidArgument,
                "heartbeat and join timeouts must be greater than zero",
            ));
        }
        if cfg.heartbeat_interval >= cfg.heartbeat_timeout {
            return Err(Refusal::new(
                RefusalKind::InvalidArgument,
                format!(
                    "heartbeat interval {} must be shorter than the heartbeat timeout {} (a few \
                     times shorter, so one late heartbeat is not a failure)",
                    fmt_duration(cfg.heartbeat_interval),
                    fmt_duration(cfg.heartbeat_timeout)
                ),
            ));
        }
        Ok(Self {
            cfg,
            started: now,
            joiners: Vec::new(),
            assignment: Vec::new(),
            members: Vec::new(),
            phase: Phase::Joining,
            store: HashMap::new(),
            barriers: HashMap::new(),
        })
    }

    pub fn config(&self) -> &StateConfig {
        &self.cfg
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// Why the job was aborted, if it was.
    pub fn abort_info(&self) -> Option<&AbortInfo> {
        match &self.phase {
            Phase::Failed { abort, .. } => Some(abort),
            _ => None,
        }
    }

    /// The refusal every request gets once the job failed.
    pub fn failure(&self) -> Option<&Refusal> {
        match &self.phase {
            Phase::Failed { refusal, .. } => Some(refusal),
            _ => None,
        }
    }

    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Number of ranks that joined so far.
    pub fn joined(&self) -> usize {
        self.joiners.len()
    }

    /// A rank asks to join. The reply is collected with [`Self::join_result`].
    pub fn on_join(&mut self, info: JoinInfo, now: Instant) -> Result<JoinTicket, Refusal> {
        if let Some(refusal) = self.failure() {
            return Err(refusal.clone());
        }
        if let Some(g) = info.generation
            && g != self.cfg.generation
        {
            return Err(Refusal::new(
                RefusalKind::FailedPrecondition,
                format!(
                    "{} was started for generation {g}, but this job is at generation {}: it is \
                     a stale rank of an earlier attempt (the job was restarted); stop it",
                    describe_joiner(&info),
                    self.cfg.generation
                ),
            ));
        }
        if self.joiners.len() >= self.cfg.world {
            return Err(Refusal::new(
                RefusalKind::ResourceExhausted,
                format!(
                    "the world is full: all {} ranks already joined, so {} is one too many; \
                     check the world size given to the coordinator (--world/--nproc) and that \
                     no rank was started twice",
                    self.cfg.world,
                    describe_joiner(&info)
                ),
            ));
        }
        self.joiners.push(info);
        let ticket = JoinTicket(self.joiners.len() - 1);
        if self.joiners.len() == self.cfg.world {
            self.form_world(now);
        }
        Ok(ticket)
    }

    /// The reply for a join: `None` while the world is still forming.
    pub fn join_result(&self, ticket: JoinTicket) -> Option<Result<Membership, Refusal>> {
        if let Some(&rank) = self.assignment.get(ticket.0) {
            return Some(Ok(self.members[rank as usize].membership.clone()));
        }
        self.failure().map(|r| Err(r.clone()))
    }

    fn form_world(&mut self, now: Instant) {
        if let Some(refusal) = self.mismatch("config hash", |j| &j.config_hash) {
            self.fail(refusal, None);
            return;
        }
        if let Some(refusal) = self.mismatch("build version", |j| &j.version) {
            self.fail(refusal, None);
            return;
        }
        let world = self.cfg.world;
        // Launcher ranks are used when every rank has one and they are dense and unique.
        let launcher_ok = {
            let mut seen = vec![false; world];
            self.joiners.iter().all(|j| {
                let world_ok = j.launcher_world.is_none_or(|w| w as usize == world);
                match j.launcher_rank {
                    Some(r) if (r as usize) < world && world_ok && !seen[r as usize] => {
                        seen[r as usize] = true;
                        true
                    }
                    _ => false,
                }
            })
        };
        // order[rank] = join ticket
        let order: Vec<usize> = if launcher_ok {
            let mut order = vec![0; world];
            for (t, j) in self.joiners.iter().enumerate() {
                if let Some(r) = j.launcher_rank {
                    order[r as usize] = t;
                }
            }
            order
        } else {
            let mut order: Vec<usize> = (0..world).collect();
            order.sort_by(|&a, &b| {
                let (ja, jb) = (&self.joiners[a], &self.joiners[b]);
                // Ranks without a local rank sort after those with one on the same host.
                let la = ja.local_rank.map_or((1, 0), |l| (0, l));
                let lb = jb.local_rank.map_or((1, 0), |l| (0, l));
                (&ja.host, la, ja.pid, a).cmp(&(&jb.host, lb, jb.pid, b))
            });
            order
        };
        // Nodes ordered by the lowest rank on them; per node: (node rank, size, leader rank).
        // Everything here is O(world): replies to thousands of ranks are formed at once.
        let mut nodes: HashMap<&str, (u32, u32, u32)> = HashMap::new();
        for (rank, &t) in order.iter().enumerate() {
            let next_node = nodes.len() as u32;
            nodes.entry(self.joiners[t].host.as_str()).or_insert((next_node, 0, rank as u32)).1 +=
                1;
        }
        let num_nodes = nodes.len() as u32;
        let mut assignment = vec![0u32; world];
        let mut members = Vec::with_capacity(world);
        let mut next_local: HashMap<&str, u32> = HashMap::new();
        for (rank, &t) in order.iter().enumerate() {
            let info = &self.joiners[t];
            let host = info.host.as_str();
            let (node_rank, local_size, node_leader) = nodes[host];
            let local = next_local.entry(host).or_insert(0);
            let local_rank = *local;
            *local += 1;
            let next_data_addr = self.joiners[order[(rank + 1) % world]].data_addr.clone();
            assignment[t] = rank as u32;
            members.push(Member {
                info: info.clone(),
                membership: Membership {
                    rank: rank as u32,
                    world: world as u32,
                    local_rank,
                    local_size,
                    node_rank,
                    num_nodes,
                    generation: self.cfg.generation,
                    next_data_addr,
                    node_leader,
                    heartbeat_interval: self.cfg.heartbeat_interval,
                },
                last_heartbeat: now,
                relayed_by: None,
                heard: false,
                relays: false,
                progress: None,
                finished: false,
            });
        }
        self.assignment = assignment;
        self.members = members;
        self.phase = Phase::Running;
    }

    /// A refusal naming the ranks whose `field` differs from the majority's, if any.
    fn mismatch(&self, what: &str, field: impl Fn(&JoinInfo) -> &String) -> Option<Refusal> {
        let mut groups: Vec<(&String, Vec<&JoinInfo>)> = Vec::new();
        for j in &self.joiners {
            match groups.iter_mut().find(|(v, _)| *v == field(j)) {
                Some((_, members)) => members.push(j),
                None => groups.push((field(j), vec![j])),
            }
        }
        if groups.len() <= 1 {
            return None;
        }
        // The reference is the largest group (the first to join on a tie).
        let reference = groups
            .iter()
            .enumerate()
            .max_by(|(ia, a), (ib, b)| a.1.len().cmp(&b.1.len()).then(ib.cmp(ia)))
            .map(|(i, _)| i)
            .unwrap_or(0);
        let (ref_value, ref_members) = &groups[reference];
        let others: Vec<String> = groups
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != reference)
            .map(|(_, (value, members))| {
                let names: Vec<String> = members.iter().map(|j| describe_joiner(j)).collect();
                format!(
                    "{} {} {what} {value}",
                    join_names(&names),
                    if members.len() == 1 { "has" } else { "have" }
                )
            })
            .collect();
        let ref_names: Vec<String> = ref_members.iter().map(|j| describe_joiner(j)).collect();
        Some(Refusal::new(
            RefusalKind::FailedPrecondition,
            format!(
                "{what} mismatch, refusing to start: {}, while the other {} {} ({}) {} {what} \
                 {ref_value}; every rank must run the same build with the same configuration",
                others.join("; "),
                ref_members.len(),
                ranks_word(ref_members.len()),
                join_names(&ref_names),
                if ref_members.len() == 1 { "has" } else { "have" },
            ),
        ))
    }

    fn fail(&mut self, refusal: Refusal, rank: Option<u32>) -> Vec<Decision> {
        if matches!(self.phase, Phase::Failed { .. } | Phase::Done) {
            return Vec::new();
        }
        let abort = AbortInfo { rank, reason: refusal.message.clone() };
        self.phase = Phase::Failed { refusal, abort: abort.clone() };
        vec![Decision::Abort(abort)]
    }

    fn describe_rank(&self, rank: u32) -> String {
        let m = &self.members[rank as usize];
        format!("rank {rank} (host {}, pid {})", m.info.host, m.info.pid)
    }

    fn check_rank(&self, rank: u32, what: &str) -> Result<(), Refusal> {
        if self.members.is_empty() {
            return Err(Refusal::new(
                RefusalKind::FailedPrecondition,
                format!(
                    "{what} from rank {rank} before the world formed ({} of {} ranks joined): \
                     join first",
                    self.joiners.len(),
                    self.cfg.world
                ),
            ));
        }
        if rank as usize >= self.members.len() {
            return Err(Refusal::new(
                RefusalKind::InvalidArgument,
                format!(
                    "{what} from rank {rank}, but the world has {} ranks (0..{})",
                    self.members.len(),
                    self.members.len() - 1
                ),
            ));
        }
        Ok(())
    }

    /// A heartbeat, with the rank's latest progress if it sent any.
    pub fn on_heartbeat(
        &mut self,
        rank: u32,
        progress: Option<Progress>,
        now: Instant,
    ) -> Result<(), Refusal> {
        if let Some(refusal) = self.failure() {
            return Err(refusal.clone());
        }
        self.check_rank(rank, "heartbeat")?;
        self.beat(rank, None, progress, now);
        Ok(())
    }

    /// A batch of heartbeats forwarded by `relay`, the leader of their node (its own beat
    /// among them). The whole batch is refused if any beat in it names a rank that does not
    /// exist or lives on another node than the relay.
    pub fn on_relayed_heartbeats(
        &mut self,
        relay: u32,
        beats: &[(u32, Option<Progress>)],
        now: Instant,
    ) -> Result<(), Refusal> {
        if let Some(refusal) = self.failure() {
            return Err(refusal.clone());
        }
        self.check_rank(relay, "relayed heartbeats")?;
        let node = self.members[relay as usize].membership.node_rank;
        for &(rank, _) in beats {
            self.check_rank(rank, "relayed heartbeat")?;
            if self.members[rank as usize].membership.node_rank != node {
                return Err(Refusal::new(
                    RefusalKind::InvalidArgument,
                    format!(
                        "rank {relay} relayed a heartbeat of rank {rank}, which is on node {} \
                         while the relay is on node {node}: ranks relay only through their own \
                         node's leader",
                        self.members[rank as usize].membership.node_rank
                    ),
                ));
            }
        }
        self.members[relay as usize].relays = true;
        for &(rank, progress) in beats {
            self.beat(rank, (rank != relay).then_some(relay), progress, now);
        }
        Ok(())
    }

    fn beat(
        &mut self,
        rank: u32,
        relayed_by: Option<u32>,
        progress: Option<Progress>,
        now: Instant,
    ) {
        let m = &mut self.members[rank as usize];
        m.last_heartbeat = now;
        m.relayed_by = relayed_by;
        m.heard = true;
        if progress.is_some() {
            m.progress = progress;
        }
    }

    /// A rank declares it failed: every rank is aborted.
    pub fn on_report_error(&mut self, rank: u32, reason: &str) -> Result<Vec<Decision>, Refusal> {
        if self.failure().is_some() || self.is_done() {
            return Ok(Vec::new());
        }
        self.check_rank(rank, "error report")?;
        let message = format!("{} reported an error: {reason}", self.describe_rank(rank));
        Ok(self.fail(Refusal::new(RefusalKind::Aborted, message), Some(rank)))
    }

    /// The launcher saw the process it started as `launcher_rank` fail (e.g. exit non-zero).
    /// When the world formed with other ranks than the launcher's, the rank that joined with
    /// that launcher rank is blamed; before the world formed, the launcher rank is named.
    pub fn on_launcher_failure(&mut self, launcher_rank: u32, reason: &str) -> Vec<Decision> {
        if self.failure().is_some() || self.is_done() {
            return Vec::new();
        }
        let rank = self
            .members
            .iter()
            .position(|m| m.info.launcher_rank == Some(launcher_rank))
            .map(|r| r as u32);
        let message = match rank {
            Some(r) => format!("{} {reason}", self.describe_rank(r)),
            None => format!("launcher rank {launcher_rank} {reason}"),
        };
        let blamed = rank.or(Some(launcher_rank));
        self.fail(Refusal::new(RefusalKind::Aborted, message), blamed)
    }

    /// A rank is done: it no longer needs heartbeats and its disconnect is not a failure.
    pub fn on_finish(&mut self, rank: u32) -> Result<Vec<Decision>, Refusal> {
        if self.failure().is_some() || self.is_done() {
            return Ok(Vec::new());
        }
        self.check_rank(rank, "finish")?;
        self.members[rank as usize].finished = true;
        if self.members.iter().all(|m| m.finished) {
            self.phase = Phase::Done;
            return Ok(vec![Decision::Done]);
        }
        Ok(Vec::new())
    }

    /// Time-driven decisions: the join timeout and overdue heartbeats.
    pub fn tick(&mut self, now: Instant) -> Vec<Decision> {
        match self.phase {
            Phase::Joining => {
                let elapsed = now.saturating_duration_since(self.started);
                if elapsed >= self.cfg.join_timeout {
                    let message = self.join_timeout_message();
                    return self.fail(Refusal::new(RefusalKind::DeadlineExceeded, message), None);
                }
                Vec::new()
            }
            Phase::Running => {
                let overdue = self
                    .members
                    .iter()
                    .enumerate()
                    .filter(|(_, m)| !m.finished)
                    .map(|(r, m)| (r, now.saturating_duration_since(m.last_heartbeat)))
                    .filter(|(_, silent)| *silent > self.cfg.heartbeat_timeout)
                    .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)));
                let Some((rank, silent)) = overdue else { return Vec::new() };
                // A silent relay silences the ranks it relays for: blame the relay. Its last
                // batch may be up to an interval younger than a relayed rank's last beat, so
                // a relay that has missed two intervals is waited for until its own budget runs
                // out.
                let (rank, silent) = match self.relay_of(rank) {
                    Some(relay) => {
                        let m = &self.members[relay as usize];
                        let relay_silent = now.saturating_duration_since(m.last_heartbeat);
                        if m.finished {
                            (rank, silent)
                        } else if relay_silent > self.cfg.heartbeat_timeout {
                            (relay as usize, relay_silent)
                        } else if relay_silent > 2 * self.cfg.heartbeat_interval {
                            return Vec::new();
                        } else {
                            (rank, silent)
                        }
                    }
                    None => (rank, silent),
                };
                let relayed = (0..self.members.len())
                    .filter(|&r| !self.members[r].finished && self.relay_of(r) == Some(rank as u32))
                    .count();
                let also = if relayed > 0 {
                    format!(
                        " (it also relays the heartbeats of {relayed} other {} of its node)",
                        ranks_word(relayed)
                    )
                } else {
                    String::new()
                };
                let message = format!(
                    "{} missed its heartbeat budget: no heartbeat for {} (budget {}){also}; it \
                     died, hung or lost its connection to the coordinator",
                    self.describe_rank(rank as u32),
                    fmt_duration(silent),
                    fmt_duration(self.cfg.heartbeat_timeout)
                );
                self.fail(Refusal::new(RefusalKind::Aborted, message), Some(rank as u32))
            }
            _ => Vec::new(),
        }
    }

    /// The relay rank `rank`'s heartbeats go through: the one that forwarded its last beat,
    /// or, for a rank never heard from, its node leader if that relays (the relay may have
    /// stopped before its first batch with that rank in it).
    fn relay_of(&self, rank: usize) -> Option<u32> {
        let m = &self.members[rank];
        let leader = m.membership.node_leader;
        m.relayed_by.or_else(|| {
            (!m.heard && leader as usize != rank && self.members[leader as usize].relays)
                .then_some(leader)
        })
    }

    fn join_timeout_message(&self) -> String {
        let world = self.cfg.world;
        let joined = self.joiners.len();
        let missing = world - joined;
        let given: BTreeSet<u32> = self.joiners.iter().filter_map(|j| j.launcher_rank).collect();
        let head = format!(
            "{joined} of {world} ranks joined after {}",
            fmt_duration(self.cfg.join_timeout)
        );
        let detail = if !given.is_empty() && given.len() == joined {
            let missing_ranks: Vec<u32> =
                (0..world as u32).filter(|r| !given.contains(r)).collect();
            format!("missing launcher ranks {missing_ranks:?}")
        } else {
            let names: Vec<String> = self.joiners.iter().map(describe_joiner).collect();
            if names.is_empty() {
                format!("{missing} {} missing", ranks_word(missing))
            } else {
                format!(
                    "{missing} {} missing (ranks had no launcher rank; joined: {})",
                    ranks_word(missing),
                    join_names(&names)
                )
            }
        };
        format!(
            "{head}; {detail}; check that every rank was started, points at this coordinator and \
             uses the same world size"
        )
    }

    /// Stores `value` under `key` (overwriting).
    pub fn store_set(&mut self, key: &str, value: Vec<u8>) -> Result<(), Refusal> {
        if key.is_empty() {
            return Err(Refusal::new(
                RefusalKind::InvalidArgument,
                "store key is empty: give a non-empty key",
            ));
        }
        self.store.insert(key.to_owned(), value);
        Ok(())
    }

    /// The value under `key`, if set.
    pub fn store_get(&self, key: &str) -> Option<&[u8]> {
        self.store.get(key).map(Vec::as_slice)
    }

    /// `rank` enters barrier `name`. Wait until [`Self::barrier_passed`] is true.
    pub fn barrier_enter(&mut self, name: &str, rank: u32) -> Result<BarrierTicket, Refusal> {
        if let Some(refusal) = self.failure() {
            return Err(refusal.clone());
        }
        self.check_rank(rank, &format!("barrier {name:?}"))?;
        let world = self.members.len();
        let b = self.barriers.entry(name.to_owned()).or_default();
        if !b.arrived.insert(rank) {
            return Err(Refusal::new(
                RefusalKind::InvalidArgument,
                format!("rank {rank} entered barrier {name:?} twice in the same round"),
            ));
        }
        let ticket = BarrierTicket { name: name.to_owned(), rank, round: b.round };
        if b.arrived.len() == world {
            b.round += 1;
            b.arrived.clear();
        }
        Ok(ticket)
    }

    /// Whether every rank entered the barrier of `ticket`.
    pub fn barrier_passed(&self, ticket: &BarrierTicket) -> bool {
        self.barriers.get(&ticket.name).is_some_and(|b| b.round > ticket.round)
    }

    /// A rank gives up waiting (timeout); returns the ranks that had not entered.
    pub fn barrier_leave(&mut self, ticket: &BarrierTicket) -> Vec<u32> {
        let world = self.members.len() as u32;
        match self.barriers.get_mut(&ticket.name) {
            Some(b) if b.round == ticket.round => {
                let missing = (0..world).filter(|r| !b.arrived.contains(r)).collect();
                b.arrived.remove(&ticket.rank);
                missing
            }
            _ => Vec::new(),
        }
    }

    /// The latest progress of every rank, by rank (empty before the world formed).
    pub fn progress(&self, now: Instant) -> Vec<RankProgress> {
        self.members
            .iter()
            .map(|m| RankProgress {
                rank: m.membership.rank,
                launcher_rank: m.info.launcher_rank,
                host: m.info.host.clone(),
                progress: m.progress,
                since_heartbeat: now.saturating_duration_since(m.last_heartbeat),
                finished: m.finished,
            })
            .collect()
    }
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
