//! The XML machinery shared by the domainsnapshot reader ([`crate::xml`]) and the domain
//! reader ([`crate::domain`]): quick-xml's pull parser into a small element tree that remembers
//! each element's source text ([`Elem`]), the [`Extra`] and [`RawXml`] types that keep what a
//! typed model does not know, and a writer ([`Out`]) in libvirt's format (two-space
//! indentation, single-quoted attributes).

use crate::error::{Error, Result};
use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// The deepest element nesting accepted (as libxml2's default): deeper input is refused.
pub const MAX_DEPTH: usize = 256;

/// What an element held beyond the fields this module knows: written back after them.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Extra {
    /// Unknown attributes (name as written, with any prefix; value unescaped), in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attrs: Vec<(String, String)>,
    /// Unknown child elements, comments, processing instructions and non-blank text,
    /// verbatim, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<RawXml>,
}

impl Extra {
    /// Sorts the children into `order` as [`Out::order_children`] does, so that the model
    /// read from a document is the one read back from its output.
    pub(crate) fn order_children(&mut self, order: &[&str]) {
        let ranks = ranks(self.children.iter().map(|c| element_name(&c.0)), order);
        self.children = sorted(ranks, self.children.drain(..));
    }

    /// Nothing unknown was seen.
    pub fn is_empty(&self) -> bool {
        self.attrs.is_empty() && self.children.is_empty()
    }
}

/// An XML fragment kept byte for byte as it was read (an element with everything inside it,
/// or a comment): the `<domain>`, `<inactiveDomain>` and `<cookie>` subtrees, and unknown
/// elements.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RawXml(pub(crate) String);

impl RawXml {
    /// Wraps `xml`, which must be exactly one well-formed element (surrounding whitespace
    /// is trimmed).
    pub fn element(xml: &str) -> Result<Self> {
        let root = parse_tree(xml.trim())?;
        Ok(RawXml(root.raw.to_string()))
    }

    /// The fragment's text, exactly as read.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name of the fragment's root element, when it is an element.
    pub fn element_name(&self) -> Option<&str> {
        element_name(&self.0)
    }
}

/// The name of the element `xml` starts with; `None` for a comment, a processing instruction
/// or text.
fn element_name(xml: &str) -> Option<&str> {
    let s = xml.strip_prefix('<')?;
    if s.starts_with(['!', '?']) {
        return None;
    }
    let end = s
        .find(|c: char| c.is_whitespace() || c == '>' || c == '/')
        .unwrap_or(s.len());
    Some(&s[..end])
}

/// The rank in `order` of each node named in `names`: a name's position in the table (names
/// not in it rank after all of them), and for an unnamed node (a comment, text) the rank of
/// the next named node.
fn ranks<'a>(
    names: impl DoubleEndedIterator<Item = Option<&'a str>>,
    order: &[&str],
) -> Vec<usize> {
    let rank = |n: &str| order.iter().position(|o| *o == n).unwrap_or(order.len());
    let mut next = usize::MAX;
    let mut v: Vec<usize> = names
        .rev()
        .map(|name| {
            if let Some(name) = name {
                next = rank(name);
            }
            next
        })
        .collect();
    v.reverse();
    v
}

/// `items` stably sorted by `ranks`.
fn sorted<T>(ranks: Vec<usize>, items: impl Iterator<Item = T>) -> Vec<T> {
    let mut v: Vec<(usize, T)> = ranks.into_iter().zip(items).collect();
    v.sort_by_key(|(r, _)| *r);
    v.into_iter().map(|(_, n)| n).collect()
}

