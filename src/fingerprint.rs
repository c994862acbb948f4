//! The JA4 fingerprint of a viewer's TLS client (FoxIO's JA4, as CloudFront sends it in
//! `CloudFront-Viewer-JA4-Fingerprint`), read from the ClientHello. It names the client's TLS
//! stack, not the device: devices of one firmware share it, and a flooder's differs from theirs.

use boring::sha::sha256;

/// A ClientHello's fields, read from its body (after the handshake header); `None` for one too
/// short for its own lengths.
struct Hello<'a> {
    legacy_version: u16,
    ciphers: &'a [u8],
    /// (type, data), in the client's order.
    extensions: Vec<(u16, &'a [u8])>,
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = *self.take(1)?.first()?;
        self.take(usize::from(n))
    }

    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
}

impl<'a> Hello<'a> {
    fn parse(body: &'a [u8]) -> Option<Hello<'a>> {
        let mut r = Reader(body);
        let legacy_version = r.u16()?;
        r.take(32)?; // random
        r.vec8()?; // session id
        let ciphers = r.vec16()?;
        r.vec8()?; // compression methods
        let mut extensions = Vec::new();
        if !r.0.is_empty() {
            let mut e = Reader(r.vec16()?);
            while !e.0.is_empty() {
                let kind = e.u16()?;
                extensions.push((kind, e.vec16()?));
            }
        }
        Some(Hello {
            legacy_version,
            ciphers,
            extensions,
        })
    }

    fn extension(&self, kind: u16) -> Option<&'a [u8]> {
        self.extensions.iter().find(|(k, _)| *k == kind).map(|(_, d)| *d)
    }
}

const SERVER_NAME: u16 = 0x0000;
const SIGNATURE_ALGORITHMS: u16 = 0x000d;
const ALPN: u16 = 0x0010;
const SUPPORTED_VERSIONS: u16 = 0x002b;

/// GREASE values (RFC 8701) are left out everywhere.
fn grease(v: u16) -> bool {
    v & 0x0f0f == 0x0a0a && v >> 8 == v & 0xff
}

fn u16s(b: &[u8]) -> impl Iterator<Item = u16> + '_ {
    b.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).filter(|v| !grease(*v))
}

/// The first 12 hex digits of the SHA-256 of `values` as 4-digit hex, comma separated, with
/// `tail` (another such list) after an underscore when it has any.
fn hash(values: &[u16], tail: &[u16]) -> String {
    if values.is_empty() {
        return "000000000000".into();
    }
    let list = |v: &[u16]| v.iter().map(|x| format!("{x:04x}")).collect::<Vec<_>>().join(",");
    let mut text = list(values);
    if !tail.is_empty() {
        text.push('_');
        text.push_str(&list(tail));
    }
    sha256(text.as_bytes()).iter().take(6).map(|b| format!("{b:02x}")).collect()
}

/// The first and last characters of the first ALPN protocol; their hex digits when either is
/// not alphanumeric; `00` without one.
fn alpn(hello: &Hello<'_>) -> String {
    let first = hello.extension(ALPN).and_then(|d| Reader(d).vec16()).and_then(|l| Reader(l).vec8());
    let (Some(&a), Some(&z)) = (first.and_then(|p| p.first()), first.and_then(|p| p.last())) else {
        return "00".into();
    };
    if a.is_ascii_alphanumeric() && z.is_ascii_alphanumeric() {
        format!("{}{}", char::from(a), char::from(z))
    } else {
        format!("{:x}{:x}", a >> 4, z & 0x0f)
    }
}

/// The JA4 fingerprint of the ClientHello whose body is `body` (over TCP, so `t`).
pub fn ja4(body: &[u8]) -> Option<String> {
    let hello = Hello::parse(body)?;
    let version = hello
        .extension(SUPPORTED_VERSIONS)
        .and_then(|d| Reader(d).vec8())
        .and_then(|v| u16s(v).max())
        .unwrap_or(hello.legacy_version);
    let version = match version {
        0x0304 => "13",
        0x0303 => "12",
        0x0302 => "11",
        0x0301 => "10",
        0x0300 => "s3",
        0x0200 => "s2",
        0x0100 => "s1",
        _ => "00",
    };
    let sni = if hello.extension(SERVER_NAME).is_some() { 'd' } else { 'i' };
    let mut ciphers: Vec<u16> = u16s(hello.ciphers).collect();
    let kinds = hello.extensions.iter().map(|(k, _)| *k).filter(|k| !grease(*k));
    let count = kinds.clone().count();
    let mut extensions: Vec<u16> = kinds.filter(|k| *k != SERVER_NAME && *k != ALPN).collect();
    ciphers.sort_unstable();
    extensions.sort_unstable();
    let signatures: Vec<u16> = hello
        .extension(SIGNATURE_ALGORITHMS)
        .and_then(|d| Reader(d).vec16())
        .map(|l| u16s(l).collect())
        .unwrap_or_default();
    Some(format!(
        "t{version}{sni}{:02}{:02}{}_{}_{}",
        ciphers.len().min(99),
        count.min(99),
        alpn(&hello),
        hash(&ciphers, &[]),
        hash(&extensions, &signatures),
    ))
}

