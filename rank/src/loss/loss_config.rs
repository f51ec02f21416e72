//! The `[loss]` section of a run configuration.

use serde::{Deserialize, Serialize};

use super::ring::RingLossOpts;

/// Which contrastive loss a run trains with.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    /// Symmetric CLIP loss over all-gathered features (`b_local × B` logits per rank).
    Clip,
    /// Symmetric CLIP loss on the ring, tiled: memory O(b·d + tile²) per rank.
    #[default]
    ClipTiled,
    /// Pairwise sigmoid loss with a learnable bias, on the ring, tiled.
    Siglip,
}

/// `[loss]`: the contrastive loss and its tiling.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LossConfig {
    /// `clip` (naive, all-gathered), `clip_tiled` or `siglip`.
    pub name: LossKind,
    /// Image rows per tile (unit of parallel work).
    pub tile_rows: usize,
    /// Text columns per tile.
    pub tile_cols: usize,
    /// Threads for the tile work; 0 = the rank's shared pool.
    pub threads: usize,
    /// Rows of a feature block that travel the ring together; 0 = about 2 MiB of features
    /// (whole blocks for the GPU's blocks: `RingLossOpts::device_chunk_rows`). Memory in flight
    /// per rank is O(chunk_rows · d) whatever the batch.
    pub chunk_rows: usize,
    /// SigLIP: initial bias β (paper: −10).
    pub siglip_bias_init: f32,
    /// SigLIP: initial `t` with `s = exp(t)` (paper: ln 10). Overrides the model's logit-scale
    /// init when `name = "siglip"`.
    pub siglip_scale_init: f32,
    /// SigLIP: whether β is learned (otherwise fixed at `siglip_bias_init`).
    pub learnable_bias: bool,
}

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig {
            name: LossKind::ClipTiled,
            tile_rows: 256,
            tile_cols: 256,
            threads: 0,
            chunk_rows: 0,
            siglip_bias_init: -10.0,
            siglip_scale_init: std::f32::consts::LN_10,
            learnable_bias: true,
        }
    }
}

impl LossConfig {
    /// Checks the values; the message names the field, the value and the fix.
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [("tile_rows", self.tile_rows), ("tile_cols", self.tile_cols)] {
            if v == 0 || v > 4096 {
                return Err(format!(
                    "loss.{name} = {v}: must be in 1..=4096 (a tile is tile_rows × tile_cols \
                     floats per thread; 64..256 fits the caches)"
                ));
            }
        }
        if self.threads > 1024 {
            return Err(format!(
                "loss.threads = {}: at most 1024; use 0 for the rank's shared pool",
                self.threads
            ));
        }
        if !self.siglip_bias_init.is_finite() {
            return Err(format!(
                "loss.siglip_bias_init = {}: must be finite (the paper uses -10)",
                self.siglip_bias_init
            ));
        }
        if !(self.siglip_scale_init.is_finite() && self.siglip_scale_init.exp() <= 1e4) {
            return Err(format!(
                "loss.siglip_scale_init = {}: must be finite with exp(init) <= 1e4 (the paper \
                 uses ln 10 ≈ 2.303)",
                self.siglip_scale_init
            ));
        }
        Ok(())
    }

    /// The ring-loss tiling options of this config.
    pub fn ring_opts(&self) -> RingLossOpts {
        RingLossOpts {
            tile_rows: self.tile_rows,
            tile_cols: self.tile_cols,
            threads: self.threads,
            chunk_rows: self.chunk_rows,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_and_validate() {
        let c: LossConfig = toml::from_str("").expect("empty [loss] parses");
        assert_eq!(c, LossConfig::default());
        c.validate().expect("defaults are valid");
        let c: LossConfig =
            toml::from_str("name = \"siglip\"\ntile_rows = 64\nsiglip_bias_init = -5.0")
                .expect("parses");
        assert_eq!(c.name, LossKind::Siglip);
        assert_eq!(c.ring_opts().tile_rows, 64);
        assert_eq!(c.siglip_bias_init, -5.0);
        let c: LossConfig = toml::from_str("name = \"clip\"").expect("parses");
        assert_eq!(c.name, LossKind::Clip);
    }

    #[test]
    fn unknown_fields_and_bad_values_are_rejected() {
        assert!(toml::from_str::<LossConfig>("tile_row = 3").is_err());
        assert!(toml::from_str::<LossConfig>("name = \"infonce\"").is_err());
        let c = LossConfig { tile_cols: 0, ..LossConfig::default() };
        let e = c.validate().expect_err("zero tile rejected");
        assert!(e.contains("loss.tile_cols = 0"), "{e}");
        let c = LossConfig { siglip_bias_init: f32::NAN, ..LossConfig::default() };
        assert!(c.validate().is_err());
    }
}
