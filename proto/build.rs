//! Compiles `justizbus/v1/*.proto` with the `protoc` shipped in the
//! `protoc-bin-vendored` crate, so a fresh machine needs no system protoc.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // prost-build finds protoc through this variable.
    env::set_var("PROTOC", protoc);
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let protos = ["justizbus/v1/event.proto", "justizbus/v1/bus.proto"];
    // An event's data as `Bytes`: decoding from a stored record then shares the record's buffer
    // instead of copying the payload, and copies of an event (one per recipient) share it too.
    tonic_prost_build::configure()
        .bytes(".justizbus.v1.Event.data")
        .file_descriptor_set_path(out_dir.join("justizbus_v1_descriptor.bin"))
        .compile_protos(&protos, &["."])?;
    // The server side of `Subscribe` sends deliveries whose event is already encoded (a stored
    // record) without decoding and re-encoding it: its response type is `wire::RawSubscribeResponse`,
    // wire-identical to `SubscribeResponse`, so clients keep the generated types.
    let subscribe = tonic_build::manual::Method::builder()
        .name("subscribe")
        .route_name("Subscribe")
        .input_type("crate::v1::SubscribeRequest")
        .output_type("crate::wire::RawSubscribeResponse")
        .codec_path("tonic_prost::ProstCodec")
        .client_streaming()
        .server_streaming()
        .build();
    let subscriber = tonic_build::manual::Service::builder().name("Subscriber").package("justizbus.v1").method(subscribe).build();
    let manual = out_dir.join("manual");
    std::fs::create_dir_all(&manual)?;
    tonic_build::manual::Builder::new().build_client(false).build_transport(false).out_dir(&manual).compile(&[subscriber]);
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
