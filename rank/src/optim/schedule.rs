//! Learning-rate schedules: linear warm-up, then cosine decay, constant, or MLPerf's polynomial
//! decay.

/// The learning rate at each optimizer step.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    pub peak: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub kind: ScheduleKind,
    /// Final rate of the cosine as a fraction of the peak.
    pub min_ratio: f64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ScheduleKind {
    Constant,
    Cosine,
    /// MLPerf's polynomial decay (ResNet-50 LARS reference): with s = step + 1 and W the
    /// warm-up, s > W gets (peak − end)·(1 − p/(S − W + 1))^power + end with p = max(s − W, 1),
    /// S = total_steps and end = min_ratio·peak.
    Poly {
        power: f64,
    },
}

impl Schedule {
    /// Rate for step `step` (0-based). Warm-up rises linearly to the peak: step s < W gets
    /// peak·(s+1)/W. The cosine then runs from the peak at step W to min_ratio·peak at the last
    /// step (total_steps − 1). See [`ScheduleKind::Poly`] for the polynomial decay.
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak * (step + 1) as f64 / self.warmup_steps as f64;
        }
        match self.kind {
            ScheduleKind::Constant => self.peak,
            ScheduleKind::Cosine => {
                let span = self.total_steps.saturating_sub(self.warmup_steps + 1);
                if span == 0 {
                    return self.peak;
                }
                let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
                let floor = self.min_ratio * self.peak;
                floor + (self.peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
            ScheduleKind::Poly { power } => {
                let decay_steps = self.total_steps.saturating_sub(self.warmup_steps) + 1;
                let p = (step + 1 - self.warmup_steps).max(1).min(decay_steps);
                let end = self.min_ratio * self.peak;
                let frac = 1.0 - p as f64 / decay_steps as f64;
                (self.peak - end) * frac.powf(power) + end
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let s = Schedule {
            peak: 1.0,
            warmup_steps: 4,
            total_steps: 14,
            kind: ScheduleKind::Cosine,
            min_ratio: 0.0,
        };
        let lrs: Vec<f64> = (0..14).map(|t| s.lr(t)).collect();
        assert_eq!(&lrs[..4], &[0.25, 0.5, 0.75, 1.0]);
        assert!((lrs[4] - 1.0).abs() < 1e-12);
        // Halfway through the cosine: (14 - 4 - 1) = 9 steps span; step 4 + 4.5 is the midpoint.
        assert!((s.lr(13) - 0.0).abs() < 1e-12);
        assert!(lrs.windows(2).skip(4).all(|w| w[1] <= w[0]));
        let mid = 0.5 * (1.0 + (std::f64::consts::PI * 4.0 / 9.0).cos());
        assert!((s.lr(8) - mid).abs() < 1e-12);
    }

    /// ALGORITHMS.md §6 T10: lr₀ 10, end 1e-4, W 10, S 100, power 2, at s = step + 1.
    #[test]
    fn mlperf_poly_t10() {
        let s = Schedule {
            peak: 10.0,
            warmup_steps: 10,
            total_steps: 100,
            kind: ScheduleKind::Poly { power: 2.0 },
            min_ratio: 1e-5,
        };
        for (one_based, want) in
            [(5, 5.0), (10, 10.0), (11, 9.78142955), (55, 2.55532140), (100, 0.00130757)]
        {
            let got = s.lr(one_based - 1);
            assert!((got - want).abs() < 5e-9 * want.max(1.0), "s = {one_based}: {got} vs {want}");
        }
        assert!((10..100).map(|t| s.lr(t)).collect::<Vec<_>>().windows(2).all(|w| w[1] < w[0]));
        // Past the last step the rate holds at the end value instead of wrapping.
        assert!((s.lr(1000) - 1e-4).abs() < 1e-12);
    }

    #[test]
    fn constant_and_floor() {
        let c = Schedule {
            peak: 0.3,
            warmup_steps: 0,
            total_steps: 10,
            kind: ScheduleKind::Constant,
            min_ratio: 0.0,
        };
        assert!((0..10).all(|t| c.lr(t) == 0.3));
        let f = Schedule { kind: ScheduleKind::Cosine, min_ratio: 0.1, ..c };
        assert!((f.lr(9) - 0.03).abs() < 1e-12);
    }
}
