//! The TLS ClientHello at the start of a connection: its SNI, offered ALPN protocols and
//! highest offered version, for routing a plain TCP listener by name (the bytes are later
//! replayed unchanged to the server) and for a TLS-terminating listener that wants them
//! before it hands the same bytes to rustls.
//!
//! Sans-io: [`parse`] looks at the bytes read so far and answers `Incomplete`, `NotTls`,
//! `Invalid` or `Complete`. It is a pure function of the bytes, never panics, never
//! recurses, and allocates nothing sized by a length field (only a copy of the handshake
//! message when it is split over records, and the SNI and ALPN names of a complete hello).
//!
//! Every answer but `Incomplete` is final: the hello is walked with its *declared* lengths as
//! bounds, and a byte that is not there yet stops the walk with `Incomplete`, so a verdict
//! never depends on how much of the input has arrived (an `Invalid` one may name another of
//! the faults once more bytes are there). A length that cannot fit its parent is refused as
//! soon as the length itself is read; a `Complete` hello parses the same whatever follows
//! its last record (the payload, or 0-RTT data).
//!
//! Each call walks the whole buffer again (at most [`MAX_LEN`] bytes): call it once per read,
//! not once per byte.
//!
//! What is checked:
//! - records: content type 0x16, version 0x0300..=0x0304, length 1..=16384; the handshake
//!   message may be split over any number of consecutive handshake records, up to
//!   [`MAX_LEN`] bytes of records in all, and must end where a record ends;
//! - the message: handshake type 1 (ClientHello), legacy_version 3.x, random, session_id
//!   (at most 32 bytes), cipher_suites (even, at least 2 bytes), compression_methods (at
//!   least 1), then either nothing (very old clients send no extensions) or the extensions,
//!   with no bytes left over at any level and no extension type twice (RFC 8446 §4.2);
//! - server_name (0): a non-empty list; the first host_name entry is used, and must be 1 to
//!   255 bytes of ASCII letters, digits, `-`, `_` and `.` with no empty label (one trailing
//!   dot is dropped); it is returned lowercased;
//! - application_layer_protocol_negotiation (16): a non-empty list of 1..=255-byte names;
//! - supported_versions (43): a non-empty list of u16; 0x0304 in it makes the version TLS 1.3.
//!
//! Other extensions, cipher suites and GREASE values (RFC 8701) are opaque and never refused.
//!
//! SSLv2-compatible hellos (first byte with the high bit set) are `NotTls`, like any first
//! byte other than 0x16: telling one apart from other binary protocols takes several bytes,
//! which would delay the answer for every such protocol, no current client sends one, and
//! rustls would refuse it anyway.

use std::borrow::Cow;

/// The most bytes the reader will look at before giving up (records included): one
/// full-sized record. A hello split over several records has 5 bytes less room for each
/// record after the first; real hellos (2 KB with a post-quantum key share) are far below.
pub const MAX_LEN: usize = 16 * 1024 + 5;

/// The result of looking at the first bytes of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed (the buffer is a prefix of a possible ClientHello).
    Incomplete,
    /// The first byte shows this is not TLS (e.g. a plain-text protocol); route it as non-TLS.
    NotTls,
    /// TLS, but malformed or too long: close the connection (`protocol_error`) with this reason.
    Invalid(&'static str),
    /// A complete ClientHello.
    Complete(ClientHello),
}

/// What a complete ClientHello offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// The host_name from server_name (type 0), lowercased; None if absent.
    pub sni: Option<String>,
    /// Protocols offered in application_layer_protocol_negotiation, in order (empty if absent).
    pub alpn: Vec<Vec<u8>>,
    /// The highest version offered (0x0304 when supported_versions lists TLS 1.3, else legacy_version).
    pub version: u16,
    /// The client's favourite cipher suite (its first, GREASE aside) is a
    /// ChaCha20-Poly1305 one: typically a device without AES instructions.
    pub prefers_chacha: bool,
    /// Bytes of the buffer the hello occupies (from the first record header to the end of the record holding its last byte).
    pub len: usize,
}

const CONTENT_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const RECORD_HEADER: usize = 5;
const MAX_RECORD: usize = 16 * 1024;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const EXT_SUPPORTED_VERSIONS: u16 = 43;
const NAME_TYPE_HOST_NAME: u8 = 0;
const TLS13: u16 = 0x0304;

const TOO_LONG: &str = "ClientHello too long";
const BAD_NAME: &str = "bad server name";

/// Parses the ClientHello at the start of `buf`.
pub fn parse(buf: &[u8]) -> Parsed {
    match buf.first() {
        None => Parsed::Incomplete,
        Some(&b) if b != CONTENT_HANDSHAKE => Parsed::NotTls,
        Some(_) => match parse_tls(buf) {
            Ok(hello) => Parsed::Complete(hello),
            Err(Stop::Incomplete) => Parsed::Incomplete,
            Err(Stop::Invalid(why)) => Parsed::Invalid(why),
        },
    }
}

/// Why a walk stopped before the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// A byte that is needed has not arrived.
    Incomplete,
    /// The bytes seen (and the lengths they declare) cannot be a ClientHello.
    Invalid(&'static str),
}

