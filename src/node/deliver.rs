//! Delivery: the outbox's results to the destination by C-STORE, one association per job,
//! retried with backoff until the destination takes them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dicom_dictionary_std::tags;
use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
use dicom_object::OpenFileOptions;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use dicom_ul::Pdu;
use dicom_ul::association::client::ClientAssociationOptions;
use dicom_ul::pdu::{PDataValue, PDataValueType, PresentationContextResultReason};
use tokio::io::AsyncWriteExt;
use tracing::Instrument;

use super::Node;
use super::config::Destination;
use super::dimse::{self, Command};
use super::outbox::Entry;
use crate::metrics;

const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
const IMPLICIT_LE: &str = "1.2.840.10008.1.2";
/// How long the destination has to answer each step.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// How delivering a job ended.
#[derive(Debug)]
pub enum Delivered {
    /// Every object accepted.
    All,
    /// The destination could not be reached or the association failed.
    Failed(String),
    /// The destination answered a failure status for an object (kept for the next try).
    Refused(String),
}

/// An object read back from the outbox.
struct Object {
    sop_class: String,
    /// The data set, in the transfer syntax the destination accepted.
    data: Vec<u8>,
}

fn read_object(entry: &Entry, transfer_syntax: &str) -> Result<Object, String> {
    let bytes = std::fs::read(&entry.path)
        .map_err(|e| format!("cannot read {}: {e}", entry.path.display()))?;
    let body = bytes.get(128..).ok_or("a result file is too short")?;
    let obj = OpenFileOptions::new()
        .from_reader(body)
        .map_err(|e| format!("a result file cannot be parsed: {e}"))?;
    let sop_class = obj
        .get(tags::SOP_CLASS_UID)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches('\0').to_string())
        .ok_or("a result has no SOP Class UID")?;
    let ts = TransferSyntaxRegistry
        .get(transfer_syntax)
        .ok_or("the accepted transfer syntax is unknown")?;
    let mut data = Vec::with_capacity(bytes.len());
    obj.write_dataset_with_ts(&mut data, ts)
        .map_err(|e| format!("a result cannot be encoded: {e}"))?;
    Ok(Object { sop_class, data })
}

fn sop_class_of(entry: &Entry) -> Result<String, String> {
    let bytes = std::fs::read(&entry.path)
        .map_err(|e| format!("cannot read {}: {e}", entry.path.display()))?;
    let obj = OpenFileOptions::new()
        .read_until(tags::SOP_CLASS_UID)
        .from_reader(bytes.get(128..).ok_or("a result file is too short")?)
        .map_err(|e| format!("a result file cannot be parsed: {e}"))?;
    Ok(obj
        .meta()
        .media_storage_sop_class_uid()
        .trim_end_matches('\0')
        .to_string())
}

/// Sends `entries` (one job's) to the destination on one association.
pub async fn deliver(node: &Node, entries: &[Entry]) -> Delivered {
    let dest = &node.settings.destination;
    let mut classes: Vec<String> = Vec::new();
    for entry in entries {
        match sop_class_of(entry) {
            Ok(c) if !classes.contains(&c) => classes.push(c),
            Ok(_) => {}
            Err(e) => return Delivered::Failed(e),
        }
    }
    let mut options = ClientAssociationOptions::new()
        .calling_ae_title(node.settings.ae_titles[0].clone())
        .called_ae_title(dest.ae_title.clone())
        .max_pdu_length(node.settings.max_pdu)
        .read_timeout(STEP_TIMEOUT)
        .write_timeout(STEP_TIMEOUT)
        .connection_timeout(Duration::from_secs(10));
    for class in &classes {
        options = options.with_presentation_context(
            class.clone(),
            vec![EXPLICIT_LE.to_string(), IMPLICIT_LE.to_string()],
        );
    }
    let tls = match node.destination_tls() {
        Ok(tls) => tls,
        Err(e) => return Delivered::Failed(e),
    };
    match &tls {
        None => match options.establish_async(dest.address.as_str()).await {
            Ok(assoc) => send_all(assoc, node, entries).await,
            Err(e) => Delivered::Failed(format!("cannot associate with {}: {e}", dest.ae_title)),
        },
        Some(tls) => {
            let options = options.tls_config(tls.clone()).server_name(&dest.host);
            match options.establish_tls_async(dest.address.as_str()).await {
                Ok(assoc) => send_all(assoc, node, entries).await,
                Err(e) => Delivered::Failed(format!(
                    "cannot associate with {} over TLS: {e}",
                    dest.ae_title
                )),
            }
        }
    }
}

