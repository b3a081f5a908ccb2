//! The one error type every front end receives from the pipeline: a transport-neutral kind plus a
//! message that names the input and the reason. Each transport maps [`ErrorKind`] once (gRPC in
//! `api::grpc`); metrics use [`ErrorKind::as_str`], the canonical status name, as their label.

/// What went wrong, independent of the transport. The names and meanings are those of the
/// canonical status codes (google.rpc.Code), which HTTP and gRPC front ends both map from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The request itself is wrong (bad image, too many images, unknown format value).
    InvalidArgument,
    /// The named model or version is not served here.
    NotFound,
    /// No room: the queue is full, or a message is over a size limit.
    ResourceExhausted,
    /// The caller's deadline passed before the work was done.
    DeadlineExceeded,
    /// Not now: warming up, loading, or draining; retry (elsewhere).
    Unavailable,
    /// The caller went away.
    Cancelled,
    /// The model run failed; a bug or a broken model, not the caller's fault.
    Internal,
    /// The input is well formed but not what the model accepts (e.g. a T1 series sent to a
    /// FLAIR model).
    FailedPrecondition,
}

impl ErrorKind {
    /// The canonical status name (`INVALID_ARGUMENT`, …): the `code` label of metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "INVALID_ARGUMENT",
            ErrorKind::NotFound => "NOT_FOUND",
            ErrorKind::ResourceExhausted => "RESOURCE_EXHAUSTED",
            ErrorKind::DeadlineExceeded => "DEADLINE_EXCEEDED",
            ErrorKind::Unavailable => "UNAVAILABLE",
            ErrorKind::Cancelled => "CANCELLED",
            ErrorKind::Internal => "INTERNAL",
            ErrorKind::FailedPrecondition => "FAILED_PRECONDITION",
        }
    }
}

/// Name of a successful outcome in the same vocabulary as [`ErrorKind::as_str`].
pub const OK: &str = "OK";

/// Why a request (or one image of it) failed. `message` is safe to show the caller and to log: it
/// names the image by index, never by id, and carries no image data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InferError {
    pub kind: ErrorKind,
    pub message: String,
    /// The message quotes text the caller sent (a model name, a version): the caller may see it,
    /// logs may not (a client could put anything there).
    pub quotes_caller: bool,
}

impl InferError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        InferError {
            kind,
            message: message.into(),
            quotes_caller: false,
        }
    }

    /// Marks the message as quoting the caller's text (see [`InferError::log_message`]).
    pub fn quoting_caller(mut self) -> Self {
        self.quotes_caller = true;
        self
    }

    /// The message for logs: the caller's message unless it quotes the caller's text.
    pub fn log_message(&self) -> &str {
        if self.quotes_caller {
            "(the message quotes the caller's request; not logged)"
        } else {
            &self.message
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }

    pub fn deadline(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::DeadlineExceeded, message)
    }

    /// The same error about image `index` ("image 3: …").
    pub fn for_image(self, index: usize) -> Self {
        InferError {
            message: format!("image {index}: {}", self.message),
            ..self
        }
    }
}

/// Shortens a caller-supplied string before it is echoed in an error: error messages travel in
/// response metadata, which clients limit in size.
pub fn echo(text: &str) -> String {
    const MAX: usize = 64;
    if text.chars().count() <= MAX {
        format!("{text:?}")
    } else {
        let head: String = text.chars().take(MAX).collect();
        format!("{head:?}… ({} bytes)", text.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_errors_name_the_index() {
        let e = InferError::invalid("image data is empty").for_image(3);
        assert_eq!(e.to_string(), "image 3: image data is empty");
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert_eq!(e.kind.as_str(), "INVALID_ARGUMENT");
    }

    #[test]
    fn echoed_strings_are_bounded() {
        assert_eq!(echo("tiny"), "\"tiny\"");
        let long = "x".repeat(20_000);
        let shown = echo(&long);
        assert!(shown.len() < 100, "{shown}");
        assert!(shown.ends_with("(20000 bytes)"), "{shown}");
    }
}
