//! Data: in-memory or memory-mapped data sets, rkyv shards, synthetic paired views, .npy import,
//! the distributed sampler and the bundled digits data set.
//!
//! A [`Dataset`] is either *paired* (row i of view a goes with row i of view b: CLIP/SimCLR
//! style) or *labeled* (features + a class per row). Its features are f32, row-major, and live
//! either in owned vectors or, zero-copy, inside a memory-mapped shard file ([`open_shard`]).

mod describe;
pub mod digits;
mod error;
mod npy;
mod sampler;
mod shard;
mod synth;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use describe::describe;
pub use error::DataError;
pub use npy::{
    NpyArray, NpyData, NpyKind, import_npy, npy_bytes_f32, npy_bytes_u8, parse_npy, write_npy,
};
pub use sampler::{DistributedSampler, local_rows};
pub use shard::{
    SHARD_FORMAT_VERSION, SHARD_HEADER_LEN, SHARD_MAGIC, ShardMeta, checksum64, open_shard,
    read_shard_bytes, write_shard,
};
pub use synth::{SynthSpec, synth, try_synth};

/// What a data set holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatasetKind {
    /// Two views per row: `dim_a` features of view a, `dim_b` of view b.
    Paired { dim_a: usize, dim_b: usize },
    /// `dim` features and one class in `0..num_classes` per row.
    Labeled { dim: usize, num_classes: usize },
}

impl DatasetKind {
    /// Features per row of view a (of the only view for a labeled set).
    pub fn dim_a(&self) -> usize {
        match *self {
            DatasetKind::Paired { dim_a, .. } => dim_a,
            DatasetKind::Labeled { dim, .. } => dim,
        }
    }

    /// Features per row of view b; 0 for a labeled set.
    pub fn dim_b(&self) -> usize {
        match *self {
            DatasetKind::Paired { dim_b, .. } => dim_b,
            DatasetKind::Labeled { .. } => 0,
        }
    }

    pub fn is_paired(&self) -> bool {
        matches!(self, DatasetKind::Paired { .. })
    }

    pub fn name(&self) -> &'static str {
        match self {
            DatasetKind::Paired { .. } => "paired",
            DatasetKind::Labeled { .. } => "labeled",
        }
    }

    /// What a row holds, for messages: "paired views of dims 32 and 48", "labeled features of
    /// dim 64 in 10 classes".
    pub fn describe(&self) -> String {
        match *self {
            DatasetKind::Paired { dim_a, dim_b } => {
                format!("paired views of dims {dim_a} and {dim_b}")
            }
            DatasetKind::Labeled { dim, num_classes } => {
                format!("labeled features of dim {dim} in {num_classes} classes")
            }
        }
    }
}

/// Where the numbers live.
#[derive(Clone)]
enum Store {
    Owned {
        a: Vec<f32>,
        b: Vec<f32>,
        labels: Vec<u32>,
    },
    /// Byte ranges inside a validated, read-only mapping (see `shard.rs`). The ranges were
    /// checked in bounds and 4-byte aligned when the shard was opened.
    Mapped {
        map: Arc<memmap2::Mmap>,
        a: (usize, usize),
        b: (usize, usize),
        labels: (usize, usize),
    },
}

/// A data set: paired views or labeled features, owned or memory-mapped (cheap to clone when
/// mapped).
#[derive(Clone)]
pub struct Dataset {
    kind: DatasetKind,
    rows: usize,
    name: String,
    provenance: String,
    path: Option<PathBuf>,
    store: Store,
}

impl std::fmt::Debug for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataset")
            .field("kind", &self.kind)
            .field("rows", &self.rows)
            .field("name", &self.name)
            .field("path", &self.path)
            .field("mapped", &self.is_mapped())
            .finish()
    }
}

fn check_features(what: &str, values: &[f32], rows: usize, dim: usize) -> Result<(), DataError> {
    if dim == 0 {
        return Err(DataError::Shape(format!(
            "{what}: dimension is 0; every row needs at least one feature"
        )));
    }
    if values.len() != rows * dim {
        return Err(DataError::Shape(format!(
            "{what}: {} values is not {rows} rows x {dim} features",
            values.len()
        )));
    }
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(DataError::Shape(format!(
            "{what}: value at row {}, column {} is {} (features must be finite)",
            i / dim,
            i % dim,
            values[i]
        )));
    }
    Ok(())
}

