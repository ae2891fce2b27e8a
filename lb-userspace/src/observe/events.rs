//! Kubernetes Events for what the model passed over in a Service (an invalid port, an unknown
//! annotation value…), so `kubectl describe service` shows it where its owner looks. Published
//! by kube's `Recorder` from a background task: the sync loop never waits on the API server.
//! The caller sends a warning when it appears, not on every pass; the Recorder folds repeats
//! within a few minutes into one Event's series.
use k8s_openapi::api::core::v1::{ObjectReference, Service};
use kube::{
    Client, Resource as _,
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use tokio::sync::mpsc;

/// The Event note limit is 1 kB.
const NOTE_LIMIT: usize = 1000;

pub struct Events {
    sender: mpsc::UnboundedSender<(ObjectReference, String)>,
}

impl Events {
    /// Publishes as controller `switchboard`, instance `instance` (the node name), from a task
    /// on the running Tokio runtime.
    pub fn start(client: Client, instance: String) -> Self {
        let reporter = Reporter {
            controller: "switchboard".into(),
            instance: Some(instance),
        };
        let recorder = Recorder::new(client, reporter);
        let (sender, mut received) = mpsc::unbounded_channel::<(ObjectReference, String)>();
        tokio::spawn(async move {
            while let Some((regarding, note)) = received.recv().await {
                let event = Event {
                    type_: EventType::Warning,
                    reason: "ServiceWarning".into(),
                    note: Some(note),
                    action: "Program".into(),
                    secondary: None,
                };
                if let Err(error) = recorder.publish(&event, &regarding).await {
                    // The warning is in the agent's log already; an Event is a courtesy.
                    tracing::debug!(
                        service = regarding.name.as_deref().unwrap_or_default(),
                        "cannot publish an Event: {error}"
                    );
                }
            }
        });
        Self { sender }
    }

    /// A Warning Event about `service`.
    pub fn warn(&self, service: &Service, note: &str) {
        let mut note = note.to_owned();
        if note.len() > NOTE_LIMIT {
            let mut end = NOTE_LIMIT;
            while !note.is_char_boundary(end) {
                end -= 1;
            }
            note.truncate(end);
        }
        let _ = self.sender.send((service.object_ref(&()), note));
    }
}
