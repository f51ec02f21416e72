//! Which launcher started this rank, and what it says about the rank: a pure function over the
//! environment, so that every launcher's variables can be tested without starting it.
//!
//! Precedence (the first launcher whose rank variable is set gives rank, world and local rank;
//! the innermost launcher wins, so `mpirun` inside an `sbatch` allocation, or `torchrun` under
//! `srun`, is read from its own variables rather than from the Slurm ones it inherited):
//!
//! | # | launcher      | rank                   | world                  | local rank                   | local world                   |
//! |---|---------------|------------------------|------------------------|------------------------------|-------------------------------|
//! | 1 | `tessera run` | `TESSERA_LAUNCH_RANK`  | `TESSERA_LAUNCH_WORLD` | `TESSERA_LOCAL_RANK`         | `TESSERA_LOCAL_WORLD`         |
//! | 2 | torchrun      | `RANK`                 | `WORLD_SIZE`           | `LOCAL_RANK`                 | `LOCAL_WORLD_SIZE`            |
//! | 3 | Open MPI      | `OMPI_COMM_WORLD_RANK` | `OMPI_COMM_WORLD_SIZE` | `OMPI_COMM_WORLD_LOCAL_RANK` | `OMPI_COMM_WORLD_LOCAL_SIZE`  |
//! | 4 | MVAPICH2      | `MV2_COMM_WORLD_RANK`  | `MV2_COMM_WORLD_SIZE`  | `MV2_COMM_WORLD_LOCAL_RANK`  | —                             |
//! | 5 | MPICH, Intel  | `PMI_RANK`             | `PMI_SIZE`             | `MPI_LOCALRANKID`            | `MPI_LOCALNRANKS`             |
//! | 6 | Slurm (srun)  | `SLURM_PROCID`         | `SLURM_NTASKS`         | `SLURM_LOCALID`              | —                             |
//! | 7 | PMIx          | `PMIX_RANK`            | `TESSERA_LAUNCH_WORLD` | —                            | —                             |
//!
//! torchrun counts only when both `RANK` and `WORLD_SIZE` are set (the names are generic).
//! With no launcher, `TESSERA_LAUNCH_WORLD` and `TESSERA_LOCAL_RANK` are still read (ranks
//! joining a standalone `tessera coordinator`, which then assigns the ranks).
//!
//! The coordinator address: `TESSERA_COORDINATOR`, else `MASTER_ADDR:MASTER_PORT` (torchrun;
//! `MASTER_PORT + 1` when `TORCHELASTIC_USE_AGENT_STORE=True`, because torchrun's own store
//! holds `MASTER_PORT` then), else under Slurm the first host of `SLURM_STEP_NODELIST` (or
//! `SLURM_JOB_NODELIST`) on port `15000 + SLURM_JOB_ID % 10000` (the convention of PyTorch
//! Lightning's Slurm support: every step of a job agrees without talking), else, when the
//! launcher says every rank is on this node (local world = world, e.g. `mpirun -np 4` on one
//! machine), `127.0.0.1` on port `15000 + fnv1a64(derived token) % 10000`.
//!
//! The job token: `TESSERA_TOKEN`, else derived from the job's identity, the chosen launcher's
//! first: `SLURM_JOB_ID.SLURM_STEP_ID`, Open MPI's job id (`OMPI_MCA_ess_base_jobid` or
//! `OMPI_MCA_orte_ess_jobid`), `PMIX_NAMESPACE`, `TORCHELASTIC_RUN_ID`, `MASTER_ADDR:MASTER_PORT`,
//! and last the coordinator address. A derived token keeps ranks of another job (a stale step
//! on the same port) out; it is not a secret: set `TESSERA_TOKEN` when that matters.

use std::collections::BTreeMap;
use std::fmt;

use thiserror::Error;

use crate::hostlist::{self, HostlistError};

/// First port of the Slurm-derived coordinator ports (`15000 + SLURM_JOB_ID % 10000`).
pub const SLURM_PORT_BASE: u32 = 15000;

/// FNV-1a: a small stable hash (job identities to ports, tokens to session ids).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A launcher that sets rank variables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    Tessera,
    Torchrun,
    OpenMpi,
    Mvapich2,
    Mpich,
    Slurm,
    Pmix,
}

