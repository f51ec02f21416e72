//! Ranks as threads of one process, for unit tests of the layers above the communicator.
//!
//! Every collective is one rendezvous: each rank deposits its contribution for sequence number
//! `seq`, the last one to arrive publishes all of them, and every rank computes its result from
//! the same contributions in rank order, so reductions are bitwise identical on every rank.
//! Dropping a [`ThreadComm`] counts as a disconnect; waiting longer than the timeout is a
//! [`CommError::Timeout`] naming a missing rank.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::{CommError, Communicator, ReduceOp, Result};

type Contributions = Arc<Vec<Vec<u8>>>;

struct Round {
    parts: Vec<Option<(&'static str, Vec<u8>)>>,
    present: usize,
    /// All contributions once complete, or the op each rank called when they differ.
    result: Option<std::result::Result<Contributions, Vec<&'static str>>>,
    taken: usize,
}

struct State {
    rounds: HashMap<u64, Round>,
    gone: Vec<bool>,
}

struct Shared {
    state: Mutex<State>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One rank of a group of threads; see [`ThreadComm::group`].
pub struct ThreadComm {
    rank: usize,
    world: usize,
    seq: u64,
    timeout: Duration,
    shared: Arc<Shared>,
    broken: Option<String>,
}

impl std::fmt::Debug for ThreadComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadComm")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("seq", &self.seq)
            .finish()
    }
}

impl ThreadComm {
    /// `world` communicators (rank i at index i), to be moved into one thread each; waits time
    /// out after 600 s.
    pub fn group(world: usize) -> Vec<ThreadComm> {
        Self::group_with_timeout(world, Duration::from_secs(600))
    }

    /// Runs `f(rank, comm)` for every rank of a new [`ThreadComm::group`] of `world`, each on a
    /// scoped thread of its own, and returns the results in rank order. A rank's panic is
    /// raised again here, with its own message.
    pub fn run_group<R: Send>(
        world: usize,
        f: impl Fn(usize, &mut ThreadComm) -> R + Sync,
    ) -> Vec<R> {
        let f = &f;
        std::thread::scope(|s| {
            let hs: Vec<_> = Self::group(world)
                .into_iter()
                .enumerate()
                .map(|(r, mut c)| s.spawn(move || f(r, &mut c)))
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        })
    }

    /// As [`ThreadComm::group`] with a custom timeout.
    pub fn group_with_timeout(world: usize, timeout: Duration) -> Vec<ThreadComm> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State { rounds: HashMap::new(), gone: vec![false; world] }),
            cv: Condvar::new(),
        });
        (0..world)
            .map(|rank| ThreadComm {
                rank,
                world,
                seq: 0,
                timeout,
                shared: Arc::clone(&shared),
                broken: None,
            })
            .collect()
    }

    fn exchange(&mut self, op: &'static str, data: Vec<u8>) -> Result<(u64, Contributions)> {
        let seq = self.seq;
        self.seq += 1;
        if let Some(why) = &self.broken {
            return Err(CommError::Poisoned(why.clone()));
        }
        let r = self.exchange_inner(op, seq, data);
        if let Err(e) = &r {
            self.broken = Some(e.to_string());
        }
        r.map(|c| (seq, c))
    }

    fn exchange_inner(&self, op: &'static str, seq: u64, data: Vec<u8>) -> Result<Contributions> {
        let world = self.world;
        let deadline = Instant::now() + self.timeout;
        let mut st = self.shared.lock();
        {
            let round = st.rounds.entry(seq).or_insert_with(|| Round {
                parts: vec![None; world],
                present: 0,
                result: None,
                taken: 0,
            });
            round.parts[self.rank] = Some((op, data));
            round.present += 1;
            if round.present == world {
                let ops: Vec<&'static str> =
                    round.parts.iter().map(|p| p.as_ref().map_or("", |p| p.0)).collect();
                round.result = Some(if ops.iter().all(|o| *o == op) {
                    Ok(Arc::new(
                        round
                            .parts
                            .iter_mut()
                            .map(|p| p.take().map(|p| p.1).unwrap_or_default())
                            .collect(),
                    ))
                } else {
                    Err(ops)
                });
                self.shared.cv.notify_all();
            }
        }
        loop {
            let round = st.rounds.get_mut(&seq).ok_or_else(|| CommError::Protocol {
                op,
                seq,
                peer: self.rank,
                detail: "the rendezvous vanished".into(),
            })?;
            if let Some(result) = &round.result {
                let result = result.clone();
                round.taken += 1;
                if round.taken == world {
                    st.rounds.remove(&seq);
                }
                return result.map_err(|ops| {
                    let (peer, theirs) = ops
                        .iter()
                        .enumerate()
                        .find(|(_, o)| **o != op)
                        .map_or((self.rank, ""), |(r, o)| (r, *o));
                    CommError::Protocol {
                        op,
                        seq,
                        peer,
                        detail: format!(
                            "rank {peer} called {theirs} while this rank called {op}: the ranks \
                             called different sequences of collectives"
                        ),
                    }
                });
            }
            let missing = (0..world).filter(|r| round.parts[*r].is_none()).collect::<Vec<usize>>();
            if let Some(&peer) = missing.iter().find(|r| st.gone[**r]) {
                return Err(CommError::PeerDisconnected {
                    op,
                    seq,
                    peer,
                    detail: "its communicator was dropped".into(),
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(CommError::Timeout {
                    op,
                    seq,
                    peer: missing.first().copied().unwrap_or(self.rank),
                    after: self.timeout,
                });
            }
            st = self
                .shared
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn check_lengths(&self, op: &'static str, seq: u64, all: &[Vec<u8>]) -> Result<()> {
        let mine = all[self.rank].len();
        if let Some((peer, other)) = all.iter().enumerate().find(|(_, v)| v.len() != mine) {
            return Err(CommError::Protocol {
                op,
                seq,
                peer,
                detail: format!(
                    "rank {peer} passed {} bytes, this rank {mine}; every rank must pass the \
                     same length",
                    other.len()
                ),
            });
        }
        Ok(())
    }
}

impl Drop for ThreadComm {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.gone[self.rank] = true;
        drop(st);
        self.shared.cv.notify_all();
    }
}

fn f32s_to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_ne_bytes()).collect()
}

