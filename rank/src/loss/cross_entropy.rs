//! Mean softmax cross-entropy over the global batch.

use crate::device::{CpuDevice, Device};

/// One rank's share of the global-batch cross-entropy.
#[derive(Clone, Debug, PartialEq)]
pub struct CeOut {
    /// Σ over this rank's rows of the per-example loss, divided by the GLOBAL batch: the sum
    /// over ranks is the global mean loss.
    pub loss_partial: f32,
    /// ∂(global mean loss)/∂logits for this rank's rows (`b_local × classes`).
    pub d_logits: Vec<f32>,
    /// This rank's rows whose arg-max logit equals the label.
    pub correct: usize,
}

/// Softmax cross-entropy of `logits` (`b_local × classes`, `classes = logits.len() /
/// b_local`) against `labels` (`b_local`), for a global batch of `global_batch` rows.
///
/// # Panics
/// When `logits.len()` is not a multiple of `b_local`, `labels.len() != b_local`, or a label
/// is not below the number of classes (the data loader validates labels against the model).
pub fn cross_entropy(logits: &[f32], labels: &[u32], b_local: usize, global_batch: usize) -> CeOut {
    assert!(
        b_local > 0 && logits.len().is_multiple_of(b_local),
        "cross_entropy: {} logits do not split into {b_local} rows",
        logits.len()
    );
    assert!(
        global_batch >= b_local,
        "cross_entropy: global batch {global_batch} < local batch {b_local}"
    );
    let classes = logits.len() / b_local;
    let mut d_logits = vec![0.0; logits.len()];
    let out = CpuDevice::new(1).softmax_xent(
        logits,
        labels,
        b_local,
        classes,
        1.0 / global_batch as f32,
        &mut d_logits,
    );
    CeOut {
        loss_partial: (out.loss_sum / global_batch as f64) as f32,
        d_logits,
        correct: out.correct,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_sum_to_one_process() {
        let (b, c) = (7, 4);
        let mut rng = crate::rng::Rng::new(9);
        let logits: Vec<f32> = (0..b * c).map(|_| rng.normal() as f32 * 2.0).collect();
        let labels: Vec<u32> = (0..b as u32).map(|i| (i * 5 + 1) % c as u32).collect();
        let whole = cross_entropy(&logits, &labels, b, b);
        // uneven split 3 + 4
        let p1 = cross_entropy(&logits[..3 * c], &labels[..3], 3, b);
        let p2 = cross_entropy(&logits[3 * c..], &labels[3..], 4, b);
        assert!((p1.loss_partial + p2.loss_partial - whole.loss_partial).abs() < 1e-6);
        let joined: Vec<f32> = p1.d_logits.iter().chain(&p2.d_logits).cloned().collect();
        assert_eq!(joined, whole.d_logits);
        assert_eq!(p1.correct + p2.correct, whole.correct);
        // f64 check of the mean loss
        let mut want = 0.0f64;
        for i in 0..b {
            let row = &logits[i * c..(i + 1) * c];
            let lse = row.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln();
            want += lse - row[labels[i] as usize] as f64;
        }
        want /= b as f64;
        assert!(
            (whole.loss_partial as f64 - want).abs() < 1e-6,
            "{} vs {want}",
            whole.loss_partial
        );
    }
}
