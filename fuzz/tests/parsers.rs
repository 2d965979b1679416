//! Fuzz targets for everything Bulwark parses from someone else: units, pod annotations
//! held against node ceilings, the node configuration, OCI manifests and indexes, and the
//! container spec (config.json) with the container paths located in it. Each checks
//! properties, not only "no panic": a limit that resolves stays within its ceiling, an
//! error names what it refused, a formatted value parses back to itself, a located path
//! stays below its root.

use std::collections::BTreeMap;
use std::path::{Component, Path};
use std::time::Duration;

use bulwark_fuzz::{Result, Unstructured, fuzz, pick, text};
use bulwark_runtime::config::{Capabilities, Limits};
use bulwark_runtime::image::{Manifest, manifest_in_index};
use bulwark_runtime::policy::{Knob, ServingSizing};
use bulwark_runtime::serve::INSTANCE_OVERHEAD;
use bulwark_runtime::units::{format_duration, format_memory, parse_duration, parse_memory};
use bulwark_runtime::{NodeConfig, Policy, Request};
use bulwark_shim::bundle::spec::ContainerSpec;
use serde_json::{Value, json};

/// Tokens of the unit syntaxes and their edge cases.
const UNIT_PIECES: &[&str] = &[
    "0",
    "1",
    "7",
    "64",
    "1000",
    "4294967295",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999999",
    ".",
    ".5",
    "1.5",
    "0.001",
    "-",
    "+",
    "e9",
    " ",
    "\t",
    "_",
    "Ki",
    "Mi",
    "Gi",
    "Ti",
    "Pi",
    "Ei",
    "k",
    "K",
    "M",
    "G",
    "T",
    "P",
    "E",
    "m",
    "ki",
    "B",
    "ns",
    "us",
    "µs",
    "ms",
    "s",
    "h",
    "d",
    "1h30m",
    "250ms",
    "\0",
    "é",
    "NaN",
    "inf",
];

/// Values the knobs take, well-formed and not.
const VALUE_PIECES: &[&str] = &[
    "/data",
    "/data:ro",
    "/data:rw",
    "/data:rx",
    ":ro",
    ",",
    "/",
    "..",
    "/../etc",
    "HOME",
    "PATH,HOME",
    "*",
    "127.0.0.1:80",
    "10.0.0.1:5432",
    "[::1]:443",
    "0.0.0.0:8080",
    ":8080",
    "localhost:80",
    "1.2.3.4:99999",
    "1.2.3.4",
    "0",
    "1",
    "64",
    "65536",
    "1000000",
    "500ms",
    "30s",
    "1h",
    "0s",
    "16Mi",
    "1Gi",
    "1.5Gi",
    "true",
    "false",
    " ",
    "-1",
];

fn unit_text(u: &mut Unstructured<'_>) -> Result<String> {
    text(u, UNIT_PIECES)
}

#[test]
fn units_parse_back_what_they_format_and_name_what_they_refuse() {
    fuzz("units", 512, |u| {
        let memory = unit_text(u)?;
        match parse_memory(&memory) {
            Ok(bytes) => assert_eq!(
                parse_memory(&format_memory(bytes)).ok(),
                Some(bytes),
                "{memory:?} parsed to {bytes}, formatted as {:?}",
                format_memory(bytes)
            ),
            Err(error) => assert!(
                error.to_string().contains(&format!("{memory:?}")),
                "the error for {memory:?} does not name it: {error}"
            ),
        }
        let duration = unit_text(u)?;
        match parse_duration(&duration) {
            Ok(value) => assert_eq!(
                parse_duration(&format_duration(value)).ok(),
                Some(value),
                "{duration:?} parsed to {value:?}, formatted as {:?}",
                format_duration(value)
            ),
            Err(error) => assert!(
                error.to_string().contains(&format!("{duration:?}")),
                "the error for {duration:?} does not name it: {error}"
            ),
        }
        Ok(())
    });
}

