//! Compiles `ballast/v1/*.proto` and KEDA's `externalscaler/externalscaler.proto`
//! without a system `protoc`: protox parses them into a descriptor set,
//! tonic-prost-build generates the code, and the encoded descriptor set is
//! kept for server reflection. The internal `ballast/cluster/v1/cluster.proto`
//! (node to node) is compiled apart, so reflection does not list it.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["ballast/v1/ballast.proto", "externalscaler/externalscaler.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["."])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("ballast_descriptor.bin"), descriptors.encode_to_vec())?;
    tonic_prost_build::configure().bytes(".").build_client(true).build_server(true).compile_fds(descriptors)?;
    let cluster = ["ballast/cluster/v1/cluster.proto"];
    for proto in cluster {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(cluster, ["."])?;
    tonic_prost_build::configure().bytes(".").build_client(true).build_server(true).compile_fds(descriptors)?;
    Ok(())
}
