//! How much memory the snapshot of a large cluster takes: 10,000 Services with 5 ready
//! endpoints each (one EndpointSlice per Service, a labelled Pod behind every endpoint), as
//! the Kubernetes source holds them (trimmed) and as the built snapshot holds them.
//!
//! `cargo run -p registry --example snapshot_memory` — bytes are counted by a global allocator,
//! so the figure does not depend on the build profile.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use registry::objects::{Decoded, Object};
use registry::snapshot::{Snapshot, SourceStatus};
use serde_json::json;

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);

#[allow(unsafe_code)] // a global allocator cannot be written without it
// SAFETY: every call is passed on unchanged to the system allocator; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Ordering::Relaxed);
        // SAFETY: the caller's layout, as GlobalAlloc requires.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: `p` came from `alloc` with this layout.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new, Ordering::Relaxed);
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: `p` came from `alloc` with layout `l`.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static A: Counting = Counting;

const SERVICES: usize = 10_000;
const ENDPOINTS: usize = 5;

fn object(v: serde_json::Value) -> Object {
    match Object::decode(v).unwrap() {
        Decoded::Object(o) => o,
        Decoded::Skipped(..) => unreachable!(),
    }
}

/// The objects in the shape the Kubernetes source stores them (trimmed metadata).
fn objects() -> Vec<Object> {
    let mut out = Vec::with_capacity(SERVICES * (2 + ENDPOINTS));
    for i in 0..SERVICES {
        let ns = format!("ns-{}", i % 100);
        let name = format!("service-{i}");
        out.push(object(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
            "spec": {"ports": [{"name": "http", "port": 8000, "protocol": "TCP"}]}})));
        let mut eps = Vec::new();
        for e in 0..ENDPOINTS {
            let pod = format!("{name}-{e}");
            eps.push(
                json!({"addresses": [format!("10.{}.{}.{}", i / 256 % 256, i % 256, e + 1)],
                            "conditions": {"ready": true}, "zone": "zone-a",
                            "targetRef": {"kind": "Pod", "namespace": ns, "name": pod}}),
            );
            // Metadata only, as the Kubernetes source keeps Pods.
            out.push(Object::PodMetadata(Box::new(
                serde_json::from_value(json!({"name": pod, "namespace": ns,
                    "labels": {"app": name, "version": "v1",
                               "topology.kubernetes.io/region": "region-1"}}))
                .unwrap(),
            )));
        }
        out.push(object(
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{name}-abcde"), "namespace": ns,
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "endpoints": eps,
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}),
        ));
    }
    out
}

fn mib(b: usize) -> String {
    format!("{:.1} MiB ({b} bytes)", b as f64 / (1024.0 * 1024.0))
}

fn main() {
    let start = LIVE.load(Ordering::Relaxed);
    let objects = objects();
    let with_objects = LIVE.load(Ordering::Relaxed);
    let snapshot = Snapshot::build(&objects, SourceStatus::default());
    let with_both = LIVE.load(Ordering::Relaxed);
    drop(objects);
    let snapshot_only = LIVE.load(Ordering::Relaxed) - start;
    let endpoints: usize = snapshot
        .services
        .values()
        .flat_map(|s| s.endpoint_sets.iter())
        .map(|e| e.endpoints.len())
        .sum();
    assert_eq!(
        (snapshot.services.len(), endpoints),
        (SERVICES, SERVICES * ENDPOINTS)
    );
    println!(
        "{SERVICES} services x {ENDPOINTS} endpoints ({} pods):",
        SERVICES * ENDPOINTS
    );
    println!(
        "  source store (trimmed objects): {}",
        mib(with_objects - start)
    );
    println!("  snapshot:                       {}", mib(snapshot_only));
    println!(
        "  peak while building:            {}",
        mib(with_both - start)
    );
    println!(
        "  snapshot per endpoint:          {} bytes",
        snapshot_only / endpoints
    );
}
