//! One connection to a backend: plain TCP (loopback) or TLS, and how to open it.

use std::{
    io::{self, IoSlice},
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, Waker},
    time::Duration,
};

use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::{TlsConnector, client::TlsStream};

/// Where a backend is and how to speak to it; computed once per [`Upstream`](crate::Upstream).
pub(crate) struct Endpoint {
    /// Host for name resolution: an IP literal without brackets, or a DNS name.
    pub(crate) host: Box<str>,
    pub(crate) port: u16,
    /// `Some` for `https`: the name the certificate must carry.
    pub(crate) tls: Option<ServerName<'static>>,
}

/// An open connection to a backend.
pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// Connection settings shared by every backend of one [`UpstreamClient`](crate::UpstreamClient).
pub(crate) struct ConnectSettings {
    pub(crate) connect_timeout: Duration,
    /// How long an idle pooled connection is kept; also the TCP keep-alive time.
    pub(crate) idle_timeout: Duration,
    pub(crate) tls: Arc<rustls::ClientConfig>,
}

/// Opens a connection: resolves the host, tries each address within the connect timeout, sets
/// `TCP_NODELAY` and TCP keep-alive, then shakes hands over TLS for `https`, again within the
/// connect timeout.
pub(crate) async fn connect(endpoint: &Endpoint, settings: &ConnectSettings) -> io::Result<Stream> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((&*endpoint.host, endpoint.port))
        .await?
        .collect();
    let mut last_error = None;
    let mut tcp = None;
    for addr in addrs {
        match tokio::time::timeout(settings.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                tcp = Some(stream);
                break;
            }
            Ok(Err(e)) => last_error = Some(e),
            Err(_) => {
                last_error = Some(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connect timed out after {:?}", settings.connect_timeout),
                ));
            }
        }
    }
    let Some(tcp) = tcp else {
        return Err(last_error.unwrap_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "the host name resolved to no address",
            )
        }));
    };
    tcp.set_nodelay(true)?;
    socket2::SockRef::from(&tcp)
        .set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(settings.idle_timeout))?;
    match &endpoint.tls {
        None => Ok(Stream::Plain(tcp)),
        Some(name) => {
            let handshake =
                TlsConnector::from(Arc::clone(&settings.tls)).connect(name.clone(), tcp);
            match tokio::time::timeout(settings.connect_timeout, handshake).await {
                Ok(tls) => Ok(Stream::Tls(Box::new(tls?))),
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "TLS handshake timed out after {:?}",
                        settings.connect_timeout
                    ),
                )),
            }
        }
    }
}

impl Stream {
    /// Whether an idle pooled connection can still carry a request: the backend has neither
    /// closed it nor sent anything unasked. Costs no system call while the connection is quiet.
    pub(crate) fn is_open(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        let mut byte = [0u8; 1];
        match self {
            // While tokio knows the socket is not readable, `try_read` says so without a system
            // call (and, unlike a readiness poll, without registering a waker, which takes the
            // socket's lock); a readable one is read: a FIN or stray bytes mean it is done.
            Self::Plain(tcp) => {
                matches!(tcp.try_read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            // TLS may have records that carry no data (a session ticket); rustls consumes them
            // and reports pending.
            Self::Tls(tls) => {
                let mut buf = ReadBuf::new(&mut byte);
                Pin::new(&mut **tls)
                    .poll_read(&mut cx, &mut buf)
                    .is_pending()
            }
        }
    }

    /// Waits until the plain socket is readable, without a buffer; TLS is always "ready" here,
    /// its read decides.
    pub(crate) fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Self::Plain(tcp) => tcp.poll_read_ready(cx),
            Self::Tls(_) => Poll::Ready(Ok(())),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Self::Tls(tls) => Pin::new(&mut **tls).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Self::Tls(tls) => Pin::new(&mut **tls).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            Self::Tls(tls) => Pin::new(&mut **tls).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(tcp) => tcp.is_write_vectored(),
            Self::Tls(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Self::Tls(tls) => Pin::new(&mut **tls).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Self::Tls(tls) => Pin::new(&mut **tls).poll_shutdown(cx),
        }
    }
}
