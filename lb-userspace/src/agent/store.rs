//! The objects the agent knows, indexed the way the model asks for them (EndpointSlices by
//! Service, Pods by namespace and label), and which Services each change touches.
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use k8s_openapi::api::core::v1::{Node, Pod, Service};

use crate::{
    model::{self, EndpointsFrom, Objects, ServiceName, Slice, ZONE_LABEL, slice::Names},
    source::{Change, Kind, Object},
};

/// `namespace/name` of any object.
type Name = ServiceName;

/// The Services whose frontends a batch of changes may have changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Touched {
    pub services: BTreeSet<ServiceName>,
    /// Something every Service reads changed (this node's zone).
    pub all: bool,
}

impl Touched {
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && !self.all
    }
}

/// A Service kept as compact JSON, decoded when the model reads it: the API's type takes about
/// 4.5 KB a Service in memory once trimmed (its spec alone is 416 bytes before any string), the
/// JSON a tenth of that. With endpoints from Pods its selector is kept decoded too, for the Pod
/// events that ask which Services select them.
struct StoredService {
    json: Box<[u8]>,
    selector: Option<BTreeMap<String, String>>,
}

impl StoredService {
    fn decode(&self) -> Service {
        serde_json::from_slice(&self.json).expect("the store encoded it")
    }
}

pub struct Store {
    endpoints_from: EndpointsFrom,
    node_name: Option<String>,
    services: HashMap<ServiceName, StoredService>,
    /// Service names by namespace, for the Services a Pod may be selected by.
    services_in: HashMap<String, BTreeSet<String>>,
    /// EndpointSlices as the model reads them, by their own name.
    slices: HashMap<Name, Slice>,
    /// Node and zone names the slices share.
    names: Names,
    /// Slice names (in the Service's namespace) by the Service they belong to.
    slices_of: HashMap<ServiceName, BTreeSet<String>>,
    pods: HashMap<Name, Pod>,
    /// Pod names by (namespace, label key, label value).
    pods_labelled: HashMap<(String, String, String), HashSet<String>>,
    node: Option<Node>,
    listed: BTreeSet<Kind>,
}

