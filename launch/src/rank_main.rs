//! `tessera rank`: one rank of a job.
//!
//! Binds the data-plane listener, joins the coordinator (which assigns the rank and hands out
//! every rank's data-plane address), starts the heartbeat/watch monitor (an abort from the
//! coordinator ends this process with the reason), connects the TCP ring, runs the job, and
//! reports success (finish) or failure (report_error) to the coordinator.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use tessera_collectives::tcp::{DataPlaneListener, TcpRing, TcpRingConfig};
use tessera_coordinator::{CoordinatorClient, JoinInfo, Progress, ProgressCell};
use tessera_rank::config::Config;
use tessera_rank::train::{self, RankInfo};

use crate::RankArgs;
use crate::bench_cmd;

/// FNV-1a: a small stable hash, to derive the data-plane session id from the job token.
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

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

pub fn rank_main(args: &RankArgs) -> Result<ExitCode> {
    let coordinator = args.coordinator.clone().ok_or_else(|| {
        anyhow!(
            "no coordinator address: pass --coordinator HOST:PORT or set TESSERA_COORDINATOR \
             (`tessera run` does this for you)"
        )
    })?;
    let token = std::env::var("TESSERA_TOKEN").map_err(|_| {
        anyhow!(
            "no job token: set TESSERA_TOKEN to the token the coordinator was started with \
             (`tessera run` does this for you)"
        )
    })?;

    // What the job is, resolved before joining so that its hash can be compared at rendezvous.
    let (cfg, job_hash) = match args.job.as_str() {
        "train" => {
            let cfg = Config::load(args.train.config.as_deref(), &args.train.overrides)?;
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

    let client = CoordinatorClient::connect(&coordinator, &token, Duration::from_secs(60))
        .with_context(|| format!("connecting to the coordinator at {coordinator}"))?;
    let info = JoinInfo {
        host: hostname(),
        local_rank: env_u32("TESSERA_LOCAL_RANK")?,
        pid: std::process::id(),
        launcher_rank: env_u32("TESSERA_LAUNCH_RANK")?,
        launcher_world: env_u32("TESSERA_LAUNCH_WORLD")?,
        config_hash: job_hash,
        version: env!("CARGO_PKG_VERSION").to_string(),
        data_addr,
    };
    let membership = client.join(info).context("joining the job")?;
    let rank = membership.rank as usize;
    eprintln!(
        "tessera rank {rank}/{}: host {} (local rank {}/{}, node {}/{}), data plane {}",
        membership.world,
        membership.hosts.get(rank).map_or("?", String::as_str),
        membership.local_rank,
        membership.local_size,
        membership.node_rank,
        membership.num_nodes,
        membership.data_addrs.get(rank).map_or("?", String::as_str),
    );
    let progress = Arc::new(ProgressCell::new());
    let _monitor = client.start_monitor(
        membership.rank,
        membership.heartbeat_interval,
        progress.clone(),
        Box::new(move |abort| {
            eprintln!("tessera rank {rank}: job aborted: {abort}");
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
        let mut comm = TcpRing::connect(listener, rank, &membership.data_addrs, ring_cfg)
            .context("connecting the data-plane ring")?;
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
                };
                let summary = train::train(cfg, &mut comm, &rinfo, &mut |s| {
                    progress.set(Progress {
                        step: s.step,
                        loss: Some(s.loss),
                        samples: s.samples,
                        b_simple: s.b_simple,
                    });
                })?;
                Ok(serde_json::to_string(&summary)? + "\n")
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
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            let reason = format!("{e:#}");
            let _ = client.report_error(&reason);
            Err(e.context(format!("rank {rank}")))
        }
    }
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
