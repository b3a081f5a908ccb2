//! One association as the acceptor: C-ECHO and C-STORE into the spool.
//!
//! [`Session::run`] is the node's own protocol handling on top of dicom-ul (which parses the
//! PDUs and negotiates the association): command sets, the data set of each C-STORE streamed to
//! the spool, the responses, release and abort. It talks to a [`Link`], so the fuzz target can
//! drive it with PDUs it makes up.

use std::future::Future;
use std::sync::Arc;

use dicom_dictionary_std::tags;
use dicom_object::{FileMetaTableBuilder, OpenFileOptions, file::ReadPreamble};
use dicom_ul::Pdu;
use dicom_ul::pdu::{
    PDataValue, PDataValueType, PresentationContextNegotiated, PresentationContextResultReason,
};

use super::dimse::{self, Command, status};
use super::spool::{Incoming, InstanceIds, Spool, SpoolError};
use crate::metrics;
use crate::security::audit::DicomRef;

/// Largest command set the node reads (real ones are under 200 bytes).
const MAX_COMMAND_BYTES: usize = 16 << 10;

/// The PDU transport of an established association.
pub trait Link: Send {
    fn receive(&mut self) -> impl Future<Output = Result<Pdu, String>> + Send;
    fn send(&mut self, pdu: &Pdu) -> impl Future<Output = Result<(), String>> + Send;
}

impl<S> Link for dicom_ul::association::AsyncServerAssociation<S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
{
    async fn receive(&mut self) -> Result<Pdu, String> {
        dicom_ul::association::AsyncServerAssociation::receive(self)
            .await
            .map_err(|e| e.to_string())
    }
    async fn send(&mut self, pdu: &Pdu) -> Result<(), String> {
        dicom_ul::association::AsyncServerAssociation::send(self, pdu)
            .await
            .map_err(|e| e.to_string())
    }
}

/// How an association ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    Released,
    /// Aborted by the peer, cut, timed out, or aborted by the node for a protocol error (the
    /// reason, never caller text).
    Aborted(String),
}

/// What the association did, for its audit record and metrics.
#[derive(Debug, Default)]
pub struct Tally {
    pub echoes: u64,
    pub stored: Vec<DicomRef>,
    pub refused: u64,
}

/// One association's protocol state.
pub struct Session {
    pub id: u64,
    pub called: String,
    pub calling: String,
    pub contexts: Vec<PresentationContextNegotiated>,
    pub spool: Arc<Spool>,
    /// Largest instance taken (`--max-image-bytes`); larger: A700.
    pub max_instance_bytes: u64,
    /// Draining: new C-STOREs are refused (A700) so the sender retries elsewhere.
    pub draining: Box<dyn Fn() -> bool + Send + Sync>,
    pub tally: Tally,
}

/// Where the data set of the C-STORE in progress goes.
enum Sink {
    File(Incoming),
    /// Refused: the rest of the data set is read and dropped, then the status is answered.
    Drop {
        status: u16,
        comment: String,
    },
}

struct Pending {
    command: Command,
    context: u8,
    sink: Sink,
}

