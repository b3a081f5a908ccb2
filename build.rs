//! Compiles proto/ into OUT_DIR with a descriptor set for server reflection.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-env-changed=PROTOC");

    // Prefer an explicit PROTOC, then the vendored protoc shipped by the protoc-bin-vendored crate.
    if std::env::var_os("PROTOC").is_none() {
        match protoc_bin_vendored::protoc_bin_path() {
            Ok(path) => unsafe { std::env::set_var("PROTOC", path) },
            Err(e) => panic!(
                "no protoc available ({e}). Install one (Debian: `apt-get install protobuf-compiler`) \
                 and/or set PROTOC=/path/to/protoc"
            ),
        }
    }

    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    // brainai.v1 and the Open Inference Protocol (KServe v2, vendored under proto/kserve/), with
    // one descriptor set for server reflection.
    tonic_prost_build::configure()
        // Image bytes as `Bytes`: a slice of tonic's receive buffer instead of a copy.
        .bytes(".brainai.v1.Image.data")
        .bytes(".brainai.v1.SegmentStudyRequest.instance")
        .file_descriptor_set_path(out.join("brainai_descriptor.bin"))
        .compile_protos(
            &[
                "proto/brainai/v1/classifier.proto",
                "proto/kserve/grpc_predict_v2.proto",
            ],
            &["proto"],
        )
        .unwrap_or_else(|e| panic!("compiling the protos under proto/ failed: {e}"));
}
