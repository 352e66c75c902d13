//! One request/response exchange with a backend over a pooled or new connection.

use std::{
    future::poll_fn,
    io::{self, IoSlice},
    pin::{Pin, pin},
    sync::Arc,
    task::{Poll, ready},
};

use bytes::{Buf, Bytes, BytesMut};
use http::{Request, Response};
use http_body::Body;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::{
    Base, BoxError,
    body::{READ_SIZE, UpstreamBody, make_read_room},
    conn::{Stream, connect},
    error::UpstreamError,
    http1::{
        Framing, RequestFraming, ResponseHead, chunk_size_line, encode_request_head,
        parse_response_head,
    },
};

/// How sending ended.
#[derive(PartialEq, Eq)]
enum Sent {
    /// The whole request went out.
    Whole,
    /// The backend began to answer (413, 401, ...) while it was not reading the rest of the
    /// request; sending stopped, and the connection cannot carry another request.
    Answered,
}

/// Why sending failed.
enum SendError {
    Io(io::Error),
    Body(BoxError),
}

/// Sends `request` to the backend and reads the response head.
///
/// A pooled connection the backend closed meanwhile (its FIN raced our request) fails before
/// any response byte arrives; the request is then sent once more on a new connection, if its
/// body was at most one frame and so is still at hand.
pub(crate) async fn exchange<B>(
    base: Arc<Base>,
    request: Request<B>,
) -> Result<Response<UpstreamBody>, UpstreamError>
where
    B: Body + Send,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let (
        http::request::Parts {
            method,
            uri,
            headers,
            extensions,
            ..
        },
        body,
    ) = request.into_parts();
    let framing = if body.is_end_stream() {
        RequestFraming::Length(0)
    } else {
        RequestFraming::for_body(body.size_hint().exact())
    };
    let pooled = base.pool.take();
    let reused = pooled.is_some();
    let (mut stream, mut buf) = match pooled {
        Some(pooled) => pooled,
        None => (
            Box::pin(connect(&base.endpoint, &base.settings))
                .await
                .map_err(UpstreamError::Connect)?,
            BytesMut::new(),
        ),
    };
    // The rest of the last response's buffer serves while it is large enough: first for the
    // request head, then, past it, for the response.
    if buf.capacity() < READ_SIZE / 4 {
        buf = BytesMut::with_capacity(READ_SIZE);
    }
    // `Upstream::call` refused a request without a path.
    let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str());
    encode_request_head(
        &method,
        &base.path,
        path_and_query,
        &base.host,
        &headers,
        framing,
        &mut buf,
    );
    let head = buf.split();
    let mut replay = None;
    let mut body = pin!(body);
    let sent = send(
        &mut stream,
        &mut buf,
        &head,
        body.as_mut(),
        framing,
        &mut replay,
    )
    .await;
    // The request's fields went out in `head`: freed now, while the backend works on the
    // answer, rather than once the answer has come and the caller waits for it.
    drop((uri, headers, extensions));
    let answered_early = matches!(sent, Ok(Sent::Answered));
    let first = match sent {
        Ok(_) => read_head(&mut stream, &mut buf, &method).await,
        Err(SendError::Io(e)) => Err((e, false)),
        Err(SendError::Body(e)) => return Err(UpstreamError::RequestBody(e)),
    };
    let head = match (first, replay) {
        (Ok(head), _) => head,
        (Err((_, false)), Some(data)) if reused => {
            stream = Box::pin(connect(&base.endpoint, &base.settings))
                .await
                .map_err(UpstreamError::Connect)?;
            let chunked = framing == RequestFraming::Chunked;
            buf.clear();
            let sent = write_part(&mut stream, &mut buf, Some(&head), &data, chunked, true)
                .await
                .map_err(UpstreamError::Request)?;
            if sent == Sent::Whole {
                stream.flush().await.map_err(UpstreamError::Request)?;
            }
            read_head(&mut stream, &mut buf, &method)
                .await
                .map_err(|(e, _)| UpstreamError::Request(e))?
        }
        (Err((e, _)), _) => return Err(UpstreamError::Request(e)),
    };

    let ResponseHead {
        status,
        version,
        headers,
        framing,
        keep_alive,
    } = head;
    let keep_alive = keep_alive && !answered_early;
    let body = match framing {
        Framing::Length(length) if buf.len() as u64 >= length => {
            let data = buf.split_to(length as usize).freeze();
            if keep_alive && buf.is_empty() {
                base.pool.put(stream, buf);
            }
            UpstreamBody::complete(data)
        }
        _ => UpstreamBody::streaming(stream, buf, framing, keep_alive, Arc::clone(&base.pool)),
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.version_mut() = version;
    *response.headers_mut() = headers;
    Ok(response)
}