impl Session {
    /// Serves the association until it is released or aborted.
    pub async fn run<L: Link>(&mut self, link: &mut L) -> End {
        let mut command = Vec::new();
        let mut pending: Option<Pending> = None;
        loop {
            let pdu = match link.receive().await {
                Ok(pdu) => pdu,
                Err(e) => {
                    // Idle past --dicom-idle-s, or the connection broke: an A-ABORT if it can
                    // still be sent.
                    let _ = link.send(&abort_pdu(false)).await;
                    return End::Aborted(format!(
                        "connection lost or idle: {}",
                        super::config::bounded(&e)
                    ));
                }
            };
            let values = match pdu {
                Pdu::PData { data } => data,
                Pdu::ReleaseRQ => {
                    if pending.is_some() {
                        return self
                            .abort(link, "release requested in the middle of a C-STORE")
                            .await;
                    }
                    // What was stored is durable before the sender is told the release is done.
                    let spool = self.spool.clone();
                    let id = self.id;
                    let synced =
                        tokio::task::spawn_blocking(move || spool.sync_association(id)).await;
                    if !matches!(synced, Ok(Ok(()))) {
                        tracing::error!("the spool cannot be synced; the association is aborted");
                        let _ = link.send(&abort_pdu(false)).await;
                        return End::Aborted(
                            "the received instances could not be made durable".into(),
                        );
                    }
                    let _ = link.send(&Pdu::ReleaseRP).await;
                    return End::Released;
                }
                Pdu::AbortRQ { .. } => return End::Aborted("aborted by the peer".into()),
                _ => {
                    return self
                        .abort(link, "unexpected PDU type during the association")
                        .await;
                }
            };
            for value in values {
                let step = match value.value_type {
                    PDataValueType::Command => {
                        if pending.is_some() {
                            Err("a command arrived before the previous C-STORE's data set ended")
                        } else if command.len() + value.data.len() > MAX_COMMAND_BYTES {
                            Err("the command set is over 16 KiB")
                        } else {
                            command.extend_from_slice(&value.data);
                            if value.is_last {
                                let bytes = std::mem::take(&mut command);
                                self.command(link, &bytes, value.presentation_context_id)
                                    .await
                            } else {
                                Ok(None)
                            }
                        }
                    }
                    PDataValueType::Data => match pending.as_mut() {
                        None => Err("a data set arrived without a command"),
                        Some(p) if p.context != value.presentation_context_id => Err(
                            "a data set arrived on another presentation context than its command",
                        ),
                        Some(p) => {
                            if let Sink::File(file) = &mut p.sink
                                && file.bytes() + value.data.len() as u64 > self.max_instance_bytes
                            {
                                // Read whole later (its header now, its pixels by its job): one
                                // instance may be no larger than an API call's image.
                                p.sink = Sink::Drop {
                                    status: status::OUT_OF_RESOURCES,
                                    comment: "the instance is larger than --max-image-bytes".into(),
                                };
                            }
                            if let Sink::File(file) = &mut p.sink
                                && let Err(e) = file.write(&value.data)
                            {
                                let (status, comment) = match e {
                                    SpoolError::Full => {
                                        (status::OUT_OF_RESOURCES, "the spool is full".to_string())
                                    }
                                    SpoolError::Io(e) => {
                                        tracing::error!(error = %e, "spool write failed");
                                        (
                                            status::OUT_OF_RESOURCES,
                                            "the spool cannot be written".to_string(),
                                        )
                                    }
                                };
                                p.sink = Sink::Drop { status, comment };
                            }
                            if value.is_last {
                                let p = pending.take().expect("matched Some");
                                self.finish_store(link, p).await.map(|()| None)
                            } else {
                                Ok(None)
                            }
                        }
                    },
                };
                match step {
                    Ok(Some(next)) => pending = Some(next),
                    Ok(None) => {}
                    Err(reason) => return self.abort(link, reason).await,
                }
            }
        }
    }

    /// A protocol error: A-ABORT (service provider, unexpected PDU).
    async fn abort<L: Link>(&mut self, link: &mut L, reason: &str) -> End {
        let _ = link.send(&abort_pdu(true)).await;
        End::Aborted(reason.to_string())
    }

