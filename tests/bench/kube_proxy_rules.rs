//! The rule sets kube-proxy would program for a set of ClusterIP service ports, in its iptables
//! mode (an `iptables-restore` file) and its nftables mode (an `nft -f` script).
//!
//! The shapes follow kube-proxy's own expected outputs (pkg/proxy/iptables and pkg/proxy/nftables
//! proxier tests): KUBE-SERVICES with one rule per service port → KUBE-SVC-* choosing an endpoint
//! with `statistic --probability` → KUBE-SEP-* DNAT; and for nftables the `service-ips` verdict
//! map → `service-*` chain with `numgen random mod N vmap` → `endpoint-*` chain DNAT, plus the
//! base chains and checks kube-proxy always installs. Only ClusterIP service ports with endpoints
//! are generated: that is all Switchboard programs today, so both sides carry the same services.
//!
//! This module is shared by the bench and by tests/kube_proxy_rules.rs, so it depends on nothing
//! else in the bench.
use std::{fmt::Write as _, net::Ipv4Addr};

/// The mark kube-proxy uses to ask for masquerading.
const MASQUERADE_MARK: &str = "0x4000";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

/// One port of one Service, with its ready endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    pub endpoints: Vec<(Ipv4Addr, u16)>,
}

impl ServicePort {
    /// `namespace/name:port`, as kube-proxy writes it in comments.
    fn display_name(&self) -> String {
        format!("{}/{}:{}", self.namespace, self.name, self.port_name)
    }
}

/// The cluster's address ranges, which kube-proxy's rules mention.
#[derive(Clone, Copy, Debug)]
pub struct ClusterCidrs {
    /// Pod addresses: traffic from outside it to a ClusterIP is masqueraded.
    pub pods: &'static str,
    /// ClusterIPs: the nftables rules drop traffic to unallocated ones.
    pub services: &'static str,
}

/// The `iptables-restore` input kube-proxy's iptables mode would write (filter and nat tables).
/// Loading it without `--noflush` replaces both tables, which is what a scratch namespace wants.
pub fn iptables_restore(services: &[ServicePort], cidrs: ClusterCidrs) -> String {
    let mut out = String::with_capacity(services.len() * 1200 + 4096);
    out.push_str(&iptables_filter_table());

    let mut chains = String::new();
    let mut rules = String::new();
    for service in services {
        let svc_chain = format!(
            "KUBE-SVC-{}",
            chain_hash(&[&service.display_name(), service.protocol.as_str()])
        );
        let _ = writeln!(chains, ":{svc_chain} - [0:0]");
        let proto = service.protocol.as_str();
        let name = service.display_name();
        let (ip, port) = (service.cluster_ip, service.port);
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" -m {proto} -p {proto} -d {ip} --dport {port} -j {svc_chain}"
        );
        let _ = writeln!(
            rules,
            "-A {svc_chain} -m comment --comment \"{name} cluster IP\" -m {proto} -p {proto} -d {ip} --dport {port} ! -s {} -j KUBE-MARK-MASQ",
            cidrs.pods
        );
        let count = service.endpoints.len();
        for (index, (endpoint_ip, endpoint_port)) in service.endpoints.iter().enumerate() {
            let endpoint = format!("{endpoint_ip}:{endpoint_port}");
            let sep_chain = format!("KUBE-SEP-{}", chain_hash(&[&name, proto, &endpoint]));
            let _ = writeln!(chains, ":{sep_chain} - [0:0]");
            // Endpoint i of n is taken with probability 1/(n-i), so each gets 1/n overall; the
            // last one needs no test.
            let statistic = if index + 1 < count {
                format!(
                    " -m statistic --mode random --probability {:.10}",
                    1.0 / (count - index) as f64
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                rules,
                "-A {svc_chain} -m comment --comment \"{name} -> {endpoint}\"{statistic} -j {sep_chain}"
            );
            let _ = writeln!(
                rules,
                "-A {sep_chain} -m comment --comment {name} -s {endpoint_ip} -j KUBE-MARK-MASQ"
            );
            let _ = writeln!(
                rules,
                "-A {sep_chain} -m comment --comment {name} -m {proto} -p {proto} -j DNAT --to-destination {endpoint}"
            );
        }
    }

    out.push_str("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n");
    out.push_str(":KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n");
    out.push_str(&chains);
    out.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n",
    );
    let _ = writeln!(out, "-A KUBE-MARK-MASQ -j MARK --or-mark {MASQUERADE_MARK}");
    let _ = writeln!(
        out,
        "-A KUBE-POSTROUTING -m mark ! --mark {MASQUERADE_MARK}/{MASQUERADE_MARK} -j RETURN"
    );
    let _ = writeln!(out, "-A KUBE-POSTROUTING -j MARK --xor-mark {MASQUERADE_MARK}");
    out.push_str(
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n",
    );
    out.push_str(&rules);
    out.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
    out.push_str("COMMIT\n");
    out
}

