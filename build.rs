//! Compiles the in-kernel UDP path (`bpf/udp_kernel.bpf.c`) with clang when it is there.
//!
//! Without clang the build goes on, and ferry relays every UDP datagram through its
//! sockets (`ferry_bpf` unset). `FERRY_BPF=required` (the test script sets it) makes a
//! missing or failing clang an error instead, so a test run never silently builds
//! without the kernel path.

use std::env;
use std::path::PathBuf;
use std::process::Command;

const SOURCE: &str = "bpf/udp_kernel.bpf.c";

fn main() {
    println!("cargo::rustc-check-cfg=cfg(ferry_bpf)");
    println!("cargo::rerun-if-changed={SOURCE}");
    println!("cargo::rerun-if-env-changed=FERRY_BPF");
    println!("cargo::rerun-if-env-changed=FERRY_CLANG");
    let required = env::var("FERRY_BPF").is_ok_and(|v| v == "required");
    if env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux")
        || env::var("FERRY_BPF").is_ok_and(|v| v == "off")
    {
        return;
    }
    let out =
        PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("udp_kernel.o");
    let candidates = match env::var("FERRY_CLANG") {
        Ok(c) => vec![c],
        Err(_) => [
            "clang-16", "clang", "clang-19", "clang-18", "clang-17", "clang-15", "clang-14",
        ]
        .map(String::from)
        .to_vec(),
    };
    // Debian keeps <asm/types.h> under the multiarch directory, which `-target bpf` does
    // not search by itself.
    let multiarch = format!(
        "/usr/include/{}-linux-gnu",
        env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default()
    );
    let mut failures = Vec::new();
    for clang in &candidates {
        let r = Command::new(clang)
            .args([
                "-O2", "-g", "-target", "bpf", "-Wall", "-Werror", "-I", &multiarch, "-c", SOURCE,
                "-o",
            ])
            .arg(&out)
            .output();
        match r {
            Ok(o) if o.status.success() => {
                println!("cargo::rustc-cfg=ferry_bpf");
                return;
            }
            Ok(o) => failures.push(format!(
                "{clang}: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => failures.push(format!("{clang}: {e}")),
        }
    }
    let why = if failures.is_empty() {
        "no clang found".to_string()
    } else {
        failures.join("\n")
    };
    if required {
        panic!("FERRY_BPF=required, but {SOURCE} did not compile: {why}");
    }
    println!("cargo::warning=built without the in-kernel UDP path ({SOURCE}): {why}");
}
