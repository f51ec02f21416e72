//! A human-readable summary of a data set (`tessera data inspect`).

use std::fmt::Write;

use super::{Dataset, DatasetKind};

fn stats_line(out: &mut String, what: &str, values: &[f32]) {
    if values.is_empty() {
        let _ = writeln!(out, "{what:<10} (empty)");
        return;
    }
    let n = values.len() as f64;
    let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = values.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    let min = values.iter().copied().fold(f32::INFINITY, f32::min);
    let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let _ = writeln!(
        out,
        "{what:<10} mean {mean:.4}  std {:.4}  min {min:.4}  max {max:.4}",
        var.sqrt()
    );
}

/// Kind, rows, dimensions, classes with their histogram, feature statistics, provenance.
pub fn describe(data: &Dataset) -> String {
    let mut out = String::new();
    let source = match data.path() {
        Some(p) => format!("{} (memory-mapped shard)", p.display()),
        None => "in memory".to_string(),
    };
    let _ = writeln!(out, "{:<10} {source}", "source");
    if !data.name().is_empty() {
        let _ = writeln!(out, "{:<10} {}", "name", data.name());
    }
    match data.kind() {
        DatasetKind::Paired { dim_a, dim_b } => {
            let _ = writeln!(
                out,
                "{:<10} paired (view a: {dim_a} features, view b: {dim_b} features)",
                "kind"
            );
        }
        DatasetKind::Labeled { dim, num_classes } => {
            let _ = writeln!(out, "{:<10} labeled ({dim} features, {num_classes} classes)", "kind");
        }
    }
    let _ = writeln!(out, "{:<10} {}", "rows", data.len());
    match data.kind() {
        DatasetKind::Paired { .. } => {
            stats_line(&mut out, "view a", data.features_a());
            stats_line(&mut out, "view b", data.features_b());
        }
        DatasetKind::Labeled { num_classes, .. } => {
            stats_line(&mut out, "features", data.features_a());
            let mut counts = vec![0usize; num_classes];
            for &l in data.labels() {
                counts[l as usize] += 1;
            }
            let _ = writeln!(out, "labels");
            let total = data.len().max(1) as f64;
            for (c, n) in counts.iter().enumerate() {
                let _ =
                    writeln!(out, "  class {c:>4}: {n:>8}  ({:.1}%)", 100.0 * *n as f64 / total);
            }
        }
    }
    let provenance =
        if data.provenance().is_empty() { "(none recorded)" } else { data.provenance() };
    let _ = writeln!(out, "{:<10} {provenance}", "provenance");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_labeled_and_paired() {
        let l = Dataset::labeled(2, 3, vec![0.0, 2.0, 4.0, 6.0, 1.0, 1.0], vec![0, 2, 2])
            .unwrap()
            .with_name("toy")
            .with_provenance("made by hand");
        let s = describe(&l);
        assert!(s.contains("labeled (2 features, 3 classes)"), "{s}");
        assert!(s.contains("rows       3"), "{s}");
        assert!(s.contains("mean 2.3333"), "{s}");
        assert!(s.contains("class    2:        2  (66.7%)"), "{s}");
        assert!(s.contains("class    1:        0"), "{s}");
        assert!(s.contains("made by hand") && s.contains("toy"), "{s}");
        let p = Dataset::paired(1, 2, vec![1.0, 3.0], vec![0.0; 4]).unwrap();
        let s = describe(&p);
        assert!(s.contains("view a: 1 features, view b: 2 features"), "{s}");
        assert!(s.contains("mean 2.0000  std 1.0000"), "{s}");
        assert!(s.contains("(none recorded)"), "{s}");
    }
}