impl fmt::Display for Launcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Launcher::Tessera => "tessera run",
            Launcher::Torchrun => "torchrun",
            Launcher::OpenMpi => "Open MPI",
            Launcher::Mvapich2 => "MVAPICH2",
            Launcher::Mpich => "MPICH/Intel MPI",
            Launcher::Slurm => "Slurm",
            Launcher::Pmix => "PMIx",
        })
    }
}

/// The variables one launcher sets, in precedence order.
struct LauncherVars {
    launcher: Launcher,
    rank: &'static str,
    /// Candidates for the world size, the first set one is used.
    world: &'static [&'static str],
    local_rank: Option<&'static str>,
    local_world: Option<&'static str>,
}

const LAUNCHERS: &[LauncherVars] = &[
    LauncherVars {
        launcher: Launcher::Tessera,
        rank: "TESSERA_LAUNCH_RANK",
        world: &["TESSERA_LAUNCH_WORLD"],
        local_rank: Some("TESSERA_LOCAL_RANK"),
        local_world: Some("TESSERA_LOCAL_WORLD"),
    },
    LauncherVars {
        launcher: Launcher::Torchrun,
        rank: "RANK",
        world: &["WORLD_SIZE"],
        local_rank: Some("LOCAL_RANK"),
        local_world: Some("LOCAL_WORLD_SIZE"),
    },
    LauncherVars {
        launcher: Launcher::OpenMpi,
        rank: "OMPI_COMM_WORLD_RANK",
        world: &["OMPI_COMM_WORLD_SIZE"],
        local_rank: Some("OMPI_COMM_WORLD_LOCAL_RANK"),
        local_world: Some("OMPI_COMM_WORLD_LOCAL_SIZE"),
    },
    LauncherVars {
        launcher: Launcher::Mvapich2,
        rank: "MV2_COMM_WORLD_RANK",
        world: &["MV2_COMM_WORLD_SIZE"],
        local_rank: Some("MV2_COMM_WORLD_LOCAL_RANK"),
        local_world: None,
    },
    LauncherVars {
        launcher: Launcher::Mpich,
        rank: "PMI_RANK",
        world: &["PMI_SIZE"],
        local_rank: Some("MPI_LOCALRANKID"),
        local_world: Some("MPI_LOCALNRANKS"),
    },
    LauncherVars {
        launcher: Launcher::Slurm,
        rank: "SLURM_PROCID",
        world: &["SLURM_NTASKS"],
        local_rank: Some("SLURM_LOCALID"),
        local_world: None,
    },
    LauncherVars {
        launcher: Launcher::Pmix,
        rank: "PMIX_RANK",
        world: &["TESSERA_LAUNCH_WORLD"],
        local_rank: None,
        local_world: None,
    },
];

/// Who provides the coordinator (`TESSERA_COORDINATOR_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CoordinatorMode {
    /// Rank 0 hosts it when a cluster launcher (not `tessera run`) gave the ranks and no
    /// `--coordinator` flag names an external one; otherwise join.
    Auto,
    /// Rank 0 hosts it in-process.
    Host,
    /// It runs elsewhere (`tessera run`, `tessera coordinator`): only connect.
    Join,
}

/// A value and the environment variable(s) it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sourced<T> {
    pub value: T,
    pub source: String,
}

impl<T> Sourced<T> {
    fn new(value: T, source: impl Into<String>) -> Self {
        Self { value, source: source.into() }
    }
}

/// What the environment says about this rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchEnv {
    /// The launcher that gave the rank (`None`: started by hand, the coordinator assigns it).
    pub launcher: Option<Launcher>,
    pub rank: Option<Sourced<u32>>,
    pub world: Option<Sourced<u32>>,
    pub local_rank: Option<Sourced<u32>>,
    pub local_world: Option<Sourced<u32>>,
    /// Slurm's node index (`SLURM_NODEID`), for the log.
    pub node_rank: Option<Sourced<u32>>,
    /// Where the coordinator is (or where rank 0 should host it).
    pub coordinator: Option<Sourced<String>>,
    /// The job token: `TESSERA_TOKEN` or one derived from the job's identity.
    pub token: Option<Sourced<String>>,
    /// `CUDA_VISIBLE_DEVICES` as given.
    pub visible_devices: Option<Sourced<String>>,
    /// `TESSERA_COORDINATOR_MODE` (default auto).
    pub mode: CoordinatorMode,
}

