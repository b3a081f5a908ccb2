//! The upload page, compiled into the binary: `GET /` (index.html), `GET /page.js` and
//! `GET /page.css` (open routes, declared in [`super::rest`]), with the headers that keep it safe in a browser (a Content-Security-Policy
//! that allows no inline script or style, no framing) and revalidated caching.

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// The upload page's Content-Security-Policy: its own script, stylesheet and calls only (no inline
/// script or style), images also from `data:` (the previews) and `blob:` (the files chosen), never
/// in a frame, no `<base>`, forms only to this server.
const PAGE_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data: blob:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; \
     form-action 'self'";

/// `GET /`: the page.
pub async fn page(request: HeaderMap) -> Response {
    static PAGE: Asset = Asset::new(include_str!("index.html"), "text/html; charset=utf-8");
    PAGE.respond(&request)
}

/// `GET /page.js`: the page's script.
pub async fn page_js(request: HeaderMap) -> Response {
    static JS: Asset = Asset::new(include_str!("page.js"), "text/javascript; charset=utf-8");
    JS.respond(&request)
}

/// `GET /page.css`: the page's stylesheet.
pub async fn page_css(request: HeaderMap) -> Response {
    static CSS: Asset = Asset::new(include_str!("page.css"), "text/css; charset=utf-8");
    CSS.respond(&request)
}

/// A file of the page, compiled in: served with its type, the page's CSP, no framing, and an ETag
/// (its SHA-256) that the browser revalidates on each load (`no-cache`: a new binary's page is
/// never mixed with an old script), answered 304 while it matches.
struct Asset {
    body: &'static str,
    content_type: &'static str,
    /// `"<first 16 hex digits of the body's SHA-256>"`, computed on first use.
    etag: std::sync::OnceLock<HeaderValue>,
}

impl Asset {
    const fn new(body: &'static str, content_type: &'static str) -> Self {
        Asset {
            body,
            content_type,
            etag: std::sync::OnceLock::new(),
        }
    }

    fn respond(&self, request: &HeaderMap) -> Response {
        let etag = self.etag.get_or_init(|| {
            use sha2::Digest;
            let digest = sha2::Sha256::digest(self.body.as_bytes());
            HeaderValue::try_from(format!("\"{}\"", &hex::encode(digest)[..16]))
                .expect("hex digits are a valid header value")
        });
        let unchanged = request
            .get_all(header::IF_NONE_MATCH)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|tag| {
                let tag = tag.trim();
                tag == "*" || tag.trim_start_matches("W/") == etag
            });
        let headers = [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static(self.content_type),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (header::ETAG, etag.clone()),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(PAGE_CSP),
            ),
            (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        ];
        if unchanged {
            (StatusCode::NOT_MODIFIED, headers).into_response()
        } else {
            (headers, self.body).into_response()
        }
    }
}