/// The filter table kube-proxy keeps whatever the services: forwarding of marked and tracked
/// traffic, and the (here empty) chains it hooks for services without endpoints and firewalls.
fn iptables_filter_table() -> String {
    let mut out = String::from(
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
         :KUBE-FORWARD - [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-EXTERNAL-SERVICES - [0:0]\n\
         :KUBE-PROXY-FIREWALL - [0:0]\n:KUBE-NODEPORTS - [0:0]\n",
    );
    out.push_str(
        "-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS\n\
         -A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
         -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n",
    );
    let _ = writeln!(
        out,
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQUERADE_MARK}/{MASQUERADE_MARK} -j ACCEPT"
    );
    out.push_str(
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
         COMMIT\n",
    );
    out
}

/// The `nft -f` script kube-proxy's nftables mode would apply: its base table, sets, maps and
/// chains, then one service chain and one endpoint chain per endpoint for each service port.
/// It starts by deleting a previous `kube-proxy` table, so loading it twice gives the same state.
pub fn nft_script(services: &[ServicePort], cidrs: ClusterCidrs) -> String {
    let mut out = String::with_capacity(services.len() * 1500 + 8192);
    out.push_str("add table ip kube-proxy\ndelete table ip kube-proxy\n");
    out.push_str(&nft_base(cidrs));
    for service in services {
        let proto = service.protocol.as_str();
        let id = format!(
            "{}/{}/{proto}/{}",
            service.namespace, service.name, service.port_name
        );
        let service_chain = format!("service-{}-{id}", &chain_hash(&[&id])[..8]);
        let _ = writeln!(out, "add chain ip kube-proxy {service_chain}");
        let _ = writeln!(
            out,
            "add rule ip kube-proxy {service_chain} ip daddr {} ip saddr != {} jump mark-for-masquerade",
            service.cluster_ip, cidrs.pods
        );
        let mut verdicts = Vec::with_capacity(service.endpoints.len());
        for (index, (endpoint_ip, endpoint_port)) in service.endpoints.iter().enumerate() {
            let endpoint_id = format!("{id}__{endpoint_ip}/{endpoint_port}");
            let endpoint_chain = format!("endpoint-{}-{endpoint_id}", &chain_hash(&[&endpoint_id])[..8]);
            let _ = writeln!(out, "add chain ip kube-proxy {endpoint_chain}");
            let _ = writeln!(
                out,
                "add rule ip kube-proxy {endpoint_chain} ip saddr {endpoint_ip} jump mark-for-masquerade"
            );
            let _ = writeln!(
                out,
                "add rule ip kube-proxy {endpoint_chain} meta l4proto {proto} dnat to {endpoint_ip}:{endpoint_port}"
            );
            verdicts.push(format!("{index} : goto {endpoint_chain}"));
        }
        let _ = writeln!(
            out,
            "add rule ip kube-proxy {service_chain} numgen random mod {} vmap {{ {} }}",
            verdicts.len(),
            verdicts.join(" , ")
        );
        let _ = writeln!(
            out,
            "add element ip kube-proxy cluster-ips {{ {} }}",
            service.cluster_ip
        );
        let _ = writeln!(
            out,
            "add element ip kube-proxy service-ips {{ {} . {proto} . {} : goto {service_chain} }}",
            service.cluster_ip, service.port
        );
    }
    out
}

