//! `gen-model`: writes a seeded, generated model directory (safetensors
//! shards of bf16 tensors) in version 1, 2 (10% of tensors retrained) or 3
//! (one tensor appended). Same arguments, same bytes.

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Directory to write.
    out: PathBuf,
    /// Model size in MiB (whole 16 MiB tensors).
    #[arg(long, default_value_t = 256)]
    mib: u64,
    /// Shard size in MiB.
    #[arg(long, default_value_t = 1024)]
    shard_mib: u64,
    #[arg(long, default_value_t = 1)]
    version: u32,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let files =
        cas_bench::model::write_model(&a.out, a.mib << 20, a.shard_mib << 20, a.version, a.seed)?;
    for f in files {
        println!("{}", f.display());
    }
    Ok(())
}
