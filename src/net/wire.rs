//! Record I/O for the handshake phase, where records are read one at a time with a size cap.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::proto::frame::push_record;

/// Reads one record body of at most `max` bytes. A larger declared length is an error before
/// anything is allocated: a peer-sent length never sizes an allocation beyond `max`.
pub(crate) async fn read_record<S: AsyncRead + Unpin>(sock: &mut S, max: usize) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    sock.read_exact(&mut len).await?;
    let len = u16::from_be_bytes(len) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("record of {len} bytes exceeds the {max}-byte limit"),
        ));
    }
    let mut body = vec![0u8; len];
    sock.read_exact(&mut body).await?;
    Ok(body)
}

/// Writes one record (length prefix and body).
pub(crate) async fn write_record<S: AsyncWrite + Unpin>(sock: &mut S, body: &[u8]) -> io::Result<()> {
    let mut rec = Vec::with_capacity(body.len() + 2);
    push_record(&mut rec, body);
    sock.write_all(&rec).await
}