fn f32_at(b: &[u8], i: usize) -> f32 {
    f32::from_ne_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
}

fn f64_at(b: &[u8], i: usize) -> f64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[8 * i..8 * i + 8]);
    f64::from_ne_bytes(w)
}

/// Reduces elements `range` of every rank's f32 contribution in rank order into `out`.
fn reduce_f32(all: &[Vec<u8>], start: usize, out: &mut [f32], op: ReduceOp) {
    let inv = 1.0 / all.len() as f32;
    for (j, o) in out.iter_mut().enumerate() {
        let mut acc = f32_at(&all[0], start + j);
        for r in &all[1..] {
            acc += f32_at(r, start + j);
        }
        *o = if op == ReduceOp::Mean { acc * inv } else { acc };
    }
}

impl Communicator for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn seq(&self) -> u64 {
        self.seq
    }

    fn all_reduce_f32(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        let (seq, all) = self.exchange("all_reduce_f32", f32s_to_bytes(buf))?;
        self.check_lengths("all_reduce_f32", seq, &all)?;
        reduce_f32(&all, 0, buf, op);
        Ok(())
    }

    fn all_reduce_f64(&mut self, buf: &mut [f64], op: ReduceOp) -> Result<()> {
        let bytes = buf.iter().flat_map(|x| x.to_ne_bytes()).collect();
        let (seq, all) = self.exchange("all_reduce_f64", bytes)?;
        self.check_lengths("all_reduce_f64", seq, &all)?;
        let inv = 1.0 / self.world as f64;
        for (i, o) in buf.iter_mut().enumerate() {
            let mut acc = f64_at(&all[0], i);
            for r in &all[1..] {
                acc += f64_at(r, i);
            }
            *o = if op == ReduceOp::Mean { acc * inv } else { acc };
        }
        Ok(())
    }

    fn all_gather_f32(&mut self, input: &[f32], output: &mut [f32]) -> Result<()> {
        let m = input.len();
        if output.len() != m * self.world {
            self.seq += 1;
            return Err(CommError::InvalidArgument {
                op: "all_gather_f32",
                detail: format!(
                    "output has {} elements; it needs world × input = {} × {m}",
                    output.len(),
                    self.world
                ),
            });
        }
        let (seq, all) = self.exchange("all_gather_f32", f32s_to_bytes(input))?;
        self.check_lengths("all_gather_f32", seq, &all)?;
        for (r, part) in all.iter().enumerate() {
            for (j, o) in output[r * m..(r + 1) * m].iter_mut().enumerate() {
                *o = f32_at(part, j);
            }
        }
        Ok(())
    }

    fn all_gather_bytes(&mut self, input: &[u8]) -> Result<Vec<Vec<u8>>> {
        let (_, all) = self.exchange("all_gather_bytes", input.to_vec())?;
        Ok(all.as_ref().clone())
    }

    fn reduce_scatter_f32(
        &mut self,
        input: &[f32],
        output: &mut [f32],
        op: ReduceOp,
    ) -> Result<()> {
        let m = output.len();
        if input.len() != m * self.world {
            self.seq += 1;
            return Err(CommError::InvalidArgument {
                op: "reduce_scatter_f32",
                detail: format!(
                    "input has {} elements; it needs world × output = {} × {m}",
                    input.len(),
                    self.world
                ),
            });
        }
        let (seq, all) = self.exchange("reduce_scatter_f32", f32s_to_bytes(input))?;
        self.check_lengths("reduce_scatter_f32", seq, &all)?;
        reduce_f32(&all, self.rank * m, output, op);
        Ok(())
    }

    fn broadcast_bytes(&mut self, buf: &mut [u8], root: usize) -> Result<()> {
        if root >= self.world {
            self.seq += 1;
            return Err(CommError::InvalidArgument {
                op: "broadcast_bytes",
                detail: format!("root {root} is not a rank of a world of {}", self.world),
            });
        }
        let (seq, all) = self.exchange("broadcast_bytes", buf.to_vec())?;
        self.check_lengths("broadcast_bytes", seq, &all)?;
        buf.copy_from_slice(&all[root]);
        Ok(())
    }

    fn ring_shift_bytes(&mut self, send: &[u8], recv: &mut Vec<u8>) -> Result<()> {
        let (_, all) = self.exchange("ring_shift_bytes", send.to_vec())?;
        let prev = (self.rank + self.world - 1) % self.world;
        recv.clear();
        recv.extend_from_slice(&all[prev]);
        Ok(())
    }

    fn barrier(&mut self) -> Result<()> {
        self.exchange("barrier", Vec::new()).map(|_| ())
    }
}
