//! containerd's runtime options for the handler (`[...runtimes.bulwark.options]`), which
//! arrive in the task Create request as `runtimeoptions.v1.Options`: Bulwark reads its
//! `ConfigPath` (the node configuration) from there.

use std::path::PathBuf;

use containerd_shim::protos::protobuf::CodedInputStream;
use containerd_shim::protos::protobuf::well_known_types::any::Any;

/// The options could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the runtime options ({type_url}): {message}")]
pub struct OptionsError {
    type_url: String,
    message: String,
}

const RUNTIME_OPTIONS: &str = "runtimeoptions.v1.Options";

/// The `ConfigPath` of the handler's options, if containerd passed one.
pub fn config_path_from_options(options: Option<&Any>) -> Result<Option<PathBuf>, OptionsError> {
    let Some(any) = options else {
        return Ok(None);
    };
    if any.type_url.is_empty() {
        return Ok(None);
    }
    if !any.type_url.ends_with(RUNTIME_OPTIONS) {
        // Other option types (runc's) carry nothing for Bulwark.
        log::debug!("ignoring runtime options of type {}", any.type_url);
        return Ok(None);
    }
    let error = |message: String| OptionsError {
        type_url: any.type_url.clone(),
        message,
    };
    // message Options { string type_url = 1; string config_path = 2; string config_body = 3; }
    let mut input = CodedInputStream::from_bytes(&any.value);
    let mut config_path = None;
    while !input.eof().map_err(|e| error(e.to_string()))? {
        let tag = input
            .read_raw_varint32()
            .map_err(|e| error(e.to_string()))?;
        match (tag >> 3, tag & 7) {
            (2, 2) => config_path = Some(input.read_string().map_err(|e| error(e.to_string()))?),
            (_, wire_type) => {
                let wire_type = containerd_shim::protos::protobuf::rt::WireType::new(wire_type)
                    .ok_or_else(|| error(format!("bad wire type {wire_type}")))?;
                input
                    .skip_field(wire_type)
                    .map_err(|e| error(e.to_string()))?;
            }
        }
    }
    Ok(config_path
        .filter(|path| !path.is_empty())
        .map(PathBuf::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(fields: &[(u32, &str)]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for (number, value) in fields {
            bytes.push(((number << 3) | 2) as u8);
            bytes.push(value.len() as u8);
            bytes.extend_from_slice(value.as_bytes());
        }
        bytes
    }

    #[test]
    fn reads_config_path() {
        let mut any = Any::new();
        any.type_url = "runtimeoptions.v1.Options".into();
        any.value = encode(&[(1, "x"), (2, "/etc/bulwark/custom.toml"), (3, "body")]);
        assert_eq!(
            config_path_from_options(Some(&any)).unwrap(),
            Some(PathBuf::from("/etc/bulwark/custom.toml"))
        );
        any.value = encode(&[(3, "only a body")]);
        assert_eq!(config_path_from_options(Some(&any)).unwrap(), None);
        any.value = vec![0x12, 0x50, b'x'];
        assert!(config_path_from_options(Some(&any)).is_err());
        assert_eq!(config_path_from_options(None).unwrap(), None);
    }
}
