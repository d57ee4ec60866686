//! With the `cuda` feature, compiles src/gpu/kernels.cu with nvcc into a fat binary that braid
//! embeds: machine code for CUDA_COMPUTE_CAP (default 90, Hopper) plus its PTX.
//! nvcc is taken from $NVCC, else $CUDA_HOME/bin, else .cuda/bin (scripts/install-cuda), else PATH.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rerun-if-changed=src/gpu/kernels.cu");
    println!("cargo:rerun-if-changed=src/gpu/kernels");
    for var in ["NVCC", "CUDA_HOME", "CUDA_COMPUTE_CAP", "BRAID_CUDA_CHECK_ONLY"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("kernels.fatbin");
    if std::env::var_os("BRAID_CUDA_CHECK_ONLY").is_some() {
        // Type-checking and linting the CUDA path on a machine without nvcc (CI): no kernels;
        // such a binary refuses to open a GPU.
        println!("cargo:warning=BRAID_CUDA_CHECK_ONLY: built without CUDA kernels");
        println!("cargo:rustc-env=BRAID_CUDA_MACHINE_CODE=none");
        std::fs::write(&out, b"").unwrap();
        return;
    }
    let nvcc = std::env::var_os("NVCC").map(PathBuf::from).unwrap_or_else(|| {
        let candidates = [
            std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("bin/nvcc")),
            Some(PathBuf::from(".cuda/bin/nvcc")),
        ];
        candidates.into_iter().flatten().find(|p| p.exists()).unwrap_or_else(|| PathBuf::from("nvcc"))
    });
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    // Hopper's machine code is built for sm_90a, whose architecture-specific instructions
    // (wgmma) the batch-invariant tiles use; the portable PTX beside it lacks them.
    let machine = if cap == "90" { "90a".to_string() } else { cap.clone() };
    println!("cargo:rustc-env=BRAID_CUDA_MACHINE_CODE=sm_{machine}");
    let status = Command::new(&nvcc)
        .args(["--fatbin", "-O3", "-fmad=false", "-lineinfo", "-std=c++17"])
        .arg(format!("-gencode=arch=compute_{machine},code=sm_{machine}"))
        .arg(format!("-gencode=arch=compute_{cap},code=compute_{cap}"))
        .arg("-o")
        .arg(&out)
        .arg("src/gpu/kernels.cu")
        .status()
        .unwrap_or_else(|e| panic!("cannot run {} ({e}): run `make cuda-toolchain` or set NVCC", nvcc.display()));
    assert!(status.success(), "nvcc failed on src/gpu/kernels.cu");
}
