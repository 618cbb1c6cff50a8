//! The service behind every path. The first byte picks the mode:
//! 'U' sink (reads to EOF, then answers one byte), 'D' + u64 source (writes that many bytes),
//! 'E' echo, 'H' hold (reads to EOF, never answers).

use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Accepts connections on `l` forever, serving each in a task.
pub(crate) async fn service(l: TcpListener) {
    loop {
        let Ok((s, _)) = l.accept().await else { continue };
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let _ = serve(s).await;
        });
    }
}

/// Serves one connection in the mode its first byte picks.
async fn serve(mut s: TcpStream) -> io::Result<()> {
    match s.read_u8().await? {
        b'U' => {
            let mut buf = vec![0u8; 256 << 10];
            while s.read(&mut buf).await? > 0 {}
            s.write_all(b"k").await?;
        }
        b'D' => {
            let mut left = s.read_u64().await?;
            let buf = vec![0x5au8; 256 << 10];
            while left > 0 {
                let n = (left as usize).min(buf.len());
                s.write_all(&buf[..n]).await?;
                left -= n as u64;
            }
            s.shutdown().await?;
        }
        b'E' => {
            let mut buf = vec![0u8; 16 << 10];
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                s.write_all(&buf[..n]).await?;
            }
        }
        _ => {
            let mut buf = [0u8; 256];
            while s.read(&mut buf).await? > 0 {}
        }
    }
    Ok(())
}
