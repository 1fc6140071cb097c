//! Reads the header of a stored safetensors file without downloading its
//! tensors: `FileReader` fetches (and verifies) only the blocks it reads.
//!
//! ```sh
//! cargo run -p cas-client --example safetensors_header -- http://127.0.0.1:8080 <file-hash>
//! ```

use cas_client::{Client, ClientConfig};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(endpoint), Some(hash)) = (args.next(), args.next()) else {
        return Err("usage: safetensors_header ENDPOINT FILE_HASH".into());
    };
    let client = Client::new(ClientConfig::new(endpoint))?;
    // Small blocks: read little more than the header itself.
    let mut reader = client.open(hash.parse()?).await?.with_block_size(64 * 1024);
    let len = reader.read_u64_le().await?;
    if len > 100 << 20 || len + 8 > reader.size() {
        return Err(format!("header length {len} does not fit a safetensors file").into());
    }
    let mut header = vec![0; len as usize];
    reader.read_exact(&mut header).await?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)?;
    for (name, t) in header.iter().filter(|(n, _)| *n != "__metadata__") {
        println!("{name}: {} {}", t["dtype"], t["shape"]);
    }
    // Seek to the last tensor's final bytes: again only that block travels.
    let end = reader.seek(std::io::SeekFrom::End(-2)).await?;
    let mut last = [0u8; 2];
    reader.read_exact(&mut last).await?;
    println!(
        "{} tensors; last bf16 value at byte {end}: {:#06x}",
        header.len() - usize::from(header.contains_key("__metadata__")),
        u16::from_le_bytes(last)
    );
    Ok(())
}
