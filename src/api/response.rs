//! The one response-body wrapper: a body [`Watched`] to its end by a [`Watch`], told of the gRPC
//! trailers and of how the body ended — its last frame, an error, or dropped before either (the
//! client went away). Three layers watch each response: the connection (`transport`: the call
//! stays counted in flight, its request body's bytes held, until the answer is sent), the trace
//! (`trace`: the call and `response` spans last as long, and record the outcome) and the call
//! layer (`call`: the call's one record).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::HeaderMap;

/// How a watched body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Its last frame was handed on.
    Done,
    /// It failed with an error.
    Failed,
    /// Dropped before either: the client left, or the connection stopped reading. `at_end`: the
    /// body said it had nothing more (`is_end_stream`), so nothing was lost.
    Dropped { at_end: bool },
}

/// What watches a response body.
pub trait Watch {
    /// Runs `poll`, one poll of the body (the trace enters its spans around it).
    fn polling<R>(&mut self, poll: impl FnOnce() -> R) -> R {
        poll()
    }

    /// The body handed on trailers (where gRPC puts the call's status).
    fn trailers(&mut self, _trailers: &HeaderMap) {}

    /// The body ended, once.
    fn end(self, how: End);
}

/// A response body and what watches it (`None`: nothing, e.g. a refusal already recorded).
pub struct Watched<B: Body, W: Watch> {
    inner: B,
    watch: Option<W>,
}

impl<B: Body, W: Watch> Watched<B, W> {
    pub fn new(inner: B, watch: W) -> Self {
        Watched {
            inner,
            watch: Some(watch),
        }
    }

    /// The body as it is, watched by nothing.
    pub fn plain(inner: B) -> Self {
        Watched { inner, watch: None }
    }
}

impl<B: Body, W: Watch> Watched<B, W> {
    fn end(&mut self, how: End) {
        if let Some(watch) = self.watch.take() {
            watch.end(how);
        }
    }
}

impl<B: Body, W: Watch> Drop for Watched<B, W> {
    fn drop(&mut self) {
        let at_end = self.inner.is_end_stream();
        self.end(End::Dropped { at_end });
    }
}

impl<B, W> Body for Watched<B, W>
where
    B: Body<Data = Bytes> + Unpin,
    W: Watch + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let inner = &mut this.inner;
        let polled = match this.watch.as_mut() {
            Some(watch) => watch.polling(|| Pin::new(inner).poll_frame(cx)),
            None => return Pin::new(inner).poll_frame(cx),
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(trailers), Some(watch)) = (frame.trailers_ref(), this.watch.as_mut()) {
                    watch.trailers(trailers);
                }
            }
            Poll::Ready(None) => this.end(End::Done),
            Poll::Ready(Some(Err(_))) => this.end(End::Failed),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that can carry a refusal's JSON (the HTTP API's `{"error": ...}`).
pub trait FromBytes: Default {
    fn from_bytes(bytes: Bytes) -> Self;
}

impl FromBytes for axum::body::Body {
    fn from_bytes(bytes: Bytes) -> Self {
        axum::body::Body::from(bytes)
    }
}

impl FromBytes for tonic::body::Body {
    fn from_bytes(bytes: Bytes) -> Self {
        use http_body_util::BodyExt;
        tonic::body::Body::new(http_body_util::Full::new(bytes).map_err(|never| match never {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::{Arc, Mutex};

    #[derive(Default, Clone)]
    struct Seen(Arc<Mutex<Vec<String>>>);

    impl Watch for Seen {
        fn polling<R>(&mut self, poll: impl FnOnce() -> R) -> R {
            self.0.lock().unwrap().push("poll".into());
            poll()
        }
        fn trailers(&mut self, trailers: &HeaderMap) {
            let status = trailers["grpc-status"].to_str().unwrap().to_string();
            self.0.lock().unwrap().push(format!("trailers {status}"));
        }
        fn end(self, how: End) {
            self.0.lock().unwrap().push(format!("{how:?}"));
        }
    }

    type Frames = http_body_util::StreamBody<
        futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, std::io::Error>>>,
    >;

    fn with_trailers() -> Frames {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "5".parse().unwrap());
        http_body_util::StreamBody::new(futures_util::stream::iter(vec![
            Ok(Frame::data(Bytes::from_static(b"x"))),
            Ok(Frame::trailers(trailers)),
        ]))
    }

    #[tokio::test]
    async fn a_body_read_to_its_end_ends_once_after_its_trailers() {
        let seen = Seen::default();
        let body = Watched::new(with_trailers(), seen.clone());
        body.collect().await.unwrap();
        let log = seen.0.lock().unwrap().clone();
        assert_eq!(log.last().unwrap(), "Done", "{log:?}");
        assert!(log.contains(&"trailers 5".to_string()), "{log:?}");
        assert_eq!(
            log.iter().filter(|l| l.starts_with("D")).count(),
            1,
            "{log:?}"
        );
    }

    #[tokio::test]
    async fn a_body_dropped_unread_ends_as_dropped() {
        let seen = Seen::default();
        drop(Watched::new(with_trailers(), seen.clone()));
        assert_eq!(
            *seen.0.lock().unwrap(),
            ["Dropped { at_end: false }"],
            "no poll, one end"
        );
        // An empty body has nothing to lose.
        let seen = Seen::default();
        drop(Watched::new(
            http_body_util::Empty::<Bytes>::new(),
            seen.clone(),
        ));
        assert_eq!(*seen.0.lock().unwrap(), ["Dropped { at_end: true }"]);
    }
}