#[cfg(test)]
mod tests {
    use super::ja4;

    fn vec16(body: &[u8]) -> Vec<u8> {
        let mut v = (body.len() as u16).to_be_bytes().to_vec();
        v.extend_from_slice(body);
        v
    }

    fn words(v: &[u16]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_be_bytes()).collect()
    }

    /// A ClientHello body with these ciphers and extensions (type, data).
    fn hello(ciphers: &[u16], extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut b = vec![0x03, 0x03];
        b.extend_from_slice(&[7; 32]);
        b.extend_from_slice(&[32]);
        b.extend_from_slice(&[9; 32]);
        b.extend(vec16(&words(ciphers)));
        b.extend_from_slice(&[1, 0]);
        let mut ext = Vec::new();
        for (kind, data) in extensions {
            ext.extend_from_slice(&kind.to_be_bytes());
            ext.extend(vec16(data));
        }
        b.extend(vec16(&ext));
        b
    }

    /// Chrome 143's ClientHello as a public fingerprinting service reported it (its JA4 and the
    /// original order behind it), with GREASE values added, which JA4 leaves out.
    #[test]
    fn chrome_matches_its_published_fingerprint() {
        let ciphers = [
            0x2a2a, 0x1301, 0x1302, 0x1303, 0xc02b, 0xc02f, 0xc02c, 0xc030, 0xcca9, 0xcca8, 0xc013, 0xc014, 0x009c,
            0x009d, 0x002f, 0x0035,
        ];
        let alpn = {
            let mut l = vec![2];
            l.extend_from_slice(b"h2");
            l.push(8);
            l.extend_from_slice(b"http/1.1");
            vec16(&l)
        };
        let sni = vec16(&[&[0u8][..], &vec16(b"tls.example")].concat());
        let versions = [&[6u8][..], &words(&[0x5a5a, 0x0304, 0x0303])].concat();
        let signatures = vec16(&words(&[0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601]));
        let mut extensions: Vec<(u16, Vec<u8>)> = vec![(0x1a1a, vec![])];
        for kind in [
            0x002d, 0x0033, 0x0010, 0xfe0d, 0x0017, 0x44cd, 0x0000, 0x000b, 0x000a, 0x002b, 0xff01, 0x0023, 0x0012,
            0x0005, 0x000d, 0x001b,
        ] {
            let data = match kind {
                0x0010 => alpn.clone(),
                0x0000 => sni.clone(),
                0x002b => versions.clone(),
                0x000d => signatures.clone(),
                _ => vec![],
            };
            extensions.push((kind, data));
        }
        extensions.push((0xbaba, vec![0]));
        let body = hello(&ciphers, &extensions);
        assert_eq!(ja4(&body).as_deref(), Some("t13d1516h2_8daaf6152771_d8a2da3f94cd"));
    }

    #[test]
    fn without_sni_alpn_or_extensions() {
        let body = hello(&[0x1301], &[]);
        let f = ja4(&body).unwrap();
        assert!(f.starts_with("t12i010000_"), "{f}");
        assert!(f.ends_with("_000000000000"), "{f}");
        // An ALPN protocol that does not start and end alphanumeric gives hex digits.
        let odd = vec16(&[&[3u8][..], &[0xab, b'x', 0x2f]].concat());
        let f = ja4(&hello(&[0x1301], &[(0x0010, odd)])).unwrap();
        assert!(f.starts_with("t12i0101af_"), "{f}");
    }

    #[test]
    fn truncated_hellos_have_none() {
        let body = hello(&[0x1301, 0x1302], &[(0x0000, vec![1, 2, 3])]);
        for n in 0..body.len() {
            // Every prefix either parses (extensions cut at a boundary) or is refused; none panics.
            let _ = ja4(&body[..n]);
        }
        assert!(ja4(&body[..10]).is_none());
    }
}
