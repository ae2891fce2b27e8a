//! `switchboard get services|endpoints|backends|conntrack`: kubectl-like tables (or JSON/YAML)
//! of the model and of what the kernel holds.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    process::ExitCode,
};

use aya::{
    Pod,
    maps::{HashMap, MapData},
};
use lb_common::{Address, CtEntry, CtKey, ServiceStats, ct_direction};
use serde::Serialize;

use super::{PinDir, source::SourceArgs};
use crate::{
    datapath::maps::ServiceMaps,
    model::{LbAlgorithm, Model, Protocol},
    reconcile::FrontendKey,
};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(value_enum)]
    pub what: What,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub pin_dir: PinDir,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum What {
    /// Every frontend of every Service (model), and whether the kernel has it programmed.
    Services,
    /// The endpoints behind every frontend (model).
    Endpoints,
    /// The backends the kernel holds (pinned maps).
    Backends,
    /// The flows the kernel tracks (pinned maps).
    Conntrack,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
    Yaml,
}

pub fn main(args: Args) -> anyhow::Result<ExitCode> {
    match args.what {
        What::Services | What::Endpoints => {
            let (snapshot, errors) = super::source::block_on(args.source.read_once())??;
            let model = args.source.model(&snapshot);
            print_warnings(&model);
            // The kernel's view is optional here: without an agent, the model alone is shown.
            let maps = ServiceMaps::open(&args.pin_dir.pin_dir).ok();
            if matches!(args.what, What::Services) {
                print(args.output, &services(&model, maps.as_ref()))?;
            } else {
                print(args.output, &endpoints(&model))?;
            }
            Ok(if errors == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        What::Backends => {
            let maps = ServiceMaps::open(&args.pin_dir.pin_dir)?;
            print(args.output, &backends(&maps)?)?;
            Ok(ExitCode::SUCCESS)
        }
        What::Conntrack => {
            let maps = ServiceMaps::open(&args.pin_dir.pin_dir)?;
            print(args.output, &conntrack(&maps)?)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub fn print_warnings(model: &Model) {
    for warning in &model.warnings {
        eprintln!("warning: {warning}");
    }
}

/// Rows print as a table, or as a list in JSON/YAML with the same field names.
pub trait Row: Serialize {
    const HEADER: &'static [&'static str];
    fn cells(&self) -> Vec<String>;
}

pub fn print<R: Row>(output: Output, rows: &[R]) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(rows)?),
        Output::Yaml => print!("{}", serde_yaml_ng::to_string(rows)?),
        Output::Table => {
            let cells: Vec<Vec<String>> = rows.iter().map(Row::cells).collect();
            let widths: Vec<usize> = (0..R::HEADER.len())
                .map(|i| {
                    cells
                        .iter()
                        .map(|c| c[i].len())
                        .chain([R::HEADER[i].len()])
                        .max()
                        .unwrap_or(0)
                })
                .collect();
            let line = |cells: Vec<String>| {
                let padded: Vec<String> = cells
                    .iter()
                    .zip(&widths)
                    .map(|(c, w)| format!("{c:<w$}"))
                    .collect();
                println!("{}", padded.join("  ").trim_end());
            };
            line(R::HEADER.iter().map(|h| h.to_string()).collect());
            for row in cells {
                line(row);
            }
        }
    }
    Ok(())
}

#[derive(Serialize)]
pub struct ServiceRow {
    pub service: String,
    pub kind: &'static str,
    pub frontend: String,
    pub endpoints: usize,
    /// Backend selection: the Service's `switchboard.io/lb-algorithm` annotation, else the
    /// agent's default (`default`).
    pub algorithm: &'static str,
    /// `true` when the kernel's maps hold this frontend (`null`: no agent's maps to read).
    pub programmed: Option<bool>,
    /// The datapath's counters for this frontend since it was programmed (`null` when not
    /// programmed).
    pub traffic: Option<Traffic>,
}

/// A frontend's datapath counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
}

