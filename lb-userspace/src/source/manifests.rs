//! `FileSource`: a directory of the YAML or JSON a user would give `kubectl apply` (Services, Pods
//! with their `status.podIP` and Ready condition, EndpointSlices), re-read when its files change.
//!
//! A file that fails to parse or validate is reported by file, document and field, and the
//! objects it last held intact keep being served: a half-saved edit never drops a service.
use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::{
    core::v1::{Pod, Service},
    discovery::v1::EndpointSlice,
};
use notify::{RecursiveMode, Watcher as _};
use serde::de::DeserializeOwned;

use super::{Change, Changes, Kind, Object, ObjectName, Snapshot};
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

/// The objects of one file, in file order.
type FileObjects = Vec<Object>;

/// What identifies an object: kind, namespace, name.
type ObjectKey = (Kind, String, String);

fn key_of(object: &Object) -> ObjectKey {
    let metadata = object.metadata();
    (
        object.kind(),
        metadata.namespace.clone().unwrap_or_else(|| "default".into()),
        metadata.name.clone().unwrap_or_default(),
    )
}

/// When a file last changed, as far as the directory says: a file whose stamp is the same is
/// not read again, unless it changed within [`RACY`] of being read (timestamps are coarser than
/// writes: two writes of the same length within a few milliseconds leave the same stamp).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    modified: Option<std::time::SystemTime>,
    len: u64,
    inode: u64,
}

const RACY: Duration = Duration::from_secs(2);

/// Whether a file read at `read_at` with stamp `then` still has it now, and changed long enough
/// before that read for the stamp to tell.
fn unchanged(then: Option<&(Stamp, std::time::SystemTime)>, now: Option<Stamp>) -> bool {
    let (Some((then, read_at)), Some(now)) = (then, now) else {
        return false;
    };
    *then == now && then.modified.is_some_and(|modified| modified + RACY < *read_at)
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt as _;
    let metadata = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: metadata.modified().ok(),
        len: metadata.len(),
        inode: metadata.ino(),
    })
}

/// A file whose objects changed: what it held before and what it holds now.
struct Changed {
    before: FileObjects,
    after: FileObjects,
}

/// The directory and the last good contents of each of its files.
pub struct ManifestDir {
    dir: PathBuf,
    last_good: BTreeMap<PathBuf, FileObjects>,
    /// The stamp of each file when its last good contents were read.
    stamps: BTreeMap<PathBuf, (Stamp, std::time::SystemTime)>,
    /// How many files hold each object (the same object in two files is one object).
    holders: HashMap<ObjectKey, u32>,
    /// Whether [`ManifestDir::changes`] has sent the first full lists.
    listed: bool,
}

