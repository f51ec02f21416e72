//! All-reduce benchmark of the TCP ring over loopback, with N ranks as N processes (default) or
//! as N threads (`--threads`), printed in nccl-tests terms.
//!
//! ```text
//! cargo run --release -p tessera-collectives --example ring_bench -- --np 4 --sizes 64M
//! ```
//! Options: `--np N` (4), `--sizes LIST` (64M; `1K..256M` or `1M,64M`), `--iters K` (10),
//! `--warmup W` (3), `--chunk BYTES` (slice size), `--check`, `--threads`, `--json`.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::Duration;

use tessera_collectives::Communicator;
use tessera_collectives::bench::{bench_all_reduce, format_table, parse_size, parse_sizes};
use tessera_collectives::tcp::{DataPlaneListener, TcpRing, TcpRingConfig};

#[derive(Clone, Debug)]
struct Opts {
    np: usize,
    sizes: Vec<usize>,
    iters: usize,
    warmup: usize,
    chunk: Option<usize>,
    check: bool,
    threads: bool,
    json: bool,
    child: Option<usize>,
    raw: Vec<String>,
}

fn parse_args() -> Result<Opts, String> {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let mut o = Opts {
        np: 4,
        sizes: vec![64 << 20],
        iters: 10,
        warmup: 3,
        chunk: None,
        check: false,
        threads: false,
        json: false,
        child: None,
        raw: Vec::new(),
    };
    let mut it = raw.iter();
    let num = |v: Option<&String>, what: &str| -> Result<usize, String> {
        v.ok_or(format!("{what} needs a value"))?.parse().map_err(|e| format!("{what}: {e}"))
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--np" => o.np = num(it.next(), "--np")?,
            "--iters" => o.iters = num(it.next(), "--iters")?,
            "--warmup" => o.warmup = num(it.next(), "--warmup")?,
            "--child" => o.child = Some(num(it.next(), "--child")?),
            "--sizes" => {
                let v = it.next().ok_or("--sizes needs a value")?;
                o.sizes = parse_sizes(v).map_err(|e| e.to_string())?;
            }
            "--chunk" => {
                let v = it.next().ok_or("--chunk needs a value")?;
                o.chunk = Some(parse_size(v).map_err(|e| e.to_string())?);
            }
            "--check" => o.check = true,
            "--threads" => o.threads = true,
            "--json" => o.json = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    o.raw = raw.into_iter().filter(|a| a != "--threads").collect();
    if o.np == 0 {
        return Err("--np must be at least 1".into());
    }
    Ok(o)
}

fn cfg(o: &Opts) -> TcpRingConfig {
    let mut c = TcpRingConfig {
        timeout: Duration::from_secs(120),
        session: 0xbe4c,
        ..TcpRingConfig::default()
    };
    if let Some(ch) = o.chunk {
        c.chunk_bytes = ch;
    }
    c
}

fn report(o: &Opts, comm: &mut dyn Communicator) -> Result<(), String> {
    let rows =
        bench_all_reduce(comm, &o.sizes, o.iters, o.warmup, o.check).map_err(|e| e.to_string())?;
    if comm.rank() == 0 {
        if o.json {
            for r in &rows {
                println!("{}", r.to_json());
            }
        } else {
            println!("# all_reduce, float, sum, {} ranks", comm.world());
            print!("{}", format_table(&rows));
        }
    }
    Ok(())
}

fn run_threads(o: &Opts) -> Result<(), String> {
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let ls: Vec<DataPlaneListener> = (0..o.np)
        .map(|_| DataPlaneListener::bind(ip).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let addrs: Vec<SocketAddr> =
        ls.iter().map(|l| l.local_addr().map_err(|e| e.to_string())).collect::<Result<_, _>>()?;
    std::thread::scope(|s| {
        let hs: Vec<_> = ls
            .into_iter()
            .enumerate()
            .map(|(r, l)| {
                let addrs = &addrs;
                s.spawn(move || -> Result<(), String> {
                    let mut ring =
                        TcpRing::connect(l, r, addrs, cfg(o)).map_err(|e| e.to_string())?;
                    report(o, &mut ring)
                })
            })
            .collect();
        hs.into_iter().try_for_each(|h| h.join().map_err(|_| "rank thread panicked".to_string())?)
    })
}

/// Child: bind, print the port, read every rank's address from stdin, run.
fn run_child(o: &Opts, rank: usize) -> Result<(), String> {
    let l = DataPlaneListener::bind(IpAddr::V4(Ipv4Addr::LOCALHOST)).map_err(|e| e.to_string())?;
    println!("ADDR {}", l.local_addr().map_err(|e| e.to_string())?);
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).map_err(|e| e.to_string())?;
    let addrs: Vec<String> = line.split_whitespace().map(str::to_string).collect();
    let mut ring = TcpRing::connect(l, rank, &addrs, cfg(o)).map_err(|e| e.to_string())?;
    report(o, &mut ring)
}

fn run_processes(o: &Opts) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut children = Vec::new();
    let mut addrs = Vec::new();
    for r in 0..o.np {
        let mut child = Command::new(&exe)
            .args(&o.raw)
            .args(["--child", &r.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawning rank {r}: {e}"))?;
        let out = child.stdout.take().ok_or("no stdout")?;
        let mut out = BufReader::new(out);
        let mut line = String::new();
        out.read_line(&mut line).map_err(|e| e.to_string())?;
        let addr = line.strip_prefix("ADDR ").ok_or(format!("rank {r} said {line:?}"))?;
        addrs.push(addr.trim().to_string());
        children.push((child, out));
    }
    let list = addrs.join(" ") + "\n";
    for (child, _) in &mut children {
        child
            .stdin
            .as_mut()
            .ok_or("no stdin")?
            .write_all(list.as_bytes())
            .map_err(|e| e.to_string())?;
    }
    let mut failed = Vec::new();
    for (r, (mut child, mut out)) in children.into_iter().enumerate() {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut rest);
        print!("{rest}");
        let status = child.wait().map_err(|e| e.to_string())?;
        if !status.success() {
            failed.push(format!("rank {r}: {status}"));
        }
    }
    if failed.is_empty() { Ok(()) } else { Err(failed.join(", ")) }
}

fn main() {
    let r = parse_args().and_then(|o| match o.child {
        Some(rank) => run_child(&o, rank),
        None if o.threads => run_threads(&o),
        None => run_processes(&o),
    });
    if let Err(e) = r {
        eprintln!("ring_bench: {e}");
        std::process::exit(1);
    }
}
