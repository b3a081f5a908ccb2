//! GPU metrics (NVML) with `--device cuda`. Where NVML is not available (this CPU machine, CI)
//! the server serves on and exports no `brainai_gpu_*` series; where it is (a lent GPU machine),
//! every one of them appears for device 0. The test checks whichever case the machine is: it asks
//! NVML itself first. (The model runs on the CPU backend here: the test is about the metrics. The
//! sampler's readings → gauges are unit-tested with a fake NVML in `src/gpu.rs`.)

mod common;

use brainai::metrics::GPU_METRICS;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_metrics_are_exported_where_nvml_is_and_absent_where_it_is_not() {
    let nvml = nvml_wrapper::Nvml::init()
        .ok()
        .and_then(|n| n.device_count().ok())
        .unwrap_or(0);
    let probed = probed_ort();
    probed.start.open();
    let mut t = serve(
        args(
            &fixture_model("tiny"),
            &["--device", "cuda", "--gpu-metrics-interval-ms", "100"],
        ),
        Some(probed.factory.clone()),
    )
    .await;
    classify_files(&mut t, &["flair_256_a.png"]).await;
    if nvml == 0 {
        // No sampler can start here (the sampler itself is tested with a fake NVML in
        // src/gpu.rs), so none runs beside this server and no series can appear.
        assert!(
            brainai::gpu::start(std::time::Duration::from_millis(100)).is_none(),
            "a GPU sampler started without NVML"
        );
        let (_, text) = http_get(t.metrics_addr(), "/metrics").await;
        assert!(
            !text.contains("brainai_gpu_"),
            "no NVML here, yet GPU series were exported:\n{text}"
        );
    } else {
        bounded("GPU metrics", async {
            loop {
                let (_, text) = http_get(t.metrics_addr(), "/metrics").await;
                if GPU_METRICS
                    .iter()
                    .all(|m| text.contains(&format!("{m}{{device=\"0\"}}")))
                {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        })
        .await;
        let total = scrape(
            t.metrics_addr(),
            "brainai_gpu_memory_total_bytes",
            &["device=\"0\""],
        )
        .await;
        assert!(total > 1e9, "{total}");
    }
    t.server.shutdown().await.unwrap();
}