    async fn reply<L: Link>(
        &mut self,
        link: &mut L,
        context: u8,
        bytes: Vec<u8>,
    ) -> Result<(), &'static str> {
        link.send(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: context,
                value_type: PDataValueType::Command,
                is_last: true,
                data: bytes,
            }],
        })
        .await
        .map_err(|_| "the response could not be sent")
    }

    /// A complete command set: answers C-ECHO, or opens a C-STORE's data set.
    async fn command<L: Link>(
        &mut self,
        link: &mut L,
        bytes: &[u8],
        context: u8,
    ) -> Result<Option<Pending>, &'static str> {
        let command = Command::parse(bytes).map_err(|_| "a command set could not be read")?;
        let Some(pc) = self
            .contexts
            .iter()
            .find(|pc| pc.id == context && pc.reason == PresentationContextResultReason::Acceptance)
            .cloned()
        else {
            return Err("a command on a presentation context that was not accepted");
        };
        match command.field {
            dimse::C_ECHO_RQ
                if pc.abstract_syntax.trim_end_matches('\0') == super::VERIFICATION =>
            {
                self.tally.echoes += 1;
                metrics::dicom_echo();
                self.reply(link, context, dimse::echo_response(&command))
                    .await?;
                Ok(None)
            }
            dimse::C_STORE_RQ => {
                let refuse = |status, comment: &str| Sink::Drop {
                    status,
                    comment: comment.to_string(),
                };
                let storage = super::STORAGE_SOP_CLASSES
                    .iter()
                    .any(|(uid, _)| *uid == command.affected_sop_class);
                let sink = if !storage
                    || command.affected_sop_class != pc.abstract_syntax.trim_end_matches('\0')
                {
                    refuse(
                        status::SOP_CLASS_NOT_SUPPORTED,
                        "the SOP class differs from the presentation context's",
                    )
                } else if !dimse::valid_uid(&command.affected_sop_instance) {
                    refuse(
                        status::CANNOT_UNDERSTAND,
                        "the Affected SOP Instance UID is not a UID",
                    )
                } else if (self.draining)() {
                    refuse(
                        status::OUT_OF_RESOURCES,
                        "the node is shutting down; send again later",
                    )
                } else {
                    match part10_header(&command, pc.transfer_syntax.trim_end_matches('\0')) {
                        Err(comment) => refuse(status::CANNOT_UNDERSTAND, &comment),
                        Ok(header) => match self.spool.incoming(&header) {
                            Ok(file) => Sink::File(file),
                            Err(SpoolError::Full) => {
                                refuse(status::OUT_OF_RESOURCES, "the spool is full")
                            }
                            Err(SpoolError::Io(e)) => {
                                tracing::error!(error = %e, "spool write failed");
                                refuse(status::OUT_OF_RESOURCES, "the spool cannot be written")
                            }
                        },
                    }
                };
                if !command.has_data_set() {
                    return Err("a C-STORE without a data set");
                }
                Ok(Some(Pending {
                    command,
                    context,
                    sink,
                }))
            }
            // C-CANCEL-RQ has no response; there is nothing of the node's to cancel.
            dimse::C_CANCEL_RQ => Ok(None),
            field if field & 0x8000 != 0 => Err("a response command sent to the node"),
            _ => {
                if command.has_data_set() {
                    return Err("an unsupported command with a data set");
                }
                self.reply(link, context, dimse::unrecognized_response(&command))
                    .await?;
                Ok(None)
            }
        }
    }

    /// The data set is complete: file it (or refuse it) and answer.
    async fn finish_store<L: Link>(
        &mut self,
        link: &mut L,
        pending: Pending,
    ) -> Result<(), &'static str> {
        let Pending {
            command,
            context,
            sink,
        } = pending;
        let (status, comment) = match sink {
            Sink::Drop { status, comment } => (status, Some(comment)),
            Sink::File(file) => match self.file(file, &command).await {
                Ok(()) => (status::SUCCESS, None),
                Err((status, comment)) => (status, Some(comment)),
            },
        };
        // A700 is the status of a full spool, of a draining node and of an instance over
        // --max-image-bytes; only the first is `spool_full`.
        let spool = comment
            .as_deref()
            .is_some_and(|c| c.starts_with("the spool"));
        let outcome = if status == status::SUCCESS {
            "stored"
        } else if status == status::OUT_OF_RESOURCES && spool {
            "spool_full"
        } else {
            "refused"
        };
        if status != status::SUCCESS {
            self.tally.refused += 1;
        }
        metrics::dicom_instance(outcome);
        self.reply(
            link,
            context,
            dimse::store_response(&command, status, comment.as_deref()),
        )
        .await
    }

    /// Reads the instance's identifiers from its header and files it into its study's job.
    async fn file(&mut self, file: Incoming, command: &Command) -> Result<(), (u16, String)> {
        let path = file.path().to_path_buf();
        // A deflated data set may inflate to no more than the spool would hold.
        let limits = crate::input::InputLimits {
            max_image_bytes: usize::try_from(self.spool.cap()).unwrap_or(usize::MAX),
            max_pixels: 1 << 32,
        };
        let header = tokio::task::spawn_blocking(move || {
            // dicom-rs allocates (and zero-fills) each element's declared length before reading
            // it: a data set of a few bytes declaring 4 GB would cost 4 GB. The structural
            // pre-scan of the files the API takes refuses every length past the end first. The
            // instance is read whole, as its job reads it later; the spool's cap bounds it.
            let bytes = std::fs::read(&path)
                .map_err(|_| "the received data set could not be read".to_string())?;
            let body = crate::input::dicom::prescan(&bytes, &limits)
                .map_err(|_| "the data set could not be parsed".to_string())?;
            OpenFileOptions::new()
                .read_preamble(ReadPreamble::Never)
                .read_until(tags::PIXEL_DATA)
                .from_reader(body)
                .map_err(|_| "the data set could not be parsed".to_string())
                .map(|obj| {
                    let text = |tag| {
                        obj.get(tag)
                            .and_then(|e| e.to_str().ok())
                            .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
                            .unwrap_or_default()
                    };
                    (
                        text(tags::SOP_CLASS_UID),
                        InstanceIds {
                            study: text(tags::STUDY_INSTANCE_UID),
                            series: text(tags::SERIES_INSTANCE_UID),
                            sop_instance: text(tags::SOP_INSTANCE_UID),
                        },
                    )
                })
        })
        .await
        .map_err(|_| {
            (
                status::PROCESSING_FAILURE,
                "the header could not be read".to_string(),
            )
        })?
        .map_err(|e| (status::CANNOT_UNDERSTAND, e))?;
        let (sop_class, ids) = header;
        if sop_class != command.affected_sop_class {
            return Err((
                status::DATA_SET_MISMATCH,
                "the data set's SOP Class UID differs from the command's".into(),
            ));
        }
        if ids.sop_instance != command.affected_sop_instance {
            return Err((
                status::CANNOT_UNDERSTAND,
                "the data set's SOP Instance UID differs from the command's".into(),
            ));
        }
        if !dimse::valid_uid(&ids.study) || !dimse::valid_uid(&ids.series) {
            return Err((
                status::CANNOT_UNDERSTAND,
                "the Study or Series Instance UID is missing or invalid".into(),
            ));
        }
        match self
            .spool
            .commit(file, self.id, &self.called, &self.calling, &ids)
        {
            Ok(()) => {
                self.tally.stored.push(DicomRef {
                    study: ids.study,
                    series: ids.series,
                    sop_instance: ids.sop_instance,
                });
                Ok(())
            }
            Err(SpoolError::Full) => Err((status::OUT_OF_RESOURCES, "the spool is full".into())),
            Err(SpoolError::Io(e)) => {
                tracing::error!(error = %e, "spool write failed");
                Err((
                    status::OUT_OF_RESOURCES,
                    "the spool cannot be written".into(),
                ))
            }
        }
    }
}

/// An A-ABORT: from the service provider for a protocol error (unexpected PDU), else from the
/// service user (the node itself gives up: idle, a spool it cannot sync).
fn abort_pdu(protocol_error: bool) -> Pdu {
    Pdu::AbortRQ {
        source: if protocol_error {
            dicom_ul::pdu::AbortRQSource::ServiceProvider(
                dicom_ul::pdu::AbortRQServiceProviderReason::UnexpectedPdu,
            )
        } else {
            dicom_ul::pdu::AbortRQSource::ServiceUser
        },
    }
}

/// The preamble and File Meta Information that make the received data set a Part 10 file.
fn part10_header(command: &Command, transfer_syntax: &str) -> Result<Vec<u8>, String> {
    let meta = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(command.affected_sop_class.as_str())
        .media_storage_sop_instance_uid(command.affected_sop_instance.as_str())
        .transfer_syntax(transfer_syntax)
        .build()
        .map_err(|_| "the file meta information could not be made".to_string())?;
    let mut out = vec![0u8; 128];
    out.extend_from_slice(b"DICM");
    meta.write(&mut out)
        .map_err(|_| "the file meta information could not be written".to_string())?;
    Ok(out)
}
