//! JSON nested deeper than serde_json's default recursion limit (128).
//!
//! QEMU nests one `backing-image` object per image of a backing chain in `query-block` and
//! `query-named-block-nodes` replies, so a chain of a few hundred snapshots is a reply a few
//! hundred levels deep. Such lines are parsed, and decoded into typed replies, on a thread of
//! their own with a large stack (virtual memory, committed only as the recursion uses it);
//! lines nested deeper than [`MAX_NESTING`] are refused before any parsing. Shallow lines,
//! the usual case, take the ordinary path on the calling thread.

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

/// Nesting past which a reply is decoded on the large-stack thread.
const SHALLOW: usize = 96;

/// The deepest nesting accepted (a chain of this many images is far past any real one).
pub(crate) const MAX_NESTING: usize = 20_000;

/// The large stack: enough for [`MAX_NESTING`] levels of serde's recursion in a debug build.
const DEEP_STACK: usize = 512 << 20;

/// Runs `f` on a thread with a [`DEEP_STACK`] stack and returns its result.
fn on_deep_stack<T: Send>(f: impl FnOnce() -> serde_json::Result<T> + Send) -> Result<T, String> {
    std::thread::scope(|s| {
        let h = std::thread::Builder::new()
            .name("qmp-deep-json".into())
            .stack_size(DEEP_STACK)
            .spawn_scoped(s, f)
            .map_err(|e| format!("cannot start a thread to parse deeply nested JSON: {e}"))?;
        match h.join() {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(p) => std::panic::resume_unwind(p),
        }
    })
}

/// How deeply `line` nests arrays and objects (a scan that skips strings; not a validation).
pub(crate) fn nesting(line: &[u8]) -> usize {
    let (mut depth, mut max, mut in_str, mut esc) = (0usize, 0usize, false, false);
    for &b in line {
        if in_str {
            match (esc, b) {
                (true, _) => esc = false,
                (false, b'\\') => esc = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// Parses one line of JSON, however deeply it nests (up to [`MAX_NESTING`]).
pub(crate) fn parse_line(line: &[u8]) -> Result<Value, String> {
    let d = nesting(line);
    if d <= SHALLOW {
        return serde_json::from_slice(line).map_err(|e| e.to_string());
    }
    if d > MAX_NESTING {
        return Err(format!(
            "JSON nested {d} levels deep (at most {MAX_NESTING})"
        ));
    }
    on_deep_stack(|| {
        let mut de = serde_json::Deserializer::from_slice(line);
        de.disable_recursion_limit();
        let v = Value::deserialize(&mut de)?;
        de.end()?;
        Ok(v)
    })
}

/// How deeply `v` nests (iteratively: `v` may be deep).
fn value_depth(v: &Value) -> usize {
    let mut max = 0;
    let mut stack = vec![(v, 1usize)];
    while let Some((v, d)) = stack.pop() {
        max = max.max(d);
        match v {
            Value::Array(a) => stack.extend(a.iter().map(|x| (x, d + 1))),
            Value::Object(o) => stack.extend(o.values().map(|x| (x, d + 1))),
            _ => {}
        }
    }
    max
}

/// Decodes `v` into `T`; a deep `v` on the large-stack thread (where it is also dropped).
/// The error says why, with an excerpt of `v`.
pub(crate) fn decode<T: DeserializeOwned + Send>(v: Value) -> Result<T, String> {
    fn describe(e: serde_json::Error, v: &Value) -> String {
        let text = v.to_string();
        format!(
            "unexpected reply ({e}): {}",
            crate::framing::excerpt(text.as_bytes())
        )
    }
    if value_depth(&v) <= SHALLOW {
        return T::deserialize(&v).map_err(|e| describe(e, &v));
    }
    on_deep_stack(move || Ok(T::deserialize(&v).map_err(|e| describe(e, &v))))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: usize) -> String {
        let mut s = String::new();
        for i in 0..n {
            s += &format!("{{\"filename\": \"f{i}\", \"s\": \"[{{\\\"\", \"backing-image\": ");
        }
        s += "null";
        s += &"}".repeat(n);
        s
    }

    #[test]
    fn nesting_skips_strings() {
        assert_eq!(nesting(br#"{"a": "[[[{{", "b": [1, {"c": 2}]}"#), 3);
        assert_eq!(nesting(br#""\"[""#), 0);
        assert_eq!(nesting(chain(7).as_bytes()), 7);
    }

    #[test]
    fn a_chain_of_600_parses_and_decodes() {
        #[derive(Deserialize)]
        struct Img {
            filename: String,
            #[serde(rename = "backing-image")]
            backing: Option<Box<Img>>,
        }
        let v = parse_line(chain(600).as_bytes()).unwrap();
        let img: Img = decode(v).unwrap();
        let (mut n, mut cur) = (0, Some(&img));
        while let Some(i) = cur {
            assert_eq!(i.filename, format!("f{n}"));
            n += 1;
            cur = i.backing.as_deref();
        }
        assert_eq!(n, 600);
    }

    #[test]
    fn too_deep_is_refused_without_parsing() {
        let line = "[".repeat(MAX_NESTING + 1);
        let e = parse_line(line.as_bytes()).unwrap_err();
        assert!(e.contains("levels deep"), "{e}");
    }

    #[test]
    fn deep_but_malformed_is_an_error() {
        let line = "[".repeat(500);
        assert!(parse_line(line.as_bytes()).is_err());
        let v = parse_line(chain(300).as_bytes()).unwrap();
        let e = decode::<Vec<u8>>(v).unwrap_err();
        assert!(e.contains("invalid type"), "{e}");
    }
}
