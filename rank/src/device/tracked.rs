//! [`Tracked`]: the CPU device with its own buffer type and a ledger, like `CudaDevice`'s
//! registry, for tests of the contract a GPU needs (the model in device buffers, the training
//! loop on such a device). It counts kernel arguments that lie outside its allocations (a GPU
//! would stage those through copies), marks allocations that kernels wrote since the last
//! [`Device::synchronize`] (a GPU's host would read stale values there) and counts the waits.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{CpuDevice, Device, XentOut};
use crate::optim::passes::{LambJob, MomentumJob, ReduceJob, Sums};

#[derive(Debug, Default)]
pub(crate) struct Ledger {
    /// Live allocations: start address → bytes.
    pub(crate) live: BTreeMap<usize, usize>,
    /// Allocations written by kernels since the last synchronize.
    dirty: BTreeSet<usize>,
    /// Kernel arguments outside every live allocation.
    pub(crate) foreign: usize,
    pub(crate) syncs: usize,
    /// GEMMs queued.
    pub(crate) gemms: usize,
}

impl Ledger {
    pub(crate) fn containing(&self, s: &[f32]) -> Option<usize> {
        let addr = s.as_ptr() as usize;
        let (&start, &len) = self.live.range(..=addr).next_back()?;
        (addr + std::mem::size_of_val(s) <= start + len).then_some(start)
    }
}

#[derive(Debug)]
pub(crate) struct TrackedBuf {
    v: Vec<f32>,
    start: usize,
    ledger: Arc<Mutex<Ledger>>,
}

impl std::ops::Deref for TrackedBuf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.v
    }
}

impl std::ops::DerefMut for TrackedBuf {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.v
    }
}

impl Drop for TrackedBuf {
    fn drop(&mut self) {
        // A test's failed assertion may have poisoned the lock; panicking again here, while
        // unwinding, would abort the test binary instead of reporting that assertion.
        let mut l = self.ledger.lock().unwrap_or_else(|e| e.into_inner());
        l.live.remove(&self.start);
        l.dirty.remove(&self.start);
    }
}

pub(crate) struct Tracked {
    cpu: CpuDevice,
    ledger: Arc<Mutex<Ledger>>,
}

impl Tracked {
    pub(crate) fn new() -> Tracked {
        Tracked { cpu: CpuDevice::new(1), ledger: Arc::default() }
    }

    pub(crate) fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap()
    }

    /// Arguments the kernel reads.
    fn reads(&self, args: &[&[f32]]) {
        let mut l = self.ledger();
        for s in args.iter().filter(|s| !s.is_empty()) {
            if l.containing(s).is_none() {
                l.foreign += 1;
            }
        }
    }

    /// An argument the kernel writes.
    fn writes(&self, s: &[f32]) {
        if s.is_empty() {
            return;
        }
        let mut l = self.ledger();
        match l.containing(s) {
            Some(start) => {
                l.dirty.insert(start);
            }
            None => l.foreign += 1,
        }
    }

    pub(crate) fn dirty(&self) -> usize {
        self.ledger().dirty.len()
    }

    pub(crate) fn foreign(&self) -> usize {
        self.ledger().foreign
    }
}

impl Device for Tracked {
    type Buf = TrackedBuf;

    fn name(&self) -> String {
        "tracked".into()
    }

    fn threads(&self) -> usize {
        1
    }

    fn alloc(&self, len: usize) -> TrackedBuf {
        let v = vec![0.0f32; len];
        let start = v.as_ptr() as usize;
        if len > 0 {
            // The zeroing counts as a queued kernel, as on a GPU.
            let mut l = self.ledger();
            l.live.insert(start, len * 4);
            l.dirty.insert(start);
        }
        TrackedBuf { v, start, ledger: Arc::clone(&self.ledger) }
    }

    fn synchronize(&self) {
        let mut l = self.ledger();
        l.dirty.clear();
        l.syncs += 1;
    }

    fn host_vec(&self, buf: TrackedBuf) -> Vec<f32> {
        assert!(
            !self.ledger().dirty.contains(&buf.start),
            "host_vec of a buffer that kernels wrote after the last synchronize"
        );
        buf.v.clone()
    }

    fn copy(&self, x: &[f32], y: &mut [f32]) {
        self.reads(&[x]);
        self.writes(y);
        self.cpu.copy(x, y)
    }

    fn gemm(
        &self,
        trans_a: bool,
        trans_b: bool,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: &[f32],
        b: &[f32],
        beta: f32,
        c: &mut [f32],
    ) {
        self.reads(&[a, b]);
        self.writes(c);
        self.ledger().gemms += 1;
        self.cpu.gemm(trans_a, trans_b, m, n, k, alpha, a, b, beta, c)
    }

    fn bias_add(&self, y: &mut [f32], bias: &[f32], rows: usize, cols: usize) {
        self.reads(&[bias]);
        self.writes(y);
        self.cpu.bias_add(y, bias, rows, cols)
    }