fn name_of(metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Name {
    Name {
        namespace: metadata.namespace.clone().unwrap_or_else(|| "default".into()),
        name: metadata.name.clone().unwrap_or_default(),
    }
}

impl Store {
    /// Pods are kept only when endpoints come from them; of Nodes, only `node_name`'s.
    pub fn new(endpoints_from: EndpointsFrom, node_name: Option<String>) -> Self {
        Self {
            endpoints_from,
            node_name,
            services: HashMap::new(),
            services_in: HashMap::new(),
            slices: HashMap::new(),
            names: Names::default(),
            slices_of: HashMap::new(),
            pods: HashMap::new(),
            pods_labelled: HashMap::new(),
            node: None,
            listed: BTreeSet::new(),
        }
    }

    /// Whether each of `kinds` has been listed at least once.
    pub fn has_listed(&self, kinds: &[Kind]) -> bool {
        kinds.iter().all(|kind| self.listed.contains(kind))
    }

    pub fn service_names(&self) -> impl Iterator<Item = &ServiceName> {
        self.services.keys()
    }

    /// The Service `name`, decoded.
    pub fn service(&self, name: &ServiceName) -> Option<Service> {
        self.services.get(name).map(StoredService::decode)
    }

    /// This node's zone, from its Node's label.
    pub fn zone(&self) -> Option<&str> {
        self.node
            .as_ref()?
            .metadata
            .labels
            .as_ref()?
            .get(ZONE_LABEL)
            .map(String::as_str)
    }

    /// Applies `change`, adding the Services it touches to `touched`.
    pub fn apply(&mut self, change: Change, touched: &mut Touched) {
        match change {
            Change::Applied(object) => self.put(object, touched),
            Change::Deleted(object) => self.remove(&object, touched),
            Change::Listed(kind, names) => {
                self.listed.insert(kind);
                let listed: HashSet<Name> = names.into_iter().collect();
                let gone: Vec<Name> = self.names(kind).filter(|n| !listed.contains(n)).collect();
                for name in gone {
                    self.remove_named(kind, &name, touched);
                }
            }
        }
    }

    fn names(&self, kind: Kind) -> Box<dyn Iterator<Item = Name> + '_> {
        match kind {
            Kind::Service => Box::new(self.services.keys().cloned()),
            Kind::EndpointSlice => Box::new(self.slices.keys().cloned()),
            Kind::Pod => Box::new(self.pods.keys().cloned()),
            Kind::Node => Box::new(self.node.iter().map(|n| name_of(&n.metadata))),
        }
    }

    fn put(&mut self, object: Object, touched: &mut Touched) {
        let name = name_of(object.metadata());
        match object {
            Object::Service(service) => {
                let json: Box<[u8]> = serde_json::to_vec(&service).expect("a Service encodes").into();
                if self.services.get(&name).is_some_and(|stored| stored.json == json) {
                    return;
                }
                let selector = (self.endpoints_from == EndpointsFrom::Pods)
                    .then(|| service.spec.and_then(|spec| spec.selector))
                    .flatten();
                self.services_in
                    .entry(name.namespace.clone())
                    .or_default()
                    .insert(name.name.clone());
                self.services
                    .insert(name.clone(), StoredService { json, selector });
                touched.services.insert(name);
            }
            Object::EndpointSlice(slice) => {
                let Some(slice) = Slice::new(&slice, &mut self.names) else {
                    // Of no Service (or of FQDNs): nothing the model reads.
                    return self.remove_named(Kind::EndpointSlice, &name, touched);
                };
                if self.slices.get(&name) == Some(&slice) {
                    return;
                }
                if let Some(old) = self.slices.remove(&name) {
                    self.unindex_slice(&name, &old, touched);
                }
                self.slices_of
                    .entry(slice.service.clone())
                    .or_default()
                    .insert(name.name.clone());
                touched.services.insert(slice.service.clone());
                self.slices.insert(name, slice);
            }
            Object::Pod(pod) => {
                if self.endpoints_from != EndpointsFrom::Pods || self.pods.get(&name) == Some(&pod) {
                    return;
                }
                if let Some(old) = self.pods.remove(&name) {
                    self.touch_selecting(&name.namespace, old.metadata.labels.as_ref(), touched);
                    self.unindex_pod(&name, &old);
                }
                self.touch_selecting(&name.namespace, pod.metadata.labels.as_ref(), touched);
                self.index_pod(&name, &pod);
                self.pods.insert(name, pod);
            }
            Object::Node(node) => {
                if self.node_name.is_none() || node.metadata.name != self.node_name {
                    return;
                }
                let zone_before = self.zone().map(str::to_owned);
                self.node = Some(node);
                touched.all |= self.zone().map(str::to_owned) != zone_before;
            }
        }
    }

    fn remove(&mut self, object: &Object, touched: &mut Touched) {
        self.remove_named(object.kind(), &name_of(object.metadata()), touched);
    }

    fn remove_named(&mut self, kind: Kind, name: &Name, touched: &mut Touched) {
        match kind {
            Kind::Service => {
                if self.services.remove(name).is_some() {
                    if let Some(names) = self.services_in.get_mut(&name.namespace) {
                        names.remove(&name.name);
                    }
                    touched.services.insert(name.clone());
                }
            }
            Kind::EndpointSlice => {
                if let Some(old) = self.slices.remove(name) {
                    self.unindex_slice(name, &old, touched);
                }
            }
            Kind::Pod => {
                if let Some(old) = self.pods.remove(name) {
                    self.touch_selecting(&name.namespace, old.metadata.labels.as_ref(), touched);
                    self.unindex_pod(name, &old);
                }
            }
            Kind::Node => {
                if self.node.as_ref().is_some_and(|n| name_of(&n.metadata) == *name) {
                    let had_zone = self.zone().is_some();
                    self.node = None;
                    touched.all |= had_zone;
                }
            }
        }
    }

    fn unindex_slice(&mut self, name: &Name, old: &Slice, touched: &mut Touched) {
        if let Some(slices) = self.slices_of.get_mut(&old.service) {
            slices.remove(&name.name);
            if slices.is_empty() {
                self.slices_of.remove(&old.service);
            }
        }
        touched.services.insert(old.service.clone());
    }

    /// Touches the Services of `namespace` whose selector matches `labels`.
    fn touch_selecting(
        &self,
        namespace: &str,
        labels: Option<&BTreeMap<String, String>>,
        touched: &mut Touched,
    ) {
        for name in self.services_in.get(namespace).into_iter().flatten() {
            let service = ServiceName {
                namespace: namespace.to_owned(),
                name: name.clone(),
            };
            if self
                .services
                .get(&service)
                .is_some_and(|s| model::selects(s.selector.as_ref(), labels))
            {
                touched.services.insert(service);
            }
        }
    }

    fn index_pod(&mut self, name: &Name, pod: &Pod) {
        for (key, value) in pod.metadata.labels.iter().flatten() {
            self.pods_labelled
                .entry((name.namespace.clone(), key.clone(), value.clone()))
                .or_default()
                .insert(name.name.clone());
        }
    }

    fn unindex_pod(&mut self, name: &Name, pod: &Pod) {
        for (key, value) in pod.metadata.labels.iter().flatten() {
            let label = (name.namespace.clone(), key.clone(), value.clone());
            if let Some(pods) = self.pods_labelled.get_mut(&label) {
                pods.remove(&name.name);
                if pods.is_empty() {
                    self.pods_labelled.remove(&label);
                }
            }
        }
    }
}