/// A variable that is set but cannot be used.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum EnvError {
    #[error("{var}={value:?} is not a non-negative integer")]
    NotANumber { var: String, value: String },
    #[error("{var}=0: a world of zero ranks")]
    ZeroWorld { var: String },
    #[error("{rank_var}={rank} is not below {world_var}={world}")]
    RankOutOfRange { rank_var: String, rank: u32, world_var: String, world: u32 },
    #[error(
        "{launcher} set {rank_var} but no world size ({want}); set TESSERA_LAUNCH_WORLD to the \
         number of ranks"
    )]
    NoWorld { launcher: Launcher, rank_var: String, want: String },
    #[error("{set} is set but {missing} is not: set both (or TESSERA_COORDINATOR=HOST:PORT)")]
    HalfAddress { set: String, missing: String },
    #[error("{var}={value:?} is not HOST:PORT with a port between 1 and 65535")]
    BadAddress { var: String, value: String },
    #[error("{var}: {source}")]
    Hostlist {
        var: String,
        #[source]
        source: HostlistError,
    },
    #[error("{var}={value:?} is empty")]
    Empty { var: String, value: String },
    #[error("TESSERA_COORDINATOR_MODE={value:?}: expected auto, host or join")]
    BadMode { value: String },
}

fn get<'a>(env: &'a BTreeMap<String, String>, var: &str) -> Option<&'a str> {
    env.get(var).map(|v| v.trim()).filter(|v| !v.is_empty())
}

fn num(env: &BTreeMap<String, String>, var: &str) -> Result<Option<Sourced<u32>>, EnvError> {
    match get(env, var) {
        None => Ok(None),
        Some(v) => v
            .parse::<u32>()
            .map(|n| Some(Sourced::new(n, var)))
            .map_err(|_| EnvError::NotANumber { var: var.into(), value: env[var].clone() }),
    }
}

fn first_num(
    env: &BTreeMap<String, String>,
    vars: &[&str],
) -> Result<Option<Sourced<u32>>, EnvError> {
    for var in vars {
        if let Some(v) = num(env, var)? {
            return Ok(Some(v));
        }
    }
    Ok(None)
}

/// Checks "HOST:PORT" (IPv6 hosts in brackets) and returns the port.
pub fn parse_addr(var: &str, value: &str) -> Result<(String, u16), EnvError> {
    let bad = || EnvError::BadAddress { var: var.into(), value: value.into() };
    let (host, port) = value.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    Ok((host.to_owned(), port))
}

fn coordinator_addr(env: &BTreeMap<String, String>) -> Result<Option<Sourced<String>>, EnvError> {
    if let Some(v) = get(env, "TESSERA_COORDINATOR") {
        parse_addr("TESSERA_COORDINATOR", v)?;
        return Ok(Some(Sourced::new(v.to_owned(), "TESSERA_COORDINATOR")));
    }
    match (get(env, "MASTER_ADDR"), get(env, "MASTER_PORT")) {
        (Some(host), Some(port)) => {
            let port_n: u16 = port.parse().ok().filter(|&p| p != 0).ok_or_else(|| {
                EnvError::BadAddress { var: "MASTER_PORT".into(), value: port.into() }
            })?;
            let agent_store = get(env, "TORCHELASTIC_USE_AGENT_STORE")
                .is_some_and(|v| v.eq_ignore_ascii_case("true"));
            let (port_n, source) = if agent_store {
                let next = port_n.checked_add(1).ok_or_else(|| EnvError::BadAddress {
                    var: "MASTER_PORT".into(),
                    value: port.into(),
                })?;
                (next, "MASTER_ADDR:MASTER_PORT+1 (torchrun's agent store holds MASTER_PORT)")
            } else {
                (port_n, "MASTER_ADDR:MASTER_PORT")
            };
            let host = if host.contains(':') && !host.starts_with('[') {
                format!("[{host}]")
            } else {
                host.to_owned()
            };
            return Ok(Some(Sourced::new(format!("{host}:{port_n}"), source)));
        }
        (Some(_), None) => {
            return Err(EnvError::HalfAddress {
                set: "MASTER_ADDR".into(),
                missing: "MASTER_PORT".into(),
            });
        }
        (None, Some(_)) => {
            return Err(EnvError::HalfAddress {
                set: "MASTER_PORT".into(),
                missing: "MASTER_ADDR".into(),
            });
        }
        (None, None) => {}
    }
    let nodelist_var =
        ["SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST"].into_iter().find(|v| get(env, v).is_some());
    if let (Some(var), Some(job)) = (nodelist_var, num(env, "SLURM_JOB_ID")?) {
        let list = get(env, var).unwrap_or_default();
        let host = hostlist::first_host(list)
            .map_err(|source| EnvError::Hostlist { var: var.into(), source })?;
        let port = SLURM_PORT_BASE + job.value % 10000;
        return Ok(Some(Sourced::new(
            format!("{host}:{port}"),
            format!("first host of {var}, port {SLURM_PORT_BASE} + SLURM_JOB_ID % 10000"),
        )));
    }
    Ok(None)
}