impl From<ServiceStats> for Traffic {
    fn from(stats: ServiceStats) -> Self {
        Self {
            packets: stats.packets,
            bytes: stats.bytes,
            new_flows: stats.new_flows,
            reply_packets: stats.reply_packets,
            reply_bytes: stats.reply_bytes,
        }
    }
}

impl Row for ServiceRow {
    const HEADER: &'static [&'static str] = &[
        "SERVICE",
        "TYPE",
        "FRONTEND",
        "ENDPOINTS",
        "ALGORITHM",
        "PROGRAMMED",
        "PACKETS",
        "BYTES",
        "NEW FLOWS",
    ];

    fn cells(&self) -> Vec<String> {
        let endpoints = if self.endpoints == 0 {
            "NONE".to_owned()
        } else {
            self.endpoints.to_string()
        };
        let programmed = match self.programmed {
            Some(true) => "yes",
            Some(false) => "no",
            None => "-",
        };
        let counter = |field: fn(&Traffic) -> u64| {
            self.traffic
                .as_ref()
                .map_or_else(|| "-".to_owned(), |t| field(t).to_string())
        };
        vec![
            self.service.clone(),
            self.kind.to_owned(),
            self.frontend.clone(),
            endpoints,
            self.algorithm.to_owned(),
            programmed.to_owned(),
            counter(|t| t.packets),
            counter(|t| t.bytes),
            counter(|t| t.new_flows),
        ]
    }
}

fn services(model: &Model, maps: Option<&ServiceMaps>) -> Vec<ServiceRow> {
    let stats = maps
        .and_then(|maps| maps.service_stats().ok())
        .unwrap_or_default();
    model
        .frontends
        .iter()
        .map(|f| {
            // A NodePort is keyed with its unspecified address, as the model has it.
            let info = maps.map(|maps| maps.service(&FrontendKey::of(f)));
            ServiceRow {
                service: f.service.to_string(),
                kind: f.kind.as_str(),
                frontend: f.dialled(),
                endpoints: f.backends.len(),
                algorithm: f.algorithm.map_or("default", LbAlgorithm::as_str),
                programmed: info.map(|i| i.is_some()),
                traffic: info
                    .flatten()
                    .map(|i| stats.get(&i.id).copied().unwrap_or_default().into()),
            }
        })
        .collect()
}

#[derive(Serialize)]
pub struct EndpointRow {
    pub service: String,
    pub frontend: String,
    pub endpoint: Option<String>,
    pub pod: Option<String>,
    pub node: Option<String>,
    pub terminating: bool,
}

impl Row for EndpointRow {
    const HEADER: &'static [&'static str] =
        &["SERVICE", "FRONTEND", "ENDPOINT", "POD", "NODE", "TERMINATING"];

    fn cells(&self) -> Vec<String> {
        vec![
            self.service.clone(),
            self.frontend.clone(),
            self.endpoint.clone().unwrap_or_else(|| "NO ENDPOINTS".into()),
            self.pod.clone().unwrap_or_default(),
            self.node.clone().unwrap_or_default(),
            if self.terminating { "yes" } else { "" }.to_owned(),
        ]
    }
}

/// One row per endpoint, and one `NO ENDPOINTS` row for a frontend without any.
pub fn endpoints(model: &Model) -> Vec<EndpointRow> {
    let mut rows = Vec::new();
    for f in &model.frontends {
        let frontend = f.dialled();
        if f.backends.is_empty() {
            rows.push(EndpointRow {
                service: f.service.to_string(),
                frontend: frontend.clone(),
                endpoint: None,
                pod: None,
                node: None,
                terminating: false,
            });
        }
        for e in &f.backends {
            rows.push(EndpointRow {
                service: f.service.to_string(),
                frontend: frontend.clone(),
                endpoint: Some(e.socket_addr().to_string()),
                pod: Some(e.pod.clone()),
                node: e.node_name.clone(),
                terminating: e.terminating,
            });
        }
    }
    rows
}

#[derive(Serialize)]
pub struct BackendRow {
    pub id: u32,
    /// The backend set it belongs to, shared by the frontends listed.
    pub set: u32,
    pub frontends: String,
    pub backend: String,
    /// Its position among the set's backends new flows go to; none while draining.
    pub slot: Option<u32>,
}