fn limits(u: &mut Unstructured<'_>) -> Result<Limits> {
    Ok(Limits {
        fuel: if u.arbitrary()? {
            Some(u.arbitrary()?)
        } else {
            None
        },
        timeout: if u.arbitrary()? {
            Some(Duration::from_millis(u.int_in_range(1..=10_000_000)?))
        } else {
            None
        },
        memory: if u.arbitrary()? {
            Some(u.arbitrary()?)
        } else {
            None
        },
        concurrency: if u.arbitrary()? {
            Some(u.int_in_range(1..=100_000)?)
        } else {
            None
        },
    })
}

/// A node configuration as `parse` would accept it: defaults within ceilings.
fn node_config(u: &mut Unstructured<'_>) -> Result<NodeConfig> {
    let (mut defaults, ceilings) = (limits(u)?, limits(u)?);
    fn within<T: Ord + Copy>(default: &mut Option<T>, ceiling: Option<T>) {
        if let (Some(d), Some(c)) = (*default, ceiling) {
            *default = Some(d.min(c));
        }
    }
    within(&mut defaults.fuel, ceilings.fuel);
    within(&mut defaults.timeout, ceilings.timeout);
    within(&mut defaults.memory, ceilings.memory);
    within(&mut defaults.concurrency, ceilings.concurrency);
    Ok(NodeConfig {
        defaults,
        ceilings,
        capabilities: Capabilities {
            allow_native: u.arbitrary()?,
            allow_network: u.arbitrary()?,
            allow_without_landlock: u.arbitrary()?,
            allow_without_egress_filter: u.arbitrary()?,
        },
        ..NodeConfig::default()
    })
}

/// A resolved policy never exceeds the node: every ceiling bounds its limit, which is
/// then always set; network grants exist only where the node allows them.
fn assert_within_node(policy: &Policy, config: &NodeConfig, what: &str) {
    let ceilings = &config.ceilings;
    if let Some(ceiling) = ceilings.fuel {
        assert!(
            policy.fuel.as_ref().is_some_and(|l| l.value <= ceiling),
            "{what}: fuel {:?} vs ceiling {ceiling}",
            policy.fuel
        );
    }
    if let Some(ceiling) = ceilings.timeout {
        assert!(
            policy.timeout.as_ref().is_some_and(|l| l.value <= ceiling),
            "{what}: timeout {:?} vs ceiling {ceiling:?}",
            policy.timeout
        );
    }
    if let Some(ceiling) = ceilings.memory {
        assert!(
            policy.memory.as_ref().is_some_and(|l| l.value <= ceiling),
            "{what}: memory {:?} vs ceiling {ceiling}",
            policy.memory
        );
    }
    if !config.capabilities.allow_network {
        assert!(
            policy.network.is_empty(),
            "{what}: network {:?} on a node without network",
            policy.network
        );
    }
    // A component of 1 MiB initial memory in a runtime that holds 16 MiB.
    let sizing = ServingSizing {
        initial_memory: 1 << 20,
        footprint: 16 << 20,
        instance_overhead: INSTANCE_OVERHEAD,
    };
    if let Ok(serving) = policy.serving(&sizing) {
        if let Some(ceiling) = ceilings.concurrency {
            assert!(
                serving.concurrency.value <= ceiling,
                "{what}: concurrency {:?} vs ceiling {ceiling}",
                serving.concurrency
            );
        }
        // Every instance at once, and the runtime, inside the container's memory limit.
        if let Some(limit) = policy.container_memory {
            let each = serving
                .instance_memory
                .as_ref()
                .map(|memory| memory.value)
                .expect("a container memory limit caps every instance")
                + sizing.instance_overhead;
            let all = u64::from(serving.concurrency.value) * each + sizing.footprint;
            assert!(
                all <= limit,
                "{what}: {} instances of {each} bytes and the runtime's {} exceed {limit}",
                serving.concurrency.value,
                sizing.footprint
            );
            assert!(
                each - sizing.instance_overhead >= sizing.initial_memory,
                "{what}: an instance below the component's initial memory: {serving:?}"
            );
        }
    }
}

