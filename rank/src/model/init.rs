//! Starting towers from pretrained weights (`model.init_from`, `model.init_towers`): LiT's
//! locked, pretrained image tower (with `model.freeze_b`), or any warm start.
//!
//! The weights come from a safetensors file (as `tessera export --safetensors` writes, or as
//! Python's `safetensors` writes with Tessera's tensor names and shapes) or from a Tessera
//! checkpoint (a `ckpt-*.tsr` file, a checkpoints folder or a run's output folder: its newest
//! valid checkpoint). A tower `dst` is loaded from the file's tower `src` (`"b=a"`), every
//! tensor by name (`src.<rest>` → `dst.<rest>`): the file must hold each of the tower's tensors
//! with the same shape and no other tensor under `src.`, as PyTorch's strict `load_state_dict`
//! asks. The logit scale and bias keep their configured initial values. `model.init_exclude`
//! leaves named tensors of a loaded tower at their initialisation (and ignores the file's
//! tensors of those names), e.g. a classifier's head when the tower was trained contrastively.
//!
//! Rank 0 reads the file and sends the towers' values to every rank, so the file need only be
//! on rank 0's machine and every rank starts from the same bits.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use super::{ModelConfig, ModelKind, ParamGroup, under};
use crate::checkpoint::{self, CHECKPOINT_MAGIC, Checkpoint};

/// Errors of `model.init_from` / `model.init_towers`, each naming the key, the file or the
/// tensor, and the fix.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("{0}")]
    Spec(String),
    #[error("model.init_from = {path:?}: {reason}")]
    Source { path: String, reason: String },
    #[error(
        "model.init_from = {origin:?}, loading {map}: {reason}; the file must hold \
         the tower's tensors under Tessera's names and shapes, as `tessera export \
         --safetensors` writes them from a run"
    )]
    Mismatch { origin: String, map: String, reason: String },
    #[error("model.init_from: rank 0 could not load the weights: {0}")]
    Remote(String),
    #[error(
        "model.init_from: rank 0 sent {got} bytes of weights where this rank expects {want}: \
         the ranks disagree on the model; check that they run the same config"
    )]
    Length { got: usize, want: usize },
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
}

/// One tower to load: this model's tower `dst` from the file's tower `src`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TowerLoad {
    pub dst: String,
    pub src: String,
}

/// The towers `cfg` loads from `model.init_from` (empty when it is unset), checked against the
/// model's towers: `model.init_towers` entries `"b"` or `"b=a"`; none = every tower of the
/// model from the file's tower of the same name.
pub fn tower_loads(cfg: &ModelConfig) -> Result<Vec<TowerLoad>, InitError> {
    let towers: &[&str] = if cfg.kind == ModelKind::Dual { &["a", "b"] } else { &["a"] };
    if cfg.init_from.is_none() {
        for (key, v) in [("init_towers", &cfg.init_towers), ("init_exclude", &cfg.init_exclude)] {
            if !v.is_empty() {
                return Err(InitError::Spec(format!(
                    "model.{key} = {v:?} without model.init_from: set model.init_from to the \
                     safetensors file or checkpoint to load the towers from"
                )));
            }
        }
        return Ok(Vec::new());
    }
    let loads = tower_loads_of(cfg, towers)?;
    for entry in &cfg.init_exclude {
        let tower = entry.split_once('.').map(|p| p.0);
        if !tower.is_some_and(|t| loads.iter().any(|l| l.dst == t)) || entry.ends_with('.') {
            let loaded: Vec<&str> = loads.iter().map(|l| l.dst.as_str()).collect();
            return Err(InitError::Spec(format!(
                "model.init_exclude entry {entry:?}: not a tensor name or prefix inside a loaded \
                 tower (loaded: {}); write e.g. \"a.out\" for a.out.weight and a.out.bias \
                 (`tessera model` lists the names)",
                loaded.join(", ")
            )));
        }
    }
    Ok(loads)
}

