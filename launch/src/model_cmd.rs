//! `tessera model`: the model a config builds, tensor by tensor, under the names and shapes
//! that checkpoints, `tessera export` and `model.init_from` use; and, when the config sets
//! `model.init_from`, a dry run of that load, so that a pretrained file is checked before a
//! job is queued.

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use tessera_collectives::threads::ThreadComm;
use tessera_rank::model::Model;
use tessera_rank::model::init::fetch_init;
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
    if a.json {
        for g in &groups {
            let line = serde_json::json!({
                "name": g.name, "shape": g.shape, "params": g.len, "trainable": g.trainable,
            });
            println!("{line}");
        }
        let line = serde_json::json!({
            "kind": kind,
            "tensors": groups.len(), "params": total, "trainable": trainable,
        });
        println!("{line}");
    } else {
        let width = groups.iter().map(|g| g.name.len()).max().unwrap_or(4).max(4);
        println!("{:<width$}  {:<12}  {:>10}  trainable", "name", "shape", "params");
        for g in &groups {
            let shape = format!("{:?}", g.shape);
            let t = if g.trainable { "yes" } else { "no" };
            println!("{:<width$}  {shape:<12}  {:>10}  {t}", g.name, g.len);
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
