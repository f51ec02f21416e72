//! The UCI optical handwritten digits (1797 images of 8x8, 10 classes), as bundled with
//! scikit-learn, turned into Tessera shards. See `data/digits/README.md` for provenance.
//!
//! [`build_digits`] reads `digits-features.npy` (uint8, 1797 x 64, values 0..16) and
//! `digits-labels.npy` (uint8, 1797) written by `scripts/make-digits.py`, scales pixels to
//! [0, 1] (x / 16), splits rows by a seeded permutation into 1500 training and 297 test images,
//! and writes four shards:
//! * `digits-train.shard`, `digits-test.shard`: labeled (64 features, 10 classes);
//! * `digits-views-train.shard`, `digits-views-test.shard`: paired, row i holding two augmented
//!   views ([`augment_digit`]) of image i of the matching labeled shard (same order, so the
//!   labeled shard gives the class of every pair for kNN / linear-probe evaluation).

use std::path::{Path, PathBuf};

use super::{DataError, Dataset, DatasetKind, NpyKind, ShardMeta, import_npy, write_shard};
use crate::rng::Rng;

/// Seed of the train/test split and of the stored augmented views.
pub const DIGITS_SEED: u64 = 1998;
pub const DIGITS_ROWS: usize = 1797;
pub const DIGITS_TRAIN_ROWS: usize = 1500;
pub const DIGITS_DIM: usize = 64;
pub const DIGITS_CLASSES: usize = 10;

/// The shard files [`build_digits`] writes, in order.
pub const DIGITS_SHARDS: [&str; 4] = [
    "digits-train.shard",
    "digits-test.shard",
    "digits-views-train.shard",
    "digits-views-test.shard",
];

const PROVENANCE: &str = "UCI ML Repository, Optical Recognition of Handwritten Digits (E. Alpaydin, C. Kaynak, 1998), \
     CC BY 4.0; the 1797-image copy bundled with scikit-learn (sklearn/datasets/data/digits.csv.gz, BSD-3 package); \
     pixels 0..16 scaled by 1/16";

/// One augmented view of an 8x8 image `img` (64 values in [0, 1]) into `out`: a random shift
/// by -1, 0 or +1 pixel in each direction (vacated pixels are 0), each pixel masked to 0 with
/// probability 0.1, Gaussian noise of standard deviation 0.1, clipped to [0, 1].
pub fn augment_digit(img: &[f32], rng: &mut Rng, out: &mut [f32]) {
    let dx = rng.below(3) as isize - 1;
    let dy = rng.below(3) as isize - 1;
    for y in 0..8isize {
        for x in 0..8isize {
            let (sx, sy) = (x - dx, y - dy);
            let v = if (0..8).contains(&sx) && (0..8).contains(&sy) {
                img[(sy * 8 + sx) as usize]
            } else {
                0.0
            };
            let masked = rng.uniform() < 0.1;
            let noise = 0.1 * rng.normal() as f32;
            out[(y * 8 + x) as usize] = if masked { 0.0 } else { (v + noise).clamp(0.0, 1.0) };
        }
    }
}

/// A paired data set of two augmented views of each image of a labeled 64-feature data set,
/// deterministic by `seed` (e.g. a fresh pair of views per epoch with `seed + epoch`).
pub fn two_views(images: &Dataset, seed: u64) -> Result<Dataset, DataError> {
    if images.kind().dim_a() != DIGITS_DIM {
        return Err(DataError::Shape(format!(
            "{} has {} features per row; digit views need 8x8 = 64",
            images.display_name(),
            images.kind().dim_a()
        )));
    }
    let n = images.len();
    let mut a = vec![0.0f32; n * DIGITS_DIM];
    let mut b = vec![0.0f32; n * DIGITS_DIM];
    let mut rng = Rng::stream(seed, 1);
    for i in 0..n {
        augment_digit(images.row_a(i), &mut rng, &mut a[i * DIGITS_DIM..(i + 1) * DIGITS_DIM]);
        augment_digit(images.row_a(i), &mut rng, &mut b[i * DIGITS_DIM..(i + 1) * DIGITS_DIM]);
    }
    Dataset::paired(DIGITS_DIM, DIGITS_DIM, a, b)
}

