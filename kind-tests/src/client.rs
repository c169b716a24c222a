//! A mesh client that behaves as an Istio sidecar would for one outbound call: resolve the name
//! through the DNS server, ask the xDS server (ADS, node metadata NETWORK) for the cluster's
//! endpoints, pick one by the returned weights, open mutual TLS with Istio's SNI, and report
//! which pod answered.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{Node, address, socket_address};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::google::protobuf::{Struct, Value, value};
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use remote_secrets::xds::EDS_TYPE;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UdpSocket};
use tokio_rustls::TlsConnector;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("DNS query for {host} to {server} failed: {reason}")]
    Dns {
        host: String,
        server: SocketAddr,
        reason: String,
    },
    #[error("xDS request for {cluster} to {server} failed: {reason}")]
    Xds {
        cluster: String,
        server: SocketAddr,
        reason: String,
    },
    #[error("no endpoint for {0} in the EDS answer: no ready endpoint on any reachable network")]
    NoEndpoint(String),
    #[error("call to {endpoint} with SNI {sni} failed: {reason}")]
    Call {
        endpoint: SocketAddr,
        sni: String,
        reason: String,
    },
}

/// One endpoint of the EDS answer, as the client's network sees it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EdsEndpoint {
    pub address: SocketAddr,
    pub weight: u32,
    /// `region/zone/subzone`
    pub locality: String,
}

/// What the answering pod said.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Answer {
    pub pod: String,
    pub cluster: String,
}

/// A DNS A query over UDP; the addresses answered (empty for NODATA).
pub async fn resolve(server: SocketAddr, host: &str) -> Result<Vec<IpAddr>, ClientError> {
    let err = |reason: String| ClientError::Dns {
        host: host.into(),
        server,
        reason,
    };
    let name = Name::from_ascii(host).map_err(|e| err(e.to_string()))?;
    let mut msg = Message::query();
    msg.add_query(Query::query(name, RecordType::A));
    let bytes = msg.to_vec().map_err(|e| err(e.to_string()))?;
    let bind: SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(bind)
        .await
        .map_err(|e| err(e.to_string()))?;
    let mut buf = vec![0u8; 4096];
    for _attempt in 0..3 {
        sock.send_to(&bytes, server)
            .await
            .map_err(|e| err(e.to_string()))?;
        let Ok(got) = tokio::time::timeout(Duration::from_secs(1), sock.recv(&mut buf)).await
        else {
            continue;
        };
        let n = got.map_err(|e| err(e.to_string()))?;
        let reply = Message::from_vec(&buf[..n]).map_err(|e| err(e.to_string()))?;
        let rcode = reply.metadata.response_code;
        if rcode != hickory_proto::op::ResponseCode::NoError {
            return Err(err(format!("answered {rcode}")));
        }
        return Ok(reply
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                _ => None,
            })
            .collect());
    }
    Err(err("no answer after 3 tries".into()))
}

/// Ask the xDS server over ADS for one ClusterLoadAssignment, as a client on `network`.
pub async fn fetch_eds(
    server: SocketAddr,
    network: &str,
    cluster: &str,
) -> Result<Vec<EdsEndpoint>, ClientError> {
    let err = |reason: String| ClientError::Xds {
        cluster: cluster.into(),
        server,
        reason,
    };
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{server}"))
        .await
        .map_err(|e| err(format!("connect: {e}")))?;
    let mut fields = HashMap::new();
    fields.insert(
        "NETWORK".to_string(),
        Value {
            kind: Some(value::Kind::StringValue(network.into())),
        },
    );
    let node = Node {
        id: format!("sidecar~127.0.0.1~mesh-client.default~default.svc.cluster.local~{network}"),
        metadata: Some(Struct { fields }),
        ..Default::default()
    };
    let request = DiscoveryRequest {
        node: Some(node),
        type_url: EDS_TYPE.into(),
        resource_names: vec![cluster.into()],
        ..Default::default()
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(request.clone())
        .await
        .map_err(|e| err(e.to_string()))?;
    let mut responses = client
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|e| err(format!("stream: {e}")))?
        .into_inner();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let next = tokio::time::timeout_at(deadline, responses.message())
            .await
            .map_err(|_| err("no answer within 10 s".into()))?
            .map_err(|e| err(format!("stream: {e}")))?
            .ok_or_else(|| err("stream closed".into()))?;
        // ACK, as a sidecar does.
        let _ = tx
            .send(DiscoveryRequest {
                version_info: next.version_info.clone(),
                response_nonce: next.nonce.clone(),
                ..request.clone()
            })
            .await;
        for any in &next.resources {
            let cla: ClusterLoadAssignment = prost::Message::decode(any.value.as_slice())
                .map_err(|e| err(format!("decoding the ClusterLoadAssignment: {e}")))?;
            if cla.cluster_name == cluster {
                return Ok(endpoints_of(&cla));
            }
        }
    }
}

fn endpoints_of(cla: &ClusterLoadAssignment) -> Vec<EdsEndpoint> {
    let mut out = Vec::new();
    for group in &cla.endpoints {
        let locality = group
            .locality
            .as_ref()
            .map(|l| format!("{}/{}/{}", l.region, l.zone, l.sub_zone))
            .unwrap_or_default();
        for lb in &group.lb_endpoints {
            let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &lb.host_identifier else {
                continue;
            };
            let Some(address::Address::SocketAddress(sa)) =
                ep.address.as_ref().and_then(|a| a.address.as_ref())
            else {
                continue;
            };
            let Some(socket_address::PortSpecifier::PortValue(port)) = sa.port_specifier else {
                continue;
            };
            let Ok(ip) = sa.address.parse::<IpAddr>() else {
                continue;
            };
            out.push(EdsEndpoint {
                address: SocketAddr::new(ip, port as u16),
                weight: lb.load_balancing_weight.map(|w| w.value).unwrap_or(1),
                locality: locality.clone(),
            });
        }
    }
    out
}

