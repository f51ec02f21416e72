//! Fault injection for tests: `TESSERA_FAULT` makes a chosen rank die, stop, hang, exit or
//! produce a NaN gradient at an exact point of training, so that the failure paths (abort,
//! timeouts, checkpoints, restarts) are tested with real processes instead of by luck.
//!
//! Grammar: one or more faults separated by `;`, each `ACTION@POINT[:KEY=VALUE,...]`.
//! - ACTION: `kill` (SIGKILL itself), `stop` (SIGSTOP itself: a hung rank), `hang` (this thread
//!   sleeps forever while heartbeats go on), `exit` (exit code `code`, default 3), `nan` (only
//!   at `grad`: this rank's local gradient gets a NaN).
//! - POINT: `step` (a training step starts), `grad` (this rank's gradient is ready, before the
//!   all-reduce), `frame` (a data frame of a collective was sent to the next rank),
//!   `collective` (a collective starts), `checkpoint` (rank 0 has written half of a
//!   checkpoint's temporary file).
//! - KEYS: `rank` (default: every rank), `step` (the training step, counted from 1 as in
//!   metrics.jsonl: `step=1` is the first; default: any),
//!   `op` (collective name prefix, e.g. `all_reduce` or `ring_shift`), `n` (fire at the n-th
//!   matching point of that step, default 1), `code` (exit code), `generation` (only in that
//!   restart generation of `tessera run --max-restarts`, `TESSERA_GENERATION`, 1 for the first
//!   attempt; default: every generation).
//!
//! Example: `kill@frame:rank=1,step=2,op=all_reduce_f32,n=2` kills rank 1 after it sent its
//! second frame of a gradient all-reduce in its second step.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use tessera_collectives::flight::{FaultPoint, set_fault_hook};

/// The environment variable holding the fault specification.
pub const ENV: &str = "TESSERA_FAULT";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Kill,
    Stop,
    Hang,
    Exit(i32),
    Nan,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    Step,
    Grad,
    Frame,
    Collective,
    Checkpoint,
}

/// One parsed fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub action: Action,
    pub point: Point,
    pub rank: Option<usize>,
    pub step: Option<u64>,
    pub op: Option<String>,
    pub n: u64,
    pub generation: Option<u64>,
}

/// Parses a `TESSERA_FAULT` value; the error names the bad part and the grammar.
pub fn parse(spec: &str) -> Result<Vec<Fault>, String> {
    let grammar = "expected ACTION@POINT[:KEY=VALUE,...] with ACTION kill|stop|hang|exit|nan, \
                   POINT step|grad|frame|collective|checkpoint, KEY rank|step|op|n|code|generation";
    let mut out = Vec::new();
    for part in spec.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (head, keys) = part.split_once(':').unwrap_or((part, ""));
        let (action, point) =
            head.split_once('@').ok_or_else(|| format!("{ENV}: {part:?} has no '@'; {grammar}"))?;
        let point = match point {
            "step" => Point::Step,
            "grad" => Point::Grad,
            "frame" => Point::Frame,
            "collective" => Point::Collective,
            "checkpoint" => Point::Checkpoint,
            other => return Err(format!("{ENV}: unknown point {other:?} in {part:?}; {grammar}")),
        };
        let mut f = Fault {
            action: Action::Kill,
            point,
            rank: None,
            step: None,
            op: None,
            n: 1,
            generation: None,
        };
        let mut code = 3;
        for kv in keys.split(',').map(str::trim).filter(|k| !k.is_empty()) {
            let (k, v) =
                kv.split_once('=').ok_or_else(|| format!("{ENV}: {kv:?} is not KEY=VALUE"))?;
            let num = |v: &str| {
                v.parse::<u64>().map_err(|_| format!("{ENV}: {k}={v:?} is not a whole number"))
            };
            match k {
                "rank" => f.rank = Some(num(v)? as usize),
                "step" => f.step = Some(num(v)?),
                "n" => f.n = num(v)?.max(1),
                "generation" => f.generation = Some(num(v)?),
                "op" => f.op = Some(v.to_string()),
                "code" => {
                    code = v.parse().map_err(|_| format!("{ENV}: code={v:?} is not an integer"))?
                }
                other => {
                    return Err(format!("{ENV}: unknown key {other:?} in {part:?}; {grammar}"));
                }
            }
        }
        f.action = match action {
            "kill" => Action::Kill,
            "stop" => Action::Stop,
            "hang" => Action::Hang,
            "exit" => Action::Exit(code),
            "nan" if point == Point::Grad => Action::Nan,
            "nan" => return Err(format!("{ENV}: nan is only possible at grad, not in {part:?}")),
            other => return Err(format!("{ENV}: unknown action {other:?} in {part:?}; {grammar}")),
        };
        if action != "nan" && point == Point::Grad {
            return Err(format!("{ENV}: only nan is possible at grad, not {action:?}"));
        }
        out.push(f);
    }
    Ok(out)
}

struct Injector {
    rank: usize,
    faults: Vec<Fault>,
    /// Matching points seen in the current step, per fault.
    hits: Mutex<Vec<u64>>,
}