fn tower_loads_of(cfg: &ModelConfig, towers: &[&str]) -> Result<Vec<TowerLoad>, InitError> {
    if cfg.init_towers.is_empty() {
        return Ok(towers
            .iter()
            .map(|t| TowerLoad { dst: t.to_string(), src: t.to_string() })
            .collect());
    }
    let mut loads: Vec<TowerLoad> = Vec::new();
    for entry in &cfg.init_towers {
        let (dst, src) = match entry.split_once('=') {
            Some((d, s)) => (d.trim(), s.trim()),
            None => (entry.trim(), entry.trim()),
        };
        if !towers.contains(&dst) {
            return Err(InitError::Spec(format!(
                "model.init_towers entry {entry:?}: this {:?} model has no tower {dst:?} (its \
                 towers: {}); write \"TOWER\" or \"TOWER=FILE_TOWER\", e.g. \"b=a\"",
                cfg.kind,
                towers.join(", ")
            )));
        }
        if src.is_empty() || src.contains('.') || src.contains(char::is_whitespace) {
            return Err(InitError::Spec(format!(
                "model.init_towers entry {entry:?}: {src:?} is not a tower name (the prefix of \
                 the file's tensor names, e.g. \"a\" for a.in.weight)"
            )));
        }
        if loads.iter().any(|l| l.dst == dst) {
            return Err(InitError::Spec(format!(
                "model.init_towers names tower {dst:?} twice ({:?}); keep one entry",
                cfg.init_towers
            )));
        }
        loads.push(TowerLoad { dst: dst.to_string(), src: src.to_string() });
    }
    Ok(loads)
}

fn describe(loads: &[TowerLoad]) -> String {
    let parts: Vec<String> = loads
        .iter()
        .map(|l| {
            if l.dst == l.src {
                format!("tower {}", l.dst)
            } else {
                format!("tower {} from tower {}", l.dst, l.src)
            }
        })
        .collect();
    parts.join(", ")
}

/// The model's tensors that `loads` fill, in buffer order, but for those `exclude` names
/// (`model.init_exclude`).
pub fn loaded_groups<'g>(
    groups: &'g [ParamGroup],
    loads: &[TowerLoad],
    exclude: &[String],
) -> Vec<&'g ParamGroup> {
    groups
        .iter()
        .filter(|g| {
            loads.iter().any(|l| under(&g.name, &l.dst) && g.name != l.dst)
                && !exclude.iter().any(|e| under(&g.name, e))
        })
        .collect()
}

/// Each `model.init_exclude` entry must name a tensor of a loaded tower: one that names none
/// (a typo, or another depth) is refused with the tower's names.
fn check_exclude(
    groups: &[ParamGroup],
    loads: &[TowerLoad],
    exclude: &[String],
) -> Result<(), InitError> {
    for e in exclude {
        if !groups.iter().any(|g| under(&g.name, e)) {
            let tower = e.split_once('.').map_or(e.as_str(), |p| p.0);
            let names: Vec<&str> = groups
                .iter()
                .filter(|g| under(&g.name, tower) && loads.iter().any(|l| l.dst == tower))
                .map(|g| g.name.as_str())
                .collect();
            return Err(InitError::Spec(format!(
                "model.init_exclude entry {e:?} names no tensor of this model (tower {tower}'s: \
                 {}); name a tensor or a prefix of them, e.g. \"{tower}.out\"",
                names.join(", ")
            )));
        }
    }
    Ok(())
}

/// Element types a safetensors file may hold for a loaded tensor (converted to f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dtype {
    F32,
    F16,
    Bf16,
    F64,
}

impl Dtype {
    fn parse(s: &str) -> Option<Dtype> {
        Some(match s {
            "F32" => Dtype::F32,
            "F16" => Dtype::F16,
            "BF16" => Dtype::Bf16,
            "F64" => Dtype::F64,
            _ => return None,
        })
    }

    fn size(self) -> usize {
        match self {
            Dtype::F16 | Dtype::Bf16 => 2,
            Dtype::F32 => 4,
            Dtype::F64 => 8,
        }
    }
}

