//! Connections that can be cut when the drain timeout is over.
//!
//! tonic serves every connection on a task of its own and keeps no handle to it, so ending
//! the server future alone would leave calls that outlive the drain running in the
//! background. Each accepted socket is therefore wrapped in [`CuttableIo`]: once the cut
//! signal fires, its next read or write fails and hyper closes the connection.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::future::{BoxFuture, Shared};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Resolves when remaining connections must be cut.
pub(crate) type CutSignal = Shared<BoxFuture<'static, ()>>;

/// A TCP stream that fails every operation once its cut signal has fired.
pub(crate) struct CuttableIo {
    inner: TcpStream,
    cut: CutSignal,
}

impl CuttableIo {
    pub(crate) fn new(inner: TcpStream, cut: CutSignal) -> Self {
        Self { inner, cut }
    }

    /// Polls the cut signal first, so a connection idle in a read is woken when it fires.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match Pin::new(&mut self.cut).poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "drain timeout reached",
            )),
            Poll::Pending => Ok(()),
        }
    }
}

impl AsyncRead for CuttableIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for CuttableIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl Connected for CuttableIo {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}