async fn send_all<S>(
    mut assoc: dicom_ul::association::AsyncClientAssociation<S>,
    node: &Node,
    entries: &[Entry],
) -> Delivered
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
{
    let contexts = assoc.presentation_contexts().to_vec();
    let mut outcome = Delivered::All;
    for (i, entry) in entries.iter().enumerate() {
        let class = match sop_class_of(entry) {
            Ok(c) => c,
            Err(e) => {
                outcome = Delivered::Failed(e);
                break;
            }
        };
        let Some(pc) = contexts.iter().find(|pc| {
            pc.abstract_syntax.trim_end_matches('\0') == class
                && pc.reason == PresentationContextResultReason::Acceptance
        }) else {
            metrics::dicom_delivery("refused");
            outcome = Delivered::Refused(format!(
                "{} accepts no presentation context for SOP class {class}",
                node.settings.destination.ae_title
            ));
            continue;
        };
        let object = match read_object(entry, pc.transfer_syntax.trim_end_matches('\0')) {
            Ok(o) => o,
            Err(e) => {
                outcome = Delivered::Failed(e);
                break;
            }
        };
        let message_id = (i % 0xFFFF) as u16 + 1;
        let command = dimse::store_request(message_id, &object.sop_class, &entry.sop_instance);
        let sent = async {
            assoc
                .send(&Pdu::PData {
                    data: vec![PDataValue {
                        presentation_context_id: pc.id,
                        value_type: PDataValueType::Command,
                        is_last: true,
                        data: command,
                    }],
                })
                .await
                .map_err(|e| e.to_string())?;
            let mut writer = assoc.send_pdata(pc.id);
            writer
                .write_all(&object.data)
                .await
                .map_err(|e| e.to_string())?;
            writer.finish().await.map_err(|e| e.to_string())?;
            match assoc.receive().await.map_err(|e| e.to_string())? {
                Pdu::PData { data } => {
                    let bytes: Vec<u8> = data
                        .into_iter()
                        .filter(|v| v.value_type == PDataValueType::Command)
                        .flat_map(|v| v.data)
                        .collect();
                    Command::parse(&bytes)
                }
                other => Err(format!(
                    "the destination answered {}",
                    other.short_description()
                )),
            }
        };
        match tokio::time::timeout(STEP_TIMEOUT * 2, sent).await {
            Err(_) => {
                outcome =
                    Delivered::Failed("the destination did not answer a C-STORE in time".into());
                break;
            }
            Ok(Err(e)) => {
                outcome = Delivered::Failed(format!("C-STORE failed: {e}"));
                break;
            }
            Ok(Ok(rsp))
                if rsp.field != dimse::C_STORE_RSP
                    || rsp.responded_to != message_id
                    || (!rsp.affected_sop_instance.is_empty()
                        && rsp.affected_sop_instance != entry.sop_instance) =>
            {
                outcome = Delivered::Failed(
                    "the destination's response does not answer the C-STORE sent".into(),
                );
                break;
            }
            Ok(Ok(rsp)) => {
                let status = rsp.status.unwrap_or(0xFFFF);
                if dimse::status::stored(status) {
                    if let Err(e) = node.outbox.delivered(entry) {
                        tracing::error!(error = %e, "the outbox ledger cannot be written");
                        outcome = Delivered::Failed(format!("the ledger cannot be written: {e}"));
                        break;
                    }
                    metrics::dicom_delivery("delivered");
                } else {
                    metrics::dicom_delivery("refused");
                    outcome = Delivered::Refused(format!(
                        "{} answered status {status:04X} for a result",
                        node.settings.destination.ae_title
                    ));
                }
            }
        }
    }
    if matches!(outcome, Delivered::Failed(_)) {
        let _ = assoc.abort().await;
    } else {
        let _ = assoc.release().await;
    }
    outcome
}

/// The delivery loop: the oldest job first. When the destination cannot be reached, every job
/// waits 1 s, 2 s, 4 s… up to --dicom-retry-max-s; when it refuses an object of a job, only that
/// job waits so, and the others go on.
pub async fn run(node: Arc<Node>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let backoff = |failures: u32| {
        Duration::from_secs(1u64 << failures.saturating_sub(1).min(20)).min(node.settings.retry_max)
    };
    let mut failures: u32 = 0;
    let mut not_before = Instant::now();
    // Jobs an object of which the destination refused: (refusals, not before).
    let mut refused: HashMap<String, (u32, Instant)> = HashMap::new();
    loop {
        node.outbox.export();
        if *stop.borrow() {
            return;
        }
        let now = Instant::now();
        let wait = not_before.saturating_duration_since(now);
        let next = if wait > Duration::ZERO {
            None
        } else {
            node.outbox
                .next_job_where(|job| refused.get(job).is_none_or(|(_, t)| *t <= now))
        };
        let Some((job, entries)) = next else {
            tokio::select! {
                _ = node.outbox.changed.notified() => {}
                _ = tokio::time::sleep(wait.clamp(Duration::from_millis(100), Duration::from_secs(1))) => {}
                _ = stop.changed() => {}
            }
            continue;
        };
        if entries.is_empty() {
            // Delivered: the instances go first, then the job's outbox directory (its presence
            // is what says the job was processed).
            node.spool.remove(&job);
            node.outbox.finish_job(&job);
            refused.remove(&job);
            continue;
        }
        let started = Instant::now();
        let span = tracing::info_span!("dicom.delivery", job = %job, objects = entries.len());
        let outcome = deliver(&node, &entries).instrument(span).await;
        let label = match &outcome {
            Delivered::All => "delivered",
            Delivered::Failed(_) => "failed",
            Delivered::Refused(_) => "refused",
        };
        node.audit_delivery(&entries, label, started);
        match outcome {
            Delivered::All => {
                failures = 0;
                refused.remove(&job);
            }
            Delivered::Failed(e) => {
                metrics::dicom_delivery("failed");
                failures = failures.saturating_add(1);
                let wait = backoff(failures);
                tracing::warn!(error = %e, retry_in_s = wait.as_secs(), "delivery to {} failed", describe(&node.settings.destination));
                not_before = Instant::now() + wait;
            }
            Delivered::Refused(e) => {
                failures = 0;
                let n = refused.get(&job).map_or(1, |(n, _)| n + 1);
                let wait = backoff(n);
                tracing::warn!(error = %e, retry_in_s = wait.as_secs(), "{} refused a result; the job waits, the others go on", describe(&node.settings.destination));
                refused.insert(job, (n, Instant::now() + wait));
            }
        }
    }
}

/// The destination, for messages.
pub fn describe(dest: &Destination) -> String {
    format!("{}@{}", dest.ae_title, dest.address)
}
