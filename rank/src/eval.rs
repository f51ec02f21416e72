//! Evaluation: retrieval recall@k on held-out pairs, accuracy for classifiers, and a k-NN probe
//! of a contrastive tower on labeled data.

use serde::Serialize;

use crate::config::Config;
use crate::data::{self, Dataset, DatasetKind};
use crate::device::Device;
use crate::model::{Model, ModelKind};
use crate::train::TrainError;

#[derive(Clone, Debug, Default, Serialize)]
pub struct EvalReport {
    pub eval_examples: usize,
    /// Mean of the two retrieval directions.
    #[serde(rename = "recall@1", skip_serializing_if = "Option::is_none")]
    pub recall_at_1: Option<f64>,
    #[serde(rename = "recall@5", skip_serializing_if = "Option::is_none")]
    pub recall_at_5: Option<f64>,
    #[serde(rename = "recall@1_a_to_b", skip_serializing_if = "Option::is_none")]
    pub recall_at_1_a_to_b: Option<f64>,
    #[serde(rename = "recall@1_b_to_a", skip_serializing_if = "Option::is_none")]
    pub recall_at_1_b_to_a: Option<f64>,
    /// recall@1 of a random ranking (1/n), for comparison.
    #[serde(rename = "chance@1", skip_serializing_if = "Option::is_none")]
    pub chance_at_1: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub knn_accuracy: Option<f64>,
}

impl EvalReport {
    /// One human-readable line of the figures that are present.
    pub fn brief(&self) -> String {
        let mut parts = vec![format!("{} held-out examples", self.eval_examples)];
        let mut add = |name: &str, v: Option<f64>| {
            if let Some(v) = v {
                parts.push(format!("{name} {v:.4}"));
            }
        };
        add("recall@1", self.recall_at_1);
        add("recall@5", self.recall_at_5);
        add("chance@1", self.chance_at_1);
        add("accuracy", self.accuracy);
        add("knn_accuracy", self.knn_accuracy);
        parts.join(", ")
    }
}

/// Fraction of queries whose positive (the same index) ranks within the top k of the
/// similarity row, for k in `ks`. `sim` is n×n row-major; ties count against the query.
pub fn recall_at_k(sim: &[f32], n: usize, ks: &[usize]) -> Vec<f64> {
    let mut hits = vec![0usize; ks.len()];
    for i in 0..n {
        let row = &sim[i * n..(i + 1) * n];
        let pos = row[i];
        let better = row.iter().enumerate().filter(|&(j, &s)| j != i && s >= pos).count();
        for (h, &k) in hits.iter_mut().zip(ks) {
            if better < k {
                *h += 1;
            }
        }
    }
    hits.iter().map(|&h| h as f64 / n.max(1) as f64).collect()
}

/// Row-major `a (n×d) · bᵀ (m×d)` in f32, for evaluation-sized matrices.
fn similarities(a: &[f32], b: &[f32], d: usize) -> Vec<f32> {
    let n = a.len() / d;
    let m = b.len() / d;
    let mut out = vec![0.0f32; n * m];
    for i in 0..n {
        let ai = &a[i * d..(i + 1) * d];
        for j in 0..m {
            let bj = &b[j * d..(j + 1) * d];
            out[i * m + j] = ai.iter().zip(bj).map(|(x, y)| x * y).sum();
        }
    }
    out
}

fn transpose(m: &[f32], n: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; n * n];
    for i in 0..n {
        for j in 0..n {
            t[j * n + i] = m[i * n + j];
        }
    }
    t
}

/// k-NN (cosine, majority vote, ties to the nearest) accuracy of test embeddings against train.
pub fn knn_accuracy(
    train: &[f32],
    train_labels: &[u32],
    test: &[f32],
    test_labels: &[u32],
    d: usize,
    k: usize,
) -> f64 {
    let sim = similarities(test, train, d);
    let m = train_labels.len();
    let classes = train_labels.iter().copied().max().map_or(0, |c| c as usize + 1);
    let mut correct = 0;
    for (i, &want) in test_labels.iter().enumerate() {
        let row = &sim[i * m..(i + 1) * m];
        let mut order: Vec<usize> = (0..m).collect();
        let k = k.min(m).max(1);
        order.select_nth_unstable_by(k - 1, |&x, &y| row[y].total_cmp(&row[x]));
        let mut top = order[..k].to_vec();
        top.sort_by(|&x, &y| row[y].total_cmp(&row[x]));
        let mut votes = vec![0usize; classes];
        for &j in &top {
            votes[train_labels[j] as usize] += 1;
        }
        let best = *votes.iter().max().unwrap_or(&0);
        // Ties go to the class of the nearest neighbour among the tied classes.
        let pred =
            top.iter().map(|&j| train_labels[j]).find(|&c| votes[c as usize] == best).unwrap_or(0);
        if pred == want {
            correct += 1;
        }
    }
    correct as f64 / test_labels.len().max(1) as f64
}

