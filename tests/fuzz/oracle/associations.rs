//! SCTP associations in conntrack, which no packet shows: an ABORT or SHUTDOWN COMPLETE marks
//! the entry it passes through closing (so the agent forgets the association after the short
//! timeout), an INIT opens it anew (the client's INIT both of the flow's entries), and a flow
//! first met with a closing chunk starts closing. Checked against the conntrack maps at the end
//! of a run.
use std::collections::HashMap;

use lb_common::IPPROTO_SCTP;

use super::parse::{Packet, Tuple};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Keyed as the client sends.
    Forward,
    /// Keyed as the backend replies.
    Reply,
}

/// Whether each SCTP conntrack entry is marked closing.
#[derive(Default)]
pub struct Associations(HashMap<(Direction, Tuple), bool>);

impl Associations {
    /// A new flow of `packet`, replied to on `reply`.
    pub fn track(&mut self, packet: &Packet, frame: &[u8], reply: Tuple) {
        if packet.proto == IPPROTO_SCTP {
            let closing = packet.closes(frame);
            self.0.insert((Direction::Forward, packet.tuple()), closing);
            self.0.insert((Direction::Reply, reply), closing);
        }
    }

    /// A client's packet on a tracked flow, replied to on `reply`.
    pub fn forward(&mut self, packet: &Packet, frame: &[u8], reply: Tuple) {
        if packet.proto == IPPROTO_SCTP {
            self.seen((Direction::Forward, packet.tuple()), packet, frame);
            if packet.opens(frame) {
                self.0.insert((Direction::Reply, reply), false);
            }
        }
    }

    /// A backend's packet on a tracked flow.
    pub fn reply(&mut self, packet: &Packet, frame: &[u8]) {
        if packet.proto == IPPROTO_SCTP {
            self.seen((Direction::Reply, packet.tuple()), packet, frame);
        }
    }

    fn seen(&mut self, entry: (Direction, Tuple), packet: &Packet, frame: &[u8]) {
        let closing = self.0.entry(entry).or_default();
        if packet.closes(frame) {
            *closing = true;
        } else if packet.opens(frame) {
            *closing = false;
        }
    }

    /// Compares the datapath's SCTP entries, (direction, tuple, closing), with the model's:
    /// the same entries, each closing or not alike. Returns how many agree, or what differs.
    pub fn check(&self, entries: &[(Direction, Tuple, bool)]) -> Result<usize, Vec<String>> {
        let mut errors = Vec::new();
        for &(direction, tuple, closing) in entries {
            match self.0.get(&(direction, tuple)) {
                None => errors.push(format!(
                    "conntrack has an SCTP entry {direction:?} {tuple:?} never made"
                )),
                Some(&expected) if expected != closing => errors.push(format!(
                    "SCTP entry {direction:?} {tuple:?}: closing {closing}, expected {expected}"
                )),
                Some(_) => {}
            }
        }
        if entries.len() != self.0.len() {
            errors.push(format!(
                "conntrack holds {} SCTP entries, the oracle expected {}",
                entries.len(),
                self.0.len()
            ));
        }
        if errors.is_empty() {
            Ok(entries.len())
        } else {
            Err(errors)
        }
    }

    /// How many entries are closing.
    pub fn closing(&self) -> usize {
        self.0.values().filter(|closing| **closing).count()
    }
}
