//! The source options every command that reads Services shares, and a one-shot read of them.
use std::path::PathBuf;

use anyhow::Context as _;
use k8s_openapi::api::{
    core::v1::{Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{Api, api::ListParams};

use crate::{
    model::{self, EndpointsFrom},
    source::{Snapshot, kube::Connection, manifests::ManifestDir},
};

#[derive(clap::Args, Debug, Clone)]
pub struct SourceArgs {
    /// Read Services, Pods and EndpointSlices from this directory (YAML or JSON, as given to
    /// `kubectl apply`) instead of the Kubernetes API.
    #[arg(long, env = "SWITCHBOARD_MANIFESTS", value_name = "DIR")]
    pub manifests: Option<PathBuf>,
    #[command(flatten)]
    pub connection: Connection,
    /// Where endpoints come from [default: slices from the API, pods from --manifests]. With
    /// `pods`, each Service's selector is evaluated against Pods (selector-less Services still
    /// use EndpointSlices).
    #[arg(long, value_enum, value_name = "SOURCE")]
    pub endpoints_from: Option<EndpointsFrom>,
    /// This node's name: with traffic policy `Local`, only endpoints on this node are used; its
    /// Node object's `topology.kubernetes.io/zone` label gives the zone.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// This node's zone, for EndpointSlice topology hints (overrides the Node's zone label; with
    /// --manifests, a Node manifest named --node-name can give it instead).
    #[arg(long, env = "SWITCHBOARD_ZONE")]
    pub zone: Option<String>,
}

impl SourceArgs {
    pub fn endpoints_from(&self) -> EndpointsFrom {
        self.endpoints_from.unwrap_or(if self.manifests.is_some() {
            EndpointsFrom::Pods
        } else {
            EndpointsFrom::Slices
        })
    }

    /// Everything the source holds now, Pods included whatever `--endpoints-from` says (explain
    /// needs them). Manifest errors are printed and returned as a count.
    pub async fn read_once(&self) -> anyhow::Result<(Snapshot, usize)> {
        if let Some(dir) = &self.manifests {
            let (snapshot, errors) = ManifestDir::new(dir)
                .read()
                .with_context(|| format!("cannot read --manifests {}", dir.display()))?;
            for error in &errors {
                eprintln!("error: {error}");
            }
            return Ok((snapshot, errors.len()));
        }
        let client = self.connection.client().await?;
        let params = ListParams::default();
        let services: Vec<Service> = Api::all(client.clone())
            .list(&params)
            .await
            .context("cannot list Services")?
            .items;
        let endpoint_slices: Vec<EndpointSlice> = Api::all(client.clone())
            .list(&params)
            .await
            .context("cannot list EndpointSlices")?
            .items;
        let pods: Vec<Pod> = Api::all(client.clone())
            .list(&params)
            .await
            .context("cannot list Pods")?
            .items;
        let nodes: Vec<Node> = match &self.node_name {
            Some(name) => Api::<Node>::all(client)
                .get_opt(name)
                .await
                .context("cannot read this node's Node")?
                .into_iter()
                .collect(),
            None => Vec::new(),
        };
        Ok((
            Snapshot {
                services,
                pods,
                endpoint_slices,
                nodes,
            },
            0,
        ))
    }

    /// The model of what [`SourceArgs::read_once`] returns.
    pub fn model(&self, snapshot: &Snapshot) -> model::Model {
        model::compute(&self.input(snapshot))
    }

    pub fn input<'a>(&'a self, snapshot: &'a Snapshot) -> model::Input<'a> {
        model::Input {
            services: &snapshot.services,
            pods: &snapshot.pods,
            endpoint_slices: &snapshot.endpoint_slices,
            endpoints_from: self.endpoints_from(),
            node_name: self.node_name.as_deref(),
            zone: self
                .zone
                .as_deref()
                .or_else(|| snapshot.zone_of(self.node_name.as_deref()?)),
        }
    }
}

/// A current-thread runtime for the one-shot commands.
pub fn block_on<T>(future: impl Future<Output = T>) -> anyhow::Result<T> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(future))
}
