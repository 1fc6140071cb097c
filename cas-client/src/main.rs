//! `cas-client`: a thin command-line shell over the `cas_client` library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about = "Content-addressed chunk store client")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Chunk and hash files locally (no server): prints file hash, SHA-256,
    /// size and path, one line per file.
    Hash {
        /// Print one JSON object per file instead.
        #[arg(long)]
        json: bool,
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Hash { json, paths } => {
            let mut failed = false;
            for path in paths {
                match cas_client::hash_file(&path) {
                    Ok(d) if json => {
                        println!("{}", serde_json::to_string(&d).expect("serializable"))
                    }
                    Ok(d) => println!(
                        "{}  {}  {}  {}",
                        d.file_hash,
                        d.sha256,
                        d.size,
                        d.path.display()
                    ),
                    Err(e) => {
                        eprintln!("cas-client: {e}");
                        failed = true;
                    }
                }
            }
            if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
    }
}