/// One tensor of a safetensors file: its element type (`Err` with the type's name: a type that
/// no tower tensor loads from, kept so the error can name it), shape and bytes in the data
/// section.
#[derive(Clone, Debug)]
pub struct SafetensorsEntry {
    dtype: Result<Dtype, String>,
    pub shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// The index of a safetensors file: its tensors by name and where their data begins. Every
/// entry's byte range has been checked against its type, its shape and the file's length.
#[derive(Clone, Debug)]
pub struct SafetensorsIndex {
    pub entries: BTreeMap<String, SafetensorsEntry>,
    data_start: usize,
}

/// Largest header accepted: 100 MiB (the safetensors library's own limit is 10⁸ bytes).
const MAX_HEADER: usize = 100 << 20;

/// Reads the header of a safetensors file (8-byte little-endian header length, JSON header,
/// data) and checks every tensor's byte range. An error says what is wrong with the bytes.
pub fn read_safetensors_index(bytes: &[u8]) -> Result<SafetensorsIndex, String> {
    if bytes.len() < 8 {
        return Err(format!("{} bytes: too short for a safetensors file", bytes.len()));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    if n > MAX_HEADER as u64 || n > (bytes.len() - 8) as u64 {
        return Err(format!(
            "its header length is {n} bytes, but the file has {} bytes after it (and a header is \
             at most {MAX_HEADER}): not a safetensors file, or a truncated one",
            bytes.len() - 8
        ));
    }
    let data_start = 8 + n as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..data_start])
            .map_err(|e| format!("its header is not a JSON object: {e}"))?;
    let data_len = bytes.len() - data_start;
    let mut entries = BTreeMap::new();
    for (name, v) in header {
        if name == "__metadata__" {
            continue;
        }
        let bad = |what: &str| format!("tensor {name:?}: {what}");
        let obj = v.as_object().ok_or_else(|| bad("its entry is not an object"))?;
        let dtype_s = obj.get("dtype").and_then(|d| d.as_str()).ok_or_else(|| bad("no dtype"))?;
        let shape = obj
            .get("shape")
            .and_then(|s| s.as_array())
            .ok_or_else(|| bad("no shape"))?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| bad("its shape is not a list of sizes"))?;
        let offs = obj
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .filter(|o| o.len() == 2)
            .and_then(|o| Some((o[0].as_u64()?, o[1].as_u64()?)))
            .ok_or_else(|| bad("its data_offsets are not two byte offsets"))?;
        let (start, end) = (offs.0 as usize, offs.1 as usize);
        if offs.0 > offs.1 || offs.1 > data_len as u64 {
            return Err(bad(&format!(
                "its data_offsets [{}, {}] are not within the {data_len} bytes of data",
                offs.0, offs.1
            )));
        }
        let numel = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        let dtype = Dtype::parse(dtype_s).ok_or_else(|| dtype_s.to_string());
        if let Ok(dt) = dtype {
            let want = numel.and_then(|n| n.checked_mul(dt.size()));
            if want != Some(end - start) {
                return Err(bad(&format!(
                    "shape {shape:?} of {dtype_s} needs {} bytes but its data_offsets span {}",
                    want.map_or("more than addressable".to_string(), |w| w.to_string()),
                    end - start
                )));
            }
        }
        entries.insert(name, SafetensorsEntry { dtype, shape, start, end });
    }
    Ok(SafetensorsIndex { entries, data_start })
}

impl SafetensorsIndex {
    /// The values of tensor `name` of the file `bytes` this index was read from, as f32.
    pub fn values(&self, bytes: &[u8], name: &str) -> Result<Vec<f32>, String> {
        let e = self.entries.get(name).ok_or_else(|| format!("no tensor {name:?}"))?;
        let dt = e.dtype.clone().map_err(|d| {
            format!("tensor {name:?} is {d}; a tower tensor loads from F32, F16, BF16 or F64")
        })?;
        let raw = &bytes[self.data_start + e.start..self.data_start + e.end];
        Ok(match dt {
            Dtype::F32 => {
                raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4"))).collect()
            }
            Dtype::F64 => raw
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8")) as f32)
                .collect(),
            Dtype::Bf16 => raw
                .chunks_exact(2)
                .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
                .collect(),
            Dtype::F16 => {
                raw.chunks_exact(2).map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect()
            }
        })
    }
}

/// IEEE binary16 to f32, exactly (subnormals, infinities and NaN included).
fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: m · 2^-24, exact in f32.
            let v = m as f32 * f32::from_bits(0x3380_0000);
            return if sign != 0 { -v } else { v };
        }
        (0x1f, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 112) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

/// Where the weights come from, read on rank 0.
enum Source {
    Safetensors { bytes: Vec<u8>, index: SafetensorsIndex },
    Checkpoint(Box<Checkpoint>),
}