/// The multiplier of a libvirt scaled-integer unit (`virScaleInteger`): `b`/`byte`/`bytes`,
/// then `k`, `m`, `g`, `t`, `p`, `e` alone or with `iB` (powers of 1024) or with `B` (powers
/// of 1000), case-insensitively. `None` for anything else.
pub(crate) fn unit_scale(unit: &str) -> Option<u64> {
    let u = unit.to_ascii_lowercase();
    if matches!(u.as_str(), "b" | "byte" | "bytes") {
        return Some(1);
    }
    let exp = match u.as_bytes().first()? {
        b'k' => 1,
        b'm' => 2,
        b'g' => 3,
        b't' => 4,
        b'p' => 5,
        b'e' => 6,
        _ => return None,
    };
    let base: u64 = match &u[1..] {
        "" | "ib" => 1024,
        "b" => 1000,
        _ => return None,
    };
    base.checked_pow(exp)
}

// ---------------------------------------------------------------------------------------------
// Reading: quick-xml events into a small tree that remembers each element's source text.

#[derive(Debug)]
pub(crate) struct Elem<'a> {
    pub(crate) name: String,
    pub(crate) attrs: Vec<(String, String)>,
    pub(crate) children: Vec<Node<'a>>,
    pub(crate) raw: &'a str,
    pub(crate) offset: usize,
}

#[derive(Debug)]
pub(crate) enum Node<'a> {
    Elem(Elem<'a>),
    /// Character data (text or CDATA), unescaped, and its source text.
    Text(String, &'a str),
    /// A comment or a processing instruction.
    Other(&'a str),
}

fn start_elem<'a>(e: &BytesStart<'_>, offset: usize) -> Result<Elem<'a>> {
    let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
    let mut attrs = Vec::new();
    for a in e.attributes() {
        let a = a.map_err(|err| Error::xml(format!("in <{name}>: {err}"), Some(offset as u64)))?;
        let key = String::from_utf8_lossy(a.key.as_ref()).into_owned();
        let value = a.unescape_value().map_err(|err| {
            Error::xml(
                format!("in <{name}>, attribute {key}: {err}"),
                Some(offset as u64),
            )
        })?;
        attrs.push((key, value.into_owned()));
    }
    Ok(Elem {
        name,
        attrs,
        children: Vec::new(),
        raw: "",
        offset,
    })
}

/// Parses `src` into the tree of its one root element.
pub(crate) fn parse_tree(src: &str) -> Result<Elem<'_>> {
    let mut r = Reader::from_str(src);
    r.config_mut().check_end_names = true;
    let mut stack: Vec<Elem<'_>> = Vec::new();
    let mut root: Option<Elem<'_>> = None;
    let slice = |a: usize, b: usize| {
        src.get(a..b)
            .ok_or_else(|| Error::xml("internal: bad span", Some(a as u64)))
    };
    loop {
        let start = r.buffer_position() as usize;
        let ev = r
            .read_event()
            .map_err(|e| Error::xml(e.to_string(), Some(r.error_position())))?;
        let end = r.buffer_position() as usize;
        let at = Some(start as u64);
        match ev {
            Event::Start(_) | Event::Empty(_) if stack.is_empty() && root.is_some() => {
                return Err(Error::xml("content after the root element", at));
            }
            Event::Start(e) => {
                if stack.len() >= MAX_DEPTH {
                    return Err(Error::xml(
                        format!("elements nested deeper than {MAX_DEPTH}"),
                        at,
                    ));
                }
                stack.push(start_elem(&e, start)?);
            }
            Event::Empty(e) => {
                let mut el = start_elem(&e, start)?;
                el.raw = slice(start, end)?;
                close(el, &mut stack, &mut root);
            }
            Event::End(_) => {
                let Some(mut el) = stack.pop() else {
                    return Err(Error::xml("end tag without a start tag", at));
                };
                el.raw = slice(el.offset, end)?;
                close(el, &mut stack, &mut root);
            }
            Event::Text(t) => {
                let raw = slice(start, end)?;
                match stack.last_mut() {
                    Some(parent) => {
                        let text = t
                            .unescape()
                            .map_err(|e| Error::xml(e.to_string(), at))?
                            .into_owned();
                        parent.children.push(Node::Text(text, raw));
                    }
                    None if raw.trim().is_empty() => {}
                    None => return Err(Error::xml("text outside the root element", at)),
                }
            }
            Event::CData(c) => {
                let raw = slice(start, end)?;
                let text = std::str::from_utf8(&c)
                    .map_err(|e| Error::xml(e.to_string(), at))?
                    .to_string();
                match stack.last_mut() {
                    Some(parent) => parent.children.push(Node::Text(text, raw)),
                    None => return Err(Error::xml("CDATA outside the root element", at)),
                }
            }
            Event::Comment(_) | Event::PI(_) => {
                if let Some(parent) = stack.last_mut() {
                    parent.children.push(Node::Other(slice(start, end)?));
                }
            }
            Event::Decl(_) => {
                if root.is_some() || !stack.is_empty() {
                    return Err(Error::xml("XML declaration inside the document", at));
                }
            }
            Event::DocType(_) => {
                return Err(Error::xml("a DOCTYPE is not accepted", at));
            }
            Event::Eof => {
                if let Some(open) = stack.last() {
                    return Err(Error::xml(
                        format!("document ends inside <{}>", open.name),
                        Some(open.offset as u64),
                    ));
                }
                return root.ok_or_else(|| Error::xml("no root element", None));
            }
        }
    }
}

