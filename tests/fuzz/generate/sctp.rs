//! SCTP packets (RFC 9260): the common header and a first chunk of the kinds conntrack follows
//! (INIT opens an association, ABORT and SHUTDOWN COMPLETE close it, others carry it), now and
//! then with more chunks behind it, and a CRC32c that is right, wrong, or zero (left to offload).
use super::{Generator, Segment};
use crate::checksum::{SCTP_CRC_AT, sctp_crc};

/// Chunk types (RFC 9260 §3.2).
pub const DATA: u8 = 0;
pub const INIT: u8 = 1;
pub const INIT_ACK: u8 = 2;
pub const SACK: u8 = 3;
pub const HEARTBEAT: u8 = 4;
pub const ABORT: u8 = 6;
pub const SHUTDOWN: u8 = 7;
pub const COOKIE_ECHO: u8 = 10;
pub const SHUTDOWN_COMPLETE: u8 = 14;
/// Every type above, for mutations.
pub const CHUNKS: [u8; 9] = [
    DATA,
    INIT,
    INIT_ACK,
    SACK,
    HEARTBEAT,
    ABORT,
    SHUTDOWN,
    COOKIE_ECHO,
    SHUTDOWN_COMPLETE,
];

/// How an SCTP packet's checksum is sent.
#[derive(Clone, Copy)]
pub enum Crc {
    Right,
    /// Off by a non-zero difference: the receiver drops it, before and after a translation.
    Wrong,
    /// Zero: the sender left it to checksum offload.
    Zero,
}

impl Generator {
    /// Mostly INITs and DATA, the packets of an association's life.
    pub(super) fn sctp_chunk(&mut self) -> u8 {
        match self.rng.below(20) {
            0..7 => INIT,
            7..12 => DATA,
            12..14 => ABORT,
            14..16 => SHUTDOWN_COMPLETE,
            _ => *self.rng.pick(&[INIT_ACK, SACK, HEARTBEAT, SHUTDOWN, COOKIE_ECHO]),
        }
    }

    pub(super) fn sctp_crc(&mut self) -> Crc {
        match self.rng.below(100) {
            0..80 => Crc::Right,
            80..92 => Crc::Wrong,
            _ => Crc::Zero,
        }
    }

    /// The segment's SCTP packet into `l4`.
    pub(super) fn write_sctp(&mut self, segment: &Segment) {
        self.l4.extend_from_slice(&segment.src.1.to_be_bytes());
        self.l4.extend_from_slice(&segment.dst.1.to_be_bytes());
        // The verification tag: an INIT carries 0.
        let tag = if segment.sctp_chunk == INIT {
            0
        } else {
            self.rng.next_u64() as u32
        };
        self.l4.extend_from_slice(&tag.to_be_bytes());
        self.l4.extend_from_slice(&[0; 4]);
        let value_len = self.rng.payload_len();
        self.chunk(segment.sctp_chunk, value_len);
        // Only the first chunk is looked at: a bundled ABORT behind it changes nothing. Short,
        // so that the frame stays within MAX_PAYLOAD and its headers.
        if self.rng.percent(10) {
            let (bundled, value_len) = (*self.rng.pick(&[DATA, SACK, ABORT]), self.rng.below(32));
            self.chunk(bundled, value_len);
        }
        let crc = match segment.sctp_crc {
            Crc::Right => sctp_crc(&self.l4),
            Crc::Wrong => {
                let right = u32::from_le_bytes(sctp_crc(&self.l4));
                (right ^ (self.rng.next_u64() as u32 | 1)).to_le_bytes()
            }
            Crc::Zero => [0; 4],
        };
        self.l4[SCTP_CRC_AT].copy_from_slice(&crc);
    }

    /// A chunk of `kind`: its header (type, flags, length) and a random value, padded to 4 bytes.
    fn chunk(&mut self, kind: u8, value: usize) {
        self.l4.push(kind);
        self.l4.push(self.rng.byte() & 1);
        self.l4.extend_from_slice(&((4 + value) as u16).to_be_bytes());
        self.random_bytes(value);
        self.l4.resize(self.l4.len().next_multiple_of(4), 0);
    }
}