/// Builds the four digits shards in `out_dir` from the `.npy` files in `raw_dir` (see the
/// module docs); returns their paths in the order of [`DIGITS_SHARDS`].
pub fn build_digits(raw_dir: &Path, out_dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let features = raw_dir.join("digits-features.npy");
    let raw = import_npy(&features, &raw_dir.join("digits-labels.npy"), NpyKind::Labeled)?;
    let wrong = |what: String| DataError::Npy {
        path: features.clone(),
        reason: format!("{what}; regenerate it with scripts/make-digits.py"),
    };
    if raw.len() != DIGITS_ROWS
        || raw.kind() != (DatasetKind::Labeled { dim: DIGITS_DIM, num_classes: DIGITS_CLASSES })
    {
        return Err(wrong(format!(
            "expected 1797 rows, 64 features, 10 classes, found {} rows, {:?}",
            raw.len(),
            raw.kind()
        )));
    }
    if raw.features_a().iter().any(|&v| !(0.0..=16.0).contains(&v)) {
        return Err(wrong("pixel values outside 0..16".into()));
    }
    let scaled: Vec<f32> = raw.features_a().iter().map(|&v| v / 16.0).collect();
    let all = Dataset::labeled(DIGITS_DIM, DIGITS_CLASSES, scaled, raw.labels().to_vec())?;
    let mut perm: Vec<usize> = (0..DIGITS_ROWS).collect();
    Rng::stream(DIGITS_SEED, 0).shuffle(&mut perm);
    let (train_idx, test_idx) = perm.split_at(DIGITS_TRAIN_ROWS);

    std::fs::create_dir_all(out_dir).map_err(|e| DataError::io("create directory", out_dir, e))?;
    let mut written = Vec::new();
    for (split, idx, stream) in [("train", train_idx, 2u64), ("test", test_idx, 3)] {
        let labeled = all.subset(idx);
        let views = two_views(&labeled, DIGITS_SEED.wrapping_add(stream))?;
        let split_note = format!(
            "{split} split: {} of 1797 images, rows of Rng::stream({DIGITS_SEED}, 0).shuffle(0..1797) {}",
            idx.len(),
            if split == "train" { "[..1500]" } else { "[1500..]" }
        );
        let outputs = [
            (format!("digits-{split}.shard"), labeled, format!("{PROVENANCE}; {split_note}")),
            (
                format!("digits-views-{split}.shard"),
                views,
                format!(
                    "{PROVENANCE}; {split_note}; row i = two augmented views (shift +-1 px, 10% masking, noise 0.1; \
                     tessera_rank::data::digits::two_views seed {}) of row i of digits-{split}.shard",
                    DIGITS_SEED.wrapping_add(stream)
                ),
            ),
        ];
        for (file, data, provenance) in outputs {
            let path = out_dir.join(&file);
            let name = file.trim_end_matches(".shard").to_string();
            write_shard(&path, &data, &ShardMeta { name, provenance })?;
            written.push(path);
        }
    }
    // Order as DIGITS_SHARDS: train, test, views-train, views-test.
    written.swap(1, 2);
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::open_shard;

    fn repo_digits() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/digits")
    }

    #[test]
    fn committed_digits_shards_open_and_are_consistent() {
        let dir = repo_digits();
        let [train, test, vtrain, vtest] = DIGITS_SHARDS.map(|f| open_shard(&dir.join(f)).unwrap());
        assert_eq!(train.len() + test.len(), DIGITS_ROWS);
        assert_eq!(train.len(), DIGITS_TRAIN_ROWS);
        for d in [&train, &test] {
            d.check_labeled_dims(DIGITS_DIM, DIGITS_CLASSES).unwrap();
            assert!(d.features_a().iter().all(|&v| (0.0..=1.0).contains(&v)));
        }
        let mut counts = [0usize; 10];
        for &l in train.labels().iter().chain(test.labels()) {
            counts[l as usize] += 1;
        }
        // The scikit-learn copy has 174..183 images per class.
        assert!(counts.iter().all(|&c| (170..=185).contains(&c)), "{counts:?}");
        assert_eq!(vtrain.len(), train.len());
        assert_eq!(vtest.len(), test.len());
        vtrain.check_paired_dims(64, 64).unwrap();
        // Views resemble their own image more than other images.
        let dist =
            |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(a, b)| (a - b) * (a - b)).sum::<f32>();
        let closer = (0..test.len())
            .filter(|&i| {
                dist(vtest.row_a(i), test.row_a(i))
                    < dist(vtest.row_a(i), test.row_a((i + 1) % test.len()))
            })
            .count();
        assert!(closer as f64 > 0.7 * test.len() as f64, "{closer}");
        assert!(
            train.provenance().contains("Alpaydin") && vtest.provenance().contains("augmented")
        );
    }

    /// Rebuilds the shards from the committed .npy files and checks they are byte-identical to
    /// the committed shards (`tessera data digits` rewrites them).
    #[test]
    fn digits_shards_rebuild_identically() {
        let dir = repo_digits();
        let tmp = tempfile::tempdir().unwrap();
        let paths = build_digits(&dir.join("raw"), tmp.path()).unwrap();
        for (p, name) in paths.iter().zip(DIGITS_SHARDS) {
            assert_eq!(p.file_name().unwrap(), name);
            let rebuilt = std::fs::read(p).unwrap();
            let committed = std::fs::read(dir.join(name)).unwrap();
            assert!(
                rebuilt == committed,
                "{name} differs from a rebuild; rerun the conversion (data/digits/README.md)"
            );
        }
    }

    #[test]
    fn augmentation_is_deterministic_and_bounded() {
        let img: Vec<f32> = (0..64).map(|i| (i % 17) as f32 / 16.0).collect();
        let d = Dataset::labeled(64, 1, img.clone(), vec![0]).unwrap();
        let v1 = two_views(&d, 5).unwrap();
        let v2 = two_views(&d, 5).unwrap();
        let v3 = two_views(&d, 6).unwrap();
        assert_eq!(v1.features_a(), v2.features_a());
        assert_ne!(v1.features_a(), v3.features_a());
        assert_ne!(v1.row_a(0), v1.row_b(0));
        assert!(v1.features_a().iter().all(|&v| (0.0..=1.0).contains(&v)));
        let bad = Dataset::labeled(3, 1, vec![0.0; 3], vec![0]).unwrap();
        assert!(two_views(&bad, 0).unwrap_err().to_string().contains("64"));
    }
}