impl Dataset {
    /// A paired data set from row-major views `a` (rows x dim_a) and `b` (rows x dim_b).
    pub fn paired(
        dim_a: usize,
        dim_b: usize,
        a: Vec<f32>,
        b: Vec<f32>,
    ) -> Result<Dataset, DataError> {
        let rows = a.len().checked_div(dim_a).unwrap_or(0);
        check_features("view a", &a, rows, dim_a)?;
        check_features("view b", &b, rows, dim_b)?;
        Ok(Dataset {
            kind: DatasetKind::Paired { dim_a, dim_b },
            rows,
            name: String::new(),
            provenance: String::new(),
            path: None,
            store: Store::Owned { a, b, labels: Vec::new() },
        })
    }

    /// A labeled data set from row-major `features` (rows x dim) and one label per row, each
    /// below `num_classes`.
    pub fn labeled(
        dim: usize,
        num_classes: usize,
        features: Vec<f32>,
        labels: Vec<u32>,
    ) -> Result<Dataset, DataError> {
        let rows = labels.len();
        check_features("features", &features, rows, dim)?;
        if num_classes == 0 {
            return Err(DataError::Shape("labeled data set with 0 classes".into()));
        }
        if let Some(i) = labels.iter().position(|&l| l as usize >= num_classes) {
            return Err(DataError::Shape(format!(
                "label {} at row {i} is not below the number of classes {num_classes}",
                labels[i]
            )));
        }
        Ok(Dataset {
            kind: DatasetKind::Labeled { dim, num_classes },
            rows,
            name: String::new(),
            provenance: String::new(),
            path: None,
            store: Store::Owned { a: features, b: Vec::new(), labels },
        })
    }

    pub(crate) fn from_mapped(
        kind: DatasetKind,
        rows: usize,
        meta: &ShardMeta,
        path: &Path,
        map: Arc<memmap2::Mmap>,
        ranges: [(usize, usize); 3],
    ) -> Dataset {
        Dataset {
            kind,
            rows,
            name: meta.name.clone(),
            provenance: meta.provenance.clone(),
            path: Some(path.to_path_buf()),
            store: Store::Mapped { map, a: ranges[0], b: ranges[1], labels: ranges[2] },
        }
    }

    pub(crate) fn with_path(mut self, path: &Path) -> Self {
        self.path = Some(path.to_path_buf());
        self
    }

    /// Sets the name (stored in shards, shown by [`describe`]).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Sets the provenance text (where the data came from, how it was made).
    pub fn with_provenance(mut self, provenance: impl Into<String>) -> Self {
        self.provenance = provenance.into();
        self
    }

    pub fn kind(&self) -> DatasetKind {
        self.kind
    }

    /// Number of rows (pairs or labeled examples).
    pub fn len(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn provenance(&self) -> &str {
        &self.provenance
    }

    /// The shard file this data set was opened from, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Whether the features are read zero-copy from a memory-mapped shard.
    pub fn is_mapped(&self) -> bool {
        matches!(self.store, Store::Mapped { .. })
    }

    /// How error messages name this data set: its file, else its name.
    pub fn display_name(&self) -> String {
        match (&self.path, self.name.is_empty()) {
            (Some(p), _) => format!("shard {}", p.display()),
            (None, false) => format!("data set '{}'", self.name),
            (None, true) => "in-memory data set".to_string(),
        }
    }

    /// All features of view a (the only view of a labeled set), row-major.
    pub fn features_a(&self) -> &[f32] {
        match &self.store {
            Store::Owned { a, .. } => a,
            Store::Mapped { map, a, .. } => mapped_f32(map, *a),
        }
    }

    /// All features of view b, row-major; empty for a labeled set.
    pub fn features_b(&self) -> &[f32] {
        match &self.store {
            Store::Owned { b, .. } => b,
            Store::Mapped { map, b, .. } => mapped_f32(map, *b),
        }
    }

    /// All labels; empty for a paired set.
    pub fn labels(&self) -> &[u32] {
        match &self.store {
            Store::Owned { labels, .. } => labels,
            Store::Mapped { map, labels, .. } => mapped_u32(map, *labels),
        }
    }

    /// Row `i` of view a (the features of a labeled set). Panics if `i >= len()`.
    pub fn row_a(&self, i: usize) -> &[f32] {
        let d = self.kind.dim_a();
        &self.features_a()[i * d..(i + 1) * d]
    }

    /// Row `i` of view b; empty for a labeled set. Panics if `i >= len()` on a paired set.
    pub fn row_b(&self, i: usize) -> &[f32] {
        let d = self.kind.dim_b();
        &self.features_b()[i * d..(i + 1) * d]
    }

    /// Label of row `i`. Panics if `i >= len()` or the set is paired (check [`Self::kind`]).
    pub fn label(&self, i: usize) -> u32 {
        self.labels()[i]
    }

    /// Replaces `out` with the view-a rows at `indices`, concatenated (indices.len() x dim_a).
    pub fn gather_a(&self, indices: &[usize], out: &mut Vec<f32>) {
        gather(self.features_a(), self.kind.dim_a(), indices, out);
    }

    /// Replaces `out` with the view-b rows at `indices`; empty for a labeled set.
    pub fn gather_b(&self, indices: &[usize], out: &mut Vec<f32>) {
        gather(self.features_b(), self.kind.dim_b(), indices, out);
    }

    /// Replaces `out` with the labels at `indices`. Panics on a paired set.
    pub fn gather_labels(&self, indices: &[usize], out: &mut Vec<u32>) {
        let labels = self.labels();
        out.clear();
        out.extend(indices.iter().map(|&i| labels[i]));
    }

    /// An owned copy of the rows at `indices`, in that order (name and provenance kept).
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        let mut a = Vec::new();
        let mut b = Vec::new();
        let mut labels = Vec::new();
        self.gather_a(indices, &mut a);
        self.gather_b(indices, &mut b);
        if !self.kind.is_paired() {
            self.gather_labels(indices, &mut labels);
        }
        Dataset {
            kind: self.kind,
            rows: indices.len(),
            name: self.name.clone(),
            provenance: self.provenance.clone(),
            path: None,
            store: Store::Owned { a, b, labels },
        }
    }