impl ManifestDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            last_good: BTreeMap::new(),
            stamps: BTreeMap::new(),
            holders: HashMap::new(),
            listed: false,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Re-reads the files that changed. Returns everything to serve and the errors found this
    /// time.
    pub fn read(&mut self) -> std::io::Result<(Snapshot, Vec<FileError>)> {
        let (_, errors) = self.refresh()?;
        let mut snapshot = Snapshot::default();
        for object in self.last_good.values().flatten() {
            match object.clone() {
                Object::Service(o) => snapshot.services.push(o),
                Object::EndpointSlice(o) => snapshot.endpoint_slices.push(o),
                Object::Pod(o) => snapshot.pods.push(o),
                Object::Node(o) => snapshot.nodes.push(o),
            }
        }
        Ok((snapshot, errors))
    }

    /// Re-reads the files that changed and says what that changed, trimmed to what the model
    /// reads: the first time every object, then each kind's list of names; after that the
    /// objects deleted, then those applied (an object that moved between files is applied, not
    /// deleted).
    pub fn changes(&mut self) -> std::io::Result<(Vec<Change>, Vec<FileError>)> {
        let (changed, errors) = self.refresh()?;
        if !self.listed {
            self.listed = true;
            self.holders.retain(|_, count| *count > 0);
            let mut lists: BTreeMap<Kind, Vec<ObjectName>> =
                Kind::ALL.iter().map(|k| (*k, Vec::new())).collect();
            let mut changes = Vec::new();
            for object in self.last_good.values().flatten() {
                lists.entry(object.kind()).or_default().push(object.name());
                changes.push(Change::Applied(trimmed(object)));
            }
            changes.extend(lists.into_iter().map(|(kind, names)| Change::Listed(kind, names)));
            return Ok((changes, errors));
        }
        let mut changes = Vec::new();
        for file in &changed {
            for object in &file.before {
                // Gone from every file now: the count reached zero (and is removed, so an object
                // in a changed file twice is deleted once).
                let key = key_of(object);
                if self.holders.get(&key) == Some(&0) {
                    self.holders.remove(&key);
                    changes.push(Change::Deleted(trimmed(object)));
                }
            }
        }
        for file in &changed {
            let before: HashMap<ObjectKey, &Object> = file.before.iter().map(|o| (key_of(o), o)).collect();
            for object in &file.after {
                if before.get(&key_of(object)) != Some(&object) {
                    changes.push(Change::Applied(trimmed(object)));
                }
            }
        }
        Ok((changes, errors))
    }

    /// Reads the files whose stamp changed (and those that failed last time), keeping the last
    /// good contents of a file that fails; forgets the files that are gone.
    fn refresh(&mut self) -> std::io::Result<(Vec<Changed>, Vec<FileError>)> {
        let mut errors = Vec::new();
        let mut changed = Vec::new();
        let files = manifest_files(&self.dir)?;
        let gone: Vec<PathBuf> = self
            .last_good
            .keys()
            .filter(|p| !files.contains(p))
            .cloned()
            .collect();
        for path in gone {
            self.stamps.remove(&path);
            let before = self.last_good.remove(&path).unwrap_or_default();
            changed.push(self.count(before, Vec::new()));
        }
        for file in files {
            let now = stamp(&file);
            if unchanged(self.stamps.get(&file), now) {
                continue;
            }
            let read_at = std::time::SystemTime::now();
            match read_file(&file) {
                Ok(objects) => {
                    let before = self
                        .last_good
                        .insert(file.clone(), objects.clone())
                        .unwrap_or_default();
                    changed.push(self.count(before, objects));
                    if let Some(now) = now {
                        self.stamps.insert(file, (now, read_at));
                    }
                }
                Err(error) => errors.push(error),
            }
        }
        Ok((changed, errors))
    }

    /// Counts the holders of a file's objects after it changed from `before` to `after`.
    fn count(&mut self, before: FileObjects, after: FileObjects) -> Changed {
        for object in &before {
            if let Some(count) = self.holders.get_mut(&key_of(object)) {
                *count = count.saturating_sub(1);
            }
        }
        for object in &after {
            *self.holders.entry(key_of(object)).or_default() += 1;
        }
        Changed { before, after }
    }
}

/// A copy of `object` without what the model never reads.
fn trimmed(object: &Object) -> Object {
    let mut object = object.clone();
    match &mut object {
        Object::Service(o) => model::trim::service(o),
        Object::EndpointSlice(o) => model::trim::endpoint_slice(o),
        Object::Pod(o) => model::trim::pod(o),
        Object::Node(o) => model::trim::node(o),
    }
    object
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
    let mut objects = FileObjects::new();
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
                objects.push(Object::Service(service));
            }
            "Pod" => {
                let pod: Pod = typed(value).map_err(fail)?;
                first_error(model::validate_pod(&pod)).map_err(fail)?;
                objects.push(Object::Pod(pod));
            }
            "EndpointSlice" => {
                let slice: EndpointSlice = typed(value).map_err(fail)?;
                first_error(model::validate_endpoint_slice(&slice)).map_err(fail)?;
                objects.push(Object::EndpointSlice(slice));
            }
            // For this node's zone label (topology hints).
            "Node" => objects.push(Object::Node(typed(value).map_err(fail)?)),
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

/// Reads `dir` now, then again whenever a file in it changes, sending what changed. Errors
/// are logged with file and field; the previous good state of a broken file keeps being served.
/// A directory that is removed or replaced keeps the last state programmed until it is back
/// (looked for every second), then is read and watched again.
pub async fn watch(
    mut manifests: ManifestDir,
    changes: Changes,
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
        let read = match publish(&mut manifests, &changes, &metrics) {
            Ok(false) => return Ok(()),
            Ok(true) => Ok(()),
            Err(error) => Err(error),
        };
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

/// Sends what changed in the directory; `false` once the agent stopped listening.
fn publish(manifests: &mut ManifestDir, changes: &Changes, metrics: &AgentMetrics) -> std::io::Result<bool> {
    let (changed, errors) = manifests.changes()?;
    for error in &errors {
        tracing::error!("{error}; its last good contents stay in effect");
        metrics.source_error("manifests");
    }
    let objects = changed
        .iter()
        .filter(|change| !matches!(change, Change::Listed(..)))
        .count();
    tracing::info!(objects, "read manifests from {}", manifests.dir().display());
    Ok(changed.into_iter().all(|change| changes.send(change).is_ok()))
}

#[cfg(test)]
mod tests;