/// Joins the handshake records into one message, then walks it.
fn parse_tls(buf: &[u8]) -> Result<ClientHello, Stop> {
    // The message bytes seen so far: borrowed while they come from the first record.
    let mut msg: Cow<'_, [u8]> = Cow::Borrowed(&[]);
    // The end of the record holding the message's last byte, once all of it is in `buf`.
    let mut end = None;
    let mut pos = 0;
    loop {
        if pos + RECORD_HEADER + 1 > MAX_LEN {
            return Err(Stop::Invalid(TOO_LONG));
        }
        let header = &buf[pos.min(buf.len())..];
        let Some(len) = record_header(header, pos == 0)? else {
            break;
        };
        let body = pos + RECORD_HEADER;
        let record_end = body + len;
        if record_end > MAX_LEN {
            return Err(Stop::Invalid(TOO_LONG));
        }
        let fragment = buf.get(body..record_end.min(buf.len())).unwrap_or(&[]);
        let before = msg.len();
        if pos == 0 {
            msg = Cow::Borrowed(fragment);
        } else {
            if let Cow::Borrowed(first) = msg {
                // Never more than the input: every fragment is a part of `buf`.
                let mut owned = Vec::with_capacity(buf.len());
                owned.extend_from_slice(first);
                msg = Cow::Owned(owned);
            }
            msg.to_mut().extend_from_slice(fragment);
        }
        if let Some(&t) = msg.first()
            && t != HANDSHAKE_CLIENT_HELLO
        {
            return Err(Stop::Invalid("not a ClientHello"));
        }
        let need = message_len(&msg);
        if let Some(need) = need {
            if before + len > need {
                return Err(Stop::Invalid("bytes after the ClientHello in its record"));
            }
            // Where the message ends at the earliest: here, or past one more record header.
            let least = match need - before - len {
                0 => record_end,
                more => record_end + RECORD_HEADER + more,
            };
            if least > MAX_LEN {
                return Err(Stop::Invalid(TOO_LONG));
            }
        }
        if buf.len() < record_end {
            break;
        }
        if need == Some(before + len) {
            end = Some(record_end);
            break;
        }
        pos = record_end;
    }
    // Walk what there is of the message even when incomplete: a bad length shows early.
    let Some(need) = message_len(&msg) else {
        return Err(Stop::Incomplete);
    };
    let found = walk(Reader {
        buf: msg.get(4..).unwrap_or(&[]),
        pos: 0,
        end: need - 4,
    })?;
    let len = end.ok_or(Stop::Incomplete)?;
    Ok(ClientHello {
        sni: found.sni.map(|name| {
            name.iter()
                .map(|b| b.to_ascii_lowercase() as char)
                .collect()
        }),
        alpn: found.alpn.map(alpn_names).unwrap_or_default(),
        version: found.version,
        prefers_chacha: found.prefers_chacha,
        len,
    })
}

/// The length of the record whose header starts `h`, or `None` while the header is
/// incomplete; each byte is checked as soon as it is there.
fn record_header(h: &[u8], first: bool) -> Result<Option<usize>, Stop> {
    if !first
        && let Some(&t) = h.first()
        && t != CONTENT_HANDSHAKE
    {
        return Err(Stop::Invalid("non-handshake record inside the ClientHello"));
    }
    if let Some(&major) = h.get(1)
        && major != 3
    {
        return Err(Stop::Invalid("bad record version"));
    }
    if let Some(&minor) = h.get(2)
        && minor > 4
    {
        return Err(Stop::Invalid("bad record version"));
    }
    if let Some(&hi) = h.get(3)
        && usize::from(hi) << 8 > MAX_RECORD
    {
        return Err(Stop::Invalid("record longer than 16384 bytes"));
    }
    let Some(&[hi, lo]) = h.get(3..5).and_then(|s| <&[u8; 2]>::try_from(s).ok()) else {
        return Ok(None);
    };
    match usize::from(u16::from_be_bytes([hi, lo])) {
        0 => Err(Stop::Invalid("empty handshake record")),
        len if len > MAX_RECORD => Err(Stop::Invalid("record longer than 16384 bytes")),
        len => Ok(Some(len)),
    }
}

/// The whole handshake message's length (header included), once its header is there.
fn message_len(msg: &[u8]) -> Option<usize> {
    match msg {
        [_, a, b, c, ..] => {
            Some(4 + (usize::from(*a) << 16 | usize::from(*b) << 8 | usize::from(*c)))
        }
        _ => None,
    }
}

/// What the walk found, borrowed from the message.
struct Found<'a> {
    /// The host name, validated, without a trailing dot, not yet lowercased.
    sni: Option<&'a [u8]>,
    /// The ALPN protocol_name_list, validated.
    alpn: Option<&'a [u8]>,
    version: u16,
    prefers_chacha: bool,
}

/// TLS_CHACHA20_POLY1305_SHA256, and the TLS 1.2 ECDHE-RSA and ECDHE-ECDSA ChaCha suites.
const CHACHA_SUITES: [u16; 3] = [0x1303, 0xcca8, 0xcca9];

/// A GREASE value (RFC 8701): 0x0a0a, 0x1a1a, … 0xfafa.
fn is_grease(v: u16) -> bool {
    v & 0x0f0f == 0x0a0a && v >> 8 == v & 0xff
}