fn slurm_identity(env: &BTreeMap<String, String>) -> Option<Sourced<String>> {
    let job = get(env, "SLURM_JOB_ID")?;
    let (step_var, step) = ["SLURM_STEP_ID", "SLURM_STEPID"]
        .into_iter()
        .find_map(|v| get(env, v).map(|s| (v, s)))
        .unwrap_or(("", "batch"));
    let source = if step_var.is_empty() {
        "SLURM_JOB_ID (no SLURM_STEP_ID: the batch script)".to_string()
    } else {
        format!("SLURM_JOB_ID.{step_var}")
    };
    Some(Sourced::new(format!("slurm:{job}.{step}"), source))
}

fn one_var(env: &BTreeMap<String, String>, var: &str, kind: &str) -> Option<Sourced<String>> {
    get(env, var).map(|v| Sourced::new(format!("{kind}:{v}"), var))
}

fn derived_token(
    env: &BTreeMap<String, String>,
    launcher: Option<Launcher>,
    coordinator: Option<&Sourced<String>>,
) -> Option<Sourced<String>> {
    let ompi = |env: &BTreeMap<String, String>| {
        one_var(env, "OMPI_MCA_ess_base_jobid", "ompi")
            .or_else(|| one_var(env, "OMPI_MCA_orte_ess_jobid", "ompi"))
    };
    let pmix = |env: &BTreeMap<String, String>| one_var(env, "PMIX_NAMESPACE", "pmix");
    let torch = |env: &BTreeMap<String, String>| {
        one_var(env, "TORCHELASTIC_RUN_ID", "torchrun").or_else(|| {
            let (a, p) = (get(env, "MASTER_ADDR")?, get(env, "MASTER_PORT")?);
            Some(Sourced::new(format!("master:{a}:{p}"), "MASTER_ADDR:MASTER_PORT"))
        })
    };
    // The chosen launcher's identity first: ranks of one job may inherit different outer
    // identities (mpirun's own node has no Slurm step, its remote daemons have one).
    let preferred = match launcher {
        Some(Launcher::Slurm) => slurm_identity(env),
        Some(Launcher::OpenMpi) => ompi(env).or_else(|| pmix(env)),
        Some(Launcher::Pmix) => pmix(env),
        Some(Launcher::Torchrun) => torch(env),
        _ => None,
    };
    preferred
        .or_else(|| ompi(env))
        .or_else(|| pmix(env))
        .or_else(|| slurm_identity(env))
        .or_else(|| torch(env))
        .or_else(|| {
            coordinator.map(|c| Sourced::new(format!("addr:{}", c.value), c.source.clone()))
        })
}

