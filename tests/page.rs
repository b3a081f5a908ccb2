//! The upload page's HTTP answers (finding 7): a strict Content-Security-Policy with no inline
//! script or style (the script and stylesheet are files of their own), no framing, declared types
//! that browsers must not second-guess, revalidated caching; and `nosniff` on every answer of the
//! HTTP API. That the page works under this policy is checked in a browser (tests/browser/).

mod common;

use common::*;

/// The policy, directive by directive.
const POLICY: &[&str] = &[
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data: blob:",
    "connect-src 'self'",
    "frame-ancestors 'none'",
    "base-uri 'none'",
    "form-action 'self'",
];

fn directives(csp: &str) -> Vec<String> {
    let mut list: Vec<String> = csp
        .split(';')
        .map(|d| d.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|d| !d.is_empty())
        .collect();
    list.sort();
    list
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_and_its_files_are_served_under_a_strict_policy() {
    let t = serve(args(&fixture_model("tiny"), &[]), None).await;
    let rest = t.server.http_addr;
    let mut want = POLICY.iter().map(|d| d.to_string()).collect::<Vec<_>>();
    want.sort();
    let source = repo().join("src/api/page");
    for (path, file, content_type) in [
        ("/", "index.html", "text/html; charset=utf-8"),
        ("/page.js", "page.js", "text/javascript; charset=utf-8"),
        ("/page.css", "page.css", "text/css; charset=utf-8"),
    ] {
        let r = http(rest, "GET", path, &[], b"").await;
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.header("content-type"), Some(content_type), "{path}");
        assert_eq!(r.body, std::fs::read(source.join(file)).unwrap(), "{path}");
        let csp = r.header("content-security-policy").expect("a CSP");
        assert_eq!(directives(csp), want, "{path}: {csp}");
        assert!(!csp.contains("unsafe"), "{path}: {csp}");
        assert_eq!(
            r.header("x-content-type-options"),
            Some("nosniff"),
            "{path}"
        );
        assert_eq!(r.header("x-frame-options"), Some("DENY"), "{path}");
        // Revalidated on each load: a new server's page never runs an old script.
        assert_eq!(r.header("cache-control"), Some("no-cache"), "{path}");
        let etag = r.header("etag").expect("an ETag").to_string();
        let again = http(rest, "GET", path, &[("If-None-Match", &etag)], b"").await;
        assert_eq!(again.status, 304, "{path}");
        assert!(again.body.is_empty());
        assert_eq!(again.header("etag"), Some(etag.as_str()));
        assert_eq!(again.header("x-content-type-options"), Some("nosniff"));
        let other = http(rest, "GET", path, &[("If-None-Match", "\"0123\"")], b"").await;
        assert_eq!(other.status, 200, "{path}: another version's tag");
    }

    // Nothing inline for the policy to refuse: every script is a file, no style element or
    // attribute, no inline event handler.
    let html = String::from_utf8(http(rest, "GET", "/", &[], b"").await.body).unwrap();
    let lower = html.to_ascii_lowercase();
    for (i, _) in lower.match_indices("<script") {
        let tag = &lower[i..i + lower[i..].find('>').unwrap()];
        assert!(tag.contains(" src=\"/page.js\""), "an inline script: {tag}");
    }
    assert!(!lower.contains("<style"), "an inline stylesheet");
    assert!(!lower.contains(" style="), "a style attribute");
    let handlers = lower
        .split(|c: char| c.is_whitespace())
        .filter(|w| w.starts_with("on") && w.contains('='))
        .collect::<Vec<_>>();
    assert!(handlers.is_empty(), "inline event handlers: {handlers:?}");
    assert!(html.contains("href=\"/page.css\""), "the stylesheet");

    // nosniff on every answer of the HTTP API, errors and the fallback included.
    for (method, path) in [
        ("GET", "/v2"),
        ("GET", "/v2/models/tiny"),
        ("POST", "/v1/classify"),
        ("GET", "/no/such/route"),
    ] {
        let r = http(rest, method, path, &[], b"").await;
        assert_eq!(
            r.header("x-content-type-options"),
            Some("nosniff"),
            "{method} {path} ({})",
            r.status
        );
    }
    t.server.shutdown().await.unwrap();
}

/// The page's files are open like the page itself when callers must authenticate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_files_need_no_credential() {
    let dir = tempfile::tempdir().unwrap();
    let callers = dir.path().join("callers.toml");
    std::fs::write(
        &callers,
        "[[caller]]\nname = \"pacs\"\ntoken = \"page-test-token-0123456789\"\n",
    )
    .unwrap();
    let t = serve(
        args(
            &fixture_model("tiny"),
            &["--auth-callers", &callers.display().to_string()],
        ),
        None,
    )
    .await;
    let rest = t.server.http_addr;
    for path in ["/", "/page.js", "/page.css"] {
        assert_eq!(
            http(rest, "GET", path, &[], b"").await.status,
            200,
            "{path}"
        );
    }
    assert_eq!(
        http(rest, "GET", "/v2/models/tiny", &[], b"").await.status,
        401,
        "the API still needs a credential"
    );
    t.server.shutdown().await.unwrap();
}
