//! The DICOM node (`--dicom-addr`): a PACS sends studies by C-STORE to this service's AE title;
//! the node spools them, processes each study once it is stable through the one pipeline, and
//! sends the results (classification SR; SEG and measurement report) back by C-STORE from a
//! durable outbox.
//!
//! - [`config`]: flags, AE titles, who may send, routes, destination.
//! - [`scp`]: one association as the acceptor (dicom-ul negotiates; the node handles C-ECHO and
//!   C-STORE, streaming each data set to the spool).
//! - [`spool`]: received instances on disk, bounded, grouped into study jobs.
//! - [`jobs`]: stable studies through the pipeline, by the routes.
//! - [`outbox`], [`deliver`]: results on disk until the destination takes them; a ledger of what
//!   was delivered, so a restart never sends anything twice.

pub mod config;
pub mod deliver;
pub mod dimse;
pub mod jobs;
pub mod outbox;
pub mod scp;
pub mod spool;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use dicom_ul::Pdu;
use dicom_ul::association::server::{AccessControl, ServerAssociationOptions};
use dicom_ul::pdu::{
    AssociationRJ, AssociationRJResult, AssociationRJServiceProviderPresentationReason,
    AssociationRJServiceUserReason, AssociationRJSource, UserIdentity,
};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

pub use config::{NodeArgs, NodeSettings};

use crate::metrics;
use crate::pipeline::Pipeline;
use crate::security::audit::{self, Audit, CallFacts, DicomRef, Record};
use crate::security::tls::Tls;
use crate::state::Phase;

/// Verification SOP Class.
pub const VERIFICATION: &str = "1.2.840.10008.1.1";

/// The storage SOP classes the node accepts: the image objects its decoders read.
pub const STORAGE_SOP_CLASSES: &[(&str, &str)] = &[
    ("1.2.840.10008.5.1.4.1.1.4", "MR Image Storage"),
    ("1.2.840.10008.5.1.4.1.1.4.1", "Enhanced MR Image Storage"),
    ("1.2.840.10008.5.1.4.1.1.2", "CT Image Storage"),
    ("1.2.840.10008.5.1.4.1.1.2.1", "Enhanced CT Image Storage"),
    (
        "1.2.840.10008.5.1.4.1.1.7",
        "Secondary Capture Image Storage",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.7.2",
        "Multi-frame Grayscale Byte Secondary Capture Image Storage",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.7.3",
        "Multi-frame Grayscale Word Secondary Capture Image Storage",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.7.4",
        "Multi-frame True Color Secondary Capture Image Storage",
    ),
];