impl Source {
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        match self {
            Source::Safetensors { index, .. } => index.entries.get(name).map(|e| e.shape.clone()),
            Source::Checkpoint(ck) => ck
                .tensors
                .iter()
                .find(|t| t.name == name)
                .map(|t| t.shape.iter().map(|&d| d as usize).collect()),
        }
    }

    fn names(&self) -> Vec<String> {
        match self {
            Source::Safetensors { index, .. } => index.entries.keys().cloned().collect(),
            Source::Checkpoint(ck) => ck.tensors.iter().map(|t| t.name.clone()).collect(),
        }
    }

    fn values(&self, name: &str) -> Result<Vec<f32>, String> {
        match self {
            Source::Safetensors { bytes, index } => index.values(bytes, name),
            Source::Checkpoint(ck) => {
                let t = ck.tensors.iter().find(|t| t.name == name).ok_or("no such tensor")?;
                Ok(ck.params[t.offset as usize..(t.offset + t.len) as usize].to_vec())
            }
        }
    }
}

/// Reads `path`: a safetensors file, a Tessera checkpoint file, or a folder of checkpoints (a
/// run's output folder stands for its `checkpoints` folder). Returns the file read and its
/// tensors.
fn open(path: &Path) -> Result<(PathBuf, Source), String> {
    if path.is_dir() {
        let dir = checkpoint::checkpoints_in(path);
        let found =
            checkpoint::latest_valid(&dir).map_err(|e| e.to_string())?.ok_or_else(|| {
                format!(
                    "the folder {} holds no ckpt-*.tsr checkpoint; pass a safetensors file, a \
                 checkpoint file or a run's output folder",
                    dir.display()
                )
            })?;
        for skipped in &found.skipped {
            eprintln!("model.init_from: warning: skipped a damaged checkpoint: {skipped}");
        }
        return Ok((found.path, Source::Checkpoint(Box::new(found.checkpoint))));
    }
    let bytes = fs::read(path).map_err(|e| {
        format!("cannot read it ({e}); pass a safetensors file or a Tessera checkpoint")
    })?;
    if bytes.starts_with(CHECKPOINT_MAGIC) {
        let ck =
            checkpoint::decode(&bytes, &path.display().to_string()).map_err(|e| e.to_string())?;
        return Ok((path.to_path_buf(), Source::Checkpoint(Box::new(ck))));
    }
    let index = read_safetensors_index(&bytes)
        .map_err(|e| format!("not a Tessera checkpoint, and as a safetensors file: {e}"))?;
    Ok((path.to_path_buf(), Source::Safetensors { bytes, index }))
}

/// The values of `groups` (the loaded towers' tensors, in buffer order) from `source`,
/// concatenated; every check of names and shapes made.
fn gather(
    source: &Source,
    origin: &str,
    groups: &[&ParamGroup],
    loads: &[TowerLoad],
    exclude: &[String],
) -> Result<Vec<f32>, InitError> {
    let mismatch = |reason: String| InitError::Mismatch {
        origin: origin.to_string(),
        map: describe(loads),
        reason,
    };
    let names = source.names();
    let mut out = Vec::with_capacity(groups.iter().map(|g| g.len).sum());
    for l in loads {
        let prefix = format!("{}.", l.src);
        let in_file: Vec<&String> = names.iter().filter(|n| n.starts_with(&prefix)).collect();
        // The file's tensors that land on an excluded name are not loaded, and not extra.
        let kept: Vec<&String> = in_file
            .iter()
            .copied()
            .filter(|n| {
                let ours = format!("{}.{}", l.dst, &n[prefix.len()..]);
                !exclude.iter().any(|e| under(&ours, e))
            })
            .collect();
        if in_file.is_empty() {
            let mut towers: Vec<&str> =
                names.iter().filter_map(|n| n.split_once('.').map(|p| p.0)).collect();
            towers.dedup();
            return Err(mismatch(format!(
                "it has no tensor of tower {:?} (no name starts with {prefix:?}; its towers: {})",
                l.src,
                if towers.is_empty() { "none".to_string() } else { towers.join(", ") }
            )));
        }
        let ours = groups.iter().filter(|g| g.name.starts_with(&format!("{}.", l.dst)));
        let mut used = 0usize;
        for g in ours {
            let src_name = format!("{}{}", prefix, &g.name[l.dst.len() + 1..]);
            let shape = source.shape(&src_name).ok_or_else(|| {
                mismatch(format!(
                    "it has no tensor {src_name:?} for this model's {} (shape {:?}); the towers \
                     differ (compare model.tower_{}'s width, depth, norm and dims with the \
                     file's)",
                    g.name, g.shape, l.dst
                ))
            })?;
            if shape != g.shape {
                let transposed =
                    shape.len() == 2 && shape[0] == g.shape[1] && shape[1] == g.shape[0];
                return Err(mismatch(format!(
                    "its {src_name} has shape {shape:?} where this model's {} has {:?}{}",
                    g.name,
                    g.shape,
                    if transposed {
                        ": transposed; Tessera stores a weight as [fan_in, fan_out] (y = x·W), \
                         so save PyTorch nn.Linear weights as weight.T"
                            .to_string()
                    } else if under(&g.name, &format!("{}.out", l.dst)) {
                        format!(
                            "; for a new head (another output width), model.init_exclude = \
                             [\"{}.out\"] keeps it at its initialisation",
                            l.dst
                        )
                    } else {
                        String::new()
                    }
                )));
            }
            let v = source.values(&src_name).map_err(mismatch)?;
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(mismatch(format!(
                    "its {src_name}[{i}] is {}, not a finite number",
                    v[i]
                )));
            }
            out.extend_from_slice(&v);
            used += 1;
        }
        if used < kept.len() {
            let extra: Vec<&str> = kept
                .iter()
                .filter(|n| {
                    let rest = &n[prefix.len()..];
                    !groups
                        .iter()
                        .any(|g| g.name.strip_prefix(&format!("{}.", l.dst)) == Some(rest))
                })
                .take(4)
                .map(|n| n.as_str())
                .collect();
            return Err(mismatch(format!(
                "its tower {:?} has {} tensors that this model's tower {:?} lacks (e.g. {}); the \
                 towers differ (compare model.tower_{}'s depth, norm and dims with the file's)",
                l.src,
                kept.len() - used,
                l.dst,
                extra.join(", "),
                l.dst
            )));
        }
    }
    Ok(out)
}

