//! The DICOM node's flags and what they parse to: AE titles, who may send, the routes, the
//! destination.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::priority::Priority;

/// The DICOM node's flags of `brainai serve` (off unless --dicom-addr is set).
#[derive(Debug, Clone, Args)]
pub struct NodeArgs {
    /// DICOM listener (C-ECHO, C-STORE), e.g. 0.0.0.0:11112. Off by default.
    #[arg(long, env = "BRAINAI_DICOM_ADDR")]
    pub dicom_addr: Option<SocketAddr>,

    /// Called AE titles the node answers to (comma-separated; the first is also the calling AE
    /// title of deliveries). Routes may pick a model or priority by called AE title.
    #[arg(
        long,
        env = "BRAINAI_DICOM_AE_TITLE",
        value_delimiter = ',',
        default_value = "BRAINAI"
    )]
    pub dicom_ae_title: Vec<String>,

    /// Calling AE titles allowed to open associations, each `AE` or `AE@CIDR`
    /// (`PACS@10.20.0.0/16`), separated by `;`. Empty: any calling AE title (a warning, and
    /// brainai_insecure_config{reason="dicom_any_caller"} 1).
    #[arg(long, env = "BRAINAI_DICOM_ALLOW", value_delimiter = ';')]
    pub dicom_allow: Vec<String>,

    /// DICOM TLS on the listener, with --tls-cert, --tls-key and --tls-client-ca (mutual TLS).
    #[arg(long, env = "BRAINAI_DICOM_TLS", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub dicom_tls: bool,

    /// Most associations open at once; beyond, A-ASSOCIATE-RJ (transient, local limit exceeded).
    #[arg(long, env = "BRAINAI_DICOM_MAX_ASSOCIATIONS", default_value_t = 32)]
    pub dicom_max_associations: usize,

    /// Most associations open at once from one IP address.
    #[arg(
        long,
        env = "BRAINAI_DICOM_MAX_ASSOCIATIONS_PER_PEER",
        default_value_t = 8
    )]
    pub dicom_max_associations_per_peer: usize,

    /// Largest PDU the node receives, in bytes (its Maximum Length in the A-ASSOCIATE-AC).
    #[arg(long, env = "BRAINAI_DICOM_MAX_PDU", default_value_t = 65_536)]
    pub dicom_max_pdu: u32,

    /// ARTIM: seconds a new connection has to send its A-ASSOCIATE-RQ (and its TLS handshake).
    #[arg(long, env = "BRAINAI_DICOM_ARTIM_S", default_value_t = 30)]
    pub dicom_artim_s: u64,

    /// An association that sends nothing for this many seconds is aborted.
    #[arg(long, env = "BRAINAI_DICOM_IDLE_S", default_value_t = 60)]
    pub dicom_idle_s: u64,

    /// Where received instances wait, on disk, until their results are delivered.
    #[arg(long, env = "BRAINAI_DICOM_SPOOL_DIR", default_value = "dicom/spool")]
    pub dicom_spool_dir: PathBuf,

    /// Spool size cap in MiB; a C-STORE that would pass it is refused (A700, Out of Resources).
    #[arg(long, env = "BRAINAI_DICOM_SPOOL_MAX_MIB", default_value_t = 4096)]
    pub dicom_spool_max_mib: u64,

    /// Where results wait until delivered; survives restarts (SIGKILL included).
    #[arg(long, env = "BRAINAI_DICOM_OUTBOX_DIR", default_value = "dicom/outbox")]
    pub dicom_outbox_dir: PathBuf,

    /// Outbox size cap in MiB: while it is full, no new study is processed (they wait in the
    /// spool, which then refuses new stores when full).
    #[arg(long, env = "BRAINAI_DICOM_OUTBOX_MAX_MIB", default_value_t = 1024)]
    pub dicom_outbox_max_mib: u64,

    /// A study is processed once no instance of it arrived for this many seconds and no
    /// association is still sending it (`--dicom-trigger stable`).
    #[arg(long, env = "BRAINAI_DICOM_STABLE_S", default_value_t = 10)]
    pub dicom_stable_s: u64,

    /// When a study is processed: `stable` (see --dicom-stable-s) or `association` (when the
    /// association that sent it is released).
    #[arg(long, env = "BRAINAI_DICOM_TRIGGER", value_enum, default_value_t = Trigger::Stable)]
    pub dicom_trigger: Trigger,

    /// Routing rules, separated by `;`, each `key=value` pairs joined by `,`: `called=AE`,
    /// `modality=MR`, `sequence=FLAIR` (classification models), `model=NAME` (required),
    /// `priority=stat|routine`. Every series is classified by the first classification rule it
    /// matches; a study is segmented by each segmentation rule it matches (its series cover the
    /// model's channels). None: the default model.
    #[arg(long, env = "BRAINAI_DICOM_ROUTE", value_delimiter = ';')]
    pub dicom_route: Vec<String>,

    /// Where results are sent by C-STORE: `AE@HOST:PORT`. Required with --dicom-addr.
    #[arg(long, env = "BRAINAI_DICOM_DESTINATION")]
    pub dicom_destination: Option<String>,

    /// DICOM TLS to the destination (the node presents --tls-cert/--tls-key when set).
    #[arg(long, env = "BRAINAI_DICOM_DESTINATION_TLS", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub dicom_destination_tls: bool,

    /// PEM CA(s) the destination's certificate must chain to (--dicom-destination-tls).
    #[arg(long, env = "BRAINAI_DICOM_DESTINATION_CA")]
    pub dicom_destination_ca: Option<PathBuf>,

    /// Longest wait between delivery attempts, in seconds (the wait doubles from 1 s).
    #[arg(long, env = "BRAINAI_DICOM_RETRY_MAX_S", default_value_t = 300)]
    pub dicom_retry_max_s: u64,
}

