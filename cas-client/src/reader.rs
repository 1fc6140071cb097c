//! Random access to a stored file without downloading it: `FileReader`
//! implements tokio's `AsyncRead + AsyncSeek` and fetches (verified, through
//! the cache) only the blocks that are read.

use std::future::Future;
use std::io::{self, SeekFrom};
use std::pin::Pin;
use std::task::{Context, Poll};

use cas_protocol::{ByteRange, FileHash};
use tokio::io::{AsyncRead, AsyncSeek, ReadBuf};

use crate::error::Result;
use crate::fetch::Fetcher;

/// Bytes fetched per miss; a read never fetches less.
pub const DEFAULT_BLOCK: u64 = 1 << 20;

type Pending = Pin<Box<dyn Future<Output = Result<(u64, Vec<u8>)>> + Send>>;

pub struct FileReader {
    fetcher: Fetcher,
    file: FileHash,
    size: u64,
    pos: u64,
    block: u64,
    /// Bytes `buf_start..buf_start + buf.len()` of the file.
    buf_start: u64,
    buf: Vec<u8>,
    pending: Option<Pending>,
}

impl FileReader {
    pub(crate) fn new(fetcher: Fetcher, file: FileHash, size: u64) -> Self {
        Self {
            fetcher,
            file,
            size,
            pos: 0,
            block: DEFAULT_BLOCK,
            buf_start: 0,
            buf: Vec::new(),
            pending: None,
        }
    }

    /// Changes how much one miss fetches (at least one byte).
    pub fn with_block_size(mut self, block: u64) -> Self {
        self.block = block.max(1);
        self
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn hash(&self) -> FileHash {
        self.file
    }

    fn buffered(&self) -> Option<&[u8]> {
        let off = self.pos.checked_sub(self.buf_start)?;
        self.buf.get(off as usize..).filter(|b| !b.is_empty())
    }
}

impl AsyncRead for FileReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.pos >= this.size || out.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if let Some(b) = this.buffered() {
                let n = b.len().min(out.remaining());
                out.put_slice(&b[..n]);
                this.pos += n as u64;
                return Poll::Ready(Ok(()));
            }
            let fut = this.pending.get_or_insert_with(|| {
                let fetcher = this.fetcher.clone();
                let (file, start) = (this.file, this.pos);
                let end = (start + this.block.max(out.remaining() as u64)).min(this.size);
                Box::pin(async move {
                    let bytes = fetcher.read(file, ByteRange { start, end }).await?;
                    Ok((start, bytes))
                })
            });
            match fut.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(r) => {
                    this.pending = None;
                    let (start, bytes) = r.map_err(io::Error::other)?;
                    this.buf_start = start;
                    this.buf = bytes;
                }
            }
        }
    }
}

impl AsyncSeek for FileReader {
    fn start_seek(mut self: Pin<&mut Self>, to: SeekFrom) -> io::Result<()> {
        let target = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.size.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        }
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start"))?;
        if target != self.pos {
            // A read in flight was for the old position.
            self.pending = None;
        }
        self.pos = target;
        Ok(())
    }

    fn poll_complete(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        Poll::Ready(Ok(self.pos))
    }
}