fn close<'a>(el: Elem<'a>, stack: &mut Vec<Elem<'a>>, root: &mut Option<Elem<'a>>) {
    match stack.last_mut() {
        Some(parent) => parent.children.push(Node::Elem(el)),
        None => *root = Some(el),
    }
}

impl<'a> Elem<'a> {
    pub(crate) fn err(&self, what: impl std::fmt::Display) -> Error {
        Error::xml(format!("<{}>: {what}", self.name), Some(self.offset as u64))
    }

    pub(crate) fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn elems(&self) -> impl Iterator<Item = &Elem<'a>> {
        self.children.iter().filter_map(|n| match n {
            Node::Elem(e) => Some(e),
            _ => None,
        })
    }

    /// The one child element called `name`, refusing duplicates.
    pub(crate) fn child(&self, name: &str) -> Result<Option<&Elem<'a>>> {
        let mut it = self.elems().filter(|e| e.name == name);
        let first = it.next();
        if let Some(dup) = it.next() {
            return Err(dup.err("appears twice"));
        }
        Ok(first)
    }

    /// Text content of a text-only element: attributes or child elements are refused.
    pub(crate) fn text(&self) -> Result<String> {
        if let Some((k, _)) = self.attrs.first() {
            return Err(self.err(format!("unexpected attribute {k}")));
        }
        self.text_ignoring_attrs()
    }

    /// Everything but the attributes and child elements named in `attrs` and `children`.
    pub(crate) fn extra(&self, attrs: &[&str], children: &[&str]) -> Extra {
        Extra {
            attrs: self
                .attrs
                .iter()
                .filter(|(k, _)| !attrs.contains(&k.as_str()))
                .cloned()
                .collect(),
            children: self
                .children
                .iter()
                .filter_map(|n| match n {
                    Node::Elem(e) if children.contains(&e.name.as_str()) => None,
                    Node::Elem(e) => Some(RawXml(e.raw.to_string())),
                    Node::Text(_, raw) if raw.trim().is_empty() => None,
                    Node::Text(_, raw) => Some(RawXml(raw.trim().to_string())),
                    Node::Other(raw) => Some(RawXml(raw.to_string())),
                })
                .collect(),
        }
    }

    pub(crate) fn opt_attr(&self, name: &str) -> Option<String> {
        self.attr(name).map(str::to_string)
    }
}

impl Elem<'_> {
    /// The unknown attributes only (for a text element, whose text is typed).
    pub(crate) fn extra_attrs(&self, known: &[&str]) -> Extra {
        Extra {
            attrs: self.extra(known, &[]).attrs,
            children: Vec::new(),
        }
    }

    /// An element that must be empty (`<readonly/>`): any attribute or child is refused.
    pub(crate) fn flag(&self) -> Result<bool> {
        if let Some((k, _)) = self.attrs.first() {
            return Err(self.err(format!("unexpected attribute {k}")));
        }
        if let Some(e) = self.elems().next() {
            return Err(e.err("unexpected element: must be empty"));
        }
        Ok(true)
    }

    pub(crate) fn text_ignoring_attrs(&self) -> Result<String> {
        let mut s = String::new();
        for n in &self.children {
            match n {
                Node::Text(t, _) => s.push_str(t),
                Node::Elem(e) => return Err(e.err("unexpected element inside text")),
                Node::Other(_) => {}
            }
        }
        Ok(s)
    }
}