#[test]
fn annotations_resolve_within_the_node_ceilings_or_name_the_key() {
    let knobs: Vec<&str> = Knob::ALL.iter().map(|knob| knob.annotation()).collect();
    fuzz("annotations", 2048, |u| {
        let config = node_config(u)?;
        let mut annotations = BTreeMap::new();
        for _ in 0..u.int_in_range(0..=6)? {
            let knob = pick(u, &knobs)?;
            let key = match u.int_in_range(0..=5)? {
                0 => format!("{knob}.main"),
                1 => format!("{knob}.sidecar"),
                2 => format!("{knob}.{}", text(u, &["main", ".", "", "a.b"])?),
                3 => text(
                    u,
                    &["bulwark.dev/", "io.kubernetes.", "x", "fuel", ".", "/"],
                )?,
                _ => knob.to_owned(),
            };
            let value = if u.arbitrary()? {
                text(u, VALUE_PIECES)?
            } else {
                text(u, UNIT_PIECES)?
            };
            annotations.insert(key, value);
        }
        let pairs = annotations.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        let request = match Request::from_annotations(pairs, Some("main")) {
            Ok(request) => request,
            Err(error) => {
                let message = error.to_string();
                assert!(
                    // Quoted as Rust quotes it: control characters escaped.
                    annotations.keys().any(|key| message.contains(key.as_str())
                        || message.contains(&format!("{key:?}"))),
                    "{message:?} names none of {annotations:?}"
                );
                return Ok(());
            }
        };
        match Policy::resolve(&config, &request) {
            Ok(mut policy) => {
                let what = format!("{annotations:?} on {config:?}");
                assert_within_node(&policy, &config, &what);
                policy.bound_by_container_memory(u.arbitrary()?);
                assert_within_node(&policy, &config, &what);
            }
            Err(error) => {
                let message = error.to_string();
                assert!(
                    message.contains("bulwark.dev/"),
                    "{message:?} names no annotation"
                );
            }
        }
        Ok(())
    });
}

/// A TOML line or section header, made of the configuration's own words.
fn config_line(u: &mut Unstructured<'_>) -> Result<String> {
    const SECTIONS: &[&str] = &[
        "defaults",
        "ceilings",
        "capabilities",
        "limits",
        "defaults.x",
        "",
    ];
    const KEYS: &[&str] = &[
        "fuel",
        "timeout",
        "memory",
        "concurrency",
        "allow_native",
        "allow_network",
        "allow_without_landlock",
        "listen",
        "dirs",
        "x",
    ];
    Ok(match u.int_in_range(0..=9)? {
        0 | 1 => format!("[{}]", pick(u, SECTIONS)?),
        2 => text(
            u,
            &[
                "[", "]", "=", "\"", "'", "#", "\n", "{", "}", ",", "fuel", "1",
            ],
        )?,
        _ => {
            let key = pick(u, KEYS)?;
            let value = match u.int_in_range(0..=6)? {
                0 => u.arbitrary::<i64>()?.to_string(),
                1 => u.arbitrary::<bool>()?.to_string(),
                2 => format!("[{}]", unit_text(u)?),
                3 => format!("{{ a = {} }}", u.arbitrary::<u8>()?),
                4 => unit_text(u)?,
                _ => format!("{:?}", unit_text(u)?),
            };
            format!("{key} = {value}")
        }
    })
}

