//! The one error type every front end receives from the pipeline: a transport-neutral kind plus a
//! message that names the input and the reason. Each transport maps [`ErrorKind`] once (gRPC in
//! `api::grpc`, HTTP in `api::web`); metrics use [`ErrorKind::as_str`], the canonical status name,
//! as their label, and [`code_name`] / [`http_outcome`] name any transport status the same way.

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
    /// No credential, or one nobody issued.
    Unauthenticated,
    /// A known caller without the scope the method needs, or a browser request from another site.
    PermissionDenied,
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
            ErrorKind::Unauthenticated => "UNAUTHENTICATED",
            ErrorKind::PermissionDenied => "PERMISSION_DENIED",
        }
    }
}

/// A gRPC status code as its canonical upper-case name (`OK`, `INVALID_ARGUMENT`, …), the same
/// vocabulary as [`ErrorKind::as_str`].
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => OK,
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// An HTTP status in the same vocabulary (the `code` label of an HTTP API call's metrics): the
/// inverse of the HTTP API's mapping of [`ErrorKind`], plus the statuses the transport answers
/// itself (413 too large, 408 too slow, 405, 415).
pub fn http_outcome(status: u16) -> &'static str {
    match status {
        200..=299 => OK,
        400 | 405 | 411 | 415 => "INVALID_ARGUMENT",
        422 => "FAILED_PRECONDITION",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        408 | 504 => "DEADLINE_EXCEEDED",
        413 | 429 | 431 => "RESOURCE_EXHAUSTED",
        499 => "CANCELLED",
        501 => "UNIMPLEMENTED",
        503 => "UNAVAILABLE",
        500..=599 => "INTERNAL",
        _ => "UNKNOWN",
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

/// A parser's message with what it quotes of the caller's input (between `"` or `` ` ``) cut to
/// 64 characters each, and the whole to 512: JSON parsers quote the offending value.
pub fn bounded_quotes(message: &str) -> String {
    const MAX: usize = 64;
    let mut out = String::with_capacity(message.len().min(512));
    let mut rest = message;
    while let Some(open) = rest.find(['"', '`']) {
        let quote = rest.as_bytes()[open] as char;
        out.push_str(&rest[..=open]);
        let after = &rest[open + 1..];
        let (quoted, tail) = match after.find(quote) {
            Some(close) => (&after[..close], &after[close..]),
            None => (after, ""),
        };
        if quoted.chars().count() > MAX {
            out.extend(quoted.chars().take(MAX));
            out.push_str(&format!("… ({} bytes)", quoted.len()));
        } else {
            out.push_str(quoted);
        }
        match tail.strip_prefix(quote) {
            Some(tail) => {
                out.push(quote);
                rest = tail;
            }
            None => rest = tail,
        }
    }
    out.push_str(rest);
    if out.chars().count() > 512 {
        out = out.chars().take(512).collect::<String>() + "…";
    }
    out
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
    fn quoted_caller_text_in_parser_messages_is_bounded() {
        let long = "A".repeat(100_000);
        let message = format!("invalid type: string \"{long}\", expected a sequence at line 1");
        let shown = bounded_quotes(&message);
        assert!(shown.len() < 200, "{} bytes", shown.len());
        assert!(shown.starts_with("invalid type: string \"AAAA"), "{shown}");
        assert!(shown.ends_with("expected a sequence at line 1"), "{shown}");
        assert_eq!(
            bounded_quotes("unknown field `x`, expected `inputs`"),
            "unknown field `x`, expected `inputs`"
        );
        // An unterminated quote is cut too.
        assert!(bounded_quotes(&format!("bad `{long}")).len() < 120);
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
