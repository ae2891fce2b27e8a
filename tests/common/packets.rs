//! Crafted frames for BPF_PROG_TEST_RUN, and checks on what comes out, with checksums verified
//! by etherparse, which computes them from scratch.
use etherparse::{NetHeaders, PacketBuilder, PacketHeaders, TransportHeader};

pub type Endpoint = ([u8; 4], u16);

const SRC_MAC: [u8; 6] = [2, 0, 0, 0, 0, 20];
const DST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];

pub fn tcp_syn(src: Endpoint, dst: Endpoint) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(SRC_MAC, DST_MAC)
        .ipv4(src.0, dst.0, 64)
        .tcp(src.1, dst.1, 1000, 64240)
        .syn();
    let mut packet = Vec::new();
    builder.write(&mut packet, &[]).unwrap();
    packet
}

pub fn tcp_data(src: Endpoint, dst: Endpoint, payload: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(DST_MAC, SRC_MAC)
        .ipv4(src.0, dst.0, 64)
        .tcp(src.1, dst.1, 5000, 64240)
        .ack(1001)
        .psh();
    let mut packet = Vec::new();
    builder.write(&mut packet, payload).unwrap();
    packet
}

/// A FIN|ACK, or a RST, closing a flow.
pub fn tcp_close(src: Endpoint, dst: Endpoint, reset: bool) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(SRC_MAC, DST_MAC)
        .ipv4(src.0, dst.0, 64)
        .tcp(src.1, dst.1, 5000, 64240);
    let builder = if reset {
        builder.rst()
    } else {
        builder.fin().ack(1001)
    };
    let mut packet = Vec::new();
    builder.write(&mut packet, &[]).unwrap();
    packet
}

pub fn udp(src: Endpoint, dst: Endpoint, payload: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(SRC_MAC, DST_MAC)
        .ipv4(src.0, dst.0, 64)
        .udp(src.1, dst.1);
    let mut packet = Vec::new();
    builder.write(&mut packet, payload).unwrap();
    packet
}

/// The packet's (source, destination), after asserting that its IPv4 and L4 checksums are what
/// etherparse computes from scratch.
pub fn addresses_with_valid_checksums(packet: &[u8]) -> (Endpoint, Endpoint) {
    let headers = PacketHeaders::from_ethernet_slice(packet).expect("the output parses");
    let Some(NetHeaders::Ipv4(ip, _)) = headers.net else {
        panic!("not IPv4: {headers:?}")
    };
    assert_eq!(
        ip.header_checksum,
        ip.calc_header_checksum(),
        "IPv4 header checksum"
    );
    let payload = headers.payload.slice();
    let (src_port, dst_port) = match headers.transport {
        Some(TransportHeader::Tcp(tcp)) => {
            assert_eq!(
                tcp.checksum,
                tcp.calc_checksum_ipv4(&ip, payload).unwrap(),
                "TCP checksum"
            );
            (tcp.source_port, tcp.destination_port)
        }
        Some(TransportHeader::Udp(udp)) => {
            if udp.checksum != 0 {
                assert_eq!(
                    udp.checksum,
                    udp.calc_checksum_ipv4(&ip, payload).unwrap(),
                    "UDP checksum"
                );
            }
            (udp.source_port, udp.destination_port)
        }
        other => panic!("unexpected transport {other:?}"),
    };
    ((ip.source, src_port), (ip.destination, dst_port))
}