    /// Checks a paired data set against the model config: view a must have `dim_a` features
    /// (`model.tower_a.input_dim`) and view b `dim_b` (`model.tower_b.input_dim`).
    pub fn check_paired_dims(&self, dim_a: usize, dim_b: usize) -> Result<(), DataError> {
        self.check_paired_dims_keys(
            dim_a,
            "model.tower_a.input_dim",
            dim_b,
            "model.tower_b.input_dim",
        )
    }

    /// [`Self::check_paired_dims`] naming other config keys (e.g. the same key twice for a
    /// shared tower).
    pub fn check_paired_dims_keys(
        &self,
        dim_a: usize,
        key_a: &str,
        dim_b: usize,
        key_b: &str,
    ) -> Result<(), DataError> {
        match self.kind {
            DatasetKind::Paired { dim_a: fa, dim_b: fb } => {
                self.check_one("view a features", fa, dim_a, key_a)?;
                self.check_one("view b features", fb, dim_b, key_b)
            }
            DatasetKind::Labeled { .. } => Err(self.kind_mismatch("paired")),
        }
    }

    /// Checks a labeled data set against the model config: `dim` features
    /// (`model.tower_a.input_dim`) and `num_classes` classes (`model.num_classes`).
    pub fn check_labeled_dims(&self, dim: usize, num_classes: usize) -> Result<(), DataError> {
        self.check_labeled_dims_keys(
            dim,
            "model.tower_a.input_dim",
            num_classes,
            "model.num_classes",
        )
    }

    /// [`Self::check_labeled_dims`] naming other config keys.
    pub fn check_labeled_dims_keys(
        &self,
        dim: usize,
        key_dim: &str,
        num_classes: usize,
        key_classes: &str,
    ) -> Result<(), DataError> {
        match self.kind {
            DatasetKind::Labeled { dim: fd, num_classes: fc } => {
                self.check_one("features", fd, dim, key_dim)?;
                self.check_one("classes", fc, num_classes, key_classes)
            }
            DatasetKind::Paired { .. } => Err(self.kind_mismatch("labeled")),
        }
    }

    fn check_one(
        &self,
        what: &str,
        found: usize,
        expected: usize,
        key: &str,
    ) -> Result<(), DataError> {
        if found == expected {
            return Ok(());
        }
        Err(DataError::DimMismatch {
            dataset: self.display_name(),
            what: what.to_string(),
            found,
            expected,
            key: key.to_string(),
        })
    }

    fn kind_mismatch(&self, expected: &str) -> DataError {
        DataError::KindMismatch {
            dataset: self.display_name(),
            found: self.kind.name().to_string(),
            expected: expected.to_string(),
        }
    }
}