#[test]
fn node_configs_parse_into_consistent_ceilings_or_name_the_file() {
    fuzz("node-config", 4096, |u| {
        let lines = (0..u.int_in_range(0..=12)?)
            .map(|_| config_line(u))
            .collect::<Result<Vec<_>>>()?;
        let toml = lines.join("\n");
        match NodeConfig::parse(&toml, "fuzz.toml") {
            Ok(config) => {
                let (d, c) = (&config.defaults, &config.ceilings);
                let above = |d: Option<u128>, c: Option<u128>| matches!((d, c), (Some(d), Some(c)) if d > c);
                assert!(
                    !above(d.fuel.map(u128::from), c.fuel.map(u128::from))
                        && !above(
                            d.timeout.map(|t| t.as_nanos()),
                            c.timeout.map(|t| t.as_nanos())
                        )
                        && !above(d.memory.map(u128::from), c.memory.map(u128::from))
                        && !above(d.concurrency.map(u128::from), c.concurrency.map(u128::from)),
                    "a default above its ceiling was accepted: {toml:?} -> {config:?}"
                );
                if let Ok(policy) = Policy::resolve(&config, &Request::annotations()) {
                    assert_within_node(&policy, &config, &toml);
                }
            }
            Err(error) => assert!(
                error.to_string().contains("fuzz.toml"),
                "the error for {toml:?} does not name the file: {error}"
            ),
        }
        Ok(())
    });
}

/// A JSON value shaped like OCI documents: their keys, nested, with odd values.
fn oci_json(u: &mut Unstructured<'_>, depth: u32) -> Result<Value> {
    const KEYS: &[&str] = &[
        "schemaVersion",
        "mediaType",
        "config",
        "layers",
        "manifests",
        "artifactType",
        "annotations",
        "digest",
        "size",
        "platform",
        "architecture",
        "os",
        "urls",
    ];
    const STRINGS: &[&str] = &[
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.wasm.config.v0+json",
        "application/wasm",
        "wasm",
        "wasi",
        "amd64",
        "sha256:0000000000000000000000000000000000000000000000000000000000000000",
        "sha256:",
        "",
    ];
    Ok(match (depth, u.int_in_range(0..=7)?) {
        (0, _) | (_, 0) => json!(pick(u, STRINGS)?),
        (_, 1) => json!(u.arbitrary::<i64>()?),
        (_, 2) => json!(u.arbitrary::<f64>()?),
        (_, 3) => Value::Null,
        (_, 4) => json!(u.arbitrary::<String>()?),
        (_, 5) => Value::Array(
            (0..u.int_in_range(0..=3)?)
                .map(|_| oci_json(u, depth - 1))
                .collect::<Result<_>>()?,
        ),
        _ => {
            let mut object = serde_json::Map::new();
            for _ in 0..u.int_in_range(0..=6)? {
                object.insert(pick(u, KEYS)?.to_string(), oci_json(u, depth - 1)?);
            }
            Value::Object(object)
        }
    })
}

#[test]
fn oci_manifests_and_indexes_parse_or_are_refused() {
    fuzz("oci", 8192, |u| {
        let document = if u.ratio(1, 8)? {
            u.arbitrary::<Vec<u8>>()?
        } else {
            serde_json::to_vec(&oci_json(u, 4)?).expect("a JSON value serializes")
        };
        if let Ok(manifest) = Manifest::parse(&document) {
            let _ = manifest.is_wasm_artifact();
            let _ = manifest.wasm_layers().count();
        }
        match manifest_in_index(&document) {
            Ok(digest) => {
                let index: Value = serde_json::from_slice(&document).expect("it parsed once");
                let listed = index["manifests"]
                    .as_array()
                    .expect("an index lists manifests");
                assert!(
                    listed.iter().any(|m| m["digest"] == digest.as_str()),
                    "{digest} is not in {index}"
                );
            }
            Err(error) => assert!(error.to_string().contains("image index"), "{error}"),
        }
        Ok(())
    });
}

