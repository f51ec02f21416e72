//! The GPU scripts' own logic, checked here where no GPU is: scripts/gpu-ab.sh run over stand-in
//! binaries (bash scripts that answer `--version` and `cuda bench-loss ... --json FILE` with rows
//! of known times and losses), and scripts/gpu-train-check.sh over a stand-in `tessera run` and a
//! stand-in `nvidia-smi` listing 1 to 8 GPUs. A GPU session has 15 minutes; a script that misreads
//! its rows there wastes them.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A stand-in for `tessera` whose bench-loss rows take `fwd` + `bwd` ms (the forward `fwd3`
/// with `--define CLIP_FWD_MIN_BLOCKS=3`) and give `loss`; `split`: whether it reports the
/// forward and backward apart and the gradients' fingerprints (binaries from before the knobs
/// do not), dT's projection being `split`'s value (the norms 10).
fn stand_in(
    dir: &Path,
    name: &str,
    fwd: &str,
    fwd3: &str,
    bwd: &str,
    loss: &str,
    split: Option<&str>,
) -> PathBuf {
    let fields = match split {
        Some(proj) => format!(
            r#","fwd_ms_median":'$fwd',"bwd_ms_median":'$bwd',"grad_norm_i":10,"grad_norm_t":10,"grad_proj_i":1.5,"grad_proj_t":{proj}"#
        ),
        None => String::new(),
    };
    let script = format!(
        r#"#!/usr/bin/env bash
[[ "$1" == "--version" ]] && {{ echo "stand-in {name}"; exit 0; }}
[[ "$1 $2" == "cuda bench-loss" ]] || {{ echo "unexpected: $*" >&2; exit 3; }}
fwd={fwd}; bwd={bwd}; b=0; json=""
while (($#)); do
    case "$1" in
        --batch) b="${{2%%,*}}"; shift ;;
        --json) json="$2"; shift ;;
        --define) [[ "$2" == CLIP_FWD_MIN_BLOCKS=3 ]] && fwd={fwd3}; shift ;;
    esac
    shift
done
total=$(python3 -c "print($fwd + $bwd)")
for p in bf16 tf32; do
    echo '{{"b":'$b',"d":768,"mode":"fast","precision":"'$p'","ms_median":'$total'{fields},"loss":{loss}}}'
done >"$json"
"#
    );
    let path = dir.join(name);
    std::fs::write(&path, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn gpu_ab(args: &[String]) -> (i32, String) {
    let out = Command::new("bash")
        .arg(repo().join("scripts/gpu-ab.sh"))
        .args(args)
        .env_remove("OUT")
        .output()
        .expect("run scripts/gpu-ab.sh");
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// The row of `table` (the lines after the line containing `title`) for B = `b`, precision
/// `prec`, split into words.
fn row(text: &str, title: &str, b: &str, prec: &str) -> Vec<String> {
    let start = text.find(title).unwrap_or_else(|| panic!("no {title:?} in:\n{text}"));
    text[start..]
        .lines()
        .map(|l| l.split_whitespace().map(String::from).collect::<Vec<_>>())
        .find(|w| w.len() > 4 && w[0] == b && w[3] == prec)
        .unwrap_or_else(|| panic!("no row {b} {prec} after {title:?} in:\n{text}"))
}

#[test]
fn gpu_ab_gives_ratios_to_the_first_binary_apart_for_forward_and_backward() {
    let dir = tempfile::tempdir().unwrap();
    let base = stand_in(dir.path(), "base", "2", "2", "6", "0.5", Some("-3"));
    let old = stand_in(dir.path(), "old", "1", "1", "3", "0.5", None);
    let new = stand_in(dir.path(), "new", "2", "1", "6", "0.5", Some("-3.1"));
    let args = vec![
        base.display().to_string(),
        old.display().to_string(),
        // The same binary with a kernel knob, as one word.
        format!("{} --define CLIP_FWD_MIN_BLOCKS=3", new.display()),
        "1".to_string(),
    ];
    let (code, text) = gpu_ab(&args);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("gpu-ab: PASS"), "{text}");
    assert!(text.contains("stand-in new"), "the labels name each binary's version:\n{text}");
    // Totals: 8 ms for binary 0, then 4 (ratio 0.5) and 7 (0.875); the same loss. (The
    // stand-ins report the first of --batch: 4096 of the first entry.)
    for b in ["4096", "65536"] {
        let r = row(&text, "median over rounds", b, "bf16");
        let want =
            ["8.000", "4.000", "0.500", "7.000", "0.875", "same", "grads", "same", "as", "0"];
        assert_eq!(&r[4..], want, "{text}");
    }
    // Forward and backward apart, for binaries 0 and 2 only (1 does not report them): the knob
    // halved the forward and left the backward.
    let r = row(&text, "forward / backward apart", "65536", "tf32");
    assert_eq!(&r[4..], ["2.000", "6.000", "0.500", "1.000"], "{text}");
    assert!(text.contains("2/0 fwd") && !text.contains("1/0 fwd"), "{text}");
}

#[test]
fn gpu_ab_fails_on_a_changed_loss_and_on_bad_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let base = stand_in(dir.path(), "base", "2", "2", "6", "0.5", Some("-3"));
    let wrong = stand_in(dir.path(), "wrong", "2", "2", "6", "0.6", Some("-3"));
    let (code, text) =
        gpu_ab(&[base.display().to_string(), wrong.display().to_string(), "1".into()]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("DIFFERS 1: 0.6 vs 0.5") && text.contains("gpu-ab: FAIL"), "{text}");
    // The same loss with another gradient (dT's projection 5 away, the norm being 10): a
    // wrong backward, which the loss does not show.
    let wrong_grad = stand_in(dir.path(), "wrong_grad", "2", "2", "6", "0.5", Some("2"));
    let (code, text) =
        gpu_ab(&[base.display().to_string(), wrong_grad.display().to_string(), "1".into()]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("same  GRADS DIFFER from 0: 1") && text.contains("FAIL"), "{text}");
    // Checked against the first binary that reports gradients (binary 1 here, after an older
    // one).
    let old = stand_in(dir.path(), "old", "1", "1", "3", "0.5", None);
    let (code, text) = gpu_ab(&[
        old.display().to_string(),
        base.display().to_string(),
        wrong_grad.display().to_string(),
        "1".into(),
    ]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("same  GRADS DIFFER from 1: 2"), "{text}");

    let (code, text) = gpu_ab(&[base.display().to_string()]);
    assert_eq!(code, 2, "one binary is a usage error:\n{text}");
    assert!(text.contains("usage: scripts/gpu-ab.sh"), "{text}");
    let missing = dir.path().join("missing").display().to_string();
    let (code, text) = gpu_ab(&[base.display().to_string(), format!("{missing} --define X=1")]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains(&format!("{missing} is not an executable")), "{text}");
}