impl Row for BackendRow {
    const HEADER: &'static [&'static str] = &["ID", "SET", "FRONTENDS", "BACKEND", "SLOT"];

    fn cells(&self) -> Vec<String> {
        vec![
            self.id.to_string(),
            self.set.to_string(),
            self.frontends.clone(),
            self.backend.clone(),
            self.slot.map_or_else(|| "-".into(), |s| s.to_string()),
        ]
    }
}

fn backends(maps: &ServiceMaps) -> anyhow::Result<Vec<BackendRow>> {
    let programmed = maps.read_programmed()?;
    let mut frontends: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    let mut slots: BTreeMap<u32, u32> = BTreeMap::new();
    for (key, info) in &programmed.services {
        for set in [info.backends, info.outside] {
            let listed = frontends.entry(set.id).or_default();
            if !listed.contains(&key.to_string()) {
                listed.push(key.to_string());
            }
            for (slot, id) in programmed.live_backends(&set).iter().enumerate() {
                slots.insert(*id, slot as u32);
            }
        }
    }
    let mut rows: Vec<BackendRow> = programmed
        .backends
        .iter()
        .map(|(id, b)| BackendRow {
            id: *id,
            set: b.set_id,
            frontends: frontends
                .get(&b.set_id)
                .map_or_else(|| "?".into(), |listed| listed.join(",")),
            backend: b.addr.to_string(),
            slot: slots.get(id).copied(),
        })
        .collect();
    rows.sort_by_key(|row| row.id);
    Ok(rows)
}

#[derive(Serialize)]
pub struct FlowRow {
    pub direction: &'static str,
    pub protocol: &'static str,
    pub source: String,
    pub destination: String,
    /// Forward: the backend chosen; reply: the frontend restored as source.
    pub translated_to: String,
    pub service_id: u32,
    pub backend_id: u32,
}

impl Row for FlowRow {
    const HEADER: &'static [&'static str] = &[
        "DIRECTION",
        "PROTO",
        "SOURCE",
        "DESTINATION",
        "TRANSLATED TO",
        "SERVICE ID",
        "BACKEND ID",
    ];

    fn cells(&self) -> Vec<String> {
        vec![
            self.direction.to_owned(),
            self.protocol.to_owned(),
            self.source.clone(),
            self.destination.clone(),
            self.translated_to.clone(),
            self.service_id.to_string(),
            self.backend_id.to_string(),
        ]
    }
}

/// The flows of both families' conntrack maps.
fn conntrack(maps: &ServiceMaps) -> anyhow::Result<Vec<FlowRow>> {
    let mut rows = flow_rows(&maps.conntrack)?;
    rows.extend(flow_rows(&maps.conntrack6)?);
    Ok(rows)
}

fn flow_rows<A: Address + Into<IpAddr>>(
    conntrack: &HashMap<MapData, CtKey<A>, CtEntry<A>>,
) -> anyhow::Result<Vec<FlowRow>>
where
    CtKey<A>: Pod,
    CtEntry<A>: Pod,
{
    let socket = |addr: A, port| SocketAddr::new(addr.into(), port).to_string();
    let mut rows = Vec::new();
    for entry in conntrack.iter() {
        let (key, value) = entry?;
        rows.push(FlowRow {
            direction: match key.direction {
                ct_direction::FORWARD => "forward",
                ct_direction::REPLY => "reply",
                ct_direction::SNAT_OUT => "snat-out",
                ct_direction::SNAT_IN => "snat-in",
                _ => "unknown",
            },
            protocol: Protocol::from_ip_protocol(key.proto).map_or("unknown", Protocol::as_str),
            source: socket(key.src_addr, key.src_port),
            destination: socket(key.dst_addr, key.dst_port),
            translated_to: socket(value.nat_addr, value.nat_port),
            service_id: value.service_id,
            backend_id: value.backend_id,
        });
    }
    Ok(rows)
}
