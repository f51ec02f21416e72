//! `tessera rank`: one rank of a job.
//!
//! The launcher's variables (srun, mpirun, torchrun, `tessera run`; see [`crate::envdetect`])
//! give the rank, world, coordinator address and token. Under a cluster launcher rank 0 hosts
//! the coordinator in-process at that address, keeps it up until every rank finished, and
//! prints the JSON summary; the other ranks retry connecting until it is up.
//!
//! Binds the data-plane listener, joins the coordinator (which assigns the rank and hands out
//! every rank's data-plane address), starts the heartbeat/watch monitor (an abort from the
//! coordinator ends this process with the reason), connects the TCP ring, runs the job, and
//! reports success (finish) or failure (report_error) to the coordinator.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use tessera_collectives::Communicator;
use tessera_collectives::flight::FlightRecorder;
use tessera_collectives::tcp::{DataPlaneListener, TcpRing, TcpRingConfig};
use tessera_coordinator::types::Membership;
use tessera_coordinator::{
    BlockingCoordinator, CoordinatorClient, CoordinatorConfig, JoinInfo, Progress, ProgressCell,
};
use tessera_rank::config::CollectivesKind;
use tessera_rank::device::cuda::gpu::Gpu;
use tessera_rank::device::cuda::nccl::{NcclComm, NcclOpts, nccl_id_key};
use tessera_rank::train::{self, RankInfo};
use tonic::Code;

use crate::RankArgs;
use crate::bench_cmd;
use crate::envdetect::{self, CoordinatorMode, LaunchEnv, Launcher, fnv1a64};

fn env_u32(name: &str) -> Result<Option<u32>> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map(Some)
            .with_context(|| format!("{name}={v:?} is not a non-negative integer")),
        Err(_) => Ok(None),
    }
}

pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// The local address that routes towards `coordinator` (loopback for a loopback coordinator).
fn data_plane_ip(coordinator: &str) -> Result<IpAddr> {
    let target: SocketAddr = coordinator
        .to_socket_addrs()
        .with_context(|| format!("resolving the coordinator address {coordinator:?}"))?
        .next()
        .ok_or_else(|| anyhow!("the coordinator address {coordinator:?} resolves to nothing"))?;
    if target.ip().is_loopback() {
        return Ok(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    let probe = UdpSocket::bind(("0.0.0.0", 0)).context("opening a UDP socket")?;
    probe.connect(target).with_context(|| format!("finding a route to {target}"))?;
    Ok(probe.local_addr().context("reading the routed local address")?.ip())
}

/// Where the coordinator is, who runs it, and the token to show it.
struct CoordinatorPlan {
    /// The address ranks connect to (and that decides the data-plane interface).
    addr: String,
    /// Where that address came from, for messages.
    source: String,
    token: String,
    /// Rank 0 hosts the coordinator in-process (srun, mpirun, torchrun without `tessera run`).
    hosted: bool,
}

/// Decides the coordinator address, whether rank 0 hosts it, and the token (see
/// [`envdetect`] for the precedence and the README's "Launching on a cluster").
fn plan_coordinator(args: &RankArgs, env: &LaunchEnv) -> Result<CoordinatorPlan> {
    let (addr, source) = match (&args.coordinator, &env.coordinator) {
        (Some(flag), _) => {
            envdetect::parse_addr("--coordinator", flag)?;
            (Some(flag.clone()), "--coordinator".to_string())
        }
        (None, Some(c)) => (Some(c.value.clone()), c.source.clone()),
        (None, None) => (None, String::new()),
    };
    let cluster_launcher = env.launcher.is_some_and(|l| l != Launcher::Tessera);
    let hosted = match env.mode {
        CoordinatorMode::Host => true,
        CoordinatorMode::Join => false,
        CoordinatorMode::Auto => cluster_launcher && args.coordinator.is_none(),
    };
    let Some(addr) = addr else {
        if hosted {
            bail!(
                "rank 0 should host the coordinator ({} started this rank) but no address is \
                 known: set TESSERA_COORDINATOR=HOST:PORT with rank 0's host and a free port \
                 (or MASTER_ADDR and MASTER_PORT)",
                env.launcher.map_or("no launcher".into(), |l| l.to_string())
            );
        }
        bail!(
            "no coordinator address: pass --coordinator HOST:PORT or set TESSERA_COORDINATOR \
             (`tessera run` does this for you; under srun, mpirun or torchrun rank 0 hosts it)"
        );
    };
    if hosted && (env.rank.is_none() || env.world.is_none()) {
        bail!(
            "TESSERA_COORDINATOR_MODE=host needs the rank and world from a launcher (srun, \
             mpirun, torchrun) or TESSERA_LAUNCH_RANK/TESSERA_LAUNCH_WORLD"
        );
    }
    let token = match &env.token {
        Some(t) if hosted || t.source == "TESSERA_TOKEN" => t.value.clone(),
        _ => bail!(
            "no job token: set TESSERA_TOKEN to the token the coordinator was started with \
             (`tessera run` does this for you)"
        ),
    };
    Ok(CoordinatorPlan { addr, source, token, hosted })
}

/// Whether `host` names this machine: one of its addresses can be bound here.
fn is_this_machine(host: &str, port: u16) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let Ok(addrs) = (bare, port).to_socket_addrs() else { return false };
    addrs.into_iter().any(|a| UdpSocket::bind(SocketAddr::new(a.ip(), 0)).is_ok())
}

/// The address the hosted coordinator listens on for `addr`: all interfaces on its port,
/// unless `addr` is a loopback address (a single-machine job), which is bound as given.
fn hosted_bind_addr(addr: &str) -> Result<String> {
    let (host, port) = envdetect::parse_addr("the coordinator address", addr)?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<IpAddr>() {
        Ok(ip) if ip.is_loopback() => Ok(addr.to_owned()),
        Ok(IpAddr::V6(_)) => Ok(format!("[::]:{port}")),
        _ => Ok(format!("0.0.0.0:{port}")),
    }
}

/// Rank 0's hosted coordinator, when it hosts one.
fn host_coordinator(
    args: &RankArgs,
    env: &LaunchEnv,
    plan: &CoordinatorPlan,
) -> Result<Option<BlockingCoordinator>> {
    let (Some(rank), Some(world)) = (&env.rank, &env.world) else { return Ok(None) };
    if !plan.hosted || rank.value != 0 {
        return Ok(None);
    }
    let (host, port) = envdetect::parse_addr("the coordinator address", &plan.addr)?;
    if !is_this_machine(&host, port) {
        bail!(
            "rank 0 should host the coordinator at {} (from {}) but {host} is not an address of \
             this machine ({}): if a coordinator already runs there, pass --coordinator {} (or \
             set TESSERA_COORDINATOR_MODE=join); otherwise set TESSERA_COORDINATOR to rank 0's \
             host and a free port",
            plan.addr,
            plan.source,
            hostname(),
            plan.addr
        );
    }
    let bind = hosted_bind_addr(&plan.addr)?;
    let cfg = CoordinatorConfig {
        heartbeat_timeout: Duration::from_secs_f64(args.heartbeat_timeout.max(0.1)),
        ..CoordinatorConfig::new(world.value as usize, plan.token.clone())
    };
    let coordinator = BlockingCoordinator::start(cfg, &bind).with_context(|| {
        format!(
            "rank 0 hosting the coordinator on {bind} (for {} from {}); if the port is taken, \
             set TESSERA_COORDINATOR=HOST:PORT with a free port, or, if it is a coordinator \
             you started, pass --coordinator HOST:PORT to join it",
            plan.addr, plan.source
        )
    })?;
    tracing::info!(
        "rank 0 hosts the coordinator on {} for {} ranks ({} from {})",
        coordinator.local_addr(),
        world.value,
        plan.addr,
        plan.source
    );
    Ok(Some(coordinator))
}

/// Rank 0 keeps its hosted coordinator up until every rank finished (the coordinator's
/// heartbeat watch turns a dead rank into an abort meanwhile), then stops it.
fn finish_hosting(coordinator: BlockingCoordinator, limit: Duration) -> Result<()> {
    let outcome = coordinator.wait_timeout(limit);
    if let Err(e) = coordinator.shutdown() {
        tracing::warn!("stopping the hosted coordinator: {e}");
    }
    match outcome {
        Some(Ok(())) => Ok(()),
        Some(Err(e)) => Err(anyhow!("rank 0 finished but the job did not: {e}")),
        None => Err(anyhow!(
            "rank 0 finished but the other ranks did not finish within {limit:?}; stopped \
             waiting for them"
        )),
    }
}

pub fn rank_main(args: &RankArgs) -> Result<ExitCode> {
    let env = LaunchEnv::from_process().context("reading the launcher's environment")?;
    tracing::info!("launch environment: {}", env.describe());
    let plan = plan_coordinator(args, &env)?;
    let coordinator = plan.addr.clone();
    let token = plan.token.clone();

    // What the job is, resolved before joining so that its hash can be compared at rendezvous.
    let (cfg, job_hash) = match args.job.as_str() {
        "train" => {
            let cfg = args.train.job.load()?;
            let hash = cfg.hash();
            (Some(cfg), hash)
        }
        "bench-allreduce" | "bench-gns" | "bench-loss" | "collectives-selftest" => {
            (None, format!("{}:{}", args.job, args.job_args.as_deref().unwrap_or("")))
        }
        other => bail!("unknown job {other:?}"),
    };

    let ip = data_plane_ip(&coordinator)?;
    let listener = DataPlaneListener::bind(ip)
        .with_context(|| format!("binding the data-plane listener on {ip}"))?;
    let data_addr = listener.local_addr()?.to_string();

    let hosted = host_coordinator(args, &env, &plan)?;
    // Rank 0 reaches its own coordinator directly; the others retry until rank 0 is up.
    let connect_to = match &hosted {
        Some(c) if c.local_addr().ip().is_unspecified() => {
            let ip = if c.local_addr().is_ipv6() {
                IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
            } else {
                IpAddr::V4(Ipv4Addr::LOCALHOST)
            };
            SocketAddr::new(ip, c.local_addr().port()).to_string()
        }
        Some(c) => c.local_addr().to_string(),
        None => coordinator.clone(),
    };
    let connect_timeout = Duration::from_secs_f64(args.connect_timeout.max(0.1));
    let client =
        CoordinatorClient::connect(&connect_to, &token, connect_timeout).with_context(|| {
            if plan.hosted {
                format!(
                    "no coordinator at {coordinator} (from {}) within {connect_timeout:?}: rank 0 \
                     hosts it there; check that rank 0 started on that host and that the port is \
                     reachable from this node, or set TESSERA_COORDINATOR=HOST:PORT",
                    plan.source
                )
            } else {
                format!("connecting to the coordinator at {coordinator} (from {})", plan.source)
            }
        })?;
    let info = JoinInfo {
        host: hostname(),
        local_rank: env.local_rank.as_ref().map(|s| s.value),
        pid: std::process::id(),
        launcher_rank: env.rank.as_ref().map(|s| s.value),
        launcher_world: env.world.as_ref().map(|s| s.value),
        config_hash: job_hash,
        version: env!("CARGO_PKG_VERSION").to_string(),
        data_addr: data_addr.clone(),
        // Set by `tessera run --max-restarts` for each attempt: a stale rank is refused.
        generation: env_u32("TESSERA_GENERATION")?.map(u64::from),
    };
    let membership = client.join(info).context("joining the job")?;
    let data_addr_shown = data_addr;
    let rank = membership.rank as usize;
    eprintln!(
        "tessera rank {rank}/{}: host {} (local rank {}/{}, node {}/{}), data plane {}",
        membership.world,
        hostname(),
        membership.local_rank,
        membership.local_size,
        membership.node_rank,
        membership.num_nodes,
        data_addr_shown,
    );
    let armed = tessera_rank::fault::install_from_env(rank).map_err(|e| anyhow!(e))?;
    if armed > 0 {
        eprintln!("tessera rank {rank}: {armed} fault(s) armed by TESSERA_FAULT (testing only)");
    }
    let progress = Arc::new(ProgressCell::new());
    // What the ring is doing, so that an abort says where this rank was waiting.
    let flight: Arc<OnceLock<Arc<FlightRecorder>>> = Arc::new(OnceLock::new());
    let flight_seen = flight.clone();
    let hosting = hosted.is_some();
    let route = client.heartbeat_route(&membership, ip, args.heartbeat_relay);
    let _monitor = client.start_monitor(
        membership.rank,
        membership.heartbeat_interval,
        route,
        progress.clone(),
        Box::new(move |abort| {
            let here = flight_seen
                .get()
                .map_or("before the data plane connected".into(), |f| f.snapshot().to_string());
            eprintln!("tessera rank {rank}: job aborted: {abort} (this rank was {here})");
            if hosting {
                // The coordinator dies with this process: give the other ranks' watch streams
                // a moment to receive the abort (they would otherwise see a lost coordinator).
                std::thread::sleep(Duration::from_millis(500));
            }
            std::process::exit(1);
        }),
    );

    let timeout = cfg
        .as_ref()
        .map_or(Duration::from_secs(600), |c| Duration::from_secs_f64(c.run.collective_timeout_s));
    let ring_cfg = TcpRingConfig {
        timeout,
        session: fnv1a64(token.as_bytes()) ^ membership.generation,
        ..TcpRingConfig::default()
    };
    let outcome: Result<String> = (|| {
        let world = membership.world as usize;
        let mut comm =
            TcpRing::connect_next(listener, rank, world, &membership.next_data_addr, ring_cfg)
                .context("connecting the data-plane ring")?;
        let _ = flight.set(comm.flight_recorder());
        tracing::info!(rank, world = membership.world, "data-plane ring connected");
        match &cfg {
            Some(cfg) => {
                if rank == 0 {
                    std::fs::create_dir_all(&cfg.run.out_dir).with_context(|| {
                        format!("creating run.out_dir {}", cfg.run.out_dir.display())
                    })?;
                    if std::env::var_os("TESSERA_REPORT_FILE").is_none() {
                        // Not under `tessera run` (which prints it once): show it here.
                        eprint!("# resolved config\n{}", cfg.to_toml());
                    }
                    let path = cfg.run.out_dir.join("config.toml");
                    std::fs::write(&path, cfg.to_toml())
                        .with_context(|| format!("writing {}", path.display()))?;
                }
                let rinfo = RankInfo {
                    rank,
                    world: membership.world as usize,
                    local_size: membership.local_size as usize,
                    local_rank: membership.local_rank as usize,
                };
                let mut nccl = match cfg.run.collectives {
                    CollectivesKind::Tcp => None,
                    CollectivesKind::Nccl => Some(
                        open_nccl(&client, &membership, timeout)
                            .context("run.collectives = \"nccl\"")?,
                    ),
                };
                let comm: &mut dyn Communicator = match nccl.as_mut() {
                    Some(n) => n,
                    None => &mut comm,
                };
                let summary = train::train(cfg, comm, &rinfo, &mut |s| {
                    progress.set(Progress {
                        step: s.step,
                        loss: Some(s.loss),
                        samples: s.samples,
                        b_simple: s.b_simple,
                    });
                });
                if let (Err(_), Some(n)) = (&summary, nccl.as_mut()) {
                    // Report the error now: finalizing would first wait for the peers.
                    n.abort("this rank failed; the coordinator ends the job");
                }
                Ok(serde_json::to_string(&summary?)? + "\n")
            }
            None if args.job == "collectives-selftest" => crate::selftest::run(&mut comm),
            None if args.job == "bench-gns" => {
                bench_cmd::gns_rank(&mut comm, args.job_args.as_deref().unwrap_or("{}"))
            }
            None if args.job == "bench-loss" => bench_cmd::loss_rank(
                &mut comm,
                membership.local_size as usize,
                args.job_args.as_deref().unwrap_or("{}"),
            ),
            None => bench_cmd::allreduce_rank(&mut comm, args.job_args.as_deref().unwrap_or("{}")),
        }
    })();
    match outcome {
        Ok(report) => {
            if rank == 0 {
                emit_report(&report)?;
            }
            client.finish().context("telling the coordinator this rank finished")?;
            if let Some(c) = hosted {
                // The others end at about the same step; a dead one is found by heartbeats.
                let limit =
                    timeout + Duration::from_secs_f64(args.heartbeat_timeout.max(0.1) * 3.0);
                finish_hosting(c, limit)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            let reason = crate::launcher::error_chain(&e);
            let told = client.report_error(&reason);
            if let Some(c) = hosted {
                // Shutting down delivers the abort to every rank's watch first.
                let _ = c.shutdown();
            }
            // A peer that vanished mid-collective often left because it lost the coordinator
            // first: when this rank cannot reach it either, say so (that is the root cause).
            let lost = told.as_ref().err().and_then(|te| {
                matches!(te.code(), Some(Code::Unavailable | Code::DeadlineExceeded))
                    .then(|| format!("lost the coordinator at {} too: {te}", client.addr()))
            });
            match lost {
                Some(also) => Err(e.context(also).context(format!("rank {rank}"))),
                None => Err(e.context(format!("rank {rank}"))),
            }
        }
    }
}

/// The NCCL communicator of `run.collectives = "nccl"`: the GPU of `Gpu::ordinal_for` (the
/// one the rank's `CudaDevice` uses), the unique id from rank 0 through the coordinator's store.
/// NCCL needs a GPU per rank: the ranks of a node compare their GPUs' UUIDs through the store
/// first, so that ranks which each see their own GPU as device 0 (slurm's
/// `--gpus-per-task=1`) pass and ranks that would share one are told so, instead of NCCL
/// failing or hanging.
fn open_nccl(client: &CoordinatorClient, m: &Membership, timeout: Duration) -> Result<NcclComm> {
    let tcp = "(or use run.collectives = \"tcp\")";
    let gpus = Gpu::count().map_err(|e| anyhow!("{e} {tcp}"))?;
    let ordinal = Gpu::ordinal_for(m.local_rank as usize, gpus);
    let uuid = Gpu::uuid(ordinal).map_err(|e| anyhow!("{e} {tcp}"))?;
    let key = |lr: u32| format!("tessera/gpu-uuid/{}/{}/{lr}", m.generation, m.node_rank);
    client
        .store_set(&key(m.local_rank), uuid.as_bytes())
        .context("publishing this rank's GPU UUID in the coordinator's store")?;
    let mut uuids = Vec::with_capacity(m.local_size as usize);
    for lr in 0..m.local_size {
        let u = if lr == m.local_rank {
            uuid.clone()
        } else {
            let v = client
                .store_get(&key(lr), timeout)
                .with_context(|| format!("reading the GPU UUID of local rank {lr}"))?;
            String::from_utf8_lossy(&v).into_owned()
        };
        uuids.push((lr, u));
    }
    let shared = sharing_gpu(m.local_rank, &uuids);
    if !shared.is_empty() {
        bail!(
            "local rank {} would share GPU {uuid} (device {ordinal} of the {gpus} it sees) with \
             local rank(s) {shared:?} of this node, but NCCL needs one GPU per rank: start at \
             most {gpus} ranks per node, give each task its own GPU (srun --gpus-per-task=1), \
             or use run.collectives = \"tcp\" (several ranks may share a GPU with it)",
            m.local_rank
        );
    }
    let opts = NcclOpts { timeout, ..NcclOpts::default() };
    NcclComm::open_via_store(
        ordinal,
        m.rank as usize,
        m.world as usize,
        &nccl_id_key(m.generation),
        opts,
        |k, v| client.store_set(k, v).map_err(|e| e.to_string()),
        |k, t| client.store_get(k, t).map_err(|e| e.to_string()),
    )
    .map_err(|e| anyhow!("{e}"))
}

/// The other local ranks whose GPU UUID (in `uuids`, `(local rank, UUID)`) is `mine`'s.
fn sharing_gpu(mine: u32, uuids: &[(u32, String)]) -> Vec<u32> {
    let Some((_, own)) = uuids.iter().find(|(lr, _)| *lr == mine) else {
        return Vec::new();
    };
    uuids.iter().filter(|(lr, u)| *lr != mine && u == own).map(|(lr, _)| *lr).collect()
}

/// Rank 0's report goes to the launcher's file when `tessera run` started us (it prints it
/// after every rank has exited), else straight to stdout (srun, mpirun).
fn emit_report(report: &str) -> Result<()> {
    match std::env::var_os("TESSERA_REPORT_FILE") {
        Some(path) => std::fs::write(&path, report)
            .with_context(|| format!("writing the report to {}", path.to_string_lossy())),
        None => {
            print!("{report}");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_sharing_a_gpu_are_found_by_uuid() {
        let u = |lr: u32, s: &str| (lr, s.to_string());
        // slurm --gpus-per-task=1: every rank's device 0, all different GPUs.
        let own = [u(0, "GPU-a"), u(1, "GPU-b"), u(2, "GPU-c")];
        assert!((0..3).all(|r| sharing_gpu(r, &own).is_empty()));
        // Four ranks seeing the same two GPUs: 0 and 2 share one, 1 and 3 the other.
        let two = [u(0, "GPU-a"), u(1, "GPU-b"), u(2, "GPU-a"), u(3, "GPU-b")];
        assert_eq!(sharing_gpu(0, &two), vec![2]);
        assert_eq!(sharing_gpu(3, &two), vec![1]);
        let one = [u(0, "GPU-a"), u(1, "GPU-a"), u(2, "GPU-a")];
        assert_eq!(sharing_gpu(1, &one), vec![0, 2]);
        assert!(sharing_gpu(7, &one).is_empty(), "a rank not in the list shares nothing");
    }
}
