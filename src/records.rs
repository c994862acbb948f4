//! Write coalescing on viewer connections: pingora writes a response's header and its body in
//! separate writes (HTTP/1), and HTTP/2's codec writes a frame as its head with the first payload
//! bytes, then the rest. Each write to a TLS stream is a TLS record. Small writes are held here
//! until the next flush (pingora flushes at the end of every HTTP/1 response, the codec after
//! every frame) or until they would pass [`HOLD`], so that a small response (a manifest, an
//! error) leaves as one record and one segment instead of two: one seal here, and half the
//! reads for the client.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use async_trait::async_trait;
use bytes::{Buf, BytesMut};
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::SslDigest;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream, TimingDigest,
    UniqueID, UniqueIDType, ALPN,
};
use pingora::tls::ssl::SslRef;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

/// The most held back: a response header with a small body. A slow response streamed in small
/// writes waits for at most this much (pingora's own socket buffer holds back 1460 bytes).
pub const HOLD: usize = 4096;

/// A viewer stream whose small writes wait for the next flush.
#[derive(Debug)]
pub struct Coalesced {
    inner: Stream,
    /// Held writes; empty (and unallocated) between responses.
    held: BytesMut,
}

impl Coalesced {
    pub fn new(inner: Stream) -> Coalesced {
        Coalesced {
            inner,
            held: BytesMut::new(),
        }
    }

    /// Writes out what is held, as one TLS record.
    fn poll_release(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.held.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.held))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.held.advance(n);
        }
        self.held = BytesMut::new(); // a connection between responses holds no buffer
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Coalesced {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.held.len() + data.len() > HOLD {
            ready!(this.poll_release(cx))?;
        }
        if data.len() >= HOLD {
            return Pin::new(&mut this.inner).poll_write(cx, data);
        }
        if this.held.is_empty() {
            this.held.reserve(HOLD);
        }
        this.held.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    /// One slice at a time, each held or written as `poll_write` does. HTTP/2's codec copies
    /// less of each payload into its own buffer for a stream that takes slices (256 bytes, not
    /// 1024).
    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        match bufs.iter().find(|b| !b.is_empty()) {
            Some(b) => self.poll_write(cx, b),
            None => Poll::Ready(Ok(0)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_release(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_release(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl AsyncRead for Coalesced {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

#[async_trait]
impl Shutdown for Coalesced {
    async fn shutdown(&mut self) {
        let _ = self.flush().await; // what is held goes first; the close follows either way
        Shutdown::shutdown(&mut *self.inner).await;
    }
}

impl UniqueID for Coalesced {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Coalesced {
    fn get_ssl(&self) -> Option<&SslRef> {
        self.inner.get_ssl()
    }
    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for Coalesced {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }
}

impl GetProxyDigest for Coalesced {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl GetSocketDigest for Coalesced {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
}

#[async_trait]
impl Peek for Coalesced {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// The writes that reached the inner stream, each as it arrived, for each item of `script`
    /// written as HTTP/2's codec writes (slices at once, an empty one first).
    async fn writes(script: &[&[u8]], flush_after: bool) -> Vec<Vec<u8>> {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let mut c = Coalesced::new(Box::new(Recorder {
            inner: client,
            writes: Vec::new(),
        }));
        for w in script {
            let mut done = 0;
            while done < w.len() {
                done += c.write_vectored(&[IoSlice::new(&[]), IoSlice::new(&w[done..])]).await.unwrap();
            }
        }
        if flush_after {
            c.flush().await.unwrap();
        }
        let rec = c.inner.into_any().downcast::<Recorder>().unwrap();
        drop(rec.inner);
        let mut all = Vec::new();
        server.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, rec.writes.concat(), "nothing lost or reordered");
        rec.writes
    }

    #[tokio::test]
    async fn a_header_and_a_small_body_leave_in_one_write_at_the_flush() {
        let w = writes(&[b"HTTP/1.1 200 OK\r\n\r\n", &[7; 1024]], true).await;
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].len(), 19 + 1024);
        assert!(writes(&[b"held"], false).await.is_empty(), "held until the flush");
    }

    #[tokio::test]
    async fn a_large_write_goes_straight_through_after_what_is_held() {
        let big = vec![1u8; 100_000];
        let w = writes(&[b"header", &big, b"tail"], true).await;
        assert_eq!(w.iter().map(Vec::len).collect::<Vec<_>>(), vec![6, 100_000, 4]);
        // Small writes that outgrow the hold are released, in order.
        let small = [2u8; 3000];
        let w = writes(&[&small, &small, &small], true).await;
        assert_eq!(w.iter().map(Vec::len).collect::<Vec<_>>(), vec![3000, 3000, 3000]);
    }

    #[tokio::test]
    async fn an_http2_frame_and_its_head_leave_together_when_small() {
        // HTTP/2's codec: a HEADERS frame and a DATA frame's head with 247 payload bytes, then
        // the rest of a 1 KiB payload: one record. A full frame's payload goes straight through.
        let head = [9u8; 300];
        assert_eq!(writes(&[&head, &[5u8; 777]], true).await.iter().map(Vec::len).collect::<Vec<_>>(), vec![1077]);
        let w = writes(&[&head, &[5u8; 16137]], true).await;
        assert_eq!(w.iter().map(Vec::len).collect::<Vec<_>>(), vec![300, 16137]);
    }

    /// A stream that records each write it is given.
    #[derive(Debug)]
    struct Recorder {
        inner: tokio::io::DuplexStream,
        writes: Vec<Vec<u8>>,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, data))?;
            self.writes.push(data[..n].to_vec());
            Poll::Ready(Ok(n))
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }
    impl AsyncRead for Recorder {
        fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }
    #[async_trait]
    impl Shutdown for Recorder {
        async fn shutdown(&mut self) {}
    }
    impl UniqueID for Recorder {
        fn id(&self) -> UniqueIDType {
            0
        }
    }
    impl Ssl for Recorder {}
    impl GetTimingDigest for Recorder {
        fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
            Vec::new()
        }
    }
    impl GetProxyDigest for Recorder {
        fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
            None
        }
    }
    impl GetSocketDigest for Recorder {
        fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
            None
        }
    }
    impl Peek for Recorder {}
}
