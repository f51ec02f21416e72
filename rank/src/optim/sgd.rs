//! SGD with momentum (PyTorch's convention: buf ← m·buf + g; w ← w − lr·buf), optional
//! Nesterov, and L2 weight decay added to the gradient of the tensors that take it.

use super::TensorGroup;

#[derive(Clone, Debug)]
pub struct Sgd {
    pub momentum: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
    groups: Vec<TensorGroup>,
    velocity: Vec<f32>,
}

impl Sgd {
    pub fn new(groups: Vec<TensorGroup>, momentum: f64, nesterov: bool, weight_decay: f64) -> Sgd {
        let len = groups.iter().map(|g| g.offset + g.len).max().unwrap_or(0);
        Sgd { momentum, nesterov, weight_decay, groups, velocity: vec![0.0; len] }
    }

    pub fn groups(&self) -> &[TensorGroup] {
        &self.groups
    }

    /// The momentum buffer (for checkpoints and tests).
    pub fn velocity(&self) -> &[f32] {
        &self.velocity
    }

    /// One update with learning rate `lr` from the (all-reduced) gradient.
    pub fn step(&mut self, params: &mut [f32], grads: &[f32], lr: f64) {
        let m = self.momentum as f32;
        let lr = lr as f32;
        for g in self.groups.iter().filter(|g| g.trainable) {
            let wd = if g.decay { self.weight_decay as f32 } else { 0.0 };
            let range = g.offset..g.offset + g.len;
            let w = &mut params[range.clone()];
            let v = &mut self.velocity[range.clone()];
            let gr = &grads[range];
            for i in 0..w.len() {
                let d = gr[i] + wd * w[i];
                v[i] = m * v[i] + d;
                let step = if self.nesterov { d + m * v[i] } else { v[i] };
                w[i] -= lr * step;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(offset: usize, len: usize, decay: bool, trainable: bool) -> TensorGroup {
        let shape: &[usize] = if decay { &[len, 1] } else { &[len] };
        TensorGroup::from_shape(format!("t{offset}"), offset, len, shape, trainable)
    }

    #[test]
    fn matches_f64_reference_over_many_steps() {
        let groups = vec![group(0, 3, true, true), group(3, 2, false, true)];
        let mut opt = Sgd::new(groups, 0.9, false, 0.01);
        let mut w: Vec<f32> = vec![0.5, -1.0, 2.0, 0.25, -0.75];
        let mut w64: Vec<f64> = w.iter().map(|&x| x as f64).collect();
        let mut v64 = [0.0f64; 5];
        let mut rng = crate::rng::Rng::new(5);
        for step in 0..100 {
            let g: Vec<f32> = (0..5).map(|_| rng.normal() as f32).collect();
            let lr = 0.05 / (1.0 + step as f64 * 0.01);
            opt.step(&mut w, &g, lr);
            for i in 0..5 {
                let wd = if i < 3 { 0.01 } else { 0.0 };
                let d = g[i] as f64 + wd * w64[i];
                v64[i] = 0.9 * v64[i] + d;
                w64[i] -= lr * v64[i];
            }
        }
        for i in 0..5 {
            let rel = (w[i] as f64 - w64[i]).abs() / w64[i].abs().max(1e-3);
            assert!(rel < 1e-5, "param {i}: {} vs {}", w[i], w64[i]);
        }
    }

    #[test]
    fn frozen_tensors_do_not_move_and_nesterov_differs() {
        let mut opt =
            Sgd::new(vec![group(0, 2, false, false), group(2, 1, false, true)], 0.9, true, 0.0);
        let mut w = vec![1.0f32, 2.0, 3.0];
        opt.step(&mut w, &[1.0, 1.0, 1.0], 0.1);
        assert_eq!(&w[..2], &[1.0, 2.0]);
        // Nesterov first step: d + m·v = 1 + 0.9·1 = 1.9.
        assert!((w[2] - (3.0 - 0.19)).abs() < 1e-6);
    }
}