/// A stand-in for `tessera run` as scripts/gpu-train-check.sh calls it: records its rank count,
/// collectives and overlap in `calls`, and writes a metrics.jsonl whose final loss is 0.5, or
/// `$ODD_LOSS` for the run whose "nproc:collectives:overlap" is `$ODD`. The overlapped runs print
/// the training's notice.
fn train_stand_in(dir: &Path) -> PathBuf {
    let script = r#"#!/usr/bin/env bash
[[ "$1" == run ]] || { echo "unexpected: $*" >&2; exit 3; }
nproc=0; coll=; ov=0; dir=
while (($#)); do
    case "$1" in
        --nproc) nproc="$2"; shift ;;
        --set) case "$2" in
            run.collectives=*) coll="${2#*=}"; coll="${coll//\"/}" ;;
            run.overlap_allreduce=true) ov=1 ;;
            run.out_dir=*) dir="${2#*=}"; dir="${dir//\"/}" ;;
        esac; shift ;;
    esac
    shift
done
echo "$nproc:$coll:$ov" >> "$(dirname "$0")/calls"
loss=0.5
[[ "$nproc:$coll:$ov" == "${ODD:-}" ]] && loss="$ODD_LOSS"
mkdir -p "$dir"
printf '{"step":40,"loss":0.9}\n{"step":50,"loss":%s}\n{"eval":true,"loss":7}\n' "$loss" > "$dir/metrics.jsonl"
((ov)) && echo "run.overlap_allreduce: gradient buckets of 65536 bytes all-reduced on NCCL's stream during the backward" >&2
exit 0
"#;
    let path = dir.join("tessera");
    std::fs::write(&path, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Runs scripts/gpu-train-check.sh over `bin` on a machine whose `nvidia-smi -L` lists `gpus`
/// GPUs (a stand-in first on PATH), `odd` naming the run with another loss. Returns the exit
/// code, the output and the stand-in's calls.
fn train_check(bin: &Path, gpus: usize, odd: Option<(&str, &str)>) -> (i32, String, Vec<String>) {
    let dir = bin.parent().unwrap();
    let _ = std::fs::remove_file(dir.join("calls"));
    let smi_dir = dir.join("smi");
    std::fs::create_dir_all(&smi_dir).unwrap();
    let smi = smi_dir.join("nvidia-smi");
    std::fs::write(
        &smi,
        format!(
            "#!/usr/bin/env bash\nfor ((i = 0; i < {gpus}; i++)); do echo \"GPU $i: NVIDIA H100 80GB HBM3 (UUID: GPU-$i)\"; done\n"
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&smi, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", smi_dir.display(), std::env::var("PATH").unwrap_or_default());
    let mut cmd = Command::new("bash");
    cmd.arg(repo().join("scripts/gpu-train-check.sh"))
        .arg(bin)
        .arg(dir.join("out"))
        .arg("50")
        .env("PATH", path)
        .env_remove("ODD");
    if let Some((run, loss)) = odd {
        cmd.env("ODD", run).env("ODD_LOSS", loss);
    }
    let out = cmd.output().expect("run scripts/gpu-train-check.sh");
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let calls = std::fs::read_to_string(dir.join("calls")).unwrap_or_default();
    (out.status.code().unwrap_or(-1), text, calls.lines().map(String::from).collect())
}

#[test]
fn gpu_train_check_adds_one_rank_per_gpu_over_nccl_where_several_gpus_exist() {
    let dir = tempfile::tempdir().unwrap();
    let bin = train_stand_in(dir.path());
    let one_gpu = ["2:tcp:0", "2:tcp:0", "2:tcp:0", "1:tcp:0", "1:nccl:0", "1:nccl:1", "1:tcp:0"];

    // One GPU: the seven runs of one GPU, all at the CPU's loss, the overlap bitwise.
    let (code, text, calls) = train_check(&bin, 1, None);
    assert_eq!(code, 0, "{text}");
    assert_eq!(calls, one_gpu, "{text}");
    assert!(text.contains("ncclov vs nccl: final loss 0.5 == 0.5") && text.contains("PASS"));
    assert!(!text.contains("GPUs: also"), "{text}");

    // Six GPUs: also 4 ranks (the largest power of two) on 4 GPUs over NCCL, plain and
    // overlapped. Beyond 2 ranks the overlapped run is held to the CPU's bound only.
    let (code, text, calls) = train_check(&bin, 6, Some(("4:nccl:1", "0.5001")));
    assert_eq!(code, 0, "{text}");
    let mut want: Vec<String> = one_gpu.iter().map(|s| s.to_string()).collect();
    want.extend(["4:nccl:0".to_string(), "4:nccl:1".to_string()]);
    assert_eq!(calls, want, "{text}");
    assert!(text.contains("train-check: 6 GPUs: also 4 ranks on 4 GPUs with NCCL"), "{text}");
    assert!(text.contains("train-check: nccl4 vs cpu: final loss 0.500000"), "{text}");
    assert!(text.contains("train-check: ncclov4 vs nccl4: final loss 0.5001 vs 0.5"), "{text}");

    // Two GPUs: the overlapped run must equal the plain one bitwise.
    let (code, text, calls) = train_check(&bin, 2, Some(("2:nccl:1", "0.5000001")));
    assert_eq!(code, 1, "{text}");
    assert_eq!(calls.last().map(String::as_str), Some("2:nccl:1"), "{text}");
    assert!(text.contains("must be bitwise equal at world size 2): FAIL"), "{text}");

    // Eight GPUs and a multi-GPU run off the CPU's loss: a failure naming it.
    let (code, text, calls) = train_check(&bin, 8, Some(("8:nccl:0", "0.6")));
    assert_eq!(code, 1, "{text}");
    assert!(calls.contains(&"8:nccl:1".to_string()), "{text}");
    assert!(text.contains("train-check: nccl8 vs cpu: final loss 0.600000 vs 0.500000"), "{text}");
    assert!(text.contains("(bound 1e-2): FAIL"), "{text}");
}