/// When a study is processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Trigger {
    Stable,
    Association,
}

/// A calling AE title allowed in, optionally only from an address range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    pub ae_title: String,
    pub network: Option<(IpAddr, u8)>,
}

impl Allowed {
    pub fn parse(rule: &str) -> Result<Allowed, String> {
        let (ae, net) = match rule.split_once('@') {
            Some((ae, net)) => (ae, Some(net)),
            None => (rule, None),
        };
        let ae_title = ae_title(ae).map_err(|e| format!("--dicom-allow: {e}"))?;
        let network = net
            .map(|net| {
                let (addr, bits) = match net.split_once('/') {
                    Some((a, b)) => (a, Some(b)),
                    None => (net, None),
                };
                let addr: IpAddr = addr.parse().map_err(|_| {
                    format!("--dicom-allow: {:?} is not an IP address", bounded(addr))
                })?;
                let max = if addr.is_ipv4() { 32 } else { 128 };
                let bits = match bits {
                    None => max,
                    Some(b) => b.parse::<u8>().ok().filter(|b| *b <= max).ok_or_else(|| {
                        format!("--dicom-allow: bad prefix length in {:?}", bounded(net))
                    })?,
                };
                Ok::<_, String>((addr, bits))
            })
            .transpose()?;
        Ok(Allowed { ae_title, network })
    }

    /// Whether `calling` from `peer` matches this rule.
    pub fn admits(&self, calling: &str, peer: IpAddr) -> bool {
        self.ae_title == calling
            && self
                .network
                .is_none_or(|(net, bits)| in_network(peer, net, bits))
    }
}

fn in_network(peer: IpAddr, net: IpAddr, bits: u8) -> bool {
    let peer = match (peer, net) {
        (IpAddr::V6(v6), IpAddr::V4(_)) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => return false,
        },
        _ => peer,
    };
    match (peer, net) {
        (IpAddr::V4(p), IpAddr::V4(n)) => {
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - bits)
            };
            u32::from(p) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(p), IpAddr::V6(n)) => {
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits)
            };
            u128::from(p) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// Caller text in a message: at most 64 characters, printable ASCII.
pub fn bounded(text: &str) -> String {
    text.chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect()
}

/// An AE title: 1–16 characters of the default repertoire, no backslash or control characters;
/// leading and trailing spaces are not significant.
pub fn ae_title(text: &str) -> Result<String, String> {
    let t = text.trim();
    if t.is_empty() || t.len() > 16 || !t.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'\\') {
        return Err(format!(
            "{:?} is not an AE title (1 to 16 printable ASCII characters, no backslash)",
            bounded(text)
        ));
    }
    Ok(t.to_string())
}

/// One routing rule.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Route {
    pub called: Option<String>,
    pub modality: Option<String>,
    /// Detected sequence (FLAIR, T1, T1c, T2, unknown), case-insensitive.
    pub sequence: Option<String>,
    pub model: String,
    pub priority: Option<Priority>,
}