fn gather(src: &[f32], dim: usize, indices: &[usize], out: &mut Vec<f32>) {
    out.clear();
    out.reserve(indices.len() * dim);
    for &i in indices {
        out.extend_from_slice(&src[i * dim..(i + 1) * dim]);
    }
}

/// The f32 values in `range` (byte offset, element count) of a mapping.
fn mapped_f32(map: &memmap2::Mmap, (off, len): (usize, usize)) -> &[f32] {
    let bytes = &map[off..off + len * 4];
    // SAFETY: `open_shard` built this range from a validated rkyv archive, checked it lies inside
    // the mapping and that `off` is 4-byte aligned (the mapping itself is page aligned). The
    // archived values are little-endian f32 and the target is little-endian (on big-endian
    // targets `open_shard` copies into owned vectors instead), and every bit pattern is a valid
    // f32. The mapping is read-only and outlives the returned borrow (it is borrowed from `map`).
    unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<f32>(), len) }
}

/// The u32 values in `range` of a mapping (same invariants as [`mapped_f32`]).
fn mapped_u32(map: &memmap2::Mmap, (off, len): (usize, usize)) -> &[u32] {
    let bytes = &map[off..off + len * 4];
    // SAFETY: as in `mapped_f32`: in bounds, 4-byte aligned, little-endian u32, any bits valid.
    unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<u32>(), len) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datasets_can_be_shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Dataset>();
        assert_send_sync::<DistributedSampler>();
    }

    #[test]
    fn constructors_validate_shapes() {
        assert!(Dataset::paired(2, 3, vec![0.0; 4], vec![0.0; 6]).is_ok());
        let e = Dataset::paired(2, 3, vec![0.0; 4], vec![0.0; 5]).unwrap_err().to_string();
        assert!(e.contains("view b"), "{e}");
        let e = Dataset::labeled(2, 3, vec![0.0; 4], vec![0, 3]).unwrap_err().to_string();
        assert!(e.contains("label 3 at row 1"), "{e}");
        let e = Dataset::paired(1, 1, vec![f32::NAN], vec![0.0]).unwrap_err().to_string();
        assert!(e.contains("finite"), "{e}");
    }

    #[test]
    fn rows_and_gathers() {
        let a: Vec<f32> = (0..6).map(|x| x as f32).collect();
        let b: Vec<f32> = (0..9).map(|x| 10.0 + x as f32).collect();
        let d = Dataset::paired(2, 3, a, b).unwrap();
        assert_eq!(d.len(), 3);
        assert_eq!(d.row_a(1), &[2.0, 3.0]);
        assert_eq!(d.row_b(2), &[16.0, 17.0, 18.0]);
        let mut out = vec![99.0];
        d.gather_a(&[2, 0], &mut out);
        assert_eq!(out, vec![4.0, 5.0, 0.0, 1.0]);
        d.gather_b(&[1], &mut out);
        assert_eq!(out, vec![13.0, 14.0, 15.0]);

        let l = Dataset::labeled(1, 4, vec![0.5, 1.5, 2.5], vec![3, 1, 2]).unwrap();
        let mut labels = Vec::new();
        l.gather_labels(&[2, 2, 0], &mut labels);
        assert_eq!(labels, vec![2, 2, 3]);
        assert_eq!(l.label(1), 1);
        assert!(l.row_b(0).is_empty());
        let s = l.subset(&[1, 0]);
        assert_eq!(s.features_a(), &[1.5, 0.5]);
        assert_eq!(s.labels(), &[1, 3]);
    }

    #[test]
    fn dim_checks_name_key_and_values() {
        let d = Dataset::paired(2, 3, vec![0.0; 4], vec![0.0; 6]).unwrap().with_name("toy");
        assert!(d.check_paired_dims(2, 3).is_ok());
        let e = d.check_paired_dims(2, 4).unwrap_err().to_string();
        assert!(e.contains("toy") && e.contains("model.tower_b.input_dim"), "{e}");
        assert!(e.contains('3') && e.contains('4'), "{e}");
        let e = d.check_labeled_dims(2, 10).unwrap_err().to_string();
        assert!(e.contains("paired") && e.contains("labeled"), "{e}");
        let l = Dataset::labeled(2, 5, vec![0.0; 2], vec![4]).unwrap();
        let e = l.check_labeled_dims(2, 10).unwrap_err().to_string();
        assert!(e.contains("model.num_classes") && e.contains("5") && e.contains("10"), "{e}");
    }
}