/// Reads the launcher, rank, world, local rank, coordinator address and token from `env`.
pub fn detect(env: &BTreeMap<String, String>) -> Result<LaunchEnv, EnvError> {
    let mut chosen = None;
    for l in LAUNCHERS {
        if get(env, l.rank).is_none() {
            continue;
        }
        if l.launcher == Launcher::Torchrun && get(env, "WORLD_SIZE").is_none() {
            continue;
        }
        chosen = Some(l);
        break;
    }
    let (launcher, rank, world, local_rank, local_world) = match chosen {
        Some(l) => {
            let rank = num(env, l.rank)?;
            let world = first_num(env, l.world)?.ok_or_else(|| EnvError::NoWorld {
                launcher: l.launcher,
                rank_var: l.rank.into(),
                want: l.world.join(" or "),
            })?;
            let local_rank = l.local_rank.map(|v| num(env, v)).transpose()?.flatten();
            let local_world = l.local_world.map(|v| num(env, v)).transpose()?.flatten();
            (Some(l.launcher), rank, Some(world), local_rank, local_world)
        }
        None => (
            None,
            None,
            num(env, "TESSERA_LAUNCH_WORLD")?,
            num(env, "TESSERA_LOCAL_RANK")?,
            num(env, "TESSERA_LOCAL_WORLD")?,
        ),
    };
    if let Some(w) = &world
        && w.value == 0
    {
        return Err(EnvError::ZeroWorld { var: w.source.clone() });
    }
    if let Some(lw) = &local_world
        && lw.value == 0
    {
        return Err(EnvError::ZeroWorld { var: lw.source.clone() });
    }
    for (r, w) in [(&rank, &world), (&local_rank, &local_world)] {
        if let (Some(r), Some(w)) = (r, w)
            && r.value >= w.value
        {
            return Err(EnvError::RankOutOfRange {
                rank_var: r.source.clone(),
                rank: r.value,
                world_var: w.source.clone(),
                world: w.value,
            });
        }
    }
    let node_rank =
        if launcher == Some(Launcher::Slurm) { num(env, "SLURM_NODEID")? } else { None };
    let mut coordinator = coordinator_addr(env)?;
    let token = match env.get("TESSERA_TOKEN") {
        Some(t) if t.is_empty() => {
            return Err(EnvError::Empty { var: "TESSERA_TOKEN".into(), value: t.clone() });
        }
        Some(t) => Some(Sourced::new(t.clone(), "TESSERA_TOKEN")),
        None => derived_token(env, launcher, coordinator.as_ref()),
    };
    // Every rank on this node (mpirun -np N on one machine): loopback, on a port every rank
    // derives from the job's identity.
    if coordinator.is_none()
        && let (Some(w), Some(lw), Some(t)) = (&world, &local_world, &token)
        && w.value == lw.value
        && t.source != "TESSERA_TOKEN"
    {
        let port = SLURM_PORT_BASE as u64 + fnv1a64(t.value.as_bytes()) % 10000;
        coordinator = Some(Sourced::new(
            format!("127.0.0.1:{port}"),
            format!(
                "single node ({} = {}): 127.0.0.1, port {SLURM_PORT_BASE} + hash({}) % 10000",
                lw.source, w.source, t.source
            ),
        ));
    }

    let visible_devices =
        env.get("CUDA_VISIBLE_DEVICES").map(|v| Sourced::new(v.clone(), "CUDA_VISIBLE_DEVICES"));
    let mode = match get(env, "TESSERA_COORDINATOR_MODE").map(str::to_ascii_lowercase).as_deref() {
        None | Some("auto") => CoordinatorMode::Auto,
        Some("host") => CoordinatorMode::Host,
        Some("join") => CoordinatorMode::Join,
        Some(_) => {
            return Err(EnvError::BadMode { value: env["TESSERA_COORDINATOR_MODE"].clone() });
        }
    };
    Ok(LaunchEnv {
        mode,
        launcher,
        rank,
        world,
        local_rank,
        local_world,
        node_rank,
        coordinator,
        token,
        visible_devices,
    })
}

impl LaunchEnv {
    /// Reads the process environment (variables that are not UTF-8 are ignored).
    pub fn from_process() -> Result<LaunchEnv, EnvError> {
        let env: BTreeMap<String, String> = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .collect();
        detect(&env)
    }

    /// The GPU this rank should use, counted among the visible ones: 0 when the launcher
    /// left exactly one visible (`CUDA_VISIBLE_DEVICES=3`, as Slurm's `--gpus-per-task=1`
    /// does), else the local rank (one process per GPU on a node).
    pub fn gpu_index(&self) -> u32 {
        let single = self.visible_devices.as_ref().is_some_and(|v| {
            let v = v.value.trim();
            !v.is_empty() && v.split(',').filter(|d| !d.trim().is_empty()).count() == 1
        });
        if single { 0 } else { self.local_rank.as_ref().map_or(0, |l| l.value) }
    }