    fn bias_grad(&self, dy: &[f32], rows: usize, cols: usize, dbias: &mut [f32]) {
        self.reads(&[dy]);
        self.writes(dbias);
        self.cpu.bias_grad(dy, rows, cols, dbias)
    }

    fn gelu_fwd(&self, x: &[f32], y: &mut [f32]) {
        self.reads(&[x]);
        self.writes(y);
        self.cpu.gelu_fwd(x, y)
    }

    fn gelu_bwd(&self, x: &[f32], dy: &[f32], dx: &mut [f32]) {
        self.reads(&[x, dy]);
        self.writes(dx);
        self.cpu.gelu_bwd(x, dy, dx)
    }

    fn relu_fwd(&self, x: &[f32], y: &mut [f32]) {
        self.reads(&[x]);
        self.writes(y);
        self.cpu.relu_fwd(x, y)
    }

    fn relu_bwd(&self, x: &[f32], dy: &[f32], dx: &mut [f32]) {
        self.reads(&[x, dy]);
        self.writes(dx);
        self.cpu.relu_bwd(x, dy, dx)
    }

    fn layernorm_fwd(
        &self,
        x: &[f32],
        gamma: &[f32],
        beta: &[f32],
        rows: usize,
        cols: usize,
        eps: f32,
        y: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
    ) {
        self.reads(&[x, gamma, beta]);
        self.writes(y);
        self.writes(mean);
        self.writes(rstd);
        self.cpu.layernorm_fwd(x, gamma, beta, rows, cols, eps, y, mean, rstd)
    }

    fn layernorm_bwd(
        &self,
        x: &[f32],
        gamma: &[f32],
        mean: &[f32],
        rstd: &[f32],
        dy: &[f32],
        rows: usize,
        cols: usize,
        dx: &mut [f32],
        dgamma: &mut [f32],
        dbeta: &mut [f32],
    ) {
        self.reads(&[x, gamma, mean, rstd, dy]);
        self.writes(dx);
        self.writes(dgamma);
        self.writes(dbeta);
        self.cpu.layernorm_bwd(x, gamma, mean, rstd, dy, rows, cols, dx, dgamma, dbeta)
    }

    fn add_inplace(&self, y: &mut [f32], x: &[f32]) {
        self.reads(&[x]);
        self.writes(y);
        self.cpu.add_inplace(y, x)
    }

    fn l2_normalize_fwd(
        &self,
        x: &[f32],
        rows: usize,
        cols: usize,
        y: &mut [f32],
        norms: &mut [f32],
    ) {
        self.reads(&[x]);
        self.writes(y);
        self.writes(norms);
        self.cpu.l2_normalize_fwd(x, rows, cols, y, norms)
    }

    fn l2_normalize_bwd(
        &self,
        y: &[f32],
        norms: &[f32],
        dy: &[f32],
        rows: usize,
        cols: usize,
        dx: &mut [f32],
    ) {
        self.reads(&[y, norms, dy]);
        self.writes(dx);
        self.cpu.l2_normalize_bwd(y, norms, dy, rows, cols, dx)
    }

    fn softmax_xent(
        &self,
        logits: &[f32],
        labels: &[u32],
        rows: usize,
        cols: usize,
        grad_scale: f32,
        dlogits: &mut [f32],
    ) -> XentOut {
        self.reads(&[logits]);
        self.writes(dlogits);
        self.cpu.softmax_xent(logits, labels, rows, cols, grad_scale, dlogits)
    }

    fn sq_norm(&self, x: &[f32]) -> f64 {
        self.reads(&[x]);
        self.cpu.sq_norm(x)
    }

    fn axpy(&self, alpha: f32, x: &[f32], y: &mut [f32]) {
        self.reads(&[x]);
        self.writes(y);
        self.cpu.axpy(alpha, x, y)
    }

    fn scale(&self, alpha: f32, x: &mut [f32]) {
        self.writes(x);
        self.cpu.scale(alpha, x)
    }

    // The optimizer's passes return with the device idle, as `CudaDevice`'s do: the host
    // reads the parameters next (checkpoint, logit-scale clamp).
    fn optim_reduce(&self, w: &[f32], g: &[f32], jobs: &[ReduceJob]) -> Vec<Sums> {
        self.reads(&[w, g]);
        self.synchronize();
        crate::optim::engine::host_reduce(w, g, jobs)
    }

    fn optim_momentum(
        &self,
        w: &mut [f32],
        g: &[f32],
        v: &mut [f32],
        jobs: &[MomentumJob],
    ) -> Vec<f64> {
        self.reads(&[g]);
        self.writes(w);
        self.writes(v);
        let norms = crate::optim::engine::host_momentum(w, g, v, jobs);
        self.synchronize();
        norms
    }

    fn optim_lamb(
        &self,
        w: &mut [f32],
        g: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        u: &mut [f32],
        jobs: &[LambJob],
        rate: &mut dyn FnMut(usize, f64, f64) -> f64,
    ) {
        self.reads(&[g]);
        for x in [&*w, &*m, &*v, &*u] {
            self.writes(x);
        }
        crate::optim::engine::host_lamb(w, g, m, v, u, jobs, rate);
        self.synchronize();
    }
}