/// The node, shared by its tasks.
pub struct Node {
    pub settings: NodeSettings,
    pub spool: Arc<spool::Spool>,
    pub outbox: Arc<outbox::Outbox>,
    pub pipeline: Pipeline,
    /// Largest instance a C-STORE may carry (`--max-image-bytes`).
    max_instance_bytes: u64,
    audit: Option<Arc<Audit>>,
    tls: Option<Arc<Tls>>,
    /// The server's certificate: presented to the destination over DICOM TLS.
    identity: Option<Arc<Tls>>,
    next_association: AtomicU64,
    /// Open associations, and per peer address.
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// A started node.
pub struct RunningNode {
    pub addr: SocketAddr,
    pub node: Arc<Node>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningNode {
    /// New associations are refused from now on (A-ASSOCIATE-RJ, transient); open ones go on.
    pub fn begin_drain(&self) {
        let _ = self.stop.send(true);
    }

    /// Stops the listener and the loops (what is on disk stays for the next start).
    pub async fn close(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            task.abort();
            let _ = task.await;
        }
    }
}

/// Opens the spool and the outbox, binds the listener and starts the node's loops.
pub async fn start(
    settings: NodeSettings,
    pipeline: Pipeline,
    max_instance_bytes: u64,
    security: &crate::security::Security,
) -> Result<RunningNode, String> {
    let spool = spool::Spool::open(&settings.spool_dir, settings.spool_max_bytes)?;
    let outbox = Arc::new(outbox::Outbox::open(
        &settings.outbox_dir,
        settings.outbox_max_bytes,
    )?);
    for job in outbox.job_ids() {
        if !spool.mark_delivering(&job) {
            tracing::warn!(
                job,
                "outbox: results whose instances are gone; delivering them anyway"
            );
        }
    }
    let tls = if settings.tls {
        Some(
            security
                .tls
                .clone()
                .ok_or("--dicom-tls needs --tls-cert and --tls-key")?,
        )
    } else {
        None
    };
    // Checked now (a wrong CA or certificate stops the start), built again for each delivery so
    // a renewed certificate is used without a restart.
    destination_tls(&settings, security.tls.as_ref())?;
    if settings.allowed.is_empty() {
        tracing::warn!(
            "--dicom-allow is empty: any calling AE title may send studies to the DICOM node"
        );
    }
    metrics::insecure_config("dicom_any_caller", settings.allowed.is_empty());
    let listener = TcpListener::bind(settings.addr)
        .await
        .map_err(|e| format!("cannot listen on {} (--dicom-addr): {e}", settings.addr))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let node = Arc::new(Node {
        settings,
        spool,
        outbox,
        pipeline,
        max_instance_bytes,
        audit: security.audit.clone(),
        tls,
        identity: security.tls.clone(),
        next_association: AtomicU64::new(1),
        open: Mutex::new((0, HashMap::new())),
    });
    metrics::dicom_associations_active(0);
    metrics::dicom_known();
    let (stop, stop_rx) = watch::channel(false);
    let tasks = vec![
        tokio::spawn(accept(node.clone(), listener, stop_rx.clone())),
        tokio::spawn(jobs::run(node.clone(), stop_rx.clone())),
        tokio::spawn(deliver::run(node.clone(), stop_rx)),
    ];
    tracing::info!(dicom_addr = %addr, ae_titles = ?node.settings.ae_titles, "DICOM node listening");
    Ok(RunningNode {
        addr,
        node,
        stop,
        tasks,
    })
}

/// The TLS client configuration for deliveries (`None`: plain TCP).
fn destination_tls(
    settings: &NodeSettings,
    identity: Option<&Arc<Tls>>,
) -> Result<Option<Arc<rustls::ClientConfig>>, String> {
    if !settings.destination_tls {
        return Ok(None);
    }
    let ca = settings
        .destination_ca
        .as_deref()
        .ok_or("--dicom-destination-tls needs --dicom-destination-ca")?;
    Ok(Some(match identity {
        Some(tls) => tls.client_config(ca)?,
        None => crate::security::tls::client_config(ca, None)?,
    }))
}

async fn accept(node: Arc<Node>, listener: TcpListener, stop: watch::Receiver<bool>) {
    loop {
        let (socket, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "DICOM listener: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = socket.set_nodelay(true);
        let node = node.clone();
        let draining = *stop.borrow() || node.pipeline.state().phase() == Phase::Draining;
        let span = tracing::info_span!("dicom.association", peer = %peer.ip());
        tokio::spawn(
            async move { node.association(socket, peer, draining).await }.instrument(span),
        );
    }
}

/// Releases an association's place in the counts when it ends.
struct Place<'a> {
    node: &'a Node,
    peer: IpAddr,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        let mut open = self.node.open.lock().expect("association counts lock");
        open.0 -= 1;
        if let Some(n) = open.1.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&self.peer);
            }
        }
        metrics::dicom_associations_active(open.0);
    }
}

/// The access decision dicom-ul asks for: the called AE title is one of the node's, and the
/// calling AE title is allowed from this peer's address.
struct Access<'a> {
    node: &'a Node,
    peer: IpAddr,
    refused: Arc<Mutex<Option<&'static str>>>,
    calling: Arc<Mutex<String>>,
}

