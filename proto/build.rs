//! Generates the gRPC types from `proto/tessera.proto` with the protoc binary vendored by
//! `protoc-bin-vendored`, so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()
        .map_err(|e| format!("no vendored protoc for this platform: {e}"))?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure().build_client(true).build_server(true).compile_with_config(
        config,
        &["proto/tessera.proto"],
        &["proto"],
    )?;
    println!("cargo:rerun-if-changed=proto/tessera.proto");
    Ok(())
}
