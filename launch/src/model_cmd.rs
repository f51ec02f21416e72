//! `tessera model`: the model a config builds, tensor by tensor, under the names and shapes
//! that checkpoints, `tessera export` and `model.init_from` use; and, when the config sets
//! `model.init_from`, which tensors come from the file and a dry run of that load, so that a
//! pretrained file is checked before a job is queued.

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use tessera_collectives::threads::ThreadComm;
use tessera_rank::model::Model;
use tessera_rank::model::init::{fetch_init, loaded_groups, tower_loads};
use tessera_rank::train::model_config;

#[derive(Args, Debug)]
pub struct ModelArgs {
    #[command(flatten)]
    pub job: crate::JobArgs,
    /// One JSON object per tensor, then one for the whole model, instead of the table.
    #[arg(long)]
    pub json: bool,
}

pub fn model(a: &ModelArgs) -> Result<ExitCode> {
    let cfg = a.job.load()?;
    let model_cfg = model_config(&cfg);
    let mut model = Model::new(&model_cfg, cfg.run.seed)?;
    let groups = model.param_groups();
    let total = model.num_params();
    let trainable: usize = groups.iter().filter(|g| g.trainable).map(|g| g.len).sum();
    let kind = format!("{:?}", model_cfg.kind).to_lowercase();
    // With model.init_from: whether each tensor comes from the file (else its initialisation).
    let from_file: Option<Vec<bool>> = match &model_cfg.init_from {
        None => None,
        Some(_) => {
            let loads = tower_loads(&model_cfg)?;
            let loaded = loaded_groups(&groups, &loads, &model_cfg.init_exclude);
            Some(groups.iter().map(|g| loaded.iter().any(|l| l.name == g.name)).collect())
        }
    };
    if a.json {
        for (i, g) in groups.iter().enumerate() {
            let mut line = serde_json::json!({
                "name": g.name, "shape": g.shape, "params": g.len, "trainable": g.trainable,
                "lr_scale": cfg.optim.lr_scale_of(&g.name),
            });
            if let Some(f) = &from_file {
                line["from_file"] = f[i].into();
            }
            println!("{line}");
        }
        let line = serde_json::json!({
            "kind": kind,
            "tensors": groups.len(), "params": total, "trainable": trainable,
        });
        println!("{line}");
    } else {
        let width = groups.iter().map(|g| g.name.len()).max().unwrap_or(4).max(4);
        let file_col = if from_file.is_some() { "  from file" } else { "" };
        // The learning-rate factors, when `optim.lr_scale` sets any.
        let scales = !cfg.optim.lr_scale.is_empty();
        let lr_col = if scales { "  lr scale" } else { "" };
        println!(
            "{:<width$}  {:<12}  {:>10}{lr_col}  trainable{file_col}",
            "name", "shape", "params"
        );
        let yes_no = |b: bool| if b { "yes" } else { "no" };
        for (i, g) in groups.iter().enumerate() {
            let shape = format!("{:?}", g.shape);
            let t = match &from_file {
                None => yes_no(g.trainable).to_string(),
                Some(f) => format!("{:<9}  {}", yes_no(g.trainable), yes_no(f[i])),
            };
            let lr = if scales {
                format!("  {:>8}", cfg.optim.lr_scale_of(&g.name))
            } else {
                String::new()
            };
            println!("{:<width$}  {shape:<12}  {:>10}{lr}  {t}", g.name, g.len);
        }
        println!(
            "{kind} model: {} tensors, {total} parameters ({trainable} trainable), {:.1} MiB in f32",
            groups.len(),
            total as f64 * 4.0 / (1u64 << 20) as f64
        );
    }
    // The load a run would make at step 0, by one rank.
    if model_cfg.init_from.is_some() {
        let mut comm = ThreadComm::group(1).pop().expect("a group of one");
        if let Some(line) = fetch_init(&model_cfg, &groups, model.params_mut(), &mut comm)? {
            eprintln!("{line}: every name and shape matches");
        }
    }
    Ok(ExitCode::SUCCESS)
}
