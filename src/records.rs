//! Write coalescing on viewer connections: pingora writes a response's header and its body in
//! separate writes (HTTP/1), and HTTP/2's codec writes a frame as its head with the first payload
//! bytes, then the rest. Each write to a TLS stream is a TLS record. Small writes are held here
//! until the next flush (pingora flushes at the end of every HTTP/1 response, the codec after
//! every frame) or until they would pass [`HOLD`], so that a small response (a manifest, an
//! error) leaves as one record and one segment instead of two: one seal here, and half the
//! reads for the client. Reads and flushes that cannot find anything to do are answered here
//! without entering BoringSSL (see [`ReadWake`]).

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll, Wake, Waker};

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
    /// Whether anything reached `inner` since its last flush.
    unflushed: bool,
    read: Arc<ReadWake>,
    /// `read` as a waker, for the reads of `inner`.
    read_waker: Waker,
}

/// The waker a viewer stream's reads register with the socket. HTTP/2's codec reads until a
/// read finds nothing, and reads again on every poll of the connection, writes included: for a
/// small hit, two TLS reads that find nothing per request, each a trip through BoringSSL and
/// its error queue. A read that found nothing registered this waker; until the socket wakes it,
/// a read from the same task would find nothing again (BoringSSL buffers nothing it could
/// return without more bytes), so it is answered `Pending` at once.
#[derive(Debug, Default)]
struct ReadWake {
    /// Set before a read of `inner`; cleared when it returns data or the socket wakes us.
    idle: AtomicBool,
    /// The task's waker, which every wake is passed on to.
    task: Mutex<Option<Waker>>,
}

impl ReadWake {
    fn task(&self) -> std::sync::MutexGuard<'_, Option<Waker>> {
        self.task.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Wake for ReadWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.idle.store(false, Ordering::SeqCst);
        if let Some(task) = self.task().as_ref() {
            task.wake_by_ref();
        }
    }
}

impl Coalesced {
    pub fn new(inner: Stream) -> Coalesced {
        let read = Arc::new(ReadWake::default());
        Coalesced {
            inner,
            held: BytesMut::new(),
            unflushed: false,
            read_waker: Waker::from(read.clone()),
            read,
        }
    }

    /// Writes out what is held, as one TLS record.
    fn poll_release(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.held.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.held))?;
            self.unflushed = true;
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
            this.unflushed = true;
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

    /// HTTP/2's codec flushes on every poll of the connection; `inner` only when it was written.
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_release(cx))?;
        if self.unflushed {
            ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
            self.unflushed = false;
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_release(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl AsyncRead for Coalesced {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        {
            let mut task = this.read.task();
            let same_task = task.as_ref().is_some_and(|t| t.will_wake(cx.waker()));
            if same_task && this.read.idle.load(Ordering::SeqCst) {
                return Poll::Pending; // the socket has not woken us since the last read found nothing
            }
            if !same_task {
                *task = Some(cx.waker().clone());
            }
        }
        // Set before the read, so that a wake during it (from another thread) is not lost.
        this.read.idle.store(true, Ordering::SeqCst);
        let polled = Pin::new(&mut this.inner).poll_read(&mut Context::from_waker(&this.read_waker), buf);
        if polled.is_ready() {
            this.read.idle.store(false, Ordering::SeqCst);
        }
        polled
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
        let mut c = Coalesced::new(Box::new(Recorder::new(client)));
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

    #[derive(Debug, Default)]
    struct Count(std::sync::atomic::AtomicUsize);

    impl Count {
        fn get(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
        fn add(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.add();
        }
    }

    #[tokio::test]
    async fn a_read_that_found_nothing_is_not_repeated_until_the_socket_wakes() {
        use tokio::io::AsyncWriteExt;
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let rec = Recorder::new(client);
        let (reads, flushes) = (rec.reads.clone(), rec.flushes.clone());
        let mut c = Coalesced::new(Box::new(rec));
        let mut buf = [0u8; 64];
        let mut poll = |c: &mut Coalesced, task: &Arc<Count>| {
            let waker = Waker::from(task.clone());
            let mut rb = ReadBuf::new(&mut buf);
            match Pin::new(c).poll_read(&mut Context::from_waker(&waker), &mut rb) {
                Poll::Ready(r) => Some(r.map(|()| rb.filled().to_vec())),
                Poll::Pending => None,
            }
        };
        let (task, other) = (Arc::new(Count::default()), Arc::new(Count::default()));
        assert!(poll(&mut c, &task).is_none());
        assert!(poll(&mut c, &task).is_none());
        assert_eq!(reads.get(), 1, "the same task's second read is answered here");
        assert!(poll(&mut c, &other).is_none());
        assert_eq!(reads.get(), 2, "another task's read reaches the stream");
        server.write_all(b"hello").await.unwrap();
        assert_eq!((task.get(), other.get()), (0, 1), "the socket's wake reaches the last task");
        assert_eq!(poll(&mut c, &other).unwrap().unwrap(), b"hello");
        assert_eq!(reads.get(), 3);

        // Flushes: the stream's only after a write.
        c.flush().await.unwrap();
        assert_eq!(flushes.get(), 0);
        c.write_all(b"x").await.unwrap();
        c.flush().await.unwrap();
        c.flush().await.unwrap();
        assert_eq!(flushes.get(), 1);
        let mut got = [0u8; 1];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"x");
    }

    /// A stream that records each write it is given, and counts its reads and flushes.
    #[derive(Debug)]
    struct Recorder {
        inner: tokio::io::DuplexStream,
        writes: Vec<Vec<u8>>,
        reads: Arc<Count>,
        flushes: Arc<Count>,
    }

    impl Recorder {
        fn new(inner: tokio::io::DuplexStream) -> Recorder {
            Recorder {
                inner,
                writes: Vec::new(),
                reads: Arc::default(),
                flushes: Arc::default(),
            }
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, data))?;
            self.writes.push(data[..n].to_vec());
            Poll::Ready(Ok(n))
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.flushes.add();
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }
    impl AsyncRead for Recorder {
        fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            self.reads.add();
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