/// Writes the head and the body. A body that fits one frame goes out with the head in one
/// write; a streaming body is sent frame by frame as it arrives, its head first if its first
/// frame is not ready. Sets `replay` to the whole body once it has ended, if it was a single
/// frame.
async fn send<B>(
    stream: &mut Stream,
    buf: &mut BytesMut,
    head: &[u8],
    mut body: Pin<&mut B>,
    framing: RequestFraming,
    replay: &mut Option<Bytes>,
) -> Result<Sent, SendError>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let chunked = framing == RequestFraming::Chunked;
    let mut head = Some(head);
    let mut frames = 0usize;
    let mut sent = 0u64;
    let mut first = Bytes::new();
    loop {
        let (data, ended) = if body.is_end_stream() {
            (Bytes::new(), true)
        } else {
            // Poll once: a body that is not ready must not hold back the head.
            let frame = match poll_fn(|cx| Poll::Ready(poll_frame(body.as_mut(), cx))).await {
                Poll::Ready(frame) => Some(frame),
                Poll::Pending if head.is_some() => None,
                Poll::Pending => Some(poll_fn(|cx| poll_frame(body.as_mut(), cx)).await),
            };
            match frame {
                // Not ready, and the head not sent yet: send the head alone now.
                None => (Bytes::new(), false),
                Some(None) => (Bytes::new(), true),
                Some(Some(Err(e))) => return Err(SendError::Body(e)),
                Some(Some(Ok(frame))) => match frame.into_data() {
                    Ok(mut data) => {
                        let data = data.copy_to_bytes(data.remaining());
                        if data.is_empty() && !body.is_end_stream() {
                            continue;
                        }
                        (data, body.is_end_stream())
                    }
                    // Trailers are not forwarded.
                    Err(_) => continue,
                },
            }
        };
        sent += data.len() as u64;
        if let RequestFraming::Length(length) = framing
            && (sent > length || (ended && sent != length))
        {
            return Err(SendError::Body(
                "request body length differs from its declared size".into(),
            ));
        }
        if !data.is_empty() {
            frames += 1;
            if frames == 1 {
                first = data.clone();
            }
        }
        if ended && frames <= 1 {
            *replay = Some(first.clone());
        }
        let written = write_part(stream, buf, head.take(), &data, chunked, ended)
            .await
            .map_err(SendError::Io)?;
        if written == Sent::Answered {
            return Ok(Sent::Answered);
        }
        if ended || data.is_empty() {
            // The end, or the head alone ahead of a body that is not ready: out it goes.
            stream.flush().await.map_err(SendError::Io)?;
        }
        if ended {
            return Ok(Sent::Whole);
        }
    }
}

/// The body's next frame, its error boxed at once: `B::Error` need not be `Send`.
fn poll_frame<B>(
    body: Pin<&mut B>,
    cx: &mut std::task::Context<'_>,
) -> Poll<Option<Result<http_body::Frame<B::Data>, BoxError>>>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    body.poll_frame(cx)
        .map(|frame| frame.map(|result| result.map_err(Into::into)))
}

/// The largest request (head and body) copied together to leave in one `write`.
const JOIN_LIMIT: usize = 4 * 1024;