impl Objects for Store {
    fn endpoint_slices(&self, service: &ServiceName) -> Vec<&Slice> {
        let names = self.slices_of.get(service).into_iter().flatten();
        names
            .filter_map(|name| {
                self.slices.get(&Name {
                    namespace: service.namespace.clone(),
                    name: name.clone(),
                })
            })
            .collect()
    }

    fn pods(&self, namespace: &str, selector: &BTreeMap<String, String>) -> Vec<&Pod> {
        // The pods carrying the selector's rarest label; the model matches the rest.
        let candidates = selector
            .iter()
            .map(|(key, value)| {
                self.pods_labelled
                    .get(&(namespace.to_owned(), key.clone(), value.clone()))
            })
            .min_by_key(|pods| pods.map_or(0, HashSet::len))
            .flatten();
        candidates
            .into_iter()
            .flatten()
            .filter_map(|name| {
                self.pods.get(&Name {
                    namespace: namespace.to_owned(),
                    name: name.clone(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Context, Input};

    fn service(namespace: &str, name: &str, selector: &str) -> Object {
        Object::Service(
            serde_yaml_ng::from_str(&format!(
                "metadata: {{name: {name}, namespace: {namespace}}}\n\
                 spec: {{clusterIP: 10.96.0.10, selector: {selector}, ports: [{{port: 80}}]}}"
            ))
            .unwrap(),
        )
    }

    fn pod(namespace: &str, name: &str, labels: &str, ip: &str) -> Object {
        Object::Pod(
            serde_yaml_ng::from_str(&format!(
                "metadata: {{name: {name}, namespace: {namespace}, labels: {labels}}}\n\
                 status: {{phase: Running, podIP: {ip}, conditions: [{{type: Ready, status: 'True'}}]}}"
            ))
            .unwrap(),
        )
    }

    fn slice(name: &str, service: &str, ip: &str) -> Object {
        Object::EndpointSlice(
            serde_yaml_ng::from_str(&format!(
                "metadata: {{name: {name}, namespace: default, labels: {{kubernetes.io/service-name: {service}}}}}\n\
                 addressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{{addresses: [{ip}]}}]"
            ))
            .unwrap(),
        )
    }

    /// A list as a source sends it: each object, then their names.
    fn listed(store: &mut Store, kind: Kind, objects: Vec<Object>) -> Vec<String> {
        let mut touched = Touched::default();
        let names = objects.iter().map(Object::name).collect();
        for object in objects {
            store.apply(Change::Applied(object), &mut touched);
        }
        store.apply(Change::Listed(kind, names), &mut touched);
        touched.services.iter().map(ToString::to_string).collect()
    }

    fn touched(store: &mut Store, change: Change) -> Vec<String> {
        let mut touched = Touched::default();
        store.apply(change, &mut touched);
        touched.services.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn a_pod_touches_the_services_of_its_namespace_selecting_its_old_or_new_labels() {
        let mut store = Store::new(EndpointsFrom::Pods, None);
        for object in [
            service("default", "web", "{app: web}"),
            service("default", "api", "{app: api}"),
            service("other", "web", "{app: web}"),
        ] {
            store.apply(Change::Applied(object), &mut Touched::default());
        }
        let web = pod("default", "p", "{app: web}", "10.0.0.1");
        assert_eq!(touched(&mut store, Change::Applied(web.clone())), ["default/web"]);
        assert!(
            touched(&mut store, Change::Applied(web)).is_empty(),
            "no change, nothing touched"
        );
        assert_eq!(
            touched(
                &mut store,
                Change::Applied(pod("default", "p", "{app: api}", "10.0.0.1"))
            ),
            ["default/api", "default/web"],
            "relabelled: the Service it left and the one it joined"
        );
        assert_eq!(
            touched(
                &mut store,
                Change::Deleted(pod("default", "p", "{app: api}", "10.0.0.1"))
            ),
            ["default/api"]
        );
    }

    #[test]
    fn a_slice_touches_its_service_and_a_list_removes_what_it_lacks() {
        let mut store = Store::new(EndpointsFrom::Slices, None);
        let list = vec![
            slice("web-1", "web", "10.0.0.1"),
            slice("api-1", "api", "10.0.0.2"),
        ];
        assert_eq!(
            listed(&mut store, Kind::EndpointSlice, list),
            ["default/api", "default/web"]
        );
        assert!(store.has_listed(&[Kind::EndpointSlice]) && !store.has_listed(&[Kind::Service]));
        assert_eq!(
            touched(&mut store, Change::Applied(slice("web-1", "api", "10.0.0.1"))),
            ["default/api", "default/web"],
            "a slice moved to another Service touches both"
        );
        assert_eq!(
            listed(
                &mut store,
                Kind::EndpointSlice,
                vec![slice("web-1", "api", "10.0.0.1")]
            ),
            ["default/api"],
            "a re-list without api-1 removes it; web-1 is unchanged"
        );
        assert!(
            store
                .endpoint_slices(&ServiceName {
                    namespace: "default".into(),
                    name: "web".into()
                })
                .is_empty()
        );
        assert_eq!(
            store
                .endpoint_slices(&ServiceName {
                    namespace: "default".into(),
                    name: "api".into()
                })
                .len(),
            1
        );
    }

    /// After any sequence of changes, each Service computed from the store's indexes is what
    /// the model computes from the same objects as plain lists.
    #[test]
    fn the_store_computes_what_the_model_computes_from_lists() {
        let mut store = Store::new(EndpointsFrom::Pods, None);
        listed(
            &mut store,
            Kind::Service,
            vec![service("default", "web", "{app: web, tier: a}")],
        );
        listed(
            &mut store,
            Kind::Pod,
            vec![pod("default", "w1", "{app: web, tier: a}", "10.0.0.1")],
        );
        let changes = [
            Change::Applied(pod("default", "w2", "{app: web, tier: a, x: y}", "10.0.0.2")),
            Change::Applied(pod("default", "w3", "{app: web}", "10.0.0.3")),
            Change::Applied(pod("other", "w4", "{app: web, tier: a}", "10.0.0.4")),
            Change::Applied(service("default", "api", "{tier: a}")),
            Change::Deleted(pod("default", "w1", "{app: web, tier: a}", "10.0.0.1")),
        ];
        for change in changes {
            store.apply(change, &mut Touched::default());
        }
        let services: Vec<Service> = store.services.values().map(StoredService::decode).collect();
        let pods: Vec<Pod> = store.pods.values().cloned().collect();
        let input = Input {
            services: &services,
            pods: &pods,
            endpoints_from: EndpointsFrom::Pods,
            ..Input::default()
        };
        let expected = model::compute(&input);
        let context = Context {
            endpoints_from: EndpointsFrom::Pods,
            ..Context::default()
        };
        let mut names: Vec<&ServiceName> = store.services.keys().collect();
        names.sort();
        let computed: Vec<_> = names
            .into_iter()
            .flat_map(|name| {
                model::compute_service(&store.services[name].decode(), &store, &context).frontends
            })
            .collect();
        assert_eq!(computed, expected.frontends);
        let backends: Vec<usize> = computed.iter().map(|f| f.backends.len()).collect();
        assert_eq!(
            backends,
            [1, 1],
            "api selects w2; web selects w2 (w3 lacks tier, w4 is elsewhere)"
        );
    }
}
