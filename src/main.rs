//! `brainai` binary: parses the command line, sets up logging, runs the subcommand.

use std::process::ExitCode;

use brainai::config::{Cli, Command};
use brainai::telemetry::{self, LogFormat, TraceExport};
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (log_format, export) = match &cli.command {
        Command::Serve(args) => (
            args.log_format,
            args.otlp_endpoint.as_ref().map(|endpoint| TraceExport {
                endpoint: endpoint.clone(),
                ca: args.otlp_ca.clone(),
                service_name: args.otlp_service_name.clone(),
                sample_ratio: args.otlp_sample_ratio,
            }),
        ),
        Command::Classify(_) | Command::Segment(_) => (LogFormat::Text, None),
    };
    // The thread budget (src/threads.rs): async workers and the preprocessing pool are sized
    // here, once per process; ONNX Runtime's intra-op threads when each session opens.
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    let budget = match &cli.command {
        Command::Serve(args) => {
            let malloc = brainai::threads::tune_allocator();
            let budget = (args.thread_budget(), malloc);
            builder.worker_threads(budget.0.io);
            budget.0.init_preprocess_pool();
            Some(budget)
        }
        Command::Classify(_) | Command::Segment(_) => None,
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Inside the runtime: the OTLP exporter's gRPC channel runs on it.
    let telemetry = match runtime.block_on(async { telemetry::init(log_format, export.as_ref()) }) {
        Ok(telemetry) => telemetry,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::FAILURE;
        }
    };
    if let Some((b, malloc)) = budget {
        tracing::info!(
            cores = b.cores,
            io_threads = b.io,
            preprocess_threads = b.preprocess,
            intra_op_threads = b.intra_op,
            "thread budget"
        );
        tracing::info!(?malloc, "allocator");
    }
    let serving = matches!(cli.command, Command::Serve(_));
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => brainai::server::run_until_signal(&args)
                .await
                .map_err(|e| e.to_string()),
            Command::Classify(args) => brainai::client::run(&args).await,
            Command::Segment(args) => brainai::client::segment::run(&args).await,
        }
    });
    // The last spans are exported while the runtime (the exporter's channel) still runs.
    telemetry.shutdown();
    // Whatever is still running (a connection's last bytes, a blocking file read) does not get
    // to hold the exit: the drain already had its time.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    if serving {
        // Model instance threads may still be inside ONNX Runtime (a warm-up cut short by SIGTERM,
        // a batch still running when the drain time ran out). Returning from main would run the
        // library's static destructors under them (seen: a segfault after "stopped", 2 in 80
        // SIGTERMs during warm-up on a loaded machine); leave without them.
        let code = match &result {
            Ok(_) => 0,
            Err(message) => {
                eprintln!("error: {message}");
                1
            }
        };
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        // SAFETY: _exit ends the process at once; everything that must be written was flushed.
        unsafe { libc::_exit(code) }
    }
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
