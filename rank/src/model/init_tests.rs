use super::*;
use crate::model::{Model, TowerConfig};
use std::time::Duration;
use tessera_collectives::threads::ThreadComm;

/// A safetensors file of `(name, dtype, shape, little-endian data)` entries.
fn st_file(entries: &[(&str, &str, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({ "producer": "test" }));
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in entries {
        let start = data.len();
        data.extend_from_slice(bytes);
        header.insert(
            name.to_string(),
            serde_json::json!({ "dtype": dtype, "shape": shape, "data_offsets": [start, data.len()] }),
        );
    }
    let json = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out.extend_from_slice(&data);
    out
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A small dual encoder: tower a 5 → 4 (depth 1), tower b 3 → 4 (depth 2), both into 2.
fn dual() -> ModelConfig {
    let tower = |input_dim, depth| TowerConfig {
        input_dim,
        width: 4,
        depth,
        output_dim: 2,
        ..TowerConfig::default()
    };
    ModelConfig { tower_a: tower(5, 1), tower_b: tower(3, 2), ..ModelConfig::default() }
}

/// `model`'s tensors whose names start with `from.`, renamed to `to.`, as an F32 safetensors
/// file, with each value offset by `shift` (so loaded values differ from initialised ones).
fn tower_file(model: &Model, from: &str, to: &str, shift: f32) -> Vec<u8> {
    let entries: Vec<(String, Vec<usize>, Vec<u8>)> = model
        .param_groups()
        .iter()
        .filter_map(|g| {
            let rest = g.name.strip_prefix(&format!("{from}."))?;
            let v: Vec<f32> =
                model.params()[g.offset..g.offset + g.len].iter().map(|x| x + shift).collect();
            Some((format!("{to}.{rest}"), g.shape.clone(), f32_bytes(&v)))
        })
        .collect();
    let refs: Vec<(&str, &str, Vec<usize>, Vec<u8>)> =
        entries.iter().map(|(n, s, b)| (n.as_str(), "F32", s.clone(), b.clone())).collect();
    st_file(&refs)
}

fn with_init(mut cfg: ModelConfig, path: &Path, towers: &[&str]) -> ModelConfig {
    cfg.init_from = Some(path.to_path_buf());
    cfg.init_towers = towers.iter().map(|t| t.to_string()).collect();
    cfg
}

/// `fetch_init` on `world` thread ranks; each rank's parameters after it, or its error.
fn load_on_ranks(cfg: &ModelConfig, world: usize) -> Vec<Result<Vec<f32>, String>> {
    let handles: Vec<_> = ThreadComm::group_with_timeout(world, Duration::from_secs(60))
        .into_iter()
        .map(|mut c| {
            let cfg = cfg.clone();
            std::thread::spawn(move || {
                let mut model = Model::new(&cfg, 7).unwrap();
                let groups = model.param_groups();
                fetch_init(&cfg, &groups, model.params_mut(), &mut c)
                    .map(|_| model.params().to_vec())
                    .map_err(|e| e.to_string())
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn tower_loads_read_the_mapping_and_name_what_is_wrong() {
    let file = Some(PathBuf::from("w.safetensors"));
    let cfg = |kind, towers: &[&str], init_from: Option<PathBuf>| ModelConfig {
        kind,
        init_from,
        init_towers: towers.iter().map(|t| t.to_string()).collect(),
        ..ModelConfig::default()
    };
    let load = |dst: &str, src: &str| TowerLoad { dst: dst.into(), src: src.into() };
    assert_eq!(tower_loads(&cfg(ModelKind::Dual, &[], None)).unwrap(), vec![]);
    assert_eq!(
        tower_loads(&cfg(ModelKind::Dual, &[], file.clone())).unwrap(),
        vec![load("a", "a"), load("b", "b")]
    );
    assert_eq!(
        tower_loads(&cfg(ModelKind::Shared, &[], file.clone())).unwrap(),
        vec![load("a", "a")]
    );
    assert_eq!(
        tower_loads(&cfg(ModelKind::Dual, &["b = a"], file.clone())).unwrap(),
        vec![load("b", "a")]
    );
    for (kind, towers, from, needle) in [
        (ModelKind::Dual, &["b"][..], None, "without model.init_from"),
        (ModelKind::Dual, &["c"], file.clone(), "no tower \"c\""),
        (ModelKind::Shared, &["b=a"], file.clone(), "no tower \"b\""),
        (ModelKind::Dual, &["b=a", "b"], file.clone(), "twice"),
        (ModelKind::Dual, &["b=a.in"], file.clone(), "not a tower name"),
        (ModelKind::Dual, &["a="], file.clone(), "not a tower name"),
    ] {
        let e = tower_loads(&cfg(kind, towers, from)).unwrap_err().to_string();
        assert!(e.contains(needle), "{towers:?}: {e}");
    }
}

/// Every IEEE binary16 value converts exactly (checked against its value computed in f64).
#[test]
fn f16_converts_exactly() {
    for h in 0..=u16::MAX {
        let (sign, exp, man) = ((h >> 15) & 1, (h >> 10) & 0x1f, h & 0x3ff);
        let got = f16_to_f32(h);
        if exp == 0x1f {
            assert_eq!(got.is_nan(), man != 0, "{h:#06x}");
            if man == 0 {
                assert_eq!(got, if sign == 1 { f32::NEG_INFINITY } else { f32::INFINITY });
            }
            continue;
        }
        let mag = if exp == 0 {
            man as f64 * 2f64.powi(-24)
        } else {
            (1.0 + man as f64 / 1024.0) * 2f64.powi(exp as i32 - 15)
        };
        let want = if sign == 1 { -mag } else { mag };
        assert_eq!(got as f64, want, "{h:#06x}");
        assert_eq!(got.is_sign_negative(), sign == 1, "{h:#06x}");
    }
}

#[test]
fn safetensors_values_convert_from_every_float_type() {
    let v = [1.5f64, -0.25, 3.0e-3, 65504.0];
    let bf16: Vec<u8> =
        v.iter().flat_map(|&x| (((x as f32).to_bits() >> 16) as u16).to_le_bytes()).collect();
    // 1.5, -0.25, 0.0029983521 (the nearest binary16), 65504 in binary16.
    let f16: Vec<u8> =
        [0x3e00u16, 0xb400, 0x1a24, 0x7bff].iter().flat_map(|h| h.to_le_bytes()).collect();
    let file = st_file(&[
        ("t32", "F32", vec![2, 2], f32_bytes(&v.map(|x| x as f32))),
        ("t64", "F64", vec![4], v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        ("tb16", "BF16", vec![4, 1], bf16),
        ("t16", "F16", vec![4], f16),
        ("ints", "I32", vec![1], vec![0; 4]),
    ]);
    let index = read_safetensors_index(&file).unwrap();
    assert_eq!(index.entries["t32"].shape, vec![2, 2]);
    let want: Vec<f32> = v.iter().map(|&x| x as f32).collect();
    assert_eq!(index.values(&file, "t32").unwrap(), want);
    assert_eq!(index.values(&file, "t64").unwrap(), want);
    // bf16 keeps 8 bits of mantissa: these truncations are exact for 1.5, -0.25, 65504.
    let b = index.values(&file, "tb16").unwrap();
    assert_eq!((b[0], b[1], b[3]), (1.5, -0.25, 65280.0));
    assert!((b[2] - 3.0e-3).abs() < 3.0e-3 / 128.0, "{}", b[2]);
    let h = index.values(&file, "t16").unwrap();
    assert_eq!((h[0], h[1], h[3]), (1.5, -0.25, 65504.0));
    assert!((h[2] - 3.0e-3).abs() < 3.0e-3 / 1024.0, "{}", h[2]);
    let e = index.values(&file, "ints").unwrap_err();
    assert!(e.contains("I32") && e.contains("F32, F16, BF16 or F64"), "{e}");
}

#[test]
fn damaged_safetensors_files_are_refused_with_the_reason() {
    let good = st_file(&[("a.in.bias", "F32", vec![2], f32_bytes(&[1.0, 2.0]))]);
    let header_len = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let mut cases: Vec<(Vec<u8>, &str)> = vec![
        (good[..5].to_vec(), "too short"),
        (good[..8 + header_len - 1].to_vec(), "truncated"),
        (good[..good.len() - 1].to_vec(), "not within"),
        (st_file(&[("x", "F32", vec![3], f32_bytes(&[1.0, 2.0]))]), "needs 12 bytes"),
        (st_file(&[("x", "F32", vec![usize::MAX, 2], f32_bytes(&[1.0]))]), "more than addressable"),
    ];
    let mut not_json = good.clone();
    not_json[8] = b'[';
    cases.push((not_json, "not a JSON object"));
    let mut offsets = st_file(&[("x", "F32", vec![0], vec![])]);
    let text = String::from_utf8(offsets[8..].to_vec()).unwrap().replace("[0,0]", "[1,0]");
    offsets.truncate(8);
    offsets.extend_from_slice(text.as_bytes());
    cases.push((offsets, "not within"));
    for (bytes, needle) in cases {
        let e = read_safetensors_index(&bytes).unwrap_err();
        assert!(e.contains(needle), "want {needle:?}: {e}");
    }
}

/// LiT's case: tower b from another model's tower a of the same shape (`"b=a"`), on three
/// ranks; every rank gets the same bits, tower a and the logit scale keep their initial
/// values.
#[test]
fn a_tower_loads_from_another_name_on_every_rank() {
    let dir = tempfile::tempdir().unwrap();
    let mut src_cfg = dual();
    src_cfg.tower_a = src_cfg.tower_b.clone();
    let source = Model::new(&src_cfg, 99).unwrap();
    let path = dir.path().join("pre.safetensors");
    fs::write(&path, tower_file(&source, "a", "a", 0.5)).unwrap();

    let cfg = with_init(dual(), &path, &["b=a"]);
    let fresh = Model::new(&cfg, 7).unwrap();
    let results = load_on_ranks(&cfg, 3);
    for got in &results {
        let got = got.as_ref().unwrap();
        assert_eq!(got, results[0].as_ref().unwrap());
        for g in fresh.param_groups() {
            let ours = &got[g.offset..g.offset + g.len];
            match g.name.strip_prefix("b.") {
                Some(rest) => {
                    let sg =
                        source.param_groups().into_iter().find(|s| s.name == format!("a.{rest}"));
                    let sg = sg.unwrap();
                    let want: Vec<f32> = source.params()[sg.offset..sg.offset + sg.len]
                        .iter()
                        .map(|x| x + 0.5)
                        .collect();
                    assert_eq!(ours, &want[..], "{}", g.name);
                }
                None => assert_eq!(ours, &fresh.params()[g.offset..g.offset + g.len], "{}", g.name),
            }
        }
    }
}

/// Every tower by its own name, from a Tessera checkpoint's folder (the run's output folder).
#[test]
fn towers_load_from_a_checkpoint_folder() {
    use crate::checkpoint::{TensorInfo, write_checkpoint};
    let dir = tempfile::tempdir().unwrap();
    let source = Model::new(&dual(), 3).unwrap();
    let ck = Checkpoint {
        step: 4,
        total_steps: 4,
        world: 1,
        seed: 3,
        global_batch: 8,
        epoch: 0,
        epoch_step: 4,
        config_hash: "h".into(),
        config_toml: String::new(),
        tensors: source
            .param_groups()
            .iter()
            .map(|g| TensorInfo {
                name: g.name.clone(),
                offset: g.offset as u64,
                len: g.len as u64,
                shape: g.shape.iter().map(|&d| d as u64).collect(),
                trainable: g.trainable,
            })
            .collect(),
        params: source.params().to_vec(),
        optimizer_name: "sgd".into(),
        optimizer_state: Vec::new(),
        gns: None,
        last_loss: 1.0,
        batch_schedule: None,
    };
    let ckdir = dir.path().join("checkpoints");
    fs::create_dir_all(&ckdir).unwrap();
    write_checkpoint(&ckdir, &ck, 0).unwrap();
    let cfg = with_init(dual(), dir.path(), &[]);
    let got = load_on_ranks(&cfg, 2);
    let t = source.param_groups().iter().find(|g| g.name == "logit_scale").unwrap().offset;
    for g in got {
        let g = g.unwrap();
        // Both towers are the source's; the logit scale is this model's own initial value.
        assert_eq!(&g[..t], &source.params()[..t]);
        assert_eq!(g[t], dual().logit_scale_init);
    }
}

/// Towers that differ from the file's are refused on every rank, naming the tensor and the
/// difference; nothing is half loaded because nothing is written before every check passed.
#[test]
fn mismatched_towers_are_refused_on_every_rank() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::new(&dual(), 5).unwrap();
    let write = |name: &str, bytes: Vec<u8>| {
        let p = dir.path().join(name);
        fs::write(&p, bytes).unwrap();
        p
    };
    // Tower a (depth 1) is no tower b (depth 2): b.blocks.1.* are missing.
    let shallow = write("a-as-b.safetensors", tower_file(&model, "a", "b", 0.0));
    // A deeper tower b than this model's tower a (input 3, depth 2, vs 5, depth 1).
    let deep = write("b-as-a.safetensors", tower_file(&model, "b", "a", 0.0));
    // Tower a with its input weight transposed, as a PyTorch nn.Linear stores it.
    let mut entries = Vec::new();
    for g in model.param_groups().iter().filter(|g| g.name.starts_with("a.")) {
        let mut shape = g.shape.clone();
        if g.name == "a.in.weight" {
            shape.reverse();
        }
        entries.push((
            g.name.clone(),
            shape,
            f32_bytes(&model.params()[g.offset..g.offset + g.len]),
        ));
    }
    let refs: Vec<(&str, &str, Vec<usize>, Vec<u8>)> =
        entries.iter().map(|(n, s, b)| (n.as_str(), "F32", s.clone(), b.clone())).collect();
    let transposed = write("t.safetensors", st_file(&refs));
    // A NaN in tower a.
    let mut nan = model.clone();
    nan.params_mut()[0] = f32::NAN;
    let nan = write("nan.safetensors", tower_file(&nan, "a", "a", 0.0));
    let missing = dir.path().join("absent.safetensors");
    let garbage = write("garbage.bin", b"\x10\x00\x00\x00\x00\x00\x00\x00{}".to_vec());
    for (path, towers, needle) in [
        (
            &shallow,
            &["b"][..],
            "its b.in.weight has shape [5, 4] where this model's b.in.weight has [3, 4]",
        ),
        (&deep, &["a"], "shape [3, 4] where this model's a.in.weight has [5, 4]"),
        (&transposed, &["a"], "transposed"),
        (&nan, &["a"], "a.in.weight[0] is NaN"),
        (&shallow, &["a"], "no tensor of tower \"a\" (no name starts with \"a.\"; its towers: b)"),
        (&missing, &["a"], "cannot read it"),
        (&garbage, &["a"], "truncated"),
    ] {
        let cfg = with_init(dual(), path, towers);
        for (r, got) in load_on_ranks(&cfg, 2).into_iter().enumerate() {
            let e = got.unwrap_err();
            assert!(e.contains(needle), "rank {r}, {}: want {needle:?} in: {e}", path.display());
            assert!(e.contains("model.init_from"), "{e}");
        }
    }
    // Towers that differ only in depth: the file's (depth 1) lacks a tensor of a model of depth
    // 2, and has tensors a model of depth 0 lacks.
    let depth1 = write("depth1.safetensors", tower_file(&model, "a", "a", 0.0));
    for (depth, needle) in [
        (2, "it has no tensor \"a.blocks.1."),
        (0, "tensors that this model's tower \"a\" lacks (e.g. a.blocks.0."),
    ] {
        let mut other = dual();
        other.tower_a.depth = depth;
        let cfg = with_init(other, &depth1, &["a"]);
        let e = load_on_ranks(&cfg, 1).pop().unwrap().unwrap_err();
        assert!(e.contains(needle), "depth {depth}: want {needle:?} in: {e}");
    }
}

/// `model.init_exclude`: a classifier's tower from a contrastive model's tower a, its head
/// (another output width) left at its initialisation, every other tensor loaded; without the
/// exclusion the head's shape is refused. Entries that name no tensor, lie outside the loaded
/// towers, or come without `model.init_from` are refused, naming the fix.
#[test]
fn excluded_tensors_keep_their_initialisation() {
    let dir = tempfile::tempdir().unwrap();
    let source = Model::new(&dual(), 5).unwrap();
    let path = dir.path().join("contrastive.safetensors");
    fs::write(&path, tower_file(&source, "a", "a", 0.25)).unwrap();
    let classifier = ModelConfig {
        kind: ModelKind::Classifier,
        tower_a: TowerConfig { output_dim: 3, ..dual().tower_a },
        num_classes: Some(3),
        ..ModelConfig::default()
    };
    let fresh = Model::new(&classifier, 7).unwrap();
    let mut cfg = with_init(classifier.clone(), &path, &[]);
    let e = load_on_ranks(&cfg, 1).pop().unwrap().unwrap_err();
    assert!(e.contains("its a.out.weight has shape [4, 2] where this model's"), "{e}");
    assert!(e.contains("model.init_exclude = [\"a.out\"] keeps it"), "the fix: {e}");
    cfg.init_exclude = vec!["a.out.weight".into(), "a.out.bias".into()];
    let groups = fresh.param_groups();
    for (r, got) in load_on_ranks(&cfg, 2).into_iter().enumerate() {
        let got = got.unwrap();
        for g in &groups {
            let (lo, hi) = (g.offset, g.offset + g.len);
            let want: Vec<f32> = if g.name.starts_with("a.out.") && !g.name.contains(".ln.") {
                fresh.params()[lo..hi].to_vec()
            } else {
                let s = source.param_groups().into_iter().find(|s| s.name == g.name).unwrap();
                source.params()[s.offset..s.offset + s.len].iter().map(|x| x + 0.25).collect()
            };
            assert_eq!(got[lo..hi], want[..], "rank {r}: {}", g.name);
        }
    }
    // A prefix takes the head's LayerNorm too.
    cfg.init_exclude = vec!["a.out".into()];
    let got = load_on_ranks(&cfg, 1).pop().unwrap().unwrap();
    let ln = groups.iter().find(|g| g.name == "a.out.ln.gamma").unwrap();
    assert_eq!(got[ln.offset..ln.offset + ln.len], fresh.params()[ln.offset..ln.offset + ln.len]);
    // "a.outer" is not under "a.out": it names nothing, and every rank hears it.
    cfg.init_exclude = vec!["a.outer".into()];
    for got in load_on_ranks(&cfg, 2) {
        let e = got.unwrap_err();
        assert!(e.contains("\"a.outer\" names no tensor of this model"), "{e}");
        assert!(e.contains("a.out.weight"), "lists the tower's names: {e}");
    }
    // Refused when the config loads: outside the loaded towers, a whole tower, no init_from.
    for (exclude, from, needle) in [
        ("b.out", true, "not a tensor name or prefix inside a loaded tower (loaded: a)"),
        ("a", true, "not a tensor name or prefix inside a loaded tower"),
        ("a.", true, "not a tensor name or prefix"),
        ("a.out", false, "model.init_exclude = [\"a.out\"] without model.init_from"),
    ] {
        let mut c =
            if from { with_init(classifier.clone(), &path, &[]) } else { classifier.clone() };
        c.init_exclude = vec![exclude.into()];
        let e = tower_loads(&c).unwrap_err().to_string();
        assert!(e.contains(needle), "{exclude}: want {needle:?} in: {e}");
    }
}