/// config.json as CRI writes it, then disturbed: fields replaced by odd values.
fn container_config(u: &mut Unstructured<'_>) -> Result<Value> {
    let mut spec = json!({
        "ociVersion": "1.1.0",
        "process": {
            "user": {"uid": 65532, "gid": 65532, "additionalGids": [65532]},
            "args": ["/app.wasm", "x"],
            "env": ["PATH=/usr/bin", "HOME=/"],
            "cwd": "/",
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "oomScoreAdj": 1000
        },
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "pod",
        "mounts": [
            {"destination": "/data", "type": "bind", "source": "/var/lib/kubelet/pods/x/volumes/data", "options": ["rbind", "ro"]},
            {"destination": "/dev/termination-log", "type": "bind", "source": "/var/lib/kubelet/pods/x/containers/c/t", "options": ["rbind", "rw"]}
        ],
        "annotations": {
            "io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.sandbox-id": "abc",
            "io.kubernetes.cri.container-name": "main",
            "bulwark.dev/fuel": "1000"
        },
        "linux": {
            "resources": {"memory": {"limit": 67108864}, "cpu": {"shares": 2, "quota": 50000, "period": 100000}, "pids": {"limit": 10}},
            "cgroupsPath": "kubepods-pod.slice:cri-containerd:abc",
            "namespaces": [{"type": "pid"}, {"type": "network", "path": "/proc/1/ns/net"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "sysctl": {"net.ipv4.ip_unprivileged_port_start": "0"}
        }
    });
    const PLACES: &[&str] = &[
        "/process/user/uid",
        "/process/user/additionalGids",
        "/process/args",
        "/process/env",
        "/process/rlimits/0/hard",
        "/process/rlimits",
        "/process/oomScoreAdj",
        "/root/readonly",
        "/root/path",
        "/hostname",
        "/mounts/0/destination",
        "/mounts/0/source",
        "/mounts/0/options",
        "/mounts",
        "/annotations",
        "/linux/resources/memory/limit",
        "/linux/resources/cpu/quota",
        "/linux/resources/cpu/shares",
        "/linux/namespaces/1/path",
        "/linux/namespaces/0/type",
        "/linux/cgroupsPath",
        "/linux/sysctl",
        "/linux",
    ];
    for _ in 0..u.int_in_range(0..=4)? {
        let place = pick(u, PLACES)?;
        let value = match u.int_in_range(0..=6)? {
            0 => json!(u.arbitrary::<i64>()?),
            1 => json!(u.arbitrary::<u64>()?),
            2 => json!(text(
                u,
                &["/", "..", "data", "/data/../..", "", "\0", ":", "rw", "ro"]
            )?),
            3 => json!([text(u, &["/", "..", "x", "="])?]),
            4 => Value::Null,
            5 => json!({"x": u.arbitrary::<bool>()?}),
            _ => json!(u.arbitrary::<String>()?),
        };
        if let Some(slot) = spec.pointer_mut(place) {
            *slot = value;
        }
    }
    Ok(spec)
}

#[test]
fn container_specs_load_and_locate_paths_below_their_roots() {
    let bundle = tempfile::tempdir().expect("a temp dir");
    let rootfs = Path::new("/run/fuzz/rootfs");
    fuzz("container-spec", 8192, |u| {
        let config = container_config(u)?;
        std::fs::write(bundle.path().join("config.json"), config.to_string())
            .expect("config.json written");
        let Ok(spec) = ContainerSpec::load(bundle.path()) else {
            return Ok(());
        };
        for _ in 0..u.int_in_range(1..=4)? {
            let path = text(
                u,
                &[
                    "/",
                    "data",
                    "..",
                    ".",
                    "/data",
                    "//",
                    "/dev/termination-log",
                    "x",
                    "\0",
                    "data2",
                ],
            )?;
            match spec.locate(rootfs, &path) {
                Ok(location) => {
                    assert!(
                        location
                            .rest
                            .components()
                            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir)),
                        "{path:?} located at {:?} below {:?}",
                        location.rest,
                        location.root
                    );
                    let sources: Vec<_> = spec.mounts.iter().map(|m| m.source.as_path()).collect();
                    assert!(
                        location.root == rootfs || sources.contains(&location.root.as_path()),
                        "{path:?} located below {:?}, neither the rootfs nor a mount",
                        location.root
                    );
                    assert_eq!(location.in_rootfs, location.root == rootfs, "{path:?}");
                }
                Err(error) => assert!(error.to_string().contains(&path), "{error}"),
            }
        }
        Ok(())
    });
}