static INJECTOR: OnceLock<Injector> = OnceLock::new();
/// The training step in progress, `u64::MAX` before the first.
static STEP: AtomicU64 = AtomicU64::new(u64::MAX);

/// Reads `TESSERA_FAULT` and arms it for `rank` (call once the rank is known). Returns the
/// number of faults armed for this rank; an unparsable value is an error.
pub fn install_from_env(rank: usize) -> Result<usize, String> {
    let Ok(spec) = std::env::var(ENV) else { return Ok(0) };
    let generation: u64 =
        std::env::var("TESSERA_GENERATION").ok().and_then(|g| g.parse().ok()).unwrap_or(1);
    let faults: Vec<Fault> = parse(&spec)?
        .into_iter()
        .filter(|f| f.rank.is_none_or(|r| r == rank))
        .filter(|f| f.generation.is_none_or(|g| g == generation))
        .collect();
    let n = faults.len();
    if n == 0 {
        return Ok(0);
    }
    let inj = Injector { rank, hits: Mutex::new(vec![0; n]), faults };
    if INJECTOR.set(inj).is_err() {
        return Err(format!("{ENV}: fault injection was already armed in this process"));
    }
    set_fault_hook(Box::new(|p| {
        match p {
            FaultPoint::Begin { op, .. } => hit(Point::Collective, Some(op)),
            FaultPoint::FrameSent { op, .. } => hit(Point::Frame, Some(op)),
        };
    }));
    Ok(n)
}

/// Training step `step` (1-based) starts (the `step` point; resets per-step counts).
pub fn enter_step(step: u64) {
    let Some(inj) = INJECTOR.get() else { return };
    STEP.store(step, Ordering::SeqCst);
    inj.hits.lock().unwrap_or_else(|p| p.into_inner()).iter_mut().for_each(|h| *h = 0);
    hit(Point::Step, None);
}

/// The `grad` point: poisons `grads` with a NaN when a `nan@grad` fault matches.
pub fn at_grad(grads: &mut [f32]) {
    if hit(Point::Grad, None) == Some(Action::Nan)
        && let Some(g) = grads.first_mut()
    {
        *g = f32::NAN;
    }
}

/// The `checkpoint` point (rank 0, half of the temporary file written).
pub fn at_checkpoint() {
    hit(Point::Checkpoint, None);
}

/// Counts a point; carries out a matching fault (only `nan` returns, as `Some(Nan)`).
fn hit(point: Point, op: Option<&str>) -> Option<Action> {
    let inj = INJECTOR.get()?;
    let step = STEP.load(Ordering::SeqCst);
    let mut fire = None;
    {
        let mut hits = inj.hits.lock().unwrap_or_else(|p| p.into_inner());
        for (i, f) in inj.faults.iter().enumerate() {
            let matches = f.point == point
                && f.step.is_none_or(|s| s == step)
                && f.op.as_deref().is_none_or(|want| op.is_some_and(|o| o.starts_with(want)));
            if matches {
                hits[i] += 1;
                if hits[i] == f.n && fire.is_none() {
                    fire = Some(f.action);
                }
            }
        }
    }
    let action = fire?;
    let step_txt = if step == u64::MAX { "before training".into() } else { format!("step {step}") };
    eprintln!(
        "tessera rank {}: {ENV}: injecting {action:?} at {point:?}{} in {step_txt}",
        inj.rank,
        op.map_or(String::new(), |o| format!(" ({o})"))
    );
    match action {
        // SAFETY: raising a signal on this very process.
        Action::Kill => unsafe {
            libc::raise(libc::SIGKILL);
        },
        // SAFETY: as above; the process stays stopped until SIGCONT or SIGKILL.
        Action::Stop => unsafe {
            libc::raise(libc::SIGSTOP);
        },
        Action::Hang => loop {
            std::thread::park();
        },
        Action::Exit(code) => std::process::exit(code),
        Action::Nan => return Some(Action::Nan),
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_mistakes_are_named() {
        let f = parse("kill@frame:rank=1,step=2,op=all_reduce_f32,n=2; nan@grad:step=0").unwrap();
        assert_eq!(
            f[0],
            Fault {
                action: Action::Kill,
                point: Point::Frame,
                rank: Some(1),
                step: Some(2),
                op: Some("all_reduce_f32".into()),
                n: 2,
                generation: None,
            }
        );
        assert_eq!(f[1].action, Action::Nan);
        assert_eq!(f[1].rank, None);
        assert_eq!(parse("exit@step:code=7").unwrap()[0].action, Action::Exit(7));
        assert!(parse("kill").unwrap_err().contains("no '@'"));
        assert!(parse("kill@nowhere").unwrap_err().contains("unknown point \"nowhere\""));
        assert!(parse("nan@step").unwrap_err().contains("only possible at grad"));
        assert!(parse("kill@grad").unwrap_err().contains("only nan"));
        assert!(parse("kill@step:rank=x").unwrap_err().contains("rank=\"x\""));
        assert!(parse("kill@step:colour=red").unwrap_err().contains("unknown key \"colour\""));
        assert!(parse("").unwrap().is_empty());
    }
}