// ---------------------------------------------------------------------------------------------
// Writing.

pub(crate) struct Out {
    pub(crate) name: &'static str,
    pub(crate) attrs: Vec<(String, String)>,
    pub(crate) nodes: Vec<OutNode>,
}

pub(crate) enum OutNode {
    Elem(Out),
    Text(String),
    Raw(String),
}

impl Out {
    pub(crate) fn new(name: &'static str) -> Self {
        Out {
            name,
            attrs: Vec::new(),
            nodes: Vec::new(),
        }
    }

    pub(crate) fn opt_attr(&mut self, k: &str, v: Option<&str>) {
        if let Some(v) = v {
            self.attrs.push((k.to_string(), v.to_string()));
        }
    }

    pub(crate) fn child(&mut self, c: Out) {
        self.nodes.push(OutNode::Elem(c));
    }

    pub(crate) fn text_child(&mut self, name: &'static str, text: &str) {
        let mut c = Out::new(name);
        c.nodes.push(OutNode::Text(text.to_string()));
        self.child(c);
    }

    pub(crate) fn extra(&mut self, x: &Extra) {
        self.attrs.extend(x.attrs.iter().cloned());
        self.nodes
            .extend(x.children.iter().map(|r| OutNode::Raw(r.0.clone())));
    }

    /// Sorts the attributes into `order` (libvirt's attribute order for this element),
    /// stably; names not in the table go last, in their order.
    pub(crate) fn order_attrs(&mut self, order: &[&str]) {
        self.attrs.sort_by_key(|(k, _)| attr_rank(order, k));
    }

    /// Sorts the children into `order` (libvirt's element order for this element), stably:
    /// names not in the table go last in their order, and comments and text stay in front of
    /// the element that followed them.
    pub(crate) fn order_children(&mut self, order: &[&str]) {
        let names = self.nodes.iter().map(|n| match n {
            OutNode::Elem(e) => Some(e.name),
            OutNode::Raw(r) => element_name(r),
            OutNode::Text(_) => None,
        });
        let ranks = ranks(names, order);
        self.nodes = sorted(ranks, self.nodes.drain(..));
    }
    pub(crate) fn write(&self, s: &mut String, indent: usize) {
        let pad = |s: &mut String, n: usize| s.extend(std::iter::repeat_n(' ', n));
        pad(s, indent);
        let _ = write!(s, "<{}", self.name);
        for (k, v) in &self.attrs {
            let _ = write!(s, " {k}='{}'", quick_xml::escape::escape(v.as_str()));
        }
        match self.nodes.as_slice() {
            [] => s.push_str("/>\n"),
            [OutNode::Text(t)] => {
                let _ = writeln!(
                    s,
                    ">{}</{}>",
                    quick_xml::escape::partial_escape(t.as_str()),
                    self.name
                );
            }
            nodes => {
                s.push_str(">\n");
                for n in nodes {
                    match n {
                        OutNode::Elem(e) => e.write(s, indent + 2),
                        OutNode::Raw(r) | OutNode::Text(r) => {
                            pad(s, indent + 2);
                            s.push_str(r);
                            s.push('\n');
                        }
                    }
                }
                pad(s, indent);
                let _ = writeln!(s, "</{}>", self.name);
            }
        }
    }
}

/// Where attribute `k` goes in `order` (names not in it after all of them, in their order).
pub(crate) fn attr_rank(order: &[&str], k: &str) -> usize {
    order.iter().position(|o| *o == k).unwrap_or(order.len())
}