impl Route {
    pub fn parse(rule: &str) -> Result<Route, String> {
        let mut route = Route::default();
        for pair in rule.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("--dicom-route: {:?} is not key=value", bounded(pair)))?;
            let value = value.trim().to_string();
            match key.trim() {
                "called" => {
                    route.called =
                        Some(ae_title(&value).map_err(|e| format!("--dicom-route: {e}"))?)
                }
                "modality" => route.modality = Some(value),
                "sequence" => {
                    if !["flair", "t1", "t1c", "t2", "unknown"]
                        .contains(&value.to_ascii_lowercase().as_str())
                    {
                        return Err(format!(
                            "--dicom-route: sequence {:?} is not one of FLAIR, T1, T1c, T2, unknown",
                            bounded(&value)
                        ));
                    }
                    route.sequence = Some(value)
                }
                "model" => route.model = value,
                "priority" => {
                    route.priority = Some(value.parse().map_err(|e| format!("--dicom-route: {e}"))?)
                }
                other => {
                    return Err(format!(
                        "--dicom-route: unknown key {:?} (called, modality, sequence, model, priority)",
                        bounded(other)
                    ));
                }
            }
        }
        if route.model.is_empty() {
            return Err(format!(
                "--dicom-route: {:?} names no model=",
                bounded(rule)
            ));
        }
        Ok(route)
    }

    /// Whether the rule's called AE title and modality match.
    pub fn matches(&self, called: &str, modality: &str) -> bool {
        self.called.as_deref().is_none_or(|c| c == called)
            && self
                .modality
                .as_deref()
                .is_none_or(|m| m.eq_ignore_ascii_case(modality.trim()))
    }

    pub fn matches_sequence(&self, sequence: &str) -> bool {
        self.sequence
            .as_deref()
            .is_none_or(|s| s.eq_ignore_ascii_case(sequence))
    }
}

/// Where results go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub ae_title: String,
    /// `host:port`.
    pub address: String,
    pub host: String,
}

impl Destination {
    pub fn parse(text: &str) -> Result<Destination, String> {
        let (ae, address) = text.split_once('@').ok_or_else(|| {
            format!(
                "--dicom-destination: {:?} is not AE@HOST:PORT",
                bounded(text)
            )
        })?;
        let ae_title = ae_title(ae).map_err(|e| format!("--dicom-destination: {e}"))?;
        let (host, port) = address
            .rsplit_once(':')
            .ok_or_else(|| format!("--dicom-destination: {:?} has no :PORT", bounded(address)))?;
        port.parse::<u16>()
            .map_err(|_| format!("--dicom-destination: bad port {:?}", bounded(port)))?;
        if host.is_empty() {
            return Err("--dicom-destination: no host".into());
        }
        Ok(Destination {
            ae_title,
            address: address.to_string(),
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
        })
    }
}

/// The node's settings, checked.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    pub addr: SocketAddr,
    pub ae_titles: Vec<String>,
    pub allowed: Vec<Allowed>,
    pub tls: bool,
    pub max_associations: usize,
    pub max_per_peer: usize,
    pub max_pdu: u32,
    pub artim: Duration,
    pub idle: Duration,
    pub spool_dir: PathBuf,
    pub spool_max_bytes: u64,
    pub outbox_dir: PathBuf,
    pub outbox_max_bytes: u64,
    pub stable: Duration,
    pub trigger: Trigger,
    pub routes: Vec<Route>,
    pub destination: Destination,
    pub destination_tls: bool,
    pub destination_ca: Option<PathBuf>,
    pub retry_max: Duration,
}