impl AccessControl for Access<'_> {
    fn check_access(
        &self,
        _this: &str,
        calling: &str,
        called: &str,
        _identity: Option<&UserIdentity>,
    ) -> Result<(), AssociationRJServiceUserReason> {
        *self.calling.lock().expect("calling lock") = config::bounded(calling.trim());
        let refuse = |why, reason| {
            *self.refused.lock().expect("refused lock") = Some(why);
            Err(reason)
        };
        if !self
            .node
            .settings
            .ae_titles
            .iter()
            .any(|t| t == called.trim())
        {
            return refuse(
                "called AE title not recognized",
                AssociationRJServiceUserReason::CalledAETitleNotRecognized,
            );
        }
        let allowed = &self.node.settings.allowed;
        if !allowed.is_empty() && !allowed.iter().any(|a| a.admits(calling.trim(), self.peer)) {
            return refuse(
                "calling AE title not allowed from this address",
                AssociationRJServiceUserReason::CallingAETitleNotRecognized,
            );
        }
        Ok(())
    }
}

impl Node {
    fn options<'a>(
        &'a self,
        access: Access<'a>,
    ) -> ServerAssociationOptions<'a, Access<'a>, dicom_ul::association::server::DefaultNegotiation>
    {
        let mut options = ServerAssociationOptions::new()
            .ae_access_control(access)
            .ae_title(self.settings.ae_titles[0].clone())
            .max_pdu_length(self.settings.max_pdu)
            // PDUs over the announced maximum are refused, not buffered.
            .strict(true)
            .read_timeout(self.settings.idle)
            .write_timeout(self.settings.idle)
            .with_abstract_syntax(VERIFICATION);
        for (uid, _) in STORAGE_SOP_CLASSES {
            options = options.with_abstract_syntax(*uid);
        }
        for (uid, _) in crate::input::dicom::SUPPORTED_TRANSFER_SYNTAXES {
            options = options.with_transfer_syntax(*uid);
        }
        if let Some(tls) = &self.tls {
            options = options.tls_config(tls.dicom_config());
        }
        options
    }

    /// The TLS client configuration for a delivery, from the files as they are now.
    pub fn destination_tls(&self) -> Result<Option<Arc<rustls::ClientConfig>>, String> {
        destination_tls(&self.settings, self.identity.as_ref())
    }

    /// Whether the audit trail refuses (--audit-fail-closed and the last write failed).
    pub fn audit_refusing(&self) -> bool {
        self.audit.as_ref().is_some_and(|a| a.refusing())
    }

    /// Takes a place within the association limits, or says which limit is reached.
    fn place(&self, peer: IpAddr) -> Result<Place<'_>, &'static str> {
        let mut open = self.open.lock().expect("association counts lock");
        if open.0 >= self.settings.max_associations {
            return Err("the node's association limit is reached");
        }
        let per_peer = open.1.get(&peer).copied().unwrap_or(0);
        if per_peer >= self.settings.max_per_peer {
            return Err("this address's association limit is reached");
        }
        open.0 += 1;
        *open.1.entry(peer).or_insert(0) += 1;
        metrics::dicom_associations_active(open.0);
        Ok(Place { node: self, peer })
    }

    /// One connection, from the A-ASSOCIATE-RQ to the release or abort.
    async fn association(self: Arc<Self>, socket: TcpStream, peer: SocketAddr, draining: bool) {
        let started = Instant::now();
        let id = self.next_association.fetch_add(1, Ordering::SeqCst);
        let ip = peer.ip();
        let place = if draining {
            Err("the node is shutting down")
        } else if self.audit_refusing() {
            // --audit-fail-closed: what cannot be recorded is not received.
            Err("the audit trail cannot be written (--audit-fail-closed)")
        } else {
            self.place(ip)
        };
        let _place = match place {
            Ok(place) => place,
            Err(why) => {
                let outcome = if draining { "draining" } else { "limited" };
                metrics::dicom_association(outcome);
                let calling = self.reject_transient(socket).await;
                self.audit_association(
                    &calling,
                    ip,
                    &format!("rejected: {why}"),
                    &scp::Tally::default(),
                    started,
                );
                return;
            }
        };
        // The drain waits for open associations as for calls.
        let _inflight = self.pipeline.state().inflight().enter();
        let refused = Arc::new(Mutex::new(None));
        let calling = Arc::new(Mutex::new(String::new()));
        let access = Access {
            node: &self,
            peer: ip,
            refused: refused.clone(),
            calling: calling.clone(),
        };
        let options = self.options(access);
        let artim = self.settings.artim;
        let (end, tally) = if self.tls.is_some() {
            let established =
                tokio::time::timeout(artim, options.establish_tls_async(socket)).await;
            self.serve(
                id,
                established,
                "no TLS handshake and A-ASSOCIATE-RQ within --dicom-artim-s",
            )
            .await
        } else {
            let established = tokio::time::timeout(artim, options.establish_async(socket)).await;
            self.serve(id, established, "no A-ASSOCIATE-RQ within --dicom-artim-s")
                .await
        };
        let calling = calling.lock().expect("calling lock").clone();
        let outcome = match end {
            Ok(scp::End::Released) => {
                self.spool.association_ended(id, true);
                "released".to_string()
            }
            Ok(scp::End::Aborted(reason)) => {
                let removed = self.spool.association_ended(id, false);
                for _ in 0..removed {
                    metrics::dicom_instance("discarded");
                }
                format!("aborted: {reason}")
            }
            Err(error) => {
                let why = *refused.lock().expect("refused lock");
                match why {
                    Some(why) => {
                        metrics::dicom_association("rejected");
                        format!("rejected: {why}")
                    }
                    None => {
                        metrics::dicom_association("failed");
                        tracing::debug!(peer = %ip, error = %config::bounded(&error), "DICOM association not established");
                        "failed: the association could not be established".to_string()
                    }
                }
            }
        };
        self.audit_association(&calling, ip, &outcome, &tally, started);
        if self.settings.trigger == config::Trigger::Association {
            tracing::debug!(association = id, "association ended; its studies are ready");
        }
    }

    /// Runs the session of an association dicom-ul established (within ARTIM), or says why there
    /// is none.
    async fn serve<S>(
        self: &Arc<Self>,
        id: u64,
        established: Result<
            Result<dicom_ul::association::AsyncServerAssociation<S>, dicom_ul::association::Error>,
            tokio::time::error::Elapsed,
        >,
        late: &str,
    ) -> (Result<scp::End, String>, scp::Tally)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
    {
        match established {
            Ok(Ok(mut assoc)) => {
                let mut session = self.session(
                    id,
                    assoc.called_ae_title(),
                    dicom_ul::association::Association::peer_ae_title(&assoc),
                    assoc.presentation_contexts(),
                );
                metrics::dicom_association("accepted");
                let end = session.run(&mut assoc).await;
                (Ok(end), session.tally)
            }
            Ok(Err(e)) => (Err(e.to_string()), scp::Tally::default()),
            Err(_) => (Err(late.to_string()), scp::Tally::default()),
        }
    }

    fn session(
        self: &Arc<Self>,
        id: u64,
        called: &str,
        calling: &str,
        contexts: &[dicom_ul::pdu::PresentationContextNegotiated],
    ) -> scp::Session {
        let node = self.clone();
        scp::Session {
            id,
            called: called.trim().to_string(),
            calling: calling.trim().to_string(),
            contexts: contexts.to_vec(),
            spool: self.spool.clone(),
            max_instance_bytes: self.max_instance_bytes,
            draining: Box::new(move || node.pipeline.state().phase() == Phase::Draining),
            tally: scp::Tally::default(),
        }
    }

    /// Reads the A-ASSOCIATE-RQ (within ARTIM) and answers A-ASSOCIATE-RJ, transient, local
    /// limit exceeded. Over TLS the connection is closed instead (the handshake would take the
    /// resources the limit protects). Returns the calling AE title, if one was read.
    async fn reject_transient(&self, mut socket: TcpStream) -> String {
        if self.tls.is_some() {
            return String::new();
        }
        let mut buffer = bytes::BytesMut::with_capacity(4096);
        let read = tokio::time::timeout(
            self.settings.artim,
            dicom_ul::association::read_pdu_from_wire_async(
                &mut socket,
                &mut buffer,
                self.settings.max_pdu,
                true,
            ),
        )
        .await;
        let calling = match read {
            Ok(Ok(Pdu::AssociationRQ(rq))) => config::bounded(rq.calling_ae_title.trim()),
            _ => return String::new(),
        };
        let rj = Pdu::AssociationRJ(AssociationRJ {
            result: AssociationRJResult::Transient,
            source: AssociationRJSource::ServiceProviderPresentation(
                AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
            ),
        });
        let mut out = Vec::new();
        if dicom_ul::pdu::write_pdu(&mut out, &rj).is_ok() {
            let _ = socket.write_all(&out).await;
            let _ = socket.shutdown().await;
        }
        calling
    }

    fn write_audit(
        &self,
        caller: &str,
        peer: Option<IpAddr>,
        method: &str,
        facts: &audit::Facts,
        outcome: &str,
        started: Instant,
    ) {
        let Some(audit) = &self.audit else { return };
        audit.write(&Record {
            time: audit::now_rfc3339(),
            caller,
            auth: if self.tls.as_ref().is_some_and(|t| t.mutual()) {
                "certificate+ae-title"
            } else {
                "ae-title"
            },
            peer: peer.map(|p| p.to_string()),
            front_end: "dicom",
            method,
            model: facts.model.as_ref(),
            images: facts.images,
            outcome: outcome.to_string(),
            latency_ms: started.elapsed().as_secs_f64() * 1e3,
            dicom: &facts.dicom,
            dicom_truncated: facts.dicom_truncated,
        });
    }

    fn audit_association(
        &self,
        calling: &str,
        peer: IpAddr,
        outcome: &str,
        tally: &scp::Tally,
        started: Instant,
    ) {
        let cap = audit::MAX_DICOM_REFS;
        let facts = audit::Facts {
            images: tally.stored.len() as u64,
            dicom: tally.stored.iter().take(cap).cloned().collect(),
            dicom_truncated: tally.stored.len() > cap,
            ..audit::Facts::default()
        };
        let caller = if calling.is_empty() {
            "unknown"
        } else {
            calling
        };
        self.write_audit(
            caller,
            Some(peer),
            "DICOM association",
            &facts,
            outcome,
            started,
        );
    }

    fn audit_job(
        &self,
        job: &spool::JobInfo,
        method: &str,
        facts: &CallFacts,
        outcome: &str,
        started: Instant,
    ) {
        let facts = facts.lock().expect("call facts lock");
        self.write_audit(&job.calling, None, method, &facts, outcome, started);
    }

    fn audit_delivery(&self, entries: &[outbox::Entry], outcome: &str, started: Instant) {
        let facts = audit::Facts {
            images: entries.len() as u64,
            dicom: entries
                .iter()
                .take(audit::MAX_DICOM_REFS)
                .map(|e| DicomRef {
                    study: String::new(),
                    series: String::new(),
                    sop_instance: e.sop_instance.clone(),
                })
                .collect(),
            dicom_truncated: entries.len() > audit::MAX_DICOM_REFS,
            ..audit::Facts::default()
        };
        let caller = self.settings.ae_titles[0].clone();
        let method = format!("DICOM delivery to {}", self.settings.destination.ae_title);
        self.write_audit(&caller, None, &method, &facts, outcome, started);
    }
}
