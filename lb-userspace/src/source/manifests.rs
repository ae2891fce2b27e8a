//! `FileSource`: a directory of the YAML or JSON a user would give `kubectl apply` (Services, Pods
//! with their `status.podIP` and Ready condition, EndpointSlices), re-read when its files change.
//!
//! A file that fails to parse or validate is reported by file, document and field, and the
//! objects it last held intact keep being served: a half-saved edit never drops a service.
use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::{
    core::v1::{Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use notify::{RecursiveMode, Watcher as _};
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use super::Snapshot;
use crate::model::{self, FieldError};
use crate::observe::metrics::AgentMetrics;

/// Why one file could not be used.
#[derive(Debug, thiserror::Error)]
pub struct FileError {
    pub file: PathBuf,
    /// 1-based position of the YAML document in the file, when the error is in one.
    pub document: Option<usize>,
    /// `Kind namespace/name` of the object, when it got that far.
    pub object: Option<String>,
    pub message: String,
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(document) = self.document {
            write!(f, ": document {document}")?;
        }
        if let Some(object) = &self.object {
            write!(f, " ({object})")?;
        }
        write!(f, ": {}", self.message)
    }
}

#[derive(Clone, Debug, Default)]
struct FileObjects {
    services: Vec<Service>,
    pods: Vec<Pod>,
    endpoint_slices: Vec<EndpointSlice>,
    nodes: Vec<Node>,
}

/// The directory and the last good contents of each of its files.
pub struct ManifestDir {
    dir: PathBuf,
    last_good: BTreeMap<PathBuf, FileObjects>,
}

impl ManifestDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            last_good: BTreeMap::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Re-reads every file. Returns what to serve and the errors found this time.
    pub fn read(&mut self) -> std::io::Result<(Snapshot, Vec<FileError>)> {
        let mut errors = Vec::new();
        let files = manifest_files(&self.dir)?;
        self.last_good.retain(|path, _| files.contains(path));
        for file in files {
            match read_file(&file) {
                Ok(objects) => {
                    self.last_good.insert(file, objects);
                }
                Err(error) => errors.push(error),
            }
        }
        let mut snapshot = Snapshot::default();
        for objects in self.last_good.values() {
            snapshot.services.extend(objects.services.iter().cloned());
            snapshot.pods.extend(objects.pods.iter().cloned());
            snapshot
                .endpoint_slices
                .extend(objects.endpoint_slices.iter().cloned());
            snapshot.nodes.extend(objects.nodes.iter().cloned());
        }
        Ok((snapshot, errors))
    }
}

/// `*.yaml`, `*.yml` and `*.json` directly in `dir` (like `kubectl apply -f DIR`), skipping
/// editor temporaries and hidden files.
fn manifest_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let manifest = [".yaml", ".yml", ".json"].iter().any(|ext| name.ends_with(ext));
        if manifest && !name.starts_with('.') && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn read_file(file: &Path) -> Result<FileObjects, FileError> {
    let error = |document, object, message| FileError {
        file: file.to_owned(),
        document,
        object,
        message,
    };
    let text = std::fs::read_to_string(file).map_err(|e| error(None, None, e.to_string()))?;
    let mut objects = FileObjects::default();
    for (index, document) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
        let position = Some(index + 1);
        let value: serde_yaml_ng::Value = serde::Deserialize::deserialize(document)
            .map_err(|e| error(position, None, format!("not valid YAML: {e}")))?;
        if value.is_null() {
            continue;
        }
        let kind = value
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or_default()
            .to_owned();
        let object = Some(format!("{kind} {}", object_name(&value)));
        let fail = |e: FieldError| error(position, object.clone(), e.to_string());
        match kind.as_str() {
            "Service" => {
                let service: Service = typed(value).map_err(fail)?;
                first_error(model::validate_service(&service)).map_err(fail)?;
                objects.services.push(service);
            }
            "Pod" => {
                let pod: Pod = typed(value).map_err(fail)?;
                first_error(model::validate_pod(&pod)).map_err(fail)?;
                objects.pods.push(pod);
            }
            "EndpointSlice" => {
                let slice: EndpointSlice = typed(value).map_err(fail)?;
                first_error(model::validate_endpoint_slice(&slice)).map_err(fail)?;
                objects.endpoint_slices.push(slice);
            }
            // For this node's zone label (topology hints).
            "Node" => objects.nodes.push(typed(value).map_err(fail)?),
            "" => {
                return Err(error(position, None, "kind: is required".into()));
            }
            other => {
                tracing::debug!(file = %file.display(), kind = other, "kind not used by switchboard; skipped")
            }
        }
    }
    Ok(objects)
}