impl NodeArgs {
    /// The settings, when the node is on; an error names the flag.
    pub fn settings(&self) -> Result<Option<NodeSettings>, String> {
        let Some(addr) = self.dicom_addr else {
            return Ok(None);
        };
        let ae_titles = self
            .dicom_ae_title
            .iter()
            .map(|t| ae_title(t).map_err(|e| format!("--dicom-ae-title: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        if ae_titles.is_empty() {
            return Err("--dicom-ae-title: at least one AE title".into());
        }
        let allowed = self
            .dicom_allow
            .iter()
            .filter(|r| !r.trim().is_empty())
            .map(|r| Allowed::parse(r.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        let routes = self
            .dicom_route
            .iter()
            .filter(|r| !r.trim().is_empty())
            .map(|r| Route::parse(r))
            .collect::<Result<Vec<_>, _>>()?;
        for route in &routes {
            if let Some(called) = &route.called
                && !ae_titles.contains(called)
            {
                return Err(format!(
                    "--dicom-route: called={called} is not one of --dicom-ae-title"
                ));
            }
        }
        let destination = Destination::parse(self.dicom_destination.as_deref().ok_or(
            "--dicom-addr needs --dicom-destination (AE@HOST:PORT): where results are sent",
        )?)?;
        for (name, value) in [
            (
                "--dicom-max-associations",
                self.dicom_max_associations as u64,
            ),
            (
                "--dicom-max-associations-per-peer",
                self.dicom_max_associations_per_peer as u64,
            ),
            ("--dicom-artim-s", self.dicom_artim_s),
            ("--dicom-idle-s", self.dicom_idle_s),
            ("--dicom-spool-max-mib", self.dicom_spool_max_mib),
            ("--dicom-outbox-max-mib", self.dicom_outbox_max_mib),
            ("--dicom-retry-max-s", self.dicom_retry_max_s),
        ] {
            if value == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        if !(4096..=(1 << 24)).contains(&self.dicom_max_pdu) {
            return Err("--dicom-max-pdu must be between 4096 and 16777216".into());
        }
        Ok(Some(NodeSettings {
            addr,
            ae_titles,
            allowed,
            tls: self.dicom_tls,
            max_associations: self.dicom_max_associations,
            max_per_peer: self.dicom_max_associations_per_peer,
            max_pdu: self.dicom_max_pdu,
            artim: Duration::from_secs(self.dicom_artim_s),
            idle: Duration::from_secs(self.dicom_idle_s),
            spool_dir: self.dicom_spool_dir.clone(),
            spool_max_bytes: self.dicom_spool_max_mib << 20,
            outbox_dir: self.dicom_outbox_dir.clone(),
            outbox_max_bytes: self.dicom_outbox_max_mib << 20,
            stable: Duration::from_secs(self.dicom_stable_s),
            trigger: self.dicom_trigger,
            routes,
            destination,
            destination_tls: self.dicom_destination_tls,
            destination_ca: self.dicom_destination_ca.clone(),
            retry_max: Duration::from_secs(self.dicom_retry_max_s),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_rules_bind_ae_titles_to_networks() {
        let rule = Allowed::parse("PACS@10.20.0.0/16").unwrap();
        assert!(rule.admits("PACS", "10.20.3.4".parse().unwrap()));
        assert!(rule.admits("PACS", "::ffff:10.20.3.4".parse().unwrap()));
        assert!(!rule.admits("PACS", "10.21.0.1".parse().unwrap()));
        assert!(!rule.admits("OTHER", "10.20.3.4".parse().unwrap()));
        let any = Allowed::parse("ROUTER").unwrap();
        assert!(any.admits("ROUTER", "192.0.2.1".parse().unwrap()));
        for bad in ["", "P@x", "P@10.0.0.0/33", "WAYTOOLONGAETITLE17", "A\\B"] {
            assert!(Allowed::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn routes_parse_and_match() {
        let r =
            Route::parse("called=BRAINAI_STAT, modality=MR,sequence=flair,model=m,priority=stat")
                .unwrap();
        assert_eq!(r.called.as_deref(), Some("BRAINAI_STAT"));
        assert_eq!(r.priority, Some(Priority::Stat));
        assert!(r.matches("BRAINAI_STAT", "MR") && !r.matches("BRAINAI", "MR"));
        assert!(!r.matches("BRAINAI_STAT", "CT"));
        assert!(r.matches_sequence("FLAIR") && !r.matches_sequence("T2"));
        for bad in [
            "modality=MR",
            "model=m,colour=red",
            "model=m,sequence=DWI",
            "model",
        ] {
            assert!(Route::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn destinations_parse() {
        let d = Destination::parse("ARCHIVE@pacs.example:104").unwrap();
        assert_eq!(
            (d.ae_title.as_str(), d.address.as_str(), d.host.as_str()),
            ("ARCHIVE", "pacs.example:104", "pacs.example")
        );
        for bad in ["pacs:104", "A@pacs", "A@:104", "A@pacs:x"] {
            assert!(Destination::parse(bad).is_err(), "{bad}");
        }
    }
}