/// Weighted random choice, as Envoy's round robin converges to.
pub fn pick(endpoints: &[EdsEndpoint], random: u64) -> Option<&EdsEndpoint> {
    let total: u64 = endpoints.iter().map(|e| u64::from(e.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut r = random % total;
    for e in endpoints {
        if r < u64::from(e.weight) {
            return Some(e);
        }
        r -= u64::from(e.weight);
    }
    None
}

/// Mutual TLS to `endpoint` with `sni`; read the greeting, check an echo.
pub async fn call(
    endpoint: SocketAddr,
    sni: &str,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Answer, ClientError> {
    let err = |reason: String| ClientError::Call {
        endpoint,
        sni: sni.into(),
        reason,
    };
    let exchange = async {
        let tcp = TcpStream::connect(endpoint)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let name =
            rustls::pki_types::ServerName::try_from(sni.to_string()).map_err(|e| e.to_string())?;
        let stream = TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let mut stream = BufReader::new(stream);
        let mut line = String::new();
        stream
            .read_line(&mut line)
            .await
            .map_err(|e| format!("reading the greeting: {e}"))?;
        if line.is_empty() {
            return Err("closed before the greeting (refused by the gateway?)".to_string());
        }
        let s = stream.get_mut();
        s.write_all(b"ping\n").await.map_err(|e| e.to_string())?;
        s.flush().await.map_err(|e| e.to_string())?;
        let mut echo = String::new();
        stream
            .read_line(&mut echo)
            .await
            .map_err(|e| e.to_string())?;
        if echo != "ping\n" {
            return Err(format!("echo came back as {echo:?}"));
        }
        let _ = stream.get_mut().shutdown().await;
        parse_greeting(&line).ok_or_else(|| format!("unexpected greeting {line:?}"))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| err("no answer within 10 s".into()))?
        .map_err(err)
}

fn parse_greeting(line: &str) -> Option<Answer> {
    let mut pod = None;
    let mut cluster = None;
    for part in line.split_whitespace() {
        match part.split_once('=') {
            Some(("pod", v)) => pod = Some(v.to_string()),
            Some(("cluster", v)) => cluster = Some(v.to_string()),
            _ => {}
        }
    }
    Some(Answer {
        pod: pod?,
        cluster: cluster?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(port: u16, weight: u32) -> EdsEndpoint {
        EdsEndpoint {
            address: SocketAddr::from(([127, 0, 0, 1], port)),
            weight,
            locality: String::new(),
        }
    }

    #[test]
    fn picks_by_weight() {
        let eps = [ep(1, 1), ep(2, 3)];
        let picks: Vec<u16> = (0..4)
            .map(|r| pick(&eps, r).unwrap().address.port())
            .collect();
        assert_eq!(picks, [1, 2, 2, 2]);
        assert!(pick(&[], 1).is_none());
    }

    #[test]
    fn greeting_round_trips() {
        let g = crate::mesh::echo::greeting("httpbin-v1", "cluster-2");
        assert_eq!(
            parse_greeting(&g),
            Some(Answer {
                pod: "httpbin-v1".into(),
                cluster: "cluster-2".into()
            })
        );
    }
}

/// What one client run asks for.
#[derive(Clone, Debug)]
pub struct CallOptions {
    pub dns: SocketAddr,
    pub xds: SocketAddr,
    pub network: String,
    pub host: String,
    pub port: u16,
    pub subset: Option<String>,
    /// Skip EDS and call this address (a client that ignores the control plane).
    pub endpoint: Option<SocketAddr>,
}

/// The path of a batch of calls: name -> VIP -> EDS view -> chosen endpoints -> pods.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PathReport {
    pub host: String,
    pub vip: Vec<IpAddr>,
    pub cluster: String,
    pub sni: String,
    pub eds: Vec<EdsEndpoint>,
    pub calls: Vec<CallResult>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CallResult {
    pub endpoint: Option<SocketAddr>,
    pub answer: Option<Answer>,
    pub error: Option<String>,
}

/// Resolve, fetch EDS once, then make `count` calls picking by weight each time.
pub async fn run(
    opts: &CallOptions,
    tls: Arc<rustls::ClientConfig>,
    count: usize,
    seed: u64,
) -> Result<PathReport, ClientError> {
    let vip = resolve(opts.dns, &opts.host).await?;
    let subset = opts.subset.as_deref();
    let cluster = registry::naming::ClusterName {
        port: opts.port,
        subset: subset.map(str::to_string),
        host: opts.host.clone(),
    }
    .to_string();
    let sni = registry::naming::format_outbound_sni(opts.port, subset, &opts.host);
    let eds = match opts.endpoint {
        Some(address) => vec![EdsEndpoint {
            address,
            weight: 1,
            locality: "(given)".into(),
        }],
        None => fetch_eds(opts.xds, &opts.network, &cluster).await?,
    };
    let mut rng = seed | 1;
    let mut calls = Vec::with_capacity(count);
    for _ in 0..count {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let Some(ep) = pick(&eds, rng) else {
            calls.push(CallResult {
                endpoint: None,
                answer: None,
                error: Some(ClientError::NoEndpoint(cluster.clone()).to_string()),
            });
            continue;
        };
        let r = call(ep.address, &sni, tls.clone()).await;
        calls.push(CallResult {
            endpoint: Some(ep.address),
            error: r.as_ref().err().map(|e| e.to_string()),
            answer: r.ok(),
        });
    }
    Ok(PathReport {
        host: opts.host.clone(),
        vip,
        cluster,
        sni,
        eds,
        calls,
    })
}