fn take_rows(ds: &Dataset, max: usize) -> Vec<usize> {
    let n = if max == 0 { ds.len() } else { ds.len().min(max) };
    (0..n).collect()
}

/// Evaluates `model` on the held-out data (and the k-NN probe when configured).
pub fn evaluate<D: Device>(
    cfg: &Config,
    model: &Model<D::Buf>,
    dev: &D,
    eval: Option<&Dataset>,
) -> Result<EvalReport, TrainError> {
    let mut report = EvalReport::default();
    if let Some(ds) = eval {
        let rows = take_rows(ds, cfg.eval.max_examples);
        let n = rows.len();
        report.eval_examples = n;
        match (model.kind(), ds.kind()) {
            (ModelKind::Classifier, DatasetKind::Labeled { .. }) => {
                let mut x = Vec::new();
                let mut y = Vec::new();
                ds.gather_a(&rows, &mut x);
                ds.gather_labels(&rows, &mut y);
                let logits = model.predict(dev, &x, n);
                let c = logits.len() / n.max(1);
                let correct = (0..n)
                    .filter(|&i| {
                        let row = &logits[i * c..(i + 1) * c];
                        let arg = (0..c).max_by(|&p, &q| row[p].total_cmp(&row[q])).unwrap_or(0);
                        arg as u32 == y[i]
                    })
                    .count();
                report.accuracy = Some(correct as f64 / n.max(1) as f64);
            }
            (ModelKind::Dual | ModelKind::Shared, DatasetKind::Paired { .. }) if n > 0 => {
                let mut xa = Vec::new();
                let mut xb = Vec::new();
                ds.gather_a(&rows, &mut xa);
                ds.gather_b(&rows, &mut xb);
                let fa = model.embed_a(dev, &xa, n);
                let fb = model.embed_b(dev, &xb, n);
                let d = fa.len() / n;
                let sim = similarities(&fa, &fb, d);
                let a2b = recall_at_k(&sim, n, &[1, 5]);
                let b2a = recall_at_k(&transpose(&sim, n), n, &[1, 5]);
                report.recall_at_1_a_to_b = Some(a2b[0]);
                report.recall_at_1_b_to_a = Some(b2a[0]);
                report.recall_at_1 = Some(0.5 * (a2b[0] + b2a[0]));
                report.recall_at_5 = Some(0.5 * (a2b[1] + b2a[1]));
                report.chance_at_1 = Some(1.0 / n as f64);
            }
            _ => {}
        }
    }
    if let (Some(tr), Some(te)) = (&cfg.eval.knn_train, &cfg.eval.knn_test)
        && model.kind() != ModelKind::Classifier
    {
        let train = data::open_shard(tr)?;
        let test = data::open_shard(te)?;
        let embed = |ds: &Dataset| -> Result<(Vec<f32>, Vec<u32>), TrainError> {
            if !matches!(ds.kind(), DatasetKind::Labeled { .. }) {
                return Err(TrainError::Setup(
                    "eval.knn_train / eval.knn_test must be labeled shards".into(),
                ));
            }
            let rows: Vec<usize> = (0..ds.len()).collect();
            let mut x = Vec::new();
            let mut y = Vec::new();
            ds.gather_a(&rows, &mut x);
            ds.gather_labels(&rows, &mut y);
            Ok((model.embed_a(dev, &x, rows.len()), y))
        };
        let (ftr, ytr) = embed(&train)?;
        let (fte, yte) = embed(&test)?;
        let d = ftr.len() / ytr.len().max(1);
        report.knn_accuracy = Some(knn_accuracy(&ftr, &ytr, &fte, &yte, d, cfg.eval.knn_k));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recall_counts_ranks() {
        // Query 0's positive is best; query 1's positive is second; query 2's is last.
        let sim = [
            0.9, 0.1, 0.2, //
            0.8, 0.5, 0.1, //
            0.7, 0.6, 0.0,
        ];
        let r = recall_at_k(&sim, 3, &[1, 2, 3]);
        assert_eq!(r, vec![1.0 / 3.0, 2.0 / 3.0, 1.0]);
    }

    #[test]
    fn knn_votes() {
        // 1-D embeddings on the unit circle, d = 2.
        let train = [1.0, 0.0, 0.9, 0.1, 0.0, 1.0, 0.1, 0.9];
        let labels = [0, 0, 1, 1];
        let test = [0.95, 0.05, 0.05, 0.95];
        let acc = knn_accuracy(&train, &labels, &test, &[0, 1], 2, 3);
        assert_eq!(acc, 1.0);
        let acc_wrong = knn_accuracy(&train, &labels, &test, &[1, 0], 2, 1);
        assert_eq!(acc_wrong, 0.0);
    }
}