/// Writes, in one write where the socket takes it: the head if any, then `data` (in chunked
/// framing if `chunked`), then the last-chunk if `chunked` and `last`.
///
/// While the socket takes no more, the backend may be answering without reading the rest: what
/// it sends goes into `buf`, and writing stops with [`Sent::Answered`].
async fn write_part(
    stream: &mut Stream,
    buf: &mut BytesMut,
    head: Option<&[u8]>,
    data: &[u8],
    chunked: bool,
    last: bool,
) -> io::Result<Sent> {
    let mut size_line = [0u8; 20];
    let size_line = chunk_size_line(data.len(), &mut size_line);
    let (framed, trailer): (&[u8], &[u8]) = if chunked && !data.is_empty() {
        (size_line, b"\r\n")
    } else {
        (&[], &[])
    };
    let last_chunk: &[u8] = if chunked && last { b"0\r\n\r\n" } else { &[] };
    let mut parts = [IoSlice::new(&[]); 5];
    let mut count = 0;
    for part in [head.unwrap_or_default(), framed, data, trailer, last_chunk] {
        if !part.is_empty() {
            parts[count] = IoSlice::new(part);
            count += 1;
        }
    }
    let mut parts = &mut parts[..count];
    // A head and a small body leave in one `write`, copied behind each other into the read
    // buffer (empty until the answer comes): the kernel takes a `writev` of two buffers for
    // about 50 to 180 ns more. What a full socket does not take goes the usual way.
    let total: usize = parts.iter().map(|part| part.len()).sum();
    if count > 1 && buf.is_empty() && total <= JOIN_LIMIT {
        for part in parts.iter() {
            buf.extend_from_slice(part);
        }
        let written = poll_fn(|cx| match Pin::new(&mut *stream).poll_write(cx, buf) {
            Poll::Pending => Poll::Ready(Ok(None)),
            Poll::Ready(written) => Poll::Ready(written.map(Some)),
        })
        .await;
        buf.clear();
        match written? {
            Some(0) => return Err(io::ErrorKind::WriteZero.into()),
            Some(written) => IoSlice::advance_slices(&mut parts, written),
            None => {}
        }
    }
    while !parts.is_empty() {
        let written = poll_fn(|cx| {
            if let Poll::Ready(written) = Pin::new(&mut *stream).poll_write_vectored(cx, parts) {
                return Poll::Ready(written.map(Some));
            }
            make_read_room(buf);
            match ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut *stream),
                cx,
                buf
            )) {
                Ok(0) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "backend closed the connection while the request was being sent",
                ))),
                Ok(_) => Poll::Ready(Ok(None)),
                Err(e) => Poll::Ready(Err(e)),
            }
        })
        .await?;
        match written {
            None => return Ok(Sent::Answered),
            Some(0) => return Err(io::ErrorKind::WriteZero.into()),
            Some(written) => IoSlice::advance_slices(&mut parts, written),
        }
    }
    Ok(Sent::Whole)
}

/// Reads until a whole final response head is in `buf`. The error says whether any response
/// byte had arrived.
async fn read_head(
    stream: &mut Stream,
    buf: &mut BytesMut,
    method: &http::Method,
) -> Result<ResponseHead, (io::Error, bool)> {
    let mut received = false;
    loop {
        if let Some(head) = parse_response_head(buf, method).map_err(|e| (e, true))? {
            return Ok(head);
        }
        make_read_room(buf);
        let read = poll_fn(|cx| tokio_util::io::poll_read_buf(Pin::new(&mut *stream), cx, buf))
            .await
            .map_err(|e| (e, received))?;
        if read == 0 {
            let message = if received {
                "backend closed the connection in the middle of the response head"
            } else {
                "backend closed the connection without answering"
            };
            return Err((
                io::Error::new(io::ErrorKind::UnexpectedEof, message),
                received,
            ));
        }
        received = true;
    }
}