/// What kube-proxy's nftables mode installs whatever the services (its `baseRules`).
fn nft_base(cidrs: ClusterCidrs) -> String {
    let mut out = String::from(
        r#"add table ip kube-proxy { comment "rules for kube-proxy" ; }
add set ip kube-proxy cluster-ips { type ipv4_addr ; comment "Active ClusterIPs" ; }
add set ip kube-proxy nodeport-ips { type ipv4_addr ; comment "IPs that accept NodePort traffic" ; }
add map ip kube-proxy firewall-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment "destinations that are subject to LoadBalancerSourceRanges" ; }
add map ip kube-proxy no-endpoint-nodeports { type inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to service nodeports with no endpoints" ; }
add map ip kube-proxy no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to services with no endpoints" ; }
add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; }
add map ip kube-proxy service-nodeports { type inet_proto . inet_service : verdict ; comment "NodePort traffic" ; }
add chain ip kube-proxy cluster-ips-check
add chain ip kube-proxy filter-prerouting-pre-dnat { type filter hook prerouting priority -110 ; }
add chain ip kube-proxy filter-output-pre-dnat { type filter hook output priority -110 ; }
add chain ip kube-proxy filter-forward { type filter hook forward priority 0 ; }
add chain ip kube-proxy filter-input { type filter hook input priority 0 ; }
add chain ip kube-proxy filter-output { type filter hook output priority 0 ; }
add chain ip kube-proxy firewall-check
add chain ip kube-proxy mark-for-masquerade
add chain ip kube-proxy masquerading
add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }
add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }
add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }
add chain ip kube-proxy nodeport-endpoints-check
add chain ip kube-proxy reject-chain { comment "helper for @no-endpoint-services / @no-endpoint-nodeports" ; }
add chain ip kube-proxy services
add chain ip kube-proxy service-endpoints-check
add rule ip kube-proxy cluster-ips-check ip daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs"
"#,
    );
    let _ = writeln!(
        out,
        "add rule ip kube-proxy cluster-ips-check ip daddr {{ {} }} drop comment \"Drop traffic to unallocated ClusterIPs\"",
        cidrs.services
    );
    out.push_str(
        r#"add rule ip kube-proxy filter-prerouting-pre-dnat ct state new jump firewall-check
add rule ip kube-proxy filter-forward ct state new jump service-endpoints-check
add rule ip kube-proxy filter-forward ct state new jump cluster-ips-check
add rule ip kube-proxy filter-input ct state new jump nodeport-endpoints-check
add rule ip kube-proxy filter-input ct state new jump service-endpoints-check
add rule ip kube-proxy filter-output ct state new jump service-endpoints-check
add rule ip kube-proxy filter-output-pre-dnat ct state new jump firewall-check
add rule ip kube-proxy filter-output ct state new jump cluster-ips-check
add rule ip kube-proxy firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips
add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000
add rule ip kube-proxy masquerading mark and 0x4000 == 0 return
add rule ip kube-proxy masquerading mark set mark xor 0x4000
add rule ip kube-proxy masquerading masquerade fully-random
add rule ip kube-proxy nat-output jump services
add rule ip kube-proxy nat-postrouting jump masquerading
add rule ip kube-proxy nat-prerouting jump services
add rule ip kube-proxy nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports
add rule ip kube-proxy reject-chain reject
add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips
add rule ip kube-proxy services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports
add rule ip kube-proxy service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services
"#,
    );
    out
}

/// A 16-character chain-name suffix derived from `parts`, the shape of kube-proxy's (which is
/// base32 of a SHA-256; any stable hash serves here, only the length and uniqueness matter).
fn chain_hash(parts: &[&str]) -> String {
    const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut hash: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d; // FNV-1a 128 offset basis
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;
    for part in parts {
        for byte in part.bytes().chain([0u8]) {
            hash ^= u128::from(byte);
            hash = hash.wrapping_mul(PRIME);
        }
    }
    (0..16)
        .map(|i| BASE32[((hash >> (i * 5)) & 31) as usize] as char)
        .collect()
}
