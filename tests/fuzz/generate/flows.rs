//! Service traffic: the packets of flows to frontends and their replies, from pods, from outside
//! clients, leaving for other nodes and coming back, and pods reaching their own Service.
use super::{Generator, Program};
use crate::topology::{CLIENT_PORTS, EXTERNAL_PORTS, NODE_ADDRS, SNAT_ADDR, SNAT_PORTS};

impl Generator {
    /// An outside client's SYN, data segment or datagram to an external frontend (now and then
    /// to a ClusterIP), arriving on the external interface.
    pub(super) fn external_request(&mut self, frame: &mut Vec<u8>) -> Program {
        let service = if self.rng.percent(90) {
            self.external_service()
        } else {
            self.service()
        };
        let client = self.external_client();
        let frontend = self.frontend_of(service);
        let segment = self.segment(client, frontend, service.proto);
        self.write_segment(frame, &segment);
        self.between_headers(frame);
        self.maybe_pad(frame);
        self.external_ingress()
    }

    /// An external flow as DNATed on the way in, leaving the node for its backend on another
    /// node: source NAT when the flow was tracked with externalTrafficPolicy Cluster.
    pub(super) fn forwarded(&mut self, frame: &mut Vec<u8>) -> Program {
        let service = self.snat_service();
        let backend = *self.rng.pick(&service.backends);
        let client = self.external_client();
        let segment = self.segment(client, backend, service.proto);
        self.write_segment(frame, &segment);
        self.maybe_pad(frame);
        Program::NodeportEgress
    }

    /// A backend on another node answering a source-NATed flow: to the node's address, on the
    /// port the client kept (or a probed one, or another address of the node).
    pub(super) fn snat_reply(&mut self, frame: &mut Vec<u8>) -> Program {
        let service = self.snat_service();
        let backend = *self.rng.pick(&service.backends);
        let port = if self.rng.percent(85) {
            *self.rng.pick(&EXTERNAL_PORTS)
        } else {
            SNAT_PORTS.start + self.rng.below(SNAT_PORTS.len()) as u16
        };
        let addr = if self.rng.percent(90) {
            SNAT_ADDR
        } else {
            *self.rng.pick(&NODE_ADDRS)
        };
        let segment = self.segment(backend, (self.at(addr), port), service.proto);
        self.write_segment(frame, &segment);
        self.maybe_pad(frame);
        self.external_ingress()
    }

    /// A backend answering an outside client, on its way out of the external interface.
    pub(super) fn external_reply(&mut self, frame: &mut Vec<u8>) -> Program {
        let service = self.service_where(|s| s.is_external() && !s.backends.is_empty());
        let backend = *self.rng.pick(&service.backends);
        let client = self.external_client();
        let segment = self.segment(backend, client, service.proto);
        self.write_segment(frame, &segment);
        self.maybe_pad(frame);
        Program::NodeportEgress
    }

    /// A client's SYN, data segment or datagram to a frontend, the way a pod sends it: sometimes
    /// with IP options or IPv6 extension headers, or Ethernet padding.
    pub(super) fn service_request(&mut self, frame: &mut Vec<u8>) -> Program {
        let service = self.service();
        let client = self.client();
        let frontend = self.frontend_of(service);
        let segment = self.segment(client, frontend, service.proto);
        self.write_segment(frame, &segment);
        self.between_headers(frame);
        self.maybe_pad(frame);
        Program::FromPod
    }

    /// A backend answering a client: part of a tracked flow when the client and port match one.
    pub(super) fn backend_reply(&mut self, frame: &mut Vec<u8>) -> Program {
        let service = self.service_with_backends();
        let backend = *self.rng.pick(&service.backends);
        let client = self.client();
        let segment = self.segment(backend, client, service.proto);
        self.write_segment(frame, &segment);
        self.between_headers(frame);
        self.maybe_pad(frame);
        Program::ToPod
    }

    /// A backend pod reaching its own Service (given itself now and then), or answering such a
    /// connection: to the hairpin address, on a client port.
    pub(super) fn hairpin(&mut self, frame: &mut Vec<u8>) -> Program {
        let service = self.service_with_backends();
        let pod = *self.rng.pick(&service.backends);
        let port = CLIENT_PORTS.start + self.rng.below(CLIENT_PORTS.len()) as u16;
        let segment = if self.rng.percent(50) {
            let frontend = self.frontend_of(service);
            self.segment((pod.0, port), frontend, service.proto)
        } else {
            self.segment(pod, (self.family.hairpin(), port), service.proto)
        };
        self.write_segment(frame, &segment);
        self.maybe_pad(frame);
        Program::FromPod
    }
}