const TAG_VALUES: u64 = 1;
const TAG_ERROR: u64 = 2;

/// Rank 0 reads `cfg.init_from` and every rank receives the loaded towers' values, written
/// into their places in `params` (the buffer `groups` describes). Returns a line for the log
/// (empty on the other ranks), or `None` when `model.init_from` is unset. Collective.
pub fn fetch_init(
    cfg: &ModelConfig,
    groups: &[ParamGroup],
    params: &mut [f32],
    comm: &mut dyn tessera_collectives::Communicator,
) -> Result<Option<String>, InitError> {
    let loads = tower_loads(cfg)?;
    let Some(path) = &cfg.init_from else {
        return Ok(None);
    };
    check_exclude(groups, &loads, &cfg.init_exclude)?;
    let wanted = loaded_groups(groups, &loads, &cfg.init_exclude);
    let want: usize = wanted.iter().map(|g| g.len).sum();
    let (values, line) = if comm.rank() == 0 {
        let read = open(path)
            .map_err(|reason| InitError::Source { path: path.display().to_string(), reason })
            .and_then(|(file, source)| {
                let origin = file.display().to_string();
                let v = gather(&source, &origin, &wanted, &loads, &cfg.init_exclude)?;
                let except = if cfg.init_exclude.is_empty() {
                    String::new()
                } else {
                    format!("; kept at their initialisation: {}", cfg.init_exclude.join(", "))
                };
                let line = format!(
                    "model.init_from: loaded {} of {origin} ({} tensors, {} values{except})",
                    describe(&loads),
                    wanted.len(),
                    v.len()
                );
                Ok((v, line))
            });
        if comm.world() > 1 {
            let (tag, body) = match &read {
                Ok((v, _)) => (TAG_VALUES, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
                Err(e) => (TAG_ERROR, e.to_string().into_bytes()),
            };
            checkpoint::broadcast_message(comm, tag, body)?;
        }
        read?
    } else {
        let (tag, body) = checkpoint::broadcast_message(comm, 0, Vec::new())?;
        if tag != TAG_VALUES {
            return Err(InitError::Remote(String::from_utf8_lossy(&body).into_owned()));
        }
        if body.len() != 4 * want {
            return Err(InitError::Length { got: body.len(), want: 4 * want });
        }
        let v =
            body.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4"))).collect();
        (v, String::new())
    };
    let mut at = 0;
    for g in wanted {
        params[g.offset..g.offset + g.len].copy_from_slice(&values[at..at + g.len]);
        at += g.len;
    }
    Ok(Some(line))
}

#[cfg(test)]
#[path = "init_tests.rs"]
mod tests;
