//! The result cache, through the real server: a repeated input is answered from the cache (the
//! same classification, without touching the queue), a request mixing cached and new inputs keeps
//! its order, the cache stays within `[cache] max_kib` by evicting the least recently used, and a
//! new model version never answers with the old version's results.

mod common;

use std::io::Cursor;

use brainai::pb;
use common::*;

fn png(seed: u8) -> Vec<u8> {
    let img = image::GrayImage::from_fn(48, 40, |x, y| {
        image::Luma([(x as u8).wrapping_mul(5) ^ (y as u8).wrapping_mul(3) ^ seed])
    });
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

async fn classify(t: &mut TestServer, images: &[Vec<u8>]) -> Vec<pb::Classification> {
    let images = images
        .iter()
        .enumerate()
        .map(|(i, data)| image(&format!("img-{i}"), data.clone()))
        .collect();
    bounded("Classify", t.client.classify(request(images)))
        .await
        .expect("Classify")
        .into_inner()
        .results
}

/// A repository with the tiny model and a result cache of `kib` KiB.
/// (Each test names its model apart: the tests share this process's metrics.)
fn repository(kib: u64, name: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_model("tiny", dir.path(), name);
    let mut toml = std::fs::read_to_string(model.join("model.toml")).unwrap();
    toml.push_str(&format!("\n[cache]\nmax_kib = {kib}\n"));
    std::fs::write(model.join("model.toml"), toml).unwrap();
    (dir, model)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_inputs_are_answered_from_the_cache() {
    let (dir, _) = repository(64, "hits");
    let mut t = serve(repository_args(dir.path(), &[]), None).await;
    let (a, b) = (png(1), png(2));
    let first = classify(&mut t, std::slice::from_ref(&a)).await;
    assert!(!first[0].from_cache);
    assert!(first[0].batch_size >= 1);
    let again = classify(&mut t, std::slice::from_ref(&a)).await;
    assert!(again[0].from_cache, "{again:?}");
    assert_eq!(again[0].batch_size, 0);
    assert_eq!(again[0].label, first[0].label);
    assert_eq!(again[0].probabilities, first[0].probabilities);
    assert_eq!(
        again[0].model, first[0].model,
        "the result still names its model"
    );
    let batches_before = scrape(
        t.metrics_addr(),
        "brainai_batch_size_count",
        &["model=\"hits\""],
    )
    .await;

    // A mixed request: order kept, only the new image runs.
    let mixed = classify(&mut t, &[b.clone(), a.clone(), b.clone()]).await;
    assert_eq!(
        mixed.iter().map(|c| c.index).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    assert_eq!(
        mixed
            .iter()
            .map(|c| c.image_id.as_str())
            .collect::<Vec<_>>(),
        vec!["img-0", "img-1", "img-2"]
    );
    assert!(!mixed[0].from_cache && mixed[1].from_cache);
    assert_eq!(mixed[1].probabilities, first[0].probabilities);
    let batches_after = scrape(
        t.metrics_addr(),
        "brainai_batch_size_count",
        &["model=\"hits\""],
    )
    .await;
    assert!(batches_after > batches_before, "the new image ran");

    let hits = scrape(
        t.metrics_addr(),
        "brainai_result_cache_requests_total",
        &["model=\"hits\"", "result=\"hit\""],
    )
    .await;
    let misses = scrape(
        t.metrics_addr(),
        "brainai_result_cache_requests_total",
        &["model=\"hits\"", "result=\"miss\""],
    )
    .await;
    assert_eq!((hits, misses), (2.0, 3.0), "hits: a twice; misses: a, b, b");
    t.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_evicts_the_least_recently_used_within_its_bytes() {
    // 1 KiB: a handful of two-label results.
    let (dir, _) = repository(1, "lru");
    let mut t = serve(repository_args(dir.path(), &[]), None).await;
    let images: Vec<Vec<u8>> = (0..16).map(png).collect();
    for image in &images {
        classify(&mut t, std::slice::from_ref(image)).await;
    }
    let bytes = scrape(
        t.metrics_addr(),
        "brainai_result_cache_bytes",
        &["model=\"lru\""],
    )
    .await;
    assert!(bytes > 0.0 && bytes <= 1024.0, "{bytes}");
    let evictions = scrape(
        t.metrics_addr(),
        "brainai_result_cache_evictions_total",
        &["model=\"lru\""],
    )
    .await;
    assert!(evictions >= 1.0, "{evictions}");
    // The oldest is gone, the newest is there.
    assert!(!classify(&mut t, &images[..1]).await[0].from_cache);
    assert!(classify(&mut t, &images[15..]).await[0].from_cache);
    t.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_model_version_never_answers_with_the_old_versions_results() {
    let (dir, model) = repository(64, "versions");
    let mut t = serve(repository_args(dir.path(), &[]), None).await;
    let a = png(7);
    classify(&mut t, std::slice::from_ref(&a)).await;
    let cached = classify(&mut t, std::slice::from_ref(&a)).await;
    assert!(cached[0].from_cache);
    assert_eq!(cached[0].model.as_ref().unwrap().version, "1");

    // Version 2 (here the same weights: even then, nothing of version 1's cache is reused).
    let onnx = std::fs::read(model.join("1/model.onnx")).unwrap();
    add_version(&model, 2, &onnx);
    bounded("reload", t.server.registry.reload()).await.unwrap();
    let fresh = classify(&mut t, std::slice::from_ref(&a)).await;
    assert_eq!(fresh[0].model.as_ref().unwrap().version, "2");
    assert!(
        !fresh[0].from_cache,
        "version 2 answered from version 1's cache"
    );

    // A changed model.toml (the preprocessing configuration) reloads with an empty cache too.
    let again = classify(&mut t, std::slice::from_ref(&a)).await;
    assert!(again[0].from_cache);
    let toml = std::fs::read_to_string(model.join("model.toml")).unwrap();
    std::fs::write(model.join("model.toml"), format!("{toml}\n# changed\n")).unwrap();
    bounded("reload", t.server.registry.reload()).await.unwrap();
    assert!(!classify(&mut t, std::slice::from_ref(&a)).await[0].from_cache);
    t.server.shutdown().await.unwrap();
}
