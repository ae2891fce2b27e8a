//! Why a Service has the endpoints it has, for `switchboard explain service`. Pure: it reads the
//! same input as [`super::compute`] and says, for each pod in the namespace, what kept it out.
use std::{collections::BTreeMap, fmt};

use k8s_openapi::api::core::v1::Pod;

use super::{EndpointsFrom, Frontend, Input, ServiceName, compute, selector::Labels};

#[derive(Debug, PartialEq, Eq, serde::Serialize)]
pub struct Explanation {
    pub service: String,
    /// Why the proxy leaves the Service alone, if it does.
    pub not_proxied: Option<String>,
    pub selector: BTreeMap<String, String>,
    /// Where the endpoints come from: "pods", "EndpointSlices", or why there are none.
    pub endpoints_from: String,
    pub frontends: Vec<FrontendSummary>,
    /// Pods of the namespace that are not endpoints, and why, closest misses first.
    pub pods: Vec<PodVerdict>,
}

#[derive(Debug, PartialEq, Eq, serde::Serialize)]
pub struct FrontendSummary {
    pub frontend: String,
    pub kind: String,
    pub endpoints: Vec<String>,
}

#[derive(Debug, PartialEq, Eq, serde::Serialize)]
pub struct PodVerdict {
    pub pod: String,
    /// Selector keys the pod fails, as `key: wanted "x", pod has "y"` (or `missing`).
    pub mismatched: Vec<String>,
    /// For pods the selector matches: why they are still not endpoints.
    pub not_serving: Option<String>,
}

/// Explains `namespace/name`, or `None` when no such Service exists.
pub fn explain(input: &Input<'_>, namespace: &str, name: &str) -> Option<Explanation> {
    let service = input.services.iter().find(|s| {
        s.metadata.name.as_deref() == Some(name)
            && s.metadata.namespace.as_deref().unwrap_or("default") == namespace
    })?;
    let service_name = ServiceName {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    };
    let model = compute(&Input {
        services: std::slice::from_ref(service),
        ..*input
    });
    let selector = service
        .spec
        .as_ref()
        .and_then(|s| s.selector.clone())
        .unwrap_or_default();
    let endpoints_from = if selector.is_empty() {
        "EndpointSlices (the Service has no selector, so no Pod is selected by it)".to_owned()
    } else if input.endpoints_from == EndpointsFrom::Pods {
        "pods matching the selector".to_owned()
    } else {
        "EndpointSlices (published by the endpoints controller from the selector)".to_owned()
    };
    let frontends = model.frontends.iter().map(summary).collect();
    let pods = if selector.is_empty() {
        Vec::new()
    } else {
        pod_verdicts(&selector, input.pods, namespace, &model.frontends)
    };
    Some(Explanation {
        service: service_name.to_string(),
        not_proxied: super::skip_reason(service).map(str::to_owned),
        selector,
        endpoints_from,
        frontends,
        pods,
    })
}

fn summary(frontend: &Frontend) -> FrontendSummary {
    FrontendSummary {
        frontend: frontend.dialled(),
        kind: frontend.kind.as_str().to_owned(),
        endpoints: frontend
            .backends
            .iter()
            .map(|e| format!("{} ({})", e.socket_addr(), e.pod))
            .collect(),
    }
}

/// Every pod of the namespace that is not an endpoint of any frontend, closest misses first.
fn pod_verdicts(selector: &Labels, pods: &[Pod], namespace: &str, frontends: &[Frontend]) -> Vec<PodVerdict> {
    let endpoint_pods: Vec<&str> = frontends
        .iter()
        .flat_map(|f| f.backends.iter().map(|e| e.pod.as_str()))
        .collect();
    // Closest misses first: fewer failed keys, then wrong values before missing labels (a pod
    // labelled `app=web-app` is a likelier mistake than one without `app`).
    let mut ranked: Vec<((usize, usize, String), PodVerdict)> = pods
        .iter()
        .filter(|p| p.metadata.namespace.as_deref().unwrap_or("default") == namespace)
        .filter(|p| !endpoint_pods.contains(&p.metadata.name.as_deref().unwrap_or_default()))
        .map(|pod| {
            let labels = pod.metadata.labels.clone().unwrap_or_default();
            let mut missing = 0;
            let mismatched: Vec<String> = selector
                .iter()
                .filter_map(|(key, wanted)| match labels.get(key) {
                    Some(value) if value == wanted => None,
                    Some(value) => Some(format!("{key}: wanted {wanted:?}, pod has {value:?}")),
                    None => {
                        missing += 1;
                        Some(format!("{key}: wanted {wanted:?}, pod has no such label"))
                    }
                })
                .collect();
            let not_serving = mismatched.is_empty().then(|| not_serving_reason(pod));
            let name = pod.metadata.name.clone().unwrap_or_default();
            let rank = (mismatched.len(), missing, name.clone());
            (
                rank,
                PodVerdict {
                    pod: name,
                    mismatched,
                    not_serving,
                },
            )
        })
        .collect();
    ranked.sort_by(|a, b| a.0.cmp(&b.0));
    ranked.into_iter().map(|(_, verdict)| verdict).collect()
}

fn not_serving_reason(pod: &Pod) -> String {
    let Some(status) = pod.status.as_ref() else {
        return "has no status (no IP, not Ready)".into();
    };
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return format!(
            "has finished (phase {})",
            status.phase.as_deref().unwrap_or_default()
        );
    }
    if status.pod_ip.is_none() && status.pod_ips.as_ref().is_none_or(Vec::is_empty) {
        return "has no IP yet".into();
    }
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    if !ready {
        return "is not Ready".into();
    }
    if pod.metadata.deletion_timestamp.is_some() {
        return "is terminating, and other pods are ready".into();
    }
    "does not expose the targetPort by that name (or the endpoints come from EndpointSlices, which do not list it)".into()
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "Service {}", self.service)?;
        if let Some(reason) = &self.not_proxied {
            return writeln!(f, "  not proxied by switchboard: {reason}");
        }
        let selector: Vec<String> = self.selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
        writeln!(
            f,
            "  selector: {}",
            if selector.is_empty() {
                "(none)".to_owned()
            } else {
                selector.join(",")
            }
        )?;
        writeln!(f, "  endpoints from: {}", self.endpoints_from)?;
        for frontend in &self.frontends {
            if frontend.endpoints.is_empty() {
                writeln!(f, "  {} {}: NO ENDPOINTS", frontend.kind, frontend.frontend)?;
            } else {
                writeln!(
                    f,
                    "  {} {}: {}",
                    frontend.kind,
                    frontend.frontend,
                    frontend.endpoints.join(", ")
                )?;
            }
        }
        if !self.pods.is_empty() {
            writeln!(f, "  pods in the namespace that are not endpoints:")?;
        }
        for verdict in &self.pods {
            match &verdict.not_serving {
                Some(reason) => writeln!(f, "    {}: matches the selector but {reason}", verdict.pod)?,
                None => writeln!(f, "    {}: {}", verdict.pod, verdict.mismatched.join("; "))?,
            }
        }
        Ok(())
    }
}