/// Walks the ClientHello body (after the handshake header).
fn walk(mut r: Reader<'_>) -> Result<Found<'_>, Stop> {
    let legacy_version = r.u16("ClientHello too short")?;
    if legacy_version >> 8 != 3 {
        return Err(Stop::Invalid("bad legacy_version"));
    }
    r.take(32, "ClientHello too short")?;
    let session_id = r.vec8("session_id overflows the ClientHello")?;
    if session_id.remaining() > 32 {
        return Err(Stop::Invalid("session_id longer than 32 bytes"));
    }
    let mut suites = r.vec16("cipher_suites overflow the ClientHello")?;
    if suites.remaining() < 2 || suites.remaining() % 2 != 0 {
        return Err(Stop::Invalid("bad cipher_suites length"));
    }
    let mut first_suite = None;
    while first_suite.is_none() && !suites.at_end() {
        let s = suites.u16("truncated cipher_suites")?;
        if !is_grease(s) {
            first_suite = Some(s);
        }
    }
    let compression = r.vec8("compression_methods overflow the ClientHello")?;
    if compression.remaining() == 0 {
        return Err(Stop::Invalid("no compression_methods"));
    }
    let mut found = Found {
        sni: None,
        alpn: None,
        version: legacy_version,
        prefers_chacha: first_suite.is_some_and(|s| CHACHA_SUITES.contains(&s)),
    };
    if !r.at_end() {
        let mut extensions = r.vec16("extensions overflow the ClientHello")?;
        r.finish("bytes after the extensions")?;
        let mut tls13 = false;
        // One bit per extension type: 8 KiB on the stack, nothing on the heap.
        let mut seen = [0u64; 1024];
        while !extensions.at_end() {
            let typ = extensions.u16("truncated extension")?;
            let data = extensions.vec16("extension overflows the extensions")?;
            let (word, bit) = (usize::from(typ / 64), 1u64 << (typ % 64));
            if seen[word] & bit != 0 {
                return Err(Stop::Invalid("duplicate extension"));
            }
            seen[word] |= bit;
            match typ {
                EXT_SERVER_NAME => found.sni = server_name(data)?,
                EXT_ALPN => found.alpn = Some(alpn(data)?),
                EXT_SUPPORTED_VERSIONS => tls13 = supported_versions(data)?,
                _ => {}
            }
        }
        if tls13 {
            found.version = TLS13;
        }
    }
    // Opaque parts (an unknown extension's data) are skipped unread: make sure they are here.
    r.all_there()?;
    Ok(found)
}

/// server_name (RFC 6066 §3): the first host_name, validated.
fn server_name(mut data: Reader<'_>) -> Result<Option<&[u8]>, Stop> {
    let mut list = data.vec16("server_name list overflows its extension")?;
    data.finish("bytes after the server_name list")?;
    if list.at_end() {
        return Err(Stop::Invalid("empty server_name list"));
    }
    let mut host = None;
    while !list.at_end() {
        let typ = list.u8("truncated server_name entry")?;
        // Every name type starts with a u16 length (RFC 6066 §3).
        let name = list.vec16("server name overflows its list")?;
        if typ == NAME_TYPE_HOST_NAME && host.is_none() {
            host = Some(host_name(name.rest()?)?);
        }
    }
    Ok(host)
}

/// A host name as the routing table will see it: letters, digits, `-`, `_`, non-empty
/// labels, at most 255 bytes, one trailing dot dropped.
fn host_name(name: &[u8]) -> Result<&[u8], Stop> {
    if name.is_empty() || name.len() > 255 {
        return Err(Stop::Invalid(BAD_NAME));
    }
    let name = name.strip_suffix(b".").unwrap_or(name);
    let ok = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.');
    if !name.iter().all(ok) || name.split(|&b| b == b'.').any(<[u8]>::is_empty) {
        return Err(Stop::Invalid(BAD_NAME));
    }
    Ok(name)
}

/// application_layer_protocol_negotiation (RFC 7301 §3.1): the protocol_name_list, validated.
fn alpn(mut data: Reader<'_>) -> Result<&[u8], Stop> {
    let list = data.vec16("ALPN list overflows its extension")?;
    data.finish("bytes after the ALPN list")?;
    if list.at_end() {
        return Err(Stop::Invalid("empty ALPN list"));
    }
    let mut names = list;
    while !names.at_end() {
        let name = names.vec8("ALPN protocol name overflows its list")?;
        if name.at_end() {
            return Err(Stop::Invalid("empty ALPN protocol name"));
        }
        name.rest()?;
    }
    list.rest()
}

/// The names of a validated ALPN protocol_name_list.
fn alpn_names(mut list: &[u8]) -> Vec<Vec<u8>> {
    let mut names = Vec::new();
    while let Some((&n, rest)) = list.split_first()
        && let Some((name, rest)) = rest.split_at_checked(usize::from(n))
    {
        names.push(name.to_vec());
        list = rest;
    }
    names
}

/// supported_versions (RFC 8446 §4.2.1): whether it offers TLS 1.3.
fn supported_versions(mut data: Reader<'_>) -> Result<bool, Stop> {
    let mut list = data.vec8("supported_versions list overflows its extension")?;
    data.finish("bytes after the supported_versions list")?;
    if list.remaining() < 2 || list.remaining() % 2 != 0 {
        return Err(Stop::Invalid("bad supported_versions length"));
    }
    let mut tls13 = false;
    while !list.at_end() {
        tls13 |= list.u16("truncated supported_versions")? == TLS13;
    }
    Ok(tls13)
}

/// A cursor over a part of the message whose declared end (`end`) may lie past the bytes
/// received so far (`buf`). Reading past `end` is `Invalid` (the reason given); reading
/// past `buf` is `Incomplete`. Invariant: `pos <= end`.
#[derive(Clone, Copy)]
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    end: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.end - self.pos
    }

    fn at_end(&self) -> bool {
        self.pos == self.end
    }

    fn take(&mut self, n: usize, why: &'static str) -> Result<&'a [u8], Stop> {
        if n > self.remaining() {
            return Err(Stop::Invalid(why));
        }
        let start = self.pos;
        self.pos += n;
        self.buf.get(start..self.pos).ok_or(Stop::Incomplete)
    }

    fn u8(&mut self, why: &'static str) -> Result<u8, Stop> {
        Ok(self.take(1, why)?[0])
    }

    fn u16(&mut self, why: &'static str) -> Result<u16, Stop> {
        let b = self.take(2, why)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// The next `n` bytes as a reader of their own, skipped here (whether there or not).
    fn sub(&mut self, n: usize, why: &'static str) -> Result<Reader<'a>, Stop> {
        if n > self.remaining() {
            return Err(Stop::Invalid(why));
        }
        let sub = Reader {
            buf: self.buf,
            pos: self.pos,
            end: self.pos + n,
        };
        self.pos += n;
        Ok(sub)
    }

    /// A vector with a u8 length.
    fn vec8(&mut self, why: &'static str) -> Result<Reader<'a>, Stop> {
        let n = self.u8(why)?;
        self.sub(usize::from(n), why)
    }

    /// A vector with a u16 length.
    fn vec16(&mut self, why: &'static str) -> Result<Reader<'a>, Stop> {
        let n = self.u16(why)?;
        self.sub(usize::from(n), why)
    }

    /// The bytes from here to the end, once they are all there.
    fn rest(self) -> Result<&'a [u8], Stop> {
        self.buf.get(self.pos..self.end).ok_or(Stop::Incomplete)
    }

    /// Nothing may be left.
    fn finish(&self, why: &'static str) -> Result<(), Stop> {
        if self.at_end() {
            Ok(())
        } else {
            Err(Stop::Invalid(why))
        }
    }

    /// Every byte up to the end has arrived.
    fn all_there(&self) -> Result<(), Stop> {
        if self.end <= self.buf.len() {
            Ok(())
        } else {
            Err(Stop::Incomplete)
        }
    }
}

#[cfg(test)]
mod tests {
    //! Captured hellos (`testdata/client_hello/`, each the raw bytes a client sent to a
    //! Python server on 127.0.0.1 that never answered, one record each):
    //!
    //! | file                          | client                                                | SNI           | ALPN             | version |
    //! |-------------------------------|-------------------------------------------------------|---------------|------------------|---------|
    //! | `openssl-tls12-sni-alpn.bin`  | `openssl s_client -tls1_2 -servername example.com -alpn h2,http/1.1` (OpenSSL 3.0.19) | example.com | h2, http/1.1 | 0x0303 (no supported_versions) |
    //! | `openssl-tls13-sni-alpn.bin`  | the same with `-tls1_3`                                | example.com   | h2, http/1.1     | 0x0304  |
    //! | `openssl-nosni-noalpn.bin`    | `openssl s_client -noservername`                       | none          | none             | 0x0304  |
    //! | `curl-localhost.bin`          | `curl -sk https://localhost:PORT/` (7.88.1, OpenSSL)   | localhost     | h2, http/1.1     | 0x0304  |
    //! | `curl-http11-localhost.bin`   | the same with `--http1.1`                              | localhost     | http/1.1         | 0x0304  |
    //! | `python-ssl-py-example.bin`   | Python `ssl.create_default_context().wrap_socket(server_hostname="py.example")` | py.example | none | 0x0304 |
    //! | `chromium-sni-test.bin`       | Chromium 156 headless, `https://sni.test:PORT/` mapped to 127.0.0.1: GREASE cipher suite, extensions (0x2a2a, 0xaaaa) and version, ECH GREASE, a 1,263-byte X25519MLKEM768 key share; 1,916 bytes | sni.test | h2, http/1.1 | 0x0304 |

    use super::*;
    use crate::test_rng::Rng;

    struct Capture {
        name: &'static str,
        bytes: &'static [u8],
        sni: Option<&'static str>,
        alpn: &'static [&'static [u8]],
        version: u16,
    }

    const H2_H1: &[&[u8]] = &[b"h2", b"http/1.1"];

    const CAPTURES: &[Capture] = &[
        Capture {
            name: "openssl-tls12-sni-alpn",
            bytes: include_bytes!("testdata/client_hello/openssl-tls12-sni-alpn.bin"),
            sni: Some("example.com"),
            alpn: H2_H1,
            version: 0x0303,
        },
        Capture {
            name: "openssl-tls13-sni-alpn",
            bytes: include_bytes!("testdata/client_hello/openssl-tls13-sni-alpn.bin"),
            sni: Some("example.com"),
            alpn: H2_H1,
            version: 0x0304,
        },
        Capture {
            name: "openssl-nosni-noalpn",
            bytes: include_bytes!("testdata/client_hello/openssl-nosni-noalpn.bin"),
            sni: None,
            alpn: &[],
            version: 0x0304,
        },
        Capture {
            name: "curl-localhost",
            bytes: include_bytes!("testdata/client_hello/curl-localhost.bin"),
            sni: Some("localhost"),
            alpn: H2_H1,
            version: 0x0304,
        },
        Capture {
            name: "curl-http11-localhost",
            bytes: include_bytes!("testdata/client_hello/curl-http11-localhost.bin"),
            sni: Some("localhost"),
            alpn: &[b"http/1.1"],
            version: 0x0304,
        },
        Capture {
            name: "python-ssl-py-example",
            bytes: include_bytes!("testdata/client_hello/python-ssl-py-example.bin"),
            sni: Some("py.example"),
            alpn: &[],
            version: 0x0304,
        },
        Capture {
            name: "chromium-sni-test",
            bytes: include_bytes!("testdata/client_hello/chromium-sni-test.bin"),
            sni: Some("sni.test"),
            alpn: H2_H1,
            version: 0x0304,
        },
    ];

    impl Capture {
        fn want(&self, len: usize) -> Parsed {
            Parsed::Complete(ClientHello {
                sni: self.sni.map(str::to_owned),
                alpn: self.alpn.iter().map(|a| a.to_vec()).collect(),
                version: self.version,
                prefers_chacha: false,
                len,
            })
        }

        /// The handshake message, out of its single record.
        fn message(&self) -> &'static [u8] {
            assert_eq!(
                usize::from(u16::from_be_bytes([self.bytes[3], self.bytes[4]])) + 5,
                self.bytes.len(),
                "{} is one record",
                self.name
            );
            &self.bytes[5..]
        }
    }

    fn complete(p: Parsed) -> ClientHello {
        match p {
            Parsed::Complete(h) => h,
            other => panic!("expected a complete hello, got {other:?}"),
        }
    }

    fn invalid(buf: &[u8]) -> &'static str {
        match parse(buf) {
            Parsed::Invalid(why) => why,
            other => panic!("expected Invalid, got {other:?} for {buf:02x?}"),
        }
    }

    /// `msg` as handshake records of the given fragment sizes (the last takes the rest).
    fn records(msg: &[u8], sizes: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = msg;
        for (i, &n) in sizes.iter().chain([&usize::MAX]).enumerate() {
            if rest.is_empty() {
                break;
            }
            let (frag, tail) = rest.split_at(n.min(rest.len()));
            // The first record of a real hello says 3.1, later ones 3.3.
            out.extend_from_slice(&[0x16, 3, if i == 0 { 1 } else { 3 }]);
            out.extend_from_slice(&(frag.len() as u16).to_be_bytes());
            out.extend_from_slice(frag);
            rest = tail;
        }
        out
    }

    // ---- a builder for hand-made hellos, which remembers where its length fields are ----

    /// A length field: at `at`, `width` bytes, counting the bytes up to `end`; inside the
    /// field `parent` (whose content ends at its `end`).
    #[derive(Debug, Clone, Copy)]
    struct Field {
        at: usize,
        width: usize,
        end: usize,
        parent: Option<usize>,
    }

    #[derive(Default)]
    struct Builder {
        out: Vec<u8>,
        open: Vec<usize>,
        fields: Vec<Field>,
    }

    impl Builder {
        fn put(&mut self, b: &[u8]) -> &mut Self {
            self.out.extend_from_slice(b);
            self
        }

        fn open(&mut self, width: usize) -> &mut Self {
            self.fields.push(Field {
                at: self.out.len(),
                width,
                end: 0,
                parent: self.open.last().copied(),
            });
            self.open.push(self.fields.len() - 1);
            self.out.extend(std::iter::repeat_n(0, width));
            self
        }

        fn close(&mut self) -> &mut Self {
            let id = self.open.pop().unwrap();
            let f = &mut self.fields[id];
            f.end = self.out.len();
            let n = f.end - f.at - f.width;
            let be = (n as u32).to_be_bytes();
            assert!(n < 1 << (8 * f.width), "field too long");
            self.out[f.at..f.at + f.width].copy_from_slice(&be[4 - f.width..]);
            self
        }

        fn vec(&mut self, width: usize, b: &[u8]) -> &mut Self {
            self.open(width).put(b).close()
        }
    }

    #[derive(Clone)]
    enum Ext {
        /// server_name with (name_type, name) entries.
        Sni(Vec<(u8, Vec<u8>)>),
        Alpn(Vec<Vec<u8>>),
        Versions(Vec<u16>),
        Raw(u16, Vec<u8>),
    }

    #[derive(Clone)]
    struct Spec {
        legacy_version: u16,
        session_id: Vec<u8>,
        suites: Vec<u16>,
        compression: Vec<u8>,
        exts: Option<Vec<Ext>>,
    }

    fn sni(name: &str) -> Ext {
        Ext::Sni(vec![(0, name.as_bytes().to_vec())])
    }

    impl Spec {
        /// A TLS 1.3 hello for example.com offering h2 and http/1.1, with GREASE.
        fn typical() -> Spec {
            Spec {
                legacy_version: 0x0303,
                session_id: vec![7; 32],
                suites: vec![0x3a3a, 0x1301, 0x1302, 0xc02f],
                compression: vec![0],
                exts: Some(vec![
                    Ext::Raw(0x0a0a, vec![]),
                    sni("example.com"),
                    Ext::Alpn(vec![b"h2".to_vec(), b"http/1.1".to_vec()]),
                    Ext::Versions(vec![0x5a5a, 0x0304, 0x0303]),
                    Ext::Raw(51, vec![0x42; 40]),
                    Ext::Raw(0xfafa, vec![0]),
                ]),
            }
        }

        fn with_exts(exts: Vec<Ext>) -> Spec {
            Spec {
                exts: Some(exts),
                ..Spec::typical()
            }
        }

        /// The record(s) and where their length fields are: field 0 is the record's,
        /// field 1 the handshake message's.
        fn build(&self) -> Builder {
            let mut b = Builder::default();
            b.put(&[0x16, 3, 1]).open(2).put(&[1]).open(3);
            b.put(&self.legacy_version.to_be_bytes()).put(&[0x11; 32]);
            b.vec(1, &self.session_id);
            let suites: Vec<u8> = self.suites.iter().flat_map(|s| s.to_be_bytes()).collect();
            b.vec(2, &suites).vec(1, &self.compression);
            if let Some(exts) = &self.exts {
                b.open(2);
                for ext in exts {
                    match ext {
                        Ext::Sni(entries) => {
                            b.put(&0u16.to_be_bytes()).open(2).open(2);
                            for (typ, name) in entries {
                                b.put(&[*typ]).vec(2, name);
                            }
                            b.close().close();
                        }
                        Ext::Alpn(names) => {
                            b.put(&16u16.to_be_bytes()).open(2).open(2);
                            for name in names {
                                b.vec(1, name);
                            }
                            b.close().close();
                        }
                        Ext::Versions(versions) => {
                            b.put(&43u16.to_be_bytes()).open(2).open(1);
                            for v in versions {
                                b.put(&v.to_be_bytes());
                            }
                            b.close().close();
                        }
                        Ext::Raw(typ, data) => {
                            b.put(&typ.to_be_bytes()).vec(2, data);
                        }
                    }
                }
                b.close();
            }
            b.close().close();
            b
        }

        fn bytes(&self) -> Vec<u8> {
            self.build().out
        }
    }

    // ---- captured hellos ----

    #[test]
    fn captured_hellos_parse() {
        for c in CAPTURES {
            assert_eq!(parse(c.bytes), c.want(c.bytes.len()), "{}", c.name);
            for tail in [
                &b"\x17\x03\x03\x00\x05hello"[..],
                b"\x16",
                b"GET / HTTP/1.1\r\n",
            ] {
                let mut more = c.bytes.to_vec();
                more.extend_from_slice(tail);
                assert_eq!(parse(&more), c.want(c.bytes.len()), "{} + {tail:?}", c.name);
            }
        }
    }

    #[test]
    fn captured_hellos_every_prefix_is_incomplete() {
        for c in CAPTURES {
            for i in 0..c.bytes.len() {
                assert_eq!(
                    parse(&c.bytes[..i]),
                    Parsed::Incomplete,
                    "{} prefix {i}",
                    c.name
                );
            }
        }
    }

    #[test]
    fn captured_hellos_split_into_two_records_at_every_point() {
        for c in CAPTURES {
            let msg = c.message();
            for at in 1..msg.len() {
                let two = records(msg, &[at]);
                assert_eq!(two.len(), c.bytes.len() + 5);
                assert_eq!(parse(&two), c.want(two.len()), "{} split at {at}", c.name);
                let mut more = two.clone();
                more.extend_from_slice(b"\x16\x03\x03\x00\x01\x01");
                assert_eq!(
                    parse(&more),
                    c.want(two.len()),
                    "{} split at {at} + more",
                    c.name
                );
                // Both records' bytes are needed: the end of the first is not the end.
                assert_eq!(parse(&two[..at + 5]), Parsed::Incomplete);
                assert_eq!(parse(&two[..at + 10]), Parsed::Incomplete);
            }
            // Every prefix, for splits inside and around the handshake header.
            for at in [1, 2, 3, 4, 5, 40, msg.len() / 2, msg.len() - 1] {
                let two = records(msg, &[at]);
                for i in 0..two.len() {
                    assert_eq!(parse(&two[..i]), Parsed::Incomplete, "{} {at} {i}", c.name);
                }
            }
        }
    }

    #[test]
    fn captured_hellos_in_one_byte_records() {
        for c in CAPTURES {
            let msg = c.message();
            let tiny = records(msg, &vec![1; msg.len()]);
            assert_eq!(tiny.len(), msg.len() * 6);
            assert_eq!(parse(&tiny), c.want(tiny.len()), "{}", c.name);
        }
    }

    // ---- hand-built hellos ----

    #[test]
    fn typical_hand_built_hello() {
        let h = Spec::typical().bytes();
        let want = Parsed::Complete(ClientHello {
            sni: Some("example.com".into()),
            alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            version: 0x0304,
            prefers_chacha: false,
            len: h.len(),
        });
        assert_eq!(parse(&h), want);
        for i in 0..h.len() {
            assert_eq!(parse(&h[..i]), Parsed::Incomplete);
        }
    }

    #[test]
    fn chacha_preference_is_the_first_suite_grease_aside() {
        for (suites, want) in [
            (vec![0x1303, 0x1301], true),
            (vec![0x2a2a, 0xcca9, 0x1301], true),
            (vec![0xcca8], true),
            (vec![0x1301, 0x1303], false),
            (vec![0x3a3a, 0x1302, 0x1303], false),
            (vec![0x0a0a], false),
        ] {
            let h = Spec {
                suites: suites.clone(),
                ..Spec::typical()
            }
            .bytes();
            match parse(&h) {
                Parsed::Complete(c) => assert_eq!(c.prefers_chacha, want, "{suites:x?}"),
                other => panic!("{suites:x?}: {other:?}"),
            }
        }
    }

    #[test]
    fn no_extensions_at_all() {
        let spec = Spec {
            legacy_version: 0x0301,
            session_id: vec![],
            exts: None,
            ..Spec::typical()
        };
        let h = spec.bytes();
        let want = Parsed::Complete(ClientHello {
            sni: None,
            alpn: vec![],
            version: 0x0301,
            prefers_chacha: false,
            len: h.len(),
        });
        assert_eq!(parse(&h), want);
        for i in 0..h.len() {
            assert_eq!(parse(&h[..i]), Parsed::Incomplete);
        }
        // An empty extensions block is valid too.
        let h = Spec::with_exts(vec![]).bytes();
        assert_eq!(complete(parse(&h)).version, 0x0303);
    }

    #[test]
    fn versions() {
        let v = |exts| complete(parse(&Spec::with_exts(exts).bytes())).version;
        assert_eq!(v(vec![]), 0x0303);
        assert_eq!(v(vec![Ext::Versions(vec![0x0303, 0x0302])]), 0x0303);
        assert_eq!(v(vec![Ext::Versions(vec![0x0304])]), 0x0304);
        assert_eq!(v(vec![Ext::Versions(vec![0x1a1a, 0x0304])]), 0x0304);
        for bad in [vec![], vec![0x03]] {
            let b = Spec::with_exts(vec![Ext::Raw(43, {
                let mut d = vec![bad.len() as u8];
                d.extend_from_slice(&bad);
                d
            })]);
            assert_eq!(invalid(&b.bytes()), "bad supported_versions length");
        }
        let sslv3 = Spec {
            legacy_version: 0x0300,
            exts: None,
            ..Spec::typical()
        };
        assert_eq!(complete(parse(&sslv3.bytes())).version, 0x0300);
        let bad = Spec {
            legacy_version: 0x0203,
            ..Spec::typical()
        };
        assert_eq!(invalid(&bad.bytes()), "bad legacy_version");
    }

    #[test]
    fn server_names() {
        let name = |ext: Ext| parse(&Spec::with_exts(vec![ext]).bytes());
        let sni_of = |ext: Ext| complete(name(ext)).sni;
        assert_eq!(
            sni_of(sni("WWW.Example.COM")),
            Some("www.example.com".into())
        );
        assert_eq!(sni_of(sni("example.com.")), Some("example.com".into()));
        assert_eq!(sni_of(sni("a")), Some("a".into()));
        assert_eq!(
            sni_of(sni("_srv.my-host.example")),
            Some("_srv.my-host.example".into())
        );
        assert_eq!(sni_of(sni("127.0.0.1")), Some("127.0.0.1".into()));
        let long = format!("{}.example", "a".repeat(247));
        assert_eq!(long.len(), 255);
        assert_eq!(sni_of(sni(&long)), Some(long.clone()));
        // The first host_name counts; other name types are skipped.
        let entries = vec![
            (7, b"whatever \xff".to_vec()),
            (0, b"First.example".to_vec()),
            (0, b"second.example".to_vec()),
        ];
        assert_eq!(sni_of(Ext::Sni(entries)), Some("first.example".into()));
        assert_eq!(sni_of(Ext::Sni(vec![(1, b"x".to_vec())])), None);

        for bad in [
            "",
            ".",
            "..",
            "example.com..",
            ".example.com",
            "a..b",
            "exa mple.com",
            "example.com:443",
            "*.example.com",
            "ex\u{e4}mple.com",
            "a/b",
            "a\0b",
            &format!("{}.example", "a".repeat(248)),
        ] {
            assert_eq!(name(sni(bad)), Parsed::Invalid(BAD_NAME), "{bad:?}");
        }
        assert_eq!(
            name(Ext::Sni(vec![])),
            Parsed::Invalid("empty server_name list")
        );
        // An empty extension (servers send one; a client must not).
        assert!(matches!(name(Ext::Raw(0, vec![])), Parsed::Invalid(_)));
    }

    #[test]
    fn alpn_lists() {
        let parsed = |ext: Ext| parse(&Spec::with_exts(vec![ext]).bytes());
        let names: Vec<Vec<u8>> = vec![b"\x0a\x0a".to_vec(), vec![0xff; 255], b"h2".to_vec()];
        assert_eq!(complete(parsed(Ext::Alpn(names.clone()))).alpn, names);
        assert_eq!(
            parsed(Ext::Alpn(vec![])),
            Parsed::Invalid("empty ALPN list")
        );
        assert_eq!(
            parsed(Ext::Alpn(vec![b"h2".to_vec(), vec![]])),
            Parsed::Invalid("empty ALPN protocol name")
        );
        assert!(matches!(parsed(Ext::Raw(16, vec![])), Parsed::Invalid(_)));
    }

    #[test]
    fn duplicate_extensions() {
        for exts in [
            vec![sni("a.example"), sni("b.example")],
            vec![
                Ext::Raw(0xabcd, vec![]),
                Ext::Raw(51, vec![]),
                Ext::Raw(0xabcd, vec![1]),
            ],
            vec![Ext::Raw(0x0a0a, vec![]), Ext::Raw(0x0a0a, vec![])],
            vec![Ext::Versions(vec![0x0304]), Ext::Versions(vec![0x0304])],
        ] {
            let h = Spec::with_exts(exts).bytes();
            assert_eq!(invalid(&h), "duplicate extension");
        }
        // Different GREASE values, as Chromium sends, are fine.
        let h = Spec::with_exts(vec![Ext::Raw(0x0a0a, vec![]), Ext::Raw(0x1a1a, vec![0])]);
        complete(parse(&h.bytes()));
    }

    /// Every length inside the message, set one past what its parent has room for, is
    /// refused as soon as the length is read, however many bytes follow.
    #[test]
    fn lengths_that_overflow_their_parent() {
        let specs = [
            Spec::typical(),
            Spec::with_exts(vec![Ext::Sni(vec![
                (0, b"a".to_vec()),
                (3, b"xyz".to_vec()),
            ])]),
        ];
        let mut checked = 0;
        for spec in specs {
            let b = spec.build();
            // Fields 0 and 1 are the record's and the message's: a longer message may
            // continue in another record, and a longer record is waiting for bytes.
            for f in &b.fields[2..] {
                let parent = b.fields[f.parent.unwrap()];
                let room = parent.end - (f.at + f.width);
                let over = room + 1;
                if over >= 1 << (8 * f.width) {
                    continue;
                }
                let mut h = b.out.clone();
                h[f.at..f.at + f.width]
                    .copy_from_slice(&(over as u32).to_be_bytes()[4 - f.width..]);
                let why = invalid(&h);
                // Decided by the length itself: the bytes after it do not matter.
                assert_eq!(parse(&h[..f.at + f.width]), Parsed::Invalid(why), "{f:?}");
                checked += 1;
            }
        }
        assert!(checked >= 15, "{checked}");
    }

    #[test]
    fn bytes_left_over_inside_the_message() {
        // A byte after the extensions, counted in the message's length.
        let b = Spec::typical().build();
        let mut h = b.out.clone();
        h.push(0);
        h[4] += 1; // record
        h[8] += 1; // message
        assert_eq!(invalid(&h), "bytes after the extensions");
        // A byte after a hello without extensions: it would be half an extensions length.
        let mut h = Spec {
            exts: None,
            ..Spec::typical()
        }
        .bytes();
        h.push(0);
        h[4] += 1;
        h[8] += 1;
        assert!(matches!(parse(&h), Parsed::Invalid(_)));
        // A byte after the list inside server_name, ALPN and supported_versions.
        for (ext, why) in [
            (sni("example.com"), "bytes after the server_name list"),
            (Ext::Alpn(vec![b"h2".to_vec()]), "bytes after the ALPN list"),
            (
                Ext::Versions(vec![0x0304]),
                "bytes after the supported_versions list",
            ),
        ] {
            let b = Spec::with_exts(vec![ext]).build();
            // Fields: record, message, session_id, suites, compression, extensions, ext data.
            let data = b.fields[6];
            let mut h = b.out.clone();
            h.insert(data.end, 0);
            for f in [0, 1, 5, 6] {
                let f = b.fields[f];
                let n = u32::from_be_bytes({
                    let mut w = [0; 4];
                    w[4 - f.width..].copy_from_slice(&h[f.at..f.at + f.width]);
                    w
                }) + 1;
                h[f.at..f.at + f.width].copy_from_slice(&n.to_be_bytes()[4 - f.width..]);
            }
            assert_eq!(invalid(&h), why);
        }
    }

    #[test]
    fn body_fields() {
        let bad = |spec: Spec| invalid(&spec.bytes());
        let t = Spec::typical;
        assert_eq!(
            bad(Spec {
                session_id: vec![0; 33],
                ..t()
            }),
            "session_id longer than 32 bytes"
        );
        assert_eq!(
            bad(Spec {
                suites: vec![],
                ..t()
            }),
            "bad cipher_suites length"
        );
        assert_eq!(
            bad(Spec {
                compression: vec![],
                ..t()
            }),
            "no compression_methods"
        );
        // An odd number of cipher suite bytes.
        let mut h = Spec { exts: None, ..t() }.bytes();
        let suites_len = 9 + 2 + 32 + 1 + 32;
        assert_eq!(h[suites_len + 1], 8);
        h[suites_len + 1] = 7;
        assert_eq!(invalid(&h), "bad cipher_suites length");
        // Too short for a random.
        let h = records(&[1, 0, 0, 10, 3, 3, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
        assert_eq!(invalid(&h), "ClientHello too short");
        let h = records(&[1, 0, 0, 0], &[]);
        assert_eq!(invalid(&h), "ClientHello too short");
    }

    #[test]
    fn record_layer() {
        let h = Spec::typical().bytes();
        // Record versions 3.0 to 3.4 are accepted.
        for minor in 0..=4 {
            let mut h = h.clone();
            h[2] = minor;
            complete(parse(&h));
        }
        for (at, byte, why) in [
            (1, 2, "bad record version"),
            (2, 5, "bad record version"),
            (3, 0x41, "record longer than 16384 bytes"),
        ] {
            let mut h = h.clone();
            h[at] = byte;
            // Refused as soon as the byte is seen.
            assert_eq!(parse(&h[..at + 1]), Parsed::Invalid(why));
            assert_eq!(parse(&h), Parsed::Invalid(why));
        }
        assert_eq!(
            parse(&[0x16, 3, 1, 0, 0]),
            Parsed::Invalid("empty handshake record")
        );
        assert_eq!(
            parse(&[0x16, 3, 1, 0x40, 1]),
            Parsed::Invalid("record longer than 16384 bytes")
        );
        // Not a ClientHello: a ServerHello, or another content type in the first record's
        // body does not matter, only the handshake type.
        assert_eq!(
            parse(&[0x16, 3, 1, 0, 4, 2]),
            Parsed::Invalid("not a ClientHello")
        );
        // A non-handshake record between the fragments.
        let msg = &h[5..];
        for t in [0x14, 0x15, 0x17, 0x80] {
            let mut two = records(msg, &[10]);
            two[15] = t;
            assert_eq!(
                parse(&two[..16]),
                Parsed::Invalid("non-handshake record inside the ClientHello")
            );
            assert_eq!(
                parse(&two),
                Parsed::Invalid("non-handshake record inside the ClientHello")
            );
        }
        // An empty record between the fragments.
        let mut two = records(&msg[..10], &[]);
        two.extend_from_slice(&[0x16, 3, 3, 0, 0]);
        assert_eq!(parse(&two), Parsed::Invalid("empty handshake record"));
        // More bytes in the hello's last record than the hello.
        let mut h2 = h.clone();
        h2.extend_from_slice(&[1, 0, 0, 0]);
        let n = u16::from_be_bytes([h2[3], h2[4]]) + 4;
        h2[3..5].copy_from_slice(&n.to_be_bytes());
        assert_eq!(
            parse(&h2[..10]),
            Parsed::Invalid("bytes after the ClientHello in its record")
        );
    }

    #[test]
    fn the_longest_hello() {
        // One full-sized record of 16 KiB: MAX_LEN bytes.
        let padding =
            |n: usize| Spec::with_exts(vec![sni("big.example"), Ext::Raw(21, vec![0; n])]);
        let short = padding(0).bytes();
        let h = padding(MAX_LEN - short.len()).bytes();
        assert_eq!(h.len(), MAX_LEN);
        let got = complete(parse(&h));
        assert_eq!(
            (got.len, got.sni.as_deref()),
            (MAX_LEN, Some("big.example"))
        );
        // One byte more cannot fit in a record, nor in two.
        let h = padding(MAX_LEN - short.len() + 1).bytes();
        assert_eq!(
            parse(&h[..5]),
            Parsed::Invalid("record longer than 16384 bytes")
        );
        let two = records(&h[5..], &[100]);
        assert_eq!(parse(&two[..9]), Parsed::Invalid(TOO_LONG));
        // Split in two, a message of 16380 bytes needs 16390 bytes: one too many.
        let h = padding(MAX_LEN - short.len() - 4).bytes();
        assert_eq!(h.len(), MAX_LEN - 4);
        complete(parse(&h));
        let two = records(&h[5..], &[8000]);
        assert_eq!(two.len(), MAX_LEN + 1);
        assert_eq!(parse(&two[..9]), Parsed::Invalid(TOO_LONG));
        // A 3000-byte message in one-byte records would need 18000 bytes.
        let h = padding(3000).bytes();
        let tiny = records(&h[5..], &vec![1; h.len()]);
        assert_eq!(parse(&tiny), Parsed::Invalid(TOO_LONG));
        assert_eq!(parse(&tiny[..MAX_LEN]), Parsed::Invalid(TOO_LONG));
        // Nothing is Incomplete at MAX_LEN bytes: a record header may not start too late.
        let h = padding(12000).bytes();
        for size in 1..=7 {
            let many = records(&h[5..], &vec![size; h.len()]);
            assert_eq!(parse(&many[..MAX_LEN]), Parsed::Invalid(TOO_LONG), "{size}");
        }
    }

    #[test]
    fn not_tls_after_one_byte() {
        assert_eq!(parse(b""), Parsed::Incomplete);
        assert_eq!(parse(b"\x16"), Parsed::Incomplete);
        for text in [
            &b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"[..],
            b"SSH-2.0-OpenSSH_9.6\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
            // SSLv2-compatible ClientHello (a 2-byte header with the high bit set).
            b"\x80\x2e\x01\x03\x01\x00\x15\x00\x00\x00\x10",
            b"\x15\x03\x03\x00\x02\x02\x28",
            b"\x17\x03\x03\x00\x01\x00",
            b"\x00",
        ] {
            assert_eq!(parse(&text[..1]), Parsed::NotTls, "{text:?}");
            assert_eq!(parse(text), Parsed::NotTls, "{text:?}");
        }
    }

    // ---- arbitrary bytes ----

    /// The properties every answer must have, whatever the input.
    fn check(buf: &[u8], rng: &mut Rng) {
        let got = parse(buf);
        let n = rng.below(40);
        let tail = rng.bytes(n);
        let with_tail = |n: usize| {
            let mut more = buf[..n].to_vec();
            more.extend_from_slice(&tail);
            more
        };
        match &got {
            Parsed::Complete(h) => {
                assert!(h.len <= buf.len() && h.len <= MAX_LEN, "{buf:02x?}");
                assert_eq!(parse(&buf[..h.len]), got, "{buf:02x?}");
                assert_eq!(parse(&with_tail(h.len)), got, "{buf:02x?}");
                if let Some(sni) = &h.sni {
                    assert!(!sni.is_empty() && sni.len() <= 255);
                    assert!(!sni.bytes().any(|b| b.is_ascii_uppercase()));
                }
                assert!(h.alpn.iter().all(|a| !a.is_empty() && a.len() <= 255));
            }
            Parsed::Invalid(_) => {
                assert!(matches!(parse(&with_tail(buf.len())), Parsed::Invalid(_)));
            }
            Parsed::NotTls => {
                assert_ne!(buf[0], 0x16);
                assert_eq!(parse(&with_tail(buf.len())), Parsed::NotTls);
            }
            Parsed::Incomplete => assert!(buf.len() < MAX_LEN),
        }
        // A final answer on a prefix is the answer on the whole.
        for _ in 0..4 {
            let n = rng.below(buf.len() + 1);
            match (parse(&buf[..n]), &got) {
                (Parsed::Incomplete, _) => {}
                (Parsed::Invalid(_), Parsed::Invalid(_)) => {}
                (early, _) => assert_eq!(&early, &got, "prefix {n} of {buf:02x?}"),
            }
        }
    }

    fn mutate(rng: &mut Rng, seed: &[u8], other: &[u8]) -> Vec<u8> {
        let mut buf = seed.to_vec();
        for _ in 0..1 + rng.below(4) {
            match rng.below(6) {
                // Flip a byte (the first ~60 hold most of the lengths).
                0 | 1 if !buf.is_empty() => {
                    let at = if rng.below(2) == 0 {
                        rng.below(buf.len().min(60))
                    } else {
                        rng.below(buf.len())
                    };
                    buf[at] = if rng.below(2) == 0 {
                        rng.byte()
                    } else {
                        buf[at] ^ (1 << rng.below(8))
                    };
                }
                2 => buf.truncate(rng.below(buf.len() + 1)),
                3 => {
                    // Splice: our head, another's tail.
                    let a = rng.below(buf.len() + 1);
                    let b = rng.below(other.len() + 1);
                    buf.truncate(a);
                    buf.extend_from_slice(&other[b..]);
                }
                4 if !buf.is_empty() => {
                    let at = rng.below(buf.len());
                    buf.remove(at);
                }
                _ => {
                    let at = rng.below(buf.len() + 1);
                    buf.insert(at, rng.byte());
                }
            }
        }
        buf
    }

    #[test]
    fn arbitrary_bytes() {
        let mut rng = Rng(0x5eed_c11e_47e1_1001);
        for i in 0..20_000 {
            let n = rng.below(600);
            let mut buf = rng.bytes(n);
            // Mostly give it a plausible start, or it stops at the first byte.
            if i % 4 != 0 && buf.len() >= 10 {
                let len = buf.len() - 5;
                buf[..5].copy_from_slice(&[
                    0x16,
                    3,
                    rng.below(5) as u8,
                    (len >> 8) as u8,
                    len as u8,
                ]);
                buf[5] = 1;
                let m = len.saturating_sub(4 + rng.below(3));
                buf[6..9].copy_from_slice(&(m as u32).to_be_bytes()[1..]);
                buf[9] = 3;
            }
            check(&buf, &mut rng);
        }
        let seeds: Vec<Vec<u8>> = CAPTURES
            .iter()
            .map(|c| c.bytes.to_vec())
            .chain([
                Spec::typical().bytes(),
                records(&Spec::typical().bytes()[5..], &[50]),
            ])
            .collect();
        let mut kinds = [0; 4];
        for i in 0..20_000 {
            let seed = &seeds[i % seeds.len()];
            let other = &seeds[rng.below(seeds.len())];
            let buf = mutate(&mut rng, seed, other);
            kinds[match parse(&buf) {
                Parsed::Incomplete => 0,
                Parsed::NotTls => 1,
                Parsed::Invalid(_) => 2,
                Parsed::Complete(_) => 3,
            }] += 1;
            check(&buf, &mut rng);
        }
        // Every answer comes up: the mutations keep some hellos valid (a changed random or
        // key share), truncate some and break most.
        assert!(kinds.iter().all(|&n| n > 100), "{kinds:?}");
    }
}