    /// One line for the log: every resolved value with the variable it came from.
    pub fn describe(&self) -> String {
        fn part<T: fmt::Display>(name: &str, v: &Option<Sourced<T>>) -> String {
            match v {
                Some(s) => format!("{name}={} ({})", s.value, s.source),
                None => format!("{name}=unset"),
            }
        }
        let launcher = self.launcher.map_or("none".to_string(), |l| l.to_string());
        let token = match &self.token {
            Some(t) if t.source == "TESSERA_TOKEN" => "token=set (TESSERA_TOKEN)".to_string(),
            Some(t) => format!("token={} (derived from {})", t.value, t.source),
            None => "token=unset".to_string(),
        };
        format!(
            "launcher={launcher} {} {} {} {} {} {} {token} gpu={}",
            part("rank", &self.rank),
            part("world", &self.world),
            part("local_rank", &self.local_rank),
            part("local_world", &self.local_world),
            part("node", &self.node_rank),
            part("coordinator", &self.coordinator),
            self.gpu_index(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn ok(pairs: &[(&str, &str)]) -> LaunchEnv {
        detect(&env(pairs)).unwrap_or_else(|e| panic!("{pairs:?}: {e}"))
    }

    fn val(s: &Option<Sourced<u32>>) -> Option<(u32, &str)> {
        s.as_ref().map(|s| (s.value, s.source.as_str()))
    }

    #[test]
    fn nothing_set_means_no_launcher() {
        let e = ok(&[("PATH", "/bin")]);
        assert_eq!(e.launcher, None);
        assert_eq!(e.rank, None);
        assert_eq!(e.world, None);
        assert_eq!(e.coordinator, None);
        assert_eq!(e.token, None);
        assert_eq!(e.gpu_index(), 0);
    }

    #[test]
    fn slurm() {
        let e = ok(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NODEID", "2"),
            ("SLURM_JOB_NODELIST", "gpu[07-10]"),
            ("SLURM_JOB_ID", "123456"),
            ("SLURM_STEP_ID", "3"),
        ]);
        assert_eq!(e.launcher, Some(Launcher::Slurm));
        assert_eq!(val(&e.rank), Some((5, "SLURM_PROCID")));
        assert_eq!(val(&e.world), Some((8, "SLURM_NTASKS")));
        assert_eq!(val(&e.local_rank), Some((1, "SLURM_LOCALID")));
        assert_eq!(val(&e.node_rank), Some((2, "SLURM_NODEID")));
        let c = e.coordinator.unwrap();
        assert_eq!(c.value, "gpu07:18456");
        assert!(c.source.contains("SLURM_JOB_NODELIST"), "{}", c.source);
        let t = e.token.unwrap();
        assert_eq!(t.value, "slurm:123456.3");
        assert_eq!(t.source, "SLURM_JOB_ID.SLURM_STEP_ID");
    }

    #[test]
    fn slurm_step_nodelist_beats_the_job_nodelist() {
        let e = ok(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_JOB_NODELIST", "a[1-4]"),
            ("SLURM_STEP_NODELIST", "a[3-4]"),
            ("SLURM_JOB_ID", "7"),
        ]);
        assert_eq!(e.coordinator.unwrap().value, "a3:15007");
    }

    #[test]
    fn open_mpi_wins_over_the_slurm_allocation_it_runs_in() {
        let e = ok(&[
            ("OMPI_COMM_WORLD_RANK", "3"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
            ("OMPI_MCA_ess_base_jobid", "1307508737"),
            ("PMIX_RANK", "3"),
            ("PMIX_NAMESPACE", "1307508737"),
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
            ("SLURM_JOB_ID", "99"),
            ("SLURM_JOB_NODELIST", "n1"),
        ]);
        assert_eq!(e.launcher, Some(Launcher::OpenMpi));
        assert_eq!(val(&e.rank), Some((3, "OMPI_COMM_WORLD_RANK")));
        assert_eq!(val(&e.world), Some((4, "OMPI_COMM_WORLD_SIZE")));
        assert_eq!(val(&e.local_rank), Some((1, "OMPI_COMM_WORLD_LOCAL_RANK")));
        assert_eq!(val(&e.local_world), Some((2, "OMPI_COMM_WORLD_LOCAL_SIZE")));
        assert_eq!(e.node_rank, None);
        assert_eq!(e.token.unwrap().value, "ompi:1307508737");
        // No address of its own: the Slurm rule still names one.
        assert_eq!(e.coordinator.unwrap().value, "n1:15099");
    }

    #[test]
    fn mpirun_on_one_node_uses_loopback_on_a_port_from_the_job_id() {
        let one_node = [
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "4"),
            ("OMPI_MCA_ess_base_jobid", "1487798273"),
        ];
        let c = ok(&one_node).coordinator.unwrap();
        let port = 15000 + fnv1a64(b"ompi:1487798273") % 10000;
        assert_eq!(c.value, format!("127.0.0.1:{port}"));
        assert!(c.source.starts_with("single node"), "{}", c.source);
        // Another job, another port (most of the time; these two differ).
        let mut other = one_node.to_vec();
        other[4] = ("OMPI_MCA_ess_base_jobid", "1487798274");
        assert_ne!(ok(&other).coordinator.unwrap().value, c.value);
        // Ranks on two nodes: no address can be guessed.
        let mut two_nodes = one_node.to_vec();
        two_nodes[3] = ("OMPI_COMM_WORLD_LOCAL_SIZE", "2");
        let e = ok(&two_nodes);
        assert_eq!(e.coordinator, None);
        assert_eq!(e.token.unwrap().value, "ompi:1487798273");
        // MPICH with no job identity and no address: neither address nor token.
        let e = ok(&[("PMI_RANK", "0"), ("PMI_SIZE", "2")]);
        assert_eq!((e.coordinator, e.token), (None, None));
    }

    #[test]
    fn mpich_mvapich_pmix() {
        let e = ok(&[("PMI_RANK", "2"), ("PMI_SIZE", "3"), ("MPI_LOCALRANKID", "0")]);
        assert_eq!(e.launcher, Some(Launcher::Mpich));
        assert_eq!(val(&e.rank), Some((2, "PMI_RANK")));
        assert_eq!(val(&e.local_rank), Some((0, "MPI_LOCALRANKID")));
        let e = ok(&[
            ("MV2_COMM_WORLD_RANK", "1"),
            ("MV2_COMM_WORLD_SIZE", "2"),
            ("MV2_COMM_WORLD_LOCAL_RANK", "1"),
            ("PMI_RANK", "1"),
            ("PMI_SIZE", "2"),
        ]);
        assert_eq!(e.launcher, Some(Launcher::Mvapich2));
        assert_eq!(val(&e.world), Some((2, "MV2_COMM_WORLD_SIZE")));
        let e = ok(&[("PMIX_RANK", "1"), ("TESSERA_LAUNCH_WORLD", "2"), ("PMIX_NAMESPACE", "ns")]);
        assert_eq!(e.launcher, Some(Launcher::Pmix));
        assert_eq!(val(&e.world), Some((2, "TESSERA_LAUNCH_WORLD")));
        assert_eq!(e.token.unwrap().value, "pmix:ns");
        let err = detect(&env(&[("PMIX_RANK", "1")])).unwrap_err();
        assert!(matches!(err, EnvError::NoWorld { launcher: Launcher::Pmix, .. }), "{err}");
        assert!(err.to_string().contains("TESSERA_LAUNCH_WORLD"), "{err}");
    }

    #[test]
    fn torchrun() {
        let e = ok(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "3"),
            ("LOCAL_WORLD_SIZE", "4"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29500"),
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
        ]);
        assert_eq!(e.launcher, Some(Launcher::Torchrun));
        assert_eq!(val(&e.rank), Some((3, "RANK")));
        assert_eq!(val(&e.local_world), Some((4, "LOCAL_WORLD_SIZE")));
        let c = e.coordinator.unwrap();
        assert_eq!(
            (c.value.as_str(), c.source.as_str()),
            ("10.0.0.1:29500", "MASTER_ADDR:MASTER_PORT")
        );
        assert_eq!(e.token.unwrap().value, "master:10.0.0.1:29500");
        // torchrun's agent store sits on MASTER_PORT: the coordinator takes the next port.
        let e = ok(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "1"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "29500"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
            ("TORCHELASTIC_RUN_ID", "abc"),
        ]);
        assert_eq!(e.coordinator.unwrap().value, "h:29501");
        assert_eq!(e.token.unwrap().value, "torchrun:abc");
        // A lone RANK (a generic name) is not torchrun.
        let e = ok(&[("RANK", "3"), ("SLURM_PROCID", "1"), ("SLURM_NTASKS", "2")]);
        assert_eq!(e.launcher, Some(Launcher::Slurm));
    }

    #[test]
    fn tessera_run_has_the_highest_precedence() {
        let e = ok(&[
            ("TESSERA_LAUNCH_RANK", "1"),
            ("TESSERA_LAUNCH_WORLD", "2"),
            ("TESSERA_LOCAL_RANK", "1"),
            ("TESSERA_LOCAL_WORLD", "2"),
            ("TESSERA_COORDINATOR", "127.0.0.1:4000"),
            ("TESSERA_TOKEN", "secret"),
            ("RANK", "0"),
            ("WORLD_SIZE", "9"),
            ("MASTER_ADDR", "elsewhere"),
            ("MASTER_PORT", "1"),
            ("OMPI_COMM_WORLD_RANK", "0"),
            ("OMPI_COMM_WORLD_SIZE", "9"),
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "9"),
        ]);
        assert_eq!(e.launcher, Some(Launcher::Tessera));
        assert_eq!(val(&e.rank), Some((1, "TESSERA_LAUNCH_RANK")));
        assert_eq!(val(&e.world), Some((2, "TESSERA_LAUNCH_WORLD")));
        assert_eq!(e.coordinator.clone().unwrap().value, "127.0.0.1:4000");
        let t = e.token.clone().unwrap();
        assert_eq!((t.value.as_str(), t.source.as_str()), ("secret", "TESSERA_TOKEN"));
        assert!(!e.describe().contains("secret"));
    }

    #[test]
    fn a_world_without_a_rank_is_kept_for_a_standalone_coordinator() {
        let e = ok(&[("TESSERA_LAUNCH_WORLD", "4"), ("TESSERA_COORDINATOR", "h:1")]);
        assert_eq!(e.launcher, None);
        assert_eq!(val(&e.world), Some((4, "TESSERA_LAUNCH_WORLD")));
        assert_eq!(e.token.unwrap().value, "addr:h:1");
    }

    #[test]
    fn malformed_values_name_the_variable() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("SLURM_PROCID", "x"), ("SLURM_NTASKS", "2")], "SLURM_PROCID"),
            (&[("SLURM_PROCID", "1"), ("SLURM_NTASKS", "-2")], "SLURM_NTASKS"),
            (&[("SLURM_PROCID", "1"), ("SLURM_NTASKS", "0")], "SLURM_NTASKS"),
            (&[("SLURM_PROCID", "2"), ("SLURM_NTASKS", "2")], "SLURM_PROCID"),
            (&[("SLURM_PROCID", "0")], "SLURM_NTASKS"),
            (
                &[
                    ("OMPI_COMM_WORLD_RANK", "0"),
                    ("OMPI_COMM_WORLD_SIZE", "2"),
                    ("OMPI_COMM_WORLD_LOCAL_RANK", "z"),
                ],
                "OMPI_COMM_WORLD_LOCAL_RANK",
            ),
            (&[("TESSERA_COORDINATOR", "nohost")], "TESSERA_COORDINATOR"),
            (&[("TESSERA_COORDINATOR", "h:0")], "TESSERA_COORDINATOR"),
            (&[("TESSERA_COORDINATOR", "h:70000")], "TESSERA_COORDINATOR"),
            (&[("MASTER_ADDR", "h")], "MASTER_PORT"),
            (&[("MASTER_PORT", "1")], "MASTER_ADDR"),
            (&[("MASTER_ADDR", "h"), ("MASTER_PORT", "p")], "MASTER_PORT"),
            (&[("SLURM_JOB_ID", "5"), ("SLURM_JOB_NODELIST", "n[1-")], "SLURM_JOB_NODELIST"),
            (&[("SLURM_JOB_ID", "x5"), ("SLURM_JOB_NODELIST", "n1")], "SLURM_JOB_ID"),
            (&[("TESSERA_TOKEN", "")], "TESSERA_TOKEN"),
            (&[("TESSERA_COORDINATOR_MODE", "maybe")], "TESSERA_COORDINATOR_MODE"),
        ];
        for (pairs, var) in cases {
            let err = detect(&env(pairs)).expect_err(&format!("{pairs:?}"));
            assert!(err.to_string().contains(var), "{pairs:?}: {err}");
        }
    }

    #[test]
    fn gpu_choice() {
        let base = [("SLURM_PROCID", "3"), ("SLURM_NTASKS", "4"), ("SLURM_LOCALID", "3")];
        assert_eq!(ok(&base).gpu_index(), 3);
        let mut one = base.to_vec();
        one.push(("CUDA_VISIBLE_DEVICES", "5"));
        assert_eq!(ok(&one).gpu_index(), 0);
        let mut all = base.to_vec();
        all.push(("CUDA_VISIBLE_DEVICES", "0,1,2,3"));
        assert_eq!(ok(&all).gpu_index(), 3);
    }

    #[test]
    fn describe_names_every_source() {
        let line = ok(&[
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "4"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_JOB_ID", "42"),
            ("SLURM_JOB_NODELIST", "vm"),
        ])
        .describe();
        for want in [
            "launcher=Slurm",
            "rank=1 (SLURM_PROCID)",
            "world=4 (SLURM_NTASKS)",
            "local_rank=1 (SLURM_LOCALID)",
            "coordinator=vm:15042",
            "token=slurm:42.batch",
        ] {
            assert!(line.contains(want), "{want:?} not in {line}");
        }
    }
}