/// Deserializes into a k8s-openapi type, keeping the path of the field that failed.
fn typed<T: DeserializeOwned>(value: serde_yaml_ng::Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(value).map_err(|e| FieldError {
        path: e.path().to_string(),
        message: e.inner().to_string(),
    })
}

fn first_error(errors: Vec<FieldError>) -> Result<(), FieldError> {
    errors.into_iter().next().map_or(Ok(()), Err)
}

fn object_name(value: &serde_yaml_ng::Value) -> String {
    let field = |name: &str| {
        value
            .get("metadata")
            .and_then(|m| m.get(name))
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    let name = field("name").unwrap_or_else(|| "<unnamed>".into());
    match field("namespace") {
        Some(namespace) => format!("{namespace}/{name}"),
        None => format!("default/{name}"),
    }
}

/// How long to wait for a burst of file events to settle before re-reading.
const SETTLE: Duration = Duration::from_millis(100);
/// How often a directory that went away is looked for again.
const RETRY: Duration = Duration::from_secs(1);

/// Reads `dir` now, then again whenever a file in it changes, publishing each snapshot. Errors
/// are logged with file and field; the previous good state of a broken file keeps being served.
/// A directory that is removed or replaced keeps the last state programmed until it is back
/// (looked for every second), then is read and watched again.
pub async fn watch(
    mut manifests: ManifestDir,
    snapshots: watch::Sender<Snapshot>,
    metrics: Arc<AgentMetrics>,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let dir = manifests.dir().to_owned();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Our own reads show up as access events; only changes matter. `true`: the directory
        // itself went, so its watch is dead even if a new one gets the same inode number.
        match event {
            Ok(event) if event.kind.is_access() => {}
            Ok(event) => {
                let gone = event.kind.is_remove() && event.paths.contains(&dir);
                let _ = events_tx.send(gone);
            }
            Err(_) => {
                let _ = events_tx.send(true);
            }
        }
    })
    .context("cannot watch the manifest directory")?;
    watcher
        .watch(manifests.dir(), RecursiveMode::NonRecursive)
        .with_context(|| format!("cannot watch {}", manifests.dir().display()))?;
    // The inotify watch follows the directory itself: once it is removed, or renamed away and
    // another put in its place, the path has to be watched anew.
    let mut watched = identity(manifests.dir());
    let mut available = true;
    let mut watch_lost = false;
    loop {
        let now = identity(manifests.dir());
        if now != watched || watch_lost {
            watch_lost = false;
            let _ = watcher.unwatch(manifests.dir());
            watched = now.filter(|_| {
                watcher
                    .watch(manifests.dir(), RecursiveMode::NonRecursive)
                    .is_ok()
            });
        }
        // Read after (re)watching, so no change falls between the two.
        let read = publish(&mut manifests, &snapshots, &metrics);
        match (&read, available) {
            (Err(error), true) => {
                tracing::error!(
                    "cannot read {}: {error}; the programmed state stays in effect until it is back",
                    manifests.dir().display()
                );
                metrics.source_error("manifests");
            }
            (Ok(()), false) => tracing::info!("{} is back", manifests.dir().display()),
            _ => {}
        }
        available = read.is_ok() && watched.is_some();
        tokio::select! {
            event = events.recv() => match event {
                None => return Ok(()),
                Some(gone) => watch_lost |= gone,
            },
            () = tokio::time::sleep(RETRY), if !available => {}
        }
        tokio::time::sleep(SETTLE).await;
        while let Ok(gone) = events.try_recv() {
            watch_lost |= gone;
        }
    }
}

/// The device and inode of `dir`, if it is a directory.
fn identity(dir: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(dir)
        .ok()
        .filter(|m| m.is_dir())
        .map(|m| (m.dev(), m.ino()))
}

fn publish(
    manifests: &mut ManifestDir,
    snapshots: &watch::Sender<Snapshot>,
    metrics: &AgentMetrics,
) -> std::io::Result<()> {
    let (snapshot, errors) = manifests.read()?;
    for error in &errors {
        tracing::error!("{error}; its last good contents stay in effect");
        metrics.source_error("manifests");
    }
    tracing::info!(
        services = snapshot.services.len(),
        pods = snapshot.pods.len(),
        "read manifests from {}",
        manifests.dir().display()
    );
    snapshots.send_replace(snapshot);
    Ok(())
}

#[cfg(test)]
mod tests;
